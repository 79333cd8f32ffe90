//! Probabilistic matching end to end in `tessera dev`: identifies with person traits go through
//! ingestion, identity and profile; the profile service indexes every profile for matching; a
//! model is trained without labels; the batch job merges the near-duplicates, and the profile
//! service applies the merges, so both anonymous ids read as one profile.

use std::time::Duration;

use serde_json::json;
use tessera_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tessera_proto::identity::v1::{RunBatchMatchRequest, TrainMatchModelRequest};
use tessera_testkit::people::{person, typo};
use tessera_tests::TesseraBuilder;
use tessera_tests::events::{get_by, identify, send, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn near_duplicates_become_one_profile_after_training_and_the_batch() {
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();

    // 120 people, and a second record of person 7 as another system typed it.
    let mut events: Vec<_> = (0..120)
        .map(|n| identify(&format!("m{n}"), "", &format!("a{n}"), person(n)))
        .collect();
    let mut copy = typo(7); // two letters of the surname swapped
    let given = person(7)["firstName"]
        .as_str()
        .unwrap_or_default()
        .to_uppercase();
    copy["firstName"] = json!(format!(" {given} ")); // and the case and spacing differ
    events.push(identify("m-copy", "", "a-copy", copy));
    for chunk in events.chunks(50) {
        send(&channel, &key, chunk.to_vec()).await.expect("send");
    }
    // Every profile exists (and was sent to identity for indexing) before training.
    for n in 0..120 {
        wait_for(
            &channel,
            "anonymous_id",
            &format!("a{n}"),
            Duration::from_secs(30),
            |_| true,
        )
        .await;
    }
    let copy_before = wait_for(
        &channel,
        "anonymous_id",
        "a-copy",
        Duration::from_secs(30),
        |_| true,
    )
    .await;
    let original = get_by(&channel, "anonymous_id", "a7")
        .await
        .expect("original");
    assert_ne!(
        copy_before.profile_id, original.profile_id,
        "apart before matching"
    );

    let mut identity = IdentityServiceClient::new(channel.clone());
    let model = identity
        .train_match_model(TrainMatchModelRequest {})
        .await
        .expect("train")
        .into_inner();
    assert_eq!(model.model_version, 1);
    assert_eq!(model.profiles, 121);
    assert!(model.converged);
    let batch = identity
        .run_batch_match(RunBatchMatchRequest {})
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(batch.merges, 1, "{batch:?}");

    // Identity answers the survivor at once; the merge reaches the profile service through
    // identity's outbox, after which the survivor holds both profiles.
    let merged = wait_for(
        &channel,
        "anonymous_id",
        "a-copy",
        Duration::from_secs(30),
        |p| {
            p.profile_id == original.profile_id
                && p.merged_profile_ids.contains(&copy_before.profile_id)
        },
    )
    .await;
    assert_eq!(
        merged.event_count, 2,
        "both identifies count on the survivor"
    );
    let neighbour = get_by(&channel, "anonymous_id", "a8")
        .await
        .expect("neighbour");
    assert_ne!(
        neighbour.profile_id, original.profile_id,
        "nobody else merged"
    );
}
