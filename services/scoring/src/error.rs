//! The scoring service's errors, mapped once to error codes and gRPC statuses.

use tessera_core::{ErrorCode, FieldViolation};

/// Why a scoring request failed.
#[derive(Debug, thiserror::Error)]
pub enum ScoringError {
    /// The request has invalid fields.
    #[error("invalid request: {} violations", .0.len())]
    InvalidArgument(Vec<FieldViolation>),
    /// The request carries more profiles than allowed.
    #[error("{count} profiles exceed the limit of {max}")]
    TooManyProfiles {
        /// How many the request carried.
        count: usize,
        /// The limit.
        max: usize,
    },
}

impl ScoringError {
    /// The error code this error maps to.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::TooManyProfiles { .. } => ErrorCode::ResourceExhausted,
        }
    }
}

impl From<ScoringError> for tonic::Status {
    fn from(error: ScoringError) -> Self {
        let code = error.code();
        match error {
            ScoringError::InvalidArgument(violations) => {
                tessera_server::invalid_argument(&violations)
            }
            ScoringError::TooManyProfiles { count, max } => tessera_server::status(
                code,
                format!("profiles: {count} profiles exceed the limit of {max} per request"),
            ),
        }
    }
}
