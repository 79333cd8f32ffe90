//! Tessera's scoring service: explainable scores computed from facts the caller sends.
//!
//! Pure: nothing is stored here. The profile service sends a profile's facts (event count, last
//! seen, decayed activity, traits, computed traits, audiences, accounts) and stores the scores
//! it gets back on the profile. The math lives in [`domain`] (engagement), [`plans`]
//! (declarative scoring plans from config) and, for predicted customer value (BG/NBD and
//! Gamma-Gamma), in [`clv`]: free of gRPC and I/O, so it can be tested and benchmarked alone.

pub mod clv;
mod convert;
pub mod domain;
mod error;
pub mod plans;
mod service;

use std::sync::Arc;

use tessera_proto::scoring::v1::scoring_service_server::ScoringServiceServer;

pub use error::ScoringError;
pub use plans::{InvalidPlan, Plans};

/// The largest number of profiles one `ScoreProfiles` call may carry.
pub const MAX_PROFILES_PER_REQUEST: usize = 5_000;

/// The largest gRPC message the service decodes: 5,000 profiles with their traits (a few KiB
/// each) fit with room to spare.
const MAX_DECODING_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Settings of the scoring service (`[scoring]`).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoringSettings {
    /// The scoring plans (`[[scoring.plans]]`), scored in declaration order after engagement.
    pub plans: Vec<plans::Plan>,
    /// The fitted customer-value models (`[scoring.customer_value]`): with them, profiles with
    /// purchases get `churn_risk` and `predicted_value`.
    pub customer_value: Option<clv::CustomerValueSettings>,
}

/// Why the scoring settings are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidSettings {
    /// A plan is unusable.
    #[error(transparent)]
    Plan(#[from] InvalidPlan),
    /// The customer-value model is unusable.
    #[error("scoring.{0}")]
    CustomerValue(String),
}

impl ScoringSettings {
    /// Checks the plans and the customer-value model, naming the first unusable one and why.
    pub fn validate(&self) -> Result<(), InvalidSettings> {
        Scoring::from_settings(self).map(|_| ())
    }
}

/// The scoring service: `tessera.scoring.v1.ScoringService`.
#[derive(Debug, Clone, Default)]
pub struct Scoring {
    plans: Arc<Plans>,
    customer_value: Option<Arc<clv::CustomerValue>>,
}

impl Scoring {
    /// A scoring service without plans: it scores engagement only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scoring service scoring engagement and `plans`.
    pub fn with_plans(plans: Plans) -> Self {
        Self {
            plans: Arc::new(plans),
            customer_value: None,
        }
    }

    /// A scoring service with the plans of `settings`, or why one is unusable.
    pub fn from_settings(settings: &ScoringSettings) -> Result<Self, InvalidSettings> {
        let mut scoring = Self::with_plans(Plans::compile(settings.plans.clone())?);
        if let Some(model) = &settings.customer_value {
            scoring.customer_value = Some(Arc::new(
                model.compile().map_err(InvalidSettings::CustomerValue)?,
            ));
        }
        Ok(scoring)
    }

    /// Adds `ScoringService` to the services one process serves.
    pub fn register(&self, services: &mut tessera_server::GrpcServices) {
        services.add(
            ScoringServiceServer::new(service::ScoringApi {
                plans: Arc::clone(&self.plans),
                customer_value: self.customer_value.clone(),
            })
            .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
        );
    }
}
