//! Measures deterministic identity resolution throughput: the identity service as a library on
//! the given database, `callers` concurrent callers each resolving batches of `batch` records
//! (what the pipeline sends), until `records` records are resolved.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/tessera_bench_identity \
//!   cargo run -p tessera-identity --release --example resolve_throughput -- 200000 500 4
//! ```
//!
//! The workload is the load tool's mix: 100,000 visitors; 70 % of events carry only the
//! visitor's anonymous id, 20 % also the user id (an identify), 10 % the user id and email (a
//! backend event), so identifiers are mostly known (hot) and some events link or merge. The
//! database should be fresh; run `ANALYZE` once it holds data (or have autovacuum on). With
//! `REDIS_URL` set, the owner cache is on (keys under `bench:owners:`).
//!
//! `resolve_throughput seed [batch] [callers]` instead resolves two records per visitor (the
//! anonymous id with the user id, the user id with the email), so every identifier of the mix
//! is known and each visitor's are one profile: a run after it links and merges nothing, the
//! hot path alone.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_core::Identifier;
use tessera_identity::domain::Record;
use tessera_identity::{Identity, IdentitySettings, MIGRATIONS, SCHEMA};
use tessera_store::{Database, DbSettings};
use time::OffsetDateTime;

/// The allocator the services run with (`tessera` sets it), so the caller's share of the
/// machine is the identity service's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VISITORS: u64 = 100_000;

fn records(
    run: &str,
    identity: &Identity,
    (rng, seed): (&mut StdRng, bool),
    next: &AtomicUsize,
    n: usize,
) -> anyhow::Result<Vec<Record>> {
    let rules = identity.rules();
    (0..n)
        .map(|_| {
            let seq = next.fetch_add(1, Ordering::Relaxed);
            let visitor = if seed {
                (seq / 2) as u64
            } else {
                rng.random_range(0..VISITORS)
            };
            let anonymous = Identifier::new("anonymous_id", format!("a{visitor}"));
            let user = Identifier::new("user_id", format!("u{visitor}"));
            let email = Identifier::new("email", format!("p{visitor}@example.com"));
            let ids = if seed {
                if seq.is_multiple_of(2) {
                    vec![anonymous, user]
                } else {
                    vec![user, email]
                }
            } else {
                match rng.random_range(0..100) {
                    0..70 => vec![anonymous],
                    70..90 => vec![anonymous, user],
                    _ => vec![user, email],
                }
            };
            Record::new(
                &rules.rules,
                format!("{run}-e{seq}"),
                ids,
                OffsetDateTime::now_utc(),
            )
            .map_err(|v| anyhow::anyhow!("invalid record: {v:?}"))
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let seed = args.first().is_some_and(|a| a == "seed");
    if seed {
        args[0] = (2 * VISITORS).to_string();
    }
    let total: usize = args.first().map_or(Ok(200_000), |a| a.parse())?;
    let batch: usize = args.get(1).map_or(Ok(500), |a| a.parse())?;
    let callers: usize = args.get(2).map_or(Ok(4), |a| a.parse())?;
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL must name a database")?;
    let settings = DbSettings {
        max_connections: u32::try_from(callers * 2).unwrap_or(16),
        ..DbSettings::default()
    };
    let db = Database::connect(&url, SCHEMA, &settings).await?;
    db.migrate(MIGRATIONS).await?;
    // With REDIS_URL, hot identifiers' owners are cached there (as the services run).
    let identity = match std::env::var("REDIS_URL") {
        Ok(redis) => {
            Identity::with_owner_cache(db, IdentitySettings::default(), &redis, "bench:owners:")
                .await?
        }
        Err(_) => Identity::new(db, IdentitySettings::default()).await?,
    };
    // Event ids unique per run, so a second run on the same database resolves new events.
    let run: Arc<str> = format!("{:x}", OffsetDateTime::now_utc().unix_timestamp_nanos()).into();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let identity = identity.clone();
        let (next, done, run) = (Arc::clone(&next), Arc::clone(&done), Arc::clone(&run));
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(caller as u64);
            let mut latencies = Vec::new();
            while done.fetch_add(batch, Ordering::Relaxed) < total {
                let records = records(&run, &identity, (&mut rng, seed), &next, batch)?;
                let at = Instant::now();
                identity.resolve(records).await?;
                latencies.push(at.elapsed().as_secs_f64() * 1_000.0);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    let resolved = latencies.len() * batch;
    println!(
        "resolved {resolved} records in {elapsed:.1} s: {:.0} records/s ({callers} callers, batches of {batch}); per batch p50 {:.1} ms, p99 {:.1} ms",
        resolved as f64 / elapsed,
        pct(0.5),
        pct(0.99),
    );
    Ok(())
}
