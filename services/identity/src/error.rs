//! The identity service's errors and their one mapping to gRPC statuses.

use tessera_core::{ErrorCode, FieldViolation};
use tessera_store::StoreError;

/// Why an identity operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The request is malformed; the violations name the fields.
    #[error("invalid request: {}", join(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The request carries more records than one batch may hold.
    #[error("records: {len} records, at most {max} per request")]
    BatchTooLarge {
        /// How many records the request carries.
        len: usize,
        /// How many one batch may hold.
        max: usize,
    },
    /// The identifier belongs to no profile, or is a blocked value.
    #[error("the identifier belongs to no profile")]
    NotFound,
    /// No profile has this id.
    #[error("no profile has this id")]
    UnknownProfile,
    /// The named thing does not exist.
    #[error("no such {0}")]
    Missing(&'static str),
    /// The service is not in a state that allows this; the message says why.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A database call failed.
    #[error("identity store")]
    Store(#[from] StoreError),
    /// Concurrent merges kept invalidating the records' profiles, retries are exhausted.
    #[error("identity graph contended, retries exhausted")]
    Contended,
    /// A split of the profile has not reached the profile service yet, so the profile cannot
    /// be forgotten there correctly; it will be shortly.
    #[error(
        "a split of this profile is still being delivered to the profile service; retry shortly"
    )]
    SplitPending,
    /// A stored value does not decode: a bug or a corrupted row.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for IdentityError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Sqlx(e))
    }
}

impl IdentityError {
    /// The error code this error maps to.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::BatchTooLarge { .. } => ErrorCode::ResourceExhausted,
            Self::NotFound | Self::UnknownProfile | Self::Missing(_) => ErrorCode::NotFound,
            Self::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Self::Store(e) => e.code(),
            Self::Contended | Self::SplitPending => ErrorCode::Unavailable,
            Self::Corrupt(_) => ErrorCode::Internal,
        }
    }
}

impl From<IdentityError> for tonic::Status {
    fn from(e: IdentityError) -> Self {
        match &e {
            IdentityError::InvalidArgument(violations) => {
                tessera_server::invalid_argument(violations)
            }
            IdentityError::BatchTooLarge { .. }
            | IdentityError::NotFound
            | IdentityError::UnknownProfile
            | IdentityError::Missing(_)
            | IdentityError::FailedPrecondition(_)
            | IdentityError::SplitPending => tessera_server::status(e.code(), e.to_string()),
            IdentityError::Store(_) | IdentityError::Contended | IdentityError::Corrupt(_) => {
                tessera_server::internal(e.code(), &e)
            }
        }
    }
}

fn join(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_the_right_code_and_no_internals() {
        let s = tonic::Status::from(IdentityError::BatchTooLarge { len: 6, max: 5 });
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.message().starts_with("records:"));

        let s = tonic::Status::from(IdentityError::Corrupt("resolutions.merges of e1".into()));
        assert_eq!(s.code(), tonic::Code::Internal);
        assert_eq!(s.message(), "internal error");

        let e = IdentityError::from(sqlx::Error::PoolTimedOut);
        assert_eq!(e.code(), ErrorCode::Unavailable);
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
    }
}
