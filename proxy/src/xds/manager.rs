//! The dynamic configuration and how updates are applied.
//!
//! Each `apply_*` takes one update of one resource type (a whole state-of-the-world response, or a delta),
//! lowers every resource with the same lowering as the static bootstrap, and then either applies all of it or
//! none of it: the returned [`ConfigErrors`] (each naming the resource and the field path) are what a NACK
//! carries in `error_detail`, and the last good configuration stays in force.
//!
//! - **Clusters** (CDS): a new or changed cluster (its encoded resource differs) becomes a new `Arc<Cluster>`
//!   in a new [`ClusterSnapshot`]; an unchanged one keeps its `Arc`, so its pools, breakers and outlier state
//!   carry over. A removed cluster leaves the snapshot; requests in flight hold their `Arc` to the end. An EDS
//!   cluster warms until its `ClusterLoadAssignment` has arrived (the previous version of a changed cluster
//!   serves meanwhile).
//! - **Endpoints** (EDS): a `ClusterLoadAssignment` replaces the hosts of every cluster that names it
//!   ([`Cluster::set_hosts`]); a host whose endpoint did not change keeps its `Arc<Host>` (and so its stats,
//!   pooled connections and outlier state).
//! - **Listeners** (LDS): an added listener is bound and joins the set the workers serve; a changed one gets a
//!   new [`Bound`] on the same socket (so its port stays) and the old one drains; a removed one drains. A
//!   listener whose connection manager uses RDS warms until its route table has arrived.
//! - **Routes** (RDS): the table is swapped into the `ArcSwap` that every connection manager naming it reads.
//!
//! SotW omission removes a cluster or listener ([`Removal::Omitted`]); an RDS or EDS resource is never removed
//! by omission (`xds_protocol.rst`, "Deleting resources").

use super::{content_hash, RdsRegistry, Source, SourceCheck, SourceConfig, SubscriptionStats};
use crate::config::error::{ConfigError, ConfigErrors};
use crate::config::node::{Errors, Node};
use crate::config::{cluster, listener as listener_config, route};
use crate::listener::config::{ListenerConfig, ListenerStats};
use crate::listener::{self, Bound};
use crate::server::{ClusterSnapshot, Shared};
use crate::stats::{Counter, Gauge, Store};
use crate::upstream::{Cluster, ClusterConfig, Discovery, EndpointConfig, Host, HostSet};
use prost_reflect::DynamicMessage;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;
use tokio::sync::watch;

/// One resource of an update, as it arrived. It is decoded into its message type only when it is lowered
/// ([`Resource::message`]), one at a time: a decoded message costs some fifty times its encoding (a
/// `ClusterLoadAssignment` of 10 endpoints, 320 bytes on the wire, some 15 KiB decoded), so decoding a
/// response of 1,000 of them at once would need tens of MiB the allocator then keeps. An unchanged resource
/// (the same bytes) is not decoded at all.
#[derive(Clone, Debug)]
pub struct Resource {
    pub name: String,
    /// The resource's version: the response's `version_info` in SotW, the resource's own in delta.
    pub version: String,
    /// The resource as it arrived (the `Any`'s value).
    pub raw: bytes::Bytes,
    /// Its message type.
    pub descriptor: prost_reflect::MessageDescriptor,
}

impl Resource {
    /// The decoded resource.
    pub fn message(&self) -> Result<DynamicMessage, ConfigError> {
        DynamicMessage::decode(self.descriptor.clone(), self.raw.clone())
            .map_err(|e| ConfigError::new("", format!("{}: {e}", self.descriptor.full_name())))
    }
}

/// Which held resources an update removes.
#[derive(Clone, Debug)]
pub enum Removal {
    /// State of the world: every held resource the update omits.
    Omitted,
    /// Delta: the names in `removed_resources`.
    Names(Vec<String>),
}

/// `cluster_manager.*`.
#[derive(Debug)]
struct ClusterManagerStats {
    cluster_added: Counter,
    cluster_modified: Counter,
    cluster_removed: Counter,
    active_clusters: Gauge,
    warming_clusters: Gauge,
}

/// `listener_manager.*`.
#[derive(Debug)]
struct ListenerManagerStats {
    listener_added: Counter,
    listener_modified: Counter,
    listener_removed: Counter,
    total_listeners_active: Gauge,
    total_listeners_warming: Gauge,
    total_listeners_draining: Gauge,
}

/// A cluster that CDS gave.
#[derive(Debug)]
pub struct DynCluster {
    /// The `Cluster` as encoded; decoded again for `/config_dump` only ([`DynCluster::message`]), since a
    /// decoded message costs some 2.7 KiB where its encoding costs some 50 bytes.
    raw: Vec<u8>,
    config: ClusterConfig,
    pub version: String,
    pub last_updated: SystemTime,
    /// The cluster serving under this name: this version, or the previous one while this one warms.
    active: Option<Arc<Cluster>>,
    /// This version waits for its endpoints.
    pub warming: bool,
    /// Tells this version's warm-up from a later one's, for its `initial_fetch_timeout`.
    warm_id: u64,
}

impl DynCluster {
    /// The `Cluster` resource as it was accepted.
    pub fn message(&self) -> Option<DynamicMessage> {
        let desc = crate::config::descriptors::message("envoy.config.cluster.v3.Cluster")?;
        DynamicMessage::decode(desc, self.raw.as_slice()).ok()
    }
}

/// The last `ClusterLoadAssignment` of one EDS service name.
#[derive(Debug)]
struct EdsState {
    endpoints: Vec<EndpointConfig>,
    /// The encoded `ClusterLoadAssignment` they came from, as it arrived.
    raw: bytes::Bytes,
    /// The `version` gauge's hash of `endpoints`.
    hash: u64,
    received: bool,
    stats: SubscriptionStats,
    version: String,
}

impl EdsState {
    fn new(scope: &crate::stats::Scope) -> Self {
        EdsState {
            endpoints: Vec::new(),
            raw: bytes::Bytes::new(),
            hash: 0,
            received: false,
            stats: SubscriptionStats::new(scope),
            version: String::new(),
        }
    }
}

/// A listener that LDS gave.
#[derive(Debug)]
pub struct DynListener {
    pub message: DynamicMessage,
    raw: Vec<u8>,
    config: Arc<ListenerConfig>,
    pub version: String,
    pub last_updated: SystemTime,
    /// What workers serve now (absent until the first version has warmed).
    active: Option<Arc<Bound>>,
    /// The newest version, waiting for its route table.
    warming: Option<Arc<Bound>>,
}

#[derive(Debug, Default)]
struct Inner {
    clusters: BTreeMap<String, DynCluster>,
    cds_version: String,
    endpoints: HashMap<String, EdsState>,
    listeners: BTreeMap<String, DynListener>,
    lds_version: String,
    /// Static listeners waiting for their RDS tables.
    held_static: Vec<Arc<Bound>>,
    /// The service names of static EDS clusters, which start-up waits for.
    static_eds: Vec<String>,
    cds_done: bool,
    lds_done: bool,
}

/// The dynamic configuration of the server; see the module docs.
#[derive(Debug)]
pub struct Dynamic {
    inner: Mutex<Inner>,
    pub rds: RdsRegistry,
    pub cds: SubscriptionStats,
    pub lds: SubscriptionStats,
    cm: ClusterManagerStats,
    lm: ListenerManagerStats,
    /// `control_plane.connected_state`.
    pub connected_state: Gauge,
    /// Bumped whenever something was applied, warmed, or the names to subscribe to may have changed.
    changes: watch::Sender<u64>,
    /// The server, for timers that outlive an update (set by [`super::start`]).
    shared: std::sync::OnceLock<std::sync::Weak<Shared>>,
}

/// A snapshot of the dynamic state for `/config_dump`.
pub struct DumpView<'a> {
    guard: MutexGuard<'a, Inner>,
}

impl DumpView<'_> {
    pub fn cds_version(&self) -> &str {
        &self.guard.cds_version
    }
    pub fn lds_version(&self) -> &str {
        &self.guard.lds_version
    }
    pub fn clusters(&self) -> impl Iterator<Item = &DynCluster> {
        self.guard.clusters.values()
    }
    pub fn listeners(&self) -> impl Iterator<Item = (&DynListener, &'static str)> {
        self.guard.listeners.values().map(|l| {
            let state = if l.warming.is_some() {
                "warming_state"
            } else {
                "active_state"
            };
            (l, state)
        })
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An error about resource `what` (e.g. `cluster "a"`), with `path` inside it.
fn resource_error(what: &str, e: ConfigError) -> ConfigError {
    ConfigError {
        source: Some(e.source.unwrap_or_else(|| what.to_string())),
        ..e
    }
}

impl Dynamic {
    pub fn new(store: &Arc<Store>, rds: RdsRegistry, ads: bool) -> Self {
        let cm = store.scope("cluster_manager.");
        let lm = store.scope("listener_manager.");
        Dynamic {
            inner: Mutex::default(),
            rds,
            cds: SubscriptionStats::new(&cm.scope("cds.")),
            lds: SubscriptionStats::new(&lm.scope("lds.")),
            cm: ClusterManagerStats {
                cluster_added: cm.counter("cluster_added"),
                cluster_modified: cm.counter("cluster_modified"),
                cluster_removed: cm.counter("cluster_removed"),
                active_clusters: cm.gauge("active_clusters"),
                warming_clusters: cm.gauge("warming_clusters"),
            },
            lm: ListenerManagerStats {
                listener_added: lm.counter("listener_added"),
                listener_modified: lm.counter("listener_modified"),
                listener_removed: lm.counter("listener_removed"),
                total_listeners_active: lm.gauge("total_listeners_active"),
                total_listeners_warming: lm.gauge("total_listeners_warming"),
                total_listeners_draining: lm.gauge("total_listeners_draining"),
            },
            // Envoy has this gauge only with a gRPC control plane.
            connected_state: if ads {
                store.gauge("control_plane.connected_state")
            } else {
                Gauge::detached()
            },
            changes: watch::channel(0).0,
            shared: std::sync::OnceLock::new(),
        }
    }

    /// Count the static configuration in the managers' stats.
    pub fn count_static(&self, clusters: usize, listeners: usize) {
        self.cm.cluster_added.add(clusters as u64);
        self.cm.active_clusters.set(clusters as i64);
        self.lm.listener_added.add(listeners as u64);
        self.lm.total_listeners_active.set(listeners as i64);
    }

    /// Notified after every applied update or warm-up.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Wake whoever waits on [`Dynamic::subscribe_changes`] (an RTDS update, for the initial fetch).
    pub fn notify(&self) {
        self.bump();
    }

    pub fn dump(&self) -> DumpView<'_> {
        DumpView {
            guard: lock(&self.inner),
        }
    }

    /// Mark the first CDS or LDS round done (applied, rejected, or timed out), for start-up.
    pub fn initial_done(&self, cds: bool) {
        let mut inner = lock(&self.inner);
        if cds {
            inner.cds_done = true;
        } else {
            inner.lds_done = true;
        }
        drop(inner);
        self.bump();
    }

    /// The initial fetch timed out: count `init_fetch_timeout` for each subscription still waiting.
    pub fn initial_fetch_timed_out(&self, shared: &Shared) {
        let mut inner = lock(&self.inner);
        let d = &shared.bootstrap.dynamic;
        if d.cds.is_some() && !inner.cds_done {
            self.cds.init_fetch_timeout.inc();
            inner.cds_done = true;
        }
        if d.lds.is_some() && !inner.lds_done {
            self.lds.init_fetch_timeout.inc();
            inner.lds_done = true;
        }
        for n in &inner.static_eds {
            if let Some(e) = inner.endpoints.get(n).filter(|e| !e.received) {
                e.stats.init_fetch_timeout.inc();
            }
        }
        // Warming clusters count theirs when their own `initial_fetch_timeout` ends their warm-up.
        for r in self.rds.all() {
            r.time_out();
        }
    }

    /// A listener that waits for route tables serves with an empty one (every request a 404 NR) once the
    /// table's `initial_fetch_timeout` passes, as Envoy's RDS subscription ends its initialization on a fetch
    /// timeout; the table replaces the empty one when it arrives.
    fn time_rds(&self, b: &Bound) {
        let (Some(weak), Ok(rt)) = (self.shared.get().cloned(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        for name in b.config.hcms().filter_map(|h| h.rds_name.clone()) {
            let Some(r) = self.rds.get(&name) else { continue };
            let Some(timeout) = r.source.initial_fetch_timeout.filter(|_| !r.ready()) else {
                continue;
            };
            let weak = weak.clone();
            rt.spawn(async move {
                tokio::time::sleep(timeout).await;
                if let Some(shared) = weak.upgrade() {
                    if r.time_out() {
                        tracing::warn!(route_config = %r.name, "RDS: initial fetch timed out; its listeners serve an empty route table");
                        shared.dynamic.promote(&shared);
                    }
                }
            });
        }
    }

    /// Remember the server, for the timers of warming clusters.
    pub fn set_shared(&self, shared: &Arc<Shared>) {
        let _ = self.shared.set(Arc::downgrade(shared));
    }

    /// A new EDS cluster warms until its assignment arrives or its `eds_config`'s `initial_fetch_timeout`
    /// passes, after which it serves without hosts (Envoy's EDS cluster ends its initialization when the fetch
    /// times out, counting `init_fetch_timeout`).
    fn time_warming(&self, entry: &mut DynCluster) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        entry.warm_id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Discovery::Eds { source, .. } = &entry.config.discovery else {
            return;
        };
        let (Some(timeout), Some(weak), Ok(rt)) = (
            source.initial_fetch_timeout,
            self.shared.get().cloned(),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        let (name, id) = (entry.config.name.clone(), entry.warm_id);
        rt.spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(shared) = weak.upgrade() {
                shared.dynamic.warming_timed_out(&shared, &name, id);
            }
        });
    }

    /// The `initial_fetch_timeout` of cluster `name`'s warm-up `id` has passed: if it still warms, it
    /// serves now, without hosts until its assignment arrives.
    fn warming_timed_out(&self, shared: &Shared, name: &str, id: u64) {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let Some(dc) = inner
            .clusters
            .get_mut(name)
            .filter(|c| c.warming && c.warm_id == id)
        else {
            return;
        };
        if let Discovery::Eds { service_name, .. } = &dc.config.discovery {
            if let Some(e) = inner.endpoints.get(service_name) {
                e.stats.init_fetch_timeout.inc();
            }
        }
        let mut snap = (**shared.clusters.load()).clone();
        dc.active = Some(activate(shared, &mut snap, dc.config.clone()));
        dc.warming = false;
        tracing::warn!(cluster = %name, "EDS: initial fetch timed out; the cluster serves without hosts");
        publish_clusters(shared, snap);
        self.update_cluster_gauges(shared, inner);
        drop(guard);
        self.bump();
    }

    /// An EDS update from `source` was rejected: every cluster warming for an assignment from that source
    /// serves now, without hosts until one is accepted (Envoy's EDS cluster ends its initialization on any
    /// update failure but a lost connection, so that a bad assignment does not hold start-up or a new cluster).
    pub fn eds_update_rejected(&self, shared: &Shared, source: &Source) {
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let mut snap = None;
        for (name, dc) in inner.clusters.iter_mut().filter(|(_, c)| c.warming) {
            let Discovery::Eds { source: s, .. } = &dc.config.discovery else {
                continue;
            };
            if s.source != *source {
                continue;
            }
            let snap = snap.get_or_insert_with(|| (**shared.clusters.load()).clone());
            dc.active = Some(activate(shared, snap, dc.config.clone()));
            dc.warming = false;
            tracing::warn!(cluster = %name, "EDS: update rejected; the cluster serves without hosts until one is accepted");
        }
        let Some(snap) = snap else { return };
        publish_clusters(shared, snap);
        self.update_cluster_gauges(shared, inner);
        drop(guard);
        self.bump();
    }

    /// Whether start-up may finish: the first CDS and LDS rounds are done and nothing warms.
    pub fn initialized(&self, shared: &Shared) -> bool {
        let inner = lock(&self.inner);
        let d = &shared.bootstrap.dynamic;
        (d.cds.is_none() || inner.cds_done)
            && (d.lds.is_none() || inner.lds_done)
            && !inner.clusters.values().any(|c| c.warming)
            && !inner.listeners.values().any(|l| l.warming.is_some())
            && inner.held_static.is_empty()
            && inner
                .static_eds
                .iter()
                .all(|n| inner.endpoints.get(n).is_some_and(|e| e.received))
    }

    /// Whether the cluster manager has initialized, as Envoy means it before it starts LDS: the first CDS
    /// round is done and no cluster (dynamic, or static EDS) is still waiting for its endpoints.
    pub fn clusters_initialized(&self, shared: &Shared) -> bool {
        let inner = lock(&self.inner);
        (shared.bootstrap.dynamic.cds.is_none() || inner.cds_done)
            && !inner.clusters.values().any(|c| c.warming)
            && inner
                .static_eds
                .iter()
                .all(|n| inner.endpoints.get(n).is_some_and(|e| e.received))
    }

    /// Call `f` with every EDS cluster's (static or dynamic) service name and config source.
    fn each_eds(&self, shared: &Shared, mut f: impl FnMut(&str, &SourceConfig)) {
        let inner = lock(&self.inner);
        let snap = shared.clusters.load();
        for c in snap
            .iter()
            .map(|c| &c.config)
            .chain(inner.clusters.values().map(|c| &c.config))
        {
            if let Discovery::Eds { service_name, source } = &c.discovery {
                f(service_name, source);
            }
        }
    }

    /// The EDS service names to subscribe to from `from` (every EDS cluster's, static or dynamic), sorted.
    pub fn eds_names(&self, shared: &Shared, from: &Source) -> Vec<String> {
        let mut names = Vec::new();
        self.each_eds(shared, |name, source| {
            if source.source == *from {
                names.push(name.to_string());
            }
        });
        names.sort();
        names.dedup();
        names
    }

    /// The config sources EDS clusters name.
    pub fn eds_sources(&self, shared: &Shared) -> Vec<SourceConfig> {
        let mut out: Vec<SourceConfig> = Vec::new();
        self.each_eds(shared, |_, source| {
            if !out.iter().any(|o| o.source == source.source) {
                out.push(source.clone());
            }
        });
        out
    }

    /// A failed fetch (the stream or poll that serves them failed) of the EDS or RDS resources `names`.
    pub fn count_failure(&self, type_url: &str, names: &[String]) {
        let count = |s: &SubscriptionStats| {
            s.update_attempt.inc();
            s.update_failure.inc();
        };
        if type_url == super::ENDPOINT_TYPE {
            let inner = lock(&self.inner);
            for n in names {
                if let Some(e) = inner.endpoints.get(n) {
                    count(&e.stats);
                }
            }
        } else if type_url == super::ROUTE_TYPE {
            for n in names {
                if let Some(r) = self.rds.get(n) {
                    count(&r.stats);
                }
            }
        }
    }

    /// Start-up: static EDS clusters wait for their assignments like dynamic ones (counted in their
    /// `cluster.<name>.` subscription stats).
    pub fn register_static_eds(&self, shared: &Shared) {
        let mut inner = lock(&self.inner);
        for c in shared.clusters.load().iter() {
            if let Discovery::Eds { service_name, .. } = &c.config.discovery {
                inner.static_eds.push(service_name.clone());
                let scope = shared.store.scope(format!("cluster.{}.", c.config.stat_name));
                inner
                    .endpoints
                    .entry(service_name.clone())
                    .or_insert_with(|| EdsState::new(&scope));
            }
        }
    }

    /// A static listener that uses RDS: served once its table arrives.
    pub fn hold_static_listener(&self, shared: &Shared, bound: Arc<Bound>) {
        self.time_rds(&bound);
        lock(&self.inner).held_static.push(bound);
        self.promote(shared);
    }

    /// What the config sources of CDS's clusters and LDS's connection managers may name.
    fn source_check(&self, shared: &Shared) -> SourceCheck {
        SourceCheck::new(&shared.bootstrap.clusters, shared.bootstrap.dynamic.ads.is_some())
    }

    /// Every cluster name the server knows (static and dynamic), for validating inline route tables.
    fn cluster_names(&self, shared: &Shared, inner: &Inner) -> HashSet<String> {
        shared
            .bootstrap
            .clusters
            .iter()
            .map(|c| c.name.clone())
            .chain(inner.clusters.keys().cloned())
            .collect()
    }

    /// Apply a CDS update; see the module docs.
    pub fn apply_clusters(
        &self,
        shared: &Shared,
        resources: &[Resource],
        removal: &Removal,
        version: &str,
    ) -> Result<(), ConfigErrors> {
        self.cds.update_attempt.inc();
        let result = self.apply_clusters_inner(shared, resources, removal, version);
        match &result {
            Ok(changed) => {
                self.cds.accepted(
                    content_hash(resources.iter().map(|r| r.name.as_bytes())) ^ hash_version(version),
                    *changed,
                );
                self.bump();
            }
            Err(e) => {
                self.cds.update_rejected.inc();
                tracing::warn!(errors = %e, "CDS update rejected");
            }
        }
        result.map(|_| ())
    }

    fn apply_clusters_inner(
        &self,
        shared: &Shared,
        resources: &[Resource],
        removal: &Removal,
        version: &str,
    ) -> Result<bool, ConfigErrors> {
        let statics: HashSet<&str> = shared
            .bootstrap
            .clusters
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        let check = self.source_check(shared);
        let mut lowered = Vec::new();
        let mut errors = Vec::new();
        let mut seen = HashSet::new();
        for r in resources {
            let what = format!("cluster {:?}", r.name);
            let message = match r.message() {
                Ok(m) => m,
                Err(e) => {
                    errors.push(resource_error(&what, e));
                    continue;
                }
            };
            let errs = Errors::default();
            let config = {
                let node = Node::root(&message, "", &errs);
                cluster::lower(&node)
            };
            drop(message);
            errors.extend(errs.take().into_iter().map(|e| resource_error(&what, e)));
            if statics.contains(r.name.as_str()) {
                errors.push(ConfigError {
                    source: Some(what.clone()),
                    path: "name".into(),
                    message: "a static cluster of that name exists; CDS cannot replace it".into(),
                });
            }
            if !seen.insert(r.name.clone()) {
                errors.push(ConfigError {
                    source: Some(what.clone()),
                    path: "name".into(),
                    message: "duplicate cluster name in one update".into(),
                });
            }
            if let Some(c) = config {
                if let Discovery::Eds { source, .. } = &c.discovery {
                    if let Some((path, why)) = check.check(source) {
                        errors.push(ConfigError {
                            source: Some(what.clone()),
                            path: format!("eds_cluster_config.eds_config.{path}"),
                            message: why,
                        });
                    }
                }
                lowered.push((r, c));
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }

        let mut inner = lock(&self.inner);
        let removed: Vec<String> = match removal {
            Removal::Omitted => inner
                .clusters
                .keys()
                .filter(|n| !seen.contains(*n))
                .cloned()
                .collect(),
            Removal::Names(names) => names
                .iter()
                .filter(|n| inner.clusters.contains_key(*n) && !seen.contains(*n))
                .cloned()
                .collect(),
        };
        let mut snap: ClusterSnapshot = (**shared.clusters.load()).clone();
        let mut changed = !removed.is_empty();
        let now = SystemTime::now();
        for (r, config) in lowered {
            let raw = r.raw.to_vec();
            if let Some(existing) = inner.clusters.get(&r.name) {
                if existing.raw == raw {
                    continue;
                }
            }
            changed = true;
            let modified = inner.clusters.contains_key(&r.name);
            if modified {
                self.cm.cluster_modified.inc();
            } else {
                self.cm.cluster_added.inc();
            }
            let previous = inner.clusters.get(&r.name).and_then(|c| c.active.clone());
            let mut entry = DynCluster {
                raw,
                config,
                version: r.version.clone(),
                last_updated: now,
                active: previous,
                warming: false,
                warm_id: 0,
            };
            if let Discovery::Eds { service_name, .. } = &entry.config.discovery {
                let stats_scope = shared.store.scope(format!("cluster.{}.", entry.config.stat_name));
                let eds = inner
                    .endpoints
                    .entry(service_name.clone())
                    .or_insert_with(|| EdsState::new(&stats_scope));
                if eds.received {
                    let mut config = entry.config.clone();
                    config.endpoints = eds.endpoints.clone();
                    entry.active = Some(activate(shared, &mut snap, config));
                } else {
                    entry.warming = true;
                    self.time_warming(&mut entry);
                }
            } else {
                entry.active = Some(activate(shared, &mut snap, entry.config.clone()));
            }
            tracing::info!(cluster = %r.name, warming = entry.warming, "CDS: cluster {}", if modified { "modified" } else { "added" });
            inner.clusters.insert(r.name.clone(), entry);
        }
        for name in &removed {
            inner.clusters.remove(name);
            snap.remove(name);
            self.cm.cluster_removed.inc();
            tracing::info!(cluster = %name, "CDS: cluster removed");
        }
        inner.cds_version = version.to_string();
        inner.cds_done = true;
        publish_clusters(shared, snap);
        self.update_cluster_gauges(shared, &inner);
        Ok(changed)
    }

    fn update_cluster_gauges(&self, shared: &Shared, inner: &Inner) {
        self.cm
            .active_clusters
            .set(shared.clusters.load().iter().count() as i64);
        self.cm
            .warming_clusters
            .set(inner.clusters.values().filter(|c| c.warming).count() as i64);
    }

    /// Apply an EDS update: each `ClusterLoadAssignment` by its `cluster_name`. Names in `removed` (delta)
    /// leave their clusters without hosts.
    pub fn apply_endpoints(
        &self,
        shared: &Shared,
        resources: &[Resource],
        removed: &[String],
        version: &str,
    ) -> Result<(), ConfigErrors> {
        // A state-of-the-world response repeats every assignment: those whose encoding did not change are
        // neither lowered again nor applied.
        let same: Vec<bool> = {
            let inner = lock(&self.inner);
            resources
                .iter()
                .map(|r| {
                    inner
                        .endpoints
                        .get(&r.name)
                        .is_some_and(|e| e.received && e.raw == r.raw)
                })
                .collect()
        };
        let mut lowered = Vec::new();
        let mut errors = Vec::new();
        for (r, same) in resources.iter().zip(same) {
            let raw = r.raw.clone();
            if same {
                lowered.push((r, raw, None));
                continue;
            }
            let what = format!("cluster load assignment {:?}", r.name);
            let message = match r.message() {
                Ok(m) => m,
                Err(e) => {
                    errors.push(resource_error(&what, e));
                    continue;
                }
            };
            let errs = Errors::default();
            let endpoints = {
                let node = Node::root(&message, "", &errs);
                cluster::lower_load_assignment(&node)
            };
            drop(message);
            errors.extend(errs.take().into_iter().map(|e| resource_error(&what, e)));
            lowered.push((r, raw, Some(endpoints)));
        }
        let mut inner = lock(&self.inner);
        for (r, ..) in &lowered {
            if let Some(eds) = inner.endpoints.get(&r.name) {
                eds.stats.update_attempt.inc();
                if !errors.is_empty() {
                    eds.stats.update_rejected.inc();
                }
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let removed_sets = removed
            .iter()
            .map(|n| (n.clone(), Some(Vec::new()), bytes::Bytes::new(), n.clone()));
        type Update = (String, Option<Vec<EndpointConfig>>, bytes::Bytes, String);
        let updates: Vec<Update> = lowered
            .into_iter()
            .map(|(r, raw, e)| (r.name.clone(), e, raw, r.version.clone()))
            .chain(removed_sets)
            .collect();
        let mut snap: Option<ClusterSnapshot> = None;
        for (name, endpoints, raw, rversion) in updates {
            let Some(eds) = inner.endpoints.get_mut(&name) else {
                // Not subscribed (any more): nothing names it.
                continue;
            };
            eds.version = if rversion.is_empty() {
                version.to_string()
            } else {
                rversion
            };
            let Some(endpoints) = endpoints else {
                // The same assignment again.
                eds.stats.accepted(eds.hash, false);
                continue;
            };
            let changed = !eds.received || eds.endpoints != endpoints;
            eds.received = true;
            eds.endpoints = endpoints.clone();
            eds.raw = raw;
            eds.hash = content_hash(
                eds.endpoints
                    .iter()
                    .map(|e| e.address.to_string().into_bytes())
                    .collect::<Vec<_>>()
                    .iter()
                    .map(Vec::as_slice),
            );
            eds.stats.accepted(eds.hash, changed);
            if !changed {
                continue;
            }
            // Active clusters (static or dynamic) that read this name get the hosts now.
            for c in shared.clusters.load().iter() {
                if matches!(&c.config.discovery, Discovery::Eds { service_name, .. } if *service_name == name)
                {
                    let hosts = reuse_hosts(&c.hosts(), &endpoints);
                    c.set_discovered_hosts(hosts);
                }
            }
            // Warming clusters that waited for it become active.
            for dc in inner.clusters.values_mut() {
                if !dc.warming {
                    continue;
                }
                if matches!(&dc.config.discovery, Discovery::Eds { service_name, .. } if *service_name == name)
                {
                    let snap = snap.get_or_insert_with(|| (**shared.clusters.load()).clone());
                    let mut config = dc.config.clone();
                    config.endpoints = endpoints.clone();
                    dc.active = Some(activate(shared, snap, config));
                    dc.warming = false;
                    tracing::info!(cluster = %dc.config.name, "EDS: cluster warmed");
                }
            }
        }
        if let Some(snap) = snap {
            publish_clusters(shared, snap);
        }
        self.update_cluster_gauges(shared, &inner);
        drop(inner);
        self.bump();
        Ok(())
    }

    /// Apply an LDS update; see the module docs.
    pub fn apply_listeners(
        &self,
        shared: &Shared,
        resources: &[Resource],
        removal: &Removal,
        version: &str,
    ) -> Result<(), ConfigErrors> {
        self.lds.update_attempt.inc();
        let result = self.apply_listeners_inner(shared, resources, removal, version);
        match &result {
            Ok(changed) => {
                self.lds.accepted(
                    content_hash(resources.iter().map(|r| r.name.as_bytes())) ^ hash_version(version),
                    *changed,
                );
                self.promote(shared);
            }
            Err(e) => {
                self.lds.update_rejected.inc();
                tracing::warn!(errors = %e, "LDS update rejected");
            }
        }
        result.map(|_| ())
    }

    fn apply_listeners_inner(
        &self,
        shared: &Shared,
        resources: &[Resource],
        removal: &Removal,
        version: &str,
    ) -> Result<bool, ConfigErrors> {
        let mut inner = lock(&self.inner);
        let statics: HashSet<&str> = shared
            .bootstrap
            .listeners
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        let names = self.cluster_names(shared, &inner);
        let ctx = listener_config::Ctx {
            ids: &shared.cluster_ids,
            store: &shared.store,
            logs: &shared.bootstrap.access_logs,
            static_clusters: &names,
            rds: &self.rds,
            sources: Some(&self.source_check(shared)),
        };
        let mut errors = Vec::new();
        let mut seen = HashSet::new();
        let mut changes = Vec::new();
        for r in resources {
            let what = format!("listener {:?}", r.name);
            if !seen.insert(r.name.clone()) {
                errors.push(ConfigError {
                    source: Some(what.clone()),
                    path: "name".into(),
                    message: "duplicate listener name in one update".into(),
                });
            }
            if statics.contains(r.name.as_str()) {
                errors.push(ConfigError {
                    source: Some(what.clone()),
                    path: "name".into(),
                    message: "a static listener of that name exists; LDS cannot replace it".into(),
                });
            }
            let raw = r.raw.to_vec();
            if inner.listeners.get(&r.name).is_some_and(|l| l.raw == raw) {
                continue;
            }
            let message = match r.message() {
                Ok(m) => m,
                Err(e) => {
                    errors.push(resource_error(&what, e));
                    continue;
                }
            };
            let errs = Errors::default();
            let config = {
                let node = Node::root(&message, "", &errs);
                listener_config::lower(&node, &ctx)
            };
            errors.extend(errs.take().into_iter().map(|e| resource_error(&what, e)));
            if let Some(c) = config {
                changes.push((r, message, raw, Arc::new(c)));
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        // Bind every new address before changing anything, so that a bind failure rejects the update whole.
        let mut bound = Vec::new();
        for (r, message, raw, config) in changes {
            let existing = inner.listeners.get(&r.name);
            let reuse = existing.and_then(|l| {
                l.warming.as_ref().or(l.active.as_ref()).filter(|b| {
                    b.config.address == config.address && b.config.bind_to_port == config.bind_to_port
                })
            });
            let socket = match reuse {
                Some(b) => b.socket.as_ref().map(|s| s.try_clone()).transpose(),
                None => listener::bind_config(&config),
            };
            match socket {
                Ok(socket) => {
                    let stats = Arc::new(ListenerStats::new(&shared.store.scope(config.stat_scope.clone())));
                    bound.push((r, message, raw, Bound::new(config, socket, stats)));
                }
                Err(e) => errors.push(ConfigError {
                    source: Some(format!("listener {:?}", r.name)),
                    path: "address".into(),
                    message: format!("cannot bind {}: {e}", config.address),
                }),
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let removed: Vec<String> = match removal {
            Removal::Omitted => inner
                .listeners
                .keys()
                .filter(|n| !seen.contains(*n))
                .cloned()
                .collect(),
            Removal::Names(names) => names
                .iter()
                .filter(|n| inner.listeners.contains_key(*n) && !seen.contains(*n))
                .cloned()
                .collect(),
        };
        let changed = !bound.is_empty() || !removed.is_empty();
        let now = SystemTime::now();
        for (r, message, raw, b) in bound {
            match inner.listeners.get_mut(&r.name) {
                Some(l) => {
                    self.lm.listener_modified.inc();
                    l.message = message;
                    l.raw = raw;
                    l.config = b.config.clone();
                    l.version = r.version.clone();
                    l.last_updated = now;
                    self.time_rds(&b);
                    l.warming = Some(b);
                    tracing::info!(listener = %r.name, "LDS: listener modified");
                }
                None => {
                    self.lm.listener_added.inc();
                    self.time_rds(&b);
                    inner.listeners.insert(
                        r.name.clone(),
                        DynListener {
                            message,
                            raw,
                            config: b.config.clone(),
                            version: r.version.clone(),
                            last_updated: now,
                            active: None,
                            warming: Some(b),
                        },
                    );
                    tracing::info!(listener = %r.name, "LDS: listener added");
                }
            }
        }
        for name in &removed {
            if let Some(l) = inner.listeners.remove(name) {
                self.lm.listener_removed.inc();
                if let Some(b) = l.active {
                    shared.remove_listener(&b);
                    self.count_draining(shared, &b);
                }
                tracing::info!(listener = %name, "LDS: listener removed");
            }
        }
        inner.lds_version = version.to_string();
        inner.lds_done = true;
        Ok(changed)
    }

    /// Serve every warming listener whose route table has arrived (or timed out), draining the version it
    /// replaces.
    pub(super) fn promote(&self, shared: &Shared) {
        let mut inner = lock(&self.inner);
        let ready = |b: &Bound| {
            b.config
                .hcms()
                .filter_map(|h| h.rds_name.as_ref())
                .all(|name| self.rds.get(name).is_some_and(|r| r.ready()))
        };
        for l in inner.listeners.values_mut() {
            let Some(w) = l.warming.as_ref() else { continue };
            if !ready(w) {
                continue;
            }
            let Some(w) = l.warming.take() else { continue };
            shared.add_listener(w.clone(), l.active.as_ref());
            if let Some(old) = l.active.replace(w) {
                self.count_draining(shared, &old);
            }
        }
        let (now_ready, still): (Vec<_>, Vec<_>) = std::mem::take(&mut inner.held_static)
            .into_iter()
            .partition(|b| ready(b));
        inner.held_static = still;
        for b in now_ready {
            shared.add_listener(b, None);
        }
        let statics = shared.bootstrap.listeners.len() - inner.held_static.len();
        self.lm
            .total_listeners_active
            .set((statics + inner.listeners.values().filter(|l| l.active.is_some()).count()) as i64);
        self.lm.total_listeners_warming.set(
            (inner.held_static.len() + inner.listeners.values().filter(|l| l.warming.is_some()).count())
                as i64,
        );
        drop(inner);
        self.bump();
    }

    /// Count a listener that stopped serving in `total_listeners_draining` until its last connection has
    /// closed (at most `--drain-time-s`, after which its connections are closed).
    fn count_draining(&self, shared: &Shared, bound: &Bound) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let gauge = self.lm.total_listeners_draining.clone();
        gauge.inc();
        let drained = bound.drained();
        // The connections close at the drain time; a little slack lets their tasks finish.
        let limit =
            std::time::Duration::from_secs(shared.options.drain_time_s) + std::time::Duration::from_secs(1);
        let name = bound.config.name.clone();
        rt.spawn(async move {
            if tokio::time::timeout(limit, drained).await.is_err() {
                tracing::warn!(listener = %name, "a drained listener still has connections after the drain time");
            }
            tracing::info!(listener = %name, "listener drained");
            gauge.dec();
        });
    }

    /// Apply an RDS update: each `RouteConfiguration` by its name. Tables nobody subscribed to are ignored.
    pub fn apply_routes(
        &self,
        shared: &Shared,
        resources: &[Resource],
        version: &str,
    ) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut tables = Vec::new();
        for r in resources {
            let what = format!("route configuration {:?}", r.name);
            let message = match r.message() {
                Ok(m) => m,
                Err(e) => {
                    errors.push(resource_error(&what, e));
                    continue;
                }
            };
            let errs = Errors::default();
            let table = {
                let node = Node::root(&message, "", &errs);
                route::lower_table(&node, &shared.cluster_ids, None, &shared.store)
            };
            errors.extend(errs.take().into_iter().map(|e| resource_error(&what, e)));
            if let Some(t) = table {
                tables.push((r, message, t));
            }
        }
        for r in resources {
            if let Some(e) = self.rds.get(&r.name) {
                e.stats.update_attempt.inc();
                if !errors.is_empty() {
                    e.stats.update_rejected.inc();
                }
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let now = SystemTime::now();
        for (r, message, table) in tables {
            let Some(entry) = self.rds.get(&r.name) else {
                continue;
            };
            let raw = r.raw.to_vec();
            let mut st = entry.state.lock().unwrap_or_else(|e| e.into_inner());
            let changed = st.raw != raw;
            if changed {
                entry.table.store(Arc::new(table));
                st.message = Some(message);
                st.last_updated = Some(now);
                st.raw = raw;
            }
            st.received = true;
            st.version = if r.version.is_empty() {
                version.to_string()
            } else {
                r.version.clone()
            };
            entry.stats.accepted(content_hash([st.raw.as_slice()]), changed);
        }
        self.promote(shared);
        Ok(())
    }
}

/// Swap `snap` in, and retire every cluster of the previous snapshot that it does not hold (removed, or
/// replaced by a new version): their pooled connections close ([`Cluster::retire`]) while requests in flight,
/// which hold their `Arc<Cluster>`, finish.
fn publish_clusters(shared: &Shared, snap: ClusterSnapshot) {
    let old = shared.clusters.swap(Arc::new(snap));
    let new = shared.clusters.load();
    for c in old.iter() {
        if !new.by_name(c.name()).is_some_and(|n| Arc::ptr_eq(n, c)) {
            c.retire();
        }
    }
}

fn hash_version(v: &str) -> u64 {
    content_hash([v.as_bytes()])
}

/// Build a cluster, put it in `snap`, and start its outlier sweeps.
fn activate(shared: &Shared, snap: &mut ClusterSnapshot, config: ClusterConfig) -> Arc<Cluster> {
    let id = shared.cluster_ids.id(&config.name);
    let scope = shared.store.scope(format!("cluster.{}.", config.stat_name));
    let c = Cluster::new(config, &scope, true, shared.local_cluster.clone());
    crate::layered_runtime::keys::apply_to_cluster(&shared.runtime.snapshot(), &c);
    crate::server::start_outlier_sweeps(&c);
    crate::upstream::dfp::spawn(&c);
    crate::upstream::original_dst::spawn(&c);
    c.start_health_checks(None);
    // A DNS cluster from CDS resolves from now on; nobody waits for its first answer.
    if let crate::upstream::Discovery::Dns(cfg) = &c.config.discovery {
        let (first, _) = tokio::sync::mpsc::channel(1);
        crate::upstream::dns::spawn(&c, cfg.clone(), &scope, first);
    }
    snap.insert(id, c.clone());
    c
}

/// The hosts for `endpoints`, keeping the `Arc<Host>` of every endpoint that did not change (matched by
/// address and attributes), so its stats, pooled connections and outlier state carry over.
pub fn reuse_hosts(current: &HostSet, endpoints: &[EndpointConfig]) -> Vec<Arc<Host>> {
    let by_addr: HashMap<_, &Arc<Host>> = current.hosts.iter().map(|h| (h.address, h)).collect();
    endpoints
        .iter()
        .map(|e| match by_addr.get(&e.address) {
            Some(h)
                if h.weight == e.weight.max(1)
                    && h.health == e.health
                    && h.locality == e.locality
                    && h.locality_weight == e.locality_weight
                    && h.health_check_address.port() == e.health_check_port.unwrap_or(e.address.port())
                    && h.health_check_disabled == e.health_check_disabled
                    && h.health_check_hostname == e.health_check_hostname
                    && h.priority == e.priority
                    && h.hostname == e.hostname =>
            {
                Arc::clone(h)
            }
            _ => Host::new(e),
        })
        .collect()
}
