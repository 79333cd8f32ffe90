//! From purchases to [`CustomerSummary`]s, the way Fader, Hardie & Lee prepare CDNOW and the
//! `lifetimes` package's `summary_data_from_transaction_data(freq="D")` does: a calibration period
//! ending on a given day (inclusive), purchases of one customer on one day are one transaction
//! (their values summed), `x` counts the purchase days after the first, times are whole days
//! divided by the caller's unit (7 for weeks), and the spend is the mean of the repeat
//! transactions, the first excluded.

use time::Date;

use super::CustomerSummary;

/// Days per week: the paper's time unit.
pub const DAYS_PER_WEEK: f64 = 7.0;

/// One purchase.
#[derive(Debug, Clone, PartialEq)]
pub struct Purchase<K> {
    /// The customer.
    pub customer: K,
    /// The day of the purchase.
    pub day: Date,
    /// The value of the purchase.
    pub value: f64,
}

/// One summary per customer with a purchase on or before `period_end`, sorted by customer;
/// purchases after `period_end` are ignored. Times are in units of `days_per_unit` days.
pub fn summarize<K: Ord + Clone>(
    mut purchases: Vec<Purchase<K>>,
    period_end: Date,
    days_per_unit: f64,
) -> Vec<(K, CustomerSummary)> {
    purchases.retain(|p| p.day <= period_end);
    purchases.sort_by(|a, b| a.customer.cmp(&b.customer).then(a.day.cmp(&b.day)));
    let mut summaries = Vec::new();
    let mut rest = purchases.as_slice();
    while let Some(first) = rest.first() {
        let end = rest
            .iter()
            .position(|p| p.customer != first.customer)
            .unwrap_or(rest.len());
        let (own, tail) = rest.split_at(end);
        summaries.push((
            first.customer.clone(),
            summarize_one(own, period_end, days_per_unit),
        ));
        rest = tail;
    }
    summaries
}

/// The summary of one customer's purchases, sorted by day.
fn summarize_one<K>(
    purchases: &[Purchase<K>],
    period_end: Date,
    days_per_unit: f64,
) -> CustomerSummary {
    let first_day = purchases[0].day;
    let mut last_day = first_day;
    let mut repeat_days = 0u32;
    let mut repeat_value = 0.0;
    for p in &purchases[1..] {
        if p.day != first_day {
            repeat_value += p.value;
        }
        if p.day != last_day {
            repeat_days += 1;
            last_day = p.day;
        }
    }
    let days = |from: Date, to: Date| (to - from).whole_days() as f64 / days_per_unit;
    CustomerSummary {
        frequency: repeat_days,
        recency: days(first_day, last_day),
        age: days(first_day, period_end),
        monetary_value: if repeat_days == 0 {
            0.0
        } else {
            repeat_value / f64::from(repeat_days)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn buy(customer: &str, day: Date, value: f64) -> Purchase<String> {
        Purchase {
            customer: customer.to_owned(),
            day,
            value,
        }
    }

    #[test]
    fn same_day_purchases_are_one_transaction_and_the_first_is_not_spend() {
        let end = date!(1997 - 09 - 30);
        let summaries = summarize(
            vec![
                buy("b", date!(1997 - 01 - 10), 5.0),
                buy("a", date!(1997 - 01 - 01), 10.0),
                buy("a", date!(1997 - 01 - 01), 7.0),
                buy("a", date!(1997 - 01 - 15), 20.0),
                buy("a", date!(1997 - 01 - 15), 4.0),
                buy("a", date!(1997 - 03 - 01), 30.0),
                // After the calibration period: ignored.
                buy("a", date!(1997 - 10 - 01), 99.0),
                buy("c", date!(1997 - 10 - 02), 1.0),
            ],
            end,
            DAYS_PER_WEEK,
        );
        let ids: Vec<&str> = summaries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        let a = summaries[0].1;
        assert_eq!(a.frequency, 2);
        assert_eq!(a.recency, 59.0 / 7.0);
        assert_eq!(a.age, 272.0 / 7.0);
        assert_eq!(a.monetary_value, (24.0 + 30.0) / 2.0);
        let b = summaries[1].1;
        assert_eq!((b.frequency, b.recency, b.monetary_value), (0, 0.0, 0.0));
        assert_eq!(b.age, 263.0 / 7.0);
        assert!(summaries.iter().all(|(_, s)| s.validate().is_ok()));
    }
}
