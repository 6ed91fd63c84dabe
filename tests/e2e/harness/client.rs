//! [`HttpClient`]: a pooled HTTP/1.1 or h2c (prior knowledge) client bound to one address.
//!
//! Requests carry a path-only URI. The client connects to its address whatever the URI says and takes the
//! authority (`host` in HTTP/1.1, `:authority` in HTTP/2) from the request's `host` header when it has one,
//! else from the address, so a test aims at a virtual host without DNS. Connections are pooled: HTTP/1.1 keeps
//! idle connections for reuse and h2c multiplexes requests over one connection.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::upstream::BoxFuture;
use super::{Echo, DEFAULT_TIMEOUT};

/// Why a request got no whole response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no whole response within {0:?}")]
    Timeout(Duration),
    /// Connecting, writing the request or reading the response head failed; the text has the cause chain.
    #[error("request failed: {0}")]
    Request(String),
    /// The response head arrived but its body or trailers did not.
    #[error("response body failed: {0}")]
    Body(String),
}

/// A whole response.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// Header `name` as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as an [`Echo`] from the default upstream handler; panics otherwise.
    pub fn echo(&self) -> Echo {
        Echo::parse(&self.body)
    }
}

/// A pooled client for one address; cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct HttpClient {
    addr: SocketAddr,
    h2: bool,
    timeout: Duration,
    inner: Client<FixedConnector, Full<Bytes>>,
}

/// An HTTP/1.1 client for `addr`.
pub fn http1_client(addr: SocketAddr) -> HttpClient {
    HttpClient::new(addr, false)
}

/// An h2c (HTTP/2 prior knowledge) client for `addr`.
pub fn h2c_client(addr: SocketAddr) -> HttpClient {
    HttpClient::new(addr, true)
}

/// One HTTP/1.1 GET on a fresh client; panics if no whole response arrives within [`DEFAULT_TIMEOUT`].
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
    let reply = http1_client(addr).get(path, headers).await;
    (reply.status, reply.headers, reply.body)
}

/// Builds a request with a path-only URI; panics on an invalid path or header.
pub fn build_request(
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(body.into()))
        .unwrap_or_else(|e| panic!("bad request {path:?} {headers:?}: {e}"))
}

impl HttpClient {
    fn new(addr: SocketAddr, h2: bool) -> HttpClient {
        let mut builder = Client::builder(TokioExecutor::new());
        builder.http2_only(h2);
        HttpClient {
            addr,
            h2,
            timeout: DEFAULT_TIMEOUT,
            inner: builder.build(FixedConnector { addr }),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether this client speaks h2c rather than HTTP/1.1.
    pub fn is_h2c(&self) -> bool {
        self.h2
    }

    /// The same client (and pool) with another bound on each request.
    pub fn with_timeout(mut self, timeout: Duration) -> HttpClient {
        self.timeout = timeout;
        self
    }

    /// Sends `req` and returns once the response head arrives (bounded); the body is left to the caller.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, ClientError> {
        let req = self.prepare(req);
        match tokio::time::timeout(self.timeout, self.inner.request(req)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(ClientError::Request(cause_chain(&e))),
            Err(_) => Err(ClientError::Timeout(self.timeout)),
        }
    }

    /// Sends `req` and reads the whole response, trailers included, within one bound.
    pub async fn fetch(&self, req: Request<Full<Bytes>>) -> Result<Reply, ClientError> {
        let req = self.prepare(req);
        let whole = async {
            let response = self
                .inner
                .request(req)
                .await
                .map_err(|e| ClientError::Request(cause_chain(&e)))?;
            let (parts, body) = response.into_parts();
            let collected = body
                .collect()
                .await
                .map_err(|e| ClientError::Body(cause_chain(&e)))?;
            let trailers = collected.trailers().cloned();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body: collected.to_bytes(),
                trailers,
            })
        };
        tokio::time::timeout(self.timeout, whole)
            .await
            .unwrap_or(Err(ClientError::Timeout(self.timeout)))
    }

    /// GET `path`; `Err` on a transport failure or time-out.
    pub async fn try_get(&self, path: &str, headers: &[(&str, &str)]) -> Result<Reply, ClientError> {
        self.fetch(build_request(Method::GET, path, headers, Bytes::new()))
            .await
    }

    /// GET `path`; panics on a transport failure or time-out.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.try_get(path, headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path} via {}: {e}", self.addr))
    }

    /// POST `body` to `path`; panics on a transport failure or time-out.
    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
        self.fetch(build_request(Method::POST, path, headers, body))
            .await
            .unwrap_or_else(|e| panic!("POST {path} via {}: {e}", self.addr))
    }

    /// Gives a path-only URI its authority: the `host` header, else the address. HTTP/2 carries it as
    /// `:authority` alone, so the `host` header is dropped there.
    fn prepare(&self, mut req: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
        if req.uri().authority().is_none() {
            let authority = req
                .headers()
                .get(HOST)
                .and_then(|v| v.to_str().ok())
                .map_or_else(|| self.addr.to_string(), str::to_owned);
            let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
            let uri = Uri::builder()
                .scheme("http")
                .authority(authority.as_str())
                .path_and_query(path)
                .build()
                .unwrap_or_else(|e| panic!("bad authority {authority:?} or path {path:?}: {e}"));
            *req.uri_mut() = uri;
        }
        if self.h2 {
            req.headers_mut().remove(HOST);
        }
        req
    }
}

/// Connects every request to one address, whatever authority its URI names.
#[derive(Clone)]
struct FixedConnector {
    addr: SocketAddr,
}

impl tower::Service<Uri> for FixedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = BoxFuture<std::io::Result<TokioIo<TcpStream>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let addr = self.addr;
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// `error: cause: cause`, since hyper's top-level messages ("client error (Connect)") hide the reason.
pub(super) fn cause_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
