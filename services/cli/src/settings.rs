//! The binary's settings, in layers: defaults, then an optional TOML file, then environment
//! variables (`TESSERA__SECTION__KEY`, plus the conventional `DATABASE_URL`, `REDIS_URL`,
//! `OTEL_EXPORTER_OTLP_ENDPOINT` and the OTLP TLS files `OTEL_EXPORTER_OTLP_CERTIFICATE`,
//! `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and `OTEL_EXPORTER_OTLP_CLIENT_KEY`), then
//! command-line flags. Parsed before the runtime starts; a bad value exits with a message that
//! names it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use tessera_identity::IdentitySettings;
use tessera_ingestion::IngestionSettings;
use tessera_profile::ProfileSettings;
use tessera_scoring::ScoringSettings;
use tessera_server::access::AuthSettings;
use tessera_server::tls::TlsSettings;
use tessera_server::{EdgeSettings, TelemetrySettings};
use tessera_store::{DbSettings, NearCacheSettings};

/// Everything the binary can be configured with.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Settings {
    /// The system of record: `postgres://…` in production. `tessera dev` uses SQLite files in
    /// its data directory instead.
    pub(crate) database_url: String,
    /// The profile cache, and the identity service's owner cache: `redis://…`, or `memory://` for
    /// an in-process profile cache (and no owner cache).
    pub(crate) redis_url: String,
    /// The prefix of every cache key, so several deployments can share one Redis.
    pub(crate) cache_prefix: String,
    /// The near cache each profile replica keeps in process in front of Redis (`[cache]`);
    /// unused with `memory://`.
    pub(crate) cache: NearCacheSettings,
    /// The gRPC listen address.
    pub(crate) grpc_addr: SocketAddr,
    /// The HTTP listen address (HTTP APIs, `/healthz`, `/metrics`).
    pub(crate) http_addr: SocketAddr,
    /// A plaintext port serving only the gRPC health service, for probes that cannot speak TLS
    /// (Kubernetes' gRPC probes). Off when unset.
    pub(crate) probe_addr: Option<SocketAddr>,
    /// Mutual TLS on the gRPC port and to peers.
    pub(crate) tls: TlsSettings,
    /// Access tokens of the external APIs.
    pub(crate) auth: AuthSettings,
    /// Whether a service applies its own migrations at start (they are idempotent and safe to
    /// run from several replicas; `tessera migrate` does the same as a separate step).
    pub(crate) migrate_on_start: bool,
    /// Where peer services are reached.
    pub(crate) peers: Peers,
    /// Database pool settings.
    pub(crate) db: DbSettings,
    /// Server edge limits.
    pub(crate) edge: EdgeSettings,
    /// Logs and traces.
    pub(crate) telemetry: TelemetrySettings,
    /// The ingestion service.
    pub(crate) ingestion: IngestionSettings,
    /// The identity service.
    pub(crate) identity: IdentitySettings,
    /// The profile service.
    pub(crate) profile: ProfileSettings,
    /// The scoring service (its plans).
    pub(crate) scoring: ScoringSettings,
}

/// The gRPC addresses of the peer services, as `http://host:port` (`https://` with TLS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Peers {
    /// The identity service.
    pub(crate) identity: String,
    /// The profile service.
    pub(crate) profile: String,
    /// The scoring service.
    pub(crate) scoring: String,
    /// The ingestion service (the profile service calls its event log to delete a person's
    /// events).
    pub(crate) ingestion: String,
}

impl Default for Peers {
    fn default() -> Self {
        Self {
            identity: "http://127.0.0.1:50052".to_owned(),
            profile: "http://127.0.0.1:50053".to_owned(),
            scoring: "http://127.0.0.1:50054".to_owned(),
            ingestion: "http://127.0.0.1:50051".to_owned(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: String::new(),
            redis_url: "memory://".to_owned(),
            cache_prefix: "tessera:".to_owned(),
            cache: NearCacheSettings::default(),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            probe_addr: None,
            tls: TlsSettings::default(),
            auth: AuthSettings::default(),
            migrate_on_start: true,
            peers: Peers::default(),
            db: DbSettings::default(),
            edge: EdgeSettings::default(),
            telemetry: TelemetrySettings::default(),
            ingestion: IngestionSettings::default(),
            identity: IdentitySettings::default(),
            profile: ProfileSettings::default(),
            scoring: ScoringSettings::default(),
        }
    }
}

impl std::fmt::Debug for Settings {
    // The URLs may carry passwords: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &"<redacted>")
            .field("redis_url", &"<redacted>")
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .field("tls", &self.tls)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// Environment variables read under their conventional names, and the setting each sets.
const PLAIN_ENV: [(&str, &str); 6] = [
    ("DATABASE_URL", "database_url"),
    ("REDIS_URL", "redis_url"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "telemetry.otlp_endpoint"),
    (
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
        "telemetry.otlp_certificate",
    ),
    (
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        "telemetry.otlp_client_certificate",
    ),
    ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "telemetry.otlp_client_key"),
];

/// Loads the settings from the optional TOML `file` and the environment `env` (passed in, so
/// tests never touch the process environment). Flags are applied by the caller afterwards.
pub(crate) fn load(
    file: Option<&Path>,
    env: &HashMap<String, String>,
) -> Result<Settings, config::ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    let prefixed: HashMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with("TESSERA__"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("TESSERA")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(Some(prefixed)),
    );
    for (var, key) in PLAIN_ENV {
        if let Some(value) = env.get(var).filter(|v| !v.is_empty()) {
            builder = builder.set_override(key, value.clone())?;
        }
    }
    builder.build()?.try_deserialize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/tessera.example.toml");
        let s = load(Some(&path), &HashMap::new()).expect("example config parses");
        assert_eq!(s.ingestion.partitions, 16);
        assert!(s.database_url.starts_with("postgres://"));
        assert!(s.tls.is_configured() && s.peers.identity.starts_with("https://"));
        assert_eq!(s.tls.reload_interval_secs, 60);
        assert_eq!(s.identity.owner_cache_ttl_seconds, 3_600);
        s.scoring.validate().expect("the example plans are valid");
        assert!(!s.scoring.plans.is_empty());
        assert_eq!(s.cache.max_bytes, 64 * 1024 * 1024);
        s.cache.validate().expect("the example near cache is valid");
    }

    #[test]
    fn the_near_cache_is_on_by_default_and_env_turns_it_off() {
        let s = load(None, &HashMap::new()).unwrap();
        assert!(s.cache.enabled && s.cache.max_bytes > 0 && s.cache.ttl_seconds > 0);
        let off = load(None, &env(&[("TESSERA__CACHE__ENABLED", "false")])).unwrap();
        assert!(!off.cache.enabled);
        let zero = load(None, &env(&[("TESSERA__CACHE__MAX_BYTES", "0")])).unwrap();
        assert_eq!(zero.cache.validate().unwrap_err().field, "max_bytes");
        let err = load(None, &env(&[("TESSERA__CACHE__SIZE", "1")])).unwrap_err();
        assert!(err.to_string().contains("size"), "{err}");
    }

    #[test]
    fn env_overrides_defaults_and_plain_names_work() {
        let s = load(
            None,
            &env(&[
                ("DATABASE_URL", "postgres://db/x"),
                ("TESSERA__PEERS__IDENTITY", "http://identity:50051"),
                ("TESSERA__INGESTION__MAX_BATCH", "10"),
                ("UNRELATED", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(s.database_url, "postgres://db/x");
        assert_eq!(s.peers.identity, "http://identity:50051");
        assert_eq!(s.ingestion.max_batch, 10);
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = load(None, &env(&[("TESSERA__INGESTION__MAX_BACH", "10")])).unwrap_err();
        assert!(err.to_string().contains("max_bach"), "{err}");
    }

    #[test]
    fn unusable_scoring_plans_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("tessera-plans-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let plan = |op: &str| {
            format!(
                "[[scoring.plans]]\nname = \"fit\"\nversion = \"1\"\nrules = [{{ name = \"r\", \
                 points = 10, condition = {{ trait = {{ name = \"age\", op = \"{op}\", value = 1 }} }} }}]\n"
            )
        };
        let twice = load(
            Some(&file("twice.toml", &plan("gt").repeat(2))),
            &HashMap::new(),
        )
        .expect("parses");
        let err = twice.scoring.validate().unwrap_err().to_string();
        assert_eq!(
            err,
            "scoring.plans[1] (\"fit\"): the name is declared twice"
        );
        let Err(err) = load(Some(&file("op.toml", &plan("greater"))), &HashMap::new()) else {
            panic!("an unknown operator parses");
        };
        assert!(err.to_string().contains("greater"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_do_not_print() {
        let s = load(None, &env(&[("DATABASE_URL", "postgres://u:hunter2@db/x")])).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
