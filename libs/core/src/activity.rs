//! Decayed activity: a sum over events of `2^(-(now - t) / half_life)`, kept as one number that
//! can absorb events one at a time in any order and be merged across profiles.
//!
//! The stored number is `log2(Σ 2^((t_i - EPOCH) / half_life))`. Adding an event is a log-add,
//! merging two profiles is a log-add of their numbers, and the decayed sum at any time `now` is
//! `2^(stored - (now - EPOCH) / half_life)`. Keeping the log avoids overflow: the terms grow
//! exponentially with time since the epoch.

use time::OffsetDateTime;
use time::macros::datetime;

/// The reference time of stored activity values.
pub const EPOCH: OffsetDateTime = datetime!(2020-01-01 00:00:00 UTC);

/// The default half-life: a week.
pub const DEFAULT_HALF_LIFE_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

fn periods_since_epoch(t: OffsetDateTime, half_life_seconds: f64) -> f64 {
    (t - EPOCH).as_seconds_f64() / half_life_seconds
}

/// `log2(2^a + 2^b)`, computed without overflow.
pub fn log2_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    hi + (1.0 + (lo - hi).exp2()).log2()
}

/// The stored activity after adding one event at `t` to `current` (`None`: no events yet).
pub fn add_event(current: Option<f64>, t: OffsetDateTime, half_life_seconds: f64) -> f64 {
    let term = periods_since_epoch(t, half_life_seconds);
    current.map_or(term, |c| log2_add(c, term))
}

/// The stored activity of two merged profiles.
pub fn merge(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(log2_add(a, b)),
        (Some(x), None) | (None, Some(x)) => Some(x),
        (None, None) => None,
    }
}

/// The decayed event count at `now`: each event counts 1 when it just happened, ½ one half-life
/// later, and so on.
pub fn decayed_count(stored: Option<f64>, now: OffsetDateTime, half_life_seconds: f64) -> f64 {
    stored.map_or(0.0, |s| {
        (s - periods_since_epoch(now, half_life_seconds)).exp2()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    const H: f64 = DEFAULT_HALF_LIFE_SECONDS;

    #[test]
    fn one_event_halves_every_half_life() {
        let t = datetime!(2026-06-01 00:00:00 UTC);
        let s = add_event(None, t, H);
        assert!((decayed_count(Some(s), t, H) - 1.0).abs() < 1e-9);
        let later = t + Duration::seconds_f64(H);
        assert!((decayed_count(Some(s), later, H) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn order_and_merging_do_not_matter() {
        let times: Vec<_> = (0..5)
            .map(|i| datetime!(2026-06-01 00:00:00 UTC) + Duration::hours(i * 7))
            .collect();
        let forward = times
            .iter()
            .fold(None, |acc, t| Some(add_event(acc, *t, H)));
        let backward = times
            .iter()
            .rev()
            .fold(None, |acc, t| Some(add_event(acc, *t, H)));
        let (left, right) = times.split_at(2);
        let merged = merge(
            left.iter().fold(None, |acc, t| Some(add_event(acc, *t, H))),
            right
                .iter()
                .fold(None, |acc, t| Some(add_event(acc, *t, H))),
        );
        let now = datetime!(2026-06-03 00:00:00 UTC);
        let f = decayed_count(forward, now, H);
        assert!((f - decayed_count(backward, now, H)).abs() < 1e-9);
        assert!((f - decayed_count(merged, now, H)).abs() < 1e-9);
        assert_eq!(decayed_count(None, now, H), 0.0);
    }
}
