//! The skeleton flow every deployment shape must pass.

use std::time::Duration;

use tessera_proto::ingestion::v1::EventStatus;
use tessera_tests::Channel;
use tessera_tests::events::{has_identifier, identify, send, track, trait_value, wait_for};

const ACCEPTED: i32 = EventStatus::Accepted as i32;
const DUPLICATE: i32 = EventStatus::Duplicate as i32;

/// An anonymous visit, an identify that links the anonymous id to a user, and a purchase by the
/// user: one profile with three events, traits, identifiers and an engagement score. Sending the
/// same batch again changes nothing. Events are sent with the source's `write_key`.
pub(crate) async fn skeleton_flow(ingest: &Channel, write_key: &str, read: &Channel, tag: &str) {
    let user = format!("user-{tag}");
    let anon = format!("anon-{tag}");
    let batch = vec![
        track(
            &format!("{tag}-m1"),
            "",
            &anon,
            "Product Viewed",
            serde_json::json!({"product_id": "p1"}),
        ),
        identify(
            &format!("{tag}-m2"),
            &user,
            &anon,
            serde_json::json!({"name": "Ada Lovelace", "email": " Ada@Example.COM ", "plan": "pro"}),
        ),
        track(
            &format!("{tag}-m3"),
            &user,
            "",
            "Order Completed",
            serde_json::json!({"revenue": 42}),
        ),
    ];
    let statuses = send(ingest, write_key, batch.clone())
        .await
        .expect("ingest");
    assert_eq!(statuses, vec![ACCEPTED; 3]);

    let profile = wait_for(read, "user_id", &user, Duration::from_secs(30), |p| {
        p.event_count == 3 && p.scores.contains_key("engagement")
    })
    .await;
    assert_eq!(
        trait_value(&profile, "plan"),
        Some(serde_json::json!("pro"))
    );
    assert_eq!(
        trait_value(&profile, "name"),
        Some(serde_json::json!("Ada Lovelace"))
    );
    assert!(has_identifier(&profile, "user_id", &user), "{profile:?}");
    assert!(
        has_identifier(&profile, "anonymous_id", &anon),
        "{profile:?}"
    );
    assert!(
        has_identifier(&profile, "email", "ada@example.com"),
        "{profile:?}"
    );
    let first = profile.first_seen.expect("first_seen");
    let last = profile.last_seen.expect("last_seen");
    assert!((first.seconds, first.nanos) <= (last.seconds, last.nanos));
    let engagement = &profile.scores["engagement"];
    assert!(
        engagement.value > 0.0 && engagement.value <= 100.0,
        "{engagement:?}"
    );
    assert!(!engagement.factors.is_empty(), "the score is explained");

    // The anonymous id and the email resolve to the same profile.
    let by_anon = wait_for(read, "anonymous_id", &anon, Duration::from_secs(5), |_| {
        true
    })
    .await;
    assert_eq!(by_anon.profile_id, profile.profile_id);
    let by_email = wait_for(
        read,
        "email",
        "ADA@example.com",
        Duration::from_secs(5),
        |_| true,
    )
    .await;
    assert_eq!(by_email.profile_id, profile.profile_id);

    // The same batch again: acknowledged as duplicates, counted once.
    let statuses = send(ingest, write_key, batch).await.expect("ingest again");
    assert_eq!(statuses, vec![DUPLICATE; 3]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = wait_for(read, "user_id", &user, Duration::from_secs(5), |_| true).await;
    assert_eq!(again.event_count, 3);
}
