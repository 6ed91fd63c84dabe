//! The sidecar image, built and run for real: `container/build.sh` (buildah, `FROM scratch`) and
//! `podman --storage-driver vfs --runtime runc run --network host --ulimit host`, with a `containers.conf` that
//! holds `default_ulimits = []` (through `CONTAINERS_CONF`). Traffic goes through the container, `/ready`
//! answers, and `podman stop` (SIGTERM) lets an in-flight request finish before the container exits 0.
//!
//! `container/build.sh` builds images from the release binary. This test packs the release binary when one at
//! least as new as the test's own build exists, else the debug binary the test suite just built (the same
//! program and the same shared libraries; the script strips its debug info): a release build from a clean clone
//! takes many minutes on a 2-core machine, which CI does not spend on this test. The test skips, saying why, where buildah, podman or runc cannot run (they need
//! root, or user namespaces), or when `REMORA_SKIP_CONTAINER` is set.
//!
//! Everything lives in a private store under a temp dir (`--root`, `--runroot`), so the test neither sees nor
//! touches other images, and leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::Command;

use crate::harness::{http1_client, parse_listener_addr, within, TempDir, Upstream, DEFAULT_TIMEOUT};
use crate::support::{bootstrap, cluster, routes, to_cluster};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The release binary beside the debug one the test runs (same target dir).
fn release_binary() -> PathBuf {
    let debug = PathBuf::from(env!("CARGO_BIN_EXE_remora"));
    let target = debug
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo().join("target"));
    target.join("release").join("remora")
}

async fn run(what: &str, limit: Duration, cmd: &mut Command) -> Output {
    let out = within(limit, what, cmd.stdin(Stdio::null()).kill_on_drop(true).output())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Why the container tools cannot run here, if they cannot.
async fn unavailable() -> Option<String> {
    if std::env::var_os("REMORA_SKIP_CONTAINER").is_some() {
        return Some("REMORA_SKIP_CONTAINER is set".into());
    }
    for tool in ["buildah", "podman", "runc"] {
        let probe = Command::new(tool)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await;
        match probe {
            Ok(o) if o.status.success() => {}
            Ok(o) => return Some(format!("{tool} --version failed: {}", text(&o))),
            Err(e) => return Some(format!("{tool} is not installed ({e})")),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: the vfs store and runc need root here".into());
    }
    None
}

/// podman with the private store and the test's containers.conf.
struct Podman {
    dir: TempDir,
}

impl Podman {
    fn new() -> Podman {
        let dir = TempDir::new();
        dir.write("containers.conf", "[containers]\ndefault_ulimits = []\n");
        Podman { dir }
    }

    fn store_args(&self) -> Vec<String> {
        let p = self.dir.path();
        vec![
            "--root".into(),
            p.join("root").display().to_string(),
            "--runroot".into(),
            p.join("runroot").display().to_string(),
            "--storage-driver".into(),
            "vfs".into(),
        ]
    }

    fn podman(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .args(self.store_args())
            .args(["--runtime", "runc"]);
        c
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers first (their mounts), then the store goes with the temp dir.
        let _ = std::process::Command::new("podman")
            .env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .args(self.store_args())
            .args(["rm", "-a", "-f", "-t", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[tokio::test]
async fn the_image_runs_as_envoys_does_serves_traffic_and_drains_on_podman_stop() {
    if let Some(why) = unavailable().await {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let debug = PathBuf::from(env!("CARGO_BIN_EXE_remora"));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let release = release_binary();
    let bin = match (modified(&release), modified(&debug)) {
        (Some(r), Some(d)) if r >= d => release,
        _ => {
            eprintln!(
                "packing the debug build ({}): no release build as new",
                debug.display()
            );
            debug
        }
    };
    let podman = Podman::new();
    let tag = format!("localhost/remora-test:{}", std::process::id());
    let out = run(
        "container/build.sh",
        Duration::from_secs(300),
        Command::new(repo().join("container/build.sh"))
            .arg(&bin)
            .arg(&tag)
            .env("BUILDAH_OPTS", podman.store_args().join(" "))
            .env("CONTAINERS_CONF", podman.dir.path().join("containers.conf")),
    )
    .await;
    assert!(out.status.success(), "container/build.sh: {}", text(&out));

    // The Envoy image's conventions: uid 101, `envoy` is Remora, the default config validates.
    let out = run(
        "podman image inspect",
        DEFAULT_TIMEOUT * 3,
        podman
            .podman()
            .args(["image", "inspect", "--format", "{{.Config.User}}", &tag]),
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "101:101",
        "{}",
        text(&out)
    );
    let out = run(
        "podman run --mode validate",
        DEFAULT_TIMEOUT * 3,
        podman
            .podman()
            .args(["run", "--rm", "--network", "host", "--ulimit", "host", &tag])
            .args(["envoy", "--mode", "validate", "-c", "/etc/envoy/envoy.yaml"]),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("configuration '/etc/envoy/envoy.yaml' OK"),
        "{}",
        text(&out)
    );

    // A proxy in the container, on free ports (host network), to an origin in the test.
    let origin = Upstream::start("origin").await;
    let config = bootstrap(
        routes(vec![to_cluster(serde_json::json!({"prefix": "/"}), "origin")]),
        vec![cluster("origin", &[origin.addr()])],
        serde_json::Value::Null,
    );
    let shared = TempDir::new();
    shared.write("envoy.yaml", &config.to_string());
    // The container runs as 101: it must be able to write the admin address file.
    std::fs::set_permissions(shared.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .unwrap_or_else(|e| panic!("chmod: {e}"));
    let name = format!("remora-test-{}", std::process::id());
    let volume = format!("{}:/shared", shared.path().display());
    let out = run(
        "podman run -d",
        DEFAULT_TIMEOUT * 3,
        podman.podman().args([
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--ulimit",
            "host",
            "-v",
            &volume,
            &tag,
            "-c",
            "/shared/envoy.yaml",
            "--admin-address-path",
            "/shared/admin",
            "--drain-time-s",
            "20",
            "--concurrency",
            "1",
        ]),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let logs = || async {
        let out = run(
            "podman logs",
            DEFAULT_TIMEOUT,
            podman.podman().args(["logs", &name]),
        )
        .await;
        text(&out)
    };

    let admin_file = shared.path().join("admin");
    let admin = within(DEFAULT_TIMEOUT * 3, "the container's admin address", async {
        loop {
            if let Some(a) = std::fs::read_to_string(&admin_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let admin_client = http1_client(admin);
    let ready = within(DEFAULT_TIMEOUT * 3, "/ready", async {
        loop {
            if let Ok(r) = admin_client.try_get("/ready", &[]).await {
                if r.status == 200 {
                    break r;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(ready.text().trim(), "LIVE");
    let listeners = admin_client.get("/listeners?format=json", &[]).await;
    let Some(listener) = parse_listener_addr(&listeners.text(), crate::support::LISTENER) else {
        panic!("no listener in {}\n{}", listeners.text(), logs().await)
    };
    let proxy = http1_client(listener);
    let r = proxy.get("/through-the-container", &[]).await;
    assert_eq!(r.status, 200, "{}", logs().await);
    assert_eq!(r.echo().upstream_name, "origin");

    // podman stop while a request is in flight: SIGTERM drains, the request completes, the exit code is 0.
    let in_flight = tokio::spawn({
        let proxy = proxy.clone();
        async move { proxy.get("/delay/1500", &[]).await }
    });
    within(DEFAULT_TIMEOUT, "the request to reach the origin", async {
        while origin.requests() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let out = run(
        "podman stop",
        DEFAULT_TIMEOUT * 3,
        podman.podman().args(["stop", "-t", "20", &name]),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let r = within(DEFAULT_TIMEOUT, "the in-flight request", in_flight)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200, "{}", logs().await);
    let out = run(
        "podman inspect",
        DEFAULT_TIMEOUT,
        podman
            .podman()
            .args(["inspect", "--format", "{{.State.ExitCode}}", &name]),
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "{}\n{}",
        text(&out),
        logs().await
    );
    let logs = logs().await;
    assert!(logs.contains("draining"), "{logs}");
}
