//! [`Upstream`]: an in-process HTTP origin that tells the test what it received.
//!
//! It speaks HTTP/1.1 and h2c prior knowledge on one port ([`Protocol::Auto`], hyper-util's auto builder), or
//! only one of them. Its default handler answers every request with [`Echo`] as JSON and an
//! `x-upstream: <name>` header, so a test learns which origin answered and what the proxy forwarded. A few
//! paths change the answer:
//!
//! | path          | answer                                                              |
//! |---------------|---------------------------------------------------------------------|
//! | `/status/NNN` | status NNN (200..=999), the echo as body (none for 204 and 304)     |
//! | `/delay/MS`   | the echo after MS milliseconds (the delay is the behaviour tested)  |
//! | `/bytes/N`    | N bytes of `x`, with `content-length`                               |
//! | `/echo`       | the request body streamed back as it arrives                        |
//!
//! A test may replace the handler ([`Upstream::set_handler`]) and delegate to [`echo_response`] for the rest.
//! Dropping the `Upstream` stops it and closes every connection it had.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// The error type of harness bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body an upstream handler returns.
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

pub(super) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Answers one request; shared by every connection of a server.
pub(super) type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFuture<Response<UpstreamBody>> + Send + Sync>;

/// Which HTTP versions a server accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 and h2c prior knowledge on the same port, told apart by the connection preface.
    #[default]
    Auto,
    /// HTTP/1.1 only: an h2c connection fails.
    Http1,
    /// h2c prior knowledge only: an HTTP/1.1 connection fails.
    H2c,
}

/// How to start an [`Upstream`].
#[derive(Clone, Debug, Default)]
pub struct UpstreamOptions {
    pub protocol: Protocol,
    /// The address to bind; `127.0.0.1:0` when `None`. A test that restarts an origin on the port of one it
    /// dropped passes that address here.
    pub bind: Option<SocketAddr>,
}

/// A listening server and its counters; the accept loop and every connection stop when it is dropped.
pub(super) struct Server {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Server {
    pub(super) async fn start(options: &UpstreamOptions, handler: Handler) -> Server {
        let bind = options.bind.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = TcpListener::bind(bind)
            .await
            .unwrap_or_else(|e| panic!("upstream cannot bind {bind}: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("upstream has no local address: {e}"));
        let requests = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            options.protocol,
            handler,
            requests.clone(),
            connections.clone(),
        ));
        Server {
            addr,
            requests,
            connections,
            task,
        }
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(super) fn requests(&self) -> &AtomicU64 {
        &self.requests
    }

    pub(super) fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    protocol: Protocol,
    handler: Handler,
    requests: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
                connections.fetch_add(1, Ordering::SeqCst);
                // Nagle would add delay to small writes that tests time.
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let requests = requests.clone();
                let service = hyper::service::service_fn(move |req| {
                    requests.fetch_add(1, Ordering::SeqCst);
                    let answer = handler(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                conns.spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let builder = match protocol {
                        Protocol::Auto => builder,
                        Protocol::Http1 => builder.http1_only(),
                        Protocol::H2c => builder.http2_only(),
                    };
                    // A connection error (a reset, a bad preface) ends that connection only.
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// What the default handler saw, as the JSON body of its answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    pub method: String,
    /// Path with query, as received.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The URI authority (`:authority` in HTTP/2; HTTP/1.1 carries `host` in `headers` instead).
    pub authority: Option<String>,
    /// Lower-case header name to its values in order.
    pub headers: BTreeMap<String, Vec<String>>,
    pub body_len: u64,
    pub upstream_name: String,
}

impl Echo {
    /// Parses an echo body, panicking with the body if it is not one.
    pub fn parse(body: &[u8]) -> Echo {
        serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("not an upstream echo ({e}): {}", String::from_utf8_lossy(body)))
    }

    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.first()).map(String::as_str)
    }

    /// Every value of header `name` (lower case).
    pub fn header_values(&self, name: &str) -> &[String] {
        self.headers.get(name).map(Vec::as_slice).unwrap_or_default()
    }
}

/// An in-process HTTP origin; see the module docs.
pub struct Upstream {
    name: Arc<str>,
    custom: Arc<RwLock<Option<Handler>>>,
    server: Server,
}

impl Upstream {
    /// An origin speaking HTTP/1.1 and h2c on `127.0.0.1:0`.
    pub async fn start(name: &str) -> Upstream {
        Upstream::with_options(name, UpstreamOptions::default()).await
    }

    /// An origin speaking HTTP/1.1 only.
    pub async fn http1(name: &str) -> Upstream {
        Upstream::with_options(
            name,
            UpstreamOptions {
                protocol: Protocol::Http1,
                bind: None,
            },
        )
        .await
    }

    /// An origin speaking h2c prior knowledge only.
    pub async fn h2c(name: &str) -> Upstream {
        Upstream::with_options(
            name,
            UpstreamOptions {
                protocol: Protocol::H2c,
                bind: None,
            },
        )
        .await
    }

    pub async fn with_options(name: &str, options: UpstreamOptions) -> Upstream {
        let header = HeaderValue::from_str(name)
            .unwrap_or_else(|e| panic!("upstream name {name:?} is not a header value: {e}"));
        let name: Arc<str> = Arc::from(name);
        let custom: Arc<RwLock<Option<Handler>>> = Arc::new(RwLock::new(None));
        let handler: Handler = {
            let name = name.clone();
            let custom = custom.clone();
            Arc::new(move |req| {
                let chosen = custom.read().unwrap_or_else(PoisonError::into_inner).clone();
                let name = name.clone();
                let header = header.clone();
                Box::pin(async move {
                    let mut response = match chosen {
                        Some(handler) => handler(req).await,
                        None => echo_response(req, &name).await,
                    };
                    response.headers_mut().entry("x-upstream").or_insert(header);
                    response
                })
            })
        };
        let server = Server::start(&options, handler).await;
        Upstream { name, custom, server }
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

    /// Requests received so far (counted when their head arrives).
    pub fn requests(&self) -> u64 {
        self.server.requests().load(Ordering::SeqCst)
    }

    /// The request counter itself, for a test that resets or watches it.
    pub fn request_counter(&self) -> &AtomicU64 {
        self.server.requests()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.server.connections()
    }

    /// Answers every later request with `handler`; `x-upstream` is still added unless the handler sets it.
    pub fn set_handler<F, Fut>(&self, handler: F)
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<UpstreamBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        *self.custom.write().unwrap_or_else(PoisonError::into_inner) = Some(handler);
    }

    /// Goes back to the default echo handler.
    pub fn clear_handler(&self) {
        *self.custom.write().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// A whole body from bytes.
pub fn full(body: impl Into<Bytes>) -> UpstreamBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A response with `status` and `body`; panics on a status outside 100..=999.
pub fn reply(status: u16, body: impl Into<Bytes>) -> Response<UpstreamBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or_else(|e| panic!("bad status {status}: {e}"));
    response
}

/// The default handler of an upstream called `name` (see the module docs).
pub async fn echo_response(req: Request<Incoming>, name: &str) -> Response<UpstreamBody> {
    let path = req.uri().path().to_owned();
    if path == "/echo" {
        let length = req.headers().get(CONTENT_LENGTH).cloned();
        let mut response = Response::new(req.into_body().map_err(BoxError::from).boxed_unsync());
        if let Some(length) = length {
            response.headers_mut().insert(CONTENT_LENGTH, length);
        }
        return response;
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        return match n.parse::<usize>() {
            Ok(n) => reply(200, vec![b'x'; n]),
            Err(_) => reply(400, format!("bad byte count {n:?}")),
        };
    }
    let status = match path.strip_prefix("/status/").map(str::parse::<u16>) {
        None => StatusCode::OK,
        // A final response cannot be 1xx.
        Some(Ok(code)) if (200..=999).contains(&code) => {
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
        }
        Some(_) => return reply(400, format!("bad status in {path:?}")),
    };
    let delay = match path.strip_prefix("/delay/").map(str::parse::<u64>) {
        None => None,
        Some(Ok(ms)) => Some(Duration::from_millis(ms)),
        Some(Err(_)) => return reply(400, format!("bad delay in {path:?}")),
    };

    let (parts, body) = req.into_parts();
    let body_len = match body.collect().await {
        Ok(collected) => collected.to_bytes().len() as u64,
        Err(e) => return reply(400, format!("request body failed: {e}")),
    };
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, value) in &parts.headers {
        headers
            .entry(key.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let echo = Echo {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or(path, |pq| pq.as_str().to_owned()),
        version: format!("{:?}", parts.version),
        authority: parts.uri.authority().map(|a| a.as_str().to_owned()),
        headers,
        body_len,
        upstream_name: name.to_owned(),
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }

    let bodyless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let mut response = if bodyless {
        Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync())
    } else {
        let json = serde_json::to_vec(&echo).unwrap_or_else(|e| panic!("echo does not serialise: {e}"));
        let mut response = Response::new(full(json));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    };
    *response.status_mut() = status;
    response
}
