//! A dependency that goes away: callers get UNAVAILABLE, nothing is acknowledged that is not
//! durable, and service resumes by itself.

use std::net::SocketAddr;
use std::time::Duration;

use tessera_testkit::TestDb;
use tessera_tests::events::{send, track};
use tessera_tests::{Proxy, TesseraBuilder};

fn host_port(url: &str) -> (String, SocketAddr) {
    // postgres://user@host:port/db
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let after_user = after_scheme
        .rsplit_once('@')
        .map_or(after_scheme, |(_, rest)| rest);
    let host_port = after_user.split('/').next().unwrap_or(after_user);
    let with_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&with_port)
        .expect("resolve the test database host")
        .next()
        .expect("an address");
    (host_port.to_owned(), addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_postgres_gives_unavailable_and_recovers() {
    let db = TestDb::new().await;
    let (host_port, target) = host_port(db.url());
    let proxy = Proxy::start(target).await;
    let url = db.url().replacen(&host_port, &proxy.addr().to_string(), 1);
    let ingestion = TesseraBuilder::new("ingestion")
        .env("DATABASE_URL", url)
        .env("TESSERA__DB__ACQUIRE_TIMEOUT_MS", "1000")
        .start()
        .await;
    let channel = ingestion.channel().await;
    let key = ingestion.create_source("faults").await;
    send(
        &channel,
        &key,
        vec![track("f-1", "u1", "", "Before", serde_json::json!({}))],
    )
    .await
    .expect("accepted while the database is up");

    proxy.cut();
    let err = send(
        &channel,
        &key,
        vec![track("f-2", "u1", "", "During", serde_json::json!({}))],
    )
    .await
    .expect_err("nothing is acknowledged while the event log is unreachable");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        !err.message().contains("postgres"),
        "no internal detail leaks: {err:?}"
    );

    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match send(
            &channel,
            &key,
            vec![track("f-2", "u1", "", "During", serde_json::json!({}))],
        )
        .await
        {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("did not recover: {e:?}"),
        }
    }
}
