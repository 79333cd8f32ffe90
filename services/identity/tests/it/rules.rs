//! Golden scenarios of the identity rules, on both backends: normalization, merge protection,
//! limits, shared identifiers, custom types, the graph log and rule versions.

use std::collections::HashMap;

use tessera_core::Identifier;
use tessera_identity::domain::RulesConfig;
use tessera_identity::{Identity, IdentitySettings};
use uuid::Uuid;

use crate::support::{Backend, lookup, resolve};

/// Another replica (or a restart) on the backend's database, with `settings`.
async fn replica(b: &Backend, settings: IdentitySettings) -> Identity {
    b.replica(settings).await.expect("identity")
}

/// The default settings with the custom identifier type `crm_id` declared.
fn with_crm_id() -> IdentitySettings {
    IdentitySettings {
        rules: RulesConfig {
            custom_types: vec!["crm_id".into()],
            ..RulesConfig::default()
        },
        ..IdentitySettings::default()
    }
}

on_every_backend!(
    emails_and_phones_normalize_to_one_identifier,
    a_shared_device_without_logout_keeps_two_users_apart,
    a_generic_email_does_not_create_a_blob,
    a_limit_overflow_drops_the_lowest_priority_identifier,
    custom_types_link_when_declared,
    the_graph_log_derives_membership_and_names_causes,
    rules_are_versioned,
    a_profile_graph_explains_the_profile,
    manual_merges_obey_the_rules_and_are_logged,
    rules_updated_through_the_api_reach_every_replica_and_survive_restarts,
    rule_updates_are_checked_and_compare_and_set,
    a_stored_component_replays_to_the_stored_graph,
    profiles_split_apart_stay_apart,
    an_unmerge_restores_both_profiles_and_keeps_them_apart,
    an_unmerged_manual_merge_is_as_if_it_never_happened,
);

async fn emails_and_phones_normalize_to_one_identifier(b: &Backend) {
    let first = resolve(
        &b.identity,
        "e1",
        &[
            ("email", " Alice@Example.COM "),
            ("phone", "+1 (415) 555-0100"),
        ],
    )
    .await;
    let again = resolve(
        &b.identity,
        "e2",
        &[("email", "alice@example.com"), ("phone", "4155550100")],
    )
    .await;
    assert_eq!(again.profile_id, first.profile_id);
    assert!(again.merges.is_empty());
    assert_eq!(
        first.identifiers,
        [
            Identifier::new("email", "alice@example.com"),
            Identifier::new("phone", "+14155550100")
        ]
    );
    assert_eq!(
        lookup(&b.identity, "phone", "(415) 555-0100").await,
        first.profile_id
    );
    // A phone that does not parse links nothing, and says why.
    let bad = resolve(
        &b.identity,
        "e3",
        &[("user_id", "u9"), ("phone", "call me")],
    )
    .await;
    assert_eq!(bad.dropped[0].reason, "invalid_value");
}

async fn a_shared_device_without_logout_keeps_two_users_apart(b: &Backend) {
    let alice = resolve(
        &b.identity,
        "e1",
        &[("anonymous_id", "tablet"), ("user_id", "alice")],
    )
    .await;
    let bob = resolve(
        &b.identity,
        "e2",
        &[("anonymous_id", "tablet"), ("user_id", "bob")],
    )
    .await;
    assert_ne!(bob.profile_id, alice.profile_id, "two users never merge");
    assert_eq!(bob.dropped.len(), 1);
    assert_eq!(
        bob.dropped[0].identifier,
        Identifier::new("anonymous_id", "tablet")
    );
    assert_eq!(bob.dropped[0].reason, "limit:user_id");
    assert_eq!(
        lookup(&b.identity, "user_id", "alice").await,
        alice.profile_id
    );
    assert_eq!(lookup(&b.identity, "user_id", "bob").await, bob.profile_id);
    // Seen with two profiles, the tablet's id stopped linking: an email typed on it next goes
    // to a profile of its own, not Alice's.
    let typed = resolve(
        &b.identity,
        "e3",
        &[("anonymous_id", "tablet"), ("email", "c@x.io")],
    )
    .await;
    assert_eq!(typed.dropped[0].reason, "shared:anonymous_id");
    assert_ne!(typed.profile_id, alice.profile_id);
    assert_ne!(typed.profile_id, bob.profile_id);
    // Events with only the tablet's id still land on the profile holding it.
    let anonymous = resolve(&b.identity, "e4", &[("anonymous_id", "tablet")]).await;
    assert_eq!(anonymous.profile_id, alice.profile_id);
}

async fn a_generic_email_does_not_create_a_blob(b: &Backend) {
    let mut profiles = Vec::new();
    for n in 0..5 {
        let r = resolve(
            &b.identity,
            &format!("e{n}"),
            &[("user_id", &format!("u{n}")), ("email", "info@acme.io")],
        )
        .await;
        profiles.push(r.profile_id);
    }
    profiles.sort_unstable();
    profiles.dedup();
    assert_eq!(profiles.len(), 5, "five users, five profiles");
    // An anonymous visitor typing the generic address joins nobody.
    let visitor = resolve(
        &b.identity,
        "v",
        &[("anonymous_id", "v1"), ("email", "info@acme.io")],
    )
    .await;
    assert!(!profiles.contains(&visitor.profile_id));
    assert_eq!(visitor.dropped[0].reason, "shared:email");
}

async fn a_limit_overflow_drops_the_lowest_priority_identifier(b: &Backend) {
    let first = resolve(&b.identity, "e0", &[("user_id", "u1")]).await;
    for n in 1..=5 {
        let r = resolve(
            &b.identity,
            &format!("e{n}"),
            &[("user_id", "u1"), ("email", &format!("m{n}@x.io"))],
        )
        .await;
        assert!(r.dropped.is_empty(), "{n}: {:?}", r.dropped);
    }
    let sixth = resolve(
        &b.identity,
        "e6",
        &[("user_id", "u1"), ("email", "m6@x.io")],
    )
    .await;
    assert_eq!(sixth.profile_id, first.profile_id, "the event still lands");
    assert_eq!(
        sixth.dropped[0].identifier,
        Identifier::new("email", "m6@x.io")
    );
    assert_eq!(sixth.dropped[0].reason, "limit:email");
    assert!(
        b.identity
            .lookup(Identifier::new("email", "m6@x.io"))
            .await
            .is_err(),
        "the sixth email was not linked"
    );
    // Replaying the event answers the same, drops included.
    let replay = resolve(
        &b.identity,
        "e6",
        &[("user_id", "u1"), ("email", "m6@x.io")],
    )
    .await;
    assert_eq!(replay.dropped, sixth.dropped);
}

async fn custom_types_link_when_declared(b: &Backend) {
    let ignored = resolve(&b.identity, "e1", &[("user_id", "u1"), ("crm_id", "c-1")]).await;
    assert_eq!(ignored.dropped[0].reason, "unknown_type");
    let identity = replica(b, with_crm_id()).await;
    let linked = resolve(&identity, "e2", &[("user_id", "u1"), ("crm_id", " c-1 ")]).await;
    assert!(linked.dropped.is_empty());
    assert_eq!(lookup(&identity, "crm_id", "c-1").await, ignored.profile_id);
}

async fn the_graph_log_derives_membership_and_names_causes(b: &Backend) {
    resolve(&b.identity, "e1", &[("anonymous_id", "a1")]).await;
    resolve(
        &b.identity,
        "e2",
        &[("anonymous_id", "a2"), ("email", "x@y.io")],
    )
    .await;
    let merged = resolve(
        &b.identity,
        "e3",
        &[
            ("user_id", "u1"),
            ("anonymous_id", "a1"),
            ("email", "x@y.io"),
        ],
    )
    .await;
    resolve(
        &b.identity,
        "e4",
        &[("user_id", "u2"), ("anonymous_id", "a1")],
    )
    .await;
    let log = b.identity.graph_log().await.expect("log");
    // Replaying the log's links and merges gives the same membership as the graph.
    let mut owner: HashMap<Identifier, Uuid> = HashMap::new();
    let mut merged_into: HashMap<Uuid, Uuid> = HashMap::new();
    for d in &log {
        match d.kind.as_str() {
            "link" => {
                owner.insert(d.identifier.clone().expect("identifier"), d.profile_id);
            }
            "merge" => {
                merged_into.insert(d.profile_id, d.other_profile_id.expect("survivor"));
            }
            "create" | "drop" => {}
            other => panic!("unexpected kind {other}"),
        }
    }
    assert_eq!(owner.len(), 5);
    for (identifier, mut profile) in owner {
        while let Some(next) = merged_into.get(&profile) {
            profile = *next;
        }
        assert_eq!(
            lookup(&b.identity, &identifier.kind, &identifier.value).await,
            profile,
            "{identifier:?}"
        );
    }
    let merge = log.iter().find(|d| d.kind == "merge").expect("a merge");
    assert_eq!(merge.event_id, "e3");
    assert_eq!(merge.rule, "seen_together");
    assert_eq!(merge.other_profile_id, Some(merged.profile_id));
    let drop = log.iter().find(|d| d.kind == "drop").expect("a drop");
    assert_eq!(drop.event_id, "e4");
    assert_eq!(drop.rule, "limit:user_id");
    assert!(log.iter().all(|d| d.rules_version == 1));
    assert!(log.windows(2).all(|w| w[0].seq < w[1].seq));
}

async fn rules_are_versioned(b: &Backend) {
    resolve(&b.identity, "e1", &[("user_id", "u1")]).await;
    // The same rules again (a second replica, a restart): the same version.
    let same = replica(b, IdentitySettings::default()).await;
    resolve(&same, "e2", &[("user_id", "u2")]).await;
    let changed = replica(b, with_crm_id()).await;
    resolve(&changed, "e3", &[("user_id", "u3")]).await;
    let versions: Vec<(String, i64)> = b
        .identity
        .graph_log()
        .await
        .expect("log")
        .into_iter()
        .filter(|d| d.kind == "create")
        .map(|d| (d.event_id, d.rules_version))
        .collect();
    assert_eq!(
        versions,
        [("e1".into(), 1), ("e2".into(), 1), ("e3".into(), 2)]
    );
    // Bad rules are refused, naming the key.
    let mut bad = RulesConfig::default();
    bad.phone.default_region = "Atlantis".into();
    let err = b
        .replica(IdentitySettings {
            rules: bad,
            ..IdentitySettings::default()
        })
        .await
        .expect_err("bad rules");
    assert!(
        err.to_string().contains("rules.phone.default_region")
            || format!("{err:?}").contains("rules.phone.default_region"),
        "{err:?}"
    );
}

async fn a_profile_graph_explains_the_profile(b: &Backend) {
    let anon = resolve(&b.identity, "e1", &[("anonymous_id", "a1")]).await;
    let user = resolve(&b.identity, "e2", &[("user_id", "u1")]).await;
    let joined = resolve(
        &b.identity,
        "e3",
        &[
            ("user_id", "u1"),
            ("anonymous_id", "a1"),
            ("email", "x@y.io"),
        ],
    )
    .await;
    resolve(
        &b.identity,
        "e4",
        &[("user_id", "u2"), ("anonymous_id", "a1")],
    )
    .await;
    // Asked by the merged profile's id, the graph is the survivor's.
    let merged_away = if joined.profile_id == anon.profile_id {
        user.profile_id
    } else {
        anon.profile_id
    };
    let graph = b
        .identity
        .profile_graph(merged_away, 100)
        .await
        .expect("graph");
    assert_eq!(graph.profile_id, joined.profile_id);
    assert_eq!(graph.merged_profile_ids, [merged_away]);
    let ids: Vec<(String, String)> = graph
        .identifiers
        .iter()
        .map(|i| (i.identifier.kind.clone(), i.identifier.value.clone()))
        .collect();
    assert_eq!(ids.len(), 3);
    for want in [
        ("anonymous_id", "a1"),
        ("user_id", "u1"),
        ("email", "x@y.io"),
    ] {
        assert!(
            ids.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{want:?} in {ids:?}"
        );
    }
    let kinds: Vec<(&str, &str)> = graph
        .decisions
        .iter()
        .map(|d| (d.kind.as_str(), d.event_id.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("create", "e1"),
            ("link", "e1"),
            ("create", "e2"),
            ("link", "e2"),
            ("merge", "e3"),
            ("link", "e3"),
        ],
        "u2's own profile and its drop are not this profile's"
    );
    assert!(!graph.truncated);
    let short = b
        .identity
        .profile_graph(merged_away, 2)
        .await
        .expect("graph");
    assert!(short.truncated);
    assert_eq!(short.decisions.len(), 2);
    assert_eq!(short.decisions[1].kind, "link");
    assert_eq!(short.decisions[1].event_id, "e3", "the newest are kept");
    assert!(matches!(
        b.identity.profile_graph(Uuid::nil(), 10).await,
        Err(tessera_identity::IdentityError::UnknownProfile)
    ));
}

async fn manual_merges_obey_the_rules_and_are_logged(b: &Backend) {
    let older = resolve(&b.identity, "e1", &[("anonymous_id", "a1")]).await;
    let younger = resolve(&b.identity, "e2", &[("email", "x@y.io")]).await;
    let merge = b
        .identity
        .merge_profiles((younger.profile_id, older.profile_id), "ticket 42")
        .await
        .expect("merge")
        .expect("a merge");
    assert_eq!(
        merge.surviving_profile_id, older.profile_id,
        "the older survives"
    );
    assert_eq!(merge.rule, "manual");
    assert_eq!(
        lookup(&b.identity, "email", "x@y.io").await,
        older.profile_id
    );
    let log = b.identity.graph_log().await.expect("log");
    let logged = log.iter().find(|d| d.kind == "merge").expect("logged");
    assert_eq!(logged.rule, "manual");
    // Merging again: already one profile.
    assert!(
        b.identity
            .merge_profiles((older.profile_id, younger.profile_id), "again")
            .await
            .expect("merge")
            .is_none()
    );
    // Two users never merge, even by hand.
    let u1 = resolve(&b.identity, "e3", &[("user_id", "u1")]).await;
    let u2 = resolve(&b.identity, "e4", &[("user_id", "u2")]).await;
    let err = b
        .identity
        .merge_profiles((u1.profile_id, u2.profile_id), "sure")
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("limit:user_id"), "{err}");
    assert!(matches!(
        b.identity
            .merge_profiles((u1.profile_id, Uuid::nil()), "x")
            .await,
        Err(tessera_identity::IdentityError::UnknownProfile)
    ));
}

async fn rules_updated_through_the_api_reach_every_replica_and_survive_restarts(b: &Backend) {
    // A second replica on the same database, started with the same config.
    let other = replica(b, IdentitySettings::default()).await;
    assert_eq!((b.identity.rules_version(), other.rules_version()), (1, 1));
    let linked = resolve(&b.identity, "e1", &[("email", "desk@example.com")]).await;
    assert!(linked.dropped.is_empty());

    // Block a value through the API on this replica: in force here at once.
    let mut config = b.identity.rules().rules.config().clone();
    config
        .blocklist
        .entry("email".into())
        .or_default()
        .exact
        .push("frontdesk@example.com".into());
    let version = b
        .identity
        .update_rules(config.clone(), Some(1))
        .await
        .expect("update");
    assert_eq!(version, 2);
    assert_eq!(b.identity.rules().rules.config(), &config);
    let here = resolve(&b.identity, "e2", &[("email", "FrontDesk@example.com")]).await;
    assert_eq!(here.dropped.len(), 1);
    assert_eq!(here.dropped[0].reason, "blocked");

    // The other replica still has version 1 until it refreshes, then has version 2.
    assert_eq!(other.rules_version(), 1);
    assert!(other.refresh_rules().await.expect("refresh"));
    assert!(
        !other.refresh_rules().await.expect("refresh"),
        "nothing newer"
    );
    assert_eq!(other.rules_version(), 2);
    let there = resolve(&other, "e3", &[("email", "frontdesk@example.com")]).await;
    assert_eq!(there.dropped[0].reason, "blocked");
    // Not retroactive: what was linked before stays linked.
    assert_eq!(
        lookup(&other, "email", "desk@example.com").await,
        linked.profile_id
    );

    // The same rules again add no version.
    assert_eq!(
        b.identity.update_rules(config, None).await.expect("update"),
        2
    );

    // A restart with the unchanged config keeps the API's rules...
    let restarted = replica(b, IdentitySettings::default()).await;
    assert_eq!(restarted.rules_version(), 2);
    let after = resolve(&restarted, "e4", &[("email", "frontdesk@example.com")]).await;
    assert_eq!(after.dropped[0].reason, "blocked");
    // ...and deploying a changed config overrides them with a newer version.
    let deployed = replica(b, with_crm_id()).await;
    assert_eq!(deployed.rules_version(), 3);
    assert!(deployed.rules().rules.config().blocklist.is_empty());
    // The background refresh brings the older replicas to it.
    let stop = tessera_server::Shutdown::new();
    let fast = replica(
        b,
        IdentitySettings {
            rules_refresh_seconds: 1,
            ..with_crm_id()
        },
    )
    .await;
    assert_eq!(fast.rules_version(), 3);
    b.identity
        .update_rules(RulesConfig::default(), Some(3))
        .await
        .expect("update");
    let task = fast.spawn_rules_refresh(stop.clone());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fast.rules_version() != 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "refreshed within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.expect("refresh task");
}

async fn rule_updates_are_checked_and_compare_and_set(b: &Backend) {
    let mut bad = RulesConfig::default();
    bad.phone.default_region = "Atlantis".into();
    let err = b
        .identity
        .update_rules(bad, None)
        .await
        .expect_err("bad rules");
    assert!(
        format!("{err:?}").contains("rules.phone.default_region"),
        "{err:?}"
    );
    assert_eq!(b.identity.rules_version(), 1, "nothing stored");

    let custom = with_crm_id().rules;
    let err = b
        .identity
        .update_rules(custom.clone(), Some(7))
        .await
        .expect_err("stale version");
    assert!(
        matches!(&err, tessera_identity::IdentityError::FailedPrecondition(m) if m.contains("version 1 is current")),
        "{err:?}"
    );
    // Two read-modify-writes from the same version: the second loses.
    assert_eq!(
        b.identity
            .update_rules(custom, Some(1))
            .await
            .expect("first"),
        2
    );
    let err = b
        .identity
        .update_rules(RulesConfig::default(), Some(1))
        .await
        .expect_err("second");
    assert!(matches!(
        err,
        tessera_identity::IdentityError::FailedPrecondition(_)
    ));
    assert_eq!(b.identity.rules_version(), 2);
}

/// What the stores keep of a component is enough to rebuild it: replaying the stored history
/// (events in the order they were resolved, the manual merge in its place) with nothing
/// forbidden gives back every identifier's profile and every event's profile.
async fn a_stored_component_replays_to_the_stored_graph(b: &Backend) {
    let id = &b.identity;
    let p1 = resolve(id, "e1", &[("anonymous_id", "a1")])
        .await
        .profile_id;
    resolve(id, "e2", &[("anonymous_id", "a2")]).await;
    resolve(id, "e3", &[("anonymous_id", "a1"), ("user_id", "u1")]).await;
    let cross_device = resolve(id, "e4", &[("anonymous_id", "a2"), ("user_id", "u1")]).await;
    assert_eq!(cross_device.merges.len(), 1);
    let p3 = resolve(id, "e5", &[("anonymous_id", "a3"), ("email", "x@y.io")])
        .await
        .profile_id;
    id.merge_profiles((p1, p3), "same person")
        .await
        .expect("merge");
    resolve(id, "e6", &[("email", "x@y.io"), ("phone", "+14155550100")]).await;
    resolve(id, "e7", &[("anonymous_id", "a4"), ("user_id", "u2")]).await;
    // A second user id on the shared device: dropped by the protection rule.
    let shared = resolve(id, "e8", &[("anonymous_id", "a4"), ("user_id", "u1")]).await;
    assert_eq!(shared.dropped.len(), 1);

    let history = id.component_history(p3).await.expect("history");
    assert_eq!(history.root, p1);
    assert_eq!(history.members.len(), 3);
    let events: Vec<&str> = history
        .entries
        .iter()
        .filter_map(|e| match e {
            tessera_identity::domain::HistoryEntry::Event { record, .. } => Some(record.event_id()),
            tessera_identity::domain::HistoryEntry::Merge { .. } => None,
        })
        .collect();
    assert_eq!(events, ["e1", "e2", "e3", "e4", "e5", "e6", "e8"]);
    assert!(matches!(
        history.entries[5],
        tessera_identity::domain::HistoryEntry::Merge { ref rule, .. } if rule == "manual"
    ));

    let replayed = tessera_identity::domain::replay(
        &id.rules().rules,
        &history.entries,
        &tessera_identity::domain::Constraints::default(),
        time::OffsetDateTime::now_utc(),
        Uuid::now_v7,
    );
    assert!(replayed.refused.is_empty(), "{:?}", replayed.refused);
    let graph = id.profile_graph(p1, 100).await.expect("graph");
    assert_eq!(replayed.owners.len(), graph.identifiers.len());
    for (identifier, owner) in &replayed.owners {
        assert_eq!(
            lookup(id, &identifier.kind, &identifier.value).await,
            *owner,
            "{identifier:?}"
        );
    }
    assert!(replayed.events.values().all(|p| *p == p1));
    assert!(
        history
            .members
            .iter()
            .all(|m| replayed.canonical[&m.id] == p1)
    );
    assert!(matches!(
        id.component_history(Uuid::now_v7()).await,
        Err(tessera_identity::IdentityError::UnknownProfile)
    ));
}

/// Records that an unmerge split `a` and `b` apart, as an unmerge will.
async fn split_apart(b: &Backend, a: Uuid, other: Uuid) {
    match &b.db {
        tessera_store::Database::Postgres(pool) => {
            sqlx::query("INSERT INTO splits VALUES ($1, $2, 'test', now())")
                .bind(a)
                .bind(other)
                .execute(pool)
                .await
                .expect("split");
        }
        tessera_store::Database::Sqlite(pool) => {
            sqlx::query("INSERT INTO splits VALUES (?1, ?2, 'test', 0)")
                .bind(a.to_string())
                .bind(other.to_string())
                .execute(pool)
                .await
                .expect("split");
        }
    }
}

/// Profiles an unmerge split apart never merge again: an event carrying identifiers of both
/// sides drops its lowest-priority identifier (rule `split`), also when a side has grown by
/// merging since, and a manual merge of the two is refused.
async fn profiles_split_apart_stay_apart(b: &Backend) {
    let id = &b.identity;
    let laptop = resolve(
        id,
        "e1",
        &[("anonymous_id", "a1"), ("phone", "+14155550100")],
    )
    .await
    .profile_id;
    let bob = resolve(id, "e2", &[("email", "bob@x.io")]).await.profile_id;
    split_apart(b, laptop, bob).await;

    let bridge = resolve(id, "e3", &[("anonymous_id", "a1"), ("email", "bob@x.io")]).await;
    assert_eq!(
        bridge.profile_id, bob,
        "the higher-priority identifier decides"
    );
    assert!(bridge.merges.is_empty());
    assert_eq!(bridge.dropped.len(), 1);
    assert_eq!(bridge.dropped[0].reason, "split");
    assert_eq!(lookup(id, "anonymous_id", "a1").await, laptop);

    // The laptop's side grows by a merge; its new member still cannot reach Bob.
    let carol = resolve(id, "e4", &[("email", "carol@x.io")])
        .await
        .profile_id;
    let joined = resolve(
        id,
        "e5",
        &[("email", "carol@x.io"), ("phone", "+14155550100")],
    )
    .await;
    assert_eq!(joined.merges.len(), 1);
    assert_eq!(joined.merges[0].merged_profile_id, carol);
    assert_eq!(lookup(id, "email", "carol@x.io").await, laptop);
    let again = resolve(id, "e6", &[("email", "carol@x.io"), ("email", "bob@x.io")]).await;
    assert_eq!(again.profile_id, laptop);
    assert!(again.merges.is_empty());
    assert_eq!(again.dropped.len(), 1);
    assert_eq!(again.dropped[0].reason, "split");
    assert_eq!(lookup(id, "email", "bob@x.io").await, bob);

    let refused = id.merge_profiles((laptop, bob), "try again").await;
    assert!(
        matches!(&refused, Err(tessera_identity::IdentityError::FailedPrecondition(m)) if m.contains("split")),
        "{refused:?}"
    );
}

/// Checks that the stored graph of `profile`'s component is what replaying its stored history
/// gives: the unmerge wrote back a consistent graph.
async fn assert_replays_to_itself(id: &Identity, profile: Uuid) {
    let history = id.component_history(profile).await.expect("history");
    let replayed = tessera_identity::domain::replay(
        &id.rules().rules,
        &history.entries,
        &tessera_identity::domain::Constraints::default(),
        time::OffsetDateTime::now_utc(),
        Uuid::now_v7,
    );
    for (identifier, owner) in &replayed.owners {
        assert_eq!(
            lookup(id, &identifier.kind, &identifier.value).await,
            *owner,
            "{identifier:?}"
        );
    }
}

/// A merge caused by an event (one user id on two devices) is reverted: both profiles come back
/// with what belongs to each (also what arrived after the merge), the manual merge of a third
/// profile stands, the bridging event keeps its user id and drops the other device's id (rule
/// `split`), every stored resolution answers its new profile, and the pair never merges again.
async fn an_unmerge_restores_both_profiles_and_keeps_them_apart(b: &Backend) {
    let id = &b.identity;
    let p1 = resolve(id, "e1", &[("anonymous_id", "a1")])
        .await
        .profile_id;
    let p2 = resolve(id, "e2", &[("anonymous_id", "a2"), ("email", "x@y.io")])
        .await
        .profile_id;
    resolve(id, "e3", &[("anonymous_id", "a1"), ("user_id", "u1")]).await;
    let bridge = resolve(id, "e4", &[("anonymous_id", "a2"), ("user_id", "u1")]).await;
    assert_eq!(bridge.merges.len(), 1);
    assert_eq!(bridge.merges[0].merged_profile_id, p2);
    // After the merge: a phone arrives with the second device's email.
    resolve(id, "e5", &[("email", "x@y.io"), ("phone", "+14155550100")]).await;
    let p3 = resolve(id, "e6", &[("anonymous_id", "a3")])
        .await
        .profile_id;
    id.merge_profiles((p1, p3), "same person")
        .await
        .expect("merge");
    assert_eq!(lookup(id, "phone", "+14155550100").await, p1);

    let undone = id
        .unmerge_profile(p2, "wrong device")
        .await
        .expect("unmerge");
    assert_eq!((undone.profile, undone.survivor), (Some(p2), Some(p1)));
    assert_eq!(lookup(id, "anonymous_id", "a2").await, p2);
    assert_eq!(lookup(id, "email", "x@y.io").await, p2);
    assert_eq!(
        lookup(id, "phone", "+14155550100").await,
        p2,
        "followed its email"
    );
    assert_eq!(lookup(id, "user_id", "u1").await, p1);
    assert_eq!(
        lookup(id, "anonymous_id", "a3").await,
        p1,
        "the manual merge stands"
    );
    let moved: std::collections::HashMap<&str, Uuid> = undone
        .events
        .iter()
        .map(|(event, profile, _)| (event.as_str(), *profile))
        .collect();
    assert_eq!(moved["e2"], p2);
    assert_eq!(moved["e4"], p1, "the user id outranks the anonymous id");
    assert_eq!(moved["e5"], p2);
    assert_eq!(moved["e6"], p1);

    // Stored resolutions answer the new profiles; the bridge dropped the other device's id.
    let e4 = resolve(id, "e4", &[("anonymous_id", "a2"), ("user_id", "u1")]).await;
    assert_eq!(e4.profile_id, p1);
    assert!(e4.merges.is_empty());
    assert_eq!(e4.dropped.len(), 1);
    assert_eq!(e4.dropped[0].reason, "split");
    assert_eq!(resolve(id, "e5", &[]).await.profile_id, p2);
    let graph = id.profile_graph(p2, 100).await.expect("graph");
    assert_eq!(graph.profile_id, p2);
    assert!(graph.merged_profile_ids.is_empty());
    assert_eq!(graph.identifiers.len(), 3);
    // The graph log records the split, after the merge it reverts.
    let kinds: Vec<(&str, Uuid, Option<Uuid>)> = graph
        .decisions
        .iter()
        .filter(|d| d.kind == "merge" || d.kind == "split")
        .map(|d| (d.kind.as_str(), d.profile_id, d.other_profile_id))
        .collect();
    assert_eq!(kinds, [("merge", p2, Some(p1)), ("split", p2, Some(p1))]);

    // The same bridge again does not merge them. (Having been seen with both profiles, the
    // device's id now counts as shared under the default rules, which drops it first.)
    let later = resolve(id, "e7", &[("anonymous_id", "a2"), ("user_id", "u1")]).await;
    assert_eq!(later.profile_id, p1);
    assert!(later.merges.is_empty());
    assert_eq!(
        later.dropped[0].identifier,
        tessera_core::Identifier::new("anonymous_id", "a2")
    );
    assert_eq!(lookup(id, "anonymous_id", "a2").await, p2);
    assert_replays_to_itself(id, p1).await;
    assert_replays_to_itself(id, p2).await;

    assert!(matches!(
        id.unmerge_profile(p2, "again").await,
        Err(tessera_identity::IdentityError::FailedPrecondition(_))
    ));
    assert!(matches!(
        id.unmerge_profile(Uuid::now_v7(), "unknown").await,
        Err(tessera_identity::IdentityError::UnknownProfile)
    ));
}

/// Reverting a manual merge gives both profiles back as they were, and what arrived for either
/// since goes to its own side.
async fn an_unmerged_manual_merge_is_as_if_it_never_happened(b: &Backend) {
    let id = &b.identity;
    let ann = resolve(id, "e1", &[("email", "ann@x.io")]).await.profile_id;
    let bob = resolve(id, "e2", &[("email", "bob@x.io")]).await.profile_id;
    id.merge_profiles((ann, bob), "looked alike")
        .await
        .expect("merge");
    resolve(
        id,
        "e3",
        &[("email", "bob@x.io"), ("phone", "+14155550100")],
    )
    .await;
    resolve(id, "e4", &[("email", "ann@x.io"), ("user_id", "ann")]).await;
    let undone = id
        .unmerge_profile(bob, "they are two people")
        .await
        .expect("unmerge");
    assert_eq!(undone.survivor, Some(ann));
    assert_eq!(lookup(id, "email", "bob@x.io").await, bob);
    assert_eq!(lookup(id, "phone", "+14155550100").await, bob);
    assert_eq!(lookup(id, "email", "ann@x.io").await, ann);
    assert_eq!(lookup(id, "user_id", "ann").await, ann);
    let sides: std::collections::HashMap<&str, Uuid> = undone
        .events
        .iter()
        .map(|(event, profile, _)| (event.as_str(), *profile))
        .collect();
    assert_eq!(
        sides,
        std::collections::HashMap::from([("e1", ann), ("e2", bob), ("e3", bob), ("e4", ann)])
    );
    let refused = id.merge_profiles((ann, bob), "again").await;
    assert!(matches!(
        refused,
        Err(tessera_identity::IdentityError::FailedPrecondition(_))
    ));
    assert_replays_to_itself(id, ann).await;
    assert_replays_to_itself(id, bob).await;
}
