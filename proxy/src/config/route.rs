//! Lowering `envoy.config.route.v3.RouteConfiguration` into a [`RouteTable`].

use super::node::Node;
use super::resilience::lower_retry_policy;
use crate::route::{
    Action, AppendAction, ClusterSpecifier, HeaderAdd, HeaderMatch, HeaderMatcher, HeaderMods, HostRewrite,
    PathMatch, Pseudo, QueryMatcher, Redirect, Route, RouteAction, RouteMatch, RouteTable, StringMatcher,
    VirtualHost,
};
use crate::server::ClusterIds;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use regex::Regex;
use std::collections::HashSet;
use std::time::Duration;

/// Lower a route table. `static_clusters` is given for inline tables, whose cluster names Envoy validates
/// (`validate_clusters` defaults to true for them).
pub fn lower_table(
    rc: &Node,
    ids: &ClusterIds,
    static_clusters: Option<&HashSet<String>>,
    store: &std::sync::Arc<crate::stats::Store>,
) -> Option<RouteTable> {
    let name = rc.string("name").unwrap_or_default();
    let validate = rc
        .wrapped_bool("validate_clusters")
        .unwrap_or(static_clusters.is_some());
    let known = if validate { static_clusters } else { None };
    let request_headers = header_mods(rc, "request_headers_to_add", "request_headers_to_remove");
    let response_headers = header_mods(rc, "response_headers_to_add", "response_headers_to_remove");
    let ignore_port = rc.bool("ignore_port_in_host_matching");
    rc.unsupported("internal_only_headers");
    rc.unsupported("most_specific_header_mutations_wins");
    rc.unsupported("vhds");
    rc.unsupported("cluster_specifier_plugins");
    rc.unsupported("request_mirror_policies");
    let table_rl = per_filter_config(rc, store);
    rc.unsupported("max_direct_response_body_size_bytes");
    rc.unsupported("metadata");

    let mut seen_domains = HashSet::new();
    let mut wildcard = false;
    let mut vhosts = Vec::new();
    for vh in rc.list("virtual_hosts") {
        let vname = vh.string("name").unwrap_or_default();
        let mut domains = Vec::new();
        for d in vh.strings("domains") {
            let d = d.to_ascii_lowercase();
            if d == "*" {
                if wildcard {
                    vh.err(
                        "domains",
                        format!("only a single wildcard domain is permitted in route {name}"),
                    );
                }
                wildcard = true;
            } else if d.matches('*').count() > 1
                || (d.contains('*') && !d.starts_with('*') && !d.ends_with('*'))
            {
                vh.err(
                    "domains",
                    format!("invalid domain {d:?}: one wildcard, at the start or the end"),
                );
            }
            if !seen_domains.insert(d.clone()) {
                vh.err(
                    "domains",
                    format!("only unique values for domains are permitted: duplicate entry of domain {d} in route {name}"),
                );
            }
            domains.push(d);
        }
        if domains.is_empty() {
            vh.err("domains", "a virtual host needs at least one domain");
        }
        let routes = vh
            .list("routes")
            .iter()
            .filter_map(|r| lower_route(r, ids, known, store))
            .collect();
        let request_headers = header_mods(&vh, "request_headers_to_add", "request_headers_to_remove");
        let response_headers = header_mods(&vh, "response_headers_to_add", "response_headers_to_remove");
        vh.unsupported("require_tls");
        vh.unsupported("virtual_clusters");
        vh.unsupported("rate_limits");
        vh.unsupported("cors");
        let local_rate_limit = per_filter_config(&vh, store);
        let include_request_attempt_count = vh.bool("include_request_attempt_count");
        let include_attempt_count_in_response = vh.bool("include_attempt_count_in_response");
        let retry_policy = vh
            .msg("retry_policy")
            .and_then(|p| lower_retry_policy(&p))
            .map(std::sync::Arc::new);
        vh.unsupported("retry_policy_typed_config");
        vh.unsupported("hedge_policy");
        let per_request_buffer_limit = vh.wrapped_u32("per_request_buffer_limit_bytes");
        vh.unsupported("request_mirror_policies");
        vh.unsupported("matcher");
        vh.unsupported("metadata");
        vhosts.push(VirtualHost {
            name: vname,
            domains,
            routes,
            request_headers,
            response_headers,
            local_rate_limit,
            retry_policy,
            include_request_attempt_count,
            include_attempt_count_in_response,
            per_request_buffer_limit,
        });
    }
    let mut t = RouteTable::new(name, vhosts);
    t.request_headers = request_headers;
    t.response_headers = response_headers;
    t.ignore_port_in_host_matching = ignore_port;
    t.local_rate_limit = table_rl;
    Some(t)
}

fn lower_route(
    r: &Node,
    ids: &ClusterIds,
    known: Option<&HashSet<String>>,
    store: &std::sync::Arc<crate::stats::Store>,
) -> Option<Route> {
    let name = r.string("name").unwrap_or_default();
    let matcher = match r.msg("match") {
        Some(m) => lower_match(&m)?,
        None => {
            r.err("match", "a route needs a match");
            return None;
        }
    };
    let action = if let Some(a) = r.msg("route") {
        Action::Forward(Box::new(lower_route_action(&a, ids, known)?))
    } else if let Some(rd) = r.msg("redirect") {
        Action::Redirect(Box::new(lower_redirect(&rd)))
    } else if let Some(d) = r.msg("direct_response") {
        let status = d.u32("status");
        let Some(status) = http::StatusCode::from_u16(status as u16)
            .ok()
            .filter(|_| (100..600).contains(&status))
        else {
            d.err("status", format!("{status} is not an HTTP status"));
            return None;
        };
        let body = d.msg("body").and_then(|b| data_source(&b));
        Action::Direct { status, body }
    } else {
        r.unsupported("filter_action");
        r.unsupported("non_forwarding_action");
        r.err_here("a route needs route, redirect or direct_response");
        return None;
    };
    let request_headers = header_mods(r, "request_headers_to_add", "request_headers_to_remove");
    let response_headers = header_mods(r, "response_headers_to_add", "response_headers_to_remove");
    r.unsupported("metadata");
    r.unsupported("decorator");
    let local_rate_limit = per_filter_config(r, store);
    r.unsupported("tracing");
    let per_request_buffer_limit = r.wrapped_u32("per_request_buffer_limit_bytes");
    r.unsupported("stat_prefix");
    Some(Route {
        name,
        matcher,
        action,
        request_headers,
        response_headers,
        local_rate_limit,
        per_request_buffer_limit,
    })
}

fn lower_match(m: &Node) -> Option<RouteMatch> {
    let case_sensitive = m.wrapped_bool("case_sensitive").unwrap_or(true);
    let path = if let Some(p) = m.string("prefix") {
        PathMatch::Prefix(p)
    } else if let Some(p) = m.string("path") {
        PathMatch::Path(p)
    } else if let Some(re) = m.msg("safe_regex") {
        PathMatch::Regex(regex_matcher(&re, true)?)
    } else if let Some(p) = m.string("path_separated_prefix") {
        if p.ends_with('/') || !p.starts_with('/') || p.contains(['?', '#']) {
            m.err(
                "path_separated_prefix",
                "must start with '/', not end with '/', and hold no '?' or '#'",
            );
        }
        PathMatch::Separated(p)
    } else if m.has("prefix") {
        // `prefix: ""` is set but empty: proto3 cannot tell it from unset; Envoy treats it as matching all.
        PathMatch::Prefix(String::new())
    } else if let Some(c) = m.msg("connect_matcher") {
        c.unsupported("connect_matcher");
        PathMatch::Connect
    } else {
        m.unsupported("path_match_policy");
        if !m.has("connect_matcher") && !m.has("path_match_policy") {
            // No path specifier at all: an empty prefix, which matches every path.
            PathMatch::Prefix(String::new())
        } else {
            return None;
        }
    };
    let mut headers = Vec::new();
    let mut pseudo = Vec::new();
    for h in m.list("headers") {
        let stand_in = || HeaderName::from_static("x-remora-pseudo-header");
        let which = match h.string("name").unwrap_or_default().as_str() {
            ":method" => Some(Pseudo::Method),
            ":authority" => Some(Pseudo::Authority),
            ":path" => Some(Pseudo::Path),
            ":scheme" => Some(Pseudo::Scheme),
            _ => None,
        };
        match which {
            Some(p) => pseudo.extend(header_matcher_as(&h, stand_in()).map(|hm| (p, hm))),
            None => headers.extend(header_matcher(&h)),
        }
    }
    let query = m
        .list("query_parameters")
        .iter()
        .filter_map(query_matcher)
        .collect();
    let grpc = m.msg("grpc").is_some();
    m.unsupported("runtime_fraction");
    m.unsupported("tls_context");
    m.unsupported("dynamic_metadata");
    m.unsupported("filter_state");
    m.unsupported("cookies");
    Some(RouteMatch {
        path,
        case_sensitive,
        headers,
        pseudo,
        query,
        grpc,
    })
}

fn lower_route_action(a: &Node, ids: &ClusterIds, known: Option<&HashSet<String>>) -> Option<RouteAction> {
    let check = |node: &Node, field: &str, name: &str| {
        if let Some(k) = known {
            if !k.contains(name) {
                node.err(field, format!("route: unknown cluster {name:?}"));
            }
        }
    };
    let cluster = if let Some(c) = a.string("cluster") {
        check(a, "cluster", &c);
        ClusterSpecifier::Cluster(ids.id(&c), c)
    } else if let Some(h) = a.string("cluster_header") {
        match HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()) {
            Ok(n) => ClusterSpecifier::Header(n),
            Err(_) => {
                a.err("cluster_header", format!("{h:?} is not a header name"));
                return None;
            }
        }
    } else if let Some(w) = a.msg("weighted_clusters") {
        let mut clusters = Vec::new();
        for c in w.list("clusters") {
            let name = c.string("name").unwrap_or_default();
            check(&c, "name", &name);
            let weight = c.wrapped_u32("weight").unwrap_or(0);
            c.unsupported("cluster_header");
            c.unsupported("request_headers_to_add");
            c.unsupported("request_headers_to_remove");
            c.unsupported("response_headers_to_add");
            c.unsupported("response_headers_to_remove");
            c.unsupported("typed_per_filter_config");
            c.unsupported("host_rewrite_literal");
            c.unsupported("metadata_match");
            clusters.push((ids.id(&name), name, weight));
        }
        let sum: u32 = clusters.iter().map(|c| c.2).sum();
        if let Some(total) = w.wrapped_u32("total_weight") {
            if total != sum {
                w.err(
                    "total_weight",
                    format!("the weights add up to {sum}, not {total}"),
                );
            }
        }
        if sum == 0 {
            w.err("clusters", "the weights add up to 0");
            return None;
        }
        w.unsupported("runtime_key_prefix");
        w.unsupported("header_name");
        w.unsupported("random_value_specifier");
        ClusterSpecifier::Weighted { clusters, total: sum }
    } else {
        a.unsupported("cluster_specifier_plugin");
        a.unsupported("inline_cluster_specifier_plugin");
        a.err_here("needs cluster, cluster_header or weighted_clusters");
        return None;
    };
    let nf = a.enum_name("cluster_not_found_response_code");
    if nf != "SERVICE_UNAVAILABLE" {
        a.err(
            "cluster_not_found_response_code",
            format!("{nf} is not supported by Remora"),
        );
    }
    let prefix_rewrite = a.string("prefix_rewrite");
    let regex_rewrite = a.msg("regex_rewrite").and_then(|r| regex_rewrite(&r));
    let host_rewrite = if let Some(h) = a.string("host_rewrite_literal") {
        match HeaderValue::from_str(&h) {
            Ok(v) => HostRewrite::Literal(v),
            Err(_) => {
                a.err("host_rewrite_literal", "is not a valid host");
                HostRewrite::None
            }
        }
    } else if a.wrapped_bool("auto_host_rewrite").unwrap_or(false) {
        HostRewrite::Auto
    } else {
        HostRewrite::None
    };
    let timeout = match a.duration("timeout") {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => Some(Duration::from_secs(15)),
    };
    // Overrides the connection manager's stream_idle_timeout for this route; 0 turns it off.
    let idle_timeout = a.duration("idle_timeout");
    for f in [
        "host_rewrite_header",
        "host_rewrite_path_regex",
        "append_x_forwarded_host",
        "path_rewrite_policy",
        "metadata_match",
        "retry_policy_typed_config",
        "request_mirror_policies",
        "priority",
        "rate_limits",
        "include_vh_rate_limits",
        "cors",
        "max_grpc_timeout",
        "grpc_timeout_offset",
        "internal_redirect_policy",
        "internal_redirect_action",
        "max_internal_redirects",
        "hedge_policy",
        "max_stream_duration",
    ] {
        a.unsupported(f);
    }
    let retry_policy = a
        .msg("retry_policy")
        .and_then(|p| lower_retry_policy(&p))
        .map(std::sync::Arc::new);
    let hash_policy = crate::upstream::hash::HashPolicy(
        a.list("hash_policy")
            .iter()
            .filter_map(super::lb::lower_hash_policy)
            .collect(),
    );
    let upgrades = lower_upgrades(&a.list("upgrade_configs"), false);
    Some(RouteAction {
        cluster,
        prefix_rewrite,
        regex_rewrite,
        host_rewrite,
        timeout,
        idle_timeout,
        retry_policy,
        hash_policy,
        upgrades,
    })
}

/// `upgrade_configs` of a route (`RouteAction.UpgradeConfig`) or of a connection manager (`hcm` true:
/// `HttpConnectionManager.UpgradeConfig`): each `upgrade_type` (lower case; Envoy compares them without case)
/// with `enabled` (default true). CONNECT is left to the caller (the connection manager's), and refused on a
/// route; an upgrade type given twice is refused, as Envoy does.
pub(crate) fn lower_upgrades(list: &[Node], hcm: bool) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = Vec::new();
    for u in list {
        let ty = u.string("upgrade_type").unwrap_or_default().to_ascii_lowercase();
        let enabled = u.wrapped_bool("enabled").unwrap_or(true);
        if hcm {
            u.unsupported("filters");
        } else {
            u.unsupported("connect_config");
        }
        if ty.is_empty() {
            u.err("upgrade_type", "is required");
        } else if ty == "connect" {
            if !hcm {
                u.err(
                    "upgrade_type",
                    "CONNECT upgrades per route are not supported by Remora",
                );
            }
        } else if out.iter().any(|(t, _)| *t == ty) {
            u.err("upgrade_type", format!("upgrade type {ty:?} is configured twice"));
        } else {
            out.push((ty, enabled));
        }
    }
    out
}

fn lower_redirect(r: &Node) -> Redirect {
    let mut out = Redirect {
        status: 301,
        ..Default::default()
    };
    if r.bool("https_redirect") {
        out.scheme = Some("https".into());
    }
    if let Some(s) = r.string("scheme_redirect") {
        out.scheme = Some(s.to_ascii_lowercase());
    }
    out.host = r.string("host_redirect");
    let port = r.u32("port_redirect");
    if port > 65535 {
        r.err("port_redirect", "is not a port");
    } else if port != 0 {
        out.port = Some(port as u16);
    }
    out.path = r.string("path_redirect");
    out.prefix_rewrite = r.string("prefix_rewrite");
    if out.prefix_rewrite.is_some() {
        r.err(
            "prefix_rewrite",
            "a redirect's prefix_rewrite is not supported by Remora yet",
        );
    }
    out.regex_rewrite = r.msg("regex_rewrite").and_then(|x| regex_rewrite(&x));
    out.status = match r.enum_name("response_code").as_str() {
        "FOUND" => 302,
        "SEE_OTHER" => 303,
        "TEMPORARY_REDIRECT" => 307,
        "PERMANENT_REDIRECT" => 308,
        _ => 301,
    };
    out.strip_query = r.bool("strip_query");
    out
}

/// `envoy.config.core.v3.DataSource` read now (a file is read when the config loads).
fn data_source(d: &Node) -> Option<Bytes> {
    if let Some(s) = d.string("inline_string") {
        return Some(Bytes::from(s));
    }
    if let Some(b) = d.bytes("inline_bytes") {
        return Some(Bytes::from(b));
    }
    if let Some(f) = d.string("filename") {
        return match std::fs::read(&f) {
            Ok(b) => Some(Bytes::from(b)),
            Err(e) => {
                d.err("filename", format!("cannot read {f}: {e}"));
                None
            }
        };
    }
    d.unsupported("environment_variable");
    d.unsupported("watched_directory");
    None
}

/// A repeated `HeaderValueOption` field (`response_headers_to_add` and the like).
pub(crate) fn header_adds(n: &Node, add: &str) -> Vec<HeaderAdd> {
    let mut adds = Vec::new();
    for hv in n.list(add) {
        let append = hv.wrapped_bool("append");
        let action = match hv.enum_name("append_action").as_str() {
            "ADD_IF_ABSENT" => AppendAction::AddIfAbsent,
            "OVERWRITE_IF_EXISTS_OR_ADD" => AppendAction::OverwriteIfExistsOrAdd,
            "OVERWRITE_IF_EXISTS" => AppendAction::OverwriteIfExists,
            _ => match append {
                Some(false) => AppendAction::OverwriteIfExistsOrAdd,
                _ => AppendAction::AppendIfExistsOrAdd,
            },
        };
        if append.is_some() && hv.has("append_action") {
            hv.err("append", "append and append_action cannot both be set");
        }
        hv.unsupported("keep_empty_value");
        let Some(h) = hv.msg("header") else {
            hv.err("header", "is required");
            continue;
        };
        let key = h.string("key").unwrap_or_default();
        let value = h
            .string("value")
            .map(String::into_bytes)
            .or_else(|| h.bytes("raw_value"))
            .unwrap_or_default();
        match (
            HeaderName::from_bytes(key.to_ascii_lowercase().as_bytes()),
            HeaderValue::from_bytes(&value),
        ) {
            (Ok(name), Ok(value)) => {
                if name.as_str().starts_with(':') || name == http::header::HOST {
                    h.err("key", format!("{key:?} cannot be modified"));
                } else if value.is_empty() {
                    // Envoy skips an empty value unless keep_empty_value.
                } else {
                    adds.push(HeaderAdd { name, value, action });
                }
            }
            (Err(_), _) => h.err("key", format!("{key:?} is not a header name")),
            (_, Err(_)) => h.err("value", "is not a valid header value"),
        }
    }
    adds
}

pub(crate) fn header_mods(n: &Node, add: &str, remove: &str) -> HeaderMods {
    let mut mods = HeaderMods {
        add: header_adds(n, add),
        remove: Vec::new(),
    };
    for name in n.strings(remove) {
        match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
            Ok(h) => mods.remove.push(h),
            Err(_) => n.err(remove, format!("{name:?} is not a header name")),
        }
    }
    mods
}

/// `envoy.type.matcher.v3.RegexMatcher`; `full` anchors it to match the whole input.
fn regex_matcher(r: &Node, full: bool) -> Option<Regex> {
    if let Some(g) = r.msg("google_re2") {
        // Deprecated and without effect in Envoy; program size limits are Remora's regex defaults.
        g.unsupported("max_program_size");
    }
    let src = r.string("regex").unwrap_or_default();
    let anchored = if full { format!("^(?:{src})$") } else { src.clone() };
    match Regex::new(&anchored) {
        Ok(re) => Some(re),
        Err(e) => {
            r.err("regex", format!("invalid regex {src:?}: {e}"));
            None
        }
    }
}

fn regex_rewrite(r: &Node) -> Option<(Regex, String)> {
    let re = r.msg("pattern").and_then(|p| regex_matcher(&p, false));
    let sub = r.string("substitution").unwrap_or_default();
    // RE2's `\1` back-references become the regex crate's `${1}`.
    let mut out = String::with_capacity(sub.len());
    let mut chars = sub.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('\\', Some('\\')) => {
                out.push('\\');
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            (c, _) => out.push(c),
        }
    }
    Some((re?, out))
}

pub(crate) fn string_matcher(s: &Node) -> Option<StringMatcher> {
    let ic = s.bool("ignore_case");
    if let Some(v) = s.string("exact") {
        Some(StringMatcher::Exact(v, ic))
    } else if let Some(v) = s.string("prefix") {
        Some(StringMatcher::Prefix(v, ic))
    } else if let Some(v) = s.string("suffix") {
        Some(StringMatcher::Suffix(v, ic))
    } else if let Some(v) = s.string("contains") {
        Some(StringMatcher::Contains(v, ic))
    } else if let Some(re) = s.msg("safe_regex") {
        if ic {
            s.err("ignore_case", "has no effect on safe_regex; use (?i)");
        }
        regex_matcher(&re, true).map(StringMatcher::Regex)
    } else {
        s.unsupported("custom");
        // An empty StringMatcher (`exact: ""`): matches the empty string.
        Some(StringMatcher::Exact(String::new(), ic))
    }
}

pub(crate) fn header_matcher(h: &Node) -> Option<HeaderMatcher> {
    let name = h.string("name").unwrap_or_default();
    let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) else {
        h.err(
            "name",
            format!("{name:?} is not a header name (pseudo-headers are not supported by Remora)"),
        );
        return None;
    };
    header_matcher_as(h, name)
}

/// `h`'s match applied to header `name`, whatever `h.name` says (for callers that match pseudo-headers).
pub(crate) fn header_matcher_as(h: &Node, name: HeaderName) -> Option<HeaderMatcher> {
    let kind = if let Some(v) = h.string("exact_match") {
        HeaderMatch::String(StringMatcher::Exact(v, false))
    } else if let Some(re) = h.msg("safe_regex_match") {
        HeaderMatch::String(StringMatcher::Regex(regex_matcher(&re, true)?))
    } else if let Some(r) = h.msg("range_match") {
        HeaderMatch::Range(r.i64("start"), r.i64("end"))
    } else if h.has("present_match") {
        HeaderMatch::Present(h.bool("present_match"))
    } else if let Some(v) = h.string("prefix_match") {
        HeaderMatch::String(StringMatcher::Prefix(v, false))
    } else if let Some(v) = h.string("suffix_match") {
        HeaderMatch::String(StringMatcher::Suffix(v, false))
    } else if let Some(v) = h.string("contains_match") {
        HeaderMatch::String(StringMatcher::Contains(v, false))
    } else if let Some(s) = h.msg("string_match") {
        HeaderMatch::String(string_matcher(&s)?)
    } else {
        h.mark("present_match");
        // No specifier: the header must be present.
        HeaderMatch::Present(true)
    };
    // `exact_match: ""` matches any present value in Envoy.
    let kind = match kind {
        HeaderMatch::String(StringMatcher::Exact(v, false)) if v.is_empty() && h.has("exact_match") => {
            HeaderMatch::Present(true)
        }
        k => k,
    };
    let invert = h.bool("invert_match");
    let treat_missing_as_empty = h.bool("treat_missing_header_as_empty");
    Some(HeaderMatcher {
        name,
        kind,
        invert,
        treat_missing_as_empty,
    })
}

fn query_matcher(q: &Node) -> Option<QueryMatcher> {
    let name = q.string("name").unwrap_or_default();
    if name.is_empty() {
        q.err("name", "is required");
    }
    let value = if let Some(s) = q.msg("string_match") {
        Some(string_matcher(&s)?)
    } else if q.bool("present_match") {
        None
    } else {
        q.err_here("needs string_match or present_match");
        return None;
    };
    Some(QueryMatcher { name, value })
}

/// `typed_per_filter_config`: per-route settings of HTTP filters. Remora's only per-route filter config is the
/// local rate limit; any other is refused with its path.
fn per_filter_config(
    n: &Node,
    store: &std::sync::Arc<crate::stats::Store>,
) -> Option<crate::route::LocalRateLimit> {
    let mut out = None;
    for (key, any) in n.map("typed_per_filter_config") {
        let Some(cfg) = any.unpack() else { continue };
        if cfg.type_name() == super::listener::LOCAL_RATELIMIT {
            if let Some(c) = crate::filters::local_ratelimit::lower(&cfg, true) {
                out = Some(crate::filters::local_ratelimit::LocalRateLimiter::new(
                    &c,
                    &store.scope(""),
                    tokio::time::Instant::now(),
                ));
            }
        } else {
            cfg.err_here(format!(
                "{key}: per-route config {} is not supported by Remora",
                cfg.type_name()
            ));
            cfg.mark_all();
        }
    }
    out
}
