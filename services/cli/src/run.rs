//! Turning a command line into a plan (settings parsed and checked before the runtime starts),
//! and running it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tessera_server::tls::Tls;
use tessera_server::{GrpcServices, Listeners, Shutdown};
use tessera_store::{Database, Migrations};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};

use crate::settings::{self, Settings};
use crate::sources::WriteKeyArg;
use crate::{Command, ConfigArgs};

/// A service role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Ingestion,
    Identity,
    Profile,
    Scoring,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Self::Ingestion => "ingestion",
            Self::Identity => "identity",
            Self::Profile => "profile",
            Self::Scoring => "scoring",
        }
    }
}

/// What to run, with its settings already validated.
pub(crate) enum Plan {
    Serve {
        roles: Vec<Role>,
        settings: Box<Settings>,
        /// `tessera dev`: SQLite files in this directory, peers in-process.
        dev_data_dir: Option<PathBuf>,
        /// `tessera dev`: the fixed write key of the source `default`.
        dev_write_key: Option<WriteKeyArg>,
        /// Mutual TLS on the gRPC port and to peers, when configured.
        tls: Option<Tls>,
    },
    Migrate {
        settings: Box<Settings>,
    },
    DevCerts(crate::dev_certs::DevCertsArgs),
    Bench(crate::bench::BenchArgs),
    BenchReads(crate::bench_reads::BenchReadsArgs),
    Sources(crate::sources::SourcesArgs),
    Profiles(crate::profiles::ProfilesArgs),
    Definitions(crate::definitions::DefinitionsArgs),
    Import(crate::import::ImportArgs),
    Tokens {
        args: crate::tokens::TokensArgs,
        settings: Box<Settings>,
    },
    Audit {
        args: crate::tokens::AuditArgs,
        settings: Box<Settings>,
    },
}

fn load(config: &ConfigArgs, env: &HashMap<String, String>) -> anyhow::Result<Settings> {
    let mut s = settings::load(config.config.as_deref(), env).context("invalid configuration")?;
    if let Some(url) = &config.database_url {
        s.database_url.clone_from(url);
    }
    Ok(s)
}

fn require_postgres(s: &Settings) -> anyhow::Result<()> {
    if s.database_url.starts_with("postgres://") || s.database_url.starts_with("postgresql://") {
        Ok(())
    } else {
        anyhow::bail!(
            "DATABASE_URL (or --database-url, or database_url in the config file) must be a \
             postgres:// URL; for a single-process setup without servers use `tessera dev`"
        )
    }
}

/// Checks what deserializing cannot: values in range.
fn check(s: &Settings) -> anyhow::Result<()> {
    s.profile
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    s.auth
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    s.cache
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    s.scoring
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    s.telemetry
        .check()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
}

/// The peers a role calls, by setting name.
fn peers_of(role: Role, s: &Settings) -> Vec<(&'static str, &str)> {
    match role {
        Role::Ingestion => vec![
            ("peers.identity", &s.peers.identity),
            ("peers.profile", &s.peers.profile),
        ],
        Role::Identity | Role::Scoring => vec![("peers.profile", &s.peers.profile)],
        Role::Profile => vec![
            ("peers.identity", &s.peers.identity),
            ("peers.scoring", &s.peers.scoring),
            ("peers.ingestion", &s.peers.ingestion),
        ],
    }
}

/// Reads the TLS files and checks how the gRPC port may be served and peers called: mutual TLS
/// with https:// peers, or plaintext with http:// peers, beyond loopback only when allowed.
/// `role` is `None` for `tessera dev`, whose peers are in-process.
fn transport_security(s: &Settings, role: Option<Role>) -> anyhow::Result<Option<Tls>> {
    let tls = s
        .tls
        .load()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    if tls.is_none() && !s.grpc_addr.ip().is_loopback() && !s.tls.allow_plaintext {
        anyhow::bail!(
            "invalid configuration: the gRPC address {} is not loopback and TLS is off: set \
             tls.ca_file, tls.cert_file and tls.key_file (TESSERA__TLS__CA_FILE, ...) for mutual \
             TLS between services, or tls.allow_plaintext = true \
             (TESSERA__TLS__ALLOW_PLAINTEXT=true) to serve plaintext gRPC beyond loopback",
            s.grpc_addr
        );
    }
    for (setting, url) in role.map(|r| peers_of(r, s)).unwrap_or_default() {
        match (tls.is_some(), url.starts_with("https://")) {
            (true, false) => anyhow::bail!(
                "invalid configuration: {setting} = {url:?} must be an https:// URL: with TLS on, \
                 peers are called over mutual TLS"
            ),
            (false, true) => anyhow::bail!(
                "invalid configuration: {setting} = {url:?} is an https:// URL but TLS is off: \
                 set tls.ca_file, tls.cert_file and tls.key_file to call peers over mutual TLS"
            ),
            (true, true) | (false, false) => {}
        }
    }
    Ok(tls)
}

/// The key prefix of the identity service's owner cache: `owners:` before the cache prefix
/// (`tessera:` → `owners:tessera:`), so the owner keys are not under the profile cache's prefix,
/// which the profile replicas' near caches track (each owner written would reach them).
fn owner_cache_prefix(cache_prefix: &str) -> String {
    format!("owners:{cache_prefix}")
}

/// Parses the command into a plan. Runs before the async runtime starts.
pub(crate) fn plan(command: Command, env: &HashMap<String, String>) -> anyhow::Result<Plan> {
    let serve = |role: Role, args: crate::ServeArgs| -> anyhow::Result<Plan> {
        let mut s = load(&args.config, env)?;
        if let Some(token) = access_token_from_env(env) {
            s.profile.access_token = Some(token);
        }
        check(&s)?;
        if let Some(addr) = args.grpc_addr {
            s.grpc_addr = addr;
        }
        if let Some(addr) = args.http_addr {
            s.http_addr = addr;
        }
        if let Some(url) = args.redis_url {
            s.redis_url = url;
        }
        require_postgres(&s)?;
        let tls = transport_security(&s, Some(role))?;
        Ok(Plan::Serve {
            roles: vec![role],
            settings: Box::new(s),
            dev_data_dir: None,
            dev_write_key: None,
            tls,
        })
    };
    match command {
        Command::Dev(args) => {
            let mut s =
                settings::load(args.config.as_deref(), env).context("invalid configuration")?;
            check(&s)?;
            s.grpc_addr = args.grpc_addr;
            s.http_addr = args.http_addr;
            s.redis_url = "memory://".to_owned();
            // The Profile API is always on in `tessera dev`: with the token given, or the one
            // made up on the first start and kept in the data directory (printed at start).
            let given = args
                .access_token
                .map(tessera_profile::AccessToken)
                .or_else(|| access_token_from_env(env))
                .or(s.profile.access_token.take());
            s.profile.access_token = Some(match given {
                Some(token) => token,
                None => kept_access_token(&args.data_dir)?,
            });
            check(&s)?;
            // One process, one dispatcher: partitions only spread delivery over replicas, and
            // one partition makes the largest batches (fewest SQLite commits).
            s.ingestion.partitions = 1;
            let tls = transport_security(&s, None)?;
            Ok(Plan::Serve {
                roles: vec![
                    Role::Identity,
                    Role::Scoring,
                    Role::Profile,
                    Role::Ingestion,
                ],
                settings: Box::new(s),
                dev_data_dir: Some(args.data_dir),
                dev_write_key: match args.write_key {
                    Some(key) => Some(key),
                    None => write_key_from_env(env)?,
                },
                tls,
            })
        }
        Command::Ingestion(args) => serve(Role::Ingestion, args),
        Command::Identity(args) => serve(Role::Identity, args),
        Command::Profile(args) => serve(Role::Profile, args),
        Command::Scoring(args) => serve(Role::Scoring, args),
        Command::DevCerts(args) => Ok(Plan::DevCerts(args)),
        Command::Migrate(args) => {
            let s = load(&args, env)?;
            require_postgres(&s)?;
            Ok(Plan::Migrate {
                settings: Box::new(s),
            })
        }
        Command::Bench(mut args) => {
            if args.write_key.is_none() {
                args.write_key = write_key_from_env(env)?;
            }
            Ok(Plan::Bench(args))
        }
        Command::BenchReads(mut args) => {
            if args.write_key.is_none() {
                args.write_key = write_key_from_env(env)?;
            }
            Ok(Plan::BenchReads(args))
        }
        Command::Tokens(args) => {
            let s = load(&args.config, env)?;
            crate::tokens::require_database(&s.database_url)?;
            Ok(Plan::Tokens {
                args,
                settings: Box::new(s),
            })
        }
        Command::Audit(args) => {
            let s = load(&args.config, env)?;
            crate::tokens::require_database(&s.database_url)?;
            Ok(Plan::Audit {
                args,
                settings: Box::new(s),
            })
        }
        Command::Sources(args) => Ok(Plan::Sources(args)),
        Command::Profiles(args) => Ok(Plan::Profiles(args)),
        Command::Definitions(args) => Ok(Plan::Definitions(args)),
        Command::Import(mut args) => {
            if args.write_key.is_none() {
                args.write_key = write_key_from_env(env)?;
            }
            Ok(Plan::Import(args))
        }
    }
}

/// `TESSERA_ACCESS_TOKEN`, when set and not empty.
fn access_token_from_env(env: &HashMap<String, String>) -> Option<tessera_profile::AccessToken> {
    env.get("TESSERA_ACCESS_TOKEN")
        .filter(|t| !t.is_empty())
        .map(|t| tessera_profile::AccessToken(t.clone()))
}

/// The file in `tessera dev`'s data directory that keeps its made-up access token.
const DEV_TOKEN_FILE: &str = "dev-access-token";

/// `tessera dev`'s access token when none is given: the one kept in `data_dir` by an earlier
/// start, or a new one, kept there (readable by its owner only) so a restart prints the same.
fn kept_access_token(data_dir: &std::path::Path) -> anyhow::Result<tessera_profile::AccessToken> {
    let path = data_dir.join(DEV_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(kept) => {
            let kept = kept.trim();
            anyhow::ensure!(
                kept.len() >= 16 && !kept.contains(':') && !kept.contains(char::is_whitespace),
                "{} does not hold a usable access token: delete it to make a new one",
                path.display()
            );
            return Ok(tessera_profile::AccessToken(kept.to_owned()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("reading {}", path.display())));
        }
    }
    let token = generated_access_token();
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?
    };
    std::io::Write::write_all(&mut file, format!("{}\n", token.0).as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}

/// A random Profile API access token for `tessera dev`.
fn generated_access_token() -> tessera_profile::AccessToken {
    use rand::Rng as _;
    use rand::distr::Alphanumeric;
    let token: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    tessera_profile::AccessToken(format!("tat_{token}"))
}

/// `TESSERA_WRITE_KEY`, when set and not empty.
fn write_key_from_env(env: &HashMap<String, String>) -> anyhow::Result<Option<WriteKeyArg>> {
    env.get("TESSERA_WRITE_KEY")
        .filter(|k| !k.is_empty())
        .map(|k| {
            k.parse()
                .map_err(|e| anyhow::anyhow!("TESSERA_WRITE_KEY: {e}"))
        })
        .transpose()
}

/// Runs the plan to its end.
pub(crate) async fn execute(plan: Plan) -> anyhow::Result<()> {
    match plan {
        Plan::Serve {
            roles,
            settings,
            dev_data_dir,
            dev_write_key,
            tls,
        } => {
            let dev = dev_data_dir.as_deref();
            let key = dev_write_key.as_ref().map(|k| k.0.as_str());
            serve(&roles, &settings, dev, key, tls.as_ref()).await
        }
        Plan::Migrate { settings } => {
            let _telemetry =
                tessera_server::init_telemetry("tessera-migrate", &settings.telemetry)?;
            for (schema, migrations) in all_migrations() {
                let db = Database::connect(&settings.database_url, schema, &settings.db)
                    .await
                    .with_context(|| format!("connecting to the database for {schema}"))?;
                db.migrate(migrations)
                    .await
                    .with_context(|| format!("migrating {schema}"))?;
                db.close().await;
                tracing::info!(schema, "migrated");
            }
            Ok(())
        }
        Plan::DevCerts(args) => crate::dev_certs::run(&args),
        Plan::Bench(args) => crate::bench::run(args).await,
        Plan::BenchReads(args) => crate::bench_reads::run(args).await,
        Plan::Tokens { args, settings } => crate::tokens::run_tokens(args, &settings).await,
        Plan::Audit { args, settings } => crate::tokens::run_audit(args, &settings).await,
        Plan::Sources(args) => crate::sources::run(args).await,
        Plan::Profiles(args) => crate::profiles::run(args).await,
        Plan::Definitions(args) => crate::definitions::run(args).await,
        Plan::Import(args) => crate::import::run(args).await,
    }
}

fn all_migrations() -> [(&'static str, Migrations); 5] {
    [
        (
            tessera_server::access::SCHEMA,
            tessera_server::access::MIGRATIONS,
        ),
        (tessera_ingestion::SCHEMA, tessera_ingestion::MIGRATIONS),
        (tessera_identity::SCHEMA, tessera_identity::MIGRATIONS),
        (tessera_profile::SCHEMA, tessera_profile::MIGRATIONS),
        (tessera_scoring::SCHEMA, tessera_scoring::MIGRATIONS),
    ]
}

/// Opens (and, when configured, migrates) a service's database: its Postgres schema, or in dev
/// mode its own SQLite file.
async fn open_db(
    settings: &Settings,
    dev_data_dir: Option<&Path>,
    schema: &'static str,
    migrations: Migrations,
) -> anyhow::Result<Database> {
    let url = match dev_data_dir {
        Some(dir) => format!("sqlite://{}", dir.join(format!("{schema}.db")).display()),
        None => settings.database_url.clone(),
    };
    let db = Database::connect(&url, schema, &settings.db)
        .await
        .with_context(|| format!("connecting to the {schema} database"))?;
    if settings.migrate_on_start || dev_data_dir.is_some() {
        db.migrate(migrations)
            .await
            .with_context(|| format!("migrating the {schema} database"))?;
    }
    Ok(db)
}

/// Makes sure `tessera dev` has its source `default` and prints its write key when it is known
/// (created now, or fixed by the operator), before the `listening` line.
async fn announce_dev_source(
    ingestion: &tessera_ingestion::Ingestion,
    fixed_key: Option<&str>,
) -> anyhow::Result<()> {
    use tessera_ingestion::{DEV_SOURCE, DevSource};
    let outcome = ingestion
        .ensure_dev_source(fixed_key)
        .await
        .context("creating the source `default`")?;
    #[allow(clippy::print_stdout)]
    match outcome {
        DevSource::Created(key) => {
            println!("{}", crate::sources::key_line(DEV_SOURCE, &key));
            println!(
                "tessera: send it as the HTTP Basic user name (Segment libraries: writeKey) or in \
                 the gRPC metadata x-tessera-write-key. It is shown this once: keep it, or fix \
                 your own with --write-key / TESSERA_WRITE_KEY"
            );
        }
        DevSource::Fixed(key) => {
            println!("{}", crate::sources::key_line(DEV_SOURCE, &key));
            println!(
                "tessera: send it as the HTTP Basic user name (Segment libraries: writeKey) or in \
                 the gRPC metadata x-tessera-write-key"
            );
        }
        DevSource::Existing => println!(
            "tessera: source {DEV_SOURCE} exists; its write key was printed on first start \
             (replace it with `tessera sources rotate-key {DEV_SOURCE}`, or fix one with \
             --write-key)"
        ),
    }
    Ok(())
}

/// Prints where `tessera dev`'s Profile API answers and its access token.
fn announce_profile_api(settings: &Settings, http_addr: SocketAddr) {
    let token = settings
        .profile
        .access_token
        .as_ref()
        .map_or("", |t| t.0.as_str());
    #[allow(clippy::print_stdout)]
    {
        println!("tessera: profile api access token {token}");
        println!(
            "tessera: the token has every scope (profiles:read, profiles:write, admin, privacy): \
             send it as `authorization: Bearer <token>` (gRPC metadata or HTTP header; the CLI \
             reads TESSERA_ACCESS_TOKEN). Read profiles at http://{http_addr}/v1/spaces/{}/\
             collections/users/profiles/user_id:<id>/traits with it as the HTTP Basic user name \
             or bearer token (fix it with --access-token / TESSERA_ACCESS_TOKEN)",
            settings.profile.space_id
        );
    }
}

/// The tokens given in configuration: `auth.bootstrap_token` (every scope); in `tessera dev`
/// its printed token (every scope), elsewhere `profile.access_token` (`profiles:read`, all it
/// ever allowed).
fn config_tokens(settings: &Settings, dev: bool) -> Vec<tessera_server::access::ConfigToken> {
    use tessera_server::access::{ConfigToken, Scope, Secret};
    let mut tokens: Vec<ConfigToken> = settings.auth.bootstrap().into_iter().collect();
    // The same secret as the bootstrap token (TESSERA_ACCESS_TOKEN exported for the CLI beside
    // the service, say) keeps the bootstrap token's scopes instead of shadowing them.
    if let Some(token) = settings
        .profile
        .access_token
        .as_ref()
        .filter(|t| !tokens.iter().any(|b| b.secret.0 == t.0))
    {
        let (name, scopes) = if dev {
            ("dev", Scope::ALL.into_iter().collect())
        } else {
            ("profile.access_token", [Scope::ProfilesRead].into())
        };
        tokens.push(ConfigToken {
            name: name.to_owned(),
            secret: Secret(token.0.clone()),
            scopes,
        });
    }
    tokens
}

/// A channel to a peer that connects on first use and reconnects by itself, so services can
/// start in any order. With `tls`, over mutual TLS: the peer's certificate is checked against
/// the CA for the URL's host, and this service's certificate is its client certificate, both
/// as they are when a connection is made (`Tls::connector`), so a channel made at start
/// follows a certificate or CA rotated on disk.
fn peer(url: &str, tls: Option<&Tls>) -> anyhow::Result<Channel> {
    let endpoint = match tls {
        Some(tls) => tls.peer_endpoint(url)?,
        None => Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("invalid peer address {url}"))?,
    }
    .connect_timeout(Duration::from_secs(2))
    .timeout(Duration::from_secs(30))
    .tcp_nodelay(true);
    Ok(match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(tls.connector()),
        None => endpoint.connect_lazy(),
    })
}

/// The address peers in the same process use to reach a listener.
fn loopback_url(addr: SocketAddr, tls: bool) -> String {
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{}", SocketAddr::new(ip, addr.port()))
}

async fn serve(
    roles: &[Role],
    settings: &Settings,
    dev_data_dir: Option<&Path>,
    dev_write_key: Option<&str>,
    tls: Option<&Tls>,
) -> anyhow::Result<()> {
    let name = match (dev_data_dir, roles) {
        (None, [role]) => format!("tessera-{}", role.name()),
        _ => "tessera-dev".to_owned(),
    };
    let _telemetry = tessera_server::init_telemetry(&name, &settings.telemetry)?;
    if let Some(dir) = dev_data_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the data directory {}", dir.display()))?;
    }
    let grpc = TcpListener::bind(settings.grpc_addr)
        .await
        .with_context(|| format!("binding the gRPC address {}", settings.grpc_addr))?;
    let http = TcpListener::bind(settings.http_addr)
        .await
        .with_context(|| format!("binding the HTTP address {}", settings.http_addr))?;
    let probe = match settings.probe_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the probe address {addr}"))?,
        ),
        None => None,
    };
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;

    let (identity_url, profile_url, scoring_url, ingestion_url) = if dev_data_dir.is_some() {
        let me = loopback_url(grpc_addr, tls.is_some());
        (me.clone(), me.clone(), me.clone(), me)
    } else {
        (
            settings.peers.identity.clone(),
            settings.peers.profile.clone(),
            settings.peers.scoring.clone(),
            settings.peers.ingestion.clone(),
        )
    };

    // On SIGTERM/SIGINT the delivery workers stop first (finishing their batch), then the
    // server drains: in-flight deliveries never meet a closed listener.
    let shutdown = Shutdown::new();
    tessera_server::shutdown_on_signal(shutdown.clone());
    let delivery_stop = Shutdown::new();
    let server_stop = Shutdown::new();
    let mut services = GrpcServices::default();
    let mut http_routes = tessera_server::HttpRouter::new();
    let mut databases = Vec::new();
    let mut workers = Vec::new();
    // The external APIs (ingestion's admin services, the profile service's) take access tokens.
    let access = if roles.contains(&Role::Ingestion) || roles.contains(&Role::Profile) {
        let db = open_db(
            settings,
            dev_data_dir,
            tessera_server::access::SCHEMA,
            tessera_server::access::MIGRATIONS,
        )
        .await?;
        let tokens = tessera_server::access::TokenStore::new(db.clone());
        tokens.spawn_audit_pruning(settings.auth.audit_retention_days, shutdown.clone());
        let access = tessera_server::access::Access::new(
            Some(tokens),
            config_tokens(settings, dev_data_dir.is_some()),
            Duration::from_millis(settings.auth.token_cache_ms),
        );
        services.require_tokens(access.clone());
        databases.push(db);
        Some(access)
    } else {
        None
    };
    for role in roles {
        match role {
            Role::Identity => {
                let db = open_db(
                    settings,
                    dev_data_dir,
                    tessera_identity::SCHEMA,
                    tessera_identity::MIGRATIONS,
                )
                .await?;
                // Hot identifiers' owners are cached in the Redis the profiles use (on
                // Postgres only; `memory://` has no cache to share between replicas).
                let identity = if settings.redis_url.starts_with("redis") {
                    tessera_identity::Identity::with_owner_cache(
                        db.clone(),
                        settings.identity.clone(),
                        &settings.redis_url,
                        &owner_cache_prefix(&settings.cache_prefix),
                    )
                    .await
                } else {
                    tessera_identity::Identity::new(db.clone(), settings.identity.clone()).await
                }
                .map_err(|e| anyhow::anyhow!("identity: {e}"))?;
                identity.register(&mut services);
                // Merges decided outside the pipeline (probabilistic matches, accepted
                // suggestions) reach the profile service through this worker.
                workers.push(
                    identity.spawn_merge_delivery(peer(&profile_url, tls)?, delivery_stop.clone()),
                );
                // Rules changed through another replica's UpdateRules reach this one.
                workers.push(identity.spawn_rules_refresh(delivery_stop.clone()));
                databases.push(db);
            }
            Role::Scoring => {
                let db = open_db(
                    settings,
                    dev_data_dir,
                    tessera_scoring::SCHEMA,
                    tessera_scoring::MIGRATIONS,
                )
                .await?;
                // Fitted customer-value models live in the scoring schema; fits read the
                // population from the profile service.
                let scoring = tessera_scoring::Scoring::from_settings(&settings.scoring)
                    .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?
                    .with_store(db.clone(), peer(&profile_url, tls)?);
                scoring.register(&mut services);
                // Every replica follows the active model; one at a time runs the schedule.
                workers.push(scoring.spawn_workers(delivery_stop.clone()));
                databases.push(db);
            }
            Role::Profile => {
                let db = open_db(
                    settings,
                    dev_data_dir,
                    tessera_profile::SCHEMA,
                    tessera_profile::MIGRATIONS,
                )
                .await?;
                let ttl = Duration::from_secs(settings.profile.cache_ttl_seconds.max(1));
                let cache = tessera_store::open_cache(
                    &settings.redis_url,
                    &settings.cache_prefix,
                    ttl,
                    &settings.cache,
                )
                .context("opening the profile cache")?;
                let profiles = tessera_profile::Profiles::new(
                    db.clone(),
                    Arc::clone(&cache),
                    tessera_profile::Peers {
                        identity: peer(&identity_url, tls)?,
                        scoring: peer(&scoring_url, tls)?,
                        ingestion: peer(&ingestion_url, tls)?,
                    },
                    settings.profile.clone(),
                );
                profiles.register(&mut services);
                profiles.stop_streams_on(delivery_stop.clone());
                // Windowed computed traits and audience conditions change with time.
                workers.push(profiles.spawn_sweeper(
                    Duration::from_millis(settings.profile.sweep_interval_ms.max(10)),
                    delivery_stop.clone(),
                ));
                // The change stream's webhook destinations (leased per webhook in the database).
                workers.push(profiles.spawn_webhooks(delivery_stop.clone()));
                if let Some(access) = &access {
                    http_routes = http_routes.merge(profiles.http_routes(access.clone()));
                }
                if dev_data_dir.is_some() {
                    announce_profile_api(settings, http_addr);
                }
                databases.push(db);
            }
            Role::Ingestion => {
                let db = open_db(
                    settings,
                    dev_data_dir,
                    tessera_ingestion::SCHEMA,
                    tessera_ingestion::MIGRATIONS,
                )
                .await?;
                let ingestion =
                    tessera_ingestion::Ingestion::new(db.clone(), settings.ingestion.clone())
                        .await
                        .context("starting ingestion")?;
                // Only `tessera dev` makes a source by itself; production services never do.
                if dev_data_dir.is_some() {
                    announce_dev_source(&ingestion, dev_write_key).await?;
                }
                ingestion.register(&mut services);
                http_routes = http_routes.merge(ingestion.http_routes());
                workers.push(ingestion.spawn_delivery(
                    peer(&identity_url, tls)?,
                    peer(&profile_url, tls)?,
                    delivery_stop.clone(),
                ));
                databases.push(db);
            }
        }
    }

    // A machine-readable line for scripts and tests that bind to port 0.
    #[allow(clippy::print_stdout)]
    {
        println!("tessera: listening grpc={grpc_addr} http={http_addr}");
    }
    tracing::info!(%grpc_addr, %http_addr, services = ?services.names(), "serving");
    let stopper = {
        let (shutdown, server_stop) = (shutdown.clone(), server_stop.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            delivery_stop.cancel();
            for worker in workers {
                let _ = worker.await;
            }
            server_stop.cancel();
        })
    };
    let listeners = Listeners { grpc, http, probe };
    let served = tessera_server::serve_with(
        &settings.edge,
        listeners,
        tls,
        services,
        http_routes,
        server_stop,
    )
    .await;
    // The server may also end on its own (an error): stop everything either way.
    shutdown.cancel();
    let _ = stopper.await;
    for db in databases {
        db.close().await;
    }
    served.context("serving")?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    const DB: (&str, &str) = ("DATABASE_URL", "postgres://db/tessera");

    #[test]
    fn owner_keys_are_not_under_the_profile_prefix() {
        for prefix in ["tessera:", "acme", "acme:prod:"] {
            let owners = owner_cache_prefix(prefix);
            assert!(!owners.starts_with(prefix), "{prefix} → {owners}");
        }
        assert_eq!(owner_cache_prefix("tessera:"), "owners:tessera:");
    }

    fn plan_of(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Plan> {
        // Planning `dev` keeps its made-up access token in the data directory: a temporary
        // one, not `./tessera-data` in the source tree.
        let data = tempfile::tempdir().expect("a temporary directory");
        let data_dir = data.path().to_str().expect("a UTF-8 path").to_owned();
        let mut args = args.to_vec();
        if args.first() == Some(&"dev") && !args.contains(&"--data-dir") {
            args.extend(["--data-dir", data_dir.as_str()]);
        }
        let cli =
            crate::Cli::try_parse_from(std::iter::once("tessera").chain(args.iter().copied()))
                .expect("the arguments parse");
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        plan(cli.command, &env)
    }

    fn refusal(args: &[&str], env: &[(&str, &str)]) -> String {
        match plan_of(args, env) {
            Ok(_) => panic!("{args:?} with {env:?} is accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    /// The TLS of a planned service.
    fn tls_of(plan: anyhow::Result<Plan>) -> Option<Tls> {
        match plan {
            Ok(Plan::Serve { tls, .. }) => tls,
            Ok(_) => panic!("not a service"),
            Err(e) => panic!("refused: {e:#}"),
        }
    }

    #[test]
    fn plaintext_grpc_beyond_loopback_is_refused_unless_allowed() {
        let beyond = ["identity", "--grpc-addr", "0.0.0.0:50051"];
        let err = refusal(&beyond, &[DB]);
        assert!(
            err.starts_with(
                "invalid configuration: the gRPC address 0.0.0.0:50051 is not loopback and TLS \
                 is off"
            ) && err.contains("tls.allow_plaintext = true"),
            "{err}"
        );
        let allowed = plan_of(&beyond, &[DB, ("TESSERA__TLS__ALLOW_PLAINTEXT", "true")]);
        assert!(tls_of(allowed).is_none());
        let loopback = plan_of(&["identity", "--grpc-addr", "127.0.0.1:50051"], &[DB]);
        assert!(tls_of(loopback).is_none());
        // `tessera dev` binds loopback by default and needs nothing; beyond, the same rule.
        assert!(tls_of(plan_of(&["dev"], &[])).is_none());
        let err = refusal(&["dev", "--grpc-addr", "0.0.0.0:50051"], &[]);
        assert!(err.contains("is not loopback and TLS is off"), "{err}");
    }

    #[test]
    fn configured_tokens_have_the_scopes_their_setting_promises() {
        use tessera_server::access::Scope;
        let err = refusal(
            &["ingestion"],
            &[DB, ("TESSERA__AUTH__BOOTSTRAP_TOKEN", "too-short")],
        );
        assert_eq!(
            err,
            "invalid configuration: auth.bootstrap_token: at least 32 characters, without spaces \
             or colons"
        );
        let settings = |plan: anyhow::Result<Plan>| match plan {
            Ok(Plan::Serve { settings, .. }) => settings,
            Ok(_) => panic!("not a service"),
            Err(e) => panic!("refused: {e:#}"),
        };
        let bootstrap = (
            "TESSERA__AUTH__BOOTSTRAP_TOKEN",
            "tat_0123456789abcdef0123456789abcdef",
        );
        let legacy = ("TESSERA_ACCESS_TOKEN", "legacy-profile-api-token");
        let prod = settings(plan_of(&["profile"], &[DB, bootstrap, legacy]));
        let tokens = config_tokens(&prod, false);
        let by_name = |name: &str| {
            tokens
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.scopes.iter().copied().collect::<Vec<_>>())
        };
        assert_eq!(by_name("auth.bootstrap_token"), Some(Scope::ALL.to_vec()));
        assert_eq!(
            by_name("profile.access_token"),
            Some(vec![Scope::ProfilesRead])
        );
        // The bootstrap token given as TESSERA_ACCESS_TOKEN too (for the CLI beside the
        // service) keeps every scope: one token, not a read-only one shadowing it.
        let same = settings(plan_of(
            &["ingestion"],
            &[DB, bootstrap, ("TESSERA_ACCESS_TOKEN", bootstrap.1)],
        ));
        let tokens = config_tokens(&same, false);
        assert_eq!(
            tokens.len(),
            1,
            "{:?}",
            tokens.iter().map(|t| &t.name).collect::<Vec<_>>()
        );
        assert_eq!(tokens[0].scopes.len(), Scope::ALL.len());
        // tessera dev's token (given, or made up and printed) has every scope.
        let dev = settings(plan_of(
            &["dev", "--access-token", "tat_dev-token-1234567890"],
            &[],
        ));
        let tokens = config_tokens(&dev, true);
        assert_eq!(tokens.len(), 1);
        assert_eq!(tokens[0].name, "dev");
        assert_eq!(tokens[0].secret.0, "tat_dev-token-1234567890");
        assert_eq!(tokens[0].scopes.len(), 4);
    }

    #[test]
    fn unusable_otlp_tls_files_are_refused_by_variable() {
        let https = ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otel-collector:4317");
        let err = refusal(
            &["scoring"],
            &[
                DB,
                https,
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/otlp-ca.pem"),
            ],
        );
        assert!(
            err.starts_with(
                "invalid configuration: OTEL_EXPORTER_OTLP_CERTIFICATE \
                 (telemetry.otlp_certificate): /nonexistent/otlp-ca.pem: cannot read"
            ),
            "{err}"
        );
        let err = refusal(
            &["scoring"],
            &[
                DB,
                https,
                (
                    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                    "/etc/otlp/client.pem",
                ),
            ],
        );
        assert!(
            err.contains("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")
                && err.contains("but OTEL_EXPORTER_OTLP_CLIENT_KEY")
                && err.contains("is not"),
            "{err}"
        );
        // The files matter only for an https:// endpoint.
        let plaintext = plan_of(
            &["scoring"],
            &[
                DB,
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector:4317"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/otlp-ca.pem"),
            ],
        );
        assert!(tls_of(plaintext).is_none());
    }

    #[test]
    fn half_configured_or_unreadable_tls_is_refused_by_setting() {
        let err = refusal(
            &["scoring"],
            &[
                DB,
                ("TESSERA__TLS__CERT_FILE", "/etc/tessera/tls/scoring.pem"),
            ],
        );
        assert_eq!(
            err,
            "invalid configuration: tls.ca_file, tls.cert_file and tls.key_file go together: set \
             all three for TLS, or none (missing: tls.ca_file, tls.key_file)"
        );
        let err = refusal(
            &["scoring"],
            &[
                DB,
                ("TESSERA__TLS__CA_FILE", "/nonexistent/ca.pem"),
                ("TESSERA__TLS__CERT_FILE", "/nonexistent/scoring.pem"),
                ("TESSERA__TLS__KEY_FILE", "/nonexistent/scoring-key.pem"),
            ],
        );
        assert!(
            err.starts_with("invalid configuration: tls.ca_file: cannot read /nonexistent/ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn tls_calls_https_peers_and_plaintext_http_ones() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_str().unwrap();
        match plan_of(&["dev-certs", "--out", out], &[]) {
            Ok(Plan::DevCerts(args)) => crate::dev_certs::run(&args).unwrap(),
            Ok(_) => panic!("not dev-certs"),
            Err(e) => panic!("{e:#}"),
        }
        let file = |name: &str| format!("{out}/{name}");
        let (ca, cert, key) = (
            file("ca.pem"),
            file("identity.pem"),
            file("identity-key.pem"),
        );
        let tls = [
            DB,
            ("TESSERA__TLS__CA_FILE", ca.as_str()),
            ("TESSERA__TLS__CERT_FILE", cert.as_str()),
            ("TESSERA__TLS__KEY_FILE", key.as_str()),
        ];
        let beyond = ["identity", "--grpc-addr", "0.0.0.0:50051"];
        let err = refusal(&beyond, &tls);
        assert_eq!(
            err,
            "invalid configuration: peers.profile = \"http://127.0.0.1:50053\" must be an \
             https:// URL: with TLS on, peers are called over mutual TLS"
        );
        let https = [
            &tls[..],
            &[("TESSERA__PEERS__PROFILE", "https://profile:50051")],
        ]
        .concat();
        assert!(tls_of(plan_of(&beyond, &https)).is_some());

        let err = refusal(
            &["identity"],
            &[DB, ("TESSERA__PEERS__PROFILE", "https://profile:50051")],
        );
        assert!(
            err.starts_with(
                "invalid configuration: peers.profile = \"https://profile:50051\" is an https:// \
                 URL but TLS is off"
            ),
            "{err}"
        );

        // Another service's key with this one's certificate is refused, by name.
        let wrong_key = file("profile-key.pem");
        let mut mixed = tls;
        mixed[3] = ("TESSERA__TLS__KEY_FILE", wrong_key.as_str());
        let err = refusal(&beyond, &mixed);
        assert!(
            err.starts_with("invalid configuration: tls.key_file: ")
                && err.contains("not the private key of tls.cert_file"),
            "{err}"
        );
    }
}
