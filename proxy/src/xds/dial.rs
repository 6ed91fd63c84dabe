//! Connections to the control plane through its static cluster (`envoy_grpc.cluster_name`, REST's
//! `cluster_names[0]`), opened as the cluster opens its data-plane connections: the cluster's
//! `connect_timeout`, `max_connections` breaker and `upstream_cx_*` stats, then its TLS transport socket when it
//! has one (`UpstreamTlsContext`: SNI, ALPN, client certificate, server verification against the trusted CA and
//! SAN matchers, `ssl.*` stats). Certificates rotated through SDS files apply to the next connection, as
//! Envoy's gRPC and HTTP async clients reach the management server through the cluster manager.

use crate::server::Shared;
use crate::upstream::pool::{connect_upstream, UpstreamIo};
use crate::upstream::{Cluster, Host};
use hyper_util::rt::TokioIo;
use std::sync::Arc;

/// The control plane's cluster and the host of this attempt (its hosts in turn).
pub(super) fn pick(
    shared: &Shared,
    cluster: &str,
    attempt: usize,
) -> Result<(Arc<Cluster>, Arc<Host>), String> {
    let snap = shared.clusters.load();
    snap.by_name(cluster)
        .and_then(|c| {
            let hosts = c.hosts();
            let n = hosts.hosts.len();
            (n > 0).then(|| (c.clone(), hosts.hosts[attempt % n].clone()))
        })
        .ok_or_else(|| format!("cluster {cluster:?} has no hosts"))
}

/// A connection to `host`: TCP, then TLS when the cluster has a TLS transport socket. The error says why,
/// with the TLS reason (`TLS_error:|...`) when the handshake failed.
pub(super) async fn connect(cluster: &Arc<Cluster>, host: &Arc<Host>) -> Result<UpstreamIo, String> {
    connect_upstream(cluster, host)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", host.address))
}

/// A gRPC channel (HTTP/2) over one connection made by [`connect`].
pub(super) async fn channel(
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
) -> Result<tonic::transport::Channel, String> {
    let (c, h) = (cluster.clone(), host.clone());
    let connector = tower::service_fn(move |_: http::Uri| {
        let (c, h) = (c.clone(), h.clone());
        async move { connect(&c, &h).await.map(TokioIo::new) }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{}", host.address))
        .map_err(|e| format!("{}: {}", host.address, causes(&e)))?
        .connect_with_connector(connector)
        .await
        .map_err(|e| causes(&e))
}

/// An error and its causes, as one line (tonic's transport error says only "transport error" itself).
pub(super) fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        next = s.source();
    }
    out
}
