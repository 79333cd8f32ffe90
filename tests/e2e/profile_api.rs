//! The Segment-compatible Profile API and the timeline end to end in `tessera dev`: events sent
//! through ingestion are read back over plain HTTP as Segment's Profile API answers them
//! (traits, external ids, events, metadata, links, with cursors), and over gRPC with
//! `ListProfileEvents`; bad credentials and bad requests get JSON errors.

use std::time::Duration;

use serde_json::json;
use tessera_proto::common::v1::Event;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::profile::v1::{
    BatchGetProfilesRequest, ExportProfileRequest, GetProfileRequest, ListProfileEventsRequest,
    export_profile_request, get_profile_request, list_profile_events_request,
};
use tessera_tests::TesseraBuilder;
use tessera_tests::events::{identify, send, track, wait_for};
use tessera_tests::http::get;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

/// `event` at `seconds` after a fixed time.
fn at(mut event: Event, seconds: i64) -> Event {
    event.timestamp = Some(prost_types::Timestamp {
        seconds: 1_790_000_000 + seconds,
        nanos: 0,
    });
    event
}

#[tokio::test(flavor = "multi_thread")]
async fn the_profile_api_answers_like_segments_over_tessera_dev() {
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let token = tessera
        .access_token
        .clone()
        .expect("tessera dev prints the Profile API token");
    let channel = tessera.channel().await;
    send(
        &channel,
        tessera.dev_write_key(),
        vec![
            at(
                identify(
                    "m1",
                    "u1",
                    "a1",
                    json!({"name": "Ann", "plan": "pro", "email": "ann@x.io"}),
                ),
                0,
            ),
            at(
                track("m2", "", "a1", "Product Viewed", json!({"sku": "a"})),
                10,
            ),
            at(
                track("m3", "u1", "", "Order Completed", json!({"total": 30})),
                20,
            ),
        ],
    )
    .await
    .expect("send");
    let profile = wait_for(&channel, "user_id", "u1", WAIT, |p| p.event_count == 3).await;
    let http = tessera.http_addr.as_str();
    let base = "/v1/spaces/default/collections/users/profiles";

    let (status, _, body) = get(http, &format!("{base}/user_id:u1/traits"), Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["traits"],
        json!({"name": "Ann", "plan": "pro", "email": "ann@x.io"})
    );
    assert_eq!(body["cursor"]["has_more"], json!(false));
    assert_eq!(
        body["cursor"]["url"],
        json!(format!("{base}/user_id:u1/traits"))
    );
    // Any identifier names the profile; include and paging.
    let (_, _, body) = get(
        http,
        &format!("{base}/email:ann@x.io/traits?include=plan,name"),
        Some(&token),
    )
    .await;
    assert_eq!(body["traits"], json!({"name": "Ann", "plan": "pro"}));
    let (_, _, first) = get(
        http,
        &format!("{base}/anonymous_id:a1/traits?limit=2"),
        Some(&token),
    )
    .await;
    assert_eq!(first["traits"], json!({"email": "ann@x.io", "name": "Ann"}));
    assert_eq!(first["cursor"]["has_more"], json!(true));
    let next = first["cursor"]["next"].as_str().unwrap();
    let (_, _, second) = get(
        http,
        &format!("{base}/anonymous_id:a1/traits?limit=2&next={next}"),
        Some(&token),
    )
    .await;
    assert_eq!(second["traits"], json!({"plan": "pro"}));
    assert_eq!(second["cursor"]["has_more"], json!(false));
    let (_, _, verbose) = get(
        http,
        &format!("{base}/user_id:u1/traits?include=plan&verbose=true"),
        Some(&token),
    )
    .await;
    assert_eq!(verbose["traits"]["plan"]["value"], json!("pro"));
    assert!(verbose["traits"]["plan"]["event_id"].is_string());

    let (status, _, body) = get(
        http,
        &format!("{base}/user_id:u1/external_ids"),
        Some(&token),
    )
    .await;
    assert_eq!(status, 200);
    let ids: Vec<(String, String)> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["type"].as_str().unwrap().to_owned(),
                d["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [
            ("anonymous_id".to_owned(), "a1".to_owned()),
            ("email".to_owned(), "ann@x.io".to_owned()),
            ("user_id".to_owned(), "u1".to_owned())
        ]
    );
    assert_eq!(body["data"][0]["collection"], json!("users"));

    // Events: newest first, from every identity, with what each was.
    let (status, _, body) = get(http, &format!("{base}/user_id:u1/events"), Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    let events = body["data"].as_array().unwrap();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or(e["type"].as_str().unwrap()))
        .collect();
    assert_eq!(names, ["Order Completed", "Product Viewed", "identify"]);
    assert_eq!(events[0]["type"], json!("track"));
    assert_eq!(events[0]["message_id"], json!("m3"));
    assert_eq!(events[0]["properties"], json!({"total": 30}));
    assert_eq!(events[1]["properties"], json!({"sku": "a"}));
    assert_eq!(events[2]["traits"]["plan"], json!("pro"));
    assert_eq!(events[0]["related"]["users"], json!(profile.profile_id));
    let (_, _, only) = get(
        http,
        &format!("{base}/user_id:u1/events?include=Product%20Viewed"),
        Some(&token),
    )
    .await;
    assert_eq!(only["data"].as_array().unwrap().len(), 1);
    let (_, _, page) = get(
        http,
        &format!("{base}/user_id:u1/events?limit=2"),
        Some(&token),
    )
    .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["cursor"]["has_more"], json!(true));
    let next = page["cursor"]["next"].as_str().unwrap();
    let (_, _, rest) = get(
        http,
        &format!("{base}/user_id:u1/events?limit=2&next={next}"),
        Some(&token),
    )
    .await;
    assert_eq!(rest["data"][0]["message_id"], json!("m1"));
    assert_eq!(rest["cursor"]["has_more"], json!(false));

    let (status, _, body) = get(http, &format!("{base}/user_id:u1/metadata"), Some(&token)).await;
    assert_eq!(status, 200);
    assert!(body["metadata"]["created_at"].is_string());
    let (status, _, body) = get(http, &format!("{base}/user_id:u1/links"), Some(&token)).await;
    assert_eq!((status, body["data"].clone()), (200, json!([])));

    // The same timeline over gRPC.
    let mut profiles = ProfileServiceClient::new(channel.clone());
    let by_identifier = |kind: &str, value: &str| GetProfileRequest {
        lookup: Some(get_profile_request::Lookup::Identifier(
            tessera_proto::common::v1::Identifier {
                r#type: kind.into(),
                value: value.into(),
            },
        )),
        as_of: None,
        read_mask: None,
    };
    let listed = profiles
        .list_profile_events(ListProfileEventsRequest {
            lookup: Some(list_profile_events_request::Lookup::ProfileId(
                profile.profile_id.clone(),
            )),
            types: vec!["track".into()],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = listed
        .events
        .iter()
        .map(|e| e.event.as_ref().unwrap().message_id.as_str())
        .collect();
    assert_eq!(ids, ["m3", "m2"]);
    let refused = profiles
        .list_profile_events(ListProfileEventsRequest {
            lookup: Some(list_profile_events_request::Lookup::ProfileId(
                profile.profile_id.clone(),
            )),
            page_token: "garbage".into(),
            types: vec!["tracks".into()],
            ..Default::default()
        })
        .await
        .expect_err("invalid");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("page_token") && refused.message().contains("types[0]"),
        "{}",
        refused.message()
    );

    // Many at once: each lookup gets its result in its place.
    let batch = profiles
        .batch_get_profiles(BatchGetProfilesRequest {
            lookups: vec![
                by_identifier("email", "Ann@X.io"),
                by_identifier("email", "nobody@x.io"),
                GetProfileRequest {
                    lookup: Some(get_profile_request::Lookup::ProfileId(String::new())),
                    as_of: None,
                    read_mask: None,
                },
            ],
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(batch.results.len(), 3);
    assert_eq!(
        batch.results[0]
            .profile
            .as_ref()
            .map(|p| p.profile_id.as_str()),
        Some(profile.profile_id.as_str())
    );
    assert_eq!(batch.results[1].error, "not found");
    assert!(
        batch.results[2].error.contains("profile_id"),
        "{:?}",
        batch.results[2]
    );
    let refused = profiles
        .batch_get_profiles(BatchGetProfilesRequest { lookups: vec![] })
        .await
        .expect_err("no lookups");
    assert_eq!(refused.code(), Code::InvalidArgument);

    // Everything held about the person (GDPR right of access), over gRPC and the CLI.
    let export = profiles
        .export_profile(ExportProfileRequest {
            lookup: Some(export_profile_request::Lookup::Identifier(
                tessera_proto::common::v1::Identifier {
                    r#type: "anonymous_id".into(),
                    value: "a1".into(),
                },
            )),
        })
        .await
        .expect("export")
        .into_inner();
    assert_eq!(export.profile_id, profile.profile_id);
    let document: serde_json::Value = serde_json::from_slice(&export.document).expect("JSON");
    assert_eq!(document["profile"]["traits"]["plan"]["value"], json!("pro"));
    assert_eq!(document["events"].as_array().unwrap().len(), 3);
    assert_eq!(document["events"][0]["event"], json!("Order Completed"));
    let graph_ids: Vec<&str> = document["identity_graph"]["identifiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["identifier"]["value"].as_str().unwrap())
        .collect();
    assert!(
        graph_ids.contains(&"ann@x.io") && graph_ids.contains(&"u1"),
        "{graph_ids:?}"
    );
    assert!(
        !document["identity_graph"]["decisions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let cli = tokio::process::Command::new(tessera_tests::tessera_bin())
        .args([
            "profiles",
            "export",
            "user_id:u1",
            "--target",
            &tessera.grpc_url(),
        ])
        .env_clear()
        .env("TESSERA_ACCESS_TOKEN", tessera_tests::E2E_TOKEN)
        .output()
        .await
        .expect("run tessera profiles export");
    assert!(cli.status.success(), "{cli:?}");
    let from_cli: serde_json::Value = serde_json::from_slice(&cli.stdout).expect("JSON on stdout");
    assert_eq!(from_cli["profile"], document["profile"]);
    let missing = tokio::process::Command::new(tessera_tests::tessera_bin())
        .args([
            "profiles",
            "export",
            "user_id:nobody",
            "--target",
            &tessera.grpc_url(),
        ])
        .env_clear()
        .env("TESSERA_ACCESS_TOKEN", tessera_tests::E2E_TOKEN)
        .output()
        .await
        .expect("run tessera profiles export");
    assert!(!missing.status.success());

    // As of a past time: the profile exactly as it was then.
    let before = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(20)).await;
    send(
        &channel,
        tessera.dev_write_key(),
        vec![identify("m9", "u1", "", json!({"plan": "enterprise"}))],
    )
    .await
    .expect("send");
    wait_for(&channel, "user_id", "u1", WAIT, |p| p.event_count == 4).await;
    let at = |t: time::OffsetDateTime| {
        let mut request = by_identifier("user_id", "u1");
        request.as_of = Some(tessera_proto::convert::to_timestamp(t));
        request
    };
    let then = profiles
        .get_profile(at(before))
        .await
        .expect("as of")
        .into_inner()
        .profile
        .expect("profile");
    assert_eq!(then.event_count, 3);
    assert_eq!(
        then.traits["plan"]
            .value
            .as_ref()
            .map(tessera_proto::convert::value_to_json),
        Some(json!("pro"))
    );
    let too_old = profiles
        .get_profile(at(before - time::Duration::days(40)))
        .await
        .expect_err("beyond the kept history");
    assert_eq!(too_old.code(), Code::InvalidArgument);
    assert!(too_old.message().contains("as_of"));

    // Errors: JSON, with the status a client expects.
    let (status, head, body) = get(http, &format!("{base}/user_id:u1/traits"), None).await;
    assert_eq!(status, 401);
    assert!(head.contains("www-authenticate: basic"), "{head}");
    assert_eq!(body["error"]["code"], json!("unauthorized"));
    let (status, _, _) = get(
        http,
        &format!("{base}/user_id:u1/traits"),
        Some("tpa_wrong_token_0000"),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, body) = get(
        http,
        &format!("{base}/email:nobody@x.io/traits"),
        Some(&token),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("not_found"))
    );
    let (status, _, body) = get(http, &format!("{base}/u1/traits"), Some(&token)).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("invalid_request"))
    );
    let (status, _, body) = get(
        http,
        &format!("{base}/user_id:u1/traits?limit=0"),
        Some(&token),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("limit"));
    let (status, _, _) = get(http, &format!("{base}/user_id:u1/everything"), Some(&token)).await;
    assert_eq!(status, 404);
    let (status, _, _) = get(
        http,
        "/v1/spaces/other/collections/users/profiles/user_id:u1/traits",
        Some(&token),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _, body) = get(
        http,
        &format!("{base}/user_id:u1/events?start=yesterday"),
        Some(&token),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

/// Group calls make account profiles: their traits over the Profile API's accounts collection
/// and `GetAccount`, their people as links both ways and through `ListAccountMembers`, and each
/// person's role on their profile.
#[tokio::test(flavor = "multi_thread")]
async fn accounts_are_profiles_of_their_own() {
    use tessera_proto::common::v1::EventType;
    use tessera_proto::convert::json_map_to_struct;
    use tessera_proto::profile::v1::{GetAccountRequest, ListAccountMembersRequest};
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let token = tessera.access_token.clone().expect("token");
    let channel = tessera.channel().await;
    let group = |id: &str, user: &str, role: &str, traits: serde_json::Value| Event {
        message_id: id.to_owned(),
        r#type: EventType::Group.into(),
        user_id: user.to_owned(),
        group_id: "acme".to_owned(),
        traits: traits.as_object().map(json_map_to_struct),
        context: json!({"traits": {"role": role, "title": "VP"}})
            .as_object()
            .map(json_map_to_struct),
        ..Event::default()
    };
    send(
        &channel,
        tessera.dev_write_key(),
        vec![
            at(
                group(
                    "g1",
                    "u1",
                    "finance",
                    json!({"industry": "retail", "employees": 120}),
                ),
                0,
            ),
            at(
                group("g2", "u2", "decision maker", json!({"plan": "enterprise"})),
                5,
            ),
        ],
    )
    .await
    .expect("send");
    let ann = wait_for(&channel, "user_id", "u1", WAIT, |p| {
        p.accounts.contains_key("acme")
    })
    .await;
    assert_eq!(ann.accounts["acme"].role, "finance");
    assert_eq!(ann.accounts["acme"].title, "VP");
    wait_for(&channel, "user_id", "u2", WAIT, |p| {
        p.accounts.contains_key("acme")
    })
    .await;

    let mut profiles = ProfileServiceClient::new(channel.clone());
    let account = profiles
        .get_account(GetAccountRequest {
            account_id: "acme".into(),
        })
        .await
        .expect("account")
        .into_inner()
        .account
        .expect("account");
    assert_eq!(account.member_count, 2);
    let industry = account.traits["industry"].value.clone().expect("value");
    assert_eq!(
        tessera_proto::convert::value_to_json(&industry),
        json!("retail")
    );
    let members = profiles
        .list_account_members(ListAccountMembersRequest {
            account_id: "acme".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("members")
        .into_inner();
    assert_eq!(members.members.len(), 1);
    assert!(!members.next_page_token.is_empty());
    let missing = profiles
        .get_account(GetAccountRequest {
            account_id: "initech".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(missing.code(), Code::NotFound);

    let http = &tessera.http_addr;
    let accounts = "/v1/spaces/default/collections/accounts/profiles";
    let (status, _, body) = get(
        http,
        &format!("{accounts}/group_id:acme/traits"),
        Some(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["traits"]["industry"], json!("retail"));
    assert_eq!(body["traits"]["plan"], json!("enterprise"));
    let (status, _, body) = get(
        http,
        &format!("{accounts}/group_id:acme/links"),
        Some(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"][0]["to_collection"], json!("users"));
    assert_eq!(
        body["data"][0]["external_ids"].as_array().map(Vec::len),
        Some(2)
    );
    let (status, _, body) = get(
        http,
        "/v1/spaces/default/collections/users/profiles/user_id:u1/links",
        Some(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"][0]["to_collection"], json!("accounts"));
    assert_eq!(body["data"][0]["external_ids"][0]["id"], json!("acme"));
    let (status, _, body) = get(
        http,
        &format!("{accounts}/group_id:nope/traits"),
        Some(&token),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("not_found"))
    );
    let (status, _, _) = get(http, &format!("{accounts}/user_id:u1/traits"), Some(&token)).await;
    assert_eq!(status, 400);
}
