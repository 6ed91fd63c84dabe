//! The dynamic forward proxy's DNS cache: hosts made on demand from a request's authority.
//!
//! A cluster of type `envoy.clusters.dynamic_forward_proxy` has no configured hosts. Its
//! `dns_cache_config` (`envoy.extensions.common.dynamic_forward_proxy.v3.DnsCacheConfig`) describes a cache
//! keyed by `host:port` (the port is 80 when the authority has none). The router asks the cache for the host
//! of a request's authority:
//!
//! - a hit is answered from a lock-held map look-up, without awaiting anything;
//! - a miss (with the HTTP filter `envoy.filters.http.dynamic_forward_proxy` on the connection manager) sends
//!   the name to the cache's resolver task on the main thread, and every request for the same key waits for
//!   that one lookup; the first address becomes a [`Host`] of the cluster (hostname = the name, so
//!   `/clusters` keeps per-host stats for it, and `%UPSTREAM_HOST%` is its address);
//! - a miss without the filter finds no host, as in Envoy (503 `no healthy upstream`);
//! - a failed lookup answers 503 `DNS resolution failure` and is forgotten, so the next request asks again;
//! - a new key beyond `max_hosts` (default 1024) answers 503 `DNS cache overflow` (`host_overflow`).
//!
//! The resolver task re-resolves every host each `dns_refresh_rate` (default 60 s), replacing a host whose
//! address changed (`host_address_changed`), and removes hosts no request has used for `host_ttl` (default
//! 5 min, `host_removed`). Stats are Envoy's `dns_cache.<name>.*`.

use super::dns::{self, DnsConfig};
use super::{Cluster, EndpointConfig, Host};
use crate::stats::{Counter, Gauge, Scope};
use arc_swap::ArcSwapOption;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OnceCell};
use tokio::time::Instant;

/// `dns_cache_config`, lowered.
#[derive(Clone, Debug, PartialEq)]
pub struct DfpConfig {
    /// `name`: the cache's stat scope `dns_cache.<name>.`.
    pub name: String,
    /// Address family, resolvers and `dns_refresh_rate` (its targets are unused).
    pub dns: DnsConfig,
    pub host_ttl: Duration,
    pub max_hosts: u32,
    pub query_timeout: Duration,
}

/// Why the cache has no host for an authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    /// Not cached, and this connection manager does not resolve (no dynamic forward proxy filter).
    NotCached,
    /// The lookup failed or found no address.
    ResolutionFailed,
    /// `max_hosts` hosts are cached already.
    Overflow,
}

/// `dns_cache.<name>.*`.
#[derive(Debug)]
struct CacheStats {
    dns_query_attempt: Counter,
    dns_query_success: Counter,
    dns_query_failure: Counter,
    host_address_changed: Counter,
    host_added: Counter,
    host_removed: Counter,
    host_overflow: Counter,
    num_hosts: Gauge,
}

struct Entry {
    host: ArcSwapOption<Host>,
    /// The first resolution, shared by every request that arrives before it finishes.
    first: OnceCell<()>,
    /// Milliseconds since the cache's epoch when a request last used the host.
    last_used: AtomicU64,
}

struct Job {
    name: String,
    reply: oneshot::Sender<Result<IpAddr, String>>,
}

/// A dynamic forward proxy cluster's cache of hosts.
pub struct DnsCache {
    config: Arc<DfpConfig>,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    stats: CacheStats,
    epoch: Instant,
    jobs: mpsc::UnboundedSender<Job>,
    /// Taken by [`spawn`].
    rx: Mutex<Option<mpsc::UnboundedReceiver<Job>>>,
}

impl std::fmt::Debug for DnsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsCache")
            .field("name", &self.config.name)
            .finish()
    }
}

/// `host:port` of an authority, lower-cased, with `default_port` when it has none; `None` when it is empty.
pub fn cache_key(authority: &str, default_port: u16) -> Option<(String, String, u16)> {
    let a = authority.trim();
    if a.is_empty() {
        return None;
    }
    let (host, port) = match a.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => (h, p.parse().ok()?),
        _ => (a, default_port),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    Some((format!("{host}:{port}"), host, port))
}

impl DnsCache {
    pub fn new(config: Arc<DfpConfig>, scope: &Scope) -> Arc<DnsCache> {
        let s = scope.store().scope(format!("dns_cache.{}.", config.name));
        let (jobs, rx) = mpsc::unbounded_channel();
        Arc::new(DnsCache {
            stats: CacheStats {
                dns_query_attempt: s.counter("dns_query_attempt"),
                dns_query_success: s.counter("dns_query_success"),
                dns_query_failure: s.counter("dns_query_failure"),
                host_address_changed: s.counter("host_address_changed"),
                host_added: s.counter("host_added"),
                host_removed: s.counter("host_removed"),
                host_overflow: s.counter("host_overflow"),
                num_hosts: s.gauge("num_hosts"),
            },
            config,
            entries: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            jobs,
            rx: Mutex::new(Some(rx)),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host for `authority` (port `default_port` when it has none), resolving it when `resolve` is set and
    /// it is not cached.
    pub async fn host(
        &self,
        cluster: &Cluster,
        authority: &str,
        default_port: u16,
        resolve: bool,
    ) -> Result<Arc<Host>, LookupError> {
        let Some((key, name, port)) = cache_key(authority, default_port) else {
            return Err(LookupError::ResolutionFailed);
        };
        let entry = {
            let mut map = self.entries();
            match map.get(&key) {
                Some(e) => e.clone(),
                None if !resolve => return Err(LookupError::NotCached),
                None if map.len() >= self.config.max_hosts as usize => {
                    self.stats.host_overflow.inc();
                    return Err(LookupError::Overflow);
                }
                None => {
                    let e = Arc::new(Entry {
                        host: ArcSwapOption::empty(),
                        first: OnceCell::new(),
                        last_used: AtomicU64::new(0),
                    });
                    map.insert(key.clone(), e.clone());
                    self.stats.num_hosts.set(map.len() as i64);
                    e
                }
            }
        };
        entry.last_used.store(self.now_ms(), Relaxed);
        if let Some(h) = entry.host.load_full() {
            return Ok(h);
        }
        if !resolve {
            return Err(LookupError::NotCached);
        }
        entry
            .first
            .get_or_init(|| async {
                match self.query(&name).await {
                    Ok(ip) => {
                        let h = new_host(SocketAddr::new(ip, port), &name);
                        entry.host.store(Some(h.clone()));
                        self.stats.host_added.inc();
                        let _map = self.entries();
                        let mut hosts = cluster.hosts().hosts.clone();
                        hosts.push(h);
                        cluster.set_hosts(hosts);
                    }
                    Err(e) => {
                        tracing::debug!(cache = %self.config.name, host = %name, error = %e, "DNS resolution failed");
                        let mut map = self.entries();
                        if map.get(&key).is_some_and(|x| Arc::ptr_eq(x, &entry)) {
                            map.remove(&key);
                        }
                        self.stats.num_hosts.set(map.len() as i64);
                    }
                }
            })
            .await;
        entry.host.load_full().ok_or(LookupError::ResolutionFailed)
    }

    /// One lookup on the resolver task.
    async fn query(&self, name: &str) -> Result<IpAddr, String> {
        self.stats.dns_query_attempt.inc();
        let res = match name.parse::<IpAddr>() {
            Ok(ip) => Ok(ip),
            Err(_) => {
                let (tx, rx) = oneshot::channel();
                let job = Job {
                    name: name.to_string(),
                    reply: tx,
                };
                if self.jobs.send(job).is_err() {
                    Err("the DNS cache is not running".to_string())
                } else {
                    rx.await
                        .unwrap_or_else(|_| Err("the DNS cache stopped".to_string()))
                }
            }
        };
        match &res {
            Ok(_) => self.stats.dns_query_success.inc(),
            Err(_) => self.stats.dns_query_failure.inc(),
        }
        res
    }

    /// Re-resolve every host, and remove those unused for `host_ttl`.
    async fn refresh(&self, cluster: &Cluster) {
        let ttl = self.config.host_ttl.as_millis() as u64;
        let now = self.now_ms();
        let entries: Vec<(String, Arc<Entry>)> = self
            .entries()
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        for (key, e) in entries {
            let Some(old) = e.host.load_full() else { continue };
            if now.saturating_sub(e.last_used.load(Relaxed)) >= ttl {
                let mut map = self.entries();
                map.remove(&key);
                self.stats.num_hosts.set(map.len() as i64);
                self.stats.host_removed.inc();
                let hosts = cluster
                    .hosts()
                    .hosts
                    .iter()
                    .filter(|h| h.id != old.id)
                    .cloned()
                    .collect();
                cluster.set_hosts(hosts);
                tracing::debug!(cache = %self.config.name, host = %key, "DNS cache: host expired");
                continue;
            }
            if let Ok(ip) = self.query(&old.hostname).await {
                if ip != old.address.ip() {
                    let h = new_host(SocketAddr::new(ip, old.address.port()), &old.hostname);
                    self.stats.host_address_changed.inc();
                    let _map = self.entries();
                    e.host.store(Some(h.clone()));
                    let hosts = cluster
                        .hosts()
                        .hosts
                        .iter()
                        .map(|x| if x.id == old.id { h.clone() } else { x.clone() })
                        .collect();
                    cluster.set_hosts(hosts);
                }
            }
        }
    }
}

fn new_host(address: SocketAddr, name: &str) -> Arc<Host> {
    Host::new(&EndpointConfig {
        address,
        hostname: name.to_string(),
        weight: 1,
        priority: 0,
        locality: Default::default(),
        health: super::EndpointHealth::Unknown,
        locality_weight: 1,
        health_check_port: None,
        health_check_disabled: false,
        health_check_hostname: String::new(),
    })
}

/// Run the cache's resolver on this (the main) thread for as long as the cluster exists.
pub fn spawn(cluster: &Arc<Cluster>) {
    let Some(cache) = cluster.dfp.clone() else { return };
    let Some(mut rx) = cache.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    let weak: Weak<Cluster> = Arc::downgrade(cluster);
    let cfg = cache.config.clone();
    tokio::spawn(async move {
        let resolver = match dns::resolver(&cfg.dns) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                tracing::error!(cache = %cfg.name, error = %e, "the dynamic forward proxy's DNS cache cannot start");
                return;
            }
        };
        let mut tick = tokio::time::interval_at(Instant::now() + cfg.dns.refresh, cfg.dns.refresh);
        loop {
            tokio::select! {
                job = rx.recv() => {
                    let Some(job) = job else { return };
                    let r = resolver.clone();
                    let timeout = cfg.query_timeout;
                    tokio::spawn(async move {
                        let res = match tokio::time::timeout(timeout, r.lookup_ip(job.name.as_str())).await {
                            Ok(Ok(l)) => l.iter().next().ok_or_else(|| format!("{}: no addresses", job.name)),
                            Ok(Err(e)) => Err(format!("{}: {e}", job.name)),
                            Err(_) => Err(format!("{}: DNS query timeout", job.name)),
                        };
                        let _ = job.reply.send(res);
                    });
                }
                _ = tick.tick() => {
                    let Some(cluster) = weak.upgrade() else { return };
                    // Refresh lookups go through the same channel this loop serves: run them beside it.
                    let c = cluster.clone();
                    tokio::spawn(async move {
                        if let Some(cache) = c.dfp.clone() {
                            cache.refresh(&c).await;
                        }
                    });
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::cache_key;

    #[test]
    fn keys_normalise_the_authority() {
        assert_eq!(
            cache_key("Example.COM", 80).map(|k| k.0),
            Some("example.com:80".into())
        );
        assert_eq!(
            cache_key("a.test:8080", 80).map(|k| k.0),
            Some("a.test:8080".into())
        );
        assert_eq!(
            cache_key("[::1]:443", 80).map(|k| (k.1, k.2)),
            Some(("::1".into(), 443))
        );
        assert_eq!(cache_key("", 80), None);
        assert_eq!(cache_key("a.test:notaport", 80), None);
    }
}
