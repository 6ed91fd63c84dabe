//! DNS discovery: `STRICT_DNS` and `LOGICAL_DNS` clusters, resolved with hickory-resolver.
//!
//! Each DNS cluster has a task on the main thread that resolves its names every `dns_refresh_rate` (default
//! 5 s), or when the records' TTL runs out if `respect_dns_ttl` is set, and replaces the cluster's hosts when
//! the addresses change (hosts that remain keep their identity, so their stats and outlier state carry over).
//! `STRICT_DNS` makes a host of every address of every endpoint's name; `LOGICAL_DNS` uses the first address
//! of its one name. A failed lookup keeps the last good hosts, counts `update_failure`, and is retried after
//! `dns_failure_refresh_rate` (jittered exponential back-off) when set, else the refresh rate.
//!
//! Resolvers come from `typed_dns_resolver_config` (`envoy.network.dns_resolver.cares`), the older
//! `dns_resolution_config`, or `dns_resolvers`; else from the system (`/etc/resolv.conf`). A resolver may be
//! on any port, so a sidecar can ask a service-discovery DNS directly.

use super::{Cluster, EndpointConfig, Host};
use crate::stats::{Counter, Scope};
use hickory_resolver::config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// `dns_lookup_family`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Auto,
    V4Only,
    V6Only,
    V4Preferred,
    All,
}

/// One name to resolve, with the endpoint settings its addresses get.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub name: String,
    pub port: u16,
    pub template: EndpointConfig,
}

/// A DNS cluster's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct DnsConfig {
    pub logical: bool,
    pub targets: Vec<Target>,
    pub refresh: Duration,
    /// `dns_failure_refresh_rate` (base, max).
    pub failure_refresh: Option<(Duration, Duration)>,
    pub respect_ttl: bool,
    pub family: Family,
    /// Name servers; empty means the system's.
    pub resolvers: Vec<SocketAddr>,
    pub use_tcp: bool,
}

/// `cluster.<name>.update_*` for DNS resolution.
#[derive(Debug)]
struct DnsStats {
    update_attempt: Counter,
    update_success: Counter,
    update_failure: Counter,
    update_no_rebuild: Counter,
}

pub(crate) fn resolver(cfg: &DnsConfig) -> Result<TokioResolver, String> {
    let mut builder = if cfg.resolvers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?
    } else {
        let servers = cfg
            .resolvers
            .iter()
            .map(|a| {
                let mut c = if cfg.use_tcp {
                    ConnectionConfig::tcp()
                } else {
                    ConnectionConfig::udp()
                };
                c.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![c])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    let opts = builder.options_mut();
    opts.ip_strategy = match cfg.family {
        Family::Auto => LookupIpStrategy::Ipv6thenIpv4,
        Family::V4Only => LookupIpStrategy::Ipv4Only,
        Family::V6Only => LookupIpStrategy::Ipv6Only,
        Family::V4Preferred => LookupIpStrategy::Ipv4thenIpv6,
        Family::All => LookupIpStrategy::Ipv4AndIpv6,
    };
    // Remora decides when to ask again; the resolver must not answer from its own cache.
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(5);
    opts.attempts = 2;
    builder
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

/// Resolve every target once: the addresses (in answer order) and the shortest TTL.
async fn resolve_all(
    r: &TokioResolver,
    cfg: &DnsConfig,
) -> Result<(Vec<(usize, SocketAddr)>, Option<Duration>), String> {
    let mut out = Vec::new();
    let mut ttl: Option<Duration> = None;
    for (i, t) in cfg.targets.iter().enumerate() {
        if let Ok(ip) = t.name.parse::<IpAddr>() {
            out.push((i, SocketAddr::new(ip, t.port)));
            continue;
        }
        let lookup = r
            .lookup_ip(t.name.as_str())
            .await
            .map_err(|e| format!("{}: {e}", t.name))?;
        let left = ttl_left(lookup.valid_until());
        ttl = Some(ttl.map_or(left, |t| t.min(left)));
        let mut addrs = lookup.iter().map(|ip| SocketAddr::new(ip, t.port));
        if cfg.logical {
            if let Some(a) = addrs.next() {
                out.push((i, a));
            }
        } else {
            out.extend(addrs.map(|a| (i, a)));
        }
    }
    Ok((out, ttl))
}

/// The TTL left on records hickory says are valid until `until` (hickory uses std's clock for this).
#[allow(clippy::disallowed_types)]
fn ttl_left(until: std::time::Instant) -> Duration {
    until.saturating_duration_since(std::time::Instant::now())
}

/// The hosts for these addresses, reusing the cluster's current host for an address it already has.
fn hosts_for(cluster: &Cluster, cfg: &DnsConfig, addrs: &[(usize, SocketAddr)]) -> Vec<Arc<Host>> {
    let current = cluster.hosts();
    addrs
        .iter()
        .map(|(i, a)| {
            let t = &cfg.targets[*i];
            match current
                .hosts
                .iter()
                .find(|h| h.address == *a && h.hostname == t.name)
            {
                Some(h) => h.clone(),
                None => {
                    let mut e = t.template.clone();
                    e.address = *a;
                    e.hostname = t.name.clone();
                    Host::new(&e)
                }
            }
        })
        .collect()
}

/// Resolve a DNS cluster's names for as long as the cluster exists. The first resolution (success or failure)
/// is reported on `first`, so that the server turns LIVE once every DNS cluster has had one.
pub fn spawn(
    cluster: &Arc<Cluster>,
    cfg: Arc<DnsConfig>,
    scope: &Scope,
    first: tokio::sync::mpsc::Sender<()>,
) {
    let stats = DnsStats {
        update_attempt: scope.counter("update_attempt"),
        update_success: scope.counter("update_success"),
        update_failure: scope.counter("update_failure"),
        update_no_rebuild: scope.counter("update_no_rebuild"),
    };
    let weak: Weak<Cluster> = Arc::downgrade(cluster);
    let name = cluster.name().to_string();
    tokio::spawn(async move {
        let resolver = match resolver(&cfg) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(cluster = %name, error = %e, "DNS discovery cannot start");
                let _ = first.send(()).await;
                return;
            }
        };
        let mut first = Some(first);
        let mut failures = 0u32;
        let mut rng = super::lb::Rng::from_entropy();
        loop {
            let Some(cluster) = weak.upgrade() else { return };
            stats.update_attempt.inc();
            let wait = match resolve_all(&resolver, &cfg).await {
                Ok((addrs, ttl)) => {
                    failures = 0;
                    stats.update_success.inc();
                    let hosts = hosts_for(&cluster, &cfg, &addrs);
                    let same = {
                        // Hosts kept PENDING_DYNAMIC_REMOVAL (not in the answer) are no change.
                        let listed: std::collections::HashSet<_> = hosts.iter().map(|h| h.address).collect();
                        let cur = cluster.hosts();
                        let kept = cur.hosts.iter().filter(|h| {
                            listed.contains(&h.address)
                                || !h
                                    .pending_dynamic_removal
                                    .load(std::sync::atomic::Ordering::Relaxed)
                        });
                        kept.map(|h| h.id).eq(hosts.iter().map(|h| h.id))
                    };
                    if same {
                        stats.update_no_rebuild.inc();
                    } else {
                        tracing::info!(cluster = %name, hosts = ?addrs.iter().map(|a| a.1).collect::<Vec<_>>(), "DNS: hosts changed");
                        if cfg.logical {
                            cluster.set_hosts(hosts);
                        } else {
                            // STRICT_DNS updates its membership as EDS does (Envoy's updateDynamicHostList).
                            cluster.set_discovered_hosts(hosts);
                        }
                    }
                    match ttl {
                        Some(t) if cfg.respect_ttl => t.max(Duration::from_millis(100)),
                        _ => cfg.refresh,
                    }
                }
                Err(e) => {
                    failures += 1;
                    stats.update_failure.inc();
                    tracing::warn!(cluster = %name, error = %e, "DNS resolution failed; keeping the last good hosts");
                    match cfg.failure_refresh {
                        Some((base, max)) => {
                            let cap = (base * 2u32.saturating_pow(failures.min(16) - 1)).min(max);
                            Duration::from_millis(rng.below(cap.as_millis().max(1) as usize) as u64)
                                .max(base.min(cap))
                        }
                        None => cfg.refresh,
                    }
                }
            };
            drop(cluster);
            if let Some(f) = first.take() {
                let _ = f.send(()).await;
            }
            tokio::time::sleep(wait).await;
        }
    });
}
