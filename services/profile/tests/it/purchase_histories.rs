//! `ProfilePipelineService.StreamPurchaseHistories` on both store backends: every live profile
//! with purchases, by day, in id order and in pages; merged-away and deleted profiles left out;
//! purchases after `as_of` not counted; resumable after a profile id.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tessera_profile::{MIGRATIONS, Peers, ProfileSettings, Profiles, SCHEMA, store};
use tessera_proto::convert::{json_map_to_struct, to_timestamp};
use tessera_proto::identity::v1 as identity;
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::profile_pipeline_service_client::ProfilePipelineServiceClient;
use tessera_proto::scoring::v1 as scoring;
use tessera_server::GrpcServices;
use tessera_store::{Database, DbSettings, MemoryCache};
use time::OffsetDateTime;
use time::macros::datetime;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::support::{IdentityDouble, Served, identify, scoring_server, track};

macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let dir = tessera_testkit::TestSqlite::new();
                    super::$test(&dir.url("profile.db")).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    let db = tessera_testkit::TestDb::new().await;
                    super::$test(db.url()).await;
                }
            )*
        }
    };
}

on_both_backends!(live_buyers_stream_by_day_in_pages_without_merged_or_deleted);

const DAY0: OffsetDateTime = datetime!(2026-03-01 10:00 UTC);

fn order(event_id: &str, profile_id: &str, day: i64, revenue: f64) -> pb::ResolvedEvent {
    let mut e = track(
        event_id,
        profile_id,
        &format!("u-{profile_id}"),
        DAY0 + time::Duration::days(day),
    );
    let event = e.event.as_mut().unwrap();
    event.properties = Some(json_map_to_struct(
        json!({ "revenue": revenue }).as_object().unwrap(),
    ));
    e
}

fn history(
    profile_id: &str,
    first: i64,
    last: i64,
    days: i64,
    repeat_revenue: f64,
    revenue: f64,
) -> pb::ProfilePurchaseHistory {
    let day0 = DAY0.unix_timestamp() / 86_400;
    pb::ProfilePurchaseHistory {
        profile_id: profile_id.to_owned(),
        purchases: Some(scoring::PurchaseHistory {
            first_day: day0 + first,
            last_day: day0 + last,
            days,
            repeat_revenue,
            revenue,
        }),
    }
}

async fn stream(
    client: &ProfilePipelineServiceClient<Channel>,
    request: pb::StreamPurchaseHistoriesRequest,
) -> Result<Vec<Vec<pb::ProfilePurchaseHistory>>, tonic::Status> {
    let mut stream = client
        .clone()
        .stream_purchase_histories(request)
        .await?
        .into_inner();
    let mut pages = Vec::new();
    while let Some(page) = stream.message().await? {
        pages.push(page.profiles);
    }
    Ok(pages)
}

async fn live_buyers_stream_by_day_in_pages_without_merged_or_deleted(url: &str) {
    let db = Database::connect(url, SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    let scoring = scoring_server().await;
    let identity = IdentityDouble::default().serve().await;
    let profiles = Profiles::new(
        db.clone(),
        Arc::new(MemoryCache::new(1_000, Duration::from_secs(60))),
        Peers {
            identity: identity.lazy_channel(),
            scoring: scoring.lazy_channel(),
            ingestion: identity.lazy_channel(),
        },
        ProfileSettings {
            match_profiles: false,
            ..ProfileSettings::default()
        },
    );
    let mut services = GrpcServices::default();
    profiles.register(&mut services);
    let served = Served::start(services).await;
    let client = ProfilePipelineServiceClient::new(served.lazy_channel());

    let mut writes = client.clone();
    writes
        .apply_events(pb::ApplyEventsRequest {
            merges: vec![],
            events: vec![
                // a: three purchase days, two orders on day 0 (one transaction).
                order("a1", "a", 0, 10.0),
                order("a2", "a", 0, 5.5),
                order("a3", "a", 7, 20.0),
                order("a4", "a", 30, 4.25),
                // b: one purchase.
                order("b1", "b", 3, 99.99),
                // c: no purchase at all.
                identify("c1", "c", "u-c", DAY0, json!({"plan": "free"})),
                // d: merged into e below; e then holds both histories.
                order("d1", "d", 1, 8.0),
                order("e1", "e", 2, 12.0),
                // f: deleted below.
                order("f1", "f", 4, 1.0),
                // g: bought only after the as_of used below.
                order("g1", "g", 40, 3.0),
            ],
        })
        .await
        .unwrap();
    writes
        .apply_events(pb::ApplyEventsRequest {
            merges: vec![identity::Merge {
                surviving_profile_id: "e".to_owned(),
                merged_profile_id: "d".to_owned(),
                cause_event_id: String::new(),
                merged_at: Some(to_timestamp(DAY0)),
                rule: "manual".to_owned(),
            }],
            events: vec![],
        })
        .await
        .unwrap();
    store::open(db.clone())
        .delete("f", &["f".to_owned()], "test", OffsetDateTime::now_utc())
        .await
        .unwrap();

    let everyone = [
        history("a", 0, 30, 3, 24.25, 39.75),
        history("b", 3, 3, 1, 0.0, 99.99),
        history("e", 1, 2, 2, 12.0, 20.0),
        history("g", 40, 40, 1, 0.0, 3.0),
    ];
    let all = stream(&client, pb::StreamPurchaseHistoriesRequest::default())
        .await
        .unwrap();
    assert_eq!(all.concat(), everyone);

    // Pages of two profiles read: the second read [c, e], and c bought nothing.
    let paged = stream(
        &client,
        pb::StreamPurchaseHistoriesRequest {
            page_size: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let sizes: Vec<usize> = paged.iter().map(Vec::len).collect();
    assert_eq!(sizes, [2, 1, 1]);
    assert_eq!(paged.concat(), everyone);

    // As of day 10: a's day-30 purchase and g are not counted; resumed after b.
    let as_of = stream(
        &client,
        pb::StreamPurchaseHistoriesRequest {
            as_of: Some(to_timestamp(DAY0 + time::Duration::days(10))),
            after_profile_id: "b".to_owned(),
            page_size: 1_000,
        },
    )
    .await
    .unwrap();
    assert_eq!(as_of.concat(), [history("e", 1, 2, 2, 12.0, 20.0)]);
    let from_a = stream(
        &client,
        pb::StreamPurchaseHistoriesRequest {
            as_of: Some(to_timestamp(DAY0 + time::Duration::days(10))),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(from_a.concat()[0], history("a", 0, 7, 2, 20.0, 35.5));

    let bad = stream(
        &client,
        pb::StreamPurchaseHistoriesRequest {
            page_size: 5_000,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(
        bad.get_details_bad_request().unwrap().field_violations[0].field,
        "page_size"
    );
    db.close().await;
}
