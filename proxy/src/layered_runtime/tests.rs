use super::*;
use crate::config::descriptors;
use crate::config::load::{message_from_text, Format};
use crate::config::node::Errors;

/// Lower `yaml` as a `LayeredRuntime`, returning the config and the errors as strings.
fn lower_yaml(yaml: &str) -> (RuntimeConfig, Vec<String>) {
    let desc = descriptors::message("envoy.config.bootstrap.v3.LayeredRuntime").unwrap();
    let m = message_from_text(yaml, Format::Yaml, &desc).unwrap();
    let errs = Errors::default();
    let c = {
        let n = Node::root(&m, "layered_runtime", &errs);
        lower(&n)
    };
    (c, errs.take().iter().map(|e| e.to_string()).collect())
}

fn runtime(yaml: &str) -> (Runtime, Arc<Store>) {
    let (c, e) = lower_yaml(yaml);
    assert!(e.is_empty(), "{e:?}");
    let store = Store::new();
    (Runtime::new(c, "svc", &store), store)
}

fn raw(rt: &Runtime, key: &str) -> Option<String> {
    rt.snapshot().get(key).map(|e| e.raw.clone())
}

#[test]
fn static_layer_is_flattened_with_dots() {
    let (rt, store) = runtime(
        r#"
layers:
- name: static_layer_0
  static_layer:
    envoy:
      resource_limits:
        listener:
          example_listener_name:
            connection_limit: 10000
    overload: {global_downstream_max_connections: 50000}
    re2.max_program_size.error_level: 4294967295
    pct: {numerator: 5, denominator: TEN_THOUSAND}
    flag: true
    text: "32768"
"#,
    );
    // Without an RTDS layer there are no subscription stats.
    let listed = crate::stats::output::text(&store, &crate::stats::output::Select::default());
    assert!(listed.contains("runtime.num_keys"), "{listed}");
    assert!(!listed.contains("runtime.update_attempt"), "{listed}");
    let s = rt.snapshot();
    assert_eq!(
        s.u64(
            "envoy.resource_limits.listener.example_listener_name.connection_limit",
            0
        ),
        10000
    );
    assert_eq!(s.u64("overload.global_downstream_max_connections", 0), 50000);
    assert_eq!(
        raw(&rt, "re2.max_program_size.error_level").as_deref(),
        Some("4.29497e+09")
    );
    assert_eq!(s.u64("re2.max_program_size.error_level", 0), 4294967295);
    assert_eq!(
        s.get("pct").and_then(|e| e.fraction),
        Some(Fraction {
            numerator: 5,
            denominator: 10_000
        })
    );
    assert!(s.bool("flag", false));
    assert_eq!(s.u64("text", 0), 32768);
    assert_eq!(s.len(), 6);
    assert_eq!(store.gauge("runtime.num_keys").value(), 6);
    assert_eq!(store.gauge("runtime.num_layers").value(), 1);
    assert_eq!(store.counter("runtime.load_success").value(), 1);
    assert_eq!(store.counter("runtime.override_dir_not_exists").value(), 1);
}

#[test]
fn invalid_values_and_layer_errors_are_refused_with_their_path() {
    let (_, e) = lower_yaml("layers: [{name: a, static_layer: {x: {y: [1]}}}]");
    assert_eq!(
        e,
        vec!["layered_runtime.layers[0].static_layer: Invalid runtime entry value for x.y"]
    );
    let (_, e) = lower_yaml("layers: [{name: a, static_layer: {}}, {name: a, admin_layer: {}}]");
    assert_eq!(e, vec!["layered_runtime.layers[1].name: Duplicate layer name: a"]);
    let (_, e) = lower_yaml("layers: [{name: a, admin_layer: {}}, {name: b, admin_layer: {}}]");
    assert_eq!(
        e,
        vec!["layered_runtime.layers[1].admin_layer: Too many admin layers specified in LayeredRuntime, at most one may be specified"]
    );
    let (_, e) = lower_yaml("layers: [{name: a}]");
    assert_eq!(e, vec!["layered_runtime.layers[0]: layer specifier not set"]);
    let (_, e) = lower_yaml("layers: [{name: r, rtds_layer: {name: r}}]");
    assert_eq!(
        e,
        vec!["layered_runtime.layers[0].rtds_layer.rtds_config: is required"]
    );
}

#[test]
fn later_layers_override_earlier_and_admin_overrides_merge() {
    let (rt, store) = runtime(
        r#"
layers:
- {name: base, static_layer: {a: 1, b: 2}}
- {name: over, static_layer: {b: 3}}
- {name: admin, admin_layer: {}}
"#,
    );
    let s = rt.snapshot();
    assert_eq!((s.u64("a", 0), s.u64("b", 0)), (1, 3));
    assert_eq!(s.layers.len(), 3);
    rt.merge_admin(&[("a".into(), "10".into()), ("c".into(), "x".into())])
        .unwrap();
    let s = rt.snapshot();
    assert_eq!((s.u64("a", 0), raw(&rt, "c").as_deref()), (10, Some("x")));
    assert_eq!(store.gauge("runtime.admin_overrides_active").value(), 1);
    // An empty value removes the override: the static value shows again.
    rt.merge_admin(&[("a".into(), String::new()), ("c".into(), String::new())])
        .unwrap();
    assert_eq!(rt.snapshot().u64("a", 0), 1);
    assert_eq!(store.gauge("runtime.admin_overrides_active").value(), 0);
}

#[test]
fn without_an_admin_layer_modify_is_refused() {
    let (rt, _) = runtime("layers: [{name: s, static_layer: {a: 1}}]");
    assert_eq!(
        rt.merge_admin(&[("a".into(), "2".into())]),
        Err("No admin layer specified".into())
    );
    // No layered_runtime at all: no layers, nothing to modify.
    let rt = Runtime::new(RuntimeConfig::default(), "", &Store::new());
    assert!(rt.merge_admin(&[("a".into(), "2".into())]).is_err());
    // Empty layers: one unnamed admin layer, as Envoy makes.
    let (rt, _) = runtime("layers: []");
    assert!(rt.merge_admin(&[("a".into(), "2".into())]).is_ok());
}

#[test]
fn disk_layers_read_files_as_keys_and_reload() {
    let dir = std::env::temp_dir().join(format!("remora-rt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let v1 = dir.join("v1/envoy/health_check");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::write(v1.join("min_interval"), "# a comment\n5\n").unwrap();
    let over = dir.join("v1/envoy_override/svc");
    std::fs::create_dir_all(&over).unwrap();
    std::fs::write(over.join("key"), "over").unwrap();
    std::os::unix::fs::symlink(dir.join("v1"), dir.join("current")).unwrap();
    let yaml = format!(
        "layers: [{{name: d0, disk_layer: {{symlink_root: {root}, subdirectory: envoy}}}}, \
         {{name: d1, disk_layer: {{symlink_root: {root}, subdirectory: envoy_override, append_service_cluster: true}}}}, \
         {{name: missing, disk_layer: {{symlink_root: {root}, subdirectory: nope}}}}]",
        root = dir.join("current").display()
    );
    let (rt, store) = runtime(&yaml);
    assert_eq!(rt.snapshot().u64("health_check.min_interval", 0), 5);
    assert_eq!(raw(&rt, "health_check.min_interval").as_deref(), Some("5"));
    assert_eq!(raw(&rt, "key").as_deref(), Some("over"));
    assert_eq!(store.gauge("runtime.num_layers").value(), 2);
    assert_eq!(store.counter("runtime.override_dir_exists").value(), 1);
    // A new tree, swapped in: the reload sees the new value.
    let v2 = dir.join("v2/envoy/health_check");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v2.join("min_interval"), "9").unwrap();
    std::os::unix::fs::symlink(dir.join("v2"), dir.join("new")).unwrap();
    std::fs::rename(dir.join("new"), dir.join("current")).unwrap();
    rt.reload();
    assert_eq!(rt.snapshot().u64("health_check.min_interval", 0), 9);
    assert_eq!(rt.snapshot().get("key"), None);
    let _ = std::fs::remove_dir_all(&dir);
}

fn runtime_resource(yaml: &str) -> Resource {
    let desc = descriptors::message("envoy.service.runtime.v3.Runtime").unwrap();
    let message = message_from_text(yaml, Format::Yaml, &desc).unwrap();
    let name = message
        .get_field_by_name("name")
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    Resource {
        name,
        version: "1".into(),
        raw: prost::Message::encode_to_vec(&message).into(),
        descriptor: desc,
    }
}

#[test]
fn rtds_updates_replace_the_layer_and_bad_ones_are_rejected() {
    let (rt, store) = runtime(
        r#"
layers:
- {name: base, static_layer: {a: 1}}
- name: rtds
  rtds_layer: {name: some_rtds_layer, rtds_config: {ads: {}, initial_fetch_timeout: 0s}}
"#,
    );
    assert!(!rt.rtds_ready());
    // An empty state of the world before anything arrived changes nothing and is not an error.
    rt.apply_rtds(&[], &[]).unwrap();
    assert!(!rt.rtds_ready());
    rt.apply_rtds(
        &[runtime_resource(
            "{name: some_rtds_layer, layer: {a: 7, b: {c: x}}}",
        )],
        &[],
    )
    .unwrap();
    assert!(rt.rtds_ready());
    let s = rt.snapshot();
    assert_eq!((s.u64("a", 0), raw(&rt, "b.c").as_deref()), (7, Some("x")));
    assert_eq!(store.counter("runtime.update_success").value(), 1);
    // A list value: rejected, the last good layer stays.
    let e = rt
        .apply_rtds(
            &[runtime_resource("{name: some_rtds_layer, layer: {a: [1]}}")],
            &[],
        )
        .unwrap_err();
    assert!(e.to_string().contains("Invalid runtime entry value for a"), "{e}");
    let e = rt
        .apply_rtds(&[runtime_resource("{name: other, layer: {a: 2}}")], &[])
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("Unexpected RTDS runtime (expecting some_rtds_layer): other"),
        "{e}"
    );
    assert!(rt.apply_rtds(&[], &[]).is_err());
    assert_eq!(rt.snapshot().u64("a", 0), 7);
    assert_eq!(store.counter("runtime.update_rejected").value(), 3);
    // A delta removal empties the layer.
    rt.apply_rtds(&[], &["some_rtds_layer".into()]).unwrap();
    assert_eq!(rt.snapshot().u64("a", 0), 1);
}

#[test]
fn comments_and_trailing_whitespace_are_dropped_from_files() {
    assert_eq!(strip_comments("# c\n5\n"), "5");
    assert_eq!(strip_comments("a\n#b\nc  \n"), "a\nc");
    assert_eq!(strip_comments("# only a comment\n"), "");
}

#[test]
fn the_panic_threshold_key_recomputes_every_host_set() {
    let desc = descriptors::message("envoy.config.cluster.v3.Cluster").unwrap();
    let yaml = r#"
name: svc
type: STATIC
load_assignment:
  cluster_name: svc
  endpoints:
  - lb_endpoints:
    - {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}}
    - {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 2}}}, health_status: UNHEALTHY}
"#;
    let m = message_from_text(yaml, Format::Yaml, &desc).unwrap();
    let errs = Errors::default();
    let config = {
        let n = Node::root(&m, "", &errs);
        crate::config::cluster::lower(&n).unwrap()
    };
    assert!(errs.is_empty());
    let store = Store::new();
    let cluster = crate::upstream::Cluster::new(config, &store.scope("cluster.svc."), false, None);
    let changes = store.counter("cluster.svc.membership_change").value();
    // Half the hosts are healthy: not below the default threshold of 50.
    assert_eq!(cluster.hosts().load.panic, [false]);
    let (rt, _) = runtime("layers: [{name: admin, admin_layer: {}}]");
    rt.merge_admin(&[("upstream.healthy_panic_threshold".into(), "60".into())])
        .unwrap();
    keys::apply_to_cluster(&rt.snapshot(), &cluster);
    assert_eq!(cluster.hosts().load.panic, [true]);
    // A runtime change is not a membership change.
    assert_eq!(store.counter("cluster.svc.membership_change").value(), changes);
    rt.merge_admin(&[("upstream.healthy_panic_threshold".into(), String::new())])
        .unwrap();
    keys::apply_to_cluster(&rt.snapshot(), &cluster);
    assert_eq!(cluster.hosts().load.panic, [false]);
}

#[test]
fn health_check_interval_bounds() {
    use crate::upstream::active_health::bound_interval;
    let s = std::time::Duration::from_secs;
    let (rt, _) = runtime("layers: [{name: admin, admin_layer: {}}]");
    let bounds = |rt: &Runtime| {
        let snap = rt.snapshot();
        (
            snap.u64("health_check.min_interval", 0),
            snap.u64("health_check.max_interval", u64::MAX),
        )
    };
    let (min, max) = bounds(&rt);
    assert_eq!(bound_interval(s(5), min, max), s(5));
    rt.merge_admin(&[("health_check.min_interval".into(), "45000".into())])
        .unwrap();
    let (min, max) = bounds(&rt);
    assert_eq!(bound_interval(s(5), min, max), s(45));
    rt.merge_admin(&[
        ("health_check.min_interval".into(), String::new()),
        ("health_check.max_interval".into(), "2000".into()),
    ])
    .unwrap();
    let (min, max) = bounds(&rt);
    assert_eq!(bound_interval(s(5), min, max), s(2));
    assert_eq!(
        bound_interval(std::time::Duration::ZERO, 0, u64::MAX),
        std::time::Duration::from_millis(1)
    );
}
