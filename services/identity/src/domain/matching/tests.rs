//! Tests across the matching modules: EM recovering known parameters, term-frequency
//! adjustment, explanations, determinism, and batch and incremental matching agreeing.

use super::estimate::{Pattern, expectation_maximization, level_shares};
use super::rng::SplitMix64;
use super::*;

fn draw(rng: &mut SplitMix64, probabilities: &[f64]) -> u8 {
    let x = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut acc = 0.0;
    for (level, p) in probabilities.iter().enumerate() {
        acc += p;
        if x < acc {
            return level as u8;
        }
    }
    (probabilities.len() - 1) as u8
}

#[test]
fn em_recovers_known_m_and_lambda() {
    let m = [
        vec![0.85, 0.1, 0.05],
        vec![0.7, 0.3],
        vec![0.9, 0.06, 0.04],
        vec![0.6, 0.25, 0.15],
    ];
    let u = [
        vec![0.01, 0.04, 0.95],
        vec![0.1, 0.9],
        vec![0.002, 0.02, 0.978],
        vec![0.05, 0.15, 0.8],
    ];
    let lambda = 0.2;
    let mut rng = SplitMix64::new(7);
    let mut counts = std::collections::BTreeMap::<Pattern, u64>::new();
    for _ in 0..200_000 {
        let is_match = draw(&mut rng, &[lambda, 1.0 - lambda]) == 0;
        let pattern: Pattern = (0..m.len())
            .map(|f| {
                // One field in ten is missing, which must weigh nothing either way.
                if rng.below(10) == 0 {
                    None
                } else {
                    Some(draw(&mut rng, if is_match { &m[f] } else { &u[f] }))
                }
            })
            .collect();
        *counts.entry(pattern).or_default() += 1;
    }
    let patterns: Vec<_> = counts.into_iter().collect();
    let config = EstimationConfig::default();
    let (estimated_lambda, estimated_m, report) =
        expectation_maximization(&patterns, &u.map(|l| l.clone()), 200_000.0, &config);
    assert!(report.converged, "{report:?}");
    assert!(
        (estimated_lambda - lambda).abs() < 0.01,
        "λ = {estimated_lambda}"
    );
    for (field, levels) in estimated_m.iter().enumerate() {
        for (level, p) in levels.iter().enumerate() {
            assert!(
                (p - m[field][level]).abs() < 0.02,
                "m[{field}][{level}] = {p}"
            );
        }
    }
    // u from the same kind of counts (here: the non-matches alone) is their share.
    let shares = level_shares(
        &[(vec![Some(0), None], 1), (vec![Some(2), Some(1)], 3)],
        &[3, 2],
        1e-6,
    );
    assert!((shares[0][0] - 0.25).abs() < 1e-5 && (shares[0][2] - 0.75).abs() < 1e-5);
    assert!((shares[1][1] - (1.0 - 1e-6)).abs() < 1e-9 && shares[1][0] == 1e-6);
}

const GIVEN: &[&str] = &[
    "james",
    "mary",
    "john",
    "patricia",
    "robert",
    "jennifer",
    "michael",
    "linda",
    "william",
    "elizabeth",
    "david",
    "barbara",
    "richard",
    "susan",
    "joseph",
    "jessica",
    "thomas",
    "sarah",
    "charles",
    "karen",
    "zephyrine",
    "octavian",
];
const SURNAMES: &[&str] = &[
    "smith",
    "johnson",
    "williams",
    "brown",
    "jones",
    "garcia",
    "miller",
    "davis",
    "rodriguez",
    "martinez",
    "hernandez",
    "lopez",
    "gonzalez",
    "wilson",
    "anderson",
    "thomas",
    "taylor",
    "moore",
    "jackson",
    "martin",
    "lee",
    "perez",
    "thompson",
    "white",
    "harris",
    "sanchez",
];
const SUBURBS: &[&str] = &[
    "kingston",
    "belconnen",
    "woden",
    "dickson",
    "bruce",
    "turner",
];

/// A synthetic population: `n` people, a third of them with one duplicate whose given name,
/// surname or date of birth has a one-letter typo. Returns `(id, raw fields)`; duplicates have
/// ids `n + original`.
fn population(n: usize, seed: u64) -> Vec<(usize, Vec<(&'static str, String)>)> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::new();
    for person in 0..n {
        let fields = vec![
            ("given_name", GIVEN[rng.below(GIVEN.len())].to_owned()),
            ("surname", SURNAMES[rng.below(SURNAMES.len())].to_owned()),
            (
                "date_of_birth",
                format!(
                    "{}{:02}{:02}",
                    1940 + rng.below(60),
                    1 + rng.below(12),
                    1 + rng.below(28)
                ),
            ),
            ("street_number", (1 + rng.below(200)).to_string()),
            ("suburb", SUBURBS[rng.below(SUBURBS.len())].to_owned()),
            ("postcode", (2600 + rng.below(20)).to_string()),
        ];
        out.push((person, fields));
    }
    for person in (0..n).step_by(3) {
        let mut fields = out[person].1.clone();
        let field = rng.below(3);
        let value = &mut fields[field].1;
        let at = rng.below(value.len() - 1) + 1;
        let replacement = if field == 2 { '1' } else { 'x' };
        value.replace_range(at..=at, &replacement.to_string());
        out.push((n + person, fields));
    }
    out
}

fn records(
    matcher: &Matcher,
    people: &[(usize, Vec<(&'static str, String)>)],
) -> Vec<(usize, Attributes)> {
    people
        .iter()
        .map(|(id, fields)| {
            (
                *id,
                matcher.attributes(fields.iter().map(|(k, v)| (*k, v.as_str()))),
            )
        })
        .collect()
}

/// The default matcher, with fewer random pairs for u so debug-build tests stay quick.
fn matcher() -> Matcher {
    let mut config = MatchingConfig::default();
    config.estimation.u_sample_pairs = 200_000;
    Matcher::new(config).unwrap()
}

#[test]
fn batch_finds_the_synthetic_duplicates() {
    let n = 3_000;
    let people = population(n, 42);
    let records = records(&matcher(), &people);
    let output = link_batch(matcher(), &records);
    let truth: std::collections::BTreeSet<(usize, usize)> =
        (0..n).step_by(3).map(|p| (p, n + p)).collect();
    let found: std::collections::BTreeSet<(usize, usize)> = output
        .matches
        .iter()
        .map(|p| (p.left.min(p.right), p.left.max(p.right)))
        .collect();
    let true_positives = found.intersection(&truth).count() as f64;
    let (precision, recall) = (
        true_positives / found.len() as f64,
        true_positives / truth.len() as f64,
    );
    assert!(
        precision > 0.98 && recall > 0.98,
        "precision {precision}, recall {recall}"
    );
    assert!(output.report.em.converged);
}

#[test]
fn training_is_deterministic() {
    let people = population(1_500, 3);
    let records: Vec<Attributes> = records(&matcher(), &people)
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    let (a, report_a) = train(matcher(), &records);
    let (b, report_b) = train(matcher(), &records);
    assert_eq!(a.params(), b.params());
    assert_eq!(report_a, report_b);
}

#[test]
fn explanations_sum_to_the_weight() {
    let people = population(1_500, 5);
    let records = records(&matcher(), &people);
    let output = link_batch(matcher(), &records);
    assert!(!output.matches.is_empty());
    for pair in output.matches.iter().take(200) {
        let score = &pair.score;
        let sum: f64 = score.prior_weight + score.fields.iter().map(|f| f.weight).sum::<f64>();
        assert!((sum - score.weight).abs() < 1e-9);
        assert!((probability(score.weight) - score.probability).abs() < 1e-12);
        assert!(score.probability >= 0.5);
        // Fields the synthetic records do not have weigh nothing.
        let email = score.fields.iter().find(|f| &*f.field == "email").unwrap();
        assert_eq!((&*email.level, email.weight), (NULL_LABEL, 0.0));
        let a = &records.iter().find(|(id, _)| *id == pair.left).unwrap().1;
        let b = &records.iter().find(|(id, _)| *id == pair.right).unwrap().1;
        assert!((output.model.weight(a, b) - score.weight).abs() < 1e-12);
    }
}

#[test]
fn term_frequency_makes_rare_names_stronger() {
    let people = population(2_000, 11);
    let records: Vec<Attributes> = records(&matcher(), &people)
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    let (model, _) = train(matcher(), &records);
    let m = matcher();
    let pair_with = |given: &str| {
        let raw = [("given_name", given), ("surname", "nobody")];
        (m.attributes(raw), m.attributes(raw))
    };
    // "zephyrine" is as common as any given name of the population (about one in 22); a value
    // never seen counts as seen once, so it is far rarer.
    let (a, b) = pair_with("zephyrine");
    let (c, d) = pair_with("neverseenbefore");
    let common = model.explain(&a, &b);
    let rare = model.explain(&c, &d);
    let given = |s: &Score| {
        s.fields
            .iter()
            .find(|f| &*f.field == "given_name")
            .unwrap()
            .clone()
    };
    assert!(given(&common).term_frequency_adjusted && given(&rare).term_frequency_adjusted);
    assert!(given(&rare).weight > given(&common).weight + 3.0);
    let tf = model.params().fields[0].term_frequencies.as_ref().unwrap();
    let m_exact = model.params().fields[0].m[0];
    let expected = (m_exact / tf.frequency("zephyrine")).log2();
    assert!((given(&common).weight - expected).abs() < 1e-12);
}

#[test]
fn incremental_matching_agrees_with_the_batch() {
    let n = 1_500;
    let people = population(n, 9);
    let m = matcher();
    let records = records(&m, &people);
    let output = link_batch(matcher(), &records);
    let model = output.model;
    let mut index = MemoryIndex::default();
    for (id, attributes) in &records {
        index.upsert(*id, attributes.clone(), m.keys(attributes));
    }
    let mut scratch = Scratch::default();
    let mut incremental = std::collections::BTreeSet::new();
    for (id, attributes) in &records {
        for candidate in match_record(&model, &index, Some(id), attributes, &mut scratch) {
            assert_ne!(candidate.id, *id);
            incremental.insert((candidate.id.min(*id), candidate.id.max(*id)));
        }
    }
    let batch: std::collections::BTreeSet<_> = output
        .matches
        .iter()
        .map(|p| (p.left.min(p.right), p.left.max(p.right)))
        .collect();
    assert_eq!(incremental, batch);
}

#[test]
fn configs_naming_unknown_fields_are_refused() {
    let mut config = MatchingConfig::default();
    config.blocking[1].parts[0].field = "shoe_size".to_owned();
    let error = Matcher::new(config).unwrap_err();
    assert_eq!(error.field, "blocking[1].parts[0].field");
    let parsed: MatchingConfig =
        serde_json::from_str(r#"{"threshold": 0.9, "max_block_size": 50}"#).unwrap();
    assert_eq!(parsed.comparisons, ComparisonConfig::person_defaults());
    assert!(serde_json::from_str::<MatchingConfig>(r#"{"treshold": 0.9}"#).is_err());
}

#[test]
fn reloaded_parameters_score_the_same() {
    let people = population(600, 13);
    let records: Vec<Attributes> = records(&matcher(), &people)
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    let (model, _) = train(matcher(), &records);
    let json = serde_json::to_string(model.params()).unwrap();
    let reloaded = Model::new(matcher(), serde_json::from_str(&json).unwrap()).unwrap();
    for pair in records.windows(2) {
        assert_eq!(
            model.weight(&pair[0], &pair[1]),
            reloaded.weight(&pair[0], &pair[1])
        );
    }
}
