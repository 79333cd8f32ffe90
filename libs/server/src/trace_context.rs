//! W3C trace context across process boundaries, so one event's trace is one tree from the
//! ingestion request to its last score.
//!
//! Three carriers: HTTP headers and gRPC metadata (`traceparent`, `tracestate`), read by the
//! server edge ([`server_span`]) and written by the [`Propagate`] interceptor of every internal
//! client; and the per-event `trace_parent` / `trace_state` strings of the event log and of the
//! internal batch messages ([`TraceParent`]), because one delivery call carries many events of
//! many traces. Each service opens a span per event under the event's own context
//! ([`event_span`]), linked to and from the batch call's span.
//!
//! Everything here is inert until [`init_telemetry`](crate::init_telemetry) installs an OTLP
//! exporter: then [`enabled`] is true. Without one no context is read, written or stored, and no
//! per-event span is opened.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;

/// The W3C header carrying the parent span.
const TRACEPARENT: &str = "traceparent";
/// The W3C header carrying vendor state.
const TRACESTATE: &str = "tracestate";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns propagation on: called once an exporter is installed.
pub(crate) fn enable() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether traces are exported, and so whether trace context is read, stored and propagated.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A W3C trace context in its header form, as stored with an event in the log and carried per
/// event in internal batch messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceParent {
    /// The `traceparent` value: `00-<trace id>-<parent span id>-<flags>`.
    pub traceparent: String,
    /// The `tracestate` value; empty when there is none.
    pub tracestate: String,
}

impl TraceParent {
    /// The context of `span` (its trace, with it as the parent); `None` when trace export is
    /// off or the span is not recorded.
    pub fn of(span: &Span) -> Option<Self> {
        if !enabled() {
            return None;
        }
        Self::from_context(&span.context())
    }

    /// `cx`'s active span as a parent; `None` when it has no valid span.
    pub fn from_context(cx: &Context) -> Option<Self> {
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = Self::default();
        TraceContextPropagator::new().inject_context(cx, &mut carrier);
        (!carrier.traceparent.is_empty()).then_some(carrier)
    }

    /// The pair as received (`trace_parent`, `trace_state` fields); `None` when `traceparent`
    /// is empty.
    pub fn from_parts(traceparent: &str, tracestate: &str) -> Option<Self> {
        (!traceparent.is_empty()).then(|| Self {
            traceparent: traceparent.to_owned(),
            tracestate: tracestate.to_owned(),
        })
    }

    /// The remote parent context it names; `None` when `traceparent` does not parse.
    pub fn context(&self) -> Option<Context> {
        let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), self);
        cx.span().span_context().is_valid().then_some(cx)
    }
}

impl Injector for TraceParent {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = value,
            TRACESTATE => self.tracestate = value,
            _ => {}
        }
    }
}

impl Extractor for TraceParent {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(self.traceparent.as_str()),
            TRACESTATE if !self.tracestate.is_empty() => Some(self.tracestate.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// Opens the span of one event of a batch under the event's own trace (`traceparent`,
/// `tracestate` as carried with the event), made by `make` (which names it), and links it and
/// the current span (the batch call's) to each other. `None`, without calling `make`, when
/// trace export is off or the event carries no valid context: the hot path stays free of
/// per-event spans.
pub fn event_span(
    traceparent: &str,
    tracestate: &str,
    make: impl FnOnce() -> Span,
) -> Option<Span> {
    if !enabled() {
        return None;
    }
    let parent = TraceParent::from_parts(traceparent, tracestate)?.context()?;
    let batch = Span::current();
    let span = make();
    span.set_parent(parent).ok()?;
    let batch_cx = batch.context();
    let batch_sc = batch_cx.span().span_context().clone();
    span.add_link(batch_sc);
    let event_sc = span.context().span().span_context().clone();
    batch.add_link(event_sc);
    Some(span)
}

/// Makes `span` (not yet entered) the root of a trace of its own, linked to the current span:
/// a message sent without trace context starts its own trace rather than sharing its request's
/// with the other messages of a batch.
pub fn new_root(span: &Span) {
    if !enabled() {
        return;
    }
    let request = Span::current().context().span().span_context().clone();
    if span.set_parent(Context::new()).is_ok() {
        span.add_link_with_attributes(request, vec![KeyValue::new("tessera.link", "request")]);
    }
}

/// Marks a request span whose parent came from the client (`traceparent` header).
struct ClientParent;

/// Whether the request being served carried its client's trace context: its messages then
/// belong to the client's trace, otherwise each starts one of its own ([`new_root`]).
pub fn client_traced() -> bool {
    if !enabled() {
        return false;
    }
    Span::current()
        .with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
            let span = registry.span(id)?;
            Some(
                span.scope()
                    .any(|s| s.extensions().get::<ClientParent>().is_some()),
            )
        })
        .flatten()
        .unwrap_or(false)
}

/// Reads `traceparent` / `tracestate` from HTTP headers or gRPC metadata.
struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The valid remote context in `headers`, if any.
fn extract(headers: &http::HeaderMap) -> Option<Context> {
    let cx = TraceContextPropagator::new()
        .extract_with_context(&Context::new(), &HeaderCarrier(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Which port a request came in on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Port {
    Grpc,
    Http,
}

/// Requests that are not traced even with trace export on: probes and scrapes, which would
/// otherwise fill the collector with a trace every few seconds per pod.
fn is_probe(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.")
        || path == "/healthz"
        || path == "/metrics"
}

/// The span of one request at the server edge: a child of the client's context when the
/// request carries one; none for probes. With trace export off it is tower-http's default (a
/// debug span).
pub(crate) fn server_span<B>(port: Port, request: &http::Request<B>) -> Span {
    if enabled() && is_probe(request.uri().path()) {
        return Span::none();
    }
    let path = request.uri().path();
    if !enabled() {
        return tracing::debug_span!(
            "request",
            method = %request.method(),
            path = loggable_path(port, path),
            version = ?request.version(),
        );
    }
    let span = match port {
        Port::Grpc => {
            let name = path.trim_start_matches('/');
            let (service, method) = name.split_once('/').unwrap_or((name, ""));
            tracing::info_span!(
                "grpc request",
                otel.name = name,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
            )
        }
        Port::Http => {
            // Only the tracking API's fixed routes are named: other paths carry identifiers
            // (the Profile API's `email:…`), which never go into a trace.
            let method = request.method().as_str();
            let name = if path.starts_with("/v1/") && path.matches('/').count() == 2 {
                format!("{method} {path}")
            } else {
                method.to_owned()
            };
            tracing::info_span!(
                "http request",
                otel.name = name,
                otel.kind = "server",
                http.request.method = method,
            )
        }
    };
    if let Some(parent) = extract(request.headers())
        && span.set_parent(parent).is_ok()
    {
        span.with_subscriber(|(id, dispatch)| {
            if let Some(span) = dispatch
                .downcast_ref::<tracing_subscriber::Registry>()
                .and_then(|registry| registry.span(id))
            {
                span.extensions_mut().insert(ClientParent);
            }
        });
    }
    span
}

/// The path of a request as logs may show it: a gRPC method, or one of the HTTP port's fixed
/// routes (`/v1/track`, `/healthz`, ...). Other HTTP paths carry identifiers (the Profile API's
/// `email:…`), and the query string is never shown.
fn loggable_path(port: Port, path: &str) -> &str {
    let fixed = path.starts_with("/v1/") && path.matches('/').count() == 2;
    match port {
        Port::Grpc => path,
        Port::Http if fixed || path == "/healthz" || path == "/metrics" => path,
        Port::Http => "<redacted>",
    }
}

/// Writes `traceparent` / `tracestate` into gRPC metadata.
struct MetadataCarrier<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Writes the context of `span` into `metadata`; nothing when trace export is off.
pub fn inject(span: &Span, metadata: &mut tonic::metadata::MetadataMap) {
    if !enabled() {
        return;
    }
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataCarrier(metadata));
    }
}

/// A client interceptor for every internal call: the current span's context goes in the
/// call's metadata, so the callee's request span is its child.
#[derive(Debug, Clone, Copy, Default)]
pub struct Propagate;

impl tonic::service::Interceptor for Propagate {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject(&Span::current(), request.metadata_mut());
        Ok(request)
    }
}

/// A generated client over a channel that propagates trace context.
pub type TracedChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Propagate>;

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tonic::service::Interceptor as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_round_trips_with_its_state() {
        let carried = TraceParent::from_parts(PARENT, "vendor=abc").unwrap();
        let cx = carried.context().expect("valid");
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(TraceParent::from_context(&cx), Some(carried));
    }

    #[test]
    fn missing_or_malformed_context_is_none() {
        assert_eq!(TraceParent::from_parts("", "vendor=abc"), None);
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let carried = TraceParent::from_parts(bad, "").unwrap();
            assert!(carried.context().is_none(), "{bad} accepted");
        }
        assert_eq!(TraceParent::from_context(&Context::new()), None);
    }

    #[test]
    fn headers_and_metadata_carry_the_same_context() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", PARENT.parse().unwrap());
        headers.insert("tracestate", "vendor=abc".parse().unwrap());
        let cx = extract(&headers).expect("extracted");
        assert_eq!(
            cx.span().span_context().span_id().to_string(),
            "00f067aa0ba902b7"
        );
        let mut metadata = tonic::metadata::MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataCarrier(&mut metadata));
        assert_eq!(metadata.get("traceparent").unwrap(), PARENT);
        assert_eq!(metadata.get("tracestate").unwrap(), "vendor=abc");
        assert!(extract(&http::HeaderMap::new()).is_none());
    }

    /// Collects finished spans in memory.
    #[derive(Debug, Clone, Default)]
    struct Collect(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Collect {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    /// Runs `f` with trace export on, into memory; returns the finished spans.
    fn traced(f: impl FnOnce()) -> Vec<SpanData> {
        enable();
        let spans = Collect::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f);
        provider.force_flush().unwrap();
        spans.0.lock().unwrap().clone()
    }

    fn named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no span {name} in {spans:?}"))
    }

    fn grpc_request(traceparent: Option<&str>) -> http::Request<()> {
        let mut request = http::Request::builder()
            .method("POST")
            .uri("http://peer/tessera.identity.v1.IdentityService/ResolveIdentities");
        if let Some(tp) = traceparent {
            request = request.header("traceparent", tp);
        }
        request.body(()).unwrap()
    }

    #[test]
    fn a_request_continues_its_clients_trace_into_calls_and_events() {
        let event = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut sent = tonic::metadata::MetadataMap::new();
        let mut carried = None;
        let mut client_traced_inside = false;
        let spans = traced(|| {
            let span = server_span(Port::Grpc, &grpc_request(Some(PARENT)));
            let _entered = span.enter();
            client_traced_inside = client_traced();
            let call = Propagate.call(tonic::Request::new(())).unwrap();
            sent = call.metadata().clone();
            let one = event_span(event, "", || tracing::info_span!("resolve event"));
            carried = one.as_ref().and_then(TraceParent::of);
        });
        assert!(client_traced_inside);
        let request = named(
            &spans,
            "tessera.identity.v1.IdentityService/ResolveIdentities",
        );
        let sc = &request.span_context;
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(request.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(request.parent_span_is_remote);
        assert_eq!(request.span_kind, opentelemetry::trace::SpanKind::Server);
        // The outgoing call names the request span as its parent.
        assert_eq!(
            sent.get("traceparent").unwrap(),
            &format!("00-{}-{}-01", sc.trace_id(), sc.span_id())
        );
        // The event's span is in the event's trace, linked both ways with the request's.
        let resolve = named(&spans, "resolve event");
        assert_eq!(
            resolve.span_context.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(resolve.parent_span_id.to_string(), "b7ad6b7169203331");
        assert!(
            resolve
                .links
                .iter()
                .any(|l| l.span_context.span_id() == sc.span_id())
        );
        assert!(
            request
                .links
                .iter()
                .any(|l| l.span_context.span_id() == resolve.span_context.span_id())
        );
        let carried = carried.expect("the event span's context");
        assert_eq!(
            carried.traceparent,
            format!(
                "00-0af7651916cd43dd8448eb211c80319c-{}-01",
                resolve.span_context.span_id()
            )
        );
    }

    #[test]
    fn probes_are_not_traced() {
        let spans = traced(|| {
            for path in [
                "http://peer/grpc.health.v1.Health/Check",
                "http://peer/healthz",
                "http://peer/metrics",
            ] {
                let request = http::Request::builder()
                    .uri(path)
                    .header("traceparent", PARENT)
                    .body(())
                    .unwrap();
                let _entered = server_span(Port::Grpc, &request).entered();
            }
            let _entered = server_span(Port::Grpc, &grpc_request(None)).entered();
        });
        let names: Vec<_> = spans.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(
            names,
            ["tessera.identity.v1.IdentityService/ResolveIdentities"]
        );
    }

    #[test]
    fn messages_of_an_untraced_request_start_traces_of_their_own() {
        let mut client_traced_inside = true;
        let mut sent = tonic::metadata::MetadataMap::new();
        let spans = traced(|| {
            let span = server_span(Port::Http, &grpc_request(None));
            let _entered = span.enter();
            client_traced_inside = client_traced();
            for _ in 0..2 {
                let message = tracing::info_span!("accept event");
                new_root(&message);
                let _in_message = message.enter();
                sent = Propagate
                    .call(tonic::Request::new(()))
                    .unwrap()
                    .metadata()
                    .clone();
            }
            // An event without a context (or with a bad one) gets no span.
            assert!(event_span("", "", || panic!("made a span without context")).is_none());
            assert!(event_span("junk", "", || tracing::info_span!("junk")).is_none());
        });
        assert!(!client_traced_inside);
        let request = named(&spans, "POST");
        assert_eq!(
            request.parent_span_id,
            opentelemetry::trace::SpanId::INVALID
        );
        let messages: Vec<_> = spans.iter().filter(|s| s.name == "accept event").collect();
        assert_eq!(messages.len(), 2);
        let trace = |s: &SpanData| s.span_context.trace_id();
        assert_ne!(trace(messages[0]), trace(request));
        assert_ne!(trace(messages[1]), trace(request));
        assert_ne!(trace(messages[0]), trace(messages[1]));
        for m in &messages {
            assert_eq!(m.parent_span_id, opentelemetry::trace::SpanId::INVALID);
            assert!(
                m.links
                    .iter()
                    .any(|l| l.span_context.span_id() == request.span_context.span_id())
            );
        }
        let last = &messages[1].span_context;
        assert_eq!(
            sent.get("traceparent").unwrap(),
            &format!("00-{}-{}-01", last.trace_id(), last.span_id())
        );
    }
}
