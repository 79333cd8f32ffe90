//! Normalization of identifiers and the values that never link anything.

use tessera_core::event::MAX_ID_LEN;
use tessera_core::identifier::{EMAIL, is_valid_type};
use tessera_core::{FieldViolation, Identifier};

/// The most identifiers one record may carry.
pub const MAX_IDENTIFIERS_PER_RECORD: usize = 100;

/// Placeholder values that SDKs and forms send when they know nothing. Linking on them would fold
/// unrelated people into one profile, so they never link anything.
const BLOCKED: &[&str] = &[
    "null",
    "undefined",
    "none",
    "nil",
    "anonymous",
    "guest",
    "unknown",
    "-1",
    "[object object]",
    "test@test.com",
];

/// An identifier after normalization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Normalized {
    /// A value that links profiles.
    Linkable(Identifier),
    /// A placeholder value that never links anything.
    Blocked,
}

/// Whether `value` (already trimmed) is a placeholder that must never link profiles: empty, one
/// of the known junk values (case-insensitive), or all zeros (`0`, `0000`, the nil UUID).
pub fn is_blocked(value: &str) -> bool {
    value.is_empty()
        || BLOCKED.iter().any(|b| value.eq_ignore_ascii_case(b))
        || (value.contains('0') && value.bytes().all(|b| b == b'0' || b == b'-'))
}

/// Normalizes one identifier: trims the value and lower-cases emails. Violations name `type` or
/// `value`, relative to the identifier.
pub fn normalize(raw: Identifier) -> Result<Normalized, Vec<FieldViolation>> {
    let Identifier { kind, value } = raw;
    let mut violations = Vec::new();
    if !is_valid_type(&kind) {
        violations.push(FieldViolation::new(
            "type",
            "must be 1 to 64 lower-case letters, digits or underscores, starting with a letter",
        ));
    }
    let trimmed = value.trim();
    if trimmed.len() > MAX_ID_LEN {
        violations.push(FieldViolation::new(
            "value",
            format!("longer than {MAX_ID_LEN} bytes"),
        ));
    }
    if trimmed.contains('\0') {
        violations.push(FieldViolation::new(
            "value",
            "must not contain NUL characters",
        ));
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    let value = if kind == EMAIL {
        trimmed.to_lowercase()
    } else {
        trimmed.to_owned()
    };
    if is_blocked(&value) {
        Ok(Normalized::Blocked)
    } else {
        Ok(Normalized::Linkable(Identifier { kind, value }))
    }
}

/// The identifiers seen together in one event, normalized: blocked values dropped, duplicates
/// removed, first occurrences kept in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    event_id: String,
    identifiers: Vec<Identifier>,
}

impl Record {
    /// Validates and normalizes one event's identifiers. Violations name `event_id`,
    /// `identifiers` or `identifiers[i].type` / `.value`, relative to the record.
    pub fn new(
        event_id: impl Into<String>,
        identifiers: Vec<Identifier>,
    ) -> Result<Self, Vec<FieldViolation>> {
        let event_id = event_id.into();
        let mut violations = Vec::new();
        if event_id.trim().is_empty() {
            violations.push(FieldViolation::new("event_id", "required"));
        } else if event_id.len() > MAX_ID_LEN {
            violations.push(FieldViolation::new(
                "event_id",
                format!("longer than {MAX_ID_LEN} bytes"),
            ));
        } else if event_id.contains('\0') {
            violations.push(FieldViolation::new(
                "event_id",
                "must not contain NUL characters",
            ));
        }
        if identifiers.len() > MAX_IDENTIFIERS_PER_RECORD {
            violations.push(FieldViolation::new(
                "identifiers",
                format!("more than {MAX_IDENTIFIERS_PER_RECORD} identifiers"),
            ));
            return Err(violations);
        }
        let mut linkable: Vec<Identifier> = Vec::with_capacity(identifiers.len());
        for (i, raw) in identifiers.into_iter().enumerate() {
            match normalize(raw) {
                Ok(Normalized::Linkable(id)) => {
                    if !linkable.contains(&id) {
                        linkable.push(id);
                    }
                }
                Ok(Normalized::Blocked) => {}
                Err(errs) => violations.extend(
                    errs.into_iter()
                        .map(|v| v.prefixed(&format!("identifiers[{i}]"))),
                ),
            }
        }
        if violations.is_empty() {
            Ok(Self {
                event_id,
                identifiers: linkable,
            })
        } else {
            Err(violations)
        }
    }

    /// The event's id.
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// The linkable identifiers, normalized; empty when every value was blocked.
    pub fn identifiers(&self) -> &[Identifier] {
        &self.identifiers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linkable(kind: &str, value: &str) -> Option<String> {
        match normalize(Identifier::new(kind, value)).expect("valid") {
            Normalized::Linkable(id) => Some(id.value),
            Normalized::Blocked => None,
        }
    }

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(
            linkable("email", " Alice@Example.COM ").as_deref(),
            Some("alice@example.com")
        );
    }

    #[test]
    fn other_types_keep_their_case() {
        assert_eq!(linkable("user_id", " U-42\t").as_deref(), Some("U-42"));
    }

    #[test]
    fn junk_values_are_blocked() {
        for junk in [
            "",
            "  ",
            "null",
            "NULL",
            "Undefined",
            "none",
            "nil",
            "anonymous",
            "Guest",
            "unknown",
            "0",
            "-1",
            "[object Object]",
            "TEST@test.com",
            "0000",
            "00000000-0000-0000-0000-000000000000",
        ] {
            assert_eq!(linkable("anonymous_id", junk), None, "{junk:?}");
        }
        assert_eq!(linkable("email", " Test@Test.com "), None);
        for fine in ["1", "10", "-", "a0", "nullable", "guest-42"] {
            assert!(linkable("user_id", fine).is_some(), "{fine:?}");
        }
    }

    #[test]
    fn bad_types_and_values_are_named() {
        let errs = normalize(Identifier::new("Email", "x".repeat(MAX_ID_LEN + 1))).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["type", "value"]);
        let errs = normalize(Identifier::new("user_id", "a\0b")).unwrap_err();
        assert_eq!(errs[0].field, "value");
    }

    #[test]
    fn records_drop_blocked_and_duplicate_identifiers() {
        let record = Record::new(
            "e1",
            vec![
                Identifier::new("email", "A@x.io"),
                Identifier::new("anonymous_id", "null"),
                Identifier::new("email", " a@x.io"),
                Identifier::new("user_id", "u1"),
            ],
        )
        .expect("valid");
        assert_eq!(
            record.identifiers(),
            [
                Identifier::new("email", "a@x.io"),
                Identifier::new("user_id", "u1")
            ]
        );
    }

    #[test]
    fn record_violations_name_their_field() {
        let errs = Record::new(
            " ",
            vec![
                Identifier::new("user_id", "u1"),
                Identifier::new("not a type", "x"),
            ],
        )
        .unwrap_err();
        let fields: Vec<_> = errs.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["event_id", "identifiers[1].type"]);
        let many = vec![Identifier::new("user_id", "u"); MAX_IDENTIFIERS_PER_RECORD + 1];
        assert_eq!(Record::new("e", many).unwrap_err()[0].field, "identifiers");
    }
}
