//! The gRPC face of the scoring service.

use std::sync::Arc;

use tessera_core::FieldViolation;
use tessera_proto::scoring::v1 as pb;
use tessera_proto::scoring::v1::scoring_service_server::ScoringService;
use tessera_server::trace_context;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use crate::account;
use crate::convert::{
    ScoreAccountsRequest, ScoreOneRequest, ScoreRequest, plan_from_json, plan_to_pb,
};
use crate::domain;
use crate::error::ScoringError;
use crate::plan_book::PlanBook;

/// A missing request field.
fn required(field: &str) -> ScoringError {
    ScoringError::InvalidArgument(vec![FieldViolation::new(field, "required")])
}

/// `ScoringService`: validates, scores, answers. Holds the plans (config's and the stored), the
/// customer-value models (their RPCs are in `models::api`) and the buying committee accounts'
/// coverage is counted against.
#[derive(Debug, Clone)]
pub(crate) struct ScoringApi {
    pub(crate) plans: Arc<PlanBook>,
    pub(crate) models: Arc<crate::models::Models>,
    pub(crate) committee: Arc<account::BuyingCommittee>,
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

    async fn score_accounts(
        &self,
        request: Request<pb::ScoreAccountsRequest>,
    ) -> Result<Response<pb::ScoreAccountsResponse>, Status> {
        let ScoreAccountsRequest { accounts, as_of } =
            ScoreAccountsRequest::try_from(request.into_inner())?;
        let as_of = as_of.unwrap_or_else(OffsetDateTime::now_utc);
        let plans = self.plans.current();
        let accounts = accounts
            .iter()
            .map(|account| {
                let (scores, evaluations) =
                    account::score_account(account, as_of, &plans, &self.committee);
                pb::AccountScores {
                    account_id: account.account_id.clone(),
                    scores: scores.into_iter().map(pb::Score::from).collect(),
                    plans: evaluations
                        .into_iter()
                        .map(pb::PlanEvaluation::from)
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(pb::ScoreAccountsResponse { accounts }))
    }

    async fn list_plans(
        &self,
        _request: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        let loaded = self.plans.loaded();
        Ok(Response::new(pb::ListPlansResponse {
            plans: loaded
                .plans
                .iter()
                .map(|p| plan_to_pb(p, loaded.stored_version(&p.plan().name)))
                .collect(),
            revision: loaded.revision.unwrap_or(0),
        }))
    }

    async fn get_plan(
        &self,
        request: Request<pb::GetPlanRequest>,
    ) -> Result<Response<pb::GetPlanResponse>, Status> {
        let pb::GetPlanRequest { name } = request.into_inner();
        if name.is_empty() {
            return Err(required("name").into());
        }
        let (plan, version) = self.plans.get(&name).await?;
        Ok(Response::new(pb::GetPlanResponse {
            plan: Some(plan_to_pb(&plan, version)),
        }))
    }

    async fn create_plan(
        &self,
        request: Request<pb::CreatePlanRequest>,
    ) -> Result<Response<pb::CreatePlanResponse>, Status> {
        let pb::CreatePlanRequest { plan_json } = request.into_inner();
        let plan = plan_from_json(&plan_json, "plan_json")?;
        let (revision, plan) = self.plans.create(plan, "plan_json").await?;
        Ok(Response::new(pb::CreatePlanResponse {
            plan: Some(plan_to_pb(&plan, Some(1))),
            revision,
        }))
    }

    async fn update_plan(
        &self,
        request: Request<pb::UpdatePlanRequest>,
    ) -> Result<Response<pb::UpdatePlanResponse>, Status> {
        let pb::UpdatePlanRequest {
            plan_json,
            expected_version,
        } = request.into_inner();
        if expected_version < 1 {
            return Err(ScoringError::InvalidArgument(vec![FieldViolation::new(
                "expected_version",
                "required: the stored version the change was made from (at least 1)",
            )])
            .into());
        }
        let plan = plan_from_json(&plan_json, "plan_json")?;
        let (revision, plan) = self
            .plans
            .update(plan, expected_version, "plan_json")
            .await?;
        Ok(Response::new(pb::UpdatePlanResponse {
            plan: Some(plan_to_pb(&plan, Some(expected_version + 1))),
            revision,
        }))
    }

    async fn delete_plan(
        &self,
        request: Request<pb::DeletePlanRequest>,
    ) -> Result<Response<pb::DeletePlanResponse>, Status> {
        let pb::DeletePlanRequest {
            name,
            expected_version,
        } = request.into_inner();
        if name.is_empty() {
            return Err(required("name").into());
        }
        if expected_version < 0 {
            return Err(ScoringError::InvalidArgument(vec![FieldViolation::new(
                "expected_version",
                "must be 0 (any version) or a stored version",
            )])
            .into());
        }
        let revision = self.plans.delete(&name, expected_version, "name").await?;
        Ok(Response::new(pb::DeletePlanResponse { revision }))
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
