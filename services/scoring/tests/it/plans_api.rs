//! Scoring plans through the API (`CreatePlan`, `UpdatePlan`, `DeletePlan`, `GetPlan`,
//! `ListPlans`) on Postgres, with two replicas sharing the database.

use serde_json::json;
use tessera_proto::convert::json_to_value;
use tessera_proto::scoring::v1 as pb;
use tessera_proto::scoring::v1::scoring_service_client::ScoringServiceClient;
use tessera_scoring::{Scoring, ScoringSettings};
use tessera_server::GrpcServices;
use tessera_testkit::GrpcTestServer;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::models_store::{Backend, postgres};

/// Config: one plan, `fit`, and a quick poll.
const SETTINGS: &str = r#"
[fitting]
poll_interval_ms = 200
fit_interval_hours = 0

[[plans]]
name = "fit"
version = "1"
[[plans.rules]]
name = "big"
points = 10
condition = { trait = { name = "employees", op = "gte", value = 100 } }
"#;

/// One scoring replica on `backend`'s database.
struct Replica {
    client: ScoringServiceClient<Channel>,
    stop: tessera_server::Shutdown,
    _server: GrpcTestServer,
}

impl Replica {
    async fn start(backend: &Backend) -> Self {
        Self::start_with(backend, "").await
    }

    /// A replica with `SETTINGS` and `more` (TOML under the same `[scoring]` root, after it).
    async fn start_with(backend: &Backend, more: &str) -> Self {
        let settings: ScoringSettings = toml::from_str(&format!("{SETTINGS}\n{more}")).unwrap();
        // Plans never read the profile service.
        let profiles = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let scoring = Scoring::from_settings(&settings)
            .unwrap()
            .with_store(backend.db.clone(), profiles);
        let stop = tessera_server::Shutdown::new();
        scoring.spawn_workers(stop.clone());
        let mut services = GrpcServices::default();
        scoring.register(&mut services);
        let server = GrpcTestServer::start(services).await;
        Self {
            client: ScoringServiceClient::new(server.channel().await),
            stop,
            _server: server,
        }
    }

    fn client(&self) -> ScoringServiceClient<Channel> {
        self.client.clone()
    }

    /// The model versions of the plan scores of a gold-tier profile with 500 employees.
    async fn plan_scores(&self) -> Vec<(String, String, f64)> {
        let facts = pb::ProfileFacts {
            profile_id: "p".to_owned(),
            traits: [
                ("tier".to_owned(), json_to_value(&json!("gold"))),
                ("employees".to_owned(), json_to_value(&json!(500))),
            ]
            .into(),
            ..Default::default()
        };
        self.client()
            .score_profiles(pb::ScoreProfilesRequest {
                profiles: vec![facts],
                as_of: None,
            })
            .await
            .unwrap()
            .into_inner()
            .profiles
            .remove(0)
            .scores
            .into_iter()
            .skip(1) // engagement
            .map(|s| (s.name, s.model_version, s.value))
            .collect()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `vip`, worth `points` for gold-tier profiles, plus 10 when `fit` scores 100.
fn vip(version: &str, points: f64) -> String {
    json!({
        "name": "vip",
        "version": version,
        "rules": [
            {
                "name": "gold",
                "points": points,
                "condition": { "trait": { "name": "tier", "op": "eq", "value": "gold" } },
            },
            {
                "name": "fit",
                "points": 10,
                "condition": { "score": { "name": "fit", "op": "gte", "value": 100 } },
            },
        ],
    })
    .to_string()
}

fn scored(name: &str, version: &str, value: f64) -> (String, String, f64) {
    (name.to_owned(), version.to_owned(), value)
}

/// Waits (at most 10 s) until `replica` scores `expected`.
async fn scores_eventually(replica: &Replica, expected: &[(String, String, f64)]) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let scores = replica.plan_scores().await;
        if scores == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {scores:?} is not {expected:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn violation(status: &Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_details_bad_request().unwrap();
    details.field_violations[0].field.clone()
}

/// A plan created through replica A's RPC is scored at once on A and, after the poll, on B;
/// updates and deletes follow the same way, and a stale version is refused.
#[tokio::test]
async fn a_plan_changed_on_one_replica_is_scored_on_the_other() {
    let backend = postgres().await;
    let a = Replica::start(&backend).await;
    let b = Replica::start(&backend).await;
    let fit_only = [scored("fit", "fit@1", 100.0)];
    scores_eventually(&b, &fit_only).await;

    let created = a
        .client()
        .create_plan(pb::CreatePlanRequest {
            plan_json: vip("1", 30.0),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.revision, 1);
    let plan = created.plan.unwrap();
    assert_eq!(
        (
            plan.source(),
            plan.stored_version,
            plan.model_version.as_str()
        ),
        (pb::PlanSource::Api, 1, "vip@1")
    );
    assert_eq!(plan.max_points, 40.0);
    let with_vip = [scored("fit", "fit@1", 100.0), scored("vip", "vip@1", 100.0)];
    assert_eq!(
        a.plan_scores().await,
        with_vip,
        "at once on the replica that stored it"
    );
    scores_eventually(&b, &with_vip).await;

    let listed = b
        .client()
        .list_plans(pb::ListPlansRequest {})
        .await
        .unwrap();
    let listed = listed.into_inner();
    assert_eq!(listed.revision, 1);
    let sources: Vec<_> = listed
        .plans
        .iter()
        .map(|p| (p.name.as_str(), p.source(), p.stored_version))
        .collect();
    assert_eq!(
        sources,
        [
            ("fit", pb::PlanSource::Config, 0),
            ("vip", pb::PlanSource::Api, 1)
        ]
    );
    // The listed form goes back as it came.
    let round_trip: serde_json::Value = serde_json::from_str(&listed.plans[1].plan_json).unwrap();
    assert_eq!(round_trip["rules"][0]["points"], json!(30.0));

    // Updated through B with the version it read; A follows.
    let updated = b
        .client()
        .update_plan(pb::UpdatePlanRequest {
            plan_json: vip("2", 10.0),
            expected_version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.revision, 2);
    assert_eq!(updated.plan.unwrap().stored_version, 2);
    let got = a
        .client()
        .get_plan(pb::GetPlanRequest {
            name: "vip".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    assert_eq!((got.stored_version, got.version.as_str()), (2, "2"));
    scores_eventually(
        &a,
        &[scored("fit", "fit@1", 100.0), scored("vip", "vip@2", 100.0)],
    )
    .await;

    // A stale version is refused on either replica.
    let stale = a
        .client()
        .update_plan(pb::UpdatePlanRequest {
            plan_json: vip("3", 5.0),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");

    a.client()
        .delete_plan(pb::DeletePlanRequest {
            name: "vip".to_owned(),
            expected_version: 2,
        })
        .await
        .unwrap();
    scores_eventually(&b, &fit_only).await;
    backend.db.close().await;
}

/// Bad requests get INVALID_ARGUMENT naming the field; config's plans are read-only.
#[tokio::test]
async fn bad_plan_requests_get_clear_errors() {
    let backend = postgres().await;
    let replica = Replica::start(&backend).await;
    let mut client = replica.client();
    let create = |plan_json: &str| pb::CreatePlanRequest {
        plan_json: plan_json.to_owned(),
    };
    for bad in [
        String::new(),
        "{".to_owned(),
        json!({ "name": "x", "version": "1", "rules": [], "colour": 1 }).to_string(),
        json!({ "name": "x", "version": "1", "rules": [] }).to_string(),
        json!({
            "name": "x", "version": "1",
            "rules": [{ "name": "r", "points": 5,
                        "condition": { "trait": { "name": "n", "op": "gt", "value": "a" } } }],
        })
        .to_string(),
    ] {
        let status = client.create_plan(create(&bad)).await.unwrap_err();
        assert_eq!(violation(&status), "plan_json", "{bad}");
    }
    let config = client
        .create_plan(create(
            &json!({ "name": "fit", "version": "2", "rules": [
                { "name": "r", "points": 5, "condition": { "all": [] } }
            ] })
            .to_string(),
        ))
        .await
        .unwrap_err();
    assert_eq!(config.code(), Code::FailedPrecondition, "{config:?}");
    let status = client
        .update_plan(pb::UpdatePlanRequest {
            plan_json: vip("1", 1.0),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(violation(&status), "expected_version");
    let status = client
        .delete_plan(pb::DeletePlanRequest::default())
        .await
        .unwrap_err();
    assert_eq!(violation(&status), "name");
    let status = client
        .get_plan(pb::GetPlanRequest {
            name: "nope".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    // Without a database, plans cannot be stored.
    let mut services = GrpcServices::default();
    Scoring::new().register(&mut services);
    let server = GrpcTestServer::start(services).await;
    let bare = ScoringServiceClient::new(server.channel().await)
        .create_plan(create(&vip("1", 1.0)))
        .await
        .unwrap_err();
    assert_eq!(bare.code(), Code::FailedPrecondition, "{bare:?}");
    backend.db.close().await;
}

/// An account plan testing `buying_roles contains role` (rule 1, `role_known`), beside a rule
/// on employees (rule 0).
fn coverage(version: &str, role: &str) -> String {
    json!({
        "name": "coverage",
        "version": version,
        "level": "account",
        "rules": [
            {
                "name": "big",
                "points": 10,
                "condition": { "trait": { "name": "employees", "op": "gte", "value": 100 } },
            },
            {
                "name": "role_known",
                "points": 10,
                "condition": { "trait": { "name": "buying_roles", "op": "contains", "value": role } },
            },
        ],
    })
    .to_string()
}

/// The field violations of an INVALID_ARGUMENT status: field and description.
fn violations(status: &Status) -> Vec<(String, String)> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| (v.field, v.description))
        .collect()
}

/// A plan naming a buying role the committee does not have is refused by `CreatePlan` and
/// `UpdatePlan`, pointing at the rule's condition and naming the role and the known ones.
#[tokio::test]
async fn a_plan_naming_a_buying_role_the_committee_lacks_is_refused() {
    let backend = postgres().await;
    let replica = Replica::start(&backend).await;
    let mut client = replica.client();
    let expected = vec![(
        "plan_json.rules[1].condition".to_owned(),
        "rule \"role_known\": buying role \"security reviewer\" is not in the buying committee, \
         so the rule could never match (known buying roles: \"decision maker\", \"technical \
         evaluator\", \"champion\", \"finance\")"
            .to_owned(),
    )];
    let refused = client
        .create_plan(pb::CreatePlanRequest {
            plan_json: coverage("1", "security reviewer"),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&refused), expected);
    assert!(
        refused.message().contains("security reviewer"),
        "{refused:?}"
    );

    // A role of the committee is accepted; changing it to one outside is refused.
    let created = client
        .create_plan(pb::CreatePlanRequest {
            plan_json: coverage("1", "finance"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.revision, 1, "the refused create stored nothing");
    let refused = client
        .update_plan(pb::UpdatePlanRequest {
            plan_json: coverage("2", "security reviewer"),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&refused), expected);
    let listed = client
        .list_plans(pb::ListPlansRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.revision, 1, "nothing changed");
    backend.db.close().await;
}

/// A stored plan naming a buying role that a later committee (config changed, here another
/// replica's) does not have still loads: the replica starts, scores the plan's other rules and
/// reports that rule as not evaluable; other plans can still be written, and the plan itself
/// only with a role of the committee.
#[tokio::test]
async fn a_stored_plan_naming_a_role_the_committee_no_longer_has_is_not_evaluable() {
    let backend = postgres().await;
    let before = Replica::start(&backend).await;
    before
        .client()
        .create_plan(pb::CreatePlanRequest {
            plan_json: coverage("1", "finance"),
        })
        .await
        .unwrap();
    let after = Replica::start_with(
        &backend,
        r#"
        [[buying_roles]]
        name = "decision maker"
        filled_by = ["vp"]
        [[buying_roles]]
        name = "security reviewer"
        filled_by = ["ciso"]
        "#,
    )
    .await;
    let mut client = after.client();
    // GetPlan reads the stored plans first.
    let plan = client
        .get_plan(pb::GetPlanRequest {
            name: "coverage".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    let reason = "rule \"role_known\": buying role \"finance\" is not in the buying committee, \
                  so the rule could never match (known buying roles: \"decision maker\", \
                  \"security reviewer\")";
    assert!(
        plan.rules[1]
            .description
            .starts_with(&format!("not evaluable: {reason}; ")),
        "{:?}",
        plan.rules[1]
    );
    assert!(!plan.rules[0].description.contains("not evaluable"));

    let account = pb::AccountProfileFacts {
        account_id: "acme".to_owned(),
        traits: [("employees".to_owned(), json_to_value(&json!(500)))].into(),
        members: vec![pb::AccountMemberFacts {
            profile_id: "p1".to_owned(),
            role: "procurement".to_owned(),
            title: String::new(),
        }],
    };
    let scored = client
        .score_accounts(pb::ScoreAccountsRequest {
            accounts: vec![account],
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner()
        .accounts
        .remove(0);
    assert_eq!(scored.scores[0].name, "coverage");
    assert_eq!(scored.scores[0].value, 50.0, "10 of 20: the employees rule");
    let rules: Vec<_> = scored.plans[0]
        .rules
        .iter()
        .map(|r| {
            (
                r.name.as_str(),
                r.matched,
                r.counted,
                r.description.starts_with("not evaluable: "),
            )
        })
        .collect();
    assert_eq!(
        rules,
        [
            ("big", true, true, false),
            ("role_known", false, false, true)
        ]
    );

    // Other plans can be written beside it; it can be changed only to a role of the committee.
    client
        .create_plan(pb::CreatePlanRequest {
            plan_json: vip("1", 5.0),
        })
        .await
        .unwrap();
    let refused = client
        .update_plan(pb::UpdatePlanRequest {
            plan_json: coverage("2", "finance"),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(
        violations(&refused),
        [("plan_json.rules[1].condition".to_owned(), reason.to_owned())]
    );
    client
        .update_plan(pb::UpdatePlanRequest {
            plan_json: coverage("2", "security reviewer"),
            expected_version: 1,
        })
        .await
        .unwrap();
    // The replica with the default committee now has the mirror image: loaded, not evaluable.
    let plan = before
        .client()
        .get_plan(pb::GetPlanRequest {
            name: "coverage".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    assert_eq!(plan.version, "2");
    assert!(
        plan.rules[1]
            .description
            .starts_with("not evaluable: rule \"role_known\": buying role \"security reviewer\""),
        "{:?}",
        plan.rules[1]
    );
    backend.db.close().await;
}

/// An account plan with a `buying_roles_covered` test at `threshold`.
fn full_coverage(version: &str, threshold: u64) -> String {
    json!({
        "name": "full_coverage",
        "version": version,
        "level": "account",
        "rules": [
            {
                "name": "big",
                "points": 10,
                "condition": { "trait": { "name": "employees", "op": "gte", "value": 100 } },
            },
            {
                "name": "full",
                "points": 10,
                "condition": { "trait": { "name": "buying_roles_covered", "op": "gte", "value": threshold } },
            },
        ],
    })
    .to_string()
}

/// A coverage threshold above the committee's size is refused by `CreatePlan` and
/// `UpdatePlan` naming the rule's condition, the threshold and the size; a stored plan whose
/// threshold a later, smaller committee cannot reach loads with that rule not evaluable.
#[tokio::test]
async fn a_coverage_threshold_above_the_committee_size_is_refused_or_not_evaluable() {
    let backend = postgres().await;
    let replica = Replica::start(&backend).await;
    let mut client = replica.client();
    let expected = vec![(
        "plan_json.rules[1].condition".to_owned(),
        "rule \"full\": buying_roles_covered gte 5 needs more buying roles than the buying \
         committee has (4; buying_roles_covered is 0 to 4), so the test could never hold"
            .to_owned(),
    )];
    let refused = client
        .create_plan(pb::CreatePlanRequest {
            plan_json: full_coverage("1", 5),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&refused), expected);
    client
        .create_plan(pb::CreatePlanRequest {
            plan_json: full_coverage("1", 4),
        })
        .await
        .unwrap();
    let refused = client
        .update_plan(pb::UpdatePlanRequest {
            plan_json: full_coverage("2", 5),
            expected_version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&refused), expected);

    // A replica whose committee has two roles loads the stored `gte 4`, not evaluable.
    let shrunk = Replica::start_with(
        &backend,
        r#"
        [[buying_roles]]
        name = "decision maker"
        filled_by = ["vp"]
        [[buying_roles]]
        name = "finance"
        filled_by = ["cfo"]
        "#,
    )
    .await;
    let plan = shrunk
        .client()
        .get_plan(pb::GetPlanRequest {
            name: "full_coverage".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    assert_eq!(plan.version, "1");
    assert!(
        plan.rules[1].description.starts_with(
            "not evaluable: rule \"full\": buying_roles_covered gte 4 needs more buying roles \
             than the buying committee has (2; "
        ),
        "{:?}",
        plan.rules[1]
    );
    assert!(!plan.rules[0].description.contains("not evaluable"));
    backend.db.close().await;
}
