//! The identity graph in a SQLite file, for `tessera dev`. The pool has a single connection,
//! so transactions run one after another and need no locks of their own.

use std::collections::{HashMap, HashSet};

use sqlx::sqlite::{Sqlite, SqliteConnection};
use sqlx::{QueryBuilder, SqlitePool};
use tessera_core::Identifier;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Change, Closure, ClosureSize, EVENT_TIME, Forgotten, Outcome, Rewritten, SplitPayload,
    carried_identifiers, decode_resolutions, dropped_identifiers, erased_digest, erased_pseudonym,
    has_later_event, history_identifiers, late_suspects, lookup_identifiers, mark_suppressed,
    reorder, reorder_plan, reorder_skipped, reordered, replay_order, rewrite_plan, rewritten,
    scrub_detail, suppression_keys, with_replayed,
};
use super::{
    ComponentHistory, GraphIdentifier, HistoryRows, IdentityStore, LoggedDecision, ProfileGraph,
    Stored, StoredRules, VersionedRules, decode_detail, decode_merges, encode_detail,
    encode_merges, history, next_api_version, now, outcomes, record_metrics, registration,
    rules_json,
};
use crate::IdentityError;
use crate::domain::{
    Constraints, GraphView, Plan, ProfileAge, Record, ReorderConfig, Replay, RulesConfig, plan,
    replay, suppresses_events,
};

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

mod matching;

/// The canonical profile of the identifier `(?1, ?2)` and its creation time. The walks use
/// `UNION`, not `UNION ALL`, so a cycle (which writers never create) ends a walk.
const LOOKUP_SQL: &str = "
WITH RECURSIVE chain (profile_id, merged_into, created_at) AS (
    SELECT p.profile_id, p.merged_into, p.created_at
    FROM identifiers i
    JOIN profiles p ON p.profile_id = i.profile_id
    WHERE i.type = ?1 AND i.value = ?2
  UNION
    SELECT p.profile_id, p.merged_into, p.created_at
    FROM chain c
    JOIN profiles p ON p.profile_id = c.merged_into
)
SELECT profile_id, created_at FROM chain WHERE merged_into IS NULL";

/// The canonical profile of the profile `?1`.
const CANONICAL_SQL: &str = "
WITH RECURSIVE chain (profile_id, merged_into) AS (
    SELECT profile_id, merged_into FROM profiles WHERE profile_id = ?1
  UNION
    SELECT p.profile_id, p.merged_into
    FROM chain c
    JOIN profiles p ON p.profile_id = c.merged_into
)
SELECT profile_id FROM chain WHERE merged_into IS NULL";

/// The identifiers of the canonical profile `?1`, through every profile merged into it.
const HELD_SQL: &str = "
WITH RECURSIVE tree (profile_id) AS (
    SELECT ?1
  UNION
    SELECT p.profile_id FROM tree t JOIN profiles p ON p.merged_into = t.profile_id
)
SELECT i.type, i.value, i.linked_at FROM tree t JOIN identifiers i ON i.profile_id = t.profile_id";

/// The canonical profile of each profile of `?1` (a JSON array of ids) and its creation time:
/// rows (profile, canonical, created_at); unknown profiles have none.
const CANONICAL_MANY_SQL: &str = "
WITH RECURSIVE chain (start_id, profile_id, merged_into, created_at) AS (
    SELECT p.profile_id, p.profile_id, p.merged_into, p.created_at
    FROM profiles p WHERE p.profile_id IN (SELECT value FROM json_each(?1))
  UNION
    SELECT c.start_id, p.profile_id, p.merged_into, p.created_at
    FROM chain c
    JOIN profiles p ON p.profile_id = c.merged_into
)
SELECT start_id, profile_id, created_at FROM chain WHERE merged_into IS NULL";

/// The identifiers of the canonical profiles of `?1` (a JSON array of ids), through every
/// profile merged into them: rows (canonical profile, type, value, linked_at).
const HELD_MANY_SQL: &str = "
WITH RECURSIVE tree (root, profile_id) AS (
    SELECT value, value FROM json_each(?1)
  UNION
    SELECT t.root, p.profile_id FROM tree t JOIN profiles p ON p.merged_into = t.profile_id
)
SELECT t.root, i.type, i.value, i.linked_at
FROM tree t JOIN identifiers i ON i.profile_id = t.profile_id";

/// The canonical profile of each of `profiles` that exists, with its creation time.
pub(super) async fn canonical_ages(
    conn: &mut SqliteConnection,
    profiles: &[Uuid],
) -> Result<HashMap<Uuid, ProfileAge>, IdentityError> {
    if profiles.is_empty() {
        return Ok(HashMap::new());
    }
    let ids = json_ids(profiles);
    let rows: Vec<(String, String, i64)> = sqlx::query_as(CANONICAL_MANY_SQL)
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for (start, canonical, created_at) in rows {
        out.insert(
            parse_uuid(&start)?,
            ProfileAge {
                created_at: from_micros(created_at)?,
                id: parse_uuid(&canonical)?,
            },
        );
    }
    Ok(out)
}

/// Profile ids as a JSON array, for `json_each`.
fn json_ids(profiles: &[Uuid]) -> String {
    serde_json::to_string(&profiles.iter().map(Uuid::to_string).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".to_owned())
}

/// Forbids in `view` every pair an unmerge split apart that touches the components of the
/// canonical profiles `roots`, as the canonical profiles of its two sides.
pub(super) async fn load_splits(
    conn: &mut SqliteConnection,
    roots: &[Uuid],
    view: &mut GraphView,
) -> Result<(), IdentityError> {
    let any: Option<i64> = sqlx::query_scalar("SELECT 1 FROM splits LIMIT 1")
        .fetch_optional(&mut *conn)
        .await?;
    if any.is_none() || roots.is_empty() {
        return Ok(());
    }
    let pairs: Vec<(String, String)> = sqlx::query_as(
        "WITH RECURSIVE tree (profile_id) AS ( \
             SELECT value FROM json_each(?1) \
           UNION \
             SELECT q.profile_id FROM tree t JOIN profiles q ON q.merged_into = t.profile_id) \
         SELECT profile_a, profile_b FROM splits \
         WHERE profile_a IN (SELECT profile_id FROM tree) \
            OR profile_b IN (SELECT profile_id FROM tree)",
    )
    .bind(json_ids(roots))
    .fetch_all(&mut *conn)
    .await?;
    let pairs = pairs
        .into_iter()
        .map(|(a, b)| Ok((parse_uuid(&a)?, parse_uuid(&b)?)))
        .collect::<Result<Vec<(Uuid, Uuid)>, IdentityError>>()?;
    let ends: Vec<Uuid> = pairs.iter().flat_map(|(a, b)| [*a, *b]).collect();
    let canonical = canonical_ages(&mut *conn, &ends).await?;
    let of = |id: Uuid| canonical.get(&id).map_or(id, |age| age.id);
    for (a, b) in pairs {
        view.forbid(of(a), of(b));
    }
    Ok(())
}

/// The identity graph in a SQLite file.
pub(crate) struct SqliteStore {
    pool: SqlitePool,
}

/// Whether a split of the component (`?1`: its profiles as a JSON array) is still in the
/// outbox (see `PENDING_REWRITE_SQL` of the Postgres store).
const PENDING_SPLIT_SQL: &str = "SELECT EXISTS (SELECT 1 FROM merge_outbox o \
     WHERE o.delivered_at IS NULL AND o.rule = 'split' \
       AND (o.surviving_profile_id IN (SELECT value FROM json_each(?1)) \
            OR o.merged_profile_id IN (SELECT value FROM json_each(?1)) \
            OR EXISTS (SELECT 1 FROM json_each(o.payload, '$.profiles') AS p \
                       WHERE json_extract(p.value, '$[0]') IN (SELECT value FROM json_each(?1)) \
                          OR json_extract(p.value, '$[1]') IN (SELECT value FROM json_each(?1)))))";

impl SqliteStore {
    pub(crate) fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// One attempt at [`IdentityStore::forget`]: `None` while a split of the component is
    /// still in the outbox (nothing was changed).
    async fn forget_once(
        &self,
        profile: Uuid,
        reason: &str,
    ) -> Result<Option<(Forgotten, bool)>, IdentityError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let key = profile.to_string();
        let root: Option<String> = sqlx::query_scalar(CANONICAL_SQL)
            .bind(&key)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(root) = root else {
            // Forgotten, or never known.
            let done = forgotten_answer(&mut tx, &key).await?;
            return done
                .map(|done| Some((done, false)))
                .ok_or(IdentityError::UnknownProfile);
        };
        let now = now();
        let members: Vec<String> = sqlx::query_scalar(
            "WITH RECURSIVE tree (profile_id) AS ( \
                 SELECT ?1 \
               UNION \
                 SELECT p.profile_id FROM tree t JOIN profiles p ON p.merged_into = t.profile_id) \
             SELECT profile_id FROM tree",
        )
        .bind(&root)
        .fetch_all(&mut *tx)
        .await?;
        // The members as a JSON array, for `IN (SELECT value FROM json_each(?1))`.
        let list = serde_json::to_string(&members).unwrap_or_else(|_| "[]".to_owned());
        let pending: bool = sqlx::query_scalar(PENDING_SPLIT_SQL)
            .bind(&list)
            .fetch_one(&mut *tx)
            .await?;
        if pending {
            return Ok(None);
        }
        let held: Vec<(String, String)> = sqlx::query_as(
            "SELECT type, value FROM identifiers \
             WHERE profile_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(&list)
        .fetch_all(&mut *tx)
        .await?;
        let events: Vec<String> = sqlx::query_scalar(
            "SELECT event_id FROM resolutions \
             WHERE profile_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(&list)
        .fetch_all(&mut *tx)
        .await?;
        // The component's decisions go; the others keep their entries, under pseudonyms.
        sqlx::query(
            "DELETE FROM graph_log WHERE profile_id IN (SELECT value FROM json_each(?1)) \
             OR other_profile_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(&list)
        .execute(&mut *tx)
        .await?;
        let n = held.len();
        let mut erased = HashSet::with_capacity(n);
        for (kind, value) in held {
            let identifier = Identifier { kind, value };
            sqlx::query(
                "INSERT INTO erased_identifiers \
                     (type, digest, reason, created_at, with_person, suppresses) \
                 VALUES (?1, ?2, ?3, ?4, 1, ?5) \
                 ON CONFLICT (type, digest) DO UPDATE \
                 SET with_person = 1, suppresses = max(suppresses, excluded.suppresses)",
            )
            .bind(&identifier.kind)
            .bind(erased_digest(&identifier))
            .bind(reason)
            .bind(micros(now))
            .bind(suppresses_events(&identifier.kind))
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE graph_log SET id_value = ?3 WHERE id_type = ?1 AND id_value = ?2")
                .bind(&identifier.kind)
                .bind(&identifier.value)
                .bind(erased_pseudonym(&identifier))
                .execute(&mut *tx)
                .await?;
            for statement in [
                "DELETE FROM sightings WHERE type = ?1 AND value = ?2",
                "DELETE FROM detached_identifiers WHERE type = ?1 AND value = ?2",
            ] {
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .bind(&identifier.kind)
                    .bind(&identifier.value)
                    .execute(&mut *tx)
                    .await?;
            }
            erased.insert(identifier);
        }
        for statement in [
            "DELETE FROM sightings WHERE profile_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM identifiers WHERE profile_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM merges WHERE merged_profile_id IN (SELECT value FROM json_each(?1)) \
             OR surviving_profile_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM resolutions WHERE profile_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM match_attributes WHERE profile_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM match_keys WHERE profile_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM match_suggestions WHERE profile_a IN (SELECT value FROM json_each(?1)) \
             OR profile_b IN (SELECT value FROM json_each(?1))",
            "DELETE FROM splits WHERE profile_a IN (SELECT value FROM json_each(?1)) \
             OR profile_b IN (SELECT value FROM json_each(?1))",
            // Delivered or not: the profile service forgets the person as a whole.
            "DELETE FROM merge_outbox \
             WHERE surviving_profile_id IN (SELECT value FROM json_each(?1)) \
             OR merged_profile_id IN (SELECT value FROM json_each(?1))",
            "UPDATE profiles SET merged_into = NULL, merged_at = NULL \
             WHERE profile_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM profiles WHERE profile_id IN (SELECT value FROM json_each(?1))",
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .bind(&list)
                .execute(&mut *tx)
                .await?;
        }
        // Other people's events that carried one of the identifiers without linking it stop
        // naming it, so no replay of their components links it again.
        scrub_dropped(&mut tx, &erased).await?;
        let members = members
            .iter()
            .map(|m| parse_uuid(m))
            .collect::<Result<Vec<_>, _>>()?;
        let done = Forgotten::new(parse_uuid(&root)?, members, events, n);
        for member in &done.profiles {
            let answer = (*member == done.root).then(|| done.encode());
            sqlx::query(
                "INSERT INTO forgotten_profiles (profile_id, root, reason, forgotten_at, answer) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .bind(member.to_string())
            .bind(&root)
            .bind(reason)
            .bind(micros(now))
            .bind(answer)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Some((done, true)))
    }
}

#[async_trait::async_trait]
impl IdentityStore for SqliteStore {
    async fn resolve(
        &self,
        rules: &VersionedRules,
        records: &[Record],
    ) -> Result<Vec<Outcome>, IdentityError> {
        // IMMEDIATE: take the write lock up front rather than failing to upgrade a read later.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut done = HashMap::new();
        for record in records {
            if let Some(stored) = stored(&mut tx, record.event_id()).await? {
                done.insert(record.event_id().to_owned(), stored);
            }
        }
        let pending: Vec<&Record> = records
            .iter()
            .filter(|r| !done.contains_key(r.event_id()))
            .collect();
        let mut view = GraphView::new();
        mark_suppressed(&mut view, suppressed(&mut tx, &pending).await?);
        // Suppressed records and erased identifiers read nothing.
        let lookups = lookup_identifiers(&view, &pending);
        let mut candidates = HashSet::new();
        for identifier in &lookups {
            if let Some(profile) = canonical_of(&mut tx, identifier).await? {
                view.insert(identifier.clone(), profile);
                candidates.insert(profile.id);
            }
            if rules.rules.may_be_shared(&identifier.kind) {
                let profiles: Vec<String> = sqlx::query_scalar(
                    "SELECT profile_id FROM sightings WHERE type = ?1 AND value = ?2",
                )
                .bind(&identifier.kind)
                .bind(&identifier.value)
                .fetch_all(&mut *tx)
                .await?;
                for profile in profiles {
                    let canonical: Option<String> = sqlx::query_scalar(CANONICAL_SQL)
                        .bind(&profile)
                        .fetch_optional(&mut *tx)
                        .await?;
                    let id = parse_uuid(canonical.as_deref().unwrap_or(&profile))?;
                    view.insert_sighting(identifier.clone(), id);
                }
            }
        }
        let roots: Vec<Uuid> = candidates.iter().copied().collect();
        load_splits(&mut tx, &roots, &mut view).await?;
        for profile in candidates {
            let held: Vec<(String, String, i64)> = sqlx::query_as(HELD_SQL)
                .bind(profile.to_string())
                .fetch_all(&mut *tx)
                .await?;
            for (kind, value, linked_at) in held {
                if rules.rules.limit(&kind).is_some() {
                    view.insert_limited(
                        profile,
                        Identifier { kind, value },
                        from_micros(linked_at)?,
                    );
                }
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
        write(&mut tx, &plan, rules.version, now).await?;
        let mut plan = plan;
        reorder_late(&mut tx, rules, &mut plan, now).await?;
        tx.commit().await?;
        record_metrics(&plan);

        let records: Vec<&Record> = records.iter().collect();
        Ok(outcomes(&records, done, plan.resolutions))
    }

    async fn canonical(&self, profiles: &[Uuid]) -> Result<HashMap<Uuid, Uuid>, IdentityError> {
        let mut conn = self.pool.acquire().await?;
        let mut out = HashMap::with_capacity(profiles.len());
        for profile in profiles {
            let canonical: Option<String> = sqlx::query_scalar(CANONICAL_SQL)
                .bind(profile.to_string())
                .fetch_optional(&mut *conn)
                .await?;
            if let Some(canonical) = canonical {
                out.insert(*profile, parse_uuid(&canonical)?);
            }
        }
        Ok(out)
    }

    async fn lookup(&self, identifier: &Identifier) -> Result<Option<Uuid>, IdentityError> {
        let mut conn = self.pool.acquire().await?;
        Ok(canonical_of(&mut conn, identifier).await?.map(|p| p.id))
    }

    async fn register_rules(&self, config: &RulesConfig) -> Result<StoredRules, IdentityError> {
        let json = rules_json(config);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let latest = latest_rules(&mut tx).await?;
        let last_from_config: Option<String> = sqlx::query_scalar(
            "SELECT rules FROM rules_versions WHERE source = 'config' \
             ORDER BY version DESC LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let last_from_config = last_from_config
            .map(|rules| decode_rules(&rules))
            .transpose()?;
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
        // One transaction: the single connection sees one state throughout.
        let mut tx = self.pool.begin().await?;
        let root: Option<String> = sqlx::query_scalar(CANONICAL_SQL)
            .bind(profile.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let root = root.ok_or(IdentityError::UnknownProfile)?;
        let rows = history_rows(&mut tx, &[root.as_str()]).await?;
        tx.commit().await?;
        history(rows)
    }

    async fn rewrite(
        &self,
        rules: &VersionedRules,
        change: &Change,
        reason: &str,
    ) -> Result<Rewritten, IdentityError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now();
        // The profile the change starts from and, for an unmerge, the pair kept apart.
        let (start, pair) = match change {
            Change::Unmerge(merged) => {
                let survivor = survivor_of(&mut tx, *merged).await?;
                (Some(*merged), Some((*merged, survivor)))
            }
            Change::Detach(identifier) | Change::Erase(identifier) => {
                let owner: Option<String> = sqlx::query_scalar(
                    "SELECT profile_id FROM identifiers WHERE type = ?1 AND value = ?2",
                )
                .bind(&identifier.kind)
                .bind(&identifier.value)
                .fetch_optional(&mut *tx)
                .await?;
                if owner.is_none() && matches!(change, Change::Detach(_)) {
                    return Err(IdentityError::NotFound);
                }
                (owner.as_deref().map(parse_uuid).transpose()?, None)
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
        let root: String = sqlx::query_scalar(CANONICAL_SQL)
            .bind(start.to_string())
            .fetch_one(&mut *tx)
            .await?;
        let rows = history_rows(&mut tx, &[root.as_str()]).await?;
        let root = parse_uuid(&root)?;
        let members: HashSet<Uuid> = rows.members.iter().map(|m| m.0).collect();
        let list = serde_json::to_string(&members.iter().map(Uuid::to_string).collect::<Vec<_>>())
            .unwrap_or_else(|_| "[]".to_owned());
        let pairs: Vec<(String, String)> = sqlx::query_as(
            "SELECT profile_a, profile_b FROM splits \
             WHERE profile_a IN (SELECT value FROM json_each(?1)) \
                OR profile_b IN (SELECT value FROM json_each(?1))",
        )
        .bind(&list)
        .fetch_all(&mut *tx)
        .await?;
        let mut constraints = Constraints {
            forbidden: pairs
                .iter()
                .map(|(a, b)| Ok((parse_uuid(a)?, parse_uuid(b)?)))
                .collect::<Result<Vec<_>, IdentityError>>()?,
            ..Constraints::default()
        };
        constraints.forbidden.extend(pair);
        let history = history(rows)?;
        // Identifiers erased before (another person's erase or forget) never link again,
        // whatever this replay decides.
        constraints.erased = erased_among(&mut tx, &history_identifiers(&history)).await?;
        for identifier in history_identifiers(&history) {
            let detached: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM detached_identifiers WHERE type = ?1 AND value = ?2",
            )
            .bind(&identifier.kind)
            .bind(&identifier.value)
            .fetch_optional(&mut *tx)
            .await?;
            if detached.is_some() {
                constraints.detached.insert(identifier.clone());
            }
        }
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
        clear_derived(&mut tx, &list).await?;
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
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                )
                .bind(merged.to_string())
                .bind(survivor.to_string())
                .bind(reason)
                .bind(micros(now))
                .execute(&mut *tx)
                .await?;
            }
            (Change::Detach(identifier), _) => {
                sqlx::query(
                    "INSERT INTO detached_identifiers (type, value, reason, created_at) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                )
                .bind(&identifier.kind)
                .bind(&identifier.value)
                .bind(reason)
                .bind(micros(now))
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
        // A split of the component still in the outbox must reach the profile service first
        // (see the Postgres store); the outbox delivers within milliseconds while it is up.
        for _ in 0..40 {
            if let Some(done) = self.forget_once(profile, reason).await? {
                return Ok(done);
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        Err(IdentityError::SplitPending)
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
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
        rows.into_iter().map(decision).collect()
    }

    async fn profile_graph(
        &self,
        profile: Uuid,
        max_decisions: i64,
    ) -> Result<Option<ProfileGraph>, IdentityError> {
        let mut conn = self.pool.acquire().await?;
        let root: Option<String> = sqlx::query_scalar(CANONICAL_SQL)
            .bind(profile.to_string())
            .fetch_optional(&mut *conn)
            .await?;
        let Some(root) = root else {
            return Ok(None);
        };
        let tree: Vec<String> = sqlx::query_scalar(
            "WITH RECURSIVE tree (profile_id) AS ( \
                 SELECT ?1 \
               UNION \
                 SELECT p.profile_id FROM tree t JOIN profiles p ON p.merged_into = t.profile_id) \
             SELECT profile_id FROM tree",
        )
        .bind(&root)
        .fetch_all(&mut *conn)
        .await?;
        // The tree as a JSON array, for `IN (SELECT value FROM json_each(?1))`.
        let members = serde_json::to_string(&tree).unwrap_or_else(|_| "[]".to_owned());
        let identifiers: Vec<(String, String, String, String, i64)> = sqlx::query_as(
            "SELECT type, value, profile_id, event_id, linked_at FROM identifiers \
             WHERE profile_id IN (SELECT value FROM json_each(?1)) ORDER BY linked_at, type, value",
        )
        .bind(&members)
        .fetch_all(&mut *conn)
        .await?;
        let mut rows: Vec<DecisionRow> = sqlx::query_as(decision_sql!(
            "WHERE profile_id IN (SELECT value FROM json_each(?1)) \
             OR other_profile_id IN (SELECT value FROM json_each(?1)) ORDER BY seq DESC LIMIT ?2"
        ))
        .bind(&members)
        .bind(max_decisions.saturating_add(1))
        .fetch_all(&mut *conn)
        .await?;
        let keep = usize::try_from(max_decisions).unwrap_or(usize::MAX);
        let truncated = rows.len() > keep;
        rows.truncate(keep);
        rows.reverse();
        let root = parse_uuid(&root)?;
        let mut merged_profile_ids = Vec::with_capacity(tree.len());
        for member in &tree {
            let id = parse_uuid(member)?;
            if id != root {
                merged_profile_ids.push(id);
            }
        }
        Ok(Some(ProfileGraph {
            profile_id: root,
            merged_profile_ids,
            identifiers: identifiers
                .into_iter()
                .map(|(kind, value, linked_to, event_id, linked_at)| {
                    Ok(GraphIdentifier {
                        identifier: Identifier { kind, value },
                        linked_to: parse_uuid(&linked_to)?,
                        event_id,
                        linked_at: from_micros(linked_at)?,
                    })
                })
                .collect::<Result<_, IdentityError>>()?,
            decisions: rows
                .into_iter()
                .map(decision)
                .collect::<Result<_, IdentityError>>()?,
            truncated,
        }))
    }
}

type DecisionRow = (
    i64,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    i64,
    i64,
    i64,
);

async fn latest_rules(conn: &mut SqliteConnection) -> Result<Option<StoredRules>, IdentityError> {
    let latest: Option<(i64, String)> =
        sqlx::query_as("SELECT version, rules FROM rules_versions ORDER BY version DESC LIMIT 1")
            .fetch_optional(conn)
            .await?;
    latest
        .map(|(version, rules)| {
            Ok(StoredRules {
                version,
                rules: decode_rules(&rules)?,
            })
        })
        .transpose()
}

fn decode_rules(stored: &str) -> Result<serde_json::Value, IdentityError> {
    serde_json::from_str(stored)
        .map_err(|e| IdentityError::Corrupt(format!("stored identity rules: {e}")))
}

async fn insert_rules(
    conn: &mut SqliteConnection,
    version: i64,
    rules: &serde_json::Value,
    source: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO rules_versions (version, rules, created_at, source) VALUES (?1, ?2, ?3, ?4)",
    )
    .bind(version)
    .bind(rules.to_string())
    .bind(micros(now()))
    .bind(source)
    .execute(conn)
    .await?;
    Ok(())
}

fn decision(row: DecisionRow) -> Result<LoggedDecision, IdentityError> {
    let (
        seq,
        kind,
        event_id,
        profile_id,
        other,
        id_type,
        id_value,
        rule,
        rules_version,
        event_time,
        decided_at,
    ) = row;
    Ok(LoggedDecision {
        seq,
        kind,
        event_id,
        profile_id: parse_uuid(&profile_id)?,
        other_profile_id: other.as_deref().map(parse_uuid).transpose()?,
        identifier: id_type
            .zip(id_value)
            .map(|(kind, value)| Identifier { kind, value }),
        rule,
        rules_version,
        event_time: from_micros(event_time)?,
        decided_at: from_micros(decided_at)?,
    })
}

async fn stored(
    conn: &mut SqliteConnection,
    event_id: &str,
) -> Result<Option<Stored>, IdentityError> {
    let row: Option<(String, String, Option<String>)> =
        sqlx::query_as("SELECT profile_id, merges, detail FROM resolutions WHERE event_id = ?1")
            .bind(event_id)
            .fetch_optional(conn)
            .await?;
    row.map(|(profile_id, merges, detail)| {
        Ok(Stored {
            profile_id: parse_uuid(&profile_id)?,
            merges: decode_merges(event_id, &merges)?,
            detail: decode_detail(event_id, detail.as_deref())?,
        })
    })
    .transpose()
}

async fn canonical_of(
    conn: &mut SqliteConnection,
    identifier: &Identifier,
) -> Result<Option<ProfileAge>, IdentityError> {
    let row: Option<(String, i64)> = sqlx::query_as(LOOKUP_SQL)
        .bind(&identifier.kind)
        .bind(&identifier.value)
        .fetch_optional(conn)
        .await?;
    row.map(|(id, created_at)| {
        Ok(ProfileAge {
            created_at: from_micros(created_at)?,
            id: parse_uuid(&id)?,
        })
    })
    .transpose()
}

async fn write(
    conn: &mut SqliteConnection,
    plan: &Plan,
    rules_version: i64,
    now: OffsetDateTime,
) -> Result<(), sqlx::Error> {
    let now = micros(now);
    for p in &plan.new_profiles {
        sqlx::query("INSERT INTO profiles (profile_id, created_at) VALUES (?1, ?2)")
            .bind(p.id.to_string())
            .bind(micros(p.created_at))
            .execute(&mut *conn)
            .await?;
    }
    for n in &plan.new_identifiers {
        sqlx::query(
            "INSERT INTO identifiers (type, value, profile_id, event_id, created_at, linked_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&n.identifier.kind)
        .bind(&n.identifier.value)
        .bind(n.profile_id.to_string())
        .bind(&n.event_id)
        .bind(now)
        .bind(micros(n.linked_at))
        .execute(&mut *conn)
        .await?;
    }
    // Merges and decisions are the bulk of a batch of probabilistic merges: multi-row
    // statements, in order (the `merges` and `graph_log` sequences follow the plan's order).
    for chunk in plan.merges.chunks(ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<Sqlite>::new("WITH u (s, m, at) AS (");
        qb.push_values(chunk, |mut row, m| {
            row.push_bind(m.surviving_profile_id.to_string())
                .push_bind(m.merged_profile_id.to_string())
                .push_bind(micros(m.merged_at));
        });
        qb.push(
            ") UPDATE profiles SET merged_into = u.s, merged_at = u.at \
             FROM u WHERE profiles.profile_id = u.m",
        );
        qb.build().execute(&mut *conn).await?;
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO merges (surviving_profile_id, merged_profile_id, cause_event_id, \
             merged_at, rule) ",
        );
        qb.push_values(chunk, |mut row, m| {
            row.push_bind(m.surviving_profile_id.to_string())
                .push_bind(m.merged_profile_id.to_string())
                .push_bind(m.cause_event_id.as_str())
                .push_bind(micros(m.merged_at))
                .push_bind(m.rule.as_str());
        });
        qb.build().execute(&mut *conn).await?;
    }
    if !plan.merges.is_empty() {
        // A merged profile is matched as its survivor from now on.
        let merged: Vec<Uuid> = plan.merges.iter().map(|m| m.merged_profile_id).collect();
        let merged = json_ids(&merged);
        for table in [
            "DELETE FROM match_keys WHERE profile_id IN (SELECT value FROM json_each(?1))",
            "DELETE FROM match_attributes WHERE profile_id IN (SELECT value FROM json_each(?1))",
        ] {
            sqlx::query(table).bind(&merged).execute(&mut *conn).await?;
        }
    }
    for s in &plan.sightings {
        sqlx::query(
            "INSERT INTO sightings (type, value, profile_id, event_id, seen_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        )
        .bind(&s.identifier.kind)
        .bind(&s.identifier.value)
        .bind(s.profile_id.to_string())
        .bind(&s.event_id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    for chunk in plan.decisions.chunks(ROWS_PER_STATEMENT) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO graph_log (kind, event_id, profile_id, other_profile_id, id_type, \
             id_value, rule, rules_version, event_time, decided_at, detail) ",
        );
        qb.push_values(chunk, |mut row, d| {
            row.push_bind(d.kind.as_str())
                .push_bind(d.event_id.as_str())
                .push_bind(d.profile_id.to_string())
                .push_bind(d.other_profile_id.map(|p| p.to_string()))
                .push_bind(d.identifier.as_ref().map(|i| i.kind.as_str()))
                .push_bind(d.identifier.as_ref().map(|i| i.value.as_str()))
                .push_bind(d.rule.as_str())
                .push_bind(rules_version)
                .push_bind(micros(d.event_time))
                .push_bind(now)
                .push_bind(d.detail.as_deref());
        });
        qb.build().execute(&mut *conn).await?;
    }
    // A suppressed event belongs to no profile: nothing is kept of it.
    for r in plan.resolutions.iter().filter(|r| !r.suppressed) {
        sqlx::query(
            "INSERT INTO resolutions (event_id, profile_id, merges, resolved_at, detail) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&r.event_id)
        .bind(r.profile_id.to_string())
        .bind(encode_merges(&r.merges))
        .bind(now)
        .bind(encode_detail(r))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Rows per multi-row statement: 11 columns at most, far below SQLite's parameter limit
/// (32,766 since 3.32; the bundled library).
const ROWS_PER_STATEMENT: usize = 500;

/// Microseconds since the Unix epoch; times in the graph are within i64 range by far.
fn micros(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

/// Reads the rows of the component rooted at `root` (canonical) within the caller's
/// transaction.
/// Which identifiers of `records` were split off their profile and which were erased: rows
/// (type, value, erased, suppresses whole events).
async fn suppressed(
    conn: &mut SqliteConnection,
    records: &[&Record],
) -> Result<Vec<(String, String, bool, bool)>, sqlx::Error> {
    let keys = suppression_keys(records);
    let keys = serde_json::to_string(
        &keys
            .iter()
            .map(|(i, digest)| (&i.kind, &i.value, digest))
            .collect::<Vec<_>>(),
    )
    .unwrap_or_else(|_| "[]".to_owned());
    sqlx::query_as(
        "WITH k (type, value, digest) AS ( \
             SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?1)) \
         SELECT d.type, d.value, 0, 0 FROM detached_identifiers d \
         JOIN k ON d.type = k.type AND d.value = k.value \
         UNION ALL \
         SELECT k.type, k.value, 1, e.suppresses FROM erased_identifiers e \
         JOIN k ON e.type = k.type AND e.digest = k.digest",
    )
    .bind(keys)
    .fetch_all(&mut *conn)
    .await
}

/// The profile `merged` was merged into: `FailedPrecondition` when it was not merged,
/// `UnknownProfile` when no profile has the id.
async fn survivor_of(conn: &mut SqliteConnection, merged: Uuid) -> Result<Uuid, IdentityError> {
    let survivor: Option<String> =
        sqlx::query_scalar("SELECT surviving_profile_id FROM merges WHERE merged_profile_id = ?1")
            .bind(merged.to_string())
            .fetch_optional(&mut *conn)
            .await?;
    if let Some(survivor) = survivor {
        return parse_uuid(&survivor);
    }
    let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM profiles WHERE profile_id = ?1")
        .bind(merged.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    Err(match known {
        Some(_) => IdentityError::FailedPrecondition(format!(
            "profile {merged} is not merged into another"
        )),
        None => IdentityError::UnknownProfile,
    })
}

/// The answer of the forgotten component `profile` belonged to, if it was forgotten.
async fn forgotten_answer(
    conn: &mut SqliteConnection,
    profile: &str,
) -> Result<Option<Forgotten>, IdentityError> {
    let answer: Option<Option<String>> = sqlx::query_scalar(
        "SELECT r.answer FROM forgotten_profiles f \
         JOIN forgotten_profiles r ON r.profile_id = f.root WHERE f.profile_id = ?1",
    )
    .bind(profile)
    .fetch_optional(conn)
    .await?;
    answer
        .map(|a| Forgotten::decode(a.as_deref().unwrap_or("null")))
        .transpose()
}

/// Erases `identifier` outside its component: remembers its digest so it never links again,
/// replaces its value in the graph log with a pseudonym, and forgets where it was seen.
async fn erase_everywhere(
    conn: &mut SqliteConnection,
    identifier: &Identifier,
    reason: &str,
    now: OffsetDateTime,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO erased_identifiers (type, digest, reason, created_at) \
         VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
    )
    .bind(&identifier.kind)
    .bind(erased_digest(identifier))
    .bind(reason)
    .bind(micros(now))
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE graph_log SET id_value = ?3 WHERE id_type = ?1 AND id_value = ?2")
        .bind(&identifier.kind)
        .bind(&identifier.value)
        .bind(erased_pseudonym(identifier))
        .execute(&mut *conn)
        .await?;
    for statement in [
        "DELETE FROM sightings WHERE type = ?1 AND value = ?2",
        "DELETE FROM detached_identifiers WHERE type = ?1 AND value = ?2",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(&identifier.kind)
            .bind(&identifier.value)
            .execute(&mut *conn)
            .await?;
    }
    scrub_dropped(&mut *conn, &HashSet::from([identifier.clone()])).await?;
    Ok(())
}

/// Takes `erased` out of the dropped identifiers of every event that names them (other
/// people's events that carried one without linking it), so neither their details nor a later
/// replay of their components holds the erased value.
async fn scrub_dropped(
    conn: &mut SqliteConnection,
    erased: &HashSet<Identifier>,
) -> Result<(), sqlx::Error> {
    let pairs: Vec<(&str, &str)> = erased
        .iter()
        .map(|i| (i.kind.as_str(), i.value.as_str()))
        .collect();
    let pairs = serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned());
    let named: Vec<(String, String)> = sqlx::query_as(
        "SELECT r.event_id, r.detail FROM resolutions r \
         WHERE r.detail IS NOT NULL AND EXISTS ( \
             SELECT 1 FROM json_each(r.detail, '$.dropped') AS d \
             JOIN json_each(?1) AS k \
               ON json_extract(d.value, '$.type') = json_extract(k.value, '$[0]') \
              AND json_extract(d.value, '$.value') = json_extract(k.value, '$[1]'))",
    )
    .bind(&pairs)
    .fetch_all(&mut *conn)
    .await?;
    for (event, detail) in named {
        if let Some(detail) = scrub_detail(&detail, erased) {
            sqlx::query("UPDATE resolutions SET detail = ?2 WHERE event_id = ?1")
                .bind(&event)
                .bind(detail)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// Those of `identifiers` that were erased (by digest: the values themselves are not kept).
async fn erased_among(
    conn: &mut SqliteConnection,
    identifiers: &[&Identifier],
) -> Result<HashSet<Identifier>, sqlx::Error> {
    let mut out = HashSet::new();
    for identifier in identifiers {
        let erased: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM erased_identifiers WHERE type = ?1 AND digest = ?2")
                .bind(&identifier.kind)
                .bind(erased_digest(identifier))
                .fetch_optional(&mut *conn)
                .await?;
        if erased.is_some() {
            out.insert((*identifier).clone());
        }
    }
    Ok(out)
}

/// The history rows of the components rooted at `roots` (the first is named the root), read
/// as one: identifiers held by any of them are not foreign.
async fn history_rows(
    conn: &mut SqliteConnection,
    roots: &[&str],
) -> Result<HistoryRows, IdentityError> {
    let root = *roots.first().ok_or(IdentityError::UnknownProfile)?;
    let seeds = serde_json::to_string(roots).unwrap_or_else(|_| "[]".to_owned());
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "WITH RECURSIVE tree (profile_id) AS ( \
             SELECT value FROM json_each(?1) \
           UNION \
             SELECT p.profile_id FROM tree t JOIN profiles p ON p.merged_into = t.profile_id) \
         SELECT p.profile_id, p.created_at FROM profiles p JOIN tree USING (profile_id)",
    )
    .bind(&seeds)
    .fetch_all(&mut *conn)
    .await?;
    let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    let list = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".to_owned());
    let creates: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_id, profile_id FROM graph_log \
         WHERE kind = 'create' AND profile_id IN (SELECT value FROM json_each(?1))",
    )
    .bind(&list)
    .fetch_all(&mut *conn)
    .await?;
    let resolutions: Vec<(String, Option<String>, i64, i64)> = sqlx::query_as(
        "SELECT event_id, detail, resolved_at, rowid FROM resolutions \
         WHERE profile_id IN (SELECT value FROM json_each(?1))",
    )
    .bind(&list)
    .fetch_all(&mut *conn)
    .await?;
    let merges: Vec<(String, String, String, String, i64, i64)> = sqlx::query_as(
        "SELECT profile_id, other_profile_id, event_id, rule, decided_at, seq FROM graph_log \
         WHERE kind = 'merge' AND rule <> 'seen_together' \
           AND profile_id IN (SELECT value FROM json_each(?1)) \
           AND other_profile_id IS NOT NULL",
    )
    .bind(&list)
    .fetch_all(&mut *conn)
    .await?;
    let resolutions = resolutions
        .into_iter()
        .map(|(event, detail, at, order)| Ok((event, detail, from_micros(at)?, order)))
        .collect::<Result<Vec<_>, IdentityError>>()?;
    let resolutions = decode_resolutions(resolutions)?;
    let dropped: Vec<(String, String)> = dropped_identifiers(&resolutions)
        .into_iter()
        .map(|i| (i.kind, i.value))
        .collect();
    let pairs = serde_json::to_string(&dropped).unwrap_or_else(|_| "[]".to_owned());
    let owners: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT i.type, i.value, i.profile_id FROM identifiers i \
         JOIN json_each(?1) AS k \
           ON i.type = json_extract(k.value, '$[0]') AND i.value = json_extract(k.value, '$[1]')",
    )
    .bind(&pairs)
    .fetch_all(&mut *conn)
    .await?;
    let foreign = owners
        .into_iter()
        .filter(|(_, _, owner)| !ids.contains(&owner.as_str()))
        .map(|(kind, value, _)| Identifier { kind, value })
        .collect();
    Ok(HistoryRows {
        foreign,
        root: parse_uuid(root)?,
        members: rows
            .iter()
            .map(|(id, created)| Ok((parse_uuid(id)?, from_micros(*created)?)))
            .collect::<Result<_, IdentityError>>()?,
        creates: creates
            .into_iter()
            .map(|(event, id)| Ok((event, parse_uuid(&id)?)))
            .collect::<Result<_, IdentityError>>()?,
        resolutions,
        merges: merges
            .into_iter()
            .map(|(merged, survivor, cause, rule, at, seq)| {
                Ok((
                    parse_uuid(&merged)?,
                    parse_uuid(&survivor)?,
                    cause,
                    rule,
                    from_micros(at)?,
                    seq,
                ))
            })
            .collect::<Result<_, IdentityError>>()?,
    })
}

/// Re-resolves in event-time order the components a late record of `plan` touched, within the
/// run's transaction (see the Postgres store's `reorder_late`; the single connection needs no
/// locks). Nothing is read when no record took an order-dependent decision; a closure over the
/// rules' reorder bound is not replayed (see [`reorder_skipped`]).
async fn reorder_late(
    tx: &mut SqliteConnection,
    rules: &VersionedRules,
    plan: &mut Plan,
    now: OffsetDateTime,
) -> Result<(), IdentityError> {
    let bound = rules.rules.reorder();
    let suspects = late_suspects(&rules.rules, plan);
    let mut done: HashSet<String> = HashSet::new();
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
        let seeds: Vec<&str> = roots.iter().map(String::as_str).collect();
        let rows = history_rows(&mut *tx, &seeds).await?;
        let members: HashSet<Uuid> = rows.members.iter().map(|m| m.0).collect();
        let history = history(rows)?;
        done.extend(roots.iter().cloned());
        let list = serde_json::to_string(&members.iter().map(Uuid::to_string).collect::<Vec<_>>())
            .unwrap_or_else(|_| "[]".to_owned());
        let pairs: Vec<(String, String)> = sqlx::query_as(
            "SELECT profile_a, profile_b FROM splits \
             WHERE profile_a IN (SELECT value FROM json_each(?1)) \
                OR profile_b IN (SELECT value FROM json_each(?1))",
        )
        .bind(&list)
        .fetch_all(&mut *tx)
        .await?;
        let mut constraints = Constraints {
            forbidden: pairs
                .iter()
                .map(|(a, b)| Ok((parse_uuid(a)?, parse_uuid(b)?)))
                .collect::<Result<Vec<_>, IdentityError>>()?,
            ..Constraints::default()
        };
        constraints.erased = erased_among(&mut *tx, &history_identifiers(&history)).await?;
        constraints.detached = detached_among(&mut *tx, &history_identifiers(&history)).await?;
        let replayed = reorder(&rules.rules, &history, &constraints, now);
        let root = history.root;
        clear_derived(&mut *tx, &list).await?;
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

/// The closure of `identifiers` (a suspect's, resolved at `at`), with its canonical profiles as
/// stored: the components that hold them or whose events carried them without linking them,
/// then, step by step, those related in the same way to every identifier those components'
/// events carried. Counted as it is followed, like the Postgres store's: once it holds more
/// profiles, events or identifiers than `bound`, it is followed no further.
async fn closure_roots(
    conn: &mut SqliteConnection,
    identifiers: &[Identifier],
    at: OffsetDateTime,
    bound: ReorderConfig,
) -> Result<Closure<String>, IdentityError> {
    let mut roots: HashSet<String> = HashSet::new();
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
        let pairs = identifier_pairs(&frontier);
        let known = serde_json::to_string(&roots).unwrap_or_else(|_| "[]".to_owned());
        let (room_profiles, room_events) = size.room(bound);
        let new: Vec<String> = sqlx::query_scalar(
            "WITH RECURSIVE k (type, value) AS ( \
                 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') \
                 FROM json_each(?1)), \
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
             SELECT profile_id FROM chain WHERE merged_into IS NULL \
               AND profile_id NOT IN (SELECT value FROM json_each(?2)) LIMIT ?3",
        )
        .bind(&pairs)
        .bind(&known)
        .bind(room_profiles)
        .fetch_all(&mut *conn)
        .await?;
        if new.is_empty() {
            break;
        }
        roots.extend(new.iter().cloned());
        // Counted before the step's history is read: a component of a million events is not.
        let seeds = serde_json::to_string(&new).unwrap_or_else(|_| "[]".to_owned());
        let members: Vec<String> = sqlx::query_scalar(
            "WITH RECURSIVE tree (profile_id) AS ( \
                 SELECT value FROM json_each(?1) \
               UNION \
                 SELECT p.profile_id FROM tree t JOIN profiles p ON p.merged_into = t.profile_id) \
             SELECT profile_id FROM tree LIMIT ?2",
        )
        .bind(&seeds)
        .bind(room_profiles)
        .fetch_all(&mut *conn)
        .await?;
        let list = serde_json::to_string(&members).unwrap_or_else(|_| "[]".to_owned());
        let events: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM resolutions \
             WHERE profile_id IN (SELECT value FROM json_each(?1)) LIMIT ?2)",
        )
        .bind(&list)
        .bind(room_events)
        .fetch_one(&mut *conn)
        .await?;
        size.add(members.len(), events);
        if size.over(bound) {
            return too_large(&mut *conn, identifiers, at, size, late).await;
        }
        let seeds: Vec<&str> = new.iter().map(String::as_str).collect();
        let rows = history_rows(&mut *conn, &seeds).await?;
        late = late || has_later_event(&rows, at);
        frontier = carried_identifiers(&rows);
    }
    let mut roots: Vec<String> = roots.into_iter().collect();
    roots.sort_unstable();
    Ok(Closure::Within { roots, late })
}

/// A closure of `identifiers` (a suspect's, resolved at `at`) found larger than the bound
/// (`size` so far): late when the part read was (`late`), or when an event that carried one of
/// the suspect's identifiers (its link or drop in the graph log) happened after it.
async fn too_large(
    conn: &mut SqliteConnection,
    identifiers: &[Identifier],
    at: OffsetDateTime,
    size: ClosureSize,
    late: bool,
) -> Result<Closure<String>, IdentityError> {
    if late {
        return Ok(Closure::TooLarge { size, late });
    }
    let late = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM graph_log g JOIN json_each(?1) AS k \
           ON g.id_type = json_extract(k.value, '$[0]') \
          AND g.id_value = json_extract(k.value, '$[1]') \
         WHERE g.kind IN ('link', 'drop') AND g.event_time > ?2)",
    )
    .bind(identifier_pairs(identifiers))
    .bind(micros(at))
    .fetch_one(&mut *conn)
    .await?;
    Ok(Closure::TooLarge { size, late })
}

/// `identifiers` as a JSON array of `[type, value]` pairs, for `json_each`.
fn identifier_pairs(identifiers: &[Identifier]) -> String {
    let pairs: Vec<(&str, &str)> = identifiers
        .iter()
        .map(|i| (i.kind.as_str(), i.value.as_str()))
        .collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned())
}

/// Which of `identifiers` were split off their profile (`detached_identifiers`).
async fn detached_among(
    conn: &mut SqliteConnection,
    identifiers: &[&Identifier],
) -> Result<HashSet<Identifier>, IdentityError> {
    let mut out = HashSet::new();
    for identifier in identifiers {
        let detached: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM detached_identifiers WHERE type = ?1 AND value = ?2")
                .bind(&identifier.kind)
                .bind(&identifier.value)
                .fetch_optional(&mut *conn)
                .await?;
        if detached.is_some() {
            out.insert((*identifier).clone());
        }
    }
    Ok(out)
}

/// Clears what the components of the profiles in `list` (a JSON array) derived (membership,
/// merges, identifiers, sightings) before a replay of them is written.
async fn clear_derived(conn: &mut SqliteConnection, list: &str) -> Result<(), sqlx::Error> {
    for statement in [
        "UPDATE profiles SET merged_into = NULL, merged_at = NULL \
         WHERE profile_id IN (SELECT value FROM json_each(?1))",
        "DELETE FROM merges WHERE merged_profile_id IN (SELECT value FROM json_each(?1))",
        "DELETE FROM identifiers WHERE profile_id IN (SELECT value FROM json_each(?1))",
        "DELETE FROM sightings WHERE profile_id IN (SELECT value FROM json_each(?1))",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(list)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Rewrites the stored resolution of every event a replay resolved, and deletes those of the
/// events it left out (erased).
async fn rewrite_resolutions(
    conn: &mut SqliteConnection,
    replayed: &Replay,
) -> Result<(), sqlx::Error> {
    for r in &replayed.plan.resolutions {
        sqlx::query(
            "UPDATE resolutions SET profile_id = ?2, merges = ?3, detail = ?4 WHERE event_id = ?1",
        )
        .bind(&r.event_id)
        .bind(r.profile_id.to_string())
        .bind(encode_merges(&r.merges))
        .bind(encode_detail(r))
        .execute(&mut *conn)
        .await?;
    }
    for event in &replayed.erased_events {
        sqlx::query("DELETE FROM resolutions WHERE event_id = ?1")
            .bind(event)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Queues a rewrite's split for the profile service, in order with the merges before it.
async fn queue_split(
    conn: &mut SqliteConnection,
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
         VALUES (?1, ?2, ?3, 'split', ?4, ?5)",
    )
    .bind(survivor.to_string())
    .bind(merged.to_string())
    .bind(reason)
    .bind(micros(now))
    .bind(payload)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn from_micros(us: i64) -> Result<OffsetDateTime, IdentityError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .map_err(|e| IdentityError::Corrupt(format!("time out of range: {e}")))
}

fn parse_uuid(s: &str) -> Result<Uuid, IdentityError> {
    Uuid::parse_str(s).map_err(|e| IdentityError::Corrupt(format!("profile id: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::truncate_to_micros;

    #[test]
    fn micros_round_trip() {
        let t = truncate_to_micros(OffsetDateTime::now_utc());
        assert_eq!(from_micros(micros(t)).unwrap(), t);
        assert!(matches!(parse_uuid("nope"), Err(IdentityError::Corrupt(_))));
    }
}
