//! Envoy's layered runtime through the real binary: a static layer's circuit-breaker key changes admission,
//! `/runtime` shows the layers, `/runtime_modify` overrides and removes, a disk layer follows a symlink swap,
//! and RTDS (over ADS, its own delta stream, and REST) changes a value live and NACKs a bad layer.

use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};

use crate::harness::xds as hx;
use crate::harness::{http1_client, Remora, TempDir, Upstream, XdsServer, DEFAULT_TIMEOUT};
use crate::support::{bootstrap, cluster, h2_cluster, routes, to_cluster, Proxy, LISTENER};

const KEY: &str = "circuit_breakers.svc.default.max_requests";

/// A bootstrap routing everything to cluster `svc` on `up`, with `layered_runtime: {layers}`.
fn with_layers(up: &Upstream, layers: Value, extra_clusters: Vec<Value>) -> Value {
    let mut clusters = vec![cluster("svc", &[up.addr()])];
    clusters.extend(extra_clusters);
    let mut b = bootstrap(
        routes(vec![to_cluster(json!({"prefix": "/"}), "svc")]),
        clusters,
        Value::Null,
    );
    b["node"] = json!({"id": "n1", "cluster": "c1"});
    b["layered_runtime"] = json!({ "layers": layers });
    b
}

async fn status(addr: std::net::SocketAddr) -> StatusCode {
    http1_client(addr).get("/", &[]).await.status
}

async fn runtime_json(proxy: &Remora) -> Value {
    let (code, body) = proxy.admin_get("/runtime").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/runtime is not JSON ({e}): {body}"))
}

/// Waits until `/runtime` says `key`'s final value is `want` (empty: the key is gone).
async fn wait_value(proxy: &Remora, key: &str, want: &str) {
    crate::harness::within(DEFAULT_TIMEOUT, &format!("runtime {key} = {want:?}"), async {
        loop {
            let r = runtime_json(proxy).await;
            let v = r["entries"][key]["final_value"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if v == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn static_layer_sets_a_breaker_and_runtime_modify_overrides_it() {
    let up = Upstream::start("a").await;
    let layers = json!([
        {"name": "static_layer_0", "static_layer": {"circuit_breakers": {"svc": {"default": {"max_requests": 0}}},
            "unknown": {"key": "kept"}}},
        {"name": "admin_layer_0", "admin_layer": {}},
    ]);
    let proxy = Proxy::start(&with_layers(&up, layers, vec![]), &[]).await;
    // max_requests 0: every request overflows the breaker.
    let reply = proxy.h1().get("/", &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert_eq!(reply.header("x-envoy-overloaded"), Some("true"));
    assert!(proxy.stat("cluster.svc.upstream_rq_pending_overflow").await >= 1);

    let r = runtime_json(&proxy.remora).await;
    assert_eq!(r["layers"], json!(["static_layer_0", "admin_layer_0"]));
    assert_eq!(
        r["entries"][KEY],
        json!({"final_value": "0", "layer_values": ["0", ""]})
    );
    assert_eq!(r["entries"]["unknown.key"]["final_value"], "kept");
    assert_eq!(proxy.stat("runtime.num_keys").await, 2);
    assert_eq!(proxy.stat("runtime.num_layers").await, 2);
    assert_eq!(proxy.stat("runtime.admin_overrides_active").await, 0);
    // The key no feature reads is named in the log at start.
    proxy.remora.wait_log("unknown.key", DEFAULT_TIMEOUT).await;

    // An admin override lets requests through; GET is refused.
    let (code, _) = proxy
        .remora
        .admin_get(&format!("/runtime_modify?{KEY}=100"))
        .await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
    let (code, body) = proxy
        .remora
        .admin_post(&format!("/runtime_modify?{KEY}=100"))
        .await;
    assert_eq!((code, body.as_str()), (StatusCode::OK, "OK\n"));
    wait_value(&proxy.remora, KEY, "100").await;
    let r = runtime_json(&proxy.remora).await;
    assert_eq!(r["entries"][KEY]["layer_values"], json!(["0", "100"]));
    crate::harness::within(DEFAULT_TIMEOUT, "requests pass", async {
        while status(proxy.addr).await != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(proxy.stat("runtime.admin_overrides_active").await, 1);

    // An empty value removes the override: the static layer's 0 applies again.
    let (code, _) = proxy.remora.admin_post(&format!("/runtime_modify?{KEY}=")).await;
    assert_eq!(code, StatusCode::OK);
    wait_value(&proxy.remora, KEY, "0").await;
    crate::harness::within(DEFAULT_TIMEOUT, "requests overflow again", async {
        while status(proxy.addr).await != StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(proxy.stat("runtime.admin_overrides_active").await, 0);
    let (code, body) = proxy.remora.admin_post("/runtime_modify").await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");

    // The parameters may come as a form body instead.
    let reply = proxy
        .remora
        .admin_client()
        .post(
            "/runtime_modify",
            &[("content-type", "application/x-www-form-urlencoded")],
            format!("{KEY}=7&note=a%20b"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    wait_value(&proxy.remora, KEY, "7").await;
    assert_eq!(
        runtime_json(&proxy.remora).await["entries"]["note"]["final_value"],
        "a b"
    );
}

#[tokio::test]
async fn without_an_admin_layer_runtime_modify_answers_503() {
    let up = Upstream::start("a").await;
    let layers = json!([{"name": "s", "static_layer": {"a": 1}}]);
    let proxy = Proxy::start(&with_layers(&up, layers, vec![]), &[]).await;
    let (code, body) = proxy.remora.admin_post("/runtime_modify?a=2").await;
    assert_eq!(
        (code, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "No admin layer specified")
    );
    assert_eq!(status(proxy.addr).await, StatusCode::OK);
}

#[tokio::test]
async fn disk_layer_follows_a_symlink_swap() {
    let up = Upstream::start("a").await;
    let dir = TempDir::new();
    let tree = |name: &str, value: &str| {
        let d = dir.path().join(name).join("envoy/circuit_breakers/svc/default");
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir: {e}"));
        std::fs::write(d.join("max_requests"), format!("# the breaker\n{value}\n"))
            .unwrap_or_else(|e| panic!("write: {e}"));
    };
    tree("v1", "0");
    tree("v2", "50");
    let current = dir.path().join("current");
    std::os::unix::fs::symlink(dir.path().join("v1"), &current).unwrap_or_else(|e| panic!("symlink: {e}"));
    let layers =
        json!([{"name": "disk_layer_0", "disk_layer": {"symlink_root": current, "subdirectory": "envoy"}}]);
    let proxy = Proxy::start(&with_layers(&up, layers, vec![]), &[]).await;
    assert_eq!(status(proxy.addr).await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        runtime_json(&proxy.remora).await["entries"][KEY]["final_value"],
        "0"
    );
    let loads = proxy.stat("runtime.load_success").await;

    // `ln -s v2 new && mv -Tf new current`.
    let new = dir.path().join("new");
    std::os::unix::fs::symlink(dir.path().join("v2"), &new).unwrap_or_else(|e| panic!("symlink: {e}"));
    std::fs::rename(&new, &current).unwrap_or_else(|e| panic!("rename: {e}"));
    proxy
        .remora
        .wait_stat("runtime.load_success", |v| v > loads, DEFAULT_TIMEOUT)
        .await;
    wait_value(&proxy.remora, KEY, "50").await;
    crate::harness::within(DEFAULT_TIMEOUT, "requests pass", async {
        while status(proxy.addr).await != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

fn runtime_resource(name: &str, layer: Value) -> Value {
    json!({"name": name, "layer": layer})
}

/// RTDS on the ADS stream (`api_type`) or on its own `RuntimeDiscoveryService` stream.
async fn rtds_changes_a_value_live_and_nacks_a_bad_layer(api_type: &str, own_stream: bool) {
    let up = Upstream::start("a").await;
    let xds = XdsServer::start().await;
    xds.set(
        hx::RUNTIME,
        vec![runtime_resource(
            "rt",
            json!({"circuit_breakers": {"svc": {"default": {"max_requests": 100}}}}),
        )],
    );
    let source = if own_stream {
        json!({"resource_api_version": "V3", "api_config_source": {"api_type": api_type,
            "transport_api_version": "V3", "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}})
    } else {
        json!({"ads": {}, "resource_api_version": "V3"})
    };
    let layers = json!([
        {"name": "base", "static_layer": {KEY: 0}},
        {"name": "rtds", "rtds_layer": {"name": "rt", "rtds_config": source}},
    ]);
    let mut b = with_layers(&up, layers, vec![h2_cluster("xds", &[xds.addr()])]);
    if !own_stream {
        b["dynamic_resources"] = json!({"ads_config": {"api_type": api_type, "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}});
    }
    let proxy = Proxy::start(&b, &[]).await;
    // The RTDS layer (100) overrides the static one (0).
    assert_eq!(status(proxy.addr).await, StatusCode::OK);
    let r = runtime_json(&proxy.remora).await;
    assert_eq!(r["layers"], json!(["base", "rtds"]));
    assert_eq!(r["entries"][KEY]["layer_values"], json!(["0", "100"]));
    assert_eq!(proxy.stat("runtime.update_success").await, 1);
    assert_eq!(proxy.stat("control_plane.connected_state").await, 1);
    if own_stream {
        let path = if api_type == "DELTA_GRPC" {
            "/envoy.service.runtime.v3.RuntimeDiscoveryService/DeltaRuntime"
        } else {
            "/envoy.service.runtime.v3.RuntimeDiscoveryService/StreamRuntime"
        };
        assert_eq!(xds.stream_paths(), [path]);
    }
    // The subscription names the layer's resource.
    let req = xds
        .wait_request("an RTDS request", DEFAULT_TIMEOUT, |r| {
            hx::type_url(r) == hx::RUNTIME
        })
        .await;
    let names = ["resource_names", "resource_names_subscribe"]
        .iter()
        .filter_map(|f| match req.get_field_by_name(f).as_deref() {
            Some(prost_reflect::Value::List(l)) if !l.is_empty() => Some(
                l.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .next();
    assert_eq!(names, Some(vec!["rt".to_owned()]));

    // A new layer arrives: the breaker closes again.
    xds.set(
        hx::RUNTIME,
        vec![runtime_resource(
            "rt",
            json!({"circuit_breakers": {"svc": {"default": {"max_requests": 0}}}}),
        )],
    );
    proxy
        .remora
        .wait_stat("runtime.update_success", |v| v >= 2, DEFAULT_TIMEOUT)
        .await;
    wait_value(&proxy.remora, KEY, "0").await;
    crate::harness::within(DEFAULT_TIMEOUT, "requests overflow", async {
        while status(proxy.addr).await != StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A list is no runtime value: NACKed with the key, and the last good layer stays.
    xds.set(hx::RUNTIME, vec![runtime_resource("rt", json!({"bad": [1, 2]}))]);
    let nack = xds
        .wait_request("an RTDS NACK", DEFAULT_TIMEOUT, |r| {
            hx::type_url(r) == hx::RUNTIME && hx::nack_message(r).is_some()
        })
        .await;
    let detail = hx::nack_message(&nack).unwrap_or_default();
    assert!(detail.contains("Invalid runtime entry value for bad"), "{detail}");
    assert_eq!(proxy.stat("runtime.update_rejected").await, 1);
    assert_eq!(
        runtime_json(&proxy.remora).await["entries"][KEY]["final_value"],
        "0"
    );
}

#[tokio::test]
async fn rtds_over_ads_sotw() {
    rtds_changes_a_value_live_and_nacks_a_bad_layer("GRPC", false).await;
}

#[tokio::test]
async fn rtds_over_ads_delta() {
    rtds_changes_a_value_live_and_nacks_a_bad_layer("DELTA_GRPC", false).await;
}

#[tokio::test]
async fn rtds_on_its_own_delta_stream() {
    rtds_changes_a_value_live_and_nacks_a_bad_layer("DELTA_GRPC", true).await;
}

#[tokio::test]
async fn rtds_on_its_own_sotw_stream() {
    rtds_changes_a_value_live_and_nacks_a_bad_layer("GRPC", true).await;
}

/// The server is not ready until the RTDS layer has arrived (it is part of the initial fetch).
#[tokio::test]
async fn rtds_is_part_of_the_initial_fetch() {
    let up = Upstream::start("a").await;
    let xds = XdsServer::start().await;
    let layers = json!([{"name": "rtds", "rtds_layer": {"name": "rt", "rtds_config": {"ads": {}}}}]);
    let mut b = with_layers(&up, layers, vec![h2_cluster("xds", &[xds.addr()])]);
    b["dynamic_resources"] = json!({"ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}});
    let proxy = Remora::start(&b.to_string(), &[]).await;
    xds.wait_request("an RTDS request", DEFAULT_TIMEOUT, |r| {
        hx::type_url(r) == hx::RUNTIME
    })
    .await;
    let (code, body) = proxy.admin_get("/ready").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    xds.set(hx::RUNTIME, vec![runtime_resource("rt", json!({"x": 1}))]);
    proxy.wait_ready().await;
    assert_eq!(runtime_json(&proxy).await["entries"]["x"]["final_value"], "1");
    let _ = proxy.listener_addr(LISTENER).await;
}

/// RTDS over REST: `DiscoveryRequest`s naming the layer are POSTed to `/v3/discovery:runtime`.
#[tokio::test]
async fn rtds_polled_over_rest() {
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};
    let up = Upstream::start("a").await;
    let cp = Upstream::http1("cp").await;
    // (version, layer) served, and the resource names of every request.
    let plane: Arc<Mutex<(u64, Value, Vec<Value>)>> =
        Arc::new(Mutex::new((1, json!({KEY: 100}), Vec::new())));
    cp.set_handler({
        let plane = plane.clone();
        move |req: http::Request<hyper::body::Incoming>| {
            let plane = plane.clone();
            async move {
                let path = req.uri().path().to_owned();
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let mut p = plane.lock().unwrap_or_else(|e| e.into_inner());
                p.2.push(request["resource_names"].clone());
                if path != "/v3/discovery:runtime" {
                    return crate::harness::reply(404, "");
                }
                if request["version_info"].as_str() == Some(&p.0.to_string()) {
                    return crate::harness::reply(304, "");
                }
                let resp = json!({"version_info": p.0.to_string(), "type_url": hx::RUNTIME, "resources": [
                    {"@type": hx::RUNTIME, "name": "rt", "layer": p.1}]});
                crate::harness::reply(200, resp.to_string())
            }
        }
    });
    let layers = json!([
        {"name": "base", "static_layer": {KEY: 0}},
        {"name": "rtds", "rtds_layer": {"name": "rt", "rtds_config": {"resource_api_version": "V3",
            "api_config_source": {"api_type": "REST", "transport_api_version": "V3", "cluster_names": ["cp"],
                "refresh_delay": "0.05s"}}}},
    ]);
    let proxy = Proxy::start(&with_layers(&up, layers, vec![cluster("cp", &[cp.addr()])]), &[]).await;
    assert_eq!(status(proxy.addr).await, StatusCode::OK);
    assert_eq!(
        plane.lock().unwrap_or_else(|e| e.into_inner()).2.first(),
        Some(&json!(["rt"]))
    );
    {
        let mut p = plane.lock().unwrap_or_else(|e| e.into_inner());
        p.0 = 2;
        p.1 = json!({KEY: 0});
    }
    wait_value(&proxy.remora, KEY, "0").await;
    crate::harness::within(DEFAULT_TIMEOUT, "requests overflow", async {
        while status(proxy.addr).await != StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// RTDS from a file (`path_config_source`): loaded at start, reloaded on an atomic rename, a bad file rejected.
#[tokio::test]
async fn rtds_from_a_file() {
    let up = Upstream::start("a").await;
    let dir = TempDir::new();
    let file = |version: &str, layer: Value| {
        json!({"version_info": version, "resources": [{"@type": hx::RUNTIME, "name": "rt", "layer": layer}]})
            .to_string()
    };
    let write = |contents: &str| {
        let tmp = dir.write(".rtds.json.tmp", contents);
        std::fs::rename(&tmp, dir.path().join("rtds.json")).unwrap_or_else(|e| panic!("rename: {e}"));
    };
    write(&file("1", json!({KEY: 100})));
    let layers = json!([
        {"name": "base", "static_layer": {KEY: 0}},
        {"name": "rtds", "rtds_layer": {"name": "rt", "rtds_config": {"path_config_source": {
            "path": dir.path().join("rtds.json")}}}},
    ]);
    let proxy = Proxy::start(&with_layers(&up, layers, vec![]), &[]).await;
    assert_eq!(status(proxy.addr).await, StatusCode::OK);
    assert_eq!(proxy.stat("runtime.update_success").await, 1);

    write(&file("2", json!({KEY: 0})));
    wait_value(&proxy.remora, KEY, "0").await;
    crate::harness::within(DEFAULT_TIMEOUT, "requests overflow", async {
        while status(proxy.addr).await != StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    write(&file("3", json!({"bad": null})));
    proxy
        .remora
        .wait_stat("runtime.update_rejected", |v| v >= 1, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(
        runtime_json(&proxy.remora).await["entries"][KEY]["final_value"],
        "0"
    );
}

#[tokio::test]
async fn what_remora_cannot_do_is_refused_with_its_path() {
    let up = Upstream::start("a").await;
    let cases = [
        (
            json!([{"name": "r", "rtds_layer": {"name": "r", "rtds_config": {"api_config_source": {"api_type": "GRPC",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "nowhere"}}]}}}}]),
            "layered_runtime.layers[0].rtds_layer.rtds_config.api_config_source.grpc_services[0].envoy_grpc.cluster_name: unknown static cluster \"nowhere\"",
        ),
        (
            json!([{"name": "r", "rtds_layer": {"name": "r", "rtds_config": {"ads": {}}}}]),
            "layered_runtime.layers[0].rtds_layer.rtds_config.ads: a config source says ads, but there is no dynamic_resources.ads_config",
        ),
        (
            json!([{"name": "s", "static_layer": {"a": null}}]),
            "layered_runtime.layers[0].static_layer: Invalid runtime entry value for a",
        ),
    ];
    for (layers, want) in cases {
        let (code, _, err) = crate::harness::validate(&with_layers(&up, layers, vec![]).to_string()).await;
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(want), "want {want:?} in {err}");
    }
}

/// `outlier_detection.consecutive_5xx` and `enforcing_consecutive_5xx` from the static layer replace the
/// cluster's settings (5, enforced), and an admin override turns enforcement back on.
#[tokio::test]
async fn outlier_detection_keys_override_the_cluster() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut svc = cluster("svc", &[a.addr(), b.addr()]);
    svc["outlier_detection"] = json!({"consecutive_5xx": 5, "max_ejection_percent": 50, "interval": "60s"});
    let mut boot = bootstrap(
        routes(vec![to_cluster(json!({"prefix": "/"}), "svc")]),
        vec![svc],
        Value::Null,
    );
    boot["layered_runtime"] = json!({"layers": [
        {"name": "static", "static_layer": {"outlier_detection": {"consecutive_5xx": 2, "enforcing_consecutive_5xx": 0}}},
        {"name": "admin", "admin_layer": {}},
    ]});
    let proxy = Proxy::start(&boot, &[]).await;
    let stat = |name: &'static str| {
        let proxy = &proxy;
        async move { proxy.stat(&format!("cluster.svc.outlier_detection.{name}")).await }
    };
    // Round robin over two hosts: four 500s are two in a row on each, the runtime's threshold (not 5).
    for _ in 0..4 {
        assert_eq!(
            proxy.h1().get("/status/500", &[]).await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    assert_eq!(stat("ejections_detected_consecutive_5xx").await, 2);
    assert_eq!(stat("ejections_enforced_consecutive_5xx").await, 0);
    assert_eq!(stat("ejections_active").await, 0);

    // A success on each host ends its run; with enforcement back (the admin layer), the next run ejects.
    for _ in 0..2 {
        assert_eq!(proxy.h1().get("/", &[]).await.status, StatusCode::OK);
    }
    let (code, _) = proxy
        .remora
        .admin_post("/runtime_modify?outlier_detection.enforcing_consecutive_5xx=100")
        .await;
    assert_eq!(code, StatusCode::OK);
    wait_value(
        &proxy.remora,
        "outlier_detection.enforcing_consecutive_5xx",
        "100",
    )
    .await;
    crate::harness::within(DEFAULT_TIMEOUT, "an enforced ejection", async {
        while stat("ejections_enforced_consecutive_5xx").await == 0 {
            let _ = proxy.h1().get("/status/500", &[]).await;
        }
    })
    .await;
    assert_eq!(stat("ejections_active").await, 1);
}
