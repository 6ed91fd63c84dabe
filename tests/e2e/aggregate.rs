//! The aggregate cluster (`envoy.clusters.aggregate`): entity-cache routing with fallback. A route on a gRPC
//! method prefix goes to an aggregate of [cache, origin]; the cache's hosts are health checked. Traffic goes to
//! the cache; when its hosts fail their checks it moves to the origin, and back when they pass again, without
//! a failed request.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::harness::{within, Upstream, DEFAULT_TIMEOUT, POLL_INTERVAL};
use crate::health_check::switchable;
use crate::support::{bootstrap, cluster, routes, to_cluster, Proxy};

const METHOD: &str = "/entity.v1.EntityService/GetEntity";

fn aggregate(name: &str, members: &[&str]) -> Value {
    json!({
        "name": name,
        "connect_timeout": "1s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {"name": "envoy.clusters.aggregate", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
            "clusters": members,
        }},
    })
}

/// One answered request: when it was sent, which upstream answered, the status.
#[derive(Clone, Debug)]
struct Sample {
    sent: Instant,
    upstream: String,
    status: u16,
}

/// Samples sent at or after `t`.
fn since(samples: &Mutex<Vec<Sample>>, t: Instant) -> Vec<Sample> {
    let s = samples.lock().unwrap_or_else(|e| e.into_inner());
    s.iter().filter(|x| x.sent >= t).cloned().collect()
}

/// Waits until a sample sent at or after `t` matches `pred`; returns how long after `t` it was sent.
async fn first_after(samples: &Mutex<Vec<Sample>>, t: Instant, pred: impl Fn(&Sample) -> bool) -> Duration {
    within(DEFAULT_TIMEOUT, "a matching response", async {
        loop {
            if let Some(s) = since(samples, t).into_iter().find(|s| pred(s)) {
                return s.sent - t;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
    .await
}

/// Waits until at least `n` samples were sent at or after `t`.
async fn at_least(samples: &Mutex<Vec<Sample>>, t: Instant, n: usize) -> Vec<Sample> {
    within(DEFAULT_TIMEOUT, "more responses", async {
        loop {
            let s = since(samples, t);
            if s.len() >= n {
                return s;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
    .await
}

#[tokio::test]
async fn entity_cache_falls_back_to_origin_and_back() {
    let (cache_1, failing_1) = switchable("cache-1").await;
    let (cache_2, failing_2) = switchable("cache-2").await;
    let origin = Upstream::start("origin").await;
    let mut cache = cluster("cache", &[cache_1.addr(), cache_2.addr()]);
    cache["health_checks"] = json!([{
        "timeout": "1s",
        "interval": "0.05s",
        "no_traffic_interval": "0.05s",
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
        "http_health_check": {"path": "/health"},
    }]);
    let table = routes(vec![
        to_cluster(json!({"prefix": "/entity.v1.EntityService/"}), "entity"),
        to_cluster(json!({"prefix": "/"}), "origin"),
    ]);
    let clusters = vec![
        cache,
        cluster("origin", &[origin.addr()]),
        aggregate("entity", &["cache", "origin"]),
    ];
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let r = &proxy.remora;
    assert_eq!(r.stat("cluster.cache.membership_healthy").await, 2);

    // Four callers on one h2 connection, as a gRPC client would, bounded in time.
    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = proxy.h2();
    let mut callers = Vec::new();
    for _ in 0..4 {
        let (samples, stop, client) = (samples.clone(), stop.clone(), client.clone());
        callers.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(30);
            while !stop.load(SeqCst) && Instant::now() < end {
                let sent = Instant::now();
                let reply = client.get(METHOD, &[("content-type", "application/grpc")]).await;
                let upstream = reply.header("x-upstream").unwrap_or_default().to_owned();
                let status = reply.status.as_u16();
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(Sample {
                    sent,
                    upstream,
                    status,
                });
            }
        }));
    }

    // The cache takes all of the traffic while it is healthy.
    let start = Instant::now();
    let first = at_least(&samples, start, 100).await;
    assert!(
        first.iter().all(|s| s.upstream.starts_with("cache-")),
        "{first:?}"
    );

    // The cache's hosts fail their checks: traffic moves to the origin within a second.
    let failed_at = Instant::now();
    failing_1.store(true, SeqCst);
    failing_2.store(true, SeqCst);
    let moved = first_after(&samples, failed_at, |s| s.upstream == "origin").await;
    assert!(
        moved < Duration::from_secs(1),
        "moved to the origin after {moved:?}"
    );
    r.wait_stat("cluster.cache.membership_healthy", |v| v == 0, DEFAULT_TIMEOUT)
        .await;
    let ejected = Instant::now();
    let after = at_least(&samples, ejected, 100).await;
    assert!(after.iter().all(|s| s.upstream == "origin"), "{after:?}");

    // The cache passes its checks again: traffic goes back to it.
    let recovered_at = Instant::now();
    failing_1.store(false, SeqCst);
    failing_2.store(false, SeqCst);
    let back = first_after(&samples, recovered_at, |s| s.upstream.starts_with("cache-")).await;
    assert!(back < Duration::from_secs(1), "back to the cache after {back:?}");
    r.wait_stat("cluster.cache.membership_healthy", |v| v == 2, DEFAULT_TIMEOUT)
        .await;
    let healthy = Instant::now();
    let again = at_least(&samples, healthy, 100).await;
    assert!(
        again.iter().all(|s| s.upstream.starts_with("cache-")),
        "{again:?}"
    );
    assert!(again.iter().any(|s| s.upstream == "cache-1") && again.iter().any(|s| s.upstream == "cache-2"));

    stop.store(true, SeqCst);
    for c in callers {
        c.await.unwrap_or_else(|e| panic!("caller: {e}"));
    }
    let all = since(&samples, start);
    eprintln!(
        "{} requests; to the origin {moved:?} after the cache failed, back {back:?} after it recovered",
        all.len()
    );
    // No failed request at any point: the cache's hosts kept serving until they left balancing.
    let failed: Vec<&Sample> = all.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "{failed:?}");

    // As in Envoy, the connection pools count requests on the member that served them, the router counts
    // responses on the route's cluster; the aggregate has no hosts of its own.
    let total = all.len() as i64;
    let (on_cache, on_origin) = (
        r.stat("cluster.cache.upstream_rq_total").await,
        r.stat("cluster.origin.upstream_rq_total").await,
    );
    assert_eq!(on_cache + on_origin, total);
    assert_eq!(
        on_origin,
        all.iter().filter(|s| s.upstream == "origin").count() as i64
    );
    assert_eq!(r.stat("cluster.entity.upstream_rq_total").await, 0);
    assert_eq!(r.stat("cluster.entity.upstream_rq_2xx").await, total);
    assert_eq!(r.stat("cluster.entity.upstream_rq_completed").await, total);
    assert_eq!(r.stat("cluster.origin.upstream_rq_2xx").await, 0);
    assert_eq!(r.stat("cluster.entity.membership_total").await, 0);
    for member in ["cache", "origin"] {
        let active = format!("cluster.{member}.upstream_rq_active");
        r.wait_stat(&active, |v| v == 0, DEFAULT_TIMEOUT).await;
    }
}

/// An upstream that answers 503 to everything while `failing` is set, and echoes otherwise.
async fn breakable(name: &'static str) -> (Upstream, Arc<AtomicBool>) {
    let up = Upstream::start(name).await;
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    up.set_handler(move |req| {
        let f = f.clone();
        async move {
            if f.load(SeqCst) {
                return crate::harness::reply(503, "cache down");
            }
            crate::harness::echo_response(req, name).await
        }
    });
    (up, failing)
}

/// The same fallback driven by outlier detection: the cache's hosts start failing requests, are ejected after
/// `consecutive_5xx` failures each, traffic moves to the origin, and comes back when the ejections end. The
/// only failed requests are the ones that tripped detection (and those in flight with them).
#[tokio::test]
async fn entity_cache_falls_back_when_its_hosts_are_ejected() {
    let (cache_1, failing_1) = breakable("cache-1").await;
    let (cache_2, failing_2) = breakable("cache-2").await;
    let origin = Upstream::start("origin").await;
    let mut cache = cluster("cache", &[cache_1.addr(), cache_2.addr()]);
    cache["outlier_detection"] = json!({
        "consecutive_5xx": 3,
        "interval": "0.1s",
        "base_ejection_time": "0.5s",
        "max_ejection_percent": 100,
    });
    let table = routes(vec![to_cluster(
        json!({"prefix": "/entity.v1.EntityService/"}),
        "entity",
    )]);
    let clusters = vec![
        cache,
        cluster("origin", &[origin.addr()]),
        aggregate("entity", &["cache", "origin"]),
    ];
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let r = &proxy.remora;

    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = proxy.h2();
    let callers = 4;
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (samples, stop, client) = (samples.clone(), stop.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(30);
            while !stop.load(SeqCst) && Instant::now() < end {
                let sent = Instant::now();
                let reply = client.get(METHOD, &[("content-type", "application/grpc")]).await;
                let upstream = reply.header("x-upstream").unwrap_or_default().to_owned();
                let status = reply.status.as_u16();
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(Sample {
                    sent,
                    upstream,
                    status,
                });
            }
        }));
    }
    let start = Instant::now();
    let first = at_least(&samples, start, 100).await;
    assert!(
        first.iter().all(|s| s.upstream.starts_with("cache-")),
        "{first:?}"
    );

    let failed_at = Instant::now();
    failing_1.store(true, SeqCst);
    failing_2.store(true, SeqCst);
    let moved = first_after(&samples, failed_at, |s| s.upstream == "origin").await;
    assert!(
        moved < Duration::from_secs(1),
        "moved to the origin after {moved:?}"
    );
    r.wait_stat(
        "cluster.cache.outlier_detection.ejections_active",
        |v| v == 2,
        DEFAULT_TIMEOUT,
    )
    .await;
    let ejected = Instant::now();
    let after = at_least(&samples, ejected, 100).await;
    assert!(
        after.iter().all(|s| s.upstream == "origin" && s.status == 200),
        "{after:?}"
    );

    // The cache is fixed; its hosts come back when their ejection time is up.
    failing_1.store(false, SeqCst);
    failing_2.store(false, SeqCst);
    r.wait_stat(
        "cluster.cache.outlier_detection.ejections_active",
        |v| v == 0,
        DEFAULT_TIMEOUT,
    )
    .await;
    let returned = Instant::now();
    let again = at_least(&samples, returned, 100).await;
    assert!(
        again.iter().all(|s| s.upstream.starts_with("cache-")),
        "{again:?}"
    );

    stop.store(true, SeqCst);
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("caller: {e}"));
    }
    let all = since(&samples, start);
    let failed = all.iter().filter(|s| s.status != 200).count();
    // Three consecutive failures eject each cache host; requests already sent to it fail too.
    assert!((6..=6 + callers).contains(&failed), "{failed} failed requests");
    assert_eq!(r.stat("cluster.entity.upstream_rq_503").await as usize, failed);
    assert_eq!(proxy.stat("cluster.cache.upstream_rq_503").await, 0);
    eprintln!(
        "{} requests, {failed} failed; to the origin {moved:?} after the cache failed",
        all.len()
    );
}

/// An aggregate cluster's `lb_policy` must be CLUSTER_PROVIDED, as in Envoy, and it takes no endpoints.
#[tokio::test]
async fn aggregate_cluster_config_is_checked() {
    let origin = Upstream::start("origin").await;
    let mut bad = aggregate("entity", &["origin"]);
    bad["lb_policy"] = json!("ROUND_ROBIN");
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "entity")]);
    let config = bootstrap(table, vec![cluster("origin", &[origin.addr()]), bad], Value::Null);
    let (code, _, stderr) =
        crate::harness::validate(&serde_json::to_string(&config).unwrap_or_default()).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("lb_policy must be CLUSTER_PROVIDED"), "{stderr}");

    let mut selfish = aggregate("entity", &["entity", "origin"]);
    selfish["load_assignment"] = json!({"cluster_name": "entity", "endpoints": []});
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "entity")]);
    let config = bootstrap(
        table,
        vec![cluster("origin", &[origin.addr()]), selfish],
        Value::Null,
    );
    let (code, _, stderr) =
        crate::harness::validate(&serde_json::to_string(&config).unwrap_or_default()).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("cannot include itself"), "{stderr}");
    assert!(stderr.contains("takes no load_assignment"), "{stderr}");
}
