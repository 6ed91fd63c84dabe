//! xDS at scale (issue 6): how long Remora takes to apply a large configuration pushed over ADS (state of the
//! world), and what it costs in memory. The real release binary runs against a minimal in-process management
//! server ([`remora_benches::xds::AdsServer`]); a push is timed from the moment the response is handed to the
//! stream until the proxy's ACK of its nonce arrives (Remora ACKs after the update is applied and swapped in).
//!
//! - `clusters`: 1,000 EDS clusters in one CDS response, then their 1,000 `ClusterLoadAssignment`s of 10
//!   endpoints each (10,000 endpoints) in one EDS response. Timed: CDS push → ACK, the EDS subscription for all
//!   1,000 names, EDS push → ACK (every cluster warmed), and the whole. Resident memory (VmRSS) before the
//!   push and after. Then one endpoint changes in one assignment and the whole EDS state is pushed again (as a
//!   SotW control plane does), five times: the median time to ACK. A fresh proxy per repetition.
//! - `big`: one EDS cluster of 10,000 endpoints; then one endpoint's port changes, `--changes` times, each a
//!   full SotW EDS response (as a control plane sends it). Timed: the first 10,000-endpoint push, and each
//!   one-endpoint change (median, p90, max).
//!
//! The endpoints are loopback addresses nobody listens on: no traffic flows, only configuration is measured.
//!
//! ```text
//! cargo build --release -p remora
//! cargo run --release -p remora-benches --bin xds_scale -- [--remora PATH] [--reps 3] [--changes 20]
//!     [--clusters 1000] [--endpoints-per-cluster 10] [--big 10000] [--workers 1] [--out DIR]
//! ```
//!
//! Writes `benches/results/<date>-xds-scale/results.md` (or `--out DIR`) and prints it.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use remora_benches::procfs;
use remora_benches::scenario::{
    flag, markdown_table, quantile, remora_binary, results_dir, Error, RemoraProcess,
};
use remora_benches::xds::{assignment, eds_cluster, AdsServer, CLUSTER, ENDPOINT};
use serde_json::{json, Value};
use tokio::time::Instant;

/// How long one push may take before the run gives up.
const LIMIT: Duration = Duration::from_secs(120);

fn bootstrap(control_plane: SocketAddr) -> Value {
    json!({
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                {"socket_address": {"address": control_plane.ip().to_string(), "port_value": control_plane.port()}}}}]}]},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
        }]},
    })
}

/// Endpoint `i`: a distinct loopback address, port 8080.
fn endpoint(i: usize) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(0x7f00_0001 + i as u32), 8080))
}

fn memory(p: &RemoraProcess) -> Result<procfs::Memory, Error> {
    let pid = p.pid().ok_or("remora exited")?;
    Ok(procfs::parse_status(&std::fs::read_to_string(format!(
        "/proc/{pid}/status"
    ))?))
}

/// Push and wait for the ACK; the time between, or an error on a NACK.
async fn push_acked(
    server: &AdsServer,
    type_url: &str,
    version: &str,
    resources: &[Vec<u8>],
) -> Result<Duration, Error> {
    let start = Instant::now();
    let nonce = server.push(type_url, version, resources)?;
    let answer = server.wait_answer(&nonce, LIMIT).await?;
    if let Some(e) = answer.request.error_detail {
        return Err(format!("{type_url} version {version} was NACKed: {}", e.message).into());
    }
    Ok(answer.at - start)
}

struct ClustersRun {
    cds: Duration,
    subscribed: Duration,
    eds: Duration,
    total: Duration,
    /// One endpoint changed, every assignment pushed again: the median of five.
    one_change: Duration,
    rss_before: u64,
    rss_after: u64,
}

async fn clusters_run(
    binary: &std::path::Path,
    workers: u32,
    clusters: usize,
    per: usize,
) -> Result<ClustersRun, Error> {
    let server = AdsServer::start().await?;
    let proxy = RemoraProcess::start(binary, &bootstrap(server.addr()), workers, "xds-clusters").await?;
    let rss_before = memory(&proxy)?.rss_kib;
    let names: Vec<String> = (0..clusters).map(|i| format!("c{i}")).collect();
    let cds: Vec<Vec<u8>> = names.iter().map(|n| eds_cluster(n)).collect();
    let mut addrs: Vec<Vec<SocketAddr>> = (0..clusters)
        .map(|i| (0..per).map(|j| endpoint(i * per + j)).collect())
        .collect();
    let mut eds: Vec<Vec<u8>> = names.iter().zip(&addrs).map(|(n, a)| assignment(n, a)).collect();

    let start = Instant::now();
    let cds_time = push_acked(&server, CLUSTER, "1", &cds).await?;
    let sub = server
        .wait_for("the EDS subscription", LIMIT, |r| {
            r.type_url == ENDPOINT && r.resource_names.len() == clusters
        })
        .await?;
    let eds_time = push_acked(&server, ENDPOINT, "1", &eds).await?;
    let total = start.elapsed();
    let active = proxy.stat("cluster_manager.active_clusters").await?;
    let warming = proxy.stat("cluster_manager.warming_clusters").await?;
    if active != clusters as i64 + 1 || warming != 0 {
        return Err(format!("after the pushes: {active} active clusters, {warming} warming").into());
    }
    let mut changes = Vec::new();
    for k in 0..5 {
        let i = (k * 389) % clusters;
        let port = if addrs[i][0].port() == 8080 { 8081 } else { 8080 };
        addrs[i][0].set_port(port);
        eds[i] = assignment(&names[i], &addrs[i]);
        changes.push(push_acked(&server, ENDPOINT, &(k + 2).to_string(), &eds).await?);
    }
    Ok(ClustersRun {
        cds: cds_time,
        subscribed: sub.at - start,
        eds: eds_time,
        total,
        one_change: quantile(&mut changes, 0.5),
        rss_before,
        rss_after: memory(&proxy)?.rss_kib,
    })
}

struct BigRun {
    first: Duration,
    changes: Vec<Duration>,
    rss_before: u64,
    rss_after_first: u64,
    rss_after: u64,
}

async fn big_run(binary: &std::path::Path, workers: u32, n: usize, changes: usize) -> Result<BigRun, Error> {
    let server = AdsServer::start().await?;
    let proxy = RemoraProcess::start(binary, &bootstrap(server.addr()), workers, "xds-big").await?;
    let rss_before = memory(&proxy)?.rss_kib;
    push_acked(&server, CLUSTER, "1", &[eds_cluster("big")]).await?;
    server
        .wait_for("the EDS subscription", LIMIT, |r| {
            r.type_url == ENDPOINT && r.resource_names == ["big"]
        })
        .await?;
    let mut addrs: Vec<SocketAddr> = (0..n).map(endpoint).collect();
    let first = push_acked(&server, ENDPOINT, "1", &[assignment("big", &addrs)]).await?;
    let rss_after_first = memory(&proxy)?.rss_kib;
    let mut times = Vec::new();
    for k in 0..changes {
        // One endpoint moves to another port (and back, on the next round through).
        let i = (k * 7919) % n;
        let port = if addrs[i].port() == 8080 { 8081 } else { 8080 };
        addrs[i].set_port(port);
        let resource = assignment("big", &addrs);
        times.push(push_acked(&server, ENDPOINT, &(k + 2).to_string(), &[resource]).await?);
    }
    let total = proxy.stat("cluster.big.membership_total").await?;
    if total != n as i64 {
        return Err(format!("cluster big has {total} hosts, not {n}").into());
    }
    Ok(BigRun {
        first,
        changes: times,
        rss_before,
        rss_after_first,
        rss_after: memory(&proxy)?.rss_kib,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let binary = remora_binary(&args)?;
    let reps: usize = flag(&args, "--reps", 3)?;
    let changes: usize = flag(&args, "--changes", 20)?;
    let clusters: usize = flag(&args, "--clusters", 1000)?;
    let per: usize = flag(&args, "--endpoints-per-cluster", 10)?;
    let big: usize = flag(&args, "--big", 10_000)?;
    let workers: u32 = flag(&args, "--workers", 1)?;
    let out = match flag(&args, "--out", String::new())? {
        d if d.is_empty() => results_dir("xds-scale")?,
        d => {
            std::fs::create_dir_all(&d)?;
            d.into()
        }
    };

    let mut md = format!(
        "# xDS at scale\n\nRemora `--concurrency {workers}` (release build) against an in-process ADS server, state of \
         the world. A time is from handing the response to the stream until the ACK of its nonce arrives. \
         Memory is the proxy's VmRSS.\n\n## {clusters} EDS clusters, {} endpoints\n\nOne CDS response of \
         {clusters} clusters, then one EDS response of their assignments ({per} endpoints each). A fresh proxy \
         per repetition.\n\n",
        clusters * per
    );
    let mut rows = Vec::new();
    for rep in 0..reps {
        eprintln!("xds_scale: clusters, repetition {}", rep + 1);
        let r = clusters_run(&binary, workers, clusters, per).await?;
        rows.push(vec![
            (rep + 1).to_string(),
            ms(r.cds),
            ms(r.subscribed),
            ms(r.eds),
            ms(r.total),
            ms(r.one_change),
            mib(r.rss_before),
            mib(r.rss_after),
            mib(r.rss_after.saturating_sub(r.rss_before)),
        ]);
    }
    md.push_str(&markdown_table(
        &[
            "run",
            "CDS push → ACK",
            "EDS subscribed (since CDS push)",
            "EDS push → ACK",
            "all warm",
            "one endpoint changed, all pushed again → ACK (median of 5)",
            "RSS before",
            "RSS after",
            "RSS added",
        ],
        &rows,
    ));

    eprintln!("xds_scale: one cluster of {big} endpoints, {changes} changes");
    let b = big_run(&binary, workers, big, changes).await?;
    let mut times = b.changes.clone();
    let (p50, p90) = (quantile(&mut times, 0.5), quantile(&mut times, 0.9));
    let max = times.iter().max().copied().unwrap_or_default();
    md.push_str(&format!(
        "\n## One endpoint change in a {big}-endpoint cluster\n\nThe first push of all {big} endpoints, then \
         {changes} pushes that each move one endpoint to another port (each a whole SotW \
         `ClusterLoadAssignment`).\n\n"
    ));
    md.push_str(&markdown_table(
        &[
            "first push → ACK",
            "change → ACK p50",
            "p90",
            "max",
            "RSS before",
            "RSS after first push",
            "RSS after changes",
        ],
        &[vec![
            ms(b.first),
            ms(p50),
            ms(p90),
            ms(max),
            mib(b.rss_before),
            mib(b.rss_after_first),
            mib(b.rss_after),
        ]],
    ));
    std::fs::write(out.join("results.md"), &md)?;
    remora_benches::outln!("{md}")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
