//! The ingestion gRPC API through the real server edge, on SQLite and on Postgres.

/// Runs each named test once on SQLite and once on Postgres: `$fixture(backend)` builds what the
/// test takes and something to keep alive for its duration (the database, the server).
macro_rules! on_both_backends {
    ($fixture:path; $($name:ident),* $(,)?) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let (_keep, fixture) = $fixture(crate::Backend::Sqlite).await;
                    super::$name(fixture).await;
                }
            )*
        }
        mod postgres {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let (_keep, fixture) = $fixture(crate::Backend::Postgres).await;
                    super::$name(fixture).await;
                }
            )*
        }
    };
}

mod backlog;
mod debugger;
mod dedup;
mod delivery;
mod event_log;
mod http_api;
mod http_harness;
mod http_wire;
mod sources;
mod stream;
mod tracking_plans;

use tessera_ingestion::{Ingestion, IngestionSettings, MIGRATIONS, SCHEMA};
use tessera_proto::common::v1::{Event, EventType};
use tessera_proto::ingestion::v1::{EventStatus, IngestEventsRequest};
use tessera_server::GrpcServices;
use tessera_store::{Database, DbSettings};
use tessera_testkit::GrpcTestServer;
use tonic::transport::Channel;
use tonic_types::StatusExt;

async fn serve(url: &str, settings: IngestionSettings) -> GrpcTestServer {
    let db = Database::connect(url, SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    let ingestion = Ingestion::new(db, settings).await.unwrap();
    sources::with_test_source(&ingestion).await;
    let mut services = GrpcServices::default();
    ingestion.register(&mut services);
    GrpcTestServer::start(services).await
}

pub(crate) fn track(message_id: &str, user_id: &str, name: &str) -> Event {
    Event {
        message_id: message_id.to_owned(),
        r#type: EventType::Track.into(),
        user_id: user_id.to_owned(),
        event: name.to_owned(),
        ..Event::default()
    }
}

async fn rejects_invalid_events_naming_each_field(channel: Channel) {
    let mut client = sources::client(channel);
    let events = vec![
        track("ok", "u1", "Fine"),
        track("no-user", "", "Anonymous nobody"),
        Event {
            message_id: "no-type".into(),
            user_id: "u1".into(),
            ..Event::default()
        },
        track("no-name", "u1", ""),
        Event {
            timestamp: Some(prost_types::Timestamp {
                seconds: 400_000_000_000,
                nanos: 0,
            }),
            ..track("far-future", "u1", "Later")
        },
    ];
    let err = client
        .ingest_events(IngestEventsRequest { events })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let details = err.get_error_details();
    let fields: Vec<_> = details
        .bad_request()
        .expect("BadRequest details")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(
        fields,
        vec![
            "events[1].user_id",
            "events[2].type",
            "events[3].event",
            "events[4].timestamp"
        ]
    );

    // Nothing of the rejected batch was stored: the valid event is new when sent alone.
    let ok = client
        .ingest_events(IngestEventsRequest {
            events: vec![track("ok", "u1", "Fine")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.results[0].status, EventStatus::Accepted as i32);
}

async fn acknowledges_duplicates_with_the_original_id(channel: Channel) {
    let mut client = sources::client(channel);
    let batch = vec![track("m1", "u1", "A"), track("", "u1", "B")];
    let first = client
        .ingest_events(IngestEventsRequest {
            events: batch.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        first
            .results
            .iter()
            .all(|r| r.status == EventStatus::Accepted as i32)
    );
    assert!(
        !first.results[1].message_id.is_empty(),
        "a message id is generated"
    );
    let second = client
        .ingest_events(IngestEventsRequest { events: batch })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.results[0].status, EventStatus::Duplicate as i32);
    assert_eq!(second.results[0].event_id, first.results[0].event_id);
    // Without a message id the client gave no dedup key: a new message.
    assert_eq!(second.results[1].status, EventStatus::Accepted as i32);
}

async fn refuses_oversized_batches(channel: Channel) {
    let mut client = sources::client(channel);
    let events = (0..11).map(|i| track(&format!("m{i}"), "u", "E")).collect();
    let err = client
        .ingest_events(IngestEventsRequest { events })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.message().contains("events"), "{err:?}");
}

/// Which system of record a test runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh database of one backend, removed when dropped.
pub(crate) enum TestDatabase {
    Sqlite(tessera_testkit::TestSqlite),
    Postgres(tessera_testkit::TestDb),
}

impl TestDatabase {
    pub(crate) async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Self::Sqlite(tessera_testkit::TestSqlite::new()),
            Backend::Postgres => Self::Postgres(tessera_testkit::TestDb::new().await),
        }
    }

    pub(crate) fn url(&self) -> String {
        match self {
            Self::Sqlite(dir) => dir.url("ingestion.db"),
            Self::Postgres(db) => db.url().to_owned(),
        }
    }
}

/// The fixture of the gRPC tests: a served ingestion with small batches, and a channel to it.
pub(crate) async fn grpc(backend: Backend) -> ((TestDatabase, GrpcTestServer), Channel) {
    let db = TestDatabase::new(backend).await;
    let server = serve(&db.url(), small_batches()).await;
    let channel = server.channel().await;
    ((db, server), channel)
}

/// The fixture of tests that take the backend itself.
pub(crate) async fn backend(backend: Backend) -> ((), Backend) {
    ((), backend)
}

fn small_batches() -> IngestionSettings {
    IngestionSettings {
        max_batch: 10,
        ..IngestionSettings::default()
    }
}

on_both_backends!(
    grpc;
    rejects_invalid_events_naming_each_field,
    acknowledges_duplicates_with_the_original_id,
    refuses_oversized_batches,
);
