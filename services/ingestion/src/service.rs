//! The gRPC IngestionService.

use tessera_core::event::corrected_timestamp;
use tessera_proto::ingestion::v1 as pb;
use tessera_proto::ingestion::v1::ingestion_service_server::{
    IngestionService, IngestionServiceServer,
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::convert::accepted_event;
use crate::error::IngestError;
use crate::store::NewEvent;
use crate::{Ingestion, partition_of};

/// The largest request message accepted: 2,500 events of up to 32 KB each, with headroom.
const MAX_MESSAGE_BYTES: usize = 96 * 1024 * 1024;

pub(crate) fn server(ingestion: Ingestion) -> IngestionServiceServer<Ingestion> {
    IngestionServiceServer::new(ingestion).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

impl Ingestion {
    /// Validates, stamps and durably stores a batch; all or nothing.
    async fn ingest(
        &self,
        events: Vec<tessera_proto::common::v1::Event>,
    ) -> Result<Vec<pb::EventResult>, IngestError> {
        if events.len() > self.settings.max_batch {
            return Err(IngestError::TooLarge {
                got: events.len(),
                limit: self.settings.max_batch,
            });
        }
        let received_at = OffsetDateTime::now_utc();
        let mut violations = Vec::new();
        let mut rows = Vec::with_capacity(events.len());
        for (i, event) in events.into_iter().enumerate() {
            let mut event = match accepted_event(event) {
                Ok(e) => e,
                Err(vs) => {
                    let prefix = format!("events[{i}]");
                    violations.extend(vs.into_iter().map(|v| v.prefixed(&prefix)));
                    continue;
                }
            };
            if event.message_id.is_empty() {
                event.message_id = Uuid::new_v4().to_string();
            }
            let original = event.original_timestamp.or(event.timestamp);
            event.timestamp = Some(corrected_timestamp(original, event.sent_at, received_at));
            event.original_timestamp = original;
            event.received_at = Some(received_at);
            rows.push(NewEvent {
                event_id: Uuid::now_v7(),
                source_id: self.settings.default_source.clone(),
                message_id: event.message_id.clone(),
                partition: partition_of(event.routing_key(), self.partitions),
                payload: serde_json::to_string(&event)?,
                received_at,
            });
        }
        if !violations.is_empty() {
            return Err(IngestError::Invalid(violations));
        }
        let appended = self.log.append(&rows).await?;
        let accepted = appended.iter().filter(|a| a.is_new).count();
        metrics::counter!("tessera_ingestion_events_accepted_total").increment(accepted as u64);
        metrics::counter!("tessera_ingestion_events_duplicate_total")
            .increment((appended.len() - accepted) as u64);
        if accepted > 0 {
            self.wake.notify_one();
        }
        Ok(rows
            .into_iter()
            .zip(appended)
            .map(|(row, a)| pb::EventResult {
                message_id: row.message_id,
                event_id: a.event_id.to_string(),
                status: if a.is_new {
                    pb::EventStatus::Accepted
                } else {
                    pb::EventStatus::Duplicate
                }
                .into(),
            })
            .collect())
    }
}

#[tonic::async_trait]
impl IngestionService for Ingestion {
    async fn ingest_events(
        &self,
        request: Request<pb::IngestEventsRequest>,
    ) -> Result<Response<pb::IngestEventsResponse>, Status> {
        let pb::IngestEventsRequest { events } = request.into_inner();
        let results = self.ingest(events).await?;
        Ok(Response::new(pb::IngestEventsResponse { results }))
    }
}
