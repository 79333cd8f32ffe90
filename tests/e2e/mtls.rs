//! Mutual TLS between the four services as separate processes, with certificates from
//! `tessera dev-certs`: the pipeline runs over it, and a client without a valid certificate is
//! refused; certificates rotated on disk are taken up without a restart.

use std::time::Duration;

use base64::Engine as _;
use tessera_proto::identity::v1::ResolveIdentitiesRequest;
use tessera_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tessera_testkit::{TestDb, redis_prefix};
use tessera_tests::events::wait_for;
use tessera_tests::{TesseraBuilder, tessera_bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::separate_processes::Deployment;

/// POSTs one track call to the Segment-compatible `/v1/track` (write key as the Basic user);
/// returns the response's status line.
async fn http_track(http_addr: &str, write_key: &str, user: &str) -> String {
    let body = serde_json::json!({"userId": user, "event": "Signed Up"}).to_string();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"));
    let request = format!(
        "POST /v1/track HTTP/1.1\r\nHost: {http_addr}\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response.lines().next().unwrap_or_default().to_owned()
}

async fn resolve(channel: Channel) -> Result<(), tonic::Status> {
    IdentityServiceClient::new(channel)
        .resolve_identities(ResolveIdentitiesRequest::default())
        .await
        .map(drop)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_runs_over_mutual_tls_and_clients_without_a_certificate_are_refused() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path().to_str().unwrap().to_owned();
    let made = tokio::process::Command::new(tessera_bin())
        .args(["dev-certs", "--out", &dir])
        .env_clear()
        .output()
        .await
        .expect("run tessera dev-certs");
    assert!(made.status.success(), "tessera dev-certs: {made:?}");

    // Every service with its own certificate; peers the deployment does not wire (the
    // defaults) are https too, as TLS requires.
    let db = TestDb::new().await;
    let prefix = redis_prefix();
    let tls = |b: tessera_tests::TesseraBuilder| {
        let service = b.subcommand().to_owned();
        b.env("TESSERA__TLS__CA_FILE", format!("{dir}/ca.pem"))
            .env("TESSERA__TLS__CERT_FILE", format!("{dir}/{service}.pem"))
            .env("TESSERA__TLS__KEY_FILE", format!("{dir}/{service}-key.pem"))
            .env("TESSERA__PEERS__PROFILE", "https://127.0.0.1:1")
            .env("TESSERA__PEERS__IDENTITY", "https://127.0.0.1:1")
            .env("TESSERA__PEERS__SCORING", "https://127.0.0.1:1")
            .env("TESSERA__PEERS__INGESTION", "https://127.0.0.1:1")
    };
    let d = Deployment::start_with(&db, &prefix, tls).await;
    assert!(d.identity.grpc_url().starts_with("https://"));

    // A track call over HTTP goes ingestion -> identity -> profile -> scoring, every hop over
    // mutual TLS, and is read back over TLS (the public API: no client certificate).
    let status = http_track(&d.ingestion.http_addr, &d.write_key, "mtls-user").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let read = d.profile.channel().await;
    let profile = wait_for(
        &read,
        "user_id",
        "mtls-user",
        Duration::from_secs(30),
        |p| p.event_count == 1 && p.scores.contains_key("engagement"),
    )
    .await;
    assert_eq!(profile.event_count, 1);

    // A TLS client that trusts the CA but has no certificate reaches identity's port, and is
    // refused by its internal service.
    let ca = std::fs::read(format!("{dir}/ca.pem")).unwrap();
    let anonymous = Channel::from_shared(d.identity.grpc_url())
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .unwrap()
        .connect()
        .await
        .expect("a TLS connection without a client certificate");
    let refused = resolve(anonymous).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("a client certificate is required"),
        "{refused:?}"
    );

    // A plaintext client gets no gRPC answer at all.
    let plaintext = Channel::from_shared(format!("http://{}", d.identity.grpc_addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Ok(channel) = plaintext.connect().await {
        let err = resolve(channel).await.unwrap_err();
        assert!(
            std::error::Error::source(&err).is_some(),
            "a gRPC answer to a plaintext client: {err:?}"
        );
    }
    let _ = &d.scoring;
}

/// Runs `tessera ARGS` with only `env`; returns its exit code and stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = std::process::Command::new(tessera_bin())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run tessera");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unusable_tls_settings_exit_with_a_message_naming_the_setting() {
    let db = ("DATABASE_URL", "postgres://127.0.0.1:1/x");
    let (code, err) = run(
        &["identity"],
        &[db, ("TESSERA__TLS__CA_FILE", "/etc/tessera/tls/ca.pem")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("(missing: tls.cert_file, tls.key_file)"),
        "{err}"
    );

    let (code, err) = run(&["identity", "--grpc-addr", "0.0.0.0:0"], &[db]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is not loopback and TLS is off") && err.contains("tls.allow_plaintext"),
        "{err}"
    );

    // A certificate of another CA than tls.ca_file.
    let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [&ours, &theirs] {
        let (code, err) = run(&["dev-certs", "--out", dir.path().to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{err}");
    }
    let file =
        |dir: &tempfile::TempDir, name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (ca, cert, key) = (
        file(&ours, "ca.pem"),
        file(&theirs, "identity.pem"),
        file(&theirs, "identity-key.pem"),
    );
    let (code, err) = run(
        &["identity"],
        &[
            db,
            ("TESSERA__TLS__CA_FILE", &ca),
            ("TESSERA__TLS__CERT_FILE", &cert),
            ("TESSERA__TLS__KEY_FILE", &key),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("tls.cert_file: ") && err.contains("not a valid client certificate of the CA"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `tessera dev-certs` into a new directory: a CA of its own and a certificate per service.
async fn dev_certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run(&["dev-certs", "--out", dir.path().to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    dir
}

/// Lays `ca.pem`, `cert.pem` and `key.pem` from `certs` (its CA and the ingestion service's
/// certificate) into `secret` as the kubelet updates a mounted Secret: a new directory, and the
/// `..data` symlink swapped to it in one rename (the three files link through it).
fn mount(secret: &std::path::Path, version: &str, certs: &std::path::Path) {
    let dir = secret.join(version);
    std::fs::create_dir(&dir).unwrap();
    for (to, from) in [
        ("ca.pem", "ca.pem"),
        ("cert.pem", "ingestion.pem"),
        ("key.pem", "ingestion-key.pem"),
    ] {
        std::fs::copy(certs.join(from), dir.join(to)).unwrap();
        let link = secret.join(to);
        if !link.exists() {
            std::os::unix::fs::symlink(format!("..data/{to}"), link).unwrap();
        }
    }
    let tmp = secret.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, secret.join("..data")).unwrap();
}

/// A TLS connection to `url` that trusts only the CA in `ca` (PEM file); fails when the
/// server's certificate is not that CA's.
async fn trusting(url: &str, ca: &std::path::Path) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap())),
        )
        .unwrap()
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_and_ca_rotated_on_disk_are_taken_up_without_a_restart() {
    let (old, new) = (dev_certs().await, dev_certs().await);
    let secret = tempfile::tempdir().unwrap();
    mount(secret.path(), "..v1", old.path());
    let file = |name: &str| secret.path().join(name).to_str().unwrap().to_owned();
    let data = tempfile::tempdir().unwrap();
    // tessera dev over mutual TLS: its four services call each other through its own port.
    let dev = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .env("TESSERA__TLS__CA_FILE", file("ca.pem"))
        .env("TESSERA__TLS__CERT_FILE", file("cert.pem"))
        .env("TESSERA__TLS__KEY_FILE", file("key.pem"))
        .env("TESSERA__TLS__RELOAD_INTERVAL_SECS", "1")
        .start()
        .await;
    let url = dev.grpc_url();
    assert!(url.starts_with("https://"), "{url}");
    let status = http_track(&dev.http_addr, dev.dev_write_key(), "before-rotation").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    wait_for(
        &dev.channel().await,
        "user_id",
        "before-rotation",
        Duration::from_secs(30),
        |p| p.event_count == 1,
    )
    .await;
    assert!(trusting(&url, &old.path().join("ca.pem")).await.is_ok());

    // The Secret is updated to another CA and certificate: within a few reload intervals new
    // connections see the new certificate, with no restart.
    mount(secret.path(), "..v2", new.path());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while trusting(&url, &new.path().join("ca.pem")).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate is not served 20 s after the rotation"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(trusting(&url, &old.path().join("ca.pem")).await.is_err());

    // The pipeline goes on: services reach each other over the new certificates (new
    // connections) and the ones opened before (open connections keep theirs).
    let status = http_track(&dev.http_addr, dev.dev_write_key(), "after-rotation").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    wait_for(
        &dev.channel().await,
        "user_id",
        "after-rotation",
        Duration::from_secs(30),
        |p| p.event_count == 1,
    )
    .await;
    let metrics = scrape(&dev.http_addr).await;
    assert!(
        metrics.contains("tessera_tls_reloads_total{outcome=\"applied\"} 1")
            && metrics.contains("tessera_tls_reloads_total{outcome=\"rejected\"} 0"),
        "{metrics}"
    );
}

/// `/metrics` of the process at `http_addr`.
async fn scrape(http_addr: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: {http_addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}
