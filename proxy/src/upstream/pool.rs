//! Per-worker upstream connection pools.
//!
//! Each worker thread runs its own single-threaded runtime, and keeps its own pools in a `RefCell`: taking and
//! returning a connection is a vector push and pop, with no lock and no atomic. HTTP/1.1 pools keep idle
//! connections (most recently used first); an HTTP/2 pool keeps one multiplexed connection per host.
//!
//! A pooled HTTP/1.1 connection returns to its pool when the response body has been read to its end; one whose
//! response was abandoned is dropped, and hyper closes it.
//!
//! # Pending requests (Envoy's `ConnPoolImplBase::newStreamImpl` and `tryCreateNewConnection`)
//! A request that finds no ready connection (an idle HTTP/1.1 one, or the host's HTTP/2 one) becomes a *pending
//! request*: it takes a unit of the cluster's `max_pending_requests` breaker or fails at once with an overflow
//! (`upstream_rq_pending_overflow`; the router answers 503 UO with `x-envoy-overloaded`), and counts
//! `upstream_rq_pending_total` and `upstream_rq_pending_active` while it waits. It then opens a connection if the
//! `max_connections` breakers (cluster and per host) allow one, or if this worker has no connection at all to the
//! host (Envoy's rule, so that a worker is never starved by another's connections; the breaker then reads open).
//! Otherwise it counts `upstream_cx_overflow` and waits, without polling, for either:
//! - an HTTP/1.1 connection of this worker to the host coming back from its response ([`Pools::put_http1`] hands
//!   it to the oldest waiting request first), or
//! - any connection of the cluster closing (the breaker's release wakes the waiters, which try again).
//!
//! A pending request dropped by its caller (the client went away, a route or per-try timeout) leaves the queue:
//! its units are released and `upstream_rq_cancelled` counts it. An HTTP/2 request waits while the host's
//! connection is being made; once it exists, stream slots are hyper's and h2's business (their queue is not
//! counted as pending).
//!
//! # Requests per connection (`max_requests_per_connection`)
//! A connection carries at most the cluster's `max_requests_per_connection` requests, as Envoy's
//! `ConnPoolImplBase::attachStreamToClient` counts them: the request that takes the last one counts
//! `upstream_cx_max_requests` and the connection drains. An HTTP/1.1 connection is then not pooled again when
//! its response ends (dropped, hyper closes it); the host's HTTP/2 connection leaves the pool, so the next
//! request makes a new one, and closes when its last stream ends.
//!
//! # Retired hosts
//! A host that leaves its cluster, or whose cluster leaves the configuration, is *retired*
//! ([`super::Host::is_retired`]): [`purge_retired_soon`] wakes every worker's [`purge_on_retirement`] task,
//! which drops the host's pool. Idle HTTP/1.1 connections close at once; a busy one is not pooled again when
//! its response ends; the HTTP/2 connection closes once its last stream ends (hyper closes a client connection
//! when every `SendRequest` is gone). A request still in flight on an older snapshot gets an unpooled
//! connection. This is Envoy's draining of the connection pools of removed hosts and clusters.

use super::breaker::{Permit, Priority, Resource};
use super::{Cluster, Host};
use crate::body::Body;
use crate::runtime::LocalExec;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Why an upstream connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection timeout")]
    Timeout,
    #[error("connection failure, transport failure reason: delayed connect error: {0}")]
    Refused(io::Error),
    #[error("connection failure: {0}")]
    Handshake(hyper::Error),
    /// The cluster's `max_connections` circuit breaker is open.
    #[error("overflow")]
    Overflow,
    /// The TLS handshake failed; the reason as `%UPSTREAM_TRANSPORT_FAILURE_REASON%` shows it.
    #[error("connection failure, transport failure reason: {0}")]
    Tls(String),
}

/// Bumped whenever hosts are retired; see the module docs.
static RETIREMENTS: std::sync::LazyLock<tokio::sync::watch::Sender<u64>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(0));

/// Ask every worker to drop the pools of retired hosts.
pub fn purge_retired_soon() {
    RETIREMENTS.send_modify(|n| *n = n.wrapping_add(1));
}

/// A worker's janitor: purges `pools` whenever hosts are retired, for as long as the worker runs.
pub async fn purge_on_retirement(pools: Rc<Pools>) {
    let mut changes = RETIREMENTS.subscribe();
    while changes.changed().await.is_ok() {
        pools.purge_retired();
    }
}

/// Whether connections to `host` may be pooled.
fn poolable(cluster: &Cluster, host: &Host) -> bool {
    !host.is_retired() && !cluster.is_retired()
}

/// A pooled HTTP/1.1 connection, with the requests it may still carry (see the module docs).
pub struct H1Conn {
    sender: http1::SendRequest<Body>,
    /// Requests left before it drains; `None`: no `max_requests_per_connection`.
    remaining: Option<u32>,
}

impl H1Conn {
    fn new(cluster: &Cluster, sender: http1::SendRequest<Body>) -> H1Conn {
        H1Conn {
            sender,
            remaining: cluster.config.max_requests_per_connection,
        }
    }

    /// A request takes the connection: one fewer left; the last one drains it.
    fn attach(mut self, cluster: &Cluster) -> H1Conn {
        if let Some(n) = self.remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                cluster.stats.upstream_cx_max_requests.inc();
            }
        }
        self
    }

    /// It has carried its `max_requests_per_connection` requests.
    fn drained(&self) -> bool {
        self.remaining == Some(0)
    }
}

impl std::ops::Deref for H1Conn {
    type Target = http1::SendRequest<Body>;
    fn deref(&self) -> &Self::Target {
        &self.sender
    }
}

impl std::ops::DerefMut for H1Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.sender
    }
}

struct HostPool {
    host: Arc<Host>,
    idle: Vec<(H1Conn, Instant)>,
    /// Pending HTTP/1.1 requests of this worker waiting for a connection to the host, oldest first.
    waiters: VecDeque<tokio::sync::oneshot::Sender<H1Conn>>,
    /// This worker's connections to the host, open or being opened.
    live: Rc<Cell<u32>>,
    h2: Option<http2::SendRequest<Body>>,
    /// Streams the HTTP/2 connection may still carry (`None`: no `max_requests_per_connection`).
    h2_remaining: Option<u32>,
    /// Set while this worker makes the host's HTTP/2 connection; woken when it is made (or failed).
    h2_connecting: Option<Rc<tokio::sync::Notify>>,
}

impl HostPool {
    fn new(host: &Arc<Host>) -> Self {
        HostPool {
            host: host.clone(),
            idle: Vec::new(),
            waiters: VecDeque::new(),
            live: Rc::new(Cell::new(0)),
            h2: None,
            h2_remaining: None,
            h2_connecting: None,
        }
    }
}

impl HostPool {
    /// A request takes a stream of the host's HTTP/2 connection; the last one it may carry takes the
    /// connection out of the pool (it closes when its streams end).
    fn attach_h2(&mut self, cluster: &Cluster) {
        if let Some(n) = self.h2_remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                cluster.stats.upstream_cx_max_requests.inc();
                self.h2 = None;
                self.h2_remaining = None;
            }
        }
    }
}

/// The pools of one worker.
#[derive(Default)]
pub struct Pools {
    hosts: RefCell<HashMap<u64, HostPool>>,
}

impl Pools {
    pub fn new() -> Rc<Self> {
        Rc::new(Pools::default())
    }

    /// An idle HTTP/1.1 connection to `host`, else one got as a pending request (see the module docs).
    pub async fn http1(&self, cluster: &Arc<Cluster>, host: &Arc<Host>) -> Result<H1Conn, ConnectError> {
        self.http1_conn(cluster, host).await.map(|c| c.attach(cluster))
    }

    async fn http1_conn(&self, cluster: &Arc<Cluster>, host: &Arc<Host>) -> Result<H1Conn, ConnectError> {
        if let Some(sender) = self.idle_http1(cluster, host).await {
            return Ok(sender);
        }
        if !poolable(cluster, host) {
            // A request in flight on an older snapshot: its own connection, not pooled.
            let permit = connection_permit(cluster, host, true, true).ok_or(ConnectError::Overflow)?;
            return self.new_http1(cluster, host, permit, Rc::new(Cell::new(0))).await;
        }
        let mut pending = Pending::new(cluster)?;
        let resources = cluster.breakers.resources(Priority::Default);
        let mut first_try = true;
        loop {
            if let Some(sender) = self.idle_http1(cluster, host).await {
                pending.done();
                return Ok(sender);
            }
            if !poolable(cluster, host) {
                // Retired while this request waited: its own connection, not pooled.
                pending.done();
                let permit = connection_permit(cluster, host, true, true).ok_or(ConnectError::Overflow)?;
                return self.new_http1(cluster, host, permit, Rc::new(Cell::new(0))).await;
            }
            // Listen for a released connection before looking at the limits, so that none is missed.
            let released = resources.connection_released();
            tokio::pin!(released);
            released.as_mut().enable();
            let live = self.live(host);
            if let Some(permit) = connection_permit(cluster, host, live.get() == 0, first_try) {
                // Pending until the connection is made (or failed).
                let made = self.new_http1(cluster, host, permit, live).await;
                pending.done();
                return made;
            }
            first_try = false;
            let (tx, rx) = tokio::sync::oneshot::channel();
            {
                let mut hosts = self.hosts.borrow_mut();
                let pool = hosts.entry(host.id).or_insert_with(|| HostPool::new(host));
                pool.waiters.retain(|w| !w.is_closed());
                pool.waiters.push_back(tx);
            }
            tokio::select! {
                biased;
                handed = rx => {
                    if let Ok(mut sender) = handed {
                        if sender.ready().await.is_ok() {
                            pending.done();
                            return Ok(sender);
                        }
                    }
                }
                () = &mut released => {}
            }
        }
    }

    /// A pooled HTTP/1.1 connection that is still usable, if there is one.
    async fn idle_http1(&self, cluster: &Arc<Cluster>, host: &Arc<Host>) -> Option<H1Conn> {
        loop {
            let (mut sender, since) = {
                let mut hosts = self.hosts.borrow_mut();
                hosts.get_mut(&host.id)?.idle.pop()?
            };
            if sender.is_closed() {
                continue;
            }
            if let Some(idle) = cluster.config.idle_timeout {
                if since.elapsed() >= idle {
                    continue;
                }
            }
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn live(&self, host: &Arc<Host>) -> Rc<Cell<u32>> {
        self.hosts
            .borrow_mut()
            .entry(host.id)
            .or_insert_with(|| HostPool::new(host))
            .live
            .clone()
    }

    async fn new_http1(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        permit: Permit,
        live: Rc<Cell<u32>>,
    ) -> Result<H1Conn, ConnectError> {
        let live = Live::new(live);
        let tcp = connect_with(cluster, host, permit).await?;
        let io = TokioIo::new(with_tls(cluster, host, tcp).await?);
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(ConnectError::Handshake)?;
        cluster.stats.upstream_cx_http1_total.inc();
        tokio::task::spawn_local(async move {
            let _ = conn.await;
            drop(live);
        });
        Ok(H1Conn::new(cluster, sender))
    }

    /// Give a connection back after its response ended: to the oldest pending request of this worker waiting
    /// for the host, else to the idle list (dropped, and so closed, if its host was retired or it has carried
    /// its `max_requests_per_connection`).
    pub fn put_http1(&self, host_id: u64, sender: H1Conn) {
        if sender.is_closed() || sender.drained() {
            return;
        }
        let mut hosts = self.hosts.borrow_mut();
        let Some(pool) = hosts.get_mut(&host_id).filter(|p| !p.host.is_retired()) else {
            return;
        };
        let mut sender = sender;
        while let Some(waiter) = pool.waiters.pop_front() {
            match waiter.send(sender) {
                Ok(()) => return,
                // That request went away meanwhile.
                Err(s) => sender = s,
            }
        }
        pool.idle.push((sender, Instant::now()));
    }

    /// The shared HTTP/2 connection to `host`, made if there is none or it closed. Requests that wait for it
    /// to be made are pending requests.
    pub async fn http2(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
    ) -> Result<http2::SendRequest<Body>, ConnectError> {
        let mut pending = None;
        // One connection per host per worker: requests that arrive while it is being made wait for it.
        loop {
            if !poolable(cluster, host) {
                // A request in flight on an older snapshot: its own connection, not pooled.
                let permit = connection_permit(cluster, host, true, true).ok_or(ConnectError::Overflow)?;
                return self.connect_h2(cluster, host, permit).await;
            }
            let wait = {
                let mut hosts = self.hosts.borrow_mut();
                let pool = hosts.entry(host.id).or_insert_with(|| HostPool::new(host));
                if let Some(s) = &pool.h2 {
                    if !s.is_closed() {
                        if let Some(p) = pending.as_mut() {
                            Pending::done(p);
                        }
                        let s = s.clone();
                        pool.attach_h2(cluster);
                        return Ok(s);
                    }
                    pool.h2 = None;
                }
                match &pool.h2_connecting {
                    Some(n) => n.clone(),
                    None => {
                        pool.h2_connecting = Some(Rc::new(tokio::sync::Notify::new()));
                        break;
                    }
                }
            };
            if pending.is_none() {
                pending = Some(Pending::new(cluster)?);
            }
            let notified = wait.notified();
            tokio::pin!(notified);
            // Register before re-checking, so that a wake-up between the check and the wait is not lost.
            notified.as_mut().enable();
            let still_connecting = self
                .hosts
                .borrow()
                .get(&host.id)
                .is_some_and(|p| p.h2_connecting.is_some());
            if still_connecting {
                notified.await;
            }
        }
        // Whatever happens to this request (even if it is dropped mid-connect), the waiters are woken.
        let _wake = ConnectingGuard {
            pools: self,
            host: host.id,
        };
        let mut pending = match pending {
            Some(p) => p,
            None => Pending::new(cluster)?,
        };
        // The worker's only connection to the host: always opened, even at `max_connections`.
        let permit = connection_permit(cluster, host, true, true).ok_or(ConnectError::Overflow)?;
        let made = self.connect_h2(cluster, host, permit).await;
        pending.done();
        let sender = made?;
        if let Some(pool) = self.hosts.borrow_mut().get_mut(&host.id) {
            if !pool.host.is_retired() {
                pool.h2 = Some(sender.clone());
                pool.h2_remaining = cluster.config.max_requests_per_connection;
                pool.attach_h2(cluster);
            }
        }
        Ok(sender)
    }

    async fn connect_h2(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
        permit: Permit,
    ) -> Result<http2::SendRequest<Body>, ConnectError> {
        let tcp = connect_with(cluster, host, permit).await?;
        let io = TokioIo::new(with_tls(cluster, host, tcp).await?);
        let mut builder = http2::Builder::new(LocalExec);
        builder.timer(hyper_util::rt::TokioTimer::new());
        let h2 = &cluster.config.http2;
        if let Some(w) = h2.initial_stream_window_size {
            builder.initial_stream_window_size(w);
        }
        if let Some(w) = h2.initial_connection_window_size {
            builder.initial_connection_window_size(w);
        }
        if let Some(k) = h2.keepalive {
            builder
                .keep_alive_interval(k.interval)
                .keep_alive_timeout(k.timeout)
                .keep_alive_while_idle(true);
        }
        let (sender, conn) = builder.handshake(io).await.map_err(ConnectError::Handshake)?;
        cluster.stats.upstream_cx_http2_total.inc();
        tokio::task::spawn_local(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Drop every pooled connection (the worker is stopping).
    pub fn clear(&self) {
        self.hosts.borrow_mut().clear();
    }

    /// Drop the pools of retired hosts (see the module docs). Requests waiting for a retired host's HTTP/2
    /// connection are woken, and make their own; pending HTTP/1.1 requests waiting for a connection to come
    /// back are woken too (their channel closes), and try again.
    pub fn purge_retired(&self) {
        let mut hosts = self.hosts.borrow_mut();
        hosts.retain(|_, p| {
            if !p.host.is_retired() {
                return true;
            }
            if let Some(n) = p.h2_connecting.take() {
                n.notify_waiters();
            }
            false
        });
    }
}

/// Clears a host's "HTTP/2 connection being made" mark and wakes the requests waiting on it.
struct ConnectingGuard<'a> {
    pools: &'a Pools,
    host: u64,
}

impl Drop for ConnectingGuard<'_> {
    fn drop(&mut self) {
        if let Some(pool) = self.pools.hosts.borrow_mut().get_mut(&self.host) {
            if let Some(n) = pool.h2_connecting.take() {
                n.notify_waiters();
            }
        }
    }
}

/// A request waiting for a connection: its unit of `max_pending_requests` and `upstream_rq_pending_active`.
struct Pending<'a> {
    stats: &'a super::ClusterStats,
    _permit: Option<Permit>,
    active: bool,
}

impl<'a> Pending<'a> {
    /// Counts `upstream_rq_pending_total`; `Overflow` (counting `upstream_rq_pending_overflow`) when the
    /// cluster's pending requests are at `max_pending_requests`.
    fn new(cluster: &'a Arc<Cluster>) -> Result<Pending<'a>, ConnectError> {
        let permit = cluster
            .breakers
            .resources(Priority::Default)
            .try_pending()
            .ok_or(ConnectError::Overflow)?;
        let stats = &cluster.stats;
        stats.upstream_rq_pending_total.inc();
        stats.upstream_rq_pending_active.inc();
        Ok(Pending {
            stats,
            _permit: Some(permit),
            active: true,
        })
    }

    /// The request got its connection: it is no longer pending.
    fn done(&mut self) {
        if self.active {
            self.active = false;
            self._permit = None;
            self.stats.upstream_rq_pending_active.dec();
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.active {
            // Dropped while waiting: cancelled by its caller (or its connection failed).
            self.stats.upstream_rq_cancelled.inc();
            self.stats.upstream_rq_pending_active.dec();
        }
    }
}

/// Counts one of a worker's connections to a host while it is open (or being opened).
struct Live(Rc<Cell<u32>>);

impl Live {
    fn new(count: Rc<Cell<u32>>) -> Live {
        count.set(count.get() + 1);
        Live(count)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// A unit of the `max_connections` breakers (cluster, and per host) for a new pooled connection, or `None` at
/// either limit. With `force` (this worker has no connection to the host) the connection is allowed anyway, as
/// Envoy's `tryCreateNewConnection` does. `count` counts `upstream_cx_overflow` when a limit is reached.
fn connection_permit(cluster: &Arc<Cluster>, host: &Arc<Host>, force: bool, count: bool) -> Option<Permit> {
    let resources = cluster.breakers.resources(Priority::Default);
    let host_ok = cluster
        .breakers
        .host_connection_within_limit(Priority::Default, host.stats.cx_active.load(Relaxed));
    let permit = host_ok
        .then(|| resources.try_acquire_uncounted(Resource::Connection))
        .flatten();
    if permit.is_some() {
        return permit;
    }
    if count {
        resources.count_overflow(Resource::Connection);
    }
    force.then(|| resources.acquire_over_limit(Resource::Connection))
}

/// As [`connect_tcp`], then the cluster's TLS handshake when it has a TLS transport socket (TCP proxying).
pub async fn connect_upstream(cluster: &Arc<Cluster>, host: &Arc<Host>) -> Result<UpstreamIo, ConnectError> {
    let tcp = connect_tcp(cluster, host).await?;
    with_tls(cluster, host, tcp).await
}

/// The cluster's TLS over a new connection, within `connect_timeout`, when it has a TLS transport socket.
async fn with_tls(
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    tcp: CountedIo,
) -> Result<UpstreamIo, ConnectError> {
    let Some(tls) = &cluster.tls else {
        return Ok(UpstreamIo::Plain(tcp));
    };
    let tls = tls.as_ref().map_err(|e| ConnectError::Tls(e.clone()))?;
    // auto_sni: the host's DNS name (dynamic forward proxy and DNS hosts carry the name asked for); pools are
    // per host, so one host's connections share one SNI.
    let authority = (!host.hostname.is_empty()).then_some(host.hostname.as_str());
    let handshake = tls.connect(tcp, host.address.ip(), authority);
    match tokio::time::timeout(cluster.config.connect_timeout, handshake).await {
        Ok(Ok(s)) => Ok(UpstreamIo::Tls(Box::new(s))),
        Ok(Err(reason)) => {
            cluster.stats.upstream_cx_connect_fail.inc();
            host.stats.cx_connect_fail.fetch_add(1, Relaxed);
            Err(ConnectError::Tls(reason))
        }
        Err(_) => {
            cluster.stats.upstream_cx_connect_timeout.inc();
            cluster.stats.upstream_cx_connect_fail.inc();
            host.stats.cx_connect_fail.fetch_add(1, Relaxed);
            Err(ConnectError::Timeout)
        }
    }
}

/// An upstream connection: plain TCP, or TLS over it.
pub enum UpstreamIo {
    Plain(CountedIo),
    Tls(Box<tokio_rustls::client::TlsStream<CountedIo>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A counted TCP connection to `host` under the cluster's connection breakers and `connect_timeout` (for
/// CONNECT tunnels and TCP proxying: an overflow fails at once).
pub async fn connect_tcp(cluster: &Arc<Cluster>, host: &Arc<Host>) -> Result<CountedIo, ConnectError> {
    // Circuit breakers: the cluster's `max_connections`, and the host's `per_host_thresholds`.
    let prio = Priority::Default;
    if !cluster
        .breakers
        .host_connection_allowed(prio, host.stats.cx_active.load(Relaxed))
    {
        return Err(ConnectError::Overflow);
    }
    let permit = cluster
        .breakers
        .resources(prio)
        .try_connection()
        .ok_or(ConnectError::Overflow)?;
    connect_with(cluster, host, permit).await
}

/// Open a counted TCP connection to `host` within the cluster's `connect_timeout`, holding `permit` (its unit
/// of `max_connections`) while it is open.
async fn connect_with(
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    permit: Permit,
) -> Result<CountedIo, ConnectError> {
    let stats = &cluster.stats;
    let start = Instant::now();
    let res = tokio::time::timeout(cluster.config.connect_timeout, TcpStream::connect(host.address)).await;
    let stream = match res {
        Err(_) => {
            stats.upstream_cx_connect_timeout.inc();
            stats.upstream_cx_connect_fail.inc();
            host.stats.cx_connect_fail.fetch_add(1, Relaxed);
            return Err(ConnectError::Timeout);
        }
        Ok(Err(e)) => {
            stats.upstream_cx_connect_fail.inc();
            host.stats.cx_connect_fail.fetch_add(1, Relaxed);
            return Err(ConnectError::Refused(e));
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    stats.upstream_cx_total.inc();
    stats.upstream_cx_active.inc();
    host.stats.cx_total.fetch_add(1, Relaxed);
    host.stats.cx_active.fetch_add(1, Relaxed);
    stats
        .upstream_cx_connect_ms
        .record(start.elapsed().as_millis() as u64);
    Ok(CountedIo {
        stream,
        cluster: cluster.clone(),
        host: host.clone(),
        opened: Instant::now(),
        _permit: permit,
    })
}

/// A TCP stream that counts its bytes into the cluster's stats and its lifetime on close.
pub struct CountedIo {
    stream: TcpStream,
    cluster: Arc<Cluster>,
    host: Arc<Host>,
    opened: Instant,
    /// The connection's unit of the `max_connections` breaker, released when it closes.
    _permit: Permit,
}

impl Drop for CountedIo {
    fn drop(&mut self) {
        let s = &self.cluster.stats;
        s.upstream_cx_active.dec();
        s.upstream_cx_destroy.inc();
        s.upstream_cx_length_ms
            .record(self.opened.elapsed().as_millis() as u64);
        self.host.stats.cx_active.fetch_sub(1, Relaxed);
    }
}

impl AsyncRead for CountedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.cluster.stats.upstream_cx_rx_bytes_total.add(n as u64);
        }
        res
    }
}

impl AsyncWrite for CountedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            self.cluster.stats.upstream_cx_tx_bytes_total.add(*n as u64);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = crate::util::poll_write_coalesced(Pin::new(&mut self.stream), cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            self.cluster.stats.upstream_cx_tx_bytes_total.add(*n as u64);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
