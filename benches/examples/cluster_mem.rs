//! Heap bytes per dynamic EDS cluster, by component, counted by a global allocator that keeps the live total
//! (issue 6: where the RSS per dynamic cluster of `--bin xds_scale` goes). It builds, for 1,000 clusters shaped
//! like `xds_scale`'s (EDS, 10 endpoints each), what the xDS manager keeps of each: the decoded resource, the
//! lowered config, the assignment's endpoints, the running cluster (its stats, hosts and host sets) and the EDS
//! subscription's stats, and prints the live bytes each step added, per cluster.
//!
//! ```text
//! cargo run -p remora-benches --example cluster_mem [-- --names]
//! ```
//!
//! `--names` also lists the stats one cluster registers. Live heap only: the allocator's own overhead and
//! transient peaks (a whole response decoded at once) are not counted, and are part of what RSS shows.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use remora::config::{cluster, descriptors, load, node};
use serde_json::json;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
/// The highest `LIVE` since it was last reset.
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn add(n: isize) {
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call is passed to the system allocator unchanged; only a counter is updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        add(l.size() as isize);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        add(-(l.size() as isize));
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        add(n as isize - l.size() as isize);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const N: usize = 1000;

fn live() -> isize {
    LIVE.load(Relaxed)
}

fn report(out: &mut String, what: &str, before: isize) {
    let per = (live() - before) as f64 / N as f64;
    out.push_str(&format!("{what:44} {per:7.0} B/cluster\n"));
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut out = String::new();
    let store = remora::stats::Store::new();
    let cdesc = descriptors::message("envoy.config.cluster.v3.Cluster").ok_or("no Cluster descriptor")?;
    let edesc = descriptors::message("envoy.config.endpoint.v3.ClusterLoadAssignment")
        .ok_or("no ClusterLoadAssignment descriptor")?;

    let b = live();
    let mut msgs = Vec::new();
    for i in 0..N {
        let v = json!({"name": format!("cluster_{i:04}"), "type": "EDS", "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": {"ads": {}}}});
        msgs.push(load::message_from_value(v, &cdesc)?);
    }
    report(&mut out, "Cluster as a DynamicMessage", b);
    let b = live();
    let raws: Vec<Vec<u8>> = msgs.iter().map(prost::Message::encode_to_vec).collect();
    report(&mut out, "Cluster encoded", b);

    let b = live();
    let mut configs = Vec::new();
    for m in &msgs {
        let errs = node::Errors::default();
        configs.push(cluster::lower(&node::Node::root(m, "", &errs)).ok_or("a cluster does not lower")?);
    }
    report(&mut out, "ClusterConfig", b);

    let b = live();
    let mut endpoints = Vec::new();
    let mut encoded = Vec::new();
    for i in 0..N {
        let lb_endpoints: Vec<_> = (0..10)
            .map(|j| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 20000 + i * 10 + j}}}}))
            .collect();
        let v =
            json!({"cluster_name": format!("cluster_{i:04}"), "endpoints": [{"lb_endpoints": lb_endpoints}]});
        let m = load::message_from_value(v, &edesc)?;
        encoded.push(prost::Message::encode_to_vec(&m));
        let errs = node::Errors::default();
        endpoints.push(cluster::lower_load_assignment(&node::Node::root(&m, "", &errs)));
    }
    report(&mut out, "10 EndpointConfigs and the encoded assignment", b);

    let stats_before = store.snapshot().len();
    let b = live();
    let mut clusters = Vec::new();
    for (c, e) in configs.iter().zip(&endpoints) {
        let mut c = c.clone();
        c.endpoints = e.clone();
        let scope = store.scope(format!("cluster.{}.", c.stat_name));
        clusters.push(remora::upstream::Cluster::new(c, &scope, true, None));
    }
    report(&mut out, "Cluster (stats, hosts, host sets, config)", b);
    let b = live();
    let mut subscriptions = Vec::new();
    for c in &configs {
        let scope = store.scope(format!("cluster.{}.", c.stat_name));
        subscriptions.push(remora::xds::SubscriptionStats::new(&scope));
    }
    report(&mut out, "EDS subscription stats", b);
    out.push_str(&format!(
        "stats per cluster: {}
",
        (store.snapshot().len() - stats_before) / N
    ));

    let b = live();
    let mut stats_only = Vec::new();
    for i in 0..N {
        stats_only.push(remora::upstream::ClusterStats::new(
            &store.scope(format!("cluster.other_{i:04}.")),
        ));
    }
    report(&mut out, "ClusterStats alone", b);

    // The transient peak of one EDS response of every assignment, decoded and lowered as the manager does:
    // what the allocator must find room for at once (RSS keeps much of it).
    let response = {
        let rdesc = descriptors::message("envoy.service.discovery.v3.DiscoveryResponse")
            .ok_or("no DiscoveryResponse descriptor")?;
        let any = descriptors::message("google.protobuf.Any").ok_or("no Any descriptor")?;
        let mut r = prost_reflect::DynamicMessage::new(rdesc.clone());
        let list = encoded
            .iter()
            .map(|b| {
                let mut a = prost_reflect::DynamicMessage::new(any.clone());
                a.set_field_by_name(
                    "type_url",
                    prost_reflect::Value::String(remora::xds::ENDPOINT_TYPE.into()),
                );
                a.set_field_by_name("value", prost_reflect::Value::Bytes(b.clone().into()));
                prost_reflect::Value::Message(a)
            })
            .collect();
        r.set_field_by_name("resources", prost_reflect::Value::List(list));
        (rdesc, prost::Message::encode_to_vec(&r))
    };
    let b = live();
    PEAK.store(b, Relaxed);
    {
        let decoded = prost_reflect::DynamicMessage::decode(response.0, response.1.as_slice())?;
        let resources =
            remora::xds::decode_resources(&decoded, remora::xds::ENDPOINT_TYPE).map_err(|e| e.to_string())?;
        let lowered: Vec<_> = resources
            .iter()
            .map(|r| {
                let message = r.message().map_err(|e| e.to_string())?;
                let errs = node::Errors::default();
                let lowered = cluster::lower_load_assignment(&node::Node::root(&message, "", &errs));
                Ok::<_, String>(lowered)
            })
            .collect::<Result<_, _>>()?;
        drop((decoded, resources, lowered));
    }
    let peak = (PEAK.load(Relaxed) - b) as f64 / N as f64;
    out.push_str(&format!(
        "{:44} {peak:7.0} B/cluster (transient peak; response {} B/cluster)\n",
        "EDS response decoded and lowered",
        response.1.len() / N
    ));

    if std::env::args().any(|a| a == "--names") {
        for (n, _) in store.snapshot() {
            if let Some(n) = n.strip_prefix("cluster.cluster_0000.") {
                out.push_str(&format!("  {n}\n"));
            }
        }
    }
    std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes())?;
    drop((
        msgs,
        raws,
        configs,
        endpoints,
        encoded,
        clusters,
        subscriptions,
        stats_only,
    ));
    Ok(())
}
