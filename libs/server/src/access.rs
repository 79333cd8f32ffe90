//! Scoped access tokens for the external APIs, and the audit log.
//!
//! Every external gRPC method and HTTP route has one [`Rule`], in [`GRPC_RULES`] and
//! [`HTTP_RULES`]: open (health, reflection, metrics), a source's write key (event writes), a
//! client certificate (the internal services, see [`crate::tls`]), or an access token with one
//! [`Scope`]. A token carries a set of scopes and allows exactly the methods whose scope it
//! holds: no scope implies another.
//!
//! Tokens are long random strings (`tat_` and 43 characters); only their SHA-256 digest is
//! stored (a fast hash is right for secrets with this much entropy), in the `access_tokens`
//! table of the `auth` schema ([`TokenStore`], Postgres or SQLite). [`Access`] checks a token:
//! it looks the digest up (cached per replica for a few seconds, so a revoked or rotated token
//! stops working on every replica within the cache's time to live) and compares digests in
//! constant time. [`AccessLayer`] enforces the rules on the gRPC port and writes an audit record
//! for every call that needs `admin`, `privacy` or `profiles:write`, allowed or refused.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use sqlx::Row as _;
use sqlx::migrate::Migrator;
use subtle::ConstantTimeEq as _;
use tessera_store::{Database, Migrations};
use time::OffsetDateTime;

/// The Postgres schema of the token and audit tables.
pub const SCHEMA: &str = "auth";

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The migrations of the token and audit tables, per backend.
pub static MIGRATIONS: Migrations = Migrations {
    postgres: &POSTGRES_MIGRATIONS,
    sqlite: &SQLITE_MIGRATIONS,
};

/// The prefix of every access token, so a leaked one is recognisable (secret scanners).
pub const TOKEN_PREFIX: &str = "tat_";

/// The `[auth]` settings.
#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// A token with every scope, given in configuration (`TESSERA__AUTH__BOOTSTRAP_TOKEN`, from
    /// a Secret): for the first steps of a deployment, before `tessera tokens create` has made
    /// stored ones. Not rotatable or revocable but by changing the configuration; remove it
    /// once stored tokens exist. At least 32 characters.
    pub bootstrap_token: Option<Secret>,
    /// How long a replica remembers a token check, in milliseconds: a rotated or revoked token
    /// keeps working at most this long.
    pub token_cache_ms: u64,
    /// How long audit records are kept, in days; older ones are deleted every hour by every
    /// replica that checks tokens (deleting twice is harmless). 0 keeps them forever.
    pub audit_retention_days: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            bootstrap_token: None,
            token_cache_ms: 5_000,
            audit_retention_days: 365,
        }
    }
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field(
                "bootstrap_token",
                &self.bootstrap_token.as_ref().map(|_| "***"),
            )
            .field("token_cache_ms", &self.token_cache_ms)
            .field("audit_retention_days", &self.audit_retention_days)
            .finish()
    }
}

impl AuthSettings {
    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(token) = &self.bootstrap_token
            && (token.0.len() < 32 || token.0.chars().any(|c| c.is_whitespace() || c == ':'))
        {
            return Err(
                "auth.bootstrap_token: at least 32 characters, without spaces or colons".to_owned(),
            );
        }
        if self.token_cache_ms > 60_000 {
            return Err(
                "auth.token_cache_ms: at most 60000 (a revoked token must stop working \
                        within a minute)"
                    .to_owned(),
            );
        }
        Ok(())
    }

    /// The bootstrap token as a configured token, when set.
    pub fn bootstrap(&self) -> Option<ConfigToken> {
        self.bootstrap_token.clone().map(|secret| ConfigToken {
            name: "auth.bootstrap_token".to_owned(),
            secret,
            scopes: Scope::ALL.into_iter().collect(),
        })
    }
}

/// What an access token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Read profiles, audiences, accounts, the change stream and the definitions in effect.
    ProfilesRead,
    /// Change what profiles hold: declare, change and delete computed traits and audiences.
    ProfilesWrite,
    /// Run the platform: sources and write keys, tracking plans, quarantine, the event
    /// debugger, webhook dead letters.
    Admin,
    /// Data-subject requests: export a person's data, delete a person.
    Privacy,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Self; 4] = [
        Self::ProfilesRead,
        Self::ProfilesWrite,
        Self::Admin,
        Self::Privacy,
    ];

    /// The scope's name: `profiles:read`, `profiles:write`, `admin`, `privacy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProfilesRead => "profiles:read",
            Self::ProfilesWrite => "profiles:write",
            Self::Admin => "admin",
            Self::Privacy => "privacy",
        }
    }

    /// Whether calls needing this scope are audit-logged.
    pub fn audited(self) -> bool {
        match self {
            Self::ProfilesRead => false,
            Self::ProfilesWrite | Self::Admin | Self::Privacy => true,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?}: one of profiles:read, profiles:write, admin, privacy")]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| UnknownScope(s.to_owned()))
    }
}

/// What a call must present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Nothing: health checks, reflection, metrics.
    Open,
    /// A source's write key (checked by the ingestion service; it writes to that source only).
    WriteKey,
    /// A client certificate of the deployment's CA (internal services, when TLS is on).
    ClientCert,
    /// An access token holding this scope.
    Token(Scope),
}

/// The rule of every gRPC service (`package.Service`) or method (`package.Service/Method`); a
/// method's entry wins over its service's. This table and [`HTTP_RULES`] are the one place
/// that decides who may call what (docs/operations.md shows them).
pub const GRPC_RULES: &[(&str, Rule)] = &[
    ("grpc.health.v1.Health", Rule::Open),
    ("grpc.reflection.v1.ServerReflection", Rule::Open),
    ("grpc.reflection.v1alpha.ServerReflection", Rule::Open),
    ("tessera.ingestion.v1.IngestionService", Rule::WriteKey),
    (
        "tessera.ingestion.v1.SourceService",
        Rule::Token(Scope::Admin),
    ),
    (
        "tessera.ingestion.v1.TrackingPlanService",
        Rule::Token(Scope::Admin),
    ),
    (
        "tessera.ingestion.v1.DebuggerService",
        Rule::Token(Scope::Admin),
    ),
    ("tessera.ingestion.v1.EventLogService", Rule::ClientCert),
    (
        "tessera.profile.v1.ProfileService",
        Rule::Token(Scope::ProfilesRead),
    ),
    (
        "tessera.profile.v1.ProfileService/ExportProfile",
        Rule::Token(Scope::Privacy),
    ),
    (
        "tessera.profile.v1.ProfileService/DeleteProfile",
        Rule::Token(Scope::Privacy),
    ),
    (
        "tessera.profile.v1.DefinitionService",
        Rule::Token(Scope::ProfilesWrite),
    ),
    (
        "tessera.profile.v1.DefinitionService/GetComputedTrait",
        Rule::Token(Scope::ProfilesRead),
    ),
    (
        "tessera.profile.v1.DefinitionService/ListComputedTraits",
        Rule::Token(Scope::ProfilesRead),
    ),
    (
        "tessera.profile.v1.DefinitionService/GetAudience",
        Rule::Token(Scope::ProfilesRead),
    ),
    (
        "tessera.profile.v1.DefinitionService/ListAudienceDefinitions",
        Rule::Token(Scope::ProfilesRead),
    ),
    (
        "tessera.profile.v1.DestinationService",
        Rule::Token(Scope::Admin),
    ),
    (
        "tessera.profile.v1.ProfilePipelineService",
        Rule::ClientCert,
    ),
    ("tessera.identity.v1.IdentityService", Rule::ClientCert),
    // Batch match jobs merge people across the whole population: an operator's call.
    (
        "tessera.identity.v1.BatchMatchService",
        Rule::Token(Scope::Admin),
    ),
    ("tessera.scoring.v1.ScoringService", Rule::ClientCert),
];

/// The rule of every HTTP route (the HTTP port of each service).
pub const HTTP_RULES: &[(&str, Rule)] = &[
    ("GET /healthz", Rule::Open),
    ("GET /metrics", Rule::Open),
    (
        "POST /v1/{identify,track,page,screen,group,alias,batch,import} (and /v1/i, /v1/t, ...)",
        Rule::WriteKey,
    ),
    (
        "GET /v1/spaces/{space_id}/collections/{users,accounts}/profiles/{id}/{resource}",
        Rule::Token(PROFILE_API_SCOPE),
    ),
];

/// The scope of the Segment-compatible Profile API (HTTP).
pub const PROFILE_API_SCOPE: Scope = Scope::ProfilesRead;

/// The rule of a gRPC request path (`/package.Service/Method`). A path in no entry needs
/// `admin`: a method nobody classified is closed to all but administrators.
pub fn grpc_rule(path: &str) -> Rule {
    let method = path.strip_prefix('/').unwrap_or(path);
    let service = method.split('/').next().unwrap_or("");
    let find = |key: &str| {
        GRPC_RULES
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, rule)| *rule)
    };
    find(method)
        .or_else(|| find(service))
        .unwrap_or(Rule::Token(Scope::Admin))
}

/// Who called: the token that authenticated a call. Handlers find it in the request's
/// extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's id.
    pub token_id: String,
    /// The token's name.
    pub name: String,
    /// The token's scopes.
    pub scopes: BTreeSet<Scope>,
}

/// A token's record, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// The token's id.
    pub id: String,
    /// Its unique name.
    pub name: String,
    /// Its scopes.
    pub scopes: BTreeSet<Scope>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When its secret was last replaced.
    pub rotated_at: Option<OffsetDateTime>,
    /// When it was revoked; a revoked token authenticates nothing.
    pub revoked_at: Option<OffsetDateTime>,
}

/// A token's secret, shown once (on create and rotate); never in `Debug`.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Its position in the log (increasing).
    pub id: i64,
    /// When the call ended.
    pub at: OffsetDateTime,
    /// The calling token's id.
    pub token_id: String,
    /// The calling token's name.
    pub token_name: String,
    /// The gRPC method (`/package.Service/Method`) or HTTP route.
    pub action: String,
    /// What the call acted on, when the handler said.
    pub target: Option<String>,
    /// The gRPC status code name (`Ok`, `NotFound`, `PermissionDenied`, ...).
    pub outcome: String,
    /// The request's id (`x-request-id`, else its trace id, else one made up).
    pub request_id: String,
}

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A token with this name exists.
    #[error("a token named {0:?} exists")]
    Exists(String),
    /// No token has this name (or id).
    #[error("no token named {0:?}")]
    NotFound(String),
    /// The name is empty, too long or has spaces.
    #[error("invalid token name {0:?}: 1 to 100 characters, no whitespace")]
    InvalidName(String),
    /// No scope was given.
    #[error("a token needs at least one scope: profiles:read, profiles:write, admin, privacy")]
    NoScopes,
}

/// SHA-256 of a token's secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn new_secret() -> Secret {
    use rand::Rng as _;
    use rand::distr::Alphanumeric;
    // 43 alphanumeric characters: about 256 bits.
    let body: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(43)
        .map(char::from)
        .collect();
    Secret(format!("{TOKEN_PREFIX}{body}"))
}

fn scopes_text(scopes: &BTreeSet<Scope>) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Scopes from the stored text; an unknown name (written by a newer version) is skipped.
fn parse_scopes(text: &str) -> BTreeSet<Scope> {
    text.split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Runs `$body` with `$pool` bound to the Postgres or the SQLite pool: the SQL here is the same
/// on both backends.
macro_rules! on_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            Database::Postgres($pool) => $body,
            Database::Sqlite($pool) => $body,
        }
    };
}

fn token_info<R>(row: &R) -> Result<TokenInfo, sqlx::Error>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    OffsetDateTime: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(TokenInfo {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        scopes: parse_scopes(&row.try_get::<String, _>("scopes")?),
        created_at: row.try_get("created_at")?,
        rotated_at: row.try_get("rotated_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

/// The `access_tokens` and `audit_log` tables (connect with `Database::connect(url, SCHEMA, ..)`
/// and migrate with [`MIGRATIONS`]).
#[derive(Debug, Clone)]
pub struct TokenStore {
    db: Database,
}

impl TokenStore {
    /// The store over `db`.
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Creates a token named `name` with `scopes`; answers it and its secret (shown once).
    pub async fn create(
        &self,
        name: &str,
        scopes: &BTreeSet<Scope>,
    ) -> Result<(TokenInfo, Secret), AccessError> {
        if name.is_empty() || name.len() > 100 || name.chars().any(char::is_whitespace) {
            return Err(AccessError::InvalidName(name.to_owned()));
        }
        if scopes.is_empty() {
            return Err(AccessError::NoScopes);
        }
        let secret = new_secret();
        let info = TokenInfo {
            id: uuid::Uuid::now_v7().to_string(),
            name: name.to_owned(),
            scopes: scopes.clone(),
            created_at: OffsetDateTime::now_utc(),
            rotated_at: None,
            revoked_at: None,
        };
        let sql = "INSERT INTO access_tokens (id, name, scopes, digest, created_at) \
                   VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING";
        let inserted = on_pool!(&self.db, |pool| sqlx::query(sql)
            .bind(&info.id)
            .bind(&info.name)
            .bind(scopes_text(scopes))
            .bind(digest(&secret.0).to_vec())
            .bind(info.created_at)
            .execute(pool)
            .await?
            .rows_affected());
        if inserted == 0 {
            return Err(AccessError::Exists(name.to_owned()));
        }
        Ok((info, secret))
    }

    /// Every token, revoked ones too, by name.
    pub async fn list(&self) -> Result<Vec<TokenInfo>, AccessError> {
        let sql = "SELECT id, name, scopes, created_at, rotated_at, revoked_at \
                   FROM access_tokens ORDER BY name";
        let tokens = on_pool!(&self.db, |pool| {
            let rows = sqlx::query(sql).fetch_all(pool).await?;
            rows.iter().map(token_info).collect::<Result<Vec<_>, _>>()?
        });
        Ok(tokens)
    }

    /// Replaces the secret of the token named (or with the id) `name`: the old secret stops
    /// working (within the verification cache's time to live). A revoked token cannot be
    /// rotated.
    pub async fn rotate(&self, name: &str) -> Result<(TokenInfo, Secret), AccessError> {
        let secret = new_secret();
        let sql = "UPDATE access_tokens SET digest = $1, rotated_at = $2 \
                   WHERE (name = $3 OR id = $3) AND revoked_at IS NULL \
                   RETURNING id, name, scopes, created_at, rotated_at, revoked_at";
        let now = OffsetDateTime::now_utc();
        let info = on_pool!(&self.db, |pool| {
            let row = sqlx::query(sql)
                .bind(digest(&secret.0).to_vec())
                .bind(now)
                .bind(name)
                .fetch_optional(pool)
                .await?;
            row.as_ref().map(token_info).transpose()?
        });
        info.map(|info| (info, secret))
            .ok_or_else(|| AccessError::NotFound(name.to_owned()))
    }

    /// Revokes the token named (or with the id) `name`, for good. Revoking it again is a
    /// no-op that answers it.
    pub async fn revoke(&self, name: &str) -> Result<TokenInfo, AccessError> {
        let sql = "UPDATE access_tokens SET revoked_at = COALESCE(revoked_at, $1) \
                   WHERE name = $2 OR id = $2 \
                   RETURNING id, name, scopes, created_at, rotated_at, revoked_at";
        let now = OffsetDateTime::now_utc();
        let info = on_pool!(&self.db, |pool| {
            let row = sqlx::query(sql)
                .bind(now)
                .bind(name)
                .fetch_optional(pool)
                .await?;
            row.as_ref().map(token_info).transpose()?
        });
        info.ok_or_else(|| AccessError::NotFound(name.to_owned()))
    }

    /// The live (not revoked) token whose secret has this digest.
    pub async fn find(&self, digest: &[u8; 32]) -> Result<Option<Caller>, AccessError> {
        let sql = "SELECT id, name, scopes, digest FROM access_tokens \
                   WHERE digest = $1 AND revoked_at IS NULL";
        let found = on_pool!(&self.db, |pool| {
            match sqlx::query(sql)
                .bind(digest.to_vec())
                .fetch_optional(pool)
                .await?
            {
                Some(row) => {
                    let stored: Vec<u8> = row.try_get("digest")?;
                    // The index found it by equality; compare again in constant time so no
                    // timing reaches the caller from this code.
                    let same: bool = stored.as_slice().ct_eq(digest.as_slice()).into();
                    if same {
                        Some(Caller {
                            token_id: row.try_get("id")?,
                            name: row.try_get("name")?,
                            scopes: parse_scopes(&row.try_get::<String, _>("scopes")?),
                        })
                    } else {
                        None
                    }
                }
                None => None,
            }
        });
        Ok(found)
    }

    /// Appends an audit record (its `id` is assigned here).
    pub async fn append_audit(&self, record: &AuditRecord) -> Result<(), AccessError> {
        let sql = "INSERT INTO audit_log \
                   (at, token_id, token_name, action, target, outcome, request_id) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7)";
        on_pool!(&self.db, |pool| sqlx::query(sql)
            .bind(record.at)
            .bind(&record.token_id)
            .bind(&record.token_name)
            .bind(&record.action)
            .bind(&record.target)
            .bind(&record.outcome)
            .bind(&record.request_id)
            .execute(pool)
            .await
            .map(|_| ())?);
        Ok(())
    }

    /// Deletes the audit records written before `before`, at most 10,000 per statement so a
    /// large backlog does not hold one long transaction; answers how many went.
    pub async fn prune_audit(&self, before: OffsetDateTime) -> Result<u64, AccessError> {
        let sql = "DELETE FROM audit_log WHERE id IN \
                   (SELECT id FROM audit_log WHERE at < $1 ORDER BY at LIMIT 10000)";
        let mut total = 0;
        loop {
            let deleted = on_pool!(&self.db, |pool| sqlx::query(sql)
                .bind(before)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())?);
            total += deleted;
            if deleted < 10_000 {
                return Ok(total);
            }
        }
    }

    /// Every hour until `shutdown`, deletes the audit records older than `retention_days`
    /// (nothing when 0).
    pub fn spawn_audit_pruning(&self, retention_days: u64, shutdown: crate::Shutdown) {
        if retention_days == 0 {
            return;
        }
        let store = self.clone();
        let retention =
            time::Duration::days(i64::try_from(retention_days).unwrap_or(i64::MAX / 86_400_000));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(3_600));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                let before = OffsetDateTime::now_utc()
                    .checked_sub(retention)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                match store.prune_audit(before).await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::info!(deleted, "old audit records deleted"),
                    Err(error) => tracing::warn!(%error, "deleting old audit records failed"),
                }
            }
        });
    }

    /// The newest `limit` audit records, newest first.
    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditRecord>, AccessError> {
        let sql = "SELECT id, at, token_id, token_name, action, target, outcome, request_id \
                   FROM audit_log ORDER BY id DESC LIMIT $1";
        let records = on_pool!(&self.db, |pool| {
            let rows = sqlx::query(sql)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok::<_, sqlx::Error>(AuditRecord {
                        id: row.try_get("id")?,
                        at: row.try_get("at")?,
                        token_id: row.try_get("token_id")?,
                        token_name: row.try_get("token_name")?,
                        action: row.try_get("action")?,
                        target: row.try_get("target")?,
                        outcome: row.try_get("outcome")?,
                        request_id: row.try_get("request_id")?,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        });
        Ok(records)
    }
}

/// A token given in configuration rather than stored (`tessera dev`'s token, the legacy
/// `profile.access_token`); not rotatable or revocable but by changing the configuration.
#[derive(Clone)]
pub struct ConfigToken {
    /// Its name in audit records.
    pub name: String,
    /// Its secret.
    pub secret: Secret,
    /// Its scopes.
    pub scopes: BTreeSet<Scope>,
}

impl fmt::Debug for ConfigToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigToken")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// Why a call was refused.
#[derive(Debug, Clone)]
pub enum Denied {
    /// No token was sent.
    Missing,
    /// The token is unknown, rotated away or revoked.
    Unknown,
    /// The token lacks the scope.
    Scope {
        /// The scope the call needs.
        needed: Scope,
        /// The token.
        caller: Arc<Caller>,
    },
    /// The token could not be checked (the database failed); retryable.
    Unavailable,
}

impl Denied {
    /// The gRPC status of the refusal of `path`.
    pub fn status(&self, path: &str) -> tonic::Status {
        match self {
            Self::Missing => tonic::Status::unauthenticated(
                "an access token is required: send the metadata `authorization: Bearer <token>`",
            ),
            Self::Unknown => tonic::Status::unauthenticated(
                "the access token is not valid (unknown, rotated or revoked)",
            ),
            Self::Scope { needed, .. } => tonic::Status::permission_denied(format!(
                "the access token lacks the scope `{needed}`, which {path} requires"
            )),
            Self::Unavailable => tonic::Status::unavailable(
                "the access token cannot be checked right now, retry later",
            ),
        }
    }

    /// The HTTP status and JSON body (`{"error": {"code", "message"}}`) of the refusal.
    pub fn http(&self) -> (http::StatusCode, &'static str, String) {
        match self {
            Self::Missing => (
                http::StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an access token is required: send `Authorization: Bearer <token>` (or the token \
                 as the HTTP Basic user name, with an empty password)"
                    .to_owned(),
            ),
            Self::Unknown => (
                http::StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the access token is not valid (unknown, rotated or revoked)".to_owned(),
            ),
            Self::Scope { needed, .. } => (
                http::StatusCode::FORBIDDEN,
                "forbidden",
                format!("the access token lacks the scope `{needed}`, which this API requires"),
            ),
            Self::Unavailable => (
                http::StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the access token cannot be checked right now, retry later".to_owned(),
            ),
        }
    }
}

/// The token of a request: `authorization: Bearer <token>`, or the user name of HTTP Basic
/// auth (Segment's Profile API clients send it so).
pub fn token_of(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let value = value.trim();
    if let Some((scheme, token)) = value.split_once(' ')
        && scheme.eq_ignore_ascii_case("bearer")
    {
        let token = token.trim();
        return (!token.is_empty()).then(|| token.to_owned());
    }
    crate::basic_auth_user(value)
}

struct AccessInner {
    store: Option<TokenStore>,
    /// Each configured token's caller (made once, not per request) and secret's digest.
    config: Vec<(Arc<Caller>, [u8; 32])>,
    /// Digest → the live token with it, or none; errors are not cached.
    cache: moka::future::Cache<[u8; 32], Option<Arc<Caller>>>,
}

/// Checks access tokens and writes the audit log; cheap to clone.
#[derive(Clone)]
pub struct Access {
    inner: Arc<AccessInner>,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access")
            .field("stored", &self.inner.store.is_some())
            .field("config_tokens", &self.inner.config.len())
            .finish()
    }
}

impl Access {
    /// Checks tokens of `store` (and `config` tokens), remembering each answer for `ttl`: a
    /// revoked or rotated token works at most that long on a replica that just checked it.
    pub fn new(store: Option<TokenStore>, config: Vec<ConfigToken>, ttl: Duration) -> Self {
        let config = config
            .into_iter()
            .map(|token| {
                let digest = digest(&token.secret.0);
                let caller = Caller {
                    token_id: format!("config:{}", token.name),
                    name: token.name,
                    scopes: token.scopes,
                };
                (Arc::new(caller), digest)
            })
            .collect();
        Self {
            inner: Arc::new(AccessInner {
                store,
                config,
                cache: moka::future::Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(ttl)
                    .build(),
            }),
        }
    }

    /// The token with this secret, if it is live.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<Arc<Caller>>, AccessError> {
        let digest = digest(secret);
        // Every configured token is compared, in constant time, whichever matches.
        let mut configured = None;
        for (caller, stored) in &self.inner.config {
            if bool::from(stored.ct_eq(&digest)) {
                configured = Some(Arc::clone(caller));
            }
        }
        if configured.is_some() {
            return Ok(configured);
        }
        let Some(store) = &self.inner.store else {
            return Ok(None);
        };
        if let Some(cached) = self.inner.cache.get(&digest).await {
            return Ok(cached);
        }
        let found = store.find(&digest).await?.map(Arc::new);
        self.inner.cache.insert(digest, found.clone()).await;
        Ok(found)
    }

    /// The caller of a request with `headers`, if its token holds `scope`.
    pub async fn authorize(
        &self,
        headers: &http::HeaderMap,
        scope: Scope,
    ) -> Result<Arc<Caller>, Denied> {
        let secret = token_of(headers).ok_or(Denied::Missing)?;
        let caller = match self.authenticate(&secret).await {
            Ok(Some(caller)) => caller,
            Ok(None) => return Err(Denied::Unknown),
            Err(error) => {
                tracing::error!(%error, "checking an access token failed");
                return Err(Denied::Unavailable);
            }
        };
        if caller.scopes.contains(&scope) {
            Ok(caller)
        } else {
            Err(Denied::Scope {
                needed: scope,
                caller,
            })
        }
    }

    /// Appends an audit record; a failure is logged (the action already happened).
    pub async fn audit(
        &self,
        caller: &Caller,
        action: &str,
        target: Option<String>,
        outcome: &str,
        request_id: String,
    ) {
        let Some(store) = &self.inner.store else {
            tracing::info!(
                token = %caller.name,
                action,
                outcome,
                request_id,
                "audit (no token store)"
            );
            return;
        };
        let record = AuditRecord {
            id: 0,
            at: OffsetDateTime::now_utc(),
            token_id: caller.token_id.clone(),
            token_name: caller.name.clone(),
            action: action.to_owned(),
            target,
            outcome: outcome.to_owned(),
            request_id,
        };
        if let Err(error) = store.append_audit(&record).await {
            tracing::error!(%error, action, "writing the audit log failed");
        }
    }
}

/// The id of a request: `x-request-id`, else the trace id of its `traceparent`, else a new one.
pub fn request_id(headers: &http::HeaderMap) -> String {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(id) = header("x-request-id").filter(|id| !id.is_empty() && id.len() <= 200) {
        return id.to_owned();
    }
    if let Some(trace) = header("traceparent").and_then(|t| t.split('-').nth(1))
        && trace.len() == 32
    {
        return trace.to_owned();
    }
    uuid::Uuid::new_v4().simple().to_string()
}

/// Where the handler of an audited call names what it acted on (a profile id, a source name;
/// never an identifier value), for the audit record's `target`.
#[derive(Debug, Clone, Default)]
pub struct AuditTarget(Arc<std::sync::Mutex<Option<String>>>);

impl AuditTarget {
    /// The slot of `request` (one that goes nowhere when the call is not audited).
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<Self>()
            .cloned()
            .unwrap_or_default()
    }

    /// Names the call's target.
    pub fn set(&self, target: impl Into<String>) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(target.into());
        }
    }

    fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// A tower layer that enforces [`GRPC_RULES`]' token rules on the gRPC port and writes the
/// audit log; passes everything when off (no [`Access`]).
#[derive(Debug, Clone)]
pub struct AccessLayer {
    access: Option<Access>,
}

impl AccessLayer {
    /// The layer; `None` turns it off (tests of one service without tokens).
    pub fn new(access: Option<Access>) -> Self {
        Self { access }
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = RequireToken<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireToken {
            inner,
            access: self.access.clone(),
        }
    }
}

/// See [`AccessLayer`].
#[derive(Debug, Clone)]
pub struct RequireToken<S> {
    inner: S,
    access: Option<Access>,
}

/// The name of a gRPC status code in response headers (trailers-only errors); `Ok` when there
/// is none (the status then comes in the trailers, after the answer).
fn outcome<R>(response: &http::Response<R>) -> String {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
    format!("{code:?}")
}

impl<S, B, R> tower::Service<http::Request<B>> for RequireToken<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let Some(access) = self.access.clone() else {
            return Box::pin(self.inner.call(req));
        };
        let path = req.uri().path().to_owned();
        let scope = match grpc_rule(&path) {
            Rule::Token(scope) => scope,
            Rule::Open | Rule::WriteKey | Rule::ClientCert => {
                return Box::pin(self.inner.call(req));
            }
        };
        // The ready service answers this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            match access.authorize(req.headers(), scope).await {
                Ok(caller) => {
                    // Only audit records carry it (reads are not audited: no id to make).
                    let request_id = scope.audited().then(|| request_id(req.headers()));
                    req.extensions_mut().insert(caller.clone());
                    let target = AuditTarget::default();
                    req.extensions_mut().insert(target.clone());
                    let response = inner.call(req).await?;
                    if let Some(request_id) = request_id {
                        let outcome = outcome(&response);
                        access
                            .audit(&caller, &path, target.take(), &outcome, request_id)
                            .await;
                    }
                    Ok(response)
                }
                Err(denied) => {
                    let reason = match &denied {
                        Denied::Missing => "missing",
                        Denied::Unknown => "unknown",
                        Denied::Scope { .. } => "scope",
                        Denied::Unavailable => "unavailable",
                    };
                    metrics::counter!(
                        "tessera_access_denied_total",
                        "scope" => scope.as_str(),
                        "reason" => reason
                    )
                    .increment(1);
                    if let Denied::Scope { caller, .. } = &denied
                        && scope.audited()
                    {
                        let request_id = request_id(req.headers());
                        access
                            .audit(caller, &path, None, "PermissionDenied", request_id)
                            .await;
                    }
                    Ok(denied.status(&path).into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_take_their_own_rule_before_their_services() {
        assert_eq!(
            grpc_rule("/tessera.profile.v1.ProfileService/GetProfile"),
            Rule::Token(Scope::ProfilesRead)
        );
        assert_eq!(
            grpc_rule("/tessera.profile.v1.ProfileService/DeleteProfile"),
            Rule::Token(Scope::Privacy)
        );
        assert_eq!(
            grpc_rule("/tessera.ingestion.v1.IngestionService/IngestEvents"),
            Rule::WriteKey
        );
        assert_eq!(
            grpc_rule("/tessera.identity.v1.IdentityService/ForgetProfile"),
            Rule::ClientCert
        );
        assert_eq!(grpc_rule("/grpc.health.v1.Health/Check"), Rule::Open);
        // Unclassified paths are for administrators only.
        assert_eq!(
            grpc_rule("/tessera.profile.v1.Unknown/Any"),
            Rule::Token(Scope::Admin)
        );
        assert_eq!(grpc_rule(""), Rule::Token(Scope::Admin));
    }

    #[test]
    fn every_rpc_of_the_contracts_is_classified_on_purpose() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(tessera_proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let mut services = 0;
        for file in &set.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                services += 1;
                assert!(
                    GRPC_RULES.iter().any(|(key, _)| *key == name),
                    "{name} has no entry in GRPC_RULES: decide who may call it"
                );
            }
        }
        assert!(services >= 11, "only {services} services in the contracts");
        // Every method entry names a real method.
        for (key, _) in GRPC_RULES {
            if let Some((service, method)) = key.split_once('/') {
                let exists = set.file.iter().any(|f| {
                    f.service.iter().any(|s| {
                        format!("{}.{}", f.package(), s.name()) == service
                            && s.method.iter().any(|m| m.name() == method)
                    })
                });
                assert!(exists, "GRPC_RULES names {key}, which does not exist");
            }
        }
        // The internal services of mTLS are exactly the client-certificate ones here.
        for service in crate::tls::INTERNAL_SERVICES {
            assert_eq!(grpc_rule(&format!("/{service}/Any")), Rule::ClientCert);
        }
    }

    #[test]
    fn scopes_parse_by_name_only() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
        }
        let err = "profiles".parse::<Scope>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown scope \"profiles\": one of profiles:read, profiles:write, admin, privacy"
        );
        assert_eq!(
            parse_scopes("admin bogus privacy"),
            BTreeSet::from([Scope::Admin, Scope::Privacy])
        );
    }

    #[test]
    fn tokens_come_as_bearer_or_basic_user() {
        use base64::Engine as _;
        let mut headers = http::HeaderMap::new();
        assert_eq!(token_of(&headers), None);
        headers.insert("authorization", "Bearer tat_abc".parse().unwrap());
        assert_eq!(token_of(&headers).as_deref(), Some("tat_abc"));
        let basic = base64::engine::general_purpose::STANDARD.encode("tat_xyz:");
        headers.insert("authorization", format!("Basic {basic}").parse().unwrap());
        assert_eq!(token_of(&headers).as_deref(), Some("tat_xyz"));
        headers.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(token_of(&headers), None);
        let secret = new_secret();
        assert!(secret.0.starts_with(TOKEN_PREFIX) && secret.0.len() == 47);
        assert_eq!(format!("{secret:?}"), "Secret(***)");
    }
}
