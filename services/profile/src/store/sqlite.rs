//! The SQLite profile store of `tessera dev`. SQLite has no arrays, so lists are bound one
//! parameter each through `QueryBuilder`, in chunks that stay far below SQLite's parameter
//! limit. The pool has a single connection, so transactions never run concurrently and need no
//! row locks.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use sqlx::sqlite::{Sqlite, SqliteConnection, SqlitePool, SqliteRow};
use sqlx::types::Json;
use sqlx::{QueryBuilder, Row};
use tessera_core::Identifier;
use time::OffsetDateTime;

use super::{
    Applied, ChangeCursor, Deleted, IdentifierRaises, MembershipChange, NewChange, Ops,
    ProfileChange, ProfileStore, QueuedRefresh, Recorded, Scorer, TimelineEntry, TimelineQuery,
    Version, attach_identifiers, timeline_entries,
};
use crate::account::{Account, Member};
use crate::definitions::{SharedDefinitions, StoredDefinition};
use crate::domain::{Batch, Profile, ProfileState, Split};
use crate::error::ProfileError;

/// Rows per statement: at most 3 parameters each, far below SQLite's 32,766.
const CHUNK: usize = 500;

/// Profiles in a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The computed traits and audiences kept up to date on every write.
    defs: std::sync::Arc<SharedDefinitions>,
    pool: SqlitePool,
}

impl SqliteStore {
    /// A store on `pool`.
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            defs: std::sync::Arc::default(),
        }
    }

    /// The store keeping the computed traits and audiences of `defs` up to date.
    #[must_use]
    pub fn with_definitions(mut self, defs: std::sync::Arc<SharedDefinitions>) -> Self {
        self.defs = defs;
        self
    }
}

#[async_trait]
impl ProfileStore for SqliteStore {
    async fn apply(
        &self,
        batch: &Batch,
        half_life_seconds: f64,
        now: OffsetDateTime,
        scorer: &dyn Scorer,
    ) -> Result<Applied, ProfileError> {
        let mut tx = self.pool.begin().await?;
        let applied = super::apply(
            &mut LiteOps(&mut tx),
            batch,
            &[],
            (half_life_seconds, &self.defs),
            now,
            scorer,
        )
        .await?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn split(
        &self,
        split: &Split,
        half_life_seconds: f64,
        now: OffsetDateTime,
        scorer: &dyn Scorer,
    ) -> Result<Applied, ProfileError> {
        let mut tx = self.pool.begin().await?;
        let applied = super::split(
            &mut LiteOps(&mut tx),
            split,
            (half_life_seconds, &self.defs),
            now,
            scorer,
        )
        .await?;
        tx.commit().await?;
        Ok(applied)
    }

    async fn timeline(
        &self,
        profile_ids: &[String],
        query: &TimelineQuery,
    ) -> Result<Vec<TimelineEntry>, ProfileError> {
        let json = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".to_owned());
        let (before_time, before_id) = match &query.before {
            Some((time, id)) => (Some(unix_micros(*time)), Some(id.as_str())),
            None => (None, None),
        };
        let rows: Vec<(String, String, i64, Option<String>)> = sqlx::query_as(
            "SELECT event_id, profile_id, occurred_at, content FROM applied_events \
             WHERE profile_id IN (SELECT value FROM json_each(?1)) AND occurred_at IS NOT NULL \
               AND (json_array_length(?2) = 0 \
                    OR json_extract(content, '$.details.type') IN (SELECT value FROM json_each(?2))) \
               AND (json_array_length(?3) = 0 \
                    OR json_extract(content, '$.details.event') IN (SELECT value FROM json_each(?3)) \
                    OR json_extract(content, '$.details.name') IN (SELECT value FROM json_each(?3))) \
               AND (?4 IS NULL OR occurred_at >= ?4) \
               AND (?5 IS NULL OR occurred_at < ?5) \
               AND (?6 IS NULL OR occurred_at < ?6 OR (occurred_at = ?6 AND event_id < ?7)) \
             ORDER BY occurred_at DESC, event_id DESC LIMIT ?8",
        )
        .bind(json(profile_ids))
        .bind(json(&query.types))
        .bind(json(&query.names))
        .bind(query.start.map(unix_micros))
        .bind(query.end.map(unix_micros))
        .bind(before_time)
        .bind(before_id)
        .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let rows = rows
            .into_iter()
            .map(|(event, profile, micros, content)| {
                let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
                    .map_err(|e| ProfileError::Corrupt(format!("event {event}: time {e}")))?;
                Ok((event, profile, at, content))
            })
            .collect::<Result<Vec<_>, ProfileError>>()?;
        timeline_entries(rows)
    }

    async fn sweep(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<(Vec<Profile>, Vec<MembershipChange>), ProfileError> {
        let mut tx = self.pool.begin().await?;
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT profile_id FROM profiles \
             WHERE valid_until <= ?1 AND merged_into IS NULL ORDER BY valid_until LIMIT ?2",
        )
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        if due.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut ops = LiteOps(&mut tx);
        let profiles = ops.load(&due, false).await?;
        let swept = super::sweep(&mut ops, &self.defs, profiles, now).await?;
        tx.commit().await?;
        Ok(swept)
    }

    async fn changes_after(
        &self,
        after: ChangeCursor,
        limit: usize,
    ) -> Result<Vec<ProfileChange>, ProfileError> {
        // One writer at a time: sequence order is commit order.
        let rows: Vec<(i64, String, String, Json<serde_json::Value>, OffsetDateTime)> =
            sqlx::query_as(
                "SELECT seq, profile_id, kind, detail, at FROM profile_changes \
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .bind(after.seq)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, profile_id, kind, Json(detail), at)| ProfileChange {
                cursor: ChangeCursor { xid: 0, seq },
                profile_id,
                kind,
                detail,
                at,
            })
            .collect())
    }

    async fn change_horizon(&self) -> Result<ChangeCursor, ProfileError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM profile_changes")
            .fetch_one(&self.pool)
            .await?;
        Ok(ChangeCursor {
            xid: 0,
            seq: seq.unwrap_or(0),
        })
    }

    async fn profile_as_of(
        &self,
        profile_id: &str,
        at: OffsetDateTime,
    ) -> Result<Option<Vec<u8>>, ProfileError> {
        let mut id = profile_id.to_owned();
        for _ in 0..super::MAX_MERGE_HOPS {
            let row: Option<(Option<String>, Option<Vec<u8>>)> = sqlx::query_as(
                "SELECT merged_into, body FROM profile_versions \
                 WHERE profile_id = ?1 AND recorded_at <= ?2 \
                 ORDER BY version DESC LIMIT 1",
            )
            .bind(&id)
            .bind(at)
            .fetch_optional(&self.pool)
            .await?;
            match row {
                None => return Ok(None),
                Some((Some(into), _)) => id = into,
                Some((None, body)) => return Ok(body),
            }
        }
        Err(ProfileError::BrokenMergeChain(profile_id.to_owned()))
    }

    async fn prune_versions(&self, before: OffsetDateTime) -> Result<u64, ProfileError> {
        let done = sqlx::query(
            "DELETE FROM profile_versions WHERE recorded_at < ?1 AND EXISTS ( \
                 SELECT 1 FROM profile_versions n \
                 WHERE n.profile_id = profile_versions.profile_id \
                   AND n.version > profile_versions.version AND n.recorded_at < ?1)",
        )
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64, ProfileError> {
        let done = sqlx::query("DELETE FROM profile_changes WHERE at < ?1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn audience_members(
        &self,
        audience: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, i64), ProfileError> {
        let members: Vec<String> = sqlx::query_scalar(
            "SELECT profile_id FROM audience_members \
             WHERE audience = ?1 AND (?2 IS NULL OR profile_id > ?2) \
             ORDER BY profile_id LIMIT ?3",
        )
        .bind(audience)
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let total: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audience_members WHERE audience = ?1")
                .bind(audience)
                .fetch_one(&self.pool)
                .await?;
        Ok((members, total))
    }

    async fn get_resolved(
        &self,
        profile_ids: &[String],
    ) -> Result<HashMap<String, Profile>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        LiteOps(&mut conn).live(profile_ids).await
    }

    async fn get_many(&self, profile_ids: &[String]) -> Result<Vec<Profile>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        super::get_many(&mut LiteOps(&mut conn), profile_ids).await
    }

    async fn scan(&self, after: Option<&str>, limit: usize) -> Result<Vec<Profile>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        super::scan(&mut LiteOps(&mut conn), after, limit).await
    }

    async fn delete(
        &self,
        live: &str,
        component: &[String],
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<Deleted, ProfileError> {
        let mut tx = self.pool.begin().await?;
        let deleted = super::delete(
            &mut LiteOps(&mut tx),
            &self.defs,
            live,
            component,
            reason,
            now,
        )
        .await?;
        // Owed until the cache took their tombstones, committed with the deletion so no
        // failure or crash after it loses them.
        for id in &deleted.profile_ids {
            sqlx::query(
                "INSERT INTO profile_cache_purges (profile_id, recorded_at) VALUES (?1, ?2) \
                 ON CONFLICT (profile_id) DO NOTHING",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn start_recompute(&self, now: OffsetDateTime) -> Result<bool, ProfileError> {
        let mut tx = self.pool.begin().await?;
        let running = super::start_recompute(&mut LiteOps(&mut tx), &self.defs, now).await?;
        tx.commit().await?;
        Ok(running)
    }

    async fn recompute(
        &self,
        limit: usize,
        half_life_seconds: f64,
        now: OffsetDateTime,
        scorer: &dyn Scorer,
    ) -> Result<Option<Applied>, ProfileError> {
        let mut tx = self.pool.begin().await?;
        let done = super::recompute(
            &mut LiteOps(&mut tx),
            limit,
            (half_life_seconds, &self.defs),
            now,
            scorer,
        )
        .await?;
        tx.commit().await?;
        Ok(done)
    }

    async fn defer_account_refresh(
        &self,
        now: OffsetDateTime,
    ) -> Result<Option<String>, ProfileError> {
        let mut tx = self.pool.begin().await?;
        // What its rows ask for, together: a refresh of its members resumes where the
        // earliest of them stands.
        let oldest: Option<(String, bool, bool, Option<String>)> = sqlx::query_as(
            "SELECT account_id, max(members), max(rescore), \
                    CASE WHEN max(members AND after_profile_id IS NULL) THEN NULL \
                         ELSE min(CASE WHEN members THEN after_profile_id END) END \
             FROM account_refreshes WHERE account_id = \
               (SELECT account_id FROM account_refreshes ORDER BY position LIMIT 1) \
             GROUP BY account_id",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some((account_id, members, rescore, after)) = oldest else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM account_refreshes WHERE account_id = ?1")
            .bind(&account_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO account_refreshes \
               (account_id, requested_at, members, rescore, after_profile_id) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&account_id)
        .bind(now)
        .bind(members)
        .bind(rescore)
        .bind(after)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(account_id))
    }

    async fn account_computed(
        &self,
        account_id: &str,
        now: OffsetDateTime,
    ) -> Result<BTreeMap<String, crate::computed::ComputedValue>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        super::account_computed_of(&mut LiteOps(&mut conn), &self.defs, account_id, now).await
    }

    async fn expire_accounts(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<String>, ProfileError> {
        let mut tx = self.pool.begin().await?;
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT account_id FROM accounts WHERE computed_valid_until <= ?1 \
             ORDER BY computed_valid_until LIMIT ?2",
        )
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        // Cleared as it is queued, so it is queued once; the rescore stores the next time.
        let mut ops = LiteOps(&mut tx);
        for id in &due {
            sqlx::query("UPDATE accounts SET computed_valid_until = NULL WHERE account_id = ?1")
                .bind(id)
                .execute(&mut *ops.0)
                .await?;
        }
        // Members' person plans may read the values too: their refresh is queued with it.
        let members = self.defs.current().members_read_account_computed();
        let ids: Vec<&str> = due.iter().map(String::as_str).collect();
        ops.request_account_refreshes(&ids, members, now).await?;
        tx.commit().await?;
        Ok(due)
    }

    async fn refresh_accounts(
        &self,
        limit: usize,
        half_life_seconds: f64,
        now: OffsetDateTime,
        scorer: &dyn Scorer,
    ) -> Result<Option<Applied>, ProfileError> {
        let mut tx = self.pool.begin().await?;
        let done = super::refresh_accounts(
            &mut LiteOps(&mut tx),
            limit,
            (half_life_seconds, &self.defs),
            now,
            scorer,
        )
        .await;
        match done {
            Ok(done) => {
                tx.commit().await?;
                Ok(done)
            }
            Err(e) => {
                // At once, not when the connection is next used: the refreshes it took are
                // free for the deferral and the next round.
                if let Err(rollback) = tx.rollback().await {
                    tracing::warn!(error = %rollback, "rolling back a failed account refresh");
                }
                Err(e)
            }
        }
    }

    async fn account(&self, account_id: &str) -> Result<Option<Account>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        Ok(LiteOps(&mut conn).load_account(account_id).await?)
    }

    async fn account_members(&self, account_id: &str) -> Result<Vec<Member>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        super::account_members(&mut LiteOps(&mut conn), account_id).await
    }

    async fn is_deleted(&self, profile_id: &str) -> Result<bool, ProfileError> {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM deleted_profiles WHERE profile_id = ?1")
                .bind(profile_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.is_some())
    }

    async fn record_identifier_raise(&self, now: OffsetDateTime) -> Result<i64, ProfileError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO identifier_epoch_raises (recorded_at) VALUES (?1) RETURNING id",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn identifier_raise_due(&self, id: i64, now: OffsetDateTime) -> Result<(), ProfileError> {
        sqlx::query(
            "UPDATE identifier_epoch_raises SET written_at = ?2 \
             WHERE id = ?1 AND written_at IS NULL",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn identifier_raises(
        &self,
        abandoned_before: OffsetDateTime,
    ) -> Result<IdentifierRaises, ProfileError> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, bool)> = sqlx::query_as(
            "SELECT id, written_at IS NOT NULL OR recorded_at < ?1 \
             FROM identifier_epoch_raises ORDER BY id",
        )
        .bind(abandoned_before)
        .fetch_all(&mut *tx)
        .await?;
        let floor: i64 = sqlx::query_scalar("SELECT epoch FROM identifier_epoch_floor")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(IdentifierRaises {
            due: rows
                .iter()
                .filter(|(_, due)| *due)
                .map(|(id, _)| *id)
                .collect(),
            owed: rows.into_iter().map(|(id, _)| id).collect(),
            floor,
        })
    }

    async fn finish_identifier_raises(&self, ids: &[i64], epoch: i64) -> Result<(), ProfileError> {
        let mut tx = self.pool.begin().await?;
        for id in ids {
            sqlx::query("DELETE FROM identifier_epoch_raises WHERE id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE identifier_epoch_floor SET epoch = max(epoch, ?1)")
            .bind(epoch)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn owed_purges(&self, limit: usize) -> Result<Vec<String>, ProfileError> {
        Ok(sqlx::query_scalar(
            "SELECT profile_id FROM profile_cache_purges ORDER BY profile_id LIMIT ?1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn finish_purges(&self, profile_ids: &[String]) -> Result<(), ProfileError> {
        let mut tx = self.pool.begin().await?;
        for id in profile_ids {
            sqlx::query("DELETE FROM profile_cache_purges WHERE profile_id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

struct LiteOps<'c>(&'c mut SqliteConnection);

/// Appends `(?, ?, …)` binding `ids`.
fn push_in_list(qb: &mut QueryBuilder<Sqlite>, ids: &[String]) {
    qb.push("(");
    let mut list = qb.separated(", ");
    for id in ids {
        list.push_bind(id.clone());
    }
    list.push_unseparated(")");
}

#[async_trait]
impl Ops for LiteOps<'_> {
    async fn ensure(&mut self, ids: &[String], now: OffsetDateTime) -> Result<(), sqlx::Error> {
        for chunk in ids.chunks(CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO profiles (profile_id, created_at, updated_at) ",
            );
            qb.push_values(chunk, |mut row, id| {
                row.push_bind(id.clone()).push_bind(now).push_bind(now);
            });
            qb.push(" ON CONFLICT (profile_id) DO NOTHING");
            qb.build().execute(&mut *self.0).await?;
        }
        Ok(())
    }

    async fn resolve(&mut self, ids: &[String]) -> Result<HashMap<String, String>, sqlx::Error> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "WITH RECURSIVE chain (start_id, profile_id, merged_into, hops) AS ( \
                     SELECT profile_id, profile_id, merged_into, 0 \
                     FROM profiles WHERE profile_id IN ",
            );
            push_in_list(&mut qb, chunk);
            qb.push(
                " UNION ALL \
                     SELECT c.start_id, p.profile_id, p.merged_into, c.hops + 1 \
                     FROM chain c JOIN profiles p ON p.profile_id = c.merged_into \
                     WHERE c.hops < ",
            );
            qb.push_bind(super::MAX_MERGE_HOPS);
            qb.push(") SELECT start_id, profile_id FROM chain WHERE merged_into IS NULL");
            for row in qb.build().fetch_all(&mut *self.0).await? {
                out.insert(row.try_get("start_id")?, row.try_get("profile_id")?);
            }
        }
        Ok(out)
    }

    async fn load(&mut self, ids: &[String], _lock: bool) -> Result<Vec<Profile>, sqlx::Error> {
        let mut profiles = Vec::with_capacity(ids.len());
        let mut identifiers = Vec::new();
        for chunk in ids.chunks(CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT profile_id, merged_into, traits, event_count, first_seen, last_seen, \
                        activity_log2, scores, merged_profile_ids, version, created_at, \
                        updated_at, computed, valid_until \
                 FROM profiles WHERE profile_id IN ",
            );
            push_in_list(&mut qb, chunk);
            for row in qb.build().fetch_all(&mut *self.0).await? {
                profiles.push(profile(&row)?);
            }
            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT profile_id, type, value FROM profile_identifiers WHERE profile_id IN ",
            );
            push_in_list(&mut qb, chunk);
            for row in qb.build().fetch_all(&mut *self.0).await? {
                let id = Identifier::new(
                    row.try_get::<String, _>("type")?,
                    row.try_get::<String, _>("value")?,
                );
                identifiers.push((row.try_get("profile_id")?, id));
            }
        }
        profiles.sort_by(|a, b| a.profile_id.cmp(&b.profile_id));
        attach_identifiers(&mut profiles, identifiers);
        Ok(profiles)
    }

    fn as_stored(&self, _profile: &mut Profile) {
        // Times are RFC 3339 text to the nanosecond and JSON is text (parsed back bit for bit
        // with `float_roundtrip`): a row reads back as written.
    }

    async fn record_events(
        &mut self,
        events: &[Recorded<'_>],
        now: OffsetDateTime,
    ) -> Result<HashSet<String>, sqlx::Error> {
        let mut fresh = HashSet::with_capacity(events.len());
        for chunk in events.chunks(CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO applied_events (event_id, profile_id, applied_at, content, occurred_at) ",
            );
            qb.push_values(chunk, |mut row, event| {
                row.push_bind(event.event_id.to_owned())
                    .push_bind(event.profile_id.to_owned())
                    .push_bind(now)
                    .push_bind(event.content.clone())
                    .push_bind(unix_micros(event.occurred_at));
            });
            qb.push(" ON CONFLICT (event_id) DO NOTHING RETURNING event_id");
            for row in qb.build().fetch_all(&mut *self.0).await? {
                fresh.insert(row.try_get("event_id")?);
            }
        }
        Ok(fresh)
    }

    async fn load_events(
        &mut self,
        profile_ids: &[String],
    ) -> Result<Vec<(String, String, Option<String>)>, sqlx::Error> {
        let mut out = Vec::new();
        for chunk in profile_ids.chunks(CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT event_id, profile_id, content FROM applied_events WHERE profile_id IN (",
            );
            let mut ids = qb.separated(", ");
            for id in chunk {
                ids.push_bind(id.clone());
            }
            qb.push(") ORDER BY event_id");
            out.extend(
                qb.build_query_as::<(String, String, Option<String>)>()
                    .fetch_all(&mut *self.0)
                    .await?,
            );
        }
        Ok(out)
    }

    async fn delete_events(&mut self, event_ids: &[&str]) -> Result<(), sqlx::Error> {
        for event_id in event_ids {
            sqlx::query("DELETE FROM applied_events WHERE event_id = ?1")
                .bind(*event_id)
                .execute(&mut *self.0)
                .await?;
        }
        Ok(())
    }

    async fn move_events(&mut self, moves: &[(&str, &str, String)]) -> Result<(), sqlx::Error> {
        for (event_id, profile_id, content) in moves {
            sqlx::query(
                "UPDATE applied_events SET profile_id = ?2, content = ?3 WHERE event_id = ?1",
            )
            .bind(*event_id)
            .bind(*profile_id)
            .bind(content.as_str())
            .execute(&mut *self.0)
            .await?;
        }
        Ok(())
    }

    async fn replace_identifiers(
        &mut self,
        members: &[String],
        links: &[(&str, &Identifier)],
    ) -> Result<(), sqlx::Error> {
        for id in members {
            sqlx::query("DELETE FROM profile_identifiers WHERE profile_id = ?1")
                .bind(id.as_str())
                .execute(&mut *self.0)
                .await?;
        }
        self.link(links).await?;
        Ok(())
    }

    async fn write(&mut self, profiles: &[&Profile]) -> Result<(), sqlx::Error> {
        // SQLite runs in-process: one statement per profile costs no round trip.
        for p in profiles {
            write_one(&mut *self.0, p).await?;
        }
        Ok(())
    }

    async fn redirect(&mut self, redirects: &[(&str, &str)]) -> Result<(), sqlx::Error> {
        if redirects.is_empty() {
            return Ok(());
        }
        // A JSON object from merged id to survivor (each merged id is merged once per batch).
        let map: serde_json::Map<String, serde_json::Value> = redirects
            .iter()
            .map(|(merged, survivor)| ((*merged).to_owned(), (*survivor).into()))
            .collect();
        let map = serde_json::Value::Object(map).to_string();
        sqlx::query(
            "UPDATE profile_identifiers SET profile_id = r.value \
             FROM json_each(?1) AS r WHERE profile_identifiers.profile_id = r.key",
        )
        .bind(&map)
        .execute(&mut *self.0)
        .await?;
        sqlx::query(
            "UPDATE profiles SET merged_into = r.value \
             FROM json_each(?1) AS r WHERE profiles.merged_into = r.key",
        )
        .bind(&map)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn memberships(
        &mut self,
        profile_ids: &[String],
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        let ids = serde_json::to_string(profile_ids).unwrap_or_else(|_| "[]".to_owned());
        sqlx::query_as(
            "SELECT profile_id, audience FROM audience_members \
             WHERE profile_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(ids)
        .fetch_all(&mut *self.0)
        .await
    }

    async fn change_memberships(
        &mut self,
        changes: &[MembershipChange],
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        for c in changes {
            if c.entered {
                sqlx::query(
                    "INSERT INTO audience_members (audience, profile_id, entered_at) \
                     VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                )
                .bind(&c.audience)
                .bind(&c.profile_id)
                .bind(now)
                .execute(&mut *self.0)
                .await?;
            } else {
                sqlx::query("DELETE FROM audience_members WHERE audience = ?1 AND profile_id = ?2")
                    .bind(&c.audience)
                    .bind(&c.profile_id)
                    .execute(&mut *self.0)
                    .await?;
            }
        }
        Ok(())
    }

    async fn record_versions(
        &mut self,
        versions: &[Version],
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        for v in versions {
            sqlx::query(
                "INSERT INTO profile_versions (profile_id, version, recorded_at, merged_into, body) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            )
            .bind(&v.profile_id)
            .bind(v.version)
            .bind(now)
            .bind(&v.merged_into)
            .bind(v.body.as_deref())
            .execute(&mut *self.0)
            .await?;
        }
        Ok(())
    }

    async fn log_changes(
        &mut self,
        changes: &[NewChange],
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        for c in changes {
            sqlx::query(
                "INSERT INTO profile_changes (profile_id, kind, detail, at) VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(&c.profile_id)
            .bind(c.kind)
            .bind(Json(&c.detail))
            .bind(now)
            .execute(&mut *self.0)
            .await?;
        }
        Ok(())
    }

    async fn link(&mut self, links: &[(&str, &Identifier)]) -> Result<u64, sqlx::Error> {
        let mut linked = 0;
        for chunk in links.chunks(CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO profile_identifiers (type, value, profile_id) ",
            );
            qb.push_values(chunk, |mut row, (profile_id, id)| {
                row.push_bind(id.kind.clone())
                    .push_bind(id.value.clone())
                    .push_bind((*profile_id).to_owned());
            });
            qb.push(" ON CONFLICT (type, value) DO NOTHING");
            linked += qb.build().execute(&mut *self.0).await?.rows_affected();
        }
        Ok(linked)
    }

    async fn recompute_state(
        &mut self,
        _lock: bool,
    ) -> Result<Option<(String, Option<String>)>, sqlx::Error> {
        sqlx::query_as("SELECT fingerprint, cursor FROM recompute_state WHERE id = 1")
            .fetch_optional(&mut *self.0)
            .await
    }

    async fn definitions_revision(&mut self) -> Result<i64, sqlx::Error> {
        crate::definitions::store::lite_revision(self.0).await
    }

    async fn stored_definitions(&mut self) -> Result<(i64, Vec<StoredDefinition>), sqlx::Error> {
        crate::definitions::store::lite_snapshot(self.0).await
    }

    async fn set_recompute_state(
        &mut self,
        fingerprint: &str,
        cursor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO recompute_state (id, fingerprint, cursor, started_at, updated_at) \
             VALUES (1, ?1, ?2, ?3, ?3) \
             ON CONFLICT (id) DO UPDATE SET fingerprint = ?1, cursor = ?2, updated_at = ?3, \
               started_at = CASE WHEN recompute_state.fingerprint = ?1 \
                                 THEN recompute_state.started_at ELSE ?3 END",
        )
        .bind(fingerprint)
        .bind(cursor)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn lock_accounts(
        &mut self,
        ids: &[String],
        now: OffsetDateTime,
    ) -> Result<Vec<Account>, sqlx::Error> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            sqlx::query(
                "INSERT INTO accounts (account_id, created_at, updated_at) VALUES (?1, ?2, ?2) \
                 ON CONFLICT (account_id) DO NOTHING",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *self.0)
            .await?;
            out.extend(self.load_account(id).await?);
        }
        Ok(out)
    }

    async fn write_accounts(&mut self, accounts: &[&Account]) -> Result<(), sqlx::Error> {
        for a in accounts {
            sqlx::query(
                "UPDATE accounts SET traits = ?2, version = ?3, updated_at = ?4, scores = ?5 \
                 WHERE account_id = ?1",
            )
            .bind(&a.account_id)
            .bind(Json(&a.traits))
            .bind(a.version)
            .bind(a.updated_at)
            .bind(Json(&a.scores))
            .execute(&mut *self.0)
            .await?;
        }
        Ok(())
    }

    async fn load_account(&mut self, id: &str) -> Result<Option<Account>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT account_id, traits, scores, version, created_at, updated_at FROM accounts \
             WHERE account_id = ?1",
        )
        .bind(id)
        .fetch_optional(&mut *self.0)
        .await?;
        row.as_ref().map(account).transpose()
    }

    async fn load_accounts(&mut self, ids: &[String]) -> Result<Vec<Account>, sqlx::Error> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(self.load_account(id).await?);
        }
        Ok(out)
    }

    async fn request_account_refreshes(
        &mut self,
        ids: &[&str],
        members: bool,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        for id in ids {
            sqlx::query(
                "INSERT INTO account_refreshes (account_id, requested_at, members) \
                 VALUES (?1, ?2, ?3)",
            )
            .bind(id)
            .bind(now)
            .bind(members)
            .execute(&mut *self.0)
            .await?;
        }
        Ok(())
    }

    async fn claim_account_refreshes(
        &mut self,
        limit: usize,
    ) -> Result<Vec<QueuedRefresh>, sqlx::Error> {
        // One connection, one writer: nobody else can take them.
        sqlx::query_as(
            "SELECT position, account_id, members, after_profile_id, rescore \
             FROM account_refreshes \
             WHERE account_id IN (SELECT account_id FROM account_refreshes \
                                  ORDER BY position LIMIT ?1) \
             ORDER BY position",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *self.0)
        .await
    }

    async fn request_members_after(
        &mut self,
        id: &str,
        after: &str,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO account_refreshes \
               (account_id, requested_at, members, rescore, after_profile_id) \
             VALUES (?1, ?2, 1, 0, ?3)",
        )
        .bind(id)
        .bind(now)
        .bind(after)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn set_accounts_valid_until(
        &mut self,
        until: &[(&str, Option<OffsetDateTime>)],
    ) -> Result<(), sqlx::Error> {
        for (id, until) in until {
            sqlx::query("UPDATE accounts SET computed_valid_until = ?2 WHERE account_id = ?1")
                .bind(id)
                .bind(until)
                .execute(&mut *self.0)
                .await?;
        }
        Ok(())
    }

    async fn delete_account_refreshes(&mut self, positions: &[i64]) -> Result<(), sqlx::Error> {
        for position in positions {
            sqlx::query("DELETE FROM account_refreshes WHERE position = ?1")
                .bind(position)
                .execute(&mut *self.0)
                .await?;
        }
        Ok(())
    }

    async fn group_events(
        &mut self,
        account_id: &str,
    ) -> Result<Vec<(String, String, Option<String>)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT event_id, profile_id, content FROM applied_events \
             WHERE json_extract(content, '$.details.group_id') = ?1",
        )
        .bind(account_id)
        .fetch_all(&mut *self.0)
        .await
    }

    async fn live_after(
        &mut self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT profile_id FROM profiles \
             WHERE merged_into IS NULL AND (?1 IS NULL OR profile_id > ?1) \
             ORDER BY profile_id LIMIT ?2",
        )
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *self.0)
        .await
    }

    async fn deleted(&mut self, ids: &[String]) -> Result<HashSet<String>, sqlx::Error> {
        let ids = serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_owned());
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT profile_id FROM deleted_profiles \
             WHERE profile_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(ids)
        .fetch_all(&mut *self.0)
        .await?;
        Ok(rows.into_iter().collect())
    }

    async fn merged_into_any(&mut self, ids: &[String]) -> Result<Vec<String>, sqlx::Error> {
        let ids = serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_owned());
        sqlx::query_scalar(
            "SELECT profile_id FROM profiles \
             WHERE merged_into IN (SELECT value FROM json_each(?1))",
        )
        .bind(ids)
        .fetch_all(&mut *self.0)
        .await
    }

    async fn purge(&mut self, ids: &[String]) -> Result<u64, sqlx::Error> {
        let list = serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_owned());
        for statement in [
            "DELETE FROM profile_identifiers WHERE profile_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM applied_events WHERE profile_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM audience_members WHERE profile_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM profile_versions WHERE profile_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM profile_changes WHERE profile_id IN (SELECT value FROM json_each(?1))",
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .bind(&list)
                .execute(&mut *self.0)
                .await?;
        }
        let rows = sqlx::query(
            "DELETE FROM profiles WHERE profile_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(&list)
        .execute(&mut *self.0)
        .await?
        .rows_affected();
        Ok(rows)
    }

    async fn remember_deleted(
        &mut self,
        ids: &[String],
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        for id in ids {
            sqlx::query(
                "INSERT INTO deleted_profiles (profile_id, reason, deleted_at) \
                 VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(reason)
            .bind(now)
            .execute(&mut *self.0)
            .await?;
        }
        Ok(())
    }
}

/// Writes one profile's row.
async fn write_one(conn: &mut SqliteConnection, p: &Profile) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE profiles SET merged_into = ?2, traits = ?3, event_count = ?4, \
             first_seen = ?5, last_seen = ?6, activity_log2 = ?7, scores = ?8, \
             merged_profile_ids = ?9, version = ?10, updated_at = ?11, computed = ?12, \
             valid_until = ?13 \
         WHERE profile_id = ?1",
    )
    .bind(&p.profile_id)
    .bind(&p.merged_into)
    .bind(Json(&p.state.traits))
    .bind(p.state.event_count)
    .bind(p.state.first_seen)
    .bind(p.state.last_seen)
    .bind(p.state.activity_log2)
    .bind(Json(&p.scores))
    .bind(Json(&p.merged_profile_ids))
    .bind(p.version)
    .bind(p.updated_at)
    .bind(Json(&p.state.computed))
    .bind(p.valid_until)
    .execute(conn)
    .await?;
    Ok(())
}

fn profile(row: &SqliteRow) -> Result<Profile, sqlx::Error> {
    let Json(traits) = row.try_get("traits")?;
    let Json(scores) = row.try_get("scores")?;
    let Json(merged_profile_ids) = row.try_get("merged_profile_ids")?;
    let Json(computed) = row.try_get("computed")?;
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
            computed,
        },
        scores,
        merged_profile_ids,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        valid_until: row.try_get("valid_until")?,
    })
}

/// Microseconds since the epoch: how the SQLite store keeps event times, so they sort.
fn unix_micros(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

fn account(row: &SqliteRow) -> Result<Account, sqlx::Error> {
    let Json(traits) = row.try_get("traits")?;
    let Json(scores) = row.try_get("scores")?;
    Ok(Account {
        account_id: row.try_get("account_id")?,
        traits,
        scores,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
