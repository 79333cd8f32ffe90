//! Mutual TLS between services: the `[tls]` settings, the certificates they name (checked at
//! start, so a bad file is a startup error that names its setting), the server and client TLS
//! configurations, and the guard that keeps the internal gRPC services to callers with a
//! certificate of the deployment's CA.
//!
//! The gRPC port asks every client for a certificate but does not insist at the TLS layer: the
//! external APIs (ingestion, profile reads, admin) stay reachable with only the CA's trust, and
//! are authenticated by write keys and tokens. A client that presents a certificate must present
//! one the CA signed, or the handshake fails. The internal services then require one.

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
        };
        tls.check(Path::new("<ca>"), Path::new("<cert>"), Path::new("<key>"))?;
        Ok(tls)
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

/// A tower layer that answers UNAUTHENTICATED to calls of [`INTERNAL_SERVICES`] over a
/// connection without a verified client certificate. Off (passing everything) when the port is
/// plaintext.
#[derive(Debug, Clone, Copy)]
pub struct RequireClientCertLayer {
    on: bool,
}

impl RequireClientCertLayer {
    /// The layer; `on` when the gRPC port serves TLS.
    pub fn new(on: bool) -> Self {
        Self { on }
    }
}

impl<S> tower::Layer<S> for RequireClientCertLayer {
    type Service = RequireClientCert<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireClientCert { inner, on: self.on }
    }
}

/// See [`RequireClientCertLayer`].
#[derive(Debug, Clone)]
pub struct RequireClientCert<S> {
    inner: S,
    on: bool,
}

/// Whether the request came over a TLS connection whose client presented a certificate the CA
/// signed (the handshake verified it; an unverifiable one never gets this far).
fn has_client_cert<B>(req: &http::Request<B>) -> bool {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .is_some_and(|certs| !certs.is_empty())
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
        if self.on && is_internal(req.uri().path()) && !has_client_cert(&req) {
            let refused = tonic::Status::unauthenticated(
                "a client certificate is required: this is an internal service",
            )
            .into_http();
            return Box::pin(std::future::ready(Ok(refused)));
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
