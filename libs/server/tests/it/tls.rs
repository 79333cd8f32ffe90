//! Mutual TLS on the gRPC port: who gets through to an internal service, who gets through to the
//! rest, and who does not get a connection at all; and certificates rotated on disk, taken up
//! by the gRPC port and by peer channels without a restart.

use std::net::SocketAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tessera_proto::ingestion::v1::event_log_service_client::EventLogServiceClient;
use tessera_proto::ingestion::v1::event_log_service_server::{
    EventLogService, EventLogServiceServer,
};
use tessera_proto::ingestion::v1::{ForgetEventsRequest, ForgetEventsResponse};
use tessera_server::tls::{Tls, TlsSettings};
use tessera_server::{EdgeSettings, GrpcServices, HttpRouter, Listeners, Shutdown, serve_with};
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A CA: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(params, key),
    }
}

fn leaf(ca: &Ca, name: &str) -> Leaf {
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap().pem();
    Leaf {
        cert,
        key: key.serialize_pem(),
    }
}

/// An internal service that answers every call.
struct EventLog;

#[tonic::async_trait]
impl EventLogService for EventLog {
    async fn forget_events(
        &self,
        _: tonic::Request<ForgetEventsRequest>,
    ) -> Result<tonic::Response<ForgetEventsResponse>, tonic::Status> {
        Ok(tonic::Response::new(ForgetEventsResponse {
            events: 7,
            quarantined: 0,
        }))
    }
}

/// Serves the internal EventLogService with `tls`; returns the gRPC and the probe addresses.
async fn server(tls: Tls, shutdown: Shutdown) -> (SocketAddr, SocketAddr) {
    let mut services = GrpcServices::default();
    services.add(EventLogServiceServer::new(EventLog));
    let listeners = Listeners {
        grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        probe: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
    };
    let grpc = listeners.grpc.local_addr().unwrap();
    let probe = listeners.probe.as_ref().unwrap().local_addr().unwrap();
    tokio::spawn(async move {
        serve_with(
            &EdgeSettings::default(),
            listeners,
            Some(&tls),
            services,
            HttpRouter::new(),
            shutdown,
        )
        .await
    });
    (grpc, probe)
}

/// A channel to `url` with `tls`; errors when the handshake (or the connection) fails.
async fn channel(url: String, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let mut endpoint = Channel::from_shared(url)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

async fn forget(channel: Channel) -> Result<i64, tonic::Status> {
    EventLogServiceClient::new(channel)
        .forget_events(ForgetEventsRequest::default())
        .await
        .map(|r| r.into_inner().events)
}

async fn health(channel: Channel) -> Result<i32, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
}

/// A call that failed below gRPC: the connection was refused or closed, no server answered.
fn assert_transport_error<T: std::fmt::Debug>(result: Result<T, tonic::Status>) {
    let err = result.unwrap_err();
    assert!(
        std::error::Error::source(&err).is_some(),
        "a gRPC answer, not a failed connection: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_services_need_a_certificate_of_the_ca() {
    let ours = ca("tessera test ca");
    let theirs = ca("another ca");
    let server_leaf = leaf(&ours, "tessera-ingestion");
    let client_leaf = leaf(&ours, "tessera-profile");
    let stranger = leaf(&theirs, "stranger");
    let tls = Tls::from_pem(
        ours.pem.as_bytes(),
        server_leaf.cert.as_bytes(),
        server_leaf.key.as_bytes(),
    )
    .unwrap();
    let shutdown = Shutdown::new();
    let (grpc, probe) = server(tls, shutdown.clone()).await;
    let url = format!("https://{grpc}");
    let trust = || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ours.pem));

    // A service with a certificate of the CA, among the event log's callers (the profile
    // service), calls the internal service.
    let with_cert = trust().identity(Identity::from_pem(&client_leaf.cert, &client_leaf.key));
    let valid = channel(url.clone(), Some(with_cert)).await.unwrap();
    assert_eq!(forget(valid).await.unwrap(), 7);

    // A client without a certificate reaches the TLS port and the public services (health), but
    // not the internal one.
    let anonymous = channel(url.clone(), Some(trust())).await.unwrap();
    assert_eq!(
        health(anonymous.clone()).await.unwrap(),
        ServingStatus::Serving as i32
    );
    let refused = forget(anonymous).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("a client certificate is required"),
        "{refused:?}"
    );

    // A certificate of another CA fails the handshake: no call at all gets through (with TLS
    // 1.3 the client learns it on its first call rather than on connect).
    let foreign = trust().identity(Identity::from_pem(&stranger.cert, &stranger.key));
    if let Ok(channel) = channel(url.clone(), Some(foreign)).await {
        assert_transport_error(health(channel).await);
    }

    // A plaintext client gets no answer from the TLS port.
    if let Ok(channel) = channel(format!("http://{grpc}"), None).await {
        assert_transport_error(health(channel).await);
    }

    // The probe port answers health in plaintext, and nothing else.
    let probe = channel(format!("http://{probe}"), None).await.unwrap();
    assert_eq!(
        health(probe.clone()).await.unwrap(),
        ServingStatus::Serving as i32
    );
    let unimplemented = forget(probe).await.unwrap_err();
    assert_eq!(unimplemented.code(), tonic::Code::Unimplemented);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn internal_services_admit_only_their_callers() {
    let ours = ca("tessera test ca");
    let server_leaf = leaf(&ours, "tessera-ingestion");
    let scoring = leaf(&ours, "tessera-scoring");
    let pem = |l: &Leaf| Identity::from_pem(&l.cert, &l.key);
    let trust = || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ours.pem));
    let tls = || {
        Tls::from_pem(
            ours.pem.as_bytes(),
            server_leaf.cert.as_bytes(),
            server_leaf.key.as_bytes(),
        )
        .unwrap()
    };

    // The default rules: only the profile service calls the event log. The scoring service's
    // certificate is the CA's, but it is refused, naming the rule.
    let shutdown = Shutdown::new();
    let (grpc, _) = server(tls(), shutdown.clone()).await;
    let url = format!("https://{grpc}");
    let as_scoring = channel(url.clone(), Some(trust().identity(pem(&scoring))))
        .await
        .unwrap();
    let refused = forget(as_scoring.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("tessera-scoring")
            && refused
                .message()
                .contains("tls.callers.event_log admits tessera-profile"),
        "{refused:?}"
    );
    // A public service stays open to it.
    assert_eq!(
        health(as_scoring).await.unwrap(),
        ServingStatus::Serving as i32
    );
    // A process calls itself with its own certificate (several roles in one process).
    let as_itself = channel(url.clone(), Some(trust().identity(pem(&server_leaf))))
        .await
        .unwrap();
    assert_eq!(forget(as_itself).await.unwrap(), 7);
    shutdown.cancel();

    // Configured rules: the scoring service's name admitted, or anyone with "*".
    for admitted in ["tessera-scoring", "*"] {
        let callers = tessera_server::tls::Callers {
            event_log: vec![admitted.to_owned()],
            ..Default::default()
        };
        let shutdown = Shutdown::new();
        let (grpc, _) = server(tls().with_callers(callers), shutdown.clone()).await;
        let as_scoring = channel(
            format!("https://{grpc}"),
            Some(trust().identity(pem(&scoring))),
        )
        .await
        .unwrap();
        assert_eq!(
            forget(as_scoring).await.unwrap(),
            7,
            "admitted by {admitted}"
        );
        shutdown.cancel();
    }
}

#[test]
fn unusable_certificates_are_refused_at_start_by_setting() {
    let ours = ca("tessera test ca");
    let theirs = ca("another ca");
    let mine = leaf(&ours, "identity");
    let stranger = leaf(&theirs, "stranger");

    let err = Tls::from_pem(
        ours.pem.as_bytes(),
        stranger.cert.as_bytes(),
        stranger.key.as_bytes(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("tls.cert_file: <cert>: not a valid client certificate of the CA"),
        "{err}"
    );

    let err = Tls::from_pem(
        ours.pem.as_bytes(),
        mine.cert.as_bytes(),
        stranger.key.as_bytes(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("tls.key_file: <key>: not the private key of tls.cert_file"),
        "{err}"
    );

    let err = Tls::from_pem(ours.pem.as_bytes(), mine.cert.as_bytes(), b"no key here")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("tls.key_file: <key>: holds no PEM private key"),
        "{err}"
    );
}

/// A directory laid out as the kubelet lays out a mounted Secret: `ca.pem`, `cert.pem` and
/// `key.pem` are symlinks into `..data`, itself a symlink to a directory of the version's files
/// that an update replaces in one rename.
struct SecretDir {
    dir: tempfile::TempDir,
    version: usize,
}

impl SecretDir {
    fn new(ca: &str, cert: &str, key: &str) -> Self {
        let mut secret = Self {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        secret.update(ca, cert, key);
        for name in ["ca.pem", "cert.pem", "key.pem"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), secret.dir.path().join(name))
                .unwrap();
        }
        secret
    }

    /// Writes a new version and swaps `..data` to it atomically, as the kubelet does.
    fn update(&mut self, ca: &str, cert: &str, key: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let path = self.dir.path().join(&version);
        std::fs::create_dir(&path).unwrap();
        for (name, contents) in [("ca.pem", ca), ("cert.pem", cert), ("key.pem", key)] {
            std::fs::write(path.join(name), contents).unwrap();
        }
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    /// `[tls]` naming the three files, read again every second.
    fn settings(&self) -> TlsSettings {
        TlsSettings {
            ca_file: Some(self.dir.path().join("ca.pem")),
            cert_file: Some(self.dir.path().join("cert.pem")),
            key_file: Some(self.dir.path().join("key.pem")),
            reload_interval_secs: 1,
            ..TlsSettings::default()
        }
    }
}

/// The value of `tessera_tls_reloads_total{outcome}` in this process's metrics.
fn reloads(outcome: &str) -> u64 {
    let rendered = tessera_server::metrics_handle().render();
    let prefix = format!("tessera_tls_reloads_total{{outcome=\"{outcome}\"}} ");
    rendered
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Polls `check` every 100 ms until it holds; panics with `what` after 15 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what} within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_rotated_on_disk_is_served_without_a_restart() {
    let (old_ca, new_ca) = (ca("old ca"), ca("new ca"));
    let (old_served, new_served) = (
        leaf(&old_ca, "tessera-ingestion"),
        leaf(&new_ca, "tessera-ingestion"),
    );
    let (old_caller, new_caller) = (
        leaf(&old_ca, "tessera-profile"),
        leaf(&new_ca, "tessera-profile"),
    );
    let mut secret = SecretDir::new(&old_ca.pem, &old_served.cert, &old_served.key);
    let tls = secret.settings().load().unwrap().expect("tls on");
    let shutdown = Shutdown::new();
    let (grpc, _) = server(tls, shutdown.clone()).await;
    let url = format!("https://{grpc}");
    // A client of one CA: trusts only it, and presents its certificate of it.
    let client = |ca: &Ca, caller: &Leaf| {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca.pem))
            .identity(Identity::from_pem(&caller.cert, &caller.key))
    };
    let call = |config: ClientTlsConfig| {
        let url = url.clone();
        async move {
            match channel(url, Some(config)).await {
                Ok(channel) => forget(channel).await.map_err(|e| format!("{e:?}")),
                Err(e) => Err(e),
            }
        }
    };

    let open = channel(url.clone(), Some(client(&old_ca, &old_caller)))
        .await
        .unwrap();
    assert_eq!(forget(open.clone()).await.unwrap(), 7);
    assert!(call(client(&new_ca, &new_caller)).await.is_err());

    // A replacement whose key is not its certificate's: rejected, counted, and the old
    // certificate and CA go on serving new connections.
    let rejected = reloads("rejected");
    let other_key = leaf(&new_ca, "other").key;
    secret.update(&new_ca.pem, &new_served.cert, &other_key);
    eventually("the bad set is rejected", || async {
        reloads("rejected") > rejected
    })
    .await;
    assert_eq!(call(client(&old_ca, &old_caller)).await.unwrap(), 7);
    assert!(call(client(&new_ca, &new_caller)).await.is_err());

    // The whole new set: a new connection sees the new certificate (a client trusting only the
    // new CA gets through) and the new CA checks client certificates.
    secret.update(&new_ca.pem, &new_served.cert, &new_served.key);
    eventually("a client of the new CA gets through", || async {
        call(client(&new_ca, &new_caller)).await == Ok(7)
    })
    .await;
    assert!(reloads("applied") >= 1);
    // A client trusting only the old CA no longer accepts the server's certificate; one that
    // trusts the new CA but presents the old CA's certificate is refused by the server.
    let err = call(client(&old_ca, &old_caller)).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    let mixed = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&new_ca.pem))
        .identity(Identity::from_pem(&old_caller.cert, &old_caller.key));
    assert!(call(mixed).await.is_err());
    // The connection opened before the rotation goes on.
    assert_eq!(forget(open).await.unwrap(), 7);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_channels_take_up_a_rotated_certificate_and_ca() {
    let (old_ca, new_ca) = (ca("old ca"), ca("new ca"));
    // Two servers that take client certificates of either CA, one with a certificate of each.
    let both = format!("{}{}", old_ca.pem, new_ca.pem);
    let shutdown = Shutdown::new();
    let mut addrs = Vec::new();
    for ca in [&old_ca, &new_ca] {
        let served = leaf(ca, "tessera-ingestion");
        let tls = Tls::from_pem(
            both.as_bytes(),
            served.cert.as_bytes(),
            served.key.as_bytes(),
        )
        .unwrap();
        addrs.push(server(tls, shutdown.clone()).await.0);
    }
    let (old_server, new_server) = (addrs[0], addrs[1]);

    // The caller starts as the scoring service with the old CA, and is rotated to the profile
    // service's certificate of the new CA. The event log admits only the profile service, so
    // the answer tells which certificate a connection presented.
    let scoring = leaf(&old_ca, "tessera-scoring");
    let profile = leaf(&new_ca, "tessera-profile");
    let mut secret = SecretDir::new(&old_ca.pem, &scoring.cert, &scoring.key);
    let caller = secret.settings().load().unwrap().expect("tls on");
    caller.spawn_reload(shutdown.clone());
    let peer = |addr: SocketAddr| {
        caller
            .peer_endpoint(&format!("https://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(caller.connector())
    };
    // Channels made once, as a service makes them at start.
    let (to_old, to_new) = (peer(old_server), peer(new_server));

    let refused = forget(to_old.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("tessera-scoring"), "{refused:?}");
    assert_transport_error(forget(to_new.clone()).await);

    secret.update(&new_ca.pem, &profile.cert, &profile.key);
    // The channel that could not connect now does: its next connection trusts the new CA and
    // presents the new certificate, which the event log admits.
    eventually("the channel to the new CA's server connects", || {
        let to_new = to_new.clone();
        async move { forget(to_new).await.is_ok_and(|n| n == 7) }
    })
    .await;
    // The connection opened before the rotation keeps the certificate it was made with.
    let refused = forget(to_old).await.unwrap_err();
    assert!(refused.message().contains("tessera-scoring"), "{refused:?}");
    // A new connection to the old CA's server does not trust it any more.
    assert_transport_error(forget(peer(old_server)).await);
    shutdown.cancel();
}
