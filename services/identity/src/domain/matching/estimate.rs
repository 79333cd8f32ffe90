//! Estimation without labels. u comes from random pairs, which are almost all non-matches (in a
//! population of n people with a few duplicates each, a random pair matches with probability
//! about 1/n). λ and m come from EM with u held fixed, as Splink does: fixing u keeps the two
//! classes from swapping and leaves EM only the matches' side to find.
//!
//! EM runs over the whole population of pairs, not just the blocked ones: u describes all
//! non-matches, and a blocked non-match (which agrees on its blocking fields) is simply an
//! unlikely draw from it. Pairs that blocking left out disagree on every blocking key, so their
//! posterior probability of matching is taken as zero: they need not be compared, and they only
//! enter as the `(N − blocked) · ln(1 − λ)` term of the likelihood and in λ's denominator. So
//! λ is the probability that two records of the population match (about duplicates / N pairs),
//! and a pair's score weighs all of its fields, blocking fields included. Estimating λ as the
//! match rate among blocked pairs instead would count the agreement on blocking fields twice
//! (once in λ, once in the fields' weights) and, with tight blocking, call most candidates
//! matches. Term frequencies are not used in EM; they refine u at scoring time.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::attributes::Attributes;
use super::model::{EstimationConfig, Matcher};
use super::rng::SplitMix64;

/// What EM did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmReport {
    /// Iterations run.
    pub iterations: usize,
    /// Whether the mean log-likelihood settled within the tolerance.
    pub converged: bool,
    /// The final log-likelihood of the population per blocked pair (natural log).
    pub mean_log_likelihood: f64,
    /// Distinct comparison vectors among the pairs.
    pub patterns: usize,
}

/// A comparison vector: each field's level, `None` when either side is missing.
pub(crate) type Pattern = Vec<Option<u8>>;

/// The distinct comparison vectors of `pairs`, with how often each occurs. EM then runs over
/// tens of thousands of patterns rather than millions of pairs. Many pairs (the million random
/// pairs of u) are graded on every core; the counts, and so the result, are the same.
pub(crate) fn patterns(
    matcher: &Matcher,
    records: &[Attributes],
    pairs: impl IntoIterator<Item = (usize, usize)>,
) -> Vec<(Pattern, u64)> {
    const PER_THREAD: usize = 50_000;
    let pairs: Vec<(usize, usize)> = pairs.into_iter().collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(pairs.len() / PER_THREAD)
        .max(1);
    let counts = if threads == 1 {
        count_patterns(matcher, records, &pairs)
    } else {
        std::thread::scope(|scope| {
            let parts: Vec<_> = pairs
                .chunks(pairs.len().div_ceil(threads))
                .map(|part| scope.spawn(move || count_patterns(matcher, records, part)))
                .collect();
            let mut total: HashMap<Pattern, u64> = HashMap::new();
            for part in parts {
                let part = part.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                for (pattern, count) in part {
                    *total.entry(pattern).or_insert(0) += count;
                }
            }
            total
        })
    };
    let mut out: Vec<_> = counts.into_iter().collect();
    // Sorted, so that floating-point sums (and so the model) do not depend on hash order.
    out.sort_unstable();
    out
}

fn count_patterns(
    matcher: &Matcher,
    records: &[Attributes],
    pairs: &[(usize, usize)],
) -> HashMap<Pattern, u64> {
    let fields = matcher.comparisons().len();
    let mut vector = vec![None; fields];
    if fields > PACKED_FIELDS {
        let mut counts: HashMap<Pattern, u64> = HashMap::new();
        for &(i, j) in pairs {
            matcher.grade_into(&records[i], &records[j], &mut vector);
            if let Some(count) = counts.get_mut(&vector) {
                *count += 1;
            } else {
                counts.insert(vector.clone(), 1);
            }
        }
        return counts;
    }
    let mut counts: HashMap<u128, u64, BuildHasherDefault<PackedHasher>> = HashMap::default();
    for &(i, j) in pairs {
        matcher.grade_into(&records[i], &records[j], &mut vector);
        *counts.entry(pack(&vector)).or_insert(0) += 1;
    }
    counts
        .into_iter()
        .map(|(key, count)| (unpack(key, fields), count))
        .collect()
}

/// The most fields whose comparison vector packs into a `u128` key, a byte each.
const PACKED_FIELDS: usize = 16;

/// A comparison vector as a `u128`, field `f` in byte `f`: 0 when missing, else its level + 1
/// (a level is below [`super::model::MAX_LEVELS`], so it fits). Counting a million random
/// pairs by this key, rather than by a `Vec` hashed with SipHash, saves most of the counting.
fn pack(vector: &[Option<u8>]) -> u128 {
    vector.iter().rev().fold(0, |key, level| {
        (key << 8) | u128::from(level.map_or(0, |level| level + 1))
    })
}

fn unpack(key: u128, fields: usize) -> Pattern {
    (0..fields)
        .map(|field| ((key >> (8 * field)) as u8).checked_sub(1))
        .collect()
}

/// A hasher for packed patterns: the two halves folded, then one `SplitMix64` step. The keys are not
/// chosen by anyone, so no defence against collisions is needed.
#[derive(Default)]
struct PackedHasher(u64);

impl Hasher for PackedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u128` is used (a `u128` key hashes as one); FNV-style for completeness.
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u128(&mut self, key: u128) {
        let folded = (key as u64) ^ ((key >> 64) as u64).rotate_left(29);
        self.0 = SplitMix64::new(folded).next_u64();
    }
}

/// Random distinct pairs of positions in `0..n`: every pair when there are at most `sample`,
/// else `sample` pairs drawn with replacement from the seeded generator.
pub(crate) fn random_pairs(n: usize, sample: usize, seed: u64) -> Vec<(usize, usize)> {
    let all = n.saturating_mul(n.saturating_sub(1)) / 2;
    if all <= sample {
        return (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .collect();
    }
    let mut rng = SplitMix64::new(seed);
    let mut pairs = Vec::with_capacity(sample);
    while pairs.len() < sample {
        let (i, j) = (rng.below(n), rng.below(n));
        if i != j {
            pairs.push((i.min(j), i.max(j)));
        }
    }
    pairs
}

/// Per field, per level: the share of the level among the pairs where the field is present,
/// clamped to `[floor, 1 − floor]`. A field never present gets uniform levels (it never
/// weighs anything anyway).
pub(crate) fn level_shares(
    patterns: &[(Pattern, u64)],
    levels: &[usize],
    floor: f64,
) -> Vec<Vec<f64>> {
    let mut counts: Vec<Vec<f64>> = levels.iter().map(|&n| vec![0.0; n]).collect();
    for (pattern, count) in patterns {
        for (field, level) in pattern.iter().enumerate() {
            if let Some(level) = level {
                counts[field][usize::from(*level)] += *count as f64;
            }
        }
    }
    counts.into_iter().map(|c| normalize(c, floor)).collect()
}

/// Scales `values` to sum to one, then clamps each into `[floor, 1 − floor]`.
fn normalize(mut values: Vec<f64>, floor: f64) -> Vec<f64> {
    let total: f64 = values.iter().sum();
    let n = values.len() as f64;
    for v in &mut values {
        *v = if total > 0.0 { *v / total } else { 1.0 / n };
        *v = v.clamp(floor, 1.0 - floor);
    }
    values
}

/// EM for λ and m, u fixed, over the blocked pairs' comparison vectors, within a population
/// of `population_pairs` pairs (the pairs not blocked count as certain non-matches). Starts
/// from half the blocked pairs matching and m favouring the most similar levels (80 % exact,
/// the rest spread evenly), which is on the matches' side of any u estimated from random pairs;
/// the result depends only on the patterns, not on hash order or timing.
pub(crate) fn expectation_maximization(
    patterns: &[(Pattern, u64)],
    u: &[Vec<f64>],
    population_pairs: f64,
    config: &EstimationConfig,
) -> (f64, Vec<Vec<f64>>, EmReport) {
    let floor = config.min_probability;
    let blocked: f64 = patterns.iter().map(|(_, c)| *c as f64).sum();
    let population = population_pairs.max(blocked).max(1.0);
    // λ may be far below `floor` (one match in 10^11 pairs), but never below half a match.
    let lambda_floor = 0.5 / population;
    let mut lambda = (0.5 * blocked / population).clamp(lambda_floor, 0.5);
    let mut m: Vec<Vec<f64>> = u
        .iter()
        .map(|levels| {
            let n = levels.len();
            if n == 1 {
                return vec![1.0];
            }
            let rest = 0.2 / (n - 1) as f64;
            let init = (0..n).map(|l| if l == 0 { 0.8 } else { rest }).collect();
            normalize(init, floor)
        })
        .collect();
    let log_u: Vec<Vec<f64>> = u
        .iter()
        .map(|l| l.iter().map(|p| p.ln()).collect())
        .collect();
    let mut report = EmReport {
        iterations: 0,
        converged: false,
        mean_log_likelihood: f64::NEG_INFINITY,
        patterns: patterns.len(),
    };
    if blocked == 0.0 {
        return (lambda, m, report);
    }
    let mut previous = f64::NEG_INFINITY;
    let mut expected: Vec<Vec<f64>> = m.iter().map(|l| vec![0.0; l.len()]).collect();
    while report.iterations < config.max_iterations {
        report.iterations += 1;
        let log_m: Vec<Vec<f64>> = m
            .iter()
            .map(|l| l.iter().map(|p| p.ln()).collect())
            .collect();
        let (log_lambda, log_not_lambda) = (lambda.ln(), (1.0 - lambda).ln());
        for levels in &mut expected {
            levels.fill(0.0);
        }
        let (mut matches, mut log_likelihood) = (0.0, (population - blocked) * log_not_lambda);
        for (pattern, count) in patterns {
            let count = *count as f64;
            let (mut a, mut b) = (log_lambda, log_not_lambda);
            for (field, level) in pattern.iter().enumerate() {
                if let Some(level) = level {
                    a += log_m[field][usize::from(*level)];
                    b += log_u[field][usize::from(*level)];
                }
            }
            // log(e^a + e^b) and the posterior e^a / (e^a + e^b), stable for any a, b.
            let hi = a.max(b);
            let log_sum = hi + ((a - hi).exp() + (b - hi).exp()).ln();
            let posterior = (a - log_sum).exp();
            log_likelihood += count * log_sum;
            matches += count * posterior;
            for (field, level) in pattern.iter().enumerate() {
                if let Some(level) = level {
                    expected[field][usize::from(*level)] += count * posterior;
                }
            }
        }
        lambda = (matches / population).clamp(lambda_floor, 1.0 - floor);
        for (field, levels) in m.iter_mut().enumerate() {
            // A field never present among the likely matches keeps its m.
            if expected[field].iter().sum::<f64>() > 0.0 {
                *levels = normalize(expected[field].clone(), floor);
            }
        }
        let mean = log_likelihood / blocked;
        report.mean_log_likelihood = mean;
        if (mean - previous).abs() < config.tolerance {
            report.converged = true;
            break;
        }
        previous = mean;
    }
    (lambda, m, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_patterns_unpack_to_themselves() {
        let mut rng = SplitMix64::new(1);
        for fields in [0, 1, 11, PACKED_FIELDS] {
            for _ in 0..1_000 {
                let pattern: Pattern = (0..fields)
                    .map(|_| match rng.below(3) {
                        0 => None,
                        1 => Some(0),
                        _ => Some(rng.below(crate::domain::matching::MAX_LEVELS) as u8),
                    })
                    .collect();
                assert_eq!(unpack(pack(&pattern), fields), pattern);
            }
        }
    }
}
