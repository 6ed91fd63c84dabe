//! HTTP versions on each side of the proxy, large and chunked bodies, `expect: 100-continue`, and upstream
//! connection reuse.

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{build_request, HttpClient, Upstream, DEFAULT_TIMEOUT};
use crate::support::{bootstrap, cluster, h2_cluster, legacy_h2_cluster, routes, to_cluster, Proxy, RawConn};

const MIB: usize = 1 << 20;

/// A proxy with three clusters: `h1` (HTTP/1.1), `h2` (h2c via typed_extension_protocol_options) and
/// `legacy` (h2c via cluster-level http2_protocol_options), each on an origin that speaks only that protocol.
/// Paths `/h1/...`, `/h2/...` and `/legacy/...` go to each, with the prefix rewritten away.
struct World {
    h1: Upstream,
    h2: Upstream,
    legacy: Upstream,
    proxy: Proxy,
}

async fn world() -> World {
    let h1 = Upstream::http1("h1").await;
    let h2 = Upstream::h2c("h2").await;
    let legacy = Upstream::h2c("legacy").await;
    let route = |name: &str| json!({"match": {"prefix": format!("/{name}/")}, "route": {"cluster": name, "prefix_rewrite": "/"}});
    let table = routes(vec![route("h1"), route("h2"), route("legacy")]);
    let clusters = vec![
        cluster("h1", &[h1.addr()]),
        h2_cluster("h2", &[h2.addr()]),
        legacy_h2_cluster("legacy", &[legacy.addr()]),
    ];
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    World {
        h1,
        h2,
        legacy,
        proxy,
    }
}

/// A body whose every byte depends on its position, so a reordering or a lost chunk shows.
fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into()
}

#[tokio::test]
async fn every_downstream_and_upstream_protocol_pair() {
    let w = world().await;
    for (client, down) in [(w.proxy.h1(), "HTTP/1.1"), (w.proxy.h2(), "HTTP/2")] {
        for (prefix, up) in [("h1", "HTTP/1.1"), ("h2", "HTTP/2.0"), ("legacy", "HTTP/2.0")] {
            let reply = client
                .post(&format!("/{prefix}/x?y=1"), &[("x-probe", "p")], "ping")
                .await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "{down} -> {prefix}: {}",
                reply.text()
            );
            assert_eq!(reply.header("x-upstream"), Some(prefix), "{down} -> {prefix}");
            let echo = reply.echo();
            assert_eq!(echo.version, up, "{down} -> {prefix}");
            assert_eq!(echo.path, "/x?y=1");
            assert_eq!(echo.method, "POST");
            assert_eq!(echo.body_len, 4);
            assert_eq!(echo.header("x-probe"), Some("p"));
        }
    }
    assert_eq!(w.h1.requests(), 2);
    assert_eq!(w.h2.requests(), 2);
    assert_eq!(w.legacy.requests(), 2);
}

#[tokio::test]
async fn one_mib_bodies_both_ways_on_every_protocol_pair() {
    let w = world().await;
    let body = pattern(MIB);
    for client in [w.proxy.h1(), w.proxy.h2()] {
        for prefix in ["h1", "h2"] {
            let what = format!("{} -> {prefix}", if client.is_h2c() { "h2" } else { "h1" });
            let echoed = client.post(&format!("/{prefix}/echo"), &[], body.clone()).await;
            assert_eq!(echoed.status, StatusCode::OK, "{what}");
            assert_eq!(echoed.body.len(), MIB, "{what}: echoed length");
            assert!(echoed.body == body, "{what}: echoed content differs");

            let download = client.get(&format!("/{prefix}/bytes/{MIB}"), &[]).await;
            assert_eq!(download.status, StatusCode::OK, "{what}");
            assert_eq!(download.body.len(), MIB, "{what}: download length");
            assert!(
                download.body.iter().all(|b| *b == b'x'),
                "{what}: download content"
            );
            if !client.is_h2c() {
                assert_eq!(download.header("content-length"), Some("1048576"), "{what}");
            }
            let echo = client
                .post(&format!("/{prefix}/count"), &[], body.clone())
                .await
                .echo();
            assert_eq!(
                echo.body_len, MIB as u64,
                "{what}: upload length seen by the upstream"
            );
        }
    }
}

#[tokio::test]
async fn chunked_request_body_reaches_the_upstream_whole() {
    let w = world().await;
    for prefix in ["h1", "h2"] {
        let mut conn = RawConn::connect(w.proxy.addr).await;
        let head =
            format!("POST /{prefix}/echo HTTP/1.1\r\nhost: chunky\r\ntransfer-encoding: chunked\r\n\r\n");
        conn.send(head.as_bytes()).await;
        conn.send(b"5\r\nhello\r\n").await;
        conn.send(b"6\r\n world\r\n").await;
        conn.send(b"0\r\n\r\n").await;
        let response = conn.response(false).await;
        assert_eq!(response.status, 200, "{prefix}: {response:?}");
        assert_eq!(response.body, b"hello world", "{prefix}");

        // The same connection carries a second chunked request (keep-alive after a chunked body).
        conn.send(format!("POST /{prefix}/len HTTP/1.1\r\nhost: chunky\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n").as_bytes())
            .await;
        let response = conn.response(false).await;
        assert_eq!(response.status, 200, "{prefix}");
        let echo = crate::harness::Echo::parse(&response.body);
        assert_eq!(echo.body_len, 3);
        assert_eq!(
            echo.header("transfer-encoding").is_some(),
            prefix == "h1",
            "{prefix}: {echo:?}"
        );
    }
}

#[tokio::test]
async fn expect_100_continue_is_answered_by_the_proxy() {
    let w = world().await;
    let mut conn = RawConn::connect(w.proxy.addr).await;
    conn.send(b"POST /h1/x HTTP/1.1\r\nhost: e\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        .await;
    let interim = conn.response(false).await;
    assert_eq!(interim.status, 100, "{interim:?}");
    conn.send(b"hello").await;
    let response = conn.response(false).await;
    assert_eq!(response.status, 200);
    let echo = crate::harness::Echo::parse(&response.body);
    assert_eq!(echo.body_len, 5);
    // Envoy answers the 100 itself and does not forward `expect` (proxy_100_continue is false).
    assert_eq!(echo.header("expect"), None);
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let w = world().await;
    let n = 60;
    for client in [w.proxy.h1(), w.proxy.h2()] {
        for prefix in ["h1", "h2"] {
            for i in 0..n {
                let reply = client.get(&format!("/{prefix}/r{i}"), &[]).await;
                assert_eq!(reply.status, StatusCode::OK);
            }
        }
    }
    // Sequential requests from one downstream connection land on one worker: one upstream connection each
    // (two workers at most, so two downstream clients give at most two per origin).
    assert_eq!(w.h1.requests(), 2 * n);
    assert!(
        w.h1.connections() <= 2,
        "h1 origin saw {} connections",
        w.h1.connections()
    );
    assert!(
        w.h2.connections() <= 2,
        "h2 origin saw {} connections",
        w.h2.connections()
    );
}

#[tokio::test]
async fn concurrent_h1_requests_share_a_bounded_upstream_pool() {
    let w = world().await;
    let client: HttpClient = w.proxy.h1();
    let report = crate::harness::load(&client, 8, crate::harness::Budget::Count(400), |i| {
        build_request(Method::GET, &format!("/h1/c{i}"), &[], Bytes::new())
    })
    .await;
    report.assert_all_ok();
    // At most one upstream connection per request in flight at once (8 clients), not one per request.
    assert!(
        w.h1.connections() <= 8,
        "h1 origin saw {} connections for 400 requests",
        w.h1.connections()
    );
}

#[tokio::test]
async fn head_request_gets_headers_only() {
    let w = world().await;
    let mut conn = RawConn::connect(w.proxy.addr).await;
    conn.send(b"HEAD /h1/bytes/100 HTTP/1.1\r\nhost: h\r\n\r\n").await;
    let response = conn.response(true).await;
    assert_eq!(response.status, 200);
    // The connection is still usable: a HEAD response carries no body that could desync it.
    conn.send(b"GET /h1/bytes/3 HTTP/1.1\r\nhost: h\r\n\r\n").await;
    let response = conn.response(false).await;
    assert_eq!(response.body, b"xxx");
}

#[tokio::test]
async fn upstream_trailers_pass_through_to_an_h2_client() {
    let w = world().await;
    w.h2.set_handler(|_req| async move {
        use http_body_util::BodyExt;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
        let frames = vec![
            Ok::<_, crate::harness::BoxError>(http_body::Frame::data(Bytes::from_static(b"data"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames)).boxed_unsync();
        http::Response::new(body)
    });
    let reply = w.proxy.h2().get("/h2/t", &[("te", "trailers")]).await;
    assert_eq!(reply.text(), "data");
    let trailers = reply.trailers.unwrap_or_default();
    assert_eq!(
        trailers.get("x-checksum").map(|v| v.as_bytes()),
        Some(&b"abc"[..])
    );
}

#[tokio::test]
async fn codec_type_http1_refuses_h2c_and_http2_refuses_http1() {
    let origin = Upstream::start("o").await;
    for (codec, h1_ok) in [("HTTP1", true), ("HTTP2", false)] {
        let table = routes(vec![to_cluster(json!({"prefix": "/"}), "o")]);
        let config = bootstrap(
            table,
            vec![cluster("o", &[origin.addr()])],
            json!({"codec_type": codec}),
        );
        let proxy = Proxy::start(&config, &[]).await;
        let short = std::time::Duration::from_secs(2);
        let h1 = proxy.h1().with_timeout(short).try_get("/", &[]).await;
        let h2 = proxy.h2().with_timeout(short).try_get("/", &[]).await;
        assert_eq!(h1.is_ok(), h1_ok, "{codec}: h1 {h1:?}");
        assert_eq!(h2.is_ok(), !h1_ok, "{codec}: h2 {h2:?}");
    }
}

/// The server's first SETTINGS frame and its connection-level WINDOW_UPDATE on a fresh h2c connection.
async fn h2_server_settings(addr: std::net::SocketAddr) -> (Vec<(u16, u32)>, u32) {
    let mut c = RawConn::connect(addr).await;
    // The connection preface and an empty SETTINGS frame.
    c.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await;
    let mut settings = None;
    let mut window_update = 0;
    loop {
        let head = c.read_bytes(9).await;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let payload = c.read_bytes(len).await;
        match kind {
            4 if flags & 1 == 0 => {
                settings = Some(
                    payload
                        .chunks(6)
                        .map(|p| {
                            (
                                u16::from_be_bytes([p[0], p[1]]),
                                u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                            )
                        })
                        .collect::<Vec<_>>(),
                );
                // Acknowledge, so that the server goes on (its ACK of ours follows).
                c.send(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00").await;
            }
            8 if stream == 0 => {
                window_update = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            }
            _ => {}
        }
        if settings.is_some() && window_update != 0 {
            break;
        }
    }
    (settings.unwrap_or_default(), window_update)
}

#[tokio::test]
async fn http2_protocol_options_set_the_downstream_settings_and_windows() {
    let up = Upstream::start("origin").await;
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "origin")]);
    let options = json!({"http2_protocol_options": {
        "max_concurrent_streams": 100,
        "initial_stream_window_size": 65536,
        "initial_connection_window_size": 1048576,
    }});
    let proxy = Proxy::start(
        &bootstrap(table.clone(), vec![cluster("origin", &[up.addr()])], options),
        &[],
    )
    .await;
    let (settings, window_update) = h2_server_settings(proxy.addr).await;
    // SETTINGS_MAX_CONCURRENT_STREAMS (3) and SETTINGS_INITIAL_WINDOW_SIZE (4).
    assert!(settings.contains(&(3, 100)), "{settings:?}");
    assert!(settings.contains(&(4, 65536)), "{settings:?}");
    // The connection window grows from HTTP/2's 65535 to the configured size.
    assert_eq!(window_update, 1048576 - 65535);
    // And h2 requests are served as before.
    let reply = proxy.h2().get("/", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);

    // Without the options: no stream limit but HTTP/2's largest, as Envoy.
    let proxy = Proxy::start(
        &bootstrap(table, vec![cluster("origin", &[up.addr()])], Value::Null),
        &[],
    )
    .await;
    let (settings, _) = h2_server_settings(proxy.addr).await;
    assert!(settings.contains(&(3, 2147483647)), "{settings:?}");
}

#[tokio::test]
async fn one_connection_accepted_per_socket_event_still_serves_a_burst() {
    let up = Upstream::start("origin").await;
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "origin")]);
    let mut config = bootstrap(table, vec![cluster("origin", &[up.addr()])], Value::Null);
    config["static_resources"]["listeners"][0]["max_connections_to_accept_per_socket_event"] = json!(1);
    let proxy = Proxy::start(&config, &["--concurrency", "1"]).await;
    // Every connection is pending in the kernel's queue before the first request is sent.
    let mut conns = Vec::new();
    for _ in 0..32 {
        conns.push(RawConn::connect(proxy.addr).await);
    }
    let mut replies = Vec::new();
    for c in &mut conns {
        c.send(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    }
    for c in &mut conns {
        replies.push(c.response(false).await.status);
    }
    assert!(replies.iter().all(|s| *s == 200), "{replies:?}");
    assert_eq!(proxy.stat("http.ingress.downstream_cx_total").await, 32);
}

#[tokio::test]
async fn max_requests_per_connection_drains_upstream_connections() {
    let h1 = Upstream::http1("h1").await;
    let h2 = Upstream::h2c("h2").await;
    let legacy = Upstream::http1("legacy").await;
    let route = |name: &str| json!({"match": {"prefix": format!("/{name}/")}, "route": {"cluster": name, "prefix_rewrite": "/"}});
    let options = |protocol: Value| {
        json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"max_requests_per_connection": 2},
            "explicit_http_config": protocol,
        }})
    };
    let mut h1_cluster = cluster("h1", &[h1.addr()]);
    h1_cluster["typed_extension_protocol_options"] = options(json!({"http_protocol_options": {}}));
    let mut h2_cluster = cluster("h2", &[h2.addr()]);
    h2_cluster["typed_extension_protocol_options"] = options(json!({"http2_protocol_options": {}}));
    // The deprecated cluster-level field acts the same.
    let mut legacy_cluster = cluster("legacy", &[legacy.addr()]);
    legacy_cluster["max_requests_per_connection"] = json!(3);
    let table = routes(vec![route("h1"), route("h2"), route("legacy")]);
    let config = bootstrap(table, vec![h1_cluster, h2_cluster, legacy_cluster], Value::Null);
    // One worker: one pool, so the counts are exact.
    let proxy = Proxy::start(&config, &["--concurrency", "1"]).await;
    let client = proxy.h1();
    for prefix in ["h1", "h2", "legacy"] {
        for i in 0..6 {
            let reply = client.get(&format!("/{prefix}/r{i}"), &[]).await;
            assert_eq!(reply.status, StatusCode::OK, "{prefix} request {i}");
        }
    }
    // Six sequential requests, two per connection (three for `legacy`).
    assert_eq!((h1.requests(), h1.connections()), (6, 3));
    assert_eq!((h2.requests(), h2.connections()), (6, 3));
    assert_eq!((legacy.requests(), legacy.connections()), (6, 2));
    assert_eq!(proxy.stat("cluster.h1.upstream_cx_max_requests").await, 3);
    assert_eq!(proxy.stat("cluster.h2.upstream_cx_max_requests").await, 3);
    assert_eq!(proxy.stat("cluster.legacy.upstream_cx_max_requests").await, 2);
    // Each drained connection is closed: HTTP/1.1 at once, HTTP/2 once its stream ended.
    proxy
        .remora
        .wait_stat(
            "cluster.h1.upstream_cx_destroy",
            |n| n == 3,
            crate::harness::DEFAULT_TIMEOUT,
        )
        .await;
    proxy
        .remora
        .wait_stat(
            "cluster.h2.upstream_cx_destroy",
            |n| n == 3,
            crate::harness::DEFAULT_TIMEOUT,
        )
        .await;
}

/// The flow-control windows a client announces on a new HTTP/2 connection: SETTINGS_INITIAL_WINDOW_SIZE and
/// the connection-level WINDOW_UPDATE increment (as their final window sizes), read off the raw frames until
/// the first request's HEADERS.
async fn announced_windows(stream: &mut tokio::net::TcpStream) -> (Option<u32>, u32) {
    use tokio::io::AsyncReadExt;
    let mut preface = [0u8; 24];
    stream
        .read_exact(&mut preface)
        .await
        .unwrap_or_else(|e| panic!("preface: {e}"));
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    let (mut stream_window, mut conn_window) = (None, 65_535u32);
    loop {
        let mut head = [0u8; 9];
        stream
            .read_exact(&mut head)
            .await
            .unwrap_or_else(|e| panic!("frame: {e}"));
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        stream
            .read_exact(&mut payload)
            .await
            .unwrap_or_else(|e| panic!("payload: {e}"));
        match kind {
            // SETTINGS (not an ACK): INITIAL_WINDOW_SIZE is setting 4.
            4 if flags & 1 == 0 => {
                for s in payload.chunks_exact(6) {
                    if u16::from_be_bytes([s[0], s[1]]) == 4 {
                        stream_window = Some(u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
                    }
                }
            }
            8 if stream_id == 0 => {
                conn_window +=
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
            }
            1 => return (stream_window, conn_window),
            _ => {}
        }
    }
}

#[tokio::test]
async fn http2_flow_control_windows_are_announced_upstream() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let origin = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let mut c = cluster("h2", &[origin]);
    // The values Envoy Gateway emits for a gRPC backend.
    c["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {
                "initial_stream_window_size": 65536,
                "initial_connection_window_size": 1048576,
            }},
        }
    });
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "h2")]);
    let proxy = Proxy::start(&bootstrap(table, vec![c], Value::Null), &["--concurrency", "1"]).await;
    let client = proxy.h1();
    let request = tokio::spawn(async move { client.try_get("/", &[]).await });
    let (mut stream, _) = crate::harness::within(
        crate::harness::DEFAULT_TIMEOUT,
        "the upstream connection",
        listener.accept(),
    )
    .await
    .unwrap_or_else(|e| panic!("accept: {e}"));
    let windows = crate::harness::within(
        crate::harness::DEFAULT_TIMEOUT,
        "the request's frames",
        announced_windows(&mut stream),
    )
    .await;
    assert_eq!(windows, (Some(65_536), 1_048_576));
    drop(stream);
    // The origin hung up without answering: the proxy answers for it.
    let reply = request.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(reply.map_or(true, |r| r.status == StatusCode::SERVICE_UNAVAILABLE));
}

/// `connection_keepalive` on a cluster's HTTP/2: Remora PINGs the upstream every `interval` and closes the
/// connection when a PING goes unanswered for `timeout`. The upstream here speaks just enough HTTP/2 by hand
/// (its SETTINGS, and no answer to anything) to see the PING arrive and the connection close.
#[tokio::test]
async fn http2_connection_keepalive_pings_and_closes_a_silent_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut c = cluster("silent", &[silent.local_addr().unwrap()]);
    c["typed_extension_protocol_options"] = json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {
            "connection_keepalive": {"interval": "0.2s", "timeout": "0.3s"}}},
    }});
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "silent")]);
    let mut config = bootstrap(table, vec![c], Value::Null);
    // The request waits long enough for the keepalive to act first.
    config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["timeout"] = json!("10s");
    let proxy = Proxy::start(&config, &["--concurrency", "1"]).await;
    let client = proxy.h1().with_timeout(std::time::Duration::from_secs(10));
    let request = tokio::spawn(async move { client.try_get("/", &[]).await.map(|r| r.status) });
    let (mut up, _) = crate::harness::within(DEFAULT_TIMEOUT, "the upstream connection", silent.accept())
        .await
        .unwrap();
    // Our SETTINGS (empty), then read frames until a PING (type 6) arrives.
    up.write_all(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut preface = [0u8; 24];
    up.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    let ping = crate::harness::within(DEFAULT_TIMEOUT, "a PING", async {
        loop {
            let mut head = [0u8; 9];
            up.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            up.read_exact(&mut payload).await.unwrap();
            if head[3] == 6 && head[4] & 1 == 0 {
                return payload;
            }
        }
    })
    .await;
    assert_eq!(ping.len(), 8);
    // Unanswered, the connection is closed after the timeout (`within` fails the test if it stays open).
    let mut rest = Vec::new();
    let _ = crate::harness::within(DEFAULT_TIMEOUT, "the close", up.read_to_end(&mut rest)).await;
    // The request in flight on it is reset: a 503 well before the 10 s route timeout.
    let status = crate::harness::within(DEFAULT_TIMEOUT, "the client's answer", request)
        .await
        .unwrap();
    assert_eq!(status.map(|s| s.as_u16()).ok(), Some(503));
    assert!(proxy.stat("cluster.silent.upstream_cx_destroy").await >= 1);
}
