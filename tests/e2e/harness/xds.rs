//! [`XdsServer`]: an ADS management server for tests, state-of-the-world and delta on one port.
//!
//! Messages are Envoy's own (`DynamicMessage`s of Remora's descriptor pool, through Remora's
//! `DynamicCodec`), served by tonic's generic `server::Grpc` on the harness's h2c server. A test sets the
//! resources of a type as JSON ([`XdsServer::set`]); every open stream then gets the new state: SotW streams
//! a full response per subscribed type (wildcard or the names asked for), delta streams only what changed
//! and `removed_resources`. Every request the proxy sends is kept, so a test can wait for an ACK or a NACK
//! ([`XdsServer::wait_request`]) and read its `error_detail`.
//!
//! [`XdsServer::start_tls`] serves the same over TLS (h2 by ALPN), requiring a client certificate signed by a
//! given CA for mTLS; [`Pki`] makes the certificates with rcgen.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{DynamicMessage, Value as PValue};
use remora::xds::ads::DynamicCodec;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::server::StreamingService;
use tonic::{Status, Streaming};

use super::upstream::{BoxFuture, Handler, Server};
use super::{within, BoxError, Protocol, UpstreamOptions, POLL_INTERVAL};

const SOTW: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// The per-type services (a config source's own `api_config_source`) are served like ADS.
const SOTW_PATHS: [&str; 6] = [
    SOTW,
    "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters",
    "/envoy.service.listener.v3.ListenerDiscoveryService/StreamListeners",
    "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints",
    "/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes",
    "/envoy.service.runtime.v3.RuntimeDiscoveryService/StreamRuntime",
];
const DELTA_PATHS: [&str; 6] = [
    DELTA,
    "/envoy.service.cluster.v3.ClusterDiscoveryService/DeltaClusters",
    "/envoy.service.listener.v3.ListenerDiscoveryService/DeltaListeners",
    "/envoy.service.endpoint.v3.EndpointDiscoveryService/DeltaEndpoints",
    "/envoy.service.route.v3.RouteDiscoveryService/DeltaRoutes",
    "/envoy.service.runtime.v3.RuntimeDiscoveryService/DeltaRuntime",
];
/// RTDS's own service (a runtime layer's `rtds_config.api_config_source`).
const RUNTIME_SOTW: &str = "/envoy.service.runtime.v3.RuntimeDiscoveryService/StreamRuntime";
const RUNTIME_DELTA: &str = "/envoy.service.runtime.v3.RuntimeDiscoveryService/DeltaRuntime";

fn sotw_path(p: &str) -> bool {
    SOTW_PATHS.contains(&p) || p == RUNTIME_SOTW
}

fn delta_path(p: &str) -> bool {
    DELTA_PATHS.contains(&p) || p == RUNTIME_DELTA
}

pub const RUNTIME: &str = "type.googleapis.com/envoy.service.runtime.v3.Runtime";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn desc(name: &str) -> prost_reflect::MessageDescriptor {
    remora::config::descriptors::message(name).unwrap_or_else(|| panic!("no descriptor {name}"))
}

fn s(m: &DynamicMessage, f: &str) -> String {
    m.get_field_by_name(f)
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn strs(m: &DynamicMessage, f: &str) -> Vec<String> {
    match m.get_field_by_name(f).as_deref() {
        Some(PValue::List(l)) => l.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    }
}

/// The `error_detail.message` of a request, if it is a NACK.
pub fn nack_message(m: &DynamicMessage) -> Option<String> {
    match m.get_field_by_name("error_detail").as_deref() {
        Some(PValue::Message(st)) if m.has_field_by_name("error_detail") => Some(s(st, "message")),
        _ => None,
    }
}

pub fn type_url(m: &DynamicMessage) -> String {
    s(m, "type_url")
}

pub fn response_nonce(m: &DynamicMessage) -> String {
    s(m, "response_nonce")
}

pub fn version_info(m: &DynamicMessage) -> String {
    s(m, "version_info")
}

fn any(type_url: &str, bytes: &[u8]) -> DynamicMessage {
    let mut a = DynamicMessage::new(desc("google.protobuf.Any"));
    a.set_field_by_name("type_url", PValue::String(type_url.to_owned()));
    a.set_field_by_name("value", PValue::Bytes(bytes.to_vec().into()));
    a
}

#[derive(Default)]
struct State {
    /// Encoded resources by type and name.
    resources: Mutex<BTreeMap<String, BTreeMap<String, Vec<u8>>>>,
    requests: Mutex<Vec<DynamicMessage>>,
    /// The path of every stream opened, in order.
    paths: Mutex<Vec<String>>,
    nonce: AtomicU64,
    /// Types the state-of-the-world sessions do not answer for now ([`XdsServer::hold`]).
    held: Mutex<HashSet<String>>,
}

impl State {
    fn held(&self, t: &str) -> bool {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).contains(t)
    }
}

/// A CA and the leaves it signs, as PEM (for [`XdsServer::start_tls`] and the proxy's SDS files).
pub struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("CA params: {e}"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let ca_key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("CA key: {e}"));
        let ca = params
            .self_signed(&ca_key)
            .unwrap_or_else(|e| panic!("CA certificate: {e}"));
        Pki { ca, ca_key }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A leaf for `dns` names signed by this CA: (certificate chain PEM, private key PEM).
    pub fn leaf(&self, cn: &str, dns: &[&str]) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("leaf params: {e}"));
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("leaf key: {e}"));
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .unwrap_or_else(|e| panic!("leaf certificate: {e}"));
        (cert.pem(), key.serialize_pem())
    }
}

/// A rustls server config (ring, h2 by ALPN) with `cert`/`key`, requiring a client certificate signed by
/// `client_ca` when given.
fn server_config(cert: &str, key: &str, client_ca: Option<&str>) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("server certificate PEM: {e}"));
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap_or_else(|e| panic!("server key PEM: {e}"));
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("protocol versions: {e}"));
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots
                    .add(c.unwrap_or_else(|e| panic!("client CA PEM: {e}")))
                    .unwrap_or_else(|e| panic!("client CA: {e}"));
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap_or_else(|e| panic!("client verifier: {e}"));
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .unwrap_or_else(|e| panic!("server certificate: {e}"));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A TLS front for a plaintext server (a REST management server over TLS): it terminates TLS with
/// `cert`/`key`, requiring a client certificate signed by `client_ca` when given, and relays the bytes to
/// `target`. Dropping it stops it.
pub struct TlsFront {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    pub async fn start(
        target: std::net::SocketAddr,
        cert: &str,
        key: &str,
        client_ca: Option<&str>,
    ) -> TlsFront {
        let mut config = (*server_config(cert, key, client_ca)).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind the TLS front: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local address: {e}"));
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let acceptor = acceptor.clone();
                        conns.spawn(async move {
                            let Ok(mut tls) = acceptor.accept(stream).await else { return };
                            let Ok(mut plain) = tokio::net::TcpStream::connect(target).await else { return };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        TlsFront { addr, task }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the management server listens: the harness's h2c server, or a TLS accept loop of its own.
enum Listening {
    Plain(Server),
    Tls {
        addr: std::net::SocketAddr,
        task: tokio::task::JoinHandle<()>,
        /// Why each failed handshake failed, in order.
        failures: Arc<Mutex<Vec<String>>>,
    },
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Listening::Tls { task, .. } = self {
            // Aborting the accept loop drops its JoinSet, which aborts every connection task.
            task.abort();
        }
    }
}

async fn tls_accept_loop(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    handler: Handler,
    failures: Arc<Mutex<Vec<String>>>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let (acceptor, handler, failures) = (acceptor.clone(), handler.clone(), failures.clone());
                conns.spawn(async move {
                    let tls = match acceptor.accept(stream).await {
                        Ok(t) => t,
                        Err(e) => {
                            failures.lock().unwrap_or_else(|e| e.into_inner()).push(e.to_string());
                            return;
                        }
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let answer = handler(req);
                        async move { Ok::<_, std::convert::Infallible>(answer.await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = builder
                        .http2_only()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// The management server; see the module docs. Dropping it closes every stream.
pub struct XdsServer {
    server: Listening,
    state: Arc<State>,
    version: Arc<watch::Sender<u64>>,
}

impl XdsServer {
    pub async fn start() -> XdsServer {
        XdsServer::start_with(None).await
    }

    /// Over TLS with `cert`/`key` (PEM), requiring a client certificate signed by `client_ca` when given (mTLS).
    pub async fn start_tls(cert: &str, key: &str, client_ca: Option<&str>) -> XdsServer {
        XdsServer::start_with(Some(server_config(cert, key, client_ca))).await
    }

    async fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> XdsServer {
        let state = Arc::new(State::default());
        let version = Arc::new(watch::channel(1u64).0);
        let handler: Handler = {
            let state = state.clone();
            let version = version.clone();
            Arc::new(move |req| {
                let svc = Ads {
                    state: state.clone(),
                    version: version.subscribe(),
                    delta: delta_path(req.uri().path()),
                };
                Box::pin(async move {
                    let path = req.uri().path().to_owned();
                    let resp = if sotw_path(&path) || delta_path(&path) {
                        svc.state
                            .paths
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(path.clone());
                        let codec = DynamicCodec::new(desc(if svc.delta {
                            "envoy.service.discovery.v3.DeltaDiscoveryRequest"
                        } else {
                            "envoy.service.discovery.v3.DiscoveryRequest"
                        }));
                        tonic::server::Grpc::new(codec).streaming(svc, req).await
                    } else {
                        Status::unimplemented(path).into_http()
                    };
                    let (parts, body) = resp.into_parts();
                    http::Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
                }) as BoxFuture<_>
            })
        };
        let server = match tls {
            None => {
                let options = UpstreamOptions {
                    protocol: Protocol::H2c,
                    bind: None,
                };
                Listening::Plain(Server::start(&options, handler).await)
            }
            Some(config) => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .unwrap_or_else(|e| panic!("bind the TLS control plane: {e}"));
                let addr = listener
                    .local_addr()
                    .unwrap_or_else(|e| panic!("local address: {e}"));
                let failures = Arc::new(Mutex::new(Vec::new()));
                let task = tokio::spawn(tls_accept_loop(listener, config, handler, failures.clone()));
                Listening::Tls { addr, task, failures }
            }
        };
        XdsServer {
            server,
            state,
            version,
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        match &self.server {
            Listening::Plain(s) => s.addr(),
            Listening::Tls { addr, .. } => *addr,
        }
    }

    /// Why each failed TLS handshake (of [`XdsServer::start_tls`]) failed, as the server saw it.
    pub fn tls_failures(&self) -> Vec<String> {
        match &self.server {
            Listening::Plain(_) => Vec::new(),
            Listening::Tls { failures, .. } => failures.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// The current version (`version_info` of SotW responses).
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// Replace every resource of `type_url` with `resources` (JSON in Envoy's schema) and push the new state.
    pub fn set(&self, type_url: &str, resources: Vec<Value>) {
        let d = desc(type_url.rsplit('/').next().unwrap_or(type_url));
        let mut map = BTreeMap::new();
        for r in resources {
            let name = r
                .get("name")
                .or_else(|| r.get("cluster_name"))
                // The JSON mapping's spelling, as Envoy Gateway's resources have it.
                .or_else(|| r.get("clusterName"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let m = remora::config::load::message_from_value(r, &d)
                .unwrap_or_else(|e| panic!("test resource does not parse: {e}"));
            map.insert(name, m.encode_to_vec());
        }
        self.state
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(type_url.to_owned(), map);
        self.version.send_modify(|v| *v += 1);
    }

    /// State-of-the-world sessions take requests for `type_url` but answer none until [`XdsServer::release`].
    pub fn hold(&self, type_url: &str) {
        self.state
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(type_url.to_owned());
    }

    /// Answer the requests [`XdsServer::hold`] kept waiting (and every later one).
    pub fn release(&self, type_url: &str) {
        self.state
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(type_url);
        self.version.send_modify(|v| *v += 1);
    }

    /// The gRPC path of every stream opened so far.
    pub fn stream_paths(&self) -> Vec<String> {
        self.state.paths.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<DynamicMessage> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits (at most `timeout`) for a request that `accept` takes.
    pub async fn wait_request(
        &self,
        what: &str,
        timeout: Duration,
        accept: impl Fn(&DynamicMessage) -> bool,
    ) -> DynamicMessage {
        within(timeout, what, async {
            loop {
                if let Some(r) = self.requests().into_iter().find(|r| accept(r)) {
                    return r;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
        .await
    }
}

struct Ads {
    state: Arc<State>,
    version: watch::Receiver<u64>,
    delta: bool,
}

type Out = Pin<Box<dyn Stream<Item = Result<DynamicMessage, Status>> + Send>>;

impl StreamingService<DynamicMessage> for Ads {
    type Response = DynamicMessage;
    type ResponseStream = Out;
    type Future = BoxFuture<Result<tonic::Response<Out>, Status>>;

    fn call(&mut self, request: tonic::Request<Streaming<DynamicMessage>>) -> Self::Future {
        let (tx, rx) = mpsc::channel(64);
        let inbound = request.into_inner();
        let (state, version) = (self.state.clone(), self.version.clone());
        if self.delta {
            tokio::spawn(delta_session(state, version, inbound, tx));
        } else {
            tokio::spawn(sotw_session(state, version, inbound, tx));
        }
        Box::pin(async move { Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx)) as Out)) })
    }
}

fn wildcard(t: &str) -> bool {
    t == CLUSTER || t == LISTENER
}

async fn sotw_session(
    state: Arc<State>,
    mut version: watch::Receiver<u64>,
    mut inbound: Streaming<DynamicMessage>,
    tx: mpsc::Sender<Result<DynamicMessage, Status>>,
) {
    // Subscribed names by type; `None` is a wildcard.
    let mut subs: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
    let send = |t: &str, names: &Option<Vec<String>>, v: u64| {
        let res = state.resources.lock().unwrap_or_else(|e| e.into_inner());
        let mut m = DynamicMessage::new(desc("envoy.service.discovery.v3.DiscoveryResponse"));
        let list: Vec<PValue> = res
            .get(t)
            .into_iter()
            .flatten()
            .filter(|(n, _)| names.as_ref().is_none_or(|ns| ns.contains(n)))
            .map(|(_, b)| PValue::Message(any(t, b)))
            .collect();
        m.set_field_by_name("version_info", PValue::String(v.to_string()));
        m.set_field_by_name("type_url", PValue::String(t.to_owned()));
        m.set_field_by_name("resources", PValue::List(list));
        let nonce = state.nonce.fetch_add(1, Ordering::SeqCst).to_string();
        m.set_field_by_name("nonce", PValue::String(nonce));
        m
    };
    loop {
        tokio::select! {
            req = inbound.message() => {
                let Ok(Some(req)) = req else { return };
                state.requests.lock().unwrap_or_else(|e| e.into_inner()).push(req.clone());
                let t = type_url(&req);
                let names = strs(&req, "resource_names");
                let names = if wildcard(&t) && names.is_empty() { None } else { Some(names) };
                if subs.get(&t) != Some(&names) {
                    let v = *version.borrow();
                    let m = send(&t, &names, v);
                    let held = state.held(&t);
                    subs.insert(t, names);
                    if !held && tx.send(Ok(m)).await.is_err() { return }
                }
            }
            changed = version.changed() => {
                if changed.is_err() { return }
                let v = *version.borrow_and_update();
                for (t, names) in subs.iter().filter(|(t, _)| !state.held(t)) {
                    if tx.send(Ok(send(t, names, v))).await.is_err() { return }
                }
            }
        }
    }
}

async fn delta_session(
    state: Arc<State>,
    mut version: watch::Receiver<u64>,
    mut inbound: Streaming<DynamicMessage>,
    tx: mpsc::Sender<Result<DynamicMessage, Status>>,
) {
    struct Sub {
        wildcard: bool,
        names: HashSet<String>,
        sent: HashMap<String, String>,
    }
    let mut subs: BTreeMap<String, Sub> = BTreeMap::new();
    let diff = |t: &str, sub: &mut Sub, force: bool, v: u64| -> Option<DynamicMessage> {
        let res = state.resources.lock().unwrap_or_else(|e| e.into_inner());
        let current: BTreeMap<String, Vec<u8>> = res
            .get(t)
            .into_iter()
            .flatten()
            .filter(|(n, _)| sub.wildcard || sub.names.contains(*n))
            .map(|(n, b)| (n.clone(), b.clone()))
            .collect();
        let mut out = Vec::new();
        for (n, b) in &current {
            let ver = format!("{:x}", remora::xds::content_hash([b.as_slice()]));
            if sub.sent.get(n) != Some(&ver) {
                let mut r = DynamicMessage::new(desc("envoy.service.discovery.v3.Resource"));
                r.set_field_by_name("name", PValue::String(n.clone()));
                r.set_field_by_name("version", PValue::String(ver.clone()));
                r.set_field_by_name("resource", PValue::Message(any(t, b)));
                out.push(PValue::Message(r));
                sub.sent.insert(n.clone(), ver);
            }
        }
        let removed: Vec<String> = sub
            .sent
            .keys()
            .filter(|n| !current.contains_key(*n))
            .cloned()
            .collect();
        for n in &removed {
            sub.sent.remove(n);
        }
        if out.is_empty() && removed.is_empty() && !force {
            return None;
        }
        let mut m = DynamicMessage::new(desc("envoy.service.discovery.v3.DeltaDiscoveryResponse"));
        m.set_field_by_name("system_version_info", PValue::String(v.to_string()));
        m.set_field_by_name("type_url", PValue::String(t.to_owned()));
        m.set_field_by_name("resources", PValue::List(out));
        m.set_field_by_name(
            "removed_resources",
            PValue::List(removed.into_iter().map(PValue::String).collect()),
        );
        let nonce = state.nonce.fetch_add(1, Ordering::SeqCst).to_string();
        m.set_field_by_name("nonce", PValue::String(nonce));
        Some(m)
    };
    loop {
        tokio::select! {
            req = inbound.message() => {
                let Ok(Some(req)) = req else { return };
                state.requests.lock().unwrap_or_else(|e| e.into_inner()).push(req.clone());
                let t = type_url(&req);
                let subscribe = strs(&req, "resource_names_subscribe");
                let unsubscribe = strs(&req, "resource_names_unsubscribe");
                let initial = !subs.contains_key(&t);
                if !initial && subscribe.is_empty() && unsubscribe.is_empty() {
                    continue; // an ACK or a NACK
                }
                let sub = subs.entry(t.clone()).or_insert_with(|| Sub {
                    wildcard: subscribe.is_empty() || subscribe.iter().any(|n| n == "*"),
                    names: HashSet::new(),
                    sent: HashMap::new(),
                });
                if initial {
                    if let Some(PValue::Map(m)) = req.get_field_by_name("initial_resource_versions").as_deref() {
                        for (k, v) in m {
                            if let (prost_reflect::MapKey::String(k), Some(v)) = (k, v.as_str()) {
                                sub.sent.insert(k.clone(), v.to_owned());
                            }
                        }
                    }
                }
                sub.names.extend(subscribe.into_iter().filter(|n| n != "*"));
                for n in &unsubscribe {
                    sub.names.remove(n);
                    sub.sent.remove(n);
                }
                let v = *version.borrow();
                if let Some(m) = diff(&t, sub, initial, v) {
                    if tx.send(Ok(m)).await.is_err() { return }
                }
            }
            changed = version.changed() => {
                if changed.is_err() { return }
                let v = *version.borrow_and_update();
                for (t, sub) in subs.iter_mut() {
                    if let Some(m) = diff(t, sub, false, v) {
                        if tx.send(Ok(m)).await.is_err() { return }
                    }
                }
            }
        }
    }
}
