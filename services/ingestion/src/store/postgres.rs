//! The event log on Postgres.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, QueryBuilder, Row};
use tessera_store::StoreError;
use uuid::Uuid;

use super::{
    Appended, Backlog, Cursor, EventFilter, EventLog, FORGET_CHUNK, Forgotten, Lease, LoggedEvent,
    NewEvent, Person, StoredEvent, TailPage, collate, first_of_each_key, trace,
};

#[derive(Debug, Clone)]
pub(crate) struct PgEventLog {
    pool: PgPool,
    dedup_window: Duration,
}

impl PgEventLog {
    pub(crate) fn new(pool: PgPool, dedup_window: Duration) -> Self {
        Self { pool, dedup_window }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The debugger's select list and join: an event with whether its partition's cursor passed it.
const LOGGED_EVENT: &str = "SELECT e.txid::text::bigint, e.seq, e.event_id, e.message_id, \
     e.payload::text, e.received_at, \
     COALESCE((e.txid, e.seq) <= (p.cursor_txid, p.cursor_seq), false) \
     FROM events e LEFT JOIN delivery_partitions p ON p.partition = e.partition \
     WHERE e.source_id = ";

/// Deletes the quarantined messages that carry one of a person's identifiers ($1 user ids, $2
/// anonymous ids, $3 emails). Messages are kept as received, so their values are trimmed (and
/// emails lower-cased) as the identity service normalizes them before comparing.
const FORGET_QUARANTINED: &str = "DELETE FROM quarantine WHERE \
     btrim(payload->>'userId', E' \\t\\r\\n') = ANY($1) \
     OR btrim(payload->>'anonymousId', E' \\t\\r\\n') = ANY($2) \
     OR btrim(payload->>'previousId', E' \\t\\r\\n') = ANY($2) \
     OR lower(btrim(payload#>>'{traits,email}', E' \\t\\r\\n')) = ANY($3) \
     OR lower(btrim(payload#>>'{context,traits,email}', E' \\t\\r\\n')) = ANY($3)";

fn push_filter(query: &mut QueryBuilder<Postgres>, filter: &EventFilter) {
    if let Some(kind) = &filter.event_type {
        query
            .push(" AND e.payload->>'type' = ")
            .push_bind(kind.clone());
    }
    if let Some(name) = &filter.event_name {
        query
            .push(" AND e.payload->>'event' = ")
            .push_bind(name.clone());
    }
}

fn logged_event(row: &PgRow) -> Result<LoggedEvent, StoreError> {
    Ok(LoggedEvent {
        cursor: Cursor {
            txid: row.try_get(0)?,
            seq: row.try_get(1)?,
        },
        event_id: row.try_get(2)?,
        message_id: row.try_get(3)?,
        payload: row.try_get(4)?,
        received_at: row.try_get(5)?,
        delivered: row.try_get(6)?,
    })
}

#[async_trait]
impl EventLog for PgEventLog {
    async fn append(&self, events: &[NewEvent]) -> Result<Vec<Appended>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let unique = first_of_each_key(events);
        let n = unique.len();
        let mut positions = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut sources = Vec::with_capacity(n);
        let mut messages = Vec::with_capacity(n);
        let mut partitions = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut received = Vec::with_capacity(n);
        let mut trace_parents = Vec::with_capacity(n);
        let mut trace_states = Vec::with_capacity(n);
        for &i in &unique {
            let e = &events[i];
            positions.push(i64::try_from(i).unwrap_or(i64::MAX));
            ids.push(e.event_id);
            sources.push(e.source_id.as_str());
            messages.push(e.message_id.as_str());
            partitions.push(e.partition);
            payloads.push(e.payload.as_str());
            received.push(e.received_at);
            trace_parents.push(e.trace.as_ref().map(|t| t.traceparent.as_str()));
            trace_states.push(
                e.trace
                    .as_ref()
                    .map(|t| t.tracestate.as_str())
                    .filter(|s| !s.is_empty()),
            );
        }
        // One statement, its own transaction, one round trip: claim each message id (new, or
        // last accepted before the window) and log the messages that claimed theirs, in the
        // batch's order. A key that stays another event's is "updated" to itself, so RETURNING
        // names the event every key stands for now: a duplicate's original, read under the row
        // lock even when a concurrent request claimed it after this statement's snapshot.
        let rows = sqlx::query(
            "WITH input AS ( \
               SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::int[], \
                                    $6::text[], $7::timestamptz[], $9::text[], $10::text[]) \
                 AS i(pos, event_id, source_id, message_id, partition, payload, received_at, \
                      trace_parent, trace_state)), \
             claimed AS ( \
               INSERT INTO message_ids AS m (source_id, message_id, event_id, received_at) \
               SELECT source_id, message_id, event_id, received_at FROM input \
               ON CONFLICT (source_id, message_id) DO UPDATE SET \
                 event_id = CASE WHEN m.received_at < EXCLUDED.received_at - make_interval(secs => $8) \
                                 THEN EXCLUDED.event_id ELSE m.event_id END, \
                 received_at = CASE WHEN m.received_at < EXCLUDED.received_at - make_interval(secs => $8) \
                                    THEN EXCLUDED.received_at ELSE m.received_at END \
               RETURNING m.source_id, m.message_id, m.event_id), \
             logged AS ( \
               INSERT INTO events (event_id, source_id, message_id, partition, payload, received_at, \
                                   trace_parent, trace_state) \
               SELECT i.event_id, i.source_id, i.message_id, i.partition, i.payload::json, \
                      i.received_at, i.trace_parent, i.trace_state \
               FROM input i JOIN claimed c ON c.event_id = i.event_id ORDER BY i.pos) \
             SELECT source_id, message_id, event_id FROM claimed",
        )
        .bind(&positions)
        .bind(&ids)
        .bind(&sources)
        .bind(&messages)
        .bind(&partitions)
        .bind(&payloads)
        .bind(&received)
        .bind(secs(self.dedup_window))
        .bind(&trace_parents)
        .bind(&trace_states)
        .fetch_all(&self.pool)
        .await?;
        let mut stored = HashMap::with_capacity(rows.len());
        for row in rows {
            stored.insert(
                (row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?),
                row.try_get::<Uuid, _>(2)?,
            );
        }
        Ok(collate(events, &stored))
    }

    async fn forget(&self, events: &[Uuid], person: &Person) -> Result<Forgotten, StoreError> {
        let mut forgotten = Forgotten::default();
        let mut tx = self.pool.begin().await?;
        for chunk in events.chunks(FORGET_CHUNK) {
            // The dedup keys go with their events, found by the key the log row names (the
            // primary key of message_ids), so accepting a message maintains no index by event
            // id. A key a later event of the same message id claimed stays: it is that event's.
            let deleted: i64 = sqlx::query_scalar(
                "WITH gone AS ( \
                   DELETE FROM events WHERE event_id = ANY($1) \
                   RETURNING event_id, source_id, message_id), \
                 keys AS ( \
                   DELETE FROM message_ids m USING gone g \
                   WHERE m.source_id = g.source_id AND m.message_id = g.message_id \
                     AND m.event_id = g.event_id) \
                 SELECT count(*) FROM gone",
            )
            .bind(chunk)
            .fetch_one(&mut *tx)
            .await?;
            forgotten.events += u64::try_from(deleted).unwrap_or(0);
        }
        if !person.is_empty() {
            forgotten.quarantined = sqlx::query(FORGET_QUARANTINED)
                .bind(&person.user_ids)
                .bind(&person.anonymous_ids)
                .bind(&person.emails)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(forgotten)
    }

    async fn prune_message_ids(&self, limit: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM message_ids WHERE ctid = ANY(ARRAY( \
               SELECT ctid FROM message_ids \
               WHERE received_at < now() - make_interval(secs => $1) LIMIT $2))",
        )
        .bind(secs(self.dedup_window))
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn ensure_partitions(&self, count: i32) -> Result<i32, StoreError> {
        sqlx::query(
            "INSERT INTO delivery_partitions (partition) SELECT generate_series(0, $1 - 1) \
             ON CONFLICT (partition) DO NOTHING",
        )
        .bind(count)
        .execute(&self.pool)
        .await?;
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM delivery_partitions")
            .fetch_one(&self.pool)
            .await?;
        Ok(i32::try_from(total).unwrap_or(i32::MAX))
    }

    async fn heartbeat(&self, dispatcher: &str, ttl: Duration) -> Result<usize, StoreError> {
        sqlx::query(
            "INSERT INTO dispatchers (dispatcher_id, heartbeat_at) VALUES ($1, now()) \
             ON CONFLICT (dispatcher_id) DO UPDATE SET heartbeat_at = now()",
        )
        .bind(dispatcher)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "DELETE FROM dispatchers WHERE heartbeat_at < now() - make_interval(secs => $1 * 10)",
        )
        .bind(secs(ttl))
        .execute(&self.pool)
        .await?;
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM dispatchers WHERE heartbeat_at >= now() - make_interval(secs => $1)",
        )
        .bind(secs(ttl))
        .fetch_one(&self.pool)
        .await?;
        Ok(usize::try_from(live).unwrap_or(1).max(1))
    }

    async fn lease(
        &self,
        dispatcher: &str,
        want: usize,
        duration: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let held: i64 = sqlx::query_scalar(
            "WITH renewed AS ( \
               UPDATE delivery_partitions SET lease_until = now() + make_interval(secs => $2) \
               WHERE owner = $1 AND lease_until > now() RETURNING 1) \
             SELECT count(*) FROM renewed",
        )
        .bind(dispatcher)
        .bind(secs(duration))
        .fetch_one(&mut *tx)
        .await?;
        let missing = i64::try_from(want).unwrap_or(i64::MAX) - held;
        if missing > 0 {
            sqlx::query(
                "UPDATE delivery_partitions SET owner = $1, \
                   lease_until = now() + make_interval(secs => $2) \
                 WHERE partition IN ( \
                   SELECT partition FROM delivery_partitions \
                   WHERE owner IS NULL OR lease_until IS NULL OR lease_until <= now() \
                   ORDER BY partition LIMIT $3 FOR UPDATE SKIP LOCKED)",
            )
            .bind(dispatcher)
            .bind(secs(duration))
            .bind(missing)
            .execute(&mut *tx)
            .await?;
        }
        let rows = sqlx::query(
            "SELECT partition, cursor_txid::text::bigint, cursor_seq FROM delivery_partitions \
             WHERE owner = $1 AND lease_until > now() ORDER BY partition",
        )
        .bind(dispatcher)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.into_iter()
            .map(|row| {
                Ok(Lease {
                    partition: row.try_get(0)?,
                    cursor: Cursor {
                        txid: row.try_get(1)?,
                        seq: row.try_get(2)?,
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
        let mut out: Vec<Vec<StoredEvent>> = reads.iter().map(|_| Vec::new()).collect();
        if reads.is_empty() {
            return Ok(out);
        }
        let partitions: Vec<i32> = reads.iter().map(|(p, _)| *p).collect();
        let txids: Vec<String> = reads.iter().map(|(_, c)| c.txid.to_string()).collect();
        let seqs: Vec<i64> = reads.iter().map(|(_, c)| c.seq).collect();
        // Per read, through the delivery index (a nested loop with an index scan and a limit
        // each). Only rows of transactions older than the oldest running one: a transaction
        // that started earlier but commits later cannot add rows behind the cursor.
        let rows = sqlx::query(
            "SELECT r.n, e.txid::text::bigint, e.seq, e.event_id, e.payload::text, \
                    e.trace_parent, e.trace_state \
             FROM UNNEST($1::int4[], $2::text[], $3::int8[]) WITH ORDINALITY \
                  AS r(partition, txid, seq, n) \
             CROSS JOIN LATERAL ( \
                 SELECT txid, seq, event_id, payload, trace_parent, trace_state FROM events \
                 WHERE partition = r.partition AND (txid, seq) > (r.txid::xid8, r.seq) \
                   AND txid < pg_snapshot_xmin(pg_current_snapshot()) \
                 ORDER BY events.txid, events.seq LIMIT $4) e \
             ORDER BY r.n, e.txid, e.seq",
        )
        .bind(&partitions)
        .bind(&txids)
        .bind(&seqs)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let n: i64 = row.try_get(0)?;
            let slot = usize::try_from(n - 1)
                .ok()
                .and_then(|i| out.get_mut(i))
                .ok_or_else(|| {
                    StoreError::Sqlx(sqlx::Error::Protocol(format!(
                        "the delivery read returned read {n} of {}",
                        reads.len()
                    )))
                })?;
            slot.push(StoredEvent {
                cursor: Cursor {
                    txid: row.try_get(1)?,
                    seq: row.try_get(2)?,
                },
                event_id: row.try_get(3)?,
                payload: row.try_get(4)?,
                trace: trace(row.try_get(5)?, row.try_get(6)?),
            });
        }
        Ok(out)
    }

    async fn advance(
        &self,
        dispatcher: &str,
        moves: &[(i32, Cursor)],
    ) -> Result<Vec<i32>, StoreError> {
        if moves.is_empty() {
            return Ok(Vec::new());
        }
        let (partitions, cursors): (Vec<i32>, Vec<Cursor>) = moves.iter().copied().unzip();
        let txids: Vec<i64> = cursors.iter().map(|c| c.txid).collect();
        let seqs: Vec<i64> = cursors.iter().map(|c| c.seq).collect();
        // One statement (one commit) for the whole round's partitions.
        let moved = sqlx::query_scalar(
            "UPDATE delivery_partitions d \
             SET cursor_txid = m.txid::text::xid8, cursor_seq = m.seq \
             FROM UNNEST($2::int4[], $3::int8[], $4::int8[]) AS m(partition, txid, seq) \
             WHERE d.partition = m.partition AND d.owner = $1 AND d.lease_until > now() \
             RETURNING d.partition",
        )
        .bind(dispatcher)
        .bind(partitions)
        .bind(txids)
        .bind(seqs)
        .fetch_all(&self.pool)
        .await?;
        Ok(moved)
    }

    async fn backlog(&self) -> Result<Backlog, StoreError> {
        // Per partition, through the delivery index: only the waiting events are read. As a
        // join, the planner hashed the partitions and scanned the whole log (in parallel) on
        // every call, every 2 s on every replica, at a cost that grew with the log.
        let row = sqlx::query(
            "SELECT COALESCE(sum(b.waiting), 0)::int8, min(b.oldest) \
             FROM delivery_partitions p CROSS JOIN LATERAL ( \
                 SELECT count(*) AS waiting, min(e.received_at) AS oldest FROM events e \
                 WHERE e.partition = p.partition \
                   AND (e.txid, e.seq) > (p.cursor_txid, p.cursor_seq) OFFSET 0) b",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Backlog {
            events: row.try_get(0)?,
            oldest: row.try_get(1)?,
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
        let mut query = QueryBuilder::<Postgres>::new(LOGGED_EVENT);
        query.push_bind(source_id.to_owned());
        query.push(" AND e.seq < ").push_bind(below);
        query.push(" AND e.seq >= ").push_bind(floor);
        push_filter(&mut query, filter);
        query.push(" ORDER BY e.seq DESC LIMIT ").push_bind(limit);
        let rows = query.build().fetch_all(&self.pool).await?;
        rows.iter().map(logged_event).collect()
    }

    async fn head(&self) -> Result<Cursor, StoreError> {
        // Rows of transactions older than the oldest running one are all visible now; a tail
        // from (xmin, 0) sees every later one, including those of transactions still running.
        let xmin: i64 =
            sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
                .fetch_one(&self.pool)
                .await?;
        Ok(Cursor { txid: xmin, seq: 0 })
    }

    async fn tail_events(
        &self,
        source_id: &str,
        filter: &EventFilter,
        after: Cursor,
        limit: i64,
    ) -> Result<TailPage, StoreError> {
        // Read the horizon first: rows below it are settled, so when fewer than `limit` rows come
        // back, everything before (horizon, 0) has been seen.
        let horizon = self.head().await?;
        // Per partition, so each part is a range scan of the delivery-order index from the
        // position on (source and filters are checked on the rows of that range only).
        let mut query = QueryBuilder::<Postgres>::new(
            "SELECT e.txid::text::bigint, e.seq, e.event_id, e.message_id, e.payload::text, \
             e.received_at, (e.txid, e.seq) <= (p.cursor_txid, p.cursor_seq) \
             FROM delivery_partitions p CROSS JOIN LATERAL ( \
               SELECT * FROM events e WHERE e.partition = p.partition AND (e.txid, e.seq) > (",
        );
        query
            .push_bind(after.txid.to_string())
            .push("::text::xid8, ")
            .push_bind(after.seq)
            .push(") AND e.txid < ")
            .push_bind(horizon.txid.to_string())
            .push("::text::xid8 AND e.source_id = ")
            .push_bind(source_id.to_owned());
        push_filter(&mut query, filter);
        query
            .push(" ORDER BY e.txid, e.seq LIMIT ")
            .push_bind(limit)
            .push(") e ORDER BY e.txid, e.seq LIMIT ")
            .push_bind(limit);
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
