//! Scoped access tokens through the real binary: each scope allows what it names and nothing
//! else, over gRPC and the Profile API's HTTP; rotation and revocation reach the running
//! process; admin and privacy calls land in the audit log.

use std::path::Path;
use std::time::Duration;

use tessera_proto::ingestion::v1::ListSourcesRequest;
use tessera_proto::ingestion::v1::source_service_client::SourceServiceClient;
use tessera_proto::profile::v1::definition_service_client::DefinitionServiceClient;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::profile::v1::{
    DeleteComputedTraitRequest, ExportProfileRequest, GetProfileRequest, ListComputedTraitsRequest,
};
use tessera_tests::auth::with_token;
use tessera_tests::{Tessera, TesseraBuilder, tessera_bin};
use tonic::Code;

const SCOPES: [&str; 4] = ["profiles:read", "profiles:write", "admin", "privacy"];

/// Runs `tessera ARGS --database-url DB` to its end.
async fn tessera_db(db: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(tessera_bin())
        .args(args)
        .args(["--database-url", db])
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run tessera")
}

/// The secret in the output of `tessera tokens create|rotate`.
fn secret_in(out: &std::process::Output, name: &str) -> String {
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("tessera: access token {name}: ");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("no secret for {name} in {stdout}"))
}

/// The code of one gRPC call per scope, made with `token`.
async fn grpc_calls(tessera: &Tessera, token: Option<&str>) -> Vec<(&'static str, Code)> {
    let channel = with_token(tessera.raw_channel().await, token);
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    let mut profiles = ProfileServiceClient::new(channel.clone());
    let mut definitions = DefinitionServiceClient::new(channel.clone());
    let mut sources = SourceServiceClient::new(channel);
    vec![
        (
            "profiles:read",
            code(
                profiles
                    .get_profile(GetProfileRequest::default())
                    .await
                    .map(drop),
            ),
        ),
        (
            "profiles:read",
            code(
                definitions
                    .list_computed_traits(ListComputedTraitsRequest::default())
                    .await
                    .map(drop),
            ),
        ),
        (
            "profiles:write",
            code(
                definitions
                    .delete_computed_trait(DeleteComputedTraitRequest {
                        name: "no_such_trait".to_owned(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
        ),
        (
            "admin",
            code(
                sources
                    .list_sources(ListSourcesRequest::default())
                    .await
                    .map(drop),
            ),
        ),
        (
            "privacy",
            code(
                profiles
                    .export_profile(ExportProfileRequest::default())
                    .await
                    .map(drop),
            ),
        ),
    ]
}

/// The HTTP status of a Profile API read with `token` as a bearer token.
async fn http_read(tessera: &Tessera, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET /v1/spaces/default/collections/users/profiles/user_id:nobody/traits HTTP/1.1\r\n\
         Host: {}\r\n{auth}Connection: close\r\n\r\n",
        tessera.http_addr
    );
    let mut stream = tokio::net::TcpStream::connect(&tessera.http_addr)
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The body of a plain HTTP GET.
async fn plain_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

fn allowed(code: Code) -> bool {
    !matches!(code, Code::PermissionDenied | Code::Unauthenticated)
}

fn auth_db(data: &Path) -> String {
    format!("sqlite://{}", data.join("auth.db").display())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_scope_allows_what_it_names_and_nothing_else() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("tessera.log");
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().join("db").to_str().unwrap()])
        .env("TESSERA__AUTH__TOKEN_CACHE_MS", "300")
        .stderr_to(&log)
        .start()
        .await;
    let db = auth_db(&data.path().join("db"));

    let mut tokens = Vec::new();
    for scope in SCOPES {
        let name = format!("only-{}", scope.replace(':', "-"));
        let out = tessera_db(
            &db,
            &["tokens", "create", "--name", &name, "--scope", scope],
        )
        .await;
        tokens.push((scope, name.clone(), secret_in(&out, &name)));
    }

    for (scope, name, secret) in &tokens {
        for (needed, code) in grpc_calls(&tessera, Some(secret)).await {
            if needed == *scope {
                assert!(allowed(code), "{name} calling a {needed} method: {code:?}");
            } else {
                assert_eq!(
                    code,
                    Code::PermissionDenied,
                    "{name} calling a {needed} method"
                );
            }
        }
        let (status, body) = http_read(&tessera, Some(secret)).await;
        if *scope == "profiles:read" {
            assert_eq!(status, 404, "{name} on the Profile API: {body}");
        } else {
            assert_eq!(status, 403, "{name} on the Profile API: {body}");
            assert!(body.contains("`profiles:read`"), "{body}");
        }
    }
    for (needed, code) in grpc_calls(&tessera, None).await {
        assert_eq!(
            code,
            Code::Unauthenticated,
            "no token calling a {needed} method"
        );
    }
    for (needed, code) in grpc_calls(&tessera, Some("tat_not-a-token")).await {
        assert_eq!(
            code,
            Code::Unauthenticated,
            "an unknown token calling {needed}"
        );
    }
    let (status, body) = http_read(&tessera, None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"unauthorized\""), "{body}");
    // Refused calls are the caller's doing: nothing at ERROR for them.
    let written = std::fs::read_to_string(&log).unwrap();
    let errors: Vec<&str> = written.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "refusals logged as errors: {errors:#?}");
    // The printed dev token has every scope.
    let dev = tessera
        .access_token
        .clone()
        .expect("tessera dev prints its token");
    for (needed, code) in grpc_calls(&tessera, Some(&dev)).await {
        assert!(allowed(code), "the dev token calling {needed}: {code:?}");
    }

    // Refusals are counted by scope and reason.
    let metrics = plain_get(&tessera.http_addr, "/metrics").await;
    for reason in ["missing", "unknown", "scope"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("tessera_access_denied_total{")
                    && l.contains(&format!("reason=\"{reason}\""))),
            "no {reason} refusals in /metrics"
        );
    }

    // A handler names what the call acted on: the audit record's target.
    let admin = &tokens[2].2;
    SourceServiceClient::new(with_token(tessera.raw_channel().await, Some(admin)))
        .create_source(tessera_proto::ingestion::v1::CreateSourceRequest {
            name: "audited".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Rotation: the old secret stops working, the new one works.
    let (_, reader, old) = tokens[0].clone();
    let new = secret_in(
        &tessera_db(&db, &["tokens", "rotate", &reader]).await,
        &reader,
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(http_read(&tessera, Some(&old)).await.0, 401);
    assert_eq!(http_read(&tessera, Some(&new)).await.0, 404);
    // Revocation: the token stops working.
    let out = tessera_db(&db, &["tokens", "revoke", &reader]).await;
    assert!(out.status.success(), "{out:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(http_read(&tessera, Some(&new)).await.0, 401);
    let listed = tessera_db(&db, &["tokens", "list"]).await;
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&reader) && l.contains("revoked")),
        "{listed}"
    );
    assert!(
        !listed.contains(&new) && !listed.contains(&old),
        "no secrets listed"
    );

    // The audit log: admin and privacy calls, allowed and refused, by token name.
    let out = tessera_db(&db, &["audit", "list", "--limit", "200"]).await;
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    // Fields: time, token, action, target, outcome, request id.
    let has = |token: &str, action: &str, outcome: &str| {
        log.lines().any(|l| {
            let fields: Vec<&str> = l.split('\t').collect();
            fields.get(1) == Some(&token)
                && fields.get(2).is_some_and(|a| a.ends_with(action))
                && fields.get(4) == Some(&outcome)
                && fields.get(5).is_some_and(|id| !id.is_empty())
        })
    };
    assert!(
        has("only-admin", "SourceService/ListSources", "Ok"),
        "{log}"
    );
    assert!(
        has(
            "only-privacy",
            "ProfileService/ExportProfile",
            "InvalidArgument"
        ),
        "{log}"
    );
    assert!(
        has(
            "only-profiles-read",
            "SourceService/ListSources",
            "PermissionDenied"
        ),
        "{log}"
    );
    assert!(has("dev", "SourceService/ListSources", "Ok"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("SourceService/CreateSource\tsource audited\tOk")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains(
            "only-profiles-write\t/tessera.profile.v1.DefinitionService/DeleteComputedTrait\t\
             computed_trait no_such_trait\t"
        )),
        "{log}"
    );
    assert!(!log.contains("GetProfile"), "reads are not audited: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_token_commands_name_the_problem() {
    let data = tempfile::tempdir().unwrap();
    let db = auth_db(data.path());
    let out = tessera_db(
        &db,
        &["tokens", "create", "--name", "x", "--scope", "profiles"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown scope \"profiles\""), "{stderr}");
    let out = tessera_db(
        &db,
        &["tokens", "create", "--name", "x", "--scope", "admin"],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let out = tessera_db(
        &db,
        &["tokens", "create", "--name", "x", "--scope", "admin"],
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("a token named \"x\" exists"), "{stderr}");
    let out = tessera_db(&db, &["tokens", "revoke", "nobody"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no token named \"nobody\""), "{stderr}");
}

/// Production shape: separate services on Postgres, two profile replicas. Tokens made with the
/// CLI against Postgres work on every service and replica, a revocation reaches them all, and
/// the audit log gathers the calls of both services.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_on_postgres_reach_every_service_and_replica() {
    use crate::separate_processes::{Deployment, base};
    let db = tessera_testkit::TestDb::new().await;
    let prefix = tessera_testkit::redis_prefix();
    let cache = |b: TesseraBuilder| b.env("TESSERA__AUTH__TOKEN_CACHE_MS", "300");
    let d = Deployment::start_with(&db, &prefix, cache).await;
    let second = cache(base("profile", &db, &prefix))
        .env("TESSERA__PEERS__IDENTITY", d.identity.grpc_url())
        .env("TESSERA__PEERS__SCORING", d.scoring.grpc_url())
        .env("TESSERA__PEERS__INGESTION", d.ingestion.grpc_url())
        .start()
        .await;

    let mut secrets = Vec::new();
    for (name, scope) in [("pg-reader", "profiles:read"), ("pg-admin", "admin")] {
        let out = tessera_db(
            db.url(),
            &["tokens", "create", "--name", name, "--scope", scope],
        )
        .await;
        secrets.push(secret_in(&out, name));
    }
    let (reader, admin) = (&secrets[0], &secrets[1]);
    let list_sources = |tessera: &Tessera, token: &str| {
        let token = token.to_owned();
        let url = tessera.grpc_url();
        async move {
            let channel = tonic::transport::Channel::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            SourceServiceClient::new(with_token(channel, Some(&token)))
                .list_sources(ListSourcesRequest::default())
                .await
                .map(drop)
                .err()
                .map_or(Code::Ok, |s| s.code())
        }
    };
    for replica in [&d.profile, &second] {
        assert_eq!(http_read(replica, Some(reader)).await.0, 404);
        assert_eq!(http_read(replica, Some(admin)).await.0, 403);
    }
    assert_eq!(list_sources(&d.ingestion, admin).await, Code::Ok);
    assert_eq!(
        list_sources(&d.ingestion, reader).await,
        Code::PermissionDenied
    );
    let privacy = grpc_calls(&second, Some(admin)).await;
    assert!(
        privacy
            .iter()
            .all(|(needed, code)| (*needed == "admin") == allowed(*code)),
        "{privacy:?}"
    );

    let out = tessera_db(db.url(), &["tokens", "revoke", "pg-reader"]).await;
    assert!(out.status.success(), "{out:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    for replica in [&d.profile, &second] {
        assert_eq!(http_read(replica, Some(reader)).await.0, 401);
    }

    let out = tessera_db(db.url(), &["audit", "list"]).await;
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        log.contains("pg-admin\t/tessera.ingestion.v1.SourceService/ListSources"),
        "{log}"
    );
    assert!(
        log.contains(
            "pg-admin\t/tessera.profile.v1.ProfileService/ExportProfile\t-\tPermissionDenied"
        ),
        "{log}"
    );
}
