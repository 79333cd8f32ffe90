//! Authentication, rate limits and administration of sources through `Ingestion`, on a real
//! database.

use std::time::Duration;

use tessera_store::{Database, DbSettings};
use tessera_testkit::{TestDb, TestSqlite};

use super::store::SourceChange;
use super::{DEV_SOURCE, DevSource, KEY_CACHE_TTL, PlanMode, SourceError};
use crate::{IngestError, Ingestion, IngestionSettings, MIGRATIONS, SCHEMA};

async fn ingestion(url: &str) -> Ingestion {
    let db = Database::connect(url, SCHEMA, &DbSettings::default())
        .await
        .expect("connect");
    db.migrate(MIGRATIONS).await.expect("migrate");
    Ingestion::new(db, IngestionSettings::default())
        .await
        .expect("ingestion")
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let dir = tessera_testkit::TestSqlite::new();
                    super::$name(super::ingestion(&dir.url("ingestion.db")).await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let db = tessera_testkit::TestDb::new().await;
                    super::$name(super::ingestion(db.url()).await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    only_known_enabled_keys_authenticate,
    a_disabled_key_is_refused_at_once_on_the_replica_that_disabled_it,
    a_rotated_key_stops_working_and_the_new_one_works,
    over_the_rate_limit_is_rate_limited,
    administration_validates_and_reports_conflicts,
    dev_mode_creates_the_default_source_once_and_can_fix_its_key,
);

fn is_unauthenticated(r: &Result<super::Source, IngestError>) -> bool {
    matches!(r, Err(IngestError::Unauthenticated))
}

async fn only_known_enabled_keys_authenticate(ing: Ingestion) {
    let (record, key) = ing
        .add_source("web", Some(100), PlanMode::Warn)
        .await
        .unwrap();
    let source = ing.authenticate(key.expose()).await.unwrap();
    assert_eq!(source.id, record.id);
    assert_eq!(source.name, "web");
    assert_eq!(source.rate_limit_per_second, Some(100));
    assert_eq!(source.plan_mode, PlanMode::Warn);
    // Cached now: the same answer again.
    assert_eq!(ing.authenticate(key.expose()).await.unwrap(), source);

    assert!(is_unauthenticated(&ing.authenticate("").await));
    assert!(is_unauthenticated(&ing.authenticate("tsk_nobody").await));
    // A near miss: the key with its last character changed.
    let mut near = key.expose().to_owned();
    let last = near.pop().unwrap();
    near.push(if last == 'A' { 'B' } else { 'A' });
    assert!(is_unauthenticated(&ing.authenticate(&near).await));
    assert!(is_unauthenticated(
        &ing.authenticate(&"k".repeat(10_000)).await
    ));
}

async fn a_disabled_key_is_refused_at_once_on_the_replica_that_disabled_it(ing: Ingestion) {
    let (_, key) = ing.add_source("web", None, PlanMode::Allow).await.unwrap();
    ing.authenticate(key.expose()).await.expect("enabled");
    let disabled = ing.set_source_enabled("web", false).await.unwrap();
    assert!(!disabled.enabled);
    assert!(is_unauthenticated(&ing.authenticate(key.expose()).await));
    ing.set_source_enabled("web", true).await.unwrap();
    ing.authenticate(key.expose())
        .await
        .expect("enabled again, same key");
}

async fn a_rotated_key_stops_working_and_the_new_one_works(ing: Ingestion) {
    let (created, old) = ing.add_source("web", None, PlanMode::Allow).await.unwrap();
    ing.authenticate(old.expose())
        .await
        .expect("old key, cached");
    let (rotated, new) = ing.rekey_source("web").await.unwrap();
    assert_ne!(old, new);
    assert_eq!(rotated.id, created.id);
    assert_eq!(rotated.key_prefix, new.display_prefix());
    assert!(rotated.key_rotated_at.is_some());
    assert!(is_unauthenticated(&ing.authenticate(old.expose()).await));
    let source = ing.authenticate(new.expose()).await.unwrap();
    assert_eq!(
        source.id, created.id,
        "events keep going to the same source"
    );
}

async fn over_the_rate_limit_is_rate_limited(ing: Ingestion) {
    let (_, key) = ing
        .add_source("web", Some(5), PlanMode::Allow)
        .await
        .unwrap();
    let source = ing.authenticate(key.expose()).await.unwrap();
    ing.check_rate(&source, 3).expect("within the limit");
    ing.check_rate(&source, 2).expect("at the limit");
    match ing.check_rate(&source, 1) {
        Err(IngestError::RateLimited { retry_after }) => {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_millis(200));
        }
        other => panic!("want RateLimited, got {other:?}"),
    }
    let (_, free) = ing.add_source("free", None, PlanMode::Allow).await.unwrap();
    let free = ing.authenticate(free.expose()).await.unwrap();
    ing.check_rate(&free, 100_000).expect("no limit");
}

async fn administration_validates_and_reports_conflicts(ing: Ingestion) {
    for bad in ["", "has space", "-leading", &"x".repeat(65), "ünï"] {
        match ing.add_source(bad, None, PlanMode::Allow).await {
            Err(SourceError::Invalid(v)) => assert_eq!(v[0].field, "name"),
            other => panic!("{bad:?}: want Invalid, got {other:?}"),
        }
    }
    ing.add_source("web.eu-1_a", None, PlanMode::Allow)
        .await
        .unwrap();
    match ing.add_source("web.eu-1_a", None, PlanMode::Allow).await {
        Err(SourceError::AlreadyExists(v)) => assert_eq!(v.field, "name"),
        other => panic!("want AlreadyExists, got {other:?}"),
    }
    assert!(matches!(
        ing.source_named("ghost").await,
        Err(SourceError::NotFound(_))
    ));
    assert!(matches!(
        ing.rekey_source("ghost").await,
        Err(SourceError::NotFound(_))
    ));
    let changed = ing
        .change_source(
            "web.eu-1_a",
            SourceChange {
                rate_limit_per_second: Some(Some(7)),
                plan_mode: Some(PlanMode::Block),
            },
        )
        .await
        .unwrap();
    assert_eq!(changed.rate_limit_per_second, Some(7));
    assert_eq!(changed.plan_mode, PlanMode::Block);
    assert_eq!(ing.all_sources().await.unwrap(), vec![changed]);
}

async fn dev_mode_creates_the_default_source_once_and_can_fix_its_key(ing: Ingestion) {
    let DevSource::Created(first) = ing.ensure_dev_source(None).await.unwrap() else {
        panic!("created on first start");
    };
    let source = ing.authenticate(&first).await.unwrap();
    assert_eq!(source.name, DEV_SOURCE);
    assert!(matches!(
        ing.ensure_dev_source(None).await.unwrap(),
        DevSource::Existing
    ));
    ing.authenticate(&first).await.expect("key unchanged");

    let DevSource::Fixed(fixed) = ing.ensure_dev_source(Some("my-dev-key")).await.unwrap() else {
        panic!("fixed");
    };
    assert_eq!(fixed, "my-dev-key");
    assert!(is_unauthenticated(&ing.authenticate(&first).await));
    assert_eq!(ing.authenticate("my-dev-key").await.unwrap().id, source.id);
    let rotated = ing.source_named(DEV_SOURCE).await.unwrap().key_rotated_at;
    // The same fixed key again changes nothing.
    ing.ensure_dev_source(Some("my-dev-key")).await.unwrap();
    assert_eq!(
        ing.source_named(DEV_SOURCE).await.unwrap().key_rotated_at,
        rotated
    );
    assert!(matches!(
        ing.ensure_dev_source(Some("bad key")).await,
        Err(SourceError::Invalid(_))
    ));
    // A fixed key that another source has is refused.
    let (_, other) = ing
        .add_source("other", None, PlanMode::Allow)
        .await
        .unwrap();
    match ing.ensure_dev_source(Some(other.expose())).await {
        Err(SourceError::AlreadyExists(v)) => assert_eq!(v.field, "write_key"),
        other => panic!("want AlreadyExists, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_mode_with_a_fixed_key_creates_the_source_with_it() {
    let dir = TestSqlite::new();
    let ing = ingestion(&dir.url("ingestion.db")).await;
    assert!(matches!(
        ing.ensure_dev_source(Some("fixed-from-the-start"))
            .await
            .unwrap(),
        DevSource::Fixed(_)
    ));
    let source = ing.authenticate("fixed-from-the-start").await.unwrap();
    assert_eq!(source.name, DEV_SOURCE);
}

/// Two replicas on one database: a key disabled through one keeps working on the other only
/// until the other's cache entry expires.
#[tokio::test(flavor = "multi_thread")]
async fn another_replica_refuses_a_disabled_key_within_the_cache_ttl() {
    let db = TestDb::new().await;
    let (a, b) = (ingestion(db.url()).await, ingestion(db.url()).await);
    let (_, key) = a.add_source("web", None, PlanMode::Allow).await.unwrap();
    b.authenticate(key.expose())
        .await
        .expect("b caches the key");
    a.set_source_enabled("web", false).await.unwrap();
    assert!(is_unauthenticated(&a.authenticate(key.expose()).await));
    let disabled_at = tokio::time::Instant::now();
    loop {
        if is_unauthenticated(&b.authenticate(key.expose()).await) {
            break;
        }
        assert!(
            disabled_at.elapsed() <= KEY_CACHE_TTL + Duration::from_secs(1),
            "b still accepts the disabled key after the TTL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
