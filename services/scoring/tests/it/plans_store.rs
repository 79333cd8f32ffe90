//! The stored plans' conformance suite, through [`PlanBook`] (config's plans beside the stored
//! ones): every test runs against SQLite and against Postgres.

use std::sync::Arc;

use serde_json::json;
use tessera_scoring::plan_store::{self, PlanStore};
use tessera_scoring::plans::Plan;
use tessera_scoring::{BuyingCommittee, BuyingRole, PlanBook, ScoringError};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::models_store::{Backend, postgres, sqlite};

macro_rules! plan_suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = super::sqlite().await;
                    super::$test(&backend).await;
                    backend.db.close().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = super::postgres().await;
                    super::$test(&backend).await;
                    backend.db.close().await;
                }
            )*
        }
    };
}

plan_suite!(
    plans_are_created_updated_and_deleted_with_versions_and_a_revision,
    config_plans_are_read_only_and_stored_ones_follow_them,
    an_invalid_plan_is_refused_naming_the_field,
    another_replica_sees_changes_after_a_refresh,
    concurrent_changes_from_two_replicas_are_all_kept,
    a_stored_plan_naming_a_role_the_committee_lacks_stays_with_the_rule_not_evaluable,
);

/// A plan worth `points` for a `tier` trait of `gold`, plus `extra` rules' JSON.
fn plan(name: &str, version: &str, points: f64) -> Plan {
    serde_json::from_value(json!({
        "name": name,
        "version": version,
        "rules": [{
            "name": "gold",
            "points": points,
            "condition": { "trait": { "name": "tier", "op": "eq", "value": "gold" } },
        }],
    }))
    .unwrap()
}

/// A plan that reads the score of the plan `reads`.
fn reader(name: &str, reads: &str) -> Plan {
    serde_json::from_value(json!({
        "name": name,
        "version": "1",
        "rules": [{
            "name": "high",
            "points": 10,
            "condition": { "score": { "name": reads, "op": "gte", "value": 50 } },
        }],
    }))
    .unwrap()
}

fn book(backend: &Backend, config: Vec<Plan>) -> PlanBook {
    book_with(backend, config, BuyingCommittee::default())
}

fn book_with(backend: &Backend, config: Vec<Plan>, committee: BuyingCommittee) -> PlanBook {
    let book = PlanBook::new(config, Arc::new(committee)).unwrap();
    assert!(book.attach_store(plan_store::open(backend.db.clone())));
    book
}

fn names(book: &PlanBook) -> Vec<String> {
    book.current()
        .iter()
        .map(|p| p.plan().name.clone())
        .collect()
}

fn status(error: ScoringError) -> Status {
    Status::from(error)
}

/// The first field violation of an INVALID_ARGUMENT status: its field and description.
fn violation(error: ScoringError) -> (String, String) {
    let status = status(error);
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let v = &status.get_details_bad_request().unwrap().field_violations[0];
    (v.field.clone(), v.description.clone())
}

async fn plans_are_created_updated_and_deleted_with_versions_and_a_revision(backend: &Backend) {
    let store: Arc<dyn PlanStore> = plan_store::open(backend.db.clone());
    assert_eq!(store.revision().await.unwrap(), 0);
    let book = book(backend, vec![]);

    let (revision, a) = book
        .create(plan("a", "1", 10.0), "plan_json")
        .await
        .unwrap();
    assert_eq!(revision, 1);
    assert_eq!(a.model_version(), "a@1");
    assert_eq!(book.loaded().stored_version("a"), Some(1));
    let twice = book.create(plan("a", "1", 10.0), "plan_json").await;
    assert_eq!(status(twice.unwrap_err()).code(), Code::AlreadyExists);
    book.create(plan("b", "1", 5.0), "plan_json").await.unwrap();
    assert_eq!(store.revision().await.unwrap(), 2);

    // Right version: the plan changes and its version grows.
    let (revision, a2) = book
        .update(plan("a", "2", 20.0), 1, "plan_json")
        .await
        .unwrap();
    assert_eq!(revision, 3);
    assert_eq!(a2.model_version(), "a@2");
    assert_eq!(a2.plan().rules[0].points, 20.0);
    assert_eq!(book.loaded().stored_version("a"), Some(2));
    // Wrong version: refused, nothing changes.
    let stale = book.update(plan("a", "3", 30.0), 1, "plan_json").await;
    let stale = status(stale.unwrap_err());
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("version 2"), "{stale:?}");
    let unknown = book.update(plan("zz", "1", 1.0), 1, "plan_json").await;
    assert_eq!(status(unknown.unwrap_err()).code(), Code::NotFound);
    assert_eq!(store.revision().await.unwrap(), 3);

    let (revision, stored) = store.list().await.unwrap();
    assert_eq!(revision, 3);
    let listed: Vec<_> = stored
        .iter()
        .map(|s| (s.plan.name.as_str(), s.version, s.plan.version.as_str()))
        .collect();
    assert_eq!(listed, [("a", 2, "2"), ("b", 1, "1")], "creation order");

    // Delete: a wrong version is refused, the right one (or 0) removes it.
    let stale = book.delete("a", 1, "name").await;
    assert_eq!(status(stale.unwrap_err()).code(), Code::FailedPrecondition);
    assert_eq!(book.delete("a", 2, "name").await.unwrap(), 4);
    assert_eq!(book.delete("b", 0, "name").await.unwrap(), 5);
    let gone = book.delete("b", 0, "name").await;
    assert_eq!(status(gone.unwrap_err()).code(), Code::NotFound);
    assert!(names(&book).is_empty());
    assert_eq!(store.list().await.unwrap(), (5, vec![]));

    // A name deleted can be created again, after the others.
    book.create(plan("c", "1", 1.0), "plan_json").await.unwrap();
    book.create(plan("a", "1", 1.0), "plan_json").await.unwrap();
    assert_eq!(names(&book), ["c", "a"]);
    assert_eq!(book.loaded().stored_version("a"), Some(1));
}

async fn config_plans_are_read_only_and_stored_ones_follow_them(backend: &Backend) {
    let book = book(backend, vec![plan("fit", "3", 10.0)]);
    for refused in [
        book.create(plan("fit", "4", 10.0), "plan_json").await,
        book.update(plan("fit", "4", 10.0), 1, "plan_json").await,
    ] {
        let refused = status(refused.unwrap_err());
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("config"), "{refused:?}");
    }
    let refused = status(book.delete("fit", 0, "name").await.unwrap_err());
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // A stored plan may read config's plans' scores: it comes after them.
    book.create(reader("lead", "fit"), "plan_json")
        .await
        .unwrap();
    assert_eq!(names(&book), ["fit", "lead"]);
    let loaded = book.loaded();
    assert_eq!(loaded.stored_version("fit"), None);
    assert_eq!(loaded.stored_version("lead"), Some(1));
    let (plan, version) = book.get("lead").await.unwrap();
    assert_eq!((plan.model_version(), version), ("lead@1", Some(1)));
    let (_, version) = book.get("fit").await.unwrap();
    assert_eq!(version, None);
    assert_eq!(
        status(book.get("nope").await.unwrap_err()).code(),
        Code::NotFound
    );
}

async fn an_invalid_plan_is_refused_naming_the_field(backend: &Backend) {
    let book = book(backend, vec![]);
    let mut bad = plan("big", "1", 10.0);
    bad.rules[0].condition = serde_json::from_value(
        json!({ "trait": { "name": "employees", "op": "gt", "value": "many" } }),
    )
    .unwrap();
    let (field, description) = violation(book.create(bad, "plan_json").await.unwrap_err());
    assert_eq!(field, "plan_json");
    assert!(description.contains("rule \"gold\""), "{description}");

    // A score no plan before it computes.
    let (field, description) = violation(
        book.create(reader("lead", "fit"), "plan_json")
            .await
            .unwrap_err(),
    );
    assert_eq!(field, "plan_json");
    assert!(description.contains("fit"), "{description}");

    // A change that would break a later plan names it.
    book.create(plan("fit", "1", 10.0), "plan_json")
        .await
        .unwrap();
    book.create(reader("lead", "fit"), "plan_json")
        .await
        .unwrap();
    let (field, description) = violation(book.delete("fit", 0, "name").await.unwrap_err());
    assert_eq!(field, "name");
    assert!(description.contains("\"lead\""), "{description}");
    assert_eq!(names(&book), ["fit", "lead"], "nothing changed");
    let store = plan_store::open(backend.db.clone());
    assert_eq!(
        store.revision().await.unwrap(),
        2,
        "refused changes leave no revision"
    );
}

async fn another_replica_sees_changes_after_a_refresh(backend: &Backend) {
    let a = book(backend, vec![plan("fit", "1", 10.0)]);
    let b = book(backend, vec![plan("fit", "1", 10.0)]);
    assert!(b.refresh().await.unwrap(), "the first read loads");
    assert!(!b.refresh().await.unwrap(), "nothing changed");
    a.create(plan("x", "1", 1.0), "plan_json").await.unwrap();
    assert_eq!(names(&b), ["fit"], "not before the poll");
    assert!(b.refresh().await.unwrap());
    assert_eq!(names(&b), ["fit", "x"]);
    a.update(plan("x", "2", 2.0), 1, "plan_json").await.unwrap();
    assert!(b.refresh().await.unwrap());
    assert_eq!(b.current().iter().nth(1).unwrap().model_version(), "x@2");
    assert_eq!(b.loaded().stored_version("x"), Some(2));
    a.delete("x", 2, "name").await.unwrap();
    assert!(b.refresh().await.unwrap());
    assert_eq!(names(&b), ["fit"]);
}

async fn concurrent_changes_from_two_replicas_are_all_kept(backend: &Backend) {
    let a = book(backend, vec![]);
    let b = book(backend, vec![]);
    let writes = (0..10).map(|i| {
        let replica = if i % 2 == 0 { &a } else { &b };
        replica.create(plan(&format!("p{i}"), "1", 1.0), "plan_json")
    });
    let revisions: Vec<i64> = futures::future::join_all(writes)
        .await
        .into_iter()
        .map(|written| written.unwrap().0)
        .collect();
    let mut sorted = revisions.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=10).collect::<Vec<i64>>(), "{revisions:?}");
    for replica in [&a, &b] {
        replica.refresh().await.unwrap();
        let mut listed = names(replica);
        assert_eq!(listed.len(), 10, "{listed:?}");
        listed.sort();
        assert_eq!(listed.first().map(String::as_str), Some("p0"));
    }
    assert_eq!(names(&a), names(&b), "the same creation order on both");
}

/// An account plan whose rule `role_known` (rule 1) tests `buying_roles contains role`.
fn coverage(version: &str, role: &str) -> Plan {
    serde_json::from_value(json!({
        "name": "coverage",
        "version": version,
        "level": "account",
        "rules": [
            {
                "name": "big",
                "points": 10,
                "condition": { "trait": { "name": "employees", "op": "gte", "value": 100 } },
            },
            {
                "name": "role_known",
                "points": 10,
                "condition": { "trait": { "name": "buying_roles", "op": "contains", "value": role } },
            },
        ],
    }))
    .unwrap()
}

async fn a_stored_plan_naming_a_role_the_committee_lacks_stays_with_the_rule_not_evaluable(
    backend: &Backend,
) {
    let before = book(backend, vec![]);
    before
        .create(coverage("1", "finance"), "plan_json")
        .await
        .unwrap();
    // The committee changed since: no finance.
    let committee = BuyingCommittee::new(&[BuyingRole {
        name: "security reviewer".to_owned(),
        filled_by: vec!["ciso".to_owned()],
    }])
    .unwrap();
    let after = book_with(backend, vec![], committee);
    assert!(after.refresh().await.unwrap());
    assert_eq!(names(&after), ["coverage"], "loaded, not left out");
    let current = after.current();
    let stored = current.iter().next().unwrap();
    assert_eq!(stored.not_evaluable(0), None);
    let reason = stored
        .not_evaluable(1)
        .expect("the finance rule is not evaluable");
    assert!(reason.contains("\"finance\""), "{reason}");
    // The replica that stored it still evaluates it.
    assert_eq!(
        before.current().iter().next().unwrap().not_evaluable(1),
        None
    );

    // Writing the plan again with the role is refused, pointing at the rule's condition.
    let (field, description) = violation(
        after
            .update(coverage("2", "finance"), 1, "plan_json")
            .await
            .unwrap_err(),
    );
    assert_eq!(field, "plan_json.rules[1].condition");
    assert_eq!(description, reason);
    // Another plan can be written beside it, which keeps it not evaluable.
    after
        .create(plan("x", "1", 1.0), "plan_json")
        .await
        .unwrap();
    let current = after.current();
    assert!(current.iter().next().unwrap().not_evaluable(1).is_some());
    // With a role of the committee it is evaluable again.
    after
        .update(coverage("2", "security reviewer"), 1, "plan_json")
        .await
        .unwrap();
    assert_eq!(
        after.current().iter().next().unwrap().not_evaluable(1),
        None
    );
}
