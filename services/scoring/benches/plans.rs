//! Scoring one profile with the ready plans (target < 50 µs): engagement, then ICP fit B2B
//! (12 rules), ICP fit B2C (8) and the lead score (8), over a B2B lead with traits, an account,
//! computed traits and audiences.
//!
//! ```text
//! cargo bench -p tessera-scoring --bench plans
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use tessera_core::activity;
use tessera_scoring::domain::{AccountFacts, ProfileFacts, ValueModels, score_profile};
use tessera_scoring::{Plans, ScoringSettings};
use time::macros::datetime;

fn score(c: &mut Criterion) {
    #[derive(serde::Deserialize)]
    struct File {
        scoring: ScoringSettings,
    }
    let file: File = toml::from_str(include_str!("../plans/ready-plans.toml")).unwrap();
    let plans = Plans::compile(file.scoring.plans).unwrap();
    let now = datetime!(2026-06-01 12:00:00 UTC);
    let h = activity::DEFAULT_HALF_LIFE_SECONDS;
    let map = |v: serde_json::Value| -> BTreeMap<String, serde_json::Value> {
        v.as_object().unwrap().clone().into_iter().collect()
    };
    let facts = ProfileFacts {
        profile_id: "p1".to_owned(),
        event_count: 40,
        last_seen: Some(now),
        activity_log2: Some(activity::add_event(None, now, h)),
        activity_half_life_seconds: h,
        traits: map(json!({
            "email": "ann@bigco.com", "name": "Ann", "plan": "pro", "country": "DE",
            "industry": "software", "employees": 800, "role": "champion",
            "technologies": ["dbt", "snowflake", "looker"], "age": 38, "newsletter": true,
        })),
        computed: map(json!({"order_count": 4, "demo_requests": 1, "lifetime_revenue": 1200})),
        audiences: BTreeSet::from(["pricing_page_visitors".to_owned(), "buyers".to_owned()]),
        accounts: vec![AccountFacts {
            account_id: "bigco".to_owned(),
            role: "decision maker".to_owned(),
            title: "VP Data".to_owned(),
            traits: map(json!({"industry": "software", "employees": 800, "annual_revenue": 5e7})),
        }],
        purchases: None,
        activity_classes: Vec::new(),
    };
    c.bench_function("score one profile with the ready plans", |b| {
        b.iter(|| score_profile(black_box(&facts), now, &plans, &ValueModels::default()))
    });
}

criterion_group!(benches, score);
criterion_main!(benches);
