//! Building events, sending them, and waiting for profiles.

use std::time::Duration;

use crate::auth::Channel;
use tessera_proto::common::v1::{Event, EventType, Identifier};
use tessera_proto::convert::json_map_to_struct;
use tessera_proto::ingestion::v1::IngestEventsRequest;
use tessera_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use tessera_proto::profile::v1::profile_service_client::ProfileServiceClient;
use tessera_proto::profile::v1::{GetProfileRequest, Profile, get_profile_request};

fn object(json: serde_json::Value) -> Option<prost_types::Struct> {
    json.as_object().map(json_map_to_struct)
}

/// An identify message.
pub fn identify(
    message_id: &str,
    user_id: &str,
    anonymous_id: &str,
    traits: serde_json::Value,
) -> Event {
    Event {
        message_id: message_id.to_owned(),
        r#type: EventType::Identify.into(),
        user_id: user_id.to_owned(),
        anonymous_id: anonymous_id.to_owned(),
        traits: object(traits),
        ..Event::default()
    }
}

/// A track message.
pub fn track(
    message_id: &str,
    user_id: &str,
    anonymous_id: &str,
    event: &str,
    properties: serde_json::Value,
) -> Event {
    Event {
        message_id: message_id.to_owned(),
        r#type: EventType::Track.into(),
        user_id: user_id.to_owned(),
        anonymous_id: anonymous_id.to_owned(),
        event: event.to_owned(),
        properties: object(properties),
        ..Event::default()
    }
}

/// Sends `events` in one IngestEvents call authenticated with `write_key` and returns the
/// statuses.
pub async fn send(
    channel: &Channel,
    write_key: &str,
    events: Vec<Event>,
) -> Result<Vec<i32>, tonic::Status> {
    let mut request = tonic::Request::new(IngestEventsRequest { events });
    request.metadata_mut().insert(
        "x-tessera-write-key",
        write_key
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("write key not ASCII"))?,
    );
    let response = IngestionServiceClient::new(channel.clone())
        .ingest_events(request)
        .await?;
    Ok(response
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.status)
        .collect())
}

/// GetProfile by identifier.
pub async fn get_by(channel: &Channel, kind: &str, value: &str) -> Result<Profile, tonic::Status> {
    let response = ProfileServiceClient::new(channel.clone())
        .get_profile(GetProfileRequest {
            lookup: Some(get_profile_request::Lookup::Identifier(Identifier {
                r#type: kind.to_owned(),
                value: value.to_owned(),
            })),
            as_of: None,
            read_mask: None,
        })
        .await?;
    response
        .into_inner()
        .profile
        .ok_or_else(|| tonic::Status::internal("no profile in response"))
}

/// Polls GetProfile by identifier until `done` holds, for at most `timeout`; returns the last
/// profile seen, and panics with it when the condition never held.
pub async fn wait_for(
    channel: &Channel,
    kind: &str,
    value: &str,
    timeout: Duration,
    done: impl Fn(&Profile) -> bool,
) -> Profile {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match get_by(channel, kind, value).await {
            Ok(p) if done(&p) => return p,
            other => other,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("profile {kind}={value} never reached the expected state; last: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A trait's value as JSON.
pub fn trait_value(profile: &Profile, name: &str) -> Option<serde_json::Value> {
    profile
        .traits
        .get(name)
        .and_then(|t| t.value.as_ref())
        .map(tessera_proto::convert::value_to_json)
}

/// Whether the profile lists the identifier.
pub fn has_identifier(profile: &Profile, kind: &str, value: &str) -> bool {
    profile
        .identifiers
        .iter()
        .any(|i| i.r#type == kind && i.value == value)
}
