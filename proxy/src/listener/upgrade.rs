//! HTTP/1.1 upgrades (WebSocket and any other `Upgrade` type) through the router, as Envoy's "HTTP upgrades"
//! describe them.
//!
//! A request is an upgrade when its `connection` header lists `upgrade` and it has an `upgrade` header (else
//! both are dropped as hop-by-hop headers and the request is an ordinary one). Whether the upgrade is allowed
//! is decided by Envoy's rule ([`allowed`]): a route's `upgrade_configs` entry for the type decides when it
//! has one (enabled or not), else the connection manager's `upgrade_configs`; a routed upgrade nobody enables
//! is answered 403 with the details `upgrade_failed`, counting `downstream_rq_ws_on_non_ws_route`, and the
//! connection is closed after it (the client may already be sending the new protocol; Envoy closes it too
//! against request smuggling). An upgrade no route matches gets the router's 404.
//!
//! An allowed upgrade goes to a host of the route's cluster on a connection of its own (never pooled) as
//! HTTP/1.1 with `connection: upgrade` and its `upgrade` header. A `101 Switching Protocols` answer is passed
//! back with its `connection: upgrade` and `upgrade`, then the bytes are copied both ways between the
//! upgraded downstream connection and the upstream one until either side closes
//! (`downstream_cx_upgrades_total`, `downstream_cx_upgrades_active`). Any other answer is passed back as an
//! ordinary response. As in Envoy, the route timeout does not apply (the request never ends); the stream idle
//! timeout (the route's `idle_timeout`, else the connection manager's `stream_idle_timeout`) bounds the wait
//! for the answer's head, and closes an upgraded connection on which neither side sent a byte for that long
//! (`downstream_rq_idle_timeout`).

use super::hcm::{error_reply, local_reply, provided_host, SendError, StreamInfo};
use super::Conn;
use crate::body::Body;
use crate::route::{HostRewrite, RouteAction};
use crate::upstream::outlier::Outcome;
use crate::upstream::Cluster;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::time::Instant;

/// The `upgrade` header of an allowed upgrade request, carried in its extensions from the connection manager
/// (which removes the hop-by-hop headers) to the router.
#[derive(Clone, Debug)]
pub struct UpgradeRequest(pub HeaderValue);

/// The request's `upgrade` header when it asks for an upgrade: `connection` lists the `upgrade` token.
pub fn requested(h: &HeaderMap) -> Option<&HeaderValue> {
    let upgrade = h.get(header::UPGRADE)?;
    let listed = h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
    });
    listed.then_some(upgrade)
}

/// Whether an upgrade of type `ty` is allowed (Envoy's `createUpgradeFilterChain`): the route's entry for the
/// type decides when there is one; else the connection manager's, if enabled. Types compare without case.
pub fn allowed(route: Option<&[(String, bool)]>, hcm: &[(String, bool)], ty: &str) -> bool {
    let find = |list: &[(String, bool)]| list.iter().find(|(t, _)| t.eq_ignore_ascii_case(ty)).map(|e| e.1);
    match route.and_then(find) {
        Some(enabled) => enabled,
        None => find(hcm).unwrap_or(false),
    }
}

/// The request's `connection`/`upgrade` pair, for the upstream request and the 101 response.
fn set_upgrade_headers(h: &mut HeaderMap, upgrade: HeaderValue) {
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, upgrade);
}

/// Send an allowed upgrade request to a host of `cluster` and, on 101, join the two connections.
pub(super) async fn forward(
    conn: &Rc<Conn>,
    cluster: &Arc<Cluster>,
    action: &RouteAction,
    mut parts: http::request::Parts,
    body: Incoming,
    upgrade: UpgradeRequest,
    info: &mut StreamInfo,
) -> Response<Body> {
    let hcm = &conn.hcm;
    let cs = &cluster.stats;
    let Some(downstream) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        // Only HTTP/1.1 connections upgrade (HTTP/2 has no `upgrade`).
        hcm.stats.downstream_rq_ws_on_non_ws_route.inc();
        info.details = "upgrade_failed";
        return local_reply(StatusCode::FORBIDDEN, "");
    };
    let provided = match provided_host(conn, cluster, &parts, info, 80).await {
        Ok(h) => h,
        Err(reply) => return *reply,
    };
    let picked = match &provided {
        Some(h) => cluster.index_of(h).map(|(i, h)| (cluster.clone(), i, h)),
        None if cluster.provides_hosts() => None,
        None => cluster.pick_target(&conn.shared.clusters, &mut conn.worker.rng.borrow_mut(), None),
    };
    let Some((target, index, host)) = picked else {
        cs.upstream_cx_none_healthy.inc();
        info.set(super::hcm::Flag::NoHealthyUpstream);
        info.details = "no_healthy_upstream";
        cs.upstream_rq.record(503);
        cs.upstream_rq_completed.inc();
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
    };
    info.upstream = Some((host.address, cluster.clone()));
    target.stats.upstream_rq_total.inc();
    host.stats.rq_total.fetch_add(1, Relaxed);
    let io = match crate::upstream::pool::connect_upstream(&target, &host).await {
        Ok(io) => io,
        Err(e) => {
            target.record_outcome(index, Outcome::ConnectFailed, &mut conn.worker.rng.borrow_mut());
            host.stats.rq_error.fetch_add(1, Relaxed);
            return error_reply(cs, &host, &SendError::Connect(e), info, false, conn);
        }
    };
    let (mut sender, connection) = match hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
    {
        Ok(pair) => pair,
        Err(e) => {
            host.stats.rq_error.fetch_add(1, Relaxed);
            let e = crate::upstream::pool::ConnectError::Handshake(e);
            return error_reply(cs, &host, &SendError::Connect(e), info, false, conn);
        }
    };
    cs.upstream_cx_http1_total.inc();
    tokio::task::spawn_local(async move {
        let _ = connection.with_upgrades().await;
    });

    // Origin form, the host rewritten if the route says so, and the upgrade headers back.
    if let HostRewrite::Literal(v) = &action.host_rewrite {
        parts.headers.insert(header::HOST, v.clone());
    }
    if let Some(a) = parts.uri.authority() {
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
    }
    if let Some(pq) = parts.uri.path_and_query().cloned() {
        parts.uri = http::Uri::from(pq);
    }
    parts.version = http::Version::HTTP_11;
    set_upgrade_headers(&mut parts.headers, upgrade.0.clone());
    let req = http::Request::from_parts(parts, Body::incoming(body));

    let sent_at = Instant::now();
    let idle = action
        .idle_timeout
        .or(hcm.stream_idle_timeout)
        .filter(|d| !d.is_zero());
    let answer = match idle {
        Some(t) => tokio::time::timeout(t, sender.send_request(req)).await.ok(),
        None => Some(sender.send_request(req).await),
    };
    let mut resp = match answer {
        None => return error_reply(cs, &host, &SendError::Idle, info, false, conn),
        Some(Err(e)) => {
            target.record_outcome(index, Outcome::ConnectFailed, &mut conn.worker.rng.borrow_mut());
            host.stats.rq_error.fetch_add(1, Relaxed);
            return error_reply(cs, &host, &SendError::Upstream(e), info, false, conn);
        }
        Some(Ok(r)) => r,
    };
    info.response_at = Some(Instant::now());
    info.details = "via_upstream";
    let status = resp.status();
    cs.upstream_rq.record(status.as_u16());
    cs.upstream_rq_completed.inc();
    target.record_outcome(
        index,
        Outcome::Http(status.as_u16()),
        &mut conn.worker.rng.borrow_mut(),
    );
    if status.is_server_error() {
        host.stats.rq_error.fetch_add(1, Relaxed);
    } else {
        host.stats.rq_success.fetch_add(1, Relaxed);
    }
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let upstream = switching.then(|| hyper::upgrade::on(&mut resp));
    let (mut rparts, rbody) = resp.into_parts();
    let answered = rparts.headers.get(header::UPGRADE).cloned();
    super::hcm::remove_hop_by_hop_response(&mut rparts.headers);
    if !hcm.suppress_envoy_headers {
        rparts.headers.insert(
            super::hcm::X_ENVOY_UPSTREAM_SERVICE_TIME.clone(),
            crate::util::small_number(sent_at.elapsed().as_millis() as u64),
        );
    }
    let Some(upstream) = upstream else {
        // Not upgraded: an ordinary response (its connection is not reused).
        return Response::from_parts(rparts, Body::incoming(rbody));
    };
    set_upgrade_headers(&mut rparts.headers, answered.unwrap_or(upgrade.0));
    let stats = conn.hcm.clone();
    let name = cluster.name().to_string();
    tokio::task::spawn_local(async move {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(cluster = %name, error = %e, "upgrade: a side did not switch protocols");
                return;
            }
        };
        let s = &stats.stats;
        s.downstream_cx_upgrades_total.inc();
        s.downstream_cx_upgrades_active.inc();
        match copy_until_idle(TokioIo::new(down), TokioIo::new(up), idle).await {
            Ok(Ended::Closed) => {}
            Ok(Ended::Idle) => {
                s.downstream_rq_idle_timeout.inc();
                tracing::debug!(cluster = %name, "upgraded connection idle for the stream idle timeout; closed");
            }
            Err(e) => tracing::debug!(cluster = %name, error = %e, "upgraded connection ended with an error"),
        }
        s.downstream_cx_upgrades_active.dec();
    });
    Response::from_parts(rparts, Body::empty())
}

/// How an upgraded connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Either side closed.
    Closed,
    /// Nothing was read from either side for the stream idle timeout.
    Idle,
}

/// Copy bytes both ways until either side closes, or until neither side has sent anything for `idle` (the
/// stream idle timeout, which Envoy applies to upgraded streams as to any other).
async fn copy_until_idle<A, B>(a: A, b: B, idle: Option<std::time::Duration>) -> std::io::Result<Ended>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let last = Rc::new(std::cell::Cell::new(Instant::now()));
    let mut a = Active {
        io: a,
        last: last.clone(),
    };
    let mut b = Active {
        io: b,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    let Some(idle) = idle else {
        return copy.await.map(|_| Ended::Closed);
    };
    tokio::pin!(copy);
    loop {
        tokio::select! {
            res = &mut copy => return res.map(|_| Ended::Closed),
            () = tokio::time::sleep_until(last.get() + idle) => {
                if last.get() + idle <= Instant::now() {
                    return Ok(Ended::Idle);
                }
            }
        }
    }
}

/// An upgraded side that notes when it last gave bytes.
struct Active<T> {
    io: T,
    last: Rc<std::cell::Cell<Instant>>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Active<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.set(Instant::now());
        }
        res
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Active<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[(&str, bool)]) -> Vec<(String, bool)> {
        entries.iter().map(|(t, e)| (t.to_string(), *e)).collect()
    }

    #[test]
    fn allowed_as_envoys_upgrade_table() {
        let on = list(&[("websocket", true)]);
        let off = list(&[("websocket", false)]);
        let none = list(&[]);
        // Envoy's table: the route's setting, when it has one, wins over the connection manager's.
        assert!(allowed(Some(&on), &on, "websocket"));
        assert!(!allowed(Some(&off), &on, "websocket"));
        assert!(allowed(Some(&on), &off, "websocket"));
        assert!(!allowed(Some(&off), &off, "websocket"));
        // No route entry: the connection manager's; nothing configured: refused.
        assert!(allowed(Some(&none), &on, "websocket"));
        assert!(allowed(None, &on, "WebSocket"));
        assert!(!allowed(None, &off, "websocket"));
        assert!(allowed(Some(&on), &none, "WEBSOCKET"));
        assert!(!allowed(Some(&none), &none, "websocket"));
        assert!(!allowed(Some(&on), &on, "h2c"));
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        let ws = h(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(requested(&ws).map(|v| v.as_bytes()), Some(&b"websocket"[..]));
        let two = h(&[
            ("connection", "keep-alive"),
            ("connection", "upgrade"),
            ("upgrade", "x"),
        ]);
        assert!(requested(&two).is_some());
        assert!(requested(&h(&[("upgrade", "websocket")])).is_none());
        assert!(requested(&h(&[("connection", "upgrade")])).is_none());
        assert!(requested(&h(&[("connection", "upgraded"), ("upgrade", "websocket")])).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_upgraded_connection_closes_after_the_idle_timeout_without_bytes() {
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, a) = tokio::io::duplex(64);
        let (b, mut server) = tokio::io::duplex(64);
        let started = Instant::now();
        let copy = copy_until_idle(a, b, Some(Duration::from_secs(10)));
        // Bytes every 6 s, one way then the other, keep it open past the timeout.
        let traffic = async {
            for i in 0..4 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                let (from, to) = if i % 2 == 0 {
                    (&mut client, &mut server)
                } else {
                    (&mut server, &mut client)
                };
                from.write_all(b"ping").await.unwrap();
                let mut got = [0u8; 4];
                to.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"ping");
            }
            Instant::now()
        };
        let (ended, last) = tokio::join!(copy, traffic);
        assert_eq!(ended.unwrap(), Ended::Idle);
        assert_eq!(Instant::now() - last, Duration::from_secs(10));
        assert_eq!(Instant::now() - started, Duration::from_secs(34));

        // Both sides closing ends it without waiting for a timeout.
        let (client, a) = tokio::io::duplex(64);
        let (b, server) = tokio::io::duplex(64);
        drop((client, server));
        let before = Instant::now();
        let ended = copy_until_idle(a, b, Some(Duration::from_secs(10)))
            .await
            .unwrap();
        assert_eq!(ended, Ended::Closed);
        assert_eq!(Instant::now(), before);
    }
}
