//! Test backends and helpers.

use tessera_core::Identifier;
use tessera_identity::domain::{Record, Resolution, Rules};
use tessera_identity::{Identity, IdentitySettings, MIGRATIONS, SCHEMA};
use tessera_store::{Database, DbSettings};
use tessera_testkit::{TestDb, TestSqlite};

/// An identity service over a fresh, migrated database, kept alive with it.
pub(crate) struct Backend {
    pub(crate) identity: Identity,
    pub(crate) db: Database,
    /// The key prefix of the owner cache on the test Redis, when the backend has one.
    owners: Option<String>,
    _postgres: Option<TestDb>,
    _sqlite: Option<TestSqlite>,
}

impl Backend {
    /// Postgres with the owner cache on the test Redis (under a prefix of its own).
    pub(crate) async fn postgres_cached() -> Self {
        let test = TestDb::new().await;
        let db = connect(test.url()).await;
        let owners = tessera_testkit::redis_prefix();
        let identity = open(db.clone(), IdentitySettings::default(), Some(&owners))
            .await
            .expect("identity");
        Self {
            identity,
            db,
            owners: Some(owners),
            _postgres: Some(test),
            _sqlite: None,
        }
    }

    /// Another replica (or a restart) on the backend's database with `settings`, with the
    /// backend's owner cache if it has one (every replica must share it).
    pub(crate) async fn replica(
        &self,
        settings: IdentitySettings,
    ) -> Result<Identity, tessera_identity::IdentityError> {
        open(self.db.clone(), settings, self.owners.as_deref()).await
    }

    pub(crate) async fn sqlite() -> Self {
        let dir = TestSqlite::new();
        let db = connect(&dir.url("identity.db")).await;
        Self {
            identity: Identity::new(db.clone(), IdentitySettings::default())
                .await
                .expect("identity"),
            db,
            owners: None,
            _postgres: None,
            _sqlite: Some(dir),
        }
    }

    pub(crate) async fn postgres() -> Self {
        let test = TestDb::new().await;
        let db = connect(test.url()).await;
        Self {
            identity: Identity::new(db.clone(), IdentitySettings::default())
                .await
                .expect("identity"),
            db,
            owners: None,
            _postgres: Some(test),
            _sqlite: None,
        }
    }

    /// The number of rows in profiles, identifiers, merges and resolutions.
    pub(crate) async fn counts(&self) -> [i64; 4] {
        counts(&self.db).await
    }
}

/// The identity service on `db`; with `owners`, its owner cache on the test Redis under that
/// key prefix (give every replica of a test the same).
pub(crate) async fn open(
    db: Database,
    settings: IdentitySettings,
    owners: Option<&str>,
) -> Result<Identity, tessera_identity::IdentityError> {
    match owners {
        Some(prefix) => {
            Identity::with_owner_cache(db, settings, &tessera_testkit::redis_url(), prefix).await
        }
        None => Identity::new(db, settings).await,
    }
}

/// The number of rows in profiles, identifiers, merges and resolutions of `db`.
pub(crate) async fn counts(db: &Database) -> [i64; 4] {
    let mut out = [0; 4];
    let queries = [
        "SELECT count(*) FROM profiles",
        "SELECT count(*) FROM identifiers",
        "SELECT count(*) FROM merges",
        "SELECT count(*) FROM resolutions",
    ];
    for (n, sql) in queries.into_iter().enumerate() {
        out[n] = match db {
            Database::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            Database::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        }
        .expect("count rows");
    }
    out
}

/// Connects to `url` with the identity schema and migrates.
pub(crate) async fn connect(url: &str) -> Database {
    let db = Database::connect(url, SCHEMA, &DbSettings::default())
        .await
        .expect("connect");
    db.migrate(MIGRATIONS).await.expect("migrate");
    db
}

/// A record of `event_id` with `(type, value)` identifiers.
pub(crate) fn record(event_id: &str, identifiers: &[(&str, &str)]) -> Record {
    record_under(&Rules::default(), event_id, identifiers)
}

/// A record of `event_id` with `(type, value)` identifiers, normalized under `rules`.
pub(crate) fn record_under(rules: &Rules, event_id: &str, identifiers: &[(&str, &str)]) -> Record {
    Record::new(
        rules,
        event_id,
        identifiers
            .iter()
            .map(|(kind, value)| Identifier::new(*kind, *value))
            .collect(),
        time::OffsetDateTime::now_utc(),
    )
    .expect("valid record")
}

/// Resolves one record.
pub(crate) async fn resolve(
    identity: &Identity,
    event_id: &str,
    ids: &[(&str, &str)],
) -> Resolution {
    let mut out = identity
        .resolve(vec![record_under(&identity.rules().rules, event_id, ids)])
        .await
        .expect("resolve");
    assert_eq!(out.len(), 1);
    out.remove(0)
}

/// The profile an identifier belongs to now.
pub(crate) async fn lookup(identity: &Identity, kind: &str, value: &str) -> uuid::Uuid {
    identity
        .lookup(Identifier::new(kind, value))
        .await
        .unwrap_or_else(|e| panic!("lookup {kind}: {e}"))
}
