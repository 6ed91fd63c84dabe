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
        LbPolicy::LeastRequest { choice_count } => {
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
        HostSet::new(
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
                    })
                })
                .collect(),
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
        for p in [LbPolicy::Random, LbPolicy::LeastRequest { choice_count: 2 }] {
            let c = counts(p, &set(&[1, 1, 1, 1]), 4000);
            assert!(c.iter().all(|&x| (800..1200).contains(&x)), "{p:?} {c:?}");
        }
    }

    #[test]
    fn least_request_prefers_idle_hosts() {
        let s = set(&[1, 1]);
        s.hosts[0].stats.rq_active.store(10, Relaxed);
        let c = counts(LbPolicy::LeastRequest { choice_count: 2 }, &s, 1000);
        // Host 0 wins only when both choices land on it (1/4 of picks).
        assert!(c[0] < 320 && c[0] > 180, "{c:?}");
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
