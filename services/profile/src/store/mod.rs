//! Storage of profiles: one [`ProfileStore`] trait with a Postgres and a SQLite implementation.
//!
//! Both backends run the same batch logic ([`apply`]) over a small set of per-backend
//! operations ([`Ops`]); only the SQL differs. On Postgres the live profiles a batch touches are
//! locked `FOR UPDATE` in sorted id order, so replicas on one database serialize per profile
//! without deadlocking in the common case; SQLite has one connection and so one writer.

mod postgres;
mod sqlite;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use tessera_core::Identifier;
use tessera_store::Database;
use time::OffsetDateTime;

use crate::account::{Account, Member};
use crate::audience::{Audiences, Facts};
use crate::catalog::TraitCatalog;
use crate::computed::ComputedTrait;
use crate::definitions::{SharedDefinitions, StoredDefinition};
use crate::domain::{Batch, EventContent, Profile, ProfileState, Rules, Score, Split, Workspace};
use crate::error::ProfileError;

pub use crate::audience::Audiences as CompiledAudiences;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// The most hops a merge chain may take from a profile id to its live profile. Merges redirect
/// every profile that pointed at the merged one, so chains stay one hop long in practice.
const MAX_MERGE_HOPS: i64 = 64;

/// How often a batch re-resolves profiles that were merged away while it was locking them
/// before giving up with a retryable error.
const MAX_LOCK_ROUNDS: usize = 8;

/// What applying a batch changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Events applied for the first time.
    pub applied: i64,
    /// Events skipped because they had been applied before (or appeared twice in the batch).
    pub duplicates: i64,
    /// The live profiles written (changed or rescored), as stored after the batch.
    pub changed: Vec<Profile>,
    /// The profiles (live and merged away) whose state the batch's events and merges changed;
    /// a profile only rescored is not among them.
    pub state_changed: BTreeSet<String>,
    /// The profiles merged away by the batch, with their new version.
    pub merged_away: Vec<(String, i64)>,
    /// The live profiles the batch's ids resolve to after its merges, sorted.
    pub named: Vec<String>,
    /// The entries into and exits from audiences the batch caused.
    pub audiences: Vec<MembershipChange>,
    /// The encoded `tessera.profile.v1.Profile` of profiles of `changed`, by id, with their
    /// version: the bodies of the versions the batch kept (evaluated at the batch's `now`),
    /// when the definitions keep history. The cache entry reuses it instead of encoding the
    /// profile again.
    pub encoded: HashMap<String, (i64, bytes::Bytes)>,
}

/// Scores profiles inside the transaction that applies a batch, so a profile's state and its
/// scores are written together (one write, one version) and no batch is applied unscored.
#[async_trait]
pub trait Scorer: Send + Sync {
    /// The new scores of each of `profiles` (live, as the batch left them), in order;
    /// `accounts` holds the accounts they belong to, by id, as the batch left them.
    async fn score(
        &self,
        profiles: &[&Profile],
        accounts: &Accounts,
        now: OffsetDateTime,
    ) -> Result<Vec<Vec<Score>>, ProfileError>;

    /// The new scores of each of `accounts` (with their members, as the batch left them), in
    /// order: one per account-level plan. `None` when this scorer does not score accounts
    /// (they keep the scores they have).
    async fn score_accounts(
        &self,
        _accounts: &[(Account, Vec<Member>)],
        _now: OffsetDateTime,
    ) -> Result<Option<Vec<Vec<Score>>>, ProfileError> {
        Ok(None)
    }
}

/// Accounts by id.
pub type Accounts = HashMap<String, Account>;

/// The values of the declared account computed traits, by account id, with until when those
/// the audiences read hold (`None`: until the account's members or their events change).
pub type AccountValues = HashMap<
    String,
    (
        BTreeMap<String, crate::computed::ComputedValue>,
        Option<OffsetDateTime>,
    ),
>;

/// The most members of one account a refresh re-evaluates in one transaction: a larger
/// account is refreshed a chunk per transaction, resuming after the last member done.
pub const MEMBERS_PER_REFRESH: usize = 500;

/// One queued account refresh (a row of `account_refreshes`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct QueuedRefresh {
    /// Its place in the queue.
    pub(crate) position: i64,
    /// The account.
    pub(crate) account_id: String,
    /// Whether the account's members are to be re-evaluated.
    pub(crate) members: bool,
    /// With `members`, the last member (in profile id order) already re-evaluated by this
    /// refresh: it resumes after it. `None`: from the first.
    pub(crate) after_profile_id: Option<String>,
    /// Whether the account itself is to be rescored.
    pub(crate) rescore: bool,
}

/// What the queued refreshes of one account ask for, together.
#[derive(Debug, Default)]
struct Wanted<'a> {
    /// Rescore the account.
    rescore: bool,
    /// Re-evaluate its members after this one (`Some(None)`: all of them).
    members: Option<Option<&'a str>>,
}

impl<'a> Wanted<'a> {
    /// Adds what `row` asks for: the members after the earliest point any row asks for.
    fn add(&mut self, row: &'a QueuedRefresh) {
        self.rescore |= row.rescore;
        if row.members {
            let after = row.after_profile_id.as_deref();
            self.members = Some(match self.members {
                None => after,
                Some(current) => current.min(after),
            });
        }
    }
}

/// The profiles a transaction is about to write (live and merged away), by id: account folds
/// read them instead of the stored rows, so a merge or an unmerge of the same write counts.
type Pending<'a> = HashMap<&'a str, &'a Profile>;

/// The ids of the accounts `profiles` belong to.
fn account_ids(profiles: &[&Profile]) -> BTreeSet<String> {
    profiles
        .iter()
        .flat_map(|p| p.state.computed.accounts().map(|(id, _)| id.to_owned()))
        .collect()
}

/// The accounts `profiles` belong to, read through `ops` (inside the writing transaction, so
/// account traits the batch changed are read as changed).
async fn accounts_of<O: Ops>(ops: &mut O, profiles: &[&Profile]) -> Result<Accounts, sqlx::Error> {
    let ids: Vec<String> = account_ids(profiles).into_iter().collect();
    if ids.is_empty() {
        return Ok(Accounts::new());
    }
    Ok(ops
        .load_accounts(&ids)
        .await?
        .into_iter()
        .map(|a| (a.account_id.clone(), a))
        .collect())
}

/// A [`Scorer`] that scores nothing: profiles keep the scores they have.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoScores;

#[async_trait]
impl Scorer for NoScores {
    async fn score(
        &self,
        profiles: &[&Profile],
        _accounts: &Accounts,
        _now: OffsetDateTime,
    ) -> Result<Vec<Vec<Score>>, ProfileError> {
        Ok(vec![Vec::new(); profiles.len()])
    }
}

/// The system of record of profiles.
#[async_trait]
pub trait ProfileStore: Send + Sync + std::fmt::Debug {
    /// Applies a batch in one transaction: merges first, then each event not applied before,
    /// then `scorer` rescores every live profile the batch names (also when all its events
    /// were applied before, so a batch retried after a scoring failure gets its scores).
    /// Idempotent: applying the same batch again changes no state. A scoring failure fails
    /// the whole batch.
    async fn apply(
        &self,
        batch: &Batch,
        half_life_seconds: f64,
        now: OffsetDateTime,
        scorer: &dyn Scorer,
    ) -> Result<Applied, ProfileError>;

    /// The live profile `profile_id` resolves to (itself, or the profile it was merged into).
    async fn get(&self, profile_id: &str) -> Result<Option<Profile>, ProfileError> {
        Ok(self
            .get_resolved(&[profile_id.to_owned()])
            .await?
            .remove(profile_id))
    }

    /// The live profile each of `profile_ids` resolves to, by the id asked for (ids that name
    /// no stored profile are absent): [`ProfileStore::get`] of many ids at once.
    async fn get_resolved(
        &self,
        profile_ids: &[String],
    ) -> Result<HashMap<String, Profile>, ProfileError>;

    /// The live profiles among `profile_ids`, as stored (merged ones are left out).
    async fn get_many(&self, profile_ids: &[String]) -> Result<Vec<Profile>, ProfileError>;

    /// At most `limit` live profiles with ids after `after` (from the first when `None`), in
    /// id order: a scan for searches.
    async fn scan(&self, after: Option<&str>, limit: usize) -> Result<Vec<Profile>, ProfileError>;

    /// Splits merged profiles (an unmerge) in one transaction: every profile of the component
    /// is rebuilt from the events that belong to it now, as if the reverted merge had never
    /// happened; identifiers follow their events; the live profiles are rescored by `scorer`.
    /// `NotRebuildable` when an event of the component was applied before event contents were
    /// kept.
    async fn split(
        &self,
        split: &Split,
        half_life_seconds: f64,
        now: OffsetDateTime,
        scorer: &dyn Scorer,
    ) -> Result<Applied, ProfileError>;

    /// Re-evaluates at most `limit` live profiles whose computed values changed by `now`
    /// without a new event (their `valid_until` passed): drops what left their windows, brings
    /// their audience memberships up to date and writes them at a new version. Replicas share
    /// the work (rows locked by one are skipped by the others). Returns the profiles written
    /// and the membership changes.
    async fn sweep(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<(Vec<Profile>, Vec<MembershipChange>), ProfileError>;

    /// At most `limit` changes after `after`, in stream order: only changes no transaction
    /// still running can precede, so a change never appears before a position already read.
    async fn changes_after(
        &self,
        after: ChangeCursor,
        limit: usize,
    ) -> Result<Vec<ProfileChange>, ProfileError>;

    /// The position of the latest change that can be read now (the start of a stream that
    /// wants only new changes).
    async fn change_horizon(&self) -> Result<ChangeCursor, ProfileError>;

    /// Deletes the changes written before `before`; returns how many.
    async fn prune_changes(&self, before: OffsetDateTime) -> Result<u64, ProfileError>;

    /// The encoded profile `profile_id` resolved to at `at`, as it was written last before
    /// then (following merges as they stood then); `None` when it did not exist yet (or its
    /// history was not kept).
    async fn profile_as_of(
        &self,
        profile_id: &str,
        at: OffsetDateTime,
    ) -> Result<Option<Vec<u8>>, ProfileError>;

    /// Deletes the versions superseded before `before` (each profile keeps its newest version
    /// older than `before`); returns how many.
    async fn prune_versions(&self, before: OffsetDateTime) -> Result<u64, ProfileError>;

    /// The members of `audience` (live profile ids, in order) after `after`, at most `limit`,
    /// and how many members it has.
    async fn audience_members(
        &self,
        audience: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, i64), ProfileError>;

    /// The events applied to any of `profile_ids` (a live profile and the profiles merged into
    /// it) that `query` selects, newest first (ties by event id, descending), at most
    /// `query.limit`. Events applied before contents were kept are not on the timeline.
    async fn timeline(
        &self,
        profile_ids: &[String],
        query: &TimelineQuery,
    ) -> Result<Vec<TimelineEntry>, ProfileError>;

    /// Deletes a person's profiles for good (GDPR), in one transaction: `live`, the profiles
    /// of `component` (the identity service's component of it) and every profile merged into
    /// them here, with their identifiers, applied events, audience memberships, kept versions
    /// and logged changes. They are remembered as deleted (a batch that still names one skips
    /// it), and every audience exit and one `deleted` change for `live` are logged. Idempotent:
    /// deleting again deletes nothing more and logs nothing.
    /// Every profile id of the answer is owed a cache tombstone
    /// ([`ProfileStore::owed_purges`]) from the same transaction, also when deleting again.
    async fn delete(
        &self,
        live: &str,
        component: &[String],
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<Deleted, ProfileError>;

    /// Whether `profile_id` was deleted ([`ProfileStore::delete`]).
    async fn is_deleted(&self, profile_id: &str) -> Result<bool, ProfileError>;

    /// Starts recomputing every live profile from its events when the fingerprint of the
    /// definitions in effect ([`Definitions::fingerprint`] of config and the stored
    /// definitions, read in the same transaction) is not the one they were folded with (a
    /// store that never recorded one recomputes too). Returns whether a recompute is running.
    /// Safe from several replicas at once.
    async fn start_recompute(&self, now: OffsetDateTime) -> Result<bool, ProfileError>;

    /// Recomputes the next at most `limit` live profiles of a running recompute, in id order,
    /// in one transaction (each component rebuilt from its events as by an unmerge that moves
    /// nothing, rescored, logged as `updated`); a component holding events applied before
    /// contents were kept is left as it is. `None` when no recompute is running (or it has
    /// just finished, or it runs for definitions other than those in effect here, as in the
    /// middle of a rollout of another config). Replicas take turns.
    async fn recompute(
        &self,
        limit: usize,
        half_life_seconds: f64,
        now: OffsetDateTime,
        scorer: &dyn Scorer,
    ) -> Result<Option<Applied>, ProfileError>;

    /// The account `account_id` (a group id), when a group call named it.
    async fn account(&self, account_id: &str) -> Result<Option<Account>, ProfileError>;

    /// Moves the queued refreshes of the account queued longest ago (that no other transaction
    /// has taken) to the back of the queue, after its refresh failed, so one account that keeps
    /// failing never holds up the others; returns the account.
    async fn defer_account_refresh(
        &self,
        now: OffsetDateTime,
    ) -> Result<Option<String>, ProfileError>;

    /// The account computed traits of `account_id` at `now`, folded from every event of its
    /// members (and of the profiles merged into them): see [`Definitions::account_computed`].
    async fn account_computed(
        &self,
        account_id: &str,
        now: OffsetDateTime,
    ) -> Result<BTreeMap<String, crate::computed::ComputedValue>, ProfileError>;

    /// Re-evaluates the members of accounts whose traits changed (another member's group call
    /// changed them, or their account computed traits changed with another member's event, a
    /// member joining or leaving or a window passing, so the members' copies of the account
    /// traits, their audiences and their scores may be stale): takes up to `limit` queued
    /// account refreshes (each replica its own), and rescores and re-evaluates every member of
    /// those accounts in one transaction, as a batch without events naming them would. `None`
    /// when nothing is queued.
    async fn refresh_accounts(
        &self,
        limit: usize,
        half_life_seconds: f64,
        now: OffsetDateTime,
        scorer: &dyn Scorer,
    ) -> Result<Option<Applied>, ProfileError>;

    /// The members of `account_id`, one per live profile whose applied group calls named it,
    /// in profile id order.
    async fn account_members(&self, account_id: &str) -> Result<Vec<Member>, ProfileError>;

    /// Queues a refresh of at most `limit` accounts whose windowed account computed traits
    /// changed by `now` without a new event (the time stored at their last rescore passed),
    /// each once: a rescore of the account, which stores their next such time, and of its
    /// members when they read account computed traits
    /// ([`Definitions::members_read_account_computed`]: person plans' scores). Replicas share
    /// the work (accounts locked by one are skipped by the others). Returns the accounts
    /// queued.
    async fn expire_accounts(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<String>, ProfileError>;

    /// Records that the identifier cache's epoch must be raised once a write that moves
    /// identifiers (a split, a deletion) has ended: called before the write, so a crash
    /// between the write and the raise leaves the raise owed. Returns the raise's id.
    async fn record_identifier_raise(&self, now: OffsetDateTime) -> Result<i64, ProfileError>;

    /// Marks the raise `id` due: the write it was recorded for has ended (committed or not).
    async fn identifier_raise_due(&self, id: i64, now: OffsetDateTime) -> Result<(), ProfileError>;

    /// The raises still owed, and the highest epoch a raise reached the cache with. A raise
    /// recorded before `abandoned_before` and never marked due (its writer crashed) is due.
    async fn identifier_raises(
        &self,
        abandoned_before: OffsetDateTime,
    ) -> Result<IdentifierRaises, ProfileError>;

    /// Forgets the raises `ids`, covered by a raise of the cache's epoch to `epoch` that
    /// started after they were due, and keeps `epoch` as the floor if it is higher.
    async fn finish_identifier_raises(&self, ids: &[i64], epoch: i64) -> Result<(), ProfileError>;

    /// The deleted profiles whose cache entry is owed a tombstone ([`ProfileStore::delete`]
    /// records them in its transaction), at most `limit`, in id order.
    async fn owed_purges(&self, limit: usize) -> Result<Vec<String>, ProfileError>;

    /// Forgets the owed purges of `profile_ids`: the cache holds their tombstones. Forgetting
    /// twice (two replicas purged them) changes nothing.
    async fn finish_purges(&self, profile_ids: &[String]) -> Result<(), ProfileError>;
}

/// The identifier cache's owed epoch raises ([`ProfileStore::identifier_raises`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentifierRaises {
    /// Every raise owed, due or not.
    pub owed: Vec<i64>,
    /// The owed raises whose write has ended: a raise of the cache's epoch started now covers
    /// them.
    pub due: Vec<i64>,
    /// The highest epoch a raise reached the cache with.
    pub floor: i64,
}

/// What [`ProfileStore::delete`] deleted.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Deleted {
    /// Every profile id deleted (or found deleted), sorted.
    pub profile_ids: Vec<String>,
    /// The events that had been applied to them.
    pub event_ids: Vec<String>,
    /// The identifiers they held.
    pub identifiers: Vec<Identifier>,
    /// The audiences they left.
    pub exits: Vec<MembershipChange>,
    /// How many stored profiles this call deleted (0 when they were deleted before).
    pub rows: u64,
}

/// An event to record as applied.
#[derive(Debug, Clone)]
pub(crate) struct Recorded<'a> {
    pub(crate) event_id: &'a str,
    /// The live profile it is applied to.
    pub(crate) profile_id: &'a str,
    /// When it happened.
    pub(crate) occurred_at: OffsetDateTime,
    /// What it contributes, JSON of [`EventContent`].
    pub(crate) content: String,
}

/// Which events of a profile's timeline to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimelineQuery {
    /// Only these message types (`track`, `identify`, ...); all when empty.
    pub types: Vec<String>,
    /// Only these track event names or page/screen names; all when empty.
    pub names: Vec<String>,
    /// Only events at or after this time.
    pub start: Option<OffsetDateTime>,
    /// Only events before this time.
    pub end: Option<OffsetDateTime>,
    /// Only events older than this (time, event id): the last entry of the previous page.
    pub before: Option<(OffsetDateTime, String)>,
    /// The most entries.
    pub limit: usize,
}

/// One event of a profile's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct TimelineEntry {
    /// The event's id in the event log.
    pub event_id: String,
    /// The profile it was applied to (the live profile, or one merged into it).
    pub profile_id: String,
    /// When it happened.
    pub occurred_at: OffsetDateTime,
    /// What it was and contributed.
    pub content: EventContent,
}

/// Timeline rows (event id, profile id, time, content JSON) as entries.
fn timeline_entries(
    rows: Vec<(String, String, OffsetDateTime, Option<String>)>,
) -> Result<Vec<TimelineEntry>, ProfileError> {
    rows.into_iter()
        .filter_map(|(event_id, profile_id, occurred_at, content)| {
            content.map(|content| {
                serde_json::from_str(&content)
                    .map_err(|e| ProfileError::Corrupt(format!("event {event_id}: {e}")))
                    .map(|content| TimelineEntry {
                        event_id,
                        profile_id,
                        occurred_at,
                        content,
                    })
            })
        })
        .collect()
}

/// The store of `db`'s backend. The database must be migrated with [`crate::MIGRATIONS`].
pub fn open(db: Database) -> Arc<dyn ProfileStore> {
    open_with(db, Definitions::default())
}

/// The store of `db`'s backend, keeping the computed traits and audience memberships of `defs`
/// (config's) and of the definitions stored through the API up to date on every write.
pub fn open_with(db: Database, defs: Definitions) -> Arc<dyn ProfileStore> {
    open_shared(db, Arc::new(SharedDefinitions::new(defs)))
}

/// The store of `db`'s backend, folding with the definitions in effect in `defs` (which every
/// write brings up to date with the stored definitions first).
pub fn open_shared(db: Database, defs: Arc<SharedDefinitions>) -> Arc<dyn ProfileStore> {
    match db {
        Database::Postgres(pool) => Arc::new(PostgresStore::new(pool).with_definitions(defs)),
        Database::Sqlite(pool) => Arc::new(SqliteStore::new(pool).with_definitions(defs)),
    }
}

/// What the store keeps up to date on every write besides the profiles' own state.
#[derive(Debug, Clone, Default)]
pub struct Definitions {
    /// Every computed trait to fold: the declared ones and the audiences' hidden counts.
    pub computed: Vec<ComputedTrait>,
    /// The audiences whose memberships are kept in `audience_members`.
    pub audiences: Audiences,
    /// The trait catalog: how each trait's value combines.
    pub catalog: TraitCatalog,
    /// How many of `computed` are declared (shown on profiles); the rest are hidden counts.
    pub declared: usize,
    /// Whether every written version is kept for GetProfile(as_of).
    pub history: bool,
    /// The store-wide revision of the definitions stored through the API that these include
    /// (0: config's only).
    pub revision: i64,
    /// The event types with their own pace and weight in engagement (config only).
    pub engagement: Vec<crate::engagement::EngagementEvent>,
    /// The computed traits of accounts, over their members' events (config only). Evaluated
    /// when read, not stored; those the audiences' account tests read are copied onto the
    /// members' profiles, so those are part of the fingerprint.
    pub account_computed: Vec<ComputedTrait>,
}

impl Definitions {
    /// The declared computed traits and the audiences (whose hidden counts are added).
    pub fn new(mut computed: Vec<ComputedTrait>, audiences: Audiences) -> Self {
        let declared = computed.len();
        computed.extend(audiences.hidden().iter().cloned());
        Self {
            computed,
            audiences,
            catalog: TraitCatalog::new(),
            declared,
            history: false,
            revision: 0,
            engagement: Vec::new(),
            account_computed: Vec::new(),
        }
    }

    /// These definitions with the account computed traits `account_computed`.
    #[must_use]
    pub fn with_account_computed(mut self, account_computed: Vec<ComputedTrait>) -> Self {
        self.account_computed = account_computed;
        self
    }

    /// Whether `event` counts for some account computed trait.
    pub fn counts_for_accounts(&self, event: &crate::domain::ResolvedEvent) -> bool {
        self.account_computed
            .iter()
            .any(|def| def.value_of(event).is_some())
    }

    /// The account computed traits some audience's account test reads: the members' profiles
    /// carry a copy of their values.
    pub fn audience_account_computed(&self) -> impl Iterator<Item = &ComputedTrait> {
        let names = self.audiences.account_traits();
        self.account_computed
            .iter()
            .filter(|def| names.contains(&def.name))
    }

    /// Whether some audience reads an account computed trait (then the members carry copies
    /// of its values, refreshed as [`Definitions::members_read_account_computed`] says).
    pub fn copies_account_computed(&self) -> bool {
        self.audience_account_computed().next().is_some()
    }

    /// Whether an account's members may read its account computed traits, so that a change of
    /// them (a member's counted event, a person joining, a merge, an unmerge, a deletion, a
    /// window passing) must rescore and re-evaluate every member through the account refresh.
    /// Audiences read them through the members' copies, and person plans through their
    /// `account` tests; those plans live in the scoring service (config's and the API's,
    /// changed at run time and polled by its replicas) and are not known here, so any declared
    /// account computed trait counts, as if some person plan read it.
    pub fn members_read_account_computed(&self) -> bool {
        !self.account_computed.is_empty()
    }

    /// These definitions with the engagement event types `engagement`.
    #[must_use]
    pub fn with_engagement(mut self, engagement: Vec<crate::engagement::EngagementEvent>) -> Self {
        self.engagement = engagement;
        self
    }

    /// These definitions keeping every written version (`history`).
    #[must_use]
    pub fn with_history(mut self, history: bool) -> Self {
        self.history = history;
        self
    }

    /// The declared computed traits (shown on profiles).
    pub fn declared(&self) -> &[ComputedTrait] {
        &self.computed[..self.declared.min(self.computed.len())]
    }

    /// These definitions with the trait catalog `catalog`.
    #[must_use]
    pub fn with_catalog(mut self, catalog: TraitCatalog) -> Self {
        self.catalog = catalog;
        self
    }

    /// The rules folding follows.
    pub fn rules(&self) -> Rules<'_> {
        Rules {
            computed: &self.computed,
            catalog: Some(&self.catalog),
            engagement: &self.engagement,
        }
    }

    /// The audiences `profile` (live) belongs to at `now`.
    pub fn members(&self, profile: &Profile, now: OffsetDateTime) -> Vec<String> {
        if self.audiences.is_empty() {
            return Vec::new();
        }
        let computed = profile.state.computed.values(&self.computed, now);
        let accounts: Vec<&serde_json::Value> = profile
            .state
            .computed
            .account_traits()
            .map(|(_, traits)| traits)
            .collect();
        self.audiences.members(Facts {
            traits: &profile.state.traits,
            computed: &computed,
            scores: &profile.scores,
            accounts: &accounts,
        })
    }

    /// Copies onto `state` the traits of its accounts (`accounts`, as the writing transaction
    /// sees them) and the account computed traits (`values`) that the audiences' account tests
    /// read; whether it changed.
    pub fn copy_account_traits(
        &self,
        state: &mut crate::computed::ComputedState,
        accounts: &Accounts,
        values: &AccountValues,
    ) -> bool {
        let names = self.audiences.account_traits();
        let (no_traits, no_values) = (BTreeMap::new(), BTreeMap::new());
        state.set_account_traits(!names.is_empty(), |id| {
            let traits = accounts.get(id).map_or(&no_traits, |a| &a.traits);
            let (computed, until) = values
                .get(id)
                .map_or((&no_values, None), |(values, until)| (values, *until));
            let facts = self
                .audiences
                .account_facts(traits, &self.account_computed, computed);
            (facts, until)
        })
    }

    /// When `profile`'s computed values or memberships next change without a new event: a
    /// window of its own computed traits, or of an account computed trait it carries a copy of.
    pub fn valid_until(&self, profile: &Profile, now: OffsetDateTime) -> Option<OffsetDateTime> {
        let computed = &profile.state.computed;
        computed
            .valid_until(&self.computed, now)
            .into_iter()
            .chain(computed.account_traits_valid_until(now))
            .min()
    }

    /// A digest of everything that folds events into profiles (the computed traits with the
    /// audiences' hidden counts, the trait catalog, the engagement event types, the version of
    /// the built-in derivations)
    /// and of the audiences: when it changes, stored profiles are recomputed from their events
    /// and their memberships brought up to date (a new audience fills up, a deleted one
    /// empties).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        /// Bumped whenever the built-in derivations (consent, accounts, interests, purchases)
        /// change.
        const DERIVATIONS: u32 = 2;
        // Audiences are hashed only when there are some, so a store without audiences keeps
        // the fingerprint it had before they were part of it (and is not recomputed for it).
        // The engagement event types likewise.
        let audiences = self.audiences.declared();
        let json = match (audiences.is_empty(), self.engagement.is_empty()) {
            (true, true) => serde_json::to_string(&(DERIVATIONS, &self.computed, &self.catalog)),
            (false, true) => {
                serde_json::to_string(&(DERIVATIONS, &self.computed, &self.catalog, audiences))
            }
            (_, false) => serde_json::to_string(&(
                DERIVATIONS,
                &self.computed,
                &self.catalog,
                audiences,
                &self.engagement,
            )),
        }
        .unwrap_or_default();
        // Likewise the account computed traits audiences read (profiles carry their values),
        // with the version of the rule that makes the copies: 2 since a declared account
        // computed trait hides the account trait of its name also while it has no value.
        const COPIES: u32 = 2;
        let copied: Vec<&ComputedTrait> = self.audience_account_computed().collect();
        let json = if copied.is_empty() {
            json
        } else {
            json + &serde_json::to_string(&(COPIES, &copied)).unwrap_or_default()
        };
        hex::encode(Sha256::digest(json.as_bytes()))
    }

    /// Whether anything changes as time passes (some window is declared, of a computed trait
    /// or of an account computed trait: profiles carry copies of some, account scores read
    /// them).
    pub fn windowed(&self) -> bool {
        self.computed
            .iter()
            .chain(&self.account_computed)
            .any(|c| c.window_seconds.is_some())
    }
}

/// A position in the change stream: the writing transaction and the row's sequence number
/// (Postgres; SQLite writes one transaction at a time, so its transaction number is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct ChangeCursor {
    /// The writing transaction.
    pub xid: u64,
    /// The row's sequence number.
    pub seq: i64,
}

impl std::fmt::Display for ChangeCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.xid, self.seq)
    }
}

impl std::str::FromStr for ChangeCursor {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (xid, seq) = s.split_once('.').ok_or(())?;
        Ok(Self {
            xid: xid.parse().map_err(|_| ())?,
            seq: seq.parse().map_err(|_| ())?,
        })
    }
}

/// One change of a profile, as the change stream carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileChange {
    /// Where it is in the stream.
    pub cursor: ChangeCursor,
    /// The profile.
    pub profile_id: String,
    /// `updated`, `merged`, `split`, `score_changed`, `audience_entered`, `audience_exited`,
    /// `deleted`.
    pub kind: String,
    /// What changed: `{version}`, `{into}`, `{score, value}`, `{audience}`, `{profile_ids}`.
    pub detail: serde_json::Value,
    /// When it was written.
    pub at: OffsetDateTime,
}

/// One written version of a profile, as kept for GetProfile(as_of).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Version {
    pub(crate) profile_id: String,
    pub(crate) version: i64,
    /// The survivor, for a merged-away profile.
    pub(crate) merged_into: Option<String>,
    /// The encoded `tessera.profile.v1.Profile` of a live profile.
    pub(crate) body: Option<bytes::Bytes>,
}

/// Keeps the versions of `written` when the definitions keep history; returns the bodies it
/// kept (the live profiles'), by profile id, with their versions.
async fn record_versions<O: Ops>(
    ops: &mut O,
    defs: &Definitions,
    written: &[&Profile],
    now: OffsetDateTime,
) -> Result<HashMap<String, (i64, bytes::Bytes)>, sqlx::Error> {
    if !defs.history || written.is_empty() {
        return Ok(HashMap::new());
    }
    use prost::Message as _;
    let versions: Vec<Version> = written
        .iter()
        .map(|p| Version {
            profile_id: p.profile_id.clone(),
            version: p.version,
            merged_into: p.merged_into.clone(),
            body: p.merged_into.is_none().then(|| {
                crate::convert::profile_to_pb(p, defs, now)
                    .encode_to_vec()
                    .into()
            }),
        })
        .collect();
    ops.record_versions(&versions, now).await?;
    Ok(versions
        .into_iter()
        .filter_map(|v| Some((v.profile_id, (v.version, v.body?))))
        .collect())
}

/// A change to log with a write.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewChange {
    pub(crate) profile_id: String,
    pub(crate) kind: &'static str,
    pub(crate) detail: serde_json::Value,
}

impl NewChange {
    fn new(profile_id: &str, kind: &'static str, detail: serde_json::Value) -> Self {
        Self {
            profile_id: profile_id.to_owned(),
            kind,
            detail,
        }
    }
}

/// The changes a write logs: every live profile written (`updated`, and `split` when `split`),
/// every profile merged away (`merged` into its survivor), every score whose value changed and
/// every audience entry and exit.
fn changes_of(
    written: &[&Profile],
    split: bool,
    scores: &[(String, String, f64)],
    audiences: &[MembershipChange],
) -> Vec<NewChange> {
    let mut out = Vec::new();
    for p in written {
        match &p.merged_into {
            None => {
                out.push(NewChange::new(
                    &p.profile_id,
                    "updated",
                    serde_json::json!({ "version": p.version }),
                ));
                if split {
                    out.push(NewChange::new(
                        &p.profile_id,
                        "split",
                        serde_json::json!({}),
                    ));
                }
            }
            Some(into) => out.push(NewChange::new(
                &p.profile_id,
                "merged",
                serde_json::json!({ "into": into }),
            )),
        }
    }
    for (profile, score, value) in scores {
        out.push(NewChange::new(
            profile,
            "score_changed",
            serde_json::json!({ "score": score, "value": value }),
        ));
    }
    for change in audiences {
        let kind = if change.entered {
            "audience_entered"
        } else {
            "audience_exited"
        };
        out.push(NewChange::new(
            &change.profile_id,
            kind,
            serde_json::json!({ "audience": change.audience }),
        ));
    }
    out
}

/// An entry into or exit from an audience.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipChange {
    /// The audience.
    pub audience: String,
    /// The profile.
    pub profile_id: String,
    /// Entered (true) or exited.
    pub entered: bool,
}

/// Brings the stored memberships of `profiles` (as written now) up to date: a live profile
/// holds the audiences whose condition it meets at `now`, a merged-away one holds none. Without
/// audiences nothing is read or changed unless `always` (a rebuild, which also drops the
/// memberships of deleted audiences).
async fn update_memberships<O: Ops>(
    ops: &mut O,
    defs: &Definitions,
    profiles: &[&Profile],
    now: OffsetDateTime,
    always: bool,
) -> Result<Vec<MembershipChange>, sqlx::Error> {
    let changes = membership_changes(ops, defs, profiles, now, always).await?;
    ops.change_memberships(&changes, now).await?;
    Ok(changes)
}

/// The entries and exits that bring the stored memberships of `profiles` up to date (see
/// [`update_memberships`]), read through `ops` and not yet stored.
async fn membership_changes<O: Ops>(
    ops: &mut O,
    defs: &Definitions,
    profiles: &[&Profile],
    now: OffsetDateTime,
    always: bool,
) -> Result<Vec<MembershipChange>, sqlx::Error> {
    if (defs.audiences.is_empty() && !always) || profiles.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = profiles.iter().map(|p| p.profile_id.clone()).collect();
    let stored: BTreeSet<(String, String)> = ops.memberships(&ids).await?.into_iter().collect();
    let mut wanted = BTreeSet::new();
    for profile in profiles.iter().filter(|p| p.merged_into.is_none()) {
        for audience in defs.members(profile, now) {
            wanted.insert((profile.profile_id.clone(), audience));
        }
    }
    let change = |(profile_id, audience): &(String, String), entered| MembershipChange {
        audience: audience.clone(),
        profile_id: profile_id.clone(),
        entered,
    };
    Ok(wanted
        .difference(&stored)
        .map(|m| change(m, true))
        .chain(stored.difference(&wanted).map(|m| change(m, false)))
        .collect())
}

/// The operations a backend provides inside one transaction (or on one connection for reads).
#[async_trait]
trait Ops: Send {
    /// Stores an empty profile for every id not stored yet.
    async fn ensure(&mut self, ids: &[String], now: OffsetDateTime) -> Result<(), sqlx::Error>;
    /// The live profile each stored id resolves to, without locking. Ids not stored (or whose
    /// chain is longer than [`MAX_MERGE_HOPS`]) are absent.
    async fn resolve(&mut self, ids: &[String]) -> Result<HashMap<String, String>, sqlx::Error>;
    /// Loads profiles with their identifiers; with `lock`, locks them in id order first.
    async fn load(&mut self, ids: &[String], lock: bool) -> Result<Vec<Profile>, sqlx::Error>;
    /// The live profile each of `ids` resolves to, with its identifiers, without locking, by
    /// the id asked for; ids not stored (or whose chain is longer than [`MAX_MERGE_HOPS`]) are
    /// absent. By default [`Ops::resolve`] then [`Ops::load`], resolving again the ids whose
    /// profile was merged away between the two; Postgres reads them in one statement.
    async fn live(&mut self, ids: &[String]) -> Result<HashMap<String, Profile>, ProfileError> {
        let mut found = HashMap::with_capacity(ids.len());
        let mut pending = ids.to_vec();
        for _ in 0..MAX_LOCK_ROUNDS {
            if pending.is_empty() {
                return Ok(found);
            }
            let targets = self.resolve(&pending).await?;
            let mut wanted: Vec<String> = targets.values().cloned().collect();
            wanted.sort_unstable();
            wanted.dedup();
            let loaded: HashMap<String, Profile> = self
                .load(&wanted, false)
                .await?
                .into_iter()
                .map(|p| (p.profile_id.clone(), p))
                .collect();
            let mut again = Vec::new();
            for id in pending {
                match targets.get(&id).and_then(|target| loaded.get(target)) {
                    Some(profile) if profile.merged_into.is_none() => {
                        found.insert(id, profile.clone());
                    }
                    // Merged away between the two reads: resolve again.
                    Some(_) => again.push(id),
                    None => {}
                }
            }
            pending = again;
        }
        if pending.is_empty() {
            Ok(found)
        } else {
            Err(ProfileError::Contention)
        }
    }
    /// Makes `profile` (about to be written, or just written) what [`Ops::load`] returns of
    /// its row: each backend keeps times and JSON numbers its own way.
    fn as_stored(&self, profile: &mut Profile);
    /// Records events as applied to a profile, with what they contribute; returns the ids
    /// that were not recorded before.
    async fn record_events(
        &mut self,
        events: &[Recorded<'_>],
        now: OffsetDateTime,
    ) -> Result<HashSet<String>, sqlx::Error>;
    /// The applied events of `profile_ids`: event id, profile id, content (JSON of
    /// [`EventContent`], `None` for events applied before contents were kept).
    async fn load_events(
        &mut self,
        profile_ids: &[String],
    ) -> Result<Vec<(String, String, Option<String>)>, sqlx::Error>;
    /// Moves applied events to another profile, with their new content.
    async fn move_events(&mut self, moves: &[(&str, &str, String)]) -> Result<(), sqlx::Error>;
    /// Deletes applied events (erased with an identifier).
    async fn delete_events(&mut self, event_ids: &[&str]) -> Result<(), sqlx::Error>;
    /// Replaces the identifiers of the profiles `members` with `links`.
    async fn replace_identifiers(
        &mut self,
        members: &[String],
        links: &[(&str, &Identifier)],
    ) -> Result<(), sqlx::Error>;
    /// Writes the profiles' rows (not their identifiers).
    async fn write(&mut self, profiles: &[&Profile]) -> Result<(), sqlx::Error>;
    /// For each (merged, survivor) of `redirects` (each merged id once, each survivor live):
    /// moves the identifiers of `merged` to `survivor`, and redirects the profiles that pointed
    /// at `merged` to `survivor`. Set-based: a fixed number of statements however many.
    async fn redirect(&mut self, redirects: &[(&str, &str)]) -> Result<(), sqlx::Error>;
    /// Links identifiers to profiles, as (profile id, identifier) pairs without repeated
    /// identifiers; an identifier already linked to a profile keeps its link. Returns how
    /// many were linked.
    async fn link(&mut self, links: &[(&str, &Identifier)]) -> Result<u64, sqlx::Error>;
    /// The stored memberships of `profile_ids`, as (profile id, audience).
    async fn memberships(
        &mut self,
        profile_ids: &[String],
    ) -> Result<Vec<(String, String)>, sqlx::Error>;
    /// Keeps `versions` (profile id, version, merged into, encoded profile) as recorded at
    /// `now`.
    async fn record_versions(
        &mut self,
        versions: &[Version],
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error>;
    /// Appends `changes` to the change stream (`profile_changes`).
    async fn log_changes(
        &mut self,
        changes: &[NewChange],
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error>;
    /// Stores entries into and exits from audiences.
    async fn change_memberships(
        &mut self,
        changes: &[MembershipChange],
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error>;
    /// [`Ops::write`] of `profiles`, [`Ops::change_memberships`] of `memberships` and
    /// [`Ops::log_changes`] of `changes`, in that order: a backend may send them as one
    /// statement (Postgres does: two round trips fewer per delivery round).
    async fn write_logged(
        &mut self,
        profiles: &[&Profile],
        memberships: &[MembershipChange],
        changes: &[NewChange],
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        self.write(profiles).await?;
        self.change_memberships(memberships, now).await?;
        self.log_changes(changes, now).await
    }
    /// The recompute state (fingerprint, cursor: `Some` while running), locked with `lock`.
    async fn recompute_state(
        &mut self,
        lock: bool,
    ) -> Result<Option<(String, Option<String>)>, sqlx::Error>;
    /// The store-wide revision of the stored definitions.
    async fn definitions_revision(&mut self) -> Result<i64, sqlx::Error>;
    /// The stored definitions with the revision they were read at, in one snapshot.
    async fn stored_definitions(&mut self) -> Result<(i64, Vec<StoredDefinition>), sqlx::Error>;
    /// Stores the recompute state.
    async fn set_recompute_state(
        &mut self,
        fingerprint: &str,
        cursor: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error>;
    /// Stores an empty account for every id not stored yet, then loads and (Postgres) locks
    /// the accounts `ids` in id order.
    async fn lock_accounts(
        &mut self,
        ids: &[String],
        now: OffsetDateTime,
    ) -> Result<Vec<Account>, sqlx::Error>;
    /// Writes the accounts' rows.
    async fn write_accounts(&mut self, accounts: &[&Account]) -> Result<(), sqlx::Error>;
    /// The account `id`, without locking.
    async fn load_account(&mut self, id: &str) -> Result<Option<Account>, sqlx::Error>;
    /// The stored accounts among `ids`, without locking.
    async fn load_accounts(&mut self, ids: &[String]) -> Result<Vec<Account>, sqlx::Error>;

    /// Queues a refresh of each of `ids`: a rescore of the account, and with `members` (its
    /// traits changed) a refresh of its members too.
    async fn request_account_refreshes(
        &mut self,
        ids: &[&str],
        members: bool,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error>;

    /// Takes every queued refresh of the `limit` accounts queued longest ago that no other
    /// transaction has taken (locked until this one ends), in queue order.
    async fn claim_account_refreshes(
        &mut self,
        limit: usize,
    ) -> Result<Vec<QueuedRefresh>, sqlx::Error>;

    /// Queues the rest of a refresh of `id`'s members: those after `after` (in profile id
    /// order), without a rescore of the account (done already).
    async fn request_members_after(
        &mut self,
        id: &str,
        after: &str,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error>;

    /// Stores until when each account's windowed account computed traits hold (`None`: they
    /// change only with its members or their events).
    async fn set_accounts_valid_until(
        &mut self,
        until: &[(&str, Option<OffsetDateTime>)],
    ) -> Result<(), sqlx::Error>;

    /// Removes the queued account refreshes at `positions` (done).
    async fn delete_account_refreshes(&mut self, positions: &[i64]) -> Result<(), sqlx::Error>;
    /// The applied group events naming `account_id`: event id, profile id, content.
    async fn group_events(
        &mut self,
        account_id: &str,
    ) -> Result<Vec<(String, String, Option<String>)>, sqlx::Error>;
    /// The ids of at most `limit` live profiles after `after`, in order.
    async fn live_after(
        &mut self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, sqlx::Error>;
    /// The deleted profiles among `ids`.
    async fn deleted(&mut self, ids: &[String]) -> Result<HashSet<String>, sqlx::Error>;
    /// The profiles merged into any of `ids`.
    async fn merged_into_any(&mut self, ids: &[String]) -> Result<Vec<String>, sqlx::Error>;
    /// Deletes everything about the profiles `ids`; returns how many profile rows it deleted.
    async fn purge(&mut self, ids: &[String]) -> Result<u64, sqlx::Error>;
    /// Remembers the profiles `ids` as deleted for `reason`.
    async fn remember_deleted(
        &mut self,
        ids: &[String],
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<(), sqlx::Error>;
}

/// `batch` without the events and merges that name deleted profiles (a GDPR deletion came
/// between their resolution and their delivery): those are dropped, never applied.
async fn without_deleted<'b, O: Ops>(
    ops: &mut O,
    batch: &'b Batch,
) -> Result<std::borrow::Cow<'b, Batch>, sqlx::Error> {
    let deleted = ops.deleted(&batch.profile_ids()).await?;
    if deleted.is_empty() {
        return Ok(std::borrow::Cow::Borrowed(batch));
    }
    let events: Vec<_> = batch
        .events
        .iter()
        .filter(|e| !deleted.contains(&e.profile_id))
        .cloned()
        .collect();
    metrics::counter!("tessera_profile_deleted_events_skipped_total")
        .increment((batch.events.len() - events.len()) as u64);
    Ok(std::borrow::Cow::Owned(Batch {
        merges: batch
            .merges
            .iter()
            .filter(|m| {
                !deleted.contains(&m.surviving_profile_id)
                    && !deleted.contains(&m.merged_profile_id)
            })
            .cloned()
            .collect(),
        events,
    }))
}

/// Deletes a person's profiles through `ops` (inside a transaction); see
/// [`ProfileStore::delete`].
async fn delete<O: Ops>(
    ops: &mut O,
    shared: &SharedDefinitions,
    live: &str,
    component: &[String],
    reason: &str,
    now: OffsetDateTime,
) -> Result<Deleted, ProfileError> {
    let mut ids: BTreeSet<String> = component.iter().cloned().collect();
    ids.insert(live.to_owned());
    let named: Vec<String> = ids.iter().cloned().collect();
    // Locked (Postgres) so a batch applying to them waits, then finds them gone and is retried
    // (and then skips them).
    let stored = ops.load(&named, true).await?;
    let merged = ops.merged_into_any(&named).await?;
    // Nothing stored: deleted before (a repeated call must not purge the changes the first
    // one logged), or never applied here (then only remembered, for events still on the way).
    let found = !stored.is_empty() || !merged.is_empty();
    ids.extend(merged);
    let profile_ids: Vec<String> = ids.into_iter().collect();
    // The person leaves their accounts: the account refresh rescores them without them, and
    // when members read account computed traits (which counted the person's events: audiences'
    // copies, person plans) it rescores and re-evaluates the other members too.
    let accounts = account_ids(&stored.iter().collect::<Vec<_>>());
    if !accounts.is_empty() {
        let members = definitions(ops, shared)
            .await?
            .members_read_account_computed();
        let accounts: Vec<&str> = accounts.iter().map(String::as_str).collect();
        ops.request_account_refreshes(&accounts, members, now)
            .await?;
    }
    let identifiers = stored
        .into_iter()
        .flat_map(|p| p.state.identifiers)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let event_ids = ops
        .load_events(&profile_ids)
        .await?
        .into_iter()
        .map(|(event_id, _, _)| event_id)
        .collect();
    let exits: Vec<MembershipChange> = ops
        .memberships(&profile_ids)
        .await?
        .into_iter()
        .map(|(profile_id, audience)| MembershipChange {
            audience,
            profile_id,
            entered: false,
        })
        .collect();
    let rows = if found {
        ops.purge(&profile_ids).await?
    } else {
        0
    };
    ops.remember_deleted(&profile_ids, reason, now).await?;
    if rows > 0 {
        let mut changes = changes_of(&[], false, &[], &exits);
        changes.push(NewChange::new(
            live,
            "deleted",
            serde_json::json!({ "profile_ids": profile_ids }),
        ));
        ops.log_changes(&changes, now).await?;
    }
    Ok(Deleted {
        profile_ids,
        event_ids,
        identifiers,
        exits,
        rows,
    })
}

/// Applies a batch through `ops`, which must be inside a transaction; the profiles `also`
/// (existing ones) are rescored and re-evaluated with the ones the batch names.
async fn apply<O: Ops>(
    ops: &mut O,
    batch: &Batch,
    also: &[String],
    (half_life_seconds, shared): (f64, &SharedDefinitions),
    now: OffsetDateTime,
    scorer: &dyn Scorer,
) -> Result<Applied, ProfileError> {
    let batch = &*without_deleted(ops, batch).await?;
    let mut named = batch.profile_ids();
    if !also.is_empty() {
        named = named
            .into_iter()
            .chain(also.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
    }
    ops.ensure(&named, now).await?;
    let (live, resolved) = lock_live(ops, &named).await?;
    // Read after the locks: see `definitions`.
    let defs = &*definitions(ops, shared).await?;

    let mut ws = Workspace::new(live, resolved);
    for merge in &batch.merges {
        ws.apply_merge(merge, now, defs.rules())?;
    }

    // The first occurrence of an event id in the batch is the one that counts.
    let mut seen = HashSet::new();
    let mut to_record = Vec::with_capacity(batch.events.len());
    for event in &batch.events {
        if seen.insert(event.event_id.as_str()) {
            let id = ws
                .canonical(&event.profile_id)
                .ok_or_else(|| ProfileError::BrokenMergeChain(event.profile_id.clone()))?;
            to_record.push(Recorded {
                event_id: event.event_id.as_str(),
                profile_id: id,
                occurred_at: event.timestamp,
                content: content_json(&EventContent::of(event)),
            });
        }
    }
    let mut fresh = ops.record_events(&to_record, now).await?;
    let mut applied = 0;
    let mut group_calls = Vec::new();
    // The profiles whose new events count for an account computed trait: their accounts are
    // rescored by the account refresh, which also rescores and re-evaluates their members
    // when members read the traits (`members_read`).
    let mut counted: BTreeSet<&str> = BTreeSet::new();
    // The accounts a person joined by this batch: their events now count for the account.
    let mut joined: BTreeSet<String> = BTreeSet::new();
    let members_read = defs.members_read_account_computed();
    for event in &batch.events {
        if fresh.remove(&event.event_id) {
            let group_id = &event.details.group_id;
            if members_read
                && !group_id.is_empty()
                && !ws
                    .canonical(&event.profile_id)
                    .and_then(|id| ws.profile(id))
                    .is_some_and(|p| p.state.computed.accounts().any(|(id, _)| id == group_id))
            {
                joined.insert(group_id.clone());
            }
            ws.apply_event(event, half_life_seconds, now, defs.rules())?;
            applied += 1;
            if defs.counts_for_accounts(event) {
                counted.insert(event.profile_id.as_str());
            }
            // Every group call counts, also one without account traits: it may change the
            // person's role, which the account's scores read.
            if !group_id.is_empty() {
                group_calls.push(event);
            }
        }
    }
    // A merge may make two members one: the survivors' accounts are rescored too.
    let merged_accounts: BTreeSet<String> = ws
        .merges()
        .iter()
        .filter_map(|(_, survivor)| ws.canonical(survivor).and_then(|id| ws.profile(id)))
        .flat_map(|p| p.state.computed.accounts().map(|(id, _)| id.to_owned()))
        .collect();
    // What members read of the account computed traits (audiences' copies, person plans'
    // scores) changes when the account's members change (a person joined, people merged) or
    // their events count: the account refresh rescores and re-evaluates every member (the
    // batch's own people are brought up to date below).
    let accounts_of_ids = |ids: &BTreeSet<&str>| -> BTreeSet<String> {
        let profiles: Vec<&Profile> = ids
            .iter()
            .filter_map(|id| ws.canonical(id).and_then(|live| ws.profile(live)))
            .collect();
        account_ids(&profiles)
    };
    let mut refresh_members = BTreeSet::new();
    if members_read {
        refresh_members.extend(accounts_of_ids(&counted));
        refresh_members.extend(joined);
        refresh_members.extend(merged_accounts.iter().cloned());
    }
    let touched_accounts =
        fold_accounts(ops, &defs.catalog, &group_calls, merged_accounts, now).await?;
    // Accounts whose members are not refreshed (none today: see
    // `Definitions::members_read_account_computed`) are rescored alone; accounts rescored in
    // this transaction need no refresh for the batch's events.
    let counted_accounts: BTreeSet<String> = accounts_of_ids(&counted)
        .into_iter()
        .filter(|id| !touched_accounts.contains_key(id) && !refresh_members.contains(id))
        .collect();
    if !counted_accounts.is_empty() {
        let ids: Vec<&str> = counted_accounts.iter().map(String::as_str).collect();
        ops.request_account_refreshes(&ids, false, now).await?;
    }
    if !refresh_members.is_empty() {
        let ids: Vec<&str> = refresh_members.iter().map(String::as_str).collect();
        ops.request_account_refreshes(&ids, true, now).await?;
    }

    let named_live: BTreeSet<String> = named
        .iter()
        .filter_map(|id| ws.canonical(id).map(str::to_owned))
        .collect();
    let state_changed: BTreeSet<String> = ws.changed().map(|p| p.profile_id.clone()).collect();
    let (accounts, values) = {
        let profiles: Vec<&Profile> = named_live.iter().filter_map(|id| ws.profile(id)).collect();
        let accounts = accounts_of(ops, &profiles).await?;
        // Folded with the batch's merges and events (recorded above) already counted.
        let pending: Pending<'_> = ws.profiles().map(|p| (p.profile_id.as_str(), p)).collect();
        let values = account_values(ops, defs, account_ids(&profiles), &pending, now).await?;
        (accounts, values)
    };
    // The copies of the account traits first: audiences read them, and scores read audiences.
    for id in &named_live {
        ws.update_computed(id, now, |state| {
            defs.copy_account_traits(state, &accounts, &values)
        });
    }
    let scores = {
        let profiles: Vec<&Profile> = named_live.iter().filter_map(|id| ws.profile(id)).collect();
        let accounts = shown_accounts(defs, &accounts, &values, now);
        scorer.score(&profiles, &accounts, now).await?
    };
    for (id, scores) in named_live.iter().zip(scores) {
        ws.set_scores(id, scores, now);
    }

    // Rows first, then redirects, each merged profile to its last survivor: a profile merged
    // into one that was merged itself later in the same batch (a chain) points straight at the
    // end of the chain, as do the profiles merged into either before.
    ws.settle(|p| defs.valid_until(p, now));
    let changed: Vec<&Profile> = ws.changed().collect();
    // The memberships are read before the write (which does not change them): the write, the
    // membership changes and the change log then go together.
    let audiences = membership_changes(ops, defs, &changed, now, false).await?;
    let changes = changes_of(&changed, false, ws.score_changes(), &audiences);
    ops.write_logged(&changed, &audiences, &changes, now)
        .await?;
    let redirects = ws
        .merges()
        .iter()
        .map(|(merged, _)| {
            ws.canonical(merged)
                .map(|survivor| (merged.as_str(), survivor))
                .ok_or_else(|| ProfileError::BrokenMergeChain(merged.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    ops.redirect(&redirects).await?;
    // An identifier is new to one live profile at most (merges move new identifiers along).
    let mut links: Vec<(&str, &Identifier)> = Vec::new();
    let mut seen_ids = HashSet::new();
    // Should two of the batch's profiles name one new identifier, the first links it: the
    // others do not hold it.
    let mut not_linked: Vec<(String, Identifier)> = Vec::new();
    for (profile_id, ids) in ws.new_identifiers() {
        for id in ids {
            if seen_ids.insert(id) {
                links.push((profile_id.as_str(), id));
            } else {
                not_linked.push((profile_id.clone(), id.clone()));
            }
        }
    }
    let linked = ops.link(&links).await?;
    if linked < links.len() as u64 {
        // The identity service links an identifier to one profile and moves it only by a
        // merge, so this means the two services disagree; the first link is kept.
        tracing::warn!(
            conflicts = links.len() as u64 - linked,
            "identifiers already linked to another profile were not relinked"
        );
    }

    let conflicts = linked < links.len() as u64;
    let merged_away = ws
        .changed()
        .filter(|p| p.merged_into.is_some())
        .map(|p| (p.profile_id.clone(), p.version))
        .collect();
    // Last, when the batch's events, merges and redirects are written: members are derived
    // from them.
    rescore_accounts(ops, defs, scorer, touched_accounts, now).await?;
    // What the cache gets must be exactly what a read returns: the live profiles as written
    // (nothing after `ops.write` changes their rows; identifiers are linked as they hold them,
    // merged profiles' moved along by the redirects), as the backend stores them. An identifier
    // a profile outside the batch holds was not linked (warned above): then they are read back.
    let (changed_live, changed_merged): (Vec<Profile>, Vec<Profile>) = ws
        .into_changed()
        .into_iter()
        .partition(|p| p.merged_into.is_none());
    let changed = if conflicts {
        let ids: Vec<String> = changed_live.into_iter().map(|p| p.profile_id).collect();
        ops.load(&ids, false).await?
    } else {
        let mut built = changed_live;
        for (profile_id, id) in &not_linked {
            if let Some(p) = built.iter_mut().find(|p| p.profile_id == *profile_id) {
                p.state.identifiers.remove(id);
            }
        }
        as_read(ops, built).await?
    };
    // The kept versions too, once the links are known: a version holds the identifiers its
    // profile was linked to, as a read returns it, never one another profile kept.
    let versions: Vec<&Profile> = changed_merged.iter().chain(&changed).collect();
    let encoded = record_versions(ops, defs, &versions, now).await?;
    Ok(Applied {
        applied,
        duplicates: batch.events.len() as i64 - applied,
        changed,
        state_changed,
        merged_away,
        named: named_live.into_iter().collect(),
        audiences,
        encoded,
    })
}

/// The live profiles `written` (as a write just wrote them, with their identifiers) as a read
/// returns them, without reading them: each as the backend stores it ([`Ops::as_stored`]).
/// Debug builds read them back too and fail on any difference, so every test checks that what
/// the cache gets is exactly what a read returns.
async fn as_read<O: Ops>(
    ops: &mut O,
    mut written: Vec<Profile>,
) -> Result<Vec<Profile>, ProfileError> {
    for profile in &mut written {
        ops.as_stored(profile);
    }
    #[cfg(debug_assertions)]
    {
        let ids: Vec<String> = written.iter().map(|p| p.profile_id.clone()).collect();
        check_as_read(&written, ops.load(&ids, false).await?)?;
    }
    Ok(written)
}

/// Checks that `built` (profiles built in memory) are exactly `read` (the same profiles read
/// back), in any order: the error names the first profile and field that differ.
#[cfg(any(debug_assertions, test))]
fn check_as_read(built: &[Profile], read: Vec<Profile>) -> Result<(), ProfileError> {
    let built: BTreeMap<&str, &Profile> =
        built.iter().map(|p| (p.profile_id.as_str(), p)).collect();
    let read: BTreeMap<&str, &Profile> = read.iter().map(|p| (p.profile_id.as_str(), p)).collect();
    let ids: BTreeSet<&str> = built.keys().chain(read.keys()).copied().collect();
    for id in ids {
        let field = match (built.get(id), read.get(id)) {
            (Some(built), Some(read)) => difference(built, read),
            (Some(_), None) => Some("(not read back)".to_owned()),
            (None, _) => Some("(read back, not built)".to_owned()),
        };
        if let Some(field) = field {
            return Err(ProfileError::Corrupt(format!(
                "profile {id}: the profile built after the write differs from the one read \
                 back in {field}"
            )));
        }
    }
    Ok(())
}

/// The first field in which `built` differs from `read`, by name (with the key of a trait,
/// computed trait or score, never a value: values may be personal data); `None` when equal.
/// Every field is named, so a new one fails to compile until it is compared.
#[cfg(any(debug_assertions, test))]
fn difference(built: &Profile, read: &Profile) -> Option<String> {
    /// The first key whose value differs between `a` and `b`, as `field[key]`.
    fn keyed<V: PartialEq>(
        field: &str,
        a: &BTreeMap<String, V>,
        b: &BTreeMap<String, V>,
    ) -> Option<String> {
        a.iter()
            .find(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .or_else(|| b.keys().find(|k| !a.contains_key(*k)))
            .map(|k| format!("{field}[{k}]"))
    }
    let Profile {
        profile_id,
        merged_into,
        state,
        scores,
        merged_profile_ids,
        version,
        created_at,
        updated_at,
        valid_until,
    } = built;
    let ProfileState {
        traits,
        event_count,
        first_seen,
        last_seen,
        activity_log2,
        identifiers,
        computed,
    } = state;
    let plain = [
        ("profile_id", *profile_id == read.profile_id),
        ("merged_into", *merged_into == read.merged_into),
        ("state.event_count", *event_count == read.state.event_count),
        ("state.first_seen", *first_seen == read.state.first_seen),
        ("state.last_seen", *last_seen == read.state.last_seen),
        (
            "state.activity_log2",
            *activity_log2 == read.state.activity_log2,
        ),
        ("state.identifiers", *identifiers == read.state.identifiers),
        (
            "merged_profile_ids",
            *merged_profile_ids == read.merged_profile_ids,
        ),
        ("version", *version == read.version),
        ("created_at", *created_at == read.created_at),
        ("updated_at", *updated_at == read.updated_at),
        ("valid_until", *valid_until == read.valid_until),
    ];
    plain
        .iter()
        .find(|(_, equal)| !equal)
        .map(|(field, _)| (*field).to_owned())
        .or_else(|| keyed("state.traits", traits, &read.state.traits))
        .or_else(|| keyed("state.computed", &computed.0, &read.state.computed.0))
        .or_else(|| keyed("scores", scores, &read.scores))
}

/// Locks the live profiles `named` resolves to. Resolving reads without locks, so a profile may
/// be merged away between the read and the lock; then the ids are resolved again and the new
/// targets locked too. Returns the live locked profiles and each named id's live profile.
async fn lock_live<O: Ops>(
    ops: &mut O,
    named: &[String],
) -> Result<(Vec<Profile>, HashMap<String, String>), ProfileError> {
    let mut locked: BTreeMap<String, Profile> = BTreeMap::new();
    for _ in 0..MAX_LOCK_ROUNDS {
        let resolved = ops.resolve(named).await?;
        if let Some(id) = named.iter().find(|id| !resolved.contains_key(*id)) {
            return Err(ProfileError::BrokenMergeChain(id.clone()));
        }
        let missing: Vec<String> = resolved
            .values()
            .filter(|id| !locked.contains_key(*id))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut still_live = true;
        for profile in ops.load(&missing, true).await? {
            still_live &= profile.merged_into.is_none();
            locked.insert(profile.profile_id.clone(), profile);
        }
        // A locked live profile cannot be merged away any more, and the profiles that redirect
        // to it are redirected elsewhere only by a merge of it: the resolution now holds.
        let targets_live = resolved
            .values()
            .all(|id| locked.get(id).is_some_and(|p| p.merged_into.is_none()));
        if still_live && targets_live {
            let live = locked
                .into_values()
                .filter(|p| p.merged_into.is_none())
                .collect();
            return Ok((live, resolved));
        }
    }
    Err(ProfileError::Contention)
}

/// The definitions in effect, brought up to date through `ops` first: a transaction that
/// folds with them reads the store-wide revision (after locking its profiles), so a write never
/// folds with definitions older than a change committed before it and a recompute started after
/// a change reaches every profile written with the old ones.
async fn definitions<O: Ops>(
    ops: &mut O,
    shared: &SharedDefinitions,
) -> Result<Arc<Definitions>, sqlx::Error> {
    let current = shared.current();
    if ops.definitions_revision().await? <= current.revision {
        return Ok(current);
    }
    let (revision, stored) = ops.stored_definitions().await?;
    Ok(shared.install(revision, &stored))
}

/// See [`ProfileStore::start_recompute`]; inside a transaction.
async fn start_recompute<O: Ops>(
    ops: &mut O,
    shared: &SharedDefinitions,
    now: OffsetDateTime,
) -> Result<bool, ProfileError> {
    let fingerprint = definitions(ops, shared).await?.fingerprint();
    match ops.recompute_state(true).await? {
        Some((stored, cursor)) if stored == fingerprint => Ok(cursor.is_some()),
        Some(_) | None => {
            ops.set_recompute_state(&fingerprint, Some(""), now).await?;
            Ok(true)
        }
    }
}

/// See [`ProfileStore::recompute`]; inside a transaction.
async fn recompute<O: Ops>(
    ops: &mut O,
    limit: usize,
    (half_life_seconds, shared): (f64, &SharedDefinitions),
    now: OffsetDateTime,
    scorer: &dyn Scorer,
) -> Result<Option<Applied>, ProfileError> {
    /// The most components of one chunk skipped for holding events without contents.
    const MAX_SKIPPED: usize = 100;
    let defs = definitions(ops, shared).await?;
    let hd = (half_life_seconds, &*defs);
    let Some((fingerprint, Some(cursor))) = ops.recompute_state(true).await? else {
        return Ok(None);
    };
    // Started for other definitions: folding with these would record them as done.
    if fingerprint != defs.fingerprint() {
        return Ok(None);
    }
    let after = (!cursor.is_empty()).then_some(cursor.as_str());
    let ids = ops.live_after(after, limit).await?;
    let Some(last) = ids.last().cloned() else {
        ops.set_recompute_state(&fingerprint, None, now).await?;
        tracing::info!("recomputed every profile with the current definitions");
        return Ok(None);
    };
    // Locked before their merged ids are read, so no merge changes the components meanwhile.
    let live: Vec<Profile> = ops
        .load(&ids, true)
        .await?
        .into_iter()
        .filter(|p| p.merged_into.is_none())
        .collect();
    let mut skipped: HashSet<String> = HashSet::new();
    let applied = loop {
        let mut profiles = Vec::new();
        for p in live.iter().filter(|p| !skipped.contains(&p.profile_id)) {
            profiles.push((p.profile_id.clone(), p.profile_id.clone()));
            for merged in &p.merged_profile_ids {
                profiles.push((merged.clone(), p.profile_id.clone()));
            }
        }
        let split = Split {
            profiles,
            events: Vec::new(),
            erased: Vec::new(),
        };
        match rebuild(ops, &split, hd, now, scorer, false).await {
            // Rebuilding fails before writing anything: leave that component and go on.
            Err(ProfileError::NotRebuildable(id)) if skipped.len() < MAX_SKIPPED => {
                let owner = split
                    .profiles
                    .iter()
                    .find(|(member, _)| *member == id)
                    .map_or(id.clone(), |(_, live)| live.clone());
                tracing::warn!(
                    profile_id = %owner,
                    "not recomputed: it holds events applied before their contents were kept"
                );
                metrics::counter!("tessera_profile_recompute_skipped_total").increment(1);
                skipped.insert(owner);
            }
            other => break other?,
        }
    };
    ops.set_recompute_state(&fingerprint, Some(&last), now)
        .await?;
    metrics::counter!("tessera_profile_recomputed_total").increment(applied.named.len() as u64);
    Ok(Some(applied))
}

/// Folds the account traits of newly applied group calls into their accounts (created when
/// new). Locks those accounts and the accounts `also` (to be rescored) after the batch's
/// profiles, all at once in id order, so two batches never wait for each other's accounts;
/// returns them all, as folded.
async fn fold_accounts<O: Ops>(
    ops: &mut O,
    catalog: &TraitCatalog,
    group_calls: &[&crate::domain::ResolvedEvent],
    also: BTreeSet<String>,
    now: OffsetDateTime,
) -> Result<BTreeMap<String, Account>, sqlx::Error> {
    let folded: BTreeSet<&str> = group_calls
        .iter()
        .map(|e| e.details.group_id.as_str())
        .collect();
    let mut ids = also;
    ids.extend(folded.iter().map(|id| (*id).to_owned()));
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut accounts: BTreeMap<String, Account> = ops
        .lock_accounts(&ids.into_iter().collect::<Vec<_>>(), now)
        .await?
        .into_iter()
        .map(|a| (a.account_id.clone(), a))
        .collect();
    let before: BTreeMap<String, BTreeMap<String, crate::domain::TraitValue>> = folded
        .iter()
        .filter_map(|id| Some(((*id).to_owned(), accounts.get(*id)?.traits.clone())))
        .collect();
    for event in group_calls {
        if let Some(account) = accounts.get_mut(&event.details.group_id) {
            account.apply(event, catalog);
        }
    }
    // Other members read the account's traits too (their copies for audiences, their
    // scores): a change is queued for the account refresh, which re-evaluates them all.
    let values = |traits: &BTreeMap<String, crate::domain::TraitValue>| {
        traits
            .iter()
            .map(|(name, t)| (name.clone(), t.value.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    let refresh: Vec<&str> = before
        .iter()
        .filter(|(id, old)| {
            accounts
                .get(*id)
                .is_some_and(|a| values(&a.traits) != values(old))
        })
        .map(|(id, _)| id.as_str())
        .collect();
    if !refresh.is_empty() {
        ops.request_account_refreshes(&refresh, true, now).await?;
    }
    let mut written = Vec::new();
    for account in accounts.values_mut() {
        if folded.contains(account.account_id.as_str()) {
            account.version += 1;
            account.updated_at = now;
            written.push(&*account);
        }
    }
    ops.write_accounts(&written).await?;
    Ok(accounts)
}

/// Rescores `accounts` (locked by this transaction) with their members as the transaction
/// sees them, and stores the scores that changed. Nothing when `scorer` does not score
/// accounts. Each account's members are derived from its applied group calls: one read per
/// account.
async fn rescore_accounts<O: Ops>(
    ops: &mut O,
    defs: &Definitions,
    scorer: &dyn Scorer,
    accounts: BTreeMap<String, Account>,
    now: OffsetDateTime,
) -> Result<(), ProfileError> {
    if accounts.is_empty() {
        return Ok(());
    }
    let mut with_members = Vec::with_capacity(accounts.len());
    for (id, account) in accounts {
        let members = account_members(ops, &id).await?;
        with_members.push((account, members));
    }
    // Scorers read the account computed traits as traits, each hiding the trait of its name
    // (also while it has no value: `account::hidden_by_computed`); they are not stored on the
    // account.
    let mut with_computed = Vec::new();
    let mut valid_until = Vec::new();
    if !defs.account_computed.is_empty() {
        for (account, members) in &with_members {
            let state =
                account_state(ops, &defs.account_computed, members, &Pending::new()).await?;
            valid_until.push(state.valid_until(&defs.account_computed, now));
            let values = state.values(&defs.account_computed, now);
            let seen = Account {
                traits: crate::account::shown_traits(
                    &account.traits,
                    &defs.account_computed,
                    &values,
                    now,
                ),
                ..account.clone()
            };
            with_computed.push((seen, members.clone()));
        }
    }
    let scored = if with_computed.is_empty() {
        &with_members
    } else {
        &with_computed
    };
    // Scores that read windowed computed traits change with time alone: the sweeper queues a
    // refresh of the account when its values expire (see `ProfileStore::expire_accounts`).
    // Stored also when the scorer does not score accounts: members' person plans read them.
    if defs
        .account_computed
        .iter()
        .any(|c| c.window_seconds.is_some())
    {
        let until: Vec<(&str, Option<OffsetDateTime>)> = with_members
            .iter()
            .zip(valid_until)
            .map(|((account, _), until)| (account.account_id.as_str(), until))
            .collect();
        ops.set_accounts_valid_until(&until).await?;
    }
    let Some(scores) = scorer.score_accounts(scored, now).await? else {
        return Ok(());
    };
    if scores.len() != with_members.len() {
        return Err(ProfileError::BadScores(format!(
            "{} results for {} accounts",
            scores.len(),
            with_members.len()
        )));
    }
    let mut changed = Vec::new();
    for ((mut account, _), scores) in with_members.into_iter().zip(scores) {
        if account.set_scores(scores, now) {
            changed.push(account);
        }
    }
    ops.write_accounts(&changed.iter().collect::<Vec<_>>())
        .await?;
    Ok(())
}

/// Takes up to `limit` queued account refreshes through `ops` (inside a transaction) and does
/// what they ask for: re-evaluates the next at most [`MEMBERS_PER_REFRESH`] members of each
/// account (queuing the rest, after the last one done, at the back of the queue) and rescores
/// the accounts; see [`ProfileStore::refresh_accounts`]. A failure rolls the whole chunk back:
/// its rows stay queued as they were, so nothing is lost and the chunk is done again.
async fn refresh_accounts<O: Ops>(
    ops: &mut O,
    limit: usize,
    settings: (f64, &SharedDefinitions),
    now: OffsetDateTime,
    scorer: &dyn Scorer,
) -> Result<Option<Applied>, ProfileError> {
    let claimed = ops.claim_account_refreshes(limit).await?;
    if claimed.is_empty() {
        return Ok(None);
    }
    let mut wanted: BTreeMap<&str, Wanted<'_>> = BTreeMap::new();
    for row in &claimed {
        wanted.entry(row.account_id.as_str()).or_default().add(row);
    }
    let mut members = BTreeSet::new();
    let mut rest = Vec::new();
    for (&id, want) in &wanted {
        let Some(after) = want.members else { continue };
        // In profile id order: the members joining meanwhile before `after` were brought up
        // to date by their own write.
        let mut next = account_members(ops, id)
            .await?
            .into_iter()
            .map(|m| m.profile_id)
            .filter(|p| after.is_none_or(|after| p.as_str() > after));
        let chunk: Vec<String> = next.by_ref().take(MEMBERS_PER_REFRESH).collect();
        if next.next().is_some()
            && let Some(last) = chunk.last()
        {
            rest.push((id, last.clone()));
        }
        members.extend(chunk);
    }
    let members: Vec<String> = members.into_iter().collect();
    let applied = apply(ops, &Batch::default(), &members, settings, now, scorer).await?;
    // The accounts themselves too (once per refresh, with its first chunk): their members may
    // have changed (a person deleted), or their windowed computed traits with time.
    let rescored: BTreeSet<String> = wanted
        .iter()
        .filter(|(_, want)| want.rescore)
        .map(|(id, _)| (*id).to_owned())
        .collect();
    if !rescored.is_empty() {
        let defs = definitions(ops, settings.1).await?;
        let accounts = fold_accounts(ops, &defs.catalog, &[], rescored, now).await?;
        rescore_accounts(ops, &defs, scorer, accounts, now).await?;
    }
    // Done with these rows; what is left of a large account goes to the back of the queue,
    // so it does not hold up the accounts queued after it.
    let positions: Vec<i64> = claimed.iter().map(|row| row.position).collect();
    ops.delete_account_refreshes(&positions).await?;
    for (id, last) in rest {
        ops.request_members_after(id, &last, now).await?;
    }
    Ok(Some(applied))
}

/// The account computed traits of an account with `members` at `now`, folded from every event
/// of its members and of the profiles merged into them, read through `ops`.
async fn account_computed<O: Ops>(
    ops: &mut O,
    defs: &Definitions,
    members: &[Member],
    now: OffsetDateTime,
) -> Result<BTreeMap<String, crate::computed::ComputedValue>, ProfileError> {
    if defs.account_computed.is_empty() {
        return Ok(BTreeMap::new());
    }
    let state = account_state(ops, &defs.account_computed, members, &Pending::new()).await?;
    Ok(state.values(&defs.account_computed, now))
}

/// The accumulators of `traits` over every event of `members` and of the profiles merged into
/// them (as `pending` will write them, else as stored), read through `ops`.
async fn account_state<O: Ops>(
    ops: &mut O,
    traits: &[ComputedTrait],
    members: &[Member],
    pending: &Pending<'_>,
) -> Result<crate::computed::ComputedState, ProfileError> {
    let mut ids = Vec::new();
    let mut stored = Vec::new();
    for member in members {
        match pending.get(member.profile_id.as_str()) {
            Some(p) => {
                ids.push(p.profile_id.clone());
                ids.extend(p.merged_profile_ids.iter().cloned());
            }
            None => stored.push(member.profile_id.clone()),
        }
    }
    if !stored.is_empty() {
        ids.extend(
            ops.load(&stored, false)
                .await?
                .into_iter()
                .flat_map(|p| std::iter::once(p.profile_id).chain(p.merged_profile_ids)),
        );
    }
    let mut state = crate::computed::ComputedState::default();
    if ids.is_empty() {
        return Ok(state);
    }
    for (event_id, profile_id, content) in ops.load_events(&ids).await? {
        // Events applied before their contents were kept cannot be folded again.
        let Some(content) = content else { continue };
        let content: EventContent = serde_json::from_str(&content)
            .map_err(|e| ProfileError::Corrupt(format!("event {event_id}: {e}")))?;
        state.apply(traits, &content.event(&event_id, &profile_id));
    }
    Ok(state)
}

/// The values at `now` of the declared account computed traits, for each of `accounts`, with
/// until when those the audiences read hold (what the members' copies hold, see
/// [`Definitions::copy_account_traits`]); nothing is read when none is declared. Person plans
/// read all of them ([`shown_accounts`]), so they are not limited to the audiences'. Members
/// and merges are as `pending` will write them (else as stored). One read of each account's
/// group events, members and members' events.
async fn account_values<O: Ops>(
    ops: &mut O,
    defs: &Definitions,
    accounts: BTreeSet<String>,
    pending: &Pending<'_>,
    now: OffsetDateTime,
) -> Result<AccountValues, ProfileError> {
    let mut out = AccountValues::new();
    if defs.account_computed.is_empty() {
        return Ok(out);
    }
    let copied: Vec<ComputedTrait> = defs.audience_account_computed().cloned().collect();
    for id in accounts {
        let members = account_members_with(ops, &id, pending).await?;
        let state = account_state(ops, &defs.account_computed, &members, pending).await?;
        let values = state.values(&defs.account_computed, now);
        out.insert(id, (values, state.valid_until(&copied, now)));
    }
    Ok(out)
}

/// `accounts` as person plans read them: each account's traits with the values of its account
/// computed traits (`values`, from [`account_values`]) shown by the rule account plans and
/// audiences read them by ([`crate::account::shown_traits`]: a declared one hides the trait of
/// its name, also while it has no value). Borrowed as they are when none is declared.
fn shown_accounts<'a>(
    defs: &Definitions,
    accounts: &'a Accounts,
    values: &AccountValues,
    now: OffsetDateTime,
) -> Cow<'a, Accounts> {
    if defs.account_computed.is_empty() {
        return Cow::Borrowed(accounts);
    }
    let none = BTreeMap::new();
    let shown = accounts
        .iter()
        .map(|(id, account)| {
            let computed = values.get(id).map_or(&none, |(values, _)| values);
            let traits = crate::account::shown_traits(
                &account.traits,
                &defs.account_computed,
                computed,
                now,
            );
            let account = Account {
                traits,
                ..account.clone()
            };
            (id.clone(), account)
        })
        .collect();
    Cow::Owned(shown)
}

/// [`ProfileStore::account_computed`] through `ops`.
async fn account_computed_of<O: Ops>(
    ops: &mut O,
    shared: &SharedDefinitions,
    account_id: &str,
    now: OffsetDateTime,
) -> Result<BTreeMap<String, crate::computed::ComputedValue>, ProfileError> {
    let defs = definitions(ops, shared).await?;
    if defs.account_computed.is_empty() {
        return Ok(BTreeMap::new());
    }
    let members = account_members(ops, account_id).await?;
    account_computed(ops, &defs, &members, now).await
}

/// The members of `account_id`, read through `ops`.
async fn account_members<O: Ops>(
    ops: &mut O,
    account_id: &str,
) -> Result<Vec<Member>, ProfileError> {
    account_members_with(ops, account_id, &Pending::new()).await
}

/// The live profile `id` resolves to once `pending` is written, from `stored` (where the stored
/// rows resolve it); `None` for an id neither resolves (deleted, or never stored).
fn resolve_pending(pending: &Pending<'_>, id: &str, stored: Option<&String>) -> Option<String> {
    let mut current = if pending.contains_key(id) {
        id
    } else {
        stored?.as_str()
    };
    // Each hop follows a pending merge, so there are at most as many hops as pending rows.
    for _ in 0..=pending.len() {
        match pending.get(current).and_then(|p| p.merged_into.as_deref()) {
            Some(next) => current = next,
            None => return Some(current.to_owned()),
        }
    }
    None
}

/// The members of `account_id` once `pending` is written (else as stored), read through `ops`.
async fn account_members_with<O: Ops>(
    ops: &mut O,
    account_id: &str,
    pending: &Pending<'_>,
) -> Result<Vec<Member>, ProfileError> {
    let rows = ops.group_events(account_id).await?;
    let mut events = Vec::with_capacity(rows.len());
    for (event_id, profile_id, content) in rows {
        let Some(content) = content else { continue };
        let content: EventContent = serde_json::from_str(&content)
            .map_err(|e| ProfileError::Corrupt(format!("event {event_id}: {e}")))?;
        events.push((event_id, profile_id, content));
    }
    let ids: Vec<String> = events
        .iter()
        .map(|(_, p, _)| p.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let stored = ops.resolve(&ids).await?;
    let live: HashMap<String, String> = ids
        .iter()
        .filter_map(|id| Some((id.clone(), resolve_pending(pending, id, stored.get(id))?)))
        .collect();
    Ok(crate::account::members(events, &live))
}

/// A page of live profiles in id order, read through `ops`.
async fn scan<O: Ops>(
    ops: &mut O,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<Profile>, ProfileError> {
    let ids = ops.live_after(after, limit).await?;
    let mut profiles = get_many(ops, &ids).await?;
    profiles.sort_by(|a, b| a.profile_id.cmp(&b.profile_id));
    Ok(profiles)
}

async fn get_many<O: Ops>(ops: &mut O, ids: &[String]) -> Result<Vec<Profile>, ProfileError> {
    let mut profiles = ops.load(ids, false).await?;
    profiles.retain(|p| p.merged_into.is_none());
    Ok(profiles)
}

fn content_json(content: &EventContent) -> String {
    // Strings, numbers and JSON values always serialize.
    serde_json::to_string(content).unwrap_or_else(|_| "null".to_owned())
}

/// Splits a merged component (an unmerge, an identifier split off or erased) through `ops`,
/// inside a transaction: events erased with an identifier are deleted, every profile
/// of the component is rebuilt from the events that belong to it after the split, the
/// profiles that stand as merged fold into their survivor, identifiers follow their events,
/// and every live profile of the component is rescored. Idempotent: splitting again changes
/// no state.
async fn split<O: Ops>(
    ops: &mut O,
    split: &Split,
    (half_life_seconds, shared): (f64, &SharedDefinitions),
    now: OffsetDateTime,
    scorer: &dyn Scorer,
) -> Result<Applied, ProfileError> {
    let defs = definitions(ops, shared).await?;
    rebuild(ops, split, (half_life_seconds, &defs), now, scorer, true).await
}

/// Rebuilds a component as [`split`] does; `log_split` says whether its live profiles log a
/// `split` change (an unmerge) or only `updated` (a recompute).
async fn rebuild<O: Ops>(
    ops: &mut O,
    split: &Split,
    (half_life_seconds, defs): (f64, &Definitions),
    now: OffsetDateTime,
    scorer: &dyn Scorer,
    log_split: bool,
) -> Result<Applied, ProfileError> {
    let computed = defs.computed.as_slice();
    let target: HashMap<&str, &str> = split
        .profiles
        .iter()
        .map(|(id, live)| (id.as_str(), live.as_str()))
        .collect();
    let mut members: Vec<String> = split.profiles.iter().map(|(id, _)| id.clone()).collect();
    members.sort();
    members.dedup();
    ops.ensure(&members, now).await?;
    // The whole component, locked in id order; every member must resolve into it.
    let rows = ops.load(&members, true).await?;
    let mut version = rows.iter().map(|p| p.version).max().unwrap_or(0);
    let mut old: BTreeMap<String, Profile> = rows
        .into_iter()
        .map(|p| (p.profile_id.clone(), p))
        .collect();
    // The accounts the component belonged to (an erased group call may take one away).
    let accounts_before = account_ids(&old.values().collect::<Vec<_>>());
    let moved: HashMap<&str, (&str, &[Identifier])> = split
        .events
        .iter()
        .map(|(event, profile, ids)| (event.as_str(), (profile.as_str(), ids.as_slice())))
        .collect();
    let events = ops.load_events(&members).await?;
    // Every event the split names must have been applied: one still in the pipeline (resolved
    // before the unmerge) would otherwise land on the old profile afterwards.
    let erased: HashSet<&str> = split.erased.iter().map(String::as_str).collect();
    let applied: HashSet<&str> = events.iter().map(|(event, _, _)| event.as_str()).collect();
    let missing = split
        .events
        .iter()
        .filter(|(event, _, _)| !applied.contains(event.as_str()))
        .count();
    if missing > 0 {
        return Err(ProfileError::NotYetApplied(missing));
    }

    // Rebuild every live profile from its events.
    let mut state: BTreeMap<&str, ProfileState> = BTreeMap::new();
    for live in target.values() {
        state.entry(live).or_default();
    }
    let mut moves = Vec::new();
    let mut deleted = Vec::new();
    for (event_id, profile_id, content) in &events {
        // An erased event still in the pipeline is not waited for: its identity is gone.
        if erased.contains(event_id.as_str()) {
            deleted.push(event_id.as_str());
            continue;
        }
        let Some(content) = content else {
            return Err(ProfileError::NotRebuildable(profile_id.clone()));
        };
        let mut content: EventContent = serde_json::from_str(content)
            .map_err(|e| ProfileError::Corrupt(format!("event {event_id}: {e}")))?;
        let live = match moved.get(event_id.as_str()) {
            Some((live, ids)) => {
                content.identifiers = ids
                    .iter()
                    .map(|i| (i.kind.clone(), i.value.clone()))
                    .collect();
                moves.push((event_id.as_str(), *live, content_json(&content)));
                *live
            }
            None => target
                .get(profile_id.as_str())
                .copied()
                .ok_or_else(|| ProfileError::BrokenMergeChain(profile_id.clone()))?,
        };
        let folded = state
            .get_mut(live)
            .ok_or_else(|| ProfileError::BrokenMergeChain(live.to_owned()))?;
        folded.apply(
            &content.event(event_id, live),
            half_life_seconds,
            defs.rules(),
        );
    }
    for folded in state.values_mut() {
        folded.computed.prune(computed, now);
    }
    version += 1;
    let mut links: Vec<(&str, &Identifier)> = Vec::new();
    let mut linked = HashSet::new();
    for (live, folded) in &state {
        for id in &folded.identifiers {
            if linked.insert(id) {
                links.push((live, id));
            }
        }
    }
    // Every member's row, in id order: live ones rebuilt, the others redirecting.
    let mut rows: Vec<Profile> = Vec::new();
    let mut merged_away = Vec::new();
    for id in &members {
        let live = target.get(id.as_str()).copied().unwrap_or(id.as_str());
        let Some(mut profile) = old.remove(id) else {
            continue;
        };
        profile.version = version;
        profile.updated_at = now;
        if live == id {
            profile.merged_into = None;
            profile.state = state.get(live).cloned().unwrap_or_default();
            profile.merged_profile_ids = members
                .iter()
                .filter(|m| *m != id && target.get(m.as_str()) == Some(&live))
                .cloned()
                .collect();
        } else {
            profile.merged_into = Some(live.to_owned());
            profile.merged_profile_ids = Vec::new();
            merged_away.push((profile.profile_id.clone(), version));
        }
        rows.push(profile);
    }
    let (accounts, values) = {
        let live: Vec<&Profile> = rows.iter().filter(|p| p.merged_into.is_none()).collect();
        let accounts = accounts_of(ops, &live).await?;
        // Folded with the component as rebuilt (events moved by the split are counted with
        // their old profile until the account refresh queued below).
        let pending: Pending<'_> = rows.iter().map(|p| (p.profile_id.as_str(), p)).collect();
        let values = account_values(ops, defs, account_ids(&live), &pending, now).await?;
        (accounts, values)
    };
    for profile in rows.iter_mut().filter(|p| p.merged_into.is_none()) {
        defs.copy_account_traits(&mut profile.state.computed, &accounts, &values);
    }
    let scores = {
        let live: Vec<&Profile> = rows.iter().filter(|p| p.merged_into.is_none()).collect();
        let accounts = shown_accounts(defs, &accounts, &values, now);
        scorer.score(&live, &accounts, now).await?
    };
    let mut score_changes = Vec::new();
    for (profile, scores) in rows
        .iter_mut()
        .filter(|p| p.merged_into.is_none())
        .zip(scores)
    {
        crate::domain::keep_only(&mut profile.scores, &scores);
        for score in scores {
            if profile
                .scores
                .get(&score.name)
                .is_none_or(|old| old.value != score.value)
            {
                score_changes.push((profile.profile_id.clone(), score.name.clone(), score.value));
            }
            profile.scores.insert(score.name.clone(), score);
        }
    }
    for profile in &mut rows {
        profile.valid_until = if profile.merged_into.is_none() {
            defs.valid_until(profile, now)
        } else {
            None
        };
    }
    let written: Vec<&Profile> = rows.iter().collect();
    ops.write(&written).await?;
    record_versions(ops, defs, &written, now).await?;
    // Also without audiences: a rebuild drops the memberships of deleted ones.
    let audiences = update_memberships(ops, defs, &written, now, true).await?;
    ops.log_changes(
        &changes_of(&written, log_split, &score_changes, &audiences),
        now,
    )
    .await?;
    ops.move_events(&moves).await?;
    ops.delete_events(&deleted).await?;
    ops.replace_identifiers(&members, &links).await?;
    // Members move with their events: the accounts of the rebuilt people are rescored, and an
    // unmerge rescores and re-evaluates their other members when members read account
    // computed traits (a recompute moves no event).
    let accounts = account_ids(
        &rows
            .iter()
            .filter(|p| p.merged_into.is_none())
            .collect::<Vec<_>>(),
    );
    if log_split && defs.members_read_account_computed() {
        let ids: Vec<&str> = accounts
            .union(&accounts_before)
            .map(String::as_str)
            .collect();
        ops.request_account_refreshes(&ids, true, now).await?;
    }
    let accounts = fold_accounts(ops, &defs.catalog, &[], accounts, now).await?;
    rescore_accounts(ops, defs, scorer, accounts, now).await?;
    let live: Vec<String> = rows
        .iter()
        .filter(|p| p.merged_into.is_none())
        .map(|p| p.profile_id.clone())
        .collect();
    let changed = ops.load(&live, false).await?;
    Ok(Applied {
        applied: 0,
        duplicates: 0,
        changed,
        state_changed: members.iter().cloned().collect(),
        merged_away,
        named: live,
        audiences,
        // A rebuild is rare: its cache entries are encoded afresh.
        encoded: HashMap::new(),
    })
}

/// Re-evaluates the locked live profiles `profiles` at `now` (a sweep): drops what left their
/// windows, writes them at a new version with their next `valid_until`, and brings their
/// memberships up to date.
async fn sweep<O: Ops>(
    ops: &mut O,
    shared: &SharedDefinitions,
    mut profiles: Vec<Profile>,
    now: OffsetDateTime,
) -> Result<(Vec<Profile>, Vec<MembershipChange>), ProfileError> {
    let defs = &*definitions(ops, shared).await?;
    // Copies of windowed account computed traits are due too: copied again as of now.
    if defs.copies_account_computed() {
        let refs: Vec<&Profile> = profiles.iter().collect();
        let accounts = accounts_of(ops, &refs).await?;
        let values = account_values(ops, defs, account_ids(&refs), &Pending::new(), now).await?;
        for profile in &mut profiles {
            defs.copy_account_traits(&mut profile.state.computed, &accounts, &values);
        }
    }
    for profile in &mut profiles {
        profile.state.computed.prune(&defs.computed, now);
        profile.valid_until = defs.valid_until(profile, now);
        profile.version += 1;
        profile.updated_at = now;
    }
    let written: Vec<&Profile> = profiles.iter().collect();
    let changes = membership_changes(ops, defs, &written, now, false).await?;
    ops.write_logged(
        &written,
        &changes,
        &changes_of(&written, false, &[], &changes),
        now,
    )
    .await?;
    record_versions(ops, defs, &written, now).await?;
    // The cache gets them: as a read returns them (`now` may be finer than the store keeps).
    Ok((as_read(ops, profiles).await?, changes))
}

/// Attaches loaded identifiers to their profiles.
fn attach_identifiers(profiles: &mut [Profile], rows: Vec<(String, Identifier)>) {
    let mut by_id: HashMap<String, Vec<Identifier>> = HashMap::new();
    for (profile_id, identifier) in rows {
        by_id.entry(profile_id).or_default().push(identifier);
    }
    for profile in profiles {
        if let Some(ids) = by_id.remove(&profile.profile_id) {
            profile.state.identifiers.extend(ids);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TraitValue;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-06-01 00:00:00 UTC);

    fn profile(id: &str) -> Profile {
        let mut p = Profile::empty(id, NOW);
        p.version = 3;
        p.state.event_count = 2;
        p.state.traits.insert(
            "plan".to_owned(),
            TraitValue {
                value: serde_json::json!("pro"),
                observed_at: NOW,
                event_id: "e1".to_owned(),
            },
        );
        p.state.identifiers.insert(Identifier::new("user_id", "u1"));
        p
    }

    #[test]
    fn equal_profiles_pass_the_check() {
        let built = [profile("p1"), profile("p2")];
        // Read back in another order (a collation's): the check pairs them by id.
        let read = vec![profile("p2"), profile("p1")];
        assert_eq!(difference(&built[0], &read[1]), None);
        check_as_read(&built, read).unwrap();
    }

    #[test]
    fn the_check_names_the_profile_and_the_field_that_differs() {
        let built = [profile("p1"), profile("p2")];
        type Change = fn(&mut Profile);
        let cases: [(&str, Change); 7] = [
            ("updated_at", |p| {
                p.updated_at += time::Duration::nanoseconds(1);
            }),
            ("version", |p| p.version += 1),
            ("state.identifiers", |p| {
                p.state.identifiers.insert(Identifier::new("email", "x"));
            }),
            ("state.traits[plan]", |p| {
                p.state.traits.get_mut("plan").unwrap().value = serde_json::json!(1);
            }),
            ("state.traits[name]", |p| {
                let plan = p.state.traits["plan"].clone();
                p.state.traits.insert("name".to_owned(), plan);
            }),
            ("scores[events]", |p| {
                p.scores.insert(
                    "events".to_owned(),
                    Score {
                        name: "events".to_owned(),
                        value: 1.0,
                        computed_at: NOW,
                        model_version: "m".to_owned(),
                        factors: vec![],
                    },
                );
            }),
            ("valid_until", |p| p.valid_until = Some(NOW)),
        ];
        for (field, change) in cases {
            let mut read = vec![profile("p1"), profile("p2")];
            change(&mut read[1]);
            assert_eq!(difference(&built[1], &read[1]).as_deref(), Some(field));
            let err = check_as_read(&built, read).unwrap_err().to_string();
            assert!(
                err.contains("profile p2") && err.contains(field),
                "{field}: {err}"
            );
        }
        // A profile missing on either side.
        let err = check_as_read(&built, vec![profile("p1")]).unwrap_err();
        assert!(err.to_string().contains("profile p2: "), "{err}");
        let err = check_as_read(&built[..1], vec![profile("p1"), profile("p2")]).unwrap_err();
        assert!(err.to_string().contains("profile p2: "), "{err}");
    }
}
