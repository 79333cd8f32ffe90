//! Acceptance shared by every front door (gRPC, HTTP): stamping events and appending them to
//! the log in one transaction (shared with the requests waiting at the same time).

use tessera_core::Event;
use tessera_core::event::corrected_timestamp;
use tessera_server::trace_context::{self, TraceParent};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::IngestError;
use crate::store::NewEvent;
use crate::{Ingestion, partition_of};

/// One event after acceptance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    /// The message id (generated when the event had none).
    pub(crate) message_id: String,
    /// The id of the stored event (the original's, for a duplicate).
    pub(crate) event_id: Uuid,
    /// Whether this call stored it (false: a duplicate).
    pub(crate) is_new: bool,
}

/// How long a client refused for backlog should wait.
const BACKLOG_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

impl Ingestion {
    /// Refuses new events while the undelivered backlog is over its limit.
    pub(crate) fn check_backlog(&self) -> Result<(), IngestError> {
        let limit = self.settings.max_backlog_events;
        let backlog = self.backlog.load(std::sync::atomic::Ordering::Relaxed);
        if limit > 0 && backlog > limit {
            metrics::counter!("tessera_ingestion_backlog_refusals_total").increment(1);
            return Err(IngestError::RateLimited {
                retry_after: BACKLOG_RETRY_AFTER,
            });
        }
        Ok(())
    }

    /// Stamps valid events of `source_id` received at `received_at` (message id when missing,
    /// `receivedAt`, clock-skew-corrected `timestamp`, event id, partition) and appends them in
    /// one transaction. Returns one result per event, in order, once they are durable.
    pub(crate) async fn store(
        &self,
        source_id: &str,
        events: Vec<Event>,
        received_at: OffsetDateTime,
    ) -> Result<Vec<Stored>, IngestError> {
        let events = events.into_iter().map(|e| (e, received_at)).collect();
        self.store_received(source_id, events).await
    }

    /// [`Ingestion::store`] with each event's own receive time: a quarantine replay stores
    /// messages received at different times in one append.
    pub(crate) async fn store_received(
        &self,
        source_id: &str,
        events: Vec<(Event, OffsetDateTime)>,
    ) -> Result<Vec<Stored>, IngestError> {
        self.check_backlog()?;
        let mut rows = Vec::with_capacity(events.len());
        // With trace export on, each message gets a span that its trace continues from: a
        // child of the request when the client sent trace context, else the root of a trace of
        // its own. Kept open until the append commits.
        let traced = trace_context::enabled();
        let client_traced = traced && trace_context::client_traced();
        let mut spans = Vec::with_capacity(if traced { events.len() } else { 0 });
        for (mut event, received_at) in events {
            let received_at = tessera_proto::convert::micros(received_at);
            if event.message_id.is_empty() {
                event.message_id = Uuid::new_v4().to_string();
            }
            let original = event.original_timestamp.or(event.timestamp);
            event.timestamp = Some(corrected_timestamp(original, event.sent_at, received_at));
            event.original_timestamp = original;
            event.received_at = Some(received_at);
            let event_id = Uuid::now_v7();
            let trace = if traced {
                let span = tracing::info_span!(
                    "ingestion.accept_event",
                    event_id = %event_id,
                    message_id = %event.message_id,
                );
                if !client_traced {
                    trace_context::new_root(&span);
                }
                let trace = TraceParent::of(&span);
                spans.push(span);
                trace
            } else {
                None
            };
            rows.push(NewEvent {
                event_id,
                source_id: source_id.to_owned(),
                message_id: event.message_id.clone(),
                partition: partition_of(event.routing_key(), self.partitions),
                payload: serde_json::to_string(&event)?,
                received_at,
                trace,
            });
        }
        let (rows, appended) = self.appender.append(rows).await?;
        drop(spans);
        let accepted = appended.iter().filter(|a| a.is_new).count();
        metrics::counter!("tessera_ingestion_events_accepted_total").increment(accepted as u64);
        metrics::counter!("tessera_ingestion_events_duplicate_total")
            .increment((appended.len() - accepted) as u64);
        if accepted > 0 {
            self.wake.notify_one();
            self.debugger.accepted(source_id);
        }
        Ok(rows
            .into_iter()
            .zip(appended)
            .map(|(row, a)| Stored {
                message_id: row.message_id,
                event_id: a.event_id,
                is_new: a.is_new,
            })
            .collect())
    }
}
