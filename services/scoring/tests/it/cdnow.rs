//! The acceptance test of the customer-value models: fitted on the CDNOW sample, Tessera must
//! reproduce the published estimates to their published precision.
//!
//! - BG/NBD: Fader, Hardie & Lee (2005), "Counting Your Customers the Easy Way", section 5:
//!   r = 0.243, α = 4.414, a = 0.793, b = 2.426, log-likelihood −9582.4; and the customer with
//!   x = 2, t_x = 30.43, T = 38.86 expects 1.226 purchases in the next 39 weeks.
//! - Gamma-Gamma: Fader & Hardie, "The Gamma-Gamma Model of Monetary Value" (note 025), the same
//!   calibration data: p = 6.25, q = 3.74, v = 15.44.
//!
//! Setup, as the paper's and the `lifetimes` package's
//! `summary_data_from_transaction_data(freq="D")` then weeks = days / 7: the 39-week calibration
//! period ends on 1997-09-30 (inclusive); purchases of one customer on one day are one
//! transaction (values summed); x counts the purchase days after the first; spend is the mean
//! value of those repeat transactions, the first excluded, computed from the raw transactions.
//! The Gamma-Gamma fit uses the 946 customers with repeat purchases in the calibration period.
//! Note 025's numbers come from exactly this (p = 6.2496, q = 3.7442, v = 15.4435), not from the
//! `lifetimes` documentation's example, which fits the summary file with spend already rounded to
//! cents and gets v = 15.45.

use std::fs;
use std::path::Path;

use tessera_scoring::clv::summary::{DAYS_PER_WEEK, Purchase, summarize};
use tessera_scoring::clv::{BgNbdParams, CustomerSummary, GammaGammaParams};
use time::macros::date;
use time::{Date, Month};

/// The CDNOW sample's purchases: `original_id sample_id YYYYMMDD cds dollars` per line.
pub(crate) fn cdnow_sample() -> Vec<Purchase<u32>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/CDNOW_sample.txt");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.len(), 5, "bad line {line:?}");
            Purchase {
                customer: fields[1].parse().unwrap(),
                day: parse_day(fields[2]),
                value: fields[4].parse().unwrap(),
            }
        })
        .collect()
}

fn parse_day(yyyymmdd: &str) -> Date {
    let n: u32 = yyyymmdd.parse().unwrap();
    let month = Month::try_from((n / 100 % 100) as u8).unwrap();
    Date::from_calendar_date((n / 10_000) as i32, month, (n % 100) as u8).unwrap()
}

fn calibration() -> Vec<CustomerSummary> {
    summarize(cdnow_sample(), date!(1997 - 09 - 30), DAYS_PER_WEEK)
        .into_iter()
        .map(|(_, summary)| summary)
        .collect()
}

#[test]
fn cdnow_sample_summaries_are_the_papers() {
    let customers = calibration();
    assert_eq!(customers.len(), 2_357);
    // Customer 1 of the paper's summary file: x = 2, t_x = 30.43, T = 38.86, spend 22.35.
    let first = customers[0];
    assert_eq!(first.frequency, 2);
    assert_eq!(format!("{:.2}", first.recency), "30.43");
    assert_eq!(format!("{:.2}", first.age), "38.86");
    assert_eq!(format!("{:.3}", first.monetary_value), "22.345");
    assert_eq!(customers.iter().filter(|c| c.frequency > 0).count(), 946);
    let repeat_purchases: u32 = customers.iter().map(|c| c.frequency).sum();
    assert_eq!(repeat_purchases, 2_457);
}

#[test]
fn bg_nbd_fit_reproduces_fader_hardie_lee_2005() {
    let customers = calibration();
    let fit = BgNbdParams::fit(&customers).unwrap();
    let (p, d) = (fit.params, &fit.diagnostics);
    assert!(d.converged, "{d:?}");
    assert_eq!(d.customers, 2_357);
    let got = [
        format!("{:.3}", p.r),
        format!("{:.3}", p.alpha),
        format!("{:.3}", p.a),
        format!("{:.3}", p.b),
        format!("{:.1}", d.log_likelihood),
    ];
    assert_eq!(
        got,
        ["0.243", "4.414", "0.793", "2.426", "-9582.4"],
        "{p:?} {d:?}"
    );
    assert!((d.mean_log_likelihood * 2_357.0 - d.log_likelihood).abs() < 1e-6);

    let papers_customer = CustomerSummary {
        frequency: 2,
        recency: 30.43,
        age: 38.86,
        monetary_value: 0.0,
    };
    let expected = p.expected_purchases(&papers_customer, 39.0);
    assert_eq!(format!("{expected:.3}"), "1.226", "{expected}");
}

#[test]
fn gamma_gamma_fit_reproduces_note_025() {
    let customers = calibration();
    let fit = GammaGammaParams::fit(&customers).unwrap();
    let (p, d) = (fit.params, &fit.diagnostics);
    assert!(d.converged, "{d:?}");
    assert_eq!(d.customers, 946);
    let got = [
        format!("{:.2}", p.p),
        format!("{:.2}", p.q),
        format!("{:.2}", p.v),
    ];
    assert_eq!(got, ["6.25", "3.74", "15.44"], "{p:?} {d:?}");
}
