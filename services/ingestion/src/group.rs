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
    if group.len() == 1 {
        let Pending { rows, reply } = group.pop().expect("one request");
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
