//! The storage conformance suite: every test runs against SQLite and against Postgres.

use std::sync::Arc;

use serde_json::json;
use tessera_core::Identifier;
use tessera_core::activity::DEFAULT_HALF_LIFE_SECONDS as H;
use tessera_profile::audience::{Audience, Audiences, Condition, Op, Performed, Test};
use tessera_profile::computed::{ComputedTrait, Kind};
use tessera_profile::domain::{
    Batch, EventDetails, Merge, Profile, ProfileState, ResolvedEvent, Score, Split,
};
use tessera_profile::error::ProfileError;
use tessera_profile::store::{
    self, ChangeCursor, MembershipChange, NoScores, ProfileStore, Scorer, TimelineQuery,
};
use tessera_profile::{MIGRATIONS, SCHEMA};
use tessera_store::{Database, DbSettings};
use tessera_testkit::{TestDb, TestSqlite};
use time::OffsetDateTime;
use time::macros::datetime;

use crate::support::{at, event, merge};

const NOW: OffsetDateTime = datetime!(2026-06-01 00:00:00 UTC);

/// A migrated store and what keeps its database alive.
pub(crate) struct Backend {
    pub(crate) store: Arc<dyn ProfileStore>,
    pub(crate) db: Database,
    _pg: Option<TestDb>,
    _lite: Option<TestSqlite>,
}

pub(crate) async fn sqlite() -> Backend {
    let dir = TestSqlite::new();
    let db = Database::connect(&dir.url("profile.db"), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    Backend {
        store: store::open(db.clone()),
        db,
        _pg: None,
        _lite: Some(dir),
    }
}

pub(crate) async fn postgres() -> Backend {
    let test_db = TestDb::new().await;
    let db = Database::connect(test_db.url(), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    Backend {
        store: store::open(db.clone()),
        db,
        _pg: Some(test_db),
        _lite: None,
    }
}

macro_rules! store_suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = super::sqlite().await;
                    super::$test(&*backend.store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = super::postgres().await;
                    super::$test(&*backend.store).await;
                    backend.db.close().await;
                }
            )*
        }
    };
}

store_suite!(
    applied_events_can_be_read,
    an_apply_returns_what_a_read_returns,
    a_retried_batch_changes_nothing,
    an_older_event_never_overwrites_a_newer_trait,
    a_merge_folds_state_and_redirects_reads,
    a_merge_applied_twice_changes_nothing,
    events_of_a_merged_profile_go_to_the_survivor,
    merge_chains_lead_to_the_last_survivor,
    scores_are_written_with_the_state_they_describe,
    a_scoring_failure_applies_nothing,
    a_timeline_lists_every_identity_newest_first_in_pages,
    the_change_stream_logs_every_write_in_order_and_resumes,
);

/// An account computed trait counting `Order Completed` events, over `window_seconds` when given.
fn order_count(name: &str, window_seconds: Option<u64>) -> ComputedTrait {
    ComputedTrait {
        name: name.into(),
        kind: Kind::Count,
        events: vec!["Order Completed".into()],
        types: vec![],
        property: None,
        window_seconds,
    }
}

/// Runs the queued account refreshes until none is left.
async fn drain_account_refreshes(
    store: &dyn ProfileStore,
    now: OffsetDateTime,
    scorer: &dyn Scorer,
) {
    while store
        .refresh_accounts(10, H, now, scorer)
        .await
        .unwrap()
        .is_some()
    {}
}

async fn applied_events_can_be_read(store: &dyn ProfileStore) {
    let batch = Batch {
        merges: vec![],
        events: vec![
            event(
                "e1",
                "p1",
                10,
                "u1",
                json!({"plan": "pro", "email": "a@x.io"}),
            ),
            event("e2", "p1", 5, "u1", json!({"name": "Ann"})),
            event("e3", "p2", 7, "u2", json!({})),
        ],
    };
    let applied = store.apply(&batch, H, NOW, &NoScores).await.unwrap();
    assert_eq!((applied.applied, applied.duplicates), (3, 0));
    assert_eq!(applied.named, ["p1", "p2"]);
    assert_eq!(applied.changed.len(), 2);
    assert!(applied.merged_away.is_empty());

    let p1 = store.get("p1").await.unwrap().expect("p1 stored");
    assert_eq!(
        applied.changed[0], p1,
        "the batch returns what a read returns"
    );
    assert_eq!(p1.state.event_count, 2);
    assert_eq!(p1.state.traits["plan"].value, json!("pro"));
    assert_eq!(p1.state.traits["plan"].event_id, "e1");
    assert_eq!(p1.state.traits["plan"].observed_at, at(10));
    assert_eq!(p1.state.traits["name"].value, json!("Ann"));
    assert_eq!(p1.state.first_seen, Some(at(5)));
    assert_eq!(p1.state.last_seen, Some(at(10)));
    assert!(p1.state.activity_log2.is_some());
    assert_eq!(
        p1.state.identifiers.iter().collect::<Vec<_>>(),
        [&Identifier::new("user_id", "u1")]
    );
    assert_eq!(p1.version, 2);
    assert_eq!(p1.updated_at, NOW);
    assert!(store.get("nobody").await.unwrap().is_none());
}

/// The live profiles an apply returns (what the cache gets) are built in memory, not read
/// back: they must be exactly what a read returns, also where a backend keeps a value its own
/// way (times to the microsecond on Postgres; doubles from 1e16 up, which jsonb printed as
/// integers, are kept as written in `json`), with
/// identifiers moved by a merge, and when an identifier another profile holds is not linked.
async fn an_apply_returns_what_a_read_returns(store: &dyn ProfileStore) {
    let nanos = time::Duration::nanoseconds(123_456_789);
    let now = NOW + nanos;
    let mut first = event("e1", "p1", 1, "u1", json!({"plan": "free"}));
    first.timestamp += nanos;
    let batch = Batch {
        merges: vec![],
        events: vec![first, event("e2", "p2", 2, "u2", json!({}))],
    };
    let applied = store.apply(&batch, H, now, &NoScores).await.unwrap();
    let read = store.get_many(&applied.named).await.unwrap();
    assert_eq!(applied.changed, read);

    // p3 is merged into p1 (its identifier moves along); p3's event names doubles jsonb
    // printed as integers, a small and a large one.
    let mut second = event(
        "e3",
        "p3",
        3,
        "u3",
        json!({"at_ns": 1.7329e18, "debt": -2.5e16, "huge": 1e300, "tiny": 1.5e-7,
               "nested": {"list": [3e17, 0.5]}}),
    );
    second.timestamp += nanos;
    let mut third = event("e4", "p1", 4, "u1", json!({"plan": "pro"}));
    third
        .identifiers
        .push(Identifier::new("anonymous_id", "a4"));
    let batch = Batch {
        merges: vec![merge("p1", "p3")],
        events: vec![second, third],
    };
    let applied = store
        .apply(&batch, H, now + nanos, &CountingScorer::default())
        .await
        .unwrap();
    let read = store.get_many(&applied.named).await.unwrap();
    assert_eq!(applied.changed, read);

    // The identifier p2 holds is not linked to p1.
    let batch = Batch {
        merges: vec![],
        events: vec![event("e5", "p1", 5, "u2", json!({"at_ns": 2.5e18}))],
    };
    let applied = store.apply(&batch, H, now, &NoScores).await.unwrap();
    let read = store.get_many(&applied.named).await.unwrap();
    assert_eq!(applied.changed, read);
    assert_eq!(
        read[0].state.identifiers.iter().collect::<Vec<_>>(),
        [
            &Identifier::new("anonymous_id", "a4"),
            &Identifier::new("user_id", "u1"),
            &Identifier::new("user_id", "u3"),
        ],
        "u2 stays with p2"
    );
}

async fn a_retried_batch_changes_nothing(store: &dyn ProfileStore) {
    let batch = Batch {
        merges: vec![merge("p1", "p2")],
        events: vec![
            event("e1", "p1", 1, "u1", json!({"plan": "free"})),
            event("e2", "p2", 2, "u2", json!({"plan": "pro"})),
            // The same event twice in one batch counts once.
            event("e2", "p2", 2, "u2", json!({"plan": "pro"})),
        ],
    };
    let first = store.apply(&batch, H, NOW, &NoScores).await.unwrap();
    assert_eq!((first.applied, first.duplicates), (2, 1));
    let before = store.get("p1").await.unwrap().unwrap();

    let again = store.apply(&batch, H, NOW, &NoScores).await.unwrap();
    assert_eq!((again.applied, again.duplicates), (0, 3));
    assert!(again.changed.is_empty() && again.merged_away.is_empty());
    assert_eq!(
        again.named,
        ["p1"],
        "retries still name the profiles to rescore"
    );
    let after = store.get("p1").await.unwrap().unwrap();
    assert_eq!(after.state.event_count, 2);
    assert_eq!(after.version, before.version);
    assert_eq!(after, before);
}

async fn an_older_event_never_overwrites_a_newer_trait(store: &dyn ProfileStore) {
    let newer = Batch {
        merges: vec![],
        events: vec![event("e-new", "p1", 30, "u1", json!({"plan": "pro"}))],
    };
    let older = Batch {
        merges: vec![],
        events: vec![event(
            "e-old",
            "p1",
            10,
            "u1",
            json!({"plan": "free", "city": "Oslo"}),
        )],
    };
    store.apply(&newer, H, NOW, &NoScores).await.unwrap();
    store.apply(&older, H, NOW, &NoScores).await.unwrap();
    let p = store.get("p1").await.unwrap().unwrap();
    assert_eq!(p.state.traits["plan"].value, json!("pro"));
    assert_eq!(p.state.traits["plan"].event_id, "e-new");
    assert_eq!(p.state.traits["city"].value, json!("Oslo"));
    assert_eq!(p.state.first_seen, Some(at(10)));
    assert_eq!(p.state.last_seen, Some(at(30)));
    assert_eq!(p.state.event_count, 2);
}

async fn a_merge_folds_state_and_redirects_reads(store: &dyn ProfileStore) {
    let setup = Batch {
        merges: vec![],
        events: vec![
            event("e1", "p1", 10, "u1", json!({"plan": "free", "name": "Ann"})),
            event("e2", "p2", 20, "anon-2", json!({"plan": "pro"})),
            event("e3", "p2", 1, "anon-2", json!({})),
        ],
    };
    store.apply(&setup, H, NOW, &NoScores).await.unwrap();
    let p1 = store.get("p1").await.unwrap().unwrap();
    let p2 = store.get("p2").await.unwrap().unwrap();

    let applied = store
        .apply(
            &Batch {
                merges: vec![merge("p1", "p2")],
                events: vec![],
            },
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    assert_eq!(applied.merged_away, [("p2".to_owned(), p2.version + 1)]);
    assert_eq!(applied.changed.len(), 1);

    let survivor = store.get("p1").await.unwrap().unwrap();
    assert_eq!(survivor.state.event_count, 3);
    assert_eq!(survivor.state.traits["plan"].value, json!("pro"));
    assert_eq!(survivor.state.traits["name"].value, json!("Ann"));
    assert_eq!(survivor.state.first_seen, Some(at(1)));
    assert_eq!(survivor.state.last_seen, Some(at(20)));
    assert_eq!(survivor.state.identifiers.len(), 2);
    assert_eq!(survivor.merged_profile_ids, ["p2"]);
    assert_eq!(survivor.version, p1.version + 1);
    let expected =
        tessera_core::activity::merge(p1.state.activity_log2, p2.state.activity_log2).unwrap();
    assert!((survivor.state.activity_log2.unwrap() - expected).abs() < 1e-9);

    let via_merged = store.get("p2").await.unwrap().unwrap();
    assert_eq!(
        via_merged, survivor,
        "reading the merged id returns the survivor"
    );
}

async fn a_merge_applied_twice_changes_nothing(store: &dyn ProfileStore) {
    store
        .apply(
            &Batch {
                merges: vec![],
                events: vec![
                    event("e1", "p1", 1, "u1", json!({})),
                    event("e2", "p2", 2, "u2", json!({})),
                ],
            },
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    let merges = Batch {
        merges: vec![merge("p1", "p2"), merge("p1", "p2")],
        events: vec![],
    };
    let first = store.apply(&merges, H, NOW, &NoScores).await.unwrap();
    assert_eq!(first.merged_away.len(), 1);
    let before = store.get("p1").await.unwrap().unwrap();
    let again = store.apply(&merges, H, NOW, &NoScores).await.unwrap();
    assert!(again.changed.is_empty() && again.merged_away.is_empty());
    // Merging the other way round is the same union too: nothing changes.
    let reversed = Batch {
        merges: vec![merge("p2", "p1")],
        events: vec![],
    };
    let third = store.apply(&reversed, H, NOW, &NoScores).await.unwrap();
    assert!(third.changed.is_empty() && third.merged_away.is_empty());
    let after = store.get("p1").await.unwrap().unwrap();
    assert_eq!(after, before);
    assert_eq!(after.state.event_count, 2);
    assert_eq!(after.merged_profile_ids, ["p2"]);
}

async fn events_of_a_merged_profile_go_to_the_survivor(store: &dyn ProfileStore) {
    // Unknown ids in a merge are created empty.
    let applied = store
        .apply(
            &Batch {
                merges: vec![merge("s", "m")],
                events: vec![],
            },
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    assert_eq!(applied.named, ["s"]);
    // An event resolved to the merged profile before the merge lands on the survivor.
    let late = Batch {
        merges: vec![],
        events: vec![event("e1", "m", 3, "u-m", json!({"plan": "pro"}))],
    };
    let applied = store.apply(&late, H, NOW, &NoScores).await.unwrap();
    assert_eq!(applied.named, ["s"]);
    let s = store.get("s").await.unwrap().unwrap();
    assert_eq!(s.state.event_count, 1);
    assert_eq!(s.state.traits["plan"].value, json!("pro"));
    assert!(
        s.state
            .identifiers
            .contains(&Identifier::new("user_id", "u-m"))
    );
    assert_eq!(store.get("m").await.unwrap().unwrap().profile_id, "s");
}

async fn merge_chains_lead_to_the_last_survivor(store: &dyn ProfileStore) {
    let batch = Batch {
        merges: vec![],
        events: vec![
            event("e1", "a", 1, "ua", json!({})),
            event("e2", "b", 2, "ub", json!({})),
            event("e3", "c", 3, "uc", json!({})),
            event("e4", "d", 4, "ud", json!({})),
        ],
    };
    store.apply(&batch, H, NOW, &NoScores).await.unwrap();
    // b into a, then a into c in one batch; then c into d in another.
    let merges = Batch {
        merges: vec![merge("a", "b"), merge("c", "a")],
        events: vec![event("e5", "b", 5, "ub", json!({}))],
    };
    let applied = store.apply(&merges, H, NOW, &NoScores).await.unwrap();
    assert_eq!(applied.named, ["c"]);
    store
        .apply(
            &Batch {
                merges: vec![merge("d", "c")],
                events: vec![],
            },
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    let d = store.get("d").await.unwrap().unwrap();
    assert_eq!(d.state.event_count, 5);
    assert_eq!(d.state.identifiers.len(), 4);
    assert_eq!(d.merged_profile_ids, ["c", "a", "b"]);
    for id in ["a", "b", "c"] {
        assert_eq!(
            store.get(id).await.unwrap().unwrap(),
            d,
            "{id} resolves to d"
        );
    }
    // Many at once (a grouped read of cache misses): by the id asked for, the unknown absent.
    let ids = ["a", "b", "d", "nobody"].map(str::to_owned);
    let resolved = store.get_resolved(&ids).await.unwrap();
    assert_eq!(resolved.len(), 3, "{:?}", resolved.keys());
    for id in ["a", "b", "d"] {
        assert_eq!(resolved[id], d, "{id} resolves to d");
    }
    let live = store
        .get_many(&["a".to_owned(), "d".to_owned()])
        .await
        .unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].profile_id, "d");
}

/// Scores each profile with its event count, and records what it was asked.
#[derive(Debug, Default)]
struct CountingScorer {
    asked: std::sync::Mutex<Vec<Vec<String>>>,
    fail: bool,
}

#[async_trait::async_trait]
impl Scorer for CountingScorer {
    async fn score(
        &self,
        profiles: &[&Profile],
        _accounts: &store::Accounts,
        now: OffsetDateTime,
    ) -> Result<Vec<Vec<Score>>, ProfileError> {
        self.asked
            .lock()
            .unwrap()
            .push(profiles.iter().map(|p| p.profile_id.clone()).collect());
        if self.fail {
            return Err(ProfileError::BadScores("scoring is down".to_owned()));
        }
        Ok(profiles
            .iter()
            .map(|p| {
                vec![Score {
                    name: "events".to_owned(),
                    #[allow(clippy::cast_precision_loss)]
                    value: p.state.event_count as f64,
                    computed_at: now,
                    model_version: "test".to_owned(),
                    factors: vec![],
                }]
            })
            .collect())
    }
}

async fn scores_are_written_with_the_state_they_describe(store: &dyn ProfileStore) {
    let scorer = CountingScorer::default();
    let setup = Batch {
        merges: vec![],
        events: vec![
            event("e1", "p1", 1, "u1", json!({})),
            event("e2", "p1", 2, "u1", json!({})),
            event("e3", "p2", 3, "u2", json!({})),
        ],
    };
    let applied = store.apply(&setup, H, NOW, &scorer).await.unwrap();
    // The scorer saw the profiles after their events, once per batch, in id order.
    assert_eq!(*scorer.asked.lock().unwrap(), [["p1", "p2"]]);
    let p1 = store.get("p1").await.unwrap().unwrap();
    assert_eq!(p1.scores["events"].value, 2.0);
    assert_eq!(
        store.get("p2").await.unwrap().unwrap().scores["events"].value,
        1.0
    );
    assert_eq!(
        applied.changed.iter().find(|p| p.profile_id == "p1"),
        Some(&p1)
    );

    // A merge rescored the survivor with the merged state.
    let merges = Batch {
        merges: vec![merge("p1", "p2")],
        events: vec![],
    };
    store.apply(&merges, H, NOW, &scorer).await.unwrap();
    let survivor = store.get("p2").await.unwrap().unwrap();
    assert_eq!(survivor.profile_id, "p1");
    assert_eq!(survivor.scores["events"].value, 3.0);
    assert_eq!(scorer.asked.lock().unwrap()[1], ["p1"]);
}

async fn a_scoring_failure_applies_nothing(store: &dyn ProfileStore) {
    let failing = CountingScorer {
        fail: true,
        ..CountingScorer::default()
    };
    let batch = Batch {
        merges: vec![],
        events: vec![event("e1", "p1", 1, "u1", json!({"plan": "pro"}))],
    };
    let err = store.apply(&batch, H, NOW, &failing).await.unwrap_err();
    assert!(matches!(err, ProfileError::BadScores(_)), "{err:?}");
    assert_eq!(
        store
            .get("p1")
            .await
            .unwrap()
            .map(|p| p.state.event_count)
            .unwrap_or(0),
        0,
        "nothing of the failed batch was kept"
    );
    // The retry applies the event once and scores it.
    let scorer = CountingScorer::default();
    let applied = store.apply(&batch, H, NOW, &scorer).await.unwrap();
    assert_eq!(applied.applied, 1);
    let p1 = store.get("p1").await.unwrap().unwrap();
    assert_eq!(p1.state.event_count, 1);
    assert_eq!(p1.scores["events"].value, 1.0);
    // Retried again (all duplicates), the profile is still rescored.
    let again = store.apply(&batch, H, NOW, &scorer).await.unwrap();
    assert_eq!(again.applied, 0);
    assert_eq!(scorer.asked.lock().unwrap().len(), 2);
}

/// Two replicas (two pools) applying interleaved batches to the same profiles concurrently:
/// row locks serialize them and every event counts once.
#[tokio::test]
async fn postgres_replicas_apply_concurrently_without_losing_events() {
    let backend = postgres().await;
    let url = match &backend._pg {
        Some(db) => db.url().to_owned(),
        None => unreachable!(),
    };
    let other = Database::connect(&url, SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    let replicas = [backend.store.clone(), store::open(other)];
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = replicas[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            // Profiles named in both orders, a merge in the middle, and each event sent twice.
            let (x, y) = if i % 2 == 0 {
                ("p1", "p2")
            } else {
                ("p2", "p1")
            };
            let mut batch = Batch {
                merges: vec![],
                events: vec![
                    event(&format!("e{i}-a"), x, i as i64, "u1", json!({"n": i})),
                    event(&format!("e{i}-b"), y, i as i64, "u2", json!({})),
                ],
            };
            if i == 20 {
                batch.merges.push(merge("p1", "p2"));
            }
            store.apply(&batch, H, NOW, &NoScores).await.unwrap();
            store.apply(&batch, H, NOW, &NoScores).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let p = backend.store.get("p2").await.unwrap().unwrap();
    assert_eq!(p.profile_id, "p1");
    assert_eq!(p.state.event_count, 80);
    assert_eq!(p.state.traits["n"].value, json!(39));
    assert_eq!(p.merged_profile_ids, ["p2"]);
}

/// The events of the unmerge scenario: Ann (p1) and Bob (p2), each with their own user id.
/// `e4` is Bob's, but after the wrong merge it was resolved to the survivor p1.
fn unmerge_events(bob_late: &str) -> Vec<ResolvedEvent> {
    vec![
        event("e1", "p1", 1, "ann", json!({"name": "Ann", "plan": "pro"})),
        event("e2", "p1", 5, "ann", json!({"city": "Oslo"})),
        event("e3", "p2", 2, "bob", json!({"name": "Bob", "plan": "free"})),
        event("e4", bob_late, 6, "bob", json!({"plan": "team"})),
        event("e5", "p1", 7, "ann", json!({"score": 3})),
        event("e6", "p3", 3, "cat", json!({"name": "Cat"})),
    ]
}

async fn apply(store: &dyn ProfileStore, merges: Vec<Merge>, events: Vec<ResolvedEvent>) {
    store
        .apply(&Batch { merges, events }, H, NOW, &NoScores)
        .await
        .unwrap();
}

/// What the profile shows, without bookkeeping (versions, times of writing). The decayed
/// activity is a floating-point log-add: folding the same events in another order can differ
/// in the last bits, so it is rounded to 9 significant digits.
fn shown(p: &Profile) -> (Option<String>, ProfileState, Vec<String>) {
    let mut merged = p.merged_profile_ids.clone();
    merged.sort();
    let mut state = p.state.clone();
    state.activity_log2 = state.activity_log2.map(|a| {
        #[allow(clippy::cast_possible_truncation)]
        let digits = 9 - a.abs().log10().ceil() as i32;
        let scale = 10f64.powi(digits);
        (a * scale).round() / scale
    });
    (p.merged_into.clone(), state, merged)
}

/// A merge followed by its unmerge leaves every profile as if the merge had never happened:
/// p2 (with p3 merged into it before) is wrongly merged into p1, more events arrive (Bob's
/// `e4` lands on p1), then the merge is split. Compared with a store that never merged p2
/// into p1.
async fn a_split_undoes_a_merge(merged: &dyn ProfileStore, reference: &dyn ProfileStore) {
    let events = unmerge_events("p1");
    let [e1, e2, e3, e4, e5, e6] = <[ResolvedEvent; 6]>::try_from(events).unwrap();
    apply(merged, vec![], vec![e1.clone(), e3.clone(), e6.clone()]).await;
    apply(merged, vec![merge("p2", "p3")], vec![]).await;
    // The wrong merge, then Bob's e4 resolved to the survivor, and Ann's e2, e5.
    apply(
        merged,
        vec![merge("p1", "p2")],
        vec![e4.clone(), e2.clone(), e5.clone()],
    )
    .await;
    let before = merged.get("p2").await.unwrap().unwrap();
    assert_eq!(before.profile_id, "p1");
    assert_eq!(before.state.event_count, 6);

    let scorer = CountingScorer::default();
    let split = Split {
        profiles: vec![
            ("p1".into(), "p1".into()),
            ("p2".into(), "p2".into()),
            ("p3".into(), "p2".into()),
        ],
        events: vec![(
            "e4".into(),
            "p2".into(),
            vec![Identifier::new("user_id", "bob")],
        )],
        erased: vec![],
    };
    let applied = merged.split(&split, H, NOW, &scorer).await.unwrap();
    assert_eq!(applied.named, ["p1", "p2"]);
    assert_eq!(
        applied
            .merged_away
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>(),
        ["p3"]
    );
    assert_eq!(
        *scorer.asked.lock().unwrap(),
        [["p1", "p2"]],
        "both sides rescored"
    );

    // The reference never merged p1 and p2.
    let e4_bob = ResolvedEvent {
        profile_id: "p2".into(),
        ..e4
    };
    apply(reference, vec![], vec![e1, e3, e6]).await;
    apply(reference, vec![merge("p2", "p3")], vec![]).await;
    apply(reference, vec![], vec![e4_bob, e2, e5]).await;

    for id in ["p1", "p2", "p3"] {
        let got = merged.get(id).await.unwrap().unwrap();
        let want = reference.get(id).await.unwrap().unwrap();
        assert_eq!(
            got.profile_id, want.profile_id,
            "{id} resolves as if never merged"
        );
        assert_eq!(shown(&got), shown(&want), "{id}");
    }
    let ann = merged.get("p1").await.unwrap().unwrap();
    assert_eq!(ann.state.event_count, 3);
    assert_eq!(ann.state.traits["plan"].value, json!("pro"));
    assert_eq!(ann.scores["events"].value, 3.0);
    let bob = merged.get("p3").await.unwrap().unwrap();
    assert_eq!(bob.profile_id, "p2");
    assert_eq!(bob.state.event_count, 3);
    assert_eq!(bob.state.traits["plan"].value, json!("team"));
    assert!(
        bob.version > before.version,
        "newer than the merged profile, for the cache"
    );

    // Splitting again changes no state; new events go where they belong.
    merged.split(&split, H, NOW, &scorer).await.unwrap();
    assert_eq!(
        shown(&merged.get("p1").await.unwrap().unwrap()),
        shown(&ann)
    );
    apply(merged, vec![], vec![event("e7", "p2", 9, "bob", json!({}))]).await;
    assert_eq!(
        merged.get("p2").await.unwrap().unwrap().state.event_count,
        4
    );
    assert_eq!(
        merged.get("p1").await.unwrap().unwrap().state.event_count,
        3
    );
}

#[tokio::test]
async fn a_split_undoes_a_merge_on_sqlite() {
    let (merged, reference) = (sqlite().await, sqlite().await);
    a_split_undoes_a_merge(&*merged.store, &*reference.store).await;
}

#[tokio::test]
async fn a_split_undoes_a_merge_on_postgres() {
    let (merged, reference) = (postgres().await, postgres().await);
    a_split_undoes_a_merge(&*merged.store, &*reference.store).await;
    merged.db.close().await;
    reference.db.close().await;
}

/// An identifier erased with the events it alone carried: the split deletes those events and
/// rebuilds the profile as if they had never arrived; an erased event never applied is not
/// waited for.
async fn a_split_erases_events(erased: &dyn ProfileStore, reference: &dyn ProfileStore) {
    let events = unmerge_events("p1");
    apply(erased, vec![], events[..3].to_vec()).await;
    apply(erased, vec![merge("p1", "p2")], vec![]).await;
    assert_eq!(
        erased.get("p1").await.unwrap().unwrap().state.event_count,
        3
    );
    let split = Split {
        profiles: vec![("p1".into(), "p1".into()), ("p2".into(), "p1".into())],
        events: vec![],
        erased: vec!["e2".into(), "never-applied".into()],
    };
    erased.split(&split, H, NOW, &NoScores).await.unwrap();
    apply(
        reference,
        vec![],
        vec![events[0].clone(), events[2].clone()],
    )
    .await;
    apply(reference, vec![merge("p1", "p2")], vec![]).await;
    let got = erased.get("p1").await.unwrap().unwrap();
    assert_eq!(got.state.event_count, 2);
    assert!(
        !got.state.traits.contains_key("city"),
        "the erased event's trait is gone"
    );
    assert_eq!(
        shown(&got),
        shown(&reference.get("p1").await.unwrap().unwrap()),
        "as if the erased event had never arrived"
    );
    // A second split finds nothing more to erase.
    erased.split(&split, H, NOW, &NoScores).await.unwrap();
    assert_eq!(
        erased.get("p1").await.unwrap().unwrap().state.event_count,
        2
    );
}

#[tokio::test]
async fn a_split_erases_events_on_sqlite() {
    let (erased, reference) = (sqlite().await, sqlite().await);
    a_split_erases_events(&*erased.store, &*reference.store).await;
}

#[tokio::test]
async fn a_split_erases_events_on_postgres() {
    let (erased, reference) = (postgres().await, postgres().await);
    a_split_erases_events(&*erased.store, &*reference.store).await;
    erased.db.close().await;
    reference.db.close().await;
}

/// Events applied before their contents were kept cannot be rebuilt: the split is refused and
/// changes nothing.
#[tokio::test]
async fn a_split_without_event_contents_is_refused() {
    let backend = postgres().await;
    let store = &*backend.store;
    apply(store, vec![], unmerge_events("p1")[..3].to_vec()).await;
    apply(store, vec![merge("p1", "p2")], vec![]).await;
    let Database::Postgres(pool) = &backend.db else {
        unreachable!("a Postgres backend")
    };
    sqlx::query("UPDATE applied_events SET content = NULL WHERE event_id = 'e3'")
        .execute(pool)
        .await
        .unwrap();
    let split = Split {
        profiles: vec![("p1".into(), "p1".into()), ("p2".into(), "p2".into())],
        events: vec![],
        erased: vec![],
    };
    let err = store.split(&split, H, NOW, &NoScores).await.unwrap_err();
    assert!(
        matches!(&err, ProfileError::NotRebuildable(id) if id == "p2"),
        "{err:?}"
    );
    assert_eq!(err.code(), tessera_core::ErrorCode::FailedPrecondition);
    assert_eq!(store.get("p2").await.unwrap().unwrap().profile_id, "p1");
    backend.db.close().await;
}

/// A tracked event of `profile` at `minute` named `name`, with `properties`.
fn tracked(
    id: &str,
    profile: &str,
    minute: i64,
    name: &str,
    properties: serde_json::Value,
) -> ResolvedEvent {
    ResolvedEvent {
        details: EventDetails {
            message_id: format!("m-{id}"),
            kind: "track".into(),
            event: name.into(),
            properties: properties.as_object().cloned().unwrap_or_default(),
            ..EventDetails::default()
        },
        ..event(id, profile, minute, "ann", json!({}))
    }
}

/// The timeline holds the events of a profile and of every profile merged into it, newest
/// first, with what each event was; filters by type, name and time; pages without gaps or
/// repeats, also when events share a time.
async fn a_timeline_lists_every_identity_newest_first_in_pages(store: &dyn ProfileStore) {
    apply(
        store,
        vec![],
        vec![
            event("e1", "p1", 1, "ann", json!({"plan": "pro"})),
            tracked("e2", "p1", 5, "Viewed", json!({"sku": "a"})),
            tracked("e3", "p2", 3, "Order Completed", json!({"total": 30})),
            tracked("e4", "p2", 5, "Viewed", json!({"sku": "b"})),
            tracked("e5", "p3", 9, "Viewed", json!({})),
        ],
    )
    .await;
    apply(store, vec![merge("p1", "p2")], vec![]).await;
    let ids = vec!["p1".to_owned(), "p2".to_owned()];
    let all = |limit| TimelineQuery {
        limit,
        ..TimelineQuery::default()
    };
    let listed = store.timeline(&ids, &all(10)).await.unwrap();
    let order: Vec<(&str, &str)> = listed
        .iter()
        .map(|e| (e.event_id.as_str(), e.profile_id.as_str()))
        .collect();
    assert_eq!(
        order,
        [("e4", "p2"), ("e2", "p1"), ("e3", "p2"), ("e1", "p1")],
        "newest first, ties by event id descending, p3 not included"
    );
    assert_eq!(listed[2].occurred_at, at(3));
    assert_eq!(listed[2].content.details.event, "Order Completed");
    assert_eq!(listed[2].content.details.properties["total"], json!(30));
    assert_eq!(listed[3].content.traits["plan"], json!("pro"));
    assert_eq!(listed[3].content.details.kind, "identify");

    // Pages of one: every event once, in order.
    let mut paged = Vec::new();
    let mut query = all(1);
    loop {
        let page = store.timeline(&ids, &query).await.unwrap();
        let Some(last) = page.last() else { break };
        query.before = Some((last.occurred_at, last.event_id.clone()));
        paged.push(last.event_id.clone());
    }
    assert_eq!(paged, ["e4", "e2", "e3", "e1"]);

    let names = |query: TimelineQuery| async move {
        store
            .timeline(&ids_of(), &query)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(TimelineQuery {
            types: vec!["track".into()],
            ..all(10)
        })
        .await,
        ["e4", "e2", "e3"]
    );
    assert_eq!(
        names(TimelineQuery {
            names: vec!["Order Completed".into()],
            ..all(10)
        })
        .await,
        ["e3"]
    );
    assert_eq!(
        names(TimelineQuery {
            start: Some(at(3)),
            end: Some(at(5)),
            ..all(10)
        })
        .await,
        ["e3"],
        "start inclusive, end exclusive"
    );
}

fn ids_of() -> Vec<String> {
    vec!["p1".to_owned(), "p2".to_owned()]
}

/// The store of `backend`'s database keeping `computed` traits.
fn with_computed(backend: &Backend, computed: Vec<ComputedTrait>) -> Arc<dyn ProfileStore> {
    store::open_with(
        backend.db.clone(),
        store::Definitions::new(computed, Audiences::default()),
    )
}

fn order_traits() -> Vec<ComputedTrait> {
    let def = |name: &str, kind: Kind, property: Option<&str>| ComputedTrait {
        name: name.into(),
        kind,
        events: vec!["Order Completed".into()],
        types: vec![],
        property: property.map(str::to_owned),
        window_seconds: None,
    };
    vec![
        def("orders", Kind::Count, None),
        def("spent", Kind::Sum, Some("total")),
        def("last_total", Kind::Last, Some("total")),
        ComputedTrait {
            window_seconds: Some(3_600),
            ..def("orders_1h", Kind::Count, None)
        },
    ]
}

/// Computed traits are kept on every event, combine on merge and come apart on unmerge: the
/// split profiles' values equal those of a store that never merged them.
async fn computed_traits_follow_merges_and_unmerges(merged: &Backend, reference: &Backend) {
    let (merged, reference) = (
        with_computed(merged, order_traits()),
        with_computed(reference, order_traits()),
    );
    // Events of the last few minutes before NOW, the time the store applies them at.
    let recent = |mut e: ResolvedEvent, minute: i64| {
        e.timestamp = NOW - time::Duration::minutes(10 - minute);
        e
    };
    let order = |id: &str, profile: &str, minute: i64, total: i64| {
        recent(
            tracked(id, profile, 0, "Order Completed", json!({ "total": total })),
            minute,
        )
    };
    let events = vec![
        order("e1", "p1", 1, 10),
        order("e2", "p2", 2, 20),
        order("e3", "p1", 3, 30),
        recent(tracked("e4", "p2", 0, "Viewed", json!({"total": 99})), 4),
    ];
    apply(&*merged, vec![], events.clone()).await;
    apply(&*reference, vec![], events).await;
    let values = |p: &Profile| p.state.computed.values(&order_traits(), NOW);
    let p1 = merged.get("p1").await.unwrap().unwrap();
    assert_eq!(values(&p1)["orders"].value, json!(2));
    assert_eq!(values(&p1)["spent"].value, json!(40.0));
    assert_eq!(values(&p1)["last_total"].value, json!(30));
    assert_eq!(values(&p1)["orders_1h"].value, json!(2));

    apply(&*merged, vec![merge("p1", "p2")], vec![]).await;
    let both = merged.get("p2").await.unwrap().unwrap();
    assert_eq!(both.profile_id, "p1");
    assert_eq!(values(&both)["orders"].value, json!(3));
    assert_eq!(values(&both)["spent"].value, json!(60.0));
    assert_eq!(values(&both)["last_total"].value, json!(30));
    assert_eq!(values(&both)["orders_1h"].value, json!(3));
    assert_eq!(
        both.state
            .computed
            .values(&order_traits(), NOW + time::Duration::minutes(52))["orders_1h"]
            .value,
        json!(1),
        "e1 and e2 left the hour 52 minutes later"
    );

    let split = Split {
        profiles: vec![("p1".into(), "p1".into()), ("p2".into(), "p2".into())],
        events: vec![],
        erased: vec![],
    };
    merged.split(&split, H, NOW, &NoScores).await.unwrap();
    for id in ["p1", "p2"] {
        let got = merged.get(id).await.unwrap().unwrap();
        let want = reference.get(id).await.unwrap().unwrap();
        assert_eq!(values(&got), values(&want), "{id} as if never merged");
    }
    let p2 = merged.get("p2").await.unwrap().unwrap();
    assert_eq!(values(&p2)["orders"].value, json!(1));
}

#[tokio::test]
async fn computed_traits_follow_merges_and_unmerges_on_sqlite() {
    let (merged, reference) = (sqlite().await, sqlite().await);
    computed_traits_follow_merges_and_unmerges(&merged, &reference).await;
}

#[tokio::test]
async fn computed_traits_follow_merges_and_unmerges_on_postgres() {
    let (merged, reference) = (postgres().await, postgres().await);
    computed_traits_follow_merges_and_unmerges(&merged, &reference).await;
    merged.db.close().await;
    reference.db.close().await;
}

fn audiences() -> Audiences {
    Audiences::compile(vec![
        Audience {
            name: "pros".into(),
            condition: Condition::Trait(Test {
                name: "plan".into(),
                op: Op::Eq,
                value: json!("pro"),
            }),
        },
        Audience {
            name: "buyers_1h".into(),
            condition: Condition::Performed(Performed {
                event: "Order Completed".into(),
                at_least: 1,
                at_most: None,
                within_seconds: Some(3_600),
            }),
        },
    ])
    .unwrap()
}

/// Stored memberships follow events, merges, unmerges and time: a merged-away profile leaves
/// its audiences, an unmerge gives each side back its own, and a sweep after an event left its
/// window takes the profile out without a new event.
async fn audience_memberships_follow_events_merges_unmerges_and_time(backend: &Backend) {
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(vec![], audiences()),
    );
    let members = |audience: &'static str| {
        let store = store.clone();
        async move { store.audience_members(audience, None, 10).await.unwrap().0 }
    };
    let mut pro = event("e1", "p1", 0, "ann", json!({"plan": "pro"}));
    pro.timestamp = NOW - time::Duration::minutes(10);
    let mut bought = tracked("e2", "p2", 0, "Order Completed", json!({}));
    bought.timestamp = NOW - time::Duration::minutes(59);
    let applied = store
        .apply(
            &Batch {
                merges: vec![],
                events: vec![pro, bought],
            },
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    assert_eq!(applied.audiences.len(), 2, "{:?}", applied.audiences);
    assert_eq!(members("pros").await, ["p1"]);
    assert_eq!(members("buyers_1h").await, ["p2"]);

    let merged = store
        .apply(
            &Batch {
                merges: vec![merge("p1", "p2")],
                events: vec![],
            },
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    assert_eq!(
        members("buyers_1h").await,
        ["p1"],
        "the survivor holds both"
    );
    assert_eq!(members("pros").await, ["p1"]);
    assert!(
        merged
            .audiences
            .iter()
            .any(|c| c.profile_id == "p2" && !c.entered),
        "the merged-away profile exits: {:?}",
        merged.audiences
    );

    let split = Split {
        profiles: vec![("p1".into(), "p1".into()), ("p2".into(), "p2".into())],
        events: vec![],
        erased: vec![],
    };
    store.split(&split, H, NOW, &NoScores).await.unwrap();
    assert_eq!(members("pros").await, ["p1"]);
    assert_eq!(
        members("buyers_1h").await,
        ["p2"],
        "each side gets its own back"
    );

    // e2 leaves the hour one minute after NOW: nothing is due before, p2 exits after.
    let (swept, _) = store.sweep(NOW, 10).await.unwrap();
    assert!(swept.is_empty());
    let (swept, changes) = store
        .sweep(NOW + time::Duration::minutes(2), 10)
        .await
        .unwrap();
    assert_eq!(swept.len(), 1);
    assert_eq!(swept[0].profile_id, "p2");
    assert_eq!(swept[0].valid_until, None, "nothing more will change");
    assert_eq!(
        changes,
        [MembershipChange {
            audience: "buyers_1h".into(),
            profile_id: "p2".into(),
            entered: false
        }]
    );
    assert!(members("buyers_1h").await.is_empty());
    assert_eq!(
        store
            .audience_members("buyers_1h", None, 10)
            .await
            .unwrap()
            .1,
        0
    );
    let (again, _) = store
        .sweep(NOW + time::Duration::minutes(3), 10)
        .await
        .unwrap();
    assert!(again.is_empty(), "a swept profile is not due again");
}

#[tokio::test]
async fn audience_memberships_follow_events_merges_unmerges_and_time_on_sqlite() {
    audience_memberships_follow_events_merges_unmerges_and_time(&sqlite().await).await;
}

#[tokio::test]
async fn audience_memberships_follow_events_merges_unmerges_and_time_on_postgres() {
    let backend = postgres().await;
    audience_memberships_follow_events_merges_unmerges_and_time(&backend).await;
    backend.db.close().await;
}

/// Every write logs its changes (updated, merged, split, score changes), readable in order
/// after any cursor; the horizon is the last change.
async fn the_change_stream_logs_every_write_in_order_and_resumes(store: &dyn ProfileStore) {
    assert_eq!(
        store.change_horizon().await.unwrap(),
        ChangeCursor::default()
    );
    let scorer = CountingScorer::default();
    store
        .apply(
            &Batch {
                merges: vec![],
                events: vec![
                    event("e1", "p1", 1, "ann", json!({})),
                    event("e2", "p2", 2, "bob", json!({})),
                ],
            },
            H,
            NOW,
            &scorer,
        )
        .await
        .unwrap();
    apply(store, vec![merge("p1", "p2")], vec![]).await;
    let split = Split {
        profiles: vec![("p1".into(), "p1".into()), ("p2".into(), "p2".into())],
        events: vec![],
        erased: vec![],
    };
    store.split(&split, H, NOW, &NoScores).await.unwrap();
    let all = settled_changes(store, 10).await;
    let seen: Vec<(&str, &str)> = all
        .iter()
        .map(|c| (c.kind.as_str(), c.profile_id.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("updated", "p1"),
            ("updated", "p2"),
            ("score_changed", "p1"),
            ("score_changed", "p2"),
            ("updated", "p1"),
            ("merged", "p2"),
            ("updated", "p1"),
            ("split", "p1"),
            ("updated", "p2"),
            ("split", "p2"),
        ]
    );
    assert_eq!(all[5].detail["into"], json!("p1"));
    assert_eq!(all[2].detail["score"], json!("events"));
    assert!(
        all.windows(2).all(|w| w[0].cursor < w[1].cursor),
        "in order"
    );
    // Resuming after any change gives exactly the rest.
    let rest = store.changes_after(all[3].cursor, 100).await.unwrap();
    assert_eq!(rest, all[4..]);
    let page = store.changes_after(all[3].cursor, 2).await.unwrap();
    assert_eq!(page, all[4..6]);
    assert_eq!(store.change_horizon().await.unwrap(), all[9].cursor);
    assert_eq!(
        store.prune_changes(NOW).await.unwrap(),
        0,
        "nothing before NOW"
    );
    assert_eq!(
        store
            .prune_changes(time::OffsetDateTime::now_utc() + time::Duration::hours(1))
            .await
            .unwrap(),
        10
    );
    assert!(
        store
            .changes_after(ChangeCursor::default(), 100)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A change written by a transaction that is still open is never passed over: a reader sees
/// nothing after it until it commits, then both in order, though the later transaction took
/// the later row first.
#[tokio::test]
async fn a_late_commit_is_never_skipped_by_the_change_stream() {
    let backend = postgres().await;
    let Database::Postgres(pool) = &backend.db else {
        unreachable!("a Postgres backend")
    };
    let insert = "INSERT INTO profile_changes (profile_id, kind, at) VALUES ($1, 'updated', now())";
    let mut first = pool.begin().await.unwrap();
    sqlx::query(insert)
        .bind("early")
        .execute(&mut *first)
        .await
        .unwrap();
    let mut second = pool.begin().await.unwrap();
    sqlx::query(insert)
        .bind("late")
        .execute(&mut *second)
        .await
        .unwrap();
    second.commit().await.unwrap();
    let read = backend
        .store
        .changes_after(ChangeCursor::default(), 10)
        .await
        .unwrap();
    assert!(
        read.is_empty(),
        "the open transaction holds back what follows: {read:?}"
    );
    first.commit().await.unwrap();
    let read = settled_changes(&*backend.store, 2).await;
    let order: Vec<&str> = read.iter().map(|c| c.profile_id.as_str()).collect();
    assert_eq!(order, ["early", "late"]);
    backend.db.close().await;
}

/// Every change from the beginning, once `count` are readable: on Postgres a change becomes
/// readable when every transaction older than its own has ended, and other tests' transactions
/// on the same server can hold that back for a moment.
async fn settled_changes(
    store: &dyn ProfileStore,
    count: usize,
) -> Vec<tessera_profile::store::ProfileChange> {
    changes_until(store, |read| read.len() >= count).await
}

fn catalog() -> tessera_profile::catalog::TraitCatalog {
    use tessera_profile::catalog::{Strategy, TraitRule};
    let rule = |strategy| TraitRule {
        strategy,
        class: None,
        pii: None,
    };
    [
        ("visits", rule(Strategy::Sum)),
        ("signup_source", rule(Strategy::First)),
        ("interests", rule(Strategy::AppendUnique)),
        ("nickname", rule(Strategy::NonEmpty)),
    ]
    .into_iter()
    .map(|(name, r)| (name.to_owned(), r))
    .collect()
}

/// Trait strategies hold across merges and unmerges: a merged profile combines both sides by
/// each trait's strategy, and an unmerge gives each side the values of its own events.
async fn trait_strategies_follow_merges_and_unmerges(merged: &Backend, reference: &Backend) {
    let open = |b: &Backend| {
        store::open_with(
            b.db.clone(),
            store::Definitions::new(vec![], Audiences::default()).with_catalog(catalog()),
        )
    };
    let (merged, reference) = (open(merged), open(reference));
    let events = vec![
        event(
            "e1",
            "p1",
            1,
            "ann",
            json!({"visits": 2, "signup_source": "ads", "interests": ["golf"], "nickname": "A"}),
        ),
        event(
            "e2",
            "p1",
            5,
            "ann",
            json!({"visits": 3, "signup_source": "web", "interests": "chess", "nickname": ""}),
        ),
        event(
            "e3",
            "p2",
            3,
            "bob",
            json!({"visits": 10, "signup_source": "partner", "interests": ["golf", "jazz"], "nickname": "B"}),
        ),
    ];
    apply(&*merged, vec![], events.clone()).await;
    apply(&*reference, vec![], events).await;
    let traits = |p: &Profile| {
        p.state
            .traits
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let p1 = merged.get("p1").await.unwrap().unwrap();
    assert_eq!(traits(&p1)["visits"], json!(5.0));
    assert_eq!(traits(&p1)["signup_source"], json!("ads"));
    assert_eq!(traits(&p1)["interests"], json!(["chess", "golf"]));
    assert_eq!(
        traits(&p1)["nickname"],
        json!("A"),
        "an empty value never wins"
    );

    apply(&*merged, vec![merge("p1", "p2")], vec![]).await;
    let both = merged.get("p1").await.unwrap().unwrap();
    assert_eq!(traits(&both)["visits"], json!(15.0));
    assert_eq!(
        traits(&both)["signup_source"],
        json!("ads"),
        "the earliest, e1"
    );
    assert_eq!(traits(&both)["interests"], json!(["chess", "golf", "jazz"]));
    assert_eq!(
        traits(&both)["nickname"],
        json!("B"),
        "the latest non-empty, e3"
    );

    let split = Split {
        profiles: vec![("p1".into(), "p1".into()), ("p2".into(), "p2".into())],
        events: vec![],
        erased: vec![],
    };
    merged.split(&split, H, NOW, &NoScores).await.unwrap();
    for id in ["p1", "p2"] {
        let got = merged.get(id).await.unwrap().unwrap();
        let want = reference.get(id).await.unwrap().unwrap();
        assert_eq!(
            got.state.traits, want.state.traits,
            "{id} as if never merged"
        );
    }
}

#[tokio::test]
async fn trait_strategies_follow_merges_and_unmerges_on_sqlite() {
    let (merged, reference) = (sqlite().await, sqlite().await);
    trait_strategies_follow_merges_and_unmerges(&merged, &reference).await;
}

#[tokio::test]
async fn trait_strategies_follow_merges_and_unmerges_on_postgres() {
    let (merged, reference) = (postgres().await, postgres().await);
    trait_strategies_follow_merges_and_unmerges(&merged, &reference).await;
    merged.db.close().await;
    reference.db.close().await;
}

/// With history kept, a profile reads as it was written last before any past time, merges as
/// they stood then; pruning keeps what answers times inside the retention.
async fn profiles_read_as_of_any_past_time(backend: &Backend) {
    use prost::Message as _;
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(vec![], Audiences::default()).with_history(true),
    );
    let minute = time::Duration::minutes(1);
    let plan_at = |body: Option<Vec<u8>>| {
        body.map(|b| {
            let p = tessera_proto::profile::v1::Profile::decode(b.as_slice()).unwrap();
            let plan = p.traits["plan"].value.clone().unwrap();
            (p.profile_id, tessera_proto::convert::value_to_json(&plan))
        })
    };
    let batch = |events| Batch {
        merges: vec![],
        events,
    };
    store
        .apply(
            &batch(vec![event("e1", "p1", 1, "ann", json!({"plan": "free"}))]),
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    store
        .apply(
            &batch(vec![event("e2", "p2", 2, "bob", json!({"plan": "team"}))]),
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    store
        .apply(
            &batch(vec![event("e3", "p1", 3, "ann", json!({"plan": "pro"}))]),
            H,
            NOW + minute,
            &NoScores,
        )
        .await
        .unwrap();
    store
        .apply(
            &Batch {
                merges: vec![merge("p1", "p2")],
                events: vec![],
            },
            H,
            NOW + 2 * minute,
            &NoScores,
        )
        .await
        .unwrap();
    let as_of = |id: &'static str, at| {
        let store = store.clone();
        async move { plan_at(store.profile_as_of(id, at).await.unwrap()) }
    };
    assert_eq!(as_of("p1", NOW - minute).await, None, "not yet");
    assert_eq!(as_of("p1", NOW).await, Some(("p1".into(), json!("free"))));
    assert_eq!(
        as_of("p1", NOW + minute).await,
        Some(("p1".into(), json!("pro")))
    );
    assert_eq!(
        as_of("p2", NOW + minute).await,
        Some(("p2".into(), json!("team"))),
        "before the merge, p2 was itself"
    );
    assert_eq!(
        as_of("p2", NOW + 3 * minute).await,
        Some(("p1".into(), json!("pro"))),
        "after it, the survivor"
    );
    assert!(store.prune_versions(NOW + 5 * minute).await.unwrap() > 0);
    assert_eq!(
        as_of("p1", NOW + 6 * minute).await,
        Some(("p1".into(), json!("pro"))),
        "the newest version before the cutoff is kept"
    );
    assert_eq!(
        as_of("p2", NOW + 6 * minute).await,
        Some(("p1".into(), json!("pro")))
    );
}

#[tokio::test]
async fn profiles_read_as_of_any_past_time_on_sqlite() {
    profiles_read_as_of_any_past_time(&sqlite().await).await;
}

#[tokio::test]
async fn profiles_read_as_of_any_past_time_on_postgres() {
    let backend = postgres().await;
    profiles_read_as_of_any_past_time(&backend).await;
    backend.db.close().await;
}

/// A profile's kept version holds the identifiers it was linked to, as a read returns it: not
/// one another profile holds already, nor one a profile earlier in the same batch linked.
async fn kept_versions_hold_only_linked_identifiers(backend: &Backend) {
    use prost::Message as _;
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(vec![], Audiences::default()).with_history(true),
    );
    let batch = |events| Batch {
        merges: vec![],
        events,
    };
    let with = |mut e: tessera_profile::domain::ResolvedEvent, kind: &str, value: &str| {
        e.identifiers.push(Identifier::new(kind, value));
        e
    };
    store
        .apply(
            &batch(vec![event("e1", "p2", 1, "u2", json!({}))]),
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    // p1 names u2 (p2's); p3 and p4 both name the new a9: p3, first, links it.
    let applied = store
        .apply(
            &batch(vec![
                event("e2", "p1", 2, "u1", json!({})),
                event("e3", "p1", 3, "u2", json!({})),
                with(event("e4", "p3", 4, "u3", json!({})), "anonymous_id", "a9"),
                with(event("e5", "p4", 5, "u4", json!({})), "anonymous_id", "a9"),
            ]),
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    let ids = |list: Vec<(String, String)>| {
        let mut list = list;
        list.sort();
        list
    };
    for id in ["p1", "p3", "p4"] {
        let read = store.get(id).await.unwrap().unwrap();
        let body = store
            .profile_as_of(id, NOW + time::Duration::seconds(1))
            .await
            .unwrap()
            .expect("a kept version");
        let kept = tessera_proto::profile::v1::Profile::decode(body.as_slice()).unwrap();
        assert_eq!(kept.version, read.version, "{id}");
        assert_eq!(
            ids(kept
                .identifiers
                .into_iter()
                .map(|i| (i.r#type, i.value))
                .collect()),
            ids(read
                .state
                .identifiers
                .iter()
                .map(|i| (i.kind.clone(), i.value.clone()))
                .collect()),
            "{id}: the kept version's identifiers are the linked ones"
        );
        let returned = applied.changed.iter().find(|p| p.profile_id == id).unwrap();
        assert_eq!(returned.state.identifiers, read.state.identifiers, "{id}");
    }
    let p1 = store.get("p1").await.unwrap().unwrap();
    assert!(
        !p1.state
            .identifiers
            .contains(&Identifier::new("user_id", "u2"))
    );
    let p4 = store.get("p4").await.unwrap().unwrap();
    assert!(
        !p4.state
            .identifiers
            .contains(&Identifier::new("anonymous_id", "a9"))
    );
}

#[tokio::test]
async fn kept_versions_hold_only_linked_identifiers_on_sqlite() {
    kept_versions_hold_only_linked_identifiers(&sqlite().await).await;
}

#[tokio::test]
async fn kept_versions_hold_only_linked_identifiers_on_postgres() {
    let backend = postgres().await;
    kept_versions_hold_only_linked_identifiers(&backend).await;
    backend.db.close().await;
}

/// A GDPR deletion removes the person's profiles (live and merged away) with everything kept
/// about them — identifiers, events, memberships, history, logged changes — logs their audience
/// exits and one `deleted` change, leaves another person alone, and stays final: a late event
/// or merge naming a deleted profile is skipped, and deleting again deletes nothing more.
async fn a_deleted_person_leaves_nothing_and_stays_deleted(backend: &Backend) {
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(vec![], audiences()).with_history(true),
    );
    let batch = |merges, events| Batch { merges, events };
    store
        .apply(
            &batch(
                vec![],
                vec![
                    event("e1", "p1", 1, "ann", json!({"plan": "pro"})),
                    event("e2", "p2", 2, "ann-phone", json!({"name": "Ann"})),
                    event("e3", "p3", 3, "bob", json!({"plan": "pro"})),
                ],
            ),
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    store
        .apply(&batch(vec![merge("p1", "p2")], vec![]), H, NOW, &NoScores)
        .await
        .unwrap();
    let deleted = store
        .delete("p1", &["p1".into(), "p2".into()], "ticket 7", NOW)
        .await
        .unwrap();
    assert_eq!(deleted.profile_ids, ["p1", "p2"]);
    let mut events = deleted.event_ids.clone();
    events.sort();
    assert_eq!(events, ["e1", "e2"]);
    assert_eq!(
        deleted.identifiers,
        [
            Identifier::new("user_id", "ann"),
            Identifier::new("user_id", "ann-phone")
        ]
    );
    assert_eq!(deleted.rows, 2);
    assert_eq!(
        deleted.exits,
        [MembershipChange {
            audience: "pros".into(),
            profile_id: "p1".into(),
            entered: false,
        }]
    );

    for id in ["p1", "p2"] {
        assert_eq!(store.get(id).await.unwrap(), None, "{id} is gone");
        assert!(store.is_deleted(id).await.unwrap());
        assert_eq!(
            store
                .profile_as_of(id, NOW + time::Duration::days(1))
                .await
                .unwrap(),
            None
        );
    }
    assert!(!store.is_deleted("p3").await.unwrap());
    let query = TimelineQuery {
        limit: 100,
        ..TimelineQuery::default()
    };
    assert!(
        store
            .timeline(&["p1".into(), "p2".into()], &query)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.audience_members("pros", None, 10).await.unwrap().0,
        ["p3"]
    );
    // What the stream keeps about them is what a consumer needs to delete its copies. (On
    // Postgres the stream shows a change once no older transaction runs: other tests' may.)
    let after = changes_until(store.as_ref(), |c| c.iter().any(|c| c.kind == "deleted")).await;
    let about: Vec<(&str, &str)> = after
        .iter()
        .filter(|c| c.profile_id == "p1" || c.profile_id == "p2")
        .map(|c| (c.profile_id.as_str(), c.kind.as_str()))
        .collect();
    assert_eq!(about, [("p1", "audience_exited"), ("p1", "deleted")]);
    assert_eq!(
        after.last().unwrap().detail,
        json!({"profile_ids": ["p1", "p2"]})
    );

    // An event resolved before the deletion and delivered after it, and a merge naming a
    // deleted profile, are skipped; the other person is untouched.
    let late = store
        .apply(
            &batch(
                vec![merge("p1", "p3")],
                vec![
                    event("e4", "p1", 4, "ann", json!({"plan": "free"})),
                    event("e5", "p3", 5, "bob", json!({"seats": 3})),
                ],
            ),
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    assert_eq!(late.applied, 1);
    assert_eq!(store.get("p1").await.unwrap(), None, "not brought back");
    let bob = store.get("p3").await.unwrap().unwrap();
    assert_eq!(bob.profile_id, "p3");
    assert_eq!(bob.state.event_count, 2);

    let again = store
        .delete("p1", &["p1".into(), "p2".into()], "ticket 7", NOW)
        .await
        .unwrap();
    assert_eq!(again.rows, 0);
    assert_eq!(again.profile_ids, ["p1", "p2"]);
    // A later write: once its change shows, so would any the repeated deletion logged.
    store
        .apply(
            &batch(
                vec![],
                vec![event("e6", "p3", 6, "bob", json!({"seats": 4}))],
            ),
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    let last = changes_until(store.as_ref(), |c| {
        c.iter()
            .filter(|c| c.profile_id == "p3" && c.kind == "updated")
            .count()
            == 3
    })
    .await;
    assert_eq!(
        last.iter().filter(|c| c.kind == "deleted").count(),
        1,
        "deleting again logs nothing"
    );
}

/// The changes kept, read until `done` holds of them (or 20 s passed).
pub(crate) async fn changes_until(
    store: &dyn ProfileStore,
    done: impl Fn(&[tessera_profile::store::ProfileChange]) -> bool,
) -> Vec<tessera_profile::store::ProfileChange> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let read = store
            .changes_after(ChangeCursor::default(), 1_000)
            .await
            .unwrap();
        if done(&read) || std::time::Instant::now() > deadline {
            return read;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_deleted_person_leaves_nothing_and_stays_deleted_on_sqlite() {
    a_deleted_person_leaves_nothing_and_stays_deleted(&sqlite().await).await;
}

#[tokio::test]
async fn a_deleted_person_leaves_nothing_and_stays_deleted_on_postgres() {
    let backend = postgres().await;
    a_deleted_person_leaves_nothing_and_stays_deleted(&backend).await;
    backend.db.close().await;
}

/// A group call of `profile_id` at `minute` naming `account` with account `traits`, the
/// person's `role` in `context.traits`.
fn group_call(
    event_id: &str,
    profile_id: &str,
    minute: i64,
    account: &str,
    role: &str,
    traits: serde_json::Value,
) -> ResolvedEvent {
    let mut e = event(
        event_id,
        profile_id,
        minute,
        profile_id,
        json!({"role": role}),
    );
    e.details.kind = "group".into();
    e.details.group_id = account.into();
    e.details.group_traits = traits.as_object().cloned().unwrap_or_default();
    e.details.context = json!({"traits": {"role": role}})
        .as_object()
        .cloned()
        .unwrap_or_default();
    e
}

/// Group calls fold account traits (the latest call winning, whatever the order they arrive
/// in) and make their people members, with the role of their latest call; members follow
/// merges and deletions of people; people see their accounts.
async fn accounts_fold_group_calls_and_list_members(store: &dyn ProfileStore) {
    let batch = |merges, events| Batch { merges, events };
    store
        .apply(
            &batch(
                vec![],
                vec![
                    group_call(
                        "g1",
                        "p1",
                        5,
                        "acme",
                        "finance",
                        json!({"industry": "retail", "employees": 120}),
                    ),
                    group_call(
                        "g2",
                        "p2",
                        1,
                        "acme",
                        "technical evaluator",
                        json!({"industry": "software"}),
                    ),
                    group_call(
                        "g3",
                        "p3",
                        2,
                        "globex",
                        "decision maker",
                        json!({"plan": "enterprise"}),
                    ),
                ],
            ),
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    // A late, older call of p1 changes neither the trait nor p1's role.
    store
        .apply(
            &batch(
                vec![],
                vec![group_call(
                    "g4",
                    "p1",
                    0,
                    "acme",
                    "intern",
                    json!({"industry": "mining"}),
                )],
            ),
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    let acme = store.account("acme").await.unwrap().expect("acme");
    assert_eq!(acme.traits["industry"].value, json!("retail"));
    assert_eq!(acme.traits["industry"].event_id, "g1");
    assert_eq!(acme.traits["employees"].value, json!(120));
    assert_eq!(acme.version, 2);
    assert!(store.account("initech").await.unwrap().is_none());

    let members = |id: &'static str| async move {
        store
            .account_members(id)
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.profile_id, m.role.unwrap_or_default()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        members("acme").await,
        [
            ("p1".to_owned(), "finance".to_owned()),
            ("p2".to_owned(), "technical evaluator".to_owned())
        ]
    );
    let p1 = store.get("p1").await.unwrap().unwrap();
    let accounts: Vec<(&str, serde_json::Value)> = p1
        .state
        .computed
        .accounts()
        .map(|(id, e)| (id, e.value.clone()))
        .collect();
    assert_eq!(accounts, [("acme", json!({"role": "finance"}))]);

    // p2 merged into p3: one member of each account, both accounts on p3.
    store
        .apply(&batch(vec![merge("p3", "p2")], vec![]), H, NOW, &NoScores)
        .await
        .unwrap();
    assert_eq!(
        members("acme").await,
        [
            ("p1".to_owned(), "finance".to_owned()),
            ("p3".to_owned(), "technical evaluator".to_owned())
        ]
    );
    let p3 = store.get("p3").await.unwrap().unwrap();
    let ids: Vec<&str> = p3.state.computed.accounts().map(|(id, _)| id).collect();
    assert_eq!(ids, ["acme", "globex"]);

    // Deleting a person takes them out of their accounts; the account stays.
    store
        .delete("p1", &["p1".into()], "ticket", NOW)
        .await
        .unwrap();
    assert_eq!(
        members("acme").await,
        [("p3".to_owned(), "technical evaluator".to_owned())]
    );
    assert!(store.account("acme").await.unwrap().is_some());
}

#[tokio::test]
async fn accounts_fold_group_calls_and_list_members_on_sqlite() {
    accounts_fold_group_calls_and_list_members(&*sqlite().await.store).await;
}

#[tokio::test]
async fn accounts_fold_group_calls_and_list_members_on_postgres() {
    let backend = postgres().await;
    accounts_fold_group_calls_and_list_members(&*backend.store).await;
    backend.db.close().await;
}

/// A computed trait declared after events were applied counts them too: the store sees that
/// the definitions changed and recomputes every profile (merged ones through their survivor)
/// from its events, a chunk at a time, then stays done until the definitions change again.
async fn profiles_are_recomputed_when_the_definitions_change(backend: &Backend) {
    let before = store::Definitions::new(vec![], Audiences::default());
    let old = store::open_with(backend.db.clone(), before.clone());
    assert!(old.start_recompute(NOW).await.unwrap());
    assert!(
        old.recompute(10, H, NOW, &NoScores)
            .await
            .unwrap()
            .is_none(),
        "nothing stored yet"
    );
    assert!(!old.start_recompute(NOW).await.unwrap());
    let batch = |merges, events| Batch { merges, events };
    old.apply(
        &batch(
            vec![],
            vec![
                tracked("o1", "p1", 1, "Order Completed", json!({"total": 10})),
                tracked("o2", "p2", 2, "Order Completed", json!({"total": 5})),
                tracked("o3", "p3", 3, "Order Completed", json!({"total": 7})),
            ],
        ),
        H,
        NOW,
        &NoScores,
    )
    .await
    .unwrap();
    old.apply(&batch(vec![merge("p1", "p2")], vec![]), H, NOW, &NoScores)
        .await
        .unwrap();

    let after = store::Definitions::new(order_traits(), Audiences::default());
    assert_ne!(after.fingerprint(), before.fingerprint());
    let new = store::open_with(backend.db.clone(), after.clone());
    let orders = |p: &Profile| {
        p.state
            .computed
            .values(&after.computed, NOW)
            .get("orders")
            .map(|v| v.value.clone())
    };
    let p1 = new.get("p1").await.unwrap().unwrap();
    assert_eq!(
        orders(&p1),
        Some(json!(0)),
        "folded before the trait was declared"
    );

    assert!(new.start_recompute(NOW).await.unwrap());
    let mut chunks = 0;
    while let Some(done) = new.recompute(1, H, NOW, &NoScores).await.unwrap() {
        chunks += 1;
        assert!(done.named.len() <= 1);
        assert!(chunks < 10, "the recompute ends");
    }
    assert_eq!(chunks, 2, "p1 (with p2 merged in) and p3");
    let p1 = new.get("p1").await.unwrap().unwrap();
    assert_eq!(orders(&p1), Some(json!(2)));
    assert_eq!(p1.state.event_count, 2);
    assert_eq!(p1.merged_profile_ids, ["p2"]);
    let p3 = new.get("p3").await.unwrap().unwrap();
    assert_eq!(orders(&p3), Some(json!(1)));
    assert!(!new.start_recompute(NOW).await.unwrap());
    let changes = changes_until(new.as_ref(), |c| {
        c.iter()
            .filter(|c| c.profile_id == "p3" && c.kind == "updated")
            .count()
            == 2
    })
    .await;
    assert!(
        changes.iter().all(|c| c.kind != "split"),
        "a recompute is no unmerge: {changes:?}"
    );
}

#[tokio::test]
async fn profiles_are_recomputed_when_the_definitions_change_on_sqlite() {
    profiles_are_recomputed_when_the_definitions_change(&sqlite().await).await;
}

#[tokio::test]
async fn profiles_are_recomputed_when_the_definitions_change_on_postgres() {
    let backend = postgres().await;
    profiles_are_recomputed_when_the_definitions_change(&backend).await;
    backend.db.close().await;
}

/// Records the account traits a scorer is given.
#[derive(Default)]
struct AccountsSeen(std::sync::Mutex<Vec<(String, serde_json::Value)>>);

#[async_trait::async_trait]
impl Scorer for AccountsSeen {
    async fn score(
        &self,
        profiles: &[&Profile],
        accounts: &store::Accounts,
        _now: OffsetDateTime,
    ) -> Result<Vec<Vec<Score>>, ProfileError> {
        let mut seen = self.0.lock().unwrap();
        for (id, account) in accounts {
            let industry = account.traits.get("industry").map(|t| t.value.clone());
            seen.push((id.clone(), industry.unwrap_or_default()));
        }
        Ok(vec![Vec::new(); profiles.len()])
    }
}

/// A scorer sees the accounts of the profiles it scores as the batch left them: a group call's
/// account traits are there in the very write that applies it.
async fn scorers_see_the_accounts_as_the_batch_left_them(store: &dyn ProfileStore) {
    let seen = AccountsSeen::default();
    let batch = Batch {
        merges: vec![],
        events: vec![group_call(
            "g1",
            "p1",
            1,
            "acme",
            "finance",
            json!({"industry": "retail"}),
        )],
    };
    store.apply(&batch, H, NOW, &seen).await.unwrap();
    assert_eq!(
        *seen.0.lock().unwrap(),
        [("acme".to_owned(), json!("retail"))]
    );
}

#[tokio::test]
async fn scorers_see_the_accounts_as_the_batch_left_them_on_sqlite() {
    scorers_see_the_accounts_as_the_batch_left_them(&*sqlite().await.store).await;
}

#[tokio::test]
async fn scorers_see_the_accounts_as_the_batch_left_them_on_postgres() {
    let backend = postgres().await;
    scorers_see_the_accounts_as_the_batch_left_them(&*backend.store).await;
    backend.db.close().await;
}

/// Answers a score for each of its names.
struct NamedScores(Vec<&'static str>);

#[async_trait::async_trait]
impl Scorer for NamedScores {
    async fn score(
        &self,
        profiles: &[&Profile],
        _accounts: &store::Accounts,
        now: OffsetDateTime,
    ) -> Result<Vec<Vec<Score>>, ProfileError> {
        let scores: Vec<Score> = self
            .0
            .iter()
            .map(|name| Score {
                name: (*name).to_owned(),
                value: 50.0,
                computed_at: now,
                model_version: String::new(),
                factors: Vec::new(),
            })
            .collect();
        Ok(vec![scores; profiles.len()])
    }
}

/// A score the scorer stops answering (a plan removed from the config) leaves the profile at
/// its next write; a scorer answering nothing leaves the scores as they are.
async fn scores_no_longer_answered_are_dropped(store: &dyn ProfileStore) {
    let write = |id: &str, minute| Batch {
        merges: vec![],
        events: vec![event(id, "p1", minute, "ann", json!({"plan": "pro"}))],
    };
    store
        .apply(
            &write("e1", 1),
            H,
            NOW,
            &NamedScores(vec!["engagement", "fit"]),
        )
        .await
        .unwrap();
    let names = |p: Profile| p.scores.into_keys().collect::<Vec<_>>();
    assert_eq!(
        names(store.get("p1").await.unwrap().unwrap()),
        ["engagement", "fit"]
    );
    store
        .apply(&write("e2", 2), H, NOW, &NoScores)
        .await
        .unwrap();
    assert_eq!(
        names(store.get("p1").await.unwrap().unwrap()),
        ["engagement", "fit"]
    );
    store
        .apply(&write("e3", 3), H, NOW, &NamedScores(vec!["engagement"]))
        .await
        .unwrap();
    assert_eq!(
        names(store.get("p1").await.unwrap().unwrap()),
        ["engagement"]
    );
}

#[tokio::test]
async fn scores_no_longer_answered_are_dropped_on_sqlite() {
    scores_no_longer_answered_are_dropped(&*sqlite().await.store).await;
}

#[tokio::test]
async fn scores_no_longer_answered_are_dropped_on_postgres() {
    let backend = postgres().await;
    scores_no_longer_answered_are_dropped(&*backend.store).await;
    backend.db.close().await;
}

/// Scores persons with nothing and each account with its function of the account, its members
/// (as the store derived them) and the time; an error fails the whole call.
struct ScoreAccountsWith(AccountScores);

/// An account's scores from the account, its members and the time.
type AccountScores = fn(
    &tessera_profile::account::Account,
    &[tessera_profile::account::Member],
    OffsetDateTime,
) -> Result<Vec<Score>, ProfileError>;

#[async_trait::async_trait]
impl Scorer for ScoreAccountsWith {
    async fn score(
        &self,
        profiles: &[&Profile],
        _accounts: &store::Accounts,
        _now: OffsetDateTime,
    ) -> Result<Vec<Vec<Score>>, ProfileError> {
        Ok(vec![Vec::new(); profiles.len()])
    }

    async fn score_accounts(
        &self,
        accounts: &[(
            tessera_profile::account::Account,
            Vec<tessera_profile::account::Member>,
        )],
        now: OffsetDateTime,
    ) -> Result<Option<Vec<Vec<Score>>>, ProfileError> {
        accounts
            .iter()
            .map(|(account, members)| (self.0)(account, members, now))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// Scores accounts as an account plan on buying-role coverage would: `coverage` is 25 points
/// per distinct role among the members it is given (what the store derived), `members` their
/// count.
const COVERAGE: ScoreAccountsWith = ScoreAccountsWith(|account, members, now| {
    let roles: std::collections::BTreeSet<&str> =
        members.iter().filter_map(|m| m.role.as_deref()).collect();
    let industry = account
        .traits
        .get("industry")
        .map(|t| t.value.to_string())
        .unwrap_or_default();
    Ok(vec![Score {
        name: "coverage".to_owned(),
        value: 25.0 * roles.len() as f64,
        computed_at: now,
        model_version: "coverage@1".to_owned(),
        factors: vec![tessera_profile::domain::ScoreFactor {
            name: "members".to_owned(),
            value: members.len() as f64,
            description: format!("industry {industry}"),
        }],
    }])
});

/// An account's scores are computed from its traits and members as the batch left them,
/// stored on the account, and change when a second member with another buying role joins, when
/// a member's role changes through a group call without account traits, and when members merge
/// and are split again.
async fn account_scores_are_stored_and_follow_members(store: &dyn ProfileStore) {
    let apply = |merges, events| async move {
        store
            .apply(&Batch { merges, events }, H, NOW, &COVERAGE)
            .await
            .unwrap()
    };
    let coverage = |account: &tessera_profile::account::Account| {
        let score = &account.scores["coverage"];
        (score.value, score.factors[0].value)
    };
    apply(
        vec![],
        vec![group_call(
            "g1",
            "p1",
            1,
            "acme",
            "finance",
            json!({"industry": "software"}),
        )],
    )
    .await;
    let acme = store.account("acme").await.unwrap().expect("acme");
    assert_eq!(coverage(&acme), (25.0, 1.0));
    assert_eq!(acme.scores["coverage"].model_version, "coverage@1");
    assert_eq!(
        acme.scores["coverage"].factors[0].description, "industry \"software\"",
        "scored with the traits the batch folded"
    );
    let first_version = acme.version;

    // A second member with another buying role joins.
    apply(
        vec![],
        vec![group_call(
            "g2",
            "p2",
            2,
            "acme",
            "technical evaluator",
            json!({}),
        )],
    )
    .await;
    let acme = store.account("acme").await.unwrap().unwrap();
    assert_eq!(coverage(&acme), (50.0, 2.0));
    assert!(acme.version > first_version);

    // A group call without account traits changes p2's role to p1's: one role left.
    let mut again = group_call("g3", "p2", 3, "acme", "finance", json!({}));
    again.details.group_traits.clear();
    apply(vec![], vec![again]).await;
    let acme = store.account("acme").await.unwrap().unwrap();
    assert_eq!(coverage(&acme), (25.0, 2.0));
    assert_eq!(acme.traits["industry"].value, json!("software"));

    // An account only a trait-less group call named exists, with its scores.
    let mut bare = group_call("g4", "p3", 4, "globex", "champion", json!({}));
    bare.details.group_traits.clear();
    apply(vec![], vec![bare]).await;
    let globex = store.account("globex").await.unwrap().expect("globex");
    assert_eq!(coverage(&globex), (25.0, 1.0));

    // p2 merged into p1: one member of acme now.
    apply(vec![merge("p1", "p2")], vec![]).await;
    let acme = store.account("acme").await.unwrap().unwrap();
    assert_eq!(coverage(&acme), (25.0, 1.0));

    // The merge undone: two members again.
    let split = Split {
        profiles: vec![("p1".into(), "p1".into()), ("p2".into(), "p2".into())],
        events: vec![],
        erased: vec![],
    };
    store.split(&split, H, NOW, &COVERAGE).await.unwrap();
    let acme = store.account("acme").await.unwrap().unwrap();
    assert_eq!(coverage(&acme), (25.0, 2.0));

    // A scorer that does not score accounts leaves their scores as they are.
    store
        .apply(
            &Batch {
                merges: vec![],
                events: vec![group_call("g5", "p4", 5, "acme", "champion", json!({}))],
            },
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    let acme = store.account("acme").await.unwrap().unwrap();
    assert_eq!(coverage(&acme), (25.0, 2.0));

    // A deleted person leaves the account: the account refresh the deletion queues rescores
    // it with p1 (finance) and p4 (champion).
    store.delete("p2", &[], "erasure", NOW).await.unwrap();
    drain_account_refreshes(store, NOW, &COVERAGE).await;
    let acme = store.account("acme").await.unwrap().unwrap();
    assert_eq!(coverage(&acme), (50.0, 2.0));
}

#[tokio::test]
async fn account_scores_are_stored_and_follow_members_on_sqlite() {
    account_scores_are_stored_and_follow_members(&*sqlite().await.store).await;
}

#[tokio::test]
async fn account_scores_are_stored_and_follow_members_on_postgres() {
    let backend = postgres().await;
    account_scores_are_stored_and_follow_members(&*backend.store).await;
    backend.db.close().await;
}

/// An account trait another member's group call changes reaches every member: the caller's
/// audiences and scores in the same write, the other members' at the account refresh that the
/// write queues (once: the queue is empty afterwards).
async fn account_traits_reach_every_member(backend: &Backend) {
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(
            vec![],
            Audiences::compile(vec![Audience {
                name: "software".into(),
                condition: Condition::Account(Test {
                    name: "industry".into(),
                    op: Op::Eq,
                    value: json!("Software"),
                }),
            }])
            .unwrap(),
        ),
    );
    let members = || {
        let store = store.clone();
        async move {
            store
                .audience_members("software", None, 10)
                .await
                .unwrap()
                .0
        }
    };
    let seen = AccountsSeen::default();
    let apply = |event: ResolvedEvent| {
        let store = store.clone();
        let seen = &seen;
        async move {
            let batch = Batch {
                merges: vec![],
                events: vec![event],
            };
            store.apply(&batch, H, NOW, seen).await.unwrap()
        }
    };
    let refresh = || {
        let store = store.clone();
        let seen = &seen;
        async move { store.refresh_accounts(10, H, NOW, seen).await.unwrap() }
    };
    // p2 joins acme before it has an industry; nothing is queued for a call that changes no
    // account trait.
    apply(group_call("g1", "p2", 1, "acme", "technical", json!({}))).await;
    assert!(refresh().await.is_none());
    assert!(members().await.is_empty());

    // p1's call makes acme a software company: p1 is in at once, p2 at the refresh, which
    // rescores p2 with acme's new traits.
    let changes = apply(group_call(
        "g2",
        "p1",
        2,
        "acme",
        "finance",
        json!({"industry": "Software"}),
    ))
    .await
    .audiences;
    assert_eq!(
        changes
            .iter()
            .map(|c| (c.profile_id.as_str(), c.entered))
            .collect::<Vec<_>>(),
        [("p1", true)]
    );
    assert_eq!(members().await, ["p1"]);
    seen.0.lock().unwrap().clear();
    let refreshed = refresh().await.expect("a refresh was queued");
    assert_eq!(refreshed.named, ["p1", "p2"]);
    assert_eq!(
        refreshed
            .audiences
            .iter()
            .map(|c| (c.profile_id.as_str(), c.entered))
            .collect::<Vec<_>>(),
        [("p2", true)]
    );
    assert!(
        refreshed
            .changed
            .iter()
            .any(|p| p.profile_id == "p2" && p.state.computed.account_traits().count() == 1),
        "p2 carries acme's traits: {:?}",
        refreshed.changed
    );
    assert_eq!(
        *seen.0.lock().unwrap(),
        [("acme".to_owned(), json!("Software"))]
    );
    assert_eq!(members().await, ["p1", "p2"]);
    assert!(
        refresh().await.is_none(),
        "the queue is empty after a refresh"
    );

    // An older call does not win over the newer industry: nothing changes, nothing is queued.
    apply(group_call(
        "g0",
        "p2",
        0,
        "acme",
        "technical",
        json!({"industry": "Retail"}),
    ))
    .await;
    assert!(refresh().await.is_none());
    assert_eq!(members().await, ["p1", "p2"]);

    // p2 moves acme to retail: p2 leaves at once, p1 at the refresh.
    apply(group_call(
        "g3",
        "p2",
        3,
        "acme",
        "technical",
        json!({"industry": "Retail", "employees": 50}),
    ))
    .await;
    assert_eq!(members().await, ["p1"]);
    let refreshed = refresh().await.expect("a refresh was queued");
    assert_eq!(
        refreshed
            .audiences
            .iter()
            .map(|c| (c.profile_id.as_str(), c.entered))
            .collect::<Vec<_>>(),
        [("p1", false)]
    );
    assert!(members().await.is_empty());
    let p1 = store.get("p1").await.unwrap().expect("p1");
    assert_eq!(
        p1.state.computed.account_traits().collect::<Vec<_>>(),
        [("acme", &json!({"industry": "Retail"}))],
        "only the traits audiences read are copied"
    );
}

#[tokio::test]
async fn account_traits_reach_every_member_on_sqlite() {
    account_traits_reach_every_member(&sqlite().await).await;
}

#[tokio::test]
async fn account_traits_reach_every_member_on_postgres() {
    let backend = postgres().await;
    account_traits_reach_every_member(&backend).await;
    backend.db.close().await;
}

/// An account computed trait that audiences read reaches every member's audiences: the
/// person whose event or merge changes it in the same write, the other members at the account
/// refresh that write queues, as its window passes by the sweep, and as people merge, unmerge,
/// are deleted or join. A computed trait wins over an account trait of its name, and the copy
/// is kept in the profile's history.
async fn account_computed_traits_in_audiences_reach_every_member(backend: &Backend) {
    use prost::Message as _;
    let account_test = |name: &str, audience: &str, at_least: u64| Audience {
        name: audience.into(),
        condition: Condition::Account(Test {
            name: name.into(),
            op: Op::Gte,
            value: json!(at_least),
        }),
    };
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(
            vec![],
            Audiences::compile(vec![
                account_test("orders", "busy", 3),
                account_test("orders_1h", "busy_now", 2),
            ])
            .unwrap(),
        )
        .with_history(true)
        .with_account_computed(vec![
            order_count("orders", None),
            order_count("orders_1h", Some(3_600)),
        ]),
    );
    let minutes = time::Duration::minutes;
    // An order `ago` minutes before NOW.
    let order = |id: &str, profile: &str, ago: i64| {
        let mut e = tracked(id, profile, 0, "Order Completed", json!({}));
        e.timestamp = NOW - minutes(ago);
        e
    };
    let apply = |merges: Vec<Merge>, events: Vec<ResolvedEvent>, now: OffsetDateTime| {
        let store = store.clone();
        async move {
            store
                .apply(&Batch { merges, events }, H, now, &NoScores)
                .await
                .unwrap()
                .audiences
        }
    };
    // Every queued refresh, as the sweeper takes them: the membership changes they made.
    let refresh = |now: OffsetDateTime| {
        let store = store.clone();
        async move {
            let mut changes = Vec::new();
            while let Some(done) = store.refresh_accounts(1, H, now, &NoScores).await.unwrap() {
                changes.extend(done.audiences);
            }
            changes
        }
    };
    let members = |audience: &'static str| {
        let store = store.clone();
        async move { store.audience_members(audience, None, 10).await.unwrap().0 }
    };
    let entered = |audience: &str, ids: &[&str]| -> Vec<MembershipChange> {
        ids.iter()
            .map(|id| MembershipChange {
                audience: audience.into(),
                profile_id: (*id).into(),
                entered: true,
            })
            .collect()
    };
    let exited = |audience: &str, ids: &[&str]| -> Vec<MembershipChange> {
        entered(audience, ids)
            .into_iter()
            .map(|c| MembershipChange {
                entered: false,
                ..c
            })
            .collect()
    };

    // Ann and Bob join acme; Ann's call sets an account trait `orders`, which the account
    // computed trait of that name overrides (no orders yet).
    apply(
        vec![],
        vec![
            group_call("g1", "p1", 0, "acme", "finance", json!({"orders": 100})),
            group_call("g2", "p2", 1, "acme", "champion", json!({})),
        ],
        NOW,
    )
    .await;
    assert!(refresh(NOW).await.is_empty());
    assert!(members("busy").await.is_empty());
    let p1 = store.get("p1").await.unwrap().expect("p1");
    assert_eq!(
        p1.state.computed.account_traits().collect::<Vec<_>>(),
        [("acme", &json!({"orders": 0, "orders_1h": 0}))]
    );

    // Ann orders twice: she is in busy_now in the same write, Bob at the refresh.
    let changes = apply(
        vec![],
        vec![order("o1", "p1", 50), order("o2", "p1", 40)],
        NOW,
    )
    .await;
    assert_eq!(changes, entered("busy_now", &["p1"]));
    assert_eq!(refresh(NOW).await, entered("busy_now", &["p2"]));
    assert!(members("busy").await.is_empty());

    // Bob's order pushes acme to three: Bob is in busy in his own write, Ann at the refresh.
    let changes = apply(vec![], vec![order("o3", "p2", 30)], NOW).await;
    assert_eq!(changes, entered("busy", &["p2"]));
    assert_eq!(members("busy").await, ["p2"]);
    assert_eq!(refresh(NOW).await, entered("busy", &["p1"]));
    assert_eq!(members("busy").await, ["p1", "p2"]);
    assert!(refresh(NOW).await.is_empty(), "the queue is empty");
    let p1 = store.get("p1").await.unwrap().expect("p1");
    assert_eq!(
        p1.valid_until,
        Some(NOW + minutes(10)),
        "o1 leaves the hour then"
    );

    // Time passes: o1 leaves the hour (two are left), then o2 (one): both leave busy_now at
    // the sweep, without a new event.
    let (swept, changes) = store.sweep(NOW + minutes(11), 10).await.unwrap();
    assert_eq!(swept.len(), 2);
    assert!(changes.is_empty(), "{changes:?}");
    let (swept, changes) = store.sweep(NOW + minutes(21), 10).await.unwrap();
    assert_eq!(swept.len(), 2);
    assert_eq!(changes, exited("busy_now", &["p1", "p2"]));
    assert!(
        swept
            .iter()
            .all(|p| p.valid_until == Some(NOW + minutes(30))),
        "o3 leaves next: {swept:?}"
    );
    let (swept, _) = store.sweep(NOW + minutes(22), 10).await.unwrap();
    assert!(swept.is_empty(), "not due again before then");
    // As of before the sweep, Ann was in both.
    let before = store
        .profile_as_of("p1", NOW + minutes(20))
        .await
        .unwrap()
        .expect("a version");
    let before = tessera_proto::profile::v1::Profile::decode(before.as_slice()).unwrap();
    assert_eq!(before.audiences, ["busy", "busy_now"]);

    // Cat, not in acme, orders; merged into Ann, her order counts for acme in the merge's
    // write (Ann is back in busy_now), for Bob at the refresh.
    let later = NOW + minutes(22);
    assert!(
        apply(vec![], vec![order("o4", "p3", 5)], later)
            .await
            .is_empty()
    );
    let changes = apply(vec![merge("p1", "p3")], vec![], later).await;
    assert_eq!(changes, entered("busy_now", &["p1"]));
    assert_eq!(refresh(later).await, entered("busy_now", &["p2"]));

    // The merge undone: Ann leaves in the split's write, Bob at the refresh.
    let split = Split {
        profiles: vec![("p1".into(), "p1".into()), ("p3".into(), "p3".into())],
        events: vec![],
        erased: vec![],
    };
    let changes = store
        .split(&split, H, later, &NoScores)
        .await
        .unwrap()
        .audiences;
    assert_eq!(changes, exited("busy_now", &["p1"]));
    assert_eq!(refresh(later).await, exited("busy_now", &["p2"]));
    assert_eq!(members("busy").await, ["p1", "p2"]);

    // Bob deleted: his order goes with him, and Ann leaves busy at the refresh.
    store.delete("p2", &[], "erasure", later).await.unwrap();
    assert_eq!(members("busy").await, ["p1"]);
    assert_eq!(refresh(later).await, exited("busy", &["p1"]));

    // Dan, with two orders, joins acme: he is in busy in his own write, Ann at the refresh.
    apply(
        vec![],
        vec![order("o5", "p4", 60), order("o6", "p4", 70)],
        later,
    )
    .await;
    let changes = apply(
        vec![],
        vec![group_call("g3", "p4", 2, "acme", "technical", json!({}))],
        later,
    )
    .await;
    assert_eq!(changes, entered("busy", &["p4"]));
    assert_eq!(refresh(later).await, entered("busy", &["p1"]));
    assert_eq!(members("busy").await, ["p1", "p4"]);
}

#[tokio::test]
async fn account_computed_traits_in_audiences_reach_every_member_on_sqlite() {
    account_computed_traits_in_audiences_reach_every_member(&sqlite().await).await;
}

#[tokio::test]
async fn account_computed_traits_in_audiences_reach_every_member_on_postgres() {
    let backend = postgres().await;
    account_computed_traits_in_audiences_reach_every_member(&backend).await;
    backend.db.close().await;
}

/// Scores each account with the value of its `orders` trait (the account computed trait, when
/// declared), -1 without one.
const ACCOUNT_ORDERS: ScoreAccountsWith = ScoreAccountsWith(|account, _, now| {
    let orders = account
        .traits
        .get("orders")
        .and_then(|t| t.value.as_f64())
        .unwrap_or(-1.0);
    Ok(vec![Score {
        name: "orders".to_owned(),
        value: orders,
        computed_at: now,
        model_version: String::new(),
        factors: Vec::new(),
    }])
});

/// Account computed traits fold the events of every member of the account (and of the
/// profiles merged into them) when read, so they follow members joining, merges, unmerges,
/// deletions and windows; an event that counts queues a rescore of its person's accounts, and
/// account scorers read the computed traits as traits.
async fn account_computed_traits_fold_every_members_events(backend: &Backend) {
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(vec![], Audiences::default()).with_account_computed(vec![
            order_count("orders", None),
            order_count("orders_1h", Some(3_600)),
        ]),
    );
    let order = |id: &str, profile: &str, minute: i64, user: &str| ResolvedEvent {
        details: EventDetails {
            message_id: format!("m-{id}"),
            kind: "track".into(),
            event: "Order Completed".into(),
            ..EventDetails::default()
        },
        ..event(id, profile, minute, user, json!({}))
    };
    let apply = |merges: Vec<Merge>, events: Vec<ResolvedEvent>| {
        let store = store.clone();
        async move {
            store
                .apply(&Batch { merges, events }, H, NOW, &ACCOUNT_ORDERS)
                .await
                .unwrap()
        }
    };
    let computed = |at: OffsetDateTime| {
        let store = store.clone();
        async move {
            let values = store.account_computed("acme", at).await.unwrap();
            let n = |name: &str| values.get(name).and_then(|v| v.value.as_i64());
            (n("orders"), n("orders_1h"))
        }
    };
    // Rescored by the queued refreshes, as the sweeper does.
    let scored = || {
        let store = store.clone();
        async move {
            drain_account_refreshes(&*store, NOW, &ACCOUNT_ORDERS).await;
            store.account("acme").await.unwrap().expect("acme").scores["orders"].value
        }
    };
    apply(
        vec![],
        vec![
            group_call("g1", "p1", 0, "acme", "finance", json!({})),
            group_call("g2", "p2", 1, "acme", "champion", json!({})),
        ],
    )
    .await;
    apply(
        vec![],
        vec![
            order("o1", "p1", 10, "p1"),
            order("o2", "p2", 20, "p2"),
            order("o3", "p2", 100, "p2"),
            order("o4", "p3", 30, "p3"),
        ],
    )
    .await;
    assert_eq!(computed(at(120)).await, (Some(3), Some(1)));
    assert_eq!(
        computed(at(200)).await,
        (Some(3), Some(0)),
        "the window passed"
    );
    assert_eq!(scored().await, 3.0, "the order events queued a rescore");

    // Cat merged into Ann: Cat's order counts now; the merge rescores Ann's accounts at once.
    apply(vec![merge("p1", "p3")], vec![]).await;
    assert_eq!(computed(at(120)).await, (Some(4), Some(1)));
    assert_eq!(
        store.account("acme").await.unwrap().unwrap().scores["orders"].value,
        4.0
    );

    // The merge undone: not any more.
    let split = Split {
        profiles: vec![("p1".into(), "p1".into()), ("p3".into(), "p3".into())],
        events: vec![],
        erased: vec![],
    };
    store.split(&split, H, NOW, &ACCOUNT_ORDERS).await.unwrap();
    assert_eq!(computed(at(120)).await, (Some(3), Some(1)));
    assert_eq!(scored().await, 3.0);

    // Bob deleted: his orders go with him, and the account is rescored without them.
    store.delete("p2", &[], "erasure", NOW).await.unwrap();
    assert_eq!(computed(at(120)).await, (Some(1), Some(0)));
    assert_eq!(scored().await, 1.0);
}

#[tokio::test]
async fn account_computed_traits_fold_every_members_events_on_sqlite() {
    account_computed_traits_fold_every_members_events(&sqlite().await).await;
}

#[tokio::test]
async fn account_computed_traits_fold_every_members_events_on_postgres() {
    let backend = postgres().await;
    account_computed_traits_fold_every_members_events(&backend).await;
    backend.db.close().await;
}

/// Scores each account as an account plan's rule on `order_count` (at least 1, 10 points)
/// would: 10 when the traits it is given hold one of at least 1, else 0.
const ORDER_COUNT_RULE: ScoreAccountsWith = ScoreAccountsWith(|account, _, now| {
    let fires = account
        .traits
        .get("order_count")
        .and_then(|t| t.value.as_f64())
        .is_some_and(|n| n >= 1.0);
    Ok(vec![Score {
        name: "ordered".to_owned(),
        value: if fires { 10.0 } else { 0.0 },
        computed_at: now,
        model_version: String::new(),
        factors: Vec::new(),
    }])
});

/// A declared account computed trait hides the account trait of its name, also while it has
/// no value: an account trait `order_count` = 99 from a group call is read by neither the
/// audiences' account tests nor the account plans while the account computed trait
/// `order_count` has counted nothing; once an event counts, both read the computed value.
async fn an_account_computed_trait_hides_the_account_trait_of_its_name(backend: &Backend) {
    // A sum has no value before its first event (a count would read 0).
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(
            vec![],
            Audiences::compile(vec![Audience {
                name: "ordering_accounts".into(),
                condition: Condition::Account(Test {
                    name: "order_count".into(),
                    op: Op::Gte,
                    value: json!(1),
                }),
            }])
            .unwrap(),
        )
        .with_account_computed(vec![ComputedTrait {
            name: "order_count".into(),
            kind: Kind::Sum,
            events: vec!["Order Completed".into()],
            types: vec![],
            property: Some("quantity".into()),
            window_seconds: None,
        }]),
    );
    let apply = |events: Vec<ResolvedEvent>| {
        let store = store.clone();
        async move {
            store
                .apply(
                    &Batch {
                        merges: vec![],
                        events,
                    },
                    H,
                    NOW,
                    &ORDER_COUNT_RULE,
                )
                .await
                .unwrap();
            drain_account_refreshes(&*store, NOW, &ORDER_COUNT_RULE).await;
        }
    };
    let seen = || {
        let store = store.clone();
        async move {
            let members = store
                .audience_members("ordering_accounts", None, 10)
                .await
                .unwrap()
                .0;
            let p1 = store.get("p1").await.unwrap().expect("p1");
            let copy = p1
                .state
                .computed
                .account_traits()
                .map(|(id, traits)| (id.to_owned(), traits.clone()))
                .collect::<Vec<_>>();
            let acme = store.account("acme").await.unwrap().expect("acme");
            (members, copy, acme.scores["ordered"].value)
        }
    };

    apply(vec![group_call(
        "g1",
        "p1",
        0,
        "acme",
        "finance",
        json!({"order_count": 99, "industry": "software"}),
    )])
    .await;
    let (members, copy, score) = seen().await;
    assert!(members.is_empty(), "the trait is hidden: {members:?}");
    assert_eq!(copy, [("acme".to_owned(), json!({}))]);
    assert_eq!(
        score, 0.0,
        "the plan rule does not fire on the hidden trait"
    );
    let account = store.account("acme").await.unwrap().expect("acme");
    assert_eq!(
        account.traits["order_count"].value,
        json!(99),
        "still stored"
    );
    let computed = store.account_computed("acme", NOW).await.unwrap();
    assert!(!computed.contains_key("order_count"), "{computed:?}");

    // An order counts: both read the computed value.
    apply(vec![tracked(
        "o1",
        "p1",
        1,
        "Order Completed",
        json!({"quantity": 2}),
    )])
    .await;
    let (members, copy, score) = seen().await;
    assert_eq!(members, ["p1"]);
    assert_eq!(copy, [("acme".to_owned(), json!({"order_count": 2.0}))]);
    assert_eq!(score, 10.0);
}

#[tokio::test]
async fn an_account_computed_trait_hides_the_account_trait_of_its_name_on_sqlite() {
    an_account_computed_trait_hides_the_account_trait_of_its_name(&sqlite().await).await;
}

#[tokio::test]
async fn an_account_computed_trait_hides_the_account_trait_of_its_name_on_postgres() {
    let backend = postgres().await;
    an_account_computed_trait_hides_the_account_trait_of_its_name(&backend).await;
    backend.db.close().await;
}

/// Scores each person as a person plan reading its account's `order_count` would see it: the
/// value of `acme`'s `order_count` among the accounts it is given, -1 when absent.
struct AccountOrderCount;

#[async_trait::async_trait]
impl Scorer for AccountOrderCount {
    async fn score(
        &self,
        profiles: &[&Profile],
        accounts: &store::Accounts,
        now: OffsetDateTime,
    ) -> Result<Vec<Vec<Score>>, ProfileError> {
        let seen = accounts
            .get("acme")
            .and_then(|a| a.traits.get("order_count"))
            .and_then(|t| t.value.as_f64())
            .unwrap_or(-1.0);
        let score = Score {
            name: "account_orders".to_owned(),
            value: seen,
            computed_at: now,
            model_version: String::new(),
            factors: Vec::new(),
        };
        Ok(vec![vec![score]; profiles.len()])
    }
}

/// Person plans read the account computed traits of the person's accounts by the rule account
/// plans and audiences read them by: a windowed count `order_count` hides the account trait
/// `order_count` = 99 that a group call set, with no audience reading it (so no member keeps a
/// copy). Each write that scores the person reads the computed value: the person's own apply,
/// the account refresh after another member's group call changed the account's traits, a
/// recompute, and an apply after the counted orders left the window.
async fn person_plans_read_account_computed_traits_over_the_trait_of_their_name(backend: &Backend) {
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(vec![], Audiences::default())
            .with_account_computed(vec![order_count("order_count", Some(3_600))]),
    );
    let apply = |events: Vec<ResolvedEvent>, now: OffsetDateTime| {
        let store = store.clone();
        async move {
            store
                .apply(
                    &Batch {
                        merges: vec![],
                        events,
                    },
                    H,
                    now,
                    &AccountOrderCount,
                )
                .await
                .unwrap();
            drain_account_refreshes(&*store, now, &AccountOrderCount).await;
        }
    };
    let seen = |id: &'static str| {
        let store = store.clone();
        async move {
            let profile = store.get(id).await.unwrap().expect(id);
            profile.scores["account_orders"].value
        }
    };

    apply(
        vec![
            group_call("g1", "p1", 0, "acme", "finance", json!({"order_count": 99})),
            group_call("g2", "p2", 0, "acme", "finance", json!({})),
        ],
        at(0),
    )
    .await;
    assert_eq!(seen("p1").await, 0.0, "nothing counted, the 99 is hidden");

    // Orders of both members, in the same write.
    apply(
        vec![
            tracked("o1", "p1", 1, "Order Completed", json!({})),
            tracked("o2", "p2", 1, "Order Completed", json!({})),
        ],
        at(1),
    )
    .await;
    assert_eq!((seen("p1").await, seen("p2").await), (2.0, 2.0));

    // Another member's group call changes the account's traits: the refresh rescores p1.
    apply(
        vec![group_call(
            "g3",
            "p2",
            2,
            "acme",
            "finance",
            json!({"order_count": 98}),
        )],
        at(2),
    )
    .await;
    assert_eq!(seen("p1").await, 2.0, "rescored by the refresh, 98 hidden");
    let account = store.account("acme").await.unwrap().expect("acme");
    assert_eq!(account.traits["order_count"].value, json!(98), "stored");

    // A recompute rebuilds and rescores every profile.
    assert!(store.start_recompute(at(3)).await.unwrap());
    while store
        .recompute(10, H, at(3), &AccountOrderCount)
        .await
        .unwrap()
        .is_some()
    {}
    assert_eq!(seen("p1").await, 2.0, "recomputed, 98 hidden");

    // An hour later the orders left the window: the next write reads the count as of then.
    apply(vec![event("e1", "p1", 62, "ann", json!({}))], at(62)).await;
    assert_eq!(seen("p1").await, 0.0, "the window emptied, 98 hidden");
}

#[tokio::test]
async fn person_plans_read_account_computed_traits_over_the_trait_of_their_name_on_sqlite() {
    person_plans_read_account_computed_traits_over_the_trait_of_their_name(&sqlite().await).await;
}

#[tokio::test]
async fn person_plans_read_account_computed_traits_over_the_trait_of_their_name_on_postgres() {
    let backend = postgres().await;
    person_plans_read_account_computed_traits_over_the_trait_of_their_name(&backend).await;
    backend.db.close().await;
}

/// A person plan reading an account computed trait follows it with no write of the person:
/// another member's counted order, a person joining with an order, and the orders leaving the
/// window each queue a refresh of the account's members (no audience reads the trait, so no
/// member keeps a copy, and the stand-in scorer does not score accounts), which rescores them.
/// p1 is never written between the steps: only the account refresh and the sweep's expiry of
/// accounts run.
async fn person_scores_follow_account_computed_traits_without_a_write_of_the_person(
    backend: &Backend,
) {
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(vec![], Audiences::default())
            .with_account_computed(vec![order_count("order_count", Some(3_600))]),
    );
    // Every queued refresh, as the sweeper takes them.
    let refresh = |now: OffsetDateTime| {
        let store = store.clone();
        async move {
            drain_account_refreshes(&*store, now, &AccountOrderCount).await;
        }
    };
    let apply = |events: Vec<ResolvedEvent>, now: OffsetDateTime| {
        let store = store.clone();
        async move {
            let batch = Batch {
                merges: vec![],
                events,
            };
            store
                .apply(&batch, H, now, &AccountOrderCount)
                .await
                .unwrap();
        }
    };
    let seen = |id: &'static str| {
        let store = store.clone();
        async move {
            let profile = store.get(id).await.unwrap().expect(id);
            (profile.scores["account_orders"].value, profile.version)
        }
    };

    apply(
        vec![
            group_call("g1", "p1", 0, "acme", "finance", json!({})),
            group_call("g2", "p2", 0, "acme", "finance", json!({})),
        ],
        at(0),
    )
    .await;
    refresh(at(0)).await;
    let (score, version) = seen("p1").await;
    assert_eq!(score, 0.0, "nothing counted");

    // Another member's order: p1 is rescored by the refresh of acme's members.
    apply(
        vec![tracked("o1", "p2", 1, "Order Completed", json!({}))],
        at(1),
    )
    .await;
    assert_eq!(
        seen("p1").await,
        (0.0, version),
        "not written by p2's write"
    );
    refresh(at(1)).await;
    let (score, version) = seen("p1").await;
    assert_eq!(score, 1.0, "rescored after p2's order");

    // p3 ordered before joining: once it joins, its order counts for acme.
    apply(
        vec![tracked("o2", "p3", 2, "Order Completed", json!({}))],
        at(2),
    )
    .await;
    refresh(at(2)).await;
    assert_eq!(seen("p1").await, (1.0, version), "p3 is no member yet");
    apply(
        vec![group_call("g3", "p3", 3, "acme", "finance", json!({}))],
        at(3),
    )
    .await;
    refresh(at(3)).await;
    assert_eq!(seen("p1").await.0, 2.0, "rescored after p3 joined");

    // An hour later o1 leaves the window, then o2: the sweep's expiry of acme queues the
    // refresh of its members each time, with no event.
    let half = time::Duration::seconds(30);
    assert!(
        store
            .expire_accounts(at(61) - half, 10)
            .await
            .unwrap()
            .is_empty(),
        "nothing left the window yet"
    );
    assert_eq!(
        store.expire_accounts(at(61) + half, 10).await.unwrap(),
        ["acme"]
    );
    refresh(at(61) + half).await;
    assert_eq!(seen("p1").await.0, 1.0, "o1 left the window");
    assert_eq!(
        store.expire_accounts(at(62) + half, 10).await.unwrap(),
        ["acme"]
    );
    refresh(at(62) + half).await;
    assert_eq!(seen("p1").await.0, 0.0, "o2 left the window");
    assert_eq!(seen("p3").await.0, 0.0, "every member");
    assert!(
        store
            .expire_accounts(at(62) + time::Duration::days(365), 10)
            .await
            .unwrap()
            .is_empty(),
        "nothing left to expire"
    );
}

#[tokio::test]
async fn person_scores_follow_account_computed_traits_without_a_write_of_the_person_on_sqlite() {
    person_scores_follow_account_computed_traits_without_a_write_of_the_person(&sqlite().await)
        .await;
}

#[tokio::test]
async fn person_scores_follow_account_computed_traits_without_a_write_of_the_person_on_postgres() {
    let backend = postgres().await;
    person_scores_follow_account_computed_traits_without_a_write_of_the_person(&backend).await;
    backend.db.close().await;
}

/// Fails to score the accounts when `bad` is among them.
const FAILS_ON_BAD: ScoreAccountsWith = ScoreAccountsWith(|account, _, _| {
    if account.account_id == "bad" {
        return Err(ProfileError::BadScores("bad".into()));
    }
    Ok(Vec::new())
});

/// An account whose refresh keeps failing goes to the back of the queue and does not hold up
/// the accounts queued after it.
async fn a_failing_account_refresh_does_not_hold_up_the_queue(store: &dyn ProfileStore) {
    let calls = vec![
        group_call("g1", "p1", 1, "bad", "finance", json!({"industry": "x"})),
        group_call("g2", "p2", 2, "acme", "finance", json!({"industry": "y"})),
    ];
    for call in calls {
        let batch = Batch {
            merges: vec![],
            events: vec![call],
        };
        store.apply(&batch, H, NOW, &NoScores).await.unwrap();
    }
    assert!(
        store
            .refresh_accounts(1, H, NOW, &FAILS_ON_BAD)
            .await
            .is_err()
    );
    assert_eq!(
        store.defer_account_refresh(NOW).await.unwrap().as_deref(),
        Some("bad")
    );
    let acme = store
        .refresh_accounts(1, H, NOW, &FAILS_ON_BAD)
        .await
        .unwrap()
        .expect("acme's refresh");
    assert_eq!(acme.named, ["p2"]);
    assert!(
        store
            .refresh_accounts(1, H, NOW, &FAILS_ON_BAD)
            .await
            .is_err()
    );
    assert!(
        store
            .refresh_accounts(1, H, NOW, &NoScores)
            .await
            .unwrap()
            .is_some(),
        "still queued"
    );
    assert!(
        store
            .refresh_accounts(1, H, NOW, &NoScores)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_failing_account_refresh_does_not_hold_up_the_queue_on_sqlite() {
    a_failing_account_refresh_does_not_hold_up_the_queue(&*sqlite().await.store).await;
}

#[tokio::test]
async fn a_failing_account_refresh_does_not_hold_up_the_queue_on_postgres() {
    let backend = postgres().await;
    a_failing_account_refresh_does_not_hold_up_the_queue(&*backend.store).await;
    backend.db.close().await;
}

/// Holds the scoring of the account `held` until released, saying when it got there.
struct HoldAccount {
    held: &'static str,
    reached: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
}

#[async_trait::async_trait]
impl Scorer for HoldAccount {
    async fn score(
        &self,
        profiles: &[&Profile],
        _accounts: &store::Accounts,
        _now: OffsetDateTime,
    ) -> Result<Vec<Vec<Score>>, ProfileError> {
        Ok(vec![Vec::new(); profiles.len()])
    }

    async fn score_accounts(
        &self,
        accounts: &[(
            tessera_profile::account::Account,
            Vec<tessera_profile::account::Member>,
        )],
        _now: OffsetDateTime,
    ) -> Result<Option<Vec<Vec<Score>>>, ProfileError> {
        if accounts.iter().any(|(a, _)| a.account_id == self.held) {
            self.reached.notify_one();
            self.release.notified().await;
        }
        Ok(Some(vec![Vec::new(); accounts.len()]))
    }
}

/// Two replicas refresh two queued accounts side by side: while one holds the oldest
/// account's refresh open, the other takes the next account instead of finding nothing.
#[tokio::test]
async fn replicas_refresh_different_accounts_side_by_side_on_postgres() {
    let backend = postgres().await;
    let store = backend.store.clone();
    for call in [
        group_call("g1", "p1", 1, "first", "finance", json!({"industry": "x"})),
        group_call("g2", "p2", 2, "second", "finance", json!({"industry": "y"})),
    ] {
        let batch = Batch {
            merges: vec![],
            events: vec![call],
        };
        store.apply(&batch, H, NOW, &NoScores).await.unwrap();
    }
    let reached = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let holding = {
        let store = store.clone();
        let scorer = HoldAccount {
            held: "first",
            reached: reached.clone(),
            release: release.clone(),
        };
        tokio::spawn(async move { store.refresh_accounts(1, H, NOW, &scorer).await })
    };
    reached.notified().await;
    let other = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store.refresh_accounts(1, H, NOW, &NoScores),
    )
    .await
    .expect("not blocked by the other refresh")
    .unwrap()
    .expect("the second account's refresh");
    assert_eq!(other.named, ["p2"]);
    release.notify_one();
    let first = holding
        .await
        .unwrap()
        .unwrap()
        .expect("the first account's refresh");
    assert_eq!(first.named, ["p1"]);
    assert!(
        store
            .refresh_accounts(1, H, NOW, &NoScores)
            .await
            .unwrap()
            .is_none()
    );
    backend.db.close().await;
}

/// Scores each account `orders_30d` with its account computed trait of that name (as a
/// trait), -1 without one.
const ORDERS_30D: ScoreAccountsWith = ScoreAccountsWith(|account, _, now| {
    let orders = account
        .traits
        .get("orders_30d")
        .and_then(|t| t.value.as_f64())
        .unwrap_or(-1.0);
    Ok(vec![Score {
        name: "orders_30d".to_owned(),
        value: orders,
        computed_at: now,
        model_version: String::new(),
        factors: Vec::new(),
    }])
});

/// An account whose windowed computed trait changes with time alone is rescored when its value
/// expires, with no new event: the sweep queues it (once) and the account refresh rescores it,
/// at a new version; the members' copies and the audiences reading them follow by the same
/// refresh (members' person plans may read the value too), so the members' own sweep finds
/// nothing left to do.
async fn account_scores_follow_windowed_computed_traits_as_time_passes(backend: &Backend) {
    let days = time::Duration::days;
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(
            vec![],
            Audiences::compile(vec![Audience {
                name: "busy".into(),
                condition: Condition::Account(Test {
                    name: "orders_30d".into(),
                    op: Op::Gte,
                    value: json!(2),
                }),
            }])
            .unwrap(),
        )
        .with_account_computed(vec![ComputedTrait {
            name: "orders_30d".into(),
            kind: Kind::Count,
            events: vec!["Order Completed".into()],
            types: vec![],
            property: None,
            window_seconds: Some(30 * 86_400),
        }]),
    );
    // An order `ago` days before NOW.
    let order = |id: &str, profile: &str, ago: i64| {
        let mut e = tracked(id, profile, 0, "Order Completed", json!({}));
        e.timestamp = NOW - days(ago);
        e
    };
    // Every queued refresh, as the sweeper takes them.
    let refresh = |now: OffsetDateTime| {
        let store = store.clone();
        async move {
            while store
                .refresh_accounts(1, H, now, &ORDERS_30D)
                .await
                .unwrap()
                .is_some()
            {}
        }
    };
    let acme = || {
        let store = store.clone();
        async move {
            let acme = store.account("acme").await.unwrap().expect("acme");
            (
                acme.scores["orders_30d"].value,
                acme.version,
                acme.updated_at,
            )
        }
    };
    let computed = |at: OffsetDateTime| {
        let store = store.clone();
        async move {
            store.account_computed("acme", at).await.unwrap()["orders_30d"]
                .value
                .as_i64()
        }
    };
    let batch = Batch {
        merges: vec![],
        events: vec![
            group_call("g1", "p1", 0, "acme", "finance", json!({})),
            group_call("g2", "p2", 1, "acme", "champion", json!({})),
            order("o1", "p1", 20),
            order("o2", "p2", 10),
        ],
    };
    store.apply(&batch, H, NOW, &ORDERS_30D).await.unwrap();
    refresh(NOW).await;
    let (score, version, _) = acme().await;
    assert_eq!(score, 2.0);
    assert_eq!(computed(NOW).await, Some(2));
    assert_eq!(
        store.audience_members("busy", None, 10).await.unwrap().0,
        ["p1", "p2"]
    );
    assert!(
        store.expire_accounts(NOW, 10).await.unwrap().is_empty(),
        "nothing left its window yet"
    );

    // Ann's order leaves the 30-day window: acme is queued once and rescored, with no event.
    let later = NOW + days(10) + time::Duration::minutes(1);
    assert!(
        store
            .expire_accounts(later - time::Duration::minutes(2), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.expire_accounts(later, 10).await.unwrap(), ["acme"]);
    assert!(
        store.expire_accounts(later, 10).await.unwrap().is_empty(),
        "queued once"
    );
    assert_eq!(computed(later).await, Some(1));
    refresh(later).await;
    let (score, rescored, updated_at) = acme().await;
    assert_eq!(score, 1.0, "rescored without a new event");
    assert!(rescored > version, "a new version of the account");
    assert_eq!(updated_at, later);

    // The members' copies and the audience reading them followed with the refresh.
    assert!(
        store
            .audience_members("busy", None, 10)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    let (swept, _) = store.sweep(later, 10).await.unwrap();
    assert!(
        swept.is_empty(),
        "the refresh brought the members up to date"
    );
    let p1 = store.get("p1").await.unwrap().expect("p1");
    assert_eq!(
        p1.state.computed.account_traits().collect::<Vec<_>>(),
        [("acme", &json!({"orders_30d": 1}))]
    );

    // Bob's order leaves too; then nothing is left to expire.
    let last = NOW + days(20) + time::Duration::minutes(1);
    assert_eq!(store.expire_accounts(last, 10).await.unwrap(), ["acme"]);
    refresh(last).await;
    assert_eq!(acme().await.0, 0.0);
    assert!(
        store
            .expire_accounts(last + days(365), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn account_scores_follow_windowed_computed_traits_as_time_passes_on_sqlite() {
    account_scores_follow_windowed_computed_traits_as_time_passes(&sqlite().await).await;
}

#[tokio::test]
async fn account_scores_follow_windowed_computed_traits_as_time_passes_on_postgres() {
    let backend = postgres().await;
    account_scores_follow_windowed_computed_traits_as_time_passes(&backend).await;
    backend.db.close().await;
}

/// A store migrated up to `version` only (on Postgres or SQLite), as a deployment was before
/// the later migrations.
async fn migrated_to(postgres: bool, version: i64) -> Backend {
    let (db, pg, lite) = if postgres {
        let test_db = TestDb::new().await;
        let db = Database::connect(test_db.url(), SCHEMA, &DbSettings::default())
            .await
            .unwrap();
        (db, Some(test_db), None)
    } else {
        let dir = TestSqlite::new();
        let db = Database::connect(&dir.url("profile.db"), SCHEMA, &DbSettings::default())
            .await
            .unwrap();
        (db, None, Some(dir))
    };
    let backend = Backend {
        store: store::open(db.clone()),
        db,
        _pg: pg,
        _lite: lite,
    };
    backend.migrate_to(version).await;
    backend
}

impl Backend {
    /// Runs the migrations up to `version`.
    async fn migrate_to(&self, version: i64) {
        match &self.db {
            Database::Postgres(pool) => MIGRATIONS.postgres.run_to(version, pool).await.unwrap(),
            Database::Sqlite(pool) => MIGRATIONS.sqlite.run_to(version, pool).await.unwrap(),
        }
    }
}

/// Accounts scored before `accounts.computed_valid_until` existed hold NULL there: the upgrade
/// (migration 0019) makes each due once, so the next sweep queues a rescore of every one of
/// them (also of one with nothing to expire), the rescore stores the real next time, and no
/// account is taken again after; an account created after the upgrade is not taken either.
async fn accounts_from_before_their_expiry_time_are_rescored_once(postgres: bool) {
    let days = time::Duration::days;
    let backend = migrated_to(postgres, 18).await;
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(vec![], Audiences::default())
            .with_account_computed(vec![order_count("orders_30d", Some(30 * 86_400))]),
    );
    let refresh = |now: OffsetDateTime| {
        let store = store.clone();
        async move {
            drain_account_refreshes(&*store, now, &ORDERS_30D).await;
        }
    };
    let account = |id: &'static str| {
        let store = store.clone();
        async move {
            let account = store.account(id).await.unwrap().expect("an account");
            (
                account.scores["orders_30d"].value,
                account.version,
                account.updated_at,
            )
        }
    };
    // acme with an order 20 days ago, globex with none (nothing to expire).
    let mut order = tracked("o1", "p1", 0, "Order Completed", json!({}));
    order.timestamp = NOW - days(20);
    let batch = Batch {
        merges: vec![],
        events: vec![
            group_call("g1", "p1", 0, "acme", "finance", json!({})),
            group_call("g2", "p2", 1, "globex", "champion", json!({})),
            order,
        ],
    };
    store.apply(&batch, H, NOW, &ORDERS_30D).await.unwrap();
    refresh(NOW).await;
    assert_eq!(account("acme").await.0, 1.0);
    // Scored before migration 0017: nothing stored about when.
    let clear = "UPDATE accounts SET computed_valid_until = NULL";
    match &backend.db {
        Database::Postgres(pool) => sqlx::query(clear).execute(pool).await.map(|_| ()),
        Database::Sqlite(pool) => sqlx::query(clear).execute(pool).await.map(|_| ()),
    }
    .unwrap();
    let later = NOW + days(11);
    assert!(
        store.expire_accounts(later, 10).await.unwrap().is_empty(),
        "without the upgrade, o1 leaving its window goes unnoticed"
    );

    // Up to the backfill only: a later migration changing a column's type (0022) fails the
    // statements this pool prepared before it, where a deployment restarts its replicas.
    backend.migrate_to(19).await;
    let (_, acme_version, _) = account("acme").await;
    let (_, globex_version, _) = account("globex").await;
    assert_eq!(
        store.expire_accounts(later, 10).await.unwrap(),
        ["acme", "globex"],
        "every account from before is due"
    );
    assert!(
        store.expire_accounts(later, 10).await.unwrap().is_empty(),
        "queued once"
    );
    refresh(later).await;
    let (score, version, updated_at) = account("acme").await;
    assert_eq!(score, 0.0, "rescored: o1 left its window");
    assert!(version > acme_version);
    assert_eq!(updated_at, later);
    let (score, version, updated_at) = account("globex").await;
    assert_eq!(score, 0.0);
    assert!(version > globex_version, "rescored too");
    assert_eq!(updated_at, later);

    // An account created after the upgrade holds NULL (nothing to expire) and is not taken;
    // nor are the rescored ones again, however late.
    let batch = Batch {
        merges: vec![],
        events: vec![group_call("g3", "p3", 2, "initech", "finance", json!({}))],
    };
    store.apply(&batch, H, later, &ORDERS_30D).await.unwrap();
    refresh(later).await;
    assert!(
        store
            .expire_accounts(later + days(365), 10)
            .await
            .unwrap()
            .is_empty()
    );
    backend.db.close().await;
}

#[tokio::test]
async fn accounts_from_before_their_expiry_time_are_rescored_once_on_sqlite() {
    accounts_from_before_their_expiry_time_are_rescored_once(false).await;
}

#[tokio::test]
async fn accounts_from_before_their_expiry_time_are_rescored_once_on_postgres() {
    accounts_from_before_their_expiry_time_are_rescored_once(true).await;
}

/// Without account computed traits the upgrade's one rescore of each account is harmless: the
/// account is rescored once (its scores as before), then never taken again.
async fn accounts_from_before_their_expiry_time_without_computed_traits(postgres: bool) {
    let backend = migrated_to(postgres, 18).await;
    let store = &backend.store;
    let batch = Batch {
        merges: vec![],
        events: vec![group_call(
            "g1",
            "p1",
            0,
            "acme",
            "finance",
            json!({"industry": "software"}),
        )],
    };
    store.apply(&batch, H, NOW, &COVERAGE).await.unwrap();
    let before = store.account("acme").await.unwrap().expect("acme");
    // Up to the backfill only: a later migration changing a column's type (0022) fails the
    // statements this pool prepared before it, where a deployment restarts its replicas.
    backend.migrate_to(19).await;
    let later = NOW + time::Duration::days(1);
    assert_eq!(store.expire_accounts(later, 10).await.unwrap(), ["acme"]);
    drain_account_refreshes(store.as_ref(), later, &COVERAGE).await;
    let after = store.account("acme").await.unwrap().expect("acme");
    assert_eq!(
        after.scores["coverage"].value,
        before.scores["coverage"].value
    );
    assert_eq!(after.traits, before.traits);
    assert!(
        store
            .expire_accounts(later + time::Duration::days(365), 10)
            .await
            .unwrap()
            .is_empty(),
        "not taken again"
    );
    backend.db.close().await;
}

#[tokio::test]
async fn accounts_from_before_their_expiry_time_without_computed_traits_on_sqlite() {
    accounts_from_before_their_expiry_time_without_computed_traits(false).await;
}

#[tokio::test]
async fn accounts_from_before_their_expiry_time_without_computed_traits_on_postgres() {
    accounts_from_before_their_expiry_time_without_computed_traits(true).await;
}

/// Fails to score a batch of persons that holds `p0700`.
struct FailsOnP0700;

#[async_trait::async_trait]
impl Scorer for FailsOnP0700 {
    async fn score(
        &self,
        profiles: &[&Profile],
        _accounts: &store::Accounts,
        _now: OffsetDateTime,
    ) -> Result<Vec<Vec<Score>>, ProfileError> {
        if profiles.iter().any(|p| p.profile_id == "p0700") {
            return Err(ProfileError::BadScores("p0700".into()));
        }
        Ok(vec![Vec::new(); profiles.len()])
    }
}

/// An account larger than one chunk is refreshed a chunk of members per transaction, each
/// resuming after the last member done; a chunk that fails leaves the rest queued where it
/// stood (deferring keeps its place), and in the end every member is up to date.
async fn a_large_account_is_refreshed_a_chunk_at_a_time(backend: &Backend) {
    const CHUNK: usize = store::MEMBERS_PER_REFRESH;
    let size = 2 * CHUNK + 10;
    let store = store::open_with(
        backend.db.clone(),
        store::Definitions::new(
            vec![],
            Audiences::compile(vec![Audience {
                name: "software".into(),
                condition: Condition::Account(Test {
                    name: "industry".into(),
                    op: Op::Eq,
                    value: json!("Software"),
                }),
            }])
            .unwrap(),
        ),
    );
    let id = |i: usize| format!("p{i:04}");
    let joins = (0..size)
        .map(|i| group_call(&format!("g{i}"), &id(i), 0, "acme", "user", json!({})))
        .collect();
    let batch = Batch {
        merges: vec![],
        events: joins,
    };
    store.apply(&batch, H, NOW, &NoScores).await.unwrap();
    assert!(
        store
            .refresh_accounts(1, H, NOW, &NoScores)
            .await
            .unwrap()
            .is_none()
    );
    let in_software = || {
        let store = store.clone();
        async move { store.audience_members("software", None, 1).await.unwrap().1 }
    };

    // p0000 makes acme a software company: in at once, the others chunk by chunk.
    let batch = Batch {
        merges: vec![],
        events: vec![group_call(
            "g-sw",
            &id(0),
            1,
            "acme",
            "user",
            json!({"industry": "Software"}),
        )],
    };
    store.apply(&batch, H, NOW, &NoScores).await.unwrap();
    assert_eq!(in_software().await, 1);
    let first = store
        .refresh_accounts(1, H, NOW, &FailsOnP0700)
        .await
        .unwrap()
        .expect("the first chunk");
    assert_eq!(first.named, (0..CHUNK).map(id).collect::<Vec<_>>());
    assert_eq!(in_software().await, CHUNK as i64);

    // The second chunk fails: rolled back, the rest still queued where it stood.
    assert!(
        store
            .refresh_accounts(1, H, NOW, &FailsOnP0700)
            .await
            .is_err()
    );
    assert_eq!(in_software().await, CHUNK as i64);
    assert_eq!(
        store.defer_account_refresh(NOW).await.unwrap().as_deref(),
        Some("acme")
    );
    let second = store
        .refresh_accounts(1, H, NOW, &NoScores)
        .await
        .unwrap()
        .expect("the second chunk");
    assert_eq!(second.named, (CHUNK..2 * CHUNK).map(id).collect::<Vec<_>>());
    let third = store
        .refresh_accounts(1, H, NOW, &NoScores)
        .await
        .unwrap()
        .expect("the last chunk");
    assert_eq!(third.named, (2 * CHUNK..size).map(id).collect::<Vec<_>>());
    assert!(
        store
            .refresh_accounts(1, H, NOW, &NoScores)
            .await
            .unwrap()
            .is_none(),
        "done"
    );
    assert_eq!(in_software().await, size as i64);
    for i in [0, CHUNK - 1, CHUNK, 700, size - 1] {
        let member = store.get(&id(i)).await.unwrap().expect("member");
        assert_eq!(
            member.state.computed.account_traits().collect::<Vec<_>>(),
            [("acme", &json!({"industry": "Software"}))],
            "{}",
            id(i)
        );
    }
}

#[tokio::test]
async fn a_large_account_is_refreshed_a_chunk_at_a_time_on_sqlite() {
    a_large_account_is_refreshed_a_chunk_at_a_time(&sqlite().await).await;
}

#[tokio::test]
async fn a_large_account_is_refreshed_a_chunk_at_a_time_on_postgres() {
    let backend = postgres().await;
    a_large_account_is_refreshed_a_chunk_at_a_time(&backend).await;
    backend.db.close().await;
}
