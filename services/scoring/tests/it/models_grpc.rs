//! The customer-value model RPCs over gRPC, on real databases, with the population streamed by
//! a stand-in profile service (`ProfilePipelineService.StreamPurchaseHistories` over the CDNOW
//! sample or a hand-made population; the real profile service's side of the stream is tested
//! in the profile crate): fitting reproduces the paper, good fits activate, rejected ones do
//! not, rollback, replicas follow the active model, RFM, and bad input.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tessera_proto::convert::to_timestamp;
use tessera_proto::profile::v1 as profile;
use tessera_proto::profile::v1::profile_pipeline_service_server::{
    ProfilePipelineService, ProfilePipelineServiceServer,
};
use tessera_proto::scoring::v1 as pb;
use tessera_proto::scoring::v1::scoring_service_client::ScoringServiceClient;
use tessera_scoring::models::ScheduleOutcome;
use tessera_scoring::rfm::{RfmBoundaries, RfmInputs};
use tessera_scoring::{Scoring, ScoringSettings};
use tessera_server::GrpcServices;
use tessera_testkit::GrpcTestServer;
use time::macros::datetime;
use time::{Date, OffsetDateTime};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt;

use crate::cdnow::cdnow_sample;
use crate::models_store::{Backend, postgres, sqlite};

/// Revenue in cents by purchase day (days since 1970-01-01), per profile.
type Population = Vec<(String, BTreeMap<i64, i64>)>;

/// A profile service that only streams purchase histories, as the real one computes them from
/// its per-day accumulator.
#[derive(Debug, Clone)]
struct FakeProfiles(Arc<Population>);

type HistoryStream =
    Pin<Box<dyn Stream<Item = Result<profile::StreamPurchaseHistoriesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ProfilePipelineService for FakeProfiles {
    type StreamPurchaseHistoriesStream = HistoryStream;

    async fn apply_events(
        &self,
        _: Request<profile::ApplyEventsRequest>,
    ) -> Result<Response<profile::ApplyEventsResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn split_profiles(
        &self,
        _: Request<profile::SplitProfilesRequest>,
    ) -> Result<Response<profile::SplitProfilesResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn stream_purchase_histories(
        &self,
        request: Request<profile::StreamPurchaseHistoriesRequest>,
    ) -> Result<Response<Self::StreamPurchaseHistoriesStream>, Status> {
        let request = request.into_inner();
        let last_day = request
            .as_of
            .map(|t| t.seconds.div_euclid(86_400))
            .unwrap_or(i64::MAX);
        let page = usize::try_from(request.page_size).unwrap().max(1);
        let histories: Vec<profile::ProfilePurchaseHistory> = self
            .0
            .iter()
            .filter_map(|(id, days)| {
                let days: Vec<(i64, i64)> = days
                    .iter()
                    .filter(|(day, _)| **day <= last_day)
                    .map(|(d, c)| (*d, *c))
                    .collect();
                let (first, first_cents) = *days.first()?;
                let repeat: i64 = days.iter().skip(1).map(|(_, c)| c).sum();
                Some(profile::ProfilePurchaseHistory {
                    profile_id: id.clone(),
                    purchases: Some(pb::PurchaseHistory {
                        first_day: first,
                        last_day: days.last()?.0,
                        days: days.len() as i64,
                        repeat_revenue: repeat as f64 / 100.0,
                        revenue: (repeat + first_cents) as f64 / 100.0,
                    }),
                })
            })
            .collect();
        let pages: Vec<Result<_, Status>> = histories
            .chunks(page)
            .map(|chunk| {
                Ok(profile::StreamPurchaseHistoriesResponse {
                    profiles: chunk.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(pages))))
    }
}

fn day(date: Date) -> i64 {
    (date - Date::from_calendar_date(1970, time::Month::January, 1).unwrap()).whole_days()
}

/// The CDNOW sample as the profile service keeps it: cents by purchase day per customer.
fn cdnow_population() -> Population {
    let mut customers: BTreeMap<u32, BTreeMap<i64, i64>> = BTreeMap::new();
    for p in cdnow_sample() {
        *customers
            .entry(p.customer)
            .or_default()
            .entry(day(p.day))
            .or_default() += (p.value * 100.0).round() as i64;
    }
    customers
        .into_iter()
        .map(|(id, days)| (format!("cdnow-{id:05}"), days))
        .collect()
}

/// One scoring replica on `backend`'s database, reading `population`.
struct Replica {
    client: ScoringServiceClient<Channel>,
    scoring: Scoring,
    stop: tessera_server::Shutdown,
    _server: GrpcTestServer,
}

impl Replica {
    async fn start(backend: &Backend, profiles: &GrpcTestServer, settings: &str) -> Self {
        let settings: ScoringSettings = toml::from_str(settings).expect("settings parse");
        let scoring = Scoring::from_settings(&settings)
            .expect("valid settings")
            .with_store(backend.db.clone(), profiles.lazy_channel());
        let stop = tessera_server::Shutdown::new();
        scoring.spawn_workers(stop.clone());
        let mut services = GrpcServices::default();
        scoring.register(&mut services);
        let server = GrpcTestServer::start(services).await;
        Self {
            client: ScoringServiceClient::new(server.channel().await),
            scoring,
            stop,
            _server: server,
        }
    }

    async fn fit(&self, as_of: OffsetDateTime) -> Result<pb::CustomerValueModel, Status> {
        Ok(self
            .client
            .clone()
            .fit_customer_value_model(pb::FitCustomerValueModelRequest {
                as_of: Some(to_timestamp(as_of)),
            })
            .await?
            .into_inner()
            .model
            .expect("a model"))
    }

    async fn scores(
        &self,
        purchases: pb::PurchaseHistory,
        as_of: OffsetDateTime,
    ) -> Vec<pb::Score> {
        self.client
            .clone()
            .score_profiles(pb::ScoreProfilesRequest {
                profiles: vec![pb::ProfileFacts {
                    profile_id: "buyer".to_owned(),
                    event_count: 3,
                    purchases: Some(purchases),
                    ..Default::default()
                }],
                as_of: Some(to_timestamp(as_of)),
            })
            .await
            .unwrap()
            .into_inner()
            .profiles
            .remove(0)
            .scores
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn profile_service(population: Population) -> GrpcTestServer {
    let mut services = GrpcServices::default();
    services.add(ProfilePipelineServiceServer::new(FakeProfiles(Arc::new(
        population,
    ))));
    GrpcTestServer::start(services).await
}

/// The paper's horizon (39 weeks) with its parameters as the configured fallback.
const PAPER: &str = r#"
[customer_value]
version = "cdnow-1997"
r = 0.243
alpha = 4.414
a = 0.793
b = 2.426
p = 6.25
q = 3.74
v = 15.44
horizon = 39

[fitting]
fit_interval_hours = 0
min_population = 2
poll_interval_ms = 100
"#;

const CALIBRATION_END: OffsetDateTime = datetime!(1997-09-30 00:00 UTC);

/// The paper's customer: purchases on days 0, 150 and 213 of a history observed for 272 days
/// (x = 2, t_x = 30.43, T = 38.86 weeks), $20, $40 and $40.
fn papers_customer(as_of: OffsetDateTime) -> pb::PurchaseHistory {
    let today = as_of.unix_timestamp() / 86_400;
    pb::PurchaseHistory {
        first_day: today - 272,
        last_day: today - 59,
        days: 3,
        repeat_revenue: 80.0,
        revenue: 100.0,
    }
}

fn score<'a>(scores: &'a [pb::Score], name: &str) -> Option<&'a pb::Score> {
    scores.iter().find(|s| s.name == name)
}

fn factor(score: &pb::Score, name: &str) -> f64 {
    score
        .factors
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("{} has no factor {name}", score.name))
        .value
}

fn description<'a>(score: &'a pb::Score, name: &str) -> &'a str {
    &score
        .factors
        .iter()
        .find(|f| f.name == name)
        .unwrap()
        .description
}

/// Waits (at most 10 s) until `done` holds.
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fitted through `FitCustomerValueModel` on the CDNOW sample streamed by the profile service,
/// the stored model reproduces Fader, Hardie & Lee (2005) and note 025 to the published
/// precision, becomes active, and the scores use it (with its version) at once.
#[tokio::test]
async fn a_cdnow_fit_through_the_api_reproduces_the_paper_and_is_used() {
    let backend = postgres().await;
    let profiles = profile_service(cdnow_population()).await;
    let replica = Replica::start(&backend, &profiles, PAPER).await;

    // Before any fit: the configured parameters, no RFM.
    let before = replica
        .scores(papers_customer(CALIBRATION_END), CALIBRATION_END)
        .await;
    let churn = score(&before, "churn_risk").unwrap();
    assert_eq!(churn.model_version, "bg-nbd-gamma-gamma-v1@cdnow-1997");
    assert!(score(&before, "rfm").is_none());

    let model = replica.fit(CALIBRATION_END).await.unwrap();
    assert_eq!(
        model.status(),
        pb::CustomerValueModelStatus::Active,
        "{model:?}"
    );
    assert_eq!(model.rejection_reason, "");
    assert_eq!(model.population, 2_357);
    assert_eq!(model.trigger, "api");
    assert_eq!(model.unit_days, 7.0);
    assert_eq!(model.as_of, Some(to_timestamp(CALIBRATION_END)));
    let bg = model.bg_nbd.unwrap();
    let d = model.bg_nbd_diagnostics.clone().unwrap();
    assert_eq!(
        [
            format!("{:.3}", bg.r),
            format!("{:.3}", bg.alpha),
            format!("{:.3}", bg.a),
            format!("{:.3}", bg.b),
            format!("{:.1}", d.log_likelihood),
        ],
        ["0.243", "4.414", "0.793", "2.426", "-9582.4"],
        "{model:?}"
    );
    assert!(
        d.converged && d.iterations > 0 && d.gradient_norm < 1e-6,
        "{d:?}"
    );
    assert_eq!(d.customers, 2_357);
    assert!((d.mean_log_likelihood * 2_357.0 - d.log_likelihood).abs() < 1e-6);
    let gg = model.gamma_gamma.unwrap();
    let gd = model.gamma_gamma_diagnostics.clone().unwrap();
    assert_eq!(
        [
            format!("{:.2}", gg.p),
            format!("{:.2}", gg.q),
            format!("{:.2}", gg.v)
        ],
        ["6.25", "3.74", "15.44"]
    );
    assert!(gd.converged);
    assert_eq!(gd.customers, 946);

    // The RFM boundaries are the population's quintiles, as computed from the same histories.
    let rfm = model.rfm.clone().unwrap();
    let inputs: Vec<RfmInputs> = cdnow_population()
        .iter()
        .filter_map(|(_, days)| {
            let days: Vec<_> = days
                .iter()
                .filter(|(d, _)| **d <= day(CALIBRATION_END.date()))
                .collect();
            let (first, _) = days.first()?;
            let cents: i64 = days.iter().map(|(_, c)| **c).sum();
            Some(RfmInputs::of(
                &tessera_scoring::domain::PurchaseHistory {
                    first_day: **first,
                    last_day: *days.last()?.0,
                    days: days.len() as i64,
                    repeat_revenue: 0.0,
                    revenue: cents as f64 / 100.0,
                },
                CALIBRATION_END,
            ))
        })
        .collect();
    let expected = RfmBoundaries::of_population(&inputs).unwrap();
    assert_eq!(rfm.recency_days, expected.recency_days);
    assert_eq!(rfm.frequency, expected.frequency);
    for (got, want) in rfm.monetary.iter().zip(expected.monetary) {
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }
    // 60 % of CDNOW's customers bought once: the lower frequency quintiles are 0.
    assert_eq!(rfm.frequency[..2], [0.0, 0.0]);

    // Scores use the fitted model at once, with its version, and reproduce the paper's
    // prediction for its customer.
    let label = model.label.clone();
    assert_eq!(label, format!("m{}", model.version));
    let after = replica
        .scores(papers_customer(CALIBRATION_END), CALIBRATION_END)
        .await;
    let churn = score(&after, "churn_risk").unwrap();
    assert_eq!(
        churn.model_version,
        format!("bg-nbd-gamma-gamma-v1@{label}")
    );
    let value = score(&after, "predicted_value").unwrap();
    assert_eq!(
        format!("{:.3}", factor(value, "expected_purchases")),
        "1.226"
    );
    let rfm_score = score(&after, "rfm").expect("an rfm score");
    assert_eq!(rfm_score.model_version, format!("rfm-v1@{label}"));
    for name in [
        "segment",
        "code",
        "recency_score",
        "frequency_score",
        "monetary_score",
    ] {
        assert!(!description(rfm_score, name).is_empty());
    }
    // Against CDNOW's quintiles (recency [99, 198, 219, 242] days, frequency [0, 0, 1, 2],
    // monetary [14.37, 19.99, 29.25, 43.29]): bought 59 days before (R 5), twice again (F 4:
    // not above 2), $33.33 a purchase day (M 4): 544, FM 4, Champions.
    assert_eq!(rfm.recency_days, [99.0, 198.0, 219.0, 242.0]);
    assert_eq!(rfm.frequency, [0.0, 0.0, 1.0, 2.0]);
    assert_eq!(description(rfm_score, "code"), "RFM code 544");
    assert_eq!(factor(rfm_score, "code"), 544.0);
    assert_eq!(description(rfm_score, "segment"), "segment: Champions");
    assert_eq!(rfm_score.value, 100.0 * 10.0 / 12.0);
    assert_eq!(factor(rfm_score, "recency_days"), 59.0);

    // Get, by version and as the active one.
    let mut client = replica.client.clone();
    for version in [model.version, 0] {
        let got = client
            .get_customer_value_model(pb::GetCustomerValueModelRequest { version })
            .await
            .unwrap()
            .into_inner()
            .model
            .unwrap();
        assert_eq!(got, model);
    }
    backend.db.close().await;
}

/// A later fit supersedes the first; rolling back to the first makes every replica use it
/// within seconds, and so does going forward again.
#[tokio::test]
async fn activation_rolls_back_and_every_replica_follows() {
    let backend = postgres().await;
    let profiles = profile_service(cdnow_population()).await;
    let a = Replica::start(&backend, &profiles, PAPER).await;
    let b = Replica::start(&backend, &profiles, PAPER).await;

    let first = a.fit(CALIBRATION_END).await.unwrap();
    let second = a.fit(datetime!(1998-06-30 00:00 UTC)).await.unwrap();
    assert!(second.version > first.version);
    assert_eq!(second.status(), pb::CustomerValueModelStatus::Active);
    assert_ne!(
        first.bg_nbd, second.bg_nbd,
        "the longer history fits other parameters"
    );
    let as_of = datetime!(1998-07-01 00:00 UTC);
    let version_on = |replica: &'static str, r: &Replica| {
        let client = r.client.clone();
        let _ = replica;
        async move {
            let mut client = client;
            let scores = client
                .score_profiles(pb::ScoreProfilesRequest {
                    profiles: vec![pb::ProfileFacts {
                        profile_id: "p".into(),
                        purchases: Some(papers_customer(as_of)),
                        ..Default::default()
                    }],
                    as_of: Some(to_timestamp(as_of)),
                })
                .await
                .unwrap()
                .into_inner()
                .profiles
                .remove(0)
                .scores;
            score(&scores, "churn_risk").unwrap().model_version.clone()
        }
    };
    let want = |m: &pb::CustomerValueModel| format!("bg-nbd-gamma-gamma-v1@{}", m.label);
    // The fitting replica uses the new model at once; the other within its poll.
    assert_eq!(version_on("a", &a).await, want(&second));
    eventually("replica b uses the second model", || async {
        version_on("b", &b).await == want(&second)
    })
    .await;

    // Roll back through replica b: replica a follows.
    let rolled = b
        .client
        .clone()
        .activate_customer_value_model(pb::ActivateCustomerValueModelRequest {
            version: first.version,
        })
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    assert_eq!(rolled.version, first.version);
    assert_eq!(rolled.status(), pb::CustomerValueModelStatus::Active);
    assert_eq!(version_on("b", &b).await, want(&first));
    eventually("replica a rolls back", || async {
        version_on("a", &a).await == want(&first)
    })
    .await;

    let listed = a
        .client
        .clone()
        .list_customer_value_models(pb::ListCustomerValueModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.active_version, first.version);
    let statuses: Vec<_> = listed
        .models
        .iter()
        .map(|m| (m.version, m.status()))
        .collect();
    assert_eq!(
        statuses,
        [
            (second.version, pb::CustomerValueModelStatus::Inactive),
            (first.version, pb::CustomerValueModelStatus::Active),
        ]
    );
    assert_eq!(listed.next_before_version, 0);
    let page = a
        .client
        .clone()
        .list_customer_value_models(pb::ListCustomerValueModelsRequest {
            page_size: 1,
            before_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.models.len(), 1);
    assert_eq!(page.next_before_version, second.version);
    drop((a, b));
    backend.db.close().await;
}

/// Everyone bought once: Gamma-Gamma has nothing to fit, the fit is stored rejected with the
/// reason, and nothing changes: no model is active and the scores keep the configured
/// fallback (here none: no customer-value scores, no RFM).
#[tokio::test]
async fn a_rejected_fit_never_becomes_active() {
    let backend = sqlite().await;
    let today = day(CALIBRATION_END.date());
    let one_timers: Population = (0..50)
        .map(|i| {
            (
                format!("p{i:02}"),
                BTreeMap::from([(today - 3 * i, 1_000 + i)]),
            )
        })
        .collect();
    let profiles = profile_service(one_timers).await;
    let replica = Replica::start(
        &backend,
        &profiles,
        "[fitting]\nfit_interval_hours = 0\nmin_population = 10\npoll_interval_ms = 100\n",
    )
    .await;
    let model = replica.fit(CALIBRATION_END).await.unwrap();
    assert_eq!(model.status(), pb::CustomerValueModelStatus::Rejected);
    assert!(model.rejection_reason.contains("Gamma-Gamma"), "{model:?}");
    assert_eq!(model.population, 50);
    let mut client = replica.client.clone();
    let listed = client
        .list_customer_value_models(pb::ListCustomerValueModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.active_version, 0);
    assert_eq!(listed.models, std::slice::from_ref(&model));
    let none = client
        .get_customer_value_model(pb::GetCustomerValueModelRequest { version: 0 })
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::NotFound);
    let refused = client
        .activate_customer_value_model(pb::ActivateCustomerValueModelRequest {
            version: model.version,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("rejected"), "{refused:?}");
    let scores = replica
        .scores(papers_customer(CALIBRATION_END), CALIBRATION_END)
        .await;
    let names: Vec<_> = scores.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["engagement"]);
    assert!(replica.scoring.models().current().customer_value.is_none());
    backend.db.close().await;
}

/// Unknown versions, bad fields and too small a population get clear errors naming the
/// problem; a scoring service without a database says it stores no models.
#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let backend = sqlite().await;
    let today = day(CALIBRATION_END.date());
    let few: Population = (0..3)
        .map(|i| {
            (
                format!("p{i}"),
                BTreeMap::from([(today - i, 500), (today - 10 - i, 700)]),
            )
        })
        .collect();
    let profiles = profile_service(few).await;
    let replica = Replica::start(&backend, &profiles, "[fitting]\nfit_interval_hours = 0\n").await;
    let mut client = replica.client.clone();

    let small = replica.fit(CALIBRATION_END).await.unwrap_err();
    assert_eq!(small.code(), Code::FailedPrecondition);
    assert!(
        small.message().contains("3 profiles") && small.message().contains("min_population (100)"),
        "{small:?}"
    );
    let future = replica
        .fit(OffsetDateTime::now_utc() + time::Duration::days(30))
        .await
        .unwrap_err();
    assert_eq!(field(&future), "as_of");

    let unknown = client
        .get_customer_value_model(pb::GetCustomerValueModelRequest { version: 42 })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(unknown.message(), "customer-value model 42 not found");
    let negative = client
        .get_customer_value_model(pb::GetCustomerValueModelRequest { version: -1 })
        .await
        .unwrap_err();
    assert_eq!(field(&negative), "version");
    let zero = client
        .activate_customer_value_model(pb::ActivateCustomerValueModelRequest { version: 0 })
        .await
        .unwrap_err();
    assert_eq!(field(&zero), "version");
    let missing = client
        .activate_customer_value_model(pb::ActivateCustomerValueModelRequest { version: 7 })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let page = client
        .list_customer_value_models(pb::ListCustomerValueModelsRequest {
            page_size: 101,
            before_version: -1,
        })
        .await
        .unwrap_err();
    let fields: Vec<String> = page
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["page_size", "before_version"]);

    // Without a database: FAILED_PRECONDITION saying so.
    let mut services = GrpcServices::default();
    Scoring::new().register(&mut services);
    let server = GrpcTestServer::start(services).await;
    let bare = ScoringServiceClient::new(server.channel().await)
        .list_customer_value_models(pb::ListCustomerValueModelsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(bare.code(), Code::FailedPrecondition);
    assert!(bare.message().contains("no model store"), "{bare:?}");
    backend.db.close().await;
}

fn field(status: &Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status.get_details_bad_request().unwrap().field_violations[0]
        .field
        .clone()
}

/// Bad fitting settings are refused by name before the service starts.
#[test]
fn bad_fitting_settings_are_refused_by_name() {
    for (text, named) in [
        (
            "[fitting]\nfit_interval_hours = -1\n",
            "fitting.fit_interval_hours",
        ),
        ("[fitting]\nmin_population = 1\n", "fitting.min_population"),
        (
            "[fitting]\npoll_interval_ms = 5\n",
            "fitting.poll_interval_ms",
        ),
    ] {
        let settings: ScoringSettings = toml::from_str(text).unwrap();
        let err = settings.validate().unwrap_err().to_string();
        assert!(err.starts_with(&format!("scoring.{named}")), "{err}");
    }
    assert!(toml::from_str::<ScoringSettings>("[fitting]\nfit_every = 1\n").is_err());
}

/// Two replicas looking at the schedule at once: one fits, the other skips; neither fits again
/// before the interval has passed.
#[tokio::test]
async fn one_replica_runs_the_scheduled_fit() {
    let backend = postgres().await;
    let profiles = profile_service(cdnow_population()).await;
    let settings = "[fitting]\nfit_interval_hours = 24\npoll_interval_ms = 100\n";
    let a = Replica::start(&backend, &profiles, settings).await;
    let b = Replica::start(&backend, &profiles, settings).await;
    let now = OffsetDateTime::now_utc();
    let (ra, rb) = tokio::join!(
        a.scoring.models().run_schedule_once(now),
        b.scoring.models().run_schedule_once(now)
    );
    let outcomes = [ra.unwrap(), rb.unwrap()];
    let fitted: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            ScheduleOutcome::Fitted(model) => Some(model),
            ScheduleOutcome::Skipped | ScheduleOutcome::Failed(_) => None,
        })
        .collect();
    assert_eq!(fitted.len(), 1, "{outcomes:?}");
    assert_eq!(
        fitted[0].model.trigger,
        tessera_scoring::models::Trigger::Schedule
    );
    let later = now + time::Duration::hours(1);
    for replica in [&a, &b] {
        assert!(matches!(
            replica
                .scoring
                .models()
                .run_schedule_once(later)
                .await
                .unwrap(),
            ScheduleOutcome::Skipped
        ));
    }
    drop((a, b));
    backend.db.close().await;
}

/// The workers of two replicas, left to themselves: one scheduled fit (5 s after start), by one
/// of them, active on both.
#[tokio::test]
async fn the_schedule_fits_once_on_its_own() {
    let backend = postgres().await;
    let profiles = profile_service(cdnow_population()).await;
    let settings =
        "[fitting]\nfit_interval_hours = 24\nmin_population = 2\npoll_interval_ms = 100\n";
    let a = Replica::start(&backend, &profiles, settings).await;
    let b = Replica::start(&backend, &profiles, settings).await;
    let list = |r: &Replica| {
        let mut client = r.client.clone();
        async move {
            client
                .list_customer_value_models(pb::ListCustomerValueModelsRequest::default())
                .await
                .unwrap()
                .into_inner()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while list(&a).await.active_version == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no scheduled fit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both replicas looked at the schedule at about the same time: one fitted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let listed = list(&b).await;
    assert_eq!(listed.models.len(), 1, "{listed:?}");
    let model = &listed.models[0];
    assert_eq!(model.trigger, "schedule");
    assert_eq!(listed.active_version, model.version);
    for replica in [&a, &b] {
        eventually("both replicas use the scheduled model", || async {
            replica
                .scoring
                .models()
                .current()
                .rfm
                .as_ref()
                .is_some_and(|m| m.label == model.label)
        })
        .await;
    }
    drop((a, b));
    backend.db.close().await;
}
