//! Comparisons: how two values of one field are graded into a level, Splink style. The levels of
//! a comparison are tried in order and the first that holds wins; when none holds the pair is at
//! the implicit `else` level, and when either side is missing at `null` (which weighs nothing).

use serde::{Deserialize, Serialize};

use super::attributes::FieldKind;

/// One level of a comparison, from most to least similar.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Level {
    /// The normalized values are equal.
    Exact,
    /// Jaro-Winkler similarity of at least `min`.
    JaroWinkler {
        /// The lowest similarity in the band, in `[0, 1]`.
        min: f64,
    },
    /// Levenshtein distance of at most `max` edits.
    Levenshtein {
        /// The most edits in the band.
        max: usize,
    },
    /// Two `YYYYMMDD` dates with the same year and day and month swapped.
    DateTransposed,
}

impl Level {
    /// A short label for explanations (`exact`, `jaro_winkler>=0.92`, `levenshtein<=1`).
    pub fn label(&self) -> String {
        match self {
            Level::Exact => "exact".to_owned(),
            Level::JaroWinkler { min } => format!("jaro_winkler>={min}"),
            Level::Levenshtein { max } => format!("levenshtein<={max}"),
            Level::DateTransposed => "date_transposed".to_owned(),
        }
    }
}

/// The label of the level reached when no configured level holds.
pub const ELSE_LABEL: &str = "else";
/// The label of a comparison where either side is missing.
pub const NULL_LABEL: &str = "null";

/// How one field is compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComparisonConfig {
    /// The attribute name (`given_name`, `date_of_birth`, ...).
    pub field: String,
    /// How the field's values are normalized.
    pub kind: FieldKind,
    /// The levels, most similar first; `else` is implicit.
    pub levels: Vec<Level>,
    /// Whether an exact match weighs by the value's frequency (a shared rare surname is stronger
    /// evidence than a shared common one).
    #[serde(default)]
    pub term_frequency: bool,
}

impl ComparisonConfig {
    fn new(field: &str, kind: FieldKind, levels: Vec<Level>, term_frequency: bool) -> Self {
        Self {
            field: field.to_owned(),
            kind,
            levels,
            term_frequency,
        }
    }

    /// The default comparisons for person attributes: names and suburb with Jaro-Winkler bands
    /// (Splink's 0.92 / 0.88 / 0.70) and term-frequency adjustment, addresses with
    /// Jaro-Winkler bands, codes exact or one edit, dates exact / one digit / day and month
    /// swapped / two digits, email and phone exact.
    pub fn person_defaults() -> Vec<Self> {
        let name = || {
            vec![
                Level::Exact,
                Level::JaroWinkler { min: 0.92 },
                Level::JaroWinkler { min: 0.88 },
                Level::JaroWinkler { min: 0.70 },
            ]
        };
        let address = || {
            vec![
                Level::Exact,
                Level::JaroWinkler { min: 0.92 },
                Level::JaroWinkler { min: 0.80 },
            ]
        };
        let code = || vec![Level::Exact, Level::Levenshtein { max: 1 }];
        vec![
            Self::new("given_name", FieldKind::Text, name(), true),
            Self::new("surname", FieldKind::Text, name(), true),
            Self::new("date_of_birth", FieldKind::Date, date_levels(), false),
            Self::new("street_number", FieldKind::Code, code(), false),
            Self::new("address_1", FieldKind::Text, address(), false),
            Self::new("address_2", FieldKind::Text, address(), false),
            Self::new("suburb", FieldKind::Text, address(), true),
            Self::new("postcode", FieldKind::Code, code(), false),
            Self::new("state", FieldKind::Text, vec![Level::Exact], false),
            Self::new("email", FieldKind::Email, vec![Level::Exact], false),
            Self::new("phone", FieldKind::Phone, vec![Level::Exact], false),
        ]
    }
}

fn date_levels() -> Vec<Level> {
    vec![
        Level::Exact,
        Level::Levenshtein { max: 1 },
        Level::DateTransposed,
        Level::Levenshtein { max: 2 },
    ]
}

/// Grades two present, normalized values: the index of the first level that holds, or
/// `levels.len()` for `else`. Similarities are computed at most once per pair, and not at all
/// when a cheap bound already decides the level (most random pairs disagree on everything).
pub fn grade(levels: &[Level], a: &str, b: &str) -> usize {
    grade_screened::<true>(levels, a, b)
}

/// [`grade`], with the bounds tried before each similarity when `SCREEN` (the only way it is
/// called outside tests, which compare both ways).
fn grade_screened<const SCREEN: bool>(levels: &[Level], a: &str, b: &str) -> usize {
    let mut similarity = None;
    let mut similarity_bound = None;
    let mut levenshtein = None;
    let mut levenshtein_bound = None;
    for (index, level) in levels.iter().enumerate() {
        let holds = match *level {
            Level::Exact => a == b,
            Level::JaroWinkler { min } => {
                (!SCREEN
                    || *similarity_bound.get_or_insert_with(|| jaro_winkler_bound(a, b)) >= min)
                    && *similarity.get_or_insert_with(|| jaro_winkler(a, b)) >= min
            }
            Level::Levenshtein { max } => {
                (!SCREEN
                    || *levenshtein_bound.get_or_insert_with(|| levenshtein_lower_bound(a, b))
                        <= max)
                    && *levenshtein.get_or_insert_with(|| levenshtein_distance(a, b)) <= max
            }
            Level::DateTransposed => is_date_transposed(a, b),
        };
        if holds {
            return index;
        }
    }
    levels.len()
}

/// The longest value the byte-wise fast paths take; longer or non-ASCII values go to `strsim`.
const FAST_MAX: usize = 64;

fn fast(x: &[u8], y: &[u8]) -> bool {
    x.len() <= FAST_MAX && y.len() <= FAST_MAX && x.is_ascii() && y.is_ascii()
}

/// How many bytes two ASCII values share, counted with multiplicity (the size of the
/// intersection of their multisets of bytes).
fn common_bytes(x: &[u8], y: &[u8]) -> usize {
    let mut counts = [0u8; 128];
    for p in x {
        counts[usize::from(*p & 0x7f)] += 1;
    }
    let mut common = 0;
    for q in y {
        let count = &mut counts[usize::from(*q & 0x7f)];
        let shared = u8::from(*count > 0);
        *count -= shared;
        common += usize::from(shared);
    }
    common
}

/// A value that `jaro_winkler(a, b)` never exceeds, from the lengths and the bytes the two
/// share: Jaro pairs equal bytes one to one, so it finds at most `common_bytes` matches, and
/// with `m` matches it is at most `(m/|a| + m/|b| + 1) / 3`. Floating-point division,
/// addition and multiplication round monotonically, so the bound computed the way Jaro is
/// computed is at least Jaro's computed value; the Winkler boost grows with the similarity,
/// and a margin far above any rounding covers its last steps. Infinite (no screen) where
/// `jaro_winkler` goes to `strsim`.
fn jaro_winkler_bound(a: &str, b: &str) -> f64 {
    const MARGIN: f64 = 1e-9;
    let (x, y) = (a.as_bytes(), b.as_bytes());
    if x.is_empty() || y.is_empty() || !fast(x, y) {
        return f64::INFINITY;
    }
    let common = common_bytes(x, y);
    if common == 0 {
        // No matches: Jaro and Jaro-Winkler are exactly 0.
        return 0.0;
    }
    let (m, a_len, b_len) = (common as f64, x.len() as f64, y.len() as f64);
    let jaro = ((m / a_len) + (m / b_len) + 1.0) / 3.0;
    let bound = if jaro > 0.7 {
        let prefix = x.iter().take(4).zip(y).take_while(|(p, q)| p == q).count();
        jaro + 0.1 * prefix as f64 * (1.0 - jaro)
    } else {
        jaro
    };
    bound + MARGIN
}

/// A value that the Levenshtein distance is never below: every byte of the longer value that
/// the alignment does not keep unchanged costs an edit, and it keeps at most the bytes the
/// two share. 0 (no screen) where the distance goes to `strsim`.
fn levenshtein_lower_bound(a: &str, b: &str) -> usize {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    if !fast(x, y) {
        return 0;
    }
    x.len().max(y.len()) - common_bytes(x, y)
}

/// The Levenshtein distance exactly as `strsim::levenshtein` computes it (the same recurrence),
/// on bytes and without its allocation when both values are ASCII and at most 64 bytes long.
fn levenshtein_distance(a: &str, b: &str) -> usize {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    if !fast(x, y) {
        return strsim::levenshtein(a, b);
    }
    // Distances never exceed 64 here, so a byte holds each.
    let mut cache = [0u8; FAST_MAX];
    for (j, slot) in cache.iter_mut().enumerate().take(y.len()) {
        *slot = (j + 1) as u8;
    }
    let mut result = y.len() as u8;
    for (i, p) in x.iter().enumerate() {
        result = (i + 1) as u8;
        let mut distance_b = i as u8;
        for (q, slot) in y.iter().zip(cache.iter_mut()) {
            let distance_a = distance_b + u8::from(p != q);
            distance_b = *slot;
            result = (result + 1).min(distance_a.min(distance_b + 1));
            *slot = result;
        }
    }
    usize::from(result)
}

/// Jaro-Winkler similarity exactly as `strsim::jaro_winkler` computes it (the same operations
/// in the same order, so the same `f64`), without its allocation and char decoding when both
/// values are ASCII and at most 64 bytes long (names and addresses almost always are). Training
/// grades a million random pairs, and `strsim`'s generic Jaro was most of its time.
fn jaro_winkler(a: &str, b: &str) -> f64 {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    if !fast(x, y) {
        return strsim::jaro_winkler(a, b);
    }
    let sim = jaro_ascii(x, y);
    if sim > 0.7 {
        let prefix = x.iter().take(4).zip(y).take_while(|(p, q)| p == q).count();
        sim + 0.1 * prefix as f64 * (1.0 - sim)
    } else {
        sim
    }
}

/// `strsim::generic_jaro` over at most 64 bytes a side, with bit sets for its match flags.
fn jaro_ascii(a: &[u8], b: &[u8]) -> f64 {
    let (a_len, b_len) = (a.len(), b.len());
    if a_len == 0 && b_len == 0 {
        return 1.0;
    } else if a_len == 0 || b_len == 0 {
        return 0.0;
    }
    let search_range = (a_len.max(b_len) / 2).saturating_sub(1);
    // Where each byte occurs in `b`: a byte of `a` matches the first unmatched occurrence
    // within its window, found with a mask instead of a scan.
    let mut positions = [0u64; 128];
    for (j, q) in b.iter().enumerate() {
        positions[usize::from(*q)] |= 1 << j;
    }
    let (mut a_flags, mut b_flags) = (0u64, 0u64);
    let mut matches = 0_usize;
    for (i, p) in a.iter().enumerate() {
        let low = i.saturating_sub(search_range);
        let high = b_len.min(i + search_range + 1);
        if high <= low {
            continue;
        }
        let window = (u64::MAX >> (64 - (high - low))) << low;
        let free = positions[usize::from(*p)] & window & !b_flags;
        if free != 0 {
            a_flags |= 1 << i;
            b_flags |= free & free.wrapping_neg();
            matches += 1;
        }
    }
    if matches == 0 {
        return 0.0;
    }
    // The matched bytes of each side, in order: a pair that differs is half a transposition.
    let mut transpositions = 0_usize;
    let mut next_b = 0;
    for (i, p) in a.iter().enumerate() {
        if a_flags & (1 << i) == 0 {
            continue;
        }
        while b_flags & (1 << next_b) == 0 {
            next_b += 1;
        }
        if *p != b[next_b] {
            transpositions += 1;
        }
        next_b += 1;
    }
    transpositions /= 2;
    ((matches as f64 / a_len as f64)
        + (matches as f64 / b_len as f64)
        + ((matches - transpositions) as f64 / matches as f64))
        / 3.0
}

fn is_date_transposed(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == 8
        && b.len() == 8
        && a[..4] == b[..4]
        && a[4..6] == b[6..8]
        && a[6..8] == b[4..6]
        && a[4..6] != a[6..8]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<Level> {
        ComparisonConfig::person_defaults()[0].levels.clone()
    }

    #[test]
    fn names_grade_into_jaro_winkler_bands() {
        let levels = names();
        assert_eq!(grade(&levels, "katherine", "katherine"), 0);
        assert_eq!(grade(&levels, "katherine", "katharine"), 1);
        assert_eq!(grade(&levels, "jon", "john"), 1);
        assert_eq!(grade(&levels, "smith", "smyth"), 2);
        assert_eq!(grade(&levels, "martha", "marhta"), 1);
        assert_eq!(grade(&levels, "dwayne", "duane"), 3);
        assert_eq!(grade(&levels, "alice", "zoe"), 4);
    }

    #[test]
    fn dates_grade_typos_and_swaps() {
        let levels = date_levels();
        assert_eq!(grade(&levels, "19560409", "19560409"), 0);
        assert_eq!(grade(&levels, "19560409", "19560408"), 1);
        assert_eq!(grade(&levels, "19560409", "19560904"), 2);
        assert_eq!(grade(&levels, "19560409", "19650409"), 3);
        assert_eq!(grade(&levels, "19560409", "20011231"), 4);
        // The same day and month is no swap.
        assert!(!is_date_transposed("19560404", "19560404"));
    }

    proptest::proptest! {
        /// The same value as `strsim`, bit for bit, so models and scores do not change: short
        /// strings over a small alphabet (many matches and transpositions), long ones, and
        /// non-ASCII ones (which go to `strsim` itself).
        #[test]
        fn jaro_winkler_is_strsim_s(
            a in "[abcé]{0,12}|[a-e ]{0,70}",
            b in "[abcé]{0,12}|[a-e ]{0,70}",
        ) {
            proptest::prop_assert_eq!(
                jaro_winkler(&a, &b).to_bits(),
                strsim::jaro_winkler(&a, &b).to_bits(),
                "{:?} {:?}", a, b
            );
        }
    }

    /// Names with the usual typing errors (swapped, dropped and doubled letters).
    const NAMES: [&str; 16] = [
        "",
        "a",
        "katherine",
        "katharine",
        "jon",
        "john",
        "smith",
        "smyth",
        "martha",
        "marhta",
        "dwayne",
        "duane",
        "dixon",
        "dicksonx",
        "crate",
        "trace",
    ];

    #[test]
    fn jaro_winkler_matches_strsim_on_names() {
        let names: Vec<&str> = NAMES
            .into_iter()
            .chain([
                "wallaby place",
                "pridhamstreet",
                "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijkl",
            ])
            .collect();
        for &a in &names {
            for &b in &names {
                assert_eq!(
                    jaro_winkler(a, b).to_bits(),
                    strsim::jaro_winkler(a, b).to_bits(),
                    "{a:?} {b:?}"
                );
            }
        }
    }

    /// Every kind of band the defaults use, and bands at many more thresholds, so a screen
    /// that is wrong anywhere in `[0, 1]` or at small distances changes some level.
    fn level_sets() -> Vec<Vec<Level>> {
        let mut sets: Vec<Vec<Level>> = ComparisonConfig::person_defaults()
            .into_iter()
            .map(|c| c.levels)
            .collect();
        sets.push(
            (0..=100)
                .rev()
                .map(|n| Level::JaroWinkler {
                    min: f64::from(n) / 100.0,
                })
                .collect(),
        );
        sets.push((0..=6).map(|max| Level::Levenshtein { max }).collect());
        sets
    }

    /// The level with the screens equals the level without them, for every level set, and at
    /// thresholds placed exactly on the pair's own similarity and distance (and one step
    /// either side), where a bound that is only nearly right would show.
    fn assert_screens_exact(a: &str, b: &str) {
        for levels in level_sets() {
            assert_eq!(
                grade_screened::<true>(&levels, a, b),
                grade_screened::<false>(&levels, a, b),
                "{a:?} {b:?} {levels:?}"
            );
        }
        let similarity = jaro_winkler(a, b);
        let distance = levenshtein_distance(a, b);
        let tight = [
            Level::JaroWinkler {
                min: similarity.next_up(),
            },
            Level::JaroWinkler { min: similarity },
            Level::Levenshtein {
                max: distance.saturating_sub(1),
            },
            Level::Levenshtein { max: distance },
        ];
        for skip in 0..tight.len() {
            let levels = &tight[skip..];
            assert_eq!(
                grade_screened::<true>(levels, a, b),
                grade_screened::<false>(levels, a, b),
                "{a:?} {b:?} {levels:?}"
            );
        }
        assert!(jaro_winkler_bound(a, b) >= similarity, "{a:?} {b:?}");
        assert!(levenshtein_lower_bound(a, b) <= distance, "{a:?} {b:?}");
        assert_eq!(distance, strsim::levenshtein(a, b), "{a:?} {b:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// The screens never change a level: short values over a small alphabet (many shared
        /// letters, transpositions, near misses), names and codes, empty values, very different
        /// lengths, values past the fast path's 64 bytes, and non-ASCII ones.
        #[test]
        fn screens_never_change_a_level(
            a in "[abc]{0,8}|[a-z ]{0,16}|[0-9]{0,9}|[abé漢]{0,6}|[ab]{60,70}",
            b in "[abc]{0,8}|[a-z ]{0,16}|[0-9]{0,9}|[abé漢]{0,6}|[ab]{60,70}",
        ) {
            assert_screens_exact(&a, &b);
        }

        /// The same for a value and a slightly edited copy, which land in every band.
        #[test]
        fn screens_never_change_the_level_of_near_copies(
            a in "[a-h]{1,12}|[0-9]{4,8}",
            edits in proptest::collection::vec((0_usize..16, 0_u8..4, "[a-h0-9]"), 0..3),
        ) {
            let mut b: Vec<char> = a.chars().collect();
            for (at, op, c) in &edits {
                let at = at % (b.len() + 1);
                let c = c.chars().next().unwrap();
                match op {
                    0 => b.insert(at, c),
                    1 if at < b.len() => { b.remove(at); }
                    2 if at < b.len() => b[at] = c,
                    _ if at + 1 < b.len() => b.swap(at, at + 1),
                    _ => {}
                }
            }
            let b: String = b.into_iter().collect();
            assert_screens_exact(&a, &b);
            assert_screens_exact(&b, &a);
        }
    }

    #[test]
    fn screens_never_change_a_level_on_names() {
        let values: Vec<&str> = NAMES
            .into_iter()
            .chain([
                "abc",
                "abd",
                "wallaby place",
                "wallaby plaec",
                "19560409",
                "19560904",
                "19650409",
                "2600",
                "2606",
                "26",
                "ébène",
                "ebene",
                "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijkl",
                "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijklm",
            ])
            .collect();
        for &a in &values {
            for &b in &values {
                assert_screens_exact(a, b);
            }
        }
    }

    #[test]
    fn codes_allow_one_edit() {
        let levels = vec![Level::Exact, Level::Levenshtein { max: 1 }];
        assert_eq!(grade(&levels, "2600", "2600"), 0);
        assert_eq!(grade(&levels, "2600", "2606"), 1);
        assert_eq!(grade(&levels, "2600", "2066"), 2);
    }
}
