//! Tracking plans end to end, against `tessera dev`: a plan in `block` mode refuses a violating
//! message over gRPC and keeps it in the quarantine; once the plan is fixed, a replay stores it
//! exactly once.

use std::collections::HashMap;

use tessera_proto::ingestion::v1::source_service_client::SourceServiceClient;
use tessera_proto::ingestion::v1::tracking_plan_service_client::TrackingPlanServiceClient;
use tessera_proto::ingestion::v1::{
    ListQuarantinedRequest, PutTrackingPlanRequest, ReplayQuarantinedRequest, TrackingPlan,
    TrackingPlanMode, UpdateSourceRequest,
};
use tessera_tests::TesseraBuilder;
use tessera_tests::events::{send, track};

fn plan(price_type: serde_json::Value) -> TrackingPlan {
    let schema = serde_json::json!({"properties": {"price": {"type": price_type}}});
    TrackingPlan {
        track_events: HashMap::from([("Order Completed".to_owned(), schema.to_string())]),
        ..TrackingPlan::default()
    }
}

fn put(plan: TrackingPlan) -> PutTrackingPlanRequest {
    PutTrackingPlanRequest {
        source_name: "default".into(),
        plan: Some(plan),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_message_is_quarantined_and_replayed_once_the_plan_is_fixed() {
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let key = tessera.dev_write_key().to_owned();
    let channel = tessera.channel().await;
    SourceServiceClient::new(channel.clone())
        .update_source(UpdateSourceRequest {
            name: "default".into(),
            tracking_plan_mode: TrackingPlanMode::Block.into(),
            ..UpdateSourceRequest::default()
        })
        .await
        .expect("block mode");
    let mut plans = TrackingPlanServiceClient::new(channel.clone());
    plans
        .put_tracking_plan(put(plan(serde_json::json!("number"))))
        .await
        .expect("put");

    let bad = track(
        "q1",
        "u1",
        "",
        "Order Completed",
        serde_json::json!({"price": "free"}),
    );
    let err = send(&channel, &key, vec![bad]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // The message names the field, the schema and the failing rule.
    let message = err.message();
    assert!(
        message.contains("events[0].properties.price")
            && message.contains("Order Completed")
            && message.contains("/properties/price/type"),
        "{message}"
    );

    let quarantined = plans
        .list_quarantined(ListQuarantinedRequest {
            source_name: "default".into(),
            ..ListQuarantinedRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quarantined.events.len(), 1);
    assert_eq!(quarantined.events[0].message_id, "q1");

    plans
        .put_tracking_plan(put(plan(serde_json::json!(["number", "string"]))))
        .await
        .expect("fixed plan");
    let replay = ReplayQuarantinedRequest {
        source_name: "default".into(),
    };
    let done = plans
        .replay_quarantined(replay.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (done.stored, done.duplicates, done.still_failing),
        (1, 0, 0)
    );
    let again = plans.replay_quarantined(replay).await.unwrap().into_inner();
    assert_eq!(
        (again.stored, again.duplicates, again.still_failing),
        (0, 0, 0)
    );
    // The client's own re-send after the replay is a duplicate.
    let resent = track(
        "q1",
        "u1",
        "",
        "Order Completed",
        serde_json::json!({"price": "free"}),
    );
    let statuses = send(&channel, &key, vec![resent])
        .await
        .expect("accepted now");
    assert_eq!(
        statuses,
        vec![tessera_proto::ingestion::v1::EventStatus::Duplicate as i32]
    );
}
