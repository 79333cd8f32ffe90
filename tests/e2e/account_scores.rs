//! Account-level scores end to end in `tessera dev`, with the ready plans as config: group calls
//! of two people with different buying roles raise the account's buying-role coverage and its
//! `icp_fit_b2b_account` score, read back through `GetAccount` (and the Profile API's accounts
//! collection) with the factors that explain it. Account traits and account computed traits
//! reach every member's audiences.

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

const ACCOUNT_CONFIG: &str = r#"
[[profile.account_computed_traits]]
name = "orders"
kind = "count"
events = ["Order Completed"]

[[profile.audiences]]
name = "software_accounts"
condition = { account = { name = "industry", op = "eq", value = "software" } }

[[scoring.plans]]
name = "active_account"
version = "1"
level = "account"

[[scoring.plans.rules]]
name = "two_orders"
points = 50
condition = { trait = { name = "orders", op = "gte", value = 2 } }

[[scoring.plans.rules]]
name = "known"
points = 50
condition = { trait = { name = "member_count", op = "gte", value = 1 } }
"#;

/// An account trait set by one member reaches the other member's audiences (through the
/// account refresh), and an account computed trait folds the orders of every member: read
/// through `GetAccount` and the Profile API, and scored by an account plan.
#[tokio::test(flavor = "multi_thread")]
async fn account_traits_reach_every_members_audiences_and_account_computed_traits_score() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("tessera.toml");
    std::fs::write(&config, ACCOUNT_CONFIG).unwrap();
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
    let key = tessera.dev_write_key();

    // u2 joins acme first; then u1's call makes acme a software company.
    send(
        &channel,
        key,
        vec![group("g1", "u2", "champion", json!({}), 0)],
    )
    .await
    .expect("send");
    account_until(&channel, |a| a.member_count == 1).await;
    let u2 = tessera_tests::events::get_by(&channel, "user_id", "u2")
        .await
        .expect("u2");
    assert!(u2.audiences.is_empty(), "{:?}", u2.audiences);
    send(
        &channel,
        key,
        vec![group(
            "g2",
            "u1",
            "finance",
            json!({"industry": "software"}),
            10,
        )],
    )
    .await
    .expect("send");
    let in_audience =
        |p: &tessera_proto::profile::v1::Profile| p.audiences == ["software_accounts".to_owned()];
    tessera_tests::events::wait_for(&channel, "user_id", "u1", WAIT, in_audience).await;
    tessera_tests::events::wait_for(&channel, "user_id", "u2", WAIT, in_audience).await;

    // Orders of both members count for the account, and its plan scores them.
    let order = |id: &str, user: &str| {
        tessera_tests::events::track(id, user, "", "Order Completed", json!({"total": 10}))
    };
    send(&channel, key, vec![order("o1", "u1"), order("o2", "u2")])
        .await
        .expect("send");
    let orders = |a: &Account| {
        a.computed_traits
            .get("orders")
            .and_then(|t| t.value.as_ref())
            .map(tessera_proto::convert::value_to_json)
    };
    let account = account_until(&channel, |a| {
        orders(a) == Some(json!(2))
            && a.scores
                .get("active_account")
                .is_some_and(|s| s.value == 100.0)
    })
    .await;
    assert_eq!(account.member_count, 2);

    // The Profile API lists the account computed trait with the account's traits.
    let token = tessera
        .access_token
        .clone()
        .expect("tessera dev prints a token");
    let (status, _, body) = get(
        &tessera.http_addr,
        "/v1/spaces/default/collections/accounts/profiles/group_id:acme/traits",
        Some(&token),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["traits"]["orders"], json!(2), "{body}");
    assert_eq!(body["traits"]["industry"], json!("software"), "{body}");
}

const BUSY_ACCOUNTS: &str = r#"
[[profile.account_computed_traits]]
name = "orders_30d"
kind = "count"
events = ["Order Completed"]
window_seconds = 2592000

[[profile.audiences]]
name = "busy_accounts"
condition = { account = { name = "orders_30d", op = "gte", value = 3 } }
"#;

/// An audience on an account computed trait ("people whose account placed at least 3 orders
/// in the last 30 days"): when one member's order pushes the account over the threshold, the
/// other member enters too (through the account refresh), not only the one who ordered.
#[tokio::test(flavor = "multi_thread")]
async fn another_members_order_brings_a_member_into_an_audience_on_an_account_computed_trait() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("tessera.toml");
    std::fs::write(&config, BUSY_ACCOUNTS).unwrap();
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
    let key = tessera.dev_write_key();
    let order = |id: &str, user: &str| {
        tessera_tests::events::track(id, user, "", "Order Completed", json!({"total": 10}))
    };
    let orders = |a: &Account| {
        a.computed_traits
            .get("orders_30d")
            .and_then(|t| t.value.as_ref())
            .map(tessera_proto::convert::value_to_json)
    };

    // Ann and Bob work at acme; Ann orders twice: acme is at two, nobody is in.
    send(
        &channel,
        key,
        vec![
            group("g1", "ann", "finance", json!({}), 0),
            group("g2", "bob", "champion", json!({}), 1),
        ],
    )
    .await
    .expect("send");
    account_until(&channel, |a| a.member_count == 2).await;
    send(&channel, key, vec![order("o1", "ann"), order("o2", "ann")])
        .await
        .expect("send");
    account_until(&channel, |a| orders(a) == Some(json!(2))).await;
    let not_in = |p: &tessera_proto::profile::v1::Profile| p.audiences.is_empty();
    let ann = tessera_tests::events::wait_for(&channel, "user_id", "ann", WAIT, |p| {
        not_in(p) && p.computed_valid_until.is_some()
    })
    .await;
    assert!(not_in(&ann), "{:?}", ann.audiences);
    let bob = tessera_tests::events::get_by(&channel, "user_id", "bob")
        .await
        .expect("bob");
    assert!(not_in(&bob), "{:?}", bob.audiences);

    // Bob's order makes three: Bob is in, and so is Ann, who sent nothing.
    send(&channel, key, vec![order("o3", "bob")])
        .await
        .expect("send");
    let in_audience =
        |p: &tessera_proto::profile::v1::Profile| p.audiences == ["busy_accounts".to_owned()];
    tessera_tests::events::wait_for(&channel, "user_id", "bob", WAIT, in_audience).await;
    let ann = tessera_tests::events::wait_for(&channel, "user_id", "ann", WAIT, in_audience).await;
    assert!(
        ann.computed_valid_until.is_some(),
        "the windowed count Ann carries a copy of expires: {ann:?}"
    );
    account_until(&channel, |a| orders(a) == Some(json!(3))).await;
}
