//! Circuit breakers: a cluster's resource limits per routing priority, and the retry budget.
//!
//! Implements `envoy.config.cluster.v3.CircuitBreakers` (lowered in `config::resilience`) after Envoy's
//! `source/common/upstream/resource_manager_impl.h` and `ClusterInfoImpl::ResourceManagers::load` /
//! `getRetryBudgetParams` in `upstream_impl.cc`, with the stats of `docs/.../cluster_stats.rst`
//! (circuit breakers section).
//!
//! # The algorithm
//!
//! A cluster has one [`Resources`] per routing priority (`DEFAULT`, `HIGH`). Each resource (connections,
//! pending requests, requests, retries, connection pools) is an atomic count with a maximum:
//! - Admission is a compare-and-swap loop (`current < max` then `current + 1`), so unlike Envoy's
//!   check-then-increment it never overshoots the maximum. A [`Permit`] releases its unit when dropped.
//! - Defaults are Envoy's: 1024 connections, 1024 pending requests, 1024 requests, 3 retries, unlimited pools.
//!   The first `thresholds` entry for a priority wins; a priority without one gets the defaults.
//! - **Retry budget.** When `retry_budget` is set (even empty) it replaces `max_retries`: the retries that may
//!   be active at once are `max(⌊budget_percent / 100 × (active requests + pending requests)⌋,
//!   min_retry_concurrency)`, computed at each admission from the live counts (defaults 20 % and 3). As in
//!   Envoy, `remaining_retries` then reads 0, since the limit moves with other resources.
//! - `per_host_thresholds.max_connections` limits connections to each host ([`CircuitBreakers::
//!   host_connection_allowed`]); without it there is no per-host limit.
//!
//! # Stats (under the cluster scope)
//! - Gauges `circuit_breakers.<default|high>.{cx_open, cx_pool_open, rq_pending_open, rq_open, rq_retry_open}`:
//!   1 while the resource is at its limit, updated on every acquire and release.
//! - With `track_remaining`: `circuit_breakers.<priority>.{remaining_cx, remaining_pending, remaining_rq,
//!   remaining_retries, remaining_cx_pools}`.
//! - Counters `upstream_cx_overflow` (connections, cluster-wide or per host), `upstream_cx_pool_overflow`,
//!   `upstream_rq_pending_overflow` (pending requests and, as Envoy documents, requests) and
//!   `upstream_rq_retry_overflow`.
//!
//! One deliberate difference: with a retry budget Envoy sets `rq_retry_open` from the unused `max_retries`
//! resource nested inside its budget; Remora sets it from the budget's own limit, which is the limit that acts.

use crate::stats::{Counter, Gauge, Scope};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// `envoy.config.core.v3.RoutingPriority`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Priority {
    Default,
    High,
}

impl Priority {
    pub fn name(self) -> &'static str {
        match self {
            Priority::Default => "default",
            Priority::High => "high",
        }
    }
    fn index(self) -> usize {
        match self {
            Priority::Default => 0,
            Priority::High => 1,
        }
    }
}

/// `CircuitBreakers.Thresholds.RetryBudget`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudget {
    /// `budget_percent`, in percent (0 to 100); default 20.
    pub budget_percent: f64,
    /// `min_retry_concurrency`; default 3.
    pub min_retry_concurrency: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            budget_percent: 20.0,
            min_retry_concurrency: 3,
        }
    }
}

/// `CircuitBreakers.Thresholds` for one priority, with Envoy's defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Thresholds {
    pub max_connections: u64,
    pub max_pending_requests: u64,
    pub max_requests: u64,
    /// Ignored while `retry_budget` is set.
    pub max_retries: u64,
    /// Unlimited (`u64::MAX`) unless set.
    pub max_connection_pools: u64,
    pub track_remaining: bool,
    pub retry_budget: Option<RetryBudget>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            max_connection_pools: u64::MAX,
            track_remaining: false,
            retry_budget: None,
        }
    }
}

/// A cluster's `circuit_breakers`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CircuitBreakersConfig {
    /// Indexed by [`Priority`]: `[default, high]`.
    pub thresholds: [Thresholds; 2],
    /// `per_host_thresholds[].max_connections`, per priority; `None` is no per-host limit.
    pub per_host_max_connections: [Option<u64>; 2],
}

impl CircuitBreakersConfig {
    pub fn thresholds(&self, p: Priority) -> &Thresholds {
        &self.thresholds[p.index()]
    }
}

/// One limited resource.
#[derive(Debug)]
struct Limit {
    current: AtomicU64,
    /// The configured maximum.
    configured: u64,
    /// The maximum in force: `configured`, or the runtime's override of it ([`Resources::apply_runtime`]).
    max: AtomicU64,
    open: Gauge,
    remaining: Option<Gauge>,
}

impl Limit {
    fn new(max: u64, scope: &Scope, open: &str, remaining: &str, track: bool) -> Self {
        let open = scope.gauge(open);
        open.set(0);
        let remaining = track.then(|| scope.gauge(remaining));
        if let Some(r) = &remaining {
            r.set(gauge_value(max));
        }
        Limit {
            current: AtomicU64::new(0),
            configured: max,
            max: AtomicU64::new(max),
            open,
            remaining,
        }
    }

    /// Take one unit if fewer than `max` are in use.
    fn try_acquire(&self, max: u64) -> bool {
        let taken = self
            .current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (c < max).then_some(c + 1)
            });
        match taken {
            Ok(prev) => {
                self.publish(prev + 1, max);
                true
            }
            Err(cur) => {
                self.publish(cur, max);
                false
            }
        }
    }

    /// Take one unit whatever the maximum (Envoy's pool opening a host's first connection at the limit).
    fn acquire_over_limit(&self, max: u64) {
        let prev = self.current.fetch_add(1, Ordering::AcqRel);
        self.publish(prev + 1, max);
    }

    fn release(&self, max: u64) {
        let prev = self.current.fetch_sub(1, Ordering::AcqRel);
        self.publish(prev.saturating_sub(1), max);
    }

    fn publish(&self, current: u64, max: u64) {
        self.open.set(i64::from(current >= max));
        if let Some(r) = &self.remaining {
            r.set(gauge_value(max.saturating_sub(current)));
        }
    }

    fn count(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Which resource a [`Permit`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Connection,
    ConnectionPool,
    PendingRequest,
    Request,
    Retry,
}

/// The resources of one priority of one cluster.
#[derive(Debug)]
pub struct Resources {
    connections: Limit,
    pools: Limit,
    pending: Limit,
    requests: Limit,
    retries: Limit,
    budget: Option<RetryBudget>,
    cx_overflow: Counter,
    cx_pool_overflow: Counter,
    rq_pending_overflow: Counter,
    rq_retry_overflow: Counter,
    /// Woken whenever a connection unit is released: pending requests waiting on `max_connections`.
    cx_released: tokio::sync::Notify,
}

impl Resources {
    fn new(t: &Thresholds, cluster: &Scope, p: Priority) -> Self {
        let s = cluster.scope(&format!("circuit_breakers.{}.", p.name()));
        let track = t.track_remaining;
        let retries = Limit::new(t.max_retries, &s, "rq_retry_open", "remaining_retries", track);
        if t.retry_budget.is_some() {
            if let Some(r) = &retries.remaining {
                r.set(0);
            }
        }
        Resources {
            connections: Limit::new(t.max_connections, &s, "cx_open", "remaining_cx", track),
            pools: Limit::new(
                t.max_connection_pools,
                &s,
                "cx_pool_open",
                "remaining_cx_pools",
                track,
            ),
            pending: Limit::new(
                t.max_pending_requests,
                &s,
                "rq_pending_open",
                "remaining_pending",
                track,
            ),
            requests: Limit::new(t.max_requests, &s, "rq_open", "remaining_rq", track),
            retries,
            budget: t.retry_budget,
            cx_overflow: cluster.counter("upstream_cx_overflow"),
            cx_pool_overflow: cluster.counter("upstream_cx_pool_overflow"),
            rq_pending_overflow: cluster.counter("upstream_rq_pending_overflow"),
            rq_retry_overflow: cluster.counter("upstream_rq_retry_overflow"),
            cx_released: tokio::sync::Notify::new(),
        }
    }

    fn limit(&self, r: Resource) -> &Limit {
        match r {
            Resource::Connection => &self.connections,
            Resource::ConnectionPool => &self.pools,
            Resource::PendingRequest => &self.pending,
            Resource::Request => &self.requests,
            Resource::Retry => &self.retries,
        }
    }

    /// The current maximum of a resource: fixed, except retries under a budget.
    pub fn max(&self, r: Resource) -> u64 {
        match (r, self.budget) {
            (Resource::Retry, Some(b)) => {
                let active = self.requests.count() + self.pending.count();
                // Envoy truncates the product to an integer before taking the maximum.
                let allowed = (b.budget_percent / 100.0 * active as f64) as u64;
                allowed.max(u64::from(b.min_retry_concurrency))
            }
            (r, _) => self.limit(r).max.load(Ordering::Relaxed),
        }
    }

    /// Take the runtime's overrides of this priority's maxima (`<prefix>max_connections`,
    /// `max_pending_requests`, `max_requests`, `max_retries`, `max_connection_pools`, where `prefix` is
    /// `circuit_breakers.<cluster>.<priority>.`), or go back to the configured ones. Envoy's resource manager
    /// reads these keys at each admission; Remora takes them when a runtime snapshot is published, so that
    /// admission stays one atomic load.
    pub fn apply_runtime(&self, snap: &crate::layered_runtime::Snapshot, prefix: &str) {
        for (key, r) in [
            ("max_connections", Resource::Connection),
            ("max_pending_requests", Resource::PendingRequest),
            ("max_requests", Resource::Request),
            ("max_retries", Resource::Retry),
            ("max_connection_pools", Resource::ConnectionPool),
        ] {
            let l = self.limit(r);
            let max = if snap.is_empty() {
                l.configured
            } else {
                snap.u64(&format!("{prefix}{key}"), l.configured)
            };
            if l.max.swap(max, Ordering::Relaxed) != max && !(r == Resource::Retry && self.budget.is_some()) {
                l.publish(l.count(), max);
            }
        }
    }

    /// How many units of a resource are in use.
    pub fn count(&self, r: Resource) -> u64 {
        self.limit(r).count()
    }

    /// Take a unit of `r`, or count the overflow and return `None`.
    pub fn try_acquire(self: &Arc<Self>, r: Resource) -> Option<Permit> {
        let permit = self.try_acquire_uncounted(r);
        if permit.is_none() {
            self.overflow_counter(r).inc();
        }
        permit
    }

    /// Take a unit of `r` if one is free, without counting an overflow.
    pub fn try_acquire_uncounted(self: &Arc<Self>, r: Resource) -> Option<Permit> {
        let max = self.max(r);
        if !self.limit(r).try_acquire(max) {
            return None;
        }
        if r == Resource::Retry && self.budget.is_some() {
            self.clear_remaining_retries();
        }
        Some(Permit {
            res: self.clone(),
            kind: r,
        })
    }

    /// Take a unit of `r` even at its limit (the `*_open` gauge then reads 1).
    pub fn acquire_over_limit(self: &Arc<Self>, r: Resource) -> Permit {
        self.limit(r).acquire_over_limit(self.max(r));
        Permit {
            res: self.clone(),
            kind: r,
        }
    }

    /// Count an overflow of `r` (its `upstream_*_overflow` counter).
    pub fn count_overflow(&self, r: Resource) {
        self.overflow_counter(r).inc();
    }

    /// A future that completes at the next release of a connection unit. Enable it (`Notified::enable`) before
    /// checking the limit, so that a release between the check and the wait is not missed.
    pub fn connection_released(&self) -> tokio::sync::futures::Notified<'_> {
        self.cx_released.notified()
    }

    pub fn try_connection(self: &Arc<Self>) -> Option<Permit> {
        self.try_acquire(Resource::Connection)
    }
    pub fn try_connection_pool(self: &Arc<Self>) -> Option<Permit> {
        self.try_acquire(Resource::ConnectionPool)
    }
    pub fn try_pending(self: &Arc<Self>) -> Option<Permit> {
        self.try_acquire(Resource::PendingRequest)
    }
    pub fn try_request(self: &Arc<Self>) -> Option<Permit> {
        self.try_acquire(Resource::Request)
    }
    /// Afford a retry: under the budget, or under `max_retries` when there is none.
    pub fn try_retry(self: &Arc<Self>) -> Option<Permit> {
        self.try_acquire(Resource::Retry)
    }

    fn overflow_counter(&self, r: Resource) -> &Counter {
        match r {
            Resource::Connection => &self.cx_overflow,
            Resource::ConnectionPool => &self.cx_pool_overflow,
            Resource::PendingRequest | Resource::Request => &self.rq_pending_overflow,
            Resource::Retry => &self.rq_retry_overflow,
        }
    }

    fn clear_remaining_retries(&self) {
        if let Some(r) = &self.retries.remaining {
            r.set(0);
        }
    }

    fn release(&self, r: Resource) {
        let max = self.max(r);
        self.limit(r).release(max);
        if r == Resource::Retry && self.budget.is_some() {
            self.clear_remaining_retries();
        }
        if r == Resource::Connection {
            self.cx_released.notify_waiters();
        }
    }
}

/// One unit of a resource, given back when dropped.
#[derive(Debug)]
#[must_use = "a permit releases its resource when dropped"]
pub struct Permit {
    res: Arc<Resources>,
    kind: Resource,
}

impl Permit {
    pub fn resource(&self) -> Resource {
        self.kind
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.res.release(self.kind);
    }
}

/// A cluster's circuit breakers at run time.
#[derive(Debug)]
pub struct CircuitBreakers {
    by_priority: [Arc<Resources>; 2],
    per_host_max_connections: [Option<u64>; 2],
    cx_overflow: Counter,
}

impl CircuitBreakers {
    /// `cluster` is the cluster's stat scope (`cluster.<name>.`).
    pub fn new(config: &CircuitBreakersConfig, cluster: &Scope) -> Self {
        CircuitBreakers {
            by_priority: [Priority::Default, Priority::High]
                .map(|p| Arc::new(Resources::new(config.thresholds(p), cluster, p))),
            per_host_max_connections: config.per_host_max_connections,
            cx_overflow: cluster.counter("upstream_cx_overflow"),
        }
    }

    pub fn resources(&self, p: Priority) -> &Arc<Resources> {
        &self.by_priority[p.index()]
    }

    /// Take the runtime's `circuit_breakers.<cluster>.<priority>.max_*` overrides ([`Resources::apply_runtime`]).
    pub fn apply_runtime(&self, snap: &crate::layered_runtime::Snapshot, cluster: &str) {
        for p in [Priority::Default, Priority::High] {
            self.resources(p)
                .apply_runtime(snap, &format!("circuit_breakers.{cluster}.{}.", p.name()));
        }
    }

    /// Whether one more connection to a host that has `host_cx_active` connections is within
    /// `per_host_thresholds.max_connections`; counts `upstream_cx_overflow` when it is not.
    pub fn host_connection_allowed(&self, p: Priority, host_cx_active: u64) -> bool {
        let allowed = self.host_connection_within_limit(p, host_cx_active);
        if !allowed {
            self.cx_overflow.inc();
        }
        allowed
    }

    /// As [`CircuitBreakers::host_connection_allowed`], counting nothing.
    pub fn host_connection_within_limit(&self, p: Priority, host_cx_active: u64) -> bool {
        self.per_host_max_connections[p.index()].is_none_or(|max| host_cx_active < max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Store;

    fn breakers(t: Thresholds) -> (CircuitBreakers, Arc<Store>) {
        let store = Store::new();
        let scope = store.scope("cluster.c.");
        let cfg = CircuitBreakersConfig {
            thresholds: [t, Thresholds::default()],
            per_host_max_connections: [Some(2), None],
        };
        (CircuitBreakers::new(&cfg, &scope), store)
    }

    fn gauge(s: &Store, name: &str) -> i64 {
        s.gauge(name).value()
    }

    #[test]
    fn runtime_overrides_the_maxima_and_its_removal_restores_them() {
        use crate::layered_runtime::{LayerConfig, LayerKind, Runtime, RuntimeConfig};
        let (b, store) = breakers(Thresholds {
            max_requests: 1,
            track_remaining: true,
            ..Thresholds::default()
        });
        let rt = Runtime::new(
            RuntimeConfig {
                layers: vec![LayerConfig {
                    name: "admin".into(),
                    kind: LayerKind::Admin,
                }],
            },
            "",
            &store,
        );
        let r = b.resources(Priority::Default);
        let first = r.try_request();
        assert!(first.is_some());
        assert!(r.try_request().is_none());
        rt.merge_admin(&[("circuit_breakers.c.default.max_requests".into(), "3".into())])
            .unwrap();
        b.apply_runtime(&rt.snapshot(), "c");
        assert_eq!(r.max(Resource::Request), 3);
        assert_eq!(
            gauge(&store, "cluster.c.circuit_breakers.default.remaining_rq"),
            2
        );
        let second = r.try_request();
        assert!(second.is_some());
        // The high priority has its own key.
        assert_eq!(b.resources(Priority::High).max(Resource::Request), 1024);
        rt.merge_admin(&[("circuit_breakers.c.default.max_requests".into(), String::new())])
            .unwrap();
        b.apply_runtime(&rt.snapshot(), "c");
        assert_eq!(r.max(Resource::Request), 1);
        assert!(r.try_request().is_none());
    }

    #[test]
    fn defaults_are_envoys() {
        let t = Thresholds::default();
        assert_eq!(
            (
                t.max_connections,
                t.max_pending_requests,
                t.max_requests,
                t.max_retries
            ),
            (1024, 1024, 1024, 3)
        );
        assert_eq!(t.max_connection_pools, u64::MAX);
        assert_eq!(RetryBudget::default().budget_percent, 20.0);
        assert_eq!(RetryBudget::default().min_retry_concurrency, 3);
    }

    #[test]
    fn requests_are_admitted_up_to_the_limit_and_released_on_drop() {
        let (cb, s) = breakers(Thresholds {
            max_requests: 2,
            track_remaining: true,
            ..Default::default()
        });
        let r = cb.resources(Priority::Default);
        assert_eq!(gauge(&s, "cluster.c.circuit_breakers.default.remaining_rq"), 2);
        let a = r.try_request().unwrap();
        assert_eq!(gauge(&s, "cluster.c.circuit_breakers.default.rq_open"), 0);
        let b = r.try_request().unwrap();
        assert_eq!(gauge(&s, "cluster.c.circuit_breakers.default.rq_open"), 1);
        assert_eq!(gauge(&s, "cluster.c.circuit_breakers.default.remaining_rq"), 0);
        assert!(r.try_request().is_none());
        assert_eq!(s.counter("cluster.c.upstream_rq_pending_overflow").value(), 1);
        drop(a);
        assert_eq!(gauge(&s, "cluster.c.circuit_breakers.default.rq_open"), 0);
        assert_eq!(gauge(&s, "cluster.c.circuit_breakers.default.remaining_rq"), 1);
        let _c = r.try_request().unwrap();
        drop(b);
        assert_eq!(r.count(Resource::Request), 1);
    }

    #[test]
    fn each_resource_counts_its_own_overflow() {
        let (cb, s) = breakers(Thresholds {
            max_connections: 0,
            max_pending_requests: 0,
            max_retries: 0,
            max_connection_pools: 0,
            ..Default::default()
        });
        let r = cb.resources(Priority::Default);
        assert!(r.try_connection().is_none());
        assert!(r.try_pending().is_none());
        assert!(r.try_retry().is_none());
        assert!(r.try_connection_pool().is_none());
        for c in [
            "upstream_cx_overflow",
            "upstream_rq_pending_overflow",
            "upstream_rq_retry_overflow",
            "upstream_cx_pool_overflow",
        ] {
            assert_eq!(s.counter(&format!("cluster.c.{c}")).value(), 1, "{c}");
        }
        for g in ["cx_open", "rq_pending_open", "rq_retry_open", "cx_pool_open"] {
            assert_eq!(
                gauge(&s, &format!("cluster.c.circuit_breakers.default.{g}")),
                1,
                "{g}"
            );
        }
        // Without track_remaining the remaining_* gauges do not exist.
        assert!(!s
            .snapshot()
            .iter()
            .any(|(n, _)| n.starts_with("cluster.c.circuit_breakers.default.remaining")));
        // HIGH has its own (default) limits and gauges.
        assert!(cb.resources(Priority::High).try_connection().is_some());
        assert_eq!(gauge(&s, "cluster.c.circuit_breakers.high.cx_open"), 0);
    }

    #[test]
    fn max_retries_applies_without_a_budget() {
        let (cb, _s) = breakers(Thresholds::default());
        let r = cb.resources(Priority::Default);
        let held: Vec<_> = (0..3).map(|_| r.try_retry().unwrap()).collect();
        assert!(r.try_retry().is_none());
        drop(held);
        assert!(r.try_retry().is_some());
    }

    #[test]
    fn retry_budget_follows_active_and_pending_requests() {
        let (cb, s) = breakers(Thresholds {
            max_retries: 1,
            track_remaining: true,
            retry_budget: Some(RetryBudget {
                budget_percent: 25.0,
                min_retry_concurrency: 2,
            }),
            ..Default::default()
        });
        let r = cb.resources(Priority::Default);
        // No traffic: the floor, min_retry_concurrency = 2 (max_retries = 1 is replaced).
        assert_eq!(r.max(Resource::Retry), 2);
        let mut rq: Vec<_> = (0..15).map(|_| r.try_request().unwrap()).collect();
        let pend: Vec<_> = (0..5).map(|_| r.try_pending().unwrap()).collect();
        // 25 % of 20 = 5.
        assert_eq!(r.max(Resource::Retry), 5);
        let retries: Vec<_> = (0..5).map(|_| r.try_retry().unwrap()).collect();
        assert!(r.try_retry().is_none());
        assert_eq!(s.counter("cluster.c.upstream_rq_retry_overflow").value(), 1);
        assert_eq!(gauge(&s, "cluster.c.circuit_breakers.default.rq_retry_open"), 1);
        assert_eq!(
            gauge(&s, "cluster.c.circuit_breakers.default.remaining_retries"),
            0
        );
        // 25 % of 19 = 4.75, truncated to 4: the five held retries are now over budget.
        rq.pop();
        assert_eq!(r.max(Resource::Retry), 4);
        drop(retries);
        drop(pend);
        drop(rq);
        assert_eq!(r.max(Resource::Retry), 2);
    }

    #[tokio::test]
    async fn a_connection_over_the_limit_is_counted_and_its_release_wakes_waiters() {
        let (cb, s) = breakers(Thresholds {
            max_connections: 1,
            track_remaining: true,
            ..Default::default()
        });
        let r = cb.resources(Priority::Default);
        let a = r.try_connection().unwrap();
        assert!(r.try_acquire_uncounted(Resource::Connection).is_none());
        assert_eq!(s.counter("cluster.c.upstream_cx_overflow").value(), 0);
        // Envoy opens a pool's first connection even at the limit.
        let b = r.acquire_over_limit(Resource::Connection);
        assert_eq!(r.count(Resource::Connection), 2);
        assert_eq!(gauge(&s, "cluster.c.circuit_breakers.default.cx_open"), 1);
        assert_eq!(gauge(&s, "cluster.c.circuit_breakers.default.remaining_cx"), 0);

        let released = r.connection_released();
        tokio::pin!(released);
        released.as_mut().enable();
        drop(b);
        // Released but still at the limit; the waiter is woken all the same and finds it full.
        tokio::time::timeout(std::time::Duration::from_secs(5), released)
            .await
            .unwrap();
        assert!(r.try_acquire_uncounted(Resource::Connection).is_none());
        drop(a);
        assert!(r.try_acquire_uncounted(Resource::Connection).is_some());
    }

    #[test]
    fn per_host_connection_limit() {
        let (cb, s) = breakers(Thresholds::default());
        assert!(cb.host_connection_allowed(Priority::Default, 1));
        assert!(!cb.host_connection_allowed(Priority::Default, 2));
        assert!(cb.host_connection_allowed(Priority::High, 100));
        assert_eq!(s.counter("cluster.c.upstream_cx_overflow").value(), 1);
    }

    #[test]
    fn admission_never_overshoots_under_contention() {
        let (cb, _s) = breakers(Thresholds {
            max_requests: 8,
            ..Default::default()
        });
        let r = cb.resources(Priority::Default).clone();
        let peak = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                let peak = peak.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        if let Some(p) = r.try_request() {
                            peak.fetch_max(r.count(Resource::Request), Ordering::Relaxed);
                            drop(p);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::Relaxed) <= 8);
        assert_eq!(r.count(Resource::Request), 0);
    }
}
