//! A minimal ADS management server (state of the world) for the xDS scale benchmark (`--bin xds_scale`).
//!
//! It speaks gRPC by hand on hyper's h2 server (a gRPC message is a 5-byte prefix and a protobuf), and encodes
//! the few Envoy messages it needs with `prost` derives of just the fields used, so that the load harness
//! still builds without the proxy. One stream at a time: the bench pushes a `DiscoveryResponse` with
//! [`AdsServer::push`] and waits for the proxy's answer to its nonce with [`AdsServer::wait_answer`]; every
//! request is time-stamped when it arrives. The proxy's first CDS request is answered with an empty state so
//! that it goes ready.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Error;

const SOTW: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The fields of Envoy's messages that the bench reads or writes (field numbers from Envoy's protos).
pub mod pb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DiscoveryRequest {
        #[prost(string, tag = "1")]
        pub version_info: String,
        #[prost(string, repeated, tag = "3")]
        pub resource_names: Vec<String>,
        #[prost(string, tag = "4")]
        pub type_url: String,
        #[prost(string, tag = "5")]
        pub response_nonce: String,
        #[prost(message, optional, tag = "6")]
        pub error_detail: Option<Status>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DiscoveryResponse {
        #[prost(string, tag = "1")]
        pub version_info: String,
        #[prost(message, repeated, tag = "2")]
        pub resources: Vec<Any>,
        #[prost(string, tag = "4")]
        pub type_url: String,
        #[prost(string, tag = "5")]
        pub nonce: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Duration {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }

    /// `envoy.config.cluster.v3.Cluster`: `name`, `type`, `eds_cluster_config`, `connect_timeout`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Cluster {
        #[prost(string, tag = "1")]
        pub name: String,
        /// `DiscoveryType`: 3 is EDS.
        #[prost(int32, tag = "2")]
        pub r#type: i32,
        #[prost(message, optional, tag = "3")]
        pub eds_cluster_config: Option<EdsClusterConfig>,
        #[prost(message, optional, tag = "4")]
        pub connect_timeout: Option<Duration>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EdsClusterConfig {
        #[prost(message, optional, tag = "1")]
        pub eds_config: Option<ConfigSource>,
    }

    /// `envoy.config.core.v3.ConfigSource` with `ads: {}`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ConfigSource {
        #[prost(message, optional, tag = "3")]
        pub ads: Option<Empty>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ClusterLoadAssignment {
        #[prost(string, tag = "1")]
        pub cluster_name: String,
        #[prost(message, repeated, tag = "2")]
        pub endpoints: Vec<LocalityLbEndpoints>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LocalityLbEndpoints {
        #[prost(message, repeated, tag = "2")]
        pub lb_endpoints: Vec<LbEndpoint>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LbEndpoint {
        #[prost(message, optional, tag = "1")]
        pub endpoint: Option<Endpoint>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Endpoint {
        #[prost(message, optional, tag = "1")]
        pub address: Option<Address>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Address {
        #[prost(message, optional, tag = "1")]
        pub socket_address: Option<SocketAddress>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SocketAddress {
        #[prost(string, tag = "2")]
        pub address: String,
        #[prost(uint32, tag = "3")]
        pub port_value: u32,
    }
}

/// An EDS cluster over ADS.
pub fn eds_cluster(name: &str) -> Vec<u8> {
    pb::Cluster {
        name: name.to_owned(),
        r#type: 3,
        eds_cluster_config: Some(pb::EdsClusterConfig {
            eds_config: Some(pb::ConfigSource {
                ads: Some(pb::Empty {}),
            }),
        }),
        connect_timeout: Some(pb::Duration { seconds: 1, nanos: 0 }),
    }
    .encode_to_vec()
}

/// A `ClusterLoadAssignment` of `addrs`, in one locality.
pub fn assignment(name: &str, addrs: &[SocketAddr]) -> Vec<u8> {
    let lb_endpoints = addrs
        .iter()
        .map(|a| pb::LbEndpoint {
            endpoint: Some(pb::Endpoint {
                address: Some(pb::Address {
                    socket_address: Some(pb::SocketAddress {
                        address: a.ip().to_string(),
                        port_value: u32::from(a.port()),
                    }),
                }),
            }),
        })
        .collect();
    pb::ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![pb::LocalityLbEndpoints { lb_endpoints }],
    }
    .encode_to_vec()
}

/// One request from the proxy, with when it arrived.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub at: Instant,
    pub request: pb::DiscoveryRequest,
}

#[derive(Default)]
struct Inner {
    stream: Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
    arrivals: Mutex<Vec<Arrival>>,
    nonce: AtomicU64,
}

/// The management server; see the module docs. Its tasks stop when the runtime does.
pub struct AdsServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A gRPC message: uncompressed flag, big-endian length, the protobuf.
fn frame(m: &impl Message) -> Bytes {
    let body = m.encode_to_vec();
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.freeze()
}

/// A response body fed by a channel, for as long as the stream lives.
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

impl AdsServer {
    pub async fn start() -> Result<AdsServer, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner::default());
        let accept = inner.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let inner = accept.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(req, inner.clone()));
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_frame_size(1 << 20)
                        .initial_stream_window_size(8 << 20)
                        .initial_connection_window_size(16 << 20)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(AdsServer { addr, inner })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Send a state-of-the-world response of `type_url` on the open stream; returns its nonce.
    pub fn push(&self, type_url: &str, version: &str, resources: &[Vec<u8>]) -> Result<String, Error> {
        push(&self.inner, type_url, version, resources)
    }

    /// The proxy's answer (ACK or NACK) to `nonce`, waiting at most `limit`.
    pub async fn wait_answer(&self, nonce: &str, limit: Duration) -> Result<Arrival, Error> {
        self.wait_for(&format!("the answer to nonce {nonce}"), limit, |r| {
            r.response_nonce == nonce
        })
        .await
    }

    /// The first request (since the start) that `accept` takes, waiting at most `limit`.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        accept: impl Fn(&pb::DiscoveryRequest) -> bool,
    ) -> Result<Arrival, Error> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(a) = lock(&self.inner.arrivals).iter().find(|a| accept(&a.request)) {
                return Ok(a.clone());
            }
            if Instant::now() > deadline {
                return Err(format!("no {what} within {limit:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn push(inner: &Inner, type_url: &str, version: &str, resources: &[Vec<u8>]) -> Result<String, Error> {
    let nonce = inner.nonce.fetch_add(1, Ordering::SeqCst).to_string();
    let m = pb::DiscoveryResponse {
        version_info: version.to_owned(),
        resources: resources
            .iter()
            .map(|r| pb::Any {
                type_url: type_url.to_owned(),
                value: r.clone(),
            })
            .collect(),
        type_url: type_url.to_owned(),
        nonce: nonce.clone(),
    };
    let tx = lock(&inner.stream).clone().ok_or("no ADS stream is open")?;
    tx.send(frame(&m)).map_err(|_| "the ADS stream closed")?;
    Ok(nonce)
}

async fn handle(req: Request<Incoming>, inner: Arc<Inner>) -> Result<Response<ChannelBody>, Infallible> {
    let (tx, rx) = mpsc::unbounded_channel();
    if req.uri().path() != SOTW {
        let mut r = Response::new(ChannelBody(rx));
        r.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("12"));
        return Ok(r);
    }
    *lock(&inner.stream) = Some(tx);
    tokio::spawn(read_requests(req.into_body(), inner));
    let mut r = Response::new(ChannelBody(rx));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(r)
}

async fn read_requests(mut body: Incoming, inner: Arc<Inner>) {
    let mut buf = BytesMut::new();
    while let Some(Ok(f)) = body.frame().await {
        let Ok(data) = f.into_data() else { continue };
        buf.extend_from_slice(&data);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let msg = buf.split_to(len);
            let Ok(request) = pb::DiscoveryRequest::decode(msg.freeze()) else {
                continue;
            };
            let initial_cds = request.type_url == CLUSTER && request.response_nonce.is_empty();
            lock(&inner.arrivals).push(Arrival {
                at: Instant::now(),
                request,
            });
            // The first CDS round: nothing yet, so that the proxy goes ready.
            if initial_cds {
                let _ = push(&inner, CLUSTER, "0", &[]);
            }
        }
    }
}
