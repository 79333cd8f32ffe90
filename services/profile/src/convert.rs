//! Conversions between protobuf messages and domain types, with request validation. Every
//! conversion destructures its whole message, so a new proto field fails to compile here until
//! someone decides what it means.

use std::collections::{BTreeMap, BTreeSet};

use tessera_core::event::MAX_ID_LEN;
use tessera_core::{EventType, FieldViolation, Identifier, identifier};
use tessera_proto::common::v1 as common;
pub(crate) use tessera_proto::convert::micros;
use tessera_proto::convert::{json_to_value, storable_time, to_timestamp};
use tessera_proto::identity::v1 as identity;
use tessera_proto::profile::v1 as pb;
use tessera_proto::scoring::v1 as scoring;
use time::OffsetDateTime;

use crate::domain::{
    Batch, EventContent, EventDetails, Merge, Profile, ResolvedEvent, Score, ScoreFactor, Split,
};
use crate::error::ProfileError;
use crate::store::{Definitions, TimelineEntry, TimelineQuery};

/// The most events one `ApplyEvents` call may carry.
pub const MAX_EVENTS_PER_REQUEST: usize = 5_000;
/// The most merges one `ApplyEvents` call may carry.
pub const MAX_MERGES_PER_REQUEST: usize = 5_000;

/// A validated `ApplyEventsRequest`.
pub(crate) fn batch(request: pb::ApplyEventsRequest) -> Result<Batch, ProfileError> {
    let pb::ApplyEventsRequest { merges, events } = request;
    for (field, count, max) in [
        ("events", events.len(), MAX_EVENTS_PER_REQUEST),
        ("merges", merges.len(), MAX_MERGES_PER_REQUEST),
    ] {
        if count > max {
            return Err(ProfileError::TooMany { field, count, max });
        }
    }
    let mut violations = Vec::new();
    let mut batch = Batch::default();
    for (i, merge) in merges.into_iter().enumerate() {
        match Merge::try_from(merge) {
            Ok(m) => batch.merges.push(m),
            Err(v) => violations.extend(prefixed(v, &format!("merges[{i}]"))),
        }
    }
    for (i, event) in events.into_iter().enumerate() {
        match ResolvedEvent::try_from(event) {
            Ok(e) => batch.events.push(e),
            Err(v) => violations.extend(prefixed(v, &format!("events[{i}]"))),
        }
    }
    if violations.is_empty() {
        Ok(batch)
    } else {
        Err(ProfileError::InvalidArgument(violations))
    }
}

/// The most events one split may name (a component's whole history).
pub(crate) const MAX_SPLIT_EVENTS: usize = 1_000_000;

/// A validated `SplitProfilesRequest`. Violations name `profiles[i].profile_id`,
/// `events[i].event_id`, `events[i].identifiers[j]`, ...
pub(crate) fn split(request: pb::SplitProfilesRequest) -> Result<Split, ProfileError> {
    let pb::SplitProfilesRequest {
        profiles,
        events,
        erased_event_ids,
    } = request;
    for (field, count) in [
        ("events", events.len()),
        ("erased_event_ids", erased_event_ids.len()),
    ] {
        if count > MAX_SPLIT_EVENTS {
            return Err(ProfileError::TooMany {
                field,
                count,
                max: MAX_SPLIT_EVENTS,
            });
        }
    }
    let mut violations = Vec::new();
    if profiles.is_empty() {
        violations.push(FieldViolation::new("profiles", "required"));
    }
    let mut split = Split::default();
    for (i, p) in profiles.into_iter().enumerate() {
        check_id(
            &p.profile_id,
            &format!("profiles[{i}].profile_id"),
            &mut violations,
        );
        check_id(
            &p.live_profile_id,
            &format!("profiles[{i}].live_profile_id"),
            &mut violations,
        );
        split.profiles.push((p.profile_id, p.live_profile_id));
    }
    for (i, e) in events.into_iter().enumerate() {
        check_id(
            &e.event_id,
            &format!("events[{i}].event_id"),
            &mut violations,
        );
        check_id(
            &e.profile_id,
            &format!("events[{i}].profile_id"),
            &mut violations,
        );
        let mut ids = Vec::with_capacity(e.identifiers.len());
        for (j, id) in e.identifiers.into_iter().enumerate() {
            if id.r#type.is_empty() || id.value.is_empty() {
                violations.push(FieldViolation::new(
                    format!("events[{i}].identifiers[{j}]"),
                    "type and value are required",
                ));
            }
            ids.push(Identifier::new(id.r#type, id.value));
        }
        split.events.push((e.event_id, e.profile_id, ids));
    }
    for (i, event_id) in erased_event_ids.into_iter().enumerate() {
        check_id(
            &event_id,
            &format!("erased_event_ids[{i}]"),
            &mut violations,
        );
        split.erased.push(event_id);
    }
    if violations.is_empty() {
        Ok(split)
    } else {
        violations.truncate(100);
        Err(ProfileError::InvalidArgument(violations))
    }
}

fn prefixed(
    violations: Vec<FieldViolation>,
    prefix: &str,
) -> impl Iterator<Item = FieldViolation> + '_ {
    violations.into_iter().map(move |v| v.prefixed(prefix))
}

fn check_id(value: &str, field: &str, violations: &mut Vec<FieldViolation>) {
    if value.is_empty() {
        violations.push(FieldViolation::new(field, "required"));
    } else if value.len() > MAX_ID_LEN {
        violations.push(FieldViolation::new(
            field,
            format!("longer than {MAX_ID_LEN} bytes"),
        ));
    }
}

impl TryFrom<identity::Merge> for Merge {
    type Error = Vec<FieldViolation>;

    fn try_from(merge: identity::Merge) -> Result<Self, Self::Error> {
        let identity::Merge {
            surviving_profile_id,
            merged_profile_id,
            // Provenance of the identity graph's decision; the profile keeps no merge log.
            cause_event_id: _,
            merged_at: _,
            rule: _,
        } = merge;
        let mut violations = Vec::new();
        check_id(
            &surviving_profile_id,
            "surviving_profile_id",
            &mut violations,
        );
        check_id(&merged_profile_id, "merged_profile_id", &mut violations);
        if !merged_profile_id.is_empty() && merged_profile_id == surviving_profile_id {
            violations.push(FieldViolation::new(
                "merged_profile_id",
                "must differ from surviving_profile_id",
            ));
        }
        if violations.is_empty() {
            Ok(Self {
                surviving_profile_id,
                merged_profile_id,
            })
        } else {
            Err(violations)
        }
    }
}

impl TryFrom<pb::ResolvedEvent> for ResolvedEvent {
    type Error = Vec<FieldViolation>;

    fn try_from(resolved: pb::ResolvedEvent) -> Result<Self, Self::Error> {
        let pb::ResolvedEvent {
            event_id,
            profile_id,
            event,
            identifiers,
            // Traced by the service handler before conversion; applying does not read them.
            trace_parent: _,
            trace_state: _,
        } = resolved;
        let mut violations = Vec::new();
        check_id(&event_id, "event_id", &mut violations);
        check_id(&profile_id, "profile_id", &mut violations);
        let event = match event {
            None => {
                violations.push(FieldViolation::new("event", "required"));
                None
            }
            Some(event) => match tessera_proto::convert::event_from_pb(event) {
                Ok(event) => Some(event),
                Err(v) => {
                    violations.extend(prefixed(v, "event"));
                    None
                }
            },
        };
        let mut ids = Vec::with_capacity(identifiers.len());
        for (j, id) in identifiers.into_iter().enumerate() {
            match identifier_from_proto(id) {
                Ok(id) => ids.push(id),
                Err(v) => violations.extend(prefixed(v, &format!("identifiers[{j}]"))),
            }
        }
        let timestamp = event.as_ref().and_then(|e| e.timestamp);
        if event.is_some() && timestamp.is_none() {
            violations.push(FieldViolation::new("event.timestamp", "required"));
        }
        match (event, timestamp) {
            (Some(event), Some(timestamp)) if violations.is_empty() => Ok(Self {
                event_id,
                profile_id,
                timestamp,
                traits: event.person_traits().cloned().unwrap_or_default(),
                identifiers: ids,
                details: EventDetails::of(&event),
            }),
            (Some(_) | None, Some(_) | None) => Err(violations),
        }
    }
}

/// An identifier from a request: a well-formed type and a non-empty value.
pub(crate) fn identifier_from_proto(
    id: common::Identifier,
) -> Result<Identifier, Vec<FieldViolation>> {
    let common::Identifier { r#type, value } = id;
    let mut violations = Vec::new();
    if !identifier::is_valid_type(&r#type) {
        violations.push(FieldViolation::new(
            "type",
            "1 to 64 lower-case letters, digits or underscores, starting with a letter",
        ));
    }
    check_id(&value, "value", &mut violations);
    if violations.is_empty() {
        Ok(Identifier::new(r#type, value))
    } else {
        Err(violations)
    }
}

/// What `GetProfile` looks a profile up by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// A profile id.
    ProfileId(String),
    /// An identifier, resolved by the identity service.
    Identifier(common::Identifier),
}

impl TryFrom<pb::GetProfileRequest> for Lookup {
    type Error = ProfileError;

    fn try_from(request: pb::GetProfileRequest) -> Result<Self, Self::Error> {
        use pb::get_profile_request::Lookup as L;
        // `as_of` is read by the caller (`Inner::get_profile`).
        let pb::GetProfileRequest {
            lookup,
            as_of: _,
            read_mask: _,
        } = request;
        let invalid = |field: &str, description: &str| {
            ProfileError::InvalidArgument(vec![FieldViolation::new(field, description)])
        };
        match lookup {
            None => Err(invalid("lookup", "profile_id or identifier is required")),
            Some(L::ProfileId(id)) => {
                let mut violations = Vec::new();
                check_id(&id, "profile_id", &mut violations);
                if violations.is_empty() {
                    Ok(Self::ProfileId(id))
                } else {
                    Err(ProfileError::InvalidArgument(violations))
                }
            }
            Some(L::Identifier(id)) => match identifier_from_proto(id.clone()) {
                // The identity service normalizes the value; send it as the client gave it.
                Ok(_) => Ok(Self::Identifier(id)),
                Err(v) => Err(ProfileError::InvalidArgument(
                    prefixed(v, "identifier").collect(),
                )),
            },
        }
    }
}

impl TryFrom<Option<pb::list_profile_events_request::Lookup>> for Lookup {
    type Error = ProfileError;

    fn try_from(
        lookup: Option<pb::list_profile_events_request::Lookup>,
    ) -> Result<Self, Self::Error> {
        use pb::get_profile_request::Lookup as G;
        use pb::list_profile_events_request::Lookup as L;
        Self::try_from(pb::GetProfileRequest {
            lookup: lookup.map(|l| match l {
                L::ProfileId(id) => G::ProfileId(id),
                L::Identifier(id) => G::Identifier(id),
            }),
            as_of: None,
            read_mask: None,
        })
    }
}

/// The page size when a request names none.
pub(crate) const DEFAULT_PAGE_SIZE: usize = 50;
/// The largest page of a timeline.
pub(crate) const MAX_PAGE_SIZE: usize = 1_000;
/// The most types or names a timeline request may filter by.
const MAX_FILTERS: usize = 100;
/// The message types a timeline can be filtered by.
pub(crate) const EVENT_TYPES: [&str; 6] = ["identify", "track", "page", "screen", "group", "alias"];

/// A validated `ListProfileEventsRequest`: the profile and the query (asking one entry more
/// than the page, to tell whether another page follows). Violations name `page_size`,
/// `page_token`, `types[i]`, `event_names[i]`, `start_time`, `end_time`.
pub(crate) fn timeline_request(
    request: pb::ListProfileEventsRequest,
) -> Result<(Lookup, TimelineQuery), ProfileError> {
    let pb::ListProfileEventsRequest {
        lookup,
        types,
        event_names,
        start_time,
        end_time,
        page_size,
        page_token,
    } = request;
    let lookup = Lookup::try_from(lookup)?;
    let mut violations = Vec::new();
    let limit = match usize::try_from(page_size) {
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(n) if n <= MAX_PAGE_SIZE => n,
        Ok(_) | Err(_) => {
            violations.push(FieldViolation::new(
                "page_size",
                format!("between 1 and {MAX_PAGE_SIZE}, or 0 for {DEFAULT_PAGE_SIZE}"),
            ));
            DEFAULT_PAGE_SIZE
        }
    };
    let before = if page_token.is_empty() {
        None
    } else {
        let parsed = parse_page_token(&page_token);
        if parsed.is_none() {
            violations.push(FieldViolation::new(
                "page_token",
                "not a token this API returned",
            ));
        }
        parsed
    };
    check_filters("types", &types, &mut violations);
    for (i, kind) in types.iter().enumerate() {
        if !EVENT_TYPES.contains(&kind.as_str()) {
            violations.push(FieldViolation::new(
                format!("types[{i}]"),
                format!("one of {}", EVENT_TYPES.join(", ")),
            ));
        }
    }
    check_filters("event_names", &event_names, &mut violations);
    let mut time = |field: &str, ts: Option<prost_types::Timestamp>| {
        ts.and_then(|ts| {
            let t = storable_time(&ts);
            if t.is_none() {
                violations.push(FieldViolation::new(
                    field,
                    "not a time between years 1 and 9999",
                ));
            }
            t
        })
    };
    let start = time("start_time", start_time);
    let end = time("end_time", end_time);
    if let (Some(start), Some(end)) = (start, end)
        && end <= start
    {
        violations.push(FieldViolation::new("end_time", "must be after start_time"));
    }
    if !violations.is_empty() {
        return Err(ProfileError::InvalidArgument(violations));
    }
    Ok((
        lookup,
        TimelineQuery {
            types,
            names: event_names,
            start,
            end,
            before,
            limit: limit + 1,
        },
    ))
}

fn check_filters(field: &str, values: &[String], violations: &mut Vec<FieldViolation>) {
    if values.len() > MAX_FILTERS {
        violations.push(FieldViolation::new(
            field,
            format!("at most {MAX_FILTERS} values"),
        ));
    }
    for (i, value) in values.iter().enumerate() {
        if value.is_empty() || value.len() > MAX_ID_LEN {
            violations.push(FieldViolation::new(
                format!("{field}[{i}]"),
                format!("1 to {MAX_ID_LEN} bytes"),
            ));
        }
    }
}

/// The token of the page after `last`: its time (microseconds) and event id.
pub(crate) fn page_token(last: &TimelineEntry) -> String {
    let micros = last.occurred_at.unix_timestamp_nanos() / 1_000;
    format!("{micros}:{}", last.event_id)
}

fn parse_page_token(token: &str) -> Option<(OffsetDateTime, String)> {
    let (micros, event_id) = token.split_once(':')?;
    let micros: i128 = micros.parse().ok()?;
    let at = OffsetDateTime::from_unix_timestamp_nanos(micros.checked_mul(1_000)?).ok()?;
    (!event_id.is_empty()).then(|| (at, event_id.to_owned()))
}

/// One timeline entry as a protobuf event: the kept details, the person traits (a group
/// call's account traits), and the user and anonymous ids from the identifiers it linked.
impl From<TimelineEntry> for pb::TimelineEvent {
    fn from(entry: TimelineEntry) -> Self {
        let TimelineEntry {
            event_id,
            profile_id,
            occurred_at,
            content,
        } = entry;
        let EventContent {
            timestamp: _,
            traits,
            identifiers,
            details,
        } = content;
        let kind = EVENT_TYPES
            .iter()
            .position(|k| *k == details.kind)
            .map_or(EventType::Track, |i| EVENT_KINDS[i]);
        let mut event = tessera_core::Event::new(kind);
        let id_of = |kind: &str| {
            identifiers
                .iter()
                .find(|(k, _)| k == kind)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        event.user_id = id_of("user_id");
        event.anonymous_id = id_of("anonymous_id");
        event.message_id = details.message_id;
        event.event = details.event;
        event.name = details.name;
        event.category = details.category;
        event.group_id = details.group_id;
        event.properties = details.properties;
        event.context = details.context;
        // A group call's own traits describe the account; its person traits came from
        // `context.traits`, which the context still holds.
        event.traits = if kind == EventType::Group {
            details.group_traits
        } else {
            traits
        };
        event.timestamp = Some(occurred_at);
        Self {
            event_id,
            profile_id,
            event: Some(tessera_proto::convert::event_to_pb(&event)),
            identifiers: identifiers
                .into_iter()
                .map(|(r#type, value)| common::Identifier { r#type, value })
                .collect(),
        }
    }
}

/// The domain types of [`EVENT_TYPES`], in the same order.
const EVENT_KINDS: [EventType; 6] = [
    EventType::Identify,
    EventType::Track,
    EventType::Page,
    EventType::Screen,
    EventType::Group,
    EventType::Alias,
];

/// The protobuf form of a live profile, its declared computed traits and its audiences
/// (`defs`) evaluated at `now`.
pub(crate) fn profile_to_pb(
    profile: &Profile,
    defs: &Definitions,
    now: OffsetDateTime,
) -> pb::Profile {
    let computed = defs.declared();
    let mut message = pb::Profile::from(profile);
    message.audiences = defs.members(profile, now);
    for (name, t) in &mut message.traits {
        if let Some(rule) = defs.catalog.get(name) {
            t.class = rule
                .class
                .map(|c| c.as_str().to_owned())
                .unwrap_or_default();
            t.pii = rule.is_pii();
        }
    }
    message.computed_traits = profile
        .state
        .computed
        .values(computed, now)
        .into_iter()
        .map(|(name, v)| {
            let value = pb::ComputedTrait {
                value: Some(json_to_value(&v.value)),
                observed_at: v.observed_at.map(to_timestamp),
            };
            (name, value)
        })
        .collect();
    message.computed_valid_until = defs.valid_until(profile, now).map(to_timestamp);
    message
}

impl From<&Profile> for pb::Profile {
    /// Without computed traits: see [`profile_to_pb`].
    fn from(profile: &Profile) -> Self {
        let Profile {
            profile_id,
            // Only live profiles are returned; a merged one redirects to its survivor.
            merged_into: _,
            state,
            scores,
            merged_profile_ids,
            version,
            // Not part of the API.
            created_at: _,
            updated_at,
            // Evaluated at read time by `profile_to_pb`.
            valid_until: _,
        } = profile;
        let crate::domain::ProfileState {
            traits,
            event_count,
            first_seen,
            last_seen,
            // Internal: exposed through the engagement score instead.
            activity_log2: _,
            identifiers,
            // Evaluated at read time by `profile_to_pb`, but for consent.
            computed,
        } = state;
        Self {
            profile_id: profile_id.clone(),
            identifiers: identifiers
                .iter()
                .map(|i| common::Identifier {
                    r#type: i.kind.clone(),
                    value: i.value.clone(),
                })
                .collect(),
            traits: traits
                .iter()
                .map(|(name, t)| {
                    let trait_ = pb::Trait {
                        value: Some(json_to_value(&t.value)),
                        observed_at: Some(to_timestamp(t.observed_at)),
                        event_id: t.event_id.clone(),
                        // From the catalog, in `profile_to_pb`.
                        class: String::new(),
                        pii: false,
                    };
                    (name.clone(), trait_)
                })
                .collect(),
            event_count: *event_count,
            first_seen: first_seen.map(to_timestamp),
            last_seen: last_seen.map(to_timestamp),
            scores: scores
                .iter()
                .map(|(name, s)| (name.clone(), scoring::Score::from(s)))
                .collect(),
            version: *version,
            updated_at: Some(to_timestamp(*updated_at)),
            merged_profile_ids: merged_profile_ids.clone(),
            computed_traits: std::collections::HashMap::new(),
            computed_valid_until: None,
            audiences: Vec::new(),
            interests: Some(interests_to_pb(crate::psychographic::interests(computed))),
            accounts: computed
                .accounts()
                .map(|(id, entry)| {
                    let text = |key: &str| {
                        entry
                            .value
                            .get(key)
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let membership = pb::AccountMembership {
                        role: text("role"),
                        title: text("title"),
                        last_seen: Some(to_timestamp(entry.at)),
                    };
                    (id.to_owned(), membership)
                })
                .collect(),
            consent: computed
                .consent()
                .map(|(purpose, granted, entry)| {
                    let consent = pb::Consent {
                        granted,
                        observed_at: Some(to_timestamp(entry.at)),
                        event_id: entry.event_id.clone(),
                    };
                    (purpose.to_owned(), consent)
                })
                .collect(),
        }
    }
}

impl From<&Score> for scoring::Score {
    fn from(score: &Score) -> Self {
        let Score {
            name,
            value,
            computed_at,
            model_version,
            factors,
        } = score;
        Self {
            name: name.clone(),
            value: *value,
            computed_at: Some(to_timestamp(*computed_at)),
            model_version: model_version.clone(),
            factors: factors
                .iter()
                .map(|f| {
                    let ScoreFactor {
                        name,
                        value,
                        description,
                    } = f;
                    scoring::ScoreFactor {
                        name: name.clone(),
                        value: *value,
                        description: description.clone(),
                    }
                })
                .collect(),
        }
    }
}

impl TryFrom<scoring::Score> for Score {
    type Error = String;

    fn try_from(score: scoring::Score) -> Result<Self, Self::Error> {
        let scoring::Score {
            name,
            value,
            computed_at,
            model_version,
            factors,
        } = score;
        if name.is_empty() {
            return Err("a score without a name".to_owned());
        }
        // Scores are stored as JSON, which has no NaN or infinity.
        if !value.is_finite() {
            return Err(format!("score {name} is not a finite number"));
        }
        let computed_at = computed_at
            .as_ref()
            .and_then(storable_time)
            .ok_or_else(|| format!("score {name} has no valid computed_at"))?;
        let factors = factors
            .into_iter()
            .map(|f| {
                let scoring::ScoreFactor {
                    name: factor,
                    value,
                    description,
                } = f;
                if value.is_finite() {
                    Ok(ScoreFactor {
                        name: factor,
                        value,
                        description,
                    })
                } else {
                    Err(format!("factor {factor} of score {name} is not finite"))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name,
            value,
            computed_at,
            model_version,
            factors,
        })
    }
}

/// What the identity service matches a profile on: its current trait values, without their
/// provenance. `None` for a profile without traits, which has nothing to match on.
pub(crate) fn profile_traits(profile: &Profile) -> Option<identity::ProfileTraits> {
    if profile.state.traits.is_empty() {
        return None;
    }
    Some(identity::ProfileTraits {
        profile_id: profile.profile_id.clone(),
        traits: Some(prost_types::Struct {
            fields: profile
                .state
                .traits
                .iter()
                .map(|(name, t)| (name.clone(), json_to_value(&t.value)))
                .collect(),
        }),
    })
}

/// The merges matching decided. A merge that breaks the contract is the identity service's
/// fault, not the caller's, so it is an internal error rather than INVALID_ARGUMENT.
pub(crate) fn match_merges(merges: Vec<identity::Merge>) -> Result<Vec<Merge>, ProfileError> {
    merges
        .into_iter()
        .enumerate()
        .map(|(i, merge)| {
            Merge::try_from(merge).map_err(|violations| {
                let reasons: Vec<String> = violations
                    .into_iter()
                    .map(|v| v.prefixed(&format!("merges[{i}]")).to_string())
                    .collect();
                ProfileError::BadMatches(reasons.join("; "))
            })
        })
        .collect()
}

/// The facts the scoring service needs about a profile at `now`: its activity, traits, declared
/// computed traits, audiences and accounts. Audiences are evaluated with the profile's current
/// state but the scores it already has (the new ones are what this asks for), so a membership
/// that depends on a score lags it by one write. The accounts carry the person's role and title
/// and the account's traits from `accounts` (read in the apply transaction, as the batch left
/// them); the accounts' own scores are not sent (account-level plans score accounts).
pub(crate) fn facts(
    profile: &Profile,
    half_life_seconds: f64,
    defs: &Definitions,
    accounts: &crate::store::Accounts,
    now: OffsetDateTime,
) -> scoring::ProfileFacts {
    let state = &profile.state;
    let text = |membership: &serde_json::Value, key: &str| {
        membership
            .get(key)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    scoring::ProfileFacts {
        profile_id: profile.profile_id.clone(),
        event_count: state.event_count,
        last_seen: state.last_seen.map(to_timestamp),
        activity_log2: state.activity_log2,
        activity_half_life_seconds: half_life_seconds,
        traits: state
            .traits
            .iter()
            .map(|(name, t)| (name.clone(), json_to_value(&t.value)))
            .collect(),
        computed_traits: state
            .computed
            .values(defs.declared(), now)
            .into_iter()
            .map(|(name, c)| (name, json_to_value(&c.value)))
            .collect(),
        audiences: defs.members(profile, now),
        accounts: state
            .computed
            .accounts()
            .map(|(account_id, latest)| scoring::AccountFacts {
                account_id: account_id.to_owned(),
                role: text(&latest.value, "role"),
                title: text(&latest.value, "title"),
                traits: accounts
                    .get(account_id)
                    .map(|a| {
                        a.traits
                            .iter()
                            .map(|(name, t)| (name.clone(), json_to_value(&t.value)))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect(),
        purchases: crate::psychographic::purchases(&state.computed).map(|p| {
            scoring::PurchaseHistory {
                first_day: p.first_day,
                last_day: p.last_day,
                days: p.days,
                repeat_revenue: p.repeat_revenue,
                revenue: p.revenue,
            }
        }),
        // Set by the caller for a profile scored for a traced event.
        trace_parent: String::new(),
        trace_state: String::new(),
        activity_classes: crate::engagement::classes(
            &state.computed,
            &defs.engagement,
            half_life_seconds,
        )
        .into_iter()
        .map(|c| scoring::ActivityClass {
            event: c.event,
            log2: c.log2,
            half_life_seconds: c.half_life_seconds,
            weight: c.weight,
        })
        .collect(),
    }
}

/// The GDPR export of `profile` (as stored), `shown` (as read now), its identity `graph` and
/// its timeline `events`.
pub(crate) fn export_document(
    profile: &Profile,
    shown: &pb::Profile,
    graph: &identity::GetProfileGraphResponse,
    events: &[TimelineEntry],
    now: OffsetDateTime,
) -> serde_json::Value {
    use serde_json::json;
    let time = |t: Option<&prost_types::Timestamp>| {
        t.and_then(tessera_proto::convert::from_timestamp)
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
    };
    let rfc = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let id =
        |i: Option<&common::Identifier>| i.map(|i| json!({"type": i.r#type, "value": i.value}));
    json!({
        "exported_at": rfc(now),
        "profile": {
            "profile_id": profile.profile_id,
            "merged_profile_ids": profile.merged_profile_ids,
            "created_at": rfc(profile.created_at),
            "updated_at": rfc(profile.updated_at),
            "first_seen": profile.state.first_seen.map(rfc),
            "last_seen": profile.state.last_seen.map(rfc),
            "event_count": profile.state.event_count,
            "traits": profile.state.traits.iter().map(|(name, t)| (name.clone(), json!({
                "value": t.value,
                "observed_at": rfc(t.observed_at),
                "event_id": t.event_id,
            }))).collect::<serde_json::Map<_, _>>(),
            "computed_traits": shown.computed_traits.iter().map(|(name, t)| (name.clone(), json!({
                "value": t.value.as_ref().map(tessera_proto::convert::value_to_json),
                "observed_at": time(t.observed_at.as_ref()),
            }))).collect::<serde_json::Map<_, _>>(),
            "audiences": shown.audiences,
            "scores": profile.scores.values().map(|s| json!({
                "name": s.name,
                "value": s.value,
                "computed_at": rfc(s.computed_at),
                "model_version": s.model_version,
                "factors": s.factors.iter().map(|f| json!({
                    "name": f.name, "value": f.value, "description": f.description,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "identifiers": profile.state.identifiers.iter()
                .map(|i| json!({"type": i.kind, "value": i.value}))
                .collect::<Vec<_>>(),
        },
        "identity_graph": {
            "identifiers": graph.identifiers.iter().map(|g| json!({
                "identifier": id(g.identifier.as_ref()),
                "linked_to_profile_id": g.linked_to_profile_id,
                "event_id": g.event_id,
                "linked_at": time(g.linked_at.as_ref()),
            })).collect::<Vec<_>>(),
            "decisions": graph.decisions.iter().map(|d| json!({
                "seq": d.seq,
                "kind": d.kind,
                "event_id": d.event_id,
                "profile_id": d.profile_id,
                "other_profile_id": d.other_profile_id,
                "identifier": id(d.identifier.as_ref()),
                "rule": d.rule,
                "event_time": time(d.event_time.as_ref()),
                "decided_at": time(d.decided_at.as_ref()),
            })).collect::<Vec<_>>(),
            "truncated": graph.truncated,
        },
        "events": events.iter().map(|e| json!({
            "event_id": e.event_id,
            "profile_id": e.profile_id,
            "timestamp": rfc(e.occurred_at),
            "type": e.content.details.kind,
            "message_id": e.content.details.message_id,
            "event": e.content.details.event,
            "name": e.content.details.name,
            "category": e.content.details.category,
            "group_id": e.content.details.group_id,
            "properties": e.content.details.properties,
            "traits": e.content.traits,
            "context": e.content.details.context,
            "identifiers": e.content.identifiers.iter()
                .map(|(t, v)| json!({"type": t, "value": v}))
                .collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The protobuf form of a person's interests.
fn interests_to_pb(interests: crate::psychographic::Interests) -> pb::Interests {
    pb::Interests {
        categories: interests
            .categories
            .into_iter()
            .map(|(category, score)| pb::CategoryAffinity { category, score })
            .collect(),
        preferred_channel: interests.preferred_channel.unwrap_or_default(),
        channels: interests.channels.into_iter().collect(),
        orders: interests.orders,
        price_sensitivity: interests.price_sensitivity,
    }
}

/// The protobuf form of a trait with its provenance, classified by `catalog`.
pub(crate) fn trait_to_pb(
    name: &str,
    t: &crate::domain::TraitValue,
    catalog: &crate::catalog::TraitCatalog,
) -> pb::Trait {
    let rule = catalog.get(name);
    pb::Trait {
        value: Some(json_to_value(&t.value)),
        observed_at: Some(to_timestamp(t.observed_at)),
        event_id: t.event_id.clone(),
        class: rule
            .and_then(|r| r.class)
            .map(|c| c.as_str().to_owned())
            .unwrap_or_default(),
        pii: rule.is_some_and(|r| r.is_pii()),
    }
}

/// The facts account-level plans read about `account`: its traits and `members`.
pub(crate) fn account_facts(
    account: &crate::account::Account,
    members: &[crate::account::Member],
) -> scoring::AccountProfileFacts {
    scoring::AccountProfileFacts {
        account_id: account.account_id.clone(),
        traits: account
            .traits
            .iter()
            .map(|(name, t)| (name.clone(), json_to_value(&t.value)))
            .collect(),
        members: members
            .iter()
            .map(|m| scoring::AccountMemberFacts {
                profile_id: m.profile_id.clone(),
                role: m.role.clone().unwrap_or_default(),
                title: m.title.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

/// The protobuf form of an account with `member_count` members.
pub(crate) fn account_to_pb(
    account: &crate::account::Account,
    member_count: usize,
    catalog: &crate::catalog::TraitCatalog,
    computed: BTreeMap<String, crate::computed::ComputedValue>,
) -> pb::Account {
    pb::Account {
        computed_traits: computed
            .into_iter()
            .map(|(name, v)| {
                let value = pb::ComputedTrait {
                    value: Some(json_to_value(&v.value)),
                    observed_at: v.observed_at.map(to_timestamp),
                };
                (name, value)
            })
            .collect(),
        account_id: account.account_id.clone(),
        traits: account
            .traits
            .iter()
            .map(|(name, t)| (name.clone(), trait_to_pb(name, t, catalog)))
            .collect(),
        member_count: member_count as i64,
        version: account.version,
        created_at: Some(to_timestamp(account.created_at)),
        updated_at: Some(to_timestamp(account.updated_at)),
        scores: account
            .scores
            .iter()
            .map(|(name, s)| (name.clone(), scoring::Score::from(s)))
            .collect(),
    }
}

/// The `Profile` fields a read mask may name; `profile_id` and `version` always come back.
const MASKABLE: [&str; 14] = [
    "identifiers",
    "traits",
    "event_count",
    "first_seen",
    "last_seen",
    "scores",
    "updated_at",
    "merged_profile_ids",
    "computed_traits",
    "computed_valid_until",
    "audiences",
    "consent",
    "accounts",
    "interests",
];

/// The map fields whose single entries a read mask may name (`traits.email`).
const MASKABLE_MAPS: [&str; 5] = ["traits", "computed_traits", "scores", "consent", "accounts"];

/// Which fields of a profile to return (`read_mask`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ReadMask {
    /// Whole fields kept.
    fields: BTreeSet<String>,
    /// Map fields of which only these entries are kept.
    entries: BTreeMap<String, BTreeSet<String>>,
}

impl ReadMask {
    /// The mask of a request; `None` (everything) when it names no path.
    pub(crate) fn from_pb(
        mask: Option<prost_types::FieldMask>,
    ) -> Result<Option<Self>, ProfileError> {
        let paths = mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Ok(None);
        }
        let mut out = Self::default();
        let mut violations = Vec::new();
        for (i, path) in paths.into_iter().enumerate() {
            match path.split_once('.') {
                None if path == "profile_id" || path == "version" => {}
                None if MASKABLE.contains(&path.as_str()) => {
                    out.fields.insert(path);
                }
                Some((map, key)) if MASKABLE_MAPS.contains(&map) && !key.is_empty() => {
                    out.entries
                        .entry(map.to_owned())
                        .or_default()
                        .insert(key.to_owned());
                }
                None | Some(_) => violations.push(FieldViolation::new(
                    format!("read_mask.paths[{i}]"),
                    format!(
                        "not a profile field: one of profile_id, version, {}, or an entry of {} \
                         (traits.<name>)",
                        MASKABLE.join(", "),
                        MASKABLE_MAPS.join(", ")
                    ),
                )),
            }
        }
        if violations.is_empty() {
            Ok(Some(out))
        } else {
            Err(ProfileError::InvalidArgument(violations))
        }
    }

    /// `profile` with only the masked fields.
    pub(crate) fn apply(&self, profile: &mut pb::Profile) {
        let keep = |field: &str| self.fields.contains(field);
        let keep_map = |field: &str| keep(field) || self.entries.contains_key(field);
        fn retain<V>(
            map: &mut std::collections::HashMap<String, V>,
            keys: Option<&BTreeSet<String>>,
        ) {
            if let Some(keys) = keys {
                map.retain(|k, _| keys.contains(k));
            }
        }
        if !keep("identifiers") {
            profile.identifiers.clear();
        }
        if !keep("event_count") {
            profile.event_count = 0;
        }
        if !keep("first_seen") {
            profile.first_seen = None;
        }
        if !keep("last_seen") {
            profile.last_seen = None;
        }
        if !keep("updated_at") {
            profile.updated_at = None;
        }
        if !keep("merged_profile_ids") {
            profile.merged_profile_ids.clear();
        }
        if !keep("computed_valid_until") {
            profile.computed_valid_until = None;
        }
        if !keep("audiences") {
            profile.audiences.clear();
        }
        if !keep("interests") {
            profile.interests = None;
        }
        for (field, whole) in MASKABLE_MAPS.iter().map(|f| (*f, keep(f))) {
            let keys = if whole { None } else { self.entries.get(field) };
            match field {
                "traits" if !keep_map(field) => profile.traits.clear(),
                "traits" => retain(&mut profile.traits, keys),
                "computed_traits" if !keep_map(field) => profile.computed_traits.clear(),
                "computed_traits" => retain(&mut profile.computed_traits, keys),
                "scores" if !keep_map(field) => profile.scores.clear(),
                "scores" => retain(&mut profile.scores, keys),
                "consent" if !keep_map(field) => profile.consent.clear(),
                "consent" => retain(&mut profile.consent, keys),
                "accounts" if !keep_map(field) => profile.accounts.clear(),
                _ => retain(&mut profile.accounts, keys),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Timestamp;
    use tessera_proto::convert::json_map_to_struct;

    fn resolved(profile_id: &str, ts: Option<Timestamp>) -> pb::ResolvedEvent {
        let traits = serde_json::json!({"plan": "pro"});
        pb::ResolvedEvent {
            event_id: "e1".to_owned(),
            profile_id: profile_id.to_owned(),
            event: Some(common::Event {
                r#type: common::EventType::Identify as i32,
                user_id: "u1".to_owned(),
                traits: Some(json_map_to_struct(traits.as_object().unwrap())),
                timestamp: ts,
                ..Default::default()
            }),
            identifiers: vec![common::Identifier {
                r#type: "user_id".to_owned(),
                value: "u1".to_owned(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn violations_name_the_event_and_field() {
        let ts = Timestamp {
            seconds: 1_780_000_000,
            nanos: 123_456_789,
        };
        let request = pb::ApplyEventsRequest {
            merges: vec![identity::Merge {
                surviving_profile_id: "p".to_owned(),
                merged_profile_id: "p".to_owned(),
                ..Default::default()
            }],
            events: vec![
                resolved("p", Some(ts)),
                resolved("p", Some(ts)),
                resolved("", None),
            ],
        };
        let Err(ProfileError::InvalidArgument(v)) = batch(request) else {
            panic!("expected invalid argument");
        };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "merges[0].merged_profile_id",
                "events[2].profile_id",
                "events[2].event.timestamp"
            ]
        );
    }

    #[test]
    fn events_keep_person_traits_and_microseconds() {
        let ts = Timestamp {
            seconds: 1_780_000_000,
            nanos: 123_456_789,
        };
        let event = ResolvedEvent::try_from(resolved("p", Some(ts))).unwrap();
        assert_eq!(event.timestamp.nanosecond(), 123_456_000);
        assert_eq!(event.traits["plan"], "pro");
        assert_eq!(event.identifiers, [Identifier::new("user_id", "u1")]);
    }

    #[test]
    fn matching_gets_trait_values_and_bad_merges_are_internal() {
        let now = micros(time::OffsetDateTime::now_utc());
        let mut profile = Profile::empty("p1", now);
        assert_eq!(profile_traits(&profile), None);
        profile.state.traits.insert(
            "first_name".to_owned(),
            crate::domain::TraitValue {
                value: serde_json::json!("Ann"),
                observed_at: now,
                event_id: "e1".to_owned(),
            },
        );
        let sent = profile_traits(&profile).unwrap();
        assert_eq!(sent.profile_id, "p1");
        assert_eq!(
            tessera_proto::convert::struct_to_json_map(&sent.traits.unwrap()),
            *serde_json::json!({"first_name": "Ann"})
                .as_object()
                .unwrap()
        );

        let good = identity::Merge {
            surviving_profile_id: "p1".to_owned(),
            merged_profile_id: "p2".to_owned(),
            ..Default::default()
        };
        let bad = identity::Merge {
            merged_profile_id: "p3".to_owned(),
            ..Default::default()
        };
        assert_eq!(match_merges(vec![good.clone()]).unwrap().len(), 1);
        let Err(ProfileError::BadMatches(reason)) = match_merges(vec![good, bad]) else {
            panic!("expected a bad match");
        };
        assert!(
            reason.contains("merges[1].surviving_profile_id"),
            "{reason}"
        );
    }

    #[test]
    fn too_many_events_are_resource_exhausted() {
        let request = pb::ApplyEventsRequest {
            merges: vec![],
            events: vec![pb::ResolvedEvent::default(); MAX_EVENTS_PER_REQUEST + 1],
        };
        assert!(matches!(
            batch(request),
            Err(ProfileError::TooMany {
                field: "events",
                ..
            })
        ));
    }
}
