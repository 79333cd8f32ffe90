//! Tessera's scoring service: explainable scores computed from facts the caller sends, and the
//! fitted customer-value models they use.
//!
//! Scoring is pure: the profile service sends a profile's facts (event count, last seen,
//! decayed activity, traits, computed traits, audiences, accounts, purchases) and stores the
//! scores it gets back on the profile. The math lives in [`domain`] (engagement), [`plans`]
//! (declarative scoring plans from config), [`clv`] (BG/NBD and Gamma-Gamma) and [`rfm`]: free
//! of gRPC and I/O, so it can be tested and benchmarked alone. The only state is in
//! [`models`]: the fitted customer-value models, versioned in the service's database (Postgres,
//! or SQLite in `tessera dev`), fitted over the population the profile service streams.

pub mod account;
pub mod clv;
mod convert;
pub mod domain;
mod error;
pub mod models;
pub mod plan_book;
pub mod plan_store;
pub mod plans;
pub mod rfm;
mod service;

use std::sync::Arc;

use sqlx::migrate::Migrator;
use tessera_proto::scoring::v1::scoring_service_server::ScoringServiceServer;
use tessera_store::{Database, Migrations};

pub use error::ScoringError;
pub use models::{FittingSettings, Models};
pub use plan_book::PlanBook;
pub use plans::{InvalidPlan, Plans};

/// The Postgres schema of the scoring service's tables.
pub const SCHEMA: &str = "scoring";

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The scoring service's migrations, per backend.
pub static MIGRATIONS: Migrations = Migrations {
    postgres: &POSTGRES_MIGRATIONS,
    sqlite: &SQLITE_MIGRATIONS,
};

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
    /// Customer-value parameters fitted elsewhere (`[scoring.customer_value]`), used while no
    /// stored model is active, and the horizons every model is used with: with them, profiles
    /// with purchases get `churn_risk` and `predicted_value`.
    pub customer_value: Option<clv::CustomerValueSettings>,
    /// How stored models are fitted (`[scoring.fitting]`): the schedule, the smallest
    /// population, how often replicas look for a newly active model.
    pub fitting: FittingSettings,
}

/// Why the scoring settings are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidSettings {
    /// A plan is unusable.
    #[error(transparent)]
    Plan(#[from] InvalidPlan),
    /// The customer-value model or its fitting is unusable.
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
#[derive(Debug, Clone)]
pub struct Scoring {
    plans: Arc<PlanBook>,
    models: Arc<Models>,
}

impl Default for Scoring {
    fn default() -> Self {
        Self::with_plans(Plans::default())
    }
}

impl Scoring {
    /// A scoring service without plans: it scores engagement only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scoring service scoring engagement and `plans` (none can be added through the API).
    pub fn with_plans(plans: Plans) -> Self {
        Self {
            plans: Arc::new(PlanBook::fixed(plans)),
            models: Arc::new(Models::default()),
        }
    }

    /// A scoring service with the plans and customer-value settings of `settings`, or why one
    /// is unusable. It stores no models until [`Scoring::with_store`].
    pub fn from_settings(settings: &ScoringSettings) -> Result<Self, InvalidSettings> {
        let plans = PlanBook::new(settings.plans.clone())?;
        let models = Models::new(settings.customer_value.as_ref(), settings.fitting.clone())
            .map_err(InvalidSettings::CustomerValue)?;
        Ok(Self {
            plans: Arc::new(plans),
            models: Arc::new(models),
        })
    }

    /// Stores fitted models and API-declared plans in `db` (connected with
    /// `Database::connect(url, SCHEMA, ..)` and migrated with [`MIGRATIONS`]) and fits models
    /// on the purchase histories of the profile service at `profile` (a lazily connected
    /// channel).
    pub fn with_store(self, db: Database, profile: tonic::transport::Channel) -> Self {
        if !self.plans.attach_store(plan_store::open(db.clone())) {
            tracing::warn!("the scoring service has a plan store already");
        }
        self.with_model_store(
            models::store::open(db),
            Arc::new(models::ProfilePopulation::new(profile)),
        )
    }

    /// Stores fitted models in `store`, fitted on what `population` gives.
    pub fn with_model_store(
        self,
        store: Arc<dyn models::store::ModelStore>,
        population: Arc<dyn models::PopulationSource>,
    ) -> Self {
        if !self.models.attach_store(store, population) {
            tracing::warn!("the scoring service has a model store already");
        }
        self
    }

    /// The plans this service scores with.
    pub fn plans(&self) -> &Arc<PlanBook> {
        &self.plans
    }

    /// The customer-value models this service scores with.
    pub fn models(&self) -> &Arc<Models> {
        &self.models
    }

    /// Polls the active model and the stored plans' revision (every
    /// `scoring.fitting.poll_interval_ms`) and runs the fit schedule until `shutdown`; returns
    /// at once without a store.
    pub fn spawn_workers(&self, shutdown: tessera_server::Shutdown) -> tokio::task::JoinHandle<()> {
        self.models.spawn(Arc::clone(&self.plans), shutdown)
    }

    /// Adds `ScoringService` to the services one process serves.
    pub fn register(&self, services: &mut tessera_server::GrpcServices) {
        services.add(
            ScoringServiceServer::new(service::ScoringApi {
                plans: Arc::clone(&self.plans),
                models: Arc::clone(&self.models),
            })
            .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
        );
    }
}
