//! Load balancers over a [`HostSet`]: round robin, least request (power of N choices), random, and the
//! consistent-hash balancers (ring hash, Maglev) whose structures the set carries.
//!
//! Randomness comes from a small per-worker generator that tests seed ([`Rng::seeded`]).

use super::{Candidates, Host, LbPolicy};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// A xorshift64* generator: fast, not cryptographic, seedable for tests.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn seeded(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// Seeded from the clock and the thread, for workers.
    pub fn from_entropy() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let addr = &t as *const u64 as u64;
        Rng::seeded(t ^ addr.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    #[inline]
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }
}

/// Pick one of `c`'s hosts; returns its index in `hosts`, or `None` when there is none.
pub fn pick(
    policy: LbPolicy,
    hosts: &[Arc<Host>],
    c: &Candidates,
    rr: &AtomicUsize,
    rng: &mut Rng,
    hash: Option<u64>,
) -> Option<usize> {
    let idx = &c.idx;
    let n = idx.len();
    if n == 0 {
        return None;
    }
    if n == 1 {
        return Some(idx[0]);
    }
    let i = match policy {
        LbPolicy::RoundRobin => {
            if c.uniform_weight {
                rr.fetch_add(1, Relaxed) % n
            } else {
                weighted_rr(hosts, idx, rr)
            }
        }
        LbPolicy::Random => rng.below(n),
        LbPolicy::LeastRequest {
            active_request_bias, ..
        } if c.least_request.is_some() => {
            let bias = active_request_bias.unwrap_or(1.0);
            let edf = c.least_request.as_ref()?;
            let mut edf = edf.lock().ok()?;
            edf.pick(|pos| {
                let h = &hosts[idx[pos]];
                least_request_weight(h.weight, h.stats.rq_active.load(Relaxed), bias)
            })?
        }
        LbPolicy::LeastRequest { choice_count, .. } => {
            let mut best = rng.below(n);
            for _ in 1..choice_count.max(1) {
                let c = rng.below(n);
                let active = |i: usize| hosts[idx[i]].stats.rq_active.load(Relaxed);
                if active(c) < active(best) {
                    best = c;
                }
            }
            best
        }
        // Without a hash from the route's policy, Envoy uses a random one.
        LbPolicy::RingHash(_) | LbPolicy::Maglev { .. } => {
            let hash = hash.unwrap_or_else(|| rng.next_u64());
            match &c.hash_lb {
                Some(h) => h.pick(hash)?,
                None => (hash % n as u64) as usize,
            }
        }
    };
    idx.get(i).copied()
}

/// `LeastRequestLoadBalancer::hostWeight`: `weight / (active + 1)^bias`; a bias of 0 ignores active requests
/// (round robin by weight).
pub fn least_request_weight(weight: u32, active: u64, bias: f64) -> f64 {
    let w = f64::from(weight);
    let a = active.saturating_add(1) as f64;
    if bias == 1.0 {
        w / a
    } else if bias == 0.0 {
        w
    } else {
        w / a.powf(bias)
    }
}

/// The weighted least-request schedule (Envoy's `EdfScheduler` under `EdfLoadBalancerBase`): each pick takes
/// the entry with the earliest deadline (ties to the earlier scheduled) and schedules it again `1 / weight`
/// later, its weight computed at that moment from its active requests ([`least_request_weight`]). A host's
/// weight therefore reflects its load when it was last picked; hosts never fully drain, they are picked less
/// often.
#[derive(Debug)]
pub struct LeastRequestEdf {
    /// A min-heap on (deadline, order scheduled).
    heap: std::collections::BinaryHeap<EdfEntry>,
    next: u64,
    /// The candidates' static weights.
    base: Vec<f64>,
}

#[derive(Debug)]
struct EdfEntry {
    deadline: f64,
    order: u64,
    /// Position in the candidates.
    pos: usize,
}

impl PartialEq for EdfEntry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}
impl Eq for EdfEntry {}
impl PartialOrd for EdfEntry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for EdfEntry {
    /// Reversed, so that the max-heap yields the earliest deadline.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.deadline
            .total_cmp(&self.deadline)
            .then_with(|| o.order.cmp(&self.order))
    }
}

impl LeastRequestEdf {
    /// A schedule over candidates of the given static weights (no active requests yet).
    pub fn new(weights: &[u32]) -> Self {
        let mut s = LeastRequestEdf {
            heap: std::collections::BinaryHeap::with_capacity(weights.len()),
            next: 0,
            base: weights.iter().map(|&w| f64::from(w.max(1))).collect(),
        };
        for pos in 0..weights.len() {
            s.push(0.0, pos, s.base[pos]);
        }
        s
    }

    fn push(&mut self, now: f64, pos: usize, weight: f64) {
        self.heap.push(EdfEntry {
            deadline: now + 1.0 / weight,
            order: self.next,
            pos,
        });
        self.next += 1;
    }

    /// Start at a random point, as Envoy's `createWithPicks` does, so that workers do not pick in step.
    pub fn randomize(&mut self, rng: &mut Rng) {
        let n = rng.below(self.heap.len().max(1));
        let base = std::mem::take(&mut self.base);
        for _ in 0..n {
            let _ = self.pick(|pos| base[pos]);
        }
        self.base = base;
    }

    /// The next candidate position; `weight` gives a position's current weight (it must be positive).
    pub fn pick(&mut self, weight: impl Fn(usize) -> f64) -> Option<usize> {
        let e = self.heap.pop()?;
        let w = weight(e.pos);
        let w = if w.is_finite() && w > 0.0 {
            w
        } else {
            f64::MIN_POSITIVE
        };
        self.push(e.deadline, e.pos, w);
        Some(e.pos)
    }
}

/// Weighted round robin by stepping through the cumulative weights.
fn weighted_rr(hosts: &[Arc<Host>], idx: &[usize], rr: &AtomicUsize) -> usize {
    let total: usize = idx.iter().map(|&i| hosts[i].weight as usize).sum();
    let mut k = rr.fetch_add(1, Relaxed) % total.max(1);
    for (pos, &i) in idx.iter().enumerate() {
        let w = hosts[i].weight as usize;
        if k < w {
            return pos;
        }
        k -= w;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{EndpointConfig, EndpointHealth, Locality};

    use crate::upstream::HostSet;

    fn set(weights: &[u32]) -> HostSet {
        set_with(weights, least_request(None))
    }

    fn set_with(weights: &[u32], policy: LbPolicy) -> HostSet {
        let lb = crate::upstream::LbSettings {
            policy,
            ..Default::default()
        };
        HostSet::build(
            weights
                .iter()
                .enumerate()
                .map(|(i, &w)| {
                    Host::new(&EndpointConfig {
                        address: format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                        hostname: String::new(),
                        weight: w,
                        priority: 0,
                        locality: Locality::default(),
                        locality_weight: 0,
                        health: EndpointHealth::Unknown,
                        health_check_port: None,
                        health_check_disabled: false,
                        health_check_hostname: String::new(),
                    })
                })
                .collect(),
            |_| false,
            &lb,
        )
    }

    fn counts(policy: LbPolicy, s: &HostSet, n: usize) -> Vec<usize> {
        let rr = AtomicUsize::new(0);
        let mut rng = Rng::seeded(7);
        let mut c = vec![0; s.hosts.len()];
        for _ in 0..n {
            c[pick(policy, &s.hosts, &s.levels[0].healthy, &rr, &mut rng, None).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn round_robin_is_even_and_weighted() {
        assert_eq!(
            counts(LbPolicy::RoundRobin, &set(&[1, 1, 1]), 300),
            [100, 100, 100]
        );
        assert_eq!(counts(LbPolicy::RoundRobin, &set(&[1, 3]), 400), [100, 300]);
    }

    #[test]
    fn random_and_least_request_spread() {
        for p in [
            LbPolicy::Random,
            LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: None,
            },
        ] {
            let c = counts(p, &set(&[1, 1, 1, 1]), 4000);
            assert!(c.iter().all(|&x| (800..1200).contains(&x)), "{p:?} {c:?}");
        }
    }

    #[test]
    fn least_request_prefers_idle_hosts() {
        let s = set(&[1, 1]);
        s.hosts[0].stats.rq_active.store(10, Relaxed);
        let c = counts(
            LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: None,
            },
            &s,
            1000,
        );
        // Host 0 wins only when both choices land on it (1/4 of picks).
        assert!(c[0] < 320 && c[0] > 180, "{c:?}");
    }

    fn least_request(bias: Option<f64>) -> LbPolicy {
        LbPolicy::LeastRequest {
            choice_count: 2,
            active_request_bias: bias,
        }
    }

    /// `weight / (active + 1)^bias`, with 1.0 and 0.0 as Envoy special-cases them.
    #[test]
    fn least_request_weight_formula() {
        assert_eq!(least_request_weight(4, 3, 1.0), 1.0);
        assert_eq!(least_request_weight(4, 3, 0.5), 2.0);
        assert_eq!(least_request_weight(4, 3, 0.0), 4.0);
        assert_eq!(least_request_weight(4, 3, 2.0), 0.25);
        assert_eq!(least_request_weight(4, 0, 2.0), 4.0);
        assert!(least_request_weight(1, u64::MAX, 1.0) > 0.0);
    }

    /// The schedule is exact: over whole rounds each position gets its weight's share.
    #[test]
    fn least_request_edf_follows_static_weights() {
        let mut edf = LeastRequestEdf::new(&[1, 3]);
        let mut c = [0; 2];
        for _ in 0..400 {
            c[edf.pick(|pos| [1.0, 3.0][pos]).unwrap()] += 1;
        }
        assert_eq!(c, [100, 300]);
        // Equal deadlines go to the entry scheduled first.
        let mut edf = LeastRequestEdf::new(&[1, 1]);
        assert_eq!(edf.pick(|_| 1.0), Some(0));
        assert_eq!(edf.pick(|_| 1.0), Some(1));
    }

    /// Unequal weights: the weights are scaled by active requests, harder with a larger bias; a bias of 0 is
    /// weighted round robin.
    #[test]
    fn least_request_bias_scales_weights_by_active_requests() {
        // Host 0 weight 2 with 1 active request, host 1 weight 1 idle.
        let s = set(&[2, 1]);
        s.hosts[0].stats.rq_active.store(1, Relaxed);
        assert!(s.levels[0].healthy.least_request.is_some());
        // Bias 1 (the default): 2/2 against 1/1, even.
        // The schedule starts at a random point: exact to a pick or two.
        let near = |c: Vec<usize>, want: usize| assert!(c[0].abs_diff(want) <= 2, "{c:?}");
        near(counts(least_request(None), &s, 600), 300);
        // Bias 0: active requests ignored, 2:1.
        let s0 = set(&[2, 1]);
        s0.hosts[0].stats.rq_active.store(1, Relaxed);
        near(counts(least_request(Some(0.0)), &s0, 600), 400);
        // Bias 2: 2/4 against 1, 1:2.
        let s2 = set(&[2, 1]);
        s2.hosts[0].stats.rq_active.store(1, Relaxed);
        near(counts(least_request(Some(2.0)), &s2, 600), 200);
    }

    /// Equal weights use P2C unless `active_request_bias` is set, which forces the weighted schedule (Envoy's
    /// `least_request_lb_active_request_bias_forces_weighted`).
    #[test]
    fn an_explicit_bias_forces_weighted_selection() {
        let p2c = set_with(&[1, 1], least_request(None));
        assert!(p2c.levels[0].healthy.least_request.is_none());
        let weighted = set_with(&[1, 1], least_request(Some(1.0)));
        weighted.hosts[0].stats.rq_active.store(3, Relaxed);
        // 1/4 against 1/1: 20% / 80%, exactly, where P2C would give host 0 a quarter.
        let c = counts(least_request(Some(1.0)), &weighted, 500);
        assert!(c[0].abs_diff(100) <= 2, "{c:?}");
    }

    #[test]
    fn unhealthy_hosts_are_skipped() {
        let mut s = set(&[1, 1]);
        s.levels[0].healthy.idx = vec![1];
        assert_eq!(counts(LbPolicy::RoundRobin, &s, 10), [0, 10]);
        s.levels[0].healthy.idx.clear();
        let c = &s.levels[0].healthy;
        let none = pick(
            LbPolicy::Random,
            &s.hosts,
            c,
            &AtomicUsize::new(0),
            &mut Rng::seeded(1),
            None,
        );
        assert!(none.is_none());
    }
}
