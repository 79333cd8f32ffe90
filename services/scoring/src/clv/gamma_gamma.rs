//! The Gamma-Gamma model of spend per purchase (Fader, Hardie & Lee 2005, "RFM and CLV: Using
//! Iso-Value Curves for Customer Base Analysis"; Fader & Hardie, "The Gamma-Gamma Model of
//! Monetary Value", note 025): a customer's purchases are worth `Gamma(p, ν)` with
//! `ν ~ Gamma(q, v)`, independently of how often they buy.
//!
//! Fitted on the customers with repeat purchases, from `x` (their number) and `m̄` (their mean
//! value, the first purchase excluded):
//!
//! ```text
//! ln L = ln Γ(px + q) − ln Γ(px) − ln Γ(q) + q ln v + (px − 1) ln m̄ + px ln x − (px + q) ln(x m̄ + v)
//! ```

use std::collections::HashMap;

use super::fit::{self, Objective};
use super::special::{digamma, ln_gamma};
use super::{ClvError, CustomerSummary, FitDiagnostics, validate_all};

/// Gamma-Gamma parameters, all positive.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GammaGammaParams {
    /// Shape of the Gamma distribution of one purchase's value.
    #[serde(with = "crate::clv::lossy_f64")]
    pub p: f64,
    /// Shape of the Gamma distribution of the customers' rates `ν`.
    #[serde(with = "crate::clv::lossy_f64")]
    pub q: f64,
    /// Scale of the Gamma distribution of `ν`, in money.
    #[serde(with = "crate::clv::lossy_f64")]
    pub v: f64,
}

/// Fitted Gamma-Gamma parameters with the fit's diagnostics.
#[derive(Debug, Clone, PartialEq)]
pub struct GammaGammaFit {
    /// The maximum-likelihood parameters.
    pub params: GammaGammaParams,
    /// How the fit went; `customers` counts those the model was fitted on.
    pub diagnostics: FitDiagnostics,
}

/// Whether a customer informs the spend model: repeat purchases of positive mean value.
fn informative(c: &CustomerSummary) -> bool {
    c.frequency > 0 && c.monetary_value > 0.0
}

impl GammaGammaParams {
    /// The log-likelihood of one customer's mean spend; `None` for a customer without repeat
    /// purchases of positive value (the model says nothing about them).
    pub fn log_likelihood(&self, c: &CustomerSummary) -> Option<f64> {
        if !informative(c) {
            return None;
        }
        let Self { p, q, v } = *self;
        let (x, m) = (f64::from(c.frequency), c.monetary_value);
        Some(
            ln_gamma(p * x + q) - ln_gamma(p * x) - ln_gamma(q)
                + q * v.ln()
                + (p * x - 1.0) * m.ln()
                + p * x * x.ln()
                - (p * x + q) * (x * m + v).ln(),
        )
    }

    /// The population's mean spend per purchase, `p v / (q − 1)`; `None` when `q ≤ 1` (no
    /// finite mean).
    pub fn population_mean_spend(&self) -> Option<f64> {
        (self.q > 1.0).then(|| self.p * self.v / (self.q - 1.0))
    }

    /// `E[M | x, m̄]`: the expected value of the customer's future purchases (note 025, eq. 5), a
    /// weighted mean of the population's mean and the customer's own, the more their own the more
    /// they bought: weight `px / (px + q − 1)`. The population's mean without repeat purchases.
    pub fn expected_average_spend(&self, c: &CustomerSummary) -> Option<f64> {
        let population = self.population_mean_spend()?;
        if c.frequency == 0 {
            return Some(population);
        }
        let px = self.p * f64::from(c.frequency);
        let weight = px / (px + self.q - 1.0);
        Some((1.0 - weight) * population + weight * c.monetary_value)
    }

    /// Fits the parameters by maximum likelihood over the customers with repeat purchases of
    /// positive mean value (the others are skipped: they say nothing about spend; the
    /// diagnostics count only those used).
    ///
    /// Money is scaled so that the mean spend is 1 while fitting, and `v` scaled back after; the
    /// diagnostics' log-likelihood is on the caller's own money unit.
    pub fn fit(customers: &[CustomerSummary]) -> Result<GammaGammaFit, ClvError> {
        validate_all(customers)?;
        let used: Vec<CustomerSummary> = customers
            .iter()
            .filter(|c| informative(c))
            .copied()
            .collect();
        if used.is_empty() {
            return Err(ClvError::NoCustomers);
        }
        let mean = used.iter().map(|c| c.monetary_value).sum::<f64>() / used.len() as f64;
        let scale = 1.0 / mean;
        let data = Spenders::new(&used, scale);
        let minimum = fit::minimize(&data, vec![0.0; 3])?;
        let [p, q, v] = [0, 1, 2].map(|i| minimum.theta[i].exp());
        let params = Self { p, q, v: v / scale };
        let log_likelihood = used.iter().filter_map(|c| params.log_likelihood(c)).sum();
        Ok(GammaGammaFit {
            params,
            diagnostics: FitDiagnostics::new(&minimum, log_likelihood, used.len()),
        })
    }
}

/// The spenders, prepared for repeated likelihood evaluations: the gamma-function terms once per
/// distinct frequency, the sums of `ln m̄` that do not depend on the parameters once for all;
/// only `ln(x m̄ + v)` is left per customer.
struct Spenders {
    /// Distinct frequencies `x`, with their count `n`, `Σ ln m̄` and `ln x`.
    frequencies: Vec<FrequencyClass>,
    /// Per customer: the index of its frequency, and `x m̄`.
    customers: Vec<(usize, f64)>,
}

struct FrequencyClass {
    x: f64,
    ln_x: f64,
    n: f64,
    sum_ln_m: f64,
}

impl Spenders {
    fn new(customers: &[CustomerSummary], money_scale: f64) -> Self {
        let mut index: HashMap<u32, usize> = HashMap::new();
        let mut frequencies: Vec<FrequencyClass> = Vec::new();
        let mut rows = Vec::with_capacity(customers.len());
        for c in customers {
            let x = f64::from(c.frequency);
            let m = c.monetary_value * money_scale;
            let k = *index.entry(c.frequency).or_insert_with(|| {
                frequencies.push(FrequencyClass {
                    x,
                    ln_x: x.ln(),
                    n: 0.0,
                    sum_ln_m: 0.0,
                });
                frequencies.len() - 1
            });
            frequencies[k].n += 1.0;
            frequencies[k].sum_ln_m += m.ln();
            rows.push((k, x * m));
        }
        Self {
            frequencies,
            customers: rows,
        }
    }
}

impl Objective for Spenders {
    /// The mean negative log-likelihood and its gradient in `θ = (ln p, ln q, ln v)`.
    fn evaluate(&self, theta: &[f64]) -> (f64, Vec<f64>) {
        let [p, q, v] = [0, 1, 2].map(|i| theta[i].exp());
        let (ln_v, lg_q, dg_q) = (v.ln(), ln_gamma(q), digamma(q));
        let (mut ll, mut d_p, mut d_q, mut d_v) = (0.0, 0.0, 0.0, 0.0);
        let mut n_total = 0.0;
        for f in &self.frequencies {
            let px = p * f.x;
            let (lg, dg_pxq, dg_px) = (
                ln_gamma(px + q) - ln_gamma(px),
                digamma(px + q),
                digamma(px),
            );
            ll += f.n * (lg - lg_q + q * ln_v + px * f.ln_x) + (px - 1.0) * f.sum_ln_m;
            d_p += f.x * (f.n * (dg_pxq - dg_px + f.ln_x) + f.sum_ln_m);
            d_q += f.n * (dg_pxq - dg_q + ln_v);
            d_v += f.n * q / v;
            n_total += f.n;
        }
        for &(k, xm) in &self.customers {
            let x = self.frequencies[k].x;
            let ln_xmv = (xm + v).ln();
            let pxq = p * x + q;
            ll -= pxq * ln_xmv;
            d_p -= x * ln_xmv;
            d_q -= ln_xmv;
            d_v -= pxq / (xm + v);
        }
        let grad = vec![-p * d_p / n_total, -q * d_q / n_total, -v * d_v / n_total];
        (-ll / n_total, grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spender(frequency: u32, monetary_value: f64) -> CustomerSummary {
        CustomerSummary {
            frequency,
            recency: if frequency > 0 { 10.0 } else { 0.0 },
            age: 20.0,
            monetary_value,
        }
    }

    const NOTE_025: GammaGammaParams = GammaGammaParams {
        p: 6.25,
        q: 3.74,
        v: 15.44,
    };

    #[test]
    fn expected_spend_shrinks_towards_the_population_mean() {
        let population = NOTE_025.population_mean_spend().unwrap();
        assert!((population - 6.25 * 15.44 / 2.74).abs() < 1e-12);
        assert_eq!(
            NOTE_025.expected_average_spend(&spender(0, 0.0)),
            Some(population)
        );
        let one = NOTE_025.expected_average_spend(&spender(1, 100.0)).unwrap();
        let ten = NOTE_025
            .expected_average_spend(&spender(10, 100.0))
            .unwrap();
        assert!(population < one && one < ten && ten < 100.0, "{one} {ten}");
        let no_mean = GammaGammaParams { q: 0.9, ..NOTE_025 };
        assert_eq!(no_mean.expected_average_spend(&spender(3, 10.0)), None);
        assert_eq!(NOTE_025.log_likelihood(&spender(0, 0.0)), None);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let customers = [
            spender(1, 12.5),
            spender(2, 30.0),
            spender(2, 18.25),
            spender(5, 41.0),
            spender(1, 9.99),
        ];
        let data = Spenders::new(&customers, 1.0 / 20.0);
        let theta = [1.2, 0.9, -0.4];
        let (cost, grad) = data.evaluate(&theta);
        // Against the plain per-customer likelihood, on the scaled money unit.
        let [p, q, v] = theta.map(f64::exp);
        let scaled: Vec<_> = customers
            .iter()
            .map(|c| spender(c.frequency, c.monetary_value / 20.0))
            .collect();
        let params = GammaGammaParams { p, q, v };
        let direct: f64 = scaled
            .iter()
            .map(|c| params.log_likelihood(c).unwrap())
            .sum();
        assert!(
            (cost + direct / 5.0).abs() < 1e-12,
            "{cost} vs {}",
            -direct / 5.0
        );
        let h = 1e-6;
        for i in 0..3 {
            let (mut up, mut down) = (theta, theta);
            up[i] += h;
            down[i] -= h;
            let numeric = (data.evaluate(&up).0 - data.evaluate(&down).0) / (2.0 * h);
            assert!(
                (numeric - grad[i]).abs() < 1e-7,
                "θ{i}: {numeric} vs {}",
                grad[i]
            );
        }
    }

    #[test]
    fn customers_without_repeat_spend_are_skipped() {
        let customers = [spender(0, 0.0), spender(3, 0.0)];
        assert!(matches!(
            GammaGammaParams::fit(&customers),
            Err(ClvError::NoCustomers)
        ));
    }
}
