//! Route tables: virtual hosts chosen by `:authority`, routes matched in order, and what a route does.
//!
//! Everything here is built once per configuration snapshot (header names parsed, regexes compiled, wildcard
//! domains sorted) so that matching a request does no allocation and no string look-up by name.
//!
//! Implements `envoy.config.route.v3.RouteConfiguration`, `VirtualHost`, `Route`, `RouteMatch`, `RouteAction`,
//! `RedirectAction` and `DirectResponseAction` for the fields lowered in `config::route`.

pub mod matcher;

pub use matcher::{HeaderMatch, HeaderMatcher, QueryMatcher, StringMatcher};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Uri};
use regex::Regex;
use std::collections::HashMap;
use std::time::Duration;

/// A cluster a route names, resolved to a slot in the snapshot's cluster table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClusterId(pub u32);

/// Adds and removals of headers (`request_headers_to_add` / `_remove`, and the response ones).
#[derive(Clone, Debug, Default)]
pub struct HeaderMods {
    pub add: Vec<HeaderAdd>,
    pub remove: Vec<HeaderName>,
}

#[derive(Clone, Debug)]
pub struct HeaderAdd {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub action: AppendAction,
}

/// `HeaderValueOption.append_action` (and the deprecated `append`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

impl HeaderMods {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    /// Apply: removals first, then additions, as Envoy does.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for a in &self.add {
            match a.action {
                AppendAction::AppendIfExistsOrAdd => {
                    headers.append(a.name.clone(), a.value.clone());
                }
                AppendAction::AddIfAbsent => {
                    if !headers.contains_key(&a.name) {
                        headers.insert(a.name.clone(), a.value.clone());
                    }
                }
                AppendAction::OverwriteIfExistsOrAdd => {
                    headers.insert(a.name.clone(), a.value.clone());
                }
                AppendAction::OverwriteIfExists => {
                    if headers.contains_key(&a.name) {
                        headers.insert(a.name.clone(), a.value.clone());
                    }
                }
            }
        }
    }
}

/// One `RouteConfiguration`.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    /// Exact domains (lowercase) to the virtual host index.
    exact: HashMap<String, usize>,
    /// `*.example.com` and `*-bar.example.com`: (suffix, vhost), longest suffix first.
    suffixes: Vec<(String, usize)>,
    /// `example.*`: (prefix, vhost), longest prefix first.
    prefixes: Vec<(String, usize)>,
    /// `*`.
    default: Option<usize>,
    pub request_headers: HeaderMods,
    pub response_headers: HeaderMods,
    pub ignore_port_in_host_matching: bool,
    /// `typed_per_filter_config` for `envoy.filters.http.local_ratelimit`.
    pub local_rate_limit: Option<LocalRateLimit>,
}

/// A per-route local rate limiter (`typed_per_filter_config`).
pub type LocalRateLimit = std::sync::Arc<crate::filters::local_ratelimit::LocalRateLimiter>;

#[derive(Debug, Default)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    pub request_headers: HeaderMods,
    pub response_headers: HeaderMods,
    pub local_rate_limit: Option<LocalRateLimit>,
    /// `retry_policy`, used by routes that have none of their own.
    pub retry_policy: Option<std::sync::Arc<crate::retry::RetryPolicy>>,
    pub include_request_attempt_count: bool,
    pub include_attempt_count_in_response: bool,
    pub per_request_buffer_limit: Option<u32>,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub action: Action,
    pub request_headers: HeaderMods,
    pub response_headers: HeaderMods,
    pub local_rate_limit: Option<LocalRateLimit>,
    /// `per_request_buffer_limit_bytes`: how much of a request body is kept for retries.
    pub per_request_buffer_limit: Option<u32>,
}

/// A pseudo-header a route can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pseudo {
    Method,
    Authority,
    /// The path with its query, as `:path` carries it.
    Path,
    Scheme,
}

/// The parts of a request that are not in its header map.
#[derive(Clone, Copy, Debug)]
pub struct RequestLine<'a> {
    pub method: &'a http::Method,
    pub authority: &'a str,
    pub uri: &'a Uri,
    /// `http` or `https`: the URI's own, else the connection's.
    pub scheme: &'a str,
}

impl RouteMatch {
    fn pseudo_matches(&self, line: &RequestLine<'_>) -> bool {
        self.pseudo.iter().all(|(p, m)| {
            let value = match p {
                Pseudo::Method => Some(line.method.as_str()),
                Pseudo::Authority => Some(line.authority),
                Pseudo::Path => line.uri.path_and_query().map(|pq| pq.as_str()),
                Pseudo::Scheme => Some(line.scheme),
            };
            m.matches_value(value)
        })
    }
}

#[derive(Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatcher>,
    /// Matchers on the request's pseudo-headers (`:method`, `:authority`, `:path`, `:scheme`), as Envoy
    /// matches them for HTTP/1.1 and HTTP/2 alike.
    pub pseudo: Vec<(Pseudo, HeaderMatcher)>,
    pub query: Vec<QueryMatcher>,
    /// `grpc: {}`: only requests with `content-type: application/grpc*`.
    pub grpc: bool,
}

#[derive(Debug)]
pub enum PathMatch {
    Prefix(String),
    Path(String),
    /// Matched against the whole path without the query string.
    Regex(Regex),
    /// `path_separated_prefix`: the path equals the prefix or continues with `/` (or `?`).
    Separated(String),
    /// `connect_matcher`: CONNECT requests (whose authority-form target has no path), and only those.
    Connect,
}

#[derive(Debug)]
pub enum Action {
    Forward(Box<RouteAction>),
    Redirect(Box<Redirect>),
    Direct {
        status: http::StatusCode,
        body: Option<Bytes>,
    },
}

#[derive(Debug)]
pub struct RouteAction {
    pub cluster: ClusterSpecifier,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub host_rewrite: HostRewrite,
    /// `timeout` (default 15 s); `None` when set to 0 (disabled).
    pub timeout: Option<Duration>,
    /// `idle_timeout`: the route's stream idle timeout (zero: none), instead of the connection manager's.
    pub idle_timeout: Option<Duration>,
    pub retry_policy: Option<std::sync::Arc<crate::retry::RetryPolicy>>,
    /// `hash_policy`: the request hash for `RING_HASH` and `MAGLEV` clusters.
    pub hash_policy: crate::upstream::hash::HashPolicy,
    /// `upgrade_configs`: upgrade types (lower case) this route allows (`true`) or refuses (`false`), over the
    /// connection manager's (see [`crate::listener::upgrade`]).
    pub upgrades: Vec<(String, bool)>,
}

#[derive(Debug)]
pub enum ClusterSpecifier {
    Cluster(ClusterId, String),
    Weighted {
        clusters: Vec<(ClusterId, String, u32)>,
        total: u32,
    },
    /// The cluster is named by this request header; missing or unknown gives 503 (NC).
    Header(HeaderName),
}

#[derive(Debug, PartialEq, Eq)]
pub enum HostRewrite {
    None,
    Literal(HeaderValue),
    /// `auto_host_rewrite`: the upstream host's hostname (for DNS clusters), else its address.
    Auto,
}

#[derive(Debug, Default)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(Regex, String)>,
    pub status: u16,
    pub strip_query: bool,
}

/// What matching a request produced.
pub struct Matched<'t> {
    pub vhost: &'t VirtualHost,
    pub route: &'t Route,
}

impl RouteTable {
    /// Index the virtual hosts' domains. Domains are already validated (lowercase, one wildcard at most, no
    /// duplicates) by lowering.
    pub fn new(name: String, virtual_hosts: Vec<VirtualHost>) -> Self {
        let mut t = RouteTable {
            name,
            ..Default::default()
        };
        for (i, vh) in virtual_hosts.iter().enumerate() {
            for d in &vh.domains {
                if d == "*" {
                    t.default = Some(i);
                } else if let Some(s) = d.strip_prefix('*') {
                    t.suffixes.push((s.to_string(), i));
                } else if let Some(p) = d.strip_suffix('*') {
                    t.prefixes.push((p.to_string(), i));
                } else {
                    t.exact.insert(d.clone(), i);
                }
            }
        }
        // Longest wildcard first; ties keep configuration order (sort is stable).
        t.suffixes.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        t.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        t.virtual_hosts = virtual_hosts;
        t
    }

    /// The virtual host for an authority, as Envoy picks it: exact, then the longest suffix wildcard, then the
    /// longest prefix wildcard, then `*`. A port is kept for matching (Envoy matches `host:port` unless the
    /// domains list the host alone, which [`Self::find_vhost`] retries without the port).
    pub fn find_vhost(&self, authority: &str) -> Option<&VirtualHost> {
        let mut buf = [0u8; 256];
        let host = lower(authority, &mut buf);
        let host: &str = &host;
        self.lookup(host)
            .or_else(|| {
                // Envoy's `strip_matching_host_port` is off by default, but a domain without port still matches
                // a host carrying the default port for the scheme only; we retry without any port, which is what
                // `ignore_port_in_host_matching` asks for.
                if self.ignore_port_in_host_matching {
                    strip_port(host).and_then(|h| self.lookup(h))
                } else {
                    None
                }
            })
            .map(|i| &self.virtual_hosts[i])
            .or_else(|| self.default.map(|i| &self.virtual_hosts[i]))
    }

    fn lookup(&self, host: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        for (suffix, i) in &self.suffixes {
            // The wildcard matches at least one character.
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return Some(*i);
            }
        }
        for (prefix, i) in &self.prefixes {
            if host.len() > prefix.len() && host.starts_with(prefix.as_str()) {
                return Some(*i);
            }
        }
        None
    }

    /// Match a request; the indexes of the virtual host and the route.
    pub fn route_index(&self, line: &RequestLine<'_>, headers: &HeaderMap) -> Option<(usize, usize)> {
        let m = self.route(line, headers)?;
        let vi = self.virtual_hosts.iter().position(|v| std::ptr::eq(v, m.vhost))?;
        let ri = m.vhost.routes.iter().position(|r| std::ptr::eq(r, m.route))?;
        Some((vi, ri))
    }

    /// The local rate limit for a matched route: the route's own, else its virtual host's, else the table's
    /// (`typed_per_filter_config`, most specific wins).
    pub fn local_rate_limit(&self, vhost: usize, route: usize) -> Option<&LocalRateLimit> {
        let vh = self.virtual_hosts.get(vhost)?;
        vh.routes
            .get(route)
            .and_then(|r| r.local_rate_limit.as_ref())
            .or(vh.local_rate_limit.as_ref())
            .or(self.local_rate_limit.as_ref())
    }

    /// Match a request: the virtual host by authority, then the first route whose conditions all hold.
    pub fn route<'t>(&'t self, line: &RequestLine<'_>, headers: &HeaderMap) -> Option<Matched<'t>> {
        let vhost = self.find_vhost(line.authority)?;
        let path = line.uri.path();
        let query = line.uri.query();
        vhost
            .routes
            .iter()
            .find(|r| {
                r.matcher.matches(path, query, headers)
                    && (r.matcher.pseudo.is_empty() || r.matcher.pseudo_matches(line))
            })
            .map(|route| Matched { vhost, route })
    }
}

fn strip_port(host: &str) -> Option<&str> {
    // `[::1]:80` and `host:80`; a bare IPv6 address has no port to strip.
    let (h, port) = host.rsplit_once(':')?;
    let bracketed = h.starts_with('[') && h.ends_with(']');
    (port.bytes().all(|b| b.is_ascii_digit()) && (bracketed || !h.contains(':'))).then_some(h)
}

/// The authority in lowercase, without allocating unless it is longer than `buf` (and has uppercase letters).
fn lower<'b>(s: &'b str, buf: &'b mut [u8; 256]) -> std::borrow::Cow<'b, str> {
    use std::borrow::Cow;
    if !s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Cow::Borrowed(s);
    }
    if s.len() > buf.len() {
        return Cow::Owned(s.to_ascii_lowercase());
    }
    let out = &mut buf[..s.len()];
    out.copy_from_slice(s.as_bytes());
    out.make_ascii_lowercase();
    Cow::Borrowed(std::str::from_utf8(out).unwrap_or(s))
}

impl RouteMatch {
    pub fn matches(&self, path: &str, query: Option<&str>, headers: &HeaderMap) -> bool {
        // Only CONNECT has an authority-form target (an empty path); it matches `connect_matcher` routes only.
        if path.is_empty() != matches!(self.path, PathMatch::Connect) {
            return false;
        }
        let path_ok = match &self.path {
            PathMatch::Connect => true,
            PathMatch::Prefix(p) => starts_with(path, p, self.case_sensitive),
            PathMatch::Path(p) => {
                if self.case_sensitive {
                    path == p
                } else {
                    path.eq_ignore_ascii_case(p)
                }
            }
            PathMatch::Regex(re) => re.is_match(path),
            PathMatch::Separated(p) => {
                starts_with(path, p, self.case_sensitive)
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
        };
        if !path_ok {
            return false;
        }
        if self.grpc && !is_grpc(headers) {
            return false;
        }
        if !self.headers.iter().all(|m| m.matches(headers)) {
            return false;
        }
        self.query.is_empty() || self.query.iter().all(|m| m.matches(query.unwrap_or("")))
    }
}

fn starts_with(path: &str, prefix: &str, case_sensitive: bool) -> bool {
    if case_sensitive {
        path.starts_with(prefix)
    } else {
        path.len() >= prefix.len() && path.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    }
}

/// `content-type` begins with `application/grpc`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vh(name: &str, domains: &[&str]) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn virtual_host_search_order() {
        let t = RouteTable::new(
            "rc".into(),
            vec![
                vh("exact", &["www.foo.com"]),
                vh("suffix", &["*.foo.com"]),
                vh("longer-suffix", &["*-bar.foo.com"]),
                vh("prefix", &["foo.*"]),
                vh("any", &["*"]),
                vh("port", &["api.foo.com:8080"]),
            ],
        );
        let pick = |h: &str| t.find_vhost(h).map(|v| v.name.as_str());
        assert_eq!(pick("www.foo.com"), Some("exact"));
        assert_eq!(pick("WWW.Foo.com"), Some("exact"));
        assert_eq!(pick("a.foo.com"), Some("suffix"));
        assert_eq!(pick("baz-bar.foo.com"), Some("longer-suffix"));
        // The wildcard matches at least one character.
        assert_eq!(pick("-bar.foo.com"), Some("suffix"));
        assert_eq!(pick("foo.org"), Some("prefix"));
        assert_eq!(pick("other"), Some("any"));
        // A port is part of the host unless the table ignores it.
        assert_eq!(pick("www.foo.com:80"), Some("any"));
        assert_eq!(pick("api.foo.com:8080"), Some("port"));
        assert_eq!(pick("a.foo.com:80"), Some("any"));
        assert_eq!(pick("foo.com:80"), Some("prefix"));
        // Longer than the stack buffer for lowercasing (the route_match fuzz target checks this case invariant).
        let long = format!("{}.FOO.COM", "a".repeat(300));
        assert_eq!(pick(&long), Some("suffix"));
    }

    #[test]
    fn ignore_port_in_host_matching() {
        let mut t = RouteTable::new(
            "rc".into(),
            vec![vh("exact", &["www.foo.com"]), vh("v6", &["[::1]"])],
        );
        assert!(t.find_vhost("www.foo.com:8080").is_none());
        t.ignore_port_in_host_matching = true;
        assert_eq!(
            t.find_vhost("www.foo.com:8080").map(|v| v.name.as_str()),
            Some("exact")
        );
        assert_eq!(t.find_vhost("[::1]:8080").map(|v| v.name.as_str()), Some("v6"));
    }

    fn m(path: PathMatch, case_sensitive: bool) -> RouteMatch {
        RouteMatch {
            path,
            case_sensitive,
            headers: Vec::new(),
            pseudo: Vec::new(),
            query: Vec::new(),
            grpc: false,
        }
    }

    #[test]
    fn path_matchers() {
        let h = HeaderMap::new();
        let prefix = m(PathMatch::Prefix("/foo".into()), true);
        assert!(prefix.matches("/foobar", None, &h));
        assert!(!prefix.matches("/Foo", None, &h));
        assert!(m(PathMatch::Prefix("/foo".into()), false).matches("/FOO/x", None, &h));
        let exact = m(PathMatch::Path("/foo".into()), true);
        assert!(exact.matches("/foo", Some("a=1"), &h));
        assert!(!exact.matches("/foo/", None, &h));
        let sep = m(PathMatch::Separated("/api".into()), true);
        assert!(sep.matches("/api", None, &h));
        assert!(sep.matches("/api/v1", None, &h));
        assert!(!sep.matches("/apis", None, &h));
        let re = m(PathMatch::Regex(Regex::new("^(?:/v[0-9]+/.*)$").unwrap()), true);
        assert!(re.matches("/v1/x", None, &h));
        assert!(!re.matches("/x/v1/x", None, &h));
    }

    #[test]
    fn grpc_match_needs_grpc_content_type() {
        let mut g = m(PathMatch::Prefix("/".into()), true);
        g.grpc = true;
        let mut h = HeaderMap::new();
        assert!(!g.matches("/x", None, &h));
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(g.matches("/x", None, &h));
    }

    #[test]
    fn header_mods_apply_in_envoy_order() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let mods = HeaderMods {
            add: vec![
                HeaderAdd {
                    name: HeaderName::from_static("x-a"),
                    value: HeaderValue::from_static("2"),
                    action: AppendAction::AppendIfExistsOrAdd,
                },
                HeaderAdd {
                    name: HeaderName::from_static("x-b"),
                    value: HeaderValue::from_static("3"),
                    action: AppendAction::AddIfAbsent,
                },
                HeaderAdd {
                    name: HeaderName::from_static("x-c"),
                    value: HeaderValue::from_static("4"),
                    action: AppendAction::OverwriteIfExists,
                },
            ],
            remove: vec![HeaderName::from_static("x-gone")],
        };
        mods.apply(&mut h);
        assert_eq!(h.get_all("x-a").iter().count(), 2);
        assert_eq!(h.get("x-b").unwrap(), "3");
        assert!(h.get("x-c").is_none());
        assert!(h.get("x-gone").is_none());
    }
}
