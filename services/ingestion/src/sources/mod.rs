//! Sources: where events come from. Each source has a write key that clients authenticate with
//! (stored only as a SHA-256 hash, shown once on creation and rotation), an enabled flag, an
//! optional rate limit and a tracking-plan mode.
//!
//! The front doors (gRPC, HTTP) call [`Ingestion::authenticate`] and [`Ingestion::check_rate`]
//! on every request. Authentication reads through a small in-process cache, so the hot path does
//! not query the database per request; the cache entries live [`KEY_CACHE_TTL`], so with several
//! replicas a disabled or rotated key stops working on every replica within that time (at once on
//! the replica that made the change).

mod convert;
mod error;
pub(crate) mod key;
mod rate;
mod service;
mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_core::FieldViolation;
use tessera_store::Database;
use time::OffsetDateTime;
use uuid::Uuid;

pub use error::SourceError;
pub(crate) use service::{fuzz_request, server};

use self::key::{KeyHash, WriteKey};
use self::store::{NewSource, SourceChange, SourceRecord, SourceStore};
use crate::{IngestError, Ingestion};

/// How long an authentication result is cached by each replica: a disabled or rotated key keeps
/// working on other replicas for at most this long.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(5);

/// How many write keys (known or unknown) each replica caches at most.
const KEY_CACHE_CAPACITY: u64 = 10_000;

/// The source `tessera dev` creates on its first start.
pub const DEV_SOURCE: &str = "default";

/// How a source's tracking plan is enforced (the plans themselves come with issue 3, item 6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) enum PlanMode {
    /// No checks.
    #[default]
    Allow,
    /// Accept, recording violations on the event.
    Warn,
    /// Reject violating events and quarantine them.
    Block,
}

impl PlanMode {
    /// The stored name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Warn => "warn",
            Self::Block => "block",
        }
    }

    /// The mode of a stored name.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Self::Allow),
            "warn" => Some(Self::Warn),
            "block" => Some(Self::Block),
            _ => None,
        }
    }
}

/// An authenticated, enabled source: what a front door needs to accept its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    /// The source's id; its events are stored under it.
    pub(crate) id: Uuid,
    /// The source's unique name.
    pub(crate) name: String,
    /// Events per second accepted per replica; `None`: no limit.
    pub(crate) rate_limit_per_second: Option<u32>,
    /// How its tracking plan is enforced.
    pub(crate) plan_mode: PlanMode,
}

impl From<&SourceRecord> for Source {
    fn from(r: &SourceRecord) -> Self {
        Self {
            id: r.id,
            name: r.name.clone(),
            rate_limit_per_second: r.rate_limit_per_second,
            plan_mode: r.plan_mode,
        }
    }
}

/// The sources part of the ingestion service: the store, the key cache and the rate limiter.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    store: Arc<dyn SourceStore>,
    /// Key hash → the enabled source it authenticates, or `None` (unknown or disabled): misses
    /// are cached too, so a client stuck on a bad key does not query the database per request.
    keys: moka::future::Cache<KeyHash, Option<Source>>,
    limiter: Arc<rate::Limiter>,
}

impl Sources {
    /// The sources stored in `db`.
    pub(crate) fn new(db: Database) -> Self {
        Self {
            store: store::open(db),
            keys: moka::future::Cache::builder()
                .max_capacity(KEY_CACHE_CAPACITY)
                .time_to_live(KEY_CACHE_TTL)
                .build(),
            limiter: Arc::new(rate::Limiter::default()),
        }
    }

    /// Forgets every cached authentication after a change through this replica, so the change
    /// applies here at once (admin changes are rare; other replicas follow within the TTL).
    fn changed(&self) {
        self.keys.invalidate_all();
    }
}

/// A source name: 1 to 64 ASCII letters, digits, `-`, `_` or `.`, starting with a letter or
/// digit, so it is safe in a command line, a URL and a log line.
fn check_name(name: &str) -> Result<(), SourceError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(SourceError::Invalid(vec![FieldViolation::new(
            "name",
            "must be 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit",
        )]))
    }
}

/// What [`Ingestion::ensure_dev_source`] did.
pub enum DevSource {
    /// The source did not exist and was created with this key.
    Created(String),
    /// The source has the operator's fixed key (it was created, or re-keyed, as needed).
    Fixed(String),
    /// The source existed already; its key was shown when it was created.
    Existing,
}

impl std::fmt::Debug for DevSource {
    // Never print the key through Debug.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Created(_) => "Created(..)",
            Self::Fixed(_) => "Fixed(..)",
            Self::Existing => "Existing",
        })
    }
}

/// Whether `key` is acceptable as an operator-chosen write key (`tessera dev --write-key`): 8 to
/// 256 printable ASCII characters without spaces or `:`.
pub fn is_valid_write_key(key: &str) -> bool {
    WriteKey::chosen(key).is_some()
}

impl Ingestion {
    /// The enabled source whose write key is `write_key`; `Unauthenticated` for an empty,
    /// unknown or disabled key. Cached per replica for [`KEY_CACHE_TTL`].
    pub(crate) async fn authenticate(&self, write_key: &str) -> Result<Source, IngestError> {
        if write_key.is_empty() || write_key.len() > key::MAX_LEN {
            return Err(unauthenticated());
        }
        let hash = key::hash(write_key);
        let found = match self.sources.keys.get(&hash).await {
            Some(cached) => cached,
            None => {
                let record = self.sources.store.find_by_key(&hash).await?;
                let source = record.filter(|r| r.enabled).as_ref().map(Source::from);
                self.sources.keys.insert(hash, source.clone()).await;
                source
            }
        };
        found.ok_or_else(unauthenticated)
    }

    /// Takes `events` from the rate limit of `source`: `RateLimited` with the time to wait when
    /// it is over. The limit applies per replica.
    pub(crate) fn check_rate(&self, source: &Source, events: usize) -> Result<(), IngestError> {
        let Some(rate) = source.rate_limit_per_second else {
            return Ok(());
        };
        self.sources
            .limiter
            .take(source.id, rate, events, Instant::now())
            .map_err(|retry_after| {
                metrics::counter!("tessera_ingestion_rate_limited_total").increment(1);
                IngestError::RateLimited { retry_after }
            })
    }

    /// Creates a source with a fresh write key; the key is returned to be shown once.
    pub(crate) async fn add_source(
        &self,
        name: &str,
        rate_limit_per_second: Option<u32>,
        plan_mode: PlanMode,
    ) -> Result<(SourceRecord, WriteKey), SourceError> {
        check_name(name)?;
        let key = WriteKey::generate();
        let record = self
            .insert_source(name, &key, rate_limit_per_second, plan_mode)
            .await?;
        Ok((record, key))
    }

    async fn insert_source(
        &self,
        name: &str,
        key: &WriteKey,
        rate_limit_per_second: Option<u32>,
        plan_mode: PlanMode,
    ) -> Result<SourceRecord, SourceError> {
        let new = NewSource {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            key_hash: key.hash(),
            key_prefix: key.display_prefix(),
            rate_limit_per_second,
            plan_mode,
            created_at: OffsetDateTime::now_utc(),
        };
        let record = match self.sources.store.create(&new).await {
            Ok(record) => record,
            Err(e) if store::is_unique_violation(&e) => {
                // The name, or (for a chosen key) the key hash, is taken.
                return Err(if self.sources.store.get(name).await?.is_some() {
                    taken(name)
                } else {
                    key_taken()
                });
            }
            Err(e) => return Err(e.into()),
        };
        self.sources.changed();
        tracing::info!(source = %record.id, name, "source created");
        Ok(record)
    }

    /// Every source, by name.
    pub(crate) async fn all_sources(&self) -> Result<Vec<SourceRecord>, SourceError> {
        Ok(self.sources.store.list().await?)
    }

    /// The source called `name`.
    pub(crate) async fn source_named(&self, name: &str) -> Result<SourceRecord, SourceError> {
        check_name(name)?;
        self.sources
            .store
            .get(name)
            .await?
            .ok_or_else(|| SourceError::NotFound(name.to_owned()))
    }

    /// Enables or disables the source called `name`. A disabled source's key is refused (on
    /// other replicas within [`KEY_CACHE_TTL`]); its settings and events are kept.
    pub(crate) async fn set_source_enabled(
        &self,
        name: &str,
        enabled: bool,
    ) -> Result<SourceRecord, SourceError> {
        check_name(name)?;
        let record = self
            .sources
            .store
            .set_enabled(name, enabled)
            .await?
            .ok_or_else(|| SourceError::NotFound(name.to_owned()))?;
        self.sources.changed();
        tracing::info!(source = %record.id, name, enabled, "source enabled flag set");
        Ok(record)
    }

    /// Gives the source called `name` a fresh write key, returned to be shown once; the old key
    /// stops working (on other replicas within [`KEY_CACHE_TTL`]).
    pub(crate) async fn rekey_source(
        &self,
        name: &str,
    ) -> Result<(SourceRecord, WriteKey), SourceError> {
        check_name(name)?;
        let key = WriteKey::generate();
        let record = self.set_write_key(name, &key).await?;
        Ok((record, key))
    }

    async fn set_write_key(&self, name: &str, key: &WriteKey) -> Result<SourceRecord, SourceError> {
        let record = self
            .sources
            .store
            .set_key(
                name,
                &key.hash(),
                &key.display_prefix(),
                OffsetDateTime::now_utc(),
            )
            .await
            .map_err(|e| {
                if store::is_unique_violation(&e) {
                    key_taken()
                } else {
                    e.into()
                }
            })?
            .ok_or_else(|| SourceError::NotFound(name.to_owned()))?;
        self.sources.changed();
        tracing::info!(source = %record.id, name, "write key rotated");
        Ok(record)
    }

    /// Changes the rate limit and/or the plan mode of the source called `name`.
    pub(crate) async fn change_source(
        &self,
        name: &str,
        change: SourceChange,
    ) -> Result<SourceRecord, SourceError> {
        check_name(name)?;
        let record = self
            .sources
            .store
            .update(name, &change)
            .await?
            .ok_or_else(|| SourceError::NotFound(name.to_owned()))?;
        self.sources.changed();
        tracing::info!(source = %record.id, name, "source updated");
        Ok(record)
    }

    /// `tessera dev` only (production services never create sources by themselves): makes
    /// sure the source [`DEV_SOURCE`] exists. With `fixed_key`, the source gets exactly that
    /// key, created or re-keyed as needed; without, a new source gets a random key.
    pub async fn ensure_dev_source(
        &self,
        fixed_key: Option<&str>,
    ) -> Result<DevSource, SourceError> {
        let fixed = match fixed_key {
            Some(k) => Some(WriteKey::chosen(k).ok_or_else(|| {
                SourceError::Invalid(vec![FieldViolation::new(
                    "write_key",
                    "must be 8 to 256 printable ASCII characters without spaces or ':'",
                )])
            })?),
            None => None,
        };
        let existing = self.sources.store.get(DEV_SOURCE).await?;
        match (existing, fixed) {
            (None, None) => {
                let (_, key) = self
                    .add_source(DEV_SOURCE, None, PlanMode::default())
                    .await?;
                Ok(DevSource::Created(key.expose().to_owned()))
            }
            (None, Some(key)) => {
                self.insert_source(DEV_SOURCE, &key, None, PlanMode::default())
                    .await?;
                Ok(DevSource::Fixed(key.expose().to_owned()))
            }
            (Some(_), None) => Ok(DevSource::Existing),
            (Some(_), Some(key)) => {
                // Re-key only when the source has another key: the lookup compares hashes.
                let current = self.sources.store.find_by_key(&key.hash()).await?;
                if current.is_none_or(|r| r.name != DEV_SOURCE) {
                    self.set_write_key(DEV_SOURCE, &key).await?;
                }
                Ok(DevSource::Fixed(key.expose().to_owned()))
            }
        }
    }
}

fn unauthenticated() -> IngestError {
    metrics::counter!("tessera_ingestion_unauthenticated_total").increment(1);
    IngestError::Unauthenticated
}

fn taken(name: &str) -> SourceError {
    SourceError::AlreadyExists(FieldViolation::new(
        "name",
        format!("a source named {name:?} exists already"),
    ))
}

fn key_taken() -> SourceError {
    SourceError::AlreadyExists(FieldViolation::new(
        "write_key",
        "another source has this write key",
    ))
}

#[cfg(test)]
mod tests;
