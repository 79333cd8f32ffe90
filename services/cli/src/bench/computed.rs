//! What `--computed-samples` follows: a person's first `Order Completed`, from its
//! acknowledgement until the profile (read by the person's user id) shows it in a computed trait,
//! in an audience and in a score. The bench declares the trait and the audience through the
//! definitions API when they are missing; the score is the built-in `engagement`.

use std::time::Duration;

use hdrhistogram::Histogram;
use tessera_profile::audience::Condition;
use tessera_proto::profile::v1 as pb;
use tessera_proto::profile::v1::definition_service_client::DefinitionServiceClient;
use tonic::Code;

use super::report::{Computed, Percentiles, Reflected};

/// The event the samples follow.
pub(super) const ORDER_EVENT: &str = "Order Completed";
/// The computed trait counting the person's orders (the name the ready scoring plans read).
pub(super) const ORDER_COUNT: &str = "order_count";
/// The audience of people who ordered at least once.
pub(super) const BUYERS: &str = "bench_buyers";
/// The score that must be computed over the order.
pub(super) const SCORE: &str = "engagement";
/// The engagement factor holding how many events the score was computed over.
const SCORE_EVENTS_FACTOR: &str = "event_count";

/// What GetProfile returns to a follower: only what the measures read.
pub(super) fn read_mask() -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: vec![
            "event_count".to_owned(),
            format!("computed_traits.{ORDER_COUNT}"),
            "audiences".to_owned(),
            format!("scores.{SCORE}"),
        ],
    }
}

fn order_count_definition() -> pb::ComputedTraitDefinition {
    pb::ComputedTraitDefinition {
        name: ORDER_COUNT.to_owned(),
        kind: pb::ComputedTraitKind::Count.into(),
        events: vec![ORDER_EVENT.to_owned()],
        ..pb::ComputedTraitDefinition::default()
    }
}

fn buyers_condition() -> serde_json::Value {
    serde_json::json!({"performed": {"event": ORDER_EVENT, "at_least": 1}})
}

/// Declares the computed trait and the audience the samples read through the DefinitionService
/// of the profile service, unless they exist; refuses ones of those names that mean something
/// else, before declaring anything. Returns whether it declared anything (the replicas then need
/// a moment to load it).
pub(super) async fn ensure_definitions(
    channel: crate::client_tls::Authorized,
) -> anyhow::Result<bool> {
    let mut definitions = DefinitionServiceClient::new(channel);
    let order_count = match definitions
        .get_computed_trait(pb::GetComputedTraitRequest {
            name: ORDER_COUNT.to_owned(),
        })
        .await
    {
        Ok(response) => response.into_inner().computed_trait,
        Err(status) if status.code() == Code::NotFound => None,
        Err(status) => {
            return Err(refused(
                &format!("reading the computed trait {ORDER_COUNT}"),
                &status,
            ));
        }
    };
    let buyers = match definitions
        .get_audience(pb::GetAudienceRequest {
            name: BUYERS.to_owned(),
        })
        .await
    {
        Ok(response) => response.into_inner().audience,
        Err(status) if status.code() == Code::NotFound => None,
        Err(status) => {
            return Err(refused(&format!("reading the audience {BUYERS}"), &status));
        }
    };
    if let Some(t) = &order_count {
        anyhow::ensure!(
            t.kind == i32::from(pb::ComputedTraitKind::Count)
                && t.events == [ORDER_EVENT]
                && t.window_seconds == 0
                && (t.types.is_empty() || t.types.iter().any(|ty| ty == "track")),
            "the computed trait {ORDER_COUNT} exists but is not an unwindowed count of \
             {ORDER_EVENT:?} events, which --computed-samples reads: change or delete it"
        );
    }
    if let Some(a) = &buyers {
        let condition: Option<Condition> = serde_json::from_str(&a.condition_json).ok();
        let ours: Condition = serde_json::from_value(buyers_condition())?;
        anyhow::ensure!(
            condition.as_ref() == Some(&ours),
            "the audience {BUYERS} exists with another condition ({}) than the one \
             --computed-samples reads ({}): change or delete it",
            a.condition_json,
            buyers_condition()
        );
    }
    if order_count.is_none() {
        definitions
            .create_computed_trait(pb::CreateComputedTraitRequest {
                computed_trait: Some(order_count_definition()),
            })
            .await
            .map_err(|s| refused(&format!("declaring the computed trait {ORDER_COUNT}"), &s))?;
        eprintln!("tessera bench: declared the computed trait {ORDER_COUNT}");
    }
    if buyers.is_none() {
        definitions
            .create_audience(pb::CreateAudienceRequest {
                audience: Some(pb::AudienceDefinition {
                    name: BUYERS.to_owned(),
                    condition_json: buyers_condition().to_string(),
                    ..pb::AudienceDefinition::default()
                }),
            })
            .await
            .map_err(|s| refused(&format!("declaring the audience {BUYERS}"), &s))?;
        eprintln!("tessera bench: declared the audience {BUYERS}");
    }
    Ok(order_count.is_none() || buyers.is_none())
}

fn refused(what: &str, status: &tonic::Status) -> anyhow::Error {
    let code = status.code();
    let hint = if matches!(code, Code::PermissionDenied | Code::Unauthenticated) {
        " (declaring needs a token with the profiles:write scope: --token)"
    } else if code == Code::Unimplemented {
        " (is --read-target the profile service?)"
    } else {
        ""
    };
    anyhow::anyhow!("{what}: {} ({:?}){hint}", status.message(), status.code())
}

/// When one followed order showed in each measure, as time since its acknowledgement.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Progress {
    pub(super) computed_trait: Option<Duration>,
    pub(super) audience: Option<Duration>,
    pub(super) score: Option<Duration>,
    /// The profile's event count at the read that first showed the order: a score computed
    /// over at least that many events was computed over the order.
    events_with_order: Option<i64>,
}

impl Progress {
    /// Notes what `profile`, read `waited` after the acknowledgement, shows of the order.
    pub(super) fn observe(&mut self, profile: &pb::Profile, waited: Duration) {
        let orders = profile
            .computed_traits
            .get(ORDER_COUNT)
            .and_then(|t| t.value.as_ref())
            .and_then(|v| {
                if let Some(prost_types::value::Kind::NumberValue(n)) = v.kind {
                    Some(n)
                } else {
                    None
                }
            })
            .unwrap_or(0.0);
        if orders >= 1.0 && self.computed_trait.is_none() {
            self.computed_trait = Some(waited);
            self.events_with_order = Some(profile.event_count);
        }
        if self.audience.is_none() && profile.audiences.iter().any(|a| a == BUYERS) {
            self.audience = Some(waited);
        }
        let scored_over = profile.scores.get(SCORE).and_then(|s| {
            s.factors
                .iter()
                .find(|f| f.name == SCORE_EVENTS_FACTOR)
                .map(|f| f.value)
        });
        if self.score.is_none()
            && let (Some(needed), Some(counted)) = (self.events_with_order, scored_over)
            && counted >= needed as f64
        {
            self.score = Some(waited);
        }
    }

    /// Whether every measure has shown the order.
    pub(super) fn done(&self) -> bool {
        self.computed_trait.is_some() && self.audience.is_some() && self.score.is_some()
    }
}

/// One measure over every followed order.
#[derive(Debug)]
struct Measure {
    latency: Histogram<u64>,
    seen: u64,
    not_seen: u64,
}

impl Measure {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency: super::histogram()?,
            seen: 0,
            not_seen: 0,
        })
    }

    fn record(&mut self, at: Option<Duration>) {
        match at {
            Some(waited) => {
                self.seen += 1;
                self.latency.saturating_record(super::micros(waited));
            }
            None => self.not_seen += 1,
        }
    }

    fn report(&self, name: &str) -> Reflected {
        Reflected {
            name: name.to_owned(),
            seen: self.seen,
            not_seen: self.not_seen,
            latency: Percentiles::of(&self.latency),
        }
    }
}

/// The followed orders' outcomes, as the send tasks record them.
#[derive(Debug)]
pub(super) struct ComputedStats {
    pub(super) followed: u64,
    computed_trait: Measure,
    audience: Measure,
    score: Measure,
    pub(super) poll_errors: std::collections::BTreeMap<String, u64>,
    pub(super) first_poll_error: std::collections::BTreeMap<String, String>,
}

impl ComputedStats {
    pub(super) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            followed: 0,
            computed_trait: Measure::new()?,
            audience: Measure::new()?,
            score: Measure::new()?,
            poll_errors: std::collections::BTreeMap::new(),
            first_poll_error: std::collections::BTreeMap::new(),
        })
    }

    /// Records a finished follow: what showed the order counts as seen, the rest as not seen
    /// within the timeout.
    pub(super) fn finished(&mut self, progress: Progress) {
        self.computed_trait.record(progress.computed_trait);
        self.audience.record(progress.audience);
        self.score.record(progress.score);
    }

    pub(super) fn report(&self) -> Computed {
        Computed {
            followed: self.followed,
            computed_trait: self.computed_trait.report(ORDER_COUNT),
            audience: self.audience.report(BUYERS),
            score: self.score.report(SCORE),
            poll_errors: self.poll_errors.clone(),
            first_poll_error: self.first_poll_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use prost_types::Value;
    use prost_types::value::Kind;
    use tessera_proto::scoring::v1::{Score, ScoreFactor};

    use super::*;

    fn profile(orders: Option<f64>, audiences: &[&str], events: i64, scored: f64) -> pb::Profile {
        let mut computed_traits = HashMap::new();
        if let Some(n) = orders {
            computed_traits.insert(
                ORDER_COUNT.to_owned(),
                pb::ComputedTrait {
                    value: Some(Value {
                        kind: Some(Kind::NumberValue(n)),
                    }),
                    observed_at: None,
                },
            );
        }
        let score = Score {
            name: SCORE.to_owned(),
            value: 20.0,
            factors: vec![
                ScoreFactor {
                    name: "decayed_activity".to_owned(),
                    value: 1.0,
                    description: String::new(),
                },
                ScoreFactor {
                    name: SCORE_EVENTS_FACTOR.to_owned(),
                    value: scored,
                    description: String::new(),
                },
            ],
            ..Score::default()
        };
        pb::Profile {
            computed_traits,
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            event_count: events,
            scores: HashMap::from([(SCORE.to_owned(), score)]),
            ..pb::Profile::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn each_measure_keeps_the_first_read_that_shows_the_order() {
        let mut p = Progress::default();
        // No order yet: a count of 0, no audience, a score over the events so far.
        p.observe(&profile(Some(0.0), &[], 4, 4.0), ms(3));
        assert_eq!(p, Progress::default());
        // The order counts, but (were rescoring late) the score still covers 4 events of 5, and
        // the audience (were it evaluated apart) has not followed.
        p.observe(&profile(Some(1.0), &["other"], 5, 4.0), ms(10));
        assert_eq!(p.computed_trait, Some(ms(10)));
        assert_eq!((p.audience, p.score), (None, None));
        assert!(!p.done());
        p.observe(&profile(Some(1.0), &["other", BUYERS], 5, 4.0), ms(12));
        assert_eq!(p.audience, Some(ms(12)));
        assert_eq!(
            p.score, None,
            "a score over fewer events predates the order"
        );
        // Later reads do not move what was seen first; a score over more events than the read
        // that showed the order was computed over it.
        p.observe(&profile(Some(2.0), &[BUYERS], 7, 7.0), ms(20));
        assert_eq!(p.computed_trait, Some(ms(10)));
        assert_eq!(p.audience, Some(ms(12)));
        assert_eq!(p.score, Some(ms(20)));
        assert!(p.done());
    }

    #[test]
    fn a_profile_without_the_trait_or_the_score_shows_nothing() {
        let mut p = Progress::default();
        let mut bare = profile(None, &[], 3, 3.0);
        bare.scores.clear();
        p.observe(&bare, ms(1));
        assert_eq!(p, Progress::default());
        // All at once, as when the order's write carries them all.
        p.observe(&profile(Some(1.0), &[BUYERS], 4, 4.0), ms(7));
        assert!(p.done());
        assert_eq!(
            (p.computed_trait, p.audience, p.score),
            (Some(ms(7)), Some(ms(7)), Some(ms(7)))
        );
    }

    #[test]
    fn the_report_counts_seen_and_not_seen_per_measure_with_percentiles() {
        let mut stats = ComputedStats::new().unwrap();
        stats.followed = 101;
        // 100 orders seen everywhere at 1..=100 ms; one only in the trait; one never (it
        // would still be in flight at the end of a run).
        for n in 1..=100 {
            let at = Some(ms(n));
            stats.finished(Progress {
                computed_trait: at,
                audience: at,
                score: at,
                events_with_order: Some(1),
            });
        }
        stats.finished(Progress {
            computed_trait: Some(ms(500)),
            ..Progress::default()
        });
        let r = stats.report();
        assert_eq!(r.followed, 101);
        assert_eq!((r.computed_trait.seen, r.computed_trait.not_seen), (101, 0));
        assert_eq!((r.audience.seen, r.audience.not_seen), (100, 1));
        assert_eq!((r.score.seen, r.score.not_seen), (100, 1));
        let trait_latency = r.computed_trait.latency.unwrap();
        assert!(
            (trait_latency.max_ms - 500.0).abs() < 1.0,
            "{trait_latency:?}"
        );
        let audience = r.audience.latency.unwrap();
        assert!((audience.p50_ms - 50.0).abs() < 0.1, "{audience:?}");
        assert!((audience.p99_ms - 99.0).abs() < 0.1, "{audience:?}");
        assert!((audience.max_ms - 100.0).abs() < 0.1, "{audience:?}");
        assert_eq!(audience.count, 100);
        assert_eq!(r.computed_trait.name, ORDER_COUNT);
        assert_eq!(r.score.name, SCORE);
        assert!(
            ComputedStats::new()
                .unwrap()
                .report()
                .audience
                .latency
                .is_none(),
            "nothing seen, no percentiles"
        );
    }

    #[test]
    fn the_declared_definitions_are_valid_and_the_read_mask_names_what_is_read() {
        let _: Condition = serde_json::from_value(buyers_condition()).unwrap();
        let t = order_count_definition();
        assert_eq!(t.kind, i32::from(pb::ComputedTraitKind::Count));
        assert_eq!(t.events, [ORDER_EVENT]);
        let paths = read_mask().paths;
        assert!(
            paths.contains(&"computed_traits.order_count".to_owned()),
            "{paths:?}"
        );
        assert!(paths.contains(&"scores.engagement".to_owned()), "{paths:?}");
    }
}
