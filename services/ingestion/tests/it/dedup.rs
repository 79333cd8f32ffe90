//! Deduplication over the configured window, through the gRPC API.

use tessera_ingestion::IngestionSettings;
use tessera_proto::ingestion::v1::{EventStatus, IngestEventsRequest};

use crate::{Backend, TestDatabase};

on_both_backends!(crate::backend; deduplicates_within_the_configured_window);

async fn deduplicates_within_the_configured_window(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let server = crate::serve(
        &db.url(),
        IngestionSettings {
            dedup_window_seconds: 1,
            ..IngestionSettings::default()
        },
    )
    .await;
    let mut client = crate::sources::client(server.channel().await);
    let mut send = async |id: &str| {
        let response = client
            .ingest_events(IngestEventsRequest {
                events: vec![crate::track(id, "u1", "A")],
            })
            .await
            .unwrap()
            .into_inner();
        (
            response.results[0].status,
            response.results[0].event_id.clone(),
        )
    };
    let (status, first) = send("m1").await;
    assert_eq!(status, EventStatus::Accepted as i32);
    let (status, again) = send("m1").await;
    assert_eq!(status, EventStatus::Duplicate as i32, "inside the window");
    assert_eq!(again, first);
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    let (status, later) = send("m1").await;
    assert_eq!(status, EventStatus::Accepted as i32, "after the window");
    assert_ne!(later, first);
}
