//! Zone-aware routing (`cluster_manager.local_cluster_name`, `node.locality.zone`): the split of requests over
//! an upstream's zones follows Envoy's formula, and `/zone_routing` says so.

use std::collections::HashMap;
use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::harness::{Upstream, UpstreamOptions};
use crate::support::{bootstrap, routes, to_cluster, Proxy};

fn locality_endpoints(zones: &[(&str, Vec<SocketAddr>)]) -> Value {
    let endpoints: Vec<Value> = zones
        .iter()
        .map(|(zone, addrs)| {
            let lb: Vec<Value> = addrs
                .iter()
                .map(|a| {
                    json!({"endpoint": {"address": {"socket_address": {
                        "address": a.ip().to_string(), "port_value": a.port()}}}})
                })
                .collect();
            json!({"locality": {"zone": zone}, "lb_endpoints": lb})
        })
        .collect();
    Value::from(endpoints)
}

fn zoned_cluster(name: &str, zones: &[(&str, Vec<SocketAddr>)]) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": locality_endpoints(zones)},
    })
}

#[tokio::test]
async fn the_split_over_zones_follows_envoys_formula() {
    // Upstream: zone a 1 host, b 2, c 3, each on its own 127.0.0.x address.
    let layout = [("a", 1), ("b", 2), ("c", 3)];
    let mut ups = Vec::new();
    let mut zones: Vec<(&str, Vec<SocketAddr>)> = Vec::new();
    let mut ip = 10u8;
    for (zone, n) in layout {
        let mut addrs = Vec::new();
        for i in 0..n {
            ip += 1;
            let options = UpstreamOptions {
                bind: Some(SocketAddr::from(([127, 0, 0, ip], 0))),
                ..Default::default()
            };
            let up = Upstream::with_options(&format!("{zone}{i}"), options).await;
            addrs.push(up.addr());
            ups.push(up);
        }
        zones.push((zone, addrs));
    }
    // The local cluster (this service's instances; never called): a 2, b 1, c 1.
    let fake = |last: u8| SocketAddr::from(([127, 0, 1, last], 9));
    let local = zoned_cluster(
        "local",
        &[
            ("a", vec![fake(1), fake(2)]),
            ("b", vec![fake(3)]),
            ("c", vec![fake(4)]),
        ],
    );
    let svc = zoned_cluster("svc", &zones);
    let table = routes(vec![to_cluster(json!({"prefix": "/"}), "svc")]);
    let mut config = bootstrap(table, vec![local, svc], Value::Null);
    config["cluster_manager"] = json!({"local_cluster_name": "local"});
    config["node"] = json!({"id": "n", "cluster": "local", "locality": {"zone": "a"}});
    let proxy = Proxy::start(&config, &[]).await;

    // upstream% a 16.66, b 33.33, c 50; local% a 50, b 25, c 25. Zone a keeps 1666/5000 = 33.32 %; the
    // rest crosses by residual capacity b 833 : c 2500, so b 16.67 %, c 50.01 %.
    let want: HashMap<&str, f64> = [("a", 33.32), ("b", 16.67), ("c", 50.01)].into();
    let (_, body) = proxy.remora.admin_get("/zone_routing").await;
    let doc: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let svc = doc["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "svc"))
        .cloned()
        .unwrap_or_else(|| panic!("no svc in {body}"));
    assert_eq!(svc["active"], true, "{svc:#}");
    assert_eq!(svc["state"], "sampled", "{svc:#}");
    for z in svc["zones"].as_array().into_iter().flatten() {
        let zone = z["zone"].as_str().unwrap_or_default();
        let expected = z["expected_traffic_percent"].as_f64().unwrap_or_default();
        assert!((expected - want[zone]).abs() < 0.05, "{zone}: {expected} {svc:#}");
    }
    let local_doc = doc["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "local"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(local_doc["active"], false);

    // 6000 requests from 8 clients.
    let total = 6000;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = proxy.h1();
        tasks.spawn(async move {
            let mut counts: HashMap<String, u32> = HashMap::new();
            for _ in 0..total / 8 {
                let reply = client.get("/", &[]).await;
                let up = reply.header("x-upstream").unwrap_or_default();
                *counts.entry(up[..1].to_string()).or_default() += 1;
            }
            counts
        });
    }
    let mut counts: HashMap<String, u32> = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        for (k, v) in r.unwrap_or_default() {
            *counts.entry(k).or_default() += v;
        }
    }
    for (zone, pct) in &want {
        let got = 100.0 * f64::from(counts.get(*zone).copied().unwrap_or(0)) / f64::from(total);
        assert!(
            (got - pct).abs() < 2.0,
            "zone {zone}: {got:.2}% vs {pct}% ({counts:?})"
        );
    }
    let sampled = proxy.stat("cluster.svc.lb_zone_routing_sampled").await;
    let cross = proxy.stat("cluster.svc.lb_zone_routing_cross_zone").await;
    assert_eq!(sampled + cross, i64::from(total));
    assert!(proxy.stat("cluster.svc.lb_recalculate_zone_structures").await >= 1);
}
