//! `retry_policy.per_try_idle_timeout`: each attempt must keep making progress. Envoy arms the timer once the
//! attempt has its connection and has sent the whole request, and restarts it on the response headers and every
//! response frame. Before the response starts, a quiet attempt is retried like a per-try timeout
//! (`upstream_rq_per_try_idle_timeout`; 504 and flag UT when it was the last); once the response streams, the
//! timer keeps watching it, and a stall resets the response.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::json;

use crate::harness::{build_request, reply, within, BoxError, Upstream, DEFAULT_TIMEOUT};
use crate::support::{bootstrap, cluster, routes, Proxy};

const STDOUT_LOG: &str = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";

/// A proxy to `origin` whose route retries `reset` once with a 0.3 s per-try idle timeout, logging each
/// request's status, flags and details to stdout.
async fn proxy(origin: &Upstream) -> Proxy {
    let config = bootstrap(
        routes(vec![json!({"match": {"prefix": "/"}, "route": {
            "cluster": "origin",
            "timeout": "10s",
            "retry_policy": {"retry_on": "reset", "num_retries": 1, "per_try_idle_timeout": "0.3s",
                "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"}}}})]),
        vec![cluster("origin", &[origin.addr()])],
        json!({"access_log": [{"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": STDOUT_LOG,
            "log_format": {"text_format_source": {
                "inline_string": "ACCESS %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%\n"}},
        }}]}),
    );
    Proxy::start(&config, &[]).await
}

/// The proxy's stdout once it has stopped (and flushed its access log).
async fn stopped_stdout(mut proxy: Proxy) -> String {
    proxy.remora.sigterm();
    proxy.remora.wait_exit(DEFAULT_TIMEOUT).await;
    proxy.remora.stdout()
}

#[tokio::test]
async fn an_attempt_that_goes_quiet_is_retried() {
    let origin = Upstream::http1("origin").await;
    let seen = Arc::new(AtomicU64::new(0));
    origin.set_handler(move |_req| {
        let k = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if k == 0 {
                // The first attempt never answers (within the test).
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            reply(200, format!("attempt {}", k + 1))
        }
    });
    let proxy = proxy(&origin).await;
    let r = proxy.h1().get("/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "attempt 2");
    assert_eq!(origin.requests(), 2);
    assert_eq!(
        proxy
            .stat("cluster.origin.upstream_rq_per_try_idle_timeout")
            .await,
        1
    );
    assert_eq!(proxy.stat("cluster.origin.upstream_rq_per_try_timeout").await, 0);
    assert_eq!(proxy.stat("cluster.origin.upstream_rq_retry").await, 1);
}

#[tokio::test]
async fn the_last_quiet_attempt_answers_504_ut() {
    let origin = Upstream::http1("origin").await;
    origin.set_handler(|_req| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        reply(200, "too late")
    });
    let proxy = proxy(&origin).await;
    let r = proxy.h1().get("/", &[]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout");
    assert_eq!(origin.requests(), 2);
    assert_eq!(
        proxy
            .stat("cluster.origin.upstream_rq_per_try_idle_timeout")
            .await,
        2
    );
    assert_eq!(proxy.stat("cluster.origin.upstream_rq_504").await, 1);
    // UT for the timeout, URX for the retries it used up (as Envoy logs a last per-try timeout).
    let log = stopped_stdout(proxy).await;
    assert!(
        log.contains("ACCESS 504 UT,URX upstream_per_try_idle_timeout"),
        "{log}"
    );
}

#[tokio::test]
async fn a_streaming_response_is_watched_frame_by_frame_and_reset_when_it_stalls() {
    const CHUNKS: usize = 8;
    let origin = Upstream::http1("origin").await;
    origin.set_handler(|_req| async {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        tokio::spawn(async move {
            // 8 chunks 60 ms apart (longer in all than the 0.3 s idle timeout), then silence.
            for _ in 0..CHUNKS {
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"tick\n"))))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            tokio::select! {
                _ = tx.closed() => {}
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync();
        Response::new(body)
    });
    let proxy = proxy(&origin).await;
    let resp = proxy
        .h1()
        .send(build_request(Method::GET, "/", &[], Bytes::new()))
        .await
        .unwrap_or_else(|e| panic!("GET /: {e}"));
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received = 0;
    let ended = within(DEFAULT_TIMEOUT, "the response to end", async {
        loop {
            match body.frame().await {
                Some(Ok(f)) => received += f.data_ref().map_or(0, |d| d.len()),
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    })
    .await;
    assert!(ended.is_err(), "the stalled response must be reset, not ended");
    // Every chunk came through: each one restarted the timer.
    assert_eq!(received, CHUNKS * b"tick\n".len());
    assert_eq!(
        proxy
            .stat("cluster.origin.upstream_rq_per_try_idle_timeout")
            .await,
        1
    );
    // Once the response has started it is not retried.
    assert_eq!(origin.requests(), 1);
}
