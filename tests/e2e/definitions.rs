//! Computed traits and audiences declared at run time in `tessera dev`, with the CLI
//! (`tessera definitions`): a profile stored before enters a new audience and gets a new computed
//! trait through the background recompute, the next event is evaluated at once, a config name is
//! refused with its reason, and deleting the audience empties it.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tessera_proto::convert::value_to_json;
use tessera_tests::events::{identify, send, track, wait_for};
use tessera_tests::{TesseraBuilder, tessera_bin};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[[profile.computed_traits]]
name = "orders"
kind = "count"
events = ["Order Completed"]
"#;

const DEFINITIONS: &str = r#"
[[computed_traits]]
name = "spent"
kind = "sum"
events = ["Order Completed"]
property = "total"

[[audiences]]
name = "pros"
condition = { trait = { name = "plan", op = "eq", value = "pro" } }
"#;

/// Runs `tessera definitions ARGS --target TARGET` to its end: exit code, stdout, stderr.
async fn definitions(target: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tessera_bin())
        .arg("definitions")
        .args(args)
        .args(["--target", target])
        .env_clear()
        .env("TESSERA_ACCESS_TOKEN", tessera_tests::E2E_TOKEN)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run tessera definitions");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn computed(profile: &tessera_proto::profile::v1::Profile, name: &str) -> serde_json::Value {
    profile
        .computed_traits
        .get(name)
        .and_then(|t| t.value.as_ref())
        .map_or(serde_json::Value::Null, value_to_json)
}

#[tokio::test(flavor = "multi_thread")]
async fn definitions_declared_with_the_cli_apply_to_stored_and_new_profiles() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("tessera.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let file = data.path().join("definitions.toml");
    std::fs::write(&file, DEFINITIONS).unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args([
            "--data-dir",
            data.path().to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ])
        .start()
        .await;
    let channel = tessera.channel().await;
    let key = tessera.dev_write_key().to_owned();
    let target = tessera.grpc_url();

    send(
        &channel,
        &key,
        vec![
            identify("m1", "u1", "", json!({"plan": "pro"})),
            track("m2", "u1", "", "Order Completed", json!({"total": 30})),
        ],
    )
    .await
    .unwrap();
    wait_for(&channel, "user_id", "u1", WAIT, |p| {
        computed(p, "orders") == json!(1)
    })
    .await;

    let (code, out, err) = definitions(&target, &["create", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("created audience pros"), "{out}");
    let (code, out, _) = definitions(&target, &["list"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("orders") && out.contains("config"), "{out}");
    assert!(out.contains("pros") && out.contains("api"), "{out}");

    // The profile stored before enters the audience and gets the new trait (the recompute).
    wait_for(&channel, "user_id", "u1", WAIT, |p| {
        p.audiences == ["pros"] && computed(p, "spent") == json!(30)
    })
    .await;
    // A new profile is evaluated on its event.
    send(
        &channel,
        &key,
        vec![identify("m3", "u2", "", json!({"plan": "pro"}))],
    )
    .await
    .unwrap();
    wait_for(&channel, "user_id", "u2", WAIT, |p| p.audiences == ["pros"]).await;

    // Config's definitions change only in config.
    let (code, _, err) = definitions(&target, &["delete", "computed-trait", "orders"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("declared in config"), "{err}");
    let (code, _, err) = definitions(
        &target,
        &["delete", "audience", "pros", "--expected-version", "9"],
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("version 1, not 9"), "{err}");

    let (code, out, err) = definitions(&target, &["delete", "audience", "pros"]).await;
    assert_eq!(code, 0, "{out}{err}");
    for user in ["u1", "u2"] {
        wait_for(&channel, "user_id", user, WAIT, |p| p.audiences.is_empty()).await;
    }
    let (code, out, _) = definitions(&target, &["list"]).await;
    assert_eq!(code, 0);
    assert!(!out.contains("pros"), "{out}");
}
