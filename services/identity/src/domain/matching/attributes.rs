//! A record's person attributes, normalized once per field so comparisons, blocking keys and
//! term frequencies all see the same strings.

use serde::{Deserialize, Serialize};

/// How a field's raw value is normalized before it is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    /// Names and addresses: lower-cased, apostrophes and full stops removed, other punctuation
    /// read as a space, whitespace collapsed.
    Text,
    /// Postcodes and street numbers: lower-cased letters and digits only.
    Code,
    /// Dates: `YYYYMMDD` when the value parses (`YYYYMMDD`, `YYYY-MM-DD`, day-first `DD/MM/YYYY`),
    /// else its digits, so a corrupt date can still be near another.
    Date,
    /// Email addresses: trimmed and lower-cased.
    Email,
    /// Phone numbers: digits only.
    Phone,
}

/// Normalizes one raw value; `None` when nothing meaningful is left (a missing value).
pub fn normalize_value(kind: FieldKind, raw: &str) -> Option<String> {
    let raw = raw.trim();
    let out = match kind {
        FieldKind::Text => normalize_text(raw),
        FieldKind::Code => raw
            .chars()
            .filter(|c| c.is_alphanumeric())
            .flat_map(char::to_lowercase)
            .collect(),
        FieldKind::Date => normalize_date(raw),
        FieldKind::Email => raw.to_lowercase(),
        FieldKind::Phone => raw.chars().filter(char::is_ascii_digit).collect(),
    };
    (!out.is_empty()).then_some(out)
}

fn normalize_text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut pending_space = false;
    for c in raw.chars() {
        if c.is_alphanumeric() {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.extend(c.to_lowercase());
        } else if c == '\'' || c == '.' || c == '\u{2019}' {
            // "o'brien" is "obrien" and "st." is "st": joining keeps the token whole.
        } else {
            pending_space = true;
        }
    }
    out
}

fn normalize_date(raw: &str) -> String {
    let parts: Vec<&str> = raw
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .collect();
    let ymd = match parts.as_slice() {
        [one] if one.len() == 8 => Some((&one[..4], &one[4..6], &one[6..])),
        [y, m, d] if y.len() == 4 => Some((*y, *m, *d)),
        [d, m, y] if y.len() == 4 => Some((*y, *m, *d)),
        _ => None,
    };
    if let Some((y, m, d)) = ymd
        && let (Ok(month), Ok(day)) = (m.parse::<u8>(), d.parse::<u8>())
        && (1..=12).contains(&month)
        && (1..=31).contains(&day)
    {
        return format!("{y}{month:02}{day:02}");
    }
    parts.concat()
}

/// A record's normalized attribute values, one slot per compared field in the order of the
/// matcher's comparisons (`None`: missing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attributes {
    values: Vec<Option<Box<str>>>,
}

impl Attributes {
    /// Attributes from already normalized values, in comparison order.
    pub fn from_values(values: Vec<Option<Box<str>>>) -> Self {
        Self { values }
    }

    /// The normalized value of the field at `index` (comparison order).
    pub fn get(&self, index: usize) -> Option<&str> {
        self.values.get(index).and_then(|v| v.as_deref())
    }

    /// How many field slots the record has.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the record has no field slots.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_lowercased_without_punctuation() {
        assert_eq!(
            normalize_value(FieldKind::Text, "  O'Brien-Smith,   JR. "),
            Some("obrien smith jr".to_owned())
        );
        assert_eq!(normalize_value(FieldKind::Text, " - "), None);
        assert_eq!(
            normalize_value(FieldKind::Code, " 2 6-0 0 "),
            Some("2600".to_owned())
        );
        assert_eq!(
            normalize_value(FieldKind::Phone, "+61 (2) 555-0100"),
            Some("6125550100".to_owned())
        );
        assert_eq!(
            normalize_value(FieldKind::Email, " A@B.com "),
            Some("a@b.com".to_owned())
        );
    }

    #[test]
    fn dates_become_yyyymmdd_where_they_parse() {
        for raw in [
            "19560409",
            "1956-04-09",
            "9/4/1956",
            "09.04.1956",
            "1956/4/9",
        ] {
            assert_eq!(
                normalize_value(FieldKind::Date, raw),
                Some("19560409".to_owned()),
                "{raw}"
            );
        }
        // Corrupt dates keep their digits so a one-digit typo stays near the original.
        assert_eq!(
            normalize_value(FieldKind::Date, "19561309"),
            Some("19561309".to_owned())
        );
        assert_eq!(normalize_value(FieldKind::Date, ""), None);
    }
}
