//! `/metrics` after a real pipeline run in `tessera dev`: what the dashboard
//! (k8s/grafana/tessera-dashboard.json) and the runbooks read is there, durations are
//! histograms, HTTP routes are templates, and the database pools are sampled.

use std::time::Duration;

use tessera_tests::TesseraBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::flow::skeleton_flow;

async fn scrape(http_addr: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: {http_addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_run_fills_the_metrics_the_dashboard_reads() {
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();
    skeleton_flow(&channel, &key, &channel, "metrics").await;
    // One HTTP call, so a route is counted; and the pools' first samples.
    let _ = scrape(&tessera.http_addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let expected = [
        // rate, errors and duration per RPC, as histograms
        "tessera_grpc_requests_total{",
        "tessera_grpc_request_duration_seconds_bucket{",
        "method=\"/tessera.scoring.v1.ScoringService/ScoreProfiles\"",
        // per HTTP route, by template
        "tessera_http_requests_total{method=\"GET\",route=\"/metrics\",status=\"200\"}",
        "tessera_http_request_duration_seconds_bucket{",
        // the pipeline
        "tessera_ingestion_events_accepted_total",
        "tessera_ingestion_events_delivered_total",
        "tessera_ingestion_backlog_events",
        "tessera_ingestion_delivery_lag_seconds",
        "tessera_ingestion_delivery_stage_seconds_bucket{",
        // identity and profiles
        "tessera_identity_merges_total",
        "tessera_profile_events_applied_total",
        // where a delivery batch's apply goes
        "tessera_profile_apply_stage_seconds_bucket{stage=\"transaction\"",
        "tessera_profile_apply_stage_seconds_bucket{stage=\"score\"",
        "tessera_profile_apply_stage_seconds_bucket{stage=\"cache\"",
        "tessera_profile_apply_stage_seconds_bucket{stage=\"match\"",
        // the database pools of every service
        "tessera_db_pool_connections{schema=\"identity\",state=\"in_use\"}",
        "tessera_db_pool_connections{schema=\"profile\",state=\"idle\"}",
        "tessera_db_pool_max_connections{schema=\"ingestion\"}",
        "tessera_db_pool_max_connections{schema=\"scoring\"}",
    ];
    // Gauges are sampled (the backlog every second, the pools every 5 s): wait for them.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = scrape(&tessera.http_addr).await;
        let missing: Vec<&str> = expected
            .iter()
            .copied()
            .filter(|m| !metrics.contains(m))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "missing {missing:?} in\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
