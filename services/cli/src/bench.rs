//! `tessera bench`: the load tool. Sends synthetic Segment-style events to a running Tessera
//! over gRPC on an open-loop schedule and reports offered and achieved throughput, request
//! latency, and how long an acknowledged event takes to show in the profile.

mod pacer;
mod report;
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use tessera_proto::common::v1::{Event, Identifier};
use tessera_proto::convert::to_timestamp;
use tessera_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use tessera_proto::ingestion::v1::{EventStatus, IngestEventsRequest};
use tessera_proto::profile::v1::GetProfileRequest;
use tessera_proto::profile::v1::get_profile_request::Lookup;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use self::pacer::{Pacer, Sampler};
use self::report::{Events, Params, Percentiles, Report, Requests, Visibility, code_name};
use self::workload::Workload;

/// The run length when neither --duration nor --events is given.
const DEFAULT_DURATION_S: u64 = 10;
/// How often progress goes to stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Bounds of the visibility poll interval: fine at first, coarser for slow profiles so
/// polling adds little load, with at most ~5% error on the measured time.
const POLL_MIN: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(500);
/// How long the last visibility poll may outlive the window.
const POLL_GRACE: Duration = Duration::from_secs(1);

/// Options of `tessera bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// The gRPC address of the Tessera under test.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub(crate) target: String,
    /// The write key of the source to send as [env: TESSERA_WRITE_KEY]: `tessera dev` prints
    /// one on first start, `tessera sources create` makes one.
    #[arg(long, value_name = "KEY")]
    pub(crate) write_key: Option<crate::sources::WriteKeyArg>,
    /// The gRPC address of the profile read API, when it is not --target (the services as
    /// separate processes) [default: --target].
    #[arg(long, value_name = "URL")]
    read_target: Option<String>,
    /// Offered load in events per second; 0 sends as fast as --concurrency allows.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    rate: u64,
    /// How long to send, in seconds [default: 10 unless --events is given]. With --events, the
    /// run ends at whichever comes first.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    duration: Option<u64>,
    /// How many events to send in all.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    events: Option<u64>,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Events per IngestEvents request.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=2_500))]
    batch: u64,
    /// Size of the synthetic visitor population (visitors churn slowly, so new ones keep
    /// arriving and identifying).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    users: u64,
    /// How many first identifies to follow from acknowledgement until the profile shows them;
    /// 0 turns the measurement off.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    visibility_samples: u64,
    /// Seconds to wait for a followed profile before counting it as not visible.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    visibility_timeout: u64,
    /// Seconds before a request counts as failed with DEADLINE_EXCEEDED.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    request_timeout: u64,
    /// HTTP/2 connections to spread requests over.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    connections: u64,
    /// Also print the report as one JSON object (the last line of stdout).
    #[arg(long)]
    json: bool,
    /// Seed of the workload generator [default: random, printed in the report]. Ids still
    /// differ between runs, so a repeated run sends fresh users.
    #[arg(long)]
    seed: Option<u64>,
}

/// Runs the load tool.
pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let duration = match (args.duration, args.events) {
        (None, None) => Some(DEFAULT_DURATION_S),
        (d, _) => d,
    };
    let params = Params {
        rate: args.rate,
        duration_s: duration,
        events: args.events,
        concurrency: args.concurrency,
        batch: args.batch,
        users: args.users,
        connections: args.connections,
        visibility_samples: args.visibility_samples,
        visibility_timeout_s: args.visibility_timeout,
        request_timeout_s: args.request_timeout,
        seed: args.seed.unwrap_or_else(rand::random),
    };
    let write_key: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = args
        .write_key
        .as_ref()
        .context(
            "a write key is required: --write-key or TESSERA_WRITE_KEY (`tessera dev` prints \
             one; `tessera sources create NAME` makes one)",
        )?
        .0
        .parse()
        .context("the write key is not valid in gRPC metadata")?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let channels = connect(&args.target, params.connections).await?;
    let reads = match &args.read_target {
        Some(target) => connect(target, 1).await?.remove(0),
        None => channels[0].clone(),
    };
    eprintln!(
        "tessera bench: run {run_id} against {} ({}, {}); Ctrl-C stops early",
        args.target,
        if params.rate == 0 {
            "unpaced".to_owned()
        } else {
            format!("{} events/s", params.rate)
        },
        match (duration, params.events) {
            (Some(d), Some(n)) => format!("{d} s or {n} events"),
            (Some(d), None) => format!("{d} s"),
            (None, Some(n)) => format!("{n} events"),
            (None, None) => String::new(),
        }
    );
    let outcome = drive(
        &params,
        duration.map(Duration::from_secs),
        &run_id,
        &channels,
        reads,
        write_key,
    )
    .await?;
    let report = outcome.into_report(args.target, run_id, params);
    let mut out = std::io::stdout().lock();
    out.write_all(report::format_text(&report).as_bytes())?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    }
    out.flush()?;
    if report.requests.sent == 0 {
        anyhow::bail!("no request was sent");
    }
    if report.requests.ok == 0 {
        anyhow::bail!(
            "every request failed ({} of {}): {}",
            report.requests.failed,
            report.requests.sent,
            report
                .requests
                .errors
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Opens `n` HTTP/2 connections to `target`, failing fast when it is unreachable.
async fn connect(target: &str, n: u64) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(target.to_owned())
        .with_context(|| format!("invalid --target {target:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let host = endpoint.uri().host().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        eprintln!("tessera bench: note: {target} is not a loopback address");
    }
    let mut channels = Vec::new();
    for _ in 0..n {
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {target}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// What the send tasks record, behind one lock that is never held across an await.
struct Stats {
    latency: Histogram<u64>,
    service: Histogram<u64>,
    visibility: Histogram<u64>,
    requests: Requests,
    events: Events,
    visible: u64,
    not_visible: u64,
    followed: u64,
    poll_errors: BTreeMap<String, u64>,
    first_poll_error: BTreeMap<String, String>,
    /// Acknowledged events per device (anonymous id), to know what a profile must count.
    device_acks: HashMap<u64, u64>,
    last_response: Option<Instant>,
}

impl Stats {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency: histogram()?,
            service: histogram()?,
            visibility: histogram()?,
            requests: Requests::default(),
            events: Events::default(),
            visible: 0,
            not_visible: 0,
            followed: 0,
            poll_errors: BTreeMap::new(),
            first_poll_error: BTreeMap::new(),
            device_acks: HashMap::new(),
            last_response: None,
        })
    }

    fn failed(&mut self, code: Code, message: &str, events: u64) {
        self.requests.failed += 1;
        self.events.failed += events;
        let name = code_name(code).to_owned();
        *self.requests.errors.entry(name.clone()).or_default() += 1;
        self.requests
            .first_error
            .entry(name)
            .or_insert_with(|| message.chars().take(200).collect());
    }
}

/// Microseconds up to an hour at 3 significant digits; `saturating_record` clamps above that
/// (a histogram created with `Histogram::new` would clamp at its initial tiny maximum).
fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 3_600_000_000, 3)?)
}

struct Ctx {
    stats: Mutex<Stats>,
    /// Where visibility polls read profiles.
    reads: Channel,
    sent_events: AtomicU64,
    request_timeout: Duration,
    visibility_timeout: Duration,
    /// Sent with every IngestEvents call.
    write_key: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl Ctx {
    fn stats(&self) -> MutexGuard<'_, Stats> {
        // A panicking send task is a bug that resurfaces at join; the figures stay usable.
        self.stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A first identify to follow until its profile is visible.
struct Sample {
    user_id: String,
    device: u64,
}

/// One request to send.
struct Job {
    events: Vec<Event>,
    devices: Vec<Option<u64>>,
    sample: Option<Sample>,
    /// When the batch was due (open loop) or, unpaced, when it was issued.
    due: Instant,
    issued: Instant,
}

/// The dispatcher's own figures, joined with the tasks' stats at the end.
struct Outcome {
    stats: Stats,
    pacer: Pacer,
    duration: Option<Duration>,
    start: Instant,
    send_window: Duration,
    max_lag: Duration,
    interrupted: bool,
}

/// Issues batches on schedule until the run's time or count is used up, then waits for the
/// requests and visibility polls in flight (each bounded by its timeout).
async fn drive(
    params: &Params,
    duration: Option<Duration>,
    run_id: &str,
    channels: &[Channel],
    reads: Channel,
    write_key: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
) -> anyhow::Result<Outcome> {
    let pacer = Pacer {
        rate: params.rate,
        batch: params.batch,
        limit: params.events,
    };
    let ctx = Arc::new(Ctx {
        stats: Mutex::new(Stats::new()?),
        reads,
        sent_events: AtomicU64::new(0),
        request_timeout: Duration::from_secs(params.request_timeout_s),
        visibility_timeout: Duration::from_secs(params.visibility_timeout_s),
        write_key,
    });
    let concurrency = usize::try_from(params.concurrency)?;
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut workload = Workload::new(usize::try_from(params.users)?, params.seed, run_id);
    let mut sampler = Sampler::new(
        params.visibility_samples,
        pacer.planned_batches(duration),
        duration.unwrap_or(Duration::from_secs(DEFAULT_DURATION_S)),
    );
    let mut tasks = JoinSet::new();
    let mut ctrl_c = pin!(tokio::signal::ctrl_c());
    let mut interrupted = false;
    let mut sent = 0_u64;
    let mut batch_no = 0_u64;
    let mut max_lag = Duration::ZERO;
    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let progress = tokio::spawn(progress(
        Arc::clone(&ctx),
        Arc::clone(&slots),
        concurrency,
        start,
    ));
    loop {
        let size = pacer.next_size(sent);
        if size == 0 {
            break;
        }
        let due = pacer.due(sent);
        if let (Some(due), Some(d)) = (due, duration)
            && due >= d
        {
            break;
        }
        let due_at = due.map(|d| start + d);
        if let Some(at) = due_at {
            tokio::select! {
                biased;
                _ = &mut ctrl_c => { interrupted = true; break; }
                () = tokio::time::sleep_until(at) => {}
            }
        }
        // Waiting here means the server is slower than the schedule: the batch goes out late,
        // and its latency counts from when it was due.
        let far = start + Duration::from_secs(86_400 * 365);
        let permit = tokio::select! {
            biased;
            _ = &mut ctrl_c => { interrupted = true; break; }
            () = tokio::time::sleep_until(deadline.unwrap_or(far)) => break,
            p = Arc::clone(&slots).acquire_owned() => p?,
        };
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        let due = due_at.unwrap_or(now);
        max_lag = max_lag.max(now.saturating_duration_since(due));
        let generated = workload.batch(
            usize::try_from(size)?,
            to_timestamp(OffsetDateTime::now_utc()),
        );
        let elapsed = now - start;
        let mut sample = None;
        if sampler.wants(batch_no, elapsed)
            && let Some((g, device)) = generated
                .iter()
                .find_map(|g| g.first_identify.then_some(g).zip(g.device))
        {
            sampler.took(batch_no, elapsed);
            sample = Some(Sample {
                user_id: g.event.user_id.clone(),
                device,
            });
        }
        let (events, devices) = generated.into_iter().map(|g| (g.event, g.device)).unzip();
        let channel = channels[usize::try_from(batch_no)? % channels.len()].clone();
        let job = Job {
            events,
            devices,
            sample,
            due,
            issued: Instant::now(),
        };
        tasks.spawn(send(Arc::clone(&ctx), channel, job, permit));
        sent += size;
        batch_no += 1;
        ctx.sent_events.store(sent, Ordering::Relaxed);
        while let Some(joined) = tasks.try_join_next() {
            rethrow(joined);
        }
    }
    let stopped = start.elapsed();
    // A paced run's window is its schedule: it ends when the next batch would be due.
    let send_window = match (interrupted, pacer.due(sent), duration) {
        (false, Some(next), Some(d)) => stopped.max(next.min(d)),
        (false, Some(next), None) => stopped.max(next),
        _ => stopped,
    };
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(joined) => rethrow(joined),
                None => break,
            },
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                eprintln!("tessera bench: interrupted, abandoning requests and polls in flight");
                tasks.abort_all();
            }
        }
    }
    progress.abort();
    let stats = std::mem::replace(&mut *ctx.stats(), Stats::new()?);
    Ok(Outcome {
        stats,
        pacer,
        duration,
        start,
        send_window,
        max_lag,
        interrupted,
    })
}

fn rethrow(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn progress(ctx: Arc<Ctx>, slots: Arc<Semaphore>, concurrency: usize, start: Instant) {
    let mut tick = tokio::time::interval_at(start + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        tick.tick().await;
        let sent = ctx.sent_events.load(Ordering::Relaxed);
        let (accepted, failed, visible) = {
            let s = ctx.stats();
            (s.events.accepted, s.requests.failed, s.visible)
        };
        eprintln!(
            "[{:>6.1}s] sent {sent} events, accepted {accepted}, failed requests {failed}, in flight {}, visible samples {visible}",
            start.elapsed().as_secs_f64(),
            concurrency - slots.available_permits(),
        );
    }
}

/// Sends one batch, records the outcome, frees the concurrency slot, then follows the batch's
/// visibility sample if it has one.
async fn send(ctx: Arc<Ctx>, channel: Channel, job: Job, permit: OwnedSemaphorePermit) {
    let Job {
        events,
        devices,
        sample,
        due,
        issued,
    } = job;
    let n = events.len() as u64;
    let mut ingest = IngestionServiceClient::new(channel.clone());
    let mut request = Request::new(IngestEventsRequest { events });
    request.set_timeout(ctx.request_timeout);
    request
        .metadata_mut()
        .insert("x-tessera-write-key", ctx.write_key.clone());
    let outcome = tokio::time::timeout(ctx.request_timeout, ingest.ingest_events(request)).await;
    let done = Instant::now();
    drop(permit);
    let follow = {
        let mut s = ctx.stats();
        s.requests.sent += 1;
        s.events.sent += n;
        s.last_response = Some(done);
        match outcome {
            Ok(Ok(response)) => {
                s.requests.ok += 1;
                s.latency.saturating_record(micros(done - due));
                s.service.saturating_record(micros(done - issued));
                for (result, device) in response.into_inner().results.iter().zip(&devices) {
                    if result.status == i32::from(EventStatus::Duplicate) {
                        s.events.duplicate += 1;
                    } else {
                        s.events.accepted += 1;
                        if let Some(d) = device {
                            *s.device_acks.entry(*d).or_default() += 1;
                        }
                    }
                }
                sample.map(|smp| {
                    s.followed += 1;
                    let expected = s.device_acks.get(&smp.device).copied().unwrap_or(1);
                    (smp.user_id, expected)
                })
            }
            Ok(Err(status)) => {
                s.failed(status.code(), status.message(), n);
                None
            }
            Err(_) => {
                let message = format!("no answer within {:?} (client-side)", ctx.request_timeout);
                s.failed(Code::DeadlineExceeded, &message, n);
                None
            }
        }
    };
    if let Some((user_id, expected)) = follow {
        follow_profile(&ctx, ctx.reads.clone(), user_id, expected, done).await;
    }
}

/// Polls GetProfile by the new user id until the profile counts every acknowledged event of
/// the device (the identify included), or the visibility timeout passes.
async fn follow_profile(
    ctx: &Ctx,
    channel: Channel,
    user_id: String,
    expected: u64,
    acked: Instant,
) {
    let mut profiles = ProfileServiceClient::new(channel);
    let lookup = GetProfileRequest {
        lookup: Some(Lookup::Identifier(Identifier {
            r#type: "user_id".to_owned(),
            value: user_id,
        })),
    };
    loop {
        let left = ctx.visibility_timeout.saturating_sub(acked.elapsed());
        let mut request = Request::new(lookup.clone());
        request.set_timeout(ctx.request_timeout);
        // The last poll may finish a little after the window (and then does not count):
        // cancelling it mid-flight would only show up as a spurious error on the server.
        match tokio::time::timeout(left + POLL_GRACE, profiles.get_profile(request)).await {
            Ok(Ok(response)) => {
                let count = response.into_inner().profile.map_or(0, |p| p.event_count);
                let waited = acked.elapsed();
                if u64::try_from(count).unwrap_or(0) >= expected && waited <= ctx.visibility_timeout
                {
                    let mut s = ctx.stats();
                    s.visible += 1;
                    s.visibility.saturating_record(micros(waited));
                    return;
                }
            }
            Ok(Err(status)) if status.code() == Code::NotFound => {}
            Ok(Err(status)) => {
                let name = code_name(status.code()).to_owned();
                let mut s = ctx.stats();
                *s.poll_errors.entry(name.clone()).or_default() += 1;
                s.first_poll_error
                    .entry(name)
                    .or_insert_with(|| status.message().chars().take(200).collect());
            }
            Err(_) => {}
        }
        let waited = acked.elapsed();
        if waited >= ctx.visibility_timeout {
            ctx.stats().not_visible += 1;
            return;
        }
        tokio::time::sleep(poll_interval(waited).min(ctx.visibility_timeout - waited)).await;
    }
}

/// Polls often while the wait is short and less often as it grows, so the measured time is off
/// by at most ~5% (or 2 ms) and a pipeline that lags by seconds is not slowed further by a flood
/// of reads (each follower polls at most twice a second then).
fn poll_interval(waited: Duration) -> Duration {
    (waited / 20).clamp(POLL_MIN, POLL_MAX)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn per_second(count: u64, over: Duration) -> f64 {
    let secs = over.as_secs_f64();
    if secs > 0.0 {
        (count as f64 / secs * 10.0).round() / 10.0
    } else {
        0.0
    }
}

impl Outcome {
    fn into_report(self, target: String, run_id: String, params: Params) -> Report {
        let Self {
            stats,
            pacer,
            duration,
            start,
            send_window,
            max_lag,
            interrupted,
        } = self;
        let elapsed = stats
            .last_response
            .map_or(send_window, |t| (t - start).max(send_window));
        let scheduled =
            pacer.scheduled_within(duration.map_or(send_window, |d| send_window.min(d)));
        let unsent = scheduled.map_or(0, |s| s.saturating_sub(stats.events.sent));
        Report {
            target,
            run_id,
            interrupted,
            send_window_s: round2(send_window.as_secs_f64()),
            elapsed_s: round2(elapsed.as_secs_f64()),
            offered_rate: (params.rate > 0).then_some(params.rate as f64),
            scheduled_events: scheduled,
            unsent_events: unsent,
            sent_rate: per_second(stats.events.sent, send_window),
            achieved_rate: per_second(stats.events.accepted, elapsed),
            max_schedule_lag_ms: if params.rate > 0 {
                round2(max_lag.as_secs_f64() * 1_000.0)
            } else {
                0.0
            },
            latency: Percentiles::of(&stats.latency),
            service_time: Percentiles::of(&stats.service),
            visibility: Visibility {
                followed: stats.followed,
                visible: stats.visible,
                not_visible: stats.not_visible,
                latency: Percentiles::of(&stats.visibility),
                poll_errors: stats.poll_errors,
                first_poll_error: stats.first_poll_error,
            },
            requests: stats.requests,
            events: stats.events,
            params,
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn defaults_are_sensible() {
        let a = Cli::try_parse_from(["bench"]).unwrap().bench;
        assert_eq!(a.target, "http://127.0.0.1:50051");
        assert_eq!((a.batch, a.users, a.rate), (100, 10_000, 1_000));
        assert_eq!((a.duration, a.events, a.seed), (None, None, None));
        assert!(!a.json);
    }

    #[test]
    fn out_of_range_options_are_refused_before_the_run() {
        for bad in [
            &["bench", "--batch", "0"][..],
            &["bench", "--batch", "2501"],
            &["bench", "--concurrency", "0"],
            &["bench", "--duration", "0"],
            &["bench", "--users", "0"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn polling_is_fine_at_first_and_coarser_later() {
        assert_eq!(poll_interval(Duration::ZERO), POLL_MIN);
        assert_eq!(
            poll_interval(Duration::from_millis(100)),
            Duration::from_millis(5)
        );
        assert_eq!(poll_interval(Duration::from_secs(20)), POLL_MAX);
    }

    #[test]
    fn histograms_keep_long_latencies() {
        let mut h = histogram().unwrap();
        h.saturating_record(micros(Duration::from_millis(1_500)));
        let p = Percentiles::of(&h).unwrap();
        assert!((p.max_ms - 1_500.0).abs() < 2.0, "{p:?}");
    }

    #[test]
    fn rates_are_per_second_of_the_window() {
        assert!((per_second(40_000, Duration::from_secs(20)) - 2_000.0).abs() < f64::EPSILON);
        assert!(per_second(5, Duration::ZERO).abs() < f64::EPSILON);
    }
}
