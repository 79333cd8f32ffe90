//! Tessera's profile service: unified profiles.
//!
//! A profile is everything Tessera knows about one person: traits with their provenance, event
//! counts, first and last seen, decayed activity, identifiers, and the scores the scoring
//! service computed. The pipeline writes through `ProfilePipelineService.ApplyEvents`
//! (idempotent per event and per merge); clients read through `ProfileService.GetProfile`,
//! served from the versioned cache when it holds the profile.
//!
//! Modules: [`domain`] holds the rules (no gRPC, no SQL), [`store`] the system of record
//! (Postgres or SQLite), `convert` the proto conversions, `service` the gRPC handlers and
//! [`error`] the one error type.

pub mod account;
pub mod audience;
pub mod catalog;
pub mod computed;
mod convert;
pub mod definitions;
pub mod domain;
pub mod engagement;
pub mod error;
mod flight;
#[doc(hidden)]
pub mod fuzzing;
mod http;
pub mod psychographic;
mod purchases;
mod reads;
mod service;
pub mod store;
mod watch;
pub mod webhooks;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use sqlx::migrate::Migrator;
use tessera_proto::profile::v1::profile_pipeline_service_server::ProfilePipelineServiceServer;
use tessera_proto::profile::v1::profile_service_server::ProfileServiceServer;
use tessera_store::{Cache, Database, Migrations};

pub use convert::{MAX_EVENTS_PER_REQUEST, MAX_MERGES_PER_REQUEST};
pub use error::ProfileError;

/// The Postgres schema of the profile service's tables.
pub const SCHEMA: &str = "profile";

/// How many grouped reads of cache misses run at once (see `reads`): a few of the pool's
/// connections, so misses never hold all of it against the pipeline's writes.
const READERS: usize = 4;

/// A grouped read takes at most this many waiting misses.
const READ_GROUP_IDS: usize = 64;

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The profile service's migrations, per backend.
pub static MIGRATIONS: Migrations = Migrations {
    postgres: &POSTGRES_MIGRATIONS,
    sqlite: &SQLITE_MIGRATIONS,
};

/// Settings of the profile service.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileSettings {
    /// The half-life of decayed activity, in seconds. Stored activity is accumulated with it,
    /// so changing it later skews existing profiles until their activity is rebuilt.
    pub activity_half_life_seconds: f64,
    /// How long a cached profile lives, in seconds; used when opening the cache.
    pub cache_ttl_seconds: u64,
    /// Whether `ApplyEvents` sends the trait values of the profiles it named to the identity
    /// service's `MatchProfiles` (probabilistic matching) and applies the merges it answers.
    pub match_profiles: bool,
    /// A token given in configuration with the scope `profiles:read` only (named
    /// `profile.access_token` in the audit log): what this setting allowed before access tokens
    /// were stored (`tessera tokens`). Prefer stored tokens, which can be rotated and revoked.
    pub access_token: Option<AccessToken>,
    /// The space id in Profile API paths (`/v1/spaces/{space_id}/...`).
    pub space_id: String,
    /// The computed traits kept on every profile (`[[profile.computed_traits]]`).
    pub computed_traits: Vec<computed::ComputedTrait>,
    /// The audiences whose memberships are kept (`[[profile.audiences]]`).
    pub audiences: Vec<audience::Audience>,
    /// The computed traits of accounts (`[[profile.account_computed_traits]]`): the same
    /// declarations as a person's, over the events of all the account's members.
    pub account_computed_traits: Vec<computed::ComputedTrait>,
    /// How often profiles whose windowed computed traits or audience conditions changed with
    /// time are re-evaluated, in milliseconds.
    pub sweep_interval_ms: u64,
    /// How long the change stream keeps changes, in days: a consumer away longer misses the
    /// older ones.
    pub change_retention_days: u64,
    /// The trait catalog (`[profile.traits.<name>]`): each trait's strategy and class.
    pub traits: catalog::TraitCatalog,
    /// How long every written version of a profile is kept for GetProfile(as_of), in days; 0
    /// keeps none (as_of is then refused).
    pub history_retention_days: u64,
    /// The webhook destinations of the change stream (`[[profile.webhooks]]`).
    pub webhooks: Vec<webhooks::Webhook>,
    /// Event types with their own half-life and weight in engagement
    /// (`[[profile.engagement_events]]`, see [`engagement`]); other events decay at
    /// `activity_half_life_seconds` and weigh 1.
    pub engagement_events: Vec<engagement::EngagementEvent>,
}

/// A Profile API access token; never shown in logs.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct AccessToken(pub String);

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(***)")
    }
}

impl Default for ProfileSettings {
    fn default() -> Self {
        Self {
            activity_half_life_seconds: tessera_core::activity::DEFAULT_HALF_LIFE_SECONDS,
            cache_ttl_seconds: 3600,
            match_profiles: true,
            access_token: None,
            space_id: "default".to_owned(),
            computed_traits: Vec::new(),
            audiences: Vec::new(),
            account_computed_traits: Vec::new(),
            sweep_interval_ms: 1_000,
            change_retention_days: 7,
            traits: catalog::TraitCatalog::new(),
            history_retention_days: 30,
            webhooks: Vec::new(),
            engagement_events: Vec::new(),
        }
    }
}

/// A setting outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("profile.{field}: {reason}")]
pub struct InvalidSetting {
    /// The setting's name.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl ProfileSettings {
    /// Checks the settings; call at startup, before serving.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let h = self.activity_half_life_seconds;
        if !h.is_finite() || h <= 0.0 {
            return Err(InvalidSetting {
                field: "activity_half_life_seconds",
                reason: "must be a positive number of seconds",
            });
        }
        if engagement::validate(&self.engagement_events).is_err() {
            return Err(InvalidSetting {
                field: "engagement_events",
                reason: "each needs a unique event name (not `*`), a positive \
                         half_life_seconds and a weight of at least 0; at most 100",
            });
        }
        if self
            .access_token
            .as_ref()
            .is_some_and(|t| t.0.len() < 16 || t.0.contains(':') || t.0.trim() != t.0)
        {
            return Err(InvalidSetting {
                field: "access_token",
                reason: "at least 16 characters, without colons or surrounding spaces",
            });
        }
        let mut names = std::collections::HashSet::new();
        for computed in &self.computed_traits {
            if computed.problem().is_some() || !names.insert(computed.name.as_str()) {
                return Err(InvalidSetting {
                    field: "computed_traits",
                    reason: "each needs a unique name (1 to 200 bytes), a property for every \
                             kind but count, and a window of at least 1 second when windowed",
                });
            }
        }
        let mut names = std::collections::HashSet::new();
        for computed in &self.account_computed_traits {
            if computed.problem().is_some() || !names.insert(computed.name.as_str()) {
                return Err(InvalidSetting {
                    field: "account_computed_traits",
                    reason: "each needs a unique name (1 to 200 bytes), a property for every \
                             kind but count, and a window of at least 1 second when windowed",
                });
            }
        }
        if let Err(reason) = audience::Audiences::compile(self.audiences.clone()) {
            tracing::error!(%reason, "invalid audience");
            return Err(InvalidSetting {
                field: "audiences",
                reason: "each needs a unique name and a valid condition (the log says which)",
            });
        }
        if self.space_id.is_empty() || self.space_id.contains('/') {
            return Err(InvalidSetting {
                field: "space_id",
                reason: "must be a non-empty path segment",
            });
        }
        if let Err(problem) = webhooks::validate(&self.webhooks) {
            tracing::error!(%problem, "invalid webhook");
            return Err(InvalidSetting {
                field: "webhooks",
                reason: "each needs a unique name, an http(s) url, a secret of at least 16 \
                         bytes, known kinds and sane limits (the log says which)",
            });
        }
        if self.cache_ttl_seconds == 0 {
            return Err(InvalidSetting {
                field: "cache_ttl_seconds",
                reason: "must be at least 1",
            });
        }
        Ok(())
    }
}

/// Lazily connected channels to the services the profile service calls.
#[derive(Debug, Clone)]
pub struct Peers {
    /// Identity: lookups, matching, forgetting deleted people.
    pub identity: tonic::transport::Channel,
    /// Scoring: every written profile is scored.
    pub scoring: tonic::transport::Channel,
    /// Ingestion: its event log forgets deleted people's events.
    pub ingestion: tonic::transport::Channel,
}

/// The profile service: `ProfileService` and `ProfilePipelineService`.
#[derive(Debug, Clone)]
pub struct Profiles {
    inner: Arc<service::Inner>,
    /// How long changes are kept.
    change_retention_days: u64,
    /// The Profile API's space id.
    space_id: String,
    /// The webhook destinations of the change stream.
    webhooks: Arc<webhooks::Webhooks>,
    /// The computed traits and audiences declared through the API.
    definitions: definitions::Registry,
}

impl Profiles {
    /// A profile service over `db` (connected with `Database::connect(url, SCHEMA, ..)` and
    /// migrated with [`MIGRATIONS`]), `cache` (from `tessera_store::open_cache`), and lazily
    /// connected channels to the identity, scoring and ingestion services (`peers`). `settings` should have passed
    /// [`ProfileSettings::validate`]; an invalid half-life falls back to the default.
    pub fn new(
        db: Database,
        cache: Arc<dyn Cache>,
        peers: Peers,
        settings: ProfileSettings,
    ) -> Self {
        let Peers {
            identity,
            scoring,
            ingestion,
        } = peers;
        let mut half_life_seconds = settings.activity_half_life_seconds;
        if !half_life_seconds.is_finite() || half_life_seconds <= 0.0 {
            tracing::error!(
                half_life_seconds,
                "invalid activity half-life, using the default"
            );
            half_life_seconds = tessera_core::activity::DEFAULT_HALF_LIFE_SECONDS;
        }
        let audiences =
            audience::Audiences::compile(settings.audiences.clone()).unwrap_or_else(|e| {
                tracing::error!(reason = %e, "invalid audiences, keeping none");
                audience::Audiences::default()
            });
        let defs = store::Definitions::new(settings.computed_traits.clone(), audiences)
            .with_catalog(settings.traits.clone())
            .with_history(settings.history_retention_days > 0)
            .with_engagement(settings.engagement_events.clone())
            .with_account_computed(settings.account_computed_traits.clone());
        // Config's, joined by those stored through the API on the first write or poll.
        let defs = Arc::new(definitions::SharedDefinitions::new(defs));
        let webhooks = Arc::new(webhooks::Webhooks::new(db.clone(), &settings.webhooks));
        let store = store::open_shared(db.clone(), defs.clone());
        Self {
            webhooks,
            definitions: definitions::Registry::new(db.clone(), defs.clone()),
            change_retention_days: settings.change_retention_days.max(1),
            space_id: settings.space_id.clone(),
            inner: Arc::new(service::Inner {
                reads: reads::GroupRead::start(store.clone(), READERS, READ_GROUP_IDS),
                store,
                defs,
                cache,
                identity,
                scoring,
                ingestion,
                flights: flight::Flights::default(),
                half_life_seconds,
                match_profiles: settings.match_profiles,
                match_unimplemented_warned: AtomicBool::new(false),
                epoch_raises: Arc::default(),
                purges: Arc::default(),
                changed: tokio::sync::Notify::new(),
                account_refresh: tokio::sync::Notify::new(),
                streams_stop: tessera_server::Shutdown::new(),
                history_retention: (settings.history_retention_days > 0).then(|| {
                    time::Duration::days(
                        i64::try_from(settings.history_retention_days).unwrap_or(36_500),
                    )
                }),
            }),
        }
    }

    /// Re-evaluates, every `interval`, the profiles whose computed traits or audience
    /// memberships change with time (a windowed trait or event condition) and queues a rescore
    /// of the accounts whose windowed computed traits did, re-evaluates the members of accounts
    /// whose traits changed, a chunk at a time (woken by this replica's batches, and polling
    /// every second for other replicas'), and once a minute
    /// deletes changes older than the retention, until `shutdown`. When the definitions that
    /// fold events (computed traits, audiences, trait catalog) differ from those the stored
    /// profiles were folded with, it first recomputes every profile from its events, 100 at a
    /// time. Every second it also polls the revision of the definitions stored through the API,
    /// so a change made on any replica takes effect here (and starts that recompute) within
    /// about a second. Safe with several replicas (they share the sweeping and take turns
    /// recomputing; pruning is idempotent).
    pub fn spawn_sweeper(
        &self,
        interval: std::time::Duration,
        shutdown: tessera_server::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        const BATCH: usize = 500;
        const RECOMPUTE_BATCH: usize = 100;
        /// Accounts refreshed per transaction: one, so an account whose refresh fails is the
        /// one deferred.
        const REFRESH_BATCH: usize = 1;
        const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
        const DEFINITIONS_POLL: std::time::Duration = std::time::Duration::from_secs(1);
        let inner = self.inner.clone();
        let registry = self.definitions.clone();
        let retention = time::Duration::days(
            i64::try_from(self.change_retention_days).unwrap_or(i64::MAX / 86_400 / 2),
        );
        tokio::spawn(async move {
            let mut last_prune: Option<tokio::time::Instant> = None;
            let mut last_sweep: Option<tokio::time::Instant> = None;
            let mut last_poll = tokio::time::Instant::now();
            let mut full_sweep = false;
            // Profiles folded with other definitions (computed traits, audiences, catalog)
            // are recomputed from their events, a chunk per round. Starting reads the
            // definitions stored through the API too.
            let mut recomputing = match inner
                .store
                .start_recompute(time::OffsetDateTime::now_utc())
                .await
            {
                Ok(running) => running,
                Err(e) => {
                    tracing::warn!(error = %e, "checking whether profiles need recomputing failed");
                    true
                }
            };
            let mut seen_revision = inner.defs.current().revision;
            loop {
                // Definitions changed through the API (on this replica or another; a write may
                // have swapped them in already) recompute the profiles folded before.
                if last_poll.elapsed() >= DEFINITIONS_POLL {
                    last_poll = tokio::time::Instant::now();
                    if let Err(e) = registry.refresh().await {
                        tracing::warn!(error = %e, "polling the stored definitions failed");
                    }
                }
                let revision = inner.defs.current().revision;
                if revision != seen_revision {
                    match inner
                        .store
                        .start_recompute(time::OffsetDateTime::now_utc())
                        .await
                    {
                        Ok(running) => {
                            seen_revision = revision;
                            recomputing |= running;
                        }
                        Err(e) => tracing::warn!(error = %e, "starting a recompute failed"),
                    }
                }
                if recomputing {
                    match inner.recompute_once(RECOMPUTE_BATCH).await {
                        Ok(Some(_)) => {}
                        Ok(None) => recomputing = false,
                        Err(e) => tracing::warn!(error = %e, "recomputing profiles failed"),
                    }
                }
                if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                    last_prune = Some(tokio::time::Instant::now());
                    // Another replica may have started a recompute (or, mid-rollout, one
                    // with other definitions): join it, or restart it with ours.
                    if !recomputing {
                        recomputing = inner
                            .store
                            .start_recompute(time::OffsetDateTime::now_utc())
                            .await
                            .unwrap_or(false);
                    }
                    let before = time::OffsetDateTime::now_utc() - retention;
                    match inner.store.prune_changes(before).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(changes = n, "pruned the change stream"),
                        Err(e) => tracing::warn!(error = %e, "pruning the change stream failed"),
                    }
                    if let Some(retention) = inner.history_retention {
                        let before = time::OffsetDateTime::now_utc() - retention;
                        match inner.store.prune_versions(before).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(versions = n, "pruned profile history"),
                            Err(e) => tracing::warn!(error = %e, "pruning profile history failed"),
                        }
                    }
                }
                let windowed = inner.defs.current().windowed();
                if windowed && (full_sweep || last_sweep.is_none_or(|at| at.elapsed() >= interval))
                {
                    last_sweep = Some(tokio::time::Instant::now());
                    full_sweep = match inner.sweep_once(BATCH).await {
                        Ok(n) => n >= BATCH,
                        Err(e) => {
                            tracing::warn!(error = %e, "sweeping expired computed values failed");
                            false
                        }
                    };
                }
                // Members of accounts whose traits another member's group call changed.
                let refreshing = match inner.refresh_accounts_once(REFRESH_BATCH).await {
                    Ok(taken) => taken.is_some(),
                    Err(e) => {
                        // To the back of the queue, so it cannot hold up the others.
                        let deferred = inner
                            .store
                            .defer_account_refresh(time::OffsetDateTime::now_utc())
                            .await;
                        tracing::warn!(error = %e, ?deferred, "refreshing an account failed");
                        metrics::counter!("tessera_profile_account_refresh_failures_total")
                            .increment(1);
                        false
                    }
                };
                // A full batch (or a recompute or refresh under way) means more are due: go
                // on at once.
                if !full_sweep && !recomputing && !refreshing {
                    let wait = if windowed { interval } else { PRUNE_EVERY };
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = inner.account_refresh.notified() => {}
                        () = tokio::time::sleep(wait.min(DEFINITIONS_POLL)) => {}
                    }
                } else if shutdown.is_cancelled() {
                    return;
                }
            }
        })
    }

    /// Delivers the change stream to the configured webhooks until `shutdown`: every replica
    /// runs a task per webhook, and the one holding the webhook's lease in the database
    /// delivers, so each change goes out once, in order, whatever the number of replicas.
    pub fn spawn_webhooks(
        &self,
        shutdown: tessera_server::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        self.webhooks.spawn(self.inner.clone(), shutdown)
    }

    /// Ends the change streams (with UNAVAILABLE, so consumers reconnect elsewhere) once
    /// `shutdown` is cancelled: call with a token cancelled before the server drains, or the
    /// drain waits for the streams.
    pub fn stop_streams_on(&self, shutdown: tessera_server::Shutdown) {
        let streams = self.inner.streams_stop.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            streams.cancel();
        });
    }

    /// The Segment-compatible Profile API's HTTP routes, answering requests whose token
    /// `access` accepts with the scope `profiles:read`.
    pub fn http_routes(
        &self,
        access: tessera_server::access::Access,
    ) -> tessera_server::HttpRouter {
        http::routes(self.inner.clone(), access, &self.space_id)
    }

    /// Adds `ProfileService`, `ProfilePipelineService`, `DestinationService` and
    /// `DefinitionService` to the services one process serves.
    pub fn register(&self, services: &mut tessera_server::GrpcServices) {
        services.add(
            ProfileServiceServer::new(service::ProfileApi(self.inner.clone()))
                .max_decoding_message_size(service::MAX_MESSAGE_SIZE),
        );
        services.add(
            ProfilePipelineServiceServer::new(service::PipelineApi(self.inner.clone()))
                .max_decoding_message_size(service::MAX_MESSAGE_SIZE),
        );
        services.add(webhooks::api(self.webhooks.clone()));
        services.add(definitions::api::server(self.definitions.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_parse_and_validate() {
        let s: ProfileSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(s.activity_half_life_seconds, 7.0 * 24.0 * 3600.0);
        assert_eq!(s.cache_ttl_seconds, 3600);
        assert!(s.match_profiles);
        assert_eq!(s.validate(), Ok(()));
        assert!(serde_json::from_str::<ProfileSettings>(r#"{"ttl": 1}"#).is_err());
        let off: ProfileSettings = serde_json::from_str(r#"{"match_profiles": false}"#).unwrap();
        assert!(!off.match_profiles);
        let bad: ProfileSettings =
            serde_json::from_str(r#"{"activity_half_life_seconds": 0}"#).unwrap();
        assert_eq!(
            bad.validate().unwrap_err().field,
            "activity_half_life_seconds"
        );
    }
}
