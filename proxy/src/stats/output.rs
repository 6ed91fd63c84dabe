//! The admin's renderings of the store: Envoy's text format and JSON.

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

/// One default tag extractor: a regex whose first capture group is removed from the name and whose second is
/// the tag's value, as Envoy's `well_known_names.cc` defines them (the subset whose stats Remora has).
struct Extractor {
    tag: &'static str,
    re: regex::Regex,
}

fn extractors() -> &'static [Extractor] {
    static X: std::sync::OnceLock<Vec<Extractor>> = std::sync::OnceLock::new();
    X.get_or_init(|| {
        [
            ("envoy_response_code", r"_rq(_(\d{3}))$"),
            ("envoy_response_code_class", r"_rq_((\d))xx$"),
            ("envoy_cluster_name", r"^cluster\.(([^\.]+)\.)"),
            (
                "envoy_http_conn_manager_prefix",
                r"^listener(?:\.[^\.]+)*?\.http\.(([^\.]+)\.)",
            ),
            ("envoy_http_conn_manager_prefix", r"^http\.(([^\.]+)\.)"),
            (
                "envoy_listener_address",
                r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
            ),
            ("envoy_tcp_prefix", r"^tcp\.(([^\.]+)\.)\w+?$"),
        ]
        .into_iter()
        .filter_map(|(tag, re)| regex::Regex::new(re).ok().map(|re| Extractor { tag, re }))
        .collect()
    })
}

/// Split a stat name into Prometheus name and labels with Envoy's default tag extraction.
pub fn prometheus_name(name: &str) -> (String, Vec<(&'static str, String)>) {
    let mut rest = name.to_string();
    let mut tags: Vec<(&'static str, String)> = Vec::new();
    for x in extractors() {
        if tags.iter().any(|(t, _)| *t == x.tag) {
            continue;
        }
        let Some(c) = x.re.captures(&rest) else { continue };
        let (Some(remove), Some(value)) = (c.get(1), c.get(2)) else {
            continue;
        };
        let value = value.as_str().to_string();
        let (start, end) = (remove.start(), remove.end());
        // Remove the group, and a separator left doubled by the removal.
        let mut new = String::with_capacity(rest.len());
        new.push_str(&rest[..start]);
        new.push_str(&rest[end..]);
        if new.ends_with('.') || new.ends_with('_') {
            new.pop();
        }
        rest = new.replace("..", ".");
        tags.push((x.tag, value));
    }
    let mut out = String::from("envoy_");
    for ch in rest.chars() {
        out.push(if ch.is_ascii_alphanumeric() || ch == '_' {
            ch
        } else {
            '_'
        });
    }
    (out, tags)
}

fn labels(tags: &[(&'static str, String)], extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = tags
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn prom_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// `/stats/prometheus`: Envoy's layout: counters, then gauges, then histograms; one `# TYPE` line per name with
/// its series sorted by labels; a blank line between groups.
pub fn prometheus(store: &Store, sel: &Select) -> String {
    use std::collections::BTreeMap;
    let mut counters: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut gauges: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    type Tags = Vec<(&'static str, String)>;
    let mut hists: BTreeMap<String, Vec<(Tags, super::HistogramSnapshot)>> = BTreeMap::new();
    for (name, m) in store.snapshot() {
        if !sel.keep(&name, &m) {
            continue;
        }
        let (pname, tags) = prometheus_name(&name);
        match m {
            Metric::Counter(c) => counters
                .entry(pname)
                .or_default()
                .push((labels(&tags, None), c.value().to_string())),
            Metric::Gauge(g) => gauges
                .entry(pname)
                .or_default()
                .push((labels(&tags, None), g.value().to_string())),
            Metric::Histogram(h) => hists.entry(pname).or_default().push((tags, h.snapshot())),
        }
    }
    let mut out = String::new();
    for (kind, group) in [("counter", &mut counters), ("gauge", &mut gauges)] {
        for (name, series) in group.iter_mut() {
            series.sort();
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (l, v) in series.iter() {
                let _ = writeln!(out, "{name}{l} {v}");
            }
            out.push('\n');
        }
    }
    for (name, series) in hists.iter_mut() {
        series.sort_by(|a, b| a.0.cmp(&b.0));
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (tags, snap) in series.iter() {
            let cum = snap.cumulative();
            for (i, bound) in super::histogram::ENVOY_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {}",
                    labels(tags, Some(("le", prom_number(*bound)))),
                    cum[i]
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{} {}",
                labels(tags, Some(("le", "+Inf".into()))),
                snap.count
            );
            let _ = writeln!(out, "{name}_sum{} {}", labels(tags, None), snap.sum);
            let _ = writeln!(out, "{name}_count{} {}", labels(tags, None), snap.count);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::prometheus_name;

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
        for (name, want, tags) in cases {
            let (got, got_tags) = prometheus_name(name);
            assert_eq!(&got, want, "{name}");
            let got_tags: Vec<(&str, &str)> = got_tags.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(&got_tags, tags, "{name}");
        }
    }
}
