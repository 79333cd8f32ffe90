//! Profile rules, free of gRPC and SQL: folding an event into a profile, merging two profiles,
//! and applying a whole batch (merges, then events) to the profiles it touches.
//!
//! Every rule here is order-independent, so replicas and retries converge on the same state:
//! a trait keeps the value of the latest event (by `observed_at`, ties broken by the larger
//! event id), counts add up, first and last seen are a min and a max, decayed activity is a
//! log-add and identifiers are a set union.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tessera_core::{Identifier, activity};
use time::OffsetDateTime;

use crate::catalog::{self, TraitCatalog};
use crate::computed::{ComputedState, ComputedTrait};

/// What folding follows beyond the events themselves: the computed traits (declared, and the
/// audiences' hidden counts) and the trait catalog (each trait's strategy).
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules<'a> {
    /// The computed traits.
    pub computed: &'a [ComputedTrait],
    /// The trait catalog; every trait is `latest` without one.
    pub catalog: Option<&'a TraitCatalog>,
    /// The event types with their own decayed activity ([`crate::engagement`]).
    pub engagement: &'a [crate::engagement::EngagementEvent],
}

impl Rules<'_> {
    fn strategy(&self, name: &str) -> catalog::Strategy {
        self.catalog
            .and_then(|c| c.get(name))
            .map(|r| r.strategy)
            .unwrap_or_default()
    }
}

/// One trait value with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitValue {
    /// The value, as sent.
    pub value: Value,
    /// The time of the event that set it.
    #[serde(with = "time::serde::rfc3339")]
    pub observed_at: OffsetDateTime,
    /// The id of the event that set it.
    pub event_id: String,
}

impl TraitValue {
    /// Whether `self` wins over `current`: the later observation, or at the same time the larger
    /// event id. A total order, so the winner does not depend on the order events arrive in.
    pub fn supersedes(&self, current: &TraitValue) -> bool {
        (self.observed_at, &self.event_id) > (current.observed_at, &current.event_id)
    }
}

/// What a profile knows from its events: the part of a profile that events and merges change.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProfileState {
    /// Traits by name.
    pub traits: BTreeMap<String, TraitValue>,
    /// How many distinct events were applied.
    pub event_count: i64,
    /// The time of the earliest event.
    pub first_seen: Option<OffsetDateTime>,
    /// The time of the latest event.
    pub last_seen: Option<OffsetDateTime>,
    /// The decayed activity, see [`tessera_core::activity`]; `None` without events.
    pub activity_log2: Option<f64>,
    /// Every identifier linked to the profile.
    pub identifiers: BTreeSet<Identifier>,
    /// The accumulators of the computed traits.
    pub computed: ComputedState,
}

impl ProfileState {
    /// Folds one event into the state, and into the accumulators of the `computed` traits it
    /// counts for. The caller guarantees each event is applied once.
    pub fn apply(&mut self, event: &ResolvedEvent, half_life_seconds: f64, rules: Rules<'_>) {
        self.computed.apply(rules.computed, event);
        self.computed.apply_consent(event);
        self.computed.apply_account(event);
        crate::psychographic::apply(&mut self.computed, event);
        crate::engagement::apply(
            &mut self.computed,
            rules.engagement,
            half_life_seconds,
            event,
        );
        for (name, value) in &event.traits {
            catalog::set(
                &mut self.traits,
                name,
                TraitValue {
                    value: value.clone(),
                    observed_at: event.timestamp,
                    event_id: event.event_id.clone(),
                },
                rules.strategy(name),
            );
        }
        self.event_count += 1;
        self.first_seen = Some(
            self.first_seen
                .map_or(event.timestamp, |t| t.min(event.timestamp)),
        );
        self.last_seen = Some(
            self.last_seen
                .map_or(event.timestamp, |t| t.max(event.timestamp)),
        );
        self.activity_log2 = Some(activity::add_event(
            self.activity_log2,
            event.timestamp,
            half_life_seconds,
        ));
        self.identifiers.extend(event.identifiers.iter().cloned());
    }

    /// Folds the state of a merged profile into this one.
    pub fn absorb(&mut self, other: &ProfileState, rules: Rules<'_>) {
        for (name, value) in &other.traits {
            catalog::set(&mut self.traits, name, value.clone(), rules.strategy(name));
        }
        self.event_count += other.event_count;
        self.first_seen = min_opt(self.first_seen, other.first_seen);
        self.last_seen = max_opt(self.last_seen, other.last_seen);
        self.activity_log2 = activity::merge(self.activity_log2, other.activity_log2);
        self.identifiers.extend(other.identifiers.iter().cloned());
        self.computed.absorb(&other.computed);
    }
}

fn min_opt(a: Option<OffsetDateTime>, b: Option<OffsetDateTime>) -> Option<OffsetDateTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (x, None) | (None, x) => x,
    }
}

fn max_opt(a: Option<OffsetDateTime>, b: Option<OffsetDateTime>) -> Option<OffsetDateTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (x, None) | (None, x) => x,
    }
}

/// One score of a profile with its explanation, as the scoring service computed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// The score's name, for example `engagement`.
    pub name: String,
    /// The value, from 0 to 100.
    pub value: f64,
    /// The time the score is valid at.
    #[serde(with = "time::serde::rfc3339")]
    pub computed_at: OffsetDateTime,
    /// The model that produced it.
    pub model_version: String,
    /// What it is made of.
    pub factors: Vec<ScoreFactor>,
}

/// One input behind a score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreFactor {
    /// The factor's name.
    pub name: String,
    /// The factor's value.
    pub value: f64,
    /// What it means.
    pub description: String,
}

/// A stored profile: its state plus bookkeeping.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The profile id.
    pub profile_id: String,
    /// The profile this one was merged into; such a profile only redirects.
    pub merged_into: Option<String>,
    /// What the profile knows from its events.
    pub state: ProfileState,
    /// The latest scores by name.
    pub scores: BTreeMap<String, Score>,
    /// The profiles merged into this one, directly or through profiles merged into it.
    pub merged_profile_ids: Vec<String>,
    /// Increases with every change.
    pub version: i64,
    /// When the profile was first stored.
    pub created_at: OffsetDateTime,
    /// When the profile last changed.
    pub updated_at: OffsetDateTime,
    /// When its computed values next change without a new event (set when written).
    pub valid_until: Option<OffsetDateTime>,
}

impl Profile {
    /// A profile without events.
    pub fn empty(profile_id: impl Into<String>, now: OffsetDateTime) -> Self {
        Self {
            profile_id: profile_id.into(),
            merged_into: None,
            state: ProfileState::default(),
            scores: BTreeMap::new(),
            merged_profile_ids: Vec::new(),
            version: 0,
            created_at: now,
            updated_at: now,
            valid_until: None,
        }
    }

    /// Applies one new event; windowed computed traits drop what fell out of their window.
    pub fn apply(
        &mut self,
        event: &ResolvedEvent,
        half_life_seconds: f64,
        now: OffsetDateTime,
        rules: Rules<'_>,
    ) {
        self.state.apply(event, half_life_seconds, rules);
        self.state.computed.prune(rules.computed, now);
        self.touch(now);
    }

    /// Folds `merged` into this profile and marks `merged` as redirecting here. The caller
    /// guarantees both are distinct live profiles.
    pub fn absorb(&mut self, merged: &mut Profile, now: OffsetDateTime, rules: Rules<'_>) {
        self.state.absorb(&merged.state, rules);
        let ids = std::iter::once(&merged.profile_id).chain(&merged.merged_profile_ids);
        for id in ids {
            if *id != self.profile_id && !self.merged_profile_ids.contains(id) {
                self.merged_profile_ids.push(id.clone());
            }
        }
        // Scores describe the survivor's old state; the batch rescores it before writing.
        self.touch(now);
        merged.merged_into = Some(self.profile_id.clone());
        merged.touch(now);
    }

    /// Replaces the scores with the same names as `scores`.
    pub fn set_scores(&mut self, scores: Vec<Score>, now: OffsetDateTime) {
        keep_only(&mut self.scores, &scores);
        for score in scores {
            self.scores.insert(score.name.clone(), score);
        }
        self.touch(now);
    }

    fn touch(&mut self, now: OffsetDateTime) {
        self.version += 1;
        self.updated_at = now;
    }
}

/// Drops from `stored` the scores `answered` no longer has: a scorer answers every score a
/// profile has now, so a score it stopped answering (a plan removed from the config) goes. An
/// empty answer (no scorer) keeps everything.
pub fn keep_only(stored: &mut BTreeMap<String, Score>, answered: &[Score]) {
    if !answered.is_empty() {
        stored.retain(|name, _| answered.iter().any(|s| &s.name == name));
    }
}

/// An event from the log with the profile the identity service resolved it to, reduced to what
/// a profile needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedEvent {
    /// The event's id in the event log.
    pub event_id: String,
    /// The profile it was resolved to (possibly merged since).
    pub profile_id: String,
    /// When it happened.
    pub timestamp: OffsetDateTime,
    /// The person traits it sets (see [`tessera_core::Event::person_traits`]).
    pub traits: Map<String, Value>,
    /// The normalized identifiers it linked to the profile.
    pub identifiers: Vec<Identifier>,
    /// What the event was, for the profile's timeline.
    pub details: EventDetails,
}

/// What an event was, beyond what it contributes to the profile's state: kept for the profile's
/// timeline (and the Profile API's `/events`). Empty for events applied before it was kept.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EventDetails {
    /// The client's message id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message_id: String,
    /// The message type (`track`, `identify`, `page`, ...).
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// A track's event name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub event: String,
    /// A page's or screen's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// A page's or screen's category.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub category: String,
    /// A group message's account id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group_id: String,
    /// A track's, page's or screen's properties.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub properties: Map<String, Value>,
    /// The message's context (page, campaign, device, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub context: Map<String, Value>,
    /// A group message's account traits (firmographics: industry, employees, plan, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub group_traits: Map<String, Value>,
}

impl EventDetails {
    /// Whether the event is called `name`: a track's event name, or a page's or screen's name
    /// (what computed traits, audience conditions and engagement event types match on).
    pub fn is_named(&self, name: &str) -> bool {
        name == self.event || (!self.name.is_empty() && name == self.name)
    }

    /// Whether nothing was kept (an event applied before details were).
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// The details of `event`.
    pub fn of(event: &tessera_core::Event) -> Self {
        Self {
            message_id: event.message_id.clone(),
            kind: event.kind.as_str().to_owned(),
            event: event.event.clone(),
            name: event.name.clone(),
            category: event.category.clone(),
            group_id: event.group_id.clone(),
            properties: event.properties.clone(),
            context: event.context.clone(),
            group_traits: if event.kind == tessera_core::EventType::Group {
                event.traits.clone()
            } else {
                Map::new()
            },
        }
    }
}

/// An applied event as stored for rebuilding: what it contributes to a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventContent {
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    /// The person traits it sets.
    pub traits: Map<String, Value>,
    /// The identifiers it linked, as (type, value).
    pub identifiers: Vec<(String, String)>,
    /// What the event was, for the timeline.
    #[serde(default, skip_serializing_if = "EventDetails::is_empty")]
    pub details: EventDetails,
}

impl EventContent {
    /// What `event` contributes.
    pub fn of(event: &ResolvedEvent) -> Self {
        Self {
            timestamp: event.timestamp,
            traits: event.traits.clone(),
            identifiers: event
                .identifiers
                .iter()
                .map(|i| (i.kind.clone(), i.value.clone()))
                .collect(),
            details: event.details.clone(),
        }
    }

    /// The event again, for `profile_id`.
    pub fn event(&self, event_id: &str, profile_id: &str) -> ResolvedEvent {
        ResolvedEvent {
            event_id: event_id.to_owned(),
            profile_id: profile_id.to_owned(),
            timestamp: self.timestamp,
            traits: self.traits.clone(),
            identifiers: self
                .identifiers
                .iter()
                .map(|(k, v)| Identifier::new(k.clone(), v.clone()))
                .collect(),
            details: self.details.clone(),
        }
    }
}

/// A split of merged profiles (an unmerge), as the identity service decided it: the profiles
/// of one merged component and where each now belongs, and the events whose profile or linked
/// identifiers changed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Split {
    /// Every profile of the component and the live profile it belongs to after the split
    /// (itself when it is live).
    pub profiles: Vec<(String, String)>,
    /// Events that moved or whose linked identifiers changed: the event id, its live profile
    /// after the split, and the identifiers it links now.
    pub events: Vec<(String, String, Vec<Identifier>)>,
    /// Events erased with an identifier they alone carried: deleted, and the profiles rebuilt
    /// without them.
    pub erased: Vec<String>,
}

/// One profile folded into another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    /// The profile that survives.
    pub surviving_profile_id: String,
    /// The profile folded into it.
    pub merged_profile_id: String,
}

/// What the pipeline asks to apply: merges first, then events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// Merges, oldest first.
    pub merges: Vec<Merge>,
    /// Resolved events.
    pub events: Vec<ResolvedEvent>,
}

impl Batch {
    /// Every profile id the batch names, sorted and without duplicates.
    pub fn profile_ids(&self) -> Vec<String> {
        let ids: BTreeSet<&str> = self
            .merges
            .iter()
            .flat_map(|m| [&m.surviving_profile_id, &m.merged_profile_id])
            .chain(self.events.iter().map(|e| &e.profile_id))
            .map(String::as_str)
            .collect();
        ids.into_iter().map(str::to_owned).collect()
    }
}

/// The profiles one batch touches, loaded (and on Postgres locked), with the batch applied in
/// memory. The store writes back what changed.
#[derive(Debug)]
pub struct Workspace {
    profiles: BTreeMap<String, Profile>,
    redirects: HashMap<String, String>,
    changed: BTreeSet<String>,
    merges: Vec<(String, String)>,
    new_identifiers: BTreeMap<String, BTreeSet<Identifier>>,
    score_changes: Vec<(String, String, f64)>,
}

impl Workspace {
    /// A workspace over `profiles` (each live when loaded); `redirects` maps other named ids to
    /// the live profile they resolved to.
    pub fn new(profiles: Vec<Profile>, redirects: HashMap<String, String>) -> Self {
        Self {
            profiles: profiles
                .into_iter()
                .map(|p| (p.profile_id.clone(), p))
                .collect(),
            redirects,
            changed: BTreeSet::new(),
            merges: Vec::new(),
            new_identifiers: BTreeMap::new(),
            score_changes: Vec::new(),
        }
    }

    /// The live profile `id` resolves to now, after the merges applied so far; `None` when the
    /// workspace does not hold it.
    pub fn canonical(&self, id: &str) -> Option<&str> {
        let mut current = self.redirects.get(id).map_or(id, String::as_str);
        // Each hop follows a merge made in this workspace, so there are at most as many hops as
        // profiles.
        for _ in 0..=self.profiles.len() {
            let profile = self.profiles.get(current)?;
            match &profile.merged_into {
                Some(next) => current = next,
                None => return Some(&profile.profile_id),
            }
        }
        None
    }

    /// Applies a merge; returns whether it changed anything (a merge already applied, or of two
    /// ids that are already one profile, does not).
    pub fn apply_merge(
        &mut self,
        merge: &Merge,
        now: OffsetDateTime,
        rules: Rules<'_>,
    ) -> Result<bool, Missing> {
        let survivor = self.canonical_owned(&merge.surviving_profile_id)?;
        let merged = self.canonical_owned(&merge.merged_profile_id)?;
        if survivor == merged {
            return Ok(false);
        }
        let mut merged_profile = self
            .profiles
            .remove(&merged)
            .ok_or_else(|| Missing(merged.clone()))?;
        let survivor_profile = self
            .profiles
            .get_mut(&survivor)
            .ok_or_else(|| Missing(survivor.clone()))?;
        survivor_profile.absorb(&mut merged_profile, now, rules);
        self.profiles.insert(merged.clone(), merged_profile);
        if let Some(ids) = self.new_identifiers.remove(&merged) {
            self.new_identifiers
                .entry(survivor.clone())
                .or_default()
                .extend(ids);
        }
        self.changed.insert(survivor.clone());
        self.changed.insert(merged.clone());
        self.merges.push((merged, survivor));
        Ok(true)
    }

    /// Applies an event that was never applied before to the profile it resolves to.
    pub fn apply_event(
        &mut self,
        event: &ResolvedEvent,
        half_life_seconds: f64,
        now: OffsetDateTime,
        rules: Rules<'_>,
    ) -> Result<(), Missing> {
        let id = self.canonical_owned(&event.profile_id)?;
        let profile = self
            .profiles
            .get_mut(&id)
            .ok_or_else(|| Missing(id.clone()))?;
        let fresh: Vec<_> = event
            .identifiers
            .iter()
            .filter(|i| !profile.state.identifiers.contains(*i))
            .cloned()
            .collect();
        profile.apply(event, half_life_seconds, now, rules);
        if !fresh.is_empty() {
            self.new_identifiers
                .entry(id.clone())
                .or_default()
                .extend(fresh);
        }
        self.changed.insert(id);
        Ok(())
    }

    /// The profile `id` as the workspace holds it (live or merged away).
    pub fn profile(&self, id: &str) -> Option<&Profile> {
        self.profiles.get(id)
    }

    /// Every profile the workspace holds (live and merged away), in id order.
    pub fn profiles(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values()
    }

    /// Stores new scores on the live profile `id`; the profile counts as changed when any of
    /// them differs from what it had.
    pub fn set_scores(&mut self, id: &str, scores: Vec<Score>, now: OffsetDateTime) {
        let Some(profile) = self.profiles.get_mut(id) else {
            return;
        };
        let dropped = !scores.is_empty()
            && profile
                .scores
                .keys()
                .any(|name| !scores.iter().any(|s| &s.name == name));
        if !dropped
            && scores
                .iter()
                .all(|s| profile.scores.get(&s.name) == Some(s))
        {
            return;
        }
        for score in &scores {
            if profile
                .scores
                .get(&score.name)
                .is_none_or(|old| old.value != score.value)
            {
                self.score_changes
                    .push((id.to_owned(), score.name.clone(), score.value));
            }
        }
        profile.set_scores(scores, now);
        self.changed.insert(id.to_owned());
    }

    /// Changes the computed state of the live profile `id` with `f`, which says whether it
    /// changed anything; then the profile counts as changed.
    pub fn update_computed(
        &mut self,
        id: &str,
        now: OffsetDateTime,
        f: impl FnOnce(&mut crate::computed::ComputedState) -> bool,
    ) {
        let Some(profile) = self.profiles.get_mut(id) else {
            return;
        };
        if f(&mut profile.state.computed) && self.changed.insert(id.to_owned()) {
            profile.touch(now);
        }
    }

    fn canonical_owned(&self, id: &str) -> Result<String, Missing> {
        self.canonical(id)
            .map(str::to_owned)
            .ok_or_else(|| Missing(id.to_owned()))
    }

    /// The profiles that changed, live and merged-away alike, in id order.
    pub fn changed(&self) -> impl Iterator<Item = &Profile> {
        self.changed.iter().filter_map(|id| self.profiles.get(id))
    }

    /// Takes out the profiles that changed, live and merged-away alike, in id order.
    pub fn into_changed(mut self) -> Vec<Profile> {
        self.changed
            .iter()
            .filter_map(|id| self.profiles.remove(id))
            .collect()
    }

    /// Sets when each changed live profile's computed values next change without a new event,
    /// by `valid_until`.
    pub fn settle(&mut self, valid_until: impl Fn(&Profile) -> Option<OffsetDateTime>) {
        for id in &self.changed {
            if let Some(profile) = self.profiles.get_mut(id) {
                profile.valid_until = if profile.merged_into.is_none() {
                    valid_until(profile)
                } else {
                    None
                };
            }
        }
    }

    /// The scores whose value changed, as (profile id, score, new value).
    pub fn score_changes(&self) -> &[(String, String, f64)] {
        &self.score_changes
    }

    /// The merges that changed something, as (merged, survivor) pairs, in the order applied.
    pub fn merges(&self) -> &[(String, String)] {
        &self.merges
    }

    /// Identifiers linked by this batch's events that the profile did not have, by live
    /// profile id.
    pub fn new_identifiers(&self) -> &BTreeMap<String, BTreeSet<Identifier>> {
        &self.new_identifiers
    }
}

/// A profile the workspace was asked about but does not hold: the store failed to load
/// every profile a batch names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("profile {0} is not in the workspace")]
pub struct Missing(pub String);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use time::Duration;
    use time::macros::datetime;

    const H: f64 = activity::DEFAULT_HALF_LIFE_SECONDS;
    const NOW: OffsetDateTime = datetime!(2026-06-01 00:00:00 UTC);

    fn event(id: &str, profile: &str, minute: i64, traits: Value) -> ResolvedEvent {
        ResolvedEvent {
            event_id: id.to_owned(),
            profile_id: profile.to_owned(),
            timestamp: datetime!(2026-05-01 00:00:00 UTC) + Duration::minutes(minute),
            traits: traits.as_object().cloned().unwrap_or_default(),
            identifiers: vec![Identifier::new("anonymous_id", format!("a-{id}"))],
            details: EventDetails::default(),
        }
    }

    /// Equal up to floating-point rounding of the activity log-add.
    fn assert_same(a: &ProfileState, b: &ProfileState) {
        assert_eq!(a.traits, b.traits);
        assert_eq!(a.event_count, b.event_count);
        assert_eq!(a.first_seen, b.first_seen);
        assert_eq!(a.last_seen, b.last_seen);
        assert_eq!(a.identifiers, b.identifiers);
        match (a.activity_log2, b.activity_log2) {
            (Some(x), Some(y)) => assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{x} vs {y}"),
            (x, y) => assert_eq!(x, y),
        }
    }

    fn fold(events: &[ResolvedEvent]) -> ProfileState {
        let mut state = ProfileState::default();
        for e in events {
            state.apply(e, H, Rules::default());
        }
        state
    }

    #[test]
    fn an_older_event_never_overwrites_a_newer_trait() {
        let new = event("e2", "p", 10, json!({"plan": "pro"}));
        let old = event("e1", "p", 5, json!({"plan": "free", "name": "Ann"}));
        let state = fold(&[new, old]);
        assert_eq!(state.traits["plan"].value, json!("pro"));
        assert_eq!(state.traits["plan"].event_id, "e2");
        assert_eq!(state.traits["name"].value, json!("Ann"));
        assert_eq!(state.event_count, 2);
        assert_eq!(state.first_seen, Some(datetime!(2026-05-01 00:05:00 UTC)));
        assert_eq!(state.last_seen, Some(datetime!(2026-05-01 00:10:00 UTC)));
    }

    #[test]
    fn ties_go_to_the_larger_event_id() {
        let a = event("e-a", "p", 0, json!({"plan": "a"}));
        let b = event("e-b", "p", 0, json!({"plan": "b"}));
        assert_eq!(
            fold(&[a.clone(), b.clone()]).traits["plan"].value,
            json!("b")
        );
        assert_eq!(fold(&[b, a]).traits["plan"].value, json!("b"));
    }

    #[test]
    fn merging_folds_state_and_redirects() {
        let mut survivor = Profile::empty("s", NOW);
        survivor.apply(
            &event("e1", "s", 1, json!({"plan": "free"})),
            H,
            NOW,
            Rules::default(),
        );
        let mut merged = Profile::empty("m", NOW);
        merged.merged_profile_ids.push("older".to_owned());
        merged.apply(
            &event("e2", "m", 2, json!({"plan": "pro"})),
            H,
            NOW,
            Rules::default(),
        );
        survivor.absorb(&mut merged, NOW, Rules::default());
        assert_eq!(survivor.state.event_count, 2);
        assert_eq!(survivor.state.traits["plan"].value, json!("pro"));
        assert_eq!(survivor.state.identifiers.len(), 2);
        assert_eq!(survivor.merged_profile_ids, ["m", "older"]);
        assert_eq!(survivor.version, 2);
        assert_eq!(merged.merged_into.as_deref(), Some("s"));
        assert_eq!(merged.version, 2);
    }

    #[test]
    fn workspace_follows_merges_and_ignores_repeats() {
        let mut ws = Workspace::new(
            vec![
                Profile::empty("a", NOW),
                Profile::empty("b", NOW),
                Profile::empty("c", NOW),
            ],
            HashMap::from([("old".to_owned(), "c".to_owned())]),
        );
        let m = |s: &str, m: &str| Merge {
            surviving_profile_id: s.to_owned(),
            merged_profile_id: m.to_owned(),
        };
        assert_eq!(
            ws.apply_merge(&m("a", "b"), NOW, Rules::default()),
            Ok(true)
        );
        assert_eq!(
            ws.apply_merge(&m("a", "b"), NOW, Rules::default()),
            Ok(false)
        );
        assert_eq!(
            ws.apply_merge(&m("c", "a"), NOW, Rules::default()),
            Ok(true)
        );
        // b was merged into a, which was merged into c: one profile already.
        assert_eq!(
            ws.apply_merge(&m("b", "old"), NOW, Rules::default()),
            Ok(false)
        );
        assert_eq!(ws.canonical("b"), Some("c"));
        ws.apply_event(
            &event("e1", "b", 0, json!({"x": 1})),
            H,
            NOW,
            Rules::default(),
        )
        .unwrap();
        let changed: Vec<_> = ws.changed().map(|p| p.profile_id.as_str()).collect();
        assert_eq!(changed, ["a", "b", "c"]);
        assert_eq!(ws.merges().len(), 2);
        assert_eq!(ws.new_identifiers()["c"].len(), 1);
        let c = ws.changed().find(|p| p.profile_id == "c").unwrap();
        assert_eq!(c.merged_profile_ids, ["a", "b"]);
        assert_eq!(c.state.event_count, 1);
        assert_eq!(
            ws.apply_event(
                &event("e2", "nobody", 0, json!({})),
                H,
                NOW,
                Rules::default()
            ),
            Err(Missing("nobody".to_owned()))
        );
    }

    fn arb_events() -> impl Strategy<Value = Vec<ResolvedEvent>> {
        let one = (
            0i64..50,
            prop::sample::select(vec!["plan", "name", "city"]),
            0u8..4,
            any::<bool>(),
        );
        prop::collection::vec(one, 1..24).prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (minute, name, value, has_trait))| {
                    let traits = if has_trait {
                        json!({ name: value })
                    } else {
                        json!({})
                    };
                    // Few distinct minutes: ties between events are common.
                    event(&format!("e{i:02}"), "p", minute / 5, traits)
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn folding_in_any_order_gives_the_same_state(
            (events, shuffled) in arb_events().prop_flat_map(|e| {
                let shuffled = Just(e.clone()).prop_shuffle();
                (Just(e), shuffled)
            })
        ) {
            assert_same(&fold(&events), &fold(&shuffled));
        }

        #[test]
        fn split_then_merged_gives_the_same_state(
            events in arb_events(),
            sides in prop::collection::vec(any::<bool>(), 24),
            survivor_left in any::<bool>(),
        ) {
            let (left, right): (Vec<_>, Vec<_>) = events
                .iter()
                .cloned()
                .enumerate()
                .partition(|(i, _)| sides[*i]);
            let left: Vec<_> = left.into_iter().map(|(_, e)| e).collect();
            let right: Vec<_> = right.into_iter().map(|(_, e)| e).collect();
            let mut l = Profile::empty("l", NOW);
            let mut r = Profile::empty("r", NOW);
            for e in &left { l.apply(e, H, NOW, Rules::default()); }
            for e in &right { r.apply(e, H, NOW, Rules::default()); }
            let merged = if survivor_left {
                l.absorb(&mut r, NOW, Rules::default());
                l.state
            } else {
                r.absorb(&mut l, NOW, Rules::default());
                r.state
            };
            assert_same(&fold(&events), &merged);
        }
    }
}
