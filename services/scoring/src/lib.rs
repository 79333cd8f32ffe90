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

pub use account::{BuyingCommittee, BuyingRole, InvalidBuyingRoles};
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
    /// The B2B buying committee (`[[scoring.buying_roles]]`) account plans' `buying_roles` and
    /// `buying_roles_covered` count against. `None` (not declared): the default committee of
    /// [`account::DEFAULT_BUYING_ROLES`]; an empty list is refused.
    pub buying_roles: Option<Vec<BuyingRole>>,
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
    /// The declared buying committee is unusable.
    #[error(transparent)]
    BuyingRoles(#[from] InvalidBuyingRoles),
    /// The customer-value model or its fitting is unusable.
    #[error("scoring.{0}")]
    CustomerValue(String),
}

impl ScoringSettings {
    /// Checks the plans, the buying committee and the customer-value model, naming the first
    /// unusable one and why.
    pub fn validate(&self) -> Result<(), InvalidSettings> {
        Scoring::from_settings(self).map(|_| ())
    }
}

/// The scoring service: `tessera.scoring.v1.ScoringService`.
#[derive(Debug, Clone)]
pub struct Scoring {
    plans: Arc<PlanBook>,
    models: Arc<Models>,
    committee: Arc<BuyingCommittee>,
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

    /// A scoring service scoring engagement and `plans` (none can be added through the API),
    /// with the default buying committee.
    pub fn with_plans(plans: Plans) -> Self {
        let plans = PlanBook::fixed(plans);
        Self {
            committee: Arc::clone(plans.committee()),
            plans: Arc::new(plans),
            models: Arc::new(Models::default()),
        }
    }

    /// A scoring service with the plans, buying committee and customer-value settings of
    /// `settings`, or why one is unusable. It stores no models until [`Scoring::with_store`].
    /// The committee is checked first: plans naming a buying role it lacks, or testing a
    /// coverage above its size, are refused.
    pub fn from_settings(settings: &ScoringSettings) -> Result<Self, InvalidSettings> {
        let committee = Arc::new(match &settings.buying_roles {
            None => BuyingCommittee::default(),
            Some(declared) => BuyingCommittee::new(declared)?,
        });
        let plans = PlanBook::new(settings.plans.clone(), Arc::clone(&committee))?;
        let models = Models::new(settings.customer_value.as_ref(), settings.fitting.clone())
            .map_err(InvalidSettings::CustomerValue)?;
        Ok(Self {
            plans: Arc::new(plans),
            models: Arc::new(models),
            committee,
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

    /// The buying committee account plans' coverage is counted against.
    pub fn buying_committee(&self) -> &BuyingCommittee {
        &self.committee
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
                committee: Arc::clone(&self.committee),
            })
            .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> ScoringSettings {
        toml::from_str(text).expect("settings parse")
    }

    fn refusal(text: &str) -> String {
        settings(text).validate().unwrap_err().to_string()
    }

    #[test]
    fn without_buying_roles_the_committee_is_the_default_one() {
        let none = settings("");
        assert_eq!(none.buying_roles, None);
        none.validate().unwrap();
        let scoring = Scoring::from_settings(&none).unwrap();
        assert_eq!(scoring.buying_committee(), &BuyingCommittee::default());
        assert_eq!(
            Scoring::new().buying_committee(),
            &BuyingCommittee::default()
        );
    }

    #[test]
    fn declared_buying_roles_are_normalized_into_the_committee() {
        let declared = settings(
            r#"
            [[buying_roles]]
            name = "Decision_Maker"
            filled_by = ["decision maker", "Economic Buyer", "VP"]

            [[buying_roles]]
            name = "security"
            filled_by = ["ciso"]
            "#,
        );
        let scoring = Scoring::from_settings(&declared).unwrap();
        let roles = scoring.buying_committee().roles();
        assert_eq!(roles.len(), 2);
        assert_eq!(roles[0].name, "decision maker");
        assert_eq!(
            roles[0].filled_by,
            ["decision maker", "economic buyer", "vp"]
        );
        assert_eq!(roles[1].name, "security");
    }

    #[test]
    fn unusable_buying_roles_are_refused_naming_the_problem() {
        // An empty list is an error, not an empty committee: leaving it out is the default.
        let empty = refusal("buying_roles = []");
        assert!(
            empty.starts_with("scoring.buying_roles: declare at least one buying role, or leave"),
            "{empty}"
        );
        assert_eq!(
            refusal(
                r#"
                [[buying_roles]]
                name = "champion"
                filled_by = ["champion"]
                [[buying_roles]]
                name = " CHAMPION "
                filled_by = ["sponsor"]
                "#
            ),
            "scoring.buying_roles[1] (\" CHAMPION \"): name \"champion\" is declared twice \
             (first as scoring.buying_roles[0]; names are compared normalized)"
        );
        assert_eq!(
            refusal("[[buying_roles]]\nname = \"\"\nfilled_by = [\"x\"]\n"),
            "scoring.buying_roles[0] (\"\"): name must be 1 to 200 bytes once normalized \
             (trimmed, lower case, `_` and `-` read as spaces)"
        );
        assert_eq!(
            refusal("[[buying_roles]]\nname = \"finance\"\nfilled_by = []\n"),
            "scoring.buying_roles[0] (\"finance\"): filled_by is empty: list the member roles \
             that fill this buying role (the name itself too, if members hold it)"
        );
        assert_eq!(
            refusal("[[buying_roles]]\nname = \"finance\"\nfilled_by = [\"finance\", \"\"]\n"),
            "scoring.buying_roles[0] (\"finance\"): filled_by[1] must be 1 to 200 bytes once \
             normalized"
        );
        let many: String = (0..51)
            .map(|i| format!("[[buying_roles]]\nname = \"role {i}\"\nfilled_by = [\"r\"]\n"))
            .collect();
        assert_eq!(
            refusal(&many),
            "scoring.buying_roles: 51 buying roles declared, at most 50"
        );
        // A misspelled key or a missing one fails to parse.
        assert!(
            toml::from_str::<ScoringSettings>(
                "[[buying_roles]]\nname = \"x\"\nfiled_by = [\"x\"]\n"
            )
            .unwrap_err()
            .to_string()
            .contains("filed_by")
        );
        assert!(
            toml::from_str::<ScoringSettings>("[[buying_roles]]\nname = \"x\"\n")
                .unwrap_err()
                .to_string()
                .contains("filled_by")
        );
    }

    #[test]
    fn plans_naming_a_buying_role_the_committee_lacks_are_refused_at_start() {
        const PLAN: &str = r#"
            [[plans]]
            name = "fit"
            version = "1"
            rules = [{ name = "r", points = 1, condition = { all = [] } }]

            [[plans]]
            name = "accounts"
            version = "1"
            level = "account"
            rules = [
              { name = "big", points = 10, condition = { trait = { name = "employees", op = "gte", value = 100 } } },
              { name = "security", points = 10, condition = { trait = { name = "buying_roles", op = "contains", value = "security reviewer" } } },
            ]
        "#;
        // The default committee has no security reviewer.
        assert_eq!(
            refusal(PLAN),
            "scoring.plans[1] (\"accounts\"): rule \"security\": buying role \"security \
             reviewer\" is not in the buying committee, so the rule could never match (known \
             buying roles: \"decision maker\", \"technical evaluator\", \"champion\", \
             \"finance\")"
        );
        // Declared, the plan is valid.
        let declared = format!(
            "{PLAN}\n[[buying_roles]]\nname = \"Security-Reviewer\"\nfilled_by = [\"ciso\"]\n"
        );
        settings(&declared).validate().unwrap();
        // An unusable committee is reported first: plans cannot be checked against it.
        assert!(
            refusal(&format!("buying_roles = []\n{PLAN}")).starts_with("scoring.buying_roles:"),
        );
    }

    #[test]
    fn coverage_thresholds_above_the_committee_size_are_refused_at_start() {
        const PLAN: &str = r#"
            [[plans]]
            name = "accounts"
            version = "1"
            level = "account"
            rules = [
              { name = "big", points = 10, condition = { trait = { name = "employees", op = "gte", value = 100 } } },
              { name = "full", points = 10, condition = { trait = { name = "buying_roles_covered", op = "gte", value = 3 } } },
            ]
        "#;
        // The default committee has four roles: three can be covered.
        settings(PLAN).validate().unwrap();
        let two = "[[buying_roles]]\nname = \"finance\"\nfilled_by = [\"cfo\"]\n\
                   [[buying_roles]]\nname = \"champion\"\nfilled_by = [\"champion\"]\n";
        assert_eq!(
            refusal(&format!("{PLAN}\n{two}")),
            "scoring.plans[0] (\"accounts\"): rule \"full\": buying_roles_covered gte 3 needs \
             more buying roles than the buying committee has (2; buying_roles_covered is 0 to \
             2), so the test could never hold"
        );
    }
}
