//! Psychographic data derived from behavior: what a person cares about, read off their events.
//!
//! - **Category affinity**: the product categories a person viewed (`Product Viewed`, weight
//!   1), added to a cart (`Product Added`, 2) and bought (`Order Completed`, 3 per product), from
//!   `properties.category` and, for orders, `properties.products[].category` (Segment's
//!   e-commerce spec). Shown as each category's share of the top category's weight (0 to 1).
//! - **Preferred channel**: where the person's events come from most: `context.channel` when
//!   the source says, else the library (`analytics.js`, `analytics-next`, RudderStack's JS SDK:
//!   `web`; iOS, Android, React Native, Flutter, Swift, Kotlin SDKs: `mobile`; any other
//!   library: `server`), else the call (`page`: web, `screen`: mobile).
//! - **Price sensitivity**: the share of a person's orders (`Order Completed`) that used a
//!   discount or coupon (`properties.discount` > 0 or a non-empty `properties.coupon`).
//! - **Purchases by day** (revenue from `properties.revenue`, else `total`, else `value`): what
//!   the scoring service's customer-value models (churn risk, predicted value) read.
//!
//! Declared preferences (survey answers) are traits; the trait catalog classes them
//! `psychographic`. The accumulators live with the computed traits (`psy:` names), so merges,
//! unmerges, history and deletion treat them like every other derived value; they add up in
//! any order.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::computed::{Acc, ComputedState};
use crate::domain::ResolvedEvent;

/// The accumulator of weighted product categories.
const CATEGORIES: &str = "psy:categories";
/// The accumulator of events by channel.
const CHANNELS: &str = "psy:channels";
/// The accumulator of orders.
const ORDERS: &str = "psy:orders";
/// The accumulator of orders with a discount or coupon.
const DISCOUNTED: &str = "psy:discounted_orders";
/// The accumulator of revenue (in cents) by purchase day (days since 1970-01-01, zero-padded so
/// names sort by day), for the customer-value models.
const PURCHASES: &str = "psy:purchases";
/// The longest category or channel name kept, in bytes.
const MAX_NAME: usize = 200;
/// The most categories shown.
pub const SHOWN_CATEGORIES: usize = 10;

/// Folds what `event` says about the person's interests into `state`.
pub fn apply(state: &mut ComputedState, event: &ResolvedEvent) {
    let details = &event.details;
    if details.kind == "track" {
        let weight = match details.event.as_str() {
            "Product Viewed" => 1,
            "Product Added" => 2,
            "Order Completed" => 3,
            _ => 0,
        };
        if weight > 0 {
            let mut categories = BTreeMap::new();
            let mut add = |category: Option<&Value>| {
                if let Some(c) = category
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|c| !c.is_empty() && c.len() <= MAX_NAME)
                {
                    *categories.entry(c.to_owned()).or_insert(0) += weight;
                }
            };
            add(details.properties.get("category"));
            if details.event == "Order Completed" {
                for product in details
                    .properties
                    .get("products")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    add(product.get("category"));
                }
            }
            if !categories.is_empty() {
                state.fold(CATEGORIES.to_owned(), Acc::Counts { counts: categories });
            }
        }
        if details.event == "Order Completed" {
            state.fold(ORDERS.to_owned(), Acc::Count { n: 1 });
            let day = event.timestamp.unix_timestamp().div_euclid(86_400);
            let revenue = ["revenue", "total", "value"]
                .iter()
                .find_map(|k| details.properties.get(*k).and_then(Value::as_f64))
                .filter(|r| r.is_finite() && *r >= 0.0)
                .unwrap_or(0.0);
            if day >= 0 {
                #[allow(clippy::cast_possible_truncation)]
                let cents = (revenue * 100.0).round().min(9.0e15) as i64;
                state.fold(
                    PURCHASES.to_owned(),
                    Acc::Counts {
                        counts: BTreeMap::from([(format!("{day:08}"), cents)]),
                    },
                );
            }
            let discount = details
                .properties
                .get("discount")
                .and_then(Value::as_f64)
                .is_some_and(|d| d > 0.0);
            let coupon = details
                .properties
                .get("coupon")
                .and_then(Value::as_str)
                .is_some_and(|c| !c.trim().is_empty());
            if discount || coupon {
                state.fold(DISCOUNTED.to_owned(), Acc::Count { n: 1 });
            }
        }
    }
    if let Some(channel) = channel(event) {
        state.fold(
            CHANNELS.to_owned(),
            Acc::Counts {
                counts: BTreeMap::from([(channel, 1)]),
            },
        );
    }
}

/// The channel an event came through, when it can be told.
fn channel(event: &ResolvedEvent) -> Option<String> {
    let context = &event.details.context;
    if let Some(channel) = context
        .get("channel")
        .and_then(Value::as_str)
        .map(|c| c.trim().to_lowercase())
        .filter(|c| !c.is_empty() && c.len() <= MAX_NAME)
    {
        return Some(channel);
    }
    let library = context
        .get("library")
        .and_then(|l| l.get("name"))
        .and_then(Value::as_str)
        .map(str::to_lowercase);
    let by_call = match event.details.kind.as_str() {
        "page" => Some("web"),
        "screen" => Some("mobile"),
        _ => None,
    };
    let channel = match library.as_deref() {
        Some(name)
            if [
                "ios",
                "android",
                "react-native",
                "flutter",
                "swift",
                "kotlin",
            ]
            .iter()
            .any(|m| name.contains(m)) =>
        {
            "mobile"
        }
        Some(name)
            if [
                "analytics.js",
                "analytics-next",
                "rudder-sdk-js",
                "javascript",
            ]
            .iter()
            .any(|w| name.contains(w)) =>
        {
            "web"
        }
        Some(_) => "server",
        None => by_call?,
    };
    Some(channel.to_owned())
}

/// A person's purchases by UTC day, as the customer-value models read them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Purchases {
    /// The first purchase day (days since 1970-01-01).
    pub first_day: i64,
    /// The latest purchase day.
    pub last_day: i64,
    /// How many days had purchases (the latest 1,000 are kept).
    pub days: i64,
    /// The revenue of the purchase days after the first.
    pub repeat_revenue: f64,
    /// The revenue of every purchase day, the first included.
    pub revenue: f64,
}

/// The purchases `state` holds; `None` without any.
pub fn purchases(state: &ComputedState) -> Option<Purchases> {
    purchases_until(state, None)
}

/// The purchases `state` holds on or before `last_day` (days since 1970-01-01; every day when
/// `None`); `None` without any.
pub fn purchases_until(state: &ComputedState, last_day: Option<i64>) -> Option<Purchases> {
    let Some(Acc::Counts { counts }) = state.0.get(PURCHASES) else {
        return None;
    };
    let days: Vec<(i64, i64)> = counts
        .iter()
        .filter_map(|(day, cents)| Some((day.parse().ok()?, *cents)))
        .filter(|(day, _)| last_day.is_none_or(|last| *day <= last))
        .collect();
    let (first_day, first_cents) = *days.first()?;
    let (last_day, _) = *days.last()?;
    #[allow(clippy::cast_precision_loss)]
    let repeat_revenue = days.iter().skip(1).map(|(_, c)| *c as f64).sum::<f64>() / 100.0;
    #[allow(clippy::cast_precision_loss)]
    let revenue = repeat_revenue + first_cents as f64 / 100.0;
    Some(Purchases {
        first_day,
        last_day,
        days: days.len() as i64,
        repeat_revenue,
        revenue,
    })
}

/// What the events say about a person's interests.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Interests {
    /// The top categories by weight, with their share of the top one's (0 to 1), highest first
    /// (ties by name).
    pub categories: Vec<(String, f64)>,
    /// Events by channel.
    pub channels: BTreeMap<String, i64>,
    /// The channel with the most events (ties by name); `None` without events that tell.
    pub preferred_channel: Option<String>,
    /// Orders seen.
    pub orders: i64,
    /// The share of orders with a discount or coupon; `None` without orders.
    pub price_sensitivity: Option<f64>,
}

/// The interests `state` holds.
pub fn interests(state: &ComputedState) -> Interests {
    let counts = |name: &str| match state.0.get(name) {
        Some(Acc::Counts { counts }) => counts.clone(),
        Some(_) | None => BTreeMap::new(),
    };
    let count = |name: &str| match state.0.get(name) {
        Some(Acc::Count { n }) => *n,
        Some(_) | None => 0,
    };
    let mut categories: Vec<(String, i64)> = counts(CATEGORIES).into_iter().collect();
    categories.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    categories.truncate(SHOWN_CATEGORIES);
    let top = categories.first().map_or(1, |c| c.1.max(1)) as f64;
    let channels = counts(CHANNELS);
    let preferred_channel = channels
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(c, _)| c.clone());
    let orders = count(ORDERS);
    Interests {
        categories: categories
            .into_iter()
            .map(|(c, w)| (c, w as f64 / top))
            .collect(),
        channels,
        preferred_channel,
        orders,
        price_sensitivity: (orders > 0).then(|| count(DISCOUNTED) as f64 / orders as f64),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::macros::datetime;

    use super::*;
    use crate::domain::EventDetails;

    fn event(id: &str, kind: &str, name: &str, properties: Value, context: Value) -> ResolvedEvent {
        ResolvedEvent {
            event_id: id.to_owned(),
            profile_id: "p".to_owned(),
            timestamp: datetime!(2026-05-01 00:00:00 UTC),
            traits: serde_json::Map::new(),
            identifiers: Vec::new(),
            details: EventDetails {
                kind: kind.to_owned(),
                event: name.to_owned(),
                properties: properties.as_object().cloned().unwrap_or_default(),
                context: context.as_object().cloned().unwrap_or_default(),
                ..EventDetails::default()
            },
        }
    }

    fn events() -> Vec<ResolvedEvent> {
        let web = json!({"library": {"name": "analytics.js"}});
        let ios = json!({"library": {"name": "analytics-ios"}});
        vec![
            event(
                "e1",
                "track",
                "Product Viewed",
                json!({"category": "Shoes"}),
                web.clone(),
            ),
            event(
                "e2",
                "track",
                "Product Viewed",
                json!({"category": "Hats"}),
                web.clone(),
            ),
            event(
                "e3",
                "track",
                "Product Added",
                json!({"category": "Hats"}),
                ios.clone(),
            ),
            event(
                "e4",
                "track",
                "Order Completed",
                json!({"coupon": "SPRING", "products": [{"category": "Hats"}, {"category": "Socks"}]}),
                ios,
            ),
            event(
                "e5",
                "track",
                "Order Completed",
                json!({"discount": 0}),
                web.clone(),
            ),
            event("e6", "page", "", json!({}), json!({})),
            event(
                "e7",
                "identify",
                "",
                json!({}),
                json!({"channel": "Server"}),
            ),
        ]
    }

    #[test]
    fn interests_come_from_behavior_in_any_order_and_across_merges() {
        let want = Interests {
            categories: vec![
                ("Hats".to_owned(), 1.0),
                ("Socks".to_owned(), 0.5),
                ("Shoes".to_owned(), 1.0 / 6.0),
            ],
            channels: BTreeMap::from([
                ("mobile".to_owned(), 2),
                ("server".to_owned(), 1),
                ("web".to_owned(), 4),
            ]),
            preferred_channel: Some("web".to_owned()),
            orders: 2,
            price_sensitivity: Some(0.5),
        };
        let all = events();
        let mut forward = ComputedState::default();
        for e in &all {
            apply(&mut forward, e);
        }
        assert_eq!(interests(&forward), want);
        // Half on one profile, half on another, then merged: the same.
        let (mut a, mut b) = (ComputedState::default(), ComputedState::default());
        for (i, e) in all.iter().rev().enumerate() {
            apply(if i % 2 == 0 { &mut a } else { &mut b }, e);
        }
        a.absorb(&b);
        assert_eq!(interests(&a), want);
        assert_eq!(interests(&ComputedState::default()), Interests::default());
    }

    #[test]
    fn purchases_are_summed_by_day_in_any_order() {
        let order = |id: &str, day: i64, properties: Value| {
            let mut e = event(id, "track", "Order Completed", properties, json!({}));
            e.timestamp = datetime!(2026-05-01 10:00:00 UTC) + time::Duration::days(day);
            e
        };
        let all = [
            order("o1", 0, json!({"revenue": 10.0})),
            order("o2", 3, json!({"total": 20.5})),
            order("o3", 3, json!({"value": 4.5})),
            order("o4", 9, json!({"revenue": "n/a"})),
        ];
        let first = datetime!(2026-05-01 00:00:00 UTC).unix_timestamp() / 86_400;
        let want = Some(Purchases {
            first_day: first,
            last_day: first + 9,
            days: 3,
            repeat_revenue: 25.0,
            revenue: 35.0,
        });
        let mut forward = ComputedState::default();
        for e in &all {
            apply(&mut forward, e);
        }
        assert_eq!(purchases(&forward), want);
        // Reversed and split over two profiles, then merged: the same.
        let (mut a, mut b) = (ComputedState::default(), ComputedState::default());
        for (i, e) in all.iter().rev().enumerate() {
            apply(if i % 2 == 0 { &mut a } else { &mut b }, e);
        }
        a.absorb(&b);
        assert_eq!(purchases(&a), want);
        assert_eq!(purchases(&ComputedState::default()), None);
        // Up to a day: the later purchase days are left out.
        assert_eq!(
            purchases_until(&a, Some(first + 8)),
            Some(Purchases {
                first_day: first,
                last_day: first + 3,
                days: 2,
                repeat_revenue: 25.0,
                revenue: 35.0,
            })
        );
        assert_eq!(purchases_until(&a, Some(first - 1)), None);
    }
}
