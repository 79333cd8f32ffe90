//! The batch match jobs' store on both backends: one running job at a time, progress only
//! from the job's owner, a job whose lease expired failed by the next start or read.

use std::time::Duration;

use tessera_store::{Database, DbSettings};
use tessera_testkit::{TestDb, TestSqlite};

use crate::matching::{BatchJobState, BatchProgress, JOB_LEASE_EXPIRED};
use crate::store::open_matching;
use crate::{MIGRATIONS, SCHEMA};

const LEASE: Duration = Duration::from_secs(30);

async fn jobs_run_one_at_a_time_and_expire(db: Database) {
    db.migrate(MIGRATIONS).await.expect("migrate");
    let store = open_matching(db, None);
    let first = store
        .start_batch_job("a", LEASE)
        .await
        .unwrap()
        .expect("started");
    assert_eq!(first.state, BatchJobState::Running);
    assert_eq!(first.progress, BatchProgress::default());
    assert_eq!(first.finished_at, None);
    // Another replica is refused while it runs, and answered the running job.
    let refused = store.start_batch_job("b", LEASE).await.unwrap();
    assert_eq!(refused.map(|j| j.id).map_err(|j| j.id), Err(first.id));

    let progress = BatchProgress {
        model_version: 2,
        profiles: 10,
        candidate_pairs: 6,
        pairs_done: 3,
        merges: 2,
        suggestions: 0,
        refused: 1,
    };
    assert!(
        !store
            .batch_job_progress(first.id, "b", &progress, LEASE)
            .await
            .unwrap(),
        "only the owner reports"
    );
    assert!(
        store
            .batch_job_progress(first.id, "a", &progress, LEASE)
            .await
            .unwrap()
    );
    let running = store.batch_job(first.id).await.unwrap().expect("job");
    assert_eq!(
        (running.state, running.progress),
        (BatchJobState::Running, progress)
    );
    let done = BatchProgress {
        pairs_done: 6,
        suggestions: 3,
        ..progress
    };
    store
        .finish_batch_job(first.id, "a", &done, None)
        .await
        .unwrap();
    let succeeded = store.batch_job(first.id).await.unwrap().expect("job");
    assert_eq!(succeeded.state, BatchJobState::Succeeded);
    assert_eq!(succeeded.progress, done);
    assert_eq!(succeeded.error, "");
    assert!(succeeded.finished_at.is_some());

    // A job whose replica stops renewing its lease is failed by the next start, not resumed.
    let dead = store
        .start_batch_job("a", Duration::ZERO)
        .await
        .unwrap()
        .expect("started");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let next = store
        .start_batch_job("b", LEASE)
        .await
        .unwrap()
        .expect("the expired job no longer holds the batch match");
    let failed = store.batch_job(dead.id).await.unwrap().expect("job");
    assert_eq!(failed.state, BatchJobState::Failed);
    assert_eq!(failed.error, JOB_LEASE_EXPIRED);
    assert!(
        !store
            .batch_job_progress(dead.id, "a", &progress, LEASE)
            .await
            .unwrap(),
        "a failed job takes no progress"
    );
    // A job that failed by an error says why.
    store
        .finish_batch_job(next.id, "b", &progress, Some("identity store"))
        .await
        .unwrap();
    let listed: Vec<(i64, BatchJobState, String)> = store
        .batch_jobs(10)
        .await
        .unwrap()
        .into_iter()
        .map(|j| (j.id, j.state, j.error))
        .collect();
    assert_eq!(
        listed,
        [
            (next.id, BatchJobState::Failed, "identity store".to_owned()),
            (dead.id, BatchJobState::Failed, JOB_LEASE_EXPIRED.to_owned()),
            (first.id, BatchJobState::Succeeded, String::new()),
        ]
    );
    assert_eq!(store.batch_jobs(1).await.unwrap().len(), 1);
    assert_eq!(store.batch_job(next.id + 1).await.unwrap(), None);
}

#[tokio::test]
async fn jobs_run_one_at_a_time_and_expire_on_sqlite() {
    let dir = TestSqlite::new();
    let db = Database::connect(&dir.url("jobs.db"), SCHEMA, &DbSettings::default())
        .await
        .expect("connect");
    jobs_run_one_at_a_time_and_expire(db).await;
}

#[tokio::test]
async fn jobs_run_one_at_a_time_and_expire_on_postgres() {
    let test = TestDb::new().await;
    let db = Database::connect(test.url(), SCHEMA, &DbSettings::default())
        .await
        .expect("connect");
    jobs_run_one_at_a_time_and_expire(db).await;
}
