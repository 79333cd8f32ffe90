//! Splitting an identifier off its profile and erasing one (GDPR), on both backends: the
//! component is replayed under the new constraint, the graph is rewritten, and the constraint
//! holds for every event that comes after.

use std::collections::{HashMap, HashSet};

use tessera_core::Identifier;
use tessera_identity::domain::Constraints;
use tessera_identity::{Identity, IdentityError, Rewritten};
use tessera_store::Database;
use uuid::Uuid;

use crate::support::{Backend, lookup, resolve};

on_every_backend!(
    a_detached_identifier_keeps_its_own_events_and_links_alone,
    erasing_a_bridging_identifier_splits_the_profile_and_forgets_it,
    erasing_an_identifier_no_profile_holds_still_suppresses_it,
    an_erased_identifier_another_person_dropped_never_links_on_their_replay,
);

/// A kiosk's device id fused two people and the kiosk's own browsing into one profile. Split
/// off, the device keeps the profile it created and the events it carried alone; Ann and Bob
/// each get the events that carried their identifiers; later events that carry the device with
/// another identifier leave it out (rule `detached`).
async fn a_detached_identifier_keeps_its_own_events_and_links_alone(b: &Backend) {
    let id = &b.identity;
    let kiosk = resolve(id, "e1", &[("device_id", "kiosk")])
        .await
        .profile_id;
    resolve(id, "e2", &[("device_id", "kiosk"), ("user_id", "ann")]).await;
    resolve(id, "e3", &[("device_id", "kiosk"), ("email", "bob@x.io")]).await;
    resolve(id, "e4", &[("device_id", "kiosk")]).await;
    resolve(id, "e5", &[("user_id", "ann")]).await;
    assert_eq!(lookup(id, "email", "bob@x.io").await, kiosk, "one blob");

    let split = id
        .detach_identifier(Identifier::new("device_id", " kiosk "), "shared kiosk")
        .await
        .expect("detach");
    assert_eq!(split.root, Some(kiosk));
    assert_eq!(split.profile, Some(kiosk), "the device keeps its profile");
    assert_eq!(lookup(id, "device_id", "kiosk").await, kiosk);
    let ann = lookup(id, "user_id", "ann").await;
    let bob = lookup(id, "email", "bob@x.io").await;
    assert!(ann != bob && ann != kiosk && bob != kiosk, "three people");
    assert_eq!(
        sides(&split),
        HashMap::from([
            ("e1", kiosk),
            ("e2", ann),
            ("e3", bob),
            ("e4", kiosk),
            ("e5", ann)
        ]),
        "no event lost, each where it belongs"
    );
    assert_eq!(split.events_moved(), 3);
    assert!(
        split.profiles.contains(&(ann, ann)) && split.profiles.contains(&(bob, bob)),
        "the profile service hears of the new profiles: {:?}",
        split.profiles
    );

    // Stored resolutions answer the new graph, and the device links alone from now on.
    let e2 = resolve(id, "e2", &[]).await;
    assert_eq!(e2.profile_id, ann);
    assert_eq!(e2.dropped[0].reason, "detached");
    let later = resolve(id, "e6", &[("device_id", "kiosk"), ("user_id", "ann")]).await;
    assert_eq!(later.profile_id, ann);
    assert!(later.merges.is_empty());
    assert_eq!(
        later.dropped[0].identifier,
        Identifier::new("device_id", "kiosk")
    );
    assert_eq!(later.dropped[0].reason, "detached");
    assert_eq!(
        resolve(id, "e7", &[("device_id", "kiosk")])
            .await
            .profile_id,
        kiosk
    );

    let graph = id.profile_graph(kiosk, 100).await.expect("graph");
    let split_logged = graph
        .decisions
        .iter()
        .find(|d| d.kind == "split")
        .expect("the split is logged");
    assert_eq!(split_logged.rule, "detach");
    assert_eq!(
        split_logged.identifier,
        Some(Identifier::new("device_id", "kiosk"))
    );
    let detached = Constraints {
        detached: HashSet::from([Identifier::new("device_id", "kiosk")]),
        ..Constraints::default()
    };
    for profile in [kiosk, ann, bob] {
        assert_replays_under(id, profile, &detached).await;
    }

    assert!(matches!(
        id.detach_identifier(Identifier::new("device_id", "unknown"), "x")
            .await,
        Err(IdentityError::NotFound)
    ));
}

/// The GDPR golden scenario: a phone number bridged Ann's email and a second device. Erased, it
/// is gone from the graph, the graph log (a pseudonym replaces it), the sightings and every
/// resolution; the profile it alone bridged splits in two; the event that carried only the
/// phone is erased; and the phone never links again.
async fn erasing_a_bridging_identifier_splits_the_profile_and_forgets_it(b: &Backend) {
    let id = &b.identity;
    let ann = resolve(id, "e1", &[("anonymous_id", "a1"), ("email", "ann@x.io")])
        .await
        .profile_id;
    let second = resolve(
        id,
        "e2",
        &[("anonymous_id", "a2"), ("phone", "+1 415 555 0100")],
    )
    .await
    .profile_id;
    resolve(id, "e3", &[("email", "ann@x.io"), ("phone", "4155550100")]).await;
    resolve(id, "e4", &[("phone", "+14155550100")]).await;
    assert_eq!(lookup(id, "anonymous_id", "a2").await, ann, "bridged");
    assert!(
        phone_mentions(&b.db).await[0] > 0,
        "before: the log holds it"
    );

    let erased = id
        .erase_identifier(Identifier::new("phone", "(415) 555-0100"), "GDPR ticket 42")
        .await
        .expect("erase");
    assert_eq!(erased.root, Some(ann));
    assert_eq!(erased.profile, None);
    assert_eq!(erased.erased_events, ["e4"]);
    assert!(matches!(
        id.lookup(Identifier::new("phone", "+14155550100")).await,
        Err(IdentityError::NotFound)
    ));
    assert_eq!(lookup(id, "email", "ann@x.io").await, ann);
    assert_eq!(
        lookup(id, "anonymous_id", "a2").await,
        second,
        "split apart"
    );
    assert_eq!(
        sides(&erased),
        HashMap::from([("e1", ann), ("e2", second), ("e3", ann)])
    );
    assert!(
        erased
            .events
            .iter()
            .all(|(_, _, ids)| ids.iter().all(|i| i.kind != "phone")),
        "no event links the phone"
    );
    assert_eq!(
        phone_mentions(&b.db).await,
        [0, 0],
        "nothing in the graph log or the resolutions holds the number"
    );
    assert_eq!(value_rows(&b.db, "+14155550100").await, 0);

    // The erased event is no longer resolved; the phone never links again and is not named.
    let e3 = resolve(id, "e3", &[]).await;
    assert!(e3.identifiers.iter().all(|i| i.kind != "phone"));
    assert!(e3.dropped.is_empty(), "{:?}", e3.dropped);
    let later = resolve(
        id,
        "e5",
        &[("phone", "+14155550100"), ("anonymous_id", "a2")],
    )
    .await;
    assert_eq!(later.profile_id, second);
    assert_eq!(later.identifiers, [Identifier::new("anonymous_id", "a2")]);
    assert!(later.dropped.is_empty());
    assert_eq!(value_rows(&b.db, "+14155550100").await, 0);
    assert!(matches!(
        id.lookup(Identifier::new("phone", "+14155550100")).await,
        Err(IdentityError::NotFound)
    ));
    let erase_logged = id
        .graph_log()
        .await
        .expect("log")
        .into_iter()
        .find(|d| d.rule == "erase")
        .expect("the erasure is logged");
    assert!(
        erase_logged
            .identifier
            .as_ref()
            .is_some_and(|i| i.value.starts_with("erased:")),
        "{erase_logged:?}"
    );
    let erased_phone = Constraints {
        erased: HashSet::from([Identifier::new("phone", "+14155550100")]),
        ..Constraints::default()
    };
    for profile in [ann, second] {
        assert_replays_under(id, profile, &erased_phone).await;
    }
}

/// A GDPR request may name an identifier Tessera never linked: it is remembered (as a digest)
/// and never links afterwards.
async fn erasing_an_identifier_no_profile_holds_still_suppresses_it(b: &Backend) {
    let id = &b.identity;
    let erased = id
        .erase_identifier(Identifier::new("email", "Cat@X.io"), "GDPR ticket 43")
        .await
        .expect("erase");
    assert_eq!(erased.root, None);
    assert!(erased.events.is_empty());
    let later = resolve(id, "e1", &[("email", "cat@x.io"), ("anonymous_id", "c1")]).await;
    assert_eq!(later.identifiers, [Identifier::new("anonymous_id", "c1")]);
    assert!(matches!(
        id.lookup(Identifier::new("email", "cat@x.io")).await,
        Err(IdentityError::NotFound)
    ));
    assert_eq!(value_rows(&b.db, "cat@x.io").await, 0);
    assert!(matches!(
        id.erase_identifier(Identifier::new("email", "null"), "blocked")
            .await,
        Err(IdentityError::NotFound)
    ));
}

/// Bob's event carried Ann's email, which merge protection kept out of his profile (it names
/// the email among its dropped identifiers). Once the email is erased, Bob's event stops naming
/// it, and a later rewrite of Bob's component (here: his anonymous id split off) does not link
/// the now ownerless email to Bob: replays read the erased set.
async fn an_erased_identifier_another_person_dropped_never_links_on_their_replay(b: &Backend) {
    let id = &b.identity;
    let ann = resolve(id, "e1", &[("user_id", "ann"), ("email", "ann@x.io")])
        .await
        .profile_id;
    let bob = resolve(id, "e2", &[("user_id", "bob"), ("anonymous_id", "b1")])
        .await
        .profile_id;
    let shared = resolve(id, "e3", &[("user_id", "bob"), ("email", "ann@x.io")]).await;
    assert_eq!(shared.profile_id, bob);
    assert!(
        shared
            .dropped
            .iter()
            .any(|d| d.identifier == Identifier::new("email", "ann@x.io")),
        "{shared:?}"
    );
    let mentions = "SELECT count(*) FROM resolutions WHERE CAST(detail AS TEXT) LIKE '%ann@x.io%'";
    assert_eq!(count(&b.db, mentions).await, 2, "Ann's and Bob's events");

    id.erase_identifier(Identifier::new("email", "ann@x.io"), "GDPR ticket 44")
        .await
        .expect("erase");
    assert_eq!(
        count(&b.db, mentions).await,
        0,
        "no event names it any more"
    );
    assert_eq!(lookup(id, "user_id", "ann").await, ann);

    // Data written before erases scrubbed other people's events still names it: put the
    // email back among e3's dropped identifiers, so the replay meets it.
    let reason = shared
        .dropped
        .iter()
        .find(|d| d.identifier.kind == "email")
        .map(|d| d.reason.clone())
        .expect("dropped");
    assert!(
        reason.starts_with("limit:"),
        "a rule a replay re-decides: {reason}"
    );
    let dropped = format!(r#"[{{"type": "email", "value": "ann@x.io", "reason": "{reason}"}}]"#);
    let restore = match b.db {
        Database::Postgres(_) => format!(
            "UPDATE resolutions SET detail = jsonb_set(detail, '{{dropped}}', '{dropped}') \
             WHERE event_id = 'e3'"
        ),
        Database::Sqlite(_) => format!(
            "UPDATE resolutions SET detail = json_set(detail, '$.dropped', json('{dropped}')) \
             WHERE event_id = 'e3'"
        ),
    };
    exec(&b.db, &restore).await;
    assert_eq!(count(&b.db, mentions).await, 1);

    id.detach_identifier(Identifier::new("anonymous_id", "b1"), "shared browser")
        .await
        .expect("detach");
    assert!(
        matches!(
            id.lookup(Identifier::new("email", "ann@x.io")).await,
            Err(IdentityError::NotFound)
        ),
        "the erased email links to no one"
    );
    assert_eq!(lookup(id, "user_id", "bob").await, bob);
    assert_eq!(value_rows(&b.db, "ann@x.io").await, 0);
}

/// Each event of a rewritten component and its profile now.
fn sides(rewritten: &Rewritten) -> HashMap<&str, Uuid> {
    rewritten
        .events
        .iter()
        .map(|(event, profile, _)| (event.as_str(), *profile))
        .collect()
}

/// Graph log entries and resolutions that mention the test phone number.
async fn phone_mentions(db: &Database) -> [i64; 2] {
    let (log, resolutions) = (
        "SELECT count(*) FROM graph_log WHERE id_value = '+14155550100'",
        "SELECT count(*) FROM resolutions WHERE CAST(detail AS TEXT) LIKE '%14155550100%' \
         AND (SELECT count(*) FROM identifiers WHERE value = '+14155550100') = 0",
    );
    [count(db, log).await, count(db, resolutions).await]
}

/// Rows of the identifiers, sightings and graph log that hold `value`.
async fn value_rows(db: &Database, value: &str) -> i64 {
    let mut total = 0;
    for table in ["identifiers", "sightings"] {
        total += count(
            db,
            &format!("SELECT count(*) FROM {table} WHERE value = '{value}'"),
        )
        .await;
    }
    total
        + count(
            db,
            &format!("SELECT count(*) FROM graph_log WHERE id_value = '{value}'"),
        )
        .await
}

async fn exec(db: &Database, sql: &str) {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match db {
        Database::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
        Database::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
    }
    .expect("exec");
}

async fn count(db: &Database, sql: &str) -> i64 {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match db {
        Database::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        Database::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
    }
    .expect("count")
}

/// Checks that the stored graph of `profile`'s component is what replaying its stored history
/// under `constraints` gives: the rewrite wrote back a consistent graph.
async fn assert_replays_under(id: &Identity, profile: Uuid, constraints: &Constraints) {
    let history = id.component_history(profile).await.expect("history");
    let replayed = tessera_identity::domain::replay(
        &id.rules().rules,
        &history.entries,
        constraints,
        time::OffsetDateTime::now_utc(),
        Uuid::now_v7,
    );
    assert!(replayed.erased_events.is_empty(), "nothing more to erase");
    for (identifier, owner) in &replayed.owners {
        assert_eq!(
            lookup(id, &identifier.kind, &identifier.value).await,
            *owner,
            "{identifier:?}"
        );
    }
}
