//! Load-balancing policies across the endpoints of one STATIC cluster.

use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};

use crate::harness::{within, Upstream, DEFAULT_TIMEOUT, POLL_INTERVAL};
use crate::support::{bootstrap, cluster, routes, to_cluster, Proxy};

async fn two_hosts(policy: Option<Value>, extra: Value) -> (Upstream, Upstream, Proxy) {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut c = cluster("pair", &[a.addr(), b.addr()]);
    if let Some(policy) = policy {
        c["lb_policy"] = policy;
    }
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            c[k] = v;
        }
    }
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "pair")]);
    // One worker: round robin is per worker, so its order is exact.
    let proxy = Proxy::start(&bootstrap(table, vec![c], Value::Null), &["--concurrency", "1"]).await;
    (a, b, proxy)
}

#[tokio::test]
async fn round_robin_alternates_hosts() {
    let (a, b, proxy) = two_hosts(None, Value::Null).await;
    let client = proxy.h1();
    let mut seen = Vec::new();
    for _ in 0..10 {
        let reply = client.get("/", &[]).await;
        seen.push(reply.header("x-upstream").unwrap_or_default().to_owned());
    }
    assert!(seen.windows(2).all(|w| w[0] != w[1]), "not alternating: {seen:?}");
    assert_eq!((a.requests(), b.requests()), (5, 5));
}

#[tokio::test]
async fn random_reaches_both_hosts() {
    let (a, b, proxy) = two_hosts(Some(json!("RANDOM")), Value::Null).await;
    let client = proxy.h1();
    for _ in 0..200 {
        assert_eq!(client.get("/", &[]).await.status, StatusCode::OK);
    }
    // Expected 100 each; sd ~7.
    assert!(
        (60..=140).contains(&a.requests()),
        "a {} b {}",
        a.requests(),
        b.requests()
    );
    assert_eq!(a.requests() + b.requests(), 200);
}

#[tokio::test]
async fn least_request_avoids_the_busy_host() {
    // Choices are drawn with replacement (as Envoy does); with 20 of them both hosts are seen on all but
    // 2^-19 of picks, so the busier host loses.
    let (a, b, proxy) = two_hosts(
        Some(json!("LEAST_REQUEST")),
        json!({"least_request_lb_config": {"choice_count": 20}}),
    )
    .await;
    // Occupy one host with slow requests, then see where quick ones go.
    let slow_client = proxy.h1().with_timeout(Duration::from_secs(10));
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let client = slow_client.clone();
        slow.spawn(async move { client.try_get("/delay/1500", &[]).await });
    }
    within(DEFAULT_TIMEOUT, "the slow requests to arrive", async {
        while a.requests() + b.requests() < 3 {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
    .await;
    let (busy, idle) = if a.requests() > b.requests() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let busy_before = busy.requests();
    let idle_before = idle.requests();
    assert!(busy_before >= 2, "a {} b {}", a.requests(), b.requests());
    let quick = proxy.h1();
    for _ in 0..10 {
        assert_eq!(quick.get("/", &[]).await.status, StatusCode::OK);
    }
    assert_eq!(
        busy.requests(),
        busy_before,
        "a quick request went to the busy host"
    );
    assert_eq!(idle.requests(), idle_before + 10);
    while let Some(done) = slow.join_next().await {
        let reply = done
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("slow request: {e}"));
        assert_eq!(reply.status, StatusCode::OK);
    }
}

/// Three hosts behind `policy` (an `lb_policy` value, or a whole `load_balancing_policy` object), a route
/// hashing on `x-user`; returns the upstream each request with `x-user: <value>` reached.
async fn hashed(cluster_fields: Value) -> (Vec<Upstream>, Proxy) {
    let ups = vec![
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let addrs: Vec<_> = ups.iter().map(Upstream::addr).collect();
    let mut c = cluster("hashed", &addrs);
    if let Value::Object(extra) = cluster_fields {
        for (k, v) in extra {
            c[k] = v;
        }
    }
    let mut route = to_cluster(json!({"prefix": "/"}), "hashed");
    route["route"]["hash_policy"] = json!([{"header": {"header_name": "x-user"}}]);
    let proxy = Proxy::start(&bootstrap(routes(vec![route]), vec![c], Value::Null), &[]).await;
    (ups, proxy)
}

async fn assert_sticky_and_spread(proxy: &Proxy) {
    let client = proxy.h1();
    let mut reached = std::collections::HashMap::new();
    for user in 0..60 {
        let value = format!("user-{user}");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5 {
            let reply = client.get("/", &[("x-user", value.as_str())]).await;
            assert_eq!(reply.status, StatusCode::OK);
            seen.insert(reply.header("x-upstream").unwrap_or_default().to_owned());
        }
        assert_eq!(seen.len(), 1, "{value} reached {seen:?}");
        let host = seen.into_iter().next().unwrap_or_default();
        *reached.entry(host).or_insert(0) += 1;
    }
    // 60 keys over 3 equal hosts: each gets some (expected 20 each).
    assert_eq!(reached.len(), 3, "{reached:?}");
    assert!(reached.values().all(|&n| n >= 8), "{reached:?}");
}

#[tokio::test]
async fn ring_hash_keeps_a_header_value_on_one_host() {
    let (_ups, proxy) = hashed(json!({"lb_policy": "RING_HASH"})).await;
    assert_sticky_and_spread(&proxy).await;
}

#[tokio::test]
async fn maglev_from_load_balancing_policy_keeps_a_header_value_on_one_host() {
    let (_ups, proxy) = hashed(json!({"load_balancing_policy": {"policies": [{"typed_extension_config": {
        "name": "envoy.load_balancing_policies.maglev",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev"},
    }}]}}))
    .await;
    assert_sticky_and_spread(&proxy).await;
}

#[tokio::test]
async fn ring_hash_retry_with_previous_hosts_reaches_another_host() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    for up in [&a, &b] {
        up.set_handler(|_| async { crate::harness::reply(503, "down") });
    }
    let mut c = cluster("hashed", &[a.addr(), b.addr()]);
    c["lb_policy"] = json!("RING_HASH");
    let mut route = to_cluster(json!({"prefix": "/"}), "hashed");
    route["route"]["hash_policy"] = json!([{"header": {"header_name": "x-user"}}]);
    route["route"]["retry_policy"] = json!({
        "retry_on": "5xx",
        "num_retries": 1,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": 30,
    });
    let proxy = Proxy::start(&bootstrap(routes(vec![route]), vec![c], Value::Null), &[]).await;
    let client = proxy.h1();
    for user in 0..5 {
        let before = (a.requests(), b.requests());
        let value = format!("user-{user}");
        let reply = client.get("/", &[("x-user", value.as_str())]).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        // The first attempt went to the key's host, the retry to the other one.
        assert_eq!(
            (a.requests() - before.0, b.requests() - before.1),
            (1, 1),
            "{value}"
        );
    }
}
