//! Delivery to doubles of the identity and profile services: an event identity suppresses (it
//! belongs to a deleted person) never reaches the profile and is deleted from the log, with its
//! dedup key; the next round is resolved while the current one is applied, and rounds still
//! apply in log order, each event once, across failed apply calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_ingestion::{Ingestion, IngestionSettings, MIGRATIONS, SCHEMA};
use tessera_proto::identity::v1 as identity_pb;
use tessera_proto::identity::v1::identity_service_server::{
    IdentityService, IdentityServiceServer,
};
use tessera_proto::ingestion::v1::debugger_service_client::DebuggerServiceClient;
use tessera_proto::ingestion::v1::{EventStatus, IngestEventsRequest, ListEventsRequest};
use tessera_proto::profile::v1 as profile_pb;
use tessera_proto::profile::v1::profile_pipeline_service_server::{
    ProfilePipelineService, ProfilePipelineServiceServer,
};
use tessera_server::{GrpcServices, Shutdown};
use tessera_store::{Database, DbSettings};
use tessera_testkit::GrpcTestServer;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::{Backend, TestDatabase, track};

on_both_backends!(crate::backend;
    suppressed_events_are_not_applied_and_are_forgotten,
    rounds_overlap_and_still_apply_in_order_once_across_failures,
);

/// The user ids of deleted people start with this: the identity double suppresses their events.
const GONE: &str = "gone-";

/// An identity service that gives each user id its own profile and suppresses the events of
/// users whose id starts with [`GONE`]. It counts the calls that came while an apply call of
/// the profile double was in flight (`applying`, shared with it).
#[derive(Debug, Clone, Default)]
struct IdentityDouble {
    applying: Arc<AtomicBool>,
    overlapped: Arc<AtomicUsize>,
}

impl IdentityDouble {
    fn resolve(
        records: Vec<identity_pb::IdentityRecord>,
    ) -> identity_pb::ResolveIdentitiesResponse {
        let resolutions = records
            .into_iter()
            .map(|record| {
                let user = record
                    .identifiers
                    .iter()
                    .find(|i| i.r#type == "user_id")
                    .map(|i| i.value.clone())
                    .unwrap_or_default();
                if user.starts_with(GONE) {
                    identity_pb::Resolution {
                        event_id: record.event_id,
                        suppressed: true,
                        ..identity_pb::Resolution::default()
                    }
                } else {
                    identity_pb::Resolution {
                        event_id: record.event_id,
                        profile_id: format!("profile-of-{user}"),
                        identifiers: record.identifiers,
                        ..identity_pb::Resolution::default()
                    }
                }
            })
            .collect();
        identity_pb::ResolveIdentitiesResponse { resolutions }
    }
}

/// The identity double's RPCs other than ResolveIdentities, all UNIMPLEMENTED.
macro_rules! identity_double {
    ($($rpc:ident($request:ident) -> $response:ident;)*) => {
        #[tonic::async_trait]
        impl IdentityService for IdentityDouble {
            async fn resolve_identities(
                &self,
                request: Request<identity_pb::ResolveIdentitiesRequest>,
            ) -> Result<Response<identity_pb::ResolveIdentitiesResponse>, Status> {
                if self.applying.load(Ordering::SeqCst) {
                    self.overlapped.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Response::new(Self::resolve(request.into_inner().records)))
            }
            $(
                async fn $rpc(
                    &self,
                    _: Request<identity_pb::$request>,
                ) -> Result<Response<identity_pb::$response>, Status> {
                    Err(Status::unimplemented("not part of the double"))
                }
            )*
        }
    };
}

identity_double! {
    lookup_identifier(LookupIdentifierRequest) -> LookupIdentifierResponse;
    get_profile_graph(GetProfileGraphRequest) -> GetProfileGraphResponse;
    get_rules(GetRulesRequest) -> GetRulesResponse;
    update_rules(UpdateRulesRequest) -> UpdateRulesResponse;
    match_profiles(MatchProfilesRequest) -> MatchProfilesResponse;
    train_match_model(TrainMatchModelRequest) -> TrainMatchModelResponse;
    get_match_model(GetMatchModelRequest) -> GetMatchModelResponse;
    restore_match_model(RestoreMatchModelRequest) -> RestoreMatchModelResponse;
    run_batch_match(RunBatchMatchRequest) -> RunBatchMatchResponse;
    list_match_suggestions(ListMatchSuggestionsRequest) -> ListMatchSuggestionsResponse;
    decide_match_suggestion(DecideMatchSuggestionRequest) -> DecideMatchSuggestionResponse;
    merge_profiles(MergeProfilesRequest) -> MergeProfilesResponse;
    unmerge_profiles(UnmergeProfilesRequest) -> UnmergeProfilesResponse;
    detach_identifier(DetachIdentifierRequest) -> DetachIdentifierResponse;
    erase_identifier(EraseIdentifierRequest) -> EraseIdentifierResponse;
    forget_profile(ForgetProfileRequest) -> ForgetProfileResponse;
}

/// A profile pipeline that records the event ids of every ApplyEvents call it answers OK.
/// When `fail_every` is above 0, every so many calls fail (UNAVAILABLE, nothing recorded);
/// each call takes `delay` and raises `applying` meanwhile.
#[derive(Debug, Clone, Default)]
struct ProfileDouble {
    calls: Arc<Mutex<Vec<Vec<String>>>>,
    fail_every: usize,
    delay: Duration,
    attempts: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    applying: Arc<AtomicBool>,
}

impl ProfileDouble {
    fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().expect("not poisoned").clone()
    }

    fn applied(&self) -> Vec<String> {
        self.calls().concat()
    }
}

#[tonic::async_trait]
impl ProfilePipelineService for ProfileDouble {
    type StreamPurchaseHistoriesStream =
        futures::stream::Empty<Result<profile_pb::StreamPurchaseHistoriesResponse, Status>>;

    async fn stream_purchase_histories(
        &self,
        _: Request<profile_pb::StreamPurchaseHistoriesRequest>,
    ) -> Result<Response<Self::StreamPurchaseHistoriesStream>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn apply_events(
        &self,
        request: Request<profile_pb::ApplyEventsRequest>,
    ) -> Result<Response<profile_pb::ApplyEventsResponse>, Status> {
        let attempt = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
        self.applying.store(true, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.applying.store(false, Ordering::SeqCst);
        if self.fail_every > 0 && attempt.is_multiple_of(self.fail_every) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(Status::unavailable("the double fails this call"));
        }
        let ids: Vec<String> = request
            .into_inner()
            .events
            .into_iter()
            .map(|e| e.event_id)
            .collect();
        let applied = i64::try_from(ids.len()).unwrap_or(i64::MAX);
        self.calls.lock().expect("not poisoned").push(ids);
        Ok(Response::new(profile_pb::ApplyEventsResponse {
            applied,
            ..profile_pb::ApplyEventsResponse::default()
        }))
    }

    async fn split_profiles(
        &self,
        _: Request<profile_pb::SplitProfilesRequest>,
    ) -> Result<Response<profile_pb::SplitProfilesResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }
}

/// The message ids the log holds for the test source, newest first.
async fn logged(channel: Channel) -> Vec<String> {
    DebuggerServiceClient::new(channel)
        .list_events(ListEventsRequest {
            source_name: "default".into(),
            page_size: 100,
            page_token: String::new(),
            filter: None,
        })
        .await
        .expect("list events")
        .into_inner()
        .events
        .into_iter()
        .map(|e| e.message_id)
        .collect()
}

/// Waits (up to 20 s: on Postgres delivery waits for older transactions of the whole cluster)
/// until `done` holds.
async fn eventually<F: AsyncFnMut() -> bool>(what: &str, mut done: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "never {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn suppressed_events_are_not_applied_and_are_forgotten(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = Database::connect(&db.url(), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    store.migrate(MIGRATIONS).await.unwrap();
    let ingestion = Ingestion::new(
        store,
        IngestionSettings {
            poll_interval_ms: 20,
            ..IngestionSettings::default()
        },
    )
    .await
    .unwrap();
    crate::sources::with_test_source(&ingestion).await;
    let profile = ProfileDouble::default();
    let mut peers = GrpcServices::default();
    peers.add(IdentityServiceServer::new(IdentityDouble::default()));
    peers.add(ProfilePipelineServiceServer::new(profile.clone()));
    let peers = GrpcTestServer::start(peers).await;
    let stop = Shutdown::new();
    let delivery =
        ingestion.spawn_delivery(peers.lazy_channel(), peers.lazy_channel(), stop.clone());
    let mut services = GrpcServices::default();
    ingestion.register(&mut services);
    let server = GrpcTestServer::start(services).await;
    let channel = server.channel().await;
    let mut client = crate::sources::client(channel.clone());
    let mut ingest = async |events| {
        client
            .ingest_events(IngestEventsRequest { events })
            .await
            .unwrap()
            .into_inner()
            .results
    };

    // Only a deleted person's events: they leave the log, and the profile is never called.
    let gone = ingest(vec![
        track("gone-a", "gone-1", "A"),
        track("gone-b", "gone-1", "B"),
    ])
    .await;
    eventually("forgot the suppressed events", async || {
        logged(channel.clone()).await.is_empty()
    })
    .await;
    assert!(profile.calls().is_empty(), "{:?}", profile.calls());

    // Mixed: the others are applied, the deleted person's are not, and only theirs are gone.
    let mixed = ingest(vec![
        track("kept-a", "u1", "A"),
        track("gone-c", "gone-1", "C"),
        track("kept-b", "u2", "B"),
    ])
    .await;
    let kept = [mixed[0].event_id.clone(), mixed[2].event_id.clone()];
    eventually("applied the other events", async || {
        let applied = profile.applied();
        kept.iter().all(|id| applied.contains(id))
    })
    .await;
    eventually("forgot the suppressed event", async || {
        logged(channel.clone()).await == ["kept-b", "kept-a"]
    })
    .await;
    let applied = profile.applied();
    for suppressed in gone.iter().chain([&mixed[1]]) {
        assert!(
            !applied.contains(&suppressed.event_id),
            "{} was applied",
            suppressed.message_id
        );
    }

    // Their dedup keys went with them: sent again, a suppressed message is new.
    let again = ingest(vec![track("gone-a", "gone-1", "A")]).await;
    assert_eq!(again[0].status, EventStatus::Accepted as i32);
    assert_ne!(again[0].event_id, gone[0].event_id);

    stop.cancel();
    delivery.await.unwrap();
}

/// The next round is read and resolved while the current one is applied; a failed apply call
/// throws the round read ahead away, and the round is delivered again from where the cursors
/// were. Every event is applied exactly once, and each person's events in the order they were
/// logged.
async fn rounds_overlap_and_still_apply_in_order_once_across_failures(backend: Backend) {
    const USERS: usize = 4;
    const PER_USER: usize = 15;
    let db = TestDatabase::new(backend).await;
    let store = Database::connect(&db.url(), SCHEMA, &DbSettings::default())
        .await
        .unwrap();
    store.migrate(MIGRATIONS).await.unwrap();
    let ingestion = Ingestion::new(
        store,
        IngestionSettings {
            poll_interval_ms: 20,
            // Small rounds, so the events take many of them.
            delivery_batch: 4,
            max_backoff_ms: 50,
            ..IngestionSettings::default()
        },
    )
    .await
    .unwrap();
    crate::sources::with_test_source(&ingestion).await;
    let applying = Arc::new(AtomicBool::new(false));
    let identity = IdentityDouble {
        applying: applying.clone(),
        ..IdentityDouble::default()
    };
    let profile = ProfileDouble {
        fail_every: 3,
        delay: Duration::from_millis(40),
        applying,
        ..ProfileDouble::default()
    };
    let mut peers = GrpcServices::default();
    peers.add(IdentityServiceServer::new(identity.clone()));
    peers.add(ProfilePipelineServiceServer::new(profile.clone()));
    let peers = GrpcTestServer::start(peers).await;
    let mut services = GrpcServices::default();
    ingestion.register(&mut services);
    let server = GrpcTestServer::start(services).await;
    let mut client = crate::sources::client(server.channel().await);

    // Logged before delivery starts, in one request: each person's events in order.
    let events: Vec<_> = (0..PER_USER)
        .flat_map(|n| (0..USERS).map(move |u| track(&format!("m-{u}-{n}"), &format!("u{u}"), "E")))
        .collect();
    let results = client
        .ingest_events(IngestEventsRequest { events })
        .await
        .unwrap()
        .into_inner()
        .results;
    let user_of: HashMap<String, (usize, usize)> = results
        .iter()
        .enumerate()
        .map(|(i, r)| (r.event_id.clone(), (i % USERS, i / USERS)))
        .collect();
    assert_eq!(user_of.len(), USERS * PER_USER);

    let stop = Shutdown::new();
    let delivery =
        ingestion.spawn_delivery(peers.lazy_channel(), peers.lazy_channel(), stop.clone());
    eventually("applied every event", async || {
        profile.applied().len() >= USERS * PER_USER
    })
    .await;
    // A little longer: a duplicate would come now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    delivery.await.unwrap();

    let applied = profile.applied();
    assert_eq!(
        applied.len(),
        USERS * PER_USER,
        "an event applied twice: {applied:?}"
    );
    let mut next = [0; USERS];
    for id in &applied {
        let (user, n) = user_of[id];
        assert_eq!(n, next[user], "u{user}'s events out of order: {applied:?}");
        next[user] += 1;
    }
    assert!(
        profile.failed.load(Ordering::SeqCst) >= 3,
        "the double never failed"
    );
    assert!(
        identity.overlapped.load(Ordering::SeqCst) > 0,
        "no round was resolved while another was applied"
    );
}
