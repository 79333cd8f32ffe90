//! Logs and traces: `tracing` to stderr (text or JSON), and OTLP trace export (gRPC) when an
//! endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`). Spans pass the same filter as logs
//! (`log_filter`): Tessera's request and per-event spans are at `info`. An `https://` endpoint
//! is checked against the system's root certificates plus an optional CA file
//! (`OTEL_EXPORTER_OTLP_CERTIFICATE`), and a client certificate is presented when one is given
//! (`OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and `OTEL_EXPORTER_OTLP_CLIENT_KEY`).

use std::path::{Path, PathBuf};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Key, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{ClientTlsConfig, Identity};
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
    /// For an `https://` endpoint: a CA certificate file (PEM) trusted besides the system's
    /// roots (`OTEL_EXPORTER_OTLP_CERTIFICATE`).
    pub otlp_certificate: Option<PathBuf>,
    /// A client certificate (PEM) presented to the collector
    /// (`OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`); with `otlp_client_key`.
    pub otlp_client_certificate: Option<PathBuf>,
    /// The private key (PEM) of `otlp_client_certificate` (`OTEL_EXPORTER_OTLP_CLIENT_KEY`).
    pub otlp_client_key: Option<PathBuf>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_filter: "info".to_owned(),
            json_logs: false,
            otlp_endpoint: String::new(),
            otlp_certificate: None,
            otlp_client_certificate: None,
            otlp_client_key: None,
        }
    }
}

/// The OTLP TLS settings, by the environment variable that sets each and its key in the
/// configuration file, for messages.
const OTLP_CERTIFICATE: (&str, &str) = (
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "telemetry.otlp_certificate",
);
const OTLP_CLIENT_CERTIFICATE: (&str, &str) = (
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "telemetry.otlp_client_certificate",
);
const OTLP_CLIENT_KEY: (&str, &str) =
    ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "telemetry.otlp_client_key");

impl TelemetrySettings {
    /// Whether traces go to the collector over TLS: an endpoint that is not `http://` (the
    /// exporter makes a scheme-less one `https://` unless `OTEL_EXPORTER_OTLP_INSECURE`).
    fn otlp_over_tls(&self) -> bool {
        !self.otlp_endpoint.is_empty() && !self.otlp_endpoint.starts_with("http://")
    }

    /// Checks what can be checked before starting: the OTLP TLS files, when the endpoint is
    /// `https://`. Errors name the variable (and the configuration key).
    pub fn check(&self) -> Result<(), TelemetryError> {
        self.otlp_tls().map(drop)
    }

    /// The TLS configuration of the OTLP exporter: `None` for a plaintext endpoint. Trusts the
    /// system's roots (SSL_CERT_FILE / SSL_CERT_DIR replace them, as OpenSSL's tools do) and
    /// `otlp_certificate`; presents the client certificate when given.
    fn otlp_tls(&self) -> Result<Option<ClientTlsConfig>, TelemetryError> {
        if !self.otlp_over_tls() {
            return Ok(None);
        }
        let invalid = |(variable, key): (&'static str, &'static str), path: &Path, reason| {
            TelemetryError::OtlpTls {
                variable,
                key,
                path: path.to_owned(),
                reason,
            }
        };
        let read = |setting, path: &Path| {
            std::fs::read(path).map_err(|e| invalid(setting, path, format!("cannot read: {e}")))
        };
        let certs = |setting, path: &Path, pem: &[u8]| {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(setting, path, format!("not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(invalid(
                    setting,
                    path,
                    "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned(),
                ));
            }
            Ok(certs)
        };

        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::debug!(%error, "a system root certificate could not be loaded");
        }
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = &self.otlp_certificate {
            for cert in certs(OTLP_CERTIFICATE, path, &read(OTLP_CERTIFICATE, path)?)? {
                roots.add(cert).map_err(|e| {
                    invalid(OTLP_CERTIFICATE, path, format!("not a CA certificate: {e}"))
                })?;
            }
        }
        if roots.is_empty() {
            return Err(TelemetryError::OtlpNoRoots {
                endpoint: self.otlp_endpoint.clone(),
            });
        }
        let mut config = ClientTlsConfig::new().trust_anchors(roots.roots);

        match (&self.otlp_client_certificate, &self.otlp_client_key) {
            (None, None) => {}
            (Some(cert_path), Some(key_path)) => {
                let cert = read(OTLP_CLIENT_CERTIFICATE, cert_path)?;
                let key = read(OTLP_CLIENT_KEY, key_path)?;
                let chain = certs(OTLP_CLIENT_CERTIFICATE, cert_path, &cert)?;
                let der = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
                    invalid(
                        OTLP_CLIENT_KEY,
                        key_path,
                        format!("holds no PEM private key: {e}"),
                    )
                })?;
                let provider = rustls::crypto::ring::default_provider();
                rustls::sign::CertifiedKey::from_der(chain, der, &provider).map_err(|e| {
                    invalid(
                        OTLP_CLIENT_KEY,
                        key_path,
                        format!(
                            "not the private key of {} ({}): {e}",
                            OTLP_CLIENT_CERTIFICATE.0,
                            cert_path.display()
                        ),
                    )
                })?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            (cert, _) => {
                let (given, missing) = if cert.is_some() {
                    (OTLP_CLIENT_CERTIFICATE, OTLP_CLIENT_KEY)
                } else {
                    (OTLP_CLIENT_KEY, OTLP_CLIENT_CERTIFICATE)
                };
                return Err(TelemetryError::OtlpClientIncomplete { given, missing });
            }
        }
        Ok(Some(config))
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
    /// A file of the OTLP exporter's TLS settings cannot be used.
    #[error("{variable} ({key}): {}: {reason}", path.display())]
    OtlpTls {
        /// The environment variable that sets it.
        variable: &'static str,
        /// Its key in the configuration file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Half of the OTLP client certificate settings.
    #[error(
        "{} ({}) is set but {} ({}) is not: the client certificate and its key go together",
        given.0, given.1, missing.0, missing.1
    )]
    OtlpClientIncomplete {
        /// The variable (and key) that is set.
        given: (&'static str, &'static str),
        /// The one that is missing.
        missing: (&'static str, &'static str),
    },
    /// An https:// endpoint with nothing to check its certificate against.
    #[error(
        "OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?} is https:// but no root certificate was \
         found: install the system's CA certificates or set OTEL_EXPORTER_OTLP_CERTIFICATE"
    )]
    OtlpNoRoots {
        /// The endpoint.
        endpoint: String,
    },
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
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.otlp_endpoint.clone());
        if let Some(tls) = settings.otlp_tls()? {
            exporter = exporter.with_tls_config(tls);
        }
        let exporter = exporter.build()?;
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
