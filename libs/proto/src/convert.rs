//! Conversions between protobuf messages and `serde_json` / `time` / `tessera_core` types, used
//! at every service's edge: well-known types (`Struct`, `Value`, `Timestamp`) and the event.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Timestamp, Value};
use tessera_core::{Event, EventType, FieldViolation};
use time::OffsetDateTime;

/// Converts a JSON value to a protobuf `Value`. Numbers become doubles, as in protobuf's JSON
/// mapping.
pub fn json_to_value(json: &serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(json_map_to_struct(map)),
    };
    Value { kind: Some(kind) }
}

/// Converts a JSON object to a protobuf `Struct`.
pub fn json_map_to_struct(map: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

/// Converts a protobuf `Value` to JSON. Whole doubles within i64 range become integers, so JSON
/// that went through protobuf keeps `3` rather than `3.0`; non-finite doubles become null.
pub fn value_to_json(value: &Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number_to_json(*n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(s)) => serde_json::Value::Object(struct_to_json_map(s)),
    }
}

/// Converts a protobuf `Struct` to a JSON object.
pub fn struct_to_json_map(s: &Struct) -> serde_json::Map<String, serde_json::Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

// 2^53: above it not every integer is representable as a double, so keep the double.
const MAX_EXACT_INT: f64 = 9_007_199_254_740_992.0;

fn number_to_json(n: f64) -> serde_json::Value {
    if n.fract() == 0.0 && n.abs() <= MAX_EXACT_INT {
        #[allow(clippy::cast_possible_truncation)]
        return serde_json::Value::from(n as i64);
    }
    serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// Converts a time to a protobuf `Timestamp`.
pub fn to_timestamp(t: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

/// Converts a protobuf `Timestamp` to a time; `None` when it is out of range.
pub fn from_timestamp(ts: &Timestamp) -> Option<OffsetDateTime> {
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// `t` truncated to whole microseconds: the precision Postgres keeps, so a value built in memory
/// equals the same value read back, on every backend.
pub fn micros(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap_or(t)
}

/// A timestamp every store can keep (years 1 to 9999, as RFC 3339 allows), to the microsecond;
/// `None` outside that range.
pub fn storable_time(ts: &Timestamp) -> Option<OffsetDateTime> {
    from_timestamp(ts)
        .filter(|t| (1..=9999).contains(&t.year()))
        .map(micros)
}

fn event_type(kind: i32) -> Option<EventType> {
    use crate::common::v1::EventType as Pb;
    match Pb::try_from(kind) {
        Ok(Pb::Identify) => Some(EventType::Identify),
        Ok(Pb::Track) => Some(EventType::Track),
        Ok(Pb::Page) => Some(EventType::Page),
        Ok(Pb::Screen) => Some(EventType::Screen),
        Ok(Pb::Group) => Some(EventType::Group),
        Ok(Pb::Alias) => Some(EventType::Alias),
        Ok(Pb::Unspecified) | Err(_) => None,
    }
}

fn pb_event_type(kind: EventType) -> crate::common::v1::EventType {
    use crate::common::v1::EventType as Pb;
    match kind {
        EventType::Identify => Pb::Identify,
        EventType::Track => Pb::Track,
        EventType::Page => Pb::Page,
        EventType::Screen => Pb::Screen,
        EventType::Group => Pb::Group,
        EventType::Alias => Pb::Alias,
    }
}

/// The domain event of a protobuf event: a known type and storable timestamps, or every
/// violation found (field paths relative to the event). The Segment Spec rules are checked
/// separately, by [`Event::validate`].
pub fn event_from_pb(event: crate::common::v1::Event) -> Result<Event, Vec<FieldViolation>> {
    let crate::common::v1::Event {
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
        received_at,
    } = event;
    let mut violations = Vec::new();
    let kind = event_type(r#type);
    if kind.is_none() {
        violations.push(FieldViolation::new(
            "type",
            "must be one of identify, track, page, screen, group, alias",
        ));
    }
    let mut time = |ts: Option<Timestamp>, field: &str| {
        let ts = ts?;
        let t = storable_time(&ts);
        if t.is_none() {
            violations.push(FieldViolation::new(field, "out of range (years 1 to 9999)"));
        }
        t
    };
    let timestamp = time(timestamp, "timestamp");
    let original_timestamp = time(original_timestamp, "original_timestamp");
    let sent_at = time(sent_at, "sent_at");
    let received_at = time(received_at, "received_at");
    // JSON has no NaN or infinity: refused by name rather than stored as null.
    for (field, map) in [
        ("properties", &properties),
        ("traits", &traits),
        ("context", &context),
        ("integrations", &integrations),
    ] {
        if let Some(path) = map.as_ref().and_then(|s| non_finite_path(s, field)) {
            violations.push(FieldViolation::new(
                path,
                "must be a finite number (JSON has no NaN or infinity)",
            ));
        }
    }
    let Some(kind) = kind.filter(|_| violations.is_empty()) else {
        return Err(violations);
    };
    let map = |s: Option<Struct>| s.as_ref().map(struct_to_json_map).unwrap_or_default();
    Ok(Event {
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
        received_at,
    })
}

/// The path (`properties.items[2].price`) of the first NaN or infinite number in `s`, under
/// `prefix`.
fn non_finite_path(s: &Struct, prefix: &str) -> Option<String> {
    fn walk(value: &Value, path: String) -> Option<String> {
        match &value.kind {
            Some(Kind::NumberValue(n)) if !n.is_finite() => Some(path),
            Some(Kind::ListValue(list)) => list
                .values
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, format!("{path}[{i}]"))),
            Some(Kind::StructValue(s)) => s
                .fields
                .iter()
                .find_map(|(k, v)| walk(v, format!("{path}.{k}"))),
            None
            | Some(
                Kind::NullValue(_)
                | Kind::NumberValue(_)
                | Kind::StringValue(_)
                | Kind::BoolValue(_),
            ) => None,
        }
    }
    s.fields
        .iter()
        .find_map(|(k, v)| walk(v, format!("{prefix}.{k}")))
}

/// The protobuf form of a domain event.
pub fn event_to_pb(event: &Event) -> crate::common::v1::Event {
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
    crate::common::v1::Event {
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
pub fn identifier_to_pb(id: tessera_core::Identifier) -> crate::common::v1::Identifier {
    let tessera_core::Identifier { kind, value } = id;
    crate::common::v1::Identifier {
        r#type: kind,
        value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_numbers_are_refused_by_path() {
        let number = |n: f64| Value {
            kind: Some(Kind::NumberValue(n)),
        };
        let nested = Struct {
            fields: [(
                "items".to_owned(),
                Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: vec![number(1.0), number(f64::INFINITY)],
                    })),
                },
            )]
            .into(),
        };
        let event = crate::common::v1::Event {
            r#type: crate::common::v1::EventType::Track.into(),
            properties: Some(nested),
            traits: Some(Struct {
                fields: [("score".to_owned(), number(f64::NAN))].into(),
            }),
            ..Default::default()
        };
        let fields: Vec<_> = event_from_pb(event)
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["properties.items[1]", "traits.score"]);
    }

    #[test]
    fn json_round_trips_through_struct() {
        let json = serde_json::json!({
            "a": 1, "b": 2.5, "c": "x", "d": [true, null, {"e": -3}], "f": {}
        });
        let serde_json::Value::Object(map) = &json else {
            panic!("not an object")
        };
        let back = serde_json::Value::Object(struct_to_json_map(&json_map_to_struct(map)));
        assert_eq!(back, json);
    }

    #[test]
    fn timestamps_round_trip() {
        let t = time::macros::datetime!(2026-11-28 12:34:56.789_012 UTC);
        assert_eq!(from_timestamp(&to_timestamp(t)), Some(t));
    }

    #[test]
    fn unspecified_types_and_unstorable_times_are_named() {
        let err = event_from_pb(crate::common::v1::Event::default()).unwrap_err();
        assert_eq!(err[0].field, "type");
        let far = crate::common::v1::Event {
            r#type: crate::common::v1::EventType::Track.into(),
            timestamp: Some(Timestamp {
                seconds: 400_000_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert_eq!(event_from_pb(far).unwrap_err()[0].field, "timestamp");
    }

    #[test]
    fn events_round_trip_to_the_microsecond() {
        let mut e = Event::new(EventType::Track);
        e.message_id = "m1".into();
        e.user_id = "u1".into();
        e.event = "Order Completed".into();
        e.properties = serde_json::json!({"revenue": 12.5, "items": [1, 2]})
            .as_object()
            .unwrap()
            .clone();
        e.timestamp = Some(time::macros::datetime!(2026-01-01 00:00:00.123_456 UTC));
        assert_eq!(event_from_pb(event_to_pb(&e)).unwrap(), e);
        e.timestamp = Some(time::macros::datetime!(2026-01-01 00:00:00.123_456_789 UTC));
        let back = event_from_pb(event_to_pb(&e)).unwrap();
        assert_eq!(
            back.timestamp,
            Some(time::macros::datetime!(2026-01-01 00:00:00.123_456 UTC))
        );
    }
}
