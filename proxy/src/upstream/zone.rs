//! Zone-aware routing: keep requests in this proxy's zone as far as the upstream's capacity there allows, and
//! spread the rest over the other zones by their residual capacity.
//!
//! Spec: Envoy's `docs/root/intro/arch_overview/upstream/load_balancing/zone_aware.rst`; algorithm:
//! `ZoneAwareLoadBalancerBase` in `source/extensions/load_balancing_policies/common/load_balancer_impl.cc`
//! (`regenerateLocalityRoutingStructures`, `earlyExitNonLocalityRouting`, `calculateLocalityPercentages`,
//! `tryChooseLocalLocalityHosts`, `hostSourceToUse`).
//!
//! **When the structures are computed** (on every change of the upstream's priority 0 or the local cluster,
//! counting `lb_recalculate_zone_structures`), routing is off when, in this order:
//! 1. the upstream's priority 0 has hosts in fewer than 2 localities;
//! 2. the local cluster has hosts in fewer than 2 localities;
//! 3. the local cluster has no host in this proxy's locality (`lb_local_cluster_not_ok`);
//! 4. the upstream's priority 0 has fewer than `min_cluster_size` healthy hosts (`lb_zone_cluster_too_small`).
//!
//! Otherwise, with `local%` and `upstream%` each locality's share of the local cluster's and the upstream's
//! healthy hosts, in basis points (`10000 * count / total`, integer division):
//! - if the upstream has this locality with `upstream% > 0` and `upstream% >= local%`, every zone-routed request
//!   stays in it (**all directly**);
//! - else a request stays local with probability `upstream% * 10000 / local%` basis points (**sampled**; 0 when
//!   the upstream has no host here), and otherwise goes **cross zone** to another locality chosen in proportion
//!   to its residual capacity `max(0, upstream% - local%)`; with no residual capacity anywhere (rounding) a
//!   random locality is used (`lb_zone_no_capacity_left`).
//!
//! **Per request** (`hostSourceToUse`), after the priority is chosen: priority 0 only (other priorities never
//! zone-route); an upstream level in panic balances over all its hosts (the priority module counts
//! `lb_healthy_panic`); `routing_enabled` percent of requests are zone-routed, the rest balance over all healthy
//! hosts; a local cluster in panic (by `healthy_panic_threshold`) counts `lb_local_cluster_not_ok` and balances
//! over all healthy hosts, or fails the request with `fail_traffic_on_panic`.
//!
//! The docs' precondition "the originating cluster has the same number of zones as the upstream cluster" is not
//! what the code checks (it checks 1-4 above); Remora follows the code. Zone-aware routing is skipped when
//! `locality_weighted_lb_config` is set (the docs call the two mutually exclusive).
//!
//! Beyond Envoy, [`ZoneRouting::describe`] says whether routing is active and, if not, which precondition
//! failed, for an admin endpoint.

use super::lb::Rng;
use super::priority::level_in_panic;
use super::priority::LevelCounts;
use super::Locality;
use crate::stats::{Counter, Scope};
use serde_json::{json, Value};

/// `common_lb_config.zone_aware_lb_config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneAwareConfig {
    /// `routing_enabled` (percent of requests, default 100).
    pub routing_enabled: u32,
    /// `min_cluster_size` (default 6).
    pub min_cluster_size: u64,
    /// `fail_traffic_on_panic`.
    pub fail_traffic_on_panic: bool,
}

impl Default for ZoneAwareConfig {
    fn default() -> Self {
        ZoneAwareConfig {
            routing_enabled: 100,
            min_cluster_size: 6,
            fail_traffic_on_panic: false,
        }
    }
}

/// `cluster.<name>.lb_zone_*` and related counters.
#[derive(Clone, Debug)]
pub struct ZoneStats {
    pub lb_zone_routing_all_directly: Counter,
    pub lb_zone_routing_sampled: Counter,
    pub lb_zone_routing_cross_zone: Counter,
    pub lb_zone_cluster_too_small: Counter,
    pub lb_local_cluster_not_ok: Counter,
    pub lb_recalculate_zone_structures: Counter,
    pub lb_zone_no_capacity_left: Counter,
}

impl ZoneStats {
    pub fn new(scope: &Scope) -> Self {
        ZoneStats {
            lb_zone_routing_all_directly: scope.counter("lb_zone_routing_all_directly"),
            lb_zone_routing_sampled: scope.counter("lb_zone_routing_sampled"),
            lb_zone_routing_cross_zone: scope.counter("lb_zone_routing_cross_zone"),
            lb_zone_cluster_too_small: scope.counter("lb_zone_cluster_too_small"),
            lb_local_cluster_not_ok: scope.counter("lb_local_cluster_not_ok"),
            lb_recalculate_zone_structures: scope.counter("lb_recalculate_zone_structures"),
            lb_zone_no_capacity_left: scope.counter("lb_zone_no_capacity_left"),
        }
    }

    /// Counters registered nowhere (tests, clusters without stats).
    pub fn detached() -> Self {
        ZoneStats {
            lb_zone_routing_all_directly: Counter::detached(),
            lb_zone_routing_sampled: Counter::detached(),
            lb_zone_routing_cross_zone: Counter::detached(),
            lb_zone_cluster_too_small: Counter::detached(),
            lb_local_cluster_not_ok: Counter::detached(),
            lb_recalculate_zone_structures: Counter::detached(),
            lb_zone_no_capacity_left: Counter::detached(),
        }
    }
}

/// One locality's hosts in a cluster (priority 0 for the upstream).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZoneHosts {
    pub locality: Locality,
    /// Every host, excluded hosts not counted.
    pub hosts: u32,
    pub healthy: u32,
    pub degraded: u32,
}

/// Why zone-aware routing is not active.
#[derive(Clone, Debug, PartialEq)]
pub enum Inactive {
    /// `cluster_manager.local_cluster_name` is unset or names no cluster.
    NoLocalCluster,
    /// `locality_weighted_lb_config` is set on the upstream.
    LocalityWeighted,
    /// The balancer is not a zone-aware one (ring hash, maglev).
    PolicyNotZoneAware(&'static str),
    UpstreamFewerThanTwoLocalities(usize),
    LocalFewerThanTwoLocalities(usize),
    /// The local cluster has no host in this proxy's locality.
    LocalClusterLacksLocalZone,
    ClusterTooSmall {
        healthy: u64,
        min_cluster_size: u64,
    },
    RoutingDisabled,
    /// Checked per request in Envoy; latched here because it only changes with membership.
    LocalClusterInPanic {
        available_percent: f64,
        threshold: u32,
    },
    UpstreamInPanic,
}

impl Inactive {
    pub fn reason(&self) -> String {
        let why = match self {
            Inactive::NoLocalCluster => {
                "cluster_manager.local_cluster_name does not name a cluster".to_string()
            }
            Inactive::LocalityWeighted => {
                "locality_weighted_lb_config is set (the two are mutually exclusive)".to_string()
            }
            Inactive::PolicyNotZoneAware(p) => format!("the {p} load balancer is not zone aware"),
            Inactive::UpstreamFewerThanTwoLocalities(n) => format!(
                "the upstream cluster's priority 0 has hosts in {n} locality(ies); zone routing needs 2 or more"
            ),
            Inactive::LocalFewerThanTwoLocalities(n) => format!(
                "the local cluster has hosts in {n} locality(ies); zone routing needs 2 or more"
            ),
            Inactive::LocalClusterLacksLocalZone => {
                "the local cluster has no host in this proxy's locality (node.locality); counted as lb_local_cluster_not_ok".to_string()
            }
            Inactive::ClusterTooSmall {
                healthy,
                min_cluster_size,
            } => format!(
                "the upstream cluster has {healthy} healthy host(s) in priority 0, fewer than min_cluster_size {min_cluster_size}; counted as lb_zone_cluster_too_small"
            ),
            Inactive::RoutingDisabled => "zone_aware_lb_config.routing_enabled is 0%".to_string(),
            Inactive::LocalClusterInPanic {
                available_percent,
                threshold,
            } => format!(
                "the local cluster is in panic ({available_percent:.1}% of its hosts available, below the {threshold}% healthy_panic_threshold); counted as lb_local_cluster_not_ok per request"
            ),
            Inactive::UpstreamInPanic => {
                "the upstream cluster's priority 0 is in panic (healthy_panic_threshold)".to_string()
            }
        };
        format!("not enabled because {why}")
    }
}

/// The latched routing state (`LocalityRoutingState`).
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    NoLocalityRouting(Inactive),
    /// All zone-routed requests stay in the local locality.
    Direct,
    /// `local_percent_to_route` basis points stay local; `residual` is cumulative residual capacity per
    /// locality (in [`ZoneRouting::localities`] order, local first).
    Residual {
        local_percent_to_route: u64,
        residual: Vec<u64>,
    },
}

/// The input of a recalculation.
#[derive(Clone, Copy, Debug)]
pub struct ZoneInput<'a> {
    /// This proxy's locality (`node.locality`).
    pub local_locality: &'a Locality,
    /// The local cluster's hosts by locality.
    pub local_cluster: &'a [ZoneHosts],
    /// The upstream's priority-0 hosts by locality.
    pub upstream: &'a [ZoneHosts],
    /// `healthy_panic_threshold`, percent (applied to the local cluster too).
    pub panic_threshold: u32,
    /// Whether the upstream's priority 0 is in panic (from the priority load).
    pub upstream_p0_in_panic: bool,
}

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZonePick {
    /// Balance over all healthy hosts of the level (no zone routing for this request).
    AnyZone,
    /// Balance over the healthy hosts of this upstream locality (index into [`ZoneInput::upstream`]).
    Zone(usize),
    /// `fail_traffic_on_panic` with the local cluster in panic: no host.
    Fail,
}

/// A locality of the upstream with its shares, in basis points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalityShare {
    pub locality: Locality,
    /// Index into [`ZoneInput::upstream`].
    pub index: usize,
    pub local_cluster_healthy: u32,
    pub upstream_healthy: u32,
    pub local_percentage: u64,
    pub upstream_percentage: u64,
}

/// Zone-aware routing for one upstream cluster, recomputed on membership changes.
#[derive(Clone, Debug)]
pub struct ZoneRouting {
    pub config: ZoneAwareConfig,
    pub local_locality: Locality,
    /// The upstream's priority-0 localities, this proxy's first when the upstream has it.
    pub localities: Vec<LocalityShare>,
    pub has_local_locality: bool,
    pub state: State,
    /// Latched from the local cluster's health (Envoy checks it per request; it only changes with membership).
    local_cluster_panic: Option<Inactive>,
    upstream_p0_in_panic: bool,
}

impl ZoneRouting {
    /// Zone routing that cannot be active for a configuration reason.
    pub fn inactive(config: ZoneAwareConfig, why: Inactive) -> Self {
        ZoneRouting {
            config,
            local_locality: Locality::default(),
            localities: Vec::new(),
            has_local_locality: false,
            state: State::NoLocalityRouting(why),
            local_cluster_panic: None,
            upstream_p0_in_panic: false,
        }
    }

    /// `regenerateLocalityRoutingStructures`.
    pub fn compute(config: ZoneAwareConfig, input: ZoneInput<'_>, stats: &ZoneStats) -> Self {
        stats.lb_recalculate_zone_structures.inc();
        let local = input.local_locality;
        // Upstream localities with the local one first.
        let mut order: Vec<usize> = (0..input.upstream.len()).collect();
        let has_local_locality = match input.upstream.iter().position(|z| &z.locality == local) {
            Some(i) => {
                order.remove(i);
                order.insert(0, i);
                true
            }
            None => false,
        };
        let total_local_healthy: u64 = input.local_cluster.iter().map(|z| u64::from(z.healthy)).sum();
        let total_upstream_healthy: u64 = input.upstream.iter().map(|z| u64::from(z.healthy)).sum();
        let localities: Vec<LocalityShare> = order
            .iter()
            .map(|&i| {
                let u = &input.upstream[i];
                let local_count = input
                    .local_cluster
                    .iter()
                    .find(|z| z.locality == u.locality)
                    .map_or(0, |z| z.healthy);
                let (lp, up) = if u.healthy == 0 {
                    (0, 0)
                } else {
                    (
                        (10000 * u64::from(local_count))
                            .checked_div(total_local_healthy)
                            .unwrap_or(0),
                        (10000 * u64::from(u.healthy))
                            .checked_div(total_upstream_healthy)
                            .unwrap_or(0),
                    )
                };
                LocalityShare {
                    locality: u.locality.clone(),
                    index: i,
                    local_cluster_healthy: local_count,
                    upstream_healthy: u.healthy,
                    local_percentage: lp,
                    upstream_percentage: up,
                }
            })
            .collect();
        let local_totals = LevelCounts {
            hosts: input.local_cluster.iter().map(|z| z.hosts).sum(),
            healthy: input.local_cluster.iter().map(|z| z.healthy).sum(),
            degraded: input.local_cluster.iter().map(|z| z.degraded).sum(),
        };
        let local_cluster_panic =
            level_in_panic(&local_totals, input.panic_threshold).then(|| Inactive::LocalClusterInPanic {
                available_percent: if local_totals.hosts == 0 {
                    0.0
                } else {
                    100.0 * f64::from(local_totals.healthy + local_totals.degraded)
                        / f64::from(local_totals.hosts)
                },
                threshold: input.panic_threshold,
            });
        let mut z = ZoneRouting {
            config,
            local_locality: local.clone(),
            localities,
            has_local_locality,
            state: State::Direct,
            local_cluster_panic,
            upstream_p0_in_panic: input.upstream_p0_in_panic,
        };
        if let Some(why) = z.early_exit(input, stats) {
            z.state = State::NoLocalityRouting(why);
            return z;
        }
        let first = &z.localities[0];
        if has_local_locality
            && first.upstream_percentage > 0
            && first.upstream_percentage >= first.local_percentage
        {
            z.state = State::Direct;
            return z;
        }
        let local_percent_to_route = if has_local_locality && first.local_percentage > 0 {
            first.upstream_percentage * 10000 / first.local_percentage
        } else {
            0
        };
        let mut residual = Vec::with_capacity(z.localities.len());
        let mut acc = 0u64;
        for (i, l) in z.localities.iter().enumerate() {
            if !(i == 0 && has_local_locality) && l.upstream_percentage > l.local_percentage {
                acc += l.upstream_percentage - l.local_percentage;
            }
            residual.push(acc);
        }
        z.state = State::Residual {
            local_percent_to_route,
            residual,
        };
        z
    }

    /// `earlyExitNonLocalityRouting`.
    fn early_exit(&self, input: ZoneInput<'_>, stats: &ZoneStats) -> Option<Inactive> {
        let upstream_localities = input.upstream.iter().filter(|z| z.hosts > 0).count();
        if upstream_localities < 2 {
            return Some(Inactive::UpstreamFewerThanTwoLocalities(upstream_localities));
        }
        let local_localities = input.local_cluster.iter().filter(|z| z.hosts > 0).count();
        if local_localities < 2 {
            return Some(Inactive::LocalFewerThanTwoLocalities(local_localities));
        }
        let here = input
            .local_cluster
            .iter()
            .find(|z| &z.locality == input.local_locality);
        if here.is_none_or(|z| z.hosts == 0) {
            stats.lb_local_cluster_not_ok.inc();
            return Some(Inactive::LocalClusterLacksLocalZone);
        }
        let healthy: u64 = input.upstream.iter().map(|z| u64::from(z.healthy)).sum();
        if healthy < self.config.min_cluster_size {
            stats.lb_zone_cluster_too_small.inc();
            return Some(Inactive::ClusterTooSmall {
                healthy,
                min_cluster_size: self.config.min_cluster_size,
            });
        }
        None
    }

    /// Whether zone routing applies to requests (the structures allow it and nothing latched forbids it).
    pub fn active(&self) -> bool {
        self.inactive_reason().is_none()
    }

    fn inactive_reason(&self) -> Option<Inactive> {
        if let State::NoLocalityRouting(why) = &self.state {
            return Some(why.clone());
        }
        if self.upstream_p0_in_panic {
            return Some(Inactive::UpstreamInPanic);
        }
        if self.config.routing_enabled == 0 {
            return Some(Inactive::RoutingDisabled);
        }
        self.local_cluster_panic.clone()
    }

    /// Where a priority-0 request that is not in panic goes, drawing random numbers from `random`
    /// (`hostSourceToUse` from the `NoLocalityRouting` check on, then `tryChooseLocalLocalityHosts`).
    pub fn pick_with(&self, mut random: impl FnMut() -> u64, stats: &ZoneStats) -> ZonePick {
        let (local_percent_to_route, residual) = match &self.state {
            State::NoLocalityRouting(_) => return ZonePick::AnyZone,
            State::Direct => (10000, None),
            State::Residual {
                local_percent_to_route,
                residual,
            } => (*local_percent_to_route, Some(residual)),
        };
        // Runtime `featureEnabled(routing_enabled)`: a draw of its own, skipped at 0% and 100%.
        let re = u64::from(self.config.routing_enabled.min(100));
        if re == 0 || (re < 100 && random() % 100 >= re) {
            return ZonePick::AnyZone;
        }
        if self.local_cluster_panic.is_some() {
            stats.lb_local_cluster_not_ok.inc();
            return if self.config.fail_traffic_on_panic {
                ZonePick::Fail
            } else {
                ZonePick::AnyZone
            };
        }
        let Some(residual) = residual else {
            stats.lb_zone_routing_all_directly.inc();
            return ZonePick::Zone(self.localities[0].index);
        };
        if random() % 10000 < local_percent_to_route {
            stats.lb_zone_routing_sampled.inc();
            return ZonePick::Zone(self.localities[0].index);
        }
        stats.lb_zone_routing_cross_zone.inc();
        let n = self.localities.len();
        let total = residual[n - 1];
        if total == 0 {
            stats.lb_zone_no_capacity_left.inc();
            return ZonePick::Zone(self.localities[(random() % n as u64) as usize].index);
        }
        let threshold = random() % total;
        let i = residual.partition_point(|&r| r <= threshold);
        ZonePick::Zone(self.localities[i].index)
    }

    /// [`ZoneRouting::pick_with`] drawing from `rng`.
    pub fn pick(&self, rng: &mut Rng, stats: &ZoneStats) -> ZonePick {
        self.pick_with(|| rng.next_u64(), stats)
    }

    /// The expected share of requests (0..1) per upstream locality, in [`ZoneRouting::localities`] order, for
    /// priority-0 requests: zone-routed ones by the formula, the others (and all when inactive) spread by
    /// healthy hosts as a host-level balancer spreads them.
    pub fn expected_shares(&self) -> Vec<f64> {
        let total_healthy: f64 = self
            .localities
            .iter()
            .map(|l| f64::from(l.upstream_healthy))
            .sum();
        let plain: Vec<f64> = self
            .localities
            .iter()
            .map(|l| {
                if total_healthy > 0.0 {
                    f64::from(l.upstream_healthy) / total_healthy
                } else {
                    0.0
                }
            })
            .collect();
        if !self.active() {
            return plain;
        }
        let n = self.localities.len();
        let zoned: Vec<f64> = match &self.state {
            State::Direct => (0..n).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect(),
            State::Residual {
                local_percent_to_route,
                residual,
            } => {
                let stay = if self.has_local_locality {
                    (*local_percent_to_route).min(10000) as f64 / 10000.0
                } else {
                    0.0
                };
                let total = residual[n - 1] as f64;
                (0..n)
                    .map(|i| {
                        let own = if i == 0 && self.has_local_locality {
                            stay
                        } else {
                            0.0
                        };
                        let cap = residual[i] - if i > 0 { residual[i - 1] } else { 0 };
                        let cross = if total > 0.0 {
                            cap as f64 / total
                        } else {
                            1.0 / n as f64
                        };
                        own + (1.0 - stay) * cross
                    })
                    .collect()
            }
            State::NoLocalityRouting(_) => plain.clone(),
        };
        let re = f64::from(self.config.routing_enabled.min(100)) / 100.0;
        zoned
            .iter()
            .zip(&plain)
            .map(|(z, p)| re * z + (1.0 - re) * p)
            .collect()
    }

    /// For an admin endpoint: whether zone-aware routing is active, why not, and the per-zone percentages.
    pub fn describe(&self) -> Value {
        let reason = self.inactive_reason();
        let shares = self.expected_shares();
        let (state, local_percent_to_route) = match (&self.state, &reason) {
            (_, Some(_)) => ("inactive", None),
            (State::Direct, None) => ("all_directly", Some(100.0)),
            (
                State::Residual {
                    local_percent_to_route,
                    ..
                },
                None,
            ) => (
                "sampled",
                Some((*local_percent_to_route).min(10000) as f64 / 100.0),
            ),
            (State::NoLocalityRouting(_), None) => ("inactive", None),
        };
        let residual_of = |i: usize| match &self.state {
            State::Residual { residual, .. } => {
                let prev = if i > 0 { residual[i - 1] } else { 0 };
                Some((residual[i] - prev) as f64 / 100.0)
            }
            _ => None,
        };
        let zones: Vec<Value> = self
            .localities
            .iter()
            .enumerate()
            .map(|(i, l)| {
                json!({
                    "region": l.locality.region,
                    "zone": l.locality.zone,
                    "sub_zone": l.locality.sub_zone,
                    "local": i == 0 && self.has_local_locality,
                    "local_cluster_healthy": l.local_cluster_healthy,
                    "upstream_healthy": l.upstream_healthy,
                    "local_cluster_percent": l.local_percentage as f64 / 100.0,
                    "upstream_percent": l.upstream_percentage as f64 / 100.0,
                    "residual_capacity_percent": residual_of(i),
                    "expected_traffic_percent": (shares[i] * 10000.0).round() / 100.0,
                })
            })
            .collect();
        json!({
            "active": reason.is_none(),
            "state": state,
            "reason": reason.map(|r| r.reason()),
            "local_locality": {
                "region": self.local_locality.region,
                "zone": self.local_locality.zone,
                "sub_zone": self.local_locality.sub_zone,
            },
            "routing_enabled_percent": self.config.routing_enabled,
            "min_cluster_size": self.config.min_cluster_size,
            "fail_traffic_on_panic": self.config.fail_traffic_on_panic,
            "local_percent_to_route": local_percent_to_route,
            "zones": zones,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(z: &str) -> Locality {
        Locality {
            region: String::new(),
            zone: z.to_string(),
            sub_zone: String::new(),
        }
    }

    fn zones(counts: &[(&str, u32)]) -> Vec<ZoneHosts> {
        counts
            .iter()
            .map(|&(z, n)| ZoneHosts {
                locality: loc(z),
                hosts: n,
                healthy: n,
                degraded: 0,
            })
            .collect()
    }

    fn cfg(min: u64) -> ZoneAwareConfig {
        ZoneAwareConfig {
            min_cluster_size: min,
            ..Default::default()
        }
    }

    fn compute(
        c: ZoneAwareConfig,
        local: &[(&str, u32)],
        upstream: &[(&str, u32)],
        stats: &ZoneStats,
    ) -> ZoneRouting {
        let (l, u) = (zones(local), zones(upstream));
        ZoneRouting::compute(
            c,
            ZoneInput {
                local_locality: &loc("a"),
                local_cluster: &l,
                upstream: &u,
                panic_threshold: 50,
                upstream_p0_in_panic: false,
            },
            stats,
        )
    }

    /// A random source returning the given numbers in order.
    fn seq(v: &[u64]) -> impl FnMut() -> u64 + '_ {
        let mut it = v.iter();
        move || {
            *it.next()
                .expect("the pick drew more random numbers than expected")
        }
    }

    /// `RoundRobinLoadBalancerTest.ZoneAwareSmallCluster`/`RoutingSmallZone` in Envoy's load_balancer_impl_test:
    /// upstream 1/2/2 hosts, local 1/1/1, min_cluster_size 5: 60% stays local; 100 samples local, 9999 goes cross
    /// zone and 2 lands in the second locality.
    #[test]
    fn envoy_test_small_zone() {
        let stats = ZoneStats::detached();
        let z = compute(
            cfg(5),
            &[("a", 1), ("b", 1), ("c", 1)],
            &[("a", 1), ("b", 2), ("c", 2)],
            &stats,
        );
        assert_eq!(
            z.state,
            State::Residual {
                local_percent_to_route: 6000,
                residual: vec![0, 667, 1334]
            }
        );
        assert_eq!(z.pick_with(seq(&[100]), &stats), ZonePick::Zone(0));
        assert_eq!(stats.lb_zone_routing_sampled.value(), 1);
        assert_eq!(z.pick_with(seq(&[9999, 2]), &stats), ZonePick::Zone(1));
        assert_eq!(stats.lb_zone_routing_cross_zone.value(), 1);
        assert_eq!(stats.lb_recalculate_zone_structures.value(), 1);
    }

    /// `LowPrecisionForDistribution`: local 45000/55000, upstream 44999/55001 hosts: integer basis points leave no
    /// residual capacity, so a cross-zone request picks a random locality and counts `lb_zone_no_capacity_left`.
    #[test]
    fn envoy_test_low_precision_no_capacity_left() {
        let stats = ZoneStats::detached();
        let z = compute(
            cfg(1),
            &[("a", 45000), ("b", 55000)],
            &[("a", 44999), ("b", 55001)],
            &stats,
        );
        assert_eq!(
            z.state,
            State::Residual {
                local_percent_to_route: 4499 * 10000 / 4500,
                residual: vec![0, 0]
            }
        );
        assert_eq!(z.pick_with(seq(&[9999, 2]), &stats), ZonePick::Zone(0));
        assert_eq!(stats.lb_zone_no_capacity_left.value(), 1);
    }

    /// `ZoneAwareResidualsMismatched`: A 2L/1U (local), B 2L/0U, C 1L/3U, D 1L/3U, E 0L/1U. Residuals are C
    /// 20.83%, D 20.83%, E 12.50% (a locality without local hosts has all its share as residual).
    #[test]
    fn envoy_test_residuals_mismatched() {
        let stats = ZoneStats::detached();
        let z = compute(
            cfg(1),
            &[("a", 2), ("b", 2), ("c", 1), ("d", 1)],
            &[("a", 1), ("c", 3), ("d", 3), ("e", 1)],
            &stats,
        );
        assert_eq!(
            z.state,
            State::Residual {
                local_percent_to_route: 1250 * 10000 / 3333,
                residual: vec![0, 2084, 4168, 5418]
            }
        );
        // Cross zone: 0 → C, 2084 → D, 4168 → E.
        assert_eq!(z.pick_with(seq(&[9999, 0]), &stats), ZonePick::Zone(1));
        assert_eq!(z.pick_with(seq(&[9999, 2084]), &stats), ZonePick::Zone(2));
        assert_eq!(z.pick_with(seq(&[9999, 4168]), &stats), ZonePick::Zone(3));
    }

    /// The example in `regenerateLocalityRoutingStructures`' comment: local 40/40/20%, upstream 25/50/25%:
    /// residual capacity 0, 10%, 5%, accumulated 0, 10000... (here in basis points: 0, 1000, 1500).
    #[test]
    fn envoy_source_comment_example() {
        let stats = ZoneStats::detached();
        let z = compute(
            cfg(1),
            &[("a", 2), ("b", 2), ("c", 1)],
            &[("a", 1), ("b", 2), ("c", 1)],
            &stats,
        );
        assert_eq!(
            z.state,
            State::Residual {
                local_percent_to_route: 6250,
                residual: vec![0, 1000, 1500]
            }
        );
    }

    #[test]
    fn all_directly_when_the_upstream_share_is_at_least_the_local_share() {
        let stats = ZoneStats::detached();
        let z = compute(
            cfg(6),
            &[("a", 1), ("b", 2), ("c", 2)],
            &[("a", 2), ("b", 2), ("c", 2)],
            &stats,
        );
        assert_eq!(z.state, State::Direct);
        assert_eq!(z.pick_with(seq(&[]), &stats), ZonePick::Zone(0));
        assert_eq!(stats.lb_zone_routing_all_directly.value(), 1);
        assert_eq!(z.describe()["state"], "all_directly");
    }

    #[test]
    fn local_zone_listed_anywhere_is_moved_first_and_indexes_map_back() {
        let stats = ZoneStats::detached();
        let z = compute(
            cfg(1),
            &[("a", 1), ("b", 1), ("c", 1)],
            &[("c", 2), ("b", 2), ("a", 1)],
            &stats,
        );
        assert!(z.has_local_locality);
        assert_eq!(z.localities[0].index, 2);
        assert_eq!(z.pick_with(seq(&[100]), &stats), ZonePick::Zone(2));
    }

    /// Preconditions, in Envoy's order, with their stats.
    #[test]
    fn preconditions() {
        let stats = ZoneStats::detached();
        // `NoZoneAwareRoutingOneZone`: one upstream locality; no stat.
        let z = compute(cfg(1), &[("a", 1), ("b", 1)], &[("a", 1)], &stats);
        assert!(matches!(
            z.state,
            State::NoLocalityRouting(Inactive::UpstreamFewerThanTwoLocalities(1))
        ));
        assert_eq!(z.pick_with(seq(&[]), &stats), ZonePick::AnyZone);
        // One local locality.
        let z = compute(cfg(1), &[("a", 3)], &[("a", 1), ("b", 1)], &stats);
        assert!(matches!(
            z.state,
            State::NoLocalityRouting(Inactive::LocalFewerThanTwoLocalities(1))
        ));
        assert_eq!(stats.lb_local_cluster_not_ok.value(), 0);
        // `NoZoneAwareRoutingNoLocalLocality`: the local cluster lacks this proxy's locality.
        let z = compute(cfg(1), &[("b", 1), ("c", 1)], &[("a", 1), ("b", 1)], &stats);
        assert!(matches!(
            z.state,
            State::NoLocalityRouting(Inactive::LocalClusterLacksLocalZone)
        ));
        assert_eq!(stats.lb_local_cluster_not_ok.value(), 1);
        // Too small: 5 healthy upstream hosts against the default 6.
        let z = compute(
            ZoneAwareConfig::default(),
            &[("a", 1), ("b", 1)],
            &[("a", 2), ("b", 3)],
            &stats,
        );
        assert_eq!(
            z.state,
            State::NoLocalityRouting(Inactive::ClusterTooSmall {
                healthy: 5,
                min_cluster_size: 6
            })
        );
        assert_eq!(stats.lb_zone_cluster_too_small.value(), 1);
        let d = z.describe();
        assert_eq!(d["active"], false);
        assert_eq!(
            d["reason"],
            "not enabled because the upstream cluster has 5 healthy host(s) in priority 0, fewer than min_cluster_size 6; counted as lb_zone_cluster_too_small"
        );
        assert_eq!(stats.lb_recalculate_zone_structures.value(), 4);
    }

    /// `NoZoneAwareRoutingLocalEmpty`-like: a local cluster in panic counts `lb_local_cluster_not_ok` per
    /// request and balances over all hosts, or fails with `fail_traffic_on_panic`.
    #[test]
    fn local_cluster_in_panic() {
        let stats = ZoneStats::detached();
        let local = vec![
            ZoneHosts {
                locality: loc("a"),
                hosts: 4,
                healthy: 1,
                degraded: 0,
            },
            ZoneHosts {
                locality: loc("b"),
                hosts: 4,
                healthy: 1,
                degraded: 0,
            },
        ];
        let upstream = zones(&[("a", 3), ("b", 3)]);
        let input = ZoneInput {
            local_locality: &loc("a"),
            local_cluster: &local,
            upstream: &upstream,
            panic_threshold: 50,
            upstream_p0_in_panic: false,
        };
        let z = ZoneRouting::compute(ZoneAwareConfig::default(), input, &stats);
        assert_eq!(z.pick_with(seq(&[]), &stats), ZonePick::AnyZone);
        assert_eq!(stats.lb_local_cluster_not_ok.value(), 1);
        assert!(!z.active());
        let failing = ZoneAwareConfig {
            fail_traffic_on_panic: true,
            ..Default::default()
        };
        let z = ZoneRouting::compute(failing, input, &stats);
        assert_eq!(z.pick_with(seq(&[]), &stats), ZonePick::Fail);
        assert_eq!(stats.lb_local_cluster_not_ok.value(), 2);
    }

    /// An upstream locality present but without healthy hosts here: nothing stays local, all goes cross zone.
    #[test]
    fn local_upstream_zone_without_healthy_hosts() {
        let stats = ZoneStats::detached();
        let local = zones(&[("a", 1), ("b", 1)]);
        let mut upstream = zones(&[("a", 2), ("b", 6)]);
        upstream[0].healthy = 0;
        let z = ZoneRouting::compute(
            cfg(6),
            ZoneInput {
                local_locality: &loc("a"),
                local_cluster: &local,
                upstream: &upstream,
                panic_threshold: 50,
                upstream_p0_in_panic: false,
            },
            &stats,
        );
        assert_eq!(
            z.state,
            State::Residual {
                local_percent_to_route: 0,
                residual: vec![0, 5000]
            }
        );
        assert_eq!(z.pick_with(seq(&[0, 7]), &stats), ZonePick::Zone(1));
    }

    /// 100k picks match the formula within one percentage point, `routing_enabled` included.
    #[test]
    fn statistical_split_matches_formula() {
        for routing_enabled in [100, 70] {
            let stats = ZoneStats::detached();
            let c = ZoneAwareConfig {
                routing_enabled,
                min_cluster_size: 1,
                fail_traffic_on_panic: false,
            };
            // Local 50/30/20%, upstream 20/40/40%: 40% stays local, residual b 10%, c 20%.
            let z = compute(
                c,
                &[("a", 5), ("b", 3), ("c", 2)],
                &[("a", 2), ("b", 4), ("c", 4)],
                &stats,
            );
            let expect = z.expected_shares();
            if routing_enabled == 100 {
                let want = [0.4, 0.6 / 3.0, 0.6 * 2.0 / 3.0];
                for (e, w) in expect.iter().zip(want) {
                    assert!((e - w).abs() < 1e-9, "{expect:?}");
                }
            }
            let mut rng = Rng::seeded(12345);
            let mut counts = [0u32; 3];
            let mut any = 0u32;
            let n = 100_000u32;
            for _ in 0..n {
                match z.pick(&mut rng, &stats) {
                    ZonePick::Zone(i) => counts[i] += 1,
                    // A host-level balancer spreads these by healthy hosts.
                    ZonePick::AnyZone => {
                        any += 1;
                        let r = rng.below(10);
                        counts[if r < 2 {
                            0
                        } else if r < 6 {
                            1
                        } else {
                            2
                        }] += 1;
                    }
                    ZonePick::Fail => unreachable!(),
                }
            }
            for i in 0..3 {
                let got = f64::from(counts[i]) / f64::from(n);
                assert!((got - expect[i]).abs() < 0.01, "zone {i}: {got} vs {}", expect[i]);
            }
            let zoned = stats.lb_zone_routing_sampled.value() + stats.lb_zone_routing_cross_zone.value();
            assert_eq!(zoned + u64::from(any), u64::from(n));
        }
    }

    #[test]
    fn describe_reports_percentages() {
        let stats = ZoneStats::detached();
        let z = compute(
            cfg(5),
            &[("a", 1), ("b", 1), ("c", 1)],
            &[("a", 1), ("b", 2), ("c", 2)],
            &stats,
        );
        let d = z.describe();
        assert_eq!(d["active"], true);
        assert_eq!(d["state"], "sampled");
        assert_eq!(d["reason"], Value::Null);
        assert_eq!(d["local_percent_to_route"], 60.0);
        assert_eq!(d["zones"][0]["zone"], "a");
        assert_eq!(d["zones"][0]["local"], true);
        assert_eq!(d["zones"][0]["upstream_percent"], 20.0);
        assert_eq!(d["zones"][0]["local_cluster_percent"], 33.33);
        assert_eq!(d["zones"][1]["residual_capacity_percent"], 6.67);
        assert_eq!(d["zones"][0]["expected_traffic_percent"], 60.0);
        assert_eq!(d["zones"][1]["expected_traffic_percent"], 20.0);
        let off = ZoneRouting::inactive(ZoneAwareConfig::default(), Inactive::NoLocalCluster);
        assert_eq!(
            off.describe()["reason"],
            "not enabled because cluster_manager.local_cluster_name does not name a cluster"
        );
    }
}
