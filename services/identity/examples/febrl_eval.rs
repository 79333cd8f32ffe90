//! Evaluates probabilistic matching on a FEBRL-style data set:
//!
//! ```text
//! cargo run -p tessera-identity --release --example febrl_eval -- RECORDS.csv LINKS.csv [--verbose] [--params]
//! ```
//!
//! `--params` also prints the trained parameters as JSON, every float exactly (shortest
//! round-trip form), so two builds can be checked to train the same model bit for bit.
//!
//! RECORDS.csv has a header with `rec_id` and the person fields (`given_name`, `surname`,
//! `street_number`, `address_1`, `address_2`, `suburb`, `postcode`, `state`, `date_of_birth`;
//! other columns such as `soc_sec_id` are ignored). LINKS.csv (`rec_id_1,rec_id_2`) holds the
//! true links; training never sees them, they only grade the result. Values must not contain
//! commas or quotes (FEBRL's do not).
#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use anyhow::{Context, bail};
use tessera_identity::domain::matching::{Matcher, MatchingConfig, link_batch};

const FIELDS: [&str; 9] = [
    "given_name",
    "surname",
    "street_number",
    "address_1",
    "address_2",
    "suburb",
    "postcode",
    "state",
    "date_of_birth",
];

fn read_csv(path: &str) -> anyhow::Result<(Vec<String>, Vec<Vec<String>>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .context("empty file")?
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect();
    let rows = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect();
    Ok((header, rows))
}

type Pair = (String, String);

fn ordered(a: &str, b: &str) -> Pair {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

/// Precision, recall and F1 of `found` against `truth`.
fn grade(found: &BTreeSet<Pair>, truth: &BTreeSet<Pair>) -> (f64, f64, f64, usize) {
    let true_positives = found.intersection(truth).count();
    let precision = true_positives as f64 / found.len().max(1) as f64;
    let recall = true_positives as f64 / truth.len().max(1) as f64;
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    (precision, recall, f1, true_positives)
}

/// Every pair within the connected components of `pairs`.
fn cluster_pairs(pairs: &BTreeSet<Pair>) -> BTreeSet<Pair> {
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (a, b) in pairs {
        for id in [a, b] {
            let next = index.len();
            index.entry(id.as_str()).or_insert(next);
        }
    }
    let mut parent: Vec<usize> = (0..index.len()).collect();
    for (a, b) in pairs {
        let (ra, rb) = (
            find(&mut parent, index[a.as_str()]),
            find(&mut parent, index[b.as_str()]),
        );
        parent[ra.max(rb)] = ra.min(rb);
    }
    let mut clusters: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for (id, &i) in &index {
        clusters.entry(find(&mut parent, i)).or_default().push(id);
    }
    let mut out = BTreeSet::new();
    for members in clusters.values() {
        for (n, a) in members.iter().enumerate() {
            for b in &members[n + 1..] {
                out.insert(ordered(a, b));
            }
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let verbose = args.iter().any(|a| a == "--verbose");
    let print_params = args.iter().any(|a| a == "--params");
    let paths: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let [records_path, links_path] = paths.as_slice() else {
        bail!("usage: febrl_eval RECORDS.csv LINKS.csv [--verbose] [--params]");
    };

    let (header, rows) = read_csv(records_path)?;
    let column = |name: &str| header.iter().position(|h| h == name);
    let id_column = column("rec_id").context("no rec_id column")?;
    let columns: Vec<(&str, usize)> = FIELDS
        .iter()
        .filter_map(|f| column(f).map(|c| (*f, c)))
        .collect();
    let matcher = Matcher::new(MatchingConfig::default())?;
    let started = Instant::now();
    let records: Vec<(String, _)> = rows
        .iter()
        .map(|row| {
            let raw = columns
                .iter()
                .map(|&(field, c)| (field, row.get(c).map_or("", String::as_str)));
            (row[id_column].clone(), matcher.attributes(raw))
        })
        .collect();
    let normalized = started.elapsed();

    let started = Instant::now();
    let output = link_batch(matcher, &records);
    let batch = started.elapsed();

    let (_, link_rows) = read_csv(links_path)?;
    let truth: BTreeSet<Pair> = link_rows
        .iter()
        .filter(|r| r.len() >= 2)
        .map(|r| ordered(&r[0], &r[1]))
        .collect();
    let found: BTreeSet<Pair> = output
        .matches
        .iter()
        .map(|p| ordered(&p.left, &p.right))
        .collect();
    let clustered = cluster_pairs(&found);

    let report = &output.report;
    let params = output.model.params();
    println!("records              {}", records.len());
    println!("true links           {}", truth.len());
    println!(
        "candidate pairs      {} ({} blocks, {} oversized skipped)",
        report.blocking.candidate_pairs, report.blocking.blocks, report.blocking.oversized_blocks
    );
    let blocked_truth = {
        let ids: HashMap<&str, usize> = records
            .iter()
            .enumerate()
            .map(|(n, (id, _))| (id.as_str(), n))
            .collect();
        let model = &output.model;
        let keys: Vec<_> = records
            .iter()
            .map(|(_, a)| model.matcher().keys(a))
            .collect();
        truth
            .iter()
            .filter(|(a, b)| {
                let (Some(&i), Some(&j)) = (ids.get(a.as_str()), ids.get(b.as_str())) else {
                    return false;
                };
                keys[i].iter().any(|k| keys[j].contains(k))
            })
            .count()
    };
    println!(
        "true links blocked   {blocked_truth} ({:.4} of all, before the block-size cap)",
        blocked_truth as f64 / truth.len().max(1) as f64
    );
    println!(
        "em                   {} iterations, converged {}, λ = {:.6}, {} patterns, u from {} random pairs",
        report.em.iterations,
        report.em.converged,
        params.lambda,
        report.em.patterns,
        report.u_pairs
    );
    println!("timings              normalize {normalized:.2?}, train + score {batch:.2?}");
    for (label, set) in [("pairs", &found), ("clusters", &clustered)] {
        let (precision, recall, f1, tp) = grade(set, &truth);
        println!(
            "{label:<20} predicted {:>6}  tp {tp:>6}  precision {precision:.4}  recall {recall:.4}  F1 {f1:.4}",
            set.len()
        );
    }
    if print_params {
        println!("params               {}", serde_json::to_string(params)?);
    }
    if verbose {
        for field in &params.fields {
            let m: Vec<String> = field.m.iter().map(|p| format!("{p:.4}")).collect();
            let u: Vec<String> = field.u.iter().map(|p| format!("{p:.6}")).collect();
            println!(
                "  {:<14} m [{}]  u [{}]",
                field.field,
                m.join(" "),
                u.join(" ")
            );
        }
        let by_id: HashMap<&str, &(String, _)> =
            records.iter().map(|r| (r.0.as_str(), r)).collect();
        let scores: HashMap<Pair, f64> = output
            .matches
            .iter()
            .map(|p| (ordered(&p.left, &p.right), p.score.weight))
            .collect();
        for (a, b) in found.difference(&truth).take(15) {
            println!(
                "  false positive {a} {b} weight {:.2}",
                scores[&(a.clone(), b.clone())]
            );
        }
        for (a, b) in truth.difference(&found).take(15) {
            let (Some(x), Some(y)) = (by_id.get(a.as_str()), by_id.get(b.as_str())) else {
                continue;
            };
            let score = output.model.explain(&x.1, &y.1);
            let fields: Vec<String> = score
                .fields
                .iter()
                .filter(|f| &*f.level != "null" || f.weight != 0.0)
                .map(|f| format!("{}={}:{:.1}", f.field, f.level, f.weight))
                .collect();
            println!(
                "  missed {a} {b} weight {:.2} prior {:.2} {}",
                score.weight,
                score.prior_weight,
                fields.join(" ")
            );
        }
    }
    Ok(())
}
