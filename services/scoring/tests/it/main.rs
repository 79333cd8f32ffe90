//! Integration tests of the scoring service over gRPC.

mod grpc;
