//! The admin endpoints' formats, as Envoy writes them.

use std::collections::BTreeSet;

use http::StatusCode;
use serde_json::{json, Value};

use crate::harness::Upstream;
use crate::support::{bootstrap, cluster, routes, to_cluster, Proxy};

/// A proxy with cluster `origin` in front of an origin that has answered `requests` requests through it.
async fn world(requests: usize) -> (Upstream, Proxy) {
    let origin = Upstream::start("origin").await;
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "origin")]);
    let proxy = Proxy::start(
        &bootstrap(table, vec![cluster("origin", &[origin.addr()])], Value::Null),
        &[],
    )
    .await;
    let c = proxy.h1();
    for _ in 0..requests {
        assert_eq!(c.get("/", &[]).await.status, StatusCode::OK);
    }
    (origin, proxy)
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The byte offsets of `keys` (as `"key":`) in `text`, to check the order Envoy prints fields in.
fn in_order(text: &str, keys: &[&str]) -> bool {
    let offsets: Vec<Option<usize>> = keys.iter().map(|k| text.find(&format!("\"{k}\":"))).collect();
    offsets.iter().all(Option::is_some) && offsets.windows(2).all(|w| w[0] < w[1])
}

#[tokio::test]
async fn ready_is_live_with_200() {
    let (_origin, proxy) = world(0).await;
    let reply = proxy.remora.admin_client().get("/ready", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "LIVE\n");
    assert_eq!(reply.header("content-type"), Some("text/plain; charset=UTF-8"));
    assert_eq!(reply.header("cache-control"), Some("no-cache, max-age=0"));
    assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test]
async fn server_info_has_envoys_fields_in_order() {
    let (_origin, proxy) = world(0).await;
    let reply = proxy.remora.admin_client().get("/server_info", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let text = reply.text();
    let info = parse(&text);
    assert!(
        in_order(
            &text,
            &[
                "version",
                "state",
                "uptime_current_epoch",
                "uptime_all_epochs",
                "hot_restart_version",
                "command_line_options",
                "node"
            ]
        ),
        "field order: {text}"
    );
    let version = info["version"].as_str().unwrap_or_default();
    assert_eq!(version.split('/').count(), 5, "version {version:?}");
    assert_eq!(info["state"], "LIVE");
    for uptime in ["uptime_current_epoch", "uptime_all_epochs"] {
        let u = info[uptime].as_str().unwrap_or_default();
        assert!(
            u.ends_with('s') && u[..u.len() - 1].parse::<u64>().is_ok(),
            "{uptime}: {u:?}"
        );
    }
    let options = &info["command_line_options"];
    assert_eq!(options["concurrency"], 2);
    assert_eq!(
        options["config_path"].as_str(),
        proxy.remora.config_path().to_str()
    );
    assert_eq!(options["mode"], "Serve");
    assert_eq!(options["drain_time"], "600s");
    assert_eq!(options["parent_shutdown_time"], "900s");
    assert_eq!(options["log_level"], "info");
    assert_eq!(options["base_id"], "0");
    assert_eq!(options["local_address_ip_version"], "v4");
    assert!(info["node"].is_object(), "{text}");
}

#[tokio::test]
async fn config_dump_envelope_lists_static_resources() {
    let (_origin, proxy) = world(0).await;
    let reply = proxy.remora.admin_client().get("/config_dump", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let dump = parse(&reply.text());
    let configs = dump["configs"]
        .as_array()
        .unwrap_or_else(|| panic!("no configs: {dump}"));
    let types: Vec<&str> = configs
        .iter()
        .map(|c| c["@type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        types,
        [
            "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
            "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "type.googleapis.com/envoy.admin.v3.ScopedRoutesConfigDump",
            "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
            "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
        ]
    );
    let bootstrap = &configs[0]["bootstrap"];
    assert!(bootstrap["static_resources"].is_object(), "{bootstrap}");
    assert!(configs[0]["last_updated"].is_string());

    let cluster = &configs[1]["static_clusters"][0];
    assert_eq!(
        cluster["cluster"]["@type"],
        "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    );
    assert_eq!(cluster["cluster"]["name"], "origin");
    assert!(cluster["last_updated"].is_string());

    let listener = &configs[2]["static_listeners"][0];
    assert_eq!(
        listener["listener"]["@type"],
        "type.googleapis.com/envoy.config.listener.v3.Listener"
    );
    assert_eq!(listener["listener"]["name"], "main");

    let route = &configs[4]["static_route_configs"][0];
    assert_eq!(
        route["route_config"]["@type"],
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
    );
    assert_eq!(route["route_config"]["name"], "local");
    assert_eq!(route["route_config"]["virtual_hosts"][0]["domains"], json!(["*"]));
}

#[tokio::test]
async fn clusters_text_has_envoys_lines_for_a_host() {
    let (origin, proxy) = world(1).await;
    let (status, text) = proxy.remora.admin_get("/clusters").await;
    assert_eq!(status, StatusCode::OK);
    let host = format!("origin::{}", origin.addr());
    let lines: BTreeSet<&str> = text.lines().filter(|l| l.starts_with("origin::")).collect();
    let mut want: BTreeSet<String> = [
        "origin::observability_name::origin",
        "origin::default_priority::max_connections::1024",
        "origin::default_priority::max_pending_requests::1024",
        "origin::default_priority::max_requests::1024",
        "origin::default_priority::max_retries::3",
        "origin::high_priority::max_connections::1024",
        "origin::high_priority::max_pending_requests::1024",
        "origin::high_priority::max_requests::1024",
        "origin::high_priority::max_retries::3",
        "origin::added_via_api::false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (stat, value) in [
        ("cx_active", "1"),
        ("cx_connect_fail", "0"),
        ("cx_total", "1"),
        ("rq_active", "0"),
        ("rq_error", "0"),
        ("rq_success", "1"),
        ("rq_timeout", "0"),
        ("rq_total", "1"),
        ("hostname", ""),
        ("health_flags", "healthy"),
        ("weight", "1"),
        ("region", ""),
        ("zone", ""),
        ("sub_zone", ""),
        ("canary", "false"),
        ("priority", "0"),
        ("success_rate", "-1"),
        ("local_origin_success_rate", "-1"),
    ] {
        want.insert(format!("{host}::{stat}::{value}"));
    }
    let got: BTreeSet<String> = lines.iter().map(|s| s.to_string()).collect();
    assert_eq!(got, want, "/clusters:\n{text}");
    // Host stats are printed sorted by name, before the host's other lines.
    let order: Vec<&str> = text.lines().filter(|l| l.starts_with(&host)).collect();
    assert!(
        order[0].ends_with("cx_active::1") && order[7].ends_with("rq_total::1"),
        "{order:#?}"
    );
}

#[tokio::test]
async fn clusters_json_has_statuses_and_host_stats() {
    let (origin, proxy) = world(2).await;
    let (status, text) = proxy.remora.admin_get("/clusters?format=json").await;
    assert_eq!(status, StatusCode::OK);
    let json = parse(&text);
    let cluster = &json["cluster_statuses"][0];
    assert_eq!(cluster["name"], "origin");
    assert_eq!(cluster["circuit_breakers"]["thresholds"][1]["priority"], "HIGH");
    let host = &cluster["host_statuses"][0];
    assert_eq!(host["address"]["socket_address"]["address"], "127.0.0.1");
    assert_eq!(host["address"]["socket_address"]["port_value"], origin.port());
    assert_eq!(host["health_status"]["eds_health_status"], "HEALTHY");
    let stats = host["stats"]
        .as_array()
        .unwrap_or_else(|| panic!("no stats: {host}"));
    let rq_total = stats
        .iter()
        .find(|s| s["name"] == "rq_total")
        .unwrap_or_else(|| panic!("{stats:?}"));
    assert_eq!(rq_total["value"], "2", "uint64 as a string");
    assert_eq!(rq_total["type"], "COUNTER");
}

#[tokio::test]
async fn listeners_text_and_json() {
    let (_origin, proxy) = world(0).await;
    let (status, text) = proxy.remora.admin_get("/listeners").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, format!("main::{}\n", proxy.addr));
    let (status, text) = proxy.remora.admin_get("/listeners?format=json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        crate::harness::parse_listener_addr(&text, "main"),
        Some(proxy.addr)
    );
}

#[tokio::test]
async fn stats_text_json_filter_and_usedonly() {
    let (_origin, proxy) = world(3).await;
    let (status, text) = proxy.remora.admin_get("/stats").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.lines().any(|l| l == "cluster.origin.upstream_rq_total: 3"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "cluster.origin.upstream_rq_200: 3"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "http.ingress.downstream_rq_2xx: 3"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "cluster.origin.upstream_rq_timeout: 0"),
        "{text}"
    );
    // Counters and gauges are sorted by name.
    let names: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("P0(") && !l.ends_with("No recorded values"))
        .filter_map(|l| l.split_once(": ").map(|(n, _)| n))
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "stats are not sorted");

    let (status, json) = proxy.remora.admin_get("/stats?format=json").await;
    assert_eq!(status, StatusCode::OK);
    let json = parse(&json);
    let stats = json["stats"].as_array().unwrap_or_else(|| panic!("{json}"));
    assert!(
        stats
            .iter()
            .any(|s| s["name"] == "cluster.origin.upstream_rq_total" && s["value"] == 3),
        "{json}"
    );

    let (_, filtered) = proxy.remora.admin_get("/stats?filter=upstream_rq_total").await;
    assert!(!filtered.is_empty());
    assert!(
        filtered.lines().all(|l| l.contains("upstream_rq_total")),
        "{filtered}"
    );
    assert!(
        filtered
            .lines()
            .any(|l| l == "cluster.origin.upstream_rq_total: 3"),
        "{filtered}"
    );

    let (_, used) = proxy.remora.admin_get("/stats?usedonly").await;
    assert!(
        used.lines().any(|l| l == "cluster.origin.upstream_rq_total: 3"),
        "{used}"
    );
    assert!(
        !used.contains("cluster.origin.upstream_rq_timeout:"),
        "unused counter listed: {used}"
    );

    let (status, _) = proxy.remora.admin_get("/stats?filter=(").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn stats_prometheus_format() {
    let (_origin, proxy) = world(2).await;
    let (status, text) = proxy.remora.admin_get("/stats/prometheus").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains("# TYPE envoy_cluster_upstream_rq_total counter\n"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "envoy_cluster_upstream_rq_total{envoy_cluster_name=\"origin\"} 2"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| {
            l
            == "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"2\",envoy_cluster_name=\"origin\"} 2"
        }),
        "{text}"
    );
    let (_, same) = proxy.remora.admin_get("/stats?format=prometheus").await;
    assert!(same.contains("# TYPE envoy_cluster_upstream_rq_total counter"));
}

/// A proxy with cluster `payments-canary` and `stats_config`, after two requests.
async fn tagged_world(stats_config: Value) -> (Upstream, Proxy) {
    let origin = Upstream::start("origin").await;
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "payments-canary")]);
    let mut config = bootstrap(
        table,
        vec![cluster("payments-canary", &[origin.addr()])],
        Value::Null,
    );
    config["stats_config"] = stats_config;
    let proxy = Proxy::start(&config, &[]).await;
    let c = proxy.h1();
    for _ in 0..2 {
        assert_eq!(c.get("/", &[]).await.status, StatusCode::OK);
    }
    (origin, proxy)
}

/// `stats_config.stats_tags`: a regex tag (its first group cut from the name) and a fixed tag, next to Envoy's
/// default tags, in both Prometheus endpoints.
#[tokio::test]
async fn stats_tags_become_prometheus_labels() {
    let (_origin, proxy) = tagged_world(json!({"stats_tags": [
        {"tag_name": "track", "regex": "^cluster\\.[^.]*-(canary|stable)\\."},
        {"tag_name": "mesh", "fixed_value": "east"},
    ]}))
    .await;
    for path in ["/stats/prometheus", "/stats?format=prometheus"] {
        let (status, text) = proxy.remora.admin_get(path).await;
        assert_eq!(status, StatusCode::OK);
        for want in [
            "envoy_cluster_upstream_rq_total{mesh=\"east\",envoy_cluster_name=\"payments-canary\",track=\"canary\"} 2",
            "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"2\",mesh=\"east\",envoy_cluster_name=\"payments-canary\",track=\"canary\"} 2",
            "envoy_http_downstream_rq_total{mesh=\"east\",envoy_http_conn_manager_prefix=\"ingress\"} 2",
            "envoy_server_live{mesh=\"east\"} 1",
        ] {
            assert!(text.lines().any(|l| l == want), "{path}: no {want:?} in\n{text}");
        }
    }
}

/// `use_all_default_tags: false` keeps only the defaults that `stats_tags` names.
#[tokio::test]
async fn stats_tags_without_the_defaults() {
    let (_origin, proxy) = tagged_world(json!({
        "use_all_default_tags": false,
        "stats_tags": [{"tag_name": "envoy.cluster_name"}],
    }))
    .await;
    let (_, text) = proxy.remora.admin_get("/stats/prometheus").await;
    for want in [
        "envoy_cluster_upstream_rq_2xx{envoy_cluster_name=\"payments-canary\"} 2",
        "envoy_http_ingress_downstream_rq_total{} 2",
    ] {
        assert!(text.lines().any(|l| l == want), "no {want:?} in\n{text}");
    }
}

/// `stats_matcher`: an excluded stat is not created (absent from every format) while the others count.
#[tokio::test]
async fn stats_matcher_leaves_out_excluded_stats() {
    let (_origin, proxy) = tagged_world(json!({"stats_matcher": {"exclusion_list": {"patterns": [
        {"prefix": "cluster.payments-canary.upstream_rq_time"},
        {"safe_regex": {"regex": ".*_cx_.*"}},
        {"suffix": "_2xx"},
    ]}}}))
    .await;
    let (_, text) = proxy.remora.admin_get("/stats").await;
    assert!(
        text.lines().any(|l| l == "http.ingress.downstream_rq_total: 2"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "cluster.payments-canary.upstream_rq_total: 2"),
        "{text}"
    );
    for gone in ["_2xx", "upstream_rq_time", "_cx_"] {
        assert!(!text.contains(gone), "{gone} was excluded:\n{text}");
    }
    let (_, prom) = proxy.remora.admin_get("/stats/prometheus").await;
    assert!(!prom.contains("envoy_response_code_class=\"2\""), "{prom}");
    assert!(prom.contains("envoy_response_code_class=\"5\""), "{prom}");
}

/// What Envoy refuses in `stats_tags` is refused with Envoy's message and the entry's path; the parts of
/// `stats_config` Remora does not implement are refused by path.
#[tokio::test]
async fn stats_config_refusals() {
    let mut config = bootstrap(routes(vec![]), vec![], Value::Null);
    config["stats_config"] = json!({
        "stats_tags": [
            {"tag_name": "ok", "regex": "(a)"},
            {"tag_name": "no_such_default"},
        ],
        "histogram_bucket_settings": [{"match": {"prefix": "cluster."}, "buckets": [1, 10]}],
    });
    let (code, stdout, stderr) =
        crate::harness::validate(&serde_json::to_string_pretty(&config).unwrap_or_default()).await;
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    for want in [
        "stats_config.stats_tags[1].tag_name: No regex specified for tag specifier and no default regex for name: 'no_such_default'",
        "stats_config.histogram_bucket_settings: not supported by Remora",
    ] {
        assert!(stderr.contains(want), "no {want:?} in\n{stderr}");
    }
    config["stats_config"] = json!({"stats_tags": [{"tag_name": "x", "regex": "+invalid"}]});
    let (code, _, stderr) =
        crate::harness::validate(&serde_json::to_string_pretty(&config).unwrap_or_default()).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("stats_config.stats_tags[0].regex: Invalid regex '+invalid'"),
        "{stderr}"
    );
}

#[tokio::test]
async fn healthcheck_fail_and_ok_flip_readiness() {
    let (_origin, proxy) = world(0).await;
    let r = &proxy.remora;
    assert_eq!(r.admin_post("/healthcheck/fail").await.0, StatusCode::OK);
    assert_eq!(
        r.admin_get("/ready").await,
        (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n".to_owned())
    );
    assert_eq!(parse(&r.admin_get("/server_info").await.1)["state"], "DRAINING");
    // Traffic still flows: failing health checks only tells the load balancers in front.
    assert_eq!(proxy.h1().get("/", &[]).await.status, StatusCode::OK);

    assert_eq!(r.admin_post("/healthcheck/ok").await.0, StatusCode::OK);
    assert_eq!(r.admin_get("/ready").await, (StatusCode::OK, "LIVE\n".to_owned()));
    assert_eq!(parse(&r.admin_get("/server_info").await.1)["state"], "LIVE");
}

#[tokio::test]
async fn mutating_endpoints_refuse_get_with_405() {
    let (_origin, proxy) = world(0).await;
    let r = &proxy.remora;
    for path in [
        "/healthcheck/fail",
        "/healthcheck/ok",
        "/logging",
        "/reset_counters",
        "/drain_listeners",
        "/quitquitquit",
    ] {
        let (status, body) = r.admin_get(path).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "GET {path}");
        assert_eq!(body, "Method GET not allowed, POST required.", "GET {path}");
    }
    // None of them took effect.
    assert_eq!(r.admin_get("/ready").await.0, StatusCode::OK);
    assert_eq!(proxy.h1().get("/", &[]).await.status, StatusCode::OK);
    assert!(r.exit_status().is_none());

    let (status, body) = r.admin_get("/no/such/endpoint").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.starts_with("invalid path. admin commands are:\n"), "{body}");
}

#[tokio::test]
async fn logging_level_changes_with_post() {
    let (_origin, proxy) = world(0).await;
    let (status, body) = proxy.remora.admin_post("/logging?level=debug").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("debug"), "{body}");
    let (_, listing) = proxy.remora.admin_post("/logging").await;
    assert!(listing.contains("debug"), "{listing}");
    let (status, _) = proxy.remora.admin_post("/logging?level=nonsense").await;
    assert_ne!(status, StatusCode::OK);
    let (status, body) = proxy.remora.admin_post("/logging?level=info").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("info"), "{body}");
}

#[tokio::test]
async fn reset_counters_zeroes_counters_only() {
    let (_origin, proxy) = world(2).await;
    let r = &proxy.remora;
    assert_eq!(r.stat("cluster.origin.upstream_rq_total").await, 2);
    assert_eq!(r.admin_post("/reset_counters").await.0, StatusCode::OK);
    assert_eq!(r.stat("cluster.origin.upstream_rq_total").await, 0);
    assert_eq!(r.stat("cluster.origin.upstream_rq_200").await, 0);
    // Gauges keep their value: the client's keep-alive connection is still open.
    assert_eq!(r.stat("cluster.origin.membership_total").await, 1);
    proxy.h1().get("/", &[]).await;
    assert_eq!(r.stat("cluster.origin.upstream_rq_total").await, 1);
}
