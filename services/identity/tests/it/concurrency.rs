//! Two replicas on one Postgres database, many tasks resolving overlapping records at once: the
//! graph must end with exactly the partition a union-find over the records gives.

use std::collections::{BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tessera_core::Identifier;
use tessera_identity::domain::{Record, UnionFind};
use tessera_identity::{Identity, IdentitySettings};
use tessera_store::Database;
use tessera_testkit::TestDb;
use uuid::Uuid;

use crate::support::{connect, counts, lookup, record, resolve};

const TYPES: [&str; 4] = ["user_id", "anonymous_id", "email", "device_id"];
/// Rounds of records resolved all at once.
const ROUNDS: usize = 30;
/// Records per round.
const RECORDS_PER_ROUND: usize = 40;
/// Fresh identifiers per round: few, so that concurrent records keep colliding on them.
const FRESH_PER_ROUND: usize = 24;
/// Identifiers of earlier rounds mixed into each round, so old profiles merge too.
const OLD_PER_ROUND: usize = 4;

/// Rounds of records. Each round draws its records' identifiers from a small pool of fresh
/// identifiers plus a few of earlier rounds; some records also carry a blocked value, a few
/// carry nothing else.
fn random_rounds(rng: &mut StdRng) -> Vec<Vec<Record>> {
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let mut pool: Vec<(String, String)> = (0..FRESH_PER_ROUND)
            .map(|n| (TYPES[n % TYPES.len()].to_owned(), format!("r{round}-v{n}")))
            .collect();
        for _ in 0..OLD_PER_ROUND.min(seen.len()) {
            pool.push(seen[rng.random_range(0..seen.len())].clone());
        }
        seen.extend(pool.iter().cloned());
        let records = (0..RECORDS_PER_ROUND)
            .map(|n| {
                let mut ids: Vec<(&str, &str)> = (0..rng.random_range(1..=3))
                    .map(|_| {
                        let (kind, value) = &pool[rng.random_range(0..pool.len())];
                        (kind.as_str(), value.as_str())
                    })
                    .collect();
                if rng.random_ratio(1, 10) {
                    ids.push(("anonymous_id", "undefined"));
                }
                if rng.random_ratio(1, 40) {
                    ids = vec![("user_id", "null")];
                }
                record(&format!("r{round}-e{n}"), &ids)
            })
            .collect();
        rounds.push(records);
    }
    rounds
}

/// A replica on `db`; with `owners`, its owner cache on the test Redis under that prefix
/// (every replica of a test is given the same).
async fn replica(db: Database, settings: IdentitySettings, owners: Option<&str>) -> Identity {
    crate::support::open(db, settings, owners)
        .await
        .expect("identity")
}

/// `Some` prefix for the owner cache when `cached`.
fn owner_prefix(cached: bool) -> Option<String> {
    cached.then(tessera_testkit::redis_prefix)
}

async fn run(seed: u64, cached: bool) {
    let test = TestDb::new().await;
    let db = connect(test.url()).await;
    let owners = owner_prefix(cached);
    let replicas = [
        replica(db.clone(), linking_only(), owners.as_deref()).await,
        replica(connect(test.url()).await, linking_only(), owners.as_deref()).await,
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let rounds = random_rounds(&mut rng);

    for round in &rounds {
        // Small batches, some redelivered, shuffled, all sent at once to alternating replicas.
        let mut batches: Vec<Vec<Record>> = Vec::new();
        let mut start = 0;
        while start < round.len() {
            let end = (start + rng.random_range(1..=3)).min(round.len());
            batches.push(round[start..end].to_vec());
            start = end;
        }
        for _ in 0..3 {
            let i = rng.random_range(0..batches.len());
            batches.push(batches[i].clone());
        }
        batches.shuffle(&mut rng);
        let tasks: Vec<_> = batches
            .into_iter()
            .enumerate()
            .map(|(n, batch)| {
                let identity = replicas[n % 2].clone();
                tokio::spawn(async move { identity.resolve(batch).await })
            })
            .collect();
        for task in tasks {
            task.await.expect("task").expect("resolve");
        }
    }
    let records: Vec<Record> = rounds.into_iter().flatten().collect();

    let mut reference = UnionFind::new();
    for r in &records {
        reference.union_all(r.identifiers().iter().cloned());
    }
    let mut groups: HashMap<Uuid, BTreeSet<Identifier>> = HashMap::new();
    for identifier in records.iter().flat_map(|r| r.identifiers()) {
        let profile = lookup(&replicas[0], &identifier.kind, &identifier.value).await;
        groups
            .entry(profile)
            .or_default()
            .insert(identifier.clone());
    }
    let partition: BTreeSet<BTreeSet<Identifier>> = groups.into_values().collect();
    assert_eq!(partition, reference.partition(), "seed {seed}");

    // A new event per identifier (owners mostly read from the cache when it is on) answers
    // the identifier's profile.
    let identifiers: BTreeSet<&Identifier> = records.iter().flat_map(|r| r.identifiers()).collect();
    for (n, identifier) in identifiers.into_iter().enumerate() {
        let ids = [(identifier.kind.as_str(), identifier.value.as_str())];
        let answer = resolve(&replicas[n % 2], &format!("again-{n}"), &ids).await;
        assert_eq!(
            answer.profile_id,
            lookup(&replicas[0], &identifier.kind, &identifier.value).await,
            "seed {seed}, {identifier:?}"
        );
    }

    // Replaying everything answers each event with its identifiers' profile, creates nothing,
    // and gives every blocked-only event a profile of its own.
    let before = counts(&db).await;
    let again = records
        .iter()
        .flat_map(|r| r.identifiers())
        .collect::<BTreeSet<_>>()
        .len();
    assert_eq!(
        before[3],
        (records.len() + again) as i64,
        "one resolution per event"
    );
    let mut junk_profiles = BTreeSet::new();
    for chunk in records.chunks(500) {
        let answers = replicas[1].resolve(chunk.to_vec()).await.expect("replay");
        for (record, answer) in chunk.iter().zip(answers) {
            match record.identifiers().first() {
                Some(i) => assert_eq!(
                    answer.profile_id,
                    lookup(&replicas[0], &i.kind, &i.value).await,
                    "seed {seed}, {}",
                    record.event_id()
                ),
                None => assert!(junk_profiles.insert(answer.profile_id), "seed {seed}"),
            }
        }
    }
    assert_eq!(
        counts(&db).await,
        before,
        "seed {seed}: a replay writes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_agree_with_a_union_find() {
    for seed in [7, 2026] {
        run(seed, false).await;
    }
}

/// The same with the owner cache on both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_with_the_owner_cache_agree_with_a_union_find() {
    run(11, true).await;
}

/// Another writer merges a profile while a resolution waits for that profile's lock: the
/// resolution must retry against the new graph rather than merge a profile that is no longer
/// canonical.
/// Events take no advisory lock of their own: one event given to two replicas at once is
/// resolved once, whether the two runs queue on shared identifiers, carry none (every value
/// blocked) or carry different ones (as under changed rules). The loser meets the winner's
/// resolution (a primary key violation, retried, or a read under the shared locks) and
/// answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_event_resolved_by_two_replicas_at_once_is_resolved_once() {
    let violations = || {
        let text = tessera_server::metrics_handle().render();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(r#"tessera_identity_retries_total{reason="unique violation"} "#)
            })
            .map_or(0, |n| n.trim().parse::<u64>().expect("a counter"))
    };
    let before = violations();
    let test = TestDb::new().await;
    let db = connect(test.url()).await;
    let replicas = [
        replica(db.clone(), IdentitySettings::default(), None).await,
        replica(connect(test.url()).await, IdentitySettings::default(), None).await,
    ];
    const EVENTS: usize = 20;
    let shapes: [[&[(&str, &str)]; 2]; 3] = [
        [&[("user_id", "same")], &[("user_id", "same")]],
        [&[("user_id", "null")], &[("anonymous_id", "undefined")]],
        [&[("user_id", "left")], &[("anonymous_id", "right")]],
    ];
    for (s, shape) in shapes.iter().enumerate() {
        for n in 0..EVENTS {
            let event = format!("shape{s}-e{n}");
            // Fresh identifiers per event for the last shape, so each is a new profile.
            let ids: Vec<Vec<(String, String)>> = shape
                .iter()
                .map(|ids| {
                    ids.iter()
                        .map(|(k, v)| {
                            let v = if s == 2 {
                                format!("{v}{n}")
                            } else {
                                (*v).to_owned()
                            };
                            ((*k).to_owned(), v)
                        })
                        .collect()
                })
                .collect();
            let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
            let tasks: Vec<_> = ids
                .into_iter()
                .zip(replicas.iter().cloned())
                .map(|(ids, identity)| {
                    let (event, barrier) = (event.clone(), barrier.clone());
                    tokio::spawn(async move {
                        let ids: Vec<(&str, &str)> =
                            ids.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                        let r = record(&event, &ids);
                        barrier.wait().await;
                        identity.resolve(vec![r]).await
                    })
                })
                .collect();
            let mut answers = Vec::new();
            for task in tasks {
                answers.push(task.await.expect("task").expect("resolve").remove(0));
            }
            assert_eq!(
                answers[0].profile_id, answers[1].profile_id,
                "{event}: both replicas answer the one stored resolution"
            );
        }
    }
    let [profiles, _, merges, resolutions] = counts(&db).await;
    assert_eq!(resolutions, (3 * EVENTS) as i64, "one resolution per event");
    // "same" is one profile; each blocked-only event one; each left/right event one.
    assert_eq!(
        profiles,
        (1 + 2 * EVENTS) as i64,
        "no profile of a lost run is kept"
    );
    assert_eq!(merges, 0);
    // The runs without a shared identifier really raced (40 chances; 36-39 in practice).
    assert!(violations() > before, "a lost race is retried, not failed");
}

#[tokio::test]
async fn a_profile_merged_while_waiting_for_its_lock_is_retried() {
    let test = TestDb::new().await;
    let db = connect(test.url()).await;
    let identity = Identity::new(db.clone(), linking_only())
        .await
        .expect("identity");
    let oldest = resolve(&identity, "e1", &[("user_id", "oldest")])
        .await
        .profile_id;
    let older = resolve(&identity, "e2", &[("user_id", "older")])
        .await
        .profile_id;
    let young = resolve(&identity, "e3", &[("user_id", "young")])
        .await
        .profile_id;
    let Database::Postgres(pool) = &db else {
        panic!("a Postgres database");
    };

    // The other writer merges `young` into `older` and holds both rows until it commits.
    let mut other = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM profiles WHERE profile_id = ANY($1) ORDER BY profile_id FOR UPDATE")
        .bind(vec![older, young])
        .execute(&mut *other)
        .await
        .expect("lock");
    sqlx::query("UPDATE profiles SET merged_into = $1, merged_at = now() WHERE profile_id = $2")
        .bind(older)
        .bind(young)
        .execute(&mut *other)
        .await
        .expect("merge");
    sqlx::query(
        "INSERT INTO merges (surviving_profile_id, merged_profile_id, cause_event_id, merged_at) \
         VALUES ($1, $2, 'other', now())",
    )
    .bind(older)
    .bind(young)
    .execute(&mut *other)
    .await
    .expect("log merge");

    // A record linking `young` and `oldest` reads `young` as canonical and waits for its lock.
    let waiting = tokio::spawn({
        let identity = identity.clone();
        async move {
            identity
                .resolve(vec![record(
                    "e4",
                    &[("user_id", "young"), ("user_id", "oldest")],
                )])
                .await
        }
    });
    let mut waited = 0;
    loop {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity");
        if blocked > 0 {
            break;
        }
        waited += 1;
        assert!(
            waited < 1_000,
            "the resolution never waited for the profile lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    other.commit().await.expect("commit");

    let resolution = waiting.await.expect("task").expect("resolve").remove(0);
    assert_eq!(resolution.profile_id, oldest);
    let merged: Vec<Uuid> = resolution
        .merges
        .iter()
        .map(|m| m.merged_profile_id)
        .collect();
    assert_eq!(
        merged,
        [older],
        "the survivor of `young` is merged, not `young` again"
    );
    for value in ["oldest", "older", "young"] {
        assert_eq!(lookup(&identity, "user_id", value).await, oldest);
    }
}

/// Settings whose rules only link, so the graph must equal a union-find of the records.
fn linking_only() -> IdentitySettings {
    IdentitySettings {
        rules: tessera_identity::domain::RulesConfig::linking_only(),
        ..IdentitySettings::default()
    }
}

/// One replica unmerges while another keeps resolving events that carry the component's
/// identifiers: every resolution either happened before the unmerge (and was replayed by it) or
/// after (and read the rewritten graph), so the stored graph and every stored resolution end
/// exactly as a replay of the component's history gives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmerge_racing_resolutions_leaves_a_consistent_graph() {
    unmerge_racing_resolutions(false).await;
}

/// The same with the owner cache on both replicas: no resolution after the unmerge takes an
/// owner it retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmerge_racing_cached_resolutions_leaves_a_consistent_graph() {
    unmerge_racing_resolutions(true).await;
}

async fn unmerge_racing_resolutions(cached: bool) {
    let test = TestDb::new().await;
    let owners = owner_prefix(cached);
    let settings = IdentitySettings::default;
    let one = replica(connect(test.url()).await, settings(), owners.as_deref()).await;
    let two = replica(connect(test.url()).await, settings(), owners.as_deref()).await;
    let laptop = resolve(&one, "e1", &[("anonymous_id", "laptop")])
        .await
        .profile_id;
    let tablet = resolve(
        &one,
        "e2",
        &[("anonymous_id", "tablet"), ("email", "t@x.io")],
    )
    .await
    .profile_id;
    resolve(&one, "e3", &[("anonymous_id", "laptop"), ("user_id", "u1")]).await;
    resolve(&one, "e4", &[("anonymous_id", "tablet"), ("user_id", "u1")]).await;
    assert_eq!(lookup(&one, "email", "t@x.io").await, laptop, "merged");

    let writer = {
        let two = two.clone();
        tokio::spawn(async move {
            for n in 0..60 {
                let ids: &[(&str, &str)] = match n % 3 {
                    0 => &[("anonymous_id", "tablet")],
                    1 => &[("email", "t@x.io"), ("phone", "+14155550100")],
                    _ => &[("user_id", "u1")],
                };
                resolve(&two, &format!("w{n}"), ids).await;
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    one.unmerge_profile(tablet, "shared tablet")
        .await
        .expect("unmerge");
    writer.await.expect("writer");

    assert_eq!(lookup(&two, "anonymous_id", "tablet").await, tablet);
    assert_eq!(lookup(&two, "user_id", "u1").await, laptop);
    for profile in [laptop, tablet] {
        let history = one.component_history(profile).await.expect("history");
        let replayed = tessera_identity::domain::replay(
            &one.rules().rules,
            &history.entries,
            &tessera_identity::domain::Constraints {
                forbidden: vec![(tablet, laptop)],
                ..Default::default()
            },
            time::OffsetDateTime::now_utc(),
            Uuid::now_v7,
        );
        for (identifier, owner) in &replayed.owners {
            assert_eq!(
                lookup(&one, &identifier.kind, &identifier.value).await,
                *owner,
                "{identifier:?}"
            );
        }
        for (event, owner) in &replayed.events {
            let stored = resolve(&one, event, &[]).await;
            assert_eq!(stored.profile_id, *owner, "event {event}");
        }
    }
}

/// Two replicas forget the same person while a third task keeps resolving events that carry
/// the person's identifiers (with fresh ones): each such event is either resolved before the
/// forget (and is among the events it forgot) or suppressed after it, both forgets answer the
/// same, and nothing about the person is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forget_racing_resolutions_and_another_forget_leaves_nothing() {
    let test = TestDb::new().await;
    let db = connect(test.url()).await;
    let one = Identity::new(db.clone(), IdentitySettings::default())
        .await
        .expect("identity");
    let two = Identity::new(connect(test.url()).await, IdentitySettings::default())
        .await
        .expect("identity");
    let ann = resolve(&one, "e1", &[("anonymous_id", "a1"), ("user_id", "ann")])
        .await
        .profile_id;
    resolve(&one, "e2", &[("email", "ann@x.io"), ("anonymous_id", "a2")]).await;
    resolve(&one, "e3", &[("email", "ann@x.io"), ("user_id", "ann")]).await;

    let writer = {
        let two = two.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for n in 0..60 {
                let fresh = format!("fresh{n}");
                let ids: Vec<(&str, &str)> = match n % 3 {
                    0 => vec![("anonymous_id", "a1")],
                    1 => vec![("user_id", "ann"), ("anonymous_id", fresh.as_str())],
                    _ => vec![("email", "ann@x.io"), ("device_id", fresh.as_str())],
                };
                out.push(resolve(&two, &format!("w{n}"), &ids).await);
            }
            out
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let second = {
        let two = two.clone();
        tokio::spawn(async move { two.forget_profile(ann, "ticket 2").await })
    };
    let first = one.forget_profile(ann, "ticket 1").await.expect("forget");
    let second = second.await.expect("task").expect("second forget");
    assert_eq!(first, second, "one forget, answered twice");
    let resolved = writer.await.expect("writer");

    for r in &resolved {
        if r.suppressed {
            assert!(!first.events.contains(&r.event_id), "{}", r.event_id);
        } else {
            assert_eq!(r.profile_id, ann, "{r:?}");
            assert!(
                first.events.contains(&r.event_id),
                "{} forgotten",
                r.event_id
            );
        }
    }
    assert_eq!(counts(&db).await, [0, 0, 0, 0], "nothing about Ann is left");
    let Database::Postgres(pool) = &db else {
        panic!("postgres")
    };
    for table in ["sightings", "graph_log", "merge_outbox"] {
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(pool)
                .await
                .expect("count");
        assert_eq!(n, 0, "{table}");
    }
    // Everything the writer sends from now on is suppressed.
    for n in 0..3 {
        assert!(
            resolve(&two, &format!("late{n}"), &[("user_id", "ann")])
                .await
                .suppressed
        );
    }
}

/// The advisory lock key the Postgres store takes for an identifier: FNV-1a over
/// `identifier`, the type and the value, each followed by a NUL (pinned by the store's
/// `lock_keys_are_pinned_and_separate_parts`).
fn identifier_key(kind: &str, value: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [b"identifier".as_slice(), kind.as_bytes(), value.as_bytes()] {
        for byte in part.iter().chain([&0u8]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// Waits until some session of the test database waits for an advisory lock.
async fn until_waiting_for_advisory_lock(pool: &sqlx::PgPool) {
    for _ in 0..1_000 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event = 'advisory'",
        )
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("nobody waited for an advisory lock");
}

fn timed(event: &str, seconds: i64, ids: &[(&str, &str)]) -> Record {
    Record::new(
        &tessera_identity::domain::Rules::default(),
        event,
        ids.iter().map(|(k, v)| Identifier::new(*k, *v)).collect(),
        time::OffsetDateTime::UNIX_EPOCH
            + time::Duration::days(20_000)
            + time::Duration::seconds(seconds),
    )
    .expect("valid record")
}

/// Ann (10 s) then Bob (20 s, with his email) on one TV: a closure of two profiles.
/// Returns Bob's email, chosen so that its lock sorts after the smaller of Ann's and Bob's.
async fn ann_and_bob_on_a_tv(identity: &Identity) -> String {
    let (ann, bob) = (
        identifier_key("user_id", "ann"),
        identifier_key("user_id", "bob"),
    );
    let email = (0..)
        .map(|n| format!("bob{n}@x.io"))
        .find(|e| identifier_key("email", e) > ann.min(bob))
        .expect("an email");
    identity
        .resolve(vec![timed(
            "ann",
            10,
            &[("user_id", "ann"), ("device_id", "tv")],
        )])
        .await
        .expect("ann");
    identity
        .resolve(vec![timed(
            "bob",
            20,
            &[("user_id", "bob"), ("device_id", "tv"), ("email", &email)],
        )])
        .await
        .expect("bob");
    email
}

/// Holds the advisory locks of Ann's and Bob's user ids in a transaction of its own, as a
/// writer of the closure would.
async fn hold_ann_and_bob(pool: &sqlx::PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut other = pool.begin().await.expect("begin");
    let mut keys = vec![
        identifier_key("user_id", "ann"),
        identifier_key("user_id", "bob"),
    ];
    keys.sort_unstable();
    sqlx::query("SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) AS k")
        .bind(keys)
        .execute(&mut *other)
        .await
        .expect("lock");
    other
}

/// The event ids of the splits in the merge outbox, by split.
async fn split_events(pool: &sqlx::PgPool) -> Vec<BTreeSet<String>> {
    let payloads: Vec<String> = sqlx::query_scalar(
        "SELECT payload::text FROM merge_outbox WHERE rule = 'split' ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .expect("outbox");
    payloads
        .iter()
        .map(|p| {
            let json: serde_json::Value = serde_json::from_str(p).expect("payload");
            json["events"]
                .as_array()
                .expect("events")
                .iter()
                .map(|e| e[0].as_str().expect("event id").to_owned())
                .collect()
        })
        .collect()
}

/// A late record's closure grows between the moment it is followed and the moment it is
/// locked: Cat's claim on the TV at 5 s arrives after Ann's and Bob's and must re-resolve
/// their closure; while it waits for the lock of one of its identifiers, another replica
/// commits Dan's event with Bob's email (a new profile that dropped the email: now part of the
/// closure). The re-resolution must follow the closure again under its locks and replay Dan's
/// event too, not only the components it found before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closure_extended_before_its_locks_is_replayed_whole() {
    let test = TestDb::new().await;
    let db = connect(test.url()).await;
    let one = Identity::new(db.clone(), IdentitySettings::default())
        .await
        .expect("identity");
    let two = Identity::new(connect(test.url()).await, IdentitySettings::default())
        .await
        .expect("identity");
    let Database::Postgres(pool) = &db else {
        panic!("a Postgres database");
    };
    let email = ann_and_bob_on_a_tv(&one).await;
    let other = hold_ann_and_bob(pool).await;

    let late = tokio::spawn({
        let one = one.clone();
        async move {
            one.resolve(vec![timed(
                "cat",
                5,
                &[("user_id", "cat"), ("device_id", "tv")],
            )])
            .await
        }
    });
    // Cat's run has followed its closure (Ann, Bob and its own profile) and waits for its
    // locks; meanwhile Dan's event joins the closure and commits.
    until_waiting_for_advisory_lock(pool).await;
    let dan = two
        .resolve(vec![timed(
            "dan",
            30,
            &[("user_id", "dan"), ("email", &email)],
        )])
        .await
        .expect("dan")
        .remove(0);
    assert_eq!(dan.dropped.len(), 1, "Bob's email stays Bob's: {dan:?}");
    other.commit().await.expect("commit");

    let cat = late.await.expect("task").expect("cat").remove(0);
    assert_eq!(
        lookup(&one, "device_id", "tv").await,
        cat.profile_id,
        "the earlier claim wins"
    );
    let splits = split_events(pool).await;
    assert_eq!(splits.len(), 1, "{splits:?}");
    let want: BTreeSet<String> = ["ann", "bob", "cat", "dan"].map(str::to_owned).into();
    assert_eq!(
        splits[0], want,
        "the replay covered the closure as it stood under its locks"
    );
    // The graph is what event-time order gives: Cat holds the TV, Bob his email, Dan himself.
    assert_eq!(
        lookup(&one, "email", &email).await,
        lookup(&one, "user_id", "bob").await
    );
    assert_ne!(
        lookup(&one, "user_id", "dan").await,
        lookup(&one, "user_id", "bob").await
    );
}

/// A late record's re-resolution deadlocks with another writer (it waits for a lock of its
/// closure the other holds, and the other then waits for the lock of its user id): Postgres
/// aborts the re-resolution's transaction (the other session's deadlock timeout is longer),
/// the store counts the retry (`reason="deadlock"`) and runs the records again, which then
/// succeeds; the caller sees only the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadlocked_reorder_is_retried() {
    let test = TestDb::new().await;
    let db = connect(test.url()).await;
    let one = Identity::new(db.clone(), IdentitySettings::default())
        .await
        .expect("identity");
    let Database::Postgres(pool) = &db else {
        panic!("a Postgres database");
    };
    ann_and_bob_on_a_tv(&one).await;
    let deadlocks = || {
        let text = tessera_server::metrics_handle().render();
        text.lines()
            .find_map(|l| l.strip_prefix(r#"tessera_identity_retries_total{reason="deadlock"} "#))
            .map_or(0, |n| n.trim().parse::<u64>().expect("a counter"))
    };
    let before = deadlocks();
    let mut other = hold_ann_and_bob(pool).await;
    sqlx::query("SET LOCAL deadlock_timeout = '30s'")
        .execute(&mut *other)
        .await
        .expect("deadlock_timeout");

    let late = tokio::spawn({
        let one = one.clone();
        async move {
            one.resolve(vec![timed(
                "cat",
                5,
                &[("user_id", "cat"), ("device_id", "tv")],
            )])
            .await
        }
    });
    until_waiting_for_advisory_lock(pool).await;
    // The other writer now waits for the lock Cat's run took on Cat's user id: a cycle.
    // Cat's session finds it after its deadlock timeout (1 s) and is rolled back.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(identifier_key("user_id", "cat"))
        .execute(&mut *other)
        .await
        .expect("the other writer is not the one rolled back");
    other.commit().await.expect("commit");

    let cat = late
        .await
        .expect("task")
        .expect("retried, then answered")
        .remove(0);
    assert_eq!(lookup(&one, "device_id", "tv").await, cat.profile_id);
    assert!(deadlocks() > before, "the deadlock is counted as a retry");
}
