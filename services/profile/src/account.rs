//! Account (B2B) profiles: what group calls say about an account (its traits, the latest event
//! winning per trait, or the trait catalog's strategy), and who belongs (people whose group
//! calls named it, with their role and title).
//!
//! Account traits are folded as group events are applied, once per event (the event-id table
//! makes it idempotent). Memberships are not stored twice: they are derived from the people's
//! applied group events, so they follow merges, unmerges and deletions of people by
//! themselves; a person's own view of them is kept on the person (`ComputedState::accounts`).
//!
//! Account scores (one per account-level scoring plan) are computed from the account's traits
//! and members and stored on the account whenever a batch applies a group call naming it or
//! merges people who belong to it ([`crate::store::Scorer::score_accounts`]).

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use time::OffsetDateTime;

use crate::catalog::{self, TraitCatalog};
use crate::computed::{ComputedTrait, ComputedValue};
use crate::domain::{EventContent, ResolvedEvent, Score, TraitValue};

/// One account profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    /// The account's id: the group id of its group calls.
    pub account_id: String,
    /// Its traits by name, each with its provenance.
    pub traits: BTreeMap<String, TraitValue>,
    /// Its latest scores by name: one per account-level scoring plan.
    pub scores: BTreeMap<String, Score>,
    /// Increases with every change.
    pub version: i64,
    /// When its first group call was applied.
    pub created_at: OffsetDateTime,
    /// When it last changed.
    pub updated_at: OffsetDateTime,
}

impl Account {
    /// Folds a group call's account traits.
    pub fn apply(&mut self, event: &ResolvedEvent, catalog: &TraitCatalog) {
        for (name, value) in &event.details.group_traits {
            catalog::set(
                &mut self.traits,
                name,
                TraitValue {
                    value: value.clone(),
                    observed_at: event.timestamp,
                    event_id: event.event_id.clone(),
                },
                catalog.get(name).map(|r| r.strategy).unwrap_or_default(),
            );
        }
    }
}

impl Account {
    /// Stores `scores` as the account's scores at `now` (the answer is every account score it
    /// has now: one no longer answered goes); whether they changed.
    pub fn set_scores(&mut self, scores: Vec<Score>, now: OffsetDateTime) -> bool {
        let scores: BTreeMap<String, Score> =
            scores.into_iter().map(|s| (s.name.clone(), s)).collect();
        if scores == self.scores {
            return false;
        }
        self.scores = scores;
        self.version += 1;
        self.updated_at = now;
        true
    }
}

/// Whether a declared account computed trait (of `declared`) is named `name`: then it hides the
/// account trait of that name wherever the two are read as one set of traits (audiences'
/// account tests, account-level plans, person plans' account tests, the Profile API's account
/// traits), also while it has no value (nothing counted yet, or its window emptied). Account
/// traits are open, so the clash cannot be refused when config loads; one rule keeps every
/// reader agreeing on it.
pub fn hidden_by_computed(name: &str, declared: &[ComputedTrait]) -> bool {
    declared.iter().any(|c| c.name == name)
}

/// The value of `name` where an account's `traits` and the values of its account computed
/// traits (`computed`, of those `declared`) are read as one set of traits: the computed trait's
/// value when one of that name is declared (absent when it has none), else the trait's.
pub fn shown_value<'a>(
    name: &str,
    traits: &'a BTreeMap<String, TraitValue>,
    declared: &[ComputedTrait],
    computed: &'a BTreeMap<String, ComputedValue>,
) -> Option<&'a Value> {
    if hidden_by_computed(name, declared) {
        computed.get(name).map(|c| &c.value)
    } else {
        traits.get(name).map(|t| &t.value)
    }
}

/// An account's `traits` and the values of its account computed traits (`computed`, of those
/// `declared`) as one set of traits, as scoring plans (account and person level) read them: see
/// [`hidden_by_computed`]. A computed value without an observation time is stamped `now`.
pub fn shown_traits(
    traits: &BTreeMap<String, TraitValue>,
    declared: &[ComputedTrait],
    computed: &BTreeMap<String, ComputedValue>,
    now: OffsetDateTime,
) -> BTreeMap<String, TraitValue> {
    let kept = traits
        .iter()
        .filter(|(name, _)| !hidden_by_computed(name, declared))
        .map(|(name, t)| (name.clone(), t.clone()));
    let computed = computed
        .iter()
        .filter(|(name, _)| hidden_by_computed(name, declared))
        .map(|(name, c)| {
            let value = TraitValue {
                value: c.value.clone(),
                observed_at: c.observed_at.unwrap_or(now),
                event_id: String::new(),
            };
            (name.clone(), value)
        });
    kept.chain(computed).collect()
}

/// One person of an account.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The person's live profile.
    pub profile_id: String,
    /// Their role in the account (`context.traits.role` of their latest group call).
    pub role: Option<String>,
    /// Their title (`context.traits.title` of their latest group call).
    pub title: Option<String>,
    /// Their first group call naming the account.
    pub joined_at: OffsetDateTime,
    /// Their latest group call naming the account.
    pub last_seen: OffsetDateTime,
}

/// The members of an account from its applied group events (event id, the profile each was
/// applied to, its content) and `live`, each profile's live profile: one member per live
/// profile, in profile id order.
pub(crate) fn members(
    events: Vec<(String, String, EventContent)>,
    live: &HashMap<String, String>,
) -> Vec<Member> {
    let mut by_profile: BTreeMap<String, (Member, (OffsetDateTime, String))> = BTreeMap::new();
    for (event_id, profile_id, content) in events {
        // Deleted or unknown profiles have no live profile: not members.
        let Some(live) = live.get(&profile_id) else {
            continue;
        };
        let text = |key: &str| {
            content
                .traits
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let at = content.timestamp;
        let entry = by_profile.entry(live.clone()).or_insert_with(|| {
            (
                Member {
                    profile_id: live.clone(),
                    role: None,
                    title: None,
                    joined_at: at,
                    last_seen: at,
                },
                (OffsetDateTime::UNIX_EPOCH, String::new()),
            )
        });
        let (member, latest) = entry;
        member.joined_at = member.joined_at.min(at);
        member.last_seen = member.last_seen.max(at);
        if (at, &event_id) > (latest.0, &latest.1) {
            *latest = (at, event_id);
            member.role = text("role");
            member.title = text("title");
        }
    }
    by_profile.into_values().map(|(m, _)| m).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::macros::datetime;

    use super::*;
    use crate::computed::Kind;

    const NOW: OffsetDateTime = datetime!(2026-06-01 00:00:00 UTC);

    #[test]
    fn a_declared_account_computed_trait_hides_the_trait_of_its_name_even_without_a_value() {
        let trait_value = |value: Value| TraitValue {
            value,
            observed_at: NOW,
            event_id: "g1".into(),
        };
        let traits = BTreeMap::from([
            ("industry".to_owned(), trait_value(json!("software"))),
            ("order_count".to_owned(), trait_value(json!(99))),
        ]);
        let declared = [ComputedTrait {
            name: "order_count".into(),
            kind: Kind::Sum,
            events: vec!["Order Completed".into()],
            types: Vec::new(),
            property: Some("quantity".into()),
            window_seconds: None,
        }];
        let none = BTreeMap::new();
        assert_eq!(shown_value("order_count", &traits, &declared, &none), None);
        assert_eq!(
            shown_value("industry", &traits, &declared, &none),
            Some(&json!("software"))
        );
        assert_eq!(
            shown_value("order_count", &traits, &[], &none),
            Some(&json!(99)),
            "not declared: the trait"
        );
        let shown = shown_traits(&traits, &declared, &none, NOW);
        assert_eq!(shown.keys().collect::<Vec<_>>(), ["industry"]);

        let two = BTreeMap::from([(
            "order_count".to_owned(),
            ComputedValue {
                value: json!(2),
                observed_at: None,
            },
        )]);
        assert_eq!(
            shown_value("order_count", &traits, &declared, &two),
            Some(&json!(2))
        );
        let shown = shown_traits(&traits, &declared, &two, NOW);
        assert_eq!(shown["order_count"].value, json!(2));
        assert_eq!(shown["order_count"].observed_at, NOW);
        assert_eq!(shown["industry"].event_id, "g1");
    }
}
