//! The Postgres profile store: production. Lists are bound as arrays (`ANY`, `UNNEST`), so
//! every statement is static.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::types::Json;
use tessera_core::Identifier;
use time::OffsetDateTime;

use super::{Applied, Ops, ProfileStore, ScoreUpdate, attach_identifiers};
use crate::domain::{Batch, Profile, ProfileState, Score};
use crate::error::ProfileError;

/// Profiles in Postgres, in the service's schema.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// A store on `pool`, whose `search_path` is the profile schema.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl ProfileStore for PostgresStore {
    async fn apply(
        &self,
        batch: &Batch,
        half_life_seconds: f64,
        now: OffsetDateTime,
    ) -> Result<Applied, ProfileError> {
        let mut tx = self.pool.begin().await?;
        let applied = super::apply(&mut PgOps(&mut tx), batch, half_life_seconds, now).await?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn get(&self, profile_id: &str) -> Result<Option<Profile>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        super::get(&mut PgOps(&mut conn), profile_id).await
    }

    async fn get_many(&self, profile_ids: &[String]) -> Result<Vec<Profile>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        super::get_many(&mut PgOps(&mut conn), profile_ids).await
    }

    async fn store_scores(
        &self,
        updates: &[ScoreUpdate],
        now: OffsetDateTime,
    ) -> Result<Vec<Profile>, ProfileError> {
        let mut tx = self.pool.begin().await?;
        let stored = super::store_scores(&mut PgOps(&mut tx), updates, now).await?;
        tx.commit().await?;
        Ok(stored)
    }
}

struct PgOps<'c>(&'c mut PgConnection);

#[async_trait]
impl Ops for PgOps<'_> {
    async fn ensure(&mut self, ids: &[String], now: OffsetDateTime) -> Result<(), sqlx::Error> {
        // Sorted, like the locks, so concurrent batches creating the same profiles wait on
        // each other in one order.
        sqlx::query(
            "INSERT INTO profiles (profile_id, created_at, updated_at) \
             SELECT id, $2, $2 FROM UNNEST($1::text[]) AS t(id) ORDER BY id \
             ON CONFLICT (profile_id) DO NOTHING",
        )
        .bind(ids)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn resolve(&mut self, ids: &[String]) -> Result<HashMap<String, String>, sqlx::Error> {
        let rows = sqlx::query(
            "WITH RECURSIVE chain (start_id, profile_id, merged_into, hops) AS ( \
                 SELECT profile_id, profile_id, merged_into, 0::bigint \
                 FROM profiles WHERE profile_id = ANY($1) \
               UNION ALL \
                 SELECT c.start_id, p.profile_id, p.merged_into, c.hops + 1 \
                 FROM chain c JOIN profiles p ON p.profile_id = c.merged_into \
                 WHERE c.hops < $2 \
             ) \
             SELECT start_id, profile_id FROM chain WHERE merged_into IS NULL",
        )
        .bind(ids)
        .bind(super::MAX_MERGE_HOPS)
        .fetch_all(&mut *self.0)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("start_id")?, r.try_get("profile_id")?)))
            .collect()
    }

    async fn load(&mut self, ids: &[String], lock: bool) -> Result<Vec<Profile>, sqlx::Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let query = if lock {
            sqlx::query(
                "SELECT profile_id, merged_into, traits, event_count, first_seen, last_seen, \
                        activity_log2, scores, merged_profile_ids, version, created_at, \
                        updated_at \
                 FROM profiles WHERE profile_id = ANY($1) ORDER BY profile_id FOR UPDATE",
            )
        } else {
            sqlx::query(
                "SELECT profile_id, merged_into, traits, event_count, first_seen, last_seen, \
                        activity_log2, scores, merged_profile_ids, version, created_at, \
                        updated_at \
                 FROM profiles WHERE profile_id = ANY($1) ORDER BY profile_id",
            )
        };
        let rows = query.bind(ids).fetch_all(&mut *self.0).await?;
        let mut profiles = rows.iter().map(profile).collect::<Result<Vec<_>, _>>()?;
        // Read after the rows: identifiers are then at least as new as the rows they join.
        let rows = sqlx::query(
            "SELECT profile_id, type, value FROM profile_identifiers WHERE profile_id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&mut *self.0)
        .await?;
        let ids = rows
            .iter()
            .map(|r| {
                let id = Identifier::new(
                    r.try_get::<String, _>("type")?,
                    r.try_get::<String, _>("value")?,
                );
                Ok((r.try_get("profile_id")?, id))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        attach_identifiers(&mut profiles, ids);
        Ok(profiles)
    }

    async fn record_events(
        &mut self,
        events: &[(String, String)],
        now: OffsetDateTime,
    ) -> Result<HashSet<String>, sqlx::Error> {
        if events.is_empty() {
            return Ok(HashSet::new());
        }
        let (event_ids, profile_ids): (Vec<&str>, Vec<&str>) =
            events.iter().map(|(e, p)| (e.as_str(), p.as_str())).unzip();
        let rows = sqlx::query(
            "INSERT INTO applied_events (event_id, profile_id, applied_at) \
             SELECT e, p, $3 FROM UNNEST($1::text[], $2::text[]) AS t(e, p) \
             ON CONFLICT (event_id) DO NOTHING \
             RETURNING event_id",
        )
        .bind(event_ids)
        .bind(profile_ids)
        .bind(now)
        .fetch_all(&mut *self.0)
        .await?;
        rows.iter().map(|r| r.try_get("event_id")).collect()
    }

    async fn write(&mut self, p: &Profile) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE profiles SET merged_into = $2, traits = $3, event_count = $4, \
                 first_seen = $5, last_seen = $6, activity_log2 = $7, scores = $8, \
                 merged_profile_ids = $9, version = $10, updated_at = $11 \
             WHERE profile_id = $1",
        )
        .bind(&p.profile_id)
        .bind(&p.merged_into)
        .bind(Json(&p.state.traits))
        .bind(p.state.event_count)
        .bind(p.state.first_seen)
        .bind(p.state.last_seen)
        .bind(p.state.activity_log2)
        .bind(Json(&p.scores))
        .bind(p.merged_profile_ids.as_slice())
        .bind(p.version)
        .bind(p.updated_at)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn redirect(&mut self, merged: &str, survivor: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE profile_identifiers SET profile_id = $2 WHERE profile_id = $1")
            .bind(merged)
            .bind(survivor)
            .execute(&mut *self.0)
            .await?;
        sqlx::query("UPDATE profiles SET merged_into = $2 WHERE merged_into = $1")
            .bind(merged)
            .bind(survivor)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn link(&mut self, profile_id: &str, ids: &[&Identifier]) -> Result<u64, sqlx::Error> {
        let (types, values): (Vec<&str>, Vec<&str>) = ids
            .iter()
            .map(|i| (i.kind.as_str(), i.value.as_str()))
            .unzip();
        let done = sqlx::query(
            "INSERT INTO profile_identifiers (type, value, profile_id) \
             SELECT t, v, $3 FROM UNNEST($1::text[], $2::text[]) AS x(t, v) \
             ON CONFLICT (type, value) DO NOTHING",
        )
        .bind(types)
        .bind(values)
        .bind(profile_id)
        .execute(&mut *self.0)
        .await?;
        Ok(done.rows_affected())
    }

    async fn write_scores(
        &mut self,
        profile_id: &str,
        version: i64,
        scores: &BTreeMap<String, Score>,
        now: OffsetDateTime,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE profiles SET scores = $3, version = version + 1, updated_at = $4 \
             WHERE profile_id = $1 AND version = $2 AND merged_into IS NULL",
        )
        .bind(profile_id)
        .bind(version)
        .bind(Json(scores))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

fn profile(row: &PgRow) -> Result<Profile, sqlx::Error> {
    let Json(traits) = row.try_get("traits")?;
    let Json(scores) = row.try_get("scores")?;
    Ok(Profile {
        profile_id: row.try_get("profile_id")?,
        merged_into: row.try_get("merged_into")?,
        state: ProfileState {
            traits,
            event_count: row.try_get("event_count")?,
            first_seen: row.try_get("first_seen")?,
            last_seen: row.try_get("last_seen")?,
            activity_log2: row.try_get("activity_log2")?,
            identifiers: Default::default(),
        },
        scores,
        merged_profile_ids: row.try_get("merged_profile_ids")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
