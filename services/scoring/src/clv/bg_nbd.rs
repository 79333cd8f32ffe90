//! The BG/NBD model (Fader, Hardie & Lee 2005, "Counting Your Customers the Easy Way"): while
//! active, a customer buys at a Poisson rate `λ ~ Gamma(r, α)`; after each purchase they become
//! inactive with probability `p ~ Beta(a, b)`.
//!
//! Log-likelihood per customer (section 7 of the paper, in log space):
//!
//! ```text
//! ln L = ln Γ(r + x) − ln Γ(r) + r ln α
//!      + ln Γ(a + b) + ln Γ(b + x) − ln Γ(b) − ln Γ(a + b + x)
//!      + ln( e^A₃ + [x > 0] e^A₄ )
//! A₃ = −(r + x) ln(α + T)
//! A₄ = ln a − ln(b + x − 1) − (r + x) ln(α + t_x)
//! ```

use std::collections::HashMap;

use super::fit::{self, Objective};
use super::special::{digamma, ln_abs_hyp2f1, ln_gamma};
use super::{
    ClvError, CustomerSummary, FitDiagnostics, log1p_exp_neg_abs_and_sigmoid, validate_all,
};

/// BG/NBD parameters, all positive.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BgNbdParams {
    /// Shape of the Gamma distribution of purchase rates.
    #[serde(with = "crate::clv::lossy_f64")]
    pub r: f64,
    /// Scale of the Gamma distribution of purchase rates, in the model's time unit.
    #[serde(with = "crate::clv::lossy_f64")]
    pub alpha: f64,
    /// First shape of the Beta distribution of drop-out probabilities.
    #[serde(with = "crate::clv::lossy_f64")]
    pub a: f64,
    /// Second shape of the Beta distribution of drop-out probabilities.
    #[serde(with = "crate::clv::lossy_f64")]
    pub b: f64,
}

/// Fitted BG/NBD parameters with the fit's diagnostics.
#[derive(Debug, Clone, PartialEq)]
pub struct BgNbdFit {
    /// The maximum-likelihood parameters.
    pub params: BgNbdParams,
    /// How the fit went.
    pub diagnostics: FitDiagnostics,
}

impl BgNbdParams {
    /// The log-likelihood of one customer's history.
    pub fn log_likelihood(&self, c: &CustomerSummary) -> f64 {
        let Self { r, alpha, a, b } = *self;
        let x = f64::from(c.frequency);
        let common =
            ln_gamma(r + x) - ln_gamma(r) + r * alpha.ln() + ln_gamma(a + b) + ln_gamma(b + x)
                - ln_gamma(b)
                - ln_gamma(a + b + x);
        let a3 = -(r + x) * (alpha + c.age).ln();
        if c.frequency == 0 {
            return common + a3;
        }
        let a4 = a.ln() - (b + x - 1.0).ln() - (r + x) * (alpha + c.recency).ln();
        let (log1p, _) = log1p_exp_neg_abs_and_sigmoid(a3 - a4);
        common + a3.max(a4) + log1p
    }

    /// The log-likelihood of a population, summed.
    pub fn total_log_likelihood(&self, customers: &[CustomerSummary]) -> f64 {
        customers.iter().map(|c| self.log_likelihood(c)).sum()
    }

    /// `P(alive | x, t_x, T)`: the probability that the customer is still active at the end of
    /// the observation (Fader, Hardie & Lee 2005, eq. 11; 1 without repeat purchases).
    pub fn probability_alive(&self, c: &CustomerSummary) -> f64 {
        if c.frequency == 0 {
            return 1.0;
        }
        let x = f64::from(c.frequency);
        // 1 / (1 + e^d), d = ln(a / (b + x − 1)) + (r + x) ln((α + T) / (α + t_x)).
        let d = (self.a / (self.b + x - 1.0)).ln()
            + (self.r + x) * ((self.alpha + c.age) / (self.alpha + c.recency)).ln();
        let (_, sigmoid) = log1p_exp_neg_abs_and_sigmoid(-d);
        sigmoid
    }

    /// `E[Y(t) | x, t_x, T]`: the expected number of purchases in the next `t` time units
    /// (Fader, Hardie & Lee 2005, eq. 10).
    ///
    /// ```text
    ///        (a + b + x − 1)/(a − 1) · [1 − ((α+T)/(α+T+t))^(r+x) ₂F₁(r+x, b+x; a+b+x−1; t/(α+T+t))]
    /// E  =  ─────────────────────────────────────────────────────────────────────────────────────
    ///                       1 + [x > 0] a/(b + x − 1) · ((α+T)/(α+t_x))^(r+x)
    /// ```
    ///
    /// The bracket is `−expm1(ln ₂F₁ + (r + x) ln(1 − z))`, so short horizons keep their
    /// precision. Not defined at `a = 1` exactly (a removable singularity of the formula).
    pub fn expected_purchases(&self, c: &CustomerSummary, t: f64) -> f64 {
        if t <= 0.0 {
            return 0.0;
        }
        let Self { r, alpha, a, b } = *self;
        let x = f64::from(c.frequency);
        let z = t / (alpha + c.age + t);
        let ln_one_minus_z = (-z).ln_1p();
        // ₂F₁ is positive unless a + b + x − 1 < 0 (a + b < 1 and no repeat purchase).
        let (ln_hyp, sign) = ln_abs_hyp2f1(r + x, b + x, a + b + x - 1.0, z);
        let ln_product = ln_hyp + (r + x) * ln_one_minus_z;
        let bracket = if sign > 0.0 {
            -ln_product.exp_m1()
        } else {
            1.0 - sign * ln_product.exp()
        };
        let numerator = (a + b + x - 1.0) / (a - 1.0) * bracket;
        let denominator = if c.frequency == 0 {
            1.0
        } else {
            1.0 + a / (b + x - 1.0) * ((r + x) * ((alpha + c.age) / (alpha + c.recency)).ln()).exp()
        };
        numerator / denominator
    }

    /// Fits the parameters by maximum likelihood over `customers`.
    ///
    /// Times are scaled so that the oldest customer's age is 1 while fitting (as `lifetimes`
    /// does), which puts every log-parameter near 0 at the start; `α` is scaled back after. The
    /// diagnostics' log-likelihood is on the caller's own time unit.
    pub fn fit(customers: &[CustomerSummary]) -> Result<BgNbdFit, ClvError> {
        validate_all(customers)?;
        let max_age = customers.iter().map(|c| c.age).fold(0.0, f64::max);
        let scale = if max_age > 0.0 { 1.0 / max_age } else { 1.0 };
        let data = Population::new(customers, scale);
        let minimum = fit::minimize(&data, vec![0.0; 4])?;
        let [r, alpha, a, b] = [0, 1, 2, 3].map(|i| minimum.theta[i].exp());
        let params = Self {
            r,
            alpha: alpha / scale,
            a,
            b,
        };
        let log_likelihood = params.total_log_likelihood(customers);
        Ok(BgNbdFit {
            params,
            diagnostics: FitDiagnostics::new(&minimum, log_likelihood, customers.len()),
        })
    }
}

/// The customers, compressed for repeated likelihood evaluations: every term that depends only
/// on the frequency is computed once per distinct frequency, every logarithm of `α + T` or
/// `α + t_x` once per distinct age or recency, and customers with the same history are one
/// weighted group. Purchase histories on a daily clock repeat a lot (CDNOW's 23,570 customers
/// have about 80 distinct ages), so one evaluation costs far less than one pass of `ln_gamma`
/// per customer.
struct Population {
    /// Distinct frequencies, and how many customers have each.
    frequencies: Vec<(f64, f64)>,
    ages: Vec<f64>,
    recencies: Vec<f64>,
    groups: Vec<Group>,
    customers: f64,
}

struct Group {
    frequency: usize,
    age: usize,
    recency: usize,
    weight: f64,
}

/// The index of `value` in `values`, added when new.
fn intern(index: &mut HashMap<u64, usize>, values: &mut Vec<f64>, value: f64) -> usize {
    *index.entry(value.to_bits()).or_insert_with(|| {
        values.push(value);
        values.len() - 1
    })
}

impl Population {
    fn new(customers: &[CustomerSummary], time_scale: f64) -> Self {
        let (mut distinct_x, mut ages, mut recencies) = (Vec::new(), Vec::new(), Vec::new());
        let (mut f_index, mut a_index, mut r_index) =
            (HashMap::new(), HashMap::new(), HashMap::new());
        let mut group_index: HashMap<(usize, usize, usize), usize> = HashMap::new();
        let mut groups: Vec<Group> = Vec::new();
        for c in customers {
            let frequency = intern(&mut f_index, &mut distinct_x, f64::from(c.frequency));
            let age = intern(&mut a_index, &mut ages, c.age * time_scale);
            let recency = intern(&mut r_index, &mut recencies, c.recency * time_scale);
            let next = groups.len();
            let g = *group_index.entry((frequency, age, recency)).or_insert(next);
            if g == next {
                groups.push(Group {
                    frequency,
                    age,
                    recency,
                    weight: 0.0,
                });
            }
            groups[g].weight += 1.0;
        }
        let mut frequencies: Vec<(f64, f64)> = distinct_x.iter().map(|&x| (x, 0.0)).collect();
        for g in &groups {
            frequencies[g.frequency].1 += g.weight;
        }
        Self {
            frequencies,
            ages,
            recencies,
            groups,
            customers: customers.len() as f64,
        }
    }
}

impl Objective for Population {
    /// The mean negative log-likelihood and its gradient in `θ = (ln r, ln α, ln a, ln b)`.
    fn evaluate(&self, theta: &[f64]) -> (f64, Vec<f64>) {
        let [r, alpha, a, b] = [0, 1, 2, 3].map(|i| theta[i].exp());
        let ln_alpha = alpha.ln();
        let ln_a = a.ln();
        let (lg_r, lg_b, lg_ab) = (ln_gamma(r), ln_gamma(b), ln_gamma(a + b));
        let (dg_r, dg_b, dg_ab) = (digamma(r), digamma(b), digamma(a + b));

        // Per distinct frequency: its likelihood terms (without A₃/A₄) and their derivatives.
        let mut ll = 0.0;
        let (mut d_r, mut d_alpha, mut d_a, mut d_b) = (0.0, 0.0, 0.0, 0.0);
        let mut per_x: Vec<(f64, f64)> = Vec::with_capacity(self.frequencies.len());
        for &(x, n) in &self.frequencies {
            let (lg_rx, lg_bx, lg_abx) = (ln_gamma(r + x), ln_gamma(b + x), ln_gamma(a + b + x));
            let (dg_rx, dg_bx, dg_abx) = (digamma(r + x), digamma(b + x), digamma(a + b + x));
            ll += n * (lg_rx - lg_r + r * ln_alpha + lg_ab + lg_bx - lg_b - lg_abx);
            d_r += n * (dg_rx - dg_r + ln_alpha);
            d_alpha += n * r / alpha;
            d_a += n * (dg_ab - dg_abx);
            d_b += n * (dg_ab + dg_bx - dg_b - dg_abx);
            // ln a − ln(b + x − 1) and 1 / (b + x − 1), used only when x > 0.
            let bx1 = b + x - 1.0;
            per_x.push((ln_a - bx1.ln(), 1.0 / bx1));
        }
        let ln_age: Vec<(f64, f64)> = self
            .ages
            .iter()
            .map(|&t| ((alpha + t).ln(), 1.0 / (alpha + t)))
            .collect();
        let ln_rec: Vec<(f64, f64)> = self
            .recencies
            .iter()
            .map(|&t| ((alpha + t).ln(), 1.0 / (alpha + t)))
            .collect();

        for g in &self.groups {
            let (x, _) = self.frequencies[g.frequency];
            let rx = r + x;
            let (ln_at, inv_at) = ln_age[g.age];
            let a3 = -rx * ln_at;
            let w = g.weight;
            if x == 0.0 {
                ll += w * a3;
                d_r -= w * ln_at;
                d_alpha -= w * rx * inv_at;
                continue;
            }
            let (ln_ratio, inv_bx1) = per_x[g.frequency];
            let (ln_atx, inv_atx) = ln_rec[g.recency];
            let a4 = ln_ratio - rx * ln_atx;
            let (log1p, w3) = log1p_exp_neg_abs_and_sigmoid(a3 - a4);
            let w4 = 1.0 - w3;
            ll += w * (a3.max(a4) + log1p);
            d_r -= w * (w3 * ln_at + w4 * ln_atx);
            d_alpha -= w * rx * (w3 * inv_at + w4 * inv_atx);
            d_a += w * w4 / a;
            d_b -= w * w4 * inv_bx1;
        }

        let n = self.customers;
        // d/dθ = p · d/dp; negated and averaged: the optimizer minimizes the mean.
        let grad = vec![
            -r * d_r / n,
            -alpha * d_alpha / n,
            -a * d_a / n,
            -b * d_b / n,
        ];
        (-ll / n, grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's estimates (Fader, Hardie & Lee 2005, section 5), as fitted by the `lifetimes`
    /// package on the CDNOW sample at full precision.
    const PAPER: BgNbdParams = BgNbdParams {
        r: 0.242_594_7,
        alpha: 4.413_603,
        a: 0.792_922_1,
        b: 2.425_906,
    };

    fn customer(frequency: u32, recency: f64, age: f64) -> CustomerSummary {
        CustomerSummary {
            frequency,
            recency,
            age,
            monetary_value: 0.0,
        }
    }

    #[test]
    fn the_papers_customer_expects_1_226_purchases() {
        let c = customer(2, 30.43, 38.86);
        let e = PAPER.expected_purchases(&c, 39.0);
        assert_eq!(format!("{e:.3}"), "1.226", "{e}");
        assert_eq!(PAPER.expected_purchases(&c, 0.0), 0.0);
        // Purchases accumulate with the horizon.
        assert!(PAPER.expected_purchases(&c, 1.0) < PAPER.expected_purchases(&c, 2.0));
    }

    #[test]
    fn probability_alive_falls_with_silence() {
        let recent = customer(5, 37.0, 38.86);
        let silent = customer(5, 5.0, 38.86);
        let (p_recent, p_silent) = (
            PAPER.probability_alive(&recent),
            PAPER.probability_alive(&silent),
        );
        assert!(p_recent > 0.8 && p_silent < 0.01, "{p_recent} {p_silent}");
        assert_eq!(PAPER.probability_alive(&customer(0, 0.0, 38.86)), 1.0);
        // Far beyond f64's exponent range: a certain drop-out, not NaN.
        let gone = customer(3_000, 1.0, 1_000.0);
        assert_eq!(PAPER.probability_alive(&gone), 0.0);
    }

    #[test]
    fn a_negative_third_hypergeometric_parameter_is_handled() {
        // a + b < 1: c = a + b − 1 < 0 for a customer without repeat purchases. Reference:
        // mpmath, (a + b − 1)/(a − 1) · (1 − ₂F₁(r, b; a + b − 1; z) (1 − z)^r), z = 5/18.
        let params = BgNbdParams {
            r: 0.5,
            alpha: 3.0,
            a: 0.3,
            b: 0.4,
        };
        let e = params.expected_purchases(&customer(0, 0.0, 10.0), 5.0);
        assert!((e - 0.17308060541514575).abs() < 1e-13, "{e}");
    }

    #[test]
    fn many_purchases_stay_finite() {
        // ₂F₁ of a customer with a thousand purchases overflows f64; its logarithm does not.
        let c = customer(1_000, 78.0, 78.0);
        let e = PAPER.expected_purchases(&c, 52.0);
        assert!(e.is_finite() && e > 100.0, "{e}");
    }

    /// The gradient of the compressed population's mean likelihood against central differences,
    /// and its cost against the plain per-customer sum.
    #[test]
    fn gradient_matches_finite_differences() {
        let customers = [
            customer(0, 0.0, 30.0),
            customer(0, 0.0, 30.0),
            customer(2, 20.0, 30.0),
            customer(7, 25.5, 38.0),
            customer(1, 3.0, 10.0),
            customer(2, 20.0, 30.0),
        ];
        let data = Population::new(&customers, 1.0);
        assert_eq!(data.groups.len(), 4);
        let theta = [-1.2, 1.5, -0.3, 0.8];
        let (cost, grad) = data.evaluate(&theta);
        let [r, alpha, a, b] = theta.map(f64::exp);
        let params = BgNbdParams { r, alpha, a, b };
        let direct = -params.total_log_likelihood(&customers) / customers.len() as f64;
        assert!((cost - direct).abs() < 1e-12, "{cost} vs {direct}");
        let h = 1e-6;
        for i in 0..4 {
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
    fn impossible_summaries_are_refused() {
        assert!(matches!(BgNbdParams::fit(&[]), Err(ClvError::NoCustomers)));
        let bad = [customer(1, 5.0, 10.0), customer(1, 11.0, 10.0)];
        assert!(matches!(
            BgNbdParams::fit(&bad),
            Err(ClvError::InvalidSummary { index: 1, .. })
        ));
    }
}
