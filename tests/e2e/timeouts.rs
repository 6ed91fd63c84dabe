//! The connection manager's `request_timeout` and a route's `idle_timeout`.

use serde_json::json;

use crate::harness::Upstream;
use crate::support::{bootstrap, cluster, routes, Proxy, RawConn};

#[tokio::test]
async fn request_timeout_answers_408_when_the_body_does_not_arrive_in_time() {
    let origin = Upstream::start("origin").await;
    let config = bootstrap(
        routes(vec![
            json!({"match": {"prefix": "/"}, "route": {"cluster": "origin"}}),
        ]),
        vec![cluster("origin", &[origin.addr()])],
        json!({"request_timeout": "0.3s"}),
    );
    let proxy = Proxy::start(&config, &[]).await;
    let mut raw = RawConn::connect(proxy.addr).await;
    // Promise ten bytes of body, send five, and stall.
    raw.send(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nhello")
        .await;
    let resp = raw.response(false).await;
    assert_eq!(resp.status, 408, "{resp:?}");
    assert_eq!(resp.body, b"request timeout");
    assert_eq!(proxy.stat("http.ingress.downstream_rq_timeout").await, 1);
}

#[tokio::test]
async fn a_route_idle_timeout_overrides_the_stream_idle_timeout() {
    let origin = Upstream::start("origin").await;
    let config = bootstrap(
        routes(vec![
            json!({"match": {"prefix": "/idle"}, "route": {"cluster": "origin", "timeout": "0s", "idle_timeout": "0.2s", "prefix_rewrite": "/delay/3000"}}),
            json!({"match": {"prefix": "/"}, "route": {"cluster": "origin", "timeout": "0s"}}),
        ]),
        vec![cluster("origin", &[origin.addr()])],
        json!({"stream_idle_timeout": "60s"}),
    );
    let proxy = Proxy::start(&config, &[]).await;
    let r = proxy.h1().get("/idle", &[]).await;
    assert_eq!(r.status, 504);
    assert_eq!(&r.body[..], b"stream timeout");
    assert_eq!(proxy.stat("http.ingress.downstream_rq_idle_timeout").await, 1);
    // Other routes keep the connection manager's timeout.
    assert_eq!(proxy.h1().get("/delay/300", &[]).await.status, 200);
}

#[tokio::test]
async fn the_stream_idle_timeout_restarts_on_every_response_frame() {
    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};

    let origin = Upstream::start("origin").await;
    // Eight chunks 80 ms apart: 560 ms in all, longer than the 0.3 s stream idle timeout, never idle for long.
    origin.set_handler(|_req| async {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, crate::harness::BoxError>>(1);
        tokio::spawn(async move {
            for i in 0..8 {
                if i > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(80)).await;
                }
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"tick\n"))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        http::Response::new(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync())
    });
    let config = bootstrap(
        routes(vec![
            json!({"match": {"prefix": "/"}, "route": {"cluster": "origin", "timeout": "0s"}}),
        ]),
        vec![cluster("origin", &[origin.addr()])],
        json!({"stream_idle_timeout": "0.3s"}),
    );
    let proxy = Proxy::start(&config, &[]).await;
    let r = proxy.h1().get("/stream", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 8 * b"tick\n".len());
    assert_eq!(proxy.stat("http.ingress.downstream_rq_idle_timeout").await, 0);
}
