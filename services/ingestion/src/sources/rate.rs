//! Per-source rate limits: a token bucket per source, in this process.
//!
//! A limit is enforced per replica: with N ingestion replicas behind a load balancer a source
//! can reach N times its limit. That is the accepted trade-off for a check that costs no
//! network round trip; a cluster-wide limit would need a shared counter (Redis) per request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

/// The token buckets of every rate-limited source seen by this replica.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    buckets: Mutex<HashMap<Uuid, Bucket>>,
}

/// One source's bucket: it holds at most one second of its rate and refills continuously.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: u32,
    /// May go below zero: a batch larger than the bucket is admitted when the bucket is full,
    /// and the debt is paid back before the next one, so the average rate still holds.
    tokens: f64,
    updated: Instant,
}

impl Limiter {
    /// Takes `events` tokens from the bucket of `source` (limited to `rate` events per second)
    /// at `now`, or says how long to wait until they are there.
    pub(crate) fn take(
        &self,
        source: Uuid,
        rate: u32,
        events: usize,
        now: Instant,
    ) -> Result<(), Duration> {
        if events == 0 {
            return Ok(());
        }
        let rate = rate.max(1);
        let capacity = f64::from(rate);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(source).or_insert(Bucket {
            rate,
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        // The rate of the previous refill period counts up to now; a changed limit applies from
        // here on.
        bucket.tokens = (bucket.tokens + elapsed * f64::from(bucket.rate)).min(capacity);
        bucket.rate = rate;
        bucket.updated = now;
        #[allow(clippy::cast_precision_loss)]
        let wanted = events as f64;
        // A batch larger than the bucket needs a full bucket, never more.
        let needed = wanted.min(capacity);
        if bucket.tokens >= needed {
            bucket.tokens -= wanted;
            Ok(())
        } else {
            let wait = (needed - bucket.tokens) / capacity;
            Err(Duration::from_secs_f64(wait).max(Duration::from_millis(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_rate_then_refills() {
        let limiter = Limiter::default();
        let s = Uuid::new_v4();
        let t0 = Instant::now();
        assert!(limiter.take(s, 10, 6, t0).is_ok());
        assert!(limiter.take(s, 10, 4, t0).is_ok());
        let wait = limiter.take(s, 10, 1, t0).unwrap_err();
        assert!(
            (wait.as_secs_f64() - 0.1).abs() < 1e-6,
            "one token takes 1/10 s: {wait:?}"
        );
        assert!(
            limiter
                .take(s, 10, 1, t0 + Duration::from_millis(101))
                .is_ok()
        );
        // Another source has its own bucket.
        assert!(limiter.take(Uuid::new_v4(), 10, 10, t0).is_ok());
    }

    #[test]
    fn a_large_batch_needs_a_full_bucket_and_leaves_a_debt() {
        let limiter = Limiter::default();
        let s = Uuid::new_v4();
        let t0 = Instant::now();
        assert!(
            limiter.take(s, 10, 30, t0).is_ok(),
            "a full bucket admits it"
        );
        // 20 tokens of debt plus one: 2.1 s.
        let wait = limiter.take(s, 10, 1, t0).unwrap_err();
        assert!(
            (wait.as_secs_f64() - 2.1).abs() < 1e-6,
            "the debt is paid back first: {wait:?}"
        );
        assert!(
            limiter
                .take(s, 10, 30, t0 + Duration::from_secs(2))
                .is_err()
        );
        assert!(limiter.take(s, 10, 30, t0 + Duration::from_secs(3)).is_ok());
    }

    #[test]
    fn empty_batches_are_free() {
        let limiter = Limiter::default();
        let s = Uuid::new_v4();
        let t0 = Instant::now();
        assert!(limiter.take(s, 1, 1, t0).is_ok());
        assert!(limiter.take(s, 1, 0, t0).is_ok());
        assert!(limiter.take(s, 1, 1, t0).is_err());
    }
}
