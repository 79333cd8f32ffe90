//! The storage conformance suite: every test runs against SQLite and against Postgres.

use tessera_core::Identifier;
use tessera_identity::domain::Record;
use tessera_identity::{IdentityError, IdentitySettings};

use crate::support::{Backend, lookup, record, resolve};

on_every_backend!(
    unknown_identifiers_get_a_new_profile,
    anonymous_then_identify_is_one_profile,
    a_transitive_chain_merges_into_the_oldest,
    one_record_linking_three_profiles_merges_two,
    merged_away_identifiers_resolve_to_the_survivor,
    a_batch_answers_with_profiles_after_its_own_merges,
    replaying_events_answers_the_same_and_changes_nothing,
    emails_are_normalized,
    blocked_values_do_not_link_profiles,
    validation_and_not_found,
);

async fn unknown_identifiers_get_a_new_profile(b: &Backend) {
    let r1 = resolve(&b.identity, "e1", &[("user_id", "u1")]).await;
    let r2 = resolve(&b.identity, "e2", &[("user_id", "u2")]).await;
    assert_ne!(r1.profile_id, r2.profile_id);
    assert_eq!(
        r1.profile_id.get_version_num(),
        7,
        "profile ids are uuid v7"
    );
    assert_eq!(r1.event_id, "e1");
    assert_eq!(r1.identifiers, [Identifier::new("user_id", "u1")]);
    assert!(r1.merges.is_empty());
    assert_eq!(lookup(&b.identity, "user_id", "u1").await, r1.profile_id);
    assert_eq!(b.counts().await, [2, 2, 0, 2]);
}

async fn anonymous_then_identify_is_one_profile(b: &Backend) {
    let anon = resolve(&b.identity, "e1", &[("anonymous_id", "a1")]).await;
    let identify = resolve(
        &b.identity,
        "e2",
        &[("anonymous_id", "a1"), ("user_id", "u1")],
    )
    .await;
    let later = resolve(&b.identity, "e3", &[("user_id", "u1")]).await;
    assert_eq!(identify.profile_id, anon.profile_id);
    assert_eq!(later.profile_id, anon.profile_id);
    assert!(identify.merges.is_empty());
    assert_eq!(lookup(&b.identity, "user_id", "u1").await, anon.profile_id);
    assert_eq!(b.counts().await, [1, 2, 0, 3]);
}

async fn a_transitive_chain_merges_into_the_oldest(b: &Backend) {
    let oldest = resolve(&b.identity, "e1", &[("anonymous_id", "a1")]).await;
    let by_email = resolve(&b.identity, "e2", &[("email", "x@y.io")]).await;
    let by_user = resolve(&b.identity, "e3", &[("user_id", "u1")]).await;

    // a1 -- u1: the user's profile folds into the anonymous one, which is older.
    let link = resolve(
        &b.identity,
        "e4",
        &[("user_id", "u1"), ("anonymous_id", "a1")],
    )
    .await;
    assert_eq!(link.profile_id, oldest.profile_id);
    assert_eq!(link.merges.len(), 1);
    let merge = &link.merges[0];
    assert_eq!(merge.surviving_profile_id, oldest.profile_id);
    assert_eq!(merge.merged_profile_id, by_user.profile_id);
    assert_eq!(merge.cause_event_id, "e4");

    // u1 -- email, on another type: the email's profile joins the same survivor.
    let link = resolve(&b.identity, "e5", &[("email", "x@y.io"), ("user_id", "u1")]).await;
    assert_eq!(link.profile_id, oldest.profile_id);
    assert_eq!(link.merges.len(), 1);
    assert_eq!(link.merges[0].merged_profile_id, by_email.profile_id);
    assert_eq!(link.merges[0].surviving_profile_id, oldest.profile_id);

    for (kind, value) in [
        ("anonymous_id", "a1"),
        ("email", "x@y.io"),
        ("user_id", "u1"),
    ] {
        assert_eq!(lookup(&b.identity, kind, value).await, oldest.profile_id);
    }
    assert_eq!(b.counts().await, [3, 3, 2, 5]);
}

async fn one_record_linking_three_profiles_merges_two(b: &Backend) {
    let p1 = resolve(&b.identity, "e1", &[("device_id", "d1")]).await;
    let p2 = resolve(&b.identity, "e2", &[("phone", "+1 415 555 0100")]).await;
    let p3 = resolve(&b.identity, "e3", &[("user_id", "u1")]).await;
    let all = resolve(
        &b.identity,
        "e4",
        &[
            ("user_id", "u1"),
            ("phone", "+1 415 555 0100"),
            ("device_id", "d1"),
            ("email", "new@y.io"),
        ],
    )
    .await;
    assert_eq!(all.profile_id, p1.profile_id);
    let merged: Vec<_> = all.merges.iter().map(|m| m.merged_profile_id).collect();
    assert_eq!(
        merged,
        [p2.profile_id, p3.profile_id],
        "oldest merged profile first"
    );
    assert!(
        all.merges
            .iter()
            .all(|m| m.surviving_profile_id == p1.profile_id)
    );
    assert_eq!(
        lookup(&b.identity, "email", "new@y.io").await,
        p1.profile_id
    );
    assert_eq!(b.counts().await, [3, 4, 2, 4]);
}

async fn merged_away_identifiers_resolve_to_the_survivor(b: &Backend) {
    let oldest = resolve(&b.identity, "e0", &[("device_id", "d0")]).await;
    let old = resolve(&b.identity, "e1", &[("anonymous_id", "a1")]).await;
    let young = resolve(&b.identity, "e2", &[("user_id", "u1")]).await;
    resolve(
        &b.identity,
        "e3",
        &[("user_id", "u1"), ("anonymous_id", "a1")],
    )
    .await;
    assert_eq!(lookup(&b.identity, "user_id", "u1").await, old.profile_id);

    // The survivor is itself merged into an older profile: u1 -> young -> old -> oldest.
    let link = resolve(
        &b.identity,
        "e4",
        &[("anonymous_id", "a1"), ("device_id", "d0")],
    )
    .await;
    assert_eq!(link.profile_id, oldest.profile_id);
    assert_eq!(link.merges[0].merged_profile_id, old.profile_id);
    for (kind, value) in [
        ("anonymous_id", "a1"),
        ("user_id", "u1"),
        ("device_id", "d0"),
    ] {
        assert_eq!(lookup(&b.identity, kind, value).await, oldest.profile_id);
    }
    // Replaying the event that created the merged-away profile follows the chain too.
    let replay = resolve(&b.identity, "e2", &[("user_id", "u1")]).await;
    assert_ne!(young.profile_id, oldest.profile_id);
    assert_eq!(replay.profile_id, oldest.profile_id);
    assert_eq!(b.counts().await, [3, 3, 2, 5]);
}

async fn a_batch_answers_with_profiles_after_its_own_merges(b: &Backend) {
    let resolutions = b
        .identity
        .resolve(vec![
            record("e1", &[("anonymous_id", "a1")]),
            record("e2", &[("user_id", "u1")]),
            record("e3", &[("user_id", "u1"), ("anonymous_id", "a1")]),
            record("e4", &[("user_id", "u2")]),
        ])
        .await
        .expect("resolve");
    let profiles: Vec<_> = resolutions.iter().map(|r| r.profile_id).collect();
    assert_eq!(profiles[0], profiles[1]);
    assert_eq!(profiles[0], profiles[2]);
    assert_ne!(profiles[0], profiles[3]);
    assert_eq!(resolutions[2].merges.len(), 1);
    assert_eq!(resolutions[2].merges[0].surviving_profile_id, profiles[0]);
    let events: Vec<_> = resolutions.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(events, ["e1", "e2", "e3", "e4"], "request order");
}

async fn replaying_events_answers_the_same_and_changes_nothing(b: &Backend) {
    let batch = || {
        vec![
            record("e1", &[("anonymous_id", "a1")]),
            record("e2", &[("user_id", "u1")]),
            record("e3", &[("user_id", "u1"), ("anonymous_id", "a1")]),
            record("e4", &[("email", "z@y.io")]),
            record("e5", &[("anonymous_id", "guest")]),
        ]
    };
    let first = b.identity.resolve(batch()).await.expect("resolve");
    let counts = b.counts().await;
    assert_eq!(counts, [4, 3, 1, 5]);

    let again = b.identity.resolve(batch()).await.expect("replay");
    assert_eq!(again, first);
    assert_eq!(b.counts().await, counts);

    // A replay carrying other identifiers is still the stored answer, and links nothing.
    let odd = resolve(&b.identity, "e4", &[("email", "z@y.io"), ("user_id", "u1")]).await;
    assert_eq!(odd.profile_id, first[3].profile_id);
    assert!(odd.merges.is_empty());
    assert_eq!(b.counts().await, counts);
    assert_ne!(
        lookup(&b.identity, "email", "z@y.io").await,
        first[2].profile_id
    );

    // A batch mixing a replay with a new event: the replay is the stored answer and links
    // nothing (on Postgres its first attempt meets the stored resolution as a primary key
    // violation and is rolled back whole), the new event is resolved.
    let mixed = b
        .identity
        .resolve(vec![
            record("e7", &[("user_id", "u7")]),
            record("e4", &[("email", "z@y.io"), ("user_id", "u8")]),
        ])
        .await
        .expect("resolve");
    assert_eq!(mixed[1], first[3]);
    assert_ne!(mixed[0].profile_id, first[3].profile_id);
    assert_eq!(
        lookup(&b.identity, "user_id", "u7").await,
        mixed[0].profile_id
    );
    let [profiles, identifiers, merges, resolutions] = counts;
    let counts = [profiles + 1, identifiers + 1, merges, resolutions + 1];
    assert_eq!(b.counts().await, counts, "u8 is linked nowhere");

    // The same event twice in one batch: resolved once, answered twice.
    let dup = b
        .identity
        .resolve(vec![
            record("e6", &[("user_id", "u6")]),
            record("e6", &[("user_id", "u6")]),
        ])
        .await
        .expect("resolve");
    assert_eq!(dup[0], dup[1]);
    let [profiles, identifiers, merges, resolutions] = counts;
    assert_eq!(
        b.counts().await,
        [profiles + 1, identifiers + 1, merges, resolutions + 1]
    );
}

async fn emails_are_normalized(b: &Backend) {
    let first = resolve(&b.identity, "e1", &[("email", " Alice@Example.COM ")]).await;
    assert_eq!(
        first.identifiers,
        [Identifier::new("email", "alice@example.com")]
    );
    let second = resolve(
        &b.identity,
        "e2",
        &[("email", "alice@example.com"), ("user_id", "u1")],
    )
    .await;
    assert_eq!(second.profile_id, first.profile_id);
    assert!(second.merges.is_empty());
    assert_eq!(
        lookup(&b.identity, "email", "ALICE@example.com\n").await,
        first.profile_id
    );
    // Only emails are case-insensitive.
    assert!(matches!(
        b.identity.lookup(Identifier::new("user_id", "U1")).await,
        Err(IdentityError::NotFound)
    ));
    assert_eq!(b.counts().await, [1, 2, 0, 2]);
}

async fn blocked_values_do_not_link_profiles(b: &Backend) {
    let one = resolve(
        &b.identity,
        "e1",
        &[("anonymous_id", "null"), ("user_id", "u1")],
    )
    .await;
    let two = resolve(
        &b.identity,
        "e2",
        &[("anonymous_id", "NULL"), ("user_id", "u2")],
    )
    .await;
    assert_ne!(one.profile_id, two.profile_id);
    assert_eq!(one.identifiers, [Identifier::new("user_id", "u1")]);
    let three = resolve(
        &b.identity,
        "e3",
        &[("email", "test@test.com"), ("user_id", "u3")],
    )
    .await;
    let four = resolve(
        &b.identity,
        "e4",
        &[("email", "TEST@test.com"), ("user_id", "u4")],
    )
    .await;
    assert_ne!(three.profile_id, four.profile_id);

    // Only junk: the event still gets a profile, of its own, and keeps it on replay.
    let junk = resolve(
        &b.identity,
        "e5",
        &[("anonymous_id", "undefined"), ("device_id", "0000")],
    )
    .await;
    assert!(junk.identifiers.is_empty());
    let junk_too = resolve(&b.identity, "e6", &[("anonymous_id", "undefined")]).await;
    assert_ne!(junk.profile_id, junk_too.profile_id);
    for other in [&one, &two, &three, &four] {
        assert_ne!(junk.profile_id, other.profile_id);
    }
    assert_eq!(
        resolve(&b.identity, "e5", &[]).await.profile_id,
        junk.profile_id
    );

    assert!(matches!(
        b.identity
            .lookup(Identifier::new("anonymous_id", "null"))
            .await,
        Err(IdentityError::NotFound)
    ));
    assert_eq!(b.counts().await, [6, 4, 0, 6]);
}

async fn validation_and_not_found(b: &Backend) {
    assert!(matches!(
        b.identity
            .lookup(Identifier::new("user_id", "nobody"))
            .await,
        Err(IdentityError::NotFound)
    ));
    let Err(IdentityError::InvalidArgument(violations)) =
        b.identity.lookup(Identifier::new("User Id", "x")).await
    else {
        panic!("expected a validation error");
    };
    assert_eq!(violations[0].field, "identifier.type");

    let small = b
        .replica(IdentitySettings {
            max_batch: 2,
            ..IdentitySettings::default()
        })
        .await
        .expect("identity");
    let records: Vec<Record> = (0..3)
        .map(|n| record(&format!("e{n}"), &[("user_id", "u")]))
        .collect();
    assert!(matches!(
        small.resolve(records).await,
        Err(IdentityError::BatchTooLarge { len: 3, max: 2 })
    ));
    assert_eq!(
        b.counts().await,
        [0, 0, 0, 0],
        "a rejected batch writes nothing"
    );
}
