//! Stats under Envoy's names: counters, gauges and histograms.
//!
//! A [`Store`] owns every metric by its full dotted name (`cluster.backend.upstream_rq_total`). Components ask the
//! store for handles when a config snapshot is built; the same name always yields the same underlying metric, so
//! a cluster that survives a config update keeps its counts. On the request path a handle is an `Arc` to atomics:
//! recording is an atomic add, never a string or map operation.
//!
//! Histograms record integer values in the histogram's unit (milliseconds for every `*_time` and `*_ms` stat, as
//! in Envoy) into log-linear buckets, from which the admin derives quantiles and Envoy's Prometheus buckets.
//!
//! The cargo feature `stats-off` compiles recording out: every add, set and record returns at once, while the
//! registry, the handles and the admin's output stay (every value reads 0). It exists to measure what stats cost
//! a request (`benches/stats-cost.sh`); nothing else should use it. One behaviour reads a stat: active health
//! checking uses `upstream_cx_total` to pick `no_traffic_interval`, which then always applies.

pub mod histogram;
pub mod output;
pub mod tags;

pub use histogram::{Histogram, HistogramSnapshot};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Whether recording is compiled in (false with the `stats-off` feature).
pub const RECORDING: bool = !cfg!(feature = "stats-off");

/// A monotonically increasing count.
#[derive(Clone, Debug)]
pub struct Counter(Arc<CounterInner>);

#[derive(Debug, Default)]
struct CounterInner {
    value: AtomicU64,
    used: AtomicBool,
    /// Shown only once used, like Envoy's per-code counters which exist only once a code was seen.
    lazy: bool,
}

impl Counter {
    /// A counter that belongs to no store (for components built outside a server, such as benches).
    pub fn detached() -> Self {
        Counter(Arc::default())
    }

    /// Whether the admin shows it: every counter, except a lazy one that was never incremented.
    pub fn visible(&self) -> bool {
        !self.0.lazy || self.used()
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }

    #[inline]
    pub fn add(&self, n: u64) {
        if !RECORDING {
            return;
        }
        self.0.value.fetch_add(n, Relaxed);
        if !self.0.used.load(Relaxed) {
            self.0.used.store(true, Relaxed);
        }
    }

    pub fn value(&self) -> u64 {
        self.0.value.load(Relaxed)
    }

    pub fn used(&self) -> bool {
        self.0.used.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Clone, Debug)]
pub struct Gauge(Arc<GaugeInner>);

#[derive(Debug, Default)]
struct GaugeInner {
    value: AtomicI64,
    used: AtomicBool,
}

impl Gauge {
    pub fn detached() -> Self {
        Gauge(Arc::default())
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }

    #[inline]
    pub fn dec(&self) {
        self.add(-1)
    }

    #[inline]
    pub fn add(&self, n: i64) {
        if !RECORDING {
            return;
        }
        self.0.value.fetch_add(n, Relaxed);
        self.mark();
    }

    #[inline]
    pub fn set(&self, v: i64) {
        if !RECORDING {
            return;
        }
        self.0.value.store(v, Relaxed);
        self.mark();
    }

    #[inline]
    fn mark(&self) {
        if !self.0.used.load(Relaxed) {
            self.0.used.store(true, Relaxed);
        }
    }

    pub fn value(&self) -> i64 {
        self.0.value.load(Relaxed)
    }

    pub fn used(&self) -> bool {
        self.0.used.load(Relaxed)
    }
}

/// One metric of the store.
#[derive(Clone, Debug)]
pub enum Metric {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

/// `stats_config.stats_matcher`: which stats exist. A rejected name gets a handle that belongs to no store: it
/// counts into the void and the admin never shows it, like Envoy's null stats.
#[derive(Clone, Debug)]
pub enum StatsMatcher {
    /// `reject_all: true`.
    RejectAll,
    /// `exclusion_list`: reject the names any pattern matches.
    Exclusion(Vec<crate::route::StringMatcher>),
    /// `inclusion_list`: reject the names no pattern matches.
    Inclusion(Vec<crate::route::StringMatcher>),
}

impl StatsMatcher {
    pub fn rejects(&self, name: &str) -> bool {
        match self {
            StatsMatcher::RejectAll => true,
            StatsMatcher::Exclusion(p) => p.iter().any(|m| m.matches(name)),
            StatsMatcher::Inclusion(p) => !p.iter().any(|m| m.matches(name)),
        }
    }
}

/// The registry of every metric, by full name.
#[derive(Default, Debug)]
pub struct Store {
    metrics: Mutex<BTreeMap<String, Metric>>,
    /// Set once, by the bootstrap's `stats_config`, before any other stat is created.
    matcher: std::sync::OnceLock<StatsMatcher>,
}

impl Store {
    pub fn new() -> Arc<Self> {
        Arc::new(Store::default())
    }

    /// Apply `stats_config.stats_matcher` to every stat created from now on (the first call wins).
    pub fn set_matcher(&self, m: StatsMatcher) {
        let _ = self.matcher.set(m);
    }

    fn get_or_insert(&self, name: &str, make: impl FnOnce() -> Metric) -> Metric {
        if self.matcher.get().is_some_and(|m| m.rejects(name)) {
            return make();
        }
        let mut map = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = map.get(name) {
            return m.clone();
        }
        let m = make();
        map.insert(name.to_string(), m.clone());
        m
    }

    /// The counter named `name`, created at zero if new. A name already used by another kind of metric gets a
    /// detached handle (and the clash is logged): stat names are fixed by code, so this is a programming error.
    pub fn counter(&self, name: &str) -> Counter {
        match self.get_or_insert(name, || Metric::Counter(Counter::detached())) {
            Metric::Counter(c) => c,
            _ => {
                tracing::error!(stat = name, "stat name used for two kinds of metric");
                Counter::detached()
            }
        }
    }

    /// A counter that the admin shows only once it has been incremented (per-code counters).
    pub fn lazy_counter(&self, name: &str) -> Counter {
        let make = || {
            Metric::Counter(Counter(Arc::new(CounterInner {
                lazy: true,
                ..Default::default()
            })))
        };
        match self.get_or_insert(name, make) {
            Metric::Counter(c) => c,
            _ => {
                tracing::error!(stat = name, "stat name used for two kinds of metric");
                Counter::detached()
            }
        }
    }

    pub fn gauge(&self, name: &str) -> Gauge {
        match self.get_or_insert(name, || Metric::Gauge(Gauge::detached())) {
            Metric::Gauge(g) => g,
            _ => {
                tracing::error!(stat = name, "stat name used for two kinds of metric");
                Gauge::detached()
            }
        }
    }

    pub fn histogram(&self, name: &str) -> Histogram {
        match self.get_or_insert(name, || Metric::Histogram(Histogram::new())) {
            Metric::Histogram(h) => h,
            _ => {
                tracing::error!(stat = name, "stat name used for two kinds of metric");
                Histogram::new()
            }
        }
    }

    /// A scope: handles created through it are named `<prefix><name>`.
    pub fn scope(self: &Arc<Self>, prefix: impl Into<String>) -> Scope {
        Scope {
            store: self.clone(),
            prefix: prefix.into(),
        }
    }

    /// Every metric, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, Metric)> {
        let map = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Zero every counter (admin `/reset_counters`).
    pub fn reset_counters(&self) {
        let map = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        for m in map.values() {
            if let Metric::Counter(c) = m {
                c.0.value.store(0, Relaxed);
            }
        }
    }
}

/// A store and a name prefix (`cluster.backend.`).
#[derive(Clone, Debug)]
pub struct Scope {
    store: Arc<Store>,
    prefix: String,
}

impl Scope {
    pub fn counter(&self, name: &str) -> Counter {
        self.store.counter(&format!("{}{}", self.prefix, name))
    }
    pub fn lazy_counter(&self, name: &str) -> Counter {
        self.store.lazy_counter(&format!("{}{}", self.prefix, name))
    }
    pub fn gauge(&self, name: &str) -> Gauge {
        self.store.gauge(&format!("{}{}", self.prefix, name))
    }
    pub fn histogram(&self, name: &str) -> Histogram {
        self.store.histogram(&format!("{}{}", self.prefix, name))
    }
    pub fn scope(&self, name: &str) -> Scope {
        Scope {
            store: self.store.clone(),
            prefix: format!("{}{}", self.prefix, name),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

/// Counters kept per response-code class and per code (`upstream_rq_2xx`, `upstream_rq_200`). The classes are
/// created with the scope; a code's counter on its first response, as Envoy does: the codes seen on real
/// traffic have a slot each (a lock-free look-up once created), the rest a list behind a lock. A scope that
/// never serves (most of a large CDS's clusters) so costs five counters, not 21 (each a named entry of the
/// store).
#[derive(Debug)]
pub struct CodeStats {
    scope: Scope,
    stem: &'static str,
    classes: [Counter; 5],
    /// The counters of [`COMMON_CODES`], by index.
    common: [std::sync::OnceLock<Counter>; COMMON_CODES.len()],
    rare: Mutex<Vec<(u16, Counter)>>,
}

const COMMON_CODES: &[u16] = &[
    200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 408, 429, 500, 502, 503, 504,
];

impl CodeStats {
    /// `stem` is the name before the code: `upstream_rq` or `downstream_rq`.
    pub fn new(scope: &Scope, stem: &'static str) -> Self {
        let classes = [1, 2, 3, 4, 5].map(|c| scope.counter(&format!("{stem}_{c}xx")));
        CodeStats {
            scope: scope.clone(),
            stem,
            classes,
            common: Default::default(),
            rare: Mutex::new(Vec::new()),
        }
    }

    /// Count one response with this status in its class counter and its own code counter.
    #[inline]
    pub fn record(&self, status: u16) {
        if !RECORDING {
            return;
        }
        self.record_class(status);
        match COMMON_CODES.iter().position(|&c| c == status) {
            Some(i) => self.common[i].get_or_init(|| self.new_counter(status)).inc(),
            None => self.rare(status).inc(),
        }
    }

    /// Count only the class (`_2xx`): what `listener.<addr>.http.<prefix>.*` and `http.<prefix>.*` keep.
    #[inline]
    pub fn record_class(&self, status: u16) {
        let class = (status / 100) as usize;
        if (1..=5).contains(&class) {
            self.classes[class - 1].inc();
        }
    }

    fn new_counter(&self, status: u16) -> Counter {
        self.scope.lazy_counter(&format!("{}_{}", self.stem, status))
    }

    fn rare(&self, status: u16) -> Counter {
        let mut rare = self.rare.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = rare.iter().find(|(s, _)| *s == status) {
            return c.clone();
        }
        let c = self.new_counter(status);
        rare.push((status, c.clone()));
        c
    }
}

#[cfg(test)]
mod tests {
    use super::{CodeStats, StatsMatcher, Store};
    use crate::route::StringMatcher;

    /// A code's counter exists from its first response on, common code or rare; the classes from the start.
    #[test]
    fn code_counters_are_created_on_first_use() {
        let store = Store::new();
        let codes = CodeStats::new(&store.scope("cluster.a."), "upstream_rq");
        let names = |store: &Store| -> Vec<String> { store.snapshot().into_iter().map(|(n, _)| n).collect() };
        assert_eq!(names(&store).len(), 5);
        codes.record(200);
        codes.record(200);
        codes.record(418);
        assert_eq!(
            names(&store),
            [
                "cluster.a.upstream_rq_1xx",
                "cluster.a.upstream_rq_200",
                "cluster.a.upstream_rq_2xx",
                "cluster.a.upstream_rq_3xx",
                "cluster.a.upstream_rq_418",
                "cluster.a.upstream_rq_4xx",
                "cluster.a.upstream_rq_5xx",
            ]
        );
        assert_eq!(store.counter("cluster.a.upstream_rq_200").value(), 2);
        assert_eq!(store.counter("cluster.a.upstream_rq_418").value(), 1);
        assert_eq!(store.counter("cluster.a.upstream_rq_4xx").value(), 1);
    }

    /// A rejected name yields a working handle that no output lists; the others are stored as before.
    #[test]
    fn stats_matcher_rejects_before_creation() {
        let store = Store::new();
        store.set_matcher(StatsMatcher::Exclusion(vec![StringMatcher::Prefix(
            "cluster.a.".into(),
            false,
        )]));
        store.counter("cluster.a.upstream_rq_total").inc();
        store.histogram("cluster.a.upstream_rq_time").record(3);
        store.counter("cluster.b.upstream_rq_total").inc();
        let names: Vec<String> = store.snapshot().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["cluster.b.upstream_rq_total"]);

        let store = Store::new();
        store.set_matcher(StatsMatcher::Inclusion(vec![StringMatcher::Suffix(
            "_total".into(),
            false,
        )]));
        store.counter("server.total");
        store.counter("x_total");
        store.gauge("server.live");
        let names: Vec<String> = store.snapshot().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["x_total"]);
        assert!(StatsMatcher::RejectAll.rejects("server.live"));
    }
}
