//! The Postgres profile store: production. Lists are bound as arrays (`ANY`, `UNNEST`), so
//! every statement is static.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::types::Json;
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

/// Profiles in Postgres, in the service's schema.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    /// The computed traits and audiences kept up to date on every write.
    defs: std::sync::Arc<SharedDefinitions>,
    pool: PgPool,
}

impl PostgresStore {
    /// A store on `pool`, whose `search_path` is the profile schema.
    pub fn new(pool: PgPool) -> Self {
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
impl ProfileStore for PostgresStore {
    async fn apply(
        &self,
        batch: &Batch,
        half_life_seconds: f64,
        now: OffsetDateTime,
        scorer: &dyn Scorer,
    ) -> Result<Applied, ProfileError> {
        let mut tx = self.pool.begin().await?;
        let applied = super::apply(
            &mut PgOps(&mut tx),
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

    async fn get_resolved(
        &self,
        profile_ids: &[String],
    ) -> Result<HashMap<String, Profile>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        PgOps(&mut conn).live(profile_ids).await
    }

    async fn get_many(&self, profile_ids: &[String]) -> Result<Vec<Profile>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        super::get_many(&mut PgOps(&mut conn), profile_ids).await
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
            &mut PgOps(&mut tx),
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
        timeline_entries(self.timeline_rows(profile_ids, query).await?)
    }

    async fn sweep(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<(Vec<Profile>, Vec<MembershipChange>), ProfileError> {
        let mut tx = self.pool.begin().await?;
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT profile_id FROM profiles \
             WHERE valid_until <= $1 AND merged_into IS NULL \
             ORDER BY valid_until LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        if due.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut ops = PgOps(&mut tx);
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
        let rows: Vec<(
            String,
            i64,
            String,
            String,
            Json<serde_json::Value>,
            OffsetDateTime,
        )> = sqlx::query_as(
            "SELECT xid::text, seq, profile_id, kind, detail, at FROM profile_changes \
                 WHERE (xid, seq) > ($1::text::xid8, $2) \
                   AND xid < pg_snapshot_xmin(pg_current_snapshot()) \
                 ORDER BY xid, seq LIMIT $3",
        )
        .bind(after.xid.to_string())
        .bind(after.seq)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(xid, seq, profile_id, kind, Json(detail), at)| {
                let xid = xid
                    .parse()
                    .map_err(|_| ProfileError::Corrupt(format!("change {seq}: xid {xid}")))?;
                Ok(ProfileChange {
                    cursor: ChangeCursor { xid, seq },
                    profile_id,
                    kind,
                    detail,
                    at,
                })
            })
            .collect()
    }

    async fn change_horizon(&self) -> Result<ChangeCursor, ProfileError> {
        let last: Option<(String, i64)> = sqlx::query_as(
            "SELECT xid::text, seq FROM profile_changes \
             WHERE xid < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY xid DESC, seq DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(match last {
            Some((xid, seq)) => ChangeCursor {
                xid: xid
                    .parse()
                    .map_err(|_| ProfileError::Corrupt(format!("change {seq}: xid {xid}")))?,
                seq,
            },
            None => ChangeCursor::default(),
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
                 WHERE profile_id = $1 AND recorded_at <= $2 \
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
            "DELETE FROM profile_versions WHERE recorded_at < $1 AND EXISTS ( \
                 SELECT 1 FROM profile_versions n \
                 WHERE n.profile_id = profile_versions.profile_id \
                   AND n.version > profile_versions.version AND n.recorded_at < $1)",
        )
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64, ProfileError> {
        let done = sqlx::query("DELETE FROM profile_changes WHERE at < $1")
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
             WHERE audience = $1 AND ($2::text IS NULL OR profile_id > $2) \
             ORDER BY profile_id LIMIT $3",
        )
        .bind(audience)
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let total: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audience_members WHERE audience = $1")
                .bind(audience)
                .fetch_one(&self.pool)
                .await?;
        Ok((members, total))
    }

    async fn scan(&self, after: Option<&str>, limit: usize) -> Result<Vec<Profile>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        super::scan(&mut PgOps(&mut conn), after, limit).await
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
            &mut PgOps(&mut tx),
            &self.defs,
            live,
            component,
            reason,
            now,
        )
        .await?;
        if !deleted.profile_ids.is_empty() {
            // Owed until the cache took their tombstones, committed with the deletion so no
            // failure or crash after it loses them.
            sqlx::query(
                "INSERT INTO profile_cache_purges (profile_id, recorded_at) \
                 SELECT id, $2 FROM UNNEST($1::text[]) AS ids(id) \
                 ON CONFLICT (profile_id) DO NOTHING",
            )
            .bind(&deleted.profile_ids)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn start_recompute(&self, now: OffsetDateTime) -> Result<bool, ProfileError> {
        let mut tx = self.pool.begin().await?;
        let running = super::start_recompute(&mut PgOps(&mut tx), &self.defs, now).await?;
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
            &mut PgOps(&mut tx),
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
        Ok(sqlx::query_scalar(
            "WITH moved AS ( \
                 DELETE FROM account_refreshes WHERE account_id = ( \
                     SELECT account_id FROM account_refreshes \
                     ORDER BY position LIMIT 1 FOR UPDATE SKIP LOCKED) \
                 RETURNING account_id, members, rescore, after_profile_id) \
             INSERT INTO account_refreshes (account_id, requested_at, members, rescore, \
                                            after_profile_id) \
             SELECT account_id, $1, bool_or(members), bool_or(rescore), \
                    CASE WHEN bool_or(members AND after_profile_id IS NULL) THEN NULL \
                         ELSE min(after_profile_id COLLATE \"C\") FILTER (WHERE members) END \
             FROM moved GROUP BY account_id \
             RETURNING account_id",
        )
        .bind(now)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn account_computed(
        &self,
        account_id: &str,
        now: OffsetDateTime,
    ) -> Result<BTreeMap<String, crate::computed::ComputedValue>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        super::account_computed_of(&mut PgOps(&mut conn), &self.defs, account_id, now).await
    }

    async fn expire_accounts(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<String>, ProfileError> {
        // Cleared as it is queued, so it is queued once; the rescore stores the next time.
        // Members' person plans may read the values too: their refresh is queued with it.
        let members = self.defs.current().members_read_account_computed();
        Ok(sqlx::query_scalar(
            "WITH due AS ( \
                 UPDATE accounts SET computed_valid_until = NULL \
                 WHERE account_id IN ( \
                     SELECT account_id FROM accounts WHERE computed_valid_until <= $1 \
                     ORDER BY computed_valid_until LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING account_id) \
             INSERT INTO account_refreshes (account_id, requested_at, members) \
             SELECT account_id, $1, $3 FROM due ORDER BY account_id \
             RETURNING account_id",
        )
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(members)
        .fetch_all(&self.pool)
        .await?)
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
            &mut PgOps(&mut tx),
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
        Ok(PgOps(&mut conn).load_account(account_id).await?)
    }

    async fn account_members(&self, account_id: &str) -> Result<Vec<Member>, ProfileError> {
        let mut conn = self.pool.acquire().await?;
        super::account_members(&mut PgOps(&mut conn), account_id).await
    }

    async fn is_deleted(&self, profile_id: &str) -> Result<bool, ProfileError> {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM deleted_profiles WHERE profile_id = $1")
                .bind(profile_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.is_some())
    }

    async fn record_identifier_raise(&self, now: OffsetDateTime) -> Result<i64, ProfileError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO identifier_epoch_raises (recorded_at) VALUES ($1) RETURNING id",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn identifier_raise_due(&self, id: i64, now: OffsetDateTime) -> Result<(), ProfileError> {
        sqlx::query(
            "UPDATE identifier_epoch_raises SET written_at = $2 \
             WHERE id = $1 AND written_at IS NULL",
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
            "SELECT id, written_at IS NOT NULL OR recorded_at < $1 \
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
        sqlx::query("DELETE FROM identifier_epoch_raises WHERE id = ANY($1)")
            .bind(ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE identifier_epoch_floor SET epoch = GREATEST(epoch, $1)")
            .bind(epoch)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn owed_purges(&self, limit: usize) -> Result<Vec<String>, ProfileError> {
        Ok(sqlx::query_scalar(
            "SELECT profile_id FROM profile_cache_purges ORDER BY profile_id COLLATE \"C\" \
             LIMIT $1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn finish_purges(&self, profile_ids: &[String]) -> Result<(), ProfileError> {
        sqlx::query("DELETE FROM profile_cache_purges WHERE profile_id = ANY($1)")
            .bind(profile_ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

impl PostgresStore {
    async fn timeline_rows(
        &self,
        profile_ids: &[String],
        query: &TimelineQuery,
    ) -> Result<Vec<(String, String, OffsetDateTime, Option<String>)>, sqlx::Error> {
        let (before_time, before_id) = match &query.before {
            Some((time, id)) => (Some(*time), Some(id.as_str())),
            None => (None, None),
        };
        sqlx::query_as(
            "SELECT event_id, profile_id, occurred_at, content::text FROM applied_events \
             WHERE profile_id = ANY($1) AND occurred_at IS NOT NULL \
               AND (cardinality($2::text[]) = 0 OR content -> 'details' ->> 'type' = ANY($2)) \
               AND (cardinality($3::text[]) = 0 OR content -> 'details' ->> 'event' = ANY($3) \
                    OR content -> 'details' ->> 'name' = ANY($3)) \
               AND ($4::timestamptz IS NULL OR occurred_at >= $4) \
               AND ($5::timestamptz IS NULL OR occurred_at < $5) \
               AND ($6::timestamptz IS NULL OR (occurred_at, event_id) < ($6, $7::text)) \
             ORDER BY occurred_at DESC, event_id DESC LIMIT $8",
        )
        .bind(profile_ids)
        .bind(&query.types)
        .bind(&query.names)
        .bind(query.start)
        .bind(query.end)
        .bind(before_time)
        .bind(before_id)
        .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
    }
}

/// `chain (start_id, profile_id, merged_into, hops)`: each of the ids `$1` and the profiles its
/// merge chain leads through, at most `$2` hops; a row with `merged_into IS NULL` is the live
/// profile its start id resolves to.
macro_rules! merge_chains {
    () => {
        "WITH RECURSIVE chain (start_id, profile_id, merged_into, hops) AS ( \
             SELECT profile_id, profile_id, merged_into, 0::bigint \
             FROM profiles WHERE profile_id = ANY($1) \
           UNION ALL \
             SELECT c.start_id, p.profile_id, p.merged_into, c.hops + 1 \
             FROM chain c JOIN profiles p ON p.profile_id = c.merged_into \
             WHERE c.hops < $2 \
         )"
    };
}

/// The columns of `profiles` (aliased `p`) that [`profile`] reads.
macro_rules! profile_columns {
    () => {
        "p.profile_id, p.merged_into, p.traits, p.event_count, p.first_seen, p.last_seen, \
         p.activity_log2, p.scores, p.merged_profile_ids, p.version, p.created_at, \
         p.updated_at, p.computed, p.valid_until"
    };
}

/// Joins each row of `profiles` (aliased `p`) to its identifiers' types and values, as two
/// arrays in the same order (`i.identifier_types`, `i.identifier_values`; `NULL` when it has
/// none), which the select list names after `profile_columns!()`.
macro_rules! with_identifiers {
    () => {
        "CROSS JOIN LATERAL ( \
             SELECT array_agg(type) AS identifier_types, array_agg(value) AS identifier_values \
             FROM profile_identifiers WHERE profile_id = p.profile_id \
         ) i"
    };
}

/// The CTE that writes profile rows from the 13 arrays [`Rows::bind`] binds as `$1`–`$13`
/// (see [`Ops::write`]), as a literal for `concat!`.
macro_rules! write_rows {
    () => {
        "written AS ( \
       UPDATE profiles p SET merged_into = u.merged_into, traits = u.traits::json, \
           event_count = u.event_count, first_seen = u.first_seen, \
           last_seen = u.last_seen, activity_log2 = u.activity_log2, \
           scores = u.scores::json, \
           merged_profile_ids = ARRAY(SELECT json_array_elements_text(u.merged_ids::json)), \
           version = u.version, updated_at = u.updated_at, computed = u.computed::json, \
           valid_until = u.valid_until \
       FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::timestamptz[], \
                   $6::timestamptz[], $7::float8[], $8::text[], $9::text[], $10::int8[], \
                   $11::timestamptz[], $12::text[], $13::timestamptz[]) \
            AS u(profile_id, merged_into, traits, event_count, first_seen, last_seen, \
                 activity_log2, scores, merged_ids, version, updated_at, computed, \
                 valid_until) \
       WHERE p.profile_id = u.profile_id)"
    };
}

/// The CTEs that store audience entries and exits from the arrays [`membership_arrays`] makes
/// (bound as the parameters named, then the time), as a literal for `concat!`.
macro_rules! change_memberships {
    ($audiences:literal, $profiles:literal, $entered:literal, $now:literal) => {
        concat!(
            "c AS (SELECT * FROM UNNEST(",
            $audiences,
            "::text[], ",
            $profiles,
            "::text[], ",
            $entered,
            "::bool[]) AS c(audience, profile_id, entered)), \
             gone AS (DELETE FROM audience_members m USING c \
                      WHERE NOT c.entered AND m.audience = c.audience \
                        AND m.profile_id = c.profile_id), \
             joined AS (INSERT INTO audience_members (audience, profile_id, entered_at) \
                        SELECT audience, profile_id, ",
            $now,
            " FROM c WHERE entered \
                        ON CONFLICT DO NOTHING)"
        )
    };
}

/// The statement that appends to the change log from the arrays [`change_arrays`] makes
/// (bound as the parameters named, then the time), in their order, as a literal for
/// `concat!`.
macro_rules! log_changes {
    ($profiles:literal, $kinds:literal, $details:literal, $now:literal) => {
        concat!(
            "INSERT INTO profile_changes (profile_id, kind, detail, at) \
             SELECT p, k, d, ",
            $now,
            " FROM UNNEST(",
            $profiles,
            "::text[], ",
            $kinds,
            "::text[], ",
            $details,
            "::jsonb[]) WITH ORDINALITY AS x(p, k, d, n) ORDER BY n"
        )
    };
}

/// Audience entries and exits as arrays: audiences, profile ids, entered (or exited).
fn membership_arrays(changes: &[MembershipChange]) -> (Vec<&str>, Vec<&str>, Vec<bool>) {
    let (mut audiences, mut profiles, mut entered) = (Vec::new(), Vec::new(), Vec::new());
    for c in changes {
        audiences.push(c.audience.as_str());
        profiles.push(c.profile_id.as_str());
        entered.push(c.entered);
    }
    (audiences, profiles, entered)
}

/// Changes to log as arrays: profile ids, kinds, details.
fn change_arrays(
    changes: &[NewChange],
) -> (Vec<&str>, Vec<&'static str>, Vec<Json<&serde_json::Value>>) {
    let (mut profiles, mut kinds, mut details) = (Vec::new(), Vec::new(), Vec::new());
    for c in changes {
        profiles.push(c.profile_id.as_str());
        kinds.push(c.kind);
        details.push(Json(&c.detail));
    }
    (profiles, kinds, details)
}

/// Profile rows as the arrays [`write_rows`] takes, one element per profile. The merged ids
/// travel as JSON arrays because UNNEST cannot take an array of arrays of different lengths;
/// the JSON columns are `json`, sent as text, which Postgres only validates.
struct Rows<'a> {
    ids: Vec<&'a str>,
    merged_into: Vec<Option<&'a str>>,
    traits: Vec<String>,
    event_counts: Vec<i64>,
    first_seen: Vec<Option<OffsetDateTime>>,
    last_seen: Vec<Option<OffsetDateTime>>,
    activity: Vec<Option<f64>>,
    scores: Vec<String>,
    merged_ids: Vec<String>,
    versions: Vec<i64>,
    updated: Vec<OffsetDateTime>,
    computed: Vec<String>,
    valid_until: Vec<Option<OffsetDateTime>>,
}

impl<'a> Rows<'a> {
    fn of(profiles: &[&'a Profile]) -> Result<Self, sqlx::Error> {
        let n = profiles.len();
        let mut rows = Rows {
            ids: Vec::with_capacity(n),
            merged_into: Vec::with_capacity(n),
            traits: Vec::with_capacity(n),
            event_counts: Vec::with_capacity(n),
            first_seen: Vec::with_capacity(n),
            last_seen: Vec::with_capacity(n),
            activity: Vec::with_capacity(n),
            scores: Vec::with_capacity(n),
            merged_ids: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            updated: Vec::with_capacity(n),
            computed: Vec::with_capacity(n),
            valid_until: Vec::with_capacity(n),
        };
        for p in profiles {
            rows.ids.push(p.profile_id.as_str());
            rows.merged_into.push(p.merged_into.as_deref());
            rows.traits.push(json_text(&p.state.traits)?);
            rows.event_counts.push(p.state.event_count);
            rows.first_seen.push(p.state.first_seen);
            rows.last_seen.push(p.state.last_seen);
            rows.activity.push(p.state.activity_log2);
            rows.scores.push(json_text(&p.scores)?);
            rows.merged_ids.push(json_text(&p.merged_profile_ids)?);
            rows.versions.push(p.version);
            rows.updated.push(p.updated_at);
            rows.computed.push(json_text(&p.state.computed)?);
            rows.valid_until.push(p.valid_until);
        }
        Ok(rows)
    }

    /// Binds the arrays as `$1`–`$13` of `query`.
    fn bind(
        self,
        query: sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.ids)
            .bind(self.merged_into)
            .bind(self.traits)
            .bind(self.event_counts)
            .bind(self.first_seen)
            .bind(self.last_seen)
            .bind(self.activity)
            .bind(self.scores)
            .bind(self.merged_ids)
            .bind(self.versions)
            .bind(self.updated)
            .bind(self.computed)
            .bind(self.valid_until)
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
             SELECT id, $2, $2 FROM UNNEST($1::text[]) AS t(id) \
             WHERE NOT EXISTS (SELECT 1 FROM deleted_profiles d WHERE d.profile_id = t.id) \
             ORDER BY id \
             ON CONFLICT (profile_id) DO NOTHING",
        )
        .bind(ids)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn resolve(&mut self, ids: &[String]) -> Result<HashMap<String, String>, sqlx::Error> {
        let rows = sqlx::query(concat!(
            merge_chains!(),
            " SELECT start_id, profile_id FROM chain WHERE merged_into IS NULL",
        ))
        .bind(ids)
        .bind(super::MAX_MERGE_HOPS)
        .fetch_all(&mut *self.0)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("start_id")?, r.try_get("profile_id")?)))
            .collect()
    }

    async fn live(&mut self, ids: &[String]) -> Result<HashMap<String, Profile>, ProfileError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        // One statement, so one snapshot: the chains, the rows and their identifiers agree, and
        // no profile can be merged away between reading its chain and its row.
        let rows = sqlx::query(concat!(
            merge_chains!(),
            " SELECT c.start_id, ",
            profile_columns!(),
            ", i.identifier_types, i.identifier_values \
             FROM chain c JOIN profiles p ON p.profile_id = c.profile_id ",
            with_identifiers!(),
            " WHERE c.merged_into IS NULL",
        ))
        .bind(ids)
        .bind(super::MAX_MERGE_HOPS)
        .fetch_all(&mut *self.0)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("start_id")?, profile_with_identifiers(row)?)))
            .collect()
    }

    async fn load(&mut self, ids: &[String], lock: bool) -> Result<Vec<Profile>, sqlx::Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        if !lock {
            // One statement: the rows and their identifiers from one snapshot.
            let rows = sqlx::query(concat!(
                "SELECT ",
                profile_columns!(),
                ", i.identifier_types, i.identifier_values FROM profiles p ",
                with_identifiers!(),
                " WHERE p.profile_id = ANY($1) ORDER BY p.profile_id",
            ))
            .bind(ids)
            .fetch_all(&mut *self.0)
            .await?;
            return rows.iter().map(profile_with_identifiers).collect();
        }
        let rows = sqlx::query(concat!(
            "SELECT ",
            profile_columns!(),
            " FROM profiles p WHERE p.profile_id = ANY($1) ORDER BY p.profile_id FOR UPDATE",
        ))
        .bind(ids)
        .fetch_all(&mut *self.0)
        .await?;
        let mut profiles = rows.iter().map(profile).collect::<Result<Vec<_>, _>>()?;
        // Read after the rows, not joined to them: a row locked after waiting for a concurrent
        // writer is its newest version, which a join's subquery (on the statement's snapshot)
        // would not see the identifiers of; read after, identifiers are at least as new as the
        // rows they join.
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

    fn as_stored(&self, profile: &mut Profile) {
        stored_form(profile);
    }

    async fn record_events(
        &mut self,
        events: &[Recorded<'_>],
        now: OffsetDateTime,
    ) -> Result<HashSet<String>, sqlx::Error> {
        if events.is_empty() {
            return Ok(HashSet::new());
        }
        let mut event_ids = Vec::with_capacity(events.len());
        let mut profile_ids = Vec::with_capacity(events.len());
        let mut contents = Vec::with_capacity(events.len());
        let mut times = Vec::with_capacity(events.len());
        for event in events {
            event_ids.push(event.event_id);
            profile_ids.push(event.profile_id);
            contents.push(event.content.as_str());
            times.push(event.occurred_at);
        }
        let rows = sqlx::query(
            "INSERT INTO applied_events (event_id, profile_id, applied_at, content, occurred_at) \
             SELECT e, p, $3, c::jsonb, o \
             FROM UNNEST($1::text[], $2::text[], $4::text[], $5::timestamptz[]) AS t(e, p, c, o) \
             ON CONFLICT (event_id) DO NOTHING \
             RETURNING event_id",
        )
        .bind(event_ids)
        .bind(profile_ids)
        .bind(now)
        .bind(contents)
        .bind(times)
        .fetch_all(&mut *self.0)
        .await?;
        rows.iter().map(|r| r.try_get("event_id")).collect()
    }

    async fn load_events(
        &mut self,
        profile_ids: &[String],
    ) -> Result<Vec<(String, String, Option<String>)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT event_id, profile_id, content::text FROM applied_events \
             WHERE profile_id = ANY($1) ORDER BY event_id",
        )
        .bind(profile_ids)
        .fetch_all(&mut *self.0)
        .await
    }

    async fn delete_events(&mut self, event_ids: &[&str]) -> Result<(), sqlx::Error> {
        if event_ids.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM applied_events WHERE event_id = ANY($1)")
            .bind(event_ids)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn move_events(&mut self, moves: &[(&str, &str, String)]) -> Result<(), sqlx::Error> {
        if moves.is_empty() {
            return Ok(());
        }
        let mut event_ids = Vec::with_capacity(moves.len());
        let mut profile_ids = Vec::with_capacity(moves.len());
        let mut contents = Vec::with_capacity(moves.len());
        for (event_id, profile_id, content) in moves {
            event_ids.push(*event_id);
            profile_ids.push(*profile_id);
            contents.push(content.as_str());
        }
        sqlx::query(
            "UPDATE applied_events a SET profile_id = m.p, content = m.c::jsonb \
             FROM UNNEST($1::text[], $2::text[], $3::text[]) AS m(e, p, c) \
             WHERE a.event_id = m.e",
        )
        .bind(event_ids)
        .bind(profile_ids)
        .bind(contents)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn replace_identifiers(
        &mut self,
        members: &[String],
        links: &[(&str, &Identifier)],
    ) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM profile_identifiers WHERE profile_id = ANY($1)")
            .bind(members)
            .execute(&mut *self.0)
            .await?;
        self.link(links).await?;
        Ok(())
    }

    async fn write(&mut self, profiles: &[&Profile]) -> Result<(), sqlx::Error> {
        if profiles.is_empty() {
            return Ok(());
        }
        // One statement for the whole batch.
        Rows::of(profiles)?
            .bind(sqlx::query(concat!("WITH ", write_rows!(), " SELECT 1")))
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn write_logged(
        &mut self,
        profiles: &[&Profile],
        memberships: &[MembershipChange],
        changes: &[NewChange],
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        if profiles.is_empty() && memberships.is_empty() && changes.is_empty() {
            return Ok(());
        }
        // One statement: the three touch different tables, and each part of an empty array
        // does nothing.
        let (audiences, members, entered) = membership_arrays(memberships);
        let (changed, kinds, details) = change_arrays(changes);
        Rows::of(profiles)?
            .bind(sqlx::query(concat!(
                "WITH ",
                write_rows!(),
                ", ",
                change_memberships!("$14", "$15", "$16", "$17"),
                " ",
                log_changes!("$18", "$19", "$20", "$17")
            )))
            .bind(audiences)
            .bind(members)
            .bind(entered)
            .bind(now)
            .bind(changed)
            .bind(kinds)
            .bind(details)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn redirect(&mut self, redirects: &[(&str, &str)]) -> Result<(), sqlx::Error> {
        if redirects.is_empty() {
            return Ok(());
        }
        let (merged, survivors): (Vec<&str>, Vec<&str>) = redirects.iter().copied().unzip();
        // One statement for the batch (it was two per merge): the two tables are disjoint, and
        // each row matches one redirect at most (a merged id is merged once per batch).
        sqlx::query(
            "WITH r AS (SELECT * FROM UNNEST($1::text[], $2::text[]) AS r(merged, survivor)), \
                  moved AS (UPDATE profile_identifiers i SET profile_id = r.survivor \
                            FROM r WHERE i.profile_id = r.merged) \
             UPDATE profiles p SET merged_into = r.survivor FROM r WHERE p.merged_into = r.merged",
        )
        .bind(merged)
        .bind(survivors)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn memberships(
        &mut self,
        profile_ids: &[String],
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT profile_id, audience FROM audience_members WHERE profile_id = ANY($1)",
        )
        .bind(profile_ids)
        .fetch_all(&mut *self.0)
        .await
    }

    async fn change_memberships(
        &mut self,
        changes: &[MembershipChange],
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        if changes.is_empty() {
            return Ok(());
        }
        let (audiences, profiles, entered) = membership_arrays(changes);
        sqlx::query(concat!(
            "WITH ",
            change_memberships!("$1", "$2", "$3", "$4"),
            " SELECT 1"
        ))
        .bind(audiences)
        .bind(profiles)
        .bind(entered)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn record_versions(
        &mut self,
        versions: &[Version],
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        if versions.is_empty() {
            return Ok(());
        }
        let (mut ids, mut numbers, mut merged, mut bodies) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for v in versions {
            ids.push(v.profile_id.as_str());
            numbers.push(v.version);
            merged.push(v.merged_into.as_deref());
            bodies.push(v.body.as_deref());
        }
        sqlx::query(
            "INSERT INTO profile_versions (profile_id, version, recorded_at, merged_into, body) \
             SELECT p, v, $5, m, b FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::bytea[]) \
             AS t(p, v, m, b) ON CONFLICT DO NOTHING",
        )
        .bind(ids)
        .bind(numbers)
        .bind(merged)
        .bind(bodies)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn log_changes(
        &mut self,
        changes: &[NewChange],
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        if changes.is_empty() {
            return Ok(());
        }
        let (profiles, kinds, details) = change_arrays(changes);
        sqlx::query(log_changes!("$1", "$2", "$3", "$4"))
            .bind(profiles)
            .bind(kinds)
            .bind(details)
            .bind(now)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn link(&mut self, links: &[(&str, &Identifier)]) -> Result<u64, sqlx::Error> {
        if links.is_empty() {
            return Ok(0);
        }
        let mut types = Vec::with_capacity(links.len());
        let mut values = Vec::with_capacity(links.len());
        let mut profile_ids = Vec::with_capacity(links.len());
        for (profile_id, id) in links {
            types.push(id.kind.as_str());
            values.push(id.value.as_str());
            profile_ids.push(*profile_id);
        }
        let done = sqlx::query(
            "INSERT INTO profile_identifiers (type, value, profile_id) \
             SELECT t, v, p FROM UNNEST($1::text[], $2::text[], $3::text[]) AS x(t, v, p) \
             ON CONFLICT (type, value) DO NOTHING",
        )
        .bind(types)
        .bind(values)
        .bind(profile_ids)
        .execute(&mut *self.0)
        .await?;
        Ok(done.rows_affected())
    }

    async fn recompute_state(
        &mut self,
        lock: bool,
    ) -> Result<Option<(String, Option<String>)>, sqlx::Error> {
        if lock {
            // The row may not exist yet: a transaction-scoped advisory lock serializes the
            // replicas that would insert it.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tessera.profile.recompute'))")
                .execute(&mut *self.0)
                .await?;
        }
        sqlx::query_as("SELECT fingerprint, cursor FROM recompute_state WHERE id = 1")
            .fetch_optional(&mut *self.0)
            .await
    }

    async fn definitions_revision(&mut self) -> Result<i64, sqlx::Error> {
        crate::definitions::store::pg_revision(self.0).await
    }

    async fn stored_definitions(&mut self) -> Result<(i64, Vec<StoredDefinition>), sqlx::Error> {
        crate::definitions::store::pg_snapshot(self.0).await
    }

    async fn set_recompute_state(
        &mut self,
        fingerprint: &str,
        cursor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO recompute_state (id, fingerprint, cursor, started_at, updated_at) \
             VALUES (1, $1, $2, $3, $3) \
             ON CONFLICT (id) DO UPDATE SET fingerprint = $1, cursor = $2, updated_at = $3, \
               started_at = CASE WHEN recompute_state.fingerprint = $1 \
                                 THEN recompute_state.started_at ELSE $3 END",
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
        sqlx::query(
            "INSERT INTO accounts (account_id, created_at, updated_at) \
             SELECT id, $2, $2 FROM UNNEST($1::text[]) AS t(id) ORDER BY id \
             ON CONFLICT (account_id) DO NOTHING",
        )
        .bind(ids)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        let rows = sqlx::query(
            "SELECT account_id, traits, scores, version, created_at, updated_at FROM accounts \
             WHERE account_id = ANY($1) ORDER BY account_id FOR UPDATE",
        )
        .bind(ids)
        .fetch_all(&mut *self.0)
        .await?;
        rows.iter().map(account).collect()
    }

    async fn write_accounts(&mut self, accounts: &[&Account]) -> Result<(), sqlx::Error> {
        let (mut ids, mut traits, mut versions) = (Vec::new(), Vec::new(), Vec::new());
        let (mut scores, mut updated) = (Vec::new(), Vec::new());
        for a in accounts {
            ids.push(a.account_id.as_str());
            traits.push(serde_json::to_string(&a.traits).unwrap_or_else(|_| "{}".to_owned()));
            scores.push(serde_json::to_string(&a.scores).unwrap_or_else(|_| "{}".to_owned()));
            versions.push(a.version);
            updated.push(a.updated_at);
        }
        sqlx::query(
            "UPDATE accounts AS a SET traits = u.t::jsonb, scores = u.s::jsonb, version = u.v, \
               updated_at = u.at \
             FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::timestamptz[], $5::text[]) \
               AS u (id, t, v, at, s) \
             WHERE a.account_id = u.id",
        )
        .bind(ids)
        .bind(traits)
        .bind(versions)
        .bind(updated)
        .bind(scores)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn load_account(&mut self, id: &str) -> Result<Option<Account>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT account_id, traits, scores, version, created_at, updated_at FROM accounts \
             WHERE account_id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *self.0)
        .await?;
        row.as_ref().map(account).transpose()
    }

    async fn load_accounts(&mut self, ids: &[String]) -> Result<Vec<Account>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT account_id, traits, scores, version, created_at, updated_at FROM accounts \
             WHERE account_id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&mut *self.0)
        .await?;
        rows.iter().map(account).collect()
    }

    async fn request_account_refreshes(
        &mut self,
        ids: &[&str],
        members: bool,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO account_refreshes (account_id, requested_at, members) \
             SELECT id, $2, $3 FROM UNNEST($1::text[]) AS u (id)",
        )
        .bind(ids)
        .bind(now)
        .bind(members)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn claim_account_refreshes(
        &mut self,
        limit: usize,
    ) -> Result<Vec<QueuedRefresh>, sqlx::Error> {
        // Every queued row of the accounts taken: a burst of events of one account's members
        // is one refresh. The accounts are the oldest whose rows no other replica holds, so
        // replicas refresh different accounts side by side.
        sqlx::query_as(
            "SELECT position, account_id, members, after_profile_id, rescore \
             FROM account_refreshes \
             WHERE account_id IN (SELECT account_id FROM account_refreshes \
                                  ORDER BY position LIMIT $1 FOR UPDATE SKIP LOCKED) \
             ORDER BY position FOR UPDATE SKIP LOCKED",
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
             VALUES ($1, $2, true, false, $3)",
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
        let (ids, times): (Vec<&str>, Vec<Option<OffsetDateTime>>) = until.iter().copied().unzip();
        sqlx::query(
            "UPDATE accounts AS a SET computed_valid_until = u.until \
             FROM UNNEST($1::text[], $2::timestamptz[]) AS u (id, until) \
             WHERE a.account_id = u.id",
        )
        .bind(ids)
        .bind(times)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn delete_account_refreshes(&mut self, positions: &[i64]) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM account_refreshes WHERE position = ANY($1)")
            .bind(positions)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn group_events(
        &mut self,
        account_id: &str,
    ) -> Result<Vec<(String, String, Option<String>)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT event_id, profile_id, content::text FROM applied_events \
             WHERE content -> 'details' ->> 'group_id' = $1",
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
             WHERE merged_into IS NULL AND ($1::text IS NULL OR profile_id > $1) \
             ORDER BY profile_id LIMIT $2",
        )
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *self.0)
        .await
    }

    async fn deleted(&mut self, ids: &[String]) -> Result<HashSet<String>, sqlx::Error> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT profile_id FROM deleted_profiles WHERE profile_id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&mut *self.0)
        .await?;
        Ok(rows.into_iter().collect())
    }

    async fn merged_into_any(&mut self, ids: &[String]) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT profile_id FROM profiles WHERE merged_into = ANY($1)")
            .bind(ids)
            .fetch_all(&mut *self.0)
            .await
    }

    async fn purge(&mut self, ids: &[String]) -> Result<u64, sqlx::Error> {
        for statement in [
            "DELETE FROM profile_identifiers WHERE profile_id = ANY($1)",
            "DELETE FROM applied_events WHERE profile_id = ANY($1)",
            "DELETE FROM audience_members WHERE profile_id = ANY($1)",
            "DELETE FROM profile_versions WHERE profile_id = ANY($1)",
            "DELETE FROM profile_changes WHERE profile_id = ANY($1)",
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .bind(ids)
                .execute(&mut *self.0)
                .await?;
        }
        let rows = sqlx::query("DELETE FROM profiles WHERE profile_id = ANY($1)")
            .bind(ids)
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
        sqlx::query(
            "INSERT INTO deleted_profiles (profile_id, reason, deleted_at) \
             SELECT id, $2, $3 FROM UNNEST($1::text[]) AS t(id) ON CONFLICT DO NOTHING",
        )
        .bind(ids)
        .bind(reason)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }
}

/// Makes `p` what a read of its row returns once written: times to the microsecond, as sqlx
/// sends them ([`stored_time`]). Every other column reads back as written (the JSON columns
/// are `json`, which keeps the text, and JSON text parses back bit for bit with
/// `float_roundtrip`; `float8`, `text[]` and integers are exact).
fn stored_form(p: &mut Profile) {
    for t in [&mut p.created_at, &mut p.updated_at] {
        *t = stored_time(*t);
    }
    let state = &mut p.state;
    for t in [
        &mut state.first_seen,
        &mut state.last_seen,
        &mut p.valid_until,
    ]
    .into_iter()
    .flatten()
    {
        *t = stored_time(*t);
    }
}

/// `t` as a `timestamptz` keeps it: sqlx sends whole microseconds since 2000-01-01,
/// truncated toward that epoch.
fn stored_time(t: OffsetDateTime) -> OffsetDateTime {
    const EPOCH: OffsetDateTime = time::macros::datetime!(2000-01-01 0:00 UTC);
    if t.nanosecond().is_multiple_of(1_000) {
        return t;
    }
    i64::try_from((t - EPOCH).whole_microseconds())
        .map_or(t, |us| EPOCH + time::Duration::microseconds(us))
}

/// `value` as JSON text, for a `json` column.
fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, sqlx::Error> {
    serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

fn profile(row: &PgRow) -> Result<Profile, sqlx::Error> {
    let Json(traits) = row.try_get("traits")?;
    let Json(scores) = row.try_get("scores")?;
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
        merged_profile_ids: row.try_get("merged_profile_ids")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        valid_until: row.try_get("valid_until")?,
    })
}

/// A row read with `profile_columns!()` and `with_identifiers!()`: the profile with its
/// identifiers.
fn profile_with_identifiers(row: &PgRow) -> Result<Profile, sqlx::Error> {
    let mut profile = profile(row)?;
    let types: Option<Vec<String>> = row.try_get("identifier_types")?;
    let values: Option<Vec<String>> = row.try_get("identifier_values")?;
    profile.state.identifiers.extend(
        types
            .unwrap_or_default()
            .into_iter()
            .zip(values.unwrap_or_default())
            .map(|(kind, value)| Identifier::new(kind, value)),
    );
    Ok(profile)
}

fn account(row: &PgRow) -> Result<Account, sqlx::Error> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::computed::{Acc, Entry};
    use crate::domain::TraitValue;
    use serde_json::json;
    use time::macros::datetime;

    #[test]
    fn times_are_kept_to_the_microsecond_as_sqlx_sends_them() {
        let t = datetime!(2026-06-01 00:00:00.123456789 UTC);
        assert_eq!(stored_time(t), datetime!(2026-06-01 00:00:00.123456 UTC));
        // Truncated toward 2000-01-01: up before it.
        let t = datetime!(1999-12-31 23:59:59.999999999 UTC);
        assert_eq!(stored_time(t), datetime!(2000-01-01 0:00 UTC));
        let t = datetime!(1999-12-31 23:59:58.000001999 UTC);
        assert_eq!(stored_time(t), datetime!(1999-12-31 23:59:58.000002 UTC));
        let t = datetime!(2026-06-01 00:00:00.5 +02:00);
        assert_eq!(stored_time(t), t);
    }

    #[test]
    fn a_profile_is_stored_with_its_times_and_numbers_as_read() {
        let now = datetime!(2026-06-01 00:00:00.000000999 UTC);
        let mut p = Profile::empty("p1", now);
        p.state.first_seen = Some(now);
        p.valid_until = Some(now);
        p.state.traits.insert(
            "ns".to_owned(),
            TraitValue {
                value: json!(1e17),
                observed_at: now,
                event_id: "e1".to_owned(),
            },
        );
        let entry = Entry {
            at: now,
            event_id: "e1".to_owned(),
            value: json!([2e16]),
        };
        p.state
            .computed
            .0
            .insert("last".to_owned(), Acc::Last(entry.clone()));
        p.state.computed.0.insert(
            "window".to_owned(),
            Acc::Window {
                entries: vec![entry],
            },
        );
        stored_form(&mut p);
        let micro = datetime!(2026-06-01 00:00:00 UTC);
        assert_eq!((p.created_at, p.updated_at), (micro, micro));
        assert_eq!(
            (p.state.first_seen, p.state.last_seen, p.valid_until),
            (Some(micro), None, Some(micro))
        );
        // The JSON columns keep the text: doubles read back as doubles.
        assert!(p.state.traits["ns"].value.is_f64());
        // Inside JSON, times are RFC 3339 text to the nanosecond: kept.
        assert_eq!(p.state.traits["ns"].observed_at, now);
        let Some(Acc::Last(last)) = p.state.computed.0.get("last") else {
            panic!("a last accumulator");
        };
        assert!(last.value[0].is_f64() && last.at == now);
        let Some(Acc::Window { entries }) = p.state.computed.0.get("window") else {
            panic!("a window accumulator");
        };
        assert!(entries[0].value[0].is_f64());
    }
}
