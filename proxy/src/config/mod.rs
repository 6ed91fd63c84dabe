//! Configuration: Envoy's bootstrap and resources, read through Envoy's own protobuf schema and lowered into
//! Remora's runtime model.
//!
//! - [`load`] turns YAML or JSON into Envoy's messages, reporting unknown fields with their paths.
//! - [`node`] reads a message while lowering so that any field Remora does not read is refused with its path.
//! - [`bootstrap`], [`cluster`], [`listener`] and [`route`] lower each part.

pub mod bootstrap;
pub mod cluster;
pub mod descriptors;
pub mod error;
pub mod lb;
pub mod listener;
pub mod load;
pub mod node;
pub mod resilience;
pub mod route;
pub mod tls;

pub use bootstrap::{Admin, Bootstrap, NodeInfo};
pub use error::{ConfigError, ConfigErrors};

use crate::cli::Options;
use load::Format;
use prost::Message;
use prost_reflect::DynamicMessage;
use std::collections::HashSet;

/// The embedded default configuration (the development proxy), used when no `-c` or `--config-yaml` is given.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/default.yaml");

const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";

/// Read the bootstrap as the command line names it: `-c` (or the embedded default), with `--config-yaml`
/// merged over it as protobuf `MergeFrom` does, then the `--service-*` flags applied to `node`.
pub fn read_bootstrap_message(opts: &Options) -> Result<DynamicMessage, ConfigErrors> {
    let (msg, errs) = read_bootstrap_message_lenient(opts)?;
    if errs.is_empty() {
        Ok(msg)
    } else {
        Err(ConfigErrors(errs))
    }
}

/// [`read_bootstrap_message`], keeping what could be read when some fields could not (for `--mode validate`).
pub fn read_bootstrap_message_lenient(
    opts: &Options,
) -> Result<(DynamicMessage, Vec<ConfigError>), ConfigErrors> {
    let mut errors = Vec::new();
    let desc = descriptors::message(BOOTSTRAP).ok_or_else(|| {
        ConfigErrors::from(ConfigError::new(
            "",
            "the descriptor set lacks the Bootstrap message",
        ))
    })?;
    let mut msg = match &opts.config_path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigErrors::from(ConfigError::new("", format!("cannot read {path}: {e}"))))?;
            let fmt = Format::detect(Some(path), &text);
            let (m, errs) =
                load::message_from_text_lenient(&text, fmt, &desc).map_err(|e| e.with_source(path))?;
            errors.extend(ConfigErrors(errs).with_source(path).0);
            m
        }
        None if opts.config_yaml.is_some() => DynamicMessage::new(desc.clone()),
        None => load::message_from_text(DEFAULT_CONFIG, Format::Yaml, &desc)
            .map_err(|e| e.with_source("<embedded default>"))?,
    };
    if let Some(yaml) = &opts.config_yaml {
        let (overlay, errs) = load::message_from_text_lenient(yaml, Format::Yaml, &desc)
            .map_err(|e| e.with_source("--config-yaml"))?;
        errors.extend(ConfigErrors(errs).with_source("--config-yaml").0);
        msg.merge(overlay.encode_to_vec().as_slice()).map_err(|e| {
            ConfigErrors::from(ConfigError::new("", format!("--config-yaml: cannot merge: {e}")))
        })?;
    }
    apply_node_flags(&mut msg, opts);
    Ok((msg, errors))
}

/// `--service-cluster`, `--service-node` and `--service-zone` override `node.cluster`, `node.id` and
/// `node.locality.zone` when given.
fn apply_node_flags(msg: &mut DynamicMessage, opts: &Options) {
    use prost_reflect::Value;
    let sets: [(&Option<String>, &[&str]); 3] = [
        (&opts.service_cluster, &["node", "cluster"]),
        (&opts.service_node, &["node", "id"]),
        (&opts.service_zone, &["node", "locality", "zone"]),
    ];
    for (value, path) in sets {
        let Some(v) = value.as_ref().filter(|v| !v.is_empty()) else {
            continue;
        };
        let mut m: &mut DynamicMessage = msg;
        for (i, name) in path.iter().enumerate() {
            if i + 1 == path.len() {
                m.set_field_by_name(name, Value::String(v.clone()));
            } else {
                let Some(Value::Message(next)) = m.get_field_by_name_mut(name) else {
                    break;
                };
                m = next;
            }
        }
    }
}

/// Lower resources that [`load::resources_from_text`] read (clusters, listeners, route tables), as a file-based
/// discovery source would deliver them, and report every error with its path (`resources[2].lb_policy`). Route
/// tables inline in listeners are checked against `clusters` (those the bootstrap and the other sources define)
/// and the clusters among `resources`.
pub fn validate_resources(
    resources: &[DynamicMessage],
    clusters: &HashSet<String>,
) -> Result<(), ConfigErrors> {
    const CLUSTER: &str = "envoy.config.cluster.v3.Cluster";
    const LISTENER: &str = "envoy.config.listener.v3.Listener";
    const ROUTES: &str = "envoy.config.route.v3.RouteConfiguration";
    let errs = node::Errors::default();
    let ids = crate::server::ClusterIds::default();
    let store = crate::stats::Store::new();
    {
        let nodes: Vec<node::Node> = resources
            .iter()
            .enumerate()
            .map(|(i, m)| node::Node::root(m, format!("resources[{i}]"), &errs))
            .collect();
        let mut known = clusters.clone();
        for n in nodes.iter().filter(|n| n.type_name() == CLUSTER) {
            if let Some(c) = cluster::lower(n) {
                known.insert(c.name);
            }
        }
        let logs =
            crate::access_log::Manager::new(&store.scope(""), crate::access_log::DEFAULT_FLUSH_INTERVAL)
                .map_err(|e| {
                    ConfigErrors::from(ConfigError::new(
                        "",
                        format!("cannot start the access log writer: {e}"),
                    ))
                })?;
        let rds = crate::xds::RdsRegistry::default();
        let ctx = listener::Ctx {
            ids: &ids,
            store: &store,
            logs: &logs,
            rds: &rds,
            sources: None,
            static_clusters: &known,
        };
        for n in &nodes {
            match n.type_name().as_str() {
                CLUSTER => {}
                LISTENER => {
                    listener::lower(n, &ctx);
                }
                ROUTES => {
                    route::lower_table(n, &ids, None, &store);
                }
                other => {
                    n.mark_all();
                    n.err_here(format!("{other} resources are not supported by Remora"));
                }
            }
        }
    }
    let found = errs.take();
    if found.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(found))
    }
}

/// Read and lower the bootstrap. Every problem is reported, not only the first.
pub fn load_bootstrap(opts: &Options) -> Result<Bootstrap, ConfigErrors> {
    let (msg, mut errors) = read_bootstrap_message_lenient(opts)?;
    let source = opts.config_path.clone().unwrap_or_else(|| {
        if opts.config_yaml.is_some() {
            "--config-yaml".to_string()
        } else {
            "<embedded default>".to_string()
        }
    });
    match bootstrap::lower(msg, &crate::stats::Store::new()) {
        Ok(b) if errors.is_empty() => Ok(b),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(e) => {
            // A field refused while parsing (an unknown extension type, say) is left out, and lowering may then
            // miss it ("needs typed_config"): one error per place is enough.
            let parsed: Vec<String> = errors.iter().map(|e| e.path.clone()).collect();
            errors.extend(
                e.with_source(&source)
                    .0
                    .into_iter()
                    .filter(|e| !parsed.contains(&e.path)),
            );
            Err(ConfigErrors(errors))
        }
    }
}
