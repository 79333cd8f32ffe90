//! The tracking-plan store (plans, their versions and the quarantine), one implementation per
//! backend.

mod postgres;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use tessera_store::{Database, StoreError};
use time::OffsetDateTime;
use uuid::Uuid;

#[cfg(test)]
mod conformance;

/// A source's current plan as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PlanRecord {
    pub(crate) version: i64,
    /// The plan document (the JSON form of [`super::Plan`]).
    pub(crate) plan: String,
    pub(crate) updated_at: OffsetDateTime,
}

/// A message to quarantine.
#[derive(Debug, Clone)]
pub(crate) struct NewQuarantined {
    pub(crate) source_id: Uuid,
    pub(crate) message_id: String,
    /// The event as received, as JSON (a `tessera_core::Event`).
    pub(crate) payload: String,
    /// The violations as JSON.
    pub(crate) violations: String,
    pub(crate) plan_version: i64,
    pub(crate) received_at: OffsetDateTime,
}

/// A quarantined message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Quarantined {
    pub(crate) id: i64,
    pub(crate) message_id: String,
    pub(crate) payload: String,
    pub(crate) violations: String,
    pub(crate) plan_version: i64,
    pub(crate) received_at: OffsetDateTime,
}

/// Which quarantined messages of a source to delete.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Doomed<'a> {
    /// These ids (ids of other sources are left alone).
    Ids(&'a [i64]),
    /// Every one.
    All,
}

/// Where tracking plans and quarantined messages are kept.
#[async_trait]
pub(crate) trait PlanStore: Send + Sync + std::fmt::Debug {
    /// The current plan of a source; `None` before its first put.
    async fn get(&self, source_id: Uuid) -> Result<Option<PlanRecord>, StoreError>;

    /// The current plan version of a source; `None` before its first put. Cheaper than
    /// [`PlanStore::get`]: replicas poll it to notice a new version.
    async fn version(&self, source_id: Uuid) -> Result<Option<i64>, StoreError>;

    /// Replaces the plan of a source, one version up (1 for the first), keeping the version in
    /// the history; returns the stored plan.
    async fn put(
        &self,
        source_id: Uuid,
        plan: &str,
        at: OffsetDateTime,
    ) -> Result<PlanRecord, StoreError>;

    /// Adds messages to the quarantine, in one transaction.
    async fn quarantine(&self, messages: &[NewQuarantined]) -> Result<(), StoreError>;

    /// Up to `limit` quarantined messages of a source with an id above `after`, by id.
    async fn list_quarantined(
        &self,
        source_id: Uuid,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Quarantined>, StoreError>;

    /// Deletes quarantined messages of a source; returns how many were deleted.
    async fn delete_quarantined(
        &self,
        source_id: Uuid,
        which: Doomed<'_>,
    ) -> Result<u64, StoreError>;
}

/// The plan store on `db`.
pub(crate) fn open(db: Database) -> Arc<dyn PlanStore> {
    match db {
        Database::Postgres(pool) => Arc::new(postgres::PgPlanStore::new(pool)),
        Database::Sqlite(pool) => Arc::new(sqlite::SqlitePlanStore::new(pool)),
    }
}
