//! Account-level scores end to end in `tessera dev`, with the ready plans as config: group calls
//! of two people with different buying roles raise the account's buying-role coverage and its
//! `icp_fit_b2b_account` score, read back through `GetAccount` (and the Profile API's accounts
//! collection) with the factors that explain it.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_proto::common::v1::{Event, EventType};
use tessera_proto::convert::json_map_to_struct;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::profile::v1::{Account, GetAccountRequest};
use tessera_tests::TesseraBuilder;
use tessera_tests::auth::Channel;
use tessera_tests::events::send;
use tessera_tests::http::get;

const WAIT: Duration = Duration::from_secs(30);
const PLANS: &str = include_str!("../../services/scoring/plans/ready-plans.toml");
const PLAN: &str = "icp_fit_b2b_account";

/// A group call of `user` naming `acme`, with account `traits` and the person's `role`.
fn group(id: &str, user: &str, role: &str, traits: serde_json::Value, seconds: i64) -> Event {
    Event {
        message_id: id.to_owned(),
        r#type: EventType::Group.into(),
        user_id: user.to_owned(),
        group_id: "acme".to_owned(),
        traits: traits.as_object().map(json_map_to_struct),
        context: json!({"traits": {"role": role}})
            .as_object()
            .map(json_map_to_struct),
        timestamp: Some(prost_types::Timestamp {
            seconds: 1_790_000_000 + seconds,
            nanos: 0,
        }),
        ..Event::default()
    }
}

/// Polls `GetAccount("acme")` until `done` holds; panics with the last answer after [`WAIT`].
async fn account_until(channel: &Channel, done: impl Fn(&Account) -> bool) -> Account {
    let mut client = ProfileServiceClient::new(channel.clone());
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(response) = client
            .get_account(GetAccountRequest {
                account_id: "acme".into(),
            })
            .await
        {
            let account = response.into_inner().account.expect("account");
            if done(&account) {
                return account;
            }
            last = Some(account);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("acme never got there: {last:#?}");
}

fn factors(account: &Account) -> Vec<(String, f64)> {
    account.scores[PLAN]
        .factors
        .iter()
        .map(|f| (f.name.clone(), f.value))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn group_calls_of_two_buying_roles_raise_the_accounts_coverage_and_score() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("tessera.toml");
    std::fs::write(&config, PLANS).unwrap();
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

    // A technical evaluator of a 500-person software company in the US, $20M revenue.
    send(
        &channel,
        tessera.dev_write_key(),
        vec![group(
            "g1",
            "u1",
            "technical evaluator",
            json!({"industry": "software", "employees": 500, "annual_revenue": 20_000_000, "country": "US"}),
            0,
        )],
    )
    .await
    .expect("send");
    let one = account_until(&channel, |a| a.scores.contains_key(PLAN)).await;
    assert_eq!(one.member_count, 1);
    let score = &one.scores[PLAN];
    assert_eq!(score.model_version, "icp_fit_b2b_account@1");
    // 20 (industry) + 20 (200–999 employees) + 10 (revenue) + 10 (country) + 10 (one role).
    assert_eq!(score.value, 70.0, "{:#?}", score.factors);
    assert!(
        factors(&one).contains(&("buying_committee_1".to_owned(), 10.0)),
        "{:?}",
        factors(&one)
    );
    // Account scores are not person scores.
    assert!(!one.scores.contains_key("icp_fit_b2b"));

    // A decision maker of the same account, through a group call without account traits.
    send(
        &channel,
        tessera.dev_write_key(),
        vec![group("g2", "u2", "decision maker", json!({}), 10)],
    )
    .await
    .expect("send");
    let two = account_until(&channel, |a| {
        a.member_count == 2 && a.scores[PLAN].value > 70.0
    })
    .await;
    let score = &two.scores[PLAN];
    assert_eq!(score.value, 80.0, "{:#?}", score.factors);
    let names = factors(&two);
    assert!(
        names.contains(&("buying_committee_2".to_owned(), 20.0)),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|(n, _)| n == "buying_committee_1"),
        "coverage bands are exclusive: {names:?}"
    );
    let grade = score
        .factors
        .iter()
        .find(|f| f.name == "grade")
        .expect("grade");
    assert_eq!(grade.description, "grade A: a score of 75 or more");
    assert!(two.version > one.version);

    // The Profile API's accounts collection shows the same scores.
    let token = tessera
        .access_token
        .clone()
        .expect("tessera dev prints a token");
    let (status, _, body) = get(
        &tessera.http_addr,
        "/v1/spaces/default/collections/accounts/profiles/group_id:acme/scores",
        Some(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let shown = &body["scores"][PLAN];
    assert_eq!(shown["value"], json!(80.0), "{body}");
    assert_eq!(shown["model_version"], json!("icp_fit_b2b_account@1"));
    assert!(
        shown["factors"]
            .as_array()
            .expect("factors")
            .iter()
            .any(|f| f["name"] == json!("buying_committee_2")),
        "{body}"
    );
}
