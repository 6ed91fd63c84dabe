//! `remora template`: the service manifests in tests/templates/ render their golden bootstraps, which pass
//! `--mode validate`; bad manifests are refused with their line; and a rendered bootstrap runs and sends a
//! request through a declared dependency.
//!
//! Regenerate the goldens after a deliberate change to the template or the defaults, and review the diff:
//!
//! ```text
//! REMORA_BLESS=1 cargo nextest run -p remora --test e2e templates
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{json, Value};
use tokio::process::Command;

use crate::harness::{validate, within, DnsServer, Echo, Remora, TempDir, Upstream, DEFAULT_TIMEOUT};
use crate::passthrough::{cares, get_absolute};

const REMORA: &str = env!("CARGO_BIN_EXE_remora");

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/templates")
}

fn blessing() -> bool {
    std::env::var_os("REMORA_BLESS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// `remora template FILE` run in `cwd`: exit code, stdout, stderr.
async fn template(cwd: &Path, file: &str) -> (i32, String, String) {
    let run = Command::new(REMORA)
        .arg("template")
        .arg(file)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(DEFAULT_TIMEOUT, "remora template", run)
        .await
        .unwrap_or_else(|e| panic!("cannot run {REMORA}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The manifests in tests/templates/ ending in `suffix`, sorted.
fn manifests(suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .unwrap_or_else(|e| panic!("{}: {e}", dir().display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(suffix))
        .collect();
    names.sort();
    names
}

/// Compares `actual` with the golden `name` (or writes it when blessing); returns the mismatches.
fn check_golden(name: &str, actual: &str) -> Option<String> {
    let path = dir().join(name);
    if blessing() {
        std::fs::write(&path, actual).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return None;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    (expected != actual).then(|| format!("{name} differs from the rendering:\n--- rendered ---\n{actual}"))
}

#[tokio::test]
async fn service_manifests_render_their_golden_bootstraps_which_validate() {
    let names = manifests(".service.yaml");
    assert!(names.len() >= 3, "{names:?}");
    let mut failures = Vec::new();
    for name in &names {
        let (code, stdout, stderr) = template(&dir(), name).await;
        assert_eq!(code, 0, "{name}: {stderr}");
        let golden = name.replace(".service.yaml", ".bootstrap.yaml");
        failures.extend(check_golden(&golden, &stdout));
        let (code, out, err) = validate(&stdout).await;
        assert_eq!(
            code, 0,
            "{name}: the rendered bootstrap does not validate:\n{out}{err}"
        );
    }
    assert!(
        failures.is_empty(),
        "{}\n(re-bless with REMORA_BLESS=1 cargo nextest run -p remora --test e2e templates, and review the diff)",
        failures.join("\n")
    );
}

#[tokio::test]
async fn bad_manifests_are_refused_with_their_line() {
    let names = manifests(".bad.yaml");
    assert!(names.len() >= 4, "{names:?}");
    let mut failures = Vec::new();
    for name in &names {
        let (code, stdout, stderr) = template(&dir(), name).await;
        assert_eq!(code, 1, "{name}: {stdout}{stderr}");
        assert!(stdout.is_empty(), "{name}: {stdout}");
        // `error: FILE:LINE: message`.
        let line = stderr
            .strip_prefix(&format!("error: {name}:"))
            .and_then(|r| r.split(':').next())
            .and_then(|l| l.parse::<usize>().ok());
        assert!(line.is_some_and(|l| l > 1), "{name}: no line in {stderr:?}");
        failures.extend(check_golden(&name.replace(".bad.yaml", ".error"), &stderr));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let (code, _, stderr) = template(&dir(), "no-such.yaml").await;
    assert_eq!(code, 1);
    assert!(stderr.contains("no-such.yaml"), "{stderr}");
}

#[tokio::test]
async fn a_rendered_bootstrap_sends_declared_dependencies_to_their_cluster() {
    let dns = DnsServer::start().await;
    let app = Upstream::start("app").await;
    let payments = Upstream::start("payments").await;
    let other = Upstream::start("other").await;
    dns.set("payments.internal", &[IpAddr::from([127, 0, 0, 1])]);
    dns.set("undeclared.test", &[IpAddr::from([127, 0, 0, 1])]);

    let work = TempDir::new();
    let manifest = format!(
        "service: orders\nport: {}\nzone: z1\ndependencies:\n- name: payments\n  host: payments.internal\n  \
         port: {}\n  protocol: http1\n  timeout: 5s\n  health_check: /healthz\n",
        app.port(),
        payments.port()
    );
    work.write("orders.yaml", &manifest);
    let (code, rendered, stderr) = template(work.path(), "orders.yaml").await;
    assert_eq!(code, 0, "{stderr}");
    let mut config: Value = serde_yaml::from_str(&rendered).unwrap_or_else(|e| panic!("{e}\n{rendered}"));
    // Free ports and the test's DNS server; nothing else changes.
    config["admin"]["address"]["socket_address"]["port_value"] = json!(0);
    let sr = &mut config["static_resources"];
    for l in sr["listeners"].as_array_mut().into_iter().flatten() {
        l["address"]["socket_address"] = json!({"address": "127.0.0.1", "port_value": 0});
    }
    sr["listeners"][1]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]
        ["dns_cache_config"]["typed_dns_resolver_config"] = cares(dns.addr());
    for c in sr["clusters"].as_array_mut().into_iter().flatten() {
        match c["name"].as_str() {
            Some("payments") => c["typed_dns_resolver_config"] = cares(dns.addr()),
            Some("passthrough") => {
                c["cluster_type"]["typed_config"]["dns_cache_config"]["typed_dns_resolver_config"] =
                    cares(dns.addr())
            }
            _ => {}
        }
    }
    let remora = Remora::start(&config.to_string(), &["--concurrency", "1"]).await;
    remora.wait_ready().await;
    let ingress = remora.listener_addr("ingress").await;
    let egress = remora.listener_addr("egress").await;

    let r = crate::harness::http1_client(ingress).get("/", &[]).await;
    assert_eq!(r.echo().upstream_name, "app");
    let authority = format!("payments.internal:{}", payments.port());
    let r = get_absolute(egress, &authority, "/charge").await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(Echo::parse(&r.body).upstream_name, "payments");
    let r = get_absolute(egress, &format!("undeclared.test:{}", other.port()), "/x").await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(Echo::parse(&r.body).upstream_name, "other");

    let stats = remora.stats().await;
    for (name, want) in [
        ("cluster.payments.upstream_rq_200", 1),
        ("cluster.passthrough.upstream_rq_200", 1),
        ("cluster.local_app.upstream_rq_200", 1),
    ] {
        assert_eq!(stats.get(name), Some(&want), "{name}: {stats:?}");
    }
    // The platform defaults reached the dependency's cluster.
    let (_, clusters) = remora.admin_get("/clusters").await;
    assert!(
        clusters.contains("payments::default_priority::max_connections::1024"),
        "{clusters}"
    );
    // The dependency asked for active health checks: they ran, and passed.
    let (_, stats) = remora.admin_get("/stats").await;
    assert!(
        stats.contains("cluster.payments.health_check.success: "),
        "{stats}"
    );
    assert!(
        !stats.contains("cluster.payments.health_check.success: 0\n"),
        "{stats}"
    );
}

/// The image's `envoy` entrypoint gets `envoy envoy -c ...` from a pod spec written for Envoy's image, whose
/// entrypoint script runs `"$@"` when the first argument is not a flag: a leading `envoy` is skipped.
#[tokio::test]
async fn a_leading_envoy_argument_is_skipped_as_envoys_entrypoint_does() {
    let out = Command::new(REMORA)
        .args(["envoy", "--version"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(DEFAULT_TIMEOUT, "remora envoy --version", out)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("remora  version:"),
        "{out:?}"
    );
}
