//! Lowering `envoy.config.cluster.v3.Cluster`.

use super::bootstrap::{host_port, socket_address};
use super::node::Node;
use crate::upstream::dns::{self, DnsConfig, Family};
use crate::upstream::{
    ClusterConfig, Discovery, EndpointConfig, EndpointHealth, LbPolicy, Locality, Protocol,
};
use std::net::SocketAddr;
use std::time::Duration;

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

pub fn lower(c: &Node) -> Option<ClusterConfig> {
    let name = c.string("name").unwrap_or_default();
    if name.is_empty() {
        c.err("name", "a cluster needs a name");
    }
    let stat_name = c
        .string("alt_stat_name")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| name.clone());
    let ty = if c.has("cluster_type") {
        String::new()
    } else {
        c.enum_name("type")
    };
    let discovery = match ty.as_str() {
        "" => lower_cluster_type(c),
        "STATIC" => Discovery::Static,
        "ORIGINAL_DST" => lower_original_dst(c),
        "EDS" => {
            let (service_name, source) = match c.msg("eds_cluster_config") {
                Some(e) => {
                    let source = match e.msg("eds_config") {
                        Some(src) => crate::xds::lower_config_source(&src),
                        None => {
                            e.err("eds_config", "an EDS cluster needs eds_config");
                            None
                        }
                    };
                    (e.string("service_name").filter(|s| !s.is_empty()), source)
                }
                None => {
                    c.err("eds_cluster_config", "an EDS cluster needs eds_cluster_config");
                    (None, None)
                }
            };
            Discovery::Eds {
                service_name: service_name.unwrap_or_else(|| name.clone()),
                // Without a source the cluster is refused (the error is recorded above).
                source: source.unwrap_or(crate::xds::SourceConfig {
                    source: crate::xds::Source::Ads,
                    initial_fetch_timeout: None,
                }),
            }
        }
        // DNS settings and targets are filled in below.
        "STRICT_DNS" | "LOGICAL_DNS" => Discovery::Static,
        other => {
            c.err("type", format!("{other} is not supported by Remora"));
            Discovery::Static
        }
    };
    let dns = matches!(ty.as_str(), "STRICT_DNS" | "LOGICAL_DNS");
    let provided = matches!(
        discovery,
        Discovery::DynamicForwardProxy(_) | Discovery::OriginalDst(_)
    );
    if ty != "ORIGINAL_DST" {
        c.unsupported("original_dst_lb_config");
    }
    let aggregate = matches!(discovery, Discovery::Aggregate(_));
    if aggregate && c.has("load_assignment") {
        c.err(
            "load_assignment",
            "an aggregate cluster's hosts are its clusters'; it takes no load_assignment",
        );
    }
    if provided && c.has("load_assignment") {
        c.err(
            "load_assignment",
            "this cluster's hosts come from requests; it takes no load_assignment",
        );
    }
    if !matches!(discovery, Discovery::Eds { .. }) {
        c.unsupported("eds_cluster_config");
    }
    let dns_settings = if dns { Some(lower_dns(c)) } else { None };
    if !dns {
        // Address families and resolvers only matter to DNS clusters, as in Envoy.
        c.mark("dns_lookup_family");
        c.mark("dns_refresh_rate");
        c.mark("respect_dns_ttl");
    }
    let connect_timeout = c.duration("connect_timeout").unwrap_or(Duration::from_secs(5));
    let lb = c.enum_name("lb_policy");
    let lb_policy = match lb.as_str() {
        // Envoy: "cluster provided LB not specified but cluster provided one".
        other if aggregate && other != "CLUSTER_PROVIDED" => {
            c.err(
                "lb_policy",
                format!("an aggregate cluster provides its load balancer: lb_policy must be CLUSTER_PROVIDED, not {other}"),
            );
            LbPolicy::RoundRobin
        }
        "ROUND_ROBIN" => LbPolicy::RoundRobin,
        // The cluster picks the host itself (the request's authority or original destination).
        "CLUSTER_PROVIDED" if provided || aggregate => LbPolicy::RoundRobin,
        "RANDOM" => LbPolicy::Random,
        "LEAST_REQUEST" => {
            let (choice_count, active_request_bias) = c
                .msg("least_request_lb_config")
                .map(|l| {
                    let n = l.wrapped_u32("choice_count").unwrap_or(2);
                    if n < 2 {
                        l.err("choice_count", "must be at least 2");
                    }
                    let bias = super::lb::lower_active_request_bias(&l);
                    l.unsupported("slow_start_config");
                    l.unsupported("locality_lb_config");
                    l.unsupported("enable_full_scan");
                    l.unsupported("selection_method");
                    (n, bias)
                })
                .unwrap_or((2, None));
            LbPolicy::LeastRequest {
                choice_count,
                active_request_bias,
            }
        }
        "RING_HASH" => LbPolicy::RingHash(
            c.msg("ring_hash_lb_config")
                .map(|r| super::lb::lower_ring_hash(&r))
                .unwrap_or_default(),
        ),
        "MAGLEV" => LbPolicy::Maglev {
            table_size: c
                .msg("maglev_lb_config")
                .map(|m| super::lb::lower_maglev(&m))
                .unwrap_or(crate::upstream::hash::MAGLEV_DEFAULT_TABLE_SIZE),
        },
        other => {
            c.err("lb_policy", format!("{other} is not supported by Remora"));
            LbPolicy::RoundRobin
        }
    };
    if lb != "LEAST_REQUEST" {
        c.unsupported("least_request_lb_config");
    }
    if lb != "RING_HASH" {
        c.unsupported("ring_hash_lb_config");
    }
    if lb != "MAGLEV" {
        c.unsupported("maglev_lb_config");
    }
    // `load_balancing_policy` (the typed form Envoy Gateway emits) replaces `lb_policy`, as in Envoy.
    let (lb_policy, policy_locality) = match c
        .msg("load_balancing_policy")
        .map(|p| super::lb::lower_load_balancing_policy(&p))
    {
        Some(Some(choice)) => (choice.kind, choice.locality),
        _ => (lb_policy, None),
    };
    let buffer_limit = c
        .wrapped_u32("per_connection_buffer_limit_bytes")
        .unwrap_or(1024 * 1024);

    // Upstream protocol: the typed extension options, or the deprecated cluster-level fields.
    let mut protocol = Protocol::Http1;
    let mut idle_timeout = Some(Duration::from_secs(3600));
    let mut max_requests_per_connection = None;
    let mut http2 = crate::upstream::Http2Options::default();
    let (mut auto_sni, mut auto_san_validation) = (false, false);
    for (key, opt) in c.map("typed_extension_protocol_options") {
        let Some(inner) = opt.unpack() else { continue };
        if inner.type_name() != HTTP_PROTOCOL_OPTIONS {
            inner.err_here(format!("{key}: {} is not supported by Remora", inner.type_name()));
            continue;
        }
        if let Some(e) = inner.msg("explicit_http_config") {
            if let Some(h1) = e.msg("http_protocol_options") {
                lower_http1_options(&h1);
                protocol = Protocol::Http1;
            }
            if let Some(h2) = e.msg("http2_protocol_options") {
                lower_http2_options(&h2, &mut http2);
                protocol = Protocol::Http2;
            }
            e.unsupported("http3_protocol_options");
        }
        if let Some(d) = inner.msg("use_downstream_protocol_config") {
            if let Some(h1) = d.msg("http_protocol_options") {
                lower_http1_options(&h1);
            }
            if let Some(h2) = d.msg("http2_protocol_options") {
                lower_http2_options(&h2, &mut http2);
            }
            d.unsupported("http3_protocol_options");
            protocol = Protocol::Downstream;
        }
        inner.unsupported("auto_config");
        if let Some(common) = inner.msg("common_http_protocol_options") {
            lower_common_options(&common, &mut idle_timeout, &mut max_requests_per_connection);
        }
        if let Some(u) = inner.msg("upstream_http_protocol_options") {
            auto_sni = u.bool("auto_sni");
            auto_san_validation = u.bool("auto_san_validation");
            u.unsupported("override_auto_sni_header");
        }
        inner.unsupported("http_filters");
        inner.unsupported("header_validation_config");
        inner.unsupported("outlier_detection");
    }
    if let Some(h2) = c.msg("http2_protocol_options") {
        lower_http2_options(&h2, &mut http2);
        protocol = Protocol::Http2;
    }
    if let Some(h1) = c.msg("http_protocol_options") {
        lower_http1_options(&h1);
    }
    if let Some(common) = c.msg("common_http_protocol_options") {
        lower_common_options(&common, &mut idle_timeout, &mut max_requests_per_connection);
    }
    // The deprecated cluster-level field, which the protocol options' one replaces.
    if c.has("max_requests_per_connection") {
        if max_requests_per_connection.is_some() {
            // As Envoy's `ClusterInfoImpl`.
            c.err(
                "max_requests_per_connection",
                "Only one of max_requests_per_connection from Cluster or HttpProtocolOptions can be specified",
            );
        }
        max_requests_per_connection = c.wrapped_u32("max_requests_per_connection");
    }
    // 0 is no limit, as unset.
    let max_requests_per_connection = max_requests_per_connection.filter(|&n| n > 0);
    let pf = c.enum_name("protocol_selection");
    if pf == "USE_DOWNSTREAM_PROTOCOL" {
        protocol = Protocol::Downstream;
    }

    let default_factor = crate::upstream::priority::DEFAULT_OVERPROVISIONING_FACTOR;
    let (endpoints, targets, overprovisioning_factor) = match c.msg("load_assignment") {
        Some(la) => {
            let (endpoints, targets) = lower_endpoints(&la, dns);
            let factor = la
                .msg("policy")
                .map_or(default_factor, |p| super::lb::lower_endpoint_policy(&p));
            (endpoints, targets, factor)
        }
        None => (Vec::new(), Vec::new(), default_factor),
    };
    let discovery = match dns_settings {
        Some(mut d) => {
            if ty == "LOGICAL_DNS" {
                d.logical = true;
                if targets.len() != 1 {
                    c.err(
                        "load_assignment",
                        "a LOGICAL_DNS cluster takes exactly one endpoint",
                    );
                }
            }
            d.targets = targets;
            Discovery::Dns(std::sync::Arc::new(d))
        }
        None => discovery,
    };
    let circuit_breakers = c
        .msg("circuit_breakers")
        .map(|b| super::resilience::lower_circuit_breakers(&b))
        .unwrap_or_default();
    let outlier = c
        .msg("outlier_detection")
        .and_then(|o| super::resilience::lower_outlier_detection(&o));
    let checks = c.list("health_checks");
    if checks.len() > 1 {
        // As Envoy: "Multiple health checks not supported".
        c.err("health_checks", "multiple health checks are not supported");
    }
    let health_check = checks
        .first()
        .and_then(super::lb::lower_health_check)
        .map(std::sync::Arc::new);
    if let Some(crate::upstream::health_check::CheckKind::Grpc(g)) = health_check.as_ref().map(|h| &h.kind) {
        // The check's :authority defaults to the cluster name, which must then be one (Remora's h2 client
        // cannot send another; Envoy sends it as it is).
        if g.authority.is_empty() && name.parse::<http::uri::Authority>().is_err() {
            c.err(
                "health_checks",
                format!("the gRPC check's authority defaults to the cluster name, and {name:?} is not an authority: set grpc_health_check.authority"),
            );
        }
    }
    let tls = match c.msg("transport_socket") {
        Some(ts) => match super::tls::transport_socket(&ts, super::tls::UPSTREAM) {
            Some(u) => {
                let mut spec = super::tls::lower_upstream(&u, auto_sni, auto_san_validation)?;
                if spec.alpn.is_empty() {
                    // ALPN follows the cluster's protocol, as Envoy sets it.
                    spec.alpn = match protocol {
                        Protocol::Http2 => vec![b"h2".to_vec()],
                        Protocol::Http1 => vec![b"http/1.1".to_vec()],
                        Protocol::Downstream => Vec::new(),
                    };
                }
                // Built once here so that a context rustls refuses is a config error with its path.
                let probe = crate::tls::SslStats::new(&crate::stats::Store::new().scope(String::new()));
                if let Err(e) = crate::tls::ClientTls::new(spec.clone(), probe) {
                    u.err_here(e);
                    return None;
                }
                Some(spec)
            }
            None => None,
        },
        None => None,
    };
    let common_lb = c
        .msg("common_lb_config")
        .map(|n| super::lb::lower_common_lb_config(&n))
        .unwrap_or_default();
    // The typed policy's locality setting wins over common_lb_config's, as in Envoy.
    let locality_lb = policy_locality.or(common_lb.locality);

    Some(ClusterConfig {
        name,
        stat_name,
        discovery,
        connect_timeout,
        lb_policy,
        protocol,
        idle_timeout,
        max_requests_per_connection,
        http2,
        endpoints,
        buffer_limit,
        circuit_breakers,
        outlier,
        overprovisioning_factor,
        healthy_panic_threshold: common_lb.healthy_panic_threshold,
        ignore_new_hosts_until_first_hc: common_lb.ignore_new_hosts_until_first_hc,
        locality_lb,
        health_check,
        ignore_health_on_host_removal: c.bool("ignore_health_on_host_removal"),
        tls,
    })
}

/// `envoy.config.endpoint.v3.ClusterLoadAssignment`: a cluster's `load_assignment`, or an EDS resource.
pub fn lower_load_assignment(la: &Node) -> Vec<EndpointConfig> {
    // An EDS update cannot change the cluster's overprovisioning factor yet: only the default is accepted.
    if let Some(p) = la.msg("policy") {
        if super::lb::lower_endpoint_policy(&p) != crate::upstream::priority::DEFAULT_OVERPROVISIONING_FACTOR
        {
            p.err(
                "overprovisioning_factor",
                "only the default (140) is supported in EDS by Remora",
            );
        }
    }
    lower_endpoints(la, false).0
}

/// A load assignment's endpoints; for a DNS cluster, the names to resolve instead.
fn lower_endpoints(la: &Node, dns: bool) -> (Vec<EndpointConfig>, Vec<dns::Target>) {
    let mut endpoints = Vec::new();
    let mut targets = Vec::new();
    la.mark("cluster_name");
    for (li, lle) in la.list("endpoints").iter().enumerate() {
        let _ = li;
        let locality = lle
            .msg("locality")
            .map(|l| Locality {
                region: l.string("region").unwrap_or_default(),
                zone: l.string("zone").unwrap_or_default(),
                sub_zone: l.string("sub_zone").unwrap_or_default(),
            })
            .unwrap_or_default();
        let priority = lle.u32("priority");
        // Locality weights only act with locality-weighted balancing, which Envoy turns on separately.
        let locality_weight = lle.wrapped_u32("load_balancing_weight").unwrap_or(0);
        lle.unsupported("load_balancer_endpoints");
        lle.unsupported("leds_cluster_locality_config");
        lle.unsupported("proximity");
        for ep in lle.list("lb_endpoints") {
            let weight = ep.wrapped_u32("load_balancing_weight").unwrap_or(1);
            if weight == 0 {
                ep.err("load_balancing_weight", "must be at least 1");
            }
            let health = match ep.enum_name("health_status").as_str() {
                "HEALTHY" => EndpointHealth::Healthy,
                "UNHEALTHY" => EndpointHealth::Unhealthy,
                "DRAINING" => EndpointHealth::Draining,
                "TIMEOUT" => EndpointHealth::Timeout,
                "DEGRADED" => EndpointHealth::Degraded,
                _ => EndpointHealth::Unknown,
            };
            ep.unsupported("metadata");
            ep.unsupported("endpoint_name");
            let Some(e) = ep.msg("endpoint") else {
                ep.err_here("needs an endpoint");
                continue;
            };
            let hostname = e.string("hostname").unwrap_or_default();
            let (health_check_port, health_check_disabled, health_check_hostname) =
                match e.msg("health_check_config") {
                    Some(h) => {
                        h.unsupported("address");
                        let port = h.u32("port_value");
                        if port > u32::from(u16::MAX) {
                            h.err("port_value", format!("{port} is not a port"));
                        }
                        let port = u16::try_from(port).ok().filter(|&p| p != 0);
                        let hostname = h.string("hostname").unwrap_or_default();
                        if !hostname.is_empty() && hostname.parse::<http::uri::Authority>().is_err() {
                            h.err("hostname", format!("{hostname:?} is not a host name"));
                        }
                        (port, h.bool("disable_active_health_check"), hostname)
                    }
                    None => (None, false, String::new()),
                };
            e.unsupported("additional_addresses");
            let Some(addr) = e.msg("address") else {
                e.err("address", "an endpoint needs an address");
                continue;
            };
            if dns {
                if let Some((name, port)) = host_port(&addr) {
                    let template = EndpointConfig {
                        address: SocketAddr::from(([0, 0, 0, 0], port)),
                        hostname,
                        weight,
                        priority,
                        locality: locality.clone(),
                        locality_weight,
                        health,
                        health_check_port,
                        health_check_disabled,
                        health_check_hostname: health_check_hostname.clone(),
                    };
                    targets.push(dns::Target { name, port, template });
                }
            } else if let Some(address) = socket_address(&addr) {
                endpoints.push(EndpointConfig {
                    address,
                    hostname,
                    weight,
                    priority,
                    locality: locality.clone(),
                    locality_weight,
                    health,
                    health_check_port,
                    health_check_disabled,
                    health_check_hostname: health_check_hostname.clone(),
                });
            }
        }
    }
    la.unsupported("named_endpoints");
    (endpoints, targets)
}

fn lower_http1_options(h: &Node) {
    // Every field of Http1ProtocolOptions changes codec behaviour Remora does not offer yet.
    let _ = h;
}

/// The flow-control windows of `Http2ProtocolOptions`; its other fields are refused until wired.
fn lower_http2_options(h: &Node, out: &mut crate::upstream::Http2Options) {
    // Envoy's validation: from the HTTP/2 default (65535) to the HTTP/2 maximum (2^31 - 1).
    let window = |field: &str| {
        let v = h.wrapped_u32(field)?;
        if !(65_535..=2_147_483_647).contains(&v) {
            h.err(
                field,
                format!("value must be inside range [65535, 2147483647], not {v}"),
            );
            return None;
        }
        Some(v)
    };
    if let Some(w) = window("initial_stream_window_size") {
        out.initial_stream_window_size = Some(w);
    }
    if let Some(w) = window("initial_connection_window_size") {
        out.initial_connection_window_size = Some(w);
    }
    if let Some(k) = h.msg("connection_keepalive") {
        let timeout = k.duration("timeout").unwrap_or_default();
        if timeout < Duration::from_millis(1) {
            k.err("timeout", "must be at least 1ms");
        }
        // Envoy spreads the pings by `interval_jitter` (15 % by default); hyper sends them on the interval.
        k.mark("interval_jitter");
        k.unsupported("connection_idle_interval");
        // Without an interval Envoy sends no periodic ping.
        if let Some(interval) = k.duration("interval").filter(|d| !d.is_zero()) {
            out.keepalive = Some(crate::upstream::Http2Keepalive { interval, timeout });
        }
    }
}

fn lower_common_options(c: &Node, idle: &mut Option<Duration>, max_rq: &mut Option<u32>) {
    if let Some(d) = c.duration("idle_timeout") {
        *idle = if d.is_zero() { None } else { Some(d) };
    }
    if c.has("max_requests_per_connection") {
        *max_rq = c.wrapped_u32("max_requests_per_connection");
    }
    c.unsupported("max_connection_duration");
    c.unsupported("max_headers_count");
    c.unsupported("max_stream_duration");
    c.unsupported("headers_with_underscores_action");
    c.unsupported("max_response_headers_kb");
}

/// The DNS settings of a `STRICT_DNS` or `LOGICAL_DNS` cluster (targets are filled in by the caller).
fn lower_dns(c: &Node) -> DnsConfig {
    let family = lower_family(c);
    let refresh = c.duration("dns_refresh_rate").unwrap_or(Duration::from_secs(5));
    if refresh < Duration::from_millis(1) {
        c.err("dns_refresh_rate", "must be at least 1ms");
    }
    let failure_refresh = c.msg("dns_failure_refresh_rate").map(|f| {
        let base = f.duration("base_interval").unwrap_or(Duration::from_secs(5));
        let max = f.duration("max_interval").unwrap_or(base * 10);
        if max < base {
            f.err("max_interval", "must be at least base_interval");
        }
        (base, max.max(base))
    });
    let respect_ttl = c.bool("respect_dns_ttl");
    let (resolvers, use_tcp) = lower_resolvers(c);
    c.unsupported("use_tcp_for_dns_lookups");
    c.unsupported("dns_jitter");
    c.unsupported("wait_for_warm_on_init");
    DnsConfig {
        logical: false,
        targets: Vec::new(),
        refresh,
        failure_refresh,
        respect_ttl,
        family,
        resolvers,
        use_tcp,
    }
}

/// Name servers from `dns_resolvers`, `dns_resolution_config` or `typed_dns_resolver_config` (clusters and
/// `DnsCacheConfig` spell them the same), and whether to ask over TCP.
fn lower_resolvers(c: &Node) -> (Vec<SocketAddr>, bool) {
    let mut resolvers = Vec::new();
    let mut use_tcp = false;
    // A cluster's own field; `DnsCacheConfig` has none.
    if prost_reflect::ReflectMessage::descriptor(c.message())
        .get_field_by_name("dns_resolvers")
        .is_some()
    {
        for a in c.list("dns_resolvers") {
            if let Some(sa) = socket_address(&a) {
                resolvers.push(sa);
            }
        }
    }
    if let Some(rc) = c.msg("dns_resolution_config") {
        for a in rc.list("resolvers") {
            if let Some(sa) = socket_address(&a) {
                resolvers.push(sa);
            }
        }
        if let Some(o) = rc.msg("dns_resolver_options") {
            use_tcp = o.bool("use_tcp_for_dns_lookups");
            o.unsupported("no_default_search_domain");
        }
    }
    if let Some(t) = c.msg("typed_dns_resolver_config") {
        t.mark("name");
        if let Some(cfg) = t.any("typed_config") {
            match cfg.type_name().as_str() {
                "envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig" => {
                    for a in cfg.list("resolvers") {
                        if let Some(sa) = socket_address(&a) {
                            resolvers.push(sa);
                        }
                    }
                    if let Some(o) = cfg.msg("dns_resolver_options") {
                        use_tcp = o.bool("use_tcp_for_dns_lookups");
                        o.unsupported("no_default_search_domain");
                    }
                    cfg.unsupported("use_resolvers_as_fallback");
                    cfg.unsupported("filter_unroutable_families");
                    cfg.unsupported("udp_max_queries");
                    cfg.unsupported("query_timeout_seconds");
                    cfg.unsupported("query_tries");
                    cfg.unsupported("rotate_nameservers");
                    cfg.unsupported("edns0_max_payload_size");
                    cfg.unsupported("max_udp_channel_duration");
                }
                "envoy.extensions.network.dns_resolver.getaddrinfo.v3.GetAddrInfoDnsResolverConfig" => {
                    // The system's resolver configuration, which is what an empty resolver list means.
                    cfg.unsupported("num_retries");
                    cfg.unsupported("num_resolver_threads");
                }
                other => {
                    cfg.err_here(format!("DNS resolver {other} is not supported by Remora"));
                    cfg.mark_all();
                }
            }
        }
    }
    (resolvers, use_tcp)
}

fn lower_family(c: &Node) -> Family {
    match c.enum_name("dns_lookup_family").as_str() {
        "V4_ONLY" => Family::V4Only,
        "V6_ONLY" => Family::V6Only,
        "V4_PREFERRED" => Family::V4Preferred,
        "ALL" => Family::All,
        _ => Family::Auto,
    }
}

const DFP_CLUSTER: &str = "envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig";
const AGGREGATE_CLUSTER: &str = "envoy.extensions.clusters.aggregate.v3.ClusterConfig";

/// `cluster_type`: the extension clusters Remora runs, the dynamic forward proxy and the aggregate cluster.
fn lower_cluster_type(c: &Node) -> Discovery {
    let Some(ct) = c.msg("cluster_type") else {
        return Discovery::Static;
    };
    ct.mark("name");
    let Some(cfg) = ct.any("typed_config") else {
        ct.err("typed_config", "needs the cluster extension's typed_config");
        return Discovery::Static;
    };
    if cfg.type_name() == AGGREGATE_CLUSTER {
        let clusters = cfg.strings("clusters");
        if clusters.is_empty() {
            // As Envoy's validation: `clusters` needs at least one item.
            cfg.err("clusters", "an aggregate cluster needs at least one cluster");
        }
        let name = c.string("name").unwrap_or_default();
        if clusters.contains(&name) {
            cfg.err(
                "clusters",
                format!("the aggregate cluster {name} cannot include itself"),
            );
        }
        return Discovery::Aggregate(crate::upstream::aggregate::AggregateConfig { clusters });
    }
    if cfg.type_name() != DFP_CLUSTER {
        cfg.err_here(format!(
            "cluster type {} is not supported by Remora",
            cfg.type_name()
        ));
        cfg.mark_all();
        return Discovery::Static;
    }
    cfg.unsupported("sub_clusters_config");
    cfg.unsupported("allow_coalesced_connections");
    // Only relaxes checks on TLS options, which Remora's upstreams do not have.
    cfg.mark("allow_insecure_cluster_options");
    let lowered = cfg.msg("dns_cache_config").map(|d| lower_dns_cache(&d));
    match lowered {
        Some(d) => Discovery::DynamicForwardProxy(std::sync::Arc::new(d)),
        None => {
            cfg.err("dns_cache_config", "is required");
            Discovery::Static
        }
    }
}

/// `envoy.extensions.common.dynamic_forward_proxy.v3.DnsCacheConfig`.
pub fn lower_dns_cache(d: &Node) -> crate::upstream::dfp::DfpConfig {
    let name = d.string("name").unwrap_or_default();
    if name.is_empty() {
        d.err("name", "is required");
    }
    let refresh = d.duration("dns_refresh_rate").unwrap_or(Duration::from_secs(60));
    if refresh < Duration::from_millis(1) {
        d.err("dns_refresh_rate", "must be at least 1ms");
    }
    let host_ttl = d.duration("host_ttl").unwrap_or(Duration::from_secs(300));
    if host_ttl.is_zero() {
        d.err("host_ttl", "must be greater than 0");
    }
    let max_hosts = d.wrapped_u32("max_hosts").unwrap_or(1024);
    if max_hosts == 0 {
        d.err("max_hosts", "must be greater than 0");
    }
    let query_timeout = d.duration("dns_query_timeout").unwrap_or(Duration::from_secs(5));
    let (resolvers, use_tcp) = lower_resolvers(d);
    d.unsupported("dns_failure_refresh_rate");
    d.unsupported("dns_min_refresh_rate");
    d.unsupported("dns_cache_circuit_breaker");
    d.unsupported("use_tcp_for_dns_lookups");
    d.unsupported("preresolve_hostnames");
    d.unsupported("key_value_config");
    d.unsupported("disable_dns_refresh_on_failure");
    crate::upstream::dfp::DfpConfig {
        name,
        dns: DnsConfig {
            logical: true,
            targets: Vec::new(),
            refresh,
            failure_refresh: None,
            respect_ttl: false,
            family: lower_family(d),
            resolvers,
            use_tcp,
        },
        host_ttl,
        max_hosts,
        query_timeout,
    }
}

/// `ORIGINAL_DST` with `original_dst_lb_config`.
fn lower_original_dst(c: &Node) -> Discovery {
    let mut header = None;
    if let Some(o) = c.msg("original_dst_lb_config") {
        if o.bool("use_http_header") {
            let name = o
                .string("http_header_name")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "x-envoy-original-dst-host".to_string());
            match http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                Ok(h) => header = Some(h),
                Err(_) => o.err("http_header_name", "is not a valid header name"),
            }
        } else {
            o.mark("http_header_name");
        }
        o.unsupported("upstream_port_override");
        o.unsupported("metadata_key");
    }
    let cleanup_interval = c.duration("cleanup_interval").unwrap_or(Duration::from_secs(5));
    Discovery::OriginalDst(std::sync::Arc::new(crate::upstream::OriginalDstConfig {
        header,
        cleanup_interval,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::descriptors;
    use crate::config::load::{message_from_text, Format};
    use crate::config::node::Errors;

    /// Lower the cluster `yaml` (flow style); the config, and the error texts.
    fn cluster(yaml: &str) -> (Option<ClusterConfig>, Vec<String>) {
        let desc = descriptors::message("envoy.config.cluster.v3.Cluster").unwrap();
        let m = message_from_text(yaml, Format::Yaml, &desc).unwrap();
        let errs = Errors::default();
        let out = {
            let n = Node::root(&m, "c", &errs);
            lower(&n)
        };
        (out, errs.take().iter().map(|e| e.to_string()).collect())
    }

    fn with_options(options: &str) -> String {
        format!(
            "{{name: a, typed_extension_protocol_options: {{envoy.extensions.upstreams.http.v3.HttpProtocolOptions: \
             {{'@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, {options}}}}}}}"
        )
    }

    #[test]
    fn max_requests_per_connection_from_either_field() {
        let (c, e) = cluster(&with_options(
            "common_http_protocol_options: {max_requests_per_connection: 10}, \
             explicit_http_config: {http_protocol_options: {}}",
        ));
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(c.unwrap().max_requests_per_connection, Some(10));
        let (c, e) = cluster("{name: a, max_requests_per_connection: 3}");
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(c.unwrap().max_requests_per_connection, Some(3));
        // 0 is no limit, as unset.
        let (c, e) = cluster("{name: a, max_requests_per_connection: 0}");
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(c.unwrap().max_requests_per_connection, None);
        let (c, _) = cluster("{name: a}");
        assert_eq!(c.unwrap().max_requests_per_connection, None);
        // Both is refused, as Envoy does.
        let mut both = with_options("common_http_protocol_options: {max_requests_per_connection: 10}");
        both.insert_str(1, "max_requests_per_connection: 2, ");
        let (_, e) = cluster(&both);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("c.max_requests_per_connection: Only one of"),
            "{e:?}"
        );
    }

    #[test]
    fn a_grpc_check_needs_an_authority_when_the_cluster_name_is_not_one() {
        let check =
            "health_checks: [{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, \
                     grpc_health_check: {}}]";
        let (_, e) = cluster(&format!("{{name: svc, {check}}}"));
        assert!(e.is_empty(), "{e:?}");
        let (_, e) = cluster(&format!("{{name: 'outbound|80||svc', {check}}}"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("c.health_checks: the gRPC check's authority"),
            "{e:?}"
        );
    }

    #[test]
    fn http2_connection_keepalive() {
        let (c, e) = cluster(&with_options(
            "explicit_http_config: {http2_protocol_options: \
             {connection_keepalive: {interval: 30s, timeout: 5s}}}",
        ));
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            c.unwrap().http2.keepalive,
            Some(crate::upstream::Http2Keepalive {
                interval: Duration::from_secs(30),
                timeout: Duration::from_secs(5),
            })
        );
        // No interval: no periodic ping, as in Envoy.
        let (c, e) = cluster(&with_options(
            "explicit_http_config: {http2_protocol_options: {connection_keepalive: {timeout: 5s}}}",
        ));
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(c.unwrap().http2.keepalive, None);
        let (_, e) = cluster(&with_options(
            "explicit_http_config: {http2_protocol_options: \
             {connection_keepalive: {interval: 1s, timeout: 0s, connection_idle_interval: 1s}}}",
        ));
        assert_eq!(e.len(), 2, "{e:?}");
    }

    #[test]
    fn http2_flow_control_windows_within_envoys_range() {
        let (c, e) = cluster(&with_options(
            "explicit_http_config: {http2_protocol_options: \
             {initial_stream_window_size: 65536, initial_connection_window_size: 1048576}}",
        ));
        assert!(e.is_empty(), "{e:?}");
        let c = c.unwrap();
        assert_eq!(c.protocol, Protocol::Http2);
        assert_eq!(
            c.http2,
            crate::upstream::Http2Options {
                initial_stream_window_size: Some(65536),
                initial_connection_window_size: Some(1048576),
                keepalive: None,
            }
        );
        // Unset: hyper's defaults.
        let (c, _) = cluster(&with_options(
            "explicit_http_config: {http2_protocol_options: {}}",
        ));
        assert_eq!(c.unwrap().http2, Default::default());
        let (_, e) = cluster(
            "{name: a, http2_protocol_options: \
             {initial_stream_window_size: 65534, initial_connection_window_size: 2147483648}}",
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("c.http2_protocol_options.initial_stream_window_size: value must be inside range [65535, 2147483647]"), "{e:?}");
        assert!(
            e[1].starts_with("c.http2_protocol_options.initial_connection_window_size:"),
            "{e:?}"
        );
        // The other fields are still refused.
        let (_, e) = cluster("{name: a, http2_protocol_options: {max_concurrent_streams: 5}}");
        assert_eq!(
            e,
            ["c.http2_protocol_options.max_concurrent_streams: not supported by Remora"]
        );
    }
}
