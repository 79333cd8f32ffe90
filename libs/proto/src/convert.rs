//! Conversions between protobuf well-known types (`Struct`, `Value`, `Timestamp`) and
//! `serde_json` / `time`, used at every service's edge.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Timestamp, Value};
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
