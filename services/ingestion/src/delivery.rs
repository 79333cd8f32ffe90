//! Delivery of the event log down the pipeline.
//!
//! Every replica runs one dispatcher. The log is split into partitions by routing key; a
//! dispatcher leases a fair share of them (partitions ÷ live dispatchers) in the database and
//! delivers each leased partition in log order: resolve the batch's identities, apply the
//! resolved events (and the merges they caused) to profiles, then move the partition's cursor.
//! A failure anywhere leaves the cursor where it was and the batch is retried with backoff;
//! both downstream calls are idempotent per event id, so a retry or a crash between the calls
//! and the cursor update never counts anything twice. A dispatcher that dies loses its leases
//! when they expire, and another takes its partitions over from their cursors.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tessera_core::Event;
use tessera_proto::convert::{event_to_pb, identifier_to_pb};
use tessera_proto::identity::v1 as identity_pb;
use tessera_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tessera_proto::profile::v1 as profile_pb;
use tessera_proto::profile::v1::profile_pipeline_service_client::ProfilePipelineServiceClient;
use tessera_server::Shutdown;
use tessera_store::StoreError;
use tokio::sync::Notify;
use tonic::transport::Channel;

use crate::IngestionSettings;
use crate::store::{Cursor, EventLog, Lease, StoredEvent};

const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("event log: {0}")]
    Store(#[from] StoreError),
    #[error("{service}: {status}")]
    Peer {
        service: &'static str,
        status: tonic::Status,
    },
    #[error("identity returned {got} resolutions for {want} records")]
    Mismatch { got: usize, want: usize },
}

/// What one delivery attempt of a partition did.
enum Delivered {
    /// Nothing was waiting.
    Nothing,
    /// `events` were delivered and the cursor moved to `to`.
    Moved { events: usize, to: Cursor },
    /// Another dispatcher holds the partition now.
    LeaseLost,
}

pub(crate) struct Dispatcher {
    id: String,
    log: Arc<dyn EventLog>,
    identity: IdentityServiceClient<Channel>,
    profile: ProfilePipelineServiceClient<Channel>,
    settings: Arc<IngestionSettings>,
    partitions: i32,
    wake: Arc<Notify>,
    backlog: Arc<AtomicI64>,
}

impl Dispatcher {
    pub(crate) fn new(
        log: Arc<dyn EventLog>,
        identity: Channel,
        profile: Channel,
        settings: Arc<IngestionSettings>,
        partitions: i32,
        wake: Arc<Notify>,
        backlog: Arc<AtomicI64>,
    ) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            log,
            identity: IdentityServiceClient::new(identity)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            profile: ProfilePipelineServiceClient::new(profile)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            settings,
            partitions,
            wake,
            backlog,
        }
    }

    pub(crate) async fn run(self, shutdown: Shutdown) {
        let lease_for = Duration::from_secs(self.settings.lease_seconds.max(1));
        let poll = Duration::from_millis(self.settings.poll_interval_ms.max(1));
        let max_backoff = Duration::from_millis(self.settings.max_backoff_ms).max(MIN_BACKOFF);
        let mut leases: Vec<Lease> = Vec::new();
        let mut renewed: Option<Instant> = None;
        let mut last_backlog: Option<Instant> = None;
        let mut backoff = MIN_BACKOFF;
        tracing::info!(dispatcher = %self.id, partitions = self.partitions, "delivery started");
        while !shutdown.is_cancelled() {
            if renewed.is_none_or(|at| at.elapsed() >= lease_for / 3) {
                match self.renew(&leases, lease_for).await {
                    Ok(held) => {
                        leases = held;
                        renewed = Some(Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "renewing delivery leases failed");
                        leases.clear();
                        renewed = None;
                        backoff = pause(&shutdown, backoff, max_backoff).await;
                        continue;
                    }
                }
            }
            let every = Duration::from_millis(self.settings.backlog_interval_ms.max(100));
            if last_backlog.is_none_or(|at| at.elapsed() >= every) {
                last_backlog = Some(Instant::now());
                self.record_backlog().await;
            }
            // Partitions are delivered concurrently, each in its own log order.
            let results =
                futures::future::join_all(leases.iter().map(|lease| self.deliver(*lease))).await;
            let mut delivered = 0;
            let mut failed = false;
            let mut held = Vec::with_capacity(leases.len());
            for (mut lease, result) in leases.into_iter().zip(results) {
                match result {
                    Ok(Delivered::Moved { events, to }) => {
                        delivered += events;
                        lease.cursor = to;
                        held.push(lease);
                    }
                    Ok(Delivered::Nothing) => held.push(lease),
                    Ok(Delivered::LeaseLost) => {}
                    Err(e) => {
                        metrics::counter!("tessera_ingestion_delivery_failures_total").increment(1);
                        tracing::warn!(partition = lease.partition, error = %e, "delivery failed, will retry");
                        failed = true;
                        held.push(lease);
                    }
                }
            }
            leases = held;
            if failed {
                backoff = pause(&shutdown, backoff, max_backoff).await;
                continue;
            }
            backoff = MIN_BACKOFF;
            if delivered == 0 {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(poll) => {}
                    () = shutdown.cancelled() => {}
                }
            }
        }
        for lease in &leases {
            let _ = self.log.release(&self.id, lease.partition).await;
        }
        tracing::info!(dispatcher = %self.id, "delivery stopped");
    }

    /// Heartbeats, renews and takes leases up to the fair share, and releases any beyond it.
    /// Cursors held in memory are never moved back by what the database says.
    async fn renew(
        &self,
        current: &[Lease],
        lease_for: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        let live = self.log.heartbeat(&self.id, lease_for).await?;
        let partitions = usize::try_from(self.partitions).unwrap_or(1);
        let share = partitions.div_ceil(live);
        let mut held = self.log.lease(&self.id, share, lease_for).await?;
        while held.len() > share {
            if let Some(extra) = held.pop() {
                self.log.release(&self.id, extra.partition).await?;
            }
        }
        for lease in &mut held {
            if let Some(mine) = current.iter().find(|c| c.partition == lease.partition) {
                lease.cursor = lease.cursor.max(mine.cursor);
            }
        }
        Ok(held)
    }

    /// Publishes the backlog and the age of its oldest event (0 when nothing waits).
    async fn record_backlog(&self) {
        match self.log.backlog().await {
            Ok(backlog) => {
                self.backlog.store(backlog.events, Ordering::Relaxed);
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!("tessera_ingestion_backlog_events").set(backlog.events as f64);
                let lag = backlog.oldest.map_or(0.0, |oldest| {
                    (time::OffsetDateTime::now_utc() - oldest)
                        .as_seconds_f64()
                        .max(0.0)
                });
                metrics::gauge!("tessera_ingestion_delivery_lag_seconds").set(lag);
            }
            Err(e) => tracing::warn!(error = %e, "reading the delivery backlog failed"),
        }
    }

    /// Delivers the next batch of one partition.
    async fn deliver(&self, lease: Lease) -> Result<Delivered, DeliveryError> {
        let batch = self
            .log
            .read_after(lease.partition, lease.cursor, self.settings.delivery_batch)
            .await?;
        let Some(last) = batch.last() else {
            return Ok(Delivered::Nothing);
        };
        let to = last.cursor;
        let events = decode(&batch);
        if !events.is_empty() {
            self.push(events).await?;
        }
        if !self.log.advance(&self.id, lease.partition, to).await? {
            tracing::info!(partition = lease.partition, "delivery lease lost");
            return Ok(Delivered::LeaseLost);
        }
        metrics::counter!("tessera_ingestion_events_delivered_total").increment(batch.len() as u64);
        Ok(Delivered::Moved {
            events: batch.len(),
            to,
        })
    }

    /// Resolves and applies one batch.
    async fn push(&self, events: Vec<(String, Event)>) -> Result<(), DeliveryError> {
        let records: Vec<_> = events
            .iter()
            .map(|(event_id, e)| identity_pb::IdentityRecord {
                event_id: event_id.clone(),
                identifiers: e
                    .identifier_candidates()
                    .into_iter()
                    .map(identifier_to_pb)
                    .collect(),
                timestamp: e.timestamp.map(tessera_proto::convert::to_timestamp),
            })
            .collect();
        let want = records.len();
        let resolutions = self
            .identity
            .clone()
            .resolve_identities(identity_pb::ResolveIdentitiesRequest { records })
            .await
            .map_err(|status| DeliveryError::Peer {
                service: "identity",
                status,
            })?
            .into_inner()
            .resolutions;
        if resolutions.len() != want {
            return Err(DeliveryError::Mismatch {
                got: resolutions.len(),
                want,
            });
        }
        let mut merges = Vec::new();
        let mut resolved = Vec::with_capacity(want);
        for ((event_id, event), resolution) in events.into_iter().zip(resolutions) {
            let identity_pb::Resolution {
                event_id: _,
                profile_id,
                identifiers,
                merges: caused,
                // Explained in the identity graph's log; the profile needs only what linked.
                dropped: _,
            } = resolution;
            merges.extend(caused);
            resolved.push(profile_pb::ResolvedEvent {
                event_id,
                profile_id,
                event: Some(event_to_pb(&event)),
                identifiers,
            });
        }
        self.profile
            .clone()
            .apply_events(profile_pb::ApplyEventsRequest {
                merges,
                events: resolved,
            })
            .await
            .map_err(|status| DeliveryError::Peer {
                service: "profile",
                status,
            })?;
        Ok(())
    }
}

/// The events of a batch; a row that does not decode (which only a bug can cause) is logged,
/// counted and left in the log rather than blocking its partition forever.
fn decode(batch: &[StoredEvent]) -> Vec<(String, Event)> {
    batch
        .iter()
        .filter_map(|row| match serde_json::from_str::<Event>(&row.payload) {
            Ok(e) => Some((row.event_id.to_string(), e)),
            Err(error) => {
                metrics::counter!("tessera_ingestion_undeliverable_total").increment(1);
                tracing::error!(event_id = %row.event_id, %error, "event in the log does not decode, not delivered");
                None
            }
        })
        .collect()
}

/// Waits `backoff` (or until shutdown) and returns the next, doubled backoff.
async fn pause(shutdown: &Shutdown, backoff: Duration, max: Duration) -> Duration {
    tokio::select! {
        () = tokio::time::sleep(backoff) => {}
        () = shutdown.cancelled() => {}
    }
    (backoff * 2).min(max)
}
