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
    build_request, h2c_client, http1_client, load, Budget, Remora, TempDir, Upstream, XdsServer,
    DEFAULT_TIMEOUT,
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

/// A listener added after start-up whose route table does not come serves with an empty one once the table's
/// `initial_fetch_timeout` passes (every request a 404 NR), as in Envoy, and routes when the table arrives.
/// Before, it warmed for ever.
#[tokio::test]
async fn a_listener_waiting_for_rds_serves_an_empty_table_after_its_initial_fetch_timeout() {
    let a = Upstream::start("a").await;
    let (xds, proxy) = ads_world("GRPC", &a).await;
    xds.hold(hx::ROUTE);
    let second = |timeout: &str| {
        listener(
            "second",
            json!({"rds": {"route_config_name": "r2",
                "config_source": {"ads": {}, "initial_fetch_timeout": timeout}}}),
        )
    };
    xds.set(
        hx::LISTENER,
        vec![
            listener(
                "main",
                json!({"rds": {"route_config_name": "r1", "config_source": {"ads": {}}}}),
            ),
            second("0.3s"),
        ],
    );
    proxy
        .wait_stat(
            "http.ingress.rds.r2.init_fetch_timeout",
            |v| v >= 1,
            DEFAULT_TIMEOUT,
        )
        .await;
    let addr = proxy.listener_addr("second").await;
    let (status, headers, _) = crate::harness::get(addr, "/", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{headers:?}");
    let mut r2 = routes(vec![to_cluster(json!({"prefix": "/"}), "svc")]);
    r2["name"] = json!("r2");
    let mut r1 = routes(vec![to_cluster(json!({"prefix": "/"}), "svc")]);
    r1["name"] = json!("r1");
    xds.set(hx::ROUTE, vec![r1, r2]);
    xds.release(hx::ROUTE);
    proxy
        .wait_stat("http.ingress.rds.r2.update_success", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "a");
    assert_eq!(proxy.stat("listener_manager.total_listeners_warming").await, 0);
}

/// A new EDS cluster whose first assignment is rejected stops warming (Envoy ends an EDS cluster's
/// initialization on a rejected update): it serves without hosts (503) instead of holding the listener and
/// start-up, and takes its hosts from the next good assignment.
#[tokio::test]
async fn a_rejected_assignment_ends_the_warming_of_its_cluster() {
    let a = Upstream::start("a").await;
    let (xds, proxy) = ads_world("GRPC", &a).await;
    let mut bad = assignment("svc2", &[a.addr()]);
    bad["endpoints"][0]["lb_endpoints"][0]["load_balancing_weight"] = json!(0);
    xds.set(hx::ENDPOINT, vec![assignment("svc", &[a.addr()]), bad]);
    xds.set(hx::CLUSTER, vec![eds_cluster("svc"), eds_cluster("svc2")]);
    proxy
        .wait_stat("cluster.svc2.update_rejected", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    proxy
        .wait_stat("cluster_manager.warming_clusters", |v| v == 0, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(
        proxy.stat("cluster_manager.active_clusters").await,
        3,
        "xds, svc and svc2 serve"
    );
    xds.set(
        hx::ENDPOINT,
        vec![assignment("svc", &[a.addr()]), assignment("svc2", &[a.addr()])],
    );
    proxy
        .wait_stat("cluster.svc2.membership_healthy", |v| v == 1, DEFAULT_TIMEOUT)
        .await;
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

    // A changed listener keeps its port; the old one drains: the next response on its keep-alive connection
    // carries `connection: close` (closing it while idle would race a request already on its way), and the
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
    let reply = client.get("/", &[]).await;
    assert_eq!(reply.header("x-upstream"), Some("b"));
    assert_eq!(reply.header("connection"), Some("close"));
    proxy
        .wait_stat("http.ingress.downstream_cx_destroy", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    let reply = client.get("/", &[]).await;
    assert_eq!(reply.header("connection"), None);
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

    // The same assignment again (a SotW server resends every type on any change) changes nothing: the
    // pooled connection to `b` stays, and the membership is not rebuilt.
    let changes = proxy.stat("cluster.svc.membership_change").await;
    let updates = proxy.stat("cluster.svc.update_success").await;
    xds.set(hx::ENDPOINT, vec![assignment("svc", &[b.addr()])]);
    proxy
        .wait_stat("cluster.svc.update_success", |v| v > updates, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(proxy.stat("cluster.svc.membership_change").await, changes);
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

/// Drives load through the proxy for a few seconds while the control plane changes endpoints (every tick),
/// routes, clusters (a routed cluster modified, a spare one added and removed) and the listener, about 40
/// times a second, and asserts that every request got a 200 from one of the routed upstreams.
async fn churn_loses_no_request(api_type: &str, h2: bool) {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    // Only in the spare cluster, which no route names.
    let decoy = Upstream::start("decoy").await;
    let xds = XdsServer::start().await;
    let main = |buffer: u32| {
        let mut l = listener(
            "main",
            json!({"rds": {"route_config_name": "r1", "config_source": {"ads": {}}}}),
        );
        l["per_connection_buffer_limit_bytes"] = json!(buffer);
        l
    };
    let table = |target: &str| {
        let mut t = routes(vec![to_cluster(json!({"prefix": "/"}), target)]);
        t["name"] = json!("r1");
        t
    };
    let clusters = |timeout: u32, spare: bool| {
        let mut svc1 = eds_cluster("svc1");
        svc1["connect_timeout"] = json!(format!("{timeout}s"));
        let mut v = vec![svc1, eds_cluster("svc2")];
        if spare {
            v.push(cluster("spare", &[decoy.addr()]));
        }
        v
    };
    let endpoints = |i: usize| {
        let pick = |k: usize| -> Vec<SocketAddr> {
            match k % 4 {
                0 => vec![ups[0].addr()],
                1 => vec![ups[0].addr(), ups[1].addr()],
                2 => vec![ups[1].addr(), ups[2].addr()],
                _ => vec![ups[2].addr()],
            }
        };
        vec![assignment("svc1", &pick(i)), assignment("svc2", &pick(i + 2))]
    };
    xds.set(hx::CLUSTER, clusters(1, false));
    xds.set(hx::ENDPOINT, endpoints(0));
    xds.set(hx::LISTENER, vec![main(32768)]);
    xds.set(hx::ROUTE, vec![table("svc1")]);
    let proxy = Remora::start(&ads_bootstrap(&xds, api_type), &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(http1_client(addr).get("/", &[]).await.status, StatusCode::OK);

    let churn_for = Duration::from_secs(3);
    let client = if h2 { h2c_client(addr) } else { http1_client(addr) };
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let client = client.clone();
        workers.spawn(async move {
            let stop = tokio::time::Instant::now() + churn_for;
            let mut ok = 0u64;
            let mut bad: Vec<String> = Vec::new();
            while tokio::time::Instant::now() < stop {
                match client.try_get("/", &[]).await {
                    Ok(r)
                        if r.status == StatusCode::OK
                            && matches!(r.header("x-upstream"), Some("a" | "b" | "c")) =>
                    {
                        ok += 1
                    }
                    Ok(r) => bad.push(format!(
                        "{} from {:?}: {}",
                        r.status,
                        r.header("x-upstream"),
                        r.text()
                    )),
                    Err(e) => bad.push(e.to_string()),
                }
            }
            (ok, bad)
        });
    }
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let stop = tokio::time::Instant::now() + churn_for;
    let mut i = 0usize;
    while tokio::time::Instant::now() < stop {
        tick.tick().await;
        i += 1;
        xds.set(hx::ENDPOINT, endpoints(i));
        if i.is_multiple_of(2) {
            xds.set(
                hx::ROUTE,
                vec![table(if i.is_multiple_of(4) { "svc1" } else { "svc2" })],
            );
        }
        if i.is_multiple_of(3) {
            xds.set(hx::CLUSTER, clusters(1 + (i / 3 % 2) as u32, i.is_multiple_of(2)));
        }
        if i.is_multiple_of(5) {
            xds.set(hx::LISTENER, vec![main(32768 + (i / 5 % 2) as u32)]);
        }
    }
    let (mut ok, mut bad) = (0, Vec::new());
    while let Some(w) = workers.join_next().await {
        let (o, b) = w.unwrap_or_else(|e| panic!("load worker: {e}"));
        ok += o;
        bad.extend(b);
    }
    assert!(
        bad.is_empty(),
        "{} of {} requests failed: {bad:#?}",
        bad.len(),
        ok + bad.len() as u64
    );
    assert!(ok > 100, "only {ok} requests in {churn_for:?}");
    assert_eq!(decoy.requests(), 0);
    // The changes were applied, not coalesced away.
    assert!(proxy.stat("listener_manager.listener_modified").await >= 10);
    assert!(proxy.stat("cluster_manager.cluster_modified").await >= 10);
    assert!(proxy.stat("http.ingress.rds.r1.config_reload").await >= 10);
    assert!(proxy.stat("cluster.svc1.update_success").await >= 40);
    assert!(ups.iter().all(|u| u.requests() > 0));
    assert_eq!(proxy.stat("cluster_manager.cds.update_rejected").await, 0);
    assert_eq!(proxy.stat("listener_manager.lds.update_rejected").await, 0);
}

#[tokio::test]
async fn sotw_churn_of_every_resource_type_loses_no_request() {
    churn_loses_no_request("GRPC", false).await;
}

#[tokio::test]
async fn delta_churn_of_every_resource_type_loses_no_request() {
    churn_loses_no_request("DELTA_GRPC", false).await;
}

#[tokio::test]
async fn churn_loses_no_h2_request() {
    churn_loses_no_request("GRPC", true).await;
}

/// `cds_config` and `lds_config` with `api_config_source`s of their own: one reached through a static
/// cluster (`envoy_grpc`, delta), the other at a `google_grpc` target URI (state of the world).
#[tokio::test]
async fn cds_and_lds_on_their_own_grpc_streams() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let xds = XdsServer::start().await;
    xds.set(hx::CLUSTER, vec![cluster("svc", &[a.addr()])]);
    xds.set(
        hx::LISTENER,
        vec![listener(
            "main",
            json!({"route_config": routes(vec![to_cluster(json!({"prefix": "/"}), "svc")])}),
        )],
    );
    let bootstrap = json!({
        "node": {"id": "n1", "cluster": "c1"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "cds_config": {"resource_api_version": "V3", "api_config_source": {"api_type": "DELTA_GRPC",
                "transport_api_version": "V3", "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}},
            "lds_config": {"resource_api_version": "V3", "api_config_source": {"api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"google_grpc": {"target_uri": xds.addr().to_string(), "stat_prefix": "xds"}}]}},
        },
        "static_resources": {"clusters": [h2_cluster("xds", &[xds.addr()])]},
    });
    let proxy = Remora::start(&bootstrap.to_string(), &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");
    let mut paths = xds.stream_paths();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/envoy.service.cluster.v3.ClusterDiscoveryService/DeltaClusters",
            "/envoy.service.listener.v3.ListenerDiscoveryService/StreamListeners",
        ]
    );
    assert_eq!(proxy.stat("control_plane.connected_state").await, 1);

    // Updates arrive on each stream.
    xds.set(hx::CLUSTER, vec![cluster("svc", &[b.addr()])]);
    proxy
        .wait_stat("cluster_manager.cds.update_success", |v| v >= 2, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "b");
    xds.set(hx::LISTENER, vec![]);
    proxy
        .wait_stat("listener_manager.listener_removed", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
}

/// As in Envoy, LDS on a source of its own starts once the clusters have initialized. Before, the two streams
/// raced: a listener could arrive before the cluster its route names, be rejected for it, and never come back
/// (a state-of-the-world server does not resend what it already sent).
#[tokio::test]
async fn lds_on_its_own_stream_starts_once_cds_has_initialized() {
    let a = Upstream::start("a").await;
    let xds = XdsServer::start().await;
    xds.hold(hx::CLUSTER);
    xds.set(hx::CLUSTER, vec![cluster("svc", &[a.addr()])]);
    xds.set(
        hx::LISTENER,
        vec![listener(
            "main",
            json!({"route_config": routes(vec![to_cluster(json!({"prefix": "/"}), "svc")])}),
        )],
    );
    let source = json!({"resource_api_version": "V3", "api_config_source": {"api_type": "GRPC",
        "transport_api_version": "V3", "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}});
    let bootstrap = json!({
        "node": {"id": "n1", "cluster": "c1"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {"cds_config": source, "lds_config": source},
        "static_resources": {"clusters": [h2_cluster("xds", &[xds.addr()])]},
    });
    let proxy = Remora::start(&bootstrap.to_string(), &[]).await;
    xds.wait_request("the CDS request", DEFAULT_TIMEOUT, |r| {
        hx::type_url(r) == hx::CLUSTER
    })
    .await;
    assert!(
        !xds.stream_paths().iter().any(|p| p.contains("Listener")),
        "LDS started before CDS answered: {:?}",
        xds.stream_paths()
    );
    xds.release(hx::CLUSTER);
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");
    assert_eq!(proxy.stat("listener_manager.lds.update_rejected").await, 0);
}

#[tokio::test]
async fn api_config_sources_refuse_what_remora_cannot_do_with_the_path() {
    let source = |service: Value, api_type: &str| {
        json!({
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "dynamic_resources": {"cds_config": {"api_config_source": {"api_type": api_type,
                "transport_api_version": "V3", "grpc_services": [service]}}},
        })
        .to_string()
    };
    let tls = json!({"google_grpc": {"target_uri": "127.0.0.1:18000", "stat_prefix": "xds",
        "channel_credentials": {"ssl_credentials": {}}}});
    let (code, _, err) = crate::harness::validate(&source(tls, "GRPC")).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "dynamic_resources.cds_config.api_config_source.grpc_services[0].google_grpc.channel_credentials.ssl_credentials.root_certs: is required"
        ),
        "{err}"
    );
    let unix = json!({"google_grpc": {"target_uri": "unix:///run/xds.sock", "stat_prefix": "xds"}});
    let (code, _, err) = crate::harness::validate(&source(unix, "GRPC")).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("google_grpc.target_uri"), "{err}");
    let missing = json!({"envoy_grpc": {"cluster_name": "nowhere"}});
    let (code, _, err) = crate::harness::validate(&source(missing, "GRPC")).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cds_config.api_config_source.grpc_services[0].envoy_grpc.cluster_name"),
        "{err}"
    );
    // REST takes `cluster_names`, not `grpc_services`.
    let rest = json!({"envoy_grpc": {"cluster_name": "nowhere"}});
    let (code, _, err) = crate::harness::validate(&source(rest, "REST")).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cds_config.api_config_source.grpc_services: is not allowed with api_type REST"),
        "{err}"
    );
    assert!(
        err.contains("cds_config.api_config_source.cluster_names: exactly one"),
        "{err}"
    );
    assert!(!err.contains("not supported by Remora"), "{err}");
}

/// What a REST management server ([`rest_plane`]) serves and saw.
#[derive(Default)]
struct RestPlane {
    /// Per path: the version and the resources.
    served: std::collections::HashMap<String, (u64, Vec<Value>)>,
    /// Every request: path, `version_info`, whether it carried `error_detail`, `resource_names`.
    seen: Vec<(String, String, bool, Vec<String>)>,
    /// 304s answered, per path.
    not_modified: std::collections::HashMap<String, u64>,
}

type SharedPlane = std::sync::Arc<std::sync::Mutex<RestPlane>>;

fn plane_set(plane: &SharedPlane, path: &str, resources: Vec<Value>) {
    let mut p = plane.lock().unwrap_or_else(|e| e.into_inner());
    let version = p.served.get(path).map_or(1, |(v, _)| v + 1);
    p.served.insert(path.to_owned(), (version, resources));
}

fn plane_not_modified(plane: &SharedPlane, path: &str) -> u64 {
    let p = plane.lock().unwrap_or_else(|e| e.into_inner());
    p.not_modified.get(path).copied().unwrap_or(0)
}

/// A REST-JSON management server (`xds_protocol.rst`, "REST-JSON polling subscriptions"): it answers a
/// POSTed `DiscoveryRequest` to `/v3/discovery:<type>` with the resources set for that path (those named in
/// `resource_names`, when there are any), or 304 when the request's `version_info` is the current one.
async fn rest_plane() -> (Upstream, SharedPlane) {
    use http_body_util::BodyExt;
    let cp = Upstream::http1("cp").await;
    let plane = SharedPlane::default();
    cp.set_handler({
        let plane = plane.clone();
        move |req: http::Request<hyper::body::Incoming>| {
            let plane = plane.clone();
            async move {
                let path = req.uri().path().to_owned();
                let ok = req.method() == Method::POST
                    && req.headers().get("content-type").is_some_and(|v| v == "application/json");
                let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let version = request["version_info"].as_str().unwrap_or_default().to_owned();
                let names: Vec<String> = request["resource_names"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default();
                let mut p = plane.lock().unwrap_or_else(|e| e.into_inner());
                p.seen.push((path.clone(), version.clone(), request.get("error_detail").is_some(), names.clone()));
                let Some((current, resources)) = p.served.get(&path).cloned() else {
                    return crate::harness::reply(404, "");
                };
                if !ok {
                    return crate::harness::reply(400, "want a JSON POST");
                }
                if version == current.to_string() {
                    *p.not_modified.entry(path).or_default() += 1;
                    return crate::harness::reply(304, "");
                }
                let resources: Vec<Value> = resources
                    .into_iter()
                    .filter(|r| {
                        let name = r.get("name").or_else(|| r.get("cluster_name")).and_then(Value::as_str);
                        names.is_empty() || name.is_some_and(|n| names.iter().any(|x| x == n))
                    })
                    .collect();
                let type_url = request["type_url"].as_str().unwrap_or_default();
                let resp = json!({"version_info": current.to_string(), "resources": resources, "type_url": type_url});
                crate::harness::reply(200, resp.to_string())
            }
        }
    });
    (cp, plane)
}

/// `api_type: REST`: the proxy POSTs `DiscoveryRequest`s as JSON to `/v3/discovery:clusters` and
/// `:listeners` every `refresh_delay`; a 304 changes nothing; a rejected response is NACKed in the next
/// request's `error_detail`.
#[tokio::test]
async fn cds_and_lds_polled_over_rest() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let (cp, plane) = rest_plane().await;
    let set = |path: &str, resources: Vec<Value>| plane_set(&plane, path, resources);
    set(
        "/v3/discovery:clusters",
        vec![typed(cluster("svc", &[a.addr()]), CLUSTER_TYPE)],
    );
    set(
        "/v3/discovery:listeners",
        vec![typed(
            listener(
                "main",
                json!({"route_config": routes(vec![to_cluster(json!({"prefix": "/"}), "svc")])}),
            ),
            LISTENER_TYPE,
        )],
    );
    let rest = json!({"api_type": "REST", "transport_api_version": "V3", "cluster_names": ["cp"],
        "refresh_delay": "0.05s", "request_timeout": "1s"});
    let bootstrap = json!({
        "node": {"id": "n1", "cluster": "c1"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "cds_config": {"resource_api_version": "V3", "api_config_source": rest},
            "lds_config": {"resource_api_version": "V3", "api_config_source": rest},
        },
        "static_resources": {"clusters": [cluster("cp", &[cp.addr()])]},
    });
    let proxy = Remora::start(&bootstrap.to_string(), &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");

    // Polls that find nothing new are answered 304 and change nothing.
    within_default("a 304", async {
        while plane_not_modified(&plane, "/v3/discovery:clusters") < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(proxy.stat("cluster_manager.cds.update_success").await, 1);
    assert_eq!(proxy.stat("cluster_manager.cluster_modified").await, 0);

    // A new version is picked up by the next poll.
    set(
        "/v3/discovery:clusters",
        vec![typed(cluster("svc", &[b.addr()]), CLUSTER_TYPE)],
    );
    proxy
        .wait_stat("cluster_manager.cds.update_success", |v| v >= 2, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "b");

    // A bad one is rejected: the next request says so in error_detail, with the accepted version.
    set(
        "/v3/discovery:clusters",
        vec![typed(
            json!({"name": "svc", "type": "STATIC", "lb_policy": "CLUSTER_PROVIDED"}),
            CLUSTER_TYPE,
        )],
    );
    proxy
        .wait_stat("cluster_manager.cds.update_rejected", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    within_default("a NACK", async {
        loop {
            let nack = plane
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .seen
                .iter()
                .any(|(p, v, nack, _)| p == "/v3/discovery:clusters" && *nack && v == "2");
            if nack {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(upstream_of(addr).await, "b");
    assert_eq!(proxy.stat("listener_manager.lds.update_rejected").await, 0);
}

/// A server drain (SIGTERM) also closes the idle connections of a listener that LDS replaced, which were only
/// being discouraged: the process exits at once, not after `--drain-time-s`.
#[tokio::test]
async fn sigterm_closes_what_a_replaced_listener_still_drains() {
    let a = Upstream::start("a").await;
    let (xds, mut proxy) = ads_world("GRPC", &a).await;
    let addr = proxy.listener_addr("main").await;
    let client = http1_client(addr);
    assert_eq!(client.get("/", &[]).await.status, StatusCode::OK);
    let mut changed = listener(
        "main",
        json!({"rds": {"route_config_name": "r1", "config_source": {"ads": {}}}}),
    );
    changed["per_connection_buffer_limit_bytes"] = json!(65536);
    xds.set(hx::LISTENER, vec![changed]);
    proxy
        .wait_stat("listener_manager.listener_modified", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    // The old listener's idle keep-alive connection is still open (the default drain time is 600 s).
    assert_eq!(proxy.stat("listener_manager.total_listeners_draining").await, 1);
    assert_eq!(proxy.stat("http.ingress.downstream_cx_active").await, 1);
    proxy.sigterm();
    let status = proxy.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{status:?}\n{}", proxy.logs());
}

/// A config source of its own (`api_config_source`) on the static cluster `xds`, as go-control-plane's
/// sample resources name it.
fn grpc_source(api_type: &str, cluster: &str) -> Value {
    json!({"resource_api_version": "V3", "api_config_source": {"api_type": api_type, "transport_api_version": "V3",
        "set_node_on_first_message_only": true, "grpc_services": [{"envoy_grpc": {"cluster_name": cluster}}]}})
}

/// REST polling through a cluster with a TLS transport socket (SDS-file client certificate and CA, as
/// Envoy Gateway's): the polls go over mTLS and the config routes traffic; the handshakes are the cluster's.
#[tokio::test]
async fn rest_polling_goes_over_mtls_with_the_cluster_tls_context() {
    let a = Upstream::start("a").await;
    let (cp, plane) = rest_plane().await;
    plane_set(
        &plane,
        "/v3/discovery:clusters",
        vec![typed(cluster("svc", &[a.addr()]), CLUSTER_TYPE)],
    );
    plane_set(
        &plane,
        "/v3/discovery:listeners",
        vec![typed(
            listener(
                "main",
                json!({"route_config": routes(vec![to_cluster(json!({"prefix": "/"}), "svc")])}),
            ),
            LISTENER_TYPE,
        )],
    );
    let pki = hx::Pki::new("rest");
    let server = pki.leaf("control plane", &["envoy-gateway"]);
    let client = pki.leaf("remora", &["remora.test"]);
    let front = hx::TlsFront::start(cp.addr(), &server.0, &server.1, Some(&pki.ca_pem())).await;
    let dir = TempDir::new();
    let sds = eg_sds_files(&dir, &client, &pki.ca_pem());
    // The TLS cluster of the ADS bootstrap, renamed `cp` and speaking HTTP/1.1 for REST.
    let tls_cluster: Value = serde_json::from_str(&ads_tls_bootstrap(front.addr(), &sds))
        .map(|v: Value| v["static_resources"]["clusters"][0]["transport_socket"].clone())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut cp_cluster = cluster("cp", &[front.addr()]);
    cp_cluster["transport_socket"] = tls_cluster;
    let bootstrap = json!({
        "node": {"id": "n1", "cluster": "c1"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {"cds_config": rest_source("cp", "0.05s"), "lds_config": rest_source("cp", "0.05s")},
        "static_resources": {"clusters": [cp_cluster]},
    });
    let proxy = Remora::start(&bootstrap.to_string(), &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");
    assert!(proxy.stat("cluster.cp.ssl.handshake").await >= 2);
    assert_eq!(proxy.stat("cluster.cp.ssl.connection_error").await, 0);
}

fn rest_source(cluster: &str, refresh_delay: &str) -> Value {
    json!({"resource_api_version": "V3", "api_config_source": {"api_type": "REST", "transport_api_version": "V3",
        "cluster_names": [cluster], "refresh_delay": refresh_delay, "request_timeout": "1s"}})
}

/// An EDS cluster whose assignment comes from `source`.
fn eds_cluster_from(name: &str, source: Value) -> Value {
    let mut c = eds_cluster(name);
    c["eds_cluster_config"]["eds_config"] = source;
    c
}

/// Route table `name` sending everything to `cluster`.
fn table(name: &str, cluster: &str) -> Value {
    let mut t = routes(vec![to_cluster(json!({"prefix": "/"}), cluster)]);
    t["name"] = json!(name);
    t
}

fn count(paths: &[String], path: &str) -> usize {
    paths.iter().filter(|p| *p == path).count()
}

const STREAM_ENDPOINTS: &str = "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints";
const DELTA_ROUTES: &str = "/envoy.service.route.v3.RouteDiscoveryService/DeltaRoutes";

/// EDS over a GRPC `api_config_source` of its own (one `StreamEndpoints` stream shared by every cluster that
/// names the source, asking for their names), RDS over a DELTA_GRPC one (`DeltaRoutes`); updates move
/// traffic, a bad assignment is NACKed with its field path and the last good hosts keep serving, and a
/// cluster added later joins the same stream.
#[tokio::test]
async fn eds_and_rds_on_their_own_grpc_streams() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let xds = XdsServer::start().await;
    let eds = || grpc_source("GRPC", "xds");
    xds.set(
        hx::CLUSTER,
        vec![eds_cluster_from("svc", eds()), eds_cluster_from("other", eds())],
    );
    xds.set(
        hx::ENDPOINT,
        vec![assignment("svc", &[a.addr()]), assignment("other", &[c.addr()])],
    );
    xds.set(
        hx::LISTENER,
        vec![listener(
            "main",
            json!({"rds": {"route_config_name": "r1", "config_source": grpc_source("DELTA_GRPC", "xds")}}),
        )],
    );
    xds.set(hx::ROUTE, vec![table("r1", "svc")]);
    let bootstrap = json!({
        "node": {"id": "n1", "cluster": "c1"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {"cds_config": grpc_source("GRPC", "xds"), "lds_config": grpc_source("GRPC", "xds")},
        "static_resources": {"clusters": [h2_cluster("xds", &[xds.addr()])]},
    });
    let proxy = Remora::start(&bootstrap.to_string(), &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");
    let paths = xds.stream_paths();
    assert_eq!(count(&paths, STREAM_ENDPOINTS), 1, "{paths:?}");
    assert_eq!(count(&paths, DELTA_ROUTES), 1, "{paths:?}");
    assert!(
        !paths.iter().any(|p| p.contains("AggregatedDiscoveryService")),
        "{paths:?}"
    );
    // Non-wildcard: the names of the clusters and connection managers that use the source.
    let eds_req = xds
        .wait_request("an EDS request", DEFAULT_TIMEOUT, |r| {
            hx::type_url(r) == hx::ENDPOINT
        })
        .await;
    let names: Vec<String> = match eds_req.get_field_by_name("resource_names").as_deref() {
        Some(prost_reflect::Value::List(l)) => {
            l.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
        }
        _ => Vec::new(),
    };
    assert_eq!(names, ["other", "svc"]);
    assert!(proxy.stat("cluster.svc.update_success").await >= 1);
    assert!(proxy.stat("cluster.other.update_success").await >= 1);
    assert!(proxy.stat("http.ingress.rds.r1.update_success").await >= 1);
    assert_eq!(proxy.stat("control_plane.connected_state").await, 1);
    assert_eq!(proxy.stat("cluster_manager.warming_clusters").await, 0);
    assert_eq!(proxy.stat("listener_manager.total_listeners_active").await, 1);
    let (_, dump) = proxy.admin_get("/config_dump").await;
    assert!(dump.contains("\"r1\""), "{dump}");

    // New endpoints move traffic.
    let before = proxy.stat("cluster.svc.update_success").await;
    xds.set(
        hx::ENDPOINT,
        vec![assignment("svc", &[b.addr()]), assignment("other", &[c.addr()])],
    );
    proxy
        .wait_stat("cluster.svc.update_success", |v| v > before, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "b");

    // A bad assignment is NACKed on the EDS stream with its field path; the last good hosts serve.
    let mut bad = assignment("svc", &[a.addr()]);
    bad["endpoints"][0]["lb_endpoints"][0]["load_balancing_weight"] = json!(0);
    xds.set(hx::ENDPOINT, vec![bad, assignment("other", &[c.addr()])]);
    let nack = xds
        .wait_request("an EDS NACK", DEFAULT_TIMEOUT, |r| {
            hx::type_url(r) == hx::ENDPOINT && hx::nack_message(r).is_some()
        })
        .await;
    let detail = hx::nack_message(&nack).unwrap_or_default();
    assert!(
        detail.contains("\"svc\"") && detail.contains("endpoints[0].lb_endpoints[0].load_balancing_weight"),
        "{detail}"
    );
    proxy
        .wait_stat("cluster.svc.update_rejected", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "b");

    // A new route table over the delta stream moves traffic.
    let before = proxy.stat("http.ingress.rds.r1.update_success").await;
    xds.set(hx::ROUTE, vec![table("r1", "other")]);
    proxy
        .wait_stat(
            "http.ingress.rds.r1.update_success",
            |v| v > before,
            DEFAULT_TIMEOUT,
        )
        .await;
    assert_eq!(upstream_of(addr).await, "c");

    // A cluster added later on the same source is asked for on the same stream, and warms from it.
    xds.set(
        hx::ENDPOINT,
        vec![
            assignment("svc", &[b.addr()]),
            assignment("other", &[c.addr()]),
            assignment("third", &[a.addr()]),
        ],
    );
    xds.set(
        hx::CLUSTER,
        vec![
            eds_cluster_from("svc", eds()),
            eds_cluster_from("other", eds()),
            eds_cluster_from("third", eds()),
        ],
    );
    proxy
        .wait_stat("cluster.third.update_success", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    xds.set(hx::ROUTE, vec![table("r1", "third")]);
    proxy
        .wait_stat(
            "http.ingress.rds.r1.update_success",
            |v| v > before + 1,
            DEFAULT_TIMEOUT,
        )
        .await;
    assert_eq!(upstream_of(addr).await, "a");
    assert_eq!(count(&xds.stream_paths(), STREAM_ENDPOINTS), 1);

    // A lost control plane fails every subscription its streams served; the last good config serves on.
    drop(xds);
    proxy
        .wait_stat("cluster.third.update_failure", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    proxy
        .wait_stat("http.ingress.rds.r1.update_failure", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    proxy
        .wait_stat("control_plane.connected_state", |v| v == 0, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "a");
}

/// EDS and RDS over REST (`/v3/discovery:endpoints`, `:routes`, with the `resource_names` of interest): the
/// first polls warm the cluster and the listener, a 304 changes nothing, new versions move traffic.
#[tokio::test]
async fn eds_and_rds_polled_over_rest() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let (cp, plane) = rest_plane().await;
    let rest = || rest_source("cp", "0.05s");
    plane_set(
        &plane,
        "/v3/discovery:clusters",
        vec![typed(eds_cluster_from("svc", rest()), CLUSTER_TYPE)],
    );
    plane_set(
        &plane,
        "/v3/discovery:listeners",
        vec![typed(
            listener(
                "main",
                json!({"rds": {"route_config_name": "r1", "config_source": rest()}}),
            ),
            LISTENER_TYPE,
        )],
    );
    let endpoints = |name: &str, up: &Upstream| typed(assignment(name, &[up.addr()]), hx::ENDPOINT);
    plane_set(
        &plane,
        "/v3/discovery:endpoints",
        vec![endpoints("svc", &a), endpoints("unrelated", &b)],
    );
    plane_set(
        &plane,
        "/v3/discovery:routes",
        vec![typed(table("r1", "svc"), hx::ROUTE)],
    );
    let bootstrap = json!({
        "node": {"id": "n1", "cluster": "c1"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {"cds_config": rest(), "lds_config": rest()},
        "static_resources": {"clusters": [cluster("cp", &[cp.addr()]), cluster("direct", &[c.addr()])]},
    });
    let proxy = Remora::start(&bootstrap.to_string(), &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");
    {
        let p = plane.lock().unwrap_or_else(|e| e.into_inner());
        let names_of = |path: &str| {
            p.seen
                .iter()
                .find(|(p, ..)| p == path)
                .map(|(.., names)| names.clone())
                .unwrap_or_default()
        };
        assert_eq!(names_of("/v3/discovery:endpoints"), ["svc"]);
        assert_eq!(names_of("/v3/discovery:routes"), ["r1"]);
    }

    // Polls that find nothing new are answered 304 and change nothing.
    within_default("304s", async {
        while plane_not_modified(&plane, "/v3/discovery:endpoints") < 3
            || plane_not_modified(&plane, "/v3/discovery:routes") < 3
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(proxy.stat("cluster.svc.update_success").await, 1);
    assert_eq!(proxy.stat("http.ingress.rds.r1.update_success").await, 1);

    // New versions are picked up by the next polls.
    plane_set(&plane, "/v3/discovery:endpoints", vec![endpoints("svc", &b)]);
    proxy
        .wait_stat("cluster.svc.update_success", |v| v >= 2, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "b");
    plane_set(
        &plane,
        "/v3/discovery:routes",
        vec![typed(table("r1", "direct"), hx::ROUTE)],
    );
    proxy
        .wait_stat("http.ingress.rds.r1.update_success", |v| v >= 2, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "c");
}

/// A go-control-plane sample bootstrap from the corpus, pointed at `control_plane` (its `xds_cluster`) with
/// the admin on port 0. `layered_runtime` is taken out only while Remora refuses it.
async fn go_control_plane_bootstrap(file: &str, control_plane: SocketAddr) -> String {
    let path = crate::corpus::corpus_dir().join("configs").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut v: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
    v["admin"]["address"]["socket_address"]["port_value"] = json!(0);
    let clusters = v["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("{file} has no static clusters"));
    let xds = clusters
        .iter_mut()
        .find(|c| c["name"] == "xds_cluster")
        .unwrap_or_else(|| panic!("{file} has no xds_cluster"));
    xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] =
        json!({"address": control_plane.ip().to_string(), "port_value": control_plane.port()});
    v.to_string()
}

/// The resources of go-control-plane's example (`internal/example/resource.go`), with the cluster's
/// endpoints from EDS over the same config source as the listener's RDS.
fn go_control_plane_resources(source: &Value, up: &Upstream) -> (Value, Value, Value, Value) {
    let cluster = json!({
        "name": "example_proxy_cluster", "connect_timeout": "5s", "type": "EDS", "lb_policy": "ROUND_ROBIN",
        "eds_cluster_config": {"eds_config": source},
    });
    let assignment = assignment("example_proxy_cluster", &[up.addr()]);
    let route = json!({
        "name": "local_route",
        "virtual_hosts": [{"name": "local_service", "domains": ["*"], "routes": [{"match": {"prefix": "/"},
            "route": {"cluster": "example_proxy_cluster", "host_rewrite_literal": "www.envoyproxy.io"}}]}],
    });
    let hcm = json!({
        "@type": HCM_TYPE, "codec_type": "AUTO", "stat_prefix": "http",
        "rds": {"config_source": source, "route_config_name": "local_route"},
        "http_filters": [{"name": "http-router", "typed_config": {"@type": ROUTER_TYPE}}],
    });
    let listener = json!({
        "name": "listener_0",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{"name": "http-connection-manager", "typed_config": hcm}]}],
    });
    (cluster, assignment, route, listener)
}

/// go-control-plane's ADS samples (`sample_bootstrap-ads.yaml`, state of the world; `-delta-ads.yaml`) and
/// Envoy's `dynamic-config-cp` example, as they are but for the control plane's address (and the admin port),
/// against the test control plane serving go-control-plane-shaped resources over ADS: traffic reaches the
/// upstream, and an EDS update moves it.
async fn ads_sample_runs(file: &str) {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let xds = XdsServer::start().await;
    let (cluster, assignment_a, route, listener) =
        go_control_plane_resources(&json!({"ads": {}, "resource_api_version": "V3"}), &a);
    xds.set(hx::CLUSTER, vec![cluster]);
    xds.set(hx::ENDPOINT, vec![assignment_a]);
    xds.set(hx::ROUTE, vec![route]);
    xds.set(hx::LISTENER, vec![listener]);
    let bootstrap = go_control_plane_bootstrap(file, xds.addr()).await;
    let proxy = Remora::start(&bootstrap, &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("listener_0").await;
    assert_eq!(upstream_of(addr).await, "a", "{file}");
    assert_eq!(proxy.stat("control_plane.connected_state").await, 1);
    xds.set(
        hx::ENDPOINT,
        vec![assignment("example_proxy_cluster", &[b.addr()])],
    );
    proxy
        .wait_stat(
            "cluster.example_proxy_cluster.update_success",
            |v| v >= 2,
            DEFAULT_TIMEOUT,
        )
        .await;
    assert_eq!(upstream_of(addr).await, "b", "{file}");
    assert!(xds
        .stream_paths()
        .iter()
        .all(|p| p.contains("AggregatedResources")));
}

#[tokio::test]
async fn go_control_plane_ads_sample_runs() {
    ads_sample_runs("go-control-plane__sample_bootstrap-ads.yaml").await;
}

#[tokio::test]
async fn go_control_plane_delta_ads_sample_runs() {
    ads_sample_runs("go-control-plane__sample_bootstrap-delta-ads.yaml").await;
}

#[tokio::test]
async fn envoy_dynamic_config_cp_example_runs() {
    ads_sample_runs("envoyproxy-examples__dynamic-config-cp_envoy.yaml").await;
}

/// go-control-plane's `sample_bootstrap-xds.yaml` (CDS and LDS each on a GRPC `api_config_source` of its
/// own) against the test control plane serving go-control-plane-shaped resources.
#[tokio::test]
async fn go_control_plane_xds_sample_runs() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let xds = XdsServer::start().await;
    let (cluster, assignment_a, route, listener) =
        go_control_plane_resources(&grpc_source("GRPC", "xds_cluster"), &a);
    xds.set(hx::CLUSTER, vec![cluster]);
    xds.set(hx::ENDPOINT, vec![assignment_a]);
    xds.set(hx::ROUTE, vec![route]);
    xds.set(hx::LISTENER, vec![listener]);
    // The sample's `rtds_layer` `runtime-0`, on its own RuntimeDiscoveryService stream: /ready waits for it.
    xds.set(
        hx::RUNTIME,
        vec![json!({"name": "runtime-0", "layer": {"example": {"key": 7}}})],
    );
    let bootstrap =
        go_control_plane_bootstrap("go-control-plane__sample_bootstrap-xds.yaml", xds.addr()).await;
    let proxy = Remora::start(&bootstrap, &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("listener_0").await;
    assert_eq!(upstream_of(addr).await, "a");
    assert_eq!(proxy.stat("control_plane.connected_state").await, 1);
    let (_, runtime) = proxy.admin_get("/runtime").await;
    assert!(
        runtime.contains("\"example.key\"") && runtime.contains("runtime-0"),
        "the RTDS layer is not in /runtime: {runtime}"
    );
    xds.set(
        hx::ENDPOINT,
        vec![assignment("example_proxy_cluster", &[b.addr()])],
    );
    proxy
        .wait_stat(
            "cluster.example_proxy_cluster.update_success",
            |v| v >= 2,
            DEFAULT_TIMEOUT,
        )
        .await;
    assert_eq!(upstream_of(addr).await, "b");
}

/// go-control-plane's `sample_bootstrap-rest.yaml` (REST polling every 0.5 s) against a REST control plane
/// serving the same resources.
#[tokio::test]
async fn go_control_plane_rest_sample_runs() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let (cp, plane) = rest_plane().await;
    let source = json!({"resource_api_version": "V3", "api_config_source": {"api_type": "REST",
        "transport_api_version": "V3", "refresh_delay": "0.5s", "cluster_names": ["xds_cluster"]}});
    let (cluster, assignment_a, route, listener) = go_control_plane_resources(&source, &a);
    plane_set(
        &plane,
        "/v3/discovery:clusters",
        vec![typed(cluster, CLUSTER_TYPE)],
    );
    plane_set(
        &plane,
        "/v3/discovery:endpoints",
        vec![typed(assignment_a, hx::ENDPOINT)],
    );
    plane_set(&plane, "/v3/discovery:routes", vec![typed(route, hx::ROUTE)]);
    plane_set(
        &plane,
        "/v3/discovery:listeners",
        vec![typed(listener, LISTENER_TYPE)],
    );
    // The sample's `rtds_layer` `runtime-0`, polled over REST like the rest.
    plane_set(
        &plane,
        "/v3/discovery:runtime",
        vec![typed(
            json!({"name": "runtime-0", "layer": {"example": {"key": 7}}}),
            hx::RUNTIME,
        )],
    );
    let bootstrap =
        go_control_plane_bootstrap("go-control-plane__sample_bootstrap-rest.yaml", cp.addr()).await;
    let proxy = Remora::start(&bootstrap, &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("listener_0").await;
    assert_eq!(upstream_of(addr).await, "a");
    let (_, runtime) = proxy.admin_get("/runtime").await;
    assert!(
        runtime.contains("\"example.key\"") && runtime.contains("runtime-0"),
        "the RTDS layer is not in /runtime: {runtime}"
    );
    plane_set(
        &plane,
        "/v3/discovery:endpoints",
        vec![typed(
            assignment("example_proxy_cluster", &[b.addr()]),
            hx::ENDPOINT,
        )],
    );
    proxy
        .wait_stat(
            "cluster.example_proxy_cluster.update_success",
            |v| v >= 2,
            DEFAULT_TIMEOUT,
        )
        .await;
    assert_eq!(upstream_of(addr).await, "b");
}

/// EDS and RDS from files (`path_config_source`), for a static EDS cluster and a static listener: the server
/// goes live once both have loaded, and an atomic rename of either file moves traffic.
#[tokio::test]
async fn static_eds_and_rds_from_files() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let dir = TempDir::new();
    let d = dir.path().display().to_string();
    let eds_file = |up: &Upstream, version: &str| {
        discovery_file(
            version,
            vec![typed(assignment("svc", &[up.addr()]), hx::ENDPOINT)],
        )
    };
    let rds_file =
        |cluster: &str, version: &str| discovery_file(version, vec![typed(table("r1", cluster), hx::ROUTE)]);
    dir.write("eds.yaml", &eds_file(&a, "1"));
    dir.write("rds.yaml", &rds_file("svc", "1"));
    let mut svc = eds_cluster("svc");
    svc["eds_cluster_config"]["eds_config"] =
        json!({"path_config_source": {"path": format!("{d}/eds.yaml")}});
    let main = listener(
        "main",
        json!({"rds": {"route_config_name": "r1",
            "config_source": {"path_config_source": {"path": format!("{d}/rds.yaml"), "watched_directory": {"path": d}}}}}),
    );
    let bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"clusters": [svc, cluster("direct", &[b.addr()])], "listeners": [main]},
    });
    let proxy = Remora::start(&bootstrap.to_string(), &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");
    assert_eq!(proxy.stat("cluster.svc.update_success").await, 1);
    assert_eq!(proxy.stat("http.ingress.rds.r1.update_success").await, 1);
    assert_eq!(proxy.stat_opt("control_plane.connected_state").await, None);

    write_atomically(&dir, "eds.yaml", &eds_file(&b, "2"));
    proxy
        .wait_stat("cluster.svc.update_success", |v| v >= 2, DEFAULT_TIMEOUT)
        .await;
    let (_, clusters) = proxy.admin_get("/clusters").await;
    assert!(clusters.contains(&format!("svc::{}", b.addr())), "{clusters}");
    write_atomically(&dir, "rds.yaml", &rds_file("direct", "2"));
    proxy
        .wait_stat("http.ingress.rds.r1.update_success", |v| v >= 2, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "b");
}

/// A config source of its own must reach its control plane through a static non-EDS cluster, `ads` needs
/// `ads_config`, and one route configuration name comes from one source: each refused with its path.
#[tokio::test]
async fn own_config_sources_are_checked_with_their_paths() {
    let eds = |source: Value| {
        let mut c = eds_cluster("svc");
        c["eds_cluster_config"]["eds_config"] = source;
        json!({
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {"clusters": [c]},
        })
        .to_string()
    };
    let (code, _, err) = crate::harness::validate(&eds(grpc_source("GRPC", "nowhere"))).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("static_resources.clusters[0].eds_cluster_config.eds_config.api_config_source.grpc_services[0].envoy_grpc.cluster_name: unknown static cluster \"nowhere\""),
        "{err}"
    );
    let (code, _, err) = crate::harness::validate(&eds(json!({"ads": {}}))).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("static_resources.clusters[0].eds_cluster_config.eds_config.ads: says ads"),
        "{err}"
    );
    let rds = |source: Value| json!({"rds": {"route_config_name": "r1", "config_source": source}});
    let two = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "clusters": [h2_cluster("xds", &[crate::support::closed_port()])],
            "listeners": [listener("one", rds(grpc_source("GRPC", "xds"))), listener("two", rds(rest_source("xds", "1s")))],
        },
    });
    let (code, _, err) = crate::harness::validate(&two.to_string()).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("rds.config_source: route configuration \"r1\" is already subscribed to from another config source"),
        "{err}"
    );
}

/// A new EDS cluster whose assignment does not come warms for its `eds_config`'s `initial_fetch_timeout`,
/// then serves without hosts (503) counting `init_fetch_timeout`, as Envoy's EDS cluster ends its
/// initialization; the assignment, when it comes, gives it hosts.
#[tokio::test]
async fn an_eds_cluster_stops_warming_after_its_initial_fetch_timeout() {
    let a = Upstream::start("a").await;
    let xds = XdsServer::start().await;
    let mut source = grpc_source("GRPC", "xds");
    source["initial_fetch_timeout"] = json!("0.3s");
    xds.set(hx::CLUSTER, vec![eds_cluster_from("svc", source)]);
    xds.set(
        hx::LISTENER,
        vec![listener(
            "main",
            json!({"route_config": routes(vec![to_cluster(json!({"prefix": "/"}), "svc")])}),
        )],
    );
    let bootstrap = json!({
        "node": {"id": "n1", "cluster": "c1"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {"cds_config": grpc_source("GRPC", "xds"), "lds_config": grpc_source("GRPC", "xds")},
        "static_resources": {"clusters": [h2_cluster("xds", &[xds.addr()])]},
    });
    let proxy = Remora::start(&bootstrap.to_string(), &[]).await;
    proxy.wait_ready().await;
    proxy
        .wait_stat("cluster.svc.init_fetch_timeout", |v| v == 1, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(proxy.stat("cluster_manager.warming_clusters").await, 0);
    assert_eq!(proxy.stat("cluster.svc.update_success").await, 0);
    let addr = proxy.listener_addr("main").await;
    let reply = http1_client(addr).get("/", &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());

    xds.set(hx::ENDPOINT, vec![assignment("svc", &[a.addr()])]);
    proxy
        .wait_stat("cluster.svc.update_success", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "a");
    assert_eq!(proxy.stat("cluster.svc.init_fetch_timeout").await, 1);
}

// ---------------------------------------------------------------------------------------------------------------
// TLS to the control plane: the `envoy_grpc` cluster's `UpstreamTlsContext` (Envoy Gateway's shape: client
// certificate and trusted CA from SDS files).

const UPSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Envoy Gateway's two SDS files (`xds-certificate.json`, `xds-trusted-ca.json`: a `resources` list holding one
/// `Secret`, the PEM files by name, the server's SAN `envoy-gateway`), written into `dir` with the client's
/// certificate and the CA to trust. Returns the two paths.
fn eg_sds_files(dir: &TempDir, client: &(String, String), trusted_ca: &str) -> (String, String) {
    dir.write("tls.crt", &client.0);
    dir.write("tls.key", &client.1);
    dir.write("ca.crt", trusted_ca);
    let file = |n: &str| dir.path().join(n).display().to_string();
    let cert = json!({"resources": [{"@type": SECRET, "name": "xds_certificate", "tls_certificate": {
        "certificate_chain": {"filename": file("tls.crt")}, "private_key": {"filename": file("tls.key")}}}]});
    let ca = json!({"resources": [{"@type": SECRET, "name": "xds_trusted_ca", "validation_context": {
        "trusted_ca": {"filename": file("ca.crt")},
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "envoy-gateway"}}]}}]});
    dir.write("xds-certificate.json", &cert.to_string());
    dir.write("xds-trusted-ca.json", &ca.to_string());
    (file("xds-certificate.json"), file("xds-trusted-ca.json"))
}

/// [`ads_bootstrap_at`] with the `xds` cluster over TLS: the client certificate and the validation context
/// from the SDS files `sds` (as Envoy Gateway's bootstrap has them).
fn ads_tls_bootstrap(control_plane: SocketAddr, sds: &(String, String)) -> String {
    let mut v: Value = serde_json::from_str(&ads_bootstrap_at(control_plane, "DELTA_GRPC"))
        .unwrap_or_else(|e| panic!("{e}"));
    v["static_resources"]["clusters"][0]["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UPSTREAM_TLS,
        "common_tls_context": {
            "tls_params": {"tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificate_sds_secret_configs": [{"name": "xds_certificate",
                "sds_config": {"path_config_source": {"path": sds.0}, "resource_api_version": "V3"}}],
            "validation_context_sds_secret_config": {"name": "xds_trusted_ca",
                "sds_config": {"path_config_source": {"path": sds.1}, "resource_api_version": "V3"}},
        },
    }});
    v.to_string()
}

/// The resources of [`ads_world`]: an EDS cluster `svc` on `up`, listener `main` with routes `r1` from RDS.
fn serve_world(xds: &XdsServer, up: &Upstream) {
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
}

/// ADS over mTLS: the control plane requires a client certificate; the proxy presents the one of its SDS file,
/// verifies the server against the SDS file's CA and SAN matcher, and the pushed config routes traffic. The
/// handshake is counted in the cluster's `ssl.*` stats like a data-plane connection's.
#[tokio::test]
async fn ads_over_mtls_through_a_static_cluster_with_sds_file_secrets() {
    let pki = hx::Pki::new("cp");
    let server = pki.leaf("control plane", &["envoy-gateway"]);
    let client = pki.leaf("remora", &["remora.test"]);
    let xds = XdsServer::start_tls(&server.0, &server.1, Some(&pki.ca_pem())).await;
    let a = Upstream::start("a").await;
    serve_world(&xds, &a);
    let dir = TempDir::new();
    let sds = eg_sds_files(&dir, &client, &pki.ca_pem());
    let proxy = Remora::start(&ads_tls_bootstrap(xds.addr(), &sds), &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");
    assert_eq!(proxy.stat("control_plane.connected_state").await, 1);
    assert!(proxy.stat("cluster.xds.ssl.handshake").await >= 1);
    assert_eq!(proxy.stat("cluster.xds.ssl.connection_error").await, 0);
    assert!(xds.tls_failures().is_empty(), "{:?}", xds.tls_failures());
    // A config change still arrives over the TLS stream.
    let b = Upstream::start("b").await;
    xds.set(hx::ENDPOINT, vec![assignment("svc", &[b.addr()])]);
    proxy
        .wait_stat("cluster.svc.update_success", |v| v >= 2, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(upstream_of(addr).await, "b");
}

/// A control plane whose certificate another CA signed: every handshake fails verification, the stream never
/// comes up (`connected_state` 0, reconnecting), and the log names the TLS error.
#[tokio::test]
async fn ads_over_tls_with_the_wrong_ca_never_connects_and_logs_the_tls_error() {
    let pki = hx::Pki::new("cp");
    let other = hx::Pki::new("other");
    let server = other.leaf("impostor", &["envoy-gateway"]);
    let client = pki.leaf("remora", &["remora.test"]);
    let xds = XdsServer::start_tls(&server.0, &server.1, Some(&pki.ca_pem())).await;
    let a = Upstream::start("a").await;
    serve_world(&xds, &a);
    let dir = TempDir::new();
    let sds = eg_sds_files(&dir, &client, &pki.ca_pem());
    let proxy = Remora::start(&ads_tls_bootstrap(xds.addr(), &sds), &[]).await;
    proxy
        .wait_stat("cluster.xds.ssl.fail_verify_error", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    proxy.wait_log("TLS_error", DEFAULT_TIMEOUT).await;
    let logs = proxy.logs();
    assert!(logs.contains("UnknownIssuer"), "{logs}");
    assert_eq!(proxy.stat("control_plane.connected_state").await, 0);
    assert!(proxy.stat("cluster.xds.upstream_cx_connect_fail").await >= 1);
    assert!(xds.requests().is_empty(), "no request may reach the server");
    // The server saw the proxy refuse its certificate.
    assert!(!xds.tls_failures().is_empty());
}

/// The SAN matcher of the SDS validation context is checked (a certificate of the right CA for another name
/// fails `fail_verify_san`), and a rotated SDS file applies to the next connection: once the trusted-CA file
/// names the server's SAN, the reconnecting stream comes up and the config routes traffic.
#[tokio::test]
async fn ads_over_tls_checks_the_sds_san_matcher_and_a_rotated_sds_file_applies_on_reconnect() {
    let pki = hx::Pki::new("cp");
    let server = pki.leaf("control plane", &["elsewhere.test"]);
    let client = pki.leaf("remora", &["remora.test"]);
    let xds = XdsServer::start_tls(&server.0, &server.1, Some(&pki.ca_pem())).await;
    let a = Upstream::start("a").await;
    serve_world(&xds, &a);
    let dir = TempDir::new();
    let sds = eg_sds_files(&dir, &client, &pki.ca_pem());
    let proxy = Remora::start(&ads_tls_bootstrap(xds.addr(), &sds), &[]).await;
    proxy
        .wait_stat("cluster.xds.ssl.fail_verify_san", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(proxy.stat("control_plane.connected_state").await, 0);
    assert!(xds.requests().is_empty());
    let ca = dir.path().join("ca.crt").display().to_string();
    let rotated = json!({"resources": [{"@type": SECRET, "name": "xds_trusted_ca", "validation_context": {
        "trusted_ca": {"filename": ca},
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "elsewhere.test"}}]}}]});
    write_atomically(&dir, "xds-trusted-ca.json", &rotated.to_string());
    proxy
        .wait_stat(
            "control_plane.connected_state",
            |v| v == 1,
            Duration::from_secs(20),
        )
        .await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");
}

/// A plaintext (h2c) control plane behind a cluster with TLS: the handshake fails, the stream never comes up.
#[tokio::test]
async fn ads_over_tls_to_a_plaintext_control_plane_fails() {
    let pki = hx::Pki::new("cp");
    let client = pki.leaf("remora", &["remora.test"]);
    let xds = XdsServer::start().await;
    let a = Upstream::start("a").await;
    serve_world(&xds, &a);
    let dir = TempDir::new();
    let sds = eg_sds_files(&dir, &client, &pki.ca_pem());
    let proxy = Remora::start(&ads_tls_bootstrap(xds.addr(), &sds), &[]).await;
    proxy
        .wait_stat("cluster.xds.ssl.connection_error", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    proxy.wait_log("TLS_error", DEFAULT_TIMEOUT).await;
    assert_eq!(proxy.stat("control_plane.connected_state").await, 0);
    assert!(xds.requests().is_empty(), "no request may reach the server");
}

/// A bootstrap whose ADS goes to a `google_grpc` target with `ssl_credentials` (`root_certs`, and the client
/// certificate), inline PEM.
fn google_tls_bootstrap(control_plane: SocketAddr, ca: &str, client: &(String, String)) -> String {
    json!({
        "node": {"id": "n1", "cluster": "c1"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                "grpc_services": [{"google_grpc": {"target_uri": control_plane.to_string(), "stat_prefix": "xds",
                    "channel_credentials": {"ssl_credentials": {
                        "root_certs": {"inline_string": ca},
                        "cert_chain": {"inline_string": client.0},
                        "private_key": {"inline_string": client.1},
                    }}}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
    })
    .to_string()
}

/// `google_grpc.channel_credentials.ssl_credentials`: ADS over mTLS to a target URI, the server verified
/// against `root_certs` and the target's address; a server certificate that does not name the target's
/// address is refused (as gRPC checks the target's host name), the stream never comes up.
#[tokio::test]
async fn google_grpc_ssl_credentials_reach_the_control_plane_over_mtls_and_check_its_name() {
    let pki = hx::Pki::new("cp");
    let server = pki.leaf("control plane", &["127.0.0.1"]);
    let client = pki.leaf("remora", &["remora.test"]);
    let xds = XdsServer::start_tls(&server.0, &server.1, Some(&pki.ca_pem())).await;
    let a = Upstream::start("a").await;
    serve_world(&xds, &a);
    let proxy = Remora::start(&google_tls_bootstrap(xds.addr(), &pki.ca_pem(), &client), &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");
    assert_eq!(proxy.stat("control_plane.connected_state").await, 1);

    // A certificate for another name, from the right CA.
    let other = pki.leaf("elsewhere", &["envoy-gateway"]);
    let wrong = XdsServer::start_tls(&other.0, &other.1, Some(&pki.ca_pem())).await;
    serve_world(&wrong, &a);
    let refused = Remora::start(&google_tls_bootstrap(wrong.addr(), &pki.ca_pem(), &client), &[]).await;
    refused.wait_log("TLS_error", DEFAULT_TIMEOUT).await;
    let logs = refused.logs();
    assert!(logs.contains("NotValidForName"), "{logs}");
    assert_eq!(refused.stat("control_plane.connected_state").await, 0);
    assert!(wrong.requests().is_empty());
}

// ---------------------------------------------------------------------------------------------------------------
// Envoy Gateway's bootstrap: xDS over mTLS to `xds_cluster`, secrets from SDS files.

const EG_BOOTSTRAP: &str = "envoy-gateway__bootstrap_render_enable-prometheus.yaml";

/// Envoy Gateway's rendered bootstrap from the corpus with only what a test must change: the SDS file paths
/// (`/sds/xds-certificate.json`, `/sds/xds-trusted-ca.json`) to `sds`, `xds_cluster`'s endpoint (DNS name
/// `envoy-gateway`) to `control_plane`, and the fixed ports (admin 19000, stats listener 19001) to 0.
fn eg_bootstrap(control_plane: SocketAddr, sds: &(String, String)) -> Value {
    let path = crate::corpus::corpus_dir().join("configs").join(EG_BOOTSTRAP);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text = text
        .replace("/sds/xds-certificate.json", &sds.0)
        .replace("/sds/xds-trusted-ca.json", &sds.1);
    let mut v: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{EG_BOOTSTRAP}: {e}"));
    v["admin"]["address"]["socket_address"]["port_value"] = json!(0);
    let stats = &mut v["static_resources"]["listeners"][0]["address"]["socket_address"];
    *stats = json!({"address": "127.0.0.1", "port_value": 0, "protocol": "TCP"});
    let clusters = v["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("{EG_BOOTSTRAP} has no static clusters"));
    let xds = clusters
        .iter_mut()
        .find(|c| c["name"] == "xds_cluster")
        .unwrap_or_else(|| panic!("{EG_BOOTSTRAP} has no xds_cluster"));
    xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] =
        json!({"address": control_plane.ip().to_string(), "port_value": control_plane.port()});
    v
}

/// What Envoy Gateway's resources look like for a proxy: listener `main` with routes `r1` (RDS) to the EDS
/// cluster `svc` on `up`, and the bootstrap's EDS `local_cluster`.
fn serve_eg_world(xds: &XdsServer, up: &Upstream) {
    serve_world(xds, up);
    xds.set(
        hx::ENDPOINT,
        vec![
            assignment("svc", &[up.addr()]),
            assignment("local_cluster", &[up.addr()]),
        ],
    );
}

/// The TLS part of Envoy Gateway's bootstrap is accepted: the SDS files in EG's shape load and `xds_cluster`
/// with its `UpstreamTlsContext` no longer refuses the config. What else of the file is still refused is not
/// this test's business (each has its own work); the full run is [`envoy_gateway_bootstrap_runs_over_mtls`].
#[tokio::test]
async fn envoy_gateway_bootstrap_tls_to_the_control_plane_is_accepted() {
    let pki = hx::Pki::new("eg");
    let client = pki.leaf("envoy", &["envoy.test"]);
    let dir = TempDir::new();
    let sds = eg_sds_files(&dir, &client, &pki.ca_pem());
    let bootstrap = eg_bootstrap("127.0.0.1:18000".parse().unwrap_or_else(|e| panic!("{e}")), &sds);
    let (_, _, err) = crate::harness::validate(&bootstrap.to_string()).await;
    for needle in [
        "sds_config",
        "transport_socket",
        "xds-certificate",
        "xds-trusted-ca",
    ] {
        assert!(
            !err.lines().any(|l| l.contains(needle)),
            "{needle:?} is still refused:\n{err}"
        );
    }
}

/// Envoy Gateway's bootstrap as it is, against the TLS control plane (client certificate required): ADS
/// (delta) over mTLS to `xds_cluster`, the pushed listener routes traffic.
#[tokio::test]
async fn envoy_gateway_bootstrap_runs_over_mtls() {
    let pki = hx::Pki::new("eg");
    let server = pki.leaf("envoy gateway", &["envoy-gateway"]);
    let client = pki.leaf("envoy", &["envoy.test"]);
    let xds = XdsServer::start_tls(&server.0, &server.1, Some(&pki.ca_pem())).await;
    let a = Upstream::start("a").await;
    serve_eg_world(&xds, &a);
    let dir = TempDir::new();
    let sds = eg_sds_files(&dir, &client, &pki.ca_pem());
    let proxy = Remora::start(&eg_bootstrap(xds.addr(), &sds).to_string(), &[]).await;
    proxy.wait_ready().await;
    let addr = proxy.listener_addr("main").await;
    assert_eq!(upstream_of(addr).await, "a");
    assert_eq!(proxy.stat("control_plane.connected_state").await, 1);
    assert!(proxy.stat("cluster.xds_cluster.ssl.handshake").await >= 1);
    assert!(xds
        .stream_paths()
        .iter()
        .all(|p| p.ends_with("DeltaAggregatedResources")));
}
