//! The scoring math, free of gRPC: the engagement score and the factors that explain it.
//!
//! Engagement saturates with decayed activity: `100 · (1 − e^(−raw / 5))`, where `raw` is the
//! profile's event count decayed by recency (see [`tessera_core::activity`]). One event just now
//! scores about 18, five recent events about 63, and a profile that goes quiet loses half its
//! `raw` every half-life.
//!
//! The scores of declared plans ([`crate::plans`]) follow engagement, in declaration order.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use tessera_core::activity;
use time::OffsetDateTime;

use crate::plans::Plans;

/// The name of the engagement score.
pub const ENGAGEMENT: &str = "engagement";
/// The model version of the engagement score; changes whenever its formula does.
pub const ENGAGEMENT_MODEL_VERSION: &str = "engagement-v1";
/// The decayed activity at which engagement reaches `1 − 1/e` (about 63) of its maximum.
pub const ENGAGEMENT_SATURATION: f64 = 5.0;

const SECONDS_PER_DAY: f64 = 86_400.0;

/// What scoring knows about one profile.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProfileFacts {
    /// The profile id.
    pub profile_id: String,
    /// How many events the profile has.
    pub event_count: i64,
    /// The time of the latest event, when there was one.
    pub last_seen: Option<OffsetDateTime>,
    /// The stored decayed activity (see [`tessera_core::activity`]); `None` without events.
    pub activity_log2: Option<f64>,
    /// The half-life `activity_log2` was accumulated with, in seconds; 0 means
    /// [`activity::DEFAULT_HALF_LIFE_SECONDS`].
    pub activity_half_life_seconds: f64,
    /// The profile's traits by name.
    pub traits: BTreeMap<String, Value>,
    /// The declared computed traits' values by name, as evaluated by the caller.
    pub computed: BTreeMap<String, Value>,
    /// The audiences the profile belongs to.
    pub audiences: BTreeSet<String>,
    /// The accounts the person belongs to.
    pub accounts: Vec<AccountFacts>,
    /// The person's purchases by day, when they bought anything.
    pub purchases: Option<PurchaseHistory>,
    /// The activity by event type, when the profile service declares event types with their
    /// own half-life and weight; engagement then reads these instead of `activity_log2`.
    pub activity_classes: Vec<ActivityClass>,
}

/// One event type's decayed activity (see [`tessera_core::activity`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ActivityClass {
    /// The event type, or `*` for every other event.
    pub event: String,
    /// The stored decayed activity.
    pub log2: f64,
    /// The half-life it was accumulated with, in seconds (positive).
    pub half_life_seconds: f64,
    /// How much one event just now weighs.
    pub weight: f64,
}

/// A person's purchases by UTC day (purchases of one day are one transaction).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PurchaseHistory {
    /// The day of the first purchase (days since 1970-01-01).
    pub first_day: i64,
    /// The day of the latest purchase.
    pub last_day: i64,
    /// How many days had purchases.
    pub days: i64,
    /// The revenue of the purchase days after the first.
    pub repeat_revenue: f64,
    /// The revenue of every purchase day, the first included (0 when the sender did not say).
    pub revenue: f64,
}

impl PurchaseHistory {
    /// The revenue of every purchase day: `revenue`, or `repeat_revenue` when the sender left
    /// `revenue` out.
    pub fn total_revenue(&self) -> f64 {
        self.revenue.max(self.repeat_revenue)
    }
}

/// One account a person belongs to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AccountFacts {
    /// The account id.
    pub account_id: String,
    /// The person's role in the account; empty when not given.
    pub role: String,
    /// The person's title in the account; empty when not given.
    pub title: String,
    /// The account's traits (empty until the profile service sends them).
    pub traits: BTreeMap<String, Value>,
}

impl ProfileFacts {
    /// The half-life to decay with: the given one, or the default when it is 0.
    pub fn half_life_seconds(&self) -> f64 {
        if self.activity_half_life_seconds > 0.0 {
            self.activity_half_life_seconds
        } else {
            activity::DEFAULT_HALF_LIFE_SECONDS
        }
    }
}

/// One score with its explanation.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// The score's name: `engagement`, or a plan's name.
    pub name: String,
    /// The value, from 0 to 100.
    pub value: f64,
    /// The time the score is valid at.
    pub computed_at: OffsetDateTime,
    /// The model or plan version that produced the score.
    pub model_version: String,
    /// What the score is made of.
    pub factors: Vec<Factor>,
}

impl Score {
    /// The factor named `name`, if the score has one.
    pub fn factor(&self, name: &str) -> Option<&Factor> {
        self.factors.iter().find(|f| f.name == name)
    }
}

/// One input behind a score.
#[derive(Debug, Clone, PartialEq)]
pub struct Factor {
    /// The factor's name, for example `decayed_activity`, or a plan rule's name.
    pub name: String,
    /// The factor's value; always finite.
    pub value: f64,
    /// What the factor means, for people reading the score.
    pub description: String,
}

/// The models that score purchases: the customer-value models (the active stored fit, else the
/// configured parameters) and the RFM boundaries of the active stored fit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ValueModels {
    /// BG/NBD and Gamma-Gamma with their horizons: `churn_risk` and `predicted_value`.
    pub customer_value: Option<std::sync::Arc<crate::clv::CustomerValue>>,
    /// The population's RFM quintile boundaries: `rfm`.
    pub rfm: Option<crate::rfm::RfmModel>,
}

impl ValueModels {
    /// The scores of a person with purchases `p` at `as_of`: `churn_risk` and
    /// `predicted_value`, then `rfm`, each when its model exists.
    pub fn scores(&self, p: &PurchaseHistory, as_of: OffsetDateTime) -> Vec<Score> {
        let mut scores = Vec::new();
        if let Some(model) = &self.customer_value {
            scores.extend(model.scores(p, as_of));
        }
        if let Some(rfm) = &self.rfm {
            scores.push(rfm.score(p, as_of));
        }
        scores
    }
}

/// Every score of one profile at `as_of`: engagement, then (with purchases and the models)
/// `churn_risk`, `predicted_value` and `rfm`, then each person-level plan of `plans` in
/// declaration order (a plan's `score` tests read the scores before it).
pub fn score_profile(
    facts: &ProfileFacts,
    as_of: OffsetDateTime,
    plans: &Plans,
    models: &ValueModels,
) -> Vec<Score> {
    let mut scores = vec![engagement(facts, as_of)];
    if let Some(purchases) = &facts.purchases {
        scores.extend(models.scores(purchases, as_of));
    }
    plans.evaluate(facts, as_of, &mut scores);
    scores
}

/// The engagement score of a profile at `as_of`.
pub fn engagement(facts: &ProfileFacts, as_of: OffsetDateTime) -> Score {
    let half_life = facts.half_life_seconds();
    let half_life_days = half_life / SECONDS_PER_DAY;
    let mut factors = Vec::new();
    let raw = if facts.activity_classes.is_empty() {
        let raw = finite(activity::decayed_count(
            facts.activity_log2,
            as_of,
            half_life,
        ));
        factors.push(Factor {
            name: "decayed_activity".to_owned(),
            value: raw,
            description: format!(
                "events weighted by recency: each counts 1 when it happens and half as much \
                 every {half_life_days:.1} days after"
            ),
        });
        raw
    } else {
        // Each event type decays at its own pace and weighs its own weight.
        let mut raw = 0.0;
        for class in &facts.activity_classes {
            let decayed = finite(activity::decayed_count(
                Some(class.log2),
                as_of,
                class.half_life_seconds,
            ));
            let contribution = finite(class.weight * decayed);
            raw += contribution;
            let what = if class.event == "*" {
                "other events".to_owned()
            } else {
                format!("{:?} events", class.event)
            };
            factors.push(Factor {
                name: format!("activity:{}", class.event),
                value: contribution,
                description: format!(
                    "{what} weighted by recency and weight {}: each counts {} when it happens \
                     and half as much every {:.1} days after",
                    class.weight,
                    class.weight,
                    class.half_life_seconds / SECONDS_PER_DAY
                ),
            });
        }
        let raw = finite(raw);
        factors.insert(
            0,
            Factor {
                name: "decayed_activity".to_owned(),
                value: raw,
                description: "the sum of the event types' weighted, decayed activity".to_owned(),
            },
        );
        raw
    };
    let value = (100.0 * (1.0 - (-raw / ENGAGEMENT_SATURATION).exp())).clamp(0.0, 100.0);

    factors.extend([Factor {
        name: "event_count".to_owned(),
        value: facts.event_count as f64,
        description: "events seen in total, however old".to_owned(),
    }]);
    // Without any event there is no honest number of days since the last one: the factor is
    // left out rather than given a made-up value.
    if let Some(last_seen) = facts.last_seen {
        let days = finite((as_of - last_seen).as_seconds_f64() / SECONDS_PER_DAY);
        factors.push(Factor {
            name: "days_since_last_seen".to_owned(),
            value: days,
            description: "days from the latest event to the scoring time".to_owned(),
        });
    }
    factors.push(Factor {
        name: "half_life_days".to_owned(),
        value: half_life_days,
        description: "days after which an event counts half as much".to_owned(),
    });

    Score {
        name: ENGAGEMENT.to_owned(),
        value,
        computed_at: as_of,
        model_version: ENGAGEMENT_MODEL_VERSION.to_owned(),
        factors,
    }
}

/// `x`, or the largest finite number of its sign: scores are stored as JSON, which has no
/// infinity. Only absurd inputs (activity far in the future of `as_of`) get here.
fn finite(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(f64::MIN, f64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;
    use time::macros::datetime;

    const H: f64 = activity::DEFAULT_HALF_LIFE_SECONDS;

    fn facts(events: &[OffsetDateTime]) -> ProfileFacts {
        ProfileFacts {
            profile_id: "p1".to_owned(),
            event_count: events.len() as i64,
            last_seen: events.iter().max().copied(),
            activity_log2: events
                .iter()
                .fold(None, |acc, t| Some(activity::add_event(acc, *t, H))),
            activity_half_life_seconds: 0.0,
            ..ProfileFacts::default()
        }
    }

    #[test]
    fn score_falls_with_time_without_events() {
        let t = datetime!(2026-03-01 12:00:00 UTC);
        let f = facts(&[t, t + Duration::hours(1), t + Duration::hours(2)]);
        let now = engagement(&f, t + Duration::hours(2)).value;
        let week = engagement(&f, t + Duration::days(7)).value;
        let month = engagement(&f, t + Duration::days(30)).value;
        assert!(now > week && week > month, "{now} > {week} > {month}");
        assert!(month > 0.0);
    }

    /// With activity by event type, each class decays at its own pace and weighs its weight:
    /// an order (weight 5, 60-day half-life) a month ago outweighs a visit the same day.
    #[test]
    fn event_types_decay_at_their_own_pace_and_weigh_their_weight() {
        let as_of = datetime!(2026-03-31 00:00:00 UTC);
        let month_ago = as_of - Duration::days(30);
        let day = 86_400.0;
        let class = |event: &str, half_life_seconds: f64, weight: f64| ActivityClass {
            event: event.to_owned(),
            log2: activity::add_event(None, month_ago, half_life_seconds),
            half_life_seconds,
            weight,
        };
        let mut buyer = facts(&[month_ago]);
        buyer.activity_classes = vec![class("Order Completed", 60.0 * day, 5.0)];
        let mut visitor = facts(&[month_ago]);
        visitor.activity_classes = vec![class("*", 7.0 * day, 1.0)];
        let (b, v) = (engagement(&buyer, as_of), engagement(&visitor, as_of));
        let order = 5.0 * 0.5_f64.sqrt();
        let visit = 0.5_f64.powf(30.0 / 7.0);
        assert!((b.factor("activity:Order Completed").unwrap().value - order).abs() < 1e-9);
        assert!((b.factor("decayed_activity").unwrap().value - order).abs() < 1e-9);
        assert!((v.factor("activity:*").unwrap().value - visit).abs() < 1e-9);
        assert!(b.value > 50.0 && v.value < 2.0, "{} {}", b.value, v.value);
        // The single activity is not read once classes are given.
        let mut both = buyer.clone();
        both.activity_log2 = None;
        assert_eq!(engagement(&both, as_of).value, b.value);
    }

    #[test]
    fn recent_activity_scores_higher_than_old_activity() {
        let as_of = datetime!(2026-03-10 00:00:00 UTC);
        let recent = facts(&[as_of - Duration::days(1), as_of - Duration::days(2)]);
        let old = facts(&[as_of - Duration::days(20), as_of - Duration::days(21)]);
        assert!(engagement(&recent, as_of).value > engagement(&old, as_of).value);
    }

    #[test]
    fn one_fresh_event_and_no_events_score_as_documented() {
        let t = datetime!(2026-03-01 12:00:00 UTC);
        let one = engagement(&facts(&[t]), t).value;
        assert!(
            (one - 100.0 * (1.0 - (-0.2f64).exp())).abs() < 1e-9,
            "{one}"
        );
        let none = engagement(&facts(&[]), t);
        assert_eq!(none.value, 0.0);
        assert!(none.factor("days_since_last_seen").is_none());
    }

    #[test]
    fn heavy_activity_saturates_at_100() {
        let t = datetime!(2026-03-01 12:00:00 UTC);
        let events: Vec<_> = (0..500).map(|i| t - Duration::minutes(i)).collect();
        let s = engagement(&facts(&events), t);
        assert!(s.value > 99.99 && s.value <= 100.0, "{}", s.value);
        // Activity far in the future of as_of must still give a finite, bounded score.
        let mut absurd = facts(&[t]);
        absurd.activity_log2 = Some(1e300);
        let s = engagement(&absurd, t);
        assert_eq!(s.value, 100.0);
        assert!(s.factors.iter().all(|f| f.value.is_finite()));
    }

    #[test]
    fn explanation_factors_are_present() {
        let t = datetime!(2026-03-01 12:00:00 UTC);
        let f = facts(&[t - Duration::days(3), t - Duration::days(2)]);
        let s = engagement(&f, t);
        assert_eq!(s.name, ENGAGEMENT);
        assert_eq!(s.model_version, ENGAGEMENT_MODEL_VERSION);
        assert_eq!(s.computed_at, t);
        for name in [
            "decayed_activity",
            "event_count",
            "days_since_last_seen",
            "half_life_days",
        ] {
            let factor = s.factor(name).unwrap_or_else(|| panic!("missing {name}"));
            assert!(!factor.description.is_empty(), "{name} has no description");
        }
        assert_eq!(s.factor("event_count").unwrap().value, 2.0);
        assert!((s.factor("days_since_last_seen").unwrap().value - 2.0).abs() < 1e-9);
        assert!((s.factor("half_life_days").unwrap().value - 7.0).abs() < 1e-9);
        let raw = s.factor("decayed_activity").unwrap().value;
        let expected = 2f64.powf(-3.0 / 7.0) + 2f64.powf(-2.0 / 7.0);
        assert!((raw - expected).abs() < 1e-9, "{raw} vs {expected}");
    }

    #[test]
    fn a_given_half_life_is_used() {
        let t = datetime!(2026-03-01 12:00:00 UTC);
        let day = 86_400.0;
        let mut f = facts(&[]);
        f.activity_log2 = Some(activity::add_event(None, t, day));
        f.activity_half_life_seconds = day;
        let s = engagement(&f, t + Duration::days(1));
        assert!((s.factor("decayed_activity").unwrap().value - 0.5).abs() < 1e-9);
        assert!((s.factor("half_life_days").unwrap().value - 1.0).abs() < 1e-9);
    }
}
