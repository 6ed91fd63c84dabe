//! Building blocks of the scenario runners (`src/bin/retry_storm.rs`, `src/bin/overload.rs`): each runner starts
//! the real `remora` binary between an in-process upstream of fixed capacity and an open-loop load generator, and
//! writes a Markdown table and an SVG plot.
//!
//! - [`CapacityUpstream`]: `slots` requests are served at once, each for `service` × the current slowdown factor;
//!   beyond that, requests queue (FIFO). A queued request whose client went away leaves the queue; a request being
//!   served is served to the end even if nobody waits for it any more (wasted work, as in a real service). It
//!   speaks HTTP/1.1 and h2c and counts arrivals per second.
//! - [`RemoraProcess`]: the proxy as a child process on a generated config, killed on drop.
//! - [`run_load`]: an open-loop generator: requests are sent on a schedule (rate per second as a function of
//!   time) whether or not earlier ones have answered, each with a client timeout, over h2c.
//! - [`PerSecond`]: counters indexed by second since the start of a run.
//! - [`markdown_table`] and [`svg_plot`]: output, written by hand.
//!
//! Every wait is bounded: a run lasts its duration plus the client timeout, and starting the proxy gives up after
//! ten seconds.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The error type of the runners.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Counters per second of a run; events past its end are not counted.
pub struct PerSecond {
    start: Instant,
    counts: Vec<AtomicU64>,
}

impl PerSecond {
    pub fn new(start: Instant, seconds: usize) -> PerSecond {
        PerSecond {
            start,
            counts: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Counts one event now.
    pub fn tick(&self) {
        let s = self.start.elapsed().as_secs() as usize;
        if let Some(c) = self.counts.get(s) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }
}

/// An upstream of fixed capacity; see the module docs.
pub struct CapacityUpstream {
    addr: SocketAddr,
    slowdown: Arc<AtomicU64>,
    arrivals: Arc<Mutex<Option<Arc<PerSecond>>>>,
    total: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CapacityUpstream {
    /// Starts on `127.0.0.1:0`: `slots` concurrent requests of `service` each.
    pub async fn start(slots: usize, service: Duration) -> Result<CapacityUpstream, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let slowdown = Arc::new(AtomicU64::new(1));
        let arrivals: Arc<Mutex<Option<Arc<PerSecond>>>> = Arc::new(Mutex::new(None));
        let total = Arc::new(AtomicU64::new(0));
        let semaphore = Arc::new(Semaphore::new(slots));
        let state = (slowdown.clone(), arrivals.clone(), total.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (slowdown, arrivals, total) = state.clone();
                let semaphore = semaphore.clone();
                let service_fn = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                    total.fetch_add(1, Ordering::Relaxed);
                    if let Some(a) = arrivals.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
                        a.tick();
                    }
                    let semaphore = semaphore.clone();
                    let factor = slowdown.load(Ordering::Relaxed);
                    async move {
                        // Queued: dropping this future (the client reset the stream) leaves the queue.
                        let Ok(permit) = semaphore.acquire_owned().await else {
                            return Ok::<_, Infallible>(status(StatusCode::SERVICE_UNAVAILABLE));
                        };
                        // Served: the work runs to its end even if the answer is no longer wanted.
                        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                        let work = service * factor as u32;
                        tokio::spawn(async move {
                            tokio::time::sleep(work).await;
                            drop(permit);
                            let _ = tx.send(());
                        });
                        let _ = rx.await;
                        Ok(status(StatusCode::OK))
                    }
                });
                tokio::spawn(async move {
                    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder.http2().max_concurrent_streams(1_000_000);
                    let _ = builder.serve_connection(TokioIo::new(stream), service_fn).await;
                });
            }
        });
        Ok(CapacityUpstream {
            addr,
            slowdown,
            arrivals,
            total,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Multiplies the service time of requests that start being served from now on.
    pub fn set_slowdown(&self, factor: u64) {
        self.slowdown.store(factor.max(1), Ordering::Relaxed);
    }

    /// Counts arrivals into `counter` from now on.
    pub fn count_arrivals(&self, counter: Option<Arc<PerSecond>>) {
        *self.arrivals.lock().unwrap_or_else(PoisonError::into_inner) = counter;
    }

    /// Requests received since the start.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for CapacityUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
    *r.status_mut() = code;
    r
}

/// One GET over a fresh HTTP/1.1 connection; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), Error> {
    let stream = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// The proxy as a child process; see the module docs.
pub struct RemoraProcess {
    child: tokio::process::Child,
    dir: PathBuf,
    admin: SocketAddr,
}

impl RemoraProcess {
    /// Writes `config` to a fresh dir, runs `binary -c <it> --concurrency <workers>`, and waits (at most 10 s)
    /// for the admin address and `/ready`.
    pub async fn start(
        binary: &Path,
        config: &serde_json::Value,
        workers: u32,
        label: &str,
    ) -> Result<RemoraProcess, Error> {
        let dir = std::env::temp_dir().join(format!("remora-scenario-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("remora.yaml");
        std::fs::write(&config_path, serde_json::to_string_pretty(config)?)?;
        let admin_path = dir.join("admin-address");
        let child = tokio::process::Command::new(binary)
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--concurrency")
            .arg(workers.to_string())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout.log"))?)
            .stderr(std::fs::File::create(dir.join("stderr.log"))?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        let mut process = RemoraProcess {
            child,
            dir,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(&admin_path) {
                if let Ok(addr) = text.trim().parse() {
                    process.admin = addr;
                    if matches!(http_get(addr, "/ready").await, Ok((200, _))) {
                        return Ok(process);
                    }
                }
            }
            if let Ok(Some(exit)) = process.child.try_wait() {
                return Err(format!("remora exited ({exit}): {}", process.stderr()).into());
            }
            if Instant::now() > deadline {
                return Err(format!("remora not ready after 10 s: {}", process.stderr()).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The address of listener `name`, from `/listeners?format=json`.
    pub async fn listener(&self, name: &str) -> Result<SocketAddr, Error> {
        let (_, body) = http_get(self.admin, "/listeners?format=json").await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let statuses = v["listener_statuses"].as_array().cloned().unwrap_or_default();
        for s in statuses {
            if s["name"] == name {
                let a = &s["local_address"]["socket_address"];
                let ip = a["address"].as_str().unwrap_or("127.0.0.1");
                let port = a["port_value"].as_u64().unwrap_or(0);
                return Ok(format!("{ip}:{port}").parse()?);
            }
        }
        Err(format!("no listener {name} in {body}").into())
    }

    /// Stat `name` from `/stats`, 0 when absent.
    pub async fn stat(&self, name: &str) -> Result<i64, Error> {
        let (_, body) = http_get(self.admin, "/stats").await?;
        Ok(body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0))
    }
}

impl Drop for RemoraProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How one client request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// No response within the client timeout.
    Timeout,
    /// The connection failed.
    Error,
}

/// One request of a load run.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    /// When it was sent, since the start of the run.
    pub sent: Duration,
    /// Until the response head (or the timeout, or the error).
    pub latency: Duration,
    pub outcome: Outcome,
}

impl Record {
    pub fn ok(&self) -> bool {
        matches!(self.outcome, Outcome::Status(200..=299))
    }
}

/// A few h2c connections to one address, opened again when they close.
pub struct H2Client {
    addr: SocketAddr,
    conns: Vec<tokio::sync::Mutex<Option<SendRequest<Empty<Bytes>>>>>,
    next: AtomicU64,
}

impl H2Client {
    pub fn new(addr: SocketAddr, connections: usize) -> H2Client {
        H2Client {
            addr,
            conns: (0..connections.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicU64::new(0),
        }
    }

    async fn sender(&self) -> Result<SendRequest<Empty<Bytes>>, Error> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.conns.len();
        let mut slot = self.conns[i].lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let stream = TcpStream::connect(self.addr).await?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_reset_streams(1_000_000)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(conn);
        *slot = Some(send.clone());
        Ok(send)
    }

    /// GET `path`; the outcome and the time to the response head.
    pub async fn get(&self, path: &str, timeout: Duration) -> (Outcome, Duration) {
        let start = Instant::now();
        let attempt = async {
            let mut send = self.sender().await?;
            let req = Request::get(format!("http://{}{path}", self.addr)).body(Empty::<Bytes>::new())?;
            let resp = send.send_request(req).await?;
            let code = resp.status().as_u16();
            // Read the (small) body so the stream ends cleanly.
            let _ = resp.into_body().collect().await;
            Ok::<_, Error>(code)
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(code)) => (Outcome::Status(code), start.elapsed()),
            Ok(Err(_)) => (Outcome::Error, start.elapsed()),
            Err(_) => (Outcome::Timeout, start.elapsed()),
        }
    }
}

/// Offers load open-loop for `duration`: at time t, `rate(t)` requests per second, each its own task with
/// `timeout`. `on_second(s)` is called at the start of each second (to degrade an upstream, say). Returns every
/// request once all have ended (at most `duration + timeout`).
pub async fn run_load(
    client: Arc<H2Client>,
    path: &str,
    duration: Duration,
    timeout: Duration,
    rate: impl Fn(Duration) -> f64,
    mut on_second: impl FnMut(u64),
    start: Instant,
) -> Vec<Record> {
    let records = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut owed = 0.0f64;
    let mut last = start;
    let mut second = None;
    let path: Arc<str> = Arc::from(path);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let t = now.duration_since(start);
        if t >= duration {
            break;
        }
        let s = t.as_secs();
        if second != Some(s) {
            second = Some(s);
            on_second(s);
        }
        owed += rate(t) * now.duration_since(last).as_secs_f64();
        last = now;
        while owed >= 1.0 {
            owed -= 1.0;
            let client = client.clone();
            let records = records.clone();
            let path = path.clone();
            tasks.spawn(async move {
                let (outcome, latency) = client.get(&path, timeout).await;
                let r = Record {
                    sent: t,
                    latency,
                    outcome,
                };
                records.lock().unwrap_or_else(PoisonError::into_inner).push(r);
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut out = std::mem::take(&mut *records.lock().unwrap_or_else(PoisonError::into_inner));
    out.sort_by_key(|r| r.sent);
    out
}

/// The `q` quantile (0..=1) of `values` (sorted here), or zero when empty.
pub fn quantile(values: &mut [Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    let i = ((values.len() - 1) as f64 * q).round() as usize;
    values[i.min(values.len() - 1)]
}

/// A Markdown table.
pub fn markdown_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| {} |", headers.join(" | "));
    let _ = writeln!(s, "|{}", headers.iter().map(|_| "---|").collect::<String>());
    for r in rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s
}

/// One line of a plot.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

/// One panel of a plot: its own y axis, lines, and optional shaded x ranges (a degradation, say).
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub shade: Vec<(f64, f64)>,
    /// The y range; the data's maximum (from zero) when `None`.
    pub y_max: Option<f64>,
}

/// Panels stacked vertically over a shared x axis, as an SVG document.
pub fn svg_plot(title: &str, x_label: &str, panels: &[Panel]) -> String {
    const W: f64 = 900.0;
    const PH: f64 = 220.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 200.0;
    const TOP: f64 = 40.0;
    const GAP: f64 = 50.0;
    let x_max = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)))
        .fold(1.0f64, f64::max);
    let height = TOP + panels.len() as f64 * (PH + GAP) + 20.0;
    let pw = W - LEFT - RIGHT;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="16" text-anchor="middle">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let top = TOP + i as f64 * (PH + GAP);
        let y_max = panel.y_max.unwrap_or_else(|| {
            let m = panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.1))
                .fold(0.0f64, f64::max);
            nice(m)
        });
        let x = |v: f64| LEFT + v / x_max * pw;
        let y = |v: f64| top + PH - (v / y_max).clamp(0.0, 1.05) * PH;
        for &(a, b) in &panel.shade {
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{top:.1}" width="{:.1}" height="{PH}" fill="#f4d6d6"/>"##,
                x(a),
                x(b) - x(a)
            );
        }
        let _ = writeln!(
            s,
            r#"<rect x="{LEFT}" y="{top}" width="{pw}" height="{PH}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{:.1}" font-size="13">{}</text>"#,
            top - 6.0,
            esc(&panel.title)
        );
        for k in 0..=4 {
            let v = y_max * k as f64 / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + pw,
                y(v),
                y(v),
                LEFT - 5.0,
                y(v) + 4.0,
                fmt_num(v)
            );
        }
        let step = nice(x_max / 8.0).max(1.0);
        let mut t = 0.0;
        while t <= x_max + 1e-9 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x(t),
                top + PH + 15.0,
                fmt_num(t)
            );
            t += step;
        }
        let _ = writeln!(
            s,
            r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            18.0,
            top + PH / 2.0,
            esc(&panel.y_label)
        );
        for (j, series) in panel.series.iter().enumerate() {
            let pts: Vec<String> = series
                .points
                .iter()
                .map(|&(a, b)| format!("{:.1},{:.1}", x(a), y(b)))
                .collect();
            let dash = if series.dashed {
                r#" stroke-dasharray="5,3""#
            } else {
                ""
            };
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
                series.color,
                pts.join(" ")
            );
            let ly = top + 12.0 + j as f64 * 16.0;
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
                LEFT + pw + 10.0,
                LEFT + pw + 30.0,
                series.color,
                LEFT + pw + 35.0,
                ly + 4.0,
                esc(&series.name)
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        height - 8.0,
        esc(x_label)
    );
    s.push_str("</svg>\n");
    s
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at least `v`.
fn nice(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt_num(v: f64) -> String {
    if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// `benches/results/<YYYY-MM-DD>-<name>` under the workspace, created.
pub fn results_dir(name: &str) -> Result<PathBuf, Error> {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        / 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("results")
        .join(format!("{y:04}-{m:02}-{d:02}-{name}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Howard Hinnant's days-to-civil conversion.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The value after `--name` in `args`, parsed, or `default`.
pub fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, Error> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a value").into()),
    }
}

/// The `remora` binary: `--remora PATH`, else `target/release/remora` in the workspace.
pub fn remora_binary(args: &[String]) -> Result<PathBuf, Error> {
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/remora");
    let path = flag(args, "--remora", default.to_string_lossy().into_owned())?;
    let path = PathBuf::from(path);
    if !path.exists() {
        return Err(format!(
            "{} does not exist: `cargo build --release -p remora` or pass --remora PATH",
            path.display()
        )
        .into());
    }
    Ok(path)
}
