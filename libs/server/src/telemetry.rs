//! Logs and traces: `tracing` to stderr (text or JSON), and OTLP trace export (gRPC) when an
//! endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`). Spans pass the same filter as logs
//! (`log_filter`): Tessera's request and per-event spans are at `info`.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Key, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The resource attribute naming the service.
const SERVICE_NAME: &str = "service.name";

/// Telemetry settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// The log filter, in `RUST_LOG` syntax.
    pub log_filter: String,
    /// Whether logs are JSON lines instead of text.
    pub json_logs: bool,
    /// The OTLP gRPC endpoint traces are exported to; none when empty.
    pub otlp_endpoint: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_filter: "info".to_owned(),
            json_logs: false,
            otlp_endpoint: String::new(),
        }
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("invalid log filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// The OTLP exporter could not be built.
    #[error("otlp exporter: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was already installed.
    #[error("tracing subscriber: {0}")]
    Init(#[from] tracing_subscriber::util::TryInitError),
}

/// Flushes and stops trace export when dropped.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// The resource every span of this process is exported with: the SDK's detectors
/// (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, the SDK's own attributes), `service` as
/// `service.name` unless one of those set it, `service.namespace` `tessera`, the version, and
/// an id per process (`service.instance.id`) that tells replicas apart.
fn resource(service: &str) -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&Key::new(SERVICE_NAME))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let mut builder = Resource::builder().with_attributes([
        KeyValue::new("service.namespace", "tessera"),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", instance_id()),
    ]);
    if !named {
        builder = builder.with_service_name(service.to_owned());
    }
    builder.build()
}

/// A process's `service.instance.id`: host name (when known), process id and start time.
fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{host}-{}-{started}", std::process::id())
        .trim_start_matches('-')
        .to_owned()
}

/// Installs the global subscriber for `service` (the OTel `service.name`, unless
/// `OTEL_SERVICE_NAME` names it). With an OTLP endpoint, spans are exported in batches and W3C
/// trace context is propagated ([`crate::trace_context`]).
pub fn init_telemetry(
    service: &str,
    settings: &TelemetrySettings,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&settings.log_filter)?;
    // The metrics recorder goes in first, so what is recorded before serving starts (the
    // database pools' first samples, startup counters) is not lost to the no-op recorder.
    let _ = crate::edge::metrics_handle();
    let fmt = if settings.json_logs {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        // Colors only on a terminal: a log file or a collector gets plain text.
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed()
    };
    let mut provider = None;
    let otel = if settings.otlp_endpoint.is_empty() {
        None
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.otlp_endpoint.clone())
            .build()?;
        // The batch processor reads OTEL_BSP_* (schedule delay, queue and batch sizes) itself.
        let p = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource(service))
            .build();
        let tracer = p.tracer("tessera");
        provider = Some(p);
        crate::trace_context::enable();
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}
