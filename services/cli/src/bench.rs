//! `tessera bench`: the load tool. Sends synthetic Segment-style events to a running Tessera on
//! an open-loop schedule, over unary gRPC, gRPC client streams or the Segment-compatible HTTP
//! API, and reports offered and achieved throughput, request latency, how long an acknowledged
//! event takes to show in the profile (read over gRPC whatever the transport), and optionally
//! how long a first order takes to show in a computed trait, an audience and a score.

mod computed;
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
use base64::Engine as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tessera_proto::common::v1::{Event, Identifier};
use tessera_proto::convert::to_timestamp;
use tessera_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use tessera_proto::ingestion::v1::{
    EventResult, EventStatus, IngestEventsRequest, StreamIngestEventsRequest,
    StreamIngestEventsResponse,
};
use tessera_proto::profile::v1::GetProfileRequest;
use tessera_proto::profile::v1::get_profile_request::Lookup;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use time::OffsetDateTime;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};
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
/// Chunks a stream carries before it is closed and its counts come back (`grpc-stream`).
const STREAM_CHUNKS: u64 = 100;
/// How long a stream stays open at most, so that acknowledgements (and the visibility samples
/// that start from them) arrive during the run at low rates too (`grpc-stream`).
const STREAM_MAX_AGE: Duration = Duration::from_secs(1);
/// How long the bench waits after declaring definitions, so that every profile replica reads
/// with them (each picks a change up within about a second).
const DEFINITIONS_SETTLE: Duration = Duration::from_secs(2);
/// How long connecting to the Tessera under test may take before the run gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How the events are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Transport {
    /// IngestionService.IngestEvents, one call per batch.
    Grpc,
    /// IngestionService.StreamIngestEvents, one chunk per batch, up to --concurrency streams.
    GrpcStream,
    /// The Segment-compatible HTTP API: POST /v1/batch at --http-target, one per batch.
    Http,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::GrpcStream => "grpc-stream",
            Self::Http => "http",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Options of `tessera bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// The gRPC address of the Tessera under test: where the gRPC transports send, and where
    /// profiles are read unless --read-target is given.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub(crate) target: String,
    /// How to send the events. `grpc-stream` writes each batch as a chunk of a stream and
    /// closes each stream after 100 chunks or 1 s, so its counts come back during the run; a
    /// stream is acknowledged as a whole, so it reports throughput but no request latency.
    #[arg(long, value_enum, default_value_t = Transport::Grpc)]
    transport: Transport,
    /// The base URL of the Segment-compatible HTTP API, for --transport http (plain HTTP/1.1;
    /// batches go to URL/v1/batch with the write key as HTTP Basic user).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080")]
    http_target: String,
    /// The write key of the source to send as [env: TESSERA_WRITE_KEY]: `tessera dev` prints
    /// one on first start, `tessera sources create` makes one.
    #[arg(long, value_name = "KEY")]
    pub(crate) write_key: Option<crate::sources::WriteKeyArg>,
    /// The access token the visibility polls read profiles with (scope profiles:read).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "TESSERA_ACCESS_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
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
    /// Seconds to send at the same rate before the measured run, to other users, measuring
    /// nothing: services, connection pools and the database's caches settle first [default: 0].
    #[arg(long, value_name = "SECONDS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3_600))]
    warmup: u64,
    /// Requests in flight at most. With grpc-stream, streams open at most, and a chunk holds a
    /// slot until the stream takes it; with http, also the connections opened.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Events per request: per IngestEvents call, stream chunk or HTTP batch (the HTTP API takes
    /// at most 500 KB per request, about 1,000 of these events).
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
    /// How many first `Order Completed` events (each a person's first order, sent with their
    /// user id) to follow from acknowledgement until the profile shows the order in the
    /// computed trait `order_count`, in the audience `bench_buyers` and in the `engagement`
    /// score (polling GetProfile at --read-target). Declares that trait and audience through
    /// the definitions API first when they are missing (a token with profiles:write; every
    /// stored profile is then recomputed once). 0 turns the measurement off.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    computed_samples: u64,
    /// Seconds to wait for a followed order before counting what has not shown it as not seen.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    computed_timeout: u64,
    /// Seconds before a request counts as failed with DEADLINE_EXCEEDED (grpc-stream: a chunk
    /// the stream does not take, or a closed stream's answer, within that time).
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    request_timeout: u64,
    /// HTTP/2 connections to spread gRPC requests and streams over (not used by http).
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
        transport: args.transport,
        rate: args.rate,
        duration_s: duration,
        events: args.events,
        warmup_s: args.warmup,
        concurrency: args.concurrency,
        batch: args.batch,
        users: args.users,
        connections: args.connections,
        visibility_samples: args.visibility_samples,
        visibility_timeout_s: args.visibility_timeout,
        computed_samples: args.computed_samples,
        computed_timeout_s: args.computed_timeout,
        request_timeout_s: args.request_timeout,
        seed: args.seed.unwrap_or_else(rand::random),
    };
    let key = &args
        .write_key
        .as_ref()
        .context(
            "a write key is required: --write-key or TESSERA_WRITE_KEY (`tessera dev` prints \
             one; `tessera sources create NAME` makes one)",
        )?
        .0;
    let write_key: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = key
        .parse()
        .context("the write key is not valid in gRPC metadata")?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let (target, route) = match args.transport {
        Transport::Grpc => (
            args.target.clone(),
            Route::Grpc(connect(&args.target, params.connections).await?),
        ),
        Transport::GrpcStream => (
            args.target.clone(),
            Route::GrpcStream(connect(&args.target, params.connections).await?),
        ),
        Transport::Http => (
            args.http_target.clone(),
            Route::Http(Arc::new(
                HttpTarget::connect(&args.http_target, key, usize::try_from(params.concurrency)?)
                    .await?,
            )),
        ),
    };
    let reads = match (&args.read_target, &route) {
        (Some(target), _) => connect(target, 1).await?.remove(0),
        (None, Route::Grpc(channels) | Route::GrpcStream(channels)) => channels[0].clone(),
        (None, Route::Http(_))
            if params.visibility_samples == 0 && params.computed_samples == 0 =>
        {
            Endpoint::from_shared(args.target.clone())
                .with_context(|| format!("invalid --target {:?}", args.target))?
                .connect_lazy()
        }
        (None, Route::Http(_)) => connect(&args.target, 1).await?.remove(0),
    };
    let reads = crate::client_tls::with_token(reads, args.token.as_deref())?;
    if params.computed_samples > 0 && computed::ensure_definitions(reads.clone()).await? {
        // Writes use a new definition at once; reads on every replica within about a second.
        tokio::time::sleep(DEFINITIONS_SETTLE).await;
    }
    eprintln!(
        "tessera bench: run {run_id} against {target} over {} ({}, {}); Ctrl-C stops early",
        params.transport,
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
    if args.warmup > 0 {
        let warm = Params {
            duration_s: Some(args.warmup),
            events: None,
            visibility_samples: 0,
            computed_samples: 0,
            seed: params.seed.wrapping_add(1),
            ..params.clone()
        };
        let warmed = drive(
            &warm,
            Some(Duration::from_secs(args.warmup)),
            &format!("{run_id}w"),
            route.clone(),
            reads.clone(),
            write_key.clone(),
        )
        .await?;
        eprintln!(
            "tessera bench: warm-up of {} s done ({} events accepted); measuring",
            args.warmup, warmed.stats.events.accepted
        );
    }
    let outcome = drive(
        &params,
        duration.map(Duration::from_secs),
        &run_id,
        route,
        reads,
        write_key,
    )
    .await?;
    let report = outcome.into_report(target, run_id, params);
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
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    if !is_loopback(endpoint.uri().host().unwrap_or_default()) {
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

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where the batches go, connected.
#[derive(Clone)]
enum Route {
    Grpc(Vec<Channel>),
    GrpcStream(Vec<Channel>),
    Http(Arc<HttpTarget>),
}

/// The Segment-compatible HTTP API under test, through a pool of HTTP/1.1 connections (one
/// per request in flight).
struct HttpTarget {
    client: HttpClient<HttpConnector, Full<Bytes>>,
    /// `{--http-target}/v1/batch`.
    batch_uri: http::Uri,
    /// `Basic base64(write key + ":")`, marked sensitive.
    authorization: http::HeaderValue,
}

impl HttpTarget {
    /// The API at `target`, failing fast when it is unreachable.
    async fn connect(target: &str, write_key: &str, concurrency: usize) -> anyhow::Result<Self> {
        let batch_uri = batch_uri(target)?;
        let host = batch_uri.host().unwrap_or_default();
        if !is_loopback(host) {
            eprintln!("tessera bench: note: {target} is not a loopback address");
        }
        let port = batch_uri.port_u16().unwrap_or(80);
        let probe = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port));
        match tokio::time::timeout(CONNECT_TIMEOUT, probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e).with_context(|| format!("cannot connect to {target}")),
            Err(_) => {
                anyhow::bail!("cannot connect to {target}: no answer within {CONNECT_TIMEOUT:?}")
            }
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = HttpClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(concurrency)
            .build(connector);
        let mut authorization = http::HeaderValue::try_from(basic_auth(write_key))
            .context("the write key is not valid in an HTTP header")?;
        authorization.set_sensitive(true);
        Ok(Self {
            client,
            batch_uri,
            authorization,
        })
    }

    /// Posts `events` as one Segment batch: accepted only on exactly `200 {"success":true}`.
    async fn post(&self, events: &[Event], timeout: Duration) -> Result<Acked, Failure> {
        // The workload's events take about 500 bytes each as JSON: one allocation for most bodies.
        let mut body = Vec::with_capacity(events.len() * 640);
        workload::write_segment_batch(events, &mut body);
        let request = http::Request::post(self.batch_uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::AUTHORIZATION, self.authorization.clone())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failure::new("TRANSPORT_ERROR", error_chain(&e)))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| error_chain(&e))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| error_chain(&e))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok((status, body))) if status == http::StatusCode::OK && is_success(&body) => {
                Ok(Acked::All)
            }
            Ok(Ok((status, body))) => Err(Failure::new(
                format!("HTTP_{}", status.as_u16()),
                String::from_utf8_lossy(&body).into_owned(),
            )),
            Ok(Err(message)) => Err(Failure::new("TRANSPORT_ERROR", message)),
            Err(_) => Err(Failure::timeout(timeout)),
        }
    }
}

/// The batch route under an `http://` base URL (which may carry a path prefix, behind a proxy).
fn batch_uri(target: &str) -> anyhow::Result<http::Uri> {
    let uri: http::Uri = format!("{}/v1/batch", target.trim_end_matches('/'))
        .parse()
        .with_context(|| format!("invalid --http-target {target:?}"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http") && uri.host().is_some_and(|h| !h.is_empty()),
        "invalid --http-target {target:?}: an http://HOST[:PORT] URL is needed (no TLS)"
    );
    Ok(uri)
}

/// HTTP Basic credentials as the tracking API reads them: the write key as user, no password.
fn basic_auth(write_key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"))
    )
}

/// Whether an HTTP answer's body is the tracking API's success, `{"success":true}`.
fn is_success(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v == serde_json::json!({"success": true}))
}

/// An error with its sources, `outer: inner: root`.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
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
    /// The followed first orders (`--computed-samples`).
    computed: computed::ComputedStats,
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
            computed: computed::ComputedStats::new()?,
        })
    }

    fn failed(&mut self, failure: Failure, events: u64) {
        let Failure { name, message } = failure;
        self.requests.failed += 1;
        self.events.failed += events;
        *self.requests.errors.entry(name.clone()).or_default() += 1;
        self.requests
            .first_error
            .entry(name)
            .or_insert_with(|| message.chars().take(200).collect());
    }

    /// Counts one acknowledged event of `device`.
    fn acked(&mut self, duplicate: bool, device: Option<u64>) {
        if duplicate {
            self.events.duplicate += 1;
        } else {
            self.events.accepted += 1;
            if let Some(d) = device {
                *self.device_acks.entry(d).or_default() += 1;
            }
        }
    }

    /// Starts following `sample`, acknowledged with the events counted so far: its profile must
    /// count every acknowledged event of its device.
    fn follow(&mut self, sample: Sample) -> (String, u64) {
        self.followed += 1;
        let expected = self.device_acks.get(&sample.device).copied().unwrap_or(1);
        (sample.user_id, expected)
    }
}

/// Why a request failed, as the report lists it.
#[derive(Debug)]
struct Failure {
    /// The gRPC code name (`UNAVAILABLE`), `HTTP_<status>` or `TRANSPORT_ERROR`.
    name: String,
    message: String,
}

impl Failure {
    fn new(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            message: message.into(),
        }
    }

    fn status(status: &tonic::Status) -> Self {
        Self::new(code_name(status.code()), status.message())
    }

    fn timeout(after: Duration) -> Self {
        Self::new(
            code_name(Code::DeadlineExceeded),
            format!("no answer within {after:?} (client-side)"),
        )
    }
}

/// What a successful request acknowledged.
enum Acked {
    /// One result per event, in order (gRPC).
    PerEvent(Vec<EventResult>),
    /// Every event, new or duplicate alike (HTTP does not tell them apart).
    All,
}

/// Microseconds up to an hour at 3 significant digits; `saturating_record` clamps above that
/// (a histogram created with `Histogram::new` would clamp at its initial tiny maximum).
fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 3_600_000_000, 3)?)
}

struct Ctx {
    stats: Mutex<Stats>,
    /// Where visibility polls read profiles.
    reads: crate::client_tls::Authorized,
    sent_events: AtomicU64,
    request_timeout: Duration,
    visibility_timeout: Duration,
    computed_timeout: Duration,
    /// Sent with every IngestEvents and StreamIngestEvents call.
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

/// One request (or stream chunk) to send.
struct Job {
    events: Vec<Event>,
    devices: Vec<Option<u64>>,
    sample: Option<Sample>,
    /// The user id of a first order to follow (`--computed-samples`).
    order: Option<String>,
    /// When the batch was due (open loop) or, unpaced, when it was issued.
    due: Instant,
    issued: Instant,
}

/// How the dispatcher hands out jobs.
enum Dispatch {
    /// One task per request, over these connections in turn.
    Grpc(Vec<Channel>),
    Http(Arc<HttpTarget>),
    /// To the stream workers, each keeping one stream open.
    Streams(Vec<mpsc::Sender<Chunk>>),
}

/// A unary request's way out.
enum Unary {
    Grpc(Channel),
    Http(Arc<HttpTarget>),
}

/// A job for a stream worker, holding its concurrency slot until the stream takes it.
type Chunk = (Job, OwnedSemaphorePermit);

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
    route: Route,
    reads: crate::client_tls::Authorized,
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
        computed_timeout: Duration::from_secs(params.computed_timeout_s),
        write_key,
    });
    let concurrency = usize::try_from(params.concurrency)?;
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let dispatch = match route {
        Route::Grpc(channels) => Dispatch::Grpc(channels),
        Route::Http(http) => Dispatch::Http(http),
        Route::GrpcStream(channels) => {
            ctx.stats().requests.chunks = Some(0);
            // As many workers as slots: one with room can always take a job whose slot the
            // dispatcher holds.
            let workers = (0..concurrency)
                .map(|i| {
                    let (tx, rx) = mpsc::channel(1);
                    let channel = channels[i % channels.len()].clone();
                    tasks.spawn(stream_worker(Arc::clone(&ctx), channel, rx));
                    tx
                })
                .collect();
            Dispatch::Streams(workers)
        }
    };
    let mut workload = Workload::new(usize::try_from(params.users)?, params.seed, run_id);
    let mut sampler = Sampler::new(
        params.visibility_samples,
        pacer.planned_batches(duration),
        duration.unwrap_or(Duration::from_secs(DEFAULT_DURATION_S)),
    );
    let mut order_sampler = Sampler::new(
        params.computed_samples,
        pacer.planned_batches(duration),
        duration.unwrap_or(Duration::from_secs(DEFAULT_DURATION_S)),
    );
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
        let mut order = None;
        if order_sampler.wants(batch_no, elapsed)
            && let Some(g) = generated.iter().find(|g| g.first_order)
        {
            order_sampler.took(batch_no, elapsed);
            order = Some(g.event.user_id.clone());
        }
        let (events, devices) = generated.into_iter().map(|g| (g.event, g.device)).unzip();
        let job = Job {
            events,
            devices,
            sample,
            order,
            due,
            issued: Instant::now(),
        };
        match &dispatch {
            Dispatch::Grpc(channels) => {
                let channel = channels[usize::try_from(batch_no)? % channels.len()].clone();
                tasks.spawn(send(Arc::clone(&ctx), Unary::Grpc(channel), job, permit));
            }
            Dispatch::Http(http) => {
                let unary = Unary::Http(Arc::clone(http));
                tasks.spawn(send(Arc::clone(&ctx), unary, job, permit));
            }
            Dispatch::Streams(workers) => {
                if let Err(chunk) = offer(workers, (job, permit)) {
                    // Only when a worker stopped (its panic resurfaces at join): wait for room.
                    let reserve = workers.iter().map(|w| Box::pin(w.reserve()));
                    let (room, _) = futures::future::select_ok(reserve)
                        .await
                        .context("every stream worker stopped")?;
                    room.send(chunk);
                }
            }
        }
        sent += size;
        batch_no += 1;
        ctx.sent_events.store(sent, Ordering::Relaxed);
        while let Some(joined) = tasks.try_join_next() {
            rethrow(joined);
        }
    }
    // Ends the streams: each worker closes its own once its queue is empty.
    drop(dispatch);
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

/// Sends one batch in one request, records the outcome, frees the concurrency slot, then
/// follows the batch's visibility sample if it has one.
async fn send(ctx: Arc<Ctx>, unary: Unary, job: Job, permit: OwnedSemaphorePermit) {
    let Job {
        events,
        devices,
        sample,
        order,
        due,
        issued,
    } = job;
    let n = events.len() as u64;
    let outcome = match unary {
        Unary::Grpc(channel) => ingest(&ctx, channel, events).await,
        Unary::Http(http) => http.post(&events, ctx.request_timeout).await,
    };
    let done = Instant::now();
    drop(permit);
    let (follow, order) = {
        let mut s = ctx.stats();
        s.requests.sent += 1;
        s.events.sent += n;
        s.last_response = Some(done);
        match outcome {
            Ok(acked) => {
                s.requests.ok += 1;
                s.latency.saturating_record(micros(done - due));
                s.service.saturating_record(micros(done - issued));
                match acked {
                    Acked::PerEvent(results) => {
                        for (result, device) in results.iter().zip(&devices) {
                            s.acked(result.status == i32::from(EventStatus::Duplicate), *device);
                        }
                    }
                    Acked::All => {
                        for device in &devices {
                            s.acked(false, *device);
                        }
                    }
                }
                s.computed.followed += u64::from(order.is_some());
                (sample.map(|smp| s.follow(smp)), order)
            }
            Err(failure) => {
                s.failed(failure, n);
                (None, None)
            }
        }
    };
    let visible = async {
        if let Some((user_id, expected)) = follow {
            follow_profile(&ctx, ctx.reads.clone(), user_id, expected, done).await;
        }
    };
    let ordered = async {
        if let Some(user_id) = order {
            follow_order(&ctx, ctx.reads.clone(), user_id, done).await;
        }
    };
    tokio::join!(visible, ordered);
}

/// One IngestEvents call.
async fn ingest(ctx: &Ctx, channel: Channel, events: Vec<Event>) -> Result<Acked, Failure> {
    let mut client = IngestionServiceClient::new(channel);
    let mut request = Request::new(IngestEventsRequest { events });
    request.set_timeout(ctx.request_timeout);
    request
        .metadata_mut()
        .insert("x-tessera-write-key", ctx.write_key.clone());
    match tokio::time::timeout(ctx.request_timeout, client.ingest_events(request)).await {
        Ok(Ok(response)) => Ok(Acked::PerEvent(response.into_inner().results)),
        Ok(Err(status)) => Err(Failure::status(&status)),
        Err(_) => Err(Failure::timeout(ctx.request_timeout)),
    }
}

/// Hands `item` to the first worker with room, so that few streams carry the load while the
/// server keeps up and more open only as they back up; `Err(item)` when none has room.
fn offer<T>(workers: &[mpsc::Sender<T>], mut item: T) -> Result<(), T> {
    for worker in workers {
        match worker.try_send(item) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(back) | TrySendError::Closed(back)) => item = back,
        }
    }
    Err(item)
}

/// Writes the chunks it is handed into one StreamIngestEvents stream at a time, closing it
/// after [`STREAM_CHUNKS`] chunks, [`STREAM_MAX_AGE`], a failure, or when the run ends (the
/// queue closes). Closed streams are settled in the background, so the next one opens at once.
async fn stream_worker(ctx: Arc<Ctx>, channel: Channel, mut chunks: mpsc::Receiver<Chunk>) {
    let mut settling = JoinSet::new();
    let mut open: Option<OpenStream> = None;
    loop {
        let age_limit = open.as_ref().map(|s| s.opened + STREAM_MAX_AGE);
        let next = tokio::select! {
            next = chunks.recv() => next,
            () = tokio::time::sleep_until(age_limit.unwrap_or_else(Instant::now)),
                if age_limit.is_some() =>
            {
                if let Some(stream) = open.take() {
                    settling.spawn(settle(Arc::clone(&ctx), stream));
                }
                continue;
            }
        };
        let Some((job, permit)) = next else { break };
        let stream = open.get_or_insert_with(|| OpenStream::open(&ctx, channel.clone()));
        stream.write(&ctx, job, permit).await;
        if (stream.chunks >= STREAM_CHUNKS || stream.broken.is_some())
            && let Some(stream) = open.take()
        {
            settling.spawn(settle(Arc::clone(&ctx), stream));
        }
        while let Some(joined) = settling.try_join_next() {
            rethrow(joined);
        }
    }
    if let Some(stream) = open.take() {
        settling.spawn(settle(Arc::clone(&ctx), stream));
    }
    while let Some(joined) = settling.join_next().await {
        rethrow(joined);
    }
}

/// A stream being written, with what its final counts will have to be matched against.
struct OpenStream {
    /// Dropped to end the stream.
    chunks_tx: mpsc::Sender<StreamIngestEventsRequest>,
    call: Call,
    opened: Instant,
    chunks: u64,
    events: u64,
    /// The device of every event written, counted as acknowledged if the stream accepts all.
    devices: Vec<u64>,
    samples: Vec<Sample>,
    /// The user ids of the first orders to follow once the stream is acknowledged.
    orders: Vec<String>,
    broken: Option<Broken>,
}

/// Why no more chunks go into a stream.
#[derive(Debug, Clone, Copy)]
enum Broken {
    /// The call ended early; its result says why.
    Ended,
    /// A chunk was not taken within the request timeout.
    Stalled,
}

/// A StreamIngestEvents call running in its own task, cancelled when dropped (Ctrl-C aborts
/// the worker that holds it).
struct Call(JoinHandle<Result<StreamIngestEventsResponse, tonic::Status>>);

impl Drop for Call {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl OpenStream {
    fn open(ctx: &Ctx, channel: Channel) -> Self {
        // One chunk queued: a stream the server does not drain holds up its writer at once.
        let (chunks_tx, chunks_rx) = mpsc::channel(1);
        let body = futures::stream::unfold(chunks_rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        let mut request = Request::new(body);
        request
            .metadata_mut()
            .insert("x-tessera-write-key", ctx.write_key.clone());
        let mut client = IngestionServiceClient::new(channel);
        let call = tokio::spawn(async move {
            client
                .stream_ingest_events(request)
                .await
                .map(tonic::Response::into_inner)
        });
        Self {
            chunks_tx,
            call: Call(call),
            opened: Instant::now(),
            chunks: 0,
            events: 0,
            devices: Vec::new(),
            samples: Vec::new(),
            orders: Vec::new(),
            broken: None,
        }
    }

    /// Writes `job` as the next chunk, then frees its slot.
    async fn write(&mut self, ctx: &Ctx, job: Job, permit: OwnedSemaphorePermit) {
        let Job {
            events,
            devices,
            sample,
            order,
            due: _,
            issued: _,
        } = job;
        self.chunks += 1;
        self.events += events.len() as u64;
        self.devices.extend(devices.into_iter().flatten());
        self.samples.extend(sample);
        self.orders.extend(order);
        if self.broken.is_none() {
            let chunk = StreamIngestEventsRequest { events };
            match tokio::time::timeout(ctx.request_timeout, self.chunks_tx.send(chunk)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => self.broken = Some(Broken::Ended),
                Err(_) => self.broken = Some(Broken::Stalled),
            }
        }
        drop(permit);
    }
}

/// Ends a stream, waits for its counts and records them. Only when every event was accepted
/// are the per-device counts known, so only then do its devices count as acknowledged and its
/// visibility samples get followed (from now, when the stream was acknowledged).
async fn settle(ctx: Arc<Ctx>, stream: OpenStream) {
    let OpenStream {
        chunks_tx,
        mut call,
        opened: _,
        chunks,
        events,
        devices,
        samples,
        orders,
        broken,
    } = stream;
    drop(chunks_tx);
    let outcome = match broken {
        Some(Broken::Stalled) => Err(Failure::new(
            code_name(Code::DeadlineExceeded),
            format!(
                "the stream took no chunk within {:?} (client-side)",
                ctx.request_timeout
            ),
        )),
        Some(Broken::Ended) | None => {
            match tokio::time::timeout(ctx.request_timeout, &mut call.0).await {
                Ok(Ok(Ok(response))) => Ok(response),
                Ok(Ok(Err(status))) => Err(Failure::status(&status)),
                Ok(Err(joined)) if joined.is_panic() => {
                    std::panic::resume_unwind(joined.into_panic())
                }
                Ok(Err(joined)) => {
                    Err(Failure::new(code_name(Code::Cancelled), joined.to_string()))
                }
                Err(_) => Err(Failure::timeout(ctx.request_timeout)),
            }
        }
    };
    let done = Instant::now();
    let (follows, orders): (Vec<(String, u64)>, Vec<String>) = {
        let mut s = ctx.stats();
        s.requests.sent += 1;
        s.requests.chunks = Some(s.requests.chunks.unwrap_or(0) + chunks);
        s.events.sent += events;
        s.last_response = Some(done);
        match outcome {
            Ok(response) => {
                s.requests.ok += 1;
                s.events.accepted += response.accepted;
                s.events.duplicate += response.duplicates;
                s.events.rejected += response.rejected;
                if response.accepted == events {
                    for device in devices {
                        *s.device_acks.entry(device).or_default() += 1;
                    }
                    s.computed.followed += orders.len() as u64;
                    let follows = samples.into_iter().map(|smp| s.follow(smp)).collect();
                    (follows, orders)
                } else {
                    (Vec::new(), Vec::new())
                }
            }
            Err(failure) => {
                s.failed(failure, events);
                (Vec::new(), Vec::new())
            }
        }
    };
    let reads = follows.into_iter().map(|(user_id, expected)| {
        follow_profile(&ctx, ctx.reads.clone(), user_id, expected, done)
    });
    let orders = orders
        .into_iter()
        .map(|user_id| follow_order(&ctx, ctx.reads.clone(), user_id, done));
    futures::future::join(
        futures::future::join_all(reads),
        futures::future::join_all(orders),
    )
    .await;
}

/// Polls GetProfile by the new user id until the profile counts every acknowledged event of
/// the device (the identify included), or the visibility timeout passes.
async fn follow_profile(
    ctx: &Ctx,
    channel: crate::client_tls::Authorized,
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
        as_of: None,
        read_mask: None,
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

/// Polls GetProfile by the user id of a person's first order until the profile shows the order
/// in the computed trait, the audience and the score, or the computed timeout passes; what has
/// not shown it by then counts as not seen.
async fn follow_order(
    ctx: &Ctx,
    channel: crate::client_tls::Authorized,
    user_id: String,
    acked: Instant,
) {
    let mut profiles = ProfileServiceClient::new(channel);
    let lookup = GetProfileRequest {
        lookup: Some(Lookup::Identifier(Identifier {
            r#type: "user_id".to_owned(),
            value: user_id,
        })),
        as_of: None,
        read_mask: Some(computed::read_mask()),
    };
    let mut progress = computed::Progress::default();
    loop {
        let left = ctx.computed_timeout.saturating_sub(acked.elapsed());
        let mut request = Request::new(lookup.clone());
        request.set_timeout(ctx.request_timeout);
        match tokio::time::timeout(left + POLL_GRACE, profiles.get_profile(request)).await {
            Ok(Ok(response)) => {
                let waited = acked.elapsed();
                if waited <= ctx.computed_timeout
                    && let Some(profile) = response.into_inner().profile
                {
                    progress.observe(&profile, waited);
                    if progress.done() {
                        break;
                    }
                }
            }
            Ok(Err(status)) if status.code() == Code::NotFound => {}
            Ok(Err(status)) => {
                let name = code_name(status.code()).to_owned();
                let mut s = ctx.stats();
                *s.computed.poll_errors.entry(name.clone()).or_default() += 1;
                s.computed
                    .first_poll_error
                    .entry(name)
                    .or_insert_with(|| status.message().chars().take(200).collect());
            }
            Err(_) => {}
        }
        let waited = acked.elapsed();
        if waited >= ctx.computed_timeout {
            break;
        }
        tokio::time::sleep(poll_interval(waited).min(ctx.computed_timeout - waited)).await;
    }
    ctx.stats().computed.finished(progress);
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
            computed: stats.computed.report(),
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
        assert_eq!(a.transport, Transport::Grpc);
        assert_eq!(a.http_target, "http://127.0.0.1:8080");
    }

    #[test]
    fn transports_are_named_alike_on_the_command_line_and_in_the_report() {
        for (name, transport) in [
            ("grpc", Transport::Grpc),
            ("grpc-stream", Transport::GrpcStream),
            ("http", Transport::Http),
        ] {
            let a = Cli::try_parse_from(["bench", "--transport", name]).unwrap();
            assert_eq!(a.bench.transport, transport);
            assert_eq!(transport.to_string(), name);
            assert_eq!(serde_json::to_value(transport).unwrap(), name);
        }
        assert!(Cli::try_parse_from(["bench", "--transport", "udp"]).is_err());
    }

    #[test]
    fn the_http_target_is_a_plain_http_base_url() {
        for (target, want) in [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1/batch"),
            ("http://localhost:8080/", "http://localhost:8080/v1/batch"),
            ("http://[::1]:8191", "http://[::1]:8191/v1/batch"),
            ("http://proxy/tessera", "http://proxy/tessera/v1/batch"),
        ] {
            assert_eq!(batch_uri(target).unwrap().to_string(), want);
        }
        for bad in [
            "https://example.com",
            "127.0.0.1:8080",
            "http://",
            "not a url",
        ] {
            assert!(batch_uri(bad).is_err(), "{bad} accepted");
        }
        assert!(is_loopback("[::1]") && is_loopback("localhost") && !is_loopback("10.0.0.1"));
    }

    #[test]
    fn the_write_key_is_the_basic_user_with_no_password() {
        // base64("tsk_bench:")
        assert_eq!(basic_auth("tsk_bench"), "Basic dHNrX2JlbmNoOg==");
    }

    #[test]
    fn only_success_true_is_success() {
        assert!(is_success(br#"{"success":true}"#));
        assert!(is_success(b"{ \"success\": true }\n"));
        for body in [
            &br#"{"success":false}"#[..],
            br#"{"success":true,"accepted":3}"#,
            b"",
            b"OK",
        ] {
            assert!(!is_success(body), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn chunks_go_to_the_first_stream_worker_with_room() {
        let (workers, mut queues): (Vec<_>, Vec<_>) = (0..3).map(|_| mpsc::channel(1)).unzip();
        assert_eq!(offer(&workers, 1), Ok(()));
        assert_eq!(offer(&workers, 2), Ok(()));
        // Worker 0 takes its chunk: the next goes to it again.
        assert_eq!(queues[0].try_recv(), Ok(1));
        assert_eq!(offer(&workers, 3), Ok(()));
        assert_eq!(offer(&workers, 4), Ok(()));
        assert_eq!(offer(&workers, 5), Err(5), "every worker is full");
        // A stopped worker is passed over.
        drop(queues.remove(2));
        assert_eq!(queues[1].try_recv(), Ok(2));
        assert_eq!(offer(&workers, 5), Ok(()));
        assert_eq!(queues[1].try_recv(), Ok(5));
        assert_eq!(queues[0].try_recv(), Ok(3));
    }

    #[test]
    fn error_messages_carry_their_causes() {
        let e = anyhow::anyhow!("root").context("middle").context("outer");
        let e: &(dyn std::error::Error + 'static) = e.as_ref();
        assert_eq!(error_chain(e), "outer: middle: root");
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
