//! Group commit: the events of concurrent requests reach the log in one append (one statement,
//! one commit), so under load the log pays its per-statement and per-commit costs once for
//! many requests. A few writers each take whatever requests are waiting when they are free, so
//! a lone request is appended at once and waits for no one.

use std::sync::Arc;

use tessera_store::StoreError;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::store::{Appended, EventLog, NewEvent};

/// Stop adding requests to a group once its payloads reach this many bytes.
const MAX_GROUP_BYTES: usize = 8 << 20;

/// What a request gets back: its own events and one result for each.
type Reply = Result<(Vec<NewEvent>, Vec<Appended>), StoreError>;

struct Pending {
    rows: Vec<NewEvent>,
    reply: oneshot::Sender<Reply>,
}

/// The queue of requests waiting for a writer.
#[derive(Debug, Clone)]
pub(crate) struct GroupAppend {
    queue: mpsc::Sender<Pending>,
}

impl GroupAppend {
    /// Starts `writers` writers on `log`, each appending up to about `max_events` events at a
    /// time (a single larger request is appended alone). They stop when the last handle goes.
    pub(crate) fn start(log: Arc<dyn EventLog>, writers: usize, max_events: usize) -> Self {
        let writers = writers.max(1);
        let (queue, waiting) = mpsc::channel(writers * 64);
        let waiting = Arc::new(Mutex::new(waiting));
        for _ in 0..writers {
            tokio::spawn(write(log.clone(), waiting.clone(), max_events.max(1)));
        }
        Self { queue }
    }

    /// Appends `rows` with whatever other requests are waiting, and returns them with one
    /// result each, once they are durable. Dropping the future does not stop the append.
    pub(crate) async fn append(&self, rows: Vec<NewEvent>) -> Reply {
        let (reply, answer) = oneshot::channel();
        // A closed queue or a dropped reply means the writers are gone (a panic in the log);
        // the request failed and the client retries.
        if self.queue.send(Pending { rows, reply }).await.is_err() {
            return Err(sqlx::Error::WorkerCrashed.into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err(sqlx::Error::WorkerCrashed.into()))
    }
}

/// One writer: takes the first waiting request and every other one waiting with it, up to the
/// group's limits, and appends them together.
async fn write(
    log: Arc<dyn EventLog>,
    waiting: Arc<Mutex<mpsc::Receiver<Pending>>>,
    max_events: usize,
) {
    loop {
        let group = {
            let mut waiting = waiting.lock().await;
            let Some(first) = waiting.recv().await else {
                return;
            };
            let mut events = first.rows.len();
            let mut bytes = payload_bytes(&first.rows);
            let mut group = vec![first];
            while events < max_events && bytes < MAX_GROUP_BYTES {
                let Ok(next) = waiting.try_recv() else { break };
                events += next.rows.len();
                bytes += payload_bytes(&next.rows);
                group.push(next);
            }
            group
        };
        commit(log.as_ref(), group).await;
    }
}

fn payload_bytes(rows: &[NewEvent]) -> usize {
    rows.iter().map(|r| r.payload.len()).sum()
}

/// Appends a group in one statement and answers each request. When a group of several fails,
/// each request is tried again on its own, so one request the log refuses fails alone (the
/// failed statement stored nothing).
async fn commit(log: &dyn EventLog, mut group: Vec<Pending>) {
    metrics::histogram!("tessera_ingestion_append_group_requests").record(group.len() as f64);
    if group.len() == 1
        && let Some(Pending { rows, reply }) = group.pop()
    {
        let result = log.append(&rows).await.map(|appended| (rows, appended));
        let _ = reply.send(result);
        return;
    }
    let counts: Vec<usize> = group.iter().map(|p| p.rows.len()).collect();
    let mut all = Vec::with_capacity(counts.iter().sum());
    let mut replies = Vec::with_capacity(group.len());
    for p in group {
        all.extend(p.rows);
        replies.push(p.reply);
    }
    match log.append(&all).await {
        Ok(appended) => {
            let mut rows = all.into_iter();
            let mut results = appended.into_iter();
            for (count, reply) in counts.into_iter().zip(replies) {
                let mine = rows.by_ref().take(count).collect();
                let answers = results.by_ref().take(count).collect();
                let _ = reply.send(Ok((mine, answers)));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, requests = counts.len(), "group append failed; retrying each request alone");
            let mut rows = all.into_iter();
            let alone = counts.into_iter().zip(replies).map(|(count, reply)| {
                let mine: Vec<NewEvent> = rows.by_ref().take(count).collect();
                async move {
                    let result = log.append(&mine).await.map(|appended| (mine, appended));
                    let _ = reply.send(result);
                }
            });
            futures::future::join_all(alone.collect::<Vec<_>>()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tessera_store::{Database, DbSettings};
    use tessera_testkit::TestDb;
    use time::OffsetDateTime;
    use uuid::Uuid;

    use super::*;
    use crate::store::EventFilter;
    use crate::{MIGRATIONS, SCHEMA};

    async fn postgres_log() -> (TestDb, Arc<dyn EventLog>) {
        let test_db = TestDb::new().await;
        let db = Database::connect(test_db.url(), SCHEMA, &DbSettings::default())
            .await
            .expect("connect");
        db.migrate(MIGRATIONS).await.expect("migrate");
        (test_db, crate::store::open(db, Duration::from_secs(3_600)))
    }

    fn event(message: &str, payload: &str) -> NewEvent {
        NewEvent {
            event_id: Uuid::now_v7(),
            source_id: "s".to_owned(),
            message_id: message.to_owned(),
            partition: 0,
            payload: payload.to_owned(),
            received_at: OffsetDateTime::now_utc(),
            trace: None,
        }
    }

    fn good(message: &str) -> NewEvent {
        event(
            message,
            &format!(r#"{{"messageId":"{message}","type":"track","userId":"u","event":"E"}}"#),
        )
    }

    fn pending(rows: Vec<NewEvent>) -> (Pending, oneshot::Receiver<Reply>) {
        let (reply, answer) = oneshot::channel();
        (Pending { rows, reply }, answer)
    }

    async fn logged(log: &Arc<dyn EventLog>) -> Vec<String> {
        let mut ids: Vec<String> = log
            .list_events("s", &EventFilter::default(), None, 1_000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.message_id)
            .collect();
        ids.sort();
        ids
    }

    /// Each request of a group gets back its own events, in its order, with its own results;
    /// a message id repeated by a later request of the group is that request's duplicate.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_group_answers_each_request_with_its_own_events() {
        let (_db, log) = postgres_log().await;
        let first = vec![good("a"), good("b")];
        let second = vec![good("c"), good("a"), good("d")];
        let third = vec![good("e")];
        let sent = [first.clone(), second.clone(), third.clone()];
        let (p1, a1) = pending(first);
        let (p2, a2) = pending(second);
        let (p3, a3) = pending(third);
        commit(log.as_ref(), vec![p1, p2, p3]).await;

        let mut answers = Vec::new();
        for (answer, sent) in [a1, a2, a3].into_iter().zip(&sent) {
            let (rows, results) = answer.await.unwrap().unwrap();
            let ids: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
            let want: Vec<Uuid> = sent.iter().map(|r| r.event_id).collect();
            assert_eq!(ids, want, "a request gets its own events back, in order");
            assert_eq!(results.len(), sent.len());
            answers.push(results);
        }
        assert!(answers[0].iter().all(|a| a.is_new));
        assert!(answers[1][0].is_new && answers[1][2].is_new);
        assert!(
            !answers[1][1].is_new,
            "a repeated in the group is a duplicate"
        );
        assert_eq!(answers[1][1].event_id, sent[0][0].event_id);
        assert!(answers[2][0].is_new);
        assert_eq!(logged(&log).await, ["a", "b", "c", "d", "e"]);
    }

    /// A request the log refuses (here a payload that is not JSON, which the transports never
    /// send) fails alone: the other requests of its group are stored and answered.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_request_the_log_refuses_fails_alone() {
        let (_db, log) = postgres_log().await;
        let bad = event("bad", r#"{"messageId":"bad","type":"track","event":"#);
        let (p1, a1) = pending(vec![good("a")]);
        let (p2, a2) = pending(vec![good("b"), bad]);
        let (p3, a3) = pending(vec![good("c")]);
        commit(log.as_ref(), vec![p1, p2, p3]).await;
        assert!(a1.await.unwrap().is_ok());
        assert!(a2.await.unwrap().is_err(), "the refused request fails");
        assert!(a3.await.unwrap().is_ok());
        assert_eq!(
            logged(&log).await,
            ["a", "c"],
            "nothing of the refused request is stored"
        );
    }

    /// Many concurrent requests through one writer: all are stored and each answered with its
    /// own events (most of them in groups).
    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_requests_through_one_writer_are_all_stored() {
        let (_db, log) = postgres_log().await;
        let appender = GroupAppend::start(log.clone(), 1, 50);
        let calls = (0..40).map(|r| {
            let appender = appender.clone();
            async move {
                let rows: Vec<NewEvent> = (0..5).map(|i| good(&format!("r{r:02}-{i}"))).collect();
                let ids: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
                let (back, results) = appender.append(rows).await.unwrap();
                assert_eq!(back.iter().map(|r| r.event_id).collect::<Vec<_>>(), ids);
                assert!(results.iter().all(|a| a.is_new));
            }
        });
        futures::future::join_all(calls).await;
        assert_eq!(logged(&log).await.len(), 200);
    }
}
