//! The source store on Postgres.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use tessera_store::StoreError;
use time::OffsetDateTime;

use super::{NewSource, SourceChange, SourceRecord, SourceStore, plan_mode, rate_limit};
use crate::sources::key::KeyHash;

#[derive(Debug, Clone)]
pub(crate) struct PgSourceStore {
    pool: PgPool,
}

impl PgSourceStore {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn record(row: &PgRow) -> Result<SourceRecord, StoreError> {
    Ok(SourceRecord {
        id: row.try_get("source_id")?,
        name: row.try_get("name")?,
        key_prefix: row.try_get("key_prefix")?,
        enabled: row.try_get("enabled")?,
        rate_limit_per_second: rate_limit(row.try_get("rate_limit_per_second")?),
        plan_mode: plan_mode(row.try_get("plan_mode")?)?,
        created_at: row.try_get("created_at")?,
        key_rotated_at: row.try_get("key_rotated_at")?,
    })
}

fn records(rows: &[PgRow]) -> Result<Vec<SourceRecord>, StoreError> {
    rows.iter().map(record).collect()
}

fn optional(row: Option<PgRow>) -> Result<Option<SourceRecord>, StoreError> {
    row.as_ref().map(record).transpose()
}

#[async_trait]
impl SourceStore for PgSourceStore {
    async fn create(&self, source: &NewSource) -> Result<SourceRecord, StoreError> {
        let row = sqlx::query(
            "INSERT INTO sources (source_id, name, key_hash, key_prefix, rate_limit_per_second, \
               plan_mode, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
        )
        .bind(source.id)
        .bind(&source.name)
        .bind(&source.key_hash[..])
        .bind(&source.key_prefix)
        .bind(source.rate_limit_per_second.map(i64::from))
        .bind(source.plan_mode.as_str())
        .bind(source.created_at)
        .fetch_one(&self.pool)
        .await?;
        record(&row)
    }

    async fn list(&self) -> Result<Vec<SourceRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM sources ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        records(&rows)
    }

    async fn get(&self, name: &str) -> Result<Option<SourceRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM sources WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        optional(row)
    }

    async fn find_by_key(&self, hash: &KeyHash) -> Result<Option<SourceRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM sources WHERE key_hash = $1")
            .bind(&hash[..])
            .fetch_optional(&self.pool)
            .await?;
        optional(row)
    }

    async fn set_enabled(
        &self,
        name: &str,
        enabled: bool,
    ) -> Result<Option<SourceRecord>, StoreError> {
        let row = sqlx::query("UPDATE sources SET enabled = $2 WHERE name = $1 RETURNING *")
            .bind(name)
            .bind(enabled)
            .fetch_optional(&self.pool)
            .await?;
        optional(row)
    }

    async fn set_key(
        &self,
        name: &str,
        hash: &KeyHash,
        prefix: &str,
        at: OffsetDateTime,
    ) -> Result<Option<SourceRecord>, StoreError> {
        let row = sqlx::query(
            "UPDATE sources SET key_hash = $2, key_prefix = $3, key_rotated_at = $4 \
             WHERE name = $1 RETURNING *",
        )
        .bind(name)
        .bind(&hash[..])
        .bind(prefix)
        .bind(at)
        .fetch_optional(&self.pool)
        .await?;
        optional(row)
    }

    async fn update(
        &self,
        name: &str,
        change: &SourceChange,
    ) -> Result<Option<SourceRecord>, StoreError> {
        let row = sqlx::query(
            "UPDATE sources SET \
               rate_limit_per_second = CASE WHEN $2 THEN $3 ELSE rate_limit_per_second END, \
               plan_mode = COALESCE($4, plan_mode) \
             WHERE name = $1 RETURNING *",
        )
        .bind(name)
        .bind(change.rate_limit_per_second.is_some())
        .bind(change.rate_limit_per_second.flatten().map(i64::from))
        .bind(change.plan_mode.map(|m| m.as_str()))
        .fetch_optional(&self.pool)
        .await?;
        optional(row)
    }
}
