//! Route matching and route actions through the real proxy: each match kind picks the cluster it should,
//! each action does to the request (or answers) what Envoy's does.

use http::StatusCode;
use serde_json::{json, Value};

use crate::harness::{GrpcClient, GrpcUpstream, HttpClient, Upstream, CACHE_GET_PATH, UNARY_PATH};
use crate::support::{bootstrap, cluster, h2_cluster, routes, to_cluster, Proxy};

/// One origin per name; the cluster of each is called by the same name.
async fn origins(names: &[&str]) -> (Vec<Upstream>, Vec<Value>) {
    let mut ups = Vec::new();
    for n in names {
        ups.push(Upstream::start(n).await);
    }
    let clusters = ups.iter().map(|u| cluster(u.name(), &[u.addr()])).collect();
    (ups, clusters)
}

/// Which origin answered (`x-upstream`), or `status N` for a reply that came from no origin.
async fn who(client: &HttpClient, path: &str, headers: &[(&str, &str)]) -> String {
    let reply = client.get(path, headers).await;
    match reply.header("x-upstream") {
        Some(name) => name.to_owned(),
        None => format!("status {}", reply.status.as_u16()),
    }
}

#[tokio::test]
async fn path_matchers_prefix_path_regex_separated_and_case() {
    let (_ups, clusters) = origins(&["exact", "prefix", "regex", "sep", "nocase", "fallback"]).await;
    let table = routes(vec![
        to_cluster(json!({"path": "/exact"}), "exact"),
        to_cluster(json!({"prefix": "/pfx"}), "prefix"),
        to_cluster(json!({"safe_regex": {"regex": "/re/[0-9]+"}}), "regex"),
        to_cluster(json!({"path_separated_prefix": "/sep"}), "sep"),
        to_cluster(json!({"prefix": "/CaSe", "case_sensitive": false}), "nocase"),
        to_cluster(json!({"prefix": "/"}), "fallback"),
    ]);
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let c = proxy.h1();

    for (path, want) in [
        ("/exact", "exact"),
        ("/exact?x=1", "exact"),
        ("/exact/more", "fallback"),
        ("/exactly", "fallback"),
        ("/pfx", "prefix"),
        ("/pfxabc/d", "prefix"),
        ("/PFX", "fallback"),
        ("/re/123", "regex"),
        ("/re/123?q=a", "regex"),
        ("/re/12a", "fallback"),
        // The regex must match the whole path.
        ("/re/123/x", "fallback"),
        ("/sep", "sep"),
        ("/sep/x", "sep"),
        ("/sep?x=1", "sep"),
        ("/sepx", "fallback"),
        ("/case/x", "nocase"),
        ("/CASE/x", "nocase"),
        ("/cAsE", "nocase"),
    ] {
        assert_eq!(who(&c, path, &[]).await, want, "GET {path}");
    }
}

#[tokio::test]
async fn header_matchers_of_every_kind() {
    let names = [
        "exact", "prefix", "suffix", "contains", "present", "regex", "inverted", "string", "absent",
        "fallback",
    ];
    let (_ups, clusters) = origins(&names).await;
    let on = |header: Value, cluster: &str| to_cluster(json!({"prefix": "/", "headers": [header]}), cluster);
    let table = routes(vec![
        on(json!({"name": "x-exact", "exact_match": "yes"}), "exact"),
        on(json!({"name": "x-prefix", "prefix_match": "pre"}), "prefix"),
        on(json!({"name": "x-suffix", "suffix_match": "fix"}), "suffix"),
        on(json!({"name": "x-contains", "contains_match": "mid"}), "contains"),
        on(json!({"name": "x-present", "present_match": true}), "present"),
        on(
            json!({"name": "x-regex", "safe_regex_match": {"regex": "[a-c]+[0-9]"}}),
            "regex",
        ),
        on(
            json!({"name": "x-inverted", "exact_match": "no", "invert_match": true}),
            "inverted",
        ),
        on(
            json!({"name": "x-string", "string_match": {"exact": "Hello", "ignore_case": true}}),
            "string",
        ),
        to_cluster(
            json!({"prefix": "/absent", "headers": [{"name": "x-gone", "present_match": false}]}),
            "absent",
        ),
        to_cluster(json!({"prefix": "/"}), "fallback"),
    ]);
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let c = proxy.h1();

    for (headers, want) in [
        (vec![("x-exact", "yes")], "exact"),
        (vec![("x-exact", "yess")], "fallback"),
        // Two values are matched joined with ",".
        (vec![("x-exact", "yes"), ("x-exact", "yes")], "fallback"),
        (vec![("x-prefix", "prelude")], "prefix"),
        (vec![("x-prefix", "apre")], "fallback"),
        (vec![("x-suffix", "suffix")], "suffix"),
        (vec![("x-suffix", "fixed")], "fallback"),
        (vec![("x-contains", "amidst")], "contains"),
        (vec![("x-contains", "mi-d")], "fallback"),
        (vec![("x-present", "")], "present"),
        (vec![("x-present", "anything")], "present"),
        (vec![("x-regex", "abc1")], "regex"),
        (vec![("x-regex", "abc1x")], "fallback"),
        (vec![("x-regex", "d1")], "fallback"),
        (vec![("x-inverted", "yes")], "inverted"),
        (vec![("x-inverted", "no")], "fallback"),
        (vec![("x-string", "hELLo")], "string"),
        (vec![("x-string", "hello!")], "fallback"),
        (vec![], "fallback"),
    ] {
        assert_eq!(who(&c, "/", &headers).await, want, "headers {headers:?}");
    }
    // An inverted value matcher does not match an absent header (Envoy's rule): the request above without
    // x-inverted went to the fallback. present_match: false matches an absent header only.
    assert_eq!(who(&c, "/absent", &[]).await, "absent");
    assert_eq!(who(&c, "/absent", &[("x-gone", "1")]).await, "fallback");
}

#[tokio::test]
async fn query_parameter_and_grpc_matchers() {
    let (_ups, clusters) = origins(&["debug", "flag", "grpc", "fallback"]).await;
    let table = routes(vec![
        to_cluster(
            json!({"prefix": "/", "query_parameters": [{"name": "debug", "string_match": {"exact": "1"}}]}),
            "debug",
        ),
        to_cluster(
            json!({"prefix": "/", "query_parameters": [{"name": "flag", "present_match": true}]}),
            "flag",
        ),
        to_cluster(json!({"prefix": "/svc.", "grpc": {}}), "grpc"),
        to_cluster(json!({"prefix": "/"}), "fallback"),
    ]);
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let c = proxy.h1();

    for (path, headers, want) in [
        ("/x?debug=1", vec![], "debug"),
        ("/x?a=b&debug=1", vec![], "debug"),
        ("/x?debug=2", vec![], "fallback"),
        ("/x?debugx=1", vec![], "fallback"),
        ("/x?flag", vec![], "flag"),
        ("/x?a=1&flag=on", vec![], "flag"),
        ("/x", vec![], "fallback"),
        ("/svc.A/M", vec![("content-type", "application/grpc")], "grpc"),
        (
            "/svc.A/M",
            vec![("content-type", "application/grpc+proto")],
            "grpc",
        ),
        ("/svc.A/M", vec![("content-type", "application/json")], "fallback"),
        ("/svc.A/M", vec![], "fallback"),
    ] {
        assert_eq!(who(&c, path, &headers).await, want, "GET {path} {headers:?}");
    }
}

#[tokio::test]
async fn weighted_clusters_split_traffic_by_weight() {
    let (ups, clusters) = origins(&["light", "heavy"]).await;
    let table = routes(vec![json!({
        "match": {"prefix": "/"},
        "route": {"weighted_clusters": {"clusters": [
            {"name": "light", "weight": 25},
            {"name": "heavy", "weight": 75},
        ]}},
    })]);
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let c = proxy.h1();
    let n = 400;
    for _ in 0..n {
        assert_eq!(c.get("/", &[]).await.status, StatusCode::OK);
    }
    let light = ups[0].requests();
    let heavy = ups[1].requests();
    assert_eq!(light + heavy, n);
    // Expected 100 light; the standard deviation is ~8.7, so +-40 fails only on a wrong split.
    assert!(
        (60..=140).contains(&light),
        "light got {light} of {n}, heavy {heavy}"
    );
}

#[tokio::test]
async fn cluster_header_picks_the_named_cluster_and_503s_without_one() {
    let (ups, clusters) = origins(&["a", "b"]).await;
    let table = routes(vec![
        json!({"match": {"prefix": "/"}, "route": {"cluster_header": "x-cluster"}}),
    ]);
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let c = proxy.h1();

    assert_eq!(who(&c, "/", &[("x-cluster", "a")]).await, "a");
    assert_eq!(who(&c, "/", &[("x-cluster", "b")]).await, "b");
    for headers in [vec![], vec![("x-cluster", "nope")]] {
        let reply = c.get("/", &headers).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{headers:?}");
        assert!(reply.body.is_empty(), "NC reply has no body: {:?}", reply.text());
    }
    assert_eq!(ups[0].requests() + ups[1].requests(), 2);
    assert_eq!(proxy.stat("http.ingress.no_cluster").await, 2);
}

#[tokio::test]
async fn direct_response_with_and_without_body() {
    let table = routes(vec![
        json!({"match": {"path": "/tea"}, "direct_response": {"status": 418, "body": {"inline_string": "short and stout"}}}),
        json!({"match": {"path": "/empty"}, "direct_response": {"status": 200}}),
    ]);
    let proxy = Proxy::start(&bootstrap(table, vec![], Value::Null), &[]).await;
    let c = proxy.h1();

    let tea = c.get("/tea", &[]).await;
    assert_eq!(tea.status.as_u16(), 418);
    assert_eq!(tea.text(), "short and stout");
    assert_eq!(tea.header("content-type"), Some("text/plain"));
    assert_eq!(tea.header("content-length"), Some("15"));
    assert_eq!(tea.header("server"), Some("envoy"));

    let empty = c.get("/empty", &[]).await;
    assert_eq!(empty.status, StatusCode::OK);
    assert!(empty.body.is_empty());
    assert_eq!(empty.header("content-type"), None);
    assert_eq!(proxy.stat("http.ingress.rq_direct_response").await, 2);
}

#[tokio::test]
async fn redirects_build_the_location_envoy_builds() {
    let redirect = |path: &str, r: Value| json!({"match": {"path": path}, "redirect": r});
    let table = routes(vec![
        redirect("/https", json!({"https_redirect": true})),
        redirect("/host", json!({"host_redirect": "new.example.com"})),
        redirect("/port", json!({"port_redirect": 8443})),
        redirect("/old-path", json!({"path_redirect": "/new-path"})),
        redirect(
            "/strip",
            json!({"path_redirect": "/new-path-2", "strip_query": true}),
        ),
        redirect(
            "/keepq",
            json!({"path_redirect": "/new-path-3?foo=1", "strip_query": true}),
        ),
        redirect("/found", json!({"path_redirect": "/f", "response_code": "FOUND"})),
        redirect(
            "/see",
            json!({"path_redirect": "/s", "response_code": "SEE_OTHER"}),
        ),
        redirect(
            "/temp",
            json!({"path_redirect": "/t", "response_code": "TEMPORARY_REDIRECT"}),
        ),
        redirect(
            "/perm",
            json!({"path_redirect": "/p", "response_code": "PERMANENT_REDIRECT"}),
        ),
        redirect(
            "/all",
            json!({"https_redirect": true, "host_redirect": "h.example", "port_redirect": 8443, "path_redirect": "/x"}),
        ),
    ]);
    let proxy = Proxy::start(&bootstrap(table, vec![], Value::Null), &[]).await;
    let c = proxy.h1();
    let host = [("host", "example.com")];

    for (path, status, location) in [
        ("/https", 301, "https://example.com/https"),
        ("/host", 301, "http://new.example.com/host"),
        ("/port", 301, "http://example.com:8443/port"),
        ("/old-path?bar=1", 301, "http://example.com/new-path?bar=1"),
        ("/strip?bar=1", 301, "http://example.com/new-path-2"),
        ("/keepq?bar=1", 301, "http://example.com/new-path-3?foo=1"),
        ("/found", 302, "http://example.com/f"),
        ("/see", 303, "http://example.com/s"),
        ("/temp", 307, "http://example.com/t"),
        ("/perm", 308, "http://example.com/p"),
        ("/all", 301, "https://h.example:8443/x"),
    ] {
        let reply = c.get(path, &host).await;
        assert_eq!(reply.status.as_u16(), status, "GET {path}");
        assert_eq!(reply.header("location"), Some(location), "GET {path}");
        assert!(reply.body.is_empty(), "GET {path}: {:?}", reply.text());
    }
    assert_eq!(proxy.stat("http.ingress.rq_redirect").await, 11);
}

#[tokio::test]
async fn prefix_and_regex_rewrites_change_the_upstream_path() {
    let (_ups, clusters) = origins(&["origin"]).await;
    let table = routes(vec![
        json!({"match": {"prefix": "/api/"}, "route": {"cluster": "origin", "prefix_rewrite": "/"}}),
        json!({"match": {"prefix": "/service/"}, "route": {"cluster": "origin", "regex_rewrite": {
            "pattern": {"regex": "^/service/([^/]+)(/.*)$"}, "substitution": "\\2/instance/\\1"}}}),
        json!({"match": {"prefix": "/multi/"}, "route": {"cluster": "origin", "regex_rewrite": {
            "pattern": {"regex": "one"}, "substitution": "two"}}}),
        to_cluster(json!({"prefix": "/"}), "origin"),
    ]);
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let c = proxy.h1();

    let echo = c.get("/api/v1/items?q=1", &[]).await.echo();
    assert_eq!(echo.path, "/v1/items?q=1");
    assert_eq!(echo.header("x-envoy-original-path"), Some("/api/v1/items?q=1"));

    let echo = c.get("/service/foo/v1/api?k=v", &[]).await.echo();
    assert_eq!(echo.path, "/v1/api/instance/foo?k=v");

    let echo = c.get("/multi/one/yyy/one/zzz", &[]).await.echo();
    assert_eq!(echo.path, "/multi/two/yyy/two/zzz");

    let echo = c.get("/plain?x=1", &[]).await.echo();
    assert_eq!(echo.path, "/plain?x=1");
    assert_eq!(echo.header("x-envoy-original-path"), None);
}

#[tokio::test]
async fn host_rewrite_literal_over_http1_and_h2() {
    let h1 = Upstream::http1("h1").await;
    let h2 = Upstream::h2c("h2").await;
    let table = routes(vec![
        json!({"match": {"prefix": "/h2"}, "route": {"cluster": "h2", "host_rewrite_literal": "rewritten.example"}}),
        json!({"match": {"prefix": "/"}, "route": {"cluster": "h1", "host_rewrite_literal": "rewritten.example"}}),
    ]);
    let clusters = vec![cluster("h1", &[h1.addr()]), h2_cluster("h2", &[h2.addr()])];
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;

    let echo = proxy.h1().get("/", &[("host", "original.example")]).await.echo();
    assert_eq!(echo.header("host"), Some("rewritten.example"));
    let echo = proxy.h2().get("/", &[("host", "original.example")]).await.echo();
    assert_eq!(echo.header("host"), Some("rewritten.example"));
    let echo = proxy
        .h1()
        .get("/h2", &[("host", "original.example")])
        .await
        .echo();
    assert_eq!(echo.authority.as_deref(), Some("rewritten.example"));
}

#[tokio::test]
async fn auto_host_rewrite_uses_the_endpoint_hostname() {
    let named = Upstream::start("named").await;
    let mut named_cluster = cluster("named", &[named.addr()]);
    named_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["hostname"] =
        json!("backend.internal");
    let table = routes(vec![
        json!({"match": {"prefix": "/"}, "route": {"cluster": "named", "auto_host_rewrite": true}}),
    ]);
    let proxy = Proxy::start(&bootstrap(table, vec![named_cluster], Value::Null), &[]).await;

    let echo = proxy.h1().get("/", &[("host", "original.example")]).await.echo();
    assert_eq!(echo.header("host"), Some("backend.internal"));
}

#[tokio::test]
async fn auto_host_rewrite_leaves_the_host_when_the_endpoint_has_no_hostname() {
    // Envoy rewrites only to a non-empty host name (router.cc: `autoHostRewrite() && !hostname().empty()`);
    // a STATIC endpoint without `hostname` leaves the request's host as it was.
    let (_ups, clusters) = origins(&["plain"]).await;
    let table = routes(vec![
        json!({"match": {"prefix": "/"}, "route": {"cluster": "plain", "auto_host_rewrite": true}}),
    ]);
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;

    let echo = proxy.h1().get("/", &[("host", "original.example")]).await.echo();
    assert_eq!(echo.header("host"), Some("original.example"));
}

#[tokio::test]
async fn route_timeout_gives_504_and_sets_the_expected_timeout_header() {
    let (ups, clusters) = origins(&["slow"]).await;
    let table = routes(vec![
        json!({"match": {"prefix": "/default"}, "route": {"cluster": "slow"}}),
        json!({"match": {"prefix": "/"}, "route": {"cluster": "slow", "timeout": "0.2s"}}),
    ]);
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let c = proxy.h1();

    let echo = c.get("/fast", &[]).await.echo();
    assert_eq!(echo.header("x-envoy-expected-rq-timeout-ms"), Some("200"));
    let echo = c.get("/default", &[]).await.echo();
    assert_eq!(echo.header("x-envoy-expected-rq-timeout-ms"), Some("15000"));

    let started = tokio::time::Instant::now();
    let reply = c.get("/delay/3000", &[]).await;
    let took = started.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.text(), "upstream request timeout");
    assert_eq!(reply.header("content-type"), Some("text/plain"));
    assert!(
        took < std::time::Duration::from_millis(2000),
        "the 504 took {took:?}"
    );
    assert_eq!(ups[0].requests(), 3);
    assert_eq!(proxy.stat("cluster.slow.upstream_rq_timeout").await, 1);
    assert_eq!(proxy.stat("cluster.slow.upstream_rq_504").await, 1);
}

#[tokio::test]
async fn header_mutations_at_three_levels_in_envoys_order() {
    let (ups, clusters) = origins(&["origin"]).await;
    let add = |key: &str, value: &str, action: &str| json!({"header": {"key": key, "value": value}, "append_action": action});
    let level = |name: &str| {
        (
            vec![
                add("x-level", name, "APPEND_IF_EXISTS_OR_ADD"),
                add("x-win", name, "OVERWRITE_IF_EXISTS_OR_ADD"),
                add(&format!("x-only-{name}"), "1", "APPEND_IF_EXISTS_OR_ADD"),
            ],
            vec![
                add("x-resp-level", name, "APPEND_IF_EXISTS_OR_ADD"),
                add("x-resp-win", name, "OVERWRITE_IF_EXISTS_OR_ADD"),
            ],
        )
    };
    let (route_rq, route_rs) = level("route");
    let (vhost_rq, vhost_rs) = level("vhost");
    let (table_rq, table_rs) = level("config");
    let table = json!({
        "name": "local",
        "request_headers_to_add": table_rq,
        "response_headers_to_add": table_rs,
        "request_headers_to_remove": ["x-drop-by-config"],
        "response_headers_to_remove": ["x-upstream-secret"],
        "virtual_hosts": [{
            "name": "all",
            "domains": ["*"],
            "request_headers_to_add": vhost_rq,
            "response_headers_to_add": vhost_rs,
            "request_headers_to_remove": ["x-drop-by-vhost"],
            "routes": [
                {
                    "match": {"prefix": "/"},
                    "route": {"cluster": "origin"},
                    "request_headers_to_add": route_rq,
                    "response_headers_to_add": route_rs,
                    "request_headers_to_remove": ["x-drop-by-route"],
                    "response_headers_to_remove": ["x-upstream"],
                },
            ],
        }],
    });
    ups[0].set_handler(|req| async move {
        let mut response = crate::harness::echo_response(req, "origin").await;
        response
            .headers_mut()
            .insert("x-upstream-secret", http::HeaderValue::from_static("s"));
        response
    });
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let reply = proxy
        .h1()
        .get(
            "/",
            &[
                ("x-win", "client"),
                ("x-drop-by-config", "1"),
                ("x-drop-by-vhost", "1"),
                ("x-drop-by-route", "1"),
                ("x-kept", "1"),
            ],
        )
        .await;
    let echo = reply.echo();
    // Most specific first, the route table's last: appends come in that order, and the table's overwrite
    // wins (most_specific_header_mutations_wins is false by default).
    assert_eq!(echo.header_values("x-level"), ["route", "vhost", "config"]);
    assert_eq!(echo.header_values("x-win"), ["config"]);
    for only in ["x-only-route", "x-only-vhost", "x-only-config"] {
        assert_eq!(echo.header(only), Some("1"), "{only}");
    }
    for dropped in ["x-drop-by-config", "x-drop-by-vhost", "x-drop-by-route"] {
        assert_eq!(echo.header(dropped), None, "{dropped}");
    }
    assert_eq!(echo.header("x-kept"), Some("1"));

    let levels: Vec<&str> = reply
        .headers
        .get_all("x-resp-level")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(levels, ["route", "vhost", "config"]);
    assert_eq!(reply.header("x-resp-win"), Some("config"));
    assert_eq!(reply.header("x-upstream"), None, "removed at route level");
    assert_eq!(
        reply.header("x-upstream-secret"),
        None,
        "removed at route-config level"
    );
}

#[tokio::test]
async fn virtual_hosts_by_domain_exact_suffix_prefix_and_default() {
    let vhost = |name: &str, domains: Value| {
        json!({"name": name, "domains": domains, "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": name}}}]})
    };
    let table = json!({"name": "local", "virtual_hosts": [
        vhost("exact", json!(["api.example.com"])),
        vhost("suffix", json!(["*.example.com"])),
        vhost("longer-suffix", json!(["*.b.example.com"])),
        vhost("prefix", json!(["api.*"])),
        vhost("longer-prefix", json!(["api.internal.*"])),
        vhost("with-port", json!(["ported.example.org:8080"])),
        vhost("default", json!(["*"])),
    ]});
    let proxy = Proxy::start(&bootstrap(table, vec![], Value::Null), &[]).await;
    let c = proxy.h1();

    for (host, want) in [
        ("api.example.com", "exact"),
        ("API.Example.COM", "exact"),
        ("x.example.com", "suffix"),
        ("x.b.example.com", "longer-suffix"),
        ("api.other.org", "prefix"),
        ("api.internal.org", "longer-prefix"),
        // The wildcard matches at least one character.
        (".example.com", "default"),
        // A port is part of the host: exact and suffix domains without one do not match, a prefix does.
        ("api.example.com:8080", "prefix"),
        ("x.example.com:8080", "default"),
        ("ported.example.org:8080", "with-port"),
        ("ported.example.org", "default"),
        ("zzz.org", "default"),
    ] {
        let reply = c.get("/", &[("host", host)]).await;
        assert_eq!(reply.text(), want, "host {host}");
    }
    // Over h2 the authority picks the virtual host the same way.
    assert_eq!(
        proxy.h2().get("/", &[("host", "x.b.example.com")]).await.text(),
        "longer-suffix"
    );
}

#[tokio::test]
async fn no_virtual_host_is_a_404() {
    let table = json!({"name": "local", "virtual_hosts": [
        {"name": "only", "domains": ["only.example"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]});
    let proxy = Proxy::start(&bootstrap(table, vec![], Value::Null), &[]).await;
    let reply = proxy.h1().get("/", &[("host", "other.example")]).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.body.is_empty());
    assert_eq!(
        proxy.h1().get("/", &[("host", "only.example")]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn sandbox_header_sends_alice_to_her_sandbox() {
    let (ups, clusters) = origins(&["sandbox-alice", "origin"]).await;
    let table = routes(vec![
        to_cluster(
            json!({"prefix": "/", "headers": [{"name": "x-sandbox", "string_match": {"exact": "alice"}}]}),
            "sandbox-alice",
        ),
        to_cluster(json!({"prefix": "/"}), "origin"),
    ]);
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;

    for client in [proxy.h1(), proxy.h2()] {
        assert_eq!(
            who(&client, "/orders/1", &[("x-sandbox", "alice")]).await,
            "sandbox-alice"
        );
        assert_eq!(who(&client, "/orders/1", &[("x-sandbox", "bob")]).await, "origin");
        assert_eq!(who(&client, "/orders/1", &[]).await, "origin");
    }
    assert_eq!(ups[0].requests(), 2);
    assert_eq!(ups[1].requests(), 4);
}

#[tokio::test]
async fn grpc_method_prefix_sends_the_entity_service_to_the_cache() {
    let cache = GrpcUpstream::start("cache").await;
    let origin = GrpcUpstream::start("origin").await;
    let table = routes(vec![
        to_cluster(json!({"prefix": "/cache.EntityService/", "grpc": {}}), "cache"),
        to_cluster(json!({"prefix": "/"}), "origin"),
    ]);
    let clusters = vec![
        h2_cluster("cache", &[cache.addr()]),
        h2_cluster("origin", &[origin.addr()]),
    ];
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    let client = GrpcClient::connect(proxy.addr).await;

    let cached = client.unary(CACHE_GET_PATH, "entity-7", &[]).await;
    assert_eq!(cached.reply().upstream, "cache");
    assert_eq!(cached.reply().method, CACHE_GET_PATH);
    assert_eq!(cached.reply().message, "entity-7");
    assert_eq!(cached.upstream(), Some("cache"));

    let other = client.unary(UNARY_PATH, "hello", &[]).await;
    assert_eq!(other.reply().upstream, "origin");
    assert_eq!(other.reply().method, UNARY_PATH);
    assert_eq!(cache.requests(), 1);
    assert_eq!(origin.requests(), 1);
}

/// Header matchers on pseudo-headers (`:method`, `:path` with its query, `:authority`, `:scheme`), as Envoy
/// Gateway's bootstrap matches `:method: GET` on its stats route; over HTTP/1.1 and h2 alike.
#[tokio::test]
async fn pseudo_header_matchers_see_the_request_line() {
    let (_ups, clusters) = origins(&["get", "query", "host", "scheme", "fallback"]).await;
    let hm = |name: &str, m: Value| json!({"name": name, "string_match": m});
    let table = routes(vec![
        to_cluster(
            json!({"prefix": "/stats", "headers": [hm(":method", json!({"exact": "GET"}))]}),
            "get",
        ),
        to_cluster(
            json!({"prefix": "/", "headers": [hm(":path", json!({"suffix": "?debug=1"}))]}),
            "query",
        ),
        to_cluster(
            json!({"prefix": "/", "headers": [hm(":authority", json!({"prefix": "special."}))]}),
            "host",
        ),
        to_cluster(
            json!({"prefix": "/s", "headers": [hm(":scheme", json!({"exact": "https"}))]}),
            "scheme",
        ),
        to_cluster(json!({"prefix": "/"}), "fallback"),
    ]);
    let proxy = Proxy::start(&bootstrap(table, clusters, Value::Null), &[]).await;
    for c in [proxy.h1(), proxy.h2()] {
        assert_eq!(who(&c, "/stats", &[]).await, "get");
        let posted = c.post("/stats", &[], "x").await;
        assert_eq!(posted.header("x-upstream"), Some("fallback"), "POST /stats");
        assert_eq!(who(&c, "/any?debug=1", &[]).await, "query");
        assert_eq!(who(&c, "/any?debug=2", &[]).await, "fallback");
        assert_eq!(who(&c, "/any", &[("host", "special.example")]).await, "host");
        // A plaintext listener: the scheme is http.
        assert_eq!(who(&c, "/s", &[]).await, "fallback");
    }
}
