//! Running a cluster's active health checks: one [`health_check::run`] task per host, started with the server
//! (or when CDS adds the cluster) and kept in step with the membership.
//!
//! As in Envoy (`BaseDynamicClusterImpl::updateDynamicHostList`), a host that joins a health-checked cluster
//! starts with `FAILED_ACTIVE_HC` set and takes no traffic until its first check passes; a host that leaves has
//! its task aborted. A transition flips the host's flag and republishes the host set, so the hot path only
//! reads `HostSet::healthy`.

use super::health_check::{self, CheckResult, Checker, HealthCheckConfig, HealthCheckStats, Target};
use super::lb::Rng;
use super::{Cluster, Host};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// A cluster's health checker: its config, `health_check.*` stats and a task per host.
#[derive(Debug)]
pub struct HealthChecking {
    pub config: Arc<HealthCheckConfig>,
    pub stats: HealthCheckStats,
    /// `common_lb_config.ignore_new_hosts_until_first_hc`: new hosts are also `PENDING_ACTIVE_HC`.
    warm_hosts: bool,
    state: Mutex<Tasks>,
    /// The runtime's `health_check.min_interval` and `health_check.max_interval`, in milliseconds.
    runtime_bounds: [AtomicU64; 2],
}

#[derive(Debug, Default)]
struct Tasks {
    /// Set once the server (or CDS) starts the checker: hosts seen before then wait for it.
    started: bool,
    /// Reports each host's first check while the server starts.
    first: Option<mpsc::Sender<()>>,
    /// Host id to its host and task (`None` until started).
    hosts: HashMap<u64, (Arc<Host>, Option<AbortHandle>)>,
}

/// `wait` capped at `max_ms`, then raised to `min_ms`, and at least 1 ms (Envoy's `intervalWithJitter`).
pub fn bound_interval(wait: Duration, min_ms: u64, max_ms: u64) -> Duration {
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(ms.min(max_ms).max(min_ms).max(1))
}

impl HealthChecking {
    pub fn new(config: Arc<HealthCheckConfig>, stats: HealthCheckStats, warm_hosts: bool) -> Self {
        HealthChecking {
            config,
            stats,
            warm_hosts,
            state: Mutex::new(Tasks::default()),
            runtime_bounds: [AtomicU64::new(0), AtomicU64::new(u64::MAX)],
        }
    }

    /// Take the runtime's `health_check.min_interval` and `health_check.max_interval` (milliseconds;
    /// `configuration/upstream/cluster_manager/cluster_runtime.rst`), read for each next check.
    pub fn apply_runtime(&self, snap: &crate::layered_runtime::Snapshot) {
        self.runtime_bounds[0].store(snap.u64("health_check.min_interval", 0), Relaxed);
        self.runtime_bounds[1].store(snap.u64("health_check.max_interval", u64::MAX), Relaxed);
    }

    /// The wait before a next check within the runtime's bounds, at least 1 ms (Envoy's
    /// `intervalWithJitter`: the maximum first, then the minimum).
    pub fn bound(&self, wait: Duration) -> Duration {
        bound_interval(
            wait,
            self.runtime_bounds[0].load(Relaxed),
            self.runtime_bounds[1].load(Relaxed),
        )
    }

    /// Track the new membership before it is published: hosts that joined start failed, hosts that left lose
    /// their task (and their contribution to `health_check.healthy`).
    pub(super) fn set_hosts(&self, cluster: &Weak<Cluster>, hosts: &[Arc<Host>]) {
        let Ok(mut st) = self.state.lock() else { return };
        let keep: std::collections::HashSet<u64> = hosts.iter().map(|h| h.id).collect();
        st.hosts.retain(|id, (h, task)| {
            if keep.contains(id) {
                return true;
            }
            if let Some(t) = task.take() {
                t.abort();
            }
            if !h.failed_active_hc.load(Relaxed) {
                self.stats.healthy.dec();
            }
            false
        });
        for h in hosts.iter().filter(|h| !h.health_check_disabled) {
            st.hosts.entry(h.id).or_insert_with(|| {
                h.failed_active_hc.store(true, Relaxed);
                if self.warm_hosts {
                    h.pending_active_hc.store(true, Relaxed);
                }
                (h.clone(), None)
            });
        }
        if st.started {
            self.spawn_pending(&mut st, cluster);
        }
    }

    /// Start checking every host; with `first`, each host's task sends on it once its first check is done.
    pub(super) fn start(&self, cluster: &Weak<Cluster>, first: Option<mpsc::Sender<()>>) {
        let Ok(mut st) = self.state.lock() else { return };
        st.started = true;
        st.first = first;
        self.spawn_pending(&mut st, cluster);
        st.first = None;
    }

    /// Hosts that have no task yet.
    pub fn pending(&self) -> usize {
        self.state
            .lock()
            .map(|st| st.hosts.values().filter(|(_, t)| t.is_none()).count())
            .unwrap_or(0)
    }

    fn spawn_pending(&self, st: &mut Tasks, cluster: &Weak<Cluster>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let first = st.first.clone();
        for (host, task) in st.hosts.values_mut() {
            if task.is_some() {
                continue;
            }
            let fut = check_host(
                self.config.clone(),
                self.stats.clone(),
                host.clone(),
                cluster.clone(),
                first.clone(),
            );
            *task = Some(rt.spawn(fut).abort_handle());
        }
    }
}

impl Drop for HealthChecking {
    fn drop(&mut self) {
        if let Ok(st) = self.state.get_mut() {
            for (_, task) in st.hosts.values() {
                if let Some(t) = task {
                    t.abort();
                }
            }
        }
    }
}

/// A check that reports the end of its first run (for the server's start-up wait) and ends the host's
/// `PENDING_ACTIVE_HC`.
struct ReportFirst {
    inner: Checker,
    first: Option<mpsc::Sender<()>>,
    host: Arc<Host>,
    cluster: Weak<Cluster>,
}

impl health_check::Check for ReportFirst {
    async fn run(&mut self, cfg: &HealthCheckConfig, stats: &HealthCheckStats) -> CheckResult {
        let r = self.inner.check(cfg, stats).await;
        // The first check is done: the host counts again (Envoy's `clearPendingFlag`). A first success always
        // makes the host healthy, and that transition republishes the set; a failure changes nothing else,
        // so republish here.
        if self.host.pending_active_hc.swap(false, Relaxed) && r != CheckResult::Success {
            if let Some(c) = self.cluster.upgrade() {
                c.refresh_health();
            }
        }
        if let Some(tx) = self.first.take() {
            let _ = tx.send(()).await;
        }
        r
    }
}

async fn check_host(
    cfg: Arc<HealthCheckConfig>,
    stats: HealthCheckStats,
    host: Arc<Host>,
    cluster: Weak<Cluster>,
    first: Option<mpsc::Sender<()>>,
) {
    let Some(name) = cluster.upgrade().map(|c| c.config.name.clone()) else {
        return;
    };
    let checker = ReportFirst {
        inner: Checker::new(host.health_check_address, name.clone())
            .with_hostname(&host.health_check_hostname),
        first,
        host: host.clone(),
        cluster: cluster.clone(),
    };
    let had_traffic = {
        let cluster = cluster.clone();
        move || {
            cluster
                .upgrade()
                .is_some_and(|c| c.stats.upstream_cx_total.value() > 0)
        }
    };
    let on_change = |healthy: bool| {
        host.failed_active_hc.store(!healthy, Relaxed);
        if let Some(c) = cluster.upgrade() {
            if healthy {
                tracing::info!(cluster = %name, host = %host.address, "health check: host healthy");
            } else {
                tracing::info!(cluster = %name, host = %host.address, "health check: host failed");
            }
            if !healthy && host.pending_dynamic_removal.load(Relaxed) {
                // Kept after EDS removed it while it passed its checks: now it leaves (this task ends with it).
                c.remove_pending_host(&host);
            } else {
                c.refresh_health();
            }
        }
    };
    let target = Target {
        cluster: &name,
        address: host.address,
    };
    health_check::run(
        &cfg,
        target,
        checker,
        &stats,
        Rng::from_entropy(),
        had_traffic,
        |wait| {
            cluster
                .upgrade()
                .and_then(|c| c.health_checks.as_ref().map(|h| h.bound(wait)))
                .unwrap_or(wait)
        },
        on_change,
    )
    .await;
}
