//! GDPR deletion of a person end to end, on the four services as separate processes with
//! Postgres and Redis: after `DeleteProfile`, no table of any service, no cache entry and no
//! event in the log holds anything about the person; later events that carry the person's
//! identifiers are suppressed; another person is untouched.

use std::time::Duration;

use serde_json::json;
use sqlx::Row as _;
use tessera_proto::common::v1::Identifier;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::profile::v1::{
    DeleteProfileRequest, GetProfileRequest, delete_profile_request, get_profile_request,
};
use tessera_testkit::{TestDb, redis_prefix, redis_url};
use tessera_tests::events::{get_by, identify, send, track, trait_value, wait_for};
use tonic::Code;

use crate::separate_processes::Deployment;

const WAIT: Duration = Duration::from_secs(60);

/// What identifies the deleted person, as it appears in stored rows.
const ANN: [&str; 5] = [
    "u-deleted",
    "ann.deleted@example.com",
    "anon-ann-laptop",
    "anon-ann-phone",
    "Annabel Deleteme",
];

/// Every (schema.table, needle) of the services' schemas whose rows mention a needle, as text
/// or (for bytea columns, which print as hex) hex-encoded.
async fn rows_mentioning(pool: &sqlx::PgPool, needles: &[&str]) -> Vec<(String, String)> {
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables \
         WHERE table_schema IN ('ingestion', 'identity', 'profile') \
           AND table_type = 'BASE TABLE'",
    )
    .fetch_all(pool)
    .await
    .expect("list tables");
    assert!(tables.len() >= 20, "the services' tables: {tables:?}");
    let mut found = Vec::new();
    for (schema, table) in &tables {
        for needle in needles {
            let hex: String = needle.bytes().map(|b| format!("{b:02x}")).collect();
            let sql = format!(
                "SELECT count(*) FROM \"{schema}\".\"{table}\" t \
                 WHERE strpos(lower(t::text), lower($1)) > 0 OR strpos(t::text, $2) > 0"
            );
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(needle)
                .bind(&hex)
                .fetch_one(pool)
                .await
                .expect("scan table");
            if n > 0 {
                found.push((format!("{schema}.{table}"), (*needle).to_owned()));
            }
        }
    }
    found
}

/// Every cache entry under `prefix` whose key or fields mention a needle.
async fn cache_mentioning(prefix: &str, needles: &[&str]) -> Vec<String> {
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let keys = tessera_tests::keys_matching(&mut redis, &format!("{prefix}*")).await;
    let mut found = Vec::new();
    for key in keys {
        let fields: Vec<Vec<u8>> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .expect("hgetall");
        let mentions = needles.iter().any(|n| {
            key.contains(n)
                || fields
                    .iter()
                    .any(|f| f.windows(n.len()).any(|w| w == n.as_bytes()))
        });
        if mentions {
            found.push(key);
        }
    }
    found
}

async fn get_by_id(channel: &tessera_tests::Channel, id: &str) -> Result<(), tonic::Status> {
    ProfileServiceClient::new(channel.clone())
        .get_profile(GetProfileRequest {
            lookup: Some(get_profile_request::Lookup::ProfileId(id.to_owned())),
            as_of: None,
            read_mask: None,
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_person_leaves_nothing_in_postgres_redis_or_the_event_log() {
    let db = TestDb::new().await;
    let prefix = redis_prefix();
    let d = Deployment::start(&db, &prefix).await;
    let ingest = d.ingestion.channel().await;
    let read = d.profile.channel().await;
    let key = d.write_key.clone();
    let pool = sqlx::PgPool::connect(db.url()).await.expect("connect");

    // Ann on a laptop (identified, with an email), on a phone anonymously, then the phone
    // identifies as Ann too: two profiles merged. Bob is someone else.
    let ann_traits =
        json!({"name": "Annabel Deleteme", "email": "ann.deleted@example.com", "plan": "pro"});
    send(
        &ingest,
        &key,
        vec![
            identify("ann-1", "u-deleted", "anon-ann-laptop", ann_traits),
            track("ann-2", "", "anon-ann-phone", "Viewed", json!({"sku": "a"})),
            identify("bob-1", "u-kept", "anon-bob", json!({"name": "Bob Kept"})),
        ],
    )
    .await
    .expect("send");
    wait_for(&read, "anonymous_id", "anon-ann-phone", WAIT, |_| true).await;
    send(
        &ingest,
        &key,
        vec![identify(
            "ann-3",
            "u-deleted",
            "anon-ann-phone",
            json!({"city": "Oslo"}),
        )],
    )
    .await
    .expect("send");
    let ann = wait_for(&read, "user_id", "u-deleted", WAIT, |p| p.event_count == 3).await;
    assert_eq!(
        ann.merged_profile_ids.len(),
        1,
        "the phone's profile merged in"
    );
    wait_for(&read, "user_id", "u-kept", WAIT, |_| true).await;
    // Read by id, so the cache holds the profile.
    get_by_id(&read, &ann.profile_id)
        .await
        .expect("cached read");
    assert!(
        !cache_mentioning(&prefix, &ANN).await.is_empty(),
        "the test sees the cache"
    );
    assert!(
        !rows_mentioning(&pool, &ANN).await.is_empty(),
        "the test sees the rows"
    );

    let mut profiles = ProfileServiceClient::new(read.clone());
    let too_long = profiles
        .delete_profile(DeleteProfileRequest {
            lookup: Some(delete_profile_request::Lookup::ProfileId(
                ann.profile_id.clone(),
            )),
            reason: "x".repeat(1_001),
        })
        .await
        .expect_err("reason too long");
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert!(
        get_by(&read, "user_id", "u-deleted").await.is_ok(),
        "nothing deleted yet"
    );

    let deleted = profiles
        .delete_profile(DeleteProfileRequest {
            lookup: Some(delete_profile_request::Lookup::Identifier(Identifier {
                r#type: "email".into(),
                value: "Ann.Deleted@example.com".into(),
            })),
            reason: "GDPR ticket 42".into(),
        })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(deleted.profile_id, ann.profile_id);
    let mut both = vec![ann.profile_id.clone(), ann.merged_profile_ids[0].clone()];
    both.sort();
    assert_eq!(deleted.profile_ids, both);
    assert_eq!(deleted.events_deleted, 3);
    assert_eq!(
        deleted.identifiers_forgotten, 4,
        "user id, email, two anonymous ids"
    );

    // Gone from every read, by every identifier and id, cached or not.
    for (kind, value) in [
        ("user_id", "u-deleted"),
        ("email", "ann.deleted@example.com"),
        ("anonymous_id", "anon-ann-laptop"),
        ("anonymous_id", "anon-ann-phone"),
    ] {
        let status = get_by(&read, kind, value).await.expect_err("deleted");
        assert_eq!(status.code(), Code::NotFound, "{kind}:{value}");
    }
    for id in &both {
        let status = get_by_id(&read, id).await.expect_err("deleted");
        assert_eq!(status.code(), Code::NotFound, "{id}");
    }
    // Nothing about Ann in any table of any service (the event log included) or the cache.
    // Her profile ids remain only where the deletion itself is recorded.
    assert_eq!(
        rows_mentioning(&pool, &ANN).await,
        Vec::<(String, String)>::new()
    );
    assert_eq!(cache_mentioning(&prefix, &ANN).await, Vec::<String>::new());
    let ids: Vec<&str> = both.iter().map(String::as_str).collect();
    let mut holding_ids: Vec<String> = rows_mentioning(&pool, &ids)
        .await
        .into_iter()
        .map(|(table, _)| table)
        .collect();
    holding_ids.sort();
    holding_ids.dedup();
    assert_eq!(
        holding_ids,
        [
            "identity.forgotten_profiles",
            "profile.deleted_profiles",
            "profile.profile_changes"
        ]
    );

    // Deleting again (a retry by profile id) answers the same and deletes nothing more.
    let again = profiles
        .delete_profile(DeleteProfileRequest {
            lookup: Some(delete_profile_request::Lookup::ProfileId(
                ann.profile_id.clone(),
            )),
            reason: "GDPR ticket 42".into(),
        })
        .await
        .expect("delete again")
        .into_inner();
    assert_eq!(again.profile_ids, both);
    assert_eq!(again.events_deleted, 0);

    // Ann's identifiers are suppressed: her later events are accepted, then dropped before
    // any profile and deleted from the log. Bob's next event goes through.
    send(
        &ingest,
        &key,
        vec![
            identify(
                "ann-4",
                "u-deleted",
                "anon-ann-tablet",
                json!({"name": "Annabel Deleteme"}),
            ),
            track(
                "ann-5",
                "",
                "anon-ann-laptop",
                "Viewed",
                json!({"sku": "b"}),
            ),
            identify("bob-2", "u-kept", "anon-bob", json!({"plan": "team"})),
        ],
    )
    .await
    .expect("send");
    let bob = wait_for(&read, "user_id", "u-kept", WAIT, |p| p.event_count == 2).await;
    assert_eq!(trait_value(&bob, "name"), Some(json!("Bob Kept")));
    assert_eq!(trait_value(&bob, "plan"), Some(json!("team")));
    let started = tokio::time::Instant::now();
    let mut later = ANN.to_vec();
    later.push("anon-ann-tablet");
    loop {
        let left = rows_mentioning(&pool, &later).await;
        if left.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "suppressed events still stored: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (kind, value) in [
        ("user_id", "u-deleted"),
        ("anonymous_id", "anon-ann-tablet"),
    ] {
        let status = get_by(&read, kind, value).await.expect_err("suppressed");
        assert_eq!(status.code(), Code::NotFound, "{kind}:{value}");
    }
    let still: i64 =
        sqlx::query("SELECT count(*) AS n FROM profile.profiles WHERE merged_into IS NULL")
            .fetch_one(&pool)
            .await
            .expect("count")
            .get("n");
    assert_eq!(still, 1, "only Bob's profile");
    pool.close().await;
}

/// Consent per purpose comes from `context.consent.categoryPreferences` (Segment's format) and
/// keeps each purpose's latest preference by event time: a late, older event does not override.
#[tokio::test(flavor = "multi_thread")]
async fn consent_is_kept_per_purpose_from_the_events() {
    use tessera_proto::convert::json_map_to_struct;
    let data = tempfile::tempdir().unwrap();
    let tessera = tessera_tests::TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();
    let with_consent = |id: &str, at: &str, preferences: serde_json::Value| {
        let mut event = track(
            id,
            "u-consent",
            "",
            "Segment Consent Preference Updated",
            json!({}),
        );
        event.context = Some(json_map_to_struct(
            json!({"consent": {"categoryPreferences": preferences}})
                .as_object()
                .unwrap(),
        ));
        event.timestamp = Some(tessera_proto::convert::to_timestamp(
            time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                .unwrap(),
        ));
        event
    };
    send(
        &channel,
        &key,
        vec![with_consent(
            "c1",
            "2026-05-02T00:00:00Z",
            json!({"Advertising": true, "Analytics": true}),
        )],
    )
    .await
    .expect("send");
    send(
        &channel,
        &key,
        vec![
            with_consent("c2", "2026-05-03T00:00:00Z", json!({"Advertising": false})),
            // Older than c1: its Analytics preference does not count.
            with_consent("c3", "2026-05-01T00:00:00Z", json!({"Analytics": false})),
        ],
    )
    .await
    .expect("send");
    let profile = wait_for(&channel, "user_id", "u-consent", WAIT, |p| {
        p.event_count == 3
    })
    .await;
    let consent: Vec<(String, bool)> = {
        let mut c: Vec<(String, bool)> = profile
            .consent
            .iter()
            .map(|(purpose, c)| (purpose.clone(), c.granted))
            .collect();
        c.sort();
        c
    };
    assert_eq!(
        consent,
        [
            ("Advertising".to_owned(), false),
            ("Analytics".to_owned(), true)
        ]
    );
    let analytics = &profile.consent["Analytics"];
    assert_eq!(
        analytics.observed_at.as_ref().map(|t| t.seconds),
        Some(1_777_680_000),
        "stated by c1 at 2026-05-02"
    );
}
