//! What `config/` ships for observability, held against the real thing:
//!
//! - `promtool check rules` accepts `config/prometheus/remora-alerts.yaml`, and every alert links a runbook that
//!   exists (`config/runbooks/<alert>.md`);
//! - a real Prometheus scrapes a real Remora after a traffic scenario (successes, upstream 5xx, a retry, a
//!   circuit-breaker overflow, an outlier ejection, traffic through the load-shedding filters), and every PromQL
//!   expression of `config/grafana/remora-dashboard.json` and of the alert rules returns data;
//! - every metric that the public Envoy dashboards in `../shared/envoy-corpus/dashboards/` query is in Remora's
//!   `/stats/prometheus`, except the explicit [`NOT_IMPLEMENTED`] list.
//!
//! Prometheus and promtool come from Debian's `prometheus` (`tests/run.sh` installs it). Without them a test
//! skips with a message, except in CI (`CI=true`), where their absence is a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::harness::{get, http1_client, within, TempDir, Upstream};
use crate::support::{bootstrap, cluster, routes, Proxy};

/// Metrics that the corpus dashboards query and Remora does not export yet, with the reason.
const NOT_IMPLEMENTED: &[(&str, &str)] = &[];

/// Metrics that the shipped alert rules use before Remora exports them: the rule is kept, its expression must
/// parse and run, and the day the metric appears this list must shrink (the test says so).
/// Metrics an alert uses that the scenario does not produce: (metric, why).
const PENDING: &[(&str, &str)] = &[(
    "envoy_control_plane_connected_state",
    "control_plane.connected_state exists only with an ADS control plane, which this scenario has none of",
)];

const SCRAPE_INTERVAL: &str = "1s";
/// What replaces `$__rate_interval` in the dashboard: long enough to hold the scrapes before and after the
/// traffic.
const RATE_WINDOW: &str = "1m";
const PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(30);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("CARGO_MANIFEST_DIR has no parent"))
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `tool` is on the PATH. Missing: fails in CI, otherwise false (the caller skips with a message).
fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()));
    if !found {
        assert!(
            !in_ci(),
            "{tool} is not installed: in CI it must be (tests/run.sh installs Debian's `prometheus`)"
        );
        eprintln!(
            "SKIPPED: {tool} is not installed (apt-get install prometheus); not in CI, so not a failure"
        );
    }
    found
}

// ---- the files under config/ ----

/// Every `expr` of the dashboard's panels, with Grafana's variables replaced: time windows by
/// [`RATE_WINDOW`], label filters (`$cluster`, `$instance`, ...) by `.*`.
fn dashboard_exprs(path: &Path) -> Vec<(String, String)> {
    let dashboard: Value =
        serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    collect_exprs(&dashboard, "", &mut out);
    let var = regex::Regex::new(r"\$\{?(\w+)\}?").unwrap_or_else(|e| panic!("{e}"));
    out.into_iter()
        .map(|(title, expr)| {
            let expr = var
                .replace_all(&expr, |c: &regex::Captures| match &c[1] {
                    "__rate_interval" | "__interval" | "__range" => RATE_WINDOW.to_owned(),
                    _ => ".*".to_owned(),
                })
                .into_owned();
            (title, expr)
        })
        .collect()
}

/// `(panel title, expr)` for every `expr` in a Grafana dashboard's JSON.
fn collect_exprs(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            let title = map.get("title").and_then(Value::as_str).unwrap_or(title);
            for (k, child) in map {
                match (k.as_str(), child) {
                    ("expr", Value::String(e)) if !e.trim().is_empty() => {
                        out.push((title.to_owned(), e.clone()));
                    }
                    _ => collect_exprs(child, title, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, title, out)),
        _ => {}
    }
}

struct Rule {
    alert: String,
    expr: String,
    runbook_url: String,
}

fn alert_rules(path: &Path) -> Vec<Rule> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut rules = Vec::new();
    for group in doc["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let field = |v: &serde_yaml::Value| v.as_str().unwrap_or_default().trim().to_owned();
            rules.push(Rule {
                alert: field(&rule["alert"]),
                expr: field(&rule["expr"]),
                runbook_url: field(&rule["annotations"]["runbook_url"]),
            });
        }
    }
    assert!(!rules.is_empty(), "no rules in {}", path.display());
    rules
}

/// An alert expression with every comparison against a number turned into a `bool` comparison: it returns
/// 0/1 series instead of dropping the ones below the threshold, so "returns data" means the metrics it reads
/// exist and the arithmetic between them matches, whether the alert would fire or not.
fn without_thresholds(expr: &str) -> String {
    let cmp = regex::Regex::new(r"(==|!=|>=|<=|>|<)\s*(-?[0-9])").unwrap_or_else(|e| panic!("{e}"));
    cmp.replace_all(expr, "$1 bool $2").into_owned()
}

#[test]
fn promtool_accepts_the_alert_rules_and_every_alert_has_its_runbook() {
    let root = repo_root();
    let rules_path = root.join("config/prometheus/remora-alerts.yaml");
    for rule in alert_rules(&rules_path) {
        assert!(!rule.alert.is_empty(), "a rule without a name: {}", rule.expr);
        let want = format!("config/runbooks/{}.md", rule.alert);
        assert!(
            rule.runbook_url.ends_with(&want),
            "{}: runbook_url {:?} should point at {want}",
            rule.alert,
            rule.runbook_url
        );
        let runbook = read(&root.join(&want));
        assert!(
            runbook.starts_with(&format!("# {}\n", rule.alert)),
            "{want} should be titled with the alert's name"
        );
    }
    if !have("promtool") {
        return;
    }
    let out = std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules_path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- Prometheus ----

/// A Prometheus server scraping one target, killed (and waited for, bounded) on [`Prometheus::stop`] or drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr, rules: &Path) -> Prometheus {
        let dir = TempDir::new();
        let config = format!(
            "global: {{scrape_interval: {SCRAPE_INTERVAL}, evaluation_interval: {SCRAPE_INTERVAL}}}\n\
             rule_files: [{rules:?}]\n\
             scrape_configs:\n\
             - job_name: remora\n  metrics_path: /stats/prometheus\n  \
             static_configs: [{{targets: [\"{target}\"]}}]\n"
        );
        let config_path = dir.write("prometheus.yml", &config);
        // Prometheus takes an address, not a socket: a port bound then freed, the usual small race.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
            l.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}"))
        };
        let log = std::fs::File::create(dir.path().join("prometheus.log"))
            .unwrap_or_else(|e| panic!("prometheus.log: {e}"));
        let log2 = log.try_clone().unwrap_or_else(|e| panic!("prometheus.log: {e}"));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start prometheus: {e}"));
        let mut p = Prometheus { child, addr, dir };
        let deadline = Instant::now() + PROMETHEUS_TIMEOUT;
        while p
            .try_get("/-/ready")
            .await
            .is_none_or(|(s, _)| s != StatusCode::OK)
        {
            p.wait_a_little("/-/ready to answer 200", deadline).await;
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn try_get(&self, path: &str) -> Option<(StatusCode, String)> {
        let client = http1_client(self.addr).with_timeout(Duration::from_secs(5));
        let reply = client.try_get(path, &[]).await.ok()?;
        Some((reply.status, reply.text()))
    }

    /// Sleeps before the next look at `what`; fails with Prometheus's log if it exited or `deadline` passed.
    async fn wait_a_little(&mut self, what: &str, deadline: Instant) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("prometheus exited ({status}) waiting for {what}:\n{}", self.log());
        }
        if Instant::now() >= deadline {
            panic!(
                "prometheus: no {what} after {PROMETHEUS_TIMEOUT:?}:\n{}",
                self.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Waits until the target is up and has been scraped without error.
    async fn wait_scraped(&mut self) {
        let deadline = Instant::now() + PROMETHEUS_TIMEOUT;
        loop {
            if let Some((_, body)) = self.try_get("/api/v1/targets").await {
                let targets: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let up = targets["data"]["activeTargets"]
                    .as_array()
                    .is_some_and(|ts| ts.iter().any(|t| t["health"] == "up" && t["lastError"] == ""));
                if up {
                    return;
                }
            }
            self.wait_a_little("successful scrape of Remora", deadline).await;
        }
    }

    /// Waits until `promql`'s first value is at least `want`.
    async fn wait_value(&mut self, promql: &str, want: f64) {
        let deadline = Instant::now() + PROMETHEUS_TIMEOUT;
        loop {
            let answer = self.query(promql).await;
            let got = answer["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok());
            if got.is_some_and(|v| v >= want) {
                return;
            }
            self.wait_a_little(&format!("{promql} >= {want} (last {got:?})"), deadline)
                .await;
        }
    }

    /// `GET /api/v1/query`: the JSON answer (`status`, `data.result`), failing on a transport error.
    async fn query(&self, promql: &str) -> Value {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) = self
            .try_get(&path)
            .await
            .unwrap_or_else(|| panic!("prometheus did not answer the query {promql}\n{}", self.log()));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("query {promql}: {status} {e}: {body}"))
    }

    /// Kills Prometheus and waits (bounded) for it to go.
    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = within(Duration::from_secs(10), "prometheus to exit", self.child.wait()).await;
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn result_len(answer: &Value) -> usize {
    match &answer["data"]["result"] {
        Value::Array(items) if answer["data"]["resultType"] == "scalar" => usize::from(!items.is_empty()),
        Value::Array(items) => items.len(),
        _ => 0,
    }
}

// ---- the scenario ----

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// One listener (`main`, stat_prefix `ingress`) with routes to `backend` (successes), `flaky` (retry on
/// 5xx, outlier detection) and `slow` (`max_requests: 1`); a second, `shed` (stat_prefix `shed`), with the
/// local rate limit, admission control and adaptive concurrency filters in front of the router.
fn scenario_config(origin: SocketAddr) -> Value {
    let table = routes(vec![
        json!({"match": {"prefix": "/status/"}, "route": {"cluster": "flaky",
            "retry_policy": {"retry_on": "5xx", "num_retries": 1}}}),
        json!({"match": {"prefix": "/delay/"}, "route": {"cluster": "slow"}}),
        json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}}),
    ]);
    let mut flaky = cluster("flaky", &[origin]);
    flaky["outlier_detection"] = json!({
        "consecutive_5xx": 2, "interval": "1s", "base_ejection_time": "300s", "max_ejection_percent": 100});
    let mut slow = cluster("slow", &[origin]);
    slow["circuit_breakers"] = json!({"thresholds": [{"max_requests": 1}]});
    let clusters = vec![cluster("backend", &[origin]), flaky, slow];
    let mut config = bootstrap(table, clusters, Value::Null);
    let shed_filters = json!([
        {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "http_local_rate_limiter",
            "token_bucket": {"max_tokens": 10000, "tokens_per_fill": 10000, "fill_interval": "1s"},
            "filter_enabled": {"default_value": {"numerator": 100}, "runtime_key": "rl.enabled"},
            "filter_enforced": {"default_value": {"numerator": 100}, "runtime_key": "rl.enforced"}}},
        {"name": "envoy.filters.http.admission_control", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.admission_control.v3.AdmissionControl",
            "success_criteria": {}}},
        {"name": "envoy.filters.http.adaptive_concurrency", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency",
            "gradient_controller_config": {
                "concurrency_limit_params": {"concurrency_update_interval": "0.1s"},
                "min_rtt_calc_params": {"interval": "10s", "request_count": 5}}}},
        {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
    ]);
    let shed = json!({
        "name": "shed",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
            "typed_config": {"@type": HCM_TYPE, "stat_prefix": "shed",
                "route_config": routes(vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}})]),
                "http_filters": shed_filters}}]}],
    });
    // A TCP proxy listener and a TLS listener (an inline self-signed certificate), for the dashboards' tcp.*
    // and certificate-expiry panels.
    let tcp = json!({
        "name": "tcp",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "tcp_backend", "cluster": "backend"}}]}],
    });
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .and_then(|p| p.self_signed(&key))
        .unwrap_or_else(|e| panic!("certificate: {e}"));
    let tls = json!({
        "name": "tls",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{
            "filters": [{"name": "envoy.filters.network.http_connection_manager",
                "typed_config": {"@type": HCM_TYPE, "stat_prefix": "tls",
                    "route_config": routes(vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "backend"}})]),
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}],
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {"tls_certificates": [{
                    "certificate_chain": {"inline_string": cert.pem()},
                    "private_key": {"inline_string": key.serialize_pem()}}]}}},
        }],
    });
    match config["static_resources"]["listeners"].as_array_mut() {
        Some(listeners) => listeners.extend([shed, tcp, tls]),
        None => panic!("bootstrap without listeners: {config}"),
    }
    config
}

/// Successes on both listeners, a 503 retried once, a breaker overflow; asserts that Remora counted each.
async fn run_traffic(proxy: &Proxy) {
    let main = proxy.h1();
    for _ in 0..20 {
        assert_eq!(main.get("/ok", &[]).await.status, StatusCode::OK);
    }
    let shed_addr = proxy.remora.listener_addr("shed").await;
    for _ in 0..5 {
        assert_eq!(get(shed_addr, "/shed", &[]).await.0, StatusCode::OK);
    }
    // HTTP through the TCP proxy listener.
    let tcp_addr = proxy.remora.listener_addr("tcp").await;
    assert_eq!(get(tcp_addr, "/through-tcp", &[]).await.0, StatusCode::OK);
    // 503 from the upstream, retried once (two 5xx in a row: the host is also ejected).
    assert_eq!(
        main.get("/status/503", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Three at once on a cluster that takes one: the others overflow (503 UO, x-envoy-overloaded).
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let c = proxy.h1();
            tokio::spawn(async move { c.get("/delay/300", &[]).await })
        })
        .collect();
    let mut overloaded = 0;
    for r in slow {
        let reply = r.await.unwrap_or_else(|e| panic!("slow request task: {e}"));
        if reply.header("x-envoy-overloaded") == Some("true") {
            overloaded += 1;
        }
    }
    assert!(overloaded >= 1, "no request overflowed the breaker");
    let stats = proxy.remora.stats().await;
    for (name, at_least) in [
        ("cluster.backend.upstream_rq_2xx", 25),
        ("cluster.flaky.upstream_rq_retry", 1),
        ("cluster.flaky.retry.upstream_rq_5xx", 1),
        ("cluster.flaky.outlier_detection.ejections_enforced_total", 1),
        ("cluster.slow.upstream_rq_pending_overflow", 1),
        ("http.shed.downstream_rq_2xx", 5),
    ] {
        let got = stats.get(name).copied().unwrap_or(0);
        assert!(got >= at_least, "{name} = {got}, want >= {at_least}");
    }
}

/// Metric names in a Prometheus text exposition.
fn exported_metrics(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_queries_return_data_from_a_real_prometheus() {
    if !have("prometheus") {
        return;
    }
    let root = repo_root();
    let rules_path = root.join("config/prometheus/remora-alerts.yaml");
    let origin = Upstream::start("origin").await;
    let proxy = Proxy::start(&scenario_config(origin.addr()), &[]).await;
    let mut prom = Prometheus::start(proxy.remora.admin_addr(), &rules_path).await;

    // A scrape before the traffic, so that rates over the window have a before and an after.
    prom.wait_scraped().await;
    run_traffic(&proxy).await;
    // Then a scrape that saw all of it.
    let total: i64 = proxy
        .remora
        .stats()
        .await
        .iter()
        .filter(|(k, _)| k.starts_with("cluster.") && k.ends_with(".upstream_rq_total"))
        .map(|(_, v)| v)
        .sum();
    prom.wait_value("sum(envoy_cluster_upstream_rq_total)", total as f64)
        .await;
    // And two more, so that series born during the traffic (per-code counters) have two samples to rate.
    let scrapes = "count_over_time(envoy_server_uptime[5m])";
    let seen = prom.query(scrapes).await["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    prom.wait_value(scrapes, seen + 2.0).await;

    let (_, exposition) = proxy.remora.admin_get("/stats/prometheus").await;
    let exported = exported_metrics(&exposition);
    let mut failures = Vec::new();
    for (title, expr) in dashboard_exprs(&root.join("config/grafana/remora-dashboard.json")) {
        let answer = prom.query(&expr).await;
        if answer["status"] != "success" || result_len(&answer) == 0 {
            failures.push(format!("dashboard panel {title:?}: {expr}\n  -> {answer}"));
        }
    }
    for rule in alert_rules(&rules_path) {
        let answer = prom.query(&rule.expr).await;
        if answer["status"] != "success" {
            failures.push(format!("alert {}: {}\n  -> {answer}", rule.alert, rule.expr));
            continue;
        }
        if let Some((metric, why)) = PENDING.iter().find(|(m, _)| rule.expr.contains(m)) {
            assert!(
                !exported.contains(*metric),
                "{metric} is exported now: remove it from PENDING ({why}) so that alert {} is checked",
                rule.alert
            );
            eprintln!(
                "alert {}: not checked for data, {metric} is pending: {why}",
                rule.alert
            );
            continue;
        }
        let base = without_thresholds(&rule.expr);
        let answer = prom.query(&base).await;
        if answer["status"] != "success" || result_len(&answer) == 0 {
            failures.push(format!("alert {}: {base}\n  -> {answer}", rule.alert));
        }
    }
    prom.stop().await;
    assert!(
        failures.is_empty(),
        "{} expression(s) returned no data:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---- the public Envoy dashboards ----

/// The metrics a Grafana dashboard's expressions query: `envoy_...` names that are not label names (a label
/// is followed by a matcher, or listed in `by (...)`/`without (...)`).
fn dashboard_metrics(path: &Path) -> BTreeSet<String> {
    let dashboard: Value =
        serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, "", &mut exprs);
    let name = regex::Regex::new(r"envoy_[a-z0-9_]+").unwrap_or_else(|e| panic!("{e}"));
    let grouping = regex::Regex::new(r"(?:by|without)\s*\(([^)]*)\)").unwrap_or_else(|e| panic!("{e}"));
    let mut metrics = BTreeSet::new();
    for (_, expr) in exprs {
        let labels: BTreeSet<&str> = grouping
            .captures_iter(&expr)
            .flat_map(|c| c.get(1).map_or("", |m| m.as_str()).split(','))
            .map(str::trim)
            .collect();
        for m in name.find_iter(&expr) {
            let after = expr[m.end()..].trim_start();
            let is_matcher = after.starts_with('=') || after.starts_with("!=") || after.starts_with("!~");
            if !is_matcher && !labels.contains(m.as_str()) {
                metrics.insert(m.as_str().to_owned());
            }
        }
    }
    metrics
}

/// `<repo>/../shared/envoy-corpus/dashboards`, looked for from the repository up (a git worktree sits deeper
/// than the main checkout). Missing: a failure in CI, a skip elsewhere.
fn corpus_dashboards() -> Option<PathBuf> {
    let root = repo_root();
    let found = root
        .ancestors()
        .skip(1)
        .map(|dir| dir.join("shared/envoy-corpus/dashboards"))
        .find(|dir| dir.is_dir());
    if found.is_none() {
        let want = root.join("../shared/envoy-corpus/dashboards");
        assert!(!in_ci(), "no envoy corpus at {}", want.display());
        eprintln!("SKIPPED: no envoy corpus at {} or above", want.display());
    }
    found
}

#[tokio::test]
async fn public_envoy_dashboards_find_their_metrics() {
    let Some(corpus) = corpus_dashboards() else {
        return;
    };
    let mut queried: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let entries = std::fs::read_dir(&corpus).unwrap_or_else(|e| panic!("{}: {e}", corpus.display()));
    for entry in entries {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if path.extension().is_some_and(|x| x == "json") {
            let file = path
                .file_name()
                .map_or(String::new(), |f| f.to_string_lossy().into_owned());
            for m in dashboard_metrics(&path) {
                queried.entry(m).or_default().push(file.clone());
            }
        }
    }
    assert!(
        queried.len() > 10,
        "too few metrics found in {}: {queried:?}",
        corpus.display()
    );

    let origin = Upstream::start("origin").await;
    let proxy = Proxy::start(&scenario_config(origin.addr()), &[]).await;
    run_traffic(&proxy).await;
    let (status, exposition) = proxy.remora.admin_get("/stats/prometheus").await;
    assert_eq!(status, StatusCode::OK);
    let exported = exported_metrics(&exposition);

    let mut missing = Vec::new();
    for (metric, files) in &queried {
        let pending = NOT_IMPLEMENTED.iter().find(|(m, _)| m == metric);
        match (exported.contains(metric), pending) {
            (true, None) => {}
            (false, None) => missing.push(format!("{metric} (queried by {})", files.join(", "))),
            (true, Some((_, why))) => {
                panic!("{metric} is exported now: remove it from NOT_IMPLEMENTED ({why}) and the README")
            }
            (false, Some(_)) => {}
        }
    }
    assert!(
        missing.is_empty(),
        "metrics the public dashboards query that Remora does not export:\n{}",
        missing.join("\n")
    );
    for (metric, why) in NOT_IMPLEMENTED {
        assert!(
            queried.contains_key(*metric),
            "{metric} is listed as not implemented ({why}) but no dashboard queries it"
        );
    }
}
