//! Lowering a cluster's load-balancing settings: `common_lb_config`, `ring_hash_lb_config`, `maglev_lb_config`,
//! `load_balancing_policy` (the typed extensions Envoy Gateway emits), `health_checks`, the load assignment's
//! `policy`, and a route's `hash_policy`.
//!
//! Defaults and validation follow Envoy: `PROTOBUF_PERCENT_TO_ROUNDED_INTEGER_OR_DEFAULT` for percentages,
//! `ring_hash_lb.cc` (`minimum_ring_size` ≤ `maximum_ring_size` ≤ 8M), `maglev_lb.cc` (prime table size),
//! `HealthCheckerImplBase`'s interval defaults. Every field not read here is refused with its path by [`Node`].

use super::node::Node;
use crate::upstream::hash::{
    is_prime, HashFunction, HashMethod, HashPolicyEntry, RingHashConfig, MAGLEV_DEFAULT_TABLE_SIZE,
    MAGLEV_MAX_TABLE_SIZE,
};
use crate::upstream::health_check::{CheckKind, GrpcCheck, HealthCheckConfig, HttpCheck, TcpCheck};
use crate::upstream::priority::{DEFAULT_OVERPROVISIONING_FACTOR, DEFAULT_PANIC_THRESHOLD};
use crate::upstream::zone::ZoneAwareConfig;
use crate::upstream::LbPolicy;
use std::time::Duration;

/// How localities are used (`LocalityLbConfig` / `CommonLbConfig.locality_config_specifier`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalityLb {
    ZoneAware(ZoneAwareConfig),
    LocalityWeighted,
}

/// `common_lb_config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommonLb {
    /// `healthy_panic_threshold`, percent (default 50; 0 disables panic).
    pub healthy_panic_threshold: u32,
    /// `None`: zone-aware routing with its defaults (Envoy's behaviour when a local cluster is configured).
    pub locality: Option<LocalityLb>,
    pub ignore_new_hosts_until_first_hc: bool,
}

impl Default for CommonLb {
    fn default() -> Self {
        CommonLb {
            healthy_panic_threshold: DEFAULT_PANIC_THRESHOLD,
            locality: None,
            ignore_new_hosts_until_first_hc: false,
        }
    }
}

/// An `envoy.type.v3.Percent` as a rounded integer percentage.
fn percent_rounded(n: &Node, field: &str, default: u32) -> u32 {
    n.percent(field).map_or(default, |f| (f * 100.0).round() as u32)
}

fn zone_aware(z: &Node) -> ZoneAwareConfig {
    let d = ZoneAwareConfig::default();
    z.unsupported("force_locality_direct_routing");
    z.unsupported("locality_basis");
    ZoneAwareConfig {
        routing_enabled: percent_rounded(z, "routing_enabled", d.routing_enabled),
        min_cluster_size: z.wrapped_u64("min_cluster_size").unwrap_or(d.min_cluster_size),
        fail_traffic_on_panic: z.bool("fail_traffic_on_panic"),
    }
}

fn locality_weighted(l: &Node) -> LocalityLb {
    // `LocalityWeightedLbConfig` has no fields.
    let _ = l;
    LocalityLb::LocalityWeighted
}

/// `Cluster.common_lb_config`.
pub fn lower_common_lb_config(n: &Node) -> CommonLb {
    let mut out = CommonLb {
        healthy_panic_threshold: percent_rounded(n, "healthy_panic_threshold", DEFAULT_PANIC_THRESHOLD),
        ..Default::default()
    };
    if let Some(z) = n.msg("zone_aware_lb_config") {
        out.locality = Some(LocalityLb::ZoneAware(zone_aware(&z)));
    }
    if let Some(l) = n.msg("locality_weighted_lb_config") {
        out.locality = Some(locality_weighted(&l));
    }
    out.ignore_new_hosts_until_first_hc = n.bool("ignore_new_hosts_until_first_hc");
    for f in [
        "update_merge_window",
        "close_connections_on_host_set_change",
        "consistent_hashing_lb_config",
        "override_host_status",
    ] {
        n.unsupported(f);
    }
    out
}

/// `load_balancing_policies.common.v3.LocalityLbConfig` inside a typed policy.
fn lower_locality_lb_config(n: &Node) -> Option<LocalityLb> {
    if let Some(z) = n.msg("zone_aware_lb_config") {
        return Some(LocalityLb::ZoneAware(zone_aware(&z)));
    }
    n.msg("locality_weighted_lb_config")
        .map(|l| locality_weighted(&l))
}

/// `Cluster.ring_hash_lb_config` or the `ring_hash.v3.RingHash` policy's size and hash fields.
pub fn lower_ring_hash(n: &Node) -> RingHashConfig {
    let d = RingHashConfig::default();
    let min = n.wrapped_u64("minimum_ring_size").unwrap_or(d.minimum_ring_size);
    let max = n.wrapped_u64("maximum_ring_size").unwrap_or(d.maximum_ring_size);
    if max > d.maximum_ring_size {
        n.err(
            "maximum_ring_size",
            format!("{max} is above the limit {}", d.maximum_ring_size),
        );
    }
    if min > max {
        n.err(
            "minimum_ring_size",
            format!("ring hash: minimum_ring_size ({min}) > maximum_ring_size ({max})"),
        );
    }
    if min == 0 {
        n.err("minimum_ring_size", "must be at least 1");
    }
    let hash_function = match n.enum_name("hash_function").as_str() {
        "XX_HASH" | "DEFAULT_HASH" => HashFunction::XxHash,
        "MURMUR_HASH_2" => HashFunction::MurmurHash2,
        other => {
            n.err("hash_function", format!("{other} is not supported by Remora"));
            HashFunction::XxHash
        }
    };
    RingHashConfig {
        minimum_ring_size: min.max(1),
        maximum_ring_size: max.clamp(1, d.maximum_ring_size),
        hash_function,
    }
}

/// `Cluster.maglev_lb_config` or the `maglev.v3.Maglev` policy: the table size.
pub fn lower_maglev(n: &Node) -> u64 {
    let size = n.wrapped_u64("table_size").unwrap_or(MAGLEV_DEFAULT_TABLE_SIZE);
    if size > MAGLEV_MAX_TABLE_SIZE {
        n.err(
            "table_size",
            format!("{size} is above the limit {MAGLEV_MAX_TABLE_SIZE}"),
        );
        return MAGLEV_DEFAULT_TABLE_SIZE;
    }
    if !is_prime(size) {
        n.err("table_size", "The table size of maglev must be prime number");
        return MAGLEV_DEFAULT_TABLE_SIZE;
    }
    size
}

/// The policy from `load_balancing_policy`, with the locality setting its typed config carries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LbChoice {
    pub kind: LbPolicy,
    pub locality: Option<LocalityLb>,
}

const POLICY_PREFIX: &str = "envoy.extensions.load_balancing_policies.";

/// `Cluster.load_balancing_policy`: the first policy in the list that Remora implements, as Envoy takes the
/// first it supports; an error when none is.
pub fn lower_load_balancing_policy(n: &Node) -> Option<LbChoice> {
    let mut names = Vec::new();
    for p in n.list("policies") {
        let Some(tec) = p.msg("typed_extension_config") else {
            p.err(
                "typed_extension_config",
                "a policy needs a typed_extension_config",
            );
            continue;
        };
        tec.mark("name");
        // Peek at the type before unpacking, so that unknown policies further down do not error.
        let Some(cfg) = tec.any("typed_config") else {
            continue;
        };
        let ty = cfg.type_name();
        let Some(short) = ty.strip_prefix(POLICY_PREFIX) else {
            names.push(ty);
            cfg.mark_all();
            continue;
        };
        let choice = match short {
            "round_robin.v3.RoundRobin" => {
                cfg.unsupported("slow_start_config");
                LbChoice {
                    kind: LbPolicy::RoundRobin,
                    locality: cfg
                        .msg("locality_lb_config")
                        .and_then(|l| lower_locality_lb_config(&l)),
                }
            }
            "least_request.v3.LeastRequest" => {
                let choice_count = cfg.wrapped_u32("choice_count").unwrap_or(2);
                if choice_count < 2 {
                    cfg.err("choice_count", "must be at least 2");
                }
                let active_request_bias = lower_active_request_bias(&cfg);
                for f in ["slow_start_config", "enable_full_scan", "selection_method"] {
                    cfg.unsupported(f);
                }
                LbChoice {
                    kind: LbPolicy::LeastRequest {
                        choice_count,
                        active_request_bias,
                    },
                    locality: cfg
                        .msg("locality_lb_config")
                        .and_then(|l| lower_locality_lb_config(&l)),
                }
            }
            "random.v3.Random" => LbChoice {
                kind: LbPolicy::Random,
                locality: cfg
                    .msg("locality_lb_config")
                    .and_then(|l| lower_locality_lb_config(&l)),
            },
            "ring_hash.v3.RingHash" => {
                for f in [
                    "use_hostname_for_hashing",
                    "hash_balance_factor",
                    "consistent_hashing_lb_config",
                    "locality_weighted_lb_config",
                ] {
                    cfg.unsupported(f);
                }
                LbChoice {
                    kind: LbPolicy::RingHash(lower_ring_hash(&cfg)),
                    locality: None,
                }
            }
            "maglev.v3.Maglev" => {
                for f in ["consistent_hashing_lb_config", "locality_weighted_lb_config"] {
                    cfg.unsupported(f);
                }
                LbChoice {
                    kind: LbPolicy::Maglev {
                        table_size: lower_maglev(&cfg),
                    },
                    locality: None,
                }
            }
            _ => {
                names.push(ty);
                cfg.mark_all();
                continue;
            }
        };
        // Later entries are fallbacks Envoy would not use either.
        n.mark("policies");
        return Some(choice);
    }
    n.err(
        "policies",
        format!("no policy Remora supports (saw {})", names.join(", ")),
    );
    None
}

/// `active_request_bias` (a `RuntimeDouble`) of `least_request_lb_config` or the typed `LeastRequest` policy:
/// its `default_value` when set. Its `runtime_key` is not read from the layered runtime (a runtime key of that
/// name is logged as read by no Remora feature). A negative or NaN bias is 1.0, as Envoy's `LeastRequestLoadBalancer::refresh` does
/// (with a warning).
pub fn lower_active_request_bias(n: &Node) -> Option<f64> {
    let b = n.msg("active_request_bias")?;
    let key = b.string("runtime_key").unwrap_or_default();
    let v = b.f64("default_value");
    if v < 0.0 || v.is_nan() {
        tracing::warn!(runtime_key = %key, bias = v, "upstream: invalid active request bias supplied, using 1.0");
        return Some(1.0);
    }
    Some(v)
}

/// `ClusterLoadAssignment.policy`: the overprovisioning factor (percent, default 140).
pub fn lower_endpoint_policy(n: &Node) -> u32 {
    n.unsupported("drop_overloads");
    n.unsupported("endpoint_stale_after");
    n.unsupported("weighted_priority_health");
    let f = n
        .wrapped_u32("overprovisioning_factor")
        .unwrap_or(DEFAULT_OVERPROVISIONING_FACTOR);
    if f == 0 {
        n.err("overprovisioning_factor", "must be greater than 0");
        return DEFAULT_OVERPROVISIONING_FACTOR;
    }
    f
}

/// `core.v3.HealthCheck.Payload`: hex `text` or `binary`.
fn payload(p: &Node) -> Vec<u8> {
    if let Some(t) = p.string("text") {
        let t = t.trim();
        let bytes = t.as_bytes();
        if bytes.len() % 2 != 0 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            p.err("text", format!("{t:?} is not hex"));
            return Vec::new();
        }
        return bytes
            .chunks(2)
            .filter_map(|c| std::str::from_utf8(c).ok())
            .filter_map(|s| u8::from_str_radix(s, 16).ok())
            .collect();
    }
    p.bytes("binary").unwrap_or_default()
}

fn status_ranges(n: &Node, field: &str) -> Vec<std::ops::Range<u16>> {
    let mut out = Vec::new();
    for r in n.list(field) {
        let (start, end) = (r.i64("start"), r.i64("end"));
        if !(100..=600).contains(&start) || !(100..=600).contains(&end) || start >= end {
            r.err_here(format!("[{start}, {end}) is not a range of HTTP statuses"));
            continue;
        }
        out.push(start as u16..end as u16);
    }
    out
}

fn positive(n: &Node, field: &str) -> Option<Duration> {
    let d = n.duration(field)?;
    if d.is_zero() {
        n.err(field, "must be greater than 0");
        return None;
    }
    Some(Duration::from_millis(d.as_millis() as u64))
}

/// One `Cluster.health_checks` entry.
pub fn lower_health_check(n: &Node) -> Option<HealthCheckConfig> {
    let timeout = positive(n, "timeout");
    let interval = positive(n, "interval");
    if timeout.is_none() && !n.has("timeout") {
        n.err("timeout", "a health check needs a timeout");
    }
    if interval.is_none() && !n.has("interval") {
        n.err("interval", "a health check needs an interval");
    }
    let unhealthy_threshold = n.wrapped_u32("unhealthy_threshold");
    let healthy_threshold = n.wrapped_u32("healthy_threshold");
    if unhealthy_threshold.is_none() {
        n.err(
            "unhealthy_threshold",
            "a health check needs an unhealthy_threshold",
        );
    }
    if healthy_threshold.is_none() {
        n.err("healthy_threshold", "a health check needs a healthy_threshold");
    }
    for f in [
        "alt_port",
        "custom_health_check",
        "event_logger",
        "event_service",
        "always_log_health_check_success",
        "tls_options",
        "transport_socket_match_criteria",
    ] {
        n.unsupported(f);
    }
    let kind = if let Some(h) = n.msg("http_health_check") {
        let path = h.string("path").unwrap_or_default();
        if path.is_empty() {
            h.err("path", "an HTTP health check needs a path");
        }
        match h.enum_name("codec_client_type").as_str() {
            "HTTP1" => {}
            other => h.err("codec_client_type", format!("{other} is not supported by Remora")),
        }
        let method = match h.enum_name("method").as_str() {
            "METHOD_UNSPECIFIED" | "GET" => http::Method::GET,
            "HEAD" => http::Method::HEAD,
            "POST" => http::Method::POST,
            "PUT" => http::Method::PUT,
            "DELETE" => http::Method::DELETE,
            "OPTIONS" => http::Method::OPTIONS,
            "TRACE" => http::Method::TRACE,
            "PATCH" => http::Method::PATCH,
            other => {
                h.err("method", format!("{other} is not allowed for health checks"));
                http::Method::GET
            }
        };
        let mut expected = status_ranges(&h, "expected_statuses");
        if expected.is_empty() {
            expected.push(std::ops::Range { start: 200, end: 201 });
        }
        Some(CheckKind::Http(Box::new(HttpCheck {
            path,
            host: h.string("host").unwrap_or_default(),
            method,
            send: h.msg("send").map(|p| payload(&p).into()),
            receive: h.list("receive").iter().map(payload).collect(),
            response_buffer_size: h.wrapped_u64("response_buffer_size").unwrap_or(1024) as usize,
            expected_statuses: expected,
            retriable_statuses: status_ranges(&h, "retriable_statuses"),
            request_headers: super::route::header_mods(
                &h,
                "request_headers_to_add",
                "request_headers_to_remove",
            ),
            service_name_matcher: h
                .msg("service_name_matcher")
                .and_then(|m| super::route::string_matcher(&m)),
        })))
    } else if let Some(t) = n.msg("tcp_health_check") {
        t.unsupported("proxy_protocol_config");
        Some(CheckKind::Tcp(TcpCheck {
            send: t.msg("send").map(|p| payload(&p)).unwrap_or_default(),
            receive: t.list("receive").iter().map(payload).collect(),
        }))
    } else if let Some(g) = n.msg("grpc_health_check") {
        let authority = g.string("authority").unwrap_or_default();
        if !authority.is_empty() && authority.parse::<http::uri::Authority>().is_err() {
            g.err("authority", format!("{authority:?} is not an authority"));
        }
        g.unsupported("initial_metadata");
        Some(CheckKind::Grpc(GrpcCheck {
            service_name: g.string("service_name").unwrap_or_default(),
            authority,
        }))
    } else {
        if !n.has("custom_health_check") {
            n.err_here("a health check needs http_health_check, tcp_health_check or grpc_health_check");
        }
        None
    };
    let ms = |f: &str| {
        n.duration(f)
            .filter(|d| !d.is_zero())
            .map(|d| Duration::from_millis(d.as_millis() as u64))
    };
    let interval_v = interval.unwrap_or(Duration::from_secs(1));
    let unhealthy_interval = ms("unhealthy_interval").unwrap_or(interval_v);
    let no_traffic_interval = ms("no_traffic_interval").unwrap_or(Duration::from_secs(60));
    let pct = n.u32("interval_jitter_percent");
    let event_log_path = n
        .string("event_log_path")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from);
    Some(HealthCheckConfig {
        kind: kind?,
        timeout: timeout?,
        interval: interval?,
        initial_jitter: ms("initial_jitter").unwrap_or_default(),
        interval_jitter: ms("interval_jitter").unwrap_or_default(),
        interval_jitter_percent: pct,
        unhealthy_threshold: unhealthy_threshold?.max(1),
        healthy_threshold: healthy_threshold?.max(1),
        no_traffic_interval,
        no_traffic_healthy_interval: ms("no_traffic_healthy_interval").unwrap_or(no_traffic_interval),
        unhealthy_interval,
        unhealthy_edge_interval: ms("unhealthy_edge_interval").unwrap_or(unhealthy_interval),
        healthy_edge_interval: ms("healthy_edge_interval").unwrap_or(interval_v),
        reuse_connection: n.wrapped_bool("reuse_connection").unwrap_or(true),
        event_log_path,
        always_log_health_check_failures: n.bool("always_log_health_check_failures"),
    })
}

/// One `RouteAction.hash_policy` entry; `None` when it hashes nothing (`source_ip: false`) or is refused.
pub fn lower_hash_policy(n: &Node) -> Option<HashPolicyEntry> {
    let terminal = n.bool("terminal");
    n.unsupported("query_parameter");
    n.unsupported("filter_state");
    let method = if let Some(h) = n.msg("header") {
        h.unsupported("regex_rewrite");
        let name = h.string("header_name").unwrap_or_default().to_ascii_lowercase();
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(name) => HashMethod::Header(name),
            Err(_) => {
                h.err("header_name", format!("{name:?} is not a header name"));
                return None;
            }
        }
    } else if let Some(c) = n.msg("cookie") {
        if c.has("ttl") {
            c.mark("ttl");
            c.err("ttl", "generating cookies is not supported by Remora");
        }
        c.unsupported("attributes");
        // `path` only shapes a generated cookie; without `ttl` Envoy ignores it.
        c.mark("path");
        let name = c.string("name").unwrap_or_default();
        if name.is_empty() {
            c.err("name", "a cookie hash policy needs a name");
        }
        HashMethod::Cookie(name)
    } else if let Some(cp) = n.msg("connection_properties") {
        if !cp.bool("source_ip") {
            return None;
        }
        HashMethod::SourceIp
    } else {
        return None;
    };
    Some(HashPolicyEntry { method, terminal })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::descriptors;
    use crate::config::load::{message_from_text, Format};
    use crate::config::node::Errors;

    /// Lower `yaml` as message `ty` with `f`, returning the value and the errors as strings.
    fn lower<T>(ty: &str, yaml: &str, f: impl FnOnce(&Node) -> T) -> (T, Vec<String>) {
        let desc = descriptors::message(ty).unwrap();
        let m = message_from_text(yaml, Format::Yaml, &desc).unwrap();
        let errs = Errors::default();
        let v = {
            let n = Node::root(&m, "c", &errs);
            f(&n)
        };
        (v, errs.take().iter().map(|e| e.to_string()).collect())
    }

    const CLUSTER: &str = "envoy.config.cluster.v3.Cluster";

    fn common(yaml: &str) -> (CommonLb, Vec<String>) {
        lower(CLUSTER, yaml, |c| {
            c.mark_all();
            c.msg("common_lb_config")
                .map(|n| lower_common_lb_config(&n))
                .unwrap_or_default()
        })
    }

    #[test]
    fn common_lb_config_defaults_and_values() {
        let (c, e) = common("{common_lb_config: {}}");
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(c, CommonLb::default());
        let (c, e) = common(
            "{common_lb_config: {healthy_panic_threshold: {value: 33.6}, ignore_new_hosts_until_first_hc: true,
              zone_aware_lb_config: {routing_enabled: {value: 80}, min_cluster_size: 3, fail_traffic_on_panic: true}}}",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(c.healthy_panic_threshold, 34);
        assert!(c.ignore_new_hosts_until_first_hc);
        assert_eq!(
            c.locality,
            Some(LocalityLb::ZoneAware(ZoneAwareConfig {
                routing_enabled: 80,
                min_cluster_size: 3,
                fail_traffic_on_panic: true
            }))
        );
        let (c, _) = common("{common_lb_config: {locality_weighted_lb_config: {}}}");
        assert_eq!(c.locality, Some(LocalityLb::LocalityWeighted));
        let (_, e) = common("{common_lb_config: {update_merge_window: 1s, zone_aware_lb_config: {}}}");
        assert_eq!(
            e,
            ["c.common_lb_config.update_merge_window: not supported by Remora"]
        );
    }

    #[test]
    fn ring_hash_and_maglev_validation() {
        let (r, e) = lower(
            CLUSTER,
            "{ring_hash_lb_config: {minimum_ring_size: 64, hash_function: MURMUR_HASH_2}}",
            |c| lower_ring_hash(&c.msg("ring_hash_lb_config").unwrap()),
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(r.minimum_ring_size, 64);
        assert_eq!(r.hash_function, HashFunction::MurmurHash2);
        let (_, e) = lower(
            CLUSTER,
            "{ring_hash_lb_config: {minimum_ring_size: 2048, maximum_ring_size: 1024}}",
            |c| lower_ring_hash(&c.msg("ring_hash_lb_config").unwrap()),
        );
        assert_eq!(
            e,
            ["c.ring_hash_lb_config.minimum_ring_size: ring hash: minimum_ring_size (2048) > maximum_ring_size (1024)"]
        );
        let (t, e) = lower(CLUSTER, "{maglev_lb_config: {table_size: 65536}}", |c| {
            lower_maglev(&c.msg("maglev_lb_config").unwrap())
        });
        assert_eq!(t, MAGLEV_DEFAULT_TABLE_SIZE);
        assert_eq!(
            e,
            ["c.maglev_lb_config.table_size: The table size of maglev must be prime number"]
        );
    }

    /// The form Envoy Gateway emits (`envoy-corpus/xds-resources/*.clusters.yaml`).
    #[test]
    fn load_balancing_policy_typed_extensions() {
        let yaml = r#"
loadBalancingPolicy:
  policies:
  - typedExtensionConfig:
      name: envoy.load_balancing_policies.least_request
      typedConfig:
        '@type': type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest
        localityLbConfig:
          localityWeightedLbConfig: {}
"#;
        let (p, e) = lower(CLUSTER, yaml, |c| {
            lower_load_balancing_policy(&c.msg("load_balancing_policy").unwrap())
        });
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            p,
            Some(LbChoice {
                kind: LbPolicy::LeastRequest {
                    choice_count: 2,
                    active_request_bias: None,
                },
                locality: Some(LocalityLb::LocalityWeighted)
            })
        );
        let yaml = r#"
loadBalancingPolicy:
  policies:
  - typedExtensionConfig:
      name: m
      typedConfig:
        '@type': type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev
        tableSize: 7
"#;
        let (p, e) = lower(CLUSTER, yaml, |c| {
            lower_load_balancing_policy(&c.msg("load_balancing_policy").unwrap())
        });
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.unwrap().kind, LbPolicy::Maglev { table_size: 7 });
        let yaml = r#"
loadBalancingPolicy:
  policies:
  - typedExtensionConfig:
      name: lr
      typedConfig:
        '@type': type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest
        activeRequestBias: {defaultValue: 0.5, runtimeKey: k}
        selectionMethod: FULL_SCAN
"#;
        let (p, e) = lower(CLUSTER, yaml, |c| {
            lower_load_balancing_policy(&c.msg("load_balancing_policy").unwrap())
        });
        assert_eq!(
            p.unwrap().kind,
            LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: Some(0.5)
            }
        );
        assert_eq!(
            e,
            ["c.load_balancing_policy.policies[0].typed_extension_config.typed_config.selection_method: not supported by Remora"]
        );
        // A negative bias is 1.0, as in Envoy.
        let (p, e) = lower(CLUSTER, "{name: c, lb_policy: LEAST_REQUEST, least_request_lb_config: {active_request_bias: {default_value: -2, runtime_key: k}}}", |c| {
            super::super::cluster::lower(c).map(|c| c.lb_policy)
        });
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            p,
            Some(LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: Some(1.0)
            })
        );
    }

    /// `health-check.clusters.yaml` from the corpus: HTTP with POST, hex payloads and two status ranges.
    #[test]
    fn health_checks_from_the_corpus() {
        let yaml = r#"
healthChecks:
- healthyThreshold: 1
  httpHealthCheck:
    expectedStatuses:
    - end: "201"
      start: "200"
    - end: "301"
      start: "300"
    host: '*'
    method: POST
    path: /healthz
    receive:
    - text: 6f6b
    send:
      text: "70696e67"
  interval: 3s
  timeout: 0.500s
  unhealthyThreshold: 3
- healthyThreshold: 3
  interval: 5s
  tcpHealthCheck:
    receive:
    - binary: cG9uZw==
    send:
      text: "70696e67"
  timeout: 1s
  unhealthyThreshold: 3
  eventLogPath: /tmp/hc.log
"#;
        let (hcs, e) = lower(CLUSTER, yaml, |c| {
            c.list("health_checks")
                .iter()
                .map(lower_health_check)
                .collect::<Vec<_>>()
        });
        assert!(e.is_empty(), "{e:?}");
        let h = hcs[0].as_ref().unwrap();
        assert_eq!(h.timeout, Duration::from_millis(500));
        assert_eq!((h.healthy_threshold, h.unhealthy_threshold), (1, 3));
        assert_eq!(h.unhealthy_interval, Duration::from_secs(3));
        assert_eq!(h.no_traffic_interval, Duration::from_secs(60));
        let CheckKind::Http(http) = &h.kind else { panic!() };
        assert_eq!(http.method, http::Method::POST);
        assert_eq!(http.expected_statuses, [200..201, 300..301]);
        assert_eq!(http.send.as_deref(), Some(&b"ping"[..]));
        assert_eq!(http.receive, [b"ok".to_vec()]);
        let t = hcs[1].as_ref().unwrap();
        let CheckKind::Tcp(tcp) = &t.kind else { panic!() };
        assert_eq!(
            (tcp.send.as_slice(), tcp.receive[0].as_slice()),
            (&b"ping"[..], &b"pong"[..])
        );
        assert_eq!(
            t.event_log_path.as_deref(),
            Some(std::path::Path::new("/tmp/hc.log"))
        );
        // Envoy Gateway's gRPC check.
        let (g, e) = lower(
            CLUSTER,
            "{health_checks: [{timeout: 1s, interval: 5s, unhealthy_threshold: 3, healthy_threshold: 3, \
             grpc_health_check: {service_name: my-service, authority: hc.example}}]}",
            |c| {
                c.list("health_checks")
                    .iter()
                    .map(lower_health_check)
                    .collect::<Vec<_>>()
            },
        );
        assert!(e.is_empty(), "{e:?}");
        let Some(CheckKind::Grpc(grpc)) = g[0].as_ref().map(|h| &h.kind) else {
            panic!()
        };
        assert_eq!(
            (grpc.service_name.as_str(), grpc.authority.as_str()),
            ("my-service", "hc.example")
        );
        let (_, e) = lower(
            CLUSTER,
            "{health_checks: [{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, \
             grpc_health_check: {authority: 'a b', initial_metadata: [{header: {key: x, value: y}}]}}]}",
            |c| c.list("health_checks").iter().map(lower_health_check).count(),
        );
        assert_eq!(
            e,
            [
                "c.health_checks[0].grpc_health_check.authority: \"a b\" is not an authority",
                "c.health_checks[0].grpc_health_check.initial_metadata: not supported by Remora",
            ]
        );
    }

    #[test]
    fn hash_policies() {
        const ROUTE: &str = "envoy.config.route.v3.RouteAction";
        let (p, e) = lower(
            ROUTE,
            "{hash_policy: [{header: {header_name: X-User}, terminal: true}, {cookie: {name: s, path: /}}, {connection_properties: {source_ip: true}}]}",
            |r| r.list("hash_policy").iter().filter_map(lower_hash_policy).collect::<Vec<_>>(),
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            p,
            [
                HashPolicyEntry {
                    method: HashMethod::Header(http::HeaderName::from_static("x-user")),
                    terminal: true
                },
                HashPolicyEntry {
                    method: HashMethod::Cookie("s".into()),
                    terminal: false
                },
                HashPolicyEntry {
                    method: HashMethod::SourceIp,
                    terminal: false
                },
            ]
        );
        let (_, e) = lower(
            ROUTE,
            "{hash_policy: [{cookie: {name: s, ttl: 10s}}, {query_parameter: {name: q}}]}",
            |r| r.list("hash_policy").iter().filter_map(lower_hash_policy).count(),
        );
        assert_eq!(
            e,
            [
                "c.hash_policy[0].cookie.ttl: generating cookies is not supported by Remora",
                "c.hash_policy[1].query_parameter: not supported by Remora"
            ]
        );
    }
}
