//! The gRPC face of the profile service: `ProfileService` (public reads) and
//! `ProfilePipelineService` (internal writes), over the store, the versioned cache and the
//! identity and scoring services.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use tessera_core::FieldViolation;
use tessera_proto::common::v1 as common;
use tessera_proto::convert::to_timestamp;
use tessera_proto::identity::v1 as identity;
use tessera_proto::identity::v1::LookupIdentifierRequest;
use tessera_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::profile_pipeline_service_server::ProfilePipelineService;
use tessera_proto::profile::v1::profile_service_server::ProfileService;
use tessera_proto::scoring::v1 as scoring;
use tessera_proto::scoring::v1::scoring_service_client::ScoringServiceClient;
use tessera_server::trace_context::{self, Propagate, TraceParent};
use tessera_store::{Cache, Versioned};
use time::OffsetDateTime;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::convert::{self, Lookup, micros};
use crate::definitions::SharedDefinitions;
use crate::domain::{Batch, Merge, Profile, Score};
use crate::error::ProfileError;
use crate::store::{Applied, Definitions, ProfileStore, Scorer};

/// How long a call to the identity or scoring service may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// The most profiles sent to the scoring service in one call (its limit).
const MAX_SCORED_PER_CALL: usize = 5_000;
/// The most profiles sent to the identity service's matching in one call (its limit).
const MAX_MATCHED_PER_CALL: usize = 5_000;
/// The longest the cache writes of one request may take.
const CACHE_WRITE_BUDGET: Duration = Duration::from_secs(2);
/// The most lookups one BatchGetProfiles may carry.
const MAX_BATCH_GET: usize = 100;
/// The events an export reads per query.
const EXPORT_PAGE: usize = 1_000;
/// The most profiles one SearchProfiles call examines.
const SEARCH_BUDGET: usize = 5_000;
/// Profiles read from the store at a time while searching.
const SEARCH_CHUNK: usize = 500;
/// The longest reason a deletion keeps, in bytes.
const MAX_REASON: usize = 1_000;
/// The most event ids sent to the event log in one ForgetEvents call (its limit).
const MAX_FORGOTTEN_PER_CALL: usize = 100_000;
/// The largest message decoded from a peer.
pub(crate) const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// Everything both gRPC services share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) store: Arc<dyn ProfileStore>,
    pub(crate) cache: Arc<dyn Cache>,
    pub(crate) identity: Channel,
    pub(crate) scoring: Channel,
    /// The ingestion service, whose event log forgets a deleted person's events.
    pub(crate) ingestion: Channel,
    /// Cache misses in progress, so concurrent misses of one profile read it once.
    pub(crate) flights: crate::flight::Flights,
    /// Reads the cache misses of concurrent requests from the store together.
    pub(crate) reads: crate::reads::GroupRead,
    pub(crate) half_life_seconds: f64,
    /// Everything folded and kept (declared computed traits, audiences and their hidden
    /// counts), evaluated when a profile is read: config's and those stored through the API,
    /// swapped as a whole when those change.
    pub(crate) defs: Arc<SharedDefinitions>,
    /// Woken after every write, so change streams in this process read at once.
    pub(crate) changed: tokio::sync::Notify,
    /// Woken after a batch with account traits, so the sweeper refreshes the accounts' other
    /// members at once (it polls the queue every second too, for other replicas' batches).
    pub(crate) account_refresh: tokio::sync::Notify,
    /// Ends the change streams (before the server drains).
    pub(crate) streams_stop: tessera_server::Shutdown,
    /// How long profile versions are kept for GetProfile(as_of); `None` when they are not.
    pub(crate) history_retention: Option<time::Duration>,
    /// Whether applied profiles are sent to the identity service's matching.
    pub(crate) match_profiles: bool,
    /// Set once an identity service without matching has been reported, so the warning is
    /// logged once per process rather than once per batch.
    pub(crate) match_unimplemented_warned: AtomicBool,
    /// What this replica knows of the identifier cache's owed epoch raises (see
    /// [`Inner::forget_identifiers`]).
    pub(crate) epoch_raises: Arc<EpochRaises>,
    /// What this replica knows of the deleted profiles owed a cache tombstone (see
    /// [`ProfilePurges`]); read by the same poll as the epoch raises.
    pub(crate) purges: Arc<ProfilePurges>,
}

fn cache_key(profile_id: &str) -> String {
    format!("profile:{profile_id}")
}

/// The cache key of the epoch identifier entries are checked against (see
/// [`Inner::forget_identifiers`]).
const IDENTIFIER_EPOCH_KEY: &str = "identifiers:epoch";

/// The cache key of the profile `identifier` leads to: a digest, so no identifier (an email, a
/// phone number) is written into a key.
fn identifier_key(identifier: &common::Identifier) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(identifier.r#type.as_bytes())
        .chain_update([0])
        .chain_update(identifier.value.as_bytes())
        .finalize();
    format!("identifier:{}", hex::encode(digest))
}

/// How often every replica reads the owed identifier epoch raises (and retries them): a replica
/// learns of a raise another one could not make within about this long.
const EPOCH_RAISES_POLL: Duration = Duration::from_millis(250);
/// How old a raise recorded by a write that never marked it due (its process crashed) must be
/// before it is made anyway: longer than any split or deletion takes.
const EPOCH_RAISE_ABANDONED: time::Duration = time::Duration::minutes(5);

/// Raises the identifier epoch in `cache`: above the current one and `floor`, and not below
/// the time in microseconds, so an epoch key that expired never comes back with a value
/// entries were cached under. Returns the epoch the cache holds at least.
async fn raise_epoch(cache: &dyn Cache, floor: i64) -> Result<i64, tessera_store::CacheError> {
    let current = cache
        .get(IDENTIFIER_EPOCH_KEY)
        .await?
        .map_or(0, |e| e.version);
    let now = i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000)
        .unwrap_or(i64::MAX - 1);
    let next = current
        .saturating_add(1)
        .max(floor.saturating_add(1))
        .max(now);
    let entry = Versioned {
        version: next,
        bytes: Some(bytes::Bytes::from_static(b"epoch")),
    };
    // Not stored means a newer epoch is there already.
    cache.put_if_newer(IDENTIFIER_EPOCH_KEY, entry).await?;
    Ok(next)
}

/// One replica's view of the identifier cache's owed epoch raises (table
/// `identifier_epoch_raises`), read on every lookup by identifier without a database query:
/// refreshed every [`EPOCH_RAISES_POLL`] by a background task that also retries the raises,
/// and at once when this replica records or makes one.
#[derive(Debug)]
pub(crate) struct EpochRaises {
    /// Whether a raise is owed (or not known yet not to be: true until the first read).
    owed: AtomicBool,
    /// The highest epoch a raise reached the cache with.
    floor: AtomicI64,
    /// A lookup saw an epoch below the floor: raise it again.
    repair: AtomicBool,
    /// Set once read from the database for the first time and the background task started.
    first_read: tokio::sync::OnceCell<()>,
    /// Bumped by every raise this replica records, under the lock; a refresh that read the
    /// database before one publishes nothing (it may not have seen the row).
    records: std::sync::Mutex<u64>,
    /// Wakes the background task (a lookup asked for a repair).
    wake: tokio::sync::Notify,
}

impl Default for EpochRaises {
    fn default() -> Self {
        Self {
            owed: AtomicBool::new(true),
            floor: AtomicI64::new(0),
            repair: AtomicBool::new(false),
            first_read: tokio::sync::OnceCell::new(),
            records: std::sync::Mutex::new(0),
            wake: tokio::sync::Notify::new(),
        }
    }
}

impl EpochRaises {
    fn owed(&self) -> bool {
        self.owed.load(Ordering::Acquire)
    }

    fn floor(&self) -> i64 {
        self.floor.load(Ordering::Acquire)
    }

    fn repair(&self) {
        if !self.repair.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// A raise was recorded (its row committed): owed until a refresh reads it made.
    fn mark_owed(&self) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        *records += 1;
        self.owed.store(true, Ordering::Release);
    }

    /// Reads the owed raises, makes the due ones (and a repair) in the cache, forgets those it
    /// covered, and publishes what is still owed. Safe on every replica at once: a raise only
    /// moves the epoch up, and forgetting a raise twice changes nothing.
    async fn settle(&self, store: &dyn ProfileStore, cache: &dyn Cache, now: OffsetDateTime) {
        for _ in 0..2 {
            let records = *self.records.lock().unwrap_or_else(|e| e.into_inner());
            let raises = match store.identifier_raises(now - EPOCH_RAISE_ABANDONED).await {
                Ok(raises) => raises,
                Err(e) => {
                    // Not knowing is owing: lookups ask the identity service meanwhile.
                    tracing::warn!(error = %e, "reading the identifier epoch raises failed");
                    self.owed.store(true, Ordering::Release);
                    return;
                }
            };
            let repair = self.repair.swap(false, Ordering::AcqRel);
            if raises.due.is_empty() && !repair {
                self.publish(records, &raises);
                return;
            }
            // Started after the due raises' writes ended, so it covers them.
            let epoch = match raise_epoch(cache, raises.floor).await {
                Ok(epoch) => epoch,
                Err(e) => {
                    cache_error("put", "identifier epoch", &e);
                    self.repair.fetch_or(repair, Ordering::AcqRel);
                    self.publish(records, &raises);
                    return;
                }
            };
            if raises.due.is_empty() {
                self.publish(records, &raises);
                return;
            }
            if let Err(e) = store.finish_identifier_raises(&raises.due, epoch).await {
                tracing::warn!(error = %e, "forgetting made identifier epoch raises failed");
                self.publish(records, &raises);
                return;
            }
            tracing::info!(
                raises = raises.due.len(),
                epoch,
                "raised the identifier epoch"
            );
            // Read again: what is owed now, and the floor just stored.
        }
    }

    /// Publishes `raises`, read when this replica had recorded `records` raises, unless it
    /// recorded one since (the read may not have seen it).
    fn publish(&self, records: u64, raises: &crate::store::IdentifierRaises) {
        let current = self.records.lock().unwrap_or_else(|e| e.into_inner());
        self.floor.fetch_max(raises.floor, Ordering::AcqRel);
        if *current == records {
            self.owed.store(!raises.owed.is_empty(), Ordering::Release);
        }
    }

    /// Settles the raises, and the owed profile purges (`purges`), every [`EPOCH_RAISES_POLL`]
    /// (and when a lookup asks for a repair) until the replica is dropped.
    async fn run(
        raises: std::sync::Weak<Self>,
        purges: std::sync::Weak<ProfilePurges>,
        store: Arc<dyn ProfileStore>,
        cache: Arc<dyn Cache>,
    ) {
        loop {
            let (Some(this), Some(purges)) = (raises.upgrade(), purges.upgrade()) else {
                return;
            };
            this.settle(&*store, &*cache, OffsetDateTime::now_utc())
                .await;
            purges.settle(&*store, &*cache).await;
            drop(purges);
            // Held for at most one poll: the task ends once the replica is dropped.
            tokio::select! {
                () = this.wake.notified() => {}
                () = tokio::time::sleep(EPOCH_RAISES_POLL) => {}
            }
        }
    }
}

/// The most owed profile purges a replica keeps in memory: with more owed (a long cache outage
/// during a wave of deletions) no cached profile is trusted until they are fewer.
const MAX_OWED_PURGES: usize = 10_000;

/// The tombstone a deleted profile's cache entry gets: at the highest version, so a read that
/// loaded the profile before the deletion can never put it back.
const PURGED: Versioned = Versioned {
    version: i64::MAX,
    bytes: None,
};

/// One replica's view of the deleted profiles whose cache entry is owed a tombstone (table
/// `profile_cache_purges`, written in the deletion's transaction), read on every GetProfile
/// without a database query: refreshed every [`EPOCH_RAISES_POLL`] by the epoch raises' task,
/// which also retries the tombstones, and at once when this replica deletes. While a profile
/// is owed, no cached copy of it is trusted (Redis may still hold it, or this replica's near
/// cache), so the database answers NOT_FOUND.
#[derive(Debug, Default)]
pub(crate) struct ProfilePurges {
    state: std::sync::RwLock<PurgeState>,
}

#[derive(Debug, Default)]
struct PurgeState {
    /// The profiles owed a tombstone; `None` while not known (before the first read, after a
    /// failed one, or more than [`MAX_OWED_PURGES`]): then no cached profile is trusted.
    owed: Option<BTreeSet<String>>,
    /// Bumped by every deletion this replica commits; a refresh that read the database before
    /// one publishes nothing (it may not have seen its rows).
    records: u64,
}

impl ProfilePurges {
    /// Whether a cached copy of `profile_id` must not be trusted.
    fn owed(&self, profile_id: &str) -> bool {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .owed
            .as_ref()
            .is_none_or(|owed| owed.contains(profile_id))
    }

    /// A deletion of `profile_ids` committed (with their owed purges).
    fn mark_owed(&self, profile_ids: &[String]) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.records += 1;
        if let Some(owed) = &mut state.owed {
            owed.extend(profile_ids.iter().cloned());
        }
    }

    /// Reads the owed purges, puts their tombstones in the cache, forgets those it took, and
    /// publishes what is still owed. Safe on every replica at once: a tombstone at the highest
    /// version is put any number of times, and the replica's own put drops its near-cache copy
    /// (so a replica that saw a purge owed never trusts its near cache for it again).
    async fn settle(&self, store: &dyn ProfileStore, cache: &dyn Cache) {
        let records = self.state.read().unwrap_or_else(|e| e.into_inner()).records;
        let owed = match store.owed_purges(MAX_OWED_PURGES).await {
            Ok(owed) => owed,
            Err(e) => {
                // Not knowing is owing: GetProfile reads the database meanwhile.
                tracing::warn!(error = %e, "reading the owed profile purges failed");
                self.publish(records, None);
                return;
            }
        };
        let complete = owed.len() < MAX_OWED_PURGES;
        let mut purged = Vec::new();
        for id in &owed {
            match cache.put_if_newer(&cache_key(id), PURGED).await {
                // Not stored: the tombstone is there already.
                Ok(_) => purged.push(id.clone()),
                Err(e) => {
                    // The cache is down: the others would fail alike.
                    cache_error("put", id, &e);
                    break;
                }
            }
        }
        let mut owed: BTreeSet<String> = owed.into_iter().collect();
        if !purged.is_empty() {
            match store.finish_purges(&purged).await {
                Ok(()) => {
                    for id in &purged {
                        owed.remove(id);
                    }
                    tracing::info!(
                        profiles = purged.len(),
                        "put the owed tombstones of deleted profiles"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "forgetting purged profiles failed"),
            }
        }
        self.publish(records, complete.then_some(owed));
    }

    /// Publishes `owed`, read when this replica had committed `records` deletions, unless it
    /// committed one since.
    fn publish(&self, records: u64, owed: Option<BTreeSet<String>>) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.records == records {
            state.owed = owed;
        }
    }
}

/// How a read wants a cache hit: as the cache holds it, or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// The encoded `Profile` (GetProfile without a read mask sends it as it is).
    Encoded,
    /// A [`pb::Profile`].
    Decoded,
}

/// A profile read for GetProfile.
#[derive(Debug)]
enum Read {
    /// An encoded `Profile`, as the cache held it (or as it was just put there).
    Encoded(bytes::Bytes),
    /// The profile (boxed: a `Profile` is large beside `Bytes`).
    Decoded(Box<pb::Profile>),
}

/// The one field of a cached `Profile` a hit checks, decoded without the rest: prost skips
/// the other top-level fields by their lengths, allocating nothing. An entry this accepts is
/// well-framed at the top level; only Tessera writes these keys.
#[derive(Clone, PartialEq, prost::Message)]
struct CachedValidity {
    /// `Profile.computed_valid_until`.
    #[prost(message, optional, tag = "12")]
    computed_valid_until: Option<prost_types::Timestamp>,
}

/// A cached profile, decoded.
fn decode_cached(bytes: &[u8]) -> Result<pb::Profile, ProfileError> {
    pb::Profile::decode(bytes).map_err(|e| ProfileError::Corrupt(format!("cached profile: {e}")))
}

fn cache_error(op: &'static str, profile_id: &str, error: &dyn std::fmt::Display) {
    metrics::counter!("tessera_profile_cache_errors_total", "op" => op).increment(1);
    tracing::warn!(op, profile_id, %error, "profile cache failed, using the database");
}

impl Inner {
    pub(crate) async fn get_profile(
        &self,
        mut request: pb::GetProfileRequest,
    ) -> Result<pb::Profile, ProfileError> {
        let mask = convert::ReadMask::from_pb(request.read_mask.take())?;
        let mut profile = match self.read_profile(request, Form::Decoded).await? {
            Read::Decoded(profile) => *profile,
            Read::Encoded(bytes) => decode_cached(&bytes)?,
        };
        if let Some(mask) = mask {
            mask.apply(&mut profile);
        }
        Ok(profile)
    }

    /// GetProfile's answer: on a cache hit without a read mask, the profile as the cache holds
    /// it, encoded (sent as it is, not decoded and encoded again).
    pub(crate) async fn get_profile_response(
        &self,
        request: pb::GetProfileRequest,
    ) -> Result<pb::GetProfileResponse, ProfileError> {
        Ok(match self.answer(request).await? {
            Read::Encoded(bytes) => pb::GetProfileResponse::encoded(bytes),
            Read::Decoded(profile) => pb::GetProfileResponse::new(*profile),
        })
    }

    /// The profile to answer a lookup with: without a read mask, a cache hit as it is cached.
    async fn answer(&self, request: pb::GetProfileRequest) -> Result<Read, ProfileError> {
        if request.read_mask.is_some() {
            return Ok(Read::Decoded(Box::new(self.get_profile(request).await?)));
        }
        self.read_profile(request, Form::Encoded).await
    }

    /// The whole profile a GetProfile request names; a cache hit comes `form`.
    async fn read_profile(
        &self,
        request: pb::GetProfileRequest,
        form: Form,
    ) -> Result<Read, ProfileError> {
        let as_of = request.as_of;
        let (profile_id, identifier) = match Lookup::try_from(request)? {
            Lookup::ProfileId(id) => (id, None),
            Lookup::Identifier(identifier) => self.lookup(identifier).await?,
        };
        if let Some(as_of) = as_of {
            return Ok(Read::Decoded(Box::new(
                self.profile_as_of(&profile_id, &as_of).await?,
            )));
        }
        // A deleted profile whose tombstone the cache has not taken yet (it was unreachable
        // during the deletion, or the deleting replica died): any cached copy is stale, the
        // database answers.
        let trusted = !self.purges().await.owed(&profile_id);
        if !trusted {
            metrics::counter!("tessera_profile_cache_bypassed_total").increment(1);
        }
        if trusted && let Some(profile) = self.cached(&profile_id, form).await {
            metrics::counter!("tessera_profile_cache_hits_total").increment(1);
            return Ok(profile);
        }
        // One database read per replica however many readers miss at once: the others wait
        // and take its fill from the cache.
        let flight = self.flights.join(&profile_id).await;
        if flight.waited
            && trusted
            && let Some(profile) = self.cached(&profile_id, form).await
        {
            metrics::counter!("tessera_profile_cache_hits_total").increment(1);
            return Ok(profile);
        }
        metrics::counter!("tessera_profile_cache_misses_total").increment(1);
        let profile = self
            .reads
            .get(profile_id.clone())
            .await?
            .ok_or(ProfileError::NotFound)?;
        if let Some((key, epoch)) = identifier
            && profile.profile_id != profile_id
        {
            self.remember_identifier(&key, epoch, &profile.profile_id)
                .await;
        }
        let message =
            convert::profile_to_pb(&profile, &self.defs.current(), OffsetDateTime::now_utc());
        let bytes = bytes::Bytes::from(message.encode_to_vec());
        // A fill lands only when no newer version is cached: a slow read never puts back a
        // profile older than one a write already stored.
        self.put(
            &profile.profile_id,
            Versioned {
                version: profile.version,
                bytes: Some(bytes.clone()),
            },
        )
        .await;
        drop(flight);
        Ok(match form {
            Form::Encoded => Read::Encoded(bytes),
            Form::Decoded => Read::Decoded(Box::new(message)),
        })
    }

    /// The profile `profile_id` as Tessera knew it at `as_of` (from its kept versions).
    async fn profile_as_of(
        &self,
        profile_id: &str,
        as_of: &prost_types::Timestamp,
    ) -> Result<pb::Profile, ProfileError> {
        let invalid = |description: String| {
            ProfileError::InvalidArgument(vec![FieldViolation::new("as_of", description)])
        };
        let Some(at) = tessera_proto::convert::storable_time(as_of) else {
            return Err(invalid("not a time between years 1 and 9999".into()));
        };
        let Some(retention) = self.history_retention else {
            return Err(invalid(
                "history is off (profile.history_retention_days = 0)".into(),
            ));
        };
        let oldest = OffsetDateTime::now_utc() - retention;
        if at < oldest {
            return Err(invalid(format!(
                "history is kept {} days: not earlier than {oldest}",
                retention.whole_days()
            )));
        }
        let body = self
            .store
            .profile_as_of(profile_id, at)
            .await?
            .ok_or(ProfileError::NotFound)?;
        pb::Profile::decode(body.as_slice())
            .map_err(|e| ProfileError::Corrupt(format!("profile {profile_id} version: {e}")))
    }

    /// A page of a profile's timeline: its events from all its merged identities.
    pub(crate) async fn list_events(
        &self,
        request: pb::ListProfileEventsRequest,
    ) -> Result<pb::ListProfileEventsResponse, ProfileError> {
        let (lookup, query) = convert::timeline_request(request)?;
        let profile_id = match lookup {
            Lookup::ProfileId(id) => id,
            Lookup::Identifier(identifier) => self.lookup(identifier).await?.0,
        };
        let profile = self
            .store
            .get(&profile_id)
            .await?
            .ok_or(ProfileError::NotFound)?;
        let mut ids = profile.merged_profile_ids.clone();
        ids.push(profile.profile_id.clone());
        let mut entries = self.store.timeline(&ids, &query).await?;
        let page = query.limit.saturating_sub(1);
        let next_page_token = if entries.len() > page {
            entries.truncate(page);
            entries.last().map(convert::page_token).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListProfileEventsResponse {
            profile_id: profile.profile_id,
            events: entries.into_iter().map(Into::into).collect(),
            next_page_token,
        })
    }

    /// Re-evaluates the profiles whose computed values changed with time (see
    /// [`ProfileStore::sweep`]) and caches what it wrote, and queues a rescore of the accounts
    /// whose windowed computed traits changed with time (see
    /// [`ProfileStore::expire_accounts`]; the account refresh does it); returns how many
    /// profiles it swept or accounts it queued, whichever is more.
    pub(crate) async fn sweep_once(&self, limit: usize) -> Result<usize, ProfileError> {
        let now = OffsetDateTime::now_utc();
        let expired = self.store.expire_accounts(now, limit).await?;
        if !expired.is_empty() {
            metrics::counter!("tessera_profile_accounts_expired_total")
                .increment(expired.len() as u64);
        }
        let (profiles, changes) = self.store.sweep(now, limit).await?;
        if !profiles.is_empty() {
            self.changed.notify_waiters();
            metrics::counter!("tessera_profile_swept_total").increment(profiles.len() as u64);
            count_membership_changes(&changes);
            let entries = profiles
                .iter()
                .map(|p| entry(p, &self.defs.current(), now))
                .collect();
            self.put_all(entries).await;
        }
        Ok(profiles.len().max(expired.len()))
    }

    /// Re-evaluates the members of up to `limit` accounts whose traits changed (see
    /// [`ProfileStore::refresh_accounts`]) and caches what it wrote; returns how many refreshes
    /// it took (`None` when none were queued).
    pub(crate) async fn refresh_accounts_once(
        &self,
        limit: usize,
    ) -> Result<Option<usize>, ProfileError> {
        let now = micros(OffsetDateTime::now_utc());
        let Some(applied) = self
            .store
            .refresh_accounts(limit, self.half_life_seconds, now, self)
            .await?
        else {
            return Ok(None);
        };
        metrics::counter!("tessera_profile_account_refreshed_profiles_total")
            .increment(applied.named.len() as u64);
        self.cache_applied(&applied).await;
        Ok(Some(applied.named.len()))
    }

    /// Recomputes the next `limit` profiles of a running recompute (definitions changed) and
    /// caches them; returns how many it recomputed (`None` when no recompute is running).
    pub(crate) async fn recompute_once(&self, limit: usize) -> Result<Option<usize>, ProfileError> {
        let now = OffsetDateTime::now_utc();
        let Some(applied) = self
            .store
            .recompute(limit, self.half_life_seconds, now, self)
            .await?
        else {
            return Ok(None);
        };
        self.cache_applied(&applied).await;
        Ok(Some(applied.named.len()))
    }

    async fn list_audiences(&self) -> Result<pb::ListAudiencesResponse, ProfileError> {
        let mut audiences = Vec::new();
        for audience in self.defs.current().audiences.declared() {
            let (_, member_count) = self.store.audience_members(&audience.name, None, 0).await?;
            audiences.push(pb::AudienceSummary {
                name: audience.name.clone(),
                condition_json: serde_json::to_string(&audience.condition).unwrap_or_default(),
                member_count,
            });
        }
        Ok(pb::ListAudiencesResponse { audiences })
    }

    async fn list_audience_members(
        &self,
        request: pb::ListAudienceMembersRequest,
    ) -> Result<pb::ListAudienceMembersResponse, ProfileError> {
        let pb::ListAudienceMembersRequest {
            audience,
            page_size,
            page_token,
        } = request;
        let limit = match usize::try_from(page_size) {
            Ok(0) => 100,
            Ok(n) if n <= convert::MAX_PAGE_SIZE => n,
            Ok(_) | Err(_) => {
                return Err(ProfileError::InvalidArgument(vec![FieldViolation::new(
                    "page_size",
                    format!("between 1 and {}, or 0 for 100", convert::MAX_PAGE_SIZE),
                )]));
            }
        };
        if !self
            .defs
            .current()
            .audiences
            .declared()
            .iter()
            .any(|a| a.name == audience)
        {
            return Err(ProfileError::NotFound);
        }
        let after = (!page_token.is_empty()).then_some(page_token.as_str());
        let (mut profile_ids, member_count) = self
            .store
            .audience_members(&audience, after, limit + 1)
            .await?;
        let next_page_token = if profile_ids.len() > limit {
            profile_ids.truncate(limit);
            profile_ids.last().cloned().unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListAudienceMembersResponse {
            profile_ids,
            next_page_token,
            member_count,
        })
    }

    /// Up to [`MAX_BATCH_GET`] profiles, each looked up like [`Self::get_profile`] (eight at
    /// a time); a failed lookup gets its error in its place.
    async fn batch_get(
        &self,
        request: pb::BatchGetProfilesRequest,
    ) -> Result<pb::BatchGetProfilesResponse, ProfileError> {
        use futures::StreamExt as _;
        let pb::BatchGetProfilesRequest { lookups } = request;
        if lookups.is_empty() || lookups.len() > MAX_BATCH_GET {
            return Err(ProfileError::InvalidArgument(vec![FieldViolation::new(
                "lookups",
                format!("1 to {MAX_BATCH_GET} lookups"),
            )]));
        }
        let results: Vec<Result<Read, ProfileError>> =
            futures::stream::iter(lookups.into_iter().map(|l| self.answer(l)))
                .buffered(8)
                .collect()
                .await;
        let mut out = Vec::with_capacity(results.len());
        for result in results {
            out.push(match result {
                Ok(Read::Encoded(bytes)) => pb::BatchProfileResult::found_encoded(bytes),
                Ok(Read::Decoded(profile)) => pb::BatchProfileResult::found(*profile),
                Err(ProfileError::NotFound) => {
                    pb::BatchProfileResult::failed("not found".to_owned())
                }
                Err(ProfileError::InvalidArgument(violations)) => pb::BatchProfileResult::failed(
                    violations
                        .iter()
                        .map(|v| format!("{}: {}", v.field, v.description))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
                // Anything else (a store or peer failure) fails the batch: retrying may help.
                Err(e) => return Err(e),
            });
        }
        Ok(pb::BatchGetProfilesResponse { results: out })
    }

    /// Everything held about one person, as a JSON document (GDPR right of access).
    async fn export(
        &self,
        request: pb::ExportProfileRequest,
    ) -> Result<pb::ExportProfileResponse, ProfileError> {
        use pb::export_profile_request::Lookup as E;
        use pb::get_profile_request::Lookup as G;
        let lookup = Lookup::try_from(pb::GetProfileRequest {
            lookup: request.lookup.map(|l| match l {
                E::ProfileId(id) => G::ProfileId(id),
                E::Identifier(id) => G::Identifier(id),
            }),
            as_of: None,
            read_mask: None,
        })?;
        let profile_id = match lookup {
            Lookup::ProfileId(id) => id,
            // Authoritative for an export: not from the identifier cache.
            Lookup::Identifier(identifier) => self.lookup_identity(identifier).await?,
        };
        let profile = self
            .store
            .get(&profile_id)
            .await?
            .ok_or(ProfileError::NotFound)?;
        let now = OffsetDateTime::now_utc();
        let shown = convert::profile_to_pb(&profile, &self.defs.current(), now);
        let mut ids = profile.merged_profile_ids.clone();
        ids.push(profile.profile_id.clone());
        let mut events = Vec::new();
        let mut query = crate::store::TimelineQuery {
            limit: EXPORT_PAGE,
            ..crate::store::TimelineQuery::default()
        };
        loop {
            let page = self.store.timeline(&ids, &query).await?;
            let full = page.len() == EXPORT_PAGE;
            query.before = page.last().map(|e| (e.occurred_at, e.event_id.clone()));
            events.extend(page);
            if !full {
                break;
            }
        }
        let graph = self.graph(&profile.profile_id).await?;
        let document = convert::export_document(&profile, &shown, &graph, &events, now);
        metrics::counter!("tessera_profile_exports_total").increment(1);
        Ok(pb::ExportProfileResponse {
            profile_id: profile.profile_id,
            document: serde_json::to_vec_pretty(&document)
                .map_err(|e| ProfileError::Corrupt(format!("export does not encode: {e}")))?,
        })
    }

    /// An account with its member count: see `ProfileService.GetAccount`.
    pub(crate) async fn get_account(&self, account_id: &str) -> Result<pb::Account, ProfileError> {
        check_account_id(account_id)?;
        let account = self
            .store
            .account(account_id)
            .await?
            .ok_or(ProfileError::NotFound)?;
        let members = self.store.account_members(account_id).await?;
        let computed = self
            .store
            .account_computed(account_id, OffsetDateTime::now_utc())
            .await?;
        Ok(convert::account_to_pb(
            &account,
            members.len(),
            &self.defs.current().catalog,
            computed,
        ))
    }

    /// A page of an account's members: see `ProfileService.ListAccountMembers`.
    pub(crate) async fn list_account_members(
        &self,
        request: pb::ListAccountMembersRequest,
    ) -> Result<pb::ListAccountMembersResponse, ProfileError> {
        let pb::ListAccountMembersRequest {
            account_id,
            page_size,
            page_token,
        } = request;
        check_account_id(&account_id)?;
        let page_size = match page_size {
            0 => 100,
            1..=1_000 => page_size as usize,
            _ => {
                return Err(ProfileError::InvalidArgument(vec![FieldViolation::new(
                    "page_size",
                    "1 to 1,000",
                )]));
            }
        };
        if self.store.account(&account_id).await?.is_none() {
            return Err(ProfileError::NotFound);
        }
        let members = self.store.account_members(&account_id).await?;
        let total = members.len() as i64;
        let mut page: Vec<pb::AccountMember> = members
            .into_iter()
            .filter(|m| page_token.is_empty() || m.profile_id > page_token)
            .take(page_size + 1)
            .map(|m| pb::AccountMember {
                profile_id: m.profile_id,
                role: m.role.unwrap_or_default(),
                title: m.title.unwrap_or_default(),
                joined_at: Some(to_timestamp(m.joined_at)),
                last_seen: Some(to_timestamp(m.last_seen)),
            })
            .collect();
        let next_page_token = if page.len() > page_size {
            page.truncate(page_size);
            page.last()
                .map(|m| m.profile_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListAccountMembersResponse {
            members: page,
            next_page_token,
            member_count: total,
        })
    }

    /// The live profiles meeting a condition, a page at a time: see
    /// `ProfileService.SearchProfiles`. Profiles are examined in id order from the page token
    /// (the last id examined), at most [`SEARCH_BUDGET`] per call.
    async fn search(
        &self,
        request: pb::SearchProfilesRequest,
    ) -> Result<pb::SearchProfilesResponse, ProfileError> {
        let pb::SearchProfilesRequest {
            condition_json,
            page_size,
            page_token,
            read_mask,
        } = request;
        let invalid = |field: &str, description: String| {
            ProfileError::InvalidArgument(vec![FieldViolation::new(field, description)])
        };
        let mask = convert::ReadMask::from_pb(read_mask)?;
        let condition: crate::audience::Condition = serde_json::from_str(&condition_json)
            .map_err(|e| invalid("condition_json", format!("not a condition: {e}")))?;
        let matcher = crate::audience::Audiences::compile(vec![crate::audience::Audience {
            name: "search".to_owned(),
            condition,
        }])
        .map_err(|e| invalid("condition_json", e))?;
        if !matcher.hidden().is_empty() {
            return Err(invalid(
                "condition_json",
                "`performed` conditions are kept by declared audiences only: search by the \
                 audience's members (ListAudienceMembers) instead"
                    .to_owned(),
            ));
        }
        let page_size = match page_size {
            0 => 20,
            1..=100 => page_size as usize,
            _ => return Err(invalid("page_size", "1 to 100".to_owned())),
        };
        let mut after = match page_token.as_str() {
            "" => None,
            token => Some(
                token
                    .strip_prefix("after:")
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| invalid("page_token", "not a token of this API".to_owned()))?
                    .to_owned(),
            ),
        };
        let now = OffsetDateTime::now_utc();
        let defs = self.defs.current();
        let computed_defs = &defs.computed;
        let mut profiles = Vec::new();
        let mut examined = 0;
        let mut exhausted = false;
        let mut account_traits: HashMap<String, Option<serde_json::Value>> = HashMap::new();
        while profiles.len() < page_size && examined < SEARCH_BUDGET {
            let chunk = self.store.scan(after.as_deref(), SEARCH_CHUNK).await?;
            exhausted = chunk.len() < SEARCH_CHUNK;
            for profile in chunk {
                examined += 1;
                after = Some(profile.profile_id.clone());
                let computed = profile.state.computed.values(computed_defs, now);
                // Account tests read the accounts themselves (profiles copy only what the
                // audiences name): their traits and account computed traits, each account read
                // once per call.
                let mut accounts = Vec::new();
                if !matcher.account_traits().is_empty() {
                    let ids: Vec<String> = profile
                        .state
                        .computed
                        .accounts()
                        .map(|(id, _)| id.to_owned())
                        .collect();
                    for id in &ids {
                        if !account_traits.contains_key(id) {
                            let traits = match self.store.account(id).await? {
                                Some(account) => {
                                    let computed = if matcher.account_traits().iter().any(|name| {
                                        defs.account_computed.iter().any(|c| &c.name == name)
                                    }) {
                                        self.store.account_computed(id, now).await?
                                    } else {
                                        BTreeMap::new()
                                    };
                                    Some(matcher.account_facts(
                                        &account.traits,
                                        &defs.account_computed,
                                        &computed,
                                    ))
                                }
                                None => None,
                            };
                            account_traits.insert(id.clone(), traits);
                        }
                    }
                    accounts = ids
                        .iter()
                        .filter_map(|id| account_traits.get(id).and_then(Option::as_ref))
                        .collect();
                }
                let facts = crate::audience::Facts {
                    traits: &profile.state.traits,
                    computed: &computed,
                    scores: &profile.scores,
                    accounts: &accounts,
                };
                if !matcher.members(facts).is_empty() {
                    let mut shown = convert::profile_to_pb(&profile, &defs, now);
                    if let Some(mask) = &mask {
                        mask.apply(&mut shown);
                    }
                    profiles.push(shown);
                    if profiles.len() == page_size {
                        break;
                    }
                }
            }
            if exhausted {
                break;
            }
        }
        // The scan stopped early (a full page or the budget) unless it ran out of profiles
        // after examining the whole last chunk.
        let done = exhausted && profiles.len() < page_size;
        metrics::counter!("tessera_profile_search_examined_total").increment(examined as u64);
        Ok(pb::SearchProfilesResponse {
            profiles,
            next_page_token: match after {
                Some(id) if !done => format!("after:{id}"),
                Some(_) | None => String::new(),
            },
        })
    }

    /// Deletes a person (GDPR right to erasure): see `ProfileService.DeleteProfile`. The
    /// identity service forgets the component first (so nothing links to it any more and its
    /// later events are suppressed), then the store deletes the profiles (and records their
    /// cache tombstones as owed), the cache gets the tombstones no fill can supersede, and the
    /// event log forgets the events. A cache that cannot take the tombstones does not fail the
    /// deletion: they stay owed in the database until some replica puts them
    /// ([`ProfilePurges`]). Each step is idempotent, so a failed deletion is finished by
    /// calling again with the profile id.
    async fn delete(
        &self,
        request: pb::DeleteProfileRequest,
    ) -> Result<pb::DeleteProfileResponse, ProfileError> {
        use pb::delete_profile_request::Lookup as D;
        use pb::get_profile_request::Lookup as G;
        if request.reason.len() > MAX_REASON {
            return Err(ProfileError::InvalidArgument(vec![FieldViolation::new(
                "reason",
                format!("at most {MAX_REASON} bytes"),
            )]));
        }
        let lookup = Lookup::try_from(pb::GetProfileRequest {
            lookup: request.lookup.map(|l| match l {
                D::ProfileId(id) => G::ProfileId(id),
                D::Identifier(id) => G::Identifier(id),
            }),
            as_of: None,
            read_mask: None,
        })?;
        let live = match lookup {
            Lookup::ProfileId(id) => match self.store.get(&id).await? {
                Some(profile) => profile.profile_id,
                // A deleted id finishes (or repeats) its deletion.
                None if self.store.is_deleted(&id).await? => id,
                None => return Err(ProfileError::NotFound),
            },
            Lookup::Identifier(identifier) => {
                let id = self.lookup_identity(identifier).await?;
                // Identity may know a profile this service has not applied an event of yet.
                self.store.get(&id).await?.map_or(id, |p| p.profile_id)
            }
        };
        // Owed before identity forgets them, so no crash loses the raise.
        let raise = self.identifiers_moving().await;
        let forgotten = match self.forget_identity(&live, &request.reason).await {
            Ok(forgotten) => forgotten,
            Err(e) => {
                self.forget_identifiers(raise).await;
                return Err(e);
            }
        };
        let now = OffsetDateTime::now_utc();
        let deleted = self
            .store
            .delete(&live, &forgotten.profile_ids, &request.reason, now)
            .await;
        // No cached identifier leads to them any more.
        self.forget_identifiers(raise).await;
        let deleted = deleted?;
        // No replica trusts a cached copy of them until the owed tombstones are in the cache.
        let purges = self.purges().await;
        purges.mark_owed(&deleted.profile_ids);
        self.changed.notify_waiters();
        // Their accounts are rescored without them by the account refresh.
        self.account_refresh.notify_one();
        count_membership_changes(&deleted.exits);
        purges.settle(&*self.store, &*self.cache).await;
        if deleted.profile_ids.iter().any(|id| purges.owed(id)) {
            // Deleted all the same: every replica keeps refusing their cached copies and puts
            // the tombstones once the cache answers.
            metrics::counter!("tessera_profile_cache_purges_owed_total").increment(1);
            tracing::warn!(
                profile_id = %live,
                "cache unavailable, the deleted profiles' tombstones are owed until it answers"
            );
        }
        let events: BTreeSet<String> = deleted
            .event_ids
            .iter()
            .chain(&forgotten.event_ids)
            .cloned()
            .collect();
        let events_deleted = self.forget_events(events, &deleted.identifiers).await?;
        if deleted.rows > 0 {
            metrics::counter!("tessera_profile_deletions_total").increment(1);
        }
        tracing::info!(
            profile_id = %live,
            profiles = deleted.profile_ids.len(),
            events = events_deleted,
            "deleted a person"
        );
        Ok(pb::DeleteProfileResponse {
            profile_id: live,
            profile_ids: deleted.profile_ids,
            events_deleted,
            identifiers_forgotten: forgotten.identifiers.max(deleted.identifiers.len() as i64),
        })
    }

    /// Asks the identity service to forget the component of `profile_id`; a profile it does
    /// not know (one only this service holds) has nothing to forget there.
    async fn forget_identity(
        &self,
        profile_id: &str,
        reason: &str,
    ) -> Result<identity::ForgetProfileResponse, ProfileError> {
        let mut client = IdentityServiceClient::with_interceptor(self.identity.clone(), Propagate);
        let mut request = Request::new(identity::ForgetProfileRequest {
            profile_id: profile_id.to_owned(),
            reason: reason.to_owned(),
        });
        request.set_timeout(PEER_TIMEOUT);
        match client.forget_profile(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) if status.code() == Code::NotFound => {
                Ok(identity::ForgetProfileResponse::default())
            }
            Err(status) => Err(ProfileError::Identity(status)),
        }
    }

    /// Deletes `events` and the quarantined events carrying `identifiers` from the event log;
    /// returns how many events it deleted.
    async fn forget_events(
        &self,
        events: BTreeSet<String>,
        identifiers: &[tessera_core::Identifier],
    ) -> Result<i64, ProfileError> {
        use tessera_proto::ingestion::v1 as ingestion;
        use tessera_proto::ingestion::v1::event_log_service_client::EventLogServiceClient;
        let mut client = EventLogServiceClient::with_interceptor(self.ingestion.clone(), Propagate);
        let events: Vec<String> = events.into_iter().collect();
        let identifiers: Vec<common::Identifier> = identifiers
            .iter()
            .cloned()
            .map(tessera_proto::convert::identifier_to_pb)
            .collect();
        let mut deleted = 0;
        let mut chunks: Vec<&[String]> = events.chunks(MAX_FORGOTTEN_PER_CALL).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut request = Request::new(ingestion::ForgetEventsRequest {
                event_ids: chunk.to_vec(),
                // Once is enough.
                identifiers: if i == 0 {
                    identifiers.clone()
                } else {
                    Vec::new()
                },
            });
            request.set_timeout(PEER_TIMEOUT);
            let response = client
                .forget_events(request)
                .await
                .map_err(ProfileError::Ingestion)?;
            deleted += response.into_inner().events;
        }
        Ok(deleted)
    }

    /// The identity graph of `profile_id` (its newest 10,000 decisions).
    async fn graph(
        &self,
        profile_id: &str,
    ) -> Result<identity::GetProfileGraphResponse, ProfileError> {
        let mut client = IdentityServiceClient::with_interceptor(self.identity.clone(), Propagate);
        let mut request = Request::new(identity::GetProfileGraphRequest {
            lookup: Some(identity::get_profile_graph_request::Lookup::ProfileId(
                profile_id.to_owned(),
            )),
            max_decisions: 10_000,
        });
        request.set_timeout(PEER_TIMEOUT);
        match client.get_profile_graph(request).await {
            Ok(response) => Ok(response.into_inner()),
            // A profile the graph does not know (for example created by a merge answered by
            // matching before identity held it) has no graph to export.
            Err(status) if status.code() == Code::NotFound => {
                Ok(identity::GetProfileGraphResponse::default())
            }
            Err(status) => Err(ProfileError::Identity(status)),
        }
    }

    /// The profile id the identity service has for `identifier`.
    /// The live profile id `identifier` names, for a read: from the identifier cache when it
    /// holds an entry of the current epoch, else from the identity service (and then cached).
    /// With it, when the cache answered, the entry's key and the epoch it was read under, for
    /// [`Inner::remember_identifier`].
    async fn lookup(
        &self,
        identifier: common::Identifier,
    ) -> Result<(String, Option<(String, i64)>), ProfileError> {
        // While a raise of the epoch is owed (a split or a deletion the cache has not heard
        // of), no cached lookup is trusted, nor one is cached.
        let raises = self.epoch_raises().await;
        if raises.owed() {
            metrics::counter!("tessera_profile_identifier_cache_bypassed_total").increment(1);
            return Ok((self.lookup_identity(identifier).await?, None));
        }
        let key = identifier_key(&identifier);
        // The epoch is read before identity is asked: an answer is cached under the epoch it
        // was read under, so one given before a split is never taken for one given after.
        let (epoch, entry) =
            tokio::join!(self.cache.get(IDENTIFIER_EPOCH_KEY), self.cache.get(&key));
        let epoch = match epoch {
            Ok(epoch) => epoch.map_or(0, |e| e.version),
            Err(e) => {
                cache_error("get", "identifier epoch", &e);
                return Ok((self.lookup_identity(identifier).await?, None));
            }
        };
        // An epoch below one a raise reached the cache with (a near cache that has not heard
        // of the raise yet, an expired epoch key, a cache restored from an old snapshot): its
        // entries may predate the raise. The background task raises it again.
        if epoch < raises.floor() {
            raises.repair();
            metrics::counter!("tessera_profile_identifier_cache_bypassed_total").increment(1);
            return Ok((self.lookup_identity(identifier).await?, None));
        }
        if let Ok(Some(entry)) = entry
            && entry.version == epoch
            && let Some(id) = entry
                .bytes
                .and_then(|b| String::from_utf8(b.into()).ok())
                .filter(|id| !id.is_empty())
        {
            metrics::counter!("tessera_profile_identifier_cache_hits_total").increment(1);
            return Ok((id, Some((key, epoch))));
        }
        metrics::counter!("tessera_profile_identifier_cache_misses_total").increment(1);
        let id = self.lookup_identity(identifier).await?;
        let entry = Versioned {
            version: epoch,
            bytes: Some(id.clone().into_bytes().into()),
        };
        if let Err(e) = self.cache.put_if_newer(&key, entry).await {
            cache_error("put", "identifier", &e);
        }
        Ok((id, Some((key, epoch))))
    }

    /// Points the identifier entry `key` (read under `epoch`) at the live profile `profile_id`
    /// it leads to now (its profile was merged into that one).
    async fn remember_identifier(&self, key: &str, epoch: i64, profile_id: &str) {
        let entry = Versioned {
            version: epoch,
            bytes: Some(bytes::Bytes::copy_from_slice(profile_id.as_bytes())),
        };
        // An entry of the same epoch is only replaced once removed (see `Versioned`); every
        // entry is checked against the epoch when read, so this cannot bring back one a split
        // made stale.
        if let Err(e) = self.cache.remove(key).await {
            cache_error("remove", "identifier", &e);
            return;
        }
        if let Err(e) = self.cache.put_if_newer(key, entry).await {
            cache_error("put", "identifier", &e);
        }
    }

    /// Records, before a write that moves identifiers (a split, a deletion), that the
    /// identifier cache's epoch must be raised once it ends; pass the answer to
    /// [`Inner::forget_identifiers`] after the write, whether it succeeded or not. Until the
    /// raise reached the cache no replica trusts a cached lookup (see [`EpochRaises`]).
    pub(crate) async fn identifiers_moving(&self) -> Option<i64> {
        let raises = self.epoch_raises().await;
        match self
            .store
            .record_identifier_raise(OffsetDateTime::now_utc())
            .await
        {
            Ok(id) => {
                raises.mark_owed();
                Some(id)
            }
            Err(e) => {
                // The write itself will most likely fail too; if not, the raise right after it
                // is all there is (as before raises were recorded).
                tracing::warn!(error = %e, "recording an identifier epoch raise failed");
                None
            }
        }
    }

    /// Makes every cached identifier entry stale after a write that moved identifiers ended:
    /// marks the raise recorded by [`Inner::identifiers_moving`] due and raises the epoch at
    /// once. If the cache cannot take it, the raise stays owed in the database, every replica
    /// refuses cached lookups meanwhile and retries it until the cache takes it.
    pub(crate) async fn forget_identifiers(&self, raise: Option<i64>) {
        let raises = self.epoch_raises().await;
        let now = OffsetDateTime::now_utc();
        match raise {
            Some(id) => {
                if let Err(e) = self.store.identifier_raise_due(id, now).await {
                    // Retried once the raise counts as abandoned.
                    tracing::warn!(error = %e, "marking an identifier epoch raise due failed");
                }
            }
            None => {
                if let Err(e) = raise_epoch(&*self.cache, 0).await {
                    cache_error("put", "identifier epoch", &e);
                }
            }
        }
        raises
            .settle(&*self.store, &*self.cache, OffsetDateTime::now_utc())
            .await;
    }

    /// This replica's [`EpochRaises`], read once from the database and its background task
    /// started on first use.
    async fn epoch_raises(&self) -> &EpochRaises {
        let raises = &*self.epoch_raises;
        raises
            .first_read
            .get_or_init(|| async {
                raises
                    .settle(&*self.store, &*self.cache, OffsetDateTime::now_utc())
                    .await;
                self.purges.settle(&*self.store, &*self.cache).await;
                tokio::spawn(EpochRaises::run(
                    Arc::downgrade(&self.epoch_raises),
                    Arc::downgrade(&self.purges),
                    self.store.clone(),
                    self.cache.clone(),
                ));
            })
            .await;
        raises
    }

    /// This replica's [`ProfilePurges`], read once from the database (with the epoch raises)
    /// on first use.
    async fn purges(&self) -> &ProfilePurges {
        self.epoch_raises().await;
        &self.purges
    }

    /// The live profile id `identifier` names, asked of the identity service.
    async fn lookup_identity(
        &self,
        identifier: common::Identifier,
    ) -> Result<String, ProfileError> {
        let mut client = IdentityServiceClient::with_interceptor(self.identity.clone(), Propagate);
        let mut request = Request::new(LookupIdentifierRequest {
            identifier: Some(identifier),
        });
        request.set_timeout(PEER_TIMEOUT);
        match client.lookup_identifier(request).await {
            Ok(response) => {
                let profile_id = response.into_inner().profile_id;
                if profile_id.is_empty() {
                    Err(ProfileError::Identity(Status::internal(
                        "lookup returned no profile id",
                    )))
                } else {
                    Ok(profile_id)
                }
            }
            Err(status) if status.code() == Code::NotFound => Err(ProfileError::NotFound),
            Err(status) if status.code() == Code::InvalidArgument => {
                Err(ProfileError::InvalidArgument(vec![FieldViolation::new(
                    "identifier",
                    status.message(),
                )]))
            }
            Err(status) => Err(ProfileError::Identity(status)),
        }
    }

    /// The cached profile, when the cache holds one (not a tombstone) and answers.
    async fn cached(&self, profile_id: &str, form: Form) -> Option<Read> {
        match self.cache.get(&cache_key(profile_id)).await {
            Ok(Some(Versioned {
                bytes: Some(bytes), ..
            })) => match CachedValidity::decode(bytes.as_ref()) {
                // Computed traits evaluated when the entry was put hold until
                // `computed_valid_until`; past it, the database answers (and re-evaluates).
                Ok(validity)
                    if validity
                        .computed_valid_until
                        .as_ref()
                        .and_then(tessera_proto::convert::from_timestamp)
                        .is_some_and(|until| until <= OffsetDateTime::now_utc()) =>
                {
                    metrics::counter!("tessera_profile_cache_computed_expired_total").increment(1);
                    None
                }
                Ok(_) => match form {
                    Form::Encoded => Some(Read::Encoded(bytes)),
                    Form::Decoded => match decode_cached(&bytes) {
                        Ok(profile) => Some(Read::Decoded(Box::new(profile))),
                        Err(e) => {
                            cache_error("decode", profile_id, &e);
                            None
                        }
                    },
                },
                Err(e) => {
                    cache_error("decode", profile_id, &e);
                    None
                }
            },
            Ok(Some(Versioned { bytes: None, .. }) | None) => None,
            Err(e) => {
                cache_error("get", profile_id, &e);
                None
            }
        }
    }

    /// Puts one entry if it is newer than the cached one.
    async fn put(&self, profile_id: &str, value: Versioned) {
        if let Err(e) = self.cache.put_if_newer(&cache_key(profile_id), value).await {
            cache_error("put", profile_id, &e);
        }
    }

    /// Puts the entries of written profiles, concurrently and within [`CACHE_WRITE_BUDGET`]:
    /// an entry that cannot be put in time is left to expire rather than hold up the write
    /// (a cache that does not answer must not stall the pipeline).
    async fn put_all(&self, entries: Vec<(String, Versioned)>) {
        let total = entries.len();
        let done = AtomicUsize::new(0);
        let puts = futures::future::join_all(entries.into_iter().map(|(id, value)| {
            let done = &done;
            async move {
                self.put(&id, value).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
        if tokio::time::timeout(CACHE_WRITE_BUDGET, puts)
            .await
            .is_err()
        {
            let pending = total - done.load(Ordering::Relaxed);
            metrics::counter!("tessera_profile_cache_errors_total", "op" => "put")
                .increment(pending as u64);
            tracing::warn!(pending, "profile cache too slow, entries left to expire");
        }
    }

    async fn apply_events(
        &self,
        request: pb::ApplyEventsRequest,
    ) -> Result<pb::ApplyEventsResponse, ProfileError> {
        let (_traced, traces) = event_traces(&request.events);
        let batch = convert::batch(request)?;
        // The account refresh is woken at once when the batch may change what other members
        // of an account read: its traits, or its account computed traits (audiences' copies,
        // person plans).
        let account_traits = {
            let defs = self.defs.current();
            let members_read = defs.members_read_account_computed();
            batch.events.iter().any(|e| {
                !e.details.group_traits.is_empty()
                    || (members_read
                        && (!e.details.group_id.is_empty() || defs.counts_for_accounts(e)))
            })
        };
        let now = micros(OffsetDateTime::now_utc());
        // Every profile the batch names is rescored in the same transaction, also when all its
        // events were duplicates: a batch retried after a scoring failure gets its scores.
        let scorer = TracedScorer {
            inner: self,
            traces: &traces,
        };
        let started = Instant::now();
        let applied = self
            .store
            .apply(&batch, self.half_life_seconds, now, &scorer)
            .await?;
        apply_stage("transaction", started);
        metrics::counter!("tessera_profile_events_applied_total").increment(applied.applied as u64);
        metrics::counter!("tessera_profile_duplicate_events_total")
            .increment(applied.duplicates as u64);
        // The batch's cache entries are put while its profiles are matched: the two are
        // independent (the merges matching answers put newer versions, and a put never
        // replaces a newer entry), and the call answers once both are done.
        let cache = async {
            let caching = Instant::now();
            self.cache_applied(&applied).await;
            apply_stage("cache", caching);
        };
        let matching = async {
            if !self.match_profiles {
                return Ok(None);
            }
            let matching = Instant::now();
            let matched = self.match_named(&applied, now).await;
            apply_stage("match", matching);
            matched.map(Some)
        };
        let ((), matched) = tokio::join!(cache, matching);
        if account_traits {
            self.account_refresh.notify_one();
        }
        let mut changed = changed_ids(&applied);
        // Every named profile is matched, so a batch retried after a matching failure
        // is matched again.
        let mut matched_merges = 0;
        if let Some(matched) = matched? {
            matched_merges = matched.merges;
            changed.extend(matched.changed);
        }

        tracing::debug!(
            applied = applied.applied,
            duplicates = applied.duplicates,
            merged = applied.merged_away.len(),
            matched_merges,
            "applied events"
        );
        Ok(pb::ApplyEventsResponse {
            applied: applied.applied,
            duplicates: applied.duplicates,
            profiles_changed: changed.len() as i64,
        })
    }

    /// Puts the cache entries of what a batch wrote, and wakes the change streams.
    async fn cache_applied(&self, applied: &Applied) {
        self.changed.notify_waiters();
        count_membership_changes(&applied.audiences);
        let mut entries = Vec::with_capacity(applied.changed.len() + applied.merged_away.len());
        let now = OffsetDateTime::now_utc();
        entries.extend(applied.changed.iter().map(|profile| {
            // The body of the version the batch kept, when it kept one: the profile as of the
            // batch, which a read past its `computed_valid_until` re-evaluates.
            match applied.encoded.get(&profile.profile_id) {
                Some((version, bytes)) if *version == profile.version => (
                    profile.profile_id.clone(),
                    Versioned {
                        version: *version,
                        bytes: Some(bytes.clone()),
                    },
                ),
                _ => entry(profile, &self.defs.current(), now),
            }
        }));
        // A merged-away profile's reads go to the database, which redirects to the survivor.
        entries.extend(applied.merged_away.iter().map(|(id, version)| {
            (
                id.clone(),
                Versioned {
                    version: *version,
                    bytes: None,
                },
            )
        }));
        self.put_all(entries).await;
    }

    /// Sends the trait values of the live profiles a batch named to the identity service's
    /// matching, in calls of at most [`MAX_MATCHED_PER_CALL`], and applies the merges it
    /// answers as the pipeline's merges are applied, rescoring the survivors.
    async fn match_named(
        &self,
        applied: &Applied,
        now: OffsetDateTime,
    ) -> Result<Matched, ProfileError> {
        let mut matched = Matched::default();
        if applied.named.is_empty() {
            return Ok(matched);
        }
        // The profiles the batch changed come with it, as a read returns them: only the others
        // (named by duplicate events alone) are read.
        let changed: HashMap<&str, &Profile> = applied
            .changed
            .iter()
            .map(|p| (p.profile_id.as_str(), p))
            .collect();
        let others: Vec<String> = applied
            .named
            .iter()
            .filter(|id| !changed.contains_key(id.as_str()))
            .cloned()
            .collect();
        let read = if others.is_empty() {
            Vec::new()
        } else {
            self.store.get_many(&others).await?
        };
        let mut profiles: Vec<&Profile> = applied
            .named
            .iter()
            .filter_map(|id| changed.get(id.as_str()).copied())
            .chain(&read)
            .collect();
        profiles.sort_by(|a, b| a.profile_id.cmp(&b.profile_id));
        let mut calls: Vec<Vec<identity::ProfileTraits>> = Vec::new();
        for traits in profiles.into_iter().filter_map(convert::profile_traits) {
            match calls.last_mut() {
                Some(call) if call.len() < MAX_MATCHED_PER_CALL => call.push(traits),
                Some(_) | None => calls.push(vec![traits]),
            }
        }
        for call in calls {
            let Some(merges) = self.match_call(call).await? else {
                break;
            };
            // Applied before the next call: identity has recorded these merges, and matching
            // the same profiles again need not answer them again.
            for merges in merges.chunks(convert::MAX_MERGES_PER_REQUEST) {
                let batch = Batch {
                    merges: merges.to_vec(),
                    events: Vec::new(),
                };
                let applied = self
                    .store
                    .apply(&batch, self.half_life_seconds, now, self)
                    .await?;
                metrics::counter!("tessera_profile_match_merges_applied_total")
                    .increment(applied.merged_away.len() as u64);
                self.cache_applied(&applied).await;
                matched.changed.extend(changed_ids(&applied));
                matched.merges += applied.merged_away.len();
            }
        }
        Ok(matched)
    }

    /// One `MatchProfiles` call: the merges decided, or `None` when the identity service does
    /// not implement matching (an older version), which is counted and warned about once.
    async fn match_call(
        &self,
        profiles: Vec<identity::ProfileTraits>,
    ) -> Result<Option<Vec<Merge>>, ProfileError> {
        metrics::counter!("tessera_profile_match_profiles_sent_total")
            .increment(profiles.len() as u64);
        let mut client = IdentityServiceClient::with_interceptor(self.identity.clone(), Propagate)
            .max_decoding_message_size(MAX_MESSAGE_SIZE);
        let mut request = Request::new(identity::MatchProfilesRequest { profiles });
        request.set_timeout(PEER_TIMEOUT);
        match client.match_profiles(request).await {
            Ok(response) => {
                let identity::MatchProfilesResponse {
                    merges,
                    suggestions,
                    refused,
                } = response.into_inner();
                tracing::debug!(
                    merges = merges.len(),
                    suggestions,
                    refused,
                    "identity matched profiles"
                );
                convert::match_merges(merges).map(Some)
            }
            Err(status) if status.code() == Code::Unimplemented => {
                metrics::counter!("tessera_profile_match_unimplemented_total").increment(1);
                if !self
                    .match_unimplemented_warned
                    .swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(
                        "identity service does not implement matching, profiles are not matched"
                    );
                }
                Ok(None)
            }
            Err(status) => Err(ProfileError::Identity(status)),
        }
    }
}

#[async_trait::async_trait]
impl Scorer for Inner {
    async fn score(
        &self,
        profiles: &[&Profile],
        accounts: &crate::store::Accounts,
        now: OffsetDateTime,
    ) -> Result<Vec<Vec<Score>>, ProfileError> {
        self.score_all(profiles, accounts, now, &HashMap::new())
            .await
    }

    async fn score_accounts(
        &self,
        accounts: &[(crate::account::Account, Vec<crate::account::Member>)],
        now: OffsetDateTime,
    ) -> Result<Option<Vec<Vec<Score>>>, ProfileError> {
        self.score_accounts_call(accounts, now).await
    }
}

/// Opens a span per traced event of a pipeline batch (none without trace export); returns them
/// with the trace context each named profile is scored under: its latest traced event's.
fn event_traces(
    events: &[pb::ResolvedEvent],
) -> (Vec<tracing::Span>, HashMap<String, TraceParent>) {
    let mut spans = Vec::new();
    let mut traces = HashMap::new();
    for e in events {
        let span = trace_context::event_span(&e.trace_parent, &e.trace_state, || {
            tracing::info_span!(
                "profile.apply_event",
                event_id = %e.event_id,
                profile_id = %e.profile_id,
            )
        });
        if let Some(span) = span {
            if let Some(trace) = TraceParent::of(&span) {
                traces.insert(e.profile_id.clone(), trace);
            }
            spans.push(span);
        }
    }
    (spans, traces)
}

/// Scores a pipeline batch's profiles, each traced in its event's trace.
struct TracedScorer<'a> {
    inner: &'a Inner,
    traces: &'a HashMap<String, TraceParent>,
}

#[async_trait::async_trait]
impl Scorer for TracedScorer<'_> {
    async fn score(
        &self,
        profiles: &[&Profile],
        accounts: &crate::store::Accounts,
        now: OffsetDateTime,
    ) -> Result<Vec<Vec<Score>>, ProfileError> {
        let started = Instant::now();
        let scores = self
            .inner
            .score_all(profiles, accounts, now, self.traces)
            .await;
        apply_stage("score", started);
        scores
    }

    async fn score_accounts(
        &self,
        accounts: &[(crate::account::Account, Vec<crate::account::Member>)],
        now: OffsetDateTime,
    ) -> Result<Option<Vec<Vec<Score>>>, ProfileError> {
        self.inner.score_accounts(accounts, now).await
    }
}

impl Inner {
    /// Asks the scoring service, in calls of at most [`MAX_SCORED_PER_CALL`] profiles; a
    /// profile with an entry in `traces` is scored in that trace.
    async fn score_all(
        &self,
        profiles: &[&Profile],
        accounts: &crate::store::Accounts,
        now: OffsetDateTime,
        traces: &HashMap<String, TraceParent>,
    ) -> Result<Vec<Vec<Score>>, ProfileError> {
        let mut out = Vec::with_capacity(profiles.len());
        for chunk in profiles.chunks(MAX_SCORED_PER_CALL) {
            out.extend(self.score_call(chunk, accounts, now, traces).await?);
        }
        Ok(out)
    }

    /// Asks the scoring service for the account-level scores of `accounts` (with their
    /// members), in calls of at most [`MAX_SCORED_PER_CALL`] accounts. `None` from a scoring
    /// service that does not score accounts yet (during a rolling upgrade): accounts keep
    /// their scores.
    async fn score_accounts_call(
        &self,
        accounts: &[(crate::account::Account, Vec<crate::account::Member>)],
        now: OffsetDateTime,
    ) -> Result<Option<Vec<Vec<Score>>>, ProfileError> {
        let mut out = Vec::with_capacity(accounts.len());
        for chunk in accounts.chunks(MAX_SCORED_PER_CALL) {
            let mut client =
                ScoringServiceClient::with_interceptor(self.scoring.clone(), Propagate)
                    .max_decoding_message_size(MAX_MESSAGE_SIZE);
            let mut request = Request::new(scoring::ScoreAccountsRequest {
                accounts: chunk
                    .iter()
                    .map(|(account, members)| convert::account_facts(account, members))
                    .collect(),
                as_of: Some(to_timestamp(now)),
            });
            request.set_timeout(PEER_TIMEOUT);
            let response = match client.score_accounts(request).await {
                Ok(response) => response.into_inner(),
                Err(status) if status.code() == Code::Unimplemented => {
                    tracing::warn!("scoring service does not score accounts, accounts not scored");
                    return Ok(None);
                }
                Err(status) => return Err(ProfileError::Scoring(status)),
            };
            if response.accounts.len() != chunk.len() {
                return Err(ProfileError::BadScores(format!(
                    "{} results for {} accounts",
                    response.accounts.len(),
                    chunk.len()
                )));
            }
            for ((account, _), scored) in chunk.iter().zip(response.accounts) {
                // The evaluations are for ScoreAccounts' other callers; the scores' factors
                // explain them.
                let scoring::AccountScores {
                    account_id,
                    scores,
                    plans: _,
                } = scored;
                if account_id != account.account_id {
                    return Err(ProfileError::BadScores(format!(
                        "results out of order: {account_id} for {}",
                        account.account_id
                    )));
                }
                out.push(
                    scores
                        .into_iter()
                        .map(|score| Score::try_from(score).map_err(ProfileError::BadScores))
                        .collect::<Result<_, _>>()?,
                );
            }
        }
        Ok(Some(out))
    }

    async fn score_call(
        &self,
        profiles: &[&Profile],
        accounts: &crate::store::Accounts,
        now: OffsetDateTime,
        traces: &HashMap<String, TraceParent>,
    ) -> Result<Vec<Vec<Score>>, ProfileError> {
        let mut client = ScoringServiceClient::with_interceptor(self.scoring.clone(), Propagate)
            .max_decoding_message_size(MAX_MESSAGE_SIZE);
        let mut request = Request::new(scoring::ScoreProfilesRequest {
            profiles: profiles
                .iter()
                .map(|p| {
                    let mut facts = convert::facts(
                        p,
                        self.half_life_seconds,
                        &self.defs.current(),
                        accounts,
                        now,
                    );
                    if let Some(trace) = traces.get(&p.profile_id) {
                        facts.trace_parent.clone_from(&trace.traceparent);
                        facts.trace_state.clone_from(&trace.tracestate);
                    }
                    facts
                })
                .collect(),
            as_of: Some(to_timestamp(now)),
        });
        request.set_timeout(PEER_TIMEOUT);
        let response = client
            .score_profiles(request)
            .await
            .map_err(ProfileError::Scoring)?
            .into_inner();
        if response.profiles.len() != profiles.len() {
            return Err(ProfileError::BadScores(format!(
                "{} results for {} profiles",
                response.profiles.len(),
                profiles.len()
            )));
        }
        profiles
            .iter()
            .zip(response.profiles)
            .map(|(profile, scored)| {
                let scoring::ProfileScores { profile_id, scores } = scored;
                if profile_id != profile.profile_id {
                    return Err(ProfileError::BadScores(format!(
                        "results out of order: {profile_id} for {}",
                        profile.profile_id
                    )));
                }
                scores
                    .into_iter()
                    .map(|score| Score::try_from(score).map_err(ProfileError::BadScores))
                    .collect()
            })
            .collect()
    }
}

/// What the merges answered by matching changed.
#[derive(Debug, Default)]
struct Matched {
    /// The profiles changed (survivors and merged-away profiles).
    changed: BTreeSet<String>,
    /// How many profiles were merged away.
    merges: usize,
}

/// The ids of the profiles whose state a batch changed: live ones and merged-away ones.
fn changed_ids(applied: &Applied) -> BTreeSet<String> {
    applied.state_changed.clone()
}

/// `INVALID_ARGUMENT` naming `account_id` unless it is a group id (1 to 200 bytes).
fn check_account_id(account_id: &str) -> Result<(), ProfileError> {
    if account_id.is_empty() || account_id.len() > 200 {
        return Err(ProfileError::InvalidArgument(vec![FieldViolation::new(
            "account_id",
            "a group id of 1 to 200 bytes",
        )]));
    }
    Ok(())
}

/// The cache entry of a stored live profile.
fn entry(profile: &Profile, defs: &Definitions, now: OffsetDateTime) -> (String, Versioned) {
    (
        profile.profile_id.clone(),
        Versioned {
            version: profile.version,
            bytes: Some(
                convert::profile_to_pb(profile, defs, now)
                    .encode_to_vec()
                    .into(),
            ),
        },
    )
}

/// `ProfileService`.
#[derive(Debug, Clone)]
pub(crate) struct ProfileApi(pub(crate) Arc<Inner>);

#[tonic::async_trait]
impl ProfileService for ProfileApi {
    async fn get_profile(
        &self,
        request: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        Ok(Response::new(
            self.0.get_profile_response(request.into_inner()).await?,
        ))
    }

    async fn list_profile_events(
        &self,
        request: Request<pb::ListProfileEventsRequest>,
    ) -> Result<Response<pb::ListProfileEventsResponse>, Status> {
        Ok(Response::new(
            self.0.list_events(request.into_inner()).await?,
        ))
    }

    async fn batch_get_profiles(
        &self,
        request: Request<pb::BatchGetProfilesRequest>,
    ) -> Result<Response<pb::BatchGetProfilesResponse>, Status> {
        Ok(Response::new(self.0.batch_get(request.into_inner()).await?))
    }

    async fn export_profile(
        &self,
        request: Request<pb::ExportProfileRequest>,
    ) -> Result<Response<pb::ExportProfileResponse>, Status> {
        let target = tessera_server::access::AuditTarget::of(&request);
        let exported = self.0.export(request.into_inner()).await?;
        target.set(format!("profile {}", exported.profile_id));
        Ok(Response::new(exported))
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::GetAccountResponse>, Status> {
        let account = self.0.get_account(&request.into_inner().account_id).await?;
        Ok(Response::new(pb::GetAccountResponse {
            account: Some(account),
        }))
    }

    async fn list_account_members(
        &self,
        request: Request<pb::ListAccountMembersRequest>,
    ) -> Result<Response<pb::ListAccountMembersResponse>, Status> {
        Ok(Response::new(
            self.0.list_account_members(request.into_inner()).await?,
        ))
    }

    async fn search_profiles(
        &self,
        request: Request<pb::SearchProfilesRequest>,
    ) -> Result<Response<pb::SearchProfilesResponse>, Status> {
        Ok(Response::new(self.0.search(request.into_inner()).await?))
    }

    async fn delete_profile(
        &self,
        request: Request<pb::DeleteProfileRequest>,
    ) -> Result<Response<pb::DeleteProfileResponse>, Status> {
        let target = tessera_server::access::AuditTarget::of(&request);
        let deleted = self.0.delete(request.into_inner()).await?;
        target.set(format!("profiles {}", deleted.profile_ids.join(",")));
        Ok(Response::new(deleted))
    }

    type WatchProfileChangesStream = crate::watch::ChangeStream;

    async fn watch_profile_changes(
        &self,
        request: Request<pb::WatchProfileChangesRequest>,
    ) -> Result<Response<Self::WatchProfileChangesStream>, Status> {
        Ok(Response::new(
            crate::watch::spawn(self.0.clone(), request.into_inner()).await?,
        ))
    }

    async fn list_audiences(
        &self,
        _request: Request<pb::ListAudiencesRequest>,
    ) -> Result<Response<pb::ListAudiencesResponse>, Status> {
        Ok(Response::new(self.0.list_audiences().await?))
    }

    async fn list_audience_members(
        &self,
        request: Request<pb::ListAudienceMembersRequest>,
    ) -> Result<Response<pb::ListAudienceMembersResponse>, Status> {
        Ok(Response::new(
            self.0.list_audience_members(request.into_inner()).await?,
        ))
    }
}

/// `ProfilePipelineService`.
#[derive(Debug, Clone)]
pub(crate) struct PipelineApi(pub(crate) Arc<Inner>);

#[tonic::async_trait]
impl ProfilePipelineService for PipelineApi {
    type StreamPurchaseHistoriesStream = crate::purchases::PurchaseStream;

    async fn stream_purchase_histories(
        &self,
        request: Request<pb::StreamPurchaseHistoriesRequest>,
    ) -> Result<Response<Self::StreamPurchaseHistoriesStream>, Status> {
        Ok(Response::new(crate::purchases::stream(
            self.0.clone(),
            request.into_inner(),
        )?))
    }

    async fn apply_events(
        &self,
        request: Request<pb::ApplyEventsRequest>,
    ) -> Result<Response<pb::ApplyEventsResponse>, Status> {
        Ok(Response::new(
            self.0.apply_events(request.into_inner()).await?,
        ))
    }

    async fn split_profiles(
        &self,
        request: Request<pb::SplitProfilesRequest>,
    ) -> Result<Response<pb::SplitProfilesResponse>, Status> {
        let split = convert::split(request.into_inner())?;
        let now = micros(OffsetDateTime::now_utc());
        // Identifiers move between profiles: cached lookups become stale. Owed before the
        // write, so no crash loses the raise.
        let raise = self.0.identifiers_moving().await;
        let applied = self
            .0
            .store
            .split(&split, self.0.half_life_seconds, now, &*self.0)
            .await;
        let applied = match applied {
            Ok(applied) => applied,
            Err(e) => {
                self.0.forget_identifiers(raise).await;
                return Err(e.into());
            }
        };
        self.0.cache_applied(&applied).await;
        self.0.forget_identifiers(raise).await;
        metrics::counter!("tessera_profile_splits_total").increment(1);
        tracing::info!(profiles = applied.state_changed.len(), "split profiles");
        Ok(Response::new(pb::SplitProfilesResponse {
            profiles_changed: i64::try_from(applied.state_changed.len()).unwrap_or(i64::MAX),
        }))
    }
}

/// Counts audience entries and exits in `tessera_profile_audience_changes_total`.
fn count_membership_changes(changes: &[crate::store::MembershipChange]) {
    for change in changes {
        let kind = if change.entered { "entered" } else { "exited" };
        metrics::counter!("tessera_profile_audience_changes_total", "change" => kind).increment(1);
    }
}

/// Records how long a stage of a delivery batch's apply took, from `started`.
fn apply_stage(stage: &'static str, started: Instant) {
    metrics::histogram!("tessera_profile_apply_stage_seconds", "stage" => stage)
        .record(started.elapsed().as_secs_f64());
}
