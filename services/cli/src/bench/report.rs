//! The bench report: what was offered, what was achieved, latencies and visibility, as text for
//! people and as one JSON object for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::Transport;

/// The parameters a run used.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Params {
    pub(super) transport: Transport,
    pub(super) rate: u64,
    pub(super) duration_s: Option<u64>,
    pub(super) events: Option<u64>,
    /// Seconds of unmeasured load sent before the run.
    pub(super) warmup_s: u64,
    pub(super) concurrency: u64,
    pub(super) batch: u64,
    pub(super) users: u64,
    pub(super) connections: u64,
    pub(super) visibility_samples: u64,
    pub(super) visibility_timeout_s: u64,
    pub(super) computed_samples: u64,
    pub(super) computed_timeout_s: u64,
    pub(super) request_timeout_s: u64,
    pub(super) seed: u64,
}

/// Percentiles of a latency histogram recorded in microseconds, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(super) struct Percentiles {
    pub(super) count: u64,
    pub(super) p50_ms: f64,
    pub(super) p95_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    pub(super) mean_ms: f64,
}

impl Percentiles {
    /// The summary of `h` (microseconds); `None` when it is empty.
    pub(super) fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        Some(Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: round3(h.mean() / 1_000.0),
        })
    }
}

fn ms(us: u64) -> f64 {
    round3(us as f64 / 1_000.0)
}

fn round3(x: f64) -> f64 {
    (x * 1_000.0).round() / 1_000.0
}

/// Request outcomes; with `grpc-stream`, a request is one stream (call) of chunks.
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Requests {
    pub(super) sent: u64,
    pub(super) ok: u64,
    pub(super) failed: u64,
    /// Chunks sent over the streams (`grpc-stream` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) chunks: Option<u64>,
    /// Failed requests by gRPC code name (`UNAVAILABLE`, ...), or by HTTP status (`HTTP_429`)
    /// and `TRANSPORT_ERROR` (no HTTP answer) for `http`; client-side timeouts count as
    /// `DEADLINE_EXCEEDED`.
    pub(super) errors: BTreeMap<String, u64>,
    /// The first message seen for each error code, to tell causes apart.
    pub(super) first_error: BTreeMap<String, String>,
}

/// Event outcomes.
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Events {
    /// Events sent in requests.
    pub(super) sent: u64,
    /// Acknowledged as new.
    pub(super) accepted: u64,
    /// Acknowledged as duplicates (should be 0: ids are unique per run). The HTTP API does not
    /// tell duplicates apart: they count as accepted there.
    pub(super) duplicate: u64,
    /// Refused one by one by a stream as invalid (`grpc-stream` only: the other transports fail
    /// the request instead; should be 0).
    pub(super) rejected: u64,
    /// In failed requests.
    pub(super) failed: u64,
}

/// Time from the acknowledgement of a first identify until the profile, looked up by the new
/// user id, counts every event of that device acknowledged so far.
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Visibility {
    pub(super) followed: u64,
    pub(super) visible: u64,
    pub(super) not_visible: u64,
    pub(super) latency: Option<Percentiles>,
    /// GetProfile errors other than NOT_FOUND while polling, by gRPC code name.
    pub(super) poll_errors: BTreeMap<String, u64>,
    /// The first message seen for each poll error code.
    pub(super) first_poll_error: BTreeMap<String, String>,
}

/// Time from the acknowledgement of a person's first `Order Completed` until the profile,
/// looked up by their user id, shows it: in the computed trait counting orders, in the audience
/// of buyers, and in the engagement score (computed over at least the events of the read that
/// first showed the order).
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Computed {
    pub(super) followed: u64,
    pub(super) computed_trait: Reflected,
    pub(super) audience: Reflected,
    pub(super) score: Reflected,
    /// GetProfile errors other than NOT_FOUND while polling, by gRPC code name.
    pub(super) poll_errors: BTreeMap<String, u64>,
    /// The first message seen for each poll error code.
    pub(super) first_poll_error: BTreeMap<String, String>,
}

/// One measure of the followed orders: the computed trait, audience or score it reads.
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Reflected {
    pub(super) name: String,
    /// Orders it showed within the timeout.
    pub(super) seen: u64,
    /// Orders it had not shown when the timeout passed.
    pub(super) not_seen: u64,
    pub(super) latency: Option<Percentiles>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Report {
    pub(super) target: String,
    pub(super) run_id: String,
    pub(super) params: Params,
    /// Whether the run was cut short by Ctrl-C.
    pub(super) interrupted: bool,
    /// From the start until the last request was issued (or the send window closed).
    pub(super) send_window_s: f64,
    /// From the start until the last response arrived.
    pub(super) elapsed_s: f64,
    /// The target rate, events/s; `None` when unpaced.
    pub(super) offered_rate: Option<f64>,
    /// Events the schedule offered within the send window; `None` when unpaced.
    pub(super) scheduled_events: Option<u64>,
    /// Scheduled events never sent because the client fell behind (concurrency exhausted by a
    /// slow server).
    pub(super) unsent_events: u64,
    /// Events sent per second of the send window.
    pub(super) sent_rate: f64,
    /// Events acknowledged as accepted per second of elapsed time.
    pub(super) achieved_rate: f64,
    /// How far behind schedule a batch was issued at worst, ms (waiting for a free slot).
    pub(super) max_schedule_lag_ms: f64,
    pub(super) requests: Requests,
    pub(super) events: Events,
    /// Successful request latency from the time the batch was due (includes client queueing,
    /// so a slow server cannot hide behind a lower send rate); `None` for `grpc-stream`, whose
    /// chunks are not acknowledged one by one.
    pub(super) latency: Option<Percentiles>,
    /// Successful request latency from the time the request was actually sent.
    pub(super) service_time: Option<Percentiles>,
    pub(super) visibility: Visibility,
    pub(super) computed: Computed,
}

/// The name of a gRPC code as in the gRPC spec, for example `UNAVAILABLE`.
pub(super) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>, none: &str) -> String {
    v.map_or_else(|| none.to_owned(), |v| v.to_string())
}

fn line(p: Option<&Percentiles>) -> String {
    match p {
        Some(p) => format!(
            "p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}  mean {:.1} ms  (n={})",
            p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms, p.mean_ms, p.count
        ),
        None => "n/a (no successful samples)".to_owned(),
    }
}

/// A request latency line; a stream has none, as its chunks are acknowledged together.
fn request_line(transport: Transport, p: Option<&Percentiles>) -> String {
    match transport {
        Transport::GrpcStream => {
            "n/a for grpc-stream (a stream is acknowledged as a whole, not per chunk)".to_owned()
        }
        Transport::Grpc | Transport::Http => line(p),
    }
}

fn counts(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".to_owned();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human-readable report.
pub(super) fn format_text(r: &Report) -> String {
    let p = &r.params;
    let mut out = String::new();
    let w = &mut out;
    // Writing to a String cannot fail.
    let _ = writeln!(w, "tessera bench: {} (run {})", r.target, r.run_id);
    let _ = writeln!(
        w,
        "  parameters      transport {}  rate {}  duration {}  events {}  warm-up {}  concurrency {}  batch {}  users {}  connections {}  seed {}",
        p.transport,
        if p.rate == 0 {
            "max".to_owned()
        } else {
            format!("{}/s", p.rate)
        },
        opt(p.duration_s.map(|d| format!("{d}s")), "-"),
        opt(p.events, "-"),
        if p.warmup_s == 0 {
            "-".to_owned()
        } else {
            format!("{}s", p.warmup_s)
        },
        p.concurrency,
        p.batch,
        p.users,
        p.connections,
        p.seed
    );
    if r.interrupted {
        let _ = writeln!(w, "  (interrupted by Ctrl-C: partial results)");
    }
    let _ = writeln!(
        w,
        "  duration        send window {:.2} s, until last response {:.2} s",
        r.send_window_s, r.elapsed_s
    );
    let _ = writeln!(
        w,
        "  offered         {}",
        match (r.offered_rate, r.scheduled_events) {
            (Some(rate), Some(n)) => format!("{rate:.0} events/s ({n} events scheduled)"),
            _ => "unpaced (as fast as the concurrency allows)".to_owned(),
        }
    );
    if r.unsent_events > 0 {
        let _ = writeln!(
            w,
            "  BEHIND          {} scheduled events never sent: every slot was busy (server slower than the offered rate; see latency)",
            r.unsent_events
        );
    }
    let (unit, requests_label) = match (p.transport, r.requests.chunks) {
        (Transport::GrpcStream, Some(chunks)) => (
            format!("{chunks} chunks over {} streams", r.requests.sent),
            "streams        ",
        ),
        _ => (format!("{} requests", r.requests.sent), "requests       "),
    };
    let _ = writeln!(
        w,
        "  sent            {:.0} events/s ({} events in {unit}; worst schedule lag {:.1} ms)",
        r.sent_rate, r.events.sent, r.max_schedule_lag_ms
    );
    let _ = writeln!(
        w,
        "  achieved        {:.0} accepted events/s ({} accepted, {} duplicate, {}{} in failed requests)",
        r.achieved_rate,
        r.events.accepted,
        r.events.duplicate,
        if r.events.rejected > 0 {
            format!("{} rejected, ", r.events.rejected)
        } else {
            String::new()
        },
        r.events.failed
    );
    let _ = writeln!(
        w,
        "  {requests_label} {} ok, {} failed; errors: {}",
        r.requests.ok,
        r.requests.failed,
        counts(&r.requests.errors)
    );
    for (code, msg) in &r.requests.first_error {
        let _ = writeln!(w, "    first {code}: {msg}");
    }
    let _ = writeln!(
        w,
        "  latency         {}",
        request_line(p.transport, r.latency.as_ref())
    );
    let _ = writeln!(
        w,
        "  service time    {}",
        request_line(p.transport, r.service_time.as_ref())
    );
    let v = &r.visibility;
    let _ = writeln!(
        w,
        "  ack -> visible  {}",
        if v.followed == 0 {
            "not measured (no samples)".to_owned()
        } else {
            line(v.latency.as_ref())
        }
    );
    let _ = writeln!(
        w,
        "                  {} followed, {} visible, {} not visible within {} s; poll errors: {}",
        v.followed,
        v.visible,
        v.not_visible,
        p.visibility_timeout_s,
        counts(&v.poll_errors)
    );
    for (code, msg) in &v.first_poll_error {
        let _ = writeln!(w, "    first {code}: {msg}");
    }
    let c = &r.computed;
    if p.computed_samples > 0 {
        for (label, what, m) in [
            ("ack -> trait   ", "computed trait", &c.computed_trait),
            ("ack -> audience", "audience", &c.audience),
            ("ack -> score   ", "score", &c.score),
        ] {
            let _ = writeln!(
                w,
                "  {label} {}",
                if c.followed == 0 {
                    "not measured (no first order acknowledged)".to_owned()
                } else {
                    line(m.latency.as_ref())
                }
            );
            let _ = writeln!(
                w,
                "                  {what} {}: {} orders followed, {} seen, {} not seen within {} s",
                m.name, c.followed, m.seen, m.not_seen, p.computed_timeout_s
            );
        }
        let _ = writeln!(
            w,
            "                  order poll errors: {}",
            counts(&c.poll_errors)
        );
        for (code, msg) in &c.first_poll_error {
            let _ = writeln!(w, "    first {code}: {msg}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values_us: &[u64]) -> Histogram<u64> {
        let mut h = Histogram::new(3).unwrap();
        for v in values_us {
            h.record(*v).unwrap();
        }
        h
    }

    #[test]
    fn percentiles_are_in_milliseconds() {
        // 1..=100 ms.
        let values: Vec<u64> = (1..=100).map(|ms| ms * 1_000).collect();
        let p = Percentiles::of(&hist(&values)).unwrap();
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p95_ms - 95.0).abs() < 0.1, "{p:?}");
        assert!((p.p99_ms - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max_ms - 100.0).abs() < 0.1, "{p:?}");
        assert!((p.mean_ms - 50.5).abs() < 0.1, "{p:?}");
    }

    #[test]
    fn an_empty_histogram_has_no_percentiles() {
        assert_eq!(Percentiles::of(&hist(&[])), None);
    }

    #[test]
    fn code_names_follow_the_grpc_spec() {
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
    }

    fn report() -> Report {
        let mut errors = BTreeMap::new();
        errors.insert("UNAVAILABLE".to_owned(), 3);
        Report {
            target: "http://127.0.0.1:50051".into(),
            run_id: "abc".into(),
            params: Params {
                transport: Transport::Grpc,
                rate: 2_000,
                duration_s: Some(20),
                events: None,
                concurrency: 16,
                batch: 100,
                users: 10_000,
                connections: 2,
                visibility_samples: 100,
                visibility_timeout_s: 30,
                computed_samples: 0,
                computed_timeout_s: 30,
                request_timeout_s: 10,
                seed: 1,
                warmup_s: 0,
            },
            interrupted: false,
            send_window_s: 20.0,
            elapsed_s: 20.05,
            offered_rate: Some(2_000.0),
            scheduled_events: Some(40_000),
            unsent_events: 0,
            sent_rate: 2_000.0,
            achieved_rate: 1_980.0,
            max_schedule_lag_ms: 1.5,
            requests: Requests {
                sent: 400,
                ok: 397,
                failed: 3,
                chunks: None,
                errors,
                first_error: BTreeMap::new(),
            },
            events: Events {
                sent: 40_000,
                accepted: 39_700,
                duplicate: 0,
                rejected: 0,
                failed: 300,
            },
            latency: Some(Percentiles {
                count: 397,
                p50_ms: 4.2,
                p95_ms: 9.9,
                p99_ms: 15.0,
                max_ms: 30.0,
                mean_ms: 5.0,
            }),
            service_time: None,
            visibility: Visibility {
                followed: 2,
                visible: 1,
                not_visible: 1,
                latency: None,
                poll_errors: BTreeMap::new(),
                first_poll_error: BTreeMap::new(),
            },
            computed: Computed::default(),
        }
    }

    #[test]
    fn the_text_report_shows_offered_achieved_latency_and_errors() {
        let text = format_text(&report());
        for needle in [
            "offered         2000 events/s (40000 events scheduled)\n",
            "1980 accepted events/s",
            "397 ok, 3 failed; errors: UNAVAILABLE 3",
            "p50 4.2  p95 9.9  p99 15.0  max 30.0",
            "service time    n/a",
            "2 followed, 1 visible, 1 not visible within 30 s",
            "transport grpc  rate 2000/s  duration 20s  events -",
            "(40000 events in 400 requests;",
            "requests        397 ok",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn a_client_behind_schedule_is_called_out() {
        let mut r = report();
        assert!(!format_text(&r).contains("BEHIND"));
        r.unsent_events = 16_200;
        assert!(format_text(&r).contains("BEHIND          16200 scheduled events never sent"));
    }

    #[test]
    fn the_json_report_is_one_object_with_the_figures() {
        let json = serde_json::to_string(&report()).unwrap();
        assert!(!json.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["offered_rate"], 2_000.0);
        assert_eq!(v["achieved_rate"], 1_980.0);
        assert_eq!(v["requests"]["errors"]["UNAVAILABLE"], 3);
        assert_eq!(v["latency"]["p99_ms"], 15.0);
        assert_eq!(v["params"]["batch"], 100);
        assert_eq!(v["params"]["transport"], "grpc");
        assert_eq!(v["visibility"]["not_visible"], 1);
        assert!(
            v["requests"].get("chunks").is_none(),
            "chunks only for streams"
        );
    }

    #[test]
    fn a_stream_run_counts_streams_and_chunks_and_has_no_request_latency() {
        let mut r = report();
        r.params.transport = Transport::GrpcStream;
        r.requests.sent = 4;
        r.requests.chunks = Some(400);
        r.events.rejected = 2;
        let text = format_text(&r);
        for needle in [
            "transport grpc-stream",
            "(40000 events in 400 chunks over 4 streams;",
            "streams         397 ok, 3 failed",
            "0 duplicate, 2 rejected, 300 in failed requests",
            "latency         n/a for grpc-stream",
            "service time    n/a for grpc-stream",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["params"]["transport"], "grpc-stream");
        assert_eq!(v["requests"]["chunks"], 400);
        assert_eq!(v["events"]["rejected"], 2);
    }

    #[test]
    fn the_order_measures_are_reported_only_when_asked_for() {
        let mut r = report();
        assert!(!format_text(&r).contains("ack -> trait"));
        r.params.computed_samples = 20;
        let text = format_text(&r);
        assert!(
            text.contains("ack -> trait    not measured (no first order acknowledged)"),
            "{text}"
        );
        let measured = |name: &str, seen, not_seen, p50_ms| Reflected {
            name: name.to_owned(),
            seen,
            not_seen,
            latency: Some(Percentiles {
                count: seen,
                p50_ms,
                p95_ms: 40.0,
                p99_ms: 48.5,
                max_ms: 60.0,
                mean_ms: 20.0,
            }),
        };
        r.computed = Computed {
            followed: 20,
            computed_trait: measured("order_count", 19, 1, 12.0),
            audience: measured("bench_buyers", 18, 2, 13.0),
            score: measured("engagement", 17, 3, 14.0),
            poll_errors: BTreeMap::from([("UNAVAILABLE".to_owned(), 2)]),
            first_poll_error: BTreeMap::new(),
        };
        let text = format_text(&r);
        for needle in [
            "ack -> trait    p50 12.0  p95 40.0  p99 48.5  max 60.0",
            "computed trait order_count: 20 orders followed, 19 seen, 1 not seen within 30 s",
            "ack -> audience p50 13.0",
            "audience bench_buyers: 20 orders followed, 18 seen, 2 not seen within 30 s",
            "ack -> score    p50 14.0",
            "score engagement: 20 orders followed, 17 seen, 3 not seen within 30 s",
            "order poll errors: UNAVAILABLE 2",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["computed"]["audience"]["not_seen"], 2);
        assert_eq!(v["computed"]["score"]["latency"]["p99_ms"], 48.5);
        assert_eq!(v["params"]["computed_samples"], 20);
    }

    #[test]
    fn http_errors_are_listed_by_status() {
        let mut r = report();
        r.params.transport = Transport::Http;
        r.requests.errors = BTreeMap::from([("HTTP_429".to_owned(), 3)]);
        let text = format_text(&r);
        assert!(text.contains("transport http  rate"), "{text}");
        assert!(text.contains("errors: HTTP_429 3"), "{text}");
    }
}
