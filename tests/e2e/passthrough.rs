//! Passthrough: the dynamic forward proxy (absolute-form URIs and `host` resolved through a DNS cache),
//! `ORIGINAL_DST` clusters addressed by header, and CONNECT tunnels, through the real binary.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{DnsServer, Echo, Upstream};
use crate::support::{bootstrap, routes, to_cluster, Proxy, RawConn};

const DFP_FILTER: &str =
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig";
const DFP_CLUSTER: &str =
    "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const STDOUT_LOG: &str = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";

fn dns_cache(dns: SocketAddr, max_hosts: u32) -> Value {
    json!({
        "name": "dfp",
        "dns_lookup_family": "V4_ONLY",
        "max_hosts": max_hosts,
        "typed_dns_resolver_config": {
            "name": "envoy.network.dns_resolver.cares",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                "resolvers": [{"socket_address": {"address": dns.ip().to_string(), "port_value": dns.port()}}],
            }
        },
    })
}

fn dfp_cluster(cache: &Value) -> Value {
    json!({
        "name": "dynamic",
        "connect_timeout": "1s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.dynamic_forward_proxy",
            "typed_config": {"@type": DFP_CLUSTER, "dns_cache_config": cache},
        },
    })
}

/// A forward proxy: every request (and CONNECT) to the dynamic forward proxy cluster, logging
/// `%UPSTREAM_HOST%` on stdout.
fn dfp_bootstrap(dns: SocketAddr, max_hosts: u32, extra: Vec<Value>) -> Value {
    let cache = dns_cache(dns, max_hosts);
    let mut rs = vec![json!({"match": {"connect_matcher": {}}, "route": {"cluster": "dynamic"}})];
    rs.push(to_cluster(json!({"prefix": "/"}), "dynamic"));
    let mut clusters = vec![dfp_cluster(&cache)];
    clusters.extend(extra);
    bootstrap(
        routes(rs),
        clusters,
        json!({
            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
            "http_filters": [
                {"name": "envoy.filters.http.dynamic_forward_proxy", "typed_config": {"@type": DFP_FILTER, "dns_cache_config": cache}},
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
            ],
            "access_log": [{"name": "envoy.access_loggers.stdout", "typed_config": {
                "@type": STDOUT_LOG,
                "log_format": {"text_format_source": {"inline_string": "ACCESS %REQ(:AUTHORITY)% %RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_HOST%\n"}},
            }}],
        }),
    )
}

pub(crate) async fn get_absolute(
    proxy: SocketAddr,
    authority: &str,
    path: &str,
) -> crate::support::RawResponse {
    let mut c = RawConn::connect(proxy).await;
    c.send(
        format!("GET http://{authority}{path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    c.response(false).await
}

#[tokio::test]
async fn dynamic_forward_proxy_resolves_absolute_uris_once_and_keeps_per_host_stats() {
    let dns = DnsServer::start().await;
    let origin = Upstream::start("origin").await;
    dns.set("svc-a.test", &[IpAddr::from([127, 0, 0, 1])]);
    let proxy = Proxy::start(&dfp_bootstrap(dns.addr(), 1024, vec![]), &[]).await;
    let authority = format!("svc-a.test:{}", origin.port());

    let r = get_absolute(proxy.addr, &authority, "/hello?x=1").await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let echo = Echo::parse(&r.body);
    // Origin-form upstream, with the authority as `host`.
    assert_eq!(echo.path, "/hello?x=1");
    assert_eq!(echo.header("host"), Some(authority.as_str()));
    let queries = dns.queries();

    // A cache hit: no new DNS query; `host` (origin-form) finds the same host.
    let r = proxy.h1().get("/again", &[("host", &authority)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        dns.queries(),
        queries,
        "the second request must be answered from the cache"
    );

    assert_eq!(proxy.stat("dns_cache.dfp.dns_query_attempt").await, 1);
    assert_eq!(proxy.stat("dns_cache.dfp.host_added").await, 1);
    assert_eq!(proxy.stat("dns_cache.dfp.num_hosts").await, 1);
    assert_eq!(proxy.stat("cluster.dynamic.upstream_rq_200").await, 2);
    let (_, clusters) = proxy.remora.admin_get("/clusters").await;
    let host = format!("dynamic::127.0.0.1:{}", origin.port());
    assert!(
        clusters.contains(&format!("{host}::hostname::svc-a.test")),
        "{clusters}"
    );
    assert!(clusters.contains(&format!("{host}::rq_total::2")), "{clusters}");
    let log = stopped_stdout(proxy).await;
    assert!(
        log.contains(&format!("ACCESS {authority} 200 - 127.0.0.1:{}", origin.port())),
        "{log}"
    );
}

/// The proxy's stdout once it has exited (access logs are flushed every 10 s, and at exit).
async fn stopped_stdout(mut proxy: Proxy) -> String {
    proxy.remora.sigterm();
    proxy.remora.wait_exit(Duration::from_secs(10)).await;
    proxy.remora.stdout()
}

#[tokio::test]
async fn dynamic_forward_proxy_answers_503_for_unresolvable_names_and_cache_overflow() {
    let dns = DnsServer::start().await;
    let origin = Upstream::start("origin").await;
    dns.set("one.test", &[IpAddr::from([127, 0, 0, 1])]);
    dns.set("two.test", &[IpAddr::from([127, 0, 0, 1])]);
    dns.fail("broken.test");
    let proxy = Proxy::start(&dfp_bootstrap(dns.addr(), 1, vec![]), &[]).await;

    let r = get_absolute(proxy.addr, "broken.test", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(String::from_utf8_lossy(&r.body), "DNS resolution failure");
    assert_eq!(proxy.stat("dns_cache.dfp.dns_query_failure").await, 1);
    // The failure is not cached: the next request asks again.
    let _ = get_absolute(proxy.addr, "broken.test", "/").await;
    assert_eq!(proxy.stat("dns_cache.dfp.dns_query_failure").await, 2);

    let r = get_absolute(proxy.addr, &format!("one.test:{}", origin.port()), "/").await;
    assert_eq!(r.status, 200);
    let r = get_absolute(proxy.addr, &format!("two.test:{}", origin.port()), "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(String::from_utf8_lossy(&r.body), "DNS cache overflow");
    assert_eq!(proxy.stat("dns_cache.dfp.host_overflow").await, 1);
    let log = stopped_stdout(proxy).await;
    assert!(log.contains("ACCESS broken.test 503 DF -"), "{log}");
}

#[tokio::test]
async fn connect_tunnels_tcp_through_the_dynamic_forward_proxy() {
    let dns = DnsServer::start().await;
    let origin = Upstream::start("origin").await;
    dns.set("tunnel.test", &[IpAddr::from([127, 0, 0, 1])]);
    let proxy = Proxy::start(&dfp_bootstrap(dns.addr(), 1024, vec![]), &[]).await;
    let authority = format!("tunnel.test:{}", origin.port());

    let mut c = RawConn::connect(proxy.addr).await;
    c.send(format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n\r\n").as_bytes())
        .await;
    let r = c.response(true).await;
    assert_eq!(r.status, 200, "{r:?}");
    // What follows is the client's own bytes to the origin: an HTTP/1.1 request the proxy does not parse.
    c.send(b"GET /inside HTTP/1.1\r\nhost: tunnelled\r\nx-inner: yes\r\nconnection: close\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    let echo = Echo::parse(&r.body);
    assert_eq!(echo.path, "/inside");
    assert_eq!(echo.header("host"), Some("tunnelled"));
    assert_eq!(echo.header("x-inner"), Some("yes"));
    assert_eq!(proxy.stat("cluster.dynamic.upstream_cx_total").await, 1);
    assert!(proxy.stat("cluster.dynamic.upstream_cx_tx_bytes_total").await > 0);

    // A CONNECT to a port nobody listens on: 503 with the connect failure, as Envoy words it.
    let closed = crate::support::closed_port();
    let mut c = RawConn::connect(proxy.addr).await;
    c.send(
        format!(
            "CONNECT tunnel.test:{} HTTP/1.1\r\nhost: tunnel.test\r\n\r\n",
            closed.port()
        )
        .as_bytes(),
    )
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 503);
    let log = stopped_stdout(proxy).await;
    assert!(
        log.contains(&format!("ACCESS {authority} 200 - 127.0.0.1:{}", origin.port())),
        "{log}"
    );
    assert!(log.contains(" 503 UF "), "{log}");
}

#[tokio::test]
async fn connect_is_refused_without_upgrade_configs_and_plain_prefix_routes_do_not_match_it() {
    let origin = Upstream::start("origin").await;
    let config = bootstrap(
        routes(vec![to_cluster(json!({"prefix": "/"}), "origin")]),
        vec![crate::support::cluster("origin", &[origin.addr()])],
        Value::Null,
    );
    let proxy = Proxy::start(&config, &[]).await;
    let mut c = RawConn::connect(proxy.addr).await;
    c.send(format!("CONNECT {} HTTP/1.1\r\nhost: x\r\n\r\n", origin.addr()).as_bytes())
        .await;
    let r = c.response(true).await;
    assert_eq!(r.status, 404);
    assert_eq!(proxy.h1().get("/", &[]).await.status, 200);
}

fn original_dst_cluster(header: Option<&str>) -> Value {
    let mut od = json!({"use_http_header": true});
    if let Some(h) = header {
        od["http_header_name"] = json!(h);
    }
    json!({
        "name": "passthrough",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
        "original_dst_lb_config": od,
    })
}

#[tokio::test]
async fn original_dst_takes_the_upstream_address_from_the_header() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let config = bootstrap(
        routes(vec![to_cluster(json!({"prefix": "/"}), "passthrough")]),
        vec![original_dst_cluster(None)],
        Value::Null,
    );
    let proxy = Proxy::start(&config, &[]).await;
    let client = proxy.h1();
    let to_a = a.addr().to_string();
    let to_b = b.addr().to_string();
    assert_eq!(
        client
            .get("/", &[("x-envoy-original-dst-host", &to_a)])
            .await
            .echo()
            .upstream_name,
        "a"
    );
    assert_eq!(
        client
            .get("/", &[("x-envoy-original-dst-host", &to_b)])
            .await
            .echo()
            .upstream_name,
        "b"
    );
    assert_eq!(
        client
            .get("/", &[("x-envoy-original-dst-host", &to_a)])
            .await
            .echo()
            .upstream_name,
        "a"
    );
    // Without the header (or with something that is not ip:port) there is no host.
    let r = client.get("/", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (503, "no healthy upstream".to_string())
    );
    let r = client
        .get("/", &[("x-envoy-original-dst-host", "not-an-address")])
        .await;
    assert_eq!(r.status.as_u16(), 503);
    assert_eq!(proxy.stat("cluster.passthrough.membership_total").await, 2);
    let (_, clusters) = proxy.remora.admin_get("/clusters").await;
    assert!(
        clusters.contains(&format!("passthrough::{to_a}::rq_total::2")),
        "{clusters}"
    );
}

#[tokio::test]
async fn original_dst_header_name_is_configurable() {
    let a = Upstream::start("a").await;
    let config = bootstrap(
        routes(vec![to_cluster(json!({"prefix": "/"}), "passthrough")]),
        vec![original_dst_cluster(Some("x-dest"))],
        Value::Null,
    );
    let proxy = Proxy::start(&config, &[]).await;
    let r = proxy.h1().get("/", &[("x-dest", &a.addr().to_string())]).await;
    assert_eq!(r.echo().upstream_name, "a");
    // The default header is not looked at when another is named.
    let r = proxy
        .h1()
        .get("/", &[("x-envoy-original-dst-host", &a.addr().to_string())])
        .await;
    assert_eq!(r.status.as_u16(), 503);
}

#[tokio::test]
async fn original_dst_without_a_redirect_has_no_host() {
    // The listener filter restores the original destination only when netfilter rewrote it; a direct
    // connection has none, so an ORIGINAL_DST cluster without a header finds no host (Envoy's behaviour).
    let mut cluster = original_dst_cluster(None);
    cluster["original_dst_lb_config"] = json!({});
    let mut config = bootstrap(
        routes(vec![to_cluster(json!({"prefix": "/"}), "passthrough")]),
        vec![cluster],
        Value::Null,
    );
    config["static_resources"]["listeners"][0]["listener_filters"] = json!([{
        "name": "envoy.filters.listener.original_dst",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"},
    }]);
    let proxy = Proxy::start(&config, &[]).await;
    let r = proxy.h1().get("/", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (503, "no healthy upstream".to_string())
    );
}

/// `config/default.yaml`, the embedded default, on ports 0 (the file itself binds 15001 and 9901).
fn default_config_on_free_ports() -> String {
    let text = include_str!("../../config/default.yaml");
    assert!(text.contains("port_value: 15001") && text.contains("port_value: 9901"));
    text.replace("port_value: 15001", "port_value: 0")
        .replace("port_value: 9901", "port_value: 0")
}

#[tokio::test]
async fn the_embedded_default_validates_as_is() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_remora"))
        .args(["--mode", "validate"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("validate: {e}"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn the_default_development_proxy_forwards_absolute_uris_and_connect_to_localhost() {
    let origin = Upstream::start("origin").await;
    let remora =
        crate::harness::Remora::start(&default_config_on_free_ports(), &["--concurrency", "2"]).await;
    remora.wait_ready().await;
    let proxy = remora.listener_addr("dev_proxy").await;
    let authority = format!("localhost:{}", origin.port());

    // `http_proxy=http://127.0.0.1:15001 curl http://localhost:<port>/` sends this.
    let r = get_absolute(proxy, &authority, "/via-proxy").await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(Echo::parse(&r.body).path, "/via-proxy");

    // HTTPS through the proxy starts with CONNECT; the tunnel carries whatever the client speaks.
    let mut c = RawConn::connect(proxy).await;
    c.send(format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n\r\n").as_bytes())
        .await;
    assert_eq!(c.response(true).await.status, 200);
    c.send(b"GET /tunnelled HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await;
    assert_eq!(Echo::parse(&c.response(false).await.body).path, "/tunnelled");

    // curl, where the machine has it, as a user would run it.
    if let Ok(out) = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-p",
            "-x",
            &format!("http://{proxy}"),
            &format!("http://{authority}/curl"),
        ])
        .env("http_proxy", format!("http://{proxy}"))
        .output()
        .await
    {
        assert!(out.status.success(), "curl through CONNECT: {out:?}");
        assert_eq!(Echo::parse(&out.stdout).path, "/curl");
    }

    // The reliability defaults are in place on the passthrough cluster.
    let stats = remora.stats().await;
    assert!(
        stats.contains_key("cluster.dynamic_forward_proxy.outlier_detection.ejections_active"),
        "{stats:?}"
    );
    assert_eq!(stats.get("dns_cache.dev_proxy.num_hosts"), Some(&1));
    let mut remora = remora;
    remora.sigterm();
    remora.wait_exit(Duration::from_secs(10)).await;
    let log = remora.stdout();
    let upstream = format!("upstream=127.0.0.1:{}", origin.port());
    assert!(
        log.contains(&format!("\"GET {authority}/via-proxy HTTP/1.1\" 200 - ")),
        "{log}"
    );
    assert!(log.contains(&upstream), "{log}");
    assert!(log.contains(&format!("\"CONNECT {authority}")), "{log}");
}

/// A TCP origin that answers every chunk with `<name>:<chunk>`.
async fn tcp_origin(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut out = format!("{name}:").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn tcp_bootstrap(tcp_proxy: Value, clusters: Vec<Value>) -> Value {
    let mut t = tcp_proxy;
    t["@type"] = json!("type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy");
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": crate::support::LISTENER,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": t}]}],
            }],
            "clusters": clusters,
        },
    })
}

async fn round_trip(s: &mut tokio::net::TcpStream, msg: &str) -> String {
    s.write_all(msg.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
    let mut buf = [0u8; 4096];
    let n = crate::harness::within(
        crate::harness::DEFAULT_TIMEOUT,
        "a tcp_proxy echo",
        s.read(&mut buf),
    )
    .await
    .unwrap_or_else(|e| panic!("read: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn tcp_proxy_copies_bytes_to_the_cluster_with_tcp_stats() {
    let origin = tcp_origin("one").await;
    let config = tcp_bootstrap(
        json!({"stat_prefix": "echo", "cluster": "tcp"}),
        vec![crate::support::cluster("tcp", &[origin])],
    );
    let proxy = Proxy::start(&config, &[]).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(round_trip(&mut s, "hello").await, "one:hello");
    assert_eq!(round_trip(&mut s, "again").await, "one:again");
    drop(s);
    proxy
        .remora
        .wait_stat(
            "cluster.tcp.upstream_cx_destroy",
            |v| v == 1,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(proxy.stat("tcp.echo.downstream_cx_total").await, 1);
    assert_eq!(proxy.stat("tcp.echo.downstream_cx_rx_bytes_total").await, 10);
    assert_eq!(proxy.stat("tcp.echo.downstream_cx_tx_bytes_total").await, 18);
    assert_eq!(proxy.stat("cluster.tcp.upstream_cx_total").await, 1);
    assert_eq!(proxy.stat("cluster.tcp.upstream_cx_tx_bytes_total").await, 10);
}

#[tokio::test]
async fn tcp_proxy_weighted_clusters_idle_timeout_and_missing_cluster() {
    let a = tcp_origin("a").await;
    let b = tcp_origin("b").await;
    let config = tcp_bootstrap(
        json!({"stat_prefix": "w", "idle_timeout": "0.3s", "weighted_clusters": {"clusters": [
            {"name": "a", "weight": 1}, {"name": "b", "weight": 1}]}}),
        vec![
            crate::support::cluster("a", &[a]),
            crate::support::cluster("b", &[b]),
        ],
    );
    let proxy = Proxy::start(&config, &[]).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let r = round_trip(&mut s, "x").await;
        seen.insert(r);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "both weighted clusters take connections: {seen:?}");

    // Idle for longer than idle_timeout: the proxy closes the connection.
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(round_trip(&mut s, "x").await.len(), 3);
    let mut buf = [0u8; 16];
    let n = crate::harness::within(Duration::from_secs(5), "the idle close", s.read(&mut buf)).await;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert_eq!(proxy.stat("tcp.w.idle_timeout").await, 1);

    // A cluster that does not exist: the connection is closed and counted.
    let config = tcp_bootstrap(json!({"stat_prefix": "none", "cluster": "missing"}), vec![]);
    let proxy = Proxy::start(&config, &[]).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let n = crate::harness::within(Duration::from_secs(5), "the close", s.read(&mut buf)).await;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert_eq!(proxy.stat("tcp.none.downstream_cx_no_route").await, 1);
}

/// Transparent interception as sidecar injectors set it up: in a new network namespace, an iptables
/// `REDIRECT` sends a client's outbound connections to Remora, whose `original_dst` listener filter recovers
/// the destination the client dialled, and the ORIGINAL_DST cluster connects there.
///
/// Network namespaces are per thread: the test runs on its own thread after `unshare(CLONE_NEWNET)`, and the
/// processes it starts (ip, iptables, remora) inherit the namespace. Skipped, saying why, without the
/// privileges or the tools.
#[test]
fn iptables_redirect_reaches_the_original_destination() {
    in_new_netns(
        "iptables_redirect_reaches_the_original_destination",
        redirected_request,
    );
}

/// Istio's outbound shape: a `use_original_dst` listener takes every redirected connection and hands it off to
/// the listener of its original destination (`bind_to_port: false`, an HTTP connection manager with its own
/// cluster); destinations no listener declares go through the listener's passthrough `default_filter_chain`
/// (a TCP proxy to an `ORIGINAL_DST` cluster).
#[test]
fn iptables_redirect_hands_off_to_the_listener_of_the_original_destination() {
    in_new_netns(
        "iptables_redirect_hands_off_to_the_listener_of_the_original_destination",
        handed_off_requests,
    );
}

/// Runs a shell command in the test's network namespace.
type Sh = &'static dyn Fn(&str) -> Result<(), String>;

/// Runs `scenario` on a thread in a new network namespace with loopback up and iptables usable; skipped,
/// saying why, without the privileges or the tools.
fn in_new_netns<F>(name: &str, scenario: fn(Sh) -> F)
where
    F: std::future::Future<Output = Result<(), String>> + 'static,
{
    let run = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            ));
        }
        let sh: Sh = &|cmd: &str| {
            let out = std::process::Command::new("sh")
                .args(["-c", cmd])
                .output()
                .map_err(|e| format!("{cmd}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("{cmd}: {}", String::from_utf8_lossy(&out.stderr)))
            }
        };
        sh("ip link set lo up")?;
        sh("iptables -t nat -L OUTPUT >/dev/null")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(scenario(sh))
    });
    match run.join() {
        Ok(Ok(())) => {}
        Ok(Err(why)) => eprintln!("SKIPPED {name}: {why}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

async fn handed_off_requests(sh: Sh) -> Result<(), String> {
    let bind = |ip: [u8; 4]| crate::harness::UpstreamOptions {
        bind: Some(SocketAddr::from((ip, 0))),
        ..Default::default()
    };
    let declared = Upstream::with_options("declared", bind([127, 0, 0, 5])).await;
    let undeclared = Upstream::with_options("undeclared", bind([127, 0, 0, 6])).await;
    let hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "outbound_declared",
        "route_config": routes(vec![to_cluster(json!({"prefix": "/"}), "declared")]),
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    });
    let config = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": crate::support::LISTENER,
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "use_original_dst": true,
                    "listener_filters": [{
                        "name": "envoy.filters.listener.original_dst",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"},
                    }],
                    "filter_chains": [],
                    "default_filter_chain": tcp_chain("PassthroughCluster", "passthrough", Value::Null),
                },
                {
                    "name": "declared",
                    "address": {"socket_address": {"address": "127.0.0.5", "port_value": declared.port()}},
                    "bind_to_port": false,
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
                },
            ],
            "clusters": [
                crate::support::cluster("declared", &[declared.addr()]),
                {"name": "passthrough", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s"},
            ],
        },
    });
    let proxy = Proxy::start(&config, &[]).await;
    sh(&format!(
        "iptables -t nat -A OUTPUT -p tcp -s 127.0.0.7 -j REDIRECT --to-ports {}",
        proxy.addr.port()
    ))?;
    let get = |to: SocketAddr, path: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::from(([127, 0, 0, 7], 0)))
            .map_err(|e| e.to_string())?;
        let mut s = socket.connect(to).await.map_err(|e| e.to_string())?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        crate::harness::within(
            crate::harness::DEFAULT_TIMEOUT,
            "a response",
            s.read_to_end(&mut response),
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&response).to_ascii_lowercase())
    };
    // The declared destination: handed off to its listener, routed by its connection manager.
    let text = get(declared.addr(), "/declared").await?;
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(
        text.contains("x-envoy-upstream-service-time"),
        "not through the HCM: {text}"
    );
    assert!(text.contains("\"path\":\"/declared\""), "{text}");
    assert_eq!(proxy.stat("cluster.declared.upstream_rq_200").await, 1);
    assert_eq!(proxy.stat("http.outbound_declared.downstream_rq_total").await, 1);
    // Anything else: the passthrough chain copies bytes to the original destination, untouched.
    let text = get(undeclared.addr(), "/undeclared").await?;
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(!text.contains("x-envoy-upstream-service-time"), "{text}");
    assert!(text.contains("\"upstream_name\":\"undeclared\""), "{text}");
    assert_eq!(proxy.stat("tcp.PassthroughCluster.downstream_cx_total").await, 1);
    assert_eq!(proxy.stat("cluster.declared.upstream_rq_total").await, 1);
    Ok(())
}

async fn redirected_request(sh: Sh) -> Result<(), String> {
    let origin = Upstream::with_options(
        "original",
        crate::harness::UpstreamOptions {
            bind: Some(SocketAddr::from(([127, 0, 0, 5], 0))),
            ..Default::default()
        },
    )
    .await;
    let mut cluster = original_dst_cluster(None);
    cluster["original_dst_lb_config"] = json!({});
    let mut config = bootstrap(
        routes(vec![to_cluster(json!({"prefix": "/"}), "passthrough")]),
        vec![cluster],
        Value::Null,
    );
    config["static_resources"]["listeners"][0]["listener_filters"] = json!([{
        "name": "envoy.filters.listener.original_dst",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"},
    }]);
    let proxy = Proxy::start(&config, &[]).await;
    // The "application" sends from 127.0.0.7; Remora's own upstream connections (from 127.0.0.1) are not
    // redirected, as an injector excludes the proxy's uid.
    sh(&format!(
        "iptables -t nat -A OUTPUT -p tcp -s 127.0.0.7 -j REDIRECT --to-ports {}",
        proxy.addr.port()
    ))?;
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::from(([127, 0, 0, 7], 0)))
        .map_err(|e| e.to_string())?;
    let mut s = socket.connect(origin.addr()).await.map_err(|e| e.to_string())?;
    s.write_all(b"GET /redirected HTTP/1.1\r\nhost: svc.internal\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    crate::harness::within(
        crate::harness::DEFAULT_TIMEOUT,
        "the redirected response",
        s.read_to_end(&mut response),
    )
    .await
    .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&response).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(
        text.contains("x-envoy-upstream-service-time"),
        "not through the proxy: {text}"
    );
    assert!(text.contains("\"path\":\"/redirected\""), "{text}");
    let (_, clusters) = proxy.remora.admin_get("/clusters").await;
    assert!(
        clusters.contains(&format!("passthrough::{}::rq_total::1", origin.addr())),
        "{clusters}"
    );
    Ok(())
}

#[tokio::test]
async fn dynamic_forward_proxy_follows_address_changes_and_expires_unused_hosts() {
    let dns = DnsServer::start().await;
    let a = Upstream::with_options(
        "a",
        crate::harness::UpstreamOptions {
            bind: Some(SocketAddr::from(([127, 0, 0, 2], 0))),
            ..Default::default()
        },
    )
    .await;
    // Same port on another loopback address, so the name's port stays right when its address moves.
    let _b = Upstream::with_options(
        "b",
        crate::harness::UpstreamOptions {
            bind: Some(SocketAddr::from(([127, 0, 0, 3], a.port()))),
            ..Default::default()
        },
    )
    .await;
    dns.set("moving.test", &[IpAddr::from([127, 0, 0, 2])]);
    let mut config = dfp_bootstrap(dns.addr(), 16, vec![]);
    let cache =
        &mut config["static_resources"]["clusters"][0]["cluster_type"]["typed_config"]["dns_cache_config"];
    cache["dns_refresh_rate"] = json!("0.1s");
    cache["host_ttl"] = json!("1s");
    let proxy = Proxy::start(&config, &[]).await;
    let authority = format!("moving.test:{}", a.port());
    let r = proxy.h1().get("/", &[("host", &authority)]).await;
    assert_eq!(r.echo().upstream_name, "a");

    dns.set("moving.test", &[IpAddr::from([127, 0, 0, 3])]);
    proxy
        .remora
        .wait_stat(
            "dns_cache.dfp.host_address_changed",
            |v| v >= 1,
            Duration::from_secs(5),
        )
        .await;
    let r = proxy.h1().get("/", &[("host", &authority)]).await;
    assert_eq!(r.echo().upstream_name, "b");
    assert_eq!(proxy.stat("dns_cache.dfp.host_added").await, 1);

    // Unused for host_ttl: removed from the cache and from the cluster.
    proxy
        .remora
        .wait_stat("dns_cache.dfp.host_removed", |v| v == 1, Duration::from_secs(5))
        .await;
    assert_eq!(proxy.stat("dns_cache.dfp.num_hosts").await, 0);
    assert_eq!(proxy.stat("cluster.dynamic.membership_total").await, 0);
}

pub(crate) fn cares(dns: SocketAddr) -> Value {
    json!({
        "name": "envoy.network.dns_resolver.cares",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
            "resolvers": [{"socket_address": {"address": dns.ip().to_string(), "port_value": dns.port()}}],
        }
    })
}

#[tokio::test]
async fn the_sidecar_example_sends_declared_hosts_to_their_cluster_and_passes_the_rest_through() {
    let dns = DnsServer::start().await;
    let app = Upstream::start("app").await;
    let payments = Upstream::start("payments").await;
    let other = Upstream::start("other").await;
    dns.set("payments.internal", &[IpAddr::from([127, 0, 0, 1])]);
    dns.set("undeclared.test", &[IpAddr::from([127, 0, 0, 1])]);

    let mut config: Value = serde_yaml::from_str(include_str!("../../config/examples/sidecar.yaml"))
        .unwrap_or_else(|e| panic!("config/examples/sidecar.yaml: {e}"));
    // Free ports, the test's origins and DNS server; nothing else changes.
    config["admin"]["address"]["socket_address"]["port_value"] = json!(0);
    let sr = &mut config["static_resources"];
    for l in sr["listeners"].as_array_mut().into_iter().flatten() {
        l["address"]["socket_address"] = json!({"address": "127.0.0.1", "port_value": 0});
    }
    let egress = &mut sr["listeners"][1]["filter_chains"][0]["filters"][0]["typed_config"];
    egress["http_filters"][0]["typed_config"]["dns_cache_config"]["typed_dns_resolver_config"] =
        cares(dns.addr());
    for c in sr["clusters"].as_array_mut().into_iter().flatten() {
        let port = match c["name"].as_str() {
            Some("local_app") => app.port(),
            Some("payments") => {
                c["typed_dns_resolver_config"] = cares(dns.addr());
                payments.port()
            }
            _ => {
                c["cluster_type"]["typed_config"]["dns_cache_config"]["typed_dns_resolver_config"] =
                    cares(dns.addr());
                continue;
            }
        };
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            ["port_value"] = json!(port);
    }
    let remora = crate::harness::Remora::start(&config.to_string(), &["--concurrency", "2"]).await;
    remora.wait_ready().await;
    let ingress = remora.listener_addr("ingress").await;
    let egress = remora.listener_addr("egress").await;

    let r = crate::harness::http1_client(ingress).get("/", &[]).await;
    assert_eq!(r.echo().upstream_name, "app");

    // A declared dependency: its own cluster (the name's port is the cluster's).
    let r = get_absolute(egress, "payments.internal", "/charge").await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(Echo::parse(&r.body).upstream_name, "payments");
    // An undeclared one passes through.
    let r = get_absolute(egress, &format!("undeclared.test:{}", other.port()), "/anything").await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(Echo::parse(&r.body).upstream_name, "other");

    let stats = remora.stats().await;
    assert_eq!(
        stats.get("cluster.payments.upstream_rq_200"),
        Some(&1),
        "{stats:?}"
    );
    assert_eq!(
        stats.get("cluster.passthrough.upstream_rq_200"),
        Some(&1),
        "{stats:?}"
    );
    assert_eq!(
        stats.get("cluster.local_app.upstream_rq_200"),
        Some(&1),
        "{stats:?}"
    );
}

fn tcp_chain(name: &str, cluster: &str, filter_chain_match: Value) -> Value {
    let mut c = json!({"name": name, "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": name, "cluster": cluster,
    }}]});
    if !filter_chain_match.is_null() {
        c["filter_chain_match"] = filter_chain_match;
    }
    c
}

/// Connects from `from` to `to`, sends one chunk, and returns what came back ("" when the proxy closed).
async fn chunk_from(from: [u8; 4], to: SocketAddr) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
    socket
        .bind(SocketAddr::from((from, 0)))
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let mut s = socket
        .connect(to)
        .await
        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
    let _ = s.write_all(b"x").await;
    let mut buf = [0u8; 256];
    match crate::harness::within(crate::harness::DEFAULT_TIMEOUT, "a chunk back", s.read(&mut buf)).await {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => String::new(),
    }
}

/// One port, several filter chains: each connection gets the chain that matches it most specifically
/// (destination address, then source), the default chain takes the rest, and without a default an unmatched
/// connection is closed and counted.
#[tokio::test]
async fn filter_chain_match_picks_the_most_specific_chain_per_connection() {
    let (dst, src, wide, fallback) = (
        tcp_origin("dst").await,
        tcp_origin("src").await,
        tcp_origin("wide").await,
        tcp_origin("default").await,
    );
    let listener = |default: bool| {
        let mut l = json!({
            "name": crate::support::LISTENER,
            "stat_prefix": "chains",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 0}},
            "filter_chains": [
                tcp_chain("to-3", "dst", json!({"prefix_ranges": [{"address_prefix": "127.0.0.3", "prefix_len": 32}]})),
                tcp_chain("from-5", "src", json!({"source_prefix_ranges": [{"address_prefix": "127.0.0.5", "prefix_len": 32}]})),
                tcp_chain("loopback", "wide", json!({"prefix_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}], "source_ports": []})),
            ],
        });
        if default {
            l["default_filter_chain"] = tcp_chain("fallback", "default", Value::Null);
        }
        l
    };
    let clusters = vec![
        crate::support::cluster("dst", &[dst]),
        crate::support::cluster("src", &[src]),
        crate::support::cluster("wide", &[wide]),
        crate::support::cluster("default", &[fallback]),
    ];
    let config = |default: bool| {
        json!({
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {"listeners": [listener(default)], "clusters": clusters.clone()},
        })
    };
    let proxy = Proxy::start(&config(false), &[]).await;
    let port = proxy.addr.port();
    let at = |ip: [u8; 4]| SocketAddr::from((ip, port));
    // The destination decides first: 127.0.0.3/32 beats 127.0.0.0/8, whoever connects.
    assert_eq!(chunk_from([127, 0, 0, 5], at([127, 0, 0, 3])).await, "dst:x");
    // 127.0.0.9 only matches the /8 chain (the from-5 chain has no destination range, ranked below it).
    assert_eq!(chunk_from([127, 0, 0, 5], at([127, 0, 0, 9])).await, "wide:x");
    assert_eq!(chunk_from([127, 0, 0, 1], at([127, 0, 0, 9])).await, "wide:x");
    assert_eq!(proxy.stat("tcp.to-3.downstream_cx_total").await, 1);
    assert_eq!(proxy.stat("tcp.loopback.downstream_cx_total").await, 2);
    assert_eq!(proxy.stat("listener.chains.no_filter_chain_match").await, 0);
    drop(proxy);

    // Only the from-5 chain has no destination range; an address outside 127/8 reaches it (and the default
    // chain when the source is not 127.0.0.5). Loopback is all this test has, so the listener's own
    // 127.0.0.0/8 chain is dropped here to let the source decide.
    let mut cfg = config(true);
    cfg["static_resources"]["listeners"][0]["filter_chains"]
        .as_array_mut()
        .unwrap()
        .truncate(2);
    let proxy = Proxy::start(&cfg, &[]).await;
    let at = |ip: [u8; 4]| SocketAddr::from((ip, proxy.addr.port()));
    assert_eq!(chunk_from([127, 0, 0, 5], at([127, 0, 0, 8])).await, "src:x");
    assert_eq!(chunk_from([127, 0, 0, 6], at([127, 0, 0, 8])).await, "default:x");
    assert_eq!(chunk_from([127, 0, 0, 6], at([127, 0, 0, 3])).await, "dst:x");
    drop(proxy);

    // No default: a connection nothing matches is closed and counted.
    let mut cfg = config(false);
    cfg["static_resources"]["listeners"][0]["filter_chains"]
        .as_array_mut()
        .unwrap()
        .truncate(2);
    let proxy = Proxy::start(&cfg, &[]).await;
    let at = |ip: [u8; 4]| SocketAddr::from((ip, proxy.addr.port()));
    assert_eq!(chunk_from([127, 0, 0, 6], at([127, 0, 0, 8])).await, "");
    assert_eq!(proxy.stat("listener.chains.no_filter_chain_match").await, 1);
}

#[tokio::test]
async fn filter_chains_that_tie_or_need_tls_are_refused_with_their_paths() {
    let listener = |chains: Value| {
        serde_json::to_string(&json!({"static_resources": {"listeners": [{
            "name": "l",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": chains,
        }], "clusters": [crate::support::cluster("c", &[crate::support::closed_port()])]}}))
        .unwrap()
    };
    let same = json!({"prefix_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]});
    let (code, _, err) = crate::harness::validate(&listener(json!([
        tcp_chain("a", "c", same.clone()),
        tcp_chain("b", "c", same),
    ])))
    .await;
    assert_ne!(code, 0);
    assert!(
        err.contains("static_resources.listeners[0].filter_chains") && err.contains("\"a\" and \"b\""),
        "{err}"
    );
    let (code, _, err) = crate::harness::validate(&listener(json!([tcp_chain(
        "sni",
        "c",
        json!({"server_names": ["example.com"]})
    )])))
    .await;
    assert_ne!(code, 0);
    assert!(
        err.contains("static_resources.listeners[0].filter_chains[0].filter_chain_match.server_names"),
        "{err}"
    );
}

/// tcp_proxy to an aggregate cluster: the connection goes to the first member with healthy hosts, and counts
/// there; the primary, its only host unhealthy, takes nothing.
#[tokio::test]
async fn tcp_proxy_to_an_aggregate_cluster_uses_the_healthy_member() {
    let primary = tcp_origin("primary").await;
    let secondary = tcp_origin("secondary").await;
    let mut p = crate::support::cluster("primary", &[primary]);
    p["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["health_status"] = json!("UNHEALTHY");
    let aggregate = json!({
        "name": "both",
        "connect_timeout": "1s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {"name": "envoy.clusters.aggregate", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
            "clusters": ["primary", "secondary"],
        }},
    });
    let config = tcp_bootstrap(
        json!({"stat_prefix": "agg", "cluster": "both"}),
        vec![p, crate::support::cluster("secondary", &[secondary]), aggregate],
    );
    let proxy = Proxy::start(&config, &[]).await;
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(round_trip(&mut s, "hi").await, "secondary:hi");
    }
    assert_eq!(proxy.stat("cluster.secondary.upstream_cx_total").await, 5);
    assert_eq!(proxy.stat("cluster.primary.upstream_cx_total").await, 0);
    assert_eq!(proxy.stat("cluster.both.upstream_cx_total").await, 0);
}
