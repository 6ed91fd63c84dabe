//! The admin server: Envoy's endpoints and formats (`/ready`, `/stats`, `/clusters`, `/config_dump`, ...).
//!
//! It runs on the main thread's runtime, never on a worker, so a slow admin client cannot delay traffic.
//! Mutating endpoints take POST only; a GET answers 405 as Envoy does.

mod dump;

pub use dump::version_string;

use crate::server::{Shared, State};
use crate::stats::output::{self, Select};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

type Resp = Response<Full<Bytes>>;

/// The endpoints and their help text, as `/help` lists them.
const ENDPOINTS: &[(&str, &str, bool)] = &[
    ("/", "Admin home page", false),
    ("/clusters", "upstream cluster status", false),
    ("/config_dump", "dump current Envoy configs", false),
    ("/drain_listeners", "drain listeners", true),
    (
        "/healthcheck/fail",
        "cause the server to fail health checks",
        true,
    ),
    ("/healthcheck/ok", "cause the server to pass health checks", true),
    ("/help", "print out list of admin commands", false),
    ("/listeners", "print listener info", false),
    ("/logging", "query/change logging levels", true),
    ("/quitquitquit", "exit the server", true),
    (
        "/ready",
        "print server state, return 200 if LIVE, otherwise return 503",
        false,
    ),
    ("/reopen_logs", "reopen access logs", true),
    ("/reset_counters", "reset all counters to zero", true),
    ("/runtime", "print runtime values", false),
    (
        "/runtime_modify",
        "Adds or modifies runtime values as passed in query parameters. To delete a previously added key, use an empty string as the value.",
        true,
    ),
    ("/server_info", "print server version/status information", false),
    ("/stats", "print server stats", false),
    (
        "/stats/prometheus",
        "print server stats in prometheus format",
        false,
    ),
    (
        "/zone_routing",
        "zone-aware routing per cluster: active or why not, per-zone percentages (Remora)",
        false,
    ),
];

/// Bind and serve the admin; returns the bound address.
pub async fn start(shared: Arc<Shared>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "admin listening");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let shared = shared.clone();
                    async move {
                        if req.uri().path() == "/runtime_modify" && req.method() == Method::POST {
                            return Ok::<_, Infallible>(runtime_modify(&shared, req).await);
                        }
                        Ok::<_, Infallible>(handle(&shared, req))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, max-age=0"),
    );
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

fn json(value: &serde_json::Value) -> Resp {
    let body = serde_json::to_string_pretty(value).unwrap_or_default();
    let mut r = text(StatusCode::OK, body);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let Some((_, _, post_only)) = ENDPOINTS.iter().find(|(p, _, _)| *p == path) else {
        return text(StatusCode::NOT_FOUND, format!("invalid path. {}", help()));
    };
    if *post_only && req.method() != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {} not allowed, POST required.", req.method()),
        );
    }
    let q = query(&req);
    match path.as_str() {
        "/" | "/help" => text(StatusCode::OK, help()),
        "/ready" => {
            let s = shared.state();
            let code = if s == State::Live {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(code, format!("{}\n", s.name()))
        }
        "/server_info" => json(&dump::server_info(shared)),
        "/zone_routing" => json(&zone_routing(shared)),
        "/config_dump" => json(&dump::config_dump(shared)),
        "/clusters" => {
            if q.get("format").map(String::as_str) == Some("json") {
                json(&clusters_json(shared))
            } else {
                text(StatusCode::OK, clusters_text(shared))
            }
        }
        "/listeners" => {
            let addrs = shared
                .listener_addrs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if q.get("format").map(String::as_str) == Some("json") {
                let statuses: Vec<serde_json::Value> = addrs
                    .iter()
                    .map(|(name, a)| {
                        serde_json::json!({"name": name, "local_address": {"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}})
                    })
                    .collect();
                json(&serde_json::json!({ "listener_statuses": statuses }))
            } else {
                let mut out = String::new();
                for (name, a) in &addrs {
                    let _ = writeln!(out, "{name}::{a}");
                }
                text(StatusCode::OK, out)
            }
        }
        "/stats" | "/stats/prometheus" => {
            let filter = match q.get("filter").filter(|f| !f.is_empty()) {
                Some(f) => match regex::Regex::new(f) {
                    Ok(re) => Some(re),
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("Invalid regex: {e}\n")),
                },
                None => None,
            };
            let sel = Select {
                used_only: q.contains_key("usedonly"),
                filter,
            };
            let format = if path == "/stats/prometheus" {
                "prometheus"
            } else {
                q.get("format").map(String::as_str).unwrap_or("")
            };
            match format {
                "json" => json(&output::json(&shared.store, &sel)),
                "prometheus" => text(StatusCode::OK, output::prometheus(&shared.store, &shared.bootstrap.stats_tags, &sel)),
                "" | "text" => text(StatusCode::OK, output::text(&shared.store, &sel)),
                other => text(StatusCode::BAD_REQUEST, format!("usage: /stats?format=(html|active-html|json|prometheus|text): unknown format {other}\n")),
            }
        }
        "/healthcheck/fail" => {
            shared.set_health_failed(true);
            text(StatusCode::OK, "OK\n")
        }
        "/healthcheck/ok" => {
            shared.set_health_failed(false);
            text(StatusCode::OK, "OK\n")
        }
        "/drain_listeners" => {
            shared.start_drain();
            text(StatusCode::OK, "OK\n")
        }
        "/quitquitquit" => {
            shared.quit();
            text(StatusCode::OK, "OK\n")
        }
        "/reopen_logs" => {
            // File I/O: off the admin's runtime thread.
            let logs = shared.bootstrap.access_logs.clone();
            let _ = std::thread::spawn(move || logs.reopen_all()).join();
            text(StatusCode::OK, "OK\n")
        }
        "/runtime" => json(&runtime_json(&shared.runtime.snapshot())),
        "/reset_counters" => {
            shared.store.reset_counters();
            text(StatusCode::OK, "OK\n")
        }
        "/logging" => {
            if let Some(level) = q.get("level") {
                if !crate::logging::set_level(level) {
                    return text(
                        StatusCode::NOT_FOUND,
                        format!("error: unknown logger level {level}\n"),
                    );
                }
            }
            text(
                StatusCode::OK,
                format!("active loggers:\n  remora: {}\n", crate::logging::current()),
            )
        }
        _ => text(StatusCode::NOT_FOUND, format!("invalid path. {}", help())),
    }
}

/// `/runtime`: the layers' names and, per key, the value of each layer (empty where a layer lacks it) and the
/// final value, as Envoy's `RuntimeHandler::handlerRuntime` writes them.
fn runtime_json(snap: &crate::layered_runtime::Snapshot) -> serde_json::Value {
    let mut keys = std::collections::BTreeSet::new();
    for l in &snap.layers {
        keys.extend(l.values.keys().map(String::as_str));
    }
    let mut entries = serde_json::Map::new();
    for k in keys {
        let values: Vec<&str> = snap
            .layers
            .iter()
            .map(|l| l.values.get(k).map_or("", |e| e.raw.as_str()))
            .collect();
        let final_value = values.iter().rev().find(|v| !v.is_empty()).copied().unwrap_or("");
        entries.insert(
            k.to_string(),
            serde_json::json!({"final_value": final_value, "layer_values": values}),
        );
    }
    let layers: Vec<&str> = snap.layers.iter().map(|l| l.name.as_str()).collect();
    serde_json::json!({"layers": layers, "entries": entries})
}

/// `POST /runtime_modify?key=value&...` (or the same as a form body): set admin-layer overrides; an empty value
/// removes one. 400 without parameters, 503 without an admin layer, as Envoy answers.
async fn runtime_modify(shared: &Shared, req: Request<Incoming>) -> Resp {
    use http_body_util::BodyExt;
    let mut params: Vec<(String, String)> = query(&req).into_iter().collect();
    if params.is_empty() {
        let form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/x-www-form-urlencoded"));
        if form {
            let body = http_body_util::Limited::new(req.into_body(), 1 << 20);
            if let Ok(b) = body.collect().await {
                let b = b.to_bytes();
                params = String::from_utf8_lossy(&b)
                    .split('&')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once('=').unwrap_or((p, ""));
                        (percent_decode(k), percent_decode(v))
                    })
                    .collect();
            }
        }
    }
    if params.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "usage: /runtime_modify?key1=value1&key2=value2&keyN=valueN\n       or send the parameters as form values\nuse an empty value to remove a previously added override",
        );
    }
    match shared.runtime.merge_admin(&params) {
        Ok(()) => text(StatusCode::OK, "OK\n"),
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

fn help() -> String {
    let mut out = String::from("admin commands are:\n");
    for (p, h, _) in ENDPOINTS {
        let _ = writeln!(out, "  {p}: {h}");
    }
    out
}

fn clusters_text(shared: &Shared) -> String {
    use crate::upstream::breaker::Priority;
    let mut out = String::new();
    let snap = shared.clusters.load();
    let now = tokio::time::Instant::now();
    for c in snap.iter() {
        let n = c.name();
        let _ = writeln!(out, "{n}::observability_name::{}", c.config.stat_name);
        if let Some(d) = &c.outlier {
            let sr = d.success_rate_threshold(false);
            let lsr = d.success_rate_threshold(true);
            let _ = writeln!(
                out,
                "{n}::outlier::success_rate_average::{}",
                sr.map_or(-1.0, |s| s.0)
            );
            let _ = writeln!(
                out,
                "{n}::outlier::success_rate_ejection_threshold::{}",
                sr.map_or(-1.0, |s| s.1)
            );
            let _ = writeln!(
                out,
                "{n}::outlier::local_origin_success_rate_average::{}",
                lsr.map_or(-1.0, |s| s.0)
            );
            let _ = writeln!(
                out,
                "{n}::outlier::local_origin_success_rate_ejection_threshold::{}",
                lsr.map_or(-1.0, |s| s.1)
            );
        }
        for (prio, p) in [
            ("default_priority", Priority::Default),
            ("high_priority", Priority::High),
        ] {
            let t = c.config.circuit_breakers.thresholds(p);
            for (k, v) in [
                ("max_connections", t.max_connections),
                ("max_pending_requests", t.max_pending_requests),
                ("max_requests", t.max_requests),
                ("max_retries", t.max_retries),
            ] {
                let _ = writeln!(out, "{n}::{prio}::{k}::{v}");
            }
        }
        let _ = writeln!(out, "{n}::added_via_api::{}", c.added_via_api);
        for (i, h) in c.hosts().hosts.iter().enumerate() {
            let a = &h.address_str;
            let s = &h.stats;
            for (k, v) in [
                ("cx_active", s.cx_active.load(Relaxed)),
                ("cx_connect_fail", s.cx_connect_fail.load(Relaxed)),
                ("cx_total", s.cx_total.load(Relaxed)),
                ("rq_active", s.rq_active.load(Relaxed)),
                ("rq_error", s.rq_error.load(Relaxed)),
                ("rq_success", s.rq_success.load(Relaxed)),
                ("rq_timeout", s.rq_timeout.load(Relaxed)),
                ("rq_total", s.rq_total.load(Relaxed)),
            ] {
                let _ = writeln!(out, "{n}::{a}::{k}::{v}");
            }
            let status = c.outlier.as_ref().and_then(|d| d.host_status(i));
            let ejected = status.as_ref().is_some_and(|s| s.ejected);
            let _ = writeln!(out, "{n}::{a}::hostname::{}", h.hostname);
            let _ = writeln!(out, "{n}::{a}::health_flags::{}", health_flags(h, ejected));
            let _ = writeln!(out, "{n}::{a}::weight::{}", h.weight);
            let _ = writeln!(out, "{n}::{a}::region::{}", h.locality.region);
            let _ = writeln!(out, "{n}::{a}::zone::{}", h.locality.zone);
            let _ = writeln!(out, "{n}::{a}::sub_zone::{}", h.locality.sub_zone);
            let _ = writeln!(out, "{n}::{a}::canary::false");
            let _ = writeln!(out, "{n}::{a}::priority::{}", h.priority);
            let sr = status.as_ref().and_then(|s| s.success_rate).unwrap_or(-1.0);
            let lsr = status
                .as_ref()
                .and_then(|s| s.local_origin_success_rate)
                .unwrap_or(-1.0);
            let _ = writeln!(out, "{n}::{a}::success_rate::{sr}");
            let _ = writeln!(out, "{n}::{a}::local_origin_success_rate::{lsr}");
            // Beyond Envoy: why the host is or is not receiving traffic.
            if let Some(s) = &status {
                if s.times_ejected > 0 || s.ejected {
                    let until = s
                        .ejected_until
                        .map(|u| u.saturating_duration_since(now).as_secs_f64());
                    let _ = writeln!(
                        out,
                        "{n}::{a}::outlier::ejected::{}::reason::{}::times_ejected::{}::returns_in_s::{}",
                        s.ejected,
                        s.last_reason.map_or("none", |r| r.envoy_name()),
                        s.times_ejected,
                        until.map_or("-".to_string(), |u| format!("{u:.1}"))
                    );
                }
            }
        }
    }
    out
}

fn health_flags(h: &crate::upstream::Host, ejected: bool) -> String {
    use crate::upstream::EndpointHealth::*;
    let mut flags = String::new();
    if h.failed_active_hc.load(Relaxed) {
        flags.push_str("/failed_active_hc");
    }
    if ejected {
        flags.push_str("/failed_outlier_check");
    }
    // Envoy's order (`HostUtility::healthFlagsToString`).
    match h.health {
        Unknown | Healthy => {}
        Degraded => flags.push_str("/degraded_eds_health"),
        Unhealthy | Draining | Timeout => flags.push_str("/failed_eds_health"),
    }
    if h.pending_dynamic_removal.load(Relaxed) {
        flags.push_str("/pending_dynamic_removal");
    }
    if h.pending_active_hc.load(Relaxed) {
        flags.push_str("/pending_active_hc");
    }
    if flags.is_empty() {
        flags.push_str("healthy");
    }
    flags
}

/// Beyond Envoy: per cluster, whether zone-aware routing is active, which precondition fails if not, and the
/// expected per-zone percentages ([`crate::upstream::zone::ZoneRouting::describe`]).
fn zone_routing(shared: &Shared) -> serde_json::Value {
    let snap = shared.clusters.load();
    let mut clusters: Vec<(String, serde_json::Value)> = snap
        .iter()
        .map(|c| {
            let mut v = match &c.hosts().zone {
                Some(z) => z.describe(),
                None => serde_json::json!({"active": false}),
            };
            v["name"] = serde_json::Value::from(c.name());
            (c.name().to_string(), v)
        })
        .collect();
    clusters.sort_by(|a, b| a.0.cmp(&b.0));
    serde_json::json!({
        "local_cluster": shared.local_cluster.as_ref().map(|l| l.name.clone()),
        "clusters": clusters.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    })
}

fn clusters_json(shared: &Shared) -> serde_json::Value {
    let snap = shared.clusters.load();
    let statuses: Vec<serde_json::Value> = snap
        .iter()
        .map(|c| {
            let hosts: Vec<serde_json::Value> = c
                .hosts()
                .hosts
                .iter()
                .map(|h| {
                    let s = &h.stats;
                    let counter = |name: &str, v: u64| serde_json::json!({"name": name, "value": v.to_string(), "type": "COUNTER"});
                    let gauge = |name: &str, v: u64| serde_json::json!({"name": name, "value": v.to_string(), "type": "GAUGE"});
                    serde_json::json!({
                        "address": {"socket_address": {"address": h.address.ip().to_string(), "port_value": h.address.port()}},
                        "stats": [
                            counter("cx_connect_fail", s.cx_connect_fail.load(Relaxed)),
                            counter("cx_total", s.cx_total.load(Relaxed)),
                            counter("rq_error", s.rq_error.load(Relaxed)),
                            counter("rq_success", s.rq_success.load(Relaxed)),
                            counter("rq_timeout", s.rq_timeout.load(Relaxed)),
                            counter("rq_total", s.rq_total.load(Relaxed)),
                            gauge("cx_active", s.cx_active.load(Relaxed)),
                            gauge("rq_active", s.rq_active.load(Relaxed)),
                        ],
                        "health_status": {
                            "eds_health_status": match h.health {
                                crate::upstream::EndpointHealth::Unknown => "HEALTHY",
                                other => other.name(),
                            },
                            "failed_active_health_check": h.failed_active_hc.load(Relaxed),
                            "pending_active_hc": h.pending_active_hc.load(Relaxed),
                            "pending_dynamic_removal": h.pending_dynamic_removal.load(Relaxed),
                        },
                        "weight": h.weight,
                        "hostname": h.hostname,
                        "locality": {"region": h.locality.region, "zone": h.locality.zone, "sub_zone": h.locality.sub_zone},
                        "priority": h.priority,
                    })
                })
                .collect();
            serde_json::json!({
                "name": c.name(),
                "observability_name": c.config.stat_name,
                "added_via_api": c.added_via_api,
                "circuit_breakers": {"thresholds": [
                    {"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024, "max_retries": 3},
                    {"priority": "HIGH", "max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024, "max_retries": 3}
                ]},
                "host_statuses": hosts,
            })
        })
        .collect();
    serde_json::json!({ "cluster_statuses": statuses })
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_decoding() {
        assert_eq!(super::percent_decode("a%2Fb+c"), "a/b c");
        assert_eq!(super::percent_decode("%zz%"), "%zz%");
        assert_eq!(super::percent_decode("cluster%5C.x"), "cluster\\.x");
    }
}
