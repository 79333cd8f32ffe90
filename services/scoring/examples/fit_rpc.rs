//! Times `FitCustomerValueModel` end to end on a CDNOW purchase file: a scoring service with a
//! SQLite model store, its population streamed over gRPC by a stand-in profile service that
//! holds each customer's revenue by purchase day (as the real one's accumulator does), the fit,
//! the RFM boundaries, the stored model and its activation.
//!
//! ```text
//! cargo run -p tessera-scoring --release --example fit_rpc -- FILE --end YYYY-MM-DD [--repeat N]
//! ```
//!
//! FILE is `CDNOW_sample.txt` (in `services/scoring/tests/data`) or `CDNOW_master.txt`; purchases
//! after `--end` are left out by the profile stream, as `as_of` asks. Prints the fitted
//! parameters and the best and median times of N calls (default 5).
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use tessera_proto::convert::to_timestamp;
use tessera_proto::profile::v1 as profile;
use tessera_proto::profile::v1::profile_pipeline_service_server::{
    ProfilePipelineService, ProfilePipelineServiceServer,
};
use tessera_proto::scoring::v1 as pb;
use tessera_proto::scoring::v1::scoring_service_client::ScoringServiceClient;
use tessera_scoring::{MIGRATIONS, SCHEMA, Scoring, ScoringSettings};
use tessera_server::GrpcServices;
use tessera_store::{Database, DbSettings};
use tessera_testkit::{GrpcTestServer, TestSqlite};
use time::{Date, Month};
use tonic::{Request, Response, Status};

/// Cents by purchase day (days since 1970-01-01), per customer.
#[derive(Debug, Clone)]
struct Profiles(Arc<Vec<BTreeMap<i64, i64>>>);

type Pages =
    Pin<Box<dyn Stream<Item = Result<profile::StreamPurchaseHistoriesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ProfilePipelineService for Profiles {
    type StreamPurchaseHistoriesStream = Pages;

    async fn apply_events(
        &self,
        _: Request<profile::ApplyEventsRequest>,
    ) -> Result<Response<profile::ApplyEventsResponse>, Status> {
        Err(Status::unimplemented("benchmark"))
    }

    async fn split_profiles(
        &self,
        _: Request<profile::SplitProfilesRequest>,
    ) -> Result<Response<profile::SplitProfilesResponse>, Status> {
        Err(Status::unimplemented("benchmark"))
    }

    async fn stream_purchase_histories(
        &self,
        request: Request<profile::StreamPurchaseHistoriesRequest>,
    ) -> Result<Response<Pages>, Status> {
        let request = request.into_inner();
        let last = request
            .as_of
            .map_or(i64::MAX, |t| t.seconds.div_euclid(86_400));
        let page = usize::try_from(request.page_size).unwrap_or(500).max(1);
        let customers = self.0.clone();
        let pages: Vec<Result<_, Status>> = customers
            .chunks(page)
            .enumerate()
            .map(|(n, chunk)| {
                let profiles = chunk
                    .iter()
                    .enumerate()
                    .filter_map(|(i, days)| {
                        let days: Vec<(i64, i64)> =
                            days.range(..=last).map(|(d, c)| (*d, *c)).collect();
                        let (first, first_cents) = *days.first()?;
                        let repeat: i64 = days.iter().skip(1).map(|(_, c)| c).sum();
                        #[allow(clippy::cast_precision_loss)]
                        Some(profile::ProfilePurchaseHistory {
                            profile_id: format!("c{:06}", n * page + i),
                            purchases: Some(pb::PurchaseHistory {
                                first_day: first,
                                last_day: days.last()?.0,
                                days: days.len() as i64,
                                repeat_revenue: repeat as f64 / 100.0,
                                revenue: (repeat + first_cents) as f64 / 100.0,
                            }),
                        })
                    })
                    .collect();
                Ok(profile::StreamPurchaseHistoriesResponse { profiles })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(pages))))
    }
}

fn fail(message: &str) -> ! {
    println!("fit_rpc: {message}");
    std::process::exit(2);
}

fn day(yyyymmdd: &str) -> Date {
    let n: u32 = yyyymmdd.parse().unwrap_or_else(|_| fail("bad date"));
    let month = u8::try_from(n / 100 % 100)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .unwrap_or_else(|| fail("bad month"));
    let year = i32::try_from(n / 10_000).unwrap_or_else(|_| fail("bad year"));
    let dom = u8::try_from(n % 100).unwrap_or_else(|_| fail("bad day"));
    Date::from_calendar_date(year, month, dom).unwrap_or_else(|_| fail("bad date"))
}

fn read(path: &str) -> Vec<BTreeMap<i64, i64>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| fail(&format!("{path}: {e}")));
    let epoch = Date::from_calendar_date(1970, Month::January, 1).unwrap_or_else(|_| fail("epoch"));
    let mut customers: BTreeMap<String, BTreeMap<i64, i64>> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // The master file: customer date cds dollars; the sample: customer id date cds dollars.
        let date = match f.len() {
            4 => f[1],
            5 => f[2],
            _ => continue,
        };
        if !date.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let dollars: f64 = f[f.len() - 1]
            .parse()
            .unwrap_or_else(|_| fail("bad amount"));
        #[allow(clippy::cast_possible_truncation)]
        let cents = (dollars * 100.0).round() as i64;
        *customers
            .entry(f[0].to_owned())
            .or_default()
            .entry((day(date) - epoch).whole_days())
            .or_default() += cents;
    }
    customers.into_values().collect()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        fail("usage: fit_rpc FILE --end YYYY-MM-DD [--repeat N]");
    };
    let (mut end, mut repeat) = (None, 5usize);
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().unwrap_or_else(|| fail("a flag needs a value"));
        match flag.as_str() {
            "--end" => end = Some(day(&value.replace('-', ""))),
            "--repeat" => repeat = value.parse().unwrap_or_else(|_| fail("--repeat: a number")),
            other => fail(&format!("unknown flag {other}")),
        }
    }
    let end = end.unwrap_or_else(|| fail("--end is required"));
    let customers = read(path);
    println!("{} customers in {path}, as of {end}", customers.len());

    let mut services = GrpcServices::default();
    services.add(ProfilePipelineServiceServer::new(Profiles(Arc::new(
        customers,
    ))));
    let profiles = GrpcTestServer::start(services).await;
    let dir = TestSqlite::new();
    let db = Database::connect(&dir.url("scoring.db"), SCHEMA, &DbSettings::default())
        .await
        .unwrap_or_else(|e| fail(&e.to_string()));
    db.migrate(MIGRATIONS)
        .await
        .unwrap_or_else(|e| fail(&e.to_string()));
    let settings: ScoringSettings =
        toml::from_str("[fitting]\nfit_interval_hours = 0\nmin_population = 2\n")
            .unwrap_or_else(|e| fail(&e.to_string()));
    let scoring = Scoring::from_settings(&settings)
        .unwrap_or_else(|e| fail(&e.to_string()))
        .with_store(db, profiles.lazy_channel());
    let mut services = GrpcServices::default();
    scoring.register(&mut services);
    let server = GrpcTestServer::start(services).await;
    let mut client = ScoringServiceClient::new(server.channel().await);

    let as_of = to_timestamp(end.midnight().assume_utc());
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let started = Instant::now();
        let model = client
            .fit_customer_value_model(pb::FitCustomerValueModelRequest { as_of: Some(as_of) })
            .await
            .unwrap_or_else(|e| fail(&e.to_string()))
            .into_inner()
            .model;
        times.push(started.elapsed());
        last = model;
    }
    let model = last.unwrap_or_else(|| fail("no model"));
    let (bg, gg) = (
        model.bg_nbd.unwrap_or_default(),
        model.gamma_gamma.unwrap_or_default(),
    );
    println!(
        "model {} {:?}: population {}, bg/nbd r {:.6} alpha {:.6} a {:.6} b {:.6}, \
         gamma-gamma p {:.6} q {:.6} v {:.6}",
        model.label,
        model.status(),
        model.population,
        bg.r,
        bg.alpha,
        bg.a,
        bg.b,
        gg.p,
        gg.q,
        gg.v
    );
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "FitCustomerValueModel best {:.2} ms median {:.2} ms (runs {})",
        ms(times[0]),
        ms(times[times.len() / 2]),
        times.len()
    );
}
