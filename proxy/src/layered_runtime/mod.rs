//! Envoy's layered runtime (`layered_runtime`, `envoy.config.bootstrap.v3.LayeredRuntime`): a key-value store
//! of overrides, built from layers in order, a later layer's value of a key replacing an earlier one's
//! (`configuration/operations/runtime.rst`). Not to be confused with [`crate::runtime`], the workers' tokio
//! runtimes.
//!
//! - `static_layer`: a `google.protobuf.Struct`; nested keys are joined with dots (`envoy: {a: 1}` is `envoy.a`),
//!   a struct holding `numerator`/`denominator` (or empty) is one value (a fractional percent). A list or a null
//!   is an error (`Invalid runtime entry value for <key>`).
//! - `disk_layer`: the files under `symlink_root/subdirectory[/<service cluster>]`, each file a key (its path
//!   below the root with `/` as `.`), its text the value (lines starting with `#` are comments). Re-read when
//!   the symlink root changes ([`watch_disk`]): an atomic symlink swap (`ln -s v2 new && mv -Tf new current`).
//!   A missing directory is no layer; one that cannot be read counts `runtime.load_error` and is left out.
//! - `admin_layer`: what `POST /runtime_modify?key=value` sets (an empty value removes the override). At most
//!   one; without one, `/runtime_modify` answers 503 `No admin layer specified`, as Envoy does.
//! - `rtds_layer`: the `envoy.service.runtime.v3.Runtime` resource `name` from `rtds_config` (ADS, its own gRPC
//!   stream `RuntimeDiscoveryService`, REST `/v3/discovery:runtime` ([`rest`]), or a file ([`file`])); see
//!   [`Runtime::apply_rtds`].
//!
//! Every change builds a new immutable [`Snapshot`] and swaps it in (`ArcSwap`); a read is an atomic load and a
//! hash look-up. Remora's features that have runtime keys take their values when a snapshot is published
//! ([`keys`]); keys no feature of Remora reads are kept and shown by `/runtime` (Envoy keeps unknown keys too),
//! and logged, each once (at start, and when a layer brings a new one).

pub mod entry;
pub mod file;
pub mod keys;
pub mod rest;

pub use entry::{Entry, Fraction};

use crate::config::error::{ConfigError, ConfigErrors};
use crate::config::node::Node;
use crate::stats::{Counter, Gauge, Store};
use crate::xds::manager::Resource;
use crate::xds::{Source, SourceConfig, SubscriptionStats};
use arc_swap::ArcSwap;
use entry::Value;
use prost_reflect::{DynamicMessage, Value as PValue};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The `Runtime` resource type of RTDS.
pub const RUNTIME_TYPE: &str = "type.googleapis.com/envoy.service.runtime.v3.Runtime";

/// How deep a disk layer's directories may nest (Envoy's `MaxWalkDepth`).
const MAX_WALK_DEPTH: u32 = 16;

/// One configured layer.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerKind {
    /// `static_layer`, flattened.
    Static(Arc<BTreeMap<String, Entry>>),
    /// `disk_layer`.
    Disk {
        symlink_root: PathBuf,
        subdirectory: String,
        append_service_cluster: bool,
    },
    /// `admin_layer`.
    Admin,
    /// `rtds_layer`: the resource name and where it comes from.
    Rtds { name: String, source: SourceConfig },
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayerConfig {
    pub name: String,
    pub kind: LayerKind,
}

/// `layered_runtime`, lowered. Absent, there are no layers (and no admin layer).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuntimeConfig {
    pub layers: Vec<LayerConfig>,
}

impl RuntimeConfig {
    /// The RTDS layers: (resource name, source).
    pub fn rtds(&self) -> impl Iterator<Item = (&str, &SourceConfig)> {
        self.layers.iter().filter_map(|l| match &l.kind {
            LayerKind::Rtds { name, source } => Some((name.as_str(), source)),
            _ => None,
        })
    }
}

/// Lower `layered_runtime`.
pub fn lower(n: &Node) -> RuntimeConfig {
    let list = n.list("layers");
    if list.is_empty() {
        // Envoy: a layered runtime without layers gets one (unnamed) admin layer.
        return RuntimeConfig {
            layers: vec![LayerConfig {
                name: String::new(),
                kind: LayerKind::Admin,
            }],
        };
    }
    let mut names = HashSet::new();
    let mut admin = false;
    let mut layers = Vec::new();
    for l in &list {
        let name = l.string("name").unwrap_or_default();
        if !names.insert(name.clone()) {
            l.err("name", format!("Duplicate layer name: {name}"));
        }
        let kind = if let Some(s) = l.msg("static_layer") {
            s.mark_all();
            match flatten_struct(s.message()) {
                Ok(values) => Some(LayerKind::Static(Arc::new(values))),
                Err(e) => {
                    l.err("static_layer", e);
                    None
                }
            }
        } else if let Some(d) = l.msg("disk_layer") {
            let root = d.string("symlink_root").unwrap_or_default();
            if root.is_empty() {
                d.err("symlink_root", "is required");
            }
            Some(LayerKind::Disk {
                symlink_root: PathBuf::from(root),
                subdirectory: d.string("subdirectory").unwrap_or_default(),
                append_service_cluster: d.bool("append_service_cluster"),
            })
        } else if l.msg("admin_layer").is_some() {
            if admin {
                l.err(
                    "admin_layer",
                    "Too many admin layers specified in LayeredRuntime, at most one may be specified",
                );
            }
            admin = true;
            Some(LayerKind::Admin)
        } else if let Some(r) = l.msg("rtds_layer") {
            let rname = r.string("name").unwrap_or_default();
            let source = match r.msg("rtds_config") {
                Some(c) => crate::xds::lower_config_source(&c),
                None => {
                    r.err("rtds_config", "is required");
                    None
                }
            };
            source.map(|source| LayerKind::Rtds { name: rname, source })
        } else {
            l.err_here("layer specifier not set");
            None
        };
        if let Some(kind) = kind {
            layers.push(LayerConfig { name, kind });
        }
    }
    RuntimeConfig { layers }
}

/// A `google.protobuf.Value` as a [`Value`].
fn proto_value(v: &DynamicMessage) -> Value {
    let field = |name: &str| {
        v.has_field_by_name(name)
            .then(|| v.get_field_by_name(name))
            .flatten()
    };
    if let Some(n) = field("number_value").and_then(|x| x.as_f64()) {
        Value::Number(n)
    } else if let Some(s) = field("string_value") {
        Value::String(s.as_str().unwrap_or_default().to_string())
    } else if let Some(b) = field("bool_value").and_then(|x| x.as_bool()) {
        Value::Bool(b)
    } else if let Some(s) = field("struct_value") {
        match s.as_message() {
            Some(m) => Value::Struct(
                struct_fields(m)
                    .into_iter()
                    .map(|(k, v)| (k, proto_value(&v)))
                    .collect(),
            ),
            None => Value::Null,
        }
    } else if field("list_value").is_some() {
        Value::List
    } else {
        Value::Null
    }
}

/// The `fields` of a `google.protobuf.Struct`, sorted.
fn struct_fields(s: &DynamicMessage) -> BTreeMap<String, DynamicMessage> {
    let mut out = BTreeMap::new();
    if let Some(PValue::Map(m)) = s.get_field_by_name("fields").as_deref() {
        for (k, v) in m {
            if let (prost_reflect::MapKey::String(k), PValue::Message(v)) = (k, v) {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// Flatten a `google.protobuf.Struct` into runtime keys (Envoy's `ProtoLayer::walkProtoValue`).
pub fn flatten_struct(s: &DynamicMessage) -> Result<BTreeMap<String, Entry>, String> {
    fn walk(v: &Value, prefix: &str, out: &mut BTreeMap<String, Entry>) -> Result<(), String> {
        match v {
            Value::Null | Value::List => Err(format!("Invalid runtime entry value for {prefix}")),
            Value::Struct(f)
                if !f.is_empty() && !f.contains_key("numerator") && !f.contains_key("denominator") =>
            {
                for (k, v) in f {
                    walk(v, &format!("{prefix}.{k}"), out)?;
                }
                Ok(())
            }
            other => {
                out.insert(prefix.to_string(), Entry::from_value(other, None));
                Ok(())
            }
        }
    }
    let mut out = BTreeMap::new();
    for (k, v) in struct_fields(s) {
        walk(&proto_value(&v), &k, &mut out)?;
    }
    Ok(out)
}

/// One layer of a snapshot.
#[derive(Debug)]
pub struct Layer {
    pub name: String,
    pub values: Arc<BTreeMap<String, Entry>>,
}

/// The runtime as it is now: its layers (for `/runtime`) and the merged values.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub layers: Vec<Layer>,
    values: HashMap<String, Entry>,
}

impl Snapshot {
    fn new(layers: Vec<Layer>) -> Self {
        let mut values = HashMap::new();
        for l in &layers {
            for (k, v) in l.values.iter() {
                values.insert(k.clone(), v.clone());
            }
        }
        Snapshot { layers, values }
    }

    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.values.get(key)
    }

    /// `getInteger`: the value when it reads as a non-negative integer, else `default`.
    pub fn u64(&self, key: &str, default: u64) -> u64 {
        self.get(key).and_then(|e| e.uint).unwrap_or(default)
    }

    /// `getDouble`.
    pub fn f64(&self, key: &str, default: f64) -> f64 {
        self.get(key).and_then(|e| e.double).unwrap_or(default)
    }

    /// `getBoolean`.
    pub fn bool(&self, key: &str, default: bool) -> bool {
        self.get(key).and_then(|e| e.boolean).unwrap_or(default)
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }
}

/// `runtime.*` (`configuration/operations/runtime.rst`, "Statistics").
#[derive(Debug)]
pub struct RuntimeStats {
    pub admin_overrides_active: Gauge,
    pub deprecated_feature_use: Counter,
    pub deprecated_feature_seen_since_process_start: Gauge,
    pub load_error: Counter,
    pub load_success: Counter,
    pub num_keys: Gauge,
    pub num_layers: Gauge,
    pub override_dir_exists: Counter,
    pub override_dir_not_exists: Counter,
}

impl RuntimeStats {
    fn new(store: &Arc<Store>) -> Self {
        let s = store.scope("runtime.");
        RuntimeStats {
            admin_overrides_active: s.gauge("admin_overrides_active"),
            deprecated_feature_use: s.counter("deprecated_feature_use"),
            deprecated_feature_seen_since_process_start: s
                .gauge("deprecated_feature_seen_since_process_start"),
            load_error: s.counter("load_error"),
            load_success: s.counter("load_success"),
            num_keys: s.gauge("num_keys"),
            num_layers: s.gauge("num_layers"),
            override_dir_exists: s.counter("override_dir_exists"),
            override_dir_not_exists: s.counter("override_dir_not_exists"),
        }
    }
}

/// What an RTDS layer holds.
#[derive(Debug, Default)]
struct RtdsState {
    values: Arc<BTreeMap<String, Entry>>,
    received: bool,
}

/// The runtime loader: the configured layers, the admin and RTDS layers' contents, and the current snapshot.
#[derive(Debug)]
pub struct Runtime {
    config: RuntimeConfig,
    service_cluster: String,
    current: ArcSwap<Snapshot>,
    /// The admin layer's overrides (`None` without an admin layer).
    admin: Mutex<Option<BTreeMap<String, Entry>>>,
    /// Each RTDS layer's contents, by layer index.
    rtds: Mutex<BTreeMap<usize, RtdsState>>,
    pub stats: RuntimeStats,
    /// The RTDS subscriptions' statistics (`runtime.update_success`, ...), as Envoy's scope them.
    pub rtds_stats: SubscriptionStats,
    /// Bumped on every new snapshot.
    changes: watch::Sender<u64>,
    /// Serialises snapshot building.
    build: Mutex<()>,
    /// The keys already logged as read by no Remora feature.
    logged_unread: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Runtime {
    /// The runtime of `config`, its first snapshot loaded (disk layers read now).
    pub fn new(config: RuntimeConfig, service_cluster: &str, store: &Arc<Store>) -> Self {
        let admin = config
            .layers
            .iter()
            .any(|l| l.kind == LayerKind::Admin)
            .then(BTreeMap::new);
        let rtds = config
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| matches!(l.kind, LayerKind::Rtds { .. }))
            .map(|(i, _)| (i, RtdsState::default()))
            .collect();
        // As in Envoy, the subscription stats exist only with an RTDS layer.
        let rtds_stats = if config.rtds().next().is_some() {
            SubscriptionStats::new(&store.scope("runtime."))
        } else {
            SubscriptionStats {
                config_reload: Counter::detached(),
                init_fetch_timeout: Counter::detached(),
                update_attempt: Counter::detached(),
                update_success: Counter::detached(),
                update_failure: Counter::detached(),
                update_rejected: Counter::detached(),
                update_time: Gauge::detached(),
                version: Gauge::detached(),
            }
        };
        let rt = Runtime {
            config,
            service_cluster: service_cluster.to_string(),
            current: ArcSwap::from_pointee(Snapshot::default()),
            admin: Mutex::new(admin),
            rtds: Mutex::new(rtds),
            stats: RuntimeStats::new(store),
            rtds_stats,
            changes: watch::channel(0).0,
            build: Mutex::new(()),
            logged_unread: Mutex::default(),
        };
        rt.reload();
        rt
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The current snapshot.
    #[inline]
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Notified after every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Build a new snapshot from every layer and publish it (Envoy's `loadNewSnapshot`).
    pub fn reload(&self) {
        let _guard = lock(&self.build);
        let mut layers = Vec::new();
        let mut disk_layers = 0;
        let mut error_layers = 0;
        for (i, l) in self.config.layers.iter().enumerate() {
            let values = match &l.kind {
                LayerKind::Static(v) => v.clone(),
                LayerKind::Admin => Arc::new(lock(&self.admin).clone().unwrap_or_default()),
                LayerKind::Rtds { .. } => lock(&self.rtds)
                    .get(&i)
                    .map(|s| s.values.clone())
                    .unwrap_or_default(),
                LayerKind::Disk { .. } => {
                    let Some(path) = self.disk_path(&l.kind) else {
                        continue;
                    };
                    if !path.is_dir() {
                        continue;
                    }
                    match read_disk_layer(&path) {
                        Ok(v) => {
                            disk_layers += 1;
                            Arc::new(v)
                        }
                        Err(e) => {
                            error_layers += 1;
                            tracing::warn!(layer = %l.name, path = %path.display(), error = %e, "runtime: cannot load a disk layer; left out");
                            continue;
                        }
                    }
                }
            };
            layers.push(Layer {
                name: l.name.clone(),
                values,
            });
        }
        self.stats.num_layers.set(layers.len() as i64);
        if error_layers == 0 {
            self.stats.load_success.inc();
        } else {
            self.stats.load_error.inc();
        }
        if disk_layers > 1 {
            self.stats.override_dir_exists.inc();
        } else {
            self.stats.override_dir_not_exists.inc();
        }
        let snap = Snapshot::new(layers);
        self.stats.num_keys.set(snap.len() as i64);
        self.log_unread_keys(&snap);
        self.current.store(Arc::new(snap));
        self.changes.send_modify(|n| *n += 1);
    }

    /// The directory a disk layer reads: `symlink_root/subdirectory[/service_cluster]`.
    fn disk_path(&self, kind: &LayerKind) -> Option<PathBuf> {
        let LayerKind::Disk {
            symlink_root,
            subdirectory,
            append_service_cluster,
        } = kind
        else {
            return None;
        };
        let mut p = format!("{}/{}", symlink_root.display(), subdirectory);
        if *append_service_cluster {
            p = format!("{p}/{}", self.service_cluster);
        }
        Some(PathBuf::from(p))
    }

    /// `/runtime_modify`: merge admin overrides (an empty value removes one) and publish a new snapshot.
    pub fn merge_admin(&self, overrides: &[(String, String)]) -> Result<(), String> {
        {
            let mut admin = lock(&self.admin);
            let Some(values) = admin.as_mut() else {
                return Err("No admin layer specified".into());
            };
            for (k, v) in overrides {
                values.remove(k);
                if !v.is_empty() {
                    values.insert(k.clone(), Entry::from_text(v));
                }
            }
            self.stats
                .admin_overrides_active
                .set(i64::from(!values.is_empty()));
        }
        self.reload();
        Ok(())
    }

    /// The RTDS resource names to subscribe to on `source`.
    pub fn rtds_names(&self, source: impl Fn(&Source) -> bool) -> Vec<String> {
        let mut names: Vec<String> = self
            .config
            .rtds()
            .filter(|(_, s)| source(&s.source))
            .map(|(n, _)| n.to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Whether every RTDS layer has had its first update (or its initial fetch ended otherwise).
    pub fn rtds_ready(&self) -> bool {
        lock(&self.rtds).values().all(|s| s.received)
    }

    /// The initial fetch ended without an update: count `init_fetch_timeout` and stop waiting.
    pub fn rtds_initial_fetch_timed_out(&self) {
        let mut rtds = lock(&self.rtds);
        if rtds.values().any(|s| !s.received) {
            self.rtds_stats.init_fetch_timeout.inc();
        }
        for s in rtds.values_mut() {
            s.received = true;
        }
    }

    /// A rejected or failed RTDS update still ends the initial fetch (Envoy's `onConfigUpdateFailed`).
    pub fn rtds_initial_done(&self, names: &[String]) {
        let mut rtds = lock(&self.rtds);
        for (i, s) in rtds.iter_mut() {
            if let Some(LayerKind::Rtds { name, .. }) = self.config.layers.get(*i).map(|l| &l.kind) {
                if names.contains(name) {
                    s.received = true;
                }
            }
        }
    }

    /// Apply an RTDS update: each `Runtime` resource replaces the layer of its `name`; a delta removal of a
    /// layer's name empties it. As Envoy's `RtdsSubscription`, an update must carry exactly one change for
    /// each layer it names, and the layer must be valid; otherwise nothing is applied and the errors are the
    /// NACK's `error_detail`.
    ///
    /// An update with nothing in it, before any layer has had a resource, is no update (Envoy's watch map
    /// delivers an empty state of the world only to a watch that held resources): it is accepted, and the
    /// initial fetch goes on waiting.
    pub fn apply_rtds(&self, resources: &[Resource], removed: &[String]) -> Result<(), ConfigErrors> {
        if resources.is_empty() && removed.is_empty() && !lock(&self.rtds).values().any(|s| s.received) {
            return Ok(());
        }
        self.rtds_stats.update_attempt.inc();
        let result = self.apply_rtds_inner(resources, removed);
        match &result {
            Ok(()) => {
                let hash = crate::xds::content_hash(resources.iter().map(|r| r.raw.as_ref()));
                self.rtds_stats.accepted(hash, true);
            }
            Err(e) => {
                self.rtds_stats.update_rejected.inc();
                tracing::warn!(errors = %e, "RTDS update rejected");
            }
        }
        result
    }

    fn apply_rtds_inner(&self, resources: &[Resource], removed: &[String]) -> Result<(), ConfigErrors> {
        let expected: Vec<String> = self.rtds_names(|_| true);
        if resources.len() + removed.len() == 0 {
            return Err(ConfigError::new(
                "resources",
                "Unexpected RTDS resource length, number of added resources 0, number of removed resources 0",
            )
            .into());
        }
        let mut errors = Vec::new();
        let mut updates: BTreeMap<String, Arc<BTreeMap<String, Entry>>> = BTreeMap::new();
        for (i, r) in resources.iter().enumerate() {
            let what = format!("runtime {:?}", r.name);
            if !expected.contains(&r.name) {
                errors.push(ConfigError {
                    source: Some(what),
                    path: "name".into(),
                    message: format!(
                        "Unexpected RTDS runtime (expecting {}): {}",
                        expected.join(", "),
                        r.name
                    ),
                });
                continue;
            }
            if updates.contains_key(&r.name) {
                errors.push(ConfigError {
                    source: Some(what),
                    path: "name".into(),
                    message: "duplicate runtime name in one update".into(),
                });
                continue;
            }
            let message = match r.message() {
                Ok(m) => m,
                Err(e) => {
                    errors.push(ConfigError {
                        source: Some(what),
                        path: format!("resources[{i}]"),
                        message: e.message,
                    });
                    continue;
                }
            };
            let layer = match message.get_field_by_name("layer").as_deref() {
                Some(PValue::Message(m)) if message.has_field_by_name("layer") => flatten_struct(m),
                _ => Ok(BTreeMap::new()),
            };
            match layer {
                Ok(v) => {
                    updates.insert(r.name.clone(), Arc::new(v));
                }
                Err(e) => errors.push(ConfigError {
                    source: Some(what),
                    path: format!("resources[{i}].layer"),
                    message: e,
                }),
            }
        }
        for n in removed {
            if !expected.contains(n) {
                errors.push(ConfigError::new(
                    "removed_resources",
                    format!(
                        "Unexpected removal of unknown RTDS runtime layer {n}, expected {}",
                        expected.join(", ")
                    ),
                ));
            } else {
                updates.entry(n.clone()).or_default();
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        {
            let mut rtds = lock(&self.rtds);
            for (i, s) in rtds.iter_mut() {
                if let Some(LayerKind::Rtds { name, .. }) = self.config.layers.get(*i).map(|l| &l.kind) {
                    if let Some(v) = updates.get(name) {
                        s.values = v.clone();
                        s.received = true;
                    }
                }
            }
        }
        self.reload();
        tracing::info!(layers = ?updates.keys().collect::<Vec<_>>(), "RTDS: runtime layer updated");
        Ok(())
    }

    /// Log the keys of a snapshot that no feature of Remora reads, each once (at start, and as layers bring
    /// new ones).
    fn log_unread_keys(&self, snap: &Snapshot) {
        let mut logged = lock(&self.logged_unread);
        let mut unread: Vec<&str> = snap
            .keys()
            .filter(|k| !keys::read_by_remora(k) && !logged.contains(*k))
            .collect();
        if unread.is_empty() {
            return;
        }
        unread.sort_unstable();
        logged.extend(unread.iter().map(|k| k.to_string()));
        tracing::info!(keys = ?unread, "runtime: these keys are kept (and shown by /runtime) but no Remora feature reads them");
    }
}

/// Read a disk layer's directory (Envoy's `DiskLayer::walkDirectory`).
fn read_disk_layer(path: &Path) -> Result<BTreeMap<String, Entry>, String> {
    fn walk(path: &Path, prefix: &str, depth: u32, out: &mut BTreeMap<String, Entry>) -> Result<(), String> {
        if depth > MAX_WALK_DEPTH {
            return Err(format!("Walk recursion depth exceeded {MAX_WALK_DEPTH}"));
        }
        let dir = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for entry in dir {
            let entry = entry.map_err(|e| format!("{}: {e}", path.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            let full = entry.path();
            // Envoy follows the entry's type as `readdir` reports it, and `stat`s symbolic links.
            let meta = std::fs::metadata(&full).map_err(|e| format!("{}: {e}", full.display()))?;
            if meta.is_dir() {
                walk(&full, &key, depth + 1, out)?;
            } else if meta.is_file() {
                let text = std::fs::read_to_string(&full).map_err(|e| format!("{}: {e}", full.display()))?;
                out.insert(key, Entry::from_text(&strip_comments(&text)));
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(path, "", 1, &mut out)?;
    Ok(out)
}

/// A file's value: lines starting with `#` dropped, the last line right-trimmed.
fn strip_comments(text: &str) -> String {
    let lines: Vec<&str> = text.split('\n').filter(|l| !l.is_empty()).collect();
    let mut value = String::new();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        if i + 1 == lines.len() {
            value.push_str(line.trim_end());
        } else {
            value.push_str(line);
            value.push('\n');
        }
    }
    value
}

/// Watch every disk layer's symlink root and reload when one changes (a symlink swap gives the root a new
/// target), polling as the other file watchers do ([`crate::xds::file::POLL`]).
pub fn watch_disk(rt: &Arc<Runtime>) {
    let mut roots: Vec<PathBuf> = rt
        .config
        .layers
        .iter()
        .filter_map(|l| match &l.kind {
            LayerKind::Disk { symlink_root, .. } => Some(symlink_root.clone()),
            _ => None,
        })
        .collect();
    roots.sort();
    roots.dedup();
    if roots.is_empty() {
        return;
    }
    let fingerprint = |roots: &[PathBuf]| -> Vec<_> {
        roots
            .iter()
            .map(|r| (std::fs::read_link(r).ok(), crate::xds::file::fingerprint(r, None)))
            .collect()
    };
    let mut last = fingerprint(&roots);
    let weak = Arc::downgrade(rt);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::xds::file::POLL);
        loop {
            tick.tick().await;
            let Some(rt) = weak.upgrade() else { break };
            let now = fingerprint(&roots);
            if now != last {
                last = now;
                tracing::info!("runtime: a disk layer's symlink root changed; reloading");
                rt.reload();
            }
        }
    });
}

#[cfg(test)]
mod tests;
