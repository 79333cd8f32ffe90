//! The gRPC face of the identity service: decode, call [`Identity`], encode. Errors become
//! statuses through the one mapping in [`crate::error`].

use tessera_core::FieldViolation;
use tessera_proto::convert::to_timestamp;
use tessera_proto::identity::v1 as pb;
use tessera_proto::identity::v1::batch_match_service_server::BatchMatchService;
use tessera_proto::identity::v1::identity_service_server::IdentityService;
use tessera_server::trace_context;
use tonic::{Request, Response, Status};

use crate::{BatchJob, BatchJobState, BatchProgress, Identity, IdentityError, convert};

/// `IdentityService` over an [`Identity`].
pub(crate) struct IdentityGrpc {
    identity: Identity,
}

impl IdentityGrpc {
    pub(crate) fn new(identity: Identity) -> Self {
        Self { identity }
    }
}

#[tonic::async_trait]
impl IdentityService for IdentityGrpc {
    async fn resolve_identities(
        &self,
        request: Request<pb::ResolveIdentitiesRequest>,
    ) -> Result<Response<pb::ResolveIdentitiesResponse>, Status> {
        let pb::ResolveIdentitiesRequest { records } = request.into_inner();
        // Checked before normalizing, so an oversized batch costs nothing.
        let max = self.identity.max_batch();
        if records.len() > max {
            return Err(IdentityError::BatchTooLarge {
                len: records.len(),
                max,
            }
            .into());
        }
        // Each record's resolution is traced in its event's own trace (no span per record
        // without trace export).
        let _traced: Vec<_> = records
            .iter()
            .filter_map(|r| {
                trace_context::event_span(
                    &r.trace_parent,
                    &r.trace_state,
                    || tracing::info_span!("identity.resolve_event", event_id = %r.event_id),
                )
            })
            .collect();
        // One rules version for the whole request: normalizing and resolving.
        let rules = self.identity.rules();
        let records = convert::records_from_pb(&rules.rules, records)?;
        let resolutions = self.identity.resolve_under(&rules, records).await?;
        Ok(Response::new(pb::ResolveIdentitiesResponse {
            resolutions: resolutions.into_iter().map(Into::into).collect(),
        }))
    }

    async fn get_profile_graph(
        &self,
        request: Request<pb::GetProfileGraphRequest>,
    ) -> Result<Response<pb::GetProfileGraphResponse>, Status> {
        let (lookup, max) = convert::graph_request_from_pb(request.into_inner())?;
        let profile = match lookup {
            convert::GraphLookup::Profile(id) => id,
            convert::GraphLookup::Identifier(identifier) => {
                self.identity.lookup(identifier).await?
            }
        };
        let graph = self.identity.profile_graph(profile, max).await?;
        Ok(Response::new(graph.into()))
    }

    async fn get_rules(
        &self,
        _request: Request<pb::GetRulesRequest>,
    ) -> Result<Response<pb::GetRulesResponse>, Status> {
        let rules = self.identity.rules();
        Ok(Response::new(pb::GetRulesResponse {
            version: rules.version,
            rules: Some(convert::rules_to_pb(&rules.rules)),
        }))
    }

    async fn update_rules(
        &self,
        request: Request<pb::UpdateRulesRequest>,
    ) -> Result<Response<pb::UpdateRulesResponse>, Status> {
        let (config, expected) = convert::update_rules_from_pb(request.into_inner())?;
        self.identity.update_rules(config, expected).await?;
        let rules = self.identity.rules();
        Ok(Response::new(pb::UpdateRulesResponse {
            version: rules.version,
            rules: Some(convert::rules_to_pb(&rules.rules)),
        }))
    }

    async fn get_match_model(
        &self,
        request: Request<pb::GetMatchModelRequest>,
    ) -> Result<Response<pb::GetMatchModelResponse>, Status> {
        let version = convert::model_version_from_pb(request.into_inner().model_version, true)?;
        let info = self.identity.match_model(version).await?;
        let current = match version {
            None => true,
            Some(_) => {
                self.identity.match_model_version().await? == Some(info.summary.model_version)
            }
        };
        Ok(Response::new(pb::GetMatchModelResponse {
            model: Some(convert::model_to_pb(
                info,
                current,
                self.identity.match_thresholds(),
            )),
        }))
    }

    async fn restore_match_model(
        &self,
        request: Request<pb::RestoreMatchModelRequest>,
    ) -> Result<Response<pb::RestoreMatchModelResponse>, Status> {
        let version = convert::model_version_from_pb(request.into_inner().model_version, false)?
            .unwrap_or_default();
        let info = self.identity.restore_match_model(version).await?;
        Ok(Response::new(pb::RestoreMatchModelResponse {
            model: Some(convert::model_to_pb(
                info,
                true,
                self.identity.match_thresholds(),
            )),
        }))
    }

    async fn match_profiles(
        &self,
        request: Request<pb::MatchProfilesRequest>,
    ) -> Result<Response<pb::MatchProfilesResponse>, Status> {
        let profiles =
            convert::match_request_from_pb(request.into_inner(), self.identity.max_batch())?;
        let outcome = self.identity.match_profiles(profiles).await?;
        Ok(Response::new(pb::MatchProfilesResponse {
            merges: outcome.merges.into_iter().map(Into::into).collect(),
            suggestions: outcome.suggestions,
            refused: outcome.refused,
        }))
    }

    async fn train_match_model(
        &self,
        _request: Request<pb::TrainMatchModelRequest>,
    ) -> Result<Response<pb::TrainMatchModelResponse>, Status> {
        let summary = self.identity.train_match_model().await?;
        Ok(Response::new(convert::training_to_pb(summary)))
    }

    async fn run_batch_match(
        &self,
        _request: Request<pb::RunBatchMatchRequest>,
    ) -> Result<Response<pb::RunBatchMatchResponse>, Status> {
        let batch = self.identity.run_batch_match().await?;
        Ok(Response::new(pb::RunBatchMatchResponse {
            model_version: batch.model_version,
            profiles: batch.profiles,
            candidate_pairs: batch.candidate_pairs,
            merges: batch.outcome.merges.len() as i64,
            suggestions: batch.outcome.suggestions,
            refused: batch.outcome.refused,
        }))
    }

    async fn list_match_suggestions(
        &self,
        request: Request<pb::ListMatchSuggestionsRequest>,
    ) -> Result<Response<pb::ListMatchSuggestionsResponse>, Status> {
        let (status, before, limit) = convert::suggestions_request_from_pb(request.into_inner())?;
        let page = self
            .identity
            .match_suggestions(status.as_deref(), before, limit + 1)
            .await?;
        Ok(Response::new(convert::suggestions_to_pb(page, limit)))
    }

    async fn decide_match_suggestion(
        &self,
        request: Request<pb::DecideMatchSuggestionRequest>,
    ) -> Result<Response<pb::DecideMatchSuggestionResponse>, Status> {
        let pb::DecideMatchSuggestionRequest {
            suggestion_id,
            accept,
        } = request.into_inner();
        let (suggestion, merge) = self
            .identity
            .decide_match_suggestion(suggestion_id, accept)
            .await?;
        Ok(Response::new(pb::DecideMatchSuggestionResponse {
            suggestion: Some(convert::suggestion_to_pb(suggestion)),
            merge: merge.map(Into::into),
        }))
    }

    async fn merge_profiles(
        &self,
        request: Request<pb::MergeProfilesRequest>,
    ) -> Result<Response<pb::MergeProfilesResponse>, Status> {
        let (pair, reason) = convert::merge_request_from_pb(request.into_inner())?;
        let merge = self.identity.merge_profiles(pair, &reason).await?;
        Ok(Response::new(pb::MergeProfilesResponse {
            merge: merge.map(Into::into),
        }))
    }

    async fn unmerge_profiles(
        &self,
        request: Request<pb::UnmergeProfilesRequest>,
    ) -> Result<Response<pb::UnmergeProfilesResponse>, Status> {
        let (profile, reason) = convert::unmerge_request_from_pb(request.into_inner())?;
        let undone = self.identity.unmerge_profile(profile, &reason).await?;
        Ok(Response::new(pb::UnmergeProfilesResponse {
            restored_profile_id: undone.profile.map(|p| p.to_string()).unwrap_or_default(),
            surviving_profile_id: undone.survivor.map(|p| p.to_string()).unwrap_or_default(),
            events: count(undone.events.len()),
            events_moved: count(undone.events_moved()),
        }))
    }

    async fn detach_identifier(
        &self,
        request: Request<pb::DetachIdentifierRequest>,
    ) -> Result<Response<pb::DetachIdentifierResponse>, Status> {
        let pb::DetachIdentifierRequest { identifier, reason } = request.into_inner();
        let (identifier, reason) = convert::identifier_change_from_pb(identifier, reason)?;
        let done = self.identity.detach_identifier(identifier, &reason).await?;
        Ok(Response::new(pb::DetachIdentifierResponse {
            profile_id: done.profile.map(|p| p.to_string()).unwrap_or_default(),
            former_profile_id: done.root.map(|p| p.to_string()).unwrap_or_default(),
            events: count(done.events.len()),
            events_moved: count(done.events_moved()),
        }))
    }

    async fn erase_identifier(
        &self,
        request: Request<pb::EraseIdentifierRequest>,
    ) -> Result<Response<pb::EraseIdentifierResponse>, Status> {
        let pb::EraseIdentifierRequest { identifier, reason } = request.into_inner();
        let (identifier, reason) = convert::identifier_change_from_pb(identifier, reason)?;
        let done = self.identity.erase_identifier(identifier, &reason).await?;
        Ok(Response::new(pb::EraseIdentifierResponse {
            former_profile_id: done.root.map(|p| p.to_string()).unwrap_or_default(),
            events: count(done.events.len()),
            events_moved: count(done.events_moved()),
            events_erased: count(done.erased_events.len()),
        }))
    }

    async fn forget_profile(
        &self,
        request: Request<pb::ForgetProfileRequest>,
    ) -> Result<Response<pb::ForgetProfileResponse>, Status> {
        let (profile, reason) = convert::forget_request_from_pb(request.into_inner())?;
        let done = self.identity.forget_profile(profile, &reason).await?;
        Ok(Response::new(done.into()))
    }

    async fn lookup_identifier(
        &self,
        request: Request<pb::LookupIdentifierRequest>,
    ) -> Result<Response<pb::LookupIdentifierResponse>, Status> {
        let identifier = convert::lookup_from_pb(request.into_inner())?;
        let profile_id = self.identity.lookup(identifier).await?;
        Ok(Response::new(pb::LookupIdentifierResponse {
            profile_id: profile_id.to_string(),
        }))
    }
}

/// A count as a protobuf int64.
fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `BatchMatchService` over an [`Identity`]: batch match jobs.
pub(crate) struct BatchMatchGrpc {
    identity: Identity,
}

impl BatchMatchGrpc {
    pub(crate) fn new(identity: Identity) -> Self {
        Self { identity }
    }
}

/// The most jobs `ListBatchMatchJobs` answers, and how many without a limit.
const MAX_JOBS: i32 = 100;
const DEFAULT_JOBS: i32 = 20;

fn job_to_pb(job: BatchJob) -> pb::BatchMatchJob {
    let BatchJob {
        id,
        state,
        progress,
        error,
        started_at,
        updated_at,
        finished_at,
    } = job;
    let BatchProgress {
        model_version,
        profiles,
        candidate_pairs,
        pairs_done,
        merges,
        suggestions,
        refused,
    } = progress;
    let state = match state {
        BatchJobState::Running => pb::BatchMatchJobState::Running,
        BatchJobState::Succeeded => pb::BatchMatchJobState::Succeeded,
        BatchJobState::Failed => pb::BatchMatchJobState::Failed,
    };
    pb::BatchMatchJob {
        job_id: id,
        state: state.into(),
        summary: Some(pb::RunBatchMatchResponse {
            model_version,
            profiles,
            candidate_pairs,
            merges,
            suggestions,
            refused,
        }),
        pairs_done,
        error,
        started_at: Some(to_timestamp(started_at)),
        updated_at: Some(to_timestamp(updated_at)),
        finished_at: finished_at.map(to_timestamp),
    }
}

fn bad(field: &str, description: &str) -> Status {
    IdentityError::InvalidArgument(vec![FieldViolation::new(field, description)]).into()
}

#[tonic::async_trait]
impl BatchMatchService for BatchMatchGrpc {
    async fn start_batch_match(
        &self,
        _request: Request<pb::StartBatchMatchRequest>,
    ) -> Result<Response<pb::StartBatchMatchResponse>, Status> {
        let job = self.identity.start_batch_match().await?;
        Ok(Response::new(pb::StartBatchMatchResponse {
            job: Some(job_to_pb(job)),
        }))
    }

    async fn get_batch_match_job(
        &self,
        request: Request<pb::GetBatchMatchJobRequest>,
    ) -> Result<Response<pb::GetBatchMatchJobResponse>, Status> {
        let pb::GetBatchMatchJobRequest { job_id } = request.into_inner();
        if job_id < 1 {
            return Err(bad("job_id", "a batch match job id is 1 or more"));
        }
        let job = self.identity.batch_match_job(job_id).await?;
        Ok(Response::new(pb::GetBatchMatchJobResponse {
            job: Some(job_to_pb(job)),
        }))
    }

    async fn list_batch_match_jobs(
        &self,
        request: Request<pb::ListBatchMatchJobsRequest>,
    ) -> Result<Response<pb::ListBatchMatchJobsResponse>, Status> {
        let pb::ListBatchMatchJobsRequest { limit } = request.into_inner();
        let limit = match limit {
            0 => DEFAULT_JOBS,
            1..=MAX_JOBS => limit,
            _ => return Err(bad("limit", "must be 1 to 100 (0 means 20)")),
        };
        let jobs = self.identity.batch_match_jobs(i64::from(limit)).await?;
        Ok(Response::new(pb::ListBatchMatchJobsResponse {
            jobs: jobs.into_iter().map(job_to_pb).collect(),
        }))
    }
}
