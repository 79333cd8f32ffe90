//! Tessera's ingestion service: accepts events, makes them durable in the event log before
//! acknowledging them, and delivers them asynchronously down the pipeline (identity resolution,
//! then the profile, which has them scored).

mod accept;
mod convert;
mod debugger;
mod delivery;
mod error;
mod forget;
#[doc(hidden)]
pub mod fuzzing;
mod group;
mod http;
mod plans;
mod service;
mod sources;
mod store;

use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use tessera_store::{Database, Migrations};
use tokio::sync::Notify;

pub use error::IngestError;
pub use http::segment_message;
pub use sources::{DEV_SOURCE, DevSource, KEY_CACHE_TTL, SourceError, is_valid_write_key};

/// The Postgres schema the service's tables live in.
pub const SCHEMA: &str = "ingestion";

static PG_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The service's migrations.
pub static MIGRATIONS: Migrations = Migrations {
    postgres: &PG_MIGRATOR,
    sqlite: &SQLITE_MIGRATOR,
};

/// The ingestion service's settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestionSettings {
    /// The most events accepted in one request.
    pub max_batch: usize,
    /// How many delivery partitions the log is split into on first start. Events with the same
    /// routing key (user id, else anonymous id) share a partition and are delivered in order.
    /// Fixed once the log exists: the stored count wins over this setting.
    pub partitions: i32,
    /// The most events delivered in one batch.
    pub delivery_batch: i64,
    /// How long a dispatcher's lease of a partition lasts without renewal, in seconds.
    pub lease_seconds: u64,
    /// How often an idle dispatcher looks for new events written by other replicas, in
    /// milliseconds (events written through this replica wake it at once).
    pub poll_interval_ms: u64,
    /// The longest wait between delivery retries, in milliseconds.
    pub max_backoff_ms: u64,
    /// Above this many undelivered events, new events are refused with RESOURCE_EXHAUSTED (HTTP
    /// 429) until delivery catches up, so a stalled pipeline cannot fill the disk; 0: no limit.
    /// Measured every `backlog_interval_ms`.
    pub max_backlog_events: i64,
    /// How often the backlog is measured, in milliseconds; at least 20 times as long as the
    /// last measurement took (counting a large backlog costs in proportion to it, and delivery
    /// waits meanwhile), so it never takes more than 5 % of a dispatcher's time.
    pub backlog_interval_ms: u64,
    /// How long a (source, message id) deduplicates, in seconds: a message whose id was accepted
    /// less than this long before is acknowledged but not stored again; after it, the id is
    /// accepted as a new message. Default 7 days.
    pub dedup_window_seconds: u64,
    /// How often message ids older than the dedup window are forgotten, in seconds.
    pub dedup_prune_interval_seconds: u64,
    /// How many appends to the log run at once. Requests that arrive while all are busy are
    /// appended together by the next free one (group commit: one statement and one commit for
    /// many requests).
    pub append_writers: usize,
    /// A group stops taking waiting requests once it holds this many events (a single larger
    /// request is appended alone).
    pub append_group_events: usize,
    /// How many log positions one page of the debugger's `ListEvents` looks through at most: a
    /// page of a quiet source in a busy log comes back short, with a token to look further.
    pub debugger_page_scan: i64,
}

impl Default for IngestionSettings {
    fn default() -> Self {
        Self {
            max_batch: 2_500,
            partitions: 16,
            delivery_batch: 500,
            lease_seconds: 15,
            poll_interval_ms: 100,
            max_backoff_ms: 5_000,
            max_backlog_events: 5_000_000,
            backlog_interval_ms: 2_000,
            dedup_window_seconds: 7 * 24 * 3_600,
            dedup_prune_interval_seconds: 600,
            append_writers: 4,
            append_group_events: 2_000,
            debugger_page_scan: 100_000,
        }
    }
}

/// The ingestion service: its gRPC API and its delivery workers.
#[derive(Debug, Clone)]
pub struct Ingestion {
    log: Arc<dyn store::EventLog>,
    /// Appends accepted events to `log`, grouping concurrent requests.
    appender: group::GroupAppend,
    sources: sources::Sources,
    /// Tracking plans and the compiled-plan caches.
    plans: plans::Plans,
    settings: Arc<IngestionSettings>,
    partitions: i32,
    wake: Arc<Notify>,
    /// The backlog last measured by this replica's dispatcher.
    backlog: Arc<std::sync::atomic::AtomicI64>,
    /// The source debugger's wake-ups and tail bookkeeping on this replica.
    debugger: debugger::Hub,
}

impl Ingestion {
    /// The service on `db`, which must be connected to the `ingestion` schema and migrated.
    pub async fn new(db: Database, settings: IngestionSettings) -> Result<Self, IngestError> {
        let sources = sources::Sources::new(db.clone());
        let plans = plans::Plans::new(db.clone());
        let log = store::open(db, Duration::from_secs(settings.dedup_window_seconds));
        let partitions = log.ensure_partitions(settings.partitions.max(1)).await?;
        let appender = group::GroupAppend::start(
            log.clone(),
            settings.append_writers,
            settings.append_group_events,
        );
        Ok(Self {
            log,
            appender,
            sources,
            plans,
            settings: Arc::new(settings),
            partitions,
            wake: Arc::new(Notify::new()),
            backlog: Arc::new(std::sync::atomic::AtomicI64::new(0)),
            debugger: debugger::Hub::default(),
        })
    }

    /// Adds the service's gRPC servers: ingestion, the sources and tracking-plan admin APIs, the
    /// debugger and the internal event log API (GDPR deletion).
    pub fn register(&self, services: &mut tessera_server::GrpcServices) {
        services.add(service::server(self.clone()));
        // A client-streamed bulk load is answered after its last chunk: it lasts as long as
        // the caller sends, so only the caller's deadline bounds it.
        services.without_request_timeout(format!(
            "/{}/StreamIngestEvents",
            <tessera_proto::ingestion::v1::ingestion_service_server::IngestionServiceServer<
                Ingestion,
            > as tonic::server::NamedService>::NAME
        ));
        services.add(sources::server(self.clone()));
        services.add(plans::server(self.clone()));
        services.add(debugger::server(self.clone()));
        services.add(forget::server(self.clone()));
    }

    /// The HTTP routes of the service: the Segment-compatible tracking API.
    pub fn http_routes(&self) -> tessera_server::HttpRouter {
        http::routes(self.clone())
    }

    /// Starts delivering the log to the identity and profile services, until `shutdown`, which
    /// also ends the debugger's live tails (so they never hold up the server's drain).
    pub fn spawn_delivery(
        &self,
        identity: tonic::transport::Channel,
        profile: tonic::transport::Channel,
        shutdown: tessera_server::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        self.debugger.stop_on(shutdown.clone());
        tokio::spawn(prune_message_ids(
            self.log.clone(),
            Duration::from_secs(self.settings.dedup_prune_interval_seconds.max(1)),
            shutdown.clone(),
        ));
        let dispatcher = delivery::Dispatcher::new(
            self.log.clone(),
            identity,
            profile,
            self.settings.clone(),
            self.partitions,
            self.wake.clone(),
            self.backlog.clone(),
        );
        tokio::spawn(dispatcher.run(shutdown))
    }
}

/// Forgets message ids older than the dedup window every `every`, until `shutdown`. Replicas
/// may prune at the same time: deleting an expired id twice is harmless.
async fn prune_message_ids(
    log: Arc<dyn store::EventLog>,
    every: Duration,
    shutdown: tessera_server::Shutdown,
) {
    const CHUNK: i64 = 10_000;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let mut forgotten = 0;
        loop {
            match log.prune_message_ids(CHUNK).await {
                Ok(n) => {
                    forgotten += n;
                    if n < u64::try_from(CHUNK).unwrap_or(0) || shutdown.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "forgetting expired message ids failed");
                    break;
                }
            }
        }
        if forgotten > 0 {
            tracing::debug!(forgotten, "forgot message ids older than the dedup window");
        }
    }
}

/// The delivery partition of a routing key: FNV-1a, stable across versions and processes.
pub(crate) fn partition_of(key: &str, partitions: i32) -> i32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let n = u64::try_from(partitions.max(1)).unwrap_or(1);
    i32::try_from(hash % n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition_of("u1", 16), partition_of("u1", 16));
        for key in ["", "a", "user-123", "ünïcode"] {
            let p = partition_of(key, 16);
            assert!((0..16).contains(&p));
        }
        // A fixed value: changing the hash would reorder existing logs.
        assert_eq!(partition_of("user-1", 16), 4);
    }
}
