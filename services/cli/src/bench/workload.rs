//! The synthetic workload: Segment-style identify, track and page events from a population of
//! visitors who browse anonymously, later identify, churn, and come back on new devices. The
//! events are generated once, as protobuf, and written as Segment JSON for the HTTP API.

use std::fmt;

use prost_types::value::Kind;
use prost_types::{Struct, Timestamp, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::ser::{SerializeMap as _, SerializeSeq as _};
use serde::{Serialize, Serializer};
use tessera_proto::common::v1::{Event, EventType};

/// Share of identify events, in percent; the rest is track and page.
const IDENTIFY_PERCENT: u32 = 10;
/// Share of track events, in percent.
const TRACK_PERCENT: u32 = 70;
/// Chance that the visitor picked for an event has left and a new one takes the place, so fresh
/// visitors (and first identifies) keep arriving during long runs.
const CHURN: f64 = 0.01;
/// Chance that an identified person shows up on a new device, browses anonymously there and
/// later identifies again, which makes the identity service merge two profiles.
const NEW_DEVICE: f64 = 0.02;
/// Share of picks that go to the 1% most active visitors.
const HOT_SHARE: f64 = 0.2;
/// Share of identified users' orders reported by a backend (user id only, no anonymous id).
const SERVER_SIDE_ORDER: f64 = 0.2;

/// One generated event and what the bench needs to know about it.
#[derive(Debug, Clone)]
pub(super) struct Generated {
    /// The event as sent.
    pub(super) event: Event,
    /// The device (anonymous id) the event carries, as a number; `None` for backend events
    /// without an anonymous id.
    pub(super) device: Option<u64>,
    /// Whether this is the first identify of a user id never sent before in this run.
    pub(super) first_identify: bool,
    /// Whether this is the person's first `Order Completed` and carries their user id, so the
    /// profile read by that user id has no order before it and has one once it is applied.
    pub(super) first_order: bool,
}

#[derive(Debug, Clone, Copy)]
struct Visitor {
    generation: u32,
    /// The person has identified at least once: their user id exists.
    identified: bool,
    /// The device the visitor currently uses.
    device: u64,
    /// The current device has been linked to the user id by an identify.
    device_linked: bool,
    /// The person has sent an `Order Completed` (on any device, so also one that a later
    /// identify merges into their profile).
    ordered: bool,
}

/// Generates events for a population of `users` visitors. Deterministic for a seed, except for
/// the run id, which makes ids unique per run so repeated runs against the same data stay fresh.
#[derive(Debug)]
pub(super) struct Workload {
    rng: StdRng,
    run_id: String,
    seq: u64,
    next_device: u64,
    visitors: Vec<Visitor>,
    hot: usize,
}

impl Workload {
    /// A population of `users` anonymous visitors (at least one).
    pub(super) fn new(users: usize, seed: u64, run_id: &str) -> Self {
        let users = users.max(1);
        let visitors = (0..users)
            .map(|i| Visitor {
                generation: 0,
                identified: false,
                device: i as u64,
                device_linked: false,
                ordered: false,
            })
            .collect();
        Self {
            rng: StdRng::seed_from_u64(seed),
            run_id: run_id.to_owned(),
            seq: 0,
            next_device: users as u64,
            visitors,
            hot: (users / 100).max(1),
        }
    }

    /// The next `n` events, all stamped `now`.
    pub(super) fn batch(&mut self, n: usize, now: Timestamp) -> Vec<Generated> {
        (0..n).map(|_| self.next(now)).collect()
    }

    /// The next event, stamped `now`.
    pub(super) fn next(&mut self, now: Timestamp) -> Generated {
        let slot = self.pick();
        self.evolve(slot);
        let roll = self.rng.random_range(0..100);
        let mut generated = if roll < IDENTIFY_PERCENT {
            self.identify(slot, now)
        } else if roll < IDENTIFY_PERCENT + TRACK_PERCENT {
            self.track(slot)
        } else {
            self.page(slot)
        };
        self.seq += 1;
        let e = &mut generated.event;
        e.message_id = format!("bench-{}-{}", self.run_id, self.seq);
        e.timestamp = Some(now);
        e.sent_at = Some(now);
        e.context = Some(self.context());
        generated
    }

    fn pick(&mut self) -> usize {
        if self.rng.random_bool(HOT_SHARE) {
            self.rng.random_range(0..self.hot)
        } else {
            self.rng.random_range(0..self.visitors.len())
        }
    }

    fn evolve(&mut self, slot: usize) {
        if self.rng.random_bool(CHURN) {
            let generation = self.visitors[slot].generation + 1;
            let device = self.new_device();
            self.visitors[slot] = Visitor {
                generation,
                identified: false,
                device,
                device_linked: false,
                ordered: false,
            };
        } else if self.visitors[slot].identified && self.rng.random_bool(NEW_DEVICE) {
            let device = self.new_device();
            let v = &mut self.visitors[slot];
            v.device = device;
            v.device_linked = false;
        }
    }

    fn new_device(&mut self) -> u64 {
        let d = self.next_device;
        self.next_device += 1;
        d
    }

    fn user_id(&self, slot: usize) -> String {
        format!(
            "u-{}-{slot}-{}",
            self.run_id, self.visitors[slot].generation
        )
    }

    fn anonymous_id(&self, device: u64) -> String {
        format!("a-{}-{device}", self.run_id)
    }

    /// The ids a browser event carries: the anonymous id, plus the user id once this device has
    /// identified (as analytics.js does).
    fn browser_ids(&self, slot: usize) -> (String, String, Option<u64>) {
        let v = self.visitors[slot];
        let user_id = if v.device_linked {
            self.user_id(slot)
        } else {
            String::new()
        };
        (user_id, self.anonymous_id(v.device), Some(v.device))
    }

    fn identify(&mut self, slot: usize, now: Timestamp) -> Generated {
        let v = self.visitors[slot];
        let first_identify = !v.identified;
        let user_id = self.user_id(slot);
        let person = Person::of(slot, v.generation);
        let mut traits = vec![
            (
                "email",
                s(format!(
                    "{}.{}{slot}g{}@{}.example.com",
                    person.first.to_lowercase(),
                    person.last.to_lowercase(),
                    v.generation,
                    self.run_id
                )),
            ),
            ("name", s(format!("{} {}", person.first, person.last))),
            ("company", s(person.company)),
            ("plan", s(*pick(&mut self.rng, PLANS))),
        ];
        if first_identify {
            traits.push(("createdAt", s(rfc3339(now))));
        } else {
            traits.push(("logins", n(f64::from(self.rng.random_range(2..50_u32)))));
        }
        let v = &mut self.visitors[slot];
        v.identified = true;
        v.device_linked = true;
        let device = v.device;
        Generated {
            event: Event {
                r#type: EventType::Identify.into(),
                user_id,
                anonymous_id: self.anonymous_id(device),
                traits: Some(obj(traits)),
                ..Event::default()
            },
            device: Some(device),
            first_identify,
            first_order: false,
        }
    }

    fn track(&mut self, slot: usize) -> Generated {
        let (mut user_id, mut anonymous_id, mut device) = self.browser_ids(slot);
        let name = *weighted(&mut self.rng, TRACK_EVENTS);
        let mut first_order = false;
        let product = Product::random(&mut self.rng);
        let properties = match name {
            "Product Viewed" | "Added to Cart" => {
                let mut p = product.properties();
                if name == "Added to Cart" {
                    p.push(("quantity", n(f64::from(self.rng.random_range(1..4_u32)))));
                }
                p
            }
            "Product List Viewed" => vec![
                ("category", s(product.category)),
                (
                    "list_id",
                    s(format!("list-{}", product.category.to_lowercase())),
                ),
            ],
            "Products Searched" => vec![("query", s(*pick(&mut self.rng, QUERIES)))],
            "Cart Viewed" => vec![("items", n(f64::from(self.rng.random_range(1..6_u32))))],
            "Checkout Started" | "Order Completed" => {
                let items = self.rng.random_range(1..5_u32);
                let revenue = round_cents(product.price * f64::from(items));
                let mut p = vec![
                    ("revenue", n(revenue)),
                    ("currency", s("USD")),
                    ("products", n(f64::from(items))),
                    ("category", s(product.category)),
                ];
                if name == "Order Completed" {
                    p.push(("order_id", s(format!("o-{}-{}", self.run_id, self.seq))));
                    let v = self.visitors[slot];
                    if v.identified && self.rng.random_bool(SERVER_SIDE_ORDER) {
                        // Reported by the shop's backend, which knows only the user id.
                        user_id = self.user_id(slot);
                        anonymous_id = String::new();
                        device = None;
                    }
                    first_order = !v.ordered && !user_id.is_empty();
                    self.visitors[slot].ordered = true;
                }
                p
            }
            _ => product.properties(),
        };
        Generated {
            event: Event {
                r#type: EventType::Track.into(),
                user_id,
                anonymous_id,
                event: name.to_owned(),
                properties: Some(obj(properties)),
                ..Event::default()
            },
            device,
            first_identify: false,
            first_order,
        }
    }

    fn page(&mut self, slot: usize) -> Generated {
        let (user_id, anonymous_id, device) = self.browser_ids(slot);
        let &(name, category) = pick(&mut self.rng, PAGES);
        let product = Product::random(&mut self.rng);
        let path = match name {
            "Home" => "/".to_owned(),
            "Product" => format!("/products/{}", product.id),
            "Category" => format!("/c/{}", product.category.to_lowercase()),
            "Search" => format!(
                "/search?q={}",
                pick(&mut self.rng, QUERIES).replace(' ', "+")
            ),
            "Blog Post" => format!("/blog/post-{}", self.rng.random_range(1..200_u32)),
            _ => format!("/{}", name.to_lowercase()),
        };
        let mut properties = vec![
            ("url", s(format!("https://shop.example.com{path}"))),
            ("path", s(path)),
            ("title", s(format!("{name} | Example Shop"))),
        ];
        if self.rng.random_bool(0.3) {
            properties.push(("referrer", s(*pick(&mut self.rng, REFERRERS))));
        }
        Generated {
            event: Event {
                r#type: EventType::Page.into(),
                user_id,
                anonymous_id,
                name: name.to_owned(),
                category: category.to_owned(),
                properties: Some(obj(properties)),
                ..Event::default()
            },
            device,
            first_identify: false,
            first_order: false,
        }
    }

    fn context(&mut self) -> Struct {
        let ip = format!("203.0.113.{}", self.rng.random_range(1..255_u32));
        obj([
            ("ip", s(ip)),
            ("userAgent", s(*pick(&mut self.rng, USER_AGENTS))),
            ("locale", s(*pick(&mut self.rng, LOCALES))),
            (
                "library",
                Value {
                    kind: Some(Kind::StructValue(obj([
                        ("name", s("tessera-bench")),
                        ("version", s(env!("CARGO_PKG_VERSION"))),
                    ]))),
                },
            ),
        ])
    }
}

fn rfc3339(ts: Timestamp) -> String {
    tessera_proto::convert::from_timestamp(&ts)
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

struct Person {
    first: &'static str,
    last: &'static str,
    company: &'static str,
}

impl Person {
    /// A stable name per visitor, so repeated identifies of one person agree.
    fn of(slot: usize, generation: u32) -> Self {
        let k = slot.wrapping_mul(31).wrapping_add(generation as usize);
        Self {
            first: FIRST_NAMES[k % FIRST_NAMES.len()],
            last: LAST_NAMES[(k / FIRST_NAMES.len()) % LAST_NAMES.len()],
            company: COMPANIES[k % COMPANIES.len()],
        }
    }
}

struct Product {
    id: String,
    category: &'static str,
    price: f64,
}

impl Product {
    fn random(rng: &mut StdRng) -> Self {
        let k: u32 = rng.random_range(0..500);
        Self {
            id: format!("p-{k:04}"),
            category: CATEGORIES[k as usize % CATEGORIES.len()],
            price: round_cents(4.99 + f64::from(k * 37 % 200)),
        }
    }

    fn properties(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("product_id", s(self.id.clone())),
            ("category", s(self.category)),
            ("price", n(self.price)),
            ("currency", s("USD")),
        ]
    }
}

fn round_cents(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn s(v: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(v.into())),
    }
}

fn n(v: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(v)),
    }
}

fn obj(fields: impl IntoIterator<Item = (&'static str, Value)>) -> Struct {
    Struct {
        fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    }
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

fn weighted<'a, T>(rng: &mut StdRng, items: &'a [(T, u32)]) -> &'a T {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut roll = rng.random_range(0..total);
    for (item, w) in items {
        if roll < *w {
            return item;
        }
        roll -= w;
    }
    &items[items.len() - 1].0
}

/// Writes `{"batch":[...]}`, the body of `POST /v1/batch`, with `events` as Segment JSON
/// messages (see [`SegmentMessage`]), straight into `out`: no JSON tree is built.
pub(super) fn write_segment_batch(events: &[Event], out: &mut Vec<u8>) {
    #[derive(Serialize)]
    struct Body<'a> {
        batch: SegmentBatch<'a>,
    }
    // Serializing these types into memory cannot fail: no map key is a non-string and every
    // number is finite or written as null.
    let _ = serde_json::to_writer(
        out,
        &Body {
            batch: SegmentBatch(events),
        },
    );
}

struct SegmentBatch<'a>(&'a [Event]);

impl Serialize for SegmentBatch<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for event in self.0 {
            seq.serialize_element(&SegmentMessage(event))?;
        }
        seq.end()
    }
}

/// A protobuf event as a Segment message of the HTTP API (camelCase keys, empty fields left
/// out, times as RFC 3339 in UTC to the microsecond, whole numbers as integers like
/// `tessera_proto::convert::value_to_json`). `received_at` is not sent: the server sets it.
pub(super) struct SegmentMessage<'a>(pub(super) &'a Event);

impl Serialize for SegmentMessage<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Every field named, so a new proto field does not compile until it is mapped here.
        let Event {
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
        } = self.0;
        let mut map = serializer.serialize_map(None)?;
        if let Some(kind) = segment_type(*r#type) {
            map.serialize_entry("type", kind)?;
        }
        for (key, value) in [
            ("messageId", message_id),
            ("userId", user_id),
            ("anonymousId", anonymous_id),
            ("event", event),
            ("name", name),
            ("category", category),
            ("groupId", group_id),
            ("previousId", previous_id),
        ] {
            if !value.is_empty() {
                map.serialize_entry(key, value)?;
            }
        }
        for (key, value) in [
            ("properties", properties),
            ("traits", traits),
            ("context", context),
            ("integrations", integrations),
        ] {
            if let Some(value) = value {
                map.serialize_entry(key, &JsonStruct(value))?;
            }
        }
        for (key, value) in [
            ("timestamp", timestamp),
            ("originalTimestamp", original_timestamp),
            ("sentAt", sent_at),
        ] {
            if let Some(time) = value
                .as_ref()
                .and_then(tessera_proto::convert::from_timestamp)
            {
                map.serialize_entry(key, &Rfc3339Micros(time))?;
            }
        }
        map.end()
    }
}

/// The Segment `type` of a protobuf event type; `None` for an unspecified or unknown one (the
/// server then names the missing `type`).
fn segment_type(kind: i32) -> Option<&'static str> {
    match EventType::try_from(kind) {
        Ok(EventType::Identify) => Some("identify"),
        Ok(EventType::Track) => Some("track"),
        Ok(EventType::Page) => Some("page"),
        Ok(EventType::Screen) => Some("screen"),
        Ok(EventType::Group) => Some("group"),
        Ok(EventType::Alias) => Some("alias"),
        Ok(EventType::Unspecified) | Err(_) => None,
    }
}

struct JsonStruct<'a>(&'a Struct);

impl Serialize for JsonStruct<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.fields.len()))?;
        for (key, value) in &self.0.fields {
            map.serialize_entry(key, &JsonValue(value))?;
        }
        map.end()
    }
}

struct JsonValue<'a>(&'a Value);

/// 2^53: above it not every integer is a double, so the double is kept (as `value_to_json`).
const MAX_EXACT_INT: f64 = 9_007_199_254_740_992.0;

impl Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0.kind {
            None | Some(Kind::NullValue(_)) => serializer.serialize_unit(),
            Some(Kind::BoolValue(b)) => serializer.serialize_bool(*b),
            Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() <= MAX_EXACT_INT => {
                // Whole and within 2^53: exact as an integer.
                #[allow(clippy::cast_possible_truncation)]
                let whole = *n as i64;
                serializer.serialize_i64(whole)
            }
            Some(Kind::NumberValue(n)) if n.is_finite() => serializer.serialize_f64(*n),
            Some(Kind::NumberValue(_)) => serializer.serialize_unit(),
            Some(Kind::StringValue(s)) => serializer.serialize_str(s),
            Some(Kind::ListValue(list)) => {
                let mut seq = serializer.serialize_seq(Some(list.values.len()))?;
                for value in &list.values {
                    seq.serialize_element(&JsonValue(value))?;
                }
                seq.end()
            }
            Some(Kind::StructValue(s)) => JsonStruct(s).serialize(serializer),
        }
    }
}

/// A time as RFC 3339 in UTC with microseconds (`2026-11-28T12:51:49.224000Z`), the precision
/// every store keeps, written without an intermediate string.
struct Rfc3339Micros(time::OffsetDateTime);

impl fmt::Display for Rfc3339Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0.to_offset(time::UtcOffset::UTC);
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        )
    }
}

impl Serialize for Rfc3339Micros {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Track events with their relative frequency, a typical e-commerce funnel.
const TRACK_EVENTS: &[(&str, u32)] = &[
    ("Product Viewed", 30),
    ("Product List Viewed", 14),
    ("Products Searched", 12),
    ("Added to Cart", 14),
    ("Cart Viewed", 10),
    ("Checkout Started", 6),
    ("Order Completed", 4),
];
const PAGES: &[(&str, &str)] = &[
    ("Home", ""),
    ("Product", "Catalog"),
    ("Category", "Catalog"),
    ("Search", "Catalog"),
    ("Cart", "Checkout"),
    ("Pricing", "Marketing"),
    ("Blog Post", "Content"),
];
const CATEGORIES: &[&str] = &["Shoes", "Jackets", "Bags", "Accessories", "Outdoor", "Kids"];
const QUERIES: &[&str] = &[
    "running shoes",
    "rain jacket",
    "backpack",
    "gift card",
    "socks",
];
const PLANS: &[&str] = &["free", "starter", "pro", "enterprise"];
const FIRST_NAMES: &[&str] = &[
    "Ada", "Grace", "Alan", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Frances", "Edsger",
];
const LAST_NAMES: &[&str] = &[
    "Lovelace", "Hopper", "Turing", "Torvalds", "Hamilton", "Thompson", "Liskov", "Ritchie",
];
const COMPANIES: &[&str] = &["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark"];
const REFERRERS: &[&str] = &[
    "https://www.google.com/",
    "https://news.ycombinator.com/",
    "https://www.example.org/blog",
];
const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
];
const LOCALES: &[&str] = &["en-US", "en-GB", "de-DE", "fr-FR", "es-ES"];

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    fn now() -> Timestamp {
        Timestamp {
            seconds: 1_780_000_000,
            nanos: 0,
        }
    }

    fn sample(n: usize) -> Vec<Generated> {
        Workload::new(1_000, 7, "run1").batch(n, now())
    }

    fn kind(g: &Generated) -> EventType {
        EventType::try_from(g.event.r#type).unwrap()
    }

    #[test]
    fn every_event_is_valid_for_the_segment_rules() {
        for g in sample(20_000) {
            let e = &g.event;
            assert!(
                !e.user_id.is_empty() || !e.anonymous_id.is_empty(),
                "no user or anonymous id: {e:?}"
            );
            assert!(!e.message_id.is_empty());
            assert_eq!(e.timestamp, Some(now()));
            match kind(&g) {
                EventType::Track => assert!(!e.event.trim().is_empty(), "unnamed track"),
                EventType::Page => assert!(!e.name.is_empty()),
                EventType::Identify => {
                    assert!(!e.user_id.is_empty() && !e.anonymous_id.is_empty());
                    let traits = &e.traits.as_ref().unwrap().fields;
                    for t in ["email", "name", "plan", "company"] {
                        assert!(traits.contains_key(t), "identify without {t}");
                    }
                }
                other @ (EventType::Unspecified
                | EventType::Screen
                | EventType::Group
                | EventType::Alias) => panic!("unexpected type {other:?}"),
            }
            for id in [&e.message_id, &e.user_id, &e.anonymous_id] {
                assert!(id.len() <= 1024);
            }
        }
    }

    #[test]
    fn ingestion_accepts_every_event() {
        for g in sample(5_000) {
            let event = tessera_proto::convert::event_from_pb(g.event.clone())
                .unwrap_or_else(|v| panic!("{v:?} for {:?}", g.event));
            let violations = event.validate();
            assert!(violations.is_empty(), "{violations:?} for {:?}", g.event);
        }
    }

    #[test]
    fn the_mix_is_about_ten_seventy_twenty() {
        let events = sample(20_000);
        let share = |k: EventType| {
            events.iter().filter(|g| kind(g) == k).count() as f64 / events.len() as f64
        };
        assert!((share(EventType::Identify) - 0.10).abs() < 0.02);
        assert!((share(EventType::Track) - 0.70).abs() < 0.02);
        assert!((share(EventType::Page) - 0.20).abs() < 0.02);
    }

    #[test]
    fn message_ids_are_unique_and_carry_the_run_id() {
        let events = sample(10_000);
        let ids: HashSet<_> = events.iter().map(|g| &g.event.message_id).collect();
        assert_eq!(ids.len(), events.len());
        assert!(events.iter().all(|g| g.event.message_id.contains("run1")));
    }

    #[test]
    fn anonymous_visitors_later_identify() {
        let events = sample(20_000);
        // Devices seen anonymously before an identify links them to a user id.
        let mut anonymous_before: HashSet<&str> = HashSet::new();
        let mut linked_after_browsing = 0;
        let mut first_user_ids = HashSet::new();
        for g in &events {
            let e = &g.event;
            if kind(g) == EventType::Identify {
                if anonymous_before.contains(e.anonymous_id.as_str()) {
                    linked_after_browsing += 1;
                }
                if g.first_identify {
                    assert!(first_user_ids.insert(e.user_id.clone()), "user id reused");
                }
            } else if e.user_id.is_empty() {
                anonymous_before.insert(&e.anonymous_id);
            }
        }
        assert!(linked_after_browsing > 100, "{linked_after_browsing}");
        assert!(first_user_ids.len() > 100);
    }

    #[test]
    fn first_identify_is_the_first_event_with_that_user_id() {
        let mut seen = HashSet::new();
        for g in sample(20_000) {
            let e = &g.event;
            if g.first_identify {
                assert!(!seen.contains(&e.user_id), "{} seen before", e.user_id);
            }
            if !e.user_id.is_empty() {
                seen.insert(e.user_id.clone());
            }
        }
    }

    #[test]
    fn a_first_order_is_the_persons_first_on_any_device_and_names_them() {
        let events = sample(50_000);
        // Every device a user id was ever linked to by an identify: its orders join the profile.
        let mut devices_of: HashMap<&str, HashSet<&str>> = HashMap::new();
        for g in &events {
            if kind(g) == EventType::Identify {
                devices_of
                    .entry(&g.event.user_id)
                    .or_default()
                    .insert(&g.event.anonymous_id);
            }
        }
        let mut orders_by_user: HashSet<&str> = HashSet::new();
        let mut orders_by_device: HashSet<&str> = HashSet::new();
        let mut first_orders = 0;
        for g in &events {
            let e = &g.event;
            let order = kind(g) == EventType::Track && e.event == "Order Completed";
            assert!(!g.first_order || order, "only an order is a first order");
            if g.first_order {
                first_orders += 1;
                assert!(!e.user_id.is_empty(), "a first order names its user");
                assert!(
                    !orders_by_user.contains(e.user_id.as_str()),
                    "{} ordered before",
                    e.user_id
                );
                let devices = devices_of.get(e.user_id.as_str()).into_iter().flatten();
                for device in devices {
                    assert!(
                        !orders_by_device.contains(device),
                        "{device} ordered before"
                    );
                }
            }
            if order {
                orders_by_user.insert(&e.user_id);
                orders_by_device.insert(&e.anonymous_id);
            }
        }
        assert!(first_orders > 50, "{first_orders}");
    }

    #[test]
    fn identified_people_come_back_on_new_devices() {
        let mut devices_per_user: HashMap<String, HashSet<String>> = HashMap::new();
        for g in sample(50_000) {
            let e = &g.event;
            if kind(&g) == EventType::Identify {
                devices_per_user
                    .entry(e.user_id.clone())
                    .or_default()
                    .insert(e.anonymous_id.clone());
            }
        }
        assert!(devices_per_user.values().any(|d| d.len() > 1));
    }

    #[test]
    fn the_device_number_matches_the_anonymous_id() {
        for g in sample(5_000) {
            match g.device {
                Some(d) => assert_eq!(g.event.anonymous_id, format!("a-run1-{d}")),
                None => assert!(g.event.anonymous_id.is_empty()),
            }
        }
    }

    #[test]
    fn a_seed_gives_the_same_workload() {
        let a = Workload::new(100, 42, "r").batch(500, now());
        let b = Workload::new(100, 42, "r").batch(500, now());
        let c = Workload::new(100, 43, "r").batch(500, now());
        assert!(a.iter().zip(&b).all(|(x, y)| x.event == y.event));
        assert!(a.iter().zip(&c).any(|(x, y)| x.event != y.event));
    }

    fn segment_json(events: &[Event]) -> serde_json::Value {
        let mut body = Vec::new();
        write_segment_batch(events, &mut body);
        serde_json::from_slice(&body).unwrap()
    }

    #[test]
    fn the_http_api_reads_every_segment_message_as_the_grpc_api_reads_the_event() {
        let generated = sample(5_000);
        let events: Vec<Event> = generated.into_iter().map(|g| g.event).collect();
        let body = segment_json(&events);
        let batch = body["batch"].as_array().unwrap();
        assert_eq!(body.as_object().unwrap().len(), 1, "only the batch: {body}");
        assert_eq!(batch.len(), events.len());
        for (message, event) in batch.iter().zip(&events) {
            let over_http = tessera_ingestion::segment_message(message.clone())
                .unwrap_or_else(|v| panic!("{v:?} for {message}"));
            let over_grpc = tessera_proto::convert::event_from_pb(event.clone()).unwrap();
            assert_eq!(over_http, over_grpc, "{message}");
        }
    }

    #[test]
    fn segment_messages_use_the_wire_names_and_leave_empty_fields_out() {
        let event = Event {
            message_id: "m1".into(),
            r#type: EventType::Alias.into(),
            user_id: "u1".into(),
            previous_id: "a1".into(),
            group_id: "g1".into(),
            properties: Some(obj([
                ("whole", n(3.0)),
                ("half", n(0.5)),
                ("huge", n(1e300)),
                ("nan", n(f64::NAN)),
                ("none", Value { kind: None }),
                (
                    "flag",
                    Value {
                        kind: Some(Kind::BoolValue(true)),
                    },
                ),
                (
                    "list",
                    Value {
                        kind: Some(Kind::ListValue(prost_types::ListValue {
                            values: vec![s("x"), n(1.0)],
                        })),
                    },
                ),
            ])),
            integrations: Some(obj([("All", s("no"))])),
            original_timestamp: Some(Timestamp {
                seconds: 1_780_000_000,
                nanos: 123_456_789,
            }),
            received_at: Some(now()),
            ..Event::default()
        };
        let body = segment_json(std::slice::from_ref(&event));
        assert_eq!(
            body["batch"][0],
            serde_json::json!({
                "type": "alias",
                "messageId": "m1",
                "userId": "u1",
                "previousId": "a1",
                "groupId": "g1",
                "properties": {"whole": 3, "half": 0.5, "huge": 1e300, "nan": null, "none": null,
                               "flag": true, "list": ["x", 1]},
                "integrations": {"All": "no"},
                "originalTimestamp": "2026-05-28T20:26:40.123456Z",
            })
        );
        let unspecified = Event {
            user_id: "u".into(),
            ..Event::default()
        };
        assert_eq!(
            segment_json(&[unspecified])["batch"][0],
            serde_json::json!({"userId": "u"})
        );
        assert_eq!(segment_json(&[]), serde_json::json!({"batch": []}));
    }

    #[test]
    fn orders_carry_revenue() {
        let orders: Vec<_> = sample(20_000)
            .into_iter()
            .filter(|g| g.event.event == "Order Completed")
            .collect();
        assert!(!orders.is_empty());
        for g in orders {
            let p = &g.event.properties.as_ref().unwrap().fields;
            assert!(matches!(p["revenue"].kind, Some(Kind::NumberValue(r)) if r > 0.0));
        }
    }
}
