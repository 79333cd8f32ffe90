//! The gRPC IngestionService.

use tessera_core::FieldViolation;
use tessera_proto::ingestion::v1 as pb;
use tessera_proto::ingestion::v1::ingestion_service_server::{
    IngestionService, IngestionServiceServer,
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status, Streaming};

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

/// The most rejections a stream's response lists; the count covers them all.
const MAX_LISTED_REJECTIONS: usize = 1_000;

/// A chunk of events after the checks every gRPC front door shares.
struct Checked {
    /// The valid events, each with its position in the chunk.
    valid: Vec<(usize, tessera_core::Event)>,
    /// The invalid events: position in the chunk, message id as sent, violations.
    invalid: Vec<(usize, String, Vec<FieldViolation>)>,
}

impl Ingestion {
    /// The checks IngestEvents and StreamIngestEvents share for one batch or chunk of `source`:
    /// size limit, rate limit (before validation, so a flood of invalid events is refused
    /// cheaply too), then each event's validation. The tracking plan comes after, in
    /// [`Ingestion::screen`].
    fn check_events(
        &self,
        source: &Source,
        events: Vec<tessera_proto::common::v1::Event>,
    ) -> Result<Checked, IngestError> {
        if events.len() > self.settings.max_batch {
            return Err(IngestError::TooLarge {
                got: events.len(),
                limit: self.settings.max_batch,
            });
        }
        self.check_rate(source, events.len())?;
        let mut checked = Checked {
            valid: Vec::with_capacity(events.len()),
            invalid: Vec::new(),
        };
        for (i, event) in events.into_iter().enumerate() {
            let message_id = event.message_id.clone();
            match accepted_event(event) {
                Ok(e) => checked.valid.push((i, e)),
                Err(vs) => checked.invalid.push((i, message_id, vs)),
            }
        }
        Ok(checked)
    }

    /// Validates a gRPC batch of `source` as a whole and stores it: all or nothing. Messages
    /// the tracking plan blocks are quarantined even so, and refused like invalid ones.
    async fn ingest(
        &self,
        source: &Source,
        events: Vec<tessera_proto::common::v1::Event>,
    ) -> Result<Vec<pb::EventResult>, IngestError> {
        let received_at = OffsetDateTime::now_utc();
        let checked = self.check_events(source, events)?;
        if !checked.invalid.is_empty() {
            return Err(IngestError::Invalid(prefixed(checked.invalid)));
        }
        let screened = self.screen(source, checked.valid, received_at).await?;
        if !screened.blocked.is_empty() {
            // All or nothing: the blocked messages are quarantined, the others not stored.
            return Err(IngestError::Invalid(prefixed(screened.blocked)));
        }
        let valid = screened.passed.into_iter().map(|(_, e)| e).collect();
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

    /// Stores the valid events of each chunk of a stream of `source` as it arrives and
    /// summarizes the whole stream; invalid events are reported, not fatal.
    async fn ingest_stream(
        &self,
        source: &Source,
        mut chunks: Streaming<pb::StreamIngestEventsRequest>,
    ) -> Result<pb::StreamIngestEventsResponse, Status> {
        let source_id = source.id.to_string();
        let mut summary = pb::StreamIngestEventsResponse::default();
        let mut offset: u64 = 0;
        while let Some(chunk) = chunks.message().await? {
            let pb::StreamIngestEventsRequest { events } = chunk;
            let len = events.len() as u64;
            let received_at = OffsetDateTime::now_utc();
            let checked = self.check_events(source, events)?;
            let screened = self.screen(source, checked.valid, received_at).await?;
            let mut rejected = checked.invalid;
            rejected.extend(screened.blocked);
            rejected.sort_by_key(|(i, _, _)| *i);
            summary.rejected += rejected.len() as u64;
            for (i, message_id, violations) in rejected {
                if summary.rejections.len() < MAX_LISTED_REJECTIONS {
                    summary.rejections.push(pb::RejectedEvent {
                        index: offset + i as u64,
                        message_id,
                        violations: violations.into_iter().map(violation_to_pb).collect(),
                    });
                }
            }
            if !screened.passed.is_empty() {
                let valid = screened.passed.into_iter().map(|(_, e)| e).collect();
                for stored in self.store(&source_id, valid, received_at).await? {
                    if stored.is_new {
                        summary.accepted += 1;
                    } else {
                        summary.duplicates += 1;
                    }
                }
            }
            offset += len;
        }
        Ok(summary)
    }
}

/// The violations of refused messages, each field named from the batch (`events[3].user_id`).
fn prefixed(invalid: Vec<(usize, String, Vec<FieldViolation>)>) -> Vec<FieldViolation> {
    invalid
        .into_iter()
        .flat_map(|(i, _, vs)| {
            let prefix = format!("events[{i}]");
            vs.into_iter().map(move |v| v.prefixed(&prefix))
        })
        .collect()
}

fn violation_to_pb(v: FieldViolation) -> tessera_proto::common::v1::FieldViolation {
    let FieldViolation { field, description } = v;
    tessera_proto::common::v1::FieldViolation { field, description }
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

    async fn stream_ingest_events(
        &self,
        request: Request<Streaming<pb::StreamIngestEventsRequest>>,
    ) -> Result<Response<pb::StreamIngestEventsResponse>, Status> {
        let source = self.authenticate(&write_key(request.metadata())).await?;
        let summary = self.ingest_stream(&source, request.into_inner()).await?;
        Ok(Response::new(summary))
    }
}
