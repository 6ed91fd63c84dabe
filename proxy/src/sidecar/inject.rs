//! `remora inject`: adds the Remora sidecar to Kubernetes Deployments (like `linkerd inject` and
//! `istioctl kube-inject`), and `remora inject --canary N` writes a canary Deployment beside the untouched
//! original.
//!
//! The input is multi-document YAML (a file or stdin). Deployments (`apps/v1`) are rewritten; every other
//! document is written back as it was read (comments are not kept: the output is re-serialized).
//!
//! What the sidecar gets:
//! - a `remora` container running the image with `-c /etc/envoy/envoy.yaml`, `--service-cluster` (the
//!   Deployment's name), `--service-node` (the pod's name, through the downward API) and `--drain-time-s`;
//! - its bootstrap from a ConfigMap (`<name>-remora` unless `--config-map`) mounted read-only on `/etc/envoy`:
//!   render it with `remora template` and create it with
//!   `kubectl create configmap <name>-remora --from-file=envoy.yaml=bootstrap.yaml`;
//! - readiness on the admin's `/ready` (9901), non-root uid 101, a read-only root filesystem, no capabilities,
//!   requests and limits;
//! - a `terminationGracePeriodSeconds` that covers the drain (`--drain-time-s` plus 10 s), raised only if the
//!   pod's is shorter;
//! - with `--init-iptables`, an init container that installs the REDIRECT as istio-init does: inbound TCP to the
//!   ingress listener (15006) except the admin port, outbound TCP to the egress listener (15001) except the
//!   sidecar's own traffic (uid 101) and loopback.
//!
//! # The canary
//!
//! `--canary N` writes, for each Deployment, the original unchanged and then a Deployment `<name>-remora-canary`
//! with N replicas: the same pod template (same image, same labels, so every Service that selects the
//! original's pods selects the canary's too) plus the sidecar, and one more pod label, `track: canary`.
//!
//! Deployment selectors: the canary's selector is the original's plus `track: canary`, so the canary never
//! claims the original's pods. The original's selector (left untouched, as it must be: a selector is
//! immutable) also matches the canary's pods; that is safe because controllers only adopt orphans (pods and
//! ReplicaSets are claimed through their controller `ownerReference`), and each ReplicaSet's selector carries
//! its own `pod-template-hash`. It is the pattern of the Kubernetes docs' canary example, with the stable
//! track left unlabelled. A Deployment whose pods already carry a `track` label is refused, as is one that
//! selects with `matchExpressions` on `track`.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

/// The sidecar's uid and gid (Envoy's image's).
pub const SIDECAR_UID: i64 = 101;
/// The container name; a Deployment that already has it is refused.
pub const SIDECAR_NAME: &str = "remora";
const CONFIG_VOLUME: &str = "remora-config";
const ADMIN_PORT: i64 = 9901;
const INGRESS_PORT: i64 = 15006;
const EGRESS_PORT: i64 = 15001;

/// `remora inject`'s options.
#[derive(Clone, Debug)]
pub struct InjectOptions {
    pub image: String,
    pub init_image: String,
    pub init_iptables: bool,
    pub config_map: Option<String>,
    pub drain_time_s: u64,
    pub canary: Option<u32>,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: "localhost/remora:latest".into(),
            // Any image with `sh` and `iptables` (istio's proxyv2 has both).
            init_image: "docker.io/istio/proxyv2:1.23.0".into(),
            init_iptables: false,
            config_map: None,
            drain_time_s: 20,
            canary: None,
        }
    }
}

pub const USAGE: &str = "\
usage: remora inject [FILE|-] [--canary N] [--init-iptables] [--image IMAGE] [--init-image IMAGE]
                     [--config-map NAME] [--drain-time-s S]

Reads Deployments (multi-document YAML, from FILE or stdin) and writes them back with the Remora sidecar.
  --canary N          Write each Deployment untouched, followed by <name>-remora-canary: N replicas of the same
                      pods (plus the label track: canary) with the sidecar.
  --init-iptables     Add an init container that redirects the pod's TCP traffic through the sidecar.
  --image IMAGE       The sidecar image (default localhost/remora:latest).
  --init-image IMAGE  The init container's image: sh and iptables (default docker.io/istio/proxyv2:1.23.0).
  --config-map NAME   The ConfigMap holding envoy.yaml (default <deployment>-remora).
  --drain-time-s S    The sidecar's drain time on SIGTERM (default 20); the grace period covers it.
";

#[derive(Debug, PartialEq, Eq)]
pub struct InjectError(pub String);

impl fmt::Display for InjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses `remora inject`'s arguments (after `inject`): the options and the input file (`None`: stdin).
pub fn parse_args(args: &[String]) -> Result<(InjectOptions, Option<String>), InjectError> {
    let mut o = InjectOptions::default();
    let mut file = None;
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        let mut value = |name: &str| -> Result<String, InjectError> {
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| InjectError(format!("missing value for {name}")))
        };
        match arg {
            "--canary" => {
                let v = value(arg)?;
                o.canary = Some(
                    v.parse()
                        .map_err(|_| InjectError(format!("--canary: '{v}' is not a replica count")))?,
                );
            }
            "--init-iptables" => o.init_iptables = true,
            "--image" => o.image = value(arg)?,
            "--init-image" => o.init_image = value(arg)?,
            "--config-map" => o.config_map = Some(value(arg)?),
            "--drain-time-s" => {
                let v = value(arg)?;
                o.drain_time_s = v
                    .parse()
                    .map_err(|_| InjectError(format!("--drain-time-s: '{v}' is not a number")))?;
            }
            "-h" | "--help" => return Err(InjectError(USAGE.into())),
            "-" if file.is_none() => file = Some("-".to_string()),
            f if !f.starts_with('-') && file.is_none() => file = Some(f.to_string()),
            other => return Err(InjectError(format!("unknown argument '{other}'\n{USAGE}"))),
        }
        i += 1;
    }
    Ok((o, file.filter(|f| f != "-")))
}

/// Injects every Deployment in the multi-document YAML `input`.
pub fn inject(input: &str, opts: &InjectOptions) -> Result<String, InjectError> {
    let mut out = Vec::new();
    for (n, doc) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| InjectError(format!("document {}: {e}", n + 1)))?;
        if value.is_null() {
            continue;
        }
        let is_deployment = value.get("kind").and_then(Value::as_str) == Some("Deployment")
            && value.get("apiVersion").and_then(Value::as_str) == Some("apps/v1");
        if !is_deployment {
            out.push(value);
            continue;
        }
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| InjectError(format!("document {}: a Deployment without metadata.name", n + 1)))?
            .to_string();
        let at = |msg: String| InjectError(format!("document {} (Deployment {name}): {msg}", n + 1));
        match opts.canary {
            None => {
                let mut d = value;
                add_sidecar(&mut d, &name, opts).map_err(at)?;
                out.push(d);
            }
            Some(replicas) => {
                let canary = canary(&value, &name, replicas, opts).map_err(at)?;
                out.push(value);
                out.push(canary);
            }
        }
    }
    let mut text = String::new();
    for (i, v) in out.iter().enumerate() {
        if i > 0 {
            text.push_str("---\n");
        }
        let mut buf = Vec::new();
        let mut ser = serde_yaml::Serializer::new(&mut buf);
        v.serialize(&mut ser)
            .map_err(|e| InjectError(format!("cannot write YAML: {e}")))?;
        text.push_str(&String::from_utf8_lossy(&buf));
    }
    Ok(text)
}

fn key(k: &str) -> Value {
    Value::String(k.into())
}

/// The mapping at `path` under `v`, created (as empty mappings) where missing.
fn map_at<'a>(v: &'a mut Value, path: &[&str]) -> Result<&'a mut Mapping, String> {
    let mut cur = v;
    for (i, p) in path.iter().enumerate() {
        let m = cur
            .as_mapping_mut()
            .ok_or_else(|| format!("{} is not a mapping", path[..i].join(".")))?;
        cur = m.entry(key(p)).or_insert_with(|| Value::Mapping(Mapping::new()));
    }
    cur.as_mapping_mut()
        .ok_or_else(|| format!("{} is not a mapping", path.join(".")))
}

/// The sequence `field` of mapping `m`, created where missing.
fn seq_at<'a>(m: &'a mut Mapping, field: &str) -> Result<&'a mut Vec<Value>, String> {
    m.entry(key(field))
        .or_insert_with(|| Value::Sequence(Vec::new()))
        .as_sequence_mut()
        .ok_or_else(|| format!("{field} is not a sequence"))
}

fn yaml(text: &str) -> Value {
    // Only called on the literals below, which are valid YAML (unit-tested).
    serde_yaml::from_str(text).unwrap_or(Value::Null)
}

fn sidecar_container(name: &str, opts: &InjectOptions) -> Value {
    let mut c = yaml(&format!(
        r#"
name: {SIDECAR_NAME}
image: "{image}"
args: ["-c", "/etc/envoy/envoy.yaml", "--service-cluster", "{name}", "--service-node", "$(POD_NAME)",
       "--drain-time-s", "{drain}"]
env:
- name: POD_NAME
  valueFrom: {{ fieldRef: {{ fieldPath: metadata.name }} }}
ports:
- {{ name: remora-admin, containerPort: {ADMIN_PORT}, protocol: TCP }}
- {{ name: remora-in, containerPort: {INGRESS_PORT}, protocol: TCP }}
readinessProbe:
  httpGet: {{ path: /ready, port: {ADMIN_PORT} }}
  periodSeconds: 5
  failureThreshold: 3
resources:
  requests: {{ cpu: 100m, memory: 64Mi }}
  limits: {{ cpu: "1", memory: 256Mi }}
securityContext:
  runAsUser: {SIDECAR_UID}
  runAsGroup: {SIDECAR_UID}
  runAsNonRoot: true
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  capabilities: {{ drop: [ALL] }}
volumeMounts:
- {{ name: {CONFIG_VOLUME}, mountPath: /etc/envoy, readOnly: true }}
"#,
        image = opts.image,
        drain = opts.drain_time_s,
    ));
    // The egress listener is on loopback: no container port for it.
    let _ = EGRESS_PORT;
    if let Some(m) = c.as_mapping_mut() {
        m.insert(key("imagePullPolicy"), key("IfNotPresent"));
    }
    c
}

/// The iptables rules of the init container, as istio-init installs them.
pub fn iptables_script() -> String {
    [
        "set -e".to_string(),
        "iptables -t nat -N REMORA_INBOUND".into(),
        "iptables -t nat -A PREROUTING -p tcp -j REMORA_INBOUND".into(),
        format!("iptables -t nat -A REMORA_INBOUND -p tcp --dport {ADMIN_PORT} -j RETURN"),
        format!("iptables -t nat -A REMORA_INBOUND -p tcp -j REDIRECT --to-ports {INGRESS_PORT}"),
        "iptables -t nat -N REMORA_OUTPUT".into(),
        "iptables -t nat -A OUTPUT -p tcp -j REMORA_OUTPUT".into(),
        format!("iptables -t nat -A REMORA_OUTPUT -m owner --uid-owner {SIDECAR_UID} -j RETURN"),
        "iptables -t nat -A REMORA_OUTPUT -d 127.0.0.1/32 -j RETURN".into(),
        format!("iptables -t nat -A REMORA_OUTPUT -p tcp -j REDIRECT --to-ports {EGRESS_PORT}"),
    ]
    .join("\n")
}

fn init_container(opts: &InjectOptions) -> Value {
    let mut c = yaml(&format!(
        r#"
name: {SIDECAR_NAME}-init
image: "{image}"
command: ["sh", "-c"]
resources:
  requests: {{ cpu: 10m, memory: 16Mi }}
  limits: {{ cpu: 100m, memory: 64Mi }}
securityContext:
  runAsUser: 0
  runAsNonRoot: false
  readOnlyRootFilesystem: false
  allowPrivilegeEscalation: false
  capabilities: {{ drop: [ALL], add: [NET_ADMIN, NET_RAW] }}
"#,
        image = opts.init_image
    ));
    if let Some(m) = c.as_mapping_mut() {
        m.insert(
            key("args"),
            Value::Sequence(vec![Value::String(iptables_script())]),
        );
    }
    c
}

/// Adds the sidecar (container, config volume, grace period, optional init container) to Deployment `d`.
pub fn add_sidecar(d: &mut Value, name: &str, opts: &InjectOptions) -> Result<(), String> {
    let spec = map_at(d, &["spec", "template", "spec"])?;
    let containers = seq_at(spec, "containers")?;
    if containers
        .iter()
        .any(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_NAME))
    {
        return Err(format!("already has a '{SIDECAR_NAME}' container"));
    }
    containers.push(sidecar_container(name, opts));
    if opts.init_iptables {
        seq_at(spec, "initContainers")?.push(init_container(opts));
    }
    let volumes = seq_at(spec, "volumes")?;
    if volumes
        .iter()
        .any(|v| v.get("name").and_then(Value::as_str) == Some(CONFIG_VOLUME))
    {
        return Err(format!("already has a '{CONFIG_VOLUME}' volume"));
    }
    let config_map = opts
        .config_map
        .clone()
        .unwrap_or_else(|| format!("{name}-remora"));
    volumes.push(yaml(&format!(
        "{{ name: {CONFIG_VOLUME}, configMap: {{ name: \"{config_map}\" }} }}"
    )));
    let grace = opts.drain_time_s as i64 + 10;
    let current = spec
        .get("terminationGracePeriodSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(30);
    spec.insert(
        key("terminationGracePeriodSeconds"),
        Value::Number(current.max(grace).into()),
    );
    Ok(())
}

/// The canary Deployment for `original` (see the module's docs).
pub fn canary(original: &Value, name: &str, replicas: u32, opts: &InjectOptions) -> Result<Value, String> {
    let mut d = original.clone();
    let canary_name = format!("{name}-remora-canary");
    let labels = map_at(&mut d, &["spec", "template", "metadata", "labels"])?;
    if labels.contains_key(key("track")) {
        return Err("its pods already carry a 'track' label: the canary's label would clash".into());
    }
    labels.insert(key("track"), key("canary"));
    let selector = map_at(&mut d, &["spec", "selector"])?;
    let tracks = selector
        .get("matchExpressions")
        .and_then(Value::as_sequence)
        .is_some_and(|exprs| {
            exprs
                .iter()
                .any(|e| e.get("key").and_then(Value::as_str) == Some("track"))
        });
    if tracks {
        return Err("its selector has a matchExpression on 'track'".into());
    }
    map_at(&mut d, &["spec", "selector", "matchLabels"])?.insert(key("track"), key("canary"));
    let spec = map_at(&mut d, &["spec"])?;
    spec.insert(key("replicas"), Value::Number(replicas.into()));
    let meta = map_at(&mut d, &["metadata"])?;
    meta.insert(key("name"), Value::String(canary_name));
    for drop in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "generation",
        "managedFields",
    ] {
        meta.remove(key(drop));
    }
    if let Some(Value::Mapping(m)) = d.get_mut("metadata") {
        let labels = m
            .entry(key("labels"))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if let Some(l) = labels.as_mapping_mut() {
            l.insert(key("track"), key("canary"));
        }
    }
    if let Some(m) = d.as_mapping_mut() {
        m.remove(key("status"));
    }
    // The sidecar reads the original's bootstrap: the canary is the same service.
    let opts = InjectOptions {
        config_map: Some(
            opts.config_map
                .clone()
                .unwrap_or_else(|| format!("{name}-remora")),
        ),
        ..opts.clone()
    };
    add_sidecar(&mut d, name, &opts)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "\
apiVersion: v1
kind: Service
metadata: { name: orders }
spec:
  selector: { app: orders }
  ports: [{ port: 80, targetPort: 8080 }]
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: orders, labels: { app: orders } }
spec:
  replicas: 3
  selector: { matchLabels: { app: orders } }
  template:
    metadata: { labels: { app: orders } }
    spec:
      containers:
      - { name: app, image: example/orders:1.2 }
";

    fn docs(text: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).unwrap())
            .collect()
    }

    #[test]
    fn the_literals_parse() {
        assert!(sidecar_container("x", &InjectOptions::default()).is_mapping());
        assert!(init_container(&InjectOptions::default()).is_mapping());
    }

    #[test]
    fn injects_deployments_and_leaves_the_rest() {
        let opts = InjectOptions {
            init_iptables: true,
            ..InjectOptions::default()
        };
        let out = docs(&inject(APP, &opts).unwrap());
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], docs(APP)[0]);
        let spec = &out[1]["spec"]["template"]["spec"];
        let names: Vec<_> = spec["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["app", "remora"]);
        assert_eq!(spec["volumes"][0]["configMap"]["name"], key("orders-remora"));
        assert_eq!(spec["terminationGracePeriodSeconds"].as_i64(), Some(30));
        assert_eq!(spec["initContainers"][0]["name"], key("remora-init"));
        assert!(spec["initContainers"][0]["args"][0]
            .as_str()
            .unwrap()
            .contains("--uid-owner 101 -j RETURN"));
        // Twice is refused.
        let again = inject(&inject(APP, &opts).unwrap(), &opts).unwrap_err();
        assert!(again.0.contains("already has a 'remora' container"), "{again}");
    }

    #[test]
    fn a_longer_drain_raises_the_grace_period() {
        let opts = InjectOptions {
            drain_time_s: 60,
            ..InjectOptions::default()
        };
        let out = docs(&inject(APP, &opts).unwrap());
        assert_eq!(
            out[1]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_i64(),
            Some(70)
        );
    }

    #[test]
    fn the_canary_keeps_the_original_and_adds_a_track() {
        let opts = InjectOptions {
            canary: Some(1),
            ..InjectOptions::default()
        };
        let out = docs(&inject(APP, &opts).unwrap());
        assert_eq!(out.len(), 3);
        assert_eq!(out[1], docs(APP)[1], "the original is untouched");
        let c = &out[2];
        assert_eq!(c["metadata"]["name"], key("orders-remora-canary"));
        assert_eq!(c["spec"]["replicas"].as_u64(), Some(1));
        assert_eq!(c["spec"]["selector"]["matchLabels"]["track"], key("canary"));
        assert_eq!(c["spec"]["selector"]["matchLabels"]["app"], key("orders"));
        let labels = &c["spec"]["template"]["metadata"]["labels"];
        assert_eq!(
            labels["app"],
            key("orders"),
            "the Service still selects the canary"
        );
        assert_eq!(labels["track"], key("canary"));
        assert_eq!(
            c["spec"]["template"]["spec"]["containers"][0]["image"],
            key("example/orders:1.2")
        );
        assert_eq!(
            c["spec"]["template"]["spec"]["containers"][1]["name"],
            key("remora")
        );

        let tracked = APP.replace(
            "template:\n    metadata: { labels: { app: orders } }",
            "template:\n    metadata: { labels: { app: orders, track: stable } }",
        );
        let e = inject(&tracked, &opts).unwrap_err();
        assert!(e.0.contains("'track' label"), "{e}");
    }

    #[test]
    fn arguments() {
        let args: Vec<String> = ["-", "--canary", "2", "--init-iptables", "--image", "r:1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (o, file) = parse_args(&args).unwrap();
        assert_eq!(
            (o.canary, o.init_iptables, o.image.as_str(), file),
            (Some(2), true, "r:1", None)
        );
        assert!(parse_args(&["--canary".to_string(), "x".to_string()]).is_err());
        assert!(parse_args(&["--bogus".to_string()]).is_err());
    }
}
