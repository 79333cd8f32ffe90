//! The cache conformance suite (the same tests on Redis and in-process) and the database
//! selection by URL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_store::{
    Backend, Cache, CacheError, Database, DbSettings, RedisCache, Versioned, open_cache,
};
use tessera_testkit::{TestDb, TestSqlite, redis_prefix, redis_url};

fn v(version: i64, bytes: Option<&[u8]>) -> Versioned {
    Versioned {
        version,
        bytes: bytes.map(<[u8]>::to_vec),
    }
}

async fn keeps_the_newest_version(cache: Arc<dyn Cache>) {
    assert_eq!(cache.get("p1").await.unwrap(), None);
    assert!(cache.put_if_newer("p1", v(2, Some(b"two"))).await.unwrap());
    assert!(
        !cache.put_if_newer("p1", v(1, Some(b"one"))).await.unwrap(),
        "older loses"
    );
    assert!(
        !cache
            .put_if_newer("p1", v(2, Some(b"other")))
            .await
            .unwrap(),
        "same version loses"
    );
    assert_eq!(cache.get("p1").await.unwrap(), Some(v(2, Some(b"two"))));
}

async fn tombstones_block_older_fills(cache: Arc<dyn Cache>) {
    assert!(cache.put_if_newer("p2", v(1, Some(b"one"))).await.unwrap());
    // A writer invalidates at version 3; a slow reader that loaded version 2 must not land.
    assert!(cache.put_if_newer("p2", v(3, None)).await.unwrap());
    assert!(
        !cache
            .put_if_newer("p2", v(2, Some(b"stale")))
            .await
            .unwrap()
    );
    assert_eq!(cache.get("p2").await.unwrap(), Some(v(3, None)));
    // A reader that loaded version 3 fills the tombstone.
    assert!(
        cache
            .put_if_newer("p2", v(3, Some(b"three")))
            .await
            .unwrap()
    );
    assert_eq!(cache.get("p2").await.unwrap(), Some(v(3, Some(b"three"))));
    cache.remove("p2").await.unwrap();
    assert_eq!(cache.get("p2").await.unwrap(), None);
}

async fn concurrent_writers_leave_the_highest_version(cache: Arc<dyn Cache>) {
    let tasks: Vec<_> = (1..=50)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .put_if_newer("p3", v(i, Some(format!("v{i}").as_bytes())))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(cache.get("p3").await.unwrap(), Some(v(50, Some(b"v50"))));
}

macro_rules! cache_conformance {
    ($($name:ident),* $(,)?) => {
        mod redis_cache {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let cache = super::open_cache(&super::redis_url(), &super::redis_prefix(), std::time::Duration::from_secs(60)).unwrap();
                    super::$name(cache).await;
                }
            )*
        }
        mod memory_cache {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let cache = super::open_cache("memory://", "", std::time::Duration::from_secs(60)).unwrap();
                    super::$name(cache).await;
                }
            )*
        }
    };
}

cache_conformance!(
    keeps_the_newest_version,
    tombstones_block_older_fills,
    concurrent_writers_leave_the_highest_version,
);

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_redis_fails_fast_and_never_hangs() {
    let cache = RedisCache::new("redis://127.0.0.1:1", "x:", Duration::from_secs(60)).unwrap();
    let first = cache.get("k").await;
    assert!(first.is_err());
    let start = Instant::now();
    for _ in 0..100 {
        let err = cache.get("k").await.unwrap_err();
        assert!(matches!(
            err,
            CacheError::Down | CacheError::Redis(_) | CacheError::Timeout
        ));
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "callers are not queued behind reconnection attempts"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn database_urls_select_the_backend_and_schema() {
    let pg = TestDb::new().await;
    let db = Database::connect(pg.url(), "some_service", &DbSettings::default())
        .await
        .unwrap();
    assert_eq!(db.backend(), Backend::Postgres);
    let Database::Postgres(pool) = &db else {
        unreachable!()
    };
    let path: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(path, "some_service");

    let dir = TestSqlite::new();
    let db = Database::connect(&dir.url("x.db"), "some_service", &DbSettings::default())
        .await
        .unwrap();
    assert_eq!(db.backend(), Backend::Sqlite);
    assert!(dir.path("x.db").exists());

    let err = Database::connect("mysql://u:secret@h/db", "s", &DbSettings::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unsupported") && !err.to_string().contains("secret"));
    assert!(
        Database::connect(pg.url(), "bad\"name", &DbSettings::default())
            .await
            .is_err()
    );
}

/// The pool's use, as the `tessera_db_pool_*` gauges record it: connections lent out count as
/// in use until they come back, idle ones as idle, and the maximum is the configured one.
#[tokio::test(flavor = "multi_thread")]
async fn pool_use_counts_lent_and_idle_connections() {
    let pg = TestDb::new().await;
    let settings = DbSettings {
        max_connections: 7,
        ..DbSettings::default()
    };
    let db = Database::connect(pg.url(), "pool_use", &settings)
        .await
        .unwrap();
    let Database::Postgres(pool) = &db else {
        panic!("a Postgres url");
    };
    let first = pool.acquire().await.unwrap();
    let second = pool.acquire().await.unwrap();
    let lent = db.pool_use();
    assert_eq!((lent.in_use, lent.max), (2, 7), "{lent:?}");
    drop((first, second));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let back = db.pool_use();
    assert_eq!(back.in_use, 0, "{back:?}");
    assert!(back.idle >= 2, "{back:?}");
    db.close().await;
}
