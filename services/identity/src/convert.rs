//! Conversions between the protobuf messages and the domain. Messages are destructured field by
//! field, so a field added to the contract does not compile until someone decides what it means.

use tessera_core::{FieldViolation, Identifier};
use tessera_proto::common::v1 as common;
use tessera_proto::convert::to_timestamp;
use tessera_proto::identity::v1 as pb;

use crate::IdentityError;
use crate::domain::{Merge, Record, Resolution};

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

impl TryFrom<pb::IdentityRecord> for Record {
    type Error = Vec<FieldViolation>;

    fn try_from(record: pb::IdentityRecord) -> Result<Self, Self::Error> {
        let pb::IdentityRecord {
            event_id,
            identifiers,
            // The graph orders profiles by when it created them, not by event time: clients
            // can skew event times and the log can replay events out of order.
            timestamp: _,
        } = record;
        Record::new(
            event_id,
            identifiers.into_iter().map(identifier_from_pb).collect(),
        )
    }
}

/// The most field violations one error reports: the details travel in a response header.
const MAX_VIOLATIONS: usize = 100;

/// The records of a request, normalized; violations name `records[i]....`, the first
/// [`MAX_VIOLATIONS`] of them.
pub(crate) fn records_from_pb(
    records: Vec<pb::IdentityRecord>,
) -> Result<Vec<Record>, IdentityError> {
    let mut out = Vec::with_capacity(records.len());
    let mut violations = Vec::new();
    for (i, record) in records.into_iter().enumerate() {
        match Record::try_from(record) {
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
        } = merge;
        Self {
            surviving_profile_id: surviving_profile_id.to_string(),
            merged_profile_id: merged_profile_id.to_string(),
            cause_event_id,
            merged_at: Some(to_timestamp(merged_at)),
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
        } = resolution;
        Self {
            event_id,
            profile_id: profile_id.to_string(),
            identifiers: identifiers.into_iter().map(identifier_to_pb).collect(),
            merges: merges.into_iter().map(Into::into).collect(),
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
        let Err(IdentityError::InvalidArgument(violations)) = records_from_pb(records) else {
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
        let Err(IdentityError::InvalidArgument(violations)) = records_from_pb(records) else {
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
            }],
        });
        assert_eq!(pb.profile_id, Uuid::from_u128(1).to_string());
        assert_eq!(pb.identifiers, [id("email", "a@x.io")]);
        assert_eq!(
            pb.merges[0].merged_profile_id,
            Uuid::from_u128(2).to_string()
        );
        assert_eq!(pb.merges[0].merged_at, Some(to_timestamp(merged_at)));
    }
}
