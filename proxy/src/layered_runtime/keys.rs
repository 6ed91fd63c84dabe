//! The runtime keys Remora's features read, and how a new snapshot reaches them.
//!
//! - `circuit_breakers.<cluster_name>.<default|high>.{max_connections, max_pending_requests, max_requests,
//!   max_retries, max_connection_pools}` (`configuration/upstream/cluster_manager/cluster_runtime.rst`,
//!   "Circuit breaking"): override the cluster's thresholds. Taken by every cluster when a snapshot is published
//!   and by a cluster when it is built ([`apply_to_cluster`]).
//!
//! Every other key is kept, shown by `/runtime`, and named once at start-up as read by no Remora feature.

use super::Snapshot;
use crate::upstream::Cluster;

const BREAKER_SETTINGS: [&str; 5] = [
    "max_connections",
    "max_pending_requests",
    "max_requests",
    "max_retries",
    "max_connection_pools",
];

/// Whether some feature of Remora reads `key`.
pub fn read_by_remora(key: &str) -> bool {
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
    }
}
