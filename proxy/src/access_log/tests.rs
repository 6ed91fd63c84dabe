use super::filter::{Comparison, Filter, Op};
use super::format::{Bufs, Format, JsonValue, Template};
use super::*;
use crate::config::descriptors;
use crate::config::load::{self, message_from_text};
use crate::config::node::{Errors, Node};
use crate::stats::Store;
use http::HeaderValue;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::UNIX_EPOCH;

// ---------------------------------------------------------------------------------------------------------------
// Fixtures

struct Req {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    resp: HeaderMap,
    trailers: HeaderMap,
}

fn req() -> Req {
    let mut headers = HeaderMap::new();
    headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.35.28"));
    headers.insert("user-agent", HeaderValue::from_static("nsq2http"));
    headers.insert(
        "x-request-id",
        HeaderValue::from_static("cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2"),
    );
    headers.insert("host", HeaderValue::from_static("locations"));
    headers.append("x-multi", HeaderValue::from_static("first"));
    headers.append("x-multi", HeaderValue::from_static("second"));
    headers.insert("x-empty", HeaderValue::from_static(""));
    let mut resp = HeaderMap::new();
    resp.insert("x-envoy-upstream-service-time", HeaderValue::from_static("100"));
    resp.insert("content-type", HeaderValue::from_static("application/json"));
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    Req {
        method: Method::POST,
        uri: Uri::from_static("/api/v1/locations?x=1"),
        headers,
        resp,
        trailers,
    }
}

/// 2016-04-15T20:17:00.310Z, the start time of the docs' example line.
fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_460_751_420_310)
}

fn addr(s: &str) -> Option<SocketAddr> {
    Some(s.parse().unwrap())
}

/// A request that went everywhere: every operator has a value.
fn full(r: &Req) -> LogRecord<'_> {
    let mut rec = LogRecord::new(&r.method, &r.uri, Version::HTTP_2, &r.headers, start());
    rec.response_code = Some(204);
    rec.response_headers = Some(&r.resp);
    rec.response_trailers = Some(&r.trailers);
    rec.duration = Some(Duration::from_micros(226_900));
    rec.request_duration = Some(Duration::from_micros(12_999));
    rec.response_duration = Some(Duration::from_millis(200));
    rec.bytes_received = 154;
    rec.bytes_sent = 0;
    rec.response_code_details = "via_upstream";
    rec.upstream_host = addr("10.0.2.1:80");
    rec.upstream_cluster = Some("locations");
    rec.upstream_local_address = addr("10.0.0.5:41000");
    rec.upstream_transport_failure_reason = Some("TLS error: handshake failed");
    rec.downstream_remote_address = addr("[2001:db8::1]:52000");
    rec.downstream_local_address = addr("10.0.0.5:10000");
    rec.route_name = Some("api");
    rec.requested_server_name = Some("api.example.com");
    rec.connection_id = 42;
    rec
}

/// A request that went nowhere: only what every request has.
fn bare(r: &Req) -> LogRecord<'_> {
    static EMPTY: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
    LogRecord::new(
        &r.method,
        &r.uri,
        Version::HTTP_11,
        EMPTY.get_or_init(HeaderMap::new),
        start(),
    )
}

fn render(f: &Format, rec: &LogRecord<'_>) -> String {
    let mut b = Bufs::default();
    f.write(rec, &mut b);
    String::from_utf8(b.out).unwrap()
}

fn text(fmt: &str, rec: &LogRecord<'_>) -> String {
    let tpl = Template::parse(fmt).unwrap_or_else(|e| panic!("{fmt:?}: {e}"));
    render(
        &Format::Text {
            tpl,
            omit_empty: false,
        },
        rec,
    )
}

fn parse_err(fmt: &str) -> String {
    match Template::parse(fmt) {
        Ok(t) => panic!("{fmt:?} parsed: {t:?}"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The format engine

#[test]
fn default_format_is_envoys_and_prints_the_documented_example() {
    assert_eq!(
        DEFAULT_FORMAT,
        "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% \
         %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \
         \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \
         \"%UPSTREAM_HOST%\"\n"
    );
    let mut r = req();
    r.uri = Uri::from_static("/api/v1/locations");
    let rec = full(&r);
    // usage.rst's example line. The docs show the upstream host as `tcp://10.0.2.1:80`, a form from Envoy's
    // first versions; Envoy prints an IP address as `ip:port` (`Address::Instance::asString`).
    assert_eq!(
        render(&Format::envoy_default(), &rec),
        "[2016-04-15T20:17:00.310Z] \"POST /api/v1/locations HTTP/2\" 204 - 154 0 226 100 \"10.0.35.28\" \
         \"nsq2http\" \"cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2\" \"locations\" \"10.0.2.1:80\"\n"
    );
    // A rewritten path logs the original.
    r.headers
        .insert("x-envoy-original-path", HeaderValue::from_static("/v1/old"));
    assert!(render(&Format::envoy_default(), &full(&r)).contains("\"POST /v1/old HTTP/2\""));
    // A request that got nowhere.
    assert_eq!(
        render(&Format::envoy_default(), &bare(&r)),
        "[2016-04-15T20:17:00.310Z] \"POST /api/v1/locations HTTP/1.1\" 0 - 0 0 - - \"-\" \"-\" \"-\" \"-\" \"-\"\n"
    );
}

#[test]
fn every_operator() {
    let r = req();
    let rec = full(&r);
    for (op, want) in [
        ("%START_TIME%", "2016-04-15T20:17:00.310Z"),
        ("%START_TIME(%s.%3f)%", "1460751420.310"),
        (
            "%START_TIME(%Y/%m/%dT%H:%M:%S%z %s)%",
            "2016/04/15T20:17:00+0000 1460751420",
        ),
        ("%START_TIME()%", "2016-04-15T20:17:00.310Z"),
        ("%REQ(:METHOD)%", "POST"),
        ("%REQ(:PATH)%", "/api/v1/locations?x=1"),
        ("%REQ(:AUTHORITY)%", "locations"),
        ("%REQ(:SCHEME)%", "http"),
        ("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", "/api/v1/locations?x=1"),
        ("%REQ(user-agent)%", "nsq2http"),
        ("%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%", "100"),
        ("%RESP(:STATUS)%", "204"),
        ("%TRAILER(GRPC-STATUS)%", "0"),
        ("%PROTOCOL%", "HTTP/2"),
        ("%RESPONSE_CODE%", "204"),
        ("%RESPONSE_FLAGS%", "-"),
        ("%RESPONSE_CODE_DETAILS%", "via_upstream"),
        ("%BYTES_RECEIVED%", "154"),
        ("%BYTES_SENT%", "0"),
        ("%DURATION%", "226"),
        ("%REQUEST_DURATION%", "12"),
        ("%RESPONSE_DURATION%", "200"),
        ("%UPSTREAM_HOST%", "10.0.2.1:80"),
        ("%UPSTREAM_REMOTE_ADDRESS%", "10.0.2.1:80"),
        ("%UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "10.0.2.1"),
        ("%UPSTREAM_REMOTE_PORT%", "80"),
        ("%UPSTREAM_CLUSTER%", "locations"),
        ("%UPSTREAM_LOCAL_ADDRESS%", "10.0.0.5:41000"),
        ("%UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "10.0.0.5"),
        ("%UPSTREAM_LOCAL_PORT%", "41000"),
        ("%DOWNSTREAM_REMOTE_ADDRESS%", "[2001:db8::1]:52000"),
        ("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "2001:db8::1"),
        ("%DOWNSTREAM_REMOTE_PORT%", "52000"),
        ("%DOWNSTREAM_LOCAL_ADDRESS%", "10.0.0.5:10000"),
        ("%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "10.0.0.5"),
        ("%DOWNSTREAM_LOCAL_PORT%", "10000"),
        ("%ROUTE_NAME%", "api"),
        // Envoy makes the reason one token.
        (
            "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
            "TLS_error:_handshake_failed",
        ),
        ("%REQUESTED_SERVER_NAME%", "api.example.com"),
        ("%CONNECTION_ID%", "42"),
        ("%ENVIRONMENT(REMORA_ACCESS_LOG_TEST_SURELY_UNSET)%", "-"),
    ] {
        assert_eq!(text(op, &rec), want, "{op}");
    }
    // Read when the format is parsed, and truncated then.
    let path: String = std::env::var("PATH").unwrap().chars().take(5).collect();
    assert_eq!(text("%ENVIRONMENT(PATH):5%", &rec), path);
    // HTTP/1.0 and HTTP/1.1.
    let mut rec = bare(&r);
    assert_eq!(text("%PROTOCOL%", &rec), "HTTP/1.1");
    rec.version = Version::HTTP_10;
    assert_eq!(text("%PROTOCOL%", &rec), "HTTP/1.0");
}

#[test]
fn missing_values_print_a_dash_or_nothing() {
    let r = req();
    let rec = bare(&r);
    let all = "%REQ(X-NONE)%|%RESP(X)%|%RESP(:STATUS)%|%TRAILER(X)%|%RESPONSE_CODE_DETAILS%|%DURATION%|\
               %REQUEST_DURATION%|%RESPONSE_DURATION%|%UPSTREAM_HOST%|%UPSTREAM_CLUSTER%|\
               %UPSTREAM_LOCAL_ADDRESS%|%DOWNSTREAM_REMOTE_ADDRESS%|%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%|\
               %DOWNSTREAM_LOCAL_ADDRESS%|%ROUTE_NAME%|%UPSTREAM_TRANSPORT_FAILURE_REASON%|\
               %REQUESTED_SERVER_NAME%|%REQ(:AUTHORITY)%";
    assert_eq!(text(all, &rec), ["-"; 18].join("|"));
    // Values that always exist: the code is 0 before a response, the flags `-` when none, counts 0.
    assert_eq!(
        text(
            "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %CONNECTION_ID%",
            &rec
        ),
        "0 - 0 0 0"
    );
    // omit_empty_values: nothing instead of `-`.
    let f = Format::Text {
        tpl: Template::parse("[%ROUTE_NAME%][%REQ(X)%][%RESPONSE_FLAGS%]").unwrap(),
        omit_empty: true,
    };
    assert_eq!(render(&f, &rec), "[][][-]");
}

#[test]
fn headers_alternatives_truncation_and_values() {
    let r = req();
    let rec = full(&r);
    for (op, want) in [
        // Case-insensitive, first value of several, an empty value is a value.
        ("%REQ(X-Request-Id)%", "cc21d9b0-cf5c-432b-8c7e-98aeb7988cd2"),
        ("%REQ(x-multi)%", "first"),
        ("[%REQ(x-empty)%]", "[]"),
        ("%REQ(X-NONE?USER-AGENT)%", "nsq2http"),
        ("%REQ(USER-AGENT?X-REQUEST-ID)%", "nsq2http"),
        ("%REQ(X-NONE?X-NOTHING)%", "-"),
        // Truncation to N bytes, main or alternative.
        ("%REQ(X-REQUEST-ID):8%", "cc21d9b0"),
        ("%REQ(X-NONE?X-REQUEST-ID):4%", "cc21"),
        ("%REQ(USER-AGENT):100%", "nsq2http"),
        ("%REQ(USER-AGENT):0%", ""),
        ("%RESP(CONTENT-TYPE):11%", "application"),
        ("%TRAILER(GRPC-STATUS?X):1%", "0"),
        // Pseudo-headers that are not the request's.
        ("%REQ(:STATUS)%", "-"),
        ("%RESP(:PATH)%", "-"),
        ("%TRAILER(:STATUS)%", "-"),
        ("%REQ(:PROTOCOL)%", "-"),
        // Literal text and `%%`.
        ("100%% of %REQ(:METHOD)%s", "100% of POSTs"),
        ("", ""),
        ("no operators", "no operators"),
    ] {
        assert_eq!(text(op, &rec), want, "{op}");
    }
    // An absolute-form URI carries the authority and the scheme.
    let mut r2 = req();
    r2.uri = Uri::from_static("https://api.example.com:8443/x");
    let rec = bare(&r2);
    assert_eq!(
        text("%REQ(:SCHEME)% %REQ(:AUTHORITY)% %REQ(:PATH)%", &rec),
        "https api.example.com:8443 /x"
    );
}

#[test]
fn response_flags_print_in_envoys_order() {
    let r = req();
    let mut rec = full(&r);
    rec.response_flags = &["UF"];
    assert_eq!(text("%RESPONSE_FLAGS%", &rec), "UF");
    rec.response_flags = &["URX", "UF", "UH"];
    assert_eq!(text("%RESPONSE_FLAGS%", &rec), "UH,UF,URX");
}

#[test]
fn format_errors_are_envoys() {
    for (fmt, want) in [
        ("%FOO%", "command operator %FOO% is not supported by Remora"),
        ("%DYNAMIC_METADATA(a:b)%", "%DYNAMIC_METADATA% is not supported"),
        ("%REQ%", "REQ requires parameters"),
        ("%REQ()%", "REQ requires parameters"),
        ("%PROTOCOL(x)%", "PROTOCOL does not take any parameters or length"),
        ("%DURATION:3%", "DURATION does not take any parameters or length"),
        (
            "%START_TIME:3%",
            "START_TIME does not allow length to be specified.",
        ),
        (
            "%REQ(A?B?C)%",
            "More than 1 alternative header specified in token: A?B?C",
        ),
        ("%REQ(bad header)%", "invalid header name \"bad header\""),
        ("%START_TIME(%n)%", "Format string contains newline"),
        (
            "%START_TIME(%Q)%",
            "START_TIME specifier %Q is not supported by Remora",
        ),
        ("100%", "couldn't find a valid command operator at position 3"),
        ("%lower%", "couldn't find a valid command operator at position 0"),
        ("%REQ(X", "couldn't find a valid command operator"),
        ("%REQ(X):%", "couldn't find a valid command operator"),
        ("%REQ(X):99999999999999999999999%", "length must be an integer"),
    ] {
        let e = parse_err(fmt);
        assert!(e.contains(want), "{fmt}: {e}");
    }
}

fn json(root: Vec<(&str, JsonValue)>, typed: bool, omit_empty: bool) -> Format {
    Format::Json {
        root: root.into_iter().map(|(k, v)| (format::json_key(k), v)).collect(),
        typed,
        omit_empty,
    }
}

fn tpl(s: &str) -> JsonValue {
    JsonValue::Tpl(Template::parse(s).unwrap())
}

#[test]
fn typed_json_keeps_types_nests_and_nulls() {
    let r = req();
    let root = || {
        vec![
            ("code", tpl("%RESPONSE_CODE%")),
            ("duration", tpl("%DURATION%")),
            ("duration_text", tpl("%DURATION%ms")),
            ("protocol", tpl("%PROTOCOL%")),
            ("start", tpl("%START_TIME%")),
            ("route", tpl("%ROUTE_NAME%")),
            ("plain", tpl("plain text")),
            ("empty_header", tpl("%REQ(X-EMPTY)%")),
            ("agent", tpl("%REQ(USER-AGENT):3%")),
            ("ratio", JsonValue::Num(0.5)),
            ("version", JsonValue::Num(3.0)),
            (
                "upstream",
                JsonValue::Obj(vec![
                    (format::json_key("host"), tpl("%UPSTREAM_HOST%")),
                    (format::json_key("cluster"), tpl("%UPSTREAM_CLUSTER%")),
                    (
                        format::json_key("deeper"),
                        JsonValue::Obj(vec![(format::json_key("sni"), tpl("%REQUESTED_SERVER_NAME%"))]),
                    ),
                ]),
            ),
            (
                "list",
                JsonValue::List(vec![tpl("%BYTES_SENT%"), tpl("%ROUTE_NAME%"), tpl("x")]),
            ),
        ]
    };
    let out = render(&json(root(), true, false), &full(&r));
    assert!(out.ends_with("}\n"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "code": 204,
            "duration": 226,
            "duration_text": "226ms",
            "protocol": "HTTP/2",
            "start": "2016-04-15T20:17:00.310Z",
            "route": "api",
            "plain": "plain text",
            "empty_header": "",
            "agent": "nsq",
            "ratio": 0.5,
            "version": 3,
            "upstream": {"host": "10.0.2.1:80", "cluster": "locations", "deeper": {"sni": "api.example.com"}},
            "list": [0, "api", "x"],
        })
    );
    // One line, keys in the order given (the lowering sorts them), no spaces.
    assert!(out.starts_with("{\"code\":204,\"duration\":226,"), "{out}");
    assert_eq!(out.matches('\n').count(), 1);

    // Missing values are null; several pieces make a string with `-`.
    let out = render(&json(root(), true, false), &bare(&r));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["code"], 0);
    assert_eq!(v["duration"], serde_json::Value::Null);
    assert_eq!(v["duration_text"], "-ms");
    assert_eq!(v["route"], serde_json::Value::Null);
    assert_eq!(v["upstream"]["deeper"]["sni"], serde_json::Value::Null);
    assert_eq!(v["list"], serde_json::json!([0, null, "x"]));

    // omit_empty_values: null keys go, and so does an object left empty; lists stay; the root always stays.
    let out = render(&json(root(), true, true), &bare(&r));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "code": 0,
            "duration_text": "ms",
            "protocol": "HTTP/1.1",
            "start": "2016-04-15T20:17:00.310Z",
            "plain": "plain text",
            "ratio": 0.5,
            "version": 3,
            "list": [0, "x"],
        })
    );
    let only_missing = json(vec![("route", tpl("%ROUTE_NAME%"))], true, true);
    assert_eq!(render(&only_missing, &bare(&r)), "{}\n");
}

#[test]
fn untyped_json_renders_every_value_as_a_string() {
    let r = req();
    let f = || {
        json(
            vec![
                ("code", tpl("%RESPONSE_CODE%")),
                ("duration", tpl("%DURATION%")),
                ("route", tpl("%ROUTE_NAME%")),
                ("n", JsonValue::Num(200.0)),
                (
                    "g",
                    JsonValue::List(vec![
                        JsonValue::Num(0.5),
                        JsonValue::Num(1234567.0),
                        JsonValue::Num(0.00001234),
                        JsonValue::Num(-2.5e-7),
                        JsonValue::Num(123456.0),
                    ]),
                ),
            ],
            false,
            false,
        )
    };
    let v: serde_json::Value = serde_json::from_str(&render(&f(), &full(&r))).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"code": "204", "duration": "226", "route": "api", "n": "200",
            "g": ["0.5", "1.23457e+06", "1.234e-05", "-2.5e-07", "123456"]})
    );
    let v: serde_json::Value = serde_json::from_str(&render(&f(), &bare(&r))).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"code": "0", "duration": "-", "route": "-", "n": "200",
            "g": ["0.5", "1.23457e+06", "1.234e-05", "-2.5e-07", "123456"]})
    );
}

#[test]
fn json_strings_are_escaped() {
    let mut r = req();
    r.headers
        .insert("x-evil", HeaderValue::from_bytes(b"a\"b\\c\td\xe9").unwrap());
    let f = json(
        vec![("evil", tpl("%REQ(X-EVIL)%")), ("q\"k", tpl("<%REQ(X-EVIL)%>"))],
        true,
        false,
    );
    let out = render(&f, &full(&r));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["evil"], "a\"b\\c\td\u{fffd}");
    assert_eq!(v["q\"k"], "<a\"b\\c\td\u{fffd}>");
    assert!(out.contains(r#""evil":"a\"b\\c\td"#), "{out}");
}

// ---------------------------------------------------------------------------------------------------------------
// Filters

#[test]
fn filters_decide_as_envoy_does() {
    let r = req();
    let mut rec = full(&r);
    let cmp = |op, value| Comparison { op, value };
    let status = |op, v| Filter::StatusCode(cmp(op, v));
    assert!(status(Op::Ge, 200).evaluate(&rec));
    assert!(status(Op::Eq, 204).evaluate(&rec));
    assert!(!status(Op::Le, 199).evaluate(&rec));
    assert!(status(Op::Ne, 500).evaluate(&rec));
    // No response: the code compared is 0.
    rec.response_code = None;
    assert!(status(Op::Eq, 0).evaluate(&rec));

    let dur = |op, v| Filter::Duration(cmp(op, v));
    assert!(dur(Op::Ge, 226).evaluate(&rec));
    assert!(!dur(Op::Ge, 227).evaluate(&rec));
    assert!(dur(Op::Le, 226).evaluate(&rec));
    rec.duration = None;
    assert!(!dur(Op::Le, u64::MAX).evaluate(&rec));

    let any = Filter::ResponseFlag(vec![]);
    let some = Filter::ResponseFlag(vec!["UF", "UO"]);
    assert!(!any.evaluate(&rec));
    assert!(!some.evaluate(&rec));
    rec.response_flags = &["UT"];
    assert!(any.evaluate(&rec));
    assert!(!some.evaluate(&rec));
    rec.response_flags = &["UT", "UO"];
    assert!(some.evaluate(&rec));

    assert!(Filter::NotHealthCheck.evaluate(&rec));
    rec.health_check = true;
    assert!(!Filter::NotHealthCheck.evaluate(&rec));

    let and = Filter::And(vec![any.clone(), Filter::NotHealthCheck]);
    let or = Filter::Or(vec![Filter::NotHealthCheck, any.clone()]);
    assert!(!and.evaluate(&rec));
    assert!(or.evaluate(&rec));
}

// ---------------------------------------------------------------------------------------------------------------
// Lowering

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!(
            "remora-access-log-{tag}-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn manager(interval: Duration) -> (Arc<Store>, Manager) {
    let store = Store::new();
    let m = Manager::new(&store.scope(""), interval).unwrap();
    (store, m)
}

fn lower_yaml(yaml: &str, files: &Manager) -> Result<Vec<AccessLog>, Vec<String>> {
    let desc = descriptors::message("envoy.config.accesslog.v3.AccessLog").unwrap();
    let msg = message_from_text(yaml, load::Format::Yaml, &desc).unwrap_or_else(|e| panic!("{e}"));
    let errs = Errors::default();
    let logs = lower(&[Node::root(&msg, "access_log[0]", &errs)], files);
    let errs: Vec<String> = errs.take().iter().map(|e| e.to_string()).collect();
    if errs.is_empty() {
        Ok(logs)
    } else {
        Err(errs)
    }
}

fn file_yaml(path: &Path, rest: &str) -> String {
    format!(
        "typed_config:\n  \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n  \
         path: {}\n{rest}",
        path.display()
    )
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn lowers_file_loggers_with_every_format_form() {
    let dir = TempDir::new("lower");
    let (_store, files) = manager(DEFAULT_FLUSH_INTERVAL);
    let r = req();
    let rec = full(&r);
    let cases = [
        // Envoy's default without a format, and for an empty deprecated `format`.
        ("", render(&Format::envoy_default(), &rec)),
        ("  format: \"\"\n", render(&Format::envoy_default(), &rec)),
        ("  format: \"%PROTOCOL% %RESPONSE_CODE%\\n\"\n", "HTTP/2 204\n".to_string()),
        (
            "  log_format:\n    text_format_source:\n      inline_string: \"%REQ(:METHOD)% %ROUTE_NAME%\\n\"\n",
            "POST api\n".to_string(),
        ),
        (
            "  log_format:\n    text_format: \"[%ROUTE_NAME%][%REQUESTED_SERVER_NAME%]\\n\"\n    \
             content_type: text/plain\n",
            "[api][api.example.com]\n".to_string(),
        ),
        (
            "  log_format:\n    text_format_source:\n      inline_bytes: JVBST1RPQ09MJQo=\n",
            "HTTP/2\n".to_string(),
        ),
        (
            "  log_format:\n    json_format:\n      code: \"%RESPONSE_CODE%\"\n      \
             up: {host: \"%UPSTREAM_HOST%\", n: 1}\n      l: [\"%BYTES_SENT%\"]\n    \
             json_format_options: {sort_properties: true}\n",
            "{\"code\":204,\"l\":[0],\"up\":{\"host\":\"10.0.2.1:80\",\"n\":1}}\n".to_string(),
        ),
        (
            "  json_format: {code: \"%RESPONSE_CODE%\", a: \"%DURATION%\"}\n",
            "{\"a\":\"226\",\"code\":\"204\"}\n".to_string(),
        ),
        (
            "  typed_json_format: {code: \"%RESPONSE_CODE%\", a: \"%DURATION%\"}\n",
            "{\"a\":226,\"code\":204}\n".to_string(),
        ),
    ];
    for (i, (rest, want)) in cases.iter().enumerate() {
        let path = dir.file(&format!("{i}.log"));
        let logs = lower_yaml(&file_yaml(&path, rest), &files).unwrap_or_else(|e| panic!("{rest}: {e:?}"));
        assert_eq!(logs.len(), 1);
        logs[0].log(&rec);
        files.flush_all();
        assert_eq!(&read(&path), want, "{rest}");
    }

    // A format string read from a file.
    let fmt_path = dir.file("format.txt");
    std::fs::write(&fmt_path, "%CONNECTION_ID%\n").unwrap();
    let path = dir.file("from-file.log");
    let rest = format!(
        "  log_format:\n    text_format_source:\n      filename: {}\n",
        fmt_path.display()
    );
    let logs = lower_yaml(&file_yaml(&path, &rest), &files).unwrap();
    logs[0].log(&rec);
    files.flush_all();
    assert_eq!(read(&path), "42\n");
}

#[test]
fn lowers_stdout_and_stderr_loggers() {
    let (_store, files) = manager(DEFAULT_FLUSH_INTERVAL);
    for yaml in [
        "name: envoy.access_loggers.stdout\ntyped_config:\n  \"@type\": \
         type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog\n",
        "typed_config:\n  \"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog\n  \
         log_format: {text_format_source: {inline_string: \"%RESPONSE_CODE%\\n\"}, omit_empty_values: true}\n",
        "name: envoy.access_loggers.stderr\n",
    ] {
        let logs = lower_yaml(yaml, &files).unwrap_or_else(|e| panic!("{yaml}: {e:?}"));
        assert_eq!(logs.len(), 1, "{yaml}");
    }
}

#[test]
fn lowers_filters() {
    let dir = TempDir::new("filters");
    let (_store, files) = manager(DEFAULT_FLUSH_INTERVAL);
    let path = dir.file("f.log");
    let yaml = file_yaml(
        &path,
        "  format: \"%RESPONSE_CODE%\\n\"\nfilter:\n  or_filter:\n    filters:\n    \
         - status_code_filter: {comparison: {op: GE, value: {default_value: 500, runtime_key: a.b}}}\n    \
         - and_filter:\n        filters:\n        \
         - duration_filter: {comparison: {op: GE, value: {default_value: 1000}}}\n        \
         - not_health_check_filter: {}\n    \
         - response_flag_filter: {flags: [UF, URX]}\n",
    );
    let logs = lower_yaml(&yaml, &files).unwrap();
    let r = req();
    let mut rec = full(&r);
    let log = |rec: &LogRecord<'_>| logs[0].log(rec);
    log(&rec); // 204, 226 ms, no flags: filtered out
    rec.response_code = Some(503);
    log(&rec); // logged
    rec.response_code = Some(200);
    rec.duration = Some(Duration::from_secs(2));
    log(&rec); // logged: slow
    rec.health_check = true;
    log(&rec); // filtered out: a health check
    rec.response_code = Some(201);
    rec.response_flags = &["URX"];
    log(&rec); // logged: a flag
    files.flush_all();
    assert_eq!(read(&path), "503\n200\n201\n");
    assert_eq!(
        logs[0].filter,
        Some(Filter::Or(vec![
            Filter::StatusCode(Comparison {
                op: Op::Ge,
                value: 500
            }),
            Filter::And(vec![
                Filter::Duration(Comparison {
                    op: Op::Ge,
                    value: 1000
                }),
                Filter::NotHealthCheck
            ]),
            Filter::ResponseFlag(vec!["UF", "URX"]),
        ]))
    );
}

#[test]
fn refuses_what_it_does_not_implement_with_the_path() {
    let dir = TempDir::new("refuse");
    let (_store, files) = manager(DEFAULT_FLUSH_INTERVAL);
    let path = dir.file("r.log");
    let file = |rest: &str| file_yaml(&path, rest);
    let at = "access_log[0].typed_config";
    for (yaml, want) in [
        (
            file("  format: \"%FOO% %REQ(:PATH)%\"\n"),
            format!("{at}.format: command operator %FOO% is not supported by Remora"),
        ),
        (
            file("  log_format: {text_format_source: {inline_string: \"%REQ%\"}}\n"),
            format!("{at}.log_format.text_format_source.inline_string: REQ requires parameters"),
        ),
        (
            file(
                "  log_format:\n    text_format_source: {inline_string: x}\n    formatters:\n    \
                 - name: envoy.formatter.any\n      typed_config:\n        \"@type\": \
                 type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n",
            ),
            format!("{at}.log_format.formatters: not supported by Remora"),
        ),
        (
            file("  log_format: {json_format: {a: {b: \"%BAD%\"}}}\n"),
            format!(
                "{at}.log_format.json_format.fields[\"a\"].struct_value.fields[\"b\"].string_value: \
                 command operator %BAD% is not supported by Remora"
            ),
        ),
        (
            file("  log_format: {json_format: {a: true}}\n"),
            format!(
                "{at}.log_format.json_format.fields[\"a\"]: Only string values, nested structs, list values \
                 and number values are supported in structured access log format."
            ),
        ),
        (
            file("  log_format: {text_format_source: {environment_variable: REMORA_SURELY_UNSET_VAR}}\n"),
            format!(
                "{at}.log_format.text_format_source.environment_variable: Environment variable doesn't \
                 exist: REMORA_SURELY_UNSET_VAR"
            ),
        ),
        (
            file("filter: {header_filter: {header: {name: x-a, present_match: true}}}\n"),
            "access_log[0].filter.header_filter: not supported by Remora".to_string(),
        ),
        (
            file("filter: {runtime_filter: {runtime_key: a}}\n"),
            "access_log[0].filter.runtime_filter: not supported by Remora".to_string(),
        ),
        (
            file("filter: {response_flag_filter: {flags: [UF, XX]}}\n"),
            "access_log[0].filter.response_flag_filter.flags[1]: \"XX\" is not one of Envoy's response flags"
                .to_string(),
        ),
        (
            file("filter: {and_filter: {filters: [{not_health_check_filter: {}}]}}\n"),
            "access_log[0].filter.and_filter.filters: an and_filter needs at least 2 filters".to_string(),
        ),
        (
            file("filter: {}\n"),
            "access_log[0].filter: a filter is required".to_string(),
        ),
        (
            file("filter: {status_code_filter: {}}\n"),
            "access_log[0].filter.status_code_filter.comparison: a comparison is required".to_string(),
        ),
        (
            "typed_config:\n  \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n"
                .to_string(),
            format!("{at}.path: a path is required"),
        ),
        (
            file_yaml(&dir.file("no/such/dir/x.log"), ""),
            format!("{at}.path: unable to open file '{}'", dir.file("no/such/dir/x.log").display()),
        ),
        (
            "typed_config:\n  \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n"
                .to_string(),
            format!("{at}: access logger envoy.extensions.filters.http.router.v3.Router is not supported by Remora"),
        ),
        (
            "name: envoy.access_loggers.file\n".to_string(),
            "access_log[0].typed_config: an access logger needs a typed_config".to_string(),
        ),
    ] {
        let errs = match lower_yaml(&yaml, &files) {
            Ok(_) => panic!("accepted:\n{yaml}"),
            Err(e) => e,
        };
        assert!(errs.iter().any(|e| e.starts_with(&want)), "{yaml}\nwant {want}\ngot {errs:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Sinks

fn counter(store: &Store, name: &str) -> u64 {
    store.counter(&format!("filesystem.{name}")).value()
}

fn logger(files: &Manager, path: &Path, fmt: &str) -> AccessLog {
    let yaml = file_yaml(path, &format!("  format: \"{fmt}\"\n"));
    lower_yaml(&yaml, files).unwrap().pop().unwrap()
}

/// Wait (boundedly) for a condition another thread brings about.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn file_sink_buffers_until_flushed_and_counts() {
    let dir = TempDir::new("flush");
    let (store, files) = manager(Duration::from_secs(3600));
    let path = dir.file("a.log");
    let log = logger(&files, &path, "%RESPONSE_CODE%\\n");
    let r = req();
    let rec = full(&r);
    log.log(&rec);
    log.log(&rec);
    assert_eq!(read(&path), "", "nothing is written before a flush");
    assert_eq!(counter(&store, "write_buffered"), 2);
    assert_eq!(store.gauge("filesystem.write_total_buffered").value(), 8);
    files.flush_all();
    assert_eq!(read(&path), "204\n204\n");
    assert_eq!(counter(&store, "write_completed"), 1);
    assert_eq!(counter(&store, "write_failed"), 0);
    assert_eq!(store.gauge("filesystem.write_total_buffered").value(), 0);
    // Appends to an existing file; loggers of one path share it.
    let other = logger(&files, &path, "other\\n");
    assert!(Arc::ptr_eq(&log.sink, &other.sink));
    other.log(&rec);
    log.log(&rec);
    files.flush_all();
    assert_eq!(read(&path), "204\n204\nother\n204\n");
}

#[test]
fn file_sink_flushes_on_its_timer_and_past_64_kib() {
    let dir = TempDir::new("timer");
    let (store, files) = manager(Duration::from_millis(20));
    let path = dir.file("t.log");
    let log = logger(&files, &path, "%RESPONSE_CODE%\\n");
    let r = req();
    log.log(&full(&r));
    eventually("the timer flush", || read(&path) == "204\n");
    eventually("flushed_by_timer", || counter(&store, "flushed_by_timer") >= 1);

    let (store, files) = manager(Duration::from_secs(3600));
    let path = dir.file("big.log");
    let log = logger(&files, &path, "%REQ(X-BIG)%\\n");
    let mut r = req();
    r.headers
        .insert("x-big", HeaderValue::from_str(&"x".repeat(1023)).unwrap());
    let rec = full(&r);
    for _ in 0..64 {
        log.log(&rec);
    }
    assert_eq!(read(&path), "", "64 KiB is not more than 64 KiB");
    log.log(&rec);
    eventually("the size flush", || read(&path).len() == 65 * 1024);
    assert_eq!(counter(&store, "flushed_by_timer"), 0);
}

#[test]
fn reopen_after_rename_writes_a_new_file() {
    let dir = TempDir::new("rotate");
    let (store, files) = manager(Duration::from_secs(3600));
    let path = dir.file("access.log");
    let log = logger(&files, &path, "%CONNECTION_ID%\\n");
    let r = req();
    let mut rec = full(&r);
    rec.connection_id = 1;
    log.log(&rec);
    files.flush_all();
    // logrotate: rename, then /reopen_logs. A line buffered before the reopen goes to the rotated file.
    let rotated = dir.file("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    rec.connection_id = 2;
    log.log(&rec);
    files.reopen_all();
    rec.connection_id = 3;
    log.log(&rec);
    files.flush_all();
    assert_eq!(read(&rotated), "1\n2\n");
    assert_eq!(read(&path), "3\n");
    assert_eq!(counter(&store, "reopen_failed"), 0);
}

#[test]
fn a_removed_directory_is_counted_not_fatal() {
    let dir = TempDir::new("gone");
    let sub = dir.file("logs");
    std::fs::create_dir_all(&sub).unwrap();
    let (store, files) = manager(Duration::from_secs(3600));
    let path = sub.join("access.log");
    let log = logger(&files, &path, "%RESPONSE_CODE%\\n");
    let r = req();
    let rec = full(&r);
    log.log(&rec);
    files.flush_all();
    std::fs::remove_dir_all(&sub).unwrap();
    files.reopen_all();
    assert_eq!(counter(&store, "reopen_failed"), 1);
    // Logging goes on; each flush retries the open, and drops (and counts) what it could not write.
    log.log(&rec);
    files.flush_all();
    assert_eq!(counter(&store, "reopen_failed"), 2);
    assert_eq!(counter(&store, "write_failed"), 1);
    assert_eq!(store.gauge("filesystem.write_total_buffered").value(), 0);
    // The directory comes back: the next flush opens the file again.
    std::fs::create_dir_all(&sub).unwrap();
    log.log(&rec);
    files.flush_all();
    assert_eq!(read(&path), "204\n");
}

#[test]
fn a_full_disk_is_counted_not_fatal() {
    let full_disk = Path::new("/dev/full");
    if !full_disk.exists() {
        return;
    }
    let (store, files) = manager(Duration::from_secs(3600));
    let log = logger(&files, full_disk, "%RESPONSE_CODE%\\n");
    let r = req();
    log.log(&full(&r));
    files.flush_all();
    assert_eq!(counter(&store, "write_failed"), 1);
    assert_eq!(counter(&store, "write_completed"), 0);
    assert_eq!(store.gauge("filesystem.write_total_buffered").value(), 0);
    log.log(&full(&r));
    files.flush_all();
    assert_eq!(counter(&store, "write_failed"), 2);
}

#[test]
fn dropping_the_manager_flushes() {
    let dir = TempDir::new("drop");
    let path = dir.file("d.log");
    let (_store, files) = manager(Duration::from_secs(3600));
    let log = logger(&files, &path, "%RESPONSE_CODE%\\n");
    let r = req();
    log.log(&full(&r));
    drop(files);
    assert_eq!(read(&path), "204\n");
    // A logger that outlives its manager still takes lines without blocking or panicking.
    log.log(&full(&r));
}
