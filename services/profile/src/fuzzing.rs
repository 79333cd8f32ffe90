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
/// {name: number}}`, each optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Profile {
    traits: BTreeMap<String, Value>,
    computed: BTreeMap<String, Value>,
    scores: BTreeMap<String, f64>,
}

/// Parses definitions and evaluates them against a profile: the bytes before the first `0xFF`
/// (never in UTF-8) are a JSON audience condition, a computed trait or a single test, as the
/// API and config take them; the rest is the profile. Returns whether an audience compiled.
pub fn conditions(data: &[u8]) -> bool {
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
    // The same values as the traits of one account, so account tests see them too.
    let account = Value::Object(
        traits
            .iter()
            .map(|(name, t)| (name.clone(), t.value.clone()))
            .collect(),
    );
    let facts = Facts {
        traits: &traits,
        computed: &computed,
        scores: &scores,
        accounts: &[&account],
    };
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
    let Ok(condition) = serde_json::from_slice::<Condition>(definition) else {
        return false;
    };
    let Ok(audiences) = Audiences::compile(vec![Audience {
        name: "fuzz".to_owned(),
        condition,
    }]) else {
        return false;
    };
    let members = audiences.members(facts);
    assert!(members.len() <= 1);
    true
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
            compiled += usize::from(conditions(&bytes));
        }
        assert!(compiled > 0, "no seed is a usable audience condition");
    }
}
