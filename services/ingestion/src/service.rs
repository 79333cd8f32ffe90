//! The gRPC IngestionService.

use tessera_proto::ingestion::v1 as pb;
use tessera_proto::ingestion::v1::ingestion_service_server::{
    IngestionService, IngestionServiceServer,
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use crate::Ingestion;
use crate::convert::accepted_event;
use crate::error::IngestError;

/// The largest request message accepted: 2,500 events of up to 32 KB each, with headroom.
const MAX_MESSAGE_BYTES: usize = 96 * 1024 * 1024;

pub(crate) fn server(ingestion: Ingestion) -> IngestionServiceServer<Ingestion> {
    IngestionServiceServer::new(ingestion).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

impl Ingestion {
    /// Validates a gRPC batch as a whole and stores it: all or nothing.
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
        let mut valid = Vec::with_capacity(events.len());
        for (i, event) in events.into_iter().enumerate() {
            match accepted_event(event) {
                Ok(e) => valid.push(e),
                Err(vs) => {
                    let prefix = format!("events[{i}]");
                    violations.extend(vs.into_iter().map(|v| v.prefixed(&prefix)));
                }
            }
        }
        if !violations.is_empty() {
            return Err(IngestError::Invalid(violations));
        }
        let source = self.settings.default_source.clone();
        let stored = self.store(&source, valid, received_at).await?;
        Ok(stored
            .into_iter()
            .map(|s| pb::EventResult {
                message_id: s.message_id,
                event_id: s.event_id.to_string(),
                status: if s.is_new {
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
