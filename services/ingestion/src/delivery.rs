//! Delivery of the event log down the pipeline.
//!
//! Every replica runs one dispatcher. The log is split into partitions by routing key; a
//! dispatcher leases a fair share of them (partitions ÷ live dispatchers) in the database and
//! delivers them in rounds: the next events of every leased partition (at most
//! `delivery_batch` in all, shared fairly), merged in log order, are resolved by one identity
//! call and applied by one profile call, then each partition's cursor moves. One call per
//! round rather than one per partition keeps a replica from contending with itself for the
//! same people's locks downstream, and makes the downstream batches larger. Rounds overlap by
//! one stage: the next round is read and resolved while the current one is applied, so the
//! dispatcher waits for the slower of the two calls rather than for their sum; rounds still
//! apply one at a time, in log order, and the next round is used only when it was read from
//! exactly where the current one left the leases. The read of the next round waits for half
//! the time the apply is expected to outlast it (from recent rounds), so it takes in the events
//! logged meanwhile instead of leaving them a round behind.
//! An event identity suppresses (it belongs to a person deleted under the GDPR) is not applied:
//! it is deleted from the log, with its dedup key, after the apply call and before the cursor
//! moves.
//! A failure anywhere leaves the cursor where it was and the batch is retried with backoff;
//! both downstream calls are idempotent per event id, so a retry or a crash between the calls
//! and the cursor update never counts anything twice. A dispatcher that dies loses its leases
//! when they expire, and another takes its partitions over from their cursors.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use tessera_core::Event;
use tessera_proto::convert::{event_to_pb, identifier_to_pb};
use tessera_proto::identity::v1 as identity_pb;
use tessera_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tessera_proto::profile::v1 as profile_pb;
use tessera_proto::profile::v1::profile_pipeline_service_client::ProfilePipelineServiceClient;
use tessera_server::Shutdown;
use tessera_server::trace_context::{self, Propagate, TraceParent, TracedChannel};
use tessera_store::StoreError;
use tokio::sync::Notify;
use tonic::transport::Channel;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::IngestionSettings;
use crate::store::{Cursor, EventLog, Lease, Person, StoredEvent};

const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// The backlog is measured no more often than this many times as long as a measurement takes.
const BACKLOG_DUTY: u32 = 20;
/// A delivery round slower than this is logged with where its time went.
const SLOW_ROUND: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("event log: {0}")]
    Store(#[from] StoreError),
    #[error("{service}: {status}")]
    Peer {
        service: &'static str,
        status: tonic::Status,
    },
    #[error("identity returned {got} resolutions for {want} records")]
    Mismatch { got: usize, want: usize },
}

pub(crate) struct Dispatcher {
    id: String,
    log: Arc<dyn EventLog>,
    identity: IdentityServiceClient<TracedChannel>,
    profile: ProfilePipelineServiceClient<TracedChannel>,
    settings: Arc<IngestionSettings>,
    partitions: i32,
    wake: Arc<Notify>,
    backlog: Arc<AtomicI64>,
}

impl Dispatcher {
    pub(crate) fn new(
        log: Arc<dyn EventLog>,
        identity: Channel,
        profile: Channel,
        settings: Arc<IngestionSettings>,
        partitions: i32,
        wake: Arc<Notify>,
        backlog: Arc<AtomicI64>,
    ) -> Self {
        Self {
            id: Uuid::new_v4().to_string(),
            log,
            identity: IdentityServiceClient::with_interceptor(identity, Propagate)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            profile: ProfilePipelineServiceClient::with_interceptor(profile, Propagate)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            settings,
            partitions,
            wake,
            backlog,
        }
    }

    pub(crate) async fn run(self, shutdown: Shutdown) {
        let lease_for = Duration::from_secs(self.settings.lease_seconds.max(1));
        let poll = Duration::from_millis(self.settings.poll_interval_ms.max(1));
        let max_backoff = Duration::from_millis(self.settings.max_backoff_ms).max(MIN_BACKOFF);
        let mut leases: Vec<Lease> = Vec::new();
        let mut renewed: Option<Instant> = None;
        let mut last_backlog: Option<Instant> = None;
        let mut backlog_took = Duration::ZERO;
        let mut backoff = MIN_BACKOFF;
        let mut ahead: Option<Prepared> = None;
        let mut pace = Pace::default();
        tracing::info!(dispatcher = %self.id, partitions = self.partitions, "delivery started");
        while !shutdown.is_cancelled() {
            if renewed.is_none_or(|at| at.elapsed() >= lease_for / 3) {
                match self.renew(&leases, lease_for).await {
                    Ok(held) => {
                        leases = held;
                        renewed = Some(Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "renewing delivery leases failed");
                        leases.clear();
                        renewed = None;
                        backoff = pause(&shutdown, backoff, max_backoff).await;
                        continue;
                    }
                }
            }
            // Counting the backlog costs in proportion to it and holds up this loop: spaced so
            // that it takes at most 1/BACKLOG_DUTY of the time when delivery is far behind.
            let every = Duration::from_millis(self.settings.backlog_interval_ms.max(100))
                .max(backlog_took * BACKLOG_DUTY);
            if last_backlog.is_none_or(|at| at.elapsed() >= every) {
                let measuring = Instant::now();
                last_backlog = Some(measuring);
                self.record_backlog().await;
                backlog_took = measuring.elapsed();
            }
            // One round delivers the leased partitions together: one resolve call and one
            // apply call for all of them, so a replica never contends with itself. The next
            // round is read and resolved while this one is applied (rounds still apply in
            // order); it is used only if it was read from where this one leaves the leases.
            let current = match ahead.take() {
                Some(next) if next.from == leases && next.delivered > 0 => Ok(next),
                _ => self.prepare(&leases).await,
            };
            let current = match current {
                Ok(current) => current,
                Err(e) => {
                    metrics::counter!("tessera_ingestion_delivery_failures_total").increment(1);
                    tracing::warn!(error = %e, "delivery failed, will retry");
                    backoff = pause(&shutdown, backoff, max_backoff).await;
                    continue;
                }
            };
            if current.delivered == 0 {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(poll) => {}
                    () = shutdown.cancelled() => {}
                }
                continue;
            }
            let after = current.after();
            let moves: Vec<i32> = current.moves.iter().map(|(p, _)| *p).collect();
            // The next round is read as late as it can be while still being resolved before
            // this one is applied: events logged meanwhile still make it.
            let lead = pace.lead();
            let prepare_next = async {
                tokio::time::sleep(lead).await;
                let started = Instant::now();
                let next = self.prepare(&after).await;
                (next, started.elapsed())
            };
            let apply_started = Instant::now();
            let commit = async {
                let committed = self.commit(current).await;
                (committed, apply_started.elapsed())
            };
            let ((committed, applying), (next, preparing)) = tokio::join!(commit, prepare_next);
            pace.record(applying, preparing);
            match committed {
                Ok(moved) => {
                    backoff = MIN_BACKOFF;
                    if moved.len() == moves.len() {
                        leases = after;
                        // A failed read ahead is read again, and reports its error, next round.
                        ahead = next.ok();
                    } else {
                        // A lease was lost: keep the others where they moved to.
                        leases = after
                            .into_iter()
                            .filter(|l| {
                                moved.contains(&l.partition) || !moves.contains(&l.partition)
                            })
                            .collect();
                    }
                }
                Err(e) => {
                    metrics::counter!("tessera_ingestion_delivery_failures_total").increment(1);
                    tracing::warn!(error = %e, "delivery failed, will retry");
                    backoff = pause(&shutdown, backoff, max_backoff).await;
                }
            }
        }
        for lease in &leases {
            let _ = self.log.release(&self.id, lease.partition).await;
        }
        tracing::info!(dispatcher = %self.id, "delivery stopped");
    }

    /// Heartbeats, renews and takes leases up to the fair share, and releases any beyond it.
    /// Cursors held in memory are never moved back by what the database says.
    async fn renew(
        &self,
        current: &[Lease],
        lease_for: Duration,
    ) -> Result<Vec<Lease>, StoreError> {
        let live = self.log.heartbeat(&self.id, lease_for).await?;
        let partitions = usize::try_from(self.partitions).unwrap_or(1);
        let share = partitions.div_ceil(live);
        let mut held = self.log.lease(&self.id, share, lease_for).await?;
        while held.len() > share {
            if let Some(extra) = held.pop() {
                self.log.release(&self.id, extra.partition).await?;
            }
        }
        for lease in &mut held {
            if let Some(mine) = current.iter().find(|c| c.partition == lease.partition) {
                lease.cursor = lease.cursor.max(mine.cursor);
            }
        }
        Ok(held)
    }

    /// Publishes the backlog and the age of its oldest event (0 when nothing waits).
    async fn record_backlog(&self) {
        match self.log.backlog().await {
            Ok(backlog) => {
                self.backlog.store(backlog.events, Ordering::Relaxed);
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!("tessera_ingestion_backlog_events").set(backlog.events as f64);
                let lag = backlog.oldest.map_or(0.0, |oldest| {
                    (time::OffsetDateTime::now_utc() - oldest)
                        .as_seconds_f64()
                        .max(0.0)
                });
                metrics::gauge!("tessera_ingestion_delivery_lag_seconds").set(lag);
            }
            Err(e) => tracing::warn!(error = %e, "reading the delivery backlog failed"),
        }
    }

    /// Reads the next events of `leases` for one round of at most `delivery_batch` events,
    /// shared fairly among the partitions that have some and merged in log order (each
    /// partition's own order is kept), and resolves them: everything but the apply call, which
    /// [`Self::commit`] makes. Resolving is idempotent per event id, so a prepared round that is
    /// never committed (the round before it failed, or the leases changed) costs nothing but
    /// the work: the events are resolved to the same answers when read again.
    async fn prepare(&self, leases: &[Lease]) -> Result<Prepared, DeliveryError> {
        let started = Instant::now();
        let limit = self.settings.delivery_batch.max(1);
        let batches = read_round(self.log.as_ref(), leases, limit).await?;
        let lengths: Vec<usize> = batches.iter().map(Vec::len).collect();
        let takes = fair_shares(&lengths, usize::try_from(limit).unwrap_or(usize::MAX));
        let mut round: Vec<&StoredEvent> = Vec::new();
        for (batch, take) in batches.iter().zip(&takes) {
            round.extend(&batch[..*take]);
        }
        let moves: Vec<(i32, Cursor)> = batches
            .iter()
            .zip(&takes)
            .zip(leases)
            .filter(|((_, take), _)| **take > 0)
            .map(|((batch, take), lease)| (lease.partition, batch[*take - 1].cursor))
            .collect();
        // Within a partition cursors increase, so sorting by cursor keeps each partition's
        // order and interleaves the partitions as the log does.
        round.sort_by_key(|e| (e.cursor.txid, e.cursor.seq));
        let delivered = round.len();
        let read = started.elapsed();
        let events = decode(&round);
        // The round's calls are one trace, linked to the events' own traces.
        let span = if trace_context::enabled() && !events.is_empty() {
            tracing::info_span!(parent: None, "ingestion.deliver_round", events = events.len())
        } else {
            tracing::Span::none()
        };
        let mut prepared = Prepared {
            from: leases.to_vec(),
            moves,
            delivered,
            read,
            resolve: Duration::ZERO,
            request: None,
            suppressed: Vec::new(),
            spans: Vec::new(),
            span,
        };
        if !events.is_empty() {
            let resolving = Instant::now();
            let span = prepared.span.clone();
            self.resolve(events, &mut prepared).instrument(span).await?;
            prepared.resolve = resolving.elapsed();
        }
        Ok(prepared)
    }

    /// Applies a prepared round, forgets the events identity suppressed (before the cursors
    /// move: a failure retries the round, and the suppressed events are suppressed again),
    /// then moves the cursors of the partitions that delivered. Returns the partitions whose
    /// cursors moved (a lease found lost is not among them).
    async fn commit(&self, prepared: Prepared) -> Result<Vec<i32>, DeliveryError> {
        let Prepared {
            moves,
            delivered,
            read,
            resolve,
            request,
            suppressed,
            spans,
            span,
            ..
        } = prepared;
        let applying = Instant::now();
        if let Some(request) = request {
            self.profile
                .clone()
                .apply_events(request)
                .instrument(span)
                .await
                .map_err(|status| DeliveryError::Peer {
                    service: "profile",
                    status,
                })?;
        }
        drop(spans);
        let apply = applying.elapsed();
        if !suppressed.is_empty() {
            let forgetting = Instant::now();
            let forgotten = self.log.forget(&suppressed, &Person::default()).await?;
            let suppressed = suppressed.len();
            metrics::counter!("tessera_ingestion_suppressed_events_total")
                .increment(suppressed as u64);
            metrics::histogram!("tessera_ingestion_delivery_stage_seconds", "stage" => "forget")
                .record(forgetting.elapsed().as_secs_f64());
            tracing::debug!(
                suppressed,
                forgotten = forgotten.events,
                "suppressed events of deleted people dropped and forgotten"
            );
        }
        let advancing = Instant::now();
        let moved = self.log.advance(&self.id, &moves).await?;
        for (partition, _) in &moves {
            if !moved.contains(partition) {
                tracing::info!(partition, "delivery lease lost");
            }
        }
        metrics::counter!("tessera_ingestion_events_delivered_total").increment(delivered as u64);
        let advance = advancing.elapsed();
        for (stage, took) in [
            ("read", read),
            ("resolve", resolve),
            ("apply", apply),
            ("advance", advance),
        ] {
            metrics::histogram!("tessera_ingestion_delivery_stage_seconds", "stage" => stage)
                .record(took.as_secs_f64());
        }
        metrics::histogram!("tessera_ingestion_delivery_round_events").record(delivered as f64);
        // A slow round says where its time went, so a lagging pipeline can be diagnosed from
        // the logs alone.
        let total = read + resolve + apply + advance;
        if total >= SLOW_ROUND {
            tracing::warn!(
                events = delivered,
                read_ms = read.as_millis() as u64,
                resolve_ms = resolve.as_millis() as u64,
                apply_ms = apply.as_millis() as u64,
                advance_ms = advance.as_millis() as u64,
                "slow delivery round"
            );
        }
        Ok(moved)
    }

    /// Resolves a round's events with one identity call and builds the apply request of the
    /// events that were not suppressed (a suppressed event belongs to a deleted person).
    async fn resolve(
        &self,
        events: Vec<Decoded>,
        prepared: &mut Prepared,
    ) -> Result<(), DeliveryError> {
        // Each event's delivery continues its own trace (none without trace export); the
        // downstream services open their spans for it under this one.
        let spans: Vec<Option<tracing::Span>> = events
            .iter()
            .map(|(event_id, _, trace)| {
                let trace = trace.as_ref()?;
                trace_context::event_span(
                    &trace.traceparent,
                    &trace.tracestate,
                    || tracing::info_span!("ingestion.deliver_event", event_id = %event_id),
                )
            })
            .collect();
        let traces: Vec<TraceParent> = spans
            .iter()
            .map(|span| span.as_ref().and_then(TraceParent::of).unwrap_or_default())
            .collect();
        let records: Vec<_> = events
            .iter()
            .zip(&traces)
            .map(|((event_id, e, _), trace)| identity_pb::IdentityRecord {
                event_id: event_id.to_string(),
                identifiers: e
                    .identifier_candidates()
                    .into_iter()
                    .map(identifier_to_pb)
                    .collect(),
                timestamp: e.timestamp.map(tessera_proto::convert::to_timestamp),
                trace_parent: trace.traceparent.clone(),
                trace_state: trace.tracestate.clone(),
            })
            .collect();
        let want = records.len();
        let resolutions = self
            .identity
            .clone()
            .resolve_identities(identity_pb::ResolveIdentitiesRequest { records })
            .await
            .map_err(|status| DeliveryError::Peer {
                service: "identity",
                status,
            })?
            .into_inner()
            .resolutions;
        if resolutions.len() != want {
            return Err(DeliveryError::Mismatch {
                got: resolutions.len(),
                want,
            });
        }
        let mut merges = Vec::new();
        let mut resolved = Vec::with_capacity(want);
        for (((event_id, event, _), resolution), trace) in
            events.into_iter().zip(resolutions).zip(traces)
        {
            let identity_pb::Resolution {
                event_id: _,
                profile_id,
                identifiers,
                merges: caused,
                // Explained in the identity graph's log; the profile needs only what linked.
                dropped: _,
                suppressed,
            } = resolution;
            // A suppressed resolution causes no merge; any it reported still reaches the
            // profile, so the profile never lags the identity graph.
            merges.extend(caused);
            if suppressed {
                prepared.suppressed.push(event_id);
                continue;
            }
            resolved.push(profile_pb::ResolvedEvent {
                event_id: event_id.to_string(),
                profile_id,
                event: Some(event_to_pb(&event)),
                identifiers,
                trace_parent: trace.traceparent,
                trace_state: trace.tracestate,
            });
        }
        if !resolved.is_empty() || !merges.is_empty() {
            prepared.request = Some(profile_pb::ApplyEventsRequest {
                merges,
                events: resolved,
            });
        }
        prepared.spans = spans;
        Ok(())
    }
}

/// How long committing and preparing a round take, smoothed over recent rounds, to start
/// reading the next round as late as is safe.
#[derive(Debug, Default)]
struct Pace {
    /// Smoothed seconds from the start of a round's commit to its end.
    commit: f64,
    /// Smoothed seconds a round takes to prepare (read and resolve).
    prepare: f64,
}

impl Pace {
    /// Each new figure's weight in the smoothed ones.
    const WEIGHT: f64 = 0.2;
    /// The part of the expected slack the read of the next round waits: the rest is margin
    /// for a round that commits faster than the recent ones.
    const USE: f64 = 0.5;

    /// How long to wait before preparing the next round.
    fn lead(&self) -> Duration {
        Duration::from_secs_f64(((self.commit - self.prepare) * Self::USE).max(0.0))
    }

    /// Takes in one round's figures.
    fn record(&mut self, commit: Duration, prepare: Duration) {
        let smooth = |old: f64, new: Duration| {
            if old == 0.0 {
                new.as_secs_f64()
            } else {
                old + Self::WEIGHT * (new.as_secs_f64() - old)
            }
        };
        self.commit = smooth(self.commit, commit);
        self.prepare = smooth(self.prepare, prepare);
    }
}

/// A delivery round read and resolved, waiting for its apply call.
struct Prepared {
    /// The leases (partitions and cursors) the round was read from.
    from: Vec<Lease>,
    /// Each delivering partition's cursor after the round.
    moves: Vec<(i32, Cursor)>,
    /// How many events the round read (all of them move the cursors).
    delivered: usize,
    /// How long reading took.
    read: Duration,
    /// How long resolving took.
    resolve: Duration,
    /// The apply call, when any event is to be applied or any merge reported.
    request: Option<profile_pb::ApplyEventsRequest>,
    /// The events identity suppressed (of deleted people): not applied, to be forgotten.
    suppressed: Vec<Uuid>,
    /// Each event's delivery span, open until the apply call ends.
    spans: Vec<Option<tracing::Span>>,
    /// The round's span.
    span: tracing::Span,
}

impl Prepared {
    /// The leases as they stand once this round is committed: where the next round reads.
    fn after(&self) -> Vec<Lease> {
        self.from
            .iter()
            .map(|lease| Lease {
                partition: lease.partition,
                cursor: self
                    .moves
                    .iter()
                    .find(|(p, _)| *p == lease.partition)
                    .map_or(lease.cursor, |(_, to)| *to),
            })
            .collect()
    }
}

/// An event read for delivery: its id, the event and its trace context.
type Decoded = (Uuid, Event, Option<TraceParent>);

/// The events of a batch; a row that does not decode (which only a bug can cause) is logged,
/// counted and left in the log rather than blocking its partition forever.
fn decode(batch: &[&StoredEvent]) -> Vec<Decoded> {
    batch
        .iter()
        .filter_map(|row| match serde_json::from_str::<Event>(&row.payload) {
            Ok(e) => Some((row.event_id, e, row.trace.clone())),
            Err(error) => {
                metrics::counter!("tessera_ingestion_undeliverable_total").increment(1);
                tracing::error!(event_id = %row.event_id, %error, "event in the log does not decode, not delivered");
                None
            }
        })
        .collect()
}

/// How many events to take from each of several queues of `lengths` so that at most `limit`
/// are taken in all and the smaller queues are emptied first: the rest is shared evenly among
/// the longer ones (water-filling), so a busy partition cannot starve the others.
fn fair_shares(lengths: &[usize], limit: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let mut takes = vec![0; lengths.len()];
    let mut left = limit;
    for (n, &i) in order.iter().enumerate() {
        let share = left / (order.len() - n);
        takes[i] = lengths[i].min(share);
        left -= takes[i];
    }
    takes
}

/// Reads the next events of the leased partitions for one round of at most `limit`
/// events, without reading much more than the round delivers (the reads fetch payloads):
/// each partition is first asked for an equal share, and the budget that partitions with
/// fewer waiting events leave goes to those that filled theirs, in further reads. Returns
/// each lease's events in log order, `limit` plus at most one per lease in all.
pub(crate) async fn read_round(
    log: &dyn EventLog,
    leases: &[Lease],
    limit: i64,
) -> Result<Vec<Vec<StoredEvent>>, StoreError> {
    let mut batches: Vec<Vec<StoredEvent>> = leases.iter().map(|_| Vec::new()).collect();
    let mut open: Vec<usize> = (0..leases.len()).collect();
    let mut budget = limit;
    while !open.is_empty() && budget > 0 {
        // The budget is positive and `open` not empty: a share of at least one.
        let parts = i64::try_from(open.len()).unwrap_or(i64::MAX);
        let share = (budget + parts - 1) / parts;
        let wanted: Vec<(i32, Cursor)> = open
            .iter()
            .map(|&i| {
                let after = batches[i].last().map_or(leases[i].cursor, |e| e.cursor);
                (leases[i].partition, after)
            })
            .collect();
        let reads = log.read_after_each(&wanted, share).await?;
        let mut filled = Vec::with_capacity(open.len());
        for (&i, read) in open.iter().zip(reads) {
            let got = i64::try_from(read.len()).unwrap_or(i64::MAX);
            budget -= got;
            if got >= share {
                filled.push(i);
            }
            batches[i].extend(read);
        }
        open = filled;
    }
    Ok(batches)
}

/// Waits `backoff` (or until shutdown) and returns the next, doubled backoff.
async fn pause(shutdown: &Shutdown, backoff: Duration, max: Duration) -> Duration {
    tokio::select! {
        () = tokio::time::sleep(backoff) => {}
        () = shutdown.cancelled() => {}
    }
    (backoff * 2).min(max)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Pace, fair_shares};

    #[test]
    fn the_next_round_is_read_half_the_expected_slack_late() {
        let mut pace = Pace::default();
        assert_eq!(pace.lead(), Duration::ZERO, "nothing known yet: at once");
        pace.record(Duration::from_millis(300), Duration::from_millis(100));
        assert_eq!(pace.lead(), Duration::from_millis(100));
        // Smoothed: one fast commit moves the estimate a fifth of the way.
        pace.record(Duration::from_millis(100), Duration::from_millis(100));
        assert_eq!(pace.lead(), Duration::from_millis(80));
        // Preparing slower than committing: no wait.
        let mut slow = Pace::default();
        slow.record(Duration::from_millis(50), Duration::from_millis(200));
        assert_eq!(slow.lead(), Duration::ZERO);
    }

    #[test]
    fn a_round_takes_everything_when_it_fits() {
        assert_eq!(fair_shares(&[3, 0, 7], 500), vec![3, 0, 7]);
        assert_eq!(fair_shares(&[], 500), Vec::<usize>::new());
    }

    #[test]
    fn short_partitions_are_emptied_and_long_ones_share_the_rest() {
        // 100 left after the short ones (10 + 40); the two long ones get 225 each.
        assert_eq!(
            fair_shares(&[500, 10, 500, 40], 500),
            vec![225, 10, 225, 40]
        );
        let takes = fair_shares(&[500; 16], 500);
        assert_eq!(takes.iter().sum::<usize>(), 500);
        assert!(takes.iter().all(|&t| (31..=35).contains(&t)), "{takes:?}");
    }

    #[test]
    fn one_busy_partition_gets_the_whole_round() {
        assert_eq!(fair_shares(&[0, 0, 900, 0], 500), vec![0, 0, 500, 0]);
    }
}
