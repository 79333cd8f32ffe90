//! Outcomes by event time, not arrival order, end to end in `tessera dev`: Ann identified on
//! the living-room TV at 10:00 and Bob at 09:00, and Bob's event arrives last. Identity
//! re-resolves the TV's closure in event-time order (Bob's is the earlier claim, and a profile
//! holds one user id) and queues the split; the profile service rebuilds both profiles, so the
//! TV ends on Bob's profile whichever event arrived first.

use std::time::Duration;

use serde_json::json;
use tessera_proto::convert::to_timestamp;
use tessera_tests::TesseraBuilder;
use tessera_tests::events::{get_by, has_identifier, identify, send, trait_value, wait_for};
use time::OffsetDateTime;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn a_late_earlier_claim_on_a_shared_device_moves_it_in_the_profile_service() {
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();
    let ten = OffsetDateTime::now_utc() - time::Duration::hours(2);

    // Ann at 10:00 arrives first: the TV is hers.
    let mut ann = identify("ann-10", "ann", "tv", json!({"name": "Ann"}));
    ann.original_timestamp = Some(to_timestamp(ten));
    send(&channel, &key, vec![ann]).await.expect("send");
    let first = wait_for(&channel, "anonymous_id", "tv", WAIT, |p| {
        has_identifier(p, "user_id", "ann")
    })
    .await;

    // Bob at 09:00 arrives later. In arrival order his event would drop the TV (Ann's profile
    // already holds a user id); by event time it is his.
    let mut bob = identify("bob-09", "bob", "tv", json!({"name": "Bob"}));
    bob.original_timestamp = Some(to_timestamp(ten - time::Duration::hours(1)));
    send(&channel, &key, vec![bob]).await.expect("send");
    let tv = wait_for(&channel, "anonymous_id", "tv", WAIT, |p| {
        has_identifier(p, "user_id", "bob")
    })
    .await;
    assert_ne!(
        tv.profile_id, first.profile_id,
        "the TV moved to Bob's profile"
    );
    assert_eq!(trait_value(&tv, "name"), Some(json!("Bob")));
    assert_eq!(tv.event_count, 1);
    assert!(!has_identifier(&tv, "user_id", "ann"));

    // Ann keeps her profile and her event, without the TV.
    let ann = wait_for(&channel, "user_id", "ann", WAIT, |p| {
        !has_identifier(p, "anonymous_id", "tv")
    })
    .await;
    assert_eq!(ann.profile_id, first.profile_id);
    assert_eq!(ann.event_count, 1);
    assert_eq!(trait_value(&ann, "name"), Some(json!("Ann")));
    let bob = get_by(&channel, "user_id", "bob").await.expect("bob");
    assert_eq!(bob.profile_id, tv.profile_id);
}
