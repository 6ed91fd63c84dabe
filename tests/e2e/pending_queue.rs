//! The pending-request queue behind `circuit_breakers.thresholds[].max_connections` and `max_pending_requests`
//! (Envoy's connection pool): a request that finds no free connection waits as a pending request, bounded by
//! `max_pending_requests`, for a connection to come free; beyond the bound it fails at once with 503 UO,
//! `x-envoy-overloaded: true` and `upstream_rq_pending_overflow`. A pending request that times out leaves the
//! queue. The upstream parks every request until the test releases them, so the queue's state is known without
//! timing.

use http::StatusCode;
use serde_json::json;
use tokio::sync::watch;

use crate::harness::{reply, within, Upstream, DEFAULT_TIMEOUT, POLL_INTERVAL};
use crate::support::{bootstrap, cluster, routes, Proxy};

const MAX_PENDING: i64 = 3;

/// An upstream holding each request until `release` is sent `true`.
async fn parking_upstream() -> (Upstream, watch::Sender<bool>) {
    let upstream = Upstream::http1("slow").await;
    let (release, gate) = watch::channel(false);
    upstream.set_handler(move |_req| {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            reply(200, "done")
        }
    });
    (upstream, release)
}

/// One worker (so that every request shares one pool) in front of `slow` with one connection and one request at
/// most; `/impatient` has a 0.2 s route timeout, other paths none.
async fn proxy(upstream: &Upstream) -> Proxy {
    let mut slow = cluster("slow", &[upstream.addr()]);
    // `max_requests: 1` as well: a pending request does not hold a request unit (Envoy takes it when the request
    // gets its connection), so the queue is not refused by it.
    slow["circuit_breakers"] = json!({"thresholds": [{"priority": "DEFAULT", "max_connections": 1,
        "max_pending_requests": MAX_PENDING, "max_requests": 1, "track_remaining": true}]});
    let table = routes(vec![
        json!({"match": {"prefix": "/impatient"}, "route": {"cluster": "slow", "timeout": "0.2s"}}),
        json!({"match": {"prefix": "/"}, "route": {"cluster": "slow", "timeout": "0s"}}),
    ]);
    Proxy::start(
        &bootstrap(table, vec![slow], json!(null)),
        &["--concurrency", "1"],
    )
    .await
}

async fn stat_reaches(proxy: &Proxy, name: &str, want: i64) {
    within(DEFAULT_TIMEOUT, &format!("{name} == {want}"), async {
        while proxy.stat(name).await != want {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
    .await;
}

#[tokio::test]
async fn requests_beyond_max_connections_queue_up_to_max_pending_requests() {
    let (upstream, release) = parking_upstream().await;
    let proxy = proxy(&upstream).await;
    let spawn_get = || {
        let client = proxy.h1();
        tokio::spawn(async move { client.get("/", &[]).await })
    };

    // The first request takes the one connection and is held at the upstream.
    let mut calls = vec![spawn_get()];
    within(DEFAULT_TIMEOUT, "the first request at the upstream", async {
        while upstream.requests() < 1 {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
    .await;
    // MAX_PENDING more wait for it.
    calls.extend((0..MAX_PENDING).map(|_| spawn_get()));
    stat_reaches(&proxy, "cluster.slow.upstream_rq_pending_active", MAX_PENDING).await;
    assert_eq!(
        proxy
            .stat("cluster.slow.circuit_breakers.default.rq_pending_open")
            .await,
        1
    );
    assert_eq!(
        proxy
            .stat("cluster.slow.circuit_breakers.default.remaining_pending")
            .await,
        0
    );
    assert_eq!(
        proxy.stat("cluster.slow.circuit_breakers.default.cx_open").await,
        1
    );
    assert_eq!(
        upstream.requests(),
        1,
        "the queued requests must not reach the upstream yet"
    );

    // One more overflows at once.
    let over = proxy.h1().get("/", &[]).await;
    assert_eq!(over.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(over.header("x-envoy-overloaded"), Some("true"));
    assert_eq!(proxy.stat("cluster.slow.upstream_rq_pending_overflow").await, 1);

    // Released, the queued requests are served one after the other on the same connection.
    let _ = release.send(true);
    for call in calls {
        let r = call.await.unwrap_or_else(|e| panic!("request task: {e}"));
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(upstream.requests(), 1 + MAX_PENDING as u64);
    assert_eq!(upstream.connections(), 1);
    assert_eq!(proxy.stat("cluster.slow.upstream_cx_total").await, 1);
    // The first request was pending while its connection was made.
    assert_eq!(
        proxy.stat("cluster.slow.upstream_rq_pending_total").await,
        1 + MAX_PENDING
    );
    assert_eq!(proxy.stat("cluster.slow.upstream_rq_pending_active").await, 0);
    assert_eq!(
        proxy
            .stat("cluster.slow.circuit_breakers.default.rq_pending_open")
            .await,
        0
    );
    assert_eq!(
        proxy
            .stat("cluster.slow.circuit_breakers.default.remaining_pending")
            .await,
        MAX_PENDING
    );
}

#[tokio::test]
async fn a_pending_request_that_times_out_leaves_the_queue() {
    let (upstream, release) = parking_upstream().await;
    let proxy = proxy(&upstream).await;
    let first = {
        let client = proxy.h1();
        tokio::spawn(async move { client.get("/", &[]).await })
    };
    within(DEFAULT_TIMEOUT, "the first request at the upstream", async {
        while upstream.requests() < 1 {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
    .await;
    // Waits for the connection, and gives up at its route's timeout.
    let r = proxy.h1().get("/impatient", &[]).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(proxy.stat("cluster.slow.upstream_rq_pending_active").await, 0);
    assert_eq!(proxy.stat("cluster.slow.upstream_rq_cancelled").await, 1);
    assert_eq!(
        proxy
            .stat("cluster.slow.circuit_breakers.default.remaining_pending")
            .await,
        MAX_PENDING
    );

    // The connection the timed-out request waited for goes to the next request, not to it.
    let _ = release.send(true);
    assert_eq!(first.await.map(|r| r.status).ok(), Some(StatusCode::OK));
    assert_eq!(proxy.h1().get("/", &[]).await.status, StatusCode::OK);
    assert_eq!(upstream.requests(), 2);
    assert_eq!(proxy.stat("cluster.slow.upstream_cx_total").await, 1);
}
