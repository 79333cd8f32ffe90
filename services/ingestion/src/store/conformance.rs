//! The event log's conformance suite: the same tests against Postgres and SQLite.

use std::sync::Arc;
use std::time::Duration;

use tessera_server::trace_context::TraceParent;
use tessera_store::{Database, DbSettings};
use tessera_testkit::{TestDb, TestSqlite};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Cursor, EventFilter, EventLog, LoggedEvent, NewEvent, Person};
use crate::{MIGRATIONS, SCHEMA};

/// Keeps the backing database alive for the test's duration (dropping it drops the database).
enum Guard {
    Pg(#[allow(dead_code)] TestDb),
    Sqlite(#[allow(dead_code)] TestSqlite),
}

async fn open(url: &str) -> (Database, Arc<dyn EventLog>) {
    let db = Database::connect(url, SCHEMA, &DbSettings::default())
        .await
        .expect("connect");
    db.migrate(MIGRATIONS).await.expect("migrate");
    (db.clone(), super::open(db, WINDOW))
}

async fn postgres() -> (Guard, Database, Arc<dyn EventLog>) {
    let test_db = TestDb::new().await;
    let (db, log) = open(test_db.url()).await;
    (Guard::Pg(test_db), db, log)
}

async fn sqlite() -> (Guard, Database, Arc<dyn EventLog>) {
    let dir = TestSqlite::new();
    let (db, log) = open(&dir.url("ingestion.db")).await;
    (Guard::Sqlite(dir), db, log)
}

fn event(source: &str, message: &str, partition: i32) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        source_id: source.to_owned(),
        message_id: message.to_owned(),
        partition,
        payload: format!(r#"{{"messageId":"{message}","type":"track","userId":"u","event":"E"}}"#),
        received_at: OffsetDateTime::now_utc(),
        trace: None,
    }
}

/// The dedup window of the logs under test.
const WINDOW: Duration = Duration::from_secs(3_600);

const LEASE: Duration = Duration::from_secs(30);

/// Reads until `want` events are visible: on Postgres a row becomes deliverable only once every
/// older transaction in the cluster has ended, which other tests' transactions can delay.
async fn read_settled(
    log: &Arc<dyn EventLog>,
    partition: i32,
    after: Cursor,
    limit: i64,
    want: usize,
) -> Vec<super::StoredEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = log.read_after(partition, after, limit).await.unwrap();
        if got.len() >= want || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let (_guard, db, log) = super::postgres().await;
                    super::$name(db, log).await;
                }
            )*
        }
        mod sqlite_backend {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let (_guard, db, log) = super::sqlite().await;
                    super::$name(db, log).await;
                }
            )*
        }
    };
}

conformance!(
    appends_and_deduplicates,
    concurrent_duplicates_agree_on_one_event,
    deduplicates_only_within_the_window,
    keeps_the_batch_order_in_the_log,
    reads_each_partition_in_order_after_the_cursor,
    reads_several_partitions_in_one_call,
    leases_are_shared_fairly_and_fence_the_cursor,
    backlog_counts_undelivered_events,
    lists_a_sources_events_newest_first_with_filters,
    a_page_looks_through_a_bounded_range_of_the_log,
    tails_settled_events_after_the_head,
    forgets_events_and_their_message_ids,
    forgets_the_quarantined_messages_of_a_person,
    keeps_each_events_trace_context,
    a_delivery_round_reads_about_what_it_delivers,
);

/// A delivery round reads each partition's share, gives the budget the short partitions leave
/// to the long ones, and reads at most one event per partition beyond its limit; what it
/// reads is each partition's next events in log order.
async fn a_delivery_round_reads_about_what_it_delivers(_db: Database, log: Arc<dyn EventLog>) {
    log.ensure_partitions(4).await.unwrap();
    let waiting = [45usize, 3, 0, 20];
    for (partition, n) in waiting.iter().enumerate() {
        let events: Vec<NewEvent> = (0..*n)
            .map(|i| event("s", &format!("p{partition}-{i}"), partition as i32))
            .collect();
        if !events.is_empty() {
            log.append(&events).await.unwrap();
        }
    }
    let mut all = Vec::new();
    for (partition, n) in waiting.iter().enumerate() {
        all.push(read_settled(&log, partition as i32, Cursor::default(), 100, *n).await);
        assert_eq!(all[partition].len(), *n);
    }
    let ids = |events: &[super::StoredEvent]| -> Vec<Uuid> {
        events.iter().map(|e| e.event_id).collect()
    };
    let leases = |cursors: [Cursor; 4]| -> Vec<super::Lease> {
        (0..4)
            .map(|partition| super::Lease {
                partition,
                cursor: cursors[partition as usize],
            })
            .collect()
    };

    // 68 wait and 30 fit: shares of 8, then the two long partitions share what is left.
    let round = crate::delivery::read_round(log.as_ref(), &leases([Cursor::default(); 4]), 30)
        .await
        .unwrap();
    let total: usize = round.iter().map(Vec::len).sum();
    assert!((30..=33).contains(&total), "read {total} for a round of 30");
    assert_eq!(round[1].len(), 3, "the short partition is emptied");
    assert!(round[2].is_empty());
    assert!(
        round[0].len() >= 13 && round[3].len() >= 13,
        "{:?}",
        round.iter().map(Vec::len).collect::<Vec<_>>()
    );
    for (partition, got) in round.iter().enumerate() {
        assert_eq!(
            ids(got),
            ids(&all[partition][..got.len()]),
            "partition {partition} in order"
        );
    }

    // Everything fits: everything is read, from each lease's cursor on.
    let mut cursors = [Cursor::default(); 4];
    cursors[0] = all[0][39].cursor;
    let round = crate::delivery::read_round(log.as_ref(), &leases(cursors), 500)
        .await
        .unwrap();
    assert_eq!(ids(&round[0]), ids(&all[0][40..]));
    assert_eq!(ids(&round[1]), ids(&all[1]));
    assert!(round[2].is_empty());
    assert_eq!(ids(&round[3]), ids(&all[3]));
}

async fn keeps_each_events_trace_context(_db: Database, log: Arc<dyn EventLog>) {
    log.ensure_partitions(1).await.unwrap();
    let traced = |message: &str, traceparent: &str, tracestate: &str| NewEvent {
        trace: Some(TraceParent {
            traceparent: traceparent.to_owned(),
            tracestate: tracestate.to_owned(),
        }),
        ..event("s", message, 0)
    };
    let a = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let b = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    // One append, traced and untraced messages mixed; a duplicate keeps the original's context.
    log.append(&[
        traced("m1", a, "vendor=x"),
        event("s", "m2", 0),
        traced("m3", b, ""),
        traced("m1", b, ""),
    ])
    .await
    .unwrap();
    let got = read_settled(&log, 0, Cursor::default(), 10, 3).await;
    let traces: Vec<_> = got.iter().map(|e| e.trace.clone()).collect();
    assert_eq!(
        traces,
        [
            Some(TraceParent {
                traceparent: a.to_owned(),
                tracestate: "vendor=x".to_owned(),
            }),
            None,
            Some(TraceParent {
                traceparent: b.to_owned(),
                tracestate: String::new(),
            }),
        ]
    );
}

async fn appends_and_deduplicates(_db: Database, log: Arc<dyn EventLog>) {
    let first = vec![
        event("s", "m1", 0),
        event("s", "m2", 0),
        event("other", "m1", 0),
    ];
    let got = log.append(&first).await.unwrap();
    assert!(got.iter().all(|a| a.is_new));
    assert_eq!(got[0].event_id, first[0].event_id);

    // The same messages again, plus a repeat inside the batch: duplicates keep the original id.
    let again = vec![
        event("s", "m1", 0),
        event("s", "m3", 0),
        event("s", "m3", 0),
    ];
    let got = log.append(&again).await.unwrap();
    assert!(!got[0].is_new);
    assert_eq!(got[0].event_id, first[0].event_id);
    assert!(got[1].is_new);
    assert!(!got[2].is_new);
    assert_eq!(got[2].event_id, got[1].event_id);
    assert!(log.append(&[]).await.unwrap().is_empty());
}

/// Requests that race with the same message ids (client retries on several replicas): each id
/// is logged once, exactly one request reports it new, and every other reports that event.
async fn concurrent_duplicates_agree_on_one_event(_db: Database, log: Arc<dyn EventLog>) {
    let keys: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    let mut tasks = Vec::new();
    for task in 0..8 {
        let log = log.clone();
        // Each request holds every key, in its own order, with its own event ids.
        let mut batch: Vec<NewEvent> = keys.iter().map(|k| event("s", k, 0)).collect();
        batch.rotate_left(task * 7);
        tasks.push(tokio::spawn(async move {
            let got = log.append(&batch).await.unwrap();
            batch.into_iter().zip(got).collect::<Vec<_>>()
        }));
    }
    let mut winner = std::collections::HashMap::new();
    let mut answers = Vec::new();
    for task in tasks {
        for (sent, got) in task.await.unwrap() {
            if got.is_new {
                assert_eq!(got.event_id, sent.event_id, "a new event keeps its own id");
                let before = winner.insert(sent.message_id.clone(), got.event_id);
                assert!(before.is_none(), "{} reported new twice", sent.message_id);
            }
            answers.push((sent.message_id, got.event_id));
        }
    }
    assert_eq!(
        winner.len(),
        keys.len(),
        "every message id was logged by one request"
    );
    for (message, event_id) in answers {
        assert_eq!(
            event_id, winner[&message],
            "{message}: every answer names the logged event"
        );
    }
    let listed = log
        .list_events("s", &EventFilter::default(), None, 1_000)
        .await
        .unwrap();
    assert_eq!(
        listed.len(),
        keys.len(),
        "each message id is in the log once"
    );
}

async fn deduplicates_only_within_the_window(_db: Database, log: Arc<dyn EventLog>) {
    let hours_ago = |h: i64| OffsetDateTime::now_utc() - time::Duration::hours(h);
    let mut old = event("s", "m1", 0);
    old.received_at = hours_ago(3);
    let mut recent = event("s", "m2", 0);
    recent.received_at = hours_ago(2);
    log.append(&[old.clone(), recent.clone()]).await.unwrap();

    // Two hours later: m1 was first accepted 3 h before (outside the 1 h window), m2 only
    // 30 minutes before.
    let mut m1 = event("s", "m1", 0);
    m1.received_at = hours_ago(0);
    let mut m2 = event("s", "m2", 0);
    m2.received_at = hours_ago(2) + time::Duration::minutes(30);
    let got = log.append(&[m1.clone(), m2.clone()]).await.unwrap();
    assert!(got[0].is_new, "outside the window: accepted again");
    assert_eq!(got[0].event_id, m1.event_id);
    assert!(!got[1].is_new, "inside the window: a duplicate");
    assert_eq!(got[1].event_id, recent.event_id);

    // The window now runs from the re-accepted copy.
    let again = event("s", "m1", 0);
    let got = log.append(&[again]).await.unwrap();
    assert!(!got[0].is_new);
    assert_eq!(got[0].event_id, m1.event_id);

    // Both copies of m1 are in the log.
    let listed = log
        .list_events("s", &EventFilter::default(), None, 10)
        .await
        .unwrap();
    let m1_ids: Vec<Uuid> = listed
        .iter()
        .filter(|e| e.message_id == "m1")
        .map(|e| e.event_id)
        .collect();
    assert_eq!(m1_ids, vec![m1.event_id, old.event_id]);

    // Pruning forgets only ids older than the window: m2 (accepted 2 h ago), not m1 (just now).
    assert_eq!(log.prune_message_ids(100).await.unwrap(), 1);
    assert_eq!(log.prune_message_ids(100).await.unwrap(), 0);
    let got = log.append(&[event("s", "m2", 0)]).await.unwrap();
    assert!(got[0].is_new, "a forgotten id is accepted again");
    let got = log.append(&[event("s", "m1", 0)]).await.unwrap();
    assert!(!got[0].is_new);
}

async fn keeps_the_batch_order_in_the_log(_db: Database, log: Arc<dyn EventLog>) {
    log.ensure_partitions(1).await.unwrap();
    // Keys deliberately out of sorted order, with a repeat.
    let batch: Vec<_> = ["z", "b", "y", "b", "a", "x"]
        .iter()
        .map(|m| event("s", m, 0))
        .collect();
    let got = log.append(&batch).await.unwrap();
    assert_eq!(
        got.iter().map(|a| a.is_new).collect::<Vec<_>>(),
        vec![true, true, true, false, true, true]
    );
    assert_eq!(got[3].event_id, batch[1].event_id);
    let read = read_settled(&log, 0, Cursor::default(), 100, 5).await;
    let order: Vec<Uuid> = read.iter().map(|e| e.event_id).collect();
    let want: Vec<Uuid> = [0, 1, 2, 4, 5].iter().map(|&i| batch[i].event_id).collect();
    assert_eq!(order, want);
}

async fn reads_each_partition_in_order_after_the_cursor(_db: Database, log: Arc<dyn EventLog>) {
    log.ensure_partitions(2).await.unwrap();
    let batch: Vec<_> = (0..10)
        .map(|i| event("s", &format!("m{i}"), i % 2))
        .collect();
    log.append(&batch).await.unwrap();
    let p0 = read_settled(&log, 0, Cursor::default(), 100, 5).await;
    let ids: Vec<_> = p0.iter().map(|e| e.event_id).collect();
    let want: Vec<_> = batch
        .iter()
        .filter(|e| e.partition == 0)
        .map(|e| e.event_id)
        .collect();
    assert_eq!(ids, want);
    assert!(p0.windows(2).all(|w| w[0].cursor < w[1].cursor));
    let rest = read_settled(&log, 0, p0[1].cursor, 100, 3).await;
    assert_eq!(rest.len(), 3);
    assert_eq!(rest[0].event_id, want[2]);
    let limited = read_settled(&log, 1, Cursor::default(), 2, 2).await;
    assert_eq!(limited.len(), 2);
}

async fn reads_several_partitions_in_one_call(_db: Database, log: Arc<dyn EventLog>) {
    log.ensure_partitions(3).await.unwrap();
    let batch: Vec<_> = (0..12)
        .map(|i| event("s", &format!("m{i}"), i % 3))
        .collect();
    log.append(&batch).await.unwrap();
    let of = |p: i32| -> Vec<Uuid> {
        batch
            .iter()
            .filter(|e| e.partition == p)
            .map(|e| e.event_id)
            .collect()
    };
    // Settled first (see `read_settled`), so the reads below see every event.
    let p0 = read_settled(&log, 0, Cursor::default(), 100, 4).await;
    read_settled(&log, 2, Cursor::default(), 100, 4).await;
    assert_eq!(log.read_after_each(&[], 10).await.unwrap().len(), 0);

    // Each read from its own cursor, with the limit applied per read, answered in the order
    // asked (not partition order), an empty list for a partition with nothing after its cursor.
    let reads = log
        .read_after_each(
            &[
                (2, Cursor::default()),
                (0, p0[0].cursor),
                (1, Cursor::default()),
                (0, p0[3].cursor),
            ],
            3,
        )
        .await
        .unwrap();
    let ids: Vec<Vec<Uuid>> = reads
        .iter()
        .map(|r| r.iter().map(|e| e.event_id).collect())
        .collect();
    assert_eq!(
        ids,
        [
            of(2)[..3].to_vec(),
            of(0)[1..4].to_vec(),
            of(1)[..3].to_vec(),
            Vec::new()
        ]
    );
    assert!(
        reads
            .iter()
            .all(|r| r.windows(2).all(|w| w[0].cursor < w[1].cursor))
    );
    // The same as one read at a time.
    for (read, (partition, after)) in reads.iter().zip([
        (2, Cursor::default()),
        (0, p0[0].cursor),
        (1, Cursor::default()),
    ]) {
        let key = |r: &[super::StoredEvent]| -> Vec<(Uuid, Cursor, String)> {
            r.iter()
                .map(|e| (e.event_id, e.cursor, e.payload.clone()))
                .collect()
        };
        let one = log.read_after(partition, after, 3).await.unwrap();
        assert_eq!(key(read), key(&one));
    }
}

async fn leases_are_shared_fairly_and_fence_the_cursor(_db: Database, log: Arc<dyn EventLog>) {
    assert_eq!(log.ensure_partitions(4).await.unwrap(), 4);
    // Partitions already there are kept: the stored count wins.
    assert_eq!(log.ensure_partitions(2).await.unwrap(), 4);
    assert_eq!(log.heartbeat("a", LEASE).await.unwrap(), 1);
    assert_eq!(log.heartbeat("b", LEASE).await.unwrap(), 2);
    let a = log.lease("a", 2, LEASE).await.unwrap();
    let b = log.lease("b", 4, LEASE).await.unwrap();
    assert_eq!(a.len(), 2);
    assert_eq!(b.len(), 2, "b gets only what a does not hold");
    assert!(
        a.iter()
            .all(|l| b.iter().all(|m| m.partition != l.partition))
    );

    let p = a[0].partition;
    let to = Cursor { txid: 0, seq: 7 };
    let other = Cursor { txid: 0, seq: 9 };
    assert_eq!(
        log.advance("a", &[(p, to), (a[1].partition, other)])
            .await
            .unwrap(),
        [p, a[1].partition],
        "one call moves every partition held"
    );
    assert_eq!(
        log.advance("b", &[(p, to), (b[0].partition, other)])
            .await
            .unwrap(),
        [b[0].partition],
        "only the holder moves the cursor"
    );
    log.release("a", p).await.unwrap();
    let b = log.lease("b", 3, LEASE).await.unwrap();
    let taken = b
        .iter()
        .find(|l| l.partition == p)
        .expect("b took the released partition");
    assert_eq!(taken.cursor.seq, 7, "the cursor survives a change of owner");
}

async fn backlog_counts_undelivered_events(_db: Database, log: Arc<dyn EventLog>) {
    log.ensure_partitions(1).await.unwrap();
    log.append(&[event("s", "m1", 0), event("s", "m2", 0)])
        .await
        .unwrap();
    let backlog = log.backlog().await.unwrap();
    assert_eq!(backlog.events, 2);
    assert!(backlog.oldest.is_some());
    let leases = log.lease("a", 1, LEASE).await.unwrap();
    let read = read_settled(&log, 0, leases[0].cursor, 1, 1).await;
    assert_eq!(log.advance("a", &[(0, read[0].cursor)]).await.unwrap(), [0]);
    assert_eq!(log.backlog().await.unwrap().events, 1);
    let read = read_settled(&log, 0, read[0].cursor, 1, 1).await;
    assert_eq!(log.advance("a", &[(0, read[0].cursor)]).await.unwrap(), [0]);
    assert_eq!(
        log.backlog().await.unwrap(),
        super::Backlog {
            events: 0,
            oldest: None
        }
    );
}

/// A transaction that appended earlier but commits later must not be overtaken by the cursor.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_delivery_never_skips_a_late_commit() {
    let (_guard, db, log) = postgres().await;
    let Database::Postgres(pool) = &db else {
        unreachable!("postgres backend")
    };
    log.ensure_partitions(1).await.unwrap();
    // Transaction 1 inserts and stays open.
    let mut slow = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (event_id, source_id, message_id, partition, payload, received_at) \
         VALUES ($1, 's', 'slow', 0, '{}'::jsonb, now())",
    )
    .bind(Uuid::now_v7())
    .execute(&mut *slow)
    .await
    .unwrap();
    // Transaction 2 inserts and commits.
    log.append(&[event("s", "fast", 0)]).await.unwrap();
    let visible = log.read_after(0, Cursor::default(), 10).await.unwrap();
    assert!(
        visible.is_empty(),
        "nothing may be delivered past a running transaction's rows"
    );
    slow.commit().await.unwrap();
    let visible = read_settled(&log, 0, Cursor::default(), 10, 2).await;
    assert_eq!(visible.len(), 2, "both rows, the slow one first");
    assert!(visible[0].cursor < visible[1].cursor);
}

/// An event of `source` with a given type and track event name.
fn typed(source: &str, message: &str, kind: &str, name: &str) -> NewEvent {
    NewEvent {
        payload: format!(
            r#"{{"messageId":"{message}","type":"{kind}","userId":"u","event":"{name}"}}"#
        ),
        ..event(source, message, 0)
    }
}

fn messages(events: &[LoggedEvent]) -> Vec<&str> {
    events.iter().map(|e| e.message_id.as_str()).collect()
}

fn filter(kind: Option<&str>, name: Option<&str>) -> EventFilter {
    EventFilter {
        event_type: kind.map(str::to_owned),
        event_name: name.map(str::to_owned),
    }
}

/// A quiet source in a busy log: each page reads at most `scan` log positions, comes back
/// short (even empty) when the source has no events there, and says where to look further, so
/// walking the pages finds every event of the source at a bounded cost per page.
async fn a_page_looks_through_a_bounded_range_of_the_log(_db: Database, log: Arc<dyn EventLog>) {
    log.ensure_partitions(1).await.unwrap();
    // The log: q1, 20 of another source, q2, 20 more, q3 (seq from 1 in a fresh log).
    let mut batch = vec![typed("quiet", "q1", "track", "A")];
    batch.extend((0..20).map(|i| typed("busy", &format!("b{i}"), "track", "B")));
    batch.push(typed("quiet", "q2", "track", "A"));
    batch.extend((20..40).map(|i| typed("busy", &format!("b{i}"), "track", "B")));
    batch.push(typed("quiet", "q3", "track", "A"));
    log.append(&batch).await.unwrap();
    let all = EventFilter::default();

    let first = log.list_page("quiet", &all, None, 10, 15).await.unwrap();
    assert_eq!(
        messages(&first.events),
        ["q3"],
        "15 positions down from the head hold only q3"
    );
    assert!(first.floor > 1, "the page stopped above the log's start");
    let owned = |events: &[LoggedEvent]| -> Vec<String> {
        messages(events).into_iter().map(str::to_owned).collect()
    };
    let mut found = owned(&first.events);
    let mut before = first.floor;
    let mut pages = 1;
    loop {
        let page = log
            .list_page("quiet", &all, Some(before), 10, 15)
            .await
            .unwrap();
        pages += 1;
        found.extend(owned(&page.events));
        if page.floor <= 1 {
            break;
        }
        assert!(page.floor < before, "each page moves down the log");
        before = page.floor;
    }
    assert_eq!(found, ["q3", "q2", "q1"]);
    assert_eq!(pages, 3, "43 positions in pages of 15");

    // Without a bound (or a wide one) one page holds them all.
    let wide = log.list_page("quiet", &all, None, 10, 1_000).await.unwrap();
    assert_eq!(messages(&wide.events), ["q3", "q2", "q1"]);
    assert_eq!(wide.floor, 1);
}

async fn lists_a_sources_events_newest_first_with_filters(_db: Database, log: Arc<dyn EventLog>) {
    log.ensure_partitions(1).await.unwrap();
    log.append(&[
        typed("s", "m1", "track", "Signed Up"),
        typed("s", "m2", "identify", ""),
        typed("other", "o1", "track", "Signed Up"),
        typed("s", "m3", "track", "Clicked"),
        typed("s", "m4", "track", "Signed Up"),
    ])
    .await
    .unwrap();
    let all = EventFilter::default();
    let first = log.list_events("s", &all, None, 2).await.unwrap();
    assert_eq!(messages(&first), ["m4", "m3"]);
    let rest = log
        .list_events("s", &all, Some(first[1].cursor.seq), 10)
        .await
        .unwrap();
    assert_eq!(messages(&rest), ["m2", "m1"]);
    assert!(rest.iter().all(|e| !e.delivered));
    assert!(rest[1].payload.contains("Signed Up"));

    let tracks = filter(Some("track"), None);
    let got = log.list_events("s", &tracks, None, 10).await.unwrap();
    assert_eq!(messages(&got), ["m4", "m3", "m1"]);
    let signups = filter(Some("track"), Some("Signed Up"));
    let got = log.list_events("s", &signups, None, 10).await.unwrap();
    assert_eq!(messages(&got), ["m4", "m1"]);
    let got = log
        .list_events("s", &filter(Some("page"), None), None, 10)
        .await
        .unwrap();
    assert!(got.is_empty());
    assert!(
        log.list_events("nobody", &all, None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Delivery moves past the two oldest events of the partition: they show as delivered.
    let leases = log.lease("a", 1, LEASE).await.unwrap();
    let read = read_settled(&log, 0, leases[0].cursor, 2, 2).await;
    assert_eq!(log.advance("a", &[(0, read[1].cursor)]).await.unwrap(), [0]);
    let got = log.list_events("s", &all, None, 10).await.unwrap();
    let delivered: Vec<_> = got
        .iter()
        .map(|e| (e.message_id.as_str(), e.delivered))
        .collect();
    assert_eq!(
        delivered,
        [("m4", false), ("m3", false), ("m2", true), ("m1", true)]
    );
}

/// Tails until `want` events arrived or 20 s passed (Postgres settles rows only once every older
/// transaction of the cluster has ended).
async fn tail_settled(
    log: &Arc<dyn EventLog>,
    source: &str,
    filter: &EventFilter,
    mut from: Cursor,
    want: usize,
) -> (Vec<LoggedEvent>, Cursor) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    loop {
        let page = log.tail_events(source, filter, from, 2).await.unwrap();
        assert!(page.next >= from, "the position never moves back");
        from = page.next;
        got.extend(page.events);
        if got.len() >= want || tokio::time::Instant::now() >= deadline {
            return (got, from);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn tails_settled_events_after_the_head(_db: Database, log: Arc<dyn EventLog>) {
    log.ensure_partitions(2).await.unwrap();
    log.append(&[typed("s", "before", "track", "Old")])
        .await
        .unwrap();
    // Let the earlier append settle, so the head is past it.
    let (old, _) = tail_settled(&log, "s", &EventFilter::default(), Cursor::default(), 1).await;
    assert_eq!(messages(&old), ["before"]);
    let head = log.head().await.unwrap();
    log.append(&[
        typed("s", "n1", "track", "A"),
        typed("other", "x1", "track", "A"),
        NewEvent {
            partition: 1,
            ..typed("s", "n2", "identify", "")
        },
    ])
    .await
    .unwrap();
    log.append(&[typed("s", "n3", "track", "A")]).await.unwrap();
    let all = EventFilter::default();
    let (got, next) = tail_settled(&log, "s", &all, head, 3).await;
    assert_eq!(
        messages(&got),
        ["n1", "n2", "n3"],
        "in commit order, pages of 2"
    );
    assert!(got.windows(2).all(|w| w[0].cursor < w[1].cursor));
    // Nothing more from where it stopped, until something new is appended.
    let page = log.tail_events("s", &all, next, 10).await.unwrap();
    assert!(page.events.is_empty());
    log.append(&[typed("s", "n4", "track", "B")]).await.unwrap();
    let (got, _) = tail_settled(&log, "s", &all, page.next, 1).await;
    assert_eq!(messages(&got), ["n4"]);
    let (got, _) = tail_settled(&log, "s", &filter(None, Some("A")), head, 2).await;
    assert_eq!(messages(&got), ["n1", "n3"]);
}

async fn forgets_events_and_their_message_ids(_db: Database, log: Arc<dyn EventLog>) {
    log.ensure_partitions(1).await.unwrap();
    let hours_ago = |h: i64| OffsetDateTime::now_utc() - time::Duration::hours(h);
    // m0 was accepted 3 h ago (outside the 1 h window) and again now: its dedup key belongs to
    // the later copy.
    let old = NewEvent {
        received_at: hours_ago(3),
        ..event("s", "m0", 0)
    };
    log.append(std::slice::from_ref(&old)).await.unwrap();
    let batch = vec![
        event("s", "m0", 0),
        event("s", "m1", 0),
        event("s", "m2", 0),
        event("s", "m3", 0),
    ];
    assert!(log.append(&batch).await.unwrap().iter().all(|a| a.is_new));
    let absent = Uuid::now_v7();
    let nobody = Person::default();

    let forgotten = log
        .forget(
            &[old.event_id, batch[1].event_id, batch[2].event_id, absent],
            &nobody,
        )
        .await
        .unwrap();
    assert_eq!(forgotten.events, 3, "the absent id is not counted");
    assert_eq!(forgotten.quarantined, 0);
    let again = log
        .forget(&[old.event_id, batch[1].event_id], &nobody)
        .await
        .unwrap();
    assert_eq!(
        again.events, 0,
        "idempotent: events already gone are not counted"
    );

    let listed = log
        .list_events("s", &EventFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(messages(&listed), ["m3", "m0"]);
    let read = read_settled(&log, 0, Cursor::default(), 10, 2).await;
    let delivered: Vec<Uuid> = read.iter().map(|e| e.event_id).collect();
    assert_eq!(delivered, [batch[0].event_id, batch[3].event_id]);

    // The forgotten events' message ids are accepted as new messages; the others still
    // deduplicate, m0 included (its key is the later copy's, which stays).
    let resent = vec![
        event("s", "m1", 0),
        event("s", "m2", 0),
        event("s", "m3", 0),
        event("s", "m0", 0),
    ];
    let got = log.append(&resent).await.unwrap();
    let new: Vec<bool> = got.iter().map(|a| a.is_new).collect();
    assert_eq!(new, [true, true, false, false]);
    assert_eq!(got[0].event_id, resent[0].event_id);
    assert_eq!(got[2].event_id, batch[3].event_id);
    assert_eq!(got[3].event_id, batch[0].event_id);

    assert_eq!(
        log.forget(&[], &nobody).await.unwrap(),
        super::Forgotten::default()
    );
}

async fn forgets_the_quarantined_messages_of_a_person(db: Database, log: Arc<dyn EventLog>) {
    use crate::plans::store::NewQuarantined;
    use crate::sources::PlanMode;

    let ingestion = crate::Ingestion::new(db.clone(), crate::IngestionSettings::default())
        .await
        .unwrap();
    let (a, _) = ingestion
        .add_source("a", None, PlanMode::Block)
        .await
        .unwrap();
    let (b, _) = ingestion
        .add_source("b", None, PlanMode::Block)
        .await
        .unwrap();
    let plans = crate::plans::store::open(db);
    let message = |source: Uuid, id: &str, payload: &str| NewQuarantined {
        source_id: source,
        message_id: id.to_owned(),
        payload: payload.to_owned(),
        violations: "[]".to_owned(),
        plan_version: 1,
        received_at: OffsetDateTime::now_utc(),
    };
    plans
        .quarantine(&[
            message(
                a.id,
                "by-user-id",
                r#"{"type":"track","userId":"u1","event":"E"}"#,
            ),
            message(
                b.id,
                "by-anonymous-id",
                r#"{"type":"page","anonymousId":" a1 "}"#,
            ),
            message(
                a.id,
                "by-previous-id",
                r#"{"type":"alias","userId":"u9","previousId":"a1"}"#,
            ),
            message(
                a.id,
                "by-trait",
                r#"{"type":"identify","userId":"u8","traits":{"email":"Alice@Example.COM"}}"#,
            ),
            message(
                b.id,
                "by-context-trait",
                r#"{"type":"track","anonymousId":"z","event":"E",
                    "context":{"traits":{"email":" alice@example.com"}}}"#,
            ),
            message(
                a.id,
                "other-user",
                r#"{"type":"track","userId":"u2","event":"E"}"#,
            ),
            message(
                a.id,
                "other-case",
                r#"{"type":"track","userId":"U1","event":"E"}"#,
            ),
            message(
                a.id,
                "other-field",
                r#"{"type":"track","anonymousId":"u1","event":"E"}"#,
            ),
            message(
                a.id,
                "other-email",
                r#"{"type":"identify","userId":"u7","traits":{"email":"bob@example.com"}}"#,
            ),
            message(
                a.id,
                "email-elsewhere",
                r#"{"type":"track","userId":"u6","event":"E",
                    "properties":{"email":"alice@example.com"}}"#,
            ),
        ])
        .await
        .unwrap();
    let person = Person {
        user_ids: vec!["u1".into()],
        anonymous_ids: vec!["a1".into()],
        emails: vec!["alice@example.com".into()],
    };

    let forgotten = log.forget(&[], &person).await.unwrap();
    assert_eq!(forgotten.quarantined, 5);
    assert_eq!(forgotten.events, 0);
    let mut kept = Vec::new();
    for source in [a.id, b.id] {
        for q in plans.list_quarantined(source, 0, 100).await.unwrap() {
            kept.push(q.message_id);
        }
    }
    assert_eq!(
        kept,
        [
            "other-user",
            "other-case",
            "other-field",
            "other-email",
            "email-elsewhere"
        ]
    );
    assert_eq!(log.forget(&[], &person).await.unwrap().quarantined, 0);
}
