//! Envoy's fully jittered exponential back-off (`JitteredExponentialBackOffStrategy` in
//! `source/common/common/backoff_strategy.{h,cc}`).
//!
//! The n-th call (from 0) returns a uniform draw in `[0, interval_n)` milliseconds, where `interval_0 = base`
//! and each call doubles the interval while it is below `max / 2`, after which it is `max`. With the router's
//! defaults (base 25 ms, max 250 ms) the bounds are 25, 50, 100, 200, 250, 250, ... ms. (The router
//! documentation's `[0, (2^N − 1) × base)` describes an older strategy; this follows the source.)

use crate::upstream::lb::Rng;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JitteredBackoff {
    base_ms: u64,
    max_ms: u64,
    next_ms: u64,
}

impl JitteredBackoff {
    /// `base` is at least 1 ms and `max` at least `base` (lowering guarantees both).
    pub fn new(base: Duration, max: Duration) -> Self {
        let base_ms = (base.as_millis() as u64).max(1);
        let max_ms = (max.as_millis() as u64).max(base_ms);
        JitteredBackoff {
            base_ms,
            max_ms,
            next_ms: base_ms,
        }
    }

    /// The upper bound (exclusive) of the next draw.
    pub fn next_bound(&self) -> Duration {
        Duration::from_millis(self.next_ms)
    }

    pub fn next_backoff(&mut self, rng: &mut Rng) -> Duration {
        let bound = self.next_ms;
        self.next_ms = if self.next_ms < self.max_ms / 2 {
            self.next_ms * 2
        } else {
            self.max_ms
        };
        Duration::from_millis(rng.next_u64() % bound)
    }

    pub fn reset(&mut self) {
        self.next_ms = self.base_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_double_up_to_the_maximum() {
        let mut b = JitteredBackoff::new(Duration::from_millis(25), Duration::from_millis(250));
        let mut rng = Rng::seeded(1);
        let mut bounds = Vec::new();
        for _ in 0..6 {
            let bound = b.next_bound();
            bounds.push(bound.as_millis());
            let d = b.next_backoff(&mut rng);
            assert!(d < bound, "{d:?} {bound:?}");
        }
        assert_eq!(bounds, [25, 50, 100, 200, 250, 250]);
        b.reset();
        assert_eq!(b.next_bound(), Duration::from_millis(25));
    }

    #[test]
    fn draws_are_full_jitter_from_the_rng() {
        let mut b = JitteredBackoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut rng = Rng::seeded(9);
        let mut copy = rng.clone();
        assert_eq!(
            b.next_backoff(&mut rng),
            Duration::from_millis(copy.next_u64() % 100)
        );
        assert_eq!(
            b.next_backoff(&mut rng),
            Duration::from_millis(copy.next_u64() % 200)
        );
        // Over many draws the whole range [0, bound) is used.
        let mut b = JitteredBackoff::new(Duration::from_millis(10), Duration::from_millis(10));
        let seen: std::collections::HashSet<_> = (0..500).map(|_| b.next_backoff(&mut rng)).collect();
        assert_eq!(seen.len(), 10);
    }
}
