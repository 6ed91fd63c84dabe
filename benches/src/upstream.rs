//! The benchmark upstream: HTTP/1.1 keep-alive and h2c (prior knowledge) on one port.
//!
//! | request | answer |
//! |---|---|
//! | `POST /bench.Echo/Unary` (gRPC) | the request's message echoed in one gRPC frame, trailer `grpc-status: 0` |
//! | `/size/N` | `N` bytes |
//! | anything else | 200 with a 16-byte body |
//!
//! Request bodies are read and dropped. Bodies are sliced from one shared buffer, so answering costs no
//! allocation beyond hyper's own.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::WithTrailers;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The gRPC method the upstream answers.
pub const GRPC_PATH: &str = "/bench.Echo/Unary";
/// The body of an ordinary answer.
pub const SMALL_BODY: &[u8] = b"hello from bench";
/// The largest `/size/N` answered from the shared buffer; larger sizes are allocated per request.
const SHARED_LEN: usize = 1 << 20;
/// `/size/N` above this is refused, so a typo cannot exhaust memory.
const MAX_SIZE: usize = 64 << 20;

type Trailers = Ready<Option<Result<HeaderMap, Infallible>>>;
/// The upstream's response body: bytes, then optional trailers.
pub type ResBody = WithTrailers<Full<Bytes>, Trailers>;

/// Shared, immutable answer material.
#[derive(Clone)]
pub struct Upstream {
    shared: Bytes,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    /// Builds the answer buffers.
    pub fn new() -> Self {
        Self {
            shared: Bytes::from(vec![b'x'; SHARED_LEN]),
        }
    }

    /// Accepts connections on `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                // EMFILE and friends: back off briefly rather than spin.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let builder = builder.clone();
            let this = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.answer(req).await) }
                });
                // Connection errors (a client that goes away mid-request) are not the upstream's business.
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<ResBody> {
        if req.uri().path() == GRPC_PATH {
            return self.grpc(req).await;
        }
        let size = req.uri().path().strip_prefix("/size/").map(str::parse::<usize>);
        if drain(req.into_body()).await.is_err() {
            return plain(StatusCode::BAD_REQUEST, Bytes::from_static(b"bad request body\n"));
        }
        match size {
            None => plain(StatusCode::OK, Bytes::from_static(SMALL_BODY)),
            Some(Ok(n)) if n <= SHARED_LEN => plain(StatusCode::OK, self.shared.slice(..n)),
            Some(Ok(n)) if n <= MAX_SIZE => plain(StatusCode::OK, Bytes::from(vec![b'x'; n])),
            Some(_) => plain(StatusCode::BAD_REQUEST, Bytes::from_static(b"bad /size/N\n")),
        }
    }

    /// A unary gRPC echo: the request must be exactly one uncompressed frame.
    async fn grpc(&self, req: Request<Incoming>) -> Response<ResBody> {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return grpc_status(13, "reading the request failed"),
        };
        match grpc_message(&body) {
            Some(msg) => {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let mut res =
                    Response::new(Full::new(grpc_frame(msg)).with_trailers(ready(Some(Ok(trailers)))));
                res.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                res
            }
            None => grpc_status(3, "expected one uncompressed gRPC frame"),
        }
    }
}

/// The message inside a body holding exactly one uncompressed gRPC frame.
pub fn grpc_message(body: &[u8]) -> Option<&[u8]> {
    let (prefix, msg) = body.split_at_checked(5)?;
    let mut p = prefix;
    let compressed = p.get_u8();
    let len = p.get_u32() as usize;
    (compressed == 0 && msg.len() == len).then_some(msg)
}

/// Frames `msg` as one uncompressed gRPC message.
pub fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + msg.len());
    frame.extend_from_slice(&[0]);
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(msg);
    frame.freeze()
}

fn plain(status: StatusCode, body: Bytes) -> Response<ResBody> {
    let mut res = Response::new(Full::new(body).with_trailers(ready(None)));
    *res.status_mut() = status;
    res
}

/// A trailers-only gRPC error answer.
fn grpc_status(code: u8, message: &'static str) -> Response<ResBody> {
    let mut res = plain(StatusCode::OK, Bytes::new());
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    h.insert("grpc-message", HeaderValue::from_static(message));
    res
}

async fn drain(mut body: Incoming) -> Result<(), hyper::Error> {
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(())
}

/// Binds `addr` (use port 0 for any free port) as a std listener, ready to hand to one or more runtimes.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_frames() {
        let f = grpc_frame(b"hello");
        assert_eq!(&f[..5], &[0, 0, 0, 0, 5]);
        assert_eq!(grpc_message(&f), Some(&b"hello"[..]));
        assert_eq!(grpc_message(&f[..6]), None);
        assert_eq!(grpc_message(b"\x01\0\0\0\0"), None);
        assert_eq!(grpc_message(b""), None);
    }
}
