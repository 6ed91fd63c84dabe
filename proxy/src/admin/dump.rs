//! `/server_info` and `/config_dump` in Envoy's JSON shapes.

use crate::server::Shared;
use prost_reflect::{DynamicMessage, SerializeOptions};
use serde_json::{json, Value};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Remora's version string in Envoy's layout: `<revision>/<version>/<Clean|Modified>/<RELEASE|DEBUG>/<TLS>`.
pub fn version_string() -> String {
    let build = if cfg!(debug_assertions) {
        "DEBUG"
    } else {
        "RELEASE"
    };
    format!("0000000000000000000000000000000000000000/{VERSION}/Clean/{build}/rustls")
}

fn to_json(m: &DynamicMessage) -> Value {
    let opts = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(true);
    let mut ser = serde_json::Serializer::new(Vec::new());
    match m.serialize_with_options(&mut ser, &opts) {
        Ok(()) => serde_json::from_slice(&ser.into_inner()).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

pub fn server_info(shared: &Shared) -> Value {
    let o = &shared.options;
    let uptime = format!("{}s", shared.start_instant.elapsed().as_secs());
    let node = &shared.bootstrap.node;
    json!({
        "version": version_string(),
        "state": shared.state().name(),
        "uptime_current_epoch": uptime,
        "uptime_all_epochs": uptime,
        "hot_restart_version": "disabled",
        "command_line_options": {
            "base_id": o.base_id.to_string(),
            "use_dynamic_base_id": o.use_dynamic_base_id,
            "concurrency": o.concurrency,
            "config_path": o.config_path.clone().unwrap_or_default(),
            "config_yaml": o.config_yaml.clone().unwrap_or_default(),
            "admin_address_path": o.admin_address_path.clone().unwrap_or_default(),
            "local_address_ip_version": "v4",
            "log_level": o.log_level,
            "component_log_level": o.component_log_level,
            "log_path": o.log_path.clone().unwrap_or_default(),
            "service_cluster": o.service_cluster.clone().unwrap_or_default(),
            "service_node": o.service_node.clone().unwrap_or_default(),
            "service_zone": o.service_zone.clone().unwrap_or_default(),
            "drain_time": format!("{}s", o.drain_time_s),
            "drain_strategy": if o.drain_strategy == "immediate" { "Immediate" } else { "Gradual" },
            "parent_shutdown_time": format!("{}s", o.parent_shutdown_time_s),
            "mode": "Serve",
            "disable_hot_restart": true,
            "restart_epoch": 0,
        },
        "node": {
            "id": node.id,
            "cluster": node.cluster,
            "locality": {"region": node.region, "zone": node.zone, "sub_zone": node.sub_zone},
            "user_agent_name": "remora",
            "user_agent_build_version": {"version": version_json()},
        },
    })
}

fn version_json() -> Value {
    let mut parts = VERSION.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    json!({"major_number": parts.next().unwrap_or(0), "minor_number": parts.next().unwrap_or(0), "patch": parts.next().unwrap_or(0)})
}

/// `/config_dump`: bootstrap, clusters, listeners, routes, secrets, in Envoy's order and envelope.
pub fn config_dump(shared: &Shared) -> Value {
    let bootstrap = shared.bootstrap.message().map_or(Value::Null, |m| to_json(&m));
    let updated = crate::util::rfc3339(shared.started);
    let static_res = bootstrap.get("static_resources").cloned().unwrap_or(Value::Null);
    let with_type = |v: &Value, ty: &str| {
        let mut v = v.clone();
        if let Value::Object(m) = &mut v {
            m.insert(
                "@type".to_string(),
                Value::String(format!("type.googleapis.com/{ty}")),
            );
        }
        v
    };
    let clusters: Vec<Value> = static_res
        .get("clusters")
        .and_then(Value::as_array)
        .map(|cs| cs.iter().map(|c| json!({"cluster": with_type(c, "envoy.config.cluster.v3.Cluster"), "last_updated": updated})).collect())
        .unwrap_or_default();
    let listeners: Vec<Value> = static_res
        .get("listeners")
        .and_then(Value::as_array)
        .map(|ls| ls.iter().map(|l| json!({"listener": with_type(l, "envoy.config.listener.v3.Listener"), "last_updated": updated})).collect())
        .unwrap_or_default();
    let mut routes = Vec::new();
    for l in static_res
        .get("listeners")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for chain in l
            .get("filter_chains")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for f in chain
                .get("filters")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(rc) = f.get("typed_config").and_then(|t| t.get("route_config")) {
                    let mut rc = rc.clone();
                    if let Value::Object(m) = &mut rc {
                        m.remove("@type");
                    }
                    routes.push(json!({"route_config": with_type(&rc, "envoy.config.route.v3.RouteConfiguration"), "last_updated": updated}));
                }
            }
        }
    }
    let mut clusters_dump = json!({"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump"});
    let mut listeners_dump = json!({"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump"});
    let mut routes_dump = json!({"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump"});
    // Dynamic resources: what xDS gave, with the version and time each last changed.
    let (mut active, mut warming, mut dyn_listeners) = (Vec::new(), Vec::new(), Vec::new());
    {
        let view = shared.dynamic.dump();
        if !view.cds_version().is_empty() {
            clusters_dump["version_info"] = json!(view.cds_version());
        }
        if !view.lds_version().is_empty() {
            listeners_dump["version_info"] = json!(view.lds_version());
        }
        for c in view.clusters() {
            let entry = json!({
                "version_info": c.version,
                "cluster": c.message().map_or(Value::Null, |m| with_type(&to_json(&m), "envoy.config.cluster.v3.Cluster")),
                "last_updated": crate::util::rfc3339(c.last_updated),
            });
            if c.warming {
                warming.push(entry);
            } else {
                active.push(entry);
            }
        }
        for (l, state) in view.listeners() {
            let name = l
                .message
                .get_field_by_name("name")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let mut entry = json!({"name": name});
            entry[state] = json!({
                "version_info": l.version,
                "listener": with_type(&to_json(&l.message), "envoy.config.listener.v3.Listener"),
                "last_updated": crate::util::rfc3339(l.last_updated),
            });
            dyn_listeners.push(entry);
        }
    }
    let dyn_routes: Vec<Value> = shared
        .dynamic
        .rds
        .all()
        .iter()
        .filter_map(|r| {
            let st = r.state.lock().unwrap_or_else(|e| e.into_inner());
            let m = st.message.as_ref()?;
            Some(json!({
                "version_info": st.version,
                "route_config": with_type(&to_json(m), "envoy.config.route.v3.RouteConfiguration"),
                "last_updated": crate::util::rfc3339(st.last_updated.unwrap_or(shared.started)),
            }))
        })
        .collect();
    if !clusters.is_empty() {
        clusters_dump["static_clusters"] = Value::Array(clusters);
    }
    if !active.is_empty() {
        clusters_dump["dynamic_active_clusters"] = Value::Array(active);
    }
    if !warming.is_empty() {
        clusters_dump["dynamic_warming_clusters"] = Value::Array(warming);
    }
    if !listeners.is_empty() {
        listeners_dump["static_listeners"] = Value::Array(listeners);
    }
    if !dyn_listeners.is_empty() {
        listeners_dump["dynamic_listeners"] = Value::Array(dyn_listeners);
    }
    if !routes.is_empty() {
        routes_dump["static_route_configs"] = Value::Array(routes);
    }
    if !dyn_routes.is_empty() {
        routes_dump["dynamic_route_configs"] = Value::Array(dyn_routes);
    }
    json!({"configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": bootstrap, "last_updated": updated},
        clusters_dump,
        listeners_dump,
        {"@type": "type.googleapis.com/envoy.admin.v3.ScopedRoutesConfigDump"},
        routes_dump,
        {"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump"},
    ]})
}
