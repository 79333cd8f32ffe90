//! The binary's own commands: help, migrate, and configuration errors.

use std::process::Command;

use tessera_testkit::TestDb;
use tessera_tests::tessera_bin;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(tessera_bin())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run tessera");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_documents_every_command_and_option() {
    let (code, out, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for command in [
        "dev",
        "ingestion",
        "identity",
        "profile",
        "scoring",
        "migrate",
        "bench",
    ] {
        assert!(out.contains(command), "--help lists {command}: {out}");
    }
    let (code, out, _) = run(&["dev", "--help"], &[]);
    assert_eq!(code, 0);
    for option in ["--data-dir", "--grpc-addr", "--http-addr", "--config"] {
        assert!(out.contains(option), "dev --help lists {option}: {out}");
    }
    let (code, out, _) = run(&["profile", "--help"], &[]);
    assert_eq!(code, 0);
    for option in ["--database-url", "--redis-url", "--config", "DATABASE_URL"] {
        assert!(out.contains(option), "profile --help lists {option}: {out}");
    }
}

#[test]
fn bad_configuration_exits_with_a_message_naming_it() {
    let (code, _, err) = run(
        &["identity"],
        &[
            ("DATABASE_URL", "postgres://127.0.0.1:1/x"),
            ("TESSERA__IDENTITY__MAX_BACH", "3"),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("max_bach"), "{err}");

    let (code, _, err) = run(&["identity"], &[("DATABASE_URL", "sqlite://x.db")]);
    assert_eq!(code, 2);
    assert!(err.contains("postgres://"), "{err}");

    let (code, _, err) = run(
        &["dev", "--data-dir", "/tmp/unused"],
        &[("TESSERA__PROFILE__CACHE_TTL_SECONDS", "0")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("cache_ttl_seconds"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_creates_every_schema_and_is_idempotent() {
    let db = TestDb::new().await;
    for _ in 0..2 {
        let url = db.url().to_owned();
        let (code, _, err) = tokio::task::spawn_blocking(move || {
            run(&["migrate"], &[("DATABASE_URL", url.as_str())])
        })
        .await
        .unwrap();
        assert_eq!(code, 0, "{err}");
    }
    let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables \
         WHERE table_schema IN ('ingestion', 'identity', 'profile') ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for table in [
        "ingestion.events",
        "identity.identifiers",
        "profile.profiles",
    ] {
        assert!(tables.iter().any(|t| t == table), "{table} in {tables:?}");
    }
    // The per-event JSON documents are never sampled by ANALYZE (it took 3x longer with them).
    let unsampled: Vec<String> = sqlx::query_scalar(
        "SELECT n.nspname || '.' || c.relname || '.' || a.attname FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.attstattarget = 0 AND n.nspname IN ('ingestion', 'identity', 'profile') \
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for column in [
        "ingestion.events.payload",
        "identity.resolutions.detail",
        "identity.graph_log.detail",
        "profile.applied_events.content",
        "profile.profiles.traits",
        "profile.profile_changes.detail",
    ] {
        assert!(
            unsampled.iter().any(|c| c == column),
            "{column} in {unsampled:?}"
        );
    }
    pool.close().await;
}
