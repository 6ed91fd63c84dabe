//! The bound a retry budget puts on upstream attempts, counted at the upstream (issue 4, "The retry storm,
//! reproduced"), and the attempts without one.
//!
//! Envoy's semantics (`circuit_breakers.thresholds[].retry_budget`): at any moment the active retries may not
//! exceed `max(budget_percent × (active + pending requests), min_retry_concurrency)`; a retry over it is not sent,
//! the last response goes back to the client, and `upstream_rq_retry_overflow` counts it. The tests make
//! concurrency deterministic instead of timing it: the upstream parks every request until the test releases it.
//! With `N` requests parked, none retried yet, the active + pending requests of the cluster are at most `N` for
//! the rest of the test. Releasing the originals with 503 makes each ask for a retry; a granted retry is parked
//! again and keeps its retry open until the end, so the granted retries `R` obey
//! `min(N, min_retry_concurrency) ≤ R ≤ max(⌊budget_percent × N⌋, min_retry_concurrency)`, and the upstream sees
//! exactly `N + R` requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::StatusCode;
use serde_json::json;
use tokio::sync::watch;

use crate::harness::{reply, within, Upstream, DEFAULT_TIMEOUT, POLL_INTERVAL};
use crate::support::{bootstrap, cluster, routes, Proxy};

const BUDGET_PERCENT: u64 = 20;
const MIN_RETRY_CONCURRENCY: u64 = 2;
const NUM_RETRIES: u64 = 5;

/// A route to `payments` retrying on 5xx up to [`NUM_RETRIES`] times with a short back-off, no route timeout.
fn retrying_routes() -> serde_json::Value {
    routes(vec![json!({"match": {"prefix": "/"}, "route": {
        "cluster": "payments",
        "timeout": "0s",
        "retry_policy": {"retry_on": "5xx", "num_retries": NUM_RETRIES,
            "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"}}}})])
}

/// Polls `f` until it holds, for at most the harness timeout.
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    within(DEFAULT_TIMEOUT, what, async {
        while !f().await {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
    .await;
}

/// `n` requests held at the upstream, released with 503, retried under the budget; see the module docs.
async fn budget_bounds_retries(n: u64) {
    let upstream = Upstream::start("payments").await;
    let (release_originals, originals) = watch::channel(false);
    let (release_retries, retries) = watch::channel(false);
    let seen = Arc::new(AtomicU64::new(0));
    upstream.set_handler(move |_req| {
        let k = seen.fetch_add(1, Ordering::SeqCst);
        // The first n requests are the originals: no retry can start before they are answered.
        let (mut gate, status) = if k < n {
            (originals.clone(), 503)
        } else {
            (retries.clone(), 200)
        };
        async move {
            let _ = gate.wait_for(|open| *open).await;
            reply(status, "")
        }
    });
    let mut payments = cluster("payments", &[upstream.addr()]);
    payments["circuit_breakers"] = json!({"thresholds": [{"priority": "DEFAULT", "retry_budget": {
        "budget_percent": {"value": BUDGET_PERCENT as f64},
        "min_retry_concurrency": MIN_RETRY_CONCURRENCY}}]});
    let proxy = Proxy::start(&bootstrap(retrying_routes(), vec![payments], json!(null)), &[]).await;

    let client = proxy.h2();
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get("/pay", &[]).await.status })
        })
        .collect();
    eventually("every original held at the upstream", async || {
        upstream.requests() == n
    })
    .await;

    release_originals.send_replace(true);
    // Every original asked for a retry: granted or refused.
    eventually("a retry decision for every original", async || {
        proxy.stat("cluster.payments.upstream_rq_retry").await
            + proxy.stat("cluster.payments.upstream_rq_retry_overflow").await
            == n as i64
    })
    .await;
    let granted = proxy.stat("cluster.payments.upstream_rq_retry").await as u64;
    eventually("every granted retry at the upstream", async || {
        upstream.requests() == n + granted
    })
    .await;

    let bound = (BUDGET_PERCENT * n / 100).max(MIN_RETRY_CONCURRENCY);
    assert!(
        granted <= bound,
        "{granted} retries granted for {n} requests, budget bound {bound}"
    );
    assert!(
        granted >= MIN_RETRY_CONCURRENCY.min(n),
        "{granted} retries granted: min_retry_concurrency {MIN_RETRY_CONCURRENCY} always affords that many"
    );
    assert_eq!(
        proxy.stat("cluster.payments.upstream_rq_retry_overflow").await as u64,
        n - granted,
        "every refused retry is counted as an overflow"
    );

    release_retries.send_replace(true);
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(
            within(DEFAULT_TIMEOUT, "a client response", call)
                .await
                .unwrap_or_else(|e| panic!("client task: {e}")),
        );
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count() as u64;
    let unavailable = statuses
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count() as u64;
    assert_eq!(
        (ok, unavailable),
        (granted, n - granted),
        "retried requests succeed, refused ones get the upstream's 503"
    );
    // Counted at the upstream: each request once, plus the retries the budget afforded, and nothing more.
    assert_eq!(upstream.requests(), n + granted);
    assert!(upstream.requests() <= n + bound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_bounds_upstream_attempts_by_budget_percent() {
    // 20 % of 30 in flight: at most 6 retries.
    budget_bounds_retries(30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_bounds_upstream_attempts_by_min_retry_concurrency() {
    // 20 % of 5 is 1, below min_retry_concurrency: exactly 2 retries.
    budget_bounds_retries(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_budget_every_request_makes_one_plus_num_retries_attempts() {
    const N: u64 = 10;
    let upstream = Upstream::start("payments").await;
    upstream.set_handler(|_req| async { reply(503, "") });
    let mut payments = cluster("payments", &[upstream.addr()]);
    // No budget, and max_retries out of the way (Envoy's default of 3 would cap concurrent retries).
    payments["circuit_breakers"] = json!({"thresholds": [{"priority": "DEFAULT", "max_retries": 10000}]});
    let proxy = Proxy::start(&bootstrap(retrying_routes(), vec![payments], json!(null)), &[]).await;

    let client = proxy.h2();
    let calls: Vec<_> = (0..N)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.get("/pay", &[]).await.status })
        })
        .collect();
    for call in calls {
        let status = within(DEFAULT_TIMEOUT, "a client response", call)
            .await
            .unwrap_or_else(|e| panic!("client task: {e}"));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(upstream.requests(), N * (1 + NUM_RETRIES));
    assert_eq!(
        proxy.stat("cluster.payments.upstream_rq_retry").await as u64,
        N * NUM_RETRIES
    );
    assert_eq!(proxy.stat("cluster.payments.upstream_rq_retry_overflow").await, 0);
    assert_eq!(
        proxy
            .stat("cluster.payments.upstream_rq_retry_limit_exceeded")
            .await as u64,
        N
    );
}
