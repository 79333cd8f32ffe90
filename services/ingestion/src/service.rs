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
use crate::sources::{Source, key};

/// The largest request message accepted: 2,500 events of up to 32 KB each, with headroom.
const MAX_MESSAGE_BYTES: usize = 96 * 1024 * 1024;

/// The metadata header that carries a write key as is.
const WRITE_KEY_HEADER: &str = "x-tessera-write-key";

/// The write key of a call: `x-tessera-write-key: KEY`, or `authorization: Basic
/// base64(KEY:)` as Segment's HTTP API takes it; empty when there is neither.
fn write_key(metadata: &tonic::metadata::MetadataMap) -> String {
    let text = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
    if let Some(key) = text(WRITE_KEY_HEADER) {
        return key.trim().to_owned();
    }
    text("authorization")
        .and_then(key::from_basic_auth)
        .unwrap_or_default()
}

pub(crate) fn server(ingestion: Ingestion) -> IngestionServiceServer<Ingestion> {
    IngestionServiceServer::new(ingestion).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

impl Ingestion {
    /// Validates a gRPC batch of `source` as a whole and stores it: all or nothing.
    async fn ingest(
        &self,
        source: &Source,
        events: Vec<tessera_proto::common::v1::Event>,
    ) -> Result<Vec<pb::EventResult>, IngestError> {
        if events.len() > self.settings.max_batch {
            return Err(IngestError::TooLarge {
                got: events.len(),
                limit: self.settings.max_batch,
            });
        }
        // Before validation, so a flood of invalid events is refused cheaply too.
        self.check_rate(source, events.len())?;
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
        let stored = self
            .store(&source.id.to_string(), valid, received_at)
            .await?;
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
        let source = self.authenticate(&write_key(request.metadata())).await?;
        let pb::IngestEventsRequest { events } = request.into_inner();
        let results = self.ingest(&source, events).await?;
        Ok(Response::new(pb::IngestEventsResponse { results }))
    }
}
