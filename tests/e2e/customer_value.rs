//! Customer-value models end to end, in `tessera dev`: the CDNOW sample's 6,919 purchases sent
//! as `Order Completed` events through ingestion, folded by the profile service into each
//! person's purchases by day, streamed to the scoring service by `FitCustomerValueModel`, fitted
//! and stored (SQLite): the parameters are the paper's. A later purchase rescores its profile
//! with the fitted model (its version on the scores) and an RFM segment.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use tessera_proto::convert::to_timestamp;
use tessera_proto::profile::v1 as profile;
use tessera_proto::profile::v1::profile_pipeline_service_client::ProfilePipelineServiceClient;
use tessera_proto::scoring::v1 as pb;
use tessera_proto::scoring::v1::scoring_service_client::ScoringServiceClient;
use tessera_tests::Channel;
use tessera_tests::TesseraBuilder;
use tessera_tests::events::{send, track, wait_for};
use time::macros::{datetime, format_description};
use time::{Date, OffsetDateTime};

/// `(customer, day, dollars)` of every line of the CDNOW sample.
fn cdnow() -> Vec<(u32, Date, f64)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../services/scoring/tests/data/CDNOW_sample.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    let format = format_description!("[year][month][day]");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (
                f[1].parse().unwrap(),
                Date::parse(f[2], &format).unwrap(),
                f[4].parse().unwrap(),
            )
        })
        .collect()
}

/// Profiles with purchases and their purchase days, as the profile service streams them.
async fn population(channel: &Channel) -> (usize, i64) {
    let mut stream = ProfilePipelineServiceClient::new(channel.clone())
        .stream_purchase_histories(profile::StreamPurchaseHistoriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let (mut profiles, mut days) = (0, 0);
    while let Some(page) = stream.message().await.unwrap() {
        profiles += page.profiles.len();
        days += page
            .profiles
            .iter()
            .map(|p| p.purchases.as_ref().unwrap().days)
            .sum::<i64>();
    }
    (profiles, days)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fit_over_purchases_sent_as_events_reproduces_the_paper() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("tessera.toml");
    std::fs::write(
        &config,
        "[scoring.fitting]\nfit_interval_hours = 0\nmin_population = 100\npoll_interval_ms = 200\n",
    )
    .unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args([
            "--data-dir",
            data.path().join("data").to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ])
        .start()
        .await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();

    let purchases = cdnow();
    let purchase_days: BTreeSet<(u32, Date)> = purchases.iter().map(|(c, d, _)| (*c, *d)).collect();
    let events: Vec<_> = purchases
        .iter()
        .enumerate()
        .map(|(i, (customer, day, dollars))| {
            let mut event = track(
                &format!("cdnow-{i}"),
                &format!("cdnow-{customer}"),
                "",
                "Order Completed",
                serde_json::json!({ "revenue": dollars }),
            );
            event.timestamp = Some(to_timestamp(
                day.with_time(time::macros::time!(12:00)).assume_utc(),
            ));
            event
        })
        .collect();
    for chunk in events.chunks(1_000) {
        send(&channel, &key, chunk.to_vec()).await.unwrap();
    }
    let customers: BTreeMap<u32, ()> = purchases.iter().map(|(c, _, _)| (*c, ())).collect();
    let want = (customers.len(), purchase_days.len() as i64);
    assert_eq!(want, (2_357, 6_696));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let got = population(&channel).await;
        if got == want {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the profiles hold {got:?} of {want:?} (profiles, purchase days)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut scoring = ScoringServiceClient::new(channel.clone());
    let model = scoring
        .fit_customer_value_model(pb::FitCustomerValueModelRequest {
            as_of: Some(to_timestamp(datetime!(1997-09-30 00:00 UTC))),
        })
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    assert_eq!(
        model.status(),
        pb::CustomerValueModelStatus::Active,
        "{model:?}"
    );
    assert_eq!(model.population, 2_357);
    let bg = model.bg_nbd.unwrap();
    let ll = model.bg_nbd_diagnostics.as_ref().unwrap().log_likelihood;
    assert_eq!(
        [
            format!("{:.3}", bg.r),
            format!("{:.3}", bg.alpha),
            format!("{:.3}", bg.a),
            format!("{:.3}", bg.b),
            format!("{ll:.1}"),
        ],
        ["0.243", "4.414", "0.793", "2.426", "-9582.4"]
    );
    let gg = model.gamma_gamma.unwrap();
    assert_eq!(
        [
            format!("{:.2}", gg.p),
            format!("{:.2}", gg.q),
            format!("{:.2}", gg.v)
        ],
        ["6.25", "3.74", "15.44"]
    );
    assert_eq!(model.gamma_gamma_diagnostics.unwrap().customers, 946);

    // A new purchase rescores customer 1 with the fitted model and its RFM boundaries.
    let now = OffsetDateTime::now_utc();
    let mut order = track(
        "cdnow-new-order",
        "cdnow-1",
        "",
        "Order Completed",
        serde_json::json!({ "revenue": 25.0 }),
    );
    order.timestamp = Some(to_timestamp(now));
    send(&channel, &key, vec![order]).await.unwrap();
    let label = model.label.clone();
    let profile = wait_for(
        &channel,
        "user_id",
        "cdnow-1",
        Duration::from_secs(20),
        |p| {
            p.scores
                .get("churn_risk")
                .is_some_and(|s| s.model_version.ends_with(&format!("@{label}")))
        },
    )
    .await;
    let rfm = &profile.scores["rfm"];
    assert_eq!(rfm.model_version, format!("rfm-v1@{label}"));
    let recency = rfm
        .factors
        .iter()
        .find(|f| f.name == "recency_score")
        .unwrap();
    assert_eq!(recency.value, 5.0, "bought today: the most recent quintile");
    let segment = rfm.factors.iter().find(|f| f.name == "segment").unwrap();
    assert!(segment.description.starts_with("segment: "), "{segment:?}");
    assert!(profile.scores["predicted_value"].value > 0.0);
}
