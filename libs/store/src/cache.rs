//! The hot-profile cache: versioned entries, so a slow reader can never put back a value older
//! than one a writer has already stored.
//!
//! Every entry carries the version of the row it was read from. A write stores the new value (or
//! a tombstone: a version without a value) with its version; a fill from a read only lands when
//! its version is newer than what the cache holds, or equal to a tombstone's. The Redis
//! implementation runs that comparison in a Lua script, so it is atomic across replicas.
//!
//! The Redis cache also keeps a **near cache** in process: Redis's server-assisted client-side
//! caching (RESP3 `CLIENT TRACKING`) remembers the keys this connection read and pushes an
//! invalidation the moment any client (any replica) changes one, so a hot profile read again
//! is answered without a round trip and never staler than the invalidation's trip over the
//! connection. A reconnection drops every near entry (invalidations may have been missed), and
//! each entry also expires after at most [`NEAR_TTL_MAX`].

use std::num::NonZeroUsize;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

/// A cached value with the version of the row it came from. `bytes` is `None` for a tombstone:
/// "the row changed at this version; read it from the database".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The row's version.
    pub version: i64,
    /// The encoded value, or `None` for a tombstone.
    pub bytes: Option<Vec<u8>>,
}

impl Versioned {
    /// Whether `self` may replace `current`: a newer version always may; the same version only
    /// fills a tombstone.
    pub fn supersedes(&self, current: &Versioned) -> bool {
        self.version > current.version
            || (self.version == current.version && current.bytes.is_none() && self.bytes.is_some())
    }
}

/// Why a cache operation failed. Callers degrade to the database; they never fail a request
/// because the cache is down.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Redis answered with an error or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("redis timed out")]
    Timeout,
    /// Redis was unreachable moments ago; not retried yet.
    #[error("redis is down")]
    Down,
}

/// A cache of versioned values by key.
#[async_trait]
pub trait Cache: Send + Sync + std::fmt::Debug {
    /// The entry under `key`, tombstones included.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, CacheError>;
    /// Stores `value` under `key` if it supersedes the current entry (see
    /// [`Versioned::supersedes`]); returns whether it did.
    async fn put_if_newer(&self, key: &str, value: Versioned) -> Result<bool, CacheError>;
    /// Removes `key` whatever its version (used by deletion, never by ordinary writes).
    async fn remove(&self, key: &str) -> Result<(), CacheError>;
}

/// Opens the cache named by `url`: `redis://…` (or `rediss://…`) for Redis, `memory://` or an
/// empty string for the in-process cache. Keys are prefixed with `prefix`. Entries expire
/// after `ttl`.
pub fn open_cache(url: &str, prefix: &str, ttl: Duration) -> Result<Arc<dyn Cache>, CacheError> {
    if url.is_empty() || url.starts_with("memory:") {
        Ok(Arc::new(MemoryCache::new(100_000, ttl)))
    } else {
        Ok(Arc::new(RedisCache::new(url, prefix, ttl)?))
    }
}

/// The in-process cache of `tessera dev`.
#[derive(Debug, Clone)]
pub struct MemoryCache {
    inner: moka::future::Cache<String, Versioned>,
}

impl MemoryCache {
    /// A cache of at most `capacity` entries, each expiring `ttl` after it was written.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Self {
            inner: moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, CacheError> {
        Ok(self.inner.get(key).await)
    }

    async fn put_if_newer(&self, key: &str, value: Versioned) -> Result<bool, CacheError> {
        use moka::ops::compute::{CompResult, Op};
        let result = self
            .inner
            .entry(key.to_owned())
            .and_compute_with(|current| {
                let op = match current {
                    Some(entry) if !value.supersedes(entry.value()) => Op::Nop,
                    Some(_) | None => Op::Put(value),
                };
                std::future::ready(op)
            })
            .await;
        Ok(matches!(
            result,
            CompResult::Inserted(_) | CompResult::ReplacedWith(_)
        ))
    }

    async fn remove(&self, key: &str) -> Result<(), CacheError> {
        self.inner.invalidate(key).await;
        Ok(())
    }
}

// KEYS[1] = key; ARGV = version, has_value (0/1), value, ttl_ms. Mirrors Versioned::supersedes.
const PUT_IF_NEWER: &str = r"
local cur = redis.call('HGET', KEYS[1], 'v')
local new = tonumber(ARGV[1])
if cur then
  cur = tonumber(cur)
  if new < cur then return 0 end
  if new == cur then
    if ARGV[2] == '0' or redis.call('HEXISTS', KEYS[1], 'd') == 1 then return 0 end
  end
end
redis.call('DEL', KEYS[1])
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// How long after a failed connection attempt the next one is made.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// How many entries the near cache of a [`RedisCache`] holds by default.
pub const NEAR_ENTRIES: usize = 10_000;
/// The longest a near entry lives, whatever the cache's TTL: a bound on staleness should an
/// invalidation ever be lost without the connection dropping.
pub const NEAR_TTL_MAX: Duration = Duration::from_secs(60);

/// The state of the Redis connection.
#[derive(Debug)]
enum Connection {
    /// Not tried yet.
    Never,
    /// Connected; the manager reconnects by itself after a drop.
    Up(ConnectionManager),
    /// The last attempt, at this time, failed.
    Down(Instant),
}

/// The Redis cache of production. Connects lazily and reconnects by itself, so a service starts
/// and serves (from the database) while Redis is down.
#[derive(Debug, Clone)]
pub struct RedisCache {
    client: redis::Client,
    conn: Arc<Mutex<Connection>>,
    /// The connection while it is up: the fast path, without the reconnection lock.
    up: Arc<RwLock<Option<ConnectionManager>>>,
    /// The near cache's size; none when 0.
    near: Option<NonZeroUsize>,
    prefix: String,
    ttl: Duration,
    timeout: Duration,
    script: redis::Script,
}

impl RedisCache {
    /// A cache on the Redis at `url` whose keys start with `prefix`, with a near cache of
    /// [`NEAR_ENTRIES`].
    pub fn new(url: &str, prefix: &str, ttl: Duration) -> Result<Self, CacheError> {
        Self::with_near_cache(url, prefix, ttl, NEAR_ENTRIES)
    }

    /// A cache on the Redis at `url` whose keys start with `prefix`, with a near cache of at
    /// most `near_entries` entries (0: none; every read goes to Redis).
    pub fn with_near_cache(
        url: &str,
        prefix: &str,
        ttl: Duration,
        near_entries: usize,
    ) -> Result<Self, CacheError> {
        let near = NonZeroUsize::new(near_entries);
        let mut info = redis::IntoConnectionInfo::into_connection_info(url)?;
        if near.is_some() {
            // Tracking invalidations arrive as RESP3 pushes.
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            info = info.set_redis_settings(settings);
        }
        Ok(Self {
            client: redis::Client::open(info)?,
            conn: Arc::new(Mutex::new(Connection::Never)),
            up: Arc::new(RwLock::new(None)),
            near,
            prefix: prefix.to_owned(),
            ttl,
            timeout: Duration::from_millis(250),
            script: redis::Script::new(PUT_IF_NEWER),
        })
    }

    /// What the near cache answered and missed so far (`None` without a near cache or before
    /// the first connection).
    pub fn near_cache_statistics(&self) -> Option<redis::caching::CacheStatistics> {
        let up = self.up.read().ok()?.clone()?;
        up.get_cache_statistics()
    }

    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        if let Some(conn) = self.up.read().ok().and_then(|up| up.clone()) {
            return Ok(conn);
        }
        let mut slot = self.conn.lock().await;
        match &*slot {
            Connection::Up(conn) => return Ok(conn.clone()),
            // While Redis is down, fail at once instead of queueing every caller behind a
            // connection attempt: they go to the database meanwhile.
            Connection::Down(since) if since.elapsed() < RECONNECT_AFTER => {
                return Err(CacheError::Down);
            }
            Connection::Down(_) | Connection::Never => {}
        }
        let mut config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        if let Some(size) = self.near {
            config = config.set_cache_config(
                redis::caching::CacheConfig::new()
                    .set_size(size)
                    .set_default_client_ttl(self.ttl.min(NEAR_TTL_MAX)),
            );
        }
        let attempt = tokio::time::timeout(
            self.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        match attempt {
            Ok(Ok(conn)) => {
                *slot = Connection::Up(conn.clone());
                if let Ok(mut up) = self.up.write() {
                    *up = Some(conn.clone());
                }
                Ok(conn)
            }
            Ok(Err(e)) => {
                *slot = Connection::Down(Instant::now());
                Err(e.into())
            }
            Err(_) => {
                *slot = Connection::Down(Instant::now());
                Err(CacheError::Timeout)
            }
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, CacheError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| CacheError::Timeout)?
            .map_err(CacheError::from)
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, CacheError> {
        let mut conn = self.connection().await?;
        let (version, bytes): (Option<i64>, Option<Vec<u8>>) = self
            .bounded(
                redis::cmd("HMGET")
                    .arg(self.key(key))
                    .arg("v")
                    .arg("d")
                    .query_async(&mut conn),
            )
            .await?;
        Ok(version.map(|version| Versioned { version, bytes }))
    }

    async fn put_if_newer(&self, key: &str, value: Versioned) -> Result<bool, CacheError> {
        let mut conn = self.connection().await?;
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let has_value = if value.bytes.is_some() { "1" } else { "0" };
        let bytes = value.bytes.as_deref().unwrap_or(&[]);
        let stored: i64 = if self.near.is_some() {
            // Redis sends this connection's own invalidation after the write's reply; the
            // PING behind it in the same round trip makes sure it has been read (and the near
            // entry dropped) before the write returns, so the next read sees the write. EVAL,
            // not EVALSHA: a pipeline cannot fall back when the script is not loaded (Redis
            // caches the compiled script by its digest either way).
            let (stored,): (i64,) = self
                .bounded(
                    redis::pipe()
                        .cmd("EVAL")
                        .arg(PUT_IF_NEWER)
                        .arg(1)
                        .arg(self.key(key))
                        .arg(value.version)
                        .arg(has_value)
                        .arg(bytes)
                        .arg(ttl_ms)
                        .cmd("PING")
                        .ignore()
                        .query_async(&mut conn),
                )
                .await?;
            stored
        } else {
            let mut invocation = self.script.key(self.key(key));
            invocation
                .arg(value.version)
                .arg(has_value)
                .arg(bytes)
                .arg(ttl_ms);
            self.bounded(invocation.invoke_async(&mut conn)).await?
        };
        Ok(stored == 1)
    }

    async fn remove(&self, key: &str) -> Result<(), CacheError> {
        let mut conn = self.connection().await?;
        // PING: see put_if_newer.
        let () = self
            .bounded(
                redis::pipe()
                    .cmd("DEL")
                    .arg(self.key(key))
                    .ignore()
                    .cmd("PING")
                    .ignore()
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(version: i64, bytes: Option<&[u8]>) -> Versioned {
        Versioned {
            version,
            bytes: bytes.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn newer_versions_and_tombstone_fills_supersede() {
        assert!(v(2, Some(b"a")).supersedes(&v(1, Some(b"b"))));
        assert!(!v(1, Some(b"a")).supersedes(&v(2, None)));
        assert!(v(2, Some(b"a")).supersedes(&v(2, None)));
        assert!(!v(2, None).supersedes(&v(2, Some(b"a"))));
        assert!(!v(2, Some(b"a")).supersedes(&v(2, Some(b"b"))));
    }

    #[tokio::test]
    async fn memory_cache_keeps_the_newest_version() {
        let cache = MemoryCache::new(100, Duration::from_secs(60));
        assert!(cache.put_if_newer("k", v(2, Some(b"new"))).await.unwrap());
        assert!(!cache.put_if_newer("k", v(1, Some(b"old"))).await.unwrap());
        assert_eq!(cache.get("k").await.unwrap(), Some(v(2, Some(b"new"))));
        assert!(cache.put_if_newer("k", v(3, None)).await.unwrap());
        assert!(cache.put_if_newer("k", v(3, Some(b"fill"))).await.unwrap());
        cache.remove("k").await.unwrap();
        assert_eq!(cache.get("k").await.unwrap(), None);
    }
}
