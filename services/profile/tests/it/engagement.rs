//! Engagement by event type end to end: the profile service keeps a decayed activity per
//! declared event type (`engagement_events`) and the real scoring service weighs each with its
//! own half-life and weight, explaining each part.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tessera_profile::{MIGRATIONS, Peers, ProfileSettings, Profiles, SCHEMA};
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::get_profile_request::Lookup;
use tessera_proto::profile::v1::profile_pipeline_service_client::ProfilePipelineServiceClient;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::scoring::v1::Score;
use tessera_scoring::{Scoring, ScoringSettings};
use tessera_server::GrpcServices;
use tessera_store::{Database, DbSettings, MemoryCache};
use tessera_testkit::TestDb;
use time::OffsetDateTime;

use crate::service::events;
use crate::support::{IdentityDouble, Served, identify, track};

const DAY: f64 = 86_400.0;

fn days_ago(days: i64) -> OffsetDateTime {
    (OffsetDateTime::now_utc() - time::Duration::days(days))
        .replace_nanosecond(0)
        .unwrap()
}

/// The factor `name` of `score`.
fn factor(score: &Score, name: &str) -> f64 {
    score
        .factors
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no factor {name}: {:?}", score.factors))
        .value
}

#[tokio::test]
async fn each_event_type_decays_at_its_own_pace_and_weighs_its_own_weight() {
    let db = TestDb::new().await;
    let mut services = GrpcServices::default();
    Scoring::from_settings(&ScoringSettings::default())
        .unwrap()
        .register(&mut services);
    let scoring = Served::start(services).await;
    let identity = IdentityDouble::default().serve().await;
    let database = Database::connect(db.url(), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    database.migrate(MIGRATIONS).await.unwrap();
    // Orders count five times a visit and fade over 60 days; everything else over 7.
    let settings: ProfileSettings = serde_json::from_value(json!({
        "activity_half_life_seconds": 7.0 * DAY,
        "engagement_events": [
            {"event": "Order Completed", "half_life_seconds": 60.0 * DAY, "weight": 5.0},
        ],
    }))
    .unwrap();
    settings.validate().unwrap();
    let profiles = Profiles::new(
        database,
        Arc::new(MemoryCache::new(1_000, Duration::from_secs(60))),
        Peers {
            identity: identity.lazy_channel(),
            scoring: scoring.lazy_channel(),
            ingestion: identity.lazy_channel(),
        },
        settings,
    );
    let mut services = GrpcServices::default();
    profiles.register(&mut services);
    let served = Served::start(services).await;

    // A buyer whose one order was 30 days ago; a visitor seen once 30 days ago; a buyer who
    // also visited (two profiles merged later would add up the same way: see the unit tests).
    let list = vec![
        track("e1", "buyer", "u1", days_ago(30)),
        identify("e2", "visitor", "u2", days_ago(30), json!({})),
        track("e3", "both", "u3", days_ago(30)),
        identify("e4", "both", "u3", days_ago(30), json!({})),
    ];
    ProfilePipelineServiceClient::new(served.lazy_channel())
        .apply_events(events(list))
        .await
        .unwrap();
    let engagement = |id: &'static str| {
        let channel = served.lazy_channel();
        async move {
            ProfileServiceClient::new(channel)
                .get_profile(pb::GetProfileRequest {
                    lookup: Some(Lookup::ProfileId(id.to_owned())),
                    as_of: None,
                    read_mask: None,
                })
                .await
                .unwrap()
                .into_inner()
                .profile
                .unwrap()
                .scores["engagement"]
                .clone()
        }
    };
    let (buyer, visitor, both) = (
        engagement("buyer").await,
        engagement("visitor").await,
        engagement("both").await,
    );
    let order = factor(&buyer, "activity:Order Completed");
    assert!((order - 5.0 * 0.5_f64.powf(0.5)).abs() < 0.01, "{order}");
    let visit = factor(&visitor, "activity:*");
    assert!((visit - 0.5_f64.powf(30.0 / 7.0)).abs() < 0.001, "{visit}");
    assert!(
        (factor(&both, "decayed_activity") - (order + visit)).abs() < 0.01,
        "{:?}",
        both.factors
    );
    assert!(
        buyer.value > 50.0 && visitor.value < 2.0,
        "{buyer:?} {visitor:?}"
    );
    assert!(both.value > buyer.value);
}
