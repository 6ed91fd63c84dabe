//! A listener's lowered configuration: its address, and the network filter of each of its filter chains.

use crate::route::RouteTable;
use crate::stats::{CodeStats, Counter, Gauge, Histogram, Scope};
use arc_swap::ArcSwap;
use http::HeaderValue;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// `envoy.config.listener.v3.Listener` as Remora runs it.
#[derive(Debug)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    /// `listener.<address>.` or `listener.<stat_prefix>.`
    pub stat_scope: String,
    /// The filter chains and `default_filter_chain`, each with its one network filter.
    pub chains: super::chain::FilterChains,
    /// `per_connection_buffer_limit_bytes` (default 1 MiB).
    pub buffer_limit: u32,
    /// The listener filter `envoy.filters.listener.original_dst`: each connection's local address is restored
    /// to its original destination (`SO_ORIGINAL_DST`, set by an iptables `REDIRECT`) when it has one.
    pub original_dst: bool,
    /// The listener filter `envoy.filters.listener.tls_inspector`: each connection's first bytes are peeked
    /// for a TLS ClientHello (SNI, ALPN) before its filter chain is chosen.
    pub tls_inspector: bool,
    /// `listener_filters_timeout` (default 15 s; `None` when 0): how long the listener filters may wait for
    /// a connection's first bytes.
    pub listener_filters_timeout: Option<Duration>,
    /// `use_original_dst`: a connection whose original destination is another listener's address is handed off
    /// to that listener.
    pub use_original_dst: bool,
    /// `bind_to_port` (default true): false for a listener that only takes connections handed off to it.
    pub bind_to_port: bool,
    /// `max_connections_to_accept_per_socket_event`: how many connections a worker accepts in a row before it
    /// lets its other tasks run; `None` (Envoy's default) accepts all that are pending.
    pub max_accepts_per_event: Option<std::num::NonZeroU32>,
    /// `ignore_global_conn_limit`: this listener's connections neither count against nor are refused by the
    /// overload manager's global downstream connection limit.
    pub ignore_global_conn_limit: bool,
}

/// What serves a listener's connections.
#[derive(Debug)]
pub enum NetworkFilter {
    /// `envoy.filters.network.http_connection_manager`.
    Http(Arc<HcmConfig>),
    /// `envoy.filters.network.tcp_proxy`.
    Tcp(Arc<super::tcp_proxy::TcpProxyConfig>),
}

impl ListenerConfig {
    /// The HTTP connection managers of every chain.
    pub fn hcms(&self) -> impl Iterator<Item = &Arc<HcmConfig>> {
        self.chains
            .chains
            .iter()
            .chain(self.chains.default.as_ref())
            .filter_map(|c| match &c.filter {
                NetworkFilter::Http(h) => Some(h),
                NetworkFilter::Tcp(_) => None,
            })
    }
}

/// `codec_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Auto,
    Http1,
    Http2,
}

/// `server_header_transformation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerHeader {
    Overwrite,
    AppendIfAbsent,
    PassThrough,
}

/// `headers_with_underscores_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Underscores {
    Allow,
    Reject,
    Drop,
}

/// `envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager`, lowered.
#[derive(Debug)]
pub struct HcmConfig {
    pub stat_prefix: String,
    pub codec: Codec,
    /// The route table; an `ArcSwap` so that RDS can replace it under live connections.
    pub routes: Arc<ArcSwap<RouteTable>>,
    /// `rds.route_config_name`: the table comes from RDS, and the listener warms until it has arrived.
    pub rds_name: Option<String>,
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    pub skip_xff_append: bool,
    pub server_name: HeaderValue,
    pub server_header: ServerHeader,
    pub generate_request_id: bool,
    pub preserve_external_request_id: bool,
    pub always_set_request_id_in_response: bool,
    pub max_request_headers_kb: u32,
    pub max_headers_count: u32,
    pub underscores: Underscores,
    pub request_timeout: Option<Duration>,
    pub request_headers_timeout: Option<Duration>,
    pub stream_idle_timeout: Option<Duration>,
    /// Connection idle timeout (`common_http_protocol_options.idle_timeout`, default 1 h).
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub stats: HcmStats,
    /// The HTTP filters before the router, in configuration order.
    pub filters: Vec<HttpFilter>,
    /// `envoy.filters.http.dynamic_forward_proxy` is configured: the router resolves authorities that a
    /// dynamic forward proxy cluster has not cached yet (else it finds no host for them, as Envoy does).
    pub dynamic_forward_proxy: bool,
    /// The router's `suppress_envoy_headers`: the router adds none of the `x-envoy-*` headers it would
    /// otherwise set (`x-envoy-expected-rq-timeout-ms`, `x-envoy-original-path` upstream;
    /// `x-envoy-upstream-service-time`, `x-envoy-overloaded` downstream). As in Envoy, `x-envoy-attempt-count`
    /// (asked for by the virtual host) and the connection manager's own headers are still set.
    pub suppress_envoy_headers: bool,
    /// `http2_protocol_options`: the downstream HTTP/2 codec's settings.
    pub http2: Http2Settings,
    /// `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action`, applied before routing.
    pub path: super::path::PathNormalization,
    /// `upgrade_configs` with `CONNECT`: CONNECT requests matching a `connect_matcher` route are tunnelled.
    pub connect: bool,
    /// `upgrade_configs` other than CONNECT: upgrade types (lower case) allowed (`true`) or not; a route's
    /// `upgrade_configs` take precedence (see [`super::upgrade`]).
    pub upgrades: Vec<(String, bool)>,
    /// `access_log`: written when each response is done.
    pub access_logs: Vec<crate::access_log::AccessLog>,
}

/// The connection manager's `http2_protocol_options` that Remora applies to downstream HTTP/2 connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Http2Settings {
    /// `max_concurrent_streams` (SETTINGS_MAX_CONCURRENT_STREAMS; default 2^31-1, as Envoy).
    pub max_concurrent_streams: u32,
    /// `initial_stream_window_size`; `None` keeps the codec's default.
    pub initial_stream_window_size: Option<u32>,
    /// `initial_connection_window_size`; `None` keeps the codec's default.
    pub initial_connection_window_size: Option<u32>,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Http2Settings {
            max_concurrent_streams: (1 << 31) - 1,
            initial_stream_window_size: None,
            initial_connection_window_size: None,
        }
    }
}

/// One configured HTTP filter; its shared state serves every worker.
#[derive(Debug, Clone)]
pub enum HttpFilter {
    AdaptiveConcurrency(Arc<crate::filters::adaptive_concurrency::Controller>),
    AdmissionControl(Arc<crate::filters::admission_control::AdmissionController>),
    LocalRateLimit(Arc<crate::filters::local_ratelimit::LocalRateLimiter>),
    HealthCheck(Arc<crate::filters::health_check::HealthCheckFilterConfig>),
}

/// `http.<stat_prefix>.*` and `listener.<address>.http.<stat_prefix>.*`.
#[derive(Debug)]
pub struct HcmStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_cx_http1_total: Counter,
    pub downstream_cx_http2_total: Counter,
    pub downstream_cx_http1_active: Gauge,
    pub downstream_cx_http2_active: Gauge,
    pub downstream_cx_destroy: Counter,
    pub downstream_cx_drain_close: Counter,
    pub downstream_cx_protocol_error: Counter,
    pub downstream_cx_rx_bytes_total: Counter,
    pub downstream_cx_tx_bytes_total: Counter,
    pub downstream_cx_length_ms: Histogram,
    pub downstream_rq_total: Counter,
    pub downstream_rq_http1_total: Counter,
    pub downstream_rq_http2_total: Counter,
    pub downstream_rq_active: Gauge,
    pub downstream_rq_completed: Counter,
    pub downstream_rq: CodeStats,
    pub downstream_rq_time: Histogram,
    pub downstream_rq_rx_reset: Counter,
    pub downstream_rq_tx_reset: Counter,
    pub downstream_rq_timeout: Counter,
    pub downstream_rq_idle_timeout: Counter,
    pub downstream_rq_too_large: Counter,
    pub downstream_rq_failed_path_normalization: Counter,
    pub downstream_rq_redirected_with_normalized_path: Counter,
    pub downstream_rq_ws_on_non_ws_route: Counter,
    pub downstream_cx_upgrades_total: Counter,
    pub downstream_cx_upgrades_active: Gauge,
    pub rq_total: Counter,
    pub no_route: Counter,
    pub no_cluster: Counter,
    pub rq_redirect: Counter,
    pub rq_direct_response: Counter,
    pub listener_rq_completed: Counter,
    pub listener_rq: CodeStats,
}

impl HcmStats {
    /// `http` is `http.<prefix>.`; `listener` is `listener.<address>.http.<prefix>.`.
    pub fn new(http: &Scope, listener: &Scope) -> Self {
        HcmStats {
            downstream_cx_total: http.counter("downstream_cx_total"),
            downstream_cx_active: http.gauge("downstream_cx_active"),
            downstream_cx_http1_total: http.counter("downstream_cx_http1_total"),
            downstream_cx_http2_total: http.counter("downstream_cx_http2_total"),
            downstream_cx_http1_active: http.gauge("downstream_cx_http1_active"),
            downstream_cx_http2_active: http.gauge("downstream_cx_http2_active"),
            downstream_cx_destroy: http.counter("downstream_cx_destroy"),
            downstream_cx_drain_close: http.counter("downstream_cx_drain_close"),
            downstream_cx_protocol_error: http.counter("downstream_cx_protocol_error"),
            downstream_cx_rx_bytes_total: http.counter("downstream_cx_rx_bytes_total"),
            downstream_cx_tx_bytes_total: http.counter("downstream_cx_tx_bytes_total"),
            downstream_cx_length_ms: http.histogram("downstream_cx_length_ms"),
            downstream_rq_total: http.counter("downstream_rq_total"),
            downstream_rq_http1_total: http.counter("downstream_rq_http1_total"),
            downstream_rq_http2_total: http.counter("downstream_rq_http2_total"),
            downstream_rq_active: http.gauge("downstream_rq_active"),
            downstream_rq_completed: http.counter("downstream_rq_completed"),
            downstream_rq: CodeStats::new(http, "downstream_rq"),
            downstream_rq_time: http.histogram("downstream_rq_time"),
            downstream_rq_rx_reset: http.counter("downstream_rq_rx_reset"),
            downstream_rq_tx_reset: http.counter("downstream_rq_tx_reset"),
            downstream_rq_timeout: http.counter("downstream_rq_timeout"),
            downstream_rq_idle_timeout: http.counter("downstream_rq_idle_timeout"),
            downstream_rq_too_large: http.counter("downstream_rq_too_large"),
            downstream_rq_failed_path_normalization: http.counter("downstream_rq_failed_path_normalization"),
            downstream_rq_redirected_with_normalized_path: http
                .counter("downstream_rq_redirected_with_normalized_path"),
            downstream_rq_ws_on_non_ws_route: http.counter("downstream_rq_ws_on_non_ws_route"),
            downstream_cx_upgrades_total: http.counter("downstream_cx_upgrades_total"),
            downstream_cx_upgrades_active: http.gauge("downstream_cx_upgrades_active"),
            rq_total: http.counter("rq_total"),
            no_route: http.counter("no_route"),
            no_cluster: http.counter("no_cluster"),
            rq_redirect: http.counter("rq_redirect"),
            rq_direct_response: http.counter("rq_direct_response"),
            listener_rq_completed: listener.counter("downstream_rq_completed"),
            listener_rq: CodeStats::new(listener, "downstream_rq"),
        }
    }
}

/// `listener.<address>.*`.
#[derive(Debug)]
pub struct ListenerStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_cx_destroy: Counter,
    pub downstream_cx_length_ms: Histogram,
    pub no_filter_chain_match: Counter,
    pub downstream_pre_cx_timeout: Counter,
    pub downstream_cx_transport_socket_connect_timeout: Counter,
    /// Connections closed at once because the global downstream connection limit was reached.
    pub downstream_global_cx_overflow: Counter,
}

impl ListenerStats {
    pub fn new(scope: &Scope) -> Self {
        ListenerStats {
            downstream_cx_total: scope.counter("downstream_cx_total"),
            downstream_cx_active: scope.gauge("downstream_cx_active"),
            downstream_cx_destroy: scope.counter("downstream_cx_destroy"),
            downstream_cx_length_ms: scope.histogram("downstream_cx_length_ms"),
            no_filter_chain_match: scope.counter("no_filter_chain_match"),
            downstream_pre_cx_timeout: scope.counter("downstream_pre_cx_timeout"),
            downstream_cx_transport_socket_connect_timeout: scope
                .counter("downstream_cx_transport_socket_connect_timeout"),
            downstream_global_cx_overflow: scope.counter("downstream_global_cx_overflow"),
        }
    }
}
