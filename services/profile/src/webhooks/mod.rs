//! Webhook destinations of the change stream (`[[profile.webhooks]]`): every change a webhook
//! selects (kinds, audiences, consent) is POSTed to its URL, signed with its secret, in stream
//! order, retried with exponential backoff for hours, and dead-lettered when refused or out of
//! retries; `DestinationService` lists and replays the dead letters.
//!
//! Correct with several replicas: each webhook's cursor in the change stream and a lease live in
//! the database (`webhooks`). Every replica runs a task per webhook, and only the lease holder
//! delivers; the cursor moves only while the lease is held, so a replica that stalls past its
//! lease cannot move it. Delivery is at least once: a crash after a 2xx and before the cursor
//! moved sends those changes again, so receivers deduplicate by change `id`.

mod api;
mod deliver;
mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use time::OffsetDateTime;

pub use deliver::{SIGNATURE_HEADER, WEBHOOK_ID_HEADER, signature};

use crate::error::ProfileError;
use crate::service::Inner;
use crate::store::{ChangeCursor, ProfileChange};
use store::{Head, Letter, NewDeadLetter, Retry, WebhookStore};

/// One webhook destination, as declared in config.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Webhook {
    /// Its name: letters, digits, `-`, `_` and `.`, at most 100 bytes. Its cursor and dead
    /// letters are kept under it, so renaming a webhook starts it anew.
    pub name: String,
    /// Where changes are POSTed (`http://` or `https://`).
    pub url: String,
    /// The HMAC-SHA256 key of the `X-Tessera-Signature` header, at least 16 bytes.
    pub secret: WebhookSecret,
    /// Only these kinds of change; all when empty.
    pub kinds: Vec<String>,
    /// Only entries into and exits from these audiences (and `deleted` changes); every change
    /// when empty.
    pub audiences: Vec<String>,
    /// When set, a change is sent only while its profile's consent for this purpose is granted
    /// (`deleted` changes always are: they carry no personal data, and destinations must delete).
    pub consent_purpose: Option<String>,
    /// Where a new webhook starts: `now` (changes written from then on) or `beginning` (every
    /// change the stream still keeps).
    pub start: Start,
    /// How long one request may take, in milliseconds.
    pub timeout_ms: u64,
    /// The most changes in one request.
    pub batch_size: usize,
    /// How long failing changes are retried before they are dead-lettered, in seconds, counted
    /// from the first failure.
    pub retry_for_seconds: u64,
    /// Dead-letter failing changes after this many attempts, even within `retry_for_seconds`.
    pub max_attempts: Option<u32>,
    /// The first retry's delay, in milliseconds; it doubles with each failure.
    pub backoff_initial_ms: u64,
    /// The longest delay between two attempts, in milliseconds.
    pub backoff_max_ms: u64,
    /// How long dead letters are kept, in days.
    pub dead_letter_retention_days: u64,
}

impl Default for Webhook {
    fn default() -> Self {
        Self {
            name: String::new(),
            url: String::new(),
            secret: WebhookSecret(String::new()),
            kinds: Vec::new(),
            audiences: Vec::new(),
            consent_purpose: None,
            start: Start::Now,
            timeout_ms: 10_000,
            batch_size: 100,
            retry_for_seconds: 4 * 3600,
            max_attempts: None,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 600_000,
            dead_letter_retention_days: 30,
        }
    }
}

/// Where a new webhook starts in the change stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// At the changes written from the moment it is first seen.
    #[default]
    Now,
    /// At the oldest change the stream keeps.
    Beginning,
}

/// A webhook's signing secret; never shown in logs.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct WebhookSecret(pub String);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

/// The most audiences one webhook may filter by.
const MAX_AUDIENCES: usize = 100;

impl Webhook {
    /// What is wrong with the declaration, if anything (never quoting the secret).
    pub fn problem(&self) -> Option<String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 100
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Some(format!(
                "name {:?}: 1 to 100 letters, digits, `-`, `_` or `.`",
                self.name
            ));
        }
        let name = &self.name;
        if let Err(reason) = parse_url(&self.url) {
            return Some(format!("{name}: url {reason}"));
        }
        if self.secret.0.len() < 16 {
            return Some(format!("{name}: secret needs at least 16 bytes"));
        }
        if let Some(kind) = self
            .kinds
            .iter()
            .find(|k| !crate::watch::KINDS.contains(&k.as_str()))
        {
            return Some(format!(
                "{name}: kind {kind:?} is not one of {}",
                crate::watch::KINDS.join(", ")
            ));
        }
        if self.audiences.len() > MAX_AUDIENCES {
            return Some(format!("{name}: at most {MAX_AUDIENCES} audiences"));
        }
        if self
            .consent_purpose
            .as_ref()
            .is_some_and(|p| p.is_empty() || p.len() > 200)
        {
            return Some(format!("{name}: consent_purpose needs 1 to 200 bytes"));
        }
        if !(1..=300_000).contains(&self.timeout_ms) {
            return Some(format!("{name}: timeout_ms from 1 to 300000"));
        }
        if !(1..=1_000).contains(&self.batch_size) {
            return Some(format!("{name}: batch_size from 1 to 1000"));
        }
        if self.max_attempts == Some(0) {
            return Some(format!("{name}: max_attempts at least 1"));
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            return Some(format!(
                "{name}: backoff_initial_ms at least 1, backoff_max_ms at least backoff_initial_ms"
            ));
        }
        if self.dead_letter_retention_days == 0 {
            return Some(format!("{name}: dead_letter_retention_days at least 1"));
        }
        None
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// How long a lease lasts: a round sends at most two requests (replays, then the head),
    /// each within the timeout, after renewing it.
    fn lease(&self) -> Duration {
        self.timeout() * 2 + Duration::from_secs(10)
    }

    /// Whether a change of `kind` (about `audience`, for audience changes) is for this webhook.
    fn selects(&self, kind: &str, audience: Option<&str>) -> bool {
        (self.kinds.is_empty() || self.kinds.iter().any(|k| k == kind))
            && (self.audiences.is_empty()
                || kind == "deleted"
                || audience.is_some_and(|a| self.audiences.iter().any(|w| w == a)))
    }

    /// Whether failing changes that have been tried `attempts` times since `first` go to the
    /// dead-letter list now.
    fn out_of_retries(&self, attempts: u32, first: OffsetDateTime, now: OffsetDateTime) -> bool {
        let retry_for =
            time::Duration::seconds(i64::try_from(self.retry_for_seconds).unwrap_or(i64::MAX));
        self.max_attempts.is_some_and(|max| attempts >= max) || now - first >= retry_for
    }

    fn backoff(&self, attempts: u32, after: Option<Duration>) -> Duration {
        let max = Duration::from_millis(self.backoff_max_ms);
        let delay = deliver::backoff(
            attempts,
            Duration::from_millis(self.backoff_initial_ms),
            max,
        );
        // A destination's Retry-After is honoured up to the longest delay.
        after.map_or(delay, |after| delay.max(after.min(max)))
    }
}

fn parse_url(url: &str) -> Result<http::Uri, &'static str> {
    let uri: http::Uri = url.parse().map_err(|_| "does not parse")?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some_and(|h| !h.is_empty()) => Ok(uri),
        Some("http" | "https") => Err("needs a host"),
        Some(_) | None => Err("must be http:// or https://"),
    }
}

/// Checks the webhooks of the settings: each valid, names unique. The problem is logged.
pub(crate) fn validate(webhooks: &[Webhook]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for webhook in webhooks {
        if let Some(problem) = webhook.problem() {
            return Err(problem);
        }
        if !names.insert(webhook.name.as_str()) {
            return Err(format!("{}: a second webhook of this name", webhook.name));
        }
    }
    Ok(())
}

/// A configured webhook with its parsed URL.
#[derive(Debug)]
struct Hook {
    config: Webhook,
    url: http::Uri,
}

/// The webhook destinations of one process: their config, the delivery state in the database,
/// and one HTTP client.
#[derive(Debug)]
pub(crate) struct Webhooks {
    hooks: Vec<Arc<Hook>>,
    store: Arc<dyn WebhookStore>,
    /// This process's name in leases.
    owner: String,
    client: deliver::HttpClient,
}

/// How often a replica that does not hold a webhook's lease tries to take it, at most.
const CLAIM_INTERVAL: Duration = Duration::from_secs(5);
/// How often the lease holder reads the change stream when nothing woke it.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long to wait after the database failed.
const ERROR_WAIT: Duration = Duration::from_secs(2);
/// How often old dead letters are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How many profiles' consent is read at once.
const CONSENT_READS: usize = 8;

/// The consent of the profiles of a batch, under the webhook's purpose.
enum Consent {
    /// The webhook has no purpose: everything may be sent.
    NotNeeded,
    /// Whether each profile has granted it.
    Read(HashMap<String, bool>),
}

impl Consent {
    /// Whether a change of `kind` about `profile_id` may be sent: `deleted` changes always may.
    fn allows(&self, kind: &str, profile_id: &str) -> bool {
        match self {
            Self::NotNeeded => true,
            Self::Read(granted) => {
                kind == "deleted" || granted.get(profile_id).copied().unwrap_or(false)
            }
        }
    }
}

/// What the lease holder does next.
enum Next {
    /// Go on at once: there is more.
    Busy,
    /// Wait for a new change.
    Idle,
    /// Wait until then (a retry is due).
    Until(OffsetDateTime),
}

impl Webhooks {
    /// The webhooks of `configs` (validated), delivering through `db`.
    pub(crate) fn new(db: tessera_store::Database, configs: &[Webhook]) -> Self {
        let hooks = configs
            .iter()
            .filter_map(|config| match parse_url(&config.url) {
                Ok(url) => Some(Arc::new(Hook {
                    config: config.clone(),
                    url,
                })),
                Err(reason) => {
                    tracing::error!(webhook = %config.name, reason, "invalid webhook url, skipped");
                    None
                }
            })
            .collect();
        Self {
            hooks,
            store: store::open(db),
            owner: uuid::Uuid::new_v4().to_string(),
            client: deliver::client(),
        }
    }

    fn hook(&self, name: &str) -> Option<&Arc<Hook>> {
        self.hooks.iter().find(|h| h.config.name == name)
    }

    /// Starts one delivery task per webhook (each delivers only while it holds the webhook's
    /// lease), until `shutdown`; the handle ends when they all have.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        inner: Arc<Inner>,
        shutdown: tessera_server::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let tasks: Vec<_> = self
            .hooks
            .iter()
            .map(|hook| {
                let (this, hook, inner, shutdown) =
                    (self.clone(), hook.clone(), inner.clone(), shutdown.clone());
                tokio::spawn(async move { this.run(&hook, &inner, &shutdown).await })
            })
            .collect();
        tokio::spawn(async move {
            for task in tasks {
                let _ = task.await;
            }
        })
    }

    async fn run(&self, hook: &Hook, inner: &Inner, shutdown: &tessera_server::Shutdown) {
        let name = hook.config.name.as_str();
        loop {
            match self.register(hook, inner).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(webhook = name, error = %e, "registering a webhook failed")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(ERROR_WAIT) => {}
            }
        }
        let lease = hook.config.lease();
        let mut last_prune: Option<tokio::time::Instant> = None;
        while !shutdown.is_cancelled() {
            // Registered before reading, so a write that lands meanwhile still wakes us.
            let woken = inner.changed.notified();
            let (wait, wake_on_change) = match self.store.claim(name, &self.owner, lease).await {
                Err(e) => {
                    tracing::warn!(webhook = name, error = %e, "claiming a webhook failed");
                    (ERROR_WAIT, false)
                }
                Ok(None) => (CLAIM_INTERVAL.min(lease / 3), false),
                Ok(Some(head)) => {
                    if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                        last_prune = Some(tokio::time::Instant::now());
                        self.prune(hook).await;
                    }
                    match self.round(hook, inner, head).await {
                        Ok(Next::Busy) => continue,
                        Ok(Next::Idle) => (POLL_INTERVAL, true),
                        Ok(Next::Until(at)) => {
                            let left = at - OffsetDateTime::now_utc();
                            let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
                            (left.min(lease / 3), false)
                        }
                        Err(e) => {
                            tracing::warn!(webhook = name, error = %e, "webhook delivery failed");
                            (ERROR_WAIT, false)
                        }
                    }
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = woken, if wake_on_change => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        // Another replica takes over at once rather than when the lease runs out.
        if let Err(e) = self.store.release(name, &self.owner).await {
            tracing::warn!(webhook = name, error = %e, "releasing a webhook lease failed");
        }
    }

    async fn register(&self, hook: &Hook, inner: &Inner) -> Result<(), ProfileError> {
        let start = match hook.config.start {
            Start::Now => inner.store.change_horizon().await?,
            Start::Beginning => ChangeCursor::default(),
        };
        self.store.register(&hook.config.name, start).await
    }

    async fn prune(&self, hook: &Hook) {
        let days = i64::try_from(hook.config.dead_letter_retention_days).unwrap_or(36_500);
        let before = OffsetDateTime::now_utc() - time::Duration::days(days);
        match self.store.prune(before).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(webhook = %hook.config.name, dead_letters = n, "pruned dead letters")
            }
            Err(e) => tracing::warn!(error = %e, "pruning dead letters failed"),
        }
    }

    /// One round of the lease holder: the replays that are due, then the head of the stream.
    async fn round(&self, hook: &Hook, inner: &Inner, head: Head) -> Result<Next, ProfileError> {
        let now = OffsetDateTime::now_utc();
        let config = &hook.config;
        let replays = self
            .store
            .due_replays(&config.name, now, config.batch_size)
            .await?;
        let replayed = !replays.is_empty();
        if replayed {
            self.replay(hook, inner, replays).await?;
        }
        let next = self.head(hook, inner, head).await?;
        Ok(match next {
            Next::Idle | Next::Until(_) if replayed => Next::Busy,
            Next::Busy | Next::Idle | Next::Until(_) => next,
        })
    }

    /// Delivers the changes after the cursor (or retries the failed batch when due).
    async fn head(&self, hook: &Hook, inner: &Inner, head: Head) -> Result<Next, ProfileError> {
        let config = &hook.config;
        let name = config.name.as_str();
        let now = OffsetDateTime::now_utc();
        if let Some(at) = head.next_attempt_at.filter(|at| *at > now) {
            return Ok(Next::Until(at));
        }
        let mut changes = inner
            .store
            .changes_after(head.cursor, config.batch_size)
            .await?;
        if let Some(until) = head.retrying {
            // A retry sends the batch that failed, not more.
            changes.retain(|c| c.cursor <= until);
        }
        let Some(last) = changes.last().map(|c| c.cursor).or(head.retrying) else {
            metrics::gauge!("tessera_profile_webhook_lag_seconds", "webhook" => name.to_owned())
                .set(0.0);
            return Ok(Next::Idle);
        };
        if let Some(first) = changes.first() {
            let lag = (now - first.at).as_seconds_f64().max(0.0);
            metrics::gauge!("tessera_profile_webhook_lag_seconds", "webhook" => name.to_owned())
                .set(lag);
        }
        self.forget_deleted(&changes).await?;
        let mut send = Vec::new();
        let consent = self
            .consent(
                config,
                inner,
                changes
                    .iter()
                    .map(|c| (c.kind.as_str(), c.profile_id.as_str())),
            )
            .await?;
        for change in changes {
            let audience = change.detail.get("audience").and_then(|a| a.as_str());
            if !config.selects(&change.kind, audience) {
                count_changes(name, "skipped", 1);
            } else if !consent.allows(&change.kind, &change.profile_id) {
                count_changes(name, "no_consent", 1);
            } else {
                send.push(change);
            }
        }
        if send.is_empty() {
            self.advance(name, last, &[]).await?;
            return Ok(Next::Busy);
        }
        let payloads: Vec<_> = send.iter().map(deliver::change_json).collect();
        let body = deliver::body(name, payloads.clone());
        let outcome = deliver::post(
            &self.client,
            &hook.url,
            name,
            config.secret.0.as_bytes(),
            body,
            config.timeout(),
        )
        .await;
        let attempts = head.attempts + 1;
        let dead = |error: &str| -> Vec<NewDeadLetter> {
            send.iter()
                .zip(&payloads)
                .map(|(change, payload)| NewDeadLetter {
                    cursor: change.cursor,
                    profile_id: change.profile_id.clone(),
                    kind: change.kind.clone(),
                    changed_at: change.at,
                    payload: payload.clone(),
                    attempts,
                    last_error: error.to_owned(),
                })
                .collect()
        };
        match outcome {
            deliver::Outcome::Delivered => {
                count_request(name, "delivered");
                if self.advance(name, last, &[]).await? {
                    count_changes(name, "delivered", send.len());
                }
                Ok(Next::Busy)
            }
            deliver::Outcome::Refused(error) => {
                count_request(name, "refused");
                tracing::warn!(webhook = name, %error, changes = send.len(), "webhook refused changes, dead-lettered");
                if self.advance(name, last, &dead(&error)).await? {
                    count_changes(name, "dead_lettered", send.len());
                }
                Ok(Next::Busy)
            }
            deliver::Outcome::Failed { error, after } => {
                count_request(name, "failed");
                let first = head.first_failed_at.unwrap_or(now);
                if config.out_of_retries(attempts, first, now) {
                    tracing::warn!(webhook = name, %error, attempts, changes = send.len(), "webhook out of retries, dead-lettered");
                    if self.advance(name, last, &dead(&error)).await? {
                        count_changes(name, "dead_lettered", send.len());
                    }
                    return Ok(Next::Busy);
                }
                let next = now + config.backoff(attempts, after);
                tracing::info!(webhook = name, %error, attempts, "webhook failed, retrying");
                let retry = Retry {
                    until: last,
                    attempts,
                    first_failed_at: first,
                    next_attempt_at: next,
                    error,
                };
                if self.store.retry_later(name, &self.owner, &retry).await? {
                    Ok(Next::Until(next))
                } else {
                    lost_lease(name);
                    Ok(Next::Busy)
                }
            }
        }
    }

    async fn advance(
        &self,
        name: &str,
        to: ChangeCursor,
        dead: &[NewDeadLetter],
    ) -> Result<bool, ProfileError> {
        let moved = self
            .store
            .advance(name, &self.owner, to, dead, OffsetDateTime::now_utc())
            .await?;
        if !moved {
            lost_lease(name);
        }
        Ok(moved)
    }

    /// A person's dead letters go with them: deleting a person logs a `deleted` change, and
    /// every webhook passes it (whatever it selects).
    async fn forget_deleted(&self, changes: &[ProfileChange]) -> Result<(), ProfileError> {
        let ids: Vec<String> = changes
            .iter()
            .filter(|c| c.kind == "deleted")
            .flat_map(|c| {
                let listed = c.detail.get("profile_ids").and_then(|ids| ids.as_array());
                listed
                    .into_iter()
                    .flatten()
                    .filter_map(|id| id.as_str().map(str::to_owned))
                    .chain([c.profile_id.clone()])
            })
            .collect();
        if !ids.is_empty() {
            let n = self.store.forget_profiles(&ids).await?;
            if n > 0 {
                tracing::info!(dead_letters = n, "deleted dead letters of deleted profiles");
            }
        }
        Ok(())
    }

    /// Each profile's current consent for the webhook's purpose, when it has one (a
    /// merged-away id answers for its survivor; a profile that no longer exists has none).
    async fn consent(
        &self,
        config: &Webhook,
        inner: &Inner,
        changes: impl Iterator<Item = (&str, &str)>,
    ) -> Result<Consent, ProfileError> {
        let Some(purpose) = config.consent_purpose.as_deref() else {
            return Ok(Consent::NotNeeded);
        };
        let mut ids: Vec<String> = changes
            .filter(|(kind, _)| *kind != "deleted")
            .map(|(_, id)| id.to_owned())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let store = &inner.store;
        // Owned ids: a future per id borrowing from the closure's argument is not Send.
        let granted = futures::stream::iter(ids)
            .map(|id: String| async move {
                let profile = store.get(&id).await?;
                let granted = profile.is_some_and(|p| {
                    p.state
                        .computed
                        .consent()
                        .any(|(name, granted, _)| name == purpose && granted)
                });
                Ok::<_, ProfileError>((id, granted))
            })
            .buffer_unordered(CONSENT_READS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        Ok(Consent::Read(granted))
    }

    /// Sends dead letters queued for replay (those the webhook no longer selects, or whose
    /// profile no longer consents, are dropped).
    async fn replay(
        &self,
        hook: &Hook,
        inner: &Inner,
        letters: Vec<Letter>,
    ) -> Result<(), ProfileError> {
        let config = &hook.config;
        let name = config.name.as_str();
        let consent = self
            .consent(
                config,
                inner,
                letters
                    .iter()
                    .map(|l| (l.kind.as_str(), l.profile_id.as_str())),
            )
            .await?;
        let (send, drop): (Vec<&Letter>, Vec<&Letter>) = letters.iter().partition(|l| {
            let audience = l.payload.get("audience").and_then(|a| a.as_str());
            config.selects(&l.kind, audience) && consent.allows(&l.kind, &l.profile_id)
        });
        if !drop.is_empty() {
            let ids: Vec<i64> = drop.iter().map(|l| l.id).collect();
            self.store.remove(&ids).await?;
            count_changes(name, "replay_dropped", ids.len());
        }
        if send.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = send.iter().map(|l| l.id).collect();
        let payloads = send
            .iter()
            .map(|l| {
                let mut payload = l.payload.clone();
                if let Some(object) = payload.as_object_mut() {
                    object.insert("replayed".into(), true.into());
                }
                payload
            })
            .collect();
        let outcome = deliver::post(
            &self.client,
            &hook.url,
            name,
            config.secret.0.as_bytes(),
            deliver::body(name, payloads),
            config.timeout(),
        )
        .await;
        let now = OffsetDateTime::now_utc();
        match outcome {
            deliver::Outcome::Delivered => {
                count_request(name, "delivered");
                self.store.remove(&ids).await?;
                count_changes(name, "replayed", ids.len());
            }
            deliver::Outcome::Refused(error) => {
                count_request(name, "refused");
                tracing::warn!(webhook = name, %error, "webhook refused replayed changes");
                self.store.replay_failed(&ids, None, &error, now).await?;
            }
            deliver::Outcome::Failed { error, after } => {
                count_request(name, "failed");
                let attempts = send.iter().map(|l| l.replay_attempts).max().unwrap_or(0) + 1;
                let first = send.iter().filter_map(|l| l.replay_at).min().unwrap_or(now);
                let next = (!config.out_of_retries(attempts, first, now))
                    .then(|| now + config.backoff(attempts, after));
                self.store.replay_failed(&ids, next, &error, now).await?;
            }
        }
        Ok(())
    }
}

fn lost_lease(webhook: &str) {
    tracing::warn!(
        webhook,
        "lost a webhook lease mid-delivery; another replica goes on"
    );
}

fn count_request(webhook: &str, result: &'static str) {
    metrics::counter!("tessera_profile_webhook_requests_total", "webhook" => webhook.to_owned(), "result" => result)
        .increment(1);
}

fn count_changes(webhook: &str, outcome: &'static str, n: usize) {
    metrics::counter!("tessera_profile_webhook_changes_total", "webhook" => webhook.to_owned(), "outcome" => outcome)
        .increment(u64::try_from(n).unwrap_or(u64::MAX));
}

/// The gRPC `DestinationService` over these webhooks.
pub(crate) fn api(
    webhooks: Arc<Webhooks>,
) -> tessera_proto::profile::v1::destination_service_server::DestinationServiceServer<
    api::DestinationApi,
> {
    tessera_proto::profile::v1::destination_service_server::DestinationServiceServer::new(
        api::DestinationApi(webhooks),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook() -> Webhook {
        Webhook {
            name: "crm".into(),
            url: "https://crm.example.com/hooks/tessera".into(),
            secret: WebhookSecret("0123456789abcdef".into()),
            ..Webhook::default()
        }
    }

    #[test]
    fn declarations_are_checked_and_the_secret_never_shows() {
        assert_eq!(hook().problem(), None);
        assert_eq!(validate(&[hook()]), Ok(()));
        assert!(validate(&[hook(), hook()]).unwrap_err().contains("second"));
        let bad = [
            Webhook {
                name: "a b".into(),
                ..hook()
            },
            Webhook {
                url: "ftp://x/".into(),
                ..hook()
            },
            Webhook {
                url: "http:///x".into(),
                ..hook()
            },
            Webhook {
                secret: WebhookSecret("short".into()),
                ..hook()
            },
            Webhook {
                kinds: vec!["nope".into()],
                ..hook()
            },
            Webhook {
                consent_purpose: Some(String::new()),
                ..hook()
            },
            Webhook {
                batch_size: 0,
                ..hook()
            },
            Webhook {
                timeout_ms: 0,
                ..hook()
            },
            Webhook {
                max_attempts: Some(0),
                ..hook()
            },
            Webhook {
                backoff_max_ms: 10,
                ..hook()
            },
        ];
        for webhook in bad {
            let problem = webhook.problem().expect("a problem");
            assert!(!problem.contains("0123456789abcdef"), "{problem}");
        }
        let shown = format!("{:?}", hook());
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(shown.contains("***"));
    }

    #[test]
    fn declarations_parse_with_defaults() {
        let w: Webhook = serde_json::from_value(serde_json::json!({
            "name": "crm", "url": "http://127.0.0.1:9/x", "secret": "0123456789abcdef",
            "kinds": ["audience_entered"], "consent_purpose": "marketing", "start": "beginning"
        }))
        .unwrap();
        assert_eq!(w.retry_for_seconds, 4 * 3600);
        assert_eq!(w.start, Start::Beginning);
        assert_eq!(w.problem(), None);
        assert!(
            serde_json::from_value::<Webhook>(serde_json::json!({"name": "x", "nope": 1})).is_err()
        );
    }

    #[test]
    fn the_example_config_declares_a_valid_webhook() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/tessera.example.toml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let config: toml::Value = toml::from_str(&text).unwrap();
        let webhooks: Vec<Webhook> = config["profile"]["webhooks"].clone().try_into().unwrap();
        assert_eq!(webhooks.len(), 1);
        assert_eq!(validate(&webhooks), Ok(()));
        assert_eq!(webhooks[0].consent_purpose.as_deref(), Some("marketing"));
    }

    #[test]
    fn selection_follows_kinds_and_audiences_and_deletions_pass_audiences() {
        let all = hook();
        assert!(all.selects("updated", None));
        let vip = Webhook {
            audiences: vec!["vip".into()],
            ..hook()
        };
        assert!(vip.selects("audience_entered", Some("vip")));
        assert!(!vip.selects("audience_entered", Some("churned")));
        assert!(!vip.selects("updated", None));
        assert!(vip.selects("deleted", None));
        let entries = Webhook {
            kinds: vec!["audience_entered".into()],
            ..vip
        };
        assert!(!entries.selects("deleted", None));
    }

    #[test]
    fn deletions_are_sent_whatever_the_consent() {
        let read = Consent::Read(HashMap::from([
            ("yes".to_owned(), true),
            ("no".to_owned(), false),
        ]));
        assert!(read.allows("updated", "yes"));
        assert!(!read.allows("updated", "no"));
        assert!(!read.allows("updated", "gone"));
        assert!(read.allows("deleted", "gone"));
        assert!(Consent::NotNeeded.allows("updated", "gone"));
    }

    #[test]
    fn the_retry_budget_is_time_and_optionally_attempts() {
        let t0 = time::macros::datetime!(2026-05-01 00:00 UTC);
        let w = hook();
        assert!(!w.out_of_retries(50, t0, t0 + time::Duration::hours(3)));
        assert!(w.out_of_retries(50, t0, t0 + time::Duration::hours(4)));
        let capped = Webhook {
            max_attempts: Some(3),
            ..hook()
        };
        assert!(!capped.out_of_retries(2, t0, t0));
        assert!(capped.out_of_retries(3, t0, t0));
        // Retry-After is honoured up to the longest delay.
        let after = w.backoff(1, Some(Duration::from_secs(30)));
        assert!(after >= Duration::from_secs(30));
        let capped_after = w.backoff(1, Some(Duration::from_secs(100_000)));
        assert!(capped_after <= Duration::from_millis(w.backoff_max_ms));
    }
}
