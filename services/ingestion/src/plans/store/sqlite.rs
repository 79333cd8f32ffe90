//! The tracking-plan store on SQLite (`tessera dev`). Ids are text, times Unix microseconds.

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlitePool};
use tessera_store::StoreError;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Doomed, NewQuarantined, PlanRecord, PlanStore, Quarantined};

#[derive(Debug, Clone)]
pub(crate) struct SqlitePlanStore {
    pool: SqlitePool,
}

impl SqlitePlanStore {
    pub(crate) fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

fn micros(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

fn from_micros(us: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .map_err(|e| StoreError::Sqlx(sqlx::Error::Decode(Box::new(e))))
}

fn plan_record(row: &SqliteRow) -> Result<PlanRecord, StoreError> {
    Ok(PlanRecord {
        version: row.try_get("version")?,
        plan: row.try_get("plan")?,
        updated_at: from_micros(row.try_get("updated_at")?)?,
    })
}

fn quarantined(row: &SqliteRow) -> Result<Quarantined, StoreError> {
    Ok(Quarantined {
        id: row.try_get("quarantine_id")?,
        message_id: row.try_get("message_id")?,
        payload: row.try_get("payload")?,
        violations: row.try_get("violations")?,
        plan_version: row.try_get("plan_version")?,
        received_at: from_micros(row.try_get("received_at")?)?,
    })
}

#[async_trait]
impl PlanStore for SqlitePlanStore {
    async fn get(&self, source_id: Uuid) -> Result<Option<PlanRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT version, plan, updated_at FROM tracking_plans WHERE source_id = ?1",
        )
        .bind(source_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(plan_record).transpose()
    }

    async fn version(&self, source_id: Uuid) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT version FROM tracking_plans WHERE source_id = ?1")
                .bind(source_id.to_string())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn put(
        &self,
        source_id: Uuid,
        plan: &str,
        at: OffsetDateTime,
    ) -> Result<PlanRecord, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "INSERT INTO tracking_plans (source_id, version, plan, updated_at) \
             VALUES (?1, 1, ?2, ?3) \
             ON CONFLICT (source_id) DO UPDATE SET version = version + 1, \
               plan = excluded.plan, updated_at = excluded.updated_at \
             RETURNING version, plan, updated_at",
        )
        .bind(source_id.to_string())
        .bind(plan)
        .bind(micros(at))
        .fetch_one(&mut *tx)
        .await?;
        let record = plan_record(&row)?;
        sqlx::query(
            "INSERT INTO tracking_plan_versions (source_id, version, plan, created_at) \
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(source_id.to_string())
        .bind(record.version)
        .bind(plan)
        .bind(micros(at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn quarantine(&self, messages: &[NewQuarantined]) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut query = sqlx::QueryBuilder::new(
            "INSERT INTO quarantine (source_id, message_id, payload, violations, plan_version, \
             received_at) ",
        );
        query.push_values(messages, |mut b, m| {
            b.push_bind(m.source_id.to_string())
                .push_bind(&m.message_id)
                .push_bind(&m.payload)
                .push_bind(&m.violations)
                .push_bind(m.plan_version)
                .push_bind(micros(m.received_at));
        });
        query.build().execute(&self.pool).await?;
        Ok(())
    }

    async fn list_quarantined(
        &self,
        source_id: Uuid,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Quarantined>, StoreError> {
        let rows = sqlx::query(
            "SELECT quarantine_id, message_id, payload, violations, plan_version, received_at \
             FROM quarantine WHERE source_id = ?1 AND quarantine_id > ?2 \
             ORDER BY quarantine_id LIMIT ?3",
        )
        .bind(source_id.to_string())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(quarantined).collect()
    }

    async fn delete_quarantined(
        &self,
        source_id: Uuid,
        which: Doomed<'_>,
    ) -> Result<u64, StoreError> {
        let mut query = sqlx::QueryBuilder::new("DELETE FROM quarantine WHERE source_id = ");
        query.push_bind(source_id.to_string());
        match which {
            Doomed::Ids([]) => return Ok(0),
            Doomed::Ids(ids) => {
                query.push(" AND quarantine_id IN (");
                let mut list = query.separated(", ");
                for id in ids {
                    list.push_bind(*id);
                }
                list.push_unseparated(")");
            }
            Doomed::All => {}
        }
        Ok(query.build().execute(&self.pool).await?.rows_affected())
    }
}
