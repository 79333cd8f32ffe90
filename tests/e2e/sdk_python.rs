//! Segment's own Python library (`segment-analytics-python` from PyPI, unmodified) drives
//! `tessera dev` through the HTTP tracking API; every call shows in the resulting profile.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tessera_tests::TesseraBuilder;
use tessera_tests::events::{has_identifier, trait_value, wait_for};

const WRITE_KEY: &str = "e2e-python-sdk-key";

/// The calls tests/sdk/segment_python.py makes per user.
const CALLS: i64 = 6;

fn python(root: &Path) -> String {
    let venv = root.join(".venv/bin/python");
    let python = std::env::var("TESSERA_PYTHON")
        .ok()
        .or_else(|| venv.exists().then(|| venv.display().to_string()))
        .unwrap_or_else(|| {
            panic!(
                "TESSERA_PYTHON is not set: it must name a Python with \
                 tests/python/requirements.txt installed; scripts/test creates one in .venv"
            )
        });
    let found = Command::new(&python)
        .args(["-c", "import segment.analytics"])
        .status()
        .expect("run python");
    assert!(
        found.success(),
        "{python} has no segment-analytics-python: pip install -r tests/python/requirements.txt"
    );
    python
}

#[tokio::test(flavor = "multi_thread")]
async fn the_segment_python_library_reaches_the_profile() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = python(&root);
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .args(["--write-key", WRITE_KEY])
        .start()
        .await;
    let channel = tessera.channel().await;
    let host = format!("http://{}", tessera.http_addr);

    // Once as the library is configured by default, once with its gzip option.
    for gzip in [false, true] {
        let user = format!("py-sdk-user-{gzip}");
        let anonymous = format!("py-sdk-anon-{gzip}");
        let mut command = Command::new(&python);
        command
            .arg(root.join("tests/sdk/segment_python.py"))
            .args(["--host", &host, "--write-key", WRITE_KEY])
            .args(["--user-id", &user, "--anonymous-id", &anonymous]);
        if gzip {
            command.arg("--gzip");
        }
        let status = tokio::task::spawn_blocking(move || command.status().expect("run python"))
            .await
            .unwrap();
        assert!(status.success(), "the Segment library reported errors");

        let profile = wait_for(&channel, "user_id", &user, Duration::from_secs(30), |p| {
            p.event_count >= CALLS && has_identifier(p, "anonymous_id", &anonymous)
        })
        .await;
        assert_eq!(profile.event_count, CALLS, "each call once");
        // identify: its traits and the email identifier.
        assert_eq!(
            trait_value(&profile, "plan"),
            Some(serde_json::json!("pro"))
        );
        assert!(has_identifier(
            &profile,
            "email",
            &format!("{user}@example.com")
        ));
        // Every other call carried its own context.traits value: each was applied (an
        // identify's own traits win over its context.traits).
        for call in ["track", "page", "screen", "group"] {
            assert_eq!(
                trait_value(&profile, &format!("via_{call}")),
                Some(serde_json::json!(true)),
                "the {call} call is not in the profile: {profile:?}"
            );
        }
        // alias: the previous id now names the same profile.
        let by_anonymous = wait_for(
            &channel,
            "anonymous_id",
            &anonymous,
            Duration::from_secs(10),
            |_| true,
        )
        .await;
        assert_eq!(by_anonymous.profile_id, profile.profile_id);
    }
}
