//! The source store, one implementation per backend.

mod postgres;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use tessera_store::{Database, StoreError};
use time::OffsetDateTime;
use uuid::Uuid;

use super::PlanMode;
use super::key::KeyHash;

#[cfg(test)]
mod conformance;

/// A source as stored, without its key (only a hash of it is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceRecord {
    pub(crate) id: Uuid,
    pub(crate) name: String,
    /// The first characters of the current write key, for display.
    pub(crate) key_prefix: String,
    pub(crate) enabled: bool,
    pub(crate) rate_limit_per_second: Option<u32>,
    pub(crate) plan_mode: PlanMode,
    pub(crate) created_at: OffsetDateTime,
    /// When the write key was last replaced; `None` while it is the key of the creation.
    pub(crate) key_rotated_at: Option<OffsetDateTime>,
}

/// A source to create.
#[derive(Debug, Clone)]
pub(crate) struct NewSource {
    pub(crate) id: Uuid,
    pub(crate) name: String,
    pub(crate) key_hash: KeyHash,
    pub(crate) key_prefix: String,
    pub(crate) rate_limit_per_second: Option<u32>,
    pub(crate) plan_mode: PlanMode,
    pub(crate) created_at: OffsetDateTime,
}

/// A change of a source's settings; `None` leaves a setting as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SourceChange {
    /// `Some(None)` removes the limit.
    pub(crate) rate_limit_per_second: Option<Option<u32>>,
    pub(crate) plan_mode: Option<PlanMode>,
}

/// Where sources are kept. Names and key hashes are unique: a create or key change that would
/// repeat one fails with a unique-violation database error.
#[async_trait]
pub(crate) trait SourceStore: Send + Sync + std::fmt::Debug {
    /// Stores a new source.
    async fn create(&self, source: &NewSource) -> Result<SourceRecord, StoreError>;

    /// Every source, by name.
    async fn list(&self) -> Result<Vec<SourceRecord>, StoreError>;

    /// The source called `name`.
    async fn get(&self, name: &str) -> Result<Option<SourceRecord>, StoreError>;

    /// The source whose write key hashes to `hash`, enabled or not.
    async fn find_by_key(&self, hash: &KeyHash) -> Result<Option<SourceRecord>, StoreError>;

    /// Enables or disables the source called `name`; `None` when there is none.
    async fn set_enabled(
        &self,
        name: &str,
        enabled: bool,
    ) -> Result<Option<SourceRecord>, StoreError>;

    /// Replaces the write key of the source called `name` (the old key stops working at once);
    /// `None` when there is none.
    async fn set_key(
        &self,
        name: &str,
        hash: &KeyHash,
        prefix: &str,
        at: OffsetDateTime,
    ) -> Result<Option<SourceRecord>, StoreError>;

    /// Changes the settings of the source called `name`; `None` when there is none.
    async fn update(
        &self,
        name: &str,
        change: &SourceChange,
    ) -> Result<Option<SourceRecord>, StoreError>;
}

/// The source store on `db`.
pub(crate) fn open(db: Database) -> Arc<dyn SourceStore> {
    match db {
        Database::Postgres(pool) => Arc::new(postgres::PgSourceStore::new(pool)),
        Database::Sqlite(pool) => Arc::new(sqlite::SqliteSourceStore::new(pool)),
    }
}

/// Whether `e` is a violation of a unique constraint (a taken name or key).
pub(crate) fn is_unique_violation(e: &StoreError) -> bool {
    match e {
        StoreError::Sqlx(sqlx::Error::Database(db)) => db.is_unique_violation(),
        StoreError::Sqlx(_)
        | StoreError::BadUrl(_)
        | StoreError::BadSchema(_)
        | StoreError::Migrate(_) => false,
    }
}

/// A stored rate limit (`BIGINT`, positive by a check constraint) as the domain's.
fn rate_limit(stored: Option<i64>) -> Option<u32> {
    stored.and_then(|n| u32::try_from(n).ok())
}

/// A stored plan mode as the domain's; a value the check constraint rules out is a corrupt
/// row.
fn plan_mode(stored: &str) -> Result<PlanMode, StoreError> {
    PlanMode::parse(stored).ok_or_else(|| {
        StoreError::Sqlx(sqlx::Error::Decode(
            format!("unknown plan mode {stored:?}").into(),
        ))
    })
}
