//! RFM: recency, frequency and monetary quintile scores over the population, and the named
//! segment they put a customer in. Pure: no I/O.
//!
//! - **Inputs** of a customer at a time: recency = days from the last purchase day to that
//!   time's UTC day; frequency = repeat purchases (purchase days after the first); monetary =
//!   mean revenue per purchase day, the first included.
//! - **Boundaries**: the 20th, 40th, 60th and 80th percentiles of each input over the
//!   population (linear interpolation between order statistics, as numpy's default), computed
//!   when a model is fitted and stored with it.
//! - **Scores** 1 to 5: R = 5 at or below the first recency boundary, one less above each
//!   boundary (recent is good); F and M = 1 at or below the first boundary, one more above
//!   each (more is good). Tied values share a score, so a population where most customers
//!   bought once puts them all in F = 1 and spreads the rest over the upper scores.
//! - **Segment** from R and FM = ⌈(F + M) / 2⌉ (see [`Segment::of`]).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::domain::{Factor, PurchaseHistory, Score};

/// The name of the RFM score.
pub const RFM: &str = "rfm";
/// The version of the RFM formulas; the stored model's label follows it after `@`.
pub const RFM_MODEL_VERSION: &str = "rfm-v1";

const SECONDS_PER_DAY: i64 = 86_400;
const QUANTILES: [f64; 4] = [0.2, 0.4, 0.6, 0.8];

/// One customer's RFM inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RfmInputs {
    /// Days from the last purchase day to the scoring day.
    pub recency_days: f64,
    /// Repeat purchases: purchase days after the first.
    pub frequency: f64,
    /// Mean revenue per purchase day, the first included.
    pub monetary: f64,
}

impl RfmInputs {
    /// The inputs of a customer with purchases `p` at `as_of` (a purchase after `as_of` counts
    /// as on its day).
    pub fn of(p: &PurchaseHistory, as_of: OffsetDateTime) -> Self {
        let today = as_of.unix_timestamp().div_euclid(SECONDS_PER_DAY);
        let days = p.days.max(1);
        #[allow(clippy::cast_precision_loss)]
        Self {
            recency_days: (today - p.last_day).max(0) as f64,
            frequency: (days - 1) as f64,
            monetary: p.total_revenue() / days as f64,
        }
    }
}

/// The quintile boundaries of a population, ascending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RfmBoundaries {
    /// Of the days since the last purchase.
    pub recency_days: [f64; 4],
    /// Of the repeat purchases.
    pub frequency: [f64; 4],
    /// Of the mean revenue per purchase day.
    pub monetary: [f64; 4],
}

/// A customer's RFM scores, each 1 to 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RfmScores {
    /// Recency: 5 for the most recent buyers.
    pub r: u8,
    /// Frequency: 5 for the most frequent buyers.
    pub f: u8,
    /// Monetary: 5 for the biggest spenders per purchase.
    pub m: u8,
}

impl RfmScores {
    /// The combined code, for example `545`.
    pub fn code(self) -> String {
        format!("{}{}{}", self.r, self.f, self.m)
    }

    /// The segment these scores put a customer in.
    pub fn segment(self) -> Segment {
        Segment::of(self.r, (self.f + self.m).div_ceil(2))
    }
}

impl RfmBoundaries {
    /// The boundaries over a population's inputs; `None` without any customer or with a
    /// non-finite input.
    pub fn of_population(inputs: &[RfmInputs]) -> Option<Self> {
        let column = |pick: fn(&RfmInputs) -> f64| -> Option<[f64; 4]> {
            let mut values: Vec<f64> = inputs.iter().map(pick).collect();
            if values.is_empty() || values.iter().any(|x| !x.is_finite()) {
                return None;
            }
            values.sort_by(f64::total_cmp);
            Some(QUANTILES.map(|q| quantile(&values, q)))
        };
        Some(Self {
            recency_days: column(|i| i.recency_days)?,
            frequency: column(|i| i.frequency)?,
            monetary: column(|i| i.monetary)?,
        })
    }

    /// Whether the boundaries are usable: finite and ascending.
    pub fn is_valid(&self) -> bool {
        [self.recency_days, self.frequency, self.monetary]
            .iter()
            .all(|b| b.iter().all(|x| x.is_finite()) && b.windows(2).all(|w| w[0] <= w[1]))
    }

    /// The scores of a customer with these inputs.
    pub fn scores(&self, x: &RfmInputs) -> RfmScores {
        RfmScores {
            r: 5 - above(&self.recency_days, x.recency_days),
            f: 1 + above(&self.frequency, x.frequency),
            m: 1 + above(&self.monetary, x.monetary),
        }
    }

    /// The `rfm` score of a customer with purchases `p` at `as_of`, by the boundaries of the
    /// model labelled `label`.
    pub fn score(&self, p: &PurchaseHistory, as_of: OffsetDateTime, label: &str) -> Score {
        let inputs = RfmInputs::of(p, as_of);
        let scores = self.scores(&inputs);
        let segment = scores.segment();
        let describe = |b: &[f64; 4]| {
            b.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let factor = |name: &str, value: f64, description: String| Factor {
            name: name.to_owned(),
            value,
            description,
        };
        Score {
            name: RFM.to_owned(),
            value: 100.0 * f64::from(scores.r + scores.f + scores.m - 3) / 12.0,
            computed_at: as_of,
            model_version: format!("{RFM_MODEL_VERSION}@{label}"),
            factors: vec![
                factor(
                    "segment",
                    f64::from(segment.rank()),
                    format!("segment: {}", segment.as_str()),
                ),
                factor(
                    "code",
                    f64::from(scores.r) * 100.0 + f64::from(scores.f) * 10.0 + f64::from(scores.m),
                    format!("RFM code {}", scores.code()),
                ),
                factor(
                    "recency_score",
                    f64::from(scores.r),
                    format!(
                        "R from 1 to 5: {} days since the last purchase against the population's \
                         quintile boundaries [{}] (fewer is better)",
                        inputs.recency_days,
                        describe(&self.recency_days)
                    ),
                ),
                factor(
                    "frequency_score",
                    f64::from(scores.f),
                    format!(
                        "F from 1 to 5: {} repeat purchases against the quintile boundaries [{}]",
                        inputs.frequency,
                        describe(&self.frequency)
                    ),
                ),
                factor(
                    "monetary_score",
                    f64::from(scores.m),
                    format!(
                        "M from 1 to 5: {:.2} per purchase day against the quintile boundaries \
                         [{}]",
                        inputs.monetary,
                        describe(&self.monetary)
                    ),
                ),
                factor(
                    "recency_days",
                    inputs.recency_days,
                    "days from the last purchase to the scoring time".to_owned(),
                ),
                factor(
                    "frequency",
                    inputs.frequency,
                    "repeat purchases: purchase days after the first".to_owned(),
                ),
                factor(
                    "monetary",
                    finite(inputs.monetary),
                    "mean revenue per purchase day, the first included".to_owned(),
                ),
            ],
        }
    }
}

/// Stored boundaries with the label of the model they belong to.
#[derive(Debug, Clone, PartialEq)]
pub struct RfmModel {
    /// The population's boundaries.
    pub boundaries: RfmBoundaries,
    /// The stored model's label (`m<version>`), carried by the scores.
    pub label: String,
}

impl RfmModel {
    /// The `rfm` score of a customer with purchases `p` at `as_of`.
    pub fn score(&self, p: &PurchaseHistory, as_of: OffsetDateTime) -> Score {
        self.boundaries.score(p, as_of, &self.label)
    }
}

/// How many of `boundaries` `x` is above (0 to 4).
fn above(boundaries: &[f64; 4], x: f64) -> u8 {
    // At most 4: the cast cannot truncate.
    #[allow(clippy::cast_possible_truncation)]
    let n = boundaries.iter().filter(|b| x > **b).count() as u8;
    n
}

/// The `q` quantile of sorted, non-empty `values`, interpolating linearly between the order
/// statistics at `q × (n − 1)` (numpy's default, "type 7").
fn quantile(values: &[f64], q: f64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let position = q * (values.len() - 1) as f64;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let below = position.floor() as usize;
    let above = (below + 1).min(values.len() - 1);
    let weight = position - position.floor();
    values[below] + (values[above] - values[below]) * weight
}

fn finite(x: f64) -> f64 {
    if x.is_finite() { x } else { 0.0 }
}

/// The named RFM segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// Bought recently, often, and spend the most.
    Champions,
    /// Buy regularly and spend well; not necessarily the most recent.
    LoyalCustomers,
    /// Recent customers with average frequency and spend.
    PotentialLoyalists,
    /// Bought most recently, once or rarely, for little.
    NewCustomers,
    /// Recent, but have not bought much or often.
    Promising,
    /// Middling recency, frequency and spend.
    NeedAttention,
    /// Slipping away after a little buying.
    AboutToSleep,
    /// Bought often and spent well, but long ago.
    AtRisk,
    /// The best customers of old, gone quiet.
    CantLoseThem,
    /// Long ago, rarely, little.
    Hibernating,
    /// The longest ago, the least, the lowest.
    Lost,
}

impl Segment {
    /// The segment of recency `r` and combined frequency-monetary `fm` (each 1 to 5):
    ///
    /// | R \ FM | 1 | 2 | 3 | 4 | 5 |
    /// | --- | --- | --- | --- | --- | --- |
    /// | 5 | New Customers | Potential Loyalists | Potential Loyalists | Champions | Champions |
    /// | 4 | Promising | Potential Loyalists | Potential Loyalists | Loyal Customers | Loyal Customers |
    /// | 3 | About to Sleep | About to Sleep | Need Attention | Loyal Customers | Loyal Customers |
    /// | 2 | Hibernating | Hibernating | At Risk | At Risk | Can't Lose Them |
    /// | 1 | Lost | Hibernating | At Risk | At Risk | Can't Lose Them |
    pub fn of(r: u8, fm: u8) -> Self {
        match r {
            5.. => match fm {
                4.. => Self::Champions,
                2..=3 => Self::PotentialLoyalists,
                _ => Self::NewCustomers,
            },
            4 => match fm {
                4.. => Self::LoyalCustomers,
                2..=3 => Self::PotentialLoyalists,
                _ => Self::Promising,
            },
            3 => match fm {
                4.. => Self::LoyalCustomers,
                3 => Self::NeedAttention,
                _ => Self::AboutToSleep,
            },
            2 => match fm {
                5.. => Self::CantLoseThem,
                3..=4 => Self::AtRisk,
                _ => Self::Hibernating,
            },
            _ => match fm {
                5.. => Self::CantLoseThem,
                3..=4 => Self::AtRisk,
                2 => Self::Hibernating,
                _ => Self::Lost,
            },
        }
    }

    /// The segment's name, as shown to people.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Champions => "Champions",
            Self::LoyalCustomers => "Loyal Customers",
            Self::PotentialLoyalists => "Potential Loyalists",
            Self::NewCustomers => "New Customers",
            Self::Promising => "Promising",
            Self::NeedAttention => "Need Attention",
            Self::AboutToSleep => "About to Sleep",
            Self::AtRisk => "At Risk",
            Self::CantLoseThem => "Can't Lose Them",
            Self::Hibernating => "Hibernating",
            Self::Lost => "Lost",
        }
    }

    /// The segment's rank, 1 (Champions) to 11 (Lost): the `segment` factor's value.
    pub fn rank(self) -> u8 {
        match self {
            Self::Champions => 1,
            Self::LoyalCustomers => 2,
            Self::PotentialLoyalists => 3,
            Self::NewCustomers => 4,
            Self::Promising => 5,
            Self::NeedAttention => 6,
            Self::AboutToSleep => 7,
            Self::AtRisk => 8,
            Self::CantLoseThem => 9,
            Self::Hibernating => 10,
            Self::Lost => 11,
        }
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let values: Vec<f64> = (1..=11).map(f64::from).collect();
        // numpy.percentile(range(1, 12), [20, 40, 60, 80]) = [3, 5, 7, 9]
        assert_eq!(
            QUANTILES.map(|q| quantile(&values, q)),
            [3.0, 5.0, 7.0, 9.0]
        );
        // numpy.percentile([0, 10], 20) = 2
        assert_eq!(quantile(&[0.0, 10.0], 0.2), 2.0);
        assert_eq!(quantile(&[4.0], 0.8), 4.0);
    }

    #[test]
    fn every_cell_of_the_grid_has_the_documented_segment() {
        let grid = [
            // FM 1..5 for R = 5, 4, 3, 2, 1
            [
                "New Customers",
                "Potential Loyalists",
                "Potential Loyalists",
                "Champions",
                "Champions",
            ],
            [
                "Promising",
                "Potential Loyalists",
                "Potential Loyalists",
                "Loyal Customers",
                "Loyal Customers",
            ],
            [
                "About to Sleep",
                "About to Sleep",
                "Need Attention",
                "Loyal Customers",
                "Loyal Customers",
            ],
            [
                "Hibernating",
                "Hibernating",
                "At Risk",
                "At Risk",
                "Can't Lose Them",
            ],
            [
                "Lost",
                "Hibernating",
                "At Risk",
                "At Risk",
                "Can't Lose Them",
            ],
        ];
        for (row, r) in grid.iter().zip([5u8, 4, 3, 2, 1]) {
            for (name, fm) in row.iter().zip(1u8..=5) {
                assert_eq!(Segment::of(r, fm).as_str(), *name, "R {r} FM {fm}");
            }
        }
        // FM rounds (F + M) / 2 up.
        let s = |r, f, m| RfmScores { r, f, m };
        assert_eq!(s(5, 4, 3).segment(), Segment::Champions);
        assert_eq!(s(5, 3, 3).segment(), Segment::PotentialLoyalists);
        assert_eq!(s(1, 1, 2).segment(), Segment::Hibernating);
        assert_eq!(s(1, 1, 1).segment(), Segment::Lost);
        assert_eq!(s(5, 4, 5).code(), "545");
    }

    #[test]
    fn scores_of_a_hand_checked_population() {
        // Ten customers scored on 2026-01-11 (day 20,464): the last purchase 1..10 days ago,
        // 0..9 repeat purchases, 10..100 per purchase day.
        let as_of = datetime!(2026-01-11 12:00 UTC);
        let today = as_of.unix_timestamp() / 86_400;
        let history = |i: i64| PurchaseHistory {
            first_day: today - 400,
            last_day: today - i,
            days: i,
            repeat_revenue: 0.0,
            revenue: 10.0 * i as f64 * i as f64,
        };
        let inputs: Vec<RfmInputs> = (1..=10)
            .map(|i| RfmInputs::of(&history(i), as_of))
            .collect();
        assert_eq!(
            inputs[2],
            RfmInputs {
                recency_days: 3.0,
                frequency: 2.0,
                monetary: 30.0
            }
        );
        let b = RfmBoundaries::of_population(&inputs).unwrap();
        // numpy.percentile(range(1, 11), [20, 40, 60, 80]) = [2.8, 4.6, 6.4, 8.2]
        let close = |got: [f64; 4], want: [f64; 4]| {
            assert!(
                got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-9),
                "{got:?} vs {want:?}"
            );
        };
        close(b.recency_days, [2.8, 4.6, 6.4, 8.2]);
        close(b.frequency, [1.8, 3.6, 5.4, 7.2]);
        close(b.monetary, [28.0, 46.0, 64.0, 82.0]);
        assert!(b.is_valid());
        let scored: Vec<String> = inputs.iter().map(|x| b.scores(x).code()).collect();
        // Customer i bought i days ago (recent: good), i - 1 times again (more: good), and
        // 10·i per day: recency falls as frequency and spend rise.
        assert_eq!(
            scored,
            [
                "511", "511", "422", "422", "333", "333", "244", "244", "155", "155"
            ]
        );

        let score = b.score(&history(1), as_of, "m7");
        assert_eq!(score.name, RFM);
        assert_eq!(score.model_version, "rfm-v1@m7");
        assert_eq!(score.value, 100.0 * 4.0 / 12.0);
        let factor = |name: &str| score.factor(name).unwrap();
        assert_eq!(factor("segment").description, "segment: New Customers");
        assert_eq!(factor("code").value, 511.0);
        assert_eq!(factor("recency_score").value, 5.0);
        assert_eq!(factor("recency_days").value, 1.0);
        assert!(
            factor("recency_score")
                .description
                .contains("[2.80, 4.60, 6.40, 8.20]")
        );
        let champion = PurchaseHistory {
            first_day: today - 400,
            last_day: today,
            days: 20,
            repeat_revenue: 0.0,
            revenue: 20.0 * 500.0,
        };
        let score = b.score(&champion, as_of, "m7");
        assert_eq!(score.factor("code").unwrap().description, "RFM code 555");
        assert_eq!(
            score.factor("segment").unwrap().description,
            "segment: Champions"
        );
        assert_eq!(score.value, 100.0);
        let lapsed = PurchaseHistory {
            last_day: today - 300,
            ..champion
        };
        let score = b.score(&lapsed, as_of, "m7");
        assert_eq!(
            score.factor("segment").unwrap().description,
            "segment: Can't Lose Them"
        );
    }

    #[test]
    fn no_boundaries_without_a_population() {
        assert_eq!(RfmBoundaries::of_population(&[]), None);
        let bad = RfmInputs {
            recency_days: 1.0,
            frequency: 0.0,
            monetary: f64::NAN,
        };
        assert_eq!(RfmBoundaries::of_population(&[bad]), None);
    }
}
