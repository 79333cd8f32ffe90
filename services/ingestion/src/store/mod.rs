//! The event log and the delivery bookkeeping (partition cursors and leases), one implementation
//! per backend.

mod postgres;
mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use tessera_server::trace_context::TraceParent;
use tessera_store::{Database, StoreError};
use time::OffsetDateTime;
use uuid::Uuid;

pub(crate) use postgres::PgEventLog;
pub(crate) use sqlite::SqliteEventLog;

#[cfg(test)]
mod conformance;

/// A message to append to the log.
#[derive(Debug, Clone)]
pub(crate) struct NewEvent {
    pub(crate) event_id: Uuid,
    pub(crate) source_id: String,
    pub(crate) message_id: String,
    pub(crate) partition: i32,
    /// The event as JSON (a `tessera_core::Event`).
    pub(crate) payload: String,
    pub(crate) received_at: OffsetDateTime,
    /// The span that accepted it, when traces are exported.
    pub(crate) trace: Option<TraceParent>,
}

/// The outcome of appending one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Appended {
    /// The id of the stored event (the original's, for a duplicate).
    pub(crate) event_id: Uuid,
    /// Whether this call stored it.
    pub(crate) is_new: bool,
}

/// A position in one partition of the log: everything at or before it was delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Cursor {
    /// The inserting transaction's id (Postgres); always 0 on SQLite.
    pub(crate) txid: i64,
    pub(crate) seq: i64,
}

/// An event read for delivery.
#[derive(Debug, Clone)]
pub(crate) struct StoredEvent {
    pub(crate) cursor: Cursor,
    pub(crate) event_id: Uuid,
    pub(crate) payload: String,
    /// The trace context it was appended with.
    pub(crate) trace: Option<TraceParent>,
}

/// A partition leased by a dispatcher, with its delivery cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) partition: i32,
    pub(crate) cursor: Cursor,
}

/// The events waiting for delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backlog {
    pub(crate) events: i64,
    pub(crate) oldest: Option<OffsetDateTime>,
}

/// Which events of a source the debugger reads; `None` fields match every event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EventFilter {
    /// The event's `type` as stored (`track`, `identify`, ...).
    pub(crate) event_type: Option<String>,
    /// The event's `event` (track event name), matched exactly.
    pub(crate) event_name: Option<String>,
}

/// An event read for the debugger.
#[derive(Debug, Clone)]
pub(crate) struct LoggedEvent {
    /// Its position in the log (`seq` orders listings; the cursor orders tails).
    pub(crate) cursor: Cursor,
    pub(crate) event_id: Uuid,
    pub(crate) message_id: String,
    /// The event as JSON (a `tessera_core::Event`).
    pub(crate) payload: String,
    pub(crate) received_at: OffsetDateTime,
    /// Whether its partition's delivery cursor is at or past it.
    pub(crate) delivered: bool,
}

/// A page of a source's events, newest first, and how far down the log it looked.
#[derive(Debug, Clone)]
pub(crate) struct ListPage {
    pub(crate) events: Vec<LoggedEvent>,
    /// The lowest log position (seq) the page looked at: events of the source older than it,
    /// if any, are below it. 1 when the page looked down to the log's start.
    pub(crate) floor: i64,
}

/// The positions a page of `scan` rows below `before` looks at start here (at least 1).
fn list_floor(before: i64, scan: i64) -> i64 {
    before.saturating_sub(scan.max(1)).max(1)
}

/// A page of a tail: the events read and where the next read starts.
#[derive(Debug, Clone)]
pub(crate) struct TailPage {
    pub(crate) events: Vec<LoggedEvent>,
    /// The position after this page: past every event that could still appear at or before it.
    pub(crate) next: Cursor,
}

/// The identifiers of a forgotten person, by the field of a message that carries each: what
/// finds the person's quarantined messages. Values as the identity service normalizes them
/// (trimmed; emails lower-cased).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Person {
    /// Matched against `userId`.
    pub(crate) user_ids: Vec<String>,
    /// Matched against `anonymousId` and `previousId` (an alias's previous id resolves as an
    /// anonymous id).
    pub(crate) anonymous_ids: Vec<String>,
    /// Matched, case-insensitively, against `traits.email` and `context.traits.email`.
    pub(crate) emails: Vec<String>,
}

impl Person {
    /// Whether no identifier can match a message.
    pub(crate) fn is_empty(&self) -> bool {
        self.user_ids.is_empty() && self.anonymous_ids.is_empty() && self.emails.is_empty()
    }
}

/// What [`EventLog::forget`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Forgotten {
    /// Events deleted from the log.
    pub(crate) events: u64,
    /// Quarantined messages deleted.
    pub(crate) quarantined: u64,
}

/// How many event ids one statement of [`EventLog::forget`] deletes.
pub(crate) const FORGET_CHUNK: usize = 10_000;

/// The event log and its delivery state.
#[async_trait]
pub(crate) trait EventLog: Send + Sync + std::fmt::Debug {
    /// Appends messages in one transaction, in order; a message whose (source, message id) was
    /// accepted within the dedup window (before its `received_at`) is not stored again, nor is a
    /// repeat inside the batch. Returns one result per message, in order. When this returns
    /// `Ok`, every message is durable.
    async fn append(&self, events: &[NewEvent]) -> Result<Vec<Appended>, StoreError>;

    /// Deletes for good, in one transaction: the events `events` (delivered or not) and their
    /// dedup keys (so their message ids are accepted again as new messages), and the
    /// quarantined messages (tracking plans) that carry one of `person`'s identifiers. Events
    /// already gone are not counted. The quarantine belongs to the tracking plans, but a GDPR
    /// deletion must not leave it behind when the log's part commits, so it is deleted here.
    async fn forget(&self, events: &[Uuid], person: &Person) -> Result<Forgotten, StoreError>;

    /// Forgets up to `limit` message ids accepted longer ago than the dedup window (they no
    /// longer deduplicate anything); returns how many it forgot.
    async fn prune_message_ids(&self, limit: i64) -> Result<u64, StoreError>;

    /// Creates the delivery partitions `0..count` that do not exist yet; returns how many
    /// partitions exist.
    async fn ensure_partitions(&self, count: i32) -> Result<i32, StoreError>;

    /// Records that `dispatcher` is alive and returns how many dispatchers are alive (seen within
    /// `ttl`), this one included.
    async fn heartbeat(&self, dispatcher: &str, ttl: Duration) -> Result<usize, StoreError>;

    /// Extends the leases `dispatcher` holds and takes free or expired partitions until it holds
    /// `want`; returns every lease it holds afterwards.
    async fn lease(
        &self,
        dispatcher: &str,
        want: usize,
        duration: Duration,
    ) -> Result<Vec<Lease>, StoreError>;

    /// Gives up `dispatcher`'s lease of `partition`.
    async fn release(&self, dispatcher: &str, partition: i32) -> Result<(), StoreError>;

    /// Up to `limit` events of `partition` after `after`, in delivery order, that are safe to
    /// deliver (no earlier event can still appear behind them), with their trace context.
    /// Delivery reads every leased partition at once ([`EventLog::read_after_each`]); this is
    /// one of those reads, for the store tests.
    #[cfg(test)]
    async fn read_after(
        &self,
        partition: i32,
        after: Cursor,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut read = self.read_after_each(&[(partition, after)], limit).await?;
        Ok(read.pop().unwrap_or_default())
    }

    /// [`EventLog::read_after`] for each `(partition, after)` of `reads`, up to `limit` events
    /// each, in one statement (one round trip, one snapshot, one pooled connection: a round
    /// reads every leased partition at once, and must not take the connections acceptance
    /// needs). One list per read, in the order of `reads`.
    async fn read_after_each(
        &self,
        reads: &[(i32, Cursor)],
        limit: i64,
    ) -> Result<Vec<Vec<StoredEvent>>, StoreError>;

    /// Moves the cursor of each `(partition, to)` of `moves` whose lease `dispatcher` still
    /// holds, in one transaction; returns the partitions moved.
    async fn advance(
        &self,
        dispatcher: &str,
        moves: &[(i32, Cursor)],
    ) -> Result<Vec<i32>, StoreError>;

    /// How many events wait for delivery, over all partitions, and when the oldest of them was
    /// received (`None` when none waits).
    async fn backlog(&self) -> Result<Backlog, StoreError>;

    /// Up to `limit` events of `source_id` matching `filter`, newest (highest seq) first, among
    /// the `scan` log positions below `before_seq` (below the log's head when `None`): a page
    /// reads at most `scan` rows of the log whatever the source, and may come back short (even
    /// empty) with older events of the source further down. `floor` says where it stopped.
    async fn list_page(
        &self,
        source_id: &str,
        filter: &EventFilter,
        before_seq: Option<i64>,
        limit: i64,
        scan: i64,
    ) -> Result<ListPage, StoreError> {
        let before = match before_seq {
            Some(before) => before,
            None => self.next_seq().await?,
        };
        let floor = list_floor(before, scan);
        let events = self
            .list_range(source_id, filter, floor, before, limit)
            .await?;
        Ok(ListPage { events, floor })
    }

    /// One more than the highest seq in the log (1 when it is empty).
    async fn next_seq(&self) -> Result<i64, StoreError>;

    /// Up to `limit` events of `source_id` matching `filter` with `floor <= seq < below`, newest
    /// first: a range of the log's primary key, the source and filters checked on its rows.
    async fn list_range(
        &self,
        source_id: &str,
        filter: &EventFilter,
        floor: i64,
        below: i64,
        limit: i64,
    ) -> Result<Vec<LoggedEvent>, StoreError>;

    /// [`EventLog::list_page`] over the whole log (tests: their logs are small).
    #[cfg(test)]
    async fn list_events(
        &self,
        source_id: &str,
        filter: &EventFilter,
        before_seq: Option<i64>,
        limit: i64,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        Ok(self
            .list_page(source_id, filter, before_seq, limit, i64::MAX)
            .await?
            .events)
    }

    /// The log's current head: a tail starting here sees every event committed from now on (and
    /// possibly a few committed just before).
    async fn head(&self) -> Result<Cursor, StoreError>;

    /// Up to `limit` events of `source_id` matching `filter` after `after`, in commit order, that
    /// are settled (no earlier event can still appear behind them), and the position to read
    /// from next. Events committed later never appear at or before `next`.
    async fn tail_events(
        &self,
        source_id: &str,
        filter: &EventFilter,
        after: Cursor,
        limit: i64,
    ) -> Result<TailPage, StoreError>;
}

/// The event log on `db`, deduplicating message ids over `dedup_window`.
pub(crate) fn open(db: Database, dedup_window: Duration) -> std::sync::Arc<dyn EventLog> {
    match db {
        Database::Postgres(pool) => std::sync::Arc::new(PgEventLog::new(pool, dedup_window)),
        Database::Sqlite(pool) => std::sync::Arc::new(SqliteEventLog::new(pool, dedup_window)),
    }
}

/// The positions in `events` of the first message of each (source, message id), sorted by that
/// key: the rows to offer to the dedup table (in a fixed order, so concurrent appends of
/// overlapping batches take their row locks in the same order and cannot deadlock).
pub(crate) fn first_of_each_key(events: &[NewEvent]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..events.len()).collect();
    // Stable: among equal keys the first position stays first.
    order.sort_by(|&a, &b| {
        (&events[a].source_id, &events[a].message_id)
            .cmp(&(&events[b].source_id, &events[b].message_id))
    });
    order.dedup_by(|&mut later, &mut first| {
        events[later].source_id == events[first].source_id
            && events[later].message_id == events[first].message_id
    });
    order
}

/// The trace context of a logged event, from its two nullable columns.
pub(crate) fn trace(parent: Option<String>, state: Option<String>) -> Option<TraceParent> {
    parent.map(|traceparent| TraceParent {
        traceparent,
        tracestate: state.unwrap_or_default(),
    })
}

/// The results of an append, given the requested events and the ids of the stored rows that the
/// insert returned (new) or found (duplicates), keyed by (source, message id).
pub(crate) fn collate(
    events: &[NewEvent],
    stored: &std::collections::HashMap<(String, String), Uuid>,
) -> Vec<Appended> {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .map(|e| {
            let key = (e.source_id.clone(), e.message_id.clone());
            let event_id = stored.get(&key).copied().unwrap_or(e.event_id);
            // New only if our row is the stored one and this is its first mention in the batch.
            let is_new = event_id == e.event_id && seen.insert(key);
            Appended { event_id, is_new }
        })
        .collect()
}
