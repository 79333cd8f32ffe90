//! The identity rules, free of gRPC and SQL: normalization and blocked values, the choice of the
//! surviving profile, the resolution of a run of records against a view of the graph, and a
//! reference union-find that tests compare the real graph with.

pub mod matching;
mod normalize;
mod plan;
mod replay;
pub mod rules;
mod union_find;

use tessera_core::Identifier;
use time::OffsetDateTime;
use uuid::Uuid;

pub use normalize::{MAX_IDENTIFIERS_PER_RECORD, Normalized, Record, Unlinked, normalize};
pub use plan::{
    DETACHED, Decision, DecisionKind, GraphView, NewIdentifier, Plan, ProfileAge, SEEN_TOGETHER,
    SPLIT, Sighting, plan, plan_merge, plan_merges, screen,
};
pub use replay::{
    Constraints, HistoryEntry, Replay, in_event_time_order, order_sensitive_drop, replay,
    split_apart,
};
pub use rules::{ReorderConfig, Rules, RulesConfig, suppresses_events};
pub use union_find::UnionFind;

/// One profile folded into another, caused by one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    /// The profile that survives.
    pub surviving_profile_id: Uuid,
    /// The profile folded into the survivor.
    pub merged_profile_id: Uuid,
    /// The event whose identifiers linked the two.
    pub cause_event_id: String,
    /// When the merge was decided.
    pub merged_at: OffsetDateTime,
    /// The rule that decided it (`seen_together`).
    pub rule: String,
}

/// An identifier of an event that was not linked, and why: `blocked`, `unknown_type`,
/// `invalid_value`, `limit:<type>` (linking it would have broken that type's limit) or
/// `shared:<type>` (seen with too many profiles).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The identifier, normalized where it could be.
    pub identifier: Identifier,
    /// Why it was not linked.
    pub reason: String,
}

/// Which profile an event belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The event's id.
    pub event_id: String,
    /// The event's profile: after a batch is resolved, its current survivor.
    pub profile_id: Uuid,
    /// The identifiers the event linked (or that were already linked to its profile), after
    /// normalization, highest priority first.
    pub identifiers: Vec<Identifier>,
    /// The merges the event caused, oldest merged profile first.
    pub merges: Vec<Merge>,
    /// The event's identifiers that were not linked, and why.
    pub dropped: Vec<Dropped>,
    /// When the event happened (kept with the resolution, so the graph can be replayed).
    pub event_time: OffsetDateTime,
    /// The event is suppressed: it carries an identifier of a forgotten person that suppresses
    /// whole events, or only erased identifiers. It belongs to no profile (`profile_id` is the
    /// nil UUID; `identifiers`, `merges` and `dropped` are empty) and nothing about it is kept.
    pub suppressed: bool,
}

impl Resolution {
    /// The resolution of a suppressed event that happened at `event_time`.
    pub fn suppressed_event(event_id: impl Into<String>, event_time: OffsetDateTime) -> Self {
        Self {
            event_id: event_id.into(),
            profile_id: Uuid::nil(),
            identifiers: Vec::new(),
            merges: Vec::new(),
            dropped: Vec::new(),
            event_time,
            suppressed: true,
        }
    }

    /// The event's profile; `None` when the event is suppressed.
    pub fn profile(&self) -> Option<Uuid> {
        (!self.suppressed).then_some(self.profile_id)
    }
}

/// `t` without its sub-microsecond part: both backends keep microseconds, and a time compared
/// in memory must equal the same time read back.
pub fn truncate_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    let nanos = t.nanosecond();
    t.replace_nanosecond(nanos - nanos % 1_000).unwrap_or(t)
}
