//! The Profile API: a REST API compatible with Segment's, so personalization code written for
//! Segment reads Tessera's profiles unchanged.
//!
//! `GET /v1/spaces/{space_id}/collections/users/profiles/{type}:{value}/{resource}` with the
//! access token as the HTTP Basic user name, where `resource` is `traits`, `external_ids`,
//! `events`, `metadata` or `links`; `{type}:{value}` is any identifier (`user_id:u1`,
//! `email:ann@example.com`, ...) or `profile_id:<id>` (`segment_id:<id>` too). Lists take
//! `limit` and `next` and answer a `cursor` with `url`, `has_more` and `next`; `traits` and
//! `external_ids` take `include` (comma-separated names or types), `events` takes `include`
//! (event names), `start` and `end` (RFC 3339). Errors are JSON: `{"error": {"code",
//! "message"}}` with 400, 401 (no or unknown token), 403 (a token without `profiles:read`), 404
//! or 503. `Authorization: Bearer <token>` works too.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};
use tessera_core::ErrorCode;
use tessera_proto::common::v1 as common;
use tessera_proto::convert::{from_timestamp, struct_to_json_map, value_to_json};
use tessera_proto::profile::v1 as pb;
use tessera_server::access::{Access, PROFILE_API_SCOPE};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::ProfileError;
use crate::service::Inner;

/// The default and largest `limit` of each list, as Segment's API has them.
const TRAITS_LIMIT: (usize, usize) = (10, 200);
const EXTERNAL_IDS_LIMIT: (usize, usize) = (25, 100);
const EVENTS_LIMIT: (usize, usize) = (10, 100);
/// `limit` of an account's `links` (its members): default and most.
const LINKS_LIMIT: (usize, usize) = (25, 100);

#[derive(Clone)]
struct Api {
    inner: Arc<Inner>,
    /// Checks the access token of each request (scope `profiles:read`).
    access: Access,
    space_id: String,
}

/// The Profile API's routes over the profile service, answering requests whose access token
/// `access` accepts with the scope `profiles:read`, for the space `space_id`.
pub(crate) fn routes(
    inner: Arc<Inner>,
    access: Access,
    space_id: &str,
) -> tessera_server::HttpRouter {
    let api = Api {
        inner,
        access,
        space_id: space_id.to_owned(),
    };
    tessera_server::HttpRouter::new()
        .route(
            "/v1/spaces/{space_id}/collections/{collection}/profiles/{external_id}/{resource}",
            get(handle),
        )
        .with_state(api)
}

/// An error answer: status and `{"error": {"code", "message"}}`.
struct Failure {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl From<ProfileError> for Failure {
    fn from(error: ProfileError) -> Self {
        let code = error.code();
        let status = tessera_server::http_status(code);
        match (&error, code) {
            (ProfileError::NotFound, _) => Self::not_found("profile not found"),
            (ProfileError::InvalidArgument(violations), _) => Self::bad_request(
                violations
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            (_, ErrorCode::Unavailable) => Self::new(
                status,
                "unavailable",
                "profiles are unavailable for a moment, retry later",
            ),
            _ => {
                tracing::error!(%error, "profile API request failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"tessera profile api\""),
            );
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

async fn handle(
    State(api): State<Api>,
    Path((space_id, collection, external_id, resource)): Path<(String, String, String, String)>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    match answer(
        &api,
        &space_id,
        &collection,
        &external_id,
        &resource,
        &params,
        &headers,
    )
    .await
    {
        Ok(body) => (StatusCode::OK, Json(body)).into_response(),
        Err(failure) => failure.into_response(),
    }
}

async fn answer(
    api: &Api,
    space_id: &str,
    collection: &str,
    external_id: &str,
    resource: &str,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Value, Failure> {
    if let Err(denied) = api.access.authorize(headers, PROFILE_API_SCOPE).await {
        let (status, code, message) = denied.http();
        return Err(Failure::new(status, code, message));
    }
    if space_id != api.space_id {
        return Err(Failure::not_found(format!("no space {space_id:?}")));
    }
    match collection {
        "users" => {}
        "accounts" => {
            let url = format!(
                "/v1/spaces/{space_id}/collections/accounts/profiles/{external_id}/{resource}"
            );
            return account(api, external_id, resource, params, url).await;
        }
        other => {
            return Err(Failure::not_found(format!(
                "no collection {other:?}: users or accounts"
            )));
        }
    }
    let lookup = lookup(external_id)?;
    let url =
        format!("/v1/spaces/{space_id}/collections/{collection}/profiles/{external_id}/{resource}");
    match resource {
        "traits" => {
            let profile = profile(api, lookup).await?;
            traits(&profile, params, url)
        }
        "external_ids" => {
            let profile = profile(api, lookup).await?;
            external_ids(&profile, params, url)
        }
        "metadata" => {
            let profile = profile(api, lookup).await?;
            Ok(json!({"metadata": {
                "created_at": profile.first_seen.as_ref().and_then(from_timestamp).map(rfc3339),
                "updated_at": profile.updated_at.as_ref().and_then(from_timestamp).map(rfc3339),
                "expires_after": "",
                "expires_at": "",
            }}))
        }
        "links" => {
            // The person's accounts, as Segment links a user to the accounts collection.
            let profile = profile(api, lookup).await?;
            let mut accounts: Vec<(&String, &pb::AccountMembership)> =
                profile.accounts.iter().collect();
            accounts.sort_by_key(|(id, _)| *id);
            let external_ids: Vec<Value> = accounts
                .into_iter()
                .map(|(id, membership)| {
                    json!({
                        "id": id,
                        "type": "group_id",
                        "source_id": "",
                        "collection": "accounts",
                        "created_at": membership.last_seen.as_ref().and_then(from_timestamp).map(rfc3339),
                        "encoding": "none",
                    })
                })
                .collect();
            let data = if external_ids.is_empty() {
                Vec::new()
            } else {
                vec![json!({"to_collection": "accounts", "external_ids": external_ids})]
            };
            Ok(json!({"data": data, "cursor": cursor(url, None)}))
        }
        "events" => events(api, lookup, params, url).await,
        other => Err(Failure::not_found(format!(
            "no resource {other:?}: traits, external_ids, events, metadata or links"
        ))),
    }
}

/// The Profile API of the accounts collection: `traits`, `external_ids`, `metadata` and
/// `links` (the members) of the account `group_id:<id>`.
async fn account(
    api: &Api,
    external_id: &str,
    resource: &str,
    params: &HashMap<String, String>,
    url: String,
) -> Result<Value, Failure> {
    let Some(("group_id" | "account_id", id)) = external_id.split_once(':') else {
        return Err(Failure::bad_request(
            "name the account as group_id:<id>, for example group_id:acme",
        ));
    };
    let account = match api.inner.get_account(id).await {
        Err(ProfileError::NotFound) => return Err(Failure::not_found("account not found")),
        other => other?,
    };
    match resource {
        "traits" => {
            // The same shape as a person's traits, the account computed traits included: a
            // declared one hides the account trait of its name, also while it has no value.
            let declared = api.inner.defs.current();
            let mut custom = account.traits;
            custom.retain(|name, _| {
                !crate::account::hidden_by_computed(name, &declared.account_computed)
            });
            let shown = pb::Profile {
                traits: custom,
                computed_traits: account.computed_traits,
                updated_at: account.updated_at,
                ..pb::Profile::default()
            };
            traits(&shown, params, url)
        }
        "external_ids" => Ok(json!({
            "data": [{
                "id": account.account_id,
                "type": "group_id",
                "source_id": "",
                "collection": "accounts",
                "created_at": account.created_at.as_ref().and_then(from_timestamp).map(rfc3339),
                "encoding": "none",
            }],
            "cursor": cursor(url, None),
        })),
        "metadata" => Ok(json!({"metadata": {
            "created_at": account.created_at.as_ref().and_then(from_timestamp).map(rfc3339),
            "updated_at": account.updated_at.as_ref().and_then(from_timestamp).map(rfc3339),
            "expires_after": "",
            "expires_at": "",
        }})),
        // Not in Segment's API: the account-level scores, as `GetAccount` answers them.
        "scores" => {
            let scores: BTreeMap<&String, Value> = account
                .scores
                .iter()
                .map(|(name, score)| {
                    let factors: Vec<Value> = score
                        .factors
                        .iter()
                        .map(|f| json!({"name": f.name, "value": f.value, "description": f.description}))
                        .collect();
                    (
                        name,
                        json!({
                            "value": score.value,
                            "model_version": score.model_version,
                            "computed_at": score.computed_at.as_ref().and_then(from_timestamp).map(rfc3339),
                            "factors": factors,
                        }),
                    )
                })
                .collect();
            Ok(json!({"scores": scores}))
        }
        "links" => {
            let limit = limit(params, LINKS_LIMIT)?;
            let page = api
                .inner
                .list_account_members(pb::ListAccountMembersRequest {
                    account_id: account.account_id,
                    page_size: i32::try_from(limit).unwrap_or(i32::MAX),
                    page_token: params.get("next").cloned().unwrap_or_default(),
                })
                .await?;
            let external_ids: Vec<Value> = page
                .members
                .iter()
                .map(|m| {
                    json!({
                        "id": m.profile_id,
                        "type": "profile_id",
                        "source_id": "",
                        "collection": "users",
                        "created_at": m.joined_at.as_ref().and_then(from_timestamp).map(rfc3339),
                        "encoding": "none",
                    })
                })
                .collect();
            let next = (!page.next_page_token.is_empty()).then_some(page.next_page_token);
            let data = if external_ids.is_empty() {
                Vec::new()
            } else {
                vec![json!({"to_collection": "users", "external_ids": external_ids})]
            };
            Ok(json!({"data": data, "cursor": cursor(url, next)}))
        }
        other => Err(Failure::not_found(format!(
            "no resource {other:?} for accounts: traits, external_ids, metadata, scores or links"
        ))),
    }
}

/// The lookup a `type:value` external id names.
fn lookup(external_id: &str) -> Result<pb::get_profile_request::Lookup, Failure> {
    use pb::get_profile_request::Lookup;
    let Some((kind, value)) = external_id.split_once(':') else {
        return Err(Failure::bad_request(
            "name the profile as type:value, for example user_id:u1 or email:ann@example.com",
        ));
    };
    Ok(match kind {
        "profile_id" | "segment_id" => Lookup::ProfileId(value.to_owned()),
        _ => Lookup::Identifier(common::Identifier {
            r#type: kind.to_owned(),
            value: value.to_owned(),
        }),
    })
}

async fn profile(
    api: &Api,
    lookup: pb::get_profile_request::Lookup,
) -> Result<pb::Profile, Failure> {
    Ok(api
        .inner
        .get_profile(pb::GetProfileRequest {
            lookup: Some(lookup),
            as_of: None,
            read_mask: None,
        })
        .await?)
}

/// `limit` within `(default, max)`.
fn limit(
    params: &HashMap<String, String>,
    (default, max): (usize, usize),
) -> Result<usize, Failure> {
    match params.get("limit") {
        None => Ok(default),
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(Failure::bad_request(format!(
                "limit: a number from 1 to {max}"
            ))),
        },
    }
}

/// The comma-separated values of `include`, when given.
fn include(params: &HashMap<String, String>) -> Option<Vec<&str>> {
    params.get("include").map(|raw| {
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    })
}

fn cursor(url: String, next: Option<String>) -> Value {
    json!({
        "url": url,
        "has_more": next.is_some(),
        "next": next.unwrap_or_default(),
    })
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// A page of the profile's traits in name order, after the name `next`. With `verbose=true`
/// each value comes with its provenance (`observed_at`, `event_id`).
fn traits(
    profile: &pb::Profile,
    params: &HashMap<String, String>,
    url: String,
) -> Result<Value, Failure> {
    let limit = limit(params, TRAITS_LIMIT)?;
    let include = include(params);
    let verbose = params.get("verbose").is_some_and(|v| v == "true");
    // Traits from events and computed traits, as Segment lists custom and computed traits
    // together; `class` picks one kind. A computed trait wins over an event trait of its name.
    let class = params.get("class").map(String::as_str);
    let mut sorted: BTreeMap<&String, pb::Trait> = BTreeMap::new();
    if matches!(class, None | Some("custom")) {
        sorted.extend(profile.traits.iter().map(|(name, t)| (name, t.clone())));
    }
    if matches!(class, None | Some("computed_trait")) {
        sorted.extend(profile.computed_traits.iter().map(|(name, t)| {
            let shown = pb::Trait {
                value: t.value.clone(),
                observed_at: t.observed_at.or(profile.updated_at),
                event_id: String::new(),
                class: String::new(),
                pii: false,
            };
            (name, shown)
        }));
    }
    if let Some(other) = class.filter(|c| !matches!(*c, "custom" | "computed_trait")) {
        return Err(Failure::bad_request(format!(
            "class: custom or computed_trait, not {other:?} (audiences are not built yet)"
        )));
    }
    let mut selected = sorted
        .into_iter()
        .filter(|(name, _)| {
            include
                .as_ref()
                .is_none_or(|names| names.contains(&name.as_str()))
        })
        .filter(|(name, _)| {
            params
                .get("next")
                .is_none_or(|after| name.as_str() > after.as_str())
        });
    let mut out = Map::new();
    let mut last = None;
    for (name, value) in selected.by_ref().take(limit) {
        let plain = value.value.as_ref().map_or(Value::Null, value_to_json);
        let shown = if verbose {
            json!({
                "value": plain,
                "observed_at": value.observed_at.as_ref().and_then(from_timestamp).map(rfc3339),
                "event_id": value.event_id,
                "class": value.class,
                "pii": value.pii,
            })
        } else {
            plain
        };
        out.insert(name.clone(), shown);
        last = Some(name.clone());
    }
    let next = last.filter(|_| selected.next().is_some());
    Ok(json!({"traits": out, "cursor": cursor(url, next)}))
}

/// A page of the profile's identifiers, by type then value, after the `type:value` `next`.
fn external_ids(
    profile: &pb::Profile,
    params: &HashMap<String, String>,
    url: String,
) -> Result<Value, Failure> {
    let limit = limit(params, EXTERNAL_IDS_LIMIT)?;
    let include = include(params);
    let created_at = profile
        .first_seen
        .as_ref()
        .and_then(from_timestamp)
        .map(rfc3339);
    let mut ids: Vec<&common::Identifier> = profile.identifiers.iter().collect();
    ids.sort_by(|a, b| (&a.r#type, &a.value).cmp(&(&b.r#type, &b.value)));
    let key = |id: &common::Identifier| format!("{}:{}", id.r#type, id.value);
    let mut selected = ids
        .into_iter()
        .filter(|id| {
            include
                .as_ref()
                .is_none_or(|types| types.contains(&id.r#type.as_str()))
        })
        .filter(|id| {
            params
                .get("next")
                .is_none_or(|after| key(id).as_str() > after.as_str())
        });
    let mut data = Vec::new();
    let mut last = None;
    for id in selected.by_ref().take(limit) {
        data.push(json!({
            "id": id.value,
            "type": id.r#type,
            "source_id": "",
            "collection": "users",
            "created_at": created_at,
            "encoding": "none",
        }));
        last = Some(key(id));
    }
    let next = last.filter(|_| selected.next().is_some());
    Ok(json!({"data": data, "cursor": cursor(url, next)}))
}

/// A page of the profile's events, newest first, from all its merged identities.
async fn events(
    api: &Api,
    lookup: pb::get_profile_request::Lookup,
    params: &HashMap<String, String>,
    url: String,
) -> Result<Value, Failure> {
    use pb::get_profile_request::Lookup as G;
    use pb::list_profile_events_request::Lookup as L;
    let limit = limit(params, EVENTS_LIMIT)?;
    let time = |field: &str| -> Result<Option<prost_types::Timestamp>, Failure> {
        params
            .get(field)
            .map(|raw| {
                OffsetDateTime::parse(raw, &Rfc3339)
                    .map(tessera_proto::convert::to_timestamp)
                    .map_err(|_| Failure::bad_request(format!("{field}: an RFC 3339 time")))
            })
            .transpose()
    };
    let request = pb::ListProfileEventsRequest {
        lookup: Some(match lookup {
            G::ProfileId(id) => L::ProfileId(id),
            G::Identifier(id) => L::Identifier(id),
        }),
        types: Vec::new(),
        event_names: include(params)
            .unwrap_or_default()
            .into_iter()
            .map(str::to_owned)
            .collect(),
        start_time: time("start")?,
        end_time: time("end")?,
        page_size: i32::try_from(limit).unwrap_or(i32::MAX),
        page_token: params.get("next").cloned().unwrap_or_default(),
    };
    let page = api.inner.list_events(request).await?;
    let data: Vec<Value> = page
        .events
        .iter()
        .map(|entry| event_json(entry, &page.profile_id))
        .collect();
    let next = (!page.next_page_token.is_empty()).then_some(page.next_page_token);
    Ok(json!({"data": data, "cursor": cursor(url, next)}))
}

/// One timeline event as the Profile API shows it.
fn event_json(entry: &pb::TimelineEvent, profile_id: &str) -> Value {
    let mut out = Map::new();
    if let Some(event) = &entry.event {
        let kind = common::EventType::try_from(event.r#type)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("EVENT_TYPE_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        out.insert("type".into(), json!(kind));
        out.insert("message_id".into(), json!(event.message_id));
        for (key, value) in [
            ("event", &event.event),
            ("name", &event.name),
            ("category", &event.category),
        ] {
            if !value.is_empty() {
                out.insert(key.into(), json!(value));
            }
        }
        for (key, value) in [
            ("properties", &event.properties),
            ("traits", &event.traits),
            ("context", &event.context),
        ] {
            if let Some(value) = value {
                out.insert(key.into(), Value::Object(struct_to_json_map(value)));
            }
        }
        out.insert(
            "timestamp".into(),
            json!(
                event
                    .timestamp
                    .as_ref()
                    .and_then(from_timestamp)
                    .map(rfc3339)
            ),
        );
    }
    out.insert("source_id".into(), json!(""));
    out.insert(
        "external_ids".into(),
        Value::Array(
            entry
                .identifiers
                .iter()
                .map(|id| json!({"id": id.value, "type": id.r#type, "collection": "users", "encoding": "none"}))
                .collect(),
        ),
    );
    out.insert("related".into(), json!({"users": profile_id}));
    Value::Object(out)
}
