//! The gRPC face of the scoring service.

use tessera_proto::scoring::v1 as pb;
use tessera_proto::scoring::v1::scoring_service_server::ScoringService;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use crate::convert::ScoreRequest;
use crate::domain;

/// `ScoringService`: validates, scores, answers. Holds no state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScoringApi;

#[tonic::async_trait]
impl ScoringService for ScoringApi {
    async fn score_profiles(
        &self,
        request: Request<pb::ScoreProfilesRequest>,
    ) -> Result<Response<pb::ScoreProfilesResponse>, Status> {
        let ScoreRequest { profiles, as_of } = ScoreRequest::try_from(request.into_inner())?;
        let as_of = as_of.unwrap_or_else(OffsetDateTime::now_utc);
        let profiles = profiles
            .iter()
            .map(|facts| pb::ProfileScores {
                profile_id: facts.profile_id.clone(),
                scores: domain::score_profile(facts, as_of)
                    .into_iter()
                    .map(pb::Score::from)
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ScoreProfilesResponse { profiles }))
    }
}
