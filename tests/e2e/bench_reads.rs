//! `tessera bench-reads --cold` against the four services on Postgres and Redis: it deletes the
//! seeded profiles' cache entries and reads each profile once, so every read is a cache miss
//! (the services run with the near cache off), and the misses put the entries back.

use std::process::Stdio;

use tessera_testkit::{TestDb, redis_prefix, redis_url};
use tessera_tests::{E2E_TOKEN, tessera_bin};
use tokio::process::Command;

use crate::separate_processes::Deployment;

const PROFILES: u64 = 40;

#[tokio::test(flavor = "multi_thread")]
async fn cold_reads_miss_the_cache_once_per_profile() {
    let db = TestDb::new().await;
    let prefix = redis_prefix();
    let d =
        Deployment::start_with(&db, &prefix, |b| b.env("TESSERA__CACHE__ENABLED", "false")).await;
    let out = Command::new(tessera_bin())
        .arg("bench-reads")
        .args(["--target", &d.ingestion.grpc_url()])
        .args(["--read-target", &d.profile.grpc_url()])
        .args(["--write-key", &d.write_key, "--token", E2E_TOKEN])
        .args(["--profiles", &PROFILES.to_string()])
        .args([
            "--concurrency",
            "4",
            "--connections",
            "1",
            "--duration",
            "120",
        ])
        .args(["--cold", "--json"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("REDIS_URL", redis_url())
        .env("TESSERA__CACHE_PREFIX", &prefix)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run tessera bench-reads");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("cold reads (cache misses)"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON report");
    assert_eq!(report["cold"], true, "{report}");
    // Every seeded profile had an entry (put when it was written), and each was deleted.
    assert_eq!(
        report["evicted"].as_u64(),
        Some(PROFILES),
        "{report}\n{stderr}"
    );
    // Each profile read exactly once, without errors, and the run ended when all were read.
    assert_eq!(report["reads"].as_u64(), Some(PROFILES), "{report}");
    assert_eq!(report["errors"].as_u64(), Some(0), "{report}");
    assert!(report["seconds"].as_f64().unwrap() < 120.0, "{report}");
    // The misses put the entries back.
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys = tessera_tests::keys_matching(&mut redis, &format!("{prefix}profile:*")).await;
    assert_eq!(keys.len() as u64, PROFILES, "{keys:?}");
}
