//! Entry points for the fuzz target `identifiers` in `fuzz/` (cargo-fuzz, nightly) and for the
//! stable test that replays its seeds and regression inputs; not part of the service's API.

use std::collections::BTreeMap;

use tessera_core::Identifier;

use crate::domain::rules::{BlocklistConfig, EmailConfig, PhoneConfig};
use crate::domain::{Normalized, Rules, RulesConfig, normalize};

/// The identifier types an input picks from: built-in, custom, unknown and malformed.
const TYPES: [&str; 8] = [
    "email",
    "phone",
    "user_id",
    "anonymous_id",
    "device_id",
    "crm_id",
    "loyalty_card",
    "Not A Type",
];

/// The regions of numbers without a country code an input picks from.
const REGIONS: [&str; 4] = ["US", "GB", "DE", "IN"];

/// The eight rule sets the first byte picks from (bit 0: Gmail folding, bits 1-2: the default
/// phone region), compiled once: compiling per input (regexes, the junk lists) made the target
/// run at about a hundred inputs a second.
fn fuzz_rules() -> &'static [Rules] {
    static RULES: std::sync::OnceLock<Vec<Rules>> = std::sync::OnceLock::new();
    RULES.get_or_init(|| {
        (0u8..8)
            .map(|selector| {
                let config = RulesConfig {
                    custom_types: vec!["crm_id".to_owned()],
                    email: EmailConfig {
                        fold_gmail: selector & 1 != 0,
                    },
                    phone: PhoneConfig {
                        default_region: REGIONS[usize::from(selector >> 1) & 3].to_owned(),
                    },
                    blocklist: BTreeMap::from([(
                        "crm_id".to_owned(),
                        BlocklistConfig {
                            exact: vec!["none".to_owned()],
                            regex: vec!["^0+$".to_owned(), "(?i)^test".to_owned()],
                        },
                    )]),
                    ..RulesConfig::default()
                };
                Rules::compile(config).expect("the fuzz rules compile")
            })
            .collect()
    })
}

/// Normalizes one identifier under rules picked by the first byte (bit 0: Gmail folding, bits
/// 1-2: the default phone region, bits 3-5: the type; bit 7 set: the rest is instead a
/// `RulesConfig` as JSON, compiled). Checks that a normalized value normalizes to itself.
pub fn normalize_identifier(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector & 0x80 != 0 {
        if let Ok(config) = serde_json::from_slice::<RulesConfig>(rest) {
            let _ = Rules::compile(config);
        }
        return;
    }
    let rules = &fuzz_rules()[usize::from(selector & 7)];
    let kind = TYPES[usize::from(selector >> 3) % TYPES.len()].to_owned();
    let value = String::from_utf8_lossy(rest).into_owned();
    let Ok(first) = normalize(rules, Identifier { kind, value }) else {
        return;
    };
    let identifier = match &first {
        Normalized::Linkable(id) | Normalized::Unlinked(id, _) => id.clone(),
    };
    let again = normalize(rules, identifier);
    assert_eq!(
        again.as_ref().ok(),
        Some(&first),
        "normalizing a normalized identifier changed it"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_committed_identifiers_input_is_handled() {
        for (path, bytes) in tessera_testkit::fuzz_inputs("identifiers") {
            eprintln!("{}", path.display());
            normalize_identifier(&bytes);
        }
    }
}
