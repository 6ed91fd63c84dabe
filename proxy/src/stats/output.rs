//! The admin's renderings of the store: Envoy's text format, JSON and Prometheus text exposition.

use super::tags::{Tag, TagProducer};
use super::{Metric, Store};
use std::fmt::Write;

/// Options shared by every format (`?usedonly`, `?filter=`).
#[derive(Default)]
pub struct Select {
    pub used_only: bool,
    pub filter: Option<regex::Regex>,
}

impl Select {
    fn keep(&self, name: &str, m: &Metric) -> bool {
        let visible = match m {
            Metric::Counter(c) => c.visible() && (!self.used_only || c.used()),
            Metric::Gauge(g) => !self.used_only || g.used(),
            Metric::Histogram(h) => !self.used_only || h.used(),
        };
        visible && self.filter.as_ref().is_none_or(|re| re.is_match(name))
    }
}

const QUANTILES: [(f64, &str); 11] = [
    (0.0, "P0"),
    (0.25, "P25"),
    (0.5, "P50"),
    (0.75, "P75"),
    (0.9, "P90"),
    (0.95, "P95"),
    (0.99, "P99"),
    (0.995, "P99.5"),
    (0.999, "P99.9"),
    (1.0, "P100"),
    (f64::NAN, ""),
];

fn fmt_q(v: Option<f64>) -> String {
    match v {
        None => "nan".to_string(),
        Some(v) if v.fract() == 0.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

/// Envoy's `/stats` text: counters and gauges as `name: value`, sorted by name; then histograms with their
/// quantile summary (cumulative values; Remora keeps no separate interval window, so the interval column repeats
/// the cumulative one).
pub fn text(store: &Store, sel: &Select) -> String {
    let mut out = String::new();
    let all = store.snapshot();
    for (name, m) in &all {
        if !sel.keep(name, m) {
            continue;
        }
        match m {
            Metric::Counter(c) => {
                let _ = writeln!(out, "{name}: {}", c.value());
            }
            Metric::Gauge(g) => {
                let _ = writeln!(out, "{name}: {}", g.value());
            }
            Metric::Histogram(_) => {}
        }
    }
    for (name, m) in &all {
        let Metric::Histogram(h) = m else { continue };
        if !sel.keep(name, m) {
            continue;
        }
        let s = h.snapshot();
        if s.count == 0 {
            let _ = writeln!(out, "{name}: No recorded values");
            continue;
        }
        let parts: Vec<String> = QUANTILES
            .iter()
            .filter(|(_, label)| !label.is_empty())
            .map(|(q, label)| {
                let v = fmt_q(s.quantile(*q));
                format!("{label}({v},{v})")
            })
            .collect();
        let _ = writeln!(out, "{name}: {}", parts.join(" "));
    }
    out
}

/// `/stats?format=json`: `{"stats":[{"name":..,"value":..}, ..., {"histograms":{...}}]}` as Envoy writes it.
pub fn json(store: &Store, sel: &Select) -> serde_json::Value {
    let mut stats = Vec::new();
    let mut hists = Vec::new();
    for (name, m) in store.snapshot() {
        if !sel.keep(&name, &m) {
            continue;
        }
        match m {
            Metric::Counter(c) => stats.push(serde_json::json!({"name": name, "value": c.value()})),
            Metric::Gauge(g) => stats.push(serde_json::json!({"name": name, "value": g.value()})),
            Metric::Histogram(h) => {
                let s = h.snapshot();
                let values: Vec<serde_json::Value> = QUANTILES
                    .iter()
                    .filter(|(_, l)| !l.is_empty())
                    .map(|(q, _)| {
                        let v = s.quantile(*q);
                        serde_json::json!({"interval": v, "cumulative": v})
                    })
                    .collect();
                hists.push(serde_json::json!({"name": name, "values": values}));
            }
        }
    }
    let supported: Vec<f64> = QUANTILES
        .iter()
        .filter(|(_, l)| !l.is_empty())
        .map(|(q, _)| q * 100.0)
        .collect();
    stats.push(
        serde_json::json!({"histograms": {"supported_quantiles": supported, "computed_quantiles": hists}}),
    );
    serde_json::json!({ "stats": stats })
}

/// Envoy's Prometheus metric name for a tag-extracted name: `envoy_` and the name with every character outside
/// `[a-zA-Z0-9_]` replaced by `_`.
fn sanitize(extracted: &str) -> String {
    let mut out = String::with_capacity(extracted.len() + 6);
    out.push_str("envoy_");
    out.extend(extracted.chars().map(|ch| {
        if ch.is_ascii_alphanumeric() || ch == '_' {
            ch
        } else {
            '_'
        }
    }));
    out
}

/// Split a stat name into Prometheus name and labels.
pub fn prometheus_name<'t>(tags: &'t TagProducer, name: &str) -> (String, Vec<Tag<'t>>) {
    let (extracted, tags) = tags.produce(name);
    (sanitize(&extracted), tags)
}

/// Envoy's order for stat names: element by element of the dotted name (its symbol table's `lessThan`), so
/// `listener.x` sorts before `listener_manager.x` although `.` and `_` would sort the other way once sanitized.
fn stat_name_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.split('.').cmp(b.split('.'))
}

/// The text between a series' braces: `k="v",...`, with `extra` (the histogram's `le`) last. Envoy writes
/// the braces even when there is no label (`envoy_server_live{} 1`).
fn labels(tags: &[Tag<'_>], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = tags
        .iter()
        .map(|t| format!("{}=\"{}\"", t.label, escape(&t.value)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    format!("{{{}}}", parts.join(","))
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A bucket bound as Envoy prints it (`{:.32g}`): `0.5`, `1`, `3600000`, never an exponent.
fn prom_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// One series waiting to be written: its full stat name (the sort key within a group), tags and metric.
struct Series<'t> {
    name: String,
    tags: Vec<Tag<'t>>,
    metric: Metric,
}

/// Series grouped by tag-extracted name, in Envoy's order.
type Groups<'t> = Vec<(String, Vec<Series<'t>>)>;

fn group(series: std::collections::HashMap<String, Vec<Series<'_>>>) -> Groups<'_> {
    let mut groups: Groups = series.into_iter().collect();
    groups.sort_by(|a, b| stat_name_cmp(&a.0, &b.0));
    for (_, s) in &mut groups {
        s.sort_by(|a, b| stat_name_cmp(&a.name, &b.name));
    }
    groups
}

/// `/stats/prometheus`, as Envoy's `PrometheusStatsFormatter` writes it: counters, then gauges, then
/// histograms. Within each kind, one group per tag-extracted name in stat-name order, each opened by
/// `# TYPE <name> <kind>` and closed by a blank line, its series in order of their full stat names. Every
/// series has braces, `le` is the last label of a bucket, buckets are Envoy's default bounds and cumulative,
/// then `+Inf`, `_sum` and `_count`. No `# HELP` lines. Tags come from `tags` (the bootstrap's `stats_config`).
pub fn prometheus(store: &Store, tags: &TagProducer, sel: &Select) -> String {
    use std::collections::HashMap;
    let mut kinds: [HashMap<String, Vec<Series<'_>>>; 3] = Default::default();
    for (name, m) in store.snapshot() {
        if !sel.keep(&name, &m) {
            continue;
        }
        let (extracted, tags) = tags.produce(&name);
        let kind = match m {
            Metric::Counter(_) => 0,
            Metric::Gauge(_) => 1,
            Metric::Histogram(_) => 2,
        };
        kinds[kind].entry(extracted).or_default().push(Series {
            name,
            tags,
            metric: m,
        });
    }
    let mut out = String::new();
    for (kind, series) in ["counter", "gauge", "histogram"].into_iter().zip(kinds) {
        for (extracted, series) in group(series) {
            let pname = sanitize(&extracted);
            let _ = writeln!(out, "# TYPE {pname} {kind}");
            for s in &series {
                write_series(&mut out, &pname, s);
            }
            out.push('\n');
        }
    }
    out
}

fn write_series(out: &mut String, pname: &str, s: &Series<'_>) {
    let tags = &s.tags;
    match &s.metric {
        Metric::Counter(c) => {
            let _ = writeln!(out, "{pname}{} {}", labels(tags, None), c.value());
        }
        Metric::Gauge(g) => {
            let _ = writeln!(out, "{pname}{} {}", labels(tags, None), g.value());
        }
        Metric::Histogram(h) => {
            let snap = h.snapshot();
            let cum = snap.cumulative();
            for (i, bound) in super::histogram::ENVOY_BUCKETS.iter().enumerate() {
                let le = labels(tags, Some(("le", prom_number(*bound))));
                let _ = writeln!(out, "{pname}_bucket{le} {}", cum[i]);
            }
            let le = labels(tags, Some(("le", "+Inf".into())));
            let _ = writeln!(out, "{pname}_bucket{le} {}", snap.count);
            let _ = writeln!(out, "{pname}_sum{} {}", labels(tags, None), snap.sum);
            let _ = writeln!(out, "{pname}_count{} {}", labels(tags, None), snap.count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{prometheus, prometheus_name, Select};
    use crate::stats::tags::TagProducer;
    use crate::stats::Store;

    /// Envoy's layout (`test/server/admin/prometheus_stats_test.cc`): kinds in order, groups by tag-extracted
    /// name compared element by element, series by full stat name (not by label text), braces on every
    /// series, `le` last, a blank line after every group.
    #[test]
    fn prometheus_layout_is_envoys() {
        let store = Store::new();
        for c in ["other", "backend"] {
            store.counter(&format!("cluster.{c}.upstream_rq_5xx")).add(2);
            store.counter(&format!("cluster.{c}.upstream_rq_2xx")).add(3);
        }
        store.counter("listener_manager.listener_added").inc();
        store.counter("listener.127.0.0.1_80.no_filter_chain_match");
        store.counter("listener.127.0.0.1_80.downstream_cx_total").inc();
        store.gauge("server.live").set(1);
        let h = store.histogram("server.initialization_time_ms");
        for v in [0, 7, 7_000] {
            h.record(v);
        }
        let got = prometheus(&store, &TagProducer::default(), &Select::default());
        let want = r#"# TYPE envoy_cluster_upstream_rq_xx counter
envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="backend"} 3
envoy_cluster_upstream_rq_xx{envoy_response_code_class="5",envoy_cluster_name="backend"} 2
envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",envoy_cluster_name="other"} 3
envoy_cluster_upstream_rq_xx{envoy_response_code_class="5",envoy_cluster_name="other"} 2

# TYPE envoy_listener_downstream_cx_total counter
envoy_listener_downstream_cx_total{envoy_listener_address="127.0.0.1_80"} 1

# TYPE envoy_listener_no_filter_chain_match counter
envoy_listener_no_filter_chain_match{envoy_listener_address="127.0.0.1_80"} 0

# TYPE envoy_listener_manager_listener_added counter
envoy_listener_manager_listener_added{} 1

# TYPE envoy_server_live gauge
envoy_server_live{} 1

# TYPE envoy_server_initialization_time_ms histogram
envoy_server_initialization_time_ms_bucket{le="0.5"} 1
envoy_server_initialization_time_ms_bucket{le="1"} 1
envoy_server_initialization_time_ms_bucket{le="5"} 1
envoy_server_initialization_time_ms_bucket{le="10"} 2
envoy_server_initialization_time_ms_bucket{le="25"} 2
envoy_server_initialization_time_ms_bucket{le="50"} 2
envoy_server_initialization_time_ms_bucket{le="100"} 2
envoy_server_initialization_time_ms_bucket{le="250"} 2
envoy_server_initialization_time_ms_bucket{le="500"} 2
envoy_server_initialization_time_ms_bucket{le="1000"} 2
envoy_server_initialization_time_ms_bucket{le="2500"} 2
envoy_server_initialization_time_ms_bucket{le="5000"} 2
envoy_server_initialization_time_ms_bucket{le="10000"} 3
envoy_server_initialization_time_ms_bucket{le="30000"} 3
envoy_server_initialization_time_ms_bucket{le="60000"} 3
envoy_server_initialization_time_ms_bucket{le="300000"} 3
envoy_server_initialization_time_ms_bucket{le="600000"} 3
envoy_server_initialization_time_ms_bucket{le="1800000"} 3
envoy_server_initialization_time_ms_bucket{le="3600000"} 3
envoy_server_initialization_time_ms_bucket{le="+Inf"} 3
envoy_server_initialization_time_ms_sum{} 7007
envoy_server_initialization_time_ms_count{} 3

"#;
        assert_eq!(got, want);
    }

    /// Tagged histogram series keep their tags in extraction order with `le` last, and `?usedonly` drops
    /// what was never recorded, as Envoy's `OutputWithUsedOnly` shows.
    #[test]
    fn prometheus_histogram_tags_and_used_only() {
        let store = Store::new();
        store.histogram("cluster.b.upstream_rq_time").record(30);
        store.histogram("cluster.a.upstream_rq_time");
        store.counter("cluster.a.upstream_rq_total");
        let all = prometheus(&store, &TagProducer::default(), &Select::default());
        assert!(all.contains("envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"b\",le=\"50\"} 1\n"));
        assert!(all.contains("envoy_cluster_upstream_rq_time_sum{envoy_cluster_name=\"a\"} 0\n"));
        let a = all.find("{envoy_cluster_name=\"a\",le=\"0.5\"}");
        let b = all.find("{envoy_cluster_name=\"b\",le=\"0.5\"}");
        assert!(a < b, "series sorted by stat name");
        let used = prometheus(
            &store,
            &TagProducer::default(),
            &Select {
                used_only: true,
                filter: None,
            },
        );
        assert_eq!(used.matches("# TYPE").count(), 1, "{used}");
        assert!(!used.contains("envoy_cluster_name=\"a\""), "{used}");
    }

    #[test]
    fn envoy_default_tags() {
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
        let cases: &[Case] = &[
            (
                "cluster.backend.upstream_rq_total",
                "envoy_cluster_upstream_rq_total",
                &[("envoy_cluster_name", "backend")],
            ),
            (
                "cluster.backend.upstream_rq_2xx",
                "envoy_cluster_upstream_rq_xx",
                &[
                    ("envoy_response_code_class", "2"),
                    ("envoy_cluster_name", "backend"),
                ],
            ),
            (
                "cluster.backend.upstream_rq_503",
                "envoy_cluster_upstream_rq",
                &[("envoy_response_code", "503"), ("envoy_cluster_name", "backend")],
            ),
            (
                "cluster.backend.outlier_detection.ejections_active",
                "envoy_cluster_outlier_detection_ejections_active",
                &[("envoy_cluster_name", "backend")],
            ),
            (
                "http.ingress_http.downstream_rq_total",
                "envoy_http_downstream_rq_total",
                &[("envoy_http_conn_manager_prefix", "ingress_http")],
            ),
            (
                "listener.0.0.0.0_10000.downstream_cx_active",
                "envoy_listener_downstream_cx_active",
                &[("envoy_listener_address", "0.0.0.0_10000")],
            ),
            (
                "listener.0.0.0.0_10000.http.ingress_http.downstream_rq_2xx",
                "envoy_listener_http_downstream_rq_xx",
                &[
                    ("envoy_response_code_class", "2"),
                    ("envoy_http_conn_manager_prefix", "ingress_http"),
                    ("envoy_listener_address", "0.0.0.0_10000"),
                ],
            ),
            ("server.live", "envoy_server_live", &[]),
        ];
        let p = TagProducer::default();
        for (name, want, tags) in cases {
            let (got, got_tags) = prometheus_name(&p, name);
            assert_eq!(&got, want, "{name}");
            let got_tags: Vec<(&str, &str)> = got_tags.iter().map(|t| (t.label, t.value.as_str())).collect();
            assert_eq!(&got_tags, tags, "{name}");
        }
    }
}
