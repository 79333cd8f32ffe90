//! Storage of the scoring plans declared through the API: one [`PlanStore`] trait, on Postgres
//! (the `scoring` schema) or SQLite (`tessera dev`), chosen by the database's URL.
//!
//! - `scoring_plans`: one row per plan, its config form as JSON, a version per plan (1, then
//!   one more per update) and `seq`, the revision that created it (creation order).
//! - `scoring_plans_revision`: the store-wide revision, bumped by every change in the change's
//!   transaction. Bumping it first takes the row's lock (Postgres) or the write lock (SQLite),
//!   so changes are validated against the plans as they are, one at a time, whatever replica
//!   makes them; replicas poll it to know when to reload.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use tessera_store::Database;
use time::OffsetDateTime;

use crate::error::ScoringError;
use crate::plans::Plan;

/// A plan declared through the API.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPlan {
    /// 1 when created, one more per update.
    pub version: i64,
    /// The plan, in its config form.
    pub plan: Plan,
}

/// A change to the stored plans.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanChange {
    /// Adds a plan after the others.
    Create(Plan),
    /// Replaces the plan of the same name when its version is `expected_version`.
    Update {
        /// The new plan.
        plan: Plan,
        /// The version the caller read.
        expected_version: i64,
    },
    /// Removes the plan `name` when its version is `expected_version` (any version when 0).
    Delete {
        /// The plan's name.
        name: String,
        /// The version the caller read; 0 for any.
        expected_version: i64,
    },
}

/// What a change did.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanWrite {
    /// Done: the new revision, and the plan as stored now (`None` when deleted).
    Done {
        /// The store-wide revision after the change.
        revision: i64,
        /// The plan after the change.
        plan: Option<StoredPlan>,
    },
    /// Not done, and why.
    Refused(PlanRefusal),
}

/// Why a change was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanRefusal {
    /// A stored plan has the name already (Create).
    Exists,
    /// No stored plan has the name (Update, Delete).
    NotFound,
    /// The plan's version is not the expected one: the version it has.
    VersionMismatch(i64),
}

/// Checks the stored plans a change would leave (in creation order) before it is committed.
pub type PlanCheck<'a> = dyn Fn(&[StoredPlan]) -> Result<(), ScoringError> + Send + Sync + 'a;

/// The stored plans.
#[async_trait]
pub trait PlanStore: Send + Sync + std::fmt::Debug {
    /// The store-wide revision: 0 before any change, one more per change.
    async fn revision(&self) -> Result<i64, ScoringError>;

    /// The revision and every stored plan, in creation order.
    async fn list(&self) -> Result<(i64, Vec<StoredPlan>), ScoringError>;

    /// Applies `change` when `check` accepts the plans it leaves, in one transaction that
    /// bumps the revision.
    async fn write(
        &self,
        change: &PlanChange,
        check: &PlanCheck<'_>,
        now: OffsetDateTime,
    ) -> Result<PlanWrite, ScoringError>;
}

/// The store on `db`'s backend.
pub fn open(db: Database) -> Arc<dyn PlanStore> {
    match db {
        Database::Postgres(pool) => Arc::new(PostgresPlans(pool)),
        Database::Sqlite(pool) => Arc::new(SqlitePlans(pool)),
    }
}

/// What a change does to the rows, once accepted.
enum Effect {
    Insert(StoredPlan),
    Update(StoredPlan),
    Delete(String),
}

/// Applies `change` to `plans` (the stored ones, in creation order), or why it cannot be.
fn apply(plans: &mut Vec<StoredPlan>, change: &PlanChange) -> Result<Effect, PlanRefusal> {
    let position =
        |plans: &[StoredPlan], name: &str| plans.iter().position(|p| p.plan.name == name);
    match change {
        PlanChange::Create(plan) => {
            if position(plans, &plan.name).is_some() {
                return Err(PlanRefusal::Exists);
            }
            let stored = StoredPlan {
                version: 1,
                plan: plan.clone(),
            };
            plans.push(stored.clone());
            Ok(Effect::Insert(stored))
        }
        PlanChange::Update {
            plan,
            expected_version,
        } => {
            let i = position(plans, &plan.name).ok_or(PlanRefusal::NotFound)?;
            if plans[i].version != *expected_version {
                return Err(PlanRefusal::VersionMismatch(plans[i].version));
            }
            plans[i] = StoredPlan {
                version: expected_version + 1,
                plan: plan.clone(),
            };
            Ok(Effect::Update(plans[i].clone()))
        }
        PlanChange::Delete {
            name,
            expected_version,
        } => {
            let i = position(plans, name).ok_or(PlanRefusal::NotFound)?;
            if *expected_version != 0 && plans[i].version != *expected_version {
                return Err(PlanRefusal::VersionMismatch(plans[i].version));
            }
            plans.remove(i);
            Ok(Effect::Delete(name.clone()))
        }
    }
}

fn plan_json(plan: &Plan) -> Result<String, ScoringError> {
    serde_json::to_string(plan).map_err(|e| ScoringError::Corrupt(e.to_string()))
}

fn stored_plan(name: &str, version: i64, json: &str) -> Result<StoredPlan, ScoringError> {
    let plan: Plan = serde_json::from_str(json)
        .map_err(|e| ScoringError::Corrupt(format!("plan {name:?}: {e}")))?;
    Ok(StoredPlan { version, plan })
}

/// Plans in the `scoring` schema of Postgres.
#[derive(Debug, Clone)]
pub struct PostgresPlans(PgPool);

impl PostgresPlans {
    async fn read<'e, E>(executor: E) -> Result<Vec<StoredPlan>, ScoringError>
    where
        E: sqlx::PgExecutor<'e>,
    {
        sqlx::query("SELECT name, version, plan::text AS plan FROM scoring_plans ORDER BY seq")
            .fetch_all(executor)
            .await?
            .iter()
            .map(|row| {
                let name: String = row.try_get("name")?;
                stored_plan(&name, row.try_get("version")?, row.try_get("plan")?)
            })
            .collect()
    }
}

#[async_trait]
impl PlanStore for PostgresPlans {
    async fn revision(&self) -> Result<i64, ScoringError> {
        Ok(
            sqlx::query_scalar("SELECT revision FROM scoring_plans_revision WHERE id = 1")
                .fetch_one(&self.0)
                .await?,
        )
    }

    async fn list(&self) -> Result<(i64, Vec<StoredPlan>), ScoringError> {
        // One snapshot, so the revision is the plans'.
        let mut tx = self.0.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let revision: i64 =
            sqlx::query_scalar("SELECT revision FROM scoring_plans_revision WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
        let plans = Self::read(&mut *tx).await?;
        tx.commit().await?;
        Ok((revision, plans))
    }

    async fn write(
        &self,
        change: &PlanChange,
        check: &PlanCheck<'_>,
        now: OffsetDateTime,
    ) -> Result<PlanWrite, ScoringError> {
        let mut tx = self.0.begin().await?;
        let revision: i64 = sqlx::query_scalar(
            "UPDATE scoring_plans_revision SET revision = revision + 1 WHERE id = 1 \
             RETURNING revision",
        )
        .fetch_one(&mut *tx)
        .await?;
        let mut plans = Self::read(&mut *tx).await?;
        let effect = match apply(&mut plans, change) {
            Ok(effect) => effect,
            Err(refused) => return Ok(PlanWrite::Refused(refused)),
        };
        check(&plans)?;
        let plan = match effect {
            Effect::Insert(stored) => {
                sqlx::query(
                    "INSERT INTO scoring_plans (name, seq, version, plan, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4::jsonb, $5, $5)",
                )
                .bind(&stored.plan.name)
                .bind(revision)
                .bind(stored.version)
                .bind(plan_json(&stored.plan)?)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                Some(stored)
            }
            Effect::Update(stored) => {
                sqlx::query(
                    "UPDATE scoring_plans SET version = $2, plan = $3::jsonb, updated_at = $4 \
                     WHERE name = $1",
                )
                .bind(&stored.plan.name)
                .bind(stored.version)
                .bind(plan_json(&stored.plan)?)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                Some(stored)
            }
            Effect::Delete(name) => {
                sqlx::query("DELETE FROM scoring_plans WHERE name = $1")
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                None
            }
        };
        tx.commit().await?;
        Ok(PlanWrite::Done { revision, plan })
    }
}

/// Plans in `tessera dev`'s `scoring.db`. Times are unix microseconds.
#[derive(Debug, Clone)]
pub struct SqlitePlans(SqlitePool);

fn micros(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

impl SqlitePlans {
    async fn read<'e, E>(executor: E) -> Result<Vec<StoredPlan>, ScoringError>
    where
        E: sqlx::SqliteExecutor<'e>,
    {
        sqlx::query("SELECT name, version, plan FROM scoring_plans ORDER BY seq")
            .fetch_all(executor)
            .await?
            .iter()
            .map(|row| {
                let name: String = row.try_get("name")?;
                stored_plan(&name, row.try_get("version")?, row.try_get("plan")?)
            })
            .collect()
    }
}

#[async_trait]
impl PlanStore for SqlitePlans {
    async fn revision(&self) -> Result<i64, ScoringError> {
        Ok(
            sqlx::query_scalar("SELECT revision FROM scoring_plans_revision WHERE id = 1")
                .fetch_one(&self.0)
                .await?,
        )
    }

    async fn list(&self) -> Result<(i64, Vec<StoredPlan>), ScoringError> {
        let mut tx = self.0.begin().await?;
        let revision: i64 =
            sqlx::query_scalar("SELECT revision FROM scoring_plans_revision WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
        let plans = Self::read(&mut *tx).await?;
        tx.commit().await?;
        Ok((revision, plans))
    }

    async fn write(
        &self,
        change: &PlanChange,
        check: &PlanCheck<'_>,
        now: OffsetDateTime,
    ) -> Result<PlanWrite, ScoringError> {
        let mut tx = self.0.begin().await?;
        // Writing first takes the database's write lock for the whole transaction.
        let revision: i64 = sqlx::query_scalar(
            "UPDATE scoring_plans_revision SET revision = revision + 1 WHERE id = 1 \
             RETURNING revision",
        )
        .fetch_one(&mut *tx)
        .await?;
        let mut plans = Self::read(&mut *tx).await?;
        let effect = match apply(&mut plans, change) {
            Ok(effect) => effect,
            Err(refused) => return Ok(PlanWrite::Refused(refused)),
        };
        check(&plans)?;
        let now = micros(now);
        let plan = match effect {
            Effect::Insert(stored) => {
                sqlx::query(
                    "INSERT INTO scoring_plans (name, seq, version, plan, created_at, updated_at) \
                     VALUES (?, ?, ?, ?, ?, ?)",
                )
                .bind(&stored.plan.name)
                .bind(revision)
                .bind(stored.version)
                .bind(plan_json(&stored.plan)?)
                .bind(now)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                Some(stored)
            }
            Effect::Update(stored) => {
                sqlx::query(
                    "UPDATE scoring_plans SET version = ?, plan = ?, updated_at = ? WHERE name = ?",
                )
                .bind(stored.version)
                .bind(plan_json(&stored.plan)?)
                .bind(now)
                .bind(&stored.plan.name)
                .execute(&mut *tx)
                .await?;
                Some(stored)
            }
            Effect::Delete(name) => {
                sqlx::query("DELETE FROM scoring_plans WHERE name = ?")
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                None
            }
        };
        tx.commit().await?;
        Ok(PlanWrite::Done { revision, plan })
    }
}
