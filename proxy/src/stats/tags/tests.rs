//! Envoy's own examples: the `TagSpecifier.regex` documentation (`config/metrics/v3/stats.proto`) and the cases
//! of `test/common/stats/tag_extractor_impl_test.cc` and `tag_producer_impl_test.cc`.

use super::*;

fn producer(use_all_default_tags: bool, specs: &[(&str, TagValue)]) -> TagProducer {
    TagProducer::new(&TagsConfig {
        stats_tags: specs
            .iter()
            .map(|(n, v)| TagSpecifier {
                tag_name: n.to_string(),
                value: v.clone(),
            })
            .collect(),
        use_all_default_tags,
        allow_default_tag_overrides: false,
    })
    .unwrap()
}

fn re(s: &str) -> TagValue {
    TagValue::Regex(s.to_string())
}

/// The tag-extracted name and the tags as (name, value), in extraction order.
fn run(p: &TagProducer, name: &str) -> (String, Vec<(String, String)>) {
    let (extracted, tags) = p.produce(name);
    (
        extracted,
        tags.into_iter().map(|t| (t.name.to_string(), t.value)).collect(),
    )
}

/// Envoy's `DefaultTagRegexTester::testRegex`: the name, and the tags in any order.
fn check_default(p: &TagProducer, name: &str, want_name: &str, want: &[(&str, &str)]) {
    let (got_name, mut got) = run(p, name);
    assert_eq!(got_name, want_name, "{name}");
    let mut want: Vec<(String, String)> = want.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "{name}");
}

#[test]
fn documented_example_1() {
    let p = producer(false, &[("envoy.cluster_name", re(r"^cluster\.((.+?)\.)"))]);
    let (name, tags) = run(&p, "cluster.foo_cluster.upstream_rq_timeout");
    assert_eq!(name, "cluster.upstream_rq_timeout");
    assert_eq!(tags, [("envoy.cluster_name".into(), "foo_cluster".into())]);
}

/// Both regexes see the original name (the second's match overlaps what the first keeps), look-ahead included.
#[test]
fn documented_example_2() {
    let p = producer(
        false,
        &[
            (
                "envoy.http_user_agent",
                re(r"^http(?=\.).*?\.user_agent\.((.+?)\.)\w+?$"),
            ),
            ("envoy.http_conn_manager_prefix", re(r"^http\.((.*?)\.)")),
        ],
    );
    let (name, tags) = run(&p, "http.connection_manager_1.user_agent.ios.downstream_cx_total");
    assert_eq!(name, "http.user_agent.downstream_cx_total");
    assert_eq!(
        tags,
        [
            ("envoy.http_user_agent".into(), "ios".into()),
            (
                "envoy.http_conn_manager_prefix".into(),
                "connection_manager_1".into()
            ),
        ]
    );
}

#[test]
fn one_or_two_subexpressions() {
    let p = producer(false, &[("cluster_name", re(r"^cluster\.((.+?)\.)"))]);
    assert_eq!(
        run(&p, "cluster.test_cluster.upstream_cx_total"),
        (
            "cluster.upstream_cx_total".into(),
            vec![("cluster_name".into(), "test_cluster".into())]
        )
    );
    // With one group, the removed part is the value.
    let p = producer(false, &[("listner_port", re(r"^listener\.(\d+?\.)"))]);
    assert_eq!(
        run(&p, "listener.80.downstream_cx_total"),
        (
            "listener.downstream_cx_total".into(),
            vec![("listner_port".into(), "80.".into())]
        )
    );
    // No group: no tag.
    let p = producer(false, &[("x", re(r"^listener\.\d+"))]);
    assert_eq!(run(&p, "listener.80.a").1, vec![]);
}

#[test]
fn refusals_carry_envoys_messages() {
    let bad = |specs: &[(&str, TagValue)], defaults| {
        TagProducer::new(&TagsConfig {
            stats_tags: specs
                .iter()
                .map(|(n, v)| TagSpecifier {
                    tag_name: n.to_string(),
                    value: v.clone(),
                })
                .collect(),
            use_all_default_tags: defaults,
            allow_default_tag_overrides: false,
        })
        .unwrap_err()
    };
    let e = bad(&[("", re("..."))], true);
    assert_eq!(
        (e.index, e.field, e.message.as_str()),
        (0, "tag_name", "tag_name cannot be empty")
    );
    let e = bad(&[("ok", re("(a)")), ("test_extractor", TagValue::Default)], true);
    assert_eq!(e.index, 1);
    assert_eq!(
        e.message,
        "No regex specified for tag specifier and no default regex for name: 'test_extractor'"
    );
    let e = bad(&[("test_extractor", re(""))], false);
    assert!(e.message.starts_with("No regex specified"), "{}", e.message);
    let e = bad(&[("cluster_name", re("+invalid"))], true);
    assert_eq!(e.field, "regex");
    assert!(
        e.message.starts_with("Invalid regex '+invalid':"),
        "{}",
        e.message
    );
}

#[test]
fn regex_prefixes() {
    for (regex, want) in [
        ("^prefix(foo).", ""),
        (r"^prefix\.foo", "prefix"),
        (r"^prefix_optional(?=\.)", "prefix_optional"),
        ("^notACompleteToken", ""),
        ("^onlyToken$", "onlyToken"),
        ("(prefix)", ""),
        ("^(prefix)", ""),
        ("prefix(foo)", ""),
    ] {
        assert_eq!(regex_prefix(regex), want, "{regex}");
    }
}

fn tokens(pattern: &'static str, name: &str) -> Option<(String, String)> {
    let (x, _) = default_extractor("t", &DefaultKind::Tokens(pattern))?;
    let (range, value) = x.extract(name, &mut None)?;
    Some((remove_ranges(name, range.into_iter().collect()), value))
}

#[test]
fn token_patterns() {
    let some = |n: &str, v: &str| Some((n.to_string(), v.to_string()));
    assert_eq!(
        tokens("$.is.the.time", "now.is.the.time"),
        some("is.the.time", "now")
    );
    assert_eq!(
        tokens("$.is.the.*", "now.is.the.time"),
        some("is.the.time", "now")
    );
    let long = "now.is.the.time.to.come.to.the.aid";
    assert_eq!(
        tokens("$.is.the.**", long),
        some("is.the.time.to.come.to.the.aid", "now")
    );
    assert_eq!(tokens("$.is.the.*", long), None);
    assert_eq!(
        tokens("$.**.aid", long),
        some("is.the.time.to.come.to.the.aid", "now")
    );
    assert_eq!(
        tokens(
            "$.**.aid.of.their",
            "now.is.the.time.to.come.to.the.aid.backtrack.now.aid.of.their"
        ),
        some("is.the.time.to.come.to.the.aid.backtrack.now.aid.of.their", "now")
    );
    let fake = "now.is.the.time.to.come.to.the.aid.fake.aid.real.of.their";
    let want = some("now.is.the.time.to.come.to.the.aid.fake.aid.of.their", "real");
    assert_eq!(tokens("now.**.$.of.their", fake), want);
    assert_eq!(tokens("now.**.aid.$.of.their", fake), want);
    assert_eq!(
        tokens("now.is.$.time", "now.is.the.time"),
        some("now.is.time", "the")
    );
    assert_eq!(
        tokens("now.*.$.time", "now.is.the.time"),
        some("now.is.time", "the")
    );
    assert_eq!(
        tokens("now.is.the.$", "now.is.the.time"),
        some("now.is.the", "time")
    );
    assert_eq!(tokens("now.is.$.time", "now.was.the.time"), None);
    assert_eq!(tokens("now.$.the", "now.is.the.time"), None);
    assert_eq!(tokens("now.$.the.time.to", "now.is.the.time"), None);
}

#[test]
fn every_default_builds() {
    for (name, kind) in defaults() {
        assert!(default_extractor(name, &kind).is_some(), "{name}");
    }
}

/// `TagExtractorTest.DefaultTagExtractors`, for the defaults Remora has.
#[test]
fn default_extractors() {
    let p = TagProducer::default();
    let c = |n: &str, want_name: &str, want: &[(&str, &str)]| check_default(&p, n, want_name, want);
    c(
        "cluster.ratelimit.upstream_rq_timeout",
        "cluster.upstream_rq_timeout",
        &[("envoy.cluster_name", "ratelimit")],
    );
    let cipher = ("envoy.ssl_cipher", "AES256-SHA");
    for (addr, name) in [
        ("[__1]_0", "listener.[__1]_0.ssl.ciphers.AES256-SHA"),
        (
            "[2001_0db8_85a3_0000_0000_8a2e_0370_7334]_3543",
            "listener.[2001_0db8_85a3_0000_0000_8a2e_0370_7334]_3543.ssl.ciphers.AES256-SHA",
        ),
        ("127.0.0.1_0", "listener.127.0.0.1_0.ssl.ciphers.AES256-SHA"),
        ("my_prefix", "listener.my_prefix.ssl.ciphers.AES256-SHA"),
    ] {
        c(
            name,
            "listener.ssl.ciphers",
            &[("envoy.listener_address", addr), cipher],
        );
    }
    c(
        "listener.prefix.notmatching.ssl.ciphers.AES256-SHA",
        "listener.notmatching.ssl.ciphers",
        &[("envoy.listener_address", "prefix"), cipher],
    );
    c(
        "listener.admin.ssl.ciphers.AES256-SHA",
        "listener.admin.ssl.ciphers",
        &[cipher],
    );
    c(
        "cluster.ratelimit.ssl.ciphers.ECDHE-RSA-AES128-GCM-SHA256",
        "cluster.ssl.ciphers",
        &[
            ("envoy.cluster_name", "ratelimit"),
            ("cipher_suite", "ECDHE-RSA-AES128-GCM-SHA256"),
        ],
    );
    c(
        "mongo.mongo_filter.collection.bar_collection.callsite.baz_callsite.query.scatter_get",
        "mongo.collection.callsite.query.scatter_get",
        &[
            ("envoy.mongo_prefix", "mongo_filter"),
            ("envoy.mongo_collection", "bar_collection"),
            ("envoy.mongo_callsite", "baz_callsite"),
        ],
    );
    c(
        "foo_ratelimiter.http_local_rate_limit.ok",
        "http_local_rate_limit.ok",
        &[("envoy.local_http_ratelimit_prefix", "foo_ratelimiter")],
    );
    let hcm = ("envoy.http_conn_manager_prefix", "egress_dynamodb_iad");
    c(
        "http.egress_dynamodb_iad.dynamodb.table.bar_table.capacity.Query.__partition_id=ABC1234",
        "http.dynamodb.table.capacity",
        &[
            hcm,
            ("envoy.dynamo_table", "bar_table"),
            ("envoy.dynamo_operation", "Query"),
            ("envoy.dynamo_partition_id", "ABC1234"),
        ],
    );
    c(
        "cluster.grpc_cluster.grpc.grpc_service_1.grpc_method_1.success",
        "cluster.grpc.success",
        &[
            ("envoy.cluster_name", "grpc_cluster"),
            ("envoy.grpc_bridge_method", "grpc_method_1"),
            ("envoy.grpc_bridge_service", "grpc_service_1"),
        ],
    );
    c(
        "vhost.vhost_1.vcluster.vcluster_1.upstream_rq_2xx",
        "vhost.vcluster.upstream_rq_xx",
        &[
            ("envoy.virtual_host", "vhost_1"),
            ("envoy.virtual_cluster", "vcluster_1"),
            ("envoy.response_code_class", "2"),
        ],
    );
    c(
        "vhost.vhost_1.vcluster.vcluster_1.upstream_rq_200",
        "vhost.vcluster.upstream_rq",
        &[
            ("envoy.virtual_host", "vhost_1"),
            ("envoy.virtual_cluster", "vcluster_1"),
            ("envoy.response_code", "200"),
        ],
    );
    c(
        "listener.127.0.0.1_3012.http.http_prefix.downstream_rq_5xx",
        "listener.http.downstream_rq_xx",
        &[
            ("envoy.http_conn_manager_prefix", "http_prefix"),
            ("envoy.listener_address", "127.0.0.1_3012"),
            ("envoy.response_code_class", "5"),
        ],
    );
    c(
        "http.egress_dynamodb_iad.user_agent.ios.downstream_cx_total",
        "http.user_agent.downstream_cx_total",
        &[("envoy.http_user_agent", "ios"), hcm],
    );
    c(
        "http.rds_connection_manager.rds.agg/route_config.1-23.update_success",
        "http.rds.update_success",
        &[
            ("envoy.http_conn_manager_prefix", "rds_connection_manager"),
            ("envoy.rds_route_config", "agg/route_config.1-23"),
        ],
    );
    c(
        "listener_manager.worker_123.dispatcher.loop_duration_us",
        "listener_manager.worker_dispatcher.loop_duration_us",
        &[("envoy.worker_id", "123")],
    );
    c(
        "listener.127.0.0.1_3012.worker_123.downstream_cx_active",
        "listener.worker_downstream_cx_active",
        &[
            ("envoy.listener_address", "127.0.0.1_3012"),
            ("envoy.worker_id", "123"),
        ],
    );
    c(
        "server.worker_123.watchdog_miss",
        "server.worker_watchdog_miss",
        &[("envoy.worker_id", "123")],
    );
    c(
        "tcp.tcp_prefix.downstream_flow_control_resumed_reading_total",
        "tcp.downstream_flow_control_resumed_reading_total",
        &[("envoy.tcp_prefix", "tcp_prefix")],
    );
    c(
        "http.http_prefix.ext_authz.authpfx.denied",
        "http.ext_authz.denied",
        &[
            ("envoy.http_conn_manager_prefix", "http_prefix"),
            ("envoy.ext_authz_prefix", "authpfx"),
        ],
    );
    c(
        "dns_filter.my_dns_prefix.local_a_record_answers",
        "dns_filter.local_a_record_answers",
        &[("envoy.dns_filter_prefix", "my_dns_prefix")],
    );
    // `UtilityTest.createTagProducer`.
    c(
        "http.config_test.rq_total",
        "http.rq_total",
        &[("envoy.http_conn_manager_prefix", "config_test")],
    );
}

/// Which extractor wins when a `stats_tags` entry shares a default's tag name (`tag_producer_impl_test.cc`).
#[test]
fn default_precedence_and_overrides() {
    const NAME: &str = "cluster.foo.bar.upstream_rq_200";
    let second_token = re(r"^cluster\.[^.]+\.(([^.]+)\.)");
    let with = |defaults: bool, overrides: bool, value: TagValue| {
        let p = TagProducer::new(&TagsConfig {
            stats_tags: vec![TagSpecifier {
                tag_name: "envoy.cluster_name".into(),
                value,
            }],
            use_all_default_tags: defaults,
            allow_default_tag_overrides: overrides,
        })
        .unwrap();
        let (_, tags) = run(&p, NAME);
        let cluster: Vec<String> = tags
            .into_iter()
            .filter(|(k, _)| k == "envoy.cluster_name")
            .map(|(_, v)| v)
            .collect();
        cluster
    };
    assert_eq!(with(true, false, second_token.clone()), ["foo"]);
    assert_eq!(with(true, true, second_token.clone()), ["bar"]);
    assert_eq!(
        with(true, true, TagValue::Fixed("fixed-cluster".into())),
        ["fixed-cluster"]
    );
    assert_eq!(with(true, true, TagValue::Default), ["foo"]);
    assert_eq!(with(false, true, second_token), ["bar"]);
    // use_all_default_tags: false keeps only the defaults named in stats_tags.
    assert_eq!(with(false, false, TagValue::Default), ["foo"]);
    let p = producer(false, &[("envoy.cluster_name", TagValue::Default)]);
    assert_eq!(
        run(&p, NAME),
        (
            "cluster.bar.upstream_rq_200".into(),
            vec![("envoy.cluster_name".into(), "foo".into())]
        )
    );
}

/// `DuplicateConfigTagBehavior`: a second extractor of one name is skipped once the first has matched.
#[test]
fn duplicate_tag_names() {
    let p = producer(
        true,
        &[("envoy.response_code", re(r"\.(response_code=(\d{3}));"))],
    );
    let (name, tags) = run(&p, "cluster.xds-grpc.response_code=300;upstream_rq_200");
    assert_eq!(name, "cluster.response_code=300;upstream_rq");
    assert_eq!(
        tags,
        [
            ("envoy.response_code".into(), "200".into()),
            ("envoy.cluster_name".into(), "xds-grpc".into())
        ]
    );
}

/// A fixed value tags every stat and removes nothing.
#[test]
fn fixed_value() {
    let p = producer(true, &[("my-tag", TagValue::Fixed("fixed".into()))]);
    assert_eq!(
        run(&p, "stat-name"),
        ("stat-name".into(), vec![("my-tag".into(), "fixed".into())])
    );
    let (name, tags) = p.produce("cluster.backend.upstream_rq_2xx");
    assert_eq!(name, "cluster.upstream_rq_xx");
    let labels: Vec<(&str, &str)> = tags.iter().map(|t| (t.label, t.value.as_str())).collect();
    assert_eq!(
        labels,
        [
            ("envoy_response_code_class", "2"),
            ("my_tag", "fixed"),
            ("envoy_cluster_name", "backend")
        ]
    );
}

#[test]
fn labels_are_sanitized() {
    assert_eq!(prometheus_label("a.tag-name"), "a_tag_name");
    assert_eq!(prometheus_label("another_tag_name"), "another_tag_name");
    assert_eq!(prometheus_label("1abc"), "_1abc");
}

/// The certificate expiry gauge, as the public Envoy dashboards query it: by listener address and certificate.
#[test]
fn certificate_expiry_gauges_are_tagged_by_certificate() {
    let p = producer(true, &[]);
    check_default(
        &p,
        "listener.127.0.0.1_8443.ssl.certificate.spiffe://mesh.local/ns/a.expiration_unix_time_seconds",
        "listener.ssl.certificate.expiration_unix_time_seconds",
        &[
            ("envoy.listener_address", "127.0.0.1_8443"),
            ("envoy.tls_certificate", "spiffe://mesh.local/ns/a"),
        ],
    );
    check_default(
        &p,
        "cluster.payments.ssl.certificate.unnamed_cert_e3b0c442.expiration_unix_time_seconds",
        "cluster.ssl.certificate.expiration_unix_time_seconds",
        &[
            ("envoy.cluster_name", "payments"),
            ("envoy.tls_certificate", "unnamed_cert_e3b0c442"),
        ],
    );
}
