//! Fitted, versioned customer-value models: the population's purchase histories (read from the
//! profile service) fitted by maximum likelihood (BG/NBD, Gamma-Gamma) with the RFM quintile
//! boundaries, stored with their diagnostics ([`store`]), activated when good, and used by every
//! replica within seconds of their activation ([`Models`]).

mod active;
mod api;
mod fit;
pub mod store;

pub use active::{Models, ScheduleOutcome};
pub use fit::{PopulationSource, ProfilePopulation, fit_population};

use time::OffsetDateTime;

use crate::clv::{BgNbdParams, FitDiagnostics, GammaGammaParams};
use crate::rfm::RfmBoundaries;

/// The fitting of customer-value models (`[scoring.fitting]`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FittingSettings {
    /// Hours between scheduled fits (one replica fits; the others find the schedule taken);
    /// 0 turns the schedule off. Fractions are allowed.
    pub fit_interval_hours: f64,
    /// The fewest profiles with purchases a fit accepts; fewer fail the fit with
    /// FAILED_PRECONDITION (a scheduled fit then tries again within the hour).
    pub min_population: u64,
    /// How often every replica reads which model is active, in milliseconds.
    pub poll_interval_ms: u64,
}

impl Default for FittingSettings {
    fn default() -> Self {
        Self {
            fit_interval_hours: 24.0,
            min_population: 100,
            poll_interval_ms: 2_000,
        }
    }
}

impl FittingSettings {
    /// What is wrong with the settings, naming the setting.
    pub fn problem(&self) -> Option<String> {
        let hours = self.fit_interval_hours;
        if !(hours.is_finite() && (0.0..=87_600.0).contains(&hours)) {
            return Some(format!(
                "fitting.fit_interval_hours must be 0 (off) to 87600, not {hours}"
            ));
        }
        if self.min_population < 2 {
            return Some("fitting.min_population must be at least 2".to_owned());
        }
        if !(100..=600_000).contains(&self.poll_interval_ms) {
            return Some("fitting.poll_interval_ms must be 100 to 600000".to_owned());
        }
        None
    }

    /// The time between scheduled fits; `None` when they are off.
    pub fn interval(&self) -> Option<std::time::Duration> {
        (self.fit_interval_hours > 0.0)
            .then(|| std::time::Duration::from_secs_f64(self.fit_interval_hours * 3_600.0))
    }
}

/// Who asked for a fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `FitCustomerValueModel`.
    Api,
    /// The schedule (`fitting.fit_interval_hours`).
    Schedule,
}

impl Trigger {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Schedule => "schedule",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "api" => Some(Self::Api),
            "schedule" => Some(Self::Schedule),
            _ => None,
        }
    }
}

/// What a fit found: parameters and diagnostics of both models (absent when a fit failed
/// before any estimate) and the RFM boundaries. Stored as JSON.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelBody {
    /// The purchase model.
    pub bg_nbd: Option<BgNbdParams>,
    /// The spend model.
    pub gamma_gamma: Option<GammaGammaParams>,
    /// How the BG/NBD fit went.
    pub bg_nbd_diagnostics: Option<FitDiagnostics>,
    /// How the Gamma-Gamma fit went.
    pub gamma_gamma_diagnostics: Option<FitDiagnostics>,
    /// The population's RFM quintile boundaries.
    pub rfm: Option<RfmBoundaries>,
}

/// A fit to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewModel {
    /// When the fit ran.
    pub fitted_at: OffsetDateTime,
    /// The end of the observation period.
    pub as_of: OffsetDateTime,
    /// Who asked for it.
    pub trigger: Trigger,
    /// The profiles with purchases it was fitted on.
    pub population: i64,
    /// Days per model time unit.
    pub unit_days: f64,
    /// Why the fit is unusable; `None` for a good fit.
    pub rejection: Option<String>,
    /// Parameters, diagnostics, boundaries.
    pub body: ModelBody,
}

/// A stored fit.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredModel {
    /// The version, increasing with every fit.
    pub version: i64,
    /// The fit.
    pub model: NewModel,
}

impl StoredModel {
    /// The label scores carry: `m<version>`.
    pub fn label(&self) -> String {
        label(self.version)
    }
}

/// The label of model `version` in scores' `model_version`.
pub fn label(version: i64) -> String {
    format!("m{version}")
}
