//! Clusters, their hosts, and picking a host for a request.
//!
//! A [`Cluster`] is shared by every worker (an `Arc` in the snapshot). Its membership is an [`ArcSwap`] of a
//! [`HostSet`] that discovery replaces as a whole; a request loads it once. Connection pools are per worker (see
//! [`pool`]), keyed by host id, so that a request takes a pooled connection without a lock.
//!
//! Everything a pick needs is computed when a host set is published (membership, an active health check
//! transition, an ejection or return, a change of the local cluster): hosts split by priority into healthy,
//! degraded and all, and by locality; the priority loads and panic state ([`priority`]); zone-aware routing
//! ([`zone`], against [`local_cluster`]); the locality schedule (`locality_weighted_lb_config`); the ring or
//! Maglev table ([`hash`]). A pick ([`HostSet::pick`]) chooses the priority, then the zone or locality, then the
//! host ([`lb`]). Active health checks run as a task per host ([`active_health`]).

pub mod active_health;
pub mod aggregate;
pub mod breaker;
pub mod dfp;
pub mod dns;
pub mod hash;
pub mod health_check;
pub mod lb;
pub mod local_cluster;
pub mod original_dst;
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
use std::sync::{Arc, Mutex, Weak};
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
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of `choice_count` choices (default 2) by active requests when the hosts' weights are equal; an
    /// earliest-deadline-first schedule over `weight / (active + 1)^active_request_bias` when they are not, or
    /// when `active_request_bias` is set (see [`lb::LeastRequestEdf`]).
    LeastRequest {
        choice_count: u32,
        /// `least_request_lb_config.active_request_bias.default_value` when set (its runtime key is not read
        /// from the layered runtime); a negative or NaN value is 1.0, as in Envoy.
        active_request_bias: Option<f64>,
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
        /// `eds_cluster_config.eds_config`: where the assignment comes from.
        source: crate::xds::SourceConfig,
    },
    /// `cluster_type: envoy.clusters.dynamic_forward_proxy`: hosts come from requests' authorities through
    /// the cluster's DNS cache (see [`dfp`]).
    DynamicForwardProxy(Arc<dfp::DfpConfig>),
    /// `ORIGINAL_DST`: the host is the address in a request header (`original_dst_lb_config`).
    OriginalDst(Arc<OriginalDstConfig>),
    /// `cluster_type: envoy.clusters.aggregate`: no hosts of its own; requests go to its member clusters (see
    /// [`aggregate`]).
    Aggregate(aggregate::AggregateConfig),
}

/// `original_dst_lb_config` of an `ORIGINAL_DST` cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct OriginalDstConfig {
    /// `http_header_name` (default `x-envoy-original-dst-host`) when `use_http_header` is set.
    pub header: Option<http::HeaderName>,
    /// `cleanup_interval` (default 5 s): hosts unused for this long are removed.
    pub cleanup_interval: Duration,
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
    /// `common_http_protocol_options.max_requests_per_connection` (or the deprecated cluster-level field):
    /// requests a connection carries before it is drained; `None` (or 0 in the config) is no limit.
    pub max_requests_per_connection: Option<u32>,
    /// `http2_protocol_options` of an HTTP/2 upstream.
    pub http2: Http2Options,
    /// The hosts to start with (`load_assignment`, or EDS's assignment). [`Cluster::new`] turns them into
    /// hosts and leaves this empty in the running cluster's config.
    pub endpoints: Vec<EndpointConfig>,
    /// `per_connection_buffer_limit_bytes` (default 1 MiB).
    pub buffer_limit: u32,
    pub circuit_breakers: breaker::CircuitBreakersConfig,
    pub outlier: Option<outlier::OutlierConfig>,
    /// `load_assignment.policy.overprovisioning_factor`, percent (default 140).
    pub overprovisioning_factor: u32,
    /// `common_lb_config.healthy_panic_threshold`, percent (default 50; 0 disables panic).
    pub healthy_panic_threshold: u32,
    /// `common_lb_config.ignore_new_hosts_until_first_hc`.
    pub ignore_new_hosts_until_first_hc: bool,
    /// `common_lb_config.zone_aware_lb_config` / `locality_weighted_lb_config` (or the typed policy's
    /// `locality_lb_config`); `None` is zone-aware routing with its defaults, as in Envoy.
    pub locality_lb: Option<crate::config::lb::LocalityLb>,
    /// `health_checks` (Envoy takes at most one).
    pub health_check: Option<Arc<health_check::HealthCheckConfig>>,
    /// `ignore_health_on_host_removal`: a host EDS removes leaves at once even while it passes its active
    /// health checks (see [`Cluster::set_discovered_hosts`]).
    pub ignore_health_on_host_removal: bool,
    /// `transport_socket` `envoy.transport_sockets.tls`: TLS to the hosts.
    pub tls: Option<crate::tls::ClientSpec>,
}

/// `envoy.config.core.v3.Http2ProtocolOptions` of a cluster's HTTP/2 connections; `None` leaves hyper's
/// default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Http2Options {
    /// `initial_stream_window_size`: the flow-control window Remora offers each stream (SETTINGS).
    pub initial_stream_window_size: Option<u32>,
    /// `initial_connection_window_size`: the connection's window (a WINDOW_UPDATE on stream 0).
    pub initial_connection_window_size: Option<u32>,
    /// `connection_keepalive`: a PING every `interval`, the connection closed when one is not answered within
    /// `timeout` (idle or not, as Envoy sends them).
    pub keepalive: Option<Http2Keepalive>,
}

/// `Http2ProtocolOptions.connection_keepalive`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Http2Keepalive {
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
}

/// One `lb_endpoints` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    pub hostname: String,
    pub weight: u32,
    pub priority: u32,
    pub locality: Locality,
    /// The locality's `load_balancing_weight` (0 when unset), for locality-weighted balancing.
    pub locality_weight: u32,
    pub health: EndpointHealth,
    /// `endpoint.health_check_config.port_value`: active health checks use this port instead.
    pub health_check_port: Option<u16>,
    /// `endpoint.health_check_config.disable_active_health_check`.
    pub health_check_disabled: bool,
    /// `endpoint.health_check_config.hostname`: the `host` (HTTP) or `:authority` (gRPC) of this endpoint's
    /// active health checks, over the check's own.
    pub health_check_hostname: String,
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
    pub locality_weight: u32,
    pub health: EndpointHealth,
    /// Where active health checks connect (`health_check_config.port_value`, else `address`).
    pub health_check_address: SocketAddr,
    /// `health_check_config.disable_active_health_check`: never checked, never failed by checks.
    pub health_check_disabled: bool,
    /// `health_check_config.hostname` (empty: the check's `host`/`authority`, else the cluster name).
    pub health_check_hostname: String,
    /// `FAILED_ACTIVE_HC`: the cluster's active health check fails this host (see [`active_health`]).
    pub failed_active_hc: AtomicBool,
    /// `PENDING_DYNAMIC_REMOVAL`: EDS removed the host, but it stays while it passes its active health checks
    /// (see [`Cluster::set_discovered_hosts`]).
    pub pending_dynamic_removal: AtomicBool,
    /// `PENDING_ACTIVE_HC`: with `common_lb_config.ignore_new_hosts_until_first_hc`, a host new to the health
    /// checker is excluded from balancing (and from the host counts) until its first check completes.
    pub pending_active_hc: AtomicBool,
    /// The host left its cluster's membership (or its cluster left the configuration): workers close its
    /// pooled connections ([`pool::Pools::purge_retired`]) and pool no new ones.
    retired: AtomicBool,
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
            locality_weight: e.locality_weight,
            health: e.health,
            health_check_address: SocketAddr::new(
                e.address.ip(),
                e.health_check_port.unwrap_or(e.address.port()),
            ),
            health_check_disabled: e.health_check_disabled,
            health_check_hostname: e.health_check_hostname.clone(),
            failed_active_hc: AtomicBool::new(false),
            pending_active_hc: AtomicBool::new(false),
            pending_dynamic_removal: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            stats: HostStats::default(),
        })
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Relaxed)
    }

    pub fn healthy(&self) -> bool {
        self.health.usable() && !self.failed_active_hc.load(Relaxed)
    }
}

/// A cluster's membership at one moment, with everything a pick needs computed when it is published.
#[derive(Debug, Default)]
pub struct HostSet {
    pub hosts: Vec<Arc<Host>>,
    /// Indexes into `hosts` of hosts that may take traffic (healthy or degraded), every priority.
    pub healthy: Vec<usize>,
    /// Priority levels, index = priority (levels without hosts are empty).
    pub levels: Vec<Level>,
    /// Each level's share of requests and panic state ([`priority::PriorityLoad`]).
    pub load: priority::PriorityLoad,
    /// Zone-aware routing of priority 0, when the cluster is zone aware.
    pub zone: Option<zone::ZoneRouting>,
    /// Hosts excluded from balancing and from the counts (`PENDING_ACTIVE_HC`).
    pub excluded: usize,
}

/// One priority level's candidate lists.
#[derive(Debug, Default)]
pub struct Level {
    /// Every host of the level (a level in panic balances over them).
    pub all: Candidates,
    pub healthy: Candidates,
    pub degraded: Candidates,
    /// The level's localities with their host counts, in first-seen order.
    pub localities: Vec<zone::ZoneHosts>,
    /// The healthy hosts of each locality, in `localities` order (zone-aware and locality-weighted picks).
    pub healthy_by_locality: Vec<Candidates>,
    /// `locality_weighted_lb_config`: the schedule over `healthy_by_locality` (`None` without it, or when no
    /// locality has an effective weight: then the level's hosts are balanced as one).
    pub locality_wrr: Option<Mutex<priority::LocalityWrr>>,
}

/// Hosts a balancer may pick from: indexes into [`HostSet::hosts`].
#[derive(Debug, Default)]
pub struct Candidates {
    pub idx: Vec<usize>,
    /// Every host has the same weight (round robin need not weigh).
    pub uniform_weight: bool,
    /// For `RING_HASH` and `MAGLEV`: the structure over `idx`, whose picks index into `idx`.
    pub hash_lb: Option<HashLb>,
    /// For weighted `LEAST_REQUEST`: the schedule over `idx`, whose picks index into `idx`.
    pub least_request: Option<Mutex<lb::LeastRequestEdf>>,
}

impl Candidates {
    fn new(hosts: &[Arc<Host>], idx: Vec<usize>) -> Self {
        let uniform_weight = idx.windows(2).all(|w| hosts[w[0]].weight == hosts[w[1]].weight);
        Candidates {
            idx,
            uniform_weight,
            hash_lb: None,
            least_request: None,
        }
    }

    /// With the structures `policy` picks from: the ring or Maglev table, or the weighted least-request
    /// schedule.
    fn with_policy(mut self, policy: LbPolicy, hosts: &[Arc<Host>]) -> Self {
        self.hash_lb = HashLb::build(policy, hosts, &self.idx);
        self.with_least_request(policy, hosts)
    }

    /// With the weighted least-request schedule when `policy` needs one: hosts of unequal weights, or an
    /// explicit `active_request_bias` (Envoy's `least_request_lb_active_request_bias_forces_weighted`).
    fn with_least_request(mut self, policy: LbPolicy, hosts: &[Arc<Host>]) -> Self {
        if let LbPolicy::LeastRequest {
            active_request_bias, ..
        } = policy
        {
            if self.idx.len() > 1 && (!self.uniform_weight || active_request_bias.is_some()) {
                let weights: Vec<u32> = self.idx.iter().map(|&i| hosts[i].weight).collect();
                let mut edf = lb::LeastRequestEdf::new(&weights);
                edf.randomize(&mut lb::Rng::from_entropy());
                self.least_request = Some(Mutex::new(edf));
            }
        }
        self
    }
}

/// A consistent-hash structure, built when the host set is published.
#[derive(Debug)]
pub enum HashLb {
    Ring(hash::Ring),
    Maglev(hash::Maglev),
}

impl HashLb {
    /// Build over `idx` (keys `ip:port`, as Envoy's `address()->asString()`).
    fn build(policy: LbPolicy, hosts: &[Arc<Host>], idx: &[usize]) -> Option<HashLb> {
        if !policy.hashes() || idx.is_empty() {
            return None;
        }
        let keys: Vec<(&str, u32)> = idx
            .iter()
            .map(|&i| (hosts[i].address_str.as_str(), hosts[i].weight))
            .collect();
        match policy {
            LbPolicy::RingHash(cfg) => Some(HashLb::Ring(hash::Ring::build(&keys, &cfg))),
            LbPolicy::Maglev { table_size } => Some(HashLb::Maglev(hash::Maglev::build(&keys, table_size))),
            _ => None,
        }
    }

    /// A position in the candidates for a request hash.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        match self {
            HashLb::Ring(r) => r.pick(hash),
            HashLb::Maglev(m) => m.pick(hash),
        }
    }
}

/// What a host-set publish needs from the cluster's configuration.
#[derive(Clone, Copy, Debug)]
pub struct LbSettings {
    pub policy: LbPolicy,
    /// `load_assignment.policy.overprovisioning_factor`, percent.
    pub overprovisioning_factor: u32,
    /// `common_lb_config.healthy_panic_threshold`, percent.
    pub panic_threshold: u32,
    /// `locality_weighted_lb_config`.
    pub locality_weighted: bool,
    /// `ignore_new_hosts_until_first_hc`: hosts pending their first health check are excluded.
    pub exclude_pending: bool,
}

impl Default for LbSettings {
    fn default() -> Self {
        LbSettings {
            policy: LbPolicy::RoundRobin,
            overprovisioning_factor: priority::DEFAULT_OVERPROVISIONING_FACTOR,
            panic_threshold: priority::DEFAULT_PANIC_THRESHOLD,
            locality_weighted: false,
            exclude_pending: false,
        }
    }
}

impl HostSet {
    /// A set with default balancing settings and no exclusions (tests).
    pub fn new(hosts: Vec<Arc<Host>>) -> Self {
        HostSet::build(hosts, |_| false, &LbSettings::default())
    }

    /// Classify the hosts (healthy, degraded, unavailable: EDS health, active health checks, and `ejected`
    /// for outlier detection), split them by priority and locality, and compute the priority loads.
    pub fn build(hosts: Vec<Arc<Host>>, ejected: impl Fn(usize) -> bool, lb: &LbSettings) -> Self {
        let n_levels = hosts.iter().map(|h| h.priority as usize + 1).max().unwrap_or(1);
        let mut all = vec![Vec::new(); n_levels];
        let mut healthy_idx = vec![Vec::new(); n_levels];
        let mut degraded_idx = vec![Vec::new(); n_levels];
        let mut localities: Vec<Vec<zone::ZoneHosts>> = vec![Vec::new(); n_levels];
        let mut by_locality: Vec<Vec<Vec<usize>>> = vec![Vec::new(); n_levels];
        let mut locality_weights: Vec<Vec<u32>> = vec![Vec::new(); n_levels];
        let mut usable = Vec::new();
        let mut excluded = 0;
        for (i, h) in hosts.iter().enumerate() {
            if lb.exclude_pending && h.pending_active_hc.load(Relaxed) {
                excluded += 1;
                continue;
            }
            let p = h.priority as usize;
            all[p].push(i);
            let li = match localities[p].iter().position(|z| z.locality == h.locality) {
                Some(li) => li,
                None => {
                    localities[p].push(zone::ZoneHosts {
                        locality: h.locality.clone(),
                        ..Default::default()
                    });
                    by_locality[p].push(Vec::new());
                    locality_weights[p].push(h.locality_weight);
                    localities[p].len() - 1
                }
            };
            localities[p][li].hosts += 1;
            if !h.healthy() || ejected(i) {
                continue;
            }
            usable.push(i);
            if h.health == EndpointHealth::Degraded {
                degraded_idx[p].push(i);
                localities[p][li].degraded += 1;
            } else {
                healthy_idx[p].push(i);
                localities[p][li].healthy += 1;
                by_locality[p][li].push(i);
            }
        }
        let counts: Vec<priority::LevelCounts> = (0..n_levels)
            .map(|p| priority::LevelCounts {
                hosts: all[p].len() as u32,
                healthy: healthy_idx[p].len() as u32,
                degraded: degraded_idx[p].len() as u32,
            })
            .collect();
        let load = priority::PriorityLoad::compute(&counts, lb.overprovisioning_factor, lb.panic_threshold);
        let levels = (0..n_levels)
            .map(|p| {
                let panic = load.panic.get(p).copied().unwrap_or(false);
                let all = Candidates::new(&hosts, std::mem::take(&mut all[p]));
                let locality_wrr = if lb.locality_weighted {
                    let counts: Vec<priority::LocalityCounts> = localities[p]
                        .iter()
                        .zip(&locality_weights[p])
                        .map(|(z, &weight)| priority::LocalityCounts {
                            weight,
                            hosts: z.hosts,
                            eligible: z.healthy,
                        })
                        .collect();
                    priority::LocalityWrr::new(&counts, lb.overprovisioning_factor).map(|mut w| {
                        w.randomize(&mut lb::Rng::from_entropy());
                        Mutex::new(w)
                    })
                } else {
                    None
                };
                Level {
                    all: if panic {
                        all.with_policy(lb.policy, &hosts)
                    } else {
                        all
                    },
                    healthy: Candidates::new(&hosts, std::mem::take(&mut healthy_idx[p]))
                        .with_policy(lb.policy, &hosts),
                    degraded: Candidates::new(&hosts, std::mem::take(&mut degraded_idx[p]))
                        .with_policy(lb.policy, &hosts),
                    localities: std::mem::take(&mut localities[p]),
                    healthy_by_locality: std::mem::take(&mut by_locality[p])
                        .into_iter()
                        .map(|idx| Candidates::new(&hosts, idx).with_least_request(lb.policy, &hosts))
                        .collect(),
                    locality_wrr,
                }
            })
            .collect();
        HostSet {
            hosts,
            healthy: usable,
            levels,
            load,
            zone: None,
            excluded,
        }
    }

    /// A host's index for a request: the priority by the loads (`hash`, else a random draw), then the host
    /// among the level's healthy, degraded or, in panic, all hosts. `on_panic` counts `lb_healthy_panic`.
    pub fn pick(
        &self,
        policy: LbPolicy,
        rr: &AtomicUsize,
        rng: &mut lb::Rng,
        hash: Option<u64>,
        on_panic: impl FnOnce(),
        zone_stats: &zone::ZoneStats,
    ) -> Option<usize> {
        let draw = hash.unwrap_or_else(|| rng.next_u64());
        let (priority, avail) = self.load.choose(draw);
        self.pick_at(priority, avail, policy, rr, rng, hash, on_panic, zone_stats)
    }

    /// A host's index for a request at a priority and availability chosen already (by [`pick`](Self::pick),
    /// or by an aggregate cluster over its members' levels): among the level's healthy or degraded hosts, or
    /// all of them when the level is in panic.
    #[allow(clippy::too_many_arguments)]
    pub fn pick_at(
        &self,
        priority: usize,
        avail: priority::Availability,
        policy: LbPolicy,
        rr: &AtomicUsize,
        rng: &mut lb::Rng,
        hash: Option<u64>,
        on_panic: impl FnOnce(),
        zone_stats: &zone::ZoneStats,
    ) -> Option<usize> {
        let source = priority::source_at(&self.load, priority, avail, false, on_panic)?;
        let level = self.levels.get(source.priority())?;
        let candidates = match source {
            priority::HostSource::All { .. } => &level.all,
            priority::HostSource::Degraded { .. } => &level.degraded,
            priority::HostSource::Healthy { priority } => {
                // Zone-aware routing applies to priority 0 only.
                let zoned = match (&self.zone, priority) {
                    (Some(z), 0) => z.pick(rng, zone_stats),
                    _ => zone::ZonePick::AnyZone,
                };
                match zoned {
                    zone::ZonePick::Zone(i) => level.healthy_by_locality.get(i)?,
                    zone::ZonePick::Fail => return None,
                    zone::ZonePick::AnyZone => match &level.locality_wrr {
                        Some(wrr) => {
                            let i = wrr.lock().map(|mut w| w.pick()).ok()?;
                            level.healthy_by_locality.get(i)?
                        }
                        None => &level.healthy,
                    },
                }
            }
        };
        lb::pick(policy, &self.hosts, candidates, rr, rng, hash)
    }

    /// Each level's host counts (index = priority).
    pub fn level_counts(&self) -> Vec<priority::LevelCounts> {
        self.levels
            .iter()
            .map(|l| priority::LevelCounts {
                hosts: l.all.idx.len() as u32,
                healthy: l.healthy.idx.len() as u32,
                degraded: l.degraded.idx.len() as u32,
            })
            .collect()
    }

    /// Hosts that are healthy (not degraded), every priority.
    pub fn healthy_count(&self) -> usize {
        self.levels.iter().map(|l| l.healthy.idx.len()).sum()
    }

    /// Hosts that are degraded and otherwise available, every priority.
    pub fn degraded_count(&self) -> usize {
        self.levels.iter().map(|l| l.degraded.idx.len()).sum()
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
    pub upstream_rq_per_try_idle_timeout: Counter,
    /// `retry.upstream_rq_<code>`: responses that were retried.
    pub retry_rq: CodeStats,
    pub upstream_rq_rx_reset: Counter,
    pub upstream_rq_tx_reset: Counter,
    pub upstream_rq_pending_total: Counter,
    /// Requests cancelled before they got a connection.
    pub upstream_rq_cancelled: Counter,
    pub upstream_rq_pending_active: Gauge,
    pub upstream_rq_pending_failure_eject: Counter,
    pub upstream_rq_time: Histogram,
    pub upstream_rq: CodeStats,
    pub upstream_cx_total: Counter,
    pub upstream_cx_active: Gauge,
    pub upstream_cx_http1_total: Counter,
    pub upstream_cx_http2_total: Counter,
    /// Connections drained because they reached `max_requests_per_connection`.
    pub upstream_cx_max_requests: Counter,
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
            upstream_rq_per_try_idle_timeout: scope.counter("upstream_rq_per_try_idle_timeout"),
            retry_rq: CodeStats::new(&scope.scope("retry."), "upstream_rq"),
            upstream_rq_rx_reset: scope.counter("upstream_rq_rx_reset"),
            upstream_rq_tx_reset: scope.counter("upstream_rq_tx_reset"),
            upstream_rq_pending_total: scope.counter("upstream_rq_pending_total"),
            upstream_rq_cancelled: scope.counter("upstream_rq_cancelled"),
            upstream_rq_pending_active: scope.gauge("upstream_rq_pending_active"),
            upstream_rq_pending_failure_eject: scope.counter("upstream_rq_pending_failure_eject"),
            upstream_rq_time: scope.histogram("upstream_rq_time"),
            upstream_rq: CodeStats::new(scope, "upstream_rq"),
            upstream_cx_total: scope.counter("upstream_cx_total"),
            upstream_cx_active: scope.gauge("upstream_cx_active"),
            upstream_cx_http1_total: scope.counter("upstream_cx_http1_total"),
            upstream_cx_http2_total: scope.counter("upstream_cx_http2_total"),
            upstream_cx_max_requests: scope.counter("upstream_cx_max_requests"),
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
    pub zone_stats: zone::ZoneStats,
    /// The local cluster, for zone-aware routing (`cluster_manager.local_cluster_name`).
    local: Option<Arc<local_cluster::LocalCluster>>,
    hosts: ArcSwap<HostSet>,
    /// This cluster, for the tasks it spawns (health checks hold it weakly).
    me: Weak<Cluster>,
    rr: AtomicUsize,
    pub added_via_api: bool,
    /// The DNS cache of a dynamic forward proxy cluster.
    pub dfp: Option<Arc<dfp::DnsCache>>,
    /// The hosts of an `ORIGINAL_DST` cluster, made from request headers.
    pub original_dst: Option<original_dst::OriginalDstHosts>,
    /// The balancer of an aggregate cluster over its members.
    pub aggregate: Option<aggregate::Aggregate>,
    /// The TLS context for connections to the hosts (or why it could not be built; lowering checked it).
    pub tls: Option<Result<Arc<crate::tls::ClientTls>, String>>,
    /// The cluster left the configuration (removed, or replaced by a new version); see [`Cluster::retire`].
    retired: AtomicBool,
    /// Serialises membership changes that read the current hosts (discovery and pending removals).
    membership: Mutex<()>,
    /// The runtime's values of [`RUNTIME_LB_KEYS`] (`u64::MAX`: not set); see [`Cluster::apply_runtime`].
    runtime_lb: [AtomicU64; 3],
}

/// The runtime keys of load balancing every cluster reads.
pub const RUNTIME_LB_KEYS: [&str; 3] = [
    "upstream.healthy_panic_threshold",
    "upstream.zone_routing.enabled",
    "upstream.zone_routing.min_cluster_size",
];

impl Cluster {
    pub fn new(
        mut config: ClusterConfig,
        scope: &Scope,
        added_via_api: bool,
        local: Option<Arc<local_cluster::LocalCluster>>,
    ) -> Arc<Cluster> {
        let stats = ClusterStats::new(scope);
        // The endpoints become hosts; the cluster keeps those only (an EDS cluster's next assignment replaces
        // them, and the manager keeps the assignment).
        let hosts: Vec<Arc<Host>> = std::mem::take(&mut config.endpoints)
            .iter()
            .map(Host::new)
            .collect();
        let breakers = breaker::CircuitBreakers::new(&config.circuit_breakers, scope);
        let outlier = config
            .outlier
            .clone()
            .map(|o| outlier::Detector::new(o, outlier::OutlierStats::new(scope), &hosts));
        let dfp = match &config.discovery {
            Discovery::DynamicForwardProxy(d) => Some(dfp::DnsCache::new(d.clone(), scope)),
            _ => None,
        };
        let original_dst = match &config.discovery {
            Discovery::OriginalDst(o) => Some(original_dst::OriginalDstHosts::new(o.clone())),
            _ => None,
        };
        let aggregate = match &config.discovery {
            Discovery::Aggregate(a) => Some(aggregate::Aggregate::new(
                a.clone(),
                config.healthy_panic_threshold,
            )),
            _ => None,
        };
        let health_checks = config.health_check.clone().map(|hc| {
            active_health::HealthChecking::new(
                hc,
                health_check::HealthCheckStats::new(scope),
                config.ignore_new_hosts_until_first_hc,
            )
        });
        let tls = config
            .tls
            .clone()
            .map(|spec| crate::tls::ClientTls::new(spec, crate::tls::SslStats::new(scope)));
        let c = Arc::new_cyclic(|me| Cluster {
            tls,
            config,
            stats,
            breakers,
            outlier,
            retry_stats: crate::retry::RetryStats::new(scope),
            health_checks,
            zone_stats: zone::ZoneStats::new(scope),
            local,
            hosts: ArcSwap::from_pointee(HostSet::default()),
            rr: AtomicUsize::new(0),
            added_via_api,
            dfp,
            original_dst,
            aggregate,
            me: me.clone(),
            retired: AtomicBool::new(false),
            membership: Mutex::new(()),
            runtime_lb: [const { AtomicU64::new(u64::MAX) }; 3],
        });
        if let Some(l) = &c.local {
            l.register(Arc::downgrade(&c));
        }
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

    /// Replace the membership (hosts that remain keep their outlier state, matched by id). Hosts that leave
    /// are retired: every worker closes their pooled connections (Envoy drains the pools of removed hosts).
    pub fn set_hosts(&self, hosts: Vec<Arc<Host>>) {
        let before = self.hosts.load_full();
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
        let kept: std::collections::HashSet<u64> = hosts.iter().map(|h| h.id).collect();
        if self.is_retired() {
            // A host a retired cluster learns of (a forward-proxy lookup finishing late) is retired at once.
            hosts.iter().for_each(|h| h.retired.store(true, Relaxed));
        }
        self.publish(hosts);
        let mut any = false;
        for h in before.hosts.iter().filter(|h| !kept.contains(&h.id)) {
            h.retired.store(true, Relaxed);
            any = true;
        }
        if any {
            pool::purge_retired_soon();
        }
    }

    /// A new membership from service discovery (EDS, STRICT_DNS), as Envoy's `updateDynamicHostList` takes it: on a
    /// cluster with active health checks and without `ignore_health_on_host_removal`, a host that left but is
    /// not failing its active checks (nor marked unhealthy by EDS) stays, `PENDING_DYNAMIC_REMOVAL`, and keeps
    /// taking traffic until it fails a check ([`Cluster::remove_pending_host`]) or comes back (matched by
    /// address, which clears the flag). Hosts whose checks are disabled have nothing to keep them and leave.
    pub fn set_discovered_hosts(&self, mut hosts: Vec<Arc<Host>>) {
        let Ok(_membership) = self.membership.lock() else {
            return;
        };
        for h in &hosts {
            h.pending_dynamic_removal.store(false, Relaxed);
        }
        if self.health_checks.is_some() && !self.config.ignore_health_on_host_removal {
            let listed: std::collections::HashSet<SocketAddr> = hosts.iter().map(|h| h.address).collect();
            let current = self.hosts.load();
            for h in current.hosts.iter().filter(|h| !listed.contains(&h.address)) {
                if !h.health_check_disabled && !h.failed_active_hc.load(Relaxed) && h.health.usable() {
                    h.pending_dynamic_removal.store(true, Relaxed);
                    hosts.push(h.clone());
                }
            }
            // Only hosts marked pending: no membership change, as in Envoy.
            if current.hosts.iter().map(|h| h.id).eq(hosts.iter().map(|h| h.id)) {
                return;
            }
        }
        self.set_hosts(hosts);
    }

    /// A host kept `PENDING_DYNAMIC_REMOVAL` failed its active health check: it leaves now (Envoy's
    /// `reloadHealthyHostsHelper`).
    pub fn remove_pending_host(&self, host: &Host) {
        let Ok(_membership) = self.membership.lock() else {
            return;
        };
        if !host.pending_dynamic_removal.load(Relaxed) {
            return;
        }
        let current = self.hosts.load_full();
        let hosts: Vec<Arc<Host>> = current
            .hosts
            .iter()
            .filter(|h| h.id != host.id)
            .cloned()
            .collect();
        if hosts.len() != current.hosts.len() {
            tracing::info!(cluster = %self.config.name, host = %host.address, "host removed by EDS left after failing its health check");
            self.set_hosts(hosts);
        }
    }

    /// Take the runtime's `upstream.healthy_panic_threshold`, `upstream.zone_routing.enabled` and
    /// `upstream.zone_routing.min_cluster_size` (`cluster_manager/cluster_runtime.rst`). Envoy reads them when it
    /// recomputes its per-priority panic and locality routing; Remora recomputes the host set when one changes.
    pub fn apply_runtime(&self, snap: &crate::layered_runtime::Snapshot) {
        let mut changed = false;
        for (slot, key) in self.runtime_lb.iter().zip(RUNTIME_LB_KEYS) {
            let v = if snap.is_empty() {
                u64::MAX
            } else {
                snap.get(key).and_then(|e| e.uint).unwrap_or(u64::MAX)
            };
            changed |= slot.swap(v, Relaxed) != v;
        }
        if changed {
            let hosts = self.hosts.load().hosts.clone();
            self.publish_as(hosts, false);
        }
        if let Some(hc) = &self.health_checks {
            hc.apply_runtime(snap);
        }
    }

    /// The runtime's value of `RUNTIME_LB_KEYS[i]`, if set.
    fn runtime_lb(&self, i: usize) -> Option<u64> {
        Some(self.runtime_lb[i].load(Relaxed)).filter(|v| *v != u64::MAX)
    }

    /// `common_lb_config.healthy_panic_threshold`, or the runtime's `upstream.healthy_panic_threshold`.
    fn panic_threshold(&self) -> u32 {
        self.runtime_lb(0)
            .map_or(self.config.healthy_panic_threshold, |v| v.min(100) as u32)
    }

    /// The cluster left the configuration (CDS removed it, or a new version replaced it): its hosts are
    /// retired, so that every worker closes their idle pooled connections now and the busy ones when their
    /// requests end (Envoy drains a removed cluster's connection pools). Requests in flight finish.
    pub fn retire(&self) {
        self.retired.store(true, Relaxed);
        for h in &self.hosts.load().hosts {
            h.retired.store(true, Relaxed);
        }
        pool::purge_retired_soon();
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Relaxed)
    }

    /// Recompute which hosts take traffic (after an ejection or a return).
    pub fn refresh_health(&self) {
        let hosts = self.hosts.load().hosts.clone();
        self.publish(hosts);
    }

    fn publish(&self, hosts: Vec<Arc<Host>>) {
        self.publish_as(hosts, true);
    }

    /// Build and swap in the host set; `membership` counts `membership_change` (not for a runtime change).
    fn publish_as(&self, hosts: Vec<Arc<Host>>, membership: bool) {
        let ejected = |i: usize| self.outlier.as_ref().is_some_and(|d| d.is_ejected(i));
        let mut set = HostSet::build(hosts, ejected, &self.lb_settings());
        let local = self.local.as_ref().filter(|l| l.name == self.config.name);
        if let (Some(l), Some(p0)) = (local, set.levels.first()) {
            l.set_hosts(p0.localities.clone(), self);
        }
        set.zone = Some(self.zone_routing(&set));
        self.store_set(set, membership);
    }

    /// Zone-aware routing for a new host set (`regenerateLocalityRoutingStructures`), or why there is none.
    fn zone_routing(&self, set: &HostSet) -> zone::ZoneRouting {
        use crate::config::lb::LocalityLb;
        let mut config = match self.config.locality_lb {
            Some(LocalityLb::ZoneAware(z)) => z,
            Some(LocalityLb::LocalityWeighted) => {
                return zone::ZoneRouting::inactive(
                    zone::ZoneAwareConfig::default(),
                    zone::Inactive::LocalityWeighted,
                )
            }
            None => zone::ZoneAwareConfig::default(),
        };
        if let Some(v) = self.runtime_lb(1) {
            config.routing_enabled = u32::try_from(v).unwrap_or(u32::MAX);
        }
        if let Some(v) = self.runtime_lb(2) {
            config.min_cluster_size = v;
        }
        match self.config.lb_policy {
            LbPolicy::RingHash(_) => {
                return zone::ZoneRouting::inactive(config, zone::Inactive::PolicyNotZoneAware("RING_HASH"))
            }
            LbPolicy::Maglev { .. } => {
                return zone::ZoneRouting::inactive(config, zone::Inactive::PolicyNotZoneAware("MAGLEV"))
            }
            _ => {}
        }
        let Some(local) = &self.local else {
            return zone::ZoneRouting::inactive(config, zone::Inactive::NoLocalCluster);
        };
        let p0 = set.levels.first().map_or(&[][..], |l| &l.localities[..]);
        let in_panic = set.load.panic.first().copied().unwrap_or(false);
        local.routing(config, p0, self.panic_threshold(), in_panic, &self.zone_stats)
    }

    fn lb_settings(&self) -> LbSettings {
        LbSettings {
            policy: self.config.lb_policy,
            overprovisioning_factor: self.config.overprovisioning_factor,
            panic_threshold: self.panic_threshold(),
            locality_weighted: self.config.locality_lb
                == Some(crate::config::lb::LocalityLb::LocalityWeighted),
            exclude_pending: self.config.ignore_new_hosts_until_first_hc,
        }
    }

    /// Update `membership_*` and swap the set in.
    fn store_set(&self, set: HostSet, membership: bool) {
        let total = set.hosts.len() as i64;
        let max_weight = set.hosts.iter().map(|h| h.weight).max().unwrap_or(0);
        self.stats.membership_total.set(total);
        self.stats.membership_healthy.set(set.healthy_count() as i64);
        self.stats.membership_degraded.set(set.degraded_count() as i64);
        self.stats.membership_excluded.set(set.excluded as i64);
        self.stats.max_host_weight.set(i64::from(max_weight));
        if membership {
            self.stats.membership_change.inc();
        }
        self.hosts.store(Arc::new(set));
    }

    pub fn hosts(&self) -> arc_swap::Guard<Arc<HostSet>> {
        self.hosts.load()
    }

    /// Pick a host for a request, with its index in the current set (for outlier detection), or `None` when no
    /// host may take traffic. `hash` is the request's hash for `RING_HASH` and `MAGLEV` (random when `None`).
    ///
    /// The priority comes first (by the loads latched at publish; a level in panic balances over all its
    /// hosts and counts `lb_healthy_panic`), then the host within the level's candidates.
    pub fn pick(&self, rng: &mut lb::Rng, hash: Option<u64>) -> Option<(usize, Arc<Host>)> {
        self.pick_with_load(rng, hash, None)
    }

    /// As [`pick`](Self::pick), the priority chosen by `load` instead of the cluster's load when given (a
    /// retry's `retry_priority`; a level in panic still balances over all its hosts).
    pub fn pick_with_load(
        &self,
        rng: &mut lb::Rng,
        hash: Option<u64>,
        load: Option<&crate::retry::priority::PriorityLoadOverride>,
    ) -> Option<(usize, Arc<Host>)> {
        let set = self.hosts.load();
        let on_panic = || self.stats.lb_healthy_panic.inc();
        let i = match load {
            None => set.pick(
                self.config.lb_policy,
                &self.rr,
                rng,
                hash,
                on_panic,
                &self.zone_stats,
            )?,
            Some(l) => {
                let draw = hash.unwrap_or_else(|| rng.next_u64());
                let (priority, avail) = priority::choose_in(&l.healthy, &l.degraded, draw);
                set.pick_at(
                    priority,
                    avail,
                    self.config.lb_policy,
                    &self.rr,
                    rng,
                    hash,
                    on_panic,
                    &self.zone_stats,
                )?
            }
        };
        Some((i, set.hosts[i].clone()))
    }

    /// Pick a host as [`pick`](Self::pick) does, or for an aggregate cluster among its members in `clusters`
    /// (the current snapshot): returns the cluster that owns the host (this one, or the member), the host's
    /// index in that cluster's set, and the host.
    pub fn pick_target(
        self: &Arc<Self>,
        clusters: &ArcSwap<crate::server::ClusterSnapshot>,
        rng: &mut lb::Rng,
        hash: Option<u64>,
    ) -> Option<(Arc<Cluster>, usize, Arc<Host>)> {
        match &self.aggregate {
            Some(a) => a.pick(&clusters.load_full(), rng, hash),
            None => self.pick(rng, hash).map(|(i, h)| (self.clone(), i, h)),
        }
    }

    /// Whether the request names the host (dynamic forward proxy, `ORIGINAL_DST`) rather than the balancer.
    pub fn provides_hosts(&self) -> bool {
        self.dfp.is_some() || self.original_dst.is_some()
    }

    /// `host`'s index in the current set (for outlier detection), when it is a member.
    pub fn index_of(&self, host: &Arc<Host>) -> Option<(usize, Arc<Host>)> {
        let i = self.hosts.load().hosts.iter().position(|x| x.id == host.id)?;
        Some((i, host.clone()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn host(port: u16, priority: u32, health: EndpointHealth) -> Arc<Host> {
        Host::new(&EndpointConfig {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            hostname: String::new(),
            weight: 1,
            priority,
            locality: Locality::default(),
            locality_weight: 0,
            health,
            health_check_port: None,
            health_check_disabled: false,
            health_check_hostname: String::new(),
        })
    }

    /// Requests per priority over `n` picks, and how many picks were in panic.
    fn spread(set: &HostSet, n: usize) -> (Vec<usize>, usize) {
        let rr = AtomicUsize::new(0);
        let mut rng = lb::Rng::seeded(3);
        let mut per = vec![0; set.levels.len()];
        let mut panics = 0;
        for _ in 0..n {
            let i = set
                .pick(
                    LbPolicy::RoundRobin,
                    &rr,
                    &mut rng,
                    None,
                    || panics += 1,
                    &zone::ZoneStats::detached(),
                )
                .unwrap();
            per[set.hosts[i].priority as usize] += 1;
        }
        (per, panics)
    }

    #[test]
    fn priority_spill_follows_health_with_overprovisioning() {
        use EndpointHealth::{Healthy, Unhealthy};
        // Envoy's priority docs: P0 at 50% healthy carries 70% (1.4 * 50), P1 the rest.
        let set = HostSet::new(vec![
            host(1, 0, Healthy),
            host(2, 0, Healthy),
            host(3, 0, Unhealthy),
            host(4, 0, Unhealthy),
            host(5, 1, Healthy),
            host(6, 1, Healthy),
        ]);
        assert_eq!(set.load.healthy_load, [70, 30]);
        let (per, panics) = spread(&set, 10_000);
        assert!((6700..7300).contains(&per[0]), "{per:?}");
        assert_eq!(panics, 0);
        // Unhealthy hosts never take traffic outside panic.
        assert!(set.levels[0].healthy.idx.iter().all(|&i| set.hosts[i].healthy()));
    }

    #[test]
    fn a_level_below_the_panic_threshold_balances_over_all_hosts() {
        use EndpointHealth::{Healthy, Unhealthy};
        // One level, 1 of 4 healthy (25% < 50%): panic, every host takes traffic.
        let set = HostSet::new(vec![
            host(1, 0, Healthy),
            host(2, 0, Unhealthy),
            host(3, 0, Unhealthy),
            host(4, 0, Unhealthy),
        ]);
        assert!(set.load.panic[0]);
        let rr = AtomicUsize::new(0);
        let mut rng = lb::Rng::seeded(1);
        let mut seen = std::collections::HashSet::new();
        let mut panics = 0;
        for _ in 0..8 {
            seen.insert(set.pick(
                LbPolicy::RoundRobin,
                &rr,
                &mut rng,
                None,
                || panics += 1,
                &zone::ZoneStats::detached(),
            ));
        }
        assert_eq!(seen.len(), 4);
        assert_eq!(panics, 8);
    }

    #[test]
    fn locality_weights_split_a_level() {
        let at = |port: u16, zone: &str, weight: u32| {
            Host::new(&EndpointConfig {
                address: SocketAddr::from(([127, 0, 0, 1], port)),
                hostname: String::new(),
                weight: 1,
                priority: 0,
                locality: Locality {
                    zone: zone.into(),
                    ..Default::default()
                },
                locality_weight: weight,
                health: EndpointHealth::Healthy,
                health_check_port: None,
                health_check_disabled: false,
                health_check_hostname: String::new(),
            })
        };
        // Envoy's locality_weight.rst: weights 1 and 3, the second with twice the hosts: 25% / 75%.
        let lb = LbSettings {
            locality_weighted: true,
            ..Default::default()
        };
        let set = HostSet::build(vec![at(1, "a", 1), at(2, "b", 3), at(3, "b", 3)], |_| false, &lb);
        let rr = AtomicUsize::new(0);
        let mut rng = lb::Rng::seeded(5);
        let z = zone::ZoneStats::detached();
        let mut in_a = 0;
        for _ in 0..400 {
            let i = set
                .pick(LbPolicy::RoundRobin, &rr, &mut rng, None, || {}, &z)
                .unwrap();
            in_a += usize::from(set.hosts[i].locality.zone == "a");
        }
        // Exact over whole cycles of the schedule; its random starting point shifts one pick at most.
        assert!((99..=101).contains(&in_a), "{in_a}");
    }

    /// `ignore_new_hosts_until_first_hc`: hosts pending their first check are left out of the counts, so
    /// they neither drag the level into panic nor take its traffic; without it they count as unhealthy.
    #[test]
    fn hosts_pending_their_first_check_are_excluded() {
        use EndpointHealth::Healthy;
        let hosts = vec![host(1, 0, Healthy), host(2, 0, Healthy), host(3, 0, Healthy)];
        for h in &hosts[1..] {
            h.failed_active_hc.store(true, Relaxed);
            h.pending_active_hc.store(true, Relaxed);
        }
        // Counted: 1 of 3 healthy is below the 50% threshold, the level panics and every host takes traffic.
        let counted = HostSet::build(hosts.clone(), |_| false, &LbSettings::default());
        assert_eq!(counted.excluded, 0);
        assert!(counted.load.panic[0]);
        assert_eq!(counted.levels[0].all.idx, [0, 1, 2]);
        // Excluded: 1 of 1, no panic, only the checked host.
        let lb = LbSettings {
            exclude_pending: true,
            ..Default::default()
        };
        let excluded = HostSet::build(hosts.clone(), |_| false, &lb);
        assert_eq!(excluded.excluded, 2);
        assert_eq!(excluded.level_counts()[0].hosts, 1);
        assert!(!excluded.load.panic[0]);
        let (per, panics) = spread(&excluded, 100);
        assert_eq!((per, panics), (vec![100], 0));
        // Their first check done (failed), they count again as unhealthy hosts.
        hosts[1].pending_active_hc.store(false, Relaxed);
        let one_back = HostSet::build(hosts, |_| false, &lb);
        assert_eq!(one_back.excluded, 1);
        assert_eq!(
            one_back.level_counts()[0],
            priority::LevelCounts {
                hosts: 2,
                healthy: 1,
                degraded: 0
            }
        );
    }

    #[test]
    fn degraded_hosts_take_traffic_only_when_healthy_ones_fall_short() {
        use EndpointHealth::{Degraded, Healthy};
        let set = HostSet::new(vec![host(1, 0, Healthy), host(2, 0, Degraded)]);
        // health 70, degraded 70, normalized 100: 70% healthy, 30% degraded.
        assert_eq!(set.load.healthy_load, [70]);
        assert_eq!(set.load.degraded_load, [30]);
        // 3 of 4 healthy: 105% capped at 100, the degraded host takes nothing.
        let all_healthy = HostSet::new(vec![
            host(1, 0, Healthy),
            host(2, 0, Healthy),
            host(3, 0, Healthy),
            host(4, 0, Degraded),
        ]);
        assert_eq!(all_healthy.load.healthy_load, [100]);
    }

    /// A STATIC cluster on ports 1..=3 lowered from `extra` (YAML flow fields), and its hosts passing their
    /// active checks.
    fn discovered(extra: &str) -> Arc<Cluster> {
        use crate::config::load::{message_from_text, Format};
        let desc = crate::config::descriptors::message("envoy.config.cluster.v3.Cluster").unwrap();
        let eps: Vec<String> = (1..=3)
            .map(|p| {
                format!(
                    "{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}}}"
                )
            })
            .collect();
        let yaml = format!(
            "{{name: svc, type: STATIC, {extra} load_assignment: {{endpoints: [{{lb_endpoints: [{}]}}]}}}}",
            eps.join(", ")
        );
        let m = message_from_text(&yaml, Format::Yaml, &desc).unwrap();
        let errs = crate::config::node::Errors::default();
        let config = {
            let n = crate::config::node::Node::root(&m, "", &errs);
            crate::config::cluster::lower(&n).unwrap()
        };
        assert!(errs.is_empty(), "{:?}", errs.take());
        let c = Cluster::new(
            config,
            &crate::stats::Store::new().scope("cluster.svc."),
            true,
            None,
        );
        for h in &c.hosts().hosts {
            h.failed_active_hc.store(false, Relaxed);
        }
        c.refresh_health();
        c
    }

    /// What EDS would give for `ports`, reusing the cluster's hosts.
    fn eds(c: &Cluster, ports: &[u16]) -> Vec<Arc<Host>> {
        let cur = c.hosts();
        ports
            .iter()
            .map(|&p| {
                let addr = SocketAddr::from(([127, 0, 0, 1], p));
                cur.hosts
                    .iter()
                    .find(|h| h.address == addr)
                    .cloned()
                    .unwrap_or_else(|| host(p, 0, EndpointHealth::Unknown))
            })
            .collect()
    }

    fn ports(c: &Cluster) -> Vec<u16> {
        let mut p: Vec<u16> = c.hosts().hosts.iter().map(|h| h.address.port()).collect();
        p.sort();
        p
    }

    const CHECKED: &str =
        "health_checks: [{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, \
                           tcp_health_check: {}}],";

    #[test]
    fn a_removed_host_stays_while_it_passes_its_health_checks() {
        let c = discovered(CHECKED);
        let kept = c.hosts().hosts[2].clone();
        // Host 2 fails its checks; EDS removes 2 and 3.
        c.hosts().hosts[1].failed_active_hc.store(true, Relaxed);
        c.set_discovered_hosts(eds(&c, &[1]));
        assert_eq!(ports(&c), [1, 3]);
        assert!(kept.pending_dynamic_removal.load(Relaxed));
        assert!(!kept.is_retired());
        // Still takes traffic.
        assert_eq!(c.hosts().healthy.len(), 2);
        // Another update without it keeps it still.
        c.set_discovered_hosts(eds(&c, &[1, 4]));
        assert_eq!(ports(&c), [1, 3, 4]);
        // Once it fails a check it leaves.
        kept.failed_active_hc.store(true, Relaxed);
        c.remove_pending_host(&kept);
        assert_eq!(ports(&c), [1, 4]);
        assert!(kept.is_retired());
    }

    #[test]
    fn a_removed_host_that_comes_back_is_no_longer_pending_removal() {
        let c = discovered(CHECKED);
        let h3 = c.hosts().hosts[2].clone();
        c.set_discovered_hosts(eds(&c, &[1, 2]));
        assert!(h3.pending_dynamic_removal.load(Relaxed));
        c.set_discovered_hosts(eds(&c, &[1, 2, 3]));
        assert!(!h3.pending_dynamic_removal.load(Relaxed));
        // The same host, its state carried over; a failed check now changes its health only.
        assert!(c.hosts().hosts.iter().any(|h| Arc::ptr_eq(h, &h3)));
        c.remove_pending_host(&h3);
        assert_eq!(ports(&c), [1, 2, 3]);
    }

    #[test]
    fn removed_hosts_leave_at_once_with_ignore_health_on_host_removal_or_without_checks() {
        for extra in [
            format!("{CHECKED} ignore_health_on_host_removal: true,"),
            String::new(),
        ] {
            let c = discovered(&extra);
            let h3 = c.hosts().hosts[2].clone();
            c.set_discovered_hosts(eds(&c, &[1, 2]));
            assert_eq!(ports(&c), [1, 2], "{extra}");
            assert!(h3.is_retired());
            assert!(!h3.pending_dynamic_removal.load(Relaxed));
        }
    }
}
