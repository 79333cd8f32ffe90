//! Probabilistic matching through the service, on both backends: indexing, training without
//! labels, the batch job, incremental matching, the identity rules' veto, suggestions and the
//! merges queued for the profile service.

use serde_json::{Map, Value};
use tessera_identity::{
    BatchJob, BatchJobState, BatchOutcome, BatchProgress, Identity, IdentityError,
    IdentitySettings, MatchSettings,
};
use tessera_store::Database;
use tessera_testkit::people;
use uuid::Uuid;

use crate::support::{Backend, resolve};

on_every_backend!(
    duplicates_merge_after_training_and_distinct_people_do_not,
    the_rules_veto_probabilistic_merges,
    suggestions_are_listed_and_decided,
    profiles_indexed_before_the_model_are_matched_when_sent_again,
    models_are_described_and_an_earlier_one_restored,
    a_batch_match_job_ends_with_what_run_batch_match_answers,
    a_batch_match_is_refused_while_another_runs_until_its_lease_expires,
    run_batch_match_outlives_the_request_timeout_and_answers_the_jobs_summary,
    a_batch_matchs_merges_reach_the_profile_service_in_one_call,
    survivors_sent_back_after_a_batch_are_matched_in_a_few_statements,
);

/// Person `n`'s traits (see `tessera_testkit::people`).
fn person(n: usize) -> Map<String, Value> {
    people::person(n).as_object().cloned().unwrap_or_default()
}

/// A duplicate of person `n` as another system typed it: a typo in the surname.
fn typo(n: usize) -> Map<String, Value> {
    people::typo(n).as_object().cloned().unwrap_or_default()
}

/// Creates a profile through resolution (an anonymous id of its own) and returns its id.
async fn profile(identity: &Identity, name: &str, ids: &[(&str, &str)]) -> Uuid {
    let mut all = vec![("anonymous_id", name)];
    all.extend_from_slice(ids);
    resolve(identity, &format!("e-{name}"), &all)
        .await
        .profile_id
}

/// 180 people, the first 30 of them twice (a typo in the second copy); returns the pairs.
async fn population(identity: &Identity) -> Vec<(Uuid, Uuid)> {
    let mut pairs = Vec::new();
    let mut batch = Vec::new();
    for n in 0..180 {
        let original = profile(identity, &format!("p{n}"), &[]).await;
        batch.push((original, person(n)));
        if n < 30 {
            let copy = profile(identity, &format!("d{n}"), &[]).await;
            batch.push((copy, typo(n)));
            pairs.push((original, copy));
        }
    }
    let outcome = identity.match_profiles(batch).await.expect("index");
    assert!(outcome.merges.is_empty(), "no model yet: indexing only");
    pairs
}

async fn canonical(identity: &Identity, profile: Uuid) -> Uuid {
    identity
        .profile_graph(profile, 1)
        .await
        .expect("graph")
        .profile_id
}

async fn duplicates_merge_after_training_and_distinct_people_do_not(b: &Backend) {
    let pairs = population(&b.identity).await;
    assert!(matches!(
        b.identity.run_batch_match().await,
        Err(IdentityError::FailedPrecondition(_))
    ));
    let summary = b.identity.train_match_model().await.expect("train");
    assert_eq!(summary.model_version, 1);
    assert_eq!(summary.profiles, 210);
    assert!(summary.converged, "{summary:?}");
    assert!(summary.lambda > 0.0 && summary.lambda < 1.0);
    assert!(summary.candidate_pairs > 0);

    let batch = b.identity.run_batch_match().await.expect("batch");
    assert_eq!(batch.model_version, 1);
    let mut merged = 0;
    for (original, copy) in &pairs {
        if canonical(&b.identity, *original).await == canonical(&b.identity, *copy).await {
            merged += 1;
        }
    }
    assert!(merged >= 27, "{merged} of 30 duplicate pairs merged");
    // No two distinct people were fused: 150 + 30 profiles remain at least.
    let mut survivors = std::collections::HashSet::new();
    for (original, _) in &pairs {
        survivors.insert(canonical(&b.identity, *original).await);
    }
    assert_eq!(survivors.len(), 30, "each duplicate pair is its own person");
    assert_eq!(batch.outcome.merges.len(), merged);

    // Every merge is explained in the graph log.
    let log = b.identity.graph_log().await.expect("log");
    let merges: Vec<_> = log
        .iter()
        .filter(|d| d.kind == "merge" && d.rule == "probabilistic")
        .collect();
    assert_eq!(merges.len(), merged);
    assert!(merges.iter().all(|d| d.event_id == "match:model-1"));

    // Matching the same profiles again finds nothing new.
    let again: Vec<(Uuid, Map<String, Value>)> = pairs
        .iter()
        .map(|(original, _)| (*original, person(0)))
        .take(0)
        .collect();
    let outcome = b.identity.match_profiles(again).await.expect("match");
    assert!(outcome.merges.is_empty());

    // A new duplicate arriving later is matched incrementally.
    let late = profile(&b.identity, "late", &[]).await;
    let outcome = b
        .identity
        .match_profiles(vec![(late, typo(100))])
        .await
        .expect("match");
    assert_eq!(outcome.merges.len(), 1, "{outcome:?}");
    let original = profile(&b.identity, "p100", &[]).await;
    assert_eq!(
        canonical(&b.identity, late).await,
        canonical(&b.identity, original).await
    );
}

async fn the_rules_veto_probabilistic_merges(b: &Backend) {
    population(&b.identity).await;
    b.identity.train_match_model().await.expect("train");
    // Two profiles that look alike but hold different user ids: two people, never merged.
    let first = profile(&b.identity, "twin-a", &[("user_id", "twin-1")]).await;
    let second = profile(&b.identity, "twin-b", &[("user_id", "twin-2")]).await;
    let outcome = b
        .identity
        .match_profiles(vec![(first, person(150)), (second, person(150))])
        .await
        .expect("match");
    assert!(outcome.refused >= 1, "{outcome:?}");
    assert_ne!(
        canonical(&b.identity, first).await,
        canonical(&b.identity, second).await
    );
}

async fn suggestions_are_listed_and_decided(b: &Backend) {
    // Suggest-only: nothing merges by itself, everything at or above 0.5 is a suggestion.
    let identity = b
        .replica(IdentitySettings {
            matching: MatchSettings {
                auto_merge_probability: 1.0,
                ..MatchSettings::default()
            },
            ..IdentitySettings::default()
        })
        .await
        .expect("identity");
    let pairs = population(&identity).await;
    identity.train_match_model().await.expect("train");
    let batch = identity.run_batch_match().await.expect("batch");
    let open = identity
        .match_suggestions(Some("open"), None, 1_000)
        .await
        .expect("list");
    assert_eq!(open.len() as i64, batch.outcome.suggestions);
    assert!(open.len() >= 27, "{} suggestions", open.len());
    assert!(batch.outcome.merges.is_empty());
    let explanation: Value = serde_json::from_str(&open[0].explanation).expect("json");
    assert!(
        explanation["match_probability"]
            .as_f64()
            .unwrap_or_default()
            >= 0.5
    );
    assert!(
        explanation["fields"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
    );

    let (accepted, merge) = identity
        .decide_match_suggestion(open[0].id, true)
        .await
        .expect("accept");
    assert_eq!(accepted.status, "accepted");
    let merge = merge.expect("merged");
    assert_eq!(merge.rule, "manual");
    assert_eq!(
        canonical(&identity, open[0].profile_a).await,
        canonical(&identity, open[0].profile_b).await
    );
    let (rejected, merge) = identity
        .decide_match_suggestion(open[1].id, false)
        .await
        .expect("reject");
    assert_eq!(rejected.status, "rejected");
    assert!(merge.is_none());
    assert!(matches!(
        identity.decide_match_suggestion(open[1].id, true).await,
        Err(IdentityError::FailedPrecondition(_))
    ));
    assert!(matches!(
        identity.decide_match_suggestion(999_999, true).await,
        Err(IdentityError::Missing(_))
    ));
    // A rejected pair is never suggested again.
    identity.run_batch_match().await.expect("batch");
    let rejected_again = identity
        .match_suggestions(Some("open"), None, 1_000)
        .await
        .expect("list")
        .into_iter()
        .filter(|s| s.profile_a == rejected.profile_a && s.profile_b == rejected.profile_b)
        .count();
    assert_eq!(rejected_again, 0);
    assert!(!pairs.is_empty());
}

async fn profiles_indexed_before_the_model_are_matched_when_sent_again(b: &Backend) {
    let pairs = population(&b.identity).await;
    b.identity.train_match_model().await.expect("train");
    // Unchanged traits, but never matched with model 1: matched now, without the batch job.
    let (original, copy) = pairs[3];
    let outcome = b
        .identity
        .match_profiles(vec![(copy, typo(3))])
        .await
        .expect("match");
    assert_eq!(outcome.merges.len(), 1, "{outcome:?}");
    assert_eq!(
        canonical(&b.identity, copy).await,
        canonical(&b.identity, original).await
    );
    // Matched with model 1 already and unchanged: nothing to do.
    let (other_original, other_copy) = pairs[4];
    b.identity
        .match_profiles(vec![(other_original, person(4))])
        .await
        .expect("match");
    let merged =
        canonical(&b.identity, other_copy).await == canonical(&b.identity, other_original).await;
    assert!(merged, "the first send matches the pair");
    let again = b
        .identity
        .match_profiles(vec![(other_original, person(4))])
        .await
        .expect("match");
    assert!(again.merges.is_empty() && again.suggestions == 0);
}

#[tokio::test]
async fn bad_matching_settings_are_refused_naming_the_key() {
    let b = Backend::sqlite().await;
    for (settings, field) in [
        (
            MatchSettings {
                review_probability: 0.0,
                ..MatchSettings::default()
            },
            "matching.review_probability",
        ),
        (
            MatchSettings {
                auto_merge_probability: 0.4,
                ..MatchSettings::default()
            },
            "matching.auto_merge_probability",
        ),
    ] {
        let err = b
            .replica(IdentitySettings {
                matching: settings,
                ..IdentitySettings::default()
            })
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(field), "{err}");
    }
}

async fn models_are_described_and_an_earlier_one_restored(b: &Backend) {
    assert!(matches!(
        b.identity.match_model(None).await,
        Err(IdentityError::Missing(_))
    ));
    population(&b.identity).await;
    let first = b.identity.train_match_model().await.expect("train");
    let described = b.identity.match_model(None).await.expect("model");
    assert_eq!(
        described.summary, first,
        "the model is described as trained"
    );
    assert!(described.trained_at <= time::OffsetDateTime::now_utc());

    // More people, a second training: the current model is the new one.
    for n in 180..240 {
        let id = profile(&b.identity, &format!("q{n}"), &[]).await;
        b.identity
            .match_profiles(vec![(id, person(n))])
            .await
            .expect("index");
    }
    let second = b.identity.train_match_model().await.expect("train");
    assert_eq!(second.model_version, 2);
    assert_eq!(second.profiles, 270);
    assert_eq!(
        b.identity.match_model(None).await.expect("model").summary,
        second
    );
    assert_eq!(
        b.identity
            .match_model(Some(1))
            .await
            .expect("model")
            .summary,
        first
    );

    // Roll back to the first: a new version with the first's parameters, used from now on.
    let restored = b.identity.restore_match_model(1).await.expect("restore");
    assert_eq!(restored.summary.model_version, 3);
    assert_eq!(restored.summary.restored_from, Some(1));
    assert_eq!(restored.summary.lambda, first.lambda);
    assert_eq!(restored.summary.fields, first.fields);
    let current = b.identity.match_model(None).await.expect("model");
    assert_eq!(current.summary, restored.summary);
    let batch = b.identity.run_batch_match().await.expect("batch");
    assert_eq!(batch.model_version, 3);
    // Restoring a restored model names the training it came from.
    let again = b.identity.restore_match_model(3).await.expect("restore");
    assert_eq!(again.summary.restored_from, Some(1));

    assert!(matches!(
        b.identity.restore_match_model(99).await,
        Err(IdentityError::Missing(_))
    ));
    // A replica whose matching config changed cannot restore a model that no longer fits.
    let mut settings = MatchSettings::default();
    settings.model.comparisons[0].levels.pop();
    let changed = b
        .replica(IdentitySettings {
            matching: settings,
            ..IdentitySettings::default()
        })
        .await
        .expect("identity");
    assert!(matches!(
        changed.restore_match_model(1).await,
        Err(IdentityError::FailedPrecondition(m)) if m.contains("train a new one")
    ));
}

/// Polls job `id` until it is no longer running (at most 60 s).
async fn finished(identity: &Identity, id: i64) -> BatchJob {
    for _ in 0..600 {
        let job = identity.batch_match_job(id).await.expect("job");
        if job.state != BatchJobState::Running {
            return job;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("batch match job {id} still running after 60 s");
}

/// What `RunBatchMatch` answers, as a job's counts.
fn counts(batch: &BatchOutcome) -> BatchProgress {
    BatchProgress {
        model_version: batch.model_version,
        profiles: batch.profiles,
        candidate_pairs: batch.candidate_pairs,
        pairs_done: batch.candidate_pairs,
        merges: batch.outcome.merges.len() as i64,
        suggestions: batch.outcome.suggestions,
        refused: batch.outcome.refused,
    }
}

async fn a_batch_match_job_ends_with_what_run_batch_match_answers(b: &Backend) {
    population(&b.identity).await;
    // Without a model a job is not even started.
    assert!(matches!(
        b.identity.start_batch_match().await,
        Err(IdentityError::FailedPrecondition(_))
    ));
    assert_eq!(b.identity.batch_match_jobs(10).await.expect("jobs"), []);
    b.identity.train_match_model().await.expect("train");

    // The unary call runs a job and answers its summary.
    let unary = b.identity.run_batch_match().await.expect("batch");
    assert!(!unary.outcome.merges.is_empty(), "{unary:?}");
    let jobs = b.identity.batch_match_jobs(10).await.expect("jobs");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, BatchJobState::Succeeded);
    assert_eq!(jobs[0].progress, counts(&unary));

    // Started, it answers at once, running; polled, it ends as the unary call ends on the same
    // population (the merges are done: nothing new, and the same pairs scored).
    let started = b.identity.start_batch_match().await.expect("start");
    assert_eq!(started.state, BatchJobState::Running);
    assert!(started.id > jobs[0].id);
    assert_eq!(started.finished_at, None);
    let job = finished(&b.identity, started.id).await;
    assert_eq!(job.state, BatchJobState::Succeeded, "{job:?}");
    assert_eq!(job.error, "");
    assert!(job.finished_at.is_some());
    let again = b.identity.run_batch_match().await.expect("batch");
    assert_eq!(job.progress, counts(&again));
    assert_eq!(job.progress.merges, 0);
    assert_eq!(job.progress.model_version, 1);
    let ids: Vec<i64> = b
        .identity
        .batch_match_jobs(10)
        .await
        .expect("jobs")
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[1], started.id, "newest first");
    assert!(matches!(
        b.identity.batch_match_job(ids[0] + 1).await,
        Err(IdentityError::Missing("batch match job"))
    ));
}

/// Runs `sql` with one bound id.
async fn execute(db: &Database, sql: &'static str) {
    match db {
        Database::Postgres(pool) => {
            sqlx::query(sql).execute(pool).await.expect("sql");
        }
        Database::Sqlite(pool) => {
            sqlx::query(sql).execute(pool).await.expect("sql");
        }
    }
}

async fn a_batch_match_is_refused_while_another_runs_until_its_lease_expires(b: &Backend) {
    population(&b.identity).await;
    b.identity.train_match_model().await.expect("train");
    // Another replica runs a job (its lease far ahead).
    let (hold, expire) = match &b.db {
        Database::Postgres(_) => (
            "INSERT INTO batch_match_jobs (state, owner, lease_until, started_at, updated_at) \
             VALUES ('running', 'elsewhere', now() + interval '1 hour', now(), now())",
            "UPDATE batch_match_jobs SET lease_until = now() - interval '1 second'",
        ),
        Database::Sqlite(_) => (
            "INSERT INTO batch_match_jobs (state, owner, lease_until, started_at, updated_at) \
             VALUES ('running', 'elsewhere', 9000000000000000, 0, 0)",
            "UPDATE batch_match_jobs SET lease_until = 1",
        ),
    };
    execute(&b.db, hold).await;
    let running = b
        .identity
        .batch_match_jobs(1)
        .await
        .expect("jobs")
        .remove(0);
    assert_eq!(running.state, BatchJobState::Running);
    for refused in [
        b.identity.start_batch_match().await.map(|_| ()),
        b.identity.run_batch_match().await.map(|_| ()),
    ] {
        match refused {
            Err(IdentityError::FailedPrecondition(message)) => assert_eq!(
                message,
                format!(
                    "batch match job {} is running: poll it with GetBatchMatchJob",
                    running.id
                )
            ),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        b.identity.batch_match_jobs(10).await.expect("jobs").len(),
        1
    );

    // Its replica died: once the lease expired, the job reads failed and a new one runs.
    execute(&b.db, expire).await;
    let dead = b.identity.batch_match_job(running.id).await.expect("job");
    assert_eq!(dead.state, BatchJobState::Failed);
    assert!(dead.error.contains("stopped renewing"), "{}", dead.error);
    let batch = b.identity.run_batch_match().await.expect("batch");
    assert!(!batch.outcome.merges.is_empty());
}

/// `RunBatchMatch` waits for its job for as long as the job takes, whatever the server's request
/// timeout, and answers the job's summary; other methods keep the timeout.
async fn run_batch_match_outlives_the_request_timeout_and_answers_the_jobs_summary(b: &Backend) {
    use tessera_proto::identity::v1::identity_service_client::IdentityServiceClient;
    use tessera_proto::identity::v1::{RunBatchMatchRequest, TrainMatchModelRequest};

    population(&b.identity).await;
    b.identity.train_match_model().await.expect("train");
    // Every call takes longer than this: a batch match runs several transactions.
    let timeout = std::time::Duration::from_millis(1);
    let mut services = tessera_server::GrpcServices::default();
    b.identity.register(&mut services);
    let server = tessera_testkit::GrpcTestServer::start_with(
        services,
        tessera_server::EdgeSettings {
            request_timeout_ms: timeout.as_millis() as u64,
            ..tessera_server::EdgeSettings::default()
        },
    )
    .await;
    let mut client = IdentityServiceClient::new(server.channel().await);

    let started = std::time::Instant::now();
    let summary = client
        .run_batch_match(RunBatchMatchRequest {})
        .await
        .expect("RunBatchMatch is not cut by the request timeout")
        .into_inner();
    assert!(started.elapsed() > timeout);
    assert!(summary.merges > 0, "{summary:?}");
    // Read apart from the server: every call of it but RunBatchMatch has 1 ms.
    let jobs = b.identity.batch_match_jobs(1).await.expect("jobs");
    assert_eq!(jobs[0].state, BatchJobState::Succeeded);
    let job = jobs[0].progress;
    assert_eq!(
        [
            job.model_version,
            job.profiles,
            job.candidate_pairs,
            job.merges,
            job.suggestions,
            job.refused
        ],
        [
            summary.model_version,
            summary.profiles,
            summary.candidate_pairs,
            summary.merges,
            summary.suggestions,
            summary.refused
        ],
        "the job's summary"
    );

    let cut = client
        .train_match_model(TrainMatchModelRequest {})
        .await
        .expect_err("other methods keep the request timeout");
    assert_eq!(cut.code(), tonic::Code::Cancelled, "{cut:?}");
}

/// The (survivor, merged) pairs of each call, in call order.
type Calls = std::sync::Arc<std::sync::Mutex<Vec<Vec<(String, String)>>>>;

/// A profile service that records the merges of every `ApplyEvents` call.
#[derive(Debug, Clone, Default)]
struct ProfileDouble {
    calls: Calls,
}

#[tonic::async_trait]
impl tessera_proto::profile::v1::profile_pipeline_service_server::ProfilePipelineService
    for ProfileDouble
{
    type StreamPurchaseHistoriesStream = tonic::codegen::tokio_stream::Empty<
        Result<tessera_proto::profile::v1::StreamPurchaseHistoriesResponse, tonic::Status>,
    >;

    async fn apply_events(
        &self,
        request: tonic::Request<tessera_proto::profile::v1::ApplyEventsRequest>,
    ) -> Result<tonic::Response<tessera_proto::profile::v1::ApplyEventsResponse>, tonic::Status>
    {
        let request = request.into_inner();
        assert!(request.events.is_empty(), "merges only");
        self.calls.lock().unwrap().push(
            request
                .merges
                .into_iter()
                .map(|m| (m.surviving_profile_id, m.merged_profile_id))
                .collect(),
        );
        Ok(tonic::Response::new(
            tessera_proto::profile::v1::ApplyEventsResponse::default(),
        ))
    }

    async fn split_profiles(
        &self,
        _request: tonic::Request<tessera_proto::profile::v1::SplitProfilesRequest>,
    ) -> Result<tonic::Response<tessera_proto::profile::v1::SplitProfilesResponse>, tonic::Status>
    {
        Err(tonic::Status::unimplemented("not part of the double"))
    }

    async fn stream_purchase_histories(
        &self,
        _request: tonic::Request<tessera_proto::profile::v1::StreamPurchaseHistoriesRequest>,
    ) -> Result<tonic::Response<Self::StreamPurchaseHistoriesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not part of the double"))
    }
}

/// The merges of a batch match are queued in the outbox and sent to the profile service as
/// one `ApplyEvents` (merges only, in the order they were decided), not one call per merge;
/// acknowledged, they are not sent again.
async fn a_batch_matchs_merges_reach_the_profile_service_in_one_call(b: &Backend) {
    use tessera_proto::profile::v1::profile_pipeline_service_server::ProfilePipelineServiceServer;

    population(&b.identity).await;
    b.identity.train_match_model().await.expect("train");
    let batch = b.identity.run_batch_match().await.expect("batch");
    let decided: Vec<(String, String)> = batch
        .outcome
        .merges
        .iter()
        .map(|m| {
            (
                m.surviving_profile_id.to_string(),
                m.merged_profile_id.to_string(),
            )
        })
        .collect();
    assert!(decided.len() >= 27, "{} merges", decided.len());

    let double = ProfileDouble::default();
    let mut services = tessera_server::GrpcServices::default();
    services.add(ProfilePipelineServiceServer::new(double.clone()));
    let profile = tessera_testkit::GrpcTestServer::start(services).await;
    let stop = tessera_server::Shutdown::new();
    let delivery = b
        .identity
        .spawn_merge_delivery(profile.channel().await, stop.clone());
    for _ in 0..100 {
        if !double.calls.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Acknowledged: nothing more is sent.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.cancel();
    delivery.await.expect("delivery stops");
    let calls = double.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "one call for {} merges", decided.len());
    assert_eq!(calls[0], decided, "in the order they were decided");
}

thread_local! {
    /// The statements sqlx ran on this thread (Postgres runs them on the caller's task; the
    /// SQLite driver on a thread of its own, so this counts only Postgres').
    static STATEMENTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts sqlx's `sqlx::query` events (one per statement) per thread; the process-wide default
/// subscriber of this test binary once installed.
struct Statements;

impl tracing::Subscriber for Statements {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == "sqlx::query"
    }
    fn new_span(&self, _span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _span: &tracing::span::Id, _values: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _span: &tracing::span::Id, _follows: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if event.metadata().target() == "sqlx::query" {
            STATEMENTS.with(|n| n.set(n.get() + 1));
        }
    }
    fn enter(&self, _span: &tracing::span::Id) {}
    fn exit(&self, _span: &tracing::span::Id) {}
}

/// The model version `profile` was last matched with, if any.
async fn matched_version(db: &Database, profile: Uuid) -> Option<i64> {
    match db {
        Database::Postgres(pool) => {
            sqlx::query_scalar("SELECT matched_version FROM match_attributes WHERE profile_id = $1")
                .bind(profile)
                .fetch_one(pool)
                .await
        }
        Database::Sqlite(pool) => {
            sqlx::query_scalar("SELECT matched_version FROM match_attributes WHERE profile_id = ?1")
                .bind(profile.to_string())
                .fetch_one(pool)
                .await
        }
    }
    .expect("matched version")
}

/// After a batch match the profile service sends every survivor back with its merged traits
/// (`MatchProfiles`): they are matched with one read of their blocks and marked matched with
/// one statement, not two statements per survivor; sent again unchanged, they are skipped.
async fn survivors_sent_back_after_a_batch_are_matched_in_a_few_statements(b: &Backend) {
    static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let counting =
        *INSTALLED.get_or_init(|| tracing::subscriber::set_global_default(Statements).is_ok());
    let pairs = population(&b.identity).await;
    b.identity.train_match_model().await.expect("train");
    let batch = b.identity.run_batch_match().await.expect("batch");
    // Each survivor with its merged traits: the copy's surname (the newer record) won.
    let survivors: Vec<(Uuid, Map<String, Value>)> = batch
        .outcome
        .merges
        .iter()
        .filter_map(|m| {
            let n = pairs.iter().position(|(original, copy)| {
                [*original, *copy].contains(&m.surviving_profile_id)
            })?;
            Some((m.surviving_profile_id, typo(n)))
        })
        .collect();
    assert!(survivors.len() >= 27, "{} survivors", survivors.len());

    let before = STATEMENTS.with(std::cell::Cell::get);
    b.identity
        .match_profiles(survivors.clone())
        .await
        .expect("match");
    let statements = STATEMENTS.with(std::cell::Cell::get) - before;
    for (survivor, _) in &survivors {
        assert_eq!(
            matched_version(&b.db, *survivor).await,
            Some(1),
            "{survivor}"
        );
    }
    if counting && matches!(b.db, Database::Postgres(_)) {
        // It was 67 for these 30: two per survivor (its blocks, then marked matched).
        assert!(
            statements > 0 && statements < 20,
            "{statements} statements for {} survivors",
            survivors.len()
        );
    }
    let again = b
        .identity
        .match_profiles(survivors)
        .await
        .expect("match again");
    assert!(
        again.merges.is_empty() && again.suggestions == 0,
        "{again:?}"
    );
}
