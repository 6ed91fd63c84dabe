//! Choosing a listener's filter chain for a connection: `filter_chain_match`, as Envoy does it.
//!
//! Envoy prunes the chains criterion by criterion, in a fixed order: destination port, destination IP,
//! server name, transport protocol, application protocols, directly connected source IP, source type, source
//! IP, source port. At each step only the chains that match the connection *most specifically* go on (an exact
//! port beats no port; a longer matching prefix beats a shorter one, and an empty list counts as `/0`); a chain
//! whose criterion does not match at all is dropped. There is no backtracking: when a step leaves nothing, the
//! connection has no match and goes to `default_filter_chain`, or is closed and counted as
//! `no_filter_chain_match`. Lowering refuses two chains that a connection could match equally (Envoy's
//! "multiple filter chains with the same matching rules"), so at most one chain is left.
//!
//! A connection's transport protocol is `tls` when the `tls_inspector` listener filter saw a ClientHello, with
//! its SNI and ALPN, else `raw_buffer` (what Envoy sets when no listener filter detected one).

use super::config::NetworkFilter;
use std::net::{IpAddr, SocketAddr};

/// `envoy.config.core.v3.CidrRange`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CidrRange {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl CidrRange {
    /// A range from an address and a prefix length (bits past the prefix are cleared, as Envoy does).
    pub fn new(address: IpAddr, prefix_len: u8) -> Option<CidrRange> {
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return None;
        }
        let address = match address {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix_len)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Some(CidrRange { address, prefix_len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 peer (a dual-stack socket) is matched as the IPv4 address it carries.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        CidrRange::new(ip, self.prefix_len).is_some_and(|r| r.address == self.address)
    }
}

/// `source_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceType {
    Any,
    /// `SAME_IP_OR_LOOPBACK`: the peer is a loopback address or this host's address on the connection.
    Local,
    /// `EXTERNAL`: anything else.
    External,
}

/// `envoy.config.listener.v3.FilterChainMatch`, lowered. Empty lists match anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainMatch {
    pub destination_port: Option<u16>,
    pub prefix_ranges: Vec<CidrRange>,
    /// `server_names`, lower-cased (`*.example.com` wildcards allowed).
    pub server_names: Vec<String>,
    /// `transport_protocol`: `raw_buffer` or `tls` (empty: any).
    pub transport_protocol: Option<String>,
    pub application_protocols: Vec<String>,
    pub direct_source_prefix_ranges: Vec<CidrRange>,
    pub source_type: SourceType,
    pub source_prefix_ranges: Vec<CidrRange>,
    pub source_ports: Vec<u16>,
}

impl Default for ChainMatch {
    fn default() -> Self {
        ChainMatch {
            destination_port: None,
            prefix_ranges: Vec::new(),
            server_names: Vec::new(),
            transport_protocol: None,
            application_protocols: Vec::new(),
            direct_source_prefix_ranges: Vec::new(),
            source_type: SourceType::Any,
            source_prefix_ranges: Vec::new(),
            source_ports: Vec::new(),
        }
    }
}

/// One filter chain of a listener.
#[derive(Debug)]
pub struct FilterChain {
    /// `name`, or `filter_chains[i]` when unnamed.
    pub name: String,
    pub matcher: ChainMatch,
    pub filter: NetworkFilter,
    /// The chain's `transport_socket` when it terminates TLS.
    pub tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
    /// `transport_socket_connect_timeout`: how long the TLS handshake may take (Envoy's
    /// `downstream_cx_transport_socket_connect_timeout` counts those that take longer). Without it Remora still
    /// bounds the handshake by [`DEFAULT_HANDSHAKE_TIMEOUT`], so a client that never finishes cannot hold a
    /// connection.
    pub handshake_timeout: std::time::Duration,
}

/// The handshake bound when a chain sets no `transport_socket_connect_timeout` (Envoy then leaves it to the
/// connection's idle timeouts).
pub const DEFAULT_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// What a connection shows for choosing its chain: its addresses, and what `tls_inspector` found.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo<'a> {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub hello: Option<&'a crate::tls::inspector::Hello>,
}

impl ConnInfo<'_> {
    fn transport(&self) -> &'static str {
        if self.hello.is_some_and(|h| h.tls) {
            "tls"
        } else {
            "raw_buffer"
        }
    }
    fn peer_is_local(&self) -> bool {
        is_local(self.remote.ip(), self.local.ip())
    }
}

/// A listener's chains and its `default_filter_chain`.
#[derive(Debug)]
pub struct FilterChains {
    pub chains: Vec<FilterChain>,
    pub default: Option<FilterChain>,
}

/// One pruning step: how specifically a chain's criterion matches the connection, higher is more specific,
/// `None` for no match.
type Step = fn(&ChainMatch, &ConnInfo) -> Option<u32>;

/// How specifically `server_names` match the SNI: an exact name beats a wildcard, a longer wildcard beats a
/// shorter one (`*.b.example.com` over `*.example.com`), and an empty list matches anything, lowest.
fn server_name_rank(names: &[String], sni: Option<&str>) -> Option<u32> {
    if names.is_empty() {
        return Some(0);
    }
    let sni = sni?;
    names
        .iter()
        .filter_map(|n| match n.strip_prefix('*') {
            // `*.example.com` covers any name ending in `.example.com`, as Envoy's lookup of ever shorter
            // wildcards does.
            Some(suffix) => {
                (sni.len() > suffix.len() && sni.ends_with(suffix)).then(|| suffix.len() as u32 + 1)
            }
            None => (n == sni).then_some(u32::MAX),
        })
        .max()
}

/// How specifically a list of ranges matches `ip`: the longest containing prefix (an empty list counts as a
/// `/0`), or `None` when no range contains it.
fn range_rank(ranges: &[CidrRange], ip: IpAddr) -> Option<u32> {
    if ranges.is_empty() {
        return Some(0);
    }
    ranges
        .iter()
        .filter(|r| r.contains(ip))
        // Ranked above the empty list even for an explicit /0, as Envoy's trie prefers a configured range.
        .map(|r| u32::from(r.prefix_len) + 1)
        .max()
}

fn is_local(remote: IpAddr, local: IpAddr) -> bool {
    remote.is_loopback()
        || remote == local
        || matches!(remote, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
}

impl FilterChains {
    /// The chain for a connection (its local address is the original destination when the `original_dst`
    /// listener filter restored one).
    pub fn select(&self, conn: &ConnInfo) -> Option<&FilterChain> {
        if self.chains.len() == 1 && self.chains[0].matcher == ChainMatch::default() {
            return self.chains.first();
        }
        let steps: [Step; 9] = [
            |m, c| match m.destination_port {
                None => Some(0),
                Some(p) if p == c.local.port() => Some(1),
                Some(_) => None,
            },
            |m, c| range_rank(&m.prefix_ranges, c.local.ip()),
            |m, c| server_name_rank(&m.server_names, c.hello.and_then(|h| h.sni.as_deref())),
            |m, c| match &m.transport_protocol {
                None => Some(0),
                Some(t) if t == c.transport() => Some(1),
                Some(_) => None,
            },
            |m, c| {
                if m.application_protocols.is_empty() {
                    Some(0)
                } else {
                    let alpn = c.hello.map(|h| h.alpn.as_slice()).unwrap_or_default();
                    m.application_protocols
                        .iter()
                        .any(|p| alpn.contains(p))
                        .then_some(1)
                }
            },
            |m, c| range_rank(&m.direct_source_prefix_ranges, c.remote.ip()),
            |m, c| match m.source_type {
                SourceType::Any => Some(0),
                SourceType::Local if c.peer_is_local() => Some(1),
                SourceType::External if !c.peer_is_local() => Some(1),
                _ => None,
            },
            |m, c| range_rank(&m.source_prefix_ranges, c.remote.ip()),
            |m, c| {
                if m.source_ports.is_empty() {
                    Some(0)
                } else if m.source_ports.contains(&c.remote.port()) {
                    Some(1)
                } else {
                    None
                }
            },
        ];
        let mut alive: Vec<&FilterChain> = self.chains.iter().collect();
        for step in steps {
            let mut best = None;
            let mut next = Vec::with_capacity(alive.len());
            for c in alive {
                let Some(rank) = step(&c.matcher, conn) else {
                    continue;
                };
                match best {
                    Some(b) if rank < b => {}
                    Some(b) if rank == b => next.push(c),
                    _ => {
                        best = Some(rank);
                        next.clear();
                        next.push(c);
                    }
                }
            }
            if next.is_empty() {
                return self.default.as_ref();
            }
            alive = next;
        }
        alive.first().copied()
    }
}

/// The first pair of chains a connection could match equally, as Envoy refuses them: each chain's criteria are
/// expanded into every combination of their values (an empty list is one wildcard value), and two chains
/// sharing a combination are duplicates. Returns their indexes.
pub fn find_duplicate(chains: &[ChainMatch]) -> Option<(usize, usize)> {
    use std::collections::HashMap;
    /// One combination of a chain's criteria.
    #[derive(PartialEq, Eq, Hash)]
    struct Key {
        port: Option<u16>,
        dst: Option<CidrRange>,
        sni: Option<String>,
        transport: Option<String>,
        alpn: Option<String>,
        direct_src: Option<CidrRange>,
        source_type: SourceType,
        src: Option<CidrRange>,
        src_port: Option<u16>,
    }
    fn opts<T: Clone>(v: &[T]) -> Vec<Option<T>> {
        if v.is_empty() {
            vec![None]
        } else {
            v.iter().cloned().map(Some).collect()
        }
    }
    let mut seen: HashMap<Key, usize> = HashMap::new();
    for (i, m) in chains.iter().enumerate() {
        for dst in opts(&m.prefix_ranges) {
            for sni in opts(&m.server_names) {
                for alpn in opts(&m.application_protocols) {
                    for direct_src in opts(&m.direct_source_prefix_ranges) {
                        for src in opts(&m.source_prefix_ranges) {
                            for src_port in opts(&m.source_ports) {
                                let key = Key {
                                    port: m.destination_port,
                                    dst,
                                    sni: sni.clone(),
                                    transport: m.transport_protocol.clone(),
                                    alpn: alpn.clone(),
                                    direct_src,
                                    source_type: m.source_type,
                                    src,
                                    src_port,
                                };
                                match seen.get(&key) {
                                    Some(&j) if j != i => return Some((j, i)),
                                    _ => {
                                        seen.insert(key, i);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::tcp_proxy::{TcpProxyConfig, TcpProxyStats};
    use std::sync::Arc;

    fn cidr(s: &str) -> CidrRange {
        let (a, l) = s.split_once('/').unwrap();
        CidrRange::new(a.parse().unwrap(), l.parse().unwrap()).unwrap()
    }

    fn chain(name: &str, m: ChainMatch) -> FilterChain {
        let store = crate::stats::Store::new();
        let cfg = TcpProxyConfig {
            stat_prefix: name.to_string(),
            clusters: Vec::new(),
            total_weight: 0,
            idle_timeout: None,
            max_connect_attempts: 1,
            stats: TcpProxyStats::new(&store.scope(format!("tcp.{name}."))),
        };
        FilterChain {
            name: name.to_string(),
            matcher: m,
            filter: NetworkFilter::Tcp(Arc::new(cfg)),
            tls: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    fn pick(chains: &FilterChains, local: &str, remote: &str) -> Option<String> {
        chains
            .select(&ConnInfo {
                local: local.parse().unwrap(),
                remote: remote.parse().unwrap(),
                hello: None,
            })
            .map(|c| c.name.clone())
    }

    #[test]
    fn cidr_ranges_clear_host_bits_and_contain_addresses() {
        let r = cidr("10.1.2.3/16");
        assert_eq!(r.address, "10.1.0.0".parse::<IpAddr>().unwrap());
        assert!(r.contains("10.1.200.7".parse().unwrap()));
        assert!(!r.contains("10.2.0.1".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("192.0.2.1".parse().unwrap()));
        assert!(!cidr("0.0.0.0/0").contains("::1".parse().unwrap()));
        assert!(cidr("127.0.0.0/8").contains("::ffff:127.0.0.9".parse().unwrap()));
        assert!(cidr("2001:db8::/32").contains("2001:db8:1::5".parse().unwrap()));
        assert!(CidrRange::new("10.0.0.0".parse().unwrap(), 33).is_none());
    }

    /// The example from Envoy's FilterChainMatch docs: the most specific value wins at each step, and a chain
    /// with the wrong value can never be chosen.
    #[test]
    fn each_step_keeps_the_most_specific_chains() {
        let chains = FilterChains {
            chains: vec![
                chain("any", ChainMatch::default()),
                chain(
                    "port-8080",
                    ChainMatch {
                        destination_port: Some(8080),
                        ..Default::default()
                    },
                ),
                chain(
                    "ten-slash-8",
                    ChainMatch {
                        prefix_ranges: vec![cidr("10.0.0.0/8")],
                        ..Default::default()
                    },
                ),
                chain(
                    "ten-one-slash-16",
                    ChainMatch {
                        prefix_ranges: vec![cidr("10.1.0.0/16")],
                        ..Default::default()
                    },
                ),
                chain(
                    "from-loopback",
                    ChainMatch {
                        prefix_ranges: vec![cidr("10.2.0.0/16")],
                        source_type: SourceType::Local,
                        ..Default::default()
                    },
                ),
                chain(
                    "from-port-7",
                    ChainMatch {
                        prefix_ranges: vec![cidr("10.3.0.0/16")],
                        source_ports: vec![7],
                        ..Default::default()
                    },
                ),
            ],
            default: None,
        };
        assert_eq!(
            pick(&chains, "192.0.2.1:80", "192.0.2.9:1000").as_deref(),
            Some("any")
        );
        // The port decides first, whatever the address.
        assert_eq!(
            pick(&chains, "10.1.0.1:8080", "192.0.2.9:1000").as_deref(),
            Some("port-8080")
        );
        assert_eq!(
            pick(&chains, "10.9.0.1:80", "192.0.2.9:1000").as_deref(),
            Some("ten-slash-8")
        );
        assert_eq!(
            pick(&chains, "10.1.0.1:80", "192.0.2.9:1000").as_deref(),
            Some("ten-one-slash-16")
        );
        // 10.2/16 is the most specific destination, and its chain wants a local peer: no backtracking to /8.
        assert_eq!(pick(&chains, "10.2.0.1:80", "192.0.2.9:1000"), None);
        assert_eq!(
            pick(&chains, "10.2.0.1:80", "127.0.0.1:1000").as_deref(),
            Some("from-loopback")
        );
        assert_eq!(
            pick(&chains, "10.3.0.1:80", "192.0.2.9:7").as_deref(),
            Some("from-port-7")
        );
        assert_eq!(pick(&chains, "10.3.0.1:80", "192.0.2.9:8"), None);
    }

    #[test]
    fn the_default_chain_takes_what_nothing_matches() {
        let chains = FilterChains {
            chains: vec![chain(
                "internal",
                ChainMatch {
                    source_prefix_ranges: vec![cidr("127.0.0.5/32")],
                    ..Default::default()
                },
            )],
            default: Some(chain("passthrough", ChainMatch::default())),
        };
        assert_eq!(
            pick(&chains, "127.0.0.1:80", "127.0.0.5:9").as_deref(),
            Some("internal")
        );
        assert_eq!(
            pick(&chains, "127.0.0.1:80", "127.0.0.6:9").as_deref(),
            Some("passthrough")
        );
    }

    #[test]
    fn external_sources_and_source_ranges() {
        let chains = FilterChains {
            chains: vec![
                chain(
                    "external",
                    ChainMatch {
                        source_type: SourceType::External,
                        ..Default::default()
                    },
                ),
                chain(
                    "local",
                    ChainMatch {
                        source_type: SourceType::Local,
                        ..Default::default()
                    },
                ),
            ],
            default: None,
        };
        assert_eq!(
            pick(&chains, "10.0.0.1:80", "10.0.0.2:9").as_deref(),
            Some("external")
        );
        // The connection's own address counts as local.
        assert_eq!(
            pick(&chains, "10.0.0.1:80", "10.0.0.1:9").as_deref(),
            Some("local")
        );
        assert_eq!(pick(&chains, "[::1]:80", "[::1]:9").as_deref(), Some("local"));
    }

    #[test]
    fn duplicates_are_chains_sharing_any_combination() {
        let a = ChainMatch {
            prefix_ranges: vec![cidr("10.0.0.0/8"), cidr("192.168.0.0/16")],
            ..Default::default()
        };
        let b = ChainMatch {
            prefix_ranges: vec![cidr("192.168.0.0/16")],
            ..Default::default()
        };
        let c = ChainMatch {
            prefix_ranges: vec![cidr("192.168.0.0/16")],
            destination_port: Some(80),
            ..Default::default()
        };
        assert_eq!(find_duplicate(&[a.clone(), b.clone()]), Some((0, 1)));
        assert_eq!(find_duplicate(&[a, c.clone()]), None);
        assert_eq!(
            find_duplicate(&[ChainMatch::default(), ChainMatch::default()]),
            Some((0, 1))
        );
        assert_eq!(find_duplicate(&[b, c]), None);
    }
}
