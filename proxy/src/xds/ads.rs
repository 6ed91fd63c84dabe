//! The aggregated discovery service client (`xds_protocol.rst`), state-of-the-world and incremental (delta).
//!
//! One gRPC stream to the control plane, reached through the static cluster that
//! `grpc_services[0].envoy_grpc.cluster_name` names (its hosts in turn, h2c, or TLS with the cluster's
//! `UpstreamTlsContext`: see [`super::dial`]), or at `google_grpc.target_uri` (h2c, or TLS with
//! `channel_credentials.ssl_credentials`). Messages are `DynamicMessage`s of Envoy's own descriptors through a small
//! [`tonic::codec::Codec`]: no generated code. The same client serves a `cds_config` or `lds_config` with an
//! `api_config_source` of its own: a stream of that type alone on its discovery service
//! (`ClusterDiscoveryService/StreamClusters`, `ListenerDiscoveryService/DeltaListeners`, ...), as Envoy opens.
//!
//! The protocol as this client follows it:
//! - The first request of a stream carries the `node` (every request does unless
//!   `set_node_on_first_message_only`).
//! - CDS and LDS (when their config source is `ads`) are wildcard subscriptions (no resource names); EDS and
//!   RDS name exactly the service names of EDS clusters and the `route_config_name`s of connection managers,
//!   and a new request goes out when those sets change.
//! - Every response is answered: an ACK carries the response's `version_info` and `nonce`; a NACK carries the
//!   previous accepted `version_info`, the `nonce`, and `error_detail` (a `google.rpc.Status`, code
//!   INVALID_ARGUMENT, whose message lists each lowering error with its resource and field path).
//! - Delta: `resource_names_subscribe`/`_unsubscribe`, `initial_resource_versions` on reconnect,
//!   `removed_resources` applied, ACK/NACK by `response_nonce`.
//! - A lost stream keeps the last good config, sets `control_plane.connected_state` to 0, and reconnects after
//!   a jittered exponential back-off (500 ms doubling to 30 s, Envoy's defaults), resubscribing with the
//!   versions it holds.

use super::manager::{Removal, Resource};
use super::{
    decode_resources, ApiType, GrpcApiConfig, GrpcTarget, Source, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE,
    ROUTE_TYPE,
};
use crate::config::descriptors;
use crate::config::error::ConfigErrors;
use crate::layered_runtime::RUNTIME_TYPE;
use crate::retry::backoff::JitteredBackoff;
use crate::server::Shared;
use crate::upstream::lb::Rng;
use http::uri::PathAndQuery;
use prost_reflect::{DynamicMessage, MessageDescriptor, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// What one gRPC stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// The aggregated stream: every type whose config source is `ads` (and EDS and RDS).
    Ads,
    /// One type on its own discovery service (an `api_config_source`).
    Only(&'static str),
}

impl Stream {
    fn types(self, shared: &Shared) -> Vec<&'static str> {
        match self {
            Stream::Ads => types(shared),
            Stream::Only(t) => vec![t],
        }
    }

    fn path(self, api: ApiType) -> &'static str {
        let delta = api == ApiType::DeltaGrpc;
        match self {
            Stream::Ads if delta => DELTA_PATH,
            Stream::Ads => SOTW_PATH,
            Stream::Only(LISTENER_TYPE) if delta => {
                "/envoy.service.listener.v3.ListenerDiscoveryService/DeltaListeners"
            }
            Stream::Only(LISTENER_TYPE) => {
                "/envoy.service.listener.v3.ListenerDiscoveryService/StreamListeners"
            }
            Stream::Only(ENDPOINT_TYPE) if delta => {
                "/envoy.service.endpoint.v3.EndpointDiscoveryService/DeltaEndpoints"
            }
            Stream::Only(ENDPOINT_TYPE) => {
                "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints"
            }
            Stream::Only(ROUTE_TYPE) if delta => "/envoy.service.route.v3.RouteDiscoveryService/DeltaRoutes",
            Stream::Only(ROUTE_TYPE) => "/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes",
            Stream::Only(RUNTIME_TYPE) if delta => {
                "/envoy.service.runtime.v3.RuntimeDiscoveryService/DeltaRuntime"
            }
            Stream::Only(RUNTIME_TYPE) => "/envoy.service.runtime.v3.RuntimeDiscoveryService/StreamRuntime",
            Stream::Only(_) if delta => "/envoy.service.cluster.v3.ClusterDiscoveryService/DeltaClusters",
            Stream::Only(_) => "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters",
        }
    }
}

/// `google.rpc.Code.INVALID_ARGUMENT`.
const INVALID_ARGUMENT: i32 = 3;

/// A codec for `DynamicMessage`s: encodes any, decodes as `descriptor`.
#[derive(Clone, Debug)]
pub struct DynamicCodec {
    descriptor: MessageDescriptor,
}

impl DynamicCodec {
    pub fn new(descriptor: MessageDescriptor) -> Self {
        DynamicCodec { descriptor }
    }
}

#[derive(Debug)]
pub struct DynamicEncoder;

#[derive(Debug)]
pub struct DynamicDecoder(MessageDescriptor);

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;
    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        prost::Message::encode(&item, dst).map_err(|e| Status::internal(format!("encode: {e}")))
    }
}

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        DynamicMessage::decode(self.0.clone(), src)
            .map(Some)
            .map_err(|e| Status::internal(format!("decode {}: {e}", self.0.full_name())))
    }
}

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;
    fn encoder(&mut self) -> DynamicEncoder {
        DynamicEncoder
    }
    fn decoder(&mut self) -> DynamicDecoder {
        DynamicDecoder(self.descriptor.clone())
    }
}

fn message(name: &str) -> Result<DynamicMessage, Status> {
    descriptors::message(name)
        .map(DynamicMessage::new)
        .ok_or_else(|| Status::internal(format!("no descriptor for {name}")))
}

fn set_str(m: &mut DynamicMessage, field: &str, v: &str) {
    m.set_field_by_name(field, Value::String(v.to_string()));
}

fn set_strs(m: &mut DynamicMessage, field: &str, v: &[String]) {
    m.set_field_by_name(
        field,
        Value::List(v.iter().map(|s| Value::String(s.clone())).collect()),
    );
}

fn get_str(m: &DynamicMessage, field: &str) -> String {
    m.get_field_by_name(field)
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn get_strs(m: &DynamicMessage, field: &str) -> Vec<String> {
    match m.get_field_by_name(field).as_deref() {
        Some(Value::List(l)) => l.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    }
}

/// `error_detail` of a NACK.
pub(crate) fn error_detail(errors: &ConfigErrors) -> Result<DynamicMessage, Status> {
    let mut s = message("google.rpc.Status")?;
    s.set_field_by_name("code", Value::I32(INVALID_ARGUMENT));
    set_str(&mut s, "message", &errors.to_string());
    Ok(s)
}

/// The resource types this stream carries, in the order Envoy subscribes (CDS, EDS, LDS, RDS).
fn types(shared: &Shared) -> Vec<&'static str> {
    let d = &shared.bootstrap.dynamic;
    let mut t = Vec::new();
    if d.cds.as_ref().is_some_and(|c| c.source == Source::Ads) {
        t.push(CLUSTER_TYPE);
    }
    t.push(ENDPOINT_TYPE);
    if d.lds.as_ref().is_some_and(|c| c.source == Source::Ads) {
        t.push(LISTENER_TYPE);
    }
    t.push(ROUTE_TYPE);
    if shared
        .bootstrap
        .runtime
        .rtds()
        .any(|(_, s)| s.source == Source::Ads)
    {
        t.push(RUNTIME_TYPE);
    }
    t
}

fn wildcard(type_url: &str) -> bool {
    type_url == CLUSTER_TYPE || type_url == LISTENER_TYPE
}

/// The names to subscribe to for a non-wildcard type: those whose config source is `source`.
pub(super) fn interest(shared: &Shared, type_url: &str, source: &Source) -> Vec<String> {
    match type_url {
        ENDPOINT_TYPE => shared.dynamic.eds_names(shared, source),
        ROUTE_TYPE => shared.dynamic.rds.names_from(source),
        RUNTIME_TYPE => shared.runtime.rtds_names(|s| s == source),
        _ => Vec::new(),
    }
}

/// Apply one decoded update of `type_url`.
pub(super) fn apply(
    shared: &Shared,
    type_url: &str,
    resources: &[Resource],
    removal: &Removal,
    version: &str,
) -> Result<(), ConfigErrors> {
    let d = &shared.dynamic;
    match type_url {
        CLUSTER_TYPE => {
            let r = d.apply_clusters(shared, resources, removal, version);
            d.initial_done(true);
            r
        }
        LISTENER_TYPE => {
            let r = d.apply_listeners(shared, resources, removal, version);
            d.initial_done(false);
            r
        }
        ENDPOINT_TYPE => {
            let removed = match removal {
                Removal::Names(n) => n.as_slice(),
                Removal::Omitted => &[],
            };
            d.apply_endpoints(shared, resources, removed, version)
        }
        ROUTE_TYPE => d.apply_routes(shared, resources, version),
        RUNTIME_TYPE => {
            let removed = match removal {
                Removal::Names(n) => n.as_slice(),
                Removal::Omitted => &[],
            };
            let r = shared.runtime.apply_rtds(resources, removed);
            // A rejected update ends the initial fetch too (Envoy's `onConfigUpdateFailed`).
            if r.is_err() {
                shared.runtime.rtds_initial_done(&grpc_rtds_names(shared));
            }
            d.notify();
            r
        }
        other => Err(ConfigErrors::from(crate::config::ConfigError::new(
            "type_url",
            format!("{other} is not a resource type Remora subscribes to"),
        ))),
    }
}

/// The RTDS layers that come over gRPC (ADS or a stream of their own): a failed update ends their initial fetch.
fn grpc_rtds_names(shared: &Shared) -> Vec<String> {
    shared
        .runtime
        .rtds_names(|s| matches!(s, Source::Ads | Source::Api(_)))
}

/// A decoding failure counts as a rejected update of its subscription.
fn count_rejected(shared: &Shared, type_url: &str) {
    let d = &shared.dynamic;
    let s = match type_url {
        CLUSTER_TYPE => &d.cds,
        LISTENER_TYPE => &d.lds,
        RUNTIME_TYPE => {
            shared.runtime.rtds_initial_done(&grpc_rtds_names(shared));
            d.notify();
            &shared.runtime.rtds_stats
        }
        _ => return,
    };
    s.update_attempt.inc();
    s.update_rejected.inc();
}

/// Run a gRPC xDS client (the ADS stream, or one type's own) for as long as the process lives.
pub async fn run(shared: Arc<Shared>, cfg: GrpcApiConfig, stream: Stream) {
    let mut backoff = JitteredBackoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut rng = Rng::from_entropy();
    let carried = stream.types(&shared);
    let path = stream.path(cfg.api_type);
    // The names of EDS and RDS are those whose config source is this stream's.
    let source = match stream {
        Stream::Ads => Source::Ads,
        Stream::Only(_) => Source::Api(cfg.clone()),
    };
    let connected_state = shared.store.gauge("control_plane.connected_state");
    let mut sotw = SotwState {
        carried: carried.clone(),
        source: source.clone(),
        connected_state: connected_state.clone(),
        types: BTreeMap::new(),
    };
    let mut delta = DeltaState {
        carried: carried.clone(),
        source: source.clone(),
        connected_state: connected_state.clone(),
        types: BTreeMap::new(),
    };
    // google_grpc's ssl_credentials: one TLS context for the life of the stream.
    let google_tls = match &cfg.target {
        GrpcTarget::Uri(uri, Some(creds)) => Some(super::dial::google_tls(uri, creds)),
        _ => None,
    };
    let mut attempt = 0usize;
    loop {
        let channel = match &cfg.target {
            GrpcTarget::Cluster(name) => match super::dial::pick(&shared, name, attempt) {
                Err(e) => Err(e),
                Ok((cluster, host)) => super::dial::channel(&cluster, &host)
                    .await
                    .map(|c| (host.address.to_string(), c)),
            },
            GrpcTarget::Uri(uri, None) => connect(uri)
                .await
                .map(|c| (uri.clone(), c))
                .map_err(|e| format!("cannot connect to {uri}: {}", super::dial::causes(&e))),
            GrpcTarget::Uri(uri, Some(_)) => match &google_tls {
                Some(Ok(tls)) => super::dial::tls_channel(uri, tls).await.map(|c| (uri.clone(), c)),
                Some(Err(e)) => Err(e.clone()),
                None => Err("no TLS context".into()),
            },
        };
        attempt += 1;
        let result = match channel {
            Err(e) => Err(e),
            Ok((target, channel)) => {
                let r = match cfg.api_type {
                    ApiType::Grpc => sotw.stream(&shared, &cfg, channel, path, &mut backoff).await,
                    ApiType::DeltaGrpc => delta.stream(&shared, &cfg, channel, path, &mut backoff).await,
                };
                r.map_err(|s| format!("stream to {target} ended: {}", s.message()))
            }
        };
        connected_state.set(0);
        for t in &carried {
            match *t {
                CLUSTER_TYPE | LISTENER_TYPE | RUNTIME_TYPE => {
                    let s = match *t {
                        CLUSTER_TYPE => &shared.dynamic.cds,
                        LISTENER_TYPE => &shared.dynamic.lds,
                        _ => &shared.runtime.rtds_stats,
                    };
                    s.update_attempt.inc();
                    s.update_failure.inc();
                }
                // Every EDS and RDS subscription this stream serves failed with it.
                _ => {
                    let names = interest(&shared, t, &source);
                    shared.dynamic.count_failure(t, &names);
                }
            }
        }
        let wait = backoff.next_backoff(&mut rng);
        if let Err(e) = result {
            tracing::warn!(error = %e, retry_in = ?wait, "xDS: control plane unreachable; keeping the last good config");
        }
        tokio::time::sleep(wait).await;
    }
}

async fn connect(target: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
}

/// The bootstrap's `node`, for the control plane.
pub(crate) fn node(shared: &Shared) -> Option<DynamicMessage> {
    let bootstrap = shared.bootstrap.message()?;
    match bootstrap.get_field_by_name("node").as_deref() {
        Some(Value::Message(n)) => {
            let mut n = n.clone();
            if get_str(&n, "user_agent_name").is_empty() {
                set_str(&mut n, "user_agent_name", "remora");
            }
            Some(n)
        }
        _ => None,
    }
}

/// Per-type state of a state-of-the-world stream.
#[derive(Debug, Default)]
struct SotwType {
    /// The last accepted `version_info` (kept across reconnects).
    version: String,
    nonce: String,
    names: Vec<String>,
    requested: bool,
}

#[derive(Debug)]
struct SotwState {
    /// The types this stream carries.
    carried: Vec<&'static str>,
    /// The config source this stream serves (whose EDS and RDS names it asks for).
    source: Source,
    connected_state: crate::stats::Gauge,
    types: BTreeMap<&'static str, SotwType>,
}

struct Sender {
    tx: mpsc::UnboundedSender<DynamicMessage>,
    node: Option<DynamicMessage>,
    node_once: bool,
    sent_node: bool,
}

impl Sender {
    fn send(&mut self, mut m: DynamicMessage) -> Result<(), Status> {
        if let Some(n) = &self.node {
            if !self.node_once || !self.sent_node {
                m.set_field_by_name("node", Value::Message(n.clone()));
                self.sent_node = true;
            }
        }
        self.tx
            .send(m)
            .map_err(|_| Status::unavailable("the request stream closed"))
    }
}

async fn open(
    channel: tonic::transport::Channel,
    path: &'static str,
    response: &str,
    rx: mpsc::UnboundedReceiver<DynamicMessage>,
) -> Result<tonic::Streaming<DynamicMessage>, Status> {
    let desc = descriptors::message(response).ok_or_else(|| Status::internal("no descriptor"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
    let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    let resp = grpc
        .streaming(
            tonic::Request::new(outbound),
            PathAndQuery::from_static(path),
            DynamicCodec::new(desc),
        )
        .await?;
    Ok(resp.into_inner())
}

impl SotwState {
    fn request(&self, type_url: &str, error: Option<&ConfigErrors>) -> Result<DynamicMessage, Status> {
        let t = self.types.get(type_url);
        let mut m = message("envoy.service.discovery.v3.DiscoveryRequest")?;
        set_str(&mut m, "type_url", type_url);
        if let Some(t) = t {
            set_str(&mut m, "version_info", &t.version);
            set_str(&mut m, "response_nonce", &t.nonce);
            set_strs(&mut m, "resource_names", &t.names);
        }
        if let Some(e) = error {
            m.set_field_by_name("error_detail", Value::Message(error_detail(e)?));
        }
        Ok(m)
    }

    /// Send a request for every non-wildcard type whose names changed.
    fn resubscribe(&mut self, shared: &Shared, tx: &mut Sender) -> Result<(), Status> {
        for type_url in self.carried.clone() {
            if wildcard(type_url) {
                continue;
            }
            let names = interest(shared, type_url, &self.source);
            let t = self.types.entry(type_url).or_default();
            if names == t.names && (t.requested || names.is_empty()) {
                continue;
            }
            t.names = names;
            t.requested = true;
            tx.send(self.request(type_url, None)?)?;
        }
        Ok(())
    }

    async fn stream(
        &mut self,
        shared: &Arc<Shared>,
        cfg: &GrpcApiConfig,
        channel: tonic::transport::Channel,
        path: &'static str,
        backoff: &mut JitteredBackoff,
    ) -> Result<(), Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tx = Sender {
            tx,
            node: node(shared),
            node_once: cfg.node_on_first_message_only,
            sent_node: false,
        };
        // Nonces belong to a stream; versions and names carry over.
        for t in self.types.values_mut() {
            t.nonce.clear();
            t.requested = false;
        }
        for type_url in self.carried.clone() {
            if wildcard(type_url) {
                let t = self.types.entry(type_url).or_default();
                t.requested = true;
                tx.send(self.request(type_url, None)?)?;
            }
        }
        self.resubscribe(shared, &mut tx)?;
        let mut inbound = open(channel, path, "envoy.service.discovery.v3.DiscoveryResponse", rx).await?;
        self.connected_state.set(1);
        backoff.reset();
        tracing::info!(path, "xDS: stream (state of the world) open");
        let mut changes = shared.dynamic.subscribe_changes();
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let Some(resp) = msg? else {
                        return Err(Status::unavailable("the control plane closed the stream"));
                    };
                    self.on_response(shared, &resp, &mut tx)?;
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    self.resubscribe(shared, &mut tx)?;
                }
            }
        }
    }

    fn on_response(&mut self, shared: &Shared, resp: &DynamicMessage, tx: &mut Sender) -> Result<(), Status> {
        let type_url = get_str(resp, "type_url");
        let Some(key) = self.carried.iter().copied().find(|t| *t == type_url) else {
            tracing::warn!(type_url = %type_url, "xDS: response for a type not subscribed to; ignored");
            return Ok(());
        };
        let version = get_str(resp, "version_info");
        let nonce = get_str(resp, "nonce");
        let removal = if wildcard(key) {
            Removal::Omitted
        } else {
            Removal::Names(Vec::new())
        };
        let result = match decode_resources(resp, key) {
            Ok(mut resources) => {
                for r in &mut resources {
                    r.version = version.clone();
                }
                apply(shared, key, &resources, &removal, &version)
            }
            Err(e) => {
                count_rejected(shared, key);
                Err(e)
            }
        };
        let t = self.types.entry(key).or_default();
        t.nonce = nonce;
        match result {
            Ok(()) => {
                t.version = version;
                tracing::debug!(type_url = key, version = %t.version, "xDS: ACK");
                tx.send(self.request(key, None)?)?;
            }
            Err(e) => {
                tracing::warn!(type_url = key, rejected = %version, errors = %e, "xDS: NACK");
                if key == ENDPOINT_TYPE {
                    shared.dynamic.eds_update_rejected(shared, &self.source);
                }
                tx.send(self.request(key, Some(&e))?)?;
            }
        }
        // New clusters or listeners may name new EDS or RDS resources.
        self.resubscribe(shared, tx)
    }
}

/// Per-type state of a delta stream.
#[derive(Debug, Default)]
struct DeltaType {
    /// Resource versions held, by name (sent as `initial_resource_versions` on reconnect).
    versions: BTreeMap<String, String>,
    /// Names subscribed to (non-wildcard types).
    names: Vec<String>,
    requested: bool,
}

#[derive(Debug)]
struct DeltaState {
    /// The types this stream carries.
    carried: Vec<&'static str>,
    /// The config source this stream serves (whose EDS and RDS names it asks for).
    source: Source,
    connected_state: crate::stats::Gauge,
    types: BTreeMap<&'static str, DeltaType>,
}

impl DeltaState {
    fn base(type_url: &str) -> Result<DynamicMessage, Status> {
        let mut m = message("envoy.service.discovery.v3.DeltaDiscoveryRequest")?;
        set_str(&mut m, "type_url", type_url);
        Ok(m)
    }

    /// The first request of a type on a stream.
    fn initial(&mut self, shared: &Shared, type_url: &'static str) -> Result<Option<DynamicMessage>, Status> {
        let names = if wildcard(type_url) {
            Vec::new()
        } else {
            interest(shared, type_url, &self.source)
        };
        let t = self.types.entry(type_url).or_default();
        if !wildcard(type_url) && names.is_empty() {
            t.names.clear();
            return Ok(None);
        }
        let mut m = Self::base(type_url)?;
        set_strs(&mut m, "resource_names_subscribe", &names);
        if !t.versions.is_empty() {
            let map = t
                .versions
                .iter()
                .map(|(k, v)| (prost_reflect::MapKey::String(k.clone()), Value::String(v.clone())))
                .collect();
            m.set_field_by_name("initial_resource_versions", Value::Map(map));
        }
        t.names = names;
        t.requested = true;
        Ok(Some(m))
    }

    fn resubscribe(&mut self, shared: &Shared, tx: &mut Sender) -> Result<(), Status> {
        for type_url in self.carried.clone() {
            if wildcard(type_url) {
                continue;
            }
            if !self.types.get(type_url).is_some_and(|t| t.requested) {
                if let Some(m) = self.initial(shared, type_url)? {
                    tx.send(m)?;
                }
                continue;
            }
            let names = interest(shared, type_url, &self.source);
            let t = self.types.entry(type_url).or_default();
            if names == t.names {
                continue;
            }
            let added: Vec<String> = names.iter().filter(|n| !t.names.contains(n)).cloned().collect();
            let removed: Vec<String> = t.names.iter().filter(|n| !names.contains(n)).cloned().collect();
            for n in &removed {
                t.versions.remove(n);
            }
            t.names = names;
            let mut m = Self::base(type_url)?;
            set_strs(&mut m, "resource_names_subscribe", &added);
            set_strs(&mut m, "resource_names_unsubscribe", &removed);
            tx.send(m)?;
        }
        Ok(())
    }

    async fn stream(
        &mut self,
        shared: &Arc<Shared>,
        cfg: &GrpcApiConfig,
        channel: tonic::transport::Channel,
        path: &'static str,
        backoff: &mut JitteredBackoff,
    ) -> Result<(), Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tx = Sender {
            tx,
            node: node(shared),
            node_once: cfg.node_on_first_message_only,
            sent_node: false,
        };
        for t in self.types.values_mut() {
            t.requested = false;
        }
        for type_url in self.carried.clone() {
            if let Some(m) = self.initial(shared, type_url)? {
                tx.send(m)?;
            }
        }
        let mut inbound = open(
            channel,
            path,
            "envoy.service.discovery.v3.DeltaDiscoveryResponse",
            rx,
        )
        .await?;
        self.connected_state.set(1);
        backoff.reset();
        tracing::info!(path, "xDS: stream (delta) open");
        let mut changes = shared.dynamic.subscribe_changes();
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let Some(resp) = msg? else {
                        return Err(Status::unavailable("the control plane closed the stream"));
                    };
                    self.on_response(shared, &resp, &mut tx)?;
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    self.resubscribe(shared, &mut tx)?;
                }
            }
        }
    }

    fn on_response(&mut self, shared: &Shared, resp: &DynamicMessage, tx: &mut Sender) -> Result<(), Status> {
        let type_url = get_str(resp, "type_url");
        let Some(key) = self.carried.iter().copied().find(|t| *t == type_url) else {
            tracing::warn!(type_url = %type_url, "xDS: delta response for a type not subscribed to; ignored");
            return Ok(());
        };
        let version = get_str(resp, "system_version_info");
        let nonce = get_str(resp, "nonce");
        let removed = get_strs(resp, "removed_resources");
        let decoded = decode_resources(resp, key);
        let result = match &decoded {
            Ok(resources) => apply(shared, key, resources, &Removal::Names(removed.clone()), &version),
            Err(e) => {
                count_rejected(shared, key);
                Err(e.clone())
            }
        };
        let mut m = Self::base(key)?;
        set_str(&mut m, "response_nonce", &nonce);
        match (result, decoded) {
            (Ok(()), Ok(resources)) => {
                let t = self.types.entry(key).or_default();
                for r in resources {
                    t.versions.insert(r.name, r.version);
                }
                for n in &removed {
                    t.versions.remove(n);
                }
            }
            (Err(e), _) | (Ok(()), Err(e)) => {
                tracing::warn!(type_url = key, rejected = %version, errors = %e, "xDS: delta NACK");
                if key == ENDPOINT_TYPE {
                    shared.dynamic.eds_update_rejected(shared, &self.source);
                }
                m.set_field_by_name("error_detail", Value::Message(error_detail(&e)?));
            }
        }
        tx.send(m)?;
        self.resubscribe(shared, tx)
    }
}
