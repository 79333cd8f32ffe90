//! The profile service over gRPC, with the real scoring service, Redis and Postgres, and a test
//! double of the identity service.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tessera_profile::{MIGRATIONS, Peers, ProfileSettings, Profiles, SCHEMA};
use tessera_proto::common::v1 as common;
use tessera_proto::convert::{to_timestamp, value_to_json};
use tessera_proto::identity::v1 as identity;
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::get_profile_request::Lookup;
use tessera_proto::profile::v1::profile_pipeline_service_client::ProfilePipelineServiceClient;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_server::GrpcServices;
use tessera_store::{Cache, Database, DbSettings, RedisCache};
use tessera_testkit::{TestDb, redis_prefix, redis_url};
use time::OffsetDateTime;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::support::{IdentityDouble, Served, identify, lazy_channel, scoring_server, track};

/// Postgres, Redis, the scoring service and the identity double, shared by the replicas of one
/// test.
pub(crate) struct Env {
    pub(crate) db: TestDb,
    pub(crate) redis_prefix: String,
    pub(crate) scoring: Served,
    identity: Served,
    /// The identity double behind `identity`, to configure and inspect.
    pub(crate) double: IdentityDouble,
}

impl Env {
    pub(crate) async fn new() -> Self {
        let double = IdentityDouble::default();
        Self {
            db: TestDb::new().await,
            redis_prefix: redis_prefix(),
            scoring: scoring_server().await,
            identity: double.serve().await,
            double,
        }
    }

    fn redis(&self) -> Arc<dyn Cache> {
        Arc::new(
            RedisCache::new(&redis_url(), &self.redis_prefix, Duration::from_secs(60)).unwrap(),
        )
    }

    /// A replica of the profile service with `cache` and the scoring service at `scoring`.
    pub(crate) async fn replica_with(&self, cache: Arc<dyn Cache>, scoring: Channel) -> Replica {
        self.start(cache, scoring, ProfileSettings::default()).await
    }

    /// A replica of the profile service with `settings`, Redis and the scoring service.
    pub(crate) async fn replica_with_settings(&self, settings: ProfileSettings) -> Replica {
        self.start(self.redis(), self.scoring.lazy_channel(), settings)
            .await
    }

    async fn start(
        &self,
        cache: Arc<dyn Cache>,
        scoring: Channel,
        settings: ProfileSettings,
    ) -> Replica {
        let db = Database::connect(self.db.url(), SCHEMA, &DbSettings::default())
            .await
            .unwrap();
        db.migrate(MIGRATIONS).await.unwrap();
        let peers = Peers {
            identity: self.identity.lazy_channel(),
            scoring,
            // Only a deletion asks ingestion (its event log): the identity double's server
            // stands in for it.
            ingestion: self.identity.lazy_channel(),
        };
        let profiles = Profiles::new(db, cache, peers, settings);
        let mut services = GrpcServices::default();
        profiles.register(&mut services);
        let served = Served::start(services).await;
        Replica {
            reads: ProfileServiceClient::new(served.lazy_channel()),
            writes: ProfilePipelineServiceClient::new(served.lazy_channel()),
            _served: served,
        }
    }

    pub(crate) async fn replica(&self) -> Replica {
        self.replica_with(self.redis(), self.scoring.lazy_channel())
            .await
    }
}

pub(crate) struct Replica {
    reads: ProfileServiceClient<Channel>,
    pub(crate) writes: ProfilePipelineServiceClient<Channel>,
    _served: Served,
}

impl Replica {
    pub(crate) async fn apply(
        &self,
        request: pb::ApplyEventsRequest,
    ) -> Result<pb::ApplyEventsResponse, tonic::Status> {
        self.writes
            .clone()
            .apply_events(request)
            .await
            .map(tonic::Response::into_inner)
    }

    pub(crate) async fn get(&self, lookup: Lookup) -> Result<pb::Profile, tonic::Status> {
        let response = self
            .reads
            .clone()
            .get_profile(pb::GetProfileRequest {
                lookup: Some(lookup),
                as_of: None,
                read_mask: None,
            })
            .await?;
        Ok(response.into_inner().profile.expect("a profile"))
    }

    pub(crate) async fn delete(
        &self,
        lookup: pb::delete_profile_request::Lookup,
    ) -> Result<pb::DeleteProfileResponse, tonic::Status> {
        self.reads
            .clone()
            .delete_profile(pb::DeleteProfileRequest {
                lookup: Some(lookup),
                reason: "gdpr ticket 1".to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    pub(crate) async fn get_id(&self, id: &str) -> pb::Profile {
        self.get(Lookup::ProfileId(id.to_owned())).await.unwrap()
    }

    /// The profile `id` with only the fields `paths` name (a read mask).
    pub(crate) async fn get_masked(&self, id: &str, paths: &[&str]) -> pb::Profile {
        self.reads
            .clone()
            .get_profile(pb::GetProfileRequest {
                lookup: Some(Lookup::ProfileId(id.to_owned())),
                as_of: None,
                read_mask: Some(prost_types::FieldMask {
                    paths: paths.iter().map(|p| (*p).to_owned()).collect(),
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .profile
            .expect("a profile")
    }
}

pub(crate) fn minutes_ago(m: i64) -> OffsetDateTime {
    let t = OffsetDateTime::now_utc() - time::Duration::minutes(m);
    t.replace_nanosecond(0).unwrap()
}

pub(crate) fn events(list: Vec<pb::ResolvedEvent>) -> pb::ApplyEventsRequest {
    pb::ApplyEventsRequest {
        merges: vec![],
        events: list,
    }
}

#[tokio::test]
async fn applied_events_are_read_back_with_an_engagement_score() {
    let env = Env::new().await;
    let replica = env.replica().await;
    let (first_seen, last_seen) = (minutes_ago(30), minutes_ago(10));
    let request = events(vec![
        identify(
            "e1",
            "p1",
            "u1",
            first_seen,
            json!({"plan": "pro", "name": "Ann"}),
        ),
        track("e2", "p1", "u1", last_seen),
    ]);
    let response = replica.apply(request.clone()).await.unwrap();
    assert_eq!(
        (
            response.applied,
            response.duplicates,
            response.profiles_changed
        ),
        (2, 0, 1)
    );

    let profile = replica.get_id("p1").await;
    assert_eq!(profile.profile_id, "p1");
    assert_eq!(profile.event_count, 2);
    assert_eq!(
        value_to_json(profile.traits["plan"].value.as_ref().unwrap()),
        json!("pro")
    );
    assert_eq!(profile.traits["plan"].event_id, "e1");
    assert_eq!(profile.first_seen, Some(to_timestamp(first_seen)));
    assert_eq!(profile.last_seen, Some(to_timestamp(last_seen)));
    assert_eq!(
        profile.identifiers,
        [common::Identifier {
            r#type: "user_id".to_owned(),
            value: "u1".to_owned()
        }]
    );
    let engagement = &profile.scores["engagement"];
    assert!(
        engagement.value > 20.0 && engagement.value < 100.0,
        "{}",
        engagement.value
    );
    assert_eq!(engagement.model_version, "engagement-v1");
    let factors: Vec<_> = engagement.factors.iter().map(|f| f.name.as_str()).collect();
    assert!(factors.contains(&"decayed_activity") && factors.contains(&"event_count"));
    // Applying: version 2 after two events, 3 once the scores were stored.
    assert_eq!(profile.version, 3);

    // A retried batch applies nothing, yet is scored again.
    let retry = replica.apply(request).await.unwrap();
    assert_eq!(
        (retry.applied, retry.duplicates, retry.profiles_changed),
        (0, 2, 0)
    );
    let again = replica.get_id("p1").await;
    assert_eq!(again.event_count, 2);
    assert_eq!(again.version, 4);
    let computed = |s: &tessera_proto::scoring::v1::Score| {
        tessera_proto::convert::from_timestamp(&s.computed_at.unwrap()).unwrap()
    };
    assert!(computed(&again.scores["engagement"]) >= computed(engagement));
}

#[tokio::test]
async fn profiles_are_found_by_identifier_through_the_identity_service() {
    let env = Env::new().await;
    let replica = env.replica().await;
    replica
        .apply(events(vec![identify(
            "e1",
            "p1",
            "u1",
            minutes_ago(5),
            json!({"plan": "pro"}),
        )]))
        .await
        .unwrap();
    env.double.link("user_id", "u1", "p1");
    env.double.link("user_id", "ghost", "p-never-written");
    let id = |value: &str| {
        Lookup::Identifier(common::Identifier {
            r#type: "user_id".to_owned(),
            value: value.to_owned(),
        })
    };
    assert_eq!(replica.get(id("u1")).await.unwrap().profile_id, "p1");
    assert_eq!(
        replica.get(id("nobody")).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        replica.get(id("ghost")).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        replica
            .get(Lookup::ProfileId("p-none".to_owned()))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let bad = replica
        .get(Lookup::Identifier(common::Identifier {
            r#type: "Not A Type".to_owned(),
            value: "x".to_owned(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let fields: Vec<_> = bad
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, ["identifier.type"]);
}

/// Lookups by identifier are cached for every replica (the identity service is asked once); a
/// cached identifier whose profile was merged away leads to the survivor; a split (identifiers
/// moved between profiles) makes every cached lookup stale, so the identity service's new answer
/// is read.
#[tokio::test]
async fn identifier_lookups_are_cached_until_a_split() {
    let env = Env::new().await;
    let (a, b) = (env.replica().await, env.replica().await);
    a.apply(events(vec![
        identify("e1", "p1", "u1", minutes_ago(5), json!({"plan": "pro"})),
        identify("e2", "p2", "u2", minutes_ago(4), json!({"plan": "free"})),
    ]))
    .await
    .unwrap();
    env.double.link("user_id", "u1", "p1");
    env.double.link("user_id", "u2", "p2");
    let u2 = || {
        Lookup::Identifier(common::Identifier {
            r#type: "user_id".to_owned(),
            value: "u2".to_owned(),
        })
    };
    assert_eq!(a.get(u2()).await.unwrap().profile_id, "p2");
    assert_eq!(b.get(u2()).await.unwrap().profile_id, "p2");
    assert_eq!(
        env.double.lookups(),
        1,
        "the second read was answered by the cache"
    );

    // p2 merged into p1: the cached lookup leads to the survivor (twice: the entry is pointed
    // at it), without asking identity.
    a.apply(pb::ApplyEventsRequest {
        merges: vec![identity::Merge {
            surviving_profile_id: "p1".to_owned(),
            merged_profile_id: "p2".to_owned(),
            cause_event_id: "e2".to_owned(),
            merged_at: Some(to_timestamp(OffsetDateTime::now_utc())),
            rule: "test".to_owned(),
        }],
        events: vec![],
    })
    .await
    .unwrap();
    env.double.link("user_id", "u2", "p1");
    assert_eq!(b.get(u2()).await.unwrap().profile_id, "p1");
    assert_eq!(a.get(u2()).await.unwrap().profile_id, "p1");
    assert_eq!(env.double.lookups(), 1);

    // Identity splits them again; until the profile service has split too, the cached answer
    // stands. The split makes it stale on every replica.
    env.double.link("user_id", "u2", "p2");
    assert_eq!(b.get(u2()).await.unwrap().profile_id, "p1");
    let assign = |event: &str, profile: &str, user: &str| pb::EventAssignment {
        event_id: event.to_owned(),
        profile_id: profile.to_owned(),
        identifiers: vec![common::Identifier {
            r#type: "user_id".to_owned(),
            value: user.to_owned(),
        }],
    };
    a.writes
        .clone()
        .split_profiles(pb::SplitProfilesRequest {
            profiles: ["p1", "p2"]
                .map(|id| pb::ProfileAssignment {
                    profile_id: id.to_owned(),
                    live_profile_id: id.to_owned(),
                })
                .to_vec(),
            events: vec![assign("e1", "p1", "u1"), assign("e2", "p2", "u2")],
            erased_event_ids: vec![],
        })
        .await
        .unwrap();
    let p2 = b.get(u2()).await.unwrap();
    assert_eq!((p2.profile_id.as_str(), p2.event_count), ("p2", 1));
    assert_eq!(env.double.lookups(), 2, "asked again after the split");
}

#[tokio::test]
async fn a_write_through_one_replica_is_read_through_the_other() {
    let env = Env::new().await;
    let (a, b) = (env.replica().await, env.replica().await);
    a.apply(events(vec![identify(
        "e1",
        "p1",
        "u1",
        minutes_ago(20),
        json!({"plan": "free"}),
    )]))
    .await
    .unwrap();
    // B reads (and fills the shared cache), then A writes again: B must see the new write.
    let first = b.get_id("p1").await;
    assert_eq!(first.event_count, 1);
    let first_again = b.get_id("p1").await;
    assert_eq!(first_again, first, "a cache hit returns the same profile");
    a.apply(events(vec![identify(
        "e2",
        "p1",
        "u1",
        minutes_ago(10),
        json!({"plan": "pro"}),
    )]))
    .await
    .unwrap();
    let second = b.get_id("p1").await;
    assert_eq!(second.event_count, 2);
    assert_eq!(
        value_to_json(second.traits["plan"].value.as_ref().unwrap()),
        json!("pro")
    );
    assert!(second.version > first.version);

    // A merge through B: reading the merged id through A returns the survivor, even though A's
    // cache entry for the merged id was filled before.
    b.apply(events(vec![identify(
        "e3",
        "p2",
        "u2",
        minutes_ago(5),
        json!({"city": "Oslo"}),
    )]))
    .await
    .unwrap();
    assert_eq!(a.get_id("p2").await.profile_id, "p2");
    let merged = b
        .apply(pb::ApplyEventsRequest {
            merges: vec![identity::Merge {
                surviving_profile_id: "p1".to_owned(),
                merged_profile_id: "p2".to_owned(),
                cause_event_id: "e4".to_owned(),
                merged_at: Some(to_timestamp(OffsetDateTime::now_utc())),
                rule: "seen_together".to_owned(),
            }],
            events: vec![],
        })
        .await
        .unwrap();
    assert_eq!(merged.profiles_changed, 2);
    let survivor = a.get_id("p2").await;
    assert_eq!(survivor.profile_id, "p1");
    assert_eq!(survivor.event_count, 3);
    assert_eq!(survivor.merged_profile_ids, ["p2"]);
    assert!(survivor.traits.contains_key("city"));
    assert_eq!(survivor.identifiers.len(), 2);
}

/// A cache hit is answered with the entry as the cache holds it (GetProfile sends its bytes as
/// they are), a hit with a read mask with the entry masked, and an entry whose computed traits
/// have expired (`computed_valid_until` passed) from the database.
#[tokio::test]
async fn cache_hits_are_sent_as_cached_masked_when_asked_and_expired_entries_are_read_again() {
    use prost::Message as _;
    let env = Env::new().await;
    let replica = env.replica().await;
    replica
        .apply(events(vec![identify(
            "e1",
            "p1",
            "u1",
            minutes_ago(20),
            json!({"plan": "free", "name": "Ada"}),
        )]))
        .await
        .unwrap();
    let stored = replica.get_id("p1").await;
    assert_eq!(stored.event_count, 1);

    // An entry only the cache holds (a newer version, a count no event gave): a hit returns it.
    let cache = env.redis();
    let put = |profile: pb::Profile| {
        let cache = Arc::clone(&cache);
        async move {
            let entry = tessera_store::Versioned {
                version: profile.version,
                bytes: Some(profile.encode_to_vec().into()),
            };
            assert!(cache.put_if_newer("profile:p1", entry).await.unwrap());
        }
    };
    let later = |minutes: i64| {
        Some(to_timestamp(
            OffsetDateTime::now_utc() + time::Duration::minutes(minutes),
        ))
    };
    let cached = pb::Profile {
        version: stored.version + 10,
        event_count: 999,
        computed_valid_until: later(30),
        ..stored.clone()
    };
    put(cached.clone()).await;
    assert_eq!(
        replica.get_id("p1").await,
        cached,
        "the hit is the entry, field for field"
    );
    let masked = replica
        .get_masked("p1", &["traits.name", "event_count"])
        .await;
    assert_eq!(masked.profile_id, "p1");
    assert_eq!(
        masked.event_count, 999,
        "the masked read is the cached entry too"
    );
    assert_eq!(masked.traits.keys().collect::<Vec<_>>(), ["name"]);
    assert!(masked.identifiers.is_empty() && masked.first_seen.is_none());
    // BatchGetProfiles answers hits the same way, beside a lookup that finds nothing.
    let batch = replica
        .reads
        .clone()
        .batch_get_profiles(pb::BatchGetProfilesRequest {
            lookups: ["p1", "nobody"]
                .map(|id| pb::GetProfileRequest {
                    lookup: Some(Lookup::ProfileId(id.into())),
                    as_of: None,
                    read_mask: None,
                })
                .into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.results[0].profile.as_ref(), Some(&cached));
    assert_eq!(batch.results[0].error, "");
    assert_eq!(
        (
            batch.results[1].profile.as_ref(),
            batch.results[1].error.as_str()
        ),
        (None, "not found")
    );

    // Its computed traits expired a minute ago: the database answers.
    put(pb::Profile {
        version: stored.version + 20,
        computed_valid_until: later(-1),
        ..cached
    })
    .await;
    let read = replica.get_id("p1").await;
    assert_eq!(
        read.event_count, 1,
        "read from the database, not the expired entry"
    );
    assert_eq!(read.version, stored.version);
}

#[tokio::test]
async fn reads_and_writes_succeed_with_redis_unreachable() {
    let env = Env::new().await;
    let dead: Arc<dyn Cache> = Arc::new(
        RedisCache::new(
            "redis://127.0.0.1:1",
            &env.redis_prefix,
            Duration::from_secs(60),
        )
        .unwrap(),
    );
    let replica = env.replica_with(dead, env.scoring.lazy_channel()).await;
    let response = replica
        .apply(events(vec![identify(
            "e1",
            "p1",
            "u1",
            minutes_ago(1),
            json!({"plan": "pro"}),
        )]))
        .await
        .unwrap();
    assert_eq!(response.applied, 1);
    let profile = replica.get_id("p1").await;
    assert_eq!(profile.event_count, 1);
    assert!(profile.scores.contains_key("engagement"));
    let again = replica.get_id("p1").await;
    assert_eq!(again, profile);
}

#[tokio::test]
async fn scoring_unreachable_is_unavailable_applies_nothing_and_a_retry_scores() {
    let env = Env::new().await;
    let broken = env
        .replica_with(env.redis(), lazy_channel("http://127.0.0.1:1"))
        .await;
    let request = events(vec![identify(
        "e1",
        "p1",
        "u1",
        minutes_ago(1),
        json!({"plan": "pro"}),
    )]);
    let status = broken.apply(request.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.get_error_details().retry_info().is_some());

    // Applying and scoring are one transaction: nothing of the batch was kept, and the
    // pipeline's retry applies and scores it.
    let healthy = env.replica().await;
    let missing = healthy
        .get(Lookup::ProfileId("p1".to_owned()))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let retry = healthy.apply(request).await.unwrap();
    assert_eq!((retry.applied, retry.duplicates), (1, 0));
    let scored = healthy.get_id("p1").await;
    assert_eq!(scored.event_count, 1);
    assert!(scored.scores["engagement"].value > 0.0);
}

#[tokio::test]
async fn invalid_batches_name_their_fields_and_large_ones_are_refused() {
    let env = Env::new().await;
    let replica = env.replica().await;
    let mut no_time = identify("e3", "p1", "u1", minutes_ago(1), json!({}));
    no_time.event.as_mut().unwrap().timestamp = None;
    let request = events(vec![
        identify("e1", "p1", "u1", minutes_ago(1), json!({})),
        identify("e2", "", "u1", minutes_ago(1), json!({})),
        no_time,
    ]);
    let status = replica.apply(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<_> = status
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(
        fields,
        ["events[1].profile_id", "events[2].event.timestamp"]
    );
    // Nothing of an invalid batch is applied.
    assert_eq!(
        replica
            .get(Lookup::ProfileId("p1".to_owned()))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    let one = identify("e", "p1", "u1", minutes_ago(1), json!({}));
    let status = replica
        .apply(events(vec![
            one;
            tessera_profile::MAX_EVENTS_PER_REQUEST + 1
        ]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("events"));

    let status = replica
        .reads
        .clone()
        .get_profile(pb::GetProfileRequest {
            lookup: None,
            as_of: None,
            read_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// SearchProfiles finds the profiles meeting a condition, in id order, a page at a time, with
/// only the masked fields; GetProfile takes the same read mask; bad requests name their field.
#[tokio::test]
async fn profiles_are_searched_by_condition_in_pages_with_a_read_mask() {
    let env = Env::new().await;
    let replica = env.replica().await;
    let mut list = Vec::new();
    for i in 0..25 {
        let plan = if i % 2 == 0 { "pro" } else { "free" };
        list.push(identify(
            &format!("e{i}"),
            &format!("p{i:02}"),
            &format!("u{i}"),
            minutes_ago(5),
            json!({"plan": plan, "seats": i, "name": format!("User {i}")}),
        ));
    }
    replica.apply(events(list)).await.unwrap();

    let search = |condition: &str, page_size: i32, page_token: String, paths: &[&str]| {
        let mut reads = replica.reads.clone();
        let request = pb::SearchProfilesRequest {
            condition_json: condition.to_owned(),
            page_size,
            page_token,
            read_mask: (!paths.is_empty()).then(|| prost_types::FieldMask {
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            }),
        };
        async move { reads.search_profiles(request).await.map(|r| r.into_inner()) }
    };
    let pro_with_seats = r#"{"all": [
        {"trait": {"name": "plan", "op": "eq", "value": "pro"}},
        {"trait": {"name": "seats", "op": "gte", "value": 4}}]}"#;
    let mut found = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = search(pro_with_seats, 3, token, &["traits.plan"])
            .await
            .unwrap();
        pages += 1;
        for p in &page.profiles {
            assert_eq!(p.traits.keys().collect::<Vec<_>>(), ["plan"], "masked");
            assert_eq!(p.event_count, 0, "masked");
            assert!(p.identifiers.is_empty(), "masked");
        }
        found.extend(page.profiles.into_iter().map(|p| p.profile_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let want: Vec<String> = (4..25).step_by(2).map(|i| format!("p{i:02}")).collect();
    assert_eq!(found, want);
    assert!(pages >= 4, "{pages} pages of 3");

    let none = search(
        r#"{"trait": {"name": "plan", "op": "eq", "value": "team"}}"#,
        10,
        String::new(),
        &[],
    )
    .await
    .unwrap();
    assert!(none.profiles.is_empty() && none.next_page_token.is_empty());

    for (condition, page_size, token, paths, field) in [
        ("{", 10, "", vec![], "condition_json"),
        (
            r#"{"performed": {"event": "Order Completed"}}"#,
            10,
            "",
            vec![],
            "condition_json",
        ),
        (pro_with_seats, 101, "", vec![], "page_size"),
        (pro_with_seats, 10, "junk", vec![], "page_token"),
        (
            pro_with_seats,
            10,
            "",
            vec!["traits", "nope"],
            "read_mask.paths[1]",
        ),
    ] {
        let status = search(condition, page_size, token.to_owned(), &paths)
            .await
            .expect_err("invalid");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
        let details = tonic_types::StatusExt::get_details_bad_request(&status).expect("details");
        assert_eq!(details.field_violations[0].field, field);
    }

    let masked = replica.get_masked("p04", &["traits.name", "scores"]).await;
    assert_eq!(masked.profile_id, "p04");
    assert_eq!(masked.traits.keys().collect::<Vec<_>>(), ["name"]);
    assert!(masked.scores.contains_key("engagement"));
    assert!(masked.version > 0);
    assert!(masked.first_seen.is_none() && masked.audiences.is_empty());
}
