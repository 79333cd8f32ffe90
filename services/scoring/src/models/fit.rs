//! One fit: the population's purchase histories summarized at the fit's time, both models
//! fitted by maximum likelihood, the RFM boundaries computed, and the verdict (good, or why
//! not). The population comes from a [`PopulationSource`]: the profile service in production.

use std::fmt::Debug;

use async_trait::async_trait;
use tessera_proto::convert::to_timestamp;
use tessera_proto::profile::v1 as profile;
use tessera_proto::profile::v1::profile_pipeline_service_client::ProfilePipelineServiceClient;
use tessera_server::trace_context::{Propagate, TracedChannel};
use time::OffsetDateTime;
use tonic::transport::Channel;

use super::ModelBody;
use crate::clv::{
    BgNbdParams, ClvError, CustomerSummary, CustomerValueSettings, FitDiagnostics,
    GammaGammaParams, live,
};
use crate::domain::PurchaseHistory;
use crate::error::ScoringError;
use crate::rfm::{RfmBoundaries, RfmInputs};

const SECONDS_PER_DAY: i64 = 86_400;
/// Profiles per message of the profile service's stream.
const PAGE_SIZE: i32 = 1_000;

/// Where the population's purchase histories come from.
#[async_trait]
pub trait PopulationSource: Send + Sync + Debug {
    /// The purchase history of every live profile that bought something on or before
    /// `as_of`'s UTC day, counting only those purchases.
    async fn purchase_histories(
        &self,
        as_of: OffsetDateTime,
    ) -> Result<Vec<PurchaseHistory>, ScoringError>;
}

/// The population as the profile service streams it
/// (`ProfilePipelineService.StreamPurchaseHistories`).
#[derive(Debug, Clone)]
pub struct ProfilePopulation {
    client: ProfilePipelineServiceClient<TracedChannel>,
}

impl ProfilePopulation {
    /// A source reading the profile service at `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            client: ProfilePipelineServiceClient::with_interceptor(channel, Propagate)
                .max_decoding_message_size(64 * 1024 * 1024),
        }
    }
}

#[async_trait]
impl PopulationSource for ProfilePopulation {
    async fn purchase_histories(
        &self,
        as_of: OffsetDateTime,
    ) -> Result<Vec<PurchaseHistory>, ScoringError> {
        let mut stream = self
            .client
            .clone()
            .stream_purchase_histories(profile::StreamPurchaseHistoriesRequest {
                as_of: Some(to_timestamp(as_of)),
                after_profile_id: String::new(),
                page_size: PAGE_SIZE,
            })
            .await
            .map_err(ScoringError::Profile)?
            .into_inner();
        let mut histories = Vec::new();
        let mut skipped = 0usize;
        while let Some(page) = stream.message().await.map_err(ScoringError::Profile)? {
            for entry in page.profiles {
                let profile::ProfilePurchaseHistory {
                    profile_id,
                    purchases,
                } = entry;
                match purchases.map(crate::convert::purchase_history) {
                    Some(Ok(history)) => histories.push(history),
                    Some(Err(problem)) => {
                        skipped += 1;
                        tracing::warn!(profile_id, problem, "unusable purchase history skipped");
                    }
                    None => skipped += 1,
                }
            }
        }
        if skipped > 0 {
            tracing::warn!(skipped, "profiles without a usable purchase history");
        }
        Ok(histories)
    }
}

/// What a fit of a population found.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    /// Parameters, diagnostics and boundaries.
    pub body: ModelBody,
    /// The customers fitted on.
    pub population: usize,
    /// Why the models are unusable; `None` when they are good.
    pub rejection: Option<String>,
}

/// Fits both models and the RFM boundaries on `histories` at `as_of` (times in units of
/// `unit_days` days). Purchases are counted up to `as_of`'s day; a history whose first purchase
/// is later is left out. CPU-bound: call it off the async runtime.
pub fn fit_population(
    histories: &[PurchaseHistory],
    as_of: OffsetDateTime,
    unit_days: f64,
) -> Fitted {
    let today = as_of.unix_timestamp().div_euclid(SECONDS_PER_DAY);
    let histories: Vec<&PurchaseHistory> =
        histories.iter().filter(|p| p.first_day <= today).collect();
    let summaries: Vec<CustomerSummary> = histories
        .iter()
        .map(|p| live::summarize(p, as_of, unit_days))
        .collect();
    let inputs: Vec<RfmInputs> = histories.iter().map(|p| RfmInputs::of(p, as_of)).collect();
    let mut problems = Vec::new();
    let mut body = ModelBody {
        rfm: RfmBoundaries::of_population(&inputs),
        ..ModelBody::default()
    };
    match BgNbdParams::fit(&summaries) {
        Ok(fit) => {
            judge("BG/NBD", &fit.diagnostics, &mut problems);
            body.bg_nbd = Some(fit.params);
            body.bg_nbd_diagnostics = Some(fit.diagnostics);
        }
        Err(e) => problems.push(format!("BG/NBD: {}", describe(&e))),
    }
    match GammaGammaParams::fit(&summaries) {
        Ok(fit) => {
            judge("Gamma-Gamma", &fit.diagnostics, &mut problems);
            if fit.params.q <= 1.0 {
                problems.push(
                    "Gamma-Gamma: q ≤ 1, so the expected spend per purchase is not finite"
                        .to_owned(),
                );
            }
            body.gamma_gamma = Some(fit.params);
            body.gamma_gamma_diagnostics = Some(fit.diagnostics);
        }
        Err(e) => problems.push(format!("Gamma-Gamma: {}", describe(&e))),
    }
    if let (Some(bg), Some(gg)) = (body.bg_nbd, body.gamma_gamma) {
        // The same checks as configured parameters: finite and positive.
        let settings = CustomerValueSettings::from_params(bg, gg, unit_days, "check");
        if let Err(problem) = settings.compile() {
            problems.push(format!("unusable parameters: {problem}"));
        }
    }
    if body.rfm.as_ref().is_some_and(|b| !b.is_valid()) {
        body.rfm = None;
    }
    Fitted {
        body,
        population: histories.len(),
        rejection: (!problems.is_empty()).then(|| problems.join("; ")),
    }
}

fn judge(model: &str, d: &FitDiagnostics, problems: &mut Vec<String>) {
    if !d.converged {
        problems.push(format!(
            "{model} did not converge ({}, gradient norm {:e})",
            d.stop_reason, d.gradient_norm
        ));
    }
    if !d.log_likelihood.is_finite() {
        problems.push(format!("{model}: the log-likelihood is not finite"));
    }
}

fn describe(e: &ClvError) -> String {
    match e {
        ClvError::NoCustomers => "no customers to fit on (none with repeat purchases of positive \
                                  value, for Gamma-Gamma)"
            .to_owned(),
        ClvError::InvalidSummary { .. } | ClvError::Optimizer(_) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn one_time_buyers_only_are_rejected_with_reasons() {
        let as_of = datetime!(2026-01-01 00:00 UTC);
        let today = as_of.unix_timestamp() / SECONDS_PER_DAY;
        let histories: Vec<PurchaseHistory> = (0..50)
            .map(|i| PurchaseHistory {
                first_day: today - 10 - i,
                last_day: today - 10 - i,
                days: 1,
                repeat_revenue: 0.0,
                revenue: 20.0,
            })
            .collect();
        let fitted = fit_population(&histories, as_of, 7.0);
        assert_eq!(fitted.population, 50);
        let reason = fitted.rejection.expect("rejected");
        assert!(reason.contains("Gamma-Gamma: no customers"), "{reason}");
        assert!(fitted.body.rfm.is_some());
    }

    #[test]
    fn later_first_purchases_are_left_out() {
        let as_of = datetime!(2026-01-01 00:00 UTC);
        let today = as_of.unix_timestamp() / SECONDS_PER_DAY;
        let later = PurchaseHistory {
            first_day: today + 1,
            last_day: today + 1,
            days: 1,
            repeat_revenue: 0.0,
            revenue: 1.0,
        };
        let fitted = fit_population(&[later], as_of, 7.0);
        assert_eq!(fitted.population, 0);
        assert!(fitted.rejection.is_some());
        assert_eq!(fitted.body.rfm, None);
    }
}
