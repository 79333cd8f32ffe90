//! A stalled pipeline: once the undelivered backlog passes its limit, new events are refused
//! with RESOURCE_EXHAUSTED and a retry hint instead of filling the disk.

use std::time::Duration;

use tessera_ingestion::{Ingestion, IngestionSettings, MIGRATIONS, SCHEMA};
use tessera_proto::ingestion::v1::IngestEventsRequest;
use tessera_server::{GrpcServices, Shutdown};
use tessera_store::{Database, DbSettings};
use tessera_testkit::{GrpcTestServer, TestSqlite};
use tonic_types::StatusExt;

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_over_its_limit_refuses_new_events() {
    let dir = TestSqlite::new();
    let db = Database::connect(&dir.url("ingestion.db"), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    let ingestion = Ingestion::new(
        db,
        IngestionSettings {
            max_backlog_events: 5,
            backlog_interval_ms: 100,
            ..IngestionSettings::default()
        },
    )
    .await
    .unwrap();
    crate::sources::with_test_source(&ingestion).await;
    // Peers that never answer: nothing is delivered, the backlog only grows.
    let nowhere = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    let stop = Shutdown::new();
    let delivery = ingestion.spawn_delivery(nowhere.clone(), nowhere, stop.clone());
    let mut services = GrpcServices::default();
    ingestion.register(&mut services);
    let server = GrpcTestServer::start(services).await;
    let mut client = crate::sources::client(server.channel().await);

    let batch = |from: usize| IngestEventsRequest {
        events: (from..from + 10)
            .map(|i| crate::track(&format!("b{i}"), "u1", "E"))
            .collect(),
    };
    client
        .ingest_events(batch(0))
        .await
        .expect("under the limit");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut next = 10;
    let refused = loop {
        match client.ingest_events(batch(next)).await {
            Err(status) => break status,
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "never refused");
                next += 10;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    let details = refused.get_error_details();
    let retry = details.retry_info().expect("a retry hint");
    assert_eq!(
        retry.retry_delay,
        Some(Duration::from_secs(5)),
        "the backlog's own retry delay, not a generic one"
    );
    stop.cancel();
    delivery.await.unwrap();
}
