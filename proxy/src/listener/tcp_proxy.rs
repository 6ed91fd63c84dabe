//! `envoy.filters.network.tcp_proxy`: a listener whose filter chain copies bytes to a cluster.
//!
//! For each downstream connection: pick the cluster (`cluster`, or `weighted_clusters` by weight), pick a
//! host of it and connect (up to `max_connect_attempts`, default 1, each a fresh host pick; failures feed
//! outlier detection), then copy bytes both ways until either side closes, or until no byte moved either way
//! for `idle_timeout` (default 1 h; 0 disables). A connection without a cluster is closed
//! (`downstream_cx_no_route`), as is one whose cluster has no host or cannot be reached. Stats are Envoy's
//! `tcp.<stat_prefix>.*`; the upstream side counts under `cluster.<name>.upstream_cx_*`.

use super::config::ListenerStats;
use super::CountedStream;
use crate::route::ClusterId;
use crate::runtime::Worker;
use crate::server::Shared;
use crate::stats::{Counter, Scope};
use crate::upstream::outlier::Outcome;
use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// `envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy`, lowered.
#[derive(Debug)]
pub struct TcpProxyConfig {
    pub stat_prefix: String,
    /// The clusters with their weights (one entry with weight 1 for `cluster`).
    pub clusters: Vec<(ClusterId, String, u32)>,
    pub total_weight: u32,
    pub idle_timeout: Option<Duration>,
    pub max_connect_attempts: u32,
    pub stats: TcpProxyStats,
}

/// `tcp.<stat_prefix>.*`.
#[derive(Debug)]
pub struct TcpProxyStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_no_route: Counter,
    pub downstream_cx_rx_bytes_total: Counter,
    pub downstream_cx_tx_bytes_total: Counter,
    pub idle_timeout: Counter,
}

impl TcpProxyStats {
    pub fn new(scope: &Scope) -> Self {
        TcpProxyStats {
            downstream_cx_total: scope.counter("downstream_cx_total"),
            downstream_cx_no_route: scope.counter("downstream_cx_no_route"),
            downstream_cx_rx_bytes_total: scope.counter("downstream_cx_rx_bytes_total"),
            downstream_cx_tx_bytes_total: scope.counter("downstream_cx_tx_bytes_total"),
            idle_timeout: scope.counter("idle_timeout"),
        }
    }
}

/// Proxy one downstream connection.
pub async fn serve<S>(
    cfg: Arc<TcpProxyConfig>,
    shared: Arc<Shared>,
    worker: Rc<Worker>,
    stream: S,
    lstats: Arc<ListenerStats>,
    original_dst: Option<std::net::SocketAddr>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let opened = Instant::now();
    let _guard = worker.track_connection();
    lstats.downstream_cx_total.inc();
    lstats.downstream_cx_active.inc();
    shared.server_stats.total_connections.inc();
    proxy(&cfg, &shared, &worker, stream, original_dst).await;
    shared.server_stats.total_connections.dec();
    lstats.downstream_cx_active.dec();
    lstats.downstream_cx_destroy.inc();
    lstats
        .downstream_cx_length_ms
        .record(opened.elapsed().as_millis() as u64);
}

async fn proxy<S>(
    cfg: &TcpProxyConfig,
    shared: &Shared,
    worker: &Worker,
    stream: S,
    original_dst: Option<std::net::SocketAddr>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let s = &cfg.stats;
    s.downstream_cx_total.inc();
    let cluster = {
        let snapshot = shared.clusters.load();
        let mut pick = worker.rng.borrow_mut().below(cfg.total_weight.max(1) as usize) as u32;
        let mut chosen = None;
        for (id, _, w) in &cfg.clusters {
            if pick < *w {
                chosen = snapshot.get(*id).cloned();
                break;
            }
            pick -= w;
        }
        chosen
    };
    let Some(cluster) = cluster else {
        s.downstream_cx_no_route.inc();
        return;
    };
    let mut upstream = None;
    for _ in 0..cfg.max_connect_attempts.max(1) {
        // An ORIGINAL_DST cluster's host is the connection's original destination.
        // An aggregate cluster's host belongs to the member chosen: the connection is that member's.
        let picked = match &cluster.original_dst {
            Some(od) => od
                .host_for(&cluster, None, original_dst)
                .and_then(|h| cluster.index_of(&h))
                .map(|(i, h)| (cluster.clone(), i, h)),
            None => cluster.pick_target(&shared.clusters, &mut worker.rng.borrow_mut(), None),
        };
        let Some((target, index, host)) = picked else {
            cluster.stats.upstream_cx_none_healthy.inc();
            return;
        };
        match crate::upstream::pool::connect_upstream(&target, &host).await {
            Ok(u) => {
                upstream = Some(u);
                break;
            }
            Err(e) => {
                tracing::debug!(cluster = %cluster.name(), host = %host.address, error = %e, "tcp_proxy: connect failed");
                target.record_outcome(index, Outcome::ConnectFailed, &mut worker.rng.borrow_mut());
            }
        }
    }
    let Some(upstream) = upstream else { return };
    let activity = Rc::new(Cell::new(Instant::now()));
    let mut down = Active {
        io: CountedStream {
            stream,
            rx: s.downstream_cx_rx_bytes_total.clone(),
            tx: s.downstream_cx_tx_bytes_total.clone(),
        },
        last: activity.clone(),
    };
    let mut up = Active {
        io: upstream,
        last: activity.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    match cfg.idle_timeout {
        None => {
            let _ = copy.await;
        }
        Some(idle) => {
            tokio::pin!(copy);
            loop {
                let wake = activity.get() + idle;
                tokio::select! {
                    _ = copy.as_mut() => break,
                    _ = tokio::time::sleep_until(wake) => {
                        if activity.get() + idle <= Instant::now() {
                            s.idle_timeout.inc();
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// A stream that notes when bytes last moved through it.
struct Active<T> {
    io: T,
    last: Rc<Cell<Instant>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.set(Instant::now());
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.last.set(Instant::now());
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
