//! Normalization of identifiers under the rules, and the values that never link anything.

use tessera_core::event::MAX_ID_LEN;
use tessera_core::identifier::{EMAIL, PHONE, is_valid_type};
use tessera_core::{FieldViolation, Identifier};
use time::OffsetDateTime;

use super::rules::Rules;
use super::truncate_to_micros;

/// The most identifiers one record may carry.
pub const MAX_IDENTIFIERS_PER_RECORD: usize = 100;

/// Why an identifier of a record links nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unlinked {
    /// A blocked value: a junk placeholder or on the type's blocklist.
    Blocked,
    /// A type that links nothing: neither built-in nor a declared custom type.
    UnknownType,
    /// Not a value of its type: an email without `local@domain`, a phone that does not parse.
    Invalid,
}

impl Unlinked {
    /// The reason as recorded in the graph log and reported to clients.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blocked => "blocked",
            Self::UnknownType => "unknown_type",
            Self::Invalid => "invalid_value",
        }
    }
}

/// An identifier after normalization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Normalized {
    /// A value that links profiles.
    Linkable(Identifier),
    /// A value that links nothing, and why.
    Unlinked(Identifier, Unlinked),
}

/// Normalizes one identifier under `rules`: trims the value, lower-cases emails (folding Gmail
/// addresses when configured), writes phones as E.164, and tells blocked values, unknown types
/// and malformed emails and phones apart from linkable ones. Violations (a malformed type, an
/// oversized value) name `type` or `value`, relative to the identifier.
pub fn normalize(rules: &Rules, raw: Identifier) -> Result<Normalized, Vec<FieldViolation>> {
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
    let normalized = match kind.as_str() {
        EMAIL => normalize_email(trimmed, rules.config().email.fold_gmail),
        PHONE => normalize_phone(trimmed, rules.region),
        _ => Some(trimmed.to_owned()),
    };
    let Some(normalized) = normalized else {
        return Ok(Normalized::Unlinked(
            Identifier {
                kind,
                value: trimmed.to_owned(),
            },
            Unlinked::Invalid,
        ));
    };
    let reason = if !rules.links(&kind) {
        Some(Unlinked::UnknownType)
    } else if rules.is_blocked(&kind, &normalized) {
        Some(Unlinked::Blocked)
    } else {
        None
    };
    let identifier = Identifier {
        kind,
        value: normalized,
    };
    Ok(match reason {
        None => Normalized::Linkable(identifier),
        Some(reason) => Normalized::Unlinked(identifier, reason),
    })
}

/// A lower-cased email, `None` unless it is `local@domain` without spaces. With `fold_gmail`,
/// dots and a `+tag` leave a Gmail local part and `googlemail.com` becomes `gmail.com`.
fn normalize_email(value: &str, fold_gmail: bool) -> Option<String> {
    let lower = value.to_lowercase();
    let (local, domain) = lower.split_once('@')?;
    if local.is_empty()
        || domain.is_empty()
        || domain.contains('@')
        || lower.chars().any(char::is_whitespace)
    {
        return None;
    }
    if fold_gmail && (domain == "gmail.com" || domain == "googlemail.com") {
        let untagged = local.split_once('+').map_or(local, |(base, _)| base);
        let folded: String = untagged.chars().filter(|c| *c != '.').collect();
        if folded.is_empty() {
            return None;
        }
        return Some(format!("{folded}@gmail.com"));
    }
    Some(lower)
}

/// A phone number as E.164 (`+14155550100`), read with `region` when it has no country code;
/// `None` when it is not a plausible number.
fn normalize_phone(value: &str, region: phonenumber::country::Id) -> Option<String> {
    let e164 = |value: &str| {
        let number = phonenumber::parse(Some(region), value).ok()?;
        phonenumber::is_viable(value)
            .then(|| number.format().mode(phonenumber::Mode::E164).to_string())
    };
    // A normalized value must normalize to itself, or a phone stored once is looked up as
    // another. E.164 output does not always parse back to itself (a national number with
    // leading zeros: "000011 946 8" in GB gives "+44001199468", which parses as "+441199468"),
    // so take the value once it is stable, and refuse one that never settles.
    let once = e164(value)?;
    let twice = e164(&once)?;
    if twice == once {
        return Some(once);
    }
    let thrice = e164(&twice)?;
    (thrice == twice).then_some(twice)
}

/// The identifiers seen together in one event, normalized: the linkable ones (duplicates
/// removed, first occurrences kept in order) and the ones that link nothing, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    event_id: String,
    identifiers: Vec<Identifier>,
    unlinked: Vec<(Identifier, Unlinked)>,
    timestamp: OffsetDateTime,
}

impl Record {
    /// Validates and normalizes one event's identifiers under `rules`; `timestamp` is when the
    /// event happened. Violations name `event_id`, `identifiers` or `identifiers[i].type` /
    /// `.value`, relative to the record.
    pub fn new(
        rules: &Rules,
        event_id: impl Into<String>,
        identifiers: Vec<Identifier>,
        timestamp: OffsetDateTime,
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
        let mut unlinked = Vec::new();
        for (i, raw) in identifiers.into_iter().enumerate() {
            match normalize(rules, raw) {
                Ok(Normalized::Linkable(id)) => {
                    if !linkable.contains(&id) {
                        linkable.push(id);
                    }
                }
                Ok(Normalized::Unlinked(id, why)) => unlinked.push((id, why)),
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
                unlinked,
                timestamp: truncate_to_micros(timestamp),
            })
        } else {
            Err(violations)
        }
    }

    /// The event's id.
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// The linkable identifiers, normalized; empty when every value was unlinkable.
    pub fn identifiers(&self) -> &[Identifier] {
        &self.identifiers
    }

    /// The identifiers that link nothing, normalized where they could be, with why.
    pub fn unlinked(&self) -> &[(Identifier, Unlinked)] {
        &self.unlinked
    }

    /// When the event happened (microsecond precision).
    pub fn timestamp(&self) -> OffsetDateTime {
        self.timestamp
    }

    /// The record with the identifiers of `removed` taken out (as if the event had never
    /// carried them: an erased identifier).
    pub fn without(&self, removed: &std::collections::HashSet<Identifier>) -> Self {
        Self {
            event_id: self.event_id.clone(),
            identifiers: self
                .identifiers
                .iter()
                .filter(|i| !removed.contains(*i))
                .cloned()
                .collect(),
            unlinked: self.unlinked.clone(),
            timestamp: self.timestamp,
        }
    }

    /// A record of identifiers already normalized (read back from the graph), for replays.
    pub fn normalized(
        event_id: impl Into<String>,
        identifiers: Vec<Identifier>,
        timestamp: OffsetDateTime,
    ) -> Self {
        Self {
            event_id: event_id.into(),
            identifiers,
            unlinked: Vec::new(),
            timestamp: truncate_to_micros(timestamp),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::rules::RulesConfig;

    fn at() -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH
    }

    fn normalized(rules: &Rules, kind: &str, value: &str) -> Normalized {
        normalize(rules, Identifier::new(kind, value)).expect("valid")
    }

    fn linkable(kind: &str, value: &str) -> Option<String> {
        match normalized(&Rules::default(), kind, value) {
            Normalized::Linkable(id) => Some(id.value),
            Normalized::Unlinked(..) => None,
        }
    }

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(
            linkable("email", " Alice@Example.COM ").as_deref(),
            Some("alice@example.com")
        );
        for bad in ["alice", "@x.io", "alice@", "a@b@c", "al ice@x.io"] {
            assert_eq!(
                normalized(&Rules::default(), "email", bad),
                Normalized::Unlinked(Identifier::new("email", bad), Unlinked::Invalid),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn gmail_folding_is_optional() {
        assert_eq!(
            linkable("email", "A.Lice+news@GoogleMail.com").as_deref(),
            Some("a.lice+news@googlemail.com"),
            "off by default"
        );
        let mut config = RulesConfig::default();
        config.email.fold_gmail = true;
        let rules = Rules::compile(config).unwrap();
        for same in [
            "A.Lice+news@GoogleMail.com",
            "alice@gmail.com",
            "a.l.i.c.e@gmail.com",
        ] {
            assert_eq!(
                normalized(&rules, "email", same),
                Normalized::Linkable(Identifier::new("email", "alice@gmail.com")),
                "{same:?}"
            );
        }
        assert_eq!(
            normalized(&rules, "email", "a.lice+x@example.com"),
            Normalized::Linkable(Identifier::new("email", "a.lice+x@example.com")),
            "other domains keep dots and tags"
        );
    }

    #[test]
    fn a_normalized_phone_normalizes_to_itself() {
        // Found by the identifiers fuzz target: leading zeros of a national number survived
        // the first E.164 formatting and not the second.
        let mut config = RulesConfig::default();
        config.phone.default_region = "gb".into();
        let uk = Rules::compile(config).unwrap();
        let first = normalized(&uk, "phone", "000011 w946 8");
        let (Normalized::Linkable(id) | Normalized::Unlinked(id, _)) = &first;
        assert_eq!(normalized(&uk, "phone", &id.value), first);
    }

    #[test]
    fn phones_become_e164_with_the_default_region() {
        let rules = Rules::default();
        for same in [
            "+1 (415) 555-0100",
            "4155550100",
            " 415.555.0100 ",
            "+14155550100",
        ] {
            assert_eq!(
                normalized(&rules, "phone", same),
                Normalized::Linkable(Identifier::new("phone", "+14155550100")),
                "{same:?}"
            );
        }
        let mut config = RulesConfig::default();
        config.phone.default_region = "gb".into();
        let uk = Rules::compile(config).unwrap();
        assert_eq!(
            normalized(&uk, "phone", "020 7946 0018"),
            Normalized::Linkable(Identifier::new("phone", "+442079460018"))
        );
        for bad in ["call me", "12", "++--"] {
            assert!(
                matches!(
                    normalized(&rules, "phone", bad),
                    Normalized::Unlinked(_, Unlinked::Invalid)
                ),
                "{bad:?}"
            );
        }
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
        for fine in ["1", "10", "a0", "nullable", "guest-42"] {
            assert!(linkable("user_id", fine).is_some(), "{fine:?}");
        }
    }

    #[test]
    fn custom_types_link_only_when_declared() {
        assert!(matches!(
            normalized(&Rules::default(), "crm_id", "c-1"),
            Normalized::Unlinked(_, Unlinked::UnknownType)
        ));
        let rules = Rules::compile(RulesConfig {
            custom_types: vec!["crm_id".into()],
            ..RulesConfig::default()
        })
        .unwrap();
        assert_eq!(
            normalized(&rules, "crm_id", " c-1 "),
            Normalized::Linkable(Identifier::new("crm_id", "c-1"))
        );
    }

    #[test]
    fn bad_types_and_values_are_named() {
        let rules = Rules::default();
        let errs =
            normalize(&rules, Identifier::new("Email", "x".repeat(MAX_ID_LEN + 1))).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["type", "value"]);
        let errs = normalize(&rules, Identifier::new("user_id", "a\0b")).unwrap_err();
        assert_eq!(errs[0].field, "value");
    }

    #[test]
    fn records_set_aside_unlinkable_and_duplicate_identifiers() {
        let record = Record::new(
            &Rules::default(),
            "e1",
            vec![
                Identifier::new("email", "A@x.io"),
                Identifier::new("anonymous_id", "null"),
                Identifier::new("email", " a@x.io"),
                Identifier::new("user_id", "u1"),
            ],
            at(),
        )
        .expect("valid");
        assert_eq!(
            record.identifiers(),
            [
                Identifier::new("email", "a@x.io"),
                Identifier::new("user_id", "u1")
            ]
        );
        assert_eq!(
            record.unlinked(),
            [(Identifier::new("anonymous_id", "null"), Unlinked::Blocked)]
        );
    }

    #[test]
    fn record_violations_name_their_field() {
        let rules = Rules::default();
        let errs = Record::new(
            &rules,
            " ",
            vec![
                Identifier::new("user_id", "u1"),
                Identifier::new("not a type", "x"),
            ],
            at(),
        )
        .unwrap_err();
        let fields: Vec<_> = errs.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["event_id", "identifiers[1].type"]);
        let many = vec![Identifier::new("user_id", "u"); MAX_IDENTIFIERS_PER_RECORD + 1];
        assert_eq!(
            Record::new(&rules, "e", many, at()).unwrap_err()[0].field,
            "identifiers"
        );
    }
}
