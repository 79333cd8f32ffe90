//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, nightly) and for the stable test
//! that replays their seeds and regression inputs. Each runs the production code a request or a
//! definition goes through before any database is touched; none is part of the service's API.

use std::collections::BTreeMap;

use prost::Message as _;
use serde_json::Value;
use tessera_proto::profile::v1 as pb;
use time::OffsetDateTime;

use crate::audience::{Audience, Audiences, Condition, Facts, Test};
use crate::computed::{ComputedTrait, ComputedValue};
use crate::convert::{Lookup, ReadMask, timeline_request};
use crate::definitions::api::fuzz_request as definition_request;
use crate::domain::{Score, TraitValue};
use crate::store::{AccountValues, Accounts, Definitions};

/// The request messages of the profile service's public RPCs, in the order [`grpc_request`]
/// picks them by.
pub const GRPC_REQUESTS: [&str; 23] = [
    "ProfileService/GetProfile",
    "ProfileService/BatchGetProfiles",
    "ProfileService/SearchProfiles",
    "ProfileService/ExportProfile",
    "ProfileService/DeleteProfile",
    "ProfileService/ListProfileEvents",
    "ProfileService/ListAudiences",
    "ProfileService/GetAccount",
    "ProfileService/ListAccountMembers",
    "ProfileService/ListAudienceMembers",
    "ProfileService/WatchProfileChanges",
    "DefinitionService/CreateComputedTrait",
    "DefinitionService/UpdateComputedTrait",
    "DefinitionService/DeleteComputedTrait",
    "DefinitionService/GetComputedTrait",
    "DefinitionService/ListComputedTraits",
    "DefinitionService/CreateAudience",
    "DefinitionService/UpdateAudience",
    "DefinitionService/DeleteAudience",
    "DefinitionService/GetAudience",
    "DefinitionService/ListAudienceDefinitions",
    "DestinationService/ListDeadLetters",
    "DestinationService/ReplayDeadLetters",
];

/// A profile lookup as GetProfile checks it.
fn lookup(request: pb::GetProfileRequest) {
    let pb::GetProfileRequest {
        lookup,
        as_of,
        read_mask,
    } = request;
    let _ = ReadMask::from_pb(read_mask);
    if let Some(as_of) = as_of {
        let _ = tessera_proto::convert::storable_time(&as_of);
    }
    let _ = Lookup::try_from(pb::GetProfileRequest {
        lookup,
        as_of: None,
        read_mask: None,
    });
}

/// Decodes `data` as the request message of RPC `selector` (modulo [`GRPC_REQUESTS`]), as
/// tonic's codec does, then runs the conversions and checks its handler makes first.
pub fn grpc_request(selector: u8, data: &[u8]) {
    use pb::get_profile_request::Lookup as G;
    match usize::from(selector) % GRPC_REQUESTS.len() {
        0 => {
            if let Ok(r) = pb::GetProfileRequest::decode(data) {
                lookup(r);
            }
        }
        1 => {
            if let Ok(r) = pb::BatchGetProfilesRequest::decode(data) {
                r.lookups.into_iter().for_each(lookup);
            }
        }
        2 => {
            if let Ok(r) = pb::SearchProfilesRequest::decode(data) {
                let _ = ReadMask::from_pb(r.read_mask);
            }
        }
        3 => {
            if let Ok(r) = pb::ExportProfileRequest::decode(data) {
                use pb::export_profile_request::Lookup as E;
                lookup(pb::GetProfileRequest {
                    lookup: r.lookup.map(|l| match l {
                        E::ProfileId(id) => G::ProfileId(id),
                        E::Identifier(id) => G::Identifier(id),
                    }),
                    as_of: None,
                    read_mask: None,
                });
            }
        }
        4 => {
            if let Ok(r) = pb::DeleteProfileRequest::decode(data) {
                use pb::delete_profile_request::Lookup as D;
                lookup(pb::GetProfileRequest {
                    lookup: r.lookup.map(|l| match l {
                        D::ProfileId(id) => G::ProfileId(id),
                        D::Identifier(id) => G::Identifier(id),
                    }),
                    as_of: None,
                    read_mask: None,
                });
            }
        }
        5 => {
            if let Ok(r) = pb::ListProfileEventsRequest::decode(data) {
                let _ = timeline_request(r);
            }
        }
        6 => drop(pb::ListAudiencesRequest::decode(data)),
        7 => drop(pb::GetAccountRequest::decode(data)),
        8 => drop(pb::ListAccountMembersRequest::decode(data)),
        9 => drop(pb::ListAudienceMembersRequest::decode(data)),
        10 => drop(pb::WatchProfileChangesRequest::decode(data)),
        11 => {
            if let Ok(r) = pb::CreateComputedTraitRequest::decode(data) {
                definition_request(r.computed_trait, None, None);
            }
        }
        12 => {
            if let Ok(r) = pb::UpdateComputedTraitRequest::decode(data) {
                definition_request(r.computed_trait, None, Some(r.expected_version));
            }
        }
        13 => {
            if let Ok(r) = pb::DeleteComputedTraitRequest::decode(data) {
                definition_request(None, None, Some(r.expected_version));
            }
        }
        14 => drop(pb::GetComputedTraitRequest::decode(data)),
        15 => drop(pb::ListComputedTraitsRequest::decode(data)),
        16 => {
            if let Ok(r) = pb::CreateAudienceRequest::decode(data) {
                definition_request(None, r.audience, None);
            }
        }
        17 => {
            if let Ok(r) = pb::UpdateAudienceRequest::decode(data) {
                definition_request(None, r.audience, Some(r.expected_version));
            }
        }
        18 => {
            if let Ok(r) = pb::DeleteAudienceRequest::decode(data) {
                definition_request(None, None, Some(r.expected_version));
            }
        }
        19 => drop(pb::GetAudienceRequest::decode(data)),
        20 => drop(pb::ListAudienceDefinitionsRequest::decode(data)),
        21 => drop(pb::ListDeadLettersRequest::decode(data)),
        _ => drop(pb::ReplayDeadLettersRequest::decode(data)),
    }
}

/// What a `conditions` input gives a profile: `{"traits": {..}, "computed": {..}, "scores":
/// {name: number}, "accounts": [..], "account_computed": [..]}`, each optional. Without
/// `accounts` the person belongs to one account whose traits are the person's.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Profile {
    traits: BTreeMap<String, Value>,
    computed: BTreeMap<String, Value>,
    scores: BTreeMap<String, f64>,
    accounts: Option<Vec<AccountInput>>,
    /// The account computed traits declared, as `[[profile.account_computed_traits]]` takes
    /// them; those config would refuse (a problem, a repeated name) are left out.
    account_computed: Vec<ComputedTrait>,
}

/// One account the person belongs to: its id (`account-<index>` when absent), its traits, the
/// values of its account computed traits (only those declared count, as the store computes
/// no others) and until when they hold (Unix seconds).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct AccountInput {
    id: Option<String>,
    traits: BTreeMap<String, Value>,
    computed: BTreeMap<String, Value>,
    until: Option<i64>,
}

/// Parses definitions and evaluates them against a profile: the bytes before the first `0xFF`
/// (never in UTF-8) are a JSON audience condition, a computed trait or a single test, as the
/// API and config take them; the rest is the profile. Returns whether the profile is a member
/// of the audience, `None` when none compiled.
pub fn conditions(data: &[u8]) -> Option<bool> {
    let (definition, profile) = match data.iter().position(|b| *b == 0xFF) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b"{}"[..]),
    };
    let profile: Profile = serde_json::from_slice(profile).unwrap_or_default();
    let at = OffsetDateTime::UNIX_EPOCH;
    let traits: BTreeMap<_, _> = profile
        .traits
        .into_iter()
        .map(|(name, value)| {
            let value = TraitValue {
                value,
                observed_at: at,
                event_id: "e".to_owned(),
            };
            (name, value)
        })
        .collect();
    let computed: BTreeMap<_, _> = profile
        .computed
        .into_iter()
        .map(|(name, value)| {
            let value = ComputedValue {
                value,
                observed_at: None,
            };
            (name, value)
        })
        .collect();
    let scores: BTreeMap<_, _> = profile
        .scores
        .into_iter()
        .map(|(name, value)| {
            let score = Score {
                name: name.clone(),
                value,
                computed_at: at,
                model_version: String::new(),
                factors: Vec::new(),
            };
            (name, score)
        })
        .collect();
    // A single test, as scoring rules and audiences write them.
    if let Ok(test) = serde_json::from_slice::<Test>(definition) {
        let _ = test.problem();
        let _ = test.holds(traits.get(&test.name).map(|t| &t.value));
        // Absent: only `ne` and `missing` hold.
        let absent = test.holds(None);
        assert_eq!(
            absent,
            matches!(
                test.op,
                crate::audience::Op::Ne | crate::audience::Op::Missing
            )
        );
    }
    if let Ok(computed) = serde_json::from_slice::<ComputedTrait>(definition) {
        let _ = computed.problem();
    }
    // The audience API's form: the condition as JSON, converted and checked like a create.
    let audience = pb::AudienceDefinition {
        name: "fuzz".to_owned(),
        condition_json: String::from_utf8_lossy(definition).into_owned(),
        ..pb::AudienceDefinition::default()
    };
    definition_request(None, Some(audience), None);
    let condition = serde_json::from_slice::<Condition>(definition).ok()?;
    let audiences = Audiences::compile(vec![Audience {
        name: "fuzz".to_owned(),
        condition,
    }])
    .ok()?;
    // The person's accounts' values, copied onto the profile as a write does, then read back
    // by the account tests as audiences read them.
    let accounts = profile.accounts.unwrap_or_else(|| {
        vec![AccountInput {
            traits: traits
                .iter()
                .map(|(name, t)| (name.clone(), t.value.clone()))
                .collect(),
            ..AccountInput::default()
        }]
    });
    let mut names = std::collections::BTreeSet::new();
    let declared: Vec<ComputedTrait> = profile
        .account_computed
        .into_iter()
        .filter(|c| c.problem().is_none() && names.insert(c.name.clone()))
        .collect();
    let defs = Definitions::new(Vec::new(), audiences).with_account_computed(declared);
    let mut person = crate::domain::Profile::empty("p", at);
    let (stored, values) = account_inputs(&defs, accounts, &mut person);
    defs.copy_account_traits(&mut person.state.computed, &stored, &values);
    check_account_copies(&defs, &person, &stored, &values);
    assert!(
        !defs.copy_account_traits(&mut person.state.computed, &stored, &values),
        "copying the same accounts again changed the profile"
    );
    let _ = defs.valid_until(&person, at);
    let _ = defs.fingerprint();
    let _ = defs.windowed();
    let copies: Vec<&Value> = person
        .state
        .computed
        .account_traits()
        .map(|(_, values)| values)
        .collect();
    let facts = Facts {
        traits: &traits,
        computed: &computed,
        scores: &scores,
        accounts: &copies,
    };
    let members = defs.audiences.members(facts);
    assert!(members.len() <= 1);
    Some(!members.is_empty())
}

/// Makes the person a member of each account (a group call) and gives back the accounts as
/// the store reads them and the values of the account computed traits the audiences read (the
/// store computes every declared one; the members' copies keep only these).
fn account_inputs(
    defs: &Definitions,
    accounts: Vec<AccountInput>,
    person: &mut crate::domain::Profile,
) -> (Accounts, AccountValues) {
    let at = OffsetDateTime::UNIX_EPOCH;
    let read: std::collections::BTreeSet<&str> = defs
        .audience_account_computed()
        .map(|c| c.name.as_str())
        .collect();
    let (mut stored, mut values) = (Accounts::new(), AccountValues::new());
    for (index, account) in accounts.into_iter().enumerate() {
        let id = account.id.unwrap_or_else(|| format!("account-{index}"));
        let group = crate::domain::ResolvedEvent {
            event_id: format!("g{index}"),
            profile_id: person.profile_id.clone(),
            timestamp: at,
            traits: serde_json::Map::new(),
            identifiers: Vec::new(),
            details: crate::domain::EventDetails {
                kind: "group".to_owned(),
                group_id: id.clone(),
                ..crate::domain::EventDetails::default()
            },
        };
        person.state.computed.apply_account(&group);
        let traits = account
            .traits
            .into_iter()
            .map(|(name, value)| {
                let value = TraitValue {
                    value,
                    observed_at: at,
                    event_id: "e".to_owned(),
                };
                (name, value)
            })
            .collect();
        let computed = account
            .computed
            .into_iter()
            .filter(|(name, _)| read.contains(name.as_str()))
            .map(|(name, value)| {
                let value = ComputedValue {
                    value,
                    observed_at: None,
                };
                (name, value)
            })
            .collect();
        let until = account
            .until
            .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok());
        stored.insert(
            id.clone(),
            crate::account::Account {
                account_id: id.clone(),
                traits,
                scores: BTreeMap::new(),
                version: 1,
                created_at: at,
                updated_at: at,
            },
        );
        values.insert(id, (computed, until));
    }
    (stored, values)
}

/// The copy of each account the person belongs to holds exactly what the account tests read:
/// an account computed trait's value over an account trait of its name.
fn check_account_copies(
    defs: &Definitions,
    person: &crate::domain::Profile,
    stored: &Accounts,
    values: &AccountValues,
) {
    let names = defs.audiences.account_traits();
    let state = &person.state.computed;
    let copies: BTreeMap<&str, &Value> = state.account_traits().collect();
    if names.is_empty() {
        assert!(copies.is_empty(), "a copy without an account test");
        return;
    }
    assert!(
        copies
            .keys()
            .copied()
            .eq(state.accounts().map(|(id, _)| id)),
        "not one copy per account"
    );
    for (id, copy) in copies {
        let copy = copy.as_object().expect("a copy is an object");
        assert!(copy.keys().all(|name| names.contains(name)));
        for name in names {
            let expected = values
                .get(id)
                .and_then(|(computed, _)| computed.get(name))
                .map(|c| &c.value)
                .or_else(|| {
                    let account = stored.get(id)?;
                    account.traits.get(name).map(|t| &t.value)
                });
            assert_eq!(copy.get(name), expected, "account {id}, {name}");
        }
    }
}

#[cfg(test)]
mod tests {
    use tessera_testkit::fuzz_inputs as inputs;

    use super::*;

    #[test]
    fn every_committed_profile_grpc_request_is_handled() {
        // The grpc_requests target gives selectors with the high bit set to the profile service.
        let inputs: Vec<_> = inputs("grpc_requests")
            .into_iter()
            .filter(|(_, b)| b.first().is_some_and(|s| s & 0x80 != 0))
            .collect();
        assert!(!inputs.is_empty(), "the grpc_requests seeds are missing");
        for (path, bytes) in inputs {
            eprintln!("{}", path.display());
            grpc_request(bytes[0] & 0x7f, &bytes[1..]);
        }
    }

    #[test]
    fn every_committed_conditions_input_is_handled() {
        let inputs = inputs("conditions");
        assert!(!inputs.is_empty(), "the conditions seeds are missing");
        let mut compiled = 0;
        for (path, bytes) in inputs {
            eprintln!("{}", path.display());
            compiled += usize::from(conditions(&bytes).is_some());
        }
        assert!(compiled > 0, "no seed is a usable audience condition");
    }

    #[test]
    fn account_tests_read_the_declared_account_computed_traits_over_traits() {
        let input = |accounts: serde_json::Value, declared: serde_json::Value| {
            let mut bytes =
                br#"{"account": {"name": "orders_30d", "op": "gte", "value": 3}}"#.to_vec();
            bytes.push(0xFF);
            let profile = serde_json::json!({"accounts": accounts, "account_computed": declared});
            bytes.extend(serde_json::to_vec(&profile).unwrap());
            conditions(&bytes)
        };
        let orders = serde_json::json!([{"name": "orders_30d", "kind": "count"}]);
        let acme = serde_json::json!({"id": "acme", "traits": {"orders_30d": 100},
            "computed": {"orders_30d": 2}});
        let globex = serde_json::json!({"id": "globex", "computed": {"orders_30d": 4}});
        assert_eq!(
            input(serde_json::json!([acme, globex]), orders.clone()),
            Some(true)
        );
        assert_eq!(
            input(serde_json::json!([acme]), orders.clone()),
            Some(false),
            "the declared account computed trait wins over the account trait"
        );
        assert_eq!(
            input(serde_json::json!([acme]), serde_json::json!([])),
            Some(true),
            "undeclared, the account trait is read"
        );
        assert_eq!(input(serde_json::json!([]), orders), Some(false));
    }
}
