//! Latency of incremental probabilistic matching against a large population, in memory: the
//! pure core (`match_record` over a `MemoryIndex`), without the service's database round trips.
//!
//! ```text
//! cargo run -p tessera-identity --release --example match_latency -- [POPULATION] [PROBES]
//! ```
//!
//! Generates POPULATION synthetic people (default 1,000,000; names from a syllable grammar,
//! uniform dates of birth, street numbers, postcodes and suburbs, so blocks have realistic
//! sizes), trains a model on a 50,000-person sample, files everyone in the index, then matches
//! PROBES records (default 10,000: half near-duplicates of indexed people with one typo, half new
//! people) one at a time and prints the latency percentiles and how many duplicates were found.
//!
//! With `DATABASE_URL` set (an empty Postgres database), it measures the service's path
//! instead: the same population becomes profiles of the identity service (one resolved record
//! each) indexed through `Identity::match_profiles`, as the profile service sends their traits;
//! a model trained the same way on the 50,000-person sample (in a schema of its own,
//! `identity_train`, then copied over, so indexing the population matches nothing); then each
//! probe is a new profile matched alone, one `match_profiles` call per profile, which reads its
//! candidates from Postgres and merges at or above the auto-merge probability.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Map, Value};
use tessera_core::Identifier;
use tessera_identity::domain::Record;
use tessera_identity::domain::matching::{
    Attributes, Matcher, MatchingConfig, MemoryIndex, Scratch, match_record, train,
};
use tessera_identity::{Identity, IdentitySettings, MIGRATIONS, SCHEMA};
use tessera_store::{Database, DbSettings};
use time::OffsetDateTime;
use uuid::Uuid;

/// A small deterministic generator (SplitMix64), so every run sees the same population.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, options: &[&'a str]) -> &'a str {
        options[usize::try_from(self.below(options.len() as u64)).unwrap_or(0)]
    }
}

const ONSETS: [&str; 20] = [
    "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br",
    "st", "ch",
];
const VOWELS: [&str; 8] = ["a", "e", "i", "o", "u", "ai", "ou", "ee"];
const CODAS: [&str; 10] = ["", "n", "r", "s", "l", "th", "ck", "m", "nd", "ley"];

/// A name of `syllables` syllables: 20 × 8 × 10 = 1,600 per syllable.
fn name(rng: &mut Rng, syllables: usize) -> String {
    let mut out = String::new();
    for _ in 0..syllables {
        out.push_str(rng.pick(&ONSETS));
        out.push_str(rng.pick(&VOWELS));
        out.push_str(rng.pick(&CODAS));
    }
    out
}

/// One person's raw fields, as (field, value).
fn person(rng: &mut Rng) -> Vec<(&'static str, String)> {
    let given_syllables = 1 + usize::from(rng.below(3) == 0);
    vec![
        ("given_name", name(rng, given_syllables)),
        ("surname", name(rng, 2)),
        (
            "date_of_birth",
            format!(
                "{}{:02}{:02}",
                1930 + rng.below(80),
                1 + rng.below(12),
                1 + rng.below(28)
            ),
        ),
        ("street_number", (1 + rng.below(999)).to_string()),
        ("address_1", format!("{} street", name(rng, 2))),
        ("suburb", name(rng, 2)),
        ("postcode", (1000 + rng.below(9000)).to_string()),
        (
            "state",
            ["nsw", "vic", "qld", "wa", "sa", "tas"][usize::try_from(rng.below(6)).unwrap_or(0)]
                .to_owned(),
        ),
    ]
}

/// `fields` with one typo: two adjacent letters of the surname swapped.
fn typo(mut fields: Vec<(&'static str, String)>) -> Vec<(&'static str, String)> {
    if let Some((_, surname)) = fields.iter_mut().find(|(f, _)| *f == "surname") {
        let mut chars: Vec<char> = surname.chars().collect();
        if chars.len() > 3 {
            chars.swap(1, 2);
        }
        *surname = chars.into_iter().collect();
    }
    fields
}

fn attributes(matcher: &Matcher, fields: &[(&'static str, String)]) -> Attributes {
    matcher.attributes(fields.iter().map(|(f, v)| (*f, v.as_str())))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Prints `what`, then the percentiles of `latencies` (sorted here; at least one).
fn print_latencies(what: &str, latencies: &mut [Duration]) {
    latencies.sort_unstable();
    println!(
        "{what}: p50 {:.3?}, p95 {:.3?}, p99 {:.3?}, max {:.3?}",
        percentile(latencies, 0.50),
        percentile(latencies, 0.95),
        percentile(latencies, 0.99),
        latencies[latencies.len() - 1]
    );
}

/// The service's largest batch (`IdentitySettings::max_batch`).
const BATCH: usize = 5_000;

/// A new profile per person in `people` (one record each, a fresh anonymous id), in order.
async fn profiles(
    identity: &Identity,
    tag: &str,
    people: &[Vec<(&'static str, String)>],
) -> anyhow::Result<Vec<Uuid>> {
    let rules = identity.rules();
    let mut ids = Vec::with_capacity(people.len());
    for (chunk_no, chunk) in people.chunks(BATCH).enumerate() {
        let records = (0..chunk.len())
            .map(|n| {
                let key = format!("{tag}{}", chunk_no * BATCH + n);
                Record::new(
                    &rules.rules,
                    key.clone(),
                    vec![Identifier::new("anonymous_id", key)],
                    OffsetDateTime::now_utc(),
                )
                .map_err(|v| anyhow::anyhow!("invalid record: {v:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        ids.extend(
            identity
                .resolve(records)
                .await?
                .into_iter()
                .map(|r| r.profile_id),
        );
    }
    Ok(ids)
}

/// A person's fields as the traits the profile service sends.
fn traits(fields: &[(&'static str, String)]) -> Map<String, Value> {
    fields
        .iter()
        .map(|(f, v)| ((*f).to_owned(), Value::String(v.clone())))
        .collect()
}

/// Indexes `people` as the profiles `ids`, a batch at a time.
async fn index(
    identity: &Identity,
    ids: &[Uuid],
    people: &[Vec<(&'static str, String)>],
) -> anyhow::Result<()> {
    for (ids, people) in ids.chunks(BATCH).zip(people.chunks(BATCH)) {
        let batch = ids
            .iter()
            .copied()
            .zip(people.iter().map(|p| traits(p)))
            .collect();
        identity.match_profiles(batch).await?;
    }
    Ok(())
}

async fn open(url: &str, schema: &str) -> anyhow::Result<Identity> {
    let settings = DbSettings {
        max_connections: 4,
        ..DbSettings::default()
    };
    let db = Database::connect(url, schema, &settings).await?;
    db.migrate(MIGRATIONS).await?;
    Ok(Identity::new(db, IdentitySettings::default()).await?)
}

/// The service's path: see the module's documentation.
async fn service(
    url: &str,
    people: &[Vec<(&'static str, String)>],
    probes: usize,
    rng: &mut Rng,
) -> anyhow::Result<()> {
    let population = people.len();
    anyhow::ensure!(
        SCHEMA == "identity",
        "the statements below name the schema identity"
    );
    let admin = sqlx::PgPool::connect(url).await?;
    sqlx::query("DROP SCHEMA IF EXISTS identity_train CASCADE")
        .execute(&admin)
        .await?;

    let started = Instant::now();
    // The statements here name the schemas (sqlx takes only static SQL).
    let trainer = open(url, "identity_train").await?;
    let sample_size = population.min(50_000);
    let mut sample: Vec<Vec<(&'static str, String)>> = people[..sample_size].to_vec();
    sample.extend(
        people
            .iter()
            .take(sample_size)
            .step_by(50)
            .map(|p| typo(p.clone())),
    );
    let ids = profiles(&trainer, "t", &sample).await?;
    index(&trainer, &ids, &sample).await?;
    let summary = trainer.train_match_model().await?;
    println!(
        "trained on {} profiles in {:.1?}: {} candidate pairs, EM {} iterations (converged {}), λ = {:.3e}",
        summary.profiles,
        started.elapsed(),
        summary.candidate_pairs,
        summary.iterations,
        summary.converged,
        summary.lambda
    );

    let identity = open(url, SCHEMA).await?;
    let started = Instant::now();
    let ids = profiles(&identity, "p", people).await?;
    println!("made {population} profiles in {:.1?}", started.elapsed());
    let started = Instant::now();
    index(&identity, &ids, people).await?;
    println!("indexed {population} profiles in {:.1?}", started.elapsed());
    sqlx::query("INSERT INTO identity.match_models SELECT * FROM identity_train.match_models")
        .execute(&admin)
        .await
        .context("copying the trained model")?;
    sqlx::query("DROP SCHEMA identity_train CASCADE")
        .execute(&admin)
        .await?;
    sqlx::query("ANALYZE identity.match_keys, identity.match_attributes")
        .execute(&admin)
        .await?;

    let mut latencies = Vec::with_capacity(probes);
    let (mut duplicates, mut found, mut false_matches, mut suggestions) = (0, 0, 0, 0);
    for n in 0..probes {
        let (fields, original) = if n % 2 == 0 {
            let original = usize::try_from(rng.below(population as u64)).unwrap_or(0);
            (typo(people[original].clone()), Some(original))
        } else {
            (person(rng), None)
        };
        let probe = profiles(&identity, &format!("q{n}-"), std::slice::from_ref(&fields)).await?;
        let started = Instant::now();
        let outcome = identity
            .match_profiles(vec![(probe[0], traits(&fields))])
            .await?;
        latencies.push(started.elapsed());
        suggestions += outcome.suggestions;
        match original {
            Some(original) => {
                duplicates += 1;
                if outcome.merges.iter().any(|m| {
                    m.merged_profile_id == probe[0] && m.surviving_profile_id == ids[original]
                }) {
                    found += 1;
                }
            }
            None if !outcome.merges.is_empty() => false_matches += 1,
            None => {}
        }
    }
    print_latencies(
        &format!("matched {probes} new profiles one call each against {population}"),
        &mut latencies,
    );
    println!(
        "near-duplicates merged into their original: {found} of {duplicates}; new people merged with someone: {false_matches} of {}; suggestions stored: {suggestions}",
        probes - duplicates
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let population: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let probes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let mut rng = Rng(0x5eed);
        let started = Instant::now();
        let people: Vec<Vec<(&'static str, String)>> =
            (0..population).map(|_| person(&mut rng)).collect();
        println!("generated {population} people in {:.1?}", started.elapsed());
        return tokio::runtime::Runtime::new()?.block_on(service(&url, &people, probes, &mut rng));
    }
    let matcher = match Matcher::new(MatchingConfig::default()) {
        Ok(matcher) => matcher,
        Err(e) => anyhow::bail!("invalid default config: {e}"),
    };

    let started = Instant::now();
    let mut rng = Rng(0x5eed);
    let people: Vec<Vec<(&'static str, String)>> =
        (0..population).map(|_| person(&mut rng)).collect();
    let records: Vec<Attributes> = people.iter().map(|p| attributes(&matcher, p)).collect();
    println!("generated {population} people in {:.1?}", started.elapsed());

    // The sample is the first 50,000 plus a typo'd copy of 1 in 50 of them, so EM sees matches.
    let started = Instant::now();
    let sample_size = population.min(50_000);
    let mut sample: Vec<Attributes> = records[..sample_size].to_vec();
    for p in people.iter().take(sample_size).step_by(50) {
        sample.push(attributes(&matcher, &typo(p.clone())));
    }
    let (model, report) = train(matcher.clone(), &sample);
    println!(
        "trained on {} records in {:.1?}: {} candidate pairs, EM {} iterations (converged {}), λ = {:.3e}",
        sample.len(),
        started.elapsed(),
        report.blocking.candidate_pairs,
        report.em.iterations,
        report.em.converged,
        model.params().lambda
    );

    let started = Instant::now();
    let mut index: MemoryIndex<u32> = MemoryIndex::default();
    for (id, record) in records.into_iter().enumerate() {
        let keys = matcher.keys(&record);
        index.upsert(u32::try_from(id).unwrap_or(u32::MAX), record, keys);
    }
    println!("indexed {population} people in {:.1?}", started.elapsed());

    let mut scratch = Scratch::default();
    let mut latencies = Vec::with_capacity(probes);
    let (mut duplicates, mut found, mut false_matches) = (0, 0, 0);
    for n in 0..probes {
        let (fields, original) = if n % 2 == 0 {
            let original = usize::try_from(rng.below(population as u64)).unwrap_or(0);
            (typo(people[original].clone()), Some(original))
        } else {
            (person(&mut rng), None)
        };
        let record = attributes(&matcher, &fields);
        let started = Instant::now();
        let candidates = match_record(&model, &index, None, &record, &mut scratch);
        latencies.push(started.elapsed());
        let best = candidates
            .iter()
            .find(|c| c.score.probability >= 0.99)
            .map(|c| c.id as usize);
        match original {
            Some(original) => {
                duplicates += 1;
                if best == Some(original) {
                    found += 1;
                }
            }
            None if best.is_some() => false_matches += 1,
            None => {}
        }
    }
    print_latencies(
        &format!("matched {probes} records one at a time against {population}"),
        &mut latencies,
    );
    println!(
        "near-duplicates found at p >= 0.99: {found} of {duplicates}; new people matched to someone: {false_matches} of {}",
        probes - duplicates
    );
    Ok(())
}
