//! The trait catalog: per-trait rules declared in config (`[profile.traits.<name>]`) — how a
//! trait's value combines across events and merges (its strategy), and what kind of data it is
//! (its class, and whether it is personal contact data), for views, masking and deletion.
//!
//! Every strategy is commutative and associative, so a trait's value does not depend on the
//! order events arrive in or on which profile survives a merge: `latest` and `first` keep the
//! value of the latest / earliest event (by event time, then event id), `non_empty` the latest
//! that is not empty, `sum` adds numbers up, `append_unique` keeps the distinct values (of
//! lists and single values alike) in a list ordered by their JSON text.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::TraitValue;

/// How a trait's value combines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The latest event's value.
    #[default]
    Latest,
    /// The earliest event's value.
    First,
    /// The latest non-empty value (not null, "", [] or {}).
    NonEmpty,
    /// The sum of the numbers sent (others are ignored).
    Sum,
    /// The distinct values sent, as a list.
    AppendUnique,
}

/// What kind of data a trait is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraitClass {
    /// Who a person is: age, gender, language, location.
    Demographic,
    /// What an account is: industry, employees, revenue.
    Firmographic,
    /// What a person cares about: interests, preferences, survey answers.
    Psychographic,
    /// What a person does: plan, usage, purchases.
    Behavioral,
    /// How to reach a person: name, email, phone, address.
    Contact,
}

impl TraitClass {
    /// The class's name, as in config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Demographic => "demographic",
            Self::Firmographic => "firmographic",
            Self::Psychographic => "psychographic",
            Self::Behavioral => "behavioral",
            Self::Contact => "contact",
        }
    }
}

/// One trait's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraitRule {
    /// How its value combines (`latest` when absent).
    #[serde(default)]
    pub strategy: Strategy,
    /// What kind of data it is.
    #[serde(default)]
    pub class: Option<TraitClass>,
    /// Whether it is personal data that identifies or reaches a person (masked where personal
    /// data is not to be shown; `contact` traits are by default).
    #[serde(default)]
    pub pii: Option<bool>,
}

impl TraitRule {
    /// Whether the trait is personal data: declared so, or a contact trait.
    pub fn is_pii(&self) -> bool {
        self.pii.unwrap_or(self.class == Some(TraitClass::Contact))
    }
}

/// The catalog: rules by trait name. A trait not listed is `latest`, unclassified.
pub type TraitCatalog = BTreeMap<String, TraitRule>;

/// The most distinct values an `append_unique` trait keeps (the smallest by JSON text).
pub const MAX_APPENDED: usize = 1_000;

/// Combines `candidate` (one event's value, or a merged profile's combined value) into the
/// trait `name` of `traits` by `strategy`.
pub(crate) fn set(
    traits: &mut BTreeMap<String, TraitValue>,
    name: &str,
    candidate: TraitValue,
    strategy: Strategy,
) {
    let current = traits.get_mut(name);
    match strategy {
        Strategy::Latest => match current {
            Some(current) if candidate.supersedes(current) => *current = candidate,
            Some(_) => {}
            None => {
                traits.insert(name.to_owned(), candidate);
            }
        },
        Strategy::First => match current {
            Some(current) if current.supersedes(&candidate) => *current = candidate,
            Some(_) => {}
            None => {
                traits.insert(name.to_owned(), candidate);
            }
        },
        Strategy::NonEmpty => {
            if empty(&candidate.value) {
                return;
            }
            match current {
                Some(current) if empty(&current.value) || candidate.supersedes(current) => {
                    *current = candidate;
                }
                Some(_) => {}
                None => {
                    traits.insert(name.to_owned(), candidate);
                }
            }
        }
        Strategy::Sum => {
            let Some(add) = candidate.value.as_f64() else {
                return;
            };
            match current {
                Some(current) => {
                    let total = current.value.as_f64().unwrap_or(0.0) + add;
                    current.value = number(total);
                    latest_provenance(current, &candidate);
                }
                None => {
                    traits.insert(
                        name.to_owned(),
                        TraitValue {
                            value: number(add),
                            ..candidate
                        },
                    );
                }
            }
        }
        Strategy::AppendUnique => {
            let mut values: BTreeMap<String, Value> = BTreeMap::new();
            collect_into(&mut values, &candidate.value);
            // A value that adds nothing (null, an empty list) changes nothing, not even the
            // provenance.
            if values.is_empty() {
                return;
            }
            if let Some(current) = &current {
                collect_into(&mut values, &current.value);
            }
            while values.len() > MAX_APPENDED {
                values.pop_last();
            }
            let list = Value::Array(values.into_values().collect());
            match current {
                Some(current) => {
                    current.value = list;
                    latest_provenance(current, &candidate);
                }
                None => {
                    traits.insert(
                        name.to_owned(),
                        TraitValue {
                            value: list,
                            ..candidate
                        },
                    );
                }
            }
        }
    }
}

/// Adds the values of `v` (the items of a list, or `v` itself) to `values`, by JSON text.
fn collect_into(values: &mut BTreeMap<String, Value>, v: &Value) {
    match v {
        Value::Array(items) => {
            for item in items.iter().filter(|i| !i.is_null()) {
                values.insert(item.to_string(), item.clone());
            }
        }
        Value::Null => {}
        Value::Bool(_) | Value::Number(_) | Value::String(_) | Value::Object(_) => {
            values.insert(v.to_string(), v.clone());
        }
    }
}

/// Keeps the provenance (time, event id) of the later of `current` and `candidate`.
fn latest_provenance(current: &mut TraitValue, candidate: &TraitValue) {
    if candidate.supersedes(current) {
        current.observed_at = candidate.observed_at;
        current.event_id.clone_from(&candidate.event_id);
    }
}

fn empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.trim().is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

fn number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::{any, prop, prop_assert_eq, proptest};
    use serde_json::json;
    use time::macros::datetime;
    use time::{Duration, OffsetDateTime};

    use super::*;

    const T0: OffsetDateTime = datetime!(2026-05-01 00:00:00 UTC);

    fn value(minute: i64, id: &str, value: Value) -> TraitValue {
        TraitValue {
            value,
            observed_at: T0 + Duration::minutes(minute),
            event_id: id.to_owned(),
        }
    }

    fn fold(strategy: Strategy, values: &[TraitValue]) -> Option<TraitValue> {
        let mut traits = BTreeMap::new();
        for v in values {
            set(&mut traits, "t", v.clone(), strategy);
        }
        traits.remove("t")
    }

    #[test]
    fn each_strategy_keeps_what_it_says() {
        let values = [
            value(1, "e1", json!("a")),
            value(3, "e3", json!("")),
            value(2, "e2", json!(["b", "a"])),
        ];
        assert_eq!(fold(Strategy::Latest, &values).unwrap().value, json!(""));
        assert_eq!(fold(Strategy::First, &values).unwrap().value, json!("a"));
        let non_empty = fold(Strategy::NonEmpty, &values).unwrap();
        assert_eq!(non_empty.value, json!(["b", "a"]));
        assert_eq!(non_empty.event_id, "e2");
        let appended = fold(Strategy::AppendUnique, &values).unwrap();
        assert_eq!(appended.value, json!(["", "a", "b"]));
        assert_eq!(appended.event_id, "e3", "provenance of the latest event");
        let sums = [
            value(1, "e1", json!(10)),
            value(2, "e2", json!("x")),
            value(3, "e3", json!(2.5)),
        ];
        let total = fold(Strategy::Sum, &sums).unwrap();
        assert_eq!(total.value, json!(12.5));
        assert_eq!(total.event_id, "e3");
        assert!(fold(Strategy::Sum, &[value(1, "e1", json!("x"))]).is_none());
        assert!(fold(Strategy::NonEmpty, &[value(1, "e1", json!(null))]).is_none());
    }

    #[test]
    fn contact_traits_are_personal_data_unless_declared_otherwise() {
        let rule = |class, pii| TraitRule {
            strategy: Strategy::Latest,
            class,
            pii,
        };
        assert!(rule(Some(TraitClass::Contact), None).is_pii());
        assert!(!rule(Some(TraitClass::Contact), Some(false)).is_pii());
        assert!(rule(Some(TraitClass::Demographic), Some(true)).is_pii());
        assert!(!rule(None, None).is_pii());
    }

    proptest! {
        /// Folding values in any order, or in two halves combined either way (a merge), gives
        /// the same value.
        #[test]
        fn strategies_do_not_depend_on_order_or_merges(
            raw in prop::collection::vec((0..50i64, 0..6u8), 1..20),
            at in any::<prop::sample::Index>(),
            strategy in prop::sample::select(vec![
                Strategy::Latest, Strategy::First, Strategy::NonEmpty, Strategy::Sum,
                Strategy::AppendUnique,
            ]),
        ) {
            let values: Vec<TraitValue> = raw
                .iter()
                .enumerate()
                .map(|(i, (minute, v))| {
                    let v = match v {
                        0 => json!(null),
                        1 => json!(""),
                        2 => json!(i64::from(*v) * 4),
                        3 => json!(["x", i64::from(*v)]),
                        4 => json!("y"),
                        _ => json!(1.5),
                    };
                    value(*minute, &format!("e{i}"), v)
                })
                .collect();
            let straight = fold(strategy, &values);
            let mut reversed = values.clone();
            reversed.reverse();
            prop_assert_eq!(&fold(strategy, &reversed), &straight);
            let cut = at.index(values.len());
            let (left, right) = (fold(strategy, &values[..cut]), fold(strategy, &values[cut..]));
            let merged = |a: &Option<TraitValue>, b: &Option<TraitValue>| {
                let mut traits = BTreeMap::new();
                for v in [a, b].into_iter().flatten() {
                    set(&mut traits, "t", v.clone(), strategy);
                }
                traits.remove("t")
            };
            prop_assert_eq!(&merged(&left, &right), &straight);
            prop_assert_eq!(&merged(&right, &left), &straight);
        }
    }
}
