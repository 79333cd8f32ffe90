//! Tracking plans: per source, JSON Schemas of track/page/screen `properties` (by event or page
//! name) and of identify/group `traits`, enforced at acceptance by every front door according to
//! the source's plan mode.
//!
//! - `allow`: the plan is not even loaded.
//! - `warn`: violating messages are stored with their violations in `context.tessera.violations`
//!   (`{"planVersion", "violations": [{"field", "schema", "schemaPath", "message"}]}`) and counted in
//!   `tessera_ingestion_plan_violations_total{mode="warn"}`.
//! - `block`: violating messages are refused like invalid ones (naming the field, the schema and
//!   the failing rule) and kept in the quarantine, from where they can be replayed.
//!
//! Plans are compiled once per (source, version) and kept in-process; which version is current
//! is re-read from the store at most every [`PLAN_CACHE_TTL`] per source, so every replica
//! enforces a new version within that time (the replica that stored it, at once).

mod check;
mod error;
mod service;
pub(crate) mod store;

use std::sync::Arc;
use std::time::Duration;

use tessera_core::{Event, FieldViolation};
use tessera_store::{Database, StoreError};
use time::OffsetDateTime;
use uuid::Uuid;

pub(crate) use self::check::{CompiledPlan, Plan, PlanViolation, Unplanned};
pub(crate) use self::error::PlanError;
pub(crate) use self::service::{fuzz_list, fuzz_put, server};
use self::store::{NewQuarantined, PlanStore};
use crate::sources::{PlanMode, Source};
use crate::{IngestError, Ingestion};

/// How long a replica trusts its idea of a source's current plan version: a new version is
/// enforced by every replica within this time.
pub(crate) const PLAN_CACHE_TTL: Duration = Duration::from_secs(3);

/// How many compiled plan versions each replica keeps.
const COMPILED_CAPACITY: u64 = 1_000;

/// The tracking-plan part of the ingestion service: the store and the compiled plans.
#[derive(Debug, Clone)]
pub(crate) struct Plans {
    store: Arc<dyn PlanStore>,
    /// Source → its current compiled plan (`None`: no plan), for [`PLAN_CACHE_TTL`].
    current: moka::future::Cache<Uuid, Option<Arc<CompiledPlan>>>,
    /// (source, version) → the compiled plan: a version never changes, so it is compiled once.
    compiled: moka::future::Cache<(Uuid, i64), Arc<CompiledPlan>>,
}

impl Plans {
    /// The plans stored in `db`.
    pub(crate) fn new(db: Database) -> Self {
        Self {
            store: store::open(db),
            current: moka::future::Cache::builder()
                .max_capacity(COMPILED_CAPACITY)
                .time_to_live(PLAN_CACHE_TTL)
                .build(),
            compiled: moka::future::Cache::builder()
                .max_capacity(COMPILED_CAPACITY)
                .build(),
        }
    }

    /// The current plan of a source, through the caches.
    async fn current(&self, source_id: Uuid) -> Result<Option<Arc<CompiledPlan>>, StoreError> {
        if let Some(cached) = self.current.get(&source_id).await {
            return Ok(cached);
        }
        let plan = self.load(source_id).await?;
        self.current.insert(source_id, plan.clone()).await;
        Ok(plan)
    }

    /// The current plan of a source, asking the store for its version.
    async fn load(&self, source_id: Uuid) -> Result<Option<Arc<CompiledPlan>>, StoreError> {
        let Some(version) = self.store.version(source_id).await? else {
            return Ok(None);
        };
        if let Some(plan) = self.compiled.get(&(source_id, version)).await {
            return Ok(Some(plan));
        }
        let Some(record) = self.store.get(source_id).await? else {
            return Ok(None);
        };
        let plan: Plan = serde_json::from_str(&record.plan)
            .map_err(|e| StoreError::Sqlx(sqlx::Error::Decode(Box::new(e))))?;
        // A stored plan compiled when it was put; failing now means a corrupt row.
        let compiled = CompiledPlan::compile(&plan, record.version).map_err(|vs| {
            StoreError::Sqlx(sqlx::Error::Decode(
                format!("stored tracking plan does not compile: {vs:?}").into(),
            ))
        })?;
        let compiled = Arc::new(compiled);
        self.compiled
            .insert((source_id, record.version), compiled.clone())
            .await;
        Ok(Some(compiled))
    }
}

/// What the plan made of a batch of valid messages.
#[derive(Debug, Default)]
pub(crate) struct Screened {
    /// Messages to store (in `warn` mode, with their violations recorded), with their index.
    pub(crate) passed: Vec<(usize, Event)>,
    /// Messages refused and quarantined: index, message id, violations.
    pub(crate) blocked: Vec<(usize, String, Vec<FieldViolation>)>,
}

/// What a plan in a mode makes of one message.
enum Verdict {
    Pass(Event),
    Block(Event, Vec<PlanViolation>),
}

/// Checks `event` against `plan` in `mode`; in `warn` mode records the violations on it.
fn judge(plan: Option<&CompiledPlan>, mode: PlanMode, mut event: Event) -> Verdict {
    let Some(plan) = plan else {
        return Verdict::Pass(event);
    };
    match mode {
        PlanMode::Allow => Verdict::Pass(event),
        PlanMode::Warn => {
            let violations = plan.check(&event);
            if !violations.is_empty() {
                metrics::counter!("tessera_ingestion_plan_violations_total", "mode" => "warn")
                    .increment(violations.len() as u64);
                record_violations(&mut event, plan.version(), &violations);
            }
            Verdict::Pass(event)
        }
        PlanMode::Block => {
            let violations = plan.check(&event);
            if violations.is_empty() {
                Verdict::Pass(event)
            } else {
                metrics::counter!("tessera_ingestion_plan_violations_total", "mode" => "block")
                    .increment(violations.len() as u64);
                Verdict::Block(event, violations)
            }
        }
    }
}

/// Records violations in `context.tessera` of a stored event: `violations` and `planVersion`.
fn record_violations(event: &mut Event, version: i64, violations: &[PlanViolation]) {
    let tessera = event
        .context
        .entry("tessera")
        .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
    if !tessera.is_object() {
        *tessera = serde_json::Value::Object(serde_json::Map::new());
    }
    if let Some(object) = tessera.as_object_mut() {
        object.insert("planVersion".to_owned(), version.into());
        object.insert(
            "violations".to_owned(),
            violations.iter().map(PlanViolation::to_json).collect(),
        );
    }
}

/// The violations of a blocked message as the client and the quarantine see them.
fn blocked_violations(violations: &[PlanViolation]) -> Vec<FieldViolation> {
    violations
        .iter()
        .map(|v| {
            FieldViolation::new(
                v.field.clone(),
                format!(
                    "blocked by the tracking plan and quarantined: {}",
                    v.describe()
                ),
            )
        })
        .collect()
}

/// The JSON the quarantine keeps the violations in.
fn violations_json(violations: &[FieldViolation]) -> String {
    serde_json::Value::Array(
        violations
            .iter()
            .map(|v| serde_json::json!({"field": v.field, "description": v.description}))
            .collect(),
    )
    .to_string()
}

/// The violations the quarantine keeps, back; a row that does not decode gives none.
fn violations_from_json(text: &str) -> Vec<FieldViolation> {
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str(text) else {
        return Vec::new();
    };
    items
        .iter()
        .map(|item| {
            let text = |k: &str| {
                item.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_owned()
            };
            FieldViolation::new(text("field"), text("description"))
        })
        .collect()
}

impl Ingestion {
    /// Applies the tracking plan of `source` to its valid messages (each with its index in the
    /// request): all pass in `allow` mode or without a plan; in `warn` mode violations are
    /// recorded on the messages; in `block` mode violating messages are quarantined and returned
    /// as blocked. Messages without a message id get one here, so a quarantined message keeps
    /// its id through a replay.
    pub(crate) async fn screen(
        &self,
        source: &Source,
        events: Vec<(usize, Event)>,
        received_at: OffsetDateTime,
    ) -> Result<Screened, IngestError> {
        if source.plan_mode == PlanMode::Allow {
            return Ok(Screened {
                passed: events,
                blocked: Vec::new(),
            });
        }
        let plan = self.plans.current(source.id).await?;
        let Some(plan) = plan else {
            return Ok(Screened {
                passed: events,
                blocked: Vec::new(),
            });
        };
        let mut screened = Screened::default();
        let mut quarantine = Vec::new();
        for (index, mut event) in events {
            if event.message_id.is_empty() {
                event.message_id = Uuid::new_v4().to_string();
            }
            match judge(Some(&plan), source.plan_mode, event) {
                Verdict::Pass(event) => screened.passed.push((index, event)),
                Verdict::Block(event, violations) => {
                    let violations = blocked_violations(&violations);
                    quarantine.push(NewQuarantined {
                        source_id: source.id,
                        message_id: event.message_id.clone(),
                        payload: serde_json::to_string(&event)?,
                        violations: violations_json(&violations),
                        plan_version: plan.version(),
                        received_at,
                    });
                    screened.blocked.push((index, event.message_id, violations));
                }
            }
        }
        if !quarantine.is_empty() {
            self.plans.store.quarantine(&quarantine).await?;
            metrics::counter!("tessera_ingestion_quarantined_total")
                .increment(quarantine.len() as u64);
            tracing::debug!(
                source = %source.id,
                quarantined = quarantine.len(),
                "tracking plan blocked messages"
            );
        }
        Ok(screened)
    }
}

/// Compiles a plan (its stored JSON form) and checks an event (a Segment message) against it
/// in `block` mode, for the fuzz target `tracking_plan` (`fuzz/`).
pub(crate) fn fuzz_plan(plan: &[u8], message: serde_json::Value) {
    let Ok(plan) = serde_json::from_slice::<Plan>(plan) else {
        return;
    };
    let Ok(compiled) = CompiledPlan::compile(&plan, 1) else {
        return;
    };
    let Ok(event) = crate::segment_message(message) else {
        return;
    };
    match judge(Some(&compiled), PlanMode::Block, event) {
        Verdict::Pass(_) => {}
        Verdict::Block(_, violations) => {
            assert!(!violations.is_empty(), "blocked without a violation");
            for v in &violations {
                let _ = v.describe();
            }
        }
    }
}

#[cfg(test)]
mod tests;
