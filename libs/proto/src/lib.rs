//! Tessera's protobuf contracts: generated messages, clients and servers, the descriptor set for
//! gRPC reflection, and conversions between protobuf well-known types and JSON / time.

#![allow(
    unreachable_pub,
    clippy::wildcard_enum_match_arm,
    clippy::doc_lazy_continuation
)]

pub mod convert;
mod profile_response;

/// Shared messages: identifiers, events, field violations.
pub mod common {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tessera.common.v1");
    }
}

/// The ingestion service's API.
pub mod ingestion {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tessera.ingestion.v1");
    }
}

/// The identity service's API.
pub mod identity {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tessera.identity.v1");
    }
}

/// The profile service's APIs.
pub mod profile {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tessera.profile.v1");
        pub use crate::profile_response::{BatchProfileResult, GetProfileResponse};
    }
}

/// The scoring service's API.
pub mod scoring {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tessera.scoring.v1");
    }
}

/// The encoded `FileDescriptorSet` of every Tessera `.proto` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tessera_descriptor");
