//! Plans through `Ingestion`, on a real database: what other replicas see.

use std::time::{Duration, Instant};

use serde_json::json;
use tessera_core::{Event, EventType};
use tessera_store::{Database, DbSettings};
use time::OffsetDateTime;

use super::{PLAN_CACHE_TTL, Plan};
use crate::sources::{PlanMode, Source};
use crate::{Ingestion, IngestionSettings, MIGRATIONS, SCHEMA};

async fn replica(db: &Database) -> Ingestion {
    Ingestion::new(db.clone(), IngestionSettings::default())
        .await
        .expect("ingestion")
}

fn bad_order() -> Event {
    let mut e = Event::new(EventType::Track);
    e.message_id = "m1".to_owned();
    e.user_id = "u1".to_owned();
    e.event = "Order Completed".to_owned();
    e.properties = json!({"price": "free"}).as_object().unwrap().clone();
    e
}

#[tokio::test(flavor = "multi_thread")]
async fn another_replica_enforces_a_new_version_within_the_cache_ttl() {
    let test_db = tessera_testkit::TestDb::new().await;
    let db = Database::connect(test_db.url(), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    let (a, b) = (replica(&db).await, replica(&db).await);
    let (record, _) = a.add_source("web", None, PlanMode::Block).await.unwrap();
    let source = Source::from(&record);
    let now = OffsetDateTime::now_utc();

    // B has no plan yet (and caches that).
    let screened = b
        .screen(&source, vec![(0, bad_order())], now)
        .await
        .unwrap();
    assert_eq!(screened.passed.len(), 1);

    let plan: Plan = serde_json::from_value(json!({"trackEvents": {"Order Completed": {
        "properties": {"price": {"type": "number"}}}}}))
    .unwrap();
    a.put_tracking_plan("web", plan).await.unwrap();
    // A enforces it at once.
    let screened = a
        .screen(&source, vec![(0, bad_order())], now)
        .await
        .unwrap();
    assert_eq!(screened.blocked.len(), 1);

    // B within the TTL (polled, with a margin for a slow machine).
    let deadline = Instant::now() + PLAN_CACHE_TTL + Duration::from_secs(5);
    loop {
        let screened = b
            .screen(&source, vec![(0, bad_order())], now)
            .await
            .unwrap();
        if screened.blocked.len() == 1 {
            assert_eq!(screened.blocked[0].2[0].field, "properties.price");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica B never saw the new plan"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
