//! Forgetting a whole person (GDPR deletion, `ForgetProfile`) on both backends: every row about
//! the person's component goes, only digests of their identifiers stay, and later events that
//! carry them are suppressed or resolve without them.

use tessera_core::Identifier;
use tessera_identity::domain::{Constraints, Resolution};
use tessera_identity::{Forgotten, IdentityError};
use tessera_store::Database;
use tessera_testkit::people;
use uuid::Uuid;

use crate::support::{Backend, lookup, resolve};

on_every_backend!(
    forgetting_a_merged_person_leaves_no_row_about_them,
    events_of_a_forgotten_person_are_suppressed_or_resolve_without_them,
    a_forget_waits_for_a_split_to_reach_the_profile_service,
);

/// Ann's identifiers as the graph holds them (normalized).
const ANN: [(&str, &str); 5] = [
    ("anonymous_id", "a1"),
    ("anonymous_id", "a2"),
    ("email", "ann@x.io"),
    ("user_id", "ann"),
    ("phone", "+14155550100"),
];

/// The people of both tests: Ann (two anonymous profiles merged when she logged in, with an
/// email and a phone), Carol (merged into Ann by hand, then split off again), and Bob, whose
/// event carried Ann's email without linking it. Ann is indexed for matching with a pending
/// suggestion against Bob.
struct People {
    ann: Uuid,
    ann_merged: Uuid,
    bob: Uuid,
    carol: Uuid,
}

async fn people(b: &Backend) -> People {
    let id = &b.identity;
    let ann = resolve(id, "e1", &[("anonymous_id", "a1")])
        .await
        .profile_id;
    let ann_merged = resolve(id, "e2", &[("anonymous_id", "a2"), ("email", "Ann@X.io")])
        .await
        .profile_id;
    let login = resolve(
        id,
        "e3",
        &[
            ("user_id", "ann"),
            ("anonymous_id", "a1"),
            ("email", "ann@x.io"),
        ],
    )
    .await;
    assert_eq!(login.merges.len(), 1, "{login:?}");
    resolve(
        id,
        "e4",
        &[("user_id", "ann"), ("phone", "+1 (415) 555-0100")],
    )
    .await;

    let carol = resolve(id, "e5", &[("anonymous_id", "k1")])
        .await
        .profile_id;
    id.merge_profiles((ann, carol), "looked alike")
        .await
        .expect("merge")
        .expect("merged");
    id.unmerge_profile(carol, "they were not")
        .await
        .expect("unmerge");
    // The outbox told the profile service (see the test of a split not yet delivered).
    deliver_outbox(&b.db).await;

    let bob = resolve(id, "e6", &[("user_id", "bob"), ("anonymous_id", "b1")])
        .await
        .profile_id;
    let shared = resolve(id, "e7", &[("user_id", "bob"), ("email", "ann@x.io")]).await;
    assert_eq!(shared.profile_id, bob);
    assert!(
        shared
            .dropped
            .iter()
            .any(|d| d.identifier == Identifier::new("email", "ann@x.io")),
        "Bob's event names Ann's email without linking it: {shared:?}"
    );

    id.match_profiles(vec![
        (ann, object(people::person(0))),
        (bob, object(people::person(1))),
    ])
    .await
    .expect("index");
    let (a, z) = if ann < bob { (ann, bob) } else { (bob, ann) };
    exec(
        &b.db,
        &format!(
            "INSERT INTO match_suggestions (profile_a, profile_b, explanation, status, created_at) \
             VALUES ('{a}', '{z}', '{{}}', 'open', {})",
            match b.db {
                Database::Postgres(_) => "now()",
                Database::Sqlite(_) => "0",
            }
        ),
    )
    .await;
    People {
        ann,
        ann_merged,
        bob,
        carol,
    }
}

/// Forgetting Ann by her merged profile deletes every row about her component in every table
/// of the graph, keeps only digests of her identifiers, pseudonymizes them elsewhere in the
/// graph log, answers the same when asked again, and leaves Bob and Carol as they were.
async fn forgetting_a_merged_person_leaves_no_row_about_them(b: &Backend) {
    let p = people(b).await;
    let id = &b.identity;
    let members = format!("'{}', '{}'", p.ann, p.ann_merged);
    let filled = [
        format!("SELECT count(*) FROM identifiers WHERE profile_id IN ({members})"),
        format!("SELECT count(*) FROM resolutions WHERE profile_id IN ({members})"),
        format!("SELECT count(*) FROM merges WHERE merged_profile_id IN ({members})"),
        format!("SELECT count(*) FROM match_attributes WHERE profile_id IN ({members})"),
        format!("SELECT count(*) FROM match_keys WHERE profile_id IN ({members})"),
        format!(
            "SELECT count(*) FROM match_suggestions \
             WHERE profile_a IN ({members}) OR profile_b IN ({members})"
        ),
        format!("SELECT count(*) FROM splits WHERE profile_b IN ({members})"),
        format!("SELECT count(*) FROM merge_outbox WHERE surviving_profile_id IN ({members})"),
        format!("SELECT count(*) FROM graph_log WHERE other_profile_id IN ({members})"),
        "SELECT count(*) FROM sightings WHERE type = 'email' AND value = 'ann@x.io'".to_owned(),
    ];
    for sql in filled {
        assert!(count(&b.db, &sql).await > 0, "the scenario fills: {sql}");
    }
    let bob_graph = id.profile_graph(p.bob, 1_000).await.expect("Bob's graph");
    let carol_graph = id
        .profile_graph(p.carol, 1_000)
        .await
        .expect("Carol's graph");

    let forgotten = id
        .forget_profile(p.ann_merged, "GDPR ticket 7")
        .await
        .expect("forget");
    let mut profiles = vec![p.ann, p.ann_merged];
    profiles.sort();
    assert_eq!(
        forgotten,
        Forgotten {
            root: p.ann,
            profiles,
            events: ["e1", "e2", "e3", "e4"].map(String::from).to_vec(),
            identifiers: 5,
        }
    );

    let after = [
        format!("SELECT count(*) FROM profiles WHERE profile_id IN ({members})"),
        format!("SELECT count(*) FROM profiles WHERE merged_into IN ({members})"),
        format!("SELECT count(*) FROM identifiers WHERE profile_id IN ({members})"),
        format!(
            "SELECT count(*) FROM merges \
             WHERE merged_profile_id IN ({members}) OR surviving_profile_id IN ({members})"
        ),
        format!(
            "SELECT count(*) FROM resolutions \
             WHERE profile_id IN ({members}) OR event_id IN ('e1', 'e2', 'e3', 'e4')"
        ),
        format!("SELECT count(*) FROM sightings WHERE profile_id IN ({members})"),
        format!("SELECT count(*) FROM match_attributes WHERE profile_id IN ({members})"),
        format!("SELECT count(*) FROM match_keys WHERE profile_id IN ({members})"),
        format!(
            "SELECT count(*) FROM match_suggestions \
             WHERE profile_a IN ({members}) OR profile_b IN ({members})"
        ),
        format!(
            "SELECT count(*) FROM splits WHERE profile_a IN ({members}) OR profile_b IN ({members})"
        ),
        format!(
            "SELECT count(*) FROM merge_outbox \
             WHERE surviving_profile_id IN ({members}) OR merged_profile_id IN ({members})"
        ),
        format!(
            "SELECT count(*) FROM graph_log \
             WHERE profile_id IN ({members}) OR other_profile_id IN ({members})"
        ),
    ];
    for sql in after {
        assert_eq!(count(&b.db, &sql).await, 0, "{sql}");
    }
    for (kind, value) in ANN {
        for sql in [
            format!("SELECT count(*) FROM identifiers WHERE type = '{kind}' AND value = '{value}'"),
            format!("SELECT count(*) FROM sightings WHERE type = '{kind}' AND value = '{value}'"),
            format!(
                "SELECT count(*) FROM detached_identifiers \
                 WHERE type = '{kind}' AND value = '{value}'"
            ),
            format!("SELECT count(*) FROM graph_log WHERE id_value = '{value}'"),
            format!(
                "SELECT count(*) FROM resolutions \
                 WHERE CAST(detail AS TEXT) LIKE '%\"{value}\"%'"
            ),
        ] {
            assert_eq!(count(&b.db, &sql).await, 0, "{sql}");
        }
        assert!(
            matches!(
                id.lookup(Identifier::new(kind, value)).await,
                Err(IdentityError::NotFound)
            ),
            "{kind} is forgotten"
        );
    }
    // Only digests stay: the values that name Ann suppress events, the shareable ids do not.
    let erased = format!(
        "SELECT count(*) FROM erased_identifiers WHERE {} AND reason = 'GDPR ticket 7'",
        match b.db {
            Database::Postgres(_) => "with_person",
            Database::Sqlite(_) => "with_person = 1",
        }
    );
    assert_eq!(count(&b.db, &erased).await, 5);
    let suppressing = format!(
        "SELECT count(*) FROM erased_identifiers WHERE {}",
        match b.db {
            Database::Postgres(_) => "suppresses",
            Database::Sqlite(_) => "suppresses = 1",
        }
    );
    assert_eq!(count(&b.db, &suppressing).await, 3, "user id, email, phone");
    assert_eq!(
        count(&b.db, "SELECT count(*) FROM forgotten_profiles").await,
        2
    );
    assert!(matches!(
        id.profile_graph(p.ann, 10).await,
        Err(IdentityError::UnknownProfile)
    ));
    assert!(matches!(
        id.component_history(p.ann_merged).await,
        Err(IdentityError::UnknownProfile)
    ));

    // Asked again, by either profile: the same answer, nothing more changes.
    let counts = b.counts().await;
    for profile in [p.ann, p.ann_merged] {
        assert_eq!(
            id.forget_profile(profile, "again").await.expect("again"),
            forgotten
        );
    }
    assert_eq!(b.counts().await, counts);
    assert!(matches!(
        id.forget_profile(Uuid::now_v7(), "nobody").await,
        Err(IdentityError::UnknownProfile)
    ));

    // Bob and Carol are untouched, but for Ann's email gone from Bob's event.
    assert_eq!(lookup(id, "user_id", "bob").await, p.bob);
    assert_eq!(lookup(id, "anonymous_id", "b1").await, p.bob);
    assert_eq!(lookup(id, "anonymous_id", "k1").await, p.carol);
    let e7 = resolve(id, "e7", &[]).await;
    assert_eq!(e7.profile_id, p.bob);
    assert!(e7.dropped.is_empty(), "{:?}", e7.dropped);
    let bob_now = id.profile_graph(p.bob, 1_000).await.expect("Bob's graph");
    assert_eq!(bob_now.identifiers, bob_graph.identifiers);
    assert_eq!(bob_now.decisions.len(), bob_graph.decisions.len());
    let renamed: Vec<_> = bob_now
        .decisions
        .iter()
        .zip(&bob_graph.decisions)
        .filter(|(now, then)| now != then)
        .collect();
    assert_eq!(
        renamed.len(),
        1,
        "only the drop of Ann's email: {renamed:?}"
    );
    let (now, then) = renamed[0];
    assert_eq!(then.identifier, Some(Identifier::new("email", "ann@x.io")));
    assert!(
        now.identifier
            .as_ref()
            .is_some_and(|i| i.kind == "email" && i.value.starts_with("erased:")),
        "a pseudonym instead: {now:?}"
    );
    let carol_now = id
        .profile_graph(p.carol, 1_000)
        .await
        .expect("Carol's graph");
    assert_eq!(carol_now.identifiers, carol_graph.identifiers);
    assert_eq!(
        count(
            &b.db,
            &format!(
                "SELECT count(*) FROM match_attributes WHERE profile_id = '{}'",
                p.bob
            )
        )
        .await,
        1
    );
    // A replay of Bob's component does not bring Ann's email back.
    let history = id.component_history(p.bob).await.expect("history");
    let replayed = tessera_identity::domain::replay(
        &id.rules().rules,
        &history.entries,
        &Constraints::default(),
        time::OffsetDateTime::now_utc(),
        Uuid::now_v7,
    );
    assert!(
        !replayed
            .owners
            .contains_key(&Identifier::new("email", "ann@x.io"))
    );
}

/// After Ann is forgotten: her user id, email or phone suppress any event that carries them,
/// whatever else it carries (nothing is created or written, and asking again answers the
/// same); her anonymous id alone suppresses too; with a fresh user id it is left out and the
/// event resolves to a new profile.
async fn events_of_a_forgotten_person_are_suppressed_or_resolve_without_them(b: &Backend) {
    let p = people(b).await;
    let id = &b.identity;
    id.forget_profile(p.ann, "GDPR ticket 8")
        .await
        .expect("forget");
    let counts = b.counts().await;
    let log = count(&b.db, "SELECT count(*) FROM graph_log").await;
    let sightings = count(&b.db, "SELECT count(*) FROM sightings").await;

    let suppressed: [(&str, &[(&str, &str)]); 6] = [
        ("e10", &[("user_id", "ann"), ("anonymous_id", "fresh")]),
        ("e11", &[("email", " ANN@x.io "), ("device_id", "d-new")]),
        ("e12", &[("phone", "4155550100"), ("anonymous_id", "b1")]),
        ("e13", &[("anonymous_id", "a1")]),
        ("e14", &[("anonymous_id", "a2"), ("user_id", "null")]),
        // An event of Ann's delivered again after she was forgotten.
        (
            "e3",
            &[
                ("user_id", "ann"),
                ("anonymous_id", "a1"),
                ("email", "ann@x.io"),
            ],
        ),
    ];
    for _ in 0..2 {
        for (event, ids) in suppressed {
            let r = resolve(id, event, ids).await;
            assert_suppressed(&r, event);
        }
    }
    assert_eq!(b.counts().await, counts, "nothing created or stored");
    assert_eq!(count(&b.db, "SELECT count(*) FROM graph_log").await, log);
    assert_eq!(
        count(&b.db, "SELECT count(*) FROM sightings").await,
        sightings
    );
    for (kind, value) in [("anonymous_id", "fresh"), ("device_id", "d-new")] {
        assert!(matches!(
            id.lookup(Identifier::new(kind, value)).await,
            Err(IdentityError::NotFound)
        ));
    }
    assert_eq!(
        lookup(id, "anonymous_id", "b1").await,
        p.bob,
        "Bob untouched"
    );

    // In one batch with ordinary records, each keeps its place.
    let rules = id.rules();
    let batch = id
        .resolve(vec![
            crate::support::record_under(&rules.rules, "e20", &[("user_id", "bob")]),
            crate::support::record_under(&rules.rules, "e21", &[("user_id", "ann")]),
            crate::support::record_under(&rules.rules, "e22", &[("anonymous_id", "c2")]),
        ])
        .await
        .expect("batch");
    assert_eq!(batch[0].profile(), Some(p.bob));
    assert_suppressed(&batch[1], "e21");
    assert!(batch[2].profile().is_some_and(|new| new != p.bob));

    let fresh = resolve(id, "e30", &[("anonymous_id", "a1"), ("user_id", "newbie")]).await;
    assert!(!fresh.suppressed);
    assert!(
        ![p.ann, p.ann_merged, p.bob, p.carol].contains(&fresh.profile_id),
        "a new profile"
    );
    assert_eq!(fresh.identifiers, [Identifier::new("user_id", "newbie")]);
    assert!(fresh.dropped.is_empty(), "the erased id is not named");
    assert_eq!(lookup(id, "user_id", "newbie").await, fresh.profile_id);
    assert!(matches!(
        id.lookup(Identifier::new("anonymous_id", "a1")).await,
        Err(IdentityError::NotFound)
    ));
    assert_eq!(
        resolve(id, "e30", &[]).await.profile_id,
        fresh.profile_id,
        "stored as usual"
    );

    // Ann's identifiers stay out of replays of the new profile's component.
    let history = id
        .component_history(fresh.profile_id)
        .await
        .expect("history");
    let replayed = tessera_identity::domain::replay(
        &id.rules().rules,
        &history.entries,
        &Constraints::default(),
        time::OffsetDateTime::now_utc(),
        Uuid::now_v7,
    );
    assert_eq!(
        replayed.owners.keys().collect::<Vec<_>>(),
        [&Identifier::new("user_id", "newbie")]
    );
}

/// A split not yet delivered to the profile service still shows the two people as one
/// profile there, so forgetting one of them now would delete the other's data (or keep the
/// forgotten person's): the forget waits until the outbox has delivered the split, changing
/// nothing meanwhile, then forgets only its own side.
async fn a_forget_waits_for_a_split_to_reach_the_profile_service(b: &Backend) {
    let id = &b.identity;
    let dan = resolve(id, "d1", &[("user_id", "dan"), ("anonymous_id", "d-a")])
        .await
        .profile_id;
    let eve = resolve(id, "d2", &[("email", "eve@x.io")]).await.profile_id;
    id.merge_profiles((dan, eve), "looked alike")
        .await
        .expect("merge")
        .expect("merged");
    deliver_outbox(&b.db).await;
    id.unmerge_profile(eve, "they were not")
        .await
        .expect("unmerge");
    let pending = "SELECT count(*) FROM merge_outbox WHERE delivered_at IS NULL";
    assert_eq!(count(&b.db, pending).await, 1, "the split is queued");

    let started = std::time::Instant::now();
    let forget = tokio::spawn({
        let id = id.clone();
        async move { id.forget_profile(dan, "GDPR ticket 9").await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert!(!forget.is_finished(), "the forget waits for the split");
    assert_eq!(
        lookup(id, "user_id", "dan").await,
        dan,
        "nothing forgotten yet"
    );
    deliver_outbox(&b.db).await;
    let forgotten = tokio::time::timeout(std::time::Duration::from_secs(5), forget)
        .await
        .expect("the forget goes on once the split is delivered")
        .expect("task")
        .expect("forget");
    assert!(started.elapsed() >= std::time::Duration::from_millis(800));
    assert_eq!(forgotten.profiles, [dan]);
    assert!(matches!(
        id.lookup(Identifier::new("user_id", "dan")).await,
        Err(IdentityError::NotFound)
    ));
    assert_eq!(lookup(id, "email", "eve@x.io").await, eve, "Eve stays");
}

/// Marks every queued merge and split delivered, as the outbox does once the profile service
/// has applied them.
async fn deliver_outbox(db: &Database) {
    exec(
        db,
        &format!(
            "UPDATE merge_outbox SET delivered_at = {} WHERE delivered_at IS NULL",
            match db {
                Database::Postgres(_) => "now()",
                Database::Sqlite(_) => "1",
            }
        ),
    )
    .await;
}

fn assert_suppressed(r: &Resolution, event: &str) {
    assert_eq!(r.event_id, event);
    assert!(r.suppressed, "{event} is suppressed: {r:?}");
    assert_eq!(r.profile(), None);
    assert!(r.identifiers.is_empty() && r.merges.is_empty() && r.dropped.is_empty());
}

fn object(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    value.as_object().cloned().unwrap_or_default()
}

async fn count(db: &Database, sql: &str) -> i64 {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match db {
        Database::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        Database::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
    }
    .unwrap_or_else(|e| panic!("count: {e}"))
}

async fn exec(db: &Database, sql: &str) {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match db {
        Database::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
        Database::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
    }
    .unwrap_or_else(|e| panic!("exec: {e}"))
}
