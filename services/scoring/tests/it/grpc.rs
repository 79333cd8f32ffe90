//! `ScoreProfiles` served on 127.0.0.1:0 through the shared server edge.

use prost_types::Timestamp;
use tessera_core::activity;
use tessera_proto::convert::to_timestamp;
use tessera_proto::scoring::v1 as pb;
use tessera_proto::scoring::v1::scoring_service_client::ScoringServiceClient;
use tessera_scoring::Scoring;
use tessera_server::GrpcServices;
use tessera_testkit::GrpcTestServer;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

struct Server {
    client: ScoringServiceClient<Channel>,
    _server: GrpcTestServer,
}

impl Server {
    async fn start() -> Self {
        let mut services = GrpcServices::default();
        Scoring::new().register(&mut services);
        let server = GrpcTestServer::start(services).await;
        Self {
            client: ScoringServiceClient::new(server.channel().await),
            _server: server,
        }
    }
}

fn facts(id: &str, events: &[OffsetDateTime]) -> pb::ProfileFacts {
    let h = activity::DEFAULT_HALF_LIFE_SECONDS;
    pb::ProfileFacts {
        profile_id: id.to_owned(),
        event_count: events.len() as i64,
        last_seen: events.iter().max().map(|t| to_timestamp(*t)),
        activity_log2: events
            .iter()
            .fold(None, |acc, t| Some(activity::add_event(acc, *t, h))),
        activity_half_life_seconds: h,
        ..Default::default()
    }
}

#[tokio::test]
async fn scores_profiles_in_request_order_with_factors() {
    let server = Server::start().await;
    let as_of = datetime!(2026-05-01 00:00:00 UTC);
    let response = server
        .client
        .clone()
        .score_profiles(pb::ScoreProfilesRequest {
            profiles: vec![
                facts("old", &[as_of - Duration::days(30)]),
                facts(
                    "recent",
                    &[as_of - Duration::hours(1), as_of - Duration::hours(2)],
                ),
                facts("empty", &[]),
            ],
            as_of: Some(to_timestamp(as_of)),
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = response
        .profiles
        .iter()
        .map(|p| p.profile_id.as_str())
        .collect();
    assert_eq!(ids, ["old", "recent", "empty"]);
    let engagement = |i: usize| {
        let scores = &response.profiles[i].scores;
        assert_eq!(scores.len(), 1);
        scores[0].clone()
    };
    let (old, recent, empty) = (engagement(0), engagement(1), engagement(2));
    assert!(recent.value > old.value && old.value > empty.value);
    assert_eq!(empty.value, 0.0);
    assert_eq!(recent.name, "engagement");
    assert_eq!(recent.model_version, "engagement-v1");
    assert_eq!(recent.computed_at, Some(to_timestamp(as_of)));
    let names: Vec<_> = recent.factors.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "decayed_activity",
            "event_count",
            "days_since_last_seen",
            "half_life_days"
        ]
    );
    assert!(recent.factors.iter().all(|f| !f.description.is_empty()));
}

#[tokio::test]
async fn as_of_defaults_to_now() {
    let server = Server::start().await;
    let before = OffsetDateTime::now_utc().unix_timestamp();
    let response = server
        .client
        .clone()
        .score_profiles(pb::ScoreProfilesRequest {
            profiles: vec![facts("p", &[OffsetDateTime::now_utc()])],
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner();
    let computed = response.profiles[0].scores[0].computed_at.unwrap().seconds;
    assert!(computed >= before && computed <= before + 60);
    assert!(response.profiles[0].scores[0].value > 10.0);
}

#[tokio::test]
async fn invalid_requests_name_fields_and_limits() {
    let server = Server::start().await;
    let mut bad = facts("", &[]);
    bad.activity_log2 = Some(f64::INFINITY);
    let status = server
        .client
        .clone()
        .score_profiles(pb::ScoreProfilesRequest {
            profiles: vec![facts("ok", &[]), bad],
            as_of: Some(Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    let fields: Vec<_> = details
        .bad_request()
        .expect("bad request details")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(
        fields,
        [
            "as_of",
            "profiles[1].profile_id",
            "profiles[1].activity_log2"
        ]
    );

    let status = server
        .client
        .clone()
        .score_profiles(pb::ScoreProfilesRequest {
            profiles: vec![facts("p", &[]); 5_001],
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("profiles"));
}
