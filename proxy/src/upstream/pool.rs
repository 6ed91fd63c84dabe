//! Per-worker upstream connection pools.
//!
//! Each worker thread runs its own single-threaded runtime, and keeps its own pools in a `RefCell`: taking and
//! returning a connection is a vector push and pop, with no lock and no atomic. HTTP/1.1 pools keep idle
//! connections (most recently used first); an HTTP/2 pool keeps one multiplexed connection per host.
//!
//! A pooled HTTP/1.1 connection returns to its pool when the response body has been read to its end; one whose
//! response was abandoned is dropped, and hyper closes it.
//!
//! A host that leaves its cluster, or whose cluster leaves the configuration, is *retired*
//! ([`super::Host::is_retired`]): [`purge_retired_soon`] wakes every worker's [`purge_on_retirement`] task,
//! which drops the host's pool. Idle HTTP/1.1 connections close at once; a busy one is not pooled again when
//! its response ends; the HTTP/2 connection closes once its last stream ends (hyper closes a client connection
//! when every `SendRequest` is gone). A request still in flight on an older snapshot gets an unpooled
//! connection. This is Envoy's draining of the connection pools of removed hosts and clusters.

use super::{Cluster, Host};
use crate::body::Body;
use crate::runtime::LocalExec;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::collections::HashMap;
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

struct HostPool {
    host: Arc<Host>,
    idle: Vec<(http1::SendRequest<Body>, Instant)>,
    h2: Option<http2::SendRequest<Body>>,
    /// Set while this worker makes the host's HTTP/2 connection; woken when it is made (or failed).
    h2_connecting: Option<Rc<tokio::sync::Notify>>,
}

impl HostPool {
    fn new(host: &Arc<Host>) -> Self {
        HostPool {
            host: host.clone(),
            idle: Vec::new(),
            h2: None,
            h2_connecting: None,
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

    /// An idle HTTP/1.1 connection to `host`, or a new one.
    pub async fn http1(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
    ) -> Result<http1::SendRequest<Body>, ConnectError> {
        let pooled = poolable(cluster, host);
        loop {
            let candidate = {
                let mut hosts = self.hosts.borrow_mut();
                let pool = if pooled {
                    Some(hosts.entry(host.id).or_insert_with(|| HostPool::new(host)))
                } else {
                    hosts.get_mut(&host.id)
                };
                pool.and_then(|p| p.idle.pop())
            };
            let Some((mut sender, since)) = candidate else {
                break;
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
                return Ok(sender);
            }
        }
        let io = connect(cluster, host).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(ConnectError::Handshake)?;
        cluster.stats.upstream_cx_http1_total.inc();
        tokio::task::spawn_local(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Give a connection back after its response ended (dropped, and so closed, if its host was retired).
    pub fn put_http1(&self, host_id: u64, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut hosts = self.hosts.borrow_mut();
        if let Some(pool) = hosts.get_mut(&host_id).filter(|p| !p.host.is_retired()) {
            pool.idle.push((sender, Instant::now()));
        }
    }

    /// The shared HTTP/2 connection to `host`, made if there is none or it closed.
    pub async fn http2(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
    ) -> Result<http2::SendRequest<Body>, ConnectError> {
        // One connection per host per worker: requests that arrive while it is being made wait for it.
        loop {
            if !poolable(cluster, host) {
                return self.connect_h2(cluster, host).await;
            }
            let wait = {
                let mut hosts = self.hosts.borrow_mut();
                let pool = hosts.entry(host.id).or_insert_with(|| HostPool::new(host));
                if let Some(s) = &pool.h2 {
                    if !s.is_closed() {
                        return Ok(s.clone());
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
        let sender = self.connect_h2(cluster, host).await?;
        if let Some(pool) = self.hosts.borrow_mut().get_mut(&host.id) {
            if !pool.host.is_retired() {
                pool.h2 = Some(sender.clone());
            }
        }
        Ok(sender)
    }

    async fn connect_h2(
        &self,
        cluster: &Arc<Cluster>,
        host: &Arc<Host>,
    ) -> Result<http2::SendRequest<Body>, ConnectError> {
        let io = connect(cluster, host).await?;
        let (sender, conn) = http2::Builder::new(LocalExec)
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(io)
            .await
            .map_err(ConnectError::Handshake)?;
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
    /// connection are woken, and make their own.
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

/// Open a TCP connection to `host` within the cluster's `connect_timeout`, counting it.
async fn connect(cluster: &Arc<Cluster>, host: &Arc<Host>) -> Result<TokioIo<CountedIo>, ConnectError> {
    connect_tcp(cluster, host).await.map(TokioIo::new)
}

/// A counted TCP connection to `host` under the cluster's connection breakers and `connect_timeout` (for
/// HTTP pools, CONNECT tunnels and TCP proxying).
pub async fn connect_tcp(cluster: &Arc<Cluster>, host: &Arc<Host>) -> Result<CountedIo, ConnectError> {
    let stats = &cluster.stats;
    // Circuit breakers: the cluster's `max_connections`, and the host's `per_host_thresholds`.
    let prio = super::breaker::Priority::Default;
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
    _permit: super::breaker::Permit,
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
        let res = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
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
