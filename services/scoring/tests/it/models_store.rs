//! The model store's conformance suite: every test runs against SQLite and against Postgres.

use std::sync::Arc;

use tessera_scoring::clv::{BgNbdParams, FitDiagnostics, GammaGammaParams};
use tessera_scoring::models::store::{self, Activation, ModelStore};
use tessera_scoring::models::{ModelBody, NewModel, Trigger};
use tessera_scoring::rfm::RfmBoundaries;
use tessera_scoring::{MIGRATIONS, SCHEMA};
use tessera_store::{Database, DbSettings};
use tessera_testkit::{TestDb, TestSqlite};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

/// A migrated store and what keeps its database alive.
pub(crate) struct Backend {
    pub(crate) store: Arc<dyn ModelStore>,
    pub(crate) db: Database,
    _pg: Option<TestDb>,
    _lite: Option<TestSqlite>,
}

pub(crate) async fn sqlite() -> Backend {
    let dir = TestSqlite::new();
    let db = Database::connect(&dir.url("scoring.db"), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    Backend {
        store: store::open(db.clone()),
        db,
        _pg: None,
        _lite: Some(dir),
    }
}

pub(crate) async fn postgres() -> Backend {
    let test_db = TestDb::new().await;
    let db = Database::connect(test_db.url(), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    Backend {
        store: store::open(db.clone()),
        db,
        _pg: Some(test_db),
        _lite: None,
    }
}

macro_rules! store_suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = super::sqlite().await;
                    super::$test(&*backend.store).await;
                    backend.db.close().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = super::postgres().await;
                    super::$test(&*backend.store).await;
                    backend.db.close().await;
                }
            )*
        }
    };
}

store_suite!(
    fits_are_stored_versioned_and_read_back_exactly,
    a_good_fit_activates_and_a_rejected_one_does_not,
    activation_rolls_back_and_refuses_rejected_or_unknown_models,
    models_list_newest_first_in_pages,
    one_holder_runs_the_schedule_per_interval,
);

const NOW: OffsetDateTime = datetime!(2026-06-01 12:00:00.123456 UTC);

fn diagnostics(customers: usize) -> FitDiagnostics {
    FitDiagnostics {
        log_likelihood: -9_582.429_828_3,
        mean_log_likelihood: -4.065_519,
        iterations: 31,
        converged: true,
        stop_reason: "Gradient norm below tolerance".to_owned(),
        gradient_norm: 3.2e-10,
        customers,
    }
}

pub(crate) fn good(r: f64) -> NewModel {
    NewModel {
        fitted_at: NOW,
        as_of: datetime!(1997-09-30 00:00 UTC),
        trigger: Trigger::Api,
        population: 2_357,
        unit_days: 7.0,
        rejection: None,
        body: ModelBody {
            bg_nbd: Some(BgNbdParams {
                r,
                alpha: 4.413_603_1,
                a: 0.792_922_1,
                b: 2.425_906,
            }),
            gamma_gamma: Some(GammaGammaParams {
                p: 6.249_572,
                q: 3.744_225,
                v: 15.443_521,
            }),
            bg_nbd_diagnostics: Some(diagnostics(2_357)),
            gamma_gamma_diagnostics: Some(diagnostics(946)),
            rfm: Some(RfmBoundaries {
                recency_days: [10.0, 40.5, 90.0, 200.0],
                frequency: [0.0, 0.0, 1.0, 3.0],
                monetary: [12.5, 20.0, 31.25, 55.0],
            }),
        },
    }
}

fn rejected() -> NewModel {
    let mut model = good(0.1);
    model.trigger = Trigger::Schedule;
    model.rejection = Some("BG/NBD did not converge".to_owned());
    // A rejected fit may hold numbers JSON cannot: they come back as NaN.
    model.body.bg_nbd = Some(BgNbdParams {
        r: f64::INFINITY,
        alpha: f64::NAN,
        a: 1.0,
        b: 1.0,
    });
    model.body.gamma_gamma = None;
    model
}

async fn fits_are_stored_versioned_and_read_back_exactly(store: &dyn ModelStore) {
    assert_eq!(store.get(1).await.unwrap(), None);
    let first = store.insert(&good(0.242_594_7), true, NOW).await.unwrap();
    let second = store.insert(&rejected(), false, NOW).await.unwrap();
    assert!(second.version > first.version, "versions only grow");
    assert_eq!(store.get(first.version).await.unwrap(), Some(first.clone()));
    assert_eq!(first.label(), format!("m{}", first.version));
    let back = store.get(second.version).await.unwrap().unwrap();
    assert_eq!(
        back.model.rejection.as_deref(),
        Some("BG/NBD did not converge")
    );
    assert_eq!(back.model.trigger, Trigger::Schedule);
    let bg = back.model.body.bg_nbd.unwrap();
    assert!(bg.r.is_nan() && bg.alpha.is_nan(), "{bg:?}");
    assert_eq!((bg.a, bg.b), (1.0, 1.0));
    assert_eq!(back.model.body.gamma_gamma, None);
    assert_eq!(store.get(second.version + 1).await.unwrap(), None);
}

async fn a_good_fit_activates_and_a_rejected_one_does_not(store: &dyn ModelStore) {
    assert_eq!(store.active().await.unwrap(), None);
    let first = store.insert(&good(0.24), true, NOW).await.unwrap();
    let (seq, version) = store.active().await.unwrap().unwrap();
    assert_eq!(version, first.version);
    store.insert(&rejected(), false, NOW).await.unwrap();
    assert_eq!(store.active().await.unwrap(), Some((seq, first.version)));
    let third = store.insert(&good(0.25), true, NOW).await.unwrap();
    let (later, version) = store.active().await.unwrap().unwrap();
    assert!(later > seq);
    assert_eq!(version, third.version);
}

async fn activation_rolls_back_and_refuses_rejected_or_unknown_models(store: &dyn ModelStore) {
    let first = store.insert(&good(0.24), true, NOW).await.unwrap();
    let second = store.insert(&good(0.25), true, NOW).await.unwrap();
    let bad = store.insert(&rejected(), false, NOW).await.unwrap();
    assert_eq!(store.active().await.unwrap().unwrap().1, second.version);

    let Activation::Activated(seq) = store.activate(first.version, NOW).await.unwrap() else {
        panic!("activating a good model");
    };
    assert_eq!(store.active().await.unwrap(), Some((seq, first.version)));
    assert_eq!(
        store.activate(bad.version, NOW).await.unwrap(),
        Activation::Rejected("BG/NBD did not converge".to_owned())
    );
    assert_eq!(
        store.activate(bad.version + 100, NOW).await.unwrap(),
        Activation::NotFound
    );
    assert_eq!(store.active().await.unwrap(), Some((seq, first.version)));
    // Forward again: a new activation, even of a model that was active before.
    let Activation::Activated(again) = store.activate(second.version, NOW).await.unwrap() else {
        panic!("activating a good model");
    };
    assert!(again > seq);
    assert_eq!(store.active().await.unwrap(), Some((again, second.version)));
}

async fn models_list_newest_first_in_pages(store: &dyn ModelStore) {
    let mut versions = Vec::new();
    for i in 0..5 {
        let model = if i == 2 {
            rejected()
        } else {
            good(0.2 + f64::from(i) / 100.0)
        };
        versions.push(store.insert(&model, i != 2, NOW).await.unwrap().version);
    }
    versions.reverse();
    let page = store.list(None, 3).await.unwrap();
    let got: Vec<i64> = page.iter().map(|m| m.version).collect();
    assert_eq!(got, versions[..3]);
    let rest = store.list(Some(got[2]), 3).await.unwrap();
    let got: Vec<i64> = rest.iter().map(|m| m.version).collect();
    assert_eq!(got, versions[3..]);
    assert!(store.list(Some(versions[4]), 3).await.unwrap().is_empty());
    assert_eq!(page[0], store.get(versions[0]).await.unwrap().unwrap());
}

async fn one_holder_runs_the_schedule_per_interval(store: &dyn ModelStore) {
    let interval = Duration::hours(24);
    let lease = Duration::minutes(30);
    let claim = |holder: &'static str, now: OffsetDateTime| async move {
        store
            .claim_schedule(holder, now, now - interval, now + lease)
            .await
            .unwrap()
    };
    // Never ran: due. One replica gets it; the other finds it taken.
    assert!(claim("a", NOW).await);
    assert!(!claim("b", NOW).await);
    assert!(
        !claim("a", NOW + Duration::minutes(1)).await,
        "held, not re-entrant"
    );
    store.finish_schedule("a", NOW).await.unwrap();
    // Not due again until the interval has passed.
    assert!(!claim("b", NOW + Duration::hours(23)).await);
    assert!(claim("b", NOW + Duration::hours(24)).await);
    // b dies mid-fit: its lease runs out and a takes over; b's late finish changes nothing.
    let later = NOW + Duration::hours(24) + lease + Duration::seconds(1);
    assert!(claim("a", later).await);
    store.finish_schedule("b", later).await.unwrap();
    assert!(!claim("c", later + Duration::minutes(1)).await);
    store.finish_schedule("a", later).await.unwrap();
    assert!(!claim("c", later + Duration::hours(1)).await);
    assert!(claim("c", later + interval).await);
}
