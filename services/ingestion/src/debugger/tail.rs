//! One live tail: a task that polls the log for a source's new events and feeds a bounded
//! channel that the gRPC response streams from.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tessera_proto::ingestion::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tonic::Status;

use super::{DebuggerError, Hub, debug_event};
use crate::store::{Cursor, EventFilter, EventLog};

/// How often a tail reads the log when nothing woke it: events accepted by other replicas show
/// up within about this long.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The most messages waiting for one consumer; beyond, events are skipped.
pub(crate) const CHANNEL_CAPACITY: usize = 256;

/// The most events read per query.
const PAGE: i64 = 100;

/// How long a tail waits for room before it starts skipping events.
const GRACE: Duration = Duration::from_secs(1);

/// The messages of one tail.
pub(crate) type TailStream =
    Pin<Box<dyn Stream<Item = Result<pb::TailEventsResponse, Status>> + Send + 'static>>;

/// Starts tailing the events of `source_id` matching `filter` after `from`; the tail holds
/// `permit` until it ends.
pub(crate) fn spawn(
    log: Arc<dyn EventLog>,
    hub: &Hub,
    source_id: String,
    filter: EventFilter,
    from: Cursor,
    permit: OwnedSemaphorePermit,
) -> TailStream {
    let (tx, mut rx) = mpsc::channel(CHANNEL_CAPACITY);
    let tail = Tail {
        log,
        wake: hub.accepted.subscribe(),
        stop: hub.stop.clone(),
        source_id,
        filter,
        tx,
        skipped: 0,
    };
    tokio::spawn(async move {
        let _permit = permit;
        metrics::gauge!("tessera_ingestion_debugger_tails").increment(1.0);
        tail.run(from).await;
        metrics::gauge!("tessera_ingestion_debugger_tails").decrement(1.0);
    });
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

struct Tail {
    log: Arc<dyn EventLog>,
    wake: tokio::sync::broadcast::Receiver<Arc<str>>,
    stop: tessera_server::Shutdown,
    source_id: String,
    filter: EventFilter,
    tx: mpsc::Sender<Result<pb::TailEventsResponse, Status>>,
    /// Events skipped since the consumer last had room.
    skipped: u64,
}

impl Tail {
    /// Polls until shutdown, the consumer going away, or an error (sent as the last message).
    async fn run(mut self, mut cursor: Cursor) {
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let page = match self
                .log
                .tail_events(&self.source_id, &self.filter, cursor, PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) => return self.fail(e.into()),
            };
            cursor = page.next;
            let full = i64::try_from(page.events.len()).unwrap_or(i64::MAX) >= PAGE;
            for logged in page.events {
                let event = match debug_event(logged) {
                    Ok(event) => event,
                    Err(e) => return self.fail(e.into()),
                };
                if !offer(&self.tx, event, &mut self.skipped, GRACE).await {
                    return;
                }
            }
            // Behind the head: read on at once.
            if !full && !self.idle().await {
                return;
            }
        }
    }

    /// Waits for the next poll: the interval, or a wake-up for this source. False when the tail
    /// should end.
    async fn idle(&mut self) -> bool {
        let sleep = tokio::time::sleep(POLL_INTERVAL);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return false,
                () = self.tx.closed() => return false,
                () = &mut sleep => return true,
                woken = self.wake.recv() => match woken {
                    Ok(source) if *source == *self.source_id => return true,
                    Ok(_) => {}
                    // Missed notices may have been ours.
                    Err(RecvError::Lagged(_)) => return true,
                    Err(RecvError::Closed) => {
                        (&mut sleep).await;
                        return true;
                    }
                },
            }
        }
    }

    /// Ends the tail with `e` as its last message (when there is room for it).
    fn fail(self, e: DebuggerError) {
        let _ = self.tx.try_send(Err(e.into()));
    }
}

/// Offers `event` to the consumer. While it keeps up, waits up to `grace` for room; once it has
/// not, skips events without waiting (so the tail stays at the head of the log) until there is
/// room again, and then says how many were skipped. False when the consumer is gone.
async fn offer(
    tx: &mpsc::Sender<Result<pb::TailEventsResponse, Status>>,
    event: pb::DebugEvent,
    skipped: &mut u64,
    grace: Duration,
) -> bool {
    let message = pb::TailEventsResponse {
        event: Some(event),
        skipped: *skipped,
    };
    if *skipped == 0 {
        return match tokio::time::timeout(grace, tx.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(Ok(message));
                true
            }
            Ok(Err(_closed)) => false,
            Err(_elapsed) => {
                *skipped = 1;
                metrics::counter!("tessera_ingestion_debugger_skipped_total").increment(1);
                true
            }
        };
    }
    match tx.try_send(Ok(message)) {
        Ok(()) => {
            *skipped = 0;
            true
        }
        Err(TrySendError::Full(_)) => {
            *skipped += 1;
            metrics::counter!("tessera_ingestion_debugger_skipped_total").increment(1);
            true
        }
        Err(TrySendError::Closed(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> pb::DebugEvent {
        pb::DebugEvent {
            event_id: id.to_owned(),
            ..pb::DebugEvent::default()
        }
    }

    #[tokio::test]
    async fn a_slow_consumer_has_events_skipped_and_is_told_how_many() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut skipped = 0;
        let grace = Duration::from_millis(10);
        for id in ["a", "b", "c", "d", "e"] {
            assert!(offer(&tx, event(id), &mut skipped, grace).await);
        }
        assert_eq!(skipped, 3, "c, d and e found no room");
        let got: Vec<_> = [rx.recv().await, rx.recv().await]
            .into_iter()
            .map(|m| m.unwrap().unwrap().event.unwrap().event_id)
            .collect();
        assert_eq!(got, ["a", "b"]);
        assert!(offer(&tx, event("f"), &mut skipped, grace).await);
        let next = rx.recv().await.unwrap().unwrap();
        assert_eq!(next.event.unwrap().event_id, "f");
        assert_eq!(next.skipped, 3);
        assert_eq!(skipped, 0);
        drop(rx);
        assert!(!offer(&tx, event("g"), &mut skipped, grace).await);
    }
}
