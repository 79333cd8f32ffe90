//! The identity graph's storage: one trait, a Postgres implementation safe for several replicas,
//! and a SQLite implementation for `tessera dev`. Both read a view of the graph, let
//! [`crate::domain::plan`] decide, and write the plan in one transaction.

#[cfg(test)]
mod batch_tests;
#[cfg(test)]
mod matching_job_tests;
mod postgres;
mod sqlite;

pub(crate) use postgres::OwnerCache;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tessera_core::Identifier;
use tessera_store::Database;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::IdentityError;
use crate::domain::{
    Constraints, Decision, DecisionKind, Dropped, GraphView, HistoryEntry, Merge, Plan, ProfileAge,
    Record, ReorderConfig, Replay, Resolution, Rules, RulesConfig, SEEN_TOGETHER, SPLIT,
    in_event_time_order, order_sensitive_drop, replay, split_apart, truncate_to_micros,
};
use crate::matching::{BatchJob, BatchProgress};

/// What the graph keeps of one event's resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    /// The event's profile when it was resolved (not necessarily canonical now).
    pub(crate) profile_id: Uuid,
    /// The merges the event caused.
    pub(crate) merges: Vec<Merge>,
    /// What the event linked and what it did not; `None` for events resolved before the
    /// rules existed.
    pub(crate) detail: Option<Detail>,
}

/// What resolving one record gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The event's resolution, as stored.
    Stored(Stored),
    /// The event is suppressed (it carries an identifier of a forgotten person that suppresses
    /// whole events, or only erased identifiers): it belongs to no profile and nothing was
    /// stored. Resolving it again finds it suppressed again: erasures are never undone.
    Suppressed,
}

/// The identifiers an event linked and those it did not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Detail {
    pub(crate) identifiers: Vec<Identifier>,
    pub(crate) dropped: Vec<Dropped>,
    /// When the event happened, if it was kept.
    pub(crate) event_time: Option<OffsetDateTime>,
}

/// Rules with the version the store registered them under.
#[derive(Debug, Clone)]
pub struct VersionedRules {
    /// The version the rules are stored under.
    pub version: i64,
    /// The rules.
    pub rules: Rules,
}

/// The identity graph's storage.
#[async_trait::async_trait]
pub(crate) trait IdentityStore: Send + Sync {
    /// Resolves `records` (distinct event ids) in order under `rules` and stores their
    /// resolutions and the decisions in the graph log; a record whose event turns out to be
    /// resolved already gets its stored resolution, a suppressed record nothing. Returns one
    /// entry per record.
    async fn resolve(
        &self,
        rules: &VersionedRules,
        records: &[Record],
    ) -> Result<Vec<Outcome>, IdentityError>;

    /// Registers the rules of a replica's config at start: a new version when they differ from
    /// the rules last registered from config (the config changed since), else none. Returns
    /// the current rules: the latest version, which may be an `UpdateRules` change made after
    /// the config's. Safe when several replicas start at once.
    async fn register_rules(&self, config: &RulesConfig) -> Result<StoredRules, IdentityError>;

    /// The history of the component `profile` belongs to (followed to its canonical profile):
    /// its members, and its events and non-event merges in the order they were decided.
    /// `UnknownProfile` for an unknown profile.
    async fn component_history(&self, profile: Uuid) -> Result<ComponentHistory, IdentityError>;

    /// Rewrites a component from its history under `change`: reverting a merge (the two, and
    /// every pair split before, forbidden to meet; the pair recorded in `splits`), splitting
    /// an identifier off (recorded in `detached_identifiers`) or erasing one (its digest
    /// recorded in `erased_identifiers`, its value replaced by a pseudonym in the graph log,
    /// its sightings and the events it alone carried deleted). Replays the component, writes
    /// the replayed graph back (membership, identifiers, sightings, each event's resolution)
    /// and queues the split for the profile service, in one transaction.
    /// `FailedPrecondition` when an unmerged profile was never merged; `UnknownProfile` for an
    /// unknown profile; `NotFound` when a detached identifier belongs to no profile.
    async fn rewrite(
        &self,
        rules: &VersionedRules,
        change: &Change,
        reason: &str,
    ) -> Result<Rewritten, IdentityError>;

    /// Forgets the component of `profile` (a GDPR deletion of a person), in one transaction:
    /// remembers the digest of each of its identifiers in `erased_identifiers` (user ids,
    /// emails, phones and custom types suppress whole events, see
    /// [`crate::domain::suppresses_events`]),
    /// deletes every row about its profiles, identifiers and events (identifiers, sightings,
    /// merges, resolutions, matching rows, splits, detached identifiers, outbox entries, its
    /// graph log entries; the identifiers' values elsewhere in the graph log become
    /// pseudonyms and are taken out of other events' dropped identifiers) and its profiles,
    /// and records what it forgot in `forgotten_profiles`. Returns what it forgot and whether
    /// this call forgot it: forgetting a profile of a forgotten component answers what the
    /// first call forgot. `UnknownProfile` for a profile that never existed.
    async fn forget(&self, profile: Uuid, reason: &str)
    -> Result<(Forgotten, bool), IdentityError>;

    /// The latest rules version; `None` before any was registered.
    async fn current_rules(&self) -> Result<Option<StoredRules>, IdentityError>;

    /// Stores `config` as the next version (source `api`) if the latest version is `expected`
    /// (whatever it is when `None`; `FailedPrecondition` otherwise). Rules equal to the
    /// latest version's add no version. Returns the current version.
    async fn update_rules(
        &self,
        config: &RulesConfig,
        expected: Option<i64>,
    ) -> Result<i64, IdentityError>;

    /// The graph log, oldest first: every decision since the graph began.
    async fn graph_log(&self) -> Result<Vec<LoggedDecision>, IdentityError>;

    /// The graph of the canonical profile of `profile`, with at most `max_decisions` (the
    /// newest) of its decisions; `None` when the profile is unknown.
    async fn profile_graph(
        &self,
        profile: Uuid,
        max_decisions: i64,
    ) -> Result<Option<ProfileGraph>, IdentityError>;

    /// The canonical profile of each of `profiles` that exists, following merges.
    async fn canonical(&self, profiles: &[Uuid]) -> Result<HashMap<Uuid, Uuid>, IdentityError>;

    /// The canonical profile of each of `profiles` that was merged away, following merges; a
    /// profile that is canonical itself, or unknown, is left out (most of a batch's profiles,
    /// which a backend need then neither walk nor send).
    async fn survivors(&self, profiles: &[Uuid]) -> Result<HashMap<Uuid, Uuid>, IdentityError> {
        let mut canonical = self.canonical(profiles).await?;
        canonical.retain(|profile, survivor| profile != survivor);
        Ok(canonical)
    }

    /// The canonical profile of `identifier` (normalized), if the graph holds it.
    async fn lookup(&self, identifier: &Identifier) -> Result<Option<Uuid>, IdentityError>;
}

/// A profile's matching attributes and blocking keys, to index.
#[derive(Debug, Clone)]
pub(crate) struct IndexEntry {
    /// A canonical profile.
    pub(crate) profile_id: Uuid,
    /// Its normalized attributes, a JSON object field → value.
    pub(crate) attributes: String,
    /// Its blocking keys.
    pub(crate) keys: Vec<String>,
}

/// A match suggestion as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSuggestion {
    /// Its id.
    pub id: i64,
    /// One profile (the smaller id).
    pub profile_a: Uuid,
    /// The other.
    pub profile_b: Uuid,
    /// The explanation, JSON.
    pub explanation: String,
    /// `open`, `accepted` or `rejected`.
    pub status: String,
    /// When it was suggested.
    pub created_at: OffsetDateTime,
}

/// Storage of probabilistic matching: the attribute index, models, suggestions and the merges
/// to tell the profile service about.
#[async_trait::async_trait]
pub(crate) trait MatchStore: Send + Sync {
    /// Stores the attributes and keys of each entry's profile (new or changed attributes reset
    /// the profile's matched version); returns the entries' profiles not yet matched with
    /// `model_version`.
    async fn index(
        &self,
        entries: &[IndexEntry],
        model_version: Option<i64>,
    ) -> Result<Vec<Uuid>, IdentityError>;

    /// Records that each (profile, attributes JSON) of `profiles` was matched with
    /// `model_version`, where its stored attributes are still those.
    async fn mark_matched(
        &self,
        profiles: &[(Uuid, &str)],
        model_version: i64,
    ) -> Result<(), IdentityError>;

    /// For each of `keys` held by at most `cap` profiles: the key, each profile holding it and
    /// that profile's attributes (JSON).
    async fn candidates(
        &self,
        keys: &[String],
        cap: i64,
    ) -> Result<Vec<(String, Uuid, String)>, IdentityError>;

    /// Every indexed profile with its attributes (JSON), in profile id order.
    async fn population(&self) -> Result<Vec<(Uuid, String)>, IdentityError>;

    /// Stores a fitted model (JSON params and report); returns its version.
    async fn save_model(&self, params: &str, report: &str) -> Result<i64, IdentityError>;

    /// The newest model's version, if any.
    async fn model_version(&self) -> Result<Option<i64>, IdentityError>;

    /// The newest model: version and JSON params.
    async fn latest_model(&self) -> Result<Option<(i64, String)>, IdentityError>;

    /// Model `version` (the newest when `None`) with its report and training time.
    async fn model(&self, version: Option<i64>) -> Result<Option<StoredModel>, IdentityError>;

    /// Merges the canonical profiles of each pair under `rules` (the younger into the older), in
    /// order and in one transaction, each recorded under `rule` with its detail (an
    /// explanation), caused by `cause`, and queued for the profile service. Per pair,
    /// `Err(reason)` when the rules refuse it, a profile is unknown (`unknown_profile`) or both
    /// are one profile already (`same_profile`). Set-based: the pairs' state is read once,
    /// the merges decided in memory as merging them one after another would
    /// ([`crate::domain::plan_merges`]) and written with multi-row statements.
    async fn merge_pairs(
        &self,
        rules: &VersionedRules,
        pairs: &[((Uuid, Uuid), Option<String>)],
        cause: &str,
        rule: &str,
    ) -> Result<Vec<Result<Merge, String>>, IdentityError>;

    /// [`MatchStore::merge_pairs`] for one pair.
    async fn merge_pair(
        &self,
        rules: &VersionedRules,
        pair: (Uuid, Uuid),
        cause: &str,
        rule: &str,
        detail: Option<String>,
    ) -> Result<Result<Merge, String>, IdentityError> {
        let mut out = self
            .merge_pairs(rules, &[(pair, detail)], cause, rule)
            .await?;
        out.pop()
            .ok_or_else(|| IdentityError::Corrupt("no outcome for a merge".to_owned()))
    }

    /// Stores an open suggestion for the pair unless one exists (open, accepted or rejected);
    /// returns whether it stored one.
    async fn suggest(&self, pair: (Uuid, Uuid), explanation: &str) -> Result<bool, IdentityError>;

    /// [`MatchStore::suggest`] for many pairs, in order and in one transaction; returns how
    /// many it stored.
    async fn suggest_all(&self, pairs: &[((Uuid, Uuid), String)]) -> Result<i64, IdentityError>;

    /// Suggestions with `status` (all when `None`), newest first, with an id below `before`.
    async fn suggestions(
        &self,
        status: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<StoredSuggestion>, IdentityError>;

    /// One suggestion.
    async fn suggestion(&self, id: i64) -> Result<Option<StoredSuggestion>, IdentityError>;

    /// Moves an open suggestion to `status`; returns whether it was open.
    async fn decide_suggestion(&self, id: i64, status: &str) -> Result<bool, IdentityError>;

    /// Up to `limit` merges the profile service has not been told about, oldest first.
    async fn pending_merges(&self, limit: i64) -> Result<Vec<Outboxed>, IdentityError>;

    /// Marks queued merges as delivered.
    async fn delivered(&self, seqs: &[i64]) -> Result<(), IdentityError>;

    /// Starts a batch match job held by `owner` for `lease`, unless one runs: `Err` with the
    /// running job then. A running job whose lease expired is marked failed first.
    async fn start_batch_job(
        &self,
        owner: &str,
        lease: std::time::Duration,
    ) -> Result<Result<BatchJob, BatchJob>, IdentityError>;

    /// Records the progress of job `id` and renews its lease, while `owner` holds it; returns
    /// whether it does.
    async fn batch_job_progress(
        &self,
        id: i64,
        owner: &str,
        progress: &BatchProgress,
        lease: std::time::Duration,
    ) -> Result<bool, IdentityError>;

    /// Ends job `id` of `owner`: succeeded with `progress`, or failed with `error`.
    async fn finish_batch_job(
        &self,
        id: i64,
        owner: &str,
        progress: &BatchProgress,
        error: Option<&str>,
    ) -> Result<(), IdentityError>;

    /// Job `id` (a running job whose lease expired is marked failed first).
    async fn batch_job(&self, id: i64) -> Result<Option<BatchJob>, IdentityError>;

    /// The `limit` newest jobs, newest first.
    async fn batch_jobs(&self, limit: i64) -> Result<Vec<BatchJob>, IdentityError>;
}

/// The store for `db`'s backend.
pub(crate) fn open(db: Database, owners: Option<OwnerCache>) -> Arc<dyn IdentityStore> {
    match db {
        Database::Postgres(pool) => Arc::new(postgres::PgStore::new(pool, owners)),
        Database::Sqlite(pool) => Arc::new(sqlite::SqliteStore::new(pool)),
    }
}

/// The matching store for `db`'s backend.
pub(crate) fn open_matching(db: Database, owners: Option<OwnerCache>) -> Arc<dyn MatchStore> {
    match db {
        Database::Postgres(pool) => Arc::new(postgres::PgStore::new(pool, owners)),
        Database::Sqlite(pool) => Arc::new(sqlite::SqliteStore::new(pool)),
    }
}

/// Orders a pair as suggestions are stored: the smaller id first.
fn ordered((a, b): (Uuid, Uuid)) -> (Uuid, Uuid) {
    if a <= b { (a, b) } else { (b, a) }
}

/// The clock of the graph, at the precision both backends keep.
fn now() -> OffsetDateTime {
    truncate_to_micros(OffsetDateTime::now_utc())
}

/// One entry of the graph log as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedDecision {
    /// The entry's position in the log.
    pub seq: i64,
    /// `create`, `link`, `merge` or `drop`.
    pub kind: String,
    /// The event that caused it.
    pub event_id: String,
    /// The profile created, linked to, merged (the merged one), or the event's profile (drop).
    pub profile_id: Uuid,
    /// `merge`: the surviving profile.
    pub other_profile_id: Option<Uuid>,
    /// `link` and `drop`: the identifier.
    pub identifier: Option<Identifier>,
    /// The rule that decided.
    pub rule: String,
    /// The version of the rules it was decided under (0: before versioning).
    pub rules_version: i64,
    /// When the causing event happened.
    pub event_time: OffsetDateTime,
    /// When the graph decided.
    pub decided_at: OffsetDateTime,
}

/// A profile's identity graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileGraph {
    /// The canonical profile.
    pub profile_id: Uuid,
    /// Every profile merged into it, directly or not.
    pub merged_profile_ids: Vec<Uuid>,
    /// Its identifiers, oldest link first.
    pub identifiers: Vec<GraphIdentifier>,
    /// The decisions about it and the profiles merged into it, oldest first.
    pub decisions: Vec<LoggedDecision>,
    /// Whether older decisions were left out.
    pub truncated: bool,
}

/// An identifier of a profile's graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphIdentifier {
    /// The identifier.
    pub identifier: Identifier,
    /// The profile it was linked to.
    pub linked_to: Uuid,
    /// The event that linked it.
    pub event_id: String,
    /// When that event happened.
    pub linked_at: OffsetDateTime,
}

/// A merge as kept in `resolutions.merges`.
#[derive(Serialize, Deserialize)]
struct StoredMerge {
    surviving: Uuid,
    merged: Uuid,
    cause: String,
    #[serde(with = "time::serde::rfc3339")]
    at: OffsetDateTime,
    #[serde(default = "seen_together")]
    rule: String,
}

fn seen_together() -> String {
    SEEN_TOGETHER.to_owned()
}

/// `resolutions.detail` as kept.
#[derive(Serialize, Deserialize)]
struct StoredDetail {
    identifiers: Vec<(String, String)>,
    dropped: Vec<StoredDropped>,
    /// When the event happened; absent for resolutions stored before it was kept.
    #[serde(default, with = "time::serde::rfc3339::option")]
    event_time: Option<OffsetDateTime>,
}

#[derive(Serialize, Deserialize)]
struct StoredDropped {
    #[serde(rename = "type")]
    kind: String,
    value: String,
    reason: String,
}

fn encode_detail(resolution: &Resolution) -> String {
    let detail = StoredDetail {
        identifiers: resolution
            .identifiers
            .iter()
            .map(|i| (i.kind.clone(), i.value.clone()))
            .collect(),
        dropped: resolution
            .dropped
            .iter()
            .map(|d| StoredDropped {
                kind: d.identifier.kind.clone(),
                value: d.identifier.value.clone(),
                reason: d.reason.clone(),
            })
            .collect(),
        event_time: Some(resolution.event_time),
    };
    // Plain strings cannot fail to serialize.
    serde_json::to_string(&detail).unwrap_or_else(|_| "null".to_owned())
}

fn decode_detail(event_id: &str, json: Option<&str>) -> Result<Option<Detail>, IdentityError> {
    let Some(json) = json else {
        return Ok(None);
    };
    let stored: Option<StoredDetail> = serde_json::from_str(json)
        .map_err(|e| IdentityError::Corrupt(format!("resolutions.detail of an event: {e}")))
        .inspect_err(|_| tracing::error!(event_id, "undecodable stored detail"))?;
    Ok(stored.map(|d| Detail {
        identifiers: d
            .identifiers
            .into_iter()
            .map(|(kind, value)| Identifier { kind, value })
            .collect(),
        dropped: d
            .dropped
            .into_iter()
            .map(|d| Dropped {
                identifier: Identifier {
                    kind: d.kind,
                    value: d.value,
                },
                reason: d.reason,
            })
            .collect(),
        event_time: d.event_time,
    }))
}

/// The rules as stored in `rules_versions`, comparable across replicas.
/// A component's history, as stored: what a replay needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentHistory {
    /// The canonical profile.
    pub root: Uuid,
    /// Every profile of the component (the root and all merged into it), oldest first.
    pub members: Vec<ProfileAge>,
    /// Its events and non-event merges, in the order they were decided.
    pub entries: Vec<HistoryEntry>,
}

/// What the stores read for a component's history, before it is put in order.
pub(crate) struct HistoryRows {
    pub(crate) root: Uuid,
    /// Members and when each was created.
    pub(crate) members: Vec<(Uuid, OffsetDateTime)>,
    /// (event id, profile created) of the graph log's create decisions.
    pub(crate) creates: Vec<(String, Uuid)>,
    /// The component's resolutions, decoded.
    pub(crate) resolutions: Vec<HistoryResolution>,
    /// (merged, survivor, cause, rule, decided at, log seq) of merges outside the pipeline.
    pub(crate) merges: Vec<(Uuid, Uuid, String, String, OffsetDateTime, i64)>,
    /// Identifiers the component's events carried but did not link that belong to profiles
    /// of other components (see [`dropped_identifiers`]).
    pub(crate) foreign: HashSet<Identifier>,
}

/// One resolution of a component, as a replay needs it.
pub(crate) struct HistoryResolution {
    pub(crate) event_id: String,
    pub(crate) detail: Detail,
    pub(crate) resolved_at: OffsetDateTime,
    /// The order within the store (events of one transaction share `resolved_at`).
    pub(crate) order: i64,
}

/// Decodes stored resolutions rows (event id, detail JSON, resolved at, order), once.
/// `FailedPrecondition` for a resolution stored before details were kept: its component cannot
/// be replayed.
pub(crate) fn decode_resolutions(
    rows: Vec<(String, Option<String>, OffsetDateTime, i64)>,
) -> Result<Vec<HistoryResolution>, IdentityError> {
    rows.into_iter()
        .map(|(event_id, detail, resolved_at, order)| {
            let detail = decode_detail(&event_id, detail.as_deref())?.ok_or_else(|| {
                IdentityError::FailedPrecondition(format!(
                    "event {event_id} was resolved before resolutions kept their identifiers: \
                     its component cannot be replayed"
                ))
            })?;
            Ok(HistoryResolution {
                event_id,
                detail,
                resolved_at,
                order,
            })
        })
        .collect()
}

/// The identifiers the component's events did not link because of a rule that depends on the
/// graph (a limit, the shared rule, a split): the ones whose owners the store must look up,
/// so the history can leave out those held by other components. A replay of one component
/// never merges it with another, so such an identifier stays unlinked, as it was.
pub(crate) fn dropped_identifiers(resolutions: &[HistoryResolution]) -> Vec<Identifier> {
    let mut out: Vec<Identifier> = resolutions
        .iter()
        .flat_map(|r| &r.detail.dropped)
        .filter(|d| graph_dependent(&d.reason))
        .map(|d| d.identifier.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether a drop reason depends on the state of the graph (and may change in a replay).
fn graph_dependent(reason: &str) -> bool {
    reason.starts_with("limit:") || reason.starts_with("shared:") || split_apart(reason)
}

/// Puts a component's stored rows in the order they were decided: by time (resolution time for
/// events, decision time for merges), then events of one transaction in their order.
pub(crate) fn history(rows: HistoryRows) -> Result<ComponentHistory, IdentityError> {
    let created_at: HashMap<Uuid, OffsetDateTime> = rows.members.iter().copied().collect();
    let created: HashMap<String, ProfileAge> = rows
        .creates
        .into_iter()
        .filter_map(|(event, id)| {
            created_at.get(&id).map(|created_at| {
                (
                    event,
                    ProfileAge {
                        created_at: *created_at,
                        id,
                    },
                )
            })
        })
        .collect();
    let mut keyed: Vec<((OffsetDateTime, u8, i64), HistoryEntry)> = Vec::new();
    for HistoryResolution {
        event_id,
        detail,
        resolved_at,
        order,
    } in rows.resolutions
    {
        let event_time = detail.event_time.unwrap_or(resolved_at);
        // The identifiers the event could link: those it linked, and those a rule that
        // depends on the graph (a limit, the shared rule, a split) kept from linking, unless
        // another component holds them.
        let mut identifiers = detail.identifiers;
        identifiers.extend(
            detail
                .dropped
                .into_iter()
                .filter(|d| graph_dependent(&d.reason) && !rows.foreign.contains(&d.identifier))
                .map(|d| d.identifier),
        );
        let created = created.get(&event_id).copied();
        keyed.push((
            (resolved_at, 0, order),
            HistoryEntry::Event {
                record: Record::normalized(event_id, identifiers, event_time),
                created,
            },
        ));
    }
    for (merged, survivor, cause, rule, at, seq) in rows.merges {
        keyed.push((
            (at, 1, seq),
            HistoryEntry::Merge {
                pair: (survivor, merged),
                cause,
                rule,
                at,
            },
        ));
    }
    keyed.sort_by_key(|(key, _)| *key);
    let mut members: Vec<ProfileAge> = rows
        .members
        .into_iter()
        .map(|(id, created_at)| ProfileAge { created_at, id })
        .collect();
    members.sort();
    Ok(ComponentHistory {
        root: rows.root,
        members,
        entries: keyed.into_iter().map(|(_, entry)| entry).collect(),
    })
}

/// One entry of the merge outbox, in order: a merge, or a split (rule `split`, with its payload).
pub(crate) type Outboxed = (i64, Merge, Option<String>);

/// An identifier as stored in JSON: (type, value).
pub(crate) type TypedValue = (String, String);

/// A split as queued for the profile service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SplitPayload {
    /// Every profile of the former component and its canonical profile after the split.
    pub(crate) profiles: Vec<(Uuid, Uuid)>,
    /// Every event of the former component: its profile now and the identifiers it links.
    pub(crate) events: Vec<(String, Uuid, Vec<TypedValue>)>,
    /// The events erased with the identifiers they alone carried.
    #[serde(default)]
    pub(crate) erased_events: Vec<String>,
}

impl From<&Rewritten> for SplitPayload {
    fn from(u: &Rewritten) -> Self {
        Self {
            profiles: u.profiles.clone(),
            events: u
                .events
                .iter()
                .map(|(event, profile, ids)| {
                    (
                        event.clone(),
                        *profile,
                        ids.iter()
                            .map(|i| (i.kind.clone(), i.value.clone()))
                            .collect(),
                    )
                })
                .collect(),
            erased_events: u.erased_events.clone(),
        }
    }
}

/// What rewrites a component of the graph from its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// Revert the merge of this profile into the one it was merged into.
    Unmerge(Uuid),
    /// Split this identifier (normalized) off its profile: it keeps the events that carry
    /// nothing else, and never links with another identifier again.
    Detach(Identifier),
    /// Erase this identifier (normalized): out of every event, the graph and the graph log,
    /// never linked again; the events that carried nothing else are erased with it.
    Erase(Identifier),
}

impl Change {
    /// The rule the change is logged under.
    pub(crate) fn rule(&self) -> &'static str {
        match self {
            Self::Unmerge(_) => SPLIT,
            Self::Detach(_) => "detach",
            Self::Erase(_) => "erase",
        }
    }
}

/// What forgetting a person forgot: the answer of the first call, repeated by later ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forgotten {
    /// The component's canonical profile.
    pub root: Uuid,
    /// Every profile of the component (the canonical one included), sorted.
    pub profiles: Vec<Uuid>,
    /// Every event that was resolved to the component, sorted.
    pub events: Vec<String>,
    /// How many identifiers were forgotten.
    pub identifiers: u64,
}

impl Forgotten {
    /// What a forget of `root`'s component reports, in the order it is answered.
    pub(crate) fn new(
        root: Uuid,
        mut profiles: Vec<Uuid>,
        mut events: Vec<String>,
        identifiers: usize,
    ) -> Self {
        profiles.sort_unstable();
        profiles.dedup();
        events.sort_unstable();
        events.dedup();
        Self {
            root,
            profiles,
            events,
            identifiers: u64::try_from(identifiers).unwrap_or(u64::MAX),
        }
    }

    /// The answer as kept on the root's `forgotten_profiles` row.
    pub(crate) fn encode(&self) -> String {
        // Uuids, strings and a number always serialize.
        serde_json::to_string(self).unwrap_or_else(|_| "null".to_owned())
    }

    /// The answer kept on a root's `forgotten_profiles` row.
    pub(crate) fn decode(json: &str) -> Result<Self, IdentityError> {
        serde_json::from_str(json)
            .map_err(|e| IdentityError::Corrupt(format!("forgotten_profiles.answer: {e}")))
    }
}

/// `detail` (a resolution's stored detail) without the dropped identifiers of `erased`: `None`
/// when it names none of them (nothing to rewrite).
pub(crate) fn scrub_detail(detail: &str, erased: &HashSet<Identifier>) -> Option<String> {
    let mut stored: StoredDetail = serde_json::from_str(detail).ok()?;
    let before = stored.dropped.len();
    stored.dropped.retain(|d| {
        !erased.contains(&Identifier {
            kind: d.kind.clone(),
            value: d.value.clone(),
        })
    });
    if stored.dropped.len() == before {
        return None;
    }
    serde_json::to_string(&stored).ok()
}

/// The digest an erased identifier is remembered by (hex SHA-256 of its type and value).
pub(crate) fn erased_digest(identifier: &Identifier) -> String {
    use sha2::{Digest as _, Sha256};
    let mut hash = Sha256::new();
    hash.update(identifier.kind.as_bytes());
    hash.update([0]);
    hash.update(identifier.value.as_bytes());
    // Into a buffer, then one copy: `hex::encode` builds its String a char at a time, which
    // showed in a resolution's profile (every identifier of every call is digested).
    let mut digits = [0u8; 64];
    hex::encode_to_slice(hash.finalize(), &mut digits).expect("32 bytes are 64 hex digits");
    std::str::from_utf8(&digits)
        .expect("hex digits are ASCII")
        .to_owned()
}

/// What replaces an erased identifier's value in the graph log: a pseudonym that keeps the
/// log's entries about it related without holding the value.
pub(crate) fn erased_pseudonym(identifier: &Identifier) -> String {
    let digest = erased_digest(identifier);
    format!("erased:{}", &digest[..16])
}

/// What a rewrite of a component did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The component's canonical profile before the rewrite; `None` when an erased identifier
    /// belonged to no profile.
    pub root: Option<Uuid>,
    /// An unmerge: the profile split off, live again. Splitting an identifier off: the profile
    /// that holds it now (`None` when no event carried it alone). An erasure: `None`.
    pub profile: Option<Uuid>,
    /// An unmerge: the profile it had been merged into.
    pub survivor: Option<Uuid>,
    /// Every profile of the former component and its canonical profile after the rewrite (a
    /// profile left with no event is its own, empty).
    pub profiles: Vec<(Uuid, Uuid)>,
    /// Every event of the former component: its canonical profile after the rewrite and the
    /// identifiers it links now.
    pub events: Vec<(String, Uuid, Vec<Identifier>)>,
    /// The events erased with the identifiers they alone carried.
    pub erased_events: Vec<String>,
}

impl Rewritten {
    /// A rewrite that found no component (an erased identifier no profile held).
    pub(crate) fn nothing() -> Self {
        Self {
            root: None,
            profile: None,
            survivor: None,
            profiles: Vec::new(),
            events: Vec::new(),
            erased_events: Vec::new(),
        }
    }

    /// The events that belong to another profile than the component's former canonical one.
    pub fn events_moved(&self) -> usize {
        self.events
            .iter()
            .filter(|(_, profile, _)| Some(*profile) != self.root)
            .count()
    }
}

/// What a rewrite writes, from its replay: the profiles the replay created that did not exist,
/// every identifier, standing merge and sighting of the component, and only the decisions the
/// rewrite itself caused, with the creation of its new profiles (the rest of the replay repeats
/// decisions already in the log). The
/// resolutions are rewritten separately (they exist).
pub(crate) fn rewrite_plan(
    replay: &Replay,
    members: &HashSet<Uuid>,
    (change, root, survivor): (&Change, Uuid, Option<Uuid>),
    reason: &str,
    now: OffsetDateTime,
) -> Plan {
    let detail = Some(serde_json::json!({ "reason": reason }).to_string());
    // The change itself first, then the drops it caused.
    let change = match change {
        Change::Unmerge(merged) => Decision {
            kind: DecisionKind::Split,
            event_id: format!("unmerge:{merged}"),
            profile_id: *merged,
            other_profile_id: survivor,
            identifier: None,
            rule: SPLIT.to_owned(),
            event_time: now,
            detail,
        },
        Change::Detach(identifier) => Decision {
            kind: DecisionKind::Split,
            event_id: format!("detach:{}:{}", identifier.kind, identifier.value),
            profile_id: root,
            other_profile_id: replay.owners.get(identifier).copied(),
            identifier: Some(identifier.clone()),
            rule: "detach".to_owned(),
            event_time: now,
            detail,
        },
        Change::Erase(identifier) => Decision {
            kind: DecisionKind::Split,
            event_id: format!("erase:{}", identifier.kind),
            profile_id: root,
            other_profile_id: None,
            identifier: Some(Identifier {
                kind: identifier.kind.clone(),
                value: erased_pseudonym(identifier),
            }),
            rule: "erase".to_owned(),
            event_time: now,
            detail,
        },
    };
    replayed_plan(replay, members, change, |d| split_apart(&d.rule))
}

/// What a replay writes back: the replayed membership (profiles new to the component,
/// identifiers, merges, sightings) and, in the graph log, `change` followed by the replay's
/// decisions that `keep` selects and the creation of the profiles it made (logged with the
/// event that created them, so a later replay creates them again).
fn replayed_plan(
    replay: &Replay,
    members: &HashSet<Uuid>,
    change: Decision,
    keep: impl Fn(&Decision) -> bool,
) -> Plan {
    Plan {
        resolutions: Vec::new(),
        new_profiles: replay
            .plan
            .new_profiles
            .iter()
            .filter(|p| !members.contains(&p.id))
            .copied()
            .collect(),
        new_identifiers: replay.plan.new_identifiers.clone(),
        merges: replay.plan.merges.clone(),
        sightings: replay.plan.sightings.clone(),
        decisions: std::iter::once(change)
            .chain(
                replay
                    .plan
                    .decisions
                    .iter()
                    .filter(|d| {
                        keep(d)
                            || (d.kind == DecisionKind::Create && !members.contains(&d.profile_id))
                    })
                    .cloned(),
            )
            .collect(),
    }
}

/// The outcome of a rewrite's replay, as reported.
pub(crate) fn rewritten(
    (change, root, survivor): (&Change, Uuid, Option<Uuid>),
    members: &HashSet<Uuid>,
    replay: &Replay,
) -> Rewritten {
    // Every member, and every profile the replay made; a member no event recreated is its own,
    // empty.
    let mut profiles: Vec<(Uuid, Uuid)> = replay.canonical.iter().map(|(a, b)| (*a, *b)).collect();
    profiles.extend(
        members
            .iter()
            .filter(|m| !replay.canonical.contains_key(m))
            .map(|m| (*m, *m)),
    );
    profiles.sort();
    let events = replay
        .plan
        .resolutions
        .iter()
        .map(|r| {
            (
                r.event_id.clone(),
                replay
                    .events
                    .get(&r.event_id)
                    .copied()
                    .unwrap_or(r.profile_id),
                r.identifiers.clone(),
            )
        })
        .collect();
    let profile = match change {
        Change::Unmerge(merged) => Some(*merged),
        Change::Detach(identifier) => replay.owners.get(identifier).copied(),
        Change::Erase(_) => None,
    };
    Rewritten {
        root: Some(root),
        profile,
        survivor,
        profiles,
        events,
        erased_events: replay.erased_events.clone(),
    }
}

/// The rule a re-resolution in event-time order is logged under.
pub(crate) const EVENT_TIME: &str = "event_time";

/// The records of a written plan that may have arrived late: those that took a decision that
/// depends on arrival order (a limit, protection or the shared rule dropped one of their
/// identifiers), under rules that have such decisions. Only for these does a store look
/// further (their component's history); every other record costs nothing more. Returns each
/// one's event id, time and the identifiers it carried (linked or dropped by a rule).
pub(crate) fn late_suspects(
    rules: &Rules,
    plan: &Plan,
) -> Vec<(String, OffsetDateTime, Vec<Identifier>)> {
    if !rules.order_dependent() {
        return Vec::new();
    }
    plan.resolutions
        .iter()
        .filter(|r| !r.suppressed && r.dropped.iter().any(|d| order_sensitive_drop(&d.reason)))
        .map(|r| {
            let mut carried = r.identifiers.clone();
            carried.extend(
                r.dropped
                    .iter()
                    .filter(|d| graph_dependent(&d.reason))
                    .map(|d| d.identifier.clone()),
            );
            (r.event_id.clone(), r.event_time, carried)
        })
        .collect()
}

/// The identifiers a closure step follows from a set of components: every identifier their
/// events linked or did not link because of the graph.
pub(crate) fn carried_identifiers(rows: &HistoryRows) -> Vec<Identifier> {
    let mut out: Vec<Identifier> = rows
        .resolutions
        .iter()
        .flat_map(|r| {
            r.detail.identifiers.iter().cloned().chain(
                r.detail
                    .dropped
                    .iter()
                    .filter(|d| graph_dependent(&d.reason))
                    .map(|d| d.identifier.clone()),
            )
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether any event of `rows` happened after `at`: a record resolved at `at` then came late
/// to them (events stored without their time count at their resolution time, as a replay
/// orders them).
pub(crate) fn has_later_event(rows: &HistoryRows, at: OffsetDateTime) -> bool {
    rows.resolutions
        .iter()
        .any(|r| r.detail.event_time.unwrap_or(r.resolved_at) > at)
}

/// How large a closure was found to be, counted while it is followed. The counts stop just
/// past the bound: what lies beyond is not read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ClosureSize {
    /// Profiles, canonical and merged.
    pub(crate) profiles: u64,
    /// Events (stored resolutions).
    pub(crate) events: u64,
    /// Distinct identifiers followed (the suspect's and those the closure's events carried).
    pub(crate) identifiers: u64,
}

impl ClosureSize {
    /// How many more profiles and events `bound` allows, plus one: the most the next step of
    /// the closure counts to tell whether it goes over.
    pub(crate) fn room(self, bound: ReorderConfig) -> (i64, i64) {
        let room = |max: u32, used: u64| {
            i64::try_from(u64::from(max).saturating_sub(used).saturating_add(1)).unwrap_or(i64::MAX)
        };
        (
            room(bound.max_profiles, self.profiles),
            room(bound.max_events, self.events),
        )
    }

    /// Whether the closure is larger than `bound` allows.
    pub(crate) fn over(self, bound: ReorderConfig) -> bool {
        self.profiles > u64::from(bound.max_profiles)
            || self.events > u64::from(bound.max_events)
            || self.identifiers > u64::from(bound.max_identifiers)
    }

    /// Adds a step's counts.
    pub(crate) fn add(&mut self, profiles: usize, events: i64) {
        self.profiles = self
            .profiles
            .saturating_add(u64::try_from(profiles).unwrap_or(u64::MAX));
        self.events = self
            .events
            .saturating_add(u64::try_from(events).unwrap_or(0));
    }
}

/// What following a late suspect's closure found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Closure<R> {
    /// The closure is within the bound: its canonical profiles (sorted), and whether one of its
    /// events happened after the suspect (it came late: the closure is replayed).
    Within { roots: Vec<R>, late: bool },
    /// The closure is larger than the bound: followed no further, never replayed. `late` is
    /// whether the part read, or an event that carried one of the suspect's identifiers,
    /// happened after it (else it may still be late to the part not read).
    TooLarge { size: ClosureSize, late: bool },
}

/// Records that a suspect's closure was too large to re-resolve: the arrival-order outcome
/// stands. Counted in `tessera_identity_reorder_skipped_total` (`late="yes"` when the suspect
/// is known to have come late, with a warning; `late="unchecked"` when the part of the
/// closure read holds nothing later, so it is most likely in order).
pub(crate) fn reorder_skipped(event_id: &str, size: ClosureSize, bound: ReorderConfig, late: bool) {
    if late {
        tracing::warn!(
            event_id,
            profiles = size.profiles,
            events = size.events,
            identifiers = size.identifiers,
            max_profiles = bound.max_profiles,
            max_events = bound.max_events,
            max_identifiers = bound.max_identifiers,
            "late record's closure is over the reorder bound, keeping the arrival-order outcome"
        );
    } else {
        tracing::debug!(
            event_id,
            profiles = size.profiles,
            events = size.events,
            identifiers = size.identifiers,
            "record's closure is over the reorder bound, not checked for lateness"
        );
    }
    let late = if late { "yes" } else { "unchecked" };
    metrics::counter!("tessera_identity_reorder_skipped_total", "late" => late).increment(1);
}

/// The order a rewrite replays `history` in: by event time when the rules make outcomes
/// depend on order (the graph is kept as resolving by event time leaves it), else as resolved.
pub(crate) fn replay_order(rules: &Rules, history: &ComponentHistory) -> Vec<HistoryEntry> {
    if rules.order_dependent() {
        in_event_time_order(&history.entries)
    } else {
        history.entries.clone()
    }
}

/// Replays a closure's history in event-time order: the graph the closure is rewritten to
/// after a late record. Always written (the stored graph holds the late record as it arrived).
pub(crate) fn reorder(
    rules: &Rules,
    history: &ComponentHistory,
    constraints: &Constraints,
    now: OffsetDateTime,
) -> Replay {
    replay(
        rules,
        &in_event_time_order(&history.entries),
        constraints,
        now,
        Uuid::now_v7,
    )
}

/// What a re-resolution in event-time order writes, from its replay: like [`rewrite_plan`],
/// the whole replayed membership, and in the graph log one `split` decision (rule
/// `event_time`, caused by the late event), the drops the replay decided by a rule, and the
/// creation of the profiles it made.
pub(crate) fn reorder_plan(
    replay: &Replay,
    members: &HashSet<Uuid>,
    (root, late_event): (Uuid, &str),
    now: OffsetDateTime,
) -> Plan {
    let change = Decision {
        kind: DecisionKind::Split,
        event_id: late_event.to_owned(),
        profile_id: root,
        other_profile_id: None,
        identifier: None,
        rule: EVENT_TIME.to_owned(),
        event_time: now,
        detail: Some(
            serde_json::json!({ "reason": "a late event: re-resolved in event-time order" })
                .to_string(),
        ),
    };
    // The drops stay findable by identifier: a later late event follows them to this
    // component.
    replayed_plan(replay, members, change, |d| {
        d.kind == DecisionKind::Drop && graph_dependent(&d.rule)
    })
}

/// What a re-resolution in event-time order did, as queued for the profile service.
pub(crate) fn reordered(root: Uuid, members: &HashSet<Uuid>, replay: &Replay) -> Rewritten {
    let mut out = rewritten((&Change::Unmerge(root), root, None), members, replay);
    out.profile = None;
    out
}

/// `plan`'s resolutions with those of the events a re-resolution replayed replaced by the
/// replay's, each naming its profile at the end.
pub(crate) fn with_replayed(plan: &mut Plan, replayed: &Replay) {
    let by_event: HashMap<&str, &Resolution> = replayed
        .plan
        .resolutions
        .iter()
        .map(|r| (r.event_id.as_str(), r))
        .collect();
    for r in &mut plan.resolutions {
        if let Some(again) = by_event.get(r.event_id.as_str()) {
            *r = (*again).clone();
            if let Some(profile) = replayed.events.get(&r.event_id) {
                r.profile_id = *profile;
            }
        }
    }
}

/// The distinct identifiers of `records`, each with the digest it would be erased under: what
/// a resolution looks up among the detached and the erased identifiers.
pub(crate) fn suppression_keys<'r>(records: &[&'r Record]) -> Vec<(&'r Identifier, String)> {
    let mut ids: Vec<&Identifier> = records.iter().flat_map(|r| r.identifiers()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter().map(|i| (i, erased_digest(i))).collect()
}

/// Marks in `view` the rows (type, value, erased, suppresses) a resolution read: detached
/// identifiers, erased ones, and erased ones that suppress whole events (a forgotten person's).
pub(crate) fn mark_suppressed(view: &mut GraphView, rows: Vec<(String, String, bool, bool)>) {
    for (kind, value, erased, suppresses) in rows {
        let identifier = Identifier { kind, value };
        match (erased, suppresses) {
            (true, true) => view.suppress(identifier),
            (true, false) => view.erase(identifier),
            (false, _) => view.detach(identifier),
        }
    }
}

/// The identifiers of `records` whose owners and sightings a resolution reads: those of the
/// records `view` does not suppress, without the erased ones.
pub(crate) fn lookup_identifiers(view: &GraphView, records: &[&Record]) -> Vec<Identifier> {
    let mut out: Vec<Identifier> = records
        .iter()
        .filter_map(|r| view.screen(r))
        .flat_map(|r| r.identifiers().to_vec())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The canonical profiles a run must lock `FOR UPDATE`, and read the limited identifiers of:
/// those holding an identifier of a record that may change the graph. `owner` gives the
/// canonical profile holding an identifier, if the graph holds it. Sorted, without repeats.
///
/// A record whose identifiers the graph all holds, in one profile, creates, links and merges
/// nothing (it breaks no limit: it adds no value), so it needs neither that profile's limited
/// identifiers nor a lock on its row: it only names the profile. Its advisory locks keep its
/// identifiers where they are until the commit (every writer that moves an identifier, a
/// rewrite or a forget, takes them), and a merge of the profile by another run meanwhile does
/// not change its answer, because readers follow `merged_into`. Most events of known visitors
/// are such records, so the row locks (a tuple lock written per profile) and the limited read
/// are paid only for the records that link or merge.
pub(crate) fn profiles_to_lock(
    view: &GraphView,
    records: &[&Record],
    owner: impl Fn(&Identifier) -> Option<Uuid>,
) -> Vec<Uuid> {
    let mut out: Vec<Uuid> = Vec::new();
    for record in records.iter().filter_map(|r| view.screen(r)) {
        let owners: Vec<Option<Uuid>> = record.identifiers().iter().map(&owner).collect();
        let settled = owners
            .first()
            .is_some_and(|first| first.is_some() && owners.iter().all(|o| o == first));
        if !settled {
            out.extend(owners.into_iter().flatten());
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The identifiers a component's history carries (to look up which are detached).
pub(crate) fn history_identifiers(history: &ComponentHistory) -> Vec<&Identifier> {
    let mut out: Vec<&Identifier> = history
        .entries
        .iter()
        .flat_map(|entry| match entry {
            HistoryEntry::Event { record, .. } => record.identifiers(),
            HistoryEntry::Merge { .. } => &[],
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A stored match model.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredModel {
    pub(crate) version: i64,
    /// The parameters, as `ModelParams` serializes.
    pub(crate) params: String,
    /// The training report, as `TrainingSummary` serializes.
    pub(crate) report: String,
    pub(crate) trained_at: OffsetDateTime,
}

/// A stored rules version.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredRules {
    pub(crate) version: i64,
    /// The rules, as `RulesConfig` serializes.
    pub(crate) rules: serde_json::Value,
}

/// What registering a config's rules does, given the latest version and the rules last
/// registered from config: `Ok` keeps the latest version, `Err` adds `json` as the next one.
fn registration(
    json: &serde_json::Value,
    latest: Option<StoredRules>,
    last_from_config: Option<&serde_json::Value>,
) -> Result<StoredRules, i64> {
    match latest {
        Some(latest) if last_from_config == Some(json) => Ok(latest),
        latest => Err(latest.map_or(1, |l| l.version + 1)),
    }
}

/// The version an `UpdateRules` to `json` adds, given the latest version: `None` when `json`
/// is the latest version's rules (nothing to add); `FailedPrecondition` when the latest
/// version is not `expected`.
fn next_api_version(
    json: &serde_json::Value,
    latest: Option<&StoredRules>,
    expected: Option<i64>,
) -> Result<Option<i64>, IdentityError> {
    let current = latest.map_or(0, |l| l.version);
    if let Some(expected) = expected
        && expected != current
    {
        return Err(IdentityError::FailedPrecondition(format!(
            "the rules changed meanwhile: version {current} is current, not {expected}"
        )));
    }
    Ok(match latest {
        Some(latest) if latest.rules == *json => None,
        _ => Some(current + 1),
    })
}

fn rules_json(config: &RulesConfig) -> serde_json::Value {
    serde_json::to_value(config).unwrap_or(serde_json::Value::Null)
}

fn encode_merges(merges: &[Merge]) -> String {
    let stored: Vec<StoredMerge> = merges
        .iter()
        .map(|m| StoredMerge {
            surviving: m.surviving_profile_id,
            merged: m.merged_profile_id,
            cause: m.cause_event_id.clone(),
            at: m.merged_at,
            rule: m.rule.clone(),
        })
        .collect();
    // Serializing plain strings, uuids and valid times cannot fail.
    serde_json::to_string(&stored).unwrap_or_else(|_| "[]".to_owned())
}

fn decode_merges(event_id: &str, json: &str) -> Result<Vec<Merge>, IdentityError> {
    let stored: Vec<StoredMerge> = serde_json::from_str(json)
        .map_err(|e| IdentityError::Corrupt(format!("resolutions.merges of an event: {e}")))
        .inspect_err(|_| tracing::error!(event_id, "undecodable stored merges"))?;
    Ok(stored
        .into_iter()
        .map(|m| Merge {
            surviving_profile_id: m.surviving,
            merged_profile_id: m.merged,
            cause_event_id: m.cause,
            merged_at: m.at,
            rule: m.rule,
        })
        .collect())
}

/// One entry per record: the stored resolution of an event resolved before, else the fresh
/// resolution of the plan (whose resolutions are those of the other records, in order).
/// Counts them by outcome (`tessera_identity_records_total`).
fn outcomes(
    records: &[&Record],
    mut done: HashMap<String, Stored>,
    fresh: Vec<Resolution>,
) -> Vec<Outcome> {
    let suppressed = fresh.iter().filter(|r| r.suppressed).count();
    metrics::counter!("tessera_identity_records_total", "outcome" => "replayed")
        .increment(done.len() as u64);
    metrics::counter!("tessera_identity_records_total", "outcome" => "resolved")
        .increment((fresh.len() - suppressed) as u64);
    metrics::counter!("tessera_identity_records_total", "outcome" => "suppressed")
        .increment(suppressed as u64);
    let mut fresh = fresh.into_iter();
    records
        .iter()
        .filter_map(|record| match done.remove(record.event_id()) {
            Some(stored) => Some(Outcome::Stored(stored)),
            None => fresh.next().map(|r| {
                if r.suppressed {
                    return Outcome::Suppressed;
                }
                Outcome::Stored(Stored {
                    profile_id: r.profile_id,
                    detail: Some(Detail {
                        identifiers: r.identifiers,
                        dropped: r.dropped,
                        event_time: Some(r.event_time),
                    }),
                    merges: r.merges,
                })
            }),
        })
        .collect()
}

/// Counts what a written plan changed.
fn record_metrics(plan: &Plan) {
    metrics::counter!("tessera_identity_profiles_created_total")
        .increment(plan.new_profiles.len() as u64);
    metrics::counter!("tessera_identity_identifiers_linked_total")
        .increment(plan.new_identifiers.len() as u64);
    metrics::counter!("tessera_identity_merges_total").increment(plan.merges.len() as u64);
    let dropped = plan
        .resolutions
        .iter()
        .map(|r| r.dropped.len())
        .sum::<usize>();
    metrics::counter!("tessera_identity_identifiers_dropped_total").increment(dropped as u64);
}

/// A valid record of `event` carrying `ids` (type, value), at the current time.
#[cfg(test)]
pub(crate) fn test_record(
    rules: &crate::domain::Rules,
    event: &str,
    ids: &[(&str, &str)],
) -> Record {
    Record::new(
        rules,
        event,
        ids.iter().map(|(k, v)| Identifier::new(*k, *v)).collect(),
        now(),
    )
    .expect("valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_round_trip_through_json() {
        let merges = vec![Merge {
            surviving_profile_id: Uuid::from_u128(1),
            merged_profile_id: Uuid::from_u128(2),
            cause_event_id: "e1".into(),
            merged_at: now(),
            rule: SEEN_TOGETHER.into(),
        }];
        assert_eq!(
            decode_merges("e1", &encode_merges(&merges)).unwrap(),
            merges
        );
        assert!(matches!(
            decode_merges("e1", "{"),
            Err(IdentityError::Corrupt(_))
        ));
    }

    /// Erased identifiers are stored as these digests: a build that computed them otherwise
    /// would no longer find (and suppress) the identifiers erased before it.
    #[test]
    fn erased_digests_are_pinned() {
        let identifier = Identifier::new("email", "ann@example.com");
        assert_eq!(
            erased_digest(&identifier),
            // sha256 of "email\0ann@example.com", in lower-case hex
            "bd704a8b9d29ae0047432985803f45b7cdc6b04a838195aeca7fa9156abceb03"
        );
        assert_eq!(erased_pseudonym(&identifier), "erased:bd704a8b9d29ae00");
    }

    /// Only records that may link or merge lock profiles: one whose identifiers one profile
    /// all holds locks nothing; one with an unknown identifier locks the profiles of its known
    /// ones; one whose identifiers two profiles hold locks both; an erased identifier is not
    /// looked at.
    #[test]
    fn only_records_that_may_change_the_graph_lock_profiles() {
        let rules = crate::domain::Rules::default();
        let record = |event: &str, ids: &[(&str, &str)]| test_record(&rules, event, ids);
        let (p, q) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let owner = |i: &Identifier| match i.value.as_str() {
            "a1" | "u1" => Some(p),
            "a2" | "u2" => Some(q),
            _ => None,
        };
        let known = record("e1", &[("anonymous_id", "a1"), ("user_id", "u1")]);
        let alone = record("e2", &[("anonymous_id", "a2")]);
        let linking = record("e3", &[("anonymous_id", "a2"), ("user_id", "u9")]);
        let merging = record("e4", &[("anonymous_id", "a1"), ("user_id", "u2")]);
        let new = record("e5", &[("anonymous_id", "a9")]);
        let view = GraphView::new();
        assert!(profiles_to_lock(&view, &[&known, &alone, &new], owner).is_empty());
        assert_eq!(profiles_to_lock(&view, &[&known, &linking], owner), [q]);
        assert_eq!(profiles_to_lock(&view, &[&merging, &known], owner), [p, q]);
        let mut erased = GraphView::new();
        erased.erase(Identifier::new("user_id", "u2"));
        assert!(
            profiles_to_lock(&erased, &[&merging], owner).is_empty(),
            "without its erased user id the record is known to one profile"
        );
    }
}
