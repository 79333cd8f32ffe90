//! The event log on SQLite (`tessera dev`). Times are Unix microseconds; the pool's single
//! connection makes every transaction serial, so seq order is commit order.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use tessera_store::StoreError;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Appended, Backlog, Cursor, EventFilter, EventLog, FORGET_CHUNK, Forgotten, Lease, LoggedEvent,
    NewEvent, Person, StoredEvent, TailPage, collate, first_of_each_key, trace,
};

#[derive(Debug, Clone)]
pub(crate) struct SqliteEventLog {
    pool: SqlitePool,
    dedup_window: Duration,
}

impl SqliteEventLog {
    pub(crate) fn new(pool: SqlitePool, dedup_window: Duration) -> Self {
        Self { pool, dedup_window }
    }
}

fn micros(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

fn now_micros() -> i64 {
    micros(OffsetDateTime::now_utc())
}

fn from_micros(us: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn bad_uuid(e: uuid::Error) -> StoreError {
    StoreError::Sqlx(sqlx::Error::Decode(Box::new(e)))
}

/// The debugger's select list and join: an event with whether its partition's cursor passed it.
const LOGGED_EVENT: &str = "SELECT e.seq, e.event_id, e.message_id, e.payload, e.received_at, \
     COALESCE(e.seq <= p.cursor_seq, 0) \
     FROM events e LEFT JOIN delivery_partitions p ON p.partition = e.partition \
     WHERE e.source_id = ";

/// Deletes the quarantined messages that carry one of a person's identifiers ($1 user ids, $2
/// anonymous ids, $3 emails, each a JSON array). Messages are kept as received, so their values
/// are trimmed (and emails lower-cased) as the identity service normalizes them before
/// comparing. SQLite's `lower` folds ASCII only: good enough for the dev backend.
const FORGET_QUARANTINED: &str = "DELETE FROM quarantine WHERE \
     trim(json_extract(payload, '$.userId'), char(32, 9, 13, 10)) \
       IN (SELECT value FROM json_each($1)) \
     OR trim(json_extract(payload, '$.anonymousId'), char(32, 9, 13, 10)) \
       IN (SELECT value FROM json_each($2)) \
     OR trim(json_extract(payload, '$.previousId'), char(32, 9, 13, 10)) \
       IN (SELECT value FROM json_each($2)) \
     OR lower(trim(json_extract(payload, '$.traits.email'), char(32, 9, 13, 10))) \
       IN (SELECT value FROM json_each($3)) \
     OR lower(trim(json_extract(payload, '$.context.traits.email'), char(32, 9, 13, 10))) \
       IN (SELECT value FROM json_each($3))";

fn push_filter(query: &mut QueryBuilder<Sqlite>, filter: &EventFilter) {
    if let Some(kind) = &filter.event_type {
        query
            .push(" AND json_extract(e.payload, '$.type') = ")
            .push_bind(kind.clone());
    }
    if let Some(name) = &filter.event_name {
        query
            .push(" AND json_extract(e.payload, '$.event') = ")
            .push_bind(name.clone());
    }
}

fn logged_event(row: &SqliteRow) -> Result<LoggedEvent, StoreError> {
    let id: String = row.try_get(1)?;
    Ok(LoggedEvent {
        cursor: Cursor {
            txid: 0,
            seq: row.try_get(0)?,
        },
        event_id: Uuid::parse_str(&id).map_err(bad_uuid)?,
        message_id: row.try_get(2)?,
        payload: row.try_get(3)?,
        received_at: from_micros(row.try_get(4)?),
        delivered: row.try_get(5)?,
    })
}

// SQLite allows 32,766 bound parameters; 8 per row.
const ROWS_PER_INSERT: usize = 4_000;

#[async_trait]
impl EventLog for SqliteEventLog {
    async fn append(&self, events: &[NewEvent]) -> Result<Vec<Appended>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let window = duration_micros(self.dedup_window);
        let unique = first_of_each_key(events);
        let mut tx = self.pool.begin().await?;
        // Claim each message id (new, or last accepted before the window).
        let mut claimed = std::collections::HashSet::with_capacity(unique.len());
        for chunk in unique.chunks(ROWS_PER_INSERT) {
            let mut claim: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO message_ids (source_id, message_id, event_id, received_at) ",
            );
            claim.push_values(chunk, |mut row, &i| {
                let e = &events[i];
                row.push_bind(&e.source_id)
                    .push_bind(&e.message_id)
                    .push_bind(e.event_id.to_string())
                    .push_bind(micros(e.received_at));
            });
            claim
                .push(
                    " ON CONFLICT (source_id, message_id) DO UPDATE \
                     SET event_id = excluded.event_id, received_at = excluded.received_at \
                     WHERE message_ids.received_at < excluded.received_at - ",
                )
                .push_bind(window)
                .push(" RETURNING event_id");
            for row in claim.build().fetch_all(&mut *tx).await? {
                let id: String = row.try_get(0)?;
                claimed.insert(Uuid::parse_str(&id).map_err(bad_uuid)?);
            }
        }
        // Log the messages that claimed their id, in the batch's order.
        let fresh: Vec<&NewEvent> = events
            .iter()
            .filter(|e| claimed.contains(&e.event_id))
            .collect();
        for chunk in fresh.chunks(ROWS_PER_INSERT) {
            let mut insert: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO events (event_id, source_id, message_id, partition, payload, received_at, \
                 trace_parent, trace_state) ",
            );
            insert.push_values(chunk, |mut row, e| {
                row.push_bind(e.event_id.to_string())
                    .push_bind(&e.source_id)
                    .push_bind(&e.message_id)
                    .push_bind(e.partition)
                    .push_bind(&e.payload)
                    .push_bind(micros(e.received_at))
                    .push_bind(e.trace.as_ref().map(|t| t.traceparent.as_str()))
                    .push_bind(
                        e.trace
                            .as_ref()
                            .map(|t| t.tracestate.as_str())
                            .filter(|s| !s.is_empty()),
                    );
            });
            insert.build().execute(&mut *tx).await?;
        }
        // The id each message id stands for now: ours where we claimed it, else the original's.
        let mut stored = HashMap::with_capacity(events.len());
        for &i in &unique {
            let e = &events[i];
            let id = if claimed.contains(&e.event_id) {
                e.event_id
            } else {
                let id: String = sqlx::query_scalar(
                    "SELECT event_id FROM message_ids WHERE source_id = $1 AND message_id = $2",
                )
                .bind(&e.source_id)
                .bind(&e.message_id)
                .fetch_one(&mut *tx)
                .await?;
                Uuid::parse_str(&id).map_err(bad_uuid)?
            };
            stored.insert((e.source_id.clone(), e.message_id.clone()), id);
        }
        tx.commit().await?;
        Ok(collate(events, &stored))
    }

    async fn forget(&self, events: &[Uuid], person: &Person) -> Result<Forgotten, StoreError> {
        let json = |values: &[String]| serde_json::Value::from(values).to_string();
        let mut forgotten = Forgotten::default();
        let mut tx = self.pool.begin().await?;
        // One bound JSON array per statement rather than a parameter per id.
        for chunk in events.chunks(FORGET_CHUNK) {
            let ids: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
            let ids = json(&ids);
            forgotten.events += sqlx::query(
                "DELETE FROM events WHERE event_id IN (SELECT value FROM json_each($1))",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query(
                "DELETE FROM message_ids WHERE event_id IN (SELECT value FROM json_each($1))",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        }
        if !person.is_empty() {
            forgotten.quarantined = sqlx::query(FORGET_QUARANTINED)
                .bind(json(&person.user_ids))
                .bind(json(&person.anonymous_ids))
                .bind(json(&person.emails))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(forgotten)
    }

    async fn prune_message_ids(&self, limit: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM message_ids WHERE (source_id, message_id) IN ( \
               SELECT source_id, message_id FROM message_ids WHERE received_at < $1 LIMIT $2)",
        )
        .bind(now_micros().saturating_sub(duration_micros(self.dedup_window)))
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn ensure_partitions(&self, count: i32) -> Result<i32, StoreError> {
        let mut tx = self.pool.begin().await?;
        for partition in 0..count {
            sqlx::query(
                "INSERT INTO delivery_partitions (partition) VALUES ($1) ON CONFLICT DO NOTHING",
            )
            .bind(partition)
            .execute(&mut *tx)
            .await?;
        }
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM delivery_partitions")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(i32::try_from(total).unwrap_or(i32::MAX))
    }

    async fn heartbeat(&self, dispatcher: &str, ttl: Duration) -> Result<usize, StoreError> {
        let now = now_micros();
        let ttl = duration_micros(ttl);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO dispatchers (dispatcher_id, heartbeat_at) VALUES ($1, $2) \
             ON CONFLICT (dispatcher_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(dispatcher)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM dispatchers WHERE heartbeat_at < $1")
            .bind(now - ttl.saturating_mul(10))
            .execute(&mut *tx)
            .await?;
        let live: i64 =
            sqlx::query_scalar("SELECT count(*) FROM dispatchers WHERE heartbeat_at >= $1")
                .bind(now - ttl)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(usize::try_from(live).unwrap_or(1).max(1))
    }

    async fn lease(
        &self,
        dispatcher: &str,
        want: usize,
        duration: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        let now = now_micros();
        let until = now.saturating_add(duration_micros(duration));
        let mut tx = self.pool.begin().await?;
        let held = sqlx::query(
            "UPDATE delivery_partitions SET lease_until = $2 WHERE owner = $1 AND lease_until > $3",
        )
        .bind(dispatcher)
        .bind(until)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let missing = i64::try_from(want)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(held).unwrap_or(0));
        if missing > 0 {
            sqlx::query(
                "UPDATE delivery_partitions SET owner = $1, lease_until = $2 \
                 WHERE partition IN (SELECT partition FROM delivery_partitions \
                   WHERE owner IS NULL OR lease_until IS NULL OR lease_until <= $3 \
                   ORDER BY partition LIMIT $4)",
            )
            .bind(dispatcher)
            .bind(until)
            .bind(now)
            .bind(missing)
            .execute(&mut *tx)
            .await?;
        }
        let rows = sqlx::query(
            "SELECT partition, cursor_seq FROM delivery_partitions \
             WHERE owner = $1 AND lease_until > $2 ORDER BY partition",
        )
        .bind(dispatcher)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.into_iter()
            .map(|row| {
                Ok(Lease {
                    partition: row.try_get(0)?,
                    cursor: Cursor {
                        txid: 0,
                        seq: row.try_get(1)?,
                    },
                })
            })
            .collect()
    }

    async fn release(&self, dispatcher: &str, partition: i32) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE delivery_partitions SET owner = NULL, lease_until = NULL \
             WHERE partition = $1 AND owner = $2",
        )
        .bind(partition)
        .bind(dispatcher)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn read_after_each(
        &self,
        reads: &[(i32, Cursor)],
        limit: i64,
    ) -> Result<Vec<Vec<StoredEvent>>, StoreError> {
        // One connection for the whole round; SQLite serves one process, so round trips cost
        // nothing to speak of and one statement per partition keeps the index use plain.
        let mut conn = self.pool.acquire().await?;
        let mut out = Vec::with_capacity(reads.len());
        for (partition, after) in reads {
            let rows = sqlx::query(
                "SELECT seq, event_id, payload, trace_parent, trace_state FROM events \
                 WHERE partition = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            )
            .bind(partition)
            .bind(after.seq)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
            let read = rows
                .into_iter()
                .map(|row| {
                    let id: String = row.try_get(1)?;
                    Ok(StoredEvent {
                        cursor: Cursor {
                            txid: 0,
                            seq: row.try_get(0)?,
                        },
                        event_id: Uuid::parse_str(&id).map_err(bad_uuid)?,
                        payload: row.try_get(2)?,
                        trace: trace(row.try_get(3)?, row.try_get(4)?),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            out.push(read);
        }
        Ok(out)
    }

    async fn advance(
        &self,
        dispatcher: &str,
        moves: &[(i32, Cursor)],
    ) -> Result<Vec<i32>, StoreError> {
        let now = now_micros();
        let mut tx = self.pool.begin().await?;
        let mut moved = Vec::with_capacity(moves.len());
        for (partition, to) in moves {
            let done = sqlx::query(
                "UPDATE delivery_partitions SET cursor_seq = $3 \
                 WHERE partition = $1 AND owner = $2 AND lease_until > $4",
            )
            .bind(partition)
            .bind(dispatcher)
            .bind(to.seq)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                moved.push(*partition);
            }
        }
        tx.commit().await?;
        Ok(moved)
    }

    async fn backlog(&self) -> Result<Backlog, StoreError> {
        let row = sqlx::query(
            "SELECT count(*), min(e.received_at) FROM events e \
             JOIN delivery_partitions p ON e.partition = p.partition WHERE e.seq > p.cursor_seq",
        )
        .fetch_one(&self.pool)
        .await?;
        let oldest: Option<i64> = row.try_get(1)?;
        Ok(Backlog {
            events: row.try_get(0)?,
            oldest: oldest.map(from_micros),
        })
    }

    async fn next_seq(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(max(seq), 0) + 1 FROM events")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn list_range(
        &self,
        source_id: &str,
        filter: &EventFilter,
        floor: i64,
        below: i64,
        limit: i64,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        let mut query = QueryBuilder::<Sqlite>::new(LOGGED_EVENT);
        query.push_bind(source_id.to_owned());
        query.push(" AND e.seq < ").push_bind(below);
        query.push(" AND e.seq >= ").push_bind(floor);
        push_filter(&mut query, filter);
        query.push(" ORDER BY e.seq DESC LIMIT ").push_bind(limit);
        let rows = query.build().fetch_all(&self.pool).await?;
        rows.iter().map(logged_event).collect()
    }

    async fn head(&self) -> Result<Cursor, StoreError> {
        let seq: i64 = sqlx::query_scalar("SELECT COALESCE(max(seq), 0) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(Cursor { txid: 0, seq })
    }

    async fn tail_events(
        &self,
        source_id: &str,
        filter: &EventFilter,
        after: Cursor,
        limit: i64,
    ) -> Result<TailPage, StoreError> {
        // Writes are serial, so seq order is commit order: everything up to the head read first
        // is settled.
        let horizon = self.head().await?;
        let mut query = QueryBuilder::<Sqlite>::new(LOGGED_EVENT);
        query
            .push_bind(source_id.to_owned())
            .push(" AND e.seq > ")
            .push_bind(after.seq)
            .push(" AND e.seq <= ")
            .push_bind(horizon.seq);
        push_filter(&mut query, filter);
        query.push(" ORDER BY e.seq LIMIT ").push_bind(limit);
        let rows = query.build().fetch_all(&self.pool).await?;
        let events = rows
            .iter()
            .map(logged_event)
            .collect::<Result<Vec<_>, _>>()?;
        let last = events.last().map_or(after, |e| e.cursor);
        let full = i64::try_from(events.len()).unwrap_or(i64::MAX) >= limit;
        let next = if full { last } else { last.max(horizon) };
        Ok(TailPage { events, next })
    }
}
