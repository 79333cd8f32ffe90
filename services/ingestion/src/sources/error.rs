//! The errors of source administration and their one mapping to gRPC statuses.
//!
//! Separate from [`crate::IngestError`], the errors of accepting events: administration has
//! outcomes (not found, name taken) that event acceptance never has, and the front doors map
//! `IngestError` exhaustively.

use tessera_core::{ErrorCode, FieldViolation};
use tessera_store::StoreError;

/// Why a source administration call failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The request is invalid; the violations name the fields.
    #[error("invalid source request")]
    Invalid(Vec<FieldViolation>),
    /// No source has this name.
    #[error("no source named {0:?}")]
    NotFound(String),
    /// The name (or a chosen write key) is taken by another source.
    #[error("{0}")]
    AlreadyExists(FieldViolation),
    /// The source store failed.
    #[error("source store")]
    Store(#[from] StoreError),
}

impl SourceError {
    /// The error code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Self::Store(e) => e.code(),
        }
    }
}

impl From<SourceError> for tonic::Status {
    fn from(e: SourceError) -> Self {
        match &e {
            SourceError::Invalid(violations) => tessera_server::invalid_argument(violations),
            SourceError::NotFound(name) => {
                tessera_server::status(e.code(), format!("name: no source named {name:?}"))
            }
            SourceError::AlreadyExists(violation) => {
                tessera_server::status(e.code(), violation.to_string())
            }
            SourceError::Store(_) => tessera_server::internal(e.code(), &e),
        }
    }
}
