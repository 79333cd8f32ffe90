//! The matcher (a compiled config) and the Fellegi-Sunter model: a prior λ that two records of
//! the population match, and per field and level the probability m of the level among matches and u
//! among non-matches. A pair's match weight is `log2(λ/(1−λ)) + Σ log2(m/u)` over its fields'
//! levels, and its match probability `2^w / (1 + 2^w)`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::attributes::{Attributes, FieldKind, normalize_value};
use super::blocking::{BlockKey, BlockingRule, BlockingRuleConfig, keys_into};
use super::compare::{ComparisonConfig, ELSE_LABEL, Level, NULL_LABEL, grade};

/// How the model is estimated from unlabelled records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EstimationConfig {
    /// The seed of the random pairs that estimate u.
    pub seed: u64,
    /// How many random pairs estimate u (every pair when the population has fewer).
    pub u_sample_pairs: usize,
    /// The most EM iterations.
    pub max_iterations: usize,
    /// EM stops when the log-likelihood per blocked pair changes by less than this.
    pub tolerance: f64,
    /// Every m, u and λ is kept within `[min_probability, 1 − min_probability]`, so no level
    /// is ever infinitely strong evidence.
    pub min_probability: f64,
}

impl Default for EstimationConfig {
    fn default() -> Self {
        Self {
            seed: 0x7e55_e4a0,
            u_sample_pairs: 1_000_000,
            max_iterations: 1_000,
            tolerance: 1e-9,
            min_probability: 1e-6,
        }
    }
}

/// The matching config: comparisons, blocking rules, estimation and the decision threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchingConfig {
    /// How each field is compared; their order is the order of [`Attributes`] slots.
    pub comparisons: Vec<ComparisonConfig>,
    /// The blocking rules.
    pub blocking: Vec<BlockingRuleConfig>,
    /// Keys held by more records than this make no candidates.
    pub max_block_size: usize,
    /// Pairs whose match probability is at least this are matches. The default, 0.5 (match
    /// weight 0), is the Bayes decision for equal costs of a false merge and a missed one.
    pub threshold: f64,
    /// How the model is estimated.
    pub estimation: EstimationConfig,
}

impl Default for MatchingConfig {
    fn default() -> Self {
        Self {
            comparisons: ComparisonConfig::person_defaults(),
            blocking: BlockingRuleConfig::person_defaults(),
            max_block_size: 200,
            threshold: 0.5,
            estimation: EstimationConfig::default(),
        }
    }
}

/// A config or model that cannot be used, naming the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid matching config at `{field}`: {reason}")]
pub struct MatchingConfigError {
    /// The key path (`comparisons[2].levels[1].min`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(field: String, reason: &str) -> MatchingConfigError {
    MatchingConfigError {
        field,
        reason: reason.to_owned(),
    }
}

/// A validated config, ready to normalize records, block and compare them.
#[derive(Debug, Clone)]
pub struct Matcher {
    config: MatchingConfig,
    fields: HashMap<String, usize>,
    pub(crate) rules: Vec<BlockingRule>,
}

/// The most levels a comparison may have (`else` included); one byte holds a level and `null`.
pub const MAX_LEVELS: usize = 64;

impl Matcher {
    /// Validates `config`.
    pub fn new(config: MatchingConfig) -> Result<Self, MatchingConfigError> {
        let mut fields = HashMap::new();
        for (n, comparison) in config.comparisons.iter().enumerate() {
            if fields.insert(comparison.field.clone(), n).is_some() {
                return Err(invalid(format!("comparisons[{n}].field"), "compared twice"));
            }
            if comparison.levels.len() + 1 > MAX_LEVELS {
                return Err(invalid(
                    format!("comparisons[{n}].levels"),
                    "too many levels",
                ));
            }
            for (l, level) in comparison.levels.iter().enumerate() {
                if let Level::JaroWinkler { min } = level
                    && !(0.0..=1.0).contains(min)
                {
                    return Err(invalid(
                        format!("comparisons[{n}].levels[{l}].min"),
                        "must be within [0, 1]",
                    ));
                }
            }
        }
        let mut rules = Vec::with_capacity(config.blocking.len());
        for (n, rule) in config.blocking.iter().enumerate() {
            if rule.parts.is_empty() {
                return Err(invalid(format!("blocking[{n}].parts"), "must not be empty"));
            }
            let mut parts = Vec::with_capacity(rule.parts.len());
            for (p, part) in rule.parts.iter().enumerate() {
                let Some(&field) = fields.get(&part.field) else {
                    return Err(invalid(
                        format!("blocking[{n}].parts[{p}].field"),
                        "is not a compared field",
                    ));
                };
                parts.push((field, part.transform));
            }
            rules.push(BlockingRule { parts });
        }
        if u16::try_from(rules.len()).is_err() {
            return Err(invalid("blocking".to_owned(), "too many rules"));
        }
        if config.max_block_size < 2 {
            return Err(invalid("max_block_size".to_owned(), "must be at least 2"));
        }
        if !(config.threshold > 0.0 && config.threshold < 1.0) {
            return Err(invalid("threshold".to_owned(), "must be within (0, 1)"));
        }
        let e = &config.estimation;
        if !(e.min_probability > 0.0 && e.min_probability < 0.5) {
            return Err(invalid(
                "estimation.min_probability".to_owned(),
                "must be within (0, 0.5)",
            ));
        }
        if e.tolerance.is_nan() || e.tolerance <= 0.0 {
            return Err(invalid(
                "estimation.tolerance".to_owned(),
                "must be positive",
            ));
        }
        Ok(Self {
            config,
            fields,
            rules,
        })
    }

    /// The config.
    pub fn config(&self) -> &MatchingConfig {
        &self.config
    }

    /// The comparisons, in [`Attributes`] slot order.
    pub fn comparisons(&self) -> &[ComparisonConfig] {
        &self.config.comparisons
    }

    /// Normalizes raw `(field, value)` pairs into attributes; fields that no comparison names
    /// are ignored, and a field given twice keeps its last value.
    pub fn attributes<'a>(&self, raw: impl IntoIterator<Item = (&'a str, &'a str)>) -> Attributes {
        let mut values = vec![None; self.config.comparisons.len()];
        for (field, value) in raw {
            if let Some(&index) = self.fields.get(field) {
                let kind: FieldKind = self.config.comparisons[index].kind;
                values[index] = normalize_value(kind, value).map(String::into_boxed_str);
            }
        }
        Attributes::from_values(values)
    }

    /// The record's blocking keys, one per rule whose fields it has.
    pub fn keys(&self, attributes: &Attributes) -> Vec<BlockKey> {
        let mut out = Vec::with_capacity(self.rules.len());
        keys_into(&self.rules, attributes, &mut String::new(), &mut out);
        out
    }

    /// The level of each field for a pair (`None`: either side missing), written into `out`.
    pub(crate) fn grade_into(&self, a: &Attributes, b: &Attributes, out: &mut [Option<u8>]) {
        for (index, (comparison, slot)) in self.config.comparisons.iter().zip(out).enumerate() {
            *slot = match (a.get(index), b.get(index)) {
                (Some(x), Some(y)) => {
                    Some(u8::try_from(grade(&comparison.levels, x, y)).unwrap_or(u8::MAX))
                }
                _ => None,
            };
        }
    }
}

/// How often each value of a field occurs in the population, for term-frequency adjustment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TermFrequencies {
    /// Records with the field present.
    pub total: u64,
    /// Records per value.
    pub counts: HashMap<Box<str>, u32>,
}

impl TermFrequencies {
    /// Counts the values of field `index` over `records`.
    pub fn count<'a>(index: usize, records: impl IntoIterator<Item = &'a Attributes>) -> Self {
        let mut tf = Self::default();
        for value in records.into_iter().filter_map(|r| r.get(index)) {
            tf.total += 1;
            *tf.counts.entry(value.into()).or_default() += 1;
        }
        tf
    }

    /// The relative frequency of `value`: a value not seen counts as seen once.
    pub fn frequency(&self, value: &str) -> f64 {
        let count = self.counts.get(value).copied().unwrap_or(0).max(1);
        f64::from(count) / (self.total.max(1) as f64)
    }
}

/// The estimated parameters of one field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldParams {
    /// The field.
    pub field: String,
    /// Per level (configured levels, then `else`): its probability among matches.
    pub m: Vec<f64>,
    /// Per level: its probability among non-matches.
    pub u: Vec<f64>,
    /// Value frequencies, when the field's exact level is term-frequency adjusted.
    pub term_frequencies: Option<TermFrequencies>,
}

/// A model's estimated parameters; serializable so a trained model can be stored and reloaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelParams {
    /// The prior probability that two records of the population match.
    pub lambda: f64,
    /// Per comparison, in config order.
    pub fields: Vec<FieldParams>,
}

/// What one field contributed to a pair's weight.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldWeight {
    /// The field.
    pub field: Arc<str>,
    /// The level it reached (`exact`, `jaro_winkler>=0.92`, `else`, `null`).
    pub level: Arc<str>,
    /// Its contribution to the match weight, in bits (`log2(m/u)`).
    pub weight: f64,
    /// Whether u was the value's frequency rather than the level's average.
    pub term_frequency_adjusted: bool,
}

/// A scored pair and why: the prior's weight plus the fields' weights is the match weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// The match weight in bits.
    pub weight: f64,
    /// The match probability, `2^weight / (1 + 2^weight)`.
    pub probability: f64,
    /// The prior's weight, `log2(λ/(1−λ))`.
    pub prior_weight: f64,
    /// Each field's contribution, in config order.
    pub fields: Vec<FieldWeight>,
}

/// The probability for a match weight, computed without overflow for large |w|.
pub fn probability(weight: f64) -> f64 {
    if weight >= 0.0 {
        1.0 / (1.0 + (-weight).exp2())
    } else {
        let p = weight.exp2();
        p / (1.0 + p)
    }
}

/// A trained model: the matcher and its parameters, with the per-level weights precomputed.
#[derive(Debug, Clone)]
pub struct Model {
    matcher: Matcher,
    params: ModelParams,
    prior_weight: f64,
    /// Per comparison, per level: `log2(m/u)`.
    level_weights: Vec<Vec<f64>>,
    /// Per comparison: whether level 0 is an exact level adjusted by term frequency.
    tf_exact: Vec<bool>,
    field_names: Vec<Arc<str>>,
    level_labels: Vec<Vec<Arc<str>>>,
    null_label: Arc<str>,
    threshold_weight: f64,
}

impl Model {
    /// A model from a matcher and parameters estimated for it (or reloaded).
    pub fn new(matcher: Matcher, params: ModelParams) -> Result<Self, MatchingConfigError> {
        let comparisons = matcher.comparisons();
        if params.fields.len() != comparisons.len() {
            return Err(invalid("fields".to_owned(), "do not match the comparisons"));
        }
        if !(params.lambda > 0.0 && params.lambda < 1.0) {
            return Err(invalid("lambda".to_owned(), "must be within (0, 1)"));
        }
        let mut level_weights = Vec::with_capacity(comparisons.len());
        for (n, (comparison, field)) in comparisons.iter().zip(&params.fields).enumerate() {
            let levels = comparison.levels.len() + 1;
            if field.field != comparison.field || field.m.len() != levels || field.u.len() != levels
            {
                return Err(invalid(
                    format!("fields[{n}]"),
                    "does not match its comparison's levels",
                ));
            }
            if field
                .m
                .iter()
                .chain(&field.u)
                .any(|p| !(*p > 0.0 && *p <= 1.0))
            {
                return Err(invalid(
                    format!("fields[{n}]"),
                    "probabilities must be in (0, 1]",
                ));
            }
            level_weights.push(
                field
                    .m
                    .iter()
                    .zip(&field.u)
                    .map(|(m, u)| (m / u).log2())
                    .collect(),
            );
        }
        let tf_exact = comparisons
            .iter()
            .zip(&params.fields)
            .map(|(c, f)| {
                c.term_frequency
                    && c.levels.first() == Some(&Level::Exact)
                    && f.term_frequencies.is_some()
            })
            .collect();
        let field_names = comparisons
            .iter()
            .map(|c| Arc::from(c.field.as_str()))
            .collect();
        let level_labels = comparisons
            .iter()
            .map(|c| {
                c.levels
                    .iter()
                    .map(|l| Arc::from(l.label()))
                    .chain([Arc::from(ELSE_LABEL)])
                    .collect()
            })
            .collect();
        let threshold = matcher.config().threshold;
        Ok(Self {
            prior_weight: (params.lambda / (1.0 - params.lambda)).log2(),
            threshold_weight: (threshold / (1.0 - threshold)).log2(),
            matcher,
            params,
            level_weights,
            tf_exact,
            field_names,
            level_labels,
            null_label: Arc::from(NULL_LABEL),
        })
    }

    /// The matcher.
    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    /// The parameters.
    pub fn params(&self) -> &ModelParams {
        &self.params
    }

    /// The match weight at the config's probability threshold.
    pub fn threshold_weight(&self) -> f64 {
        self.threshold_weight
    }

    /// The weight of field `index` at `level` for value `value` (the left side's).
    fn field_weight(&self, index: usize, level: usize, value: &str) -> (f64, bool) {
        let field = &self.params.fields[index];
        if level == 0
            && self.tf_exact[index]
            && let Some(tf) = &field.term_frequencies
        {
            let floor = self.matcher.config().estimation.min_probability;
            let u = tf.frequency(value).max(floor);
            return ((field.m[0] / u).log2(), true);
        }
        (self.level_weights[index][level], false)
    }

    /// A pair's match weight, without explanation and without allocating.
    pub fn weight(&self, a: &Attributes, b: &Attributes) -> f64 {
        let mut weight = self.prior_weight;
        for (index, comparison) in self.matcher.comparisons().iter().enumerate() {
            if let (Some(x), Some(y)) = (a.get(index), b.get(index)) {
                weight += self
                    .field_weight(index, grade(&comparison.levels, x, y), x)
                    .0;
            }
        }
        weight
    }

    /// A pair's score with each field's level and weight.
    pub fn explain(&self, a: &Attributes, b: &Attributes) -> Score {
        let mut weight = self.prior_weight;
        let mut fields = Vec::with_capacity(self.field_names.len());
        for (index, comparison) in self.matcher.comparisons().iter().enumerate() {
            let (level, w, tf) = match (a.get(index), b.get(index)) {
                (Some(x), Some(y)) => {
                    let level = grade(&comparison.levels, x, y);
                    let (w, tf) = self.field_weight(index, level, x);
                    (self.level_labels[index][level].clone(), w, tf)
                }
                _ => (self.null_label.clone(), 0.0, false),
            };
            weight += w;
            fields.push(FieldWeight {
                field: self.field_names[index].clone(),
                level,
                weight: w,
                term_frequency_adjusted: tf,
            });
        }
        Score {
            weight,
            probability: probability(weight),
            prior_weight: self.prior_weight,
            fields,
        }
    }
}

/// Reusable buffers for [`super::match_record`], so scoring one profile allocates only for
/// the candidates it returns.
#[derive(Debug)]
pub struct Scratch<I> {
    pub(crate) keys: Vec<BlockKey>,
    pub(crate) key_text: String,
    pub(crate) seen: HashSet<I>,
}

impl<I> Default for Scratch<I> {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            key_text: String::new(),
            seen: HashSet::new(),
        }
    }
}
