//! `tessera-chaos`: the fault-injection suite on demand (see `tessera_tests::chaos` and
//! docs/reliability.md). Exits non-zero when an invariant was violated.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tessera_tests::chaos::{self, Fault, Options};

/// Runs the four services as separate processes on a Postgres and a Redis of its own, under a
/// steady load, injects one fault per round and checks the invariants after each.
#[derive(Debug, Parser)]
struct Args {
    /// Rounds of each fault kind (the full run: 10; CI's short run: 1).
    #[arg(long, default_value_t = 10)]
    rounds_per_fault: usize,
    /// The faults to inject, comma-separated (default: all). Names: kill-ingestion,
    /// kill-identity, kill-profile, kill-scoring, kill-identity+profile,
    /// kill-ingestion+scoring, postgres-restart-fast, postgres-restart-immediate,
    /// postgres-unreachable, redis-kill, redis-flushall, redis-restart, net-latency, net-drop,
    /// net-blackhole, clock-skew.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Seeds the order of the faults, their moments and the links they hit.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Batches of the load per round.
    #[arg(long, default_value_t = 8)]
    batches: usize,
    /// Messages per batch.
    #[arg(long, default_value_t = 25)]
    batch_size: usize,
    /// New users per round (each lives two rounds).
    #[arg(long, default_value_t = 10)]
    users: usize,
    /// Milliseconds between two batches.
    #[arg(long, default_value_t = 250)]
    pace_ms: u64,
    /// Seconds Postgres stays unreachable.
    #[arg(long, default_value_t = 30)]
    pg_outage_s: u64,
    /// Where the processes' logs go (default: a new temporary directory, kept).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let faults = if args.faults.is_empty() {
        Fault::all()
    } else {
        args.faults
            .iter()
            .map(|name| Fault::parse(name).ok_or_else(|| anyhow::anyhow!("unknown fault {name:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let log_dir = match args.log_dir {
        Some(dir) => dir,
        None => tempfile::Builder::new()
            .prefix("tessera-chaos")
            .tempdir()?
            .keep(),
    };
    println!("tessera-chaos: logs in {}", log_dir.display());
    let opts = Options {
        rounds_per_fault: args.rounds_per_fault,
        faults,
        seed: args.seed,
        new_users_per_round: args.users,
        batches_per_round: args.batches,
        batch_size: args.batch_size,
        pace: Duration::from_millis(args.pace_ms),
        pg_outage: Duration::from_secs(args.pg_outage_s),
        ..Options::full(log_dir)
    };
    let report = chaos::run(opts, |r| {
        println!(
            "round {:>3} {:<28} acked {:>4}  failed attempts {:>3}  settled {:>8}  violations {}  ({})",
            r.round,
            r.fault.name(),
            r.acked,
            r.failures.values().sum::<usize>(),
            r.settled_after
                .map_or("never".to_owned(), |d| format!("{:.1}s", d.as_secs_f64())),
            r.violations.len(),
            r.detail
        );
        for v in &r.violations {
            println!("    violation: {v}");
        }
    })
    .await;
    let markdown = report.markdown();
    println!("\n{markdown}");
    if let Some(path) = args.report {
        std::fs::write(path, &markdown)?;
    }
    if report.violations() > 0 {
        println!(
            "tessera-chaos: {} invariant violations",
            report.violations()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
