//! Conversions between protobuf and domain types at the ingestion edge.

use tessera_core::{Event, FieldViolation};
use tessera_proto::common::v1 as pb;

/// The domain event of a protobuf event, checked against the Segment Spec rules; every
/// violation otherwise. `received_at` is ignored: the server sets it.
pub(crate) fn accepted_event(event: pb::Event) -> Result<Event, Vec<FieldViolation>> {
    let mut event = tessera_proto::convert::event_from_pb(pb::Event {
        received_at: None,
        ..event
    })?;
    let mut violations = event.validate();
    violations.extend(nul_violation(&event));
    violations.extend(size_violation(&event));
    if !violations.is_empty() {
        return Err(violations);
    }
    event.received_at = None;
    Ok(event)
}

/// A NUL character anywhere in the event, by path: Postgres cannot store one in JSON, so it is
/// refused by name (as the tracking API does) instead of failing the whole batch at the store.
fn nul_violation(event: &Event) -> Option<FieldViolation> {
    let texts = [
        ("message_id", &event.message_id),
        ("user_id", &event.user_id),
        ("anonymous_id", &event.anonymous_id),
        ("event", &event.event),
        ("name", &event.name),
        ("category", &event.category),
        ("group_id", &event.group_id),
        ("previous_id", &event.previous_id),
    ];
    let maps = [
        ("properties", &event.properties),
        ("traits", &event.traits),
        ("context", &event.context),
        ("integrations", &event.integrations),
    ];
    let path = texts
        .into_iter()
        .find(|(_, text)| text.contains('\0'))
        .map(|(field, _)| field.to_owned())
        .or_else(|| {
            maps.into_iter().find_map(|(field, map)| {
                crate::http::nul_path(map).map(|path| format!("{field}.{path}"))
            })
        })?;
    Some(FieldViolation::new(
        path,
        "contains a NUL character (\\u0000), which cannot be stored",
    ))
}

/// An event over the tracking API's per-message limit (32 KB as compact JSON): the same bound
/// holds on every front door. The violation names the event's largest part.
fn size_violation(event: &Event) -> Option<FieldViolation> {
    let limit = crate::http::MAX_MESSAGE_BYTES;
    let size = crate::http::compact_len(event);
    if size <= limit {
        return None;
    }
    let largest = [
        ("properties", &event.properties),
        ("traits", &event.traits),
        ("context", &event.context),
        ("integrations", &event.integrations),
    ]
    .into_iter()
    .max_by_key(|(_, map)| crate::http::compact_len(map))
    .map_or("properties", |(field, _)| field);
    Some(FieldViolation::new(
        largest,
        format!("the event is {size} bytes as JSON, over the limit of {limit} bytes per event"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_and_oversized_events_are_refused_by_field() {
        let event = |properties: serde_json::Value| pb::Event {
            r#type: pb::EventType::Track.into(),
            user_id: "u1".into(),
            event: "E".into(),
            properties: properties
                .as_object()
                .map(tessera_proto::convert::json_map_to_struct),
            ..pb::Event::default()
        };
        let nul = accepted_event(event(serde_json::json!({"a": {"b": ["x", "y\u{0}"]}})));
        assert_eq!(nul.unwrap_err()[0].field, "properties.a.b[1]");
        let big = accepted_event(event(serde_json::json!({"text": "x".repeat(40_000)})));
        let err = big.unwrap_err();
        assert_eq!(err[0].field, "properties");
        assert!(err[0].description.contains("32768"), "{err:?}");
        assert!(accepted_event(event(serde_json::json!({"text": "x".repeat(30_000)}))).is_ok());
    }

    #[test]
    fn type_and_spec_rules_are_both_checked() {
        let err = accepted_event(pb::Event::default()).unwrap_err();
        assert_eq!(err[0].field, "type");
        let no_user = pb::Event {
            r#type: pb::EventType::Identify.into(),
            ..pb::Event::default()
        };
        assert_eq!(accepted_event(no_user).unwrap_err()[0].field, "user_id");
    }
}
