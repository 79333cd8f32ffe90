//! StreamIngestEvents: chunks are authenticated, validated and stored per event, with rejections
//! named by their position in the whole stream; on SQLite and on Postgres.

use futures::stream;
use tessera_proto::common::v1::Event;
use tessera_proto::ingestion::v1::{
    EventStatus, IngestEventsRequest, StreamIngestEventsRequest, StreamIngestEventsResponse,
};
use tonic::transport::Channel;

use crate::sources::{self, Client};
use crate::track;

fn chunk(events: Vec<Event>) -> StreamIngestEventsRequest {
    StreamIngestEventsRequest { events }
}

async fn stream_in(
    client: &mut Client,
    chunks: Vec<StreamIngestEventsRequest>,
) -> Result<StreamIngestEventsResponse, tonic::Status> {
    client
        .stream_ingest_events(stream::iter(chunks))
        .await
        .map(tonic::Response::into_inner)
}

/// The status IngestEvents gives each of `ids` sent again: whether the stream stored them.
async fn statuses(client: &mut Client, ids: &[&str]) -> Vec<i32> {
    let events = ids.iter().map(|id| track(id, "u1", "Again")).collect();
    client
        .ingest_events(IngestEventsRequest { events })
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.status)
        .collect()
}

async fn stores_valid_events_and_reports_invalid_ones_by_stream_position(channel: Channel) {
    let mut client = sources::client(channel);
    let no_type = Event {
        message_id: "no-type".into(),
        user_id: "u1".into(),
        ..Event::default()
    };
    let chunks = vec![
        chunk(vec![
            track("a1", "u1", "A"),
            track("no-user", "", "A"),
            track("a2", "u2", "A"),
        ]),
        chunk(vec![]),
        chunk(vec![
            track("a3", "u1", "B"),
            no_type,
            // The same message id as the first event: one stream can carry duplicates.
            track("a1", "u1", "A"),
        ]),
        chunk(vec![track("a4", "u3", "C")]),
    ];
    let summary = stream_in(&mut client, chunks).await.unwrap();
    assert_eq!(
        (summary.accepted, summary.duplicates, summary.rejected),
        (4, 1, 2)
    );
    let rejected: Vec<_> = summary
        .rejections
        .iter()
        .map(|r| {
            let fields: Vec<_> = r.violations.iter().map(|v| v.field.as_str()).collect();
            (r.index, r.message_id.as_str(), fields.join(","))
        })
        .collect();
    assert_eq!(
        rejected,
        vec![
            (1, "no-user", "user_id".to_owned()),
            (4, "no-type", "type".to_owned())
        ]
    );

    // The valid events are durable; the invalid ones were not stored.
    let duplicate = EventStatus::Duplicate as i32;
    let accepted = EventStatus::Accepted as i32;
    assert_eq!(
        statuses(&mut client, &["a1", "a2", "a3", "a4", "no-user", "no-type"]).await,
        vec![
            duplicate, duplicate, duplicate, duplicate, accepted, accepted
        ]
    );
}

async fn a_stream_sent_twice_is_stored_once(channel: Channel) {
    let mut client = sources::client(channel);
    let chunks = || {
        (0..3)
            .map(|c| {
                chunk(
                    (0..10)
                        .map(|i| track(&format!("m{c}-{i}"), "u1", "E"))
                        .collect(),
                )
            })
            .collect::<Vec<_>>()
    };
    let first = stream_in(&mut client, chunks()).await.unwrap();
    assert_eq!(
        (first.accepted, first.duplicates, first.rejected),
        (30, 0, 0)
    );
    let second = stream_in(&mut client, chunks()).await.unwrap();
    assert_eq!(
        (second.accepted, second.duplicates, second.rejected),
        (0, 30, 0)
    );
}

async fn refuses_unknown_write_keys(channel: Channel) {
    let mut stranger = sources::client_with(channel.clone(), "not-a-known-key");
    let err = stream_in(&mut stranger, vec![chunk(vec![track("k1", "u1", "E")])])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut client = sources::client(channel);
    assert_eq!(
        statuses(&mut client, &["k1"]).await,
        vec![EventStatus::Accepted as i32],
        "nothing of a refused stream is stored"
    );
}

async fn an_oversized_chunk_fails_the_call_and_earlier_chunks_stay(channel: Channel) {
    let mut client = sources::client(channel);
    let chunks = vec![
        chunk(vec![track("before", "u1", "E")]),
        chunk(
            (0..11)
                .map(|i| track(&format!("big{i}"), "u1", "E"))
                .collect(),
        ),
    ];
    let err = stream_in(&mut client, chunks).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        statuses(&mut client, &["before", "big0"]).await,
        vec![EventStatus::Duplicate as i32, EventStatus::Accepted as i32]
    );
}

async fn lists_the_first_thousand_rejections_and_counts_all(channel: Channel) {
    let mut client = sources::client(channel);
    let chunks = (0..101)
        .map(|c| {
            chunk(
                (0..10)
                    .map(|i| track(&format!("x{c}-{i}"), "", "E"))
                    .collect(),
            )
        })
        .chain([chunk(vec![track("last", "u1", "E")])])
        .collect();
    let summary = stream_in(&mut client, chunks).await.unwrap();
    assert_eq!((summary.accepted, summary.rejected), (1, 1_010));
    assert_eq!(summary.rejections.len(), 1_000);
    assert_eq!(summary.rejections[999].index, 999);
    assert_eq!(summary.rejections[999].message_id, "x99-9");
}

on_both_backends!(
    crate::grpc;
    stores_valid_events_and_reports_invalid_ones_by_stream_position,
    a_stream_sent_twice_is_stored_once,
    refuses_unknown_write_keys,
    an_oversized_chunk_fails_the_call_and_earlier_chunks_stay,
    lists_the_first_thousand_rejections_and_counts_all,
);

/// A stream is answered after its last chunk, so the server's request timeout does not cut it:
/// only the client's deadline bounds it.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_outlives_the_servers_request_timeout() {
    use futures::StreamExt;

    let dir = tessera_testkit::TestSqlite::new();
    let db = tessera_store::Database::connect(
        &dir.url("ingestion.db"),
        tessera_ingestion::SCHEMA,
        &tessera_store::DbSettings::default(),
    )
    .await
    .unwrap();
    db.migrate(tessera_ingestion::MIGRATIONS).await.unwrap();
    let ingestion =
        tessera_ingestion::Ingestion::new(db, tessera_ingestion::IngestionSettings::default())
            .await
            .unwrap();
    sources::with_test_source(&ingestion).await;
    let mut services = tessera_server::GrpcServices::default();
    ingestion.register(&mut services);
    let server = tessera_testkit::GrpcTestServer::start_with(
        services,
        tessera_server::EdgeSettings {
            request_timeout_ms: 100,
            ..tessera_server::EdgeSettings::default()
        },
    )
    .await;
    let mut client = sources::client(server.channel().await);

    // Three chunks 150 ms apart: the call lasts over 300 ms.
    let chunks = (0..3).map(|n| chunk(vec![track(&format!("slow-{n}"), "u1", "A")]));
    let slow = stream::iter(chunks).then(|c| async move {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        c
    });
    let started = std::time::Instant::now();
    let summary = client
        .stream_ingest_events(slow)
        .await
        .expect("not cut by the request timeout")
        .into_inner();
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!((summary.accepted, summary.rejected), (3, 0));
}
