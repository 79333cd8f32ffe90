//! Outcomes decided by event time, not arrival order, on both backends: a record older than
//! decisions already taken in its closure re-resolves the closure in event-time order, the
//! graph and every stored resolution are rewritten, and the profile service is told through
//! the merge outbox.

use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tessera_core::Identifier;
use tessera_identity::domain::{
    Constraints, HistoryEntry, Record, ReorderConfig, Rules, RulesConfig, replay,
};
use tessera_identity::{Identity, IdentityError};
use tessera_store::Database;
use time::{Duration, OffsetDateTime};

use crate::support::{Backend, lookup};

on_every_backend!(
    a_late_earlier_claim_on_a_shared_device_takes_it_back,
    a_closure_over_the_reorder_bound_keeps_the_arrival_order_outcome,
    records_in_event_time_order_rewrite_nothing,
    the_graph_ends_as_event_time_order_whatever_the_arrival,
);

fn at(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::UNIX_EPOCH + Duration::days(20_000) + Duration::seconds(seconds)
}

fn timed(event: &str, seconds: i64, ids: &[(&str, &str)]) -> Record {
    Record::new(
        &Rules::default(),
        event,
        ids.iter().map(|(k, v)| Identifier::new(*k, *v)).collect(),
        at(seconds),
    )
    .expect("valid record")
}

async fn one(id: &Identity, record: Record) -> tessera_identity::domain::Resolution {
    id.resolve(vec![record]).await.expect("resolve").remove(0)
}

/// Ann used the living-room TV at 10:00, Bob at 09:00; Bob's event arrives later. Bob's is
/// the earlier claim: the TV goes with Bob, Ann's 10:00 event keeps only her user id, and the
/// outbox carries the change for the profile service.
async fn a_late_earlier_claim_on_a_shared_device_takes_it_back(b: &Backend) {
    let id = &b.identity;
    let ten = 10 * 3_600;
    let ann = one(
        id,
        timed("ann-10", ten, &[("user_id", "ann"), ("device_id", "tv")]),
    )
    .await;
    assert_eq!(lookup(id, "device_id", "tv").await, ann.profile_id);

    let bob = one(
        id,
        timed(
            "bob-09",
            ten - 3_600,
            &[("user_id", "bob"), ("device_id", "tv")],
        ),
    )
    .await;
    assert!(
        bob.dropped.is_empty(),
        "the late claim keeps the device: {bob:?}"
    );
    assert!(
        bob.identifiers
            .contains(&Identifier::new("device_id", "tv"))
    );
    assert_eq!(lookup(id, "device_id", "tv").await, bob.profile_id);
    assert_eq!(lookup(id, "user_id", "bob").await, bob.profile_id);
    assert_eq!(
        lookup(id, "user_id", "ann").await,
        ann.profile_id,
        "Ann keeps her profile"
    );
    assert_ne!(ann.profile_id, bob.profile_id);

    // Ann's stored resolution now drops the TV, as resolving by event time would have.
    let again = one(id, timed("ann-10", ten, &[])).await;
    assert_eq!(again.profile_id, ann.profile_id);
    assert_eq!(again.dropped.len(), 1, "{again:?}");
    assert_eq!(
        again.dropped[0].identifier,
        Identifier::new("device_id", "tv")
    );
    assert_eq!(again.dropped[0].reason, "limit:user_id");

    // The profile service is told: a split naming both events with their profiles now.
    let payloads = split_payloads(&b.db).await;
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    let events: HashMap<String, String> = payloads[0]["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e[0].as_str().unwrap_or_default().to_owned(),
                e[1].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(events["bob-09"], bob.profile_id.to_string());
    assert_eq!(events["ann-10"], ann.profile_id.to_string());
    assert_eq!(
        count(
            &b.db,
            "SELECT count(*) FROM graph_log WHERE kind = 'split' AND rule = 'event_time'"
        )
        .await,
        1
    );
    // A replay of the rewritten component gives it back (the graph is its own history).
    let history = id.component_history(bob.profile_id).await.expect("history");
    let again = replay(
        &id.rules().rules,
        &history.entries,
        &Constraints::default(),
        at(0),
        uuid::Uuid::now_v7,
    );
    assert_eq!(
        again.owners[&Identifier::new("device_id", "tv")],
        bob.profile_id
    );
}

/// The skips counted so far of late records whose closure was over the reorder bound (the
/// process-wide Prometheus recorder, installed on first use).
fn skipped_late() -> u64 {
    let text = tessera_server::metrics_handle().render();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(r#"tessera_identity_reorder_skipped_total{late="yes"} "#)
        })
        .map_or(0, |n| n.trim().parse().expect("a counter"))
}

/// Serializes the tests that count skips: the counter is process-wide, and these are the only
/// tests whose closures go over a bound.
static SKIP_COUNTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Ann (10:00) then Bob (11:00) on one TV, then Cat's claim at 09:00 arrives: a closure of
/// three profiles, three events and four identifiers. Over the bound (any of the three), the
/// arrival order stands: the TV stays Ann's, Cat's event drops it, nothing is rewritten or
/// queued, and the skip is counted. At the bound, the same arrival is re-resolved: the TV goes
/// to Cat.
async fn a_closure_over_the_reorder_bound_keeps_the_arrival_order_outcome(b: &Backend) {
    let _serial = SKIP_COUNTER.lock().await;
    let id = &b.identity;
    let ten = 10 * 3_600;
    // The closure of each: three profiles, three events, four identifiers.
    for (tv, bound, replayed) in [
        ("tv-profiles", (2, 100, 100), false),
        ("tv-events", (100, 2, 100), false),
        ("tv-identifiers", (100, 100, 3), false),
        ("tv-within", (3, 3, 4), true),
    ] {
        let config = RulesConfig {
            reorder: ReorderConfig {
                max_profiles: bound.0,
                max_events: bound.1,
                max_identifiers: bound.2,
            },
            ..RulesConfig::default()
        };
        id.update_rules(config, None).await.expect("rules");
        let [ann, bob, cat] = ["ann", "bob", "cat"].map(|who| format!("{tv}-{who}"));
        let ann = one(
            id,
            timed(&ann, ten, &[("user_id", ann.as_str()), ("device_id", tv)]),
        )
        .await;
        one(
            id,
            timed(
                &bob,
                ten + 3_600,
                &[("user_id", bob.as_str()), ("device_id", tv)],
            ),
        )
        .await;
        let skips = skipped_late();
        let splits = split_payloads(&b.db).await.len();
        let cat = one(
            id,
            timed(
                &cat,
                ten - 3_600,
                &[("user_id", cat.as_str()), ("device_id", tv)],
            ),
        )
        .await;
        let owner = lookup(id, "device_id", tv).await;
        if replayed {
            assert_eq!(owner, cat.profile_id, "{tv}: the earlier claim wins");
            assert!(cat.dropped.is_empty(), "{tv}: {cat:?}");
            assert_eq!(skipped_late(), skips, "{tv}: nothing skipped");
            assert_eq!(split_payloads(&b.db).await.len(), splits + 1, "{tv}");
        } else {
            assert_eq!(owner, ann.profile_id, "{tv}: the arrival order stands");
            assert_eq!(cat.dropped.len(), 1, "{tv}: {cat:?}");
            assert_eq!(cat.dropped[0].identifier, Identifier::new("device_id", tv));
            assert_eq!(cat.dropped[0].reason, "shared:device_id");
            assert_eq!(skipped_late(), skips + 1, "{tv}: the skip is counted");
            assert_eq!(
                split_payloads(&b.db).await.len(),
                splits,
                "{tv}: nothing queued"
            );
        }
    }
    assert_eq!(
        count(
            &b.db,
            "SELECT count(*) FROM graph_log WHERE kind = 'split' AND rule = 'event_time'"
        )
        .await,
        1,
        "only the closure within the bound was rewritten"
    );
}

/// The same events in event-time order: the limit drops the TV from Ann's later event, nobody
/// is late, nothing is rewritten or queued.
async fn records_in_event_time_order_rewrite_nothing(b: &Backend) {
    let id = &b.identity;
    let bob = one(
        id,
        timed("bob-09", 0, &[("user_id", "bob"), ("device_id", "tv")]),
    )
    .await;
    let ann = one(
        id,
        timed("ann-10", 3_600, &[("user_id", "ann"), ("device_id", "tv")]),
    )
    .await;
    assert_eq!(ann.dropped[0].reason, "limit:user_id");
    assert_eq!(lookup(id, "device_id", "tv").await, bob.profile_id);
    assert!(split_payloads(&b.db).await.is_empty());
    assert_eq!(
        count(
            &b.db,
            "SELECT count(*) FROM graph_log WHERE rule = 'event_time'"
        )
        .await,
        0
    );
}

/// Random records over a few users, devices, anonymous ids and emails with the default rules,
/// resolved in a random arrival order and random runs: every identifier ends where resolving
/// them in event-time order puts it (the domain replay is the reference).
async fn the_graph_ends_as_event_time_order_whatever_the_arrival(b: &Backend) {
    let strategy = prop::collection::vec(prop::collection::vec((0..4usize, 0..3u8), 1..4), 2..12)
        .prop_flat_map(|raw| {
            let order: Vec<usize> = (0..raw.len()).collect();
            (
                Just(raw),
                Just(order).prop_shuffle(),
                prop::collection::vec(1..4usize, 1..4),
            )
        });
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let handle = tokio::runtime::Handle::current();
    let case = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&strategy, |(raw, order, cuts)| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::task::block_in_place(|| handle.block_on(one_case(b, n, &raw, &order, &cuts)))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

async fn one_case(
    b: &Backend,
    case: usize,
    raw: &[Vec<(usize, u8)>],
    order: &[usize],
    cuts: &[usize],
) -> Result<(), TestCaseError> {
    const TYPES: [&str; 4] = ["user_id", "email", "anonymous_id", "device_id"];
    let rules = b.identity.rules().rules.clone();
    // Values carry the case number: every case starts from a graph that does not know them.
    let records: Vec<Record> = raw
        .iter()
        .enumerate()
        .map(|(n, ids)| {
            let ids: Vec<Identifier> = ids
                .iter()
                .map(|(t, v)| {
                    let value = if TYPES[*t] == "email" {
                        format!("c{case}p{v}@x.io")
                    } else {
                        format!("c{case}v{v}")
                    };
                    Identifier::new(TYPES[*t], value)
                })
                .collect();
            Record::new(
                &rules,
                format!("c{case}e{n}"),
                ids,
                at(i64::try_from(n).unwrap_or(0) * 60),
            )
            .expect("valid")
        })
        .collect();
    let arrival: Vec<Record> = order.iter().map(|n| records[*n].clone()).collect();
    let mut start = 0;
    for cut in cuts.iter().cycle() {
        if start >= arrival.len() {
            break;
        }
        let end = (start + cut).min(arrival.len());
        b.identity
            .resolve(arrival[start..end].to_vec())
            .await
            .map_err(|e| TestCaseError::fail(format!("resolve: {e}")))?;
        start = end;
    }
    let history: Vec<HistoryEntry> = records
        .iter()
        .map(|r| HistoryEntry::Event {
            record: r.clone(),
            created: None,
        })
        .collect();
    let want = replay(
        &rules,
        &history,
        &Constraints::default(),
        at(0),
        uuid::Uuid::now_v7,
    );
    let mut want_groups: HashMap<uuid::Uuid, BTreeSet<Identifier>> = HashMap::new();
    for (identifier, profile) in &want.owners {
        want_groups
            .entry(*profile)
            .or_default()
            .insert(identifier.clone());
    }
    let mut got_groups: HashMap<uuid::Uuid, BTreeSet<Identifier>> = HashMap::new();
    let mut every: Vec<&Identifier> = records.iter().flat_map(|r| r.identifiers()).collect();
    every.sort();
    every.dedup();
    for identifier in every {
        match b.identity.lookup(identifier.clone()).await {
            Ok(profile) => {
                got_groups
                    .entry(profile)
                    .or_default()
                    .insert(identifier.clone());
            }
            Err(IdentityError::NotFound) => {}
            Err(e) => return Err(TestCaseError::fail(format!("lookup: {e}"))),
        }
    }
    let got: BTreeSet<BTreeSet<Identifier>> = got_groups.into_values().collect();
    let want: BTreeSet<BTreeSet<Identifier>> = want_groups.into_values().collect();
    prop_assert_eq!(got, want, "arrival {:?}, runs {:?}", order, cuts);
    Ok(())
}

async fn split_payloads(db: &Database) -> Vec<serde_json::Value> {
    let sql = "SELECT payload FROM merge_outbox WHERE rule = 'split' ORDER BY seq";
    let rows: Vec<String> = match db {
        Database::Postgres(pool) => {
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT payload::text FROM ({sql}) s"
            )))
            .fetch_all(pool)
            .await
        }
        Database::Sqlite(pool) => sqlx::query_scalar(sql).fetch_all(pool).await,
    }
    .expect("outbox");
    rows.iter()
        .map(|p| serde_json::from_str(p).expect("payload json"))
        .collect()
}

async fn count(db: &Database, sql: &str) -> i64 {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match db {
        Database::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        Database::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
    }
    .unwrap_or_else(|e| panic!("count: {e}"))
}
