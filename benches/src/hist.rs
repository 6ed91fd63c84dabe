//! A log-linear latency histogram.
//!
//! Values (nanoseconds) below 256 get a bucket each; above that every power of two is split into 128 equal
//! buckets, so a reported value is within 0.4% of the recorded one (half a bucket's width). Values beyond
//! 2^41 ns (about 36 minutes) are clamped. The layout is the one HdrHistogram uses with two significant
//! digits, written out here because it is 100 lines and the harness needs to merge and serialise it.

const SUB_BITS: u32 = 7;
const SUB: usize = 1 << SUB_BITS;
const LINEAR: u64 = 2 * SUB as u64;
const MAX_EXP: u32 = 40;
const LEN: usize = LINEAR as usize + (MAX_EXP - SUB_BITS) as usize * SUB;
const MAX_VALUE: u64 = (1 << (MAX_EXP + 1)) - 1;

/// Counts of values in log-linear buckets, plus the exact minimum, maximum and sum.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn index(v: u64) -> usize {
    let v = v.min(MAX_VALUE);
    if v < LINEAR {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS + 1
    let mantissa = (v >> (exp - SUB_BITS)) as usize; // in [SUB, 2 * SUB)
    LINEAR as usize + (exp - SUB_BITS - 1) as usize * SUB + (mantissa - SUB)
}

/// The lowest value of bucket `i` and the bucket's width.
fn bucket(i: usize) -> (u64, u64) {
    if (i as u64) < LINEAR {
        return (i as u64, 1);
    }
    let k = i - LINEAR as usize;
    let exp = (k / SUB) as u32 + SUB_BITS + 1;
    let mantissa = (SUB + k % SUB) as u64;
    let shift = exp - SUB_BITS;
    (mantissa << shift, 1 << shift)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            counts: vec![0; LEN].into_boxed_slice(),
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one value.
    pub fn record(&mut self, v: u64) {
        self.record_n(v, 1);
    }

    /// Records `n` occurrences of `v`.
    pub fn record_n(&mut self, v: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.counts[index(v)] += n;
        self.total += n;
        self.sum += u128::from(v) * u128::from(n);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The largest value recorded (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The mean (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at percentile `p` (0-100): the middle of the bucket holding the `ceil(p% * count)`-th value,
    /// clamped to the exact minimum and maximum (which the first and last ranks return). 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.total as f64)
            .ceil()
            .clamp(1.0, self.total as f64) as u64;
        if rank == self.total {
            return self.max;
        }
        if rank == 1 {
            return self.min;
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, width) = bucket(i);
                return (lo + width / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// The non-empty buckets as (lowest value, count), for serialising.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (bucket(i).0, c))
    }

    /// Rebuilds a histogram from [`Histogram::buckets`] output, with the exact extremes if known.
    pub fn from_buckets(buckets: impl IntoIterator<Item = (u64, u64)>, min: u64, max: u64) -> Self {
        let mut h = Self::new();
        for (v, n) in buckets {
            h.record_n(v, n);
        }
        if h.total > 0 && min <= max {
            h.min = min;
            h.max = max;
        }
        h
    }

    /// The smallest value recorded (0 when empty).
    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_and_are_tight() {
        for v in [
            0u64,
            1,
            255,
            256,
            257,
            1000,
            65_535,
            1 << 20,
            123_456_789,
            MAX_VALUE,
        ] {
            let (lo, width) = bucket(index(v));
            assert!(lo <= v && v < lo + width, "{v} not in [{lo}, {})", lo + width);
            assert!(
                width == 1 || (width as f64) / (v as f64) <= 1.0 / 128.0 + 1e-12,
                "{v}: {width}"
            );
        }
        assert_eq!(index(MAX_VALUE), LEN - 1);
        assert_eq!(index(u64::MAX), LEN - 1);
    }

    #[test]
    fn percentiles() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile(50.0) as f64;
        assert!((p50 / 5_000_000.0 - 1.0).abs() < 0.005, "{p50}");
        let p99 = h.percentile(99.0) as f64;
        assert!((p99 / 9_900_000.0 - 1.0).abs() < 0.005, "{p99}");
        assert_eq!(h.percentile(100.0), 10_000_000);
        assert_eq!(h.percentile(0.0), 1000);
        assert_eq!(h.count(), 10_000);
        assert!((h.mean() - 5_000_500.0).abs() < 1.0);
    }

    #[test]
    fn merge_and_serialise() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        a.record(10);
        b.record_n(5_000, 3);
        a.merge(&b);
        assert_eq!(a.count(), 4);
        let c = Histogram::from_buckets(a.buckets().collect::<Vec<_>>(), a.min(), a.max());
        assert_eq!(c.count(), 4);
        assert_eq!(c.percentile(50.0), a.percentile(50.0));
        assert_eq!((c.min(), c.max()), (10, 5_000));
        assert_eq!(Histogram::new().percentile(99.0), 0);
    }
}
