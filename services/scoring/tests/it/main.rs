//! Integration tests of the scoring service: over gRPC (engagement, and scoring plans from
//! config), and the customer-value models against the published CDNOW results.

mod cdnow;
mod grpc;
mod models_grpc;
mod models_store;
mod plans;
mod plans_store;
