//! The Segment HTTP wire format, read leniently: what real client libraries send becomes a
//! domain [`Event`], or the list of what is wrong with it, with field paths as the client wrote
//! them (`userId`, `context`, `timestamp`).
//!
//! Lenient means: `null` is "absent", numeric ids are stringified, every ISO-8601 time the
//! libraries emit parses (any fraction length, `Z`, `+00:00`, `+0000`, or no offset at all, read
//! as UTC), unknown fields are ignored, and the batch envelope's `context`, `integrations` and
//! `sentAt` (or its `timestamp`, which older libraries send instead) fill what a message lacks.

use serde_json::{Map, Value};
use tessera_core::{Event, EventType, FieldViolation};
use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// The largest message accepted, as compact JSON: Segment's 32 KB per call.
pub(crate) const MAX_MESSAGE_BYTES: usize = 32 * 1024;

/// What the envelope of a request gives every message that lacks it. For a single-message
/// route the message is its own envelope.
#[derive(Debug, Default)]
pub(crate) struct Envelope {
    /// The `writeKey` in the body, if any.
    pub(crate) write_key: Option<String>,
    /// The batch `context`, merged under each message's own.
    pub(crate) context: Map<String, Value>,
    /// The batch `integrations`, merged under each message's own.
    pub(crate) integrations: Map<String, Value>,
    /// The batch `sentAt`, else its `timestamp`.
    pub(crate) sent_at: Option<OffsetDateTime>,
}

/// Reads the envelope fields of a request body; violations are named as in the body. For a
/// single message (`batch` false) only its `writeKey` is the envelope's: the rest is its own.
pub(crate) fn envelope(
    body: &Map<String, Value>,
    batch: bool,
) -> Result<Envelope, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let write_key = match body.get("writeKey") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            violations.push(FieldViolation::new("writeKey", "must be a string"));
            None
        }
    };
    if !batch {
        return if violations.is_empty() {
            Ok(Envelope {
                write_key,
                ..Envelope::default()
            })
        } else {
            Err(violations)
        };
    }
    let context = object(body, "context", &mut violations);
    let integrations = object(body, "integrations", &mut violations);
    let sent_at = time_field(body, "sentAt", &mut violations)
        .or_else(|| time_field(body, "timestamp", &mut violations));
    if violations.is_empty() {
        Ok(Envelope {
            write_key,
            context,
            integrations,
            sent_at,
        })
    } else {
        Err(violations)
    }
}

/// Why one message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// It breaks a rule; each violation names a field.
    Invalid(Vec<FieldViolation>),
    /// It is larger than [`MAX_MESSAGE_BYTES`]; the size in bytes.
    TooLarge(usize),
}

/// The domain event of one wire message. `kind` is the route's type (`/v1/track`); `None` for
/// a batch, whose messages carry their own `type`. `received_at` is only used to check that the
/// clock-skew correction stays in range; ingestion stamps the event itself.
pub(crate) fn message(
    value: Value,
    kind: Option<EventType>,
    envelope: &Envelope,
    received_at: OffsetDateTime,
) -> Result<Event, Refusal> {
    let size = compact_len(&value);
    if size > MAX_MESSAGE_BYTES {
        return Err(Refusal::TooLarge(size));
    }
    let Value::Object(map) = value else {
        return Err(Refusal::Invalid(vec![FieldViolation::new(
            "",
            "a message must be a JSON object",
        )]));
    };
    let mut violations = Vec::new();
    if let Some(path) = nul_path(&map) {
        violations.push(FieldViolation::new(
            path,
            "contains a NUL character (\\u0000), which cannot be stored",
        ));
    }
    let kind = match kind {
        Some(kind) => Some(kind),
        None => event_type(&map, &mut violations),
    };
    let mut ids = |key: &str| id(&map, key, &mut violations);
    let message_id = ids("messageId");
    let user_id = ids("userId");
    let anonymous_id = ids("anonymousId");
    let group_id = ids("groupId");
    let previous_id = ids("previousId");
    let event = ids("event");
    let name = ids("name");
    let category = ids("category");
    let properties = object(&map, "properties", &mut violations);
    let traits = object(&map, "traits", &mut violations);
    let mut context = object(&map, "context", &mut violations);
    let mut integrations = object(&map, "integrations", &mut violations);
    let timestamp = time_field(&map, "timestamp", &mut violations);
    let original_timestamp = time_field(&map, "originalTimestamp", &mut violations);
    let sent_at = time_field(&map, "sentAt", &mut violations).or(envelope.sent_at);
    for (key, value) in &envelope.context {
        context.entry(key.clone()).or_insert_with(|| value.clone());
    }
    for (key, value) in &envelope.integrations {
        integrations
            .entry(key.clone())
            .or_insert_with(|| value.clone());
    }
    if let (Some(original), Some(sent)) = (original_timestamp.or(timestamp), sent_at) {
        // Ingestion computes `receivedAt - (sentAt - originalTimestamp)`: refuse what would
        // land outside the storable years rather than fail the whole request there.
        let corrected = received_at.checked_sub(sent - original);
        if !corrected.is_some_and(|t| (1..=9999).contains(&t.year())) {
            violations.push(FieldViolation::new(
                "sentAt",
                "too far from the message's timestamp: the clock-skew-corrected time is out of range",
            ));
        }
    }
    let Some(kind) = kind else {
        return Err(Refusal::Invalid(violations));
    };
    let event = Event {
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
        received_at: None,
    };
    // A field already refused for its form (`userId: {}`) is not named a second time.
    for v in event.validate().into_iter().map(wire_names) {
        if !violations.iter().any(|w| w.field == v.field) {
            violations.push(v);
        }
    }
    if violations.is_empty() {
        Ok(event)
    } else {
        Err(Refusal::Invalid(violations))
    }
}

fn event_type(map: &Map<String, Value>, violations: &mut Vec<FieldViolation>) -> Option<EventType> {
    let kind = match map.get("type") {
        None | Some(Value::Null) => {
            violations.push(FieldViolation::new(
                "type",
                "required in a batch: one of identify, track, page, screen, group, alias",
            ));
            return None;
        }
        Some(Value::String(s)) => s.trim().to_ascii_lowercase(),
        Some(_) => String::new(),
    };
    let kind = match kind.as_str() {
        "identify" => EventType::Identify,
        "track" => EventType::Track,
        "page" => EventType::Page,
        "screen" => EventType::Screen,
        "group" => EventType::Group,
        "alias" => EventType::Alias,
        _ => {
            violations.push(FieldViolation::new(
                "type",
                "must be one of identify, track, page, screen, group, alias",
            ));
            return None;
        }
    };
    Some(kind)
}

/// A string field; numbers are stringified (libraries send numeric user ids), `null` is absent.
fn id(map: &Map<String, Value>, key: &str, violations: &mut Vec<FieldViolation>) -> String {
    match map.get(key) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(_) | Value::Array(_) | Value::Object(_)) => {
            violations.push(FieldViolation::new(key, "must be a string or a number"));
            String::new()
        }
    }
}

/// An object field; `null` is absent.
fn object(
    map: &Map<String, Value>,
    key: &str,
    violations: &mut Vec<FieldViolation>,
) -> Map<String, Value> {
    match map.get(key) {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(Value::Bool(_) | Value::Number(_) | Value::String(_) | Value::Array(_)) => {
            violations.push(FieldViolation::new(key, "must be a JSON object"));
            Map::new()
        }
    }
}

/// A time field; `null` and `""` are absent.
fn time_field(
    map: &Map<String, Value>,
    key: &str,
    violations: &mut Vec<FieldViolation>,
) -> Option<OffsetDateTime> {
    match map.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => {
            let t = parse_time(s);
            if t.is_none() {
                violations.push(FieldViolation::new(
                    key,
                    "must be an ISO-8601 date and time (for example 2026-01-31T12:00:00.000Z) in years 1 to 9999",
                ));
            }
            t
        }
        Some(Value::Bool(_) | Value::Number(_) | Value::Array(_) | Value::Object(_)) => {
            violations.push(FieldViolation::new(
                key,
                "must be an ISO-8601 date and time string",
            ));
            None
        }
    }
}

/// Parses the times libraries send: RFC 3339 with any fraction, ISO-8601 with a basic offset
/// (`+0000`), or no offset (read as UTC); a space instead of `T` too. Converted to UTC and
/// truncated to the microsecond, the precision every store keeps; `None` outside years 1 to
/// 9999.
pub(crate) fn parse_time(s: &str) -> Option<OffsetDateTime> {
    let s = s.trim();
    let spaced;
    let s = if s.as_bytes().get(10) == Some(&b' ') {
        spaced = format!("{}T{}", &s[..10], &s[11..]);
        spaced.as_str()
    } else {
        s
    };
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .or_else(|_| OffsetDateTime::parse(s, &Iso8601::DEFAULT))
        .or_else(|_| PrimitiveDateTime::parse(s, &Iso8601::DEFAULT).map(|t| t.assume_utc()))
        .ok()?
        .checked_to_offset(UtcOffset::UTC)?;
    let t = tessera_proto::convert::micros(t);
    (1..=9999).contains(&t.year()).then_some(t)
}

/// A domain violation (`user_id`) renamed to the wire's field names (`userId`).
fn wire_names(v: FieldViolation) -> FieldViolation {
    FieldViolation {
        field: camel(&v.field),
        description: camel(&v.description),
    }
}

fn camel(s: &str) -> String {
    [
        ("message_id", "messageId"),
        ("user_id", "userId"),
        ("anonymous_id", "anonymousId"),
        ("group_id", "groupId"),
        ("previous_id", "previousId"),
        ("original_timestamp", "originalTimestamp"),
        ("sent_at", "sentAt"),
    ]
    .into_iter()
    .fold(s.to_owned(), |s, (from, to)| s.replace(from, to))
}

/// The length of `value` as compact JSON, without building it.
pub(crate) fn compact_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a Value to an infallible writer cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// The path of the first key or string holding a NUL character: Postgres cannot store one in
/// JSON, so such a message is refused by name instead of failing its whole batch.
pub(crate) fn nul_path(map: &Map<String, Value>) -> Option<String> {
    fn walk(value: &Value, path: &str) -> Option<String> {
        match value {
            Value::String(s) => s.contains('\0').then(|| path.to_owned()),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| walk(v, &format!("{path}[{i}]"))),
            Value::Object(map) => map.iter().find_map(|(k, v)| {
                let path = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if k.contains('\0') {
                    Some(path)
                } else {
                    walk(v, &path)
                }
            }),
            Value::Null | Value::Bool(_) | Value::Number(_) => None,
        }
    }
    map.iter().find_map(|(k, v)| {
        if k.contains('\0') {
            Some(k.clone())
        } else {
            walk(v, k)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-28 12:52:00 UTC);

    fn read(value: Value, kind: Option<EventType>) -> Result<Event, Refusal> {
        message(value, kind, &Envelope::default(), NOW)
    }

    fn fields(r: Result<Event, Refusal>) -> Vec<String> {
        match r {
            Err(Refusal::Invalid(vs)) => vs.into_iter().map(|v| v.field).collect(),
            other => panic!("expected violations, got {other:?}"),
        }
    }

    #[test]
    fn every_time_format_libraries_send_parses() {
        let want = datetime!(2026-11-28 12:51:49.224 UTC);
        for s in [
            "2026-11-28T12:51:49.224Z",
            "2026-11-28T12:51:49.224+00:00",
            "2026-11-28T12:51:49.224000+00:00",
            "2026-11-28T12:51:49.224000000Z",
            "2026-11-28T13:51:49.224+01:00",
            "2026-11-28T12:51:49.224+0000",
            "2026-11-28T12:51:49.224",
            "2026-11-28 12:51:49.224Z",
            "2026-11-28t12:51:49.224z",
        ] {
            assert_eq!(parse_time(s), Some(want), "{s}");
        }
        assert_eq!(
            parse_time("2026-11-28T13:51:49.224+01:00")
                .unwrap()
                .offset(),
            UtcOffset::UTC
        );
        assert_eq!(
            parse_time("2026-11-28T12:51:49Z"),
            Some(datetime!(2026-11-28 12:51:49 UTC))
        );
        // Microseconds are kept, nanoseconds truncated.
        assert_eq!(
            parse_time("2026-11-28T12:51:49.724629123+00:00"),
            Some(datetime!(2026-11-28 12:51:49.724629 UTC))
        );
        for bad in [
            "yesterday",
            "2026-13-01T00:00:00Z",
            "0000-01-01T00:00:00Z",
            "1",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn python_nulls_and_numeric_ids_are_accepted() {
        let e = read(
            json!({"type": "track", "userId": 42, "anonymousId": null, "event": "Bought",
                   "properties": null, "timestamp": "2026-11-28T12:51:49.224+00:00"}),
            None,
        )
        .unwrap();
        assert_eq!(e.user_id, "42");
        assert_eq!(e.anonymous_id, "");
        assert_eq!(e.kind, EventType::Track);
        assert_eq!(e.timestamp, Some(datetime!(2026-11-28 12:51:49.224 UTC)));
        assert!(e.message_id.is_empty(), "ingestion generates it");
    }

    #[test]
    fn the_route_type_wins_and_a_batch_needs_one() {
        let e = read(
            json!({"type": "page", "userId": "u"}),
            Some(EventType::Identify),
        )
        .unwrap();
        assert_eq!(e.kind, EventType::Identify);
        assert_eq!(fields(read(json!({"userId": "u"}), None)), vec!["type"]);
        assert_eq!(
            fields(read(json!({"type": "click", "userId": "u"}), None)),
            vec!["type"]
        );
        let e = read(json!({"type": "Identify", "userId": "u"}), None).unwrap();
        assert_eq!(e.kind, EventType::Identify);
    }

    #[test]
    fn spec_rules_are_named_with_wire_fields() {
        assert_eq!(
            fields(read(json!({"type": "track", "event": "E"}), None)),
            vec!["userId"]
        );
        assert_eq!(
            fields(read(json!({"type": "track", "userId": "u"}), None)),
            vec!["event"]
        );
        assert_eq!(
            fields(read(json!({"type": "group", "userId": "u"}), None)),
            vec!["groupId"]
        );
        assert_eq!(
            fields(read(json!({"type": "alias", "anonymousId": "a"}), None)),
            vec!["previousId", "userId"]
        );
        let Err(Refusal::Invalid(vs)) = read(json!({"type": "identify"}), None) else {
            panic!("identify without ids must be refused");
        };
        assert_eq!(vs[0].description, "userId or anonymousId is required");
    }

    #[test]
    fn wrong_types_and_bad_times_name_their_field() {
        assert_eq!(
            fields(read(
                json!({"type": "track", "userId": "u", "event": "E", "properties": [1],
                       "context": "x", "timestamp": "soon", "sentAt": 17, "anonymousId": true}),
                None,
            )),
            vec![
                "anonymousId",
                "properties",
                "context",
                "timestamp",
                "sentAt"
            ]
        );
        assert_eq!(fields(read(json!(["not", "an", "object"]), None)), vec![""]);
    }

    #[test]
    fn identify_traits_may_live_in_context_only() {
        let e = read(
            json!({"type": "identify", "userId": "u", "context": {"traits": {"plan": "pro"}}}),
            None,
        )
        .unwrap();
        assert_eq!(e.person_traits().unwrap()["plan"], "pro");
    }

    #[test]
    fn the_envelope_fills_what_a_message_lacks() {
        let env = envelope(
            json!({"batch": [], "context": {"library": {"name": "lib"}, "ip": "1.2.3.4"},
                   "integrations": {"All": false}, "timestamp": "2026-11-28T12:51:59.836Z",
                   "writeKey": "k"})
            .as_object()
            .unwrap(),
            true,
        )
        .unwrap();
        assert_eq!(env.write_key.as_deref(), Some("k"));
        assert_eq!(env.sent_at, Some(datetime!(2026-11-28 12:51:59.836 UTC)));
        let e = message(
            json!({"type": "track", "userId": "u", "event": "E", "context": {"ip": "5.6.7.8"},
                   "originalTimestamp": "2026-11-28T12:51:59.835Z"}),
            None,
            &env,
            NOW,
        )
        .unwrap();
        assert_eq!(e.context["ip"], "5.6.7.8", "the message's own context wins");
        assert_eq!(e.context["library"]["name"], "lib");
        assert_eq!(e.integrations["All"], false);
        assert_eq!(e.sent_at, env.sent_at);
        assert_eq!(
            e.original_timestamp,
            Some(datetime!(2026-11-28 12:51:59.835 UTC))
        );
        // The message's own sentAt wins over the envelope's.
        let e = message(
            json!({"type": "track", "userId": "u", "event": "E",
                   "sentAt": "2026-11-28T12:51:59.900Z"}),
            None,
            &env,
            NOW,
        )
        .unwrap();
        assert_eq!(e.sent_at, Some(datetime!(2026-11-28 12:51:59.9 UTC)));
        assert_eq!(
            envelope(
                json!({"sentAt": "later", "context": 1})
                    .as_object()
                    .unwrap(),
                true,
            )
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect::<Vec<_>>(),
            vec!["context", "sentAt"]
        );
    }

    #[test]
    fn a_single_message_is_its_own_envelope() {
        let body = json!({"userId": "u", "event": "E", "writeKey": "k",
                          "timestamp": "2020-01-01T00:00:00Z", "context": {"ip": "1.2.3.4"}});
        let env = envelope(body.as_object().unwrap(), false).unwrap();
        assert_eq!(env.write_key.as_deref(), Some("k"));
        // Its own timestamp is the event's time, not a send time to correct it against.
        assert_eq!(env.sent_at, None);
        let e = message(body, Some(EventType::Track), &env, NOW).unwrap();
        assert_eq!(e.sent_at, None);
        assert_eq!(e.timestamp, Some(datetime!(2020-01-01 00:00:00 UTC)));
        assert_eq!(
            envelope(json!({"writeKey": 1}).as_object().unwrap(), false).unwrap_err()[0].field,
            "writeKey"
        );
    }

    #[test]
    fn out_of_range_skew_correction_is_refused() {
        let r = read(
            json!({"type": "track", "userId": "u", "event": "E",
                   "timestamp": "9999-01-01T00:00:00Z", "sentAt": "0001-01-01T00:00:00Z"}),
            None,
        );
        assert_eq!(fields(r), vec!["sentAt"]);
    }

    #[test]
    fn oversized_messages_and_nul_characters_are_refused() {
        let big = json!({"type": "track", "userId": "u", "event": "E",
                         "properties": {"blob": "x".repeat(MAX_MESSAGE_BYTES)}});
        assert!(matches!(read(big, None), Err(Refusal::TooLarge(n)) if n > MAX_MESSAGE_BYTES));
        let nul = json!({"type": "track", "userId": "u", "event": "E",
                         "properties": {"list": ["ok", "bad\u{0}"]}});
        assert_eq!(fields(read(nul, None)), vec!["properties.list[1]"]);
    }

    #[test]
    fn compact_len_is_the_serialized_length() {
        let v = json!({"a": [1, 2, {"b": "ü"}]});
        assert_eq!(compact_len(&v), serde_json::to_vec(&v).unwrap().len());
    }
}
