//! Audiences: named boolean conditions over a profile's traits, computed traits, scores and
//! events, declared in config; a profile is a member while its condition holds.
//!
//! A condition is a tree (`all`, `any`, `not`) of tests on a trait, a computed trait, a score or
//! a trait of the person's accounts (`eq`, `ne`, `gt`, `gte`, `lt`, `lte`, `in`, `contains`,
//! `exists`, `missing`) and of event conditions (`performed` an event at least / at most so many times, optionally within a
//! window). An event condition is kept by a hidden windowed count ([`Audiences::hidden`]),
//! folded with the profile's other computed traits, so membership is correct whatever the
//! order events arrive in, across merges and unmerges, and changes as time passes without new
//! events (evaluated at read time, like computed traits).
//!
//! An account test holds when some account the person belongs to (through group calls) has a
//! trait or an account computed trait that meets it (a declared account computed trait hides the
//! account trait of its name, also while it has no value, as in account scoring plans and the
//! Profile API: [`crate::account::shown_value`]); for a person
//! without accounts it is evaluated as for an absent value (so only `ne` and `missing` hold).
//! It reads the copy of the accounts' values the profile carries
//! ([`crate::computed::ComputedState::account_traits`], made by [`Audiences::account_facts`]),
//! refreshed in the write that applies the person's own events and, when another member's
//! group call or event changes an account, by the account refresh that follows it (about a
//! second later).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::computed::{ComputedTrait, ComputedValue, Kind};
use crate::domain::{Score, TraitValue};

/// One audience as declared (`[[profile.audiences]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audience {
    /// The audience's name, unique among audiences.
    pub name: String,
    /// Who belongs.
    pub condition: Condition,
}

/// A membership condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    /// Every condition holds (true when empty).
    All(Vec<Condition>),
    /// Some condition holds (false when empty).
    Any(Vec<Condition>),
    /// The condition does not hold.
    Not(Box<Condition>),
    /// A test on a trait's value.
    Trait(Test),
    /// A test on a computed trait's value.
    Computed(Test),
    /// A test on a score's value.
    Score(Test),
    /// A test on a trait of the person's accounts: holds when some account meets it.
    Account(Test),
    /// An event performed a number of times, optionally within the last `within_seconds`.
    Performed(Performed),
}

pub use tessera_core::condition::{Op, Test};

/// An event condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Performed {
    /// The event name (a track's event, or a page's or screen's name).
    pub event: String,
    /// The fewest times (default 1).
    #[serde(default = "one")]
    pub at_least: u64,
    /// The most times, if bounded.
    #[serde(default)]
    pub at_most: Option<u64>,
    /// Only the last this many seconds, as of when membership is evaluated.
    #[serde(default)]
    pub within_seconds: Option<u64>,
}

fn one() -> u64 {
    1
}

/// What a profile offers its audiences' conditions.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// Its traits.
    pub traits: &'a BTreeMap<String, TraitValue>,
    /// Its computed traits, declared and hidden, evaluated now.
    pub computed: &'a BTreeMap<String, ComputedValue>,
    /// Its scores.
    pub scores: &'a BTreeMap<String, Score>,
    /// The traits and account computed traits of each of its accounts (JSON objects, name →
    /// value, as [`Audiences::account_facts`] makes them).
    pub accounts: &'a [&'a Value],
}

/// The declared audiences, compiled.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Audiences {
    audiences: Vec<Audience>,
    /// The hidden counts that keep event conditions, by the name the conditions read.
    hidden: Vec<ComputedTrait>,
    /// For each audience, for each of its `performed` conditions in tree order, the hidden
    /// count it reads.
    slots: Vec<Vec<String>>,
    /// The names the account tests read (account traits or account computed traits).
    account_traits: std::collections::BTreeSet<String>,
}

/// The most conditions one audience may hold.
const MAX_CONDITIONS: usize = 100;
/// The deepest an audience's condition tree may nest.
const MAX_DEPTH: usize = 16;

impl Audiences {
    /// Compiles `audiences`, or says what is wrong with the first unusable one.
    pub fn compile(audiences: Vec<Audience>) -> Result<Self, String> {
        let mut names = std::collections::HashSet::new();
        let mut out = Self::default();
        for audience in audiences {
            if audience.name.is_empty() || audience.name.len() > 200 {
                return Err("an audience name must be 1 to 200 bytes".into());
            }
            if !names.insert(audience.name.clone()) {
                return Err(format!("audience {:?} is declared twice", audience.name));
            }
            let mut count = 0;
            check(&audience.condition, 0, &mut count)
                .map_err(|e| format!("audience {:?}: {e}", audience.name))?;
            let mut slots = Vec::new();
            performed(&audience.condition, &mut |p| {
                let name = format!("audience:{}:{}", audience.name, slots.len());
                out.hidden.push(ComputedTrait {
                    name: name.clone(),
                    kind: Kind::Count,
                    events: vec![p.event.clone()],
                    types: Vec::new(),
                    property: None,
                    window_seconds: p.within_seconds,
                });
                slots.push(name);
            });
            out.slots.push(slots);
            account_tests(&audience.condition, &mut |test| {
                out.account_traits.insert(test.name.clone());
            });
            out.audiences.push(audience);
        }
        Ok(out)
    }

    /// The hidden counts the event conditions read: fold them with the computed traits.
    pub fn hidden(&self) -> &[ComputedTrait] {
        &self.hidden
    }

    /// The names some account test reads (an account trait or an account computed trait):
    /// what profiles keep a copy of.
    pub fn account_traits(&self) -> &std::collections::BTreeSet<String> {
        &self.account_traits
    }

    /// What the account tests read of one account, from its `traits` and the values of its
    /// account computed traits (`computed`, of those `declared`): the values of the names they
    /// test, as a JSON object. A declared account computed trait hides the account trait of its
    /// name, also while it has no value (see [`crate::account::shown_value`]).
    pub fn account_facts(
        &self,
        traits: &BTreeMap<String, TraitValue>,
        declared: &[ComputedTrait],
        computed: &BTreeMap<String, ComputedValue>,
    ) -> Value {
        let mut facts = serde_json::Map::new();
        for name in &self.account_traits {
            if let Some(value) = crate::account::shown_value(name, traits, declared, computed) {
                facts.insert(name.clone(), value.clone());
            }
        }
        Value::Object(facts)
    }

    /// Whether any audience is declared.
    pub fn is_empty(&self) -> bool {
        self.audiences.is_empty()
    }

    /// The names of the audiences whose condition `facts` meet, in declaration order.
    pub fn members(&self, facts: Facts<'_>) -> Vec<String> {
        self.audiences
            .iter()
            .zip(&self.slots)
            .filter(|(audience, slots)| {
                let mut next = slots.iter();
                holds(&audience.condition, facts, &mut next)
            })
            .map(|(audience, _)| audience.name.clone())
            .collect()
    }

    /// Every declared audience.
    pub fn declared(&self) -> &[Audience] {
        &self.audiences
    }
}

fn check(condition: &Condition, depth: usize, count: &mut usize) -> Result<(), String> {
    *count += 1;
    if depth > MAX_DEPTH {
        return Err(format!("conditions nest deeper than {MAX_DEPTH}"));
    }
    if *count > MAX_CONDITIONS {
        return Err(format!("more than {MAX_CONDITIONS} conditions"));
    }
    match condition {
        Condition::All(all) | Condition::Any(all) => {
            for c in all {
                check(c, depth + 1, count)?;
            }
            Ok(())
        }
        Condition::Not(inner) => check(inner, depth + 1, count),
        Condition::Trait(test)
        | Condition::Computed(test)
        | Condition::Score(test)
        | Condition::Account(test) => test.problem().map_or(Ok(()), Err),
        Condition::Performed(p) => {
            if p.event.is_empty() {
                return Err("performed needs an event".into());
            }
            if p.within_seconds == Some(0) {
                return Err(format!("{}: within_seconds must be at least 1", p.event));
            }
            if p.at_most.is_some_and(|most| most < p.at_least) {
                return Err(format!("{}: at_most is below at_least", p.event));
            }
            Ok(())
        }
    }
}

/// Calls `f` on every `performed` condition, in tree order.
fn performed(condition: &Condition, f: &mut impl FnMut(&Performed)) {
    match condition {
        Condition::All(all) | Condition::Any(all) => {
            for c in all {
                performed(c, f);
            }
        }
        Condition::Not(inner) => performed(inner, f),
        Condition::Performed(p) => f(p),
        Condition::Trait(_)
        | Condition::Computed(_)
        | Condition::Score(_)
        | Condition::Account(_) => {}
    }
}

/// Calls `f` on every account test, in tree order.
fn account_tests(condition: &Condition, f: &mut impl FnMut(&Test)) {
    match condition {
        Condition::All(all) | Condition::Any(all) => {
            for c in all {
                account_tests(c, f);
            }
        }
        Condition::Not(inner) => account_tests(inner, f),
        Condition::Account(test) => f(test),
        Condition::Trait(_)
        | Condition::Computed(_)
        | Condition::Score(_)
        | Condition::Performed(_) => {}
    }
}

/// Whether `condition` holds; `slots` yields the hidden count of each `performed` condition in
/// tree order (every branch is walked, so the slots stay aligned).
fn holds<'s>(
    condition: &Condition,
    facts: Facts<'_>,
    slots: &mut impl Iterator<Item = &'s String>,
) -> bool {
    match condition {
        // Every branch is evaluated (no short circuit), so each `performed` condition takes
        // its own slot.
        Condition::All(all) => {
            let results: Vec<bool> = all.iter().map(|c| holds(c, facts, slots)).collect();
            results.into_iter().all(|b| b)
        }
        Condition::Any(any) => {
            let results: Vec<bool> = any.iter().map(|c| holds(c, facts, slots)).collect();
            results.into_iter().any(|b| b)
        }
        Condition::Not(inner) => !holds(inner, facts, slots),
        Condition::Trait(test) => test.holds(facts.traits.get(&test.name).map(|t| &t.value)),
        Condition::Computed(test) => test.holds(facts.computed.get(&test.name).map(|c| &c.value)),
        Condition::Score(test) => {
            let value = facts
                .scores
                .get(&test.name)
                .and_then(|s| serde_json::Number::from_f64(s.value))
                .map(Value::Number);
            test.holds(value.as_ref())
        }
        Condition::Account(test) => {
            if facts.accounts.is_empty() {
                test.holds(None)
            } else {
                facts
                    .accounts
                    .iter()
                    .any(|traits| test.holds(traits.get(&test.name)))
            }
        }
        Condition::Performed(p) => {
            let times = slots
                .next()
                .and_then(|slot| facts.computed.get(slot))
                .and_then(|c| c.value.as_u64())
                .unwrap_or(0);
            times >= p.at_least && p.at_most.is_none_or(|most| times <= most)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::OffsetDateTime;
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-06-01 00:00:00 UTC);

    fn parse(toml_text: &str) -> Vec<Audience> {
        #[derive(Deserialize)]
        struct File {
            audiences: Vec<Audience>,
        }
        let file: File = toml::from_str(toml_text).expect("audiences parse");
        file.audiences
    }

    fn trait_value(value: Value) -> TraitValue {
        TraitValue {
            value,
            observed_at: NOW,
            event_id: "e".into(),
        }
    }

    #[test]
    fn conditions_combine_traits_computed_traits_scores_and_events() {
        let audiences = Audiences::compile(parse(
            r#"
            [[audiences]]
            name = "engaged_pros"
            condition = { all = [
              { trait = { name = "plan", op = "in", value = ["pro", "team"] } },
              { not = { trait = { name = "churned", op = "eq", value = true } } },
              { score = { name = "engagement", op = "gte", value = 50 } },
              { performed = { event = "Order Completed", at_least = 2, within_seconds = 2592000 } },
            ] }

            [[audiences]]
            name = "no_orders"
            condition = { performed = { event = "Order Completed", at_least = 0, at_most = 0 } }

            [[audiences]]
            name = "big_spenders"
            condition = { any = [
              { computed = { name = "spent", op = "gt", value = 1000 } },
              { trait = { name = "email", op = "contains", value = "@bigco.com" } },
            ] }
            "#,
        ))
        .expect("compile");
        assert_eq!(audiences.hidden().len(), 2);
        assert_eq!(audiences.hidden()[0].window_seconds, Some(2_592_000));

        let traits = BTreeMap::from([
            ("plan".to_owned(), trait_value(json!("pro"))),
            ("email".to_owned(), trait_value(json!("ann@bigco.com"))),
        ]);
        let scores = BTreeMap::from([(
            "engagement".to_owned(),
            Score {
                name: "engagement".into(),
                value: 72.0,
                computed_at: NOW,
                model_version: String::new(),
                factors: Vec::new(),
            },
        )]);
        let count = |n: u64| ComputedValue {
            value: json!(n),
            observed_at: None,
        };
        let mut computed = BTreeMap::from([
            ("audience:engaged_pros:0".to_owned(), count(2)),
            ("audience:no_orders:0".to_owned(), count(2)),
        ]);
        let facts = |computed: &BTreeMap<String, ComputedValue>| {
            audiences.members(Facts {
                traits: &traits,
                computed,
                scores: &scores,
                accounts: &[],
            })
        };
        assert_eq!(facts(&computed), ["engaged_pros", "big_spenders"]);
        computed.insert("audience:engaged_pros:0".into(), count(1));
        computed.insert("audience:no_orders:0".into(), count(0));
        assert_eq!(facts(&computed), ["no_orders", "big_spenders"]);
    }

    #[test]
    fn account_tests_hold_when_some_account_meets_them() {
        let audiences = Audiences::compile(parse(
            r#"
            [[audiences]]
            name = "software"
            condition = { account = { name = "industry", op = "eq", value = "Software" } }

            [[audiences]]
            name = "no_large_account"
            condition = { not = { account = { name = "employees", op = "gte", value = 1000 } } }

            [[audiences]]
            name = "no_industry"
            condition = { account = { name = "industry", op = "missing" } }
            "#,
        ))
        .expect("compile");
        assert_eq!(
            audiences.account_traits().iter().collect::<Vec<_>>(),
            ["employees", "industry"]
        );
        let (traits, computed, scores) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        let members = |accounts: &[&Value]| {
            audiences.members(Facts {
                traits: &traits,
                computed: &computed,
                scores: &scores,
                accounts,
            })
        };
        let software = json!({"industry": "Software", "employees": 50});
        let retail = json!({"industry": "Retail", "employees": 5000});
        let unknown = json!({"plan": "pro"});
        assert_eq!(members(&[]), ["no_large_account", "no_industry"]);
        assert_eq!(members(&[&software]), ["software", "no_large_account"]);
        assert_eq!(members(&[&retail, &software]), ["software"]);
        assert_eq!(members(&[&retail]), Vec::<String>::new());
        assert_eq!(members(&[&unknown]), ["no_large_account", "no_industry"]);
    }

    #[test]
    fn account_tests_read_account_computed_traits_over_traits_of_their_name() {
        let audiences = Audiences::compile(parse(
            r#"
            [[audiences]]
            name = "busy_accounts"
            condition = { account = { name = "orders_30d", op = "gte", value = 3 } }

            [[audiences]]
            name = "software"
            condition = { account = { name = "industry", op = "eq", value = "Software" } }
            "#,
        ))
        .expect("compile");
        let traits = BTreeMap::from([
            ("industry".to_owned(), trait_value(json!("Software"))),
            ("orders_30d".to_owned(), trait_value(json!(100))),
            ("plan".to_owned(), trait_value(json!("pro"))),
        ]);
        let computed = |orders: u64| {
            BTreeMap::from([
                (
                    "orders_30d".to_owned(),
                    ComputedValue {
                        value: json!(orders),
                        observed_at: None,
                    },
                ),
                (
                    "revenue".to_owned(),
                    ComputedValue {
                        value: json!(5.0),
                        observed_at: None,
                    },
                ),
            ])
        };
        let (person, person_computed, scores) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        let members = |accounts: &[&Value]| {
            audiences.members(Facts {
                traits: &person,
                computed: &person_computed,
                scores: &scores,
                accounts,
            })
        };
        let declared: Vec<ComputedTrait> = ["orders_30d", "revenue"]
            .map(|name| ComputedTrait {
                name: name.into(),
                kind: Kind::Sum,
                events: vec!["Order Completed".into()],
                types: Vec::new(),
                property: Some("total".into()),
                window_seconds: Some(30 * 86_400),
            })
            .to_vec();
        let two = audiences.account_facts(&traits, &declared, &computed(2));
        assert_eq!(
            two,
            json!({"industry": "Software", "orders_30d": 2}),
            "only what the tests read is kept, and the computed trait wins over the trait"
        );
        assert_eq!(members(&[&two]), ["software"]);
        let three = audiences.account_facts(&traits, &declared, &computed(3));
        assert_eq!(members(&[&three]), ["busy_accounts", "software"]);
        // Some account meeting it is enough.
        assert_eq!(members(&[&two, &three]), ["busy_accounts", "software"]);
        // Declared but without a value (nothing counted yet, or its window emptied): the
        // account trait of its name stays hidden, the test reads an absent value.
        let no_value = audiences.account_facts(&traits, &declared, &BTreeMap::new());
        assert_eq!(no_value, json!({"industry": "Software"}));
        assert_eq!(members(&[&no_value]), ["software"]);
        // Without an account computed trait of the name declared, the account trait is read.
        let declared_none = audiences.account_facts(&traits, &[], &BTreeMap::new());
        assert_eq!(declared_none["orders_30d"], json!(100));
        assert_eq!(members(&[&declared_none]), ["busy_accounts", "software"]);

        // Account names are open (neither a trait nor a computed trait anyone declared is fine),
        // but an op that does not fit its value is still refused.
        assert!(
            Audiences::compile(parse(
                r#"[[audiences]]
                name = "a"
                condition = { account = { name = "never_declared", op = "exists" } }"#
            ))
            .is_ok()
        );
        assert!(
            Audiences::compile(parse(
                r#"[[audiences]]
                name = "a"
                condition = { account = { name = "orders_30d", op = "gte", value = "three" } }"#
            ))
            .unwrap_err()
            .contains("number")
        );
    }

    #[test]
    fn unusable_declarations_are_refused_with_the_reason() {
        let refused = |text: &str| Audiences::compile(parse(text)).unwrap_err();
        assert!(
            refused(
                r#"[[audiences]]
            name = "a"
            condition = { trait = { name = "age", op = "gt", value = "old" } }"#
            )
            .contains("number")
        );
        assert!(
            refused(
                r#"[[audiences]]
            name = "a"
            condition = { performed = { event = "x", at_least = 3, at_most = 1 } }
            [[audiences]]
            name = "b"
            condition = { all = [] }"#
            )
            .contains("at_most")
        );
        assert!(
            refused(
                r#"[[audiences]]
            name = "a"
            condition = { all = [] }
            [[audiences]]
            name = "a"
            condition = { any = [] }"#
            )
            .contains("twice")
        );
        let mut deep = Condition::All(vec![]);
        for _ in 0..20 {
            deep = Condition::Not(Box::new(deep));
        }
        assert!(
            Audiences::compile(vec![Audience {
                name: "deep".into(),
                condition: deep
            }])
            .unwrap_err()
            .contains("deeper")
        );
        assert!(
            toml::from_str::<toml::Value>("x = 1").is_ok()
                && serde_json::from_value::<Condition>(
                    json!({"trait": {"name": "a", "op": "eq", "vlue": 1}})
                )
                .is_err(),
            "unknown keys are refused"
        );
    }
}
