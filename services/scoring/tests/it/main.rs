//! Integration tests of the scoring service: over gRPC (engagement, scoring plans from config and
//! through the API), the stores on both backends, and the customer-value models against the
//! published CDNOW results.

mod cdnow;
mod grpc;
mod models_grpc;
mod models_store;
mod plans;
mod plans_api;
mod plans_store;
