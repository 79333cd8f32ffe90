//! Engagement by event type: declared event types (`[[profile.engagement_events]]`) keep their
//! own decayed activity, with their own half-life and weight, so an order can count for weeks
//! and weigh five page views while a page view fades in days.
//!
//! Each declared event type folds into the accumulator `engagement:<event>` of the profile's
//! computed state, every other event into `engagement:*` (at the profile's default half-life);
//! all are decayed sums ([`tessera_core::activity`]), so they absorb events in any order and
//! merge across profiles like the rest of the state, and are rebuilt by the recompute when the
//! declarations change (they are part of the definitions' fingerprint). Scoring turns them into
//! engagement: the weighted sum of each class's decayed count at the time of scoring. Without
//! declarations nothing is kept here and engagement uses the profile's single decayed activity.

use serde::{Deserialize, Serialize};
use tessera_core::FieldViolation;
use tessera_core::activity;

use crate::computed::{Acc, ComputedState};
use crate::domain::ResolvedEvent;

/// The accumulator of the events no declaration names.
pub const OTHER: &str = "engagement:*";
/// The most event types one deployment may declare.
pub const MAX_EVENTS: usize = 100;

/// One event type's pace and weight in engagement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngagementEvent {
    /// The event: a track call's event name, or a page's or screen's name.
    pub event: String,
    /// How fast its activity fades: it counts half as much after this many seconds.
    pub half_life_seconds: f64,
    /// How much one such event weighs against one other event just now (default 1).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// One class of activity as scoring reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivityClass {
    /// The event type, or `*` for every other event.
    pub event: String,
    /// The stored decayed activity of the class.
    pub log2: f64,
    /// The half-life it was accumulated with, in seconds.
    pub half_life_seconds: f64,
    /// Its weight in engagement.
    pub weight: f64,
}

/// The accumulator of `event`'s class.
fn key(event: &str) -> String {
    format!("engagement:{event}")
}

/// What is wrong with `events` (under `profile.engagement_events`), if anything.
pub fn validate(events: &[EngagementEvent]) -> Result<(), Vec<FieldViolation>> {
    let mut violations = Vec::new();
    if events.len() > MAX_EVENTS {
        violations.push(FieldViolation::new(
            "engagement_events",
            format!("{} event types, at most {MAX_EVENTS}", events.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, e) in events.iter().enumerate() {
        let field = |name: &str| format!("engagement_events[{i}].{name}");
        if e.event.trim().is_empty() || e.event == "*" {
            violations.push(FieldViolation::new(
                field("event"),
                "must name an event (a track event, or a page or screen name)",
            ));
        } else if !seen.insert(e.event.as_str()) {
            violations.push(FieldViolation::new(
                field("event"),
                format!("{:?} is declared twice", e.event),
            ));
        }
        if !e.half_life_seconds.is_finite() || e.half_life_seconds <= 0.0 {
            violations.push(FieldViolation::new(
                field("half_life_seconds"),
                "must be a positive number of seconds",
            ));
        }
        if !e.weight.is_finite() || e.weight < 0.0 {
            violations.push(FieldViolation::new(
                field("weight"),
                "must be a number of at least 0",
            ));
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// Folds `event` into its class's decayed activity (nothing without declarations).
pub fn apply(
    state: &mut ComputedState,
    events: &[EngagementEvent],
    default_half_life_seconds: f64,
    event: &ResolvedEvent,
) {
    if events.is_empty() {
        return;
    }
    let declared = events.iter().find(|e| event.details.is_named(&e.event));
    let (name, half_life) = match declared {
        Some(e) => (key(&e.event), e.half_life_seconds),
        None => (OTHER.to_owned(), default_half_life_seconds),
    };
    state.fold(
        name,
        Acc::Decayed {
            log2: activity::add_event(None, event.timestamp, half_life),
        },
    );
}

/// The classes of activity `state` holds, for scoring: one per declared event type the
/// profile performed, and `*` for the others. Empty without declarations.
pub fn classes(
    state: &ComputedState,
    events: &[EngagementEvent],
    default_half_life_seconds: f64,
) -> Vec<ActivityClass> {
    if events.is_empty() {
        return Vec::new();
    }
    let class =
        |name: &str, event: &str, half_life_seconds: f64, weight: f64| match state.0.get(name) {
            Some(Acc::Decayed { log2 }) => Some(ActivityClass {
                event: event.to_owned(),
                log2: *log2,
                half_life_seconds,
                weight,
            }),
            Some(_) | None => None,
        };
    events
        .iter()
        .filter_map(|e| class(&key(&e.event), &e.event, e.half_life_seconds, e.weight))
        .chain(class(OTHER, "*", default_half_life_seconds, 1.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;
    use time::macros::datetime;

    use super::*;
    use crate::domain::EventDetails;

    const DAY: f64 = 86_400.0;

    fn event(id: &str, kind: &str, name: &str, at: OffsetDateTime) -> ResolvedEvent {
        ResolvedEvent {
            event_id: id.to_owned(),
            profile_id: "p".to_owned(),
            timestamp: at,
            traits: serde_json::Map::new(),
            identifiers: Vec::new(),
            details: EventDetails {
                kind: kind.to_owned(),
                event: if kind == "track" {
                    name.to_owned()
                } else {
                    String::new()
                },
                name: if kind == "track" {
                    String::new()
                } else {
                    name.to_owned()
                },
                ..EventDetails::default()
            },
        }
    }

    fn declared() -> Vec<EngagementEvent> {
        vec![
            EngagementEvent {
                event: "Order Completed".to_owned(),
                half_life_seconds: 60.0 * DAY,
                weight: 5.0,
            },
            EngagementEvent {
                event: "Pricing".to_owned(),
                half_life_seconds: 3.0 * DAY,
                weight: 2.0,
            },
        ]
    }

    fn fold(events: &[ResolvedEvent]) -> ComputedState {
        let mut state = ComputedState::default();
        for e in events {
            apply(&mut state, &declared(), 7.0 * DAY, e);
        }
        state
    }

    fn decayed(classes: &[ActivityClass], event: &str, now: OffsetDateTime) -> f64 {
        classes.iter().find(|c| c.event == event).map_or(0.0, |c| {
            activity::decayed_count(Some(c.log2), now, c.half_life_seconds)
        })
    }

    #[test]
    fn each_declared_type_keeps_its_own_pace_and_the_rest_the_default() {
        let now = datetime!(2026-06-01 00:00:00 UTC);
        let month_ago = now - time::Duration::days(30);
        let state = fold(&[
            event("e1", "track", "Order Completed", month_ago),
            event("e2", "page", "Pricing", now),
            event("e3", "track", "Signed Up", now),
            event("e4", "screen", "Home", month_ago),
        ]);
        let classes = classes(&state, &declared(), 7.0 * DAY);
        let events: Vec<&str> = classes.iter().map(|c| c.event.as_str()).collect();
        assert_eq!(events, ["Order Completed", "Pricing", "*"]);
        assert!((decayed(&classes, "Order Completed", now) - 0.5_f64.sqrt()).abs() < 1e-9);
        assert!((decayed(&classes, "Pricing", now) - 1.0).abs() < 1e-9);
        let others = 1.0 + 0.5_f64.powf(30.0 / 7.0);
        assert!((decayed(&classes, "*", now) - others).abs() < 1e-9);
        assert_eq!(
            classes.iter().map(|c| c.weight).collect::<Vec<_>>(),
            [5.0, 2.0, 1.0]
        );
    }

    #[test]
    fn classes_do_not_depend_on_order_or_merges() {
        let now = datetime!(2026-06-01 00:00:00 UTC);
        let events: Vec<ResolvedEvent> = (0..6)
            .map(|i| {
                let name = ["Order Completed", "Pricing", "Other"][i % 3];
                let kind = if i % 3 == 1 { "page" } else { "track" };
                event(
                    &format!("e{i}"),
                    kind,
                    name,
                    now - time::Duration::days(i as i64 * 4),
                )
            })
            .collect();
        let forward = fold(&events);
        let mut reversed = events.clone();
        reversed.reverse();
        let backward = fold(&reversed);
        let (left, right) = events.split_at(2);
        let mut merged = fold(left);
        merged.absorb(&fold(right));
        for state in [&backward, &merged] {
            for (a, b) in classes(&forward, &declared(), 7.0 * DAY)
                .iter()
                .zip(classes(state, &declared(), 7.0 * DAY))
            {
                assert_eq!(a.event, b.event);
                assert!((a.log2 - b.log2).abs() < 1e-9, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn nothing_is_kept_without_declarations_and_bad_ones_are_named() {
        let mut state = ComputedState::default();
        apply(
            &mut state,
            &[],
            7.0 * DAY,
            &event(
                "e1",
                "track",
                "Order Completed",
                datetime!(2026-06-01 00:00:00 UTC),
            ),
        );
        assert!(state.0.is_empty());
        assert!(classes(&state, &[], 7.0 * DAY).is_empty());

        assert!(validate(&declared()).is_ok());
        let bad = [
            EngagementEvent {
                event: "*".to_owned(),
                half_life_seconds: DAY,
                weight: 1.0,
            },
            EngagementEvent {
                event: "Pricing".to_owned(),
                half_life_seconds: 0.0,
                weight: -1.0,
            },
            EngagementEvent {
                event: "Pricing".to_owned(),
                half_life_seconds: f64::NAN,
                weight: 1.0,
            },
        ];
        let fields: Vec<String> = validate(&bad)
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            [
                "engagement_events[0].event",
                "engagement_events[1].half_life_seconds",
                "engagement_events[1].weight",
                "engagement_events[2].event",
                "engagement_events[2].half_life_seconds",
            ]
        );
    }
}
