//! Connections to the control plane through its static cluster (`envoy_grpc.cluster_name`, REST's
//! `cluster_names[0]`), opened as the cluster opens its data-plane connections: the cluster's
//! `connect_timeout`, `max_connections` breaker and `upstream_cx_*` stats, then its TLS transport socket when it
//! has one (`UpstreamTlsContext`: SNI, ALPN, client certificate, server verification against the trusted CA and
//! SAN matchers, `ssl.*` stats). Certificates rotated through SDS files apply to the next connection, as
//! Envoy's gRPC and HTTP async clients reach the management server through the cluster manager.
//!
//! A `google_grpc` target with `channel_credentials.ssl_credentials` is dialled directly, with a TLS context of
//! its own ([`google_tls`]).

use crate::server::Shared;
use crate::tls::{self, ClientTls};
use crate::upstream::pool::{connect_upstream, UpstreamIo};
use crate::upstream::{Cluster, Host};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;

/// How long a `google_grpc` target has to accept the connection and finish the handshake (as the h2c
/// channel's `connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The control plane's cluster and the host of this attempt (its hosts in turn).
pub(crate) fn pick(
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
pub(crate) async fn connect(cluster: &Arc<Cluster>, host: &Arc<Host>) -> Result<UpstreamIo, String> {
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
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", host.address))
        .map_err(|e| format!("{}: {}", host.address, causes(&e)))?;
    if let Some(k) = cluster.config.http2.keepalive {
        endpoint = endpoint
            .http2_keep_alive_interval(k.interval)
            .keep_alive_timeout(k.timeout)
            .keep_alive_while_idle(true);
    }
    endpoint
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

/// The TLS context of a `google_grpc` target's `ssl_credentials`: `root_certs` to verify the server, which must
/// name the target's host (its DNS name, sent as SNI, or its IP address), the client certificate when given,
/// ALPN h2. Its `ssl.*` counters are not published (Envoy's Google gRPC client has none).
pub(super) fn google_tls(target: &str, creds: &super::SslCredentials) -> Result<Arc<ClientTls>, String> {
    let host = match target.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => target,
    };
    let ip = host.parse::<std::net::IpAddr>().ok();
    let ca = tls::parse_ca(&creds.root_certs, "root_certs".into())?;
    let cert = match (&creds.cert_chain, &creds.private_key) {
        (Some(chain), Some(key)) => Some(tls::Source::Static(Arc::new(tls::parse_identity(
            chain,
            key,
            "cert_chain".into(),
        )?))),
        _ => None,
    };
    let spec = tls::ClientSpec {
        sni: ip.is_none().then(|| host.to_string()),
        auto_sni: false,
        // Checks the SNI (the DNS name) against the certificate.
        auto_san_validation: ip.is_none(),
        ca: Some(tls::Source::Static(Arc::new(ca))),
        san: ip
            .map(|ip| {
                vec![tls::SanMatcher {
                    san_type: tls::SanType::Ip,
                    matcher: crate::route::matcher::StringMatcher::Exact(ip.to_string(), false),
                }]
            })
            .unwrap_or_default(),
        cert,
        alpn: vec![b"h2".to_vec()],
        params: tls::Params::default(),
    };
    let unpublished = crate::stats::Store::new().scope("");
    ClientTls::new(spec, tls::SslStats::new(&unpublished))
}

/// A gRPC channel to a `google_grpc` target over TLS with `tls` ([`google_tls`]); the connection and the
/// handshake within 5 s.
pub(super) async fn tls_channel(
    target: &str,
    tls: &Arc<ClientTls>,
) -> Result<tonic::transport::Channel, String> {
    let (t, tls) = (target.to_string(), tls.clone());
    let connector = tower::service_fn(move |_: http::Uri| {
        let (t, tls) = (t.clone(), tls.clone());
        async move {
            let connect = async {
                let tcp = tokio::net::TcpStream::connect(&t)
                    .await
                    .map_err(|e| format!("cannot connect to {t}: {e}"))?;
                let _ = tcp.set_nodelay(true);
                let ip = tcp
                    .peer_addr()
                    .map_err(|e| format!("cannot connect to {t}: {e}"))?
                    .ip();
                tls.connect(tcp, ip, None)
                    .await
                    .map(TokioIo::new)
                    .map_err(|e| format!("cannot connect to {t}: transport failure reason: {e}"))
            };
            tokio::time::timeout(CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| format!("cannot connect to {t}: connection timeout"))?
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .map_err(|e| format!("{target}: {}", causes(&e)))?
        .connect_with_connector(connector)
        .await
        .map_err(|e| causes(&e))
}
