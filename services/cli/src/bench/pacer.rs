//! The open-loop schedule: when each batch is due, whatever the server does, and which batches
//! carry a visibility sample.

use std::time::Duration;

/// The send schedule of a run: batches of `batch` events at `rate` events per second, at most
/// `limit` events in all. Batch `k` is due when the events before it are due, so the offered
/// load does not depend on how fast the server answers.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pacer {
    /// Events per second; 0 means unpaced (as fast as the concurrency allows).
    pub(super) rate: u64,
    /// Events per request.
    pub(super) batch: u64,
    /// Total events, if bounded by count.
    pub(super) limit: Option<u64>,
}

impl Pacer {
    /// When, from the start, the batch that follows `sent` events is due; `None` when unpaced.
    pub(super) fn due(&self, sent: u64) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        let nanos = u128::from(sent) * 1_000_000_000 / u128::from(self.rate);
        Some(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }

    /// The size of the batch that follows `sent` events; 0 when the count limit is reached.
    pub(super) fn next_size(&self, sent: u64) -> u64 {
        match self.limit {
            Some(limit) => self.batch.min(limit.saturating_sub(sent)),
            None => self.batch,
        }
    }

    /// How many events the schedule offers in the first `window` of the run: every event of
    /// every batch due before the end of the window, within the count limit.
    pub(super) fn scheduled_within(&self, window: Duration) -> Option<u64> {
        if self.rate == 0 {
            return None;
        }
        // Batch k is due at k*batch/rate; those with k*batch/rate < window number
        // ceil(window*rate/batch).
        let numerator = window.as_nanos() * u128::from(self.rate);
        let denominator = 1_000_000_000 * u128::from(self.batch);
        let batches = numerator.div_ceil(denominator);
        let events = u64::try_from(batches * u128::from(self.batch)).unwrap_or(u64::MAX);
        Some(self.limit.map_or(events, |l| events.min(l)))
    }

    /// How many batches the run will send, when known in advance.
    pub(super) fn planned_batches(&self, duration: Option<Duration>) -> Option<u64> {
        let by_time = duration.and_then(|d| self.scheduled_within(d));
        let events = match (by_time, self.limit) {
            (Some(t), Some(l)) => t.min(l),
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => return None,
        };
        Some(events.div_ceil(self.batch))
    }
}

/// Chooses which batches carry a visibility sample, spread evenly over the run: by batch number
/// when the number of batches is known, by time otherwise. A batch without a first identify
/// leaves the sample to the next batch that has one.
#[derive(Debug)]
pub(super) struct Sampler {
    remaining: u64,
    spacing: Spacing,
}

#[derive(Debug)]
enum Spacing {
    Batches { every: u64, next: u64 },
    Time { every: Duration, next: Duration },
}

impl Sampler {
    /// Takes `samples` samples over `planned_batches` batches, or else over `duration`.
    pub(super) fn new(samples: u64, planned_batches: Option<u64>, duration: Duration) -> Self {
        let spacing = match planned_batches {
            Some(batches) => Spacing::Batches {
                every: (batches / samples.max(1)).max(1),
                next: 0,
            },
            None => Spacing::Time {
                every: duration / u32::try_from(samples.max(1)).unwrap_or(u32::MAX),
                next: Duration::ZERO,
            },
        };
        Self {
            remaining: samples,
            spacing,
        }
    }

    /// Whether batch number `batch` (sent `elapsed` after the start) should carry a sample, if
    /// it has a candidate.
    pub(super) fn wants(&self, batch: u64, elapsed: Duration) -> bool {
        self.remaining > 0
            && match self.spacing {
                Spacing::Batches { next, .. } => batch >= next,
                Spacing::Time { next, .. } => elapsed >= next,
            }
    }

    /// Records that batch `batch` (sent `elapsed` after the start) took a sample.
    pub(super) fn took(&mut self, batch: u64, elapsed: Duration) {
        self.remaining = self.remaining.saturating_sub(1);
        match &mut self.spacing {
            Spacing::Batches { every, next } => *next = batch + *every,
            Spacing::Time { every, next } => *next = elapsed + *every,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(rate: u64, batch: u64, limit: Option<u64>) -> Pacer {
        Pacer { rate, batch, limit }
    }

    #[test]
    fn batches_are_due_on_an_even_schedule() {
        let p = pacer(2_000, 100, None);
        assert_eq!(p.due(0), Some(Duration::ZERO));
        assert_eq!(p.due(100), Some(Duration::from_millis(50)));
        assert_eq!(p.due(2_000), Some(Duration::from_secs(1)));
        assert_eq!(p.due(40_000), Some(Duration::from_secs(20)));
    }

    #[test]
    fn unpaced_runs_have_no_schedule() {
        let p = pacer(0, 100, None);
        assert_eq!(p.due(500), None);
        assert_eq!(p.scheduled_within(Duration::from_secs(1)), None);
    }

    #[test]
    fn the_last_batch_is_cut_to_the_limit() {
        let p = pacer(1_000, 100, Some(250));
        assert_eq!(p.next_size(0), 100);
        assert_eq!(p.next_size(200), 50);
        assert_eq!(p.next_size(250), 0);
        assert_eq!(pacer(1_000, 100, None).next_size(1_000_000), 100);
    }

    #[test]
    fn a_partial_last_batch_is_due_by_its_first_event() {
        // 250 events at 100/s: batches at 0 s, 1 s and 2 s (the last with 50 events).
        let p = pacer(100, 100, Some(250));
        assert_eq!(p.due(200), Some(Duration::from_secs(2)));
    }

    #[test]
    fn the_offered_count_covers_every_batch_due_in_the_window() {
        let p = pacer(2_000, 100, None);
        assert_eq!(p.scheduled_within(Duration::from_secs(20)), Some(40_000));
        // Batches due at 0, 50 and 100 ms lie within 101 ms.
        assert_eq!(p.scheduled_within(Duration::from_millis(101)), Some(300));
        assert_eq!(p.scheduled_within(Duration::ZERO), Some(0));
        let capped = pacer(2_000, 100, Some(1_000));
        assert_eq!(
            capped.scheduled_within(Duration::from_secs(20)),
            Some(1_000)
        );
    }

    #[test]
    fn planned_batches_take_the_tighter_bound() {
        let d = Some(Duration::from_secs(10));
        assert_eq!(pacer(1_000, 100, None).planned_batches(d), Some(100));
        assert_eq!(pacer(1_000, 100, Some(550)).planned_batches(d), Some(6));
        assert_eq!(pacer(0, 100, Some(550)).planned_batches(None), Some(6));
        assert_eq!(pacer(0, 100, None).planned_batches(d), None);
    }

    #[test]
    fn samples_spread_over_the_batches() {
        let mut s = Sampler::new(10, Some(100), Duration::from_secs(10));
        let mut taken = Vec::new();
        for batch in 0..100 {
            // Batches 15 to 24 have no candidate.
            if s.wants(batch, Duration::ZERO) && !(15..25).contains(&batch) {
                s.took(batch, Duration::ZERO);
                taken.push(batch);
            }
        }
        assert_eq!(taken, [0, 10, 25, 35, 45, 55, 65, 75, 85, 95]);
    }

    #[test]
    fn samples_spread_over_time_when_the_count_is_unknown() {
        let mut s = Sampler::new(4, None, Duration::from_secs(8));
        let mut taken = Vec::new();
        for ms in (0..8_000).step_by(100) {
            let t = Duration::from_millis(ms);
            if s.wants(0, t) {
                s.took(0, t);
                taken.push(ms);
            }
        }
        assert_eq!(taken, [0, 2_000, 4_000, 6_000]);
    }

    #[test]
    fn no_samples_when_none_asked() {
        let s = Sampler::new(0, Some(100), Duration::from_secs(1));
        assert!(!s.wants(0, Duration::ZERO));
    }
}
