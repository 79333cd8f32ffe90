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
    /// No stored customer-value model has this version.
    #[error("customer-value model {0} not found")]
    ModelNotFound(i64),
    /// No customer-value model is active (GetCustomerValueModel of version 0).
    #[error("no customer-value model is active: fit one with FitCustomerValueModel")]
    NoActiveModel,
    /// The model was rejected at fit time and cannot be activated.
    #[error("customer-value model {version} was rejected ({reason}) and cannot be activated")]
    RejectedModel {
        /// The model's version.
        version: i64,
        /// Why it was rejected.
        reason: String,
    },
    /// Too few profiles with purchases to fit on.
    #[error(
        "the population has {population} profiles with purchases, fewer than \
         scoring.fitting.min_population ({min})"
    )]
    PopulationTooSmall {
        /// Profiles with purchases.
        population: usize,
        /// The setting.
        min: u64,
    },
    /// This server stores no models (it runs without a database).
    #[error("this scoring service has no model store (it runs without a database)")]
    NoModelStore,
    /// This server stores no plans (it runs without a database).
    #[error("this scoring service has no plan store (it runs without a database)")]
    NoPlanStore,
    /// No plan has this name (among the stored ones, for a change).
    #[error("scoring plan {0:?} not found")]
    PlanNotFound(String),
    /// A stored plan has this name already.
    #[error("scoring plan {0:?} exists already")]
    PlanExists(String),
    /// The stored plan's version is not the one the change expected.
    #[error("scoring plan {name:?} is at version {actual}, not the expected one: read it again")]
    PlanVersionMismatch {
        /// The plan's name.
        name: String,
        /// Its version now.
        actual: i64,
    },
    /// The plan is declared in config: read-only through the API.
    #[error(
        "scoring plan {0:?} is declared in config ([[scoring.plans]]), read-only through the api"
    )]
    ConfigPlan(String),
    /// A database call failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Reading the population from the profile service failed.
    #[error("profile service: {0}")]
    Profile(tonic::Status),
    /// A stored row does not decode: a bug or a manual edit.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// A fitting task panicked or was cancelled.
    #[error("fitting task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl ScoringError {
    /// The error code this error maps to.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::TooManyProfiles { .. } => ErrorCode::ResourceExhausted,
            Self::ModelNotFound(_) | Self::NoActiveModel | Self::PlanNotFound(_) => {
                ErrorCode::NotFound
            }
            Self::PlanExists(_) => ErrorCode::AlreadyExists,
            Self::RejectedModel { .. }
            | Self::PopulationTooSmall { .. }
            | Self::NoModelStore
            | Self::NoPlanStore
            | Self::PlanVersionMismatch { .. }
            | Self::ConfigPlan(_) => ErrorCode::FailedPrecondition,
            Self::Database(e) => tessera_store::error_code(e),
            Self::Profile(status) => match status.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
                | tonic::Code::Cancelled => ErrorCode::Unavailable,
                tonic::Code::Ok
                | tonic::Code::Unknown
                | tonic::Code::InvalidArgument
                | tonic::Code::NotFound
                | tonic::Code::AlreadyExists
                | tonic::Code::PermissionDenied
                | tonic::Code::FailedPrecondition
                | tonic::Code::OutOfRange
                | tonic::Code::Unimplemented
                | tonic::Code::Internal
                | tonic::Code::DataLoss
                | tonic::Code::Unauthenticated => ErrorCode::Internal,
            },
            Self::Corrupt(_) | Self::Task(_) => ErrorCode::Internal,
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
            ScoringError::ModelNotFound(_)
            | ScoringError::NoActiveModel
            | ScoringError::RejectedModel { .. }
            | ScoringError::PopulationTooSmall { .. }
            | ScoringError::NoModelStore
            | ScoringError::NoPlanStore
            | ScoringError::PlanNotFound(_)
            | ScoringError::PlanExists(_)
            | ScoringError::PlanVersionMismatch { .. }
            | ScoringError::ConfigPlan(_) => tessera_server::status(code, error.to_string()),
            ScoringError::Database(_)
            | ScoringError::Profile(_)
            | ScoringError::Corrupt(_)
            | ScoringError::Task(_) => tessera_server::internal(code, &error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_their_codes_and_hide_internals() {
        let missing = tonic::Status::from(ScoringError::ModelNotFound(42));
        assert_eq!(missing.code(), tonic::Code::NotFound);
        assert_eq!(missing.message(), "customer-value model 42 not found");
        let down = tonic::Status::from(ScoringError::Profile(tonic::Status::unavailable("x")));
        assert_eq!(down.code(), tonic::Code::Unavailable);
        let bug = tonic::Status::from(ScoringError::Corrupt("secret".into()));
        assert_eq!(bug.code(), tonic::Code::Internal);
        assert!(!bug.message().contains("secret"));
        let small = tonic::Status::from(ScoringError::PopulationTooSmall {
            population: 3,
            min: 100,
        });
        assert_eq!(small.code(), tonic::Code::FailedPrecondition);
        assert!(small.message().contains("min_population"), "{small:?}");
    }
}
