//! The event log's conformance suite: the same tests against Postgres and SQLite.

use std::sync::Arc;
use std::time::Duration;

use tessera_store::{Database, DbSettings};
use tessera_testkit::{TestDb, TestSqlite};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Cursor, EventLog, NewEvent};
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
    (db.clone(), super::open(db))
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
    }
}

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
    reads_each_partition_in_order_after_the_cursor,
    leases_are_shared_fairly_and_fence_the_cursor,
    backlog_counts_undelivered_events,
);

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
    assert!(log.advance("a", p, to).await.unwrap());
    assert!(
        !log.advance("b", p, to).await.unwrap(),
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
    assert!(log.advance("a", 0, read[0].cursor).await.unwrap());
    assert_eq!(log.backlog().await.unwrap().events, 1);
    let read = read_settled(&log, 0, read[0].cursor, 1, 1).await;
    assert!(log.advance("a", 0, read[0].cursor).await.unwrap());
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
