//! `remora template SERVICE.yaml`: a complete Envoy bootstrap rendered from a short service manifest and the
//! platform defaults (`config/templates/defaults.yaml`, embedded).
//!
//! The manifest:
//!
//! ```yaml
//! service: orders          # node.cluster, stat and log names
//! port: 8080               # the local application's port (ingress routes to 127.0.0.1:8080)
//! zone: eu-west-1a         # node.locality.zone
//! protocol: http1          # optional: the application's own protocol (http1, h2, grpc); default http1
//! dependencies:
//! - host: payments.internal
//!   port: 80
//!   protocol: grpc         # http1, h2 or grpc
//!   name: payments         # optional: the cluster's name; default the host
//!   timeout: 2s            # optional: overrides dependency.timeout
//!   health_check: tcp      # optional: active health checks, a path (/healthz; http1 only) or tcp
//!   retries:               # optional: overrides any of dependency.retries
//!     num_retries: 3
//!     per_try_timeout: 500ms
//!     retry_on: connect-failure,reset
//! ```
//!
//! The bootstrap is in the shape of `config/examples/sidecar.yaml`: an ingress listener to the local app, an
//! egress listener with one STRICT_DNS cluster per dependency (retry budget, circuit breakers, outlier
//! detection, timeouts), a passthrough for everything undeclared, the admin.

use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The platform defaults, embedded.
pub const DEFAULTS_YAML: &str = include_str!("../../../config/templates/defaults.yaml");

/// The platform defaults (`config/templates/defaults.yaml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub admin_address: String,
    pub admin_port: u16,
    pub ingress_port: u16,
    pub ingress_timeout: String,
    pub local_connect_timeout: String,
    pub egress_address: String,
    pub egress_port: u16,
    pub dependency: DependencyDefaults,
    pub passthrough: PassthroughDefaults,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependencyDefaults {
    pub connect_timeout: String,
    pub dns_refresh_rate: String,
    pub timeout: String,
    pub retries: RetryDefaults,
    pub retry_budget: RetryBudget,
    pub circuit_breakers: CircuitBreakers,
    /// Copied as-is into each cluster's `outlier_detection` (Envoy's field names).
    pub outlier_detection: Map<String, Value>,
    pub health_check: HealthCheckDefaults,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckDefaults {
    pub timeout: String,
    pub interval: String,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl DependencyDefaults {
    fn bad(field: &str, v: &str) -> TemplateError {
        TemplateError {
            file: "config/templates/defaults.yaml".into(),
            line: None,
            message: format!("dependency.{field}: '{v}' is not a duration"),
        }
    }

    fn timeout_ms(&self) -> Result<u64, TemplateError> {
        millis(&self.timeout).ok_or_else(|| Self::bad("timeout", &self.timeout))
    }

    fn per_try_timeout_ms(&self) -> Result<u64, TemplateError> {
        let v = &self.retries.per_try_timeout;
        millis(v).ok_or_else(|| Self::bad("retries.per_try_timeout", v))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryDefaults {
    pub num_retries: u32,
    pub per_try_timeout: String,
    pub retry_on: String,
    pub grpc_retry_on: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    pub budget_percent: f64,
    pub min_retry_concurrency: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakers {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassthroughDefaults {
    pub connect_timeout: String,
    pub timeout: String,
    pub host_ttl: String,
}

impl Defaults {
    /// The embedded defaults.
    pub fn embedded() -> Result<Defaults, TemplateError> {
        serde_yaml::from_str(DEFAULTS_YAML).map_err(|e| TemplateError {
            file: "config/templates/defaults.yaml".into(),
            line: e.location().map(|l| l.line()),
            message: strip_location(&e.to_string()),
        })
    }
}

/// The service manifest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub service: String,
    pub port: u16,
    pub zone: String,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub dependencies: Vec<Dependency>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
    pub name: Option<String>,
    pub timeout: Option<String>,
    pub retries: Option<RetryOverride>,
    /// Active health checking: a path (`/healthz`, HTTP/1.1 dependencies) or `tcp` (connect only).
    pub health_check: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryOverride {
    pub num_retries: Option<u32>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http1,
    H2,
    Grpc,
}

/// A manifest error, with the line it is about when there is one.
#[derive(Debug, PartialEq, Eq)]
pub struct TemplateError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// serde_yaml appends " at line L column C"; the line is reported in front instead.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Renders the bootstrap for the manifest `text` (named `file` in errors) as YAML.
pub fn render(file: &str, text: &str) -> Result<String, TemplateError> {
    let defaults = Defaults::embedded()?;
    let bootstrap = render_value(file, text, &defaults)?;
    let yaml = serde_yaml::to_string(&bootstrap).map_err(|e| TemplateError {
        file: file.into(),
        line: None,
        message: format!("cannot write YAML: {e}"),
    })?;
    Ok(format!(
        "# Rendered by `remora template {file}` from the service manifest and the platform defaults\n\
         # (config/templates/defaults.yaml). Do not edit: change the manifest and render again.\n{yaml}"
    ))
}

/// Renders the bootstrap as a JSON value.
pub fn render_value(file: &str, text: &str, defaults: &Defaults) -> Result<Value, TemplateError> {
    let err = |line: Option<usize>, message: String| TemplateError {
        file: file.into(),
        line,
        message,
    };
    let manifest: Manifest = serde_yaml::from_str(text)
        .map_err(|e| err(e.location().map(|l| l.line()), strip_location(&e.to_string())))?;
    let lines = Lines::new(text);

    if !is_name(&manifest.service) {
        return Err(err(
            lines.key("service", None, 0),
            format!(
                "service '{}' is not a valid name (letters, digits, '-', '_', '.')",
                manifest.service
            ),
        ));
    }
    if manifest.zone.trim().is_empty() {
        return Err(err(lines.key("zone", None, 0), "zone is empty".into()));
    }
    let reserved = [
        (defaults.admin_port, "the admin port"),
        (defaults.ingress_port, "the sidecar's ingress port"),
        (defaults.egress_port, "the sidecar's egress port"),
    ];
    if manifest.port == 0 {
        return Err(err(
            lines.key("port", None, 0),
            "port 0 is not a port (1 to 65535)".into(),
        ));
    }
    if let Some((_, what)) = reserved.iter().find(|(p, _)| *p == manifest.port) {
        return Err(err(
            lines.key("port", None, 0),
            format!(
                "port {} is {what}: the application needs another one",
                manifest.port
            ),
        ));
    }

    let mut seen_names: HashMap<String, usize> = HashMap::new();
    let mut seen_hosts: HashMap<(String, u16), usize> = HashMap::new();
    let mut vhosts = Vec::new();
    let mut clusters = vec![local_app(&manifest, defaults)];
    for (i, dep) in manifest.dependencies.iter().enumerate() {
        let at = lines.item("dependencies", i);
        let name = dep.name.clone().unwrap_or_else(|| dep.host.clone());
        if !is_host(&dep.host) {
            return Err(err(
                at,
                format!("dependency host '{}' is not a DNS name", dep.host),
            ));
        }
        if !is_name(&name) {
            return Err(err(at, format!("dependency name '{name}' is not a valid name")));
        }
        if name == "local_app" || name == "passthrough" {
            return Err(err(
                at,
                format!("dependency name '{name}' is reserved by the template"),
            ));
        }
        if dep.port == 0 {
            return Err(err(
                lines.key_in_item("dependencies", i, "port").or(at),
                format!("dependency '{name}': port 0 is not a port (1 to 65535)"),
            ));
        }
        if let Some(first) = seen_names.insert(name.clone(), i) {
            return Err(err(
                at,
                format!(
                    "duplicate dependency '{name}' (first declared at line {})",
                    lines.item("dependencies", first).unwrap_or(0)
                ),
            ));
        }
        if let Some(first) = seen_hosts.insert((dep.host.clone(), dep.port), i) {
            return Err(err(
                at,
                format!(
                    "duplicate dependency {}:{} (first declared at line {})",
                    dep.host,
                    dep.port,
                    lines.item("dependencies", first).unwrap_or(0)
                ),
            ));
        }
        let timeout = match &dep.timeout {
            Some(t) => millis(t).ok_or_else(|| {
                err(
                    lines.key_in_item("dependencies", i, "timeout").or(at),
                    format!("dependency '{name}': timeout '{t}' is not a duration (like 2s or 250ms)"),
                )
            })?,
            None => defaults.dependency.timeout_ms()?,
        };
        let over = dep.retries.as_ref();
        let per_try = match over.and_then(|r| r.per_try_timeout.as_ref()) {
            Some(t) => millis(t).ok_or_else(|| {
                err(
                    lines.key_in_item("dependencies", i, "per_try_timeout").or(at),
                    format!(
                        "dependency '{name}': per_try_timeout '{t}' is not a duration (like 2s or 250ms)"
                    ),
                )
            })?,
            // The default never outlasts the whole request's timeout.
            None => defaults.dependency.per_try_timeout_ms()?.min(timeout),
        };
        if per_try > timeout {
            return Err(err(
                lines.key_in_item("dependencies", i, "per_try_timeout").or(at),
                format!(
                    "dependency '{name}': per_try_timeout {} is longer than the timeout {}",
                    format_ms(per_try),
                    format_ms(timeout)
                ),
            ));
        }
        let health = match dep.health_check.as_deref() {
            None => None,
            Some("tcp") => Some(json!({ "tcp_health_check": {} })),
            Some(path) if path.starts_with('/') && dep.protocol == Protocol::Http1 => {
                Some(json!({ "http_health_check": { "path": path } }))
            }
            Some(path) => {
                let why = if path.starts_with('/') {
                    "HTTP health checks are HTTP/1.1 only in Remora: use `tcp` for h2 and grpc dependencies"
                } else {
                    "is a path (/healthz) or `tcp`"
                };
                return Err(err(
                    lines.key_in_item("dependencies", i, "health_check").or(at),
                    format!("dependency '{name}': health_check '{path}': {why}"),
                ));
            }
        };
        let retry_on = match over.and_then(|r| r.retry_on.clone()) {
            Some(r) => r,
            None if dep.protocol == Protocol::Grpc => defaults.dependency.retries.grpc_retry_on.clone(),
            None => defaults.dependency.retries.retry_on.clone(),
        };
        let num_retries = over
            .and_then(|r| r.num_retries)
            .unwrap_or(defaults.dependency.retries.num_retries);
        let mut route = json!({ "cluster": name, "timeout": format_ms(timeout) });
        if num_retries > 0 {
            route["retry_policy"] = json!({
                "retry_on": retry_on,
                "num_retries": num_retries,
                "per_try_timeout": format_ms(per_try),
            });
        }
        vhosts.push(json!({
            "name": name,
            "domains": [dep.host, format!("{}:{}", dep.host, dep.port)],
            "routes": [{ "match": { "prefix": "/" }, "route": route }],
        }));
        let mut cluster = dependency_cluster(&name, dep, defaults);
        if let Some(kind) = health {
            let hc = &defaults.dependency.health_check;
            let mut check = json!({
                "timeout": hc.timeout,
                "interval": hc.interval,
                "unhealthy_threshold": hc.unhealthy_threshold,
                "healthy_threshold": hc.healthy_threshold,
            });
            if let (Some(c), Value::Object(k)) = (check.as_object_mut(), kind) {
                c.extend(k);
            }
            cluster["health_checks"] = json!([check]);
        }
        clusters.push(cluster);
    }
    let pt = &defaults.passthrough;
    vhosts.push(json!({
        "name": "passthrough",
        "domains": ["*"],
        "routes": [
            { "match": { "connect_matcher": {} }, "route": { "cluster": "passthrough" } },
            { "match": { "prefix": "/" }, "route": { "cluster": "passthrough", "timeout": pt.timeout } },
        ],
    }));
    let dns_cache = json!({
        "name": "passthrough",
        "dns_lookup_family": "V4_PREFERRED",
        "host_ttl": pt.host_ttl,
    });
    clusters.push(json!({
        "name": "passthrough",
        "connect_timeout": pt.connect_timeout,
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.dynamic_forward_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
                "dns_cache_config": dns_cache,
            },
        },
        "circuit_breakers": circuit_breakers(defaults),
        "outlier_detection": defaults.dependency.outlier_detection,
    }));

    let router = json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
    });
    let ingress = json!({
        "name": "ingress",
        "address": { "socket_address": { "address": "0.0.0.0", "port_value": defaults.ingress_port } },
        "filter_chains": [{ "filters": [hcm(json!({
            "stat_prefix": "ingress",
            "route_config": {
                "name": "ingress",
                "virtual_hosts": [{
                    "name": "local_app",
                    "domains": ["*"],
                    "routes": [{
                        "match": { "prefix": "/" },
                        "route": { "cluster": "local_app", "timeout": defaults.ingress_timeout },
                    }],
                }],
            },
            "http_filters": [router],
        }))] }],
    });
    let egress = json!({
        "name": "egress",
        "address": { "socket_address": { "address": defaults.egress_address, "port_value": defaults.egress_port } },
        "filter_chains": [{ "filters": [hcm(json!({
            "stat_prefix": "egress",
            "upgrade_configs": [{ "upgrade_type": "CONNECT" }],
            "access_log": [{
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": { "text_format_source": { "inline_string":
                        "[%START_TIME%] egress \"%REQ(:METHOD)% %REQ(:AUTHORITY)%%REQ(:PATH)%\" %RESPONSE_CODE% \
                         %RESPONSE_FLAGS% cluster=%UPSTREAM_CLUSTER% upstream=%UPSTREAM_HOST%\n" } },
                },
            }],
            "route_config": { "name": "egress", "virtual_hosts": vhosts },
            "http_filters": [
                {
                    "name": "envoy.filters.http.dynamic_forward_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
                        "dns_cache_config": dns_cache,
                    },
                },
                router,
            ],
        }))] }],
    });
    Ok(json!({
        "node": {
            "id": manifest.service,
            "cluster": manifest.service,
            "locality": { "zone": manifest.zone },
        },
        "admin": {
            "address": { "socket_address": { "address": defaults.admin_address, "port_value": defaults.admin_port } },
        },
        "static_resources": { "listeners": [ingress, egress], "clusters": clusters },
    }))
}

fn hcm(config: Value) -> Value {
    let mut typed = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    });
    if let (Some(t), Value::Object(c)) = (typed.as_object_mut(), config) {
        t.extend(c);
    }
    json!({ "name": "envoy.filters.network.http_connection_manager", "typed_config": typed })
}

fn circuit_breakers(d: &Defaults) -> Value {
    let cb = &d.dependency.circuit_breakers;
    json!({ "thresholds": [{
        "priority": "DEFAULT",
        "max_connections": cb.max_connections,
        "max_pending_requests": cb.max_pending_requests,
        "max_requests": cb.max_requests,
        "retry_budget": {
            "budget_percent": { "value": d.dependency.retry_budget.budget_percent },
            "min_retry_concurrency": d.dependency.retry_budget.min_retry_concurrency,
        },
    }] })
}

fn endpoint(cluster: &str, address: &str, port: u16) -> Value {
    json!({
        "cluster_name": cluster,
        "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
            "socket_address": { "address": address, "port_value": port },
        } } }] }],
    })
}

fn http2_options() -> Value {
    json!({ "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": { "http2_protocol_options": {} },
    } })
}

fn local_app(m: &Manifest, d: &Defaults) -> Value {
    let mut c = json!({
        "name": "local_app",
        "type": "STATIC",
        "connect_timeout": d.local_connect_timeout,
        "load_assignment": endpoint("local_app", "127.0.0.1", m.port),
    });
    if m.protocol != Protocol::Http1 {
        c["typed_extension_protocol_options"] = http2_options();
    }
    c
}

fn dependency_cluster(name: &str, dep: &Dependency, d: &Defaults) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STRICT_DNS",
        "connect_timeout": d.dependency.connect_timeout,
        "dns_lookup_family": "V4_PREFERRED",
        "dns_refresh_rate": d.dependency.dns_refresh_rate,
        "load_assignment": endpoint(name, &dep.host, dep.port),
        "circuit_breakers": circuit_breakers(d),
        "outlier_detection": d.dependency.outlier_detection,
    });
    if dep.protocol != Protocol::Http1 {
        c["typed_extension_protocol_options"] = http2_options();
    }
    c
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn is_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `2s`, `1.5s` or `250ms` as the protobuf JSON duration (`0.250s`).
#[cfg(test)]
fn duration(s: &str) -> Option<String> {
    millis(s).map(format_ms)
}

fn format_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    }
}

/// `2s`, `1.5s` or `250ms` in milliseconds (more than 0).
fn millis(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1u64)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000u64)
    } else {
        return None;
    };
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 3
    {
        return None;
    }
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let frac_ms: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<3}").parse().ok()?
    };
    let ms = whole.checked_mul(scale)?.checked_add(frac_ms * scale / 1000)?;
    (ms > 0).then_some(ms)
}

/// Finds the lines of keys and sequence items in a block-style manifest, for errors serde cannot place.
struct Lines<'a> {
    lines: Vec<&'a str>,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        Lines {
            lines: text.lines().collect(),
        }
    }

    /// The 1-based line of the `nth` top-level (or any-level, within `range`) `key:`.
    fn key(&self, key: &str, range: Option<(usize, usize)>, nth: usize) -> Option<usize> {
        let (from, to) = range.unwrap_or((0, self.lines.len()));
        let top_level = range.is_none();
        self.lines[from..to]
            .iter()
            .enumerate()
            .filter(|(_, l)| {
                let t = l.trim_start().trim_start_matches("- ");
                (!top_level || indent(l) == 0) && t.strip_prefix(key).is_some_and(|r| r.starts_with(':'))
            })
            .nth(nth)
            .map(|(i, _)| from + i + 1)
    }

    /// The 0-based line range of the items of the top-level sequence `key`, in order.
    fn items(&self, key: &str) -> Vec<(usize, usize)> {
        let Some(start) = self.key(key, None, 0) else {
            return Vec::new();
        };
        let mut starts = Vec::new();
        let mut item_indent = None;
        let mut end = self.lines.len();
        for (i, l) in self.lines.iter().enumerate().skip(start) {
            let t = l.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if indent(l) == 0 && !t.starts_with("- ") && t != "-" {
                end = i;
                break;
            }
            if t.starts_with("- ") || t == "-" {
                let ind = indent(l);
                if item_indent.is_none() {
                    item_indent = Some(ind);
                }
                if item_indent == Some(ind) {
                    starts.push(i);
                }
            }
        }
        let mut out = Vec::new();
        for (n, s) in starts.iter().enumerate() {
            out.push((*s, starts.get(n + 1).copied().unwrap_or(end)));
        }
        out
    }

    /// The 1-based line of item `i` of the top-level sequence `key`.
    fn item(&self, key: &str, i: usize) -> Option<usize> {
        self.items(key).get(i).map(|(s, _)| s + 1)
    }

    /// The 1-based line of `field:` inside item `i` of the top-level sequence `key`.
    fn key_in_item(&self, key: &str, i: usize, field: &str) -> Option<usize> {
        let range = *self.items(key).get(i)?;
        self.key(field, Some(range), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
service: orders
port: 8080
zone: z1
dependencies:
- host: payments.internal
  port: 80
  protocol: http1
- name: users
  host: users.internal
  port: 9000
  protocol: grpc
  timeout: 250ms
  retries:
    num_retries: 4
";

    fn error(text: &str) -> TemplateError {
        render("svc.yaml", text).unwrap_err()
    }

    #[test]
    fn the_embedded_defaults_parse() {
        let d = Defaults::embedded().unwrap();
        assert_eq!(d.admin_port, 9901);
    }

    #[test]
    fn renders_a_cluster_and_route_per_dependency() {
        let v = render_value("svc.yaml", GOOD, &Defaults::embedded().unwrap()).unwrap();
        let clusters = v["static_resources"]["clusters"].as_array().unwrap();
        let names: Vec<_> = clusters.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["local_app", "payments.internal", "users", "passthrough"]);
        assert_eq!(clusters[2]["type"], "STRICT_DNS");
        assert!(clusters[2]["typed_extension_protocol_options"].is_object());
        assert!(clusters[1].get("typed_extension_protocol_options").is_none());
        let vhosts = &v["static_resources"]["listeners"][1]["filter_chains"][0]["filters"][0]["typed_config"]
            ["route_config"]["virtual_hosts"];
        let users = &vhosts[1]["routes"][0]["route"];
        assert_eq!(users["timeout"], "0.250s");
        assert_eq!(users["retry_policy"]["num_retries"], 4);
        assert!(users["retry_policy"]["retry_on"]
            .as_str()
            .unwrap()
            .contains("unavailable"));
        assert_eq!(vhosts[2]["name"], "passthrough");
        assert_eq!(v["node"]["locality"]["zone"], "z1");
    }

    #[test]
    fn unknown_keys_and_bad_ports_name_their_line() {
        let e = error("service: a\nport: 80\nzone: z\ndependencies:\n- host: b\n  prot: 1\n");
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.message.contains("unknown field `prot`"), "{e}");
        let e =
            error("service: a\nport: 80\nzone: z\ndependencies:\n- host: b\n  port: 70000\n  protocol: h2\n");
        assert_eq!(e.line, Some(6), "{e}");
        let e = error("service: a\nport: 80\nzone: z\ndependencies:\n- host: b\n  protocol: h2\n  port: 0\n");
        assert_eq!(e.line, Some(7), "{e}");
        assert!(e.message.contains("port 0"), "{e}");
        let e = error("service: a\nzone: z\nport: 15001\n");
        assert_eq!(e.line, Some(3), "{e}");
        let e = error("service: a\nport: 80\nzone: z\ndependencies:\n- {host: b, port: 1, protocol: spdy}\n");
        assert_eq!(e.line, Some(5), "{e}");
        assert_eq!(e.to_string().split(':').next(), Some("svc.yaml"));
    }

    #[test]
    fn duplicate_dependencies_name_the_second_declaration() {
        let text =
            "service: a\nport: 80\nzone: z\ndependencies:\n# one\n- host: b\n  port: 1\n  protocol: h2\n\n  \
                    # two\n- host: c\n  port: 1\n  protocol: h2\n- host: b\n  port: 2\n  protocol: h2\n";
        let e = error(text);
        assert_eq!(e.line, Some(14), "{e}");
        assert!(
            e.message
                .contains("duplicate dependency 'b' (first declared at line 6)"),
            "{e}"
        );
        let text = "service: a\nport: 80\nzone: z\ndependencies:\n- host: b\n  port: 1\n  protocol: h2\n  \
                    name: x\n- host: b\n  port: 1\n  protocol: h2\n  name: y\n";
        let e = error(text);
        assert_eq!(e.line, Some(9), "{e}");
        assert!(e.message.contains("duplicate dependency b:1"), "{e}");
    }

    #[test]
    fn per_try_timeouts_fit_the_timeout_and_health_checks() {
        let v = render_value(
            "svc.yaml",
            "service: a\nport: 80\nzone: z\ndependencies:\n- host: b\n  port: 1\n  protocol: http1\n  \
             timeout: 1s\n  health_check: /healthz\n- host: c\n  port: 1\n  protocol: grpc\n  health_check: tcp\n",
            &Defaults::embedded().unwrap(),
        )
        .unwrap();
        let vhosts = &v["static_resources"]["listeners"][1]["filter_chains"][0]["filters"][0]["typed_config"]
            ["route_config"]["virtual_hosts"];
        assert_eq!(
            vhosts[0]["routes"][0]["route"]["retry_policy"]["per_try_timeout"],
            "1s"
        );
        let clusters = &v["static_resources"]["clusters"];
        assert_eq!(
            clusters[1]["health_checks"][0]["http_health_check"]["path"],
            "/healthz"
        );
        assert!(clusters[2]["health_checks"][0]["tcp_health_check"].is_object());
        let e = error(
            "service: a\nport: 80\nzone: z\ndependencies:\n- host: b\n  port: 1\n  protocol: h2\n  \
             health_check: /healthz\n",
        );
        assert_eq!(e.line, Some(8), "{e}");
        let e = error(
            "service: a\nport: 80\nzone: z\ndependencies:\n- host: b\n  port: 1\n  protocol: h2\n  \
             timeout: 1s\n  retries:\n    per_try_timeout: 2s\n",
        );
        assert_eq!(e.line, Some(10), "{e}");
        assert!(
            e.message
                .contains("per_try_timeout 2s is longer than the timeout 1s"),
            "{e}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration("2s").as_deref(), Some("2s"));
        assert_eq!(duration("1.5s").as_deref(), Some("1.500s"));
        assert_eq!(duration("250ms").as_deref(), Some("0.250s"));
        assert_eq!(duration("3000ms").as_deref(), Some("3s"));
        assert_eq!(duration("0s"), None);
        assert_eq!(duration("5"), None);
        assert_eq!(duration("1m"), None);
        assert_eq!(duration("s"), None);
    }
}
