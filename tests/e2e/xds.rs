//! Dynamic configuration: file-based CDS/LDS, and ADS (state of the world and delta) against the harness's
//! management server.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};

use bytes::Bytes;
use http::Method;

use crate::harness::xds as hx;
use crate::harness::{
    build_request, http1_client, load, Budget, Remora, TempDir, Upstream, XdsServer, DEFAULT_TIMEOUT,
};
use crate::support::{cluster, h2_cluster, routes, to_cluster};

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
            listener(
                "main",
                json!({"route_config": routes(vec![to_cluster(json!({"prefix": "/"}), "svc")])}),
            ),
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
        vec![typed(
            json!({"name": "svc", "type": "STATIC", "lb_policy": "CLUSTER_PROVIDED"}),
            CLUSTER_TYPE,
        )],
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

fn eds_cluster(name: &str) -> Value {
    json!({
        "name": name,
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"ads": {}}},
    })
}

fn assignment(name: &str, addrs: &[SocketAddr]) -> Value {
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| json!({"endpoint": {"address": {"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}}}))
        .collect();
    json!({"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]})
}

fn ads_bootstrap(xds: &XdsServer, api_type: &str) -> String {
    ads_bootstrap_at(xds.addr(), api_type)
}

fn ads_bootstrap_at(control_plane: SocketAddr, api_type: &str) -> String {
    json!({
        "node": {"id": "n1", "cluster": "c1"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {"api_type": api_type, "transport_api_version": "V3", "set_node_on_first_message_only": true,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [h2_cluster("xds", &[control_plane])]},
    })
    .to_string()
}

/// A control plane with an EDS cluster `svc` on `up`, and listener `main` whose routes (`r1`) come from RDS.
async fn ads_world(api_type: &str, up: &Upstream) -> (XdsServer, Remora) {
    let xds = XdsServer::start().await;
    xds.set(hx::CLUSTER, vec![eds_cluster("svc")]);
    xds.set(hx::ENDPOINT, vec![assignment("svc", &[up.addr()])]);
    xds.set(
        hx::LISTENER,
        vec![listener(
            "main",
            json!({"rds": {"route_config_name": "r1", "config_source": {"ads": {}}}}),
        )],
    );
    let mut table = routes(vec![to_cluster(json!({"prefix": "/"}), "svc")]);
    table["name"] = json!("r1");
    xds.set(hx::ROUTE, vec![table]);
    let proxy = Remora::start(&ads_bootstrap(&xds, api_type), &[]).await;
    proxy.wait_ready().await;
    (xds, proxy)
}

async fn ads_pushes_config_and_nacks_bad_clusters(api_type: &str) {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let (xds, proxy) = ads_world(api_type, &a).await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");
    assert_eq!(proxy.stat("control_plane.connected_state").await, 1);
    assert_eq!(proxy.stat("cluster_manager.cds.update_success").await, 1);
    assert_eq!(proxy.stat("listener_manager.lds.update_success").await, 1);
    assert!(proxy.stat("http.ingress.rds.r1.update_success").await >= 1);
    assert!(proxy.stat("cluster.svc.update_success").await >= 1);
    assert_eq!(proxy.stat("cluster_manager.warming_clusters").await, 0);
    assert_eq!(proxy.stat("listener_manager.total_listeners_active").await, 1);
    // The node went on the first request only.
    let reqs = xds.requests();
    assert!(reqs[0].has_field_by_name("node"), "{:?}", reqs[0]);
    assert!(reqs[1..].iter().all(|r| !r.has_field_by_name("node")));
    // /config_dump shows the dynamic resources with their versions, like Envoy's.
    let (_, dump) = proxy.admin_get("/config_dump").await;
    let dump: Value = serde_json::from_str(&dump).unwrap_or_else(|e| panic!("{e}: {dump}"));
    let clusters = &dump["configs"][1]["dynamic_active_clusters"][0];
    assert_eq!(clusters["cluster"]["name"], "svc", "{dump:#}");
    assert!(
        clusters["version_info"].is_string() && clusters["last_updated"].is_string(),
        "{clusters:#}"
    );
    assert_eq!(
        dump["configs"][2]["dynamic_listeners"][0]["name"], "main",
        "{dump:#}"
    );
    assert!(dump["configs"][2]["dynamic_listeners"][0]["active_state"]["listener"].is_object());
    assert_eq!(
        dump["configs"][4]["dynamic_route_configs"][0]["route_config"]["name"], "r1",
        "{dump:#}"
    );

    // A bad cluster is NACKed with its field path; the last good config keeps serving.
    xds.set(
        hx::CLUSTER,
        vec![
            eds_cluster("svc"),
            json!({"name": "bad", "type": "STATIC", "lb_policy": "CLUSTER_PROVIDED"}),
        ],
    );
    let nack = xds
        .wait_request("a NACK", DEFAULT_TIMEOUT, |r| {
            hx::type_url(r) == hx::CLUSTER && hx::nack_message(r).is_some()
        })
        .await;
    let detail = hx::nack_message(&nack).unwrap_or_default();
    assert!(detail.contains("cluster \"bad\": lb_policy"), "{detail}");
    assert!(detail.contains("CLUSTER_PROVIDED"), "{detail}");
    proxy
        .wait_stat("cluster_manager.cds.update_rejected", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "a");

    // Endpoint changes under load lose no request.
    xds.set(hx::CLUSTER, vec![eds_cluster("svc")]);
    let client = http1_client(addr);
    let load = tokio::spawn({
        let client = client.clone();
        async move {
            load(&client, 4, Budget::For(Duration::from_millis(1500)), |_| {
                build_request(Method::GET, "/", &[], Bytes::new())
            })
            .await
        }
    });
    for i in 0..10 {
        let set: Vec<SocketAddr> = match i % 3 {
            0 => vec![b.addr()],
            1 => vec![a.addr(), b.addr()],
            _ => vec![a.addr()],
        };
        let before = proxy.stat("cluster.svc.update_success").await;
        xds.set(hx::ENDPOINT, vec![assignment("svc", &set)]);
        proxy
            .wait_stat("cluster.svc.update_success", |v| v > before, DEFAULT_TIMEOUT)
            .await;
    }
    let report = load.await.unwrap_or_else(|e| panic!("load task: {e}"));
    report.assert_all_ok();
    assert!(a.requests() > 0 && b.requests() > 0);

    // Removing the cluster (omission in SotW, removed_resources in delta) leaves no route target: 503.
    xds.set(hx::CLUSTER, vec![]);
    proxy
        .wait_stat("cluster_manager.cluster_removed", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    let reply = client.get("/", &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
}

#[tokio::test]
async fn ads_sotw_pushes_config_and_nacks_bad_clusters() {
    ads_pushes_config_and_nacks_bad_clusters("GRPC").await;
}

#[tokio::test]
async fn ads_delta_pushes_config_and_nacks_bad_clusters() {
    ads_pushes_config_and_nacks_bad_clusters("DELTA_GRPC").await;
}

#[tokio::test]
async fn listener_change_drains_old_connections_and_rds_swaps_routes() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let (xds, proxy) = ads_world("GRPC", &a).await;
    xds.set(
        hx::CLUSTER,
        vec![eds_cluster("svc"), cluster("other", &[b.addr()])],
    );
    proxy
        .wait_stat("cluster_manager.cluster_added", |v| v >= 3, DEFAULT_TIMEOUT)
        .await;
    let addr = proxy.listener_addr("main").await;
    let client = http1_client(addr);
    assert_eq!(client.get("/", &[]).await.header("x-upstream"), Some("a"));

    // RDS: a new table moves traffic on the same connection.
    let mut table = routes(vec![to_cluster(json!({"prefix": "/"}), "other")]);
    table["name"] = json!("r1");
    xds.set(hx::ROUTE, vec![table]);
    proxy
        .wait_stat("http.ingress.rds.r1.config_reload", |v| v >= 2, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(client.get("/", &[]).await.header("x-upstream"), Some("b"));

    // A changed listener keeps its port; the old one drains: its idle keep-alive connection is closed, and the
    // client's next request goes on a new connection to the new listener.
    let mut changed = listener(
        "main",
        json!({"rds": {"route_config_name": "r1", "config_source": {"ads": {}}}}),
    );
    changed["per_connection_buffer_limit_bytes"] = json!(65536);
    xds.set(hx::LISTENER, vec![changed]);
    proxy
        .wait_stat("listener_manager.listener_modified", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(proxy.listener_addr("main").await, addr);
    proxy
        .wait_stat("http.ingress.downstream_cx_destroy", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    let reply = client.get("/", &[]).await;
    assert_eq!(reply.header("x-upstream"), Some("b"));
    assert!(proxy.stat("http.ingress.downstream_cx_total").await >= 2);
    assert_eq!(proxy.stat("listener_manager.total_listeners_active").await, 1);
}

#[tokio::test]
async fn initial_fetch_timeout_lets_the_server_go_live_without_a_control_plane() {
    // A port nothing listens on: bind one, note it, drop it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut b: Value =
        serde_json::from_str(&ads_bootstrap_at(dead, "GRPC")).unwrap_or_else(|e| panic!("{e}"));
    b["dynamic_resources"]["cds_config"]["initial_fetch_timeout"] = json!("1s");
    b["dynamic_resources"]["lds_config"]["initial_fetch_timeout"] = json!("1s");
    let proxy = Remora::start(&b.to_string(), &[]).await;
    let (status, _) = proxy.admin_get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    proxy.wait_ready().await;
    assert_eq!(proxy.stat("cluster_manager.cds.init_fetch_timeout").await, 1);
    assert_eq!(proxy.stat("listener_manager.lds.init_fetch_timeout").await, 1);
    assert_eq!(proxy.stat("control_plane.connected_state").await, 0);
    assert!(proxy.stat("cluster_manager.cds.update_failure").await >= 1);
}

#[tokio::test]
async fn removed_hosts_and_clusters_close_their_pooled_connections() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let (xds, proxy) = ads_world("GRPC", &a).await;
    let addr = proxy.listener_addr("main").await;
    let active = "cluster.svc.upstream_cx_active";
    // One request leaves one idle pooled connection to `a`.
    assert_eq!(upstream_of(addr).await, "a");
    assert_eq!(proxy.stat(active).await, 1);

    // EDS moves the cluster to `b`: every worker closes its pooled connection to `a`, without a request.
    xds.set(hx::ENDPOINT, vec![assignment("svc", &[b.addr()])]);
    proxy.wait_stat(active, |v| v == 0, DEFAULT_TIMEOUT).await;
    assert_eq!(upstream_of(addr).await, "b");
    assert_eq!(proxy.stat(active).await, 1);

    // A new version of the cluster replaces the old one, whose pools close (as Envoy drains them).
    let mut modified = eds_cluster("svc");
    modified["connect_timeout"] = json!("2s");
    xds.set(hx::CLUSTER, vec![modified.clone()]);
    proxy
        .wait_stat("cluster_manager.cluster_modified", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    proxy.wait_stat(active, |v| v == 0, DEFAULT_TIMEOUT).await;
    assert_eq!(upstream_of(addr).await, "b");

    // A removed cluster's pooled connections close too.
    xds.set(hx::CLUSTER, vec![]);
    proxy
        .wait_stat("cluster_manager.cluster_removed", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    proxy.wait_stat(active, |v| v == 0, DEFAULT_TIMEOUT).await;
    assert_eq!(proxy.stat("cluster.svc.upstream_cx_destroy").await, 3);
}

#[tokio::test]
async fn a_drained_listener_stops_counting_as_draining_when_its_last_request_ends() {
    let a = Upstream::start("a").await;
    let (xds, proxy) = ads_world("GRPC", &a).await;
    let addr = proxy.listener_addr("main").await;
    let draining = "listener_manager.total_listeners_draining";
    // A slow request is in flight on the listener when a new version replaces it.
    let slow = tokio::spawn(async move { http1_client(addr).get("/delay/1500", &[]).await });
    within_default("the slow request at the upstream", async {
        while a.requests() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let mut changed = listener(
        "main",
        json!({"rds": {"route_config_name": "r1", "config_source": {"ads": {}}}}),
    );
    changed["per_connection_buffer_limit_bytes"] = json!(65536);
    xds.set(hx::LISTENER, vec![changed]);
    proxy
        .wait_stat("listener_manager.listener_modified", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(proxy.stat(draining).await, 1);
    // The request finishes on the old listener, with `connection: close`; then the old listener is gone.
    let reply = slow.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("connection"), Some("close"));
    proxy.wait_stat(draining, |v| v == 0, DEFAULT_TIMEOUT).await;
    assert_eq!(proxy.stat("listener_manager.total_listeners_active").await, 1);

    // A removed listener with no connection drains at once.
    xds.set(hx::LISTENER, vec![]);
    proxy
        .wait_stat("listener_manager.listener_removed", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    proxy.wait_stat(draining, |v| v == 0, DEFAULT_TIMEOUT).await;
    assert_eq!(proxy.stat("listener_manager.total_listeners_active").await, 0);
}

async fn within_default<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    crate::harness::within(DEFAULT_TIMEOUT, what, fut).await
}
