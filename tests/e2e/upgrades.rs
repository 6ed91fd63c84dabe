//! WebSocket (HTTP/1.1 `Upgrade`) through the router, allowed by the route's or the connection manager's
//! `upgrade_configs` as in Envoy's "HTTP upgrades" table, against an origin that switches protocols and then
//! echoes raw bytes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::DEFAULT_TIMEOUT;
use crate::support::{bootstrap, cluster, routes, Proxy, RawConn};

/// An origin that answers an upgrade request with 101 and then echoes every byte, answers `/refuse` with an
/// ordinary 200, and answers a request without `connection: upgrade` with 200 `plain`. It keeps each request
/// head it read (lower-cased).
struct WsOrigin {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WsOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WsOrigin {
    async fn start() -> WsOrigin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let kept = heads.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    kept.lock().unwrap_or_else(|e| e.into_inner()).push(head.clone());
                    let plain = |body: &str| {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    if head.starts_with("get /refuse") {
                        let _ = s.write_all(plain("refused").as_bytes()).await;
                        return;
                    }
                    if !head.contains("connection: upgrade") {
                        let _ = s.write_all(plain("plain").as_bytes()).await;
                        return;
                    }
                    let switch =
                        "HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
                                  sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                    if s.write_all(switch.as_bytes()).await.is_err() {
                        return;
                    }
                    // Bytes that came with the head belong to the new protocol.
                    if s.write_all(&buf[end..]).await.is_err() {
                        return;
                    }
                    loop {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&chunk[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        WsOrigin { addr, heads, task }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

const WS_HEAD: &str =
    "connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                       sec-websocket-version: 13\r\n";

async fn start(origin: &WsOrigin, table: Vec<Value>, hcm_extra: Value) -> Proxy {
    Proxy::start(
        &bootstrap(routes(table), vec![cluster("ws", &[origin.addr])], hcm_extra),
        &[],
    )
    .await
}

fn route(prefix: &str, upgrades: Value) -> Value {
    let mut r = json!({"match": {"prefix": prefix}, "route": {"cluster": "ws"}});
    if !upgrades.is_null() {
        r["route"]["upgrade_configs"] = upgrades;
    }
    r
}

/// Send an upgrade request for `path`; the status and the connection.
async fn upgrade(proxy: &Proxy, path: &str) -> (u16, RawConn, crate::support::RawResponse) {
    let mut c = RawConn::connect(proxy.addr).await;
    c.send(format!("GET {path} HTTP/1.1\r\nhost: chat.example\r\n{WS_HEAD}\r\n").as_bytes())
        .await;
    let r = c.response(false).await;
    (r.status, c, r)
}

async fn wait_stat(proxy: &Proxy, name: &str, want: i64) {
    crate::harness::within(DEFAULT_TIMEOUT, &format!("{name} = {want}"), async {
        while proxy.stat(name).await != want {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn websocket_enabled_on_the_route_switches_protocols_and_carries_bytes_both_ways() {
    let origin = WsOrigin::start().await;
    // As Envoy Gateway emits it: upgrade_configs on the route, none on the connection manager.
    let proxy = start(
        &origin,
        vec![
            route("/refuse", json!([{"upgrade_type": "websocket"}])),
            route("/chat", json!([{"upgrade_type": "WebSocket"}])),
            route("/", Value::Null),
        ],
        Value::Null,
    )
    .await;
    let (status, mut c, head) = upgrade(&proxy, "/chat").await;
    assert_eq!(status, 101, "{head:?}");
    assert_eq!(head.header("upgrade"), Some("websocket"));
    assert_eq!(head.header("connection"), Some("upgrade"));
    assert_eq!(
        head.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    // The origin got the upgrade headers and the client's WebSocket handshake.
    let seen = origin.heads();
    let h = seen.last().cloned().unwrap_or_default();
    assert!(h.starts_with("get /chat http/1.1\r\n"), "{h}");
    for line in [
        "connection: upgrade",
        "upgrade: websocket",
        "sec-websocket-key: dghlihnhbxbszsbub25jzq==",
    ] {
        assert!(h.contains(line), "{line:?} not in {h}");
    }
    wait_stat(&proxy, "http.ingress.downstream_cx_upgrades_active", 1).await;
    // Raw bytes (a masked WebSocket frame would do the same) go through, back and forth.
    for msg in [
        &b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"[..],
        b"second message",
        &[0u8, 255, 13, 10],
    ] {
        c.send(msg).await;
        assert_eq!(c.read_bytes(msg.len()).await, msg);
    }
    assert_eq!(proxy.stat("http.ingress.downstream_cx_upgrades_total").await, 1);
    drop(c);
    wait_stat(&proxy, "http.ingress.downstream_cx_upgrades_active", 0).await;

    // An upstream that does not switch protocols: its answer is an ordinary response.
    let (status, _c, head) = upgrade(&proxy, "/refuse").await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&head.body), "refused");
    assert_eq!(head.header("upgrade"), None);

    // A route without upgrade_configs, on a connection manager without any: 403, upgrade_failed, and the
    // connection is closed (the client may have sent WebSocket frames already).
    let (status, mut c, head) = upgrade(&proxy, "/other").await;
    assert_eq!(status, 403);
    assert_eq!(head.header("connection"), Some("close"));
    assert!(c.closed().await);
    assert_eq!(
        proxy.stat("http.ingress.downstream_rq_ws_on_non_ws_route").await,
        1
    );
    // `upgrade` without `connection: upgrade` is no upgrade: an ordinary request, its upgrade header dropped.
    let mut c = RawConn::connect(proxy.addr).await;
    c.send(b"GET /other HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).into_owned()),
        (200, "plain".into())
    );
    let h = origin.heads().last().cloned().unwrap_or_default();
    assert!(!h.contains("upgrade: websocket"), "{h}");
}

#[tokio::test]
async fn connection_manager_upgrade_configs_apply_unless_the_route_says_otherwise() {
    let origin = WsOrigin::start().await;
    let proxy = start(
        &origin,
        vec![
            route("/off", json!([{"upgrade_type": "websocket", "enabled": false}])),
            route("/", Value::Null),
        ],
        json!({"upgrade_configs": [{"upgrade_type": "websocket"}]}),
    )
    .await;
    let (status, mut c, _) = upgrade(&proxy, "/chat").await;
    assert_eq!(status, 101);
    c.send(b"hello").await;
    assert_eq!(c.read_bytes(5).await, b"hello");
    let (status, _c, _) = upgrade(&proxy, "/off").await;
    assert_eq!(status, 403);

    // Disabled on the connection manager, enabled on the route: allowed.
    let proxy = start(
        &origin,
        vec![
            route("/on", json!([{"upgrade_type": "websocket", "enabled": true}])),
            route("/", Value::Null),
        ],
        json!({"upgrade_configs": [{"upgrade_type": "websocket", "enabled": false}]}),
    )
    .await;
    assert_eq!(upgrade(&proxy, "/on").await.0, 101);
    assert_eq!(upgrade(&proxy, "/chat").await.0, 403);
}

#[tokio::test]
async fn websocket_on_an_http1_only_connection_manager() {
    let origin = WsOrigin::start().await;
    let proxy = start(
        &origin,
        vec![route("/", Value::Null)],
        json!({"codec_type": "HTTP1", "upgrade_configs": [{"upgrade_type": "websocket"}]}),
    )
    .await;
    let (status, mut c, _) = upgrade(&proxy, "/chat").await;
    assert_eq!(status, 101);
    c.send(b"over http/1.1 only").await;
    assert_eq!(c.read_bytes(18).await, b"over http/1.1 only");
}

#[tokio::test]
async fn an_idle_websocket_is_closed_after_the_stream_idle_timeout() {
    let origin = WsOrigin::start().await;
    let proxy = start(
        &origin,
        vec![route("/", json!([{"upgrade_type": "websocket"}]))],
        json!({"stream_idle_timeout": "0.3s"}),
    )
    .await;
    let (status, mut c, _) = upgrade(&proxy, "/chat").await;
    assert_eq!(status, 101);
    let opened = tokio::time::Instant::now();
    c.send(b"hi").await;
    assert_eq!(c.read_bytes(2).await, b"hi");
    // Nothing more is sent: the proxy closes the upgraded connection.
    assert!(c.closed().await);
    assert!(opened.elapsed() >= std::time::Duration::from_millis(300));
    wait_stat(&proxy, "http.ingress.downstream_rq_idle_timeout", 1).await;
    wait_stat(&proxy, "http.ingress.downstream_cx_upgrades_active", 0).await;
}

#[tokio::test]
async fn an_upgrade_no_route_matches_gets_the_routers_404() {
    let origin = WsOrigin::start().await;
    let proxy = start(
        &origin,
        vec![route("/ws", json!([{"upgrade_type": "websocket"}]))],
        json!({"upgrade_configs": [{"upgrade_type": "websocket", "enabled": false}]}),
    )
    .await;
    assert_eq!(upgrade(&proxy, "/elsewhere").await.0, 404);
    assert_eq!(
        proxy.stat("http.ingress.downstream_rq_ws_on_non_ws_route").await,
        0
    );
    assert_eq!(upgrade(&proxy, "/ws").await.0, 101);
}
