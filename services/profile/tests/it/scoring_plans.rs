//! Scoring plans end to end: the profile service sends each written profile's traits, computed
//! traits, audiences and accounts to the real scoring service configured with a plan, and
//! stores the plan's score with its rule hits; a later event that makes a rule stop matching
//! takes its points away (scores are recomputed, not accumulated). Plan scores are usable in
//! audiences and each change of one is a `score_changed` change of the change stream.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tessera_profile::{MIGRATIONS, Peers, ProfileSettings, Profiles, SCHEMA};
use tessera_proto::common::v1 as common;
use tessera_proto::convert::{json_map_to_struct, to_timestamp};
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::get_profile_request::Lookup;
use tessera_proto::profile::v1::profile_pipeline_service_client::ProfilePipelineServiceClient;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::scoring::v1::Score;
use tessera_scoring::{Scoring, ScoringSettings};
use tessera_server::{GrpcServices, Shutdown};
use tessera_store::{Database, DbSettings, MemoryCache};
use tessera_testkit::TestDb;
use time::OffsetDateTime;

use crate::service::{events, minutes_ago};
use crate::support::{IdentityDouble, Served, identify, track};

/// A plan reading every kind of fact: traits, a computed trait, an audience and the person's
/// role in an account (positive points add up to 100, so the score is the points).
fn plan() -> ScoringSettings {
    serde_json::from_value(json!({
        // The paper's CDNOW fit (weeks): people with purchases get churn risk and value.
        "customer_value": {"version": "cdnow-1997", "r": 0.243, "alpha": 4.414, "a": 0.793,
                           "b": 2.426, "p": 6.25, "q": 3.74, "v": 15.44},
        "plans": [{
        "name": "fit",
        "version": "7",
        "rules": [
            {"name": "software", "description": "works in software", "points": 40,
             "condition": {"trait": {"name": "industry", "op": "eq", "value": "software"}}},
            {"name": "big_company", "description": "200 employees or more", "points": 20,
             "condition": {"trait": {"name": "employees", "op": "gte", "value": 200}}},
            {"name": "ordered", "description": "has ordered", "points": 20,
             "condition": {"computed": {"name": "order_count", "op": "gte", "value": 1}}},
            {"name": "buyer", "description": "in the buyers audience", "points": 10,
             "condition": {"audience": "buyers"}},
            {"name": "decision_maker", "description": "decides for an account", "points": 10,
             "condition": {"account": {"name": "member.role", "op": "eq", "value": "decision maker"}}},
            {"name": "industry_on_account", "description": "an account in software", "points": 0,
             "condition": {"account": {"name": "industry", "op": "eq", "value": "software"}}},
        ],
    }]}))
    .unwrap()
}

fn profile_settings() -> ProfileSettings {
    serde_json::from_value(json!({
        "computed_traits": [
            {"name": "order_count", "kind": "count", "events": ["Order Completed"]},
        ],
        "audiences": [
            {"name": "buyers", "condition": {"performed": {"event": "Order Completed"}}},
            {"name": "good_fit", "condition": {"score": {"name": "fit", "op": "gte", "value": 80}}},
        ],
    }))
    .unwrap()
}

struct Env {
    reads: ProfileServiceClient<tonic::transport::Channel>,
    writes: ProfilePipelineServiceClient<tonic::transport::Channel>,
    _served: (Served, Served, Served),
    _db: TestDb,
    /// Stops the sweeper, when one runs.
    stop: Shutdown,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Env {
    async fn new() -> Self {
        Self::with(&plan(), profile_settings(), None).await
    }

    /// The profile service with `settings`, scored by the scoring service with `plan`, with
    /// its sweeper (account refreshes, expiry) running every `sweep` when given.
    async fn with(
        plan: &ScoringSettings,
        settings: ProfileSettings,
        sweep: Option<Duration>,
    ) -> Self {
        let db = TestDb::new().await;
        let mut services = GrpcServices::default();
        Scoring::from_settings(plan)
            .unwrap()
            .register(&mut services);
        let scoring = Served::start(services).await;
        let identity = IdentityDouble::default().serve().await;
        let database = Database::connect(db.url(), SCHEMA, &DbSettings::default())
            .await
            .unwrap();
        database.migrate(MIGRATIONS).await.unwrap();
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
        let stop = Shutdown::new();
        if let Some(interval) = sweep {
            profiles.spawn_sweeper(interval, stop.clone());
        }
        Self {
            reads: ProfileServiceClient::new(served.lazy_channel()),
            writes: ProfilePipelineServiceClient::new(served.lazy_channel()),
            _served: (served, scoring, identity),
            _db: db,
            stop,
        }
    }

    async fn apply(&self, list: Vec<pb::ResolvedEvent>) {
        self.writes
            .clone()
            .apply_events(events(list))
            .await
            .unwrap();
    }

    /// The profile's stored `fit` score.
    async fn fit(&self, id: &str) -> Score {
        self.profile(id).await.scores["fit"].clone()
    }

    async fn profile(&self, id: &str) -> pb::Profile {
        let profile = self
            .reads
            .clone()
            .get_profile(pb::GetProfileRequest {
                lookup: Some(Lookup::ProfileId(id.to_owned())),
                as_of: None,
                read_mask: None,
            })
            .await
            .unwrap()
            .into_inner()
            .profile
            .unwrap();
        assert!(profile.scores.contains_key("engagement"));
        profile
    }

    /// The values of the `score_changed` changes of `score`, in stream order, once there are
    /// `count`.
    async fn score_changes(&self, score: &str, count: usize) -> Vec<f64> {
        let mut stream = self
            .reads
            .clone()
            .watch_profile_changes(pb::WatchProfileChangesRequest {
                cursor: "beginning".to_owned(),
                kinds: vec!["score_changed".to_owned()],
                audiences: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        let mut values = Vec::new();
        while values.len() < count {
            let change = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("a change within 10 s")
                .unwrap()
                .expect("the stream goes on");
            if change.score == score {
                values.push(change.score_value);
            }
        }
        values
    }
}

/// A group call of `profile_id` naming account `acme` (an account in software) with the person's
/// `role`.
fn group(event_id: &str, profile_id: &str, at: OffsetDateTime, role: &str) -> pb::ResolvedEvent {
    let mut e = identify(event_id, profile_id, "u1", at, json!({}));
    let event = e.event.as_mut().unwrap();
    event.r#type = common::EventType::Group as i32;
    event.group_id = "acme".to_owned();
    event.traits = Some(json_map_to_struct(
        json!({"industry": "software"}).as_object().unwrap(),
    ));
    event.context = Some(json_map_to_struct(
        json!({"traits": {"role": role}}).as_object().unwrap(),
    ));
    e
}

/// A person plan on the person's account's `order_count`: 60 points from 1 order, 40 more from
/// 50 (what a stale account trait of that name would give).
fn account_orders_plan() -> ScoringSettings {
    serde_json::from_value(json!({
        "plans": [{
            "name": "account_orders",
            "version": "1",
            "rules": [
                {"name": "ordered", "description": "the account has ordered", "points": 60,
                 "condition": {"account": {"name": "order_count", "op": "gte", "value": 1}}},
                {"name": "many", "description": "the account has ordered a lot", "points": 40,
                 "condition": {"account": {"name": "order_count", "op": "gte", "value": 50}}},
            ],
        }],
    }))
    .unwrap()
}

/// A person plan reads an account computed trait of the person's account as account plans do:
/// the declared `order_count` (a count of the members' orders) hides the account trait
/// `order_count` = 99 a group call set.
#[tokio::test]
async fn person_plans_read_the_account_computed_traits_of_the_persons_accounts() {
    let settings = serde_json::from_value(json!({
        "account_computed_traits": [
            {"name": "order_count", "kind": "count", "events": ["Order Completed"]},
        ],
    }))
    .unwrap();
    let env = Env::with(&account_orders_plan(), settings, None).await;
    let score = |id: &'static str| {
        let env = &env;
        async move { env.profile(id).await.scores["account_orders"].value }
    };
    let mut call = group("g1", "p1", minutes_ago(3), "finance");
    call.event.as_mut().unwrap().traits = Some(json_map_to_struct(
        json!({"order_count": 99}).as_object().unwrap(),
    ));
    env.apply(vec![call]).await;
    assert_eq!(score("p1").await, 0.0, "nothing counted, the 99 is hidden");

    env.apply(vec![track("o1", "p1", "u1", minutes_ago(2))])
        .await;
    assert_eq!(
        score("p1").await,
        60.0,
        "one order counted, the 99 is hidden"
    );
}

/// A person's score on an account computed trait follows it with no event of the person, by
/// the account refresh the sweeper runs: another member's order counts at once, and when the
/// order leaves the trait's window the sweeper's expiry of the account rescores its members.
/// The engagement score those refreshes compute is the person's own, decayed to the refresh's
/// time: never more than the person's last write gave.
#[tokio::test]
async fn person_scores_follow_account_computed_traits_without_an_event_of_the_person() {
    const WINDOW: i64 = 3_600;
    let settings = serde_json::from_value(json!({
        "account_computed_traits": [
            {"name": "order_count", "kind": "count", "events": ["Order Completed"],
             "window_seconds": WINDOW},
        ],
    }))
    .unwrap();
    let env = Env::with(
        &account_orders_plan(),
        settings,
        Some(Duration::from_millis(100)),
    )
    .await;
    // p1's scores once `done` holds of its `account_orders` value, within `within`.
    let until = |done: fn(f64) -> bool, within: Duration| {
        let env = &env;
        async move {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                let profile = env.profile("p1").await;
                if done(profile.scores["account_orders"].value) {
                    return profile;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "p1's account_orders stayed {}",
                    profile.scores["account_orders"].value
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Group calls without traits: no change of acme's traits queues a refresh of its members.
    let mut first = group("g1", "p1", minutes_ago(3), "finance");
    first.event.as_mut().unwrap().traits = None;
    let mut second = group("g2", "p2", minutes_ago(3), "finance");
    let event = second.event.as_mut().unwrap();
    event.traits = None;
    event.user_id = "u2".to_owned();
    second.identifiers[0].value = "u2".to_owned();
    env.apply(vec![first, second]).await;
    let before = until(|v| v == 0.0, Duration::from_secs(5)).await;
    let engagement = before.scores["engagement"].clone();

    // p2's order, counted for 12 more seconds: p1 is rescored without an event of its own.
    let order_at = OffsetDateTime::now_utc() - time::Duration::seconds(WINDOW - 12);
    env.apply(vec![track("o1", "p2", "u2", order_at)]).await;
    let counted = until(|v| v == 60.0, Duration::from_secs(8)).await;
    assert_eq!(
        counted.event_count, 1,
        "no event of p1's own since its group call"
    );
    let refreshed = &counted.scores["engagement"];
    assert!(refreshed.value <= engagement.value, "decayed, not raised");
    let at = |s: &Score| s.computed_at.map(|t| (t.seconds, t.nanos));
    assert!(at(refreshed) > at(&engagement), "as of the refresh");

    // The order leaves the window: the sweeper's expiry of acme rescores p1.
    until(|v| v == 0.0, Duration::from_secs(30)).await;
}

fn hits(score: &Score) -> Vec<(&str, f64)> {
    score
        .factors
        .iter()
        .filter(|f| !["raw_points", "max_points", "grade"].contains(&f.name.as_str()))
        .map(|f| (f.name.as_str(), f.value))
        .collect()
}

#[tokio::test]
async fn stored_plan_scores_follow_the_facts_that_match_now() {
    let env = Env::new().await;
    env.apply(vec![identify(
        "e1",
        "p1",
        "u1",
        minutes_ago(30),
        json!({"industry": "software", "employees": 500}),
    )])
    .await;
    let fit = env.fit("p1").await;
    assert_eq!(hits(&fit), [("software", 40.0), ("big_company", 20.0)]);
    assert_eq!(fit.value, 60.0);
    assert_eq!(fit.model_version, "fit@7");
    let software = fit.factors.iter().find(|f| f.name == "software").unwrap();
    assert_eq!(software.description, "works in software");
    let grade = fit.factors.iter().find(|f| f.name == "grade").unwrap();
    assert!(grade.description.starts_with("grade B"), "{grade:?}");

    // An order (a computed trait and an audience) and a group call with a role: every rule,
    // the one on the account's traits (read in the same write) included.
    env.apply(vec![
        track("e2", "p1", "u1", minutes_ago(20)),
        group("e3", "p1", minutes_ago(20), "decision maker"),
    ])
    .await;
    let fit = env.fit("p1").await;
    assert_eq!(
        hits(&fit),
        [
            ("software", 40.0),
            ("big_company", 20.0),
            ("ordered", 20.0),
            ("buyer", 10.0),
            ("decision_maker", 10.0),
            ("industry_on_account", 0.0),
        ]
    );
    assert_eq!(fit.value, 100.0);
    assert_eq!(env.profile("p1").await.audiences, ["buyers", "good_fit"]);
    assert!(
        fit.factors
            .iter()
            .find(|f| f.name == "grade")
            .unwrap()
            .description
            .starts_with("grade A")
    );

    // A later event changes the person's industry trait: that rule's points go, the rest stay
    // as they are (the account's own industry is still software).
    env.apply(vec![identify(
        "e4",
        "p1",
        "u1",
        minutes_ago(10),
        json!({"industry": "retail"}),
    )])
    .await;
    let fit = env.fit("p1").await;
    assert_eq!(
        hits(&fit),
        [
            ("big_company", 20.0),
            ("ordered", 20.0),
            ("buyer", 10.0),
            ("decision_maker", 10.0),
            ("industry_on_account", 0.0),
        ]
    );
    assert_eq!(fit.value, 60.0);
    let raw = fit.factors.iter().find(|f| f.name == "raw_points").unwrap();
    assert_eq!(raw.value, 60.0);
    assert_eq!(env.profile("p1").await.audiences, ["buyers"]);

    // A new role in the account: the role rule stops matching too.
    env.apply(vec![group("e5", "p1", minutes_ago(5), "finance")])
        .await;
    let fit = env.fit("p1").await;
    assert_eq!(fit.value, 50.0);
    assert!(fit.computed_at.unwrap().seconds >= to_timestamp(minutes_ago(1)).seconds);
    assert_eq!(env.score_changes("fit", 4).await, [60.0, 100.0, 60.0, 50.0]);
}

/// Purchases (`Order Completed` on three days) reach the customer-value models: the stored
/// profile carries `churn_risk` and `predicted_value` with their inputs.
#[tokio::test]
async fn purchases_give_a_churn_risk_and_a_predicted_value() {
    let env = Env::new().await;
    let days_ago = |d: i64| minutes_ago(d * 24 * 60);
    env.apply(vec![
        track("o1", "p9", "u9", days_ago(100)),
        track("o2", "p9", "u9", days_ago(40)),
        track("o3", "p9", "u9", days_ago(10)),
    ])
    .await;
    let profile = env.profile("p9").await;
    let churn = &profile.scores["churn_risk"];
    assert!(churn.value > 0.0 && churn.value < 100.0, "{churn:?}");
    let frequency = churn
        .factors
        .iter()
        .find(|f| f.name == "frequency")
        .unwrap();
    assert_eq!(frequency.value, 2.0, "two repeat purchase days");
    let age = churn.factors.iter().find(|f| f.name == "age").unwrap();
    assert!((age.value - 100.0 / 7.0).abs() < 0.2, "{age:?}");
    assert!(profile.scores["predicted_value"].value > 0.0);
    assert_eq!(
        profile.scores["predicted_value"].model_version,
        "bg-nbd-gamma-gamma-v1@cdnow-1997"
    );
}
