//! `ORIGINAL_DST` clusters: the upstream address is the one the request names.
//!
//! With `original_dst_lb_config.use_http_header`, the address is an `ip:port` in the header
//! `http_header_name` (default `x-envoy-original-dst-host`); a request without a valid one finds no host
//! (503 `no healthy upstream`, as in Envoy) unless the connection's original destination was restored by the
//! listener filter `envoy.filters.listener.original_dst` (`SO_ORIGINAL_DST` after an iptables `REDIRECT`), which
//! is then the address. Each address becomes a [`Host`] of the cluster on first use, so it
//! has per-host stats in `/clusters`, and is removed when no request used it for a `cleanup_interval`
//! (default 5 s).

use super::{Cluster, EndpointConfig, EndpointHealth, Host, OriginalDstConfig};
use http::HeaderMap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use tokio::time::Instant;

/// The hosts an `ORIGINAL_DST` cluster has made, by address, with when each was last used.
#[derive(Debug)]
pub struct OriginalDstHosts {
    config: Arc<OriginalDstConfig>,
    /// Each host with the milliseconds since `epoch` when a request last used it.
    hosts: Mutex<HashMap<SocketAddr, (Arc<Host>, u64)>>,
    epoch: Instant,
}

impl OriginalDstHosts {
    pub fn new(config: Arc<OriginalDstConfig>) -> Self {
        OriginalDstHosts {
            config,
            hosts: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }

    /// The host for the address in the request's header (with `use_http_header`), else the connection's
    /// original destination restored by the `original_dst` listener filter; made (and added to `cluster`) on
    /// first use.
    pub fn host_for(
        &self,
        cluster: &Cluster,
        headers: Option<&HeaderMap>,
        restored: Option<SocketAddr>,
    ) -> Option<Arc<Host>> {
        let from_header = match (&self.config.header, headers) {
            (Some(name), Some(h)) => h
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<SocketAddr>().ok()),
            _ => None,
        };
        let addr = from_header.or(restored)?;
        let now = self.epoch.elapsed().as_millis() as u64;
        let mut map = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((h, used)) = map.get_mut(&addr) {
            *used = now;
            return Some(h.clone());
        }
        let h = Host::new(&EndpointConfig {
            address: addr,
            hostname: String::new(),
            weight: 1,
            priority: 0,
            locality: Default::default(),
            health: EndpointHealth::Unknown,
            locality_weight: 1,
            health_check_port: None,
            health_check_disabled: false,
            health_check_hostname: String::new(),
        });
        map.insert(addr, (h.clone(), now));
        let mut hosts = cluster.hosts().hosts.clone();
        hosts.push(h.clone());
        cluster.set_hosts(hosts);
        Some(h)
    }

    /// Remove hosts no request used for a `cleanup_interval`.
    fn cleanup(&self, cluster: &Cluster) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let limit = self.config.cleanup_interval.as_millis() as u64;
        let mut map = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        map.retain(|_, (_, used)| now.saturating_sub(*used) < limit);
        if map.len() != before {
            let hosts = cluster
                .hosts()
                .hosts
                .iter()
                .filter(|h| map.contains_key(&h.address))
                .cloned()
                .collect();
            cluster.set_hosts(hosts);
        }
    }
}

/// Sweep an `ORIGINAL_DST` cluster's unused hosts every `cleanup_interval`, for as long as it exists.
pub fn spawn(cluster: &Arc<Cluster>) {
    let Some(od) = &cluster.original_dst else { return };
    let every = od
        .config
        .cleanup_interval
        .max(std::time::Duration::from_millis(10));
    let weak: Weak<Cluster> = Arc::downgrade(cluster);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        loop {
            tick.tick().await;
            let Some(c) = weak.upgrade() else { return };
            if let Some(od) = &c.original_dst {
                od.cleanup(&c);
            }
        }
    });
}
