//! Tessera's identity service: the identity graph, which identifiers belong to which profile.
//!
//! Identifiers seen together in one event belong to one profile; when an event links several
//! profiles they are merged into the oldest. Resolution is idempotent per event id. The rules
//! live in [`domain`]; storage (Postgres, or SQLite for `tessera dev`) in a private `store`
//! module; the gRPC face in a private `service` module.

mod convert;
pub mod domain;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod matching;
mod service;
mod store;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use sqlx::migrate::Migrator;
use tessera_core::{FieldViolation, Identifier};
use tessera_proto::identity::v1::batch_match_service_server::BatchMatchServiceServer;
use tessera_proto::identity::v1::identity_service_server::IdentityServiceServer;
use tessera_store::{Database, Migrations};
use uuid::Uuid;

use crate::domain::{Normalized, Record, Resolution, Rules, RulesConfig};
use crate::store::{Change, IdentityStore, Outcome, StoredRules};
pub use crate::store::{ComponentHistory, Forgotten, Rewritten, VersionedRules};

pub use error::IdentityError;
pub use matching::{
    BatchJob, BatchJobState, BatchOutcome, BatchProgress, FieldFit, MANUAL, MatchOutcome,
    MatchSettings, ModelInfo, PROBABILISTIC, ProfileTraits, TrainingSummary,
};
pub use store::StoredSuggestion;
pub use store::{GraphIdentifier, LoggedDecision as GraphDecision, ProfileGraph};

/// The most decisions a graph answer carries by default, and at most.
pub const DEFAULT_GRAPH_DECISIONS: i64 = 1_000;
/// The most decisions a graph answer may be asked for.
pub const MAX_GRAPH_DECISIONS: i64 = 10_000;

/// The Postgres schema (search path) of the identity service's tables.
pub const SCHEMA: &str = "identity";

static PG_MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The identity service's migrations, one set per backend.
pub static MIGRATIONS: Migrations = Migrations {
    postgres: &PG_MIGRATOR,
    sqlite: &SQLITE_MIGRATOR,
};

/// The largest request the gRPC server decodes: a full batch of records with long values.
const MAX_DECODING_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// The most records resolved in one transaction: long enough to amortize round trips, short
/// enough that a run's locks do not hold other replicas up for long.
const RUN_LEN: usize = 500;

/// The identity service's settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentitySettings {
    /// The most records one `ResolveIdentities` request may carry.
    pub max_batch: usize,
    /// The identity rules: custom types, normalization, blocklists, priority, limits, merge
    /// protection (see [`RulesConfig`]).
    pub rules: RulesConfig,
    /// Probabilistic matching (see [`MatchSettings`]).
    pub matching: MatchSettings,
    /// How often a replica looks for rules changed by another replica's `UpdateRules`, in
    /// seconds.
    pub rules_refresh_seconds: u64,
    /// How long an entry of the owner cache (identifier → canonical profile, in Redis) lives,
    /// in seconds; 0 turns the cache off. Used only with Postgres and a Redis URL.
    pub owner_cache_ttl_seconds: u64,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            max_batch: 5_000,
            rules: RulesConfig::default(),
            matching: MatchSettings::default(),
            rules_refresh_seconds: 5,
            owner_cache_ttl_seconds: 3_600,
        }
    }
}

/// The identity service: the graph over its store, and its gRPC server. Cheap to clone.
#[derive(Clone)]
pub struct Identity {
    store: Arc<dyn IdentityStore>,
    settings: Arc<IdentitySettings>,
    /// The rules in force; replaced whole when they change, so a request keeps the version it
    /// started with.
    rules: Arc<RwLock<Arc<VersionedRules>>>,
    matching: Arc<matching::Matching>,
}

/// Checks rules; violations name each bad key under `rules.`.
fn compile_rules(config: RulesConfig) -> Result<Rules, IdentityError> {
    Rules::compile(config).map_err(|violations| {
        IdentityError::InvalidArgument(
            violations
                .into_iter()
                .map(|v| v.prefixed("rules"))
                .collect(),
        )
    })
}

/// Compiles a stored rules version. It was checked when stored, so failing here means a
/// corrupted row, or rules stored by a newer version of Tessera that this one does not know.
fn compile_stored(stored: StoredRules) -> Result<VersionedRules, IdentityError> {
    let config: RulesConfig = serde_json::from_value(stored.rules).map_err(|e| {
        IdentityError::Corrupt(format!("identity rules version {}: {e}", stored.version))
    })?;
    let rules = Rules::compile(config).map_err(|violations| {
        IdentityError::Corrupt(format!(
            "identity rules version {}: {} invalid keys",
            stored.version,
            violations.len()
        ))
    })?;
    Ok(VersionedRules {
        version: stored.version,
        rules,
    })
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The service over `db`, which is already connected (with [`SCHEMA`]) and migrated. The
    /// rules are checked (`InvalidArgument` naming each bad key under `rules.`) and registered
    /// as a version of the graph's rules.
    pub async fn new(db: Database, settings: IdentitySettings) -> Result<Self, IdentityError> {
        Self::open(db, settings, None).await
    }

    /// [`Identity::new`] with the owner cache on the Redis at `redis_url` (keys under
    /// `prefix`): runs of known identifiers read their owners there instead of in Postgres
    /// (see the README, "Owner cache"). Only on Postgres, and only while
    /// `owner_cache_ttl_seconds` is not 0; otherwise the same as [`Identity::new`]. Every
    /// replica must be given the same Redis. Redis need not be up: the service reads Postgres
    /// while it is down.
    pub async fn with_owner_cache(
        db: Database,
        settings: IdentitySettings,
        redis_url: &str,
        prefix: &str,
    ) -> Result<Self, IdentityError> {
        let owners = match (&db, settings.owner_cache_ttl_seconds) {
            (Database::Postgres(_), ttl) if ttl > 0 => Some(
                store::OwnerCache::open(redis_url, prefix, Duration::from_secs(ttl)).map_err(
                    |e| {
                        IdentityError::InvalidArgument(vec![tessera_core::FieldViolation::new(
                            "redis_url",
                            format!("the owner cache cannot use it: {e}"),
                        )])
                    },
                )?,
            ),
            _ => None,
        };
        Self::open(db, settings, owners).await
    }

    async fn open(
        db: Database,
        settings: IdentitySettings,
        owners: Option<store::OwnerCache>,
    ) -> Result<Self, IdentityError> {
        let rules = compile_rules(settings.rules.clone())?;
        let matching = matching::Matching::new(
            settings.matching.clone(),
            store::open_matching(db.clone(), owners.clone()),
        )?;
        let store = store::open(db, owners);
        let current = store.register_rules(rules.config()).await?;
        let current = compile_stored(current)?;
        tracing::info!(rules_version = current.version, "identity rules registered");
        Ok(Self {
            store,
            settings: Arc::new(settings),
            rules: Arc::new(RwLock::new(Arc::new(current))),
            matching: Arc::new(matching),
        })
    }

    /// The rules in force now.
    fn current(&self) -> Arc<VersionedRules> {
        Arc::clone(&self.rules.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn install(&self, rules: VersionedRules) {
        let mut held = self.rules.write().unwrap_or_else(PoisonError::into_inner);
        // Never back to an older version (a refresh racing an update).
        if rules.version > held.version {
            tracing::info!(rules_version = rules.version, "identity rules changed");
            *held = Arc::new(rules);
        }
    }

    /// Replaces the rules (the `[identity.rules]` shape) for every replica: stored as the next
    /// version when the current version is `expected` (any when `None`; `FailedPrecondition`
    /// otherwise), in force at once on this replica and within `rules_refresh_seconds` on the
    /// others. Invalid rules are `InvalidArgument` naming each bad key under `rules.`; rules
    /// equal to the current ones add no version. Rules apply to events resolved from then on:
    /// the graph already built is not changed. Returns the version in force.
    pub async fn update_rules(
        &self,
        config: RulesConfig,
        expected: Option<i64>,
    ) -> Result<i64, IdentityError> {
        let rules = compile_rules(config)?;
        let version = self.store.update_rules(rules.config(), expected).await?;
        self.install(VersionedRules { version, rules });
        Ok(version)
    }

    /// Takes the latest stored rules if they are newer than those in force; returns whether
    /// they changed.
    pub async fn refresh_rules(&self) -> Result<bool, IdentityError> {
        let held = self.current().version;
        match self.store.current_rules().await? {
            Some(stored) if stored.version > held => {
                self.install(compile_stored(stored)?);
                Ok(true)
            }
            Some(_) | None => Ok(false),
        }
    }

    /// Refreshes the rules every `rules_refresh_seconds` until `shutdown`, so a change made
    /// through another replica reaches this one.
    pub fn spawn_rules_refresh(
        &self,
        shutdown: tessera_server::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let identity = self.clone();
        let every = std::time::Duration::from_secs(self.settings.rules_refresh_seconds.max(1));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = shutdown.cancelled() => return,
                }
                if let Err(e) = identity.refresh_rules().await {
                    tracing::warn!(error = %e, "refreshing the identity rules failed");
                }
            }
        })
    }

    /// Indexes `profiles` (profile id → current trait values) for probabilistic matching and,
    /// with a trained model, matches each: merges at or above the auto-merge probability (rules
    /// permitting), suggestions in the review band.
    pub async fn match_profiles(
        &self,
        profiles: ProfileTraits,
    ) -> Result<MatchOutcome, IdentityError> {
        let max = self.settings.max_batch;
        if profiles.len() > max {
            return Err(IdentityError::BatchTooLarge {
                len: profiles.len(),
                max,
            });
        }
        self.matching
            .match_profiles(self.store.as_ref(), &self.current(), profiles)
            .await
    }

    /// Fits a new match model over the indexed population and makes it current.
    pub async fn train_match_model(&self) -> Result<TrainingSummary, IdentityError> {
        self.matching.train().await
    }

    /// Match model `version`, the current one when `None` (`Missing` when there is none).
    pub async fn match_model(&self, version: Option<i64>) -> Result<ModelInfo, IdentityError> {
        self.matching.model_info(version).await
    }

    /// The current match model's version (`None` before any was trained).
    pub async fn match_model_version(&self) -> Result<Option<i64>, IdentityError> {
        self.matching.model_version().await
    }

    /// Makes an earlier match model current again (a rollback), as a new version.
    pub async fn restore_match_model(&self, version: i64) -> Result<ModelInfo, IdentityError> {
        self.matching.restore(version).await
    }

    /// The auto-merge and review probabilities in force.
    pub fn match_thresholds(&self) -> (f64, f64) {
        (
            self.settings.matching.auto_merge_probability,
            self.settings.matching.review_probability,
        )
    }

    /// Matches the whole indexed population with the current model: runs a batch match job
    /// and waits for it (`FailedPrecondition` while another runs).
    pub async fn run_batch_match(&self) -> Result<BatchOutcome, IdentityError> {
        self.matching.run_batch(self.current()).await
    }

    /// Starts a batch match job in the background and answers it, running.
    pub async fn start_batch_match(&self) -> Result<BatchJob, IdentityError> {
        Ok(self.matching.start_batch(self.current()).await?.0)
    }

    /// Batch match job `id`; `Missing` when unknown.
    pub async fn batch_match_job(&self, id: i64) -> Result<BatchJob, IdentityError> {
        self.matching.batch_job(id).await
    }

    /// The `limit` most recent batch match jobs, newest first.
    pub async fn batch_match_jobs(&self, limit: i64) -> Result<Vec<BatchJob>, IdentityError> {
        self.matching.batch_jobs(limit).await
    }

    /// Match suggestions with `status` (all when `None`), newest first, ids below `before`.
    pub async fn match_suggestions(
        &self,
        status: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<StoredSuggestion>, IdentityError> {
        self.matching.suggestions(status, before, limit).await
    }

    /// Accepts or rejects an open suggestion; an accepted one merges its profiles.
    pub async fn decide_match_suggestion(
        &self,
        id: i64,
        accept: bool,
    ) -> Result<(StoredSuggestion, Option<domain::Merge>), IdentityError> {
        self.matching
            .decide_suggestion(&self.current(), id, accept)
            .await
    }

    /// Merges two profiles by a person's decision (rule `manual`, `reason` kept in the graph
    /// log). `None` when they already are one profile; `UnknownProfile` when either is unknown;
    /// `FailedPrecondition` when the identity rules refuse the merge.
    pub async fn merge_profiles(
        &self,
        pair: (Uuid, Uuid),
        reason: &str,
    ) -> Result<Option<domain::Merge>, IdentityError> {
        self.matching
            .merge_manually(&self.current(), pair, reason)
            .await
    }

    /// Tells the profile service (over `profile`) about merges decided outside the pipeline
    /// (probabilistic, accepted suggestions), until `shutdown`.
    pub fn spawn_merge_delivery(
        &self,
        profile: tonic::transport::Channel,
        shutdown: tessera_server::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let matching = Arc::clone(&self.matching);
        tokio::spawn(async move { matching.deliver_merges(profile, shutdown).await })
    }

    /// The graph log, oldest first: every decision (profile created, identifier linked or
    /// dropped, profiles merged) with its cause and rule.
    pub async fn graph_log(&self) -> Result<Vec<GraphDecision>, IdentityError> {
        self.store.graph_log().await
    }

    /// The graph of `profile` (followed to its survivor) with its newest `max_decisions`
    /// decisions. `UnknownProfile` when no profile has that id.
    pub async fn profile_graph(
        &self,
        profile: Uuid,
        max_decisions: i64,
    ) -> Result<ProfileGraph, IdentityError> {
        self.store
            .profile_graph(profile, max_decisions.clamp(1, MAX_GRAPH_DECISIONS))
            .await?
            .ok_or(IdentityError::UnknownProfile)
    }

    /// The history of the component `profile` belongs to: its members, and its events and the
    /// merges decided outside the pipeline in the order they were decided (what a replay of
    /// the component runs through). `UnknownProfile` for an unknown profile.
    pub async fn component_history(
        &self,
        profile: Uuid,
    ) -> Result<ComponentHistory, IdentityError> {
        self.store.component_history(profile).await
    }

    /// Reverts the merge of `merged` into the profile it was merged into, losslessly: the
    /// component is replayed with the two kept apart (the event that bridged them drops its
    /// lowest-priority identifier, rule `split`), the replayed graph replaces the stored one,
    /// and the pair is remembered so nothing merges them again. The profile service is told
    /// through the merge outbox (queued in the same transaction) and rebuilds both profiles.
    /// `FailedPrecondition` when `merged` is not merged; `UnknownProfile` when unknown.
    pub async fn unmerge_profile(
        &self,
        merged: Uuid,
        reason: &str,
    ) -> Result<Rewritten, IdentityError> {
        self.rewrite(&Change::Unmerge(merged), reason).await
    }

    /// Splits `identifier` (normalized first) off its profile, losslessly: the component is
    /// replayed with the identifier linking only when an event carries nothing else (rule
    /// `detached`), so the events it carried alone form a profile of their own (the profile
    /// that first had them keeps its id) and every other event stays with the identifiers it
    /// carried. It never links with another identifier again. The profile service is told
    /// through the merge outbox. `NotFound` when no profile holds the identifier.
    pub async fn detach_identifier(
        &self,
        identifier: Identifier,
        reason: &str,
    ) -> Result<Rewritten, IdentityError> {
        let identifier = self.linkable(identifier)?;
        self.rewrite(&Change::Detach(identifier), reason).await
    }

    /// Erases `identifier` (normalized first), a GDPR request: the component is replayed as if
    /// no event had carried it (a profile it bridged splits, rule `split` does not apply:
    /// nothing bridges any more), its value is replaced by a pseudonym in the graph log, its
    /// sightings are forgotten, the events that carried nothing else are erased (their
    /// resolutions deleted; the profile service deletes them), and only a digest is kept so it
    /// never links again. Erasing an identifier no profile holds still suppresses it.
    /// `NotFound` for a blocked value.
    pub async fn erase_identifier(
        &self,
        identifier: Identifier,
        reason: &str,
    ) -> Result<Rewritten, IdentityError> {
        let identifier = self.linkable(identifier)?;
        self.rewrite(&Change::Erase(identifier), reason).await
    }

    /// Forgets the person `profile` belongs to (the identity part of a GDPR deletion): every
    /// profile of its component, their identifiers, events' resolutions, sightings, merges,
    /// splits, matching rows and graph log entries are deleted, in one transaction. Only
    /// digests of the identifiers are kept: a later event that carries one of the person's
    /// user ids, emails, phones or custom identifiers is suppressed, and their anonymous and
    /// device ids (which may be shared) link nothing and suppress only an event that carries
    /// nothing else. Answers the canonical profile, every profile and event of the component and
    /// how many identifiers were forgotten; forgetting any profile of a forgotten component
    /// answers the same again. `UnknownProfile` for a profile that never existed.
    pub async fn forget_profile(
        &self,
        profile: Uuid,
        reason: &str,
    ) -> Result<Forgotten, IdentityError> {
        let (done, fresh) = self.store.forget(profile, reason).await?;
        let outcome = if fresh { "forgotten" } else { "repeated" };
        metrics::counter!("tessera_identity_forgets_total", "outcome" => outcome).increment(1);
        if fresh {
            tracing::info!(
                profile_id = %done.root,
                profiles = done.profiles.len(),
                events = done.events.len(),
                identifiers = done.identifiers,
                "person forgotten"
            );
        }
        Ok(done)
    }

    async fn rewrite(&self, change: &Change, reason: &str) -> Result<Rewritten, IdentityError> {
        let rules = self.current();
        let done = self.store.rewrite(&rules, change, reason).await?;
        metrics::counter!("tessera_identity_rewrites_total", "rule" => change.rule()).increment(1);
        // The split is queued for the profile service in the same transaction.
        self.matching.wake_delivery();
        Ok(done)
    }

    /// `identifier` normalized under the rules in force; `NotFound` for a blocked value.
    fn linkable(&self, identifier: Identifier) -> Result<Identifier, IdentityError> {
        let normalized = domain::normalize(&self.current().rules, identifier).map_err(|errs| {
            IdentityError::InvalidArgument(
                errs.into_iter()
                    .map(|v: FieldViolation| v.prefixed("identifier"))
                    .collect(),
            )
        })?;
        match normalized {
            Normalized::Unlinked(..) => Err(IdentityError::NotFound),
            Normalized::Linkable(identifier) => Ok(identifier),
        }
    }

    /// The version the rules in force are registered under.
    pub fn rules_version(&self) -> i64 {
        self.current().version
    }

    /// The rules in force, with their version.
    pub fn rules(&self) -> Arc<VersionedRules> {
        self.current()
    }

    /// Adds the `IdentityService` and `BatchMatchService` gRPC servers to `services`.
    pub fn register(&self, services: &mut tessera_server::GrpcServices) {
        services.add(
            IdentityServiceServer::new(service::IdentityGrpc::new(self.clone()))
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
        );
        // RunBatchMatch waits for a batch match job, which takes minutes on a large
        // population: only the caller's deadline bounds it (the job goes on either way).
        services.without_request_timeout(format!(
            "/{}/RunBatchMatch",
            <IdentityServiceServer<service::IdentityGrpc> as tonic::server::NamedService>::NAME
        ));
        services.add(BatchMatchServiceServer::new(service::BatchMatchGrpc::new(
            self.clone(),
        )));
    }

    /// The most records one batch may carry.
    pub fn max_batch(&self) -> usize {
        self.settings.max_batch
    }

    /// Resolves `records` in order: one resolution per record, naming the profile each event
    /// belongs to once the whole batch is resolved. An event resolved before (in an earlier
    /// batch, or earlier in this one) is not resolved again: it gets its stored profile, followed
    /// to its current survivor, and the merges it caused then. An event that carries an
    /// identifier of a forgotten person that suppresses events, or only erased identifiers, is
    /// suppressed (no profile, nothing written); it is found suppressed again every time.
    pub async fn resolve(&self, records: Vec<Record>) -> Result<Vec<Resolution>, IdentityError> {
        self.resolve_under(&self.current(), records).await
    }

    /// [`Self::resolve`] under `rules` (those the records were normalized with).
    pub async fn resolve_under(
        &self,
        rules: &VersionedRules,
        records: Vec<Record>,
    ) -> Result<Vec<Resolution>, IdentityError> {
        let max = self.settings.max_batch;
        if records.len() > max {
            return Err(IdentityError::BatchTooLarge {
                len: records.len(),
                max,
            });
        }
        // A later record of the batch repeating an event is answered as its first; an event
        // resolved in an earlier batch is found by its run (which reads the stored resolutions
        // under its locks) and not resolved again.
        let mut seen = HashSet::new();
        let firsts: std::borrow::Cow<'_, [Record]> =
            if records.iter().all(|r| seen.insert(r.event_id())) {
                std::borrow::Cow::Borrowed(&records)
            } else {
                let mut seen = HashSet::new();
                std::borrow::Cow::Owned(
                    records
                        .iter()
                        .filter(|r| seen.insert(r.event_id()))
                        .cloned()
                        .collect(),
                )
            };
        metrics::counter!("tessera_identity_records_total", "outcome" => "replayed")
            .increment((records.len() - firsts.len()) as u64);
        let mut outcomes: HashMap<String, Outcome> = HashMap::with_capacity(firsts.len());
        for run in firsts.chunks(RUN_LEN) {
            let stored = self.store.resolve(rules, run).await?;
            if stored.len() != run.len() {
                return Err(IdentityError::Corrupt(format!(
                    "{} resolutions for {} records",
                    stored.len(),
                    run.len()
                )));
            }
            for (record, stored) in run.iter().zip(stored) {
                outcomes.insert(record.event_id().to_owned(), stored);
            }
        }
        drop(firsts);

        // Later records of the batch, or other replicas, may have merged the profiles since.
        let mut profiles: Vec<Uuid> = outcomes
            .values()
            .filter_map(|outcome| match outcome {
                Outcome::Stored(stored) => Some(stored.profile_id),
                Outcome::Suppressed => None,
            })
            .collect();
        profiles.sort_unstable();
        profiles.dedup();
        // Only the merged ones come back: the others are their own survivors.
        let canonical: HashMap<Uuid, Uuid> = self.store.survivors(&profiles).await?;

        records
            .into_iter()
            .map(|record| {
                let outcome = outcomes.get(record.event_id()).ok_or_else(|| {
                    IdentityError::Corrupt("an event was left unresolved".to_owned())
                })?;
                let stored = match outcome {
                    Outcome::Stored(stored) => stored,
                    Outcome::Suppressed => {
                        return Ok(Resolution::suppressed_event(
                            record.event_id(),
                            record.timestamp(),
                        ));
                    }
                };
                let profile_id = canonical
                    .get(&stored.profile_id)
                    .copied()
                    .unwrap_or(stored.profile_id);
                let (identifiers, dropped) = match &stored.detail {
                    Some(detail) => (detail.identifiers.clone(), detail.dropped.clone()),
                    // Resolved before the rules existed: everything linkable was linked.
                    None => (record.identifiers().to_vec(), Vec::new()),
                };
                Ok(Resolution {
                    event_id: record.event_id().to_owned(),
                    profile_id,
                    identifiers,
                    merges: stored.merges.clone(),
                    dropped,
                    event_time: stored
                        .detail
                        .as_ref()
                        .and_then(|d| d.event_time)
                        .unwrap_or_else(|| record.timestamp()),
                    suppressed: false,
                })
            })
            .collect()
    }

    /// The profile `identifier` (normalized first) belongs to now. `NotFound` when the graph
    /// does not hold it or its value is blocked.
    pub async fn lookup(&self, identifier: Identifier) -> Result<Uuid, IdentityError> {
        let identifier = self.linkable(identifier)?;
        self.store
            .lookup(&identifier)
            .await?
            .ok_or(IdentityError::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_and_reject_unknown_keys() {
        let s: IdentitySettings = serde_json::from_str("{}").unwrap();
        assert_eq!(s.max_batch, 5_000);
        assert_eq!(s.rules, RulesConfig::default());
        assert!(serde_json::from_str::<IdentitySettings>(r#"{"max_btch": 1}"#).is_err());
    }

    #[test]
    fn migrations_are_embedded_for_both_backends() {
        assert!(MIGRATIONS.postgres.iter().next().is_some());
        assert!(MIGRATIONS.sqlite.iter().next().is_some());
    }
}
