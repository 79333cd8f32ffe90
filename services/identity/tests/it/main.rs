//! Integration tests of the identity service: the storage conformance suite on both backends,
//! concurrent replicas on one Postgres, and the gRPC face.

mod concurrency;
mod conformance;
mod grpc;
mod matching;
mod rules;
mod support;
