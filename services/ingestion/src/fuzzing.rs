//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, nightly) and for the stable test
//! that replays their seeds and regression inputs. Each runs the production code a request goes
//! through before any database is touched; none is part of the service's API.

use prost::Message as _;
use tessera_proto::ingestion::v1 as pb;

pub use crate::http::fuzz_body as http_body;

/// A debugger request, decoded.
#[derive(Debug)]
pub(crate) enum DebuggerRequest {
    /// ListEvents.
    List(pb::ListEventsRequest),
    /// TailEvents.
    Tail(pb::TailEventsRequest),
}

/// The request messages of the ingestion service's public RPCs, in the order
/// [`grpc_request`] picks them by.
pub const GRPC_REQUESTS: [&str; 16] = [
    "IngestionService/IngestEvents",
    "IngestionService/StreamIngestEvents",
    "SourceService/CreateSource",
    "SourceService/ListSources",
    "SourceService/GetSource",
    "SourceService/DisableSource",
    "SourceService/EnableSource",
    "SourceService/RotateWriteKey",
    "SourceService/UpdateSource",
    "TrackingPlanService/GetTrackingPlan",
    "TrackingPlanService/PutTrackingPlan",
    "TrackingPlanService/ListQuarantined",
    "TrackingPlanService/ReplayQuarantined",
    "TrackingPlanService/DeleteQuarantined",
    "DebuggerService/ListEvents",
    "DebuggerService/TailEvents",
];

/// Decodes `data` as the request message of RPC `selector` (modulo [`GRPC_REQUESTS`]), as
/// tonic's codec does, then runs the conversions and checks its handler makes first.
pub fn grpc_request(selector: u8, data: &[u8]) {
    fn events(events: Vec<tessera_proto::common::v1::Event>) {
        for event in events {
            let _ = crate::convert::accepted_event(event);
        }
    }
    match usize::from(selector) % GRPC_REQUESTS.len() {
        0 => {
            if let Ok(r) = pb::IngestEventsRequest::decode(data) {
                events(r.events);
            }
        }
        1 => {
            if let Ok(r) = pb::StreamIngestEventsRequest::decode(data) {
                events(r.events);
            }
        }
        2 => {
            if let Ok(r) = pb::CreateSourceRequest::decode(data) {
                crate::sources::fuzz_request(
                    &r.name,
                    r.tracking_plan_mode,
                    r.rate_limit_per_second,
                );
            }
        }
        3 => drop(pb::ListSourcesRequest::decode(data)),
        4 => drop(pb::GetSourceRequest::decode(data)),
        5 => drop(pb::DisableSourceRequest::decode(data)),
        6 => drop(pb::EnableSourceRequest::decode(data)),
        7 => drop(pb::RotateWriteKeyRequest::decode(data)),
        8 => {
            if let Ok(r) = pb::UpdateSourceRequest::decode(data) {
                crate::sources::fuzz_request(
                    &r.name,
                    r.tracking_plan_mode,
                    r.rate_limit_per_second.unwrap_or_default(),
                );
            }
        }
        9 => drop(pb::GetTrackingPlanRequest::decode(data)),
        10 => {
            if let Ok(r) = pb::PutTrackingPlanRequest::decode(data) {
                crate::plans::fuzz_put(r);
            }
        }
        11 => {
            if let Ok(r) = pb::ListQuarantinedRequest::decode(data) {
                crate::plans::fuzz_list(&r);
            }
        }
        12 => drop(pb::ReplayQuarantinedRequest::decode(data)),
        13 => drop(pb::DeleteQuarantinedRequest::decode(data)),
        14 => {
            if let Ok(r) = pb::ListEventsRequest::decode(data) {
                crate::debugger::fuzz_request(DebuggerRequest::List(r));
            }
        }
        _ => {
            if let Ok(r) = pb::TailEventsRequest::decode(data) {
                crate::debugger::fuzz_request(DebuggerRequest::Tail(r));
            }
        }
    }
}

/// A tracking plan and a message: the bytes before the first `0xFF` (never in UTF-8) are the
/// plan as stored (JSON), the rest a Segment message (JSON) checked against it in `block` mode.
pub fn tracking_plan(data: &[u8]) {
    let (plan, message) = match data.iter().position(|b| *b == 0xFF) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b"{}"[..]),
    };
    let Ok(message) = serde_json::from_slice(message) else {
        return;
    };
    crate::plans::fuzz_plan(plan, message);
}

#[cfg(test)]
mod tests {
    use tessera_testkit::fuzz_inputs as inputs;

    use super::*;

    #[test]
    fn every_committed_http_body_input_is_handled() {
        let inputs = inputs("http_body");
        assert!(inputs.len() >= 4, "the http_body seeds are missing");
        for (path, bytes) in inputs {
            eprintln!("{}", path.display());
            http_body(&bytes);
        }
    }

    #[test]
    fn every_committed_ingestion_grpc_request_is_handled() {
        // The grpc_requests target gives selectors with the high bit clear to ingestion.
        let inputs: Vec<_> = inputs("grpc_requests")
            .into_iter()
            .filter(|(_, b)| b.first().is_some_and(|s| s & 0x80 == 0))
            .collect();
        assert!(!inputs.is_empty(), "the grpc_requests seeds are missing");
        for (path, bytes) in inputs {
            eprintln!("{}", path.display());
            grpc_request(bytes[0], &bytes[1..]);
        }
    }

    #[test]
    fn every_committed_tracking_plan_input_is_handled() {
        let inputs = inputs("tracking_plan");
        assert!(!inputs.is_empty(), "the tracking_plan seeds are missing");
        for (path, bytes) in inputs {
            eprintln!("{}", path.display());
            tracking_plan(&bytes);
        }
    }

    #[test]
    fn the_seed_bodies_parse_into_events() {
        // A fuzz entry point that refuses everything would fuzz nothing: a real SDK batch
        // must come through whole.
        let body = br#"{"batch":[{"type":"track","userId":"u1","event":"Order Completed"},
            {"type":"identify","anonymousId":"a1","traits":{"plan":"pro"}},{"type":"nope"}]}"#;
        let mut data = vec![6];
        data.extend_from_slice(body);
        assert_eq!(http_body(&data), 2);
    }
}
