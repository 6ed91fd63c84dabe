//! The aggregate cluster (`cluster_type: envoy.clusters.aggregate`, `envoy.extensions.clusters.aggregate.v3.
//! ClusterConfig`): failover across an ordered list of clusters, as Envoy's `aggregate_cluster.rst` describes
//! and `source/extensions/clusters/aggregate/cluster.cc` implements.
//!
//! The member clusters' priority levels are linearized into one list, in the order of `clusters` and of each
//! member's priorities; levels without hosts are left out (`linearizePrioritySet`):
//!
//! ```text
//! primary   P0 P1 P2   ->  0 1 2
//! secondary P0 P1      ->  3 4
//! ```
//!
//! The priority loads over that list are Envoy's ordinary ones ([`priority::PriorityLoad`]): each level's
//! health with its own cluster's overprovisioning factor, the aggregate's `healthy_panic_threshold` deciding
//! total panic. A pick draws a level (and whether its healthy or degraded hosts), then hands the request to
//! that member's own balancer at that priority (`AggregateLoadBalancerContext` sets all of the member's load on
//! it); the member's panic state, zone-aware routing and `lb_policy` apply there.
//!
//! Members are looked up by name in the current cluster snapshot, so a member added or replaced by CDS joins
//! on the next pick and a missing member contributes no levels. The linearization is cached and rebuilt when
//! the snapshot or a member's host set changes (Envoy rebuilds on its members' membership updates).
//!
//! Statistics are counted where Envoy counts them. What the connection pool counts is the member's, since
//! the pool belongs to the host's cluster: `upstream_rq_total`, `upstream_rq_active`, connections, the
//! `max_requests` circuit breaker, outlier detection, and the member's `connect_timeout` and protocol apply.
//! What the router counts is the route's cluster's, the aggregate: `upstream_rq_<code>`, `upstream_rq_<N>xx`,
//! `upstream_rq_completed`, `upstream_rq_time`, timeouts, retries and `max_retries`, and
//! `upstream_cx_none_healthy`.

use super::lb::Rng;
use super::priority::{LevelCounts, PriorityLoad};
use super::{Cluster, Host, HostSet};
use crate::server::ClusterSnapshot;
use arc_swap::ArcSwapOption;
use std::sync::{Arc, Mutex, Weak};

/// `envoy.extensions.clusters.aggregate.v3.ClusterConfig`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregateConfig {
    /// `clusters`, in failover order.
    pub clusters: Vec<String>,
}

/// A member's host set as the linearization saw it.
#[derive(Debug)]
struct Member {
    cluster: Arc<Cluster>,
    set: Arc<HostSet>,
}

/// One linearization of the members' levels, valid while the snapshot and every member's host set are the
/// ones it was built from.
#[derive(Debug)]
struct Linear {
    snapshot: Weak<ClusterSnapshot>,
    members: Vec<Member>,
    /// Linearized level to (member, priority within the member).
    levels: Vec<(usize, usize)>,
    load: PriorityLoad,
}

/// An aggregate cluster's balancer.
#[derive(Debug)]
pub struct Aggregate {
    pub config: AggregateConfig,
    /// `common_lb_config.healthy_panic_threshold` of the aggregate cluster.
    panic_threshold: u32,
    linear: ArcSwapOption<Linear>,
    rebuild: Mutex<()>,
}

/// A member's levels for [`linearize`]: its level counts (index = priority) and overprovisioning factor.
pub struct MemberLevels {
    pub levels: Vec<LevelCounts>,
    pub overprovisioning_factor: u32,
}

/// Linearize the members' levels (skipping levels without hosts) and compute the loads over them with the
/// aggregate's panic threshold. Returns (member, priority) per linearized level, and the loads.
pub fn linearize(members: &[MemberLevels], panic_threshold: u32) -> (Vec<(usize, usize)>, PriorityLoad) {
    let mut map = Vec::new();
    let mut counts = Vec::new();
    let mut factors = Vec::new();
    for (m, member) in members.iter().enumerate() {
        for (p, l) in member.levels.iter().enumerate() {
            if l.hosts == 0 {
                continue;
            }
            map.push((m, p));
            counts.push(*l);
            factors.push(member.overprovisioning_factor);
        }
    }
    let load = PriorityLoad::compute_with_factors(&counts, &factors, panic_threshold);
    (map, load)
}

impl Aggregate {
    pub fn new(config: AggregateConfig, panic_threshold: u32) -> Self {
        Aggregate {
            config,
            panic_threshold,
            linear: ArcSwapOption::empty(),
            rebuild: Mutex::new(()),
        }
    }

    /// The linearization for `snapshot`, rebuilt when it is stale.
    fn linear(&self, snapshot: &Arc<ClusterSnapshot>) -> Arc<Linear> {
        if let Some(l) = self.linear.load_full() {
            if self.fresh(&l, snapshot) {
                return l;
            }
        }
        let _one = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = self.linear.load_full() {
            if self.fresh(&l, snapshot) {
                return l;
            }
        }
        let members: Vec<Member> = self
            .config
            .clusters
            .iter()
            .filter_map(|name| snapshot.by_name(name))
            .map(|c| Member {
                cluster: c.clone(),
                set: c.hosts.load_full(),
            })
            .collect();
        let levels: Vec<MemberLevels> = members
            .iter()
            .map(|m| MemberLevels {
                levels: m.set.level_counts(),
                overprovisioning_factor: m.cluster.config.overprovisioning_factor,
            })
            .collect();
        let (levels, load) = linearize(&levels, self.panic_threshold);
        let l = Arc::new(Linear {
            snapshot: Arc::downgrade(snapshot),
            members,
            levels,
            load,
        });
        self.linear.store(Some(l.clone()));
        l
    }

    fn fresh(&self, l: &Linear, snapshot: &Arc<ClusterSnapshot>) -> bool {
        std::ptr::eq(l.snapshot.as_ptr(), Arc::as_ptr(snapshot))
            && l.members
                .iter()
                .all(|m| std::ptr::eq(Arc::as_ptr(&m.set), Arc::as_ptr(&*m.cluster.hosts.load())))
    }

    /// Choose a member and one of its hosts: the linearized level by the loads (a random draw, as Envoy's
    /// aggregate balancer), then the member's balancer at that level. Returns the member, the host's index in
    /// the member's set and the host.
    pub fn pick(
        &self,
        snapshot: &Arc<ClusterSnapshot>,
        rng: &mut Rng,
        hash: Option<u64>,
    ) -> Option<(Arc<Cluster>, usize, Arc<Host>)> {
        let linear = self.linear(snapshot);
        if linear.levels.is_empty() {
            return None;
        }
        let (level, avail) = linear.load.choose(rng.next_u64());
        let &(m, priority) = linear.levels.get(level)?;
        let member = linear.members.get(m)?;
        let c = &member.cluster;
        let i = member.set.pick_at(
            priority,
            avail,
            c.config.lb_policy,
            &c.rr,
            rng,
            hash,
            || c.stats.lb_healthy_panic.inc(),
            &c.zone_stats,
        )?;
        Some((c.clone(), i, member.set.hosts[i].clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(healthy: &[u32]) -> MemberLevels {
        MemberLevels {
            levels: healthy
                .iter()
                .map(|&h| LevelCounts {
                    hosts: 100,
                    healthy: h,
                    degraded: 0,
                })
                .collect(),
            overprovisioning_factor: crate::upstream::priority::DEFAULT_OVERPROVISIONING_FACTOR,
        }
    }

    /// Traffic to the primary and to the secondary for a linearization.
    fn split(primary: &[u32], secondary: &[u32], threshold: u32) -> (u32, u32) {
        let (map, load) = linearize(&[member(primary), member(secondary)], threshold);
        let mut out = (0, 0);
        for (i, &(m, _)) in map.iter().enumerate() {
            let l = load.healthy_load[i] + load.degraded_load[i];
            if m == 0 {
                out.0 += l;
            } else {
                out.1 += l;
            }
        }
        out
    }

    /// `aggregate_cluster.rst`, "Linearize Priority Set": primary P0..P2, secondary P0..P1, tertiary P0..P1
    /// become levels 0..6; a member level without hosts is left out.
    #[test]
    fn linearization_follows_cluster_then_priority_order() {
        let (map, _) = linearize(&[member(&[100; 3]), member(&[100; 2]), member(&[100; 2])], 50);
        assert_eq!(map, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1)]);
        let mut gap = member(&[100, 100]);
        gap.levels[0].hosts = 0;
        gap.levels[0].healthy = 0;
        let (map, load) = linearize(&[gap, member(&[100])], 50);
        assert_eq!(map, [(0, 1), (1, 0)]);
        assert_eq!(load.healthy_load, [100, 0]);
    }

    /// `aggregate_cluster.rst`, "Load Balancing Example": a primary with three levels and a secondary with two,
    /// healthy percentages per level, and the traffic each cluster gets. The docs' table ignores panic (its
    /// 20%/20% row is in total panic with the default threshold), so it is checked with panic disabled.
    #[test]
    fn aggregate_doc_load_balancing_example() {
        for ((p, s), expect) in [
            (([100, 100, 100], [100, 100]), (100, 0)),
            (([72, 100, 100], [100, 100]), (100, 0)),
            (([71, 1, 0], [100, 100]), (100, 0)),
            (([71, 0, 0], [100, 100]), (99, 1)),
            (([50, 0, 0], [100, 100]), (70, 30)),
            (([20, 20, 10], [25, 25]), (70, 30)),
            (([20, 0, 0], [20, 0]), (50, 50)),
            (([0, 0, 0], [100, 0]), (0, 100)),
            (([0, 0, 0], [72, 0]), (0, 100)),
        ] {
            assert_eq!(split(&p, &s, 0), expect, "primary {p:?} secondary {s:?}");
        }
        // "healths of {{20, 20, 10}, {25, 25}} would result in a priority load of {{28%, 28%, 14%}, {30%, 0%}}".
        let (_, load) = linearize(&[member(&[20, 20, 10]), member(&[25, 25])], 0);
        assert_eq!(load.healthy_load, [28, 28, 14, 30, 0]);
    }

    /// Each level keeps its own cluster's overprovisioning factor.
    #[test]
    fn members_keep_their_overprovisioning_factor() {
        let mut strict = member(&[50]);
        strict.overprovisioning_factor = 100;
        let (_, load) = linearize(&[strict, member(&[100])], 50);
        assert_eq!(load.healthy_load, [50, 50]);
        let (_, load) = linearize(&[member(&[50]), member(&[100])], 50);
        assert_eq!(load.healthy_load, [70, 30]);
    }

    /// With the aggregate's panic threshold every level below it is in panic; when all are, the load follows
    /// host counts (Envoy's total panic), and the member's own balancer then balances over all its hosts.
    #[test]
    fn total_panic_spreads_by_host_count() {
        let (_, load) = linearize(&[member(&[10]), member(&[0, 0])], 50);
        assert!(load.total_panic);
        assert_eq!(load.healthy_load, [34, 33, 33]);
        // A healthy secondary keeps the aggregate out of panic: all traffic fails over.
        let (_, load) = linearize(&[member(&[0]), member(&[100])], 50);
        assert!(!load.total_panic);
        assert_eq!(load.healthy_load, [0, 100]);
    }
}
