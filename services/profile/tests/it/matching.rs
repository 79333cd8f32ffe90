//! Probabilistic matching during `ApplyEvents`: the identity double answers `MatchProfiles`
//! with configured merges, fails, or does not implement it.

use serde_json::json;
use tessera_profile::ProfileSettings;
use tessera_proto::convert::{struct_to_json_map, value_to_json};
use tonic::Code;
use tonic_types::StatusExt;

use crate::service::{Env, events, minutes_ago};
use crate::support::{identify, track};

/// The profile ids and trait values of every `MatchProfiles` call, in call order.
fn sent(env: &Env) -> Vec<Vec<(String, serde_json::Value)>> {
    env.double
        .match_calls()
        .into_iter()
        .map(|call| {
            call.into_iter()
                .map(|p| {
                    let traits = struct_to_json_map(&p.traits.expect("traits"));
                    (p.profile_id, serde_json::Value::Object(traits))
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn a_merge_answered_by_matching_folds_the_profile_into_the_survivor() {
    let env = Env::new().await;
    let replica = env.replica().await;
    replica
        .apply(events(vec![identify(
            "e1",
            "p1",
            "u1",
            minutes_ago(30),
            json!({"name": "Ann Lee", "city": "Oslo"}),
        )]))
        .await
        .unwrap();
    // Cached before the merge: the merge must replace this entry.
    assert_eq!(replica.get_id("p1").await.event_count, 1);

    env.double.answer_merge("p1", "p2");
    let batch = events(vec![
        identify(
            "e2",
            "p2",
            "u2",
            minutes_ago(20),
            json!({"name": "Ann Lee", "plan": "pro"}),
        ),
        track("e3", "p2", "u2", minutes_ago(10)),
    ]);
    let response = replica.apply(batch.clone()).await.unwrap();
    assert_eq!((response.applied, response.duplicates), (2, 0));
    assert_eq!(
        response.profiles_changed, 2,
        "p2 by its events, p1 by the merge"
    );

    let survivor = replica.get_id("p2").await;
    assert_eq!(survivor.profile_id, "p1");
    assert_eq!(survivor.merged_profile_ids, ["p2"]);
    assert_eq!(survivor.event_count, 3);
    let mut traits: Vec<_> = survivor.traits.keys().map(String::as_str).collect();
    traits.sort_unstable();
    assert_eq!(traits, ["city", "name", "plan"]);
    assert_eq!(
        value_to_json(survivor.traits["plan"].value.as_ref().unwrap()),
        json!("pro")
    );
    assert_eq!(survivor.identifiers.len(), 2);
    assert!(survivor.scores.contains_key("engagement"));
    assert_eq!(replica.get_id("p1").await, survivor);
    assert_eq!(
        sent(&env)[1],
        [("p2".to_owned(), json!({"name": "Ann Lee", "plan": "pro"}))]
    );

    // Re-delivered: nothing new is applied, matched or merged.
    let again = replica.apply(batch).await.unwrap();
    assert_eq!(
        (again.applied, again.duplicates, again.profiles_changed),
        (0, 2, 0)
    );
    assert_eq!(sent(&env).len(), 3, "a re-delivered batch is matched again");
    let after = replica.get_id("p2").await;
    assert_eq!((after.profile_id.as_str(), after.event_count), ("p1", 3));
}

#[tokio::test]
async fn the_trait_values_of_every_named_profile_with_traits_are_sent() {
    let env = Env::new().await;
    let replica = env.replica().await;
    replica
        .apply(events(vec![
            identify(
                "e1",
                "p1",
                "u1",
                minutes_ago(30),
                json!({"name": "Ann", "age": 41, "vip": false}),
            ),
            // Later: its values win.
            identify(
                "e2",
                "p1",
                "u1",
                minutes_ago(20),
                json!({"age": 42, "tags": ["a", "b"], "address": {"city": "Oslo"}}),
            ),
            // No traits: nothing to match on, not sent.
            track("e3", "p2", "u2", minutes_ago(10)),
        ]))
        .await
        .unwrap();
    assert_eq!(
        sent(&env),
        [[(
            "p1".to_owned(),
            json!({
                "name": "Ann",
                "age": 42,
                "vip": false,
                "tags": ["a", "b"],
                "address": {"city": "Oslo"}
            })
        )]]
    );
}

#[tokio::test]
async fn matching_unavailable_fails_the_batch_and_a_retry_applies_the_merge() {
    let env = Env::new().await;
    let replica = env.replica().await;
    replica
        .apply(events(vec![identify(
            "e1",
            "p1",
            "u1",
            minutes_ago(30),
            json!({"name": "Ann Lee"}),
        )]))
        .await
        .unwrap();

    env.double.answer_merge("p1", "p2");
    env.double.fail_matching(Some(Code::Unavailable));
    let batch = events(vec![identify(
        "e2",
        "p2",
        "u2",
        minutes_ago(20),
        json!({"name": "Ann Lee"}),
    )]);
    let status = replica.apply(batch.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.get_error_details().retry_info().is_some());
    assert_eq!(
        status.message(),
        "the identity service is unavailable, retry later"
    );
    // The events were applied, the merge was not.
    let unmerged = replica.get_id("p2").await;
    assert_eq!(
        (unmerged.profile_id.as_str(), unmerged.event_count),
        ("p2", 1)
    );

    env.double.fail_matching(None);
    let retry = replica.apply(batch).await.unwrap();
    assert_eq!((retry.applied, retry.duplicates), (0, 1));
    assert_eq!(retry.profiles_changed, 2);
    let survivor = replica.get_id("p2").await;
    assert_eq!(survivor.profile_id, "p1");
    assert_eq!(survivor.event_count, 2);
    assert_eq!(survivor.merged_profile_ids, ["p2"]);
}

#[tokio::test]
async fn an_identity_service_without_matching_is_skipped() {
    let env = Env::new().await;
    let replica = env.replica().await;
    env.double.fail_matching(Some(Code::Unimplemented));
    for (event_id, minute) in [("e1", 20), ("e2", 10)] {
        let response = replica
            .apply(events(vec![identify(
                event_id,
                "p1",
                "u1",
                minutes_ago(minute),
                json!({"name": "Ann"}),
            )]))
            .await
            .unwrap();
        assert_eq!(response.applied, 1);
    }
    assert_eq!(env.double.match_calls().len(), 2, "asked again every batch");
    let profile = replica.get_id("p1").await;
    assert_eq!(profile.event_count, 2);
    assert!(profile.scores.contains_key("engagement"));
}

#[tokio::test]
async fn matching_turned_off_never_calls_identity() {
    let env = Env::new().await;
    let replica = env
        .replica_with_settings(ProfileSettings {
            match_profiles: false,
            ..ProfileSettings::default()
        })
        .await;
    env.double.answer_merge("p1", "p2");
    replica
        .apply(events(vec![
            identify("e1", "p1", "u1", minutes_ago(20), json!({"name": "Ann"})),
            identify("e2", "p2", "u2", minutes_ago(10), json!({"name": "Ann"})),
        ]))
        .await
        .unwrap();
    assert!(env.double.match_calls().is_empty());
    assert_eq!(replica.get_id("p2").await.profile_id, "p2");
}
