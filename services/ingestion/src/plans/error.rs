//! The errors of the tracking-plan API and their one mapping to gRPC statuses.

use tessera_core::{ErrorCode, FieldViolation};
use tessera_store::StoreError;

use crate::{IngestError, SourceError};

/// Why a tracking-plan call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PlanError {
    /// The request is invalid (including a schema that does not compile); the violations name
    /// the fields.
    #[error("invalid tracking plan request")]
    Invalid(Vec<FieldViolation>),
    /// The source could not be found or read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The plan store failed.
    #[error("tracking plan store")]
    Store(#[from] StoreError),
    /// Storing a replayed message failed.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// A stored plan or message could not be decoded, or a plan encoded.
    #[error("decoding a stored tracking plan or message")]
    Decode(#[from] serde_json::Error),
}

impl PlanError {
    /// The error code of this error.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::Source(e) => e.code(),
            Self::Store(e) => e.code(),
            Self::Ingest(e) => e.code(),
            Self::Decode(_) => ErrorCode::Internal,
        }
    }
}

impl From<PlanError> for tonic::Status {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Invalid(violations) => tessera_server::invalid_argument(&violations),
            PlanError::Source(e) => e.into(),
            PlanError::Ingest(e) => e.into(),
            PlanError::Store(_) | PlanError::Decode(_) => tessera_server::internal(e.code(), &e),
        }
    }
}
