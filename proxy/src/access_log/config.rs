//! Lowering `envoy.config.accesslog.v3.AccessLog` into [`AccessLog`]s.
//!
//! Read here, and therefore supported (anything else set is refused with its path by [`Node`]):
//! - `AccessLog`: `name`, `filter`, `typed_config` of type
//!   - `envoy.extensions.access_loggers.file.v3.FileAccessLog`: `path`, `log_format`, and the deprecated
//!     `format` (empty: Envoy's default), `json_format` (every value a string) and `typed_json_format`;
//!   - `envoy.extensions.access_loggers.stream.v3.StdoutAccessLog` and `StderrAccessLog`: `log_format`;
//!
//!   without `typed_config`, a logger named `envoy.access_loggers.stdout` or `envoy.access_loggers.stderr` uses
//!   the default format, as Envoy's empty config of that factory does;
//! - `SubstitutionFormatString`: `text_format_source` (`inline_string`, `inline_bytes`, `filename`,
//!   `environment_variable`), `text_format`, `json_format` (strings, numbers, nested objects and lists),
//!   `omit_empty_values`, `content_type` (used only by local replies, so nothing to do here) and
//!   `json_format_options.sort_properties` (Remora always writes keys sorted); `formatters` is refused;
//! - `AccessLogFilter`: `status_code_filter`, `duration_filter` (`ComparisonFilter`: `op`, `value.default_value`,
//!   `value.runtime_key`), `response_flag_filter`, `not_health_check_filter`, `and_filter`, `or_filter`.

use super::filter::{Comparison, Filter, Op};
use super::format::{json_key, Format, JsonValue, Template, RESPONSE_FLAGS};
use super::sink::{Manager, Target};
use super::AccessLog;
use crate::config::node::Node;
use std::path::PathBuf;

const FILE: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// Lower the items of an `access_log` field. Problems are reported through the nodes' error list (the
/// configuration is then refused); the loggers that lowered cleanly are returned. Files are opened here, through
/// `files`, which shares a destination among every logger writing to the same path.
pub fn lower(list: &[Node<'_>], files: &Manager) -> Vec<AccessLog> {
    list.iter().filter_map(|n| lower_one(n, files)).collect()
}

fn lower_one(n: &Node<'_>, files: &Manager) -> Option<AccessLog> {
    let name = n.string("name").unwrap_or_default();
    let filter = n.msg("filter").map(|f| lower_filter(&f));
    let (target, format) = if n.has("typed_config") {
        let t = n.any("typed_config")?;
        match t.type_name().as_str() {
            FILE => {
                let path = t.string("path").unwrap_or_default();
                let format = file_format(&t);
                if path.is_empty() {
                    t.err("path", "a path is required");
                    return None;
                }
                let target = Target::File(PathBuf::from(&path));
                match files.sink(target) {
                    Ok(sink) => (sink, format?),
                    Err(e) => {
                        t.err("path", format!("unable to open file '{path}': {e}"));
                        return None;
                    }
                }
            }
            ty @ (STDOUT | STDERR) => {
                let format = match t.msg("log_format") {
                    Some(s) => lower_format_string(&s)?,
                    None => Format::envoy_default(),
                };
                let target = if ty == STDOUT {
                    Target::Stdout
                } else {
                    Target::Stderr
                };
                (stream(files, target, n)?, format)
            }
            other => {
                t.mark_all();
                t.err_here(format!("access logger {other} is not supported by Remora"));
                return None;
            }
        }
    } else {
        let target = match name.as_str() {
            "envoy.access_loggers.stdout" => Target::Stdout,
            "envoy.access_loggers.stderr" => Target::Stderr,
            _ => {
                n.err("typed_config", "an access logger needs a typed_config");
                return None;
            }
        };
        (stream(files, target, n)?, Format::envoy_default())
    };
    let filter = match filter {
        Some(Some(f)) => Some(f),
        Some(None) => return None,
        None => None,
    };
    Some(AccessLog {
        filter,
        format,
        sink: target,
    })
}

fn stream(files: &Manager, target: Target, n: &Node<'_>) -> Option<std::sync::Arc<super::sink::Sink>> {
    match files.sink(target) {
        Ok(s) => Some(s),
        // Only a file is opened; stdout and stderr cannot fail here.
        Err(e) => {
            n.err("typed_config", e.to_string());
            None
        }
    }
}

/// The file logger's format: `log_format`, a deprecated form, or Envoy's default.
fn file_format(t: &Node<'_>) -> Option<Format> {
    if t.has("log_format") {
        lower_format_string(&t.msg("log_format")?)
    } else if t.has("json_format") {
        let fields = json_fields(&t.msg("json_format")?)?;
        Some(Format::Json {
            root: fields,
            typed: false,
            omit_empty: false,
        })
    } else if t.has("typed_json_format") {
        let fields = json_fields(&t.msg("typed_json_format")?)?;
        Some(Format::Json {
            root: fields,
            typed: true,
            omit_empty: false,
        })
    } else {
        match t.string("format") {
            Some(f) if !f.is_empty() => text(t, "format", &f, false),
            _ => Some(Format::envoy_default()),
        }
    }
}

/// `envoy.config.core.v3.SubstitutionFormatString`.
fn lower_format_string(s: &Node<'_>) -> Option<Format> {
    let omit = s.bool("omit_empty_values");
    // `content_type` is for local replies; an access log has no use for it.
    let _ = s.string("content_type");
    if let Some(o) = s.msg("json_format_options") {
        // Keys are always written sorted, which is what `sort_properties` asks for and a valid order otherwise.
        let _ = o.bool("sort_properties");
    }
    if s.has("text_format_source") {
        let ds = s.msg("text_format_source")?;
        let (field, f) = data_source(&ds)?;
        text(&ds, field, &f, omit)
    } else if s.has("text_format") {
        let f = s.string("text_format")?;
        text(s, "text_format", &f, omit)
    } else if s.has("json_format") {
        let fields = json_fields(&s.msg("json_format")?)?;
        Some(Format::Json {
            root: fields,
            typed: true,
            omit_empty: omit,
        })
    } else {
        s.err_here("one of text_format_source, text_format or json_format is required");
        None
    }
}

fn text(n: &Node<'_>, field: &str, f: &str, omit_empty: bool) -> Option<Format> {
    match Template::parse(f) {
        Ok(tpl) => Some(Format::Text { tpl, omit_empty }),
        Err(e) => {
            n.err(field, e);
            None
        }
    }
}

/// `envoy.config.core.v3.DataSource` as text: (the field it came from, the text).
fn data_source(ds: &Node<'_>) -> Option<(&'static str, String)> {
    if ds.has("inline_string") {
        Some(("inline_string", ds.string("inline_string")?))
    } else if ds.has("inline_bytes") {
        match String::from_utf8(ds.bytes("inline_bytes")?) {
            Ok(s) => Some(("inline_bytes", s)),
            Err(_) => {
                ds.err("inline_bytes", "a format string must be UTF-8");
                None
            }
        }
    } else if ds.has("filename") {
        let path = ds.string("filename")?;
        match std::fs::read_to_string(&path) {
            Ok(s) => Some(("filename", s)),
            Err(e) => {
                ds.err("filename", format!("unable to read file '{path}': {e}"));
                None
            }
        }
    } else if ds.has("environment_variable") {
        let var = ds.string("environment_variable")?;
        match std::env::var(&var) {
            Ok(s) => Some(("environment_variable", s)),
            Err(_) => {
                ds.err(
                    "environment_variable",
                    format!("Environment variable doesn't exist: {var}"),
                );
                None
            }
        }
    } else {
        ds.err_here("one of inline_string, inline_bytes, filename or environment_variable is required");
        None
    }
}

/// A `google.protobuf.Struct` of format strings, keys sorted.
fn json_fields(st: &Node<'_>) -> Option<Vec<(Box<[u8]>, JsonValue)>> {
    let mut ok = true;
    let mut out = Vec::new();
    for (key, v) in st.map("fields") {
        match json_value(&v) {
            Some(x) => out.push((json_key(&key), x)),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn json_value(v: &Node<'_>) -> Option<JsonValue> {
    if v.has("string_value") {
        let s = v.string("string_value")?;
        match Template::parse(&s) {
            Ok(t) => Some(JsonValue::Tpl(t)),
            Err(e) => {
                v.err("string_value", e);
                None
            }
        }
    } else if v.has("struct_value") {
        Some(JsonValue::Obj(json_fields(&v.msg("struct_value")?)?))
    } else if v.has("list_value") {
        let l = v.msg("list_value")?;
        let items: Vec<Option<JsonValue>> = l.list("values").iter().map(json_value).collect();
        Some(JsonValue::List(items.into_iter().collect::<Option<_>>()?))
    } else if v.has("number_value") {
        Some(JsonValue::Num(v.f64("number_value")))
    } else {
        v.mark_all();
        // Envoy's message.
        v.err_here(
            "Only string values, nested structs, list values and number values are supported in \
             structured access log format.",
        );
        None
    }
}

/// `envoy.config.accesslog.v3.AccessLogFilter`.
fn lower_filter(f: &Node<'_>) -> Option<Filter> {
    if f.has("status_code_filter") {
        comparison(&f.msg("status_code_filter")?).map(Filter::StatusCode)
    } else if f.has("duration_filter") {
        comparison(&f.msg("duration_filter")?).map(Filter::Duration)
    } else if f.has("not_health_check_filter") {
        f.msg("not_health_check_filter")?;
        Some(Filter::NotHealthCheck)
    } else if f.has("response_flag_filter") {
        let m = f.msg("response_flag_filter")?;
        let mut ok = true;
        let mut flags = Vec::new();
        for (i, flag) in m.strings("flags").iter().enumerate() {
            match RESPONSE_FLAGS.iter().find(|k| *k == flag) {
                Some(k) => flags.push(*k),
                None => {
                    ok = false;
                    m.err(
                        &format!("flags[{i}]"),
                        format!("{flag:?} is not one of Envoy's response flags"),
                    );
                }
            }
        }
        ok.then_some(Filter::ResponseFlag(flags))
    } else if f.has("and_filter") {
        operands(&f.msg("and_filter")?, "and_filter").map(Filter::And)
    } else if f.has("or_filter") {
        operands(&f.msg("or_filter")?, "or_filter").map(Filter::Or)
    } else {
        if f.message().fields().next().is_none() {
            f.err_here("a filter is required");
        }
        // Any other filter is set and unread: the node refuses it with its path.
        None
    }
}

fn operands(m: &Node<'_>, what: &str) -> Option<Vec<Filter>> {
    let list = m.list("filters");
    let lowered: Vec<Option<Filter>> = list.iter().map(lower_filter).collect();
    if list.len() < 2 {
        m.err("filters", format!("an {what} needs at least 2 filters"));
        return None;
    }
    lowered.into_iter().collect()
}

/// `ComparisonFilter`.
fn comparison(m: &Node<'_>) -> Option<Comparison> {
    let Some(c) = m.msg("comparison") else {
        m.err("comparison", "a comparison is required");
        return None;
    };
    let op = match c.enum_name("op").as_str() {
        "EQ" => Op::Eq,
        "GE" => Op::Ge,
        "LE" => Op::Le,
        "NE" => Op::Ne,
        other => {
            c.err("op", format!("unknown comparison {other}"));
            return None;
        }
    };
    let Some(v) = c.msg("value") else {
        c.err("value", "a value is required");
        return None;
    };
    let value = u64::from(v.u32("default_value"));
    // No runtime layer: the default applies (see the module docs of `filter`).
    let _ = v.string("runtime_key");
    Some(Comparison { op, value })
}
