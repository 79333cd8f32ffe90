//! The hot-profile cache: versioned entries, so a slow reader can never put back a value older
//! than one a writer has already stored.
//!
//! Every entry carries the version of the row it was read from. A write stores the new value (or
//! a tombstone: a version without a value) with its version; a fill from a read only lands when
//! its version is newer than what the cache holds, or equal to a tombstone's. The Redis
//! implementation runs that comparison in a Lua script, so it is atomic across replicas.
//!
//! The Redis cache may keep a near cache in process in front of Redis (see [`crate::near`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Mutex;

use crate::near::{Lookup, Near, NearCacheSettings, NearCacheStats};

/// A cached value with the version of the row it came from. `bytes` is `None` for a tombstone:
/// "the row changed at this version; read it from the database".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The row's version.
    pub version: i64,
    /// The encoded value, or `None` for a tombstone. Shared, so a near-cache hit is not a copy.
    pub bytes: Option<bytes::Bytes>,
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

/// Opens the cache named by `url`: `redis://…` (or `rediss://…`) for Redis, with a near cache
/// in front when `near.enabled`, `memory://` or an empty string for the in-process cache (which
/// needs no near cache). Keys are prefixed with `prefix`. Entries expire after `ttl`.
pub fn open_cache(
    url: &str,
    prefix: &str,
    ttl: Duration,
    near: &NearCacheSettings,
) -> Result<Arc<dyn Cache>, CacheError> {
    if url.is_empty() || url.starts_with("memory:") {
        Ok(Arc::new(MemoryCache::new(100_000, ttl)))
    } else if near.enabled {
        Ok(Arc::new(RedisCache::with_near_cache(
            url, prefix, ttl, near,
        )?))
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

/// A lazily opened, self-healing connection to one Redis, with every command bounded in time:
/// a service starts and serves (from the database) while Redis is down, and while it stays
/// down callers fail at once ([`CacheError::Down`]) instead of queueing behind reconnects.
#[derive(Debug, Clone)]
pub struct RedisLink {
    client: redis::Client,
    conn: Arc<Mutex<Connection>>,
    timeout: Duration,
}

impl RedisLink {
    /// A link to the Redis at `url` (not connected until first used); each command, and each
    /// connection attempt, is given `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, CacheError> {
        Ok(Self {
            client: redis::Client::open(connection_info(url)?)?,
            conn: Arc::new(Mutex::new(Connection::Never)),
            timeout,
        })
    }

    /// The connection, connecting first when there is none. `Down` (nothing was sent) while
    /// the last attempt failed less than a second ago.
    pub async fn connection(&self) -> Result<ConnectionManager, CacheError> {
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
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let attempt = tokio::time::timeout(
            self.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        match attempt {
            Ok(Ok(conn)) => {
                *slot = Connection::Up(conn.clone());
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

    /// `fut` (a command on a connection of this link), failed with `Timeout` when Redis does
    /// not answer in time. A command that failed may still have been applied.
    pub async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, CacheError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| CacheError::Timeout)?
            .map_err(CacheError::from)
    }
}

/// The Redis cache of production. Connects lazily and reconnects by itself, so a service starts
/// and serves (from the database) while Redis is down.
#[derive(Debug, Clone)]
pub struct RedisCache {
    link: RedisLink,
    prefix: String,
    ttl: Duration,
    script: redis::Script,
    /// The near cache in front, if any.
    pub(crate) near: Option<Arc<Near>>,
}

/// The connection settings of the Redis at `url`, with `TCP_NODELAY` on. redis-rs leaves
/// Nagle's algorithm on by default: on a multiplexed connection a command is then held back
/// while an earlier one is unacknowledged, and the tail of a large pipeline waits for the
/// acknowledgement of what went before it.
pub(crate) fn connection_info(url: &str) -> redis::RedisResult<redis::ConnectionInfo> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?;
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    Ok(info.set_tcp_settings(tcp))
}

impl RedisCache {
    /// A cache on the Redis at `url` whose keys start with `prefix`, without a near cache:
    /// every read goes to Redis.
    pub fn new(url: &str, prefix: &str, ttl: Duration) -> Result<Self, CacheError> {
        Ok(Self {
            link: RedisLink::new(url, Duration::from_millis(250))?,
            prefix: prefix.to_owned(),
            ttl,
            script: redis::Script::new(PUT_IF_NEWER),
            near: None,
        })
    }

    /// A cache on the Redis at `url` whose keys start with `prefix`, with a near cache in
    /// front (its entries invalidated by Redis when any client changes them).
    pub fn with_near_cache(
        url: &str,
        prefix: &str,
        ttl: Duration,
        near: &NearCacheSettings,
    ) -> Result<Self, CacheError> {
        Ok(Self {
            near: Some(Arc::new(Near::new(url, prefix, near, ttl)?)),
            ..Self::new(url, prefix, ttl)?
        })
    }

    /// What the near cache has done so far; `None` without one.
    pub fn near_cache_stats(&self) -> Option<NearCacheStats> {
        self.near.as_ref().map(|near| near.stats())
    }

    /// The entry under the full key `key`, from Redis.
    async fn remote_get(&self, key: &str) -> Result<Option<Versioned>, CacheError> {
        let mut conn = self.connection().await?;
        let (version, bytes): (Option<i64>, Option<Vec<u8>>) = self
            .bounded(
                redis::cmd("HMGET")
                    .arg(key)
                    .arg("v")
                    .arg("d")
                    .query_async(&mut conn),
            )
            .await?;
        Ok(version.map(|version| Versioned {
            version,
            bytes: bytes.map(Into::into),
        }))
    }

    /// Drops the near entry of the full key `key` after this cache wrote it (whether or not
    /// the write reported success: it may have landed).
    fn written(&self, key: &str) {
        if let Some(near) = &self.near {
            near.invalidate(key);
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        self.link.connection().await
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, CacheError> {
        self.link.bounded(fut).await
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, CacheError> {
        let key = self.key(key);
        let Some(near) = &self.near else {
            return self.remote_get(&key).await;
        };
        match near.lookup(&key) {
            Lookup::Hit(value) => Ok(Some(value)),
            Lookup::Miss(token) => {
                let value = self.remote_get(&key).await?;
                if let Some(value) = &value {
                    near.fill(&key, token, value).await;
                }
                Ok(value)
            }
            Lookup::Bypass => self.remote_get(&key).await,
        }
    }

    async fn put_if_newer(&self, key: &str, value: Versioned) -> Result<bool, CacheError> {
        let mut conn = self.connection().await?;
        let key = self.key(key);
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let mut invocation = self.script.key(&key);
        invocation
            .arg(value.version)
            .arg(if value.bytes.is_some() { "1" } else { "0" })
            .arg(value.bytes.as_deref().unwrap_or(&[]))
            .arg(ttl_ms);
        let stored = self
            .bounded(invocation.invoke_async::<i64>(&mut conn))
            .await;
        self.written(&key);
        Ok(stored? == 1)
    }

    async fn remove(&self, key: &str) -> Result<(), CacheError> {
        let mut conn = self.connection().await?;
        let key = self.key(key);
        let removed: Result<(), _> = self
            .bounded(redis::cmd("DEL").arg(&key).query_async(&mut conn))
            .await;
        self.written(&key);
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(version: i64, bytes: Option<&[u8]>) -> Versioned {
        Versioned {
            version,
            bytes: bytes.map(bytes::Bytes::copy_from_slice),
        }
    }

    #[test]
    fn redis_connections_turn_nagle_off_and_keep_the_url() {
        let info = connection_info("redis://127.0.0.1:6380/3").unwrap();
        assert!(info.tcp_settings().nodelay());
        assert_eq!(
            info.addr(),
            &redis::ConnectionAddr::Tcp("127.0.0.1".to_owned(), 6380)
        );
        assert_eq!(info.redis_settings().db(), 3);
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
