//! The gRPC face, served by the shared server edge on 127.0.0.1:0 and called with the
//! generated client.

use tessera_identity::{Identity, IdentitySettings};
use tessera_proto::common::v1::Identifier;
use tessera_proto::identity::v1::batch_match_service_client::BatchMatchServiceClient;
use tessera_proto::identity::v1::get_profile_graph_request::Lookup;
use tessera_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tessera_proto::identity::v1::{
    GetBatchMatchJobRequest, GetMatchModelRequest, GetProfileGraphRequest, GetRulesRequest,
    IdentityRecord, ListBatchMatchJobsRequest, LookupIdentifierRequest, ResolveIdentitiesRequest,
    RestoreMatchModelRequest, StartBatchMatchRequest, UpdateRulesRequest,
};
use tessera_server::GrpcServices;
use tessera_store::Database;
use tessera_testkit::GrpcTestServer;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::support::connect;

/// A served identity service over SQLite, stopped on drop.
struct Served {
    client: IdentityServiceClient<Channel>,
    db: Database,
    _server: GrpcTestServer,
    _dir: tessera_testkit::TestSqlite,
}

async fn serve(settings: IdentitySettings) -> Served {
    let dir = tessera_testkit::TestSqlite::new();
    let db = connect(&dir.url("identity.db")).await;
    let identity = Identity::new(db.clone(), settings).await.expect("identity");
    let mut services = GrpcServices::default();
    identity.register(&mut services);
    let server = GrpcTestServer::start(services).await;
    Served {
        client: IdentityServiceClient::new(server.channel().await),
        db,
        _server: server,
        _dir: dir,
    }
}

fn id(kind: &str, value: &str) -> Identifier {
    Identifier {
        r#type: kind.into(),
        value: value.into(),
    }
}

fn record(event_id: &str, identifiers: Vec<Identifier>) -> IdentityRecord {
    IdentityRecord {
        event_id: event_id.into(),
        identifiers,
        timestamp: None,
        ..Default::default()
    }
}

#[tokio::test]
async fn resolves_and_looks_up() {
    let mut s = serve(IdentitySettings::default()).await;
    let response = s
        .client
        .resolve_identities(ResolveIdentitiesRequest {
            records: vec![
                record("e1", vec![id("anonymous_id", "a1")]),
                record(
                    "e2",
                    vec![
                        id("email", " Bob@X.io "),
                        id("anonymous_id", "a1"),
                        id("user_id", "null"),
                    ],
                ),
            ],
        })
        .await
        .expect("resolve")
        .into_inner();
    let [first, second] = &response.resolutions[..] else {
        panic!("two resolutions expected");
    };
    assert_eq!(first.profile_id, second.profile_id);
    assert_eq!(second.event_id, "e2");
    assert_eq!(
        second.identifiers,
        [id("email", "bob@x.io"), id("anonymous_id", "a1")]
    );

    let found = s
        .client
        .lookup_identifier(LookupIdentifierRequest {
            identifier: Some(id("email", "BOB@x.io")),
        })
        .await
        .expect("lookup")
        .into_inner();
    assert_eq!(found.profile_id, first.profile_id);
}

#[tokio::test]
async fn validation_errors_name_the_fields() {
    let mut s = serve(IdentitySettings::default()).await;
    let status = s
        .client
        .resolve_identities(ResolveIdentitiesRequest {
            records: vec![
                record("", vec![id("user_id", "u1")]),
                record("e2", vec![id("user_id", "u2"), id("User-ID", "u3")]),
            ],
        })
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    let bad = details.bad_request().expect("a BadRequest detail");
    let fields: Vec<_> = bad
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(
        fields,
        ["records[0].event_id", "records[1].identifiers[1].type"]
    );

    let status = s
        .client
        .lookup_identifier(LookupIdentifierRequest {
            identifier: Some(id("email", "x".repeat(2000).as_str())),
        })
        .await
        .expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    assert_eq!(
        details
            .bad_request()
            .expect("a BadRequest detail")
            .field_violations[0]
            .field,
        "identifier.value"
    );
}

#[tokio::test]
async fn unknown_and_blocked_identifiers_are_not_found() {
    let mut s = serve(IdentitySettings::default()).await;
    for identifier in [id("user_id", "nobody"), id("anonymous_id", "undefined")] {
        let status = s
            .client
            .lookup_identifier(LookupIdentifierRequest {
                identifier: Some(identifier),
            })
            .await
            .expect_err("not found");
        assert_eq!(status.code(), Code::NotFound);
    }
}

#[tokio::test]
async fn oversized_batches_are_resource_exhausted() {
    let mut s = serve(IdentitySettings {
        max_batch: 2,
        ..IdentitySettings::default()
    })
    .await;
    let records = (0..3)
        .map(|n| record(&format!("e{n}"), vec![id("user_id", "u")]))
        .collect();
    let status = s
        .client
        .resolve_identities(ResolveIdentitiesRequest { records })
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().starts_with("records:"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable_and_says_nothing_internal() {
    let mut s = serve(IdentitySettings::default()).await;
    s.db.close().await;
    let status = s
        .client
        .resolve_identities(ResolveIdentitiesRequest {
            records: vec![record("e1", vec![id("user_id", "u1")])],
        })
        .await
        .expect_err("unavailable");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "a dependency is unavailable, retry later");
    assert!(status.get_error_details().retry_info().is_some());
}

#[tokio::test]
async fn profile_graphs_and_rules_are_served() {
    let mut s = serve(IdentitySettings::default()).await;
    let resolved = s
        .client
        .resolve_identities(ResolveIdentitiesRequest {
            records: vec![
                record("e1", vec![id("anonymous_id", "a1"), id("user_id", "u1")]),
                record("e2", vec![id("anonymous_id", "a1"), id("user_id", "u2")]),
            ],
        })
        .await
        .expect("resolve")
        .into_inner();
    let dropped = &resolved.resolutions[1].dropped;
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].reason, "limit:user_id");
    assert_eq!(dropped[0].identifier, Some(id("anonymous_id", "a1")));

    let graph = s
        .client
        .get_profile_graph(GetProfileGraphRequest {
            lookup: Some(Lookup::Identifier(id("user_id", " u2 "))),
            max_decisions: 0,
        })
        .await
        .expect("graph")
        .into_inner();
    assert_eq!(graph.profile_id, resolved.resolutions[1].profile_id);
    assert_eq!(graph.identifiers.len(), 1);
    assert_eq!(graph.identifiers[0].event_id, "e2");
    let kinds: Vec<&str> = graph.decisions.iter().map(|d| d.kind.as_str()).collect();
    assert_eq!(kinds, ["create", "link", "drop"]);
    assert_eq!(graph.decisions[2].rule, "limit:user_id");
    assert_eq!(graph.decisions[2].rules_version, 1);

    for (request, field) in [
        (
            GetProfileGraphRequest {
                lookup: Some(Lookup::ProfileId("nope".into())),
                max_decisions: 0,
            },
            "profile_id",
        ),
        (
            GetProfileGraphRequest {
                lookup: None,
                max_decisions: 0,
            },
            "lookup",
        ),
        (
            GetProfileGraphRequest {
                lookup: Some(Lookup::ProfileId(uuid::Uuid::nil().to_string())),
                max_decisions: -1,
            },
            "max_decisions",
        ),
    ] {
        let err = s.client.get_profile_graph(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let details = err.get_error_details();
        assert_eq!(
            details.bad_request().expect("details").field_violations[0].field,
            field
        );
    }
    let err = s
        .client
        .get_profile_graph(GetProfileGraphRequest {
            lookup: Some(Lookup::ProfileId(uuid::Uuid::nil().to_string())),
            max_decisions: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let rules = s
        .client
        .get_rules(GetRulesRequest {})
        .await
        .expect("rules")
        .into_inner();
    assert_eq!(rules.version, 1);
    let rules = tessera_proto::convert::struct_to_json_map(&rules.rules.expect("rules"));
    assert_eq!(rules["protected_types"], serde_json::json!(["user_id"]));
    assert_eq!(rules["limits"]["email"]["max"], serde_json::json!(5));
}

/// The fields a status's BadRequest names.
fn violated_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .expect("a BadRequest detail")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

#[tokio::test]
async fn rules_round_trip_through_get_and_update() {
    let mut s = serve(IdentitySettings::default()).await;
    let current = s
        .client
        .get_rules(GetRulesRequest {})
        .await
        .expect("rules")
        .into_inner();
    // Edit what GetRules answered and send it back: limits are numbers on the wire.
    let mut rules = tessera_proto::convert::struct_to_json_map(&current.rules.expect("rules"));
    rules["limits"]["email"]["max"] = serde_json::json!(2);
    rules["blocklist"] =
        serde_json::json!({"email": {"exact": ["noreply@example.com"], "regex": []}});
    let updated = s
        .client
        .update_rules(UpdateRulesRequest {
            rules: Some(tessera_proto::convert::json_map_to_struct(&rules)),
            expected_version: current.version,
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.version, 2);
    let now = tessera_proto::convert::struct_to_json_map(&updated.rules.expect("rules"));
    assert_eq!(now["limits"]["email"]["max"], serde_json::json!(2));
    assert_eq!(
        s.client
            .get_rules(GetRulesRequest {})
            .await
            .expect("rules")
            .into_inner()
            .version,
        2
    );
    let blocked = s
        .client
        .lookup_identifier(LookupIdentifierRequest {
            identifier: Some(id("email", "NoReply@example.com")),
        })
        .await
        .expect_err("blocked");
    assert_eq!(blocked.code(), Code::NotFound);

    // The same version again loses the compare-and-set.
    let stale = s
        .client
        .update_rules(UpdateRulesRequest {
            rules: Some(tessera_proto::convert::json_map_to_struct(&rules)),
            expected_version: current.version,
        })
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(
        stale.message().contains("version 2 is current"),
        "{}",
        stale.message()
    );
}

#[tokio::test]
async fn bad_rule_updates_name_the_problem() {
    let mut s = serve(IdentitySettings::default()).await;
    let update = |rules: serde_json::Value, expected_version| UpdateRulesRequest {
        rules: rules
            .as_object()
            .map(tessera_proto::convert::json_map_to_struct),
        expected_version,
    };
    let cases = [
        (update(serde_json::Value::Null, 0), "rules"),
        (update(serde_json::json!({"limts": {}}), 0), "rules"),
        (
            update(serde_json::json!({"limits": {"email": {"max": "five"}}}), 0),
            "rules",
        ),
        (
            update(
                serde_json::json!({"phone": {"default_region": "Atlantis"}}),
                0,
            ),
            "rules.phone.default_region",
        ),
        (update(serde_json::json!({}), -1), "expected_version"),
    ];
    for (request, field) in cases {
        let status = s.client.update_rules(request).await.expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert_eq!(violated_fields(&status), [field]);
    }
    let unknown = s
        .client
        .update_rules(update(serde_json::json!({"limts": {}}), 0))
        .await
        .expect_err("invalid");
    let details = unknown.get_error_details();
    let message = &details.bad_request().expect("bad request").field_violations[0].description;
    assert!(message.contains("limts"), "{message}");
    assert_eq!(
        s.client
            .get_rules(GetRulesRequest {})
            .await
            .expect("rules")
            .into_inner()
            .version,
        1,
        "nothing was stored"
    );
}

#[tokio::test]
async fn match_model_requests_are_checked() {
    let mut s = serve(IdentitySettings::default()).await;
    let none = s
        .client
        .get_match_model(GetMatchModelRequest { model_version: 0 })
        .await
        .expect_err("no model yet");
    assert_eq!(none.code(), Code::NotFound);
    assert_eq!(none.message(), "no such match model");
    let missing = s
        .client
        .restore_match_model(RestoreMatchModelRequest { model_version: 4 })
        .await
        .expect_err("unknown version");
    assert_eq!(missing.code(), Code::NotFound);
    let negative = s
        .client
        .get_match_model(GetMatchModelRequest { model_version: -1 })
        .await
        .expect_err("invalid");
    assert_eq!(negative.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&negative), ["model_version"]);
    let zero = s
        .client
        .restore_match_model(RestoreMatchModelRequest { model_version: 0 })
        .await
        .expect_err("invalid");
    assert_eq!(zero.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&zero), ["model_version"]);
}

#[tokio::test]
async fn unmerge_requests_are_checked() {
    let mut s = serve(IdentitySettings::default()).await;
    let bad = s
        .client
        .unmerge_profiles(tessera_proto::identity::v1::UnmergeProfilesRequest {
            profile_id: "not-a-uuid".into(),
            reason: "x\0y".into(),
        })
        .await
        .expect_err("invalid");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&bad), ["profile_id", "reason"]);
    let unknown = s
        .client
        .unmerge_profiles(tessera_proto::identity::v1::UnmergeProfilesRequest {
            profile_id: uuid::Uuid::now_v7().to_string(),
            reason: String::new(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn forget_requests_are_checked_and_forgotten_people_suppressed() {
    use tessera_proto::identity::v1::ForgetProfileRequest;
    let mut s = serve(IdentitySettings::default()).await;
    let bad = s
        .client
        .forget_profile(ForgetProfileRequest {
            profile_id: "not-a-uuid".into(),
            reason: "x".repeat(1_001),
        })
        .await
        .expect_err("invalid");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&bad), ["profile_id", "reason"]);
    let unknown = s
        .client
        .forget_profile(ForgetProfileRequest {
            profile_id: uuid::Uuid::now_v7().to_string(),
            reason: String::new(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);

    let resolved = s
        .client
        .resolve_identities(ResolveIdentitiesRequest {
            records: vec![record(
                "e1",
                vec![id("user_id", "u1"), id("anonymous_id", "a1")],
            )],
        })
        .await
        .expect("resolve")
        .into_inner();
    let profile = resolved.resolutions[0].profile_id.clone();
    assert!(!resolved.resolutions[0].suppressed);
    let forgotten = s
        .client
        .forget_profile(ForgetProfileRequest {
            profile_id: profile.clone(),
            reason: "x".repeat(1_000),
        })
        .await
        .expect("forget")
        .into_inner();
    assert_eq!(forgotten.profile_id, profile);
    assert_eq!(forgotten.profile_ids, std::slice::from_ref(&profile));
    assert_eq!(forgotten.event_ids, ["e1"]);
    assert_eq!(forgotten.identifiers, 2);

    let later = s
        .client
        .resolve_identities(ResolveIdentitiesRequest {
            records: vec![record(
                "e2",
                vec![id("user_id", "u1"), id("anonymous_id", "a2")],
            )],
        })
        .await
        .expect("resolve")
        .into_inner();
    let r = &later.resolutions[0];
    assert!(r.suppressed);
    assert_eq!(r.event_id, "e2");
    assert_eq!(r.profile_id, "");
    assert!(r.identifiers.is_empty() && r.merges.is_empty());
    let gone = s
        .client
        .lookup_identifier(LookupIdentifierRequest {
            identifier: Some(id("user_id", "u1")),
        })
        .await
        .expect_err("forgotten");
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn batch_match_job_requests_are_checked() {
    let s = serve(IdentitySettings::default()).await;
    let mut jobs = BatchMatchServiceClient::new(s._server.channel().await);
    for job_id in [0, -3] {
        let bad = jobs
            .get_batch_match_job(GetBatchMatchJobRequest { job_id })
            .await
            .expect_err("invalid");
        assert_eq!(bad.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&bad), ["job_id"]);
    }
    let missing = jobs
        .get_batch_match_job(GetBatchMatchJobRequest { job_id: 7 })
        .await
        .expect_err("unknown");
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(missing.message(), "no such batch match job");
    for limit in [-1, 101] {
        let bad = jobs
            .list_batch_match_jobs(ListBatchMatchJobsRequest { limit })
            .await
            .expect_err("invalid");
        assert_eq!(bad.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&bad), ["limit"]);
    }
    let none = jobs
        .start_batch_match(StartBatchMatchRequest {})
        .await
        .expect_err("no model");
    assert_eq!(none.code(), Code::FailedPrecondition);
    assert!(none.message().contains("TrainMatchModel"), "{none:?}");
    let listed = jobs
        .list_batch_match_jobs(ListBatchMatchJobsRequest { limit: 0 })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.jobs, [], "nothing was started");
}
