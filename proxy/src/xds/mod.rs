//! Dynamic configuration: the xDS client and the state it feeds.
//!
//! - [`manager`] owns every dynamically configured cluster, listener and route table, and applies an update
//!   of one resource type atomically: all of it is lowered first, and either all of it takes effect or none
//!   does (the errors, with their field paths, become the NACK's `error_detail`).
//! - [`file`] watches `path_config_source` files (CDS, LDS, EDS and RDS from the filesystem).
//! - [`ads`] speaks the aggregated discovery service over gRPC, state-of-the-world and delta (and a resource
//!   type's own discovery service, for an `api_config_source` of its own: one stream per config source and
//!   type, shared by the EDS clusters or connection managers that name it).
//! - [`rest`] polls a management server over REST-JSON (`api_type: REST`).
//!
//! What is read from the bootstrap is lowered here: `dynamic_resources` and the `ConfigSource`s that name
//! where each resource type comes from.

pub mod ads;
pub(crate) mod dial;
pub mod file;
pub mod manager;
pub mod rest;

use crate::config::error::{ConfigError, ConfigErrors};
use crate::config::node::Node;
use crate::route::RouteTable;
use crate::stats::{Counter, Gauge, Scope, Store};
use arc_swap::ArcSwap;
use prost_reflect::{DynamicMessage, ReflectMessage};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Envoy's default `initial_fetch_timeout`.
pub const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Where one resource type comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// `ads: {}`: the aggregated stream of `dynamic_resources.ads_config`.
    Ads,
    /// `api_config_source` (GRPC or DELTA_GRPC): a stream of the resource type's own discovery service
    /// (`ClusterDiscoveryService/StreamClusters`, ...), apart from ADS.
    Api(GrpcApiConfig),
    /// `api_config_source` with `api_type: REST`: polled ([`rest`]).
    Rest(rest::RestConfig),
    /// `path_config_source` (or the deprecated `path`): a file holding a `DiscoveryResponse`.
    Path {
        path: PathBuf,
        /// `watched_directory`: reload when this directory changes (an atomic rename into it).
        watched_directory: Option<PathBuf>,
    },
}

/// A lowered `envoy.config.core.v3.ConfigSource`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceConfig {
    pub source: Source,
    /// `initial_fetch_timeout` (default 15 s); `None` when set to 0, which waits for ever.
    pub initial_fetch_timeout: Option<Duration>,
}

impl SourceConfig {
    /// The static cluster that reaches the management server, with its path under the config source.
    pub fn control_plane_cluster(&self) -> Option<(&'static str, &str)> {
        match &self.source {
            Source::Api(GrpcApiConfig {
                target: GrpcTarget::Cluster(c),
                ..
            }) => Some(("api_config_source.grpc_services[0].envoy_grpc.cluster_name", c)),
            Source::Rest(r) => Some(("api_config_source.cluster_names[0]", &r.cluster_name)),
            _ => None,
        }
    }
}

/// `ApiConfigSource.api_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiType {
    Grpc,
    DeltaGrpc,
}

/// Where a gRPC control plane is (`grpc_services[0]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GrpcTarget {
    /// `envoy_grpc.cluster_name`: a static cluster that reaches the control plane (its hosts in turn).
    Cluster(String),
    /// `google_grpc.target_uri` (`host:port`, or `dns:///host:port`), reached over h2c, or over TLS with
    /// `channel_credentials.ssl_credentials`.
    Uri(String, Option<SslCredentials>),
}

/// `google_grpc.channel_credentials.ssl_credentials`, as read at lowering (PEM). As gRPC does, the server's
/// certificate must chain to `root_certs` and name the target's host (DNS name or IP address); `cert_chain`
/// and `private_key` are the client certificate (mTLS).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SslCredentials {
    pub root_certs: Vec<u8>,
    pub cert_chain: Option<Vec<u8>>,
    pub private_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for SslCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SslCredentials")
            .field("client_certificate", &self.cert_chain.is_some())
            .finish_non_exhaustive()
    }
}

/// A gRPC `ApiConfigSource`: `dynamic_resources.ads_config`, or a config source's `api_config_source`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GrpcApiConfig {
    pub api_type: ApiType,
    pub target: GrpcTarget,
    /// `set_node_on_first_message_only`.
    pub node_on_first_message_only: bool,
}

/// What a config source may name: Envoy reaches a control plane only through a statically defined non-EDS
/// cluster, and `ads` needs `dynamic_resources.ads_config`.
#[derive(Clone, Debug, Default)]
pub struct SourceCheck {
    /// The static clusters that are not EDS.
    pub clusters: std::collections::HashSet<String>,
    /// Whether the bootstrap has `ads_config`.
    pub ads: bool,
}

impl SourceCheck {
    pub fn new(static_clusters: &[crate::upstream::ClusterConfig], ads: bool) -> Self {
        SourceCheck {
            clusters: static_clusters
                .iter()
                .filter(|c| !matches!(c.discovery, crate::upstream::Discovery::Eds { .. }))
                .map(|c| c.name.clone())
                .collect(),
            ads,
        }
    }

    /// What is wrong with `src`: the path inside the config source and the message.
    pub fn check(&self, src: &SourceConfig) -> Option<(String, String)> {
        if src.source == Source::Ads && !self.ads {
            return Some((
                "ads".into(),
                "says ads, but the bootstrap has no dynamic_resources.ads_config".into(),
            ));
        }
        let (path, name) = src.control_plane_cluster()?;
        if self.clusters.contains(name) {
            return None;
        }
        Some((
            path.into(),
            format!("unknown static cluster {name:?} (a control plane is reached through a static non-EDS cluster)"),
        ))
    }
}

/// `dynamic_resources`, lowered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DynamicResources {
    pub ads: Option<GrpcApiConfig>,
    pub cds: Option<SourceConfig>,
    pub lds: Option<SourceConfig>,
}

impl DynamicResources {
    pub fn is_empty(&self) -> bool {
        self.cds.is_none() && self.lds.is_none()
    }

    /// Whether any resource comes from a gRPC control plane.
    pub fn uses_grpc(&self) -> bool {
        self.ads.is_some()
            || [&self.cds, &self.lds]
                .iter()
                .any(|s| s.as_ref().is_some_and(|s| matches!(s.source, Source::Api(_))))
    }
}

/// Lower a `ConfigSource` (of CDS, LDS, or an EDS cluster's or a connection manager's RDS).
pub fn lower_config_source(n: &Node) -> Option<SourceConfig> {
    let initial_fetch_timeout = match n.duration("initial_fetch_timeout") {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => Some(DEFAULT_INITIAL_FETCH_TIMEOUT),
    };
    let api = n.enum_name("resource_api_version");
    if api != "V3" && api != "AUTO" {
        n.err(
            "resource_api_version",
            format!("{api} is not supported by Remora"),
        );
    }
    n.unsupported("authorities");
    n.unsupported("self");
    let api = n.msg("api_config_source").map(|a| {
        if a.enum_name("api_type") == "REST" {
            lower_rest(&a).map(Source::Rest)
        } else {
            lower_grpc_api(&a, false).map(Source::Api)
        }
    });
    let ads = n.msg("ads").is_some();
    let path = n.string("path").filter(|p| !p.is_empty());
    let pcs = n.msg("path_config_source").map(|p| {
        let path = p.string("path").unwrap_or_default();
        if path.is_empty() {
            p.err("path", "is required");
        }
        let dir = p
            .msg("watched_directory")
            .and_then(|w| w.string("path"))
            .filter(|d| !d.is_empty())
            .map(PathBuf::from);
        (PathBuf::from(path), dir)
    });
    let set = usize::from(ads)
        + usize::from(path.is_some())
        + usize::from(pcs.is_some())
        + usize::from(api.is_some());
    if set > 1 {
        n.err_here("only one of ads, api_config_source, path and path_config_source may be set");
        return None;
    }
    let source = match (ads, path, pcs, api) {
        (true, ..) => Source::Ads,
        (_, Some(p), ..) => Source::Path {
            path: PathBuf::from(p),
            watched_directory: None,
        },
        (_, _, Some((path, watched_directory)), _) => Source::Path {
            path,
            watched_directory,
        },
        (_, _, _, Some(api)) => api?,
        (false, None, None, None) => {
            n.err_here(
                "needs ads, api_config_source or path_config_source (other config sources are not supported by Remora)",
            );
            return None;
        }
    };
    Some(SourceConfig {
        source,
        initial_fetch_timeout,
    })
}

/// Lower `dynamic_resources`.
pub fn lower_dynamic_resources(d: &Node) -> DynamicResources {
    let cds = d.msg("cds_config").and_then(|c| lower_config_source(&c));
    let lds = d.msg("lds_config").and_then(|c| lower_config_source(&c));
    d.unsupported("cds_resources_locator");
    d.unsupported("lds_resources_locator");
    d.unsupported("default_config_source");
    let ads = d.msg("ads_config").and_then(|a| lower_grpc_api(&a, true));
    let uses_ads = [&cds, &lds]
        .iter()
        .any(|s| s.as_ref().is_some_and(|s| s.source == Source::Ads));
    if uses_ads && ads.is_none() && !d.has("ads_config") {
        d.err(
            "ads_config",
            "a config source says ads, but there is no ads_config",
        );
    }
    DynamicResources { ads, cds, lds }
}

/// Whether a static EDS cluster or connection manager takes its resources from a gRPC `api_config_source`
/// (which, like ADS, makes `control_plane.connected_state` exist from the start).
pub fn static_sources_use_grpc(b: &crate::config::bootstrap::Bootstrap) -> bool {
    let eds = b.clusters.iter().any(|c| {
        matches!(&c.discovery, crate::upstream::Discovery::Eds { source, .. } if matches!(source.source, Source::Api(_)))
    });
    eds || b.rds.sources().iter().any(|s| matches!(s.source, Source::Api(_)))
}

/// Lower a gRPC `ApiConfigSource` (`ads` for `dynamic_resources.ads_config`).
fn lower_grpc_api(a: &Node, ads: bool) -> Option<GrpcApiConfig> {
    let api_type = match a.enum_name("api_type").as_str() {
        "GRPC" => ApiType::Grpc,
        "DELTA_GRPC" => ApiType::DeltaGrpc,
        other => {
            let why = if ads {
                format!("{other} is not supported by Remora for ADS")
            } else {
                format!("{other} is not supported by Remora (GRPC and DELTA_GRPC are)")
            };
            a.err("api_type", why);
            // The rest of the source (REST's `cluster_names`, `refresh_delay`, ...) goes with it.
            a.mark_all();
            return None;
        }
    };
    a.mark("transport_api_version");
    let node_on_first_message_only = a.bool("set_node_on_first_message_only");
    a.unsupported("cluster_names");
    a.unsupported("refresh_delay");
    a.unsupported("request_timeout");
    a.unsupported("rate_limit_settings");
    a.unsupported("config_validators");
    let services = a.list("grpc_services");
    if services.len() != 1 {
        a.err("grpc_services", "exactly one gRPC service is supported by Remora");
    }
    let g = services.first()?;
    g.unsupported("initial_metadata");
    g.unsupported("retry_policy");
    // A per-call deadline; the stream lives for as long as the connection.
    g.mark("timeout");
    let target = if let Some(e) = g.msg("envoy_grpc") {
        let cluster_name = e.string("cluster_name").unwrap_or_default();
        if cluster_name.is_empty() {
            e.err("cluster_name", "is required");
        }
        e.mark("authority");
        e.unsupported("retry_policy");
        e.unsupported("max_receive_message_length");
        e.unsupported("skip_envoy_headers");
        GrpcTarget::Cluster(cluster_name)
    } else if let Some(gg) = g.msg("google_grpc") {
        let uri = lower_target_uri(&gg)?;
        gg.mark("stat_prefix");
        let tls = gg
            .msg("channel_credentials")
            .and_then(|c| lower_ssl_credentials(&c));
        gg.unsupported("channel_credentials_plugin");
        gg.unsupported("call_credentials");
        gg.unsupported("call_credentials_plugin");
        gg.unsupported("credentials_factory_name");
        gg.unsupported("config");
        gg.unsupported("per_stream_buffer_limit_bytes");
        gg.unsupported("channel_args");
        GrpcTarget::Uri(uri, tls)
    } else {
        g.err_here("needs envoy_grpc or google_grpc");
        return None;
    };
    Some(GrpcApiConfig {
        api_type,
        target,
        node_on_first_message_only,
    })
}

/// `google_grpc.channel_credentials`: `ssl_credentials` only (Remora has no system trust store, so
/// `root_certs` is required). The PEM is parsed now so that a bad one refuses the config with its path.
fn lower_ssl_credentials(c: &Node) -> Option<SslCredentials> {
    c.unsupported("google_default");
    c.unsupported("local_credentials");
    let ssl = c.msg("ssl_credentials")?;
    let source = |f: &str| ssl.msg(f).and_then(|d| crate::config::tls::data_source(&d));
    let root_certs = source("root_certs");
    let cert_chain = source("cert_chain");
    let private_key = source("private_key");
    if !ssl.has("root_certs") {
        ssl.err(
            "root_certs",
            "is required by Remora (it has no system trust store to default to)",
        );
    }
    if let Some(Err(e)) = root_certs
        .as_ref()
        .map(|r| crate::tls::parse_ca(r, "root_certs".into()))
    {
        ssl.err("root_certs", e);
    }
    match (&cert_chain, &private_key) {
        (Some(chain), Some(key)) => {
            if let Err(e) = crate::tls::parse_identity(chain, key, "cert_chain".into()) {
                ssl.err("cert_chain", e);
            }
        }
        (None, None) => {}
        _ if ssl.has("cert_chain") != ssl.has("private_key") => {
            ssl.err_here("cert_chain and private_key go together");
        }
        // One of them did not read; its error is already there.
        _ => {}
    }
    Some(SslCredentials {
        root_certs: root_certs?,
        cert_chain,
        private_key,
    })
}

/// Lower a REST `ApiConfigSource` (see [`rest`]).
fn lower_rest(a: &Node) -> Option<rest::RestConfig> {
    a.mark("api_type");
    a.mark("transport_api_version");
    // Only the gRPC streams send the node once.
    a.mark("set_node_on_first_message_only");
    let names = a.strings("cluster_names");
    if names.len() != 1 {
        a.err("cluster_names", "exactly one cluster is required for REST");
    }
    if a.has("grpc_services") {
        a.err("grpc_services", "is not allowed with api_type REST");
        a.mark("grpc_services");
    }
    a.unsupported("rate_limit_settings");
    a.unsupported("config_validators");
    let second = Duration::from_secs(1);
    let refresh_delay = a.duration("refresh_delay").unwrap_or(second);
    let request_timeout = a.duration("request_timeout").unwrap_or(second);
    if refresh_delay.is_zero() {
        a.err("refresh_delay", "must be greater than 0");
    }
    Some(rest::RestConfig {
        cluster_name: names.into_iter().next()?,
        refresh_delay,
        request_timeout,
    })
}

/// `google_grpc.target_uri` as `host:port`: plain, or gRPC's `dns:///host:port` and `ipv4:`/`ipv6:` forms.
fn lower_target_uri(gg: &Node) -> Option<String> {
    let uri = gg.string("target_uri").unwrap_or_default();
    let hostport = uri
        .strip_prefix("dns:///")
        .or_else(|| uri.strip_prefix("dns:"))
        .or_else(|| uri.strip_prefix("ipv4:"))
        .or_else(|| uri.strip_prefix("ipv6:"))
        .unwrap_or(&uri);
    let valid = !hostport.is_empty()
        && !hostport.contains('/')
        && !hostport.contains(',')
        && hostport
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !valid {
        gg.err(
            "target_uri",
            format!(
                "{uri:?} is not a host:port Remora can reach (dns:///host:port and ipv4:addr:port also work)"
            ),
        );
        return None;
    }
    Some(hostport.to_string())
}

/// The statistics of one subscription (`configuration/overview/mgmt_server.rst`, "xDS subscription
/// statistics"), under `cluster_manager.cds.`, `listener_manager.lds.`, `http.<prefix>.rds.<name>.` or
/// `cluster.<name>.`.
#[derive(Clone, Debug)]
pub struct SubscriptionStats {
    pub config_reload: Counter,
    pub init_fetch_timeout: Counter,
    pub update_attempt: Counter,
    pub update_success: Counter,
    pub update_failure: Counter,
    pub update_rejected: Counter,
    /// Milliseconds since the epoch of the last successful update.
    pub update_time: Gauge,
    /// A hash of the contents of the last accepted update.
    pub version: Gauge,
}

impl SubscriptionStats {
    pub fn new(scope: &Scope) -> Self {
        SubscriptionStats {
            config_reload: scope.counter("config_reload"),
            init_fetch_timeout: scope.counter("init_fetch_timeout"),
            update_attempt: scope.counter("update_attempt"),
            update_success: scope.counter("update_success"),
            update_failure: scope.counter("update_failure"),
            update_rejected: scope.counter("update_rejected"),
            update_time: scope.gauge("update_time"),
            version: scope.gauge("version"),
        }
    }

    /// Record an accepted update whose contents hash to `hash`; `changed` when it changed the config.
    pub fn accepted(&self, hash: u64, changed: bool) {
        self.update_success.inc();
        if changed {
            self.config_reload.inc();
        }
        self.version.set((hash >> 1) as i64);
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.update_time.set(ms);
    }
}

/// FNV-1a over byte strings: the `version` gauge's hash, stable across runs.
pub fn content_hash<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One RDS route table, shared by every connection manager that names it.
#[derive(Debug)]
pub struct RdsRoute {
    pub name: String,
    /// `rds.config_source` of the connection managers that name it.
    pub source: SourceConfig,
    /// What the connection managers read; an empty table (every request a 404 NR) until the first update.
    pub table: Arc<ArcSwap<RouteTable>>,
    pub stats: SubscriptionStats,
    pub state: Mutex<RdsState>,
}

/// What `/config_dump` shows of an RDS table, and whether it has arrived.
#[derive(Debug, Default)]
pub struct RdsState {
    pub received: bool,
    /// The table's `initial_fetch_timeout` passed before it arrived: the listeners that wait for it serve with
    /// the empty table (every request a 404 NR) until it does, as in Envoy.
    pub timed_out: bool,
    pub version: String,
    pub message: Option<DynamicMessage>,
    pub last_updated: Option<SystemTime>,
    pub raw: Vec<u8>,
}

impl RdsRoute {
    pub fn received(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).received
    }

    /// Whether the listeners that name this table may serve: it arrived, or its fetch timed out.
    pub fn ready(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.received || st.timed_out
    }

    /// The fetch timed out: counts `init_fetch_timeout` the first time, while the table has not arrived.
    /// Whether this changed anything.
    pub fn time_out(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.received || st.timed_out {
            return false;
        }
        st.timed_out = true;
        self.stats.init_fetch_timeout.inc();
        true
    }
}

/// Route tables by `route_config_name`. Connection managers subscribe while they are lowered; the RDS
/// subscription asks for every name here.
#[derive(Debug, Default)]
pub struct RdsRegistry(Mutex<BTreeMap<String, Arc<RdsRoute>>>);

impl RdsRegistry {
    /// The table named `name`, created on first use with its stats under `http.<stat_prefix>.rds.<name>.`
    /// (the first connection manager to name it, as in Envoy). Envoy keeps one subscription per name and
    /// config source; Remora one per name, so a second config source for a name is refused.
    pub fn subscribe(
        &self,
        name: &str,
        stat_prefix: &str,
        store: &Arc<Store>,
        source: &SourceConfig,
    ) -> Result<Arc<ArcSwap<RouteTable>>, String> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = m.get(name) {
            if e.source.source != source.source {
                return Err(format!(
                    "route configuration {name:?} is already subscribed to from another config source \
                     (Remora takes each route configuration name from one source)"
                ));
            }
        }
        let entry = m.entry(name.to_string()).or_insert_with(|| {
            Arc::new(RdsRoute {
                name: name.to_string(),
                source: source.clone(),
                table: Arc::new(ArcSwap::from_pointee(RouteTable::new(
                    name.to_string(),
                    Vec::new(),
                ))),
                stats: SubscriptionStats::new(&store.scope(format!("http.{stat_prefix}.rds.{name}."))),
                state: Mutex::default(),
            })
        });
        Ok(entry.table.clone())
    }

    /// The subscribed names whose config source is `source`, sorted.
    pub fn names_from(&self, source: &Source) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|r| r.source.source == *source)
            .map(|r| r.name.clone())
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<RdsRoute>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every subscribed name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The distinct config sources of the subscribed names.
    pub fn sources(&self) -> Vec<SourceConfig> {
        let mut out: Vec<SourceConfig> = Vec::new();
        for r in self.0.lock().unwrap_or_else(|e| e.into_inner()).values() {
            if !out.iter().any(|o| o.source == r.source.source) {
                out.push(r.source.clone());
            }
        }
        out
    }

    pub fn all(&self) -> Vec<Arc<RdsRoute>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Decode one `google.protobuf.Any` that must hold a `type_url` resource (or a `Resource` wrapping one).
fn decode_any(any: &DynamicMessage, type_url: &str, path: &str) -> Result<manager::Resource, ConfigError> {
    use prost_reflect::Value;
    let url = any
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let bytes = match any.get_field_by_name("value").as_deref() {
        Some(Value::Bytes(b)) => b.clone(),
        _ => Default::default(),
    };
    if url == "type.googleapis.com/envoy.service.discovery.v3.Resource" {
        let desc = crate::config::descriptors::message("envoy.service.discovery.v3.Resource")
            .ok_or_else(|| ConfigError::new(path, "no descriptor for Resource"))?;
        let wrapper =
            DynamicMessage::decode(desc, bytes).map_err(|e| ConfigError::new(path, e.to_string()))?;
        return decode_wrapped(&wrapper, type_url, path);
    }
    if url != type_url {
        return Err(ConfigError::new(
            format!("{path}.type_url"),
            format!("{url:?} where {type_url:?} was expected"),
        ));
    }
    let desc = crate::config::descriptors::message_for_type_url(&url)
        .ok_or_else(|| ConfigError::new(path, format!("unknown type {url:?}")))?;
    let name = wire_name(&bytes).map_err(|e| ConfigError::new(path, format!("{url}: {e}")))?;
    Ok(manager::Resource {
        name,
        version: String::new(),
        raw: bytes,
        descriptor: desc,
    })
}

/// Field 1 of an encoded resource, read off the wire without decoding it: the name of a `Cluster`, `Listener`
/// or `RouteConfiguration`, the `cluster_name` of a `ClusterLoadAssignment` (the last occurrence, as protobuf
/// reads a repeated scalar field). Fails on bytes that are not a protobuf message.
fn wire_name(mut b: &[u8]) -> Result<String, String> {
    use prost::encoding::decode_varint;
    let mut name = String::new();
    while !b.is_empty() {
        let tag = decode_varint(&mut b).map_err(|e| e.to_string())?;
        let skip = match tag & 7 {
            0 => {
                decode_varint(&mut b).map_err(|e| e.to_string())?;
                0
            }
            1 => 8,
            2 => {
                let len = usize::try_from(decode_varint(&mut b).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
                if len > b.len() {
                    return Err("a field runs past the end of the message".into());
                }
                if tag >> 3 == 1 {
                    name = std::str::from_utf8(&b[..len])
                        .map_err(|_| "the name is not UTF-8".to_string())?
                        .to_string();
                }
                len
            }
            5 => 4,
            w => return Err(format!("wire type {w} is not valid here")),
        };
        if skip > b.len() {
            return Err("a field runs past the end of the message".into());
        }
        b = &b[skip..];
    }
    Ok(name)
}

/// Decode an `envoy.service.discovery.v3.Resource` (delta responses): its `resource`, `name` and `version`.
fn decode_wrapped(
    wrapper: &DynamicMessage,
    type_url: &str,
    path: &str,
) -> Result<manager::Resource, ConfigError> {
    use prost_reflect::Value;
    let Some(Value::Message(any)) = wrapper.get_field_by_name("resource").map(|v| v.into_owned()) else {
        return Err(ConfigError::new(format!("{path}.resource"), "is required"));
    };
    let mut r = decode_any(&any, type_url, &format!("{path}.resource"))?;
    let get = |f: &str| {
        wrapper
            .get_field_by_name(f)
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let name = get("name");
    if !name.is_empty() {
        r.name = name;
    }
    r.version = get("version");
    Ok(r)
}

/// The resources of a `DiscoveryResponse` (or a `DeltaDiscoveryResponse`, whose entries are `Resource`s).
pub fn decode_resources(
    response: &DynamicMessage,
    type_url: &str,
) -> Result<Vec<manager::Resource>, ConfigErrors> {
    use prost_reflect::Value;
    let delta = response.descriptor().full_name() == "envoy.service.discovery.v3.DeltaDiscoveryResponse";
    let list = match response.get_field_by_name("resources").as_deref() {
        Some(Value::List(l)) => l.clone(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, v) in list.iter().enumerate() {
        let Value::Message(m) = v else { continue };
        let path = format!("resources[{i}]");
        let r = if delta {
            decode_wrapped(m, type_url, &path)
        } else {
            decode_any(m, type_url, &path)
        };
        match r {
            Ok(r) => out.push(r),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// A CDS or LDS stream or poller of its own (`api_config_source`), if that is where the type comes from.
fn start_own_source(shared: &Arc<crate::server::Shared>, type_url: &'static str, cfg: Option<&SourceConfig>) {
    match cfg.map(|c| &c.source) {
        Some(Source::Api(api)) => {
            tokio::spawn(ads::run(shared.clone(), api.clone(), ads::Stream::Only(type_url)));
        }
        Some(Source::Rest(rest)) => {
            tokio::spawn(rest::run(shared.clone(), rest.clone(), type_url));
        }
        _ => {}
    }
}

/// Wait until the cluster manager has initialized, or `timeout` (`None`: for ever, as Envoy waits with an
/// `initial_fetch_timeout` of 0).
async fn wait_clusters_initialized(shared: &Arc<crate::server::Shared>, timeout: Option<Duration>) {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut changes = shared.dynamic.subscribe_changes();
    while !shared.dynamic.clusters_initialized(shared) {
        let changed = match deadline {
            Some(dl) => tokio::time::timeout_at(dl, changes.changed()).await,
            None => Ok(changes.changed().await),
        };
        match changed {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::warn!(
                    "clusters not initialized within the CDS initial_fetch_timeout; starting LDS anyway"
                );
                return;
            }
        }
    }
}

/// Start every configured subscription and wait for the initial fetch: until the first CDS and LDS rounds
/// are done and nothing warms (dynamic and static EDS clusters, listeners waiting for RDS), or
/// `initial_fetch_timeout` has passed (after which the server goes live anyway, counting `init_fetch_timeout`).
pub async fn start(shared: &Arc<crate::server::Shared>) {
    let d = &shared.bootstrap.dynamic;
    let rtds = &shared.bootstrap.runtime;
    shared.dynamic.set_shared(shared);
    shared.dynamic.register_static_eds(shared);
    let eds_sources = shared.dynamic.eds_sources(shared);
    let rds_sources = shared.dynamic.rds.sources();
    if d.is_empty() && eds_sources.is_empty() && rds_sources.is_empty() && rtds.rtds().next().is_none() {
        return;
    }
    if let Some(cfg) = &d.cds {
        file::start(shared, file::Kind::Cds, &cfg.source).await;
    }
    if let Some(ads) = &d.ads {
        tokio::spawn(ads::run(shared.clone(), ads.clone(), ads::Stream::Ads));
    }
    start_own_source(shared, CLUSTER_TYPE, d.cds.as_ref());
    // As in Envoy, LDS from a source of its own starts once the cluster manager has initialized (the first CDS
    // round done, the clusters it brought warm), so that a listener does not arrive before the clusters its
    // routes name and is rejected for them. On ADS one ordered stream carries both, CDS first.
    if let Some(lds) = d.lds.clone().filter(|l| l.source != Source::Ads) {
        let cds_timeout = match &d.cds {
            Some(c) => c.initial_fetch_timeout,
            None => Some(DEFAULT_INITIAL_FETCH_TIMEOUT),
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            wait_clusters_initialized(&shared, cds_timeout).await;
            file::start(&shared, file::Kind::Lds, &lds.source).await;
            start_own_source(&shared, LISTENER_TYPE, Some(&lds));
        });
    }
    // RTDS layers with a source of their own: one gRPC stream or REST poller per distinct source.
    let mut rtds_started: Vec<&Source> = Vec::new();
    for (_, cfg) in rtds.rtds() {
        if rtds_started.contains(&&cfg.source) {
            continue;
        }
        rtds_started.push(&cfg.source);
        match &cfg.source {
            Source::Api(api) => {
                tokio::spawn(ads::run(
                    shared.clone(),
                    api.clone(),
                    ads::Stream::Only(crate::layered_runtime::RUNTIME_TYPE),
                ));
            }
            Source::Rest(rest) => {
                tokio::spawn(crate::layered_runtime::rest::run(shared.clone(), rest.clone()));
            }
            Source::Path {
                path,
                watched_directory,
            } => {
                let names = shared.runtime.rtds_names(|s| *s == cfg.source);
                crate::layered_runtime::file::start(shared, path.clone(), watched_directory.clone(), names);
            }
            Source::Ads => {}
        }
    }
    // EDS and RDS from config sources of their own: the static ones now, those that CDS and LDS bring as
    // they come.
    let mut started = std::collections::HashSet::new();
    start_named_subscriptions(shared, &mut started).await;
    tokio::spawn({
        let shared = shared.clone();
        async move {
            let mut changes = shared.dynamic.subscribe_changes();
            while changes.changed().await.is_ok() {
                start_named_subscriptions(&shared, &mut started).await;
            }
        }
    });
    let timeouts: Vec<Option<Duration>> = [&d.cds, &d.lds]
        .into_iter()
        .flatten()
        .cloned()
        .chain(eds_sources)
        .chain(rds_sources)
        .chain(rtds.rtds().map(|(_, s)| s.clone()))
        .map(|c| c.initial_fetch_timeout)
        .collect();
    let timeout = if timeouts.is_empty() {
        Some(DEFAULT_INITIAL_FETCH_TIMEOUT)
    } else if timeouts.iter().any(Option::is_none) {
        None
    } else {
        timeouts.into_iter().flatten().max()
    };
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut changes = shared.dynamic.subscribe_changes();
    loop {
        if shared.dynamic.initialized(shared) && shared.runtime.rtds_ready() {
            tracing::info!("initial xDS fetch done");
            return;
        }
        let changed = match deadline {
            Some(dl) => tokio::time::timeout_at(dl, changes.changed()).await,
            None => Ok(changes.changed().await),
        };
        match changed {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::warn!("initial xDS fetch timed out; serving with what has arrived");
                shared.dynamic.initial_fetch_timed_out(shared);
                shared.dynamic.promote(shared);
                shared.runtime.rtds_initial_fetch_timed_out();
                return;
            }
        }
    }
}

/// Start a subscription for every config source of EDS clusters and RDS connection managers that has none
/// yet (`started`): one gRPC stream, REST poller or file watcher per source and type, which asks for the names
/// of every cluster or connection manager naming that source, as Envoy shares a subscription per config
/// source. `ads` sources ride the ADS stream.
async fn start_named_subscriptions(
    shared: &Arc<crate::server::Shared>,
    started: &mut std::collections::HashSet<(&'static str, Source)>,
) {
    let wanted = shared
        .dynamic
        .eds_sources(shared)
        .into_iter()
        .map(|s| (ENDPOINT_TYPE, s))
        .chain(shared.dynamic.rds.sources().into_iter().map(|s| (ROUTE_TYPE, s)));
    for (type_url, cfg) in wanted.collect::<Vec<_>>() {
        if cfg.source == Source::Ads || !started.insert((type_url, cfg.source.clone())) {
            continue;
        }
        tracing::info!(type_url, source = ?cfg.source, "xDS: subscribing on a config source of its own");
        match &cfg.source {
            Source::Api(api) => {
                tokio::spawn(ads::run(shared.clone(), api.clone(), ads::Stream::Only(type_url)));
            }
            Source::Rest(rest) => {
                tokio::spawn(rest::run(shared.clone(), rest.clone(), type_url));
            }
            Source::Path { .. } => {
                let kind = if type_url == ENDPOINT_TYPE {
                    file::Kind::Eds
                } else {
                    file::Kind::Rds
                };
                file::start(shared, kind, &cfg.source).await;
            }
            Source::Ads => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wire_name;
    use prost::Message;
    use prost_reflect::{DynamicMessage, Value};

    fn encoded(type_name: &str, fields: &[(&str, Value)]) -> Vec<u8> {
        let desc = crate::config::descriptors::message(type_name).expect("descriptor");
        let mut m = DynamicMessage::new(desc);
        for (f, v) in fields {
            m.set_field_by_name(f, v.clone());
        }
        m.encode_to_vec()
    }

    /// The name is read off the wire past other fields of every wire type, without decoding the message.
    #[test]
    fn wire_name_reads_field_one() {
        let cluster = encoded(
            "envoy.config.cluster.v3.Cluster",
            &[
                ("name", Value::String("svc".into())),
                ("alt_stat_name", Value::String("other".into())),
                ("type", Value::EnumNumber(3)),
                (
                    "per_connection_buffer_limit_bytes",
                    Value::Message({
                        let d = crate::config::descriptors::message("google.protobuf.UInt32Value")
                            .expect("descriptor");
                        let mut v = DynamicMessage::new(d);
                        v.set_field_by_name("value", Value::U32(7));
                        v
                    }),
                ),
            ],
        );
        assert_eq!(wire_name(&cluster).as_deref(), Ok("svc"));
        let cla = encoded(
            "envoy.config.endpoint.v3.ClusterLoadAssignment",
            &[("cluster_name", Value::String("svc-eds".into()))],
        );
        assert_eq!(wire_name(&cla).as_deref(), Ok("svc-eds"));
        // The last occurrence wins, as when protobuf decodes it.
        let mut twice = encoded(
            "envoy.config.listener.v3.Listener",
            &[("name", Value::String("a".into()))],
        );
        twice.extend(encoded(
            "envoy.config.listener.v3.Listener",
            &[("name", Value::String("b".into()))],
        ));
        assert_eq!(wire_name(&twice).as_deref(), Ok("b"));
        assert_eq!(wire_name(&[]).as_deref(), Ok(""));
        // Not a message: a truncated field, an invalid wire type.
        assert!(wire_name(&cluster[..cluster.len() - 1]).is_err());
        assert!(wire_name(&[0x0f]).is_err());
    }
}
