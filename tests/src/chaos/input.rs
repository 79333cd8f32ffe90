//! The suite's input: a deterministic stream of Segment messages, the same for the run under
//! faults and for the fault-free reference, rendered as JSON (HTTP `/v1/batch`) or protobuf
//! (gRPC `IngestEvents`).
//!
//! Every user lives two rounds. In its first round it browses anonymously, then identifies
//! (linking its anonymous id); in its second it browses under a fresh anonymous id and
//! identifies again, which merges the anonymous profile into its own. Between, it views
//! products, orders, joins accounts (group), changes traits and aliases a legacy id. Every
//! message has its own explicit timestamp, so the outcome does not depend on when it arrives.

use serde_json::{Value, json};
use tessera_proto::common::v1::{Event, EventType};
use tessera_proto::convert::json_map_to_struct;
use time::OffsetDateTime;

const DAY_MS: i64 = 86_400_000;
const CATEGORIES: [&str; 5] = ["shoes", "books", "garden", "kitchen", "toys"];
const PLANS: [&str; 3] = ["free", "pro", "team"];
const INDUSTRIES: [&str; 3] = ["retail", "software", "finance"];
const SOURCES: [&str; 3] = ["web", "ios", "partner"];
const ROLES: [&str; 3] = ["decision maker", "finance", "technical evaluator"];

/// One message of the input.
#[derive(Debug, Clone, PartialEq)]
pub struct Msg {
    /// `identify`, `track`, `page`, `group` or `alias`.
    pub kind: &'static str,
    pub message_id: String,
    pub user_id: String,
    pub anonymous_id: String,
    /// The track event's name.
    pub event: String,
    pub group_id: String,
    pub previous_id: String,
    pub properties: Value,
    pub traits: Value,
    pub device_id: String,
    /// Event time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

/// The shape of the input.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Distinguishes this run's ids from any other's.
    pub tag: String,
    /// Users starting in each round (each lives two rounds).
    pub new_users_per_round: usize,
    pub batches_per_round: usize,
    pub batch_size: usize,
    /// The event time of message 0, milliseconds since the Unix epoch.
    pub t0_ms: i64,
}

/// A small deterministic mix (splitmix64), so the input depends only on the message number.
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Plan {
    /// Messages of one round.
    pub fn messages_per_round(&self) -> usize {
        self.batches_per_round * self.batch_size
    }

    /// The users a round sends events for (global user numbers).
    pub fn users_of_round(&self, round: usize) -> std::ops::Range<usize> {
        let start = round.saturating_sub(1) * self.new_users_per_round;
        start..(round + 1) * self.new_users_per_round
    }

    /// Every user seen up to and including `round`.
    pub fn users_until(&self, round: usize) -> std::ops::Range<usize> {
        0..(round + 1) * self.new_users_per_round
    }

    /// The user id of user `u`.
    pub fn user_id(&self, u: usize) -> String {
        format!("{}-u{u}", self.tag)
    }

    fn anon_id(&self, u: usize, phase: usize) -> String {
        format!("{}-a{u}-{phase}", self.tag)
    }

    /// Batch `b` of round `round`; `skewed`: event times days in the past or the future.
    pub fn batch(&self, round: usize, b: usize, skewed: bool) -> Vec<Msg> {
        (0..self.batch_size)
            .map(|k| self.message(round, b * self.batch_size + k, skewed))
            .collect()
    }

    fn message(&self, round: usize, k: usize, skewed: bool) -> Msg {
        let users = self.users_of_round(round);
        let span = users.len();
        let u = users.start + k % span;
        // The user's round within its life: 0 (new) or 1 (returning).
        let phase = round - u / self.new_users_per_round;
        // Which of the user's messages of the round this is.
        let nth = k / span;
        let n = (round * self.messages_per_round() + k) as u64;
        let r = mix(n ^ 0x7e55e7a);
        let mut skew = 0;
        if skewed {
            skew = [-3 * DAY_MS, DAY_MS, -40 * DAY_MS, -DAY_MS / 2][(r % 4) as usize];
        }
        let mut m = Msg {
            kind: "track",
            message_id: format!("{}-m{n}", self.tag),
            user_id: self.user_id(u),
            anonymous_id: String::new(),
            event: String::new(),
            group_id: String::new(),
            previous_id: String::new(),
            properties: json!({}),
            traits: json!({}),
            device_id: format!("{}-d{u}", self.tag),
            timestamp_ms: self.t0_ms + n as i64 * 10 + skew,
        };
        let anon = self.anon_id(u, phase);
        match nth {
            // Browse anonymously first (a profile of its own), then identify: in the user's
            // second round this merges the anonymous profile into the user's.
            0 => {
                m.kind = "page";
                m.user_id = String::new();
                // No device id either: the device would tie it to the user at once.
                m.device_id = String::new();
                m.anonymous_id = anon;
                m.properties = json!({"name": "Home", "path": "/"});
            }
            1 => {
                m.kind = "identify";
                m.anonymous_id = anon;
                m.traits = json!({
                    "email": format!("{}@example.com", self.user_id(u)),
                    "name": format!("User {u}"),
                    "plan": PLANS[(r % 3) as usize],
                    "signup_source": SOURCES[(u + phase) % 3],
                });
            }
            _ => match r % 20 {
                0..=7 => {
                    m.event = "Product Viewed".to_owned();
                    m.properties = json!({
                        "category": CATEGORIES[((r >> 8) % 5) as usize],
                        "price": ((r >> 16) % 200) as f64 + 0.99,
                    });
                    if r & 0x100 == 0 {
                        m.anonymous_id = anon;
                    }
                }
                8..=10 => {
                    m.event = "Order Completed".to_owned();
                    m.properties = json!({
                        "order_id": format!("o{n}"),
                        "revenue": ((r >> 8) % 500) as f64 + 5.0,
                        "category": CATEGORIES[((r >> 20) % 5) as usize],
                    });
                }
                11..=13 => {
                    m.kind = "page";
                    m.anonymous_id = anon;
                    m.properties = json!({"name": "Pricing", "path": "/pricing"});
                }
                14..=15 => {
                    m.kind = "identify";
                    m.traits = json!({
                        "plan": PLANS[((r >> 8) % 3) as usize],
                        "interests": [CATEGORIES[((r >> 12) % 5) as usize]],
                    });
                }
                16..=17 => {
                    m.kind = "group";
                    m.group_id = format!("{}-acct{}", self.tag, u % 7);
                    m.traits = json!({
                        "name": format!("Account {}", u % 7),
                        "industry": INDUSTRIES[((r >> 8) % 3) as usize],
                        "employees": ((r >> 16) % 5000) as i64 + 10,
                        "role": ROLES[u % 3],
                    });
                }
                18 => {
                    m.kind = "alias";
                    m.previous_id = format!("{}-legacy{u}", self.tag);
                }
                _ => {
                    m.event = "Clicked".to_owned();
                    m.properties = json!({"n": n});
                }
            },
        }
        m
    }
}

fn rfc3339(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .expect("a timestamp in range");
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("format a timestamp")
}

impl Msg {
    fn context(&self) -> Value {
        let mut context = json!({"library": {"name": "tessera-chaos"}});
        if !self.device_id.is_empty() {
            context["device"] = json!({"id": self.device_id});
        }
        context
    }

    /// The Segment JSON form (for `/v1/batch`).
    pub fn json(&self) -> Value {
        let mut m = json!({
            "type": self.kind,
            "messageId": self.message_id,
            "timestamp": rfc3339(self.timestamp_ms),
            "context": self.context(),
        });
        let obj = m.as_object_mut().expect("an object");
        for (key, value) in [
            ("userId", &self.user_id),
            ("anonymousId", &self.anonymous_id),
            ("event", &self.event),
            ("groupId", &self.group_id),
            ("previousId", &self.previous_id),
        ] {
            if !value.is_empty() {
                obj.insert(key.to_owned(), json!(value));
            }
        }
        if let Some(name) = self.properties.get("name")
            && self.kind == "page"
        {
            obj.insert("name".to_owned(), name.clone());
        }
        if self.properties.as_object().is_some_and(|p| !p.is_empty()) {
            obj.insert("properties".to_owned(), self.properties.clone());
        }
        if self.traits.as_object().is_some_and(|t| !t.is_empty()) {
            obj.insert("traits".to_owned(), self.traits.clone());
        }
        m
    }

    /// The protobuf form (for `IngestEvents`).
    pub fn event(&self) -> Event {
        let object = |v: &Value| {
            v.as_object()
                .filter(|o| !o.is_empty())
                .map(json_map_to_struct)
        };
        let r#type = match self.kind {
            "identify" => EventType::Identify,
            "page" => EventType::Page,
            "group" => EventType::Group,
            "alias" => EventType::Alias,
            _ => EventType::Track,
        };
        let name = match self.kind {
            "page" => self
                .properties
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            _ => String::new(),
        };
        Event {
            message_id: self.message_id.clone(),
            r#type: r#type.into(),
            user_id: self.user_id.clone(),
            anonymous_id: self.anonymous_id.clone(),
            event: self.event.clone(),
            name,
            group_id: self.group_id.clone(),
            previous_id: self.previous_id.clone(),
            properties: object(&self.properties),
            traits: object(&self.traits),
            context: object(&self.context()),
            timestamp: Some(prost_types::Timestamp {
                seconds: self.timestamp_ms.div_euclid(1000),
                nanos: (self.timestamp_ms.rem_euclid(1000) * 1_000_000) as i32,
            }),
            ..Event::default()
        }
    }
}
