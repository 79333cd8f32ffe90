//! `tessera`: one binary for every role. `tessera dev` runs all four services in one process on
//! SQLite and an in-process cache; `tessera ingestion|identity|profile|scoring` run one service
//! each against Postgres and Redis; `tessera migrate` applies migrations; `tessera sources`
//! manages sources and their write keys; `tessera definitions` declares computed traits and
//! audiences; `tessera bench` is the load tool; `tessera import` loads Segment-format JSON lines.

/// Every service runs with mimalloc rather than glibc's malloc: see the workspace manifest and
/// docs/reliability.md ("Soak").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod bench_reads;
mod client_tls;
mod definitions;
mod dev_certs;
mod import;
mod profiles;
mod run;
mod settings;
mod sources;
mod tokens;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Tessera: a real-time customer profile platform.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run all four services in one process on SQLite files and an in-process cache: no servers
    /// to install. All gRPC services share one port; data survives a restart.
    Dev(DevArgs),
    /// Run the ingestion service (production: Postgres via DATABASE_URL; peers via
    /// TESSERA__PEERS__IDENTITY and TESSERA__PEERS__PROFILE).
    Ingestion(ServeArgs),
    /// Run the identity service (production: Postgres via DATABASE_URL).
    Identity(ServeArgs),
    /// Run the profile service (production: Postgres via DATABASE_URL, Redis via REDIS_URL;
    /// peers via TESSERA__PEERS__IDENTITY and TESSERA__PEERS__SCORING).
    Profile(ServeArgs),
    /// Run the scoring service.
    Scoring(ServeArgs),
    /// Apply every service's database migrations to DATABASE_URL, then exit.
    Migrate(ConfigArgs),
    /// Make a development CA and one certificate per service for mutual TLS between services
    /// ([tls] settings); for development and tests, not production.
    DevCerts(dev_certs::DevCertsArgs),
    /// Manage the sources of a running Tessera (create, list, disable, enable, rotate-key,
    /// update) through its admin gRPC API. Write keys are printed once, on create and rotate-key.
    Sources(sources::SourcesArgs),
    /// What a running Tessera holds about a person: `export` (GDPR right of access), `delete`
    /// (right to erasure).
    Profiles(profiles::ProfilesArgs),
    /// Declare computed traits and audiences at run time (beside config's) through the
    /// DefinitionService API of a running Tessera: list, get, create and update from a TOML or
    /// JSON file of the config's form, delete.
    Definitions(definitions::DefinitionsArgs),
    /// Manage the access tokens of the external APIs (create, list, rotate, revoke) in the
    /// database directly (DATABASE_URL, or a sqlite:// URL of `tessera dev`'s auth.db): the way
    /// to the first admin token. Secrets are printed once, on create and rotate.
    Tokens(tokens::TokensArgs),
    /// Read the audit log of admin, privacy and profile-writing calls from the database.
    Audit(tokens::AuditArgs),
    /// Send synthetic events at a chosen rate and concurrency and report throughput, latency
    /// and time from acceptance to profile visible.
    Bench(bench::BenchArgs),
    /// Seed profiles, then read them by id from many tasks and report the read rate and
    /// latency (GetProfile on a cache hit).
    BenchReads(bench_reads::BenchReadsArgs),
    /// Load a file of Segment-format JSON lines (plain or gzip) through the gRPC stream, with a
    /// progress bar; resumable (FILE.tessera-import), and exits non-zero if a line is rejected.
    Import(import::ImportArgs),
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// A TOML configuration file (see docs/tessera.example.toml). Environment variables
    /// (TESSERA__SECTION__KEY, DATABASE_URL, REDIS_URL, OTEL_EXPORTER_OTLP_ENDPOINT) override
    /// it, and flags override both.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// The Postgres URL of the system of record [env: DATABASE_URL].
    #[arg(long, value_name = "URL", global = true)]
    database_url: Option<String>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// The HTTP listen address for HTTP APIs, /healthz and /metrics [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    http_addr: Option<SocketAddr>,
    /// The Redis URL of the profile cache, or memory:// [env: REDIS_URL].
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
}

#[derive(Debug, Args)]
struct DevArgs {
    /// Where the SQLite files live.
    #[arg(long, value_name = "DIR", default_value = "./tessera-data")]
    data_dir: PathBuf,
    /// The gRPC listen address of all four services.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    grpc_addr: SocketAddr,
    /// The HTTP listen address for HTTP APIs, /healthz and /metrics.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// A TOML configuration file for the services' settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Fix the write key of the source `default` (created, or re-keyed, to have it) instead of
    /// the random key printed on first start [env: TESSERA_WRITE_KEY].
    #[arg(long, value_name = "KEY")]
    write_key: Option<sources::WriteKeyArg>,
    /// Fix the access token with every scope (gRPC and the Profile API) instead of a random
    /// one printed at start [env: TESSERA_ACCESS_TOKEN].
    #[arg(long, value_name = "TOKEN")]
    access_token: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let plan = match run::plan(cli.command, &env) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tessera: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::execute(plan)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            ExitCode::FAILURE
        }
    }
}
