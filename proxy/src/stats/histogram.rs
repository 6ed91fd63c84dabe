//! A lock-free histogram of integer values (milliseconds, for every histogram Remora keeps).
//!
//! Two views of one stream of values, both updated with relaxed atomic adds:
//! - Envoy's Prometheus buckets (`le` 0.5, 1, 5, 10, 25, ... 3600000), exact for integer values;
//! - log-linear buckets (exact below 16, then eight per power of two) from which quantiles are estimated within
//!   about 6 %.
//!
//! Buckets are allocated on the first record, so a cluster that never sends traffic costs a few words.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

/// Envoy's default histogram bucket bounds (`stats_config.histogram_bucket_settings` unset).
pub const ENVOY_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
    300000.0, 600000.0, 1800000.0, 3600000.0,
];

const EXACT: u64 = 16;
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Values are clamped below 2^40 (about 35 years in milliseconds).
const MAX_POW: u32 = 40;
const LOG_BUCKETS: usize = EXACT as usize + ((MAX_POW - 4) as usize) * SUB as usize;

#[derive(Debug)]
struct Buckets {
    envoy: [AtomicU64; ENVOY_BUCKETS.len() + 1],
    log: [AtomicU64; LOG_BUCKETS],
}

#[derive(Debug, Default)]
struct Inner {
    count: AtomicU64,
    sum: AtomicU64,
    buckets: OnceLock<Box<Buckets>>,
}

/// A handle to one histogram.
#[derive(Clone, Debug, Default)]
pub struct Histogram(Arc<Inner>);

fn log_index(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let v = v.min((1 << MAX_POW) - 1);
    let pow = 63 - v.leading_zeros();
    let sub = (v >> (pow - SUB_BITS)) & (SUB - 1);
    EXACT as usize + (pow as usize - 4) * SUB as usize + sub as usize
}

/// The smallest and largest value that fall in log bucket `i`.
fn log_bounds(i: usize) -> (u64, u64) {
    if (i as u64) < EXACT {
        return (i as u64, i as u64);
    }
    let j = i - EXACT as usize;
    let pow = (j / SUB as usize) as u32 + 4;
    let sub = (j % SUB as usize) as u64;
    let width = 1u64 << (pow - SUB_BITS);
    let lo = (1u64 << pow) + sub * width;
    (lo, lo + width - 1)
}

fn envoy_index(v: u64) -> usize {
    let v = v as f64;
    ENVOY_BUCKETS
        .iter()
        .position(|&b| v <= b)
        .unwrap_or(ENVOY_BUCKETS.len())
}

impl Histogram {
    pub fn new() -> Self {
        Histogram::default()
    }

    fn buckets(&self) -> &Buckets {
        self.0.buckets.get_or_init(|| {
            Box::new(Buckets {
                envoy: std::array::from_fn(|_| AtomicU64::new(0)),
                log: std::array::from_fn(|_| AtomicU64::new(0)),
            })
        })
    }

    /// Record one value.
    #[inline]
    pub fn record(&self, v: u64) {
        if !super::RECORDING {
            return;
        }
        let b = self.buckets();
        b.envoy[envoy_index(v)].fetch_add(1, Relaxed);
        b.log[log_index(v)].fetch_add(1, Relaxed);
        self.0.sum.fetch_add(v, Relaxed);
        self.0.count.fetch_add(1, Relaxed);
    }

    pub fn used(&self) -> bool {
        self.0.count.load(Relaxed) > 0
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let count = self.0.count.load(Relaxed);
        let sum = self.0.sum.load(Relaxed);
        let (envoy, log) = match self.0.buckets.get() {
            Some(b) => (
                b.envoy.iter().map(|a| a.load(Relaxed)).collect(),
                b.log.iter().map(|a| a.load(Relaxed)).collect(),
            ),
            None => (vec![0; ENVOY_BUCKETS.len() + 1], Vec::new()),
        };
        HistogramSnapshot {
            count,
            sum,
            envoy,
            log,
        }
    }
}

/// A point-in-time copy of a histogram, for output.
#[derive(Clone, Debug, Default)]
pub struct HistogramSnapshot {
    pub count: u64,
    pub sum: u64,
    /// Per Envoy bucket (not cumulative); the last is above the largest bound.
    envoy: Vec<u64>,
    log: Vec<u64>,
}

impl HistogramSnapshot {
    /// Cumulative counts at each of [`ENVOY_BUCKETS`] (Prometheus `le` buckets, without `+Inf`).
    pub fn cumulative(&self) -> Vec<u64> {
        let mut acc = 0;
        self.envoy[..ENVOY_BUCKETS.len()]
            .iter()
            .map(|c| {
                acc += c;
                acc
            })
            .collect()
    }

    /// The value at quantile `q` (0.0..=1.0), interpolated within its bucket; `None` with no values.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.log.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0u64;
        for (i, &c) in self.log.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (seen + c) as f64 >= rank {
                let (lo, hi) = log_bounds(i);
                let within = ((rank - seen as f64) / c as f64).clamp(0.0, 1.0);
                return Some(lo as f64 + within * (hi + 1 - lo) as f64).map(|v| v.min(hi as f64 + 1.0));
            }
            seen += c;
        }
        let last = self.log.iter().rposition(|&c| c > 0)?;
        Some(log_bounds(last).1 as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_buckets_cover_values_contiguously() {
        let mut prev_hi = None;
        for i in 0..LOG_BUCKETS {
            let (lo, hi) = log_bounds(i);
            assert!(lo <= hi);
            if let Some(p) = prev_hi {
                assert_eq!(lo, p + 1, "bucket {i}");
            }
            assert_eq!(log_index(lo), i);
            assert_eq!(log_index(hi), i);
            prev_hi = Some(hi);
        }
    }

    #[test]
    fn envoy_buckets_are_exact_for_integers() {
        let h = Histogram::new();
        for v in [0, 1, 2, 5, 6, 25, 26, 3_600_000, 3_600_001] {
            h.record(v);
        }
        let s = h.snapshot();
        let c = s.cumulative();
        assert_eq!(c[0], 1); // le 0.5: 0
        assert_eq!(c[1], 2); // le 1
        assert_eq!(c[2], 4); // le 5: 2, 5
        assert_eq!(c[4], 6); // le 25: 6, 25
        assert_eq!(c[18], 8);
        assert_eq!(s.count, 9);
        assert_eq!(s.sum, 7_200_066);
    }

    #[test]
    fn quantiles_are_close() {
        let h = Histogram::new();
        for v in 1..=1000 {
            h.record(v);
        }
        let s = h.snapshot();
        for (q, want) in [(0.5, 500.0), (0.9, 900.0), (0.99, 990.0)] {
            let got = s.quantile(q).unwrap();
            assert!((got - want).abs() / want < 0.07, "q{q}: {got} vs {want}");
        }
        assert_eq!(Histogram::new().snapshot().quantile(0.5), None);
    }
}
