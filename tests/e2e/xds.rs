//! Dynamic configuration: file-based CDS/LDS, and ADS (state of the world and delta) against the harness's
//! management server.

use std::net::SocketAddr;

use http::StatusCode;
use serde_json::{json, Value};

use crate::harness::{http1_client, Remora, TempDir, Upstream, DEFAULT_TIMEOUT};
use crate::support::{cluster, routes, to_cluster};

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

fn typed(mut v: Value, ty: &str) -> Value {
    v["@type"] = json!(ty);
    v
}

/// A listener on 127.0.0.1:0 whose connection manager has `route_specifier` (`route_config` or `rds`).
fn listener(name: &str, route_specifier: Value) -> Value {
    let mut hcm = json!({
        "@type": HCM_TYPE,
        "stat_prefix": "ingress",
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}],
    });
    if let Value::Object(m) = route_specifier {
        for (k, v) in m {
            hcm[k] = v;
        }
    }
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    })
}

fn discovery_file(version: &str, resources: Vec<Value>) -> String {
    json!({"version_info": version, "resources": resources}).to_string()
}

/// Write `contents` to `name` in `dir` by an atomic rename, as config pushers do.
fn write_atomically(dir: &TempDir, name: &str, contents: &str) {
    let tmp = dir.write(&format!(".{name}.tmp"), contents);
    std::fs::rename(&tmp, dir.path().join(name)).unwrap_or_else(|e| panic!("rename: {e}"));
}

async fn upstream_of(addr: SocketAddr) -> String {
    let reply = http1_client(addr).get("/", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.header("x-upstream").unwrap_or_default().to_owned()
}

#[tokio::test]
async fn file_based_cds_and_lds_load_and_reload() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let dir = TempDir::new();
    let cds = |version: &str, up: &Upstream| {
        discovery_file(version, vec![typed(cluster("svc", &[up.addr()]), CLUSTER_TYPE)])
    };
    dir.write("cds.yaml", &cds("1", &a));
    let lds = discovery_file(
        "1",
        vec![typed(
            listener("main", json!({"route_config": routes(vec![to_cluster(json!({"prefix": "/"}), "svc")])})),
            LISTENER_TYPE,
        )],
    );
    dir.write("lds.yaml", &lds);
    let d = dir.path().display().to_string();
    let bootstrap = json!({
        "node": {"id": "n1", "cluster": "c1"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "cds_config": {"path_config_source": {"path": format!("{d}/cds.yaml")}},
            "lds_config": {"path_config_source": {"path": format!("{d}/lds.yaml"), "watched_directory": {"path": d}}},
        },
    });
    let proxy = Remora::start(&bootstrap.to_string(), &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");
    assert_eq!(proxy.stat("cluster_manager.cds.update_success").await, 1);
    assert_eq!(proxy.stat("listener_manager.lds.update_success").await, 1);

    // An atomic rename of a new version moves traffic.
    write_atomically(&dir, "cds.yaml", &cds("2", &b));
    proxy
        .wait_stat("cluster_manager.cds.update_success", |v| v >= 2, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "b");
    assert_eq!(proxy.stat("cluster_manager.cluster_modified").await, 1);

    // A bad file is rejected and the last good config keeps serving.
    let bad = discovery_file(
        "3",
        vec![typed(json!({"name": "svc", "type": "STATIC", "lb_policy": "MAGLEV"}), CLUSTER_TYPE)],
    );
    write_atomically(&dir, "cds.yaml", &bad);
    proxy
        .wait_stat("cluster_manager.cds.update_rejected", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "b");

    // Removing the listener from LDS closes it.
    write_atomically(&dir, "lds.yaml", &discovery_file("2", vec![]));
    proxy
        .wait_stat("listener_manager.listener_removed", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    let (_, listeners) = proxy.admin_get("/listeners").await;
    assert!(!listeners.contains("main"), "{listeners}");
}
