//! The change stream (`WatchProfileChanges`): a task per consumer reads the change log after
//! the consumer's cursor and feeds a bounded channel the response streams from. It never skips
//! a change: when the consumer is slow the task waits (backpressure), and a consumer that
//! reconnects with its last cursor resumes right after it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tessera_core::FieldViolation;
use tessera_proto::convert::to_timestamp;
use tessera_proto::profile::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::ProfileError;
use crate::service::Inner;
use crate::store::{ChangeCursor, ProfileChange};

/// The kinds of change the stream carries.
pub(crate) const KINDS: [&str; 7] = [
    "updated",
    "merged",
    "split",
    "score_changed",
    "audience_entered",
    "audience_exited",
    "deleted",
];

/// How often a stream reads the log when nothing woke it: changes written by other replicas
/// show up within about this long.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The most changes read per query.
const PAGE: usize = 500;
/// The most changes waiting for one consumer before the stream waits for it.
const CHANNEL_CAPACITY: usize = 256;
/// The most audiences one stream may filter by.
const MAX_AUDIENCES: usize = 100;

/// The messages of one stream.
pub(crate) type ChangeStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchProfileChangesResponse, Status>> + Send + 'static>>;

/// Where a stream starts and what it carries.
struct Watch {
    start: Start,
    kinds: Vec<String>,
    audiences: Vec<String>,
}

enum Start {
    Now,
    After(ChangeCursor),
}

fn watch(request: pb::WatchProfileChangesRequest) -> Result<Watch, ProfileError> {
    let pb::WatchProfileChangesRequest {
        cursor,
        kinds,
        audiences,
    } = request;
    let mut violations = Vec::new();
    let start = match cursor.as_str() {
        "" => Start::Now,
        "beginning" => Start::After(ChangeCursor::default()),
        cursor => match cursor.parse() {
            Ok(c) => Start::After(c),
            Err(()) => {
                violations.push(FieldViolation::new(
                    "cursor",
                    "a cursor this stream sent, `beginning`, or empty for changes from now on",
                ));
                Start::Now
            }
        },
    };
    for (i, kind) in kinds.iter().enumerate() {
        if !KINDS.contains(&kind.as_str()) {
            violations.push(FieldViolation::new(
                format!("kinds[{i}]"),
                format!("one of {}", KINDS.join(", ")),
            ));
        }
    }
    if audiences.len() > MAX_AUDIENCES {
        violations.push(FieldViolation::new(
            "audiences",
            format!("at most {MAX_AUDIENCES}"),
        ));
    }
    if violations.is_empty() {
        Ok(Watch {
            start,
            kinds,
            audiences,
        })
    } else {
        Err(ProfileError::InvalidArgument(violations))
    }
}

impl Watch {
    fn wants(&self, change: &ProfileChange) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&change.kind))
            && (self.audiences.is_empty()
                || change.detail["audience"]
                    .as_str()
                    .is_some_and(|a| self.audiences.iter().any(|w| w == a)))
    }
}

fn message(change: ProfileChange) -> pb::WatchProfileChangesResponse {
    let d = &change.detail;
    let text = |key: &str| d[key].as_str().unwrap_or_default().to_owned();
    pb::WatchProfileChangesResponse {
        cursor: change.cursor.to_string(),
        profile_id: change.profile_id,
        kind: change.kind,
        at: Some(to_timestamp(change.at)),
        version: d["version"].as_i64().unwrap_or_default(),
        merged_into: text("into"),
        audience: text("audience"),
        score: text("score"),
        score_value: d["value"].as_f64().unwrap_or_default(),
        deleted_profile_ids: d["profile_ids"]
            .as_array()
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Starts a stream for `request`.
pub(crate) async fn spawn(
    inner: Arc<Inner>,
    request: pb::WatchProfileChangesRequest,
) -> Result<ChangeStream, ProfileError> {
    let watch = watch(request)?;
    let mut position = match watch.start {
        Start::After(cursor) => cursor,
        Start::Now => inner.store.change_horizon().await?,
    };
    let (tx, mut rx) = mpsc::channel(CHANNEL_CAPACITY);
    tokio::spawn(async move {
        metrics::gauge!("tessera_profile_change_streams").increment(1.0);
        loop {
            // Registered before reading, so a write that lands meanwhile still wakes us.
            let woken = inner.changed.notified();
            let changes = match inner.store.changes_after(position, PAGE).await {
                Ok(changes) => changes,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the change stream failed");
                    let _ = tx.send(Err(Status::from(e))).await;
                    break;
                }
            };
            let full = changes.len() == PAGE;
            for change in changes {
                position = change.cursor;
                if watch.wants(&change) && tx.send(Ok(message(change))).await.is_err() {
                    // The consumer went away.
                    metrics::gauge!("tessera_profile_change_streams").decrement(1.0);
                    return;
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep(POLL_INTERVAL) => {}
                () = tx.closed() => break,
                () = inner.streams_stop.cancelled() => {
                    let _ = tx
                        .send(Err(Status::unavailable(
                            "the server is shutting down; reconnect with the last cursor",
                        )))
                        .await;
                    break;
                }
            }
        }
        metrics::gauge!("tessera_profile_change_streams").decrement(1.0);
    });
    Ok(Box::pin(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
    })))
}
