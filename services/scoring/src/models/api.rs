//! The customer-value model RPCs: requests validated into domain values, stored models
//! converted to `tessera.scoring.v1.CustomerValueModel`.

use tessera_core::FieldViolation;
use tessera_proto::convert::{from_timestamp, to_timestamp};
use tessera_proto::scoring::v1 as pb;
use time::OffsetDateTime;

use super::{Models, StoredModel, Trigger};
use crate::clv::{BgNbdParams, FitDiagnostics, GammaGammaParams};
use crate::error::ScoringError;
use crate::rfm::RfmBoundaries;

/// Models per page when the request does not say.
const DEFAULT_PAGE: usize = 20;
/// The most models per page.
const MAX_PAGE: usize = 100;

fn invalid(field: &str, description: &str) -> ScoringError {
    ScoringError::InvalidArgument(vec![FieldViolation::new(field, description)])
}

impl Models {
    /// `FitCustomerValueModel`.
    pub(crate) async fn fit_api(
        &self,
        request: pb::FitCustomerValueModelRequest,
    ) -> Result<pb::FitCustomerValueModelResponse, ScoringError> {
        let pb::FitCustomerValueModelRequest { as_of } = request;
        let now = OffsetDateTime::now_utc();
        let as_of = match as_of.as_ref().map(from_timestamp) {
            None => now,
            Some(None) => return Err(invalid("as_of", "timestamp out of range")),
            Some(Some(t)) if t > now + time::Duration::days(1) => {
                return Err(invalid("as_of", "must not be in the future"));
            }
            Some(Some(t)) => t,
        };
        let model = self.fit(as_of, Trigger::Api).await?;
        let active = self.active_version().await?;
        Ok(pb::FitCustomerValueModelResponse {
            model: Some(to_pb(&model, active)),
        })
    }

    /// `ListCustomerValueModels`.
    pub(crate) async fn list_api(
        &self,
        request: pb::ListCustomerValueModelsRequest,
    ) -> Result<pb::ListCustomerValueModelsResponse, ScoringError> {
        let pb::ListCustomerValueModelsRequest {
            page_size,
            before_version,
        } = request;
        let mut violations = Vec::new();
        let limit = match usize::try_from(page_size) {
            Ok(0) => DEFAULT_PAGE,
            Ok(n) if n <= MAX_PAGE => n,
            Ok(_) | Err(_) => {
                violations.push(FieldViolation::new(
                    "page_size",
                    format!("must be 0 (the default, {DEFAULT_PAGE}) to {MAX_PAGE}"),
                ));
                DEFAULT_PAGE
            }
        };
        if before_version < 0 {
            violations.push(FieldViolation::new(
                "before_version",
                "must be 0 (from the newest) or a version",
            ));
        }
        if !violations.is_empty() {
            return Err(ScoringError::InvalidArgument(violations));
        }
        let models = self
            .list((before_version > 0).then_some(before_version), limit)
            .await?;
        let active = self.active_version().await?;
        let next_before_version = if models.len() == limit {
            models.last().map_or(0, |m| m.version)
        } else {
            0
        };
        Ok(pb::ListCustomerValueModelsResponse {
            models: models.iter().map(|m| to_pb(m, active)).collect(),
            next_before_version,
            active_version: active.unwrap_or(0),
        })
    }

    /// `GetCustomerValueModel`.
    pub(crate) async fn get_api(
        &self,
        request: pb::GetCustomerValueModelRequest,
    ) -> Result<pb::GetCustomerValueModelResponse, ScoringError> {
        let pb::GetCustomerValueModelRequest { version } = request;
        if version < 0 {
            return Err(invalid(
                "version",
                "must be 0 (the active model) or a version",
            ));
        }
        let active = self.active_version().await?;
        let version = match (version, active) {
            (0, Some(active)) => active,
            (0, None) => return Err(ScoringError::NoActiveModel),
            (version, _) => version,
        };
        let model = self.get(version).await?;
        Ok(pb::GetCustomerValueModelResponse {
            model: Some(to_pb(&model, active)),
        })
    }

    /// `ActivateCustomerValueModel`.
    pub(crate) async fn activate_api(
        &self,
        request: pb::ActivateCustomerValueModelRequest,
    ) -> Result<pb::ActivateCustomerValueModelResponse, ScoringError> {
        let pb::ActivateCustomerValueModelRequest { version } = request;
        if version < 1 {
            return Err(invalid("version", "must be a model version (at least 1)"));
        }
        let model = self.activate(version).await?;
        let active = self.active_version().await?;
        Ok(pb::ActivateCustomerValueModelResponse {
            model: Some(to_pb(&model, active)),
        })
    }
}

/// A stored model as the API shows it; `active` is the active model's version.
pub(crate) fn to_pb(stored: &StoredModel, active: Option<i64>) -> pb::CustomerValueModel {
    let StoredModel { version, model } = stored;
    let status = match (&model.rejection, active == Some(*version)) {
        (Some(_), _) => pb::CustomerValueModelStatus::Rejected,
        (None, true) => pb::CustomerValueModelStatus::Active,
        (None, false) => pb::CustomerValueModelStatus::Inactive,
    };
    let body = &model.body;
    pb::CustomerValueModel {
        version: *version,
        label: stored.label(),
        status: status as i32,
        rejection_reason: model.rejection.clone().unwrap_or_default(),
        fitted_at: Some(to_timestamp(model.fitted_at)),
        as_of: Some(to_timestamp(model.as_of)),
        trigger: model.trigger.as_str().to_owned(),
        population: model.population,
        unit_days: model.unit_days,
        bg_nbd: body.bg_nbd.map(|p| {
            let BgNbdParams { r, alpha, a, b } = p;
            pb::BgNbdParameters { r, alpha, a, b }
        }),
        gamma_gamma: body.gamma_gamma.map(|p| {
            let GammaGammaParams { p, q, v } = p;
            pb::GammaGammaParameters { p, q, v }
        }),
        bg_nbd_diagnostics: body.bg_nbd_diagnostics.as_ref().map(diagnostics),
        gamma_gamma_diagnostics: body.gamma_gamma_diagnostics.as_ref().map(diagnostics),
        rfm: body.rfm.as_ref().map(|b| {
            let RfmBoundaries {
                recency_days,
                frequency,
                monetary,
            } = b;
            pb::RfmBoundaries {
                recency_days: recency_days.to_vec(),
                frequency: frequency.to_vec(),
                monetary: monetary.to_vec(),
            }
        }),
    }
}

fn diagnostics(d: &FitDiagnostics) -> pb::FitDiagnostics {
    let FitDiagnostics {
        log_likelihood,
        mean_log_likelihood,
        iterations,
        converged,
        stop_reason,
        gradient_norm,
        customers,
    } = d;
    pb::FitDiagnostics {
        log_likelihood: *log_likelihood,
        mean_log_likelihood: *mean_log_likelihood,
        iterations: i64::try_from(*iterations).unwrap_or(i64::MAX),
        converged: *converged,
        stop_reason: stop_reason.clone(),
        gradient_norm: *gradient_norm,
        customers: i64::try_from(*customers).unwrap_or(i64::MAX),
    }
}
