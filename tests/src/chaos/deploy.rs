//! The deployment under test: the four services as separate processes on a Postgres and a Redis
//! of the suite's own, with a proxy of the suite's on every connection that can fail (each
//! service to each peer, every service to Postgres, the clients to the services), so that a
//! restarted process keeps the address its peers know and a link can be slowed, cut or
//! blackholed. Beside it, the fault-free reference: `tessera dev` on SQLite with the same
//! configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::auth::Channel;
use crate::process::{Tessera, TesseraBuilder};
use crate::proxy::Proxy;
use crate::servers::{OwnPostgres, OwnRedis};

/// One of the four services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    Ingestion,
    Identity,
    Profile,
    Scoring,
}

impl Service {
    /// Every service.
    pub const ALL: [Service; 4] = [
        Service::Ingestion,
        Service::Identity,
        Service::Profile,
        Service::Scoring,
    ];

    /// The `tessera` subcommand and name.
    pub fn name(self) -> &'static str {
        match self {
            Service::Ingestion => "ingestion",
            Service::Identity => "identity",
            Service::Profile => "profile",
            Service::Scoring => "scoring",
        }
    }

    /// The peers the service calls.
    fn peers(self) -> &'static [Service] {
        match self {
            Service::Ingestion => &[Service::Identity, Service::Profile],
            Service::Identity | Service::Scoring => &[Service::Profile],
            Service::Profile => &[Service::Identity, Service::Scoring, Service::Ingestion],
        }
    }
}

/// Every caller → callee connection between services.
pub fn links() -> Vec<(Service, Service)> {
    Service::ALL
        .iter()
        .flat_map(|from| from.peers().iter().map(move |to| (*from, *to)))
        .collect()
}

/// The services' configuration: what the invariants compare (computed traits, audiences, plans,
/// predictions), without probabilistic matching, whose suggestions depend on timing.
const CONFIG: &str = r#"
[identity.matching]
enabled = false

[profile]
match_profiles = false

[[profile.computed_traits]]
name = "orders_30d"
kind = "count"
events = ["Order Completed"]
window_seconds = 2592000

[[profile.computed_traits]]
name = "lifetime_revenue"
kind = "sum"
events = ["Order Completed"]
property = "revenue"

[[profile.computed_traits]]
name = "favourite_category"
kind = "most_frequent"
events = ["Product Viewed", "Order Completed"]
property = "category"

[[profile.computed_traits]]
name = "categories"
kind = "unique"
events = ["Product Viewed"]
property = "category"

[[profile.audiences]]
name = "buyers"
condition = { all = [
  { performed = { event = "Order Completed", at_least = 2, within_seconds = 2592000 } },
  { trait = { name = "plan", op = "in", value = ["pro", "team"] } },
] }

[profile.traits.signup_source]
strategy = "first"

[profile.traits.interests]
strategy = "append_unique"

[scoring.customer_value]
version = "cdnow-1997"
r = 0.243
alpha = 4.414
a = 0.793
b = 2.426
p = 6.25
q = 3.74
v = 15.44
unit_days = 7
horizon = 52
months = 12
monthly_discount_rate = 0.01

[[scoring.plans]]
name = "fit"
version = "1"

[[scoring.plans.rules]]
name = "paid_plan"
points = 30
condition = { trait = { name = "plan", op = "in", value = ["pro", "team"] } }

[[scoring.plans.rules]]
name = "spender"
points = 30
condition = { computed = { name = "lifetime_revenue", op = "gte", value = 500 } }

[[scoring.plans.rules]]
name = "buyer"
points = 20
condition = { audience = "buyers" }

[[scoring.plans.rules]]
name = "decision_maker"
points = 20
condition = { account = { name = "member.role", op = "eq", value = "decision maker" } }
"#;

fn addr(host_port: &str) -> SocketAddr {
    host_port.parse().expect("a socket address")
}

/// A channel through `proxy` that reconnects by itself and never waits long on a dead peer.
pub fn lazy_channel(proxy: SocketAddr) -> Channel {
    crate::auth::authorized(
        tonic::transport::Channel::from_shared(format!("http://{proxy}"))
            .expect("url")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect_lazy(),
    )
}

/// The deployment under faults.
#[derive(Debug)]
pub struct Stack {
    pub pg: OwnPostgres,
    pub redis: OwnRedis,
    /// Every service's connection to Postgres.
    pub pg_proxy: Proxy,
    /// The database, directly (not through the proxy): for the checks.
    pub db_url: String,
    procs: BTreeMap<Service, Tessera>,
    /// (caller, callee) → the proxy the caller knows the callee by.
    pub links: BTreeMap<(Service, Service), Proxy>,
    /// The clients' gRPC proxies (ingestion for the load, profile for the reads).
    grpc_front: BTreeMap<Service, Proxy>,
    /// The clients' proxy to ingestion's HTTP port.
    http_front: Proxy,
    pub write_key: String,
    starts: BTreeMap<Service, usize>,
    log_dir: PathBuf,
    config: PathBuf,
}

impl Stack {
    /// Starts Postgres, Redis, the proxies and the four services; creates the load's source.
    pub async fn start(log_dir: &Path) -> Self {
        std::fs::create_dir_all(log_dir).expect("create the log dir");
        let config = log_dir.join("chaos.toml");
        std::fs::write(&config, CONFIG).expect("write the config");
        let (pg, redis) = tokio::join!(OwnPostgres::start(), OwnRedis::start());
        pg.create_database("chaos").await;
        let db_url = pg.url("chaos");
        let pg_proxy = Proxy::start(([127, 0, 0, 1], pg.port()).into()).await;
        let nowhere: SocketAddr = ([127, 0, 0, 1], 1).into();
        let mut links = BTreeMap::new();
        for link in self::links() {
            links.insert(link, Proxy::start(nowhere).await);
        }
        let mut grpc_front = BTreeMap::new();
        for s in [Service::Ingestion, Service::Profile] {
            grpc_front.insert(s, Proxy::start(nowhere).await);
        }
        let http_front = Proxy::start(nowhere).await;
        let mut stack = Self {
            pg,
            redis,
            pg_proxy,
            db_url,
            procs: BTreeMap::new(),
            links,
            grpc_front,
            http_front,
            write_key: String::new(),
            starts: BTreeMap::new(),
            log_dir: log_dir.to_owned(),
            config,
        };
        let builders: Vec<TesseraBuilder> = Service::ALL
            .iter()
            .map(|s| stack.builder_again(*s))
            .collect();
        let started = futures_join_all(builders).await;
        for (s, process) in Service::ALL.iter().zip(started) {
            stack.adopt(*s, process);
        }
        let ingestion = &stack.procs[&Service::Ingestion];
        stack.write_key = ingestion.create_source("chaos").await;
        stack
    }

    fn builder(&self, service: Service) -> TesseraBuilder {
        let pg_url = self.db_url.replacen(
            &self.pg.port().to_string(),
            &self.pg_proxy.addr().port().to_string(),
            1,
        );
        let mut b = TesseraBuilder::new(service.name())
            .args(["--config", self.config.to_str().expect("a UTF-8 path")])
            .env("DATABASE_URL", pg_url)
            .env("REDIS_URL", self.redis.url())
            .env("TESSERA__CACHE_PREFIX", "chaos:")
            .env("TESSERA__DB__ACQUIRE_TIMEOUT_MS", "2000")
            .env("TESSERA__INGESTION__LEASE_SECONDS", "3")
            .env("TESSERA__INGESTION__MAX_BACKOFF_MS", "500")
            .env(
                "TESSERA__TELEMETRY__LOG_FILTER",
                "warn,tessera=info,tessera_server=warn",
            );
        for peer in service.peers() {
            let proxy = &self.links[&(service, *peer)];
            b = b.env(
                &format!("TESSERA__PEERS__{}", peer.name().to_uppercase()),
                format!("http://{}", proxy.addr()),
            );
        }
        b
    }

    /// Takes `process` as the running `service`: points every proxy to it at its ports.
    fn adopt(&mut self, service: Service, process: Tessera) {
        let grpc = addr(&process.grpc_addr);
        for ((_, callee), proxy) in &self.links {
            if *callee == service {
                proxy.set_target(grpc);
            }
        }
        if let Some(front) = self.grpc_front.get(&service) {
            front.set_target(grpc);
        }
        if service == Service::Ingestion {
            self.http_front.set_target(addr(&process.http_addr));
        }
        self.procs.insert(service, process);
    }

    /// Kills `services` with SIGKILL, then starts them again (on new ports, behind the same
    /// proxies).
    pub async fn kill_and_restart(&mut self, services: &[Service]) {
        let mut builders = Vec::new();
        for s in services {
            let process = self.procs.get_mut(s).expect("a running service");
            process.kill().await;
            builders.push(self.builder_again(*s));
        }
        let started = futures_join_all(builders).await;
        for (s, process) in services.iter().zip(started) {
            self.adopt(*s, process);
        }
    }

    /// A builder for the next start of `service`, logging to a file of its own.
    fn builder_again(&mut self, service: Service) -> TesseraBuilder {
        let n = self.starts.entry(service).or_insert(0);
        *n += 1;
        let log = self.log_dir.join(format!("{}-{n}.log", service.name()));
        self.builder(service).stderr_to(log)
    }

    /// The clients' gRPC channel to ingestion (the load).
    pub fn ingest_channel(&self) -> Channel {
        lazy_channel(self.grpc_front[&Service::Ingestion].addr())
    }

    /// The clients' gRPC channel to the profile service (the reads).
    pub fn read_channel(&self) -> Channel {
        lazy_channel(self.grpc_front[&Service::Profile].addr())
    }

    /// The clients' address of ingestion's HTTP port.
    pub fn http_addr(&self) -> String {
        self.http_front.addr().to_string()
    }

    /// Where the processes' logs are.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }
}

/// Starts every builder at once.
async fn futures_join_all(builders: Vec<TesseraBuilder>) -> Vec<Tessera> {
    let tasks: Vec<_> = builders
        .into_iter()
        .map(|b| tokio::spawn(b.start()))
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("start a process"));
    }
    out
}

/// The fault-free reference: `tessera dev` on SQLite with the same configuration.
#[derive(Debug)]
pub struct Reference {
    process: Tessera,
    _data: tempfile::TempDir,
    pub write_key: String,
    /// Its HTTP address, `host:port`.
    pub http_addr: String,
}

impl Reference {
    /// Starts `tessera dev` in a fresh data dir.
    pub async fn start(log_dir: &Path) -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let process = TesseraBuilder::new("dev")
            .args(["--data-dir", data.path().to_str().expect("a UTF-8 path")])
            .args([
                "--config",
                log_dir.join("chaos.toml").to_str().expect("a UTF-8 path"),
            ])
            .stderr_to(log_dir.join("reference.log"))
            .start()
            .await;
        let write_key = process.dev_write_key().to_owned();
        Self {
            http_addr: process.http_addr.clone(),
            process,
            _data: data,
            write_key,
        }
    }

    /// A channel to it (ingestion and profile alike).
    pub async fn channel(&self) -> Channel {
        self.process.channel().await
    }
}
