//! [`Remora`]: the proxy under test, as a child process of the test.
//!
//! The harness writes the config into a fresh [`TempDir`] and runs
//! `remora -c <dir>/remora.yaml --admin-address-path <dir>/admin-address <extra args>`, with stdout and stderr
//! sent to `<dir>/stdout.log` and `<dir>/stderr.log`. What it relies on the proxy for, as in Envoy:
//!
//! - `--admin-address-path <file>`: once the admin listener is bound, the proxy writes its address
//!   (`127.0.0.1:PORT`) to the file. The harness polls for a parsable address for at most
//!   [`DEFAULT_TIMEOUT`], failing with the logs if the process exits first.
//! - `GET /listeners?format=json` answers `{"listener_statuses":[{"name":"<name>","local_address":
//!   {"socket_address":{"address":"127.0.0.1","port_value":12345}}}]}` with the port actually bound, so
//!   configs use port 0 ([`Remora::listener_addr`]).
//! - `GET /ready` answers 200 once the proxy serves traffic; `GET /stats` lists `name: value` lines.
//! - `--mode validate -c <file>` checks a config and exits, 0 when it is accepted ([`validate`]).
//!
//! The process is killed when the `Remora` is dropped. If the test is panicking then, its stdout and stderr
//! are printed (the test runner shows them with the failure), and its temp dir is kept if the environment
//! has `REMORA_E2E_KEEP`.

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::client::build_request;
use super::{http1_client, within, HttpClient, DEFAULT_TIMEOUT, POLL_INTERVAL};

const REMORA: &str = env!("CARGO_BIN_EXE_remora");

/// A directory under the system temp dir, removed on drop unless [`TempDir::keep`] was called.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        loop {
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let path = std::env::temp_dir().join(format!("remora-e2e-{}-{n}-{nanos}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return TempDir { path, keep: false },
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("cannot create {}: {e}", path.display()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the dir and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Leaves the dir on disk after drop, for a post-mortem.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Default for TempDir {
    fn default() -> TempDir {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The running proxy; see the module docs.
pub struct Remora {
    child: Mutex<Child>,
    pid: u32,
    admin: SocketAddr,
    admin_client: HttpClient,
    config: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    // Dropped last, so that the logs outlive everything that may print them.
    dir: TempDir,
}

impl Remora {
    /// Starts the proxy on `yaml` and waits for its admin address (not for readiness: see
    /// [`Remora::wait_ready`]).
    pub async fn start(yaml: &str, extra_args: &[&str]) -> Remora {
        Remora::start_in(TempDir::new(), yaml, extra_args).await
    }

    /// As [`Remora::start`], in a dir that the test has already filled (files that the config names).
    pub async fn start_in(dir: TempDir, yaml: &str, extra_args: &[&str]) -> Remora {
        Remora::start_command(Command::new(REMORA), dir, yaml, extra_args).await
    }

    /// As [`Remora::start_in`], running `command` (a program and its first arguments, environment) instead of
    /// the bare binary: to set `RUST_LOG`, or to run a stand-in that keeps the same contract. The harness adds
    /// `-c`, `--admin-address-path`, `extra_args` and the stdio redirections.
    pub async fn start_command(
        mut command: Command,
        dir: TempDir,
        yaml: &str,
        extra_args: &[&str],
    ) -> Remora {
        let config = dir.write("remora.yaml", yaml);
        let admin_path = dir.path().join("admin-address");
        let stdout = dir.path().join("stdout.log");
        let stderr = dir.path().join("stderr.log");
        let log_file = |path: &Path| {
            File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
        };
        let program = command.as_std().get_program().to_string_lossy().into_owned();
        let mut child = command
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log_file(&stdout))
            .stderr(log_file(&stderr))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {program}: {e}"));
        let Some(pid) = child.id() else {
            panic!("{program} has no pid right after spawning")
        };
        let admin = read_admin_address(&mut child, &admin_path, &stdout, &stderr).await;
        Remora {
            child: Mutex::new(child),
            pid,
            admin,
            admin_client: http1_client(admin),
            config,
            stdout,
            stderr,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// A client for the admin listener, for a test that expects failures (e.g. after shutdown).
    pub fn admin_client(&self) -> &HttpClient {
        &self.admin_client
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Both logs, labelled, for a failure message.
    pub fn logs(&self) -> String {
        format_logs(&self.stdout, &self.stderr)
    }

    /// The exit status if the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        child.try_wait().ok().flatten()
    }

    /// GET `path` on the admin listener: status and body text. Panics (with the logs) if no answer.
    pub async fn admin_get(&self, path: &str) -> (StatusCode, String) {
        self.admin_request(Method::GET, path).await
    }

    /// POST `path` (no body) on the admin listener: status and body text. Panics (with the logs) if no answer.
    pub async fn admin_post(&self, path: &str) -> (StatusCode, String) {
        self.admin_request(Method::POST, path).await
    }

    async fn admin_request(&self, method: Method, path: &str) -> (StatusCode, String) {
        let request = build_request(method.clone(), path, &[], Bytes::new());
        match self.admin_client.fetch(request).await {
            Ok(reply) => (reply.status, reply.text()),
            Err(e) => self.fail(&format!("admin {method} {path}: {e}")),
        }
    }

    /// Polls `GET /ready` until it answers 200, for at most [`DEFAULT_TIMEOUT`].
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        // Each look is short, so that the whole wait stays near its bound.
        let client = self.admin_client.clone().with_timeout(Duration::from_secs(1));
        loop {
            self.fail_if_exited("while waiting for /ready");
            let last = match client.try_get("/ready", &[]).await {
                Ok(reply) if reply.status == StatusCode::OK => return,
                Ok(reply) => format!("{} {}", reply.status, reply.text()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "not ready after {DEFAULT_TIMEOUT:?}; last /ready: {last}"
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The address listener `name` is bound to, from `GET /listeners?format=json` (polled until the listener
    /// shows a port, for at most [`DEFAULT_TIMEOUT`]). A wildcard address is given as loopback.
    pub async fn listener_addr(&self, name: &str) -> SocketAddr {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        loop {
            let (status, body) = self.admin_get("/listeners?format=json").await;
            if status == StatusCode::OK {
                if let Some(addr) = parse_listener_addr(&body, name) {
                    return addr;
                }
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "no listener {name:?} after {DEFAULT_TIMEOUT:?}; /listeners: {status} {body}"
                ));
            }
            self.fail_if_exited("while waiting for a listener");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Every integer stat from `GET /stats`.
    pub async fn stats(&self) -> HashMap<String, i64> {
        let (status, body) = self.admin_get("/stats").await;
        if status != StatusCode::OK {
            self.fail(&format!("GET /stats answered {status}: {body}"));
        }
        parse_stats(&body)
    }

    /// Stat `name`, or `None` if the proxy has no such integer stat.
    pub async fn stat_opt(&self, name: &str) -> Option<i64> {
        self.stats().await.get(name).copied()
    }

    /// Stat `name`; panics, listing the stats of the same family, if there is none (a typo, usually).
    pub async fn stat(&self, name: &str) -> i64 {
        let stats = self.stats().await;
        if let Some(value) = stats.get(name) {
            return *value;
        }
        let family = name.split('.').next().unwrap_or(name);
        let mut similar: Vec<&String> = stats.keys().filter(|k| k.starts_with(family)).collect();
        similar.sort();
        panic!("no stat {name:?}; stats starting {family:?}: {similar:#?}");
    }

    /// Polls stat `name` until `accept` holds for its value (a missing stat counts as 0), for at most
    /// `timeout`; returns the value.
    pub async fn wait_stat(&self, name: &str, accept: impl Fn(i64) -> bool, timeout: Duration) -> i64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.stat_opt(name).await.unwrap_or(0);
            if accept(value) {
                return value;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("stat {name} is still {value} after {timeout:?}"));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Polls stdout and stderr until one contains `needle`, for at most `timeout`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(needle) && !self.stdout().contains(needle) {
            if Instant::now() >= deadline {
                self.fail(&format!("no log line with {needle:?} after {timeout:?}"));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Sends SIGTERM (Envoy's graceful stop).
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends `signal` to the process, unless it has already been reaped.
    pub fn signal(&self, signal: libc::c_int) {
        if self.exit_status().is_some() {
            return;
        }
        let pid = libc::pid_t::try_from(self.pid).unwrap_or_else(|e| panic!("pid {}: {e}", self.pid));
        // SAFETY: kill(2) takes no pointers; the pid is our own child, not yet reaped, so not reused.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc != 0 {
            panic!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
    }

    /// Waits at most `timeout` for the process to exit; panics with the logs if it does not.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => self.fail(&format!("waiting for exit: {e}")),
            Err(_) => self.fail(&format!("still running {timeout:?} after being asked to exit")),
        }
    }

    fn fail_if_exited(&self, when: &str) {
        if let Some(status) = self.exit_status() {
            self.fail(&format!("remora exited ({status}) {when}"));
        }
    }

    fn fail(&self, what: &str) -> ! {
        let state = match self.exit_status() {
            Some(status) => format!("exited: {status}"),
            None => "running".to_owned(),
        };
        panic!(
            "{what}\nremora (pid {}, {state}, config {})\n{}",
            self.pid,
            self.config.display(),
            self.logs()
        );
    }
}

impl Drop for Remora {
    fn drop(&mut self) {
        // The child is killed by kill_on_drop. A failing test prints its logs, and keeps its files when
        // REMORA_E2E_KEEP is set.
        if std::thread::panicking() {
            let mut note = String::new();
            if std::env::var_os("REMORA_E2E_KEEP").is_some() {
                self.dir.keep();
                note = format!(", files kept in {}", self.dir.path().display());
            }
            eprintln!("remora (pid {}{note})\n{}", self.pid, self.logs());
        }
    }
}

async fn read_admin_address(child: &mut Child, path: &Path, stdout: &Path, stderr: &Path) -> SocketAddr {
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    loop {
        // A partly written file does not parse; the next look sees the rest.
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(addr) = text.trim().parse::<SocketAddr>() {
                return addr;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "remora exited ({status}) before writing its admin address to {}\n{}",
                path.display(),
                format_logs(stdout, stderr)
            );
        }
        if Instant::now() >= deadline {
            let _ = child.start_kill();
            panic!(
                "remora wrote no admin address to {} within {DEFAULT_TIMEOUT:?}\n{}",
                path.display(),
                format_logs(stdout, stderr)
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn format_logs(stdout: &Path, stderr: &Path) -> String {
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    format!(
        "--- remora stdout ---\n{}--- remora stderr ---\n{}--- end ---",
        read(stdout),
        read(stderr)
    )
}

/// Runs `remora --mode validate -c <file>` on `yaml` (bounded by three times [`DEFAULT_TIMEOUT`]): exit code,
/// stdout, stderr. Panics if the process dies of a signal.
pub async fn validate(yaml: &str) -> (i32, String, String) {
    validate_command(Command::new(REMORA), yaml).await
}

/// As [`validate`], running `command` (see [`Remora::start_command`]) instead of the bare binary.
pub async fn validate_command(mut command: Command, yaml: &str) -> (i32, String, String) {
    let dir = TempDir::new();
    let config = dir.write("remora.yaml", yaml);
    let run = command
        .args(["--mode", "validate", "-c"])
        .arg(&config)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = within(DEFAULT_TIMEOUT * 3, "a validate run", run)
        .await
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", command.as_std().get_program()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let Some(code) = output.status.code() else {
        panic!(
            "validate run died: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        );
    };
    (code, stdout, stderr)
}

/// The integer stats in Envoy's `GET /stats` text (`name: value` lines). Histogram lines (`P0(..) ..`, `No
/// recorded values`) and text readouts (`"..."`) are skipped.
pub fn parse_stats(text: &str) -> HashMap<String, i64> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            Some((name.trim().to_owned(), value.trim().parse::<i64>().ok()?))
        })
        .collect()
}

/// The address of listener `name` in admin.v3.Listeners JSON (`GET /listeners?format=json`); `None` if the
/// listener is absent, has no socket address, or shows port 0. A wildcard address is given as loopback.
pub fn parse_listener_addr(json: &str, name: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let listener = value
        .get("listener_statuses")?
        .as_array()?
        .iter()
        .find(|l| l.get("name").and_then(|n| n.as_str()) == Some(name))?;
    let socket = listener.get("local_address")?.get("socket_address")?;
    let ip: IpAddr = socket.get("address")?.as_str()?.parse().ok()?;
    let port = u16::try_from(socket.get("port_value")?.as_u64()?).ok()?;
    if port == 0 {
        return None;
    }
    let ip = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Some(SocketAddr::new(ip, port))
}
