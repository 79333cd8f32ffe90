//! Integration tests of the scoring service: over gRPC, and the customer-value models against
//! the published CDNOW results.

mod cdnow;
mod grpc;
