//! Mutual TLS between the four services as separate processes, with certificates from
//! `tessera dev-certs`: the pipeline runs over it, and a client without a valid certificate is
//! refused.

use std::time::Duration;

use base64::Engine as _;
use tessera_proto::identity::v1::ResolveIdentitiesRequest;
use tessera_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tessera_testkit::{TestDb, redis_prefix};
use tessera_tests::events::wait_for;
use tessera_tests::tessera_bin;
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
