//! The gRPC EventLogService: what the event log forgets of a person deleted under the GDPR
//! (the profile service's `DeleteProfile` calls it).

use tessera_core::{ErrorCode, FieldViolation, identifier};
use tessera_proto::ingestion::v1 as pb;
use tessera_proto::ingestion::v1::event_log_service_server::{
    EventLogService, EventLogServiceServer,
};
use tessera_store::StoreError;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::Ingestion;
use crate::store::{Forgotten, Person};

/// The most event ids one ForgetEvents call takes.
pub(crate) const MAX_EVENT_IDS: usize = 100_000;

/// The largest request accepted: 100,000 event ids take about 4 MB, above tonic's default
/// limit of 4 MiB, and a request over the count limit should still get its INVALID_ARGUMENT.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The most violations listed per repeated field: they travel in the status's headers, which
/// a client limits (16 KiB by default); the caller fixes these and learns of the rest.
const MAX_LISTED_VIOLATIONS: usize = 20;

pub(crate) fn server(ingestion: Ingestion) -> EventLogServiceServer<Ingestion> {
    EventLogServiceServer::new(ingestion).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// Why a ForgetEvents call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForgetError {
    /// The request is invalid; the violations name the fields.
    #[error("invalid forget request")]
    Invalid(Vec<FieldViolation>),
    /// The event log failed.
    #[error("event log")]
    Store(#[from] StoreError),
}

impl ForgetError {
    /// The error code of this error.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::Store(e) => e.code(),
        }
    }
}

impl From<ForgetError> for Status {
    fn from(e: ForgetError) -> Self {
        match &e {
            ForgetError::Invalid(violations) => tessera_server::invalid_argument(violations),
            ForgetError::Store(_) => tessera_server::internal(e.code(), &e),
        }
    }
}

/// What a ForgetEvents request asks to forget: the events (sorted, without repeats) and the
/// person whose quarantined messages go too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ForgetRequest {
    pub(crate) events: Vec<Uuid>,
    pub(crate) person: Person,
}

impl TryFrom<pb::ForgetEventsRequest> for ForgetRequest {
    type Error = Vec<FieldViolation>;

    fn try_from(request: pb::ForgetEventsRequest) -> Result<Self, Self::Error> {
        let pb::ForgetEventsRequest {
            event_ids,
            identifiers,
        } = request;
        let mut violations = Vec::new();
        let mut events = Vec::with_capacity(event_ids.len().min(MAX_EVENT_IDS));
        if event_ids.len() > MAX_EVENT_IDS {
            violations.push(FieldViolation::new(
                "event_ids",
                format!(
                    "at most {MAX_EVENT_IDS} event ids per call, got {}",
                    event_ids.len()
                ),
            ));
        } else {
            let mut bad = Vec::new();
            for (i, id) in event_ids.iter().enumerate() {
                match Uuid::parse_str(id) {
                    Ok(id) => events.push(id),
                    Err(_) => {
                        bad.push(FieldViolation::new(format!("event_ids[{i}]"), "not a UUID"))
                    }
                }
            }
            violations.extend(bad.into_iter().take(MAX_LISTED_VIOLATIONS));
        }
        let mut person = Person::default();
        let mut bad = Vec::new();
        for (i, id) in identifiers.into_iter().enumerate() {
            let tessera_proto::common::v1::Identifier { r#type, value } = id;
            let (kind, value) = (r#type.trim().to_ascii_lowercase(), value.trim());
            let missing = match (kind.is_empty(), value.is_empty()) {
                (false, false) => None,
                (true, false) => Some("type is required"),
                (false, true) => Some("value is required"),
                (true, true) => Some("type and value are required"),
            };
            if let Some(why) = missing {
                bad.push(FieldViolation::new(format!("identifiers[{i}]"), why));
                continue;
            }
            // Only these three are carried by fields of a message; the others (phone, device
            // id, custom types) find no quarantined message.
            match kind.as_str() {
                identifier::USER_ID => person.user_ids.push(value.to_owned()),
                identifier::ANONYMOUS_ID => person.anonymous_ids.push(value.to_owned()),
                identifier::EMAIL => person.emails.push(value.to_lowercase()),
                _ => {}
            }
        }
        violations.extend(bad.into_iter().take(MAX_LISTED_VIOLATIONS));
        if !violations.is_empty() {
            return Err(violations);
        }
        // Sorted, so concurrent calls delete rows in the same order.
        events.sort_unstable();
        events.dedup();
        Ok(Self { events, person })
    }
}

impl Ingestion {
    /// Deletes the requested events, their dedup keys and the person's quarantined messages,
    /// in one transaction.
    pub(crate) async fn forget(&self, request: ForgetRequest) -> Result<Forgotten, ForgetError> {
        let forgotten = self.log.forget(&request.events, &request.person).await?;
        tracing::info!(
            requested = request.events.len(),
            events = forgotten.events,
            quarantined = forgotten.quarantined,
            "forgot events of a deleted person"
        );
        Ok(forgotten)
    }
}

#[tonic::async_trait]
impl EventLogService for Ingestion {
    async fn forget_events(
        &self,
        request: Request<pb::ForgetEventsRequest>,
    ) -> Result<Response<pb::ForgetEventsResponse>, Status> {
        let request =
            ForgetRequest::try_from(request.into_inner()).map_err(ForgetError::Invalid)?;
        let Forgotten {
            events,
            quarantined,
        } = self.forget(request).await?;
        Ok(Response::new(pb::ForgetEventsResponse {
            events: i64::try_from(events).unwrap_or(i64::MAX),
            quarantined: i64::try_from(quarantined).unwrap_or(i64::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use tessera_proto::common::v1::Identifier;

    use super::*;

    fn id(kind: &str, value: &str) -> Identifier {
        Identifier {
            r#type: kind.to_owned(),
            value: value.to_owned(),
        }
    }

    fn fields(violations: &[FieldViolation]) -> Vec<&str> {
        violations.iter().map(|v| v.field.as_str()).collect()
    }

    #[test]
    fn sorts_events_and_groups_identifiers_by_field() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let request = ForgetRequest::try_from(pb::ForgetEventsRequest {
            event_ids: vec![b.to_string(), a.to_string(), b.to_string()],
            identifiers: vec![
                id("user_id", " u1 "),
                id("email", "Alice@Example.com"),
                id("anonymous_id", "a1"),
                id("phone", "+14155550100"),
            ],
        })
        .unwrap();
        assert_eq!(request.events, [a, b]);
        assert_eq!(
            request.person,
            Person {
                user_ids: vec!["u1".into()],
                anonymous_ids: vec!["a1".into()],
                emails: vec!["alice@example.com".into()],
            }
        );
    }

    #[test]
    fn names_each_invalid_id_and_identifier() {
        let violations = ForgetRequest::try_from(pb::ForgetEventsRequest {
            event_ids: vec![Uuid::now_v7().to_string(), "nope".into(), String::new()],
            identifiers: vec![id("email", "a@b.c"), id("", "x"), id("user_id", " ")],
        })
        .unwrap_err();
        assert_eq!(
            fields(&violations),
            [
                "event_ids[1]",
                "event_ids[2]",
                "identifiers[1]",
                "identifiers[2]"
            ]
        );
    }

    #[test]
    fn refuses_too_many_event_ids_and_lists_few_violations() {
        let too_many = vec![Uuid::nil().to_string(); MAX_EVENT_IDS + 1];
        let violations = ForgetRequest::try_from(pb::ForgetEventsRequest {
            event_ids: too_many,
            identifiers: Vec::new(),
        })
        .unwrap_err();
        assert_eq!(fields(&violations), ["event_ids"]);

        let all_bad = vec!["x".to_owned(); 1_000];
        let violations = ForgetRequest::try_from(pb::ForgetEventsRequest {
            event_ids: all_bad,
            identifiers: Vec::new(),
        })
        .unwrap_err();
        assert_eq!(violations.len(), MAX_LISTED_VIOLATIONS);
        assert_eq!(violations[0].field, "event_ids[0]");
    }
}
