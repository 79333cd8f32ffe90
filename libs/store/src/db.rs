//! The system of record: a Postgres pool whose `search_path` is the service's own schema, or a
//! SQLite file per service for the embedded mode.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tessera_core::ErrorCode;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL's scheme is neither `postgres://` nor `sqlite://`, or it does not parse.
    #[error("unsupported database url: {0}")]
    BadUrl(String),
    /// The schema name is not a plain identifier.
    #[error("invalid schema name {0:?}")]
    BadSchema(String),
    /// A database call failed.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// The error code this error maps to: unreachable databases are `Unavailable`.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadUrl(_) | Self::BadSchema(_) => ErrorCode::FailedPrecondition,
            Self::Sqlx(e) => error_code(e),
            Self::Migrate(_) => ErrorCode::Internal,
        }
    }
}

/// Classifies a database error: connection-level failures are retryable (`Unavailable`),
/// everything else is `Internal`.
// sqlx::Error is non-exhaustive, so a wildcard arm is unavoidable.
#[allow(clippy::wildcard_enum_match_arm)]
pub fn error_code(e: &sqlx::Error) -> ErrorCode {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => ErrorCode::Unavailable,
        sqlx::Error::Database(db) => {
            // Postgres class 08 (connection exception), 53 (insufficient resources), 57P01-03
            // (shutdown, crash, cannot connect now) and SQLite BUSY/LOCKED are transient.
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            if code.starts_with("08")
                || code.starts_with("53")
                || matches!(
                    code,
                    "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "5" | "6"
                )
            {
                ErrorCode::Unavailable
            } else {
                ErrorCode::Internal
            }
        }
        // sqlx::Error is non-exhaustive: anything else is a bug or a malformed row.
        _ => ErrorCode::Internal,
    }
}

/// Which database a [`Database`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Postgres: production.
    Postgres,
    /// SQLite: `tessera dev`.
    Sqlite,
}

/// Pool settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DbSettings {
    /// The largest number of pooled Postgres connections.
    pub max_connections: u32,
    /// How long to wait for a connection before failing with `Unavailable`, in milliseconds.
    pub acquire_timeout_ms: u64,
    /// Whether Postgres may JIT-compile this pool's statements (its session setting `jit`).
    /// Off by default: the services run short statements over a few hundred rows, whose
    /// estimated cost can still pass `jit_above_cost` (a recursive walk's estimate grows with
    /// its input array), and compiling one then takes 100–300 ms for a statement that runs in
    /// 4. The first executions of a prepared statement on each new connection are planned
    /// with their parameters, so every pooled connection paid it again.
    pub jit: bool,
}

impl Default for DbSettings {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout_ms: 5_000,
            jit: false,
        }
    }
}

/// The migrations of one service, one set per backend.
#[derive(Debug, Clone, Copy)]
pub struct Migrations {
    /// The Postgres migrations.
    pub postgres: &'static Migrator,
    /// The SQLite migrations.
    pub sqlite: &'static Migrator,
}

/// How often a pool's use is recorded in the metrics.
pub const POOL_SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// A pool's connections at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUse {
    /// Connections lent out.
    pub in_use: u32,
    /// Connections open and waiting.
    pub idle: u32,
    /// The most the pool opens.
    pub max: u32,
}

/// A connection pool to the system of record.
#[derive(Debug, Clone)]
pub enum Database {
    /// A Postgres pool whose connections use the service's schema as `search_path`.
    Postgres(PgPool),
    /// A SQLite pool with a single connection: SQLite has one writer at a time, and one
    /// connection makes every transaction immediate instead of failing with `SQLITE_BUSY`.
    Sqlite(SqlitePool),
}

impl Database {
    /// Connects to `url` (`postgres://…` or `sqlite://…`). On Postgres, `schema` is created when
    /// missing and becomes every connection's `search_path`, so a service sees only its own
    /// tables; a SQLite file holds one service's tables alone, so `schema` is not used there.
    pub async fn connect(
        url: &str,
        schema: &str,
        settings: &DbSettings,
    ) -> Result<Self, StoreError> {
        if !is_identifier(schema) {
            return Err(StoreError::BadSchema(schema.to_owned()));
        }
        let acquire = Duration::from_millis(settings.acquire_timeout_ms);
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let base =
                PgConnectOptions::from_str(url).map_err(|_| StoreError::BadUrl(redact(url)))?;
            create_schema(&base, schema, acquire).await?;
            let jit = if settings.jit { "on" } else { "off" };
            let options = base.options([("search_path", schema), ("jit", jit)]);
            let pool = PgPoolOptions::new()
                .max_connections(settings.max_connections)
                .acquire_timeout(acquire)
                .connect_with(options)
                .await?;
            let db = Self::Postgres(pool);
            db.sample_pool_use(schema);
            Ok(db)
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|_| StoreError::BadUrl(redact(url)))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // FULL: an acknowledged write survives a power cut, not only a process crash.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(acquire.max(Duration::from_secs(30)))
                .connect_with(options)
                .await?;
            let db = Self::Sqlite(pool);
            db.sample_pool_use(schema);
            Ok(db)
        } else {
            Err(StoreError::BadUrl(redact(url)))
        }
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Postgres(_) => Backend::Postgres,
            Self::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Applies the service's pending migrations for this backend. Safe to run from several
    /// replicas at once: sqlx takes a Postgres advisory lock around the run.
    pub async fn migrate(&self, migrations: Migrations) -> Result<(), StoreError> {
        match self {
            Self::Postgres(pool) => migrations.postgres.run(pool).await?,
            Self::Sqlite(pool) => migrations.sqlite.run(pool).await?,
        }
        Ok(())
    }

    /// How many of the pool's connections are in use and idle now, and its maximum.
    pub fn pool_use(&self) -> PoolUse {
        let (size, idle, max) = match self {
            Self::Postgres(pool) => (
                pool.size(),
                pool.num_idle(),
                pool.options().get_max_connections(),
            ),
            Self::Sqlite(pool) => (
                pool.size(),
                pool.num_idle(),
                pool.options().get_max_connections(),
            ),
        };
        let idle = u32::try_from(idle).unwrap_or(u32::MAX).min(size);
        PoolUse {
            in_use: size - idle,
            idle,
            max,
        }
    }

    /// Records the pool's use every [`POOL_SAMPLE_EVERY`] as the gauges
    /// `tessera_db_pool_connections{schema, state="in_use"|"idle"}` and
    /// `tessera_db_pool_max_connections{schema}`, until the pool is closed. Outside a Tokio
    /// runtime it records nothing.
    fn sample_pool_use(&self, schema: &str) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let db = self.clone();
        let schema = schema.to_owned();
        runtime.spawn(async move {
            let mut every = tokio::time::interval(POOL_SAMPLE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                every.tick().await;
                if db.is_closed() {
                    return;
                }
                let used = db.pool_use();
                let labels =
                    |state: &'static str| [("schema", schema.clone()), ("state", state.to_owned())];
                metrics::gauge!("tessera_db_pool_connections", &labels("in_use"))
                    .set(f64::from(used.in_use));
                metrics::gauge!("tessera_db_pool_connections", &labels("idle"))
                    .set(f64::from(used.idle));
                metrics::gauge!("tessera_db_pool_max_connections", "schema" => schema.clone())
                    .set(f64::from(used.max));
            }
        });
    }

    fn is_closed(&self) -> bool {
        match self {
            Self::Postgres(pool) => pool.is_closed(),
            Self::Sqlite(pool) => pool.is_closed(),
        }
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        match self {
            Self::Postgres(pool) => pool.close().await,
            Self::Sqlite(pool) => pool.close().await,
        }
    }
}

async fn create_schema(
    base: &PgConnectOptions,
    schema: &str,
    acquire: Duration,
) -> Result<(), StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(acquire)
        .connect_with(base.clone())
        .await?;
    let sql = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
    let result = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
    pool.close().await;
    match result {
        Ok(_) => Ok(()),
        // Two replicas creating the schema at the same moment: the loser sees a unique
        // violation on the catalog, and the schema exists either way.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn is_identifier(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn schema_names_must_be_identifiers() {
        assert!(is_identifier("identity"));
        assert!(is_identifier("t_0123_identity"));
        assert!(!is_identifier("a\"; drop"));
        assert!(!is_identifier(""));
    }
}
