//! Measures what re-resolving a late record's closure in event-time order costs, by the
//! closure's size: what the default reorder bound (`[identity.rules.reorder]`) is chosen from.
//!
//! ```text
//! TESSERA_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo run -p tessera-identity --release --example reorder_cost -- postgres 1000 10
//! ```
//!
//! Arguments: the backend (`postgres`, a fresh database on the test server, or `sqlite`, a
//! temporary file), the number of people `n` and of events per person `k`. Each person has
//! `k` events in event-time order (their user id, with one of five anonymous ids); the first
//! also carries one kiosk's device id, so the kiosk ties every person into one closure of `n`
//! profiles and `n·k` events. The fixture is resolved with a small bound (the in-order
//! records do not follow the closure), then the bound is lifted and one more record on the
//! kiosk arrives, older than all of them: its transaction finds, locks, replays and rewrites
//! the whole closure. Printed: the closure's size (with the late record's own profile, event
//! and user id), whether the default bound admits it, that transaction's time, and the
//! in-memory replay of the same history alone.
#![allow(clippy::print_stdout)]

use std::time::Instant;

use anyhow::Context;
use tessera_core::Identifier;
use tessera_identity::domain::{
    Constraints, HistoryEntry, Record, ReorderConfig, RulesConfig, in_event_time_order, replay,
};
use tessera_identity::{Identity, IdentitySettings, MIGRATIONS, SCHEMA};
use tessera_store::{Database, DbSettings};
use tessera_testkit::{TestDb, TestSqlite};
use time::{Duration, OffsetDateTime};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let backend = args.first().map_or("postgres", String::as_str);
    let people: usize = args.get(1).map_or(Ok(1_000), |a| a.parse())?;
    let per_person: usize = args.get(2).map_or(Ok(10), |a| a.parse())?;

    let (_pg, _sqlite, url) = match backend {
        "postgres" => {
            let db = TestDb::new().await;
            let url = db.url().to_owned();
            (Some(db), None, url)
        }
        "sqlite" => {
            let dir = TestSqlite::new();
            let url = dir.url("identity.db");
            (None, Some(dir), url)
        }
        other => anyhow::bail!("unknown backend {other}: postgres or sqlite"),
    };
    let db = Database::connect(&url, SCHEMA, &DbSettings::default()).await?;
    db.migrate(MIGRATIONS).await?;
    let small = RulesConfig {
        reorder: ReorderConfig {
            max_profiles: 4,
            max_events: 40,
            max_identifiers: 40,
        },
        ..RulesConfig::default()
    };
    let identity = Identity::new(
        db,
        IdentitySettings {
            rules: small,
            ..IdentitySettings::default()
        },
    )
    .await?;
    let rules = identity.rules().rules.clone();

    let base = OffsetDateTime::now_utc() - Duration::days(1);
    let mut records = Vec::with_capacity(people * per_person + 1);
    for person in 0..people {
        for event in 0..per_person {
            let mut ids = vec![
                Identifier::new("user_id", format!("u{person}")),
                Identifier::new("anonymous_id", format!("a{person}-{}", event % 5)),
            ];
            if event == 0 {
                ids.push(Identifier::new("device_id", "kiosk"));
            }
            let at = base + Duration::milliseconds(i64::try_from(person * per_person + event)?);
            records.push(
                Record::new(&rules, format!("e{person}-{event}"), ids, at)
                    .map_err(|v| anyhow::anyhow!("invalid record: {v:?}"))?,
            );
        }
    }
    let started = Instant::now();
    for chunk in records.chunks(500) {
        identity.resolve(chunk.to_vec()).await?;
    }
    println!(
        "fixture: {people} people x {per_person} events resolved in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let lifted = RulesConfig {
        reorder: ReorderConfig {
            max_profiles: u32::MAX,
            max_events: u32::MAX,
            max_identifiers: u32::MAX,
        },
        ..identity.rules().rules.config().clone()
    };
    identity.update_rules(lifted, None).await?;
    let late = Record::new(
        &rules,
        "late",
        vec![
            Identifier::new("user_id", "late"),
            Identifier::new("device_id", "kiosk"),
        ],
        base - Duration::seconds(1),
    )
    .map_err(|v| anyhow::anyhow!("invalid record: {v:?}"))?;
    records.push(late.clone());

    let started = Instant::now();
    let answer = identity.resolve(vec![late]).await?.remove(0);
    let reorder = started.elapsed().as_secs_f64();
    let kiosk = identity
        .lookup(Identifier::new("device_id", "kiosk"))
        .await
        .context("the kiosk's profile")?;
    anyhow::ensure!(
        kiosk == answer.profile_id,
        "the late record was not re-resolved: the kiosk is not its"
    );

    let mut identifiers: Vec<&Identifier> = records.iter().flat_map(|r| r.identifiers()).collect();
    identifiers.sort_unstable();
    identifiers.dedup();
    let identifiers = identifiers.len();
    let default = ReorderConfig::DEFAULT;
    let within = people < usize::try_from(default.max_profiles)?
        && records.len() <= usize::try_from(default.max_events)?
        && identifiers <= usize::try_from(default.max_identifiers)?;

    let history: Vec<HistoryEntry> = records
        .into_iter()
        .map(|record| HistoryEntry::Event {
            record,
            created: None,
        })
        .collect();
    let started = Instant::now();
    let replayed = replay(
        &identity.rules().rules,
        &in_event_time_order(&history),
        &Constraints::default(),
        OffsetDateTime::now_utc(),
        uuid::Uuid::now_v7,
    );
    let in_memory = started.elapsed().as_secs_f64();
    println!(
        "{backend}: closure of {} profiles, {} events, {identifiers} identifiers (within the \
         default bound: {within}): late record's transaction {:.0} ms (in-memory replay alone \
         {:.0} ms)",
        people + 1,
        replayed.plan.resolutions.len(),
        reorder * 1_000.0,
        in_memory * 1_000.0,
    );
    Ok(())
}
