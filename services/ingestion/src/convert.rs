//! Conversions between the protobuf event and the domain event.

use tessera_core::{Event, EventType, FieldViolation};
use tessera_proto::common::v1 as pb;
use tessera_proto::convert::{
    from_timestamp, json_map_to_struct, struct_to_json_map, to_timestamp,
};

fn event_type(kind: i32) -> Result<EventType, FieldViolation> {
    match pb::EventType::try_from(kind) {
        Ok(pb::EventType::Identify) => Ok(EventType::Identify),
        Ok(pb::EventType::Track) => Ok(EventType::Track),
        Ok(pb::EventType::Page) => Ok(EventType::Page),
        Ok(pb::EventType::Screen) => Ok(EventType::Screen),
        Ok(pb::EventType::Group) => Ok(EventType::Group),
        Ok(pb::EventType::Alias) => Ok(EventType::Alias),
        Ok(pb::EventType::Unspecified) | Err(_) => Err(FieldViolation::new(
            "type",
            "must be one of identify, track, page, screen, group, alias",
        )),
    }
}

fn pb_event_type(kind: EventType) -> pb::EventType {
    match kind {
        EventType::Identify => pb::EventType::Identify,
        EventType::Track => pb::EventType::Track,
        EventType::Page => pb::EventType::Page,
        EventType::Screen => pb::EventType::Screen,
        EventType::Group => pb::EventType::Group,
        EventType::Alias => pb::EventType::Alias,
    }
}

fn time_field(
    field: &str,
    ts: Option<&prost_types::Timestamp>,
    violations: &mut Vec<FieldViolation>,
) -> Option<time::OffsetDateTime> {
    let ts = ts?;
    let t = from_timestamp(ts);
    if t.is_none() {
        violations.push(FieldViolation::new(field, "timestamp out of range"));
    }
    t
}

/// The domain event of a protobuf event, or every violation found. `received_at` is ignored:
/// the server sets it.
pub(crate) fn event_from_pb(event: pb::Event) -> Result<Event, Vec<FieldViolation>> {
    let pb::Event {
        message_id,
        r#type,
        user_id,
        anonymous_id,
        event,
        name,
        category,
        group_id,
        previous_id,
        properties,
        traits,
        context,
        integrations,
        timestamp,
        original_timestamp,
        sent_at,
        received_at: _,
    } = event;
    let mut violations = Vec::new();
    let kind = event_type(r#type).map_err(|v| violations.push(v)).ok();
    let timestamp = time_field("timestamp", timestamp.as_ref(), &mut violations);
    let original_timestamp = time_field(
        "original_timestamp",
        original_timestamp.as_ref(),
        &mut violations,
    );
    let sent_at = time_field("sent_at", sent_at.as_ref(), &mut violations);
    let Some(kind) = kind else {
        return Err(violations);
    };
    let map =
        |s: Option<prost_types::Struct>| s.as_ref().map(struct_to_json_map).unwrap_or_default();
    let domain = Event {
        message_id,
        kind,
        user_id,
        anonymous_id,
        event,
        name,
        category,
        group_id,
        previous_id,
        properties: map(properties),
        traits: map(traits),
        context: map(context),
        integrations: map(integrations),
        timestamp,
        original_timestamp,
        sent_at,
        received_at: None,
    };
    violations.extend(domain.validate());
    if violations.is_empty() {
        Ok(domain)
    } else {
        Err(violations)
    }
}

/// The protobuf form of a domain event.
pub(crate) fn event_to_pb(event: &Event) -> pb::Event {
    let Event {
        message_id,
        kind,
        user_id,
        anonymous_id,
        event,
        name,
        category,
        group_id,
        previous_id,
        properties,
        traits,
        context,
        integrations,
        timestamp,
        original_timestamp,
        sent_at,
        received_at,
    } = event;
    let object = |m: &serde_json::Map<String, serde_json::Value>| {
        (!m.is_empty()).then(|| json_map_to_struct(m))
    };
    pb::Event {
        message_id: message_id.clone(),
        r#type: pb_event_type(*kind).into(),
        user_id: user_id.clone(),
        anonymous_id: anonymous_id.clone(),
        event: event.clone(),
        name: name.clone(),
        category: category.clone(),
        group_id: group_id.clone(),
        previous_id: previous_id.clone(),
        properties: object(properties),
        traits: object(traits),
        context: object(context),
        integrations: object(integrations),
        timestamp: timestamp.map(to_timestamp),
        original_timestamp: original_timestamp.map(to_timestamp),
        sent_at: sent_at.map(to_timestamp),
        received_at: received_at.map(to_timestamp),
    }
}

/// The protobuf form of an identifier.
pub(crate) fn identifier_to_pb(id: tessera_core::Identifier) -> pb::Identifier {
    let tessera_core::Identifier { kind, value } = id;
    pb::Identifier {
        r#type: kind,
        value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_type_is_named() {
        let err = event_from_pb(pb::Event::default()).unwrap_err();
        assert_eq!(err[0].field, "type");
    }

    #[test]
    fn events_round_trip() {
        let mut e = Event::new(EventType::Track);
        e.message_id = "m1".into();
        e.user_id = "u1".into();
        e.event = "Order Completed".into();
        e.properties = serde_json::json!({"revenue": 12.5, "items": [1, 2]})
            .as_object()
            .unwrap()
            .clone();
        e.timestamp = Some(time::macros::datetime!(2026-01-01 00:00:00.5 UTC));
        let back = event_from_pb(event_to_pb(&e)).unwrap();
        assert_eq!(back, e);
    }
}
