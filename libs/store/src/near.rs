//! The near cache: each replica's in-process copy of the Redis entries it read, kept correct by
//! Redis's invalidation pushes.
//!
//! A dedicated RESP3 connection runs `CLIENT TRACKING ON BCAST PREFIX <prefix>`: whenever any
//! client changes a key under the prefix, Redis pushes its name to this connection, and the
//! connection's reader applies the push (drops the entry) before it reads anything after it.
//!
//! **Fills are guarded by a token.** A read that misses takes the key's generation (one of
//! [`STRIPES`] counters chosen by the key's hash) and the cache's epoch *before* it asks Redis;
//! an invalidation bumps the generation, a reset (tracking lost or re-established, a flush)
//! bumps the epoch. The reply is inserted only when both are unchanged, checked and inserted
//! under the same lock an invalidation takes, so a reply read before a write can never land
//! after that write's invalidation (the race of redis-rs's own client-side caching, which fills
//! when the caller resumes). An invalidation that arrives after the fill simply removes it.
//!
//! **Bypassed while tracking is down.** A PING every [`HEARTBEAT_EVERY`] must answer within
//! [`HEARTBEAT_TIMEOUT`]; since Redis answers in order, a reply also proves every invalidation
//! pushed before it has been applied. When the connection drops or a heartbeat fails, every
//! entry is dropped and reads go to Redis (and fill nothing) until tracking is re-established;
//! the cache then starts empty. A replica's own writes drop its entry as soon as Redis has
//! acknowledged them, so it reads its own writes without waiting for the push.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};

use crate::cache::Versioned;

/// How many generation counters keys share. Two keys on one counter only cost a skipped fill.
const STRIPES: usize = 1024;
/// How often the tracking connection is checked.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long a heartbeat (and connecting) may take before tracking counts as lost.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long after losing tracking the next attempt is made; doubled after each failed attempt
/// up to [`RETRY_AT_MOST`].
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// The longest wait between two attempts to establish tracking.
const RETRY_AT_MOST: Duration = Duration::from_secs(5);
/// What an entry costs beyond its key and value, for the byte bound.
const ENTRY_OVERHEAD: usize = 64;

/// Settings of the near cache (`[cache]`): each profile replica's in-process copy of the Redis
/// entries it read. Used only with Redis; the in-process cache of `tessera dev` needs none.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NearCacheSettings {
    /// Whether reads keep a near copy (only with a `redis://` cache).
    pub enabled: bool,
    /// The most bytes of keys and values held (plus a small overhead per entry).
    pub max_bytes: u64,
    /// The longest an entry lives, in seconds: a safety net, since Redis invalidates entries
    /// as soon as they change.
    pub ttl_seconds: u64,
}

impl Default for NearCacheSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: 64 * 1024 * 1024,
            ttl_seconds: 60,
        }
    }
}

/// A near-cache setting outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cache.{field}: {reason}")]
pub struct InvalidNearCache {
    /// The setting's name.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl NearCacheSettings {
    /// Checks the values deserializing cannot.
    pub fn validate(&self) -> Result<(), InvalidNearCache> {
        if !self.enabled {
            return Ok(());
        }
        if self.max_bytes == 0 {
            return Err(InvalidNearCache {
                field: "max_bytes",
                reason: "must be at least 1 (or set cache.enabled = false)",
            });
        }
        if self.ttl_seconds == 0 {
            return Err(InvalidNearCache {
                field: "ttl_seconds",
                reason: "must be at least 1 (or set cache.enabled = false)",
            });
        }
        Ok(())
    }
}

/// What a near cache has done so far, for tests and diagnostics (the same counts are exported
/// as `tessera_profile_near_cache_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NearCacheStats {
    /// Reads answered in process.
    pub hits: u64,
    /// Reads that went to Redis while tracking was up (and may fill).
    pub misses: u64,
    /// Reads that went to Redis because tracking was down (they fill nothing).
    pub bypassed: u64,
    /// Keys invalidated: pushed by Redis or written through this cache.
    pub invalidations: u64,
    /// Fills dropped because their key was invalidated (or the cache reset) meanwhile.
    pub rejected_fills: u64,
    /// Times every entry was dropped: tracking lost or re-established, or a flush.
    pub resets: u64,
    /// The Redis client id of the tracking connection while tracking is up.
    pub tracking_client: Option<i64>,
}

/// The guard a read takes before asking Redis; its fill lands only if nothing invalidated the
/// key (or reset the cache) since.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Token {
    epoch: u64,
    stripe: usize,
    generation: u64,
}

/// What the near cache answers for a key.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// The entry, valid now.
    Hit(Versioned),
    /// Not held: read Redis, then offer the reply to [`Near::fill`] with this token.
    Miss(Token),
    /// Tracking is down: read Redis and fill nothing.
    Bypass,
}

/// The near cache of one [`crate::RedisCache`]: the entries, the guards and the tracking task.
pub(crate) struct Near {
    shared: Arc<Shared>,
    client: redis::Client,
    prefix: String,
    started: AtomicBool,
    /// Holds a fill between its Redis read and its insert (see the race test).
    #[cfg(test)]
    pub(crate) hold: Mutex<Option<Hold>>,
}

/// A fill held by a test: told when the fill is reached, released when told.
#[cfg(test)]
pub(crate) struct Hold {
    pub(crate) reached: tokio::sync::oneshot::Sender<()>,
    pub(crate) release: tokio::sync::oneshot::Receiver<()>,
}

impl std::fmt::Debug for Near {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Near")
            .field("prefix", &self.prefix)
            .field("stats", &self.shared.stats())
            .finish_non_exhaustive()
    }
}

/// Whether tracking is up, and the epoch every reset bumps.
#[derive(Debug, Default)]
struct State {
    /// Bumped by every reset: a fill whose token has another epoch is dropped.
    epoch: u64,
    /// The serial of the tracking connection while tracking is up.
    tracking: Option<u64>,
    /// Its Redis client id.
    client_id: Option<i64>,
}

/// What the near cache, the push handler of its connection and its tracking task share.
struct Shared {
    entries: moka::sync::Cache<String, Versioned>,
    /// Fills hold it for reading while they check their token and insert; resets for writing.
    state: RwLock<State>,
    /// Mirrors of `state` for the lock-free read path.
    live: AtomicBool,
    epoch: AtomicU64,
    /// Per-stripe generations; a fill checks and inserts under its stripe's lock, which an
    /// invalidation takes to bump the generation and drop the entry.
    stripes: Box<[Mutex<u64>]>,
    hasher: std::hash::RandomState,
    /// The serial of the next tracking connection.
    serials: AtomicU64,
    /// Wakes the tracking task when its connection dropped.
    lost: tokio::sync::Notify,
    hits: AtomicU64,
    misses: AtomicU64,
    bypassed: AtomicU64,
    invalidations: AtomicU64,
    rejected_fills: AtomicU64,
    resets: AtomicU64,
}

impl Near {
    /// A near cache of the keys under `prefix` on the Redis at `url`, not tracking yet (the
    /// tracking task starts with the first read, inside the caller's runtime).
    pub(crate) fn new(
        url: &str,
        prefix: &str,
        settings: &NearCacheSettings,
        redis_ttl: Duration,
    ) -> Result<Self, redis::RedisError> {
        let mut info = crate::cache::connection_info(url)?;
        // Invalidations arrive as RESP3 pushes on the tracking connection itself.
        let redis = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        info = info.set_redis_settings(redis);
        let ttl = Duration::from_secs(settings.ttl_seconds.max(1)).min(redis_ttl);
        let entries = moka::sync::Cache::builder()
            .weigher(|key: &String, value: &Versioned| {
                let bytes =
                    key.len() + value.bytes.as_ref().map_or(0, bytes::Bytes::len) + ENTRY_OVERHEAD;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .max_capacity(settings.max_bytes.max(1))
            .time_to_live(ttl)
            .build();
        Ok(Self {
            shared: Arc::new(Shared {
                entries,
                state: RwLock::new(State::default()),
                live: AtomicBool::new(false),
                epoch: AtomicU64::new(0),
                stripes: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
                hasher: std::hash::RandomState::new(),
                serials: AtomicU64::new(1),
                lost: tokio::sync::Notify::new(),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                bypassed: AtomicU64::new(0),
                invalidations: AtomicU64::new(0),
                rejected_fills: AtomicU64::new(0),
                resets: AtomicU64::new(0),
            }),
            client: redis::Client::open(info)?,
            prefix: prefix.to_owned(),
            started: AtomicBool::new(false),
            #[cfg(test)]
            hold: Mutex::new(None),
        })
    }

    /// The entry of `key` (the full Redis key), or how to read it.
    pub(crate) fn lookup(&self, key: &str) -> Lookup {
        self.start();
        let shared = &*self.shared;
        // The epoch is taken before the entry is looked up and before Redis is read: whatever
        // resets the cache from now on is seen by the fill.
        let epoch = shared.epoch.load(Ordering::Acquire);
        if !shared.live.load(Ordering::Acquire) {
            shared.bypassed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("tessera_profile_near_cache_bypassed_total").increment(1);
            return Lookup::Bypass;
        }
        if let Some(value) = shared.entries.get(key) {
            shared.hits.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("tessera_profile_near_cache_hits_total").increment(1);
            return Lookup::Hit(value);
        }
        // Likewise the key's generation: an invalidation from now on is seen by the fill.
        let stripe = shared.stripe(key);
        let generation = *lock(&shared.stripes[stripe]);
        shared.misses.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tessera_profile_near_cache_misses_total").increment(1);
        Lookup::Miss(Token {
            epoch,
            stripe,
            generation,
        })
    }

    /// Inserts what Redis answered for `key` if nothing invalidated it since `token` was taken;
    /// returns whether it did.
    pub(crate) async fn fill(&self, key: &str, token: Token, value: &Versioned) -> bool {
        #[cfg(test)]
        {
            let hold = lock(&self.hold).take();
            if let Some(hold) = hold {
                let _ = hold.reached.send(());
                let _ = hold.release.await;
            }
        }
        self.shared.fill(key, token, value)
    }

    /// Drops `key` (the full Redis key) after this replica wrote it, so its next read sees the
    /// write without waiting for Redis's push.
    pub(crate) fn invalidate(&self, key: &str) {
        self.shared.invalidate(key);
    }

    /// What the near cache has done so far.
    pub(crate) fn stats(&self) -> NearCacheStats {
        self.shared.stats()
    }

    /// Starts the tracking task once, in the current runtime.
    fn start(&self) {
        if self.started.load(Ordering::Relaxed) || self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.started.store(false, Ordering::Release);
            return;
        };
        runtime.spawn(track(
            Arc::downgrade(&self.shared),
            self.client.clone(),
            self.prefix.clone(),
        ));
    }
}

impl Shared {
    fn stripe(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) % STRIPES as u64) as usize
    }

    fn fill(&self, key: &str, token: Token, value: &Versioned) -> bool {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let fresh = state.tracking.is_some() && state.epoch == token.epoch && {
            let generation = lock(&self.stripes[token.stripe]);
            let fresh = *generation == token.generation;
            if fresh {
                // Under the stripe's lock: an invalidation of this key waits for the insert
                // and then removes it, or has bumped the generation and this is not reached.
                self.entries.insert(key.to_owned(), value.clone());
            }
            fresh
        };
        drop(state);
        if !fresh {
            self.rejected_fills.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("tessera_profile_near_cache_fills_rejected_total").increment(1);
        }
        fresh
    }

    fn invalidate(&self, key: &str) {
        let mut generation = lock(&self.stripes[self.stripe(key)]);
        *generation = generation.wrapping_add(1);
        self.entries.invalidate(key);
        drop(generation);
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tessera_profile_near_cache_invalidations_total").increment(1);
    }

    /// Drops every entry and rejects every fill in progress, under the state's write lock;
    /// `tracking` is what tracking is afterwards.
    fn reset(&self, state: &mut State, tracking: Option<(u64, i64)>, reason: &'static str) {
        state.epoch += 1;
        state.tracking = tracking.map(|(serial, _)| serial);
        state.client_id = tracking.map(|(_, id)| id);
        self.epoch.store(state.epoch, Ordering::Release);
        self.live.store(tracking.is_some(), Ordering::Release);
        self.entries.invalidate_all();
        self.resets.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tessera_profile_near_cache_resets_total", "reason" => reason)
            .increment(1);
        metrics::gauge!("tessera_profile_near_cache_tracking").set(if tracking.is_some() {
            1.0
        } else {
            0.0
        });
    }

    /// Drops every entry, tracking unchanged (Redis flushed, or pushed what we cannot read).
    fn clear(&self, reason: &'static str) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let tracking = state.tracking.zip(state.client_id);
        self.reset(&mut state, tracking, reason);
    }

    /// Tracking on the connection `serial` is up: start empty, and serve.
    fn establish(&self, connection: &Connection, client_id: i64) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        // Under the lock the push handler takes to report a drop: a connection that dropped
        // before this point never goes live.
        if !connection.dropped.load(Ordering::SeqCst) {
            self.reset(
                &mut state,
                Some((connection.serial, client_id)),
                "tracking established",
            );
        }
    }

    /// Whether tracking is up on the connection `serial`.
    fn tracking_on(&self, serial: u64) -> bool {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .tracking
            == Some(serial)
    }

    /// Tracking on the connection `serial` is lost: drop everything and bypass until it is
    /// back. A loss reported for another connection changes nothing.
    fn lose(&self, serial: u64, reason: &'static str) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.tracking == Some(serial) {
            self.reset(&mut state, None, reason);
            drop(state);
            tracing::warn!(
                reason,
                "near cache tracking lost, reading redis until it is back"
            );
        }
        self.lost.notify_one();
    }

    /// Applies one push of the tracking connection (running in its reader, in order).
    // PushKind is non-exhaustive; other kinds are not invalidations.
    #[allow(clippy::wildcard_enum_match_arm)]
    fn on_push(&self, push: PushInfo, connection: &Connection) {
        match push.kind {
            PushKind::Invalidate => match push.data.as_slice() {
                [Value::Array(keys)] => {
                    for key in keys {
                        if let Value::BulkString(bytes) = key {
                            self.invalidate(&String::from_utf8_lossy(bytes));
                        } else {
                            self.clear("unreadable invalidation");
                        }
                    }
                }
                // A null key list: the database was flushed.
                _ => self.clear("flush"),
            },
            PushKind::Disconnection => {
                connection.dropped.store(true, Ordering::SeqCst);
                self.lose(connection.serial, "disconnected");
            }
            _ => {}
        }
    }

    fn stats(&self) -> NearCacheStats {
        let client_id = self
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .client_id;
        NearCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bypassed: self.bypassed.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            rejected_fills: self.rejected_fills.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
            tracking_client: client_id,
        }
    }
}

/// One tracking connection: its serial, and whether its reader saw it drop.
struct Connection {
    serial: u64,
    dropped: AtomicBool,
}

/// Keeps tracking established while the near cache exists: connects, turns tracking on,
/// heartbeats, and starts over after a loss.
async fn track(shared: Weak<Shared>, client: redis::Client, prefix: String) {
    let mut retry_after = RETRY_AFTER;
    loop {
        match establish(&shared, &client, &prefix).await {
            Ok(Some((conn, serial))) => {
                retry_after = RETRY_AFTER;
                heartbeat(&shared, conn, serial).await;
            }
            Ok(None) => return,
            // Once per outage, not once per attempt.
            Err(error) if retry_after == RETRY_AFTER => {
                tracing::warn!(%error, "near cache tracking could not be established, reading redis");
                retry_after *= 2;
            }
            Err(error) => {
                tracing::debug!(%error, "near cache tracking still not established");
                retry_after = (retry_after * 2).min(RETRY_AT_MOST);
            }
        }
        if shared.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(retry_after).await;
    }
}

/// Opens a tracking connection and turns tracking on; the cache goes live, empty. `None` when
/// the near cache is gone.
async fn establish(
    shared: &Weak<Shared>,
    client: &redis::Client,
    prefix: &str,
) -> Result<Option<(redis::aio::MultiplexedConnection, u64)>, redis::RedisError> {
    let Some(serial) = shared
        .upgrade()
        .map(|shared| shared.serials.fetch_add(1, Ordering::Relaxed))
    else {
        return Ok(None);
    };
    let connection = Arc::new(Connection {
        serial,
        dropped: AtomicBool::new(false),
    });
    let (handler_shared, handler_connection) = (shared.clone(), connection.clone());
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(HEARTBEAT_TIMEOUT))
        .set_response_timeout(Some(HEARTBEAT_TIMEOUT))
        .set_push_sender(move |push: PushInfo| {
            if let Some(shared) = handler_shared.upgrade() {
                shared.on_push(push, &handler_connection);
            }
            Ok::<(), std::convert::Infallible>(())
        });
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await?;
    let mut tracking = redis::cmd("CLIENT");
    tracking.arg("TRACKING").arg("ON").arg("BCAST");
    // Without a prefix, every key of the database is tracked.
    if !prefix.is_empty() {
        tracking.arg("PREFIX").arg(prefix);
    }
    let () = tracking.query_async(&mut conn).await?;
    let Some(shared) = shared.upgrade() else {
        return Ok(None);
    };
    // Invalidations before this point were not all seen: the cache starts empty.
    shared.establish(&connection, id);
    tracing::info!(client_id = id, "near cache tracking established");
    Ok(Some((conn, serial)))
}

/// PINGs the tracking connection every [`HEARTBEAT_EVERY`] while tracking is up on it; a PING
/// that fails or does not answer within [`HEARTBEAT_TIMEOUT`] loses tracking.
async fn heartbeat(
    shared: &Weak<Shared>,
    mut conn: redis::aio::MultiplexedConnection,
    serial: u64,
) {
    loop {
        let Some(near) = shared.upgrade() else {
            return;
        };
        if !near.tracking_on(serial) {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT_EVERY) => {}
            () = near.lost.notified() => continue,
        }
        let pong = tokio::time::timeout(
            HEARTBEAT_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match pong {
            Ok(Ok(_)) => {
                metrics::gauge!("tessera_profile_near_cache_bytes")
                    .set(near.entries.weighted_size() as f64);
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "near cache heartbeat failed");
                near.lose(serial, "heartbeat failed");
            }
            Err(_) => near.lose(serial, "heartbeat timed out"),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tessera_testkit::{redis_prefix, redis_url};
    use tokio::sync::oneshot;

    use super::*;
    use crate::cache::{Cache, RedisCache};

    const TTL: Duration = Duration::from_secs(60);

    fn v(version: i64, bytes: &[u8]) -> Versioned {
        Versioned {
            version,
            bytes: Some(bytes.to_vec().into()),
        }
    }

    /// A cache with a near cache and one without (another replica's writes), on one prefix,
    /// the first tracking.
    async fn reader_and_writer() -> (RedisCache, RedisCache) {
        let prefix = redis_prefix();
        let reader =
            RedisCache::with_near_cache(&redis_url(), &prefix, TTL, &NearCacheSettings::default())
                .unwrap();
        let writer = RedisCache::new(&redis_url(), &prefix, TTL).unwrap();
        // The first read starts tracking; it is up within a moment.
        reader.get("warm-up").await.unwrap();
        until(&reader, "tracking up", |s| s.tracking_client.is_some()).await;
        (reader, writer)
    }

    /// Waits (at most 5 s) until the reader's near-cache stats satisfy `done`.
    async fn until(
        reader: &RedisCache,
        what: &str,
        done: impl Fn(&NearCacheStats) -> bool,
    ) -> NearCacheStats {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stats = reader.near_cache_stats().unwrap();
            if done(&stats) {
                return stats;
            }
            assert!(Instant::now() < deadline, "never {what}: {stats:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Writes `value` under `key` through `writer` and waits until the reader applied the
    /// invalidation Redis pushed for it.
    async fn write(reader: &RedisCache, writer: &RedisCache, key: &str, value: Option<Versioned>) {
        let before = reader.near_cache_stats().unwrap().invalidations;
        match value {
            Some(value) => assert!(writer.put_if_newer(key, value).await.unwrap()),
            None => writer.remove(key).await.unwrap(),
        }
        until(reader, "invalidated", |s| s.invalidations > before).await;
    }

    /// The race that took out redis-rs's client-side caching: a read gets its reply from Redis,
    /// a write lands and its invalidation is applied, then the read fills the near cache. The
    /// fill is held exactly there; it must be dropped, and the next read must see the write.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_reply_read_before_a_write_never_fills_after_its_invalidation() {
        let (reader, writer) = reader_and_writer().await;
        write(&reader, &writer, "k", Some(v(1, b"one"))).await;

        let (reached_tx, reached) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        let near = reader.near.clone().unwrap();
        *lock(&near.hold) = Some(Hold {
            reached: reached_tx,
            release: release_rx,
        });
        let held = tokio::spawn({
            let reader = reader.clone();
            async move { reader.get("k").await.unwrap() }
        });
        reached.await.unwrap();
        // The held read has Redis's answer (version 1). Another replica writes version 2, and
        // its invalidation reaches the reader before the fill goes on.
        let before = reader.near_cache_stats().unwrap();
        write(&reader, &writer, "k", Some(v(2, b"two"))).await;
        release.send(()).unwrap();
        // The held read answers what it read (it overlapped the write)...
        assert_eq!(held.await.unwrap(), Some(v(1, b"one")));
        let after = reader.near_cache_stats().unwrap();
        assert_eq!(after.rejected_fills, before.rejected_fills + 1, "{after:?}");
        // ...and nothing after it is served the old value.
        for _ in 0..3 {
            assert_eq!(reader.get("k").await.unwrap(), Some(v(2, b"two")));
        }
        let last = reader.near_cache_stats().unwrap();
        assert!(
            last.hits >= after.hits + 2,
            "version 2 is near-cached: {last:?}"
        );
    }

    /// An invalidation that arrives after a fill removes the entry; a replica's own write is
    /// seen by its next read at once.
    #[tokio::test(flavor = "multi_thread")]
    async fn invalidations_remove_fills_and_own_writes_are_read_at_once() {
        let (reader, writer) = reader_and_writer().await;
        write(&reader, &writer, "k", Some(v(1, b"one"))).await;
        assert_eq!(reader.get("k").await.unwrap(), Some(v(1, b"one")));
        let filled = reader.near_cache_stats().unwrap();
        assert_eq!(reader.get("k").await.unwrap(), Some(v(1, b"one")));
        assert_eq!(reader.near_cache_stats().unwrap().hits, filled.hits + 1);

        let tombstone = Versioned {
            version: 2,
            bytes: None,
        };
        write(&reader, &writer, "k", Some(tombstone.clone())).await;
        assert_eq!(reader.get("k").await.unwrap(), Some(tombstone));
        write(&reader, &writer, "k", None).await;
        assert_eq!(reader.get("k").await.unwrap(), None);

        for version in 10..40 {
            let value = v(version, b"mine");
            assert!(reader.put_if_newer("own", value.clone()).await.unwrap());
            assert_eq!(reader.get("own").await.unwrap(), Some(value.clone()));
            assert_eq!(reader.get("own").await.unwrap(), Some(value));
        }
    }

    #[test]
    fn settings_name_the_field_that_is_out_of_range() {
        let zero_bytes = NearCacheSettings {
            max_bytes: 0,
            ..NearCacheSettings::default()
        };
        assert_eq!(zero_bytes.validate().unwrap_err().field, "max_bytes");
        let zero_ttl = NearCacheSettings {
            ttl_seconds: 0,
            ..NearCacheSettings::default()
        };
        assert!(
            zero_ttl
                .validate()
                .unwrap_err()
                .to_string()
                .starts_with("cache.ttl_seconds")
        );
        let off = NearCacheSettings {
            enabled: false,
            max_bytes: 0,
            ttl_seconds: 0,
        };
        assert_eq!(off.validate(), Ok(()));
        assert_eq!(NearCacheSettings::default().validate(), Ok(()));
    }
}
