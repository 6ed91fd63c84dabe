//! The local cluster (`cluster_manager.local_cluster_name`): this service's own instances, whose spread over
//! zones zone-aware routing compares every upstream's with, and this proxy's locality (`node.locality`).
//!
//! The local cluster publishes its priority-0 localities here whenever its membership or health changes, and
//! then has every other cluster recompute its [`zone::ZoneRouting`] (Envoy's member-update callback on the
//! local priority set); a request only reads the routing latched in the host set.

use super::zone::{self, ZoneHosts};
use super::{Cluster, Locality};
use arc_swap::ArcSwap;
use std::sync::{Arc, Mutex, Weak};

#[derive(Debug)]
pub struct LocalCluster {
    pub name: String,
    /// `node.locality`.
    pub locality: Locality,
    /// The local cluster's priority-0 hosts by locality.
    hosts: ArcSwap<Vec<ZoneHosts>>,
    /// Clusters whose zone routing depends on the local cluster.
    dependents: Mutex<Vec<Weak<Cluster>>>,
}

impl LocalCluster {
    pub fn new(name: String, locality: Locality) -> Arc<LocalCluster> {
        Arc::new(LocalCluster {
            name,
            locality,
            hosts: ArcSwap::from_pointee(Vec::new()),
            dependents: Mutex::new(Vec::new()),
        })
    }

    /// The local cluster's priority-0 localities as last published.
    pub fn hosts(&self) -> arc_swap::Guard<Arc<Vec<ZoneHosts>>> {
        self.hosts.load()
    }

    pub(super) fn register(&self, cluster: Weak<Cluster>) {
        if let Ok(mut d) = self.dependents.lock() {
            d.retain(|w| w.strong_count() > 0);
            d.push(cluster);
        }
    }

    /// The local cluster changed: store its localities and have every other cluster recompute its routing.
    pub(super) fn set_hosts(&self, hosts: Vec<ZoneHosts>, local: &Cluster) {
        if **self.hosts.load() == hosts {
            return;
        }
        self.hosts.store(Arc::new(hosts));
        let dependents: Vec<Arc<Cluster>> = match self.dependents.lock() {
            Ok(d) => d.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => return,
        };
        for c in dependents {
            if !std::ptr::eq(Arc::as_ptr(&c), local) {
                c.refresh_health();
            }
        }
    }

    /// Zone routing for an upstream whose priority-0 localities (and panic state) are given.
    pub fn routing(
        &self,
        config: zone::ZoneAwareConfig,
        upstream: &[ZoneHosts],
        panic_threshold: u32,
        upstream_p0_in_panic: bool,
        stats: &zone::ZoneStats,
    ) -> zone::ZoneRouting {
        let local = self.hosts.load();
        let input = zone::ZoneInput {
            local_locality: &self.locality,
            local_cluster: &local,
            upstream,
            panic_threshold,
            upstream_p0_in_panic,
        };
        zone::ZoneRouting::compute(config, input, stats)
    }
}
