//! Conversions between the protobuf messages and the domain. Messages are destructured field by
//! field, so a field added to the contract does not compile until someone decides what it means.

use tessera_core::{FieldViolation, Identifier};
use tessera_proto::common::v1 as common;
use tessera_proto::convert::to_timestamp;
use tessera_proto::identity::v1 as pb;

use time::OffsetDateTime;

use crate::IdentityError;
use crate::domain::{Dropped, Merge, Record, Resolution, Rules};

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
        } = resolution;
        Self {
            event_id,
            profile_id: profile_id.to_string(),
            identifiers: identifiers.into_iter().map(identifier_to_pb).collect(),
            merges: merges.into_iter().map(Into::into).collect(),
            dropped: dropped
                .into_iter()
                .map(|Dropped { identifier, reason }| pb::DroppedIdentifier {
                    identifier: Some(identifier_to_pb(identifier)),
                    reason,
                })
                .collect(),
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
            },
            pb::IdentityRecord {
                event_id: String::new(),
                identifiers: vec![id("user_id", "u"), id("User", "x")],
                timestamp: None,
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
        });
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
}
