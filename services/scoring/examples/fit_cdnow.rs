//! Fits BG/NBD and Gamma-Gamma on a CDNOW purchase file and times it: the Rust half of
//! `scripts/bench-clv`, which runs the `lifetimes` package on the same file beside it.
//!
//! ```text
//! cargo run -p tessera-scoring --release --example fit_cdnow -- FILE [--end YYYY-MM-DD] [--repeat N]
//! ```
//!
//! FILE is `CDNOW_master.txt` (`customer date cds dollars`, one header line) or
//! `CDNOW_sample.txt` (`customer sample_id date cds dollars`); the customer is the first column.
//! Purchases after `--end` (default: the latest purchase day in the file) are ignored; times are
//! in weeks. Each of N runs (default 5) summarizes the purchases and fits both models; the
//! summaries are made once per run, the fits timed on their own. Prints the parameters, the
//! diagnostics and the best and median times.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use tessera_scoring::clv::summary::{DAYS_PER_WEEK, Purchase, summarize};
use tessera_scoring::clv::{BgNbdParams, CustomerSummary, GammaGammaParams};
use time::{Date, Month};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        println!("usage: fit_cdnow FILE [--end YYYY-MM-DD] [--repeat N]");
        std::process::exit(2);
    };
    let mut end: Option<Date> = None;
    let mut repeat = 5usize;
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        let value = rest
            .next()
            .unwrap_or_else(|| fail(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--end" => end = Some(parse_day(&value.replace('-', ""))),
            "--repeat" => repeat = value.parse().unwrap_or_else(|_| fail("--repeat: a number")),
            other => fail(&format!("unknown flag {other}")),
        }
    }

    let text = std::fs::read_to_string(path).unwrap_or_else(|e| fail(&format!("{path}: {e}")));
    let started = Instant::now();
    let purchases = parse(&text);
    let parse_time = started.elapsed();
    let end = end.unwrap_or_else(|| purchases.iter().map(|p| p.day).max().unwrap());

    let (mut summary_times, mut fit_times) = (Vec::new(), Vec::new());
    let mut result = None;
    for _ in 0..repeat.max(1) {
        let started = Instant::now();
        let customers: Vec<CustomerSummary> = summarize(purchases.clone(), end, DAYS_PER_WEEK)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        summary_times.push(started.elapsed());
        let started = Instant::now();
        let bg = BgNbdParams::fit(&customers).unwrap_or_else(|e| fail(&format!("BG/NBD: {e}")));
        let gg = GammaGammaParams::fit(&customers)
            .unwrap_or_else(|e| fail(&format!("Gamma-Gamma: {e}")));
        fit_times.push(started.elapsed());
        result = Some((customers.len(), bg, gg));
    }
    let (customers, bg, gg) = result.unwrap();
    let (b, d) = (bg.params, &bg.diagnostics);
    println!(
        "customers {customers} (purchases {}, calibration end {end})",
        purchases.len()
    );
    println!(
        "bg/nbd r {:.6} alpha {:.6} a {:.6} b {:.6} log-likelihood {:.4} iterations {} converged {} gradient {:.1e} ({})",
        b.r,
        b.alpha,
        b.a,
        b.b,
        d.log_likelihood,
        d.iterations,
        d.converged,
        d.gradient_norm,
        d.stop_reason
    );
    let (g, d) = (gg.params, &gg.diagnostics);
    println!(
        "gamma-gamma p {:.6} q {:.6} v {:.6} log-likelihood {:.4} iterations {} converged {} gradient {:.1e} ({}) customers {}",
        g.p,
        g.q,
        g.v,
        d.log_likelihood,
        d.iterations,
        d.converged,
        d.gradient_norm,
        d.stop_reason,
        d.customers
    );
    println!("parse (once) {:.2} ms", ms(parse_time));
    println!(
        "summaries best {:.2} ms median {:.2} ms",
        ms(best(&summary_times)),
        ms(median(&mut summary_times))
    );
    println!(
        "fit best {:.2} ms median {:.2} ms (runs {})",
        ms(best(&fit_times)),
        ms(median(&mut fit_times)),
        fit_times.len()
    );
}

/// The purchases of a CDNOW file; lines that do not start with a number (the header) are
/// skipped.
fn parse(text: &str) -> Vec<Purchase<u32>> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let customer: u32 = fields.first()?.parse().ok()?;
            // The sample has the sample id in the second column.
            let (day, value) = match fields.len() {
                4 => (fields[1], fields[3]),
                5 => (fields[2], fields[4]),
                n => fail(&format!("{n} fields in {line:?}")),
            };
            Some(Purchase {
                customer,
                day: parse_day(day),
                value: value
                    .parse()
                    .unwrap_or_else(|_| fail(&format!("bad value in {line:?}"))),
            })
        })
        .collect()
}

fn parse_day(yyyymmdd: &str) -> Date {
    let n: u32 = yyyymmdd
        .parse()
        .unwrap_or_else(|_| fail(&format!("bad date {yyyymmdd}")));
    let month = Month::try_from((n / 100 % 100) as u8).unwrap_or_else(|_| fail("bad month"));
    Date::from_calendar_date((n / 10_000) as i32, month, (n % 100) as u8)
        .unwrap_or_else(|_| fail(&format!("bad date {yyyymmdd}")))
}

fn best(times: &[Duration]) -> Duration {
    times.iter().copied().min().unwrap_or_default()
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fail(message: &str) -> ! {
    println!("fit_cdnow: {message}");
    std::process::exit(2);
}
