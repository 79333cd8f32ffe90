//! Resolving a run of records against a view of the graph under the rules: which profiles to
//! create, which identifiers to attach, which profiles to merge, which identifiers to drop and
//! why. The stores read the view, call [`plan`] and write its result in one transaction.
//!
//! Per record, in order: the record's linkable identifiers are sorted by priority; identifiers
//! that are shared (seen with more profiles than the rules allow) stop linking; the profiles
//! holding the others are the candidates. If linking them all (merging the candidates and
//! attaching the new identifiers) would give one profile more values of a type than its limit
//! (or two values of a protected type), the lowest-priority identifier is dropped and the match
//! tried again (Segment's documented behaviour); identifiers dropped on the way that fit once the
//! match settled are put back. Then: no candidate, a new profile; one, it; several, they merge
//! into the oldest. Every decision is recorded with its cause for the graph log.
//!
//! Before that, each record is screened: erased identifiers are taken out, and a record that
//! carries an identifier of a forgotten person that suppresses whole events, or only erased
//! identifiers, is suppressed: it gets no profile and changes nothing.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use tessera_core::Identifier;
use time::OffsetDateTime;
use uuid::Uuid;

use super::rules::Rules;
use super::{Dropped, Merge, Record, Resolution};

/// A canonical profile and when it was created. Orders profiles by survival: oldest first, ties
/// broken by the smaller id, so every replica picks the same survivor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProfileAge {
    /// When the profile was created.
    pub created_at: OffsetDateTime,
    /// The profile's id.
    pub id: Uuid,
}

/// What the graph holds for the identifiers of a run of records: the canonical (not merged)
/// profile of each identifier it knows, those profiles' identifiers of limited types, with
/// which profiles each identifier has been seen, and which of the identifiers were detached,
/// erased or forgotten with a person.
#[derive(Debug, Clone, Default)]
pub struct GraphView {
    owners: HashMap<Identifier, Uuid>,
    profiles: HashMap<Uuid, ProfileState>,
    seen_with: HashMap<Identifier, HashSet<Uuid>>,
    forbidden: Vec<(Uuid, Uuid)>,
    detached: HashSet<Identifier>,
    erased: HashSet<Identifier>,
    suppressing: HashSet<Identifier>,
}

/// A canonical profile as the planner tracks it.
#[derive(Debug, Clone)]
pub(super) struct ProfileState {
    created_at: OffsetDateTime,
    /// Identifiers of limited types, with when each was first linked (event time).
    limited: Vec<(Identifier, OffsetDateTime)>,
}

impl GraphView {
    /// An empty view: the graph knows none of the identifiers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `identifier` belongs to the canonical profile `profile`.
    pub fn insert(&mut self, identifier: Identifier, profile: ProfileAge) {
        self.profiles
            .entry(profile.id)
            .or_insert_with(|| ProfileState {
                created_at: profile.created_at,
                limited: Vec::new(),
            });
        self.owners.insert(identifier, profile.id);
    }

    /// Records the canonical profile `profile`, whatever identifiers it holds.
    pub fn insert_profile(&mut self, profile: ProfileAge) {
        self.profiles
            .entry(profile.id)
            .or_insert_with(|| ProfileState {
                created_at: profile.created_at,
                limited: Vec::new(),
            });
    }

    /// Records that the canonical profile `profile` (inserted before) holds `identifier` of a
    /// limited type, first linked at `linked_at` (event time).
    pub fn insert_limited(
        &mut self,
        profile: Uuid,
        identifier: Identifier,
        linked_at: OffsetDateTime,
    ) {
        if let Some(state) = self.profiles.get_mut(&profile) {
            state.limited.push((identifier, linked_at));
        }
    }

    /// Records that the canonical profiles `a` and `b` were split apart by an unmerge: no
    /// record may merge them again.
    pub fn forbid(&mut self, a: Uuid, b: Uuid) {
        if a != b && !self.forbidden.contains(&(a, b)) {
            self.forbidden.push((a, b));
        }
    }

    /// Records that `identifier` was split off its profile: it links only when an event
    /// carries nothing else (rule `detached`).
    pub fn detach(&mut self, identifier: Identifier) {
        self.detached.insert(identifier);
    }

    /// Records that `identifier` was seen in an event of `profile` (canonical) other than its own.
    pub fn insert_sighting(&mut self, identifier: Identifier, profile: Uuid) {
        self.seen_with
            .entry(identifier)
            .or_default()
            .insert(profile);
    }

    /// Records that `identifier` was erased (by itself, or as an anonymous or device id of a
    /// forgotten person): records are resolved as if they did not carry it, and a record that
    /// carried nothing else is suppressed.
    pub fn erase(&mut self, identifier: Identifier) {
        self.erased.insert(identifier);
    }

    /// Records that `identifier` belongs to a forgotten person and suppresses whole events (a
    /// user id, email, phone or custom identifier): a record that carries it is suppressed,
    /// whatever else it carries. Such an identifier is erased too.
    pub fn suppress(&mut self, identifier: Identifier) {
        self.erased.insert(identifier.clone());
        self.suppressing.insert(identifier);
    }

    /// What of `record` resolution uses under this view (see [`screen`]).
    pub fn screen<'r>(&self, record: &'r Record) -> Option<Cow<'r, Record>> {
        screen(record, &self.erased, &self.suppressing)
    }
}

/// What of `record` resolution uses once the `erased` identifiers are taken out, as if the
/// event had never carried them (they are neither linked nor named): `None` when the event is
/// suppressed, because it carries one of `suppressing` or because every identifier it carried
/// is erased. A record that carried no linkable identifier to begin with is kept (it gets a
/// profile of its own).
pub fn screen<'r>(
    record: &'r Record,
    erased: &HashSet<Identifier>,
    suppressing: &HashSet<Identifier>,
) -> Option<Cow<'r, Record>> {
    if erased.is_empty() && suppressing.is_empty() {
        return Some(Cow::Borrowed(record));
    }
    let ids = record.identifiers();
    if ids.iter().any(|i| suppressing.contains(i)) {
        return None;
    }
    if !ids.iter().any(|i| erased.contains(i)) {
        return Some(Cow::Borrowed(record));
    }
    let kept = record.without(erased);
    (!kept.identifiers().is_empty()).then_some(Cow::Owned(kept))
}

/// An identifier to attach to a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewIdentifier {
    /// The identifier.
    pub identifier: Identifier,
    /// The profile it joins.
    pub profile_id: Uuid,
    /// The event that first carried it.
    pub event_id: String,
    /// When that event happened.
    pub linked_at: OffsetDateTime,
}

/// An identifier seen in an event of a profile other than the one holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    /// The identifier.
    pub identifier: Identifier,
    /// The profile whose event carried it.
    pub profile_id: Uuid,
    /// The event.
    pub event_id: String,
}

/// What a decision in the graph log did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionKind {
    /// A profile was created.
    Create,
    /// An identifier was attached to a profile.
    Link,
    /// A profile was merged into another (`other_profile_id`).
    Merge,
    /// An identifier of the event was not linked, by a rule.
    Drop,
    /// A merged profile was split off the profile it had been merged into (an unmerge).
    Split,
}

impl DecisionKind {
    /// The kind as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Link => "link",
            Self::Merge => "merge",
            Self::Drop => "drop",
            Self::Split => "split",
        }
    }
}

/// One entry of the append-only graph log: what was decided, for which event, by which rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What was decided.
    pub kind: DecisionKind,
    /// The event that caused it.
    pub event_id: String,
    /// The profile it concerns: created, linked to, merged (`Merge`: the merged one), or the
    /// event's profile (`Drop`).
    pub profile_id: Uuid,
    /// `Merge`: the surviving profile.
    pub other_profile_id: Option<Uuid>,
    /// `Link` and `Drop`: the identifier.
    pub identifier: Option<Identifier>,
    /// The rule that decided: `seen_together`, `limit:<type>`, `shared:<type>`.
    pub rule: String,
    /// When the causing event happened.
    pub event_time: OffsetDateTime,
    /// Why, beyond the rule: a probabilistic match's explanation (JSON).
    pub detail: Option<String>,
}

/// The changes that resolving a run of records makes to the graph, and the run's resolutions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// One resolution per record, in order; each names the record's profile as of that record.
    pub resolutions: Vec<Resolution>,
    /// The profiles to create.
    pub new_profiles: Vec<ProfileAge>,
    /// The identifiers to attach.
    pub new_identifiers: Vec<NewIdentifier>,
    /// The merges, in the order they were decided; each merged profile appears once.
    pub merges: Vec<Merge>,
    /// Identifiers seen with profiles other than their own, for the shared rule.
    pub sightings: Vec<Sighting>,
    /// Every decision, in order, for the graph log.
    pub decisions: Vec<Decision>,
}

/// The rule under which identifiers seen together link.
pub const SEEN_TOGETHER: &str = "seen_together";

/// The rule that keeps apart two profiles an unmerge split.
pub const SPLIT: &str = "split";

/// The rule that keeps an identifier split off its profile from linking with any other: an
/// event that carries it with others drops it.
pub const DETACHED: &str = "detached";

/// Plans merging two canonical profiles for a reason other than shared identifiers (a
/// probabilistic match, a person's decision), as of `now`: the younger folds into the older,
/// recorded under `rule` with `detail` (an explanation) and caused by `cause`. `Err` names the
/// limit the merge would break (`limit:user_id`: two user ids never merge). `view` must hold
/// both profiles and their limited identifiers.
pub fn plan_merge(
    rules: &Rules,
    view: GraphView,
    (a, b): (ProfileAge, ProfileAge),
    cause: &str,
    rule: &str,
    detail: Option<String>,
    now: OffsetDateTime,
) -> Result<Plan, String> {
    let (plan, mut outcomes) = plan_merges(rules, view, [((a, b), detail)], cause, rule, now);
    match outcomes.pop() {
        Some(Ok(_)) => Ok(plan),
        Some(Err(reason)) => Err(reason),
        None => Err("nothing_to_merge".to_owned()),
    }
}

/// Plans merging pairs of canonical profiles in order, as [`plan_merge`] would one pair after
/// another, each on the graph the merges before it left: a pair's profiles are followed to the
/// survivors of the earlier merges of the run, the survivor is the older of the two, and the
/// rules are checked against the two components as they are by then (what they hold of limited
/// types, the splits between them), so the outcome of every pair, and the final partition, are
/// those of merging the pairs one transaction each. All merges share `cause`, `rule` and `now`;
/// each is recorded with its pair's detail. Answers the plan and, per pair, its merge or why
/// not (`same_profile` when the pair is one profile by then, `split`, `limit:<type>`). `view`
/// must hold every profile of the pairs and their limited identifiers.
pub fn plan_merges(
    rules: &Rules,
    view: GraphView,
    pairs: impl IntoIterator<Item = ((ProfileAge, ProfileAge), Option<String>)>,
    cause: &str,
    rule: &str,
    now: OffsetDateTime,
) -> (Plan, Vec<Result<Merge, String>>) {
    let mut planner = Planner {
        rules,
        owners: view.owners,
        profiles: view.profiles,
        seen_with: view.seen_with,
        merged_into: HashMap::new(),
        forbidden: view.forbidden,
        detached: view.detached,
        now,
        new_profile: |_: &str| ProfileAge {
            created_at: now,
            id: Uuid::now_v7(),
        },
        out: Plan::default(),
    };
    let mut outcomes = Vec::new();
    for ((a, b), detail) in pairs {
        let (a, b) = (planner.find(a.id), planner.find(b.id));
        let (a, b) = (planner.age(a), planner.age(b));
        let (older, younger) = if a <= b { (a, b) } else { (b, a) };
        if older.id == younger.id {
            outcomes.push(Err("same_profile".to_owned()));
            continue;
        }
        if let Some(reason) = planner.violation(&[older, younger], &[], now) {
            outcomes.push(Err(reason));
            continue;
        }
        let mut merge = planner.merge(younger.id, older.id, cause, now);
        merge.rule = rule.to_owned();
        if let Some(last) = planner.out.decisions.last_mut() {
            last.rule = rule.to_owned();
            last.detail = detail;
        }
        planner.out.merges.push(merge.clone());
        outcomes.push(Ok(merge));
    }
    (planner.out, outcomes)
}

/// Resolves `records` in order against `view` under `rules`, as of `now` (truncated to
/// microseconds); new profile ids come from `new_id`. A record without linkable identifiers
/// gets a profile of its own; a suppressed record (see [`screen`]) gets a suppressed
/// resolution and changes nothing.
pub fn plan<'a>(
    rules: &Rules,
    records: impl IntoIterator<Item = &'a Record>,
    view: GraphView,
    now: OffsetDateTime,
    mut new_id: impl FnMut() -> Uuid,
) -> Plan {
    let GraphView {
        owners,
        profiles,
        seen_with,
        forbidden,
        detached,
        erased,
        suppressing,
    } = view;
    let mut planner = Planner {
        rules,
        owners,
        profiles,
        seen_with,
        merged_into: HashMap::new(),
        forbidden,
        detached,
        now,
        new_profile: move |_: &str| ProfileAge {
            created_at: now,
            id: new_id(),
        },
        out: Plan::default(),
    };
    for record in records {
        match screen(record, &erased, &suppressing) {
            Some(kept) => planner.resolve(&kept),
            None => planner.out.resolutions.push(Resolution::suppressed_event(
                record.event_id(),
                record.timestamp(),
            )),
        }
    }
    planner.out
}

pub(super) struct Planner<'r, F> {
    pub(super) rules: &'r Rules,
    pub(super) owners: HashMap<Identifier, Uuid>,
    pub(super) profiles: HashMap<Uuid, ProfileState>,
    pub(super) seen_with: HashMap<Identifier, HashSet<Uuid>>,
    /// Merges decided earlier in this run: merged profile -> survivor.
    pub(super) merged_into: HashMap<Uuid, Uuid>,
    /// Pairs of profiles that must never end up as one (split apart by an unmerge).
    pub(super) forbidden: Vec<(Uuid, Uuid)>,
    /// Identifiers split off their profile: they link only alone.
    pub(super) detached: HashSet<Identifier>,
    pub(super) now: OffsetDateTime,
    /// The profile an event creates (its id and creation time).
    pub(super) new_profile: F,
    pub(super) out: Plan,
}

impl<F: FnMut(&str) -> ProfileAge> Planner<'_, F> {
    pub(super) fn find(&self, mut id: Uuid) -> Uuid {
        while let Some(next) = self.merged_into.get(&id) {
            id = *next;
        }
        id
    }

    fn owner(&self, identifier: &Identifier) -> Option<Uuid> {
        self.owners.get(identifier).map(|p| self.find(*p))
    }

    pub(super) fn age(&self, id: Uuid) -> ProfileAge {
        ProfileAge {
            created_at: self.profiles.get(&id).map_or(self.now, |p| p.created_at),
            id,
        }
    }

    /// Whether `identifier` has stopped linking: of a type that may be shared, and seen with
    /// more profiles (its own included) than the rules allow.
    fn is_shared(&self, identifier: &Identifier) -> bool {
        if !self.rules.may_be_shared(&identifier.kind) {
            return false;
        }
        let Some(owner) = self.owner(identifier) else {
            return false;
        };
        let mut profiles: HashSet<Uuid> = HashSet::from([owner]);
        if let Some(seen) = self.seen_with.get(identifier) {
            profiles.extend(seen.iter().map(|p| self.find(*p)));
        }
        profiles.len() > self.rules.shared_after()
    }

    /// The candidates of `usable`: the distinct canonical profiles holding any of them.
    fn candidates(&self, usable: &[Identifier]) -> Vec<ProfileAge> {
        let mut out: Vec<ProfileAge> = usable
            .iter()
            .filter_map(|i| self.owner(i))
            .map(|id| self.age(id))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Why linking `usable` through `candidates` at `at` is not allowed, if it is not: `split`
    /// when it would join two profiles an unmerge split apart, else `limit:<type>` for the
    /// first limited type (in name order) it would push over its limit: more values than
    /// allowed, and more than any candidate already holds (a profile over a limit lowered since
    /// keeps what it has, but gains nothing).
    pub(super) fn violation(
        &self,
        candidates: &[ProfileAge],
        usable: &[Identifier],
        at: OffsetDateTime,
    ) -> Option<String> {
        if candidates.len() > 1 && !self.forbidden.is_empty() {
            let roots: HashSet<Uuid> = candidates.iter().map(|c| self.find(c.id)).collect();
            if self
                .forbidden
                .iter()
                .any(|(a, b)| roots.contains(&self.find(*a)) && roots.contains(&self.find(*b)))
            {
                return Some(SPLIT.to_owned());
            }
        }
        let mut types: Vec<&str> = self.rules.limited_types().collect();
        types.sort_unstable();
        for kind in types {
            let Some(limit) = self.rules.limit(kind) else {
                continue;
            };
            let counts =
                |linked_at: OffsetDateTime| limit.window.is_none_or(|w| linked_at > at - w);
            let mut values: HashSet<&str> = HashSet::new();
            let mut largest = 0;
            for candidate in candidates {
                let Some(state) = self.profiles.get(&candidate.id) else {
                    continue;
                };
                let mut own = 0;
                for (identifier, linked_at) in &state.limited {
                    if identifier.kind == kind && counts(*linked_at) {
                        values.insert(&identifier.value);
                        own += 1;
                    }
                }
                largest = largest.max(own);
            }
            for identifier in usable {
                if identifier.kind == kind && self.owner(identifier).is_none() {
                    values.insert(&identifier.value);
                }
            }
            let max = usize::try_from(limit.max).unwrap_or(usize::MAX);
            if values.len() > max && values.len() > largest {
                return Some(format!("limit:{kind}"));
            }
        }
        None
    }

    pub(super) fn resolve(&mut self, record: &Record) {
        let at = record.timestamp();
        let event_id = record.event_id();
        let mut ids: Vec<Identifier> = record.identifiers().to_vec();
        ids.sort_by(|a, b| {
            self.rules
                .priority_key(&a.kind)
                .cmp(&self.rules.priority_key(&b.kind))
        });

        let mut dropped: Vec<(Identifier, String)> = Vec::new();
        if !self.detached.is_empty() && ids.iter().any(|i| self.detached.contains(i)) {
            // A detached identifier links only when the event carries nothing else (then the
            // highest-priority detached one).
            let (detached, rest): (Vec<Identifier>, Vec<Identifier>) =
                ids.into_iter().partition(|i| self.detached.contains(i));
            ids = rest;
            let mut detached = detached.into_iter();
            if ids.is_empty() {
                ids.extend(detached.next());
            }
            dropped.extend(detached.map(|i| (i, DETACHED.to_owned())));
        }
        let (shared, mut usable): (Vec<Identifier>, Vec<Identifier>) =
            ids.iter().cloned().partition(|i| self.is_shared(i));
        for identifier in &shared {
            dropped.push((identifier.clone(), format!("shared:{}", identifier.kind)));
        }

        // Drop the lowest-priority identifier until the match breaks no limit.
        let mut limited_out: Vec<(Identifier, String)> = Vec::new();
        while let Some(reason) = self.violation(&self.candidates(&usable), &usable, at) {
            match usable.pop() {
                Some(last) => limited_out.push((last, reason)),
                None => break,
            }
        }
        // Put back, highest priority first, what fits now that the match settled.
        for (identifier, rule) in limited_out.into_iter().rev() {
            let mut with = usable.clone();
            with.push(identifier.clone());
            if self.violation(&self.candidates(&with), &with, at).is_none() {
                usable = with;
            } else {
                dropped.push((identifier, rule));
            }
        }
        usable.sort_by(|a, b| {
            self.rules
                .priority_key(&a.kind)
                .cmp(&self.rules.priority_key(&b.kind))
        });

        let candidates = self.candidates(&usable);
        let mut merges = Vec::new();
        let survivor = match candidates.split_first() {
            Some((oldest, rest)) => {
                for merged in rest {
                    merges.push(self.merge(merged.id, oldest.id, event_id, at));
                }
                oldest.id
            }
            None => match shared.first().and_then(|i| self.owner(i)) {
                // Only shared identifiers: the event goes to the holder of the first, and links
                // nothing.
                Some(holder) if usable.is_empty() => holder,
                _ => self.create(event_id, at),
            },
        };
        for identifier in &usable {
            if self.owner(identifier).is_none() {
                self.link(identifier, survivor, event_id, at);
            }
        }
        // Identifiers of the event held by another profile were seen with this one.
        for identifier in &ids {
            if let Some(owner) = self.owner(identifier)
                && owner != survivor
                && self
                    .seen_with
                    .entry(identifier.clone())
                    .or_default()
                    .insert(survivor)
            {
                self.out.sightings.push(Sighting {
                    identifier: identifier.clone(),
                    profile_id: survivor,
                    event_id: event_id.to_owned(),
                });
            }
        }
        for (identifier, rule) in &dropped {
            self.out.decisions.push(Decision {
                kind: DecisionKind::Drop,
                event_id: event_id.to_owned(),
                profile_id: survivor,
                other_profile_id: None,
                identifier: Some(identifier.clone()),
                rule: rule.clone(),
                event_time: at,
                detail: None,
            });
        }
        let mut reported: Vec<Dropped> = dropped
            .into_iter()
            .map(|(identifier, reason)| Dropped { identifier, reason })
            .collect();
        reported.extend(record.unlinked().iter().map(|(identifier, why)| Dropped {
            identifier: identifier.clone(),
            reason: why.as_str().to_owned(),
        }));
        self.out.merges.extend(merges.iter().cloned());
        self.out.resolutions.push(Resolution {
            event_id: event_id.to_owned(),
            profile_id: survivor,
            identifiers: usable,
            merges,
            dropped: reported,
            event_time: at,
            suppressed: false,
        });
    }

    fn create(&mut self, event_id: &str, at: OffsetDateTime) -> Uuid {
        let profile = (self.new_profile)(event_id);
        self.profiles.insert(
            profile.id,
            ProfileState {
                created_at: profile.created_at,
                limited: Vec::new(),
            },
        );
        self.out.new_profiles.push(profile);
        self.out.decisions.push(Decision {
            kind: DecisionKind::Create,
            event_id: event_id.to_owned(),
            profile_id: profile.id,
            other_profile_id: None,
            identifier: None,
            rule: SEEN_TOGETHER.to_owned(),
            event_time: at,
            detail: None,
        });
        profile.id
    }

    fn link(&mut self, identifier: &Identifier, profile: Uuid, event_id: &str, at: OffsetDateTime) {
        self.owners.insert(identifier.clone(), profile);
        if self.rules.limit(&identifier.kind).is_some()
            && let Some(state) = self.profiles.get_mut(&profile)
        {
            state.limited.push((identifier.clone(), at));
        }
        self.out.new_identifiers.push(NewIdentifier {
            identifier: identifier.clone(),
            profile_id: profile,
            event_id: event_id.to_owned(),
            linked_at: at,
        });
        self.out.decisions.push(Decision {
            kind: DecisionKind::Link,
            event_id: event_id.to_owned(),
            profile_id: profile,
            other_profile_id: None,
            identifier: Some(identifier.clone()),
            rule: SEEN_TOGETHER.to_owned(),
            event_time: at,
            detail: None,
        });
    }

    pub(super) fn merge(
        &mut self,
        merged: Uuid,
        survivor: Uuid,
        event_id: &str,
        at: OffsetDateTime,
    ) -> Merge {
        self.merged_into.insert(merged, survivor);
        if let Some(state) = self.profiles.remove(&merged)
            && let Some(target) = self.profiles.get_mut(&survivor)
        {
            target.limited.extend(state.limited);
        }
        self.out.decisions.push(Decision {
            kind: DecisionKind::Merge,
            event_id: event_id.to_owned(),
            profile_id: merged,
            other_profile_id: Some(survivor),
            identifier: None,
            rule: SEEN_TOGETHER.to_owned(),
            event_time: at,
            detail: None,
        });
        Merge {
            surviving_profile_id: survivor,
            merged_profile_id: merged,
            cause_event_id: event_id.to_owned(),
            merged_at: self.now,
            rule: SEEN_TOGETHER.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use time::Duration;

    use super::*;
    use crate::domain::UnionFind;
    use crate::domain::rules::RulesConfig;

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + Duration::seconds(seconds)
    }

    fn ids() -> impl FnMut() -> Uuid {
        let mut n = 0u128;
        move || {
            n += 1;
            Uuid::from_u128(n)
        }
    }

    fn record_at(event: &str, seconds: i64, identifiers: &[(&str, &str)]) -> Record {
        Record::new(
            &Rules::default(),
            event,
            identifiers
                .iter()
                .map(|(k, v)| Identifier::new(*k, *v))
                .collect(),
            at(seconds),
        )
        .expect("valid")
    }

    fn record(event: &str, identifiers: &[(&str, &str)]) -> Record {
        record_at(event, 0, identifiers)
    }

    /// Rules that only link: no limits, no protection, nothing shared.
    fn linking_only() -> Rules {
        Rules::compile(RulesConfig::linking_only()).unwrap()
    }

    #[test]
    fn unknown_identifiers_get_a_new_profile() {
        let plan = plan(
            &Rules::default(),
            &[record("e1", &[("user_id", "u1")])],
            GraphView::new(),
            at(1),
            ids(),
        );
        assert_eq!(plan.new_profiles.len(), 1);
        assert_eq!(plan.resolutions[0].profile_id, plan.new_profiles[0].id);
        assert_eq!(plan.new_identifiers.len(), 1);
        assert!(plan.merges.is_empty());
        let kinds: Vec<_> = plan.decisions.iter().map(|d| d.kind).collect();
        assert_eq!(kinds, [DecisionKind::Create, DecisionKind::Link]);
    }

    #[test]
    fn several_profiles_merge_into_the_oldest_then_smallest_id() {
        let (a, b, c) = (
            Uuid::from_u128(30),
            Uuid::from_u128(20),
            Uuid::from_u128(10),
        );
        let mut view = GraphView::new();
        let age = |created: i64, id| ProfileAge {
            created_at: at(created),
            id,
        };
        view.insert(Identifier::new("anonymous_id", "a"), age(5, a));
        view.insert(Identifier::new("email", "b@x.io"), age(5, b));
        view.insert(Identifier::new("anonymous_id", "c"), age(9, c));
        let records = [record(
            "e9",
            &[
                ("anonymous_id", "c"),
                ("anonymous_id", "a"),
                ("email", "b@x.io"),
                ("user_id", "u1"),
            ],
        )];
        let plan = plan(&Rules::default(), &records, view, at(10), ids());
        let resolution = &plan.resolutions[0];
        assert_eq!(resolution.profile_id, b);
        let merged: Vec<_> = resolution
            .merges
            .iter()
            .map(|m| m.merged_profile_id)
            .collect();
        assert_eq!(merged, [a, c], "oldest merged profile first");
        assert!(
            resolution
                .merges
                .iter()
                .all(|m| m.surviving_profile_id == b && m.rule == SEEN_TOGETHER)
        );
        assert_eq!(plan.new_identifiers.len(), 1);
        assert_eq!(plan.new_identifiers[0].profile_id, b);
        assert_eq!(
            resolution.identifiers[0],
            Identifier::new("user_id", "u1"),
            "highest priority first"
        );
    }

    #[test]
    fn records_without_identifiers_get_their_own_profile() {
        let records = [record("e1", &[("user_id", "null")]), record("e2", &[])];
        let plan = plan(&Rules::default(), &records, GraphView::new(), at(1), ids());
        assert_eq!(plan.new_profiles.len(), 2);
        assert_ne!(
            plan.resolutions[0].profile_id,
            plan.resolutions[1].profile_id
        );
        assert_eq!(plan.resolutions[0].dropped[0].reason, "blocked");
    }

    /// A forgotten person's user id suppresses every event that carries it, with whatever else;
    /// their anonymous id is only erased: alone it suppresses, with a fresh user id it is left
    /// out and the rest resolves. Suppressed records change nothing.
    #[test]
    fn forgotten_identifiers_suppress_or_are_left_out() {
        let mut view = GraphView::new();
        view.suppress(Identifier::new("user_id", "gone"));
        view.erase(Identifier::new("anonymous_id", "a-gone"));
        let records = [
            record("e1", &[("user_id", "gone"), ("anonymous_id", "fresh")]),
            record("e2", &[("anonymous_id", "a-gone")]),
            record("e3", &[("anonymous_id", "a-gone"), ("user_id", "new")]),
            record("e4", &[("user_id", "null")]),
            record(
                "e5",
                &[("anonymous_id", "a-gone"), ("user_id", "undefined")],
            ),
        ];
        let plan = plan(&Rules::default(), &records, view, at(1), ids());
        let suppressed: Vec<bool> = plan.resolutions.iter().map(|r| r.suppressed).collect();
        assert_eq!(suppressed, [true, true, false, false, true]);
        for r in plan.resolutions.iter().filter(|r| r.suppressed) {
            assert_eq!(r.profile(), None);
            assert!(r.identifiers.is_empty() && r.merges.is_empty() && r.dropped.is_empty());
        }
        assert_eq!(plan.resolutions[0].event_time, at(0));
        // e3 and e4 each get a profile; nothing else is written.
        assert_eq!(plan.new_profiles.len(), 2);
        assert_eq!(
            plan.resolutions[2].identifiers,
            [Identifier::new("user_id", "new")],
            "the erased anonymous id is neither linked nor named"
        );
        assert!(plan.resolutions[2].dropped.is_empty());
        assert_eq!(plan.new_identifiers.len(), 1);
        assert!(plan.sightings.is_empty());
        assert!(
            plan.decisions
                .iter()
                .all(|d| d.event_id == "e3" || d.event_id == "e4")
        );
    }

    /// Runs records one plan at a time through an in-memory graph with the default rules.
    fn run(records: &[Record]) -> (MemoryGraph, Vec<Resolution>) {
        let mut graph = MemoryGraph::default();
        let mut new_id = ids();
        let mut out = Vec::new();
        for (n, r) in records.iter().enumerate() {
            let n = i64::try_from(n).unwrap();
            out.extend(graph.resolve(
                &Rules::default(),
                std::slice::from_ref(r),
                at(n),
                &mut new_id,
            ));
        }
        (graph, out)
    }

    #[test]
    fn a_shared_device_without_logout_keeps_two_users_apart() {
        let (graph, got) = run(&[
            record("e1", &[("anonymous_id", "a"), ("user_id", "u1")]),
            record("e2", &[("anonymous_id", "a"), ("user_id", "u2")]),
            record("e3", &[("anonymous_id", "a"), ("email", "x@y.io")]),
        ]);
        assert_ne!(got[0].profile_id, got[1].profile_id);
        assert_eq!(
            got[1].dropped,
            [Dropped {
                identifier: Identifier::new("anonymous_id", "a"),
                reason: "limit:user_id".into()
            }]
        );
        assert_eq!(graph.owner("anonymous_id", "a"), got[0].profile_id);
        // Seen with two profiles, the device id stopped linking: the email gets its own profile.
        assert_eq!(got[2].dropped[0].reason, "shared:anonymous_id");
        assert_ne!(got[2].profile_id, got[0].profile_id);
        assert_eq!(graph.owner("email", "x@y.io"), got[2].profile_id);
    }

    #[test]
    fn a_generic_email_does_not_fuse_its_users() {
        let records: Vec<Record> = (0..6)
            .map(|n| {
                record(
                    &format!("e{n}"),
                    &[("user_id", &format!("u{n}")), ("email", "info@acme.io")],
                )
            })
            .collect();
        let (_, got) = run(&records);
        let profiles: HashSet<Uuid> = got.iter().map(|r| r.profile_id).collect();
        assert_eq!(profiles.len(), 6);
        assert_eq!(got[1].dropped[0].reason, "limit:user_id");
        // Seen with a second profile, the email stopped linking altogether.
        assert!(
            got[2..]
                .iter()
                .all(|r| r.dropped[0].reason == "shared:email")
        );
    }

    #[test]
    fn over_the_limit_the_lowest_priority_identifier_is_dropped() {
        let mut records = vec![record("e0", &[("user_id", "u1")])];
        for n in 1..=6 {
            records.push(record(
                &format!("e{n}"),
                &[("user_id", "u1"), ("email", &format!("m{n}@x.io"))],
            ));
        }
        let (graph, got) = run(&records);
        assert!(got.iter().all(|r| r.profile_id == got[0].profile_id));
        assert!(got[1..6].iter().all(|r| r.dropped.is_empty()));
        assert_eq!(got[6].dropped[0].reason, "limit:email");
        assert!(
            !graph
                .identifiers
                .contains_key(&Identifier::new("email", "m6@x.io"))
        );
    }

    #[test]
    fn identifiers_dropped_on_the_way_are_put_back_when_they_fit() {
        let (graph, got) = run(&[
            record("e1", &[("user_id", "u1"), ("email", "e@x.io")]),
            // u2 and the new anonymous id cannot join u1's profile through the email: the email
            // is dropped, the anonymous id (dropped first, as the lowest priority) comes back.
            record(
                "e2",
                &[
                    ("user_id", "u2"),
                    ("email", "e@x.io"),
                    ("anonymous_id", "a2"),
                ],
            ),
        ]);
        assert_ne!(got[1].profile_id, got[0].profile_id);
        assert_eq!(graph.owner("anonymous_id", "a2"), got[1].profile_id);
        assert_eq!(got[1].dropped.len(), 1);
        assert_eq!(
            got[1].dropped[0].identifier,
            Identifier::new("email", "e@x.io")
        );
    }

    #[test]
    fn a_windowed_limit_counts_only_recent_links() {
        // At most 10 new anonymous ids a week (the default).
        let day = 24 * 3_600;
        let mut records = vec![record_at("u", 0, &[("user_id", "u1")])];
        for n in 0..11 {
            records.push(record_at(
                &format!("a{n}"),
                n,
                &[("user_id", "u1"), ("anonymous_id", &format!("a{n}"))],
            ));
        }
        records.push(record_at(
            "late",
            8 * day,
            &[("user_id", "u1"), ("anonymous_id", "a11")],
        ));
        let mut graph = MemoryGraph::default();
        let mut new_id = ids();
        let got = graph.resolve(&Rules::default(), &records, at(0), &mut new_id);
        assert!(got[1..11].iter().all(|r| r.dropped.is_empty()));
        assert_eq!(got[11].dropped[0].reason, "limit:anonymous_id");
        assert!(
            got[12].dropped.is_empty(),
            "a week later the window has room again"
        );
    }

    /// An in-memory graph that applies plans the way the stores do: identifiers are never
    /// rewritten, merged profiles point at their survivor.
    #[derive(Default)]
    struct MemoryGraph {
        identifiers: HashMap<Identifier, (Uuid, OffsetDateTime)>,
        profiles: HashMap<Uuid, (OffsetDateTime, Option<Uuid>)>,
        sightings: HashSet<(Identifier, Uuid)>,
        events: HashMap<String, Uuid>,
    }

    impl MemoryGraph {
        fn canonical(&self, mut id: Uuid) -> Uuid {
            while let Some((_, Some(next))) = self.profiles.get(&id) {
                id = *next;
            }
            id
        }

        fn owner(&self, kind: &str, value: &str) -> Uuid {
            self.canonical(self.identifiers[&Identifier::new(kind, value)].0)
        }

        fn resolve(
            &mut self,
            rules: &Rules,
            records: &[Record],
            now: OffsetDateTime,
            new_id: &mut impl FnMut() -> Uuid,
        ) -> Vec<Resolution> {
            let mut view = GraphView::new();
            for record in records {
                for identifier in record.identifiers() {
                    if let Some((p, _)) = self.identifiers.get(identifier) {
                        let id = self.canonical(*p);
                        view.insert(
                            identifier.clone(),
                            ProfileAge {
                                created_at: self.profiles[&id].0,
                                id,
                            },
                        );
                    }
                }
            }
            let candidates: HashSet<Uuid> = view.owners.values().copied().collect();
            for (identifier, (p, linked_at)) in &self.identifiers {
                let id = self.canonical(*p);
                if candidates.contains(&id) && rules.limit(&identifier.kind).is_some() {
                    view.insert_limited(id, identifier.clone(), *linked_at);
                }
            }
            for (identifier, p) in &self.sightings {
                view.insert_sighting(identifier.clone(), self.canonical(*p));
            }
            let plan = plan(rules, records, view, now, &mut *new_id);
            for p in plan.new_profiles {
                assert!(self.profiles.insert(p.id, (p.created_at, None)).is_none());
            }
            for n in plan.new_identifiers {
                assert!(
                    self.identifiers
                        .insert(n.identifier, (n.profile_id, n.linked_at))
                        .is_none()
                );
            }
            for m in plan.merges {
                let merged = self
                    .profiles
                    .get_mut(&m.merged_profile_id)
                    .expect("profile");
                assert_eq!(merged.1, None, "a profile is merged once");
                merged.1 = Some(m.surviving_profile_id);
            }
            for s in plan.sightings {
                self.sightings.insert((s.identifier, s.profile_id));
            }
            for r in &plan.resolutions {
                self.events.insert(r.event_id.clone(), r.profile_id);
            }
            plan.resolutions
        }
    }

    fn arb_records() -> impl Strategy<Value = Vec<Vec<(usize, u8)>>> {
        prop::collection::vec(prop::collection::vec((0..3usize, 0..12u8), 0..4), 1..40)
    }

    proptest! {
        /// With rules that only link, whatever the order, the chunking and the clock, the graph
        /// partitions identifiers exactly as a union-find over the records does, and every event
        /// resolves to its identifiers' profile.
        #[test]
        fn graph_matches_union_find_in_any_order(
            raw in arb_records(),
            cuts in prop::collection::vec(1..8usize, 1..10),
            order in any::<prop::sample::Index>(),
        ) {
            const TYPES: [&str; 3] = ["user_id", "anonymous_id", "email"];
            let rules = linking_only();
            let mut records: Vec<Record> = raw.iter().enumerate().map(|(n, ids)| {
                Record::new(&rules, format!("e{n}"), ids.iter().map(|(t, v)| Identifier::new(TYPES[*t], format!("v{v}"))).collect(), at(0)).expect("valid")
            }).collect();
            // A rotation and a reversal stand for an arbitrary arrival order.
            let pivot = order.index(records.len());
            records.rotate_left(pivot);
            if pivot % 2 == 1 {
                records.reverse();
            }

            let mut graph = MemoryGraph::default();
            let mut new_id = ids();
            let (mut start, mut clock) = (0, 0);
            for cut in cuts.iter().cycle() {
                if start >= records.len() { break; }
                let end = (start + cut).min(records.len());
                clock += i64::from(*cut % 2 == 0); // sometimes the same instant: ties by id
                graph.resolve(&rules, &records[start..end], at(clock), &mut new_id);
                start = end;
            }

            let mut reference = UnionFind::new();
            for r in &records {
                reference.union_all(r.identifiers().iter().cloned());
            }
            let mut groups: HashMap<Uuid, BTreeSet<Identifier>> = HashMap::new();
            for (identifier, (profile, _)) in &graph.identifiers {
                groups.entry(graph.canonical(*profile)).or_default().insert(identifier.clone());
            }
            let partition: BTreeSet<BTreeSet<Identifier>> = groups.into_values().collect();
            prop_assert_eq!(partition, reference.partition());

            for r in &records {
                let profile = graph.canonical(graph.events[r.event_id()]);
                let owners: HashSet<Uuid> = r.identifiers().iter().map(|i| graph.canonical(graph.identifiers[i].0)).collect();
                prop_assert!(owners.iter().all(|o| *o == profile));
            }
        }

        /// Under the default rules no profile ever holds more values of a type than its limit,
        /// nor two user ids, whatever the input.
        #[test]
        fn limits_hold_under_any_input(raw in arb_records()) {
            const TYPES: [&str; 3] = ["user_id", "anonymous_id", "email"];
            let rules = Rules::default();
            let records: Vec<Record> = raw.iter().enumerate().map(|(n, ids)| {
                Record::new(&rules, format!("e{n}"), ids.iter().map(|(t, v)| Identifier::new(TYPES[*t], format!("v{v}"))).collect(), at(0)).expect("valid")
            }).collect();
            let (graph, _) = run(&records);
            let mut per_profile: HashMap<(Uuid, &str), usize> = HashMap::new();
            for (identifier, (profile, _)) in &graph.identifiers {
                *per_profile.entry((graph.canonical(*profile), identifier.kind.as_str())).or_default() += 1;
            }
            for ((_, kind), n) in per_profile {
                let max = rules.limit(kind).map_or(usize::MAX, |l| l.max as usize);
                prop_assert!(n <= max, "{} {} values", n, kind);
            }
        }
    }
}
