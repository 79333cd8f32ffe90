//! The owner cache: the canonical profile of hot identifiers, in Redis, so a run of known
//! visitors reads its identifiers' owners there instead of walking the graph in Postgres.
//!
//! An entry `identifier → (profile, created_at)` is exact, not merely fresh enough, because of
//! who may write and delete it:
//!
//! - **Fills** come only from what a run read in Postgres while holding the identifier's
//!   advisory lock and a lock on the profile's row (`FOR SHARE`, or the run's `FOR UPDATE`),
//!   with the profile checked canonical under that lock, and are sent before the run commits.
//!   Every writer that changes an identifier's canonical profile holds one of those locks
//!   until it commits, so no fill can carry what such a writer is about to change.
//! - **A merge** deletes the entries of every identifier of the merged profile's tree before it
//!   commits (it holds that profile's row `FOR UPDATE`, so no fill can race it).
//! - **A rewrite, a forget or a replay** moves identifiers it does not list one by one: it
//!   advances the cache's epoch (`owner_cache_epoch`), which every key carries, so every entry
//!   is retired at once. Runs read the epoch after taking their advisory locks.
//! - **Redis failing** never makes an entry wrong: a delete that did not happen, or a fill that
//!   failed after it may have been sent (it could land after the commit), advances the epoch
//!   in the same transaction instead. Reads that fail are misses.
//!
//! What an entry may lag behind is a merge committed after the run read it: the same as a
//! Postgres read a moment earlier. The run then either answers the merged profile (which every
//! reader follows to its survivor) or finds it merged when it locks it, and retries; a retry
//! reads its owners in Postgres only, and its fills overwrite what it met.
//!
//! Every identity replica with the cache must use the same Redis. A replica without it cannot
//! delete the entries of the profiles it merges: while the cache is in use (a fill keeps
//! `owner_cache_epoch.cached_until` more than an entry TTL ahead), such a merge advances the
//! epoch instead ([`retire_for_uncached_merge`]), which is correct but empties the cache, and
//! is logged as a warning. Entries expire after the configured TTL.

use std::time::Duration;

use redis::aio::ConnectionManager;
use sqlx::postgres::PgConnection;
use tessera_core::Identifier;
use tessera_store::{CacheError, RedisLink};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::ProfileAge;

/// Every identifier of the trees of the profiles `$1` (each profile and those merged into it,
/// transitively), whatever its type.
const TREE_IDENTIFIERS_SQL: &str = tree_sql!(
    "SELECT i.type, i.value FROM tree t
CROSS JOIN LATERAL (
    SELECT j.type, j.value FROM identifiers j WHERE j.profile_id = t.profile_id OFFSET 0) i"
);

/// The length of an entry: the profile id (16 bytes) and its creation time in nanoseconds
/// since the epoch (16 bytes, big-endian).
const ENTRY_LEN: usize = 32;

/// The owner cache of one identity replica.
#[derive(Debug, Clone)]
pub(crate) struct OwnerCache {
    link: RedisLink,
    prefix: String,
    ttl_ms: u64,
}

/// The epoch a run read, which its keys carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Epoch(i64);

/// What a run reads of the cache's state before its fills: the epoch, and whether
/// `cached_until` already covers an entry filled now (else the fill moves it first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunEpoch {
    pub(crate) epoch: Epoch,
    covered: bool,
}

/// How much further than an entry's TTL `cached_until` must reach when a run checks it: the
/// run fills a moment after the check, and its entries live a TTL from then.
const IN_USE_MARGIN_SECONDS: u64 = 300;

/// Advances the epoch, retiring every entry; within the caller's transaction (the row lock it
/// takes is held until commit, so writers that advance it queue, but readers do not).
pub(crate) async fn advance(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE owner_cache_epoch SET epoch = epoch + 1")
        .execute(&mut *conn)
        .await?;
    metrics::counter!("tessera_identity_owner_cache_epochs_total").increment(1);
    Ok(())
}

impl OwnerCache {
    /// A cache on the Redis at `url` whose keys start with `prefix`; entries live `ttl`.
    pub(crate) fn open(url: &str, prefix: &str, ttl: Duration) -> Result<Self, CacheError> {
        Ok(Self {
            link: RedisLink::new(url, Duration::from_millis(250))?,
            prefix: prefix.to_owned(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
        })
    }

    /// The epoch in force, read within the caller's transaction (after its advisory locks).
    pub(crate) async fn epoch(conn: &mut PgConnection) -> Result<Epoch, sqlx::Error> {
        Ok(Epoch(
            sqlx::query_scalar("SELECT epoch FROM owner_cache_epoch")
                .fetch_one(&mut *conn)
                .await?,
        ))
    }

    /// The epoch in force and whether `cached_until` covers a fill made now, read within a
    /// run's transaction (after its advisory locks).
    pub(crate) async fn run_epoch(&self, conn: &mut PgConnection) -> Result<RunEpoch, sqlx::Error> {
        let (epoch, covered): (i64, bool) = sqlx::query_as(
            "SELECT epoch, cached_until >= clock_timestamp() + make_interval(secs => $1) \
             FROM owner_cache_epoch",
        )
        .bind(self.in_use_seconds(1))
        .fetch_one(&mut *conn)
        .await?;
        Ok(RunEpoch {
            epoch: Epoch(epoch),
            covered,
        })
    }

    /// An entry's TTL in seconds, `times` over, plus the margin.
    fn in_use_seconds(&self, times: u64) -> f64 {
        (self.ttl_ms.saturating_mul(times) / 1_000 + IN_USE_MARGIN_SECONDS) as f64
    }

    /// The key of `identifier` at `epoch`: the type's length keeps any type and value apart.
    fn key(&self, epoch: Epoch, identifier: &Identifier) -> String {
        format!(
            "{}{}:{}:{}:{}",
            self.prefix,
            epoch.0,
            identifier.kind.len(),
            identifier.kind,
            identifier.value
        )
    }

    /// The cached owner of each of `identifiers`, in order; `None` for a miss. A failure to
    /// read is a miss for all (counted, and logged at debug: the run reads Postgres).
    pub(crate) async fn get(
        &self,
        epoch: Epoch,
        identifiers: &[Identifier],
    ) -> Vec<Option<ProfileAge>> {
        if identifiers.is_empty() {
            return Vec::new();
        }
        let keys: Vec<String> = identifiers.iter().map(|i| self.key(epoch, i)).collect();
        let read = async {
            let mut conn = self.link.connection().await?;
            self.link
                .bounded(
                    redis::cmd("MGET")
                        .arg(&keys)
                        .query_async::<Vec<Option<Vec<u8>>>>(&mut conn),
                )
                .await
        };
        match read.await {
            Ok(values) if values.len() == keys.len() => {
                let found: Vec<Option<ProfileAge>> = values
                    .iter()
                    .map(|v| v.as_deref().and_then(decode))
                    .collect();
                let hits = found.iter().filter(|f| f.is_some()).count();
                metrics::counter!("tessera_identity_owner_cache_hits_total").increment(hits as u64);
                metrics::counter!("tessera_identity_owner_cache_misses_total")
                    .increment((found.len() - hits) as u64);
                found
            }
            Ok(_) => {
                failed("read", "MGET answered the wrong number of values", false);
                vec![None; identifiers.len()]
            }
            Err(e) => {
                failed("read", &e.to_string(), false);
                vec![None; identifiers.len()]
            }
        }
    }

    /// Stores `entries` (read under the locks the module comment names), before the caller's
    /// transaction commits. When the write fails after it may have been sent, the epoch is
    /// advanced in the caller's transaction, since the write could still land after the commit.
    ///
    /// First, unless the run found it covered already, `cached_until` is moved two TTLs ahead
    /// in the caller's transaction, so replicas without the cache know, until these entries
    /// have expired, that their merges must retire them.
    pub(crate) async fn fill(
        &self,
        conn: &mut PgConnection,
        run: RunEpoch,
        entries: &[(&Identifier, ProfileAge)],
    ) -> Result<(), sqlx::Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let redis = match self.link.connection().await {
            Ok(redis) => redis,
            // Nothing was sent.
            Err(e) => {
                failed("fill", &e.to_string(), false);
                return Ok(());
            }
        };
        if !run.covered {
            sqlx::query(
                "UPDATE owner_cache_epoch \
                 SET cached_until = clock_timestamp() + make_interval(secs => $2) \
                 WHERE cached_until < clock_timestamp() + make_interval(secs => $1)",
            )
            .bind(self.in_use_seconds(1))
            .bind(self.in_use_seconds(2))
            .execute(&mut *conn)
            .await?;
        }
        let epoch = run.epoch;
        let mut pipe = redis::pipe();
        for (identifier, age) in entries {
            pipe.cmd("SET")
                .arg(self.key(epoch, identifier))
                .arg(&encode(*age)[..])
                .arg("PX")
                .arg(self.ttl_ms)
                .ignore();
        }
        if let Err(e) = self.send(redis, &pipe).await {
            failed("fill", &e.to_string(), true);
            advance(conn).await?;
        }
        Ok(())
    }

    /// Deletes the entries of every identifier of the trees of `merged` (profiles the caller's
    /// transaction merged into others, holding their rows `FOR UPDATE`), before it commits;
    /// advances the epoch instead when Redis does not confirm the deletion.
    ///
    /// The epoch is read here, under those row locks: any fill of these identifiers happened
    /// before the locks were taken, so at this epoch or an older (retired) one.
    pub(crate) async fn evict_merged(
        &self,
        conn: &mut PgConnection,
        merged: &[Uuid],
    ) -> Result<(), sqlx::Error> {
        if merged.is_empty() {
            return Ok(());
        }
        let epoch = Self::epoch(&mut *conn).await?;
        let held: Vec<(String, String)> = sqlx::query_as(TREE_IDENTIFIERS_SQL)
            .bind(merged)
            .fetch_all(&mut *conn)
            .await?;
        if held.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = held
            .into_iter()
            .map(|(kind, value)| self.key(epoch, &Identifier { kind, value }))
            .collect();
        let deleted = async {
            let redis = self.link.connection().await?;
            let mut pipe = redis::pipe();
            for chunk in keys.chunks(1_000) {
                pipe.cmd("UNLINK").arg(chunk).ignore();
            }
            self.send(redis, &pipe).await
        };
        match deleted.await {
            Ok(()) => {
                metrics::counter!("tessera_identity_owner_cache_evictions_total")
                    .increment(keys.len() as u64);
            }
            Err(e) => {
                failed("evict", &e.to_string(), true);
                advance(conn).await?;
            }
        }
        Ok(())
    }

    async fn send(
        &self,
        mut redis: ConnectionManager,
        pipe: &redis::Pipeline,
    ) -> Result<(), CacheError> {
        self.link.bounded(pipe.query_async::<()>(&mut redis)).await
    }
}

/// What a transaction that merged the profiles `merged` (holding their rows `FOR UPDATE`)
/// does about the owner cache before it commits: with the cache, deletes their entries
/// ([`OwnerCache::evict_merged`]); without it, retires every entry while others may be alive
/// ([`retire_for_uncached_merge`]).
pub(crate) async fn forget_merged(
    conn: &mut PgConnection,
    owners: Option<&OwnerCache>,
    merged: &[Uuid],
) -> Result<(), sqlx::Error> {
    match owners {
        _ if merged.is_empty() => Ok(()),
        Some(cache) => cache.evict_merged(conn, merged).await,
        None => retire_for_uncached_merge(conn).await,
    }
}

/// For a replica without the cache, after its transaction merged profiles (holding their
/// rows `FOR UPDATE`): when other replicas' entries may be alive, advances the epoch, since it
/// cannot delete the merged profiles' entries. Read under the row locks: a fill of those
/// profiles' owners held them `FOR SHARE` until its commit, which moved `cached_until` first.
async fn retire_for_uncached_merge(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let in_use: bool =
        sqlx::query_scalar("SELECT cached_until > clock_timestamp() FROM owner_cache_epoch")
            .fetch_one(&mut *conn)
            .await?;
    if in_use {
        advance(conn).await?;
        metrics::counter!("tessera_identity_owner_cache_uncached_merges_total").increment(1);
        tracing::warn!(
            "this identity replica has no owner cache but others use one: its merge retired \
             every entry; give every identity replica the same REDIS_URL and \
             identity.owner_cache_ttl_seconds"
        );
    }
    Ok(())
}

/// Counts a failed cache operation; the caller carries on without the cache. One that retired
/// every entry (a fill or eviction that failed after it may have been sent, or an eviction
/// not sent) is logged as a warning; the others (every run while Redis is down) at debug.
fn failed(op: &'static str, error: &str, retired: bool) {
    metrics::counter!("tessera_identity_owner_cache_errors_total", "op" => op).increment(1);
    if retired {
        tracing::warn!(op, error, "owner cache failed: every entry is retired");
    } else {
        tracing::debug!(op, error, "owner cache unavailable");
    }
}

fn encode(age: ProfileAge) -> [u8; ENTRY_LEN] {
    let mut out = [0u8; ENTRY_LEN];
    out[..16].copy_from_slice(age.id.as_bytes());
    out[16..].copy_from_slice(&age.created_at.unix_timestamp_nanos().to_be_bytes());
    out
}

/// An entry's owner; `None` for anything not written by [`encode`] (read as a miss).
fn decode(bytes: &[u8]) -> Option<ProfileAge> {
    let bytes: &[u8; ENTRY_LEN] = bytes.try_into().ok()?;
    let id = Uuid::from_bytes(bytes[..16].try_into().ok()?);
    let nanos = i128::from_be_bytes(bytes[16..].try_into().ok()?);
    let created_at = OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?;
    Some(ProfileAge { created_at, id })
}

#[cfg(test)]
mod tests {
    use sqlx::PgPool;

    use super::*;
    use crate::store::test_record;
    use crate::{Identity, IdentitySettings};

    /// The identity service on a new test database with the owner cache on `redis_url`, a pool
    /// of its own on the database, and the cache's key prefix.
    async fn cached_identity(
        redis_url: &str,
    ) -> (tessera_testkit::TestDb, PgPool, Identity, OwnerCache) {
        let (test, db, pool) = super::super::migrated().await;
        let prefix = tessera_testkit::redis_prefix();
        let identity =
            Identity::with_owner_cache(db, IdentitySettings::default(), redis_url, &prefix)
                .await
                .expect("identity");
        let cache = OwnerCache::open(redis_url, &prefix, Duration::from_secs(60)).expect("cache");
        (test, pool, identity, cache)
    }

    async fn redis() -> redis::aio::MultiplexedConnection {
        redis::Client::open(tessera_testkit::redis_url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis")
    }

    async fn epoch(pool: &PgPool) -> Epoch {
        let mut conn = pool.acquire().await.expect("conn");
        OwnerCache::epoch(&mut conn).await.expect("epoch")
    }

    /// The entry of `(kind, value)` at the epoch in force.
    async fn entry(
        pool: &PgPool,
        cache: &OwnerCache,
        kind: &str,
        value: &str,
    ) -> Option<ProfileAge> {
        let key = cache.key(epoch(pool).await, &Identifier::new(kind, value));
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut redis().await)
            .await
            .expect("get");
        bytes.as_deref().and_then(decode)
    }

    /// Writes an entry naming `profile` as the owner of `(kind, value)` at the epoch in force,
    /// as a fill would.
    async fn plant(pool: &PgPool, cache: &OwnerCache, (kind, value): (&str, &str), profile: Uuid) {
        let created_at: OffsetDateTime =
            sqlx::query_scalar("SELECT created_at FROM profiles WHERE profile_id = $1")
                .bind(profile)
                .fetch_one(pool)
                .await
                .expect("read");
        let key = cache.key(epoch(pool).await, &Identifier::new(kind, value));
        let () = redis::cmd("SET")
            .arg(key)
            .arg(
                &encode(ProfileAge {
                    created_at,
                    id: profile,
                })[..],
            )
            .query_async(&mut redis().await)
            .await
            .expect("set");
    }

    /// Resolves one record of `event` carrying `ids`; its profile.
    async fn resolve(identity: &Identity, event: &str, ids: &[(&str, &str)]) -> Uuid {
        let rules = identity.rules();
        let resolved = identity
            .resolve(vec![test_record(&rules.rules, event, ids)])
            .await
            .expect("resolve");
        resolved[0].profile_id
    }

    /// A run reads its identifiers' owners from the cache once a run has read them in
    /// Postgres: an entry pointing elsewhere is what the next run answers.
    #[tokio::test]
    async fn known_identifiers_are_answered_from_the_cache() {
        let (_test, pool, identity, cache) = cached_identity(&tessera_testkit::redis_url()).await;
        let p = resolve(&identity, "e1", &[("anonymous_id", "a1")]).await;
        assert_eq!(
            entry(&pool, &cache, "anonymous_id", "a1").await,
            None,
            "a new link is not filled"
        );
        assert_eq!(resolve(&identity, "e2", &[("anonymous_id", "a1")]).await, p);
        let filled = entry(&pool, &cache, "anonymous_id", "a1")
            .await
            .expect("filled");
        assert_eq!(filled.id, p);

        let q = resolve(&identity, "e3", &[("anonymous_id", "b1")]).await;
        assert_eq!(
            filled.created_at.unix_timestamp_nanos() / 1_000 * 1_000,
            filled.created_at.unix_timestamp_nanos()
        );
        plant(&pool, &cache, ("anonymous_id", "a1"), q).await;
        assert_eq!(
            resolve(&identity, "e4", &[("anonymous_id", "a1")]).await,
            q,
            "the run took the owner from the cache, not from Postgres"
        );
    }

    /// An entry naming a merged profile (which no writer leaves behind, but a Redis failover
    /// could bring a deleted one back) costs a linking run one retry, which reads Postgres and
    /// overwrites it; without that, every attempt would meet it and the run would give up.
    #[tokio::test]
    async fn a_stale_entry_costs_one_retry_and_is_overwritten() {
        let (_test, pool, identity, cache) = cached_identity(&tessera_testkit::redis_url()).await;
        let p = resolve(&identity, "e1", &[("anonymous_id", "a1")]).await;
        let q = resolve(&identity, "e2", &[("anonymous_id", "b1")]).await;
        assert_eq!(
            resolve(
                &identity,
                "e3",
                &[("anonymous_id", "a1"), ("anonymous_id", "b1")]
            )
            .await,
            p
        );
        plant(&pool, &cache, ("anonymous_id", "b1"), q).await;
        let linked = resolve(
            &identity,
            "e4",
            &[("anonymous_id", "b1"), ("email", "b1@example.com")],
        )
        .await;
        assert_eq!(linked, p);
        assert_eq!(
            entry(&pool, &cache, "anonymous_id", "b1")
                .await
                .map(|e| e.id),
            Some(p),
            "the retry's fill replaced the stale entry"
        );
    }

    /// A merge deletes the entries of the merged profile's identifiers before it commits, and
    /// an unmerge retires every entry: the next runs answer the graph as it is now.
    #[tokio::test]
    async fn merges_and_unmerges_leave_no_stale_owner() {
        let (_test, pool, identity, cache) = cached_identity(&tessera_testkit::redis_url()).await;
        let p = resolve(&identity, "e1", &[("anonymous_id", "a1")]).await;
        resolve(&identity, "e2", &[("anonymous_id", "a1")]).await;
        let u = resolve(&identity, "e3", &[("user_id", "u1")]).await;
        resolve(&identity, "e4", &[("user_id", "u1")]).await;
        assert_eq!(
            entry(&pool, &cache, "user_id", "u1").await.map(|e| e.id),
            Some(u)
        );

        let merged = resolve(
            &identity,
            "e5",
            &[("user_id", "u1"), ("anonymous_id", "a1")],
        )
        .await;
        assert_eq!(merged, p, "the older profile survives");
        assert_eq!(
            entry(&pool, &cache, "user_id", "u1").await,
            None,
            "evicted by the merge"
        );
        assert_eq!(resolve(&identity, "e6", &[("user_id", "u1")]).await, p);
        assert_eq!(
            entry(&pool, &cache, "user_id", "u1").await.map(|e| e.id),
            Some(p),
            "filled again with the survivor"
        );

        let before = epoch(&pool).await;
        identity.unmerge_profile(u, "test").await.expect("unmerge");
        assert!(
            epoch(&pool).await.0 > before.0,
            "the unmerge retired every entry"
        );
        assert_eq!(resolve(&identity, "e7", &[("user_id", "u1")]).await, u);
        assert_eq!(resolve(&identity, "e8", &[("anonymous_id", "a1")]).await, p);
    }

    /// A merge decided outside the pipeline (`MergeProfiles`, matching) deletes the merged
    /// profile's entries too.
    #[tokio::test]
    async fn a_manual_merge_leaves_no_stale_owner() {
        let (_test, pool, identity, cache) = cached_identity(&tessera_testkit::redis_url()).await;
        let p = resolve(&identity, "e1", &[("anonymous_id", "a1")]).await;
        let u = resolve(&identity, "e2", &[("user_id", "u1")]).await;
        resolve(&identity, "e3", &[("user_id", "u1")]).await;
        assert_eq!(
            entry(&pool, &cache, "user_id", "u1").await.map(|e| e.id),
            Some(u)
        );
        let merge = identity
            .merge_profiles((p, u), "same person")
            .await
            .expect("merge")
            .expect("merged");
        assert_eq!(merge.merged_profile_id, u);
        assert_eq!(
            entry(&pool, &cache, "user_id", "u1").await,
            None,
            "evicted by the merge"
        );
        assert_eq!(resolve(&identity, "e4", &[("user_id", "u1")]).await, p);
    }

    /// With Redis unreachable, runs read Postgres, and a merge that cannot delete its entries
    /// retires them all by advancing the epoch.
    #[tokio::test]
    async fn without_redis_runs_read_postgres_and_merges_advance_the_epoch() {
        let (_test, pool, identity, _cache) = cached_identity("redis://127.0.0.1:1").await;
        let p = resolve(&identity, "e1", &[("anonymous_id", "a1")]).await;
        let u = resolve(&identity, "e2", &[("user_id", "u1")]).await;
        assert_eq!(resolve(&identity, "e3", &[("user_id", "u1")]).await, u);
        let before = epoch(&pool).await;
        assert_eq!(
            resolve(
                &identity,
                "e4",
                &[("user_id", "u1"), ("anonymous_id", "a1")]
            )
            .await,
            p
        );
        assert!(
            epoch(&pool).await.0 > before.0,
            "the merge retired every entry"
        );
        assert_eq!(resolve(&identity, "e5", &[("user_id", "u1")]).await, p);
    }

    /// A replica without the cache cannot delete the entries of the profiles it merges: while
    /// another replica's entries may be alive, its merges retire them all (the epoch), so a
    /// cached replica's next run that links reads the survivor instead of locking a merged
    /// owner (which it would retry until it gave up). Before any fill, its merges leave the
    /// epoch alone.
    #[tokio::test]
    async fn merges_by_a_replica_without_the_cache_retire_the_entries_while_they_live() {
        let (_test, db, pool) = super::super::migrated().await;
        let uncached = Identity::new(db.clone(), IdentitySettings::default())
            .await
            .expect("identity");
        let cached = Identity::with_owner_cache(
            db,
            IdentitySettings::default(),
            &tessera_testkit::redis_url(),
            &tessera_testkit::redis_prefix(),
        )
        .await
        .expect("identity");
        let in_use = || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT cached_until > now() + interval '1 hour' FROM owner_cache_epoch",
            )
            .fetch_one(&pool)
            .await
            .expect("cached_until")
        };

        // Nothing filled yet: an uncached merge keeps the epoch.
        resolve(&uncached, "e0", &[("anonymous_id", "a0")]).await;
        resolve(&uncached, "e0b", &[("anonymous_id", "b0")]).await;
        let before = epoch(&pool).await;
        resolve(
            &uncached,
            "e0c",
            &[("anonymous_id", "a0"), ("anonymous_id", "b0")],
        )
        .await;
        assert_eq!(
            epoch(&pool).await,
            before,
            "no cache in use, nothing retired"
        );
        assert!(!in_use().await);

        // The cached replica fills a1 -> p and b1 -> q (q newer than p).
        let p = resolve(&cached, "e1", &[("anonymous_id", "a1")]).await;
        resolve(&cached, "e2", &[("anonymous_id", "a1")]).await;
        let q = resolve(&cached, "e3", &[("anonymous_id", "b1")]).await;
        resolve(&cached, "e4", &[("anonymous_id", "b1")]).await;
        assert!(in_use().await, "a fill keeps cached_until a TTL ahead");

        // The uncached replica merges q into p.
        let before = epoch(&pool).await;
        let merged = resolve(
            &uncached,
            "e5",
            &[("anonymous_id", "a1"), ("anonymous_id", "b1")],
        )
        .await;
        assert_eq!(merged, p);
        assert_ne!(epoch(&pool).await, before, "the merge retired every entry");

        // b1's entry named q; the cached replica links through b1 and gets p.
        let linked = resolve(
            &cached,
            "e6",
            &[("anonymous_id", "b1"), ("email", "b1@example.com")],
        )
        .await;
        assert_eq!(linked, p);
        assert_ne!(linked, q);
    }

    #[test]
    fn entries_round_trip_and_reject_foreign_values() {
        let age = ProfileAge {
            created_at: OffsetDateTime::from_unix_timestamp_nanos(1_764_000_000_123_456_000)
                .unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(decode(&encode(age)), Some(age));
        assert_eq!(decode(b"not an entry"), None);
        assert_eq!(decode(&[0u8; ENTRY_LEN + 1]), None);
    }

    #[test]
    fn keys_keep_types_and_values_apart() {
        let cache = OwnerCache::open("redis://127.0.0.1:1", "t:", Duration::from_secs(1)).unwrap();
        let a = Identifier::new("a:b", "c");
        let b = Identifier::new("a", "b:c");
        assert_ne!(cache.key(Epoch(0), &a), cache.key(Epoch(0), &b));
        assert_ne!(cache.key(Epoch(0), &a), cache.key(Epoch(1), &a));
    }
}
