//! The internal EventLogService over gRPC: ForgetEvents validates naming each field, deletes the
//! listed events and their dedup keys, and counts only what it deleted.

use tessera_proto::common::v1::Identifier;
use tessera_proto::ingestion::v1::event_log_service_client::EventLogServiceClient;
use tessera_proto::ingestion::v1::{
    EventStatus, ForgetEventsRequest, ForgetEventsResponse, IngestEventsRequest,
};
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::track;

on_both_backends!(
    crate::grpc;
    forget_events_names_each_invalid_field,
    forget_events_deletes_events_and_their_message_ids,
);

fn identifier(kind: &str, value: &str) -> Identifier {
    Identifier {
        r#type: kind.to_owned(),
        value: value.to_owned(),
    }
}

/// The fields an INVALID_ARGUMENT status names, in order.
async fn refused_fields(channel: Channel, request: ForgetEventsRequest) -> Vec<String> {
    let status = EventLogServiceClient::new(channel)
        .forget_events(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .expect("BadRequest details")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

async fn forget_events_names_each_invalid_field(channel: Channel) {
    let fields = refused_fields(
        channel.clone(),
        ForgetEventsRequest {
            event_ids: vec![
                uuid::Uuid::now_v7().to_string(),
                "not-a-uuid".into(),
                String::new(),
            ],
            identifiers: vec![
                identifier("user_id", "u1"),
                identifier("", "u2"),
                identifier("email", ""),
            ],
        },
    )
    .await;
    assert_eq!(
        fields,
        [
            "event_ids[1]",
            "event_ids[2]",
            "identifiers[1]",
            "identifiers[2]"
        ]
    );

    // Over the limit: the request (about 4 MB) still gets through and names the list.
    let fields = refused_fields(
        channel,
        ForgetEventsRequest {
            event_ids: vec![uuid::Uuid::now_v7().to_string(); 100_001],
            identifiers: Vec::new(),
        },
    )
    .await;
    assert_eq!(fields, ["event_ids"]);
}

async fn forget_events_deletes_events_and_their_message_ids(channel: Channel) {
    let mut ingest = crate::sources::client(channel.clone());
    let mut send = async |events| {
        ingest
            .ingest_events(IngestEventsRequest { events })
            .await
            .unwrap()
            .into_inner()
            .results
    };
    let first = send(vec![track("m1", "u1", "A"), track("m2", "u1", "B")]).await;
    let mut forget = EventLogServiceClient::new(channel);
    let request = ForgetEventsRequest {
        event_ids: vec![first[0].event_id.clone(), uuid::Uuid::now_v7().to_string()],
        identifiers: vec![identifier("user_id", "u1")],
    };
    let response = forget
        .forget_events(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response,
        ForgetEventsResponse {
            events: 1,
            quarantined: 0
        },
        "the unknown id is not counted"
    );
    let again = forget.forget_events(request).await.unwrap().into_inner();
    assert_eq!(again.events, 0, "idempotent");

    // m1's dedup key went with it: sent again, it is a new message; m2 is still a duplicate.
    let resent = send(vec![track("m1", "u1", "A"), track("m2", "u1", "B")]).await;
    assert_eq!(resent[0].status, EventStatus::Accepted as i32);
    assert_ne!(resent[0].event_id, first[0].event_id);
    assert_eq!(resent[1].status, EventStatus::Duplicate as i32);
    assert_eq!(resent[1].event_id, first[1].event_id);
}
