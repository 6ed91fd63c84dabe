//! Lowering `envoy.config.listener.v3.Listener` and its HTTP connection manager.

use super::bootstrap::socket_address;
use super::node::Node;
use super::route;
use crate::filters::{adaptive_concurrency, admission_control, health_check, local_ratelimit};
use crate::listener::chain;
use crate::listener::config::{
    Codec, HcmConfig, HcmStats, Http2Settings, HttpFilter, ListenerConfig, NetworkFilter, ServerHeader,
    Underscores,
};
use crate::listener::path::{EscapedSlashes, PathNormalization};
use crate::listener::tcp_proxy::{TcpProxyConfig, TcpProxyStats};
use crate::server::ClusterIds;
use crate::stats::Store;
use crate::upstream::lb::Rng;
use arc_swap::ArcSwap;
use http::HeaderValue;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

const HCM: &str = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ORIGINAL_DST_FILTER: &str = "envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
const TLS_INSPECTOR: &str = "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
const TCP_PROXY: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const ROUTER: &str = "envoy.extensions.filters.http.router.v3.Router";
const ADAPTIVE_CONCURRENCY: &str =
    "envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency";
const ADMISSION_CONTROL: &str = "envoy.extensions.filters.http.admission_control.v3.AdmissionControl";
const DYNAMIC_FORWARD_PROXY: &str = "envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig";
const HEALTH_CHECK: &str = "envoy.extensions.filters.http.health_check.v3.HealthCheck";
pub(crate) const LOCAL_RATELIMIT: &str = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// What lowering a listener needs from the rest of the bootstrap.
pub struct Ctx<'a> {
    pub ids: &'a ClusterIds,
    /// Where the connection manager's stat handles are created.
    pub store: &'a Arc<Store>,
    /// The access log files.
    pub logs: &'a crate::access_log::Manager,
    /// Static clusters, for `validate_clusters` of inline route tables.
    pub static_clusters: &'a HashSet<String>,
    /// Where a connection manager with `rds` finds its route table.
    pub rds: &'a crate::xds::RdsRegistry,
    /// What an `rds.config_source` may name; `None` checks nothing (resources validated on their own).
    pub sources: Option<&'a crate::xds::SourceCheck>,
}

pub fn lower(l: &Node, ctx: &Ctx) -> Option<ListenerConfig> {
    let address = match l.msg("address") {
        Some(a) => socket_address(&a)?,
        None => {
            l.err("address", "a listener needs an address");
            return None;
        }
    };
    let name = l
        .string("name")
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| address.to_string());
    let stat_scope = match l.string("stat_prefix").filter(|s| !s.is_empty()) {
        Some(p) => format!("listener.{p}."),
        None => format!(
            "listener.{}.",
            address.to_string().replace(':', "_").replace(['[', ']'], "")
        ),
    };
    let buffer_limit = l
        .wrapped_u32("per_connection_buffer_limit_bytes")
        .unwrap_or(1024 * 1024);
    // Informational: used by tracing and by access-log fields Remora does not have.
    l.mark("traffic_direction");
    let mut original_dst = false;
    let mut tls_inspector = false;
    for lf in l.list("listener_filters") {
        lf.mark("name");
        lf.unsupported("filter_disabled");
        lf.unsupported("config_discovery");
        match lf.any("typed_config") {
            Some(t) if t.type_name() == ORIGINAL_DST_FILTER => original_dst = true,
            Some(t) if t.type_name() == TLS_INSPECTOR => {
                tls_inspector = true;
                t.unsupported("enable_ja3_fingerprinting");
                t.unsupported("enable_ja4_fingerprinting");
                t.unsupported("initial_read_buffer_size");
            }
            Some(t) => {
                t.err_here(format!(
                    "listener filter {} is not supported by Remora",
                    t.type_name()
                ));
                t.mark_all();
            }
            None => lf.err("typed_config", "a listener filter needs its typed_config"),
        }
    }
    let use_original_dst = l.wrapped_bool("use_original_dst").unwrap_or(false);
    let bind_to_port = l.wrapped_bool("bind_to_port").unwrap_or(true);
    l.unsupported("filter_chain_matcher");
    l.unsupported("socket_options");
    l.unsupported("transparent");
    l.unsupported("freebind");
    l.unsupported("enable_reuse_port");
    l.unsupported("access_log");
    l.unsupported("connection_balance_config");
    l.unsupported("additional_addresses");
    // Envoy's default is 15 s; 0 disables the timeout.
    let listener_filters_timeout = match l.duration("listener_filters_timeout") {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => Some(Duration::from_secs(15)),
    };
    l.unsupported("continue_on_listener_filters_timeout");
    l.unsupported("udp_listener_config");
    l.unsupported("api_listener");
    l.unsupported("internal_listener");
    l.unsupported("drain_type");
    l.unsupported("tcp_backlog_size");
    // Envoy accepts every pending connection per socket event unless this is set (its proto requires > 0).
    let max_accepts_per_event = l
        .wrapped_u32("max_connections_to_accept_per_socket_event")
        .and_then(|n| {
            let n = std::num::NonZeroU32::new(n);
            if n.is_none() {
                l.err(
                    "max_connections_to_accept_per_socket_event",
                    "must be greater than 0",
                );
            }
            n
        });

    let ignore_global_conn_limit = l.bool("ignore_global_conn_limit");
    // Overload actions are refused (`overload_manager.actions`), so there is nothing for a listener to bypass.
    l.mark("bypass_overload_manager");

    let nodes = l.list("filter_chains");
    let default_node = l.msg("default_filter_chain");
    if nodes.is_empty() && default_node.is_none() {
        l.err("filter_chains", "a listener needs at least one filter chain");
    }
    let mut chains = Vec::new();
    let mut ok = true;
    for (i, c) in nodes.iter().enumerate() {
        match lower_chain(c, ctx, &stat_scope, format!("filter_chains[{i}]")) {
            Some(chain) => chains.push(chain),
            None => ok = false,
        }
    }
    let default = match &default_node {
        Some(d) => {
            if d.has("filter_chain_match") {
                d.err("filter_chain_match", "the default filter chain has no match");
            }
            let chain = lower_chain(d, ctx, &stat_scope, "default_filter_chain".to_string());
            ok &= chain.is_some();
            chain
        }
        None => None,
    };
    if !ok {
        return None;
    }
    if !tls_inspector {
        for (i, c) in chains.iter().enumerate() {
            let m = &c.matcher;
            let needs = if !m.server_names.is_empty() {
                Some("server_names")
            } else if !m.application_protocols.is_empty() {
                Some("application_protocols")
            } else if m.transport_protocol.as_deref() == Some("tls") {
                Some("transport_protocol")
            } else {
                None
            };
            if let Some(field) = needs {
                l.err(
                    &format!("filter_chains[{i}].filter_chain_match.{field}"),
                    "needs the envoy.filters.listener.tls_inspector listener filter to see the ClientHello",
                );
                return None;
            }
        }
    }
    let matchers: Vec<_> = chains.iter().map(|c| c.matcher.clone()).collect();
    if let Some((a, b)) = chain::find_duplicate(&matchers) {
        l.err(
            "filter_chains",
            format!(
                "filter chains {:?} and {:?} have the same matching rules for some connections \
                 (Envoy refuses such listeners too)",
                chains[a].name, chains[b].name
            ),
        );
        return None;
    }
    Some(ListenerConfig {
        name,
        address,
        stat_scope,
        chains: chain::FilterChains { chains, default },
        buffer_limit,
        original_dst,
        tls_inspector,
        listener_filters_timeout,
        use_original_dst,
        bind_to_port,
        max_accepts_per_event,
        ignore_global_conn_limit,
    })
}

/// A filter chain: its match and its one network filter (an HTTP connection manager or a TCP proxy).
fn lower_chain(
    chain: &Node,
    ctx: &Ctx,
    stat_scope: &str,
    fallback_name: String,
) -> Option<chain::FilterChain> {
    let matcher = match chain.msg("filter_chain_match") {
        Some(m) => lower_chain_match(&m),
        None => chain::ChainMatch::default(),
    };
    // Lowered whole even when the filter fails, so that every error of the chain is reported.
    let tls: Option<Option<Arc<crate::tls::ServerTls>>> = match chain.msg("transport_socket") {
        Some(ts) => match super::tls::transport_socket(&ts, super::tls::DOWNSTREAM) {
            Some(d) => super::tls::lower_downstream(&d).and_then(|spec| {
                let stats = crate::tls::SslStats::new(&ctx.store.scope(stat_scope.to_string()));
                match crate::tls::ServerTls::new(spec, stats) {
                    Ok(t) => Some(Some(t)),
                    Err(e) => {
                        d.err_here(e);
                        None
                    }
                }
            }),
            None => Some(None),
        },
        None => Some(None),
    };
    let handshake_timeout = chain
        .duration("transport_socket_connect_timeout")
        .filter(|d| !d.is_zero())
        .unwrap_or(chain::DEFAULT_HANDSHAKE_TIMEOUT);
    chain.unsupported("metadata");
    chain.unsupported("use_proxy_proto");
    let name = chain
        .string("name")
        .filter(|n| !n.is_empty())
        .unwrap_or(fallback_name);
    let filters = chain.list("filters");
    if filters.len() != 1 {
        chain.err(
            "filters",
            format!(
                "exactly one network filter (an HTTP connection manager or a TCP proxy) is supported, found {}",
                filters.len()
            ),
        );
    }
    let f = filters.first()?;
    f.mark("name");
    f.unsupported("config_discovery");
    let Some(typed) = f.any("typed_config") else {
        f.err("typed_config", "needs the network filter's typed_config");
        return None;
    };
    let filter = match typed.type_name().as_str() {
        HCM => NetworkFilter::Http(Arc::new(lower_hcm(&typed, ctx, stat_scope)?)),
        TCP_PROXY => NetworkFilter::Tcp(Arc::new(lower_tcp_proxy(&typed, ctx)?)),
        other => {
            typed.err_here(format!("network filter {other} is not supported by Remora"));
            typed.mark_all();
            return None;
        }
    };
    Some(chain::FilterChain {
        name,
        matcher,
        filter,
        tls: tls?,
        handshake_timeout,
    })
}

fn lower_chain_match(m: &Node) -> chain::ChainMatch {
    let destination_port = m.wrapped_u32("destination_port").and_then(|p| {
        let port = u16::try_from(p).ok().filter(|&p| p != 0);
        if port.is_none() {
            m.err("destination_port", format!("{p} is not a port"));
        }
        port
    });
    let ranges = |field: &str| -> Vec<chain::CidrRange> {
        m.list(field)
            .iter()
            .filter_map(|r| {
                let addr = r.string("address_prefix").unwrap_or_default();
                let len = r.wrapped_u32("prefix_len").unwrap_or(0);
                let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
                    r.err("address_prefix", format!("{addr:?} is not an IP address"));
                    return None;
                };
                let range = u8::try_from(len).ok().and_then(|l| chain::CidrRange::new(ip, l));
                if range.is_none() {
                    r.err("prefix_len", format!("{len} is longer than {ip}'s address"));
                }
                range
            })
            .collect()
    };
    let prefix_ranges = ranges("prefix_ranges");
    let direct_source_prefix_ranges = ranges("direct_source_prefix_ranges");
    let source_prefix_ranges = ranges("source_prefix_ranges");
    let source_type = match m.enum_name("source_type").as_str() {
        "SAME_IP_OR_LOOPBACK" => chain::SourceType::Local,
        "EXTERNAL" => chain::SourceType::External,
        _ => chain::SourceType::Any,
    };
    let source_ports = m
        .u32s("source_ports")
        .into_iter()
        .filter_map(|p| {
            let port = u16::try_from(p).ok();
            if port.is_none() {
                m.err("source_ports", format!("{p} is not a port"));
            }
            port
        })
        .collect();
    let transport_protocol = match m.string("transport_protocol").unwrap_or_default().as_str() {
        "" => None,
        t @ ("raw_buffer" | "tls") => Some(t.to_string()),
        other => {
            m.err(
                "transport_protocol",
                format!("{other:?} is not supported by Remora (raw_buffer or tls)"),
            );
            None
        }
    };
    let server_names = m
        .strings("server_names")
        .into_iter()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    let application_protocols = m.strings("application_protocols");
    m.unsupported("address_suffix");
    m.unsupported("suffix_len");
    chain::ChainMatch {
        destination_port,
        prefix_ranges,
        server_names,
        transport_protocol,
        application_protocols,
        direct_source_prefix_ranges,
        source_type,
        source_prefix_ranges,
        source_ports,
    }
}

fn lower_hcm(h: &Node, ctx: &Ctx, listener_scope: &str) -> Option<HcmConfig> {
    let stat_prefix = h.string("stat_prefix").unwrap_or_default();
    if stat_prefix.is_empty() {
        h.err("stat_prefix", "is required");
    }
    let codec = match h.enum_name("codec_type").as_str() {
        "AUTO" => Codec::Auto,
        "HTTP1" => Codec::Http1,
        "HTTP2" => Codec::Http2,
        other => {
            h.err("codec_type", format!("{other} is not supported by Remora"));
            Codec::Auto
        }
    };
    let mut rds_name = None;
    let routes = match (h.msg("route_config"), h.msg("rds")) {
        (Some(rc), _) => route::lower_table(&rc, ctx.ids, Some(ctx.static_clusters), ctx.store)
            .map(|t| Arc::new(ArcSwap::from_pointee(t))),
        (None, Some(rds)) => {
            let name = rds.string("route_config_name").unwrap_or_default();
            if name.is_empty() {
                rds.err("route_config_name", "is required");
            }
            let source = match rds.msg("config_source") {
                Some(src) => crate::xds::lower_config_source(&src),
                None => {
                    rds.err("config_source", "is required");
                    None
                }
            };
            if let (Some(src), Some(check)) = (&source, ctx.sources) {
                if let Some((path, why)) = check.check(src) {
                    rds.err(&format!("config_source.{path}"), why);
                }
            }
            match source {
                Some(source) if !name.is_empty() => {
                    match ctx.rds.subscribe(&name, &stat_prefix, ctx.store, &source) {
                        Ok(table) => {
                            rds_name = Some(name.clone());
                            Some(table)
                        }
                        Err(e) => {
                            rds.err("config_source", e);
                            None
                        }
                    }
                }
                _ => None,
            }
        }
        (None, None) => {
            h.err_here("needs route_config or rds");
            None
        }
    };
    h.unsupported("scoped_routes");

    let http_scope = ctx.store.scope(format!("http.{stat_prefix}."));
    let filters = h.list("http_filters");
    if filters.is_empty() {
        h.err(
            "http_filters",
            "needs envoy.filters.http.router as its last filter",
        );
    }
    let mut http_filters = Vec::new();
    let mut dynamic_forward_proxy = false;
    let mut suppress_envoy_headers = false;
    for (i, f) in filters.iter().enumerate() {
        let name = f.string("name").unwrap_or_default();
        let ty = f.any("typed_config");
        f.unsupported("config_discovery");
        f.unsupported("is_optional");
        f.unsupported("disabled");
        // Envoy finds a filter by name when typed_config is absent.
        let type_name = match &ty {
            Some(t) => t.type_name(),
            None => match name.as_str() {
                "envoy.filters.http.router" | "envoy.router" => ROUTER.to_string(),
                other => {
                    f.err(
                        "typed_config",
                        format!("HTTP filter {other:?} needs a typed_config"),
                    );
                    continue;
                }
            },
        };
        let last = i + 1 == filters.len();
        if type_name == ROUTER {
            if !last {
                f.err_here("the router must be the last HTTP filter");
            }
            // Router options other than suppress_envoy_headers (upstream_log, ...) are refused field by field.
            if let Some(t) = &ty {
                suppress_envoy_headers = t.bool("suppress_envoy_headers");
            }
            continue;
        }
        if last {
            f.err_here("the last HTTP filter must be envoy.filters.http.router");
        }
        let Some(t) = &ty else { continue };
        let now = tokio::time::Instant::now();
        match type_name.as_str() {
            ADAPTIVE_CONCURRENCY => {
                if let Some(cfg) = adaptive_concurrency::lower(t) {
                    let c =
                        adaptive_concurrency::Controller::new(&cfg, &http_scope, now, Rng::from_entropy());
                    http_filters.push(HttpFilter::AdaptiveConcurrency(c));
                }
            }
            ADMISSION_CONTROL => {
                if let Some(cfg) = admission_control::lower(t) {
                    http_filters.push(HttpFilter::AdmissionControl(
                        admission_control::AdmissionController::new(cfg, &http_scope),
                    ));
                }
            }
            HEALTH_CHECK => {
                if let Some(cfg) = health_check::lower(t) {
                    http_filters.push(HttpFilter::HealthCheck(Arc::new(cfg)));
                }
            }
            LOCAL_RATELIMIT => {
                if let Some(cfg) = local_ratelimit::lower(t, false) {
                    let l = local_ratelimit::LocalRateLimiter::new(&cfg, &ctx.store.scope(""), now);
                    http_filters.push(HttpFilter::LocalRateLimit(l));
                }
            }
            DYNAMIC_FORWARD_PROXY => {
                // The router resolves the authority through the dynamic forward proxy cluster's cache; the
                // filter's own cache settings must describe the same cache, as in Envoy.
                if let Some(d) = t.msg("dns_cache_config") {
                    let _ = super::cluster::lower_dns_cache(&d);
                } else {
                    t.err("dns_cache_config", "is required");
                }
                t.unsupported("sub_cluster_config");
                t.unsupported("save_upstream_address");
                t.unsupported("allow_dynamic_host_from_filter_state");
                dynamic_forward_proxy = true;
            }
            other => {
                t.err_here(format!("HTTP filter {other} is not supported by Remora"));
                t.mark_all();
            }
        }
    }

    let use_remote_address = h.wrapped_bool("use_remote_address").unwrap_or(false);
    let xff_num_trusted_hops = h.u32("xff_num_trusted_hops");
    let skip_xff_append = h.bool("skip_xff_append");
    let server_name = h
        .string("server_name")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "envoy".into());
    let server_name = HeaderValue::from_str(&server_name).unwrap_or_else(|_| {
        h.err("server_name", "is not a valid header value");
        HeaderValue::from_static("envoy")
    });
    let server_header = match h.enum_name("server_header_transformation").as_str() {
        "APPEND_IF_ABSENT" => ServerHeader::AppendIfAbsent,
        "PASS_THROUGH" => ServerHeader::PassThrough,
        _ => ServerHeader::Overwrite,
    };
    let generate_request_id = h.wrapped_bool("generate_request_id").unwrap_or(true);
    let preserve_external_request_id = h.bool("preserve_external_request_id");
    let always_set_request_id_in_response = h.bool("always_set_request_id_in_response");
    if always_set_request_id_in_response {
        h.err("always_set_request_id_in_response", "not supported by Remora");
    }
    let max_request_headers_kb = h.wrapped_u32("max_request_headers_kb").unwrap_or(60);
    if !(1..=8192).contains(&max_request_headers_kb) {
        h.err("max_request_headers_kb", "must be between 1 and 8192");
    }
    let mut max_headers_count = 100;
    let mut underscores = Underscores::Allow;
    let mut idle_timeout = Some(Duration::from_secs(3600));
    if let Some(c) = h.msg("common_http_protocol_options") {
        if let Some(d) = c.duration("idle_timeout") {
            idle_timeout = if d.is_zero() { None } else { Some(d) };
        }
        if let Some(n) = c.wrapped_u32("max_headers_count") {
            max_headers_count = n.max(1);
        }
        underscores = match c.enum_name("headers_with_underscores_action").as_str() {
            "REJECT_REQUEST" => Underscores::Reject,
            "DROP_HEADER" => Underscores::Drop,
            _ => Underscores::Allow,
        };
        c.unsupported("max_connection_duration");
        c.unsupported("max_stream_duration");
        c.unsupported("max_requests_per_connection");
        c.unsupported("max_response_headers_kb");
    }
    // Empty protocol options are Envoy's defaults, which is what Remora's codecs do; set fields are refused.
    if let Some(p) = h.msg("http_protocol_options") {
        let _ = p;
    }
    let http2 = h
        .msg("http2_protocol_options")
        .map(|p| lower_http2(&p))
        .unwrap_or_default();
    let request_timeout = nonzero(h.duration("request_timeout"));
    let request_headers_timeout = nonzero(h.duration("request_headers_timeout"));
    let stream_idle_timeout = match h.duration("stream_idle_timeout") {
        Some(d) => nonzero(Some(d)),
        None => Some(Duration::from_secs(300)),
    };

    let drain_timeout = h.duration("drain_timeout").unwrap_or(Duration::from_secs(5));

    // Envoy's defaults (its runtime keys unset): no normalization, slashes kept, escaped slashes kept.
    let path = PathNormalization {
        normalize: h.wrapped_bool("normalize_path").unwrap_or(false),
        merge_slashes: h.bool("merge_slashes"),
        escaped_slashes: match h.enum_name("path_with_escaped_slashes_action").as_str() {
            "REJECT_REQUEST" => EscapedSlashes::Reject,
            "UNESCAPE_AND_REDIRECT" => EscapedSlashes::UnescapeAndRedirect,
            "UNESCAPE_AND_FORWARD" => EscapedSlashes::UnescapeAndForward,
            _ => EscapedSlashes::Keep,
        },
    };

    let upgrade_nodes = h.list("upgrade_configs");
    let connect = upgrade_nodes.iter().any(|u| {
        u.string("upgrade_type")
            .is_some_and(|t| t.eq_ignore_ascii_case("CONNECT"))
            && u.wrapped_bool("enabled") != Some(false)
    });
    let upgrades = route::lower_upgrades(&upgrade_nodes, true);
    let routes = routes?;
    let lscope = ctx.store.scope(format!("{listener_scope}http.{stat_prefix}."));
    let access_logs = crate::access_log::lower(&h.list("access_log"), ctx.logs);
    Some(HcmConfig {
        stats: HcmStats::new(&http_scope, &lscope),
        stat_prefix,
        codec,
        routes,
        rds_name,
        use_remote_address,
        xff_num_trusted_hops,
        skip_xff_append,
        server_name,
        server_header,
        generate_request_id,
        preserve_external_request_id,
        always_set_request_id_in_response,
        max_request_headers_kb,
        max_headers_count,
        underscores,
        request_timeout,
        request_headers_timeout,
        stream_idle_timeout,
        idle_timeout,
        drain_timeout,
        filters: http_filters,
        dynamic_forward_proxy,
        suppress_envoy_headers,
        http2,
        path,
        connect,
        upgrades,
        access_logs,
    })
}

/// The connection manager's `http2_protocol_options` (`envoy.config.core.v3.Http2ProtocolOptions`), with
/// Envoy's ranges: `max_concurrent_streams` 1 to 2^31-1, the window sizes 65535 (HTTP/2's initial window)
/// to 2^31-1. Other fields are refused.
fn lower_http2(p: &Node) -> Http2Settings {
    const MAX: u32 = (1 << 31) - 1;
    let ranged = |field: &str, min: u32| {
        let v = p.wrapped_u32(field)?;
        if (min..=MAX).contains(&v) {
            Some(v)
        } else {
            p.err(field, format!("{v} is out of range ({min} to {MAX})"));
            None
        }
    };
    let mut s = Http2Settings::default();
    if let Some(n) = ranged("max_concurrent_streams", 1) {
        s.max_concurrent_streams = n;
    }
    s.initial_stream_window_size = ranged("initial_stream_window_size", 65535);
    s.initial_connection_window_size = ranged("initial_connection_window_size", 65535);
    s
}

fn nonzero(d: Option<Duration>) -> Option<Duration> {
    d.filter(|d| !d.is_zero())
}

/// `envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy`.
fn lower_tcp_proxy(t: &Node, ctx: &Ctx) -> Option<TcpProxyConfig> {
    let stat_prefix = t.string("stat_prefix").unwrap_or_default();
    if stat_prefix.is_empty() {
        t.err("stat_prefix", "is required");
    }
    let mut clusters = Vec::new();
    if let Some(name) = t.string("cluster").filter(|c| !c.is_empty()) {
        clusters.push((ctx.ids.id(&name), name, 1));
    } else if let Some(w) = t.msg("weighted_clusters") {
        for c in w.list("clusters") {
            let name = c.string("name").unwrap_or_default();
            if name.is_empty() {
                c.err("name", "is required");
            }
            let weight = c.u32("weight");
            if weight == 0 {
                c.err("weight", "must be at least 1");
            }
            c.unsupported("metadata_match");
            clusters.push((ctx.ids.id(&name), name, weight));
        }
        if clusters.is_empty() {
            w.err("clusters", "needs at least one cluster");
        }
    } else {
        t.err_here("needs cluster or weighted_clusters");
    }
    let total_weight = clusters.iter().map(|c| c.2).sum();
    let idle_timeout = match t.duration("idle_timeout") {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => Some(Duration::from_secs(3600)),
    };
    let max_connect_attempts = t.wrapped_u32("max_connect_attempts").unwrap_or(1);
    if max_connect_attempts == 0 {
        t.err("max_connect_attempts", "must be at least 1");
    }
    for f in [
        "on_demand",
        "metadata_match",
        "downstream_idle_timeout",
        "upstream_idle_timeout",
        "access_log",
        "access_log_options",
        "access_log_flush_interval",
        "flush_access_log_on_connected",
        "hash_policy",
        "tunneling_config",
        "max_downstream_connection_duration",
        "max_downstream_connection_duration_jitter_percentage",
        "backoff_options",
        "proxy_protocol_tlvs",
        "upstream_connect_mode",
        "max_early_data_bytes",
    ] {
        t.unsupported(f);
    }
    Some(TcpProxyConfig {
        stats: TcpProxyStats::new(&ctx.store.scope(format!("tcp.{stat_prefix}."))),
        stat_prefix,
        clusters,
        total_weight,
        idle_timeout,
        max_connect_attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::node::Errors;
    use crate::filters::test_util::msg;

    /// Lower a listener whose one connection manager has `hcm` (YAML lines at the connection manager's
    /// indentation; a plain router unless it has `http_filters`) over a route table to the static cluster `c`,
    /// with `listener` extra listener fields.
    pub(crate) fn lower_yaml(listener: &str, hcm: &str) -> (Option<ListenerConfig>, Vec<String>) {
        let router = format!(
            "http_filters: [{{name: router, typed_config: {{\"@type\": type.googleapis.com/{ROUTER}}}}}]"
        );
        let mut hcm = if hcm.contains("http_filters") {
            hcm.to_string()
        } else {
            format!("{hcm}\n{router}")
        };
        if !hcm.contains("route_config") {
            hcm.push_str(
                "\nroute_config:\n  virtual_hosts: [{name: all, domains: [\"*\"], \
                 routes: [{match: {prefix: /}, route: {cluster: c}}]}]",
            );
        }
        let indent = |s: &str, n: usize| -> String {
            s.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| format!("{}{l}\n", " ".repeat(n)))
                .collect()
        };
        let yaml = format!(
            r#"
name: l
address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
{listener}
filter_chains:
- filters:
  - name: hcm
    typed_config:
      "@type": type.googleapis.com/{HCM}
      stat_prefix: in
{hcm}"#,
            listener = indent(listener, 0),
            hcm = indent(&hcm, 6)
        );
        let m = msg("envoy.config.listener.v3.Listener", &yaml);
        let errs = Errors::default();
        let ids = ClusterIds::default();
        let store = Store::new();
        let logs = crate::access_log::Manager::new(&store.scope(""), Duration::from_secs(1)).expect("logs");
        let rds = crate::xds::RdsRegistry::default();
        let static_clusters: HashSet<String> = ["c".to_string()].into();
        let ctx = Ctx {
            ids: &ids,
            store: &store,
            logs: &logs,
            static_clusters: &static_clusters,
            rds: &rds,
            sources: None,
        };
        let out = lower(&Node::root(&m, "listener", &errs), &ctx);
        (out, errs.take().iter().map(|e| e.to_string()).collect())
    }

    pub(crate) fn hcm_of(l: &ListenerConfig) -> &HcmConfig {
        l.hcms().next().expect("an hcm")
    }

    #[test]
    fn router_suppress_envoy_headers() {
        let router = |extra: &str| {
            format!(
                "http_filters:\n- name: envoy.filters.http.router\n  typed_config:\n    \"@type\": type.googleapis.com/{ROUTER}\n{extra}"
            )
        };
        let (l, errs) = lower_yaml("", &router(""));
        assert_eq!(errs, Vec::<String>::new());
        assert!(!hcm_of(&l.expect("lowered")).suppress_envoy_headers);
        let (l, errs) = lower_yaml("", &router("    suppress_envoy_headers: true\n"));
        assert_eq!(errs, Vec::<String>::new());
        assert!(hcm_of(&l.expect("lowered")).suppress_envoy_headers);
        // Other router options are still refused by name.
        let (_, errs) = lower_yaml("", &router("    respect_expected_rq_timeout: true\n"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("respect_expected_rq_timeout"), "{errs:?}");
    }

    #[test]
    fn http2_protocol_options_in_envoys_ranges() {
        let (l, errs) = lower_yaml(
            "",
            "http2_protocol_options: {max_concurrent_streams: 100, initial_stream_window_size: 65536, \
             initial_connection_window_size: 1048576}",
        );
        assert_eq!(errs, Vec::<String>::new());
        let h2 = hcm_of(&l.expect("lowered")).http2;
        assert_eq!(
            h2,
            Http2Settings {
                max_concurrent_streams: 100,
                initial_stream_window_size: Some(65536),
                initial_connection_window_size: Some(1048576),
            }
        );
        let (l, _) = lower_yaml("", "http2_protocol_options: {}");
        assert_eq!(hcm_of(&l.expect("lowered")).http2, Http2Settings::default());
        assert_eq!(Http2Settings::default().max_concurrent_streams, 2147483647);

        for (field, value) in [
            ("max_concurrent_streams", 0u64),
            ("max_concurrent_streams", 2147483648),
            ("initial_stream_window_size", 65534),
            ("initial_connection_window_size", 2147483648),
        ] {
            let (_, errs) = lower_yaml("", &format!("http2_protocol_options: {{{field}: {value}}}"));
            assert_eq!(errs.len(), 1, "{field} {value}: {errs:?}");
            assert!(
                errs[0].contains(field) && errs[0].contains("out of range"),
                "{errs:?}"
            );
        }
        // Fields Remora does not apply are refused by name.
        let (_, errs) = lower_yaml("", "http2_protocol_options: {allow_connect: true}");
        assert!(errs.len() == 1 && errs[0].contains("allow_connect"), "{errs:?}");
    }

    #[test]
    fn path_options_with_envoys_defaults() {
        let (l, errs) = lower_yaml("", "");
        assert_eq!(errs, Vec::<String>::new());
        assert_eq!(hcm_of(&l.expect("lowered")).path, PathNormalization::default());
        let (l, errs) = lower_yaml(
            "",
            "normalize_path: true\nmerge_slashes: true\npath_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT",
        );
        assert_eq!(errs, Vec::<String>::new());
        assert_eq!(
            hcm_of(&l.expect("lowered")).path,
            PathNormalization {
                normalize: true,
                merge_slashes: true,
                escaped_slashes: EscapedSlashes::UnescapeAndRedirect,
            }
        );
        for (name, want) in [
            ("IMPLEMENTATION_SPECIFIC_DEFAULT", EscapedSlashes::Keep),
            ("KEEP_UNCHANGED", EscapedSlashes::Keep),
            ("REJECT_REQUEST", EscapedSlashes::Reject),
            ("UNESCAPE_AND_FORWARD", EscapedSlashes::UnescapeAndForward),
        ] {
            let (l, _) = lower_yaml("", &format!("path_with_escaped_slashes_action: {name}"));
            assert_eq!(hcm_of(&l.expect("lowered")).path.escaped_slashes, want, "{name}");
        }
    }

    #[test]
    fn max_connections_to_accept_per_socket_event() {
        let (l, errs) = lower_yaml("", "");
        assert_eq!(errs, Vec::<String>::new());
        assert_eq!(l.expect("lowered").max_accepts_per_event, None);
        let (l, errs) = lower_yaml("max_connections_to_accept_per_socket_event: 1", "");
        assert_eq!(errs, Vec::<String>::new());
        assert_eq!(
            l.expect("lowered").max_accepts_per_event.map(|n| n.get()),
            Some(1)
        );
        let (_, errs) = lower_yaml("max_connections_to_accept_per_socket_event: 0", "");
        assert!(
            errs.len() == 1 && errs[0].contains("max_connections_to_accept_per_socket_event"),
            "{errs:?}"
        );
    }

    #[test]
    fn upgrade_configs_of_the_connection_manager_and_the_route() {
        let (l, errs) = lower_yaml(
            "",
            "upgrade_configs: [{upgrade_type: WebSocket}, {upgrade_type: CONNECT}, \
             {upgrade_type: h2c, enabled: false}]",
        );
        assert_eq!(errs, Vec::<String>::new());
        let l = l.expect("lowered");
        let h = hcm_of(&l);
        assert!(h.connect);
        assert_eq!(
            h.upgrades,
            [("websocket".to_string(), true), ("h2c".to_string(), false)]
        );

        let route = |upgrades: &str| {
            format!(
                "route_config:\n  virtual_hosts: [{{name: all, domains: [\"*\"], routes: [{{match: {{prefix: /}}, \
                 route: {{cluster: c, upgrade_configs: {upgrades}}}}}]}}]"
            )
        };
        let (l, errs) = lower_yaml("", &route("[{upgrade_type: websocket, enabled: false}]"));
        assert_eq!(errs, Vec::<String>::new());
        let table = hcm_of(&l.expect("lowered")).routes.load_full();
        match &table.virtual_hosts[0].routes[0].action {
            crate::route::Action::Forward(a) => assert_eq!(a.upgrades, [("websocket".to_string(), false)]),
            _ => panic!("a forwarding route"),
        }
        // CONNECT per route (with its connect_config) and a type given twice are refused by path.
        let (_, errs) = lower_yaml("", &route("[{upgrade_type: CONNECT}]"));
        assert!(
            errs.len() == 1 && errs[0].contains("upgrade_configs[0].upgrade_type"),
            "{errs:?}"
        );
        let (_, errs) = lower_yaml(
            "",
            &route("[{upgrade_type: websocket}, {upgrade_type: WEBSOCKET}]"),
        );
        assert!(errs.len() == 1 && errs[0].contains("twice"), "{errs:?}");
        let (_, errs) = lower_yaml(
            "",
            "upgrade_configs: [{upgrade_type: websocket, filters: [{name: x}]}]",
        );
        assert!(errs.iter().any(|e| e.contains("filters")), "{errs:?}");
    }
}
