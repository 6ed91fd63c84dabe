//! Criterion benches of Remora's hot functions: route matching, config loading, header work, load-balancer
//! picks, stats recording and what one request costs in stats. Each is short (3 s of measurement) so that the
//! whole run stays under two minutes:
//!
//! ```text
//! cargo bench -p remora-benches --bench hot
//! ```

// Set-up that fails is a broken bench: panicking is the right report.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode};
use http::{HeaderMap, Uri};
use remora::config::load::{self, Format};
use remora::config::node::{Errors, Node};
use remora::config::{bootstrap, descriptors, route};
use remora::listener::config::HcmStats;
use remora::route::RouteTable;
use remora::server::ClusterIds;
use remora::stats::Store;
use remora::upstream::breaker::{CircuitBreakers, CircuitBreakersConfig, Priority};
use remora::upstream::lb::Rng;
use remora::upstream::{ClusterStats, EndpointConfig, EndpointHealth, Host, HostSet, LbPolicy, Locality};

const ROUTES: usize = 1_000;
const CLUSTERS: usize = 1_000;

/// One virtual host with `ROUTES` prefix routes `/svc{i}/`, each to its own cluster.
fn route_table() -> RouteTable {
    let mut yaml = String::from("name: bench\nvirtual_hosts:\n- name: all\n  domains: [\"*\"]\n  routes:\n");
    for i in 0..ROUTES {
        yaml.push_str(&format!(
            "  - match: {{prefix: /svc{i}/}}\n    route: {{cluster: c{i}}}\n"
        ));
    }
    let desc = descriptors::message("envoy.config.route.v3.RouteConfiguration").unwrap();
    let msg = load::message_from_text(&yaml, Format::Yaml, &desc).unwrap();
    let errs = Errors::default();
    let ids = ClusterIds::default();
    let table = {
        let node = Node::root(&msg, "", &errs);
        route::lower_table(&node, &ids, None, &Store::new())
    };
    assert!(errs.is_empty(), "{:?}", errs.take());
    table.unwrap()
}

fn route_matching(c: &mut Criterion) {
    let table = route_table();
    let headers = HeaderMap::new();
    let mut g = c.benchmark_group("route_match_1000");
    for (name, path, hit) in [
        ("first", "/svc0/items/42", true),
        ("middle", "/svc500/items/42", true),
        ("last", "/svc999/items/42", true),
        ("miss", "/nowhere/items/42", false),
    ] {
        let uri: Uri = path.parse().unwrap();
        let line = |uri| remora::route::RequestLine {
            method: &http::Method::GET,
            authority: "example.com",
            uri,
            scheme: "http",
        };
        assert_eq!(table.route(&line(&uri), &headers).is_some(), hit);
        g.bench_function(name, |b| {
            b.iter(|| black_box(table.route(black_box(&line(black_box(&uri))), &headers)).is_some())
        });
    }
    g.finish();
}

/// A bootstrap with `CLUSTERS` static clusters (one endpoint each) and a listener routing to the first.
fn bootstrap_text() -> String {
    let mut yaml = String::from(
        r#"static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 10000}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
          route_config:
            virtual_hosts: [{name: v, domains: ["*"], routes: [{match: {prefix: /}, route: {cluster: c0}}]}]
  clusters:
"#,
    );
    for i in 0..CLUSTERS {
        yaml.push_str(&format!(
            "  - name: c{i}\n    connect_timeout: 0.25s\n    type: STATIC\n    lb_policy: LEAST_REQUEST\n    \
             load_assignment:\n      cluster_name: c{i}\n      endpoints:\n      - lb_endpoints:\n        \
             - endpoint: {{address: {{socket_address: {{address: 10.{}.{}.1, port_value: 8080}}}}}}\n",
            i / 256,
            i % 256
        ));
    }
    yaml
}

fn config_loading(c: &mut Criterion) {
    let text = bootstrap_text();
    let desc = descriptors::message("envoy.config.bootstrap.v3.Bootstrap").unwrap();
    let parsed = load::message_from_text(&text, Format::Yaml, &desc).unwrap();
    let lowered = bootstrap::lower(parsed.clone(), &Store::new()).unwrap();
    assert_eq!(lowered.clusters.len(), CLUSTERS);

    let mut g = c.benchmark_group("bootstrap_1000_clusters");
    // Tens of milliseconds each: ten samples of one iteration each fit the 3 s.
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    g.bench_function("parse", |b| {
        b.iter(|| load::message_from_text(black_box(&text), Format::Yaml, &desc).unwrap())
    });
    g.bench_function("lower", |b| {
        b.iter_batched(
            || parsed.clone(),
            |msg| bootstrap::lower(msg, &Store::new()).unwrap(),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("parse_and_lower", |b| {
        b.iter(|| {
            let msg = load::message_from_text(black_box(&text), Format::Yaml, &desc).unwrap();
            bootstrap::lower(msg, &Store::new()).unwrap()
        })
    });
    g.finish();
}

fn header_work(c: &mut Criterion) {
    let mut rng = Rng::seeded(42);
    c.bench_function("x_request_id_uuid4", |b| {
        b.iter(|| remora::util::uuid4(rng.next_u64(), rng.next_u64()))
    });
}

fn hosts(n: usize) -> HostSet {
    HostSet::new(
        (0..n)
            .map(|i| {
                Host::new(&EndpointConfig {
                    address: format!("10.0.{}.{}:8080", i / 256, i % 256).parse().unwrap(),
                    hostname: String::new(),
                    weight: 1,
                    priority: 0,
                    locality: Locality::default(),
                    health: EndpointHealth::Unknown,
                    locality_weight: 1,
                    health_check_port: None,
                    health_check_disabled: false,
                    health_check_hostname: String::new(),
                })
            })
            .collect::<Vec<Arc<Host>>>(),
    )
}

fn lb_pick(c: &mut Criterion) {
    let set = hosts(10);
    let rr = AtomicUsize::new(0);
    let mut rng = Rng::seeded(7);
    let zone_stats = remora::upstream::zone::ZoneStats::detached();
    let mut g = c.benchmark_group("lb_pick_10_hosts");
    for (name, policy) in [
        ("round_robin", LbPolicy::RoundRobin),
        (
            "least_request_p2c",
            LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: None,
            },
        ),
        ("random", LbPolicy::Random),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| set.pick(black_box(policy), &rr, &mut rng, None, || {}, &zone_stats))
        });
    }
    g.finish();
}

fn stats_recording(c: &mut Criterion) {
    let store = Store::new();
    let counter = store.counter("cluster.c0.upstream_rq_total");
    let histogram = store.histogram("cluster.c0.upstream_rq_time");
    let mut g = c.benchmark_group("stats");
    g.bench_function("counter_inc", |b| b.iter(|| counter.inc()));
    let mut v = 0u64;
    g.bench_function("histogram_record", |b| {
        b.iter(|| {
            v = (v + 7) % 10_000;
            histogram.record(black_box(v))
        })
    });
    g.finish();
}

/// Everything a proxied HTTP/1.1 request that succeeds with a 200 records, on the handles the connection manager
/// and the cluster really hold ([`HcmStats`], [`ClusterStats`], the host's counters, the `max_requests`
/// breaker), built from the real structs under the names a server gives them. The calls and their order follow
/// `listener/hcm.rs` (`handle`, `forward`, `UpstreamGuard::finish`, `Stream::end`) and `upstream/pool.rs`
/// (one read and one write on the upstream connection).
fn stats_per_request(c: &mut Criterion) {
    let store = Store::new();
    let hcm = HcmStats::new(
        &store.scope("http.ingress."),
        &store.scope("listener.127.0.0.1_10000.http.ingress."),
    );
    let cluster_scope = store.scope("cluster.backend.");
    let cs = ClusterStats::new(&cluster_scope);
    let breakers = CircuitBreakers::new(&CircuitBreakersConfig::default(), &cluster_scope);
    let host = Host::new(&EndpointConfig {
        address: "10.0.0.1:8080".parse().unwrap(),
        hostname: String::new(),
        weight: 1,
        priority: 0,
        locality: Locality::default(),
        health: EndpointHealth::Unknown,
        locality_weight: 1,
        health_check_port: None,
        health_check_disabled: false,
        health_check_hostname: String::new(),
    });
    let mut elapsed = 0u64;
    let mut one_request = |with_breaker: bool| {
        // Elapsed milliseconds as loopback requests see them: mostly 0, sometimes 1 or 2.
        elapsed = (elapsed + 1) % 7;
        let ms = black_box(elapsed / 3);
        // handle()
        hcm.downstream_rq_total.inc();
        hcm.downstream_rq_active.inc();
        hcm.downstream_rq_http1_total.inc();
        hcm.rq_total.inc();
        let permit = with_breaker.then(|| breakers.resources(Priority::Default).try_request());
        // forward(): one attempt.
        cs.upstream_rq_total.inc();
        cs.upstream_rq_active.inc();
        host.stats.rq_total.fetch_add(1, Relaxed);
        host.stats.rq_active.fetch_add(1, Relaxed);
        cs.upstream_cx_tx_bytes_total.add(black_box(120));
        cs.upstream_cx_rx_bytes_total.add(black_box(90));
        cs.upstream_rq.record(black_box(200));
        // UpstreamGuard::finish(true)
        cs.upstream_rq_active.dec();
        host.stats.rq_active.fetch_sub(1, Relaxed);
        host.stats.rq_success.fetch_add(1, Relaxed);
        cs.upstream_rq_completed.inc();
        cs.upstream_rq_time.record(ms);
        drop(permit);
        // Stream::end()
        hcm.downstream_rq_active.dec();
        hcm.downstream_rq_completed.inc();
        hcm.downstream_rq.record_class(200);
        hcm.listener_rq_completed.inc();
        hcm.listener_rq.record_class(200);
        hcm.downstream_rq_time.record(ms);
    };
    let mut g = c.benchmark_group("stats_per_request");
    g.bench_function("counters_gauges_histograms", |b| b.iter(|| one_request(false)));
    g.bench_function("with_max_requests_breaker", |b| b.iter(|| one_request(true)));
    g.finish();
    let total = store.counter("cluster.backend.upstream_rq_200").value();
    assert!(
        total > 0 || !remora::stats::RECORDING,
        "the bench recorded nothing"
    );
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = hot;
    config = config();
    targets = route_matching, config_loading, header_work, lb_pick, stats_recording, stats_per_request
}
criterion_main!(hot);
