//! Computed traits and audiences declared through the API: the registry and the store on SQLite
//! and on Postgres (versions, the revision, config's names, replicas folding with definitions
//! another replica stored, the recompute filling and emptying audiences), and
//! `DefinitionService` over gRPC with two replicas on one Postgres and Redis.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tessera_profile::audience::{Audience, Audiences, Condition, Op, Test};
use tessera_profile::computed::{ComputedTrait, Kind};
use tessera_profile::definitions::{Declared, DefinitionKind, Registry, SharedDefinitions, Spec};
use tessera_profile::domain::{Batch, EventDetails, ResolvedEvent};
use tessera_profile::error::ProfileError;
use tessera_profile::store::{self, Definitions, MembershipChange, NoScores, ProfileStore};
use tessera_profile::{MIGRATIONS, Peers, ProfileSettings, Profiles, SCHEMA};
use tessera_proto::common::v1 as common;
use tessera_proto::convert::value_to_json;
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::definition_service_client::DefinitionServiceClient;
use tessera_proto::profile::v1::profile_pipeline_service_client::ProfilePipelineServiceClient;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_server::{GrpcServices, Shutdown};
use tessera_store::{Cache, Database, DbSettings, RedisCache};
use tessera_testkit::{TestDb, redis_prefix, redis_url};
use time::OffsetDateTime;
use time::macros::datetime;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::store_suite::{postgres, sqlite};
use crate::support::{IdentityDouble, Served, event, identify, scoring_server, track};

const NOW: OffsetDateTime = datetime!(2026-06-01 00:00:00 UTC);
const LATER: OffsetDateTime = datetime!(2026-06-02 00:00:00 UTC);
const H: f64 = tessera_core::activity::DEFAULT_HALF_LIFE_SECONDS;

fn count(name: &str) -> ComputedTrait {
    ComputedTrait {
        name: name.to_owned(),
        kind: Kind::Count,
        events: vec!["Order Completed".to_owned()],
        types: Vec::new(),
        property: None,
        window_seconds: None,
    }
}

fn plan_is(name: &str, plan: &str) -> Audience {
    Audience {
        name: name.to_owned(),
        condition: Condition::Trait(Test {
            name: "plan".to_owned(),
            op: Op::Eq,
            value: json!(plan),
        }),
    }
}

/// Config's definitions: a computed trait and an audience.
fn config() -> Definitions {
    Definitions::new(
        vec![count("config_orders")],
        Audiences::compile(vec![plan_is("config_pros", "pro")]).unwrap(),
    )
}

/// The registry keeps a version per definition and bumps one revision per change (not per
/// refused change): a stale version is refused, config's names are read-only, invalid
/// definitions name their field, and another replica reading the store ends up with the same
/// definitions in effect.
async fn definitions_keep_versions_and_one_revision(db: &Database) {
    let shared = Arc::new(SharedDefinitions::new(config()));
    let registry = Registry::new(db.clone(), shared.clone());
    let (listed, revision) = registry.list(DefinitionKind::ComputedTrait).await.unwrap();
    assert_eq!(revision, 0);
    assert_eq!(
        listed,
        [Declared::Config(Spec::ComputedTrait(count(
            "config_orders"
        )))]
    );

    let (orders, revision) = registry
        .create(Spec::ComputedTrait(count("orders")), NOW)
        .await
        .unwrap();
    assert_eq!((orders.version, revision, orders.created_at), (1, 1, NOW));
    let again = registry
        .create(Spec::ComputedTrait(count("orders")), NOW)
        .await;
    assert!(
        matches!(again, Err(ProfileError::DefinitionExists { .. })),
        "{again:?}"
    );
    let (_, revision) = registry
        .create(Spec::Audience(plan_is("pros", "pro")), NOW)
        .await
        .unwrap();
    assert_eq!(revision, 2, "a refused create bumps nothing");

    let spent = ComputedTrait {
        kind: Kind::Sum,
        property: Some("total".to_owned()),
        ..count("orders")
    };
    let (updated, revision) = registry
        .update(Spec::ComputedTrait(spent.clone()), 1, LATER)
        .await
        .unwrap();
    assert_eq!(
        (
            updated.version,
            revision,
            updated.created_at,
            updated.updated_at
        ),
        (2, 3, NOW, LATER)
    );
    let stale = registry
        .update(Spec::ComputedTrait(count("orders")), 1, LATER)
        .await;
    assert!(
        matches!(
            stale,
            Err(ProfileError::VersionMismatch {
                expected: 1,
                actual: 2,
                ..
            })
        ),
        "{stale:?}"
    );
    let unknown = registry
        .update(Spec::ComputedTrait(count("visits")), 1, LATER)
        .await;
    assert!(
        matches!(unknown, Err(ProfileError::DefinitionNotFound { .. })),
        "{unknown:?}"
    );

    // Config's names are taken, and config's definitions change only in config.
    for refused in [
        registry
            .create(Spec::ComputedTrait(count("config_orders")), LATER)
            .await
            .map(|_| ()),
        registry
            .update(Spec::Audience(plan_is("config_pros", "free")), 1, LATER)
            .await
            .map(|_| ()),
        registry
            .delete(DefinitionKind::ComputedTrait, "config_orders", None, LATER)
            .await
            .map(|_| ()),
    ] {
        assert!(
            matches!(refused, Err(ProfileError::DeclaredInConfig { .. })),
            "{refused:?}"
        );
    }
    // Validated as config is: the error names the field.
    let invalid = registry
        .create(
            Spec::ComputedTrait(ComputedTrait {
                kind: Kind::Sum,
                ..count("total")
            }),
            LATER,
        )
        .await;
    match invalid {
        Err(ProfileError::InvalidArgument(violations)) => {
            assert_eq!(violations[0].field, "property");
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }

    let (listed, revision) = registry.list(DefinitionKind::ComputedTrait).await.unwrap();
    assert_eq!(revision, 3, "refused changes bump nothing");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].spec(), &Spec::ComputedTrait(spent.clone()));
    assert!(matches!(&listed[1], Declared::Stored(s) if s.version == 2));
    assert!(matches!(
        registry.get(DefinitionKind::Audience, "config_pros").await,
        Ok(Declared::Config(_))
    ));
    assert!(matches!(
        registry.get(DefinitionKind::Audience, "pros").await,
        Ok(Declared::Stored(s)) if s.version == 1
    ));
    assert!(matches!(
        registry.get(DefinitionKind::Audience, "orders").await,
        Err(ProfileError::DefinitionNotFound { .. })
    ));

    // In effect here at once: config's first, then the stored ones.
    let current = shared.current();
    assert_eq!(current.revision, 3);
    let names: Vec<&str> = current.declared().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["config_orders", "orders"]);
    let audiences: Vec<&str> = current
        .audiences
        .declared()
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(audiences, ["config_pros", "pros"]);

    let stale = registry
        .delete(DefinitionKind::ComputedTrait, "orders", Some(1), LATER)
        .await;
    assert!(
        matches!(stale, Err(ProfileError::VersionMismatch { actual: 2, .. })),
        "{stale:?}"
    );
    let revision = registry
        .delete(DefinitionKind::ComputedTrait, "orders", Some(2), LATER)
        .await
        .unwrap();
    assert_eq!(revision, 4);
    let gone = registry
        .delete(DefinitionKind::ComputedTrait, "orders", None, LATER)
        .await;
    assert!(
        matches!(gone, Err(ProfileError::DefinitionNotFound { .. })),
        "{gone:?}"
    );
    assert_eq!(shared.current().declared().len(), 1);

    // Another replica (same config) reads the same definitions.
    let other = Arc::new(SharedDefinitions::new(config()));
    let replica = Registry::new(db.clone(), other.clone());
    assert!(replica.refresh().await.unwrap());
    assert!(!replica.refresh().await.unwrap(), "nothing new");
    assert_eq!(other.current().revision, 4);
    assert_eq!(
        other.current().fingerprint(),
        shared.current().fingerprint()
    );
}

#[tokio::test]
async fn definitions_keep_versions_and_one_revision_on_sqlite() {
    definitions_keep_versions_and_one_revision(&sqlite().await.db).await;
}

#[tokio::test]
async fn definitions_keep_versions_and_one_revision_on_postgres() {
    let backend = postgres().await;
    definitions_keep_versions_and_one_revision(&backend.db).await;
    backend.db.close().await;
}

/// An `Order Completed` track of `profile_id` at minute `minute`.
fn order(id: &str, profile_id: &str, minute: i64) -> ResolvedEvent {
    ResolvedEvent {
        details: EventDetails {
            message_id: format!("m-{id}"),
            kind: "track".into(),
            event: "Order Completed".into(),
            ..EventDetails::default()
        },
        ..event(id, profile_id, minute, profile_id, json!({}))
    }
}

fn events(events: Vec<ResolvedEvent>) -> Batch {
    Batch {
        merges: vec![],
        events,
    }
}

/// Runs the recompute to its end, chunks taken by `stores` in turn; returns the chunks.
async fn recompute(stores: &[&dyn ProfileStore]) -> usize {
    let mut chunks = 0;
    'rounds: loop {
        for store in stores {
            match store.recompute(1, H, NOW, &NoScores).await.unwrap() {
                Some(_) => chunks += 1,
                None => break 'rounds,
            }
            assert!(chunks < 100, "the recompute ends");
        }
    }
    chunks
}

fn orders_of(profile: &tessera_profile::domain::Profile, defs: &Definitions) -> Option<i64> {
    profile
        .state
        .computed
        .values(&defs.computed, NOW)
        .get("orders")
        .and_then(|v| v.value.as_i64())
}

/// A replica folds with definitions another replica stored, from its very next write (its
/// transaction reads the revision); the profiles stored before are recomputed, once, with the
/// replicas taking turns; a new audience fills up through that recompute and a deleted one
/// empties, with its exits in the change stream.
async fn stored_definitions_reach_every_replica_and_recompute(db: &Database) {
    // Replica A never refreshes its definitions by hand; replica B declares them.
    let a_defs = Arc::new(SharedDefinitions::default());
    let a = store::open_shared(db.clone(), a_defs.clone());
    let b_defs = Arc::new(SharedDefinitions::default());
    let b = store::open_shared(db.clone(), b_defs.clone());
    let registry = Registry::new(db.clone(), b_defs.clone());
    let before = vec![
        event("e1", "p1", 1, "u1", json!({"plan": "pro"})),
        order("e2", "p1", 2),
        event("e3", "p2", 3, "u2", json!({"plan": "free"})),
    ];
    a.apply(&events(before), H, NOW, &NoScores).await.unwrap();
    assert!(a.start_recompute(NOW).await.unwrap(), "never recorded");
    recompute(&[a.as_ref()]).await;
    assert!(!a.start_recompute(NOW).await.unwrap());

    registry
        .create(Spec::Audience(plan_is("pros", "pro")), NOW)
        .await
        .unwrap();
    registry
        .create(Spec::ComputedTrait(count("orders")), NOW)
        .await
        .unwrap();
    assert_eq!(a_defs.current().revision, 0, "A has not looked yet");

    let applied = a
        .apply(
            &events(vec![
                event("e4", "p3", 4, "u3", json!({"plan": "pro"})),
                order("e5", "p3", 5),
            ]),
            H,
            NOW,
            &NoScores,
        )
        .await
        .unwrap();
    assert_eq!(a_defs.current().revision, 2, "the write read the revision");
    assert_eq!(
        applied.audiences,
        [MembershipChange {
            audience: "pros".to_owned(),
            profile_id: "p3".to_owned(),
            entered: true,
        }]
    );
    let p3 = a.get("p3").await.unwrap().unwrap();
    assert_eq!(orders_of(&p3, &a_defs.current()), Some(1));
    let p1 = a.get("p1").await.unwrap().unwrap();
    assert_eq!(
        orders_of(&p1, &a_defs.current()),
        Some(0),
        "not recomputed yet"
    );

    // Both replicas see the change; one recompute runs, chunks taken in turns.
    assert!(a.start_recompute(NOW).await.unwrap());
    assert!(b.start_recompute(NOW).await.unwrap(), "B joins it");
    assert_eq!(recompute(&[a.as_ref(), b.as_ref()]).await, 3);
    assert!(!a.start_recompute(NOW).await.unwrap());
    assert!(!b.start_recompute(NOW).await.unwrap());
    let p1 = a.get("p1").await.unwrap().unwrap();
    assert_eq!(orders_of(&p1, &a_defs.current()), Some(1));
    let (members, count) = a.audience_members("pros", None, 10).await.unwrap();
    assert_eq!(
        (members, count),
        (vec!["p1".to_owned(), "p3".to_owned()], 2)
    );

    // Deleting the audience empties it through the next recompute.
    registry
        .delete(DefinitionKind::Audience, "pros", None, LATER)
        .await
        .unwrap();
    assert!(a.start_recompute(NOW).await.unwrap());
    recompute(&[b.as_ref(), a.as_ref()]).await;
    let (members, count) = b.audience_members("pros", None, 10).await.unwrap();
    assert_eq!((members.len(), count), (0, 0));
    // The Postgres change stream shows a change once every transaction before it has
    // committed: read until the four are there (or 20 s have passed).
    let audience_kind = |c: &tessera_profile::store::ProfileChange| c.kind.starts_with("audience_");
    let changes = crate::store_suite::changes_until(a.as_ref(), |read| {
        read.iter().filter(|c| audience_kind(c)).count() >= 4
    })
    .await;
    let mut audience_changes: Vec<(String, String)> = changes
        .iter()
        .filter(|c| c.kind.starts_with("audience_"))
        .map(|c| (c.profile_id.clone(), c.kind.clone()))
        .collect();
    audience_changes.sort();
    assert_eq!(
        audience_changes,
        [
            ("p1".to_owned(), "audience_entered".to_owned()),
            ("p1".to_owned(), "audience_exited".to_owned()),
            ("p3".to_owned(), "audience_entered".to_owned()),
            ("p3".to_owned(), "audience_exited".to_owned()),
        ]
    );
}

#[tokio::test]
async fn stored_definitions_reach_every_replica_and_recompute_on_sqlite() {
    stored_definitions_reach_every_replica_and_recompute(&sqlite().await.db).await;
}

#[tokio::test]
async fn stored_definitions_reach_every_replica_and_recompute_on_postgres() {
    let backend = postgres().await;
    stored_definitions_reach_every_replica_and_recompute(&backend.db).await;
    backend.db.close().await;
}

/// Postgres, Redis, the scoring service and the identity double, shared by two replicas that
/// run their sweepers, as in production.
struct Cluster {
    db: TestDb,
    redis_prefix: String,
    scoring: Served,
    identity: Served,
    _double: IdentityDouble,
    stop: Shutdown,
}

impl Cluster {
    async fn new() -> Self {
        let double = IdentityDouble::default();
        Self {
            db: TestDb::new().await,
            redis_prefix: redis_prefix(),
            scoring: scoring_server().await,
            identity: double.serve().await,
            _double: double,
            stop: Shutdown::new(),
        }
    }

    async fn replica(&self) -> Node {
        let db = Database::connect(self.db.url(), SCHEMA, &DbSettings::default())
            .await
            .unwrap();
        db.migrate(MIGRATIONS).await.unwrap();
        let cache: Arc<dyn Cache> = Arc::new(
            RedisCache::new(&redis_url(), &self.redis_prefix, Duration::from_secs(60)).unwrap(),
        );
        let settings = ProfileSettings {
            computed_traits: vec![count("config_orders")],
            ..ProfileSettings::default()
        };
        let peers = Peers {
            identity: self.identity.lazy_channel(),
            scoring: self.scoring.lazy_channel(),
            ingestion: self.identity.lazy_channel(),
        };
        let profiles = Profiles::new(db, cache, peers, settings);
        let mut services = GrpcServices::default();
        profiles.register(&mut services);
        let served = Served::start(services).await;
        profiles.spawn_sweeper(Duration::from_millis(50), self.stop.clone());
        let channel = served.lazy_channel();
        Node {
            reads: ProfileServiceClient::new(channel.clone()),
            writes: ProfilePipelineServiceClient::new(channel.clone()),
            definitions: DefinitionServiceClient::new(channel),
            _served: served,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Node {
    reads: ProfileServiceClient<Channel>,
    writes: ProfilePipelineServiceClient<Channel>,
    definitions: DefinitionServiceClient<Channel>,
    _served: Served,
}

impl Node {
    async fn apply(&self, events: Vec<pb::ResolvedEvent>) {
        self.writes
            .clone()
            .apply_events(pb::ApplyEventsRequest {
                merges: vec![],
                events,
            })
            .await
            .unwrap();
    }

    async fn profile(&self, id: &str) -> pb::Profile {
        self.reads
            .clone()
            .get_profile(pb::GetProfileRequest {
                lookup: Some(pb::get_profile_request::Lookup::ProfileId(id.to_owned())),
                as_of: None,
                read_mask: None,
            })
            .await
            .unwrap()
            .into_inner()
            .profile
            .unwrap()
    }

    /// Waits (20 s at most) until `done` holds for the profile `id`, and returns it.
    async fn profile_until(&self, id: &str, done: impl Fn(&pb::Profile) -> bool) -> pb::Profile {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let profile = self.profile(id).await;
            if done(&profile) || std::time::Instant::now() > deadline {
                return profile;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The audience changes of the stream, from its beginning, once `count` have arrived.
    async fn audience_changes(&self, count: usize) -> Vec<(String, String, String)> {
        let mut stream = self
            .reads
            .clone()
            .watch_profile_changes(pb::WatchProfileChangesRequest {
                cursor: "beginning".to_owned(),
                kinds: vec!["audience_entered".to_owned(), "audience_exited".to_owned()],
                audiences: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while out.len() < count {
            let change = tokio::time::timeout(Duration::from_secs(20), stream.message())
                .await
                .expect("a change within 20 s")
                .unwrap()
                .expect("the stream goes on");
            out.push((change.profile_id, change.kind, change.audience));
        }
        out.sort();
        out
    }
}

fn pro_audience() -> pb::AudienceDefinition {
    pb::AudienceDefinition {
        name: "pros".to_owned(),
        condition_json: r#"{"trait": {"name": "plan", "op": "eq", "value": "pro"}}"#.to_owned(),
        ..Default::default()
    }
}

fn fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// Over gRPC, with two replicas on one Postgres and Redis: bad definitions get INVALID_ARGUMENT
/// naming the field, clashes and stale versions their codes; an audience created through one
/// replica is evaluated by the other on its next event, the profiles stored before enter it
/// through the background recompute, and deleting it makes them exit; a computed trait created
/// through one counts the other's next event.
#[tokio::test]
async fn definitions_declared_through_one_replica_are_used_by_another() {
    let cluster = Cluster::new().await;
    let a = cluster.replica().await;
    let b = cluster.replica().await;
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let minute = time::Duration::minutes(1);
    a.apply(vec![
        identify("e1", "p1", "u1", now - minute * 10, json!({"plan": "pro"})),
        identify("e2", "p2", "u2", now - minute * 9, json!({"plan": "free"})),
    ])
    .await;

    let mut api = b.definitions.clone();
    let created = api
        .create_audience(pb::CreateAudienceRequest {
            audience: Some(pro_audience()),
        })
        .await
        .unwrap()
        .into_inner();
    let audience = created.audience.unwrap();
    assert_eq!(
        (audience.version, audience.source()),
        (1, pb::DefinitionSource::Api)
    );
    assert!(audience.create_time.is_some());

    // Refusals, each with its code.
    let exists = api
        .create_audience(pb::CreateAudienceRequest {
            audience: Some(pro_audience()),
        })
        .await
        .unwrap_err();
    assert_eq!(exists.code(), Code::AlreadyExists);
    let bad_json = api
        .create_audience(pb::CreateAudienceRequest {
            audience: Some(pb::AudienceDefinition {
                condition_json: r#"{"trait": {"name": "plan", "op": "is"}}"#.to_owned(),
                ..pro_audience()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_json.code(), Code::InvalidArgument);
    assert_eq!(fields(&bad_json), ["audience.condition_json"]);
    let no_property = api
        .create_computed_trait(pb::CreateComputedTraitRequest {
            computed_trait: Some(pb::ComputedTraitDefinition {
                name: "spent".to_owned(),
                kind: pb::ComputedTraitKind::Sum.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(no_property.code(), Code::InvalidArgument);
    assert_eq!(fields(&no_property), ["computed_trait.property"]);
    let no_kind = api
        .create_computed_trait(pb::CreateComputedTraitRequest {
            computed_trait: Some(pb::ComputedTraitDefinition {
                name: "spent".to_owned(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(fields(&no_kind), ["computed_trait.kind"]);
    let config_name = api
        .delete_computed_trait(pb::DeleteComputedTraitRequest {
            name: "config_orders".to_owned(),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(config_name.code(), Code::FailedPrecondition);
    let stale = api
        .update_audience(pb::UpdateAudienceRequest {
            audience: Some(pro_audience()),
            expected_version: 7,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let unversioned = api
        .update_audience(pb::UpdateAudienceRequest {
            audience: Some(pro_audience()),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(fields(&unversioned), ["expected_version"]);

    // Replica A evaluates the audience on its next event, at once.
    a.apply(vec![identify(
        "e3",
        "p3",
        "u3",
        now - minute * 8,
        json!({"plan": "pro"}),
    )])
    .await;
    assert_eq!(a.profile("p3").await.audiences, ["pros"]);
    // The profile stored before enters it through the background recompute.
    let p1 = b.profile_until("p1", |p| p.audiences == ["pros"]).await;
    assert_eq!(p1.audiences, ["pros"]);
    assert!(a.profile("p2").await.audiences.is_empty());
    let listed = a
        .definitions
        .clone()
        .list_audience_definitions(pb::ListAudienceDefinitionsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.audiences.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["pros"]);

    // A computed trait declared through A counts B's next event.
    a.definitions
        .clone()
        .create_computed_trait(pb::CreateComputedTraitRequest {
            computed_trait: Some(pb::ComputedTraitDefinition {
                name: "orders".to_owned(),
                kind: pb::ComputedTraitKind::Count.into(),
                events: vec!["Order Completed".to_owned()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    b.apply(vec![track("e4", "p2", "u2", now - minute * 7)])
        .await;
    let p2 = b.profile("p2").await;
    let orders = p2
        .computed_traits
        .get("orders")
        .and_then(|c| c.value.clone());
    assert_eq!(orders.as_ref().map(value_to_json), Some(json!(1)));

    // Deleting the audience (at the version read) makes its members exit.
    let version = api
        .get_audience(pb::GetAudienceRequest {
            name: "pros".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .audience
        .unwrap()
        .version;
    api.delete_audience(pb::DeleteAudienceRequest {
        name: "pros".to_owned(),
        expected_version: version,
    })
    .await
    .unwrap();
    let p1 = a.profile_until("p1", |p| p.audiences.is_empty()).await;
    assert!(p1.audiences.is_empty());
    let p3 = b.profile_until("p3", |p| p.audiences.is_empty()).await;
    assert!(p3.audiences.is_empty());
    let pros = |who: &str, kind: &str| (who.to_owned(), kind.to_owned(), "pros".to_owned());
    assert_eq!(
        a.audience_changes(4).await,
        [
            pros("p1", "audience_entered"),
            pros("p1", "audience_exited"),
            pros("p3", "audience_entered"),
            pros("p3", "audience_exited"),
        ]
    );
    let gone = api
        .get_audience(pb::GetAudienceRequest {
            name: "pros".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

/// A group call as the pipeline sends it: `profile_id` (user `user`) names `account`, with
/// account `traits`.
fn group(
    event_id: &str,
    profile_id: &str,
    user: &str,
    account: &str,
    timestamp: OffsetDateTime,
    traits: serde_json::Value,
) -> pb::ResolvedEvent {
    let mut e = identify(event_id, profile_id, user, timestamp, traits);
    let event = e.event.as_mut().unwrap();
    event.r#type = common::EventType::Group as i32;
    event.group_id = account.to_owned();
    e
}

/// Over gRPC, with two replicas on one Postgres and Redis: an audience on an account trait
/// (declared through one replica). A group call through A that makes the account a software
/// company puts its sender in the audience at once and the account's other member, whose
/// profile B had cached, within the account refresh: read through B, and streamed. The next
/// change of the account's industry takes both out again.
#[tokio::test]
async fn account_traits_reach_every_member_across_replicas() {
    let cluster = Cluster::new().await;
    let a = cluster.replica().await;
    let b = cluster.replica().await;
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let minute = time::Duration::minutes(1);
    b.definitions
        .clone()
        .create_audience(pb::CreateAudienceRequest {
            audience: Some(pb::AudienceDefinition {
                name: "software".to_owned(),
                condition_json:
                    r#"{"account": {"name": "industry", "op": "eq", "value": "Software"}}"#
                        .to_owned(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();

    // p2 joins acme before it has an industry; B reads (and caches) p2.
    a.apply(vec![group(
        "g1",
        "p2",
        "u2",
        "acme",
        now - minute * 10,
        json!({}),
    )])
    .await;
    assert!(b.profile("p2").await.audiences.is_empty());

    a.apply(vec![group(
        "g2",
        "p1",
        "u1",
        "acme",
        now - minute * 9,
        json!({"industry": "Software", "employees": 40}),
    )])
    .await;
    assert_eq!(a.profile("p1").await.audiences, ["software"]);
    let p2 = b.profile_until("p2", |p| p.audiences == ["software"]).await;
    assert_eq!(p2.audiences, ["software"], "the other member enters too");
    let entered = |id: &str| {
        (
            id.to_owned(),
            "audience_entered".to_owned(),
            "software".to_owned(),
        )
    };
    assert_eq!(b.audience_changes(2).await, [entered("p1"), entered("p2")]);

    a.apply(vec![group(
        "g3",
        "p2",
        "u2",
        "acme",
        now - minute * 8,
        json!({"industry": "Retail"}),
    )])
    .await;
    assert!(a.profile("p2").await.audiences.is_empty());
    let p1 = b.profile_until("p1", |p| p.audiences.is_empty()).await;
    assert!(
        p1.audiences.is_empty(),
        "the sender of the first call exits too"
    );
}
