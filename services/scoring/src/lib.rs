//! Tessera's scoring service: explainable scores computed from facts the caller sends.
//!
//! Pure: nothing is stored here. The profile service sends a profile's facts (event count, last
//! seen, decayed activity) and stores the scores it gets back on the profile. The math lives in
//! [`domain`] and, for predicted customer value (BG/NBD and Gamma-Gamma), in [`clv`]: free of
//! gRPC and I/O, so it can be tested and benchmarked alone.

pub mod clv;
mod convert;
pub mod domain;
mod error;
mod service;

use tessera_proto::scoring::v1::scoring_service_server::ScoringServiceServer;

pub use error::ScoringError;

/// The largest number of profiles one `ScoreProfiles` call may carry.
pub const MAX_PROFILES_PER_REQUEST: usize = 5_000;

/// The largest gRPC message the service decodes: 5,000 profiles fit with room to spare.
const MAX_DECODING_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// The scoring service: `tessera.scoring.v1.ScoringService`.
#[derive(Debug, Clone, Default)]
pub struct Scoring {
    _private: (),
}

impl Scoring {
    /// A scoring service; it holds no state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `ScoringService` to the services one process serves.
    pub fn register(&self, services: &mut tessera_server::GrpcServices) {
        services.add(
            ScoringServiceServer::new(service::ScoringApi)
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
        );
    }
}
