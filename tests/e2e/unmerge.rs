//! Lossless unmerge end to end in `tessera dev`: two devices identify as one user, which merges
//! their profiles; more events arrive; the merge is reverted through the identity API. Identity
//! replays the component with the two kept apart and queues the split; the profile service
//! rebuilds both profiles from their events, as if the merge had never happened.

use std::time::Duration;

use serde_json::json;
use tessera_proto::common::v1::Identifier;
use tessera_proto::identity::v1::get_profile_graph_request::Lookup;
use tessera_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tessera_proto::identity::v1::{
    DetachIdentifierRequest, EraseIdentifierRequest, GetProfileGraphRequest, UnmergeProfilesRequest,
};
use tessera_tests::TesseraBuilder;
use tessera_tests::events::{get_by, has_identifier, identify, send, track, trait_value, wait_for};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn a_merge_followed_by_its_unmerge_leaves_both_profiles_as_before() {
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();

    // The user on a laptop; a tablet browsing anonymously; then the tablet identifies as the
    // same user (a merge), and browses on.
    send(
        &channel,
        &key,
        vec![identify(
            "m1",
            "u1",
            "laptop",
            json!({"name": "Ann", "plan": "pro"}),
        )],
    )
    .await
    .expect("send");
    send(
        &channel,
        &key,
        vec![track("m2", "", "tablet", "Viewed", json!({"sku": "a"}))],
    )
    .await
    .expect("send");
    let tablet_alone = wait_for(&channel, "anonymous_id", "tablet", WAIT, |_| true).await;
    send(
        &channel,
        &key,
        vec![identify("m3", "u1", "tablet", json!({"city": "Oslo"}))],
    )
    .await
    .expect("send");
    wait_for(&channel, "anonymous_id", "tablet", WAIT, |p| {
        p.event_count == 3
    })
    .await;
    send(
        &channel,
        &key,
        vec![track("m4", "", "tablet", "Viewed", json!({"sku": "b"}))],
    )
    .await
    .expect("send");
    let merged = wait_for(&channel, "user_id", "u1", WAIT, |p| p.event_count == 4).await;
    assert!(merged.merged_profile_ids.contains(&tablet_alone.profile_id));

    // Revert the merge of the tablet's profile.
    let mut identity = IdentityServiceClient::new(channel.clone());
    let undone = identity
        .unmerge_profiles(UnmergeProfilesRequest {
            profile_id: tablet_alone.profile_id.clone(),
            reason: "a shared tablet".into(),
        })
        .await
        .expect("unmerge")
        .into_inner();
    assert_eq!(undone.restored_profile_id, tablet_alone.profile_id);
    assert_eq!(undone.surviving_profile_id, merged.profile_id);
    assert_eq!(undone.events, 4);
    assert_eq!(undone.events_moved, 2, "the tablet's own events");

    // The profile service rebuilds both: the tablet's browsing is its own again; the identify
    // that bridged them stays with the user (the user id outranks the anonymous id).
    let tablet = wait_for(&channel, "anonymous_id", "tablet", WAIT, |p| {
        p.profile_id == tablet_alone.profile_id
    })
    .await;
    assert_eq!(tablet.event_count, 2);
    assert!(tablet.merged_profile_ids.is_empty());
    assert!(has_identifier(&tablet, "anonymous_id", "tablet"));
    assert!(!has_identifier(&tablet, "user_id", "u1"));
    let user = get_by(&channel, "user_id", "u1").await.expect("user");
    assert_eq!(user.profile_id, merged.profile_id);
    assert_eq!(user.event_count, 2);
    assert!(user.merged_profile_ids.is_empty());
    assert_eq!(trait_value(&user, "name"), Some(json!("Ann")));
    assert_eq!(trait_value(&user, "city"), Some(json!("Oslo")));
    assert!(!has_identifier(&user, "anonymous_id", "tablet"));
    assert!(user.scores.contains_key("engagement"));

    // The graph says so, and the two never merge again.
    let graph = identity
        .get_profile_graph(GetProfileGraphRequest {
            lookup: Some(Lookup::Identifier(Identifier {
                r#type: "anonymous_id".into(),
                value: "tablet".into(),
            })),
            max_decisions: 0,
        })
        .await
        .expect("graph")
        .into_inner();
    assert_eq!(graph.profile_id, tablet_alone.profile_id);
    send(
        &channel,
        &key,
        vec![identify("m5", "u1", "tablet", json!({}))],
    )
    .await
    .expect("send");
    let user = wait_for(&channel, "user_id", "u1", WAIT, |p| p.event_count == 3).await;
    assert_eq!(user.profile_id, merged.profile_id);
    let tablet = get_by(&channel, "anonymous_id", "tablet")
        .await
        .expect("tablet");
    assert_eq!(tablet.profile_id, tablet_alone.profile_id);

    // A profile that is not merged cannot be unmerged.
    let refused = identity
        .unmerge_profiles(UnmergeProfilesRequest {
            profile_id: tablet_alone.profile_id.clone(),
            reason: String::new(),
        })
        .await
        .expect_err("not merged");
    assert_eq!(refused.code(), Code::FailedPrecondition);
}

/// A GDPR erasure of the identifier that bridged two devices, end to end in `tessera dev`: the
/// email an anonymous tablet shared with a user's laptop is erased through the identity API;
/// identity replays the component as if no event had carried it, the profile service rebuilds
/// both sides, nothing links the email any more, and later events carrying it link nothing.
#[tokio::test(flavor = "multi_thread")]
async fn erasing_a_bridging_email_splits_the_profile_in_the_profile_service() {
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();

    send(
        &channel,
        &key,
        vec![
            identify(
                "m1",
                "u1",
                "laptop",
                json!({"email": "ann@x.io", "name": "Ann"}),
            ),
            identify(
                "m2",
                "",
                "tablet",
                json!({"email": "Ann@X.io", "city": "Oslo"}),
            ),
            track("m3", "", "tablet", "Viewed", json!({"sku": "a"})),
        ],
    )
    .await
    .expect("send");
    let merged = wait_for(&channel, "user_id", "u1", WAIT, |p| p.event_count == 3).await;
    assert!(has_identifier(&merged, "anonymous_id", "tablet"));

    let mut identity = IdentityServiceClient::new(channel.clone());
    let erased = identity
        .erase_identifier(EraseIdentifierRequest {
            identifier: Some(Identifier {
                r#type: "email".into(),
                value: " ANN@x.io".into(),
            }),
            reason: "GDPR ticket 7".into(),
        })
        .await
        .expect("erase")
        .into_inner();
    assert_eq!(erased.former_profile_id, merged.profile_id);
    assert_eq!(erased.events, 3);
    assert_eq!(erased.events_moved, 2, "the tablet's events");
    assert_eq!(erased.events_erased, 0);

    let tablet = wait_for(&channel, "anonymous_id", "tablet", WAIT, |p| {
        p.profile_id != merged.profile_id
    })
    .await;
    assert_eq!(tablet.event_count, 2);
    assert!(!has_identifier(&tablet, "email", "ann@x.io"));
    assert_eq!(trait_value(&tablet, "city"), Some(json!("Oslo")));
    let user = get_by(&channel, "user_id", "u1").await.expect("user");
    assert_eq!(user.profile_id, merged.profile_id);
    assert_eq!(user.event_count, 1);
    assert!(!has_identifier(&user, "email", "ann@x.io"));
    assert_eq!(
        get_by(&channel, "email", "ann@x.io")
            .await
            .expect_err("erased")
            .code(),
        Code::NotFound
    );

    // The email never links again: the tablet identifying with it stays apart from the user.
    send(
        &channel,
        &key,
        vec![identify("m4", "", "tablet", json!({"email": "ann@x.io"}))],
    )
    .await
    .expect("send");
    let tablet = wait_for(&channel, "anonymous_id", "tablet", WAIT, |p| {
        p.event_count == 3
    })
    .await;
    assert_ne!(tablet.profile_id, user.profile_id);
    assert!(!has_identifier(&tablet, "email", "ann@x.io"));

    // Splitting off an identifier no profile holds, or erasing a malformed one, is refused.
    let refused = identity
        .detach_identifier(DetachIdentifierRequest {
            identifier: Some(Identifier {
                r#type: "device_id".into(),
                value: "never-seen".into(),
            }),
            reason: String::new(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(refused.code(), Code::NotFound);
    let refused = identity
        .erase_identifier(EraseIdentifierRequest {
            identifier: None,
            reason: String::new(),
        })
        .await
        .expect_err("no identifier");
    assert_eq!(refused.code(), Code::InvalidArgument);
}
