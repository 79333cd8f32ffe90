//! Probabilistic matching's storage on Postgres.

use std::collections::HashMap;
use std::time::Duration;

use tessera_core::Identifier;
use time::OffsetDateTime;
use uuid::Uuid;

use sqlx::postgres::PgConnection;

use super::{CANONICAL_SQL, Failure, LIMITED_SQL, OwnerCache, PgStore, write};
use crate::IdentityError;
use crate::domain::{GraphView, Merge, Plan, ProfileAge, plan_merges};
use crate::matching::{BatchJob, BatchJobState, BatchProgress, JOB_LEASE_EXPIRED};
use crate::store::{
    IndexEntry, MatchStore, Outboxed, StoredModel, StoredSuggestion, VersionedRules, now, ordered,
};

/// How often a merge whose profiles were merged meanwhile is tried again.
const MAX_ATTEMPTS: u32 = 8;

type SuggestionRow = (i64, Uuid, Uuid, String, String, OffsetDateTime);

fn suggestion(
    (id, profile_a, profile_b, explanation, status, created_at): SuggestionRow,
) -> StoredSuggestion {
    StoredSuggestion {
        id,
        profile_a,
        profile_b,
        explanation,
        status,
        created_at,
    }
}

/// Selects suggestions: the columns of [`SuggestionRow`], then the rest of the statement.
macro_rules! suggestion_sql {
    ($rest:literal) => {
        concat!(
            "SELECT suggestion_id, profile_a, profile_b, explanation::text, status, created_at \
             FROM match_suggestions ",
            $rest
        )
    };
}

/// Merges `pairs` in order within the caller's transaction, set-based: the canonical profiles
/// of every pair are read and locked (`FOR UPDATE`, in id order) with one statement each, what
/// they hold of limited types and the splits between them read once, the merges decided in
/// memory ([`plan_merges`]: the same outcome per pair as merging them one by one) and written
/// with array statements.
async fn merge_all(
    tx: &mut PgConnection,
    owners: Option<&OwnerCache>,
    rules: &VersionedRules,
    pairs: &[((Uuid, Uuid), Option<String>)],
    cause: &str,
    rule: &str,
) -> Result<(Vec<Result<Merge, String>>, Plan), Failure> {
    let mut ids: Vec<Uuid> = pairs.iter().flat_map(|((a, b), _)| [*a, *b]).collect();
    ids.sort_unstable();
    ids.dedup();
    // Locks taken in this transaction hold; a profile merged by someone else between the read
    // and the lock shows once locked, and the read is repeated.
    let mut settled = None;
    for _ in 0..MAX_ATTEMPTS {
        let canonical: HashMap<Uuid, Uuid> = sqlx::query_as(CANONICAL_SQL)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        let mut roots: Vec<Uuid> = canonical.values().copied().collect();
        roots.sort_unstable();
        roots.dedup();
        let locked: Vec<(Uuid, OffsetDateTime, bool)> = sqlx::query_as(
            "SELECT profile_id, created_at, merged_into IS NULL FROM profiles \
             WHERE profile_id = ANY($1) ORDER BY profile_id FOR UPDATE",
        )
        .bind(&roots)
        .fetch_all(&mut *tx)
        .await?;
        if locked.len() == roots.len() && locked.iter().all(|(_, _, canonical)| *canonical) {
            settled = Some((canonical, roots, locked));
            break;
        }
    }
    let Some((canonical, roots, locked)) = settled else {
        return Err(Failure::Retry("profile merged meanwhile"));
    };
    let mut view = GraphView::new();
    let mut ages: HashMap<Uuid, ProfileAge> = HashMap::with_capacity(locked.len());
    for (id, created_at, _) in locked {
        let age = ProfileAge { created_at, id };
        view.insert_profile(age);
        ages.insert(id, age);
    }
    let limited_types: Vec<&str> = rules.rules.limited_types().collect();
    let limited: Vec<(Uuid, String, String, OffsetDateTime)> = sqlx::query_as(LIMITED_SQL)
        .bind(&roots)
        .bind(&limited_types)
        .fetch_all(&mut *tx)
        .await?;
    for (root, kind, value, linked_at) in limited {
        view.insert_limited(root, Identifier { kind, value }, linked_at);
    }
    super::load_splits(&mut *tx, &roots, &mut view).await?;
    // Pairs with an unknown profile are answered without planning; the others keep their order.
    let age = |id: &Uuid| canonical.get(id).and_then(|root| ages.get(root)).copied();
    let mut known = Vec::with_capacity(pairs.len());
    let mut unknown = Vec::with_capacity(pairs.len());
    for ((a, b), detail) in pairs {
        match (age(a), age(b)) {
            (Some(a), Some(b)) => {
                known.push(((a, b), detail.clone()));
                unknown.push(false);
            }
            _ => unknown.push(true),
        }
    }
    let now = now();
    let (plan, planned) = plan_merges(&rules.rules, view, known, cause, rule, now);
    write(&mut *tx, &plan, rules.version, now).await?;
    let merged: Vec<Uuid> = plan.merges.iter().map(|m| m.merged_profile_id).collect();
    super::owners::forget_merged(&mut *tx, owners, &merged).await?;
    if !plan.merges.is_empty() {
        let n = plan.merges.len();
        let (mut surviving, mut merged, mut causes, mut rules, mut times) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for m in &plan.merges {
            surviving.push(m.surviving_profile_id);
            merged.push(m.merged_profile_id);
            causes.push(m.cause_event_id.as_str());
            rules.push(m.rule.as_str());
            times.push(m.merged_at);
        }
        sqlx::query(
            "INSERT INTO merge_outbox (surviving_profile_id, merged_profile_id, cause, rule, merged_at) \
             SELECT s, m, c, r, t \
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[]) \
             WITH ORDINALITY AS u (s, m, c, r, t, n) ORDER BY n",
        )
        .bind(surviving)
        .bind(merged)
        .bind(causes)
        .bind(rules)
        .bind(times)
        .execute(&mut *tx)
        .await?;
    }
    let mut planned = planned.into_iter();
    let results = unknown
        .into_iter()
        .map(|unknown| {
            if unknown {
                Err("unknown_profile".to_owned())
            } else {
                planned
                    .next()
                    .unwrap_or_else(|| Err("nothing_to_merge".to_owned()))
            }
        })
        .collect();
    Ok((results, plan))
}

type JobRow = (
    i64,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    String,
    OffsetDateTime,
    OffsetDateTime,
    Option<OffsetDateTime>,
);

/// Selects batch match jobs: the columns of [`JobRow`], then the rest of the statement.
macro_rules! job_sql {
    ($rest:literal) => {
        concat!(
            "SELECT job_id, state, model_version, profiles, candidate_pairs, pairs_done, merges, \
                    suggestions, refused, error, started_at, updated_at, finished_at \
             FROM batch_match_jobs ",
            $rest
        )
    };
}

fn job(row: JobRow) -> Result<BatchJob, IdentityError> {
    let (
        id,
        state,
        model_version,
        profiles,
        candidate_pairs,
        pairs_done,
        merges,
        suggestions,
        refused,
        error,
        started_at,
        updated_at,
        finished_at,
    ) = row;
    Ok(BatchJob {
        id,
        state: BatchJobState::parse(&state)?,
        progress: BatchProgress {
            model_version,
            profiles,
            candidate_pairs,
            pairs_done,
            merges,
            suggestions,
            refused,
        },
        error,
        started_at,
        updated_at,
        finished_at,
    })
}

/// Marks the running job whose lease expired before `at` as failed.
async fn expire_jobs(conn: &mut PgConnection, at: OffsetDateTime) -> Result<(), IdentityError> {
    let expired = sqlx::query(
        "UPDATE batch_match_jobs \
         SET state = 'failed', error = $1, updated_at = $2, finished_at = $2 \
         WHERE state = 'running' AND lease_until < $2",
    )
    .bind(JOB_LEASE_EXPIRED)
    .bind(at)
    .execute(&mut *conn)
    .await?;
    if expired.rows_affected() > 0 {
        tracing::warn!("a batch match job's lease expired, marked failed");
    }
    Ok(())
}

impl PgStore {
    pub(crate) async fn start_job(
        &self,
        owner: &str,
        lease: Duration,
    ) -> Result<Result<BatchJob, BatchJob>, IdentityError> {
        // The running job may end between the refused insert and the read: try again then.
        for _ in 0..3 {
            let mut conn = self.pool.acquire().await?;
            let at = now();
            expire_jobs(&mut conn, at).await?;
            let started: Option<JobRow> = sqlx::query_as(
                "INSERT INTO batch_match_jobs (state, owner, lease_until, started_at, updated_at) \
                 VALUES ('running', $1, $2, $3, $3) \
                 ON CONFLICT (state) WHERE state = 'running' DO NOTHING \
                 RETURNING job_id, state, model_version, profiles, candidate_pairs, pairs_done, \
                           merges, suggestions, refused, error, started_at, updated_at, \
                           finished_at",
            )
            .bind(owner)
            .bind(at + lease)
            .bind(at)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(row) = started {
                return Ok(Ok(job(row)?));
            }
            let running: Option<JobRow> = sqlx::query_as(job_sql!("WHERE state = 'running'"))
                .fetch_optional(&mut *conn)
                .await?;
            if let Some(row) = running {
                return Ok(Err(job(row)?));
            }
        }
        Err(IdentityError::Contended)
    }
}

#[async_trait::async_trait]
impl MatchStore for PgStore {
    async fn index(
        &self,
        entries: &[IndexEntry],
        model_version: Option<i64>,
    ) -> Result<Vec<Uuid>, IdentityError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let profiles: Vec<Uuid> = entries.iter().map(|e| e.profile_id).collect();
        let attributes: Vec<&str> = entries.iter().map(|e| e.attributes.as_str()).collect();
        let now = now();
        let mut tx = self.pool.begin().await?;
        // Only new or changed attributes are written; their profiles are the ones returned.
        let changed: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO match_attributes AS m (profile_id, attributes, updated_at) \
             SELECT p, a::jsonb, $3 FROM unnest($1::uuid[], $2::text[]) AS u (p, a) \
             ON CONFLICT (profile_id) DO UPDATE \
             SET attributes = EXCLUDED.attributes, updated_at = EXCLUDED.updated_at, \
                 matched_version = NULL \
             WHERE m.attributes IS DISTINCT FROM EXCLUDED.attributes \
             RETURNING m.profile_id",
        )
        .bind(&profiles)
        .bind(&attributes)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        if !changed.is_empty() {
            let (mut keys, mut owners) = (Vec::new(), Vec::new());
            for e in entries.iter().filter(|e| changed.contains(&e.profile_id)) {
                for key in &e.keys {
                    keys.push(key.as_str());
                    owners.push(e.profile_id);
                }
            }
            sqlx::query("DELETE FROM match_keys WHERE profile_id = ANY($1)")
                .bind(&changed)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO match_keys (key, profile_id) \
                 SELECT * FROM unnest($1::text[], $2::uuid[]) ON CONFLICT DO NOTHING",
            )
            .bind(&keys)
            .bind(&owners)
            .execute(&mut *tx)
            .await?;
        }
        let pending: Vec<Uuid> = sqlx::query_scalar(
            "SELECT profile_id FROM match_attributes \
             WHERE profile_id = ANY($1) AND matched_version IS DISTINCT FROM $2",
        )
        .bind(&profiles)
        .bind(model_version)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(pending)
    }

    async fn mark_matched(
        &self,
        profiles: &[(Uuid, &str)],
        model_version: i64,
    ) -> Result<(), IdentityError> {
        if profiles.is_empty() {
            return Ok(());
        }
        let (ids, attributes): (Vec<Uuid>, Vec<&str>) = profiles.iter().copied().unzip();
        sqlx::query(
            "UPDATE match_attributes m SET matched_version = $3 \
             FROM unnest($1::uuid[], $2::text[]) AS u (p, a) \
             WHERE m.profile_id = u.p AND m.attributes = u.a::jsonb",
        )
        .bind(&ids)
        .bind(&attributes)
        .bind(model_version)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn candidates(
        &self,
        keys: &[String],
        cap: i64,
    ) -> Result<Vec<(String, Uuid, String)>, IdentityError> {
        Ok(sqlx::query_as(
            "WITH small AS ( \
               SELECT mk.key FROM match_keys mk WHERE mk.key = ANY($1) \
               GROUP BY mk.key HAVING count(*) <= $2) \
             SELECT mk.key, mk.profile_id, a.attributes::text \
             FROM match_keys mk JOIN small USING (key) \
             JOIN match_attributes a ON a.profile_id = mk.profile_id",
        )
        .bind(keys)
        .bind(cap)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn population(&self) -> Result<Vec<(Uuid, String)>, IdentityError> {
        Ok(sqlx::query_as(
            "SELECT profile_id, attributes::text FROM match_attributes ORDER BY profile_id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn save_model(&self, params: &str, report: &str) -> Result<i64, IdentityError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("LOCK TABLE match_models IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO match_models (version, params, report, trained_at) \
             SELECT COALESCE(max(version), 0) + 1, $1::jsonb, $2::jsonb, $3 FROM match_models \
             RETURNING version",
        )
        .bind(params)
        .bind(report)
        .bind(now())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(version)
    }

    async fn model_version(&self) -> Result<Option<i64>, IdentityError> {
        Ok(sqlx::query_scalar("SELECT max(version) FROM match_models")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn latest_model(&self) -> Result<Option<(i64, String)>, IdentityError> {
        Ok(sqlx::query_as(
            "SELECT version, params::text FROM match_models ORDER BY version DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn model(&self, version: Option<i64>) -> Result<Option<StoredModel>, IdentityError> {
        let row: Option<(i64, String, String, OffsetDateTime)> = sqlx::query_as(
            "SELECT version, params::text, report::text, trained_at FROM match_models \
             WHERE $1::bigint IS NULL OR version = $1 ORDER BY version DESC LIMIT 1",
        )
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(version, params, report, trained_at)| StoredModel {
                version,
                params,
                report,
                trained_at,
            }),
        )
    }

    async fn merge_pairs(
        &self,
        rules: &VersionedRules,
        pairs: &[((Uuid, Uuid), Option<String>)],
        cause: &str,
        rule: &str,
    ) -> Result<Vec<Result<Merge, String>>, IdentityError> {
        for attempt in 0..MAX_ATTEMPTS {
            let mut tx = self.pool.begin().await?;
            match merge_all(&mut tx, self.owners.as_ref(), rules, pairs, cause, rule).await {
                Ok((results, plan)) => {
                    tx.commit().await?;
                    crate::store::record_metrics(&plan);
                    return Ok(results);
                }
                Err(Failure::Retry(reason)) => {
                    let _ = tx.rollback().await;
                    metrics::counter!("tessera_identity_retries_total", "reason" => reason)
                        .increment(1);
                    tokio::time::sleep(super::backoff(attempt)).await;
                }
                Err(Failure::Fatal(e)) => {
                    let _ = tx.rollback().await;
                    return Err(e);
                }
            }
        }
        Err(IdentityError::Contended)
    }

    async fn suggest(&self, pair: (Uuid, Uuid), explanation: &str) -> Result<bool, IdentityError> {
        let (a, b) = ordered(pair);
        let done = sqlx::query(
            "INSERT INTO match_suggestions (profile_a, profile_b, explanation, status, created_at) \
             VALUES ($1, $2, $3::jsonb, 'open', $4) ON CONFLICT (profile_a, profile_b) DO NOTHING",
        )
        .bind(a)
        .bind(b)
        .bind(explanation)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn suggest_all(&self, pairs: &[((Uuid, Uuid), String)]) -> Result<i64, IdentityError> {
        if pairs.is_empty() {
            return Ok(0);
        }
        let (mut first, mut second, mut explanations) = (
            Vec::with_capacity(pairs.len()),
            Vec::with_capacity(pairs.len()),
            Vec::with_capacity(pairs.len()),
        );
        for (pair, explanation) in pairs {
            let (a, b) = ordered(*pair);
            first.push(a);
            second.push(b);
            explanations.push(explanation.as_str());
        }
        let done = sqlx::query(
            "INSERT INTO match_suggestions (profile_a, profile_b, explanation, status, created_at) \
             SELECT a, b, e::jsonb, 'open', $4 \
             FROM unnest($1::uuid[], $2::uuid[], $3::text[]) WITH ORDINALITY AS u (a, b, e, n) \
             ORDER BY n ON CONFLICT (profile_a, profile_b) DO NOTHING",
        )
        .bind(first)
        .bind(second)
        .bind(explanations)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(i64::try_from(done.rows_affected()).unwrap_or(i64::MAX))
    }

    async fn suggestions(
        &self,
        status: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<StoredSuggestion>, IdentityError> {
        let rows: Vec<SuggestionRow> = sqlx::query_as(suggestion_sql!(
            "WHERE ($1::text IS NULL OR status = $1) \
             AND ($2::bigint IS NULL OR suggestion_id < $2) \
             ORDER BY suggestion_id DESC LIMIT $3"
        ))
        .bind(status)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(suggestion).collect())
    }

    async fn suggestion(&self, id: i64) -> Result<Option<StoredSuggestion>, IdentityError> {
        let row: Option<SuggestionRow> =
            sqlx::query_as(suggestion_sql!("WHERE suggestion_id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(suggestion))
    }

    async fn decide_suggestion(&self, id: i64, status: &str) -> Result<bool, IdentityError> {
        let done = sqlx::query(
            "UPDATE match_suggestions SET status = $2, decided_at = $3 \
             WHERE suggestion_id = $1 AND status = 'open'",
        )
        .bind(id)
        .bind(status)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn pending_merges(&self, limit: i64) -> Result<Vec<Outboxed>, IdentityError> {
        let rows: Vec<(
            i64,
            Uuid,
            Uuid,
            String,
            String,
            OffsetDateTime,
            Option<String>,
        )> = sqlx::query_as(
            "SELECT seq, surviving_profile_id, merged_profile_id, cause, rule, merged_at, \
                        payload::text \
                 FROM merge_outbox WHERE delivered_at IS NULL ORDER BY seq LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(seq, surviving, merged, cause, rule, merged_at, payload)| {
                    (
                        seq,
                        Merge {
                            surviving_profile_id: surviving,
                            merged_profile_id: merged,
                            cause_event_id: cause,
                            merged_at,
                            rule,
                        },
                        payload,
                    )
                },
            )
            .collect())
    }

    async fn delivered(&self, seqs: &[i64]) -> Result<(), IdentityError> {
        sqlx::query("UPDATE merge_outbox SET delivered_at = $2 WHERE seq = ANY($1)")
            .bind(seqs)
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn start_batch_job(
        &self,
        owner: &str,
        lease: Duration,
    ) -> Result<Result<BatchJob, BatchJob>, IdentityError> {
        self.start_job(owner, lease).await
    }

    async fn batch_job_progress(
        &self,
        id: i64,
        owner: &str,
        progress: &BatchProgress,
        lease: Duration,
    ) -> Result<bool, IdentityError> {
        let at = now();
        let done = sqlx::query(
            "UPDATE batch_match_jobs \
             SET model_version = $3, profiles = $4, candidate_pairs = $5, pairs_done = $6, \
                 merges = $7, suggestions = $8, refused = $9, updated_at = $10, \
                 lease_until = $11 \
             WHERE job_id = $1 AND owner = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(owner)
        .bind(progress.model_version)
        .bind(progress.profiles)
        .bind(progress.candidate_pairs)
        .bind(progress.pairs_done)
        .bind(progress.merges)
        .bind(progress.suggestions)
        .bind(progress.refused)
        .bind(at)
        .bind(at + lease)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish_batch_job(
        &self,
        id: i64,
        owner: &str,
        progress: &BatchProgress,
        error: Option<&str>,
    ) -> Result<(), IdentityError> {
        let state = if error.is_some() {
            BatchJobState::Failed
        } else {
            BatchJobState::Succeeded
        };
        sqlx::query(
            "UPDATE batch_match_jobs \
             SET state = $3, model_version = $4, profiles = $5, candidate_pairs = $6, \
                 pairs_done = $7, merges = $8, suggestions = $9, refused = $10, error = $11, \
                 updated_at = $12, finished_at = $12 \
             WHERE job_id = $1 AND owner = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(owner)
        .bind(state.as_str())
        .bind(progress.model_version)
        .bind(progress.profiles)
        .bind(progress.candidate_pairs)
        .bind(progress.pairs_done)
        .bind(progress.merges)
        .bind(progress.suggestions)
        .bind(progress.refused)
        .bind(error.unwrap_or_default())
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn batch_job(&self, id: i64) -> Result<Option<BatchJob>, IdentityError> {
        let mut conn = self.pool.acquire().await?;
        expire_jobs(&mut conn, now()).await?;
        let row: Option<JobRow> = sqlx::query_as(job_sql!("WHERE job_id = $1"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
        row.map(job).transpose()
    }

    async fn batch_jobs(&self, limit: i64) -> Result<Vec<BatchJob>, IdentityError> {
        let mut conn = self.pool.acquire().await?;
        expire_jobs(&mut conn, now()).await?;
        let rows: Vec<JobRow> = sqlx::query_as(job_sql!("ORDER BY job_id DESC LIMIT $1"))
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
        rows.into_iter().map(job).collect()
    }
}
