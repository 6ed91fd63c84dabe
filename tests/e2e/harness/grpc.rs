//! A gRPC test origin ([`GrpcUpstream`]) and client ([`GrpcClient`]), written without codegen.
//!
//! The messages are hand-written prost structs and the service is a dispatcher on the request path over
//! tonic's generic `server::Grpc` with `tonic_prost::ProstCodec`; it runs on the same h2c server as
//! [`Upstream`](super::Upstream). Methods:
//!
//! - `/test.Echo/Unary` and `/cache.EntityService/Get` (unary): reply with the request's message. The message
//!   `fail:<code>` fails with that numeric status instead (trailers-only, as tonic answers an error before any
//!   message), and `sleep:<ms>` answers after `ms` milliseconds.
//! - `/test.Echo/Bidi` (bidi streaming): replies to each message as it arrives and ends with OK when the client
//!   half-closes; the message `fail:<code>` ends the stream with that status in real trailers after the replies
//!   sent so far.
//!
//! - `/grpc.health.v1.Health/Check` (unary): the standard health service, answering the status set with
//!   [`GrpcUpstream::set_serving`] (SERVING at first) whatever the service, and recording the `service` and
//!   `:authority` of each check ([`GrpcUpstream::health_checks`]).
//!
//! Every response carries the header `x-upstream: <name>`, and every reply says which upstream and method
//! answered, so a routing test can tell origins apart. A request with metadata [`ECHO_TRAILER`] gets the value
//! back as a trailer of the same name (in the status metadata of a failure), and every requested failure
//! carries [`FAIL_DETAIL`]: trailers that a proxy must pass through intact.
//!
//! The client keeps response headers, the message or status, and trailers apart ([`UnaryOutcome`],
//! [`BidiCall`]), since a proxy can break each one separately.

use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::server::{StreamingService, UnaryService};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};
use tonic_prost::ProstCodec;

use super::upstream::{BoxFuture, Handler, Server};
use super::{within, BoxError, Protocol, UpstreamBody, UpstreamOptions, DEFAULT_TIMEOUT};

pub const UNARY_PATH: &str = "/test.Echo/Unary";
pub const BIDI_PATH: &str = "/test.Echo/Bidi";
pub const CACHE_GET_PATH: &str = "/cache.EntityService/Get";
pub const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    pub service: String,
}

/// `grpc.health.v1.HealthCheckResponse` (`status`: 1 SERVING, 2 NOT_SERVING).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// The health service's state: the status it answers, and the `(service, :authority)` of each check.
#[derive(Default)]
struct Health {
    not_serving: std::sync::atomic::AtomicBool,
    checks: std::sync::Mutex<Vec<(String, String)>>,
}

/// Request metadata whose value the server returns as a trailer of the same name.
pub const ECHO_TRAILER: &str = "x-echo-trailer";

/// Metadata (value `requested`) on every failure that a request asked for with `fail:<code>`.
pub const FAIL_DETAIL: &str = "x-fail-detail";

/// The request of every test method (`message` is field 1, a string).
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
}

/// The reply of every test method.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    /// The name of the upstream that answered.
    #[prost(string, tag = "2")]
    pub upstream: String,
    /// The method that answered, e.g. `/test.Echo/Unary`.
    #[prost(string, tag = "3")]
    pub method: String,
}

/// The gRPC test origin; see the module docs. Dropping it stops it.
pub struct GrpcUpstream {
    name: Arc<str>,
    server: Server,
    health: Arc<Health>,
}

impl GrpcUpstream {
    /// Starts the origin on `127.0.0.1:0`, speaking h2c prior knowledge.
    pub async fn start(name: &str) -> GrpcUpstream {
        let header = HeaderValue::from_str(name)
            .unwrap_or_else(|e| panic!("upstream name {name:?} is not a header value: {e}"));
        let name: Arc<str> = Arc::from(name);
        let health = Arc::new(Health::default());
        let handler: Handler = {
            let name = name.clone();
            let health = health.clone();
            Arc::new(move |req| Box::pin(dispatch(name.clone(), header.clone(), health.clone(), req)))
        };
        let options = UpstreamOptions {
            protocol: Protocol::H2c,
            bind: None,
        };
        let server = Server::start(&options, handler).await;
        GrpcUpstream { name, server, health }
    }

    /// What `grpc.health.v1.Health/Check` answers from now on: SERVING or NOT_SERVING.
    pub fn set_serving(&self, serving: bool) {
        self.health.not_serving.store(!serving, Ordering::SeqCst);
    }

    /// The `(service, :authority)` of every health check received so far.
    pub fn health_checks(&self) -> Vec<(String, String)> {
        self.health
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn port(&self) -> u16 {
        self.server.addr().port()
    }

    /// Calls received so far.
    pub fn requests(&self) -> u64 {
        self.server.requests().load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.server.connections()
    }
}

fn codec() -> ProstCodec<EchoReply, EchoRequest> {
    ProstCodec::default()
}

/// Answers `grpc.health.v1.Health/Check` for one call.
struct HealthAnswerer {
    health: Arc<Health>,
    authority: String,
}

impl UnaryService<HealthCheckRequest> for HealthAnswerer {
    type Response = HealthCheckResponse;
    type Future = BoxFuture<Result<tonic::Response<HealthCheckResponse>, Status>>;

    fn call(&mut self, request: tonic::Request<HealthCheckRequest>) -> Self::Future {
        let service = request.into_inner().service;
        self.health
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((service, self.authority.clone()));
        let status = if self.health.not_serving.load(Ordering::SeqCst) {
            2
        } else {
            1
        };
        Box::pin(async move { Ok(tonic::Response::new(HealthCheckResponse { status })) })
    }
}

/// A SERVING answer to a `grpc.health.v1.Health/Check` request, for origins that are not a [`GrpcUpstream`]
/// but must pass gRPC health checks.
pub async fn serving_health_check(req: Request<Incoming>) -> Response<UpstreamBody> {
    let answerer = HealthAnswerer {
        health: Arc::new(Health::default()),
        authority: String::new(),
    };
    let codec = ProstCodec::<HealthCheckResponse, HealthCheckRequest>::default();
    let response = tonic::server::Grpc::new(codec).unary(answerer, req).await;
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
}

async fn dispatch(
    name: Arc<str>,
    header: HeaderValue,
    health: Arc<Health>,
    req: Request<Incoming>,
) -> Response<UpstreamBody> {
    let method = req.uri().path().to_owned();
    let echo_trailer = req.headers().get(ECHO_TRAILER).cloned();
    let answerer = Answerer {
        name: name.clone(),
        method: method.clone(),
    };
    let response = match method.as_str() {
        UNARY_PATH | CACHE_GET_PATH => tonic::server::Grpc::new(codec()).unary(answerer, req).await,
        BIDI_PATH => tonic::server::Grpc::new(codec()).streaming(answerer, req).await,
        HEALTH_CHECK_PATH => {
            let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
            let codec = ProstCodec::<HealthCheckResponse, HealthCheckRequest>::default();
            tonic::server::Grpc::new(codec)
                .unary(HealthAnswerer { health, authority }, req)
                .await
        }
        _ => Status::unimplemented(format!("{name} has no method {method}")).into_http(),
    };
    let (mut parts, body) = response.into_parts();
    parts.headers.insert("x-upstream", header);
    let body = body.map_frame(move |mut frame| {
        if let (Some(trailers), Some(value)) = (frame.trailers_mut(), &echo_trailer) {
            trailers.insert(ECHO_TRAILER, value.clone());
        }
        frame
    });
    Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
}

/// Answers the unary methods and the bidi method for one call.
struct Answerer {
    name: Arc<str>,
    method: String,
}

impl Answerer {
    fn reply(&self, message: String) -> EchoReply {
        EchoReply {
            message,
            upstream: self.name.to_string(),
            method: self.method.clone(),
        }
    }
}

/// The status that `fail:<code>` asks for, with [`FAIL_DETAIL`] and the echoed trailer as metadata.
fn requested_failure(message: &str, echo_trailer: Option<&AsciiMetadataValue>) -> Option<Status> {
    let code = message.strip_prefix("fail:")?;
    let Ok(code) = code.parse::<i32>() else {
        return Some(Status::invalid_argument(format!("bad code in {message:?}")));
    };
    let mut metadata = MetadataMap::new();
    metadata.insert(FAIL_DETAIL, AsciiMetadataValue::from_static("requested"));
    if let Some(value) = echo_trailer {
        metadata.insert(ECHO_TRAILER, value.clone());
    }
    Some(Status::with_metadata(
        Code::from(code),
        format!("failure {code} as requested"),
        metadata,
    ))
}

impl UnaryService<EchoRequest> for Answerer {
    type Response = EchoReply;
    type Future = BoxFuture<Result<tonic::Response<EchoReply>, Status>>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        let echo_trailer = request.metadata().get(ECHO_TRAILER).cloned();
        let message = request.into_inner().message;
        if let Some(status) = requested_failure(&message, echo_trailer.as_ref()) {
            return Box::pin(async move { Err(status) });
        }
        let delay = match message.strip_prefix("sleep:").map(str::parse::<u64>) {
            None => None,
            Some(Ok(ms)) => Some(Duration::from_millis(ms)),
            Some(Err(_)) => {
                let status = Status::invalid_argument(format!("bad delay in {message:?}"));
                return Box::pin(async move { Err(status) });
            }
        };
        let reply = self.reply(message);
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            Ok(tonic::Response::new(reply))
        })
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

impl StreamingService<EchoRequest> for Answerer {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<tonic::Response<ReplyStream>, Status>>;

    fn call(&mut self, request: tonic::Request<Streaming<EchoRequest>>) -> Self::Future {
        let echo_trailer = request.metadata().get(ECHO_TRAILER).cloned();
        let this = Answerer {
            name: self.name.clone(),
            method: self.method.clone(),
        };
        let replies = request.into_inner().map(move |item| {
            let message = item?.message;
            match requested_failure(&message, echo_trailer.as_ref()) {
                Some(status) => Err(status),
                None => Ok(this.reply(message)),
            }
        });
        Box::pin(async move { Ok(tonic::Response::new(Box::pin(replies) as ReplyStream)) })
    }
}

/// The parts of a unary call's answer, kept apart.
#[derive(Debug)]
pub struct UnaryOutcome {
    /// Response headers; for a trailers-only answer, the headers that carried the status.
    pub headers: MetadataMap,
    pub result: Result<EchoReply, Status>,
    /// Response trailers, including `grpc-status` (for a failure, the status's metadata); empty for a
    /// trailers-only answer.
    pub trailers: MetadataMap,
    /// Whether the status came in the response headers with no body (the gRPC "trailers-only" form).
    pub trailers_only: bool,
}

impl UnaryOutcome {
    pub fn code(&self) -> Code {
        self.result.as_ref().map_or_else(Status::code, |_| Code::Ok)
    }

    /// The reply; panics with the status if the call failed.
    pub fn reply(&self) -> &EchoReply {
        match &self.result {
            Ok(reply) => reply,
            Err(status) => panic!("call failed: {status:?}"),
        }
    }

    /// The `x-upstream` response header.
    pub fn upstream(&self) -> Option<&str> {
        self.headers.get("x-upstream").and_then(|v| v.to_str().ok())
    }

    /// Trailer `key`, wherever the answer put it: the trailers, the failure's metadata, or (trailers-only)
    /// the headers.
    pub fn trailer(&self, key: &str) -> Option<&str> {
        let in_status = self.result.as_ref().err().map(Status::metadata);
        let in_headers = self.trailers_only.then_some(&self.headers);
        [Some(&self.trailers), in_status, in_headers]
            .into_iter()
            .flatten()
            .find_map(|map| map.get(key))
            .and_then(|v| v.to_str().ok())
    }
}

/// A gRPC client on one channel (one h2 connection, reconnected if it drops); cheap to clone.
#[derive(Clone)]
pub struct GrpcClient {
    addr: SocketAddr,
    channel: Channel,
}

impl GrpcClient {
    /// Connects to `addr` (bounded by [`DEFAULT_TIMEOUT`]), with `addr` as `:authority`.
    pub async fn connect(addr: SocketAddr) -> GrpcClient {
        GrpcClient::connect_as(addr, &addr.to_string()).await
    }

    /// Connects to `addr` and sends `authority` as `:authority`, for virtual-host routing.
    pub async fn connect_as(addr: SocketAddr, authority: &str) -> GrpcClient {
        let origin = Uri::from_str(&format!("http://{authority}"))
            .unwrap_or_else(|e| panic!("bad authority {authority:?}: {e}"));
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap_or_else(|e| panic!("bad address {addr}: {e}"))
            .origin(origin)
            .connect_timeout(DEFAULT_TIMEOUT);
        let channel = within(DEFAULT_TIMEOUT, "a gRPC connection", endpoint.connect())
            .await
            .unwrap_or_else(|e| panic!("gRPC connect to {addr}: {}", super::client::cause_chain(&e)));
        GrpcClient { addr, channel }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Calls `/test.Echo/Unary` with `message`.
    pub async fn echo(&self, message: &str) -> UnaryOutcome {
        self.unary(UNARY_PATH, message, &[]).await
    }

    /// Calls unary method `path` with `message` and request `metadata` (e.g. `grpc-timeout`); a call that
    /// does not end within [`DEFAULT_TIMEOUT`] panics.
    pub async fn unary(&self, path: &str, message: &str, metadata: &[(&str, &str)]) -> UnaryOutcome {
        let path = PathAndQuery::from_str(path).unwrap_or_else(|e| panic!("bad gRPC path {path:?}: {e}"));
        let mut request = tonic::Request::new(EchoRequest {
            message: message.to_owned(),
        });
        insert_metadata(request.metadata_mut(), metadata);
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let call = async move {
            if let Err(e) = grpc.ready().await {
                return failed(Status::unavailable(format!("channel not ready: {e}")));
            }
            // server_streaming rather than unary: it hands back the headers before the message and the
            // trailers after it, where unary merges them.
            let response = match grpc.server_streaming(request, path, codec_client()).await {
                Ok(response) => response,
                Err(status) => return failed(status),
            };
            let (headers, mut replies, _) = response.into_parts();
            let result = match replies.message().await {
                Ok(Some(reply)) => Ok(reply),
                Ok(None) => Err(Status::internal("the call ended without a reply")),
                Err(status) => Err(status),
            };
            let (result, trailers) = match result {
                Ok(reply) => match replies.trailers().await {
                    Ok(trailers) => (Ok(reply), trailers.unwrap_or_default()),
                    Err(status) => (Err(status.clone()), status.metadata().clone()),
                },
                Err(status) => {
                    let trailers = status.metadata().clone();
                    (Err(status), trailers)
                }
            };
            UnaryOutcome {
                headers,
                result,
                trailers,
                trailers_only: false,
            }
        };
        within(DEFAULT_TIMEOUT, "a unary gRPC call", call).await
    }

    /// Opens `/test.Echo/Bidi` with request `metadata`; returns once the response headers arrive.
    pub async fn bidi(&self, metadata: &[(&str, &str)]) -> Result<BidiCall, Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        insert_metadata(request.metadata_mut(), metadata);
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let open = async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
            grpc.streaming(request, PathAndQuery::from_static(BIDI_PATH), codec_client())
                .await
        };
        let response = within(DEFAULT_TIMEOUT, "bidi response headers", open).await?;
        let (headers, inbound, _) = response.into_parts();
        Ok(BidiCall {
            outbound: Some(tx),
            headers,
            inbound,
        })
    }
}

fn codec_client() -> ProstCodec<EchoRequest, EchoReply> {
    ProstCodec::default()
}

/// A failure before any response headers: the status carried them (trailers-only) or there were none.
fn failed(status: Status) -> UnaryOutcome {
    UnaryOutcome {
        headers: status.metadata().clone(),
        result: Err(status),
        trailers: MetadataMap::new(),
        trailers_only: true,
    }
}

fn insert_metadata(map: &mut MetadataMap, metadata: &[(&str, &str)]) {
    for (key, value) in metadata {
        let key = AsciiMetadataKey::from_str(key).unwrap_or_else(|e| panic!("bad metadata key {key:?}: {e}"));
        let value = AsciiMetadataValue::from_str(value)
            .unwrap_or_else(|e| panic!("bad metadata value {value:?}: {e}"));
        map.append(key, value);
    }
}

/// An open bidi call: send and receive in any order; every wait is bounded by [`DEFAULT_TIMEOUT`].
pub struct BidiCall {
    outbound: Option<mpsc::Sender<EchoRequest>>,
    headers: MetadataMap,
    inbound: Streaming<EchoReply>,
}

impl BidiCall {
    /// The response headers.
    pub fn headers(&self) -> &MetadataMap {
        &self.headers
    }

    /// The `x-upstream` response header.
    pub fn upstream(&self) -> Option<&str> {
        self.headers.get("x-upstream").and_then(|v| v.to_str().ok())
    }

    /// Queues `message` for sending; panics once the sending half is closed or the call has ended.
    pub async fn send(&self, message: &str) {
        let Some(outbound) = &self.outbound else {
            panic!("send after close_send")
        };
        let sent = within(DEFAULT_TIMEOUT, "room to send on a bidi call", async {
            outbound
                .send(EchoRequest {
                    message: message.to_owned(),
                })
                .await
        });
        if sent.await.is_err() {
            panic!("the bidi call ended before {message:?} could be sent");
        }
    }

    /// The next reply: `Ok(None)` once the call ended with OK, `Err` once it ended with another status.
    pub async fn recv(&mut self) -> Result<Option<EchoReply>, Status> {
        within(DEFAULT_TIMEOUT, "a bidi reply", self.inbound.message()).await
    }

    /// Half-closes the call: the server sees the end of the request stream.
    pub fn close_send(&mut self) {
        self.outbound = None;
    }

    /// Half-closes, then reads the remaining replies and the end: the trailers after OK, or the status.
    pub async fn finish(mut self) -> (Vec<EchoReply>, Result<MetadataMap, Status>) {
        self.close_send();
        let mut replies = Vec::new();
        loop {
            match self.recv().await {
                Ok(Some(reply)) => replies.push(reply),
                Ok(None) => break,
                Err(status) => return (replies, Err(status)),
            }
        }
        let trailers = within(DEFAULT_TIMEOUT, "bidi trailers", self.inbound.trailers()).await;
        (replies, trailers.map(Option::unwrap_or_default))
    }
}
