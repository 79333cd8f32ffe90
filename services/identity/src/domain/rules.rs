//! The identity rules: which identifier types link profiles, how their values are normalized and
//! blocked, their priority, per-type limits and merge protection. Declared in config
//! (`[identity.rules]`), compiled once into [`Rules`], and versioned by the store (every change
//! gets a new version, and every decision in the graph log names the version it was made under).

use std::collections::{BTreeMap, HashMap, HashSet};

use regex::RegexSet;
use serde::{Deserialize, Serialize};
use tessera_core::FieldViolation;
use tessera_core::identifier::{
    ANONYMOUS_ID, DEVICE_ID, EMAIL, GROUP_ID, PHONE, USER_ID, is_valid_type,
};

/// The identifier types Tessera knows without configuration.
pub const BUILT_IN_TYPES: [&str; 6] = [USER_ID, EMAIL, PHONE, DEVICE_ID, ANONYMOUS_ID, GROUP_ID];

/// Whether an identifier of type `kind`, forgotten with its person (a GDPR deletion), suppresses
/// every later event that carries it: user ids, emails, phones and custom types name the
/// person. Anonymous, device and group ids may be shared (a family computer, a kiosk, a
/// company), so they are only erased: they link nothing, and suppress only an event that
/// carries nothing else.
pub fn suppresses_events(kind: &str) -> bool {
    !matches!(kind, ANONYMOUS_ID | DEVICE_ID | GROUP_ID)
}

/// Placeholder values that SDKs and forms send when they know nothing, blocked for every type
/// (compared case-insensitively, after trimming). Linking on them would fold unrelated people
/// into one profile. All-zero values (`0`, `0000`, the nil UUID) are blocked too.
pub const DEFAULT_BLOCKED: &[&str] = &[
    "null",
    "undefined",
    "none",
    "nil",
    "nan",
    "n/a",
    "na",
    "-",
    "anonymous",
    "guest",
    "unknown",
    "user",
    "test",
    "-1",
    "true",
    "false",
    "{}",
    "[]",
    "[object object]",
    "test@test.com",
    "test@example.com",
    "example@example.com",
    "email@example.com",
    "noreply@example.com",
    "00000000-0000-0000-0000-000000000000",
];

/// The rules as declared (config or API). Every field has a default; unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Identifier types from highest to lowest priority. When a link would break a limit, the
    /// lowest-priority identifier of the message is dropped and the match tried again. Types not
    /// listed rank below every listed type, in name order.
    pub priority: Vec<String>,
    /// Custom identifier types taken from `context.externalIds` (for example `crm_id`).
    /// External ids of other types are ignored.
    pub custom_types: Vec<String>,
    /// Per-type limits: the most values of the type one profile may hold.
    pub limits: BTreeMap<String, LimitConfig>,
    /// Types of which one profile holds at most one value, ever: two profiles that each hold a
    /// different value never merge (a shared device without logout cannot fuse two users).
    pub protected_types: Vec<String>,
    /// Identifiers that stop linking once they are seen with too many profiles.
    pub shared: SharedConfig,
    /// Email normalization.
    pub email: EmailConfig,
    /// Phone normalization.
    pub phone: PhoneConfig,
    /// Whether [`DEFAULT_BLOCKED`] applies to every type.
    pub default_blocklist: bool,
    /// Blocked values per type, on top of the default list.
    pub blocklist: BTreeMap<String, BlocklistConfig>,
    /// How large a late record's closure may be for it to be re-resolved in event-time order.
    /// Left out of the stored form while it has its defaults, so rules registered before it
    /// existed compare equal and an upgrade does not register a new version over an
    /// `UpdateRules` change.
    #[serde(skip_serializing_if = "ReorderConfig::is_default")]
    pub reorder: ReorderConfig,
}

/// The bound on a late record's re-resolution in event-time order: a closure with more profiles
/// or more events than this is not replayed, and the arrival-order outcome stands (a warning
/// and `tessera_identity_reorder_skipped_total` say so). A generic identifier shared by
/// thousands of people makes such closures; replaying one would hold its locks for seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReorderConfig {
    /// The most profiles (canonical and merged) a closure may hold; 0 turns the re-resolution
    /// off (arrival order decides).
    pub max_profiles: u32,
    /// The most events (stored resolutions) a closure may hold.
    pub max_events: u32,
    /// The most distinct identifiers a closure's events may carry. On Postgres each is one
    /// advisory lock held until the commit, in a lock table every session of the server
    /// shares (`max_locks_per_transaction` × `max_connections`, 6,400 by default).
    pub max_identifiers: u32,
}

impl ReorderConfig {
    /// The defaults: a closure this large is re-resolved in about half a second on Postgres and
    /// takes at most a few thousand locks (measured by `examples/reorder_cost.rs`, see the
    /// README).
    pub const DEFAULT: Self = Self {
        max_profiles: 1_000,
        max_events: 10_000,
        max_identifiers: 4_000,
    };

    fn is_default(&self) -> bool {
        *self == Self::DEFAULT
    }
}

impl Default for ReorderConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A per-type limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// The most values one profile may hold.
    pub max: u32,
    /// When set, only values first linked within this many seconds before the event (by event
    /// time) count: "at most 10 new anonymous ids a week".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u64>,
}

/// When an identifier counts as shared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedConfig {
    /// The types the rule applies to.
    pub types: Vec<String>,
    /// An identifier of those types seen with more than this many profiles stops linking: it no
    /// longer brings identifiers or profiles together (events that carry only it still resolve
    /// to the profile that holds it).
    pub after_profiles: u32,
}

/// Email normalization: always trimmed and lower-cased.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    /// Fold Gmail addresses: dots and `+tag` removed from the local part, `googlemail.com` read
    /// as `gmail.com` (`A.Lice+news@GoogleMail.com` ≡ `alice@gmail.com`). Off by default.
    pub fold_gmail: bool,
}

/// Phone normalization: parsed and written as E.164.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhoneConfig {
    /// The ISO 3166 region of numbers written without a country code (`US`: `4155550100` is
    /// `+14155550100`).
    pub default_region: String,
}

/// Blocked values of one type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlocklistConfig {
    /// Exact values, compared case-insensitively after normalization.
    pub exact: Vec<String>,
    /// Regular expressions (Rust `regex` syntax), matched against the normalized value; anchor
    /// them (`^…$`) to match whole values.
    pub regex: Vec<String>,
}

impl Default for RulesConfig {
    fn default() -> Self {
        let limit = |max, window_seconds| LimitConfig {
            max,
            window_seconds,
        };
        Self {
            priority: [USER_ID, EMAIL, PHONE, DEVICE_ID, ANONYMOUS_ID]
                .map(str::to_owned)
                .to_vec(),
            custom_types: Vec::new(),
            limits: BTreeMap::from([
                (USER_ID.to_owned(), limit(1, None)),
                (EMAIL.to_owned(), limit(5, None)),
                (PHONE.to_owned(), limit(5, None)),
                (DEVICE_ID.to_owned(), limit(10, None)),
                (ANONYMOUS_ID.to_owned(), limit(10, Some(7 * 24 * 3_600))),
            ]),
            protected_types: vec![USER_ID.to_owned()],
            shared: SharedConfig::default(),
            email: EmailConfig::default(),
            phone: PhoneConfig::default(),
            default_blocklist: true,
            blocklist: BTreeMap::new(),
            reorder: ReorderConfig::DEFAULT,
        }
    }
}

impl RulesConfig {
    /// Rules that only link: identifiers seen together always end in one profile (no limits,
    /// no protection, nothing shared), so the graph is the union-find of the records in any
    /// order. For tests and for graphs fed only trusted identifiers.
    pub fn linking_only() -> Self {
        Self {
            limits: BTreeMap::new(),
            protected_types: Vec::new(),
            shared: SharedConfig {
                types: Vec::new(),
                after_profiles: 1,
            },
            ..Self::default()
        }
    }
}

impl Default for SharedConfig {
    fn default() -> Self {
        Self {
            types: [ANONYMOUS_ID, DEVICE_ID, EMAIL, PHONE]
                .map(str::to_owned)
                .to_vec(),
            after_profiles: 1,
        }
    }
}

impl Default for PhoneConfig {
    fn default() -> Self {
        Self {
            default_region: "US".to_owned(),
        }
    }
}

/// A limit in force for one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The most values one profile may hold.
    pub max: u32,
    /// Only values first linked within this window before the event count.
    pub window: Option<time::Duration>,
}

/// Compiled blocked values of one type.
#[derive(Debug, Clone)]
struct Blocklist {
    /// Lower-cased.
    exact: HashSet<String>,
    regex: Option<RegexSet>,
}

/// The compiled rules.
#[derive(Debug, Clone)]
pub struct Rules {
    config: RulesConfig,
    rank: HashMap<String, usize>,
    limits: HashMap<String, Limit>,
    shared: HashSet<String>,
    custom: HashSet<String>,
    blocklists: HashMap<String, Blocklist>,
    default_blocked: HashSet<String>,
    pub(crate) region: phonenumber::country::Id,
}

impl Default for Rules {
    fn default() -> Self {
        // The defaults are valid: covered by a test.
        Self::compile(RulesConfig::default()).unwrap_or_else(|_| unreachable!())
    }
}

impl Rules {
    /// Checks and compiles `config`. Violations name the offending key
    /// (`limits.email.max`, `blocklist.email.regex[0]`, ...).
    pub fn compile(config: RulesConfig) -> Result<Self, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let mut custom = HashSet::new();
        for (i, kind) in config.custom_types.iter().enumerate() {
            if !is_valid_type(kind) {
                violations.push(FieldViolation::new(
                    format!("custom_types[{i}]"),
                    "must be 1 to 64 lower-case letters, digits or underscores, starting with a letter",
                ));
            } else if BUILT_IN_TYPES.contains(&kind.as_str()) {
                violations.push(FieldViolation::new(
                    format!("custom_types[{i}]"),
                    format!("`{kind}` is a built-in type"),
                ));
            } else if !custom.insert(kind.clone()) {
                violations.push(FieldViolation::new(
                    format!("custom_types[{i}]"),
                    format!("`{kind}` is listed twice"),
                ));
            }
        }
        let known = |kind: &str| BUILT_IN_TYPES.contains(&kind) || custom.contains(kind);
        let mut rank = HashMap::new();
        for (i, kind) in config.priority.iter().enumerate() {
            if !known(kind) {
                violations.push(unknown_type(format!("priority[{i}]"), kind));
            } else if rank.insert(kind.clone(), i).is_some() {
                violations.push(FieldViolation::new(
                    format!("priority[{i}]"),
                    format!("`{kind}` is listed twice"),
                ));
            }
        }
        let mut limits = HashMap::new();
        for (kind, limit) in &config.limits {
            if !known(kind) {
                violations.push(unknown_type(format!("limits.{kind}"), kind));
            }
            if limit.max == 0 {
                violations.push(FieldViolation::new(
                    format!("limits.{kind}.max"),
                    "must be at least 1",
                ));
            }
            let window = match limit.window_seconds {
                None => None,
                Some(0) => {
                    violations.push(FieldViolation::new(
                        format!("limits.{kind}.window_seconds"),
                        "must be at least 1 when given",
                    ));
                    None
                }
                Some(s) => Some(time::Duration::seconds(
                    i64::try_from(s).unwrap_or(i64::MAX / 1_000_000_000),
                )),
            };
            limits.insert(
                kind.clone(),
                Limit {
                    max: limit.max,
                    window,
                },
            );
        }
        for (i, kind) in config.protected_types.iter().enumerate() {
            if !known(kind) {
                violations.push(unknown_type(format!("protected_types[{i}]"), kind));
            }
            // At most one value, ever: stricter than any limit.
            limits.insert(
                kind.clone(),
                Limit {
                    max: 1,
                    window: None,
                },
            );
        }
        let mut shared = HashSet::new();
        for (i, kind) in config.shared.types.iter().enumerate() {
            if !known(kind) {
                violations.push(unknown_type(format!("shared.types[{i}]"), kind));
            }
            shared.insert(kind.clone());
        }
        if config.shared.after_profiles == 0 {
            violations.push(FieldViolation::new(
                "shared.after_profiles",
                "must be at least 1",
            ));
        }
        let region = config
            .phone
            .default_region
            .to_ascii_uppercase()
            .parse::<phonenumber::country::Id>()
            .unwrap_or_else(|_| {
                violations.push(FieldViolation::new(
                    "phone.default_region",
                    format!(
                        "`{}` is not an ISO 3166 region code",
                        config.phone.default_region
                    ),
                ));
                phonenumber::country::Id::US
            });
        let mut blocklists = HashMap::new();
        for (kind, list) in &config.blocklist {
            if !known(kind) {
                violations.push(unknown_type(format!("blocklist.{kind}"), kind));
            }
            let mut regex = None;
            if !list.regex.is_empty() {
                for (i, pattern) in list.regex.iter().enumerate() {
                    if let Err(e) = regex::Regex::new(pattern) {
                        violations.push(FieldViolation::new(
                            format!("blocklist.{kind}.regex[{i}]"),
                            format!("not a valid regular expression: {e}"),
                        ));
                    }
                }
                regex = RegexSet::new(&list.regex).ok();
            }
            blocklists.insert(
                kind.clone(),
                Blocklist {
                    exact: list.exact.iter().map(|v| v.trim().to_lowercase()).collect(),
                    regex,
                },
            );
        }
        if !violations.is_empty() {
            return Err(violations);
        }
        let default_blocked = if config.default_blocklist {
            DEFAULT_BLOCKED.iter().map(|v| (*v).to_owned()).collect()
        } else {
            HashSet::new()
        };
        Ok(Self {
            config,
            rank,
            limits,
            shared,
            custom,
            blocklists,
            default_blocked,
            region,
        })
    }

    /// The rules as declared.
    pub fn config(&self) -> &RulesConfig {
        &self.config
    }

    /// Whether identifiers of `kind` link profiles: the built-in types and the declared custom
    /// types.
    pub fn links(&self, kind: &str) -> bool {
        BUILT_IN_TYPES.contains(&kind) || self.custom.contains(kind)
    }

    /// Whether `kind` is a declared custom type.
    pub fn is_custom(&self, kind: &str) -> bool {
        self.custom.contains(kind)
    }

    /// Orders types by priority, highest first: listed types in list order, then the others by
    /// name.
    pub fn priority_key<'a>(&self, kind: &'a str) -> (usize, &'a str) {
        match self.rank.get(kind) {
            Some(rank) => (*rank, ""),
            None => (usize::MAX, kind),
        }
    }

    /// The limit on values of `kind` per profile, if any.
    pub fn limit(&self, kind: &str) -> Option<Limit> {
        self.limits.get(kind).copied()
    }

    /// The types that have a limit.
    pub fn limited_types(&self) -> impl Iterator<Item = &str> {
        self.limits.keys().map(String::as_str)
    }

    /// Whether outcomes can depend on the order records are resolved in: some type has a
    /// limit (protected types are limits of one) or may be shared. Only then is a late record
    /// re-resolved in event-time order (see `domain::replay::in_event_time_order`).
    pub fn order_dependent(&self) -> bool {
        !self.limits.is_empty() || !self.shared.is_empty()
    }

    /// How large a late record's closure may be for it to be re-resolved in event-time order.
    pub fn reorder(&self) -> ReorderConfig {
        self.config.reorder
    }

    /// Whether identifiers of `kind` stop linking once shared.
    pub fn may_be_shared(&self, kind: &str) -> bool {
        self.shared.contains(kind)
    }

    /// With how many profiles an identifier may be seen before it counts as shared.
    pub fn shared_after(&self) -> usize {
        usize::try_from(self.config.shared.after_profiles).unwrap_or(usize::MAX)
    }

    /// Whether the normalized `value` of `kind` is blocked: empty, all zeros, in the default
    /// list or in the type's list.
    pub fn is_blocked(&self, kind: &str, value: &str) -> bool {
        if value.is_empty()
            || (value.contains('0') && value.bytes().all(|b| b == b'0' || b == b'-'))
        {
            return true;
        }
        let lower = value.to_lowercase();
        if self.default_blocked.contains(&lower) {
            return true;
        }
        self.blocklists.get(kind).is_some_and(|list| {
            list.exact.contains(&lower) || list.regex.as_ref().is_some_and(|r| r.is_match(value))
        })
    }
}

fn unknown_type(field: String, kind: &str) -> FieldViolation {
    FieldViolation::new(
        field,
        format!("`{kind}` is neither a built-in identifier type nor one of custom_types"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_identifiers_that_name_a_person_suppress_events() {
        for kind in [USER_ID, EMAIL, PHONE, "crm_id"] {
            assert!(suppresses_events(kind), "{kind}");
        }
        for kind in [ANONYMOUS_ID, DEVICE_ID, GROUP_ID] {
            assert!(!suppresses_events(kind), "{kind}");
        }
    }

    #[test]
    fn defaults_compile_and_rank_types() {
        let rules = Rules::default();
        assert!(rules.priority_key(USER_ID) < rules.priority_key(EMAIL));
        assert!(rules.priority_key(DEVICE_ID) < rules.priority_key(ANONYMOUS_ID));
        assert!(rules.priority_key(ANONYMOUS_ID) < rules.priority_key(GROUP_ID));
        assert_eq!(rules.limit(USER_ID).map(|l| l.max), Some(1));
        assert!(rules.limit(ANONYMOUS_ID).and_then(|l| l.window).is_some());
        assert!(rules.may_be_shared(ANONYMOUS_ID));
        assert!(!rules.may_be_shared(USER_ID));
        assert!(rules.links(GROUP_ID));
        assert!(!rules.links("crm_id"));
    }

    #[test]
    fn blocks_junk_and_configured_values() {
        let mut config = RulesConfig::default();
        config.blocklist.insert(
            EMAIL.to_owned(),
            BlocklistConfig {
                exact: vec!["Info@Acme.com".into()],
                regex: vec![r"^.*@mailinator\.com$".into()],
            },
        );
        let rules = Rules::compile(config).unwrap();
        for junk in [
            "",
            "null",
            "NULL",
            "undefined",
            "0",
            "0000",
            "-1",
            "[object Object]",
        ] {
            assert!(rules.is_blocked(USER_ID, junk), "{junk:?}");
        }
        assert!(rules.is_blocked(ANONYMOUS_ID, "00000000-0000-0000-0000-000000000000"));
        assert!(rules.is_blocked(EMAIL, "info@acme.com"));
        assert!(rules.is_blocked(EMAIL, "x@mailinator.com"));
        assert!(!rules.is_blocked(EMAIL, "x@mailinator.company"));
        assert!(!rules.is_blocked(USER_ID, "info@acme.com"), "per type");
        assert!(!rules.is_blocked(USER_ID, "u-100"));

        let rules = Rules::compile(RulesConfig {
            default_blocklist: false,
            ..RulesConfig::default()
        })
        .unwrap();
        assert!(!rules.is_blocked(USER_ID, "guest"));
        assert!(rules.is_blocked(USER_ID, "000"), "all zeros always");
    }

    #[test]
    fn invalid_rules_name_each_key() {
        let mut config = RulesConfig {
            custom_types: vec!["crm_id".into(), "Bad Type".into(), "email".into()],
            priority: vec!["user_id".into(), "nope".into(), "user_id".into()],
            protected_types: vec!["ghost".into()],
            ..RulesConfig::default()
        };
        config.limits.insert(
            "crm_id".into(),
            LimitConfig {
                max: 0,
                window_seconds: Some(0),
            },
        );
        config.blocklist.insert(
            "crm_id".into(),
            BlocklistConfig {
                exact: vec![],
                regex: vec!["(".into()],
            },
        );
        config.phone.default_region = "XX".into();
        config.shared.after_profiles = 0;
        let fields: Vec<String> = Rules::compile(config)
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            [
                "custom_types[1]",
                "custom_types[2]",
                "priority[1]",
                "priority[2]",
                "limits.crm_id.max",
                "limits.crm_id.window_seconds",
                "protected_types[0]",
                "shared.after_profiles",
                "phone.default_region",
                "blocklist.crm_id.regex[0]",
            ]
        );
    }

    /// The default bound is left out of the stored form, so rules stored before the bound
    /// existed compare equal to the same config now (no new version at upgrade); another bound
    /// is kept.
    #[test]
    fn the_reorder_bound_is_stored_only_when_not_the_default() {
        let json = serde_json::to_value(RulesConfig::default()).unwrap();
        assert!(json.get("reorder").is_none(), "{json}");
        let config = RulesConfig {
            reorder: ReorderConfig {
                max_profiles: 10,
                ..ReorderConfig::DEFAULT
            },
            ..RulesConfig::default()
        };
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["reorder"]["max_profiles"], 10);
        assert_eq!(serde_json::from_value::<RulesConfig>(json).unwrap(), config);
        assert!(serde_json::from_str::<RulesConfig>(r#"{"reorder": {"max_profile": 1}}"#).is_err());
    }

    #[test]
    fn config_round_trips_and_refuses_unknown_keys() {
        let config = RulesConfig::default();
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<RulesConfig>(&json).unwrap(), config);
        assert!(serde_json::from_str::<RulesConfig>(r#"{"prority": []}"#).is_err());
        assert!(
            serde_json::from_str::<RulesConfig>(r#"{"limits": {"email": {"max": 2, "windw": 1}}}"#)
                .is_err()
        );
    }
}
