//! Predicted customer value: the BG/NBD model of repeat purchases (Fader, Hardie & Lee 2005,
//! "Counting Your Customers the Easy Way") and the Gamma-Gamma model of spend per purchase
//! (Fader, Hardie & Lee 2005, "RFM and CLV"; Fader & Hardie, note 025), fitted by maximum
//! likelihood over a population, and the predictions they give for one customer.
//!
//! Pure math: no I/O, no gRPC. The input is one [`CustomerSummary`] per customer, which
//! [`summary::summarize`] builds from purchases. Times are in one unit of the caller's choice
//! (weeks in the paper); the fitted `α` is in that unit, and so are horizons.

pub mod bg_nbd;
mod fit;
pub mod gamma_gamma;
pub mod live;
pub mod special;
pub mod summary;

pub use bg_nbd::{BgNbdFit, BgNbdParams};
pub use gamma_gamma::{GammaGammaFit, GammaGammaParams};
pub use live::{CustomerValue, CustomerValueSettings};

use crate::domain::Factor;

/// The version of the customer-value formulas; changes whenever a formula does (fitted parameters
/// are versioned separately, with the model that holds them).
pub const CUSTOMER_VALUE_MODEL_VERSION: &str = "bg-nbd-gamma-gamma-v1";

/// Weeks per month in the discounting of [`customer_lifetime_value`], as in the `lifetimes`
/// package (`4.345`, so twelve months are 52.14 weeks).
pub const WEEKS_PER_MONTH: f64 = 4.345;
/// Days per month in the discounting of [`customer_lifetime_value`], as in `lifetimes` (30).
pub const DAYS_PER_MONTH: f64 = 30.0;

/// One customer's purchase history, the input of both models.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CustomerSummary {
    /// `x`: the number of repeat purchases (purchase days after the first).
    pub frequency: u32,
    /// `t_x`: the time from the first purchase to the last; 0 without repeat purchases.
    pub recency: f64,
    /// `T`: the time from the first purchase to the end of the observation period.
    pub age: f64,
    /// The mean value of the repeat purchases (the first excluded); 0 without any.
    pub monetary_value: f64,
}

impl CustomerSummary {
    /// Whether the summary can come from a purchase history: finite, `0 ≤ t_x ≤ T`, `t_x = 0`
    /// without repeat purchases, and a finite non-negative spend. Says what is wrong otherwise.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !(self.recency.is_finite() && self.age.is_finite()) {
            return Err("recency and age must be finite");
        }
        if self.recency < 0.0 || self.age < 0.0 {
            return Err("recency and age must not be negative");
        }
        if self.recency > self.age {
            return Err("recency must not exceed age");
        }
        if self.frequency == 0 && self.recency != 0.0 {
            return Err("recency must be 0 without repeat purchases");
        }
        if !(self.monetary_value.is_finite() && self.monetary_value >= 0.0) {
            return Err("monetary value must be finite and not negative");
        }
        Ok(())
    }
}

/// Why a model could not be fitted.
#[derive(Debug, thiserror::Error)]
pub enum ClvError {
    /// No customer to fit the model on.
    #[error("no customers to fit the model on")]
    NoCustomers,
    /// A customer's summary is impossible.
    #[error("customer {index}: {reason}")]
    InvalidSummary {
        /// The position of the customer in the input.
        index: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The optimizer failed (for example a likelihood that is not finite).
    #[error("optimizer failed: {0}")]
    Optimizer(String),
}

/// How a maximum-likelihood fit went.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FitDiagnostics {
    /// The log-likelihood of the fitted parameters, summed over the customers.
    #[serde(with = "crate::clv::lossy_f64")]
    pub log_likelihood: f64,
    /// The same per customer: what the optimizer minimized (negated).
    #[serde(with = "crate::clv::lossy_f64")]
    pub mean_log_likelihood: f64,
    /// L-BFGS iterations.
    pub iterations: u64,
    /// Whether the optimizer met its tolerance: the gradient of the mean log-likelihood (or its
    /// change in one iteration) is negligible, rather than the iteration budget spent.
    pub converged: bool,
    /// Why the optimizer stopped, in its words.
    pub stop_reason: String,
    /// The norm of the mean log-likelihood's gradient (in log-parameters) at the estimate.
    #[serde(with = "crate::clv::lossy_f64")]
    pub gradient_norm: f64,
    /// The customers the model was fitted on.
    pub customers: usize,
}

/// Fitted BG/NBD and Gamma-Gamma parameters: everything needed to predict one customer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CustomerValueModel {
    /// The purchase model.
    pub bg_nbd: BgNbdParams,
    /// The spend model.
    pub gamma_gamma: GammaGammaParams,
}

/// What the predictions look ahead over, in the model's time unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Horizon {
    /// The horizon of the expected number of purchases.
    pub purchases: f64,
    /// The months of the lifetime value.
    pub months: u32,
    /// Model time units per month (for example [`WEEKS_PER_MONTH`]).
    pub periods_per_month: f64,
    /// The monthly discount rate of the lifetime value (0.01 is 1 % a month).
    pub monthly_discount_rate: f64,
}

/// One customer's predicted value, with the inputs it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValuePrediction {
    /// The customer's history the prediction is based on.
    pub inputs: CustomerSummary,
    /// The expected number of purchases over [`Horizon::purchases`].
    pub expected_purchases: f64,
    /// The probability that the customer is still active.
    pub probability_alive: f64,
    /// `1 − probability_alive`.
    pub churn_risk: f64,
    /// The band of `churn_risk`.
    pub churn_band: ChurnBand,
    /// The expected spend per purchase; `None` when the spend model has no finite mean (`q ≤ 1`).
    pub expected_average_spend: Option<f64>,
    /// The discounted value over [`Horizon::months`]; `None` without an expected spend.
    pub lifetime_value: Option<f64>,
}

/// Bands of churn risk, for people and audiences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChurnBand {
    /// Churn risk below 0.3.
    Low,
    /// Churn risk from 0.3 to below 0.7.
    Medium,
    /// Churn risk of 0.7 or more.
    High,
}

impl ChurnBand {
    /// The band of a churn risk in [0, 1].
    pub fn of(churn_risk: f64) -> Self {
        if churn_risk < 0.3 {
            Self::Low
        } else if churn_risk < 0.7 {
            Self::Medium
        } else {
            Self::High
        }
    }

    /// The band's name, as shown to people.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }
}

impl CustomerValueModel {
    /// Every prediction of one customer.
    pub fn predict(&self, customer: &CustomerSummary, horizon: &Horizon) -> ValuePrediction {
        let probability_alive = self.bg_nbd.probability_alive(customer);
        let churn_risk = 1.0 - probability_alive;
        let expected_average_spend = self.gamma_gamma.expected_average_spend(customer);
        ValuePrediction {
            inputs: *customer,
            expected_purchases: self.bg_nbd.expected_purchases(customer, horizon.purchases),
            probability_alive,
            churn_risk,
            churn_band: ChurnBand::of(churn_risk),
            expected_average_spend,
            lifetime_value: expected_average_spend
                .map(|spend| discounted_value(&self.bg_nbd, customer, spend, horizon)),
        }
    }
}

impl ValuePrediction {
    /// The inputs behind the prediction, as score factors (all finite).
    pub fn factors(&self) -> Vec<Factor> {
        let mut factors = vec![
            Factor {
                name: "frequency".to_owned(),
                value: f64::from(self.inputs.frequency),
                description: "repeat purchases: purchase days after the first".to_owned(),
            },
            Factor {
                name: "recency".to_owned(),
                value: self.inputs.recency,
                description: "time from the first purchase to the latest".to_owned(),
            },
            Factor {
                name: "age".to_owned(),
                value: self.inputs.age,
                description: "time from the first purchase to the prediction".to_owned(),
            },
            Factor {
                name: "average_spend".to_owned(),
                value: self.inputs.monetary_value,
                description: "mean value of the repeat purchases".to_owned(),
            },
        ];
        if let Some(spend) = self.expected_average_spend {
            factors.push(Factor {
                name: "expected_average_spend".to_owned(),
                value: spend,
                description: "expected value of one future purchase (Gamma-Gamma)".to_owned(),
            });
        }
        factors
    }
}

/// The customer lifetime value over `horizon.months`, as the `lifetimes` package computes it
/// (`GammaGammaFitter.customer_lifetime_value` with a BG/NBD model): month by month, the expected
/// purchases of that month times the expected spend per purchase, discounted by
/// `(1 + monthly_discount_rate)^month`. `None` when the spend model has no finite mean.
pub fn customer_lifetime_value(
    model: &CustomerValueModel,
    customer: &CustomerSummary,
    horizon: &Horizon,
) -> Option<f64> {
    let spend = model.gamma_gamma.expected_average_spend(customer)?;
    Some(discounted_value(&model.bg_nbd, customer, spend, horizon))
}

fn discounted_value(
    bg_nbd: &BgNbdParams,
    customer: &CustomerSummary,
    spend: f64,
    horizon: &Horizon,
) -> f64 {
    let mut value = 0.0;
    let mut purchases_before = 0.0;
    for month in 1..=horizon.months {
        let purchases =
            bg_nbd.expected_purchases(customer, f64::from(month) * horizon.periods_per_month);
        let discount = (1.0 + horizon.monthly_discount_rate).powi(month as i32);
        value += spend * (purchases - purchases_before) / discount;
        purchases_before = purchases;
    }
    value
}

/// Serde for numbers that may not be finite (a rejected fit's): written as `null`, which JSON
/// has instead of NaN and infinities, and read back as NaN.
pub(crate) mod lossy_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::trivially_copy_pass_by_ref)]
    pub(crate) fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else {
            s.serialize_none()
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Checks every summary, naming the first impossible one.
fn validate_all(customers: &[CustomerSummary]) -> Result<(), ClvError> {
    if customers.is_empty() {
        return Err(ClvError::NoCustomers);
    }
    for (index, customer) in customers.iter().enumerate() {
        customer
            .validate()
            .map_err(|reason| ClvError::InvalidSummary { index, reason })?;
    }
    Ok(())
}

/// `ln(1 + e^(−|d|))` and the logistic weight `1 / (1 + e^(−d))`, without overflow.
fn log1p_exp_neg_abs_and_sigmoid(d: f64) -> (f64, f64) {
    let e = (-d.abs()).exp();
    let sigmoid = if d >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    };
    (e.ln_1p(), sigmoid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CDNOW sample's parameters as `lifetimes` 0.11.3 fits them, at full precision.
    const CDNOW: CustomerValueModel = CustomerValueModel {
        bg_nbd: BgNbdParams {
            r: 0.242_594_7,
            alpha: 4.413_603,
            a: 0.792_922_1,
            b: 2.425_906,
        },
        gamma_gamma: GammaGammaParams {
            p: 6.249_572,
            q: 3.744_225,
            v: 15.443_521,
        },
    };

    const YEAR: Horizon = Horizon {
        purchases: 39.0,
        months: 12,
        periods_per_month: WEEKS_PER_MONTH,
        monthly_discount_rate: 0.01,
    };

    fn assert_rel(actual: f64, expected: f64) {
        let err = ((actual - expected) / expected).abs();
        assert!(
            err < 1e-10,
            "{actual} vs {expected}: relative error {err:e}"
        );
    }

    /// Every prediction against `lifetimes` 0.11.3 with the same parameters:
    /// `conditional_expected_number_of_purchases_up_to_time(39, …)`,
    /// `conditional_probability_alive`, `conditional_expected_average_profit` and
    /// `customer_lifetime_value(bgf, …, time=12, discount_rate=0.01, freq="W")`.
    #[test]
    fn predictions_match_lifetimes() {
        // (x, t_x, T, m̄, E[Y(39)], P(alive), E[M], CLV)
        let expected = [
            (
                0,
                0.0,
                38.86,
                0.0,
                0.19478216554075617,
                1.0,
                35.17036555785768,
                8.343999114838274,
            ),
            (
                2,
                30.43,
                38.86,
                22.35,
                1.225906730737371,
                0.7266090916592773,
                24.658017845202856,
                36.277481769797284,
            ),
            (
                5,
                37.0,
                38.86,
                40.0,
                3.29529951183195,
                0.8655348789627586,
                39.61009736304825,
                155.51712094620564,
            ),
            (
                40,
                76.0,
                78.0,
                35.0,
                15.538598723595932,
                0.9510743609136412,
                35.00184990613892,
                655.790769458471,
            ),
        ];
        for (frequency, recency, age, monetary_value, purchases, alive, spend, clv) in expected {
            let c = CustomerSummary {
                frequency,
                recency,
                age,
                monetary_value,
            };
            let p = CDNOW.predict(&c, &YEAR);
            assert_rel(p.expected_purchases, purchases);
            assert_rel(p.probability_alive, alive);
            assert_rel(p.churn_risk + p.probability_alive, 1.0);
            assert_rel(p.expected_average_spend.unwrap(), spend);
            assert_rel(p.lifetime_value.unwrap(), clv);
            assert_rel(customer_lifetime_value(&CDNOW, &c, &YEAR).unwrap(), clv);
            assert!(
                p.factors()
                    .iter()
                    .all(|f| f.value.is_finite() && !f.description.is_empty())
            );
        }
    }

    #[test]
    fn churn_bands() {
        assert_eq!(ChurnBand::of(0.0), ChurnBand::Low);
        assert_eq!(ChurnBand::of(0.3), ChurnBand::Medium);
        assert_eq!(ChurnBand::of(0.7).as_str(), "high");
    }

    #[test]
    fn impossible_summaries_say_why() {
        let ok = CustomerSummary {
            frequency: 1,
            recency: 2.0,
            age: 3.0,
            monetary_value: 4.0,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            CustomerSummary { recency: 4.0, ..ok },
            CustomerSummary { frequency: 0, ..ok },
            CustomerSummary {
                age: f64::NAN,
                ..ok
            },
            CustomerSummary {
                monetary_value: -1.0,
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
