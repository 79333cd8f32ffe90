//! The ingestion service's errors and their one mapping to gRPC statuses.

use tessera_core::{ErrorCode, FieldViolation};
use tessera_store::StoreError;

/// Why an ingestion call failed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Some events are invalid; nothing was stored.
    #[error("invalid events")]
    Invalid(Vec<FieldViolation>),
    /// The batch is larger than allowed.
    #[error("batch of {got} events exceeds the limit of {limit}")]
    TooLarge {
        /// Events in the request.
        got: usize,
        /// The limit.
        limit: usize,
    },
    /// No write key, or one that names no enabled source.
    #[error("unknown or disabled write key")]
    Unauthenticated,
    /// The source is over its rate limit, or the pipeline over its backlog limit.
    #[error("over the rate limit; retry after {retry_after:?}")]
    RateLimited {
        /// When the client may try again.
        retry_after: std::time::Duration,
    },
    /// The event log failed.
    #[error("event log")]
    Store(#[from] StoreError),
    /// An event could not be encoded for the log.
    #[error("encoding an event")]
    Encode(#[from] serde_json::Error),
}

impl IngestError {
    /// The error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::TooLarge { .. } | Self::RateLimited { .. } => ErrorCode::ResourceExhausted,
            Self::Unauthenticated => ErrorCode::Unauthenticated,
            Self::Store(e) => e.code(),
            Self::Encode(_) => ErrorCode::Internal,
        }
    }
}

impl From<IngestError> for tonic::Status {
    fn from(e: IngestError) -> Self {
        match &e {
            IngestError::Invalid(violations) => tessera_server::invalid_argument(violations),
            IngestError::TooLarge { got, limit } => tessera_server::status(
                e.code(),
                format!("events: {got} events exceed the limit of {limit} per request"),
            ),
            IngestError::Unauthenticated => tessera_server::status(
                e.code(),
                "a valid write key is required (unknown or disabled key)",
            ),
            IngestError::RateLimited { retry_after } => tessera_server::status_with_retry(
                e.code(),
                "over the rate limit, retry later",
                *retry_after,
            ),
            IngestError::Store(_) | IngestError::Encode(_) => {
                tessera_server::internal(e.code(), &e)
            }
        }
    }
}
