//! Where webhook delivery keeps its state: each webhook's cursor in the change stream, lease and
//! head retry state (`webhooks`), and the dead letters (`webhook_dead_letters`). Postgres leases
//! on the database clock; SQLite (one process) on the process clock, in unix microseconds.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::types::Json;
use tessera_store::Database;
use time::OffsetDateTime;

use crate::error::ProfileError;
use crate::store::ChangeCursor;

/// A webhook's row, as its lease holder reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Head {
    /// Every change up to here was delivered, dead-lettered or skipped.
    pub(crate) cursor: ChangeCursor,
    /// While retrying: the last change of the batch that failed (retries send the same changes).
    pub(crate) retrying: Option<ChangeCursor>,
    /// Failed attempts at the head so far.
    pub(crate) attempts: u32,
    /// When the first of them failed.
    pub(crate) first_failed_at: Option<OffsetDateTime>,
    /// Not before then.
    pub(crate) next_attempt_at: Option<OffsetDateTime>,
}

/// A failed attempt at the head, to retry later.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Retry {
    /// The last change of the batch.
    pub(crate) until: ChangeCursor,
    /// Attempts so far.
    pub(crate) attempts: u32,
    /// When the first failed.
    pub(crate) first_failed_at: OffsetDateTime,
    /// When to try again.
    pub(crate) next_attempt_at: OffsetDateTime,
    /// Why it failed.
    pub(crate) error: String,
}

/// A change going to the dead-letter list.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewDeadLetter {
    /// Its cursor.
    pub(crate) cursor: ChangeCursor,
    /// The profile that changed.
    pub(crate) profile_id: String,
    /// The change's kind.
    pub(crate) kind: String,
    /// When the change was written.
    pub(crate) changed_at: OffsetDateTime,
    /// The change as the payload carries it.
    pub(crate) payload: serde_json::Value,
    /// Attempts made.
    pub(crate) attempts: u32,
    /// Why the last failed.
    pub(crate) last_error: String,
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Letter {
    pub(crate) id: i64,
    pub(crate) webhook: String,
    pub(crate) cursor: String,
    pub(crate) profile_id: String,
    pub(crate) kind: String,
    pub(crate) changed_at: OffsetDateTime,
    pub(crate) payload: serde_json::Value,
    pub(crate) attempts: u32,
    pub(crate) last_error: String,
    pub(crate) dead_at: OffsetDateTime,
    /// When a replay was asked for; `None` while dead.
    pub(crate) replay_at: Option<OffsetDateTime>,
    /// Failed replay attempts since then.
    pub(crate) replay_attempts: u32,
}

/// The state of webhook delivery.
#[async_trait]
pub(crate) trait WebhookStore: Send + Sync + std::fmt::Debug {
    /// Creates the webhook's row at `start` unless it exists (a webhook keeps its cursor across
    /// restarts and config reloads; a renamed one starts anew).
    async fn register(&self, name: &str, start: ChangeCursor) -> Result<(), ProfileError>;

    /// Takes or renews the webhook's lease for `owner`; its row when held, `None` when another
    /// replica holds it.
    async fn claim(
        &self,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<Head>, ProfileError>;

    /// Gives the lease up (on shutdown), so another replica takes over at once.
    async fn release(&self, name: &str, owner: &str) -> Result<(), ProfileError>;

    /// Moves the cursor to `to` and clears the retry state, recording `dead` in the same
    /// transaction; only while `owner` holds the lease (false, and nothing written, otherwise).
    async fn advance(
        &self,
        name: &str,
        owner: &str,
        to: ChangeCursor,
        dead: &[NewDeadLetter],
        now: OffsetDateTime,
    ) -> Result<bool, ProfileError>;

    /// Records a failed attempt at the head; only while `owner` holds the lease.
    async fn retry_later(
        &self,
        name: &str,
        owner: &str,
        retry: &Retry,
    ) -> Result<bool, ProfileError>;

    /// The webhook's dead letters queued for replay and due by `now`, oldest first.
    async fn due_replays(
        &self,
        name: &str,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<Letter>, ProfileError>;

    /// Deletes dead letters (delivered by a replay, or no longer to be delivered).
    async fn remove(&self, ids: &[i64]) -> Result<(), ProfileError>;

    /// Records a failed replay of `ids`: tried again at `next`, or (`None`) dead again.
    async fn replay_failed(
        &self,
        ids: &[i64],
        next: Option<OffsetDateTime>,
        error: &str,
        now: OffsetDateTime,
    ) -> Result<(), ProfileError>;

    /// Deletes every webhook's dead letters about `profile_ids` (a GDPR deletion), but the
    /// `deleted` ones, which tell the destination to delete.
    async fn forget_profiles(&self, profile_ids: &[String]) -> Result<u64, ProfileError>;

    /// Dead letters after `after` (an id), oldest first, of `webhook` or of all.
    async fn list(
        &self,
        webhook: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Letter>, ProfileError>;

    /// Queues `webhook`'s dead letters `ids` (all when empty) for replay from `now`; how many.
    async fn replay(
        &self,
        webhook: &str,
        ids: &[i64],
        now: OffsetDateTime,
    ) -> Result<u64, ProfileError>;

    /// Deletes the dead letters (not queued for replay) that died before `before`.
    async fn prune(&self, before: OffsetDateTime) -> Result<u64, ProfileError>;
}

/// The webhook store of `db`'s backend.
pub(crate) fn open(db: Database) -> std::sync::Arc<dyn WebhookStore> {
    match db {
        Database::Postgres(pool) => std::sync::Arc::new(Postgres(pool)),
        Database::Sqlite(pool) => std::sync::Arc::new(Sqlite(pool)),
    }
}

fn count(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn uncount(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn xid(text: &str) -> Result<u64, ProfileError> {
    text.parse()
        .map_err(|_| ProfileError::Corrupt(format!("webhook cursor xid {text}")))
}

fn payload_text(payload: &serde_json::Value) -> String {
    // A JSON value always serializes.
    serde_json::to_string(payload).unwrap_or_else(|_| "{}".to_owned())
}

/// Webhook state in Postgres.
#[derive(Debug, Clone)]
struct Postgres(PgPool);

fn pg_letter(row: &PgRow) -> Result<Letter, ProfileError> {
    let Json(payload) = row.try_get("payload")?;
    Ok(Letter {
        id: row.try_get("id")?,
        webhook: row.try_get("webhook")?,
        cursor: row.try_get("cursor")?,
        profile_id: row.try_get("profile_id")?,
        kind: row.try_get("kind")?,
        changed_at: row.try_get("changed_at")?,
        payload,
        attempts: uncount(row.try_get("attempts")?),
        last_error: row.try_get("last_error")?,
        dead_at: row.try_get("dead_at")?,
        replay_at: row.try_get("replay_at")?,
        replay_attempts: uncount(row.try_get("replay_attempts")?),
    })
}

#[async_trait]
impl WebhookStore for Postgres {
    async fn register(&self, name: &str, start: ChangeCursor) -> Result<(), ProfileError> {
        sqlx::query(
            "INSERT INTO webhooks (name, cursor_xid, cursor_seq, created_at) \
             VALUES ($1, $2::text::xid8, $3, now()) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(start.xid.to_string())
        .bind(start.seq)
        .execute(&self.0)
        .await?;
        Ok(())
    }

    async fn claim(
        &self,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<Head>, ProfileError> {
        // One conditional UPDATE of one row: two replicas cannot both win it.
        let row = sqlx::query(
            "UPDATE webhooks SET owner = $2, lease_until = now() + make_interval(secs => $3) \
             WHERE name = $1 AND (owner = $2 OR owner IS NULL OR lease_until IS NULL \
                                  OR lease_until <= now()) \
             RETURNING cursor_xid::text, cursor_seq, head_xid::text, head_seq, attempts, \
                       first_failed_at, next_attempt_at",
        )
        .bind(name)
        .bind(owner)
        .bind(lease.as_secs_f64())
        .fetch_optional(&self.0)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let head_xid: Option<String> = row.try_get(2)?;
        let head_seq: Option<i64> = row.try_get(3)?;
        let retrying = match (head_xid, head_seq) {
            (Some(x), Some(seq)) => Some(ChangeCursor { xid: xid(&x)?, seq }),
            (None, _) | (_, None) => None,
        };
        Ok(Some(Head {
            cursor: ChangeCursor {
                xid: xid(&row.try_get::<String, _>(0)?)?,
                seq: row.try_get(1)?,
            },
            retrying,
            attempts: uncount(row.try_get(4)?),
            first_failed_at: row.try_get(5)?,
            next_attempt_at: row.try_get(6)?,
        }))
    }

    async fn release(&self, name: &str, owner: &str) -> Result<(), ProfileError> {
        sqlx::query(
            "UPDATE webhooks SET owner = NULL, lease_until = NULL WHERE name = $1 AND owner = $2",
        )
        .bind(name)
        .bind(owner)
        .execute(&self.0)
        .await?;
        Ok(())
    }

    async fn advance(
        &self,
        name: &str,
        owner: &str,
        to: ChangeCursor,
        dead: &[NewDeadLetter],
        now: OffsetDateTime,
    ) -> Result<bool, ProfileError> {
        let mut tx = self.0.begin().await?;
        let moved = sqlx::query(
            "UPDATE webhooks SET cursor_xid = $3::text::xid8, cursor_seq = $4, head_xid = NULL, \
                 head_seq = NULL, attempts = 0, first_failed_at = NULL, next_attempt_at = NULL, \
                 last_error = NULL \
             WHERE name = $1 AND owner = $2 AND lease_until > now()",
        )
        .bind(name)
        .bind(owner)
        .bind(to.xid.to_string())
        .bind(to.seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            return Ok(false);
        }
        if !dead.is_empty() {
            let cursors: Vec<String> = dead.iter().map(|d| d.cursor.to_string()).collect();
            let profiles: Vec<&str> = dead.iter().map(|d| d.profile_id.as_str()).collect();
            let kinds: Vec<&str> = dead.iter().map(|d| d.kind.as_str()).collect();
            let times: Vec<OffsetDateTime> = dead.iter().map(|d| d.changed_at).collect();
            let payloads: Vec<String> = dead.iter().map(|d| payload_text(&d.payload)).collect();
            let attempts: Vec<i32> = dead.iter().map(|d| count(d.attempts)).collect();
            let errors: Vec<&str> = dead.iter().map(|d| d.last_error.as_str()).collect();
            sqlx::query(
                "INSERT INTO webhook_dead_letters \
                   (webhook, cursor, profile_id, kind, changed_at, payload, attempts, \
                    last_error, dead_at) \
                 SELECT $1, c, p, k, t, j::jsonb, a, e, $9 \
                 FROM UNNEST($2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], \
                             $7::int4[], $8::text[]) AS d(c, p, k, t, j, a, e)",
            )
            .bind(name)
            .bind(cursors)
            .bind(profiles)
            .bind(kinds)
            .bind(times)
            .bind(payloads)
            .bind(attempts)
            .bind(errors)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn retry_later(
        &self,
        name: &str,
        owner: &str,
        retry: &Retry,
    ) -> Result<bool, ProfileError> {
        let done = sqlx::query(
            "UPDATE webhooks SET head_xid = $3::text::xid8, head_seq = $4, attempts = $5, \
                 first_failed_at = $6, next_attempt_at = $7, last_error = $8 \
             WHERE name = $1 AND owner = $2 AND lease_until > now()",
        )
        .bind(name)
        .bind(owner)
        .bind(retry.until.xid.to_string())
        .bind(retry.until.seq)
        .bind(count(retry.attempts))
        .bind(retry.first_failed_at)
        .bind(retry.next_attempt_at)
        .bind(&retry.error)
        .execute(&self.0)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn due_replays(
        &self,
        name: &str,
        now: OffsetDateTime,
        max: usize,
    ) -> Result<Vec<Letter>, ProfileError> {
        const SQL: &str = "SELECT id, webhook, cursor, profile_id, kind, changed_at, payload, \
                 attempts, last_error, dead_at, replay_at, replay_attempts \
             FROM webhook_dead_letters \
             WHERE webhook = $1 AND replay_at IS NOT NULL AND next_attempt_at <= $2 \
             ORDER BY id LIMIT $3";
        sqlx::query(SQL)
            .bind(name)
            .bind(now)
            .bind(limit(max))
            .fetch_all(&self.0)
            .await?
            .iter()
            .map(pg_letter)
            .collect()
    }

    async fn remove(&self, ids: &[i64]) -> Result<(), ProfileError> {
        sqlx::query("DELETE FROM webhook_dead_letters WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.0)
            .await?;
        Ok(())
    }

    async fn replay_failed(
        &self,
        ids: &[i64],
        next: Option<OffsetDateTime>,
        error: &str,
        now: OffsetDateTime,
    ) -> Result<(), ProfileError> {
        let query = match next {
            Some(next) => sqlx::query(
                "UPDATE webhook_dead_letters SET attempts = attempts + 1, \
                     replay_attempts = replay_attempts + 1, next_attempt_at = $2, \
                     last_error = $3 \
                 WHERE id = ANY($1) AND replay_at IS NOT NULL",
            )
            .bind(ids)
            .bind(next),
            None => sqlx::query(
                "UPDATE webhook_dead_letters SET attempts = attempts + 1, replay_at = NULL, \
                     replay_attempts = 0, next_attempt_at = NULL, dead_at = $2, last_error = $3 \
                 WHERE id = ANY($1) AND replay_at IS NOT NULL",
            )
            .bind(ids)
            .bind(now),
        };
        query.bind(error).execute(&self.0).await?;
        Ok(())
    }

    async fn forget_profiles(&self, profile_ids: &[String]) -> Result<u64, ProfileError> {
        let done = sqlx::query(
            "DELETE FROM webhook_dead_letters WHERE profile_id = ANY($1) AND kind <> 'deleted'",
        )
        .bind(profile_ids)
        .execute(&self.0)
        .await?;
        Ok(done.rows_affected())
    }

    async fn list(
        &self,
        webhook: Option<&str>,
        after: i64,
        max: usize,
    ) -> Result<Vec<Letter>, ProfileError> {
        const SQL: &str = "SELECT id, webhook, cursor, profile_id, kind, changed_at, payload, \
                 attempts, last_error, dead_at, replay_at, replay_attempts \
             FROM webhook_dead_letters \
             WHERE ($1::text IS NULL OR webhook = $1) AND id > $2 ORDER BY id LIMIT $3";
        sqlx::query(SQL)
            .bind(webhook)
            .bind(after)
            .bind(limit(max))
            .fetch_all(&self.0)
            .await?
            .iter()
            .map(pg_letter)
            .collect()
    }

    async fn replay(
        &self,
        webhook: &str,
        ids: &[i64],
        now: OffsetDateTime,
    ) -> Result<u64, ProfileError> {
        let done = sqlx::query(
            "UPDATE webhook_dead_letters SET replay_at = $3, next_attempt_at = $3, \
                 replay_attempts = 0 \
             WHERE webhook = $1 AND (cardinality($2::int8[]) = 0 OR id = ANY($2))",
        )
        .bind(webhook)
        .bind(ids)
        .bind(now)
        .execute(&self.0)
        .await?;
        Ok(done.rows_affected())
    }

    async fn prune(&self, before: OffsetDateTime) -> Result<u64, ProfileError> {
        let done = sqlx::query(
            "DELETE FROM webhook_dead_letters WHERE dead_at < $1 AND replay_at IS NULL",
        )
        .bind(before)
        .execute(&self.0)
        .await?;
        Ok(done.rows_affected())
    }
}

/// Webhook state in SQLite.
#[derive(Debug, Clone)]
struct Sqlite(SqlitePool);

fn micros(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

fn from_micros(us: i64) -> Result<OffsetDateTime, ProfileError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .map_err(|_| ProfileError::Corrupt(format!("webhook time {us}")))
}

fn ids_json(ids: &[i64]) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_owned())
}

fn lite_letter(row: &SqliteRow) -> Result<Letter, ProfileError> {
    let payload: String = row.try_get("payload")?;
    let replay_at: Option<i64> = row.try_get("replay_at")?;
    Ok(Letter {
        id: row.try_get("id")?,
        webhook: row.try_get("webhook")?,
        cursor: row.try_get("cursor")?,
        profile_id: row.try_get("profile_id")?,
        kind: row.try_get("kind")?,
        changed_at: from_micros(row.try_get("changed_at")?)?,
        payload: serde_json::from_str(&payload)
            .map_err(|e| ProfileError::Corrupt(format!("dead letter payload: {e}")))?,
        attempts: uncount(row.try_get("attempts")?),
        last_error: row.try_get("last_error")?,
        dead_at: from_micros(row.try_get("dead_at")?)?,
        replay_at: replay_at.map(from_micros).transpose()?,
        replay_attempts: uncount(row.try_get("replay_attempts")?),
    })
}

#[async_trait]
impl WebhookStore for Sqlite {
    async fn register(&self, name: &str, start: ChangeCursor) -> Result<(), ProfileError> {
        sqlx::query(
            "INSERT INTO webhooks (name, cursor_seq, created_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(start.seq)
        .bind(micros(OffsetDateTime::now_utc()))
        .execute(&self.0)
        .await?;
        Ok(())
    }

    async fn claim(
        &self,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<Head>, ProfileError> {
        let now = micros(OffsetDateTime::now_utc());
        let until = now.saturating_add(i64::try_from(lease.as_micros()).unwrap_or(i64::MAX));
        let row = sqlx::query(
            "UPDATE webhooks SET owner = ?2, lease_until = ?4 \
             WHERE name = ?1 AND (owner = ?2 OR owner IS NULL OR lease_until IS NULL \
                                  OR lease_until <= ?3) \
             RETURNING cursor_seq, head_seq, attempts, first_failed_at, next_attempt_at",
        )
        .bind(name)
        .bind(owner)
        .bind(now)
        .bind(until)
        .fetch_optional(&self.0)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let head_seq: Option<i64> = row.try_get(1)?;
        let first: Option<i64> = row.try_get(3)?;
        let next: Option<i64> = row.try_get(4)?;
        Ok(Some(Head {
            cursor: ChangeCursor {
                xid: 0,
                seq: row.try_get(0)?,
            },
            retrying: head_seq.map(|seq| ChangeCursor { xid: 0, seq }),
            attempts: uncount(row.try_get(2)?),
            first_failed_at: first.map(from_micros).transpose()?,
            next_attempt_at: next.map(from_micros).transpose()?,
        }))
    }

    async fn release(&self, name: &str, owner: &str) -> Result<(), ProfileError> {
        sqlx::query(
            "UPDATE webhooks SET owner = NULL, lease_until = NULL WHERE name = ?1 AND owner = ?2",
        )
        .bind(name)
        .bind(owner)
        .execute(&self.0)
        .await?;
        Ok(())
    }

    async fn advance(
        &self,
        name: &str,
        owner: &str,
        to: ChangeCursor,
        dead: &[NewDeadLetter],
        now: OffsetDateTime,
    ) -> Result<bool, ProfileError> {
        let mut tx = self.0.begin().await?;
        let moved = sqlx::query(
            "UPDATE webhooks SET cursor_seq = ?3, head_seq = NULL, attempts = 0, \
                 first_failed_at = NULL, next_attempt_at = NULL, last_error = NULL \
             WHERE name = ?1 AND owner = ?2 AND lease_until > ?4",
        )
        .bind(name)
        .bind(owner)
        .bind(to.seq)
        .bind(micros(OffsetDateTime::now_utc()))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            return Ok(false);
        }
        for d in dead {
            sqlx::query(
                "INSERT INTO webhook_dead_letters \
                   (webhook, cursor, profile_id, kind, changed_at, payload, attempts, \
                    last_error, dead_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .bind(name)
            .bind(d.cursor.to_string())
            .bind(&d.profile_id)
            .bind(&d.kind)
            .bind(micros(d.changed_at))
            .bind(payload_text(&d.payload))
            .bind(count(d.attempts))
            .bind(&d.last_error)
            .bind(micros(now))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn retry_later(
        &self,
        name: &str,
        owner: &str,
        retry: &Retry,
    ) -> Result<bool, ProfileError> {
        let done = sqlx::query(
            "UPDATE webhooks SET head_seq = ?3, attempts = ?4, first_failed_at = ?5, \
                 next_attempt_at = ?6, last_error = ?7 \
             WHERE name = ?1 AND owner = ?2 AND lease_until > ?8",
        )
        .bind(name)
        .bind(owner)
        .bind(retry.until.seq)
        .bind(count(retry.attempts))
        .bind(micros(retry.first_failed_at))
        .bind(micros(retry.next_attempt_at))
        .bind(&retry.error)
        .bind(micros(OffsetDateTime::now_utc()))
        .execute(&self.0)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn due_replays(
        &self,
        name: &str,
        now: OffsetDateTime,
        max: usize,
    ) -> Result<Vec<Letter>, ProfileError> {
        sqlx::query(
            "SELECT id, webhook, cursor, profile_id, kind, changed_at, payload, attempts, \
                 last_error, dead_at, replay_at, replay_attempts \
             FROM webhook_dead_letters \
             WHERE webhook = ?1 AND replay_at IS NOT NULL AND next_attempt_at <= ?2 \
             ORDER BY id LIMIT ?3",
        )
        .bind(name)
        .bind(micros(now))
        .bind(limit(max))
        .fetch_all(&self.0)
        .await?
        .iter()
        .map(lite_letter)
        .collect()
    }

    async fn remove(&self, ids: &[i64]) -> Result<(), ProfileError> {
        sqlx::query(
            "DELETE FROM webhook_dead_letters WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(ids_json(ids))
        .execute(&self.0)
        .await?;
        Ok(())
    }

    async fn replay_failed(
        &self,
        ids: &[i64],
        next: Option<OffsetDateTime>,
        error: &str,
        now: OffsetDateTime,
    ) -> Result<(), ProfileError> {
        let query = match next {
            Some(next) => sqlx::query(
                "UPDATE webhook_dead_letters SET attempts = attempts + 1, \
                     replay_attempts = replay_attempts + 1, next_attempt_at = ?2, \
                     last_error = ?3 \
                 WHERE id IN (SELECT value FROM json_each(?1)) AND replay_at IS NOT NULL",
            )
            .bind(ids_json(ids))
            .bind(micros(next)),
            None => sqlx::query(
                "UPDATE webhook_dead_letters SET attempts = attempts + 1, replay_at = NULL, \
                     replay_attempts = 0, next_attempt_at = NULL, dead_at = ?2, last_error = ?3 \
                 WHERE id IN (SELECT value FROM json_each(?1)) AND replay_at IS NOT NULL",
            )
            .bind(ids_json(ids))
            .bind(micros(now)),
        };
        query.bind(error).execute(&self.0).await?;
        Ok(())
    }

    async fn forget_profiles(&self, profile_ids: &[String]) -> Result<u64, ProfileError> {
        let done = sqlx::query(
            "DELETE FROM webhook_dead_letters \
             WHERE profile_id IN (SELECT value FROM json_each(?1)) AND kind <> 'deleted'",
        )
        .bind(serde_json::to_string(profile_ids).unwrap_or_else(|_| "[]".to_owned()))
        .execute(&self.0)
        .await?;
        Ok(done.rows_affected())
    }

    async fn list(
        &self,
        webhook: Option<&str>,
        after: i64,
        max: usize,
    ) -> Result<Vec<Letter>, ProfileError> {
        sqlx::query(
            "SELECT id, webhook, cursor, profile_id, kind, changed_at, payload, attempts, \
                 last_error, dead_at, replay_at, replay_attempts \
             FROM webhook_dead_letters \
             WHERE (?1 IS NULL OR webhook = ?1) AND id > ?2 ORDER BY id LIMIT ?3",
        )
        .bind(webhook)
        .bind(after)
        .bind(limit(max))
        .fetch_all(&self.0)
        .await?
        .iter()
        .map(lite_letter)
        .collect()
    }

    async fn replay(
        &self,
        webhook: &str,
        ids: &[i64],
        now: OffsetDateTime,
    ) -> Result<u64, ProfileError> {
        let done = sqlx::query(
            "UPDATE webhook_dead_letters SET replay_at = ?3, next_attempt_at = ?3, \
                 replay_attempts = 0 \
             WHERE webhook = ?1 \
               AND (json_array_length(?2) = 0 OR id IN (SELECT value FROM json_each(?2)))",
        )
        .bind(webhook)
        .bind(ids_json(ids))
        .bind(micros(now))
        .execute(&self.0)
        .await?;
        Ok(done.rows_affected())
    }

    async fn prune(&self, before: OffsetDateTime) -> Result<u64, ProfileError> {
        let done = sqlx::query(
            "DELETE FROM webhook_dead_letters WHERE dead_at < ?1 AND replay_at IS NULL",
        )
        .bind(micros(before))
        .execute(&self.0)
        .await?;
        Ok(done.rows_affected())
    }
}
