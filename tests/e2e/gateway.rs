//! The resources Envoy Gateway's translator emits (`../shared/envoy-corpus/xds-resources/`: the clusters,
//! endpoints, listeners and routes of its circuit-breaker, retry, outlier-detection and health-check tests),
//! served as they are by the test control plane over ADS to the real binary.
//!
//! Each scenario must be ACKed whole (no NACK of any type), and a request through its listener must reach the
//! backend. Only addresses change: the listener binds 127.0.0.1:0 instead of `[::]:10080`, and every endpoint
//! points at a real upstream instead of 1.2.3.4. For the health-check scenarios the upstream answers the
//! checks as Envoy Gateway's translator asks (`POST /healthz` whose body contains the expected payload, and
//! `grpc.health.v1.Health/Check`).

use std::net::SocketAddr;
use std::path::Path;

use http::StatusCode;
use serde_json::{json, Value};

use crate::corpus::corpus_dir;
use crate::harness::xds as hx;
use crate::harness::{echo_response, http1_client, reply, Remora, Upstream, XdsServer, DEFAULT_TIMEOUT};
use crate::support::h2_cluster;

/// Every `<scenario>.{clusters,endpoints,listeners,routes}.yaml` in the corpus's `xds-resources/`.
fn scenarios(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".clusters.yaml"))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

fn read_list(dir: &Path, scenario: &str, kind: &str) -> Vec<Value> {
    let path = dir.join(format!("{scenario}.{kind}.yaml"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match v {
        Value::Array(items) => items,
        other => panic!("{}: not a list: {other}", path.display()),
    }
}

/// Point every `socketAddress` under `v` at `addr`.
fn readdress(v: &mut Value, addr: SocketAddr) {
    match v {
        Value::Object(m) => {
            if let Some(sa) = m.get_mut("socketAddress") {
                *sa = json!({"address": addr.ip().to_string(), "portValue": addr.port()});
            }
            for (_, child) in m.iter_mut() {
                readdress(child, addr);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| readdress(i, addr)),
        _ => {}
    }
}

/// The NACKs Remora sent, as `<type>: <message>`.
fn nacks(xds: &XdsServer) -> Vec<String> {
    xds.requests()
        .iter()
        .filter_map(|r| hx::nack_message(r).map(|m| format!("{}: {m}", hx::type_url(r))))
        .collect()
}

/// An upstream that passes Envoy Gateway's HTTP health checks: `POST /healthz` answers 200 with `ok pong`
/// (the scenarios expect `ok` as text and `pong` as binary), and gRPC checks SERVING; anything else is the
/// harness's echo.
async fn backend() -> Upstream {
    let up = Upstream::start("backend").await;
    up.set_handler(|req| async move {
        if req.uri().path() == "/healthz" {
            return reply(200, "ok pong");
        }
        if req.uri().path() == crate::harness::HEALTH_CHECK_PATH {
            return crate::harness::serving_health_check(req).await;
        }
        echo_response(req, "backend").await
    });
    up
}

async fn run(scenario: &str) -> Vec<String> {
    let dir = corpus_dir().join("xds-resources");
    let up = backend().await;
    let mut clusters = read_list(&dir, scenario, "clusters");
    let mut endpoints = read_list(&dir, scenario, "endpoints");
    let mut listeners = read_list(&dir, scenario, "listeners");
    let routes = read_list(&dir, scenario, "routes");
    clusters.iter_mut().for_each(|c| readdress(c, up.addr()));
    endpoints.iter_mut().for_each(|e| readdress(e, up.addr()));
    let bind: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
    listeners.iter_mut().for_each(|l| readdress(l, bind));
    let listener_names: Vec<String> = listeners
        .iter()
        .filter_map(|l| l["name"].as_str().map(str::to_owned))
        .collect();

    let xds = XdsServer::start().await;
    xds.set(hx::CLUSTER, clusters);
    xds.set(hx::ENDPOINT, endpoints);
    xds.set(hx::ROUTE, routes);
    xds.set(hx::LISTENER, listeners);
    let bootstrap = json!({
        "node": {"id": "gateway", "cluster": "envoy-gateway"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "DELTA_GRPC", "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [h2_cluster("xds", &[xds.addr()])]},
    });
    let proxy = Remora::start(&bootstrap.to_string(), &[]).await;
    proxy.wait_ready().await;
    let nacked = nacks(&xds);
    if !nacked.is_empty() {
        return nacked.into_iter().map(|n| format!("{scenario}: {n}")).collect();
    }

    for name in &listener_names {
        let addr = proxy.listener_addr(name).await;
        let client = http1_client(addr);
        // Health-checked hosts take traffic once their first check passes: retry until then.
        let deadline = tokio::time::Instant::now() + DEFAULT_TIMEOUT;
        loop {
            // What the scenarios' routes match on (http-health-check's route wants `user: jason`, a `test`
            // header ending in `end` and `?debug=yes`; the others match any request).
            let resp = client
                .get("/?debug=yes", &[("user", "jason"), ("test", "the-end")])
                .await;
            let status = resp.status;
            let upstream = resp.header("x-upstream").map(str::to_owned);
            if status == StatusCode::OK && upstream.as_deref() == Some("backend") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{scenario}: listener {name} answers {status} (x-upstream {upstream:?}); stats:\n{}",
                proxy.admin_get("/clusters").await.1
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    Vec::new()
}

#[tokio::test]
async fn envoy_gateway_resources_are_acked_and_serve() {
    let dir = corpus_dir().join("xds-resources");
    let all = scenarios(&dir);
    assert!(
        all.len() >= 5,
        "expected Envoy Gateway's scenarios in {}",
        dir.display()
    );
    let mut nacked = Vec::new();
    for scenario in &all {
        nacked.extend(run(scenario).await);
    }
    assert!(nacked.is_empty(), "Remora NACKed:\n{}", nacked.join("\n"));
}
