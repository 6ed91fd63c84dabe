//! The connection manager's `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action`, applied
//! before routing. Requests go over raw connections so that their paths arrive exactly as written (a client
//! library would normalize them first, as curl does without `--path-as-is`).

use serde_json::{json, Value};

use crate::harness::{Echo, Upstream};
use crate::support::{bootstrap, cluster, routes, to_cluster, Proxy, RawConn, RawResponse};

/// `/admin` is refused by the route table; everything else reaches the origin.
async fn world(hcm_extra: Value) -> (Upstream, Proxy) {
    let origin = Upstream::start("origin").await;
    let table = routes(vec![
        json!({"match": {"prefix": "/admin"}, "direct_response": {"status": 403}}),
        to_cluster(json!({"prefix": "/"}), "origin"),
    ]);
    let proxy = Proxy::start(
        &bootstrap(table, vec![cluster("origin", &[origin.addr()])], hcm_extra),
        &[],
    )
    .await;
    (origin, proxy)
}

async fn get(proxy: &Proxy, path: &str, extra: &str) -> RawResponse {
    let mut c = RawConn::connect(proxy.addr).await;
    c.send(format!("GET {path} HTTP/1.1\r\nhost: example.com\r\n{extra}\r\n").as_bytes())
        .await;
    c.response(false).await
}

/// The path the origin saw.
async fn forwarded(proxy: &Proxy, path: &str) -> String {
    let r = get(proxy, path, "").await;
    assert_eq!(r.status, 200, "{path}: {:?}", String::from_utf8_lossy(&r.body));
    Echo::parse(&r.body).path
}

#[tokio::test]
async fn paths_are_forwarded_as_they_came_by_default() {
    let (_origin, proxy) = world(Value::Null).await;
    for p in ["/x/../y", "/a//b", "/a%2Fb", "/%41"] {
        assert_eq!(forwarded(&proxy, p).await, p);
    }
    // Without normalization, a dot-segment walks around the route table's /admin rule (as in Envoy).
    assert_eq!(forwarded(&proxy, "/public/../admin").await, "/public/../admin");
}

#[tokio::test]
async fn normalize_path_and_merge_slashes_before_routing() {
    let (_origin, proxy) = world(json!({"normalize_path": true, "merge_slashes": true})).await;
    assert_eq!(forwarded(&proxy, "/x/./y/../z//w?q=a//b").await, "/x/z/w?q=a//b");
    assert_eq!(forwarded(&proxy, "/%7euser/%41%2e/b\\c").await, "/~user/A./b/c");
    // Escaped slashes are kept by default, even when normalizing.
    assert_eq!(forwarded(&proxy, "/a%2F..%2Fb").await, "/a%2F..%2Fb");
    // The route is chosen on the normalized path.
    assert_eq!(get(&proxy, "/public/../admin", "").await.status, 403);
    assert_eq!(get(&proxy, "//admin", "").await.status, 403);
    // An escaped NUL makes the path invalid: 400.
    let bad = get(&proxy, "/a/%00", "").await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        proxy
            .stat("http.ingress.downstream_rq_failed_path_normalization")
            .await,
        1
    );
}

#[tokio::test]
async fn escaped_slashes_rejected_redirected_or_forwarded() {
    let (_origin, proxy) = world(json!({"path_with_escaped_slashes_action": "REJECT_REQUEST"})).await;
    assert_eq!(get(&proxy, "/a%2fb", "").await.status, 400);
    assert_eq!(get(&proxy, "/a%5Cb", "").await.status, 400);
    // In the query they are not the path's.
    assert_eq!(forwarded(&proxy, "/ab?x=%2F").await, "/ab?x=%2F");
    assert_eq!(
        proxy
            .stat("http.ingress.downstream_rq_failed_path_normalization")
            .await,
        2
    );

    // Envoy Gateway's settings.
    let (_origin, proxy) = world(
        json!({"path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "normalize_path": true, "merge_slashes": true}),
    )
    .await;
    let r = get(&proxy, "/a%2F%2Fb/..%2fc?q=%2F", "").await;
    assert_eq!(r.status, 307);
    assert_eq!(r.header("location"), Some("/a/c?q=%2F"));
    assert_eq!(
        proxy
            .stat("http.ingress.downstream_rq_redirected_with_normalized_path")
            .await,
        1
    );
    // A gRPC client cannot follow a redirect: 400 instead.
    let grpc = get(&proxy, "/svc%2FMethod", "content-type: application/grpc\r\n").await;
    assert_eq!(grpc.status, 200, "gRPC local replies are 200 with grpc-status");
    assert!(grpc.header("grpc-status").is_some(), "{:?}", grpc.headers);
    // Without escaped slashes the request goes on, normalized.
    assert_eq!(forwarded(&proxy, "/a//b/./c").await, "/a/b/c");

    let (_origin, proxy) = world(json!({"path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD"})).await;
    assert_eq!(forwarded(&proxy, "/a%2fb%5Cc").await, "/a/b\\c");
    assert_eq!(get(&proxy, "/admin%2Fx", "").await.status, 403);
}

#[tokio::test]
async fn the_access_log_shows_the_normalized_path_and_the_details() {
    let mut extra = json!({"normalize_path": true, "path_with_escaped_slashes_action": "REJECT_REQUEST"});
    extra["access_log"] = json!([{"name": "envoy.access_loggers.stdout", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
        "log_format": {"text_format_source": {
            "inline_string": "ACCESS %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_CODE_DETAILS%\n"}}}}]);
    let (_origin, mut proxy) = world(extra).await;
    assert_eq!(forwarded(&proxy, "/a/./b/../c").await, "/a/c");
    assert_eq!(get(&proxy, "/a%2Fb", "").await.status, 400);
    proxy.remora.sigterm();
    proxy.remora.wait_exit(crate::harness::DEFAULT_TIMEOUT).await;
    let out = proxy.remora.stdout();
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("ACCESS ")).collect();
    assert_eq!(
        lines,
        [
            "ACCESS /a/c 200 via_upstream",
            "ACCESS /a%2Fb 400 path_normalization_failed"
        ],
        "{out}"
    );
}
