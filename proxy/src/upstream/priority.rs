//! Priority levels and their load, the healthy panic threshold, degraded hosts, and locality-weighted selection.
//!
//! The algorithm is Envoy's `LoadBalancerBase` (`source/extensions/load_balancing_policies/common/
//! load_balancer_impl.cc`: `recalculatePerPriorityState`, `distributeLoad`, `recalculatePerPriorityPanic`,
//! `recalculateLoadInTotalPanic`, `choosePriority`, `isHostSetInPanic`) as the docs `priority.rst`,
//! `panic_threshold.rst`, `degraded.rst` and `overprovisioning.rst` describe it:
//!
//! ```text
//! health(P)   = min(100, overprovisioning_factor * healthy(P)  / hosts(P))     integer division
//! degraded(P) = min(100, overprovisioning_factor * degraded(P) / hosts(P))
//! normalized_total_availability = min(100, Σ health + Σ degraded)
//! healthy_load(P)  = min(left, health(P)   * 100 / normalized_total_availability), left starting at 100
//! degraded_load(P) = min(left, degraded(P) * 100 / normalized_total_availability), with what healthy left over
//! ```
//! A rounding remainder goes to the first priority with healthy hosts (else the first with degraded hosts).
//! A level is in panic when `100 * (healthy + degraded) / hosts < healthy_panic_threshold`, but never while
//! the normalized total availability is 100. When every level is in panic ("total panic") load follows host counts
//! regardless of health. A pick draws `hash % 100 + 1` and walks the healthy loads, then the degraded loads.
//!
//! Locality-weighted balancing (`locality_wrr.cc`, `locality_weight.rst`) picks a locality within the chosen
//! priority by earliest-deadline-first over `effective_weight = locality_weight * min(1, factor/100 *
//! eligible/hosts)`, localities of zero effective weight left out.
//!
//! Host counts exclude excluded hosts; `weighted_priority_health` (host weights instead of counts) is refused at
//! lowering.

use super::lb::Rng;

/// `ClusterLoadAssignment.policy.overprovisioning_factor` default (1.4, in percent).
pub const DEFAULT_OVERPROVISIONING_FACTOR: u32 = 140;
/// `common_lb_config.healthy_panic_threshold` default.
pub const DEFAULT_PANIC_THRESHOLD: u32 = 50;

/// One priority level's host counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LevelCounts {
    /// Hosts in the level, excluded hosts not counted.
    pub hosts: u32,
    pub healthy: u32,
    pub degraded: u32,
}

/// Whether a pick targets a level's healthy or its degraded hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    Healthy,
    Degraded,
}

/// The per-priority state Envoy latches on every membership change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriorityLoad {
    pub health: Vec<u32>,
    pub degraded: Vec<u32>,
    pub healthy_load: Vec<u32>,
    pub degraded_load: Vec<u32>,
    pub panic: Vec<bool>,
    pub normalized_total_availability: u32,
    /// Every level is in panic: loads follow host counts.
    pub total_panic: bool,
}

/// Assign `total` to levels by availability; returns the first available level and what is left.
fn distribute(load: &mut [u32], avail: &[u32], mut total: u32, norm: u32) -> (Option<usize>, u32) {
    let mut first = None;
    for (i, (&a, l)) in avail.iter().zip(load.iter_mut()).enumerate() {
        if first.is_none() && a > 0 {
            first = Some(i);
        }
        *l = total.min(a * 100 / norm);
        total -= *l;
    }
    (first, total)
}

impl PriorityLoad {
    /// Compute the loads of `levels` (index = priority) with `overprovisioning_factor` (percent) and
    /// `panic_threshold` (percent, 0 disables panic).
    pub fn compute(levels: &[LevelCounts], overprovisioning_factor: u32, panic_threshold: u32) -> Self {
        let factors = vec![overprovisioning_factor; levels.len()];
        Self::compute_with_factors(levels, &factors, panic_threshold)
    }

    /// As [`compute`](Self::compute), each level with its own overprovisioning factor (`factors[i]` for
    /// `levels[i]`): an aggregate cluster's levels keep the factors of the clusters they come from.
    pub fn compute_with_factors(levels: &[LevelCounts], factors: &[u32], panic_threshold: u32) -> Self {
        let n = levels.len().max(1);
        let mut s = PriorityLoad {
            health: vec![0; n],
            degraded: vec![0; n],
            healthy_load: vec![0; n],
            degraded_load: vec![0; n],
            panic: vec![false; n],
            normalized_total_availability: 0,
            total_panic: false,
        };
        for (i, l) in levels.iter().enumerate() {
            let factor = u64::from(factors.get(i).copied().unwrap_or(DEFAULT_OVERPROVISIONING_FACTOR));
            if l.hosts > 0 {
                s.health[i] = (factor * u64::from(l.healthy) / u64::from(l.hosts)).min(100) as u32;
                s.degraded[i] = (factor * u64::from(l.degraded) / u64::from(l.hosts)).min(100) as u32;
            }
        }
        let norm = (s.health.iter().sum::<u32>() + s.degraded.iter().sum::<u32>()).min(100);
        s.normalized_total_availability = norm;
        if norm > 0 {
            let (first_h, left) = distribute(&mut s.healthy_load, &s.health, 100, norm);
            let (first_d, left) = distribute(&mut s.degraded_load, &s.degraded, left, norm);
            if left > 0 {
                match (first_h, first_d) {
                    (Some(i), _) => s.healthy_load[i] += left,
                    (None, Some(i)) => s.degraded_load[i] += left,
                    (None, None) => s.healthy_load[0] += left,
                }
            }
        }
        let threshold = panic_threshold.min(100);
        if threshold == 0 && norm == 0 {
            // Panic disabled and nothing available: all load on P=0, where no host will be found.
            s.healthy_load[0] = 100;
            return s;
        }
        let mut total_panic = true;
        for (i, l) in levels.iter().enumerate() {
            s.panic[i] = norm != 100 && level_in_panic(l, threshold);
            total_panic &= s.panic[i];
        }
        if levels.is_empty() {
            total_panic = true;
        }
        if total_panic {
            s.total_panic = true;
            s.recalculate_in_total_panic(levels);
        }
        s
    }

    /// `recalculateLoadInTotalPanic`: load by host count, remainder to the first non-empty level.
    fn recalculate_in_total_panic(&mut self, levels: &[LevelCounts]) {
        let total: u64 = levels.iter().map(|l| u64::from(l.hosts)).sum();
        self.degraded_load.iter_mut().for_each(|l| *l = 0);
        if total == 0 {
            self.healthy_load.iter_mut().for_each(|l| *l = 0);
            self.healthy_load[0] = 100;
            return;
        }
        let mut left = 100u32;
        let mut first = None;
        for (i, l) in levels.iter().enumerate() {
            if first.is_none() && l.hosts > 0 {
                first = Some(i);
            }
            let load = (100 * u64::from(l.hosts) / total) as u32;
            self.healthy_load[i] = load;
            left -= load;
        }
        if let Some(i) = first {
            self.healthy_load[i] += left;
        }
    }

    /// `choosePriority`: the level and availability for a random `hash`.
    pub fn choose(&self, hash: u64) -> (usize, Availability) {
        choose_in(&self.healthy_load, &self.degraded_load, hash)
    }
}

/// `choosePriority` over given loads (the cluster's, or a retry priority's).
pub fn choose_in(healthy_load: &[u32], degraded_load: &[u32], hash: u64) -> (usize, Availability) {
    let h = (hash % 100 + 1) as u32;
    let mut acc = 0;
    for (p, &l) in healthy_load.iter().enumerate() {
        acc += l;
        if h <= acc {
            return (p, Availability::Healthy);
        }
    }
    for (p, &l) in degraded_load.iter().enumerate() {
        acc += l;
        if h <= acc {
            return (p, Availability::Degraded);
        }
    }
    (0, Availability::Healthy)
}

/// `isHostSetInPanic`: healthy plus degraded share below the threshold (percent).
pub fn level_in_panic(l: &LevelCounts, panic_threshold: u32) -> bool {
    let (healthy, degraded) = if l.hosts == 0 {
        (0.0, 0.0)
    } else {
        (
            100.0 * f64::from(l.healthy) / f64::from(l.hosts),
            100.0 * f64::from(l.degraded) / f64::from(l.hosts),
        )
    };
    healthy + degraded < f64::from(panic_threshold.min(100))
}

/// Which hosts of which level a pick draws from (`hostSourceToUse` without zone routing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostSource {
    /// The level is in panic: every host, regardless of health.
    All {
        priority: usize,
    },
    Healthy {
        priority: usize,
    },
    Degraded {
        priority: usize,
    },
}

impl HostSource {
    pub fn priority(self) -> usize {
        match self {
            HostSource::All { priority }
            | HostSource::Healthy { priority }
            | HostSource::Degraded { priority } => priority,
        }
    }
}

/// Choose the source for a pick: `None` when the chosen level is in panic and `fail_traffic_on_panic` is set.
/// `on_panic` runs when the chosen level is in panic (count `lb_healthy_panic`).
pub fn host_source(
    load: &PriorityLoad,
    hash: u64,
    fail_traffic_on_panic: bool,
    on_panic: impl FnOnce(),
) -> Option<HostSource> {
    let (priority, avail) = load.choose(hash);
    source_at(load, priority, avail, fail_traffic_on_panic, on_panic)
}

/// The source for a level and availability chosen already (`hostSourceToUse` after `chooseHostSet`).
pub fn source_at(
    load: &PriorityLoad,
    priority: usize,
    avail: Availability,
    fail_traffic_on_panic: bool,
    on_panic: impl FnOnce(),
) -> Option<HostSource> {
    if load.panic.get(priority).copied().unwrap_or(false) {
        on_panic();
        if fail_traffic_on_panic {
            return None;
        }
        return Some(HostSource::All { priority });
    }
    Some(match avail {
        Availability::Healthy => HostSource::Healthy { priority },
        Availability::Degraded => HostSource::Degraded { priority },
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Locality-weighted selection.

/// One locality of a priority level, for locality-weighted balancing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalityCounts {
    /// `LocalityLbEndpoints.load_balancing_weight` (0 when unset: such a locality takes no traffic).
    pub weight: u32,
    /// Hosts, excluded hosts not counted.
    pub hosts: u32,
    /// Healthy hosts (or degraded hosts, for the degraded schedule).
    pub eligible: u32,
}

/// `LocalityWrr::effectiveLocalityWeight`.
pub fn effective_locality_weight(l: &LocalityCounts, overprovisioning_factor: u32) -> f64 {
    if l.hosts == 0 {
        return 0.0;
    }
    let ratio = f64::from(l.eligible) / f64::from(l.hosts);
    f64::from(l.weight) * (f64::from(overprovisioning_factor) / 100.0 * ratio).min(1.0)
}

/// An earliest-deadline-first schedule over localities (Envoy's `EdfScheduler<LocalityEntry>`): each pick takes
/// the entry with the earliest deadline (ties to the earlier entry) and re-adds it `1 / weight` later.
#[derive(Clone, Debug)]
pub struct LocalityWrr {
    /// (locality index, weight, deadline)
    entries: Vec<(usize, f64, f64)>,
}

impl LocalityWrr {
    /// A schedule over the localities' effective weights; `None` when every weight is zero (the caller then
    /// balances over the level's hosts, as Envoy does without a scheduler).
    pub fn new(localities: &[LocalityCounts], overprovisioning_factor: u32) -> Option<Self> {
        let entries: Vec<(usize, f64, f64)> = localities
            .iter()
            .enumerate()
            .map(|(i, l)| (i, effective_locality_weight(l, overprovisioning_factor)))
            .filter(|(_, w)| *w > 0.0)
            .map(|(i, w)| (i, w, 1.0 / w))
            .collect();
        (!entries.is_empty()).then_some(LocalityWrr { entries })
    }

    /// Start at a random point of the schedule, as Envoy's `createWithPicks` does with its seed.
    pub fn randomize(&mut self, rng: &mut Rng) {
        let n = rng.below(self.entries.len() * 4);
        for _ in 0..n {
            self.pick();
        }
    }

    /// The next locality index.
    pub fn pick(&mut self) -> usize {
        let mut best = 0;
        for (i, e) in self.entries.iter().enumerate() {
            if e.2 < self.entries[best].2 {
                best = i;
            }
        }
        let e = &mut self.entries[best];
        let now = e.2;
        e.2 = now + 1.0 / e.1;
        e.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A level of 100 hosts with the given healthy and degraded percentages.
    fn lv(healthy: u32, degraded: u32) -> LevelCounts {
        LevelCounts {
            hosts: 100,
            healthy,
            degraded,
        }
    }

    fn loads(levels: &[LevelCounts]) -> Vec<u32> {
        PriorityLoad::compute(levels, 140, 50).healthy_load
    }

    /// `priority.rst`, the first table: two levels, P=1 100% healthy.
    #[test]
    fn priority_doc_two_levels_p1_healthy() {
        for (p0, expect) in [
            (100, [100, 0]),
            (72, [100, 0]),
            (71, [99, 1]),
            (50, [70, 30]),
            (25, [35, 65]),
            (0, [0, 100]),
        ] {
            assert_eq!(loads(&[lv(p0, 0), lv(100, 0)]), expect, "P0 {p0}%");
        }
    }

    /// `priority.rst`, the second table: both levels degrade, loads normalised below 100.
    #[test]
    fn priority_doc_two_levels_normalised() {
        for ((p0, p1), expect) in [
            ((100, 100), [100, 0]),
            ((72, 72), [100, 0]),
            ((71, 71), [99, 1]),
            ((50, 50), [70, 30]),
            ((25, 100), [35, 65]),
            ((25, 25), [50, 50]),
        ] {
            assert_eq!(loads(&[lv(p0, 0), lv(p1, 0)]), expect, "{p0}% {p1}%");
        }
    }

    /// `priority.rst`, the third table: three levels. The last row (25/25/20% healthy) reads 36/36/28 in the
    /// docs, which ignore panic: with the default threshold every level is in panic there (total panic, load by
    /// host count, 34/33/33). With panic disabled Envoy's code (`distributeLoad`, remainder to the first healthy
    /// level) gives 37/35/28, which is what Remora does.
    #[test]
    fn priority_doc_three_levels() {
        let s = PriorityLoad::compute(&[lv(25, 0), lv(25, 0), lv(20, 0)], 140, 50);
        assert!(s.total_panic);
        assert_eq!(s.healthy_load, [34, 33, 33]);
        let loads = |l: &[LevelCounts]| PriorityLoad::compute(l, 140, 0).healthy_load;
        for ((a, b, c), expect) in [
            ((100, 100, 100), [100, 0, 0]),
            ((72, 72, 100), [100, 0, 0]),
            ((71, 71, 100), [99, 1, 0]),
            ((50, 50, 100), [70, 30, 0]),
            ((25, 100, 100), [35, 65, 0]),
            ((25, 25, 100), [35, 35, 30]),
            ((25, 25, 20), [37, 35, 28]),
        ] {
            assert_eq!(loads(&[lv(a, 0), lv(b, 0), lv(c, 0)]), expect, "{a} {b} {c}");
        }
    }

    /// `panic_threshold.rst`, the first table: P=1 100% healthy, so nothing is ever in panic.
    #[test]
    fn panic_doc_p1_healthy_never_panics() {
        for (p0, expect) in [
            (72, [100, 0]),
            (71, [99, 1]),
            (50, [70, 30]),
            (25, [35, 65]),
            (0, [0, 100]),
        ] {
            let s = PriorityLoad::compute(&[lv(p0, 0), lv(100, 0)], 140, 50);
            assert_eq!(s.healthy_load, expect);
            assert_eq!(s.panic, [false, false]);
            assert_eq!(s.normalized_total_availability, 100);
        }
    }

    /// `panic_threshold.rst`, the second table. Two rows of that table (50%/60% → 50/50, 25%/100% → 25/75)
    /// were computed without the overprovisioning factor; with a factor of 100 they hold exactly, and with the
    /// default 140 Envoy's code gives 70/30 and 35/65. The last row reads 7/93 in the docs; the code's rounding
    /// remainder goes to P=0, giving 8/92.
    #[test]
    fn panic_doc_both_levels_degrade() {
        let row = |p0, p1, factor| PriorityLoad::compute(&[lv(p0, 0), lv(p1, 0)], factor, 50);
        let s = row(72, 72, 140);
        assert_eq!(
            (s.healthy_load.clone(), s.panic.clone()),
            (vec![100, 0], vec![false, false])
        );
        let s = row(71, 71, 140);
        assert_eq!(
            (s.healthy_load.clone(), s.panic.clone()),
            (vec![99, 1], vec![false, false])
        );
        assert_eq!(row(50, 60, 100).healthy_load, [50, 50]);
        assert_eq!(row(50, 60, 140).healthy_load, [70, 30]);
        assert_eq!(row(25, 100, 100).healthy_load, [25, 75]);
        assert_eq!(row(25, 100, 140).healthy_load, [35, 65]);
        let s = row(25, 25, 140);
        assert_eq!(s.healthy_load, [50, 50]);
        assert_eq!(s.panic, [true, true]);
        assert_eq!(s.normalized_total_availability, 70);
        // Both levels in panic: total panic, load by host count (100 and 100 hosts).
        assert!(s.total_panic);
        let s = row(5, 65, 140);
        assert_eq!(s.healthy_load, [8, 92]);
        assert_eq!(s.panic, [true, false]);
        assert_eq!(s.normalized_total_availability, 98);
    }

    /// `panic_threshold.rst`: with every host down and a threshold above 0, all traffic goes to P=0 (in panic);
    /// with a threshold of 0 no level panics and P=0 nominally takes the load.
    #[test]
    fn panic_all_down() {
        let s = PriorityLoad::compute(&[lv(0, 0), lv(0, 0)], 140, 50);
        assert_eq!(s.healthy_load, [50, 50]);
        assert!(s.total_panic);
        let s = PriorityLoad::compute(
            &[
                LevelCounts {
                    hosts: 3,
                    healthy: 0,
                    degraded: 0,
                },
                LevelCounts {
                    hosts: 1,
                    healthy: 0,
                    degraded: 0,
                },
            ],
            140,
            50,
        );
        assert_eq!(s.healthy_load, [75, 25]);
        let s = PriorityLoad::compute(&[lv(0, 0), lv(0, 0)], 140, 0);
        assert_eq!(s.healthy_load, [100, 0]);
        assert_eq!(s.panic, [false, false]);
        let src = host_source(&s, 0, false, || panic!("not in panic"));
        assert_eq!(src, Some(HostSource::Healthy { priority: 0 }));
    }

    /// `degraded.rst`: P=0 healthy/degraded/unhealthy shares and the traffic to its healthy and degraded hosts.
    #[test]
    fn degraded_doc_table() {
        for ((h, d), (to_h, to_d)) in [
            ((100, 0), (100, 0)),
            ((71, 0), (100, 0)),
            ((71, 29), (99, 1)),
            ((25, 65), (35, 65)),
            ((5, 0), (100, 0)),
        ] {
            let s = PriorityLoad::compute(&[lv(h, d)], 140, 0);
            assert_eq!((s.healthy_load[0], s.degraded_load[0]), (to_h, to_d), "{h}/{d}");
        }
    }

    /// The worked example in `recalculatePerPriorityState`'s comment: health 10/20/10 and degraded 20/10/0
    /// give healthy loads 16/28/14 (with the 2% remainder on P=0) and degraded loads 28/14/0.
    #[test]
    fn healthy_and_degraded_spill_across_levels() {
        // health = 140 * healthy / 1400 = healthy / 10.
        let l = |h: u32, d: u32| LevelCounts {
            hosts: 1400,
            healthy: h * 10,
            degraded: d * 10,
        };
        let s = PriorityLoad::compute(&[l(10, 20), l(20, 10), l(10, 0)], 140, 0);
        assert_eq!(s.health, [10, 20, 10]);
        assert_eq!(s.degraded, [20, 10, 0]);
        assert_eq!(s.normalized_total_availability, 70);
        assert_eq!(s.healthy_load, [16, 28, 14]);
        assert_eq!(s.degraded_load, [28, 14, 0]);
        // choosePriority walks healthy loads, then degraded.
        assert_eq!(s.choose(15), (0, Availability::Healthy));
        assert_eq!(s.choose(16), (1, Availability::Healthy));
        assert_eq!(s.choose(57), (2, Availability::Healthy));
        assert_eq!(s.choose(58), (0, Availability::Degraded));
        assert_eq!(s.choose(99), (1, Availability::Degraded));
    }

    #[test]
    fn panic_source_and_fail_traffic_on_panic() {
        let s = PriorityLoad::compute(&[lv(25, 0)], 140, 50);
        assert_eq!(s.panic, [true]);
        let mut panics = 0;
        assert_eq!(
            host_source(&s, 3, false, || panics += 1),
            Some(HostSource::All { priority: 0 })
        );
        assert_eq!(host_source(&s, 3, true, || panics += 1), None);
        assert_eq!(panics, 2);
    }

    /// `locality_weight.rst`: X weight 1, Y weight 2 (100% healthy), X's health varying. The docs' table uses
    /// integer availabilities (69% → 96, 32.4% → "32"); Envoy's code uses doubles (32.6%), so the shares are
    /// checked to within a percentage point of the table.
    #[test]
    fn locality_weight_doc_table() {
        for (x, percent) in [(100, 33), (70, 33), (69, 32), (50, 26), (25, 15), (0, 0)] {
            let lx = LocalityCounts {
                weight: 1,
                hosts: 100,
                eligible: x,
            };
            let ly = LocalityCounts {
                weight: 2,
                hosts: 100,
                eligible: 100,
            };
            let (wx, wy) = (
                effective_locality_weight(&lx, 140),
                effective_locality_weight(&ly, 140),
            );
            let share = 100.0 * wx / (wx + wy);
            assert!((share - f64::from(percent)).abs() < 1.0, "X {x}%: {share}");
            // The schedule realises the shares.
            let mut wrr = LocalityWrr::new(&[lx, ly], 140).unwrap();
            let n = 10_000;
            let to_x = (0..n).filter(|_| wrr.pick() == 0).count();
            assert!((100.0 * to_x as f64 / f64::from(n) - share).abs() < 0.1);
        }
    }

    #[test]
    fn locality_wrr_is_a_smooth_weighted_round_robin() {
        let l = |w| LocalityCounts {
            weight: w,
            hosts: 1,
            eligible: 1,
        };
        let mut wrr = LocalityWrr::new(&[l(1), l(0), l(3)], 140).unwrap();
        let picks: Vec<usize> = (0..8).map(|_| wrr.pick()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 2).count(), 6);
        assert!(!picks.contains(&1));
        assert!(LocalityWrr::new(&[l(0)], 140).is_none());
    }
}
