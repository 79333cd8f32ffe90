//! The profile service's errors, each with its error code, mapped once to a gRPC status.

use tessera_core::{ErrorCode, FieldViolation};
use tonic::{Code, Status};

use crate::domain::Missing;

/// Why a profile request failed.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The request has invalid fields.
    #[error("invalid request: {} violations", .0.len())]
    InvalidArgument(Vec<FieldViolation>),
    /// A repeated field of the request holds more items than allowed.
    #[error("{field}: {count} items exceed the limit of {max} per request")]
    TooMany {
        /// The field, for example `events`.
        field: &'static str,
        /// How many items it held.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// No profile matches the lookup.
    #[error("profile not found")]
    NotFound,
    /// A database call failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored merge chain does not end in a live profile within the allowed number of hops.
    #[error("merge chain of profile {0} does not end in a live profile")]
    BrokenMergeChain(String),
    /// Profiles kept being merged away while a batch was locking them; retrying will do.
    #[error("profiles changed while being locked")]
    Contention,
    /// The store did not load a profile the batch names: a bug.
    #[error(transparent)]
    Missing(#[from] Missing),
    /// The identity service failed (a lookup other than with NOT_FOUND or INVALID_ARGUMENT, or
    /// matching other than with UNIMPLEMENTED).
    #[error("identity service: {0}")]
    Identity(#[source] Status),
    /// The scoring service failed.
    #[error("scoring service: {0}")]
    Scoring(#[source] Status),
    /// The ingestion service (its event log) failed.
    #[error("ingestion service: {0}")]
    Ingestion(#[source] Status),
    /// The scoring service answered something that breaks its contract.
    #[error("scoring service answered badly: {0}")]
    BadScores(String),
    /// The identity service answered matching with something that breaks its contract.
    #[error("identity service answered matching badly: {0}")]
    BadMatches(String),
    /// A profile holds events applied before event contents were kept, so it cannot be
    /// rebuilt (for an unmerge).
    #[error(
        "profile {0} holds events applied before their contents were kept: it cannot be rebuilt"
    )]
    NotRebuildable(String),
    /// A stored value does not decode: a bug or a corrupted row.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// Events a split names have not been applied yet (they are still in the pipeline); the
    /// split waits for them.
    #[error("{0} events of the split are not applied yet, retry later")]
    NotYetApplied(usize),
    /// No definition (computed trait, audience) of that kind and name is in effect, or stored
    /// for a change.
    #[error("no {kind} named {name:?}")]
    DefinitionNotFound {
        /// `computed trait` or `audience`.
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
    /// A definition of that kind and name is stored already.
    #[error("a {kind} named {name:?} exists already")]
    DefinitionExists {
        /// `computed trait` or `audience`.
        kind: &'static str,
        /// The name taken.
        name: String,
    },
    /// Config declares a definition of that kind and name: it changes only in config.
    #[error("the {kind} {name:?} is declared in config and changes only there")]
    DeclaredInConfig {
        /// `computed trait` or `audience`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// The stored definition is not at the version the caller read (someone changed it).
    #[error("the {kind} {name:?} is at version {actual}, not {expected}: read it again")]
    VersionMismatch {
        /// `computed trait` or `audience`.
        kind: &'static str,
        /// The name.
        name: String,
        /// The version the caller expected.
        expected: i64,
        /// The version stored.
        actual: i64,
    },
}

impl ProfileError {
    /// The error code this error maps to.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::TooMany { .. } => ErrorCode::ResourceExhausted,
            Self::NotFound | Self::DefinitionNotFound { .. } => ErrorCode::NotFound,
            Self::DefinitionExists { .. } => ErrorCode::AlreadyExists,
            Self::DeclaredInConfig { .. } | Self::VersionMismatch { .. } => {
                ErrorCode::FailedPrecondition
            }
            Self::Database(e) => tessera_store::error_code(e),
            Self::Contention => ErrorCode::Unavailable,
            Self::Identity(s) | Self::Scoring(s) | Self::Ingestion(s) => peer_code(s.code()),
            Self::NotRebuildable(_) => ErrorCode::FailedPrecondition,
            Self::NotYetApplied(_) => ErrorCode::Unavailable,
            Self::BrokenMergeChain(_)
            | Self::Missing(_)
            | Self::BadScores(_)
            | Self::BadMatches(_)
            | Self::Corrupt(_) => ErrorCode::Internal,
        }
    }
}

/// The code of a failed call to a peer service: whatever retrying may fix is `Unavailable`, so
/// the pipeline retries the batch; anything else is our bug or the peer's.
fn peer_code(code: Code) -> ErrorCode {
    match code {
        Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Unavailable => ErrorCode::Unavailable,
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss
        | Code::Unauthenticated => ErrorCode::Internal,
    }
}

/// A retryable status naming the peer `service`; the peer's own message is only logged.
fn peer_unavailable(service: &'static str, error: &ProfileError) -> Status {
    tracing::warn!(service, %error, "dependency unavailable");
    tessera_server::status(
        ErrorCode::Unavailable,
        format!("the {service} service is unavailable, retry later"),
    )
}

impl From<ProfileError> for Status {
    fn from(error: ProfileError) -> Self {
        let code = error.code();
        match &error {
            ProfileError::InvalidArgument(violations) => {
                tessera_server::invalid_argument(violations)
            }
            ProfileError::TooMany { .. }
            | ProfileError::NotFound
            | ProfileError::NotRebuildable(_)
            | ProfileError::NotYetApplied(_)
            | ProfileError::DefinitionNotFound { .. }
            | ProfileError::DefinitionExists { .. }
            | ProfileError::DeclaredInConfig { .. }
            | ProfileError::VersionMismatch { .. } => {
                tessera_server::status(code, error.to_string())
            }
            // A retryable peer failure names the peer (not what it said), so whoever watches
            // the pipeline retry knows which service to look at.
            ProfileError::Identity(_) if code.is_retryable() => {
                peer_unavailable("identity", &error)
            }
            ProfileError::Scoring(_) if code.is_retryable() => peer_unavailable("scoring", &error),
            ProfileError::Ingestion(_) if code.is_retryable() => {
                peer_unavailable("ingestion", &error)
            }
            ProfileError::Database(_)
            | ProfileError::BrokenMergeChain(_)
            | ProfileError::Contention
            | ProfileError::Missing(_)
            | ProfileError::Identity(_)
            | ProfileError::Scoring(_)
            | ProfileError::Ingestion(_)
            | ProfileError::BadScores(_)
            | ProfileError::BadMatches(_)
            | ProfileError::Corrupt(_) => tessera_server::internal(code, &error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_failures_are_retryable_and_internal_text_stays_inside() {
        let down = ProfileError::Scoring(Status::unavailable("connection refused"));
        assert_eq!(down.code(), ErrorCode::Unavailable);
        let status = Status::from(down);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "the scoring service is unavailable, retry later"
        );

        let identity = Status::from(ProfileError::Identity(Status::deadline_exceeded(
            "10.0.0.7:50051 timed out",
        )));
        assert_eq!(identity.code(), Code::Unavailable);
        assert_eq!(
            identity.message(),
            "the identity service is unavailable, retry later"
        );
        let bug = Status::from(ProfileError::Identity(Status::internal("secret detail")));
        assert_eq!(bug.code(), Code::Internal);
        assert!(!bug.message().contains("secret"));

        let db = ProfileError::Database(sqlx::Error::Protocol("relation \"profiles\"".into()));
        let status = Status::from(db);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("profiles"));

        let too_many = Status::from(ProfileError::TooMany {
            field: "events",
            count: 5001,
            max: 5000,
        });
        assert_eq!(too_many.code(), Code::ResourceExhausted);
        assert!(too_many.message().starts_with("events"));
    }
}
