//! Replaying a connected component's history under extra constraints: the core of lossless
//! unmerge, of splitting an identifier off its profile and of erasing one.
//!
//! A profile's identity is derived from its history: the events that resolved to it (their
//! linkable identifiers and event times, in the order they were resolved) and the merges decided
//! outside the pipeline (probabilistic, manual). Replaying that history through the same
//! planner, from an empty graph, with the original profile ids and creation times, gives back
//! the same partition. Replaying it with two profiles *forbidden* to meet (an unmerge) or
//! without some identifiers (a deletion) gives the partition as if the merge, or the
//! identifier, had never been: the event that bridged the two sides now drops its
//! lowest-priority identifier (rule `split`), exactly as a limit would, and every later event
//! goes to the side its identifiers belong to.

use std::collections::{HashMap, HashSet};

use tessera_core::Identifier;
use time::OffsetDateTime;
use uuid::Uuid;

use super::plan::{DETACHED, Planner, SPLIT, screen};
use super::{Merge, Plan, ProfileAge, Record, Rules};

/// One entry of a component's history, in the order it was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryEntry {
    /// An event: its linkable identifiers and time, and the profile it created (when it
    /// created one), so the replay creates the same profile.
    Event {
        /// The event's record (its identifiers, normalized).
        record: Record,
        /// The profile the event created originally.
        created: Option<ProfileAge>,
    },
    /// A merge decided outside the pipeline.
    Merge {
        /// The two profiles, as named when the merge was decided.
        pair: (Uuid, Uuid),
        /// What caused it (`match:model-3`, `manual:…`).
        cause: String,
        /// The rule (`probabilistic`, `manual`).
        rule: String,
        /// When it was decided.
        at: OffsetDateTime,
    },
}

/// The component as the replay left it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// Every decision and resolution of the replay, as a plan from an empty graph.
    pub plan: Plan,
    /// Every profile of the replay (created by an event or named by a merge) and the canonical
    /// profile it ends in.
    pub canonical: HashMap<Uuid, Uuid>,
    /// Every identifier linked, with its canonical profile at the end.
    pub owners: HashMap<Identifier, Uuid>,
    /// Each event's canonical profile at the end.
    pub events: HashMap<String, Uuid>,
    /// The non-event merges that no longer stand (forbidden, or refused by the rules now that
    /// the component is shaped differently), with why.
    pub refused: Vec<(Merge, String)>,
    /// The events that carried only erased identifiers: they belong to no one any more and
    /// were left out.
    pub erased_events: Vec<String>,
}

/// What a replay must hold to, beyond the rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints {
    /// Pairs of profiles that must never end up as one (unmerges).
    pub forbidden: Vec<(Uuid, Uuid)>,
    /// Identifiers split off their profile: one links only when an event carries nothing else.
    pub detached: HashSet<Identifier>,
    /// Identifiers erased: taken out of every event, as if no event had carried them; an event
    /// left with no identifier is left out.
    pub erased: HashSet<Identifier>,
}

/// Replays `history` under `rules` from an empty graph, holding to `constraints`: each
/// forbidden pair kept apart, detached identifiers linking only alone, erased identifiers taken
/// out of every event. Profiles an event created originally are created again with the same id
/// and time; any other profile an event now needs gets its id from `new_id` and the time `now`.
pub fn replay(
    rules: &Rules,
    history: &[HistoryEntry],
    constraints: &Constraints,
    now: OffsetDateTime,
    mut new_id: impl FnMut() -> Uuid,
) -> Replay {
    let created: HashMap<&str, ProfileAge> = history
        .iter()
        .filter_map(|entry| match entry {
            HistoryEntry::Event {
                record,
                created: Some(profile),
            } => Some((record.event_id(), *profile)),
            HistoryEntry::Event { created: None, .. } | HistoryEntry::Merge { .. } => None,
        })
        .collect();
    let mut planner = Planner {
        rules,
        owners: HashMap::new(),
        profiles: HashMap::new(),
        seen_with: HashMap::new(),
        merged_into: HashMap::new(),
        forbidden: constraints.forbidden.clone(),
        detached: constraints.detached.clone(),
        now,
        new_profile: |event_id: &str| {
            created
                .get(event_id)
                .copied()
                .unwrap_or_else(|| ProfileAge {
                    created_at: now,
                    id: new_id(),
                })
        },
        out: Plan::default(),
    };
    let mut refused = Vec::new();
    let mut erased_events = Vec::new();
    // Only the erasure itself: an event of the component carries nothing that suppresses.
    let suppressing = HashSet::new();
    for entry in history {
        match entry {
            HistoryEntry::Event { record, .. } => {
                match screen(record, &constraints.erased, &suppressing) {
                    Some(kept) => planner.resolve(&kept),
                    None => erased_events.push(record.event_id().to_owned()),
                }
            }
            HistoryEntry::Merge {
                pair,
                cause,
                rule,
                at,
            } => {
                let (a, b) = (planner.find(pair.0), planner.find(pair.1));
                let (a, b) = (planner.age(a), planner.age(b));
                let (older, younger) = if a <= b { (a, b) } else { (b, a) };
                let merge = Merge {
                    surviving_profile_id: older.id,
                    merged_profile_id: younger.id,
                    cause_event_id: cause.clone(),
                    merged_at: *at,
                    rule: rule.clone(),
                };
                if older.id == younger.id {
                    continue;
                }
                // Only profiles the replay knows can merge: a profile of the pair that no
                // event recreated (all its events moved) has nothing left to merge.
                if !planner.profiles.contains_key(&older.id)
                    || !planner.profiles.contains_key(&younger.id)
                {
                    refused.push((merge, "gone".to_owned()));
                    continue;
                }
                if let Some(reason) = planner.violation(&[older, younger], &[], *at) {
                    refused.push((merge, reason));
                    continue;
                }
                let mut merged = planner.merge(younger.id, older.id, cause, *at);
                merged.rule = rule.clone();
                merged.merged_at = *at;
                if let Some(last) = planner.out.decisions.last_mut() {
                    last.rule = rule.clone();
                }
                planner.out.merges.push(merged);
            }
        }
    }
    let mut known: HashSet<Uuid> = planner.out.new_profiles.iter().map(|p| p.id).collect();
    known.extend(planner.merged_into.keys().copied());
    let canonical = known.into_iter().map(|id| (id, planner.find(id))).collect();
    let owners = planner
        .owners
        .iter()
        .map(|(identifier, profile)| (identifier.clone(), planner.find(*profile)))
        .collect();
    let events = planner
        .out
        .resolutions
        .iter()
        .map(|r| (r.event_id.clone(), planner.find(r.profile_id)))
        .collect();
    Replay {
        plan: planner.out,
        canonical,
        owners,
        events,
        refused,
        erased_events,
    }
}

/// `entries` in event-time order: what resolving every record by event time would have
/// decided. Events sort by their event time; ties keep the order they were resolved in (the
/// sort is stable). A merge decided outside the pipeline (manual, probabilistic) counts as
/// happening when it was decided, but never before an event resolved before it: the profiles
/// it names exist only once those events are replayed.
pub fn in_event_time_order(entries: &[HistoryEntry]) -> Vec<HistoryEntry> {
    let mut latest: Option<OffsetDateTime> = None;
    let mut keyed: Vec<(OffsetDateTime, &HistoryEntry)> = entries
        .iter()
        .map(|entry| match entry {
            HistoryEntry::Event { record, .. } => {
                let at = record.timestamp();
                latest = Some(latest.map_or(at, |l| l.max(at)));
                (at, entry)
            }
            HistoryEntry::Merge { at, .. } => (latest.map_or(*at, |l| l.max(*at)), entry),
        })
        .collect();
    keyed.sort_by_key(|(at, _)| *at);
    keyed.into_iter().map(|(_, entry)| entry.clone()).collect()
}

/// Whether `reason` (why an identifier was not linked) is a decision that can depend on the
/// order records arrive in: a limit (protection included) or the shared rule. A record that
/// took one while older than decisions already in its component is re-resolved in event-time
/// order.
pub fn order_sensitive_drop(reason: &str) -> bool {
    reason.starts_with("limit:") || reason.starts_with("shared:")
}

/// Whether an identifier was kept from linking by an unmerge or by being split off.
pub fn split_apart(reason: &str) -> bool {
    reason == SPLIT || reason == DETACHED
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use time::Duration;

    use super::*;
    use crate::domain::rules::RulesConfig;
    use crate::domain::{DecisionKind, GraphView, plan};

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + Duration::seconds(seconds)
    }

    fn record(rules: &Rules, event: &str, seconds: i64, ids: &[(&str, &str)]) -> Record {
        Record::new(
            rules,
            event,
            ids.iter().map(|(k, v)| Identifier::new(*k, *v)).collect(),
            at(seconds),
        )
        .expect("valid")
    }

    /// Resolves `records` one at a time as the service would, each in its own run at its own
    /// time, and returns the history it leaves and the owner of every identifier at the end.
    fn original(
        rules: &Rules,
        records: &[Record],
        manual: &[(usize, (usize, usize))],
    ) -> (Vec<HistoryEntry>, HashMap<Identifier, Uuid>, Vec<Uuid>) {
        // One replay with nothing forbidden is exactly a run through the planner from an empty
        // graph, which is what the stores do record by record; build the history as the stores
        // record it and let the replay be the reference for the identity property.
        let mut next = 0u128;
        let mut history = Vec::new();
        let mut graph = GraphState::default();
        let mut event_profiles = Vec::new();
        for (n, r) in records.iter().enumerate() {
            let now = at(i64::try_from(n).unwrap() * 10);
            let view = graph.view(rules, r);
            let plan = plan(rules, std::slice::from_ref(r), view, now, || {
                next += 1;
                Uuid::from_u128(next)
            });
            let created = plan.new_profiles.first().copied();
            graph.apply(&plan);
            event_profiles.push(plan.resolutions[0].profile_id);
            history.push(HistoryEntry::Event {
                record: r.clone(),
                created,
            });
            for (after, (x, y)) in manual {
                if *after == n {
                    let (a, b) = (event_profiles[*x], event_profiles[*y]);
                    if graph.canonical(a) != graph.canonical(b) {
                        let (a, b) = (graph.age(graph.canonical(a)), graph.age(graph.canonical(b)));
                        let (older, younger) = if a <= b { (a, b) } else { (b, a) };
                        graph.merged.insert(younger.id, older.id);
                        history.push(HistoryEntry::Merge {
                            pair: (a.id, b.id),
                            cause: format!("manual:{n}"),
                            rule: "manual".into(),
                            at: now,
                        });
                    }
                }
            }
        }
        let owners = graph
            .owners
            .iter()
            .map(|(i, p)| (i.clone(), graph.canonical(*p)))
            .collect();
        (history, owners, event_profiles)
    }

    /// The graph the stores keep, in memory: identifiers never move, merged profiles point at
    /// their survivor.
    #[derive(Default)]
    struct GraphState {
        owners: HashMap<Identifier, Uuid>,
        linked: HashMap<Identifier, OffsetDateTime>,
        created: HashMap<Uuid, OffsetDateTime>,
        merged: HashMap<Uuid, Uuid>,
        seen: HashSet<(Identifier, Uuid)>,
    }

    impl GraphState {
        fn canonical(&self, mut id: Uuid) -> Uuid {
            while let Some(next) = self.merged.get(&id) {
                id = *next;
            }
            id
        }

        fn age(&self, id: Uuid) -> ProfileAge {
            ProfileAge {
                created_at: self.created[&id],
                id,
            }
        }

        fn view(&self, rules: &Rules, record: &Record) -> GraphView {
            let mut view = GraphView::new();
            let mut candidates = HashSet::new();
            for identifier in record.identifiers() {
                if let Some(p) = self.owners.get(identifier) {
                    let id = self.canonical(*p);
                    candidates.insert(id);
                    view.insert(identifier.clone(), self.age(id));
                }
            }
            for (identifier, p) in &self.owners {
                let id = self.canonical(*p);
                if candidates.contains(&id) && rules.limit(&identifier.kind).is_some() {
                    view.insert_limited(id, identifier.clone(), self.linked[identifier]);
                }
            }
            for (identifier, p) in &self.seen {
                view.insert_sighting(identifier.clone(), self.canonical(*p));
            }
            view
        }

        fn apply(&mut self, plan: &Plan) {
            for p in &plan.new_profiles {
                self.created.insert(p.id, p.created_at);
            }
            for n in &plan.new_identifiers {
                self.owners.insert(n.identifier.clone(), n.profile_id);
                self.linked.insert(n.identifier.clone(), n.linked_at);
            }
            for m in &plan.merges {
                self.merged
                    .insert(m.merged_profile_id, m.surviving_profile_id);
            }
            for s in &plan.sightings {
                self.seen.insert((s.identifier.clone(), s.profile_id));
            }
        }
    }

    fn fresh() -> impl FnMut() -> Uuid {
        let mut n = 1_000_000u128;
        move || {
            n += 1;
            Uuid::from_u128(n)
        }
    }

    fn partition(owners: &HashMap<Identifier, Uuid>) -> BTreeSet<BTreeSet<String>> {
        let mut groups: HashMap<Uuid, BTreeSet<String>> = HashMap::new();
        for (identifier, profile) in owners {
            groups
                .entry(*profile)
                .or_default()
                .insert(format!("{}:{}", identifier.kind, identifier.value));
        }
        groups.into_values().collect()
    }

    #[test]
    fn a_manual_merge_reverted_leaves_both_profiles_as_before() {
        let rules = Rules::default();
        let records = [
            record(
                &rules,
                "e1",
                1,
                &[("anonymous_id", "a1"), ("email", "ann@x.io")],
            ),
            record(
                &rules,
                "e2",
                2,
                &[("anonymous_id", "b1"), ("email", "bob@x.io")],
            ),
            record(
                &rules,
                "e3",
                3,
                &[("anonymous_id", "b1"), ("phone", "+14155550100")],
            ),
            record(&rules, "e4", 4, &[("email", "ann@x.io")]),
        ];
        // A person merged the two after e2; e3 and e4 came later.
        let (history, owners, events) = original(&rules, &records, &[(1, (0, 1))]);
        assert_eq!(partition(&owners).len(), 1, "merged: one profile");
        let (ann, bob) = (events[0], events[1]);

        let undone = replay(
            &rules,
            &history,
            &Constraints {
                forbidden: vec![(ann, bob)],
                ..Constraints::default()
            },
            at(100),
            fresh(),
        );
        assert_eq!(undone.refused.len(), 1);
        assert_eq!(undone.refused[0].1, SPLIT);
        let without_merge = original(&rules, &records, &[]).1;
        assert_eq!(
            undone.owners, without_merge,
            "as if the merge had never happened"
        );
        assert_eq!(
            undone.events["e3"], bob,
            "later events go to their own side"
        );
        assert_eq!(undone.events["e4"], ann);
        assert_eq!(undone.canonical[&ann], ann);
        assert_eq!(undone.canonical[&bob], bob);
    }

    #[test]
    fn an_event_merge_reverted_drops_the_bridging_identifier() {
        let rules = Rules::default();
        let records = [
            record(&rules, "e1", 1, &[("anonymous_id", "shared-laptop")]),
            record(&rules, "e2", 2, &[("email", "bob@x.io")]),
            // The bridge: the laptop's anonymous id seen with Bob's email.
            record(
                &rules,
                "e3",
                3,
                &[("anonymous_id", "shared-laptop"), ("email", "bob@x.io")],
            ),
            record(&rules, "e4", 4, &[("anonymous_id", "shared-laptop")]),
            record(
                &rules,
                "e5",
                5,
                &[("email", "bob@x.io"), ("phone", "+14155550100")],
            ),
        ];
        let (history, owners, events) = original(&rules, &records, &[]);
        assert_eq!(partition(&owners).len(), 1);
        let (laptop, bob) = (events[0], events[1]);

        let undone = replay(&rules, &history, &forbid(laptop, bob), at(100), fresh());
        assert_eq!(partition(&undone.owners).len(), 2);
        // The bridge keeps its highest-priority identifier (the email) and drops the other.
        assert_eq!(undone.events["e3"], bob);
        let bridge = &undone.plan.resolutions[2];
        assert_eq!(bridge.dropped.len(), 1);
        assert_eq!(
            bridge.dropped[0].identifier,
            Identifier::new("anonymous_id", "shared-laptop")
        );
        assert!(split_apart(&bridge.dropped[0].reason));
        assert_eq!(undone.events["e4"], laptop);
        assert_eq!(undone.events["e5"], bob);
        assert_eq!(
            undone.owners[&Identifier::new("phone", "+14155550100")],
            bob
        );
        let drops: Vec<(&str, &str)> = undone
            .plan
            .decisions
            .iter()
            .filter(|d| d.kind == DecisionKind::Drop)
            .map(|d| (d.event_id.as_str(), d.rule.as_str()))
            .collect();
        // Having been seen with Bob's profile too, the laptop's id then counts as shared (the
        // default rules allow one profile), so it links nothing more but keeps its events.
        assert_eq!(drops, [("e3", SPLIT), ("e4", "shared:anonymous_id")]);
    }

    #[test]
    fn deleting_a_bridging_identifier_splits_the_profile() {
        let rules = Rules::default();
        let records = [
            record(
                &rules,
                "e1",
                1,
                &[("anonymous_id", "a1"), ("email", "ann@x.io")],
            ),
            record(
                &rules,
                "e2",
                2,
                &[("anonymous_id", "a2"), ("phone", "+14155550100")],
            ),
            record(
                &rules,
                "e3",
                3,
                &[("email", "ann@x.io"), ("phone", "+14155550100")],
            ),
        ];
        let (history, owners, events) = original(&rules, &records, &[]);
        assert_eq!(partition(&owners).len(), 1);
        // The phone is erased (a GDPR request): e3 no longer bridges.
        let phone = Identifier::new("phone", "+14155550100");
        let undone = replay(
            &rules,
            &history,
            &Constraints {
                erased: HashSet::from([phone.clone()]),
                ..Constraints::default()
            },
            at(9),
            fresh(),
        );
        assert!(!undone.owners.contains_key(&phone));
        assert_eq!(partition(&undone.owners).len(), 2);
        assert_eq!(undone.events["e1"], events[0]);
        assert_eq!(undone.events["e2"], events[1]);
        assert_eq!(undone.events["e3"], events[0]);
        assert!(
            undone.erased_events.is_empty(),
            "every event kept another identifier"
        );
        assert!(
            undone
                .plan
                .resolutions
                .iter()
                .all(|r| !r.identifiers.contains(&phone)
                    && r.dropped.iter().all(|d| d.identifier != phone)),
            "the erased identifier is nowhere in the replayed graph"
        );
    }

    #[test]
    fn events_that_carried_only_an_erased_identifier_are_left_out() {
        let rules = Rules::default();
        let records = [
            record(&rules, "e1", 1, &[("email", "ann@x.io")]),
            record(
                &rules,
                "e2",
                2,
                &[("email", "ann@x.io"), ("anonymous_id", "a1")],
            ),
            record(&rules, "e3", 3, &[("anonymous_id", "a1")]),
        ];
        let (history, _, events) = original(&rules, &records, &[]);
        let email = Identifier::new("email", "ann@x.io");
        let undone = replay(
            &rules,
            &history,
            &Constraints {
                erased: HashSet::from([email.clone()]),
                ..Constraints::default()
            },
            at(9),
            fresh(),
        );
        assert_eq!(undone.erased_events, ["e1"]);
        assert!(!undone.events.contains_key("e1"));
        // The profile e1 created is gone with it; the rest lives on a profile of its own.
        assert!(!undone.canonical.contains_key(&events[0]));
        assert_eq!(undone.events["e2"], undone.events["e3"]);
        assert_eq!(undone.owners.len(), 1);
        assert!(!undone.owners.contains_key(&email));
    }

    #[test]
    fn a_detached_identifier_keeps_only_the_events_that_carry_nothing_else() {
        let rules = linking_only();
        // A kiosk's device id was seen with two people's user ids and bridged them.
        let records = [
            record(&rules, "e1", 1, &[("device_id", "kiosk")]),
            record(
                &rules,
                "e2",
                2,
                &[("device_id", "kiosk"), ("user_id", "ann")],
            ),
            record(
                &rules,
                "e3",
                3,
                &[("device_id", "kiosk"), ("email", "bob@x.io")],
            ),
            record(&rules, "e4", 4, &[("device_id", "kiosk")]),
            record(&rules, "e5", 5, &[("user_id", "ann")]),
        ];
        let (history, owners, events) = original(&rules, &records, &[]);
        assert_eq!(partition(&owners).len(), 1, "one blob through the kiosk");
        let kiosk = Identifier::new("device_id", "kiosk");
        let split = replay(
            &rules,
            &history,
            &Constraints {
                detached: HashSet::from([kiosk.clone()]),
                ..Constraints::default()
            },
            at(9),
            fresh(),
        );
        assert_eq!(
            partition(&split.owners).len(),
            3,
            "kiosk, Ann and Bob apart"
        );
        // The kiosk keeps the profile it created and the events it carried alone.
        assert_eq!(split.owners[&kiosk], events[0]);
        assert_eq!(split.events["e1"], events[0]);
        assert_eq!(split.events["e4"], events[0]);
        let ann = split.owners[&Identifier::new("user_id", "ann")];
        let bob = split.owners[&Identifier::new("email", "bob@x.io")];
        assert_eq!(split.events["e2"], ann);
        assert_eq!(split.events["e5"], ann);
        assert_eq!(split.events["e3"], bob);
        assert!(ann != bob && ann != events[0] && bob != events[0]);
        let dropped: Vec<(&str, &str)> = split
            .plan
            .resolutions
            .iter()
            .flat_map(|r| {
                r.dropped
                    .iter()
                    .map(|d| (r.event_id.as_str(), d.reason.as_str()))
            })
            .collect();
        assert_eq!(dropped, [("e2", DETACHED), ("e3", DETACHED)]);
        assert_eq!(split.events.len(), records.len(), "no event lost");
    }

    fn forbid(a: Uuid, b: Uuid) -> Constraints {
        Constraints {
            forbidden: vec![(a, b)],
            ..Constraints::default()
        }
    }

    fn linking_only() -> Rules {
        Rules::compile(RulesConfig::linking_only()).expect("rules")
    }

    fn arb_records() -> impl Strategy<Value = Vec<Vec<(usize, u8)>>> {
        prop::collection::vec(prop::collection::vec((0..4usize, 0..10u8), 0..4), 1..30)
    }

    fn records_of(rules: &Rules, raw: &[Vec<(usize, u8)>]) -> Vec<Record> {
        const TYPES: [&str; 4] = ["user_id", "email", "anonymous_id", "device_id"];
        raw.iter()
            .enumerate()
            .map(|(n, ids)| {
                let ids: Vec<(String, String)> = ids
                    .iter()
                    .map(|(t, v)| {
                        let value = if TYPES[*t] == "email" {
                            format!("p{v}@x.io")
                        } else {
                            format!("v{v}")
                        };
                        (TYPES[*t].to_owned(), value)
                    })
                    .collect();
                let ids: Vec<(&str, &str)> =
                    ids.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                record(rules, &format!("e{n}"), i64::try_from(n).unwrap(), &ids)
            })
            .collect()
    }

    fn events_of(records: &[Record]) -> Vec<HistoryEntry> {
        records
            .iter()
            .map(|r| HistoryEntry::Event {
                record: r.clone(),
                created: None,
            })
            .collect()
    }

    /// The records of `graph` connected to `seed` through identifiers they carried, whatever
    /// the rules decided: the most a record's arrival can change.
    fn closure(graph: &[Record], seed: &Record) -> Vec<usize> {
        let mut ids: HashSet<&Identifier> = seed.identifiers().iter().collect();
        let mut members = BTreeSet::new();
        loop {
            let before = members.len();
            for (n, r) in graph.iter().enumerate() {
                if !members.contains(&n) && r.identifiers().iter().any(|i| ids.contains(i)) {
                    members.insert(n);
                    ids.extend(r.identifiers());
                }
            }
            if members.len() == before {
                return members.into_iter().collect();
            }
        }
    }

    /// Resolves `arrival` in runs (sizes from `cuts`) the way the stores do, and returns the
    /// records in the order the graph reflects them: each run is resolved after what came
    /// before; a record that took an order-sensitive drop while older than a record of its
    /// closure already resolved has its closure re-resolved in event-time order.
    fn arrive(rules: &Rules, arrival: &[Record], cuts: &[usize]) -> Vec<Record> {
        let mut graph: Vec<Record> = Vec::new();
        let mut start = 0;
        for cut in cuts.iter().cycle() {
            if start >= arrival.len() {
                break;
            }
            let end = (start + cut).min(arrival.len());
            graph.extend_from_slice(&arrival[start..end]);
            let resolved = replay(
                rules,
                &events_of(&graph),
                &Constraints::default(),
                at(0),
                fresh(),
            );
            let run = &resolved.plan.resolutions[resolved.plan.resolutions.len() - (end - start)..];
            for r in run {
                if !r.dropped.iter().any(|d| order_sensitive_drop(&d.reason)) {
                    continue;
                }
                let Some(record) = graph.iter().find(|g| g.event_id() == r.event_id).cloned()
                else {
                    continue;
                };
                let members = closure(&graph, &record);
                if members
                    .iter()
                    .any(|n| graph[*n].timestamp() > record.timestamp())
                {
                    let entries: Vec<HistoryEntry> = events_of(
                        &members
                            .iter()
                            .map(|n| graph[*n].clone())
                            .collect::<Vec<_>>(),
                    );
                    for (slot, entry) in members.iter().zip(in_event_time_order(&entries)) {
                        if let HistoryEntry::Event { record, .. } = entry {
                            graph[*slot] = record;
                        }
                    }
                }
            }
            start = end;
        }
        graph
    }

    /// Events grouped by the profile they end in.
    fn event_groups(replayed: &Replay) -> BTreeSet<BTreeSet<String>> {
        let mut groups: HashMap<Uuid, BTreeSet<String>> = HashMap::new();
        for (event, profile) in &replayed.events {
            groups.entry(*profile).or_default().insert(event.clone());
        }
        groups.into_values().collect()
    }

    #[test]
    fn the_earlier_claim_on_a_shared_device_wins_whatever_arrives_first() {
        let rules = Rules::default();
        let ten = 10 * 3_600;
        let a = record(&rules, "a", ten, &[("user_id", "ann"), ("device_id", "tv")]);
        let b = record(
            &rules,
            "b",
            ten - 3_600,
            &[("user_id", "bob"), ("device_id", "tv")],
        );
        let in_order = arrive(&rules, &[b.clone(), a.clone()], &[1]);
        let late = arrive(&rules, &[a, b], &[1]);
        let owners = |graph: &[Record]| {
            replay(
                &rules,
                &events_of(graph),
                &Constraints::default(),
                at(0),
                fresh(),
            )
            .owners
        };
        let (in_order, late) = (owners(&in_order), owners(&late));
        assert_eq!(partition(&late), partition(&in_order));
        let tv = &late[&Identifier::new("device_id", "tv")];
        assert_eq!(
            tv,
            &late[&Identifier::new("user_id", "bob")],
            "Bob's 09:00 claim"
        );
        assert_ne!(tv, &late[&Identifier::new("user_id", "ann")]);
    }

    #[test]
    fn a_merge_outside_the_pipeline_stays_after_the_events_it_was_decided_on() {
        let rules = Rules::default();
        let manual = HistoryEntry::Merge {
            pair: (Uuid::from_u128(1), Uuid::from_u128(2)),
            cause: "manual:x".into(),
            rule: "manual".into(),
            // Decided "before" the events by a skewed clock: it still follows them.
            at: at(1),
        };
        let entries = vec![
            HistoryEntry::Event {
                record: record(&rules, "late", 50, &[("email", "a@x.io")]),
                created: None,
            },
            HistoryEntry::Event {
                record: record(&rules, "early", 20, &[("email", "b@x.io")]),
                created: None,
            },
            manual,
            HistoryEntry::Event {
                record: record(&rules, "next", 30, &[("email", "c@x.io")]),
                created: None,
            },
        ];
        let names: Vec<String> = in_event_time_order(&entries)
            .iter()
            .map(|e| match e {
                HistoryEntry::Event { record, .. } => record.event_id().to_owned(),
                HistoryEntry::Merge { cause, .. } => cause.clone(),
            })
            .collect();
        assert_eq!(names, ["early", "next", "late", "manual:x"]);
    }

    /// Records over a few users, devices, anonymous ids and emails, and an arrival order.
    fn arb_timed() -> impl Strategy<Value = (Vec<Vec<(usize, u8)>>, Vec<usize>)> {
        prop::collection::vec(prop::collection::vec((0..4usize, 0..4u8), 1..4), 1..24)
            .prop_flat_map(|raw| {
                let order: Vec<usize> = (0..raw.len()).collect();
                (Just(raw), Just(order).prop_shuffle())
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// With the default rules (user ids protected, limits, shared identifiers), whatever
        /// the arrival order and the runs, the graph ends as resolving every record in
        /// event-time order leaves it: the same partition of identifiers and of events.
        #[test]
        fn outcomes_follow_event_time_not_arrival(
            (raw, order) in arb_timed(),
            cuts in prop::collection::vec(1..6usize, 1..6),
        ) {
            let rules = Rules::default();
            // Each record's time is its index: distinct, so event-time order is one order.
            let records = records_of(&rules, &raw);
            let arrival: Vec<Record> = order.iter().map(|n| records[*n].clone()).collect();
            let graph = arrive(&rules, &arrival, &cuts);
            let got = replay(&rules, &events_of(&graph), &Constraints::default(), at(0), fresh());
            let want = replay(&rules, &events_of(&records), &Constraints::default(), at(0), fresh());
            prop_assert_eq!(partition(&got.owners), partition(&want.owners));
            prop_assert_eq!(event_groups(&got), event_groups(&want));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Replaying a history with nothing forbidden gives back the graph exactly: the same
        /// owners, the same profile of every event (with the default rules, limits and
        /// protection included).
        #[test]
        fn a_replay_reproduces_the_graph(raw in arb_records(), default_rules in any::<bool>()) {
            let rules = if default_rules { Rules::default() } else { linking_only() };
            let records = records_of(&rules, &raw);
            let (history, owners, _) = original(&rules, &records, &[]);
            let again = replay(&rules, &history, &Constraints::default(), at(1_000), fresh());
            prop_assert_eq!(&again.owners, &owners);
            prop_assert!(again.refused.is_empty());
            prop_assert!(again.plan.new_profiles.iter().all(|p| p.id.as_u128() < 1_000_000),
                "no profile the original did not have");
        }

        /// Forbidding two profiles keeps them apart whatever comes after, loses no identifier
        /// and no event, and changes nothing in the components that never touched them.
        #[test]
        fn a_split_holds_and_loses_nothing(raw in arb_records(), x in 0..30usize, y in 0..30usize) {
            let rules = linking_only();
            let records = records_of(&rules, &raw);
            let (history, owners, events) = original(&rules, &records, &[]);
            let (a, b) = (events[x % events.len()], events[y % events.len()]);
            prop_assume!(a != b);
            let split = replay(&rules, &history, &forbid(a, b), at(1_000), fresh());
            prop_assert_ne!(split.canonical[&a], split.canonical[&b]);
            prop_assert_eq!(split.events.len(), records.len(), "every event has a profile");
            let linked: BTreeSet<&Identifier> = owners.keys().collect();
            let relinked: BTreeSet<&Identifier> = split.owners.keys().collect();
            prop_assert!(relinked.is_subset(&linked));
            // An identifier is unlinked only when every event carrying it bridged the split.
            for identifier in linked.difference(&relinked) {
                let carriers: Vec<&Record> = records
                    .iter()
                    .filter(|r| r.identifiers().contains(identifier))
                    .collect();
                prop_assert!(carriers.iter().all(|r| split
                    .plan
                    .resolutions
                    .iter()
                    .any(|res| res.event_id == r.event_id()
                        && res.dropped.iter().any(|d| &d.identifier == *identifier && split_apart(&d.reason)))));
            }
        }
    }
}
