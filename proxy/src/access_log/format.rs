//! Envoy's substitution format strings (`docs/root/configuration/observability/access_log/usage.rst`), parsed
//! once at config time into literal and operator pieces; formatting a request walks the pieces and writes into a
//! reused buffer.
//!
//! Parsing follows Envoy's `SubstitutionFormatParser`: `%%` is a literal `%`; a command operator is
//! `%COMMAND(SUBCOMMAND):LENGTH%` where `COMMAND` is `[A-Z0-9_]+`, the subcommand cannot contain `)`, and the
//! length is decimal digits; anything else after a `%` is an error naming its position. Each operator has Envoy's
//! syntax rules (`PROTOCOL` takes no parameter or length, `REQ` requires a header and allows a length, ...) and
//! an operator Remora does not implement is refused by name.
//!
//! What an operator yields (Envoy's `format`/`formatValue`):
//! - a missing value prints `-` in text (the empty string with `omit_empty_values`); in typed JSON it is `null`
//!   (or the key is left out with `omit_empty_values`); in untyped JSON (the deprecated `json_format` of the file
//!   logger) it is the string `"-"`;
//! - `RESPONSE_CODE`, `BYTES_*`, `*DURATION`, `CONNECTION_ID` are numbers in typed JSON, strings elsewhere;
//!   `RESPONSE_CODE` is `0` when no response started, `RESPONSE_FLAGS` is `-` when none is set;
//! - a JSON value is typed only when it is exactly one operator: `"%DURATION%"` is a number,
//!   `"%DURATION%ms"` a string;
//! - `:N` truncates a header value to N bytes (Envoy's `substr(0, N)`).

use super::time::TimeFormat;
use super::LogRecord;
use http::header::HOST;
use http::{HeaderMap, HeaderName, Version};
use std::io::Write;
use std::net::SocketAddr;

/// Envoy's default format (`SubstitutionFormatUtils::DEFAULT_FORMAT`), newline included.
pub const DEFAULT_FORMAT: &str =
    "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \
\"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \
\"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Envoy's response flags in the order `%RESPONSE_FLAGS%` prints them (`ALL_RESPONSE_STRINGS_FLAGS`), which is
/// also the set `ResponseFlagFilter.flags` accepts.
pub const RESPONSE_FLAGS: [&str; 30] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC", "URX",
    "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR", "UDO",
];

/// One format string, parsed.
#[derive(Debug)]
pub(crate) struct Template(Vec<Piece>);

#[derive(Debug)]
enum Piece {
    Lit(Box<[u8]>),
    Op(Op),
}

#[derive(Debug)]
struct Op {
    kind: Kind,
    max_len: Option<usize>,
}

#[derive(Debug)]
enum Kind {
    StartTime(TimeFormat),
    Request(Header),
    Response(Header),
    Trailer(Header),
    Protocol,
    ResponseCode,
    ResponseCodeDetails,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Duration,
    RequestDuration,
    ResponseDuration,
    Addr(Addr, Part),
    UpstreamCluster,
    RouteName,
    UpstreamTransportFailureReason,
    RequestedServerName,
    ConnectionId,
    /// Resolved when the config is loaded (`ENVIRONMENT`).
    Constant(Box<[u8]>),
}

#[derive(Debug, Clone, Copy)]
enum Addr {
    UpstreamHost,
    UpstreamLocal,
    DownstreamRemote,
    DownstreamLocal,
}

#[derive(Debug, Clone, Copy)]
enum Part {
    Full,
    Ip,
    Port,
}

/// `X?Y`: the main header and its alternative.
#[derive(Debug)]
struct Header {
    main: Key,
    alt: Option<Key>,
}

#[derive(Debug)]
enum Key {
    Method,
    Path,
    Authority,
    Scheme,
    Status,
    /// A pseudo-header that no map of Remora's carries (`:protocol`, ...): always missing.
    OtherPseudo,
    Name(HeaderName),
}

/// The syntax rules of Envoy's `CommandSyntaxChecker`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Syntax {
    CommandOnly,
    ParamsRequiredLengthAllowed,
    ParamsOptional,
}

/// What an operator yields for one request.
enum Value<'s> {
    Missing,
    Num(u64),
    Bytes(&'s [u8]),
    /// Written into the scratch buffer.
    Scratch,
}

/// Buffers reused from one request to the next (one set per thread).
#[derive(Default)]
pub(crate) struct Bufs {
    pub(crate) out: Vec<u8>,
    scratch: Vec<u8>,
    tmp: Vec<u8>,
}

impl Template {
    /// Parse a format string; the error is Envoy's reason, without the field path.
    pub(crate) fn parse(s: &str) -> Result<Template, String> {
        let b = s.as_bytes();
        let mut pieces = Vec::new();
        let mut lit = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'%' {
                lit.push(b[i]);
                i += 1;
                continue;
            }
            if b.get(i + 1) == Some(&b'%') {
                lit.push(b'%');
                i += 2;
                continue;
            }
            let Some((cmd, sub, len, end)) = scan(s, i) else {
                return Err(format!(
                    "couldn't find a valid command operator at position {i} of {s:?}"
                ));
            };
            if !lit.is_empty() {
                pieces.push(Piece::Lit(std::mem::take(&mut lit).into()));
            }
            let max_len = match len {
                Some(l) => Some(
                    l.parse::<usize>()
                        .map_err(|_| format!("length must be an integer, given: {l}"))?,
                ),
                None => None,
            };
            pieces.push(Piece::Op(Op::new(cmd, sub, max_len)?));
            i = end;
        }
        if !lit.is_empty() || pieces.is_empty() {
            pieces.push(Piece::Lit(lit.into()));
        }
        Ok(Template(pieces))
    }

    /// Append the text form: a missing value becomes `empty`.
    fn write_text(&self, rec: &LogRecord<'_>, out: &mut Vec<u8>, scratch: &mut Vec<u8>, empty: &[u8]) {
        for p in &self.0 {
            match p {
                Piece::Lit(l) => out.extend_from_slice(l),
                Piece::Op(op) => {
                    scratch.clear();
                    match op.eval(rec, scratch) {
                        Value::Missing => out.extend_from_slice(empty),
                        Value::Num(n) => write_u64(out, n),
                        Value::Bytes(b) => out.extend_from_slice(truncate(b, op.max_len)),
                        Value::Scratch => out.extend_from_slice(truncate(scratch, op.max_len)),
                    }
                }
            }
        }
    }
}

/// Match Envoy's `^%([A-Z0-9_]+)(?:\(([^)]*)\))?(?::([0-9]+))?%` at `i`: (command, subcommand, length, end).
fn scan(s: &str, i: usize) -> Option<(&str, &str, Option<&str>, usize)> {
    let b = s.as_bytes();
    let mut j = i + 1;
    while j < b.len() && (b[j].is_ascii_uppercase() || b[j].is_ascii_digit() || b[j] == b'_') {
        j += 1;
    }
    if j == i + 1 {
        return None;
    }
    let cmd = &s[i + 1..j];
    let mut sub = "";
    if b.get(j) == Some(&b'(') {
        let close = j + 1 + b[j + 1..].iter().position(|&c| c == b')')?;
        sub = &s[j + 1..close];
        j = close + 1;
    }
    let mut len = None;
    if b.get(j) == Some(&b':') {
        let start = j + 1;
        let mut k = start;
        while k < b.len() && b[k].is_ascii_digit() {
            k += 1;
        }
        if k == start {
            return None;
        }
        len = Some(&s[start..k]);
        j = k;
    }
    (b.get(j) == Some(&b'%')).then_some((cmd, sub, len, j + 1))
}

impl Op {
    fn new(cmd: &str, sub: &str, max_len: Option<usize>) -> Result<Op, String> {
        use Syntax::*;
        let syntax = match cmd {
            "REQ" | "RESP" | "TRAILER" | "ENVIRONMENT" => ParamsRequiredLengthAllowed,
            "START_TIME" => ParamsOptional,
            _ => CommandOnly,
        };
        let simple = match syntax {
            CommandOnly => Some(
                command_only(cmd)
                    .ok_or_else(|| format!("command operator %{cmd}% is not supported by Remora"))?,
            ),
            _ => None,
        };
        // Envoy's CommandSyntaxChecker::verifySyntax, with its messages.
        if syntax == CommandOnly && (!sub.is_empty() || max_len.is_some()) {
            return Err(format!("{cmd} does not take any parameters or length"));
        }
        if syntax == ParamsRequiredLengthAllowed && sub.is_empty() {
            return Err(format!("{cmd} requires parameters"));
        }
        if syntax != ParamsRequiredLengthAllowed && max_len.is_some() {
            return Err(format!("{cmd} does not allow length to be specified."));
        }
        let kind = match (simple, cmd) {
            (Some(kind), _) => kind,
            (None, "REQ") => Kind::Request(Header::parse(sub, false)?),
            (None, "RESP") => Kind::Response(Header::parse(sub, true)?),
            (None, "TRAILER") => Kind::Trailer(Header::parse(sub, false)?),
            (None, "ENVIRONMENT") => {
                // Envoy reads the variable once, truncates it, and prints `-` (a value, not a missing one)
                // when it is unset.
                let v = std::env::var(sub).unwrap_or_else(|_| "-".to_string());
                Kind::Constant(truncate(v.as_bytes(), max_len).into())
            }
            // START_TIME
            (None, _) if sub.is_empty() => Kind::StartTime(TimeFormat::envoy_default()),
            (None, _) => Kind::StartTime(TimeFormat::parse(sub)?),
        };
        Ok(Op { kind, max_len })
    }

    fn eval<'s>(&'s self, rec: &'s LogRecord<'_>, scratch: &mut Vec<u8>) -> Value<'s> {
        match &self.kind {
            Kind::StartTime(f) => {
                f.write(rec.start_time, scratch);
                Value::Scratch
            }
            Kind::Request(h) => h.find(|k| request_value(rec, k)),
            Kind::Response(h) => match rec.response_headers {
                Some(m) => h.find(|k| response_value(rec, m, k, scratch)),
                None => Value::Missing,
            },
            Kind::Trailer(h) => match rec.response_trailers {
                Some(m) => h.find(|k| match k {
                    Key::Name(n) => m.get(n).map(|v| Value::Bytes(v.as_bytes())),
                    _ => None,
                }),
                None => Value::Missing,
            },
            Kind::Protocol => match protocol(rec.version) {
                Some(p) => Value::Bytes(p.as_bytes()),
                None => Value::Missing,
            },
            Kind::ResponseCode => Value::Num(rec.response_code.map_or(0, u64::from)),
            Kind::ResponseCodeDetails => str_value(Some(rec.response_code_details)),
            Kind::ResponseFlags => response_flags(rec.response_flags, scratch),
            Kind::BytesReceived => Value::Num(rec.bytes_received),
            Kind::BytesSent => Value::Num(rec.bytes_sent),
            Kind::Duration => millis(rec.duration),
            Kind::RequestDuration => millis(rec.request_duration),
            Kind::ResponseDuration => millis(rec.response_duration),
            Kind::Addr(which, part) => {
                let a = match which {
                    Addr::UpstreamHost => rec.upstream_host,
                    Addr::UpstreamLocal => rec.upstream_local_address,
                    Addr::DownstreamRemote => rec.downstream_remote_address,
                    Addr::DownstreamLocal => rec.downstream_local_address,
                };
                match a {
                    Some(a) => {
                        write_addr(scratch, a, *part);
                        Value::Scratch
                    }
                    None => Value::Missing,
                }
            }
            Kind::UpstreamCluster => str_value(rec.upstream_cluster),
            Kind::RouteName => str_value(rec.route_name),
            Kind::UpstreamTransportFailureReason => match rec.upstream_transport_failure_reason {
                // Envoy replaces spaces with underscores so the reason stays one token.
                Some(r) if !r.is_empty() => {
                    scratch.extend(r.bytes().map(|c| if c == b' ' { b'_' } else { c }));
                    Value::Scratch
                }
                _ => Value::Missing,
            },
            Kind::RequestedServerName => str_value(rec.requested_server_name),
            Kind::ConnectionId => Value::Num(rec.connection_id),
            Kind::Constant(c) => Value::Bytes(c),
        }
    }
}

/// The operators that take no parameter.
fn command_only(cmd: &str) -> Option<Kind> {
    Some(match cmd {
        "PROTOCOL" => Kind::Protocol,
        "RESPONSE_CODE" => Kind::ResponseCode,
        "RESPONSE_CODE_DETAILS" => Kind::ResponseCodeDetails,
        "RESPONSE_FLAGS" => Kind::ResponseFlags,
        "BYTES_RECEIVED" => Kind::BytesReceived,
        "BYTES_SENT" => Kind::BytesSent,
        "DURATION" => Kind::Duration,
        "REQUEST_DURATION" => Kind::RequestDuration,
        "RESPONSE_DURATION" => Kind::ResponseDuration,
        "UPSTREAM_HOST" | "UPSTREAM_REMOTE_ADDRESS" => Kind::Addr(Addr::UpstreamHost, Part::Full),
        "UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Kind::Addr(Addr::UpstreamHost, Part::Ip),
        "UPSTREAM_REMOTE_PORT" => Kind::Addr(Addr::UpstreamHost, Part::Port),
        "UPSTREAM_LOCAL_ADDRESS" => Kind::Addr(Addr::UpstreamLocal, Part::Full),
        "UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Kind::Addr(Addr::UpstreamLocal, Part::Ip),
        "UPSTREAM_LOCAL_PORT" => Kind::Addr(Addr::UpstreamLocal, Part::Port),
        "DOWNSTREAM_REMOTE_ADDRESS" => Kind::Addr(Addr::DownstreamRemote, Part::Full),
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Kind::Addr(Addr::DownstreamRemote, Part::Ip),
        "DOWNSTREAM_REMOTE_PORT" => Kind::Addr(Addr::DownstreamRemote, Part::Port),
        "DOWNSTREAM_LOCAL_ADDRESS" => Kind::Addr(Addr::DownstreamLocal, Part::Full),
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Kind::Addr(Addr::DownstreamLocal, Part::Ip),
        "DOWNSTREAM_LOCAL_PORT" => Kind::Addr(Addr::DownstreamLocal, Part::Port),
        "UPSTREAM_CLUSTER" => Kind::UpstreamCluster,
        "ROUTE_NAME" => Kind::RouteName,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Kind::UpstreamTransportFailureReason,
        "REQUESTED_SERVER_NAME" => Kind::RequestedServerName,
        "CONNECTION_ID" => Kind::ConnectionId,
        _ => return None,
    })
}

impl Header {
    fn parse(sub: &str, response: bool) -> Result<Header, String> {
        let mut parts = sub.split('?');
        let main = parts.next().unwrap_or_default();
        let alt = parts.next();
        if parts.next().is_some() {
            return Err(format!(
                "More than 1 alternative header specified in token: {sub}"
            ));
        }
        Ok(Header {
            main: Key::parse(main, response)?,
            alt: alt.map(|a| Key::parse(a, response)).transpose()?,
        })
    }

    /// The main header if present, else the alternative (Envoy's `HeaderFormatter::findHeader`).
    fn find<'s>(&self, mut get: impl FnMut(&Key) -> Option<Value<'s>>) -> Value<'s> {
        get(&self.main)
            .or_else(|| self.alt.as_ref().and_then(&mut get))
            .unwrap_or(Value::Missing)
    }
}

impl Key {
    fn parse(name: &str, response: bool) -> Result<Key, String> {
        if name.contains(['\n', '\r', '\0']) {
            return Err("Invalid header configuration. Format string contains newline.".to_string());
        }
        let lower = name.to_ascii_lowercase();
        Ok(match lower.as_str() {
            ":method" if !response => Key::Method,
            ":path" if !response => Key::Path,
            ":authority" if !response => Key::Authority,
            ":scheme" if !response => Key::Scheme,
            ":status" if response => Key::Status,
            p if p.starts_with(':') => Key::OtherPseudo,
            _ => Key::Name(
                HeaderName::from_bytes(lower.as_bytes())
                    .map_err(|_| format!("invalid header name {name:?}"))?,
            ),
        })
    }
}

fn request_value<'s>(rec: &'s LogRecord<'_>, k: &Key) -> Option<Value<'s>> {
    let b: &[u8] = match k {
        Key::Method => rec.method.as_str().as_bytes(),
        Key::Path => rec.uri.path_and_query()?.as_str().as_bytes(),
        // HTTP/1.1 carries the authority in Host, which Envoy's codec turns into `:authority`.
        Key::Authority => match rec.uri.authority() {
            Some(a) => a.as_str().as_bytes(),
            None => rec.request_headers.get(HOST)?.as_bytes(),
        },
        // Remora has no downstream TLS: a request without an absolute URI came over plain HTTP.
        Key::Scheme => rec.uri.scheme_str().unwrap_or("http").as_bytes(),
        Key::Status | Key::OtherPseudo => return None,
        Key::Name(n) => rec.request_headers.get(n)?.as_bytes(),
    };
    Some(Value::Bytes(b))
}

fn response_value<'s>(
    rec: &LogRecord<'_>,
    headers: &'s HeaderMap,
    k: &Key,
    scratch: &mut Vec<u8>,
) -> Option<Value<'s>> {
    match k {
        Key::Status => {
            write_u64(scratch, u64::from(rec.response_code?));
            Some(Value::Scratch)
        }
        Key::Name(n) => Some(Value::Bytes(headers.get(n)?.as_bytes())),
        _ => None,
    }
}

/// Envoy's `Http::Utility::getProtocolString`.
fn protocol(v: Version) -> Option<&'static str> {
    match v {
        Version::HTTP_10 => Some("HTTP/1.0"),
        Version::HTTP_11 => Some("HTTP/1.1"),
        Version::HTTP_2 => Some("HTTP/2"),
        Version::HTTP_3 => Some("HTTP/3"),
        _ => None,
    }
}

fn str_value<'s>(s: Option<&'s str>) -> Value<'s> {
    match s {
        Some(s) if !s.is_empty() => Value::Bytes(s.as_bytes()),
        _ => Value::Missing,
    }
}

fn millis(d: Option<std::time::Duration>) -> Value<'static> {
    match d {
        Some(d) => Value::Num(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => Value::Missing,
    }
}

fn response_flags<'s>(flags: &'s [&'static str], scratch: &mut Vec<u8>) -> Value<'s> {
    match flags {
        [] => Value::Bytes(b"-"),
        [one] => Value::Bytes(one.as_bytes()),
        _ => {
            // Envoy's order, then any flag it does not know, comma-separated.
            let known = RESPONSE_FLAGS.iter().filter(|f| flags.contains(f));
            let unknown = flags.iter().filter(|f| !RESPONSE_FLAGS.contains(f));
            for f in known.chain(unknown) {
                if !scratch.is_empty() {
                    scratch.push(b',');
                }
                scratch.extend_from_slice(f.as_bytes());
            }
            Value::Scratch
        }
    }
}

fn write_addr(out: &mut Vec<u8>, a: SocketAddr, part: Part) {
    // Writes into a Vec cannot fail.
    let _ = match part {
        Part::Full => write!(out, "{a}"),
        Part::Ip => write!(out, "{}", a.ip()),
        Part::Port => write!(out, "{}", a.port()),
    };
}

fn write_u64(out: &mut Vec<u8>, n: u64) {
    let _ = write!(out, "{n}");
}

fn truncate(b: &[u8], max: Option<usize>) -> &[u8] {
    match max {
        Some(m) if m < b.len() => &b[..m],
        _ => b,
    }
}

/// A whole log line's format: text, or a JSON object.
#[derive(Debug)]
pub(crate) enum Format {
    Text {
        tpl: Template,
        omit_empty: bool,
    },
    Json {
        root: Vec<(Box<[u8]>, JsonValue)>,
        /// `false` only for the file logger's deprecated `json_format`: every value a string.
        typed: bool,
        omit_empty: bool,
    },
}

/// One value of a JSON format: a format string, a nested object or list, or a number.
#[derive(Debug)]
pub(crate) enum JsonValue {
    Tpl(Template),
    Obj(Vec<(Box<[u8]>, JsonValue)>),
    List(Vec<JsonValue>),
    Num(f64),
}

/// An object key, encoded once as `"key":`.
pub(crate) fn json_key(k: &str) -> Box<[u8]> {
    let mut out = Vec::with_capacity(k.len() + 3);
    json_str(&mut out, k.as_bytes());
    out.push(b':');
    out.into()
}

impl Format {
    pub(crate) fn envoy_default() -> Format {
        match Template::parse(DEFAULT_FORMAT) {
            Ok(tpl) => Format::Text {
                tpl,
                omit_empty: false,
            },
            // A constant that a unit test parses.
            Err(e) => unreachable!("Envoy's default format does not parse: {e}"),
        }
    }

    /// Append one log line to `b.out`.
    pub(crate) fn write(&self, rec: &LogRecord<'_>, b: &mut Bufs) {
        match self {
            Format::Text { tpl, omit_empty } => {
                let empty: &[u8] = if *omit_empty { b"" } else { b"-" };
                tpl.write_text(rec, &mut b.out, &mut b.scratch, empty);
            }
            Format::Json {
                root,
                typed,
                omit_empty,
            } => {
                let j = Json {
                    rec,
                    typed: *typed,
                    omit_empty: *omit_empty,
                };
                j.object(root, b, true);
                b.out.push(b'\n');
            }
        }
    }
}

struct Json<'r, 'a> {
    rec: &'r LogRecord<'a>,
    typed: bool,
    omit_empty: bool,
}

impl Json<'_, '_> {
    /// Write one value; `false` if it was left out (nothing written).
    fn value(&self, v: &JsonValue, b: &mut Bufs) -> bool {
        match v {
            JsonValue::Tpl(t) => self.template(t, b),
            JsonValue::Num(x) => {
                if self.typed {
                    write_f64(&mut b.out, *x);
                } else {
                    b.tmp.clear();
                    write_g(&mut b.tmp, *x);
                    json_str(&mut b.out, &b.tmp);
                }
                true
            }
            JsonValue::Obj(fields) => self.object(fields, b, false),
            JsonValue::List(items) => {
                b.out.push(b'[');
                let mut first = true;
                for item in items {
                    let mark = b.out.len();
                    if !first {
                        b.out.push(b',');
                    }
                    if self.value(item, b) {
                        first = false;
                    } else {
                        b.out.truncate(mark);
                    }
                }
                b.out.push(b']');
                true
            }
        }
    }

    /// With `omit_empty_values`, a nested object whose every value was left out is left out too; the root
    /// object is always written.
    fn object(&self, fields: &[(Box<[u8]>, JsonValue)], b: &mut Bufs, root: bool) -> bool {
        let start = b.out.len();
        b.out.push(b'{');
        let mut first = true;
        for (key, v) in fields {
            let mark = b.out.len();
            if !first {
                b.out.push(b',');
            }
            b.out.extend_from_slice(key);
            if self.value(v, b) {
                first = false;
            } else {
                b.out.truncate(mark);
            }
        }
        if first && self.omit_empty && !root {
            b.out.truncate(start);
            return false;
        }
        b.out.push(b'}');
        true
    }

    fn template(&self, t: &Template, b: &mut Bufs) -> bool {
        match t.0.as_slice() {
            [Piece::Op(op)] => {
                b.scratch.clear();
                match op.eval(self.rec, &mut b.scratch) {
                    Value::Missing if self.omit_empty => return false,
                    Value::Missing if self.typed => b.out.extend_from_slice(b"null"),
                    Value::Missing => b.out.extend_from_slice(b"\"-\""),
                    Value::Num(n) if self.typed => write_u64(&mut b.out, n),
                    Value::Num(n) => {
                        b.out.push(b'"');
                        write_u64(&mut b.out, n);
                        b.out.push(b'"');
                    }
                    Value::Bytes(v) => json_str(&mut b.out, truncate(v, op.max_len)),
                    Value::Scratch => json_str(&mut b.out, truncate(&b.scratch, op.max_len)),
                }
            }
            [Piece::Lit(l)] => json_str(&mut b.out, l),
            _ => {
                // Several pieces make a string, in which a missing value is `-` (or nothing).
                let empty: &[u8] = if self.omit_empty { b"" } else { b"-" };
                b.tmp.clear();
                t.write_text(self.rec, &mut b.tmp, &mut b.scratch, empty);
                json_str(&mut b.out, &b.tmp);
            }
        }
        true
    }
}

fn write_f64(out: &mut Vec<u8>, x: f64) {
    let _ = if !x.is_finite() {
        write!(out, "null")
    } else if x.fract() == 0.0 && x.abs() < 1e15 {
        write!(out, "{}", x as i64)
    } else {
        write!(out, "{x}")
    };
}

/// C's `%g` (six significant digits), which Envoy's `PlainNumberFormatter` uses for a number in an untyped
/// JSON format.
fn write_g(out: &mut Vec<u8>, x: f64) {
    if x == 0.0 || !x.is_finite() {
        let _ = write!(out, "{}", if x == 0.0 { 0.0 } else { x });
        return;
    }
    let sci = format!("{x:.5e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    let _ = if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        write!(out, "{}e{sign}{:02}", trim(mantissa), exp.abs())
    } else {
        let decimals = (5 - exp) as usize;
        write!(out, "{}", trim(&format!("{x:.decimals$}")))
    };
}

/// A JSON string; bytes that are not UTF-8 (obs-text in a header) become U+FFFD.
fn json_str(out: &mut Vec<u8>, b: &[u8]) {
    out.push(b'"');
    match std::str::from_utf8(b) {
        Ok(s) => escape(out, s),
        Err(_) => escape(out, &String::from_utf8_lossy(b)),
    }
    out.push(b'"');
}

fn escape(out: &mut Vec<u8>, s: &str) {
    for &c in s.as_bytes() {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            c if c < 0x20 || c == 0x7f => {
                let _ = write!(out, "\\u{c:04x}");
            }
            c => out.push(c),
        }
    }
}
