//! The debugger's errors and their one mapping to gRPC statuses.

use tessera_core::{ErrorCode, FieldViolation};
use tessera_store::StoreError;

use crate::SourceError;

/// How long a client refused for too many tails should wait.
const TAIL_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a debugger call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DebuggerError {
    /// The request is invalid; the violations name the fields.
    #[error("invalid debugger request")]
    Invalid(Vec<FieldViolation>),
    /// The source could not be found or read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The event log failed.
    #[error("event log")]
    Store(#[from] StoreError),
    /// A stored event could not be decoded.
    #[error("decoding a stored event")]
    Decode(#[from] serde_json::Error),
    /// This replica has as many tails open as it allows.
    #[error("too many tails open")]
    TooManyTails,
}

impl DebuggerError {
    /// The error code of this error.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::Source(e) => e.code(),
            Self::Store(e) => e.code(),
            Self::Decode(_) => ErrorCode::Internal,
            Self::TooManyTails => ErrorCode::ResourceExhausted,
        }
    }
}

impl From<DebuggerError> for tonic::Status {
    fn from(e: DebuggerError) -> Self {
        match e {
            DebuggerError::Invalid(violations) => tessera_server::invalid_argument(&violations),
            DebuggerError::Source(e) => e.into(),
            DebuggerError::TooManyTails => tessera_server::status_with_retry(
                e.code(),
                "too many tails open on this replica, retry later",
                TAIL_RETRY_AFTER,
            ),
            DebuggerError::Store(_) | DebuggerError::Decode(_) => {
                tessera_server::internal(e.code(), &e)
            }
        }
    }
}
