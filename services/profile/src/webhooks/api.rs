//! `DestinationService`: the dead letters of the webhooks, listed and replayed.

use std::sync::Arc;

use tessera_core::{ErrorCode, FieldViolation};
use tessera_proto::convert::to_timestamp;
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::destination_service_server::DestinationService;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use super::Webhooks;
use super::store::Letter;
use crate::error::ProfileError;

/// The default and the largest page of `ListDeadLetters`.
const PAGE_SIZE: (i32, i32) = (100, 1_000);
/// The most ids one `ReplayDeadLetters` names.
const MAX_REPLAY_IDS: usize = 10_000;

/// The gRPC handlers.
#[derive(Debug, Clone)]
pub(crate) struct DestinationApi(pub(crate) Arc<Webhooks>);

fn letter_to_pb(letter: Letter) -> pb::DeadLetter {
    let Letter {
        id,
        webhook,
        cursor,
        profile_id,
        kind,
        changed_at,
        payload,
        attempts,
        last_error,
        dead_at,
        replay_at,
        // Internal: the replay's retry schedule.
        replay_attempts: _,
    } = letter;
    pb::DeadLetter {
        id,
        webhook,
        cursor,
        profile_id,
        kind,
        changed_at: Some(to_timestamp(changed_at)),
        payload: payload.to_string(),
        attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
        last_error,
        dead_at: Some(to_timestamp(dead_at)),
        replaying: replay_at.is_some(),
    }
}

#[tonic::async_trait]
impl DestinationService for DestinationApi {
    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let pb::ListDeadLettersRequest {
            webhook,
            page_size,
            page_token,
        } = request.into_inner();
        let mut violations = Vec::new();
        let size = match page_size {
            0 => PAGE_SIZE.0,
            n if (1..=PAGE_SIZE.1).contains(&n) => n,
            _ => {
                violations.push(FieldViolation::new(
                    "page_size",
                    format!("from 1 to {} (0 for {})", PAGE_SIZE.1, PAGE_SIZE.0),
                ));
                PAGE_SIZE.0
            }
        };
        let after = if page_token.is_empty() {
            0
        } else {
            page_token.parse::<i64>().unwrap_or_else(|_| {
                violations.push(FieldViolation::new(
                    "page_token",
                    "a next_page_token this call returned",
                ));
                0
            })
        };
        if !violations.is_empty() {
            return Err(ProfileError::InvalidArgument(violations).into());
        }
        let size = usize::try_from(size).unwrap_or(100);
        let webhook = (!webhook.is_empty()).then_some(webhook.as_str());
        // One more than the page, to know whether another page follows.
        let mut letters = self.0.store.list(webhook, after, size + 1).await?;
        let more = letters.len() > size;
        letters.truncate(size);
        let next_page_token = match letters.last() {
            Some(last) if more => last.id.to_string(),
            Some(_) | None => String::new(),
        };
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: letters.into_iter().map(letter_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<pb::ReplayDeadLettersRequest>,
    ) -> Result<Response<pb::ReplayDeadLettersResponse>, Status> {
        let pb::ReplayDeadLettersRequest { webhook, ids } = request.into_inner();
        let mut violations = Vec::new();
        if webhook.is_empty() {
            violations.push(FieldViolation::new("webhook", "required"));
        }
        if ids.len() > MAX_REPLAY_IDS {
            violations.push(FieldViolation::new(
                "ids",
                format!("at most {MAX_REPLAY_IDS} (none for all of the webhook's)"),
            ));
        }
        if let Some(i) = ids.iter().position(|id| *id <= 0) {
            violations.push(FieldViolation::new(
                format!("ids[{i}]"),
                "a dead letter's id",
            ));
        }
        if !violations.is_empty() {
            return Err(ProfileError::InvalidArgument(violations).into());
        }
        if self.0.hook(&webhook).is_none() {
            return Err(tessera_server::status(
                ErrorCode::NotFound,
                format!("no webhook named {webhook:?} is configured"),
            ));
        }
        let queued = self
            .0
            .store
            .replay(&webhook, &ids, OffsetDateTime::now_utc())
            .await?;
        tracing::info!(webhook, queued, "dead letters queued for replay");
        Ok(Response::new(pb::ReplayDeadLettersResponse {
            queued: i64::try_from(queued).unwrap_or(i64::MAX),
        }))
    }
}
