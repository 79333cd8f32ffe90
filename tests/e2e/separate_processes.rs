//! The four production services as separate processes on Postgres and Redis.

use tessera_testkit::{TestDb, redis_prefix, redis_url};
use tessera_tests::proxy::Proxy;
use tessera_tests::{Tessera, TesseraBuilder};

use crate::flow::skeleton_flow;

/// One replica of every service on `db`, wired to each other.
pub(crate) struct Deployment {
    pub(crate) identity: Tessera,
    pub(crate) scoring: Tessera,
    pub(crate) profile: Tessera,
    pub(crate) ingestion: Tessera,
    /// The write key of a source created on the deployment.
    pub(crate) write_key: String,
    /// The profile service's way to the ingestion service, which starts after it (the two
    /// call each other).
    _to_ingestion: Proxy,
}

pub(crate) fn base(subcommand: &str, db: &TestDb, prefix: &str) -> TesseraBuilder {
    TesseraBuilder::new(subcommand)
        .env("DATABASE_URL", db.url())
        .env("REDIS_URL", redis_url())
        .env("TESSERA__CACHE_PREFIX", prefix)
}

impl Deployment {
    pub(crate) async fn start(db: &TestDb, prefix: &str) -> Self {
        Self::start_with(db, prefix, |b| b).await
    }

    /// [`Deployment::start`] with every process's builder passed through `configure` (extra
    /// environment, for example).
    pub(crate) async fn start_with(
        db: &TestDb,
        prefix: &str,
        configure: impl Fn(TesseraBuilder) -> TesseraBuilder,
    ) -> Self {
        let builder = |subcommand: &str| configure(base(subcommand, db, prefix));
        let (identity, scoring) =
            tokio::join!(builder("identity").start(), builder("scoring").start());
        let to_ingestion = Proxy::start(([127, 0, 0, 1], 1).into()).await;
        let profile = builder("profile")
            .env("TESSERA__PEERS__IDENTITY", identity.grpc_url())
            .env("TESSERA__PEERS__SCORING", scoring.grpc_url())
            .env(
                "TESSERA__PEERS__INGESTION",
                format!("{}://{}", identity.scheme(), to_ingestion.addr()),
            )
            .start()
            .await;
        let ingestion = builder("ingestion")
            .env("TESSERA__PEERS__IDENTITY", identity.grpc_url())
            .env("TESSERA__PEERS__PROFILE", profile.grpc_url())
            .start()
            .await;
        to_ingestion.set_target(ingestion.grpc_addr.parse().expect("ingestion address"));
        let write_key = ingestion.create_source("e2e").await;
        Self {
            identity,
            scoring,
            profile,
            ingestion,
            write_key,
            _to_ingestion: to_ingestion,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn four_processes_on_postgres_and_redis_run_the_pipeline() {
    let db = TestDb::new().await;
    let prefix = redis_prefix();
    let d = Deployment::start(&db, &prefix).await;
    let ingest = d.ingestion.channel().await;
    let read = d.profile.channel().await;
    skeleton_flow(&ingest, &d.write_key, &read, "procs").await;
    let _ = (&d.identity, &d.scoring);
}
