//! The identity graph on Postgres, correct with several replicas writing at once.
//!
//! One transaction resolves a run of records: it takes an advisory lock per identifier
//! (sorted, so two runs never wait on each other in a cycle; a first attempt takes only those
//! free at once and leaves the records tied to a held one to a run that waits), reads the
//! canonical profile of every identifier, locks `FOR UPDATE` in id order those of records that
//! may link or merge (a record whose identifiers one profile all holds needs no row lock) and
//! checks they are still canonical. The advisory locks stop anyone else from attaching the same
//! identifiers, or resolving the same events (a redelivered event carries the same identifiers;
//! one that carries none meets the first's resolution as a primary key violation, and is
//! retried); the row locks stop anyone else from merging the profiles. When a profile was
//! merged between the read and the lock, the run is rolled back and retried (a run that
//! conflicts twice is halved, so a hot profile costs a small run, not a large one).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use rand::Rng;
use sqlx::PgPool;
use sqlx::postgres::PgConnection;
use tessera_core::Identifier;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Change, Closure, ClosureSize, EVENT_TIME, Forgotten, Outcome, Rewritten, SplitPayload,
    carried_identifiers, decode_resolutions, dropped_identifiers, erased_digest, erased_pseudonym,
    has_later_event, history_identifiers, late_suspects, lookup_identifiers, mark_suppressed,
    profiles_to_lock, reorder, reorder_plan, reorder_skipped, reordered, replay_order,
    rewrite_plan, rewritten, scrub_detail, suppression_keys, with_replayed,
};
use super::{
    ComponentHistory, GraphIdentifier, HistoryRows, IdentityStore, LoggedDecision, ProfileGraph,
    Stored, StoredRules, VersionedRules, decode_detail, decode_merges, encode_detail,
    encode_merges, history, next_api_version, now, outcomes, record_metrics, registration,
    rules_json,
};
use crate::IdentityError;
use crate::domain::{
    Constraints, GraphView, Plan, ProfileAge, Record, ReorderConfig, Replay, Resolution,
    RulesConfig, UnionFind, plan, replay, suppresses_events,
};

/// A new test database with the identity schema, as a `Database` and as its pool.
#[cfg(test)]
pub(crate) async fn migrated() -> (tessera_testkit::TestDb, tessera_store::Database, PgPool) {
    let test = tessera_testkit::TestDb::new().await;
    let db = tessera_store::Database::connect(
        test.url(),
        crate::SCHEMA,
        &tessera_store::DbSettings::default(),
    )
    .await
    .expect("connect");
    db.migrate(crate::MIGRATIONS).await.expect("migrate");
    let tessera_store::Database::Postgres(pool) = db.clone() else {
        panic!("a Postgres url");
    };
    (test, db, pool)
}

/// Selects graph log entries: the columns of [`DecisionRow`], then the rest of the statement.
macro_rules! decision_sql {
    ($($rest:literal)?) => {
        concat!(
            "SELECT seq, kind, event_id, profile_id, other_profile_id, id_type, id_value, rule, \
             rules_version, event_time, decided_at FROM graph_log"
            $(, " ", $rest)?
        )
    };
}

/// A statement over `tree (profile_id)`: the profiles `$1` and every profile merged into one of
/// them, transitively (the `LATERAL … OFFSET 0` keeps the planner from hashing `profiles`,
/// see `canonical_sql!`), then the rest of the statement.
macro_rules! tree_sql {
    ($rest:literal) => {
        concat!(
            "WITH RECURSIVE tree (profile_id) AS (
    SELECT p FROM unnest($1::uuid[]) AS p
  UNION
    SELECT q.profile_id FROM tree t
    CROSS JOIN LATERAL (
        SELECT r.profile_id FROM profiles r WHERE r.merged_into = t.profile_id OFFSET 0) q
)
",
            $rest
        )
    };
}

mod matching;
mod owners;

pub(crate) use owners::OwnerCache;

/// How often one run of records is tried before the request fails with `Unavailable`.
const MAX_ATTEMPTS: u32 = 12;

/// How long a forget waits for a pending split of its profile to reach the profile service
/// (the outbox delivers within milliseconds while the profile service is up), in steps.
const SPLIT_WAIT: Duration = Duration::from_millis(250);
/// See [`SPLIT_WAIT`]: 40 steps, 10 s, then `SplitPending` (UNAVAILABLE).
const SPLIT_WAITS: u32 = 40;

/// The canonical profile of each identifier in `$1`/`$2` (parallel arrays of types and values)
/// that the graph holds, with the profile's creation time. The walks use `UNION`, not
/// `UNION ALL`, so a cycle (which writers never create) ends a walk instead of looping forever.
const VIEW_SQL: &str = "
WITH RECURSIVE chain (type, value, profile_id, merged_into, created_at) AS (
    SELECT i.type, i.value, p.profile_id, p.merged_into, p.created_at
    FROM unnest($1::text[], $2::text[]) AS k (type, value)
    JOIN identifiers i ON i.type = k.type AND i.value = k.value
    JOIN profiles p ON p.profile_id = i.profile_id
  UNION
    SELECT c.type, c.value, p.profile_id, p.merged_into, p.created_at
    FROM chain c
    JOIN profiles p ON p.profile_id = c.merged_into
)
SELECT type, value, profile_id, created_at FROM chain WHERE merged_into IS NULL";

/// A walk from the profiles the condition `$start` selects (with `$1` bound to ids) to their
/// canonical profiles: rows `(start_id, profile_id)`.
///
/// The recursive steps here and below read `profiles` through a `LATERAL (… OFFSET 0)`, which
/// the planner cannot flatten into a join: a prepared statement's generic plan otherwise
/// hashes the whole table (a sequential scan of every profile, or of every identifier, per
/// call), so each batch cost grew with the graph instead of with the batch.
macro_rules! canonical_sql {
    ($start:literal) => {
        concat!(
            "
WITH RECURSIVE chain (start_id, profile_id, merged_into) AS (
    SELECT profile_id, profile_id, merged_into FROM profiles WHERE ",
            $start,
            "
  UNION
    SELECT c.start_id, p.profile_id, p.merged_into
    FROM chain c
    CROSS JOIN LATERAL (
        SELECT q.profile_id, q.merged_into FROM profiles q
        WHERE q.profile_id = c.merged_into OFFSET 0) p
)
SELECT start_id, profile_id FROM chain WHERE merged_into IS NULL"
        )
    };
}

/// The canonical profile of each profile in `$1`.
const CANONICAL_SQL: &str = canonical_sql!("profile_id = ANY($1)");

/// The canonical profile of each profile in `$1` that was merged away.
const SURVIVORS_SQL: &str = canonical_sql!("profile_id = ANY($1) AND merged_into IS NOT NULL");

/// The canonical profile of the profile `$1`.
const CANONICAL_ONE_SQL: &str = "
WITH RECURSIVE chain (profile_id, merged_into) AS (
    SELECT profile_id, merged_into FROM profiles WHERE profile_id = $1
  UNION
    SELECT p.profile_id, p.merged_into FROM chain c JOIN profiles p ON p.profile_id = c.merged_into
)
SELECT profile_id FROM chain WHERE merged_into IS NULL";

/// The canonical profile of the identifier `($1, $2)`.
const LOOKUP_SQL: &str = "
WITH RECURSIVE chain (profile_id, merged_into) AS (
    SELECT p.profile_id, p.merged_into
    FROM identifiers i
    JOIN profiles p ON p.profile_id = i.profile_id
    WHERE i.type = $1 AND i.value = $2
  UNION
    SELECT p.profile_id, p.merged_into
    FROM chain c
    JOIN profiles p ON p.profile_id = c.merged_into
)
SELECT profile_id FROM chain WHERE merged_into IS NULL";

/// The identifiers of limited types (`$2`) held by each canonical profile of `$1`, through
/// every profile merged into it.
const LIMITED_SQL: &str = "
WITH RECURSIVE tree (root, profile_id) AS (
    SELECT p, p FROM unnest($1::uuid[]) AS p
  UNION
    SELECT t.root, p.profile_id FROM tree t
    CROSS JOIN LATERAL (
        SELECT q.profile_id FROM profiles q WHERE q.merged_into = t.profile_id OFFSET 0) p
)
SELECT t.root, i.type, i.value, i.linked_at
FROM tree t
CROSS JOIN LATERAL (
    SELECT j.type, j.value, j.linked_at FROM identifiers j
    WHERE j.profile_id = t.profile_id AND j.type = ANY($2) OFFSET 0) i";

/// The pairs an unmerge split apart that touch the components of the canonical profiles `$1`
/// (nothing is expanded while `splits` is empty).
const SPLITS_SQL: &str = tree_sql!(
    "SELECT s.profile_a, s.profile_b FROM splits s
WHERE EXISTS (SELECT 1 FROM splits)
  AND (s.profile_a IN (SELECT profile_id FROM tree) OR s.profile_b IN (SELECT profile_id FROM tree))"
);

/// Forbids in `view` every pair an unmerge split apart that touches the components of the
/// canonical profiles `roots`, as the canonical profiles of its two sides.
pub(super) async fn load_splits(
    conn: &mut PgConnection,
    roots: &[Uuid],
    view: &mut GraphView,
) -> Result<(), sqlx::Error> {
    if roots.is_empty() {
        return Ok(());
    }
    let pairs: Vec<(Uuid, Uuid)> = sqlx::query_as(SPLITS_SQL)
        .bind(roots)
        .fetch_all(&mut *conn)
        .await?;
    if pairs.is_empty() {
        return Ok(());
    }
    let ends: Vec<Uuid> = pairs.iter().flat_map(|(a, b)| [*a, *b]).collect();
    let canonical: HashMap<Uuid, Uuid> = sqlx::query_as(CANONICAL_SQL)
        .bind(&ends)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    let of = |id: Uuid| canonical.get(&id).copied().unwrap_or(id);
    for (a, b) in pairs {
        view.forbid(of(a), of(b));
    }
    Ok(())
}

/// The identity graph in a Postgres schema.
pub(crate) struct PgStore {
    pool: PgPool,
    /// The Redis cache of identifier owners, when configured (see [`owners`]).
    owners: Option<OwnerCache>,
}

/// The retry reason of a unique violation: a concurrent writer of the same key, or, on a
/// resolution's primary key, an event resolved before (see [`PgStore::attempt`]).
const UNIQUE_VIOLATION: &str = "unique violation";

/// Why one attempt at a run did not commit.
enum Failure {
    /// Another transaction got in the way; trying again will see its result.
    Retry(&'static str),
    /// Trying again will not help.
    Fatal(IdentityError),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            match db.code().as_deref() {
                Some("40001") => return Self::Retry("serialization failure"),
                Some("40P01") => return Self::Retry("deadlock"),
                // A run that did not read its stored resolutions meeting one (a redelivered
                // event), or a concurrent writer of the same key, which the locks should make
                // impossible; retrying reads what was written.
                Some("23505") => return Self::Retry(UNIQUE_VIOLATION),
                _ => {}
            }
        }
        Self::Fatal(e.into())
    }
}

impl From<IdentityError> for Failure {
    /// A database error met inside a helper that answers `IdentityError` is classified like one
    /// met directly: a deadlock or serialization failure is retried, not answered.
    fn from(e: IdentityError) -> Self {
        if let IdentityError::Store(tessera_store::StoreError::Sqlx(e)) = e {
            return Self::from(e);
        }
        Self::Fatal(e)
    }
}

impl PgStore {
    pub(crate) fn new(pool: PgPool, owners: Option<OwnerCache>) -> Self {
        Self { pool, owners }
    }

    /// One attempt at resolving `records` in one transaction. On failure the transaction is
    /// rolled back before returning, so its locks do not outlive the attempt.
    ///
    /// With `wait` false, the run takes only the advisory locks it can have at once: the
    /// records tied (through a shared identifier) to one whose lock another
    /// transaction holds are left out and their positions in `records` returned, to be
    /// resolved by a run that waits. Two runs that share a few identifiers then overlap instead
    /// of the second waiting for the whole of the first.
    ///
    /// With `cached` false, the run reads no owner from the owner cache (a retry: should an
    /// entry name a merged profile, which no writer leaves behind but a Redis failover could
    /// bring back, the run would meet it again each time); its fills then overwrite it.
    ///
    /// With `read_stored` false, the run does not look for stored resolutions of its events:
    /// should one have been resolved before, the insert of its resolution fails on the primary
    /// key (`Failure::Retry(UNIQUE_VIOLATION)`) and the caller retries reading them.
    async fn attempt(
        &self,
        rules: &VersionedRules,
        records: &[&Record],
        wait: bool,
        cached: bool,
        read_stored: bool,
    ) -> Result<(Vec<Outcome>, Vec<usize>), Failure> {
        let mut tx = self.pool.begin().await?;
        let deferred = if wait {
            lock_keys(&mut tx, records).await?;
            Vec::new()
        } else {
            try_lock_keys(&mut tx, records).await?
        };
        let taken: Vec<&Record> = taken_positions(records.len(), &deferred)
            .map(|n| records[n])
            .collect();
        let decided = decide_and_write(
            &mut tx,
            rules,
            &taken,
            self.owners.as_ref(),
            cached,
            read_stored,
        )
        .await;
        match decided {
            Ok((done, plan)) => {
                tx.commit().await?;
                record_metrics(&plan);
                Ok((outcomes(&taken, done, plan.resolutions), deferred))
            }
            Err(failure) => {
                // A failed rollback means a broken connection, which the pool discards.
                let _ = tx.rollback().await;
                Err(failure)
            }
        }
    }
}

/// Reads the view, plans and writes `records`, within the caller's transaction, which holds
/// their advisory locks. Returns the stored resolutions of events resolved meanwhile, and the
/// plan for the others. With `cached` false no owner is read from `owners` (it is still
/// filled); with `read_stored` false no stored resolution is read (see [`PgStore::attempt`]).
async fn decide_and_write(
    tx: &mut PgConnection,
    rules: &VersionedRules,
    records: &[&Record],
    owners: Option<&OwnerCache>,
    cached: bool,
    read_stored: bool,
) -> Result<(HashMap<String, Stored>, Plan), Failure> {
    // Events resolved before (in an earlier batch, or by another replica just now) are
    // answered as stored; this is the only read of them. A call's runs skip it until one
    // meets such an event (a redelivery, rare), as a primary key violation.
    let done = if read_stored {
        let event_ids: Vec<&str> = records.iter().map(|r| r.event_id()).collect();
        stored(&mut *tx, &event_ids).await?
    } else {
        HashMap::new()
    };
    let pending: Vec<&Record> = records
        .iter()
        .filter(|r| !done.contains_key(r.event_id()))
        .copied()
        .collect();
    let mut view = GraphView::new();
    mark_suppressed(&mut view, suppressed(&mut *tx, &pending).await?);
    // Suppressed records and erased identifiers read nothing and lock nothing.
    let lookups = lookup_identifiers(&view, &pending);

    // Owners in the cache are not read again; those read here may fill it.
    let epoch = match owners {
        Some(cache) => Some(cache.run_epoch(&mut *tx).await?),
        None => None,
    };
    let cached = match (owners, epoch) {
        (Some(cache), Some(run)) if cached => cache.get(run.epoch, &lookups).await,
        _ => Vec::new(),
    };
    let (types, values): (Vec<&str>, Vec<&str>) = lookups
        .iter()
        .enumerate()
        .filter(|(n, _)| cached.get(*n).is_none_or(Option::is_none))
        .map(|(_, i)| (i.kind.as_str(), i.value.as_str()))
        .unzip();
    let read: Vec<(String, String, Uuid, OffsetDateTime)> = if types.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(VIEW_SQL)
            .bind(types)
            .bind(values)
            .fetch_all(&mut *tx)
            .await?
    };
    let fillable: Vec<(Identifier, ProfileAge)> = match owners {
        Some(_) => read
            .iter()
            .map(|(kind, value, id, created_at)| {
                let identifier = Identifier::new(kind.clone(), value.clone());
                (
                    identifier,
                    ProfileAge {
                        created_at: *created_at,
                        id: *id,
                    },
                )
            })
            .collect(),
        None => Vec::new(),
    };
    let rows: Vec<(String, String, Uuid, OffsetDateTime)> = lookups
        .iter()
        .zip(&cached)
        .filter_map(|(i, hit)| {
            hit.map(|age| (i.kind.clone(), i.value.clone(), age.id, age.created_at))
        })
        .chain(read)
        .collect();
    let profiles = {
        let owners: HashMap<(&str, &str), Uuid> = rows
            .iter()
            .map(|(kind, value, id, _)| ((kind.as_str(), value.as_str()), *id))
            .collect();
        profiles_to_lock(&view, &pending, |i| {
            owners.get(&(i.kind.as_str(), i.value.as_str())).copied()
        })
    };
    if !profiles.is_empty() {
        // Locked in id order, so runs that share profiles queue instead of deadlocking.
        let locked: Vec<(Uuid, bool)> = sqlx::query_as(
            "SELECT profile_id, merged_into IS NULL FROM profiles \
             WHERE profile_id = ANY($1) ORDER BY profile_id FOR UPDATE",
        )
        .bind(&profiles)
        .fetch_all(&mut *tx)
        .await?;
        if locked.len() != profiles.len() || locked.iter().any(|(_, canonical)| !canonical) {
            return Err(Failure::Retry("profile merged meanwhile"));
        }
    }
    for (kind, value, id, created_at) in rows {
        view.insert(Identifier { kind, value }, ProfileAge { created_at, id });
    }
    load_splits(&mut *tx, &profiles, &mut view).await?;
    // Read under the row locks: what the candidates hold cannot change before the commit.
    if !profiles.is_empty() {
        let limited_types: Vec<&str> = rules.rules.limited_types().collect();
        let limited: Vec<(Uuid, String, String, OffsetDateTime)> = sqlx::query_as(LIMITED_SQL)
            .bind(&profiles)
            .bind(&limited_types)
            .fetch_all(&mut *tx)
            .await?;
        for (root, kind, value, linked_at) in limited {
            view.insert_limited(root, Identifier { kind, value }, linked_at);
        }
    }
    let (types, values): (Vec<&str>, Vec<&str>) = lookups
        .iter()
        .filter(|i| rules.rules.may_be_shared(&i.kind))
        .map(|i| (i.kind.as_str(), i.value.as_str()))
        .unzip();
    if !types.is_empty() {
        let seen: Vec<(String, String, Uuid)> = sqlx::query_as(
            "SELECT s.type, s.value, s.profile_id FROM sightings s \
             JOIN unnest($1::text[], $2::text[]) AS k (type, value) \
             ON s.type = k.type AND s.value = k.value",
        )
        .bind(&types)
        .bind(&values)
        .fetch_all(&mut *tx)
        .await?;
        let mut seen_profiles: Vec<Uuid> = seen.iter().map(|s| s.2).collect();
        seen_profiles.sort_unstable();
        seen_profiles.dedup();
        // Most runs see no identifier on another profile: no round trip then. Only the merged
        // ones come back: the others are their own canonical profiles.
        let canonical: HashMap<Uuid, Uuid> = if seen_profiles.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as(SURVIVORS_SQL)
                .bind(&seen_profiles)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect()
        };
        for (kind, value, profile) in seen {
            let profile = canonical.get(&profile).copied().unwrap_or(profile);
            view.insert_sighting(Identifier { kind, value }, profile);
        }
    }

    let now = now();
    let plan = plan(
        &rules.rules,
        pending.iter().copied(),
        view,
        now,
        Uuid::now_v7,
    );
    write(&mut *tx, &plan, rules.version, now).await?;
    let merged: Vec<Uuid> = plan.merges.iter().map(|m| m.merged_profile_id).collect();
    owners::forget_merged(&mut *tx, owners, &merged).await?;
    if let (Some(cache), Some(run)) = (owners, epoch) {
        fill_owners(&mut *tx, cache, run, &fillable).await?;
    }
    let mut plan = plan;
    reorder_late(&mut *tx, rules, &mut plan, now).await?;
    Ok((done, plan))
}

/// Fills the owner cache with `read` (owners a run read in Postgres under its identifiers'
/// advisory locks), after the run wrote its plan: only the owners still canonical, checked
/// under a `FOR SHARE` lock on their rows held until the commit (the run's own merges show
/// here). A row another transaction holds for update is skipped, not waited for: that
/// transaction may be merging it.
async fn fill_owners(
    tx: &mut PgConnection,
    cache: &OwnerCache,
    run: owners::RunEpoch,
    read: &[(Identifier, ProfileAge)],
) -> Result<(), sqlx::Error> {
    if read.is_empty() {
        return Ok(());
    }
    let mut ids: Vec<Uuid> = read.iter().map(|(_, age)| age.id).collect();
    ids.sort_unstable();
    ids.dedup();
    let live: HashSet<Uuid> = sqlx::query_scalar(
        "SELECT profile_id FROM profiles \
         WHERE profile_id = ANY($1) AND merged_into IS NULL FOR SHARE SKIP LOCKED",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let entries: Vec<(&Identifier, ProfileAge)> = read
        .iter()
        .filter(|(_, age)| live.contains(&age.id))
        .map(|(identifier, age)| (identifier, *age))
        .collect();
    cache.fill(tx, run, &entries).await
}

/// Re-resolves in event-time order the components a late record of `plan` touched, within the
/// run's transaction: when a record that took an order-dependent decision (see
/// [`late_suspects`]) is older than an event already resolved in its closure, the closure is
/// replayed by event time and written back like a rewrite, and the profile service told
/// through the merge outbox. `plan`'s resolutions of replayed events become the replay's.
/// Nothing is read when no record took such a decision; a closure over the rules' reorder
/// bound is not replayed (see [`reorder_skipped`]).
async fn reorder_late(
    tx: &mut PgConnection,
    rules: &VersionedRules,
    plan: &mut Plan,
    now: OffsetDateTime,
) -> Result<(), Failure> {
    let bound = rules.rules.reorder();
    let suspects = late_suspects(&rules.rules, plan);
    let mut done: HashSet<Uuid> = HashSet::new();
    for (event, at, carried) in suspects {
        let roots = match closure_roots(&mut *tx, &carried, at, bound).await? {
            Closure::Within { roots, late: true } => roots,
            Closure::Within { late: false, .. } => continue,
            Closure::TooLarge { size, late } => {
                reorder_skipped(&event, size, bound, late);
                continue;
            }
        };
        if roots.iter().all(|r| done.contains(r)) {
            continue;
        }
        let (roots, rows) = match lock_closure(&mut *tx, &carried, at, bound, roots).await? {
            Locked::Stable(roots, rows) => (roots, rows),
            Locked::TooLarge(size) => {
                reorder_skipped(&event, size, bound, true);
                continue;
            }
        };
        let members: HashSet<Uuid> = rows.members.iter().map(|m| m.0).collect();
        let ids: Vec<Uuid> = members.iter().copied().collect();
        let history = history(rows)?;
        let mut constraints = Constraints {
            forbidden: sqlx::query_as(
                "SELECT profile_a, profile_b FROM splits \
                 WHERE profile_a = ANY($1) OR profile_b = ANY($1)",
            )
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?,
            ..Constraints::default()
        };
        let (types, values): (Vec<&str>, Vec<&str>) = history_identifiers(&history)
            .into_iter()
            .map(|i| (i.kind.as_str(), i.value.as_str()))
            .unzip();
        constraints.detached = detached(&mut *tx, &types, &values).await?;
        constraints.erased = erased_among(&mut *tx, &history_identifiers(&history)).await?;
        done.extend(roots.iter().copied());
        let replayed = reorder(&rules.rules, &history, &constraints, now);
        let root = history.root;
        clear_derived(&mut *tx, &ids).await?;
        write(
            &mut *tx,
            &reorder_plan(&replayed, &members, (root, &event), now),
            rules.version,
            now,
        )
        .await?;
        rewrite_resolutions(&mut *tx, &replayed).await?;
        queue_split(
            &mut *tx,
            (root, root),
            &reordered(root, &members, &replayed),
            "late event: re-resolved in event-time order",
            now,
        )
        .await?;
        metrics::counter!("tessera_identity_rewrites_total", "rule" => EVENT_TIME).increment(1);
        with_replayed(plan, &replayed);
    }
    Ok(())
}

/// How many times [`lock_closure`] extends its locks to a closure that grew before it gives
/// the run back to be retried.
const CLOSURE_LOCK_ROUNDS: usize = 4;

/// What [`lock_closure`] came to.
enum Locked {
    /// The closure's canonical profiles (sorted) and its history rows, read under locks that
    /// keep it as it is until the commit.
    Stable(Vec<Uuid>, HistoryRows),
    /// The closure grew over the bound meanwhile.
    TooLarge(ClosureSize),
}

/// Locks the closure of a suspect carrying `carried`, found without locks to be `roots`, so
/// that nothing changes it until the commit, and reads its history under those locks.
///
/// What changes a closure is a write that carries one of its identifiers (advisory locks: a
/// resolution takes one per identifier of its records, a rewrite and a forget one per
/// identifier of their component) or that touches one of its components (their root rows:
/// a resolution locks the canonical owner of every identifier it carries, a merge both
/// profiles, a rewrite its root). So the closure takes the advisory locks of every identifier
/// its events carried (linked, or dropped by a rule) and its roots' rows in id order, as a
/// rewrite locks a component, then follows the closure again under them: a writer that
/// committed between the first look and the locks may have extended it (a new component
/// carrying one of its identifiers). While the closure found under the locks has a root or
/// an identifier not locked yet, the locks are extended and it is followed again; after
/// [`CLOSURE_LOCK_ROUNDS`] rounds the run is retried (`Retry`). Extending rather than retrying
/// at once: a retry drops the whole run, and under steady traffic on a busy closure it would
/// meet the same race again, while each round leaves only the writers already past their own
/// locks able to extend it.
async fn lock_closure(
    tx: &mut PgConnection,
    carried: &[Identifier],
    at: OffsetDateTime,
    bound: ReorderConfig,
    mut roots: Vec<Uuid>,
) -> Result<Locked, Failure> {
    let mut keys: HashSet<i64> = HashSet::new();
    let mut live: HashSet<Uuid> = HashSet::new();
    let mut rows = history_rows(&mut *tx, &roots).await?;
    for _ in 0..CLOSURE_LOCK_ROUNDS {
        let mut wanted: Vec<i64> = carried_identifiers(&rows)
            .iter()
            .chain(carried)
            .map(identifier_key)
            .filter(|k| !keys.contains(k))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if !wanted.is_empty() {
            sqlx::query("SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) AS k")
                .bind(&wanted)
                .execute(&mut *tx)
                .await?;
            keys.extend(wanted);
        }
        let unlocked: Vec<Uuid> = roots
            .iter()
            .filter(|r| !live.contains(r))
            .copied()
            .collect();
        if !unlocked.is_empty() {
            // A root merged (or forgotten) before its lock stays out of `live`: the closure
            // followed again below names its canonical profile, locked in the next round.
            let locked: Vec<(Uuid, bool)> = sqlx::query_as(
                "SELECT profile_id, merged_into IS NULL FROM profiles \
                 WHERE profile_id = ANY($1) ORDER BY profile_id FOR UPDATE",
            )
            .bind(&unlocked)
            .fetch_all(&mut *tx)
            .await?;
            live.extend(locked.into_iter().filter(|(_, l)| *l).map(|(id, _)| id));
        }
        let again = match closure_roots(&mut *tx, carried, at, bound).await? {
            Closure::Within { roots, .. } => roots,
            Closure::TooLarge { size, .. } => return Ok(Locked::TooLarge(size)),
        };
        rows = history_rows(&mut *tx, &again).await?;
        let stable = again.iter().all(|r| live.contains(r))
            && carried_identifiers(&rows)
                .iter()
                .all(|i| keys.contains(&identifier_key(i)));
        if stable {
            return Ok(Locked::Stable(again, rows));
        }
        roots = again;
    }
    Err(Failure::Retry("closure grew meanwhile"))
}

/// The advisory lock key of an identifier, as resolutions and rewrites take it.
fn identifier_key(i: &Identifier) -> i64 {
    lock_key(&[b"identifier", i.kind.as_bytes(), i.value.as_bytes()])
}

/// A closure of `identifiers` (a suspect's, resolved at `at`) found larger than the bound
/// (`size` so far): late when the part read was (`late`), or when an event that carried one of
/// the suspect's identifiers (its link or drop in the graph log, through the index by
/// identifier) happened after it.
async fn too_large(
    conn: &mut PgConnection,
    identifiers: &[Identifier],
    at: OffsetDateTime,
    size: ClosureSize,
    late: bool,
) -> Result<Closure<Uuid>, IdentityError> {
    if late {
        return Ok(Closure::TooLarge { size, late });
    }
    let (types, values): (Vec<&str>, Vec<&str>) = identifiers
        .iter()
        .map(|i| (i.kind.as_str(), i.value.as_str()))
        .unzip();
    let late = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM graph_log g \
         JOIN unnest($1::text[], $2::text[]) AS k (type, value) \
           ON g.id_type = k.type AND g.id_value = k.value \
         WHERE g.kind IN ('link', 'drop') AND g.event_time > $3)",
    )
    .bind(&types)
    .bind(&values)
    .bind(at)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Closure::TooLarge { size, late })
}

/// The closure of `identifiers` (a suspect's, resolved at `at`): the components that hold them
/// or whose events carried them without linking them, then, step by step, those related in
/// the same way to every identifier those components' events carried. Counted as it is
/// followed: once it holds more profiles, events or identifiers than `bound`, it is followed
/// no further (each step reads at most what is left of the bound, plus one).
async fn closure_roots(
    conn: &mut PgConnection,
    identifiers: &[Identifier],
    at: OffsetDateTime,
    bound: ReorderConfig,
) -> Result<Closure<Uuid>, IdentityError> {
    let mut roots: HashSet<Uuid> = HashSet::new();
    let mut seen: HashSet<Identifier> = HashSet::new();
    let mut frontier = identifiers.to_vec();
    let mut size = ClosureSize::default();
    let mut late = false;
    loop {
        frontier.retain(|i| seen.insert(i.clone()));
        size.identifiers = u64::try_from(seen.len()).unwrap_or(u64::MAX);
        if size.over(bound) {
            return too_large(&mut *conn, identifiers, at, size, late).await;
        }
        if frontier.is_empty() {
            break;
        }
        let (types, values): (Vec<&str>, Vec<&str>) = frontier
            .iter()
            .map(|i| (i.kind.as_str(), i.value.as_str()))
            .unzip();
        let known: Vec<Uuid> = roots.iter().copied().collect();
        let (room_profiles, room_events) = size.room(bound);
        let new: Vec<Uuid> = sqlx::query_scalar(
            "WITH RECURSIVE k (type, value) AS (SELECT * FROM unnest($1::text[], $2::text[])), \
             start (profile_id) AS ( \
                 SELECT g.profile_id FROM graph_log g JOIN k \
                   ON g.id_type = k.type AND g.id_value = k.value \
                 WHERE g.profile_id IS NOT NULL \
               UNION \
                 SELECT i.profile_id FROM identifiers i JOIN k \
                   ON i.type = k.type AND i.value = k.value), \
             chain (profile_id, merged_into) AS ( \
                 SELECT p.profile_id, p.merged_into FROM profiles p JOIN start USING (profile_id) \
               UNION \
                 SELECT p.profile_id, p.merged_into FROM chain c \
                 JOIN profiles p ON p.profile_id = c.merged_into) \
             SELECT DISTINCT profile_id FROM chain \
             WHERE merged_into IS NULL AND NOT (profile_id = ANY($3)) LIMIT $4",
        )
        .bind(&types)
        .bind(&values)
        .bind(&known)
        .bind(room_profiles)
        .fetch_all(&mut *conn)
        .await?;
        if new.is_empty() {
            break;
        }
        roots.extend(new.iter().copied());
        // Counted before the step's history is read: a component of a million events is not.
        let members: Vec<Uuid> = sqlx::query_scalar(
            "WITH RECURSIVE tree (profile_id) AS ( \
                 SELECT unnest($1::uuid[]) \
               UNION \
                 SELECT p.profile_id FROM tree t CROSS JOIN LATERAL ( \
                     SELECT q.profile_id FROM profiles q \
                     WHERE q.merged_into = t.profile_id OFFSET 0) p) \
             SELECT profile_id FROM tree LIMIT $2",
        )
        .bind(&new)
        .bind(room_profiles)
        .fetch_all(&mut *conn)
        .await?;
        let events: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM resolutions WHERE profile_id = ANY($1) LIMIT $2) s",
        )
        .bind(&members)
        .bind(room_events)
        .fetch_one(&mut *conn)
        .await?;
        size.add(members.len(), events);
        if size.over(bound) {
            return too_large(&mut *conn, identifiers, at, size, late).await;
        }
        let rows = history_rows(&mut *conn, &new).await?;
        late = late || has_later_event(&rows, at);
        frontier = carried_identifiers(&rows);
    }
    let mut roots: Vec<Uuid> = roots.into_iter().collect();
    roots.sort_unstable();
    Ok(Closure::Within { roots, late })
}

/// Clears what the components of the profiles `ids` derived (membership, merges, identifiers,
/// sightings) before a replay of them is written.
async fn clear_derived(conn: &mut PgConnection, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    // The replay moves identifiers between profiles: every cached owner is retired.
    owners::advance(&mut *conn).await?;
    sqlx::query(
        "UPDATE profiles SET merged_into = NULL, merged_at = NULL WHERE profile_id = ANY($1)",
    )
    .bind(ids)
    .execute(&mut *conn)
    .await?;
    for table in [
        "DELETE FROM merges WHERE merged_profile_id = ANY($1)",
        "DELETE FROM identifiers WHERE profile_id = ANY($1)",
        "DELETE FROM sightings WHERE profile_id = ANY($1)",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(table))
            .bind(ids)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Rewrites the stored resolution of every event a replay resolved, and deletes those of the
/// events it left out (erased).
async fn rewrite_resolutions(
    conn: &mut PgConnection,
    replayed: &Replay,
) -> Result<(), sqlx::Error> {
    let n = replayed.plan.resolutions.len();
    let (mut events, mut profiles, mut merges, mut details) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for r in &replayed.plan.resolutions {
        events.push(r.event_id.as_str());
        profiles.push(r.profile_id);
        merges.push(encode_merges(&r.merges));
        details.push(encode_detail(r));
    }
    sqlx::query(
        "UPDATE resolutions AS r SET profile_id = u.p, merges = u.m::jsonb, detail = u.d::jsonb \
         FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[]) AS u (e, p, m, d) \
         WHERE r.event_id = u.e",
    )
    .bind(events)
    .bind(profiles)
    .bind(merges)
    .bind(details)
    .execute(&mut *conn)
    .await?;
    if !replayed.erased_events.is_empty() {
        sqlx::query("DELETE FROM resolutions WHERE event_id = ANY($1)")
            .bind(&replayed.erased_events)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Queues a rewrite's split for the profile service, in order with the merges before it.
async fn queue_split(
    conn: &mut PgConnection,
    (survivor, merged): (Uuid, Uuid),
    result: &Rewritten,
    reason: &str,
    now: OffsetDateTime,
) -> Result<(), IdentityError> {
    let payload = serde_json::to_string(&SplitPayload::from(result))
        .map_err(|e| IdentityError::Corrupt(format!("split does not encode: {e}")))?;
    sqlx::query(
        "INSERT INTO merge_outbox (surviving_profile_id, merged_profile_id, cause, rule, \
                                   merged_at, payload) \
         VALUES ($1, $2, $3, 'split', $4, $5::jsonb)",
    )
    .bind(survivor)
    .bind(merged)
    .bind(reason)
    .bind(now)
    .bind(payload)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl IdentityStore for PgStore {
    async fn resolve(
        &self,
        rules: &VersionedRules,
        records: &[Record],
    ) -> Result<Vec<Outcome>, IdentityError> {
        let mut out: Vec<Option<Outcome>> = records.iter().map(|_| None).collect();
        // Runs still to resolve (positions in `records`, in order), with the attempts each has
        // had and whether it waits for locks. A first attempt takes the locks it can have and
        // leaves the rest to a run that waits (see `attempt`).
        let mut runs: VecDeque<(Vec<usize>, u32, bool)> =
            VecDeque::from([((0..records.len()).collect(), 0, false)]);
        // Whether a run met an event resolved before: from then on every run reads the stored
        // resolutions of its events. Most calls carry none, and never read them.
        let mut read_stored = false;
        while let Some((run, attempts, wait)) = runs.pop_front() {
            let these: Vec<&Record> = run.iter().map(|&n| &records[n]).collect();
            match self
                .attempt(rules, &these, wait, attempts == 0, read_stored)
                .await
            {
                Ok((stored, deferred)) => {
                    let taken = taken_positions(run.len(), &deferred).map(|n| run[n]);
                    for (n, outcome) in taken.zip(stored) {
                        out[n] = Some(outcome);
                    }
                    if !deferred.is_empty() {
                        metrics::counter!("tessera_identity_deferred_records_total")
                            .increment(deferred.len() as u64);
                        runs.push_front((deferred.into_iter().map(|n| run[n]).collect(), 0, true));
                    }
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(reason)) => {
                    metrics::counter!("tessera_identity_retries_total", "reason" => reason)
                        .increment(1);
                    tracing::debug!(
                        reason,
                        records = run.len(),
                        attempts,
                        "retrying identity run"
                    );
                    if reason == UNIQUE_VIOLATION && !read_stored {
                        // Most likely an event resolved before: again at once, reading them.
                        read_stored = true;
                        runs.push_front((run, attempts, wait));
                        continue;
                    }
                    if attempts >= 1 && run.len() > 1 {
                        let mut first = run;
                        let second = first.split_off(first.len() / 2);
                        runs.push_front((second, 0, wait));
                        runs.push_front((first, 0, wait));
                    } else if attempts + 1 >= MAX_ATTEMPTS {
                        return Err(IdentityError::Contended);
                    } else {
                        tokio::time::sleep(backoff(attempts)).await;
                        runs.push_front((run, attempts + 1, wait));
                    }
                }
            }
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| IdentityError::Corrupt("a record was left unresolved".into())))
            .collect()
    }

    async fn canonical(&self, profiles: &[Uuid]) -> Result<HashMap<Uuid, Uuid>, IdentityError> {
        let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(CANONICAL_SQL)
            .bind(profiles)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().collect())
    }

    async fn survivors(&self, profiles: &[Uuid]) -> Result<HashMap<Uuid, Uuid>, IdentityError> {
        let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(SURVIVORS_SQL)
            .bind(profiles)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().collect())
    }

    async fn lookup(&self, identifier: &Identifier) -> Result<Option<Uuid>, IdentityError> {
        Ok(sqlx::query_scalar(LOOKUP_SQL)
            .bind(&identifier.kind)
            .bind(&identifier.value)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn register_rules(&self, config: &RulesConfig) -> Result<StoredRules, IdentityError> {
        let json = rules_json(config);
        let mut tx = self.pool.begin().await?;
        // One change at a time, so replicas starting together agree on the version.
        lock_rules(&mut tx).await?;
        let latest = latest_rules(&mut tx).await?;
        let last_from_config: Option<serde_json::Value> = sqlx::query_scalar(
            "SELECT rules FROM rules_versions WHERE source = 'config' \
             ORDER BY version DESC LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let current = match registration(&json, latest, last_from_config.as_ref()) {
            Ok(latest) => latest,
            Err(version) => {
                insert_rules(&mut tx, version, &json, "config").await?;
                StoredRules {
                    version,
                    rules: json,
                }
            }
        };
        tx.commit().await?;
        Ok(current)
    }

    async fn component_history(&self, profile: Uuid) -> Result<ComponentHistory, IdentityError> {
        let mut tx = self.pool.begin().await?;
        // One snapshot for every read.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let root: Option<Uuid> = sqlx::query_scalar(CANONICAL_ONE_SQL)
            .bind(profile)
            .fetch_optional(&mut *tx)
            .await?;
        let root = root.ok_or(IdentityError::UnknownProfile)?;
        let rows = history_rows(&mut tx, &[root]).await?;
        tx.commit().await?;
        history(rows)
    }

    async fn rewrite(
        &self,
        rules: &VersionedRules,
        change: &Change,
        reason: &str,
    ) -> Result<Rewritten, IdentityError> {
        let mut tx = self.pool.begin().await?;
        let now = now();
        // The profile the change starts from and, for an unmerge, the pair kept apart.
        let (start, pair) = match change {
            Change::Unmerge(merged) => {
                let survivor = survivor_of(&mut tx, *merged).await?;
                (Some(*merged), Some((*merged, survivor)))
            }
            Change::Detach(identifier) | Change::Erase(identifier) => {
                let owner: Option<Uuid> = sqlx::query_scalar(
                    "SELECT profile_id FROM identifiers WHERE type = $1 AND value = $2",
                )
                .bind(&identifier.kind)
                .bind(&identifier.value)
                .fetch_optional(&mut *tx)
                .await?;
                if owner.is_none() && matches!(change, Change::Detach(_)) {
                    return Err(IdentityError::NotFound);
                }
                (owner, None)
            }
        };
        if let Change::Erase(identifier) = change {
            erase_everywhere(&mut tx, identifier, reason, now).await?;
        }
        let Some(start) = start else {
            // An erased identifier no profile holds: remembered and scrubbed, nothing to split.
            tx.commit().await?;
            return Ok(Rewritten::nothing());
        };
        let root: Uuid = sqlx::query_scalar(CANONICAL_ONE_SQL)
            .bind(start)
            .fetch_one(&mut *tx)
            .await?;
        // Resolutions lock their identifiers (advisory) before reading which profile holds
        // them, and then the profiles' rows. Taking the component's identifier locks first, in
        // the same order, makes a resolution that carries any of them wait for the rewrite and
        // then read the rewritten graph, without a lock-order inversion.
        let live = lock_component(&mut tx, root).await?;
        if live != Some(true) {
            return Err(IdentityError::Contended);
        }
        let rows = history_rows(&mut tx, &[root]).await?;
        let members: HashSet<Uuid> = rows.members.iter().map(|m| m.0).collect();
        let ids: Vec<Uuid> = members.iter().copied().collect();
        let mut constraints = Constraints {
            forbidden: sqlx::query_as(
                "SELECT profile_a, profile_b FROM splits \
                 WHERE profile_a = ANY($1) OR profile_b = ANY($1)",
            )
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?,
            ..Constraints::default()
        };
        constraints.forbidden.extend(pair);
        let history = history(rows)?;
        let (types, values): (Vec<&str>, Vec<&str>) = history_identifiers(&history)
            .into_iter()
            .map(|i| (i.kind.as_str(), i.value.as_str()))
            .unzip();
        constraints.detached = detached(&mut tx, &types, &values).await?;
        // Identifiers erased before (another person's erase or forget) never link again,
        // whatever this replay decides.
        constraints.erased = erased_among(&mut tx, &history_identifiers(&history)).await?;
        match change {
            Change::Unmerge(_) => {}
            Change::Detach(identifier) => {
                constraints.detached.insert(identifier.clone());
            }
            Change::Erase(identifier) => {
                constraints.erased.insert(identifier.clone());
            }
        }
        let replayed = replay(
            &rules.rules,
            &replay_order(&rules.rules, &history),
            &constraints,
            now,
            Uuid::now_v7,
        );
        // Clear what the component derived, then write the replayed graph.
        clear_derived(&mut tx, &ids).await?;
        let survivor = pair.map(|(_, survivor)| survivor);
        write(
            &mut tx,
            &rewrite_plan(&replayed, &members, (change, root, survivor), reason, now),
            rules.version,
            now,
        )
        .await?;
        rewrite_resolutions(&mut tx, &replayed).await?;
        match (change, pair) {
            (Change::Unmerge(_), Some((merged, survivor))) => {
                sqlx::query(
                    "INSERT INTO splits (profile_a, profile_b, reason, created_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                )
                .bind(merged)
                .bind(survivor)
                .bind(reason)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            (Change::Detach(identifier), _) => {
                sqlx::query(
                    "INSERT INTO detached_identifiers (type, value, reason, created_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                )
                .bind(&identifier.kind)
                .bind(&identifier.value)
                .bind(reason)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            (Change::Unmerge(_) | Change::Erase(_), _) => {}
        }
        let result = rewritten((change, root, survivor), &members, &replayed);
        // The profile service hears of it through the outbox, in order with the merges.
        queue_split(
            &mut tx,
            (survivor.unwrap_or(root), result.profile.unwrap_or(root)),
            &result,
            reason,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(result)
    }

    async fn forget(
        &self,
        profile: Uuid,
        reason: &str,
    ) -> Result<(Forgotten, bool), IdentityError> {
        let mut waits = 0;
        let mut attempts = 0;
        while attempts < MAX_ATTEMPTS {
            let mut tx = self.pool.begin().await?;
            match forget_component(&mut tx, profile, reason).await {
                Ok(Forgetting::Done(done)) => {
                    tx.commit().await?;
                    return Ok(done);
                }
                Err(Failure::Fatal(e)) => {
                    let _ = tx.rollback().await;
                    return Err(e);
                }
                Err(Failure::Retry(why)) => {
                    let _ = tx.rollback().await;
                    metrics::counter!("tessera_identity_retries_total", "reason" => why)
                        .increment(1);
                    tracing::debug!(reason = why, attempts, "retrying a forget");
                    tokio::time::sleep(backoff(attempts)).await;
                    attempts += 1;
                }
                Ok(Forgetting::SplitPending) => {
                    let _ = tx.rollback().await;
                    if waits >= SPLIT_WAITS {
                        return Err(IdentityError::SplitPending);
                    }
                    waits += 1;
                    tokio::time::sleep(SPLIT_WAIT).await;
                }
            }
        }
        Err(IdentityError::Contended)
    }

    async fn current_rules(&self) -> Result<Option<StoredRules>, IdentityError> {
        let mut conn = self.pool.acquire().await?;
        latest_rules(&mut conn).await
    }

    async fn update_rules(
        &self,
        config: &RulesConfig,
        expected: Option<i64>,
    ) -> Result<i64, IdentityError> {
        let json = rules_json(config);
        let mut tx = self.pool.begin().await?;
        lock_rules(&mut tx).await?;
        let latest = latest_rules(&mut tx).await?;
        let version = match next_api_version(&json, latest.as_ref(), expected)? {
            Some(version) => {
                insert_rules(&mut tx, version, &json, "api").await?;
                version
            }
            None => latest.map_or(0, |l| l.version),
        };
        tx.commit().await?;
        Ok(version)
    }

    async fn graph_log(&self) -> Result<Vec<LoggedDecision>, IdentityError> {
        let rows: Vec<DecisionRow> = sqlx::query_as(decision_sql!("ORDER BY seq"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(decision).collect())
    }

    async fn profile_graph(
        &self,
        profile: Uuid,
        max_decisions: i64,
    ) -> Result<Option<ProfileGraph>, IdentityError> {
        let mut conn = self.pool.acquire().await?;
        let root: Option<(Uuid, Uuid)> = sqlx::query_as(CANONICAL_SQL)
            .bind(vec![profile])
            .fetch_optional(&mut *conn)
            .await?;
        let Some((_, root)) = root else {
            return Ok(None);
        };
        let tree = component_members(&mut conn, root).await?;
        let identifiers: Vec<(String, String, Uuid, String, OffsetDateTime)> = sqlx::query_as(
            "SELECT type, value, profile_id, event_id, linked_at FROM identifiers \
             WHERE profile_id = ANY($1) ORDER BY linked_at, type, value",
        )
        .bind(&tree)
        .fetch_all(&mut *conn)
        .await?;
        let mut rows: Vec<DecisionRow> = sqlx::query_as(decision_sql!(
            "WHERE profile_id = ANY($1) OR other_profile_id = ANY($1) \
             ORDER BY seq DESC LIMIT $2"
        ))
        .bind(&tree)
        .bind(max_decisions.saturating_add(1))
        .fetch_all(&mut *conn)
        .await?;
        let truncated = rows.len() > usize::try_from(max_decisions).unwrap_or(usize::MAX);
        rows.truncate(usize::try_from(max_decisions).unwrap_or(usize::MAX));
        rows.reverse();
        Ok(Some(ProfileGraph {
            profile_id: root,
            merged_profile_ids: tree.into_iter().filter(|p| *p != root).collect(),
            identifiers: identifiers
                .into_iter()
                .map(
                    |(kind, value, linked_to, event_id, linked_at)| GraphIdentifier {
                        identifier: Identifier { kind, value },
                        linked_to,
                        event_id,
                        linked_at,
                    },
                )
                .collect(),
            decisions: rows.into_iter().map(decision).collect(),
            truncated,
        }))
    }
}

type DecisionRow = (
    i64,
    String,
    String,
    Uuid,
    Option<Uuid>,
    Option<String>,
    Option<String>,
    String,
    i64,
    OffsetDateTime,
    OffsetDateTime,
);

async fn lock_rules(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key(&[b"rules_versions"]))
        .execute(conn)
        .await?;
    Ok(())
}

async fn latest_rules(conn: &mut PgConnection) -> Result<Option<StoredRules>, IdentityError> {
    let latest: Option<(i64, serde_json::Value)> =
        sqlx::query_as("SELECT version, rules FROM rules_versions ORDER BY version DESC LIMIT 1")
            .fetch_optional(conn)
            .await?;
    Ok(latest.map(|(version, rules)| StoredRules { version, rules }))
}

async fn insert_rules(
    conn: &mut PgConnection,
    version: i64,
    rules: &serde_json::Value,
    source: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO rules_versions (version, rules, created_at, source) \
         VALUES ($1, $2, now(), $3)",
    )
    .bind(version)
    .bind(rules)
    .bind(source)
    .execute(conn)
    .await?;
    Ok(())
}

/// Reads the rows of the component rooted at `root` (canonical) within the caller's
/// transaction.
/// Which identifiers of `records` were split off their profile and which were erased: rows
/// (type, value, erased, suppresses whole events).
async fn suppressed(
    conn: &mut PgConnection,
    records: &[&Record],
) -> Result<Vec<(String, String, bool, bool)>, sqlx::Error> {
    let keys = suppression_keys(records);
    let (mut types, mut values, mut digests) = (
        Vec::with_capacity(keys.len()),
        Vec::with_capacity(keys.len()),
        Vec::with_capacity(keys.len()),
    );
    for (identifier, digest) in &keys {
        types.push(identifier.kind.as_str());
        values.push(identifier.value.as_str());
        digests.push(digest.as_str());
    }
    sqlx::query_as(
        "SELECT d.type, d.value, false, false FROM detached_identifiers d \
         JOIN unnest($1::text[], $2::text[]) AS k (type, value) \
         ON d.type = k.type AND d.value = k.value \
         UNION ALL \
         SELECT k.type, k.value, true, e.suppresses FROM erased_identifiers e \
         JOIN unnest($1::text[], $2::text[], $3::text[]) AS k (type, value, digest) \
         ON e.type = k.type AND e.digest = k.digest",
    )
    .bind(&types)
    .bind(&values)
    .bind(&digests)
    .fetch_all(&mut *conn)
    .await
}

/// The profile `merged` was merged into: `FailedPrecondition` when it was not merged,
/// `UnknownProfile` when no profile has the id.
async fn survivor_of(conn: &mut PgConnection, merged: Uuid) -> Result<Uuid, IdentityError> {
    let survivor: Option<Uuid> =
        sqlx::query_scalar("SELECT surviving_profile_id FROM merges WHERE merged_profile_id = $1")
            .bind(merged)
            .fetch_optional(&mut *conn)
            .await?;
    if let Some(survivor) = survivor {
        return Ok(survivor);
    }
    let known: Option<i32> = sqlx::query_scalar("SELECT 1 FROM profiles WHERE profile_id = $1")
        .bind(merged)
        .fetch_optional(&mut *conn)
        .await?;
    Err(match known {
        Some(_) => IdentityError::FailedPrecondition(format!(
            "profile {merged} is not merged into another"
        )),
        None => IdentityError::UnknownProfile,
    })
}

/// Those of the identifiers `(types[i], values[i])` that were split off their profile.
async fn detached(
    conn: &mut PgConnection,
    types: &[&str],
    values: &[&str],
) -> Result<HashSet<Identifier>, sqlx::Error> {
    if types.is_empty() {
        return Ok(HashSet::new());
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT d.type, d.value FROM detached_identifiers d \
         JOIN unnest($1::text[], $2::text[]) AS k (type, value) \
         ON d.type = k.type AND d.value = k.value",
    )
    .bind(types)
    .bind(values)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(kind, value)| Identifier { kind, value })
        .collect())
}

/// Those of `identifiers` that were erased (by digest: the values themselves are not kept).
async fn erased_among(
    conn: &mut PgConnection,
    identifiers: &[&Identifier],
) -> Result<HashSet<Identifier>, sqlx::Error> {
    if identifiers.is_empty() {
        return Ok(HashSet::new());
    }
    let types: Vec<&str> = identifiers.iter().map(|i| i.kind.as_str()).collect();
    let digests: Vec<String> = identifiers.iter().map(|i| erased_digest(i)).collect();
    let found: Vec<i64> = sqlx::query_scalar(
        "SELECT k.n FROM erased_identifiers e \
         JOIN unnest($1::text[], $2::text[]) WITH ORDINALITY AS k (type, digest, n) \
         ON e.type = k.type AND e.digest = k.digest",
    )
    .bind(&types)
    .bind(&digests)
    .fetch_all(&mut *conn)
    .await?;
    Ok(found
        .into_iter()
        .filter_map(|n| usize::try_from(n - 1).ok())
        .filter_map(|i| identifiers.get(i).map(|id| (*id).clone()))
        .collect())
}

/// The answer of the forgotten component `profile` belonged to, if it was forgotten.
async fn forgotten_answer(
    conn: &mut PgConnection,
    profile: Uuid,
) -> Result<Option<Forgotten>, IdentityError> {
    let answer: Option<Option<String>> = sqlx::query_scalar(
        "SELECT r.answer::text FROM forgotten_profiles f \
         JOIN forgotten_profiles r ON r.profile_id = f.root WHERE f.profile_id = $1",
    )
    .bind(profile)
    .fetch_optional(conn)
    .await?;
    answer
        .map(|a| Forgotten::decode(a.as_deref().unwrap_or("null")))
        .transpose()
}

/// The component's own decisions, deleted by ForgetProfile (`$1`: its profiles).
const FORGET_DECISIONS_SQL: &str =
    "DELETE FROM graph_log WHERE profile_id = ANY($1) OR other_profile_id = ANY($1)";

/// Other profiles' decisions naming a forgotten identifier keep them under pseudonyms
/// (`$1`/`$2`/`$3`: parallel types, values and pseudonyms).
const PSEUDONYMIZE_SQL: &str = "UPDATE graph_log AS g SET id_value = u.p \
     FROM unnest($1::text[], $2::text[], $3::text[]) AS u (t, v, p) \
     WHERE g.id_type = u.t AND g.id_value = u.v AND g.id_value IS NOT NULL";

/// Rows of the forgotten identifiers (`$1`/`$2`: parallel types and values).
const FORGET_BY_IDENTIFIER_SQL: [&str; 2] = [
    "DELETE FROM sightings AS s USING unnest($1::text[], $2::text[]) AS u (t, v) \
     WHERE s.type = u.t AND s.value = u.v",
    "DELETE FROM detached_identifiers AS d USING unnest($1::text[], $2::text[]) AS u (t, v) \
     WHERE d.type = u.t AND d.value = u.v",
];

/// Rows of the forgotten profiles (`$1`: the component's profiles).
const FORGET_BY_PROFILE_SQL: [&str; 11] = [
    "DELETE FROM sightings WHERE profile_id = ANY($1)",
    "DELETE FROM identifiers WHERE profile_id = ANY($1)",
    "DELETE FROM merges WHERE merged_profile_id = ANY($1) OR surviving_profile_id = ANY($1)",
    "DELETE FROM resolutions WHERE profile_id = ANY($1)",
    "DELETE FROM match_attributes WHERE profile_id = ANY($1)",
    "DELETE FROM match_keys WHERE profile_id = ANY($1)",
    "DELETE FROM match_suggestions WHERE profile_a = ANY($1) OR profile_b = ANY($1)",
    "DELETE FROM splits WHERE profile_a = ANY($1) OR profile_b = ANY($1)",
    // Merges, delivered or not (the profile service forgets every profile of the component);
    // splits delivered (pending ones make the forget wait, see PENDING_REWRITE_SQL).
    "DELETE FROM merge_outbox WHERE surviving_profile_id = ANY($1) OR merged_profile_id = ANY($1)",
    "UPDATE profiles SET merged_into = NULL, merged_at = NULL WHERE profile_id = ANY($1)",
    "DELETE FROM profiles WHERE profile_id = ANY($1)",
];

/// Other people's events that dropped one of the forgotten identifiers (`$1`: one
/// `[{"type", "value"}]` probe per identifier), through the partial GIN index
/// `resolutions_by_dropped`.
const NAMING_DROPPED_SQL: &str = "SELECT r.event_id, r.detail::text FROM resolutions r \
     WHERE (r.detail -> 'dropped') <> '[]'::jsonb \
       AND (r.detail -> 'dropped') @> ANY($1::jsonb[])";

/// Whether a split of the component (`$1`: its profiles) has not reached the
/// profile service yet: forgetting now would delete the wrong profile there (a split not yet
/// applied still shows the two people as one), so the forget waits for the outbox.
const PENDING_REWRITE_SQL: &str = "SELECT EXISTS (SELECT 1 FROM merge_outbox o \
     WHERE o.delivered_at IS NULL AND o.rule = 'split' \
       AND (o.surviving_profile_id = ANY($1) OR o.merged_profile_id = ANY($1) \
            OR EXISTS (SELECT 1 FROM jsonb_array_elements(o.payload -> 'profiles') AS p \
                       WHERE (p ->> 0)::uuid = ANY($1) OR (p ->> 1)::uuid = ANY($1))))";

/// What one attempt at a forget came to.
enum Forgetting {
    /// The answer, and whether this call forgot the profile (not an earlier one).
    Done((Forgotten, bool)),
    /// A split of the component is still in the outbox: wait for its delivery, then retry.
    SplitPending,
}

/// One attempt at forgetting the component of `profile` within the caller's transaction (see
/// [`IdentityStore::forget`]), with the locks a rewrite takes; `Retry` when the component's
/// root was merged, or forgotten by another call that has not committed, before it was locked.
async fn forget_component(
    tx: &mut PgConnection,
    profile: Uuid,
    reason: &str,
) -> Result<Forgetting, Failure> {
    let root: Option<Uuid> = sqlx::query_scalar(CANONICAL_ONE_SQL)
        .bind(profile)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(root) = root else {
        // Forgotten (the profile row goes in the transaction that records it, so this
        // statement sees both), or never known.
        return match forgotten_answer(&mut *tx, profile).await? {
            Some(done) => Ok(Forgetting::Done((done, false))),
            None => Err(Failure::Fatal(IdentityError::UnknownProfile)),
        };
    };
    // As a rewrite: the component's identifiers (advisory, sorted), then its root row, so a
    // resolution carrying any of them waits and then finds them erased.
    let live = lock_component(&mut *tx, root).await?;
    match live {
        Some(true) => {}
        Some(false) => return Err(Failure::Retry("profile merged meanwhile")),
        // Deleted while this call waited: another call forgot it (and committed, or this
        // statement would still wait).
        None => {
            return match forgotten_answer(&mut *tx, profile).await? {
                Some(done) => Ok(Forgetting::Done((done, false))),
                None => Err(Failure::Retry("profile forgotten meanwhile")),
            };
        }
    }
    let now = now();
    let members = component_members(&mut *tx, root).await?;
    let pending: bool = sqlx::query_scalar(PENDING_REWRITE_SQL)
        .bind(&members)
        .fetch_one(&mut *tx)
        .await?;
    if pending {
        return Ok(Forgetting::SplitPending);
    }
    // Read again under the root's lock: nothing joins the component until the commit.
    let held = component_identifiers(&mut *tx, root).await?;
    let events: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM resolutions WHERE profile_id = ANY($1)")
            .bind(&members)
            .fetch_all(&mut *tx)
            .await?;

    let n = held.len();
    let (mut types, mut values, mut digests, mut pseudonyms, mut suppress) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut erased = HashSet::with_capacity(n);
    for (kind, value) in held {
        let identifier = Identifier { kind, value };
        digests.push(erased_digest(&identifier));
        pseudonyms.push(erased_pseudonym(&identifier));
        suppress.push(suppresses_events(&identifier.kind));
        types.push(identifier.kind.clone());
        values.push(identifier.value.clone());
        erased.insert(identifier);
    }
    sqlx::query(
        "INSERT INTO erased_identifiers AS e \
             (type, digest, reason, created_at, with_person, suppresses) \
         SELECT t, d, $3, $4, true, s FROM unnest($1::text[], $2::text[], $5::bool[]) AS u (t, d, s) \
         ON CONFLICT (type, digest) DO UPDATE \
         SET with_person = true, suppresses = e.suppresses OR EXCLUDED.suppresses",
    )
    .bind(&types)
    .bind(&digests)
    .bind(reason)
    .bind(now)
    .bind(&suppress)
    .execute(&mut *tx)
    .await?;
    // The component's decisions go; the others keep their entries, under pseudonyms.
    sqlx::query(FORGET_DECISIONS_SQL)
        .bind(&members)
        .execute(&mut *tx)
        .await?;
    sqlx::query(PSEUDONYMIZE_SQL)
        .bind(&types)
        .bind(&values)
        .bind(&pseudonyms)
        .execute(&mut *tx)
        .await?;
    for statement in FORGET_BY_IDENTIFIER_SQL {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(&types)
            .bind(&values)
            .execute(&mut *tx)
            .await?;
    }
    for statement in FORGET_BY_PROFILE_SQL {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(&members)
            .execute(&mut *tx)
            .await?;
    }
    // The component's identifiers are gone: every cached owner is retired.
    owners::advance(&mut *tx).await?;
    // Other people's events that carried one of the identifiers without linking it stop
    // naming it, so no replay of their components links it again.
    scrub_dropped(&mut *tx, &erased).await?;
    let done = Forgotten::new(root, members, events, n);
    sqlx::query(
        "INSERT INTO forgotten_profiles (profile_id, root, reason, forgotten_at, answer) \
         SELECT p, $2, $3, $4, CASE WHEN p = $2 THEN $5::jsonb END FROM unnest($1::uuid[]) AS p",
    )
    .bind(&done.profiles)
    .bind(root)
    .bind(reason)
    .bind(now)
    .bind(done.encode())
    .execute(&mut *tx)
    .await?;
    Ok(Forgetting::Done((done, true)))
}

/// Locks the component rooted at `root` the way resolutions meet it: its identifiers'
/// transaction-scoped advisory locks, sorted (a resolution takes them before reading which
/// profile holds its identifiers, so it waits for the caller without a lock-order inversion),
/// then the root's row, which every resolution and merge touching the component locks too.
/// Returns whether the root is still live (`None`: it no longer exists).
async fn lock_component(conn: &mut PgConnection, root: Uuid) -> Result<Option<bool>, sqlx::Error> {
    let held = component_identifiers(&mut *conn, root).await?;
    let mut keys: Vec<i64> = held
        .iter()
        .map(|(kind, value)| lock_key(&[b"identifier", kind.as_bytes(), value.as_bytes()]))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    sqlx::query("SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) AS k")
        .bind(keys)
        .execute(&mut *conn)
        .await?;
    sqlx::query_scalar("SELECT merged_into IS NULL FROM profiles WHERE profile_id = $1 FOR UPDATE")
        .bind(root)
        .fetch_optional(conn)
        .await
}

/// The profiles of the component rooted at `root`: it and every profile merged into it.
async fn component_members(conn: &mut PgConnection, root: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH RECURSIVE tree (profile_id) AS ( \
             SELECT $1::uuid \
           UNION \
             SELECT p.profile_id FROM tree t CROSS JOIN LATERAL ( \
                 SELECT q.profile_id FROM profiles q \
                 WHERE q.merged_into = t.profile_id OFFSET 0) p) \
         SELECT profile_id FROM tree",
    )
    .bind(root)
    .fetch_all(conn)
    .await
}

/// The identifiers (type, value) of the component rooted at `root`.
async fn component_identifiers(
    conn: &mut PgConnection,
    root: Uuid,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "WITH RECURSIVE tree (profile_id) AS ( \
             SELECT $1::uuid \
           UNION \
             SELECT p.profile_id FROM tree t CROSS JOIN LATERAL ( \
                 SELECT q.profile_id FROM profiles q \
                 WHERE q.merged_into = t.profile_id OFFSET 0) p) \
         SELECT i.type, i.value FROM tree t CROSS JOIN LATERAL ( \
             SELECT j.type, j.value FROM identifiers j \
             WHERE j.profile_id = t.profile_id OFFSET 0) i",
    )
    .bind(root)
    .fetch_all(conn)
    .await
}

/// Erases `identifier` outside its component: remembers its digest so it never links again,
/// replaces its value in the graph log with a pseudonym, and forgets where it was seen.
async fn erase_everywhere(
    conn: &mut PgConnection,
    identifier: &Identifier,
    reason: &str,
    now: OffsetDateTime,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO erased_identifiers (type, digest, reason, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(&identifier.kind)
    .bind(erased_digest(identifier))
    .bind(reason)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE graph_log SET id_value = $3 WHERE id_type = $1 AND id_value = $2")
        .bind(&identifier.kind)
        .bind(&identifier.value)
        .bind(erased_pseudonym(identifier))
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM sightings WHERE type = $1 AND value = $2")
        .bind(&identifier.kind)
        .bind(&identifier.value)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM detached_identifiers WHERE type = $1 AND value = $2")
        .bind(&identifier.kind)
        .bind(&identifier.value)
        .execute(&mut *conn)
        .await?;
    scrub_dropped(&mut *conn, &HashSet::from([identifier.clone()])).await?;
    Ok(())
}

/// Takes `erased` out of the dropped identifiers of every event that names them (other
/// people's events that carried one without linking it), so neither their details nor a later
/// replay of their components holds the erased value.
async fn scrub_dropped(
    conn: &mut PgConnection,
    erased: &HashSet<Identifier>,
) -> Result<(), sqlx::Error> {
    let probes: Vec<String> = erased
        .iter()
        .map(|i| serde_json::json!([{ "type": i.kind, "value": i.value }]).to_string())
        .collect();
    let named: Vec<(String, String)> = sqlx::query_as(NAMING_DROPPED_SQL)
        .bind(&probes)
        .fetch_all(&mut *conn)
        .await?;
    let (scrubbed_events, scrubbed): (Vec<String>, Vec<String>) = named
        .into_iter()
        .filter_map(|(event, detail)| scrub_detail(&detail, erased).map(|d| (event, d)))
        .unzip();
    if !scrubbed_events.is_empty() {
        sqlx::query(
            "UPDATE resolutions AS r SET detail = u.d::jsonb \
             FROM unnest($1::text[], $2::text[]) AS u (e, d) WHERE r.event_id = u.e",
        )
        .bind(&scrubbed_events)
        .bind(&scrubbed)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The history rows of the components rooted at `roots` (the first is named the root), read
/// as one: identifiers held by any of them are not foreign.
async fn history_rows(
    conn: &mut PgConnection,
    roots: &[Uuid],
) -> Result<HistoryRows, IdentityError> {
    let root = roots
        .first()
        .copied()
        .ok_or(IdentityError::UnknownProfile)?;
    let members: Vec<(Uuid, OffsetDateTime)> = sqlx::query_as(
        "WITH RECURSIVE tree (profile_id) AS ( \
             SELECT unnest($1::uuid[]) \
           UNION \
             SELECT p.profile_id FROM tree t CROSS JOIN LATERAL ( \
                 SELECT q.profile_id FROM profiles q \
                 WHERE q.merged_into = t.profile_id OFFSET 0) p) \
         SELECT p.profile_id, p.created_at FROM tree t CROSS JOIN LATERAL ( \
             SELECT q.profile_id, q.created_at FROM profiles q \
             WHERE q.profile_id = t.profile_id OFFSET 0) p",
    )
    .bind(roots)
    .fetch_all(&mut *conn)
    .await?;
    let ids: Vec<Uuid> = members.iter().map(|m| m.0).collect();
    let creates: Vec<(String, Uuid)> = sqlx::query_as(
        "SELECT event_id, profile_id FROM graph_log \
         WHERE kind = 'create' AND profile_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let resolutions: Vec<(String, Option<String>, OffsetDateTime, i64)> = sqlx::query_as(
        "SELECT event_id, detail::text, resolved_at, seq FROM resolutions \
         WHERE profile_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let resolutions = decode_resolutions(resolutions)?;
    let merges: Vec<(Uuid, Uuid, String, String, OffsetDateTime, i64)> = sqlx::query_as(
        "SELECT profile_id, other_profile_id, event_id, rule, decided_at, seq FROM graph_log \
         WHERE kind = 'merge' AND rule <> 'seen_together' AND profile_id = ANY($1) \
           AND other_profile_id IS NOT NULL",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let (types, values): (Vec<String>, Vec<String>) = dropped_identifiers(&resolutions)
        .into_iter()
        .map(|i| (i.kind, i.value))
        .unzip();
    let owners: Vec<(String, String, Uuid)> = sqlx::query_as(
        "SELECT i.type, i.value, i.profile_id FROM identifiers i \
         JOIN unnest($1::text[], $2::text[]) AS k (type, value) \
           ON i.type = k.type AND i.value = k.value",
    )
    .bind(&types)
    .bind(&values)
    .fetch_all(&mut *conn)
    .await?;
    let foreign = owners
        .into_iter()
        .filter(|(_, _, owner)| !ids.contains(owner))
        .map(|(kind, value, _)| Identifier { kind, value })
        .collect();
    Ok(HistoryRows {
        root,
        members,
        creates,
        resolutions,
        merges,
        foreign,
    })
}

fn decision(row: DecisionRow) -> LoggedDecision {
    let (
        seq,
        kind,
        event_id,
        profile_id,
        other_profile_id,
        id_type,
        id_value,
        rule,
        rules_version,
        event_time,
        decided_at,
    ) = row;
    LoggedDecision {
        seq,
        kind,
        event_id,
        profile_id,
        other_profile_id,
        identifier: id_type
            .zip(id_value)
            .map(|(kind, value)| Identifier { kind, value }),
        rule,
        rules_version,
        event_time,
        decided_at,
    }
}

/// The positions below `len` that are not in `deferred` (sorted), in order.
fn taken_positions(len: usize, deferred: &[usize]) -> impl Iterator<Item = usize> + '_ {
    let mut left = deferred.iter().copied().peekable();
    (0..len).filter(move |&n| {
        if left.peek() == Some(&n) {
            left.next();
            false
        } else {
            true
        }
    })
}

/// The advisory lock keys of a record: its identifiers'. Its event id takes none: two runs
/// given one event (a redelivery) carry the same identifiers, so their locks already queue
/// them and the second reads the first's resolution; should they carry none (every value
/// blocked), or different ones (rules changed between the two), the second's insert of the
/// event's resolution violates its primary key, and the run is retried (`Failure::Retry`) and
/// reads it then. An event lock per record was more than half of a run's locks.
fn record_keys(record: &Record) -> impl Iterator<Item = i64> + '_ {
    record.identifiers().iter().map(identifier_key)
}

/// Takes the advisory locks of `records` that no other transaction holds, in key order,
/// without waiting, and returns the positions of the records it could not take whole: every
/// record tied to one whose key was held (sharing a key with it, directly or through others),
/// so the records left out share no key with those taken and a later run resolves them in
/// their order. The keys taken for records left out stay held until the commit, which only
/// delays others.
async fn try_lock_keys(
    conn: &mut PgConnection,
    records: &[&Record],
) -> Result<Vec<usize>, sqlx::Error> {
    let mut keys: Vec<i64> = records.iter().flat_map(|r| record_keys(r)).collect();
    keys.sort_unstable();
    keys.dedup();
    // unnest yields the sorted array in order, and the filter runs once per key.
    let held: Vec<i64> = sqlx::query_scalar(
        "SELECT k FROM unnest($1::int8[]) AS k WHERE NOT pg_try_advisory_xact_lock(k)",
    )
    .bind(keys)
    .fetch_all(conn)
    .await?;
    if held.is_empty() {
        return Ok(Vec::new());
    }
    Ok(tied_to(records, &held))
}

/// The positions of the records tied to a key of `held`: carrying one, or sharing a key with
/// a record that is tied. A record without keys is tied to nothing.
fn tied_to(records: &[&Record], held: &[i64]) -> Vec<usize> {
    let mut sets = UnionFind::new();
    for record in records {
        sets.union_all(record_keys(record));
    }
    // The sets of the held keys, once, rather than a comparison with each held key per record.
    let held: HashSet<usize> = held.iter().filter_map(|h| sets.root_of(h)).collect();
    records
        .iter()
        .enumerate()
        .filter(|(_, record)| {
            record_keys(record)
                .next()
                .and_then(|key| sets.root_of(&key))
                .is_some_and(|root| held.contains(&root))
        })
        .map(|(n, _)| n)
        .collect()
}

/// Takes the transaction's advisory locks on every identifier of `records`, in sorted order,
/// waiting for those another transaction holds.
async fn lock_keys(conn: &mut PgConnection, records: &[&Record]) -> Result<(), sqlx::Error> {
    let mut keys: Vec<i64> = records.iter().flat_map(|r| record_keys(r)).collect();
    keys.sort_unstable();
    keys.dedup();
    // unnest yields the sorted array in order, so the locks are taken in that order.
    sqlx::query("SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) AS k")
        .bind(keys)
        .execute(conn)
        .await?;
    Ok(())
}

/// A stable 64-bit key for an advisory lock: FNV-1a over the parts, each followed by a NUL
/// (which no part contains). Stable across builds and replicas, unlike `std`'s hasher; two
/// keys colliding only makes two writers wait for each other.
fn lock_key(parts: &[&[u8]]) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain([&0u8]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

async fn stored(
    conn: &mut PgConnection,
    event_ids: &[&str],
) -> Result<HashMap<String, Stored>, IdentityError> {
    let rows: Vec<(String, Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT event_id, profile_id, merges::text, detail::text FROM resolutions \
         WHERE event_id = ANY($1)",
    )
    .bind(event_ids)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(event_id, profile_id, merges, detail)| {
            let merges = decode_merges(&event_id, &merges)?;
            let detail = decode_detail(&event_id, detail.as_deref())?;
            Ok((
                event_id,
                Stored {
                    profile_id,
                    merges,
                    detail,
                },
            ))
        })
        .collect()
}

/// Writes `plan` with one statement per table, and its decisions to the graph log under
/// `rules_version`.
async fn write(
    conn: &mut PgConnection,
    plan: &Plan,
    rules_version: i64,
    now: OffsetDateTime,
) -> Result<(), sqlx::Error> {
    if !plan.new_profiles.is_empty() {
        let ids: Vec<Uuid> = plan.new_profiles.iter().map(|p| p.id).collect();
        let created: Vec<OffsetDateTime> = plan.new_profiles.iter().map(|p| p.created_at).collect();
        sqlx::query(
            "INSERT INTO profiles (profile_id, created_at) \
             SELECT * FROM unnest($1::uuid[], $2::timestamptz[])",
        )
        .bind(ids)
        .bind(created)
        .execute(&mut *conn)
        .await?;
    }
    if !plan.new_identifiers.is_empty() {
        let n = plan.new_identifiers.len();
        let (mut types, mut values, mut profiles, mut events, mut linked) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for n in &plan.new_identifiers {
            types.push(n.identifier.kind.as_str());
            values.push(n.identifier.value.as_str());
            profiles.push(n.profile_id);
            events.push(n.event_id.as_str());
            linked.push(n.linked_at);
        }
        sqlx::query(
            "INSERT INTO identifiers (type, value, profile_id, event_id, created_at, linked_at) \
             SELECT t, v, p, e, $5, l \
             FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $6::timestamptz[]) \
             AS u (t, v, p, e, l)",
        )
        .bind(types)
        .bind(values)
        .bind(profiles)
        .bind(events)
        .bind(now)
        .bind(linked)
        .execute(&mut *conn)
        .await?;
    }
    if !plan.merges.is_empty() {
        let n = plan.merges.len();
        let (mut surviving, mut merged, mut causes, mut rules) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for m in &plan.merges {
            surviving.push(m.surviving_profile_id);
            merged.push(m.merged_profile_id);
            causes.push(m.cause_event_id.as_str());
            rules.push(m.rule.as_str());
        }
        sqlx::query(
            "UPDATE profiles AS p SET merged_into = u.s, merged_at = $3 \
             FROM unnest($1::uuid[], $2::uuid[]) AS u (s, m) WHERE p.profile_id = u.m",
        )
        .bind(&surviving)
        .bind(&merged)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO merges (surviving_profile_id, merged_profile_id, cause_event_id, merged_at, rule) \
             SELECT s, m, e, $4, r FROM unnest($1::uuid[], $2::uuid[], $3::text[], $5::text[]) \
             WITH ORDINALITY AS u (s, m, e, r, n) ORDER BY n",
        )
        .bind(surviving)
        .bind(&merged)
        .bind(causes)
        .bind(now)
        .bind(rules)
        .execute(&mut *conn)
        .await?;
        // A merged profile is matched as its survivor from now on.
        sqlx::query("DELETE FROM match_keys WHERE profile_id = ANY($1)")
            .bind(&merged)
            .execute(&mut *conn)
            .await?;
        sqlx::query("DELETE FROM match_attributes WHERE profile_id = ANY($1)")
            .bind(&merged)
            .execute(&mut *conn)
            .await?;
    }
    if !plan.sightings.is_empty() {
        let n = plan.sightings.len();
        let (mut types, mut values, mut profiles, mut events) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for s in &plan.sightings {
            types.push(s.identifier.kind.as_str());
            values.push(s.identifier.value.as_str());
            profiles.push(s.profile_id);
            events.push(s.event_id.as_str());
        }
        sqlx::query(
            "INSERT INTO sightings (type, value, profile_id, event_id, seen_at) \
             SELECT t, v, p, e, $5 FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[]) \
             AS u (t, v, p, e) ON CONFLICT DO NOTHING",
        )
        .bind(types)
        .bind(values)
        .bind(profiles)
        .bind(events)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    if !plan.decisions.is_empty() {
        let n = plan.decisions.len();
        let mut kinds = Vec::with_capacity(n);
        let mut events = Vec::with_capacity(n);
        let mut profiles = Vec::with_capacity(n);
        let mut others = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut values = Vec::with_capacity(n);
        let mut rules = Vec::with_capacity(n);
        let mut times = Vec::with_capacity(n);
        let mut details = Vec::with_capacity(n);
        for d in &plan.decisions {
            kinds.push(d.kind.as_str());
            events.push(d.event_id.as_str());
            profiles.push(d.profile_id);
            others.push(d.other_profile_id);
            types.push(d.identifier.as_ref().map(|i| i.kind.as_str()));
            values.push(d.identifier.as_ref().map(|i| i.value.as_str()));
            rules.push(d.rule.as_str());
            times.push(d.event_time);
            details.push(d.detail.as_deref());
        }
        sqlx::query(
            "INSERT INTO graph_log (kind, event_id, profile_id, other_profile_id, id_type, \
             id_value, rule, rules_version, event_time, decided_at, detail) \
             SELECT k, e, p, o, t, v, r, $9, w, $10, d::jsonb \
             FROM unnest($1::text[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], \
                         $7::text[], $8::timestamptz[], $11::text[]) \
             WITH ORDINALITY AS u (k, e, p, o, t, v, r, w, d, n) ORDER BY n",
        )
        .bind(kinds)
        .bind(events)
        .bind(profiles)
        .bind(others)
        .bind(types)
        .bind(values)
        .bind(rules)
        .bind(times)
        .bind(rules_version)
        .bind(now)
        .bind(details)
        .execute(&mut *conn)
        .await?;
    }
    // A suppressed event belongs to no profile: nothing is kept of it.
    let kept: Vec<&Resolution> = plan.resolutions.iter().filter(|r| !r.suppressed).collect();
    if !kept.is_empty() {
        let n = kept.len();
        let mut events = Vec::with_capacity(n);
        let mut profiles = Vec::with_capacity(n);
        let mut merges = Vec::with_capacity(n);
        let mut details = Vec::with_capacity(n);
        for r in kept {
            events.push(r.event_id.as_str());
            profiles.push(r.profile_id);
            merges.push(encode_merges(&r.merges));
            details.push(encode_detail(r));
        }
        sqlx::query(
            "INSERT INTO resolutions (event_id, profile_id, merges, resolved_at, detail) \
             SELECT e, p, m::jsonb, $4, d::jsonb \
             FROM unnest($1::text[], $2::uuid[], $3::text[], $5::text[]) AS u (e, p, m, d)",
        )
        .bind(events)
        .bind(profiles)
        .bind(merges)
        .bind(now)
        .bind(details)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// A jittered, growing pause before retrying, so replicas that collided do not collide again.
fn backoff(attempts: u32) -> Duration {
    let cap_ms = 2u64.saturating_pow(attempts.min(7)) * 5;
    Duration::from_millis(rand::rng().random_range(1..=cap_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_record;

    #[test]
    fn lock_keys_are_pinned_and_separate_parts() {
        // Pinned: replicas running different builds must agree on every key.
        assert_eq!(lock_key(&[b"event", b"e1"]), 0x18f2_d0ed_3a61_b3d1);
        assert_ne!(lock_key(&[b"ab", b"c"]), lock_key(&[b"a", b"bc"]));
    }

    /// A held key holds back its records and every record tied to them by a shared key,
    /// transitively, and nothing else; a record without identifiers is never held back.
    #[test]
    fn held_keys_hold_back_the_records_tied_to_them() {
        let rules = crate::domain::Rules::default();
        let record = |event: &str, ids: &[(&str, &str)]| test_record(&rules, event, ids);
        let records = [
            record("e1", &[("anonymous_id", "a1")]),
            record("e2", &[("anonymous_id", "b1"), ("user_id", "u1")]),
            record("e3", &[("user_id", "u1"), ("email", "x@example.com")]),
            record("e4", &[("email", "x@example.com")]),
            record("e5", &[("anonymous_id", "d1")]),
            record("e6", &[("anonymous_id", "undefined")]),
        ];
        let records: Vec<&Record> = records.iter().collect();
        assert!(
            records[5].identifiers().is_empty(),
            "a blocked value is no identifier"
        );
        let b1 = identifier_key(&Identifier::new("anonymous_id", "b1"));
        assert_eq!(tied_to(&records, &[b1]), [1, 2, 3]);
        assert!(
            tied_to(
                &records,
                &[identifier_key(&Identifier::new("user_id", "u9"))]
            )
            .is_empty()
        );
        let d1 = identifier_key(&Identifier::new("anonymous_id", "d1"));
        assert_eq!(tied_to(&records, &[d1, b1]), [1, 2, 3, 4]);
        // An event id is no key: holding one's hash holds nothing back.
        assert!(tied_to(&records, &[lock_key(&[b"event", b"e5"])]).is_empty());
        let taken: Vec<usize> = taken_positions(records.len(), &[1, 2, 3]).collect();
        assert_eq!(taken, [0, 4, 5]);
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        for attempts in 0..20 {
            let d = backoff(attempts);
            assert!(d >= Duration::from_millis(1) && d <= Duration::from_millis(640));
        }
    }

    /// The identity service on a new test database, with a pool of its own on it.
    async fn identity_on_postgres() -> (tessera_testkit::TestDb, PgPool, crate::Identity) {
        let (test, db, pool) = migrated().await;
        let identity = crate::Identity::new(db, crate::IdentitySettings::default())
            .await
            .expect("identity");
        (test, pool, identity)
    }

    /// A run whose identifier another transaction holds resolves the records not tied to it at
    /// once and commits them, and resolves the tied ones when the lock is released; a record
    /// sharing an identifier with a held record waits with it, in order.
    #[tokio::test]
    async fn a_held_identifier_delays_only_the_records_tied_to_it() {
        let (_test, pool, identity) = identity_on_postgres().await;
        let rules = identity.rules();
        let record = |event: &str, ids: &[(&str, &str)]| test_record(&rules.rules, event, ids);
        let records = vec![
            record("held", &[("anonymous_id", "a1")]),
            record("free", &[("anonymous_id", "b1")]),
            record("tied", &[("user_id", "u1"), ("anonymous_id", "a1")]),
            record("also-free", &[("email", "c@example.com")]),
        ];
        let mut holder = pool.begin().await.expect("begin");
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(identifier_key(&Identifier::new("anonymous_id", "a1")))
            .execute(&mut *holder)
            .await
            .expect("lock");
        let resolving = tokio::spawn({
            let identity = identity.clone();
            async move { identity.resolve(records).await }
        });
        let resolved = || async {
            let mut ids: Vec<String> = sqlx::query_scalar("SELECT event_id FROM resolutions")
                .fetch_all(&pool)
                .await
                .expect("read");
            ids.sort();
            ids
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while resolved().await.len() < 2 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(
            resolved().await,
            ["also-free", "free"],
            "the records not tied to the held identifier are resolved while it is held"
        );
        assert!(!resolving.is_finished());
        holder.rollback().await.expect("release");
        let resolutions = resolving.await.expect("join").expect("resolve");
        assert_eq!(resolved().await, ["also-free", "free", "held", "tied"]);
        let events: Vec<&str> = resolutions.iter().map(|r| r.event_id.as_str()).collect();
        assert_eq!(
            events,
            ["held", "free", "tied", "also-free"],
            "answers in order"
        );
        assert_eq!(
            resolutions[0].profile_id, resolutions[2].profile_id,
            "the tied record joined the held one's profile"
        );
        assert_ne!(resolutions[0].profile_id, resolutions[1].profile_id);
    }

    /// A record whose identifiers one profile already holds does not lock that profile's row:
    /// it resolves while another transaction holds the row, and a record that would link a new
    /// identifier to the profile waits for it.
    #[tokio::test]
    async fn known_records_resolve_without_locking_their_profile() {
        let (_test, pool, identity) = identity_on_postgres().await;
        let rules = identity.rules();
        let record = |event: &str, ids: &[(&str, &str)]| test_record(&rules.rules, event, ids);
        let first = identity
            .resolve(vec![record(
                "e1",
                &[("anonymous_id", "a1"), ("user_id", "u1")],
            )])
            .await
            .expect("resolve");
        let profile = first[0].profile_id;

        let mut holder = pool.begin().await.expect("begin");
        sqlx::query("SELECT 1 FROM profiles WHERE profile_id = $1 FOR UPDATE")
            .bind(profile)
            .execute(&mut *holder)
            .await
            .expect("lock");
        let known = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            identity.resolve(vec![record(
                "e2",
                &[("user_id", "u1"), ("anonymous_id", "a1")],
            )]),
        )
        .await
        .expect("a known record does not wait for its profile's row")
        .expect("resolve");
        assert_eq!(known[0].profile_id, profile);
        let linking = tokio::spawn({
            let identity = identity.clone();
            let new = record("e3", &[("anonymous_id", "a1"), ("email", "p@example.com")]);
            async move { identity.resolve(vec![new]).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!linking.is_finished(), "a linking record waits for the row");
        holder.rollback().await.expect("release");
        let linked = linking.await.expect("join").expect("resolve");
        assert_eq!(linked[0].profile_id, profile);
    }

    /// Every statement a forget runs over other people's rows finds them through an index:
    /// on a large graph a scan inside the forget's transaction would take minutes and hold
    /// back every other writer's snapshot horizon meanwhile.
    #[tokio::test]
    async fn forget_statements_use_indexes() {
        let (_test, _db, pool) = migrated().await;
        let mut conn = pool.acquire().await.expect("connection");
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut *conn)
            .await
            .expect("set");
        let profiles = vec![Uuid::now_v7(), Uuid::now_v7()];
        let texts = ["email".to_owned(), "ann@x.io".to_owned()];
        let probe = vec![r#"[{"type": "email", "value": "ann@x.io"}]"#.to_owned()];
        let mut plans = Vec::new();
        for sql in FORGET_BY_PROFILE_SQL
            .iter()
            .chain([&FORGET_DECISIONS_SQL, &PENDING_REWRITE_SQL])
        {
            let explain = sqlx::AssertSqlSafe(format!("EXPLAIN {sql}"));
            let lines: Vec<String> = sqlx::query_scalar(explain)
                .bind(&profiles)
                .fetch_all(&mut *conn)
                .await
                .expect("explain");
            plans.push((*sql, lines.join("\n")));
        }
        for sql in FORGET_BY_IDENTIFIER_SQL {
            let explain = sqlx::AssertSqlSafe(format!("EXPLAIN {sql}"));
            let lines: Vec<String> = sqlx::query_scalar(explain)
                .bind(&texts[..1])
                .bind(&texts[1..])
                .fetch_all(&mut *conn)
                .await
                .expect("explain");
            plans.push((sql, lines.join("\n")));
        }
        let explain = sqlx::AssertSqlSafe(format!("EXPLAIN {PSEUDONYMIZE_SQL}"));
        let lines: Vec<String> = sqlx::query_scalar(explain)
            .bind(&texts[..1])
            .bind(&texts[1..])
            .bind(&texts[1..])
            .fetch_all(&mut *conn)
            .await
            .expect("explain");
        plans.push((PSEUDONYMIZE_SQL, lines.join("\n")));
        let explain = sqlx::AssertSqlSafe(format!("EXPLAIN {NAMING_DROPPED_SQL}"));
        let lines: Vec<String> = sqlx::query_scalar(explain)
            .bind(&probe)
            .fetch_all(&mut *conn)
            .await
            .expect("explain");
        plans.push((NAMING_DROPPED_SQL, lines.join("\n")));
        for (sql, plan) in &plans {
            assert!(!plan.contains("Seq Scan"), "{sql}\n{plan}");
        }
        assert!(
            plans[plans.len() - 1].1.contains("resolutions_by_dropped"),
            "{:?}",
            plans[plans.len() - 1]
        );
    }

    /// A deadlock is retried wherever the run meets it, also inside a helper that answers
    /// `IdentityError` (the closure and history reads): the caller never sees it unless every
    /// attempt fails.
    #[tokio::test]
    async fn a_deadlock_is_retried_wherever_it_is_met() {
        let test = tessera_testkit::TestDb::new().await;
        let pool = PgPool::connect(test.url()).await.expect("connect");
        async fn take(
            mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
            key: i64,
        ) -> Option<sqlx::Error> {
            let out = sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(key)
                .execute(&mut *tx)
                .await;
            let _ = tx.rollback().await;
            out.err()
        }
        let (mut a, mut b) = (
            pool.begin().await.expect("a"),
            pool.begin().await.expect("b"),
        );
        for (tx, key) in [(&mut a, 1_i64), (&mut b, 2)] {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(key)
                .execute(&mut **tx)
                .await
                .expect("lock");
        }
        let (x, y) = tokio::join!(take(a, 2), take(b, 1));
        let deadlock = x.or(y).expect("one of the two was rolled back");
        assert!(matches!(
            Failure::from(IdentityError::from(deadlock)),
            Failure::Retry("deadlock")
        ));
        assert!(matches!(
            Failure::from(IdentityError::Corrupt("x".to_owned())),
            Failure::Fatal(_)
        ));
    }

    #[test]
    fn connection_errors_are_not_retried_here() {
        assert!(matches!(
            Failure::from(sqlx::Error::PoolTimedOut),
            Failure::Fatal(_)
        ));
    }
}
