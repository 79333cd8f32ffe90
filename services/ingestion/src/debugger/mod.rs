//! The source debugger: the latest stored events of a source, and a live tail of its events as
//! they are accepted, like Segment's source debugger.
//!
//! Design of the tail: every tail polls the event log from the log's head at the start of the
//! call, about every [`tail::POLL_INTERVAL`], reading only settled events in commit order (the
//! same rule delivery uses), so events accepted by any replica appear, none is skipped by a late
//! commit, and a tail costs one indexed-range query per poll whatever the number of replicas.
//! Events accepted by this replica wake its tails at once through a local broadcast of source
//! ids ([`Hub::accepted`]), so a local tail shows them without waiting for the next poll. Memory
//! per tail is bounded by a channel of [`tail::CHANNEL_CAPACITY`] messages plus one page: a
//! consumer that does not keep up has events skipped, and the next message it receives says how
//! many. Tails end when the delivery workers are told to stop, which `tessera` does first on
//! SIGTERM/SIGINT, so open streams never hold up a graceful shutdown.

mod error;
mod service;
mod tail;

use std::sync::Arc;

use tessera_core::FieldViolation;
use tessera_proto::common::v1 as common;
use tessera_proto::ingestion::v1 as pb;
use tokio::sync::{Semaphore, broadcast};

pub(crate) use error::DebuggerError;
pub(crate) use service::server;

use crate::store::{EventFilter, LoggedEvent};

/// The most events of one ListEvents page.
const MAX_PAGE_SIZE: i32 = 500;

/// The page size when the request sets none.
const DEFAULT_PAGE_SIZE: i32 = 50;

/// The most tails open at once on one replica: each polls the log.
const MAX_TAILS: usize = 64;

/// How many accepted-source notices wait for slow tails before older ones are dropped (a tail
/// that lags treats the gap as a wake-up, so nothing is lost but a little latency).
const WAKE_CAPACITY: usize = 1_024;

/// This replica's debugger state: wakes tails when events are accepted here, bounds how many
/// tails are open, and ends them on shutdown.
#[derive(Debug, Clone)]
pub(crate) struct Hub {
    accepted: broadcast::Sender<Arc<str>>,
    tails: Arc<Semaphore>,
    stop: tessera_server::Shutdown,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            accepted: broadcast::channel(WAKE_CAPACITY).0,
            tails: Arc::new(Semaphore::new(MAX_TAILS)),
            stop: tessera_server::Shutdown::new(),
        }
    }
}

impl Hub {
    /// Wakes the tails of `source_id`: this replica just stored new events of it.
    pub(crate) fn accepted(&self, source_id: &str) {
        if self.accepted.receiver_count() > 0 {
            // No receiver left in between is fine: there is nobody to wake.
            let _ = self.accepted.send(Arc::from(source_id));
        }
    }

    /// Ends every tail, now and later, once `shutdown` is cancelled.
    pub(crate) fn stop_on(&self, shutdown: tessera_server::Shutdown) {
        let stop = self.stop.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            stop.cancel();
        });
    }
}

/// The store filter of a request filter; violations name the field under `prefix`.
fn event_filter(
    filter: Option<pb::EventFilter>,
    prefix: &str,
) -> Result<EventFilter, Vec<FieldViolation>> {
    let pb::EventFilter { r#type, event_name } = filter.unwrap_or_default();
    let event_type = match common::EventType::try_from(r#type) {
        Ok(common::EventType::Unspecified) => None,
        Ok(common::EventType::Identify) => Some(tessera_core::EventType::Identify),
        Ok(common::EventType::Track) => Some(tessera_core::EventType::Track),
        Ok(common::EventType::Page) => Some(tessera_core::EventType::Page),
        Ok(common::EventType::Screen) => Some(tessera_core::EventType::Screen),
        Ok(common::EventType::Group) => Some(tessera_core::EventType::Group),
        Ok(common::EventType::Alias) => Some(tessera_core::EventType::Alias),
        Err(_) => {
            let unknown = r#type;
            return Err(vec![FieldViolation::new(
                format!("{prefix}.type"),
                format!("unknown event type {unknown}"),
            )]);
        }
    };
    Ok(EventFilter {
        event_type: event_type.map(|t| t.as_str().to_owned()),
        event_name: (!event_name.is_empty()).then_some(event_name),
    })
}

/// The number of events of a page: 1 to [`MAX_PAGE_SIZE`], 0 meaning [`DEFAULT_PAGE_SIZE`].
fn page_size(requested: i32) -> Result<i64, FieldViolation> {
    match requested {
        0 => Ok(i64::from(DEFAULT_PAGE_SIZE)),
        1..=MAX_PAGE_SIZE => Ok(i64::from(requested)),
        _ => Err(FieldViolation::new(
            "page_size",
            format!("must be between 0 and {MAX_PAGE_SIZE}"),
        )),
    }
}

/// The opaque token of the page after an event with `seq`.
fn page_token(seq: i64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("seq:{seq}"))
}

/// The seq a page token continues below; `None` for the first page.
fn before_seq(token: &str) -> Result<Option<i64>, FieldViolation> {
    use base64::Engine as _;
    if token.is_empty() {
        return Ok(None);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix("seq:")?.parse::<i64>().ok())
        .filter(|seq| *seq > 0)
        .map(Some)
        .ok_or_else(|| {
            FieldViolation::new(
                "page_token",
                "not a token returned as next_page_token by ListEvents",
            )
        })
}

/// The protobuf form of a stored event.
fn debug_event(logged: LoggedEvent) -> Result<pb::DebugEvent, serde_json::Error> {
    let LoggedEvent {
        cursor: _,
        event_id,
        message_id,
        payload,
        received_at,
        delivered,
    } = logged;
    let event: tessera_core::Event = serde_json::from_str(&payload)?;
    Ok(pb::DebugEvent {
        event_id: event_id.to_string(),
        message_id,
        receive_time: Some(tessera_proto::convert::to_timestamp(received_at)),
        delivered,
        event: Some(tessera_proto::convert::event_to_pb(&event)),
    })
}

/// The checks ListEvents and TailEvents make of a request before touching the log, for the
/// fuzz target `grpc_requests` (`fuzz/`).
pub(crate) fn fuzz_request(request: crate::fuzzing::DebuggerRequest) {
    match request {
        crate::fuzzing::DebuggerRequest::List(pb::ListEventsRequest {
            source_name: _,
            page_size: requested,
            page_token: token,
            filter,
        }) => {
            let _ = page_size(requested);
            if let Ok(Some(seq)) = before_seq(&token) {
                // A token read back is the token of the same seq.
                assert!(matches!(before_seq(&page_token(seq)), Ok(Some(s)) if s == seq));
            }
            let _ = event_filter(filter, "filter");
        }
        crate::fuzzing::DebuggerRequest::Tail(pb::TailEventsRequest {
            source_name: _,
            filter,
        }) => {
            let _ = event_filter(filter, "filter");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_bad_ones_name_the_field() {
        assert_eq!(before_seq(&page_token(42)).unwrap(), Some(42));
        assert_eq!(before_seq("").unwrap(), None);
        for bad in ["x", "c2VxOi0x", "!!", &page_token(0)] {
            assert_eq!(before_seq(bad).unwrap_err().field, "page_token", "{bad}");
        }
    }

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(500).unwrap(), 500);
        assert_eq!(page_size(501).unwrap_err().field, "page_size");
        assert_eq!(page_size(-1).unwrap_err().field, "page_size");
    }

    #[test]
    fn filters_map_to_stored_names() {
        let filter = event_filter(
            Some(pb::EventFilter {
                r#type: common::EventType::Track.into(),
                event_name: "Signed Up".into(),
            }),
            "filter",
        )
        .unwrap();
        assert_eq!(filter.event_type.as_deref(), Some("track"));
        assert_eq!(filter.event_name.as_deref(), Some("Signed Up"));
        assert_eq!(
            event_filter(None, "filter").unwrap(),
            EventFilter::default()
        );
        let bad = event_filter(
            Some(pb::EventFilter {
                r#type: 99,
                event_name: String::new(),
            }),
            "filter",
        )
        .unwrap_err();
        assert_eq!(bad[0].field, "filter.type");
    }
}
