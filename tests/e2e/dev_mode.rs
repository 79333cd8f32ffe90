//! `tessera dev`: all four services in one process on SQLite.

use std::time::Duration;

use tessera_tests::TesseraBuilder;
use tessera_tests::events::wait_for;

use crate::flow::skeleton_flow;

#[tokio::test(flavor = "multi_thread")]
async fn dev_mode_runs_the_pipeline_and_keeps_data_across_restarts() {
    let data = tempfile::tempdir().unwrap();
    let dev = TesseraBuilder::new("dev").args(["--data-dir", data.path().to_str().unwrap()]);
    let mut tessera = dev.clone().start().await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();
    let token = tessera
        .access_token
        .clone()
        .expect("a printed access token");
    skeleton_flow(&channel, &key, &channel, "dev").await;
    assert!(tessera.terminate().await, "graceful shutdown on SIGTERM");

    let tessera = dev.start().await;
    assert_eq!(
        tessera.access_token.as_deref(),
        Some(token.as_str()),
        "a restart prints the token of the first start"
    );
    let channel = tessera.channel().await;
    let profile = wait_for(
        &channel,
        "user_id",
        "user-dev",
        Duration::from_secs(10),
        |_| true,
    )
    .await;
    assert_eq!(profile.event_count, 3, "data survives a restart");
    assert!(profile.scores.contains_key("engagement"));
}
