//! Reading Envoy configuration text (YAML or JSON) into Envoy's protobuf messages.
//!
//! The text becomes a JSON value, which a walk guided by the message descriptors checks and normalises before
//! prost-reflect maps it onto a [`DynamicMessage`] with the protobuf JSON mapping. The walk is where errors get
//! their field paths, where every unknown field is reported (not only the first), and where the forms Envoy's
//! loader accepts beyond the strict mapping are rewritten:
//! - a single object where a list is expected becomes a one-element list;
//! - a `google.protobuf.Duration` written as `{seconds, nanos}` becomes `"1.5s"`;
//! - proto field names and lowerCamelCase JSON names are both accepted (prost-reflect does this).

use super::descriptors;
use super::error::{ConfigError, ConfigErrors};
use prost_reflect::{DeserializeOptions, DynamicMessage, Kind, MessageDescriptor};
use serde_json::Value;

/// The text's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    /// By file extension (`.json`, `.yaml`/`.yml`), else by content: JSON if it parses as JSON.
    pub fn detect(path: Option<&str>, text: &str) -> Format {
        match path
            .and_then(|p| p.rsplit_once('.'))
            .map(|(_, ext)| ext.to_ascii_lowercase())
        {
            Some(e) if e == "json" => Format::Json,
            Some(e) if e == "yaml" || e == "yml" => Format::Yaml,
            _ if serde_json::from_str::<Value>(text).is_ok() => Format::Json,
            _ => Format::Yaml,
        }
    }
}

/// Parse text into a JSON value.
pub fn parse_text(text: &str, format: Format) -> Result<Value, ConfigError> {
    match format {
        Format::Json => serde_json::from_str(text).map_err(|e| {
            ConfigError::new(
                "",
                format!("invalid JSON at line {} column {}: {e}", e.line(), e.column()),
            )
        }),
        Format::Yaml => {
            let v: Value = serde_yaml::from_str(text).map_err(|e| {
                let at = e
                    .location()
                    .map(|l| format!(" at line {} column {}", l.line(), l.column()));
                ConfigError::new("", format!("invalid YAML{}: {e}", at.unwrap_or_default()))
            })?;
            // An empty document is an empty message.
            Ok(if v.is_null() {
                Value::Object(Default::default())
            } else {
                v
            })
        }
    }
}

/// Parse text as the message `desc`, reporting every problem with its path.
pub fn message_from_text(
    text: &str,
    format: Format,
    desc: &MessageDescriptor,
) -> Result<DynamicMessage, ConfigErrors> {
    let value = parse_text(text, format)?;
    message_from_value(value, desc)
}

/// Parse a discovery-response-like document, the `resources:` list of `@type`d resources that a
/// `path_config_source` file holds (read as `envoy.service.discovery.v3.DiscoveryResponse`, as Envoy does), and
/// unpack each resource into a message of its own type. Errors have paths such as `resources[0].name`.
pub fn resources_from_text(text: &str, format: Format) -> Result<Vec<DynamicMessage>, ConfigErrors> {
    let desc = descriptors::message(DISCOVERY_RESPONSE).ok_or_else(|| {
        ConfigErrors::from(ConfigError::new(
            "",
            format!("the descriptor set lacks {DISCOVERY_RESPONSE}"),
        ))
    })?;
    let response = message_from_text(text, format, &desc)?;
    let mut out = Vec::new();
    let mut errs = Vec::new();
    if let Some(prost_reflect::Value::List(items)) = response.get_field_by_name("resources").as_deref() {
        for (i, item) in items.iter().enumerate() {
            let path = format!("resources[{i}]");
            let Some(any) = item.as_message() else { continue };
            let url = any
                .get_field_by_name("type_url")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let bytes = any
                .get_field_by_name("value")
                .and_then(|v| v.as_bytes().cloned())
                .unwrap_or_default();
            // The walk has checked every URL already.
            let Some(inner) = descriptors::message_for_type_url(&url) else {
                errs.push(ConfigError::new(path, format!("unknown type {url:?}")));
                continue;
            };
            match DynamicMessage::decode(inner, bytes) {
                Ok(m) => out.push(m),
                Err(e) => errs.push(ConfigError::new(path, format!("{url}: {e}"))),
            }
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errs))
    }
}

const DISCOVERY_RESPONSE: &str = "envoy.service.discovery.v3.DiscoveryResponse";

/// Check, normalise and map a JSON value onto the message `desc`.
pub fn message_from_value(value: Value, desc: &MessageDescriptor) -> Result<DynamicMessage, ConfigErrors> {
    let (msg, errs) = message_from_value_lenient(value, desc)?;
    if errs.is_empty() {
        Ok(msg)
    } else {
        Err(ConfigErrors(errs))
    }
}

/// Like [`message_from_value`], but a field that is unknown or has a value of the wrong type is left out and
/// reported, and the rest is still mapped, so that `--mode validate` can go on to report what lowering finds.
pub fn message_from_value_lenient(
    mut value: Value,
    desc: &MessageDescriptor,
) -> Result<(DynamicMessage, Vec<ConfigError>), ConfigErrors> {
    let mut errs = Vec::new();
    let mut path = String::new();
    normalize_message(&mut value, desc, &mut path, &mut errs);
    let opts = DeserializeOptions::new().deny_unknown_fields(true);
    match DynamicMessage::deserialize_with_options(desc.clone(), value, &opts) {
        Ok(m) => Ok((m, errs)),
        Err(e) => {
            errs.push(ConfigError::new("", e.to_string()));
            Err(ConfigErrors(errs))
        }
    }
}

/// [`message_from_value_lenient`] from text.
pub fn message_from_text_lenient(
    text: &str,
    format: Format,
    desc: &MessageDescriptor,
) -> Result<(DynamicMessage, Vec<ConfigError>), ConfigErrors> {
    message_from_value_lenient(parse_text(text, format)?, desc)
}

fn push_field(path: &mut String, name: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(name);
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn normalize_message(
    v: &mut Value,
    desc: &MessageDescriptor,
    path: &mut String,
    errs: &mut Vec<ConfigError>,
) {
    let before = errs.len();
    normalize_message_inner(v, desc, path, errs);
    // A well-known scalar-like type (duration, wrapper) that could not be read is left out as a whole; an Any
    // keeps what could be read of it (normalize_any leaves out an Any of an unknown type itself).
    if errs.len() > before
        && desc.full_name().starts_with("google.protobuf.")
        && desc.full_name() != "google.protobuf.Any"
    {
        *v = Value::Null;
    }
}

fn normalize_message_inner(
    v: &mut Value,
    desc: &MessageDescriptor,
    path: &mut String,
    errs: &mut Vec<ConfigError>,
) {
    match desc.full_name() {
        "google.protobuf.Duration" => return normalize_duration(v, path, errs),
        "google.protobuf.Any" => return normalize_any(v, path, errs),
        "google.protobuf.Struct" | "google.protobuf.Value" | "google.protobuf.ListValue" => return,
        "google.protobuf.Timestamp" | "google.protobuf.FieldMask" => return,
        n if n.starts_with("google.protobuf.") && n.ends_with("Value") => {
            return normalize_wrapper(v, desc, path, errs)
        }
        _ => {}
    }
    let Value::Object(map) = v else {
        if !v.is_null() {
            errs.push(ConfigError::new(
                path.clone(),
                format!("expected an object ({}), found {}", desc.name(), kind_name(v)),
            ));
            *v = Value::Null;
        }
        return;
    };
    let mut unknown = Vec::new();
    for (key, val) in map.iter_mut() {
        let Some(field) = desc
            .get_field_by_name(key)
            .or_else(|| desc.get_field_by_json_name(key))
        else {
            let at = path.len();
            push_field(path, key);
            errs.push(ConfigError::new(
                path.clone(),
                format!("unknown field in {}", desc.full_name()),
            ));
            path.truncate(at);
            unknown.push(key.clone());
            continue;
        };
        if val.is_null() {
            continue;
        }
        let at = path.len();
        push_field(path, field.name());
        if field.is_map() {
            match val {
                Value::Object(entries) => {
                    if let Kind::Message(entry) = field.kind() {
                        let value_field = entry.map_entry_value_field();
                        for (k, ev) in entries.iter_mut() {
                            let at2 = path.len();
                            path.push_str(&format!("[{k:?}]"));
                            normalize_single(ev, &value_field.kind(), path, errs);
                            path.truncate(at2);
                        }
                        entries.retain(|_, v| !v.is_null());
                    }
                }
                other => errs.push(ConfigError::new(
                    path.clone(),
                    format!("expected a map, found {}", kind_name(other)),
                )),
            }
        } else if field.is_list() {
            if !val.is_array() {
                // Envoy's loader takes a single object where a list is expected.
                let single = val.take();
                *val = Value::Array(vec![single]);
            }
            if let Value::Array(items) = val {
                for (i, item) in items.iter_mut().enumerate() {
                    let at2 = path.len();
                    path.push_str(&format!("[{i}]"));
                    normalize_single(item, &field.kind(), path, errs);
                    path.truncate(at2);
                }
                items.retain(|x| !x.is_null());
            }
        } else {
            normalize_single(val, &field.kind(), path, errs);
        }
        path.truncate(at);
    }
    // What could not be read is left out (and reported), so that the rest can still be lowered.
    for k in unknown {
        map.remove(&k);
    }
}

fn normalize_single(v: &mut Value, kind: &Kind, path: &mut String, errs: &mut Vec<ConfigError>) {
    let before = errs.len();
    normalize_kind(v, kind, path, errs);
    // A scalar that could not be read is left out; a message keeps what could be read of it.
    if errs.len() > before && !matches!(kind, Kind::Message(_)) {
        *v = Value::Null;
    }
}

fn normalize_kind(v: &mut Value, kind: &Kind, path: &mut String, errs: &mut Vec<ConfigError>) {
    let bad = |want: &str, v: &Value| {
        ConfigError::new(path.clone(), format!("expected {want}, found {}", kind_name(v)))
    };
    match kind {
        Kind::Message(m) => normalize_message(v, m, path, errs),
        Kind::Enum(e) => match v {
            Value::String(s) => {
                if e.get_value_by_name(s).is_none() {
                    let names: Vec<String> = e.values().map(|x| x.name().to_string()).collect();
                    errs.push(ConfigError::new(
                        path.clone(),
                        format!(
                            "unknown value {s:?} of {} (one of {})",
                            e.name(),
                            names.join(", ")
                        ),
                    ));
                }
            }
            Value::Number(n) => {
                if n.as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .and_then(|n| e.get_value(n))
                    .is_none()
                {
                    errs.push(ConfigError::new(
                        path.clone(),
                        format!("unknown value {n} of {}", e.name()),
                    ));
                }
            }
            other => errs.push(bad("an enum name", other)),
        },
        Kind::Bool => {
            if !v.is_boolean() {
                errs.push(bad("a boolean", v));
            }
        }
        Kind::String => {
            if !v.is_string() {
                errs.push(bad("a string", v));
            }
        }
        Kind::Bytes => {
            if !v.is_string() {
                errs.push(bad("base64 text", v));
            }
        }
        Kind::Double | Kind::Float => {
            let ok = v.is_number()
                || v.as_str().is_some_and(|s| {
                    s.parse::<f64>().is_ok() || ["NaN", "Infinity", "-Infinity"].contains(&s)
                });
            if !ok {
                errs.push(bad("a number", v));
            }
        }
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            check_int(v, true, kind, path, errs)
        }
        Kind::Uint32 | Kind::Fixed32 | Kind::Uint64 | Kind::Fixed64 => check_int(v, false, kind, path, errs),
    }
}

fn check_int(v: &Value, signed: bool, kind: &Kind, path: &str, errs: &mut Vec<ConfigError>) {
    let parsed: Option<i128> = match v {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 1.8e19)
                    .map(|f| f as i128)
            }),
        Value::String(s) => s.parse::<i128>().ok(),
        _ => None,
    };
    let Some(n) = parsed else {
        errs.push(ConfigError::new(
            path,
            format!("expected an integer, found {}", kind_name(v)),
        ));
        return;
    };
    let (lo, hi): (i128, i128) = match kind {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => (i32::MIN.into(), i32::MAX.into()),
        Kind::Uint32 | Kind::Fixed32 => (0, u32::MAX.into()),
        Kind::Uint64 | Kind::Fixed64 => (0, u64::MAX.into()),
        _ => (i64::MIN.into(), i64::MAX.into()),
    };
    if n < lo || n > hi {
        let what = if signed { "signed" } else { "unsigned" };
        errs.push(ConfigError::new(
            path,
            format!("{n} is out of range for a {what} {kind:?}"),
        ));
    }
}

fn normalize_wrapper(
    v: &mut Value,
    desc: &MessageDescriptor,
    path: &mut String,
    errs: &mut Vec<ConfigError>,
) {
    if let Some(field) = desc.get_field_by_name("value") {
        normalize_single(v, &field.kind(), path, errs);
    }
}

/// Accepts `"1.5s"` and Envoy's `{seconds: 1, nanos: 500000000}`, rewriting the latter to the former.
fn normalize_duration(v: &mut Value, path: &str, errs: &mut Vec<ConfigError>) {
    match v {
        Value::String(s) => {
            if parse_duration(s).is_none() {
                errs.push(ConfigError::new(
                    path,
                    format!("invalid duration {s:?} (expected e.g. \"2.5s\")"),
                ));
            }
        }
        Value::Object(map) => {
            let mut seconds: i64 = 0;
            let mut nanos: i64 = 0;
            for (k, val) in map.iter() {
                let n = val.as_i64().or_else(|| val.as_str().and_then(|s| s.parse().ok()));
                match (k.as_str(), n) {
                    ("seconds", Some(n)) => seconds = n,
                    ("nanos", Some(n)) => nanos = n,
                    ("seconds" | "nanos", None) => {
                        errs.push(ConfigError::new(format!("{path}.{k}"), "expected an integer"));
                        return;
                    }
                    _ => {
                        errs.push(ConfigError::new(
                            format!("{path}.{k}"),
                            "unknown field in google.protobuf.Duration",
                        ));
                        return;
                    }
                }
            }
            if !(0..1_000_000_000).contains(&nanos.abs())
                || (seconds != 0 && nanos != 0 && (seconds < 0) != (nanos < 0))
            {
                errs.push(ConfigError::new(
                    path,
                    "invalid duration: nanos out of range or of another sign than seconds",
                ));
                return;
            }
            let sign = if seconds < 0 || nanos < 0 { "-" } else { "" };
            *v = Value::String(format!("{sign}{}.{:09}s", seconds.abs(), nanos.abs()));
        }
        other => errs.push(ConfigError::new(
            path,
            format!("expected a duration, found {}", kind_name(other)),
        )),
    }
}

/// Parse a protobuf JSON duration (`"1.5s"`, `"-0.001s"`).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let body = s.strip_suffix('s')?;
    if body.starts_with('-') {
        return None;
    }
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: u64 = int.parse().ok()?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    Some(std::time::Duration::new(secs, nanos))
}

/// The `TypedStruct`s, which carry a message of another type as a `Struct` (`type_url` and `value`). Envoy's
/// loader accepts them wherever an `Any` is expected and reads the inner message through the JSON mapping.
const TYPED_STRUCTS: [&str; 2] = ["udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"];

/// Rewrite an `Any` holding a `TypedStruct` in place into an `Any` of the type it names:
/// `{"@type": TypedStruct, type_url: T, value: {...}}` becomes `{"@type": T, ...}`. Returns `T`.
fn unwrap_typed_struct(map: &mut serde_json::Map<String, Value>) -> Result<String, String> {
    let type_url = match map.get("type_url").or_else(|| map.get("typeUrl")) {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        _ => return Err("a TypedStruct needs \"type_url\"".to_string()),
    };
    if let Some(k) = map
        .keys()
        .find(|k| !["@type", "type_url", "typeUrl", "value"].contains(&k.as_str()))
    {
        return Err(format!("unknown field {k:?} in a TypedStruct"));
    }
    let value = match map.remove("value") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(v)) => v,
        Some(other) => {
            return Err(format!(
                "a TypedStruct's \"value\" must be an object, found {}",
                kind_name(&other)
            ))
        }
    };
    *map = value;
    map.insert("@type".to_string(), Value::String(type_url.clone()));
    Ok(type_url)
}

fn normalize_any(v: &mut Value, path: &mut String, errs: &mut Vec<ConfigError>) {
    // An Any that cannot be read at all (no object, no type, an unknown type) is left out, and reported.
    let before = errs.len();
    normalize_any_inner(v, path, errs);
    let unreadable = errs[before..].iter().any(|e| e.path == *path);
    if unreadable {
        *v = Value::Null;
    }
}

fn normalize_any_inner(v: &mut Value, path: &mut String, errs: &mut Vec<ConfigError>) {
    let Value::Object(map) = v else {
        errs.push(ConfigError::new(
            path.clone(),
            format!("expected an object with \"@type\", found {}", kind_name(v)),
        ));
        return;
    };
    let Some(mut url) = map.get("@type").and_then(Value::as_str).map(str::to_string) else {
        errs.push(ConfigError::new(path.clone(), "an Any needs \"@type\""));
        return;
    };
    if TYPED_STRUCTS.contains(&url.rsplit_once('/').map_or(url.as_str(), |(_, n)| n)) {
        match unwrap_typed_struct(map) {
            Ok(inner_url) => url = inner_url,
            Err(e) => {
                errs.push(ConfigError::new(path.clone(), e));
                return;
            }
        }
    }
    let Some(inner) = descriptors::message_for_type_url(&url) else {
        errs.push(ConfigError::new(
            path.clone(),
            format!(
                "{} is not supported by Remora (not among the Envoy API types it reads)",
                url.rsplit_once('/').map_or(url.as_str(), |(_, n)| n)
            ),
        ));
        return;
    };
    let special = matches!(
        inner.full_name(),
        "google.protobuf.Duration"
            | "google.protobuf.Struct"
            | "google.protobuf.Value"
            | "google.protobuf.ListValue"
            | "google.protobuf.Timestamp"
            | "google.protobuf.FieldMask"
    ) || (inner.full_name().starts_with("google.protobuf.")
        && inner.full_name().ends_with("Value"));
    if special {
        if let Some(val) = map.get_mut("value") {
            normalize_message(val, &inner, path, errs);
        }
        return;
    }
    let type_val = map.remove("@type");
    let mut rest = Value::Object(std::mem::take(map));
    normalize_message(&mut rest, &inner, path, errs);
    if let Value::Object(rest) = rest {
        *map = rest;
    }
    if let Some(t) = type_val {
        map.insert("@type".to_string(), t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap() -> MessageDescriptor {
        descriptors::message("envoy.config.bootstrap.v3.Bootstrap").unwrap()
    }

    #[test]
    fn quirks_envoy_accepts() {
        let yaml = r#"
staticResources:
  clusters:
    name: one
    connect_timeout: {nanos: 500000000}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
"#;
        let m = message_from_text(yaml, Format::Yaml, &bootstrap()).unwrap();
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["staticResources"]["clusters"][0]["name"], "one");
        assert_eq!(json["staticResources"]["clusters"][0]["connectTimeout"], "0.500s");
    }

    #[test]
    fn every_unknown_field_is_reported_with_its_path() {
        let yaml = r#"
static_resources:
  clusters:
  - name: a
    lb_polcy: ROUND_ROBIN
  - name: b
    lb_policy: ROUND_ROBN
    load_assignment: {endpoints: [{lb_endpoints: [{endpoint: {adress: {}}}]}]}
"#;
        let errs = message_from_text(yaml, Format::Yaml, &bootstrap()).unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "static_resources.clusters[0].lb_polcy",
                "static_resources.clusters[1].lb_policy",
                "static_resources.clusters[1].load_assignment.endpoints[0].lb_endpoints[0].endpoint.adress",
            ]
        );
        assert!(errs.0[1].message.contains("ROUND_ROBN"));
    }

    #[test]
    fn unknown_any_type_and_bad_duration() {
        let yaml = r#"
static_resources:
  clusters:
  - name: a
    connect_timeout: 5
    typed_extension_protocol_options:
      x: {"@type": type.googleapis.com/no.such.Type}
"#;
        let errs = message_from_text(yaml, Format::Yaml, &bootstrap()).unwrap_err();
        assert_eq!(errs.0.len(), 2, "{errs}");
        assert_eq!(errs.0[0].path, "static_resources.clusters[0].connect_timeout");
        assert!(errs.0[1].message.contains("no.such.Type"));
    }

    #[test]
    fn typed_struct_is_read_as_the_type_it_names() {
        let yaml = r#"
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
    value: {stat_prefix: rl}
- name: x
  typed_config:
    "@type": type.googleapis.com/xds.type.v3.TypedStruct
    type_url: type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#;
        let m = message_from_text(yaml, Format::Yaml, &bootstrap()).unwrap();
        let json = serde_json::to_value(&m).unwrap();
        let ext = &json["bootstrapExtensions"];
        assert_eq!(
            ext[0]["typedConfig"]["@type"],
            "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
        );
        assert_eq!(ext[0]["typedConfig"]["statPrefix"], "rl");
        assert_eq!(
            ext[1]["typedConfig"]["@type"],
            "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        );

        // The inner message is checked like any other, with the Any's path.
        let bad = r#"
bootstrap_extensions:
- typed_config:
    "@type": type.googleapis.com/udpa.type.v1.TypedStruct
    type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
    value: {buffer_size: 64}
- typed_config: {"@type": type.googleapis.com/udpa.type.v1.TypedStruct, value: {}}
- typed_config: {"@type": type.googleapis.com/xds.type.v3.TypedStruct, type_url: x, value: 3}
"#;
        let errs = message_from_text(bad, Format::Yaml, &bootstrap()).unwrap_err();
        let lines: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("bootstrap_extensions[0].typed_config.buffer_size: unknown field"));
        assert!(lines[1].contains("needs \"type_url\""));
        assert!(lines[2].contains("must be an object"));
    }

    #[test]
    fn resources_of_a_discovery_response() {
        // A single object where a list is expected, inside a resource, as dynamic-config-fs's lds.yaml has it.
        let yaml = r#"
resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: one
  connect_timeout: {seconds: 1}
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: l
  filter_chains: {filters: {name: envoy.filters.network.http_connection_manager}}
"#;
        let rs = resources_from_text(yaml, Format::Yaml).unwrap();
        let names: Vec<String> = rs
            .iter()
            .map(|m| prost_reflect::ReflectMessage::descriptor(m).name().to_string())
            .collect();
        assert_eq!(names, ["Cluster", "Listener"]);
        let errs = resources_from_text("resources: [{name: x}]", Format::Yaml).unwrap_err();
        assert_eq!(errs.0[0].path, "resources[0]");
        let errs = resources_from_text(
            r#"{"resources": [{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "nam": 1}]}"#,
            Format::Json,
        )
        .unwrap_err();
        assert_eq!(errs.0[0].path, "resources[0].nam");
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("2.5s"),
            Some(std::time::Duration::from_millis(2500))
        );
        assert_eq!(parse_duration("0s"), Some(std::time::Duration::ZERO));
        assert_eq!(
            parse_duration("1.000000001s"),
            Some(std::time::Duration::new(1, 1))
        );
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("1.s"), Some(std::time::Duration::from_secs(1)));
    }
}
