//! The plans in effect: config's (`[[scoring.plans]]`, read-only), then those declared through
//! the API ([`crate::plan_store`]) in creation order, validated together by
//! [`Plans::compile`] and swapped atomically when the store's revision changes.
//!
//! Plans are also checked against the buying committee: a config plan or a plan written through
//! the API that names a buying role the committee does not have, or tests a coverage
//! (`buying_roles_covered`) above the committee's size, is refused; a stored plan that does (the
//! committee changed since it was stored) stays in effect with that rule marked not evaluable,
//! and a warning names the plan, the rule and the problem.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use tessera_core::FieldViolation;
use time::OffsetDateTime;

use crate::account::BuyingCommittee;
use crate::error::ScoringError;
use crate::plan_store::{PlanChange, PlanRefusal, PlanStore, PlanWrite, StoredPlan};
use crate::plans::{CommitteeMismatch, CompiledPlan, InvalidPlan, Plan, Plans};

/// The plans in effect, and the changes to the stored ones.
#[derive(Debug)]
pub struct PlanBook {
    config: Vec<Plan>,
    committee: Arc<BuyingCommittee>,
    config_plans: Arc<Plans>,
    store: OnceLock<Arc<dyn PlanStore>>,
    current: RwLock<Loaded>,
}

/// One consistent set of plans in effect.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The store's revision they come from; `None` before the first read (config only).
    pub revision: Option<i64>,
    /// Config's plans, then the stored ones.
    pub plans: Arc<Plans>,
    /// The stored plans' versions by name; config's plans are not in it.
    pub versions: Arc<HashMap<String, i64>>,
}

impl Loaded {
    /// The stored version of the plan `name`; `None` for a plan from config.
    pub fn stored_version(&self, name: &str) -> Option<i64> {
        self.versions.get(name).copied()
    }
}

impl Default for PlanBook {
    fn default() -> Self {
        Self::from_compiled(
            Vec::new(),
            Plans::default(),
            Arc::new(BuyingCommittee::default()),
        )
    }
}

/// A rule that could never match with the committee, with its plan's name.
type Mismatch = (String, CommitteeMismatch);

/// Config's plans followed by `stored`, validated together, and checked against `committee`:
/// the rules naming a role it lacks or a coverage above its size are marked not evaluable and
/// answered.
fn compile_all(
    config: &[Plan],
    stored: &[StoredPlan],
    committee: &BuyingCommittee,
) -> Result<(Plans, Vec<Mismatch>), InvalidPlan> {
    let mut plans = Plans::compile(
        config
            .iter()
            .cloned()
            .chain(stored.iter().map(|s| s.plan.clone()))
            .collect(),
    )?;
    let mismatches = plans.check_committee(committee);
    Ok((plans, mismatches))
}

/// Logs each stored plan's rule that could never match with the committee.
fn warn_mismatches(mismatches: &[Mismatch]) {
    for (plan, mismatch) in mismatches {
        match mismatch {
            CommitteeMismatch::UnknownRole(unknown) => tracing::warn!(
                plan = %plan,
                rule = %unknown.rule,
                role = %unknown.role,
                known = ?unknown.known,
                "stored scoring plan names a buying role the committee does not have, the rule \
                 is not evaluable"
            ),
            CommitteeMismatch::UnreachableCoverage(coverage) => tracing::warn!(
                plan = %plan,
                rule = %coverage.rule,
                threshold = coverage.threshold,
                committee_size = coverage.committee_size,
                "stored scoring plan tests a buying role coverage above the committee's size, \
                 the rule is not evaluable"
            ),
        }
    }
}

fn versions(stored: &[StoredPlan]) -> Arc<HashMap<String, i64>> {
    Arc::new(
        stored
            .iter()
            .map(|s| (s.plan.name.clone(), s.version))
            .collect(),
    )
}

impl PlanBook {
    /// Config's plans, validated and checked against `committee` (a plan naming a buying role
    /// it does not have, or testing a coverage above its size, is refused); no store yet.
    pub fn new(config: Vec<Plan>, committee: Arc<BuyingCommittee>) -> Result<Self, InvalidPlan> {
        let compiled = Plans::compile(config.clone())?;
        for (index, plan) in config.iter().enumerate() {
            if let Some(mismatch) = crate::plans::committee_mismatches(plan, &committee)
                .into_iter()
                .next()
            {
                return Err(InvalidPlan {
                    index,
                    name: plan.name.clone(),
                    reason: mismatch.to_string(),
                });
            }
        }
        Ok(Self::from_compiled(config, compiled, committee))
    }

    /// Compiled plans without their declarations, with the default buying committee: none can
    /// be stored beside them. Rules naming a buying role it lacks, or a coverage above its
    /// size, are not evaluable.
    pub fn fixed(mut plans: Plans) -> Self {
        let committee = Arc::new(BuyingCommittee::default());
        warn_mismatches(&plans.check_committee(&committee));
        let config = plans.iter().map(|p| p.plan().clone()).collect();
        Self::from_compiled(config, plans, committee)
    }

    fn from_compiled(config: Vec<Plan>, compiled: Plans, committee: Arc<BuyingCommittee>) -> Self {
        let config_plans = Arc::new(compiled);
        Self {
            config,
            committee,
            current: RwLock::new(Loaded {
                revision: None,
                plans: Arc::clone(&config_plans),
                versions: Arc::default(),
            }),
            config_plans,
            store: OnceLock::new(),
        }
    }

    /// Reads and changes stored plans in `store`. Only the first call counts; whether it did.
    pub fn attach_store(&self, store: Arc<dyn PlanStore>) -> bool {
        self.store.set(store).is_ok()
    }

    /// The buying committee plans are checked against.
    pub fn committee(&self) -> &Arc<BuyingCommittee> {
        &self.committee
    }

    /// Whether plans can be stored.
    pub fn has_store(&self) -> bool {
        self.store.get().is_some()
    }

    /// The plans in effect now.
    pub fn loaded(&self) -> Loaded {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The plans to score with now.
    pub fn current(&self) -> Arc<Plans> {
        self.loaded().plans
    }

    fn store(&self) -> Result<&Arc<dyn PlanStore>, ScoringError> {
        self.store.get().ok_or(ScoringError::NoPlanStore)
    }

    /// Installs a set read at `revision`, unless a later one is installed already.
    fn install(&self, loaded: Loaded) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if current.revision.is_none_or(|r| Some(r) < loaded.revision) {
            *current = loaded;
        }
    }

    /// Reads the store's revision and, when it changed, reloads the stored plans. Whether
    /// the plans changed.
    pub async fn refresh(&self) -> Result<bool, ScoringError> {
        let Some(store) = self.store.get() else {
            return Ok(false);
        };
        let revision = store.revision().await?;
        if self.loaded().revision == Some(revision) {
            return Ok(false);
        }
        let (revision, mut stored) = store.list().await?;
        // A stored plan that config now contradicts (a name taken, a score no longer
        // computed before it) is left out rather than taking every plan down.
        let plans = loop {
            match compile_all(&self.config, &stored, &self.committee) {
                Ok((plans, mismatches)) => {
                    // Refusing them would take plans that scored yesterday down with a config
                    // change; the rule alone stops counting, and says why.
                    warn_mismatches(&mismatches);
                    break plans;
                }
                Err(invalid) => match invalid.index.checked_sub(self.config.len()) {
                    Some(i) if i < stored.len() => {
                        tracing::error!(
                            plan = %stored[i].plan.name,
                            reason = %invalid.reason,
                            "stored scoring plan unusable, left out"
                        );
                        stored.remove(i);
                    }
                    Some(_) | None => {
                        tracing::error!(%invalid, "stored scoring plans unusable, left out");
                        stored.clear();
                        break Plans::clone(&self.config_plans);
                    }
                },
            }
        };
        tracing::info!(revision, stored = stored.len(), "scoring plans loaded");
        self.install(Loaded {
            revision: Some(revision),
            plans: Arc::new(plans),
            versions: versions(&stored),
        });
        Ok(true)
    }

    /// The plan `name` in effect, with its stored version (`None`: from config).
    pub async fn get(&self, name: &str) -> Result<(CompiledPlan, Option<i64>), ScoringError> {
        if self.has_store()
            && let Err(e) = self.refresh().await
        {
            tracing::warn!(error = %e, "reading the stored scoring plans failed");
        }
        let loaded = self.loaded();
        loaded
            .plans
            .iter()
            .find(|p| p.plan().name == name)
            .map(|p| (p.clone(), loaded.stored_version(name)))
            .ok_or_else(|| ScoringError::PlanNotFound(name.to_owned()))
    }

    /// Stores a new plan after the others: the revision after the change and the plan. `field`
    /// names the plan in the request.
    pub async fn create(
        &self,
        plan: Plan,
        field: &str,
    ) -> Result<(i64, CompiledPlan), ScoringError> {
        let name = plan.name.clone();
        self.change(&name, PlanChange::Create(plan), field).await
    }

    /// Replaces the stored plan of the same name when its version is `expected_version`: the
    /// revision after the change and the plan.
    pub async fn update(
        &self,
        plan: Plan,
        expected_version: i64,
        field: &str,
    ) -> Result<(i64, CompiledPlan), ScoringError> {
        let name = plan.name.clone();
        let change = PlanChange::Update {
            plan,
            expected_version,
        };
        self.change(&name, change, field).await
    }

    /// Removes the stored plan `name` (when its version is `expected_version`, unless 0).
    pub async fn delete(
        &self,
        name: &str,
        expected_version: i64,
        field: &str,
    ) -> Result<i64, ScoringError> {
        let change = PlanChange::Delete {
            name: name.to_owned(),
            expected_version,
        };
        self.write(name, &change, field)
            .await
            .map(|(revision, _)| revision)
    }

    async fn change(
        &self,
        name: &str,
        change: PlanChange,
        field: &str,
    ) -> Result<(i64, CompiledPlan), ScoringError> {
        let (revision, plans) = self.write(name, &change, field).await?;
        plans
            .iter()
            .find(|p| p.plan().name == name)
            .map(|p| (revision, p.clone()))
            .ok_or_else(|| ScoringError::Corrupt(format!("plan {name:?} vanished")))
    }

    /// Applies `change`, validated with config's plans and the other stored ones, and puts
    /// the result in effect on this replica at once (the others poll the revision).
    async fn write(
        &self,
        name: &str,
        change: &PlanChange,
        field: &str,
    ) -> Result<(i64, Arc<Plans>), ScoringError> {
        let store = self.store()?;
        if self.config.iter().any(|p| p.name == name) {
            return Err(ScoringError::ConfigPlan(name.to_owned()));
        }
        let checked: Mutex<Option<Loaded>> = Mutex::new(None);
        let written = match change {
            PlanChange::Create(_) | PlanChange::Update { .. } => Some(name),
            PlanChange::Delete { .. } => None,
        };
        let check = |stored: &[StoredPlan]| {
            let (plans, mismatches) =
                compile_all(&self.config, stored, &self.committee).map_err(|invalid| {
                    let other = invalid
                        .index
                        .checked_sub(self.config.len())
                        .and_then(|i| stored.get(i))
                        .map(|s| s.plan.name.as_str())
                        .filter(|other| *other != name);
                    let description = match other {
                        Some(other) => format!(
                            "the plan {other:?}, created later, would be unusable: {}",
                            invalid.reason
                        ),
                        None => invalid.reason,
                    };
                    ScoringError::InvalidArgument(vec![FieldViolation::new(field, description)])
                })?;
            // The plan written may not name a role the committee lacks nor test a coverage above
            // its size; other stored plans that do (the committee changed since) stay as they
            // are, not evaluable.
            let violations: Vec<FieldViolation> = mismatches
                .iter()
                .filter(|(plan, _)| Some(plan.as_str()) == written)
                .map(|(_, mismatch)| {
                    FieldViolation::new(mismatch.field(field), mismatch.to_string())
                })
                .collect();
            if !violations.is_empty() {
                return Err(ScoringError::InvalidArgument(violations));
            }
            *checked.lock().unwrap_or_else(PoisonError::into_inner) = Some(Loaded {
                revision: None,
                plans: Arc::new(plans),
                versions: versions(stored),
            });
            Ok(())
        };
        match store
            .write(change, &check, OffsetDateTime::now_utc())
            .await?
        {
            PlanWrite::Done { revision, .. } => {
                let loaded = checked
                    .into_inner()
                    .unwrap_or_else(PoisonError::into_inner)
                    .ok_or_else(|| ScoringError::Corrupt("plans not checked".to_owned()))?;
                let plans = Arc::clone(&loaded.plans);
                self.install(Loaded {
                    revision: Some(revision),
                    ..loaded
                });
                tracing::info!(
                    plan = name,
                    revision,
                    "scoring plans changed through the api"
                );
                Ok((revision, plans))
            }
            PlanWrite::Refused(PlanRefusal::Exists) => {
                Err(ScoringError::PlanExists(name.to_owned()))
            }
            PlanWrite::Refused(PlanRefusal::NotFound) => {
                Err(ScoringError::PlanNotFound(name.to_owned()))
            }
            PlanWrite::Refused(PlanRefusal::VersionMismatch(actual)) => {
                Err(ScoringError::PlanVersionMismatch {
                    name: name.to_owned(),
                    actual,
                })
            }
        }
    }
}
