//! Route `retry_policy` conditions and retry priorities that need upstreams misbehaving in particular ways:
//! `reset-before-request` (retry a reset only while no attempt has sent the request upstream), and
//! `retry_priority: envoy.retry_priorities.previous_priorities` (a retry leaves the priorities attempted).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use http::StatusCode;
use serde_json::{json, Value};

use crate::harness::{reply, Upstream};
use crate::support::{bootstrap, closed_port, cluster, routes, Proxy};

/// An origin that reads each request's head, then closes the connection without answering: a reset after the
/// request was sent. Returns its address and its connection count.
async fn hang_up_after_request() -> (SocketAddr, Arc<AtomicU64>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let count = Arc::new(AtomicU64::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            seen.fetch_add(1, SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                // Dropped: the proxy's request is answered by a close.
            });
        }
    });
    (addr, count)
}

fn retrying(cluster: &str, retry_on: &str, extra: Value) -> Value {
    let mut policy = json!({"retry_on": retry_on, "num_retries": 2,
        "retry_back_off": {"base_interval": "0.001s"}});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            policy[k] = v;
        }
    }
    json!({"match": {"prefix": format!("/{cluster}/")}, "route": {"cluster": cluster, "retry_policy": policy}})
}

#[tokio::test]
async fn reset_before_request_retries_resets_that_came_before_the_request_only() {
    let live = Upstream::start("live").await;
    let (hangup, hangup_connections) = hang_up_after_request().await;
    let hosts = [closed_port(), live.addr()];
    let previous_hosts = json!({"retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 3});
    let table = routes(vec![
        retrying("pair", "reset-before-request", previous_hosts),
        retrying("hangup", "reset-before-request", Value::Null),
        retrying("hangup_reset", "reset", Value::Null),
    ]);
    let clusters = vec![
        cluster("pair", &hosts),
        cluster("hangup", &[hangup]),
        cluster("hangup_reset", &[hangup]),
    ];
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let client = proxy.h1();

    // A refused connection has sent nothing: retried (on the other host), though `connect-failure` is not set.
    for i in 0..4 {
        let reply = client.get(&format!("/pair/{i}"), &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-upstream"), Some("live"));
    }
    assert!(proxy.stat("cluster.pair.upstream_rq_retry").await >= 1);

    // A close after the request reached the origin is not retried under `reset-before-request`...
    let reply = client.get("/hangup/x", &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(hangup_connections.load(SeqCst), 1);
    assert_eq!(proxy.stat("cluster.hangup.upstream_rq_retry").await, 0);
    // ...and is under `reset`: three attempts.
    let reply = client.get("/hangup_reset/x", &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(hangup_connections.load(SeqCst), 4);
    assert_eq!(proxy.stat("cluster.hangup_reset.upstream_rq_retry").await, 2);
}

/// A STATIC cluster with `p0` at priority 0 and `p1` at priority 1.
fn two_priorities(name: &str, p0: SocketAddr, p1: SocketAddr) -> Value {
    let endpoint = |a: SocketAddr| json!({"endpoint": {"address": {"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}}});
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"priority": 0, "lb_endpoints": [endpoint(p0)]},
            {"priority": 1, "lb_endpoints": [endpoint(p1)]},
        ]},
    })
}

#[tokio::test]
async fn previous_priorities_sends_the_retry_to_the_next_priority() {
    // P0 is healthy as far as the balancer knows, and answers 503 to everything; P1 is the fallback.
    let bad = Upstream::start("bad").await;
    bad.set_handler(|_req| async move { reply(503, "down") });
    let good = Upstream::start("good").await;
    let priority = json!({"retry_priority": {"name": "envoy.retry_priorities.previous_priorities",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
            "update_frequency": 1}}});
    let table = routes(vec![
        retrying("spread", "5xx", priority),
        retrying("plain", "5xx", Value::Null),
    ]);
    let clusters = vec![
        two_priorities("spread", bad.addr(), good.addr()),
        two_priorities("plain", bad.addr(), good.addr()),
    ];
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let client = proxy.h1();

    // P0 carries all the load (one healthy host of one is 100% available): without a retry priority every
    // attempt goes there.
    let reply = client.get("/plain/x", &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!((bad.requests(), good.requests()), (3, 0));

    // With previous_priorities, the first retry excludes P0 and lands on P1.
    for i in 0..3 {
        let reply = client.get(&format!("/spread/{i}"), &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("x-upstream"), Some("good"));
    }
    assert_eq!((bad.requests(), good.requests()), (6, 3));
    assert_eq!(proxy.stat("cluster.spread.upstream_rq_retry").await, 3);
}
