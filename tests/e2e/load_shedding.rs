//! The load-shedding HTTP filters through the real binary: local rate limit, admission control, adaptive
//! concurrency. Each test makes the filter's decision deterministic (a bucket that does not refill, an upstream
//! that always fails, a limit that does not move) and checks the reply, the stats and what the upstream saw.

use serde_json::{json, Value};

use crate::harness::{Upstream, DEFAULT_TIMEOUT};
use crate::support::{bootstrap, cluster, routes, Proxy};

const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

fn with_filter(origin: &Upstream, filter: Value, route_extra: Value) -> Value {
    let mut route = json!({"match": {"prefix": "/"}, "route": {"cluster": "origin"}});
    if let Value::Object(extra) = route_extra {
        for (k, v) in extra {
            route[k] = v;
        }
    }
    bootstrap(
        routes(vec![route]),
        vec![cluster("origin", &[origin.addr()])],
        json!({"http_filters": [filter, {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}),
    )
}

fn local_ratelimit(max_tokens: u32) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "rl",
        "token_bucket": {"max_tokens": max_tokens, "tokens_per_fill": 1, "fill_interval": "3600s"},
        "filter_enabled": {"default_value": {"numerator": 100}},
        "filter_enforced": {"default_value": {"numerator": 100}},
        "response_headers_to_add": [{"header": {"key": "x-limited", "value": "yes"}}],
    })
}

#[tokio::test]
async fn local_rate_limit_answers_429_once_the_bucket_is_empty_and_a_route_has_its_own_bucket() {
    let origin = Upstream::start("origin").await;
    let filter = json!({"name": "envoy.filters.http.local_ratelimit", "typed_config": local_ratelimit(2)});
    let per_route = json!({"typed_per_filter_config": {"envoy.filters.http.local_ratelimit": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "route_rl",
        "token_bucket": {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "3600s"},
        "filter_enabled": {"default_value": {"numerator": 100}},
        "filter_enforced": {"default_value": {"numerator": 100}},
    }}});
    let mut config = with_filter(&origin, filter, json!({}));
    // A second route, /own, with its own bucket of one token.
    let own = json!({"match": {"prefix": "/own"}, "route": {"cluster": "origin"}, "typed_per_filter_config": per_route["typed_per_filter_config"]});
    let vh = &mut config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["route_config"]["virtual_hosts"][0]["routes"];
    vh.as_array_mut()
        .unwrap_or_else(|| panic!("routes"))
        .insert(0, own);
    let proxy = Proxy::start(&config, &[]).await;
    let client = proxy.h1();

    assert_eq!(client.get("/a", &[]).await.status, 200);
    assert_eq!(client.get("/a", &[]).await.status, 200);
    let limited = client.get("/a", &[]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(&limited.body[..], b"local_rate_limited");
    assert_eq!(limited.header("x-limited"), Some("yes"));
    assert_eq!(
        origin.requests(),
        2,
        "the limited request never reached the upstream"
    );
    assert_eq!(proxy.stat("rl.http_local_rate_limit.rate_limited").await, 1);
    assert_eq!(proxy.stat("rl.http_local_rate_limit.enforced").await, 1);
    assert_eq!(proxy.stat("rl.http_local_rate_limit.ok").await, 2);

    // The route's own bucket: one request, then 429, whatever the filter's bucket says.
    assert_eq!(client.get("/own", &[]).await.status, 200);
    assert_eq!(client.get("/own", &[]).await.status, 429);
    assert_eq!(proxy.stat("route_rl.http_local_rate_limit.rate_limited").await, 1);
}

#[tokio::test]
async fn admission_control_rejects_locally_when_the_upstream_keeps_failing() {
    let origin = Upstream::start("origin").await;
    let filter = json!({"name": "envoy.filters.http.admission_control", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.admission_control.v3.AdmissionControl",
        "enabled": {"default_value": true},
        "success_criteria": {"http_criteria": {"http_success_status": [{"start": 100, "end": 400}]}},
        "sampling_window": "60s",
        "aggression": {"default_value": 1.0},
        "sr_threshold": {"default_value": {"value": 95.0}},
        "max_rejection_probability": {"default_value": {"value": 99.0}},
    }});
    let config = with_filter(&origin, filter, json!({}));
    let proxy = Proxy::start(&config, &[]).await;
    let client = proxy.h1();
    let offered = 200;
    let mut local = 0;
    for _ in 0..offered {
        let r = client.get("/status/503", &[]).await;
        assert_eq!(r.status, 503);
        if r.header("x-upstream").is_none() {
            local += 1;
        }
    }
    let rejected = proxy.stat("http.ingress.admission_control.rq_rejected").await;
    assert!(
        rejected > offered / 2,
        "with every request failing most are shed: {rejected} of {offered}"
    );
    assert_eq!(rejected, local, "every rejection is a local reply");
    assert_eq!(
        origin.requests() as i64,
        offered - rejected,
        "rejected requests never reached the upstream"
    );
    assert_eq!(
        proxy.stat("http.ingress.admission_control.rq_failure").await,
        offered - rejected
    );
}

#[tokio::test]
async fn adaptive_concurrency_sheds_requests_over_its_limit() {
    let origin = Upstream::start("origin").await;
    // minRTT fixed and a limit that does not move during the test: the limit stays at min_concurrency (3).
    let filter = json!({"name": "envoy.filters.http.adaptive_concurrency", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency",
        "gradient_controller_config": {
            "concurrency_limit_params": {"concurrency_update_interval": "3600s"},
            "min_rtt_calc_params": {"fixed_value": "0.01s", "min_concurrency": 3},
        },
    }});
    let config = with_filter(&origin, filter, json!({}));
    let proxy = Proxy::start(&config, &[]).await;
    let mut calls = Vec::new();
    for _ in 0..10 {
        let client = proxy.h1();
        calls.push(tokio::spawn(async move { client.get("/delay/400", &[]).await }));
    }
    let mut ok = 0;
    let mut shed = 0;
    for c in calls {
        let r = c.await.unwrap_or_else(|e| panic!("call: {e}"));
        match r.status.as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(&r.body[..], b"reached concurrency limit");
                shed += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(ok, 3, "the limit admits min_concurrency requests at once");
    assert_eq!(shed, 7);
    assert_eq!(
        proxy
            .stat("http.ingress.adaptive_concurrency.gradient_controller.rq_blocked")
            .await,
        7
    );
    assert_eq!(
        proxy
            .stat("http.ingress.adaptive_concurrency.gradient_controller.concurrency_limit")
            .await,
        3
    );
}

/// `overload_manager`'s global downstream connection limit (`envoy.resource_monitors.global_downstream_max_connections`):
/// connections over it are closed at once and counted in `downstream_global_cx_overflow` of the listener that
/// refused them; a listener with `ignore_global_conn_limit` neither counts nor is refused; a closed connection
/// gives its place back.
#[tokio::test]
async fn the_global_downstream_connection_limit_closes_what_is_over_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = crate::harness::Upstream::start("app").await;
    let mut config = crate::support::bootstrap(
        crate::support::routes(vec![crate::support::to_cluster(
            serde_json::json!({"prefix": "/"}),
            "app",
        )]),
        vec![crate::support::cluster("app", &[up.addr()])],
        serde_json::Value::Null,
    );
    let mut exempt = config["static_resources"]["listeners"][0].clone();
    exempt["name"] = serde_json::json!("exempt");
    exempt["ignore_global_conn_limit"] = serde_json::json!(true);
    exempt["bypass_overload_manager"] = serde_json::json!(true);
    exempt["stat_prefix"] = serde_json::json!("exempt");
    config["static_resources"]["listeners"][0]["stat_prefix"] = serde_json::json!("limited");
    config["static_resources"]["listeners"]
        .as_array_mut()
        .unwrap()
        .push(exempt);
    config["overload_manager"] = serde_json::json!({
        "refresh_interval": "0.25s",
        "resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": 2,
            },
        }],
    });
    let proxy = crate::support::Proxy::start(&config, &["--concurrency", "1"]).await;
    let limited = proxy.addr;
    let exempt = proxy.remora.listener_addr("exempt").await;
    // Two connections that are served (a request on each proves the proxy took them).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(limited).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(s);
    }
    // The third is closed without an answer.
    let mut third = tokio::net::TcpStream::connect(limited).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = Vec::new();
    let read = crate::harness::within(DEFAULT_TIMEOUT, "the close", third.read_to_end(&mut buf)).await;
    assert!(
        read.is_err() || buf.is_empty(),
        "answered over the limit: {buf:?}"
    );
    assert_eq!(
        proxy.stat("listener.limited.downstream_global_cx_overflow").await,
        1
    );
    // The exempt listener still serves.
    assert_eq!(
        crate::harness::get(exempt, "/", &[]).await.0,
        http::StatusCode::OK
    );
    assert_eq!(
        proxy.stat("listener.exempt.downstream_global_cx_overflow").await,
        0
    );
    // A closed connection gives its place back.
    drop(held.pop());
    proxy
        .remora
        .wait_stat(
            "listener.limited.downstream_cx_active",
            |v| v == 1,
            DEFAULT_TIMEOUT,
        )
        .await;
    assert_eq!(
        crate::harness::get(limited, "/", &[]).await.0,
        http::StatusCode::OK
    );
}
