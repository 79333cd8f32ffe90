//! Tracking plans through every front door (gRPC unary, gRPC stream, HTTP), on SQLite and on
//! Postgres: `allow` ignores the plan, `warn` stores with the violations recorded, `block`
//! refuses naming the schema rule and quarantines; after the plan is fixed a replay stores each
//! quarantined message exactly once.

use std::collections::HashMap;

use serde_json::{Value, json};
use tessera_ingestion::IngestionSettings;
use tessera_proto::common::v1::Event;
use tessera_proto::ingestion::v1::tracking_plan_service_client::TrackingPlanServiceClient;
use tessera_proto::ingestion::v1::{
    DeleteQuarantinedRequest, EventStatus, GetTrackingPlanRequest, IngestEventsRequest,
    ListQuarantinedRequest, PutTrackingPlanRequest, ReplayQuarantinedRequest,
    ReplayQuarantinedResponse, StreamIngestEventsRequest, TrackingPlan, TrackingPlanMode,
    UpdateSourceRequest,
};
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::http_harness::{Api, KEY};

type Plans = TrackingPlanServiceClient<Channel>;

const ORDER: &str = "Order Completed";

/// The fixture of these tests: the API on a fresh database (which it keeps alive).
async fn api(backend: crate::Backend) -> ((), Api) {
    ((), Api::start(backend, settings()).await)
}

fn settings() -> IngestionSettings {
    IngestionSettings::default()
}

/// A plan requiring a numeric `price` on "Order Completed", `price_type` as given.
fn plan(price_type: Value) -> TrackingPlan {
    let schema = json!({
        "type": "object",
        "properties": {"price": {"type": price_type}},
        "required": ["price"],
    });
    TrackingPlan {
        track_events: HashMap::from([(ORDER.to_owned(), schema.to_string())]),
        ..TrackingPlan::default()
    }
}

fn order(message_id: &str, price: Value) -> Event {
    Event {
        properties: Some(tessera_proto::convert::json_map_to_struct(
            json!({"price": price}).as_object().unwrap(),
        )),
        ..crate::track(message_id, "u1", ORDER)
    }
}

fn order_json(message_id: &str, price: Value) -> Value {
    json!({"type": "track", "messageId": message_id, "userId": "u1", "event": ORDER,
           "properties": {"price": price}})
}

async fn set_mode(api: &Api, mode: TrackingPlanMode) {
    api.sources()
        .await
        .update_source(UpdateSourceRequest {
            name: "default".to_owned(),
            tracking_plan_mode: mode.into(),
            ..UpdateSourceRequest::default()
        })
        .await
        .unwrap();
}

async fn put(plans: &mut Plans, plan: TrackingPlan) -> TrackingPlan {
    plans
        .put_tracking_plan(PutTrackingPlanRequest {
            source_name: "default".to_owned(),
            plan: Some(plan),
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap()
}

async fn replay(plans: &mut Plans) -> ReplayQuarantinedResponse {
    plans
        .replay_quarantined(ReplayQuarantinedRequest {
            source_name: "default".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// How often each message id is in the log.
async fn count(api: &Api, message_id: &str) -> usize {
    api.message_ids()
        .await
        .iter()
        .filter(|m| *m == message_id)
        .count()
}

async fn plans_are_versioned_and_validated(api: Api) {
    let mut plans = Plans::new(api.channel().await);
    let empty = plans
        .get_tracking_plan(GetTrackingPlanRequest {
            source_name: "default".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    assert_eq!(empty.version, 0);
    assert!(empty.track_events.is_empty());

    assert_eq!(put(&mut plans, plan(json!("number"))).await.version, 1);
    let second = put(&mut plans, plan(json!("string"))).await;
    assert_eq!(second.version, 2);
    assert!(second.update_time.is_some());
    let got = plans
        .get_tracking_plan(GetTrackingPlanRequest {
            source_name: "default".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    assert_eq!(got.version, 2);
    let schema: Value = serde_json::from_str(&got.track_events[ORDER]).unwrap();
    assert_eq!(schema["properties"]["price"]["type"], "string");

    // A schema that does not compile is named; the plan stays at version 2.
    let mut bad = plan(json!("number"));
    bad.track_events
        .insert("Broken".to_owned(), r#"{"type": 12}"#.to_owned());
    let err = plans
        .put_tracking_plan(PutTrackingPlanRequest {
            source_name: "default".to_owned(),
            plan: Some(bad),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let details = err.get_error_details();
    let violations = &details.bad_request().expect("BadRequest").field_violations;
    assert_eq!(violations[0].field, "plan.track_events[\"Broken\"]");

    let err = plans
        .get_tracking_plan(GetTrackingPlanRequest {
            source_name: "nobody".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = plans
        .replay_quarantined(ReplayQuarantinedRequest {
            source_name: "nobody".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

async fn allow_ignores_the_plan(api: Api) {
    let mut plans = Plans::new(api.channel().await);
    put(&mut plans, plan(json!("number"))).await;
    // The default mode is allow.
    api.post_json("/v1/track", &order_json("h1", json!("free")))
        .await
        .assert_success();
    let mut ingest = crate::sources::client_with(api.channel().await, KEY);
    ingest
        .ingest_events(IngestEventsRequest {
            events: vec![order("g1", json!("free"))],
        })
        .await
        .unwrap();
    for id in ["h1", "g1"] {
        assert_eq!(api.payload(id).await["context"]["tessera"], Value::Null);
    }
}

async fn warn_records_violations_and_stores(api: Api) {
    let mut plans = Plans::new(api.channel().await);
    set_mode(&api, TrackingPlanMode::Warn).await;
    put(&mut plans, plan(json!("number"))).await;

    api.post_json("/v1/track", &order_json("h1", json!("free")))
        .await
        .assert_success();
    let mut ingest = crate::sources::client_with(api.channel().await, KEY);
    let results = ingest
        .ingest_events(IngestEventsRequest {
            events: vec![order("g1", json!("free")), order("g2", json!(5))],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(
        results
            .iter()
            .all(|r| r.status == EventStatus::Accepted as i32)
    );
    for id in ["h1", "g1"] {
        let tessera = &api.payload(id).await["context"]["tessera"];
        assert_eq!(tessera["planVersion"], 1, "{id}");
        let violation = &tessera["violations"][0];
        assert_eq!(violation["field"], "properties.price", "{id}");
        assert_eq!(violation["schemaPath"], "/properties/price/type", "{id}");
        assert_eq!(violation["schema"], "track_events[\"Order Completed\"]");
    }
    assert_eq!(api.payload("g2").await["context"]["tessera"], Value::Null);
    let quarantined = plans
        .list_quarantined(ListQuarantinedRequest {
            source_name: "default".to_owned(),
            ..ListQuarantinedRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(quarantined.events.is_empty());
}

async fn block_refuses_quarantines_and_replays_once(api: Api) {
    let mut plans = Plans::new(api.channel().await);
    set_mode(&api, TrackingPlanMode::Block).await;
    put(&mut plans, plan(json!("number"))).await;
    let mut ingest = crate::sources::client_with(api.channel().await, KEY);

    // gRPC unary: all or nothing; the violation names the field, the schema and the rule.
    let err = ingest
        .ingest_events(IngestEventsRequest {
            events: vec![order("g-ok", json!(1)), order("g-bad", json!("free"))],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let details = err.get_error_details();
    let violation = &details.bad_request().expect("BadRequest").field_violations[0];
    assert_eq!(violation.field, "events[1].properties.price");
    assert!(
        violation.description.contains("/properties/price/type")
            && violation.description.contains("Order Completed")
            && violation.description.contains("quarantined"),
        "{}",
        violation.description
    );
    assert_eq!(count(&api, "g-ok").await, 0);

    // gRPC stream: the valid message is stored, the blocked one reported.
    let chunk = StreamIngestEventsRequest {
        events: vec![order("s-ok", json!(2)), order("s-bad", json!("free"))],
    };
    let summary = ingest
        .stream_ingest_events(futures::stream::iter(vec![chunk]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((summary.accepted, summary.rejected), (1, 1));
    assert_eq!(summary.rejections[0].index, 1);
    assert_eq!(summary.rejections[0].message_id, "s-bad");
    assert_eq!(
        summary.rejections[0].violations[0].field,
        "properties.price"
    );

    // HTTP: the partial-batch policy, the 400 listing the blocked message.
    let reply = api
        .post_json(
            "/v1/batch",
            &json!({"batch": [order_json("h-ok", json!(3)), order_json("h-bad", json!("free"))]}),
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(
        reply.errors(),
        vec![(Some(1), "batch[1].properties.price".to_owned())]
    );
    let message = reply.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("/properties/price/type"), "{message}");
    // The same blocked message again: quarantined twice, stored once after the replay.
    api.post_json("/v1/track", &order_json("h-bad", json!("free")))
        .await;
    for id in ["s-ok", "h-ok"] {
        assert_eq!(count(&api, id).await, 1);
    }

    // The quarantine, a page at a time.
    let list = |token: String| ListQuarantinedRequest {
        source_name: "default".to_owned(),
        page_size: 3,
        page_token: token,
    };
    let first = plans
        .list_quarantined(list(String::new()))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = first.events.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids, ["g-bad", "s-bad", "h-bad"]);
    assert_eq!(first.events[0].plan_version, 1);
    assert_eq!(first.events[0].violations[0].field, "properties.price");
    assert_eq!(first.events[0].event.as_ref().unwrap().event, ORDER);
    let second = plans
        .list_quarantined(list(first.next_page_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.events.len(), 1);
    assert_eq!(second.events[0].message_id, "h-bad");
    assert!(second.next_page_token.is_empty());

    // Replaying against the same plan changes nothing.
    let same = replay(&mut plans).await;
    assert_eq!(
        (same.stored, same.duplicates, same.still_failing),
        (0, 0, 4)
    );

    // Fixed plan: every quarantined message is stored exactly once.
    put(&mut plans, plan(json!(["number", "string"]))).await;
    let fixed = replay(&mut plans).await;
    assert_eq!(
        (fixed.stored, fixed.duplicates, fixed.still_failing),
        (3, 1, 0)
    );
    for id in ["g-bad", "s-bad", "h-bad"] {
        assert_eq!(count(&api, id).await, 1, "{id}");
    }
    let again = replay(&mut plans).await;
    assert_eq!(
        (again.stored, again.duplicates, again.still_failing),
        (0, 0, 0)
    );
    // The message the client re-sends later is a duplicate, not a second copy.
    ingest
        .ingest_events(IngestEventsRequest {
            events: vec![order("g-bad", json!("free"))],
        })
        .await
        .unwrap();
    assert_eq!(count(&api, "g-bad").await, 1);

    // Deleting: by id, or all.
    put(&mut plans, plan(json!("number"))).await;
    api.post_json("/v1/track", &order_json("d1", json!("free")))
        .await;
    api.post_json("/v1/track", &order_json("d2", json!("free")))
        .await;
    let listed = plans
        .list_quarantined(list(String::new()))
        .await
        .unwrap()
        .into_inner();
    let delete = |ids: Vec<i64>, all: bool| DeleteQuarantinedRequest {
        source_name: "default".to_owned(),
        ids,
        all,
    };
    let err = plans
        .delete_quarantined(delete(vec![], false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let one = plans
        .delete_quarantined(delete(vec![listed.events[0].id], false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.deleted, 1);
    let rest = plans
        .delete_quarantined(delete(vec![], true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.deleted, 1);
    assert_eq!(count(&api, "d1").await + count(&api, "d2").await, 0);
}

on_both_backends!(
    api;
    plans_are_versioned_and_validated,
    allow_ignores_the_plan,
    warn_records_violations_and_stores,
    block_refuses_quarantines_and_replays_once,
);
