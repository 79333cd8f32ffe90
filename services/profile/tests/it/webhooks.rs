//! Webhook destinations of the change stream, against a local HTTP receiver, on SQLite and
//! Postgres: retries until the receiver recovers (signatures checked), dead letters and their
//! replay, consent, and two replicas delivering each change exactly once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tessera_profile::webhooks::{Start, Webhook, WebhookSecret};
use tessera_profile::{MIGRATIONS, Peers, ProfileSettings, Profiles, SCHEMA};
use tessera_proto::convert::json_map_to_struct;
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::destination_service_client::DestinationServiceClient;
use tessera_proto::profile::v1::profile_pipeline_service_client::ProfilePipelineServiceClient;
use tessera_server::{GrpcServices, Shutdown};
use tessera_store::{Database, DbSettings, MemoryCache};
use tessera_testkit::{TestDb, TestSqlite};
use time::OffsetDateTime;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{Served, identify, scoring_server};

const SECRET: &str = "whsec-test-0123456789";

/// What the receiver answers and what it got.
#[derive(Debug, Default)]
struct Inbox {
    /// Answer 503 to this many more requests.
    fail_next: usize,
    /// Answer 400 to every request while set.
    refuse: bool,
    /// Every request, in arrival order.
    requests: Vec<Received>,
}

#[derive(Debug, Clone)]
struct Received {
    status: u16,
    signature: String,
    webhook_id: String,
    content_type: String,
    raw: Bytes,
    body: Value,
}

impl Received {
    /// The changes of the request.
    fn changes(&self) -> Vec<Value> {
        self.body["changes"].as_array().cloned().unwrap_or_default()
    }
}

/// A local webhook receiver on 127.0.0.1:0.
struct Receiver {
    inbox: Arc<Mutex<Inbox>>,
    url: String,
    _task: tokio::task::JoinHandle<()>,
}

async fn receive(
    State(inbox): State<Arc<Mutex<Inbox>>>,
    headers: HeaderMap,
    raw: Bytes,
) -> StatusCode {
    let mut inbox = inbox.lock().unwrap();
    let status = if inbox.refuse {
        StatusCode::BAD_REQUEST
    } else if inbox.fail_next > 0 {
        inbox.fail_next -= 1;
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    inbox.requests.push(Received {
        status: status.as_u16(),
        signature: header("x-tessera-signature"),
        webhook_id: header("x-tessera-webhook-id"),
        content_type: header("content-type"),
        body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
        raw,
    });
    status
}

impl Receiver {
    async fn start() -> Self {
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(inbox.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            inbox,
            url,
            _task: task,
        }
    }

    fn set(&self, f: impl FnOnce(&mut Inbox)) {
        f(&mut self.inbox.lock().unwrap());
    }

    fn requests(&self) -> Vec<Received> {
        self.inbox.lock().unwrap().requests.clone()
    }

    /// The changes of every request answered 2xx, in delivery order.
    fn delivered(&self) -> Vec<Value> {
        self.requests()
            .iter()
            .filter(|r| r.status == 200)
            .flat_map(Received::changes)
            .collect()
    }

    /// The profiles of the delivered changes of `kind`.
    fn delivered_profiles(&self, kind: &str) -> Vec<String> {
        self.delivered()
            .iter()
            .filter(|c| c["kind"] == kind)
            .map(|c| c["profile_id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// How many profiles had an `updated` change delivered.
    fn unique_profiles(&self) -> usize {
        let mut profiles = self.delivered_profiles("updated");
        profiles.sort();
        profiles.dedup();
        profiles.len()
    }
}

/// Checks the `X-Tessera-Signature` of a request with the HMAC crate itself.
fn assert_signed(request: &Received) {
    let (t, v1) = request
        .signature
        .split_once(',')
        .unwrap_or_else(|| panic!("signature {:?}", request.signature));
    let t = t.strip_prefix("t=").unwrap();
    let v1 = v1.strip_prefix("v1=").unwrap();
    let sent: i64 = t.parse().unwrap();
    assert!((OffsetDateTime::now_utc().unix_timestamp() - sent).abs() < 300);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&request.raw);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, want, "the signature is HMAC-SHA256 of t.body");
    assert_eq!(request.webhook_id, "crm");
    assert_eq!(request.content_type, "application/json");
    assert_eq!(request.body["webhook"], "crm");
}

/// A webhook to `url` retrying fast, from the beginning of the stream, `updated` changes only.
fn webhook(url: &str) -> Webhook {
    Webhook {
        name: "crm".to_owned(),
        url: url.to_owned(),
        secret: WebhookSecret(SECRET.to_owned()),
        kinds: vec!["updated".to_owned()],
        start: Start::Beginning,
        timeout_ms: 2_000,
        backoff_initial_ms: 50,
        backoff_max_ms: 200,
        ..Webhook::default()
    }
}

/// A migrated database and what keeps it alive.
struct Db {
    url: String,
    _pg: Option<TestDb>,
    _lite: Option<TestSqlite>,
}

impl Db {
    async fn sqlite() -> Self {
        let dir = TestSqlite::new();
        Self {
            url: dir.url("profile.db"),
            _pg: None,
            _lite: Some(dir),
        }
    }

    async fn postgres() -> Self {
        let db = TestDb::new().await;
        Self {
            url: db.url().to_owned(),
            _pg: Some(db),
            _lite: None,
        }
    }
}

/// A profile service replica delivering to webhooks.
struct Replica {
    writes: ProfilePipelineServiceClient<Channel>,
    destinations: DestinationServiceClient<Channel>,
    stop: Shutdown,
    delivery: tokio::task::JoinHandle<()>,
    _served: Served,
}

impl Replica {
    async fn start(db: &Db, scoring: &Served, webhooks: Vec<Webhook>) -> Self {
        let database = Database::connect(&db.url, SCHEMA, &DbSettings::default())
            .await
            .unwrap();
        database.migrate(MIGRATIONS).await.unwrap();
        let settings = ProfileSettings {
            match_profiles: false,
            webhooks,
            ..ProfileSettings::default()
        };
        settings.validate().unwrap();
        let peers = Peers {
            // Not called: matching is off and nobody is deleted.
            identity: scoring.lazy_channel(),
            scoring: scoring.lazy_channel(),
            ingestion: scoring.lazy_channel(),
        };
        let cache = Arc::new(MemoryCache::new(1_000, Duration::from_secs(60)));
        let profiles = Profiles::new(database, cache, peers, settings);
        let mut services = GrpcServices::default();
        profiles.register(&mut services);
        let served = Served::start(services).await;
        let stop = Shutdown::new();
        let delivery = profiles.spawn_webhooks(stop.clone());
        Self {
            writes: ProfilePipelineServiceClient::new(served.lazy_channel()),
            destinations: DestinationServiceClient::new(served.lazy_channel()),
            stop,
            delivery,
            _served: served,
        }
    }

    /// Applies one identify event of `profile` (user `u-<profile>`), with consent preferences
    /// when given.
    async fn touch(&self, event_id: &str, profile: &str, consent: Option<Value>) {
        let mut event = identify(
            event_id,
            profile,
            &format!("u-{profile}"),
            OffsetDateTime::now_utc().replace_nanosecond(0).unwrap(),
            json!({"plan": "pro"}),
        );
        if let Some(preferences) = consent {
            let context = json!({"consent": {"categoryPreferences": preferences}});
            event.event.as_mut().unwrap().context =
                Some(json_map_to_struct(context.as_object().unwrap()));
        }
        self.writes
            .clone()
            .apply_events(pb::ApplyEventsRequest {
                merges: vec![],
                events: vec![event],
            })
            .await
            .unwrap();
    }

    async fn dead_letters(&self) -> Vec<pb::DeadLetter> {
        self.destinations
            .clone()
            .list_dead_letters(pb::ListDeadLettersRequest {
                webhook: "crm".to_owned(),
                page_size: 0,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .dead_letters
    }

    async fn stop(self) {
        self.stop.cancel();
        self.delivery.await.unwrap();
    }
}

/// Waits (at most 20 s) until `done` holds.
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn cursor(change: &Value) -> (u64, i64) {
    let (xid, seq) = change["id"].as_str().unwrap().split_once('.').unwrap();
    (xid.parse().unwrap(), seq.parse().unwrap())
}

macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Db::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::Db::postgres().await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    a_failing_receiver_gets_the_change_signed_once_it_recovers,
    a_refused_change_is_dead_lettered_and_replayed_once_fixed,
    failing_past_the_retry_budget_dead_letters_and_moves_on,
    changes_follow_the_profiles_consent,
);

async fn a_failing_receiver_gets_the_change_signed_once_it_recovers(db: Db) {
    let scoring = scoring_server().await;
    let receiver = Receiver::start().await;
    receiver.set(|inbox| inbox.fail_next = 3);
    let replica = Replica::start(&db, &scoring, vec![webhook(&receiver.url)]).await;
    replica.touch("e1", "p1", None).await;

    eventually("the change is delivered", || async {
        receiver.delivered_profiles("updated") == ["p1"]
    })
    .await;
    let requests = receiver.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 503, 200]);
    for request in &requests {
        assert_signed(request);
        // A retry sends the same changes.
        assert_eq!(request.body, requests[0].body);
    }
    let change = &requests[3].changes()[0];
    assert_eq!(change["kind"], "updated");
    assert_eq!(change["profile_id"], "p1");
    assert!(change["version"].as_i64().unwrap() >= 1, "{change}");
    assert!(change["at"].as_str().unwrap().ends_with('Z'), "{change}");
    assert!(replica.dead_letters().await.is_empty());
    replica.stop().await;
}

async fn a_refused_change_is_dead_lettered_and_replayed_once_fixed(db: Db) {
    let scoring = scoring_server().await;
    let receiver = Receiver::start().await;
    receiver.set(|inbox| inbox.refuse = true);
    let replica = Replica::start(&db, &scoring, vec![webhook(&receiver.url)]).await;
    replica.touch("e1", "p1", None).await;
    eventually("p1's change is dead-lettered", || async {
        replica.dead_letters().await.len() == 1
    })
    .await;
    // The next change is not held up by the dead one.
    replica.touch("e2", "p2", None).await;
    eventually("p2's change is dead-lettered", || async {
        replica.dead_letters().await.len() == 2
    })
    .await;
    let letters = replica.dead_letters().await;
    let profiles: Vec<&str> = letters.iter().map(|l| l.profile_id.as_str()).collect();
    assert_eq!(profiles, ["p1", "p2"]);
    for letter in &letters {
        assert_eq!(
            (
                letter.kind.as_str(),
                letter.attempts,
                letter.last_error.as_str()
            ),
            ("updated", 1, "HTTP 400")
        );
        assert!(!letter.replaying);
        let payload: Value = serde_json::from_str(&letter.payload).unwrap();
        assert_eq!(payload["id"], letter.cursor.as_str());
    }
    // Each refused request was tried once.
    assert_eq!(receiver.requests().len(), 2);

    let mut destinations = replica.destinations.clone();
    let unknown = destinations
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            webhook: "nope".to_owned(),
            ids: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    receiver.set(|inbox| inbox.refuse = false);
    let queued = destinations
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            webhook: "crm".to_owned(),
            ids: vec![letters[1].id],
        })
        .await
        .unwrap()
        .into_inner()
        .queued;
    assert_eq!(queued, 1);
    eventually("p2's change is replayed", || async {
        receiver.delivered_profiles("updated") == ["p2"]
    })
    .await;
    let queued = destinations
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            webhook: "crm".to_owned(),
            ids: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .queued;
    assert_eq!(queued, 1, "only p1's letter is left");
    eventually("every dead letter is delivered", || async {
        replica.dead_letters().await.is_empty()
    })
    .await;
    assert_eq!(receiver.delivered_profiles("updated"), ["p2", "p1"]);
    for change in receiver.delivered() {
        assert_eq!(change["replayed"], true);
    }
    for request in receiver.requests() {
        assert_signed(&request);
    }
    replica.stop().await;
}

async fn failing_past_the_retry_budget_dead_letters_and_moves_on(db: Db) {
    let scoring = scoring_server().await;
    let receiver = Receiver::start().await;
    receiver.set(|inbox| inbox.fail_next = usize::MAX);
    let hook = Webhook {
        retry_for_seconds: 1,
        ..webhook(&receiver.url)
    };
    let replica = Replica::start(&db, &scoring, vec![hook]).await;
    replica.touch("e1", "p1", None).await;
    eventually("the change is dead-lettered", || async {
        replica.dead_letters().await.len() == 1
    })
    .await;
    let letter = &replica.dead_letters().await[0];
    assert_eq!(letter.last_error, "HTTP 503");
    assert!(letter.attempts > 2, "retried before giving up: {letter:?}");
    assert_eq!(letter.attempts as usize, receiver.requests().len());

    receiver.set(|inbox| inbox.fail_next = 0);
    replica.touch("e2", "p2", None).await;
    eventually("the next change is delivered", || async {
        receiver.delivered_profiles("updated") == ["p2"]
    })
    .await;
    replica.stop().await;
}

async fn changes_follow_the_profiles_consent(db: Db) {
    let scoring = scoring_server().await;
    let receiver = Receiver::start().await;
    let hook = Webhook {
        consent_purpose: Some("marketing".to_owned()),
        ..webhook(&receiver.url)
    };
    let replica = Replica::start(&db, &scoring, vec![hook]).await;
    replica
        .touch(
            "e1",
            "refused",
            Some(json!({"marketing": false, "analytics": true})),
        )
        .await;
    replica.touch("e2", "silent", None).await;
    replica
        .touch("e3", "granted", Some(json!({"marketing": true})))
        .await;
    // In order: once the last change is in, the earlier ones were decided.
    eventually("the consenting profile's change is delivered", || async {
        receiver
            .delivered_profiles("updated")
            .contains(&"granted".to_owned())
    })
    .await;
    assert_eq!(receiver.delivered_profiles("updated"), ["granted"]);

    // Consent is read when delivering: granting it later lets the next change through.
    replica
        .touch("e4", "refused", Some(json!({"marketing": true})))
        .await;
    eventually("the change after consent is delivered", || async {
        receiver.delivered_profiles("updated").len() == 2
    })
    .await;
    assert_eq!(
        receiver.delivered_profiles("updated"),
        ["granted", "refused"]
    );
    assert!(replica.dead_letters().await.is_empty());
    replica.stop().await;
}

/// Two replicas on one Postgres deliver every change once, in stream order, also when the one
/// delivering stops and the other takes over.
#[tokio::test]
async fn two_replicas_deliver_each_change_exactly_once() {
    let db = Db::postgres().await;
    let scoring = scoring_server().await;
    let receiver = Receiver::start().await;
    let a = Replica::start(&db, &scoring, vec![webhook(&receiver.url)]).await;
    let b = Replica::start(&db, &scoring, vec![webhook(&receiver.url)]).await;
    for i in 0..10 {
        let replica = if i % 2 == 0 { &a } else { &b };
        replica
            .touch(&format!("e{i}"), &format!("p{i}"), None)
            .await;
    }
    eventually("the first ten profiles are delivered", || async {
        receiver.unique_profiles() >= 10
    })
    .await;
    // Whichever replica was delivering, stopping `a` leaves `b` to deliver the rest.
    a.stop().await;
    for i in 10..20 {
        b.touch(&format!("e{i}"), &format!("p{i}"), None).await;
    }
    eventually("all twenty profiles are delivered", || async {
        receiver.unique_profiles() >= 20
    })
    .await;
    // Time for a duplicate to show up, if any would.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = receiver.delivered();
    let cursors: Vec<(u64, i64)> = delivered.iter().map(cursor).collect();
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]),
        "once each, in stream order: {cursors:?}"
    );
    assert_eq!(receiver.unique_profiles(), 20);
    for request in receiver.requests() {
        assert_eq!(request.status, 200);
        assert_signed(&request);
    }
    b.stop().await;
}
