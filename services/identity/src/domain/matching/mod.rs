//! Probabilistic identity matching (Fellegi-Sunter), free of IO: records whose person
//! attributes (names, address, date of birth, ...) say they are one person, even without a
//! shared identifier.
//!
//! A [`Matcher`] (a validated [`MatchingConfig`]) normalizes attributes, blocks records into
//! candidate pairs and grades each field of a pair into a level. [`train`] estimates a [`Model`]
//! without labels: u from random pairs, λ and m by EM over the blocked pairs. [`link_batch`]
//! trains and returns the pairs at or above the threshold; [`match_record`] scores one new or
//! changed record against a [`BlockingIndex`], which is what the service calls per profile.
//! Every [`Score`] carries each field's level and weight.

mod attributes;
mod blocking;
mod compare;
mod estimate;
mod model;
mod rng;
#[cfg(test)]
mod tests;

use std::hash::Hash;

pub use attributes::{Attributes, FieldKind, normalize_value};
pub use blocking::{
    BlockKey, BlockingIndex, BlockingRuleConfig, BlockingStats, KeyPart, MemoryIndex, Transform,
    soundex,
};
pub use compare::{ComparisonConfig, ELSE_LABEL, Level, NULL_LABEL, grade};
pub use estimate::EmReport;
pub use model::{
    EstimationConfig, FieldParams, FieldWeight, MAX_LEVELS, Matcher, MatchingConfig,
    MatchingConfigError, Model, ModelParams, Score, Scratch, TermFrequencies, probability,
};

/// What training did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingReport {
    /// Blocking of the training records.
    pub blocking: BlockingStats,
    /// Random pairs that estimated u.
    pub u_pairs: usize,
    /// EM over the blocked pairs.
    pub em: EmReport,
}

/// Estimates a model from unlabelled records (positions are the records' order). Deterministic
/// given the records, their order and the config's seed.
pub fn train(matcher: Matcher, records: &[Attributes]) -> (Model, TrainingReport) {
    let (pairs, blocking) =
        blocking::candidate_pairs(&matcher.rules, records, matcher.config().max_block_size);
    train_on_pairs(matcher, records, &pairs, blocking)
}

fn train_on_pairs(
    matcher: Matcher,
    records: &[Attributes],
    pairs: &[(u32, u32)],
    blocking: BlockingStats,
) -> (Model, TrainingReport) {
    let estimation = matcher.config().estimation.clone();
    let floor = estimation.min_probability;
    let levels: Vec<usize> = matcher
        .comparisons()
        .iter()
        .map(|c| c.levels.len() + 1)
        .collect();

    let random = estimate::random_pairs(records.len(), estimation.u_sample_pairs, estimation.seed);
    let u_pairs = random.len();
    let random = estimate::patterns(&matcher, records, random);
    let u = estimate::level_shares(&random, &levels, floor);

    let blocked = estimate::patterns(
        &matcher,
        records,
        pairs.iter().map(|&(i, j)| (i as usize, j as usize)),
    );
    let n = records.len() as f64;
    let population_pairs = n * (n - 1.0) / 2.0;
    let (lambda, m, em) =
        estimate::expectation_maximization(&blocked, &u, population_pairs, &estimation);

    let fields = matcher
        .comparisons()
        .iter()
        .enumerate()
        .zip(m.into_iter().zip(u))
        .map(|((index, comparison), (m, u))| FieldParams {
            field: comparison.field.clone(),
            m,
            u,
            term_frequencies: comparison
                .term_frequency
                .then(|| TermFrequencies::count(index, records)),
        })
        .collect();
    let params = ModelParams { lambda, fields };
    // The parameters were built from the matcher's own comparisons, so they always fit it.
    let model = Model::new(matcher, params).expect("trained parameters fit their matcher");
    let report = TrainingReport {
        blocking,
        u_pairs,
        em,
    };
    (model, report)
}

/// Two records judged one person, with the score that judged them.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredPair<I> {
    /// The earlier record (in input order).
    pub left: I,
    /// The later record.
    pub right: I,
    /// The score and its explanation.
    pub score: Score,
}

/// What [`link_batch`] found.
#[derive(Debug, Clone)]
pub struct BatchOutput<I> {
    /// The trained model, for incremental matching afterwards.
    pub model: Model,
    /// Pairs at or above the threshold, highest weight first.
    pub matches: Vec<ScoredPair<I>>,
    /// What training did.
    pub report: TrainingReport,
}

/// Trains a model on `records`, scores their blocked candidate pairs and returns those at or
/// above the config's threshold.
pub fn link_batch<I: Clone>(matcher: Matcher, records: &[(I, Attributes)]) -> BatchOutput<I> {
    let attributes: Vec<Attributes> = records.iter().map(|(_, a)| a.clone()).collect();
    let (pairs, blocking) =
        blocking::candidate_pairs(&matcher.rules, &attributes, matcher.config().max_block_size);
    let (model, report) = train_on_pairs(matcher, &attributes, &pairs, blocking);
    let threshold = model.threshold_weight();
    let mut matches: Vec<ScoredPair<I>> = pairs
        .iter()
        .map(|&(i, j)| (i as usize, j as usize))
        .filter(|&(i, j)| model.weight(&attributes[i], &attributes[j]) >= threshold)
        .map(|(i, j)| ScoredPair {
            left: records[i].0.clone(),
            right: records[j].0.clone(),
            score: model.explain(&attributes[i], &attributes[j]),
        })
        .collect();
    matches.sort_by(|a, b| b.score.weight.total_cmp(&a.score.weight));
    BatchOutput {
        model,
        matches,
        report,
    }
}

/// A candidate of one record and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredCandidate<I> {
    /// The candidate's id.
    pub id: I,
    /// The score and its explanation.
    pub score: Score,
}

/// Scores one new or changed record against the records of `index` that share a blocking key
/// with it, and returns those at or above the threshold, highest weight first. `id` (the
/// record's own id, if the index already holds it) is never its own candidate. Blocks larger
/// than `max_block_size` are skipped as in training. Candidates below the threshold are scored
/// without allocating; `scratch` keeps the buffers between calls.
pub fn match_record<I, X>(
    model: &Model,
    index: &X,
    id: Option<&I>,
    attributes: &Attributes,
    scratch: &mut Scratch<I>,
) -> Vec<ScoredCandidate<I>>
where
    I: Clone + Eq + Hash,
    X: BlockingIndex<I> + ?Sized,
{
    let matcher = model.matcher();
    let cap = matcher.config().max_block_size;
    let threshold = model.threshold_weight();
    scratch.keys.clear();
    scratch.seen.clear();
    blocking::keys_into(
        &matcher.rules,
        attributes,
        &mut scratch.key_text,
        &mut scratch.keys,
    );
    let mut out = Vec::new();
    for key in &scratch.keys {
        let block = index.block(key);
        if block.len() > cap {
            continue;
        }
        for candidate in block {
            if Some(candidate) == id || scratch.seen.contains(candidate) {
                continue;
            }
            scratch.seen.insert(candidate.clone());
            let Some(other) = index.attributes(candidate) else {
                continue;
            };
            if model.weight(attributes, other) >= threshold {
                out.push(ScoredCandidate {
                    id: candidate.clone(),
                    score: model.explain(attributes, other),
                });
            }
        }
    }
    out.sort_by(|a, b| b.score.weight.total_cmp(&a.score.weight));
    out
}
