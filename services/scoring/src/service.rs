//! The gRPC face of the scoring service.

use std::sync::Arc;

use tessera_proto::scoring::v1 as pb;
use tessera_proto::scoring::v1::scoring_service_server::ScoringService;
use tessera_server::trace_context;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use crate::convert::{ScoreOneRequest, ScoreRequest};
use crate::domain;
use crate::plan_book::PlanBook;

/// `ScoringService`: validates, scores, answers. Holds the plans from config and the
/// customer-value models (their RPCs are in `models::api`).
#[derive(Debug, Clone)]
pub(crate) struct ScoringApi {
    pub(crate) plans: Arc<PlanBook>,
    pub(crate) models: Arc<crate::models::Models>,
}

#[tonic::async_trait]
impl ScoringService for ScoringApi {
    async fn score_profiles(
        &self,
        request: Request<pb::ScoreProfilesRequest>,
    ) -> Result<Response<pb::ScoreProfilesResponse>, Status> {
        let request = request.into_inner();
        // A profile scored for a traced event is traced in that event's trace (no span per
        // profile without trace export).
        let _traced: Vec<_> = request
            .profiles
            .iter()
            .filter_map(|p| {
                trace_context::event_span(
                    &p.trace_parent,
                    &p.trace_state,
                    || tracing::info_span!("scoring.score_profile", profile_id = %p.profile_id),
                )
            })
            .collect();
        let ScoreRequest { profiles, as_of } = ScoreRequest::try_from(request)?;
        let as_of = as_of.unwrap_or_else(OffsetDateTime::now_utc);
        let models = self.models.current();
        let plans = self.plans.current();
        let profiles = profiles
            .iter()
            .map(|facts| pb::ProfileScores {
                profile_id: facts.profile_id.clone(),
                scores: domain::score_profile(facts, as_of, &plans, &models)
                    .into_iter()
                    .map(pb::Score::from)
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ScoreProfilesResponse { profiles }))
    }

    async fn score_profile(
        &self,
        request: Request<pb::ScoreProfileRequest>,
    ) -> Result<Response<pb::ScoreProfileResponse>, Status> {
        let ScoreOneRequest { profile, as_of } = ScoreOneRequest::try_from(request.into_inner())?;
        let as_of = as_of.unwrap_or_else(OffsetDateTime::now_utc);
        let mut scores = vec![domain::engagement(&profile, as_of)];
        if let Some(purchases) = &profile.purchases {
            scores.extend(self.models.current().scores(purchases, as_of));
        }
        let plans = self.plans.current().evaluate(&profile, as_of, &mut scores);
        Ok(Response::new(pb::ScoreProfileResponse {
            scores: Some(pb::ProfileScores {
                profile_id: profile.profile_id,
                scores: scores.into_iter().map(pb::Score::from).collect(),
            }),
            plans: plans.into_iter().map(pb::PlanEvaluation::from).collect(),
        }))
    }

    async fn list_plans(
        &self,
        _request: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        Ok(Response::new(pb::ListPlansResponse {
            plans: self.plans.current().iter().map(pb::Plan::from).collect(),
        }))
    }

    async fn fit_customer_value_model(
        &self,
        request: Request<pb::FitCustomerValueModelRequest>,
    ) -> Result<Response<pb::FitCustomerValueModelResponse>, Status> {
        Ok(Response::new(
            self.models.fit_api(request.into_inner()).await?,
        ))
    }

    async fn list_customer_value_models(
        &self,
        request: Request<pb::ListCustomerValueModelsRequest>,
    ) -> Result<Response<pb::ListCustomerValueModelsResponse>, Status> {
        Ok(Response::new(
            self.models.list_api(request.into_inner()).await?,
        ))
    }

    async fn get_customer_value_model(
        &self,
        request: Request<pb::GetCustomerValueModelRequest>,
    ) -> Result<Response<pb::GetCustomerValueModelResponse>, Status> {
        Ok(Response::new(
            self.models.get_api(request.into_inner()).await?,
        ))
    }

    async fn activate_customer_value_model(
        &self,
        request: Request<pb::ActivateCustomerValueModelRequest>,
    ) -> Result<Response<pb::ActivateCustomerValueModelResponse>, Status> {
        Ok(Response::new(
            self.models.activate_api(request.into_inner()).await?,
        ))
    }
}
