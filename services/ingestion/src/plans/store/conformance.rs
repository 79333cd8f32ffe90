//! The plan store's conformance suite: the same tests against Postgres and SQLite.

use std::sync::Arc;

use tessera_store::{Database, DbSettings};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Doomed, NewQuarantined, PlanStore};
use crate::sources::PlanMode;
use crate::{Ingestion, IngestionSettings, MIGRATIONS, SCHEMA};

/// The plan store of a fresh database and the ids of two sources in it (plans and quarantined
/// messages belong to a source).
async fn open(url: &str) -> (Arc<dyn PlanStore>, Uuid, Uuid) {
    let db = Database::connect(url, SCHEMA, &DbSettings::default())
        .await
        .expect("connect");
    db.migrate(MIGRATIONS).await.expect("migrate");
    let ing = Ingestion::new(db.clone(), IngestionSettings::default())
        .await
        .expect("ingestion");
    let (a, _) = ing.add_source("a", None, PlanMode::Block).await.unwrap();
    let (b, _) = ing.add_source("b", None, PlanMode::Block).await.unwrap();
    (super::open(db), a.id, b.id)
}

/// Now, at the microsecond precision both backends keep.
fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .expect("valid nanosecond")
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let dir = tessera_testkit::TestSqlite::new();
                    let (store, a, b) = super::open(&dir.url("ingestion.db")).await;
                    super::$name(store, a, b).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let db = tessera_testkit::TestDb::new().await;
                    let (store, a, b) = super::open(db.url()).await;
                    super::$name(store, a, b).await;
                }
            )*
        }
    };
}

conformance!(
    puts_bump_the_version_per_source,
    quarantine_lists_in_pages_and_deletes_per_source,
);

async fn puts_bump_the_version_per_source(store: Arc<dyn PlanStore>, a: Uuid, b: Uuid) {
    assert_eq!(store.get(a).await.unwrap(), None);
    assert_eq!(store.version(a).await.unwrap(), None);

    let at = now();
    let first = store.put(a, r#"{"trackEvents":{}}"#, at).await.unwrap();
    assert_eq!(first.version, 1);
    assert_eq!(first.updated_at, at);
    let plan = r#"{"identifyTraits":{"type":"object"}}"#;
    let second = store.put(a, plan, at).await.unwrap();
    assert_eq!(second.version, 2);
    assert_eq!(store.version(a).await.unwrap(), Some(2));
    let got = store.get(a).await.unwrap().unwrap();
    assert_eq!(got.version, 2);
    // Postgres keeps JSONB, which may reformat the text: compare the documents.
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&got.plan).unwrap(),
        serde_json::from_str::<serde_json::Value>(plan).unwrap()
    );
    // Versions are per source.
    assert_eq!(store.put(b, "{}", at).await.unwrap().version, 1);
    assert_eq!(store.version(a).await.unwrap(), Some(2));
}

fn message(source_id: Uuid, message_id: &str) -> NewQuarantined {
    NewQuarantined {
        source_id,
        message_id: message_id.to_owned(),
        payload: format!(r#"{{"messageId":"{message_id}","type":"track"}}"#),
        violations: r#"[{"field":"properties.price","description":"bad"}]"#.to_owned(),
        plan_version: 3,
        received_at: now(),
    }
}

async fn quarantine_lists_in_pages_and_deletes_per_source(
    store: Arc<dyn PlanStore>,
    a: Uuid,
    b: Uuid,
) {
    store.quarantine(&[]).await.unwrap();
    let sent: Vec<_> = ["m1", "m2", "m3"].iter().map(|m| message(a, m)).collect();
    store.quarantine(&sent).await.unwrap();
    store.quarantine(&[message(b, "other")]).await.unwrap();

    let first = store.list_quarantined(a, 0, 2).await.unwrap();
    let ids: Vec<_> = first.iter().map(|q| q.message_id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2"]);
    assert_eq!(first[0].plan_version, 3);
    assert_eq!(first[0].received_at, sent[0].received_at);
    let payload: serde_json::Value = serde_json::from_str(&first[0].payload).unwrap();
    assert_eq!(payload["messageId"], "m1");
    let violations: serde_json::Value = serde_json::from_str(&first[0].violations).unwrap();
    assert_eq!(violations[0]["field"], "properties.price");
    let rest = store.list_quarantined(a, first[1].id, 2).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].message_id, "m3");

    // Ids of another source are left alone.
    let other = store.list_quarantined(b, 0, 10).await.unwrap();
    assert_eq!(
        store
            .delete_quarantined(a, Doomed::Ids(&[first[0].id, other[0].id]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.delete_quarantined(a, Doomed::Ids(&[])).await.unwrap(),
        0
    );
    assert_eq!(store.list_quarantined(a, 0, 10).await.unwrap().len(), 2);
    assert_eq!(store.delete_quarantined(a, Doomed::All).await.unwrap(), 2);
    assert!(store.list_quarantined(a, 0, 10).await.unwrap().is_empty());
    assert_eq!(store.list_quarantined(b, 0, 10).await.unwrap().len(), 1);
}
