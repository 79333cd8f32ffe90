//! `tessera import`: Segment-format JSON lines (plain and gzip) into `tessera dev` over the gRPC
//! stream; killed midway and re-run, every line counts once in its profile, and the rejected
//! lines are listed with their reasons.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tessera_tests::events::{get_by, wait_for};
use tessera_tests::{Tessera, TesseraBuilder, tessera_bin};
use tokio::process::Command;

const USERS: usize = 10;
/// Lines (from 1) that the import must reject, and a word their reason contains.
const BAD: [(usize, &str, &str); 3] = [
    (5, r#"{"type":"track","event":"No one"}"#, "userId"),
    (1_200, "{not json", "JSON"),
    (2_950, r#"{"type":"track","userId":"x"}"#, "event"),
];

/// `lines` Segment messages for users `imp-{tag}-{0..USERS}`, with the rejected lines of [`BAD`]
/// that fall within them; every third line carries its own `messageId`, the others rely on the
/// import's derived ids. Returns the text and the valid events per user.
fn generate(tag: &str, lines: usize) -> (String, HashMap<String, i64>) {
    let mut text = String::new();
    let mut expected = HashMap::new();
    for n in 1..=lines {
        if let Some((_, bad, _)) = BAD.iter().find(|(line, _, _)| *line == n) {
            text.push_str(bad);
        } else {
            let user = format!("imp-{tag}-{}", n % USERS);
            let mut message = serde_json::json!({
                "type": "track",
                "userId": user,
                "event": "Imported",
                "properties": {"line": n},
                "timestamp": "2024-05-01T12:00:00.000Z",
            });
            if n % 3 == 0 {
                message["messageId"] = format!("msg-{tag}-{n}").into();
            }
            text.push_str(&message.to_string());
            *expected.entry(user).or_insert(0) += 1;
        }
        text.push('\n');
    }
    (text, expected)
}

fn import(tessera: &Tessera, file: &Path, batch: &str) -> Command {
    let mut command = Command::new(tessera_bin());
    command
        .arg("import")
        .arg(file)
        .args(["--target", &tessera.grpc_url(), "--batch", batch])
        .env_clear()
        .env("TESSERA_WRITE_KEY", tessera.dev_write_key())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn checkpoint_of(file: &Path) -> PathBuf {
    let mut path = file.as_os_str().to_owned();
    path.push(".tessera-import");
    PathBuf::from(path)
}

/// Checks the summary of a run that covered the whole file and rejected the [`BAD`] lines.
fn assert_rejections(out: &Output, lines: usize) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "rejected lines fail the run: {stdout}"
    );
    assert!(stderr.contains("lines rejected"), "{stderr}");
    let bad: Vec<_> = BAD.iter().filter(|(line, _, _)| *line <= lines).collect();
    assert!(
        stdout.contains(&format!("{} rejected", bad.len())),
        "{stdout}"
    );
    for (line, _, reason) in bad {
        let listed = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("line {line}:")))
            .unwrap_or_else(|| panic!("line {line} is listed as rejected: {stdout}"));
        assert!(listed.contains(reason), "{listed}");
    }
}

/// Every user's profile counts each of its lines exactly once.
async fn assert_counted_once(tessera: &Tessera, expected: &HashMap<String, i64>) {
    let channel = tessera.channel().await;
    for (user, count) in expected {
        wait_for(&channel, "user_id", user, Duration::from_secs(30), |p| {
            p.event_count >= *count
        })
        .await;
    }
    // Let any double delivery land before checking that there was none.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (user, count) in expected {
        let profile = get_by(&channel, "user_id", user).await.unwrap();
        assert_eq!(
            profile.event_count, *count,
            "{user}: each line counted once"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_import_resumes_without_duplicates() {
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let lines = 3_000;
    let (text, expected) = generate("plain", lines);
    let file = data.path().join("events.jsonl");
    std::fs::write(&file, text).unwrap();
    let checkpoint = checkpoint_of(&file);

    // Small stream messages make the first run long enough to be killed midway.
    let mut first = import(&tessera, &file, "1").spawn().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !checkpoint.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the import never checkpointed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.start_kill().unwrap();
    let killed = first.wait().await.unwrap();
    assert!(!killed.success(), "killed midway, not finished");
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&checkpoint).unwrap()).unwrap();
    let resume_at = saved["line"].as_u64().unwrap();
    assert!(
        (1..lines as u64).contains(&resume_at),
        "checkpoint midway: {saved}"
    );

    let out = import(&tessera, &file, "100").output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("resuming after line {resume_at}")),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!("{lines} lines")),
        "the summary covers the whole file: {stdout}"
    );
    assert_rejections(&out, lines);
    assert!(
        !checkpoint.exists(),
        "a finished import removes its checkpoint"
    );
    assert_counted_once(&tessera, &expected).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gzip_file_imports_and_a_rerun_only_finds_duplicates() {
    let data = tempfile::tempdir().unwrap();
    let tessera = TesseraBuilder::new("dev")
        .args(["--data-dir", data.path().to_str().unwrap()])
        .start()
        .await;
    let lines = 1_500;
    let (text, expected) = generate("gzip", lines);
    let plain = data.path().join("events.jsonl");
    std::fs::write(&plain, text).unwrap();
    let gzip = std::process::Command::new("gzip")
        .arg(&plain)
        .status()
        .expect("gzip is installed");
    assert!(gzip.success());
    // The name says nothing: gzip is recognized by its magic bytes.
    let file = data.path().join("events.export");
    std::fs::rename(data.path().join("events.jsonl.gz"), &file).unwrap();
    let valid: i64 = expected.values().sum();

    let out = import(&tessera, &file, "250").output().await.unwrap();
    assert_rejections(&out, lines);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{valid} accepted, 0 duplicates")),
        "{stdout}"
    );

    let again = import(&tessera, &file, "250").output().await.unwrap();
    assert_rejections(&again, lines);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        stdout.contains(&format!("0 accepted, {valid} duplicates")),
        "{stdout}"
    );
    assert_counted_once(&tessera, &expected).await;
}
