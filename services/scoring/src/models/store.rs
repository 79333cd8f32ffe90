//! Storage of fitted models: one [`ModelStore`] trait, on Postgres (production, the `scoring`
//! schema) or SQLite (`tessera dev`), chosen by the database's URL.
//!
//! - `customer_value_models`: one row per fit, good or rejected; the version is an identity
//!   (Postgres) or AUTOINCREMENT (SQLite) key, so it only grows and is never reused.
//! - `customer_value_activations`: one row per activation; the active model is the latest
//!   row's, which replicas poll. A fit and its activation commit in one transaction.
//! - `fit_schedule`: the scheduled fit's lease, claimed by a conditional update, so one
//!   replica fits per interval.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use tessera_store::Database;
use time::OffsetDateTime;

use super::{ModelBody, NewModel, StoredModel, Trigger};
use crate::error::ScoringError;

/// The name of the customer-value schedule's row in `fit_schedule`.
const SCHEDULE: &str = "customer_value";

/// What activating a model did.
#[derive(Debug, Clone, PartialEq)]
pub enum Activation {
    /// The model is now active; the activation's sequence number.
    Activated(i64),
    /// No model has this version.
    NotFound,
    /// The model was rejected at fit time; why.
    Rejected(String),
}

/// The stored models.
#[async_trait]
pub trait ModelStore: Send + Sync + std::fmt::Debug {
    /// Stores a fit and, when `activate`, makes it active in the same transaction.
    async fn insert(
        &self,
        model: &NewModel,
        activate: bool,
        now: OffsetDateTime,
    ) -> Result<StoredModel, ScoringError>;

    /// The model of `version`.
    async fn get(&self, version: i64) -> Result<Option<StoredModel>, ScoringError>;

    /// At most `limit` models with versions below `before` (all when `None`), newest first.
    async fn list(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<StoredModel>, ScoringError>;

    /// Makes the good model `version` active (an activation row, even when it already is).
    async fn activate(&self, version: i64, now: OffsetDateTime)
    -> Result<Activation, ScoringError>;

    /// The latest activation: its sequence number and the model's version.
    async fn active(&self) -> Result<Option<(i64, i64)>, ScoringError>;

    /// Claims the scheduled fit for `holder` until `lease_until` when it is due (its last run
    /// was at or before `due_before`, or it never ran) and no other holder's lease is running.
    async fn claim_schedule(
        &self,
        holder: &str,
        now: OffsetDateTime,
        due_before: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<bool, ScoringError>;

    /// Records that `holder`'s scheduled run counts as run at `ran_at` and releases its lease.
    async fn finish_schedule(
        &self,
        holder: &str,
        ran_at: OffsetDateTime,
    ) -> Result<(), ScoringError>;
}

/// The store on `db`'s backend.
pub fn open(db: Database) -> Arc<dyn ModelStore> {
    match db {
        Database::Postgres(pool) => Arc::new(PostgresModels(pool)),
        Database::Sqlite(pool) => Arc::new(SqliteModels(pool)),
    }
}

fn body_json(body: &ModelBody) -> Result<String, ScoringError> {
    serde_json::to_string(body).map_err(|e| ScoringError::Corrupt(e.to_string()))
}

// One argument per column, read the same way on both backends.
#[allow(clippy::too_many_arguments)]
fn model_from(
    version: i64,
    fitted_at: OffsetDateTime,
    as_of: OffsetDateTime,
    trigger: &str,
    population: i64,
    unit_days: f64,
    status: &str,
    rejection: String,
    body: &str,
) -> Result<StoredModel, ScoringError> {
    let corrupt = |what: &str| ScoringError::Corrupt(format!("model {version}: {what}"));
    let trigger = Trigger::parse(trigger).ok_or_else(|| corrupt("unknown trigger"))?;
    let rejection = match status {
        "good" => None,
        "rejected" => Some(rejection),
        _ => return Err(corrupt("unknown status")),
    };
    let body: ModelBody =
        serde_json::from_str(body).map_err(|e| corrupt(&format!("model json: {e}")))?;
    Ok(StoredModel {
        version,
        model: NewModel {
            fitted_at,
            as_of,
            trigger,
            population,
            unit_days,
            rejection,
            body,
        },
    })
}

fn status(model: &NewModel) -> &'static str {
    if model.rejection.is_some() {
        "rejected"
    } else {
        "good"
    }
}

/// Models in the `scoring` schema of Postgres.
#[derive(Debug, Clone)]
pub struct PostgresModels(PgPool);

fn pg_model(row: &PgRow) -> Result<StoredModel, ScoringError> {
    model_from(
        row.try_get("version")?,
        row.try_get("fitted_at")?,
        row.try_get("as_of")?,
        row.try_get("trigger")?,
        row.try_get("population")?,
        row.try_get("unit_days")?,
        row.try_get("status")?,
        row.try_get("rejection_reason")?,
        row.try_get("model")?,
    )
}

#[async_trait]
impl ModelStore for PostgresModels {
    async fn insert(
        &self,
        model: &NewModel,
        activate: bool,
        now: OffsetDateTime,
    ) -> Result<StoredModel, ScoringError> {
        let body = body_json(&model.body)?;
        let mut tx = self.0.begin().await?;
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO customer_value_models \
             (fitted_at, as_of, trigger, population, unit_days, status, rejection_reason, model) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb) RETURNING version",
        )
        .bind(model.fitted_at)
        .bind(model.as_of)
        .bind(model.trigger.as_str())
        .bind(model.population)
        .bind(model.unit_days)
        .bind(status(model))
        .bind(model.rejection.clone().unwrap_or_default())
        .bind(body)
        .fetch_one(&mut *tx)
        .await?;
        if activate {
            sqlx::query(
                "INSERT INTO customer_value_activations (version, activated_at, cause) \
                 VALUES ($1, $2, 'fit')",
            )
            .bind(version)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(StoredModel {
            version,
            model: model.clone(),
        })
    }

    async fn get(&self, version: i64) -> Result<Option<StoredModel>, ScoringError> {
        let row = sqlx::query(
            "SELECT version, fitted_at, as_of, trigger, population, unit_days, status, \
             rejection_reason, model::text AS model FROM customer_value_models \
             WHERE version = $1",
        )
        .bind(version)
        .fetch_optional(&self.0)
        .await?;
        row.as_ref().map(pg_model).transpose()
    }

    async fn list(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<StoredModel>, ScoringError> {
        let rows = sqlx::query(
            "SELECT version, fitted_at, as_of, trigger, population, unit_days, status, \
             rejection_reason, model::text AS model FROM customer_value_models \
             WHERE version < $1 ORDER BY version DESC LIMIT $2",
        )
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.0)
        .await?;
        rows.iter().map(pg_model).collect()
    }

    async fn activate(
        &self,
        version: i64,
        now: OffsetDateTime,
    ) -> Result<Activation, ScoringError> {
        let mut tx = self.0.begin().await?;
        // FOR SHARE: the row cannot go away (or change) before the activation commits.
        let row = sqlx::query(
            "SELECT status, rejection_reason FROM customer_value_models WHERE version = $1 \
             FOR SHARE",
        )
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Activation::NotFound);
        };
        if row.try_get::<String, _>("status")? != "good" {
            return Ok(Activation::Rejected(row.try_get("rejection_reason")?));
        }
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO customer_value_activations (version, activated_at, cause) \
             VALUES ($1, $2, 'api') RETURNING seq",
        )
        .bind(version)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Activation::Activated(seq))
    }

    async fn active(&self) -> Result<Option<(i64, i64)>, ScoringError> {
        Ok(sqlx::query_as(
            "SELECT seq, version FROM customer_value_activations ORDER BY seq DESC LIMIT 1",
        )
        .fetch_optional(&self.0)
        .await?)
    }

    async fn claim_schedule(
        &self,
        holder: &str,
        now: OffsetDateTime,
        due_before: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<bool, ScoringError> {
        let claimed = sqlx::query(
            "UPDATE fit_schedule SET holder = $1, lease_until = $2 \
             WHERE name = $3 AND (last_run_at IS NULL OR last_run_at <= $4) \
               AND (lease_until IS NULL OR lease_until < $5)",
        )
        .bind(holder)
        .bind(lease_until)
        .bind(SCHEDULE)
        .bind(due_before)
        .bind(now)
        .execute(&self.0)
        .await?;
        Ok(claimed.rows_affected() == 1)
    }

    async fn finish_schedule(
        &self,
        holder: &str,
        ran_at: OffsetDateTime,
    ) -> Result<(), ScoringError> {
        sqlx::query(
            "UPDATE fit_schedule SET last_run_at = $1, holder = NULL, lease_until = NULL \
             WHERE name = $2 AND holder = $3",
        )
        .bind(ran_at)
        .bind(SCHEDULE)
        .bind(holder)
        .execute(&self.0)
        .await?;
        Ok(())
    }
}

/// Models in `tessera dev`'s `scoring.db`. Times are unix microseconds.
#[derive(Debug, Clone)]
pub struct SqliteModels(SqlitePool);

fn micros(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

fn from_micros(version: i64, micros: i64) -> Result<OffsetDateTime, ScoringError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .map_err(|_| ScoringError::Corrupt(format!("model {version}: time out of range")))
}

fn lite_model(row: &SqliteRow) -> Result<StoredModel, ScoringError> {
    let version: i64 = row.try_get("version")?;
    model_from(
        version,
        from_micros(version, row.try_get("fitted_at")?)?,
        from_micros(version, row.try_get("as_of")?)?,
        row.try_get("trigger")?,
        row.try_get("population")?,
        row.try_get("unit_days")?,
        row.try_get("status")?,
        row.try_get("rejection_reason")?,
        row.try_get("model")?,
    )
}

#[async_trait]
impl ModelStore for SqliteModels {
    async fn insert(
        &self,
        model: &NewModel,
        activate: bool,
        now: OffsetDateTime,
    ) -> Result<StoredModel, ScoringError> {
        let body = body_json(&model.body)?;
        let mut tx = self.0.begin().await?;
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO customer_value_models \
             (fitted_at, as_of, trigger, population, unit_days, status, rejection_reason, model) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING version",
        )
        .bind(micros(model.fitted_at))
        .bind(micros(model.as_of))
        .bind(model.trigger.as_str())
        .bind(model.population)
        .bind(model.unit_days)
        .bind(status(model))
        .bind(model.rejection.clone().unwrap_or_default())
        .bind(body)
        .fetch_one(&mut *tx)
        .await?;
        if activate {
            sqlx::query(
                "INSERT INTO customer_value_activations (version, activated_at, cause) \
                 VALUES (?, ?, 'fit')",
            )
            .bind(version)
            .bind(micros(now))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(StoredModel {
            version,
            model: model.clone(),
        })
    }

    async fn get(&self, version: i64) -> Result<Option<StoredModel>, ScoringError> {
        let row = sqlx::query(
            "SELECT version, fitted_at, as_of, trigger, population, unit_days, status, \
             rejection_reason, model FROM customer_value_models WHERE version = ?",
        )
        .bind(version)
        .fetch_optional(&self.0)
        .await?;
        row.as_ref().map(lite_model).transpose()
    }

    async fn list(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<StoredModel>, ScoringError> {
        let rows = sqlx::query(
            "SELECT version, fitted_at, as_of, trigger, population, unit_days, status, \
             rejection_reason, model FROM customer_value_models \
             WHERE version < ? ORDER BY version DESC LIMIT ?",
        )
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.0)
        .await?;
        rows.iter().map(lite_model).collect()
    }

    async fn activate(
        &self,
        version: i64,
        now: OffsetDateTime,
    ) -> Result<Activation, ScoringError> {
        // One connection: the read and the insert cannot interleave with another writer.
        let mut tx = self.0.begin().await?;
        let row = sqlx::query(
            "SELECT status, rejection_reason FROM customer_value_models WHERE version = ?",
        )
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Activation::NotFound);
        };
        if row.try_get::<String, _>("status")? != "good" {
            return Ok(Activation::Rejected(row.try_get("rejection_reason")?));
        }
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO customer_value_activations (version, activated_at, cause) \
             VALUES (?, ?, 'api') RETURNING seq",
        )
        .bind(version)
        .bind(micros(now))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Activation::Activated(seq))
    }

    async fn active(&self) -> Result<Option<(i64, i64)>, ScoringError> {
        Ok(sqlx::query_as(
            "SELECT seq, version FROM customer_value_activations ORDER BY seq DESC LIMIT 1",
        )
        .fetch_optional(&self.0)
        .await?)
    }

    async fn claim_schedule(
        &self,
        holder: &str,
        now: OffsetDateTime,
        due_before: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<bool, ScoringError> {
        let claimed = sqlx::query(
            "UPDATE fit_schedule SET holder = ?, lease_until = ? \
             WHERE name = ? AND (last_run_at IS NULL OR last_run_at <= ?) \
               AND (lease_until IS NULL OR lease_until < ?)",
        )
        .bind(holder)
        .bind(micros(lease_until))
        .bind(SCHEDULE)
        .bind(micros(due_before))
        .bind(micros(now))
        .execute(&self.0)
        .await?;
        Ok(claimed.rows_affected() == 1)
    }

    async fn finish_schedule(
        &self,
        holder: &str,
        ran_at: OffsetDateTime,
    ) -> Result<(), ScoringError> {
        sqlx::query(
            "UPDATE fit_schedule SET last_run_at = ?, holder = NULL, lease_until = NULL \
             WHERE name = ? AND holder = ?",
        )
        .bind(micros(ran_at))
        .bind(SCHEDULE)
        .bind(holder)
        .execute(&self.0)
        .await?;
        Ok(())
    }
}
