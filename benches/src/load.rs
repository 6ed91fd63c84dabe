//! The load generator: hyper's connection-level clients, one task per connection. The task polls the
//! connection's I/O and its slots itself, so a request involves no hand-off between tasks (hyper's h2 client
//! still runs its own connection task).
//!
//! **Closed loop** (`rate: None`): every slot (an HTTP/1.1 connection, or one of an h2 connection's `streams`)
//! sends its next request as soon as the previous one is answered. A request counts if it completes inside
//! the measured window; its latency is completion minus send.
//!
//! **Open loop** (`rate: Some(r)`): the `s` slots share the rate, slot `k` intending to send request `i` at
//! `start + k/r + i*s/r`. A request counts if its intended time falls inside the window, whenever it
//! completes (up to the deadline; later is a timeout error). Latency is corrected for coordinated omission:
//! when the slot was still busy with the previous request at the intended time, latency runs from the intended
//! time, so a stall is charged to every request it delayed. When the slot was idle, latency runs from the
//! actual send: the difference is the generator's own wake-up delay, not the server's. A pacing thread
//! (`pace`) wakes slots at their intended times to within microseconds; tokio's timer alone would release
//! them in 1 ms bursts.
//!
//! **TLS** (`tls`): every connection is TLS 1.3 offering only `TLS_AES_128_GCM_SHA256` and X25519, with
//! resumption disabled, so every proxy negotiates the same and every handshake is a full one. The client
//! checks neither the certificate nor the handshake signature (a benchmark over loopback: that would cost the
//! generator two ECDSA verifications per handshake and change nothing on the proxy's side).
//!
//! **A connection per request** (`new_conn`, HTTP/1.1 closed loop only): each slot connects (and handshakes),
//! sends one request, reads the answer, closes (TLS `close_notify`, then FIN) and starts over; latency runs
//! from the connect to the end of the response.
//!
//! Timeline: `start` (connections open, warm-up) → `measure_start` → `measure_end` (no new requests) →
//! `deadline` (in-flight requests abandoned). Every await is bounded by the deadline.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST, TE};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::LocalSet;
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::hist::Histogram;
use crate::upstream::{grpc_frame, GRPC_PATH};
use crate::Result;

/// The wire protocol towards the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 with keep-alive, one request in flight per connection.
    H1,
    /// HTTP/2 over cleartext with prior knowledge, `streams` requests in flight per connection.
    H2,
}

impl Proto {
    /// `h1` or `h2`.
    pub fn name(self) -> &'static str {
        match self {
            Proto::H1 => "h1",
            Proto::H2 => "h2",
        }
    }
}

/// What to send, how hard, and for how long.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Where to connect.
    pub target: SocketAddr,
    /// The Host header / :authority.
    pub authority: String,
    /// HTTP/1.1 or h2c.
    pub proto: Proto,
    /// Connections to open.
    pub connections: usize,
    /// Concurrent streams per h2 connection (must be 1 for HTTP/1.1).
    pub streams: usize,
    /// Time before the measured window (connections are opened and warmed).
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// Open loop at this many requests per second in total; `None` for closed loop.
    pub rate: Option<f64>,
    /// The request path (ignored for gRPC).
    pub path: String,
    /// Request body bytes: a POST when non-zero, the gRPC message size for gRPC.
    pub body: usize,
    /// Call the upstream's unary gRPC echo method (requires h2).
    pub grpc: bool,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Worker threads, each a current_thread runtime with its share of the connections.
    pub threads: usize,
    /// TLS 1.3 to the target (see the module's documentation).
    pub tls: bool,
    /// A new connection for every request (HTTP/1.1, closed loop).
    pub new_conn: bool,
}

impl LoadConfig {
    /// Checks the combination of options.
    pub fn validate(&self) -> Result<()> {
        if self.connections == 0 || self.streams == 0 || self.threads == 0 {
            return Err("connections, streams and threads must be at least 1".into());
        }
        if self.proto == Proto::H1 && self.streams != 1 {
            return Err("HTTP/1.1 has one request in flight per connection: use --streams 1".into());
        }
        if self.grpc && self.proto != Proto::H2 {
            return Err("gRPC needs --proto h2".into());
        }
        if matches!(self.rate, Some(r) if !(r.is_finite() && r > 0.0)) {
            return Err("--rate must be positive".into());
        }
        if self.new_conn && (self.proto != Proto::H1 || self.rate.is_some()) {
            return Err("--new-conn needs --proto h1 and a closed loop (no --rate)".into());
        }
        if self.duration.is_zero() {
            return Err("--duration must be positive".into());
        }
        Ok(())
    }

    fn slots(&self) -> usize {
        self.connections * self.streams
    }
}

/// The phases of a run, reported as they are entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The measured window begins.
    MeasureStart,
    /// The measured window ends.
    MeasureEnd,
}

/// Failed requests by cause.
#[derive(Clone, Copy, Debug, Default)]
pub struct Errors {
    /// Connecting or the protocol handshake failed.
    pub connect: u64,
    /// A non-2xx status, or a gRPC status other than 0.
    pub status: u64,
    /// The connection or stream failed mid-request.
    pub io: u64,
    /// No answer within the per-request timeout or before the deadline.
    pub timeout: u64,
}

impl Errors {
    /// All errors.
    pub fn total(&self) -> u64 {
        self.connect + self.status + self.io + self.timeout
    }

    fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.status += o.status;
        self.io += o.io;
        self.timeout += o.timeout;
    }
}

/// What a set of slots observed inside the measured window.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Latencies of successful requests, in nanoseconds.
    pub hist: Histogram,
    /// Failed requests.
    pub errors: Errors,
    /// Response body bytes received.
    pub bytes: u64,
}

impl Tally {
    fn merge(&mut self, o: &Tally) {
        self.hist.merge(&o.hist);
        self.errors.add(&o.errors);
        self.bytes += o.bytes;
    }
}

/// The result of a run.
#[derive(Debug)]
pub struct Report {
    /// The configuration that produced it.
    pub config: LoadConfig,
    /// Everything counted in the window.
    pub tally: Tally,
}

impl Report {
    /// Successful requests per second over the window.
    pub fn rps(&self) -> f64 {
        self.tally.hist.count() as f64 / self.config.duration.as_secs_f64()
    }

    /// The JSON summary; with `hist`, the latency histogram's buckets as `[[lowest_ns, count], ...]`.
    pub fn to_json(&self, hist: bool) -> Value {
        let c = &self.config;
        let h = &self.tally.hist;
        let us = |ns: u64| ns as f64 / 1000.0;
        let mut v = json!({
            "mode": if c.rate.is_some() { "open" } else { "closed" },
            "proto": c.proto.name(),
            "grpc": c.grpc,
            "path": if c.grpc { GRPC_PATH } else { c.path.as_str() },
            "connections": c.connections,
            "streams": c.streams,
            "target_rate": c.rate,
            "duration_s": c.duration.as_secs_f64(),
            "requests": h.count(),
            "errors": self.tally.errors.total(),
            "errors_connect": self.tally.errors.connect,
            "errors_status": self.tally.errors.status,
            "errors_io": self.tally.errors.io,
            "errors_timeout": self.tally.errors.timeout,
            "rps": self.rps(),
            "tls": c.tls.then(|| NEGOTIATED.get().cloned()),
            "new_conn": c.new_conn,
            "bytes": self.tally.bytes,
            "latency_us": {
                "min": us(h.min()),
                "mean": h.mean() / 1000.0,
                "p50": us(h.percentile(50.0)),
                "p90": us(h.percentile(90.0)),
                "p99": us(h.percentile(99.0)),
                "p99.9": us(h.percentile(99.9)),
                "max": us(h.max()),
            },
        });
        if hist {
            v["hist_min_ns"] = json!(h.min());
            v["hist_max_ns"] = json!(h.max());
            v["hist"] = Value::Array(h.buckets().map(|(lo, n)| json!([lo, n])).collect());
        }
        v
    }
}

#[derive(Clone, Copy, Debug)]
struct Schedule {
    start: Instant,
    measure_start: Instant,
    measure_end: Instant,
    deadline: Instant,
}

/// Time allowed after the window for in-flight requests to finish.
const GRACE: Duration = Duration::from_secs(2);

/// Runs the load described by `cfg`, calling `on_phase` from the calling thread as the window opens and
/// closes. Returns once every slot has stopped, at most [`GRACE`] after the window.
pub fn run(cfg: &LoadConfig, mut on_phase: impl FnMut(Phase)) -> Result<Report> {
    cfg.validate()?;
    let start = Instant::now();
    let measure_start = start + cfg.warmup;
    let measure_end = measure_start + cfg.duration;
    let sched = Schedule {
        start,
        measure_start,
        measure_end,
        deadline: measure_end + GRACE,
    };
    let tmpl = Template::new(cfg)?;
    let wakes: Arc<Vec<Arc<Notify>>> = Arc::new(match cfg.rate {
        Some(_) => (0..cfg.slots()).map(|_| Arc::new(Notify::new())).collect(),
        None => Vec::new(),
    });
    let pacing = match cfg.rate {
        Some(rate) => {
            let wakes = wakes.clone();
            Some(
                std::thread::Builder::new()
                    .name("pacer".into())
                    .spawn(move || pace(&wakes, sched, rate))?,
            )
        }
        None => None,
    };

    let mut shards = Vec::new();
    for shard in 0..cfg.threads {
        let cfg = cfg.clone();
        let tmpl = tmpl.clone();
        let wakes = wakes.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        shards.push(
            std::thread::Builder::new()
                .name(format!("load-{shard}"))
                .spawn(move || LocalSet::new().block_on(&rt, run_shard(cfg, tmpl, sched, shard, wakes)))?,
        );
    }
    std::thread::sleep(measure_start.saturating_duration_since(Instant::now()));
    on_phase(Phase::MeasureStart);
    std::thread::sleep(measure_end.saturating_duration_since(Instant::now()));
    on_phase(Phase::MeasureEnd);

    let mut tally = Tally::default();
    for s in shards {
        let t = s.join().map_err(|_| "a load thread panicked")?;
        tally.merge(&t);
    }
    if let Some(p) = pacing {
        p.join().map_err(|_| "the pacing thread panicked")?;
    }
    Ok(Report {
        config: cfg.clone(),
        tally,
    })
}

/// The open loop's clock: request `n` is due at `start + n/rate` on slot `n % slots`. A thread sleeping with
/// a 1 µs timer slack wakes each slot on time, where tokio's timer wheel would release them in 1 ms bursts
/// (at 20k req/s, bursts of 20 that queue behind each other and inflate every latency).
fn pace(wakes: &[Arc<Notify>], sched: Schedule, rate: f64) {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes the calling thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
    if wakes.is_empty() {
        return;
    }
    for n in 0u64.. {
        let due = sched.start + Duration::from_secs_f64(n as f64 / rate);
        if due >= sched.measure_end {
            break;
        }
        let wait = due.saturating_duration_since(Instant::now());
        // Sleeping costs a context switch: release requests due within a few microseconds together.
        if wait > Duration::from_micros(5) {
            std::thread::sleep(wait);
        }
        wakes[(n % wakes.len() as u64) as usize].notify_one();
    }
}

async fn run_shard(
    cfg: LoadConfig,
    tmpl: Template,
    sched: Schedule,
    shard: usize,
    wakes: Arc<Vec<Arc<Notify>>>,
) -> Tally {
    let slots = cfg.slots();
    let mut tasks = Vec::new();
    for conn in (shard..cfg.connections).step_by(cfg.threads) {
        let pacers: Vec<Option<Pacer>> = (0..cfg.streams)
            .map(|stream| {
                cfg.rate.map(|rate| {
                    let k = conn * cfg.streams + stream;
                    Pacer {
                        next: sched.start + Duration::from_secs_f64(k as f64 / rate),
                        interval: Duration::from_secs_f64(slots as f64 / rate),
                        wake: wakes[k].clone(),
                    }
                })
            })
            .collect();
        let cfg = cfg.clone();
        let tmpl = tmpl.clone();
        tasks.push(tokio::task::spawn_local(connection(cfg, tmpl, sched, pacers)));
    }
    let mut tally = Tally::default();
    for t in tasks {
        // A panicking connection task loses its counts; the others still report.
        if let Ok(t) = t.await {
            tally.merge(&t);
        }
    }
    tally
}

/// Sends one request as `cfg` describes and checks the answer: a readiness probe. Errors say what failed.
pub async fn probe(cfg: &LoadConfig) -> Result<()> {
    let tmpl = Template::new(cfg)?;
    let deadline = Instant::now() + cfg.timeout;
    let mut sender = match connect(cfg, &tmpl, deadline)
        .await
        .ok_or("cannot connect (or handshake)")?
    {
        Conn::H1(s, c) => {
            tokio::spawn(c);
            Sender::H1(s)
        }
        Conn::H2(s, c) => {
            tokio::spawn(c);
            Sender::H2(s)
        }
    };
    match timeout_at(deadline, exchange(&mut sender, &tmpl)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(Failure::Status(s))) => Err(s.into()),
        Ok(Err(Failure::Io(e))) => Err(format!("request failed: {e}").into()),
        Err(_) => Err("no answer in time".into()),
    }
}

/// The request every slot sends, built once.
#[derive(Clone, Debug)]
struct Template {
    method: Method,
    uri: Uri,
    /// The Host header (HTTP/1.1 only).
    host: Option<HeaderValue>,
    body: Bytes,
    grpc: bool,
    /// The TLS client, when the target speaks TLS.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Template {
    fn new(cfg: &LoadConfig) -> Result<Self> {
        let path = if cfg.grpc { GRPC_PATH } else { cfg.path.as_str() };
        // h2 needs :scheme and :authority, so its URI is absolute; HTTP/1.1 sends origin-form plus Host.
        let uri: Uri = match cfg.proto {
            Proto::H1 => path.parse()?,
            Proto::H2 => format!("http://{}{}", cfg.authority, path).parse()?,
        };
        let body = if cfg.grpc {
            grpc_frame(&vec![b'g'; cfg.body])
        } else {
            Bytes::from(vec![b'b'; cfg.body])
        };
        let method = if cfg.grpc || cfg.body > 0 {
            Method::POST
        } else {
            Method::GET
        };
        Ok(Self {
            method,
            uri,
            host: match cfg.proto {
                Proto::H1 => Some(HeaderValue::from_str(&cfg.authority)?),
                Proto::H2 => None,
            },
            body,
            grpc: cfg.grpc,
            tls: if cfg.tls {
                Some(Arc::new(tls_client()?))
            } else {
                None
            },
        })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        // h2 carries the authority in :authority; a Host header as well makes nginx answer 400.
        if let Some(host) = &self.host {
            h.insert(HOST, host.clone());
        }
        if self.grpc {
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert(TE, HeaderValue::from_static("trailers"));
        }
        req
    }
}

/// An open-loop slot's schedule.
#[derive(Clone, Debug)]
struct Pacer {
    next: Instant,
    interval: Duration,
    /// Notified by the pacing thread at this slot's intended send times.
    wake: Arc<Notify>,
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<http::Response<Incoming>> {
        match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

type Io = TokioIo<Stream>;

/// A connection's byte stream: plain TCP or TLS over it.
pub enum Stream {
    /// Cleartext.
    Plain(TcpStream),
    /// TLS (boxed: a rustls connection is large).
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What the first TLS connection negotiated (`TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519`), for the report.
static NEGOTIATED: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The TLS client: TLS 1.3 only, one cipher suite and one key-exchange group (so every server negotiates
/// the same), no resumption (so every handshake is full), and no verification of the server (see the module
/// documentation).
fn tls_client() -> Result<rustls::ClientConfig> {
    use rustls::crypto::ring;
    let mut provider = ring::default_provider();
    provider.cipher_suites = vec![ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    provider.kx_groups = vec![ring::kx_group::X25519];
    let provider = Arc::new(provider);
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    c.resumption = rustls::client::Resumption::disabled();
    Ok(c)
}

/// Accepts any server certificate and handshake signature: the load generator measures the server's cost.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A fresh connection: the handle to send on and the future that drives the connection's I/O.
enum Conn {
    H1(
        http1::SendRequest<Full<Bytes>>,
        Pin<Box<http1::Connection<Io, Full<Bytes>>>>,
    ),
    H2(
        http2::SendRequest<Full<Bytes>>,
        Pin<Box<http2::Connection<Io, Full<Bytes>, TokioExecutor>>>,
    ),
}

async fn connect(cfg: &LoadConfig, tmpl: &Template, deadline: Instant) -> Option<Conn> {
    let limit = deadline.min(Instant::now() + cfg.timeout);
    let stream = timeout_at(limit, TcpStream::connect(cfg.target))
        .await
        .ok()?
        .ok()?;
    stream.set_nodelay(true).ok()?;
    let stream = match &tmpl.tls {
        None => Stream::Plain(stream),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
            let connector = TlsConnector::from(tls.clone());
            let s = timeout_at(limit, connector.connect(name, stream))
                .await
                .ok()?
                .ok()?;
            if NEGOTIATED.get().is_none() {
                let c = s.get_ref().1;
                let or_none = |v: Option<String>| v.unwrap_or_else(|| "none".to_owned());
                let _ = NEGOTIATED.set(format!(
                    "{} {} {}",
                    or_none(c.protocol_version().map(|v| format!("{v:?}"))),
                    or_none(c.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite()))),
                    or_none(
                        c.negotiated_key_exchange_group()
                            .map(|g| format!("{:?}", g.name()))
                    ),
                ));
            }
            Stream::Tls(Box::new(s))
        }
    };
    let io = TokioIo::new(stream);
    match cfg.proto {
        Proto::H1 => {
            let (sender, conn) = timeout_at(limit, http1::handshake(io)).await.ok()?.ok()?;
            Some(Conn::H1(sender, Box::pin(conn)))
        }
        Proto::H2 => {
            let mut b = http2::Builder::new(TokioExecutor::new());
            b.initial_stream_window_size(1 << 20)
                .initial_connection_window_size(16 << 20);
            let (sender, conn) = timeout_at(limit, b.handshake(io)).await.ok()?.ok()?;
            Some(Conn::H2(sender, Box::pin(conn)))
        }
    }
}

/// Polls a connection's I/O future and its slots in this one task (no hand-off between tasks per request)
/// until every slot has returned; then drops the connection.
async fn drive<C: Future + Unpin, F: Future<Output = ()>>(conn: C, slots: Vec<F>) {
    let mut conn = Some(conn);
    let mut slots: Vec<Option<Pin<Box<F>>>> = slots.into_iter().map(|f| Some(Box::pin(f))).collect();
    poll_fn(|cx| {
        if let Some(c) = conn.as_mut() {
            if Pin::new(c).poll(cx).is_ready() {
                // Dropping the finished connection fails whatever its slots still wait on.
                conn = None;
            }
        }
        let mut pending = false;
        for s in slots.iter_mut() {
            if let Some(f) = s.as_mut() {
                if f.as_mut().poll(cx).is_ready() {
                    *s = None;
                } else {
                    pending = true;
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await
}

/// One slot's progress, kept across reconnections.
struct SlotState {
    pacer: Option<Pacer>,
    prev_done: Instant,
}

/// One connection: (re)connects until the window closes and drives its slots.
async fn connection(cfg: LoadConfig, tmpl: Template, sched: Schedule, pacers: Vec<Option<Pacer>>) -> Tally {
    let tally = RefCell::new(Tally::default());
    let mut slots: Vec<SlotState> = pacers
        .into_iter()
        .map(|pacer| SlotState {
            pacer,
            prev_done: sched.start,
        })
        .collect();
    if cfg.new_conn {
        return per_request_connections(&cfg, &tmpl, sched, &tally).await;
    }
    while Instant::now() < sched.measure_end {
        match connect(&cfg, &tmpl, sched.measure_end).await {
            None => {
                let now = Instant::now();
                if now >= sched.measure_start && now < sched.measure_end {
                    tally.borrow_mut().errors.connect += 1;
                }
                sleep_until((now + Duration::from_millis(10)).min(sched.measure_end)).await;
            }
            Some(Conn::H1(sender, conn)) => {
                let mut senders = [Sender::H1(sender)];
                let futs = senders
                    .iter_mut()
                    .zip(slots.iter_mut())
                    .map(|(s, st)| slot(s, &cfg, &tmpl, sched, st, &tally))
                    .collect();
                drive(conn, futs).await;
            }
            Some(Conn::H2(sender, conn)) => {
                let mut senders: Vec<Sender> = slots.iter().map(|_| Sender::H2(sender.clone())).collect();
                drop(sender);
                let futs = senders
                    .iter_mut()
                    .zip(slots.iter_mut())
                    .map(|(s, st)| slot(s, &cfg, &tmpl, sched, st, &tally))
                    .collect();
                drive(conn, futs).await;
            }
        }
    }
    tally.into_inner()
}

/// The connection-per-request loop of one slot: connect, one request, close, until the window closes.
async fn per_request_connections(
    cfg: &LoadConfig,
    tmpl: &Template,
    sched: Schedule,
    tally: &RefCell<Tally>,
) -> Tally {
    loop {
        let base = Instant::now();
        if base >= sched.measure_end {
            break;
        }
        let limit = sched.deadline.min(base + cfg.timeout);
        let outcome = timeout_at(limit, one_request_connection(cfg, tmpl, limit)).await;
        let done = Instant::now();
        let counts = done >= sched.measure_start && done < sched.measure_end;
        let connect_failed = {
            let mut t = tally.borrow_mut();
            match outcome {
                Ok(Some(Ok(bytes))) => {
                    if counts {
                        t.hist
                            .record(done.saturating_duration_since(base).as_nanos() as u64);
                        t.bytes += bytes;
                    }
                }
                Ok(None) => t.errors.connect += u64::from(counts),
                Ok(Some(Err(Failure::Status(_)))) => t.errors.status += u64::from(counts),
                Ok(Some(Err(Failure::Io(_)))) => t.errors.io += u64::from(counts),
                Err(_) => t.errors.timeout += u64::from(counts),
            }
            matches!(outcome, Ok(None))
        };
        if connect_failed {
            // Not a hot loop against a closed port.
            sleep_until((Instant::now() + Duration::from_millis(10)).min(sched.measure_end)).await;
        }
    }
    tally.take()
}

/// Connects, sends one request, reads the answer and closes the connection (hyper shuts the stream down,
/// which for TLS sends `close_notify`, once the sender is dropped). `None` if connecting failed.
async fn one_request_connection(
    cfg: &LoadConfig,
    tmpl: &Template,
    limit: Instant,
) -> Option<std::result::Result<u64, Failure>> {
    let Conn::H1(sender, conn) = connect(cfg, tmpl, limit).await? else {
        return None;
    };
    let exchange_once = async move {
        let mut s = Sender::H1(sender);
        exchange(&mut s, tmpl).await
        // `s` is dropped here: the connection closes once idle.
    };
    let (outcome, _) = tokio::join!(exchange_once, conn);
    Some(outcome)
}

/// Sends requests on `sender` until the window closes (returns) or the connection fails (returns early).
async fn slot(
    sender: &mut Sender,
    cfg: &LoadConfig,
    tmpl: &Template,
    sched: Schedule,
    st: &mut SlotState,
    tally: &RefCell<Tally>,
) {
    loop {
        // When the request is charged from, and whether it counts.
        let (base, counts_by_intent) = match st.pacer.as_mut() {
            Some(p) => {
                if p.next >= sched.measure_end {
                    return;
                }
                let busy = st.prev_done > p.next;
                while Instant::now() < p.next {
                    // The pacing thread wakes the slot on time; tokio's own timer (1 ms ticks) is the fallback.
                    tokio::select! {
                        _ = p.wake.notified() => {}
                        _ = sleep_until(p.next + Duration::from_millis(2)) => {}
                    }
                }
                let intended = p.next;
                p.next += p.interval;
                let sent = Instant::now();
                let in_window = intended >= sched.measure_start;
                (if busy { intended } else { sent }, Some(in_window))
            }
            None => {
                let now = Instant::now();
                if now >= sched.measure_end {
                    return;
                }
                (now, None)
            }
        };
        let limit = sched.deadline.min(Instant::now() + cfg.timeout);
        let outcome = timeout_at(limit, exchange(sender, tmpl)).await;
        let done = Instant::now();
        st.prev_done = done;
        let counts = counts_by_intent.unwrap_or(done >= sched.measure_start && done < sched.measure_end);
        let keep_going = {
            let mut t = tally.borrow_mut();
            match outcome {
                Ok(Ok(bytes)) => {
                    if counts {
                        t.hist
                            .record(done.saturating_duration_since(base).as_nanos() as u64);
                        t.bytes += bytes;
                    }
                    true
                }
                Ok(Err(Failure::Status(_))) => {
                    t.errors.status += u64::from(counts);
                    true
                }
                Ok(Err(Failure::Io(_))) => {
                    t.errors.io += u64::from(counts);
                    false
                }
                Err(_) => {
                    t.errors.timeout += u64::from(counts);
                    false
                }
            }
        };
        // HTTP/1.1 cannot reuse a connection after a failed exchange; h2 can unless the connection is gone.
        let usable = match sender {
            Sender::H1(_) => keep_going,
            Sender::H2(_) => !sender.is_closed(),
        };
        if !usable {
            return;
        }
    }
}

enum Failure {
    /// The status line, or the gRPC status, said no.
    Status(String),
    /// The exchange failed on the wire.
    Io(hyper::Error),
}

/// One request and its whole response; the response body's length on success.
async fn exchange(sender: &mut Sender, tmpl: &Template) -> std::result::Result<u64, Failure> {
    let res = sender.send(tmpl.request()).await.map_err(Failure::Io)?;
    let status = res.status();
    let mut grpc_status = res.headers().get("grpc-status").cloned();
    let mut body = res.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Failure::Io)?;
        if let Some(d) = frame.data_ref() {
            bytes += d.len() as u64;
        } else if let Some(t) = frame.trailers_ref() {
            if let Some(g) = t.get("grpc-status") {
                grpc_status = Some(g.clone());
            }
        }
    }
    if !status.is_success() {
        return Err(Failure::Status(format!("HTTP status {status}")));
    }
    if tmpl.grpc && grpc_status.as_ref().is_none_or(|g| g != "0") {
        return Err(Failure::Status(format!("grpc-status {grpc_status:?}")));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{bind, Upstream};

    fn upstream() -> SocketAddr {
        let l = bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = l.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        std::thread::spawn(move || {
            rt.block_on(async move {
                Upstream::new()
                    .serve(tokio::net::TcpListener::from_std(l).unwrap())
                    .await
            })
        });
        addr
    }

    fn config(target: SocketAddr, proto: Proto) -> LoadConfig {
        LoadConfig {
            target,
            authority: target.to_string(),
            proto,
            connections: 4,
            streams: if proto == Proto::H2 { 3 } else { 1 },
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(300),
            rate: None,
            path: "/".into(),
            body: 0,
            grpc: false,
            timeout: Duration::from_secs(2),
            threads: 1,
            tls: false,
            new_conn: false,
        }
    }

    #[test]
    fn every_mode_against_the_upstream() {
        let target = upstream();
        let mut grpc = config(target, Proto::H2);
        grpc.grpc = true;
        grpc.body = 64;
        let mut big = config(target, Proto::H1);
        big.path = "/size/65536".into();
        let mut open = config(target, Proto::H1);
        open.rate = Some(2000.0);
        let mut open_h2 = config(target, Proto::H2);
        open_h2.rate = Some(2000.0);
        open_h2.threads = 2;
        let mut post = config(target, Proto::H1);
        post.body = 1000;
        for cfg in [
            config(target, Proto::H1),
            config(target, Proto::H2),
            grpc,
            big.clone(),
            open,
            open_h2,
            post,
        ] {
            let mut phases = Vec::new();
            let r = run(&cfg, |p| phases.push(p)).unwrap();
            assert_eq!(phases, [Phase::MeasureStart, Phase::MeasureEnd]);
            assert_eq!(r.tally.errors.total(), 0, "{cfg:?}: {:?}", r.tally.errors);
            assert!(r.tally.hist.count() > 10, "{cfg:?}");
            if let Some(rate) = cfg.rate {
                // Every intended send in the window is counted: rate x window, give or take the edges.
                let expected = rate * cfg.duration.as_secs_f64();
                assert!(
                    (r.rps() * cfg.duration.as_secs_f64() - expected).abs() < expected * 0.05,
                    "{}",
                    r.rps()
                );
            }
            let j = r.to_json(cfg.rate.is_some());
            assert_eq!(j["requests"], r.tally.hist.count());
            assert_eq!(j.get("hist").is_some(), cfg.rate.is_some());
        }
        let r = run(&big, |_| {}).unwrap();
        assert_eq!(r.tally.bytes, 65_536 * r.tally.hist.count());
    }

    #[tokio::test]
    async fn probe_reports_what_failed() {
        let target = upstream();
        probe(&config(target, Proto::H1)).await.unwrap();
        let mut grpc = config(target, Proto::H2);
        grpc.grpc = true;
        probe(&grpc).await.unwrap();
        let mut bad = config(target, Proto::H1);
        bad.path = "/size/nope".into();
        assert!(probe(&bad).await.unwrap_err().to_string().contains("400"));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(probe(&config(closed, Proto::H1)).await.is_err());
    }

    /// A TLS-terminating origin (rcgen's ECDSA P-256 certificate, rustls server, hyper HTTP/1.1) that counts
    /// handshakes and records what each negotiated.
    fn tls_upstream() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        use hyper::service::service_fn;
        let dir = std::env::temp_dir().join(format!("remora-bench-load-tls-{}", std::process::id()));
        let files = crate::tls::TlsFiles::generate(&dir).unwrap();
        let pem = |p: &std::path::Path| std::fs::read(p).unwrap();
        use rustls::pki_types::pem::PemObject;
        let cert = rustls::pki_types::CertificateDer::from_pem_slice(&pem(&files.cert)).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem(&files.key)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let server =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert], key)
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let log = seen.clone();
        std::thread::spawn(move || {
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                loop {
                    let (tcp, _) = l.accept().await.unwrap();
                    let (acceptor, log) = (acceptor.clone(), log.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let c = tls.get_ref().1;
                        log.lock().unwrap().push(format!(
                            "{:?} {:?} {:?} resumed={}",
                            c.protocol_version(),
                            c.negotiated_cipher_suite().map(|s| s.suite()),
                            c.negotiated_key_exchange_group().map(|g| g.name()),
                            c.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
                        ));
                        let svc = service_fn(|_req| async {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    });
                }
            })
        });
        (addr, seen)
    }

    #[test]
    fn tls_keep_alive_and_a_handshake_per_request() {
        let (target, seen) = tls_upstream();
        let mut keep = config(target, Proto::H1);
        keep.tls = true;
        let r = run(&keep, |_| {}).unwrap();
        assert_eq!(r.tally.errors.total(), 0, "{:?}", r.tally.errors);
        assert!(r.tally.hist.count() > 10);
        // Kept alive: one handshake per connection.
        assert_eq!(seen.lock().unwrap().len(), keep.connections);
        let j = r.to_json(false);
        assert_eq!(j["tls"], "TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519");

        seen.lock().unwrap().clear();
        let mut fresh = keep.clone();
        fresh.new_conn = true;
        let r = run(&fresh, |_| {}).unwrap();
        assert_eq!(r.tally.errors.total(), 0, "{:?}", r.tally.errors);
        let n = r.tally.hist.count() as usize;
        assert!(n > 10);
        let seen = seen.lock().unwrap();
        // Every request had its own full handshake (warm-up ones too, so at least as many), all alike.
        assert!(seen.len() >= n, "{} handshakes for {n} requests", seen.len());
        assert!(seen
            .iter()
            .all(|s| s == "Some(TLSv1_3) Some(TLS13_AES_128_GCM_SHA256) Some(X25519) resumed=false"));
    }

    #[test]
    fn rejects_bad_combinations() {
        let t = SocketAddr::from(([127, 0, 0, 1], 1));
        let mut c = config(t, Proto::H1);
        c.streams = 2;
        assert!(c.validate().is_err());
        let mut c = config(t, Proto::H1);
        c.grpc = true;
        assert!(c.validate().is_err());
        let mut c = config(t, Proto::H1);
        c.rate = Some(0.0);
        assert!(c.validate().is_err());
        let mut c = config(t, Proto::H2);
        c.new_conn = true;
        assert!(c.validate().is_err());
        let mut c = config(t, Proto::H1);
        c.new_conn = true;
        c.rate = Some(10.0);
        assert!(c.validate().is_err());
    }
}
