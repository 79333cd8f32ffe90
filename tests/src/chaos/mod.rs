//! The fault-injection suite: the four services as separate processes on a Postgres and a Redis
//! of its own, a steady load of Segment messages (gRPC and HTTP, every batch retried with the
//! same message ids until acknowledged, as client libraries do), and one fault per round at a
//! random moment of the load: kill -9 of one or two services, Postgres restarted or
//! unreachable, Redis killed, flushed or restarted, a link between two services slowed, reset
//! or blackholed, or event times skewed by days. After each round it checks the invariants:
//! every acknowledged message is in the event log exactly once; every profile the round touched
//! equals the same user's profile in a fault-free reference (`tessera dev`) fed the same input
//! (traits, computed traits, audiences, scores, accounts, identifiers: the identity partition);
//! no merge was decided twice; and clients saw only retryable errors (UNAVAILABLE,
//! RESOURCE_EXHAUSTED, 503, 429, or a connection failure) while a dependency was down.
//!
//! `cargo run -p tessera-tests --bin tessera-chaos -- --help` runs it on demand; the end-to-end
//! test `chaos::short_run_holds_every_invariant` runs one round of each fault in CI.

pub mod check;
pub mod deploy;
pub mod input;

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error as _;
use std::path::PathBuf;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::auth::Channel;
use crate::events::{get_by, send};
use crate::servers::PgStop;
use deploy::{Reference, Service, Stack};
use input::{Msg, Plan};

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// kill -9 of one service, restarted at once.
    Kill(Service),
    /// kill -9 of two services at once.
    KillTwo(Service, Service),
    /// Postgres stopped with `pg_ctl -m fast` and started again.
    PgRestartFast,
    /// Postgres stopped with `pg_ctl -m immediate` (crash recovery) and started again.
    PgRestartImmediate,
    /// Every connection to Postgres refused for the outage time (30 s).
    PgUnreachable,
    /// Redis killed (SIGKILL), down for a few seconds, started again empty.
    RedisKill,
    /// `FLUSHALL`.
    RedisFlush,
    /// Redis shut down (`SHUTDOWN NOSAVE`) and started again empty.
    RedisRestart,
    /// 150 ms added to every chunk on one link between two services, for 5 s.
    NetLatency,
    /// Every connection of one link between two services reset, three times.
    NetDrop,
    /// One link between two services blackholed (bytes held, nothing answers) for 12 s.
    NetBlackhole,
    /// The round's events carry times days in the past or the future.
    ClockSkew,
}

impl Fault {
    /// Every fault kind the suite injects.
    pub fn all() -> Vec<Fault> {
        let mut all: Vec<Fault> = Service::ALL.iter().map(|s| Fault::Kill(*s)).collect();
        all.extend([
            Fault::KillTwo(Service::Identity, Service::Profile),
            Fault::KillTwo(Service::Ingestion, Service::Scoring),
            Fault::PgRestartFast,
            Fault::PgRestartImmediate,
            Fault::PgUnreachable,
            Fault::RedisKill,
            Fault::RedisFlush,
            Fault::RedisRestart,
            Fault::NetLatency,
            Fault::NetDrop,
            Fault::NetBlackhole,
            Fault::ClockSkew,
        ]);
        all
    }

    /// The fault's name, as the command line takes it.
    pub fn name(self) -> String {
        match self {
            Fault::Kill(s) => format!("kill-{}", s.name()),
            Fault::KillTwo(a, b) => format!("kill-{}+{}", a.name(), b.name()),
            Fault::PgRestartFast => "postgres-restart-fast".to_owned(),
            Fault::PgRestartImmediate => "postgres-restart-immediate".to_owned(),
            Fault::PgUnreachable => "postgres-unreachable".to_owned(),
            Fault::RedisKill => "redis-kill".to_owned(),
            Fault::RedisFlush => "redis-flushall".to_owned(),
            Fault::RedisRestart => "redis-restart".to_owned(),
            Fault::NetLatency => "net-latency".to_owned(),
            Fault::NetDrop => "net-drop".to_owned(),
            Fault::NetBlackhole => "net-blackhole".to_owned(),
            Fault::ClockSkew => "clock-skew".to_owned(),
        }
    }

    /// The fault named `name` (see [`Fault::name`]).
    pub fn parse(name: &str) -> Option<Fault> {
        Fault::all().into_iter().find(|f| f.name() == name)
    }
}

/// What a run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rounds of each fault kind.
    pub rounds_per_fault: usize,
    pub faults: Vec<Fault>,
    /// Seeds the order of the faults, their moments and the links they hit.
    pub seed: u64,
    pub new_users_per_round: usize,
    pub batches_per_round: usize,
    pub batch_size: usize,
    /// The pause between two batches of the load.
    pub pace: Duration,
    /// How long Postgres stays unreachable.
    pub pg_outage: Duration,
    /// How long a round's profiles may take to reach the reference's after the load.
    pub settle_timeout: Duration,
    /// Where the processes' logs and the configuration go.
    pub log_dir: PathBuf,
}

impl Options {
    /// The version CI runs: one round of every fault.
    pub fn short(log_dir: PathBuf) -> Self {
        Self {
            rounds_per_fault: 1,
            faults: Fault::all(),
            seed: 1,
            new_users_per_round: 10,
            batches_per_round: 8,
            batch_size: 25,
            pace: Duration::from_millis(250),
            pg_outage: Duration::from_secs(30),
            settle_timeout: Duration::from_secs(90),
            log_dir,
        }
    }

    /// The full version: ten rounds of every fault.
    pub fn full(log_dir: PathBuf) -> Self {
        Self {
            rounds_per_fault: 10,
            ..Self::short(log_dir)
        }
    }
}

/// What one round did and found.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub round: usize,
    pub fault: Fault,
    /// What exactly was hit (a link, a service), when, and for how long.
    pub detail: String,
    /// Messages of the round acknowledged.
    pub acked: usize,
    /// Failed attempts (retried) of the load, by what the client saw.
    pub failures: BTreeMap<String, usize>,
    /// From the end of the load until the profiles equalled the reference's.
    pub settled_after: Option<Duration>,
    pub violations: Vec<String>,
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct Report {
    pub rounds: Vec<RoundReport>,
    pub duration: Duration,
    pub users: usize,
}

impl Report {
    /// Invariant violations over every round.
    pub fn violations(&self) -> usize {
        self.rounds.iter().map(|r| r.violations.len()).sum()
    }

    /// Messages acknowledged over every round.
    pub fn messages(&self) -> usize {
        self.rounds.iter().map(|r| r.acked).sum()
    }

    /// A Markdown summary: one row per fault kind, then every violation.
    pub fn markdown(&self) -> String {
        let mut by_fault: BTreeMap<Fault, Vec<&RoundReport>> = BTreeMap::new();
        for r in &self.rounds {
            by_fault.entry(r.fault).or_default().push(r);
        }
        let mut out = format!(
            "{} rounds, {} messages acknowledged, {} users, {} invariant violations, {:.0} s\n\n\
             | fault | rounds | messages | failed attempts (what clients saw) | settle p50 / max | violations |\n\
             | --- | --- | --- | --- | --- | --- |\n",
            self.rounds.len(),
            self.messages(),
            self.users,
            self.violations(),
            self.duration.as_secs_f64()
        );
        for (fault, rounds) in &by_fault {
            let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
            for r in rounds {
                for (what, n) in &r.failures {
                    *seen.entry(what).or_default() += n;
                }
            }
            let seen = if seen.is_empty() {
                "none".to_owned()
            } else {
                seen.iter()
                    .map(|(k, v)| format!("{k} ×{v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut settle: Vec<Duration> = rounds.iter().filter_map(|r| r.settled_after).collect();
            settle.sort();
            let settle = match (settle.get(settle.len() / 2), settle.last()) {
                (Some(p50), Some(max)) => {
                    format!("{:.1} / {:.1} s", p50.as_secs_f64(), max.as_secs_f64())
                }
                _ => "never".to_owned(),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {seen} | {settle} | {} |\n",
                fault.name(),
                rounds.len(),
                rounds.iter().map(|r| r.acked).sum::<usize>(),
                rounds.iter().map(|r| r.violations.len()).sum::<usize>()
            ));
        }
        for r in &self.rounds {
            for v in &r.violations {
                out.push_str(&format!(
                    "\n- round {} ({}, {}): {v}",
                    r.round,
                    r.fault.name(),
                    r.detail
                ));
            }
        }
        out
    }
}

/// How one failed attempt looked to the client, and whether a client may see it while a
/// dependency is down: a retryable status, or the connection failing (a process killed).
fn classify_grpc(e: &tonic::Status) -> (String, bool) {
    if e.source().is_some() {
        // tonic's own: the connection failed or was reset; the server said nothing.
        return (format!("connection ({:?})", e.code()), true);
    }
    match e.code() {
        tonic::Code::Unavailable | tonic::Code::ResourceExhausted => {
            let hint = tonic_types::StatusExt::get_error_details(e)
                .retry_info()
                .is_some();
            let what = format!(
                "gRPC {:?}{}",
                e.code(),
                if hint { " + retry hint" } else { "" }
            );
            (what, hint)
        }
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            (format!("gRPC {:?}", e.code()), true)
        }
        tonic::Code::Ok
        | tonic::Code::Unknown
        | tonic::Code::InvalidArgument
        | tonic::Code::NotFound
        | tonic::Code::AlreadyExists
        | tonic::Code::PermissionDenied
        | tonic::Code::FailedPrecondition
        | tonic::Code::Aborted
        | tonic::Code::OutOfRange
        | tonic::Code::Unimplemented
        | tonic::Code::Internal
        | tonic::Code::DataLoss
        | tonic::Code::Unauthenticated => (format!("gRPC {:?}: {}", e.code(), e.message()), false),
    }
}

/// POSTs `body` to `/v1/batch`; the HTTP status, the `Retry-After` header and the body, or how
/// the connection failed.
async fn post_batch(addr: &str, key: &str, body: &str) -> Result<(u16, bool, String), String> {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
    let request = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "timed out".to_owned())??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| "closed before a response".to_owned())?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "no status line".to_owned())?;
    let retry_after = head.to_ascii_lowercase().contains("\r\nretry-after:");
    Ok((status, retry_after, body.to_owned()))
}

/// Where a batch goes: half of the batches through gRPC, half through HTTP.
#[derive(Clone)]
struct Target {
    grpc: Channel,
    http: String,
    key: String,
}

/// Sends one batch until acknowledged; counts what each failed attempt looked like and reports
/// what no client should see. `Err` when it was never acknowledged.
async fn send_until_acked(
    target: &Target,
    batch: &[Msg],
    over_http: bool,
    deadline: Duration,
    failures: &mut BTreeMap<String, usize>,
    violations: &mut Vec<String>,
) -> Result<(), String> {
    let give_up = Instant::now() + deadline;
    let body = over_http.then(|| {
        serde_json::json!({"batch": batch.iter().map(Msg::json).collect::<Vec<_>>()}).to_string()
    });
    loop {
        let (what, fine) = match &body {
            None => match send(
                &target.grpc,
                &target.key,
                batch.iter().map(Msg::event).collect(),
            )
            .await
            {
                Ok(statuses) if statuses.len() == batch.len() => return Ok(()),
                Ok(statuses) => (
                    format!(
                        "gRPC OK with {} results for {}",
                        statuses.len(),
                        batch.len()
                    ),
                    false,
                ),
                Err(e) => classify_grpc(&e),
            },
            Some(body) => match post_batch(&target.http, &target.key, body).await {
                Ok((200, _, reply)) if reply.contains("\"success\":true") => return Ok(()),
                Ok((code @ (429 | 503), retry_after, _)) => (
                    format!(
                        "HTTP {code}{}",
                        if retry_after { " + Retry-After" } else { "" }
                    ),
                    code == 503 || retry_after,
                ),
                Ok((code, _, reply)) => {
                    let mut reply = reply;
                    reply.truncate(300);
                    (format!("HTTP {code}: {reply}"), false)
                }
                Err(_) => ("connection (HTTP)".to_owned(), true),
            },
        };
        *failures.entry(what.clone()).or_default() += 1;
        if !fine && !violations.iter().any(|v| v.contains(&what)) {
            violations.push(format!("a client saw an error it should not: {what}"));
        }
        if Instant::now() >= give_up {
            return Err(format!(
                "a batch was not acknowledged within {deadline:?}: {what}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a round's load did.
#[derive(Default)]
struct LoadOutcome {
    acked: Vec<String>,
    failures: BTreeMap<String, usize>,
    violations: Vec<String>,
}

/// The round's batches, in order and paced, each until acknowledged.
async fn load(
    target: Target,
    batches: Vec<Vec<Msg>>,
    pace: Duration,
    deadline: Duration,
) -> LoadOutcome {
    let mut out = LoadOutcome::default();
    for (b, batch) in batches.iter().enumerate() {
        let over_http = b % 2 == 1;
        match send_until_acked(
            &target,
            batch,
            over_http,
            deadline,
            &mut out.failures,
            &mut out.violations,
        )
        .await
        {
            Ok(()) => out.acked.extend(batch.iter().map(|m| m.message_id.clone())),
            Err(e) => {
                out.violations.push(e);
                return out;
            }
        }
        tokio::time::sleep(pace).await;
    }
    out
}

/// A link between two services, at random: its name and its proxy.
fn pick_link<'a>(stack: &'a Stack, rng: &mut StdRng) -> (String, &'a crate::proxy::Proxy) {
    let links = deploy::links();
    let (from, to) = links[rng.random_range(0..links.len())];
    (
        format!("{} → {}", from.name(), to.name()),
        &stack.links[&(from, to)],
    )
}

/// Injects `fault`; returns what it did.
async fn inject(fault: Fault, stack: &mut Stack, rng: &mut StdRng, opts: &Options) -> String {
    match fault {
        Fault::Kill(s) => {
            stack.kill_and_restart(&[s]).await;
            format!("{} killed and restarted", s.name())
        }
        Fault::KillTwo(a, b) => {
            stack.kill_and_restart(&[a, b]).await;
            format!("{} and {} killed and restarted", a.name(), b.name())
        }
        Fault::PgRestartFast | Fault::PgRestartImmediate => {
            let mode = if fault == Fault::PgRestartFast {
                PgStop::Fast
            } else {
                PgStop::Immediate
            };
            let down = Duration::from_millis(rng.random_range(0..2000));
            stack.pg.stop(mode).await;
            tokio::time::sleep(down).await;
            stack.pg.start_again().await;
            format!("postgres stopped ({mode:?}), down {down:?}")
        }
        Fault::PgUnreachable => {
            stack.pg_proxy.cut();
            tokio::time::sleep(opts.pg_outage).await;
            stack.pg_proxy.restore();
            format!("postgres unreachable for {:?}", opts.pg_outage)
        }
        Fault::RedisKill => {
            let down = Duration::from_millis(rng.random_range(1000..4000));
            stack.redis.kill().await;
            tokio::time::sleep(down).await;
            stack.redis.start_again().await;
            format!("redis killed, down {down:?}")
        }
        Fault::RedisFlush => {
            let flushed = stack.redis.command(&["FLUSHALL"]).await;
            format!("FLUSHALL: {flushed:?}")
        }
        Fault::RedisRestart => {
            // The connection closes as the server exits: the reply is an error.
            let _ = stack.redis.command(&["SHUTDOWN", "NOSAVE"]).await;
            stack.redis.kill().await;
            stack.redis.start_again().await;
            "redis shut down and started again".to_owned()
        }
        Fault::NetLatency => {
            let (link, proxy) = pick_link(stack, rng);
            proxy.set_latency(Duration::from_millis(150));
            tokio::time::sleep(Duration::from_secs(5)).await;
            proxy.set_latency(Duration::ZERO);
            format!("{link}: 150 ms per chunk for 5 s")
        }
        Fault::NetDrop => {
            let (link, proxy) = pick_link(stack, rng);
            for _ in 0..3 {
                proxy.drop_connections();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            format!("{link}: connections reset 3 times")
        }
        Fault::NetBlackhole => {
            let (link, proxy) = pick_link(stack, rng);
            proxy.set_blackhole(true);
            tokio::time::sleep(Duration::from_secs(12)).await;
            proxy.set_blackhole(false);
            format!("{link}: blackholed for 12 s")
        }
        Fault::ClockSkew => "event times 12 hours to 40 days off".to_owned(),
    }
}

/// Canonical profiles of `users`, by user id (an error when a read fails).
async fn snapshot(
    channel: &Channel,
    plan: &Plan,
    users: std::ops::Range<usize>,
) -> BTreeMap<usize, Result<tessera_proto::profile::v1::Profile, String>> {
    let mut out = BTreeMap::new();
    for u in users {
        let p = get_by(channel, "user_id", &plan.user_id(u))
            .await
            .map_err(|e| format!("{:?}: {}", e.code(), e.message()));
        out.insert(u, p);
    }
    out
}

/// The users whose profiles differ, with how.
async fn compare(
    faulted: &Channel,
    reference: &Channel,
    plan: &Plan,
    users: std::ops::Range<usize>,
) -> Vec<String> {
    let (a, b) = tokio::join!(
        snapshot(faulted, plan, users.clone()),
        snapshot(reference, plan, users)
    );
    let mut out = Vec::new();
    for (u, fp) in &a {
        let rp = &b[u];
        let who = plan.user_id(*u);
        match (fp, rp) {
            (Ok(f), Ok(r)) => {
                let (cf, cr) = (check::canonical(f), check::canonical(r));
                if cf != cr {
                    out.push(format!("{who}: {}", check::difference(&cf, &cr)));
                } else if let Some(d) = check::score_difference(f, r) {
                    out.push(format!("{who}: scores {d}"));
                }
            }
            (f, r) => out.push(format!(
                "{who}: {:?} vs reference {:?}",
                f.as_ref().map(|p| p.event_count),
                r.as_ref().map(|p| p.event_count)
            )),
        }
    }
    out
}

/// Waits until the profiles of `users` equal the reference's (twice in a row); the time it took,
/// or the differences at the deadline.
async fn settle(
    faulted: &Channel,
    reference: &Channel,
    plan: &Plan,
    users: std::ops::Range<usize>,
    timeout: Duration,
) -> Result<Duration, Vec<String>> {
    let started = Instant::now();
    let mut equal_once = false;
    loop {
        let diff = compare(faulted, reference, plan, users.clone()).await;
        if diff.is_empty() {
            if equal_once {
                return Ok(started.elapsed());
            }
            equal_once = true;
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        equal_once = false;
        if started.elapsed() > timeout {
            return Err(diff);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the suite; `progress` hears about every round as it ends.
pub async fn run(opts: Options, mut progress: impl FnMut(&RoundReport)) -> Report {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut schedule = Vec::new();
    for _ in 0..opts.rounds_per_fault {
        let mut cycle = opts.faults.clone();
        cycle.shuffle(&mut rng);
        schedule.extend(cycle);
    }
    let plan = Plan {
        tag: format!("chaos{}", opts.seed),
        new_users_per_round: opts.new_users_per_round,
        batches_per_round: opts.batches_per_round,
        batch_size: opts.batch_size,
        t0_ms: i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("time after the epoch")
                .as_millis(),
        )
        .expect("a time in range")
            - 3_600_000,
    };
    let (mut stack, reference) =
        tokio::join!(Stack::start(&opts.log_dir), Reference::start(&opts.log_dir));
    let faulted_target = Target {
        grpc: stack.ingest_channel(),
        http: stack.http_addr(),
        key: stack.write_key.clone(),
    };
    let reference_channel = reference.channel().await;
    let reference_target = Target {
        grpc: reference_channel.clone(),
        http: reference.http_addr.clone(),
        key: reference.write_key.clone(),
    };
    let read = stack.read_channel();
    // The load's deadline covers the longest outage with room to catch up.
    let ack_deadline = opts.pg_outage + Duration::from_secs(90);
    let mut acked_all = BTreeSet::new();
    let mut rounds = Vec::new();
    for (round, fault) in schedule.iter().copied().enumerate() {
        let skewed = fault == Fault::ClockSkew;
        let batches: Vec<Vec<Msg>> = (0..opts.batches_per_round)
            .map(|b| plan.batch(round, b, skewed))
            .collect();
        let loader = tokio::spawn(load(
            faulted_target.clone(),
            batches.clone(),
            opts.pace,
            ack_deadline,
        ));
        let window = opts.pace * u32::try_from(opts.batches_per_round).unwrap_or(u32::MAX);
        let at = window.mul_f64(rng.random_range(0.15..0.7));
        tokio::time::sleep(at).await;
        let detail = format!(
            "{} at {at:?}",
            inject(fault, &mut stack, &mut rng, &opts).await
        );
        let outcome = loader.await.unwrap_or_default();
        let mut violations = outcome.violations;
        // The reference gets the same batches, the same way, without faults.
        let mut ignored = BTreeMap::new();
        let mut reference_violations = Vec::new();
        for (b, batch) in batches.iter().enumerate() {
            if let Err(e) = send_until_acked(
                &reference_target,
                batch,
                b % 2 == 1,
                Duration::from_secs(60),
                &mut ignored,
                &mut reference_violations,
            )
            .await
            {
                violations.push(format!("the reference did not take a batch: {e}"));
            }
        }
        let acked = outcome.acked.len();
        acked_all.extend(outcome.acked);
        let last = round + 1 == schedule.len();
        let users = if last {
            plan.users_until(round)
        } else {
            plan.users_of_round(round)
        };
        let settled_after =
            match settle(&read, &reference_channel, &plan, users, opts.settle_timeout).await {
                Ok(d) => Some(d),
                Err(diff) => {
                    violations.push(format!(
                        "{} profiles differ from the reference after {:?}: {}",
                        diff.len(),
                        opts.settle_timeout,
                        diff.iter().take(5).cloned().collect::<Vec<_>>().join(" | ")
                    ));
                    None
                }
            };
        violations.extend(check::event_log(&stack.db_url, "chaos", &acked_all).await);
        violations.extend(check::merges(&stack.db_url).await);
        let report = RoundReport {
            round,
            fault,
            detail,
            acked,
            failures: outcome.failures,
            settled_after,
            violations,
        };
        progress(&report);
        rounds.push(report);
    }
    Report {
        rounds,
        duration: started.elapsed(),
        users: plan.users_until(schedule.len().saturating_sub(1)).len(),
    }
}
