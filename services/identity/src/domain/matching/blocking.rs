//! Blocking: which pairs are worth scoring. Each rule turns a record into at most one key (the
//! record's transformed values of the rule's fields); two records are candidates when they share
//! a key of any rule. Keys held by more than `max_block_size` records are skipped, so a common
//! value (a frequent surname in one postcode) cannot make the work quadratic.

use std::collections::HashMap;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use super::attributes::Attributes;

/// How a field's value is turned into part of a blocking key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Transform {
    /// The normalized value.
    #[default]
    Value,
    /// The first `chars` characters (a date's year is `prefix` 4 of `YYYYMMDD`).
    Prefix {
        /// How many characters to keep.
        chars: usize,
    },
    /// American Soundex of the value's letters (`robert` and `rupert` are `r163`).
    Soundex,
}

impl Transform {
    fn apply(self, value: &str, out: &mut String) -> bool {
        let start = out.len();
        match self {
            Transform::Value => out.push_str(value),
            Transform::Prefix { chars } => out.extend(value.chars().take(chars)),
            Transform::Soundex => soundex(value, out),
        }
        out.len() > start
    }
}

/// One part of a blocking key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPart {
    /// The attribute, which must be one of the compared fields.
    pub field: String,
    /// How its value is transformed.
    #[serde(default)]
    pub transform: Transform,
}

/// A blocking rule: records agreeing on every part are candidates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockingRuleConfig {
    /// A name for reports (`surname_postcode`).
    pub name: String,
    /// The parts of the key; a record missing any part's field has no key under the rule.
    pub parts: Vec<KeyPart>,
}

impl BlockingRuleConfig {
    fn new(name: &str, parts: &[(&str, Transform)]) -> Self {
        Self {
            name: name.to_owned(),
            parts: parts
                .iter()
                .map(|(field, transform)| KeyPart {
                    field: (*field).to_owned(),
                    transform: *transform,
                })
                .collect(),
        }
    }

    /// The default rules for person attributes. They are chosen so that no single field is
    /// needed by all of them: a duplicate whose names, date of birth or address are corrupted
    /// still shares a key with its original through the other fields, and phonetic codes absorb
    /// most typos in names.
    pub fn person_defaults() -> Vec<Self> {
        use Transform::{Prefix, Soundex, Value};
        let year = Prefix { chars: 4 };
        vec![
            Self::new(
                "names_soundex",
                &[("given_name", Soundex), ("surname", Soundex)],
            ),
            Self::new("date_of_birth", &[("date_of_birth", Value)]),
            Self::new(
                "surname_year",
                &[("surname", Soundex), ("date_of_birth", year)],
            ),
            Self::new(
                "given_name_year",
                &[("given_name", Soundex), ("date_of_birth", year)],
            ),
            Self::new(
                "surname_postcode",
                &[("surname", Soundex), ("postcode", Value)],
            ),
            Self::new(
                "given_name_postcode",
                &[("given_name", Soundex), ("postcode", Value)],
            ),
            Self::new(
                "street_postcode",
                &[("street_number", Value), ("postcode", Value)],
            ),
            Self::new(
                "street_suburb",
                &[("street_number", Value), ("suburb", Soundex)],
            ),
            Self::new("address", &[("address_1", Value), ("street_number", Value)]),
            Self::new("email", &[("email", Value)]),
            Self::new("phone", &[("phone", Value)]),
        ]
    }
}

/// A compiled rule: fields resolved to their comparison index.
#[derive(Debug, Clone)]
pub(crate) struct BlockingRule {
    pub(crate) parts: Vec<(usize, Transform)>,
}

/// A blocking key: the rule's index and the record's key under it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    /// The index of the rule in the config.
    pub rule: u16,
    /// The key's text (parts joined by U+001F).
    pub value: Box<str>,
}

/// Appends `attributes`' keys under every rule to `out`, reusing `buf` for the text.
pub(crate) fn keys_into(
    rules: &[BlockingRule],
    attributes: &Attributes,
    buf: &mut String,
    out: &mut Vec<BlockKey>,
) {
    'rules: for (index, rule) in rules.iter().enumerate() {
        buf.clear();
        for (n, &(field, transform)) in rule.parts.iter().enumerate() {
            if n > 0 {
                buf.push('\u{1f}');
            }
            let Some(value) = attributes.get(field) else {
                continue 'rules;
            };
            if !transform.apply(value, buf) {
                continue 'rules;
            }
        }
        out.push(BlockKey {
            rule: u16::try_from(index).unwrap_or(u16::MAX),
            value: buf.as_str().into(),
        });
    }
}

/// What blocking did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockingStats {
    /// Distinct keys held by at least two records.
    pub blocks: usize,
    /// Keys skipped because more than `max_block_size` records held them.
    pub oversized_blocks: usize,
    /// Distinct candidate pairs.
    pub candidate_pairs: usize,
}

/// The distinct candidate pairs `(i, j)`, `i < j`, of positions in `records`, sorted.
pub(crate) fn candidate_pairs(
    rules: &[BlockingRule],
    records: &[Attributes],
    max_block_size: usize,
) -> (Vec<(u32, u32)>, BlockingStats) {
    let mut blocks: HashMap<BlockKey, Vec<u32>> = HashMap::new();
    let (mut buf, mut keys) = (String::new(), Vec::new());
    for (position, attributes) in records.iter().enumerate() {
        keys.clear();
        keys_into(rules, attributes, &mut buf, &mut keys);
        let position = u32::try_from(position).unwrap_or(u32::MAX);
        for key in keys.drain(..) {
            blocks.entry(key).or_default().push(position);
        }
    }
    let mut stats = BlockingStats::default();
    let mut pairs = Vec::new();
    for members in blocks.values() {
        if members.len() < 2 {
            continue;
        }
        if members.len() > max_block_size {
            stats.oversized_blocks += 1;
            continue;
        }
        stats.blocks += 1;
        for (n, &i) in members.iter().enumerate() {
            pairs.extend(members[n + 1..].iter().map(|&j| (i.min(j), i.max(j))));
        }
    }
    pairs.sort_unstable();
    pairs.dedup();
    stats.candidate_pairs = pairs.len();
    (pairs, stats)
}

/// Where the incremental matcher finds the records sharing a key, and their attributes. The
/// service can back it by memory ([`MemoryIndex`]) or by a store read ahead for one profile.
pub trait BlockingIndex<I> {
    /// The ids of the records holding `key` (empty when none do).
    fn block(&self, key: &BlockKey) -> &[I];
    /// A record's attributes, `None` when the index does not hold it.
    fn attributes(&self, id: &I) -> Option<&Attributes>;
}

/// An in-memory blocking index: key → record ids, and id → attributes with the keys they were
/// filed under (so an update or removal unfiles exactly those).
#[derive(Debug, Clone)]
pub struct MemoryIndex<I> {
    blocks: HashMap<BlockKey, Vec<I>>,
    records: HashMap<I, (Attributes, Vec<BlockKey>)>,
}

impl<I> Default for MemoryIndex<I> {
    fn default() -> Self {
        Self {
            blocks: HashMap::new(),
            records: HashMap::new(),
        }
    }
}

impl<I: Clone + Eq + Hash> MemoryIndex<I> {
    /// Files `attributes` under `id` with `keys` (from [`super::Matcher::keys`]), replacing what
    /// `id` held before.
    pub fn upsert(&mut self, id: I, attributes: Attributes, keys: Vec<BlockKey>) {
        self.remove(&id);
        for key in &keys {
            self.blocks.entry(key.clone()).or_default().push(id.clone());
        }
        self.records.insert(id, (attributes, keys));
    }

    /// Removes `id` and unfiles its keys.
    pub fn remove(&mut self, id: &I) {
        let Some((_, keys)) = self.records.remove(id) else {
            return;
        };
        for key in keys {
            if let Some(members) = self.blocks.get_mut(&key) {
                members.retain(|member| member != id);
                if members.is_empty() {
                    self.blocks.remove(&key);
                }
            }
        }
    }

    /// How many records the index holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the index holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl<I: Eq + Hash> BlockingIndex<I> for MemoryIndex<I> {
    fn block(&self, key: &BlockKey) -> &[I] {
        self.blocks.get(key).map_or(&[], Vec::as_slice)
    }

    fn attributes(&self, id: &I) -> Option<&Attributes> {
        self.records.get(id).map(|(attributes, _)| attributes)
    }
}

/// American Soundex (letter, then three digits) of the ASCII letters of `value`, appended to
/// `out`; nothing when `value` has no ASCII letter.
pub fn soundex(value: &str, out: &mut String) {
    fn code(c: u8) -> u8 {
        match c {
            b'b' | b'f' | b'p' | b'v' => b'1',
            b'c' | b'g' | b'j' | b'k' | b'q' | b's' | b'x' | b'z' => b'2',
            b'd' | b't' => b'3',
            b'l' => b'4',
            b'm' | b'n' => b'5',
            b'r' => b'6',
            b'h' | b'w' => b'h',
            _ => b'0',
        }
    }
    let mut letters = value
        .bytes()
        .filter(u8::is_ascii_alphabetic)
        .map(|c| c.to_ascii_lowercase());
    let Some(first) = letters.next() else {
        return;
    };
    out.push(char::from(first));
    let mut last = code(first);
    let mut written = 0;
    for c in letters {
        let digit = code(c);
        // `h` and `w` do not separate equal codes; vowels do.
        if digit == b'h' {
            continue;
        }
        if digit != b'0' && digit != last {
            out.push(char::from(digit));
            written += 1;
            if written == 3 {
                return;
            }
        }
        last = digit;
    }
    out.extend(std::iter::repeat_n('0', 3 - written));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sx(value: &str) -> String {
        let mut out = String::new();
        soundex(value, &mut out);
        out
    }

    #[test]
    fn soundex_matches_the_reference_codes() {
        assert_eq!(sx("robert"), "r163");
        assert_eq!(sx("rupert"), "r163");
        assert_eq!(sx("ashcraft"), "a261");
        assert_eq!(sx("tymczak"), "t522");
        assert_eq!(sx("pfister"), "p236");
        assert_eq!(sx("lee"), "l000");
        assert_eq!(sx("123"), "");
    }

    fn attrs(values: &[Option<&str>]) -> Attributes {
        Attributes::from_values(values.iter().map(|v| v.map(Into::into)).collect())
    }

    #[test]
    fn records_missing_a_part_have_no_key_and_big_blocks_are_skipped() {
        let rules = vec![
            BlockingRule {
                parts: vec![(0, Transform::Value)],
            },
            BlockingRule {
                parts: vec![(0, Transform::Prefix { chars: 1 }), (1, Transform::Value)],
            },
        ];
        let records = vec![
            attrs(&[Some("ann"), Some("x")]),
            attrs(&[Some("ann"), Some("x")]),
            attrs(&[Some("ann"), None]),
            attrs(&[Some("amy"), Some("x")]),
            attrs(&[None, Some("x")]),
        ];
        // Both blocks ("ann": 0, 1, 2; "a" + "x": 0, 1, 3) hold three records: a cap of three
        // keeps them, a cap of two skips both.
        let (pairs, stats) = candidate_pairs(&rules, &records, 3);
        assert_eq!(pairs, vec![(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
        assert_eq!(stats.oversized_blocks, 0);
        let (pairs, stats) = candidate_pairs(&rules, &records, 2);
        assert_eq!(pairs, Vec::<(u32, u32)>::new());
        assert_eq!(stats.oversized_blocks, 2);
        let (pairs, _) = candidate_pairs(&rules[1..], &records, 3);
        assert_eq!(pairs, vec![(0, 1), (0, 3), (1, 3)]);
    }

    #[test]
    fn memory_index_unfiles_old_keys() {
        let key = |v: &str| BlockKey {
            rule: 0,
            value: v.into(),
        };
        let mut index = MemoryIndex::default();
        index.upsert(1, attrs(&[Some("a")]), vec![key("a")]);
        index.upsert(2, attrs(&[Some("a")]), vec![key("a")]);
        index.upsert(1, attrs(&[Some("b")]), vec![key("b")]);
        assert_eq!(index.block(&key("a")), &[2]);
        assert_eq!(index.block(&key("b")), &[1]);
        index.remove(&2);
        assert!(index.block(&key("a")).is_empty());
        assert_eq!(index.len(), 1);
    }
}
