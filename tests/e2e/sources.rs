//! Sources end to end: `tessera dev` prints the key of its source `default`, `tessera sources`
//! manages sources of the running process, and every change shows in what IngestEvents accepts.

use std::process::Output;

use tessera_proto::ingestion::v1::EventStatus;
use tessera_tests::Channel;
use tessera_tests::events::{send, track};
use tessera_tests::{Tessera, TesseraBuilder, key_in, sources_command};

/// Runs `tessera sources ARGS` against `tessera`, and checks it succeeded.
async fn sources_ok(tessera: &Tessera, args: &[&str]) -> String {
    let out = sources_command(&tessera.grpc_url(), args).await;
    assert!(out.status.success(), "tessera sources {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 output")
}

async fn sources_failing(tessera: &Tessera, args: &[&str]) -> Output {
    let out = sources_command(&tessera.grpc_url(), args).await;
    assert!(!out.status.success(), "tessera sources {args:?} succeeded");
    out
}

/// Whether one event sent with `key` is accepted; panics on anything but acceptance or
/// UNAUTHENTICATED.
async fn accepted(channel: &Channel, key: &str, message_id: &str) -> bool {
    match send(
        channel,
        key,
        vec![track(message_id, "u1", "", "E", serde_json::json!({}))],
    )
    .await
    {
        Ok(statuses) => {
            assert_eq!(statuses, vec![EventStatus::Accepted as i32]);
            true
        }
        Err(status) if status.code() == tonic::Code::Unauthenticated => false,
        Err(status) => panic!("unexpected {status:?}"),
    }
}

/// The table row of `name` in the output of `tessera sources list`.
fn row<'a>(table: &'a str, name: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row {name} in\n{table}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_creates_lists_disables_and_rotates_sources_of_a_running_dev() {
    let data = tempfile::tempdir().unwrap();
    let dev = TesseraBuilder::new("dev").args(["--data-dir", data.path().to_str().unwrap()]);
    let tessera = dev.clone().start().await;
    let channel = tessera.channel().await;
    let default_key = tessera.dev_write_key().to_owned();
    assert!(default_key.starts_with("tsk_"), "{default_key}");
    assert!(accepted(&channel, &default_key, "d1").await);
    assert!(!accepted(&channel, "tsk_not-a-key", "d2").await);

    let out = sources_ok(&tessera, &["create", "web", "--rate-limit", "1000"]).await;
    let web_key = key_in(&out, "web").expect("create prints the key");
    assert!(web_key.starts_with("tsk_") && web_key != default_key);
    assert!(accepted(&channel, &web_key, "w1").await);

    let table = sources_ok(&tessera, &["list"]).await;
    assert!(table.starts_with("NAME"), "{table}");
    row(&table, "default");
    let web = row(&table, "web");
    assert!(web.contains("enabled") && web.contains("1000/s"), "{web}");
    assert!(web.contains(&web_key[..10]), "the key prefix shows: {web}");
    assert!(
        !table.contains(&web_key) && !table.contains(&default_key),
        "keys are never listed"
    );

    let taken = sources_failing(&tessera, &["create", "web"]).await;
    let stderr = String::from_utf8_lossy(&taken.stderr);
    assert!(stderr.contains("exists already"), "{stderr}");

    sources_ok(&tessera, &["disable", "web"]).await;
    assert!(!accepted(&channel, &web_key, "w2").await, "disabled");
    assert!(row(&sources_ok(&tessera, &["list"]).await, "web").contains("disabled"));
    sources_ok(&tessera, &["enable", "web"]).await;
    assert!(accepted(&channel, &web_key, "w2").await, "enabled again");

    let out = sources_ok(&tessera, &["rotate-key", "web"]).await;
    let rotated = key_in(&out, "web").expect("rotate-key prints the key");
    assert_ne!(rotated, web_key);
    assert!(!accepted(&channel, &web_key, "w3").await, "the old key");
    assert!(accepted(&channel, &rotated, "w3").await, "the new key");

    sources_ok(
        &tessera,
        &["update", "web", "--no-rate-limit", "--plan-mode", "warn"],
    )
    .await;
    let web = row(&sources_ok(&tessera, &["get", "web"]).await, "web").to_owned();
    assert!(web.contains("warn") && !web.contains("/s"), "{web}");
    sources_failing(&tessera, &["disable", "ghost"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_prints_the_key_once_and_takes_a_fixed_one() {
    let data = tempfile::tempdir().unwrap();
    let dev = TesseraBuilder::new("dev").args(["--data-dir", data.path().to_str().unwrap()]);
    let mut first = dev.clone().start().await;
    let printed = first.dev_write_key().to_owned();
    assert!(first.terminate().await);

    // A restart keeps the source and its key, and does not print the key again.
    let mut second = dev.clone().start().await;
    assert_eq!(second.write_key, None, "the key is shown once");
    assert!(accepted(&second.channel().await, &printed, "a1").await);
    assert!(second.terminate().await);

    // --write-key re-keys `default` to the operator's key.
    let mut fixed = dev
        .clone()
        .args(["--write-key", "my-fixed-dev-key"])
        .start()
        .await;
    assert_eq!(fixed.dev_write_key(), "my-fixed-dev-key");
    let channel = fixed.channel().await;
    assert!(accepted(&channel, "my-fixed-dev-key", "a2").await);
    assert!(!accepted(&channel, &printed, "a3").await, "the old key");
    assert!(fixed.terminate().await);

    // So does TESSERA_WRITE_KEY, here on a fresh data directory: created with it.
    let fresh = tempfile::tempdir().unwrap();
    let from_env = TesseraBuilder::new("dev")
        .args(["--data-dir", fresh.path().to_str().unwrap()])
        .env("TESSERA_WRITE_KEY", "key-from-the-env")
        .start()
        .await;
    assert_eq!(from_env.dev_write_key(), "key-from-the-env");
    assert!(accepted(&from_env.channel().await, "key-from-the-env", "e1").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn production_services_do_not_create_sources() {
    let db = tessera_testkit::TestDb::new().await;
    let ingestion = TesseraBuilder::new("ingestion")
        .env("DATABASE_URL", db.url())
        .start()
        .await;
    assert_eq!(ingestion.write_key, None, "no key printed");
    let table = sources_ok(&ingestion, &["list"]).await;
    assert_eq!(table.lines().count(), 1, "only the header: {table}");
    let channel = ingestion.channel().await;
    assert!(!accepted(&channel, "tsk_anything", "p1").await);
    let key = ingestion.create_source("made-by-hand").await;
    assert!(accepted(&channel, &key, "p1").await);
}
