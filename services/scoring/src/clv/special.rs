//! Special functions of the customer-value models: log-gamma and digamma (from `statrs`) and the
//! Gauss hypergeometric function ₂F₁, which `statrs` does not have.

pub use statrs::function::gamma::{digamma, ln_gamma};

/// The most series terms [`ln_hyp2f1`] sums before giving up. The series converges like `zⁿ`, so
/// this covers `z` up to about `1 − 4·10⁻⁵` (about 40 / (1 − z) terms are needed).
const MAX_TERMS: usize = 1_000_000;

/// Partial sums above this are scaled down (and the scale kept as a logarithm), so a series whose
/// value overflows `f64` (large frequencies) still gives its logarithm.
const RESCALE_ABOVE: f64 = 1e200;

/// The Gauss hypergeometric function ₂F₁(a, b; c; z) for real `a`, `b`, `c` and `z < 1`.
///
/// NaN where it is not defined or not computed: `z ≥ 1`, a non-finite argument, `c` a
/// non-positive integer, or a series that did not converge within a million terms.
pub fn hyp2f1(a: f64, b: f64, c: f64, z: f64) -> f64 {
    let (ln_abs, sign) = ln_abs_hyp2f1(a, b, c, z);
    sign * ln_abs.exp()
}

/// `ln ₂F₁(a, b; c; z)` for `z < 1` where the function is positive (always so when `a`, `b`, `c`
/// are positive and `0 ≤ z < 1`, the case of the BG/NBD model); NaN where it is not positive or
/// not computed (see [`hyp2f1`]).
///
/// Works in log space, so values far beyond `f64`'s range (a customer with hundreds of purchases)
/// keep their logarithm.
pub fn ln_hyp2f1(a: f64, b: f64, c: f64, z: f64) -> f64 {
    match ln_abs_hyp2f1(a, b, c, z) {
        (ln_abs, sign) if sign > 0.0 => ln_abs,
        (_, _) => f64::NAN,
    }
}

/// `(ln |₂F₁(a, b; c; z)|, sign)` for `z < 1`: the sign is 1 or −1, 0 for a zero value, and NaN
/// when not computed (see [`hyp2f1`]).
pub fn ln_abs_hyp2f1(a: f64, b: f64, c: f64, z: f64) -> (f64, f64) {
    let not_computed = (f64::NAN, f64::NAN);
    if !(a.is_finite() && b.is_finite() && c.is_finite() && z.is_finite()) || z >= 1.0 {
        return not_computed;
    }
    if c <= 0.0 && c.fract() == 0.0 {
        return not_computed;
    }
    if z == 0.0 {
        return (0.0, 1.0);
    }
    if z < 0.0 {
        // Pfaff: ₂F₁(a, b; c; z) = (1 − z)^(−a) ₂F₁(a, c − b; c; z / (z − 1)), which maps
        // z < 0 into (0, 1), where the series has only finitely many sign changes (an
        // alternating series on z < 0 would cancel).
        let w = z / (z - 1.0);
        let (ln_abs, sign) = ln_abs_unit_interval(a, c - b, c, w);
        return (ln_abs - a * (-z).ln_1p(), sign);
    }
    ln_abs_unit_interval(a, b, c, z)
}

/// ₂F₁ on `0 < z < 1`, by the series itself or by Euler's transformation, whichever has the
/// faster-decaying terms.
fn ln_abs_unit_interval(a: f64, b: f64, c: f64, z: f64) -> (f64, f64) {
    let excess = c - a - b;
    if excess < 0.0 {
        // Euler: ₂F₁(a, b; c; z) = (1 − z)^(c − a − b) ₂F₁(c − a, c − b; c; z). The series'
        // terms fall like n^(a + b − c − 1)·zⁿ, the transformed ones like n^(c − a − b − 1)·zⁿ:
        // far faster when c − a − b is very negative (BG/NBD with many purchases), and the
        // diverging factor (1 − z)^(c − a − b) is exact in log space.
        let (ln_abs, sign) = series(c - a, c - b, c, z);
        (ln_abs + excess * (-z).ln_1p(), sign)
    } else {
        series(a, b, c, z)
    }
}

/// The hypergeometric series Σ (a)ₙ(b)ₙ / ((c)ₙ n!) zⁿ for `0 < z < 1`, as (ln |sum|, sign).
///
/// Terms follow from each other by their ratio, so no factorial or Pochhammer symbol is formed.
/// The sum stops when the remaining tail, bounded by a geometric series with the larger of the
/// current ratio and `z` (the ratio's limit), is below `f64` precision of the sum.
fn series(a: f64, b: f64, c: f64, z: f64) -> (f64, f64) {
    let mut sum = 1.0_f64;
    let mut term = 1.0_f64;
    let mut ln_scale = 0.0_f64;
    for n in 0..MAX_TERMS {
        let k = n as f64;
        let ratio = (a + k) * (b + k) / ((c + k) * (k + 1.0)) * z;
        term *= ratio;
        sum += term;
        if term == 0.0 {
            return finish(sum, ln_scale);
        }
        if sum.abs() > RESCALE_ABOVE {
            sum /= RESCALE_ABOVE;
            term /= RESCALE_ABOVE;
            ln_scale += RESCALE_ABOVE.ln();
        }
        let q = ratio.abs().max(z);
        if q < 1.0 && term.abs() * q / (1.0 - q) <= f64::EPSILON * 0.5 * sum.abs() {
            return finish(sum, ln_scale);
        }
    }
    (f64::NAN, f64::NAN)
}

fn finish(sum: f64, ln_scale: f64) -> (f64, f64) {
    if sum == 0.0 {
        (f64::NEG_INFINITY, 0.0)
    } else {
        (sum.abs().ln() + ln_scale, sum.signum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_rel(actual: f64, expected: f64, tol: f64) {
        let err = ((actual - expected) / expected).abs();
        assert!(err <= tol, "{actual} vs {expected}: relative error {err:e}");
    }

    #[test]
    fn closed_forms() {
        for z in [-5.0, -0.9, -0.3, 1e-8, 0.1, 0.5, 0.9, 0.99, 0.9999] {
            // Each term carries the rounding of the ratios before it, and about 40 / (1 − z)
            // terms count: precision falls as z nears 1.
            let tol = if z > 0.999 { 1e-11 } else { 1e-13 };
            // ₂F₁(1, 1; 2; z) = −ln(1 − z) / z
            assert_rel(hyp2f1(1.0, 1.0, 2.0, z), -(-z).ln_1p() / z, tol);
            // ₂F₁(a, b; b; z) = (1 − z)^(−a)
            assert_rel(hyp2f1(0.7, 2.5, 2.5, z), (1.0 - z).powf(-0.7), tol);
        }
        // ₂F₁(1/2, 1/2; 3/2; x²) = arcsin(x) / x
        for x in [0.1f64, 0.5, 0.9, 0.999] {
            assert_rel(hyp2f1(0.5, 0.5, 1.5, x * x), x.asin() / x, 1e-13);
        }
        // A terminating series: ₂F₁(−2, b; c; z) = 1 − 2bz/c + b(b + 1)z²/(c(c + 1)).
        let (b, c, z) = (1.5, 2.5, 0.4);
        let poly = 1.0 - 2.0 * b * z / c + b * (b + 1.0) * z * z / (c * (c + 1.0));
        assert_rel(hyp2f1(-2.0, b, c, z), poly, 1e-14);
    }

    /// Reference values from mpmath (`mp.dps = 40`, `mp.log(mp.hyp2f1(a, b, c, z))`), among them
    /// the BG/NBD case of the paper's customer (x = 2, t_x = 30.43, T = 38.86, t = 39) and
    /// frequencies large enough that ₂F₁ itself overflows `f64`.
    #[test]
    fn matches_mpmath() {
        let cases = [
            (
                2.242595,
                4.4259059999999995,
                4.218828,
                0.4740445650024858,
                1.520520914582036,
            ),
            (0.25, 2.4, 2.2, 0.5, 0.19307417193255483),
            (0.25, 2.4, 2.2, 0.95, 0.9139548938707459),
            (0.25, 2.4, 2.2, 0.999, 2.439370357904727),
            (50.3, 52.4, 53.2, 0.6, 45.383262822035576),
            (150.3, 152.4, 153.2, 0.3, 53.32746807010209),
            (1.5, 2.5, 10.0, 0.9, 0.4353370183156872),
            (3.0, 0.5, 0.7, 0.99, 12.409112221218892),
            (0.5, 0.5, 1.5, -0.81, -0.10676033982778668),
            (2.0, 3.0, 4.0, -3.0, -2.2200723330178507),
            (1.0, 1.0, 2.0, -1.0, -0.36651292058166435),
        ];
        for (a, b, c, z, expected) in cases {
            let ln = ln_hyp2f1(a, b, c, z);
            let err = (ln - expected).abs() / expected.abs().max(1.0);
            assert!(
                err < 1e-13,
                "2F1({a}, {b}; {c}; {z}): ln {ln} vs {expected}"
            );
        }
        // Far beyond f64's range: e^1000 and more still have a logarithm.
        let big = ln_hyp2f1(2000.2, 2002.4, 2003.2, 0.5);
        assert!(big.is_finite() && big > 700.0, "{big}");
    }

    #[test]
    fn undefined_arguments_are_nan() {
        assert!(hyp2f1(1.0, 1.0, 2.0, 1.0).is_nan());
        assert!(hyp2f1(1.0, 1.0, -3.0, 0.5).is_nan());
        assert!(hyp2f1(f64::NAN, 1.0, 2.0, 0.5).is_nan());
        assert_eq!(hyp2f1(1.0, 1.0, 2.0, 0.0), 1.0);
        // ₂F₁(−1, 1; 1; 1/2) = 1 − 1/2 · 2 = 0: zero has no logarithm.
        assert!(ln_hyp2f1(-1.0, 2.0, 1.0, 0.5).is_nan());
    }
}
