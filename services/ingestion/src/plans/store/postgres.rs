//! The tracking-plan store on Postgres.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use tessera_store::StoreError;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Doomed, NewQuarantined, PlanRecord, PlanStore, Quarantined};

#[derive(Debug, Clone)]
pub(crate) struct PgPlanStore {
    pool: PgPool,
}

impl PgPlanStore {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn plan_record(row: &PgRow) -> Result<PlanRecord, StoreError> {
    Ok(PlanRecord {
        version: row.try_get("version")?,
        plan: row.try_get("plan")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn quarantined(row: &PgRow) -> Result<Quarantined, StoreError> {
    Ok(Quarantined {
        id: row.try_get("quarantine_id")?,
        message_id: row.try_get("message_id")?,
        payload: row.try_get("payload")?,
        violations: row.try_get("violations")?,
        plan_version: row.try_get("plan_version")?,
        received_at: row.try_get("received_at")?,
    })
}

#[async_trait]
impl PlanStore for PgPlanStore {
    async fn get(&self, source_id: Uuid) -> Result<Option<PlanRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT version, plan::text AS plan, updated_at FROM tracking_plans \
             WHERE source_id = $1",
        )
        .bind(source_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(plan_record).transpose()
    }

    async fn version(&self, source_id: Uuid) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT version FROM tracking_plans WHERE source_id = $1")
                .bind(source_id)
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
        // The row lock of the upsert serializes concurrent puts: versions never repeat.
        let row = sqlx::query(
            "INSERT INTO tracking_plans (source_id, version, plan, updated_at) \
             VALUES ($1, 1, $2::jsonb, $3) \
             ON CONFLICT (source_id) DO UPDATE SET version = tracking_plans.version + 1, \
               plan = EXCLUDED.plan, updated_at = EXCLUDED.updated_at \
             RETURNING version, plan::text AS plan, updated_at",
        )
        .bind(source_id)
        .bind(plan)
        .bind(at)
        .fetch_one(&mut *tx)
        .await?;
        let record = plan_record(&row)?;
        sqlx::query(
            "INSERT INTO tracking_plan_versions (source_id, version, plan, created_at) \
             VALUES ($1, $2, $3::jsonb, $4)",
        )
        .bind(source_id)
        .bind(record.version)
        .bind(plan)
        .bind(at)
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
            b.push_bind(m.source_id)
                .push_bind(&m.message_id)
                .push_bind(&m.payload)
                .push_unseparated("::jsonb")
                .push_bind(&m.violations)
                .push_unseparated("::jsonb")
                .push_bind(m.plan_version)
                .push_bind(m.received_at);
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
            "SELECT quarantine_id, message_id, payload::text AS payload, \
               violations::text AS violations, plan_version, received_at \
             FROM quarantine WHERE source_id = $1 AND quarantine_id > $2 \
             ORDER BY quarantine_id LIMIT $3",
        )
        .bind(source_id)
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
        let done = match which {
            Doomed::Ids(ids) => {
                sqlx::query(
                    "DELETE FROM quarantine WHERE source_id = $1 AND quarantine_id = ANY($2)",
                )
                .bind(source_id)
                .bind(ids)
                .execute(&self.pool)
                .await?
            }
            Doomed::All => {
                sqlx::query("DELETE FROM quarantine WHERE source_id = $1")
                    .bind(source_id)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected())
    }
}
