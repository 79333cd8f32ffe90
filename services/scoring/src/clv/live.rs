//! The customer-value models scoring live profiles: parameters fitted on the population's
//! purchase history (for example with the `fit_cdnow` example or any BG/NBD fitter), declared
//! in `[scoring.customer_value]`, applied to each profile's purchases on every write that
//! rescores it: `churn_risk` (1 − P(alive), as 0–100, with its band) and `predicted_value` (the
//! discounted lifetime value over the horizon, in the purchases' currency).

use time::OffsetDateTime;

use super::{
    BgNbdParams, CUSTOMER_VALUE_MODEL_VERSION, CustomerSummary, CustomerValueModel,
    GammaGammaParams, Horizon,
};
use crate::domain::{Factor, PurchaseHistory, Score};

/// The name of the churn-risk score.
pub const CHURN_RISK: &str = "churn_risk";
/// The name of the predicted-value score.
pub const PREDICTED_VALUE: &str = "predicted_value";

const SECONDS_PER_DAY: i64 = 86_400;

/// Fitted parameters and horizons (`[scoring.customer_value]`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerValueSettings {
    /// The parameters' version (for example the date of the fit), carried by every score.
    pub version: String,
    /// BG/NBD `r`.
    pub r: f64,
    /// BG/NBD `α`, in units of `unit_days`.
    pub alpha: f64,
    /// BG/NBD `a`.
    pub a: f64,
    /// BG/NBD `b`.
    pub b: f64,
    /// Gamma-Gamma `p`.
    pub p: f64,
    /// Gamma-Gamma `q`.
    pub q: f64,
    /// Gamma-Gamma `v`, in money.
    pub v: f64,
    /// Days per model time unit (7: weeks, as in the paper).
    #[serde(default = "seven")]
    pub unit_days: f64,
    /// The horizon of the expected purchases, in model units.
    #[serde(default = "fifty_two")]
    pub horizon: f64,
    /// The months of the lifetime value.
    #[serde(default = "twelve")]
    pub months: u32,
    /// The monthly discount rate of the lifetime value.
    #[serde(default = "one_percent")]
    pub monthly_discount_rate: f64,
}

fn seven() -> f64 {
    7.0
}
fn fifty_two() -> f64 {
    52.0
}
fn twelve() -> u32 {
    12
}
fn one_percent() -> f64 {
    0.01
}

/// A usable customer-value model.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerValue {
    model: CustomerValueModel,
    horizon: Horizon,
    unit_days: f64,
    version: String,
}

impl CustomerValueSettings {
    /// The model, or what is wrong with the settings.
    pub fn compile(&self) -> Result<CustomerValue, String> {
        let positive = [
            ("r", self.r),
            ("alpha", self.alpha),
            ("a", self.a),
            ("b", self.b),
            ("p", self.p),
            ("q", self.q),
            ("v", self.v),
            ("unit_days", self.unit_days),
            ("horizon", self.horizon),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, x)| !(x.is_finite() && *x > 0.0)) {
            return Err(format!("customer_value.{name} must be a positive number"));
        }
        if !(self.monthly_discount_rate.is_finite() && self.monthly_discount_rate >= 0.0) {
            return Err("customer_value.monthly_discount_rate must be 0 or more".to_owned());
        }
        if self.version.is_empty() {
            return Err("customer_value.version is required".to_owned());
        }
        Ok(CustomerValue {
            model: CustomerValueModel {
                bg_nbd: BgNbdParams {
                    r: self.r,
                    alpha: self.alpha,
                    a: self.a,
                    b: self.b,
                },
                gamma_gamma: GammaGammaParams {
                    p: self.p,
                    q: self.q,
                    v: self.v,
                },
            },
            horizon: Horizon {
                purchases: self.horizon,
                months: self.months,
                periods_per_month: if (self.unit_days - 7.0).abs() < f64::EPSILON {
                    super::WEEKS_PER_MONTH
                } else {
                    super::DAYS_PER_MONTH / self.unit_days
                },
                monthly_discount_rate: self.monthly_discount_rate,
            },
            unit_days: self.unit_days,
            version: self.version.clone(),
        })
    }
}

impl CustomerValueSettings {
    /// Fitted parameters (times in units of `unit_days` days) with the default horizons: 52
    /// weeks of purchases, 12 months of value discounted 1 % a month.
    pub fn from_params(
        bg_nbd: BgNbdParams,
        gamma_gamma: GammaGammaParams,
        unit_days: f64,
        version: impl Into<String>,
    ) -> Self {
        Self {
            version: String::new(),
            r: 1.0,
            alpha: 1.0,
            a: 1.0,
            b: 1.0,
            p: 1.0,
            q: 2.0,
            v: 1.0,
            unit_days: seven(),
            horizon: fifty_two(),
            months: twelve(),
            monthly_discount_rate: one_percent(),
        }
        .with_params(bg_nbd, gamma_gamma, unit_days, version)
    }

    /// These settings' horizons with other parameters (a stored fit's), whose times are in
    /// units of `unit_days` days: the purchase horizon is converted to that unit.
    pub fn with_params(
        &self,
        bg_nbd: BgNbdParams,
        gamma_gamma: GammaGammaParams,
        unit_days: f64,
        version: impl Into<String>,
    ) -> Self {
        let BgNbdParams { r, alpha, a, b } = bg_nbd;
        let GammaGammaParams { p, q, v } = gamma_gamma;
        Self {
            version: version.into(),
            r,
            alpha,
            a,
            b,
            p,
            q,
            v,
            unit_days,
            horizon: self.horizon * self.unit_days / unit_days,
            months: self.months,
            monthly_discount_rate: self.monthly_discount_rate,
        }
    }
}

/// A person's history as the models read it at `as_of`, in units of `unit_days` days: repeat
/// purchase days, the time from the first purchase day to the latest and to `as_of`'s day
/// (at least the latest), and the mean revenue of the repeat purchase days.
pub fn summarize(p: &PurchaseHistory, as_of: OffsetDateTime, unit_days: f64) -> CustomerSummary {
    let today = as_of
        .unix_timestamp()
        .div_euclid(SECONDS_PER_DAY)
        .max(p.last_day);
    let frequency = u32::try_from((p.days - 1).max(0)).unwrap_or(u32::MAX);
    #[allow(clippy::cast_precision_loss)]
    let units = |days: i64| days as f64 / unit_days;
    CustomerSummary {
        frequency,
        recency: if frequency == 0 {
            0.0
        } else {
            units(p.last_day - p.first_day)
        },
        age: units(today - p.first_day),
        monetary_value: if frequency == 0 {
            0.0
        } else {
            p.repeat_revenue / f64::from(frequency)
        },
    }
}

impl CustomerValue {
    /// A person's history as the models read it at `as_of` (see [`summarize`]).
    pub fn summary(&self, p: &PurchaseHistory, as_of: OffsetDateTime) -> CustomerSummary {
        summarize(p, as_of, self.unit_days)
    }

    /// `churn_risk` and `predicted_value` of a person with purchases `p` at `as_of`.
    pub fn scores(&self, p: &PurchaseHistory, as_of: OffsetDateTime) -> Vec<Score> {
        let summary = self.summary(p, as_of);
        let prediction = self.model.predict(&summary, &self.horizon);
        let version = format!("{CUSTOMER_VALUE_MODEL_VERSION}@{}", self.version);
        let finite = |x: f64| if x.is_finite() { x } else { 0.0 };
        let mut factors = prediction.factors();
        factors.push(Factor {
            name: "probability_alive".to_owned(),
            value: finite(prediction.probability_alive),
            description: "probability the customer is still active (BG/NBD)".to_owned(),
        });
        factors.push(Factor {
            name: "expected_purchases".to_owned(),
            value: finite(prediction.expected_purchases),
            description: format!(
                "expected purchases over the next {} units of {} days",
                self.horizon.purchases, self.unit_days
            ),
        });
        let mut churn_factors = factors.clone();
        churn_factors.push(Factor {
            name: "band".to_owned(),
            value: finite(prediction.churn_risk),
            description: format!("churn risk band: {}", prediction.churn_band.as_str()),
        });
        vec![
            Score {
                name: CHURN_RISK.to_owned(),
                value: finite(100.0 * prediction.churn_risk).clamp(0.0, 100.0),
                computed_at: as_of,
                model_version: version.clone(),
                factors: churn_factors,
            },
            Score {
                name: PREDICTED_VALUE.to_owned(),
                value: finite(prediction.lifetime_value.unwrap_or(0.0)).max(0.0),
                computed_at: as_of,
                model_version: version,
                factors,
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    /// The paper's fit on CDNOW (weeks), Gamma-Gamma from Fader & Hardie's note.
    fn paper() -> CustomerValue {
        CustomerValueSettings {
            version: "cdnow-1997".into(),
            r: 0.243,
            alpha: 4.414,
            a: 0.793,
            b: 2.426,
            p: 6.25,
            q: 3.74,
            v: 15.44,
            unit_days: 7.0,
            horizon: 39.0,
            months: 12,
            monthly_discount_rate: 0.01,
        }
        .compile()
        .unwrap()
    }

    #[test]
    fn a_profiles_purchases_give_the_papers_prediction_and_a_churn_risk() {
        // 2 repeat purchases, the last at week 30.43, observed for 38.86 weeks (days since a
        // first purchase on day 10,000): 1.226 purchases expected in the next 39 weeks.
        let first = 10_000;
        let history = PurchaseHistory {
            first_day: first,
            last_day: first + 213,
            days: 3,
            repeat_revenue: 80.0,
            revenue: 100.0,
        };
        let as_of = OffsetDateTime::from_unix_timestamp((first + 272) * SECONDS_PER_DAY).unwrap();
        let model = paper();
        let summary = model.summary(&history, as_of);
        assert_eq!(summary.frequency, 2);
        assert!((summary.recency - 30.43).abs() < 0.01);
        assert!((summary.age - 38.86).abs() < 0.01);
        assert_eq!(summary.monetary_value, 40.0);
        let scores = model.scores(&history, as_of);
        let expected = scores[1]
            .factor("expected_purchases")
            .map(|f| f.value)
            .unwrap();
        assert_eq!(format!("{expected:.3}"), "1.226");
        assert_eq!(scores[0].name, CHURN_RISK);
        assert!(scores[0].value > 0.0 && scores[0].value < 100.0);
        let alive = scores[0].factor("probability_alive").unwrap().value;
        assert!((scores[0].value - 100.0 * (1.0 - alive)).abs() < 1e-9);
        assert_eq!(scores[1].name, PREDICTED_VALUE);
        assert!(scores[1].value > 0.0, "{:?}", scores[1]);
        assert_eq!(scores[1].model_version, "bg-nbd-gamma-gamma-v1@cdnow-1997");

        // Silent for two more years: the churn risk rises, the predicted value falls.
        let later = as_of + time::Duration::days(730);
        let later_scores = model.scores(&history, later);
        assert!(later_scores[0].value > scores[0].value);
        assert!(later_scores[1].value < scores[1].value);
    }

    #[test]
    fn one_purchase_day_and_bad_settings() {
        let model = paper();
        let history = PurchaseHistory {
            first_day: 20_000,
            last_day: 20_000,
            days: 1,
            repeat_revenue: 0.0,
            revenue: 10.0,
        };
        let summary = model.summary(&history, datetime!(2026-05-01 00:00 UTC));
        assert_eq!((summary.frequency, summary.recency), (0, 0.0));
        assert!(
            model
                .scores(&history, datetime!(2026-05-01 00:00 UTC))
                .iter()
                .all(|s| s.value.is_finite())
        );
        let mut bad = CustomerValueSettings {
            version: "x".into(),
            r: -1.0,
            alpha: 1.0,
            a: 1.0,
            b: 1.0,
            p: 1.0,
            q: 2.0,
            v: 1.0,
            unit_days: 7.0,
            horizon: 1.0,
            months: 1,
            monthly_discount_rate: 0.0,
        };
        assert!(bad.compile().unwrap_err().contains("customer_value.r"));
        bad.r = 1.0;
        bad.version.clear();
        assert!(bad.compile().is_err());
    }
}
