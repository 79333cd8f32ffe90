//! The source store's conformance suite: the same tests against Postgres and SQLite.

use std::sync::Arc;

use tessera_store::{Database, DbSettings};
use tessera_testkit::{TestDb, TestSqlite};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use super::{NewSource, SourceChange, SourceStore, is_unique_violation};
use crate::sources::PlanMode;
use crate::sources::key::{WriteKey, hash};
use crate::{MIGRATIONS, SCHEMA};

/// Keeps the backing database alive for the test's duration (dropping it drops the database).
enum Guard {
    Pg(#[allow(dead_code)] TestDb),
    Sqlite(#[allow(dead_code)] TestSqlite),
}

async fn open(url: &str) -> Arc<dyn SourceStore> {
    let db = Database::connect(url, SCHEMA, &DbSettings::default())
        .await
        .expect("connect");
    db.migrate(MIGRATIONS).await.expect("migrate");
    super::open(db)
}

async fn postgres() -> (Guard, Arc<dyn SourceStore>) {
    let test_db = TestDb::new().await;
    let store = open(test_db.url()).await;
    (Guard::Pg(test_db), store)
}

async fn sqlite() -> (Guard, Arc<dyn SourceStore>) {
    let dir = TestSqlite::new();
    let store = open(&dir.url("ingestion.db")).await;
    (Guard::Sqlite(dir), store)
}

/// Now, at the microsecond precision both backends keep.
fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .expect("valid nanosecond")
}

fn new_source(name: &str, key: &WriteKey) -> NewSource {
    NewSource {
        id: Uuid::now_v7(),
        name: name.to_owned(),
        key_hash: key.hash(),
        key_prefix: key.display_prefix(),
        rate_limit_per_second: None,
        plan_mode: PlanMode::Allow,
        created_at: now(),
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let (_guard, store) = super::postgres().await;
                    super::$name(store).await;
                }
            )*
        }
        mod sqlite_backend {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let (_guard, store) = super::sqlite().await;
                    super::$name(store).await;
                }
            )*
        }
    };
}

conformance!(
    creates_and_finds_sources_by_name_and_key,
    names_and_keys_are_unique,
    disables_and_enables,
    replaces_the_key,
    updates_only_what_is_asked,
    changes_to_unknown_names_find_nothing,
);

async fn creates_and_finds_sources_by_name_and_key(store: Arc<dyn SourceStore>) {
    let key = WriteKey::generate();
    let new = NewSource {
        rate_limit_per_second: Some(250),
        plan_mode: PlanMode::Warn,
        ..new_source("web", &key)
    };
    let created = store.create(&new).await.unwrap();
    assert_eq!(created.id, new.id);
    assert_eq!(created.name, "web");
    assert_eq!(created.key_prefix, key.display_prefix());
    assert!(created.enabled, "sources start enabled");
    assert_eq!(created.rate_limit_per_second, Some(250));
    assert_eq!(created.plan_mode, PlanMode::Warn);
    assert_eq!(created.created_at, new.created_at);
    assert_eq!(created.key_rotated_at, None);

    assert_eq!(store.get("web").await.unwrap(), Some(created.clone()));
    assert_eq!(store.get("nope").await.unwrap(), None);
    assert_eq!(
        store.find_by_key(&key.hash()).await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(store.find_by_key(&hash("tsk_unknown")).await.unwrap(), None);

    let other = store
        .create(&new_source("android", &WriteKey::generate()))
        .await
        .unwrap();
    let names: Vec<_> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec![other.name, created.name], "listed by name");
}

async fn names_and_keys_are_unique(store: Arc<dyn SourceStore>) {
    let key = WriteKey::generate();
    store.create(&new_source("web", &key)).await.unwrap();
    let same_name = store
        .create(&new_source("web", &WriteKey::generate()))
        .await
        .unwrap_err();
    assert!(is_unique_violation(&same_name), "{same_name:?}");
    let same_key = store.create(&new_source("ios", &key)).await.unwrap_err();
    assert!(is_unique_violation(&same_key), "{same_key:?}");
    let other = WriteKey::generate();
    store.create(&new_source("ios", &other)).await.unwrap();
    let reused = store
        .set_key("ios", &key.hash(), &key.display_prefix(), now())
        .await
        .unwrap_err();
    assert!(is_unique_violation(&reused), "{reused:?}");
    assert_eq!(store.list().await.unwrap().len(), 2);
}

async fn disables_and_enables(store: Arc<dyn SourceStore>) {
    let key = WriteKey::generate();
    store.create(&new_source("web", &key)).await.unwrap();
    let disabled = store.set_enabled("web", false).await.unwrap().unwrap();
    assert!(!disabled.enabled);
    let found = store.find_by_key(&key.hash()).await.unwrap().unwrap();
    assert!(
        !found.enabled,
        "a disabled source is still found by its key"
    );
    assert!(
        !store
            .set_enabled("web", false)
            .await
            .unwrap()
            .unwrap()
            .enabled,
        "idempotent"
    );
    let enabled = store.set_enabled("web", true).await.unwrap().unwrap();
    assert!(enabled.enabled);
    assert_eq!(enabled.key_prefix, key.display_prefix(), "same key");
}

async fn replaces_the_key(store: Arc<dyn SourceStore>) {
    let old = WriteKey::generate();
    let created = store.create(&new_source("web", &old)).await.unwrap();
    let new = WriteKey::generate();
    let at = now() + Duration::seconds(1);
    let rotated = store
        .set_key("web", &new.hash(), &new.display_prefix(), at)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rotated.id, created.id);
    assert_eq!(rotated.key_prefix, new.display_prefix());
    assert_eq!(rotated.key_rotated_at, Some(at));
    assert_eq!(rotated.created_at, created.created_at);
    assert_eq!(store.find_by_key(&old.hash()).await.unwrap(), None);
    assert_eq!(store.find_by_key(&new.hash()).await.unwrap(), Some(rotated));
}

async fn updates_only_what_is_asked(store: Arc<dyn SourceStore>) {
    store
        .create(&new_source("web", &WriteKey::generate()))
        .await
        .unwrap();
    let limited = store
        .update(
            "web",
            &SourceChange {
                rate_limit_per_second: Some(Some(100)),
                plan_mode: None,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(limited.rate_limit_per_second, Some(100));
    assert_eq!(limited.plan_mode, PlanMode::Allow);
    let blocking = store
        .update(
            "web",
            &SourceChange {
                rate_limit_per_second: None,
                plan_mode: Some(PlanMode::Block),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(blocking.rate_limit_per_second, Some(100), "limit kept");
    assert_eq!(blocking.plan_mode, PlanMode::Block);
    let unlimited = store
        .update(
            "web",
            &SourceChange {
                rate_limit_per_second: Some(None),
                plan_mode: None,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(unlimited.rate_limit_per_second, None, "limit removed");
    assert_eq!(unlimited.plan_mode, PlanMode::Block, "mode kept");
    assert_eq!(store.get("web").await.unwrap(), Some(unlimited));
}

async fn changes_to_unknown_names_find_nothing(store: Arc<dyn SourceStore>) {
    let key = WriteKey::generate();
    assert_eq!(store.set_enabled("ghost", false).await.unwrap(), None);
    assert_eq!(
        store
            .set_key("ghost", &key.hash(), &key.display_prefix(), now())
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .update("ghost", &SourceChange::default())
            .await
            .unwrap(),
        None
    );
    assert!(store.list().await.unwrap().is_empty());
}
