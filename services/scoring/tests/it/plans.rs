//! Scoring plans over gRPC: `ListPlans`, plan scores in `ScoreProfiles`, and `ScoreProfile`'s
//! rule-by-rule explanations, with the ready plans (`plans/ready-plans.toml`) as config.

use std::collections::HashMap;

use serde_json::json;
use tessera_core::activity;
use tessera_proto::convert::{json_to_value, to_timestamp};
use tessera_proto::scoring::v1 as pb;
use tessera_proto::scoring::v1::scoring_service_client::ScoringServiceClient;
use tessera_scoring::{Scoring, ScoringSettings};
use tessera_server::GrpcServices;
use tessera_testkit::GrpcTestServer;
use time::OffsetDateTime;
use time::macros::datetime;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const AS_OF: OffsetDateTime = datetime!(2026-05-01 00:00:00 UTC);

struct Server {
    client: ScoringServiceClient<Channel>,
    _server: GrpcTestServer,
}

/// The ready plans, then `more` (TOML under the same `[scoring]` root).
fn ready_plans_and(more: &str) -> ScoringSettings {
    #[derive(serde::Deserialize)]
    struct File {
        scoring: ScoringSettings,
    }
    let text = format!("{}\n{more}", include_str!("../../plans/ready-plans.toml"));
    toml::from_str::<File>(&text).unwrap().scoring
}

impl Server {
    async fn start() -> Self {
        Self::with_settings(&ready_plans_and("")).await
    }

    async fn with_settings(settings: &ScoringSettings) -> Self {
        let mut services = GrpcServices::default();
        Scoring::from_settings(settings)
            .expect("the settings are valid")
            .register(&mut services);
        let server = GrpcTestServer::start(services).await;
        Self {
            client: ScoringServiceClient::new(server.channel().await),
            _server: server,
        }
    }
}

fn values(json: serde_json::Value) -> HashMap<String, prost_types::Value> {
    json.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), json_to_value(v)))
        .collect()
}

/// A B2B lead: firmographics on the account, a technical evaluator, 4 events just now
/// (engagement 55), one demo request.
fn lead(id: &str) -> pb::ProfileFacts {
    let h = activity::DEFAULT_HALF_LIFE_SECONDS;
    pb::ProfileFacts {
        profile_id: id.to_owned(),
        event_count: 4,
        last_seen: Some(to_timestamp(AS_OF)),
        activity_log2: (0..4).fold(None, |acc, _| Some(activity::add_event(acc, AS_OF, h))),
        activity_half_life_seconds: h,
        traits: values(json!({"email": "ann@bigco.com", "country": "DE"})),
        computed_traits: values(json!({"demo_requests": 1})),
        audiences: vec![],
        accounts: vec![pb::AccountFacts {
            account_id: "bigco".to_owned(),
            role: "technical evaluator".to_owned(),
            title: "Staff engineer".to_owned(),
            traits: values(json!({"industry": "fintech", "employees": 1200})),
        }],
        purchases: None,
        ..Default::default()
    }
}

#[tokio::test]
async fn list_plans_answers_the_configured_plans_with_their_versions() {
    let server = Server::start().await;
    let plans = server
        .client
        .clone()
        .list_plans(pb::ListPlansRequest {})
        .await
        .unwrap()
        .into_inner()
        .plans;
    let listed: Vec<_> = plans
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.version.as_str(),
                p.model_version.as_str(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("icp_fit_b2b", "1", "icp_fit_b2b@1"),
            ("icp_fit_b2c", "1", "icp_fit_b2c@1"),
            ("lead_score", "1", "lead_score@1"),
            ("icp_fit_b2b_account", "1", "icp_fit_b2b_account@1"),
        ]
    );
    for plan in &plans {
        let level = if plan.name == "icp_fit_b2b_account" {
            pb::PlanLevel::Account
        } else {
            pb::PlanLevel::Person
        };
        assert_eq!(plan.level, level as i32, "{}", plan.name);
        assert!(plan.scored);
        assert_eq!(plan.max_points, 100.0);
        assert!(!plan.description.is_empty());
        for rule in &plan.rules {
            assert!(!rule.description.is_empty(), "{}", rule.name);
            let condition: serde_json::Value = serde_json::from_str(&rule.condition_json).unwrap();
            assert!(condition.is_object(), "{}", rule.condition_json);
        }
    }
    let b2b = &plans[0];
    assert_eq!(b2b.cap, None);
    let grades: Vec<_> = b2b
        .grades
        .iter()
        .map(|g| (g.grade.as_str(), g.min))
        .collect();
    assert_eq!(grades, [("A", 75.0), ("B", 50.0), ("C", 25.0), ("D", 0.0)]);
    let employees = b2b
        .rules
        .iter()
        .find(|r| r.name == "employees_1000_plus")
        .unwrap();
    assert_eq!(
        (employees.points, employees.group.as_str()),
        (25.0, "employees")
    );
    assert!(employees.condition_json.contains("\"account\""));
    let lead = &plans[2];
    assert_eq!(lead.cap, Some(100.0));
    assert_eq!(lead.grades[0].grade, "hot");
}

#[tokio::test]
async fn score_profiles_adds_each_plans_score_with_its_rule_hits() {
    let server = Server::start().await;
    let response = server
        .client
        .clone()
        .score_profiles(pb::ScoreProfilesRequest {
            profiles: vec![
                lead("ann"),
                pb::ProfileFacts {
                    profile_id: "empty".to_owned(),
                    ..Default::default()
                },
            ],
            as_of: Some(to_timestamp(AS_OF)),
        })
        .await
        .unwrap()
        .into_inner();
    let ann = &response.profiles[0];
    let names: Vec<_> = ann.scores.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["engagement", "icp_fit_b2b", "icp_fit_b2c", "lead_score"]
    );
    let b2b = &ann.scores[1];
    let factors: Vec<_> = b2b
        .factors
        .iter()
        .map(|f| (f.name.as_str(), f.value))
        .collect();
    assert_eq!(
        factors,
        [
            ("target_industry", 20.0),
            ("employees_1000_plus", 25.0),
            ("served_country", 10.0),
            ("technical_evaluator", 15.0),
            ("raw_points", 70.0),
            ("max_points", 100.0),
            ("grade", 50.0),
        ]
    );
    assert_eq!(b2b.value, 70.0);
    assert_eq!(b2b.model_version, "icp_fit_b2b@1");
    assert_eq!(b2b.computed_at, Some(to_timestamp(AS_OF)));
    assert!(b2b.factors.iter().all(|f| !f.description.is_empty()));
    assert!(b2b.factors[6].description.starts_with("grade B"));
    // The lead score reads this call's fit (70: a B) and engagement (55).
    let lead = &ann.scores[3];
    let hits: Vec<_> = lead.factors.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        hits,
        [
            "fit_b",
            "highly_engaged",
            "requested_demo",
            "raw_points",
            "max_points",
            "grade"
        ]
    );
    assert_eq!(lead.value, 25.0 + 30.0 + 30.0);

    // Nothing known: every plan scores 0.
    let empty = &response.profiles[1];
    assert_eq!(empty.scores.len(), 4);
    assert!(empty.scores.iter().all(|s| s.value == 0.0));
}

#[tokio::test]
async fn score_profile_explains_every_rule() {
    let server = Server::start().await;
    let response = server
        .client
        .clone()
        .score_profile(pb::ScoreProfileRequest {
            profile: Some(lead("ann")),
            as_of: Some(to_timestamp(AS_OF)),
        })
        .await
        .unwrap()
        .into_inner();
    let scores = response.scores.unwrap();
    assert_eq!(scores.profile_id, "ann");
    assert_eq!(scores.scores.len(), 4);
    let plans: Vec<_> = response
        .plans
        .iter()
        .map(|p| (p.plan.as_str(), p.value, p.grade.as_str()))
        .collect();
    assert_eq!(
        plans,
        [
            ("icp_fit_b2b", 70.0, "B"),
            ("icp_fit_b2c", 40.0, "C"),
            ("lead_score", 85.0, "hot"),
        ]
    );
    let b2b = &response.plans[0];
    assert_eq!(b2b.rules.len(), 12, "every rule, matched or not");
    let outcome = |name: &str| {
        let r = b2b.rules.iter().find(|r| r.name == name).unwrap();
        (r.matched, r.counted)
    };
    assert_eq!(outcome("employees_1000_plus"), (true, true));
    // 1,200 employees is also 200 or more, but the group's first band counted.
    assert_eq!(outcome("employees_200_999"), (true, false));
    assert_eq!(outcome("decision_maker"), (false, false));
    assert_eq!(outcome("free_email"), (false, false));
    assert_eq!(
        (b2b.raw_points, b2b.uncapped_points, b2b.max_points),
        (70.0, 70.0, 100.0)
    );

    let status = server
        .client
        .clone()
        .score_profile(pb::ScoreProfileRequest {
            profile: None,
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<_> = status
        .get_error_details()
        .bad_request()
        .expect("bad request details")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, ["profile"]);
}

/// With `[scoring.customer_value]` (here the paper's CDNOW fit), a profile with purchases gets
/// `churn_risk` and `predicted_value` with their inputs as factors, and a plan can read them;
/// a profile without purchases gets neither; an impossible purchase history is refused.
#[tokio::test]
async fn customer_value_scores_follow_the_purchases() {
    let settings: ScoringSettings = toml::from_str(
        r#"
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

        [[plans]]
        name = "at_risk"
        version = "1"
        rules = [{ name = "churning", points = 10, condition = { score = { name = "churn_risk", op = "gte", value = 50 } } }]
        "#,
    )
    .expect("settings parse");
    let mut services = GrpcServices::default();
    Scoring::from_settings(&settings)
        .expect("valid")
        .register(&mut services);
    let server = GrpcTestServer::start(services).await;
    let mut client = ScoringServiceClient::new(server.channel().await);
    // Three purchase days: days 0, 213 and (as of) 272 days after the first.
    let as_of_day = AS_OF.unix_timestamp() / 86_400;
    let buyer = pb::ProfileFacts {
        purchases: Some(pb::PurchaseHistory {
            first_day: as_of_day - 272,
            last_day: as_of_day - 59,
            days: 3,
            repeat_revenue: 80.0,
            revenue: 100.0,
        }),
        ..lead("buyer")
    };
    let scored = client
        .score_profiles(pb::ScoreProfilesRequest {
            profiles: vec![buyer.clone(), lead("window-shopper")],
            as_of: Some(to_timestamp(AS_OF)),
        })
        .await
        .unwrap()
        .into_inner()
        .profiles;
    let names =
        |i: usize| -> Vec<String> { scored[i].scores.iter().map(|s| s.name.clone()).collect() };
    assert_eq!(
        names(0),
        ["engagement", "churn_risk", "predicted_value", "at_risk"]
    );
    assert_eq!(names(1), ["engagement", "at_risk"]);
    let churn = &scored[0].scores[1];
    assert!(churn.value > 0.0 && churn.value < 100.0, "{churn:?}");
    assert_eq!(churn.model_version, "bg-nbd-gamma-gamma-v1@cdnow-1997");
    let factor = |name: &str| {
        scored[0].scores[2]
            .factors
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    };
    assert_eq!(factor("frequency"), Some(2.0));
    assert_eq!(factor("average_spend"), Some(40.0));
    assert_eq!(
        factor("expected_purchases").map(|v| format!("{v:.3}")),
        Some("1.226".to_owned()),
        "the paper's customer"
    );
    assert!(scored[0].scores[2].value > 0.0);

    let bad = client
        .score_profiles(pb::ScoreProfilesRequest {
            profiles: vec![pb::ProfileFacts {
                purchases: Some(pb::PurchaseHistory {
                    first_day: 10,
                    last_day: 5,
                    days: 2,
                    repeat_revenue: 1.0,
                    revenue: 2.0,
                }),
                ..lead("bad")
            }],
            as_of: Some(to_timestamp(AS_OF)),
        })
        .await
        .expect_err("impossible history");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let details = bad.get_details_bad_request().expect("details");
    assert!(
        details.field_violations[0].field.ends_with("purchases"),
        "{details:?}"
    );
}

fn member(id: &str, role: &str) -> pb::AccountMemberFacts {
    pb::AccountMemberFacts {
        profile_id: id.to_owned(),
        role: role.to_owned(),
        title: String::new(),
    }
}

/// `ScoreAccounts` scores accounts with the account-level ready plan: firmographics and
/// buying-role coverage derived from the members, explained rule by rule; person plans never
/// score an account. Bad requests name their fields.
#[tokio::test]
async fn score_accounts_scores_coverage_with_the_account_plan() {
    let server = Server::start().await;
    let account = |members| pb::AccountProfileFacts {
        account_id: "bigco".to_owned(),
        traits: values(json!({"industry": "fintech", "employees": 1200, "country": "DE"})),
        members,
    };
    let score = |members| {
        let mut client = server.client.clone();
        async move {
            client
                .score_accounts(pb::ScoreAccountsRequest {
                    accounts: vec![account(members)],
                    as_of: Some(to_timestamp(AS_OF)),
                })
                .await
                .unwrap()
                .into_inner()
                .accounts
                .remove(0)
        }
    };
    let one = score(vec![member("p1", "technical evaluator")]).await;
    assert_eq!(one.account_id, "bigco");
    let names: Vec<_> = one.scores.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["icp_fit_b2b_account"]);
    // 20 (industry) + 25 (1,000+ employees) + 10 (country) + 10 (one buying role).
    assert_eq!(one.scores[0].value, 65.0);
    assert_eq!(one.scores[0].model_version, "icp_fit_b2b_account@1");
    assert_eq!(one.scores[0].computed_at, Some(to_timestamp(AS_OF)));
    let factors: Vec<_> = one.scores[0]
        .factors
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert!(factors.contains(&"buying_committee_1"), "{factors:?}");
    let plan = &one.plans[0];
    assert_eq!(plan.plan, "icp_fit_b2b_account");
    let coverage: Vec<_> = plan
        .rules
        .iter()
        .filter(|r| r.group == "coverage")
        .map(|r| (r.name.as_str(), r.matched))
        .collect();
    assert_eq!(
        coverage,
        [
            ("buying_committee_3_plus", false),
            ("buying_committee_2", false),
            ("buying_committee_1", true),
        ]
    );

    let three = score(vec![
        member("p1", "technical evaluator"),
        member("p2", "Decision_Maker"),
        member("p3", "procurement"),
    ])
    .await;
    assert_eq!(three.scores[0].value, 85.0);
    assert_eq!(plan.grade, "B");
    assert_eq!(three.plans[0].grade, "A");

    let bad = server
        .client
        .clone()
        .score_accounts(pb::ScoreAccountsRequest {
            accounts: vec![
                account(vec![]),
                pb::AccountProfileFacts {
                    account_id: String::new(),
                    traits: HashMap::new(),
                    members: vec![member("", "champion")],
                },
            ],
            as_of: None,
        })
        .await
        .expect_err("invalid");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let fields: Vec<_> = bad
        .get_details_bad_request()
        .expect("details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(
        fields,
        [
            "accounts[1].account_id",
            "accounts[1].members[0].profile_id"
        ]
    );
}

/// `[[scoring.buying_roles]]` replaces the default committee in `ScoreAccounts`: the same
/// members cover other buying roles, so `buying_roles_covered`, `buying_roles` and the ready
/// account plan's score change; spellings of one role count once. The ready account plan counts
/// coverage of whichever committee is configured, so it starts with either.
#[tokio::test]
async fn a_declared_buying_committee_changes_coverage_and_the_account_score() {
    // Reads the derived facts directly, beside the ready account plan; `role` is a buying role
    // of the committee it runs with (a plan naming another is refused at start).
    let probe = |role: &str| {
        format!(
            r#"
            [[scoring.plans]]
            name = "committee_probe"
            version = "1"
            level = "account"
            rules = [
              {{ name = "three_covered", points = 10, condition = {{ trait = {{ name = "buying_roles_covered", op = "eq", value = 3 }} }} }},
              {{ name = "two_covered", points = 10, condition = {{ trait = {{ name = "buying_roles_covered", op = "eq", value = 2 }} }} }},
              {{ name = "role_known", points = 10, condition = {{ trait = {{ name = "buying_roles", op = "contains", value = "{role}" }} }} }},
            ]
            "#
        )
    };
    const COMMITTEE: &str = r#"
        [[scoring.buying_roles]]
        name = "Decision_Maker"
        filled_by = ["decision maker", "economic buyer", "VP"]

        [[scoring.buying_roles]]
        name = "security reviewer"
        filled_by = ["ciso", "security"]

        [[scoring.buying_roles]]
        name = "champion"
        filled_by = ["champion"]

        [[scoring.buying_roles]]
        name = "user"
        filled_by = ["power user", "end-user"]
    "#;
    let default = Server::with_settings(&ready_plans_and(&probe("technical evaluator"))).await;
    let declared = ready_plans_and(&format!("{}\n{COMMITTEE}", probe("security reviewer")));
    assert_eq!(declared.buying_roles.as_ref().map(Vec::len), Some(4));
    let custom = Server::with_settings(&declared).await;
    // The technical evaluator is not a buying role of the declared committee: a plan naming
    // it is refused at start, naming the plan, the rule, the role and the known roles.
    let refused = Scoring::from_settings(&ready_plans_and(&format!(
        "{}\n{COMMITTEE}",
        probe("technical evaluator")
    )))
    .unwrap_err()
    .to_string();
    assert_eq!(
        refused,
        "scoring.plans[4] (\"committee_probe\"): rule \"role_known\": buying role \
         \"technical evaluator\" is not in the buying committee, so the rule could never match \
         (known buying roles: \"decision maker\", \"security reviewer\", \"champion\", \"user\")"
    );

    let request = || pb::ScoreAccountsRequest {
        accounts: vec![pb::AccountProfileFacts {
            account_id: "bigco".to_owned(),
            traits: values(json!({"industry": "fintech", "employees": 1200, "country": "DE"})),
            members: vec![
                member("p1", "VP"),
                member("p2", "economic_buyer"),
                member("p3", "CISO"),
                member("p4", "Power-User"),
                member("p5", "technical evaluator"),
            ],
        }],
        as_of: Some(to_timestamp(AS_OF)),
    };
    let score = |server: &Server| {
        let mut client = server.client.clone();
        async move {
            client
                .score_accounts(request())
                .await
                .unwrap()
                .into_inner()
                .accounts
                .remove(0)
        }
    };
    let counted = |account: &pb::AccountScores, plan: &str| -> Vec<String> {
        account
            .plans
            .iter()
            .find(|p| p.plan == plan)
            .unwrap()
            .rules
            .iter()
            .filter(|r| r.counted)
            .map(|r| r.name.clone())
            .collect()
    };

    let coverage = |account: &pb::AccountScores| -> Vec<String> {
        counted(account, "icp_fit_b2b_account")
            .into_iter()
            .filter(|r| r.starts_with("buying_committee"))
            .collect()
    };

    // The default committee: the economic buyer (a decision maker) and the technical evaluator
    // cover two roles; VP, CISO and power user fill none.
    let before = score(&default).await;
    assert_eq!(
        counted(&before, "committee_probe"),
        ["two_covered", "role_known"]
    );
    assert_eq!(coverage(&before), ["buying_committee_2"]);
    // 20 (industry) + 25 (1,000+ employees) + 10 (country) + 20 (two buying roles).
    assert_eq!(before.scores[0].name, "icp_fit_b2b_account");
    assert_eq!(before.scores[0].value, 75.0);

    // The declared committee: the VP and the economic buyer fill one role (counted once), the
    // CISO and the power user two more; the technical evaluator fills none.
    let after = score(&custom).await;
    assert_eq!(
        counted(&after, "committee_probe"),
        ["three_covered", "role_known"]
    );
    assert_eq!(coverage(&after), ["buying_committee_3_plus"]);
    // 20 + 25 + 10 + 30 (three buying roles or more).
    assert_eq!(after.scores[0].value, 85.0);
    assert!(
        after.scores[0]
            .factors
            .iter()
            .any(|f| f.name == "buying_committee_3_plus" && f.value == 30.0)
    );
}
