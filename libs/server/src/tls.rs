//! Mutual TLS between services: the `[tls]` settings, the certificates they name (checked at
//! start, so a bad file is a startup error that names its setting), the server and client TLS
//! configurations, and the guard that keeps the internal gRPC services to callers with a
//! certificate of the deployment's CA.
//!
//! The gRPC port asks every client for a certificate but does not insist at the TLS layer: the
//! external APIs (ingestion, profile reads, admin) stay reachable with only the CA's trust, and
//! are authenticated by write keys and tokens. A client that presents a certificate must present
//! one the CA signed, or the handshake fails. The internal services then require one, and only
//! the callers `[tls.callers]` lists for each (by the certificate's common name or DNS names):
//! by default the services that call it, named as `tessera dev-certs` names their certificates
//! (`tessera-<service>`). A process may always call itself (`tessera dev`, several roles in one
//! process, with one certificate).

use std::convert::Infallible;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The gRPC services only other Tessera services call: reachable only with a client
/// certificate when TLS is on. Every other service (ingestion, profile reads, the admin APIs,
/// health, reflection) authenticates its callers by keys and tokens instead.
pub const INTERNAL_SERVICES: [&str; 4] = [
    tessera_proto::identity::v1::identity_service_server::SERVICE_NAME,
    tessera_proto::profile::v1::profile_pipeline_service_server::SERVICE_NAME,
    tessera_proto::scoring::v1::scoring_service_server::SERVICE_NAME,
    tessera_proto::ingestion::v1::event_log_service_server::SERVICE_NAME,
];

/// Whether a gRPC request path (`/package.Service/Method`) names an internal service.
pub fn is_internal(path: &str) -> bool {
    let service = path
        .strip_prefix('/')
        .and_then(|p| p.split('/').next())
        .unwrap_or("");
    INTERNAL_SERVICES.contains(&service)
}

/// The `[tls]` settings: PEM files, all three or none.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// The CA that signs every service's certificate: peers' server and client certificates
    /// are checked against it.
    pub ca_file: Option<PathBuf>,
    /// This service's certificate (chain), used as server and as client certificate.
    pub cert_file: Option<PathBuf>,
    /// The private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Serve plaintext gRPC on an address that is not loopback. Without TLS a service refuses to
    /// listen beyond loopback unless this is set.
    pub allow_plaintext: bool,
    /// Which client certificates may call each internal service.
    pub callers: Callers,
}

/// Which client certificates may call each internal service: one of the names of a listed
/// entry must be the certificate's common name or one of its DNS names; `"*"` admits any
/// certificate of the CA. The defaults are the services that call each, by the names `tessera
/// dev-certs` gives their certificates.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Callers {
    /// `tessera.identity.v1.IdentityService` (resolution, matching, graph changes).
    pub identity: Vec<String>,
    /// `tessera.profile.v1.ProfilePipelineService` (applying events, merges and splits;
    /// purchase histories for model fits).
    pub profile_pipeline: Vec<String>,
    /// `tessera.scoring.v1.ScoringService` (scoring profiles).
    pub scoring: Vec<String>,
    /// `tessera.ingestion.v1.EventLogService` (deleting a person's events).
    pub event_log: Vec<String>,
}

impl Default for Callers {
    fn default() -> Self {
        let names = |services: &[&str]| {
            services
                .iter()
                .map(|s| format!("tessera-{s}"))
                .collect::<Vec<_>>()
        };
        Self {
            identity: names(&["ingestion", "profile"]),
            profile_pipeline: names(&["ingestion", "identity", "scoring"]),
            scoring: names(&["profile"]),
            event_log: names(&["profile"]),
        }
    }
}

impl Callers {
    /// The names admitted to `service` (a full gRPC service name), and the setting listing them;
    /// `None` for a service that is not internal.
    fn of(&self, service: &str) -> Option<(&[String], &'static str)> {
        let Self {
            identity,
            profile_pipeline,
            scoring,
            event_log,
        } = self;
        use tessera_proto::identity::v1::identity_service_server::SERVICE_NAME as IDENTITY;
        use tessera_proto::ingestion::v1::event_log_service_server::SERVICE_NAME as EVENT_LOG;
        use tessera_proto::profile::v1::profile_pipeline_service_server::SERVICE_NAME as PIPELINE;
        use tessera_proto::scoring::v1::scoring_service_server::SERVICE_NAME as SCORING;
        match service {
            IDENTITY => Some((identity, "tls.callers.identity")),
            PIPELINE => Some((profile_pipeline, "tls.callers.profile_pipeline")),
            SCORING => Some((scoring, "tls.callers.scoring")),
            EVENT_LOG => Some((event_log, "tls.callers.event_log")),
            _ => None,
        }
    }
}

/// The common names and DNS names of a DER certificate (empty when it does not parse; the
/// handshake verified it, so that does not happen).
fn names_in(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    names
}

/// Why the TLS settings cannot be used. Each names the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Some of the three files are set, not all.
    #[error(
        "tls.ca_file, tls.cert_file and tls.key_file go together: set all three for TLS, or \
         none (missing: {missing})"
    )]
    Incomplete {
        /// The settings that are missing.
        missing: String,
    },
    /// A file could not be read.
    #[error("tls.{setting}: cannot read {}: {source}", path.display())]
    Read {
        /// The setting naming the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file's contents are not usable.
    #[error("tls.{setting}: {}: {reason}", path.display())]
    Invalid {
        /// The setting naming the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A service's TLS material, read and checked: the CA, its certificate and key (PEM).
#[derive(Clone)]
pub struct Tls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    callers: Callers,
}

impl fmt::Debug for Tls {
    // The key never prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// Whether any of the three files is set.
    pub fn is_configured(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Reads and checks the files: `None` when TLS is off (no file set).
    pub fn load(&self) -> Result<Option<Tls>, TlsError> {
        let (ca_file, cert_file, key_file) = match (&self.ca_file, &self.cert_file, &self.key_file)
        {
            (None, None, None) => return Ok(None),
            (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    ("tls.ca_file", ca.is_none()),
                    ("tls.cert_file", cert.is_none()),
                    ("tls.key_file", key.is_none()),
                ]
                .into_iter()
                .filter_map(|(name, missing)| missing.then_some(name))
                .collect();
                return Err(TlsError::Incomplete {
                    missing: missing.join(", "),
                });
            }
        };
        let read = |setting: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                setting,
                path: path.to_owned(),
                source,
            })
        };
        let tls = Tls {
            ca: read("ca_file", ca_file)?,
            cert: read("cert_file", cert_file)?,
            key: read("key_file", key_file)?,
            callers: self.callers.clone(),
        };
        tls.check(ca_file, cert_file, key_file)?;
        Ok(Some(tls))
    }
}

impl Tls {
    /// TLS material from PEM bytes, checked as [`TlsSettings::load`] checks files.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let tls = Self {
            ca: ca.to_vec(),
            cert: cert.to_vec(),
            key: key.to_vec(),
            callers: Callers::default(),
        };
        tls.check(Path::new("<ca>"), Path::new("<cert>"), Path::new("<key>"))?;
        Ok(tls)
    }

    /// The same material with other caller rules.
    pub fn with_callers(mut self, callers: Callers) -> Self {
        self.callers = callers;
        self
    }

    /// Everything a handshake would find wrong, found now: parseable PEM, a key that matches
    /// the certificate, and a certificate the CA signed that is valid for client authentication
    /// (each service is a client of its peers) and not expired.
    fn check(&self, ca_file: &Path, cert_file: &Path, key_file: &Path) -> Result<(), TlsError> {
        let invalid = |setting: &'static str, path: &Path, reason: String| TlsError::Invalid {
            setting,
            path: path.to_owned(),
            reason,
        };
        let certs = |pem: &[u8], setting: &'static str, path: &Path| {
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
        let ca = certs(&self.ca, "ca_file", ca_file)?;
        let chain = certs(&self.cert, "cert_file", cert_file)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| {
            invalid(
                "key_file",
                key_file,
                format!("holds no PEM private key: {e}"),
            )
        })?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in ca {
            roots
                .add(cert)
                .map_err(|e| invalid("ca_file", ca_file, format!("not a CA certificate: {e}")))?;
        }
        rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|e| {
            invalid(
                "key_file",
                key_file,
                format!(
                    "not the private key of tls.cert_file ({}): {e}",
                    cert_file.display()
                ),
            )
        })?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| invalid("ca_file", ca_file, e.to_string()))?;
        let (end_entity, intermediates) = chain.split_first().expect("checked not empty");
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map_err(|e| {
                invalid(
                    "cert_file",
                    cert_file,
                    format!(
                        "not a valid client certificate of the CA in tls.ca_file ({}): {e}",
                        ca_file.display()
                    ),
                )
            })?;
        Ok(())
    }

    /// The gRPC port's TLS: this service's certificate, and client certificates of the CA
    /// verified when presented (required by [`RequireClientCert`] for internal services only).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(true)
            .timeout(Duration::from_secs(10))
    }

    /// TLS for calls to peers: the CA checks the peer (its name is the URL's host) and this
    /// service's certificate is its client certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
    }
}

/// A tower layer that guards the [`INTERNAL_SERVICES`]: UNAUTHENTICATED over a connection
/// without a verified client certificate, PERMISSION_DENIED for a certificate that
/// `[tls.callers]` does not admit to the service. Off (passing everything) when the port is
/// plaintext.
#[derive(Debug, Clone)]
pub struct RequireClientCertLayer {
    guard: Option<Arc<Guard>>,
}

/// What the layer checks callers against.
#[derive(Debug)]
struct Guard {
    callers: Callers,
    /// This process's own certificate (DER): a process may call itself.
    own: Option<Vec<u8>>,
}

impl RequireClientCertLayer {
    /// The layer for a gRPC port served with `tls` (none: plaintext, nothing checked).
    pub fn new(tls: Option<&Tls>) -> Self {
        let guard = tls.map(|tls| {
            let own = CertificateDer::pem_slice_iter(&tls.cert)
                .next()
                .and_then(Result::ok)
                .map(|der| der.as_ref().to_vec());
            Arc::new(Guard {
                callers: tls.callers.clone(),
                own,
            })
        });
        Self { guard }
    }
}

impl<S> tower::Layer<S> for RequireClientCertLayer {
    type Service = RequireClientCert<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireClientCert {
            inner,
            guard: self.guard.clone(),
        }
    }
}

/// See [`RequireClientCertLayer`].
#[derive(Debug, Clone)]
pub struct RequireClientCert<S> {
    inner: S,
    guard: Option<Arc<Guard>>,
}

/// The leaf certificate the client presented over TLS, verified by the handshake against the
/// CA (an unverifiable one never gets this far).
fn client_cert<B>(req: &http::Request<B>) -> Option<Vec<u8>> {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()))
}

impl Guard {
    /// Why the request may not call `service`, as the status to answer; `None` when it may.
    fn refusal(&self, service: &str, cert: Option<&[u8]>) -> Option<tonic::Status> {
        let (admitted, setting) = self.callers.of(service)?;
        let Some(cert) = cert else {
            return Some(tonic::Status::unauthenticated(
                "a client certificate is required: this is an internal service",
            ));
        };
        if self.own.as_deref() == Some(cert) || admitted.iter().any(|a| a == "*") {
            return None;
        }
        let names = names_in(cert);
        if names.iter().any(|n| admitted.contains(n)) {
            return None;
        }
        Some(tonic::Status::permission_denied(format!(
            "the client certificate ({}) may not call {service}: {setting} admits {}",
            names.first().map_or("no name", String::as_str),
            if admitted.is_empty() {
                "nobody".to_owned()
            } else {
                admitted.join(", ")
            }
        )))
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for RequireClientCert<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(guard) = &self.guard
            && is_internal(req.uri().path())
        {
            let service = req
                .uri()
                .path()
                .strip_prefix('/')
                .and_then(|p| p.split('/').next())
                .unwrap_or("");
            if let Some(refused) = guard.refusal(service, client_cert(&req).as_deref()) {
                return Box::pin(std::future::ready(Ok(refused.into_http())));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_services_are_told_apart_by_path() {
        assert!(is_internal(
            "/tessera.identity.v1.IdentityService/ResolveIdentities"
        ));
        assert!(is_internal(
            "/tessera.profile.v1.ProfilePipelineService/ApplyEvents"
        ));
        assert!(is_internal(
            "/tessera.scoring.v1.ScoringService/ScoreProfiles"
        ));
        assert!(is_internal(
            "/tessera.ingestion.v1.EventLogService/ForgetEvents"
        ));
        assert!(!is_internal(
            "/tessera.ingestion.v1.IngestionService/IngestEvents"
        ));
        assert!(!is_internal(
            "/tessera.profile.v1.ProfileService/GetProfile"
        ));
        assert!(!is_internal("/grpc.health.v1.Health/Check"));
        assert!(!is_internal("/tessera.identity.v1.IdentityServiceX/Any"));
        assert!(!is_internal(""));
    }

    #[test]
    fn half_configured_tls_names_what_is_missing() {
        let settings = TlsSettings {
            ca_file: Some("ca.pem".into()),
            ..TlsSettings::default()
        };
        let err = settings.load().unwrap_err().to_string();
        assert!(
            err.ends_with("(missing: tls.cert_file, tls.key_file)"),
            "{err}"
        );
        assert!(TlsSettings::default().load().unwrap().is_none());
    }

    #[test]
    fn unreadable_files_name_their_setting() {
        let settings = TlsSettings {
            ca_file: Some("/nonexistent/ca.pem".into()),
            cert_file: Some("/nonexistent/cert.pem".into()),
            key_file: Some("/nonexistent/key.pem".into()),
            allow_plaintext: false,
            callers: Callers::default(),
        };
        let err = settings.load().unwrap_err().to_string();
        assert!(
            err.starts_with("tls.ca_file: cannot read /nonexistent/ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn files_that_are_not_pem_name_their_setting() {
        let err = Tls::from_pem(b"not a certificate", b"", b"")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("tls.ca_file: <ca>: holds no PEM certificate"),
            "{err}"
        );
    }
}
