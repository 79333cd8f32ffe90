//! Resolving a run of records against a view of the graph: which profiles to create, which
//! identifiers to attach, which profiles to merge. The stores read the view, call [`plan`] and
//! write its result in one transaction.

use std::collections::HashMap;

use tessera_core::Identifier;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Merge, Record, Resolution};

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
/// profile of each identifier it knows. Identifiers it does not know are absent.
#[derive(Debug, Clone, Default)]
pub struct GraphView {
    owners: HashMap<Identifier, ProfileAge>,
}

impl GraphView {
    /// An empty view: the graph knows none of the identifiers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `identifier` belongs to the canonical profile `profile`.
    pub fn insert(&mut self, identifier: Identifier, profile: ProfileAge) {
        self.owners.insert(identifier, profile);
    }
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
}

/// Resolves `records` in order against `view`, as of `now`. Identifiers seen together belong to
/// one profile: a record matching no profile gets a new one (id from `new_id`), a record matching
/// one joins it, and a record matching several merges them all into the oldest. A record without
/// identifiers gets a profile of its own. `now` should be truncated to microseconds.
pub fn plan<'a>(
    records: impl IntoIterator<Item = &'a Record>,
    view: GraphView,
    now: OffsetDateTime,
    mut new_id: impl FnMut() -> Uuid,
) -> Plan {
    let mut owners: HashMap<Identifier, Uuid> = HashMap::with_capacity(view.owners.len());
    let mut ages: HashMap<Uuid, OffsetDateTime> = HashMap::new();
    for (identifier, profile) in view.owners {
        ages.insert(profile.id, profile.created_at);
        owners.insert(identifier, profile.id);
    }
    // Merges decided earlier in this run: merged profile -> survivor.
    let mut merged_into: HashMap<Uuid, Uuid> = HashMap::new();
    let find = |merged_into: &HashMap<Uuid, Uuid>, mut id: Uuid| {
        while let Some(next) = merged_into.get(&id) {
            id = *next;
        }
        id
    };

    let mut out = Plan::default();
    for record in records {
        let mut candidates: Vec<ProfileAge> = record
            .identifiers()
            .iter()
            .filter_map(|i| owners.get(i))
            .map(|p| {
                let id = find(&merged_into, *p);
                ProfileAge {
                    created_at: ages.get(&id).copied().unwrap_or(now),
                    id,
                }
            })
            .collect();
        candidates.sort_unstable();
        candidates.dedup();

        let mut merges = Vec::new();
        let survivor = match candidates.split_first() {
            None => {
                let profile = ProfileAge {
                    created_at: now,
                    id: new_id(),
                };
                ages.insert(profile.id, profile.created_at);
                out.new_profiles.push(profile);
                profile.id
            }
            Some((oldest, rest)) => {
                for merged in rest {
                    merged_into.insert(merged.id, oldest.id);
                    merges.push(Merge {
                        surviving_profile_id: oldest.id,
                        merged_profile_id: merged.id,
                        cause_event_id: record.event_id().to_owned(),
                        merged_at: now,
                    });
                }
                oldest.id
            }
        };
        for identifier in record.identifiers() {
            if !owners.contains_key(identifier) {
                owners.insert(identifier.clone(), survivor);
                out.new_identifiers.push(NewIdentifier {
                    identifier: identifier.clone(),
                    profile_id: survivor,
                    event_id: record.event_id().to_owned(),
                });
            }
        }
        out.merges.extend(merges.iter().cloned());
        out.resolutions.push(Resolution {
            event_id: record.event_id().to_owned(),
            profile_id: survivor,
            identifiers: record.identifiers().to_vec(),
            merges,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use proptest::prelude::*;
    use time::Duration;

    use super::*;
    use crate::domain::UnionFind;

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

    fn record(event: &str, identifiers: &[(&str, &str)]) -> Record {
        Record::new(
            event,
            identifiers
                .iter()
                .map(|(k, v)| Identifier::new(*k, *v))
                .collect(),
        )
        .expect("valid")
    }

    #[test]
    fn unknown_identifiers_get_a_new_profile() {
        let plan = plan(
            &[record("e1", &[("user_id", "u1")])],
            GraphView::new(),
            at(1),
            ids(),
        );
        assert_eq!(plan.new_profiles.len(), 1);
        assert_eq!(plan.resolutions[0].profile_id, plan.new_profiles[0].id);
        assert_eq!(plan.new_identifiers.len(), 1);
        assert!(plan.merges.is_empty());
    }

    #[test]
    fn several_profiles_merge_into_the_oldest_then_smallest_id() {
        let (a, b, c) = (
            Uuid::from_u128(30),
            Uuid::from_u128(20),
            Uuid::from_u128(10),
        );
        let mut view = GraphView::new();
        view.insert(
            Identifier::new("user_id", "a"),
            ProfileAge {
                created_at: at(5),
                id: a,
            },
        );
        view.insert(
            Identifier::new("email", "b@x.io"),
            ProfileAge {
                created_at: at(5),
                id: b,
            },
        );
        view.insert(
            Identifier::new("anonymous_id", "c"),
            ProfileAge {
                created_at: at(9),
                id: c,
            },
        );
        let records = [record(
            "e9",
            &[
                ("anonymous_id", "c"),
                ("user_id", "a"),
                ("email", "b@x.io"),
                ("phone", "1"),
            ],
        )];
        let plan = plan(&records, view, at(10), ids());
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
                .all(|m| m.surviving_profile_id == b)
        );
        assert_eq!(plan.new_identifiers.len(), 1);
        assert_eq!(plan.new_identifiers[0].profile_id, b);
    }

    #[test]
    fn records_without_identifiers_get_their_own_profile() {
        let records = [record("e1", &[("user_id", "null")]), record("e2", &[])];
        let plan = plan(&records, GraphView::new(), at(1), ids());
        assert_eq!(plan.new_profiles.len(), 2);
        assert_ne!(
            plan.resolutions[0].profile_id,
            plan.resolutions[1].profile_id
        );
    }

    /// An in-memory graph that applies plans the way the stores do: identifiers are never
    /// rewritten, merged profiles point at their survivor.
    #[derive(Default)]
    struct MemoryGraph {
        identifiers: HashMap<Identifier, Uuid>,
        profiles: HashMap<Uuid, (OffsetDateTime, Option<Uuid>)>,
        events: HashMap<String, Uuid>,
    }

    impl MemoryGraph {
        fn canonical(&self, mut id: Uuid) -> Uuid {
            while let Some((_, Some(next))) = self.profiles.get(&id) {
                id = *next;
            }
            id
        }

        fn resolve(
            &mut self,
            records: &[Record],
            now: OffsetDateTime,
            new_id: &mut impl FnMut() -> Uuid,
        ) {
            let mut view = GraphView::new();
            for record in records {
                for identifier in record.identifiers() {
                    if let Some(p) = self.identifiers.get(identifier) {
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
            let plan = plan(records, view, now, &mut *new_id);
            for p in plan.new_profiles {
                assert!(self.profiles.insert(p.id, (p.created_at, None)).is_none());
            }
            for n in plan.new_identifiers {
                assert!(
                    self.identifiers
                        .insert(n.identifier, n.profile_id)
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
            for r in plan.resolutions {
                self.events.insert(r.event_id, r.profile_id);
            }
        }
    }

    fn arb_records() -> impl Strategy<Value = Vec<Vec<(usize, u8)>>> {
        prop::collection::vec(prop::collection::vec((0..3usize, 0..12u8), 0..4), 1..40)
    }

    proptest! {
        /// Whatever the chunking and the clock, the graph partitions identifiers exactly as a
        /// union-find over the records does, and every event resolves to its identifiers' profile.
        #[test]
        fn graph_matches_union_find(raw in arb_records(), cuts in prop::collection::vec(1..8usize, 1..10)) {
            const TYPES: [&str; 3] = ["user_id", "anonymous_id", "email"];
            let records: Vec<Record> = raw.iter().enumerate().map(|(n, ids)| {
                Record::new(format!("e{n}"), ids.iter().map(|(t, v)| Identifier::new(TYPES[*t], format!("v{v}"))).collect()).expect("valid")
            }).collect();

            let mut graph = MemoryGraph::default();
            let mut new_id = ids();
            let (mut start, mut clock) = (0, 0);
            for cut in cuts.iter().cycle() {
                if start >= records.len() { break; }
                let end = (start + cut).min(records.len());
                clock += i64::from(*cut % 2 == 0); // sometimes the same instant: ties by id
                graph.resolve(&records[start..end], at(clock), &mut new_id);
                start = end;
            }

            let mut reference = UnionFind::new();
            for r in &records {
                reference.union_all(r.identifiers().iter().cloned());
            }
            let mut groups: HashMap<Uuid, BTreeSet<Identifier>> = HashMap::new();
            for (identifier, profile) in &graph.identifiers {
                groups.entry(graph.canonical(*profile)).or_default().insert(identifier.clone());
            }
            let partition: BTreeSet<BTreeSet<Identifier>> = groups.into_values().collect();
            prop_assert_eq!(partition, reference.partition());

            for r in &records {
                let profile = graph.canonical(graph.events[r.event_id()]);
                let owners: HashSet<Uuid> = r.identifiers().iter().map(|i| graph.canonical(graph.identifiers[i])).collect();
                prop_assert!(owners.iter().all(|o| *o == profile));
            }
        }
    }
}
