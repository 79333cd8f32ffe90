//! Computed traits: aggregates over a profile's events, declared in config, kept up to date on
//! every event and evaluated when read.
//!
//! Each declared trait keeps an accumulator in the profile's state. Accumulators are folded
//! event by event and combined on merge by commutative rules (counts and sums add, minimum and
//! maximum, the first and last by event time then event id, value counts add, windowed
//! entries are a union), so the result does not depend on the order events arrive in or on
//! which profile survives a merge; an unmerge rebuilds each side from its events, so computed
//! traits follow. A windowed trait keeps the matching events inside its window and is evaluated
//! at read time: its value changes as time passes, also without new events, and the profile
//! says until when its computed values hold ([`ComputedState::valid_until`]).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::{Duration, OffsetDateTime};

use crate::domain::ResolvedEvent;

/// The most distinct values a `most_frequent`, `unique` or `unique_count` trait keeps; further
/// values are ignored (the smallest values, by their JSON text, are kept).
pub const MAX_DISTINCT: usize = 1_000;
/// The most events a windowed trait keeps in its window; the oldest go first.
pub const MAX_WINDOW_ENTRIES: usize = 10_000;

/// What a computed trait computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// How many matching events.
    Count,
    /// The sum of a numeric property.
    Sum,
    /// The mean of a numeric property.
    Avg,
    /// The smallest value of a numeric property.
    Min,
    /// The largest value of a numeric property.
    Max,
    /// The property's value in the earliest matching event, with its time.
    First,
    /// The property's value in the latest matching event, with its time.
    Last,
    /// The value seen most often (ties: the smallest by its JSON text).
    MostFrequent,
    /// The distinct values, as a list ordered by their JSON text.
    Unique,
    /// How many distinct values.
    UniqueCount,
}

impl Kind {
    fn numeric(self) -> bool {
        matches!(self, Self::Sum | Self::Avg | Self::Min | Self::Max)
    }
}

/// One computed trait as declared (`[[profile.computed_traits]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputedTrait {
    /// The trait's name, unique among computed traits.
    pub name: String,
    /// What it computes.
    pub kind: Kind,
    /// Only events with these names (a track's event name, or a page's or screen's name); all
    /// when empty.
    #[serde(default)]
    pub events: Vec<String>,
    /// Only messages of these types (`track`, `page`, `identify`, ...); all when empty.
    #[serde(default)]
    pub types: Vec<String>,
    /// The property the trait aggregates, a dotted path into the event's properties
    /// (`total`, `product.category`); `traits.<name>` reads the person traits instead.
    /// Required for every kind but `count`.
    #[serde(default)]
    pub property: Option<String>,
    /// Only events of the last this many seconds, as of when the trait is read.
    #[serde(default)]
    pub window_seconds: Option<u64>,
}

impl ComputedTrait {
    /// Why the declaration is unusable, if it is.
    pub fn problem(&self) -> Option<String> {
        self.violation().map(|(field, reason)| match field {
            "name" => format!("name: {reason}"),
            _ => format!("{}: {field} {reason}", self.name),
        })
    }

    /// The field that makes the declaration unusable and why, if one does (the same checks as
    /// [`ComputedTrait::problem`], for errors that name the field).
    pub fn violation(&self) -> Option<(&'static str, String)> {
        if self.name.is_empty() || self.name.len() > 200 {
            return Some(("name", "1 to 200 bytes".into()));
        }
        if self.name.starts_with(CONSENT_PREFIX) {
            return Some((
                "name",
                format!("`{CONSENT_PREFIX}` names are reserved for consent"),
            ));
        }
        if let Some(prefix) = [ACCOUNT_PREFIX, ACCOUNT_TRAITS_PREFIX]
            .into_iter()
            .find(|p| self.name.starts_with(p))
        {
            return Some((
                "name",
                format!("`{prefix}` names are reserved for accounts"),
            ));
        }
        if self.kind != Kind::Count && self.property.as_deref().is_none_or(str::is_empty) {
            return Some(("property", format!("is required for {:?}", self.kind)));
        }
        if self.window_seconds == Some(0) {
            return Some(("window_seconds", "must be at least 1".into()));
        }
        None
    }

    fn window(&self) -> Option<Duration> {
        self.window_seconds
            .map(|s| Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX)))
    }

    fn matches(&self, event: &ResolvedEvent) -> bool {
        let d = &event.details;
        (self.types.is_empty() || self.types.contains(&d.kind))
            && (self.events.is_empty() || self.events.iter().any(|e| d.is_named(e)))
    }

    /// The value the trait takes from `event`: `Null` for a count, else the property's value
    /// (a number for the numeric kinds); `None` when the event does not count.
    pub(crate) fn value_of(&self, event: &ResolvedEvent) -> Option<Value> {
        if !self.matches(event) {
            return None;
        }
        let Some(path) = self.property.as_deref() else {
            return Some(Value::Null);
        };
        let (root, path) = match path.strip_prefix("traits.") {
            Some(rest) => (&event.traits, rest),
            None => (&event.details.properties, path),
        };
        let mut parts = path.split('.');
        let mut value = root.get(parts.next()?)?;
        for part in parts {
            value = value.get(part)?;
        }
        match value {
            Value::Null => None,
            Value::Number(_) => Some(value.clone()),
            Value::Bool(_) | Value::String(_) | Value::Array(_) | Value::Object(_) => {
                (!self.kind.numeric()).then(|| value.clone())
            }
        }
    }
}

/// A computed trait's value as read.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputedValue {
    /// The value.
    pub value: Value,
    /// For `first` and `last`: the time of the event it comes from.
    pub observed_at: Option<OffsetDateTime>,
}

/// One event a windowed trait keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Its id.
    pub event_id: String,
    /// The value it contributes.
    pub value: Value,
}

/// A computed trait's accumulator. Self-describing, so two accumulators combine without their
/// declaration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "acc", rename_all = "snake_case")]
pub enum Acc {
    /// Matching events.
    Count { n: i64 },
    /// Matching events and the sum of their values (sum and avg).
    Sum { n: i64, sum: f64 },
    /// The smallest value.
    Min { value: f64 },
    /// The largest value.
    Max { value: f64 },
    /// The earliest value (by time, then event id).
    First(Entry),
    /// The latest value (by time, then event id).
    Last(Entry),
    /// How often each value (by its JSON text) was seen.
    Counts { counts: BTreeMap<String, i64> },
    /// The matching events of a window, oldest first.
    Window { entries: Vec<Entry> },
    /// Decayed activity (see [`tessera_core::activity`]): `log2` of the sum of
    /// `2^((t - epoch) / half_life)` over the matching events, the half-life known to the reader.
    Decayed { log2: f64 },
}

impl Acc {
    /// The entry of a `last` accumulator.
    fn last(&self) -> Option<&Entry> {
        match self {
            Self::Last(entry) => Some(entry),
            Self::Count { .. }
            | Self::Sum { .. }
            | Self::Min { .. }
            | Self::Max { .. }
            | Self::First(_)
            | Self::Counts { .. }
            | Self::Window { .. }
            | Self::Decayed { .. } => None,
        }
    }
}

/// The prefix of the accumulators that keep consent: `consent:<purpose>`, the latest preference
/// (by event time, then event id) for the purpose, from the events'
/// `context.consent.categoryPreferences`. Kept with the computed traits so merges, unmerges,
/// history and deletion treat consent like every other derived value.
pub const CONSENT_PREFIX: &str = "consent:";

/// The prefix of the accumulators that keep a person's accounts: `account:<group id>`, from
/// the person's group calls, the latest (by event time, then event id) holding the person's
/// role and title in the account (`{"role", "title"}` from the call's `context.traits`).
pub const ACCOUNT_PREFIX: &str = "account:";

/// The prefix of the copies of a person's accounts' values that audiences read:
/// `account_traits:<group id>`, a `last` entry holding `{name: value}` for the account traits
/// and account computed traits the audiences' account tests name. Not folded from the person's
/// events: copied from the accounts whenever the profile is written (another member's group
/// call or event may change them; the account refresh then copies them again). The entry's `at`
/// is until when the copy holds: when a windowed account computed value it holds next changes
/// without a new event (the sweeper copies it again then), the Unix epoch when none will.
/// Kept with the computed values so they travel with the profile into the cache and its
/// history.
pub const ACCOUNT_TRAITS_PREFIX: &str = "account_traits:";

/// The longest purpose name kept, in bytes; longer ones are ignored.
const MAX_PURPOSE: usize = 200;

/// The accumulators of a profile's computed traits, by trait name.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ComputedState(pub BTreeMap<String, Acc>);

impl ComputedState {
    /// Folds the consent preferences `event` states (`context.consent.categoryPreferences`,
    /// purpose → granted; values other than booleans are ignored) into the latest preference
    /// per purpose.
    pub fn apply_consent(&mut self, event: &ResolvedEvent) {
        let Some(preferences) = event
            .details
            .context
            .get("consent")
            .and_then(|c| c.get("categoryPreferences"))
            .and_then(Value::as_object)
        else {
            return;
        };
        for (purpose, granted) in preferences {
            if purpose.is_empty() || purpose.len() > MAX_PURPOSE || !granted.is_boolean() {
                continue;
            }
            self.fold_last(
                format!("{CONSENT_PREFIX}{purpose}"),
                Entry {
                    at: event.timestamp,
                    event_id: event.event_id.clone(),
                    value: granted.clone(),
                },
            );
        }
    }

    /// Folds a group call into the person's memberships: the account (its group id) with the
    /// person's role and title from the call's `context.traits`, the latest call winning.
    pub fn apply_account(&mut self, event: &ResolvedEvent) {
        let group_id = &event.details.group_id;
        if event.details.kind != "group" || group_id.is_empty() || group_id.len() > MAX_PURPOSE {
            return;
        }
        let traits = event
            .details
            .context
            .get("traits")
            .and_then(Value::as_object);
        let mut membership = serde_json::Map::new();
        for key in ["role", "title"] {
            if let Some(value) = traits.and_then(|t| t.get(key)).filter(|v| v.is_string()) {
                membership.insert(key.to_owned(), value.clone());
            }
        }
        self.fold_last(
            format!("{ACCOUNT_PREFIX}{group_id}"),
            Entry {
                at: event.timestamp,
                event_id: event.event_id.clone(),
                value: Value::Object(membership),
            },
        );
    }

    /// The person's accounts: (group id, `{role, title}`, the latest group call).
    pub fn accounts(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.prefixed(ACCOUNT_PREFIX)
            .filter_map(|(id, acc)| Some((id, acc.last()?)))
    }

    /// The copies of the person's accounts' traits: (group id, `{name: value}`), in id order.
    pub fn account_traits(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.prefixed(ACCOUNT_TRAITS_PREFIX)
            .filter_map(|(id, acc)| Some((id, &acc.last()?.value)))
    }

    /// Copies `traits(group id)` (a JSON object, and until when it holds: `None` until the
    /// account changes) for each of the person's accounts, and drops the copies of accounts the
    /// person no longer belongs to; with `copy` false, drops every copy (no audience reads
    /// them). Whether anything changed.
    pub fn set_account_traits(
        &mut self,
        copy: bool,
        traits: impl Fn(&str) -> (Value, Option<OffsetDateTime>),
    ) -> bool {
        let wanted: BTreeMap<String, (Value, OffsetDateTime)> = if copy {
            self.accounts()
                .map(|(id, _)| {
                    let (value, until) = traits(id);
                    (
                        id.to_owned(),
                        (value, until.unwrap_or(OffsetDateTime::UNIX_EPOCH)),
                    )
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        let copies: Vec<(&str, &Entry)> = self
            .prefixed(ACCOUNT_TRAITS_PREFIX)
            .filter_map(|(id, acc)| Some((id, acc.last()?)))
            .collect();
        let same = wanted.len() == copies.len()
            && copies.iter().all(|(id, entry)| {
                wanted
                    .get(*id)
                    .is_some_and(|(value, until)| *value == entry.value && *until == entry.at)
            });
        if same {
            return false;
        }
        self.0
            .retain(|name, _| !name.starts_with(ACCOUNT_TRAITS_PREFIX));
        for (id, (value, until)) in wanted {
            self.0.insert(
                format!("{ACCOUNT_TRAITS_PREFIX}{id}"),
                Acc::Last(Entry {
                    at: until,
                    event_id: String::new(),
                    value,
                }),
            );
        }
        true
    }

    /// The earliest time after `now` at which a copy of an account's values stops holding (a
    /// windowed account computed value in it changes); `None` when none will.
    pub fn account_traits_valid_until(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        self.prefixed(ACCOUNT_TRAITS_PREFIX)
            .filter_map(|(_, acc)| Some(acc.last()?.at))
            .filter(|until| *until > now)
            .min()
    }

    /// The accumulators under `prefix`, by the rest of their name.
    fn prefixed<'s>(&'s self, prefix: &'s str) -> impl Iterator<Item = (&'s str, &'s Acc)> {
        self.0
            .range(prefix.to_owned()..)
            .map_while(move |(name, acc)| Some((name.strip_prefix(prefix)?, acc)))
    }

    /// Keeps `entry` under `name` if it is the latest.
    fn fold_last(&mut self, name: String, entry: Entry) {
        self.fold(name, Acc::Last(entry));
    }

    /// Combines `acc` into the accumulator `name` (or keeps it there when there is none).
    pub(crate) fn fold(&mut self, name: String, acc: Acc) {
        match self.0.get_mut(&name) {
            Some(mine) => combine(mine, acc),
            None => {
                self.0.insert(name, acc);
            }
        }
    }

    /// The latest consent preference per purpose: (purpose, granted, the event that stated it).
    pub fn consent(&self) -> impl Iterator<Item = (&str, bool, &Entry)> {
        self.prefixed(CONSENT_PREFIX).filter_map(|(purpose, acc)| {
            let entry = acc.last()?;
            Some((purpose, entry.value.as_bool()?, entry))
        })
    }

    /// Folds one event into the accumulator of every trait it counts for.
    pub fn apply(&mut self, traits: &[ComputedTrait], event: &ResolvedEvent) {
        for def in traits {
            let Some(value) = def.value_of(event) else {
                continue;
            };
            let entry = Entry {
                at: event.timestamp,
                event_id: event.event_id.clone(),
                value,
            };
            let fresh = if def.window_seconds.is_some() {
                Acc::Window {
                    entries: vec![entry],
                }
            } else {
                match initial(def.kind, entry) {
                    Some(acc) => acc,
                    None => continue,
                }
            };
            match self.0.get_mut(&def.name) {
                Some(acc) => combine(acc, fresh),
                None => {
                    self.0.insert(def.name.clone(), fresh);
                }
            }
        }
    }

    /// Combines the accumulators of a merged profile into this one's.
    pub fn absorb(&mut self, other: &ComputedState) {
        for (name, acc) in &other.0 {
            match self.0.get_mut(name) {
                Some(mine) => combine(mine, acc.clone()),
                None => {
                    self.0.insert(name.clone(), acc.clone());
                }
            }
        }
    }

    /// Drops the windowed entries that fell out of their window by `now`: they can never count
    /// again, as time only moves forward.
    pub fn prune(&mut self, traits: &[ComputedTrait], now: OffsetDateTime) {
        for def in traits {
            if let (Some(window), Some(Acc::Window { entries })) =
                (def.window(), self.0.get_mut(&def.name))
            {
                entries.retain(|e| e.at > now - window);
            }
        }
    }

    /// Every declared trait's value at `now`; a trait without a value (no matching event, or
    /// none left in its window) is absent, except counts, which are 0.
    pub fn values(
        &self,
        traits: &[ComputedTrait],
        now: OffsetDateTime,
    ) -> BTreeMap<String, ComputedValue> {
        let mut out = BTreeMap::new();
        for def in traits {
            let value = match (self.0.get(&def.name), def.window()) {
                (Some(Acc::Window { entries }), Some(window)) => {
                    let mut acc: Option<Acc> = None;
                    for entry in entries.iter().filter(|e| e.at > now - window) {
                        if let Some(fresh) = initial(def.kind, entry.clone()) {
                            match &mut acc {
                                Some(acc) => combine(acc, fresh),
                                None => acc = Some(fresh),
                            }
                        }
                    }
                    acc.and_then(|acc| evaluate(def.kind, &acc))
                }
                (Some(acc), None) => evaluate(def.kind, acc),
                // Declared with another window since the accumulator was kept: no value until
                // the profile is rebuilt.
                (Some(_) | None, _) => None,
            };
            let value = value.or_else(|| {
                (def.kind == Kind::Count).then(|| ComputedValue {
                    value: Value::from(0),
                    observed_at: None,
                })
            });
            if let Some(value) = value {
                out.insert(def.name.clone(), value);
            }
        }
        out
    }

    /// The earliest time after `now` at which a windowed value changes without a new event
    /// (its oldest counted entry leaves the window); `None` when none will.
    pub fn valid_until(
        &self,
        traits: &[ComputedTrait],
        now: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        traits
            .iter()
            .filter_map(|def| {
                let window = def.window()?;
                match self.0.get(&def.name)? {
                    Acc::Window { entries } => entries
                        .iter()
                        .map(|e| e.at + window)
                        .filter(|end| *end > now)
                        .min(),
                    Acc::Count { .. }
                    | Acc::Sum { .. }
                    | Acc::Min { .. }
                    | Acc::Max { .. }
                    | Acc::First(_)
                    | Acc::Last(_)
                    | Acc::Counts { .. }
                    | Acc::Decayed { .. } => None,
                }
            })
            .min()
    }
}

/// The accumulator of `kind` holding one entry; `None` when the value does not fit the kind.
fn initial(kind: Kind, entry: Entry) -> Option<Acc> {
    let number = entry.value.as_f64();
    Some(match kind {
        Kind::Count => Acc::Count { n: 1 },
        Kind::Sum | Kind::Avg => Acc::Sum { n: 1, sum: number? },
        Kind::Min => Acc::Min { value: number? },
        Kind::Max => Acc::Max { value: number? },
        Kind::First => Acc::First(entry),
        Kind::Last => Acc::Last(entry),
        Kind::MostFrequent | Kind::Unique | Kind::UniqueCount => Acc::Counts {
            counts: BTreeMap::from([(entry.value.to_string(), 1)]),
        },
    })
}

/// Folds `other` into `acc`. Accumulators of different shapes (a declaration changed) keep
/// `acc`.
fn combine(acc: &mut Acc, other: Acc) {
    match (acc, other) {
        (Acc::Count { n }, Acc::Count { n: m }) => *n += m,
        (Acc::Sum { n, sum }, Acc::Sum { n: m, sum: s }) => {
            *n += m;
            *sum += s;
        }
        (Acc::Min { value }, Acc::Min { value: v }) => *value = value.min(v),
        (Acc::Max { value }, Acc::Max { value: v }) => *value = value.max(v),
        (Acc::First(mine), Acc::First(e)) => {
            if (e.at, &e.event_id) < (mine.at, &mine.event_id) {
                *mine = e;
            }
        }
        (Acc::Last(mine), Acc::Last(e)) => {
            if (e.at, &e.event_id) > (mine.at, &mine.event_id) {
                *mine = e;
            }
        }
        (Acc::Counts { counts }, Acc::Counts { counts: more }) => {
            for (key, n) in more {
                *counts.entry(key).or_insert(0) += n;
            }
            while counts.len() > MAX_DISTINCT {
                counts.pop_last();
            }
        }
        (Acc::Window { entries }, Acc::Window { entries: more }) => {
            let known: HashSet<String> = entries.iter().map(|e| e.event_id.clone()).collect();
            entries.extend(more.into_iter().filter(|e| !known.contains(&e.event_id)));
            entries.sort_by(|a, b| (a.at, &a.event_id).cmp(&(b.at, &b.event_id)));
            let excess = entries.len().saturating_sub(MAX_WINDOW_ENTRIES);
            entries.drain(..excess);
        }
        (Acc::Decayed { log2 }, Acc::Decayed { log2: other }) => {
            *log2 = tessera_core::activity::log2_add(*log2, other);
        }
        (_, _) => {}
    }
}

fn evaluate(kind: Kind, acc: &Acc) -> Option<ComputedValue> {
    let plain = |value: Value| ComputedValue {
        value,
        observed_at: None,
    };
    let number = |x: f64| serde_json::Number::from_f64(x).map(Value::Number);
    match (kind, acc) {
        (Kind::Count, Acc::Count { n }) => Some(plain(Value::from(*n))),
        (Kind::Sum, Acc::Sum { sum, .. }) => number(*sum).map(plain),
        (Kind::Avg, Acc::Sum { n, sum }) if *n > 0 => {
            #[allow(clippy::cast_precision_loss)]
            let mean = sum / *n as f64;
            number(mean).map(plain)
        }
        (Kind::Min, Acc::Min { value }) | (Kind::Max, Acc::Max { value }) => {
            number(*value).map(plain)
        }
        (Kind::First, Acc::First(e)) | (Kind::Last, Acc::Last(e)) => Some(ComputedValue {
            value: e.value.clone(),
            observed_at: Some(e.at),
        }),
        (Kind::MostFrequent, Acc::Counts { counts }) => counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .and_then(|(key, _)| serde_json::from_str(key).ok())
            .map(plain),
        (Kind::Unique, Acc::Counts { counts }) => Some(plain(Value::Array(
            counts
                .keys()
                .filter_map(|key| serde_json::from_str(key).ok())
                .collect(),
        ))),
        (Kind::UniqueCount, Acc::Counts { counts }) => Some(plain(Value::from(counts.len()))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;
    use time::macros::datetime;

    use super::*;
    use crate::domain::EventDetails;

    const T0: OffsetDateTime = datetime!(2026-05-01 00:00:00 UTC);

    fn order(id: &str, minute: i64, total: f64, category: &str) -> ResolvedEvent {
        ResolvedEvent {
            event_id: id.to_owned(),
            profile_id: "p".to_owned(),
            timestamp: T0 + Duration::minutes(minute),
            traits: serde_json::Map::new(),
            identifiers: Vec::new(),
            details: EventDetails {
                kind: "track".into(),
                event: "Order Completed".into(),
                properties: json!({"total": total, "product": {"category": category}})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                ..EventDetails::default()
            },
        }
    }

    fn consent(id: &str, minute: i64, preferences: serde_json::Value) -> ResolvedEvent {
        let mut event = order(id, minute, 0.0, "");
        event.details.context = json!({"consent": {"categoryPreferences": preferences}})
            .as_object()
            .cloned()
            .unwrap_or_default();
        event
    }

    fn consent_of(state: &ComputedState) -> Vec<(String, bool, String)> {
        state
            .consent()
            .map(|(purpose, granted, entry)| (purpose.to_owned(), granted, entry.event_id.clone()))
            .collect()
    }

    #[test]
    fn consent_keeps_the_latest_preference_per_purpose_in_any_order_and_across_merges() {
        let events = [
            consent("c1", 1, json!({"Advertising": true, "Analytics": true})),
            consent(
                "c2",
                5,
                json!({"Advertising": false, "Junk": "yes", "": true}),
            ),
            consent("c3", 3, json!({"Analytics": false, "Advertising": true})),
        ];
        let want = vec![
            ("Advertising".to_owned(), false, "c2".to_owned()),
            ("Analytics".to_owned(), false, "c3".to_owned()),
        ];
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
            let mut state = ComputedState::default();
            for i in order {
                state.apply_consent(&events[i]);
            }
            assert_eq!(consent_of(&state), want, "order {order:?}");
        }
        // Split across two profiles, then merged: the same.
        let (mut a, mut b) = (ComputedState::default(), ComputedState::default());
        a.apply_consent(&events[1]);
        b.apply_consent(&events[0]);
        b.apply_consent(&events[2]);
        a.absorb(&b);
        assert_eq!(consent_of(&a), want);
        // Consent is not a declared computed trait, and may not be declared as one.
        assert!(
            a.values(&all_kinds(), T0)
                .keys()
                .all(|k| !k.starts_with(CONSENT_PREFIX))
        );
        assert!(
            def("consent:x", Kind::Count, None, None)
                .problem()
                .is_some()
        );
    }

    #[test]
    fn account_copies_say_until_when_they_hold() {
        let mut state = ComputedState::default();
        let mut call = order("g1", 0, 0.0, "");
        call.details.kind = "group".into();
        call.details.group_id = "acme".into();
        state.apply_account(&call);
        let until = T0 + Duration::days(30);
        assert!(state.set_account_traits(true, |_| (json!({"orders_30d": 3}), Some(until))));
        assert_eq!(
            state.account_traits().collect::<Vec<_>>(),
            [("acme", &json!({"orders_30d": 3}))]
        );
        assert_eq!(state.account_traits_valid_until(T0), Some(until));
        assert_eq!(
            state.account_traits_valid_until(until),
            None,
            "past it, the sweeper copies again"
        );
        assert!(!state.set_account_traits(true, |_| (json!({"orders_30d": 3}), Some(until))));
        assert!(
            state.set_account_traits(true, |_| (json!({"orders_30d": 3}), None)),
            "a new expiry is a change"
        );
        assert_eq!(state.account_traits_valid_until(T0), None);
        assert!(state.set_account_traits(false, |_| (json!({}), None)));
        assert_eq!(state.account_traits().count(), 0);
    }

    fn def(name: &str, kind: Kind, property: Option<&str>, window: Option<u64>) -> ComputedTrait {
        ComputedTrait {
            name: name.to_owned(),
            kind,
            events: vec!["Order Completed".into()],
            types: vec![],
            property: property.map(str::to_owned),
            window_seconds: window,
        }
    }

    fn all_kinds() -> Vec<ComputedTrait> {
        let day = Some(86_400);
        vec![
            def("orders", Kind::Count, None, None),
            def("spent", Kind::Sum, Some("total"), None),
            def("avg_order", Kind::Avg, Some("total"), None),
            def("smallest", Kind::Min, Some("total"), None),
            def("largest", Kind::Max, Some("total"), None),
            def(
                "first_category",
                Kind::First,
                Some("product.category"),
                None,
            ),
            def("last_category", Kind::Last, Some("product.category"), None),
            def(
                "favourite",
                Kind::MostFrequent,
                Some("product.category"),
                None,
            ),
            def("categories", Kind::Unique, Some("product.category"), None),
            def(
                "category_count",
                Kind::UniqueCount,
                Some("product.category"),
                None,
            ),
            def("orders_1d", Kind::Count, None, day),
            def("spent_1d", Kind::Sum, Some("total"), day),
        ]
    }

    fn values_of(events: &[ResolvedEvent], at: OffsetDateTime) -> BTreeMap<String, ComputedValue> {
        let traits = all_kinds();
        let mut state = ComputedState::default();
        for e in events {
            state.apply(&traits, e);
        }
        state.values(&traits, at)
    }

    #[test]
    fn every_kind_computes_what_it_says() {
        let events = [
            order("e1", 0, 10.0, "books"),
            order("e2", 60, 30.0, "games"),
            order("e3", 2 * 24 * 60, 20.0, "books"),
        ];
        let now = T0 + Duration::days(2) + Duration::hours(2);
        let v = values_of(&events, now);
        let get = |name: &str| v[name].value.clone();
        assert_eq!(get("orders"), json!(3));
        assert_eq!(get("spent"), json!(60.0));
        assert_eq!(get("avg_order"), json!(20.0));
        assert_eq!(get("smallest"), json!(10.0));
        assert_eq!(get("largest"), json!(30.0));
        assert_eq!(get("first_category"), json!("books"));
        assert_eq!(v["first_category"].observed_at, Some(T0));
        assert_eq!(get("last_category"), json!("books"));
        assert_eq!(get("favourite"), json!("books"));
        assert_eq!(get("categories"), json!(["books", "games"]));
        assert_eq!(get("category_count"), json!(2));
        assert_eq!(get("orders_1d"), json!(1), "only e3 is in the last day");
        assert_eq!(get("spent_1d"), json!(20.0));
    }

    #[test]
    fn windowed_values_expire_as_time_passes_without_new_events() {
        let traits = all_kinds();
        let mut state = ComputedState::default();
        state.apply(&traits, &order("e1", 0, 10.0, "books"));
        state.apply(&traits, &order("e2", 60, 30.0, "games"));
        let v = |at| state.values(&traits, at);
        assert_eq!(v(T0 + Duration::hours(2))["orders_1d"].value, json!(2));
        assert_eq!(
            state.valid_until(&traits, T0 + Duration::hours(2)),
            Some(T0 + Duration::days(1)),
            "e1 leaves the window first"
        );
        assert_eq!(v(T0 + Duration::days(1))["orders_1d"].value, json!(1));
        assert_eq!(v(T0 + Duration::days(1))["spent_1d"].value, json!(30.0));
        let later = T0 + Duration::days(1) + Duration::hours(1);
        assert_eq!(v(later)["orders_1d"].value, json!(0), "counts fall to 0");
        assert!(
            !v(later).contains_key("spent_1d"),
            "a sum of nothing is absent"
        );
        assert_eq!(state.valid_until(&traits, later), None);
        assert_eq!(v(later)["orders"].value, json!(2), "unwindowed traits stay");
        let before = v(later);
        let mut pruned = state.clone();
        pruned.prune(&traits, later);
        assert_eq!(
            pruned.values(&traits, later),
            before,
            "pruning changes no value"
        );
        assert!(pruned != state, "pruning drops what left the window");
    }

    #[test]
    fn events_that_do_not_match_or_carry_no_usable_value_do_not_count() {
        let traits = all_kinds();
        let mut state = ComputedState::default();
        let mut viewed = order("e1", 0, 10.0, "books");
        viewed.details.event = "Product Viewed".into();
        state.apply(&traits, &viewed);
        let mut text_total = order("e2", 0, 0.0, "books");
        text_total
            .details
            .properties
            .insert("total".into(), json!("12"));
        state.apply(&traits, &text_total);
        let v = state.values(&traits, T0);
        assert_eq!(v["orders"].value, json!(1));
        assert!(!v.contains_key("spent"), "a string total is not a number");
        assert_eq!(v["favourite"].value, json!("books"));
        assert!(def("x", Kind::Sum, None, None).problem().is_some());
        assert!(def("x", Kind::Count, None, Some(0)).problem().is_some());
        assert!(def("x", Kind::Count, None, None).problem().is_none());
    }

    proptest! {
        /// Folding events in any order, or into two profiles merged afterwards either way,
        /// gives the same values.
        #[test]
        fn values_do_not_depend_on_order_or_merges(
            raw in prop::collection::vec((0..3_000i64, 0..100u8, 0..4u8), 1..30),
            split in any::<prop::sample::Index>(),
            seed in any::<u64>(),
        ) {
            let events: Vec<ResolvedEvent> = raw
                .iter()
                .enumerate()
                .map(|(i, (minute, total, cat))| {
                    order(&format!("e{i}"), *minute, f64::from(*total), ["a", "b", "c", "d"][usize::from(*cat)])
                })
                .collect();
            let now = T0 + Duration::days(2);
            let straight = values_of(&events, now);
            let mut shuffled = events.clone();
            let mut rng = seed;
            for i in (1..shuffled.len()).rev() {
                rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let j = usize::try_from(rng >> 33).unwrap_or(0) % (i + 1);
                shuffled.swap(i, j);
            }
            let traits = all_kinds();
            let at = split.index(events.len());
            let (mut left, mut right) = (ComputedState::default(), ComputedState::default());
            for e in &shuffled[..at] {
                left.apply(&traits, e);
            }
            for e in &shuffled[at..] {
                right.apply(&traits, e);
            }
            let mut lr = left.clone();
            lr.absorb(&right);
            right.absorb(&left);
            for merged in [lr, right] {
                let got = merged.values(&traits, now);
                prop_assert_eq!(got.keys().collect::<Vec<_>>(), straight.keys().collect::<Vec<_>>());
                for (name, value) in &got {
                    let want = &straight[name];
                    match (value.value.as_f64(), want.value.as_f64()) {
                        (Some(a), Some(b)) => prop_assert!((a - b).abs() < 1e-9, "{}: {} vs {}", name, a, b),
                        _ => prop_assert_eq!(value, want, "{}", name),
                    }
                }
            }
        }
    }
}
