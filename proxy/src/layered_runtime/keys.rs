//! The runtime keys Remora's features read, and how a new snapshot reaches them.
//!
//! - `circuit_breakers.<cluster_name>.<default|high>.{max_connections, max_pending_requests, max_requests,
//!   max_retries, max_connection_pools}` (`configuration/upstream/cluster_manager/cluster_runtime.rst`,
//!   "Circuit breaking"): override the cluster's thresholds. Taken by every cluster when a snapshot is published
//!   and by a cluster when it is built ([`apply_to_cluster`]).
//! - `outlier_detection.{consecutive_5xx, consecutive_gateway_failure, consecutive_local_origin_failure,
//!   interval_ms, base_ejection_time_ms, max_ejection_time_ms, max_ejection_percent, enforcing_*,
//!   success_rate_*, failure_percentage_*}` (same page, "Outlier detection"): override every outlier detector's
//!   setting of that name ([`crate::upstream::outlier::Detector::apply_runtime`]).
//! - `upstream.healthy_panic_threshold`, `upstream.zone_routing.enabled`, `upstream.zone_routing.min_cluster_size`
//!   (same page, "Core" and "Zone aware load balancing"): every cluster's panic threshold and zone-aware
//!   routing ([`Cluster::apply_runtime`]; an aggregate cluster's own panic threshold is not overridden).
//! - `health_check.min_interval`, `health_check.max_interval` (same page, "Active health checking"): bound the
//!   wait before each next active health check, in milliseconds.
//!
//! Every other key is kept, shown by `/runtime`, and named once in the log (at start, or when a layer brings it)
//! as read by no Remora feature.

use super::Snapshot;
use crate::upstream::Cluster;

const BREAKER_SETTINGS: [&str; 5] = [
    "max_connections",
    "max_pending_requests",
    "max_requests",
    "max_retries",
    "max_connection_pools",
];

/// The `outlier_detection.*` keys Envoy documents and Remora reads.
pub const OUTLIER_KEYS: [&str; 20] = [
    "consecutive_5xx",
    "consecutive_gateway_failure",
    "consecutive_local_origin_failure",
    "interval_ms",
    "base_ejection_time_ms",
    "max_ejection_time_ms",
    "max_ejection_percent",
    "enforcing_consecutive_5xx",
    "enforcing_consecutive_gateway_failure",
    "enforcing_consecutive_local_origin_failure",
    "enforcing_success_rate",
    "enforcing_local_origin_success_rate",
    "success_rate_minimum_hosts",
    "success_rate_request_volume",
    "success_rate_stdev_factor",
    "enforcing_failure_percentage",
    "enforcing_failure_percentage_local_origin",
    "failure_percentage_request_volume",
    "failure_percentage_minimum_hosts",
    "failure_percentage_threshold",
];

/// Whether some feature of Remora reads `key`.
pub fn read_by_remora(key: &str) -> bool {
    if crate::upstream::RUNTIME_LB_KEYS.contains(&key)
        || key == "health_check.min_interval"
        || key == "health_check.max_interval"
    {
        return true;
    }
    if let Some(k) = key.strip_prefix("outlier_detection.") {
        return OUTLIER_KEYS.contains(&k);
    }
    let Some(rest) = key.strip_prefix("circuit_breakers.") else {
        return false;
    };
    BREAKER_SETTINGS.iter().any(|s| {
        ["default", "high"].iter().any(|p| {
            rest.strip_suffix(s)
                .and_then(|r| r.strip_suffix('.'))
                .and_then(|r| r.strip_suffix(p))
                .and_then(|r| r.strip_suffix('.'))
                .is_some_and(|cluster| !cluster.is_empty())
        })
    })
}

/// Give one cluster the snapshot's values of its keys.
pub fn apply_to_cluster(snap: &Snapshot, cluster: &Cluster) {
    cluster.breakers.apply_runtime(snap, cluster.name());
    cluster.apply_runtime(snap);
    if let Some(d) = &cluster.outlier {
        d.apply_runtime(snap);
    }
}

/// Give every cluster of the server the current snapshot's values, now and after every change, for as long
/// as the server runs.
pub fn follow(shared: &std::sync::Arc<crate::server::Shared>) {
    let mut changes = shared.runtime.subscribe();
    let weak = std::sync::Arc::downgrade(shared);
    tokio::spawn(async move {
        loop {
            {
                let Some(shared) = weak.upgrade() else { break };
                let snap = shared.runtime.snapshot();
                for c in shared.clusters.load().iter() {
                    apply_to_cluster(&snap, c);
                }
            }
            if changes.changed().await.is_err() {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn breaker_keys_are_recognised() {
        use super::read_by_remora as r;
        assert!(r("circuit_breakers.backend.default.max_requests"));
        assert!(r("circuit_breakers.a.b.high.max_connections"));
        assert!(!r("circuit_breakers.default.max_requests"));
        assert!(!r("circuit_breakers.c.low.max_requests"));
        assert!(!r("circuit_breakers.c.default.max_budget"));
        assert!(!r("re2.max_program_size.error_level"));
        assert!(r("outlier_detection.consecutive_5xx"));
        assert!(r("upstream.healthy_panic_threshold"));
        assert!(r("upstream.zone_routing.min_cluster_size"));
        assert!(!r("outlier_detection.consecutive_4xx"));
    }
}
