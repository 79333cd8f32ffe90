//! Scoring one profile's predicted value (target < 50 µs): expected purchases over 39 weeks,
//! probability alive, expected spend and a 12-month discounted CLV (twelve BG/NBD expectations,
//! each with a ₂F₁), with the parameters fitted on the CDNOW sample.
//!
//! ```text
//! cargo bench -p tessera-scoring --bench clv
//! ```

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tessera_scoring::clv::{
    BgNbdParams, CustomerSummary, CustomerValueModel, GammaGammaParams, Horizon, WEEKS_PER_MONTH,
};

const MODEL: CustomerValueModel = CustomerValueModel {
    bg_nbd: BgNbdParams {
        r: 0.242_594_7,
        alpha: 4.413_603,
        a: 0.792_922_1,
        b: 2.425_906,
    },
    gamma_gamma: GammaGammaParams {
        p: 6.249_572,
        q: 3.744_225,
        v: 15.443_521,
    },
};

const HORIZON: Horizon = Horizon {
    purchases: 39.0,
    months: 12,
    periods_per_month: WEEKS_PER_MONTH,
    monthly_discount_rate: 0.01,
};

fn predict(c: &mut Criterion) {
    let customers = [
        ("one-time buyer", 0, 0.0, 38.86, 0.0),
        ("paper's customer", 2, 30.43, 38.86, 22.35),
        ("heavy buyer", 40, 76.0, 78.0, 35.0),
    ];
    for (name, frequency, recency, age, monetary_value) in customers {
        let summary = CustomerSummary {
            frequency,
            recency,
            age,
            monetary_value,
        };
        c.bench_function(&format!("predict one profile ({name})"), |b| {
            b.iter(|| MODEL.predict(black_box(&summary), black_box(&HORIZON)))
        });
    }
}

criterion_group!(benches, predict);
criterion_main!(benches);
