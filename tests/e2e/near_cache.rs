//! The profile near cache across two profile replicas on one Postgres and one Redis: a write
//! applied through one replica reaches reads through the other, whose near cache held the old
//! profile, within a bound, and is never followed by an older answer.

use std::time::{Duration, Instant};

use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::profile::v1::{GetProfileRequest, Profile, get_profile_request};
use tessera_testkit::{TestDb, redis_prefix};
use tessera_tests::Channel;
use tessera_tests::events::{identify, send, track, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::separate_processes::{Deployment, base};

/// How long the other replica may answer the old profile after the writer answers the new one:
/// an invalidation's trip (milliseconds), or tracking declared lost (a heartbeat, about 2 s).
const STALENESS_BOUND: Duration = Duration::from_secs(3);
const ROUNDS: i64 = 6;

async fn by_id(channel: &Channel, id: &str) -> Profile {
    ProfileServiceClient::new(channel.clone())
        .get_profile(GetProfileRequest {
            lookup: Some(get_profile_request::Lookup::ProfileId(id.to_owned())),
            as_of: None,
            read_mask: None,
        })
        .await
        .expect("GetProfile")
        .into_inner()
        .profile
        .expect("a profile")
}

/// Polls GetProfile by id until the profile counts `events`, for at most `bound`; returns how
/// long that took.
async fn counts(channel: &Channel, id: &str, events: i64, bound: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let p = by_id(channel, id).await;
        if p.event_count == events {
            return start.elapsed();
        }
        assert!(p.event_count < events, "more events than sent: {p:?}");
        assert!(
            start.elapsed() < bound,
            "still {} events after {bound:?}, expected {events}",
            p.event_count
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The value of the counter `name` on the replica's `/metrics`, 0 when absent.
async fn counter(http_addr: &str, name: &str) -> f64 {
    let mut stream = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: {http_addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .lines()
        .filter(|line| line.split([' ', '{']).next() == Some(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_through_one_profile_replica_reaches_the_others_near_cache_within_a_bound() {
    let db = TestDb::new().await;
    let prefix = redis_prefix();
    // The pipeline writes through replica A (ingestion's profile peer); B only reads.
    let a = Deployment::start(&db, &prefix).await;
    let b = base("profile", &db, &prefix)
        .env("TESSERA__PEERS__IDENTITY", a.identity.grpc_url())
        .env("TESSERA__PEERS__SCORING", a.scoring.grpc_url())
        .start()
        .await;
    let ingest = a.ingestion.channel().await;
    let (via_a, via_b) = (a.profile.channel().await, b.channel().await);

    let user = "near-u1";
    send(
        &ingest,
        &a.write_key,
        vec![identify(
            "near-0",
            user,
            "near-anon",
            serde_json::json!({"plan": "free"}),
        )],
    )
    .await
    .expect("ingest");
    let id = wait_for(&via_a, "user_id", user, Duration::from_secs(30), |p| {
        p.event_count == 1
    })
    .await
    .profile_id;
    // B tracks once its first read started it; until then its reads bypass the near cache.
    counts(&via_b, &id, 1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let hits_before = counter(&b.http_addr, "tessera_profile_near_cache_hits_total").await;
    let mut lags = Vec::new();
    for round in 1..=ROUNDS {
        // B holds the current profile near.
        for _ in 0..3 {
            assert_eq!(by_id(&via_b, &id).await.event_count, round);
        }
        send(
            &ingest,
            &a.write_key,
            vec![track(
                &format!("near-{round}"),
                user,
                "",
                "Order Completed",
                serde_json::json!({"revenue": round}),
            )],
        )
        .await
        .expect("ingest");
        counts(&via_a, &id, round + 1, Duration::from_secs(30)).await;
        // From the moment the writer's replica answers the new profile, the other's staleness
        // ends within the bound...
        lags.push(counts(&via_b, &id, round + 1, STALENESS_BOUND).await);
        // ...and never comes back.
        for _ in 0..5 {
            assert_eq!(by_id(&via_b, &id).await.event_count, round + 1);
        }
    }
    let hits = counter(&b.http_addr, "tessera_profile_near_cache_hits_total").await - hits_before;
    let invalidations = counter(
        &b.http_addr,
        "tessera_profile_near_cache_invalidations_total",
    )
    .await;
    assert!(
        hits >= (ROUNDS * 3) as f64,
        "B answered repeated reads from its near cache: {hits} hits"
    );
    assert!(
        invalidations >= ROUNDS as f64,
        "{invalidations} invalidations"
    );
    eprintln!("other replica saw each write after {lags:?}");
}
