//! Two replicas of every service against one Postgres and one Redis give the same profiles as
//! one replica: events split across ingestion replicas, duplicates sent to both, reads through
//! both profile replicas.

use std::collections::BTreeSet;
use std::time::Duration;

use tessera_proto::common::v1::Event;
use tessera_proto::profile::v1::Profile;
use tessera_testkit::{TestDb, redis_prefix};
use tessera_tests::Channel;
use tessera_tests::events::{identify, send, track, trait_value, wait_for};

use crate::separate_processes::{Deployment, base};

const USERS: usize = 12;

/// Per user: an anonymous page view, an identify linking it, three purchases; the last
/// identify's plan wins.
fn workload(tag: &str) -> Vec<Event> {
    let mut events = Vec::new();
    for u in 0..USERS {
        let user = format!("{tag}-u{u}");
        let anon = format!("{tag}-a{u}");
        events.push(track(
            &format!("{user}-0"),
            "",
            &anon,
            "Product Viewed",
            serde_json::json!({}),
        ));
        events.push(identify(
            &format!("{user}-1"),
            &user,
            &anon,
            serde_json::json!({"email": format!("{user}@example.com"), "plan": format!("plan-{u}")}),
        ));
        for i in 2..5 {
            events.push(track(
                &format!("{user}-{i}"),
                &user,
                "",
                "Order Completed",
                serde_json::json!({"revenue": i}),
            ));
        }
    }
    events
}

/// What must be equal between deployments: the partition, counts, traits and identifiers.
fn essence(p: &Profile) -> (i64, Option<serde_json::Value>, BTreeSet<(String, String)>) {
    (
        p.event_count,
        trait_value(p, "plan"),
        p.identifiers
            .iter()
            .map(|i| (i.r#type.clone(), i.value.clone()))
            .collect(),
    )
}

async fn settle(
    read: &Channel,
    tag: &str,
) -> Vec<(i64, Option<serde_json::Value>, BTreeSet<(String, String)>)> {
    let mut out = Vec::new();
    for u in 0..USERS {
        let user = format!("{tag}-u{u}");
        let p = wait_for(read, "user_id", &user, Duration::from_secs(60), |p| {
            p.event_count >= 5
        })
        .await;
        let by_anon = wait_for(
            read,
            "anonymous_id",
            &format!("{tag}-a{u}"),
            Duration::from_secs(5),
            |_| true,
        )
        .await;
        assert_eq!(
            by_anon.profile_id, p.profile_id,
            "anonymous and user id are one profile"
        );
        out.push(essence(&p));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_of_every_service_give_the_same_profiles_as_one() {
    // One replica each.
    let single_db = TestDb::new().await;
    let single = Deployment::start(&single_db, &redis_prefix()).await;
    let ingest = single.ingestion.channel().await;
    send(&ingest, &single.write_key, workload("r"))
        .await
        .expect("ingest");
    let expected = settle(&single.profile.channel().await, "r").await;

    // Two replicas each, on one Postgres and one Redis prefix.
    let db = TestDb::new().await;
    let prefix = redis_prefix();
    let a = Deployment::start(&db, &prefix).await;
    let (i2, s2) = tokio::join!(
        base("identity", &db, &prefix).start(),
        base("scoring", &db, &prefix).start()
    );
    let p2 = base("profile", &db, &prefix)
        .env("TESSERA__PEERS__IDENTITY", i2.grpc_url())
        .env("TESSERA__PEERS__SCORING", s2.grpc_url())
        .start()
        .await;
    let g2 = base("ingestion", &db, &prefix)
        .env("TESSERA__PEERS__IDENTITY", i2.grpc_url())
        .env("TESSERA__PEERS__PROFILE", p2.grpc_url())
        .start()
        .await;
    let (ingest_a, ingest_b) = (a.ingestion.channel().await, g2.channel().await);
    let events = workload("r");
    let (even, odd): (Vec<_>, Vec<_>) = events
        .iter()
        .cloned()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    let even: Vec<Event> = even.into_iter().map(|(_, e)| e).collect();
    let odd: Vec<Event> = odd.into_iter().map(|(_, e)| e).collect();
    // One source for the deployment: a key created through one replica works on the other.
    let key = &a.write_key;
    let (ra, rb) = tokio::join!(
        send(&ingest_a, key, even.clone()),
        send(&ingest_b, key, odd)
    );
    ra.expect("ingest a");
    rb.expect("ingest b");
    // The same messages again through the other replica: deduplicated across replicas.
    send(&ingest_b, key, even).await.expect("ingest duplicates");

    let via_a = settle(&a.profile.channel().await, "r").await;
    let via_b = settle(&p2.channel().await, "r").await;
    assert_eq!(via_a, expected);
    assert_eq!(via_b, expected);
    for (count, _, _) in &via_a {
        assert_eq!(*count, 5, "every event counted exactly once");
    }
    let _ = (
        &s2,
        &single.scoring,
        &single.identity,
        &a.scoring,
        &a.identity,
    );
}
