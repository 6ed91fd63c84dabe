//! Listeners: accepting connections on each worker and serving HTTP/1.1 and h2c on them.
//!
//! Every worker accepts on its own duplicate of each listening socket (the kernel wakes one), serves each
//! connection with hyper on its own thread, and watches the server's drain signal: on drain, HTTP/1.1
//! connections finish their request with `connection: close` and HTTP/2 connections get a GOAWAY.

pub mod chain;
pub mod config;
pub mod hcm;
pub mod path;
pub mod tcp_proxy;
pub mod upgrade;

use crate::runtime::{LocalExec, Worker};
use crate::server::Shared;
use config::{Codec, HcmConfig, ListenerConfig, ListenerStats, NetworkFilter};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

static NEXT_CONNECTION_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One downstream connection's context, shared by its requests.
pub struct Conn {
    /// `%CONNECTION_ID%`: unique for the process's lifetime.
    pub id: u64,
    pub listener: Arc<ListenerConfig>,
    pub hcm: Arc<HcmConfig>,
    pub shared: Arc<Shared>,
    pub worker: Rc<Worker>,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// The original destination restored by `envoy.filters.listener.original_dst` (then also `local`).
    pub original_dst: Option<SocketAddr>,
    /// Whether the connection is TLS (then `x-forwarded-proto` is `https`).
    pub tls: bool,
    /// The SNI the client sent (`%REQUESTED_SERVER_NAME%`).
    pub sni: Option<String>,
    draining: Cell<bool>,
    /// 0 until the first request, then 1 (HTTP/1.x) or 2 (HTTP/2): which `downstream_cx_http*` counts it.
    protocol: Cell<u8>,
    /// The HTTP filters over the router, built on the connection's first request when there are filters.
    chain: std::cell::RefCell<Option<FilterChain>>,
}

/// The HTTP filter stack of one connection: tower layers over [`hcm::RouterService`].
type FilterChain = tower::util::UnsyncBoxService<
    http::Request<hyper::body::Incoming>,
    http::Response<crate::body::Body>,
    std::convert::Infallible,
>;

impl Conn {
    pub fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Send a request through the connection's HTTP filters to the router.
    pub fn call_filters(
        self: &Rc<Self>,
        req: http::Request<hyper::body::Incoming>,
    ) -> impl std::future::Future<Output = http::Response<crate::body::Body>> + use<> {
        use tower::Service;
        let mut slot = self.chain.borrow_mut();
        let chain = slot.get_or_insert_with(|| self.build_chain());
        // Every filter's readiness is its inner service's, and the router is always ready, so poll_ready is
        // Ready at once; a filter that is not decides in `call` (tower's contract allows no panic here).
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let _ = chain.poll_ready(&mut cx);
        let fut = chain.call(req);
        async move {
            match fut.await {
                Ok(r) => r,
                Err(never) => match never {},
            }
        }
    }

    fn build_chain(self: &Rc<Self>) -> FilterChain {
        use crate::filters::{adaptive_concurrency, admission_control, health_check, local_ratelimit};
        use config::HttpFilter;
        use tower::Layer;
        let rng = self.worker.rng.clone();
        let mut svc = FilterChain::new(hcm::RouterService { conn: self.clone() });
        for f in self.hcm.filters.iter().rev() {
            svc = match f {
                HttpFilter::AdaptiveConcurrency(c) => FilterChain::new(
                    adaptive_concurrency::AdaptiveConcurrencyLayer::new(c.clone()).layer(svc),
                ),
                HttpFilter::AdmissionControl(c) => FilterChain::new(
                    admission_control::AdmissionControlLayer::new(c.clone(), rng.clone()).layer(svc),
                ),
                HttpFilter::HealthCheck(c) => FilterChain::new(
                    health_check::HealthCheckLayer::new(c.clone(), self.shared.clone()).layer(svc),
                ),
                HttpFilter::LocalRateLimit(l) => FilterChain::new(
                    local_ratelimit::LocalRateLimitLayer::new(l.clone(), rng.clone()).layer(svc),
                ),
            };
        }
        svc
    }

    /// Count the connection's protocol once its first request shows it.
    pub fn saw_request(&self, h2: bool) {
        if self.protocol.get() != 0 {
            return;
        }
        let s = &self.hcm.stats;
        if h2 {
            self.protocol.set(2);
            s.downstream_cx_http2_total.inc();
            s.downstream_cx_http2_active.inc();
        } else {
            self.protocol.set(1);
            s.downstream_cx_http1_total.inc();
            s.downstream_cx_http1_active.inc();
        }
    }
}

/// How a listener's connections are being drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    Serving,
    /// LDS removed or replaced the listener: requests are discouraged for `--drain-time-s` (Envoy's drain
    /// manager): an HTTP/1.1 connection closes after its next response, which carries `connection: close`
    /// (closing an idle keep-alive connection at once would race a request the client is already sending);
    /// an HTTP/2 connection gets a GOAWAY now. What is still open at the drain time is closed.
    Discourage,
    /// The server drains: idle connections close now, busy ones after their response.
    Close,
}

/// A bound listener with its stats, ready to be served by workers.
#[derive(Debug)]
pub struct Bound {
    pub config: Arc<ListenerConfig>,
    /// `None` for a listener with `bind_to_port: false`, which only takes connections handed off to it.
    pub socket: Option<std::net::TcpListener>,
    pub stats: Arc<ListenerStats>,
    /// Raised to stop accepting and drain this listener's connections (server drain, or the listener was
    /// removed or replaced). Every accept loop and connection of the listener holds a receiver, so
    /// [`Bound::drained`] resolves when the last of them has closed.
    pub stop: Arc<watch::Sender<Drain>>,
}

impl Bound {
    pub fn new(
        config: Arc<ListenerConfig>,
        socket: Option<std::net::TcpListener>,
        stats: Arc<ListenerStats>,
    ) -> Arc<Self> {
        Arc::new(Bound {
            config,
            socket,
            stats,
            stop: Arc::new(watch::channel(Drain::Serving).0),
        })
    }

    /// Stop accepting and close the connections as they go idle (the server drains).
    pub fn drain(&self) {
        self.stop.send_replace(Drain::Close);
    }

    /// Stop accepting and discourage requests on the open connections (see [`Drain::Discourage`]).
    pub fn drain_gently(&self) {
        self.stop.send_if_modified(|d| {
            let serving = *d == Drain::Serving;
            if serving {
                *d = Drain::Discourage;
            }
            serving
        });
    }

    /// Resolves once the listener has stopped accepting and its last connection has closed (after
    /// [`Bound::drain`]). It does not keep the listening socket open.
    pub fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static + use<> {
        let stop = self.stop.clone();
        async move { stop.closed().await }
    }
}

/// Bind a listener's socket, unless it has `bind_to_port: false`.
pub fn bind_config(config: &ListenerConfig) -> std::io::Result<Option<std::net::TcpListener>> {
    if config.bind_to_port {
        bind(config.address).map(Some)
    } else {
        Ok(None)
    }
}

/// Bind a listener's socket (non-blocking, `SO_REUSEADDR`), so that a bind failure is reported before serving.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// Accept on the listener until it is stopped, serving each connection on this worker.
pub async fn accept_loop(bound: Arc<Bound>, shared: Arc<Shared>, worker: Rc<Worker>) {
    let Some(socket) = &bound.socket else { return };
    let socket = match socket.try_clone().and_then(TcpListener::from_std) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(listener = %bound.config.name, error = %e, "cannot accept on listener");
            return;
        }
    };
    let mut stop = bound.stop.subscribe();
    let mut budget = AcceptBudget::new(bound.config.max_accepts_per_event);
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|d| *d != Drain::Serving) => break,
            res = socket.accept() => match res {
                Ok((stream, remote)) => {
                    let Ok(slot) = GlobalSlot::take(&bound, &shared) else {
                        // Over the global downstream connection limit: closed at once, as Envoy does.
                        bound.stats.downstream_global_cx_overflow.inc();
                        drop(stream);
                        continue;
                    };
                    accepted(&bound, &shared, &worker, stream, remote, slot);
                    if budget.spend() {
                        // Let the worker's connections run before accepting more.
                        tokio::task::yield_now().await;
                    }
                }
                Err(e) => {
                    tracing::warn!(listener = %bound.config.name, error = %e, "accept failed");
                    // Out of descriptors and the like: back off briefly rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// A place among the downstream connections that `overload_manager`'s global limit counts, held for the
/// connection's life (given back when its stream is dropped).
pub struct GlobalSlot(Arc<std::sync::atomic::AtomicU64>);

impl GlobalSlot {
    /// A slot for a connection accepted on `bound`: `Ok(None)` when no limit applies to it, `Err` when the
    /// limit is reached.
    fn take(bound: &Bound, shared: &Shared) -> Result<Option<GlobalSlot>, ()> {
        use std::sync::atomic::Ordering::{AcqRel, Relaxed};
        let Some(max) = shared.bootstrap.global_max_connections else {
            return Ok(None);
        };
        if bound.config.ignore_global_conn_limit {
            return Ok(None);
        }
        let count = &shared.global_connections;
        let mut current = count.load(Relaxed);
        loop {
            if current >= max {
                return Err(());
            }
            match count.compare_exchange_weak(current, current + 1, AcqRel, Relaxed) {
                Ok(_) => return Ok(Some(GlobalSlot(count.clone()))),
                Err(now) => current = now,
            }
        }
    }
}

impl Drop for GlobalSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A downstream stream that holds its [`GlobalSlot`] until it is dropped.
struct Slotted<S> {
    stream: S,
    _slot: Option<GlobalSlot>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Slotted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Slotted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// `max_connections_to_accept_per_socket_event`: the accept loop yields to the worker's other tasks after this
/// many connections in a row (Envoy accepts at most that many per socket event, the rest on later loop
/// iterations). Without a limit the loop accepts whatever is pending (tokio's cooperative budget still makes
/// it yield now and then).
struct AcceptBudget {
    limit: Option<std::num::NonZeroU32>,
    used: u32,
}

impl AcceptBudget {
    fn new(limit: Option<std::num::NonZeroU32>) -> Self {
        AcceptBudget { limit, used: 0 }
    }

    /// Count an accepted connection; true when the loop must yield now (the count starts again).
    fn spend(&mut self) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        self.used += 1;
        if self.used >= limit.get() {
            self.used = 0;
            true
        } else {
            false
        }
    }
}

/// Run a new connection through the listener's listener filters, hand it off to the listener of its original
/// destination (`use_original_dst`), choose its filter chain, and serve it.
fn accepted(
    bound: &Arc<Bound>,
    shared: &Arc<Shared>,
    worker: &Rc<Worker>,
    stream: TcpStream,
    remote: SocketAddr,
    slot: Option<GlobalSlot>,
) {
    let original_dst = if bound.config.original_dst {
        original_destination(&stream)
    } else {
        None
    };
    if let Some(dst) = original_dst.filter(|_| bound.config.use_original_dst) {
        if let Some(target) = shared.listener_for(dst).filter(|t| !Arc::ptr_eq(t, bound)) {
            tracing::trace!(from = %bound.config.name, to = %target.config.name, %dst, "handing off");
            // The socket's local address stays restored to the original destination, as in Envoy.
            accepted_on(&target, shared, worker, stream, remote, Some(dst), slot);
            return;
        }
    }
    accepted_on(bound, shared, worker, stream, remote, original_dst, slot);
}
/// Serve a connection on `bound`: its listener filters (`tls_inspector`), then the filter chain its addresses
/// and ClientHello select, then the chain's TLS handshake, then its network filter.
fn accepted_on(
    bound: &Arc<Bound>,
    shared: &Arc<Shared>,
    worker: &Rc<Worker>,
    stream: TcpStream,
    remote: SocketAddr,
    original_dst: Option<SocketAddr>,
    slot: Option<GlobalSlot>,
) {
    let local = original_dst.unwrap_or_else(|| stream.local_addr().unwrap_or(bound.config.address));
    let _ = stream.set_nodelay(true);
    let accepted = Accepted {
        bound: bound.clone(),
        shared: shared.clone(),
        worker: worker.clone(),
        remote,
        local,
        original_dst,
        slot,
    };
    if !bound.config.tls_inspector {
        accepted.dispatch(stream, None);
        return;
    }
    let timeout = bound.config.listener_filters_timeout;
    tokio::task::spawn_local(async move {
        let inspected = match timeout {
            Some(t) => tokio::time::timeout(t, crate::tls::inspector::inspect(&stream)).await,
            None => Ok(crate::tls::inspector::inspect(&stream).await),
        };
        match inspected {
            Ok(Ok(hello)) => accepted.dispatch(stream, Some(&hello)),
            Ok(Err(e)) => {
                tracing::debug!(remote = %accepted.remote, error = %e, "tls_inspector: connection failed")
            }
            Err(_) => {
                accepted.bound.stats.downstream_pre_cx_timeout.inc();
                tracing::debug!(remote = %accepted.remote, "listener filters timed out; closing");
            }
        }
    });
}

/// A connection between accepting it and serving it.
struct Accepted {
    bound: Arc<Bound>,
    shared: Arc<Shared>,
    worker: Rc<Worker>,
    remote: SocketAddr,
    local: SocketAddr,
    original_dst: Option<SocketAddr>,
    /// Its place under the global downstream connection limit, if one applies.
    slot: Option<GlobalSlot>,
}

impl Accepted {
    fn dispatch(self, stream: TcpStream, hello: Option<&crate::tls::inspector::Hello>) {
        let info = chain::ConnInfo {
            local: self.local,
            remote: self.remote,
            hello,
        };
        let Some(chain) = self.bound.config.chains.select(&info) else {
            self.bound.stats.no_filter_chain_match.inc();
            tracing::debug!(listener = %self.bound.config.name, remote = %self.remote, local = %self.local, "no filter chain matches; closing");
            return;
        };
        let sni = hello.and_then(|h| h.sni.clone());
        let filter = match &chain.filter {
            NetworkFilter::Http(h) => Filter::Http(h.clone()),
            NetworkFilter::Tcp(t) => Filter::Tcp(t.clone()),
        };
        let handshake_timeout = chain.handshake_timeout;
        match chain.tls.clone() {
            None => self.serve(stream, filter, Tls::default().with_sni(sni)),
            Some(tls) => {
                tokio::task::spawn_local(async move {
                    let res = match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                        Ok(r) => r,
                        Err(_) => {
                            self.bound
                                .stats
                                .downstream_cx_transport_socket_connect_timeout
                                .inc();
                            Err("transport socket connect timeout".into())
                        }
                    };
                    match res {
                        Ok(s) => {
                            let (_, conn) = s.get_ref();
                            let info = Tls {
                                secure: true,
                                sni: conn.server_name().map(str::to_string).or(sni),
                                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                            };
                            self.serve(s, filter, info);
                        }
                        Err(reason) => {
                            tracing::debug!(remote = %self.remote, %reason, "downstream TLS handshake failed");
                        }
                    }
                });
            }
        }
    }

    fn serve<S>(mut self, stream: S, filter: Filter, tls: Tls)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let stream = Slotted {
            stream,
            _slot: self.slot.take(),
        };
        let hcm = match filter {
            Filter::Http(h) => h,
            Filter::Tcp(t) => {
                tokio::task::spawn_local(tcp_proxy::serve(
                    t,
                    self.shared,
                    self.worker,
                    stream,
                    self.bound.stats.clone(),
                    self.original_dst,
                ));
                return;
            }
        };
        let conn = Rc::new(Conn {
            id: NEXT_CONNECTION_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            listener: self.bound.config.clone(),
            hcm,
            shared: self.shared,
            worker: self.worker,
            remote: self.remote,
            local: self.local,
            original_dst: self.original_dst,
            tls: tls.secure,
            sni: tls.sni,
            draining: Cell::new(false),
            protocol: Cell::new(0),
            chain: std::cell::RefCell::new(None),
        });
        tokio::task::spawn_local(serve_connection(
            conn,
            stream,
            tls.alpn,
            self.bound.stats.clone(),
            self.bound.stop.subscribe(),
        ));
    }
}

enum Filter {
    Http(Arc<HcmConfig>),
    Tcp(Arc<tcp_proxy::TcpProxyConfig>),
}

/// What the connection's TLS (if any) negotiated.
#[derive(Default)]
struct Tls {
    secure: bool,
    sni: Option<String>,
    alpn: Option<Vec<u8>>,
}

impl Tls {
    fn with_sni(mut self, sni: Option<String>) -> Self {
        self.sni = sni;
        self
    }
}

async fn serve_connection<S>(
    conn: Rc<Conn>,
    stream: S,
    alpn: Option<Vec<u8>>,
    lstats: Arc<ListenerStats>,
    mut drain: watch::Receiver<Drain>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let opened = Instant::now();
    let _guard = conn.worker.track_connection();
    let hcm = conn.hcm.clone();
    let hs = &hcm.stats;
    lstats.downstream_cx_total.inc();
    lstats.downstream_cx_active.inc();
    hs.downstream_cx_total.inc();
    hs.downstream_cx_active.inc();
    conn.shared.server_stats.total_connections.inc();

    // ALPN decides when TLS negotiated it; else the codec setting (AUTO sniffs the h2 preface).
    let forced = match (alpn.as_deref(), hcm.codec) {
        (Some(b"h2"), _) => Some(Codec::Http2),
        (Some(b"http/1.1"), _) => Some(Codec::Http1),
        (_, Codec::Http1) => Some(Codec::Http1),
        (_, Codec::Http2) => Some(Codec::Http2),
        (_, Codec::Auto) => None,
    };
    let mut builder = auto::Builder::new(LocalExec);
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size((hcm.max_request_headers_kb as usize * 1024).max(8192))
        .max_headers(hcm.max_headers_count as usize)
        .header_read_timeout(hcm.request_headers_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(hcm.max_request_headers_kb * 1024)
        .max_concurrent_streams(Some(hcm.http2.max_concurrent_streams))
        .initial_stream_window_size(hcm.http2.initial_stream_window_size)
        .initial_connection_window_size(hcm.http2.initial_connection_window_size);
    let svc_conn = conn.clone();
    let svc = service_fn(move |req| hcm::handle(svc_conn.clone(), req));
    let io = TokioIo::new(CountedStream {
        stream,
        rx: hs.downstream_cx_rx_bytes_total.clone(),
        tx: hs.downstream_cx_tx_bytes_total.clone(),
    });
    // Upgrades (CONNECT, WebSocket) are allowed per route as well as per connection manager, and routes come
    // and go with RDS: every HTTP/1.1 connection can upgrade; the router decides which requests do. (hyper-util's
    // upgradeable auto connection sniffs the protocol whatever it is told, so a connection whose protocol is
    // decided gets that protocol's own connection.)
    match forced {
        Some(Codec::Http1) => {
            let mut h1 = hyper::server::conn::http1::Builder::new();
            h1.timer(TokioTimer::new())
                .max_buf_size((hcm.max_request_headers_kb as usize * 1024).max(8192))
                .max_headers(hcm.max_headers_count as usize)
                .header_read_timeout(hcm.request_headers_timeout);
            let serve = h1.serve_connection(io, svc).with_upgrades();
            drive(&conn, serve, |s| s.graceful_shutdown(), &mut drain).await;
        }
        Some(_) => {
            let builder = builder.http2_only();
            let serve = builder.serve_connection(io, svc);
            drive(&conn, serve, |s| s.graceful_shutdown(), &mut drain).await;
        }
        None => {
            let serve = builder.serve_connection_with_upgrades(io, svc);
            drive(&conn, serve, |s| s.graceful_shutdown(), &mut drain).await;
        }
    }
    conn.shared.server_stats.total_connections.dec();
    match conn.protocol.get() {
        1 => hs.downstream_cx_http1_active.dec(),
        2 => hs.downstream_cx_http2_active.dec(),
        _ => {}
    }
    let ms = opened.elapsed().as_millis() as u64;
    lstats.downstream_cx_active.dec();
    lstats.downstream_cx_destroy.inc();
    lstats.downstream_cx_length_ms.record(ms);
    hs.downstream_cx_active.dec();
    hs.downstream_cx_destroy.inc();
    hs.downstream_cx_length_ms.record(ms);
}

/// The connection's destination before an iptables `REDIRECT` or `DNAT` (`SO_ORIGINAL_DST`, and
/// `IP6T_SO_ORIGINAL_DST` for IPv6), or `None` when netfilter did not rewrite it.
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let v6 = stream.local_addr().ok()?.is_ipv6();
    // SAFETY: `storage` is a zeroed sockaddr_storage, large enough for either answer, and `len` says so; the
    // kernel writes at most `len` bytes into it; `fd` is this stream's open socket.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let (level, name) = if v6 {
        (libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)
    } else {
        (libc::SOL_IP, libc::SO_ORIGINAL_DST)
    };
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (its family says so), which fits in sockaddr_storage.
            let a: libc::sockaddr_in =
                unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for a sockaddr_in6.
            let a: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(a.sin6_port))))
        }
        _ => None,
    }
}

/// Serve a connection until it ends, shutting it down gracefully when the listener drains.
async fn drive<F, E>(
    conn: &Conn,
    serve: F,
    shutdown: impl Fn(std::pin::Pin<&mut F>),
    drain: &mut watch::Receiver<Drain>,
) where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let hs = &conn.hcm.stats;
    let drain_time = std::time::Duration::from_secs(conn.shared.options.drain_time_s);
    tokio::pin!(serve);
    // A draining connection still open after `--drain-time-s` is closed (Envoy removes a drained listener,
    // closing what remains, when its drain time is over).
    let close_at = tokio::time::sleep(drain_time);
    tokio::pin!(close_at);
    let mut state = Drain::Serving;
    let mut shut = false;
    let mut apply = |now: Drain, serve: std::pin::Pin<&mut F>, state: &mut Drain| {
        if *state == Drain::Serving && now != Drain::Serving {
            conn.draining.set(true);
            hs.downstream_cx_drain_close.inc();
        }
        *state = now;
        let h2 = conn.protocol.get() == 2 || conn.hcm.codec == Codec::Http2;
        if !shut && (now == Drain::Close || (now == Drain::Discourage && h2)) {
            shut = true;
            shutdown(serve);
        }
    };
    let first = *drain.borrow_and_update();
    if first != Drain::Serving {
        apply(first, serve.as_mut(), &mut state);
    }
    loop {
        tokio::select! {
            res = serve.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(remote = %conn.remote, error = %e, "downstream connection ended with an error");
                }
                break;
            }
            changed = drain.changed(), if state != Drain::Close => {
                let now = if changed.is_err() { Drain::Close } else { *drain.borrow_and_update() };
                if state == Drain::Serving && now != Drain::Serving {
                    close_at.as_mut().reset(Instant::now() + drain_time);
                }
                apply(now, serve.as_mut(), &mut state);
            }
            () = close_at.as_mut(), if state != Drain::Serving => {
                tracing::debug!(remote = %conn.remote, "drain time over; closing the connection");
                break;
            }
        }
    }
}

/// A downstream stream (TCP, or TLS over TCP) that counts its bytes.
struct CountedStream<S> {
    stream: S,
    rx: crate::stats::Counter,
    tx: crate::stats::Counter,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountedStream<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.rx.add(n as u64);
        }
        res
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountedStream<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let res = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &res {
            self.tx.add(*n as u64);
        }
        res
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let res = crate::util::poll_write_coalesced(std::pin::Pin::new(&mut self.stream), cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = &res {
            self.tx.add(*n as u64);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::AcceptBudget;
    use std::num::NonZeroU32;

    #[test]
    fn accept_budget_yields_after_each_batch() {
        let mut unlimited = AcceptBudget::new(None);
        assert!((0..1000).all(|_| !unlimited.spend()));
        let mut one = AcceptBudget::new(NonZeroU32::new(1));
        assert!((0..5).all(|_| one.spend()));
        let mut three = AcceptBudget::new(NonZeroU32::new(3));
        let yields: Vec<bool> = (0..7).map(|_| three.spend()).collect();
        assert_eq!(yields, [false, false, true, false, false, true, false]);
    }
}
