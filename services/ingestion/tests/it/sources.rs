//! Sources over gRPC: IngestEvents authenticates with a write key and stores events under the
//! key's source; the SourceService admin API. Also the authenticated client every gRPC test of
//! this binary uses.

use tessera_ingestion::{Ingestion, IngestionSettings, MIGRATIONS, SCHEMA};
use tessera_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use tessera_proto::ingestion::v1::source_service_client::SourceServiceClient;
use tessera_proto::ingestion::v1::{
    CreateSourceRequest, DisableSourceRequest, EnableSourceRequest, EventStatus, GetSourceRequest,
    IngestEventsRequest, ListSourcesRequest, RotateWriteKeyRequest, TrackingPlanMode,
    UpdateSourceRequest,
};
use tessera_server::GrpcServices;
use tessera_store::{Database, DbSettings};
use tessera_testkit::GrpcTestServer;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::track;

/// The write key of the source `default` that test servers of this binary start with.
pub(crate) const KEY: &str = "it-write-key";

/// Adds a write key to every call, as `x-tessera-write-key` or as HTTP Basic auth.
#[derive(Debug, Clone)]
pub(crate) struct WithKey {
    header: &'static str,
    value: MetadataValue<Ascii>,
}

impl WithKey {
    fn header(key: &str) -> Self {
        Self {
            header: "x-tessera-write-key",
            value: key.parse().expect("ascii key"),
        }
    }

    fn basic(key: &str) -> Self {
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
        Self {
            header: "authorization",
            value: format!("Basic {encoded}").parse().expect("ascii"),
        }
    }
}

impl Interceptor for WithKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(self.header, self.value.clone());
        Ok(request)
    }
}

/// An IngestionService client that sends a write key.
pub(crate) type Client = IngestionServiceClient<InterceptedService<Channel, WithKey>>;

/// A client on `channel` that sends [`KEY`].
pub(crate) fn client(channel: Channel) -> Client {
    client_with(channel, KEY)
}

/// A client on `channel` that sends `key` in `x-tessera-write-key`.
pub(crate) fn client_with(channel: Channel, key: &str) -> Client {
    IngestionServiceClient::with_interceptor(channel, WithKey::header(key))
}

/// Gives `ingestion` the source `default` with the write key [`KEY`].
pub(crate) async fn with_test_source(ingestion: &Ingestion) {
    ingestion
        .ensure_dev_source(Some(KEY))
        .await
        .expect("test source");
}

struct Served {
    server: GrpcTestServer,
    db: Database,
}

/// The fixture of the source tests: a served ingestion on a fresh database.
async fn fixture(backend: crate::Backend) -> (crate::TestDatabase, Served) {
    let db = crate::TestDatabase::new(backend).await;
    let served = serve(&db.url()).await;
    (db, served)
}

async fn serve(url: &str) -> Served {
    let db = Database::connect(url, SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    let ingestion = Ingestion::new(db.clone(), IngestionSettings::default())
        .await
        .unwrap();
    let mut services = GrpcServices::default();
    ingestion.register(&mut services);
    Served {
        server: GrpcTestServer::start(services).await,
        db,
    }
}

/// The source ids the log holds for `message_id`, in no particular order.
async fn stored_sources(db: &Database, message_id: &str) -> Vec<String> {
    let sql = "SELECT source_id FROM events WHERE message_id = $1 ORDER BY source_id";
    let mut ids: Vec<String> = match db {
        Database::Postgres(pool) => sqlx::query_scalar(sql)
            .bind(message_id)
            .fetch_all(pool)
            .await
            .unwrap(),
        Database::Sqlite(pool) => sqlx::query_scalar(sql)
            .bind(message_id)
            .fetch_all(pool)
            .await
            .unwrap(),
    };
    ids.sort();
    ids
}

async fn create(
    admin: &mut SourceServiceClient<Channel>,
    name: &str,
    rate: u32,
) -> (String, String) {
    let created = admin
        .create_source(CreateSourceRequest {
            name: name.to_owned(),
            rate_limit_per_second: rate,
            tracking_plan_mode: TrackingPlanMode::Unspecified.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (created.source.unwrap().id, created.write_key)
}

fn one(message_id: &str) -> IngestEventsRequest {
    IngestEventsRequest {
        events: vec![track(message_id, "u1", "E")],
    }
}

async fn ingest_requires_a_valid_write_key(s: Served) {
    let channel = s.server.channel().await;
    let mut admin = SourceServiceClient::new(channel.clone());
    create(&mut admin, "web", 0).await;

    let missing = IngestionServiceClient::new(channel.clone())
        .ingest_events(one("m1"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::Unauthenticated, "{missing:?}");
    for bad in [
        WithKey::header("tsk_unknown"),
        WithKey::header(""),
        WithKey::basic("tsk_unknown"),
        WithKey {
            header: "authorization",
            value: "Basic !!not-base64".parse().unwrap(),
        },
    ] {
        let err = IngestionServiceClient::with_interceptor(channel.clone(), bad.clone())
            .ingest_events(one("m1"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}: {err:?}");
    }
    assert!(
        stored_sources(&s.db, "m1").await.is_empty(),
        "nothing stored"
    );
}

async fn events_are_stored_under_the_source_of_their_key(s: Served) {
    let channel = s.server.channel().await;
    let mut admin = SourceServiceClient::new(channel.clone());
    let (web_id, web_key) = create(&mut admin, "web", 0).await;
    let (ios_id, ios_key) = create(&mut admin, "ios", 0).await;

    let by_header = client_with(channel.clone(), &web_key)
        .ingest_events(one("same"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_header.results[0].status, EventStatus::Accepted as i32);
    // The same message id from another source is another message: deduplication is per source.
    let by_basic =
        IngestionServiceClient::with_interceptor(channel.clone(), WithKey::basic(&ios_key))
            .ingest_events(one("same"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(by_basic.results[0].status, EventStatus::Accepted as i32);
    let again = client_with(channel, &web_key)
        .ingest_events(one("same"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.results[0].status, EventStatus::Duplicate as i32);

    let mut want = vec![web_id, ios_id];
    want.sort();
    assert_eq!(stored_sources(&s.db, "same").await, want);
}

async fn disabled_and_rotated_keys_are_refused(s: Served) {
    let channel = s.server.channel().await;
    let mut admin = SourceServiceClient::new(channel.clone());
    let (_, key) = create(&mut admin, "web", 0).await;
    let mut web = client_with(channel.clone(), &key);
    web.ingest_events(one("a")).await.expect("enabled");

    let disabled = admin
        .disable_source(DisableSourceRequest { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!disabled.source.unwrap().enabled);
    let err = web.ingest_events(one("b")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    admin
        .enable_source(EnableSourceRequest { name: "web".into() })
        .await
        .unwrap();
    web.ingest_events(one("b")).await.expect("enabled again");

    let rotated = admin
        .rotate_write_key(RotateWriteKeyRequest { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.write_key, key);
    let source = rotated.source.unwrap();
    assert!(rotated.write_key.starts_with(&source.write_key_prefix));
    assert!(source.key_rotate_time.is_some());
    let err = web.ingest_events(one("c")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "the old key");
    client_with(channel, &rotated.write_key)
        .ingest_events(one("c"))
        .await
        .expect("the new key");
}

async fn a_source_over_its_rate_limit_is_refused_with_a_retry_hint(s: Served) {
    let channel = s.server.channel().await;
    let mut admin = SourceServiceClient::new(channel.clone());
    let (_, key) = create(&mut admin, "slow", 3).await;
    let mut slow = client_with(channel, &key);
    let three = IngestEventsRequest {
        events: (0..3).map(|i| track(&format!("r{i}"), "u1", "E")).collect(),
    };
    slow.ingest_events(three).await.expect("within the limit");
    let err = slow.ingest_events(one("r3")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.get_error_details().retry_info().is_some(),
        "a retry hint"
    );
    assert!(stored_sources(&s.db, "r3").await.is_empty(), "not stored");
}

async fn the_admin_api_validates_and_reports_conflicts(s: Served) {
    let mut admin = SourceServiceClient::new(s.server.channel().await);
    let err = admin
        .create_source(CreateSourceRequest {
            name: "not a name".into(),
            rate_limit_per_second: 0,
            tracking_plan_mode: 42,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let fields: Vec<_> = err
        .get_error_details()
        .bad_request()
        .expect("BadRequest details")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, vec!["tracking_plan_mode"]);
    let err = admin
        .create_source(CreateSourceRequest {
            name: "not a name".into(),
            ..CreateSourceRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let details = err.get_error_details();
    assert_eq!(
        details.bad_request().unwrap().field_violations[0].field,
        "name"
    );

    let created = admin
        .create_source(CreateSourceRequest {
            name: "web".into(),
            rate_limit_per_second: 50,
            tracking_plan_mode: TrackingPlanMode::Warn.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.write_key.starts_with("tsk_"));
    let source = created.source.unwrap();
    assert_eq!(source.rate_limit_per_second, 50);
    assert_eq!(source.tracking_plan_mode, TrackingPlanMode::Warn as i32);
    assert!(source.enabled);
    let err = admin
        .create_source(CreateSourceRequest {
            name: "web".into(),
            ..CreateSourceRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("name"), "{err:?}");
    let err = admin
        .get_source(GetSourceRequest {
            name: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let updated = admin
        .update_source(UpdateSourceRequest {
            name: "web".into(),
            rate_limit_per_second: Some(0),
            tracking_plan_mode: TrackingPlanMode::Unspecified.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .source
        .unwrap();
    assert_eq!(updated.rate_limit_per_second, 0, "limit removed");
    assert_eq!(
        updated.tracking_plan_mode,
        TrackingPlanMode::Warn as i32,
        "mode kept"
    );
    let got = admin
        .get_source(GetSourceRequest { name: "web".into() })
        .await
        .unwrap()
        .into_inner()
        .source
        .unwrap();
    assert_eq!(got, updated);
    let listed = admin
        .list_sources(ListSourcesRequest {})
        .await
        .unwrap()
        .into_inner()
        .sources;
    assert_eq!(listed, vec![updated]);
}

on_both_backends!(
    fixture;
    ingest_requires_a_valid_write_key,
    events_are_stored_under_the_source_of_their_key,
    disabled_and_rotated_keys_are_refused,
    a_source_over_its_rate_limit_is_refused_with_a_retry_hint,
    the_admin_api_validates_and_reports_conflicts,
);
