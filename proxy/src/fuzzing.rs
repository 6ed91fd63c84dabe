//! Entry points for the fuzz targets in `fuzz/` and for the test that replays their corpus on stable.
//!
//! Each function takes arbitrary bytes and must never panic, whatever they hold: that is the property the
//! fuzzers check. They are part of the library (and not of `fuzz/`) so that `cargo test` replays every corpus
//! input through exactly the code the fuzzers ran.

use crate::config::load::{self, Format};
use crate::config::node::{Errors, Node};
use crate::config::{bootstrap as lower_bootstrap, descriptors, route as lower_route};
use crate::route::RouteTable;
use crate::server::ClusterIds;
use crate::stats::Store;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Uri};
use std::collections::HashSet;
use std::sync::OnceLock;

const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";
const ROUTE_CONFIGURATION: &str = "envoy.config.route.v3.RouteConfiguration";

/// The bytes (lossily as UTF-8) as a YAML and as a JSON bootstrap: parsed, and when that succeeds lowered; and
/// as a discovery-response `resources:` file, parsed and lowered.
pub fn bootstrap(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Some(desc) = descriptors::message(BOOTSTRAP) else {
        return;
    };
    for format in [Format::Yaml, Format::Json] {
        if let Ok(msg) = load::message_from_text(&text, format, &desc) {
            let _ = lower_bootstrap::lower(msg, &Store::new());
        }
        if let Ok(resources) = load::resources_from_text(&text, format) {
            let _ = crate::config::validate_resources(&resources, &HashSet::new());
        }
    }
}

/// A route table that uses every kind of domain, path, header and query matcher Remora implements.
const FIXED_ROUTES: &str = r#"
name: fuzz
virtual_hosts:
- name: exact
  domains: ["example.com", "example.com:8080", "[::1]:80", "10.0.0.1"]
  routes:
  - match: {path: /exact}
    direct_response: {status: 200}
  - match: {prefix: /CaSe, case_sensitive: false}
    direct_response: {status: 201}
  - match: {safe_regex: {regex: "/re/[a-z]+/\\d{1,3}"}}
    direct_response: {status: 202}
  - match: {path_separated_prefix: /sep}
    direct_response: {status: 203}
  - match: {prefix: /grpc., grpc: {}}
    direct_response: {status: 204}
  - match:
      prefix: /h
      headers:
      - {name: x-exact, exact_match: v}
      - {name: x-prefix, prefix_match: pre}
      - {name: x-suffix, suffix_match: suf}
      - {name: x-contains, contains_match: mid}
      - {name: x-present, present_match: true}
      - {name: x-absent, present_match: false}
      - {name: x-regex, safe_regex_match: {regex: "[0-9]+"}}
      - {name: x-range, range_match: {start: -10, end: 10}}
      - {name: x-invert, exact_match: "no", invert_match: true}
      - {name: x-string, string_match: {contains: AbC, ignore_case: true}}
      - {name: x-missing, string_match: {exact: ""}, treat_missing_header_as_empty: true}
    direct_response: {status: 205}
  - match:
      prefix: /q
      query_parameters:
      - {name: a, string_match: {exact: "1"}}
      - {name: b, present_match: true}
      - {name: c, string_match: {safe_regex: {regex: "x+"}}}
    direct_response: {status: 206}
  - match: {prefix: /}
    direct_response: {status: 207}
- name: suffix
  domains: ["*.example.com", "*-bar.example.org"]
  routes:
  - match: {prefix: /}
    direct_response: {status: 210}
- name: prefix
  domains: ["api.*", "a.*"]
  routes:
  - match: {prefix: /}
    direct_response: {status: 220}
- name: default
  domains: ["*"]
  routes:
  - match: {headers: [{name: x-sandbox, exact_match: alice}], prefix: /}
    direct_response: {status: 230}
  - match: {prefix: /cache.EntityService/}
    direct_response: {status: 231}
"#;

/// Lower a `RouteConfiguration` as an inline route table would be; `None` if it is refused.
fn route_table(text: &str) -> Option<RouteTable> {
    let desc = descriptors::message(ROUTE_CONFIGURATION)?;
    let msg = load::message_from_text(text, Format::Yaml, &desc).ok()?;
    let errs = Errors::default();
    let ids = ClusterIds::default();
    let table = {
        let node = Node::root(&msg, "", &errs);
        lower_route::lower_table(&node, &ids, None, &Store::new())
    };
    errs.is_empty().then_some(table).flatten()
}

fn fixed_table() -> Option<&'static RouteTable> {
    static TABLE: OnceLock<Option<RouteTable>> = OnceLock::new();
    TABLE.get_or_init(|| route_table(FIXED_ROUTES)).as_ref()
}

/// Match a request derived from the bytes against a route table.
///
/// The input: a first byte whose low bit chooses the table (0: [`FIXED_ROUTES`]; 1: the bytes up to the first
/// NUL, as a YAML `RouteConfiguration`), then the request as lines: the authority, the path with its query, and
/// `name: value` headers (lines that are not a valid header are skipped).
pub fn route_match(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let owned;
    let (table, request) = if mode & 1 == 1 {
        let (config, request) = match rest.iter().position(|&b| b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let Some(t) = route_table(&String::from_utf8_lossy(config)) else {
            return;
        };
        owned = t;
        (&owned, request)
    } else {
        let Some(t) = fixed_table() else { return };
        (t, rest)
    };

    let request = String::from_utf8_lossy(request);
    let mut lines = request.split('\n');
    let authority = lines.next().unwrap_or_default();
    let path_and_query = lines.next().unwrap_or_default();
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) {
            headers.append(n, v);
        }
    }

    // Virtual host choice is case-insensitive on the authority, as Envoy lowercases the host.
    let vhost = table.find_vhost(authority).map(|v| v.name.as_str());
    let lower = authority.to_ascii_lowercase();
    let vhost_lower = table.find_vhost(&lower).map(|v| v.name.as_str());
    assert_eq!(
        vhost, vhost_lower,
        "the virtual host for {authority:?} depends on the authority's case"
    );

    // Every route's matcher, on the raw path (which need not be a valid URI).
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    for vh in &table.virtual_hosts {
        for r in &vh.routes {
            let _ = r.matcher.matches(path, query, &headers);
        }
    }

    // The request path the proxy takes, when the path is a valid URI.
    if let Ok(uri) = path_and_query.parse::<Uri>() {
        let line = crate::route::RequestLine {
            method: &http::Method::GET,
            authority,
            uri: &uri,
            scheme: "http",
        };
        if let Some(m) = table.route(&line, &headers) {
            let again = m.route.matcher.matches(uri.path(), uri.query(), &headers);
            assert!(again, "route() chose a route whose matcher refuses the request");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixed_table_lowers() {
        assert!(fixed_table().is_some(), "FIXED_ROUTES is refused");
    }

    #[test]
    fn requests_reach_the_expected_route() {
        let status = |data: &[u8]| {
            let req = String::from_utf8_lossy(&data[1..]);
            let mut lines = req.split('\n');
            let authority = lines.next().unwrap_or_default();
            let uri: Uri = lines.next().unwrap_or_default().parse().unwrap();
            let mut headers = HeaderMap::new();
            for l in lines {
                let (n, v) = l.split_once(':').unwrap();
                headers.append(
                    HeaderName::from_bytes(n.trim().as_bytes()).unwrap(),
                    HeaderValue::from_str(v.trim()).unwrap(),
                );
            }
            route_match(data);
            let line = crate::route::RequestLine {
                method: &http::Method::GET,
                authority,
                uri: &uri,
                scheme: "http",
            };
            let m = fixed_table().unwrap().route(&line, &headers)?;
            match &m.route.action {
                crate::route::Action::Direct { status, .. } => Some(status.as_u16()),
                _ => None,
            }
        };
        assert_eq!(status(b"\0example.com\n/exact"), Some(200));
        assert_eq!(status(b"\0EXAMPLE.com\n/case/x"), Some(201));
        assert_eq!(status(b"\0example.com\n/re/abc/12"), Some(202));
        assert_eq!(status(b"\0example.com\n/sep/x"), Some(203));
        assert_eq!(status(b"\0example.com\n/sepx"), Some(207));
        assert_eq!(status(b"\0example.com\n/q?a=1&b&c=xx"), Some(206));
        assert_eq!(status(b"\0x.example.com\n/"), Some(210));
        assert_eq!(status(b"\0api.test\n/"), Some(220));
        assert_eq!(status(b"\0other\n/\nx-sandbox: alice"), Some(230));
        assert_eq!(status(b"\0other\n/nope"), None);
    }

    #[test]
    fn arbitrary_bytes_do_not_panic() {
        for data in [
            &b""[..],
            b"\x01",
            b"\x01name: x\0a\n/",
            b"\x00\xff\xfe\n\n\n:",
            b"{",
            b"static_resources: {clusters: [{}]}",
            b"resources: [{}]",
        ] {
            bootstrap(data);
            route_match(data);
        }
    }
}
