//! The change stream end to end in `tessera dev`: a consumer watching from now sees the changes
//! events cause, reconnects with its last cursor after missing some and gets exactly those,
//! and a filtered stream carries only the kinds it asked for (a merge).

use std::time::Duration;

use serde_json::json;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::profile::v1::{WatchProfileChangesRequest, WatchProfileChangesResponse};
use tessera_tests::TesseraBuilder;
use tessera_tests::events::{identify, send, track, wait_for};
use tonic::Code;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(30);

async fn watch(
    client: &ProfileServiceClient<tessera_tests::Channel>,
    cursor: &str,
    kinds: &[&str],
) -> Streaming<WatchProfileChangesResponse> {
    client
        .clone()
        .watch_profile_changes(WatchProfileChangesRequest {
            cursor: cursor.to_owned(),
            kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
            audiences: vec![],
        })
        .await
        .expect("watch")
        .into_inner()
}

/// A cursor's (transaction, sequence) position.
fn position(cursor: &str) -> (u64, i64) {
    let (xid, seq) = cursor.split_once('.').expect("xid.seq");
    (xid.parse().unwrap(), seq.parse().unwrap())
}

/// The next change of `stream`, within [`WAIT`].
async fn next(stream: &mut Streaming<WatchProfileChangesResponse>) -> WatchProfileChangesResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a change in time")
        .expect("the stream works")
        .expect("the stream goes on")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_resumes_from_its_cursor_and_misses_nothing() {
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();
    let client = ProfileServiceClient::new(channel.clone());

    let mut stream = watch(&client, "", &[]).await;
    send(
        &channel,
        &key,
        vec![identify("m1", "u1", "a1", json!({"plan": "pro"}))],
    )
    .await
    .expect("send");
    let first = next(&mut stream).await;
    assert_eq!(first.kind, "updated");
    let profile_id = first.profile_id.clone();
    assert!(first.version > 0);
    // Read what m1 caused, then go away.
    let mut last = first.cursor.clone();
    while let Ok(Ok(Some(change))) =
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await
    {
        last = change.cursor;
    }
    drop(stream);

    // Missed while away: two more events.
    send(
        &channel,
        &key,
        vec![
            track("m2", "u1", "", "Viewed", json!({})),
            track("m3", "u1", "", "Viewed", json!({})),
        ],
    )
    .await
    .expect("send");
    let now = wait_for(&channel, "user_id", "u1", WAIT, |p| p.event_count == 3).await;

    let mut resumed = watch(&client, &last, &["updated"]).await;
    let mut versions = Vec::new();
    while versions.last() != Some(&now.version) {
        let change = next(&mut resumed).await;
        assert_eq!(change.kind, "updated");
        assert_eq!(change.profile_id, profile_id);
        assert!(
            position(&change.cursor) > position(&last),
            "only changes after the cursor"
        );
        versions.push(change.version);
    }
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "each change once, in order: {versions:?}"
    );

    // A stream of merges only: a second device identifies as the same user.
    let mut merges = watch(&client, "", &["merged"]).await;
    send(
        &channel,
        &key,
        vec![track("m4", "", "a2", "Viewed", json!({}))],
    )
    .await
    .expect("send");
    wait_for(&channel, "anonymous_id", "a2", WAIT, |_| true).await;
    send(&channel, &key, vec![identify("m5", "u1", "a2", json!({}))])
        .await
        .expect("send");
    let merged = next(&mut merges).await;
    assert_eq!(merged.kind, "merged");
    assert_eq!(merged.merged_into, profile_id);
    assert_ne!(merged.profile_id, profile_id);

    let refused = client
        .clone()
        .watch_profile_changes(WatchProfileChangesRequest {
            cursor: "yesterday".into(),
            kinds: vec!["everything".into()],
            audiences: vec![],
        })
        .await
        .expect_err("invalid");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("cursor") && refused.message().contains("kinds[0]"));
}
