//! Active health checks (cluster `health_checks`): a host whose checks fail leaves balancing and comes back when
//! they pass again.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use http::StatusCode;
use serde_json::json;

use crate::harness::{echo_response, reply, Upstream, DEFAULT_TIMEOUT};
use crate::support::{bootstrap, cluster, routes, to_cluster, Proxy};

/// An upstream whose `/health` answers 503 while `failing` is set, and echoes everything else.
pub(crate) async fn switchable(name: &'static str) -> (Upstream, Arc<AtomicBool>) {
    let up = Upstream::start(name).await;
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    up.set_handler(move |req| {
        let f = f.clone();
        async move {
            if req.uri().path() == "/health" {
                if f.load(SeqCst) {
                    return reply(503, "down");
                }
                return reply(200, "ok");
            }
            echo_response(req, name).await
        }
    });
    (up, failing)
}

#[tokio::test]
async fn failing_host_leaves_balancing_and_returns() {
    let (a, _) = switchable("a").await;
    let (b, b_failing) = switchable("b").await;
    let mut c = cluster("pair", &[a.addr(), b.addr()]);
    c["health_checks"] = json!([{
        "timeout": "1s",
        "interval": "0.05s",
        "no_traffic_interval": "0.05s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 2,
        "http_health_check": {"path": "/health"},
    }]);
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "pair")]);
    let proxy = Proxy::start(&bootstrap(table, vec![c], serde_json::Value::Null), &[]).await;
    let r = &proxy.remora;
    // The server waits for the first round of checks before it is ready.
    assert_eq!(r.stat("cluster.pair.health_check.healthy").await, 2);
    assert_eq!(r.stat("cluster.pair.membership_healthy").await, 2);

    b_failing.store(true, SeqCst);
    // A status outside expected_statuses ejects at once.
    r.wait_stat("cluster.pair.membership_healthy", |v| v == 1, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(r.stat("cluster.pair.health_check.healthy").await, 1);
    assert!(r.stat("cluster.pair.health_check.failure").await >= 1);
    let (_, clusters) = r.admin_get("/clusters").await;
    let b_flags = format!("pair::{}::health_flags::/failed_active_hc", b.addr());
    assert!(clusters.contains(&b_flags), "{clusters}");
    let before = b.requests();
    let client = proxy.h1();
    for _ in 0..20 {
        let resp = client.get("/", &[]).await;
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.header("x-upstream"), Some("a"));
    }
    // Only health checks reached b.
    assert!(b.requests() >= before);

    b_failing.store(false, SeqCst);
    // healthy_threshold (2) successes in a row bring it back.
    r.wait_stat("cluster.pair.membership_healthy", |v| v == 2, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(r.stat("cluster.pair.health_check.healthy").await, 2);
    let mut seen_b = false;
    for _ in 0..10 {
        seen_b |= client.get("/", &[]).await.header("x-upstream") == Some("b");
    }
    assert!(seen_b, "b did not take traffic again");
    let (_, clusters) = r.admin_get("/clusters").await;
    assert!(!clusters.contains("/failed_active_hc"), "{clusters}");
}

/// Remora's `envoy.filters.http.health_check` answers checks of it; `/healthcheck/fail` makes another proxy's
/// check of it fail, and `/healthcheck/ok` brings it back.
#[tokio::test]
async fn healthcheck_fail_fails_other_proxies_checks() {
    let origin = Upstream::start("origin").await;
    let filters = json!({"http_filters": [
        {"name": "envoy.filters.http.health_check", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
            "pass_through_mode": false,
            "headers": [{"name": ":path", "string_match": {"exact": "/healthz"}}],
        }},
        {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
    ]});
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "origin")]);
    let checked = Proxy::start(
        &bootstrap(table, vec![cluster("origin", &[origin.addr()])], filters),
        &[],
    )
    .await;
    let client = checked.h1();
    let ok = client.get("/healthz", &[]).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(origin.requests(), 0, "a health check reached the origin");
    assert_eq!(client.get("/other", &[]).await.status, StatusCode::OK);

    // A second proxy health-checks the first.
    let mut c = cluster("front", &[checked.addr]);
    // Without this, a one-host cluster whose host fails is in panic and still sends it traffic (as Envoy).
    c["common_lb_config"] = json!({"healthy_panic_threshold": {"value": 0}});
    c["health_checks"] = json!([{
        "timeout": "1s",
        "interval": "0.05s",
        "no_traffic_interval": "0.05s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "http_health_check": {"path": "/healthz"},
    }]);
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "front")]);
    let checker = Proxy::start(&bootstrap(table, vec![c], serde_json::Value::Null), &[]).await;
    let r = &checker.remora;
    assert_eq!(r.stat("cluster.front.membership_healthy").await, 1);

    checked.remora.admin_post("/healthcheck/fail").await;
    let failed = client.get("/healthz", &[]).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.header("x-envoy-immediate-health-check-fail"), Some("true"));
    // Proxied responses say so too, for a downstream Envoy.
    let proxied = client.get("/other", &[]).await;
    assert_eq!(proxied.status, StatusCode::OK);
    assert_eq!(
        proxied.header("x-envoy-immediate-health-check-fail"),
        Some("true")
    );
    r.wait_stat("cluster.front.membership_healthy", |v| v == 0, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(
        checker.h1().get("/", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    checked.remora.admin_post("/healthcheck/ok").await;
    r.wait_stat("cluster.front.membership_healthy", |v| v == 1, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(checker.h1().get("/", &[]).await.status, StatusCode::OK);
}

/// Priorities with active health checks: while priority 0's only host fails its checks (made on the port
/// `health_check_config.port_value` names), priority 1 takes the traffic; it comes back when they pass.
#[tokio::test]
async fn failover_to_priority_1_follows_health_checks_on_the_health_check_port() {
    let primary = Upstream::start("primary").await;
    let (health, failing) = switchable("health").await;
    let backup = Upstream::start("backup").await;
    let ep = |addr: std::net::SocketAddr, hc_port: Option<u16>| {
        let mut e = json!({"address": {"socket_address": {
            "address": addr.ip().to_string(), "port_value": addr.port()}}});
        if let Some(p) = hc_port {
            e["health_check_config"] = json!({"port_value": p});
        }
        json!({"endpoint": e})
    };
    let c = json!({
        "name": "tiered",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "tiered", "endpoints": [
            {"priority": 0, "lb_endpoints": [ep(primary.addr(), Some(health.port()))]},
            {"priority": 1, "lb_endpoints": [ep(backup.addr(), Some(backup.port()))]},
        ]},
        "health_checks": [{
            "timeout": "1s",
            "interval": "0.05s",
            "no_traffic_interval": "0.05s",
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "http_health_check": {"path": "/health"},
        }],
    });
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "tiered")]);
    let proxy = Proxy::start(&bootstrap(table, vec![c], serde_json::Value::Null), &[]).await;
    let r = &proxy.remora;
    let client = proxy.h1();
    let upstream_of =
        |reply: crate::harness::Reply| reply.header("x-upstream").unwrap_or_default().to_owned();
    for _ in 0..5 {
        assert_eq!(upstream_of(client.get("/", &[]).await), "primary");
    }
    // Checks of the primary go to the health port, not to the primary itself.
    assert_eq!(primary.requests(), 5);

    failing.store(true, SeqCst);
    r.wait_stat("cluster.tiered.membership_healthy", |v| v == 1, DEFAULT_TIMEOUT)
        .await;
    for _ in 0..5 {
        assert_eq!(upstream_of(client.get("/", &[]).await), "backup");
    }

    failing.store(false, SeqCst);
    r.wait_stat("cluster.tiered.membership_healthy", |v| v == 2, DEFAULT_TIMEOUT)
        .await;
    for _ in 0..5 {
        assert_eq!(upstream_of(client.get("/", &[]).await), "primary");
    }
}

/// An origin on `ip` (port `port`, or any) whose `/health` waits until `open` is true, and echoes the rest.
async fn gated(name: &'static str, ip: [u8; 4], port: u16) -> (Upstream, tokio::sync::watch::Sender<bool>) {
    let up = if port == 0 {
        crate::dns::origin_on(name, ip).await
    } else {
        crate::dns::origin_on_port(name, ip, port).await
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    up.set_handler(move |req| {
        let mut rx = rx.clone();
        async move {
            if req.uri().path() == "/health" {
                let _ = rx.wait_for(|open| *open).await;
                return reply(200, "ok");
            }
            echo_response(req, name).await
        }
    });
    (up, tx)
}

/// Requests (of 40) that reached `b`.
async fn to_b(proxy: &Proxy) -> usize {
    let client = proxy.h1();
    let mut n = 0;
    for _ in 0..40 {
        let r = client.get("/", &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        n += usize::from(r.header("x-upstream") == Some("b"));
    }
    n
}

/// `common_lb_config.ignore_new_hosts_until_first_hc`: a host that DNS adds to a health-checked cluster is
/// excluded (`membership_excluded`, `/pending_active_hc`) until its first check completes, so it neither
/// counts towards the panic threshold nor takes traffic. Without the setting it counts as an unhealthy host:
/// with a 60% threshold, one healthy host of two is panic and the new host takes traffic unchecked.
#[tokio::test]
async fn new_hosts_wait_for_their_first_check_with_ignore_new_hosts_until_first_hc() {
    for ignore in [true, false] {
        let dns = crate::harness::DnsServer::start().await;
        let (a, open_a) = gated("a", [127, 0, 0, 21], 0).await;
        let (_b, open_b) = gated("b", [127, 0, 0, 22], a.port()).await;
        open_a.send_replace(true);
        dns.set("svc.test", &[std::net::IpAddr::from([127, 0, 0, 21])]);
        let mut c = crate::dns::dns_cluster("STRICT_DNS", "svc.test", a.port(), dns.addr());
        c["health_checks"] = json!([{
            "timeout": "10s",
            "interval": "0.05s",
            "no_traffic_interval": "0.05s",
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "http_health_check": {"path": "/health"},
        }]);
        c["common_lb_config"] = json!({
            "ignore_new_hosts_until_first_hc": ignore,
            "healthy_panic_threshold": {"value": 60},
        });
        let table = routes(vec![to_cluster(json!({"prefix": "/"}), "svc")]);
        let proxy = Proxy::start(&bootstrap(table, vec![c], serde_json::Value::Null), &[]).await;
        let r = &proxy.remora;
        assert_eq!(r.stat("cluster.svc.membership_healthy").await, 1);

        dns.set(
            "svc.test",
            &[
                std::net::IpAddr::from([127, 0, 0, 21]),
                std::net::IpAddr::from([127, 0, 0, 22]),
            ],
        );
        r.wait_stat("cluster.svc.membership_total", |v| v == 2, DEFAULT_TIMEOUT)
            .await;
        let (_, clusters) = r.admin_get("/clusters").await;
        let pending = clusters.contains("/pending_active_hc");
        if ignore {
            assert_eq!(r.stat("cluster.svc.membership_excluded").await, 1);
            assert!(pending, "{clusters}");
            assert_eq!(
                to_b(&proxy).await,
                0,
                "a host pending its first check took traffic"
            );
            assert_eq!(r.stat("cluster.svc.lb_healthy_panic").await, 0);
        } else {
            assert_eq!(r.stat("cluster.svc.membership_excluded").await, 0);
            assert!(!pending, "{clusters}");
            assert!(
                to_b(&proxy).await > 0,
                "the unchecked host should take traffic in panic"
            );
            assert!(r.stat("cluster.svc.lb_healthy_panic").await > 0);
        }

        // The first check passes: the host is healthy and takes traffic.
        open_b.send_replace(true);
        r.wait_stat("cluster.svc.membership_healthy", |v| v == 2, DEFAULT_TIMEOUT)
            .await;
        assert_eq!(r.stat("cluster.svc.membership_excluded").await, 0);
        assert!(to_b(&proxy).await > 0);
    }
}

/// An EDS cluster over ADS on `addrs`, health-checked every 50 ms on `/health`, with `extra` fields.
fn eds_checked(name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({
        "name": name,
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
        "health_checks": [{
            "timeout": "1s",
            "interval": "0.05s",
            "no_traffic_interval": "0.05s",
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "http_health_check": {"path": "/health"},
        }],
    });
    if let serde_json::Value::Object(m) = extra {
        for (k, v) in m {
            c[k] = v;
        }
    }
    c
}

fn assignment(name: &str, addrs: &[std::net::SocketAddr]) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = addrs
        .iter()
        .map(|a| json!({"endpoint": {"address": {"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}}}))
        .collect();
    json!({"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]})
}

/// Envoy's default (`ignore_health_on_host_removal` unset): a host EDS removes stays, `/pending_dynamic_removal`,
/// taking traffic while it passes its active checks, and leaves when it fails one; with the flag set it leaves
/// at once.
#[tokio::test]
async fn a_host_removed_by_eds_stays_until_it_fails_its_health_check() {
    use crate::harness::xds as hx;
    let (a, _) = switchable("a").await;
    let (b, b_failing) = switchable("b").await;
    let xds = crate::harness::XdsServer::start().await;
    xds.set(
        hx::ENDPOINT,
        vec![
            assignment("keep", &[a.addr(), b.addr()]),
            assignment("drop", &[a.addr(), b.addr()]),
        ],
    );
    let table = routes(vec![
        json!({"match": {"prefix": "/keep/"}, "route": {"cluster": "keep"}}),
        json!({"match": {"prefix": "/drop/"}, "route": {"cluster": "drop"}}),
    ]);
    let clusters = vec![
        crate::support::h2_cluster("xds", &[xds.addr()]),
        eds_checked("keep", serde_json::Value::Null),
        eds_checked("drop", json!({"ignore_health_on_host_removal": true})),
    ];
    let mut config = bootstrap(table, clusters, serde_json::Value::Null);
    config["node"] = json!({"id": "n1", "cluster": "c1"});
    config["dynamic_resources"] = json!({"ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}});
    let proxy = Proxy::start(&config, &[]).await;
    let r = &proxy.remora;
    for c in ["keep", "drop"] {
        r.wait_stat(
            &format!("cluster.{c}.membership_healthy"),
            |v| v == 2,
            DEFAULT_TIMEOUT,
        )
        .await;
    }

    // EDS removes b from both.
    xds.set(
        hx::ENDPOINT,
        vec![assignment("keep", &[a.addr()]), assignment("drop", &[a.addr()])],
    );
    r.wait_stat("cluster.drop.membership_total", |v| v == 1, DEFAULT_TIMEOUT)
        .await;
    r.wait_stat("cluster.keep.update_success", |v| v >= 2, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(r.stat("cluster.keep.membership_total").await, 2);
    assert_eq!(r.stat("cluster.keep.membership_healthy").await, 2);
    let (_, listing) = r.admin_get("/clusters").await;
    let pending = format!("keep::{}::health_flags::/pending_dynamic_removal", b.addr());
    assert!(listing.contains(&pending), "{listing}");
    assert!(!listing.contains(&format!("drop::{}::", b.addr())), "{listing}");
    // b still takes keep's traffic (round robin over two hosts), and none of drop's.
    let client = proxy.h1();
    let mut keep_b = 0;
    for _ in 0..6 {
        let resp = client.get("/keep/x", &[]).await;
        assert_eq!(resp.status, StatusCode::OK);
        keep_b += usize::from(resp.header("x-upstream") == Some("b"));
        assert_eq!(client.get("/drop/x", &[]).await.header("x-upstream"), Some("a"));
    }
    assert!(keep_b > 0, "b took none of keep's requests");

    // Its check fails: it leaves.
    b_failing.store(true, SeqCst);
    r.wait_stat("cluster.keep.membership_total", |v| v == 1, DEFAULT_TIMEOUT)
        .await;
    let (_, listing) = r.admin_get("/clusters").await;
    assert!(!listing.contains(&format!("keep::{}::", b.addr())), "{listing}");
    for _ in 0..4 {
        assert_eq!(client.get("/keep/x", &[]).await.header("x-upstream"), Some("a"));
    }
}

/// `grpc_health_check` (as Envoy Gateway emits it for a gRPC backend): `grpc.health.v1.Health/Check` over h2c
/// with the service name and authority; a NOT_SERVING host leaves balancing at once and comes back once it
/// serves again.
#[tokio::test]
async fn grpc_health_checks_follow_the_serving_status() {
    use crate::harness::{GrpcClient, GrpcUpstream};
    let a = GrpcUpstream::start("a").await;
    let b = GrpcUpstream::start("b").await;
    let mut c = crate::support::h2_cluster("grpc", &[a.addr(), b.addr()]);
    c["health_checks"] = json!([{
        "timeout": "1s",
        "interval": "0.05s",
        "no_traffic_interval": "0.05s",
        "unhealthy_threshold": 3,
        "healthy_threshold": 2,
        "grpc_health_check": {"service_name": "my-service", "authority": "hc.example"},
    }]);
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "grpc")]);
    let proxy = Proxy::start(&bootstrap(table, vec![c], serde_json::Value::Null), &[]).await;
    let r = &proxy.remora;
    assert_eq!(r.stat("cluster.grpc.health_check.healthy").await, 2);
    let checks = a.health_checks();
    assert!(!checks.is_empty());
    assert!(
        checks
            .iter()
            .all(|(s, auth)| s == "my-service" && auth == "hc.example"),
        "{checks:?}"
    );

    b.set_serving(false);
    // NOT_SERVING is an active failure: ejected at once.
    r.wait_stat("cluster.grpc.membership_healthy", |v| v == 1, DEFAULT_TIMEOUT)
        .await;
    let (_, clusters) = r.admin_get("/clusters").await;
    assert!(
        clusters.contains(&format!("grpc::{}::health_flags::/failed_active_hc", b.addr())),
        "{clusters}"
    );
    let client = GrpcClient::connect(proxy.addr).await;
    for i in 0..6 {
        let out = client.echo(&format!("m{i}")).await;
        assert_eq!(out.upstream(), Some("a"), "{:?}", out.result);
    }

    b.set_serving(true);
    r.wait_stat("cluster.grpc.membership_healthy", |v| v == 2, DEFAULT_TIMEOUT)
        .await;
    let mut seen_b = false;
    for i in 0..6 {
        seen_b |= client.echo(&format!("n{i}")).await.upstream() == Some("b");
    }
    assert!(seen_b, "b did not take traffic again");
}

/// The HTTP check Envoy Gateway emits (`POST /healthz` sending `ping`, expecting `pong` in the body, statuses
/// `[200, 202)` healthy and `[429, 430)`, `[503, 504)` retriable) against an origin that checks what it gets,
/// with the endpoint's `health_check_config.hostname` as the check's `host`: a status neither expected nor
/// retriable ejects at once, 201 is healthy again, a retriable status counts toward `unhealthy_threshold`. A
/// failed host is checked again only after `unhealthy_interval` (5 s), so the failure counts are exact.
#[tokio::test]
async fn envoy_gateways_http_health_check() {
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicU16;
    use std::sync::Mutex;
    let up = Upstream::start("eg").await;
    let status = Arc::new(AtomicU16::new(200));
    // Each check's method, host and body.
    type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;
    let seen: Seen = Arc::default();
    {
        let (status, seen) = (status.clone(), seen.clone());
        up.set_handler(move |req| {
            let (status, seen) = (status.clone(), seen.clone());
            async move {
                if req.uri().path() != "/healthz" {
                    return echo_response(req, "eg").await;
                }
                let method = req.method().to_string();
                let host = req
                    .headers()
                    .get("host")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes().to_vec())
                    .unwrap_or_default();
                let ok = method == "POST" && body == b"ping";
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((method, host, body));
                if !ok {
                    return reply(400, "bad check");
                }
                reply(status.load(SeqCst), "ok pong")
            }
        });
    }
    let addr = up.addr();
    let c = json!({
        "name": "eg",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "eg", "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}},
            "health_check_config": {"hostname": "example.com"},
        }}]}]},
        "health_checks": [{
            "timeout": "1s",
            "interval": "0.05s",
            "no_traffic_interval": "0.05s",
            "unhealthy_interval": "5s",
            "unhealthy_edge_interval": "0.05s",
            "healthy_threshold": 1,
            "unhealthy_threshold": 3,
            "http_health_check": {
                "host": "*",
                "method": "POST",
                "path": "/healthz",
                "send": {"binary": "cGluZw=="},
                "receive": [{"binary": "cG9uZw=="}],
                "expected_statuses": [{"start": "200", "end": "202"}],
                "retriable_statuses": [{"start": "429", "end": "430"}, {"start": "503", "end": "504"}],
            },
        }],
    });
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "eg")]);
    let proxy = Proxy::start(&bootstrap(table, vec![c], serde_json::Value::Null), &[]).await;
    let r = &proxy.remora;
    assert_eq!(r.stat("cluster.eg.health_check.healthy").await, 1);
    {
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        let (method, host, body) = &seen[0];
        assert_eq!(
            (method.as_str(), host.as_str(), body.as_slice()),
            ("POST", "example.com", &b"ping"[..])
        );
    }

    // The cluster has carried traffic: the intervals are the ones with traffic.
    assert_eq!(proxy.h1().get("/", &[]).await.status, StatusCode::OK);

    // 500 is neither expected nor retriable: failed on the first one.
    let failures = r.stat("cluster.eg.health_check.failure").await;
    status.store(500, SeqCst);
    r.wait_stat("cluster.eg.membership_healthy", |v| v == 0, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(r.stat("cluster.eg.health_check.failure").await - failures, 1);
    // 201 is expected: healthy again (healthy_threshold 1) at the next check.
    status.store(201, SeqCst);
    r.wait_stat("cluster.eg.membership_healthy", |v| v == 1, DEFAULT_TIMEOUT)
        .await;
    // 503 is retriable: three in a row (unhealthy_threshold) before the host is failed.
    let failures = r.stat("cluster.eg.health_check.failure").await;
    status.store(503, SeqCst);
    r.wait_stat("cluster.eg.membership_healthy", |v| v == 0, DEFAULT_TIMEOUT)
        .await;
    assert_eq!(r.stat("cluster.eg.health_check.failure").await - failures, 3);
}

/// A `STRICT_DNS` cluster updates its membership as EDS does: an address DNS stops returning stays,
/// `/pending_dynamic_removal`, while its checks pass (later answers without it are no change), and leaves when
/// one fails.
#[tokio::test]
async fn an_address_dns_drops_stays_until_it_fails_its_health_check() {
    let dns = crate::harness::DnsServer::start().await;
    let (a, open_a) = gated("a", [127, 0, 0, 31], 0).await;
    let (b, open_b) = gated("b", [127, 0, 0, 32], a.port()).await;
    open_a.send_replace(true);
    open_b.send_replace(true);
    let (ip_a, ip_b) = (
        std::net::IpAddr::from([127, 0, 0, 31]),
        std::net::IpAddr::from([127, 0, 0, 32]),
    );
    dns.set("svc.test", &[ip_a, ip_b]);
    let mut c = crate::dns::dns_cluster("STRICT_DNS", "svc.test", a.port(), dns.addr());
    c["dns_refresh_rate"] = json!("0.05s");
    c["health_checks"] = json!([{
        "timeout": "0.2s",
        "interval": "0.05s",
        "no_traffic_interval": "0.05s",
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
        "http_health_check": {"path": "/health"},
    }]);
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "svc")]);
    let proxy = Proxy::start(&bootstrap(table, vec![c], serde_json::Value::Null), &[]).await;
    let r = &proxy.remora;
    r.wait_stat("cluster.svc.membership_healthy", |v| v == 2, DEFAULT_TIMEOUT)
        .await;

    dns.set("svc.test", &[ip_a]);
    let changes = r.stat("cluster.svc.membership_change").await;
    let rebuilds = r.stat("cluster.svc.update_no_rebuild").await;
    // Two more answers without b: the first keeps it pending, the next is no change.
    r.wait_stat(
        "cluster.svc.update_no_rebuild",
        |v| v >= rebuilds + 2,
        DEFAULT_TIMEOUT,
    )
    .await;
    assert_eq!(r.stat("cluster.svc.membership_total").await, 2);
    assert_eq!(r.stat("cluster.svc.membership_change").await, changes);
    let (_, listing) = r.admin_get("/clusters").await;
    let pending = format!("svc::{}::health_flags::/pending_dynamic_removal", b.addr());
    assert!(listing.contains(&pending), "{listing}");
    assert!(to_b(&proxy).await > 0, "b took no traffic while pending removal");

    // b's checks now hang past their timeout: it fails and leaves.
    open_b.send_replace(false);
    r.wait_stat("cluster.svc.membership_total", |v| v == 1, DEFAULT_TIMEOUT)
        .await;
    let (_, listing) = r.admin_get("/clusters").await;
    assert!(!listing.contains(&format!("svc::{}::", b.addr())), "{listing}");
}
