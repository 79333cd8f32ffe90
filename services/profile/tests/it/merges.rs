//! Merges decided outside the pipeline (a batch match) reach the profile service as
//! `ApplyEvents` with merges only, many at once: they land in one call, with chains followed to
//! the last survivor, in a number of database statements that does not grow with the merges.

use serde_json::json;
use tessera_proto::convert::to_timestamp;
use tessera_proto::identity::v1 as identity;
use tessera_proto::profile::v1 as pb;
use time::OffsetDateTime;

use crate::service::{Env, events, minutes_ago};
use crate::support::identify;

thread_local! {
    /// The statements sqlx ran on this thread: with a current-thread runtime, by every task of
    /// the test running on it (the services it serves included).
    static STATEMENTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts sqlx's `sqlx::query` events (one per statement) per thread. The process-wide default
/// subscriber of this test binary: a scoped one (`set_default`) missed events while other
/// tests ran.
struct Statements;

impl tracing::Subscriber for Statements {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == "sqlx::query"
    }
    fn new_span(&self, _span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _span: &tracing::span::Id, _values: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _span: &tracing::span::Id, _follows: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if event.metadata().target() == "sqlx::query" {
            STATEMENTS.with(|n| n.set(n.get() + 1));
        }
    }
    fn enter(&self, _span: &tracing::span::Id) {}
    fn exit(&self, _span: &tracing::span::Id) {}
}

fn merge(survivor: &str, merged: &str) -> identity::Merge {
    identity::Merge {
        surviving_profile_id: survivor.to_owned(),
        merged_profile_id: merged.to_owned(),
        cause_event_id: "match:model-1".to_owned(),
        merged_at: Some(to_timestamp(OffsetDateTime::now_utc())),
        rule: "probabilistic".to_owned(),
    }
}

/// `n` merges over fresh profiles, oldest first, and each merged profile's expected survivor:
/// pairs (`b{i}` into `a{i}`), and every fourth a chain (`b{i}` into `a{i}`, then `a{i}` into
/// `c{i}`, so both end in `c{i}`).
fn merges(n: usize) -> (Vec<identity::Merge>, Vec<(String, String)>, Vec<String>) {
    let (mut list, mut expected, mut profiles) = (Vec::new(), Vec::new(), Vec::new());
    let mut i = 0;
    while list.len() < n {
        let (a, b, c) = (format!("a{i:04}"), format!("b{i:04}"), format!("c{i:04}"));
        list.push(merge(&a, &b));
        profiles.extend([a.clone(), b.clone()]);
        if i % 4 == 3 && list.len() < n {
            list.push(merge(&c, &a));
            profiles.push(c.clone());
            expected.extend([(b, c.clone()), (a, c)]);
        } else {
            expected.push((b, a));
        }
        i += 1;
    }
    (list, expected, profiles)
}

async fn apply_counted(
    replica: &crate::service::Replica,
    request: pb::ApplyEventsRequest,
) -> (pb::ApplyEventsResponse, usize) {
    static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let installed =
        *INSTALLED.get_or_init(|| tracing::subscriber::set_global_default(Statements).is_ok());
    assert!(
        installed,
        "another subscriber is the default: statements are not counted"
    );
    let before = STATEMENTS.with(std::cell::Cell::get);
    let response = replica.apply(request).await.expect("apply");
    (response, STATEMENTS.with(std::cell::Cell::get) - before)
}

#[tokio::test]
async fn a_batch_of_merges_lands_in_one_call_with_chains_followed() {
    const N: usize = 200;
    let env = Env::new().await;
    let replica = env.replica().await;
    let (list, expected, profiles) = merges(N);
    let seeded: Vec<pb::ResolvedEvent> = profiles
        .iter()
        .enumerate()
        .map(|(n, p)| {
            identify(
                &format!("e-{p}"),
                p,
                &format!("u-{p}"),
                minutes_ago(60 - (n % 60) as i64),
                json!({"name": format!("person {p}")}),
            )
        })
        .collect();
    replica.apply(events(seeded)).await.expect("seed");

    let request = pb::ApplyEventsRequest {
        merges: list.clone(),
        events: Vec::new(),
    };
    let started = std::time::Instant::now();
    let (response, statements) = apply_counted(&replica, request.clone()).await;
    eprintln!(
        "{N} merges: {statements} statements, {} ms (debug build)",
        started.elapsed().as_millis()
    );
    assert_eq!((response.applied, response.duplicates), (0, 0));
    // Locks, loads, writes, versions, changes and redirects are set-based: no statement per
    // merge (it was two per merge: 414 statements for these 200).
    assert!(
        statements > 0 && statements < 50,
        "{statements} statements for {N} merges"
    );
    for (merged, survivor) in &expected {
        let profile = replica.get_id(merged).await;
        assert_eq!(&profile.profile_id, survivor, "{merged}");
        assert!(profile.merged_profile_ids.contains(merged), "{profile:?}");
        let user = format!("u-{merged}");
        assert!(
            profile.identifiers.iter().any(|i| i.value == user),
            "{merged}'s identifier moved to {survivor}"
        );
    }
    let merged_away = expected.len();
    assert_eq!(merged_away, N);
    let survivors: std::collections::BTreeSet<&String> = expected.iter().map(|(_, s)| s).collect();
    for survivor in &survivors {
        let profile = replica.get_id(survivor).await;
        assert_eq!(
            profile.event_count,
            1 + profile.merged_profile_ids.len() as i64,
            "{profile:?}"
        );
    }

    // Delivered again (the outbox retries until acknowledged): nothing changes.
    let (again, _) = apply_counted(&replica, request).await;
    assert_eq!(again.profiles_changed, 0, "{again:?}");
    for (merged, survivor) in expected.iter().take(20) {
        assert_eq!(&replica.get_id(merged).await.profile_id, survivor);
    }
}
