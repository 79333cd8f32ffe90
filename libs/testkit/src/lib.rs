//! Test support shared by every crate's tests: a fresh Postgres database per test (dropped when
//! the test ends), the test Redis, and temporary SQLite files.
//!
//! The servers come from `TESSERA_TEST_DATABASE_URL` and `TESSERA_TEST_REDIS_URL`, which
//! `scripts/test` sets (starting throwaway servers when none is reachable). Without them the
//! local defaults are used; a test whose server is unreachable fails with a message saying so,
//! it is never skipped.

pub mod people;

use std::net::SocketAddr;
use std::path::PathBuf;

use sqlx::{Connection, PgConnection};

/// The admin URL of the test Postgres server.
pub fn postgres_admin_url() -> String {
    std::env::var("TESSERA_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The URL of the test Redis server.
pub fn redis_url() -> String {
    std::env::var("TESSERA_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix unique to one test, so tests can share one Redis.
pub fn redis_prefix() -> String {
    format!("tessera-test:{}:", uuid::Uuid::new_v4().simple())
}

/// A Postgres database created for one test and dropped (with its connections) on drop.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    /// Creates a fresh, empty database.
    pub async fn new() -> Self {
        let admin = postgres_admin_url();
        let name = format!("tessera_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!(
                "the test Postgres at {admin} is unreachable ({e}); run the tests with \
                 scripts/test, which starts one, or set TESSERA_TEST_DATABASE_URL"
            )
        });
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let _ = conn.close().await;
        let url = replace_database(&admin, &name);
        Self { name, url }
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = postgres_admin_url();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread with its
        // own runtime.
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = handle.join();
    }
}

/// `url` with its database name replaced by `database`.
fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..].find('/').map(|i| i + scheme_end);
    let host = path_start.map_or(base, |i| &base[..i]);
    match query {
        Some(q) => format!("{host}/{database}?{q}"),
        None => format!("{host}/{database}"),
    }
}

/// The committed inputs of the fuzz target `target` (`fuzz/seeds/<target>/` and
/// `fuzz/regressions/<target>/`), with their paths, for the stable tests that replay them
/// through the code the target fuzzes. Panics when there are none: a missing seed directory
/// must fail the test, not pass it with nothing replayed.
pub fn fuzz_inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut inputs = Vec::new();
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            let bytes = std::fs::read(&path).expect("read a fuzz input");
            inputs.push((path, bytes));
        }
    }
    assert!(
        !inputs.is_empty(),
        "no committed inputs of the fuzz target {target} in {}",
        fuzz.display()
    );
    inputs
}

/// A temporary directory holding SQLite files, removed on drop.
#[derive(Debug)]
pub struct TestSqlite {
    dir: tempfile::TempDir,
}

impl TestSqlite {
    /// A fresh temporary directory.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The URL of the SQLite file `name` in the directory.
    pub fn url(&self, name: &str) -> String {
        format!("sqlite://{}", self.path(name).display())
    }

    /// The path of the file `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for TestSqlite {
    fn default() -> Self {
        Self::new()
    }
}

/// gRPC services served through the real server edge on a free loopback port, stopped on drop.
#[derive(Debug)]
pub struct GrpcTestServer {
    /// The gRPC address.
    pub addr: SocketAddr,
    shutdown: tessera_server::Shutdown,
}

impl GrpcTestServer {
    /// Serves `services` (with health, reflection and the edge's layers) until dropped.
    pub async fn start(services: tessera_server::GrpcServices) -> Self {
        Self::start_with(services, tessera_server::EdgeSettings::default()).await
    }

    /// [`Self::start`] with the edge's limits and timings `settings`.
    pub async fn start_with(
        services: tessera_server::GrpcServices,
        settings: tessera_server::EdgeSettings,
    ) -> Self {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind grpc");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind http");
        let addr = grpc.local_addr().expect("grpc addr");
        let shutdown = tessera_server::Shutdown::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tessera_server::serve(
                &settings,
                grpc,
                http,
                services,
                tessera_server::HttpRouter::new(),
                stop,
            )
            .await
            .expect("serve");
        });
        Self { addr, shutdown }
    }

    /// The server's URL, `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A channel that connects on first use.
    pub fn lazy_channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .expect("url")
            .connect_lazy()
    }

    /// A connected channel.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect to the test server")
    }
}

impl Drop for GrpcTestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            replace_database("postgres://u@h:5432/postgres", "t1"),
            "postgres://u@h:5432/t1"
        );
        assert_eq!(
            replace_database("postgres://u@h/postgres?sslmode=disable", "t1"),
            "postgres://u@h/t1?sslmode=disable"
        );
        assert_eq!(
            replace_database("postgres://u@h", "t1"),
            "postgres://u@h/t1"
        );
    }
}
