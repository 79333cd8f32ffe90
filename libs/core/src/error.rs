//! The error codes every service error maps to, and field violations for invalid input.

use std::fmt;

/// The kind of an error, independent of transport. Each service maps its own error type to one of
/// these, and the server edge maps each of these to exactly one gRPC code and HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed; the error names the offending fields.
    InvalidArgument,
    /// The thing asked for does not exist.
    NotFound,
    /// The thing to create exists already (a name or key is taken).
    AlreadyExists,
    /// The request or a part of it is larger than allowed, or a rate or backlog limit is hit.
    ResourceExhausted,
    /// A dependency (database, peer service) is unreachable; retrying later may succeed.
    Unavailable,
    /// The caller did not authenticate.
    Unauthenticated,
    /// The caller may not do this.
    PermissionDenied,
    /// The system is not in a state that allows this.
    FailedPrecondition,
    /// A bug or an unexpected failure; details are logged, never sent to the client.
    Internal,
}

impl ErrorCode {
    /// Whether the same request may succeed when retried later.
    pub fn is_retryable(self) -> bool {
        match self {
            Self::Unavailable | Self::ResourceExhausted => true,
            Self::InvalidArgument
            | Self::NotFound
            | Self::AlreadyExists
            | Self::Unauthenticated
            | Self::PermissionDenied
            | Self::FailedPrecondition
            | Self::Internal => false,
        }
    }
}

/// One invalid field of a request: its path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The path of the field, for example `events[3].user_id`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }

    /// The same violation with `prefix.` put before the field path.
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}
