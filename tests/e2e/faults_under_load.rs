//! Kill -9 one service in the middle of a steady load, restart it behind the address its peers
//! know, and check that nothing acknowledged is lost or counted twice: every acknowledged message
//! is in the event log once, every profile counts exactly its user's acknowledged events, and no
//! user is split across profiles.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use tessera_proto::common::v1::Event;
use tessera_testkit::{TestDb, redis_prefix};
use tessera_tests::Channel;
use tessera_tests::events::{get_by, identify, send, track};
use tessera_tests::{Proxy, Tessera, TesseraBuilder};
use tokio::time::Instant;

use crate::separate_processes::base;

const USERS: usize = 30;
const BATCHES: usize = 40;
const BATCH_SIZE: usize = 50;
/// Pause between batches: the load lasts about three seconds.
const PACE: Duration = Duration::from_millis(75);
/// When, after the load starts, the target is killed.
const KILL_AFTER: Duration = Duration::from_millis(1200);
/// How long a batch is retried before the test gives up.
const ACK_DEADLINE: Duration = Duration::from_secs(30);
/// How long delivery may take to settle after the load.
const SETTLE_DEADLINE: Duration = Duration::from_secs(40);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Ingestion,
    Identity,
    Profile,
}

fn addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .parse()
        .expect("socket address")
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// A channel that reconnects by itself and never waits long on a dead peer.
fn lazy_channel(addr: SocketAddr) -> Channel {
    tessera_tests::authorized(
        tonic::transport::Channel::from_shared(url(addr))
            .expect("url")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect_lazy(),
    )
}

/// The four services; identity, profile and ingestion each behind a proxy, so a restarted
/// process on a new port keeps the address its peers (and the test) use.
struct Deployment {
    scoring: Tessera,
    identity: Tessera,
    profile: Tessera,
    ingestion: Tessera,
    to_identity: Proxy,
    to_profile: Proxy,
    to_ingestion: Proxy,
}

impl Deployment {
    async fn start(db: &TestDb, prefix: &str) -> Self {
        let (identity, scoring) = tokio::join!(
            base("identity", db, prefix).start(),
            base("scoring", db, prefix).start()
        );
        let to_identity = Proxy::start(addr(&identity.grpc_url())).await;
        let profile = base("profile", db, prefix)
            .env("TESSERA__PEERS__IDENTITY", url(to_identity.addr()))
            .env("TESSERA__PEERS__SCORING", scoring.grpc_url())
            .start()
            .await;
        let to_profile = Proxy::start(addr(&profile.grpc_url())).await;
        let ingestion = base("ingestion", db, prefix)
            .env("TESSERA__PEERS__IDENTITY", url(to_identity.addr()))
            .env("TESSERA__PEERS__PROFILE", url(to_profile.addr()))
            .env("TESSERA__INGESTION__LEASE_SECONDS", "2")
            .env("TESSERA__INGESTION__MAX_BACKOFF_MS", "200")
            .start()
            .await;
        let to_ingestion = Proxy::start(addr(&ingestion.grpc_url())).await;
        Self {
            scoring,
            identity,
            profile,
            ingestion,
            to_identity,
            to_profile,
            to_ingestion,
        }
    }

    fn process(&mut self, target: Target) -> (&mut Tessera, &Proxy) {
        match target {
            Target::Ingestion => (&mut self.ingestion, &self.to_ingestion),
            Target::Identity => (&mut self.identity, &self.to_identity),
            Target::Profile => (&mut self.profile, &self.to_profile),
        }
    }

    /// Kill -9 the target; returns its builder to start it again.
    async fn kill(&mut self, target: Target) -> TesseraBuilder {
        let (process, _) = self.process(target);
        process.kill().await;
        process.builder().clone()
    }

    /// Starts the target again (on a new port) and points its proxy at it.
    async fn restart(&mut self, target: Target, builder: TesseraBuilder) {
        let restarted = builder.start().await;
        let (process, proxy) = self.process(target);
        proxy.set_target(addr(&restarted.grpc_url()));
        *process = restarted;
    }
}

/// One acknowledged message: its id and the index of its user.
type Acked = Vec<(String, usize)>;

fn user_id(tag: &str, u: usize) -> String {
    format!("{tag}-u{u}")
}

fn anon_id(tag: &str, u: usize) -> String {
    format!("{tag}-a{u}")
}

/// Batch `b` of the load: tracks of every user in turn, by user id, by anonymous id, or by both.
fn batch(tag: &str, b: usize) -> Vec<(Event, usize)> {
    (0..BATCH_SIZE)
        .map(|k| {
            let n = b * BATCH_SIZE + k;
            let u = n % USERS;
            let (user, anon) = match (n / USERS) % 3 {
                0 => (user_id(tag, u), String::new()),
                1 => (String::new(), anon_id(tag, u)),
                _ => (user_id(tag, u), anon_id(tag, u)),
            };
            let event = track(
                &format!("{tag}-m{n}"),
                &user,
                &anon,
                "Clicked",
                serde_json::json!({"n": n}),
            );
            (event, u)
        })
        .collect()
}

/// Sends `events` until acknowledged, with the same message ids each time, as real clients do;
/// returns how many attempts failed.
async fn send_until_acked(
    channel: &Channel,
    key: &str,
    events: &[(Event, usize)],
    acked: &mut Acked,
) -> usize {
    let deadline = Instant::now() + ACK_DEADLINE;
    let mut failures = 0;
    loop {
        let batch: Vec<Event> = events.iter().map(|(e, _)| e.clone()).collect();
        match send(channel, key, batch).await {
            Ok(statuses) => {
                assert_eq!(statuses.len(), events.len(), "one result per event");
                acked.extend(events.iter().map(|(e, u)| (e.message_id.clone(), *u)));
                return failures;
            }
            Err(e) if Instant::now() < deadline => {
                failures += 1;
                if failures == 1 {
                    eprintln!("batch not acknowledged, retrying: {e:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("a batch was not acknowledged within {ACK_DEADLINE:?}: {e:?}"),
        }
    }
}

/// The steady load: the batches in order, paced; returns every acknowledged message and the
/// number of failed attempts.
async fn load(channel: Channel, key: String, tag: String) -> (Acked, usize) {
    let mut acked = Vec::new();
    let mut failures = 0;
    for b in 0..BATCHES {
        failures += send_until_acked(&channel, &key, &batch(&tag, b), &mut acked).await;
        tokio::time::sleep(PACE).await;
    }
    (acked, failures)
}

/// Invariant 1: each acknowledged message is in the event log of the source exactly once.
async fn check_event_log(db: &TestDb, source: &str, acked: &Acked) {
    let pool = sqlx::PgPool::connect(db.url()).await.expect("connect");
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT e.message_id, count(*) FROM ingestion.events e \
         JOIN ingestion.sources s ON e.source_id = s.source_id::text \
         WHERE s.name = $1 GROUP BY e.message_id",
    )
    .bind(source)
    .fetch_all(&pool)
    .await
    .expect("read the event log");
    pool.close().await;
    let logged: BTreeMap<String, i64> = rows.into_iter().collect();
    let acked: BTreeSet<&str> = acked.iter().map(|(m, _)| m.as_str()).collect();
    let missing: Vec<&str> = acked
        .iter()
        .copied()
        .filter(|m| !logged.contains_key(*m))
        .collect();
    let twice: Vec<(&String, &i64)> = logged.iter().filter(|(_, n)| **n != 1).collect();
    let unacked: Vec<&String> = logged
        .keys()
        .filter(|m| !acked.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty() && twice.is_empty() && unacked.is_empty(),
        "event log differs from the acknowledged messages ({} acknowledged, {} logged): \
         missing {missing:?}; more than once {twice:?}; never acknowledged {unacked:?}",
        acked.len(),
        logged.len()
    );
}

/// The event count of each user's profile (by user id), or the error reading it.
async fn counts(read: &Channel, tag: &str) -> Vec<Result<i64, tonic::Code>> {
    let mut out = Vec::with_capacity(USERS);
    for u in 0..USERS {
        out.push(
            get_by(read, "user_id", &user_id(tag, u))
                .await
                .map(|p| p.event_count)
                .map_err(|e| e.code()),
        );
    }
    out
}

/// The users whose profile does not count `expected` events: (user, expected, seen).
fn mismatches(
    tag: &str,
    expected: &[i64],
    seen: &[Result<i64, tonic::Code>],
) -> Vec<(String, i64, Result<i64, tonic::Code>)> {
    expected
        .iter()
        .zip(seen)
        .enumerate()
        .filter(|(_, (want, got))| **got != Ok(**want))
        .map(|(u, (want, got))| (user_id(tag, u), *want, *got))
        .collect()
}

/// Invariants 2 and 3: each profile counts exactly its user's acknowledged events, stays there,
/// and the user id and anonymous id of a user resolve to the same profile.
async fn check_profiles(read: &Channel, tag: &str, acked: &Acked) {
    let mut expected = vec![0i64; USERS];
    let distinct: BTreeSet<&(String, usize)> = acked.iter().collect();
    for (_, u) in distinct {
        expected[*u] += 1;
    }
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        let seen = counts(read, tag).await;
        let off = mismatches(tag, &expected, &seen);
        if off.is_empty() {
            eprintln!(
                "{tag}: event counts reached after {:?}",
                SETTLE_DEADLINE - (deadline - Instant::now())
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "profiles did not reach their acknowledged event counts within {SETTLE_DEADLINE:?}; \
             (user, acknowledged, event_count): {off:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Settled: nothing arrives late and nothing is counted twice.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = counts(read, tag).await;
    let off = mismatches(tag, &expected, &seen);
    assert!(
        off.is_empty(),
        "event counts moved after settling; (user, acknowledged, event_count): {off:?}"
    );

    let mut split = Vec::new();
    let mut profiles = BTreeSet::new();
    for u in 0..USERS {
        let by_user = get_by(read, "user_id", &user_id(tag, u)).await;
        let by_anon = get_by(read, "anonymous_id", &anon_id(tag, u)).await;
        match (by_user, by_anon) {
            (Ok(a), Ok(b)) if a.profile_id == b.profile_id => {
                profiles.insert(a.profile_id);
            }
            (a, b) => split.push((
                user_id(tag, u),
                a.map(|p| p.profile_id),
                b.map(|p| p.profile_id),
            )),
        }
    }
    assert!(
        split.is_empty(),
        "users split across profiles (user, by user id, by anonymous id): {split:?}"
    );
    assert_eq!(profiles.len(), USERS, "one profile per user: {profiles:?}");
}

async fn kill_during_load(target: Target, tag: &str) {
    let started = Instant::now();
    let db = TestDb::new().await;
    let prefix = redis_prefix();
    let mut d = Deployment::start(&db, &prefix).await;
    let source = format!("{tag}-load");
    let key = d.ingestion.create_source(&source).await;
    let ingest = lazy_channel(d.to_ingestion.addr());

    // Each user is identified once, linking the anonymous id, before the load.
    let identifies: Vec<(Event, usize)> = (0..USERS)
        .map(|u| {
            let event = identify(
                &format!("{tag}-id{u}"),
                &user_id(tag, u),
                &anon_id(tag, u),
                serde_json::json!({"plan": "pro"}),
            );
            (event, u)
        })
        .collect();
    let mut acked = Vec::new();
    send_until_acked(&ingest, &key, &identifies, &mut acked).await;

    let loader = tokio::spawn(load(ingest.clone(), key.clone(), tag.to_owned()));
    tokio::time::sleep(KILL_AFTER).await;
    assert!(!loader.is_finished(), "the load ended before the fault");
    let builder = d.kill(target).await;
    let killed_at = started.elapsed();
    d.restart(target, builder).await;
    let restarted_at = started.elapsed();
    let (load_acked, failures) = loader.await.expect("load task");
    acked.extend(load_acked);
    eprintln!(
        "{target:?}: killed at {killed_at:?}, listening again at {restarted_at:?}, load done at \
         {:?} with {failures} failed attempts, {} acknowledged",
        started.elapsed(),
        acked.len()
    );

    check_event_log(&db, &source, &acked).await;
    eprintln!("{target:?}: event log checked at {:?}", started.elapsed());
    // Read the profile service directly (it may have a new port): the proxy adds latency.
    let read = lazy_channel(addr(&d.profile.grpc_url()));
    check_profiles(&read, tag, &acked).await;
    eprintln!("{target:?}: invariants hold at {:?}", started.elapsed());
    let _ = (&d.scoring, &d.to_identity);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_ingestion_under_load_loses_and_doubles_nothing() {
    kill_during_load(Target::Ingestion, "kill-ing").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_identity_under_load_loses_and_doubles_nothing() {
    kill_during_load(Target::Identity, "kill-idn").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_profile_under_load_loses_and_doubles_nothing() {
    kill_during_load(Target::Profile, "kill-pro").await;
}
