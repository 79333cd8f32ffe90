//! Conversions between the protobuf messages and the domain. Messages are destructured field by
//! field, so a field added to the contract does not compile until someone decides what it means.

use tessera_core::{FieldViolation, Identifier};
use tessera_proto::common::v1 as common;
use tessera_proto::convert::to_timestamp;
use tessera_proto::identity::v1 as pb;

use time::OffsetDateTime;

use crate::IdentityError;
use crate::domain::{Dropped, Merge, Record, Resolution, Rules, RulesConfig};

/// An identifier from its protobuf form, as sent (not yet normalized).
pub(crate) fn identifier_from_pb(identifier: common::Identifier) -> Identifier {
    let common::Identifier { r#type, value } = identifier;
    Identifier {
        kind: r#type,
        value,
    }
}

fn identifier_to_pb(identifier: Identifier) -> common::Identifier {
    let Identifier { kind, value } = identifier;
    common::Identifier {
        r#type: kind,
        value,
    }
}

/// A record from its protobuf form, normalized under `rules`; without a timestamp the event
/// happened `now`.
fn record_from_pb(
    rules: &Rules,
    record: pb::IdentityRecord,
    now: OffsetDateTime,
) -> Result<Record, Vec<FieldViolation>> {
    let pb::IdentityRecord {
        event_id,
        identifiers,
        timestamp,
        // Traced by the service handler before conversion; resolution does not read them.
        trace_parent: _,
        trace_state: _,
    } = record;
    let timestamp = match timestamp
        .as_ref()
        .map(tessera_proto::convert::storable_time)
    {
        None => now,
        Some(Some(t)) => t,
        Some(None) => {
            return Err(vec![FieldViolation::new(
                "timestamp",
                "not a valid time (years 1 to 9999)",
            )]);
        }
    };
    Record::new(
        rules,
        event_id,
        identifiers.into_iter().map(identifier_from_pb).collect(),
        timestamp,
    )
}

/// The most field violations one error reports: the details travel in a response header.
const MAX_VIOLATIONS: usize = 100;

/// The records of a request, normalized; violations name `records[i]....`, the first
/// [`MAX_VIOLATIONS`] of them.
pub(crate) fn records_from_pb(
    rules: &Rules,
    records: Vec<pb::IdentityRecord>,
) -> Result<Vec<Record>, IdentityError> {
    let now = OffsetDateTime::now_utc();
    let mut out = Vec::with_capacity(records.len());
    let mut violations = Vec::new();
    for (i, record) in records.into_iter().enumerate() {
        match record_from_pb(rules, record, now) {
            Ok(record) => out.push(record),
            Err(errs) => {
                let prefix = format!("records[{i}]");
                let room = MAX_VIOLATIONS.saturating_sub(violations.len());
                violations.extend(errs.into_iter().take(room).map(|v| v.prefixed(&prefix)));
            }
        }
    }
    if violations.is_empty() {
        Ok(out)
    } else {
        Err(IdentityError::InvalidArgument(violations))
    }
}

/// The identifier a lookup names, as sent.
pub(crate) fn lookup_from_pb(
    request: pb::LookupIdentifierRequest,
) -> Result<Identifier, IdentityError> {
    let pb::LookupIdentifierRequest { identifier } = request;
    identifier.map(identifier_from_pb).ok_or_else(|| {
        IdentityError::InvalidArgument(vec![FieldViolation::new("identifier", "required")])
    })
}

/// What a graph request names.
pub(crate) enum GraphLookup {
    Profile(uuid::Uuid),
    Identifier(Identifier),
}

/// A graph request: what it names and how many decisions it wants. Violations name
/// `profile_id`, `identifier` or `max_decisions`.
pub(crate) fn graph_request_from_pb(
    request: pb::GetProfileGraphRequest,
) -> Result<(GraphLookup, i64), IdentityError> {
    use pb::get_profile_graph_request::Lookup;
    let pb::GetProfileGraphRequest {
        lookup,
        max_decisions,
    } = request;
    let mut violations = Vec::new();
    let max = match max_decisions {
        0 => crate::DEFAULT_GRAPH_DECISIONS,
        n if n < 0 || i64::from(n) > crate::MAX_GRAPH_DECISIONS => {
            violations.push(FieldViolation::new(
                "max_decisions",
                format!("must be 0 (the default) to {}", crate::MAX_GRAPH_DECISIONS),
            ));
            0
        }
        n => i64::from(n),
    };
    let lookup = match lookup {
        Some(Lookup::ProfileId(id)) => match uuid::Uuid::parse_str(&id) {
            Ok(id) => Some(GraphLookup::Profile(id)),
            Err(_) => {
                violations.push(FieldViolation::new("profile_id", "not a UUID"));
                None
            }
        },
        Some(Lookup::Identifier(identifier)) => {
            Some(GraphLookup::Identifier(identifier_from_pb(identifier)))
        }
        None => {
            violations.push(FieldViolation::new(
                "lookup",
                "required: profile_id or identifier",
            ));
            None
        }
    };
    match lookup {
        Some(lookup) if violations.is_empty() => Ok((lookup, max)),
        _ => Err(IdentityError::InvalidArgument(violations)),
    }
}

impl From<crate::ProfileGraph> for pb::GetProfileGraphResponse {
    fn from(graph: crate::ProfileGraph) -> Self {
        let crate::ProfileGraph {
            profile_id,
            merged_profile_ids,
            identifiers,
            decisions,
            truncated,
        } = graph;
        Self {
            profile_id: profile_id.to_string(),
            merged_profile_ids: merged_profile_ids.iter().map(ToString::to_string).collect(),
            identifiers: identifiers
                .into_iter()
                .map(|i| {
                    let crate::GraphIdentifier {
                        identifier,
                        linked_to,
                        event_id,
                        linked_at,
                    } = i;
                    pb::GraphIdentifier {
                        identifier: Some(identifier_to_pb(identifier)),
                        linked_to_profile_id: linked_to.to_string(),
                        event_id,
                        linked_at: Some(to_timestamp(linked_at)),
                    }
                })
                .collect(),
            decisions: decisions
                .into_iter()
                .map(|d| {
                    let crate::GraphDecision {
                        seq,
                        kind,
                        event_id,
                        profile_id,
                        other_profile_id,
                        identifier,
                        rule,
                        rules_version,
                        event_time,
                        decided_at,
                    } = d;
                    pb::GraphDecision {
                        seq,
                        kind,
                        event_id,
                        profile_id: profile_id.to_string(),
                        other_profile_id: other_profile_id
                            .map(|p| p.to_string())
                            .unwrap_or_default(),
                        identifier: identifier.map(identifier_to_pb),
                        rule,
                        rules_version,
                        event_time: Some(to_timestamp(event_time)),
                        decided_at: Some(to_timestamp(decided_at)),
                    }
                })
                .collect(),
            truncated,
        }
    }
}

/// The rules in the form of the config section.
pub(crate) fn rules_to_pb(rules: &Rules) -> prost_types::Struct {
    match serde_json::to_value(rules.config()) {
        Ok(serde_json::Value::Object(map)) => tessera_proto::convert::json_map_to_struct(&map),
        // A struct of strings, numbers and lists always serializes to an object.
        _ => prost_types::Struct::default(),
    }
}

/// The rules of an `UpdateRules` request and its expected version. Violations name
/// `rules` (absent, or a key that is unknown or of the wrong type) or `expected_version`.
pub(crate) fn update_rules_from_pb(
    request: pb::UpdateRulesRequest,
) -> Result<(RulesConfig, Option<i64>), IdentityError> {
    let pb::UpdateRulesRequest {
        rules,
        expected_version,
    } = request;
    let Some(rules) = rules else {
        return Err(IdentityError::InvalidArgument(vec![FieldViolation::new(
            "rules",
            "required: the whole rules, as GetRules returns them",
        )]));
    };
    if expected_version < 0 {
        return Err(IdentityError::InvalidArgument(vec![FieldViolation::new(
            "expected_version",
            "must be a version (> 0), or 0 for none",
        )]));
    }
    let json = serde_json::Value::Object(tessera_proto::convert::struct_to_json_map(&rules));
    // Protobuf numbers are doubles: whole ones become integers again, so limits such as
    // `{email = 5}` deserialize.
    let config: RulesConfig = serde_json::from_value(integral(json)).map_err(|e| {
        IdentityError::InvalidArgument(vec![FieldViolation::new("rules", e.to_string())])
    })?;
    Ok((config, (expected_version > 0).then_some(expected_version)))
}

/// `json` with every whole float (within ±2^53) turned into an integer.
fn integral(json: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match json {
        Value::Number(n) => match n.as_f64() {
            #[allow(clippy::cast_possible_truncation)]
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() <= EXACT => Value::from(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(integral).collect()),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, integral(v))).collect())
        }
        other @ (Value::Null | Value::Bool(_) | Value::String(_)) => other,
    }
}

/// The profiles of a match request: ids and trait values. Violations name
/// `profiles[i].profile_id`.
pub(crate) fn match_request_from_pb(
    request: pb::MatchProfilesRequest,
    max: usize,
) -> Result<crate::ProfileTraits, IdentityError> {
    let pb::MatchProfilesRequest { profiles } = request;
    if profiles.len() > max {
        return Err(IdentityError::BatchTooLarge {
            len: profiles.len(),
            max,
        });
    }
    let mut out = Vec::with_capacity(profiles.len());
    let mut violations = Vec::new();
    for (i, profile) in profiles.into_iter().enumerate() {
        let pb::ProfileTraits { profile_id, traits } = profile;
        match uuid::Uuid::parse_str(&profile_id) {
            Ok(id) => out.push((
                id,
                traits
                    .as_ref()
                    .map(tessera_proto::convert::struct_to_json_map)
                    .unwrap_or_default(),
            )),
            Err(_) => {
                if violations.len() < MAX_VIOLATIONS {
                    violations.push(FieldViolation::new(
                        format!("profiles[{i}].profile_id"),
                        "not a UUID",
                    ));
                }
            }
        }
    }
    if violations.is_empty() {
        Ok(out)
    } else {
        Err(IdentityError::InvalidArgument(violations))
    }
}

/// The most bytes of a manual merge's reason.
const MAX_REASON: usize = 1_024;

/// A manual merge request: the two profiles and the reason. Violations name `profile_id`,
/// `other_profile_id` or `reason`.
pub(crate) fn merge_request_from_pb(
    request: pb::MergeProfilesRequest,
) -> Result<((uuid::Uuid, uuid::Uuid), String), IdentityError> {
    let pb::MergeProfilesRequest {
        profile_id,
        other_profile_id,
        reason,
    } = request;
    let mut violations = Vec::new();
    let mut id = |value: &str, field: &str| match uuid::Uuid::parse_str(value) {
        Ok(id) => Some(id),
        Err(_) => {
            violations.push(FieldViolation::new(field, "not a UUID"));
            None
        }
    };
    let a = id(&profile_id, "profile_id");
    let b = id(&other_profile_id, "other_profile_id");
    if reason.len() > MAX_REASON || reason.contains('\0') {
        violations.push(FieldViolation::new(
            "reason",
            format!("at most {MAX_REASON} bytes, without NUL"),
        ));
    }
    match (a, b) {
        (Some(a), Some(b)) if violations.is_empty() => Ok(((a, b), reason)),
        _ => Err(IdentityError::InvalidArgument(violations)),
    }
}

/// The profile and reason of an unmerge. Violations name `profile_id` or `reason`.
/// An identifier and a reason (detach, erase). Violations name `identifier` and `reason`.
pub(crate) fn identifier_change_from_pb(
    identifier: Option<tessera_proto::common::v1::Identifier>,
    reason: String,
) -> Result<(Identifier, String), IdentityError> {
    let mut violations = Vec::new();
    if identifier.is_none() {
        violations.push(FieldViolation::new("identifier", "required"));
    }
    if reason.len() > MAX_REASON || reason.contains('\0') {
        violations.push(FieldViolation::new(
            "reason",
            format!("at most {MAX_REASON} bytes, without NUL"),
        ));
    }
    match identifier {
        Some(identifier) if violations.is_empty() => Ok((identifier_from_pb(identifier), reason)),
        _ => Err(IdentityError::InvalidArgument(violations)),
    }
}

pub(crate) fn unmerge_request_from_pb(
    request: pb::UnmergeProfilesRequest,
) -> Result<(uuid::Uuid, String), IdentityError> {
    let pb::UnmergeProfilesRequest { profile_id, reason } = request;
    let mut violations = Vec::new();
    let id = uuid::Uuid::parse_str(&profile_id).ok();
    if id.is_none() {
        violations.push(FieldViolation::new("profile_id", "not a UUID"));
    }
    if reason.len() > MAX_REASON || reason.contains('\0') {
        violations.push(FieldViolation::new(
            "reason",
            format!("at most {MAX_REASON} bytes, without NUL"),
        ));
    }
    match id {
        Some(id) if violations.is_empty() => Ok((id, reason)),
        _ => Err(IdentityError::InvalidArgument(violations)),
    }
}

/// The most bytes of a `ForgetProfile` reason: what the profile service's `DeleteProfile`
/// accepts and passes on.
const MAX_FORGET_REASON: usize = 1_000;

/// The profile and reason of a `ForgetProfile`. Violations name `profile_id` or `reason`.
pub(crate) fn forget_request_from_pb(
    request: pb::ForgetProfileRequest,
) -> Result<(uuid::Uuid, String), IdentityError> {
    let pb::ForgetProfileRequest { profile_id, reason } = request;
    let mut violations = Vec::new();
    let id = uuid::Uuid::parse_str(&profile_id).ok();
    if id.is_none() {
        violations.push(FieldViolation::new("profile_id", "not a UUID"));
    }
    if reason.len() > MAX_FORGET_REASON || reason.contains('\0') {
        violations.push(FieldViolation::new(
            "reason",
            format!("at most {MAX_FORGET_REASON} bytes, without NUL"),
        ));
    }
    match id {
        Some(id) if violations.is_empty() => Ok((id, reason)),
        _ => Err(IdentityError::InvalidArgument(violations)),
    }
}

impl From<crate::Forgotten> for pb::ForgetProfileResponse {
    fn from(done: crate::Forgotten) -> Self {
        let crate::Forgotten {
            root,
            profiles,
            events,
            identifiers,
        } = done;
        Self {
            profile_id: root.to_string(),
            profile_ids: profiles.iter().map(ToString::to_string).collect(),
            event_ids: events,
            identifiers: i64::try_from(identifiers).unwrap_or(i64::MAX),
        }
    }
}

/// A fitted model's summary as answered.
pub(crate) fn training_to_pb(summary: crate::TrainingSummary) -> pb::TrainMatchModelResponse {
    let crate::TrainingSummary {
        model_version,
        profiles,
        candidate_pairs,
        u_pairs,
        iterations,
        converged,
        mean_log_likelihood,
        lambda,
        fields,
        restored_from: _,
    } = summary;
    pb::TrainMatchModelResponse {
        model_version,
        profiles,
        candidate_pairs,
        u_pairs,
        iterations: i32::try_from(iterations).unwrap_or(i32::MAX),
        converged,
        mean_log_likelihood,
        lambda,
        fields: fields
            .into_iter()
            .map(|(field, levels)| pb::FieldParameters {
                field,
                levels: levels
                    .into_iter()
                    .map(|(level, m, u)| pb::LevelParameters { level, m, u })
                    .collect(),
            })
            .collect(),
    }
}

/// A stored model as answered, with the thresholds in force.
pub(crate) fn model_to_pb(
    info: crate::ModelInfo,
    current: bool,
    (auto_merge_probability, review_probability): (f64, f64),
) -> pb::MatchModel {
    let restored_from = info.summary.restored_from.unwrap_or(0);
    pb::MatchModel {
        training: Some(training_to_pb(info.summary)),
        trained_at: Some(to_timestamp(info.trained_at)),
        restored_from,
        current,
        auto_merge_probability,
        review_probability,
    }
}

/// The model version a request names: `None` for the current one (0), `Some` otherwise;
/// negative versions are `InvalidArgument` naming `model_version`.
pub(crate) fn model_version_from_pb(
    version: i64,
    zero_ok: bool,
) -> Result<Option<i64>, IdentityError> {
    match version {
        v if v > 0 => Ok(Some(v)),
        0 if zero_ok => Ok(None),
        _ => Err(IdentityError::InvalidArgument(vec![FieldViolation::new(
            "model_version",
            if zero_ok {
                "must be a model version (> 0), or 0 for the current model"
            } else {
                "must be a model version (> 0)"
            },
        )])),
    }
}

/// The default and largest suggestion page.
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1_000;

/// A suggestions listing: status filter (`None`: all), the id to page below, the page size.
pub(crate) fn suggestions_request_from_pb(
    request: pb::ListMatchSuggestionsRequest,
) -> Result<(Option<String>, Option<i64>, i64), IdentityError> {
    let pb::ListMatchSuggestionsRequest {
        status,
        page_size,
        page_token,
    } = request;
    let mut violations = Vec::new();
    let status = match status.as_str() {
        "" | "open" => Some("open".to_owned()),
        "accepted" | "rejected" => Some(status),
        "all" => None,
        _ => {
            violations.push(FieldViolation::new(
                "status",
                "must be open, accepted, rejected or all",
            ));
            None
        }
    };
    let limit = match i64::from(page_size) {
        0 => DEFAULT_PAGE,
        n if (1..=MAX_PAGE).contains(&n) => n,
        _ => {
            violations.push(FieldViolation::new("page_size", "must be 0 to 1,000"));
            DEFAULT_PAGE
        }
    };
    let before = if page_token.is_empty() {
        None
    } else {
        match page_token.parse::<i64>() {
            Ok(id) if id > 0 => Some(id),
            _ => {
                violations.push(FieldViolation::new(
                    "page_token",
                    "not a token from a previous page",
                ));
                None
            }
        }
    };
    if violations.is_empty() {
        Ok((status, before, limit))
    } else {
        Err(IdentityError::InvalidArgument(violations))
    }
}

/// A page of suggestions (`page` holds up to `limit + 1`: the extra one says there is more).
pub(crate) fn suggestions_to_pb(
    mut page: Vec<crate::StoredSuggestion>,
    limit: i64,
) -> pb::ListMatchSuggestionsResponse {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = page.len() > limit;
    page.truncate(limit);
    let next_page_token = if more {
        page.last().map(|s| s.id.to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    pb::ListMatchSuggestionsResponse {
        suggestions: page.into_iter().map(suggestion_to_pb).collect(),
        next_page_token,
    }
}

/// A stored suggestion as answered.
pub(crate) fn suggestion_to_pb(suggestion: crate::StoredSuggestion) -> pb::MatchSuggestion {
    let crate::StoredSuggestion {
        id,
        profile_a,
        profile_b,
        explanation,
        status,
        created_at,
    } = suggestion;
    pb::MatchSuggestion {
        suggestion_id: id,
        profile_id: profile_a.to_string(),
        other_profile_id: profile_b.to_string(),
        explanation: Some(explanation_to_pb(&explanation)),
        status,
        created_at: Some(to_timestamp(created_at)),
    }
}

/// An explanation stored as JSON (see `matching::explanation_json`) as answered; fields that
/// do not decode are left at their defaults.
pub(crate) fn explanation_to_pb(json: &str) -> pb::MatchExplanation {
    let value: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let number = |v: &serde_json::Value, k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_default()
    };
    pb::MatchExplanation {
        match_weight: number(&value, "match_weight"),
        match_probability: number(&value, "match_probability"),
        prior_weight: number(&value, "prior_weight"),
        model_version: value
            .get("model_version")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or_default(),
        fields: value
            .get("fields")
            .and_then(serde_json::Value::as_array)
            .map(|fields| {
                fields
                    .iter()
                    .map(|f| pb::FieldContribution {
                        field: f
                            .get("field")
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        level: f
                            .get("level")
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        weight: number(f, "weight"),
                        term_frequency_adjusted: f
                            .get("term_frequency_adjusted")
                            .and_then(serde_json::Value::as_bool)
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

impl From<Merge> for pb::Merge {
    fn from(merge: Merge) -> Self {
        let Merge {
            surviving_profile_id,
            merged_profile_id,
            cause_event_id,
            merged_at,
            rule,
        } = merge;
        Self {
            surviving_profile_id: surviving_profile_id.to_string(),
            merged_profile_id: merged_profile_id.to_string(),
            cause_event_id,
            merged_at: Some(to_timestamp(merged_at)),
            rule,
        }
    }
}

impl From<Resolution> for pb::Resolution {
    fn from(resolution: Resolution) -> Self {
        let Resolution {
            event_id,
            profile_id,
            identifiers,
            merges,
            dropped,
            // The pipeline knows its events' times.
            event_time: _,
            suppressed,
        } = resolution;
        Self {
            event_id,
            // A suppressed event belongs to no profile.
            profile_id: if suppressed {
                String::new()
            } else {
                profile_id.to_string()
            },
            identifiers: identifiers.into_iter().map(identifier_to_pb).collect(),
            merges: merges.into_iter().map(Into::into).collect(),
            dropped: dropped
                .into_iter()
                .map(|Dropped { identifier, reason }| pb::DroppedIdentifier {
                    identifier: Some(identifier_to_pb(identifier)),
                    reason,
                })
                .collect(),
            suppressed,
        }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn id(kind: &str, value: &str) -> common::Identifier {
        common::Identifier {
            r#type: kind.into(),
            value: value.into(),
        }
    }

    #[test]
    fn violations_name_the_record_and_identifier() {
        let records = vec![
            pb::IdentityRecord {
                event_id: "e0".into(),
                identifiers: vec![id("user_id", "u")],
                timestamp: None,
                ..Default::default()
            },
            pb::IdentityRecord {
                event_id: String::new(),
                identifiers: vec![id("user_id", "u"), id("User", "x")],
                timestamp: None,
                ..Default::default()
            },
        ];
        let Err(IdentityError::InvalidArgument(violations)) =
            records_from_pb(&Rules::default(), records)
        else {
            panic!("expected a validation error");
        };
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["records[1].event_id", "records[1].identifiers[1].type"]
        );
    }

    #[test]
    fn violations_are_capped() {
        let records = (0..MAX_VIOLATIONS + 5)
            .map(|_| pb::IdentityRecord {
                event_id: String::new(),
                identifiers: vec![],
                timestamp: None,
                ..Default::default()
            })
            .collect();
        let Err(IdentityError::InvalidArgument(violations)) =
            records_from_pb(&Rules::default(), records)
        else {
            panic!("expected a validation error");
        };
        assert_eq!(violations.len(), MAX_VIOLATIONS);
    }

    #[test]
    fn a_lookup_needs_an_identifier() {
        let Err(IdentityError::InvalidArgument(v)) =
            lookup_from_pb(pb::LookupIdentifierRequest { identifier: None })
        else {
            panic!("expected a validation error");
        };
        assert_eq!(v[0].field, "identifier");
    }

    #[test]
    fn resolutions_keep_every_field() {
        let merged_at = time::macros::datetime!(2026-11-28 12:00:00.000_001 UTC);
        let pb = pb::Resolution::from(Resolution {
            event_id: "e1".into(),
            profile_id: Uuid::from_u128(1),
            identifiers: vec![Identifier::new("email", "a@x.io")],
            merges: vec![Merge {
                surviving_profile_id: Uuid::from_u128(1),
                merged_profile_id: Uuid::from_u128(2),
                cause_event_id: "e1".into(),
                merged_at,
                rule: "seen_together".into(),
            }],
            dropped: vec![Dropped {
                identifier: Identifier::new("user_id", "null"),
                reason: "blocked".into(),
            }],
            event_time: merged_at,
            suppressed: false,
        });
        assert!(!pb.suppressed);
        assert_eq!(pb.dropped[0].reason, "blocked");
        assert_eq!(pb.merges[0].rule, "seen_together");
        assert_eq!(pb.profile_id, Uuid::from_u128(1).to_string());
        assert_eq!(pb.identifiers, [id("email", "a@x.io")]);
        assert_eq!(
            pb.merges[0].merged_profile_id,
            Uuid::from_u128(2).to_string()
        );
        assert_eq!(pb.merges[0].merged_at, Some(to_timestamp(merged_at)));
    }

    #[test]
    fn suppressed_resolutions_name_no_profile() {
        let at = time::macros::datetime!(2026-11-28 12:00:00 UTC);
        let pb = pb::Resolution::from(Resolution::suppressed_event("e9", at));
        assert!(pb.suppressed);
        assert_eq!(pb.profile_id, "");
        assert_eq!(pb.event_id, "e9");
        assert!(pb.identifiers.is_empty() && pb.merges.is_empty() && pb.dropped.is_empty());
    }

    #[test]
    fn forget_requests_name_their_bad_fields() {
        let Err(IdentityError::InvalidArgument(v)) =
            forget_request_from_pb(pb::ForgetProfileRequest {
                profile_id: "p1".into(),
                reason: "x".repeat(MAX_FORGET_REASON + 1),
            })
        else {
            panic!("expected a validation error");
        };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["profile_id", "reason"]);
        let id = Uuid::from_u128(7);
        let (got, reason) = forget_request_from_pb(pb::ForgetProfileRequest {
            profile_id: id.to_string(),
            reason: "x".repeat(MAX_FORGET_REASON),
        })
        .expect("valid");
        assert_eq!((got, reason.len()), (id, MAX_FORGET_REASON));
    }
}
