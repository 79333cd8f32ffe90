//! The identifier cache's epoch raise survives Redis failing: a split or a deletion made while
//! Redis is unreachable is owed in the database, no replica trusts a cached lookup meanwhile
//! (near cache included), and any replica makes the raise once Redis answers; an epoch below the
//! highest one raised (a restored Redis) is not trusted either. Real Redis behind a TCP proxy
//! the tests stop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tessera_profile::SCHEMA;
use tessera_profile::store::{self, ProfileStore};
use tessera_proto::common::v1 as common;
use tessera_proto::convert::to_timestamp;
use tessera_proto::identity::v1 as identity;
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::get_profile_request::Lookup;
use tessera_store::{
    Cache, CacheError, Database, DbSettings, NearCacheSettings, RedisCache, Versioned,
};
use tessera_testkit::redis_url;
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::Code;

use crate::service::{Env, Replica, events, minutes_ago};
use crate::store_suite::{postgres, sqlite};
use crate::support::identify;

/// A TCP proxy in front of the test Redis that can be made unreachable: while down it closes
/// every connection it has and every one it accepts.
struct RedisProxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl RedisProxy {
    async fn start() -> Self {
        let target = redis_url()
            .trim_start_matches("redis://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, connections) = (up.clone(), connections.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue;
                    }
                    let target = target.clone();
                    let pipe = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(pipe);
                }
            }
        });
        Self {
            addr,
            up,
            connections,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for pipe in self.connections.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        self.down();
        self.accept.abort();
    }
}

/// A cache whose writes fail while `refusing` is set, and whose reads still answer: as Redis
/// out of memory under `noeviction` refuses writes and serves reads.
#[derive(Debug)]
struct RefusingWrites {
    inner: Arc<dyn Cache>,
    refusing: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Cache for RefusingWrites {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, CacheError> {
        self.inner.get(key).await
    }

    async fn put_if_newer(&self, key: &str, value: Versioned) -> Result<bool, CacheError> {
        if self.refusing.load(Ordering::SeqCst) {
            return Err(CacheError::Down);
        }
        self.inner.put_if_newer(key, value).await
    }

    async fn remove(&self, key: &str) -> Result<(), CacheError> {
        if self.refusing.load(Ordering::SeqCst) {
            return Err(CacheError::Down);
        }
        self.inner.remove(key).await
    }
}

fn redis_at(env: &Env, url: &str) -> Arc<dyn Cache> {
    Arc::new(RedisCache::new(url, &env.redis_prefix, Duration::from_secs(60)).unwrap())
}

fn near_redis(env: &Env) -> Arc<dyn Cache> {
    Arc::new(
        RedisCache::with_near_cache(
            &redis_url(),
            &env.redis_prefix,
            Duration::from_secs(60),
            &NearCacheSettings::default(),
        )
        .unwrap(),
    )
}

fn u2() -> Lookup {
    Lookup::Identifier(common::Identifier {
        r#type: "user_id".to_owned(),
        value: "u2".to_owned(),
    })
}

/// The identifier cache's epoch key (as the service names it).
const EPOCH_KEY: &str = "identifiers:epoch";

/// The identifier cache's key of `user_id:<user>` (as the service makes it).
fn identifier_key(user: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"user_id")
        .chain_update([0])
        .chain_update(user.as_bytes())
        .finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("identifier:{hex}")
}

/// p1 (u1) and p2 (u2), p2 merged into p1, and `u2 -> p1` cached by the lookups through
/// `readers` (each twice, so a near cache holds it too).
async fn merged_and_cached(env: &Env, writer: &Replica, readers: &[&Replica]) {
    writer
        .apply(events(vec![
            identify("e1", "p1", "u1", minutes_ago(5), json!({"plan": "pro"})),
            identify("e2", "p2", "u2", minutes_ago(4), json!({"plan": "free"})),
        ]))
        .await
        .unwrap();
    env.double.link("user_id", "u1", "p1");
    writer
        .apply(pb::ApplyEventsRequest {
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
    for reader in readers {
        for _ in 0..2 {
            assert_eq!(reader.get(u2()).await.unwrap().profile_id, "p1");
        }
    }
    assert_eq!(env.double.lookups(), 1, "the lookup is cached");
}

/// Identity unmerges p2 (u2 leads to it again), then its outbox splits through `replica`.
async fn unmerge(env: &Env, replica: &Replica) {
    env.double.link("user_id", "u2", "p2");
    let assign = |event: &str, profile: &str, user: &str| pb::EventAssignment {
        event_id: event.to_owned(),
        profile_id: profile.to_owned(),
        identifiers: vec![common::Identifier {
            r#type: "user_id".to_owned(),
            value: user.to_owned(),
        }],
    };
    replica
        .writes
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
        .expect("a split succeeds with Redis unreachable");
}

/// Waits until `replica` answers u2 from the cache again (the raise was made and forgotten):
/// two reads in a row that do not ask identity.
async fn until_cached_again(env: &Env, replica: &Replica) {
    for _ in 0..100 {
        assert_eq!(replica.get(u2()).await.unwrap().profile_id, "p2");
        let asked = env.double.lookups();
        assert_eq!(replica.get(u2()).await.unwrap().profile_id, "p2");
        if env.double.lookups() == asked {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the identifier cache was never trusted again");
}

#[tokio::test]
async fn a_split_while_redis_is_unreachable_is_not_forgotten_when_it_is_back() {
    let env = Env::new().await;
    let proxy = RedisProxy::start().await;
    // A reaches Redis through the proxy; B directly, with a near cache, and never loses it.
    let a = env
        .replica_with(redis_at(&env, &proxy.url()), env.scoring.lazy_channel())
        .await;
    let b = env
        .replica_with(near_redis(&env), env.scoring.lazy_channel())
        .await;
    merged_and_cached(&env, &a, &[&a, &b]).await;

    proxy.down();
    unmerge(&env, &a).await;
    proxy.up();
    // The stale entry `u2 -> p1` is still in Redis (and in B's near cache) under the current
    // epoch: the owed raise keeps every replica from trusting it.
    let p2 = a.get(u2()).await.unwrap();
    assert_eq!((p2.profile_id.as_str(), p2.event_count), ("p2", 1));
    // B learns of the owed raise (or of the raise) within a poll.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(b.get(u2()).await.unwrap().profile_id, "p2");
    // Once the raise is made, the cache is trusted again, with the new answer.
    until_cached_again(&env, &b).await;
    until_cached_again(&env, &a).await;
}

#[tokio::test]
async fn a_raise_owed_by_a_replica_that_never_reaches_redis_again_is_made_by_another() {
    let env = Env::new().await;
    let proxy = RedisProxy::start().await;
    let a = env
        .replica_with(redis_at(&env, &proxy.url()), env.scoring.lazy_channel())
        .await;
    merged_and_cached(&env, &a, &[&a]).await;
    proxy.down();
    unmerge(&env, &a).await;
    // A is gone for good (as after a crash); a replica started later reads the stale entry's
    // Redis but not its answer, and makes the raise A owed.
    drop(a);
    let c = env.replica().await;
    assert_eq!(c.get(u2()).await.unwrap().profile_id, "p2");
    until_cached_again(&env, &c).await;
}

#[tokio::test]
async fn a_raise_owed_by_a_writer_that_died_mid_write_keeps_cached_lookups_refused() {
    let env = Env::new().await;
    let a = env.replica().await;
    merged_and_cached(&env, &a, &[&a]).await;
    a.apply(events(vec![identify(
        "e3",
        "p3",
        "u3",
        minutes_ago(3),
        json!({}),
    )]))
    .await
    .unwrap();
    // The writer of a deletion or split that moved u2 to p3 recorded its raise and died before
    // marking it due (identity has moved u2 already): nothing may raise it yet, and no cached
    // lookup is trusted meanwhile.
    let db = Database::connect(env.db.url(), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    store::open(db.clone())
        .record_identifier_raise(OffsetDateTime::now_utc())
        .await
        .unwrap();
    env.double.link("user_id", "u2", "p3");
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..3 {
        let asked = env.double.lookups();
        assert_eq!(a.get(u2()).await.unwrap().profile_id, "p3");
        assert_eq!(env.double.lookups(), asked + 1, "identity answered");
    }
    db.close().await;
}

#[tokio::test]
async fn a_deletion_while_redis_is_unreachable_never_serves_the_deleted_profile_when_it_is_back() {
    use pb::delete_profile_request::Lookup as Delete;
    let env = Env::new().await;
    let proxy = RedisProxy::start().await;
    // A reaches Redis through the proxy; B directly, with a near cache, and never loses it.
    let a = env
        .replica_with(redis_at(&env, &proxy.url()), env.scoring.lazy_channel())
        .await;
    let b = env
        .replica_with(near_redis(&env), env.scoring.lazy_channel())
        .await;
    // `u2 -> p1` and p1 itself are cached in Redis and in B's near cache.
    merged_and_cached(&env, &a, &[&a, &b]).await;

    proxy.down();
    // Identity forgets the person and the store deletes them; the raise and the tombstones
    // cannot reach Redis, and stay owed in the database (the deletion succeeds).
    let deleted = a.delete(Delete::ProfileId("p1".to_owned())).await;
    assert!(deleted.is_ok(), "{deleted:?}");
    proxy.up();
    // The stale `u2 -> p1` is still in Redis and in B's near cache: the owed raise keeps A
    // from trusting it at once, B within a poll.
    not_found("a", a.get(u2()).await);
    tokio::time::sleep(Duration::from_millis(600)).await;
    not_found("b", b.get(u2()).await);
    not_found("a", a.get(u2()).await);

    // Calling again once Redis is back (A may take a moment to reconnect) repeats it; the
    // person stays gone through both replicas.
    let mut finished = a.delete(Delete::ProfileId("p1".to_owned())).await;
    for _ in 0..50 {
        if finished.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        finished = a.delete(Delete::ProfileId("p1".to_owned())).await;
    }
    let finished = finished.expect("the deletion finishes once Redis answers");
    assert_eq!(finished.profile_id, "p1");
    not_found("a", a.get(u2()).await);
    not_found("b", b.get(u2()).await);
    not_found("b", b.get(Lookup::ProfileId("p1".to_owned())).await);
}

fn p1() -> Lookup {
    Lookup::ProfileId("p1".to_owned())
}

fn not_found(replica: &str, answer: Result<pb::Profile, tonic::Status>) {
    assert_eq!(
        answer.as_ref().map_err(tonic::Status::code).err(),
        Some(Code::NotFound),
        "{replica} answered {answer:?}"
    );
}

/// Waits until Redis itself holds the tombstones of p1 and p2 and no purge is owed any more.
async fn until_purged(env: &Env) {
    let redis = redis_at(env, &redis_url());
    let db = Database::connect(env.db.url(), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    let store = store::open(db.clone());
    let tombstone = Some(Versioned {
        version: i64::MAX,
        bytes: None,
    });
    for _ in 0..100 {
        let p1 = redis.get("profile:p1").await.unwrap();
        let p2 = redis.get("profile:p2").await.unwrap();
        if p1 == tombstone && p2 == tombstone && store.owed_purges(10).await.unwrap().is_empty() {
            db.close().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the owed tombstones never reached Redis");
}

#[tokio::test]
async fn a_deletion_while_redis_is_unreachable_never_serves_the_deleted_profile_by_id() {
    use pb::delete_profile_request::Lookup as Delete;
    let env = Env::new().await;
    let proxy = RedisProxy::start().await;
    // A reaches Redis through the proxy; B directly, with a near cache, and never loses it.
    let a = env
        .replica_with(redis_at(&env, &proxy.url()), env.scoring.lazy_channel())
        .await;
    let b = env
        .replica_with(near_redis(&env), env.scoring.lazy_channel())
        .await;
    // p1 is cached in Redis and in B's near cache.
    merged_and_cached(&env, &a, &[&a, &b]).await;
    for replica in [&a, &b] {
        for _ in 0..2 {
            assert_eq!(replica.get(p1()).await.unwrap().profile_id, "p1");
        }
    }

    proxy.down();
    // The store deletes the person; the tombstones cannot reach Redis and stay owed in the
    // database: the deletion itself is done, so the call succeeds.
    let deleted = a
        .delete(Delete::ProfileId("p1".to_owned()))
        .await
        .expect("a deletion succeeds with Redis unreachable");
    assert_eq!(deleted.profile_ids, ["p1", "p2"]);
    proxy.up();
    // A owes the tombstones: it does not trust a cached p1 at once.
    not_found("a", a.get(p1()).await);
    // B learns of them within a poll, and its near cache is not trusted either.
    tokio::time::sleep(Duration::from_millis(600)).await;
    not_found("b", b.get(p1()).await);
    // A reconnects to Redis (within a second of its failure) and never reads the stale entry.
    for _ in 0..20 {
        not_found("a", a.get(p1()).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    not_found("b", b.get(p1()).await);
    // The tombstones were put (by B, which reaches Redis), and the cache is trusted again.
    until_purged(&env).await;
    not_found("a", a.get(p1()).await);
    not_found("b", b.get(p1()).await);
}

#[tokio::test]
async fn a_deletion_whose_replica_died_before_redis_came_back_is_purged_by_another() {
    use pb::delete_profile_request::Lookup as Delete;
    let env = Env::new().await;
    let proxy = RedisProxy::start().await;
    let a = env
        .replica_with(redis_at(&env, &proxy.url()), env.scoring.lazy_channel())
        .await;
    merged_and_cached(&env, &a, &[&a]).await;
    assert_eq!(a.get(p1()).await.unwrap().profile_id, "p1");
    let redis = redis_at(&env, &redis_url());
    let cached = |entry: Option<Versioned>| entry.and_then(|e| e.bytes).is_some();
    assert!(cached(redis.get("profile:p1").await.unwrap()));

    proxy.down();
    a.delete(Delete::ProfileId("p1".to_owned()))
        .await
        .expect("a deletion succeeds with Redis unreachable");
    // A dies (as after a crash) without ever reaching Redis again: p1's entry is still there.
    drop(a);
    assert!(
        cached(redis.get("profile:p1").await.unwrap()),
        "the stale entry is still in Redis"
    );

    // A replica started now, with a near cache, does not trust the stale entry, and puts the
    // tombstones A owed.
    let b = env
        .replica_with(near_redis(&env), env.scoring.lazy_channel())
        .await;
    for _ in 0..3 {
        not_found("b", b.get(p1()).await);
    }
    until_purged(&env).await;
    not_found("b", b.get(p1()).await);
    let c = env.replica().await;
    not_found("c", c.get(p1()).await);
}

#[tokio::test]
async fn a_deletion_whose_tombstones_redis_refused_is_not_served_from_what_it_still_reads() {
    use pb::delete_profile_request::Lookup as Delete;
    let env = Env::new().await;
    let refusing = Arc::new(AtomicBool::new(false));
    let refuse = |inner: Arc<dyn Cache>| -> Arc<dyn Cache> {
        Arc::new(RefusingWrites {
            inner,
            refusing: refusing.clone(),
        })
    };
    let a = env
        .replica_with(
            refuse(redis_at(&env, &redis_url())),
            env.scoring.lazy_channel(),
        )
        .await;
    let b = env
        .replica_with(refuse(near_redis(&env)), env.scoring.lazy_channel())
        .await;
    merged_and_cached(&env, &a, &[&a, &b]).await;
    for replica in [&a, &b] {
        for _ in 0..2 {
            assert_eq!(replica.get(p1()).await.unwrap().profile_id, "p1");
        }
    }

    refusing.store(true, Ordering::SeqCst);
    a.delete(Delete::ProfileId("p1".to_owned()))
        .await
        .expect("a deletion succeeds when Redis refuses the tombstones");
    // p1 is still in Redis and in B's near cache, and both still answer reads: only the owed
    // purges keep the replicas from serving it (A at once, B within a poll, C from its start).
    let redis = redis_at(&env, &redis_url());
    let stale = redis.get("profile:p1").await.unwrap();
    assert!(
        stale.and_then(|e| e.bytes).is_some(),
        "p1 is still in Redis"
    );
    not_found("a", a.get(p1()).await);
    tokio::time::sleep(Duration::from_millis(600)).await;
    not_found("b", b.get(p1()).await);
    not_found("a", a.get(p1()).await);
    let c = env
        .replica_with(
            refuse(redis_at(&env, &redis_url())),
            env.scoring.lazy_channel(),
        )
        .await;
    not_found("c", c.get(p1()).await);

    // Redis takes writes again: the tombstones are put, and the cache is trusted again.
    refusing.store(false, Ordering::SeqCst);
    until_purged(&env).await;
    for (name, replica) in [("a", &a), ("b", &b), ("c", &c)] {
        not_found(name, replica.get(p1()).await);
    }
}

#[tokio::test]
async fn a_restored_redis_holding_an_older_epoch_is_not_trusted() {
    let env = Env::new().await;
    let cache = redis_at(&env, &redis_url());
    // An epoch an earlier raise left, long ago.
    let old_epoch = Versioned {
        version: 1_000,
        bytes: Some(bytes::Bytes::from_static(b"epoch")),
    };
    assert!(cache.put_if_newer(EPOCH_KEY, old_epoch).await.unwrap());
    let a = env.replica().await;
    merged_and_cached(&env, &a, &[&a]).await;
    // A snapshot of Redis now: the epoch, and `u2 -> p1` cached under it.
    let u2_key = identifier_key("u2");
    let snapshot = [
        (
            EPOCH_KEY,
            cache.get(EPOCH_KEY).await.unwrap().expect("epoch"),
        ),
        (
            &u2_key,
            cache.get(&u2_key).await.unwrap().expect("u2 cached"),
        ),
    ];
    assert_eq!(snapshot[1].1.version, 1_000);
    assert_eq!(snapshot[1].1.bytes.as_deref(), Some(&b"p1"[..]));

    // The split's raise reaches Redis (its epoch is the floor now), and u2 is cached again,
    // leading to p2.
    unmerge(&env, &a).await;
    until_cached_again(&env, &a).await;

    // Redis restored from the snapshot: the older epoch, and the entry cached under it.
    for (key, value) in snapshot {
        cache.remove(key).await.unwrap();
        assert!(cache.put_if_newer(key, value).await.unwrap());
    }
    // Neither the replica that made the raise nor one started now (which reads the floor from
    // the database) trusts the restored entry: identity answers.
    let c = env.replica().await;
    for replica in [&a, &c] {
        let asked = env.double.lookups();
        assert_eq!(replica.get(u2()).await.unwrap().profile_id, "p2");
        assert!(env.double.lookups() > asked, "identity answered");
    }
    // The epoch is raised above the floor again, and the cache is trusted again.
    until_cached_again(&env, &c).await;
    until_cached_again(&env, &a).await;
    assert!(cache.get(EPOCH_KEY).await.unwrap().expect("epoch").version > 1_000);
}

async fn raises_are_owed_until_made(store: &dyn ProfileStore) {
    const NOW: OffsetDateTime = datetime!(2026-06-01 00:00:00 UTC);
    let five_minutes_ago = NOW - time::Duration::minutes(5);
    let none = store.identifier_raises(five_minutes_ago).await.unwrap();
    assert!(none.owed.is_empty() && none.due.is_empty());
    assert_eq!(none.floor, 0);

    // Recorded before a write: owed, not due until the write ends...
    let first = store.record_identifier_raise(NOW).await.unwrap();
    let raises = store.identifier_raises(five_minutes_ago).await.unwrap();
    assert_eq!((raises.owed, raises.due), (vec![first], vec![]));
    // ... or until it is old enough that its writer must have died.
    let later = NOW + time::Duration::seconds(1);
    assert_eq!(store.identifier_raises(later).await.unwrap().due, [first]);

    store.identifier_raise_due(first, NOW).await.unwrap();
    let second = store.record_identifier_raise(NOW).await.unwrap();
    let raises = store.identifier_raises(five_minutes_ago).await.unwrap();
    assert_eq!(
        (raises.owed, raises.due),
        (vec![first, second], vec![first])
    );

    // Made: forgotten, and its epoch is the floor, which never goes down.
    store.finish_identifier_raises(&[first], 100).await.unwrap();
    let raises = store.identifier_raises(five_minutes_ago).await.unwrap();
    assert_eq!((raises.owed, raises.floor), (vec![second], 100));
    store.identifier_raise_due(second, NOW).await.unwrap();
    store.finish_identifier_raises(&[second], 50).await.unwrap();
    // Forgetting twice (two replicas made it) changes nothing.
    store.finish_identifier_raises(&[second], 50).await.unwrap();
    let raises = store.identifier_raises(five_minutes_ago).await.unwrap();
    assert!(raises.owed.is_empty() && raises.due.is_empty());
    assert_eq!(raises.floor, 100);
}

#[tokio::test]
async fn identifier_raises_are_owed_until_made_on_sqlite() {
    raises_are_owed_until_made(&*sqlite().await.store).await;
}

#[tokio::test]
async fn identifier_raises_are_owed_until_made_on_postgres() {
    let backend = postgres().await;
    raises_are_owed_until_made(&*backend.store).await;
    backend.db.close().await;
}

async fn deletions_owe_purges_until_put(store: &dyn ProfileStore) {
    const NOW: OffsetDateTime = datetime!(2026-06-01 00:00:00 UTC);
    assert!(store.owed_purges(10).await.unwrap().is_empty());
    // Recorded in the deletion's transaction, for every profile id it answers.
    let deleted = store
        .delete("p9", &["p8".to_owned()], "gdpr ticket 1", NOW)
        .await
        .unwrap();
    assert_eq!(deleted.profile_ids, ["p8", "p9"]);
    assert_eq!(store.owed_purges(10).await.unwrap(), ["p8", "p9"]);
    assert_eq!(store.owed_purges(1).await.unwrap(), ["p8"]);
    // Forgotten once put; twice (two replicas put it) changes nothing.
    store.finish_purges(&["p8".to_owned()]).await.unwrap();
    store.finish_purges(&["p8".to_owned()]).await.unwrap();
    assert_eq!(store.owed_purges(10).await.unwrap(), ["p9"]);
    // Deleting again owes again (its tombstones are put again).
    store.delete("p9", &[], "gdpr ticket 1", NOW).await.unwrap();
    assert_eq!(store.owed_purges(10).await.unwrap(), ["p9"]);
    store.finish_purges(&["p9".to_owned()]).await.unwrap();
    assert!(store.owed_purges(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn deletions_owe_purges_until_put_on_sqlite() {
    deletions_owe_purges_until_put(&*sqlite().await.store).await;
}

#[tokio::test]
async fn deletions_owe_purges_until_put_on_postgres() {
    let backend = postgres().await;
    deletions_owe_purges_until_put(&*backend.store).await;
    backend.db.close().await;
}
