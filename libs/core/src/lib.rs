//! Tessera's domain types and rules, free of gRPC and SQL: error codes, events, identifiers.
//!
//! Everything here can be unit-tested and benchmarked without a server or a database.

pub mod activity;
pub mod condition;
pub mod error;
pub mod event;
pub mod identifier;

pub use error::{ErrorCode, FieldViolation};
pub use event::{Event, EventType};
pub use identifier::Identifier;
