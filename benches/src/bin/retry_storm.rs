//! The retry storm, reproduced (issue 4): a "payments" service of fixed capacity behind Remora, offered a steady
//! open-loop load near 70 % of capacity; in the middle of the run payments degrades (service time × 10) and
//! Remora's route retries (`retry_on: 5xx,reset,connect-failure`, `num_retries: 3`, a per-try timeout) pile onto
//! it. Payments runs as several hosts (3 by default), each with its own capacity; the degradation hits
//! `--degraded` of them (1 by default: one bad replica, the case outlier detection exists for; `--degraded 3` is
//! the whole service slowing down, which no ejection can help). Four arms, each its own Remora and its own fresh
//! upstreams:
//!
//! - `no-budget`: every circuit-breaker threshold raised out of the way (`max_retries: 10000`);
//! - `envoy-default`: no `circuit_breakers` at all, so Envoy's defaults (1024 connections, pending, requests;
//!   `max_retries: 3`);
//! - `budget`: the retry budget alone, `retry_budget {budget_percent: 20, min_retry_concurrency: 3}`, to tell its
//!   effect from outlier detection's;
//! - `budget+outlier`: Remora's recommended policy, the same retry budget and `outlier_detection` (consecutive
//!   5xx / gateway failures) with `max_ejection_percent` no larger than the cluster's headroom: at 70 % load,
//!   25 % (`--max-ejection-percent`). With the default 3 hosts one host is 33 % > 25 %, so an ejection is
//!   counted in `ejections_overflow` and not enforced: the two others could not carry the load (at
//!   `max_ejection_percent: 50` they must, at 105 %, and the cluster collapses; see the README). With 4 hosts
//!   (`--hosts 4 --slots 5`) one host may go and the other three run at 93 %.
//!
//! Per arm: upstream attempts ÷ offered requests during and after the degradation (and the share of attempts that
//! went to the degraded hosts), client success per second, the time from the end of the degradation until
//! success is back above 99 % (for good: every later second), and outlier ejections.
//!
//! ```text
//! cargo build --release -p remora
//! cargo run --release -p remora-benches --bin retry_storm -- [--quick] [--remora PATH] [--out DIR]
//!     [--hosts 3] [--degraded 1] [--slots 7] [--service-ms 20] [--load 0.7] [--per-try-ms 300] [--workers 1]
//!     [--max-ejection-percent 25]
//! ```
//!
//! Writes `benches/results/<date>-retry-storm/{results.md, plot.svg}` (or `--out DIR`).

use std::sync::Arc;
use std::time::Duration;

use remora_benches::scenario::{
    flag, markdown_table, remora_binary, results_dir, run_load, svg_plot, CapacityUpstream, Error, H2Client,
    Panel, PerSecond, Record, RemoraProcess, Series,
};
use serde_json::{json, Value};
use tokio::time::Instant;

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const HTTP_OPTIONS: &str = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

#[derive(Clone, Copy)]
enum Arm {
    NoBudget,
    EnvoyDefault,
    BudgetOnly,
    Budget,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::NoBudget => "no-budget",
            Arm::EnvoyDefault => "envoy-default",
            Arm::BudgetOnly => "budget",
            Arm::Budget => "budget+outlier",
        }
    }

    fn color(self) -> &'static str {
        match self {
            Arm::NoBudget => "#d62728",
            Arm::EnvoyDefault => "#1f77b4",
            Arm::BudgetOnly => "#ff7f0e",
            Arm::Budget => "#2ca02c",
        }
    }

    /// The payments cluster's resilience fields.
    fn cluster_fields(self, p: &Params) -> Value {
        match self {
            Arm::NoBudget => json!({"circuit_breakers": {"thresholds": [{
                "priority": "DEFAULT", "max_connections": 100000, "max_pending_requests": 100000,
                "max_requests": 100000, "max_retries": 10000}]}}),
            Arm::EnvoyDefault => json!({}),
            Arm::BudgetOnly => json!({
                "circuit_breakers": {"thresholds": [{"priority": "DEFAULT",
                    "retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 3}}]},
            }),
            Arm::Budget => json!({
                "circuit_breakers": {"thresholds": [{"priority": "DEFAULT",
                    "retry_budget": {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 3}}]},
                "outlier_detection": {"consecutive_5xx": 5, "consecutive_gateway_failure": 5,
                    "interval": "1s", "base_ejection_time": "5s",
                    "max_ejection_percent": p.max_ejection_percent},
            }),
        }
    }
}

struct Params {
    duration: u64,
    degrade_from: u64,
    degrade_to: u64,
    hosts: usize,
    degraded: usize,
    /// Per host.
    slots: usize,
    service: Duration,
    rate: f64,
    per_try: Duration,
    route_timeout: Duration,
    client_timeout: Duration,
    workers: u32,
    /// The recommended arm's `outlier_detection.max_ejection_percent`.
    max_ejection_percent: u32,
}

fn config(arm: Arm, upstreams: &[std::net::SocketAddr], p: &Params) -> Value {
    let endpoints: Vec<Value> = upstreams
        .iter()
        .map(|a| {
            json!({"endpoint": {"address": {"socket_address": {
                "address": a.ip().to_string(), "port_value": a.port()}}}})
        })
        .collect();
    let mut cluster = json!({
        "name": "payments",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "payments", "endpoints": [{"lb_endpoints": endpoints}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}},
    });
    if let (Some(c), Value::Object(extra)) = (cluster.as_object_mut(), arm.cluster_fields(p)) {
        c.extend(extra);
    }
    let route = json!({"match": {"prefix": "/"}, "route": {
        "cluster": "payments",
        "timeout": format!("{}s", p.route_timeout.as_secs_f64()),
        "retry_policy": {"retry_on": "5xx,reset,connect-failure", "num_retries": 3,
            "per_try_timeout": format!("{}s", p.per_try.as_secs_f64())}}});
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {"@type": HCM, "stat_prefix": "ingress",
                        "route_config": {"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"],
                            "routes": [route]}]},
                        "http_filters": [{"name": "envoy.filters.http.router",
                            "typed_config": {"@type": ROUTER}}]}}]}],
            }],
            "clusters": [cluster],
        },
    })
}

struct ArmResult {
    arm: Arm,
    offered: Vec<u64>,
    attempts: Vec<u64>,
    /// Attempts that went to the degraded hosts.
    attempts_degraded: Vec<u64>,
    success: Vec<f64>,
    amp_during: f64,
    /// Share of the attempts during the degradation that went to the degraded hosts.
    degraded_share_during: f64,
    amp_after: f64,
    success_during: f64,
    success_after: f64,
    recovery: Option<u64>,
    retries: i64,
    retry_overflow: i64,
    rq_overflow: i64,
    ejections: i64,
    ejections_overflow: i64,
}

async fn run_arm(binary: &std::path::Path, arm: Arm, p: &Params) -> Result<ArmResult, Error> {
    let mut upstreams = Vec::with_capacity(p.hosts);
    for _ in 0..p.hosts {
        upstreams.push(CapacityUpstream::start(p.slots, p.service).await?);
    }
    let addrs: Vec<_> = upstreams.iter().map(CapacityUpstream::addr).collect();
    let remora = RemoraProcess::start(binary, &config(arm, &addrs, p), p.workers, arm.name()).await?;
    let addr = remora.listener("main").await?;
    let client = Arc::new(H2Client::new(addr, 4));
    let seconds = p.duration as usize;
    let start = Instant::now();
    let arrivals = Arc::new(PerSecond::new(start, seconds));
    let arrivals_degraded = Arc::new(PerSecond::new(start, seconds));
    let (degraded, healthy) = upstreams.split_at(p.degraded);
    for u in degraded {
        u.count_arrivals(Some(arrivals_degraded.clone()));
    }
    for u in healthy {
        u.count_arrivals(Some(arrivals.clone()));
    }
    let (from, to) = (p.degrade_from, p.degrade_to);
    let rate = p.rate;
    let records = run_load(
        client,
        "/pay",
        Duration::from_secs(p.duration),
        p.client_timeout,
        |_| rate,
        |s| {
            for u in degraded {
                u.set_slowdown(if (from..to).contains(&s) { 10 } else { 1 });
            }
        },
        start,
    )
    .await;
    for u in &upstreams {
        u.count_arrivals(None);
    }
    let attempts_degraded = arrivals_degraded.snapshot();
    let attempts: Vec<u64> = arrivals
        .snapshot()
        .iter()
        .zip(&attempts_degraded)
        .map(|(h, d)| h + d)
        .collect();
    let mut offered = vec![0u64; seconds];
    let mut ok = vec![0u64; seconds];
    for r in &records {
        let s = (r.sent.as_secs() as usize).min(seconds - 1);
        offered[s] += 1;
        ok[s] += u64::from(Record::ok(r));
    }
    let success: Vec<f64> = offered
        .iter()
        .zip(&ok)
        .map(|(&o, &k)| if o == 0 { 1.0 } else { k as f64 / o as f64 })
        .collect();
    let sum = |v: &[u64], a: u64, b: u64| v[a as usize..b as usize].iter().sum::<u64>() as f64;
    let end = p.duration;
    let recovery = (to..end)
        .find(|&s| success[s as usize..].iter().all(|&x| x >= 0.99))
        .map(|s| s - to);
    let result = ArmResult {
        arm,
        amp_during: sum(&attempts, from, to) / sum(&offered, from, to).max(1.0),
        degraded_share_during: sum(&attempts_degraded, from, to) / sum(&attempts, from, to).max(1.0),
        amp_after: sum(&attempts, to, end) / sum(&offered, to, end).max(1.0),
        success_during: sum(&ok, from, to) / sum(&offered, from, to).max(1.0),
        success_after: sum(&ok, to, end) / sum(&offered, to, end).max(1.0),
        recovery,
        retries: remora.stat("cluster.payments.upstream_rq_retry").await?,
        retry_overflow: remora.stat("cluster.payments.upstream_rq_retry_overflow").await?,
        rq_overflow: remora
            .stat("cluster.payments.upstream_rq_pending_overflow")
            .await?,
        ejections: remora
            .stat("cluster.payments.outlier_detection.ejections_enforced_total")
            .await?,
        ejections_overflow: remora
            .stat("cluster.payments.outlier_detection.ejections_overflow")
            .await?,
        offered,
        attempts,
        attempts_degraded,
        success,
    };
    Ok(result)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let binary = remora_binary(&args)?;
    let (duration, degrade_from, degrade_to) = if quick { (12, 4, 8) } else { (30, 10, 20) };
    let hosts: usize = flag(&args, "--hosts", 3)?;
    let degraded: usize = flag::<usize>(&args, "--degraded", 1)?.min(hosts);
    let slots: usize = flag(&args, "--slots", 7)?;
    let service = Duration::from_millis(flag(&args, "--service-ms", 20)?);
    let capacity = (hosts * slots) as f64 / service.as_secs_f64();
    let load: f64 = flag(&args, "--load", 0.7)?;
    let p = Params {
        duration,
        degrade_from,
        degrade_to,
        hosts,
        degraded,
        slots,
        service,
        rate: capacity * load,
        per_try: Duration::from_millis(flag(&args, "--per-try-ms", 300)?),
        route_timeout: Duration::from_millis(1500),
        client_timeout: Duration::from_secs(2),
        workers: flag(&args, "--workers", 1)?,
        max_ejection_percent: flag(&args, "--max-ejection-percent", 25)?,
    };
    let out = match flag(&args, "--out", String::new())? {
        d if d.is_empty() => results_dir("retry-storm")?,
        d => {
            std::fs::create_dir_all(&d)?;
            d.into()
        }
    };

    let mut results = Vec::new();
    for arm in [Arm::NoBudget, Arm::EnvoyDefault, Arm::BudgetOnly, Arm::Budget] {
        eprintln!("retry_storm: arm {} ({duration} s)", arm.name());
        results.push(run_arm(&binary, arm, &p).await?);
    }

    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.arm.name().to_owned(),
                format!("{:.2}×", r.amp_during),
                format!("{:.0} %", r.degraded_share_during * 100.0),
                format!("{:.2}×", r.amp_after),
                format!("{:.1} %", r.success_during * 100.0),
                format!("{:.1} %", r.success_after * 100.0),
                r.recovery.map_or_else(
                    || format!("> {} s (not in run)", duration - degrade_to),
                    |s| format!("{s} s"),
                ),
                r.retries.to_string(),
                r.retry_overflow.to_string(),
                r.rq_overflow.to_string(),
                r.ejections.to_string(),
                r.ejections_overflow.to_string(),
            ]
        })
        .collect();
    let mut md = format!(
        "# Retry storm ({})\n\nPayments: {hosts} hosts × {slots} slots × {} ms = {capacity:.0} rps; offered {:.0} rps \
         open-loop ({:.0} %), {duration} s; service time × 10 on {degraded} of the {hosts} hosts from \
         t = {degrade_from} s to t = {degrade_to} s. Round-robin. Route: \
         `retry_on: 5xx,reset,connect-failure`, `num_retries: 3`, `per_try_timeout: {} ms`, `timeout: {} ms`; \
         client timeout {} ms; upstream over h2c; Remora `--concurrency {}`.\n\n\
         Amplification = requests arriving at payments ÷ requests offered by clients, in the window; \"to degraded\" \
         = share of the attempts during the degradation that went to the degraded host(s). Recovery = seconds \
         after the degradation ends until every later second has ≥ 99 % client success. Ejections = \
         `outlier_detection.ejections_enforced_total`; the recommended arm has `max_ejection_percent: {}`.\n\n",
        if quick { "quick" } else { "full" },
        service.as_millis(),
        p.rate,
        load * 100.0,
        p.per_try.as_millis(),
        p.route_timeout.as_millis(),
        p.client_timeout.as_millis(),
        p.workers,
        p.max_ejection_percent,
    );
    md.push_str(&markdown_table(
        &[
            "arm",
            "amplification during",
            "to degraded",
            "amplification after",
            "success during",
            "success after",
            "recovery",
            "upstream_rq_retry",
            "upstream_rq_retry_overflow",
            "upstream_rq_pending_overflow",
            "ejections",
            "ejections_overflow",
        ],
        &rows,
    ));
    md.push_str("\nClient success per second (%):\n\n");
    let mut headers = vec!["t (s)".to_owned()];
    headers.extend(results.iter().map(|r| r.arm.name().to_owned()));
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let per_second: Vec<Vec<String>> = (0..duration as usize)
        .map(|s| {
            let mut row = vec![s.to_string()];
            row.extend(
                results
                    .iter()
                    .map(|r| format!("{:.1} ({}/{})", r.success[s] * 100.0, r.attempts[s], r.offered[s])),
            );
            row
        })
        .collect();
    md.push_str(&markdown_table(&header_refs, &per_second));
    md.push_str("\n(each cell: success % (upstream attempts / offered requests) in that second)\n");

    let shade = vec![(degrade_from as f64, degrade_to as f64)];
    let mut panels: Vec<Panel> = results
        .iter()
        .map(|r| Panel {
            title: format!("{}: load (requests/s)", r.arm.name()),
            y_label: "rps".into(),
            series: vec![
                line("offered", "#555555", &r.offered, false),
                line("upstream attempts", r.arm.color(), &r.attempts, false),
                line("to degraded hosts", r.arm.color(), &r.attempts_degraded, true),
                Series {
                    name: "capacity".into(),
                    color: "#999999",
                    points: vec![(0.0, capacity), (duration as f64, capacity)],
                    dashed: true,
                },
            ],
            shade: shade.clone(),
            y_max: None,
        })
        .collect();
    panels.push(Panel {
        title: "client success (%)".into(),
        y_label: "%".into(),
        series: results
            .iter()
            .map(|r| Series {
                name: r.arm.name().into(),
                color: r.arm.color(),
                points: r
                    .success
                    .iter()
                    .enumerate()
                    .map(|(s, &v)| (s as f64 + 0.5, v * 100.0))
                    .collect(),
                dashed: false,
            })
            .collect(),
        shade,
        y_max: Some(100.0),
    });
    let title = format!("Retry storm: {degraded} of {hosts} payments hosts degrade ×10 (shaded)");
    let svg = svg_plot(&title, "time (s)", &panels);
    std::fs::write(out.join("results.md"), &md)?;
    std::fs::write(out.join("plot.svg"), svg)?;
    eprintln!("{md}");
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn line(name: &str, color: &'static str, per_second: &[u64], dashed: bool) -> Series {
    Series {
        name: name.into(),
        color,
        points: per_second
            .iter()
            .enumerate()
            .map(|(s, &v)| (s as f64 + 0.5, v as f64))
            .collect(),
        dashed,
    }
}
