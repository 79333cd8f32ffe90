//! Storage of the definitions declared through the API (`definitions`, `definitions_revision`),
//! on Postgres and SQLite. Every change bumps the one-row revision in its transaction; on
//! Postgres that row's lock also serializes the changes.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use tessera_store::Database;
use time::OffsetDateTime;

use super::{DefinitionKind, Spec, StoredDefinition};
use crate::error::ProfileError;

/// The stored definitions.
#[async_trait]
pub trait DefinitionStore: Send + Sync + std::fmt::Debug {
    /// The store-wide revision: 0 before the first change, one more with every change.
    async fn revision(&self) -> Result<i64, ProfileError>;

    /// Every stored definition (by kind, then name) with the revision they were read at.
    async fn snapshot(&self) -> Result<(i64, Vec<StoredDefinition>), ProfileError>;

    /// Stores `spec` at version 1; returns it and the new revision. `DefinitionExists` when one
    /// of its kind and name is stored.
    async fn create(
        &self,
        spec: &Spec,
        now: OffsetDateTime,
    ) -> Result<(StoredDefinition, i64), ProfileError>;

    /// Replaces the stored definition of `spec`'s kind and name when it is at
    /// `expected_version`; returns it (at the next version) and the new revision.
    /// `DefinitionNotFound` or `VersionMismatch` otherwise.
    async fn update(
        &self,
        spec: &Spec,
        expected_version: i64,
        now: OffsetDateTime,
    ) -> Result<(StoredDefinition, i64), ProfileError>;

    /// Deletes the stored definition of `kind` named `name` (only at `expected_version` when
    /// given); returns the new revision. `DefinitionNotFound` or `VersionMismatch` otherwise.
    async fn delete(
        &self,
        kind: DefinitionKind,
        name: &str,
        expected_version: Option<i64>,
        now: OffsetDateTime,
    ) -> Result<i64, ProfileError>;
}

/// The store of `db`'s backend.
pub fn open(db: Database) -> Arc<dyn DefinitionStore> {
    match db {
        Database::Postgres(pool) => Arc::new(PgDefinitions(pool)),
        Database::Sqlite(pool) => Arc::new(LiteDefinitions(pool)),
    }
}

/// The revision and every definition, in one statement (one snapshot on both backends).
const SNAPSHOT: &str = "SELECT r.revision, d.kind, d.name, d.spec, d.version, d.created_at, \
                        d.updated_at \
                        FROM definitions_revision r LEFT JOIN definitions d ON 1 = 1 \
                        WHERE r.id = 1 ORDER BY d.kind, d.name";

/// A snapshot row: the revision, then a definition's columns (`None` without definitions).
type SnapshotRow = (
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<OffsetDateTime>,
    Option<OffsetDateTime>,
);

/// The revision and the definitions of snapshot rows; a row that does not decode (a stored
/// definition an older or newer Tessera wrote) is logged and left out.
fn snapshot_of(rows: Vec<SnapshotRow>) -> (i64, Vec<StoredDefinition>) {
    let revision = rows.first().map_or(0, |row| row.0);
    let mut definitions: Vec<StoredDefinition> = rows
        .into_iter()
        .filter_map(|(_, kind, name, spec, version, created_at, updated_at)| {
            let (kind, name) = (kind?, name?);
            let definition = decode(&kind, &spec?, version?, created_at?, updated_at?);
            if definition.is_none() {
                tracing::error!(%kind, %name, "a stored definition does not decode, leaving it out");
            }
            definition
        })
        .collect();
    // By bytes, whatever the database's collation: the order is part of the fingerprint.
    definitions.sort_by(|a, b| (a.spec.kind(), a.spec.name()).cmp(&(b.spec.kind(), b.spec.name())));
    (revision, definitions)
}

fn decode(
    kind: &str,
    spec: &str,
    version: i64,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
) -> Option<StoredDefinition> {
    let spec = Spec::from_json(DefinitionKind::parse(kind)?, spec).ok()?;
    Some(StoredDefinition {
        spec,
        version,
        created_at,
        updated_at,
    })
}

/// The revision, read on `conn` (inside the caller's transaction).
pub(crate) async fn pg_revision(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT revision FROM definitions_revision WHERE id = 1")
        .fetch_one(conn)
        .await
}

/// The revision and the definitions, read on `conn` (inside the caller's transaction).
pub(crate) async fn pg_snapshot(
    conn: &mut PgConnection,
) -> Result<(i64, Vec<StoredDefinition>), sqlx::Error> {
    Ok(snapshot_of(sqlx::query_as(SNAPSHOT).fetch_all(conn).await?))
}

/// The revision, read on `conn` (inside the caller's transaction).
pub(crate) async fn lite_revision(conn: &mut SqliteConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT revision FROM definitions_revision WHERE id = 1")
        .fetch_one(conn)
        .await
}

/// The revision and the definitions, read on `conn` (inside the caller's transaction).
pub(crate) async fn lite_snapshot(
    conn: &mut SqliteConnection,
) -> Result<(i64, Vec<StoredDefinition>), sqlx::Error> {
    Ok(snapshot_of(sqlx::query_as(SNAPSHOT).fetch_all(conn).await?))
}

fn not_found(kind: DefinitionKind, name: &str) -> ProfileError {
    ProfileError::DefinitionNotFound {
        kind: kind.label(),
        name: name.to_owned(),
    }
}

/// Why a conditional change of `kind` `name` changed nothing: not stored (`stored` is
/// `None`), or at another version.
fn unchanged(kind: DefinitionKind, name: &str, expected: i64, stored: Option<i64>) -> ProfileError {
    match stored {
        None => not_found(kind, name),
        Some(actual) => ProfileError::VersionMismatch {
            kind: kind.label(),
            name: name.to_owned(),
            expected,
            actual,
        },
    }
}

/// Definitions in Postgres.
#[derive(Debug, Clone)]
struct PgDefinitions(PgPool);

impl PgDefinitions {
    /// Bumps the revision (locking its row until the transaction ends).
    async fn bump(conn: &mut PgConnection, now: OffsetDateTime) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "UPDATE definitions_revision SET revision = revision + 1, updated_at = $1 \
             WHERE id = 1 RETURNING revision",
        )
        .bind(now)
        .fetch_one(conn)
        .await
    }

    async fn version(
        conn: &mut PgConnection,
        kind: DefinitionKind,
        name: &str,
    ) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar("SELECT version FROM definitions WHERE kind = $1 AND name = $2")
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(conn)
            .await
    }
}

#[async_trait]
impl DefinitionStore for PgDefinitions {
    async fn revision(&self) -> Result<i64, ProfileError> {
        let mut conn = self.0.acquire().await?;
        Ok(pg_revision(&mut conn).await?)
    }

    async fn snapshot(&self) -> Result<(i64, Vec<StoredDefinition>), ProfileError> {
        let mut conn = self.0.acquire().await?;
        Ok(pg_snapshot(&mut conn).await?)
    }

    async fn create(
        &self,
        spec: &Spec,
        now: OffsetDateTime,
    ) -> Result<(StoredDefinition, i64), ProfileError> {
        let mut tx = self.0.begin().await?;
        let revision = Self::bump(&mut tx, now).await?;
        let inserted = sqlx::query(
            "INSERT INTO definitions (kind, name, spec, version, created_at, updated_at) \
             VALUES ($1, $2, $3, 1, $4, $4) ON CONFLICT (kind, name) DO NOTHING",
        )
        .bind(spec.kind().as_str())
        .bind(spec.name())
        .bind(spec.to_json())
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(ProfileError::DefinitionExists {
                kind: spec.kind().label(),
                name: spec.name().to_owned(),
            });
        }
        tx.commit().await?;
        let stored = StoredDefinition {
            spec: spec.clone(),
            version: 1,
            created_at: now,
            updated_at: now,
        };
        Ok((stored, revision))
    }

    async fn update(
        &self,
        spec: &Spec,
        expected_version: i64,
        now: OffsetDateTime,
    ) -> Result<(StoredDefinition, i64), ProfileError> {
        let (kind, name) = (spec.kind(), spec.name());
        let mut tx = self.0.begin().await?;
        let revision = Self::bump(&mut tx, now).await?;
        let updated: Option<(i64, OffsetDateTime)> = sqlx::query_as(
            "UPDATE definitions SET spec = $3, version = version + 1, updated_at = $4 \
             WHERE kind = $1 AND name = $2 AND version = $5 RETURNING version, created_at",
        )
        .bind(kind.as_str())
        .bind(name)
        .bind(spec.to_json())
        .bind(now)
        .bind(expected_version)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((version, created_at)) = updated else {
            let stored = Self::version(&mut tx, kind, name).await?;
            return Err(unchanged(kind, name, expected_version, stored));
        };
        tx.commit().await?;
        let stored = StoredDefinition {
            spec: spec.clone(),
            version,
            created_at,
            updated_at: now,
        };
        Ok((stored, revision))
    }

    async fn delete(
        &self,
        kind: DefinitionKind,
        name: &str,
        expected_version: Option<i64>,
        now: OffsetDateTime,
    ) -> Result<i64, ProfileError> {
        let mut tx = self.0.begin().await?;
        let revision = Self::bump(&mut tx, now).await?;
        let deleted = sqlx::query(
            "DELETE FROM definitions WHERE kind = $1 AND name = $2 \
             AND ($3::bigint IS NULL OR version = $3)",
        )
        .bind(kind.as_str())
        .bind(name)
        .bind(expected_version)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if deleted == 0 {
            let stored = Self::version(&mut tx, kind, name).await?;
            return Err(unchanged(kind, name, expected_version.unwrap_or(0), stored));
        }
        tx.commit().await?;
        Ok(revision)
    }
}

/// Definitions in SQLite (one connection: transactions never overlap).
#[derive(Debug, Clone)]
struct LiteDefinitions(SqlitePool);

impl LiteDefinitions {
    async fn bump(conn: &mut SqliteConnection, now: OffsetDateTime) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "UPDATE definitions_revision SET revision = revision + 1, updated_at = ?1 \
             WHERE id = 1 RETURNING revision",
        )
        .bind(now)
        .fetch_one(conn)
        .await
    }

    async fn version(
        conn: &mut SqliteConnection,
        kind: DefinitionKind,
        name: &str,
    ) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar("SELECT version FROM definitions WHERE kind = ?1 AND name = ?2")
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(conn)
            .await
    }
}

#[async_trait]
impl DefinitionStore for LiteDefinitions {
    async fn revision(&self) -> Result<i64, ProfileError> {
        let mut conn = self.0.acquire().await?;
        Ok(lite_revision(&mut conn).await?)
    }

    async fn snapshot(&self) -> Result<(i64, Vec<StoredDefinition>), ProfileError> {
        let mut conn = self.0.acquire().await?;
        Ok(lite_snapshot(&mut conn).await?)
    }

    async fn create(
        &self,
        spec: &Spec,
        now: OffsetDateTime,
    ) -> Result<(StoredDefinition, i64), ProfileError> {
        let mut tx = self.0.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO definitions (kind, name, spec, version, created_at, updated_at) \
             VALUES (?1, ?2, ?3, 1, ?4, ?4) ON CONFLICT (kind, name) DO NOTHING",
        )
        .bind(spec.kind().as_str())
        .bind(spec.name())
        .bind(spec.to_json())
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(ProfileError::DefinitionExists {
                kind: spec.kind().label(),
                name: spec.name().to_owned(),
            });
        }
        let revision = Self::bump(&mut tx, now).await?;
        tx.commit().await?;
        let stored = StoredDefinition {
            spec: spec.clone(),
            version: 1,
            created_at: now,
            updated_at: now,
        };
        Ok((stored, revision))
    }

    async fn update(
        &self,
        spec: &Spec,
        expected_version: i64,
        now: OffsetDateTime,
    ) -> Result<(StoredDefinition, i64), ProfileError> {
        let (kind, name) = (spec.kind(), spec.name());
        let mut tx = self.0.begin().await?;
        let updated: Option<(i64, OffsetDateTime)> = sqlx::query_as(
            "UPDATE definitions SET spec = ?3, version = version + 1, updated_at = ?4 \
             WHERE kind = ?1 AND name = ?2 AND version = ?5 RETURNING version, created_at",
        )
        .bind(kind.as_str())
        .bind(name)
        .bind(spec.to_json())
        .bind(now)
        .bind(expected_version)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((version, created_at)) = updated else {
            let stored = Self::version(&mut tx, kind, name).await?;
            return Err(unchanged(kind, name, expected_version, stored));
        };
        let revision = Self::bump(&mut tx, now).await?;
        tx.commit().await?;
        let stored = StoredDefinition {
            spec: spec.clone(),
            version,
            created_at,
            updated_at: now,
        };
        Ok((stored, revision))
    }

    async fn delete(
        &self,
        kind: DefinitionKind,
        name: &str,
        expected_version: Option<i64>,
        now: OffsetDateTime,
    ) -> Result<i64, ProfileError> {
        let mut tx = self.0.begin().await?;
        let deleted = sqlx::query(
            "DELETE FROM definitions WHERE kind = ?1 AND name = ?2 \
             AND (?3 IS NULL OR version = ?3)",
        )
        .bind(kind.as_str())
        .bind(name)
        .bind(expected_version)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if deleted == 0 {
            let stored = Self::version(&mut tx, kind, name).await?;
            return Err(unchanged(kind, name, expected_version.unwrap_or(0), stored));
        }
        let revision = Self::bump(&mut tx, now).await?;
        tx.commit().await?;
        Ok(revision)
    }
}
