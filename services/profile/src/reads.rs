//! Grouped reads: the cache misses of concurrent requests reach the database in one statement,
//! so under load the store pays its per-statement cost (a round trip, a snapshot, an executor
//! start) once for many reads. A few readers each take whatever misses are waiting when they
//! are free, so a lone miss is read at once and waits for no one (as the ingestion's group
//! commit does for appends).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::domain::Profile;
use crate::error::ProfileError;
use crate::store::ProfileStore;

/// What a read gets back: the live profile its id resolves to, if it is stored.
type Reply = Result<Option<Profile>, ProfileError>;

struct Pending {
    profile_id: String,
    reply: oneshot::Sender<Reply>,
}

/// The queue of reads waiting for a reader.
#[derive(Debug, Clone)]
pub(crate) struct GroupRead {
    queue: mpsc::Sender<Pending>,
}

impl GroupRead {
    /// Starts `readers` readers on `store`, each reading up to `max_ids` profiles at a time.
    /// They stop when the last handle goes.
    pub(crate) fn start(store: Arc<dyn ProfileStore>, readers: usize, max_ids: usize) -> Self {
        let readers = readers.max(1);
        let (queue, waiting) = mpsc::channel(readers * 64);
        let waiting = Arc::new(Mutex::new(waiting));
        for _ in 0..readers {
            tokio::spawn(read(store.clone(), waiting.clone(), max_ids.max(1)));
        }
        Self { queue }
    }

    /// The live profile `profile_id` resolves to (see [`ProfileStore::get`]), read with
    /// whatever other reads are waiting. Dropping the future does not stop the read.
    pub(crate) async fn get(&self, profile_id: String) -> Reply {
        let (reply, answer) = oneshot::channel();
        // A closed queue or a dropped reply means the readers are gone (a panic in the store):
        // the read failed and the client retries.
        if self
            .queue
            .send(Pending { profile_id, reply })
            .await
            .is_err()
        {
            return Err(sqlx::Error::WorkerCrashed.into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err(sqlx::Error::WorkerCrashed.into()))
    }
}

/// One reader: takes the first waiting read and every other one waiting with it, up to
/// `max_ids`, and reads them together.
async fn read(
    store: Arc<dyn ProfileStore>,
    waiting: Arc<Mutex<mpsc::Receiver<Pending>>>,
    max_ids: usize,
) {
    loop {
        let group = {
            let mut waiting = waiting.lock().await;
            let Some(first) = waiting.recv().await else {
                return;
            };
            let mut group = vec![first];
            while group.len() < max_ids {
                let Ok(next) = waiting.try_recv() else { break };
                group.push(next);
            }
            group
        };
        answer(store.as_ref(), group).await;
    }
}

/// Reads a group in one call and answers each read. When a group of several fails, each read
/// is tried again on its own, so each gets its own answer.
async fn answer(store: &dyn ProfileStore, mut group: Vec<Pending>) {
    metrics::histogram!("tessera_profile_read_group_size").record(group.len() as f64);
    if group.len() == 1
        && let Some(Pending { profile_id, reply }) = group.pop()
    {
        let _ = reply.send(store.get(&profile_id).await);
        return;
    }
    let mut ids: Vec<String> = group.iter().map(|p| p.profile_id.clone()).collect();
    ids.sort_unstable();
    ids.dedup();
    match store.get_resolved(&ids).await {
        Ok(mut found) => {
            // Reads of one id (a retry beside its first try) share its profile: the last one
            // takes it, the others a copy.
            let mut left: HashMap<String, usize> = HashMap::with_capacity(ids.len());
            for p in &group {
                *left.entry(p.profile_id.clone()).or_default() += 1;
            }
            for Pending { profile_id, reply } in group {
                let last = left.get_mut(&profile_id).is_some_and(|n| {
                    *n -= 1;
                    *n == 0
                });
                let profile = if last {
                    found.remove(&profile_id)
                } else {
                    found.get(&profile_id).cloned()
                };
                let _ = reply.send(Ok(profile));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, reads = group.len(), "group read failed; retrying each read alone");
            let alone = group
                .into_iter()
                .map(|Pending { profile_id, reply }| async move {
                    let _ = reply.send(store.get(&profile_id).await);
                });
            futures::future::join_all(alone).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tessera_store::{Database, DbSettings};
    use tessera_testkit::TestDb;

    use super::*;
    use crate::{MIGRATIONS, SCHEMA};

    #[tokio::test]
    async fn a_group_answers_every_read_once_with_its_own_result() {
        let test_db = TestDb::new().await;
        let db = Database::connect(test_db.url(), SCHEMA, &DbSettings::default())
            .await
            .expect("connect");
        db.migrate(MIGRATIONS).await.expect("migrate");
        let store = crate::store::open(db);
        // One group by hand (a read of one id twice among them): every read is answered.
        let mut answers = Vec::new();
        let mut group = Vec::new();
        for id in ["x", "y", "x", "z"] {
            let (reply, answer) = oneshot::channel();
            group.push(Pending {
                profile_id: id.to_owned(),
                reply,
            });
            answers.push(answer);
        }
        answer(store.as_ref(), group).await;
        for answer in answers {
            assert!(
                matches!(answer.await, Ok(Ok(None))),
                "unknown ids read as absent"
            );
        }
        // Through the queue, concurrently: each read gets an answer.
        let reads = GroupRead::start(store, 2, 8);
        let all = futures::future::join_all((0..50).map(|i| reads.get(format!("p{i}")))).await;
        assert_eq!(all.len(), 50);
        assert!(all.iter().all(|r| matches!(r, Ok(None))));
    }
}
