//! Lowering `envoy.config.bootstrap.v3.Bootstrap`.

use super::error::{ConfigError, ConfigErrors};
use super::node::{Errors, Node};
use super::{cluster, listener};
use crate::listener::config::ListenerConfig;
use crate::server::ClusterIds;
use crate::stats::tags::{TagProducer, TagSpecifier, TagValue, TagsConfig};
use crate::stats::{StatsMatcher, Store};
use crate::upstream::ClusterConfig;
use prost_reflect::DynamicMessage;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

/// `node`: who this proxy is, as the control plane and the admin see it.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub id: String,
    pub cluster: String,
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

/// `admin`.
#[derive(Clone, Debug)]
pub struct Admin {
    pub address: SocketAddr,
}

/// The lowered bootstrap: what the server runs.
#[derive(Debug)]
pub struct Bootstrap {
    pub node: NodeInfo,
    /// `cluster_manager.local_cluster_name`: the cluster of this service's own instances (zone-aware routing).
    pub local_cluster_name: Option<String>,
    pub admin: Option<Admin>,
    pub listeners: Vec<Arc<ListenerConfig>>,
    pub clusters: Vec<ClusterConfig>,
    /// The ids route tables were resolved against; the server keeps using them.
    pub cluster_ids: ClusterIds,
    /// The bootstrap as loaded (protobuf-encoded, so that no descriptor is held for it), for `/config_dump`
    /// and the control plane's `node`; [`Bootstrap::message`] decodes it.
    pub encoded: Vec<u8>,
    /// The store the listeners' stat handles live in; the server serves it.
    pub store: Arc<Store>,
    /// The access log files of every connection manager (flushed at exit, reopened by `/reopen_logs`).
    pub access_logs: Arc<crate::access_log::Manager>,
    /// `dynamic_resources`: where CDS and LDS come from.
    pub dynamic: crate::xds::DynamicResources,
    /// The RDS tables static listeners subscribed to; the server keeps using them.
    pub rds: crate::xds::RdsRegistry,
    /// `stats_config`: how the admin's Prometheus output turns stat names into names and labels.
    pub stats_tags: TagProducer,
    /// `layered_runtime`.
    pub runtime: crate::layered_runtime::RuntimeConfig,
    /// `overload_manager`'s downstream connections monitor: the most downstream connections all listeners
    /// (but those with `ignore_global_conn_limit`) may hold together.
    pub global_max_connections: Option<u64>,
}

impl Bootstrap {
    /// The bootstrap as loaded (decoding the descriptors again if they were released).
    pub fn message(&self) -> Option<DynamicMessage> {
        let desc = super::descriptors::message("envoy.config.bootstrap.v3.Bootstrap")?;
        DynamicMessage::decode(desc, self.encoded.as_slice()).ok()
    }
}

/// Lower a parsed bootstrap, collecting every error.
pub fn lower(msg: DynamicMessage, store: &Arc<Store>) -> Result<Bootstrap, ConfigErrors> {
    let errs = Errors::default();
    let ids = ClusterIds::default();
    let rds = crate::xds::RdsRegistry::default();
    // First `stats_config`: its stats_matcher decides which of the stats created from here on exist.
    let stats_tags = {
        let root = Node::root(&msg, "", &errs);
        root.mark_all();
        root.msg("stats_config")
            .map(|s| lower_stats_config(&s, store))
            .unwrap_or_default()
    };
    let logs =
        match crate::access_log::Manager::new(&store.scope(""), crate::access_log::DEFAULT_FLUSH_INTERVAL) {
            Ok(m) => Arc::new(m),
            Err(e) => return Err(single("", format!("cannot start the access log writer: {e}"))),
        };
    let (node, admin, listeners, clusters, dynamic, local_cluster_name, runtime, global_max_connections) = {
        let root = Node::root(&msg, "", &errs);
        let node = root.msg("node").map(|n| lower_node(&n)).unwrap_or_default();
        let admin = root.msg("admin").and_then(|a| lower_admin(&a));
        let dynamic = root
            .msg("dynamic_resources")
            .map(|d| crate::xds::lower_dynamic_resources(&d))
            .unwrap_or_default();
        let (listeners, clusters) = match root.msg("static_resources") {
            Some(sr) => {
                let clusters: Vec<ClusterConfig> =
                    sr.list("clusters").iter().filter_map(cluster::lower).collect();
                let mut names = HashSet::new();
                for (i, c) in clusters.iter().enumerate() {
                    if !names.insert(c.name.clone()) {
                        errs.push(
                            format!("static_resources.clusters[{i}].name"),
                            format!("duplicate cluster name {:?}", c.name),
                        );
                    }
                }
                let sources = crate::xds::SourceCheck::new(&clusters, dynamic.ads.is_some());
                for (i, c) in clusters.iter().enumerate() {
                    if let crate::upstream::Discovery::Eds { source, .. } = &c.discovery {
                        if let Some((path, why)) = sources.check(source) {
                            errs.push(
                                format!(
                                    "static_resources.clusters[{i}].eds_cluster_config.eds_config.{path}"
                                ),
                                why,
                            );
                        }
                    }
                }
                let ctx = listener::Ctx {
                    ids: &ids,
                    store,
                    logs: &logs,
                    static_clusters: &names,
                    rds: &rds,
                    sources: Some(&sources),
                };
                let listeners: Vec<Arc<ListenerConfig>> = sr
                    .list("listeners")
                    .iter()
                    .filter_map(|l| listener::lower(l, &ctx))
                    .map(Arc::new)
                    .collect();
                let mut lnames = HashSet::new();
                for (i, l) in listeners.iter().enumerate() {
                    if !lnames.insert(l.name.clone()) {
                        errs.push(
                            format!("static_resources.listeners[{i}].name"),
                            format!("duplicate listener name {:?}", l.name),
                        );
                    }
                }
                sr.unsupported("secrets");
                (listeners, clusters)
            }
            None => (Vec::new(), Vec::new()),
        };
        let mut control_planes = Vec::new();
        if let Some(crate::xds::GrpcTarget::Cluster(name)) = dynamic.ads.as_ref().map(|a| &a.target) {
            control_planes.push((
                "ads_config.grpc_services[0].envoy_grpc.cluster_name".to_string(),
                name.as_str(),
            ));
        }
        for (what, source) in [("cds_config", &dynamic.cds), ("lds_config", &dynamic.lds)] {
            if let Some((path, name)) = source.as_ref().and_then(|s| s.control_plane_cluster()) {
                control_planes.push((format!("{what}.{path}"), name));
            }
        }
        let runtime = root
            .msg("layered_runtime")
            .map(|n| crate::layered_runtime::lower(&n))
            .unwrap_or_default();
        for (i, l) in runtime.layers.iter().enumerate() {
            if let crate::layered_runtime::LayerKind::Rtds { source, .. } = &l.kind {
                if let Some((path, name)) = source.control_plane_cluster() {
                    control_planes.push((
                        format!("layered_runtime.layers[{i}].rtds_layer.rtds_config.{path}"),
                        name,
                    ));
                }
                if source.source == crate::xds::Source::Ads && dynamic.ads.is_none() {
                    errs.push(
                        format!("layered_runtime.layers[{i}].rtds_layer.rtds_config.ads"),
                        "a config source says ads, but there is no dynamic_resources.ads_config",
                    );
                }
            }
        }
        for (path, name) in control_planes {
            if !clusters.iter().any(|c| c.name == name) {
                let path = if path.starts_with("layered_runtime.") {
                    path
                } else {
                    format!("dynamic_resources.{path}")
                };
                errs.push(path, format!("unknown static cluster {name:?}"));
            }
        }
        let mut local_cluster_name = None;
        if let Some(cm) = root.msg("cluster_manager") {
            local_cluster_name = cm.string("local_cluster_name").filter(|n| !n.is_empty());
            if let Some(name) = &local_cluster_name {
                if !clusters.iter().any(|c: &ClusterConfig| &c.name == name) {
                    cm.err(
                        "local_cluster_name",
                        format!("local cluster {name:?} must be defined in static_resources"),
                    );
                }
            }
            for f in [
                "outlier_detection",
                "upstream_bind_config",
                "load_stats_config",
                "enable_deferred_cluster_creation",
            ] {
                cm.unsupported(f);
            }
        }
        root.mark("stats_config");
        root.unsupported("stats_sinks");
        let global_max_connections = root
            .msg("overload_manager")
            .and_then(|o| lower_overload_manager(&o));
        // Deferred creation of cluster traffic stats saves memory in Envoy and changes nothing a request sees;
        // Remora creates a cluster's per-code counters on first use already, the rest with the cluster (so
        // /stats lists them at 0 where Envoy would list them after the first request). Said once, at start.
        if let Some(d) = root.msg("deferred_stat_options") {
            if d.bool("enable_deferred_creation_stats") {
                tracing::info!(
                    "deferred_stat_options.enable_deferred_creation_stats: a cluster's traffic stats exist from its \
                     creation in Remora (per-code counters from their first use)"
                );
            }
        }
        root.unsupported("tracing");
        (
            node,
            admin,
            listeners,
            clusters,
            dynamic,
            local_cluster_name,
            runtime,
            global_max_connections,
        )
    };
    let found = errs.take();
    if !found.is_empty() {
        return Err(ConfigErrors(found));
    }
    Ok(Bootstrap {
        node,
        local_cluster_name,
        admin,
        listeners,
        clusters,
        cluster_ids: ids,
        encoded: prost::Message::encode_to_vec(&msg),
        store: store.clone(),
        access_logs: logs,
        dynamic,
        rds,
        stats_tags,
        runtime,
        global_max_connections,
    })
}

/// `overload_manager`: of its resource monitors, the global downstream connection limit
/// (`envoy.resource_monitors.global_downstream_max_connections`, `DownstreamConnectionsConfig`), which
/// listeners enforce on accept unless they set `ignore_global_conn_limit`; overload actions are refused.
fn lower_overload_manager(o: &Node) -> Option<u64> {
    // Remora samples no resource: the connection count is kept exactly, not refreshed.
    o.mark("refresh_interval");
    o.unsupported("actions");
    o.unsupported("buffer_factory_config");
    o.unsupported("loadshed_points");
    let mut max = None;
    for m in o.list("resource_monitors") {
        m.mark("name");
        let Some(t) = m.any("typed_config") else {
            m.err("typed_config", "a resource monitor needs a typed_config");
            continue;
        };
        if t.type_name()
            != "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
        {
            t.err_here(format!("{} is not supported by Remora", t.type_name()));
            t.mark_all();
            continue;
        }
        let n = t.i64("max_active_downstream_connections");
        if n <= 0 {
            t.err("max_active_downstream_connections", "must be greater than 0");
        } else if max.is_some() {
            m.err_here("only one downstream connections monitor may be configured");
        } else {
            max = Some(n as u64);
        }
    }
    max
}

/// `stats_config`: tag extraction (`stats_tags`, `use_all_default_tags`, `allow_default_tag_overrides`) and
/// `stats_matcher` (set on `store`). `histogram_bucket_settings` is refused.
fn lower_stats_config(n: &Node, store: &Store) -> TagProducer {
    let list = n.list("stats_tags");
    let cfg = TagsConfig {
        stats_tags: list
            .iter()
            .map(|t| TagSpecifier {
                tag_name: t.string("tag_name").unwrap_or_default(),
                value: match (t.string("regex"), t.string("fixed_value")) {
                    (Some(r), _) => TagValue::Regex(r),
                    (None, Some(v)) => TagValue::Fixed(v),
                    (None, None) => TagValue::Default,
                },
            })
            .collect(),
        use_all_default_tags: n.wrapped_bool("use_all_default_tags").unwrap_or(true),
        allow_default_tag_overrides: n.wrapped_bool("allow_default_tag_overrides").unwrap_or(false),
    };
    if let Some(m) = n.msg("stats_matcher").and_then(|m| lower_stats_matcher(&m)) {
        store.set_matcher(m);
    }
    n.unsupported("histogram_bucket_settings");
    match TagProducer::new(&cfg) {
        Ok(p) => p,
        Err(e) => {
            if let Some(t) = list.get(e.index) {
                t.err(e.field, e.message);
            }
            TagProducer::default()
        }
    }
}

/// `stats_matcher`: `reject_all`, or an `exclusion_list` or `inclusion_list` of string matchers.
fn lower_stats_matcher(m: &Node) -> Option<StatsMatcher> {
    let list = |name: &str| -> Option<Vec<crate::route::StringMatcher>> {
        let l = m.msg(name)?;
        let patterns = l.list("patterns");
        Some(patterns.iter().filter_map(super::route::string_matcher).collect())
    };
    if m.bool("reject_all") {
        Some(StatsMatcher::RejectAll)
    } else if let Some(p) = list("exclusion_list") {
        Some(StatsMatcher::Exclusion(p))
    } else {
        list("inclusion_list").map(StatsMatcher::Inclusion)
    }
}

fn lower_node(n: &Node) -> NodeInfo {
    let mut info = NodeInfo {
        id: n.string("id").unwrap_or_default(),
        cluster: n.string("cluster").unwrap_or_default(),
        ..Default::default()
    };
    if let Some(l) = n.msg("locality") {
        info.region = l.string("region").unwrap_or_default();
        info.zone = l.string("zone").unwrap_or_default();
        info.sub_zone = l.string("sub_zone").unwrap_or_default();
    }
    // Identity sent to a control plane; Remora reports it as given.
    n.mark("metadata");
    n.mark("user_agent_name");
    n.mark("user_agent_version");
    n.mark("user_agent_build_version");
    n.mark("extensions");
    n.mark("client_features");
    info
}

fn lower_admin(a: &Node) -> Option<Admin> {
    // The admin's own access log: only the null device, which is what logging nothing means.
    if let Some(p) = a.string("access_log_path") {
        if p != "/dev/null" {
            a.err(
                "access_log_path",
                "an admin access log other than /dev/null is not supported by Remora",
            );
        }
    }
    // Likewise an `access_log` list whose loggers all write to /dev/null (Envoy Gateway's bootstrap has one).
    for (i, l) in a.list("access_log").iter().enumerate() {
        let null = l
            .any("typed_config")
            .filter(|t| t.type_name() == "envoy.extensions.access_loggers.file.v3.FileAccessLog")
            .is_some_and(|t| {
                t.mark_all();
                t.string("path").as_deref() == Some("/dev/null") && !t.has("log_format") && !t.has("format")
            });
        l.mark_all();
        if !null {
            a.err(
                &format!("access_log[{i}]"),
                "an admin access log other than a file logger to /dev/null is not supported by Remora",
            );
        }
    }
    a.unsupported("profile_path");
    a.unsupported("socket_options");
    a.unsupported("ignore_global_conn_limit");
    let addr = a.msg("address");
    match addr {
        Some(addr) => socket_address(&addr),
        None => {
            a.err("address", "the admin needs an address");
            None
        }
    }
    .map(|address| Admin { address })
}

/// An `envoy.config.core.v3.Address` that must be an IP and port.
pub fn socket_address(a: &Node) -> Option<SocketAddr> {
    let (host, port) = host_port(a)?;
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Some(SocketAddr::new(ip, port)),
        Err(_) => {
            a.err("socket_address.address", format!("{host:?} is not an IP address"));
            None
        }
    }
}

/// An `envoy.config.core.v3.Address` as a host (an IP or a DNS name) and a port.
pub fn host_port(a: &Node) -> Option<(String, u16)> {
    a.unsupported("pipe");
    a.unsupported("envoy_internal_address");
    let Some(sa) = a.msg("socket_address") else {
        a.err_here("needs socket_address");
        return None;
    };
    let proto = sa.enum_name("protocol");
    if proto != "TCP" {
        sa.err("protocol", format!("{proto} is not supported by Remora"));
    }
    sa.unsupported("resolver_name");
    sa.unsupported("named_port");
    sa.mark("ipv4_compat");
    let host = sa.string("address").unwrap_or_default();
    let port = sa.u32("port_value");
    if port > 65535 {
        sa.err("port_value", format!("{port} is not a port"));
        return None;
    }
    if host.is_empty() {
        sa.err("address", "is required");
        return None;
    }
    Some((host, port as u16))
}

/// Errors found outside the lowering walk (e.g. while reading a file) as [`ConfigErrors`].
pub fn single(path: &str, msg: impl Into<String>) -> ConfigErrors {
    ConfigErrors(vec![ConfigError::new(path, msg)])
}
