//! `tessera bench-reads`: the profile read path under load. Seeds profiles of about the size of
//! a real one (identify calls through the ingestion API), waits until each is readable, reads
//! every one once so the cache holds it, then reads them by profile id at random from
//! `--concurrency` tasks for `--duration` seconds and reports throughput and latency
//! percentiles: `GetProfile` on a cache hit. With `--cold` it deletes the seeded profiles'
//! cache entries from Redis instead of warming them and reads every profile exactly once, in
//! random order: `GetProfile` on a cache miss (run the services with the near cache off).

// The report is the command's output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use rand::Rng as _;
use rand::seq::SliceRandom as _;
use serde_json::json;
use tessera_proto::common::v1::{Event, EventType, Identifier};
use tessera_proto::convert::json_map_to_struct;
use tessera_proto::ingestion::v1::IngestEventsRequest;
use tessera_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::profile::v1::{GetProfileRequest, get_profile_request};
use tonic::transport::{Channel, Endpoint};

/// Options of `tessera bench-reads`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchReadsArgs {
    /// The gRPC address of the ingestion service (or of `tessera dev`), where the profiles are
    /// seeded.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// The gRPC address of the profile read API [default: --target].
    #[arg(long, value_name = "URL")]
    read_target: Option<String>,
    /// The write key of the source the seed events are sent as [env: TESSERA_WRITE_KEY].
    #[arg(long, value_name = "KEY")]
    pub(crate) write_key: Option<crate::sources::WriteKeyArg>,
    /// The access token the reads are made with (scope profiles:read).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TESSERA_ACCESS_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// How many profiles to seed and read.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    profiles: u64,
    /// Reads in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// How long to read, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    duration: u64,
    /// HTTP/2 connections to spread the reads over.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    connections: u64,
    /// Also print the report as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
    /// Measure cache misses: delete the seeded profiles' entries from the Redis at
    /// `--redis-url` (keys `<--cache-prefix>profile:<id>`) and read each profile once, in random
    /// order, ending early when all are read. Run the services with the near cache off
    /// (`TESSERA__CACHE__ENABLED=false`), or the near cache answers.
    #[arg(long)]
    cold: bool,
    /// The Redis the services cache in, for `--cold`.
    #[arg(long, value_name = "URL", env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// The services' cache key prefix, for `--cold`.
    #[arg(
        long,
        value_name = "PREFIX",
        env = "TESSERA__CACHE_PREFIX",
        default_value = ""
    )]
    cache_prefix: String,
}

/// GetProfile's answer as the readers decode it: the profile's id, checked against the id asked
/// for, and nothing else (prost skips the other fields by their lengths). The load tool's CPU,
/// on the same cores as the service, goes to making reads, as `redis-benchmark`'s goes to
/// reading replies without parsing their values.
#[derive(Clone, PartialEq, prost::Message)]
struct ProfileIdOnly {
    /// `GetProfileResponse.profile`.
    #[prost(message, optional, tag = "1")]
    profile: Option<ProfileHead>,
}

/// `Profile.profile_id`, the rest skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct ProfileHead {
    #[prost(string, tag = "1")]
    profile_id: String,
}

/// GetProfile by id, decoding only the answer's profile id.
async fn read_id(
    client: &mut tonic::client::Grpc<crate::client_tls::Authorized>,
    id: String,
) -> Result<String, tonic::Status> {
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let request = GetProfileRequest {
        lookup: Some(get_profile_request::Lookup::ProfileId(id)),
        as_of: None,
        read_mask: None,
    };
    let answer = client
        .unary(
            tonic::Request::new(request),
            http::uri::PathAndQuery::from_static("/tessera.profile.v1.ProfileService/GetProfile"),
            tonic_prost::ProstCodec::<GetProfileRequest, ProfileIdOnly>::default(),
        )
        .await?;
    Ok(answer
        .into_inner()
        .profile
        .map(|p| p.profile_id)
        .unwrap_or_default())
}

/// Identify calls per seeding request.
const SEED_BATCH: usize = 500;

/// An identify that gives a profile about 1 KB of traits (like `redis-benchmark -d 1024`).
fn seed_event(run: &str, i: u64) -> Event {
    let plan = ["free", "pro", "team"][(i % 3) as usize];
    let traits = json!({
        "name": format!("Reader {i}"),
        "email": format!("reader-{run}-{i}@example.com"),
        "plan": plan,
        "company": {"name": format!("Company {}", i % 97), "employees": 10 + i % 500},
        "address": {"street": format!("{i} Long Street"), "city": "Oslo", "country": "NO"},
        "interests": ["running", "cooking", "travel", "photography", "jazz"],
        "bio": "x".repeat(300),
    });
    Event {
        message_id: format!("bench-reads-{run}-{i}"),
        r#type: EventType::Identify.into(),
        user_id: format!("reader-{run}-{i}"),
        traits: traits.as_object().map(json_map_to_struct),
        ..Event::default()
    }
}

async fn channels(target: &str, n: u64) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(target.to_owned())
        .with_context(|| format!("invalid address {target:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            endpoint
                .connect()
                .await
                .with_context(|| format!("cannot connect to {target}"))?,
        );
    }
    Ok(out)
}

/// Sends the seed identifies and returns each profile's id once it is readable.
async fn seed(
    args: &BenchReadsArgs,
    key: &str,
    read: &crate::client_tls::Authorized,
) -> anyhow::Result<Vec<String>> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let ingest = channels(&args.target, 1).await?.remove(0);
    let all: Vec<u64> = (0..args.profiles).collect();
    for chunk in all.chunks(SEED_BATCH) {
        let mut request = tonic::Request::new(IngestEventsRequest {
            events: chunk.iter().map(|&i| seed_event(&run, i)).collect(),
        });
        request
            .metadata_mut()
            .insert("x-tessera-write-key", key.parse().context("write key")?);
        IngestionServiceClient::new(ingest.clone())
            .ingest_events(request)
            .await
            .context("seeding profiles")?;
    }
    let mut ids = Vec::with_capacity(all.len());
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut client = ProfileServiceClient::new(read.clone());
    for i in all {
        loop {
            let lookup = get_profile_request::Lookup::Identifier(Identifier {
                r#type: "user_id".into(),
                value: format!("reader-{run}-{i}"),
            });
            match client
                .get_profile(GetProfileRequest {
                    lookup: Some(lookup),
                    as_of: None,
                    read_mask: None,
                })
                .await
            {
                Ok(found) => {
                    ids.push(found.into_inner().profile.unwrap_or_default().profile_id);
                    break;
                }
                Err(status) if status.code() == tonic::Code::NotFound => {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "seeded profiles did not become readable within 300 s"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => anyhow::bail!("reading a seeded profile: {}", status.message()),
            }
        }
    }
    Ok(ids)
}

/// Deletes the cache entries of the profiles `ids` (what the services put when they wrote
/// them), in pipelines of 1,000; returns how many there were.
async fn evict(args: &BenchReadsArgs, ids: &[String]) -> anyhow::Result<u64> {
    let url = args
        .redis_url
        .as_deref()
        .context("--cold needs the services' Redis: --redis-url or REDIS_URL")?;
    let client = redis::Client::open(url).context("--redis-url")?;
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let mut evicted = 0;
    for chunk in ids.chunks(1_000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.del(format!("{}profile:{id}", args.cache_prefix));
        }
        let deleted: Vec<u64> = pipe
            .query_async(&mut redis)
            .await
            .context("deleting the cache entries")?;
        evicted += deleted.iter().sum::<u64>();
    }
    eprintln!(
        "tessera bench-reads: deleted {evicted} cache entries of {} profiles",
        ids.len()
    );
    Ok(evicted)
}

/// Runs `tessera bench-reads`.
pub(crate) async fn run(args: BenchReadsArgs) -> anyhow::Result<()> {
    let key = args
        .write_key
        .as_ref()
        .context("a write key is required: --write-key or TESSERA_WRITE_KEY")?
        .0
        .clone();
    let read_target = args
        .read_target
        .clone()
        .unwrap_or_else(|| args.target.clone());
    let reads = channels(&read_target, args.connections)
        .await?
        .into_iter()
        .map(|channel| crate::client_tls::with_token(channel, args.token.as_deref()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!("tessera bench-reads: seeding {} profiles", args.profiles);
    let mut ids = seed(&args, &key, &reads[0]).await?;
    let mut evicted = 0;
    if args.cold {
        evicted = evict(&args, &ids).await?;
        ids.shuffle(&mut rand::rng());
    } else {
        // Once by id, so the cache holds every profile before the clock starts.
        let mut warm = ProfileServiceClient::new(reads[0].clone());
        for id in &ids {
            warm.get_profile(GetProfileRequest {
                lookup: Some(get_profile_request::Lookup::ProfileId(id.clone())),
                as_of: None,
                read_mask: None,
            })
            .await
            .context("warming the cache")?;
        }
    }
    let ids = Arc::new(ids);
    // With --cold, the next profile to read: each is read once.
    let next = Arc::new(AtomicUsize::new(0));
    let cold = args.cold;
    eprintln!(
        "tessera bench-reads: reading for {} s at concurrency {}",
        args.duration, args.concurrency
    );
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..args.concurrency {
        let channel = reads[(n % args.connections) as usize].clone();
        let (ids, stop, next) = (ids.clone(), stop.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = tonic::client::Grpc::new(channel);
            let mut latencies =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = if cold {
                    match ids.get(next.fetch_add(1, Ordering::Relaxed)) {
                        Some(id) => id.clone(),
                        None => break,
                    }
                } else {
                    ids[rand::rng().random_range(0..ids.len())].clone()
                };
                let sent = Instant::now();
                let result = read_id(&mut client, id.clone()).await;
                let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                match result {
                    // A read answered with another profile (a merge would be one) is an error
                    // here: the seeded profiles never merge.
                    Ok(read) if read == id => latencies.saturating_record(micros),
                    Ok(_) | Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    // Cold reads end when every profile was read once, or at the duration.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.duration);
    while tokio::time::Instant::now() < deadline && !(cold && tasks.iter().all(|t| t.is_finished()))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut errors = 0;
    for task in tasks {
        let (h, e) = task.await.context("a reader failed")?;
        latencies.add(h).context("merging histograms")?;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = latencies.len() as f64 / elapsed;
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1_000.0;
    println!(
        "{} {} in {elapsed:.1} s: {rate:.0}/s, errors {errors}, latency ms p50 {:.3} p90 {:.3} \
         p99 {:.3} max {:.3} (profiles {}, concurrency {}, connections {})",
        if cold {
            "cold reads (cache misses)"
        } else {
            "reads"
        },
        latencies.len(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        latencies.max() as f64 / 1_000.0,
        args.profiles,
        args.concurrency,
        args.connections
    );
    if args.json {
        println!(
            "{}",
            json!({
                "cold": cold,
                "evicted": evicted,
                "reads": latencies.len(),
                "seconds": elapsed,
                "per_second": rate,
                "errors": errors,
                "p50_ms": ms(0.5),
                "p90_ms": ms(0.9),
                "p99_ms": ms(0.99),
                "max_ms": latencies.max() as f64 / 1_000.0,
                "profiles": args.profiles,
                "concurrency": args.concurrency,
                "connections": args.connections,
            })
        );
    }
    Ok(())
}
