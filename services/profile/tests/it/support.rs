//! Test support: event builders, servers on 127.0.0.1:0, and a test double of the identity
//! service (a peer service: lookups answered from a map, matching from configured merges).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tessera_core::Identifier;
use tessera_profile::domain::{EventDetails, Merge, ResolvedEvent};
use tessera_proto::common::v1 as common;
use tessera_proto::convert::{json_map_to_struct, to_timestamp};
use tessera_proto::identity::v1 as identity;
use tessera_proto::identity::v1::identity_service_server::{
    IdentityService, IdentityServiceServer,
};
use tessera_proto::ingestion::v1 as ingestion;
use tessera_proto::ingestion::v1::event_log_service_server::{
    EventLogService, EventLogServiceServer,
};
use tessera_proto::profile::v1 as pb;
use tessera_server::GrpcServices;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

/// The time of minute 0 of the test events.
pub(crate) const T0: OffsetDateTime = datetime!(2026-05-01 00:00:00 UTC);

/// `T0` plus `minute` minutes.
pub(crate) fn at(minute: i64) -> OffsetDateTime {
    T0 + Duration::minutes(minute)
}

/// A domain event of `profile_id` at `minute` setting `traits`, linking `user_id:<user>`.
pub(crate) fn event(
    event_id: &str,
    profile_id: &str,
    minute: i64,
    user: &str,
    traits: Value,
) -> ResolvedEvent {
    ResolvedEvent {
        event_id: event_id.to_owned(),
        profile_id: profile_id.to_owned(),
        timestamp: at(minute),
        traits: traits.as_object().cloned().unwrap_or_default(),
        identifiers: vec![Identifier::new("user_id", user)],
        details: EventDetails {
            message_id: format!("m-{event_id}"),
            kind: "identify".to_owned(),
            ..EventDetails::default()
        },
    }
}

/// A domain merge.
pub(crate) fn merge(survivor: &str, merged: &str) -> Merge {
    Merge {
        surviving_profile_id: survivor.to_owned(),
        merged_profile_id: merged.to_owned(),
    }
}

/// A wire identify event resolved to `profile_id`, at `timestamp`.
pub(crate) fn identify(
    event_id: &str,
    profile_id: &str,
    user: &str,
    timestamp: OffsetDateTime,
    traits: Value,
) -> pb::ResolvedEvent {
    pb::ResolvedEvent {
        event_id: event_id.to_owned(),
        profile_id: profile_id.to_owned(),
        event: Some(common::Event {
            message_id: format!("m-{event_id}"),
            r#type: common::EventType::Identify as i32,
            user_id: user.to_owned(),
            traits: Some(json_map_to_struct(traits.as_object().unwrap())),
            timestamp: Some(to_timestamp(timestamp)),
            ..Default::default()
        }),
        identifiers: vec![common::Identifier {
            r#type: "user_id".to_owned(),
            value: user.to_owned(),
        }],
        ..Default::default()
    }
}

/// A wire track event resolved to `profile_id`, at `timestamp`.
pub(crate) fn track(
    event_id: &str,
    profile_id: &str,
    user: &str,
    timestamp: OffsetDateTime,
) -> pb::ResolvedEvent {
    let mut e = identify(event_id, profile_id, user, timestamp, serde_json::json!({}));
    let event = e.event.as_mut().unwrap();
    event.r#type = common::EventType::Track as i32;
    event.event = "Order Completed".to_owned();
    event.traits = None;
    e
}

/// A server edge serving services on 127.0.0.1:0, stopped on drop.
pub(crate) use tessera_testkit::GrpcTestServer as Served;

/// A lazily connected channel to `url`.
pub(crate) fn lazy_channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned()).unwrap().connect_lazy()
}

/// The real scoring service, served.
pub(crate) async fn scoring_server() -> Served {
    let mut services = GrpcServices::default();
    tessera_scoring::Scoring::new().register(&mut services);
    Served::start(services).await
}

/// An identifier as the double keys it: (type, value).
type IdentifierKey = (String, String);

/// A test double of the identity service: `LookupIdentifier` answers from a map,
/// `MatchProfiles` with configured merges, `ForgetProfile` forgets a component as the real
/// service does. Its server also stands in for ingestion's event log (`ForgetEvents`), which a
/// deletion asks last.
#[derive(Debug, Clone, Default)]
pub(crate) struct IdentityDouble {
    links: Arc<Mutex<HashMap<IdentifierKey, String>>>,
    /// Every profile each identifier was ever linked to (a link moved by a merge leaves the
    /// merged profile here): what makes up a component when it is forgotten.
    linked_before: Arc<Mutex<HashMap<IdentifierKey, Vec<String>>>>,
    /// The answers of the components forgotten so far, by each of their profiles.
    forgotten: Arc<Mutex<HashMap<String, identity::ForgetProfileResponse>>>,
    matching: Arc<Mutex<Matching>>,
    lookups: Arc<std::sync::atomic::AtomicUsize>,
}

/// What the double's `MatchProfiles` answers, and what it was sent.
#[derive(Debug, Default)]
struct Matching {
    /// Merges not answered yet; each is answered once, by the first call that sends one of its
    /// two profiles (matching again finds nothing new, as the real service promises).
    merges: Vec<identity::Merge>,
    /// When set, every call fails with this code.
    fail_with: Option<Code>,
    /// Every call's profiles, in call order.
    calls: Vec<Vec<identity::ProfileTraits>>,
}

impl IdentityDouble {
    /// Links `type:value` to `profile_id`.
    pub(crate) fn link(&self, kind: &str, value: &str, profile_id: &str) {
        let key = (kind.to_owned(), value.to_owned());
        self.linked_before
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .push(profile_id.to_owned());
        self.links
            .lock()
            .unwrap()
            .insert(key, profile_id.to_owned());
    }

    /// How many `LookupIdentifier` calls the double answered.
    pub(crate) fn lookups(&self) -> usize {
        self.lookups.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes matching answer the merge of `merged` into `survivor` once either is sent.
    pub(crate) fn answer_merge(&self, survivor: &str, merged: &str) {
        self.matching.lock().unwrap().merges.push(identity::Merge {
            surviving_profile_id: survivor.to_owned(),
            merged_profile_id: merged.to_owned(),
            cause_event_id: String::new(),
            merged_at: Some(to_timestamp(OffsetDateTime::now_utc())),
            rule: "probabilistic".to_owned(),
        });
    }

    /// Makes every `MatchProfiles` call fail with `code`, or (with `None`) answer again.
    pub(crate) fn fail_matching(&self, code: Option<Code>) {
        self.matching.lock().unwrap().fail_with = code;
    }

    /// The profiles of every `MatchProfiles` call so far, in call order (failed calls too).
    pub(crate) fn match_calls(&self) -> Vec<Vec<identity::ProfileTraits>> {
        self.matching.lock().unwrap().calls.clone()
    }

    /// Serves the double (and the event log's).
    pub(crate) async fn serve(&self) -> Served {
        let mut services = GrpcServices::default();
        services.add(IdentityServiceServer::new(self.clone()));
        services.add(EventLogServiceServer::new(self.clone()));
        Served::start(services).await
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityDouble {
    async fn resolve_identities(
        &self,
        _request: Request<identity::ResolveIdentitiesRequest>,
    ) -> Result<Response<identity::ResolveIdentitiesResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn get_profile_graph(
        &self,
        _request: Request<identity::GetProfileGraphRequest>,
    ) -> Result<Response<identity::GetProfileGraphResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn merge_profiles(
        &self,
        _request: Request<identity::MergeProfilesRequest>,
    ) -> Result<Response<identity::MergeProfilesResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn get_rules(
        &self,
        _request: Request<identity::GetRulesRequest>,
    ) -> Result<Response<identity::GetRulesResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn update_rules(
        &self,
        _request: Request<identity::UpdateRulesRequest>,
    ) -> Result<Response<identity::UpdateRulesResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn unmerge_profiles(
        &self,
        _request: Request<identity::UnmergeProfilesRequest>,
    ) -> Result<Response<identity::UnmergeProfilesResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn detach_identifier(
        &self,
        _request: Request<identity::DetachIdentifierRequest>,
    ) -> Result<Response<identity::DetachIdentifierResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn erase_identifier(
        &self,
        _request: Request<identity::EraseIdentifierRequest>,
    ) -> Result<Response<identity::EraseIdentifierResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    /// As the real service: forgets the component of the profile (the profiles its identifiers
    /// lead to now, and those they led to before a merge moved them), so none of its
    /// identifiers is found any more; answers the component, its identifiers forgotten (and no
    /// events: the double resolves none), and the same again when asked again. NOT_FOUND for
    /// a profile it never linked.
    async fn forget_profile(
        &self,
        request: Request<identity::ForgetProfileRequest>,
    ) -> Result<Response<identity::ForgetProfileResponse>, Status> {
        let profile_id = request.into_inner().profile_id;
        let mut forgotten = self.forgotten.lock().unwrap();
        if let Some(done) = forgotten.get(&profile_id) {
            return Ok(Response::new(done.clone()));
        }
        let mut links = self.links.lock().unwrap();
        let linked_before = self.linked_before.lock().unwrap();
        let (theirs, others): (HashMap<_, _>, HashMap<_, _>) = std::mem::take(&mut *links)
            .into_iter()
            .partition(|(_, live)| *live == profile_id);
        *links = others;
        if theirs.is_empty() {
            return Err(Status::not_found("no such profile"));
        }
        let mut profile_ids: Vec<String> = theirs
            .keys()
            .flat_map(|key| linked_before.get(key).cloned().unwrap_or_default())
            .chain([profile_id.clone()])
            .collect();
        profile_ids.sort();
        profile_ids.dedup();
        let done = identity::ForgetProfileResponse {
            profile_id,
            profile_ids: profile_ids.clone(),
            event_ids: Vec::new(),
            identifiers: theirs.len() as i64,
        };
        for id in profile_ids {
            forgotten.insert(id, done.clone());
        }
        Ok(Response::new(done))
    }

    async fn get_match_model(
        &self,
        _request: Request<identity::GetMatchModelRequest>,
    ) -> Result<Response<identity::GetMatchModelResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn restore_match_model(
        &self,
        _request: Request<identity::RestoreMatchModelRequest>,
    ) -> Result<Response<identity::RestoreMatchModelResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn match_profiles(
        &self,
        request: Request<identity::MatchProfilesRequest>,
    ) -> Result<Response<identity::MatchProfilesResponse>, Status> {
        let profiles = request.into_inner().profiles;
        let mut matching = self.matching.lock().unwrap();
        let sent: Vec<String> = profiles.iter().map(|p| p.profile_id.clone()).collect();
        matching.calls.push(profiles);
        if let Some(code) = matching.fail_with {
            return Err(Status::new(code, "matching failed in the double"));
        }
        let (answered, kept) =
            std::mem::take(&mut matching.merges)
                .into_iter()
                .partition(|m: &identity::Merge| {
                    sent.contains(&m.surviving_profile_id) || sent.contains(&m.merged_profile_id)
                });
        matching.merges = kept;
        Ok(Response::new(identity::MatchProfilesResponse {
            merges: answered,
            suggestions: 0,
            refused: 0,
        }))
    }

    async fn train_match_model(
        &self,
        _request: Request<identity::TrainMatchModelRequest>,
    ) -> Result<Response<identity::TrainMatchModelResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn run_batch_match(
        &self,
        _request: Request<identity::RunBatchMatchRequest>,
    ) -> Result<Response<identity::RunBatchMatchResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn list_match_suggestions(
        &self,
        _request: Request<identity::ListMatchSuggestionsRequest>,
    ) -> Result<Response<identity::ListMatchSuggestionsResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn decide_match_suggestion(
        &self,
        _request: Request<identity::DecideMatchSuggestionRequest>,
    ) -> Result<Response<identity::DecideMatchSuggestionResponse>, Status> {
        Err(Status::unimplemented("not part of the double"))
    }

    async fn lookup_identifier(
        &self,
        request: Request<identity::LookupIdentifierRequest>,
    ) -> Result<Response<identity::LookupIdentifierResponse>, Status> {
        let id = request
            .into_inner()
            .identifier
            .ok_or_else(|| Status::invalid_argument("identifier: required"))?;
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let links = self.links.lock().unwrap();
        match links.get(&(id.r#type, id.value)) {
            Some(profile_id) => Ok(Response::new(identity::LookupIdentifierResponse {
                profile_id: profile_id.clone(),
            })),
            None => Err(Status::not_found("no profile has this identifier")),
        }
    }
}

#[tonic::async_trait]
impl EventLogService for IdentityDouble {
    /// Forgets nothing (the double logs no events) and says it forgot every event named.
    async fn forget_events(
        &self,
        request: Request<ingestion::ForgetEventsRequest>,
    ) -> Result<Response<ingestion::ForgetEventsResponse>, Status> {
        Ok(Response::new(ingestion::ForgetEventsResponse {
            events: request.into_inner().event_ids.len() as i64,
            quarantined: 0,
        }))
    }
}
