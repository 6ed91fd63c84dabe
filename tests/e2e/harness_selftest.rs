//! Tests of the harness pieces that need no proxy: the origins, the clients, the load loop and the parsers of
//! the admin answers. If these fail, no e2e result means anything.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::time::Instant;
use tonic::Code;

use crate::harness::{
    build_request, get, h2c_client, http1_client, load, parse_listener_addr, parse_stats, reply,
    validate_command, Budget, GrpcClient, GrpcUpstream, Remora, TempDir, Upstream, BIDI_PATH, CACHE_GET_PATH,
    ECHO_TRAILER, FAIL_DETAIL, UNARY_PATH,
};

#[tokio::test]
async fn upstream_echoes_an_http1_request() {
    let upstream = Upstream::start("alpha").await;
    let (status, headers, body) = get(upstream.addr(), "/some/path?q=1", &[("x-test", "one")]).await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-upstream"], "alpha");
    let echo = crate::harness::Echo::parse(&body);
    assert_eq!(echo.method, "GET");
    assert_eq!(echo.path, "/some/path?q=1");
    assert_eq!(echo.version, "HTTP/1.1");
    assert_eq!(echo.header("x-test"), Some("one"));
    assert_eq!(echo.header("host"), Some(upstream.addr().to_string().as_str()));
    assert_eq!(echo.upstream_name, "alpha");
    assert_eq!(echo.body_len, 0);
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test]
async fn upstream_echoes_an_h2c_request_and_multiplexes_one_connection() {
    let upstream = Upstream::start("beta").await;
    let client = h2c_client(upstream.addr());
    let reply = client
        .post("/p", &[("x-multi", "a"), ("x-multi", "b")], "hello")
        .await;

    assert_eq!(reply.status, StatusCode::OK);
    let echo = reply.echo();
    assert_eq!(echo.method, "POST");
    assert_eq!(echo.version, "HTTP/2.0");
    assert_eq!(
        echo.authority.as_deref(),
        Some(upstream.addr().to_string().as_str())
    );
    assert_eq!(echo.header_values("x-multi"), ["a", "b"]);
    assert_eq!(echo.body_len, 5);

    client.get("/again", &[]).await;
    assert_eq!(upstream.requests(), 2);
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn host_header_sets_the_authority() {
    let upstream = Upstream::start("vhost").await;
    let h1 = http1_client(upstream.addr())
        .get("/", &[("host", "api.example.com")])
        .await
        .echo();
    assert_eq!(h1.header("host"), Some("api.example.com"));
    let h2 = h2c_client(upstream.addr())
        .get("/", &[("host", "api.example.com")])
        .await
        .echo();
    assert_eq!(h2.authority.as_deref(), Some("api.example.com"));
    assert_eq!(h2.header("host"), None);
}

#[tokio::test]
async fn upstream_special_paths() {
    let upstream = Upstream::start("special").await;
    let client = http1_client(upstream.addr());

    let unavailable = client.get("/status/503", &[]).await;
    assert_eq!(unavailable.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(unavailable.echo().upstream_name, "special");
    assert_eq!(
        client.get("/status/204", &[]).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        client.get("/status/abc", &[]).await.status,
        StatusCode::BAD_REQUEST
    );

    let bytes = client.get("/bytes/100000", &[]).await;
    assert_eq!(bytes.body.len(), 100_000);
    assert_eq!(bytes.header("content-length"), Some("100000"));

    let started = Instant::now();
    let delayed = client.get("/delay/50", &[]).await;
    assert_eq!(delayed.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(50));

    let body = Bytes::from(vec![7u8; 70_000]);
    let echoed = h2c_client(upstream.addr()).post("/echo", &[], body.clone()).await;
    assert_eq!(echoed.body, body);
}

#[tokio::test]
async fn single_protocol_upstreams_refuse_the_other_protocol() {
    let h1_only = Upstream::http1("h1").await;
    assert_eq!(
        http1_client(h1_only.addr()).get("/", &[]).await.status,
        StatusCode::OK
    );
    assert!(h2c_client(h1_only.addr()).try_get("/", &[]).await.is_err());

    let h2_only = Upstream::h2c("h2").await;
    assert_eq!(
        h2c_client(h2_only.addr()).get("/", &[]).await.status,
        StatusCode::OK
    );
    assert!(http1_client(h2_only.addr()).try_get("/", &[]).await.is_err());
}

#[tokio::test]
async fn custom_handler_replaces_and_then_restores_the_echo() {
    let upstream = Upstream::start("custom").await;
    upstream.set_handler(|req| async move {
        let mut response = reply(418, format!("teapot for {}", req.uri().path()));
        response.headers_mut().insert("x-custom", "yes".parse().unwrap());
        response
    });
    let client = http1_client(upstream.addr());
    let teapot = client.get("/brew", &[]).await;
    assert_eq!(teapot.status.as_u16(), 418);
    assert_eq!(teapot.text(), "teapot for /brew");
    assert_eq!(teapot.header("x-custom"), Some("yes"));
    assert_eq!(teapot.header("x-upstream"), Some("custom"));

    upstream.clear_handler();
    assert_eq!(client.get("/", &[]).await.echo().upstream_name, "custom");
    assert_eq!(upstream.requests(), 2);
}

#[tokio::test]
async fn dropping_an_upstream_closes_its_port() {
    let upstream = Upstream::start("gone").await;
    let addr = upstream.addr();
    drop(upstream);
    assert!(http1_client(addr).try_get("/", &[]).await.is_err());
}

#[tokio::test]
async fn grpc_unary_round_trip_with_headers_and_trailers() {
    let origin = GrpcUpstream::start("grpc-a").await;
    let client = GrpcClient::connect(origin.addr()).await;

    let outcome = client.unary(UNARY_PATH, "hello", &[(ECHO_TRAILER, "t1")]).await;
    assert_eq!(outcome.code(), Code::Ok);
    assert_eq!(outcome.reply().message, "hello");
    assert_eq!(outcome.reply().upstream, "grpc-a");
    assert_eq!(outcome.reply().method, UNARY_PATH);
    assert_eq!(outcome.upstream(), Some("grpc-a"));
    assert_eq!(outcome.trailers.get(ECHO_TRAILER).unwrap(), "t1");
    assert_eq!(outcome.trailers.get("grpc-status").unwrap(), "0");
    assert!(!outcome.trailers_only);

    let cache = client.unary(CACHE_GET_PATH, "key", &[]).await;
    assert_eq!(cache.reply().method, CACHE_GET_PATH);
    assert_eq!(cache.upstream(), Some("grpc-a"));

    let missing = client.unary("/test.Echo/Nope", "x", &[]).await;
    assert_eq!(missing.code(), Code::Unimplemented);
    assert_eq!(origin.requests(), 3);
}

#[tokio::test]
async fn grpc_unary_failure_keeps_status_and_metadata() {
    let origin = GrpcUpstream::start("grpc-fail").await;
    let client = GrpcClient::connect(origin.addr()).await;

    let outcome = client.unary(UNARY_PATH, "fail:14", &[(ECHO_TRAILER, "t2")]).await;
    assert_eq!(outcome.code(), Code::Unavailable);
    assert!(outcome.trailers_only);
    assert_eq!(outcome.upstream(), Some("grpc-fail"));
    assert_eq!(outcome.trailer(FAIL_DETAIL), Some("requested"));
    assert_eq!(outcome.trailer(ECHO_TRAILER), Some("t2"));
    let status = outcome.result.unwrap_err();
    assert_eq!(status.message(), "failure 14 as requested");
}

#[tokio::test]
async fn grpc_unary_sleep_delays_the_reply() {
    let origin = GrpcUpstream::start("grpc-slow").await;
    let client = GrpcClient::connect(origin.addr()).await;
    let started = Instant::now();
    let slow = client.unary(UNARY_PATH, "sleep:30", &[]).await;
    assert_eq!(slow.reply().message, "sleep:30");
    assert!(started.elapsed() >= Duration::from_millis(30));
}

#[tokio::test]
async fn grpc_bidi_echoes_each_message_as_it_arrives() {
    let origin = GrpcUpstream::start("grpc-bidi").await;
    let client = GrpcClient::connect(origin.addr()).await;
    let mut call = client.bidi(&[(ECHO_TRAILER, "t3")]).await.unwrap();
    assert_eq!(call.upstream(), Some("grpc-bidi"));

    // Each reply arrives before the next message is sent: the stream is interactive, not buffered.
    for message in ["one", "two", "three"] {
        call.send(message).await;
        let reply = call.recv().await.unwrap().unwrap();
        assert_eq!(reply.message, message);
        assert_eq!(reply.method, BIDI_PATH);
    }
    call.send("four").await;
    let (rest, end) = call.finish().await;
    assert_eq!(rest.len(), 1);
    let trailers = end.unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert_eq!(trailers.get(ECHO_TRAILER).unwrap(), "t3");
}

#[tokio::test]
async fn grpc_bidi_failure_arrives_in_trailers_after_the_replies() {
    let origin = GrpcUpstream::start("grpc-bidi-fail").await;
    let client = GrpcClient::connect(origin.addr()).await;
    let mut call = client.bidi(&[(ECHO_TRAILER, "t4")]).await.unwrap();
    call.send("first").await;
    assert_eq!(call.recv().await.unwrap().unwrap().message, "first");
    call.send("fail:9").await;
    let status = call.recv().await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.metadata().get(FAIL_DETAIL).unwrap(), "requested");
    assert_eq!(status.metadata().get(ECHO_TRAILER).unwrap(), "t4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_by_count_over_http1_and_h2c() {
    let upstream = Upstream::start("loaded").await;
    for client in [http1_client(upstream.addr()), h2c_client(upstream.addr())] {
        let report = load(&client, 8, Budget::Count(200), |i| {
            build_request(Method::GET, &format!("/n/{i}"), &[], Bytes::new())
        })
        .await;
        report.assert_all_ok();
        assert_eq!(report.ok, 200);
        assert_eq!(report.statuses.get(&200), Some(&200));
    }
    assert_eq!(upstream.requests(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_for_a_duration_stops_by_itself() {
    let upstream = Upstream::start("timed").await;
    let report = load(
        &h2c_client(upstream.addr()),
        4,
        Budget::For(Duration::from_millis(200)),
        |_| build_request(Method::GET, "/", &[], Bytes::new()),
    )
    .await;
    report.assert_all_ok();
    assert!(report.elapsed >= Duration::from_millis(200));
    assert!(report.elapsed < Duration::from_secs(5), "{report:?}");
    assert_eq!(upstream.requests(), report.ok);
}

#[tokio::test]
async fn load_counts_statuses_and_transport_errors_as_failures() {
    let upstream = Upstream::start("flaky").await;
    let client = http1_client(upstream.addr());
    let report = load(&client, 2, Budget::Count(10), |i| {
        let path = if i % 2 == 0 { "/status/503" } else { "/" };
        build_request(Method::GET, path, &[], Bytes::new())
    })
    .await;
    assert_eq!((report.ok, report.failed), (5, 5));
    assert_eq!(report.statuses.get(&503), Some(&5));

    let addr = upstream.addr();
    drop(upstream);
    let report = load(&http1_client(addr), 2, Budget::Count(4), |_| {
        build_request(Method::GET, "/", &[], Bytes::new())
    })
    .await;
    assert_eq!((report.ok, report.failed), (0, 4));
    assert_eq!(report.errors.values().sum::<u64>(), 4, "{report:?}");
}

#[test]
fn stats_parser_keeps_integers_and_skips_histograms_and_text() {
    let text = "\
cluster.backend.upstream_rq_total: 12
cluster.backend.membership_healthy: 3
server.live: 1
some.gauge: -2
cluster.backend.upstream_rq_time: P0(nan,1) P25(nan,1.025) P50(nan,1.05)
cluster.backend.other_time: No recorded values
server.version_text: \"1.0\"
";
    let stats = parse_stats(text);
    assert_eq!(stats.len(), 4);
    assert_eq!(stats["cluster.backend.upstream_rq_total"], 12);
    assert_eq!(stats["some.gauge"], -2);
    assert!(!stats.contains_key("cluster.backend.upstream_rq_time"));
}

#[test]
fn listener_parser_reads_envoy_listeners_json() {
    let json = r#"{"listener_statuses":[
        {"name":"ingress","local_address":{"socket_address":{"address":"127.0.0.1","port_value":12345}}},
        {"name":"any","local_address":{"socket_address":{"address":"0.0.0.0","port_value":2000}}},
        {"name":"unbound","local_address":{"socket_address":{"address":"127.0.0.1","port_value":0}}}
    ]}"#;
    assert_eq!(
        parse_listener_addr(json, "ingress"),
        Some("127.0.0.1:12345".parse().unwrap())
    );
    assert_eq!(
        parse_listener_addr(json, "any"),
        Some("127.0.0.1:2000".parse().unwrap())
    );
    assert_eq!(parse_listener_addr(json, "unbound"), None);
    assert_eq!(parse_listener_addr(json, "missing"), None);
    assert_eq!(parse_listener_addr("not json", "ingress"), None);
}

/// The one harness path that runs the binary without needing a working proxy: a process that exits before
/// writing its admin address fails the start with that message (and its logs) instead of hanging.
#[tokio::test]
#[should_panic(expected = "before writing its admin address")]
async fn remora_start_fails_fast_when_the_process_exits() {
    Remora::start("{ this is not: [a valid config", &[]).await;
}

/// A Python stand-in that keeps the binary's side of the harness contract (see the script's docs).
fn fake_remora() -> tokio::process::Command {
    let mut command = tokio::process::Command::new("python3");
    command.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/e2e/fake_remora.py"
    ));
    command
}

#[tokio::test]
async fn remora_harness_drives_a_process_through_the_admin_contract() {
    let mut remora = Remora::start_command(fake_remora(), TempDir::new(), "static_resources: {}", &[]).await;
    remora.wait_ready().await;

    let ingress = remora.listener_addr("ingress").await;
    tokio::net::TcpStream::connect(ingress).await.unwrap();

    let stats = remora.stats().await;
    assert!(stats["fake.admin_requests"] >= 2, "{stats:?}");
    assert!(!stats.contains_key("fake.rq_time"));
    let seen = remora.stat("fake.admin_requests").await;
    remora
        .wait_stat("fake.admin_requests", |n| n > seen, Duration::from_secs(5))
        .await;
    assert_eq!(remora.stat_opt("fake.missing").await, None);

    assert_eq!(remora.admin_post("/healthcheck/fail").await.0, StatusCode::OK);
    assert_eq!(
        remora.admin_get("/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    remora
        .wait_log("health check failed by admin", Duration::from_secs(5))
        .await;

    remora.sigterm();
    let status = remora.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{status}");
    assert!(remora.stderr().contains("caught SIGTERM"));
    assert!(remora.stdout().contains("fake remora serving"));
}

#[tokio::test]
#[should_panic(expected = "exited (exit status: 3) before writing its admin address")]
async fn remora_start_reports_an_early_exit_with_its_status() {
    Remora::start_command(fake_remora(), TempDir::new(), "crash", &[]).await;
}

#[tokio::test]
async fn validate_reports_exit_code_and_output() {
    let (code, stdout, _) = validate_command(fake_remora(), "static_resources: {}").await;
    assert_eq!(code, 0);
    assert!(stdout.contains("OK"));
    let (code, _, stderr) = validate_command(fake_remora(), "invalid").await;
    assert_eq!(code, 1);
    assert!(stderr.contains("invalid"));
}

#[tokio::test]
#[should_panic(expected = "no stat \"fake.typo\"")]
async fn stat_panics_on_an_unknown_name() {
    let remora = Remora::start_command(fake_remora(), TempDir::new(), "static_resources: {}", &[]).await;
    remora.stat("fake.typo").await;
}
