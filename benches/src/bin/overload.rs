//! Overload, shown (issue 5): an upstream of fixed capacity behind Remora; the offered open-loop load ramps in
//! steps from 0.5× to 3× capacity and back down. Three arms, each its own Remora and its own fresh upstream:
//!
//! - `no-shedding`: every circuit-breaker threshold raised out of the way; excess queues at the upstream;
//! - `breakers`: `max_requests` (1.5 × the upstream's slots) and `max_pending_requests` (the slots) only;
//! - `adaptive`: `envoy.filters.http.adaptive_concurrency` (gradient controller, p90 samples every 100 ms, minRTT
//!   from 50 requests every 10 s), breakers out of the way.
//!
//! Per arm and load step: goodput (2xx per second), p50/p99 latency of accepted (2xx) requests, the share of
//! requests rejected (a non-2xx answer), timed out at the client, and the time to reject (p50 latency of the
//! rejected). The adaptive arm also reports its concurrency limit at the end of each step.
//!
//! ```text
//! cargo build --release -p remora
//! cargo run --release -p remora-benches --bin overload -- [--quick] [--remora PATH] [--out DIR]
//!     [--slots 20] [--service-ms 20] [--step-secs 5] [--workers 1]
//! ```
//!
//! Writes `benches/results/<date>-overload/{results.md, plot.svg}` (or `--out DIR`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use remora_benches::scenario::{
    flag, markdown_table, quantile, remora_binary, results_dir, run_load, svg_plot, CapacityUpstream, Error,
    H2Client, Outcome, Panel, Record, RemoraProcess, Series,
};
use serde_json::{json, Value};
use tokio::time::Instant;

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const ADAPTIVE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency";
const HTTP_OPTIONS: &str = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const LIMIT_STAT: &str = "http.ingress.adaptive_concurrency.gradient_controller.concurrency_limit";

/// Offered load per step, in multiples of capacity.
const STEPS: [f64; 9] = [0.5, 1.0, 1.5, 2.0, 3.0, 2.0, 1.5, 1.0, 0.5];

#[derive(Clone, Copy, PartialEq)]
enum Arm {
    NoShedding,
    Breakers,
    Adaptive,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::NoShedding => "no-shedding",
            Arm::Breakers => "breakers",
            Arm::Adaptive => "adaptive",
        }
    }

    fn color(self) -> &'static str {
        match self {
            Arm::NoShedding => "#d62728",
            Arm::Breakers => "#1f77b4",
            Arm::Adaptive => "#2ca02c",
        }
    }
}

fn config(arm: Arm, upstream: std::net::SocketAddr, slots: usize) -> Value {
    let thresholds = match arm {
        Arm::Breakers => json!({"priority": "DEFAULT", "max_requests": slots * 3 / 2,
            "max_pending_requests": slots, "max_connections": 100000, "max_retries": 10000}),
        _ => json!({"priority": "DEFAULT", "max_requests": 100000, "max_pending_requests": 100000,
            "max_connections": 100000, "max_retries": 10000}),
    };
    let mut filters = Vec::new();
    if arm == Arm::Adaptive {
        filters.push(
            json!({"name": "envoy.filters.http.adaptive_concurrency", "typed_config": {
            "@type": ADAPTIVE,
            "gradient_controller_config": {
                "sample_aggregate_percentile": {"value": 90},
                "concurrency_limit_params": {"concurrency_update_interval": "0.1s"},
                "min_rtt_calc_params": {"interval": "10s", "request_count": 50, "jitter": {"value": 10}}}}}),
        );
    }
    filters.push(json!({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}));
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {"@type": HCM, "stat_prefix": "ingress",
                        "route_config": {"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"},
                                "route": {"cluster": "service", "timeout": "0s"}}]}]},
                        "http_filters": filters}}]}],
            }],
            "clusters": [{
                "name": "service",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "service", "endpoints": [{"lb_endpoints": [{"endpoint":
                    {"address": {"socket_address": {"address": upstream.ip().to_string(),
                        "port_value": upstream.port()}}}}]}]},
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}},
                "circuit_breakers": {"thresholds": [thresholds]},
            }],
        },
    })
}

/// One load step of one arm.
struct Step {
    multiple: f64,
    offered: f64,
    goodput: f64,
    p50: Duration,
    p99: Duration,
    rejected: f64,
    timed_out: f64,
    reject_p50: Option<Duration>,
    limit: Option<i64>,
}

async fn run_arm(
    binary: &std::path::Path,
    arm: Arm,
    slots: usize,
    service: Duration,
    step_secs: u64,
    workers: u32,
    client_timeout: Duration,
) -> Result<Vec<Step>, Error> {
    let capacity = slots as f64 / service.as_secs_f64();
    let upstream = CapacityUpstream::start(slots, service).await?;
    let remora = Arc::new(
        RemoraProcess::start(binary, &config(arm, upstream.addr(), slots), workers, arm.name()).await?,
    );
    let addr = remora.listener("main").await?;
    let client = Arc::new(H2Client::new(addr, 4));
    let duration = Duration::from_secs(step_secs * STEPS.len() as u64);
    // The adaptive limit, sampled at the last second of each step.
    let limits: Arc<Mutex<Vec<Option<i64>>>> = Arc::new(Mutex::new(vec![None; STEPS.len()]));
    let start = Instant::now();
    let records = run_load(
        client,
        "/work",
        duration,
        client_timeout,
        |t| STEPS[((t.as_secs() / step_secs) as usize).min(STEPS.len() - 1)] * capacity,
        |s| {
            if arm == Arm::Adaptive && s % step_secs == step_secs - 1 {
                let (remora, limits) = (remora.clone(), limits.clone());
                tokio::spawn(async move {
                    if let Ok(v) = remora.stat(LIMIT_STAT).await {
                        limits.lock().unwrap_or_else(PoisonError::into_inner)[(s / step_secs) as usize] =
                            Some(v);
                    }
                });
            }
        },
        start,
    )
    .await;
    let limits = limits.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let mut steps = Vec::new();
    for (i, &multiple) in STEPS.iter().enumerate() {
        let (a, b) = (i as u64 * step_secs, (i as u64 + 1) * step_secs);
        let in_step: Vec<&Record> = records
            .iter()
            .filter(|r| (a..b).contains(&r.sent.as_secs()))
            .collect();
        let n = in_step.len().max(1) as f64;
        let mut ok: Vec<Duration> = in_step.iter().filter(|r| r.ok()).map(|r| r.latency).collect();
        let mut rejected: Vec<Duration> = in_step
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Status(s) if !(200..300).contains(&s)))
            .map(|r| r.latency)
            .collect();
        let timed_out = in_step
            .iter()
            .filter(|r| !matches!(r.outcome, Outcome::Status(_)))
            .count();
        steps.push(Step {
            multiple,
            offered: in_step.len() as f64 / step_secs as f64,
            goodput: ok.len() as f64 / step_secs as f64,
            p50: quantile(&mut ok, 0.5),
            p99: quantile(&mut ok, 0.99),
            rejected: rejected.len() as f64 / n,
            timed_out: timed_out as f64 / n,
            reject_p50: (!rejected.is_empty()).then(|| quantile(&mut rejected, 0.5)),
            limit: limits[i],
        });
    }
    Ok(steps)
}

fn ms(d: Duration) -> String {
    let m = d.as_secs_f64() * 1000.0;
    if m < 10.0 {
        format!("{m:.2} ms")
    } else {
        format!("{m:.0} ms")
    }
}

/// A latency of accepted requests, or a dash when none was accepted.
fn latency(goodput: f64, d: Duration) -> String {
    if goodput > 0.0 {
        ms(d)
    } else {
        "–".to_owned()
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let binary = remora_binary(&args)?;
    let slots: usize = flag(&args, "--slots", 20)?;
    let service = Duration::from_millis(flag(&args, "--service-ms", 20)?);
    let step_secs: u64 = flag(&args, "--step-secs", if quick { 2 } else { 5 })?;
    let workers: u32 = flag(&args, "--workers", 1)?;
    let client_timeout = Duration::from_secs(2);
    let capacity = slots as f64 / service.as_secs_f64();
    let out = match flag(&args, "--out", String::new())? {
        d if d.is_empty() => results_dir("overload")?,
        d => {
            std::fs::create_dir_all(&d)?;
            d.into()
        }
    };

    let arms = [Arm::NoShedding, Arm::Breakers, Arm::Adaptive];
    let mut results = Vec::new();
    for arm in arms {
        eprintln!(
            "overload: arm {} ({} s)",
            arm.name(),
            step_secs * STEPS.len() as u64
        );
        let steps = run_arm(&binary, arm, slots, service, step_secs, workers, client_timeout).await?;
        results.push((arm, steps));
    }

    let mut md = format!(
        "# Overload ({})\n\nUpstream: {slots} slots × {} ms = {capacity:.0} rps, FIFO queue beyond. Offered load \
         open-loop in steps of {step_secs} s: {} × capacity. Client timeout {} ms; no retries; upstream over h2c; \
         Remora `--concurrency {workers}`.\n\nGoodput = 2xx per second. Latency percentiles are of accepted (2xx) \
         requests; rejected = answered with a non-2xx status; timed out = no answer within the client timeout; \
         time to reject = p50 latency of the rejected.\n\n",
        if quick { "quick" } else { "full" },
        service.as_millis(),
        STEPS.map(|m| m.to_string()).join(" → "),
        client_timeout.as_millis(),
    );
    let rows: Vec<Vec<String>> = results
        .iter()
        .flat_map(|(arm, steps)| {
            steps.iter().map(move |s| {
                vec![
                    arm.name().to_owned(),
                    format!("{}×", s.multiple),
                    format!("{:.0}", s.offered),
                    format!("{:.0}", s.goodput),
                    latency(s.goodput, s.p50),
                    latency(s.goodput, s.p99),
                    format!("{:.1} %", s.rejected * 100.0),
                    format!("{:.1} %", s.timed_out * 100.0),
                    s.reject_p50.map_or_else(|| "–".to_owned(), ms),
                    s.limit.map_or_else(|| "–".to_owned(), |l| l.to_string()),
                ]
            })
        })
        .collect();
    md.push_str(&markdown_table(
        &[
            "arm",
            "load",
            "offered rps",
            "goodput rps",
            "p50 accepted",
            "p99 accepted",
            "rejected",
            "timed out",
            "time to reject (p50)",
            "adaptive limit",
        ],
        &rows,
    ));

    let x = |i: usize| (i as f64 + 0.5) * step_secs as f64;
    let offered = Series {
        name: "offered".into(),
        color: "#555555",
        points: STEPS
            .iter()
            .enumerate()
            .map(|(i, m)| (x(i), m * capacity))
            .collect(),
        dashed: true,
    };
    // A step without a value (no accepted request to take a latency of) leaves a gap in its line.
    let per_arm = |f: &dyn Fn(&Step) -> Option<f64>| -> Vec<Series> {
        results
            .iter()
            .map(|(arm, steps)| Series {
                name: arm.name().into(),
                color: arm.color(),
                points: steps
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| Some((x(i), f(s)?)))
                    .collect(),
                dashed: false,
            })
            .collect()
    };
    let mut goodput = per_arm(&|s| Some(s.goodput));
    goodput.push(offered);
    let panels = vec![
        Panel {
            title: "goodput (2xx/s) per load step".into(),
            y_label: "rps".into(),
            series: goodput,
            shade: Vec::new(),
            y_max: None,
        },
        Panel {
            title: "p99 latency of accepted requests (ms)".into(),
            y_label: "ms".into(),
            series: per_arm(&|s| (s.goodput > 0.0).then_some(s.p99.as_secs_f64() * 1000.0)),
            shade: Vec::new(),
            y_max: None,
        },
        Panel {
            title: "rejected + timed out (%)".into(),
            y_label: "%".into(),
            series: per_arm(&|s| Some((s.rejected + s.timed_out) * 100.0)),
            shade: Vec::new(),
            y_max: Some(100.0),
        },
    ];
    let svg = svg_plot(
        &format!(
            "Overload: {} × capacity ({capacity:.0} rps)",
            STEPS.map(|m| m.to_string()).join("→")
        ),
        "time (s)",
        &panels,
    );
    std::fs::write(out.join("results.md"), &md)?;
    std::fs::write(out.join("plot.svg"), svg)?;
    eprintln!("{md}");
    eprintln!("wrote {}", out.display());
    Ok(())
}
