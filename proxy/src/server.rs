//! The server: what every thread shares, start-up, and the drain-then-exit lifecycle.
//!
//! Start-up builds the clusters and binds every listener before serving anything, so that a bad address is an
//! error at start, not a half-running proxy. Workers then accept and serve; the main thread runs the admin
//! server and waits for a signal. On SIGTERM or SIGINT (or `/quitquitquit`, or `/drain_listeners`) the server
//! turns `DRAINING`: listeners close (new connections are refused), `/ready` answers 503, open connections finish
//! their in-flight requests (HTTP/1.1 responses carry `connection: close`, HTTP/2 gets GOAWAY), and once they
//! are done, or `--drain-time-s` has passed, the process exits 0.

use crate::cli::Options;
use crate::config::Bootstrap;
use crate::listener::config::ListenerStats;
use crate::listener::{self, Bound};
use crate::route::ClusterId;
use crate::stats::{Gauge, Store};
use crate::upstream::local_cluster::LocalCluster;
use crate::upstream::{Cluster, ClusterConfig};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::Instant;

/// `envoy.admin.v3.ServerInfo.State`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Live = 0,
    Draining = 1,
    PreInitializing = 2,
    Initializing = 3,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Live => "LIVE",
            State::Draining => "DRAINING",
            State::PreInitializing => "PRE_INITIALIZING",
            State::Initializing => "INITIALIZING",
        }
    }
}

/// The clusters of the current configuration, by [`ClusterId`].
#[derive(Default, Debug, Clone)]
pub struct ClusterSnapshot {
    slots: Vec<Option<Arc<Cluster>>>,
    names: HashMap<String, ClusterId>,
}

impl ClusterSnapshot {
    #[inline]
    pub fn get(&self, id: ClusterId) -> Option<&Arc<Cluster>> {
        self.slots.get(id.0 as usize).and_then(Option::as_ref)
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.names.get(name).and_then(|id| self.get(*id))
    }

    /// Every cluster, in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.slots.iter().flatten()
    }

    /// Put `cluster` in slot `id` (replacing what was there).
    pub fn insert(&mut self, id: ClusterId, cluster: Arc<Cluster>) {
        if self.slots.len() <= id.0 as usize {
            self.slots.resize(id.0 as usize + 1, None);
        }
        self.names.insert(cluster.name().to_string(), id);
        self.slots[id.0 as usize] = Some(cluster);
    }

    /// Take the cluster named `name` out.
    pub fn remove(&mut self, name: &str) {
        if let Some(id) = self.names.remove(name) {
            if let Some(slot) = self.slots.get_mut(id.0 as usize) {
                *slot = None;
            }
        }
    }
}

/// Gives each cluster name a stable [`ClusterId`] for the process's lifetime, so that route tables built
/// before a cluster exists (or after it changed) still point at the right slot.
#[derive(Default, Debug)]
pub struct ClusterIds(Mutex<HashMap<String, ClusterId>>);

impl ClusterIds {
    pub fn id(&self, name: &str) -> ClusterId {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let next = ClusterId(m.len() as u32);
        *m.entry(name.to_string()).or_insert(next)
    }
}

/// `server.*` stats.
#[derive(Debug)]
pub struct ServerStats {
    pub live: Gauge,
    pub state: Gauge,
    pub uptime: Gauge,
    pub concurrency: Gauge,
    /// Open downstream connections (a gauge in Envoy).
    pub total_connections: Gauge,
    pub memory_physical_size: Gauge,
    pub memory_allocated: Gauge,
    pub memory_heap_size: Gauge,
    pub version: Gauge,
    pub days_until_first_cert_expiring: Gauge,
    pub initialization_time_ms: crate::stats::Histogram,
}

impl ServerStats {
    fn new(store: &Arc<Store>) -> Self {
        let s = store.scope("server.");
        ServerStats {
            live: s.gauge("live"),
            state: s.gauge("state"),
            uptime: s.gauge("uptime"),
            concurrency: s.gauge("concurrency"),
            total_connections: s.gauge("total_connections"),
            memory_physical_size: s.gauge("memory_physical_size"),
            memory_allocated: s.gauge("memory_allocated"),
            memory_heap_size: s.gauge("memory_heap_size"),
            version: s.gauge("version"),
            days_until_first_cert_expiring: s.gauge("days_until_first_cert_expiring"),
            initialization_time_ms: s.histogram("initialization_time_ms"),
        }
    }
}

/// What every thread shares.
pub struct Shared {
    pub clusters: ArcSwap<ClusterSnapshot>,
    pub cluster_ids: ClusterIds,
    pub store: Arc<Store>,
    pub server_stats: ServerStats,
    pub options: Options,
    pub bootstrap: Bootstrap,
    state: AtomicU8,
    health_failed: AtomicBool,
    drain: watch::Sender<bool>,
    quit: tokio::sync::Notify,
    pub started: SystemTime,
    pub start_instant: Instant,
    /// The addresses listeners bound, by listener name (port 0 resolved).
    pub listener_addrs: Mutex<Vec<(String, SocketAddr)>>,
    /// The listeners workers serve; each worker starts an accept loop for every listener it has not seen.
    listeners: watch::Sender<Arc<Vec<Arc<Bound>>>>,
    /// The drain signals of listeners that LDS replaced or removed while their connections still drain, so
    /// that a server drain closes those too.
    draining_listeners: Mutex<Vec<Arc<watch::Sender<listener::Drain>>>>,
    /// Clusters, listeners and route tables from xDS.
    pub dynamic: crate::xds::manager::Dynamic,
    /// `cluster_manager.local_cluster_name`, for zone-aware routing.
    pub local_cluster: Option<Arc<LocalCluster>>,
    /// Envoy's layered runtime (`layered_runtime`).
    pub runtime: Arc<crate::layered_runtime::Runtime>,
    /// Downstream connections held against `overload_manager`'s global limit.
    pub global_connections: Arc<std::sync::atomic::AtomicU64>,
}

impl Shared {
    pub fn state(&self) -> State {
        if self.health_failed.load(SeqCst) {
            return State::Draining;
        }
        match self.state.load(SeqCst) {
            0 => State::Live,
            1 => State::Draining,
            2 => State::PreInitializing,
            _ => State::Initializing,
        }
    }

    fn set_state(&self, s: State) {
        self.state.store(s as u8, SeqCst);
        self.update_state_gauges();
    }

    fn update_state_gauges(&self) {
        let s = self.state();
        self.server_stats.state.set(s as i64);
        self.server_stats.live.set(i64::from(s == State::Live));
    }

    /// `/healthcheck/fail` and `/healthcheck/ok`.
    pub fn set_health_failed(&self, failed: bool) {
        self.health_failed.store(failed, SeqCst);
        self.update_state_gauges();
    }

    /// Stop accepting and let open connections finish.
    pub fn start_drain(&self) {
        if self.state.load(SeqCst) != State::Draining as u8 {
            tracing::info!("draining: listeners closed, finishing in-flight requests");
        }
        self.set_state(State::Draining);
        for b in self.listeners.borrow().iter() {
            b.drain();
        }
        for stop in self
            .draining_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            stop.send_replace(listener::Drain::Close);
        }
        // Dropping the set closes the sockets once the workers' accept loops have let go of them.
        self.listeners.send_replace(Arc::new(Vec::new()));
        self.drain.send_replace(true);
    }

    /// Serve `bound` (its accept loops start on every worker); `replaces` stops accepting and drains.
    pub fn add_listener(&self, bound: Arc<Bound>, replaces: Option<&Arc<Bound>>) {
        if self.state.load(SeqCst) == State::Draining as u8 {
            return;
        }
        let addr = bound
            .socket
            .as_ref()
            .and_then(|s| s.local_addr().ok())
            .unwrap_or(bound.config.address);
        {
            let mut addrs = self.listener_addrs.lock().unwrap_or_else(|e| e.into_inner());
            addrs.retain(|(n, _)| *n != bound.config.name);
            addrs.push((bound.config.name.clone(), addr));
        }
        tracing::info!(listener = %bound.config.name, address = %addr, "listening");
        self.listeners.send_modify(|set| {
            let mut v: Vec<Arc<Bound>> = set
                .iter()
                .filter(|b| !replaces.is_some_and(|r| Arc::ptr_eq(b, r)))
                .cloned()
                .collect();
            v.push(bound);
            *set = Arc::new(v);
        });
        if let Some(old) = replaces {
            self.drain_gently(old);
        }
    }

    /// Stop serving `bound` and drain its connections.
    pub fn remove_listener(&self, bound: &Arc<Bound>) {
        self.listener_addrs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(n, _)| *n != bound.config.name);
        self.listeners.send_modify(|set| {
            *set = Arc::new(set.iter().filter(|b| !Arc::ptr_eq(b, bound)).cloned().collect());
        });
        self.drain_gently(bound);
    }

    /// Discourage requests on a listener LDS replaced or removed (see [`listener::Drain::Discourage`]).
    fn drain_gently(&self, bound: &Bound) {
        bound.drain_gently();
        let mut draining = self.draining_listeners.lock().unwrap_or_else(|e| e.into_inner());
        // Listeners whose last connection has closed are done.
        draining.retain(|s| s.receiver_count() > 0);
        draining.push(bound.stop.clone());
    }

    /// The listener a connection redirected to `dst` is handed off to (`use_original_dst`): the one bound to
    /// exactly that address, else one on the same port of the unspecified address, as Envoy looks them up.
    pub fn listener_for(&self, dst: SocketAddr) -> Option<Arc<Bound>> {
        let set = self.listeners.borrow();
        set.iter()
            .find(|b| b.config.address == dst)
            .or_else(|| {
                set.iter().find(|b| {
                    let a = b.config.address;
                    a.ip().is_unspecified() && a.port() == dst.port() && a.is_ipv4() == dst.is_ipv4()
                })
            })
            .cloned()
    }

    /// The current listener set, to serve.
    pub fn listener_set(&self) -> watch::Receiver<Arc<Vec<Arc<Bound>>>> {
        self.listeners.subscribe()
    }

    /// Drain, then exit.
    pub fn quit(&self) {
        self.start_drain();
        self.quit.notify_one();
    }

    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain.subscribe()
    }
}

/// Build clusters from the bootstrap.
fn build_clusters(
    b: &Bootstrap,
    store: &Arc<Store>,
    ids: &ClusterIds,
    local: &Option<Arc<LocalCluster>>,
) -> ClusterSnapshot {
    let mut snap = ClusterSnapshot::default();
    // The local cluster first, so that the others compute their zone routing against its hosts.
    let mut order: Vec<&ClusterConfig> = b.clusters.iter().collect();
    order.sort_by_key(|c| Some(&c.name) != b.local_cluster_name.as_ref());
    for c in order {
        let id = ids.id(&c.name);
        let scope = store.scope(format!("cluster.{}.", c.stat_name));
        snap.insert(id, Cluster::new(c.clone(), &scope, false, local.clone()));
    }
    snap
}

/// The local cluster of zone-aware routing, when `cluster_manager.local_cluster_name` is set.
fn local_cluster(b: &Bootstrap) -> Option<Arc<LocalCluster>> {
    let name = b.local_cluster_name.clone()?;
    let n = &b.node;
    let locality = crate::upstream::Locality {
        region: n.region.clone(),
        zone: n.zone.clone(),
        sub_zone: n.sub_zone.clone(),
    };
    Some(LocalCluster::new(name, locality))
}

/// Run the server until it has drained and should exit. Returns the process exit code.
pub fn run(options: Options, mut bootstrap: Bootstrap) -> i32 {
    let store = bootstrap.store.clone();
    let server_stats = ServerStats::new(&store);
    let cluster_ids = std::mem::take(&mut bootstrap.cluster_ids);
    let dynamic = crate::xds::manager::Dynamic::new(
        &store,
        std::mem::take(&mut bootstrap.rds),
        bootstrap.dynamic.uses_grpc()
            || crate::xds::static_sources_use_grpc(&bootstrap)
            || bootstrap
                .runtime
                .rtds()
                .any(|(_, s)| matches!(s.source, crate::xds::Source::Api(_))),
    );
    let local_cluster = local_cluster(&bootstrap);
    let clusters = build_clusters(&bootstrap, &store, &cluster_ids, &local_cluster);
    let runtime = Arc::new(crate::layered_runtime::Runtime::new(
        bootstrap.runtime.clone(),
        &bootstrap.node.cluster,
        &store,
    ));
    let snap = runtime.snapshot();
    for c in clusters.iter() {
        crate::layered_runtime::keys::apply_to_cluster(&snap, c);
    }
    let (drain_tx, _) = watch::channel(false);
    let concurrency = options.concurrency;
    let shared = Arc::new(Shared {
        clusters: ArcSwap::from_pointee(clusters),
        cluster_ids,
        store: store.clone(),
        server_stats,
        options,
        bootstrap,
        state: AtomicU8::new(State::PreInitializing as u8),
        health_failed: AtomicBool::new(false),
        drain: drain_tx,
        quit: tokio::sync::Notify::new(),
        started: SystemTime::now(),
        start_instant: Instant::now(),
        listener_addrs: Mutex::new(Vec::new()),
        listeners: watch::channel(Arc::new(Vec::new())).0,
        draining_listeners: Mutex::default(),
        dynamic,
        local_cluster,
        runtime,
        global_connections: Arc::default(),
    });
    shared
        .dynamic
        .count_static(shared.bootstrap.clusters.len(), shared.bootstrap.listeners.len());
    shared.server_stats.concurrency.set(concurrency as i64);
    shared.update_state_gauges();

    // Bind every listener first: a failure stops start-up with its address.
    let mut bound = Vec::new();
    for l in &shared.bootstrap.listeners {
        match listener::bind_config(l) {
            Ok(socket) => {
                let stats = Arc::new(ListenerStats::new(&store.scope(l.stat_scope.clone())));
                bound.push(Bound::new(l.clone(), socket, stats));
            }
            Err(e) => {
                tracing::error!(listener = %l.name, address = %l.address, error = %e, "cannot bind listener");
                eprintln!("error: listener '{}': cannot bind {}: {e}", l.name, l.address);
                return 1;
            }
        }
    }

    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the main runtime: {e}");
            return 1;
        }
    };

    // Listeners whose routes come from RDS wait for them; the others serve now.
    for b in bound {
        if b.config.hcms().any(|h| h.rds_name.is_some()) {
            shared.dynamic.hold_static_listener(&shared, b);
        } else {
            shared.add_listener(b, None);
        }
    }

    // Workers.
    let worker_shared = shared.clone();
    let drain_time = Duration::from_secs(shared.options.drain_time_s);
    let workers = crate::runtime::spawn_workers(concurrency, move |worker| {
        let shared = worker_shared.clone();
        async move {
            let janitor =
                tokio::task::spawn_local(crate::upstream::pool::purge_on_retirement(worker.pools.clone()));
            serve_listeners(&shared, &worker).await;
            // Draining: wait for this worker's connections, bounded by --drain-time-s.
            let _ = tokio::time::timeout(drain_time, worker.connections_closed()).await;
            janitor.abort();
            worker.pools.clear();
        }
    });
    let workers = match workers {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: cannot start worker threads: {e}");
            return 1;
        }
    };
    let code = rt.block_on(async {
        crate::layered_runtime::watch_disk(&shared.runtime);
        crate::layered_runtime::keys::follow(&shared);
        let admin = match &shared.bootstrap.admin {
            Some(a) => match crate::admin::start(shared.clone(), a.address).await {
                Ok(addr) => Some(addr),
                Err(e) => {
                    eprintln!("error: admin: cannot bind {}: {e}", a.address);
                    return 1;
                }
            },
            None => None,
        };
        if let (Some(addr), Some(path)) = (admin, &shared.options.admin_address_path) {
            if let Err(e) = std::fs::write(path, addr.to_string()) {
                tracing::error!(path = %path, error = %e, "cannot write --admin-address-path");
            }
        }
        // DNS clusters resolve once before the server is LIVE (Envoy's cluster initialisation), bounded.
        let (first_tx, mut first_rx) = tokio::sync::mpsc::channel(64);
        let mut dns_clusters = 0;
        for c in shared.clusters.load().iter() {
            crate::upstream::dfp::spawn(c);
            crate::upstream::original_dst::spawn(c);
            if let crate::upstream::Discovery::Dns(cfg) = &c.config.discovery {
                let scope = shared.store.scope(format!("cluster.{}.", c.config.stat_name));
                crate::upstream::dns::spawn(c, cfg.clone(), &scope, first_tx.clone());
                dns_clusters += 1;
            }
        }
        // Active health checks start now; as Envoy's cluster initialisation, the server waits (bounded) for
        // every host's first check, so that it does not go LIVE with all hosts failed.
        let mut first_checks = 0;
        for c in shared.clusters.load().iter() {
            first_checks += c.start_health_checks(Some(first_tx.clone()));
        }
        drop(first_tx);
        let _ = tokio::time::timeout(Duration::from_secs(15), async {
            for _ in 0..dns_clusters + first_checks {
                first_rx.recv().await;
            }
        })
        .await;
        crate::xds::start(&shared).await;
        shared.set_state(State::Live);
        shared
            .server_stats
            .initialization_time_ms
            .record(shared.start_instant.elapsed().as_millis() as u64);
        tracing::info!("all listeners started; server LIVE");

        for c in shared.clusters.load().iter() {
            start_outlier_sweeps(c);
        }
        let ticker_shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let s = &ticker_shared.server_stats;
                s.uptime
                    .set(ticker_shared.start_instant.elapsed().as_secs() as i64);
                if let Some(rss) = crate::util::rss_bytes() {
                    s.memory_physical_size.set(rss as i64);
                    s.memory_allocated.set(rss as i64);
                    s.memory_heap_size.set(rss as i64);
                }
                crate::tls::update_server_gauge(&s.days_until_first_cert_expiring);
            }
        });

        wait_for_quit(&shared).await;
        shared.start_drain();
        0
    });
    if code != 0 {
        shared.start_drain();
    }
    // Workers finish their connections (bounded by the drain time) and exit; the admin keeps answering
    // (`/ready` says DRAINING) until they have.
    let joined = rt.block_on(async {
        let join = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        });
        tokio::time::timeout(drain_time + Duration::from_secs(1), join)
            .await
            .is_ok()
    });
    if !joined {
        tracing::warn!("workers did not finish within the drain time; exiting");
    }
    shared.bootstrap.access_logs.flush_all();
    tracing::info!("exiting");
    // Do not wait for a worker that overran the drain time.
    rt.shutdown_background();
    code
}

/// Run a cluster's outlier detection sweep every `interval` on the main thread, for as long as it exists. The
/// interval is read again after each sweep, as Envoy re-arms its timer (the runtime's
/// `outlier_detection.interval_ms` may have changed it).
pub fn start_outlier_sweeps(cluster: &Arc<Cluster>) {
    let Some(d) = &cluster.outlier else { return };
    let mut next = Instant::now() + d.config().interval;
    let weak = Arc::downgrade(cluster);
    tokio::spawn(async move {
        let mut rng = crate::upstream::lb::Rng::from_entropy();
        loop {
            tokio::time::sleep_until(next).await;
            let Some(c) = weak.upgrade() else { break };
            c.outlier_sweep(&mut rng);
            let interval = c
                .outlier
                .as_ref()
                .map_or(Duration::from_secs(10), |d| d.config().interval)
                .max(Duration::from_millis(1));
            next += interval;
        }
    });
}

/// Run an accept loop for every listener in the set as the set changes, until the server drains.
async fn serve_listeners(shared: &Arc<Shared>, worker: &std::rc::Rc<crate::runtime::Worker>) {
    let mut set = shared.listener_set();
    let mut drain = shared.drain_signal();
    let mut serving: Vec<std::sync::Weak<Bound>> = Vec::new();
    loop {
        {
            let current = set.borrow_and_update().clone();
            serving.retain(|w| w.strong_count() > 0);
            for b in current.iter() {
                if !serving.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(b))) {
                    serving.push(Arc::downgrade(b));
                    tokio::task::spawn_local(listener::accept_loop(
                        b.clone(),
                        shared.clone(),
                        worker.clone(),
                    ));
                }
            }
        }
        tokio::select! {
            changed = set.changed() => if changed.is_err() { break },
            _ = drain.wait_for(|d| *d) => break,
        }
    }
}

async fn wait_for_quit(shared: &Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    let term_recv = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let int_recv = async {
        match int.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term_recv => tracing::info!("SIGTERM received"),
        _ = int_recv => tracing::info!("SIGINT received"),
        _ = shared.quit.notified() => tracing::info!("quit requested"),
    }
}
