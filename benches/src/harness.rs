//! `bench-harness`: runs every workload against every arm and writes the comparison.
//!
//! Per workload: start every arm's proxy (pinned to the proxy core) and wait until a real request goes
//! through it; then closed-loop runs in interleaved repetitions (rep 1: A B C, rep 2: B C A, ...), each
//! sampling the proxy's CPU time over exactly the load generator's measured window; optionally one run per
//! proxy under `strace -c`; then open-loop runs at half the slowest proxy's median saturation rate, again
//! interleaved, for latency; then stop the proxies. An arm whose proxy fails to start or dies is reported with
//! the reason and left out of later runs; the others carry on.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::{sleep, timeout_at, Instant};

use crate::args::Args;
use crate::child::{on_path, pinned, Guard};
use crate::hist::Histogram;
use crate::load::{probe, LoadConfig};
use crate::procfs::{group_cpu, group_memory, machine_busy, ticks_per_second, CpuTicks, Memory};
use crate::proxies::{bootstrap, haproxy_conf, kind, nginx_conf, Kind, Ports, Variant, ARM_NAMES};
use crate::workload::{self, Workload};
use crate::{outln, report, Result};

const USAGE: &str = "usage: bench-harness [--quick] [--workloads all|h1-c1,h1-c50,h1-c500,h1-64k,h2c,grpc,tls-h1-c50,tls-handshake]
    [--arms direct,remora,remora-nostats,remora-full,remora-log,envoy,envoy-full,envoy-log,nginx,haproxy]
    [--duration 10s] [--warmup 1s] [--reps 3] [--strace] [--no-open-loop]
    [--out DIR | --results-dir DIR] [--config-dir DIR] [--bin-dir DIR] [--remora PATH] [--remora-build-failed]
    [--remora-nostats PATH (default: BIN_DIR/remora-nostats)]
    [--proxy-core 0] [--load-core 1] [--no-pin] [--upstream-threads 1] [--startup-timeout 15s] [--keep-temp]
    [--quiet-wait 30s (before each run, wait up to this long for other processes to go quiet; 0 to not wait)]
    [--retries 2 (redo a run during which other processes used more than 10% of a core)]";

/// What to run, parsed from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Workloads, in order.
    pub workloads: Vec<Workload>,
    /// Arm names, in order.
    pub arms: Vec<String>,
    /// Whether `--arms` was given (then a missing proxy is reported rather than skipped).
    pub arms_explicit: bool,
    /// Measured window per run.
    pub duration: Duration,
    /// Warm-up before each window.
    pub warmup: Duration,
    /// Repetitions per arm (closed and open loop each).
    pub reps: usize,
    /// Count syscalls with strace in one extra run per proxy.
    pub strace: bool,
    /// Run the open-loop latency phase.
    pub open_loop: bool,
    /// Where the results go.
    pub out_dir: PathBuf,
    /// Where the Remora/Envoy bootstrap templates are.
    pub config_dir: PathBuf,
    /// Where bench-upstream and bench-load are.
    pub bin_dir: PathBuf,
    /// The Remora binary.
    pub remora: PathBuf,
    /// The Remora binary built with `--features stats-off` (arm `remora-nostats`).
    pub remora_nostats: PathBuf,
    /// run.sh could not build Remora: report its arms as not measured.
    pub remora_build_failed: bool,
    /// The core for proxies (`None`: unpinned).
    pub proxy_core: Option<usize>,
    /// The core for the load generator and the upstream.
    pub load_core: Option<usize>,
    /// bench-upstream's threads.
    pub upstream_threads: usize,
    /// How long a proxy may take to answer its first request.
    pub startup_timeout: Duration,
    /// Keep the temporary directory (rendered configs, proxy logs).
    pub keep_temp: bool,
    /// Before each run, how long to wait for other processes to stop using the CPU.
    pub quiet_wait: Duration,
    /// How many times to redo a run that other processes disturbed.
    pub retries: usize,
    /// Whether `--quick` was given.
    pub quick: bool,
}

impl Options {
    /// Parses the command line.
    pub fn parse(mut a: Args) -> Result<Self> {
        let quick = a.flag("--quick");
        let workloads = match a.value("--workloads")? {
            Some(list) => workload::select(&list)?,
            None if quick => workload::select(workload::QUICK)?,
            None => workload::ALL.to_vec(),
        };
        let arms_arg = a.value("--arms")?;
        let arms: Vec<String> = match &arms_arg {
            Some(list) => list.split(',').map(|s| s.trim().to_owned()).collect(),
            None => ARM_NAMES.iter().map(|s| (*s).to_owned()).collect(),
        };
        for arm in &arms {
            if kind(arm).is_none() {
                return Err(format!("unknown arm {arm:?} (known: {})", ARM_NAMES.join(", ")).into());
            }
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let bin_dir = match a.value("--bin-dir")? {
            Some(d) => PathBuf::from(d),
            None => std::env::current_exe()?
                .parent()
                .ok_or("no directory for this executable")?
                .to_path_buf(),
        };
        // Both are read so that `--out` also works through run.sh, which always passes `--results-dir`.
        let results_dir = a.value("--results-dir")?;
        let out_dir = match a.value("--out")? {
            Some(d) => PathBuf::from(d),
            None => results_dir
                .map_or_else(|| manifest.join("results"), PathBuf::from)
                .join(format!("{}{}", today(), if quick { "-quick" } else { "" })),
        };
        let no_pin = a.flag("--no-pin");
        let proxy_core = a.parse("--proxy-core")?.unwrap_or(0);
        let load_core = a.parse("--load-core")?.unwrap_or(1);
        let o = Options {
            arms_explicit: arms_arg.is_some(),
            arms,
            duration: a
                .duration("--duration")?
                .unwrap_or(Duration::from_secs(if quick { 5 } else { 10 })),
            warmup: a.duration("--warmup")?.unwrap_or(Duration::from_secs(1)),
            reps: a.parse("--reps")?.unwrap_or(3),
            strace: a.flag("--strace"),
            open_loop: !a.flag("--no-open-loop"),
            out_dir,
            config_dir: a
                .value("--config-dir")?
                .map_or_else(|| manifest.join("../config/bench"), PathBuf::from),
            remora_nostats: a
                .value("--remora-nostats")?
                .map_or_else(|| bin_dir.join("remora-nostats"), PathBuf::from),
            remora: a
                .value("--remora")?
                .map_or_else(|| bin_dir.join("remora"), PathBuf::from),
            bin_dir,
            remora_build_failed: a.flag("--remora-build-failed"),
            proxy_core: (!no_pin).then_some(proxy_core),
            load_core: (!no_pin).then_some(load_core),
            upstream_threads: a.parse("--upstream-threads")?.unwrap_or(1),
            startup_timeout: a
                .duration("--startup-timeout")?
                .unwrap_or(Duration::from_secs(15)),
            keep_temp: a.flag("--keep-temp"),
            quiet_wait: a.duration("--quiet-wait")?.unwrap_or(Duration::from_secs(30)),
            retries: a.parse("--retries")?.unwrap_or(2),
            workloads,
            quick,
        };
        a.finish()?;
        if o.reps == 0 || o.duration.is_zero() {
            return Err("--reps and --duration must be positive".into());
        }
        Ok(o)
    }
}

/// The `bench-harness` entry point: runs until done, Ctrl-C or SIGTERM, and kills every child either way.
pub fn main() -> ExitCode {
    let mut args = Args::from_env();
    if args.flag("--help") || args.flag("-h") {
        let _ = outln!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let opts = match Options::parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench-harness: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-harness: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        // Dropping `run` on a signal drops every child's guard, which kills its process group.
        tokio::select! {
            r = run(opts) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted (Ctrl-C); child processes stopped".into()),
            _ = term.recv() => Err("terminated (SIGTERM); child processes stopped".into()),
            _ = hup.recv() => Err("hung up (SIGHUP); child processes stopped".into()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-harness: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything a run shares.
struct Ctx {
    opts: Options,
    tmp: TempDir,
    upstream_port: u16,
    upstream_pid: i32,
    ticks: u64,
    envoy: Option<PathBuf>,
    nginx: Option<PathBuf>,
    haproxy: Option<PathBuf>,
    strace: Option<PathBuf>,
    /// Where the rendered proxy configs are kept (`<out>/configs`).
    configs: PathBuf,
    /// Consecutive waits for a quiet machine that timed out.
    busy_waits: std::cell::Cell<u32>,
}

impl Ctx {
    fn bin(&self, name: &str) -> PathBuf {
        self.opts.bin_dir.join(name)
    }

    /// Copies a rendered config into `<out>/configs/<name>`.
    fn keep_config(&self, path: &Path, name: &str) -> Result<()> {
        std::fs::create_dir_all(&self.configs)?;
        std::fs::write(
            self.configs.join(name),
            self.scrub(&std::fs::read_to_string(path)?),
        )?;
        Ok(())
    }

    /// `text` with the temporary directory's path shortened to `$TMP` (it is gone after the run).
    fn scrub(&self, text: &str) -> String {
        text.replace(&self.tmp.path.display().to_string(), "$TMP")
    }
}

/// A temporary directory removed on drop (unless kept).
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept temporary directory {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// One load-generator run as the harness saw it.
#[derive(Clone, Debug)]
pub struct Run {
    /// bench-load's JSON summary (without the histogram).
    pub load: Value,
    /// Successful requests per second.
    pub rps: f64,
    /// Successful requests in the window.
    pub requests: u64,
    /// Failed requests in the window.
    pub errors: u64,
    /// The window as the harness timed it, seconds.
    pub wall: f64,
    /// The proxy's CPU time over the window (`None` for direct).
    pub proxy_cpu: Option<CpuTicks>,
    /// The load generator's and upstream's CPU time over the window.
    pub gen_cpu: CpuTicks,
    /// The proxy's memory at the end of the window.
    pub proxy_mem: Option<Memory>,
    /// CPU ticks used during the window by processes other than the proxy, generator and upstream.
    pub other_cpu: u64,
    /// Latency percentiles in µs: p50, p90, p99, p99.9.
    pub latency: [f64; 4],
    /// The latency histogram (open loop only).
    pub hist: Option<Histogram>,
    /// Syscalls counted by strace over the window (strace runs only).
    pub syscalls: Option<u64>,
}

/// One arm within one workload.
#[derive(Debug)]
pub struct ArmRuns {
    /// The arm's name.
    pub name: String,
    /// Why it was not (fully) measured.
    pub failure: Option<String>,
    /// Closed-loop runs.
    pub closed: Vec<Run>,
    /// Open-loop runs.
    pub open: Vec<Run>,
    /// The strace run.
    pub strace: Option<Run>,
    /// Memory once started and idle.
    pub idle_mem: Option<Memory>,
    /// Seconds from spawn to the first answered request.
    pub startup_s: Option<f64>,
}

/// Everything measured for one workload.
#[derive(Debug)]
pub struct WorkloadRuns {
    /// The workload.
    pub workload: Workload,
    /// The open-loop rate and the arm it was derived from.
    pub open_rate: Option<(f64, String)>,
    /// Per arm, in the order given.
    pub arms: Vec<ArmRuns>,
}

/// The run's environment, for the report.
#[derive(Debug, Default)]
pub struct Environment {
    /// UTC date.
    pub date: String,
    /// Free-form lines describing the machine, pinning and tool versions.
    pub lines: Vec<String>,
    /// Harness options worth recording.
    pub options: Value,
}

async fn run(opts: Options) -> Result<()> {
    let tmp_path = std::env::temp_dir().join(format!("remora-bench-{}-{}", std::process::id(), unix_nanos()));
    std::fs::create_dir_all(&tmp_path)?;
    let tmp = TempDir {
        path: tmp_path,
        keep: opts.keep_temp,
    };

    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut opts = opts;
    let taskset = on_path("taskset").is_some();
    if opts.proxy_core.is_some() && (!taskset || cores < 2) {
        eprintln!(
            "note: {} - running unpinned",
            if taskset {
                "fewer than 2 cores"
            } else {
                "taskset not found"
            }
        );
        opts.proxy_core = None;
        opts.load_core = None;
    }
    let pinning = match (opts.proxy_core, opts.load_core) {
        (Some(p), Some(l)) => format!(
            "this machine has {cores} cores: the proxy is pinned to core {p}, the load generator and the upstream share core {l}{}",
            if cores > 2 { " (other cores idle)" } else { "" }
        ),
        _ => format!("this machine has {cores} core(s): nothing is pinned"),
    };
    eprintln!("{pinning}");
    // The harness itself mostly sleeps; keep it off the proxy's core anyway.
    if let Some(core) = opts.load_core {
        let _ = tokio::process::Command::new("taskset")
            .args(["-p", "-c", &core.to_string(), &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .await;
    }

    for bin in ["bench-upstream", "bench-load"] {
        let p = opts.bin_dir.join(bin);
        if !p.is_file() {
            return Err(format!("{} not found: build with benches/run.sh", p.display()).into());
        }
    }

    let envoy = on_path("envoy");
    let nginx = on_path("nginx").or_else(|| on_path("/usr/sbin/nginx"));
    let haproxy = on_path("haproxy").or_else(|| on_path("/usr/sbin/haproxy"));
    let strace = on_path("strace");
    if opts.strace && strace.is_none() {
        eprintln!("note: --strace given but strace is not installed: no syscall counts");
    }
    // Arms whose proxy is not installed are skipped unless asked for by name.
    if !opts.arms_explicit {
        opts.arms.retain(|a| match kind(a) {
            Some(Kind::Envoy(_)) => envoy.is_some(),
            Some(Kind::RemoraNoStats) => opts.remora_nostats.is_file(),
            Some(Kind::Nginx) => nginx.is_some(),
            Some(Kind::Haproxy) => haproxy.is_some(),
            _ => true,
        });
    }
    for (name, found) in [("envoy", &envoy), ("nginx", &nginx), ("haproxy", &haproxy)] {
        if found.is_none() {
            eprintln!("note: {name} is not installed: its arms are skipped");
        }
    }

    // The upstream, on the load core.
    let up_log = File::create(tmp.path.join("bench-upstream.log"))?;
    let mut cmd = pinned(
        opts.load_core,
        opts.bin_dir.join("bench-upstream"),
        &[
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--threads".into(),
            opts.upstream_threads.to_string(),
        ],
    );
    cmd.stdout(Stdio::piped()).stderr(up_log);
    let mut upstream = Guard::spawn("bench-upstream", cmd)?;
    let upstream_port = read_listening(&mut upstream).await?;
    eprintln!("bench-upstream listening on 127.0.0.1:{upstream_port}");

    let env = environment(&opts, &pinning, &envoy, &nginx, &haproxy).await;
    let configs = opts.out_dir.join("configs");
    let ctx = Ctx {
        opts,
        tmp,
        upstream_port,
        upstream_pid: upstream.pid(),
        ticks: ticks_per_second(),
        envoy,
        nginx,
        haproxy,
        strace,
        configs,
        busy_waits: std::cell::Cell::new(0),
    };

    if ctx.opts.workloads.iter().any(|w| w.tls) {
        crate::tls::TlsFiles::generate(&ctx.tmp.path.join("tls"))?;
    }
    let raw = ctx.opts.out_dir.join("raw");
    clear_previous(&ctx.opts.out_dir)?;
    std::fs::create_dir_all(&raw)?;
    let mut results = Vec::new();
    for w in &ctx.opts.workloads {
        eprintln!("\n== {} ({})", w.name, w.title);
        let r = run_workload(&ctx, w, &raw).await?;
        results.push(r);
        if let Some(s) = upstream.exited() {
            return Err(format!("bench-upstream exited ({s})").into());
        }
    }
    upstream.stop(Duration::from_secs(2)).await;

    let table = report::write(&ctx.opts.out_dir, &env, &results, ctx.ticks)?;
    outln!("{table}")?;
    eprintln!("results written to {}", ctx.opts.out_dir.display());
    Ok(())
}

/// Removes what an earlier run into the same directory wrote (only the harness's own files), so that no
/// stale chart or config is left beside the new results.
fn clear_previous(out: &Path) -> Result<()> {
    for dir in ["raw", "configs"] {
        match std::fs::remove_dir_all(out.join(dir)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = ["results.md", "summary.json", "throughput.svg", "rps.svg"].contains(&name.as_str())
            || (name.starts_with("latency-") && name.ends_with(".svg"));
        if ours {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// Reads bench-upstream's `listening on ADDR` line.
async fn read_listening(g: &mut Guard) -> Result<u16> {
    let out = g.take_stdout().ok_or("bench-upstream's stdout is not piped")?;
    let mut lines = BufReader::new(out).lines();
    let limit = Instant::now() + Duration::from_secs(10);
    let line = timeout_at(limit, lines.next_line())
        .await
        .map_err(|_| "bench-upstream did not report its address within 10 s")??
        .ok_or("bench-upstream exited before reporting its address")?;
    let addr = line
        .strip_prefix("listening on ")
        .ok_or_else(|| format!("unexpected bench-upstream output {line:?}"))?;
    let addr: std::net::SocketAddr = addr.trim().parse()?;
    // Keep draining stdout so the upstream can never block on it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(addr.port())
}

/// A running arm.
struct Live {
    port: u16,
    proc: Option<Guard>,
    log: Option<PathBuf>,
}

async fn run_workload(ctx: &Ctx, w: &Workload, raw: &Path) -> Result<WorkloadRuns> {
    let o = &ctx.opts;
    let mut arms: Vec<ArmRuns> = o
        .arms
        .iter()
        .map(|a| ArmRuns {
            name: a.clone(),
            failure: None,
            closed: Vec::new(),
            open: Vec::new(),
            strace: None,
            idle_mem: None,
            startup_s: None,
        })
        .collect();
    let mut live: Vec<Option<Live>> = Vec::new();
    for arm in arms.iter_mut() {
        let t0 = Instant::now();
        match start_arm(ctx, w, &arm.name).await {
            Ok(l) => {
                if l.proc.is_some() {
                    arm.startup_s = Some(t0.elapsed().as_secs_f64());
                    eprintln!(
                        "  {}: ready on port {} after {:.2} s",
                        arm.name,
                        l.port,
                        t0.elapsed().as_secs_f64()
                    );
                }
                live.push(Some(l));
            }
            Err(e) => {
                eprintln!("  {}: NOT MEASURED: {e}", arm.name);
                arm.failure = Some(e.to_string());
                live.push(None);
            }
        }
    }
    // Idle memory, once every started proxy has answered one request and settled.
    sleep(Duration::from_millis(300)).await;
    for (arm, l) in arms.iter_mut().zip(&live) {
        if let Some(Live { proc: Some(p), .. }) = l {
            arm.idle_mem = group_memory(p.pid()).ok();
        }
    }

    // Closed loop, interleaved.
    for rep in 0..o.reps {
        for i in rotation(arms.len(), rep) {
            if live[i].is_none() {
                continue;
            }
            let r = measured_run(ctx, w, &live, i, None).await;
            let arm = &mut arms[i];
            match r {
                Ok(run) => {
                    eprintln!(
                        "  [closed {}/{}] {:<12} {:>9.0} req/s  {}  errors {}",
                        rep + 1,
                        o.reps,
                        arm.name,
                        run.rps,
                        cpu_note(&run, ctx.ticks),
                        run.errors
                    );
                    save_raw(raw, w, &arm.name, "closed", rep, &run)?;
                    arm.closed.push(run);
                }
                Err(e) => fail(arm, &mut live[i], format!("closed-loop run {}: {e}", rep + 1)).await,
            }
            check_alive(&mut arms[i], &mut live[i]).await;
        }
    }

    // Syscalls per request, in one extra run per proxy (strace slows the proxy down many times over).
    if o.strace && ctx.strace.is_some() {
        for i in 0..arms.len() {
            let Some(l) = live[i].as_ref() else { continue };
            if l.proc.is_none() {
                continue;
            }
            let r = run_load(ctx, w, l, None, true).await;
            let arm = &mut arms[i];
            match r {
                Ok(run) => {
                    if let Some(n) = run.syscalls {
                        eprintln!(
                            "  [strace] {:<12} {:.1} syscalls/request",
                            arm.name,
                            n as f64 / run.requests.max(1) as f64
                        );
                    }
                    save_raw(raw, w, &arm.name, "strace", 0, &run)?;
                    arm.strace = Some(run);
                }
                Err(e) => eprintln!("  [strace] {}: {e}", arm.name),
            }
            check_alive(&mut arms[i], &mut live[i]).await;
        }
    }

    // Open loop at half the slowest proxy's saturation rate, interleaved (not with a connection per request).
    let open_rate = if o.open_loop && !w.new_conn {
        open_rate(&arms)
    } else {
        None
    };
    if let Some((rate, from)) = &open_rate {
        eprintln!("  open loop at {rate:.0} req/s (50% of {from}'s median saturation rate)");
        for rep in 0..o.reps {
            for i in rotation(arms.len(), rep) {
                if live[i].is_none() {
                    continue;
                }
                let r = measured_run(ctx, w, &live, i, Some(*rate)).await;
                let arm = &mut arms[i];
                match r {
                    Ok(run) => {
                        eprintln!(
                            "  [open {}/{}] {:<12} p50 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs  errors {}",
                            rep + 1,
                            o.reps,
                            arm.name,
                            run.latency[0],
                            run.latency[2],
                            run.latency[3],
                            run.errors
                        );
                        save_raw(raw, w, &arm.name, "open", rep, &run)?;
                        arm.open.push(run);
                    }
                    Err(e) => fail(arm, &mut live[i], format!("open-loop run {}: {e}", rep + 1)).await,
                }
                check_alive(&mut arms[i], &mut live[i]).await;
            }
        }
    }

    for l in live.into_iter().flatten() {
        if let Some(p) = l.proc {
            p.stop(Duration::from_secs(3)).await;
        }
    }
    // Access logs can be large; they are not results.
    for entry in std::fs::read_dir(&ctx.tmp.path)?.flatten() {
        if entry.file_name().to_string_lossy().ends_with("-access.log") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(WorkloadRuns {
        workload: *w,
        open_rate,
        arms,
    })
}

/// One closed- or open-loop run of arm `i`, after waiting for a quiet machine, repeated (up to `--retries`
/// times) while other processes disturb it.
async fn measured_run(
    ctx: &Ctx,
    w: &Workload,
    live: &[Option<Live>],
    i: usize,
    rate: Option<f64>,
) -> Result<Run> {
    let l = live[i].as_ref().ok_or("the arm is not running")?;
    let mut attempt = 0;
    loop {
        let quiet = wait_quiet(ctx, live).await;
        let run = run_load(ctx, w, l, rate, false).await?;
        let other = run.other_cpu as f64 / ctx.ticks as f64 / run.wall.max(1e-9);
        // Redoing a run is worth it only if the machine was quiet before it: a busy machine stays busy.
        if other < QUIET || !quiet || attempt >= ctx.opts.retries {
            return Ok(run);
        }
        attempt += 1;
        eprintln!(
            "  discarded a run: other processes used {:.0}% of a core during it (retry {attempt} of {})",
            other * 100.0,
            ctx.opts.retries
        );
    }
}

/// Share of a core that other processes may use for the machine to count as quiet.
const QUIET: f64 = 0.1;

/// Waits (up to `--quiet-wait`) until processes other than ours use less than [`QUIET`] of a core, measured
/// over half-second intervals; returns whether they did. A shared machine's background work is the largest
/// source of noise here. After three waits in a row time out, it only takes one sample until the machine is
/// seen quiet again, so a machine that stays busy does not stretch the run by the wait each time.
async fn wait_quiet(ctx: &Ctx, live: &[Option<Live>]) -> bool {
    if ctx.opts.quiet_wait.is_zero() {
        return true;
    }
    let patient = ctx.busy_waits.get() < 3;
    let limit = Instant::now()
        + if patient {
            ctx.opts.quiet_wait
        } else {
            Duration::ZERO
        };
    let mut ours: Vec<i32> = live
        .iter()
        .flatten()
        .filter_map(|l| l.proc.as_ref().map(Guard::pid))
        .collect();
    ours.push(ctx.upstream_pid);
    let sample = || {
        let mine: u64 = ours
            .iter()
            .filter_map(|p| group_cpu(*p).ok())
            .map(|c| c.user + c.system)
            .sum();
        (machine_busy().unwrap_or(0), mine)
    };
    let mut said = false;
    loop {
        let (m0, o0, t0) = {
            let (m, o) = sample();
            (m, o, Instant::now())
        };
        sleep(Duration::from_millis(500)).await;
        let (m1, o1) = sample();
        let other = m1.saturating_sub(m0).saturating_sub(o1.saturating_sub(o0)) as f64
            / ctx.ticks as f64
            / t0.elapsed().as_secs_f64();
        if other < QUIET {
            ctx.busy_waits.set(0);
            return true;
        }
        if Instant::now() >= limit {
            eprintln!(
                "  other processes use {:.0}% of a core: measuring anyway (the report flags it)",
                other * 100.0
            );
            ctx.busy_waits.set(ctx.busy_waits.get() + 1);
            return false;
        }
        if !said {
            eprintln!(
                "  waiting up to {:?} for other processes to go quiet ({:.0}% of a core busy)",
                ctx.opts.quiet_wait,
                other * 100.0
            );
            said = true;
        }
    }
}

/// Arm indices for repetition `rep`: A B C, then B C A, then C A B, ...
fn rotation(n: usize, rep: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + rep) % n.max(1))
}

/// Half the median saturation rate of the slowest measured proxy (or of direct, if no proxy was measured).
fn open_rate(arms: &[ArmRuns]) -> Option<(f64, String)> {
    let medians = arms
        .iter()
        .filter(|a| !a.closed.is_empty() && a.failure.is_none())
        .map(|a| {
            let rps: Vec<f64> = a.closed.iter().map(|r| r.rps).collect();
            (report::median(&rps), a.name.clone())
        });
    let (proxies, direct): (Vec<_>, Vec<_>) = medians.partition(|(_, n)| n != "direct");
    let pool = if proxies.is_empty() { direct } else { proxies };
    pool.into_iter()
        .filter(|(r, _)| *r > 0.0)
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(r, n)| (r * 0.5, n))
}

fn cpu_note(run: &Run, ticks: u64) -> String {
    let other = run.other_cpu as f64 / ticks as f64 / run.wall.max(1e-9);
    let busy = if other > 0.05 {
        format!(", OTHER PROCESSES {:.0}% of a core", other * 100.0)
    } else {
        String::new()
    };
    busy_prefix(run, ticks) + &busy
}

fn busy_prefix(run: &Run, ticks: u64) -> String {
    match run.proxy_cpu {
        Some(c) if run.requests > 0 => {
            let per = |t: u64| t as f64 * 1e6 / ticks as f64 / run.requests as f64;
            format!(
                "proxy CPU {:.1} user + {:.1} sys µs/req ({:.0}% of a core), generator core {:.0}%",
                per(c.user),
                per(c.system),
                100.0 * (c.user + c.system) as f64 / ticks as f64 / run.wall,
                100.0 * (run.gen_cpu.user + run.gen_cpu.system) as f64 / ticks as f64 / run.wall
            )
        }
        _ => format!(
            "generator core {:.0}%",
            100.0 * (run.gen_cpu.user + run.gen_cpu.system) as f64 / ticks as f64 / run.wall.max(1e-9)
        ),
    }
}

async fn fail(arm: &mut ArmRuns, live: &mut Option<Live>, reason: String) {
    eprintln!("  {}: FAILED: {reason}", arm.name);
    arm.failure = Some(reason);
    if let Some(l) = live.take() {
        if let Some(p) = l.proc {
            p.stop(Duration::from_secs(2)).await;
        }
    }
}

/// Marks the arm failed if its proxy has exited.
async fn check_alive(arm: &mut ArmRuns, live: &mut Option<Live>) {
    let Some(l) = live.as_mut() else { return };
    let Some(p) = l.proc.as_mut() else { return };
    if let Some(status) = p.exited() {
        let tail = l.log.as_deref().map(log_tail).unwrap_or_default();
        fail(
            arm,
            live,
            format!("the proxy exited ({status}) during the runs; its output ends:\n{tail}"),
        )
        .await;
    }
}

fn save_raw(raw: &Path, w: &Workload, arm: &str, phase: &str, rep: usize, run: &Run) -> Result<()> {
    let v = json!({
        "workload": w.name,
        "arm": arm,
        "phase": phase,
        "rep": rep + 1,
        "load": run.load,
        "wall_s": run.wall,
        "proxy_cpu_ticks": run.proxy_cpu.map(|c| json!({"user": c.user, "system": c.system})),
        "generator_cpu_ticks": json!({"user": run.gen_cpu.user, "system": run.gen_cpu.system}),
        "other_processes_cpu_ticks": run.other_cpu,
        "proxy_rss_kib": run.proxy_mem.map(|m| m.rss_kib),
        "proxy_hwm_kib": run.proxy_mem.map(|m| m.hwm_kib),
        "syscalls": run.syscalls,
    });
    let path = raw.join(format!("{}-{arm}-{phase}-{}.json", w.name, rep + 1));
    std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")?;
    Ok(())
}

/// Free loopback ports, held together while chosen so that they differ (then released for the proxy).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let ls: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    ls.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

fn load_config(w: &Workload, port: u16, ctx: &Ctx) -> LoadConfig {
    LoadConfig {
        target: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        authority: format!("127.0.0.1:{port}"),
        proto: w.proto,
        connections: w.connections,
        streams: w.streams,
        warmup: ctx.opts.warmup,
        duration: ctx.opts.duration,
        rate: None,
        path: w.path.to_owned(),
        body: w.body,
        grpc: w.grpc,
        timeout: Duration::from_secs(2),
        threads: 1,
        tls: w.tls,
        new_conn: w.new_conn,
    }
}

/// Starts an arm's proxy and waits until a request of the workload's kind goes through it.
async fn start_arm(ctx: &Ctx, w: &Workload, name: &str) -> Result<Live> {
    let o = &ctx.opts;
    let k = kind(name).ok_or("unknown arm")?;
    let missing = |what: &str| -> crate::Error { format!("{what} is not installed").into() };
    let ports = {
        let p = free_ports(2)?;
        Ports {
            listen: p[0],
            admin: p[1],
            upstream: ctx.upstream_port,
            access_log: ctx.tmp.path.join(format!("{name}-{}-access.log", w.name)),
            tls_dir: ctx.tmp.path.join("tls"),
        }
    };
    let file = |ext: &str| ctx.tmp.path.join(format!("{name}-{}.{ext}", w.name));
    let (program, args): (PathBuf, Vec<String>) = match k {
        Kind::Direct if w.tls => return Err("n/a: the direct path has no TLS".into()),
        Kind::Direct => {
            return Ok(Live {
                port: ctx.upstream_port,
                proc: None,
                log: None,
            })
        }
        Kind::Remora(_) | Kind::RemoraNoStats | Kind::Envoy(_) => {
            let v = match k {
                Kind::Remora(v) | Kind::Envoy(v) => v,
                _ => Variant::Plain,
            };
            let is_remora = !matches!(k, Kind::Envoy(_));
            let program = if is_remora {
                if o.remora_build_failed {
                    return Err("`cargo build --release -p remora` failed (see run.sh's output)".into());
                }
                let bin = if k == Kind::RemoraNoStats {
                    &o.remora_nostats
                } else {
                    &o.remora
                };
                if !bin.is_file() {
                    return Err(format!("no binary at {}", bin.display()).into());
                }
                bin.clone()
            } else {
                ctx.envoy.clone().ok_or_else(|| missing("envoy"))?
            };
            let path = file("yaml");
            std::fs::write(&path, bootstrap(&o.config_dir, v, w, &ports)?)?;
            ctx.keep_config(&path, &format!("{name}-{}.yaml", w.name))?;
            let mut args = vec![
                "-c".to_owned(),
                path.display().to_string(),
                "--concurrency".into(),
                "1".into(),
            ];
            if !is_remora {
                // Several Envoys run side by side: no shared-memory hot-restart region.
                args.push("--disable-hot-restart".into());
            }
            (program, args)
        }
        Kind::Nginx => {
            let program = ctx.nginx.clone().ok_or_else(|| missing("nginx"))?;
            let dir = ctx.tmp.path.join(format!("nginx-{}", w.name));
            std::fs::create_dir_all(&dir)?;
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(&dir, w, &ports))?;
            ctx.keep_config(&conf, &format!("nginx-{}.conf", w.name))?;
            let err = dir.join("nginx-error.log").display().to_string();
            let args = vec![
                "-p".into(),
                dir.display().to_string(),
                "-e".into(),
                err,
                "-c".into(),
                conf.display().to_string(),
            ];
            (program, args)
        }
        Kind::Haproxy => {
            let program = ctx.haproxy.clone().ok_or_else(|| missing("haproxy"))?;
            let conf = file("cfg");
            std::fs::write(&conf, haproxy_conf(w, &ports))?;
            ctx.keep_config(&conf, &format!("haproxy-{}.cfg", w.name))?;
            (
                program,
                vec!["-db".into(), "-f".into(), conf.display().to_string()],
            )
        }
    };
    let log = file("log");
    let out = File::create(&log)?;
    let mut cmd = pinned(o.proxy_core, &program, &args);
    cmd.stdout(out.try_clone()?).stderr(out);
    let mut proc = Guard::spawn(name, cmd)?;

    let mut cfg = load_config(w, ports.listen, ctx);
    cfg.timeout = Duration::from_secs(1);
    let deadline = Instant::now() + o.startup_timeout;
    loop {
        if let Some(status) = proc.exited() {
            return Err(ctx
                .scrub(&format!(
                    "exited ({status}) at startup: {}\ncommand: `{} {}`\nits output ends:\n{}",
                    headline(&log),
                    program.display(),
                    args.join(" "),
                    log_tail(&log)
                ))
                .into());
        }
        let last = match probe(&cfg).await {
            Ok(()) => {
                return Ok(Live {
                    port: ports.listen,
                    proc: Some(proc),
                    log: Some(log),
                })
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            let tail = log_tail(&log);
            proc.stop(Duration::from_secs(2)).await;
            return Err(ctx.scrub(&format!(
                "no answer through it within {:?} (last attempt: {last})\ncommand: `{} {}`\nits output ends:\n{tail}",
                o.startup_timeout,
                program.display(),
                args.join(" "),
            ))
            .into());
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// The most telling line of a failed proxy's output: the first that reports an error, else the last.
fn headline(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let telling = ["error", "alert", "emerg", "fatal", "panicked", "critical"];
    lines
        .clone()
        .find(|l| {
            let l = l.to_ascii_lowercase();
            telling.iter().any(|t| l.contains(t))
        })
        .or_else(|| lines.clone().next_back())
        .map_or_else(|| "(no output)".to_owned(), |l| l.chars().take(300).collect())
}

/// The last lines of a log file, indented.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(12)..];
    if tail.is_empty() {
        "    (no output)".to_owned()
    } else {
        tail.iter()
            .map(|l| format!("    {}", l.chars().take(300).collect::<String>()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// CPU samples at one instant.
struct Snap {
    at: Instant,
    proxy: Option<CpuTicks>,
    gen: CpuTicks,
    machine: u64,
}

fn snap(ctx: &Ctx, proxy: Option<i32>, load: i32) -> Snap {
    let cpu = |pid: i32| group_cpu(pid).unwrap_or_default();
    let (u, l) = (cpu(ctx.upstream_pid), cpu(load));
    Snap {
        at: Instant::now(),
        proxy: proxy.map(cpu),
        gen: CpuTicks {
            user: u.user + l.user,
            system: u.system + l.system,
        },
        machine: machine_busy().unwrap_or(0),
    }
}

/// Runs bench-load against `live`, sampling the proxy over the measured window.
async fn run_load(ctx: &Ctx, w: &Workload, live: &Live, rate: Option<f64>, strace: bool) -> Result<Run> {
    let o = &ctx.opts;
    let mut args: Vec<String> = vec![
        "--target".into(),
        format!("127.0.0.1:{}", live.port),
        "--proto".into(),
        w.proto.name().into(),
        "--connections".into(),
        w.connections.to_string(),
        "--streams".into(),
        w.streams.to_string(),
        "--duration".into(),
        format!("{}s", o.duration.as_secs_f64()),
        "--warmup".into(),
        format!("{}s", o.warmup.as_secs_f64()),
        "--path".into(),
        w.path.into(),
        "--body".into(),
        w.body.to_string(),
    ];
    if w.grpc {
        args.push("--grpc".into());
    }
    if w.tls {
        args.push("--tls".into());
    }
    if w.new_conn {
        args.push("--new-conn".into());
    }
    if let Some(r) = rate {
        args.extend(["--rate".into(), format!("{r:.3}"), "--hist".into()]);
    }
    let err_path = ctx.tmp.path.join("bench-load.err");
    let mut cmd = pinned(o.load_core, ctx.bin("bench-load"), &args);
    cmd.stdout(Stdio::piped()).stderr(File::create(&err_path)?);
    let mut g = Guard::spawn("bench-load", cmd)?;
    let mut lines = BufReader::new(g.take_stdout().ok_or("bench-load's stdout is not piped")?).lines();
    let limit = Instant::now() + o.warmup + o.duration + Duration::from_secs(30);
    let proxy_pid = live.proc.as_ref().map(Guard::pid);
    let (mut start, mut end, mut mem, mut json) = (None, None, None, None);
    let mut tracer: Option<(Guard, PathBuf)> = None;
    let mut syscalls = None;
    while let Some(line) = timeout_at(limit, lines.next_line())
        .await
        .map_err(|_| "bench-load timed out")??
    {
        match line.trim() {
            "measure-start" => {
                if strace {
                    if let (Some(pid), Some(st)) = (proxy_pid, ctx.strace.as_ref()) {
                        tracer = Some(start_strace(ctx, st, pid).await?);
                    }
                }
                start = Some(snap(ctx, proxy_pid, g.pid()));
            }
            "measure-end" => {
                end = Some(snap(ctx, proxy_pid, g.pid()));
                mem = proxy_pid.and_then(|p| group_memory(p).ok());
                if let Some((t, out)) = tracer.take() {
                    syscalls = Some(stop_strace(t, &out).await?);
                }
            }
            l if l.starts_with('{') => json = Some(serde_json::from_str::<Value>(l)?),
            _ => {}
        }
    }
    let status = g.wait_for(Duration::from_secs(10)).await;
    if !status.is_some_and(|s| s.success()) {
        let why = status.map_or_else(|| "did not exit".to_owned(), |s| s.to_string());
        return Err(format!("bench-load failed ({why}):\n{}", log_tail(&err_path)).into());
    }
    let (Some(start), Some(end), Some(mut load)) = (start, end, json) else {
        return Err("bench-load's output was incomplete".into());
    };
    let hist = load.get("hist").and_then(Value::as_array).map(|buckets| {
        let pairs = buckets
            .iter()
            .filter_map(|b| Some((b.get(0)?.as_u64()?, b.get(1)?.as_u64()?)));
        let min = load.get("hist_min_ns").and_then(Value::as_u64).unwrap_or(0);
        let max = load
            .get("hist_max_ns")
            .and_then(Value::as_u64)
            .unwrap_or(u64::MAX);
        Histogram::from_buckets(pairs, min, max)
    });
    if let Some(obj) = load.as_object_mut() {
        obj.remove("hist");
    }
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let lat = load.get("latency_us").cloned().unwrap_or(Value::Null);
    Ok(Run {
        rps: num(&load, "rps"),
        requests: num(&load, "requests") as u64,
        errors: num(&load, "errors") as u64,
        wall: end.at.saturating_duration_since(start.at).as_secs_f64(),
        proxy_cpu: end.proxy.zip(start.proxy).map(|(e, s)| e.since(s)),
        gen_cpu: end.gen.since(start.gen),
        other_cpu: {
            let ours = |s: &Snap| {
                let p = s.proxy.unwrap_or_default();
                p.user + p.system + s.gen.user + s.gen.system
            };
            end.machine
                .saturating_sub(start.machine)
                .saturating_sub(ours(&end).saturating_sub(ours(&start)))
        },
        proxy_mem: mem,
        latency: [
            num(&lat, "p50"),
            num(&lat, "p90"),
            num(&lat, "p99"),
            num(&lat, "p99.9"),
        ],
        hist,
        syscalls,
        load,
    })
}

/// Attaches `strace -c -f` to `pid` and waits until it reports being attached.
async fn start_strace(ctx: &Ctx, strace: &Path, pid: i32) -> Result<(Guard, PathBuf)> {
    let out = ctx.tmp.path.join(format!("strace-{pid}.txt"));
    let err = ctx.tmp.path.join(format!("strace-{pid}.err"));
    let mut cmd = tokio::process::Command::new(strace);
    cmd.args(["-c", "-f", "-o"])
        .arg(&out)
        .args(["-p", &pid.to_string()]);
    cmd.stdout(Stdio::null()).stderr(File::create(&err)?);
    let mut g = Guard::spawn("strace", cmd)?;
    let limit = Instant::now() + Duration::from_secs(5);
    loop {
        if std::fs::read_to_string(&err).is_ok_and(|s| s.contains("attached")) {
            return Ok((g, out));
        }
        if let Some(s) = g.exited() {
            return Err(format!("strace exited ({s}): {}", log_tail(&err)).into());
        }
        if Instant::now() >= limit {
            return Err(format!("strace did not attach within 5 s: {}", log_tail(&err)).into());
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// Detaches strace (SIGINT) and returns the total syscall count from its summary.
async fn stop_strace(mut g: Guard, out: &Path) -> Result<u64> {
    g.signal(libc::SIGINT);
    if g.wait_for(Duration::from_secs(10)).await.is_none() {
        return Err("strace did not exit after SIGINT".into());
    }
    let text = std::fs::read_to_string(out)?;
    strace_total(&text).ok_or_else(|| format!("no total in strace's summary:\n{text}").into())
}

/// The calls column of the `total` line of `strace -c` output.
pub fn strace_total(summary: &str) -> Option<u64> {
    let line = summary
        .lines()
        .find(|l| l.split_whitespace().last() == Some("total"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

async fn version(program: &Option<PathBuf>, arg: &str) -> Option<String> {
    let p = program.as_ref()?;
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new(p)
            .arg(arg)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
}

async fn environment(
    o: &Options,
    pinning: &str,
    envoy: &Option<PathBuf>,
    nginx: &Option<PathBuf>,
    haproxy: &Option<PathBuf>,
) -> Environment {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut lines = vec![
        format!("Machine: {cpu}, Linux {}; {pinning}.", kernel.trim()),
        format!(
            "Each run: {} s warm-up, then a {} s measured window; {} repetitions per arm, arms interleaved.",
            o.warmup.as_secs_f64(),
            o.duration.as_secs_f64(),
            o.reps
        ),
    ];
    let remora = match std::fs::metadata(&o.remora).and_then(|m| m.modified()) {
        Ok(t) => format!("{} (built {})", o.remora.display(), date_time(t)),
        Err(_) => format!("{} (missing)", o.remora.display()),
    };
    lines.push(format!("Remora: {remora}"));
    if o.arms.iter().any(|a| kind(a) == Some(Kind::RemoraNoStats)) {
        let nostats = match std::fs::metadata(&o.remora_nostats).and_then(|m| m.modified()) {
            Ok(t) => format!("{} (built {})", o.remora_nostats.display(), date_time(t)),
            Err(_) => format!("{} (missing)", o.remora_nostats.display()),
        };
        lines.push(format!(
            "Remora without stats (`--features stats-off`): {nostats}"
        ));
    }
    for (name, p, arg) in [
        ("Envoy", envoy, "--version"),
        ("nginx", nginx, "-v"),
        ("HAProxy", haproxy, "-v"),
    ] {
        lines.push(format!(
            "{name}: {}",
            version(p, arg).await.unwrap_or_else(|| "not installed".into())
        ));
    }
    Environment {
        date: today(),
        lines,
        options: json!({
            "duration_s": o.duration.as_secs_f64(),
            "warmup_s": o.warmup.as_secs_f64(),
            "reps": o.reps,
            "strace": o.strace,
            "open_loop": o.open_loop,
            "proxy_core": o.proxy_core,
            "load_core": o.load_core,
            "quick": o.quick,
        }),
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn date_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", s / 3600, s / 60 % 60)
}

/// Today's UTC date, `YYYY-MM-DD`.
pub fn today() -> String {
    date_time(SystemTime::now())[..10].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(today().len(), 10);
    }

    #[test]
    fn strace_summary() {
        let s = "% time     seconds  usecs/call     calls    errors syscall\n\
                 ------ ----------- ----------- --------- --------- ----------------\n\
                  40.00    0.400000           2    200000           writev\n\
                  35.00    0.350000           1    300000    100000 recvfrom\n\
                 ------ ----------- ----------- --------- --------- ----------------\n\
                 100.00    1.000000           2    500000    100000 total\n";
        assert_eq!(strace_total(s), Some(500_000));
        assert_eq!(strace_total("100.00 0.1 1 42 total"), Some(42));
        assert_eq!(strace_total("nothing"), None);
    }

    #[test]
    fn rotation_interleaves() {
        assert_eq!(rotation(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(rotation(3, 1).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(rotation(0, 1).count(), 0);
    }

    #[test]
    fn options() {
        let o = Options::parse(Args::new(["--quick", "--arms", "direct,nginx"])).unwrap();
        assert_eq!(o.workloads.len(), 1);
        assert_eq!(o.duration, Duration::from_secs(5));
        assert_eq!(o.reps, 3);
        assert!(o.out_dir.to_string_lossy().ends_with("-quick"));
        let o = Options::parse(Args::new(["--results-dir", "/r", "--out", "/x/tls"])).unwrap();
        assert_eq!(o.out_dir, Path::new("/x/tls"));
        assert!(Options::parse(Args::new(["--arms", "squid"])).is_err());
        assert!(Options::parse(Args::new(["--frobnicate"])).is_err());
    }
}
