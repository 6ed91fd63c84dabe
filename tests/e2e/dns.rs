//! STRICT_DNS and LOGICAL_DNS clusters against a real DNS server on loopback, with records changed while
//! traffic flows.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{load, Budget, DnsServer, Upstream, UpstreamOptions};
use crate::support::{bootstrap, routes, to_cluster, Proxy};

/// An origin on another loopback address (127.0.0.x), as a second "zone" host.
pub(crate) async fn origin_on(name: &str, ip: [u8; 4]) -> Upstream {
    Upstream::with_options(
        name,
        UpstreamOptions {
            bind: Some(SocketAddr::from((ip, 0))),
            ..Default::default()
        },
    )
    .await
}

pub(crate) fn dns_cluster(kind: &str, name: &str, port: u16, dns: SocketAddr) -> Value {
    json!({
        "name": "svc",
        "type": kind,
        "connect_timeout": "1s",
        "dns_refresh_rate": "0.1s",
        "dns_lookup_family": "V4_ONLY",
        "typed_dns_resolver_config": {
            "name": "envoy.network.dns_resolver.cares",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                "resolvers": [{"socket_address": {"address": dns.ip().to_string(), "port_value": dns.port()}}],
            }
        },
        "load_assignment": {"cluster_name": "svc", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": name, "port_value": port}}}}
        ]}]},
    })
}

#[tokio::test]
async fn strict_dns_follows_record_changes_under_load_without_failures() {
    let dns = DnsServer::start().await;
    let a = origin_on("a", [127, 0, 0, 2]).await;
    let b = origin_on("b", [127, 0, 0, 3]).await;
    // The two origins share a port number only by chance; DNS gives addresses, the port is the cluster's.
    let port = a.port();
    let b = if b.port() == port {
        b
    } else {
        origin_on_port("b", [127, 0, 0, 3], port).await
    };
    dns.set("svc.test", &[IpAddr::from([127, 0, 0, 2])]);

    let config = bootstrap(
        routes(vec![to_cluster(json!({"prefix": "/"}), "svc")]),
        vec![dns_cluster("STRICT_DNS", "svc.test", port, dns.addr())],
        json!({}),
    );
    let proxy = Proxy::start(&config, &[]).await;
    // The server turned LIVE after the first resolution: the host is there.
    assert_eq!(proxy.stat("cluster.svc.membership_total").await, 1);
    let r = proxy.h1().get("/x", &[]).await;
    assert_eq!(r.header("x-upstream"), Some("a"));

    // Change the record while requests flow; none may fail.
    let client = proxy.h1();
    let traffic = tokio::spawn(async move {
        load(&client, 4, Budget::For(Duration::from_millis(1500)), |_| {
            crate::harness::build_request(http::Method::GET, "/x", &[], bytes::Bytes::new())
        })
        .await
    });
    // Change the record once traffic is flowing to `a`.
    crate::harness::within(Duration::from_secs(5), "traffic on a", async {
        while a.requests() < 20 {
            tokio::task::yield_now().await;
            tokio::time::sleep(crate::harness::POLL_INTERVAL).await;
        }
    })
    .await;
    dns.set("svc.test", &[IpAddr::from([127, 0, 0, 3])]);
    let report = traffic.await.unwrap_or_else(|e| panic!("load task: {e}"));
    report.assert_all_ok();
    assert!(b.requests() > 0, "the new address took traffic");
    let before = a.requests();
    for _ in 0..5 {
        assert_eq!(proxy.h1().get("/x", &[]).await.header("x-upstream"), Some("b"));
    }
    assert_eq!(a.requests(), before, "the old address took no more traffic");
    assert!(proxy.stat("cluster.svc.update_success").await >= 2);
}

pub(crate) async fn origin_on_port(name: &str, ip: [u8; 4], port: u16) -> Upstream {
    Upstream::with_options(
        name,
        UpstreamOptions {
            bind: Some(SocketAddr::from((ip, port))),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test]
async fn a_failed_lookup_keeps_the_last_good_hosts_and_counts_update_failure() {
    let dns = DnsServer::start().await;
    let a = origin_on("a", [127, 0, 0, 4]).await;
    dns.set("keep.test", &[IpAddr::from([127, 0, 0, 4])]);
    let config = bootstrap(
        routes(vec![to_cluster(json!({"prefix": "/"}), "svc")]),
        vec![dns_cluster("STRICT_DNS", "keep.test", a.port(), dns.addr())],
        json!({}),
    );
    let proxy = Proxy::start(&config, &[]).await;
    dns.fail("keep.test");
    proxy
        .remora
        .wait_stat("cluster.svc.update_failure", |v| v >= 2, Duration::from_secs(10))
        .await;
    assert_eq!(proxy.stat("cluster.svc.membership_total").await, 1);
    assert_eq!(proxy.h1().get("/", &[]).await.status, 200);
}

#[tokio::test]
async fn logical_dns_uses_the_first_address_only() {
    let dns = DnsServer::start().await;
    let a = origin_on("a", [127, 0, 0, 5]).await;
    dns.set(
        "logical.test",
        &[IpAddr::from([127, 0, 0, 5]), IpAddr::from([127, 0, 0, 6])],
    );
    let config = bootstrap(
        routes(vec![to_cluster(json!({"prefix": "/"}), "svc")]),
        vec![dns_cluster("LOGICAL_DNS", "logical.test", a.port(), dns.addr())],
        json!({}),
    );
    let proxy = Proxy::start(&config, &[]).await;
    assert_eq!(proxy.stat("cluster.svc.membership_total").await, 1);
    for _ in 0..4 {
        assert_eq!(proxy.h1().get("/", &[]).await.status, 200);
    }
    let (_, body) = proxy.remora.admin_get("/clusters").await;
    assert!(body.contains("svc::127.0.0.5:"), "{body}");
    assert!(body.contains("::hostname::logical.test"), "{body}");
}
