//! Delivery survives peers going away and the ingestion process being killed: every
//! acknowledged event reaches its profile exactly once.

use std::net::SocketAddr;
use std::time::Duration;

use tessera_testkit::{TestDb, redis_prefix};
use tessera_tests::Proxy;
use tessera_tests::events::{send, track, wait_for};

use crate::separate_processes::base;

fn addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .parse()
        .expect("socket address")
}

#[tokio::test(flavor = "multi_thread")]
async fn delivery_resumes_after_an_unreachable_peer_and_a_killed_ingestion() {
    let db = TestDb::new().await;
    let prefix = redis_prefix();
    let (identity, scoring) = tokio::join!(
        base("identity", &db, &prefix).start(),
        base("scoring", &db, &prefix).start()
    );
    let profile = base("profile", &db, &prefix)
        .env("TESSERA__PEERS__IDENTITY", identity.grpc_url())
        .env("TESSERA__PEERS__SCORING", scoring.grpc_url())
        .start()
        .await;
    // Ingestion reaches the profile service through a proxy that can be cut.
    let to_profile = Proxy::start(addr(&profile.grpc_url())).await;
    let ingestion_builder = base("ingestion", &db, &prefix)
        .env("TESSERA__PEERS__IDENTITY", identity.grpc_url())
        .env(
            "TESSERA__PEERS__PROFILE",
            format!("http://{}", to_profile.addr()),
        )
        .env("TESSERA__INGESTION__LEASE_SECONDS", "2")
        .env("TESSERA__INGESTION__MAX_BACKOFF_MS", "200");
    let mut ingestion = ingestion_builder.clone().start().await;
    let read = profile.channel().await;
    let key = ingestion.create_source("restarts").await;

    // The profile service is unreachable: events are acknowledged (durable) but not delivered.
    to_profile.cut();
    let first: Vec<_> = (0..20)
        .map(|i| {
            track(
                &format!("r-{i}"),
                "restart-user",
                "",
                "Clicked",
                serde_json::json!({}),
            )
        })
        .collect();
    send(&ingestion.channel().await, &key, first)
        .await
        .expect("acknowledged while profile is down");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        tessera_tests::events::get_by(&read, "user_id", "restart-user")
            .await
            .is_err(),
        "nothing can have been delivered yet"
    );

    // Kill -9 the ingestion process with its backlog undelivered, and start a new one.
    ingestion.kill().await;
    to_profile.restore();
    let ingestion = ingestion_builder.start().await;
    let more: Vec<_> = (20..30)
        .map(|i| {
            track(
                &format!("r-{i}"),
                "restart-user",
                "",
                "Clicked",
                serde_json::json!({}),
            )
        })
        .collect();
    send(&ingestion.channel().await, &key, more)
        .await
        .expect("acknowledged");

    let p = wait_for(
        &read,
        "user_id",
        "restart-user",
        Duration::from_secs(60),
        |p| p.event_count >= 30,
    )
    .await;
    // Settled: nothing more arrives, nothing counted twice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = wait_for(
        &read,
        "user_id",
        "restart-user",
        Duration::from_secs(5),
        |_| true,
    )
    .await;
    assert_eq!(settled.event_count, 30, "{p:?}");
    let _ = (&identity, &scoring);
}
