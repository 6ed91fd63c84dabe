//! Headers the connection manager and router set, keep or remove, as Envoy does.

use serde_json::{json, Value};

use crate::harness::Upstream;
use crate::support::{bootstrap, cluster, routes, to_cluster, Proxy};

async fn world(hcm_extra: Value) -> (Upstream, Proxy) {
    let origin = Upstream::start("origin").await;
    let table = routes(vec![
        json!({"match": {"prefix": "/direct"}, "direct_response": {"status": 200, "body": {"inline_string": "d"}}}),
        to_cluster(json!({"prefix": "/"}), "origin"),
    ]);
    let proxy = Proxy::start(
        &bootstrap(table, vec![cluster("origin", &[origin.addr()])], hcm_extra),
        &[],
    )
    .await;
    (origin, proxy)
}

/// Lower-case UUID version 4: `xxxxxxxx-xxxx-4xxx-[89ab]xxx-xxxxxxxxxxxx`.
fn is_uuid4(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    let hex = |g: &str| {
        g.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    groups.len() == 5
        && [8, 4, 4, 4, 12]
            .iter()
            .zip(&groups)
            .all(|(n, g)| g.len() == *n && hex(g))
        && groups[2].starts_with('4')
        && groups[3].starts_with(['8', '9', 'a', 'b'])
}

#[tokio::test]
async fn request_id_is_generated_when_absent_and_kept_when_present() {
    let (_origin, proxy) = world(Value::Null).await;
    let c = proxy.h1();
    let first = c.get("/", &[]).await.echo();
    let id = first.header("x-request-id").unwrap_or_default().to_owned();
    assert!(is_uuid4(&id), "x-request-id {id:?}");
    let second = c.get("/", &[]).await.echo();
    assert_ne!(second.header("x-request-id"), Some(id.as_str()), "ids are unique");

    let kept = c.get("/", &[("x-request-id", "client-chosen-id")]).await.echo();
    assert_eq!(kept.header_values("x-request-id"), ["client-chosen-id"]);
    let over_h2 = proxy.h2().get("/", &[]).await.echo();
    assert!(is_uuid4(over_h2.header("x-request-id").unwrap_or_default()));
}

#[tokio::test]
async fn edge_proxy_replaces_the_client_request_id() {
    // use_remote_address makes the request an edge request (no address is internal by default), and Envoy
    // then forces a fresh id unless preserve_external_request_id.
    let (_origin, proxy) = world(json!({"use_remote_address": true})).await;
    let echo = proxy
        .h1()
        .get("/", &[("x-request-id", "client-chosen-id")])
        .await
        .echo();
    let id = echo.header("x-request-id").unwrap_or_default();
    assert!(is_uuid4(id), "x-request-id {id:?}");

    let (_origin, proxy) =
        world(json!({"use_remote_address": true, "preserve_external_request_id": true})).await;
    let echo = proxy
        .h1()
        .get("/", &[("x-request-id", "client-chosen-id")])
        .await
        .echo();
    assert_eq!(echo.header("x-request-id"), Some("client-chosen-id"));
}

#[tokio::test]
async fn forwarded_headers_without_use_remote_address() {
    let (_origin, proxy) = world(Value::Null).await;
    let c = proxy.h1();
    let echo = c.get("/", &[]).await.echo();
    assert_eq!(echo.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        echo.header("x-forwarded-for"),
        None,
        "XFF is left alone without use_remote_address"
    );

    let echo = c
        .get(
            "/",
            &[("x-forwarded-proto", "https"), ("x-forwarded-for", "203.0.113.1")],
        )
        .await
        .echo();
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
    assert_eq!(echo.header_values("x-forwarded-for"), ["203.0.113.1"]);
}

#[tokio::test]
async fn forwarded_headers_with_use_remote_address() {
    let (_origin, proxy) = world(json!({"use_remote_address": true})).await;
    let c = proxy.h1();
    // A loopback peer is appended as the proxy's local address, which is 127.0.0.1 here too.
    let echo = c.get("/", &[]).await.echo();
    assert_eq!(echo.header_values("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(echo.header("x-forwarded-proto"), Some("http"));

    let echo = c
        .get(
            "/",
            &[("x-forwarded-for", "203.0.113.1"), ("x-forwarded-proto", "https")],
        )
        .await
        .echo();
    // Appended with "," and no space; XFP overwritten with the real scheme (no trusted hops).
    assert_eq!(echo.header_values("x-forwarded-for"), ["203.0.113.1,127.0.0.1"]);
    assert_eq!(echo.header("x-forwarded-proto"), Some("http"));
}

#[tokio::test]
async fn upstream_service_time_is_on_proxied_responses_only() {
    let (_origin, proxy) = world(Value::Null).await;
    let c = proxy.h1();
    let proxied = c.get("/delay/50", &[]).await;
    let ms: u64 = proxied
        .header("x-envoy-upstream-service-time")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric service time: {:?}", proxied.headers));
    assert!(ms >= 50, "service time {ms} ms for a 50 ms upstream");
    let direct = c.get("/direct", &[]).await;
    assert_eq!(direct.header("x-envoy-upstream-service-time"), None);
}

#[tokio::test]
async fn server_header_is_envoy_by_default_and_server_name_overrides_it() {
    let (origin, proxy) = world(Value::Null).await;
    origin.set_handler(|req| async move {
        let mut response = crate::harness::echo_response(req, "origin").await;
        response
            .headers_mut()
            .insert("server", http::HeaderValue::from_static("origin-server"));
        response
    });
    let c = proxy.h1();
    assert_eq!(c.get("/", &[]).await.header("server"), Some("envoy"));
    assert_eq!(c.get("/direct", &[]).await.header("server"), Some("envoy"));
    assert_eq!(proxy.h2().get("/", &[]).await.header("server"), Some("envoy"));
    assert!(c.get("/", &[]).await.header("date").is_some());

    let (_origin, proxy) = world(json!({"server_name": "remora-test"})).await;
    assert_eq!(
        proxy.h1().get("/", &[]).await.header("server"),
        Some("remora-test")
    );
    assert_eq!(
        proxy
            .h1()
            .get("/nothing-here", &[("host", "x")])
            .await
            .header("server"),
        Some("remora-test")
    );

    let (origin, proxy) = world(json!({"server_header_transformation": "PASS_THROUGH"})).await;
    origin.set_handler(|req| async move {
        let mut response = crate::harness::echo_response(req, "origin").await;
        response
            .headers_mut()
            .insert("server", http::HeaderValue::from_static("origin-server"));
        response
    });
    assert_eq!(
        proxy.h1().get("/", &[]).await.header("server"),
        Some("origin-server")
    );
}

#[tokio::test]
async fn hop_by_hop_and_internal_only_headers_are_not_forwarded() {
    let (origin, proxy) = world(Value::Null).await;
    let echo = proxy
        .h1()
        .get(
            "/",
            &[
                ("connection", "x-custom-hop"),
                ("x-custom-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("x-envoy-internal", "true"),
                ("x-envoy-retry-on", "5xx"),
                ("x-envoy-upstream-rq-timeout-ms", "1"),
                ("x-end-to-end", "kept"),
            ],
        )
        .await
        .echo();
    for gone in [
        "x-custom-hop",
        "keep-alive",
        "proxy-connection",
        "x-envoy-internal",
        "x-envoy-retry-on",
        "x-envoy-upstream-rq-timeout-ms",
    ] {
        assert_eq!(echo.header(gone), None, "{gone} reached the upstream");
    }
    assert_ne!(echo.header("connection"), Some("x-custom-hop"));
    assert_eq!(echo.header("x-end-to-end"), Some("kept"));

    origin.set_handler(|req| async move {
        let mut response = crate::harness::echo_response(req, "origin").await;
        let h = response.headers_mut();
        h.insert("keep-alive", http::HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", http::HeaderValue::from_static("keep-alive"));
        h.insert("x-response-end-to-end", http::HeaderValue::from_static("kept"));
        response
    });
    let reply = proxy.h1().get("/", &[]).await;
    assert_eq!(reply.header("keep-alive"), None);
    assert_eq!(reply.header("proxy-connection"), None);
    assert_eq!(reply.header("x-response-end-to-end"), Some("kept"));
}

#[tokio::test]
async fn router_suppress_envoy_headers_leaves_out_the_routers_x_envoy_headers() {
    let origin = Upstream::start("origin").await;
    let table = routes(vec![
        json!({"match": {"prefix": "/api/"}, "route": {"cluster": "origin", "prefix_rewrite": "/",
            "timeout": "2s"}}),
        json!({"match": {"prefix": "/full/"}, "route": {"cluster": "full"}}),
        json!({"match": {"prefix": "/"}, "route": {"cluster": "origin"},
            "request_headers_to_add": [{"header": {"key": "x-envoy-by-config", "value": "kept"}}]}),
    ]);
    let mut full = cluster("full", &[origin.addr()]);
    full["circuit_breakers"] = json!({"thresholds": [{"max_requests": 0}]});
    let router = |suppress: bool| {
        json!({"http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            "suppress_envoy_headers": suppress}}]})
    };
    for suppress in [false, true] {
        let proxy = Proxy::start(
            &bootstrap(
                table.clone(),
                vec![cluster("origin", &[origin.addr()]), full.clone()],
                router(suppress),
            ),
            &[],
        )
        .await;
        let c = proxy.h1();
        let reply = c.get("/api/items?q=1", &[]).await;
        assert_eq!(reply.status, http::StatusCode::OK);
        assert_eq!(
            reply.header("x-envoy-upstream-service-time").is_some(),
            !suppress,
            "suppress {suppress}: {:?}",
            reply.headers
        );
        let echo = reply.echo();
        assert_eq!(echo.path, "/items?q=1");
        let (original_path, expected_timeout) = if suppress {
            (None, None)
        } else {
            (Some("/api/items?q=1"), Some("2000"))
        };
        assert_eq!(echo.header("x-envoy-original-path"), original_path);
        assert_eq!(echo.header("x-envoy-expected-rq-timeout-ms"), expected_timeout);

        // Configured x-envoy-* headers are not the router's own: they stay.
        let echo = c.get("/", &[]).await.echo();
        assert_eq!(echo.header("x-envoy-by-config"), Some("kept"));

        // A breaker overflow is still a 503 UO, without x-envoy-overloaded when suppressed.
        let over = c.get("/full/", &[]).await;
        assert_eq!(
            over.status,
            http::StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            over.text()
        );
        let overloaded = (!suppress).then_some("true");
        assert_eq!(over.header("x-envoy-overloaded"), overloaded);
    }
}
