//! The models every replica scores with, kept current by polling the latest activation, and
//! the fits that make them (on demand, and on a schedule that one replica at a time runs).

use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use time::OffsetDateTime;

use super::store::{Activation, ModelStore};
use super::{FittingSettings, NewModel, PopulationSource, StoredModel, Trigger};
use crate::clv::{CustomerValue, CustomerValueSettings};
use crate::domain::ValueModels;
use crate::error::ScoringError;
use crate::rfm::RfmModel;

/// How long a replica holds the scheduled fit before another may take it over (a replica that
/// died mid-fit).
const SCHEDULE_LEASE: Duration = Duration::from_secs(30 * 60);
/// How soon a failed scheduled fit is tried again (at most the interval).
const SCHEDULE_RETRY: Duration = Duration::from_secs(60 * 60);
/// How often each replica checks whether the scheduled fit is due.
const SCHEDULE_CHECK: Duration = Duration::from_secs(30);

/// What one look at the schedule did.
#[derive(Debug)]
pub enum ScheduleOutcome {
    /// The schedule is off, not due, or another replica holds it.
    Skipped,
    /// This replica fitted (the model may be rejected).
    Fitted(Box<StoredModel>),
    /// This replica tried and failed; it is tried again within the hour.
    Failed(ScoringError),
}

/// The active models and how they change.
#[derive(Debug)]
pub struct Models {
    /// The stored models and the population fits read; unset without a database.
    stored: OnceLock<Stored>,
    /// The horizons fitted parameters are used with (`[scoring.customer_value]`'s, else the
    /// defaults), and the time unit fits are made in.
    template: CustomerValueSettings,
    /// The configured parameters: used while no stored model is active.
    fallback: Option<Arc<CustomerValue>>,
    settings: FittingSettings,
    current: RwLock<Current>,
    /// This replica's name in the schedule's lease.
    holder: String,
}

impl Default for Models {
    /// No configured parameters, the default fitting settings, no store.
    fn default() -> Self {
        Self::build(None, default_horizons(), FittingSettings::default())
    }
}

/// `t` without its sub-microsecond part.
fn whole_micros(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap_or(t)
}

/// The default horizons (weeks; 52 of them; 12 months at 1 %) around placeholder parameters.
fn default_horizons() -> CustomerValueSettings {
    CustomerValueSettings::from_params(
        crate::clv::BgNbdParams {
            r: 1.0,
            alpha: 1.0,
            a: 1.0,
            b: 1.0,
        },
        crate::clv::GammaGammaParams {
            p: 1.0,
            q: 2.0,
            v: 1.0,
        },
        crate::clv::summary::DAYS_PER_WEEK,
        "",
    )
}

#[derive(Debug)]
struct Stored {
    store: Arc<dyn ModelStore>,
    population: Arc<dyn PopulationSource>,
}

#[derive(Debug, Clone)]
struct Current {
    /// The activation in use; `None` while the fallback is.
    seq: Option<i64>,
    models: Arc<ValueModels>,
}

impl Models {
    /// Models from config only: the configured parameters (if any), no store.
    pub fn new(
        configured: Option<&CustomerValueSettings>,
        settings: FittingSettings,
    ) -> Result<Self, String> {
        if let Some(problem) = settings.problem() {
            return Err(problem);
        }
        let fallback = configured
            .map(CustomerValueSettings::compile)
            .transpose()?
            .map(Arc::new);
        let template = configured.cloned().unwrap_or_else(default_horizons);
        Ok(Self::build(fallback, template, settings))
    }

    fn build(
        fallback: Option<Arc<CustomerValue>>,
        template: CustomerValueSettings,
        settings: FittingSettings,
    ) -> Self {
        Self {
            stored: OnceLock::new(),
            current: RwLock::new(Current {
                seq: None,
                models: Arc::new(ValueModels {
                    customer_value: fallback.clone(),
                    rfm: None,
                }),
            }),
            template,
            fallback,
            settings,
            holder: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// Stores models in `store`, fitted on the population `population` gives. Only the first
    /// call counts; whether it did.
    pub fn attach_store(
        &self,
        store: Arc<dyn ModelStore>,
        population: Arc<dyn PopulationSource>,
    ) -> bool {
        self.stored.set(Stored { store, population }).is_ok()
    }

    /// The models to score with now.
    pub fn current(&self) -> Arc<ValueModels> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .models
            .clone()
    }

    fn store(&self) -> Result<&Arc<dyn ModelStore>, ScoringError> {
        self.stored
            .get()
            .map(|s| &s.store)
            .ok_or(ScoringError::NoModelStore)
    }

    /// Reads the latest activation and, when it changed, loads its model. Whether the models
    /// changed.
    pub async fn refresh(&self) -> Result<bool, ScoringError> {
        let Some(Stored { store, .. }) = self.stored.get() else {
            return Ok(false);
        };
        let active = store.active().await?;
        let seen = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .seq;
        let next = match active {
            None if seen.is_none() => return Ok(false),
            None => Current {
                seq: None,
                models: Arc::new(ValueModels {
                    customer_value: self.fallback.clone(),
                    rfm: None,
                }),
            },
            Some((seq, _)) if Some(seq) == seen => return Ok(false),
            Some((seq, version)) => {
                let model = store
                    .get(version)
                    .await?
                    .ok_or(ScoringError::ModelNotFound(version))?;
                tracing::info!(version, "customer-value model activated");
                Current {
                    seq: Some(seq),
                    models: Arc::new(self.value_models(&model)),
                }
            }
        };
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A concurrent refresh may have installed a later activation already.
        if next.seq.is_none() || current.seq.is_none_or(|s| Some(s) < next.seq) {
            *current = next;
        }
        Ok(true)
    }

    /// The scoring models of a stored fit: its parameters with the configured horizons (the
    /// configured parameters when it has none usable) and its RFM boundaries.
    fn value_models(&self, stored: &StoredModel) -> ValueModels {
        let label = stored.label();
        let body = &stored.model.body;
        let customer_value = match (body.bg_nbd, body.gamma_gamma) {
            (Some(bg), Some(gg)) => match self
                .template
                .with_params(bg, gg, stored.model.unit_days, label.clone())
                .compile()
            {
                Ok(model) => Some(Arc::new(model)),
                Err(problem) => {
                    tracing::error!(version = stored.version, %problem, "unusable stored model");
                    self.fallback.clone()
                }
            },
            (None, _) | (_, None) => self.fallback.clone(),
        };
        ValueModels {
            customer_value,
            rfm: body
                .rfm
                .clone()
                .filter(crate::rfm::RfmBoundaries::is_valid)
                .map(|boundaries| RfmModel { boundaries, label }),
        }
    }

    /// Fits the population at `as_of`, stores the fit, and activates it when good.
    pub async fn fit(
        &self,
        as_of: OffsetDateTime,
        trigger: Trigger,
    ) -> Result<StoredModel, ScoringError> {
        let Stored { store, population } = self.stored.get().ok_or(ScoringError::NoModelStore)?;
        let started = std::time::Instant::now();
        let histories = population.purchase_histories(as_of).await?;
        let min = self.settings.min_population;
        if (histories.len() as u64) < min {
            return Err(ScoringError::PopulationTooSmall {
                population: histories.len(),
                min,
            });
        }
        let unit_days = self.template.unit_days;
        let fitted = tokio::task::spawn_blocking(move || {
            super::fit_population(&histories, as_of, unit_days)
        })
        .await?;
        let good = fitted.rejection.is_none();
        // Stored to the microsecond: what the API answers now is what it reads back later.
        let now = whole_micros(OffsetDateTime::now_utc());
        let as_of = whole_micros(as_of);
        let stored = store
            .insert(
                &NewModel {
                    fitted_at: now,
                    as_of,
                    trigger,
                    population: i64::try_from(fitted.population).unwrap_or(i64::MAX),
                    unit_days,
                    rejection: fitted.rejection,
                    body: fitted.body,
                },
                good,
                now,
            )
            .await?;
        let outcome = if good { "active" } else { "rejected" };
        metrics::counter!("tessera_scoring_model_fits_total", "outcome" => outcome).increment(1);
        metrics::histogram!("tessera_scoring_model_fit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match &stored.model.rejection {
            None => tracing::info!(
                version = stored.version,
                population = stored.model.population,
                trigger = trigger.as_str(),
                "customer-value model fitted"
            ),
            Some(reason) => tracing::warn!(
                version = stored.version,
                population = stored.model.population,
                trigger = trigger.as_str(),
                reason,
                "customer-value model rejected"
            ),
        }
        if good && let Err(e) = self.refresh().await {
            // The model is stored and active; the poll picks it up.
            tracing::warn!(error = %e, "reading the new active model failed");
        }
        Ok(stored)
    }

    /// The stored model of `version`.
    pub async fn get(&self, version: i64) -> Result<StoredModel, ScoringError> {
        self.store()?
            .get(version)
            .await?
            .ok_or(ScoringError::ModelNotFound(version))
    }

    /// The active model's version, as stored now.
    pub async fn active_version(&self) -> Result<Option<i64>, ScoringError> {
        Ok(self.store()?.active().await?.map(|(_, version)| version))
    }

    /// A page of stored models, newest first.
    pub async fn list(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<StoredModel>, ScoringError> {
        self.store()?.list(before, limit).await
    }

    /// Makes the good model `version` active on every replica.
    pub async fn activate(&self, version: i64) -> Result<StoredModel, ScoringError> {
        let store = self.store()?;
        match store.activate(version, OffsetDateTime::now_utc()).await? {
            Activation::Activated(_) => {}
            Activation::NotFound => return Err(ScoringError::ModelNotFound(version)),
            Activation::Rejected(reason) => {
                return Err(ScoringError::RejectedModel { version, reason });
            }
        }
        tracing::info!(version, "customer-value model activated through the api");
        self.refresh().await?;
        self.get(version).await
    }

    /// Runs the scheduled fit when it is due and no other replica holds it.
    pub async fn run_schedule_once(
        &self,
        now: OffsetDateTime,
    ) -> Result<ScheduleOutcome, ScoringError> {
        let (Some(Stored { store, .. }), Some(interval)) =
            (self.stored.get(), self.settings.interval())
        else {
            return Ok(ScheduleOutcome::Skipped);
        };
        let claimed = store
            .claim_schedule(&self.holder, now, now - interval, now + SCHEDULE_LEASE)
            .await?;
        if !claimed {
            return Ok(ScheduleOutcome::Skipped);
        }
        let result = self.fit(now, Trigger::Schedule).await;
        // A failure counts as a run that ends the retry delay before the next one is due.
        let ran_at = match &result {
            Ok(_) => OffsetDateTime::now_utc(),
            Err(_) => now - interval + SCHEDULE_RETRY.min(interval),
        };
        store.finish_schedule(&self.holder, ran_at).await?;
        Ok(match result {
            Ok(model) => ScheduleOutcome::Fitted(Box::new(model)),
            Err(e) => ScheduleOutcome::Failed(e),
        })
    }

    /// Polls the active model and the stored plans' revision every `poll_interval_ms` and runs
    /// the schedule, until `shutdown`.
    /// A scheduled fit runs in a task of its own, so the poll goes on meanwhile; shutting down
    /// abandons it (its lease then runs out, and the next replica to look takes over).
    pub fn spawn(
        self: &Arc<Self>,
        plans: Arc<crate::PlanBook>,
        shutdown: tessera_server::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let models = Arc::clone(self);
        tokio::spawn(async move {
            if models.stored.get().is_none() && !plans.has_store() {
                return;
            }
            let poll = Duration::from_millis(models.settings.poll_interval_ms);
            // The first look at the schedule waits a little, for the profile service.
            let mut next_check = tokio::time::Instant::now() + poll.max(Duration::from_secs(5));
            let mut scheduled: Option<tokio::task::JoinHandle<()>> = None;
            loop {
                if let Err(e) = models.refresh().await {
                    tracing::warn!(error = %e, "reading the active customer-value model failed");
                }
                if let Err(e) = plans.refresh().await {
                    tracing::warn!(error = %e, "reading the stored scoring plans failed");
                }
                let idle = scheduled
                    .as_ref()
                    .is_none_or(tokio::task::JoinHandle::is_finished);
                if idle && tokio::time::Instant::now() >= next_check {
                    next_check = tokio::time::Instant::now() + SCHEDULE_CHECK;
                    let models = Arc::clone(&models);
                    scheduled = Some(tokio::spawn(async move {
                        models.run_schedule().await;
                    }));
                }
                tokio::select! {
                    () = shutdown.cancelled() => {
                        if let Some(fit) = scheduled {
                            fit.abort();
                        }
                        return;
                    }
                    () = tokio::time::sleep(poll) => {}
                }
            }
        })
    }

    /// One look at the schedule, its outcome logged.
    async fn run_schedule(&self) {
        match self.run_schedule_once(OffsetDateTime::now_utc()).await {
            Ok(ScheduleOutcome::Skipped | ScheduleOutcome::Fitted(_)) => {}
            Ok(ScheduleOutcome::Failed(e @ ScoringError::PopulationTooSmall { .. })) => {
                tracing::info!(reason = %e, "the scheduled customer-value fit waits");
            }
            Ok(ScheduleOutcome::Failed(e)) => {
                tracing::warn!(error = %e, "the scheduled customer-value fit failed");
            }
            Err(e) => tracing::warn!(error = %e, "checking the fit schedule failed"),
        }
    }
}
