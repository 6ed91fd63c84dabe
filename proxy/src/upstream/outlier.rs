//! Outlier detection: ejecting hosts that fail, and returning them when their time is up.
//!
//! Implements `envoy.config.cluster.v3.OutlierDetection` (lowered in `config::resilience`) after Envoy's
//! `source/common/upstream/outlier_detection_impl.{h,cc}` and `docs/.../arch_overview/upstream/outlier.rst`.
//!
//! # Recording (request path)
//! [`Detector::record`] takes a host's index in the cluster's host list and an [`Outcome`], and does atomic
//! increments only. Without `split_external_local_origin_errors` every outcome is mapped to an HTTP status
//! (connect failure 503, timeout 504, final connect success 200; a bare connect success is not counted). With it,
//! local-origin outcomes feed their own consecutive counter and success-rate bucket, and HTTP statuses feed the
//! external ones. A 5xx bumps `consecutive_5xx` (and `consecutive_gateway_failure` for 502/503/504, otherwise
//! resetting it); anything else is a success and resets both. A counter reaching its threshold exactly (0
//! disables it) is a detection: the host is ejected at once, not at the next interval, unless already ejected;
//! the counter is reset whether or not the ejection is enforced.
//!
//! # Ejecting
//! - **Cap.** An ejection is allowed while `100 × (ejected + 1) / hosts ≤ max_ejection_percent` (or, with
//!   `always_eject_one_host`, when nothing is ejected). Otherwise `ejections_overflow` counts it and the host
//!   stays: counted, not enforced.
//! - **Enforcement.** An allowed ejection is enforced with the detector's `enforcing_*` percentage
//!   (`rng % 100 < percent`).
//! - **Duration.** On enforcement the host's back-off multiplier `m` grows by one while `m × base <
//!   max_ejection_time + base`; the host returns at the first interval sweep at which
//!   `min(base × m, max_ejection_time) + jitter` has passed since it was ejected, `jitter` being drawn at ejection
//!   as `rng % (max_ejection_time_jitter_ms + 1)` ms. At each sweep a host that is not ejected and that returned
//!   at least one interval ago has `m` decreased by one, so the multiplier decays while it stays healthy.
//!
//! # The interval sweep ([`Detector::evaluate`], every `interval`)
//! 1. Return hosts whose ejection time has passed (their consecutive counters are reset).
//! 2. Close each host's success-rate bucket: the counts since the previous sweep are what the detectors see.
//! 3. For external and then local-origin buckets: skip if the cluster has fewer hosts than both
//!    `success_rate_minimum_hosts` and `failure_percentage_minimum_hosts`. Among hosts not ejected and with at
//!    least one request, those with `success_rate_request_volume` requests enter success rate: when there are at
//!    least `success_rate_minimum_hosts` of them, each below `mean − stdev_factor/1000 × stdev` (population
//!    standard deviation) is detected. Those with `failure_percentage_request_volume` requests enter failure
//!    percentage: when there are at least `failure_percentage_minimum_hosts`, each with `100 − success rate ≥
//!    failure_percentage_threshold` is detected.
//! 4. Decay back-off multipliers (above).
//!
//! # Stats (`cluster.<name>.outlier_detection.`)
//! `ejections_active` (gauge), `ejections_overflow`, `ejections_enforced_total`, `ejections_detected_<type>` and
//! `ejections_enforced_<type>` for `consecutive_5xx`, `consecutive_gateway_failure`,
//! `consecutive_local_origin_failure`, `success_rate`, `local_origin_success_rate`, `failure_percentage`,
//! `local_origin_failure_percentage`; and Envoy's deprecated `ejections_total` (allowed consecutive-5xx and
//! success-rate ejections, enforced or not), `ejections_consecutive_5xx` and `ejections_success_rate`, kept
//! because Envoy still emits them.
//!
//! Differences from Envoy: one host is never ejected twice in one sweep (Envoy could reach `eject` twice for a
//! host detected by both success rate and failure percentage); extension `monitors` and
//! `detect_degraded_hosts` are refused at lowering. Each ejection and return is logged with `tracing`.

use super::lb::Rng;
use super::Host;
use crate::stats::{Counter, Gauge, Scope};
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// A cluster's `outlier_detection`, with Envoy's defaults (`DetectorConfig` in `outlier_detection_impl.h`).
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierConfig {
    pub interval: Duration,
    pub base_ejection_time: Duration,
    /// Default: the larger of 300 s and `base_ejection_time`.
    pub max_ejection_time: Duration,
    pub max_ejection_time_jitter: Duration,
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub consecutive_local_origin_failure: u32,
    pub split_external_local_origin_errors: bool,
    pub max_ejection_percent: u32,
    pub always_eject_one_host: bool,
    pub success_rate_minimum_hosts: u32,
    pub success_rate_request_volume: u32,
    /// Thousandths: 1900 is a factor of 1.9.
    pub success_rate_stdev_factor: u32,
    pub failure_percentage_threshold: u32,
    pub failure_percentage_minimum_hosts: u32,
    pub failure_percentage_request_volume: u32,
    pub enforcing_consecutive_5xx: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    pub enforcing_success_rate: u32,
    pub enforcing_local_origin_success_rate: u32,
    pub enforcing_failure_percentage: u32,
    pub enforcing_failure_percentage_local_origin: u32,
    /// Only meaningful with active health checking, which Remora does not have yet.
    pub successful_active_health_check_uneject_host: bool,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_time_jitter: Duration::ZERO,
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            consecutive_local_origin_failure: 5,
            split_external_local_origin_errors: false,
            max_ejection_percent: 10,
            always_eject_one_host: false,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            failure_percentage_threshold: 85,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            enforcing_consecutive_local_origin_failure: 100,
            enforcing_success_rate: 100,
            enforcing_local_origin_success_rate: 100,
            enforcing_failure_percentage: 0,
            enforcing_failure_percentage_local_origin: 0,
            successful_active_health_check_uneject_host: true,
        }
    }
}

/// Why a host was ejected: Envoy's `envoy.data.cluster.v3.OutlierEjectionType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EjectionType {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
    SuccessRate,
    LocalOriginSuccessRate,
    FailurePercentage,
    LocalOriginFailurePercentage,
}

impl EjectionType {
    pub const ALL: [EjectionType; 7] = [
        EjectionType::Consecutive5xx,
        EjectionType::ConsecutiveGatewayFailure,
        EjectionType::ConsecutiveLocalOriginFailure,
        EjectionType::SuccessRate,
        EjectionType::LocalOriginSuccessRate,
        EjectionType::FailurePercentage,
        EjectionType::LocalOriginFailurePercentage,
    ];

    /// The stat suffix (`ejections_enforced_<this>`).
    pub fn stat_name(self) -> &'static str {
        match self {
            EjectionType::Consecutive5xx => "consecutive_5xx",
            EjectionType::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            EjectionType::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
            EjectionType::SuccessRate => "success_rate",
            EjectionType::LocalOriginSuccessRate => "local_origin_success_rate",
            EjectionType::FailurePercentage => "failure_percentage",
            EjectionType::LocalOriginFailurePercentage => "local_origin_failure_percentage",
        }
    }

    /// Envoy's enum name, as its event log writes it.
    pub fn envoy_name(self) -> &'static str {
        match self {
            EjectionType::Consecutive5xx => "CONSECUTIVE_5XX",
            EjectionType::ConsecutiveGatewayFailure => "CONSECUTIVE_GATEWAY_FAILURE",
            EjectionType::ConsecutiveLocalOriginFailure => "CONSECUTIVE_LOCAL_ORIGIN_FAILURE",
            EjectionType::SuccessRate => "SUCCESS_RATE",
            EjectionType::LocalOriginSuccessRate => "SUCCESS_RATE_LOCAL_ORIGIN",
            EjectionType::FailurePercentage => "FAILURE_PERCENTAGE",
            EjectionType::LocalOriginFailurePercentage => "FAILURE_PERCENTAGE_LOCAL_ORIGIN",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn enforcing(self, c: &OutlierConfig) -> u32 {
        match self {
            EjectionType::Consecutive5xx => c.enforcing_consecutive_5xx,
            EjectionType::ConsecutiveGatewayFailure => c.enforcing_consecutive_gateway_failure,
            EjectionType::ConsecutiveLocalOriginFailure => c.enforcing_consecutive_local_origin_failure,
            EjectionType::SuccessRate => c.enforcing_success_rate,
            EjectionType::LocalOriginSuccessRate => c.enforcing_local_origin_success_rate,
            EjectionType::FailurePercentage => c.enforcing_failure_percentage,
            EjectionType::LocalOriginFailurePercentage => c.enforcing_failure_percentage_local_origin,
        }
    }
}

/// What happened to one request to a host: Envoy's `Outlier::Result`, or an HTTP status from the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response from the upstream with this status.
    Http(u16),
    /// The connection was established; the request goes on (not counted unless errors are split).
    ConnectSuccess,
    /// The connection was established and that completes the transaction.
    ConnectSuccessFinal,
    /// A local-origin timeout (connect or per-try).
    Timeout,
    /// A local-origin connection failure or reset.
    ConnectFailed,
    /// A non-HTTP transaction failed at the server.
    ExtOriginRequestFailed,
    /// A non-HTTP transaction succeeded.
    ExtOriginRequestSuccess,
}

/// A change the detector made, for the caller to act on (rebuild the load balancer's host list) and log.
#[derive(Clone, Debug, PartialEq)]
pub enum OutlierEvent {
    Ejected {
        host: usize,
        address: String,
        reason: EjectionType,
        /// `min(base × multiplier, max) + jitter`; the host returns at the first sweep after this.
        duration: Duration,
    },
    Returned {
        host: usize,
        address: String,
        /// How long it was out.
        ejected_for: Duration,
    },
}

/// A host's outlier state as the admin shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostOutlierStatus {
    pub ejected: bool,
    /// The earliest time the host may return (it does so at the next sweep from then).
    pub ejected_until: Option<Instant>,
    pub last_reason: Option<EjectionType>,
    pub times_ejected: u32,
    /// The success rate (percent) of the last interval, when the host had enough requests.
    pub success_rate: Option<f64>,
    pub local_origin_success_rate: Option<f64>,
}

#[derive(Debug)]
pub struct OutlierStats {
    pub ejections_active: Gauge,
    pub ejections_overflow: Counter,
    pub ejections_enforced_total: Counter,
    pub ejections_total: Counter,
    pub ejections_consecutive_5xx: Counter,
    pub ejections_success_rate: Counter,
    detected: [Counter; 7],
    enforced: [Counter; 7],
}

impl OutlierStats {
    /// `cluster` is the cluster's scope (`cluster.<name>.`).
    pub fn new(cluster: &Scope) -> Self {
        let s = cluster.scope("outlier_detection.");
        let ejections_active = s.gauge("ejections_active");
        ejections_active.set(0);
        OutlierStats {
            ejections_active,
            ejections_overflow: s.counter("ejections_overflow"),
            ejections_enforced_total: s.counter("ejections_enforced_total"),
            ejections_total: s.counter("ejections_total"),
            ejections_consecutive_5xx: s.counter("ejections_consecutive_5xx"),
            ejections_success_rate: s.counter("ejections_success_rate"),
            detected: EjectionType::ALL.map(|t| s.counter(&format!("ejections_detected_{}", t.stat_name()))),
            enforced: EjectionType::ALL.map(|t| s.counter(&format!("ejections_enforced_{}", t.stat_name()))),
        }
    }
}

const EXTERNAL: usize = 0;
const LOCAL: usize = 1;

/// Per-host state: counters written on the request path, ejection state under a lock.
#[derive(Debug)]
struct HostMonitor {
    id: u64,
    address: String,
    ejected: AtomicBool,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// `[external, local]` (total, success) since the last sweep.
    total: [AtomicU64; 2],
    success: [AtomicU64; 2],
    state: Mutex<EjectionState>,
}

#[derive(Debug, Default)]
struct EjectionState {
    times_ejected: u32,
    backoff: u32,
    jitter: Duration,
    last_ejection: Option<Instant>,
    last_unejection: Option<Instant>,
    reason: Option<EjectionType>,
    ejected_for: Duration,
    /// The closed bucket of the last interval: `[external, local]` (total, success).
    closed: [(u64, u64); 2],
    success_rate: [Option<f64>; 2],
}

impl HostMonitor {
    fn new(host: &Host) -> Self {
        HostMonitor {
            id: host.id,
            address: host.address_str.clone(),
            ejected: AtomicBool::new(false),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_local: AtomicU32::new(0),
            total: Default::default(),
            success: Default::default(),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, EjectionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Envoy's `putHttpResponseCode`: returns the consecutive detectors that just reached their threshold.
    fn put_http(&self, code: u16, c: &OutlierConfig) -> [Option<EjectionType>; 2] {
        self.total[EXTERNAL].fetch_add(1, Relaxed);
        let mut out = [None, None];
        if (500..600).contains(&code) {
            if matches!(code, 502..=504) {
                if self.consecutive_gateway.fetch_add(1, Relaxed) + 1 == c.consecutive_gateway_failure {
                    out[0] = Some(EjectionType::ConsecutiveGatewayFailure);
                }
            } else {
                self.consecutive_gateway.store(0, Relaxed);
            }
            if self.consecutive_5xx.fetch_add(1, Relaxed) + 1 == c.consecutive_5xx {
                out[1] = Some(EjectionType::Consecutive5xx);
            }
        } else {
            self.success[EXTERNAL].fetch_add(1, Relaxed);
            self.consecutive_5xx.store(0, Relaxed);
            self.consecutive_gateway.store(0, Relaxed);
        }
        out
    }

    fn local_failure(&self, c: &OutlierConfig) -> Option<EjectionType> {
        self.total[LOCAL].fetch_add(1, Relaxed);
        (self.consecutive_local.fetch_add(1, Relaxed) + 1 == c.consecutive_local_origin_failure)
            .then_some(EjectionType::ConsecutiveLocalOriginFailure)
    }

    fn local_success(&self) {
        self.total[LOCAL].fetch_add(1, Relaxed);
        self.success[LOCAL].fetch_add(1, Relaxed);
        self.consecutive_local.store(0, Relaxed);
    }

    fn reset_consecutive(&self, t: EjectionType) {
        match t {
            EjectionType::Consecutive5xx => self.consecutive_5xx.store(0, Relaxed),
            EjectionType::ConsecutiveGatewayFailure => self.consecutive_gateway.store(0, Relaxed),
            EjectionType::ConsecutiveLocalOriginFailure => self.consecutive_local.store(0, Relaxed),
            _ => {}
        }
    }
}

/// Cluster-wide state changed only under the lock.
#[derive(Debug, Default)]
struct DetectorState {
    active: usize,
    /// `[external, local]` (mean, ejection threshold) of the last sweep, when computed.
    sr: [Option<(f64, f64)>; 2],
    /// When an `ejections_overflow` was last logged, and how many have not been logged since: a host that keeps
    /// failing is detected again after every success, and the log says so at most once per `interval`.
    overflow_logged: Option<Instant>,
    overflow_unlogged: u64,
}

/// The outlier detector of one cluster.
#[derive(Debug)]
pub struct Detector {
    /// The cluster's `outlier_detection`.
    configured: OutlierConfig,
    /// What is in force: `configured` with the runtime's `outlier_detection.*` overrides
    /// ([`Detector::apply_runtime`]).
    config: ArcSwap<OutlierConfig>,
    stats: OutlierStats,
    hosts: ArcSwap<Vec<Arc<HostMonitor>>>,
    state: Mutex<DetectorState>,
}

impl Detector {
    pub fn new(config: OutlierConfig, stats: OutlierStats, hosts: &[Arc<Host>]) -> Self {
        let d = Detector {
            config: ArcSwap::from_pointee(config.clone()),
            configured: config,
            stats,
            hosts: ArcSwap::from_pointee(Vec::new()),
            state: Mutex::default(),
        };
        d.set_hosts(hosts);
        d
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<OutlierConfig> {
        self.config.load_full()
    }

    /// Take the runtime's overrides of the detector's settings (`outlier_detection.consecutive_5xx`, ...,
    /// `configuration/upstream/cluster_manager/cluster_runtime.rst`, "Outlier detection"), or go back to the
    /// configured ones. Envoy reads these keys where it uses them; Remora takes them when a runtime snapshot is
    /// published.
    pub fn apply_runtime(&self, snap: &crate::layered_runtime::Snapshot) {
        let base = &self.configured;
        if snap.is_empty() {
            if **self.config.load() != *base {
                self.config.store(Arc::new(base.clone()));
            }
            return;
        }
        let u = |key: &str, v: u32| -> u32 {
            let got = snap.u64(&format!("outlier_detection.{key}"), u64::from(v));
            u32::try_from(got).unwrap_or(u32::MAX)
        };
        let ms = |key: &str, v: Duration| -> Duration {
            let ms = u64::try_from(v.as_millis()).unwrap_or(u64::MAX);
            Duration::from_millis(snap.u64(&format!("outlier_detection.{key}"), ms))
        };
        let c = OutlierConfig {
            interval: ms("interval_ms", base.interval),
            base_ejection_time: ms("base_ejection_time_ms", base.base_ejection_time),
            max_ejection_time: ms("max_ejection_time_ms", base.max_ejection_time),
            consecutive_5xx: u("consecutive_5xx", base.consecutive_5xx),
            consecutive_gateway_failure: u("consecutive_gateway_failure", base.consecutive_gateway_failure),
            consecutive_local_origin_failure: u(
                "consecutive_local_origin_failure",
                base.consecutive_local_origin_failure,
            ),
            max_ejection_percent: u("max_ejection_percent", base.max_ejection_percent),
            success_rate_minimum_hosts: u("success_rate_minimum_hosts", base.success_rate_minimum_hosts),
            success_rate_request_volume: u("success_rate_request_volume", base.success_rate_request_volume),
            success_rate_stdev_factor: u("success_rate_stdev_factor", base.success_rate_stdev_factor),
            failure_percentage_threshold: u(
                "failure_percentage_threshold",
                base.failure_percentage_threshold,
            ),
            failure_percentage_minimum_hosts: u(
                "failure_percentage_minimum_hosts",
                base.failure_percentage_minimum_hosts,
            ),
            failure_percentage_request_volume: u(
                "failure_percentage_request_volume",
                base.failure_percentage_request_volume,
            ),
            enforcing_consecutive_5xx: u("enforcing_consecutive_5xx", base.enforcing_consecutive_5xx),
            enforcing_consecutive_gateway_failure: u(
                "enforcing_consecutive_gateway_failure",
                base.enforcing_consecutive_gateway_failure,
            ),
            enforcing_consecutive_local_origin_failure: u(
                "enforcing_consecutive_local_origin_failure",
                base.enforcing_consecutive_local_origin_failure,
            ),
            enforcing_success_rate: u("enforcing_success_rate", base.enforcing_success_rate),
            enforcing_local_origin_success_rate: u(
                "enforcing_local_origin_success_rate",
                base.enforcing_local_origin_success_rate,
            ),
            enforcing_failure_percentage: u(
                "enforcing_failure_percentage",
                base.enforcing_failure_percentage,
            ),
            enforcing_failure_percentage_local_origin: u(
                "enforcing_failure_percentage_local_origin",
                base.enforcing_failure_percentage_local_origin,
            ),
            ..base.clone()
        };
        if **self.config.load() != c {
            self.config.store(Arc::new(c));
        }
    }

    fn lock(&self) -> MutexGuard<'_, DetectorState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follow a membership change: hosts are matched by id and keep their state; indexes are those of `hosts`.
    pub fn set_hosts(&self, hosts: &[Arc<Host>]) {
        let mut st = self.lock();
        let old = self.hosts.load_full();
        let monitors: Vec<Arc<HostMonitor>> = hosts
            .iter()
            .map(|h| match old.iter().find(|m| m.id == h.id) {
                Some(m) => m.clone(),
                None => Arc::new(HostMonitor::new(h)),
            })
            .collect();
        for m in old.iter() {
            if m.ejected.load(Relaxed) && !monitors.iter().any(|n| n.id == m.id) {
                st.active = st.active.saturating_sub(1);
                self.stats.ejections_active.dec();
            }
        }
        self.hosts.store(Arc::new(monitors));
    }

    /// Whether the host at `index` is ejected (load balancers skip it).
    #[inline]
    pub fn is_ejected(&self, index: usize) -> bool {
        self.hosts
            .load()
            .get(index)
            .is_some_and(|m| m.ejected.load(Relaxed))
    }

    /// The number of hosts ejected now.
    pub fn ejected_count(&self) -> usize {
        self.lock().active
    }

    /// For `/clusters`.
    pub fn host_status(&self, index: usize) -> Option<HostOutlierStatus> {
        let hosts = self.hosts.load();
        let m = hosts.get(index)?;
        let ejected = m.ejected.load(Relaxed);
        let s = m.state();
        Some(HostOutlierStatus {
            ejected,
            ejected_until: if ejected {
                s.last_ejection.map(|t| t + s.ejected_for)
            } else {
                None
            },
            last_reason: s.reason,
            times_ejected: s.times_ejected,
            success_rate: s.success_rate[EXTERNAL],
            local_origin_success_rate: s.success_rate[LOCAL],
        })
    }

    /// The cluster's (mean, ejection threshold) success rate of the last sweep; `local` for local-origin.
    pub fn success_rate_threshold(&self, local: bool) -> Option<(f64, f64)> {
        self.lock().sr[usize::from(local)]
    }

    /// Record one outcome for the host at `index`. Atomic increments only, unless a consecutive-failure
    /// threshold is reached: then the host is considered for ejection at once (`now` and `rng` are used only
    /// then).
    pub fn record(
        &self,
        index: usize,
        outcome: Outcome,
        now: Instant,
        rng: &mut Rng,
    ) -> Option<OutlierEvent> {
        let hosts = self.hosts.load();
        let m = hosts.get(index)?;
        let c = &**self.config.load();
        let detected = if c.split_external_local_origin_errors {
            match outcome {
                Outcome::Http(code) => m.put_http(code, c),
                Outcome::ConnectSuccess | Outcome::ConnectSuccessFinal => {
                    m.local_success();
                    [None, None]
                }
                Outcome::Timeout | Outcome::ConnectFailed => [m.local_failure(c), None],
                Outcome::ExtOriginRequestFailed => m.put_http(503, c),
                Outcome::ExtOriginRequestSuccess => {
                    let d = m.put_http(200, c);
                    m.local_success();
                    d
                }
            }
        } else {
            let code = match outcome {
                Outcome::Http(code) => code,
                Outcome::ConnectSuccess => return None,
                Outcome::ConnectSuccessFinal | Outcome::ExtOriginRequestSuccess => 200,
                Outcome::Timeout => 504,
                Outcome::ConnectFailed => 503,
                Outcome::ExtOriginRequestFailed => 500,
            };
            m.put_http(code, c)
        };
        let mut event = None;
        for t in detected.into_iter().flatten() {
            if let Some(e) = self.on_consecutive(&hosts, index, t, now, rng) {
                event = Some(e);
            }
        }
        event
    }

    /// Envoy's `onConsecutiveErrorWorker`.
    fn on_consecutive(
        &self,
        hosts: &[Arc<HostMonitor>],
        index: usize,
        t: EjectionType,
        now: Instant,
        rng: &mut Rng,
    ) -> Option<OutlierEvent> {
        let mut st = self.lock();
        let m = &hosts[index];
        // The membership may have changed since the snapshot was loaded.
        if !self.hosts.load().iter().any(|h| h.id == m.id) || m.ejected.load(Relaxed) {
            return None;
        }
        self.stats.detected[t.index()].inc();
        let event = self.eject(&mut st, hosts.len(), index, m, t, now, rng);
        if t == EjectionType::Consecutive5xx {
            self.stats.ejections_consecutive_5xx.inc();
        }
        m.reset_consecutive(t);
        event
    }

    /// Envoy's `ejectHost`: the cap, enforcement, and the ejection itself.
    #[allow(clippy::too_many_arguments)]
    fn eject(
        &self,
        st: &mut DetectorState,
        total_hosts: usize,
        index: usize,
        m: &HostMonitor,
        t: EjectionType,
        now: Instant,
        rng: &mut Rng,
    ) -> Option<OutlierEvent> {
        let c = &**self.config.load();
        let max_percent = f64::from(c.max_ejection_percent.min(100));
        let ejected_percent = 100.0 * (st.active + 1) as f64 / total_hosts.max(1) as f64;
        let allowed = ejected_percent <= max_percent || (c.always_eject_one_host && st.active == 0);
        if !allowed {
            self.stats.ejections_overflow.inc();
            if st
                .overflow_logged
                .is_some_and(|at| now.saturating_duration_since(at) < c.interval)
            {
                st.overflow_unlogged += 1;
            } else {
                tracing::info!(
                    host = %m.address, reason = t.envoy_name(), ejected = st.active,
                    not_logged_since_last = st.overflow_unlogged,
                    "outlier detected, not ejected: max_ejection_percent reached (ejections_overflow)"
                );
                st.overflow_logged = Some(now);
                st.overflow_unlogged = 0;
            }
            return None;
        }
        if matches!(t, EjectionType::Consecutive5xx | EjectionType::SuccessRate) {
            self.stats.ejections_total.inc();
        }
        if rng.next_u64() % 100 >= u64::from(t.enforcing(c)) {
            tracing::info!(host = %m.address, reason = t.envoy_name(), "outlier detected, ejection not enforced");
            return None;
        }
        st.active += 1;
        self.stats.ejections_active.inc();
        self.stats.ejections_enforced_total.inc();
        self.stats.enforced[t.index()].inc();
        let jitter_ms = c.max_ejection_time_jitter.as_millis() as u64;
        let jitter = Duration::from_millis(rng.next_u64() % (jitter_ms + 1));
        let mut s = m.state();
        s.times_ejected += 1;
        s.last_ejection = Some(now);
        s.reason = Some(t);
        s.jitter = jitter;
        let base = c.base_ejection_time;
        if base * s.backoff < c.max_ejection_time + base {
            s.backoff += 1;
        }
        let duration = (base * s.backoff).min(c.max_ejection_time) + jitter;
        s.ejected_for = duration;
        drop(s);
        m.ejected.store(true, Relaxed);
        tracing::warn!(
            host = %m.address, reason = t.envoy_name(), duration_ms = duration.as_millis() as u64,
            "outlier ejected"
        );
        Some(OutlierEvent::Ejected {
            host: index,
            address: m.address.clone(),
            reason: t,
            duration,
        })
    }

    /// The interval sweep (Envoy's `onIntervalTimer`); call it every `config().interval`.
    pub fn evaluate(&self, now: Instant, rng: &mut Rng) -> Vec<OutlierEvent> {
        let mut events = Vec::new();
        let mut st = self.lock();
        let hosts = self.hosts.load_full();
        for (i, m) in hosts.iter().enumerate() {
            let mut s = m.state();
            if m.ejected.load(Relaxed) {
                let since = s.last_ejection.map(|t| now.saturating_duration_since(t));
                if since.is_some_and(|d| d >= s.ejected_for) {
                    st.active = st.active.saturating_sub(1);
                    self.stats.ejections_active.dec();
                    m.ejected.store(false, Relaxed);
                    m.consecutive_5xx.store(0, Relaxed);
                    m.consecutive_gateway.store(0, Relaxed);
                    m.consecutive_local.store(0, Relaxed);
                    s.last_unejection = Some(now);
                    let ejected_for = since.unwrap_or_default();
                    tracing::warn!(
                        host = %m.address, reason = s.reason.map(EjectionType::envoy_name),
                        ejected_ms = ejected_for.as_millis() as u64, "outlier returned to service"
                    );
                    events.push(OutlierEvent::Returned {
                        host: i,
                        address: m.address.clone(),
                        ejected_for,
                    });
                }
            }
            for o in [EXTERNAL, LOCAL] {
                let total = m.total[o].swap(0, Relaxed);
                let success = m.success[o].swap(0, Relaxed).min(total);
                s.closed[o] = (total, success);
            }
            s.success_rate = [None, None];
        }
        for o in [EXTERNAL, LOCAL] {
            self.process_rates(&mut st, &hosts, o, now, rng, &mut events);
        }
        for m in hosts.iter() {
            if m.ejected.load(Relaxed) {
                continue;
            }
            let mut s = m.state();
            if s.last_unejection
                .is_some_and(|t| now.saturating_duration_since(t) >= self.config.load().interval)
            {
                s.backoff = s.backoff.saturating_sub(1);
            }
        }
        events
    }

    /// Envoy's `processSuccessRateEjections` for one origin.
    fn process_rates(
        &self,
        st: &mut DetectorState,
        hosts: &[Arc<HostMonitor>],
        origin: usize,
        now: Instant,
        rng: &mut Rng,
        events: &mut Vec<OutlierEvent>,
    ) {
        let c = &**self.config.load();
        st.sr[origin] = None;
        let n = hosts.len();
        if n < c.success_rate_minimum_hosts as usize && n < c.failure_percentage_minimum_hosts as usize {
            return;
        }
        let sr_volume = u64::from(c.success_rate_request_volume);
        let fp_volume = u64::from(c.failure_percentage_request_volume);
        let mut sr_hosts = Vec::new();
        let mut fp_hosts = Vec::new();
        for (i, m) in hosts.iter().enumerate() {
            if m.ejected.load(Relaxed) {
                continue;
            }
            let mut s = m.state();
            let (total, success) = s.closed[origin];
            if total == 0 {
                continue;
            }
            let rate = success as f64 * 100.0 / total as f64;
            if total >= sr_volume.min(fp_volume) {
                s.success_rate[origin] = Some(rate);
            }
            if total >= sr_volume {
                sr_hosts.push((i, rate));
            }
            if total >= fp_volume {
                fp_hosts.push((i, rate));
            }
        }
        let (sr_type, fp_type) = if origin == EXTERNAL {
            (EjectionType::SuccessRate, EjectionType::FailurePercentage)
        } else {
            (
                EjectionType::LocalOriginSuccessRate,
                EjectionType::LocalOriginFailurePercentage,
            )
        };
        if !sr_hosts.is_empty() && sr_hosts.len() >= c.success_rate_minimum_hosts as usize {
            let rates: Vec<f64> = sr_hosts.iter().map(|h| h.1).collect();
            let (mean, threshold) =
                success_rate_threshold(&rates, f64::from(c.success_rate_stdev_factor) / 1000.0);
            st.sr[origin] = Some((mean, threshold));
            for &(i, rate) in &sr_hosts {
                if rate < threshold {
                    self.stats.ejections_success_rate.inc();
                    self.stats.detected[sr_type.index()].inc();
                    if !hosts[i].ejected.load(Relaxed) {
                        events.extend(self.eject(st, n, i, &hosts[i], sr_type, now, rng));
                    }
                }
            }
        }
        if !fp_hosts.is_empty() && fp_hosts.len() >= c.failure_percentage_minimum_hosts as usize {
            let threshold = f64::from(c.failure_percentage_threshold);
            for &(i, rate) in &fp_hosts {
                if 100.0 - rate >= threshold {
                    self.stats.detected[fp_type.index()].inc();
                    if !hosts[i].ejected.load(Relaxed) {
                        events.extend(self.eject(st, n, i, &hosts[i], fp_type, now, rng));
                    }
                }
            }
        }
    }
}

/// Envoy's `successRateEjectionThreshold`: (mean, mean − factor × population standard deviation).
pub fn success_rate_threshold(rates: &[f64], stdev_factor: f64) -> (f64, f64) {
    let n = rates.len().max(1) as f64;
    let mean = rates.iter().sum::<f64>() / n;
    let variance = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
    (mean, mean - stdev_factor * variance.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Store;
    use crate::upstream::{EndpointConfig, EndpointHealth, Locality};

    fn hosts(n: usize) -> Vec<Arc<Host>> {
        (0..n)
            .map(|i| {
                Host::new(&EndpointConfig {
                    address: format!("10.0.0.{}:80", i + 1).parse().unwrap(),
                    hostname: String::new(),
                    weight: 1,
                    priority: 0,
                    locality: Locality::default(),
                    locality_weight: 0,
                    health: EndpointHealth::Unknown,
                    health_check_port: None,
                    health_check_disabled: false,
                    health_check_hostname: String::new(),
                })
            })
            .collect()
    }

    fn detector(config: OutlierConfig, n: usize) -> (Detector, Arc<Store>) {
        let store = Store::new();
        let stats = OutlierStats::new(&store.scope("cluster.c."));
        (Detector::new(config, stats, &hosts(n)), store)
    }

    fn stat(s: &Store, name: &str) -> u64 {
        s.counter(&format!("cluster.c.outlier_detection.{name}")).value()
    }

    fn active(s: &Store) -> i64 {
        s.gauge("cluster.c.outlier_detection.ejections_active").value()
    }

    fn fail(
        d: &Detector,
        host: usize,
        code: u16,
        times: usize,
        now: Instant,
        rng: &mut Rng,
    ) -> Vec<OutlierEvent> {
        (0..times)
            .filter_map(|_| d.record(host, Outcome::Http(code), now, rng))
            .collect()
    }

    #[test]
    fn worked_success_rate_example() {
        // The example in Envoy's successRateEjectionThreshold: {50, 100, 100, 100, 100} and factor 1.9.
        let (mean, threshold) = success_rate_threshold(&[50.0, 100.0, 100.0, 100.0, 100.0], 1.9);
        assert_eq!(mean, 90.0);
        assert!((threshold - 52.0).abs() < 1e-9, "{threshold}");
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_5xx_ejects_at_once_and_returns_after_base_time() {
        let cfg = OutlierConfig {
            max_ejection_percent: 100,
            ..Default::default()
        };
        let (d, s) = detector(cfg, 2);
        let mut rng = Rng::seeded(1);
        let t0 = Instant::now();
        assert!(fail(&d, 0, 500, 4, t0, &mut rng).is_empty());
        // A success resets the run.
        assert!(d.record(0, Outcome::Http(200), t0, &mut rng).is_none());
        assert!(fail(&d, 0, 500, 4, t0, &mut rng).is_empty());
        let ev = fail(&d, 0, 500, 1, t0, &mut rng);
        assert_eq!(
            ev,
            [OutlierEvent::Ejected {
                host: 0,
                address: "10.0.0.1:80".into(),
                reason: EjectionType::Consecutive5xx,
                duration: Duration::from_secs(30),
            }]
        );
        assert!(d.is_ejected(0) && !d.is_ejected(1));
        assert_eq!(stat(&s, "ejections_detected_consecutive_5xx"), 1);
        assert_eq!(stat(&s, "ejections_enforced_consecutive_5xx"), 1);
        assert_eq!(stat(&s, "ejections_enforced_total"), 1);
        assert_eq!(stat(&s, "ejections_total"), 1);
        assert_eq!(active(&s), 1);
        let st = d.host_status(0).unwrap();
        assert_eq!(st.ejected_until, Some(t0 + Duration::from_secs(30)));
        assert_eq!(st.times_ejected, 1);
        // Sweeps before 30 s keep it out; the first at or after 30 s returns it.
        assert!(d.evaluate(t0 + Duration::from_secs(20), &mut rng).is_empty());
        let ev = d.evaluate(t0 + Duration::from_secs(30), &mut rng);
        assert!(matches!(ev[..], [OutlierEvent::Returned { host: 0, .. }]));
        assert!(!d.is_ejected(0));
        assert_eq!(active(&s), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn runtime_overrides_consecutive_5xx_and_its_enforcement() {
        use crate::layered_runtime::{LayerConfig, LayerKind, Runtime, RuntimeConfig};
        let cfg = OutlierConfig {
            max_ejection_percent: 100,
            ..Default::default()
        };
        let (d, s) = detector(cfg, 2);
        let rt = Runtime::new(
            RuntimeConfig {
                layers: vec![LayerConfig {
                    name: "admin".into(),
                    kind: LayerKind::Admin,
                }],
            },
            "",
            &Store::new(),
        );
        let mut rng = Rng::seeded(1);
        let t0 = Instant::now();
        rt.merge_admin(&[
            ("outlier_detection.consecutive_5xx".into(), "2".into()),
            ("outlier_detection.enforcing_consecutive_5xx".into(), "0".into()),
            ("outlier_detection.interval_ms".into(), "250".into()),
        ])
        .unwrap();
        d.apply_runtime(&rt.snapshot());
        assert_eq!(d.config().interval, Duration::from_millis(250));
        // Detected after 2 (not 5), but not enforced.
        assert!(fail(&d, 0, 500, 2, t0, &mut rng).is_empty());
        assert_eq!(stat(&s, "ejections_detected_consecutive_5xx"), 1);
        assert_eq!(stat(&s, "ejections_enforced_consecutive_5xx"), 0);
        assert!(!d.is_ejected(0));
        // Enforced once the override is gone; the threshold is 2 still.
        rt.merge_admin(&[(
            "outlier_detection.enforcing_consecutive_5xx".into(),
            String::new(),
        )])
        .unwrap();
        d.apply_runtime(&rt.snapshot());
        assert_eq!(fail(&d, 1, 500, 2, t0, &mut rng).len(), 1);
        assert!(d.is_ejected(1));
        // Without overrides, the configured settings are back.
        rt.merge_admin(&[
            ("outlier_detection.consecutive_5xx".into(), String::new()),
            ("outlier_detection.interval_ms".into(), String::new()),
        ])
        .unwrap();
        d.apply_runtime(&rt.snapshot());
        assert_eq!(*d.config(), d.configured);
    }

    #[tokio::test(start_paused = true)]
    async fn gateway_failures_are_detected_but_not_enforced_by_default() {
        let cfg = OutlierConfig {
            max_ejection_percent: 100,
            consecutive_5xx: 0,
            ..Default::default()
        };
        let (d, s) = detector(cfg, 2);
        let mut rng = Rng::seeded(1);
        let now = Instant::now();
        // A 500 between gateway errors resets the gateway run.
        fail(&d, 0, 503, 4, now, &mut rng);
        fail(&d, 0, 500, 1, now, &mut rng);
        fail(&d, 0, 502, 4, now, &mut rng);
        assert_eq!(stat(&s, "ejections_detected_consecutive_gateway_failure"), 0);
        assert!(fail(&d, 0, 504, 1, now, &mut rng).is_empty());
        assert_eq!(stat(&s, "ejections_detected_consecutive_gateway_failure"), 1);
        assert_eq!(stat(&s, "ejections_enforced_consecutive_gateway_failure"), 0);
        assert!(!d.is_ejected(0));
        // consecutive_5xx: 0 disables that detector.
        assert_eq!(stat(&s, "ejections_detected_consecutive_5xx"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn local_origin_failures_split_or_mapped() {
        let split = OutlierConfig {
            split_external_local_origin_errors: true,
            max_ejection_percent: 100,
            ..Default::default()
        };
        let (d, s) = detector(split, 2);
        let mut rng = Rng::seeded(3);
        let now = Instant::now();
        for _ in 0..4 {
            assert!(d.record(0, Outcome::ConnectFailed, now, &mut rng).is_none());
        }
        // Split: HTTP 5xx do not touch the local-origin run, and connect failures are not 5xx.
        assert!(d.record(0, Outcome::Http(200), now, &mut rng).is_none());
        let ev = d.record(0, Outcome::Timeout, now, &mut rng);
        assert!(matches!(
            ev,
            Some(OutlierEvent::Ejected {
                reason: EjectionType::ConsecutiveLocalOriginFailure,
                ..
            })
        ));
        assert_eq!(stat(&s, "ejections_enforced_consecutive_local_origin_failure"), 1);
        assert_eq!(stat(&s, "ejections_detected_consecutive_5xx"), 0);

        // Not split: connect failures count as 503s toward consecutive_5xx.
        let (d, s) = detector(
            OutlierConfig {
                max_ejection_percent: 100,
                ..Default::default()
            },
            2,
        );
        for _ in 0..4 {
            d.record(1, Outcome::ConnectFailed, now, &mut rng);
        }
        // A bare connect success is not counted, so it does not reset the run.
        d.record(1, Outcome::ConnectSuccess, now, &mut rng);
        assert!(d.record(1, Outcome::Timeout, now, &mut rng).is_some());
        assert_eq!(stat(&s, "ejections_enforced_consecutive_5xx"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_multiplies_caps_and_decays() {
        let cfg = OutlierConfig {
            max_ejection_percent: 100,
            consecutive_5xx: 1,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            ..Default::default()
        };
        let (d, _s) = detector(cfg, 1);
        let mut rng = Rng::seeded(9);
        let mut now = Instant::now();
        let mut durations = Vec::new();
        for _ in 0..4 {
            match fail(&d, 0, 500, 1, now, &mut rng).pop() {
                Some(OutlierEvent::Ejected { duration, .. }) => durations.push(duration.as_secs()),
                e => panic!("{e:?}"),
            }
            // Sweep until it returns; returning immediately means no decay sweep in between.
            loop {
                now += Duration::from_secs(10);
                if !d.evaluate(now, &mut rng).is_empty() {
                    break;
                }
            }
        }
        // 10, 20, then capped at 25 (the multiplier stops growing once base × m ≥ max + base).
        assert_eq!(durations, [10, 20, 25, 25]);
        // Healthy sweeps decay the multiplier by one per interval, starting one interval after the return.
        for _ in 0..4 {
            now += Duration::from_secs(10);
            d.evaluate(now, &mut rng);
        }
        match fail(&d, 0, 500, 1, now, &mut rng).pop() {
            // The multiplier was 4; four decays leave 0, and the ejection makes it 1.
            Some(OutlierEvent::Ejected { duration, .. }) => assert_eq!(duration.as_secs(), 10),
            e => panic!("{e:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_is_added_to_the_ejection_time() {
        let cfg = OutlierConfig {
            max_ejection_percent: 100,
            consecutive_5xx: 1,
            max_ejection_time_jitter: Duration::from_millis(500),
            ..Default::default()
        };
        let (d, _s) = detector(cfg, 1);
        let mut rng = Rng::seeded(42);
        let mut expect = rng.clone();
        let _enforce = expect.next_u64();
        let jitter = expect.next_u64() % 501;
        let now = Instant::now();
        match fail(&d, 0, 500, 1, now, &mut rng).pop() {
            Some(OutlierEvent::Ejected { duration, .. }) => {
                assert_eq!(duration, Duration::from_secs(30) + Duration::from_millis(jitter))
            }
            e => panic!("{e:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_overflow_is_counted_not_enforced() {
        // Ten hosts, 20 %: two may be out; the third is counted in ejections_overflow.
        let cfg = OutlierConfig {
            max_ejection_percent: 20,
            consecutive_5xx: 1,
            ..Default::default()
        };
        let (d, s) = detector(cfg, 10);
        let mut rng = Rng::seeded(5);
        let now = Instant::now();
        for h in 0..3 {
            fail(&d, h, 500, 1, now, &mut rng);
        }
        assert!(d.is_ejected(0) && d.is_ejected(1) && !d.is_ejected(2));
        assert_eq!(stat(&s, "ejections_overflow"), 1);
        assert_eq!(stat(&s, "ejections_detected_consecutive_5xx"), 3);
        assert_eq!(active(&s), 2);

        // The default 10 % of two hosts allows none, unless always_eject_one_host.
        let (d, s) = detector(
            OutlierConfig {
                consecutive_5xx: 1,
                ..Default::default()
            },
            2,
        );
        fail(&d, 0, 500, 1, now, &mut rng);
        assert!(!d.is_ejected(0));
        assert_eq!(stat(&s, "ejections_overflow"), 1);
        let (d, _s) = detector(
            OutlierConfig {
                consecutive_5xx: 1,
                always_eject_one_host: true,
                ..Default::default()
            },
            2,
        );
        fail(&d, 0, 500, 1, now, &mut rng);
        fail(&d, 1, 500, 1, now, &mut rng);
        assert!(d.is_ejected(0) && !d.is_ejected(1));
    }

    #[tokio::test(start_paused = true)]
    async fn enforcing_percentage_uses_the_rng() {
        let cfg = OutlierConfig {
            max_ejection_percent: 100,
            consecutive_5xx: 1,
            enforcing_consecutive_5xx: 30,
            ..Default::default()
        };
        let (d, s) = detector(cfg, 1);
        let mut rng = Rng::seeded(77);
        let mut probe = rng.clone();
        let now = Instant::now();
        let mut enforced = 0;
        for _ in 0..1000 {
            // Predict the draw: enforcement consumes one value, an enforced ejection a second (jitter).
            let draw = probe.next_u64() % 100;
            let ev = d.record(0, Outcome::Http(500), now, &mut rng);
            assert_eq!(ev.is_some(), draw < 30);
            if ev.is_some() {
                probe.next_u64();
                enforced += 1;
                d.evaluate(now + Duration::from_secs(3600), &mut rng);
                // evaluate draws nothing here: no detector ran.
            }
        }
        assert_eq!(stat(&s, "ejections_detected_consecutive_5xx"), 1000);
        assert_eq!(stat(&s, "ejections_enforced_consecutive_5xx"), enforced);
        assert!((200..400).contains(&enforced), "{enforced}");
    }

    /// Record per-host (total, failures) then sweep.
    fn traffic(d: &Detector, per_host: &[(u32, u32)], now: Instant, rng: &mut Rng) -> Vec<OutlierEvent> {
        for (h, &(total, failures)) in per_host.iter().enumerate() {
            // 500 is not a gateway error, and the tests disable consecutive_5xx.
            for k in 0..total {
                let code = if k < failures { 500 } else { 200 };
                d.record(h, Outcome::Http(code), now, rng);
            }
        }
        d.evaluate(now, rng)
    }

    #[tokio::test(start_paused = true)]
    async fn success_rate_ejects_below_mean_minus_stdevs() {
        let cfg = OutlierConfig {
            consecutive_5xx: 0,
            max_ejection_percent: 100,
            ..Default::default()
        };
        let (d, s) = detector(cfg, 6);
        let mut rng = Rng::seeded(11);
        let now = Instant::now();
        // Success rates 50, 100 ×4 with 100 requests each; host 5 has too few requests to count.
        let ev = traffic(
            &d,
            &[(100, 50), (100, 0), (100, 0), (100, 0), (100, 0), (99, 99)],
            now,
            &mut rng,
        );
        assert!(
            matches!(
                ev[..],
                [OutlierEvent::Ejected {
                    host: 0,
                    reason: EjectionType::SuccessRate,
                    ..
                }]
            ),
            "{ev:?}"
        );
        let (mean, threshold) = d.success_rate_threshold(false).unwrap();
        assert_eq!(mean, 90.0);
        assert!((threshold - 52.0).abs() < 1e-9);
        assert_eq!(d.host_status(1).unwrap().success_rate, Some(100.0));
        // 99 requests is under success_rate_request_volume but over failure_percentage_request_volume (50).
        assert_eq!(d.host_status(5).unwrap().success_rate, Some(0.0));
        assert_eq!(stat(&s, "ejections_enforced_success_rate"), 1);
        assert_eq!(stat(&s, "ejections_success_rate"), 1);
        // Failure percentage detected host 5 (100 % failures) but its enforcement defaults to 0.
        assert_eq!(stat(&s, "ejections_detected_failure_percentage"), 1);
        assert_eq!(stat(&s, "ejections_enforced_failure_percentage"), 0);

        // Fewer than success_rate_minimum_hosts with volume: no success-rate ejection.
        let (d, _s) = detector(
            OutlierConfig {
                consecutive_5xx: 0,
                max_ejection_percent: 100,
                ..Default::default()
            },
            4,
        );
        assert!(traffic(&d, &[(100, 50), (100, 0), (100, 0), (100, 0)], now, &mut rng).is_empty());
        assert!(d.success_rate_threshold(false).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn failure_percentage_and_local_origin_rates() {
        let cfg = OutlierConfig {
            consecutive_5xx: 0,
            consecutive_local_origin_failure: 0,
            max_ejection_percent: 100,
            enforcing_failure_percentage: 100,
            enforcing_failure_percentage_local_origin: 100,
            success_rate_minimum_hosts: 100,
            failure_percentage_minimum_hosts: 2,
            split_external_local_origin_errors: true,
            ..Default::default()
        };
        let (d, s) = detector(cfg, 3);
        let mut rng = Rng::seeded(13);
        let now = Instant::now();
        // External: host 0 at 85 % failures ejected (≥ threshold); host 1 at 84 % not.
        let ev = traffic(&d, &[(100, 85), (100, 84), (100, 0)], now, &mut rng);
        assert!(
            matches!(
                ev[..],
                [OutlierEvent::Ejected {
                    host: 0,
                    reason: EjectionType::FailurePercentage,
                    ..
                }]
            ),
            "{ev:?}"
        );
        // Local origin: host 2 fails to connect 60 times of 60.
        for _ in 0..60 {
            d.record(2, Outcome::ConnectFailed, now, &mut rng);
            d.record(1, Outcome::ConnectSuccess, now, &mut rng);
        }
        for _ in 0..60 {
            d.record(0, Outcome::ConnectSuccess, now, &mut rng);
        }
        let ev = d.evaluate(now + Duration::from_secs(10), &mut rng);
        assert!(
            ev.iter().any(|e| matches!(
                e,
                OutlierEvent::Ejected {
                    host: 2,
                    reason: EjectionType::LocalOriginFailurePercentage,
                    ..
                }
            )),
            "{ev:?}"
        );
        assert_eq!(stat(&s, "ejections_enforced_local_origin_failure_percentage"), 1);
        assert_eq!(d.host_status(2).unwrap().local_origin_success_rate, Some(0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn membership_changes_keep_state_by_host() {
        let cfg = OutlierConfig {
            max_ejection_percent: 100,
            consecutive_5xx: 1,
            ..Default::default()
        };
        let hs = hosts(3);
        let store = Store::new();
        let d = Detector::new(cfg, OutlierStats::new(&store.scope("cluster.c.")), &hs);
        let mut rng = Rng::seeded(2);
        let now = Instant::now();
        fail(&d, 1, 500, 1, now, &mut rng);
        fail(&d, 2, 500, 1, now, &mut rng);
        assert_eq!(active(&store), 2);
        // Host 0 leaves: host 1 is now index 0 and still ejected; then the ejected host 2 leaves.
        d.set_hosts(&hs[1..]);
        assert!(d.is_ejected(0) && d.is_ejected(1));
        d.set_hosts(&hs[1..2]);
        assert_eq!(active(&store), 1);
        assert_eq!(d.ejected_count(), 1);
    }
}
