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
//!
//! Certificates rotate without a restart: the files are read again every
//! `tls.reload_interval_secs`, and a changed set that checks out (as at start) replaces the one
//! in use, as a whole, for every new connection: the gRPC port's handshakes (Tessera's own
//! accept loop, [`Tls::incoming`], instead of tonic's fixed `ServerTlsConfig`) and the peer
//! channels' (a connector of its own, [`Tls::connector`], instead of tonic's fixed
//! `ClientTlsConfig`). Open connections keep the material they were made with. A set that does
//! not check out (a key that is not the certificate's, a half-written file) is logged and
//! counted, and the old one stays in use.

use std::convert::Infallible;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

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
#[derive(Debug, Clone, serde::Deserialize)]
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
    /// How often the three files are read again, in seconds (0: only at start). A changed set
    /// that checks out is used from then on for every new connection, served or made; one that
    /// does not is logged and counted, and the set in use stays.
    pub reload_interval_secs: u64,
    /// Which client certificates may call each internal service.
    pub callers: Callers,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            ca_file: None,
            cert_file: None,
            key_file: None,
            allow_plaintext: false,
            reload_interval_secs: 60,
            callers: Callers::default(),
        }
    }
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
    /// A peer URL that cannot be called over mutual TLS.
    #[error("the peer {url:?} cannot be called over mutual TLS: {reason}")]
    PeerUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The three files, where they are read from.
#[derive(Debug, Clone)]
struct Files {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// The three files' contents (PEM).
struct Pem {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Files {
    fn read(&self) -> Result<Pem, TlsError> {
        let read = |setting: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                setting,
                path: path.to_owned(),
                source,
            })
        };
        Ok(Pem {
            ca: read("ca_file", &self.ca)?,
            cert: read("cert_file", &self.cert)?,
            key: read("key_file", &self.key)?,
        })
    }
}

impl Pem {
    /// What tells one set of files from another: a hash of the three contents.
    fn digest(&self) -> [u8; 32] {
        use sha2::Digest as _;
        let mut hash = sha2::Sha256::new();
        for part in [&self.ca, &self.cert, &self.key] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.finalize().into()
    }
}

/// How many of this process's own certificates the caller guard recognizes: the one in use and
/// those it replaced, so connections a process opened to itself before a rotation keep calling.
const OWN_KEPT: usize = 4;

/// The ALPN protocol gRPC runs on.
const ALPN_H2: &[u8] = b"h2";

/// How long a client may take over its TLS handshake on the gRPC port.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One checked set of files, ready for handshakes: the server and client configurations built
/// from it, swapped as a whole when the files change.
struct Material {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    /// This process's leaf certificates (DER): the one in use first, then up to
    /// `OWN_KEPT - 1` it used before.
    own: Vec<Vec<u8>>,
    /// The files' [`Pem::digest`].
    digest: [u8; 32],
    /// When the certificate in use expires, in seconds since the Unix epoch.
    not_after: i64,
}

/// The material in use, shared by the gRPC port's accept loop, the peer connectors and the
/// caller guard, and the files it is reloaded from.
struct Live {
    current: ArcSwap<Material>,
    /// None for material given as PEM bytes: nothing to reload.
    files: Option<Files>,
    reload_interval: Duration,
    /// Whether the reload task runs (it is started once per `Live`).
    reloading: AtomicBool,
}

/// A service's TLS material, read and checked, and kept up to date with its files: the CA, its
/// certificate and key. Clones share the material, so a reload reaches the gRPC port, every
/// peer channel and the caller guard at once.
#[derive(Clone)]
pub struct Tls {
    live: Arc<Live>,
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
        let files = match (&self.ca_file, &self.cert_file, &self.key_file) {
            (None, None, None) => return Ok(None),
            (Some(ca), Some(cert), Some(key)) => Files {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            },
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
        let material = Material::build(&files.read()?, &files, &[])?;
        Ok(Some(Tls::new(
            material,
            Some(files),
            Duration::from_secs(self.reload_interval_secs),
            self.callers.clone(),
        )))
    }
}

impl Material {
    /// Everything a handshake would find wrong, found now: parseable PEM, a key that matches
    /// the certificate, and a certificate the CA signed that is valid for client authentication
    /// (each service is a client of its peers) and not expired. Errors name the file at fault
    /// (`files`), never its contents. `own_before` are the certificates it replaces.
    fn build(pem: &Pem, files: &Files, own_before: &[Vec<u8>]) -> Result<Self, TlsError> {
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
        let ca = certs(&pem.ca, "ca_file", &files.ca)?;
        let chain = certs(&pem.cert, "cert_file", &files.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| {
            invalid(
                "key_file",
                &files.key,
                format!("holds no PEM private key: {e}"),
            )
        })?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in ca {
            roots
                .add(cert)
                .map_err(|e| invalid("ca_file", &files.ca, format!("not a CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
            |e| {
                invalid(
                    "key_file",
                    &files.key,
                    format!(
                        "not the private key of tls.cert_file ({}): {e}",
                        files.cert.display()
                    ),
                )
            },
        )?;
        // Client certificates are asked for, not required: the external APIs stay reachable
        // with the CA's trust alone (see the module's documentation).
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&roots),
            Arc::clone(&provider),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| invalid("ca_file", &files.ca, e.to_string()))?;
        let (end_entity, intermediates) = chain.split_first().expect("checked not empty");
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map_err(|e| {
                invalid(
                    "cert_file",
                    &files.cert,
                    format!(
                        "not a valid client certificate of the CA in tls.ca_file ({}): {e}",
                        files.ca.display()
                    ),
                )
            })?;
        let not_after = x509_parser::parse_x509_certificate(end_entity)
            .map(|(_, cert)| cert.validity().not_after.timestamp())
            .unwrap_or_default();
        let own: Vec<Vec<u8>> = std::iter::once(end_entity.as_ref().to_vec())
            .chain(
                own_before
                    .iter()
                    .filter(|c| c.as_slice() != end_entity.as_ref())
                    .cloned(),
            )
            .take(OWN_KEPT)
            .collect();

        let unusable = |e: rustls::Error| invalid("cert_file", &files.cert, e.to_string());
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(unusable)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(unusable)?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(unusable)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(unusable)?;
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            own,
            digest: pem.digest(),
            not_after,
        })
    }
}

/// What one look at the files found.
#[derive(Debug)]
enum Reload {
    /// The files are the set in use.
    Unchanged,
    /// A new set, now in use.
    Applied,
    /// A new set that does not check out (or a file that cannot be read); the old set stays.
    Rejected(TlsError),
}

impl Tls {
    fn new(material: Material, files: Option<Files>, every: Duration, callers: Callers) -> Self {
        Self {
            live: Arc::new(Live {
                current: ArcSwap::from_pointee(material),
                files,
                reload_interval: every,
                reloading: AtomicBool::new(false),
            }),
            callers,
        }
    }

    /// TLS material from PEM bytes, checked as [`TlsSettings::load`] checks files. It has no
    /// files, so it is never reloaded.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let pem = Pem {
            ca: ca.to_vec(),
            cert: cert.to_vec(),
            key: key.to_vec(),
        };
        let names = Files {
            ca: "<ca>".into(),
            cert: "<cert>".into(),
            key: "<key>".into(),
        };
        let material = Material::build(&pem, &names, &[])?;
        Ok(Self::new(
            material,
            None,
            Duration::ZERO,
            Callers::default(),
        ))
    }

    /// The same material with other caller rules.
    pub fn with_callers(mut self, callers: Callers) -> Self {
        self.callers = callers;
        self
    }

    /// Reads the files again and swaps in the new set when they changed and check out.
    fn reload(&self) -> Reload {
        let Some(files) = &self.live.files else {
            return Reload::Unchanged;
        };
        let pem = match files.read() {
            Ok(pem) => pem,
            Err(e) => return Reload::Rejected(e),
        };
        let current = self.live.current.load();
        if pem.digest() == current.digest {
            return Reload::Unchanged;
        }
        match Material::build(&pem, files, &current.own) {
            Ok(material) => {
                self.live.current.store(Arc::new(material));
                Reload::Applied
            }
            Err(e) => Reload::Rejected(e),
        }
    }

    /// Follows the files: every `tls.reload_interval_secs` they are read again, and a changed
    /// set that checks out replaces the one in use for new connections (served and made; open
    /// ones go on). A set that does not is logged at WARN, naming the file and what is wrong,
    /// and counted in `tessera_tls_reloads_total{outcome="rejected"}`, at every look while it
    /// lasts. Records `tessera_tls_certificate_expiry_timestamp_seconds`. Started once per
    /// material however often it is called (the server edge calls it); does nothing without
    /// files or with an interval of 0. Stops with `stop`.
    pub fn spawn_reload(&self, stop: CancellationToken) {
        record_expiry(&self.live.current.load());
        let every = self.live.reload_interval;
        if self.live.files.is_none()
            || every.is_zero()
            || self.live.reloading.swap(true, Ordering::SeqCst)
        {
            return;
        }
        for outcome in ["applied", "rejected"] {
            metrics::counter!(RELOADS, "outcome" => outcome).increment(0);
        }
        let tls = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate: the files may have changed while the process was
            // starting (migrations, say) after they were first read.
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = stop.cancelled() => break,
                }
                let checked = tls.clone();
                let Ok(outcome) = tokio::task::spawn_blocking(move || checked.reload()).await
                else {
                    continue;
                };
                match outcome {
                    Reload::Unchanged => {}
                    Reload::Applied => {
                        let current = tls.live.current.load();
                        record_expiry(&current);
                        metrics::counter!(RELOADS, "outcome" => "applied").increment(1);
                        tracing::info!(
                            not_after = current.not_after,
                            "tls files changed: new connections use the new certificate and CA"
                        );
                    }
                    Reload::Rejected(error) => {
                        metrics::counter!(RELOADS, "outcome" => "rejected").increment(1);
                        tracing::warn!(
                            %error,
                            "tls files changed but cannot be used; the certificate and CA in use stay"
                        );
                    }
                }
            }
        });
    }

    /// Whether `cert` (DER) is this process's certificate, or one it used before the last
    /// rotations: a process may call itself.
    fn is_own(&self, cert: &[u8]) -> bool {
        self.live
            .current
            .load()
            .own
            .iter()
            .any(|own| own.as_slice() == cert)
    }

    /// The gRPC port's connections: TCP from `listener` (with TCP_NODELAY), each TLS handshake
    /// done with the material in use when it starts, the client's certificate verified against
    /// the CA when it presents one. Handshakes run side by side, each at most 10 s; a failed one
    /// is logged at DEBUG and counted in `tessera_tls_handshake_failures_total`. Ends with
    /// `stop`.
    pub(crate) fn incoming(
        &self,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let live = Arc::clone(&self.live);
        metrics::counter!(HANDSHAKE_FAILURES).increment(0);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            // Out of file descriptors, say: back off instead of spinning.
                            tracing::warn!(%error, "accepting a gRPC connection failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = stop.cancelled() => break,
                    () = tx.closed() => break,
                };
                // Without it a small response can wait for the peer's delayed ACK.
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%error, "TCP_NODELAY not set");
                }
                let acceptor = TlsAcceptor::from(Arc::clone(&live.current.load().server));
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(error)) => {
                            metrics::counter!(HANDSHAKE_FAILURES).increment(1);
                            tracing::debug!(%peer, %error, "tls handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!(HANDSHAKE_FAILURES).increment(1);
                            tracing::debug!(%peer, "tls handshake timed out");
                        }
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }

    /// The endpoint of a peer at `url` (`https://host:port`) for [`Tls::connector`]: the
    /// connector does TLS itself, so tonic's endpoint is given the `http://` form (tonic would
    /// otherwise insist on doing TLS with its own, fixed, configuration) and the `https://` URL
    /// as the origin requests carry.
    pub fn peer_endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let refused = |reason: String| TlsError::PeerUrl {
            url: url.to_owned(),
            reason,
        };
        let uri: http::Uri = url.parse().map_err(|e| refused(format!("{e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(refused("not an https:// URL".to_owned()));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| refused("no host".to_owned()))?;
        let port = authority.port_u16().unwrap_or(443);
        let host = authority.host();
        let path = uri.path_and_query().map_or("", |p| p.as_str());
        let plain = format!("http://{host}:{port}{path}");
        let endpoint = Endpoint::from_shared(plain).map_err(|e| refused(format!("{e}")))?;
        Ok(endpoint.origin(uri))
    }

    /// Connects to peers (a tower service of URIs, for
    /// [`Endpoint::connect_with_connector_lazy`] with [`Tls::peer_endpoint`]): TCP, then TLS
    /// with the material in use at the time of each connection, so a channel built at start
    /// presents the new certificate and trusts the new CA once the files change. The peer's
    /// certificate must be the CA's and name the URL's host, and it must speak HTTP/2 (ALPN).
    pub fn connector(&self) -> PeerConnector {
        PeerConnector {
            live: Arc::clone(&self.live),
        }
    }
}

/// The name of the reload counter.
const RELOADS: &str = "tessera_tls_reloads_total";
/// The name of the handshake failure counter.
const HANDSHAKE_FAILURES: &str = "tessera_tls_handshake_failures_total";

/// Records when the certificate in use expires.
fn record_expiry(material: &Material) {
    metrics::gauge!("tessera_tls_certificate_expiry_timestamp_seconds")
        .set(material.not_after as f64);
}

/// See [`Tls::connector`].
#[derive(Clone)]
pub struct PeerConnector {
    live: Arc<Live>,
}

impl fmt::Debug for PeerConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConnector").finish_non_exhaustive()
    }
}

impl tower::Service<http::Uri> for PeerConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = Arc::clone(&self.live.current.load().client);
        Box::pin(async move {
            let invalid =
                |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone())
                .map_err(|e| invalid(format!("{host:?} is not a host name: {e}")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = TlsConnector::from(config).connect(name, tcp).await?;
            if stream.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
                return Err(std::io::Error::other(format!(
                    "{host}:{port} did not agree to HTTP/2 (ALPN h2)"
                )));
            }
            Ok(TokioIo::new(stream))
        })
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
    /// This process's material, for its own certificates: a process may call itself.
    tls: Tls,
}

impl RequireClientCertLayer {
    /// The layer for a gRPC port served with `tls` (none: plaintext, nothing checked).
    pub fn new(tls: Option<&Tls>) -> Self {
        let guard = tls.map(|tls| {
            Arc::new(Guard {
                callers: tls.callers.clone(),
                tls: tls.clone(),
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
        if self.tls.is_own(cert) || admitted.iter().any(|a| a == "*") {
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
            ..TlsSettings::default()
        };
        let err = settings.load().unwrap_err().to_string();
        assert!(
            err.starts_with("tls.ca_file: cannot read /nonexistent/ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn peers_are_reached_through_the_http_form_of_their_https_url() {
        let tls = tls_for_tests();
        let endpoint = tls.peer_endpoint("https://tessera-identity:50051").unwrap();
        assert_eq!(endpoint.uri(), "http://tessera-identity:50051/");
        let endpoint = tls.peer_endpoint("https://tessera-identity").unwrap();
        assert_eq!(endpoint.uri(), "http://tessera-identity:443/");
        let endpoint = tls.peer_endpoint("https://[::1]:50051").unwrap();
        assert_eq!(endpoint.uri(), "http://[::1]:50051/");
        let err = tls
            .peer_endpoint("http://tessera-identity:50051")
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("not an https:// URL"), "{err}");
    }

    /// Material made on the spot (a CA and one certificate of it).
    fn tls_for_tests() -> Tls {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &issuer).unwrap().pem();
        Tls::from_pem(
            ca_pem.as_bytes(),
            cert.as_bytes(),
            key.serialize_pem().as_bytes(),
        )
        .unwrap()
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
