//! Turns the runs into `results.md`, `summary.json` and the SVG charts.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use crate::harness::{ArmRuns, Environment, Run, WorkloadRuns};
use crate::hist::Histogram;
use crate::svg::{bar_chart, cdf_chart, cdf_percentiles, Bar, Line};
use crate::Result;

/// The median (the mean of the middle two for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Median and range of a set of repetitions.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// `None` for an empty set.
    pub fn of(v: &[f64]) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        Some(Self {
            median: median(v),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }

    fn json(&self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

/// One arm's figures for one workload.
#[derive(Debug)]
pub struct ArmSummary {
    /// The arm.
    pub name: String,
    /// Why it was not (fully) measured.
    pub failure: Option<String>,
    /// Successful requests per second at saturation.
    pub rps: Option<Spread>,
    /// Requests per second of proxy CPU time: the throughput of one fully busy proxy core.
    pub per_core: Option<Spread>,
    /// Proxy user CPU per request, µs (median over runs).
    pub user_us: Option<f64>,
    /// Proxy system CPU per request, µs.
    pub sys_us: Option<f64>,
    /// Proxy CPU time over wall time in the window (1.0 = one core busy).
    pub proxy_core: Option<f64>,
    /// Load generator + upstream CPU over wall time.
    pub gen_core: Option<f64>,
    /// CPU used by other processes on the machine over wall time (largest of the closed-loop runs).
    pub other_core: Option<f64>,
    /// Syscalls per request (strace run).
    pub syscalls: Option<f64>,
    /// Open-loop latency (µs), median over runs: p50, p90, p99, p99.9.
    pub latency: Option<[Spread; 4]>,
    /// Open-loop latency histogram, all runs merged.
    pub hist: Option<Histogram>,
    /// Errors over every run.
    pub errors: u64,
    /// Requests over every run.
    pub requests: u64,
    /// VmRSS once idle, KiB.
    pub rss_idle: Option<u64>,
    /// Largest VmRSS at the end of a loaded window, KiB.
    pub rss_load: Option<u64>,
    /// VmHWM at the end, KiB.
    pub rss_peak: Option<u64>,
    /// Seconds from spawn to the first answered request.
    pub startup_s: Option<f64>,
}

fn per_request(runs: &[Run], ticks: u64, f: impl Fn(&Run) -> Option<u64>) -> Option<f64> {
    let v: Vec<f64> = runs
        .iter()
        .filter(|r| r.requests > 0)
        .filter_map(|r| Some(f(r)? as f64 * 1e6 / ticks as f64 / r.requests as f64))
        .collect();
    (!v.is_empty()).then(|| median(&v))
}

fn core_share(runs: &[Run], ticks: u64, f: impl Fn(&Run) -> Option<u64>) -> Option<f64> {
    let v: Vec<f64> = runs
        .iter()
        .filter(|r| r.wall > 0.0)
        .filter_map(|r| Some(f(r)? as f64 / ticks as f64 / r.wall))
        .collect();
    (!v.is_empty()).then(|| median(&v))
}

/// Reduces an arm's runs to its figures.
pub fn summarise(a: &ArmRuns, ticks: u64) -> ArmSummary {
    let rps: Vec<f64> = a.closed.iter().map(|r| r.rps).collect();
    let latency = (!a.open.is_empty()).then(|| {
        let col = |i: usize| Spread::of(&a.open.iter().map(|r| r.latency[i]).collect::<Vec<_>>());
        [col(0), col(1), col(2), col(3)]
    });
    let latency = latency.and_then(|[a, b, c, d]| Some([a?, b?, c?, d?]));
    let mut hist: Option<Histogram> = None;
    for h in a.open.iter().filter_map(|r| r.hist.as_ref()) {
        hist.get_or_insert_with(Histogram::new).merge(h);
    }
    let all = a.closed.iter().chain(&a.open);
    let mems: Vec<_> = all.clone().filter_map(|r| r.proxy_mem).collect();
    ArmSummary {
        name: a.name.clone(),
        failure: a.failure.clone(),
        rps: Spread::of(&rps),
        per_core: Spread::of(
            &a.closed
                .iter()
                .filter_map(|r| {
                    let c = r.proxy_cpu?;
                    let secs = (c.user + c.system) as f64 / ticks as f64;
                    (secs > 0.0).then(|| r.requests as f64 / secs)
                })
                .collect::<Vec<_>>(),
        ),
        user_us: per_request(&a.closed, ticks, |r| r.proxy_cpu.map(|c| c.user)),
        sys_us: per_request(&a.closed, ticks, |r| r.proxy_cpu.map(|c| c.system)),
        proxy_core: core_share(&a.closed, ticks, |r| r.proxy_cpu.map(|c| c.user + c.system)),
        gen_core: core_share(&a.closed, ticks, |r| Some(r.gen_cpu.user + r.gen_cpu.system)),
        other_core: a
            .closed
            .iter()
            .chain(&a.open)
            .filter(|r| r.wall > 0.0)
            .map(|r| r.other_cpu as f64 / ticks as f64 / r.wall)
            .reduce(f64::max),
        syscalls: a
            .strace
            .as_ref()
            .and_then(|r| Some(r.syscalls? as f64 / r.requests.max(1) as f64)),
        latency,
        hist,
        errors: all.clone().map(|r| r.errors).sum(),
        requests: all.map(|r| r.requests).sum(),
        rss_idle: a.idle_mem.map(|m| m.rss_kib),
        rss_load: mems.iter().map(|m| m.rss_kib).max(),
        rss_peak: mems.iter().map(|m| m.hwm_kib).max(),
        startup_s: a.startup_s,
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.filter(|x| x.is_finite()).map_or_else(|| "–".to_owned(), f)
}

fn mib(kib: Option<u64>) -> String {
    opt(kib.map(|k| k as f64 / 1024.0), |m| format!("{m:.1}"))
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("").trim();
    let short: String = l.chars().take(140).collect();
    if short.len() < l.len() {
        short + "…"
    } else {
        short
    }
}

/// What the TLS workloads negotiated with each arm, as bench-load recorded it.
fn tls_line(md: &mut String, wr: &WorkloadRuns) {
    let mut seen: Vec<(String, Vec<&str>)> = Vec::new();
    for a in &wr.arms {
        for r in &a.closed {
            let Some(t) = r.load.get("tls").and_then(Value::as_str) else {
                continue;
            };
            match seen.iter_mut().find(|(k, _)| k == t) {
                Some((_, arms)) if arms.contains(&a.name.as_str()) => {}
                Some((_, arms)) => arms.push(&a.name),
                None => seen.push((t.to_owned(), vec![&a.name])),
            }
        }
    }
    let parts: Vec<String> = seen
        .iter()
        .map(|(t, arms)| format!("`{t}` ({})", arms.join(", ")))
        .collect();
    let _ = writeln!(
        md,
        "TLS terminates at the proxy (plaintext HTTP/1.1 to the upstream) with the run's self-signed ECDSA P-256 \
         certificate, the same for every proxy; the client offers only TLS 1.3, TLS_AES_128_GCM_SHA256 and X25519 and \
         never resumes, so every handshake is full. Negotiated: {}.\n",
        if parts.is_empty() { "not recorded".to_owned() } else { parts.join("; ") }
    );
}

/// The Markdown section for one workload.
fn workload_section(md: &mut String, wr: &WorkloadRuns, sums: &[ArmSummary], reps: usize) {
    let w = &wr.workload;
    let _ = writeln!(md, "\n## {} — {}\n", w.name, w.title);
    match &wr.open_rate {
        Some((rate, from)) => {
            let _ = writeln!(
                md,
                "Latency: open loop at {rate:.0} req/s (half of {from}'s median saturation rate), coordinated-omission \
                 corrected; the direct row is absolute, proxy rows are **added over direct**.\n"
            );
        }
        None => {
            let _ = writeln!(md, "No open-loop latency runs.\n");
        }
    }
    if w.tls {
        tls_line(md, wr);
    }
    let direct = sums.iter().find(|s| s.name == "direct").and_then(|s| s.latency);
    let _ = writeln!(
        md,
        "| arm | req/s median (min–max) | req/s per proxy core | user µs/req | sys µs/req | proxy core | generator core | syscalls/req | p50 µs | p99 µs | p99.9 µs | RSS idle MiB | RSS load (peak) MiB | errors |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();
    for s in sums {
        if s.rps.is_none() {
            let reason = s.failure.as_deref().unwrap_or("no runs");
            let _ = writeln!(
                md,
                "| {} | not measured: {} (see notes) ||||||||||||||",
                s.name,
                first_line(reason).replace('|', "/")
            );
            notes.push(format!("**{}**: {}", s.name, reason));
            continue;
        }
        if let Some(f) = &s.failure {
            notes.push(format!("**{}** (partial): {f}", s.name));
        }
        let rps = s.rps.map_or_else(
            || "–".to_owned(),
            |r| format!("{:.0} ({:.0}–{:.0})", r.median, r.min, r.max),
        );
        let lat = |i: usize| match (s.latency, direct) {
            (Some(l), _) if s.name == "direct" => format!("{:.0}", l[i].median),
            (Some(l), Some(d)) => format!("{:+.0}", l[i].median - d[i].median),
            (Some(l), None) => format!("{:.0} (abs)", l[i].median),
            _ => "–".to_owned(),
        };
        let pct = |v: Option<f64>| opt(v, |x| format!("{:.0}%", x * 100.0));
        let load = match (s.rss_load, s.rss_peak) {
            (Some(_), Some(_)) => format!("{} ({})", mib(s.rss_load), mib(s.rss_peak)),
            _ => "–".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.name,
            rps,
            opt(s.per_core.map(|p| p.median), |v| format!("{v:.0}")),
            opt(s.user_us, |v| format!("{v:.1}")),
            opt(s.sys_us, |v| format!("{v:.1}")),
            pct(s.proxy_core),
            pct(s.gen_core),
            opt(s.syscalls, |v| format!("{v:.1}")),
            lat(0),
            lat(2),
            lat(3),
            mib(s.rss_idle),
            load,
            s.errors
        );
        if s.name != "direct" && s.gen_core.is_some_and(|g| g > 0.9) && s.proxy_core.is_some_and(|p| p < 0.95)
        {
            notes.push(format!(
                "**{}**: the generator's core was {:.0}% busy and the proxy's only {:.0}%: its req/s is bounded by the \
                 load generator, so compare its req/s per proxy core and CPU µs/req rather than its req/s.",
                s.name,
                s.gen_core.unwrap_or(0.0) * 100.0,
                s.proxy_core.unwrap_or(0.0) * 100.0
            ));
        }
        if let Some(o) = s.other_core.filter(|o| *o > 0.05) {
            notes.push(format!(
                "**{}**: other processes on the machine used up to {:.0}% of a core during its runs: its figures \
                 are disturbed; rerun on a quiet machine.",
                s.name,
                o * 100.0
            ));
        }
        if s.errors > 0 {
            notes.push(format!(
                "**{}**: {} errors out of {} requests.",
                s.name,
                s.errors,
                s.requests + s.errors
            ));
        }
    }
    if reps < 3 {
        notes.push(format!(
            "Only {reps} repetition(s): the spread is not meaningful."
        ));
    }
    if wr.open_rate.is_some() {
        let _ = writeln!(md, "\n![latency CDF, {}](latency-{}.svg)", w.name, w.name);
    }
    if !notes.is_empty() {
        let _ = writeln!(md, "\nNotes:\n");
        for n in notes {
            let indented = n.replace('\n', "\n  ");
            let _ = writeln!(md, "- {indented}");
        }
    }
}

/// Writes `results.md`, `summary.json`, `throughput.svg` and `latency-<workload>.svg` into `out`; returns the
/// Markdown.
pub fn write(out: &Path, env: &Environment, results: &[WorkloadRuns], ticks: u64) -> Result<String> {
    std::fs::create_dir_all(out)?;
    let reps = env.options.get("reps").and_then(Value::as_u64).unwrap_or(0) as usize;
    let mut md = String::new();
    let _ = writeln!(md, "# Remora load comparison, {}\n", env.date);
    for l in &env.lines {
        let _ = writeln!(md, "- {l}");
    }
    let _ = writeln!(
        md,
        "\nreq/s is the median of the closed-loop repetitions at saturation (min–max in brackets). \"req/s per proxy \
         core\" is requests over the proxy's CPU time: what one fully busy core of that proxy serves, even when the \
         load generator (which shares the other core with the upstream) saturated first. CPU per request, core \
         shares and memory are the proxy's own, from /proc over the measured window; \"generator core\" is \
         bench-load plus bench-upstream. See benches/README.md for how each figure is measured.\n\n\
         ![throughput per core](throughput.svg)\n\n![requests per second](rps.svg)"
    );
    let mut groups = Vec::new();
    let mut per_core = Vec::new();
    let mut summary = Vec::new();
    for wr in results {
        let sums: Vec<ArmSummary> = wr.arms.iter().map(|a| summarise(a, ticks)).collect();
        workload_section(&mut md, wr, &sums, reps);
        groups.push((
            wr.workload.name.to_owned(),
            sums.iter()
                .filter_map(|s| {
                    let r = s.rps?;
                    Some(Bar {
                        series: s.name.clone(),
                        value: r.median,
                        min: r.min,
                        max: r.max,
                    })
                })
                .collect::<Vec<_>>(),
        ));
        per_core.push((
            wr.workload.name.to_owned(),
            sums.iter()
                .filter_map(|s| {
                    let r = s.per_core?;
                    Some(Bar {
                        series: s.name.clone(),
                        value: r.median,
                        min: r.min,
                        max: r.max,
                    })
                })
                .collect::<Vec<_>>(),
        ));
        if let Some((rate, _)) = &wr.open_rate {
            let lines: Vec<Line> = sums
                .iter()
                .filter_map(|s| {
                    let h = s.hist.as_ref().filter(|h| h.count() > 0)?;
                    let nines = (h.count() as f64).log10().floor().clamp(1.0, 5.0);
                    let points = cdf_percentiles(nines)
                        .into_iter()
                        .map(|p| (p, h.percentile(p) as f64 / 1000.0))
                        .collect();
                    Some(Line {
                        series: s.name.clone(),
                        points,
                    })
                })
                .collect();
            let svg = cdf_chart(
                &format!(
                    "{}: latency at {rate:.0} req/s (open loop, all repetitions)",
                    wr.workload.name
                ),
                &lines,
            );
            std::fs::write(out.join(format!("latency-{}.svg", wr.workload.name)), svg)?;
        }
        summary.push(json!({
            "workload": wr.workload.name,
            "title": wr.workload.title,
            "open_loop_rate": wr.open_rate.as_ref().map(|r| r.0),
            "arms": sums.iter().map(|s| json!({
                "arm": s.name,
                "failure": s.failure,
                "rps": s.rps.map(|r| r.json()),
                "rps_per_proxy_core": s.per_core.map(|r| r.json()),
                "cpu_user_us_per_request": s.user_us,
                "cpu_system_us_per_request": s.sys_us,
                "proxy_core_share": s.proxy_core,
                "generator_core_share": s.gen_core,
                "other_processes_core_share_max": s.other_core,
                "syscalls_per_request": s.syscalls,
                "latency_us": s.latency.map(|l| json!({
                    "p50": l[0].json(), "p90": l[1].json(), "p99": l[2].json(), "p99.9": l[3].json()
                })),
                "errors": s.errors,
                "requests": s.requests,
                "rss_idle_kib": s.rss_idle,
                "rss_load_kib": s.rss_load,
                "rss_peak_kib": s.rss_peak,
                "startup_s": s.startup_s,
            })).collect::<Vec<_>>(),
        }));
    }
    let title = format!(
        "Throughput per proxy core: requests per second of proxy CPU time (median of {reps}, whiskers min–max)"
    );
    std::fs::write(
        out.join("throughput.svg"),
        bar_chart(&title, "requests per proxy CPU-second", &per_core),
    )?;
    let title =
        format!("Requests/s at saturation, proxy pinned to one core (median of {reps}, whiskers min–max)");
    std::fs::write(
        out.join("rps.svg"),
        bar_chart(&title, "requests per second", &groups),
    )?;
    std::fs::write(out.join("results.md"), &md)?;
    let summary =
        json!({ "date": env.date, "environment": env.lines, "options": env.options, "workloads": summary });
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let s = Spread::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
    }
}
