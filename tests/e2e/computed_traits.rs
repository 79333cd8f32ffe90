//! Computed traits and audiences end to end in `tessera dev`: declared in the config file, kept
//! up to date as events arrive, read through GetProfile, the audience RPCs and the Profile API;
//! a windowed trait and an event condition expire on time without a new event (also when the
//! profile was cached, and in the stored memberships through the sweeper).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tessera_proto::convert::{from_timestamp, value_to_json};
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::profile::v1::{ListAudienceMembersRequest, ListAudiencesRequest, Profile};
use tessera_tests::TesseraBuilder;
use tessera_tests::events::{get_by, send, track, wait_for};
use tessera_tests::http::get;

const WAIT: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[[profile.computed_traits]]
name = "orders"
kind = "count"
events = ["Order Completed"]

[[profile.computed_traits]]
name = "spent"
kind = "sum"
events = ["Order Completed"]
property = "total"

[[profile.computed_traits]]
name = "orders_last_hour"
kind = "count"
events = ["Order Completed"]
window_seconds = 3600

[[profile.audiences]]
name = "recent_buyers"
condition = { performed = { event = "Order Completed", at_least = 2, within_seconds = 3600 } }

[[profile.audiences]]
name = "spenders"
condition = { all = [
  { computed = { name = "spent", op = "gte", value = 50 } },
  { not = { trait = { name = "plan", op = "eq", value = "free" } } },
] }
"#;

fn computed(profile: &Profile, name: &str) -> serde_json::Value {
    profile
        .computed_traits
        .get(name)
        .and_then(|t| t.value.as_ref())
        .map_or(serde_json::Value::Null, value_to_json)
}

#[tokio::test(flavor = "multi_thread")]
async fn computed_traits_are_kept_live_and_windowed_ones_expire_on_time() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("tessera.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args([
            "--data-dir",
            data.path().to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ])
        .start()
        .await;
    let channel = tessera.channel().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let now = i64::try_from(now).unwrap();
    let at = |mut event: tessera_proto::common::v1::Event, seconds: i64| {
        event.timestamp = Some(prost_types::Timestamp { seconds, nanos: 0 });
        event
    };
    // One order that leaves the last hour in about 4 seconds, one just now, one view.
    send(
        &channel,
        tessera.dev_write_key(),
        vec![
            at(
                track("m1", "u1", "", "Order Completed", json!({"total": 20})),
                now - 3_596,
            ),
            at(
                track("m2", "u1", "", "Order Completed", json!({"total": 30.5})),
                now,
            ),
            at(
                track("m3", "u1", "", "Product Viewed", json!({"total": 99})),
                now,
            ),
        ],
    )
    .await
    .expect("send");
    let profile = wait_for(&channel, "user_id", "u1", WAIT, |p| p.event_count == 3).await;
    assert_eq!(computed(&profile, "orders"), json!(2));
    assert_eq!(computed(&profile, "spent"), json!(50.5));
    assert_eq!(computed(&profile, "orders_last_hour"), json!(2));
    let until = profile
        .computed_valid_until
        .as_ref()
        .and_then(from_timestamp)
        .expect("a windowed trait will change");
    assert_eq!(until.unix_timestamp(), now + 4, "m1 leaves the hour then");
    assert_eq!(profile.audiences, ["recent_buyers", "spenders"]);
    let profiles = ProfileServiceClient::new(channel.clone());
    let members = |audience: &str| {
        let mut profiles = profiles.clone();
        let audience = audience.to_owned();
        async move {
            profiles
                .list_audience_members(ListAudienceMembersRequest {
                    audience,
                    ..Default::default()
                })
                .await
                .expect("members")
                .into_inner()
        }
    };
    let recent = members("recent_buyers").await;
    assert_eq!(
        recent.profile_ids,
        std::slice::from_ref(&profile.profile_id)
    );
    assert_eq!(recent.member_count, 1);

    // Read again (from the cache) until the window moves past m1: no new event needed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let expired = loop {
        let profile = get_by(&channel, "user_id", "u1").await.expect("profile");
        if computed(&profile, "orders_last_hour") == json!(1) {
            break profile;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the windowed count never fell: {profile:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        time::OffsetDateTime::now_utc() >= until,
        "it fell when m1 left the window, not before"
    );
    assert_eq!(
        computed(&expired, "orders"),
        json!(2),
        "the unwindowed count stays"
    );
    assert!(
        expired.computed_valid_until.is_some(),
        "m2 leaves in an hour"
    );
    assert_eq!(
        expired.audiences,
        ["spenders"],
        "out of recent_buyers on time"
    );

    // The sweeper brings the stored membership along without a new event.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while members("recent_buyers").await.member_count != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweeper never ran"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(members("spenders").await.member_count, 1);
    let listed = profiles
        .clone()
        .list_audiences(ListAudiencesRequest {})
        .await
        .expect("audiences")
        .into_inner();
    let counts: Vec<(&str, i64)> = listed
        .audiences
        .iter()
        .map(|a| (a.name.as_str(), a.member_count))
        .collect();
    assert_eq!(counts, [("recent_buyers", 0), ("spenders", 1)]);
    let unknown = profiles
        .clone()
        .list_audience_members(ListAudienceMembersRequest {
            audience: "nobody".into(),
            ..Default::default()
        })
        .await
        .expect_err("not declared");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // The Profile API lists computed traits with the others, or alone.
    let token = tessera.access_token.clone().expect("token");
    let path = "/v1/spaces/default/collections/users/profiles/user_id:u1/traits";
    let (status, _, body) = get(
        &tessera.http_addr,
        &format!("{path}?class=computed_trait"),
        Some(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["traits"],
        json!({"orders": 2, "orders_last_hour": 1, "spent": 50.5})
    );
    let (status, _, body) = get(
        &tessera.http_addr,
        &format!("{path}?class=audience"),
        Some(&token),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}
