//! Probabilistic matching's storage on SQLite (`tessera dev`): one connection, so
//! transactions are serial and need no locks.

use std::time::Duration;

use sqlx::QueryBuilder;
use sqlx::sqlite::{Sqlite, SqliteConnection};
use tessera_core::Identifier;
use uuid::Uuid;

use super::{
    HELD_MANY_SQL, ROWS_PER_STATEMENT, SqliteStore, canonical_ages, from_micros, json_ids, micros,
    parse_uuid, write,
};
use crate::IdentityError;
use crate::domain::{GraphView, Merge, Plan, plan_merges};
use crate::matching::{BatchJob, BatchJobState, BatchProgress, JOB_LEASE_EXPIRED};
use crate::store::{
    IndexEntry, MatchStore, Outboxed, StoredModel, StoredSuggestion, VersionedRules, now, ordered,
};

type SuggestionRow = (i64, String, String, String, String, i64);

fn suggestion(row: SuggestionRow) -> Result<StoredSuggestion, IdentityError> {
    let (id, profile_a, profile_b, explanation, status, created_at) = row;
    Ok(StoredSuggestion {
        id,
        profile_a: parse_uuid(&profile_a)?,
        profile_b: parse_uuid(&profile_b)?,
        explanation,
        status,
        created_at: from_micros(created_at)?,
    })
}

/// Selects suggestions: the columns of [`SuggestionRow`], then the rest of the statement.
macro_rules! suggestion_sql {
    ($rest:literal) => {
        concat!(
            "SELECT suggestion_id, profile_a, profile_b, explanation, status, created_at \
             FROM match_suggestions ",
            $rest
        )
    };
}

/// Merges `pairs` in order within the caller's transaction, set-based: the pairs' canonical
/// profiles, what they hold of limited types and the splits between them are read with one
/// statement each, the merges decided in memory ([`plan_merges`]: the same outcome per pair as
/// merging them one by one) and written with multi-row statements.
async fn merge_all(
    tx: &mut SqliteConnection,
    rules: &VersionedRules,
    pairs: &[((Uuid, Uuid), Option<String>)],
    cause: &str,
    rule: &str,
) -> Result<(Vec<Result<Merge, String>>, Plan), IdentityError> {
    let mut ids: Vec<Uuid> = pairs.iter().flat_map(|((a, b), _)| [*a, *b]).collect();
    ids.sort_unstable();
    ids.dedup();
    let canonical = canonical_ages(&mut *tx, &ids).await?;
    let mut roots: Vec<Uuid> = canonical.values().map(|age| age.id).collect();
    roots.sort_unstable();
    roots.dedup();
    let mut view = GraphView::new();
    for age in canonical.values() {
        view.insert_profile(*age);
    }
    if !roots.is_empty() {
        let held: Vec<(String, String, String, i64)> = sqlx::query_as(HELD_MANY_SQL)
            .bind(json_ids(&roots))
            .fetch_all(&mut *tx)
            .await?;
        for (root, kind, value, linked_at) in held {
            if rules.rules.limit(&kind).is_some() {
                view.insert_limited(
                    parse_uuid(&root)?,
                    Identifier { kind, value },
                    from_micros(linked_at)?,
                );
            }
        }
    }
    super::load_splits(&mut *tx, &roots, &mut view).await?;
    // Pairs with an unknown profile are answered without planning; the others keep their order.
    let mut known = Vec::with_capacity(pairs.len());
    let mut unknown = Vec::with_capacity(pairs.len());
    for ((a, b), detail) in pairs {
        match (canonical.get(a), canonical.get(b)) {
            (Some(a), Some(b)) => {
                known.push(((*a, *b), detail.clone()));
                unknown.push(false);
            }
            _ => unknown.push(true),
        }
    }
    let now = now();
    let (plan, planned) = plan_merges(&rules.rules, view, known, cause, rule, now);
    write(&mut *tx, &plan, rules.version, now).await?;
    for chunk in plan.merges.chunks(ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO merge_outbox (surviving_profile_id, merged_profile_id, cause, rule, \
             merged_at) ",
        );
        qb.push_values(chunk, |mut row, m| {
            row.push_bind(m.surviving_profile_id.to_string())
                .push_bind(m.merged_profile_id.to_string())
                .push_bind(m.cause_event_id.as_str())
                .push_bind(m.rule.as_str())
                .push_bind(micros(m.merged_at));
        });
        qb.build().execute(&mut *tx).await?;
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
    i64,
    i64,
    Option<i64>,
);

/// The columns of [`JobRow`].
macro_rules! job_columns {
    () => {
        "job_id, state, model_version, profiles, candidate_pairs, pairs_done, merges, \
         suggestions, refused, error, started_at, updated_at, finished_at"
    };
}

/// Selects batch match jobs: the columns of [`JobRow`], then the rest of the statement.
macro_rules! job_sql {
    ($rest:literal) => {
        concat!("SELECT ", job_columns!(), " FROM batch_match_jobs ", $rest)
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
        started_at: from_micros(started_at)?,
        updated_at: from_micros(updated_at)?,
        finished_at: finished_at.map(from_micros).transpose()?,
    })
}

/// Marks the running job whose lease expired before `at` as failed.
async fn expire_jobs(conn: &mut SqliteConnection, at: i64) -> Result<(), IdentityError> {
    let expired = sqlx::query(
        "UPDATE batch_match_jobs \
         SET state = 'failed', error = ?1, updated_at = ?2, finished_at = ?2 \
         WHERE state = 'running' AND lease_until < ?2",
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

#[async_trait::async_trait]
impl MatchStore for SqliteStore {
    async fn index(
        &self,
        entries: &[IndexEntry],
        model_version: Option<i64>,
    ) -> Result<Vec<Uuid>, IdentityError> {
        let now = micros(now());
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut pending = Vec::new();
        for e in entries {
            let id = e.profile_id.to_string();
            // Only new or changed attributes are written.
            let written: Option<String> = sqlx::query_scalar(
                "INSERT INTO match_attributes (profile_id, attributes, updated_at) \
                 VALUES (?1, ?2, ?3) ON CONFLICT (profile_id) DO UPDATE \
                 SET attributes = excluded.attributes, updated_at = excluded.updated_at, \
                     matched_version = NULL \
                 WHERE match_attributes.attributes <> excluded.attributes \
                 RETURNING profile_id",
            )
            .bind(&id)
            .bind(&e.attributes)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if written.is_none() {
                let matched: Option<i64> = sqlx::query_scalar(
                    "SELECT matched_version FROM match_attributes WHERE profile_id = ?1",
                )
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?;
                if matched != model_version {
                    pending.push(e.profile_id);
                }
                continue;
            }
            if model_version.is_some() {
                pending.push(e.profile_id);
            }
            sqlx::query("DELETE FROM match_keys WHERE profile_id = ?1")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            for key in &e.keys {
                sqlx::query(
                    "INSERT INTO match_keys (key, profile_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                )
                .bind(key)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            }
        }
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
        // A JSON array of [profile, attributes] pairs: one statement for them all.
        let pairs: Vec<(String, &str)> = profiles
            .iter()
            .map(|(id, attributes)| (id.to_string(), *attributes))
            .collect();
        let pairs = serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned());
        sqlx::query(
            "UPDATE match_attributes SET matched_version = ?2 \
             FROM json_each(?1) AS u \
             WHERE match_attributes.profile_id = json_extract(u.value, '$[0]') \
               AND match_attributes.attributes = json_extract(u.value, '$[1]')",
        )
        .bind(pairs)
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
        let keys = serde_json::to_string(keys).unwrap_or_else(|_| "[]".to_owned());
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "WITH small AS ( \
               SELECT key FROM match_keys WHERE key IN (SELECT value FROM json_each(?1)) \
               GROUP BY key HAVING count(*) <= ?2) \
             SELECT mk.key, mk.profile_id, a.attributes \
             FROM match_keys mk JOIN small USING (key) \
             JOIN match_attributes a ON a.profile_id = mk.profile_id",
        )
        .bind(keys)
        .bind(cap)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(key, id, attributes)| Ok((key, parse_uuid(&id)?, attributes)))
            .collect()
    }

    async fn population(&self) -> Result<Vec<(Uuid, String)>, IdentityError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT profile_id, attributes FROM match_attributes ORDER BY profile_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, attributes)| Ok((parse_uuid(&id)?, attributes)))
            .collect()
    }

    async fn save_model(&self, params: &str, report: &str) -> Result<i64, IdentityError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO match_models (version, params, report, trained_at) \
             SELECT COALESCE(max(version), 0) + 1, ?1, ?2, ?3 FROM match_models \
             RETURNING version",
        )
        .bind(params)
        .bind(report)
        .bind(micros(now()))
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
        Ok(
            sqlx::query_as(
                "SELECT version, params FROM match_models ORDER BY version DESC LIMIT 1",
            )
            .fetch_optional(&self.pool)
            .await?,
        )
    }

    async fn model(&self, version: Option<i64>) -> Result<Option<StoredModel>, IdentityError> {
        let row: Option<(i64, String, String, i64)> = sqlx::query_as(
            "SELECT version, params, report, trained_at FROM match_models \
             WHERE ?1 IS NULL OR version = ?1 ORDER BY version DESC LIMIT 1",
        )
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(version, params, report, trained_at)| {
            Ok(StoredModel {
                version,
                params,
                report,
                trained_at: from_micros(trained_at)?,
            })
        })
        .transpose()
    }

    async fn merge_pairs(
        &self,
        rules: &VersionedRules,
        pairs: &[((Uuid, Uuid), Option<String>)],
        cause: &str,
        rule: &str,
    ) -> Result<Vec<Result<Merge, String>>, IdentityError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let (results, plan) = merge_all(&mut tx, rules, pairs, cause, rule).await?;
        tx.commit().await?;
        crate::store::record_metrics(&plan);
        Ok(results)
    }

    async fn suggest(&self, pair: (Uuid, Uuid), explanation: &str) -> Result<bool, IdentityError> {
        let (a, b) = ordered(pair);
        let done = sqlx::query(
            "INSERT INTO match_suggestions (profile_a, profile_b, explanation, status, created_at) \
             VALUES (?1, ?2, ?3, 'open', ?4) ON CONFLICT (profile_a, profile_b) DO NOTHING",
        )
        .bind(a.to_string())
        .bind(b.to_string())
        .bind(explanation)
        .bind(micros(now()))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn suggest_all(&self, pairs: &[((Uuid, Uuid), String)]) -> Result<i64, IdentityError> {
        if pairs.is_empty() {
            return Ok(0);
        }
        let created_at = micros(now());
        let mut stored = 0;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for chunk in pairs.chunks(ROWS_PER_STATEMENT) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO match_suggestions (profile_a, profile_b, explanation, status, \
                 created_at) ",
            );
            qb.push_values(chunk, |mut row, (pair, explanation)| {
                let (a, b) = ordered(*pair);
                row.push_bind(a.to_string())
                    .push_bind(b.to_string())
                    .push_bind(explanation.as_str())
                    .push_bind("open")
                    .push_bind(created_at);
            });
            qb.push(" ON CONFLICT (profile_a, profile_b) DO NOTHING");
            stored += qb.build().execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(i64::try_from(stored).unwrap_or(i64::MAX))
    }

    async fn suggestions(
        &self,
        status: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<StoredSuggestion>, IdentityError> {
        let rows: Vec<SuggestionRow> = sqlx::query_as(suggestion_sql!(
            "WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR suggestion_id < ?2) \
             ORDER BY suggestion_id DESC LIMIT ?3"
        ))
        .bind(status)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(suggestion).collect()
    }

    async fn suggestion(&self, id: i64) -> Result<Option<StoredSuggestion>, IdentityError> {
        let row: Option<SuggestionRow> =
            sqlx::query_as(suggestion_sql!("WHERE suggestion_id = ?1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(suggestion).transpose()
    }

    async fn decide_suggestion(&self, id: i64, status: &str) -> Result<bool, IdentityError> {
        let done = sqlx::query(
            "UPDATE match_suggestions SET status = ?2, decided_at = ?3 \
             WHERE suggestion_id = ?1 AND status = 'open'",
        )
        .bind(id)
        .bind(status)
        .bind(micros(now()))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn pending_merges(&self, limit: i64) -> Result<Vec<Outboxed>, IdentityError> {
        let rows: Vec<(i64, String, String, String, String, i64, Option<String>)> = sqlx::query_as(
            "SELECT seq, surviving_profile_id, merged_profile_id, cause, rule, merged_at, \
                        payload \
                 FROM merge_outbox WHERE delivered_at IS NULL ORDER BY seq LIMIT ?1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(
                |(seq, surviving, merged, cause, rule, merged_at, payload)| {
                    Ok((
                        seq,
                        Merge {
                            surviving_profile_id: parse_uuid(&surviving)?,
                            merged_profile_id: parse_uuid(&merged)?,
                            cause_event_id: cause,
                            merged_at: from_micros(merged_at)?,
                            rule,
                        },
                        payload,
                    ))
                },
            )
            .collect()
    }

    async fn delivered(&self, seqs: &[i64]) -> Result<(), IdentityError> {
        let seqs = serde_json::to_string(seqs).unwrap_or_else(|_| "[]".to_owned());
        sqlx::query(
            "UPDATE merge_outbox SET delivered_at = ?2 \
             WHERE seq IN (SELECT value FROM json_each(?1))",
        )
        .bind(seqs)
        .bind(micros(now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn start_batch_job(
        &self,
        owner: &str,
        lease: Duration,
    ) -> Result<Result<BatchJob, BatchJob>, IdentityError> {
        let mut tx = self.pool.begin().await?;
        let at = now();
        expire_jobs(&mut tx, micros(at)).await?;
        let started: Option<JobRow> = sqlx::query_as(concat!(
            "INSERT INTO batch_match_jobs (state, owner, lease_until, started_at, updated_at) \
             VALUES ('running', ?1, ?2, ?3, ?3) \
             ON CONFLICT (state) WHERE state = 'running' DO NOTHING RETURNING ",
            job_columns!()
        ))
        .bind(owner)
        .bind(micros(at + lease))
        .bind(micros(at))
        .fetch_optional(&mut *tx)
        .await?;
        let out = match started {
            Some(row) => Ok(job(row)?),
            None => {
                let running: JobRow = sqlx::query_as(job_sql!("WHERE state = 'running'"))
                    .fetch_one(&mut *tx)
                    .await?;
                Err(job(running)?)
            }
        };
        tx.commit().await?;
        Ok(out)
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
             SET model_version = ?3, profiles = ?4, candidate_pairs = ?5, pairs_done = ?6, \
                 merges = ?7, suggestions = ?8, refused = ?9, updated_at = ?10, \
                 lease_until = ?11 \
             WHERE job_id = ?1 AND owner = ?2 AND state = 'running'",
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
        .bind(micros(at))
        .bind(micros(at + lease))
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
             SET state = ?3, model_version = ?4, profiles = ?5, candidate_pairs = ?6, \
                 pairs_done = ?7, merges = ?8, suggestions = ?9, refused = ?10, error = ?11, \
                 updated_at = ?12, finished_at = ?12 \
             WHERE job_id = ?1 AND owner = ?2 AND state = 'running'",
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
        .bind(micros(now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn batch_job(&self, id: i64) -> Result<Option<BatchJob>, IdentityError> {
        let mut conn = self.pool.acquire().await?;
        expire_jobs(&mut conn, micros(now())).await?;
        let row: Option<JobRow> = sqlx::query_as(job_sql!("WHERE job_id = ?1"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
        row.map(job).transpose()
    }

    async fn batch_jobs(&self, limit: i64) -> Result<Vec<BatchJob>, IdentityError> {
        let mut conn = self.pool.acquire().await?;
        expire_jobs(&mut conn, micros(now())).await?;
        let rows: Vec<JobRow> = sqlx::query_as(job_sql!("ORDER BY job_id DESC LIMIT ?1"))
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
        rows.into_iter().map(job).collect()
    }
}
