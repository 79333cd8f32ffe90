//! The cache conformance suite (the same tests on Redis, Redis with a near cache, and
//! in-process), the near cache across replicas and when tracking is lost, and the database
//! selection by URL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_store::{
    Backend, Cache, CacheError, Database, DbSettings, NearCacheSettings, NearCacheStats,
    RedisCache, Versioned, open_cache,
};
use tessera_testkit::{TestDb, TestSqlite, redis_prefix, redis_url};

fn v(version: i64, bytes: Option<&[u8]>) -> Versioned {
    Versioned {
        version,
        bytes: bytes.map(bytes::Bytes::copy_from_slice),
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
                    let off = super::NearCacheSettings { enabled: false, ..Default::default() };
                    let cache = super::open_cache(&super::redis_url(), &super::redis_prefix(), std::time::Duration::from_secs(60), &off).unwrap();
                    super::$name(cache).await;
                }
            )*
        }
        mod redis_near_cache {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let cache = super::near_cache(&super::redis_prefix()).await;
                    super::$name(std::sync::Arc::new(cache)).await;
                }
            )*
        }
        mod memory_cache {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let cache = super::open_cache("memory://", "", std::time::Duration::from_secs(60), &Default::default()).unwrap();
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

/// A Redis cache with a near cache on `prefix`, tracking.
async fn near_cache(prefix: &str) -> RedisCache {
    let cache = RedisCache::with_near_cache(
        &redis_url(),
        prefix,
        Duration::from_secs(60),
        &NearCacheSettings::default(),
    )
    .unwrap();
    // The first read starts tracking.
    cache.get("warm-up").await.unwrap();
    near_until(&cache, "tracking up", |s| s.tracking_client.is_some()).await;
    cache
}

/// Waits (at most 5 s) until `cache`'s near-cache stats satisfy `done`.
async fn near_until(
    cache: &RedisCache,
    what: &str,
    done: impl Fn(&NearCacheStats) -> bool,
) -> NearCacheStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = cache.near_cache_stats().expect("a near cache");
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "never {what}: {stats:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What `cache` answers for `key` once it answers `expected`, or after `bound`.
async fn seen_within(
    cache: &RedisCache,
    key: &str,
    expected: &Versioned,
    bound: Duration,
) -> Option<Versioned> {
    let deadline = Instant::now() + bound;
    loop {
        let got = cache.get(key).await.unwrap();
        if got.as_ref() == Some(expected) || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Two replicas with near caches on one Redis: every change one makes (a newer version, a
/// tombstone, a fill) reaches the other's reads within the bound, and once seen is never
/// followed by an older answer; repeated reads are answered in process.
#[tokio::test(flavor = "multi_thread")]
async fn near_caches_of_two_replicas_see_each_others_writes() {
    let prefix = redis_prefix();
    let (a, b) = tokio::join!(near_cache(&prefix), near_cache(&prefix));
    let pushed = b.near_cache_stats().unwrap().invalidations;
    assert!(a.put_if_newer("n", v(1, Some(b"one"))).await.unwrap());
    near_until(&b, "invalidated", |s| s.invalidations > pushed).await;
    for _ in 0..5 {
        assert_eq!(b.get("n").await.unwrap(), Some(v(1, Some(b"one"))));
    }
    let stats = b.near_cache_stats().unwrap();
    assert!(
        stats.hits >= 4,
        "repeated reads are answered in process: {stats:?}"
    );

    let mut version = 1;
    for round in 0..30 {
        version += 1;
        let change = match round % 3 {
            0 => v(version, Some(format!("v{version}").as_bytes())),
            1 => v(version, None),
            _ => v(version, Some(b"fill")),
        };
        let (writer, reader) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        // The reader holds the previous value near.
        let _ = reader.get("n").await.unwrap();
        assert!(writer.put_if_newer("n", change.clone()).await.unwrap());
        assert_eq!(
            writer.get("n").await.unwrap(),
            Some(change.clone()),
            "own write"
        );
        let seen = seen_within(reader, "n", &change, Duration::from_secs(1)).await;
        assert_eq!(seen, Some(change.clone()), "round {round}");
        for _ in 0..3 {
            let again = reader.get("n").await.unwrap().unwrap();
            assert!(
                again.version >= version,
                "round {round}: went back to {again:?}"
            );
        }
    }
}

/// Killing the tracking connection drops every near entry and sends reads to Redis until
/// tracking is back (then empty): a write made while the connection was gone, whose
/// invalidation was never pushed, is never answered with the old value.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_tracking_connection_serves_no_stale_entry() {
    let prefix = redis_prefix();
    let reader = near_cache(&prefix).await;
    let writer = RedisCache::new(&redis_url(), &prefix, Duration::from_secs(60)).unwrap();
    let pushed = reader.near_cache_stats().unwrap().invalidations;
    assert!(writer.put_if_newer("k", v(1, Some(b"one"))).await.unwrap());
    near_until(&reader, "invalidated", |s| s.invalidations > pushed).await;
    assert_eq!(reader.get("k").await.unwrap(), Some(v(1, Some(b"one"))));
    assert_eq!(reader.get("k").await.unwrap(), Some(v(1, Some(b"one"))));
    let before = reader.near_cache_stats().unwrap();
    assert!(before.hits >= 1, "held near: {before:?}");
    let killed = before.tracking_client.unwrap();

    let mut admin = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let n: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(killed)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(n, 1, "the tracking connection was killed");
    // Written while no connection tracks: no invalidation will ever come for it.
    assert!(writer.put_if_newer("k", v(2, Some(b"two"))).await.unwrap());
    let lost = near_until(&reader, "lose tracking", |s| {
        s.tracking_client != Some(killed) && s.resets > before.resets
    })
    .await;
    assert_eq!(
        reader.get("k").await.unwrap(),
        Some(v(2, Some(b"two"))),
        "{lost:?}"
    );

    // Tracking comes back on a new connection, with an empty near cache.
    let back = near_until(&reader, "track again", |s| {
        s.tracking_client.is_some_and(|id| id != killed)
    })
    .await;
    for _ in 0..3 {
        assert_eq!(reader.get("k").await.unwrap(), Some(v(2, Some(b"two"))));
    }
    let after = reader.near_cache_stats().unwrap();
    assert!(
        after.misses > back.misses && after.hits >= back.hits + 2,
        "{after:?}"
    );
    // And it tracks again: a new write reaches it.
    assert!(
        writer
            .put_if_newer("k", v(3, Some(b"three")))
            .await
            .unwrap()
    );
    let seen = seen_within(&reader, "k", &v(3, Some(b"three")), Duration::from_secs(1)).await;
    assert_eq!(seen, Some(v(3, Some(b"three"))));
}

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

/// Postgres JIT is off on the services' connections unless the setting turns it on: compiling a
/// short statement whose estimate passes `jit_above_cost` cost 100–300 ms on every new pooled
/// connection (the slow identity resolves of the end-to-end benchmark).
#[tokio::test(flavor = "multi_thread")]
async fn postgres_jit_follows_the_setting() {
    let pg = TestDb::new().await;
    for (jit, expected) in [(false, "off"), (true, "on")] {
        let settings = DbSettings {
            jit,
            ..DbSettings::default()
        };
        let db = Database::connect(pg.url(), "jit_setting", &settings)
            .await
            .unwrap();
        let Database::Postgres(pool) = &db else {
            panic!("a Postgres url");
        };
        let shown: String = sqlx::query_scalar("SHOW jit")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(shown, expected, "jit = {jit}");
        let path: String = sqlx::query_scalar("SHOW search_path")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(path, "jit_setting");
        db.close().await;
    }
}
