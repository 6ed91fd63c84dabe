//! Clusters, their hosts, and picking a host for a request.
//!
//! A [`Cluster`] is shared by every worker (an `Arc` in the snapshot). Its membership is an [`ArcSwap`] of a
//! [`HostSet`] that discovery replaces as a whole; a request loads it once. Connection pools are per worker (see
//! [`pool`]), keyed by host id, so that a request takes a pooled connection without a lock.

pub mod active_health;
pub mod breaker;
pub mod dns;
pub mod hash;
pub mod health_check;
pub mod lb;
pub mod outlier;
pub mod pool;
pub mod priority;
pub mod zone;

fn log_outlier_event(cluster: &str, ev: &outlier::OutlierEvent) {
    match ev {
        outlier::OutlierEvent::Ejected {
            address,
            reason,
            duration,
            ..
        } => {
            tracing::info!(cluster, host = %address, reason = reason.envoy_name(), ?duration, "outlier detection: host ejected")
        }
        outlier::OutlierEvent::Returned {
            address, ejected_for, ..
        } => {
            tracing::info!(cluster, host = %address, ?ejected_for, "outlier detection: host returned to service")
        }
    }
}

use crate::stats::{CodeStats, Counter, Gauge, Histogram, Scope};
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// The upstream protocol of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// `use_downstream_protocol_config`: the downstream request's protocol.
    Downstream,
}

/// `lb_policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of `choice_count` choices (default 2) by active requests.
    LeastRequest {
        choice_count: u32,
    },
    Random,
    /// `RING_HASH`: a consistent-hash ring over the healthy hosts, built per host-set publish.
    RingHash(hash::RingHashConfig),
    /// `MAGLEV`: a lookup table of `table_size` (prime) entries over the healthy hosts.
    Maglev {
        table_size: u64,
    },
}

impl LbPolicy {
    /// Whether the policy picks by a request hash (the route's `hash_policy`).
    pub fn hashes(self) -> bool {
        matches!(self, LbPolicy::RingHash(_) | LbPolicy::Maglev { .. })
    }
}

/// How a cluster finds its hosts.
#[derive(Clone, Debug, PartialEq)]
pub enum Discovery {
    Static,
    /// `STRICT_DNS` (every address of every name is a host) or `LOGICAL_DNS` (the first address of the one
    /// name).
    Dns(std::sync::Arc<dns::DnsConfig>),
    /// `EDS`: hosts come from the `ClusterLoadAssignment` named `service_name` (the cluster's name unless
    /// `eds_cluster_config.service_name` says otherwise).
    Eds {
        service_name: String,
    },
}

/// A cluster's configuration, lowered from `envoy.config.cluster.v3.Cluster`.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub name: String,
    /// `alt_stat_name`, else the name: what `cluster.<x>.` stats use.
    pub stat_name: String,
    pub discovery: Discovery,
    pub connect_timeout: Duration,
    pub lb_policy: LbPolicy,
    pub protocol: Protocol,
    /// `common_http_protocol_options.idle_timeout` (default 1 h).
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_requests_per_connection`.
    pub max_requests_per_connection: Option<u32>,
    pub endpoints: Vec<EndpointConfig>,
    /// `per_connection_buffer_limit_bytes` (default 1 MiB).
    pub buffer_limit: u32,
    pub circuit_breakers: breaker::CircuitBreakersConfig,
    pub outlier: Option<outlier::OutlierConfig>,
    /// `health_checks` (Envoy takes at most one).
    pub health_check: Option<Arc<health_check::HealthCheckConfig>>,
}

/// One `lb_endpoints` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    pub hostname: String,
    pub weight: u32,
    pub priority: u32,
    pub locality: Locality,
    pub health: EndpointHealth,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

/// `envoy.config.core.v3.HealthStatus` as given by the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointHealth {
    Unknown,
    Healthy,
    Unhealthy,
    Draining,
    Timeout,
    Degraded,
}

impl EndpointHealth {
    pub fn usable(self) -> bool {
        matches!(
            self,
            EndpointHealth::Unknown | EndpointHealth::Healthy | EndpointHealth::Degraded
        )
    }
    pub fn name(self) -> &'static str {
        match self {
            EndpointHealth::Unknown => "UNKNOWN",
            EndpointHealth::Healthy => "HEALTHY",
            EndpointHealth::Unhealthy => "UNHEALTHY",
            EndpointHealth::Draining => "DRAINING",
            EndpointHealth::Timeout => "TIMEOUT",
            EndpointHealth::Degraded => "DEGRADED",
        }
    }
}

static NEXT_HOST_ID: AtomicU64 = AtomicU64::new(1);

/// One upstream host with its per-host counters (what `/clusters` prints).
#[derive(Debug)]
pub struct Host {
    /// Unique for the process's lifetime: the key of per-worker connection pools.
    pub id: u64,
    pub address: SocketAddr,
    /// `address` as `ip:port`, for the `:authority` of h2 requests and the admin.
    pub address_str: String,
    pub hostname: String,
    pub weight: u32,
    pub priority: u32,
    pub locality: Locality,
    pub health: EndpointHealth,
    /// `FAILED_ACTIVE_HC`: the cluster's active health check fails this host (see [`active_health`]).
    pub failed_active_hc: AtomicBool,
    pub stats: HostStats,
}

#[derive(Debug, Default)]
pub struct HostStats {
    pub cx_active: AtomicU64,
    pub cx_total: AtomicU64,
    pub cx_connect_fail: AtomicU64,
    pub rq_active: AtomicU64,
    pub rq_total: AtomicU64,
    pub rq_success: AtomicU64,
    pub rq_error: AtomicU64,
    pub rq_timeout: AtomicU64,
}

impl Host {
    pub fn new(e: &EndpointConfig) -> Arc<Host> {
        Arc::new(Host {
            id: NEXT_HOST_ID.fetch_add(1, Relaxed),
            address: e.address,
            address_str: e.address.to_string(),
            hostname: e.hostname.clone(),
            weight: e.weight.max(1),
            priority: e.priority,
            locality: e.locality.clone(),
            health: e.health,
            failed_active_hc: AtomicBool::new(false),
            stats: HostStats::default(),
        })
    }

    pub fn healthy(&self) -> bool {
        self.health.usable() && !self.failed_active_hc.load(Relaxed)
    }
}

/// A cluster's membership at one moment.
#[derive(Debug, Default)]
pub struct HostSet {
    pub hosts: Vec<Arc<Host>>,
    /// Indexes into `hosts` of hosts that may take traffic.
    pub healthy: Vec<usize>,
    /// Every host has the same weight (round robin need not weigh).
    pub uniform_weight: bool,
    /// For `RING_HASH` and `MAGLEV`: the structure over `healthy`, whose picks index into `healthy`.
    pub hash_lb: Option<HashLb>,
}

/// A consistent-hash structure, built when the host set is published.
#[derive(Debug)]
pub enum HashLb {
    Ring(hash::Ring),
    Maglev(hash::Maglev),
}

impl HashLb {
    /// Build over the set's healthy hosts (keys `ip:port`, as Envoy's `address()->asString()`).
    fn build(policy: LbPolicy, set: &HostSet) -> Option<HashLb> {
        let keys: Vec<(&str, u32)> = set
            .healthy
            .iter()
            .map(|&i| (set.hosts[i].address_str.as_str(), set.hosts[i].weight))
            .collect();
        match policy {
            LbPolicy::RingHash(cfg) => Some(HashLb::Ring(hash::Ring::build(&keys, &cfg))),
            LbPolicy::Maglev { table_size } => Some(HashLb::Maglev(hash::Maglev::build(&keys, table_size))),
            _ => None,
        }
    }

    /// A position in `healthy` for a request hash.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        match self {
            HashLb::Ring(r) => r.pick(hash),
            HashLb::Maglev(m) => m.pick(hash),
        }
    }
}

impl HostSet {
    pub fn new(hosts: Vec<Arc<Host>>) -> Self {
        let healthy = hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.healthy())
            .map(|(i, _)| i)
            .collect();
        let uniform_weight = hosts.windows(2).all(|w| w[0].weight == w[1].weight);
        HostSet {
            hosts,
            healthy,
            uniform_weight,
            hash_lb: None,
        }
    }
}

/// `cluster.<name>.*` stats.
#[derive(Debug)]
pub struct ClusterStats {
    pub upstream_rq_total: Counter,
    pub upstream_rq_active: Gauge,
    pub upstream_rq_completed: Counter,
    pub upstream_rq_timeout: Counter,
    pub upstream_rq_per_try_timeout: Counter,
    /// `retry.upstream_rq_<code>`: responses that were retried.
    pub retry_rq: CodeStats,
    pub upstream_rq_rx_reset: Counter,
    pub upstream_rq_tx_reset: Counter,
    pub upstream_rq_pending_total: Counter,
    pub upstream_rq_pending_active: Gauge,
    pub upstream_rq_pending_failure_eject: Counter,
    pub upstream_rq_time: Histogram,
    pub upstream_rq: CodeStats,
    pub upstream_cx_total: Counter,
    pub upstream_cx_active: Gauge,
    pub upstream_cx_http1_total: Counter,
    pub upstream_cx_http2_total: Counter,
    pub upstream_cx_connect_fail: Counter,
    pub upstream_cx_connect_timeout: Counter,
    pub upstream_cx_destroy: Counter,
    pub upstream_cx_destroy_local: Counter,
    pub upstream_cx_destroy_remote: Counter,
    pub upstream_cx_none_healthy: Counter,
    pub upstream_cx_rx_bytes_total: Counter,
    pub upstream_cx_tx_bytes_total: Counter,
    pub upstream_cx_connect_ms: Histogram,
    pub upstream_cx_length_ms: Histogram,
    pub membership_total: Gauge,
    pub membership_healthy: Gauge,
    pub membership_degraded: Gauge,
    pub membership_excluded: Gauge,
    pub membership_change: Counter,
    pub lb_healthy_panic: Counter,
    pub max_host_weight: Gauge,
}

impl ClusterStats {
    pub fn new(scope: &Scope) -> Self {
        ClusterStats {
            upstream_rq_total: scope.counter("upstream_rq_total"),
            upstream_rq_active: scope.gauge("upstream_rq_active"),
            upstream_rq_completed: scope.counter("upstream_rq_completed"),
            upstream_rq_timeout: scope.counter("upstream_rq_timeout"),
            upstream_rq_per_try_timeout: scope.counter("upstream_rq_per_try_timeout"),
            retry_rq: CodeStats::new(&scope.scope("retry."), "upstream_rq"),
            upstream_rq_rx_reset: scope.counter("upstream_rq_rx_reset"),
            upstream_rq_tx_reset: scope.counter("upstream_rq_tx_reset"),
            upstream_rq_pending_total: scope.counter("upstream_rq_pending_total"),
            upstream_rq_pending_active: scope.gauge("upstream_rq_pending_active"),
            upstream_rq_pending_failure_eject: scope.counter("upstream_rq_pending_failure_eject"),
            upstream_rq_time: scope.histogram("upstream_rq_time"),
            upstream_rq: CodeStats::new(scope, "upstream_rq"),
            upstream_cx_total: scope.counter("upstream_cx_total"),
            upstream_cx_active: scope.gauge("upstream_cx_active"),
            upstream_cx_http1_total: scope.counter("upstream_cx_http1_total"),
            upstream_cx_http2_total: scope.counter("upstream_cx_http2_total"),
            upstream_cx_connect_fail: scope.counter("upstream_cx_connect_fail"),
            upstream_cx_connect_timeout: scope.counter("upstream_cx_connect_timeout"),
            upstream_cx_destroy: scope.counter("upstream_cx_destroy"),
            upstream_cx_destroy_local: scope.counter("upstream_cx_destroy_local"),
            upstream_cx_destroy_remote: scope.counter("upstream_cx_destroy_remote"),
            upstream_cx_none_healthy: scope.counter("upstream_cx_none_healthy"),
            upstream_cx_rx_bytes_total: scope.counter("upstream_cx_rx_bytes_total"),
            upstream_cx_tx_bytes_total: scope.counter("upstream_cx_tx_bytes_total"),
            upstream_cx_connect_ms: scope.histogram("upstream_cx_connect_ms"),
            upstream_cx_length_ms: scope.histogram("upstream_cx_length_ms"),
            membership_total: scope.gauge("membership_total"),
            membership_healthy: scope.gauge("membership_healthy"),
            membership_degraded: scope.gauge("membership_degraded"),
            membership_excluded: scope.gauge("membership_excluded"),
            membership_change: scope.counter("membership_change"),
            lb_healthy_panic: scope.counter("lb_healthy_panic"),
            max_host_weight: scope.gauge("max_host_weight"),
        }
    }
}

/// A cluster at run time.
#[derive(Debug)]
pub struct Cluster {
    pub config: ClusterConfig,
    pub stats: ClusterStats,
    pub breakers: breaker::CircuitBreakers,
    pub outlier: Option<outlier::Detector>,
    pub retry_stats: crate::retry::RetryStats,
    pub health_checks: Option<active_health::HealthChecking>,
    hosts: ArcSwap<HostSet>,
    /// This cluster, for the tasks it spawns (health checks hold it weakly).
    me: Weak<Cluster>,
    rr: AtomicUsize,
    pub added_via_api: bool,
}

impl Cluster {
    pub fn new(config: ClusterConfig, scope: &Scope, added_via_api: bool) -> Arc<Cluster> {
        let stats = ClusterStats::new(scope);
        let hosts: Vec<Arc<Host>> = config.endpoints.iter().map(Host::new).collect();
        let breakers = breaker::CircuitBreakers::new(&config.circuit_breakers, scope);
        let outlier = config
            .outlier
            .clone()
            .map(|o| outlier::Detector::new(o, outlier::OutlierStats::new(scope), &hosts));
        let health_checks = config
            .health_check
            .clone()
            .map(|hc| active_health::HealthChecking::new(hc, health_check::HealthCheckStats::new(scope)));
        let c = Arc::new_cyclic(|me| Cluster {
            config,
            stats,
            breakers,
            outlier,
            retry_stats: crate::retry::RetryStats::new(scope),
            health_checks,
            hosts: ArcSwap::from_pointee(HostSet::default()),
            rr: AtomicUsize::new(0),
            added_via_api,
            me: me.clone(),
        });
        c.set_hosts(hosts);
        c
    }

    /// Start the active health checks of every host (a no-op without `health_checks`). With `first`, each
    /// host reports its first check on it; returns how many will.
    pub fn start_health_checks(&self, first: Option<tokio::sync::mpsc::Sender<()>>) -> usize {
        let Some(hc) = &self.health_checks else { return 0 };
        let n = hc.pending();
        hc.start(&self.me, first);
        n
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Replace the membership (hosts that remain keep their outlier state, matched by id).
    pub fn set_hosts(&self, hosts: Vec<Arc<Host>>) {
        if let Some(d) = &self.outlier {
            d.set_hosts(&hosts);
        }
        match &self.health_checks {
            Some(hc) => hc.set_hosts(&self.me, &hosts),
            // A host carried over from a health-checked version of this cluster.
            None => hosts
                .iter()
                .for_each(|h| h.failed_active_hc.store(false, Relaxed)),
        }
        self.publish(hosts);
    }

    /// Recompute which hosts take traffic (after an ejection or a return).
    pub fn refresh_health(&self) {
        let hosts = self.hosts.load().hosts.clone();
        self.publish(hosts);
    }

    fn publish(&self, hosts: Vec<Arc<Host>>) {
        let mut set = HostSet::new(hosts);
        if let Some(d) = &self.outlier {
            set.healthy.retain(|&i| !d.is_ejected(i));
        }
        set.hash_lb = HashLb::build(self.config.lb_policy, &set);
        self.store_set(set);
    }

    /// Update `membership_*` and swap the set in.
    fn store_set(&self, set: HostSet) {
        let total = set.hosts.len() as i64;
        let healthy = set.healthy.len() as i64;
        let degraded = set
            .hosts
            .iter()
            .filter(|h| h.health == EndpointHealth::Degraded)
            .count() as i64;
        let max_weight = set.hosts.iter().map(|h| h.weight).max().unwrap_or(0);
        self.stats.membership_total.set(total);
        self.stats.membership_healthy.set(healthy - degraded);
        self.stats.membership_degraded.set(degraded);
        self.stats.membership_excluded.set(0);
        self.stats.max_host_weight.set(i64::from(max_weight));
        self.stats.membership_change.inc();
        self.hosts.store(Arc::new(set));
    }

    pub fn hosts(&self) -> arc_swap::Guard<Arc<HostSet>> {
        self.hosts.load()
    }

    /// Pick a host for a request, with its index in the current set (for outlier detection), or `None` when no
    /// host may take traffic. `hash` is the request's hash for `RING_HASH` and `MAGLEV` (random when `None`).
    pub fn pick(&self, rng: &mut lb::Rng, hash: Option<u64>) -> Option<(usize, Arc<Host>)> {
        let set = self.hosts.load();
        let h = lb::pick(self.config.lb_policy, &set, &self.rr, rng, hash)?;
        let i = set.hosts.iter().position(|x| x.id == h.id)?;
        Some((i, h.clone()))
    }

    /// Report an attempt's outcome to the outlier detector; an ejection takes the host out of balancing now.
    pub fn record_outcome(&self, index: usize, outcome: outlier::Outcome, rng: &mut lb::Rng) {
        if let Some(d) = &self.outlier {
            if let Some(ev) = d.record(index, outcome, tokio::time::Instant::now(), rng) {
                log_outlier_event(self.name(), &ev);
                self.refresh_health();
            }
        }
    }

    /// The interval sweep of outlier detection (success rate, failure percentage, returns).
    pub fn outlier_sweep(&self, rng: &mut lb::Rng) {
        if let Some(d) = &self.outlier {
            let events = d.evaluate(tokio::time::Instant::now(), rng);
            for ev in &events {
                log_outlier_event(self.name(), ev);
            }
            if !events.is_empty() {
                self.refresh_health();
            }
        }
    }
}
