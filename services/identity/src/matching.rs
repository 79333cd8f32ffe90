//! Probabilistic matching in the service: which traits feed which attribute, the attribute
//! index in the store, the current model, incremental matching of changed profiles, training,
//! the batch job, suggestions, and telling the profile service about the merges.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tessera_core::FieldViolation;
use tessera_proto::profile::v1 as profile_pb;
use tessera_proto::profile::v1::profile_pipeline_service_client::ProfilePipelineServiceClient;
use tokio::sync::{Notify, RwLock};
use uuid::Uuid;

use crate::IdentityError;
use crate::domain::matching::{
    Attributes, BlockKey, Matcher, MatchingConfig, MemoryIndex, Model, ModelParams, Score, Scratch,
    match_record, train,
};
use crate::domain::{Merge, SPLIT};
use crate::store::{
    IdentityStore, IndexEntry, MatchStore, SplitPayload, StoredSuggestion, VersionedRules,
};

/// The rule probabilistic merges are recorded under.
pub const PROBABILISTIC: &str = "probabilistic";
/// The rule merges accepted by a person are recorded under.
pub const MANUAL: &str = "manual";

/// Probabilistic matching settings (`[identity.matching]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchSettings {
    /// Whether profiles are indexed and matched at all.
    pub enabled: bool,
    /// Pairs whose match probability is at least this merge by themselves (rules permitting);
    /// 1 means never: every match above `review_probability` waits for a person.
    pub auto_merge_probability: f64,
    /// Pairs at least this probable, below `auto_merge_probability`, become suggestions.
    pub review_probability: f64,
    /// Which traits feed each compared attribute: the first present wins. A name may be a path
    /// into an object trait (`address.city`).
    pub attributes: BTreeMap<String, Vec<String>>,
    /// The model: comparisons, blocking rules and estimation (its `threshold` is replaced by
    /// `review_probability`).
    pub model: MatchingConfig,
}

impl Default for MatchSettings {
    fn default() -> Self {
        let names = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        Self {
            enabled: true,
            // Equal costs for a false merge and a missed one would put the decision at 0.5;
            // a false merge is the costlier mistake (it fuses two people's data), so merging
            // needs near-certainty and the band below it goes to a person.
            auto_merge_probability: 0.99,
            review_probability: 0.5,
            attributes: BTreeMap::from([
                (
                    "given_name".to_owned(),
                    names(&["given_name", "firstName", "first_name"]),
                ),
                (
                    "surname".to_owned(),
                    names(&["surname", "lastName", "last_name"]),
                ),
                (
                    "date_of_birth".to_owned(),
                    names(&["date_of_birth", "birthday", "dob"]),
                ),
                (
                    "street_number".to_owned(),
                    names(&["street_number", "address.street_number"]),
                ),
                (
                    "address_1".to_owned(),
                    names(&["address_1", "address.street", "street"]),
                ),
                (
                    "address_2".to_owned(),
                    names(&["address_2", "address.line2"]),
                ),
                (
                    "suburb".to_owned(),
                    names(&["suburb", "city", "address.city"]),
                ),
                (
                    "postcode".to_owned(),
                    names(&[
                        "postcode",
                        "postal_code",
                        "postalCode",
                        "zip",
                        "address.postalCode",
                    ]),
                ),
                ("state".to_owned(), names(&["state", "address.state"])),
            ]),
            model: MatchingConfig::default(),
        }
    }
}

/// What matching a set of profiles decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MatchOutcome {
    /// Merges, in the order decided.
    pub merges: Vec<Merge>,
    /// Suggestions stored.
    pub suggestions: i64,
    /// Matches the rules refused.
    pub refused: i64,
}

/// What a batch match did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutcome {
    /// The model version used.
    pub model_version: i64,
    /// Profiles matched.
    pub profiles: i64,
    /// Pairs at or above the review threshold.
    pub candidate_pairs: i64,
    /// What was decided.
    pub outcome: MatchOutcome,
}

/// Where a batch match job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchJobState {
    /// Running on some replica.
    Running,
    /// Done: its progress is the batch's summary.
    Succeeded,
    /// Stopped by an error, or its replica stopped renewing its lease.
    Failed,
}

impl BatchJobState {
    /// The state as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    /// A stored state.
    pub(crate) fn parse(state: &str) -> Result<Self, IdentityError> {
        match state {
            "running" => Ok(Self::Running),
            "succeeded" => Ok(Self::Succeeded),
            "failed" => Ok(Self::Failed),
            other => Err(IdentityError::Corrupt(format!(
                "batch match job state {other:?}"
            ))),
        }
    }
}

/// The counts of a batch match job: its progress while it runs, its summary once done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchProgress {
    /// The model version used (0 until read).
    pub model_version: i64,
    /// Profiles matched (0 until read).
    pub profiles: i64,
    /// Pairs at or above the review probability (0 until scored).
    pub candidate_pairs: i64,
    /// Candidate pairs decided so far (merged, refused or set aside for a suggestion).
    pub pairs_done: i64,
    /// Profiles merged so far.
    pub merges: i64,
    /// Suggestions stored (written at the end).
    pub suggestions: i64,
    /// Matches the rules refused so far.
    pub refused: i64,
}

/// A batch match job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchJob {
    /// Its id, from 1.
    pub id: i64,
    /// Its state.
    pub state: BatchJobState,
    /// Its counts.
    pub progress: BatchProgress,
    /// Why it failed; empty otherwise.
    pub error: String,
    /// When it started.
    pub started_at: time::OffsetDateTime,
    /// When it last reported progress.
    pub updated_at: time::OffsetDateTime,
    /// When it finished.
    pub finished_at: Option<time::OffsetDateTime>,
}

/// How long a running job's lease lasts without renewal: a replica that died holds the batch
/// match this long at most.
const JOB_LEASE: Duration = Duration::from_secs(30);
/// How often the replica running a job renews its lease (scoring may report nothing for long).
const JOB_RENEW: Duration = Duration::from_secs(5);
/// Why a job whose lease expired failed.
pub(crate) const JOB_LEASE_EXPIRED: &str =
    "its replica stopped renewing the job's lease (stopped or died); start a new batch match";

/// One field's fitted parameters: per level (label, m, u), `else` last.
pub type FieldFit = (String, Vec<(String, f64, f64)>);

/// Profiles to match: id and current trait values.
pub type ProfileTraits = Vec<(Uuid, Map<String, Value>)>;

/// A fitted model's report, as stored and answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// The model version.
    pub model_version: i64,
    /// Profiles fitted on.
    pub profiles: i64,
    /// Blocked candidate pairs EM ran over.
    pub candidate_pairs: i64,
    /// Random pairs that estimated u.
    pub u_pairs: i64,
    /// EM iterations.
    pub iterations: i64,
    /// Whether EM converged.
    pub converged: bool,
    /// Final mean log-likelihood per pair.
    pub mean_log_likelihood: f64,
    /// The fitted prior.
    pub lambda: f64,
    /// Per field: (level label, m, u), `else` last.
    pub fields: Vec<FieldFit>,
    /// The version this one restored (its parameters copied), when it was made by restoring
    /// an earlier model rather than by training.
    #[serde(default)]
    pub restored_from: Option<i64>,
}

/// A stored model as described to people: its training report and when it was trained.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The report (the restored model's, for a restored one), with this model's version.
    pub summary: TrainingSummary,
    /// When the model was stored.
    pub trained_at: time::OffsetDateTime,
}

/// Matching state of one replica.
pub(crate) struct Matching {
    settings: MatchSettings,
    matcher: Matcher,
    store: Arc<dyn MatchStore>,
    model: RwLock<Option<(i64, Arc<Model>)>>,
    /// Woken when merges were queued for the profile service.
    queued: Notify,
    /// This replica's name as the holder of a batch match job's lease.
    owner: String,
}

impl std::fmt::Debug for Matching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matching")
            .field("enabled", &self.settings.enabled)
            .finish_non_exhaustive()
    }
}

fn no_model() -> IdentityError {
    IdentityError::FailedPrecondition(
        "no match model is trained yet: call TrainMatchModel first".to_owned(),
    )
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> IdentityError {
    IdentityError::InvalidArgument(vec![FieldViolation::new(field, reason)])
}

impl Matching {
    pub(crate) fn new(
        settings: MatchSettings,
        store: Arc<dyn MatchStore>,
    ) -> Result<Self, IdentityError> {
        let (auto, review) = (settings.auto_merge_probability, settings.review_probability);
        if !(review > 0.0 && review < 1.0) {
            return Err(invalid(
                "matching.review_probability",
                "must be between 0 and 1, exclusive",
            ));
        }
        if !(auto >= review && auto <= 1.0) {
            return Err(invalid(
                "matching.auto_merge_probability",
                "must be at least review_probability and at most 1 (1: never merge automatically)",
            ));
        }
        let mut config = settings.model.clone();
        config.threshold = review;
        let matcher = Matcher::new(config)
            .map_err(|e| invalid(format!("matching.model.{}", e.field), e.reason))?;
        for (n, comparison) in matcher.comparisons().iter().enumerate() {
            if !settings.attributes.contains_key(&comparison.field) {
                tracing::debug!(
                    field = %comparison.field,
                    n,
                    "no traits feed this compared attribute"
                );
            }
        }
        Ok(Self {
            settings,
            matcher,
            store,
            model: RwLock::new(None),
            queued: Notify::new(),
            owner: Uuid::new_v4().to_string(),
        })
    }

    /// The current model's version, if any.
    pub(crate) async fn model_version(&self) -> Result<Option<i64>, IdentityError> {
        self.store.model_version().await
    }

    /// Wakes the outbox delivery (something was queued).
    pub(crate) fn wake_delivery(&self) {
        self.queued.notify_one();
    }

    /// The attributes `traits` give, normalized.
    fn attributes(&self, traits: &Map<String, Value>) -> Attributes {
        let mut raw: Vec<(&str, String)> = Vec::new();
        for (attribute, names) in &self.settings.attributes {
            if let Some(value) = names.iter().find_map(|name| scalar(lookup(traits, name)?)) {
                raw.push((attribute.as_str(), value));
            }
        }
        self.matcher
            .attributes(raw.iter().map(|(a, v)| (*a, v.as_str())))
    }

    /// Attributes as stored: a JSON object of the present fields.
    fn to_json(&self, attributes: &Attributes) -> String {
        let mut map = Map::new();
        for (index, comparison) in self.matcher.comparisons().iter().enumerate() {
            if let Some(value) = attributes.get(index) {
                map.insert(comparison.field.clone(), Value::String(value.to_owned()));
            }
        }
        Value::Object(map).to_string()
    }

    fn parse_attributes(&self, json: &str) -> Attributes {
        let map: Map<String, Value> = serde_json::from_str(json).unwrap_or_default();
        self.matcher.attributes(
            map.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.as_str(), v))),
        )
    }

    /// The model in force, reloaded when another replica (or this one) trained a newer one.
    async fn current_model(&self) -> Result<Option<(i64, Arc<Model>)>, IdentityError> {
        let latest = self.store.model_version().await?;
        if let Some(cached) = self.model.read().await.as_ref()
            && Some(cached.0) == latest
        {
            return Ok(Some(cached.clone()));
        }
        let Some((version, params)) = self.store.latest_model().await? else {
            return Ok(None);
        };
        let params: ModelParams = serde_json::from_str(&params).map_err(|e| {
            IdentityError::Corrupt(format!("match model {version} does not decode: {e}"))
        })?;
        let model = Model::new(self.matcher.clone(), params).map_err(|e| {
            IdentityError::Corrupt(format!(
                "match model {version} does not fit the matching config ({}): retrain it",
                e.field
            ))
        })?;
        let entry = (version, Arc::new(model));
        *self.model.write().await = Some(entry.clone());
        Ok(Some(entry))
    }

    /// Indexes `profiles` (id → trait values) and, with a model, matches each against the
    /// profiles sharing a blocking key.
    pub(crate) async fn match_profiles(
        &self,
        graph: &dyn IdentityStore,
        rules: &VersionedRules,
        profiles: ProfileTraits,
    ) -> Result<MatchOutcome, IdentityError> {
        let mut outcome = MatchOutcome::default();
        if !self.settings.enabled || profiles.is_empty() {
            return Ok(outcome);
        }
        let ids: Vec<Uuid> = profiles.iter().map(|(id, _)| *id).collect();
        let canonical = graph.canonical(&ids).await?;
        let mut entries: HashMap<Uuid, (Attributes, Vec<BlockKey>)> = HashMap::new();
        for (id, traits) in &profiles {
            let Some(profile) = canonical.get(id) else {
                continue;
            };
            let attributes = self.attributes(traits);
            if attributes.is_empty() || (0..attributes.len()).all(|i| attributes.get(i).is_none()) {
                continue;
            }
            let keys = self.matcher.keys(&attributes);
            entries.insert(*profile, (attributes, keys));
        }
        let index: Vec<IndexEntry> = entries
            .iter()
            .map(|(profile, (attributes, keys))| IndexEntry {
                profile_id: *profile,
                attributes: self.to_json(attributes),
                keys: keys.iter().map(key_text).collect(),
            })
            .collect();
        let model = self.current_model().await?;
        let pending: std::collections::HashSet<Uuid> = self
            .store
            .index(&index, model.as_ref().map(|(version, _)| *version))
            .await?
            .into_iter()
            .collect();
        metrics::counter!("tessera_identity_match_profiles_indexed_total")
            .increment(index.len() as u64);
        let Some((version, model)) = model else {
            return Ok(outcome);
        };
        metrics::counter!("tessera_identity_match_profiles_skipped_total")
            .increment((index.len() - pending.len()) as u64);
        let cap = i64::try_from(self.matcher.config().max_block_size).unwrap_or(i64::MAX);
        let mut scratch = Scratch::default();
        // A profile already matched with this model, whose attributes did not change since,
        // is not matched again: profiles that arrived since were matched against it from their
        // side. A new model, or new attributes, match it again.
        let pending: Vec<&IndexEntry> = index
            .iter()
            .filter(|e| pending.contains(&e.profile_id))
            .collect();
        // The blocks of every pending profile in one read, not one per profile (the profile
        // service sends a batch's survivors back here: hundreds after a batch match). A
        // profile merged away by an earlier decision of this call has lost its keys: it is
        // left out from then on, as a read after the merge would leave it out.
        let keys: Vec<String> = pending
            .iter()
            .flat_map(|e| e.keys.iter().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let rows = if keys.is_empty() {
            Vec::new()
        } else {
            self.store.candidates(&keys, cap).await?
        };
        let mut blocks: HashMap<&str, Vec<(Uuid, &str)>> = HashMap::new();
        for (key, profile, attributes) in &rows {
            blocks
                .entry(key.as_str())
                .or_default()
                .push((*profile, attributes.as_str()));
        }
        let mut gone: std::collections::HashSet<Uuid> = std::collections::HashSet::new();
        let mut matched: Vec<(Uuid, &str)> = Vec::with_capacity(pending.len());
        for entry in pending {
            let mut nearby: MemoryIndex<Uuid> = MemoryIndex::default();
            let mut filed: HashMap<Uuid, (&str, Vec<BlockKey>)> = HashMap::new();
            let own: std::collections::BTreeSet<&String> = entry.keys.iter().collect();
            for key in own {
                for (profile, attributes) in blocks.get(key.as_str()).into_iter().flatten() {
                    if gone.contains(profile) {
                        continue;
                    }
                    let slot = filed
                        .entry(*profile)
                        .or_insert_with(|| (attributes, Vec::new()));
                    if let Some(key) = parse_key(key) {
                        slot.1.push(key);
                    }
                }
            }
            for (profile, (attributes, keys)) in filed {
                nearby.upsert(profile, self.parse_attributes(attributes), keys);
            }
            let Some((attributes, _)) = entries.get(&entry.profile_id) else {
                continue;
            };
            let scored = match_record(
                &model,
                &nearby,
                Some(&entry.profile_id),
                attributes,
                &mut scratch,
            );
            let merged_before = outcome.merges.len();
            for candidate in scored {
                self.decide(
                    rules,
                    (entry.profile_id, candidate.id),
                    &candidate.score,
                    version,
                    &mut outcome,
                )
                .await?;
            }
            gone.extend(
                outcome.merges[merged_before..]
                    .iter()
                    .map(|m| m.merged_profile_id),
            );
            matched.push((entry.profile_id, entry.attributes.as_str()));
        }
        // Only once their decisions are stored: a failure before this matches them again
        // (merging and suggesting again find nothing new). A profile whose attributes another
        // call changed meanwhile stays unmatched, to be matched with them.
        self.store.mark_matched(&matched, version).await?;
        Ok(outcome)
    }

    /// Merges (auto-merge band) or suggests (review band) one scored pair.
    async fn decide(
        &self,
        rules: &VersionedRules,
        pair: (Uuid, Uuid),
        score: &Score,
        version: i64,
        outcome: &mut MatchOutcome,
    ) -> Result<(), IdentityError> {
        let explanation = explanation_json(score, version);
        let auto = self.settings.auto_merge_probability;
        if auto < 1.0 && score.probability >= auto {
            match self
                .store
                .merge_pair(
                    rules,
                    pair,
                    &format!("match:model-{version}"),
                    PROBABILISTIC,
                    Some(explanation),
                )
                .await?
            {
                Ok(merge) => {
                    metrics::counter!("tessera_identity_match_merges_total").increment(1);
                    outcome.merges.push(merge);
                    self.queued.notify_one();
                }
                Err(reason) if reason == "same_profile" => {}
                Err(reason) => {
                    metrics::counter!("tessera_identity_match_refused_total").increment(1);
                    tracing::debug!(%reason, a = %pair.0, b = %pair.1, "rules refused a probabilistic merge");
                    outcome.refused += 1;
                }
            }
        } else if self.store.suggest(pair, &explanation).await? {
            metrics::counter!("tessera_identity_match_suggestions_total").increment(1);
            outcome.suggestions += 1;
        }
        Ok(())
    }

    /// Fits a model over the indexed population and makes it current.
    pub(crate) async fn train(&self) -> Result<TrainingSummary, IdentityError> {
        let started = std::time::Instant::now();
        let population = self.store.population().await?;
        let read = started.elapsed();
        if population.len() < 2 {
            return Err(IdentityError::FailedPrecondition(format!(
                "{} profiles are indexed for matching; a model needs at least 2",
                population.len()
            )));
        }
        let records: Vec<Attributes> = population
            .iter()
            .map(|(_, json)| self.parse_attributes(json))
            .collect();
        let matcher = self.matcher.clone();
        let (model, report) = tokio::task::spawn_blocking(move || train(matcher, &records))
            .await
            .map_err(|e| IdentityError::Corrupt(format!("training panicked: {e}")))?;
        let fitted = started.elapsed();
        let params = serde_json::to_string(model.params())
            .map_err(|e| IdentityError::Corrupt(format!("model does not encode: {e}")))?;
        let mut summary = TrainingSummary {
            model_version: 0,
            profiles: population.len() as i64,
            candidate_pairs: report.blocking.candidate_pairs as i64,
            u_pairs: report.u_pairs as i64,
            iterations: report.em.iterations as i64,
            converged: report.em.converged,
            mean_log_likelihood: report.em.mean_log_likelihood,
            lambda: model.params().lambda,
            fields: model
                .params()
                .fields
                .iter()
                .zip(self.matcher.comparisons())
                .map(|(params, comparison)| {
                    let mut labels: Vec<String> =
                        comparison.levels.iter().map(|l| l.label()).collect();
                    labels.push(crate::domain::matching::ELSE_LABEL.to_owned());
                    let levels = labels
                        .into_iter()
                        .zip(params.m.iter().zip(&params.u))
                        .map(|(label, (m, u))| (label, *m, *u))
                        .collect();
                    (params.field.clone(), levels)
                })
                .collect(),
            restored_from: None,
        };
        let report = serde_json::to_string(&summary)
            .map_err(|e| IdentityError::Corrupt(format!("report does not encode: {e}")))?;
        summary.model_version = self.store.save_model(&params, &report).await?;
        tracing::info!(
            version = summary.model_version,
            profiles = summary.profiles,
            pairs = summary.candidate_pairs,
            converged = summary.converged,
            read_ms = read.as_millis() as u64,
            fit_ms = (fitted - read).as_millis() as u64,
            save_ms = (started.elapsed() - fitted).as_millis() as u64,
            params_bytes = params.len(),
            "match model trained"
        );
        Ok(summary)
    }

    /// Model `version` (the current one when `None`). `Missing` when there is none.
    pub(crate) async fn model_info(
        &self,
        version: Option<i64>,
    ) -> Result<ModelInfo, IdentityError> {
        let stored = self
            .store
            .model(version)
            .await?
            .ok_or(IdentityError::Missing("match model"))?;
        let mut summary: TrainingSummary = serde_json::from_str(&stored.report).map_err(|e| {
            IdentityError::Corrupt(format!(
                "match model {} report does not decode: {e}",
                stored.version
            ))
        })?;
        summary.model_version = stored.version;
        Ok(ModelInfo {
            summary,
            trained_at: stored.trained_at,
        })
    }

    /// Makes model `version` current again by storing its parameters as the newest version
    /// (the log of models stays append-only). `Missing` for an unknown version;
    /// `FailedPrecondition` when the model no longer fits the matching config (fields or levels
    /// changed since it was trained). Every replica uses it from its next match on.
    pub(crate) async fn restore(&self, version: i64) -> Result<ModelInfo, IdentityError> {
        let stored = self
            .store
            .model(Some(version))
            .await?
            .ok_or(IdentityError::Missing("match model"))?;
        let params: ModelParams = serde_json::from_str(&stored.params).map_err(|e| {
            IdentityError::Corrupt(format!("match model {version} does not decode: {e}"))
        })?;
        if let Err(e) = Model::new(self.matcher.clone(), params) {
            return Err(IdentityError::FailedPrecondition(format!(
                "match model {version} does not fit the matching config ({}): train a new one",
                e.field
            )));
        }
        let mut summary: TrainingSummary = serde_json::from_str(&stored.report).map_err(|e| {
            IdentityError::Corrupt(format!("match model {version} report does not decode: {e}"))
        })?;
        summary.restored_from = Some(summary.restored_from.unwrap_or(version));
        let report = serde_json::to_string(&summary)
            .map_err(|e| IdentityError::Corrupt(format!("report does not encode: {e}")))?;
        let restored = self.store.save_model(&stored.params, &report).await?;
        tracing::info!(version = restored, from = version, "match model restored");
        self.model_info(Some(restored)).await
    }

    /// Starts a batch match job running `rules` in the background, unless one runs
    /// (`FailedPrecondition` naming it) or no model is trained yet. Answers the job and what it
    /// will end with; the job goes on whether that is awaited or not.
    pub(crate) async fn start_batch(
        self: &Arc<Self>,
        rules: Arc<VersionedRules>,
    ) -> Result<
        (
            BatchJob,
            tokio::sync::oneshot::Receiver<Result<BatchOutcome, IdentityError>>,
        ),
        IdentityError,
    > {
        if self.current_model().await?.is_none() {
            return Err(no_model());
        }
        let job = match self.store.start_batch_job(&self.owner, JOB_LEASE).await? {
            Ok(job) => job,
            Err(running) => {
                return Err(IdentityError::FailedPrecondition(format!(
                    "batch match job {} is running: poll it with GetBatchMatchJob",
                    running.id
                )));
            }
        };
        tracing::info!(job = job.id, "batch match job started");
        let (done, outcome) = tokio::sync::oneshot::channel();
        let matching = Arc::clone(self);
        let id = job.id;
        tokio::spawn(async move {
            let renewing = Arc::clone(&matching);
            let progress = Arc::new(std::sync::Mutex::new(BatchProgress::default()));
            let renewed = Arc::clone(&progress);
            let renew = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(JOB_RENEW).await;
                    let now = *renewed.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Err(e) = renewing
                        .store
                        .batch_job_progress(id, &renewing.owner, &now, JOB_LEASE)
                        .await
                    {
                        tracing::warn!(job = id, error = %e, "renewing a batch match job failed");
                    }
                }
            });
            // Run apart, so a panic is a failed job rather than a job running forever.
            let worker = Arc::clone(&matching);
            let seen = Arc::clone(&progress);
            let result = tokio::spawn(async move { worker.batch(&rules, id, &seen).await })
                .await
                .unwrap_or_else(|e| {
                    Err(IdentityError::Corrupt(format!(
                        "batch matching panicked: {e}"
                    )))
                });
            renew.abort();
            let last = *progress.lock().unwrap_or_else(PoisonError::into_inner);
            let error = result.as_ref().err().map(ToString::to_string);
            if let Err(e) = &result {
                tracing::error!(job = id, error = %e, "batch match job failed");
            }
            if let Err(e) = matching
                .store
                .finish_batch_job(id, &matching.owner, &last, error.as_deref())
                .await
            {
                tracing::error!(job = id, error = %e, "recording the end of a batch match job failed");
            }
            // The caller may have gone: the job's row is the outcome then.
            let _ = done.send(result);
        });
        Ok((job, outcome))
    }

    /// Runs a batch match job and waits for it (RunBatchMatch).
    pub(crate) async fn run_batch(
        self: &Arc<Self>,
        rules: Arc<VersionedRules>,
    ) -> Result<BatchOutcome, IdentityError> {
        let (_, outcome) = self.start_batch(rules).await?;
        outcome.await.map_err(|_| {
            IdentityError::Corrupt("the batch match job ended without an outcome".to_owned())
        })?
    }

    /// Batch match job `id`.
    pub(crate) async fn batch_job(&self, id: i64) -> Result<BatchJob, IdentityError> {
        self.store
            .batch_job(id)
            .await?
            .ok_or(IdentityError::Missing("batch match job"))
    }

    /// The `limit` most recent batch match jobs, newest first.
    pub(crate) async fn batch_jobs(&self, limit: i64) -> Result<Vec<BatchJob>, IdentityError> {
        self.store.batch_jobs(limit).await
    }

    /// Records `progress` of job `id` (and renews its lease).
    async fn report(
        &self,
        id: i64,
        shared: &std::sync::Mutex<BatchProgress>,
        progress: BatchProgress,
    ) -> Result<(), IdentityError> {
        *shared.lock().unwrap_or_else(PoisonError::into_inner) = progress;
        if !self
            .store
            .batch_job_progress(id, &self.owner, &progress, JOB_LEASE)
            .await?
        {
            // Its lease expired (this replica stalled) and it was marked failed: stop, since
            // another job may be running now.
            return Err(IdentityError::FailedPrecondition(
                JOB_LEASE_EXPIRED.to_owned(),
            ));
        }
        Ok(())
    }

    /// Matches the whole indexed population with the current model, strongest pairs first, as
    /// job `id`, reporting its progress in `progress` and the job's row.
    async fn batch(
        &self,
        rules: &VersionedRules,
        id: i64,
        progress: &std::sync::Mutex<BatchProgress>,
    ) -> Result<BatchOutcome, IdentityError> {
        let Some((version, model)) = self.current_model().await? else {
            return Err(no_model());
        };
        let started = std::time::Instant::now();
        let population = self.store.population().await?;
        let read = started.elapsed();
        let records: Vec<(Uuid, Attributes)> = population
            .iter()
            .map(|(id, json)| (*id, self.parse_attributes(json)))
            .collect();
        let scoring = Arc::clone(&model);
        let pairs = tokio::task::spawn_blocking(move || {
            let mut index: MemoryIndex<Uuid> = MemoryIndex::default();
            for (id, attributes) in &records {
                let keys = scoring.matcher().keys(attributes);
                index.upsert(*id, attributes.clone(), keys);
            }
            let mut scratch = Scratch::default();
            let mut pairs: Vec<((Uuid, Uuid), Score)> = Vec::new();
            for (id, attributes) in &records {
                for candidate in match_record(&scoring, &index, Some(id), attributes, &mut scratch)
                {
                    // Each pair is found from both sides; keep it once.
                    if *id < candidate.id {
                        pairs.push(((*id, candidate.id), candidate.score));
                    }
                }
            }
            pairs.sort_by(|a, b| b.1.weight.total_cmp(&a.1.weight));
            pairs
        })
        .await
        .map_err(|e| IdentityError::Corrupt(format!("batch matching panicked: {e}")))?;
        let scored = started.elapsed();
        let mut out = BatchOutcome {
            model_version: version,
            profiles: population.len() as i64,
            candidate_pairs: pairs.len() as i64,
            outcome: MatchOutcome::default(),
        };
        let counts = |out: &BatchOutcome, pairs_done: usize| BatchProgress {
            model_version: out.model_version,
            profiles: out.profiles,
            candidate_pairs: out.candidate_pairs,
            pairs_done: pairs_done as i64,
            merges: out.outcome.merges.len() as i64,
            suggestions: out.outcome.suggestions,
            refused: out.outcome.refused,
        };
        self.report(id, progress, counts(&out, 0)).await?;
        // The merges are decided in memory and written set-based, a chunk of pairs per
        // transaction (short enough not to hold up resolution on SQLite's one connection);
        // suggestions are written together at the end (merges never depend on them).
        const CHUNK: usize = 5_000;
        let cause = format!("match:model-{version}");
        let auto = self.settings.auto_merge_probability;
        let mut chunk: Vec<((Uuid, Uuid), Option<String>)> = Vec::with_capacity(CHUNK);
        let mut suggestions: Vec<((Uuid, Uuid), String)> = Vec::new();
        for (done, (pair, score)) in pairs.iter().enumerate() {
            if auto < 1.0 && score.probability >= auto {
                chunk.push((*pair, Some(explanation_json(score, version))));
                if chunk.len() == CHUNK {
                    self.merge_chunk(rules, &chunk, &cause, &mut out.outcome)
                        .await?;
                    chunk.clear();
                    self.report(id, progress, counts(&out, done + 1)).await?;
                }
            } else {
                suggestions.push((*pair, explanation_json(score, version)));
            }
        }
        self.merge_chunk(rules, &chunk, &cause, &mut out.outcome)
            .await?;
        let merged = started.elapsed();
        let stored = self.store.suggest_all(&suggestions).await?;
        metrics::counter!("tessera_identity_match_suggestions_total").increment(stored as u64);
        out.outcome.suggestions += stored;
        *progress.lock().unwrap_or_else(PoisonError::into_inner) = counts(&out, pairs.len());
        tracing::info!(
            job = id,
            model_version = version,
            profiles = out.profiles,
            pairs = out.candidate_pairs,
            merges = out.outcome.merges.len(),
            refused = out.outcome.refused,
            suggestions = stored,
            read_ms = read.as_millis() as u64,
            score_ms = (scored - read).as_millis() as u64,
            merge_ms = (merged - scored).as_millis() as u64,
            suggest_ms = (started.elapsed() - merged).as_millis() as u64,
            "batch match done"
        );
        Ok(out)
    }

    /// Merges a chunk of pairs in one transaction and counts the outcomes.
    async fn merge_chunk(
        &self,
        rules: &VersionedRules,
        chunk: &[((Uuid, Uuid), Option<String>)],
        cause: &str,
        outcome: &mut MatchOutcome,
    ) -> Result<(), IdentityError> {
        if chunk.is_empty() {
            return Ok(());
        }
        for result in self
            .store
            .merge_pairs(rules, chunk, cause, PROBABILISTIC)
            .await?
        {
            match result {
                Ok(merge) => {
                    metrics::counter!("tessera_identity_match_merges_total").increment(1);
                    outcome.merges.push(merge);
                }
                Err(reason) if reason == "same_profile" => {}
                Err(reason) => {
                    metrics::counter!("tessera_identity_match_refused_total").increment(1);
                    tracing::debug!(%reason, "rules refused a probabilistic merge");
                    outcome.refused += 1;
                }
            }
        }
        self.queued.notify_one();
        Ok(())
    }

    pub(crate) async fn suggestions(
        &self,
        status: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<StoredSuggestion>, IdentityError> {
        self.store.suggestions(status, before, limit).await
    }

    /// Accepts (merging, rules permitting) or rejects an open suggestion.
    pub(crate) async fn decide_suggestion(
        &self,
        rules: &VersionedRules,
        id: i64,
        accept: bool,
    ) -> Result<(StoredSuggestion, Option<Merge>), IdentityError> {
        let Some(suggestion) = self.store.suggestion(id).await? else {
            return Err(IdentityError::Missing("match suggestion"));
        };
        if suggestion.status != "open" {
            return Err(IdentityError::FailedPrecondition(format!(
                "the suggestion is {} already",
                suggestion.status
            )));
        }
        let mut merge = None;
        if accept {
            match self
                .store
                .merge_pair(
                    rules,
                    (suggestion.profile_a, suggestion.profile_b),
                    &format!("suggestion:{id}"),
                    MANUAL,
                    Some(suggestion.explanation.clone()),
                )
                .await?
            {
                Ok(m) => {
                    self.queued.notify_one();
                    merge = Some(m);
                }
                Err(reason) if reason == "same_profile" => {}
                Err(reason) => {
                    return Err(IdentityError::FailedPrecondition(format!(
                        "the identity rules refuse this merge ({reason})"
                    )));
                }
            }
        }
        let status = if accept { "accepted" } else { "rejected" };
        if !self.store.decide_suggestion(id, status).await? {
            return Err(IdentityError::FailedPrecondition(
                "the suggestion was decided meanwhile".to_owned(),
            ));
        }
        let suggestion = self
            .store
            .suggestion(id)
            .await?
            .ok_or(IdentityError::Missing("match suggestion"))?;
        Ok((suggestion, merge))
    }

    /// Merges two profiles by a person's decision.
    pub(crate) async fn merge_manually(
        &self,
        rules: &VersionedRules,
        pair: (Uuid, Uuid),
        reason: &str,
    ) -> Result<Option<Merge>, IdentityError> {
        let detail = json!({ "reason": reason }).to_string();
        match self
            .store
            .merge_pair(rules, pair, "manual", MANUAL, Some(detail))
            .await?
        {
            Ok(merge) => {
                self.queued.notify_one();
                Ok(Some(merge))
            }
            Err(why) if why == "same_profile" => Ok(None),
            Err(why) if why == "unknown_profile" => Err(IdentityError::UnknownProfile),
            Err(why) => Err(IdentityError::FailedPrecondition(format!(
                "the identity rules refuse this merge ({why})"
            ))),
        }
    }

    /// Tells the profile service about queued merges until `shutdown`, retrying with backoff.
    pub(crate) async fn deliver_merges(
        &self,
        profile: tonic::transport::Channel,
        shutdown: tessera_server::Shutdown,
    ) {
        let mut client = ProfilePipelineServiceClient::with_interceptor(
            profile,
            tessera_server::trace_context::Propagate,
        );
        let mut backoff = Duration::from_millis(100);
        loop {
            let pending = match self.store.pending_merges(500).await {
                Ok(pending) => pending,
                Err(e) => {
                    tracing::warn!(error = %e, "reading queued merges failed");
                    Vec::new()
                }
            };
            if pending.is_empty() {
                tokio::select! {
                    () = self.queued.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                    () = shutdown.cancelled() => return,
                }
                continue;
            }
            // In order: a run of merges in one ApplyEvents, a split on its own.
            let run_len = pending
                .iter()
                .take_while(|(_, m, payload)| payload.is_none() && m.rule != SPLIT)
                .count();
            let (seqs, outcome) = if run_len > 0 {
                let run = &pending[..run_len];
                let request = profile_pb::ApplyEventsRequest {
                    merges: run.iter().map(|(_, m, _)| m.clone().into()).collect(),
                    events: Vec::new(),
                };
                (
                    run.iter().map(|(seq, _, _)| *seq).collect::<Vec<_>>(),
                    client.apply_events(request).await.map(|_| ()),
                )
            } else {
                let (seq, _, payload) = &pending[0];
                let outcome = match split_request(payload.as_deref()) {
                    Ok(request) => client.split_profiles(request).await.map(|_| ()),
                    Err(e) => {
                        // A payload that does not decode is a bug; skipping it would lose
                        // the split, so it stays queued and is reported.
                        tracing::error!(seq, error = %e, "queued split does not decode");
                        Err(tonic::Status::internal("queued split does not decode"))
                    }
                };
                (vec![*seq], outcome)
            };
            match outcome {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    if let Err(e) = self.store.delivered(&seqs).await {
                        tracing::warn!(error = %e, "marking merges delivered failed");
                    }
                }
                Err(status) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "telling the profile service about merges or splits failed, will retry");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// A blocking key as stored: the rule's index, a colon, the key's text.
fn key_text(key: &BlockKey) -> String {
    format!("{}:{}", key.rule, key.value)
}

fn parse_key(text: &str) -> Option<BlockKey> {
    let (rule, value) = text.split_once(':')?;
    Some(BlockKey {
        rule: rule.parse().ok()?,
        value: value.into(),
    })
}

/// The value at `path` (dots separate object keys) in `traits`.
fn lookup<'a>(traits: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(value) = traits.get(path) {
        return Some(value);
    }
    let mut parts = path.split('.');
    let mut current = traits.get(parts.next()?)?;
    for part in parts {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

/// A string or number as text; other values feed no attribute.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(_) | Value::Null | Value::Bool(_) | Value::Array(_) | Value::Object(_) => {
            None
        }
    }
}

/// A score's explanation as stored with a merge or suggestion.
/// The profile service's request for a queued split.
fn split_request(payload: Option<&str>) -> Result<profile_pb::SplitProfilesRequest, String> {
    let payload: SplitPayload =
        serde_json::from_str(payload.ok_or("no payload")?).map_err(|e| e.to_string())?;
    Ok(profile_pb::SplitProfilesRequest {
        profiles: payload
            .profiles
            .into_iter()
            .map(|(profile, live)| profile_pb::ProfileAssignment {
                profile_id: profile.to_string(),
                live_profile_id: live.to_string(),
            })
            .collect(),
        events: payload
            .events
            .into_iter()
            .map(|(event_id, profile, ids)| profile_pb::EventAssignment {
                event_id,
                profile_id: profile.to_string(),
                identifiers: ids
                    .into_iter()
                    .map(|(r#type, value)| tessera_proto::common::v1::Identifier { r#type, value })
                    .collect(),
            })
            .collect(),
        erased_event_ids: payload.erased_events,
    })
}

pub(crate) fn explanation_json(score: &Score, version: i64) -> String {
    json!({
        "match_weight": score.weight,
        "match_probability": score.probability,
        "prior_weight": score.prior_weight,
        "model_version": version,
        "fields": score.fields.iter().map(|f| json!({
            "field": &*f.field,
            "level": &*f.level,
            "weight": f.weight,
            "term_frequency_adjusted": f.term_frequency_adjusted,
        })).collect::<Vec<_>>(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traits_are_found_by_name_or_path() {
        let traits: Map<String, Value> = serde_json::from_value(json!({
            "firstName": "Ann",
            "address": {"city": "Perth", "postalCode": 6000},
            "surname": "  ",
        }))
        .unwrap();
        assert_eq!(
            lookup(&traits, "firstName").and_then(scalar).as_deref(),
            Some("Ann")
        );
        assert_eq!(
            lookup(&traits, "address.city").and_then(scalar).as_deref(),
            Some("Perth")
        );
        assert_eq!(
            lookup(&traits, "address.postalCode")
                .and_then(scalar)
                .as_deref(),
            Some("6000")
        );
        assert_eq!(lookup(&traits, "surname").and_then(scalar), None, "blank");
        assert_eq!(
            lookup(&traits, "address").and_then(scalar),
            None,
            "not a scalar"
        );
        assert!(lookup(&traits, "nope.deeper").is_none());
    }

    #[test]
    fn keys_round_trip_through_text() {
        let key = BlockKey {
            rule: 3,
            value: "smit\u{1f}1970:x".into(),
        };
        assert_eq!(parse_key(&key_text(&key)), Some(key));
        assert_eq!(parse_key("nope"), None);
    }
}
