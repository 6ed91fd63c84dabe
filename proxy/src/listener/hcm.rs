//! The HTTP connection manager and router: one request from arrival to response.
//!
//! `handle` is the per-request entry point hyper calls. It applies the connection manager's header rules
//! (request id, `x-forwarded-*`, hop-by-hop removal), matches a route on the current route table, and either
//! answers locally (no route, direct response, redirect, errors) or forwards to a host of the route's cluster
//! over a pooled connection. Local replies carry Envoy's status, body and response flag.

use super::config::{HcmConfig, ServerHeader, Underscores};
use super::Conn;
use crate::body::{Body, EndOfStream, Expired, Tee, TryIdle, Watchdog};
use crate::retry::{ResetReason, RetryPolicy, RetryState, RetryStatus, Timeouts};
use crate::route::{Action, ClusterSpecifier, HostRewrite, Redirect, RouteAction, RouteTable};
use crate::upstream::breaker::Priority;
use crate::upstream::outlier::Outcome;
use crate::upstream::pool::ConnectError;
use crate::upstream::{Cluster, Host, Protocol};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;
use tokio::time::Instant;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// `https` on a TLS connection, else `http`.
fn scheme_value(tls: bool) -> HeaderValue {
    HeaderValue::from_static(if tls { "https" } else { "http" })
}
static X_ENVOY_INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");
pub(super) static X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
static X_ENVOY_EXPECTED_RQ_TIMEOUT_MS: HeaderName = HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
static X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
static X_ENVOY_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
static X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers an untrusted (non-internal) client may not set, removed as Envoy's connection manager does.
static INTERNAL_ONLY: [HeaderName; 13] = [
    HeaderName::from_static("x-envoy-retriable-status-codes"),
    HeaderName::from_static("x-envoy-retriable-header-names"),
    HeaderName::from_static("x-envoy-retry-on"),
    HeaderName::from_static("x-envoy-retry-grpc-on"),
    HeaderName::from_static("x-envoy-max-retries"),
    HeaderName::from_static("x-envoy-upstream-alt-stat-name"),
    HeaderName::from_static("x-envoy-upstream-rq-timeout-ms"),
    HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms"),
    HeaderName::from_static("x-envoy-upstream-rq-timeout-alt-response"),
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms"),
    HeaderName::from_static("x-envoy-force-trace"),
    HeaderName::from_static("x-envoy-ip-tags"),
    HeaderName::from_static("x-envoy-original-url"),
];

/// Envoy's response flags (`%RESPONSE_FLAGS%`), in Envoy's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Flag {
    FailedLocalHealthCheck,
    NoHealthyUpstream,
    UpstreamRequestTimeout,
    UpstreamRemoteReset,
    UpstreamConnectionFailure,
    UpstreamConnectionTermination,
    UpstreamOverflow,
    NoRouteFound,
    NoClusterFound,
    DownstreamConnectionTermination,
    UpstreamProtocolError,
    StreamIdleTimeout,
    RateLimited,
    UpstreamRetryLimitExceeded,
    DnsResolutionFailed,
}

impl Flag {
    /// Every flag Remora sets, in the order Envoy prints them.
    pub const ALL: [Flag; 15] = [
        Flag::FailedLocalHealthCheck,
        Flag::NoHealthyUpstream,
        Flag::UpstreamRequestTimeout,
        Flag::UpstreamRemoteReset,
        Flag::UpstreamConnectionFailure,
        Flag::UpstreamConnectionTermination,
        Flag::UpstreamOverflow,
        Flag::NoRouteFound,
        Flag::RateLimited,
        Flag::DownstreamConnectionTermination,
        Flag::UpstreamRetryLimitExceeded,
        Flag::StreamIdleTimeout,
        Flag::UpstreamProtocolError,
        Flag::NoClusterFound,
        Flag::DnsResolutionFailed,
    ];

    pub fn short(self) -> &'static str {
        match self {
            Flag::FailedLocalHealthCheck => "LH",
            Flag::NoHealthyUpstream => "UH",
            Flag::UpstreamRequestTimeout => "UT",
            Flag::UpstreamRemoteReset => "UR",
            Flag::UpstreamConnectionFailure => "UF",
            Flag::UpstreamConnectionTermination => "UC",
            Flag::UpstreamOverflow => "UO",
            Flag::NoRouteFound => "NR",
            Flag::NoClusterFound => "NC",
            Flag::DownstreamConnectionTermination => "DC",
            Flag::UpstreamProtocolError => "UPE",
            Flag::StreamIdleTimeout => "SI",
            Flag::RateLimited => "RL",
            Flag::UpstreamRetryLimitExceeded => "URX",
            Flag::DnsResolutionFailed => "DF",
        }
    }
}

/// What the access log and stats learn about one request.
#[derive(Clone, Default)]
pub struct StreamInfo {
    /// Set flags, one bit per [`Flag`] (by discriminant).
    pub flags: u32,
    pub details: &'static str,
    /// The host of the last attempt and its cluster's stat name (`%UPSTREAM_HOST%`, `%UPSTREAM_CLUSTER%`).
    pub upstream: Option<(std::net::SocketAddr, Arc<Cluster>)>,
    /// When the upstream response's headers arrived (`%RESPONSE_DURATION%`).
    pub response_at: Option<Instant>,
    /// The route matched (`%ROUTE_NAME%`).
    pub route: Option<MatchedRoute>,
    /// Request body bytes read from the client, counted only while access logs need them.
    pub rx_bytes: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub transport_failure: Option<String>,
}

impl StreamInfo {
    pub fn set(&mut self, f: Flag) {
        self.flags |= 1 << f as u8;
    }

    pub fn has(&self, f: Flag) -> bool {
        self.flags & (1 << f as u8) != 0
    }

    /// The set flags' short names in Envoy's order.
    pub fn flag_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        Flag::ALL.iter().filter(|f| self.has(**f)).map(|f| f.short())
    }
}

/// The route a request matched, carried in the request's extensions through the HTTP filters to the router.
#[derive(Clone)]
pub struct MatchedRoute {
    pub table: Arc<RouteTable>,
    pub vhost: usize,
    pub route: usize,
}

/// The entry point for each request on a downstream connection.
pub async fn handle(conn: Rc<Conn>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let hcm = conn.hcm.clone();
    let s = &hcm.stats;
    s.downstream_rq_total.inc();
    s.downstream_rq_active.inc();
    let h2 = req.version() == Version::HTTP_2;
    conn.saw_request(h2);
    if h2 {
        s.downstream_rq_http2_total.inc();
    } else {
        s.downstream_rq_http1_total.inc();
    }
    let head_only = req.method() == http::Method::HEAD;
    let grpc = crate::route::is_grpc(req.headers());
    let mut info = StreamInfo::default();
    let log = (!hcm.access_logs.is_empty()).then(|| {
        info.rx_bytes = Some(Arc::new(std::sync::atomic::AtomicU64::new(0)));
        Box::new(LogState {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            start_time: std::time::SystemTime::now(),
            response_headers: HeaderMap::new(),
            trailers: None,
            info: StreamInfo::default(),
        })
    });
    let mut log = log;
    let prepared = prepare(&conn, &hcm, req, &mut info);
    if let (Some(l), Ok((req, _))) = (log.as_mut(), &prepared) {
        // The headers as the router sees them (with `x-request-id` and `x-forwarded-*`), and the normalized path.
        l.headers = req.headers().clone();
        l.uri = req.uri().clone();
    }
    let resp = match prepared {
        Err(local) => local,
        Ok((req, matched)) if hcm.filters.is_empty() => dispatch(&conn, req, matched, &mut info, start).await,
        Ok((mut req, matched)) => {
            if let Some(m) = &matched {
                if let Some(rl) = m.table.local_rate_limit(m.vhost, m.route) {
                    req.extensions_mut()
                        .insert(crate::filters::local_ratelimit::RouteLocalRateLimit(rl.clone()));
                }
                req.extensions_mut().insert(m.clone());
            }
            req.extensions_mut().insert(info.clone());
            let mut resp = conn.call_filters(req).await;
            if let Some(i) = resp.extensions_mut().remove::<StreamInfo>() {
                let rx = info.rx_bytes.take();
                info = i;
                info.rx_bytes = rx;
            }
            if let Some(r) = resp.extensions().get::<crate::filters::FilterReply>() {
                info.details = r.details;
                match r.flag {
                    Some(crate::filters::ResponseFlag::RateLimited) => info.set(Flag::RateLimited),
                    Some(crate::filters::ResponseFlag::FailedLocalHealthCheck) => {
                        info.set(Flag::FailedLocalHealthCheck)
                    }
                    None => {}
                }
            }
            resp
        }
    };
    let resp = if grpc && info.details != "via_upstream" {
        grpc_local_reply(resp)
    } else {
        resp
    };
    let (mut parts, body) = resp.into_parts();
    finish_response_headers(&hcm, &mut parts.headers, conn.draining());
    let status = parts.status.as_u16();
    let log = log.map(|mut l| {
        l.response_headers = parts.headers.clone();
        l.info = info;
        l
    });
    let done = RequestDone {
        hcm: hcm.clone(),
        conn: conn.clone(),
        start,
        status,
        log,
    };
    let body = if head_only { Body::empty() } else { body };
    Ok(Response::from_parts(parts, body.on_end(Box::new(done))))
}

/// Per-request completion: counted when the response body has gone out (or the client went away).
struct RequestDone {
    hcm: Arc<HcmConfig>,
    conn: Rc<Conn>,
    start: Instant,
    status: u16,
    /// What the access logs need, kept only when the connection manager has any.
    log: Option<Box<LogState>>,
}

/// A request's headers and outcome, kept for the access logs until the response is done.
struct LogState {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    start_time: std::time::SystemTime,
    response_headers: HeaderMap,
    trailers: Option<HeaderMap>,
    info: StreamInfo,
}

impl RequestDone {
    fn write_logs(&self, l: &LogState, complete: bool, bytes: u64) {
        use crate::access_log::LogRecord;
        let mut flags: Vec<&'static str> = l.info.flag_names().collect();
        if !complete {
            flags.push(Flag::DownstreamConnectionTermination.short());
        }
        let route_name = l.info.route.as_ref().and_then(|m| {
            let r = &m.table.virtual_hosts.get(m.vhost)?.routes.get(m.route)?.name;
            (!r.is_empty()).then_some(r.as_str())
        });
        let mut rec = LogRecord::new(&l.method, &l.uri, l.version, &l.headers, l.start_time);
        rec.response_code = Some(self.status);
        rec.response_headers = Some(&l.response_headers);
        rec.response_trailers = l.trailers.as_ref();
        rec.duration = Some(self.start.elapsed());
        rec.response_duration = l
            .info
            .response_at
            .map(|t| t.saturating_duration_since(self.start));
        rec.bytes_received = l.info.rx_bytes.as_ref().map_or(0, |c| c.load(Relaxed));
        rec.bytes_sent = bytes;
        rec.response_flags = &flags;
        rec.response_code_details = l.info.details;
        rec.upstream_host = l.info.upstream.as_ref().map(|(a, _)| *a);
        rec.upstream_cluster = l.info.upstream.as_ref().map(|(_, c)| c.config.stat_name.as_str());
        rec.upstream_transport_failure_reason = l.info.transport_failure.as_deref();
        rec.downstream_remote_address = Some(self.conn.remote);
        rec.downstream_local_address = Some(self.conn.local);
        rec.route_name = route_name;
        rec.connection_id = self.conn.id;
        for log in &self.hcm.access_logs {
            log.log(&rec);
        }
    }
}

impl EndOfStream for RequestDone {
    fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(l) = self.log.as_mut() {
            l.trailers = Some(trailers.clone());
        }
    }

    fn end(&mut self, complete: bool, bytes: u64) {
        if let Some(l) = self.log.take() {
            self.write_logs(&l, complete, bytes);
        }
        let s = &self.hcm.stats;
        s.downstream_rq_active.dec();
        s.downstream_rq_completed.inc();
        s.downstream_rq.record_class(self.status);
        s.listener_rq_completed.inc();
        s.listener_rq.record_class(self.status);
        s.downstream_rq_time
            .record(self.start.elapsed().as_millis() as u64);
        if !complete {
            s.downstream_rq_tx_reset.inc();
        }
    }
}

fn finish_response_headers(hcm: &HcmConfig, h: &mut HeaderMap, draining: bool) {
    match hcm.server_header {
        ServerHeader::Overwrite => {
            h.insert(header::SERVER, hcm.server_name.clone());
        }
        ServerHeader::AppendIfAbsent => {
            h.entry(header::SERVER).or_insert_with(|| hcm.server_name.clone());
        }
        ServerHeader::PassThrough => {}
    }
    h.entry(header::DATE).or_insert_with(crate::util::http_date);
    if draining {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// A local reply to a gRPC request, as Envoy's `sendLocalReply` makes it: status 200, `content-type:
/// application/grpc`, the HTTP status mapped to a `grpc-status`, the body as `grpc-message`, no body (a
/// trailers-only response).
fn grpc_local_reply(resp: Response<Body>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    if parts.status == StatusCode::OK {
        return Response::from_parts(parts, body);
    }
    let code = match parts.status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    };
    // The local reply bodies are static text; recover it from the content-length'd full body.
    let message = local_reply_text(&body);
    let mut r = Response::new(Body::empty());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    if !message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc(&message)) {
            h.insert("grpc-message", v);
        }
    }
    for (k, v) in parts.headers.iter() {
        if k == header::CONTENT_TYPE || k == header::CONTENT_LENGTH {
            continue;
        }
        h.append(k.clone(), v.clone());
    }
    r
}

/// The text of a local reply's body (local replies are one in-memory chunk).
fn local_reply_text(body: &Body) -> String {
    body.full_bytes()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// gRPC's percent-encoding of `grpc-message`: everything outside printable ASCII, and `%`, as `%XX`.
fn percent_encode_grpc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A local reply as Envoy builds it: `text/plain` with the body, or no body at all.
pub fn local_reply(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    if !body.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    r
}

fn local_reply_owned(status: StatusCode, body: String) -> Response<Body> {
    let len = body.len();
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    if len > 0 {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    r
}

/// The connection manager's work before routing: header rules, the authority, and the route match.
#[allow(clippy::result_large_err)]
fn prepare(
    conn: &Rc<Conn>,
    hcm: &Arc<HcmConfig>,
    req: Request<Incoming>,
    info: &mut StreamInfo,
) -> Result<(Request<Incoming>, Option<MatchedRoute>), Response<Body>> {
    let (mut parts, body) = req.into_parts();
    // hyper enforces the header limit from 8 KiB up; a smaller `max_request_headers_kb` is checked here.
    if hcm.max_request_headers_kb < 8 {
        let size: usize = parts
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
            + parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
        if size > hcm.max_request_headers_kb as usize * 1024 {
            info.details = "http1.headers_too_large";
            return Err(local_reply(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large",
            ));
        }
    }
    if hcm.underscores != Underscores::Allow && parts.headers.keys().any(|k| k.as_str().contains('_')) {
        if hcm.underscores == Underscores::Reject {
            info.details = "http1.unexpected_underscore";
            return Err(local_reply(StatusCode::BAD_REQUEST, "Bad Request"));
        }
        let names: Vec<HeaderName> = parts
            .headers
            .keys()
            .filter(|k| k.as_str().contains('_'))
            .cloned()
            .collect();
        for n in names {
            parts.headers.remove(n);
        }
    }
    if hcm.path.enabled() && parts.method != http::Method::CONNECT {
        normalize_path(hcm, &mut parts, info)?;
    }
    // An upgrade's headers are hop-by-hop: kept aside here, put back by the router if the upgrade is allowed.
    let upgrade = super::upgrade::requested(&parts.headers).cloned();
    mutate_request_headers(conn, hcm, &mut parts.headers);

    // The authority (`:authority`, or `host`), held as shared bytes: no copy.
    let authority = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).unwrap_or(HeaderValue::from_static("")),
        None => match parts.headers.get(header::HOST) {
            Some(h) => h.clone(),
            None => {
                info.details = "missing_host_header";
                return Err(local_reply(StatusCode::BAD_REQUEST, ""));
            }
        },
    };
    let authority: HeaderValue = authority;
    let table = hcm.routes.load_full();
    hcm.stats.rq_total.inc();
    let line = crate::route::RequestLine {
        method: &parts.method,
        authority: authority.to_str().unwrap_or(""),
        uri: &parts.uri,
        scheme: parts
            .uri
            .scheme_str()
            .unwrap_or(if conn.tls { "https" } else { "http" }),
    };
    let matched = table
        .route_index(&line, &parts.headers)
        .map(|(vhost, route)| MatchedRoute {
            table: table.clone(),
            vhost,
            route,
        });
    // Envoy decides on a routed upgrade before the filter chain (an unrouted one gets the router's 404).
    if let (Some(up), Some(m)) = (upgrade, &matched) {
        let route_upgrades = match &m.table.virtual_hosts[m.vhost].routes[m.route].action {
            Action::Forward(a) => Some(a.upgrades.as_slice()),
            _ => None,
        };
        if !super::upgrade::allowed(route_upgrades, &hcm.upgrades, up.to_str().unwrap_or("")) {
            hcm.stats.downstream_rq_ws_on_non_ws_route.inc();
            info.details = "upgrade_failed";
            // The client may already be sending the new protocol: the connection ends with this answer.
            let mut r = local_reply(StatusCode::FORBIDDEN, "");
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Err(r);
        }
        parts.extensions.insert(super::upgrade::UpgradeRequest(up));
    }
    Ok((Request::from_parts(parts, body), matched))
}

/// The connection manager's path options (see [`super::path`]): the request's path is replaced, or the
/// request is answered 400 or redirected (307) to its normalized path.
#[allow(clippy::result_large_err)]
fn normalize_path(
    hcm: &HcmConfig,
    parts: &mut http::request::Parts,
    info: &mut StreamInfo,
) -> Result<(), Response<Body>> {
    use super::path::Outcome;
    let Some(pq) = parts
        .uri
        .path_and_query()
        .filter(|pq| pq.as_str().starts_with('/'))
    else {
        return Ok(());
    };
    let rejected = || {
        hcm.stats.downstream_rq_failed_path_normalization.inc();
        local_reply(StatusCode::BAD_REQUEST, "")
    };
    let reply = match hcm.path.apply(pq.as_str()) {
        Outcome::Continue(None) => return Ok(()),
        Outcome::Continue(Some(new)) => match PathAndQuery::try_from(new) {
            Ok(pq) => {
                let mut up = std::mem::take(&mut parts.uri).into_parts();
                up.path_and_query = Some(pq);
                parts.uri = Uri::from_parts(up).unwrap_or_default();
                return Ok(());
            }
            Err(_) => rejected(),
        },
        Outcome::Reject => rejected(),
        // gRPC clients do not follow redirects: Envoy rejects them instead.
        Outcome::Redirect(_) if crate::route::is_grpc(&parts.headers) => rejected(),
        Outcome::Redirect(location) => match HeaderValue::from_str(&location) {
            Ok(location) => {
                hcm.stats.downstream_rq_redirected_with_normalized_path.inc();
                let mut r = local_reply(StatusCode::TEMPORARY_REDIRECT, "");
                r.headers_mut().insert(header::LOCATION, location);
                r
            }
            Err(_) => rejected(),
        },
    };
    info.details = "path_normalization_failed";
    Err(reply)
}

/// The router: a local reply for no route, a direct response or a redirect, else forward to the cluster.
async fn dispatch(
    conn: &Rc<Conn>,
    req: Request<Incoming>,
    matched: Option<MatchedRoute>,
    info: &mut StreamInfo,
    start: Instant,
) -> Response<Body> {
    let hcm = &conn.hcm;
    let Some(m) = matched else {
        hcm.stats.no_route.inc();
        info.set(Flag::NoRouteFound);
        info.details = "route_not_found";
        return local_reply(StatusCode::NOT_FOUND, "");
    };
    info.route = Some(m.clone());
    let (mut parts, body) = req.into_parts();
    let table = &m.table;
    let (vhost, route) = (
        &table.virtual_hosts[m.vhost],
        &table.virtual_hosts[m.vhost].routes[m.route],
    );

    let action = match &route.action {
        Action::Direct { status, body } => {
            hcm.stats.rq_direct_response.inc();
            info.details = "direct_response";
            let mut r = match body {
                Some(b) => {
                    let mut r = Response::new(Body::full(b.clone()));
                    r.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                    r.headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
                    r
                }
                None => Response::new(Body::empty()),
            };
            *r.status_mut() = *status;
            apply_response_mods(table, vhost, route, r.headers_mut());
            return r;
        }
        Action::Redirect(redirect) => {
            hcm.stats.rq_redirect.inc();
            info.details = "direct_response";
            let authority = match parts.uri.authority() {
                Some(a) => a.as_str().to_string(),
                None => parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
            };
            let mut r = redirect_response(redirect, &authority, &parts.uri, conn);
            apply_response_mods(table, vhost, route, r.headers_mut());
            return r;
        }
        Action::Forward(a) => a,
    };

    // Which cluster.
    let snapshot = conn.shared.clusters.load();
    let cluster = match &action.cluster {
        ClusterSpecifier::Cluster(id, _) => snapshot.get(*id),
        ClusterSpecifier::Weighted { clusters, total } => {
            let mut pick = conn.worker.rng.borrow_mut().below(*total as usize) as u32;
            let mut chosen = None;
            for (id, _, w) in clusters {
                if pick < *w {
                    chosen = snapshot.get(*id);
                    break;
                }
                pick -= w;
            }
            chosen
        }
        ClusterSpecifier::Header(name) => parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|n| snapshot.by_name(n)),
    };
    let Some(cluster) = cluster.cloned() else {
        hcm.stats.no_cluster.inc();
        info.set(Flag::NoClusterFound);
        info.details = "cluster_not_found";
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "");
    };
    drop(snapshot);

    if parts.method == http::Method::CONNECT {
        return tunnel(conn, &cluster, parts, info).await;
    }

    // Route, virtual host and route-table header changes, most specific first (the table's apply last).
    route.request_headers.apply(&mut parts.headers);
    vhost.request_headers.apply(&mut parts.headers);
    table.request_headers.apply(&mut parts.headers);
    rewrite_path(action, route, &mut parts, !hcm.suppress_envoy_headers);

    if let Some(up) = parts.extensions.remove::<super::upgrade::UpgradeRequest>() {
        let mut resp = super::upgrade::forward(conn, &cluster, action, parts, body, up, info).await;
        apply_response_mods(table, vhost, route, resp.headers_mut());
        return resp;
    }
    let buffer_limit = route.per_request_buffer_limit.or(vhost.per_request_buffer_limit);
    let mut resp = forward(
        conn,
        &cluster,
        action,
        vhost,
        buffer_limit,
        parts,
        body,
        info,
        start,
    )
    .await;
    apply_response_mods(table, vhost, route, resp.headers_mut());
    resp
}

fn apply_response_mods(
    table: &crate::route::RouteTable,
    vhost: &crate::route::VirtualHost,
    route: &crate::route::Route,
    h: &mut HeaderMap,
) {
    route.response_headers.apply(h);
    vhost.response_headers.apply(h);
    table.response_headers.apply(h);
}

/// Envoy's `mutateRequestHeaders` for what Remora implements: hop-by-hop removal, `x-forwarded-for` and
/// `-proto`, internal-only headers, `x-request-id`.
fn mutate_request_headers(conn: &Conn, hcm: &HcmConfig, h: &mut HeaderMap) {
    // One pass over the names decides which removals are needed at all: most requests carry none of these
    // headers, and a removal is a hash look-up each.
    let mut hop = false;
    let mut envoy = false;
    for k in h.keys() {
        let k = k.as_str();
        match k {
            "connection" | "upgrade" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "expect"
            | "te" => hop = true,
            _ if k.starts_with("x-envoy-") => envoy = true,
            _ => {}
        }
    }
    if hop {
        remove_hop_by_hop_request(h);
    }
    let mut edge = false;
    if hcm.use_remote_address {
        edge = true;
        if !hcm.skip_xff_append {
            let ip = if conn.remote.ip().is_loopback() {
                conn.local.ip()
            } else {
                conn.remote.ip()
            };
            append_xff(h, ip);
        }
        if hcm.xff_num_trusted_hops == 0 {
            h.insert(X_FORWARDED_PROTO.clone(), scheme_value(conn.tls));
        }
    }
    // One look-up: set unless the client (or the edge rule above) did.
    h.entry(X_FORWARDED_PROTO.clone())
        .or_insert_with(|| scheme_value(conn.tls));
    // No address is internal unless configured (Envoy's default since 1.33): clients may not steer retries
    // and timeouts with x-envoy-* headers.
    if envoy {
        h.remove(&X_ENVOY_INTERNAL);
        for n in &INTERNAL_ONLY {
            h.remove(n);
        }
    }
    if hcm.generate_request_id {
        let force = edge && !hcm.preserve_external_request_id;
        if force {
            h.insert(X_REQUEST_ID.clone(), conn.worker.new_request_id());
        } else {
            h.entry(X_REQUEST_ID.clone())
                .or_insert_with(|| conn.worker.new_request_id());
        }
    }
}

/// Hop-by-hop request headers, the tokens `connection` lists, `expect: 100-continue` (answered here) and a
/// `te` other than `trailers`.
fn remove_hop_by_hop_request(h: &mut HeaderMap) {
    if let Some(c) = h.get(header::CONNECTION).cloned() {
        if let Ok(c) = c.to_str() {
            for token in c.split(',') {
                let token = token.trim();
                if !token.is_empty() && !token.eq_ignore_ascii_case("te") {
                    if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                        h.remove(n);
                    }
                }
            }
        }
        h.remove(header::CONNECTION);
    }
    h.remove(header::UPGRADE);
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    // The connection manager answers `expect: 100-continue` itself (hyper sends the 100 when the body is read).
    if h.get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        h.remove(header::EXPECT);
    }
    // `te` may only carry `trailers` upstream.
    if let Some(te) = h.get(header::TE) {
        if !te.as_bytes().eq_ignore_ascii_case(b"trailers") {
            h.remove(header::TE);
        }
    }
}

fn append_xff(h: &mut HeaderMap, ip: std::net::IpAddr) {
    let mut v = String::with_capacity(64);
    if let Some(old) = h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        v.push_str(old);
        v.push(',');
    }
    let _ = write!(v, "{ip}");
    if let Ok(v) = HeaderValue::from_str(&v) {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
}

/// `x_envoy_original_path`: keep the path before the rewrite in `x-envoy-original-path` (unless the router
/// suppresses its `x-envoy-*` headers).
fn rewrite_path(
    action: &RouteAction,
    route: &crate::route::Route,
    parts: &mut http::request::Parts,
    x_envoy_original_path: bool,
) {
    let new_path = if let Some(prefix) = &action.prefix_rewrite {
        let path = parts.uri.path();
        let matched_len = match &route.matcher.path {
            crate::route::PathMatch::Prefix(p)
            | crate::route::PathMatch::Path(p)
            | crate::route::PathMatch::Separated(p) => p.len().min(path.len()),
            crate::route::PathMatch::Regex(_) | crate::route::PathMatch::Connect => 0,
        };
        Some(format!("{prefix}{}", &path[matched_len..]))
    } else {
        action
            .regex_rewrite
            .as_ref()
            .map(|(re, sub)| re.replace_all(parts.uri.path(), sub.as_str()).into_owned())
    };
    let Some(mut new_path) = new_path else { return };
    if let Some(q) = parts.uri.query() {
        new_path.push('?');
        new_path.push_str(q);
    }
    if let Ok(pq) = PathAndQuery::try_from(new_path) {
        if let Some(orig) = parts
            .uri
            .path_and_query()
            .filter(|_| x_envoy_original_path)
            .and_then(|p| HeaderValue::from_str(p.as_str()).ok())
        {
            parts.headers.insert(X_ENVOY_ORIGINAL_PATH.clone(), orig);
        }
        let mut up = std::mem::take(&mut parts.uri).into_parts();
        up.path_and_query = Some(pq);
        parts.uri = Uri::from_parts(up).unwrap_or_default();
    }
}

fn redirect_response(r: &Redirect, authority: &str, uri: &Uri, conn: &Conn) -> Response<Body> {
    let _ = conn;
    let scheme = r
        .scheme
        .clone()
        .unwrap_or_else(|| uri.scheme_str().unwrap_or("http").to_string());
    let (req_host, req_port) = match authority.rsplit_once(':') {
        Some((h, p))
            if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']') || authority.ends_with(']') =>
        {
            if authority.ends_with(']') {
                (authority.to_string(), None)
            } else {
                (h.to_string(), p.parse::<u16>().ok())
            }
        }
        _ => (authority.to_string(), None),
    };
    let host = r.host.clone().unwrap_or(req_host);
    let port = r.port.or(if r.host.is_some() || r.scheme.is_some() {
        None
    } else {
        req_port
    });
    let port = port.filter(|p| !((scheme == "http" && *p == 80) || (scheme == "https" && *p == 443)));
    let mut path = match (&r.path, &r.prefix_rewrite, &r.regex_rewrite) {
        (Some(p), _, _) => p.clone(),
        (None, Some(_prefix), _) => uri.path().to_string(),
        (None, None, Some((re, sub))) => re.replace_all(uri.path(), sub.as_str()).into_owned(),
        _ => uri.path().to_string(),
    };
    if !r.strip_query && !path.contains('?') {
        if let Some(q) = uri.query() {
            path.push('?');
            path.push_str(q);
        }
    }
    let mut loc = format!("{scheme}://{host}");
    if let Some(p) = port {
        let _ = write!(loc, ":{p}");
    }
    loc.push_str(&path);
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&loc) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Send the request to hosts of `cluster`, retrying as the route's policy says and the cluster's breakers
/// afford, and turn the outcome into the downstream response.
///
/// The loop per attempt: pick a host (skipping ejected ones, and previous hosts when the policy asks), send on
/// a pooled connection under the per-try and global deadlines, report the outcome to outlier detection, then
/// ask the retry state whether the outcome is retriable and the budget whether a retry is affordable.
#[allow(clippy::too_many_arguments)]
async fn forward(
    conn: &Rc<Conn>,
    cluster: &Arc<Cluster>,
    action: &RouteAction,
    vhost: &crate::route::VirtualHost,
    buffer_limit: Option<u32>,
    mut parts: http::request::Parts,
    body: Incoming,
    info: &mut StreamInfo,
    start: Instant,
) -> Response<Body> {
    let cs = &cluster.stats;
    let policy = action
        .retry_policy
        .clone()
        .or_else(|| vhost.retry_policy.clone())
        .unwrap_or_else(RetryPolicy::none);
    let timeouts = Timeouts::resolve(action.timeout, &policy, &mut parts.headers);
    let mut retry = RetryState::new(&policy, &mut parts.headers);
    let deadline = timeouts.global.map(|t| start + t);
    if let Some(t) = timeouts
        .per_try
        .or(timeouts.global)
        .filter(|_| !conn.hcm.suppress_envoy_headers)
    {
        parts.headers.insert(
            X_ENVOY_EXPECTED_RQ_TIMEOUT_MS.clone(),
            crate::util::number(t.as_millis() as u64),
        );
    }
    if let HostRewrite::Literal(v) = &action.host_rewrite {
        parts.headers.insert(header::HOST, v.clone());
        set_authority(&mut parts.uri, v.to_str().unwrap_or_default());
    }
    let downstream_h2 = parts.version == Version::HTTP_2;

    // The cluster's breakers: `max_requests` is taken per attempt once it has a connection (in `send`), as
    // Envoy's pool does when it attaches a stream; retries are afforded here.
    let resources = cluster.breakers.resources(Priority::Default).clone();
    let provided = match provided_host(conn, cluster, &parts, info, 80).await {
        Ok(h) => h,
        Err(reply) => return *reply,
    };

    // The stream idle timeout (the route's, else the connection manager's) watches both directions: request
    // body frames and response body frames.
    let idle_limit = match action.idle_timeout {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => conn.hcm.stream_idle_timeout,
    };
    let activity = idle_limit.map(|_| Rc::new(std::cell::Cell::new(Instant::now())));
    let idle = idle_limit.zip(activity.clone());
    // `request_timeout`: the whole request must have arrived by then.
    let request_deadline = conn.hcm.request_timeout.map(|t| start + t);

    // With retries possible, the body is kept (up to the buffer limit) for replay while it streams.
    let limit = buffer_limit.unwrap_or(conn.listener.buffer_limit) as usize;
    let (tee, mut single) = if retry.is_some() && !body.is_end_stream() {
        (Some(Tee::new(body, limit)), None)
    } else {
        (None, Some(body))
    };
    let mut _retry_permit = None;
    let mut last_reset = None;
    // The route's `hash_policy`, for the consistent-hash balancers only.
    let hash = if cluster.config.lb_policy.hashes() || cluster.aggregate.is_some() {
        action.hash_policy.hash(&parts.headers, Some(conn.remote.ip()))
    } else {
        None
    };

    // An aggregate cluster picks among its members, looked up in the current snapshot.
    let members = cluster
        .aggregate
        .as_ref()
        .map(|_| conn.shared.clusters.load_full());

    loop {
        // `retry_priority`: this attempt's priority load (not for an aggregate, whose levels are its members').
        let retry_load = match retry.as_mut() {
            Some(r) if r.has_retry_priority() && cluster.aggregate.is_none() => {
                let set = cluster.hosts();
                r.priority_load(&set.load.health, &set.load.degraded)
            }
            _ => None,
        };
        let picked = {
            let mut rng = conn.worker.rng.borrow_mut();
            let mut selection = 0u64;
            let mut pick = || match &provided {
                Some(h) => cluster.index_of(h).map(|(i, h)| (None, i, h)),
                None if cluster.provides_hosts() => None,
                None => {
                    // A host the retry predicate refused is picked again with the hash rehashed, so that a
                    // consistent hash lands elsewhere (Envoy steps to the next ring entry, or flips the hash's
                    // bits for Maglev; a rehash spreads retries the same way for both).
                    let h = hash.map(|h| match selection {
                        0 => h,
                        n => crate::upstream::hash::xxhash64(&h.to_le_bytes(), n),
                    });
                    selection += 1;
                    match (&cluster.aggregate, &members) {
                        (Some(a), Some(snapshot)) => a
                            .pick(snapshot, &mut rng, h)
                            .map(|(m, i, host)| (Some(m), i, host)),
                        _ => cluster
                            .pick_with_load(&mut rng, h, retry_load.as_ref())
                            .map(|(i, host)| (None, i, host)),
                    }
                }
            };
            match &retry {
                Some(r) => r.select_host(pick, |(_, _, h)| h.id),
                None => pick(),
            }
        };
        let Some((member, index, host)) = picked else {
            cs.upstream_cx_none_healthy.inc();
            info.set(Flag::NoHealthyUpstream);
            info.details = "no_healthy_upstream";
            cs.upstream_rq.record(503);
            cs.upstream_rq_completed.inc();
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        // The cluster that serves this attempt: an aggregate's member, else the route's cluster.
        let target = member.as_ref().unwrap_or(cluster);
        // `max_requests` is the target's (an aggregate's member's), taken in `send` once the attempt has its
        // connection.
        let protocol = match target.config.protocol {
            Protocol::Downstream if downstream_h2 => Protocol::Http2,
            Protocol::Downstream => Protocol::Http1,
            p => p,
        };
        let attempt = retry.as_ref().map_or(1, |r| r.attempt_count());
        if let Some(r) = retry.as_mut() {
            r.on_host_attempted(host.id, host.priority);
        }

        // This attempt's request: the parts themselves for a single attempt, a copy when there may be more.
        let mut attempt_parts = if tee.is_some() || retry.is_some() {
            let mut p = Request::new(()).into_parts().0;
            p.method = parts.method.clone();
            p.uri = parts.uri.clone();
            p.version = parts.version;
            p.headers = parts.headers.clone();
            p
        } else {
            std::mem::replace(&mut parts, Request::new(()).into_parts().0)
        };
        if vhost.include_request_attempt_count {
            attempt_parts
                .headers
                .insert(X_ENVOY_ATTEMPT_COUNT.clone(), HeaderValue::from(attempt));
        }
        // `auto_host_rewrite`: the host's hostname (DNS clusters); a host without one leaves `host` alone.
        if action.host_rewrite == HostRewrite::Auto && !host.hostname.is_empty() {
            let name = host.hostname.as_str();
            if let Ok(v) = HeaderValue::from_str(name) {
                attempt_parts.headers.insert(header::HOST, v);
            }
            set_authority(&mut attempt_parts.uri, name);
        }
        // `per_try_idle_timeout`: armed once this attempt has its connection and has sent the whole request.
        let try_idle = timeouts.per_try_idle.map(TryIdle::new);
        let mut req_body = match (&tee, single.take()) {
            (Some(t), _) => t.attempt(),
            (None, Some(b)) => Body::incoming(b),
            (None, None) => Body::empty(),
        }
        .with_activity(activity.clone())
        .with_counter(info.rx_bytes.clone())
        .with_watchdog(Watchdog::new(request_deadline, None));
        if let Some(t) = &try_idle {
            req_body = req_body.on_end(t.request_end_hook());
        }
        info.upstream = Some((host.address, cluster.clone()));

        // The pool's counts are the member's; the router's (response codes, times, retries) the route's.
        target.stats.upstream_rq_total.inc();
        target.stats.upstream_rq_active.inc();
        host.stats.rq_total.fetch_add(1, Relaxed);
        host.stats.rq_active.fetch_add(1, Relaxed);
        let upstream_start = Instant::now();
        let mut guard = UpstreamGuard {
            cluster: cluster.clone(),
            member: member.clone(),
            host: host.clone(),
            start: upstream_start,
            done: false,
            request: None,
        };

        let per_try = timeouts.per_try.map(|t| upstream_start + t);
        let attempt_deadline = match (deadline, per_try) {
            (Some(d), Some(p)) => Some(d.min(p)),
            (d, p) => d.or(p),
        };
        // Set once the request is handed to an upstream connection (for `reset-before-request`).
        let request_started = std::cell::Cell::new(false);
        let sent = send(
            conn,
            target,
            &host,
            protocol,
            attempt_parts,
            req_body,
            try_idle.as_ref(),
            &request_started,
        );
        let mut attempt_watchdog = Watchdog::with_try_idle(attempt_deadline, idle.clone(), try_idle.clone());
        let result = match attempt_watchdog.as_deref_mut() {
            Some(w) => {
                tokio::pin!(sent);
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = sent.as_mut().poll(cx) {
                        return Poll::Ready(r);
                    }
                    w.poll_expired(cx).map(|why| match why {
                        Expired::Deadline if deadline.is_some_and(|d| Instant::now() >= d) => {
                            Err(SendError::Timeout)
                        }
                        Expired::Deadline => Err(SendError::PerTryTimeout),
                        Expired::Idle => Err(SendError::Idle),
                        Expired::TryIdle => Err(SendError::PerTryIdleTimeout),
                    })
                })
                .await
            }
            None => sent.await,
        };

        let (resp, h1) = match result {
            Ok((resp, h1, request)) => {
                guard.request = request;
                (resp, h1)
            }
            Err(e) => {
                // Outlier detection sees local-origin failures; the retry policy sees a reset reason.
                let (outcome, reason) = match &e {
                    // A circuit breaker's overflow says nothing about the host, and is never retried.
                    SendError::Connect(ConnectError::Overflow) => (None, Some(ResetReason::Overflow)),
                    SendError::Connect(_) => {
                        (Some(Outcome::ConnectFailed), Some(ResetReason::ConnectFailure))
                    }
                    SendError::Upstream(err) if is_refused_stream(err) => {
                        (Some(Outcome::ConnectFailed), Some(ResetReason::RefusedStream))
                    }
                    SendError::Upstream(_) => (Some(Outcome::ConnectFailed), Some(ResetReason::Reset)),
                    SendError::PerTryTimeout | SendError::PerTryIdleTimeout => {
                        (Some(Outcome::Timeout), Some(ResetReason::PerTryTimeout))
                    }
                    SendError::Timeout | SendError::Idle => (Some(Outcome::Timeout), None),
                };
                if let Some(o) = outcome {
                    target.record_outcome(index, o, &mut conn.worker.rng.borrow_mut());
                }
                host.stats.rq_error.fetch_add(1, Relaxed);
                match e {
                    SendError::PerTryTimeout => cs.upstream_rq_per_try_timeout.inc(),
                    SendError::PerTryIdleTimeout => cs.upstream_rq_per_try_idle_timeout.inc(),
                    _ => {}
                }
                if matches!(e, SendError::PerTryTimeout | SendError::PerTryIdleTimeout) {
                    host.stats.rq_timeout.fetch_add(1, Relaxed);
                }
                guard.finish(false);
                if let (Some(r), Some(reason)) = (retry.as_mut(), reason) {
                    if tee.as_ref().is_none_or(Tee::replayable) {
                        let status = {
                            let mut rng = conn.worker.rng.borrow_mut();
                            r.should_retry_reset(
                                reason,
                                request_started.get(),
                                || resources.try_retry(),
                                &cluster.retry_stats,
                                &mut rng,
                            )
                        };
                        match status {
                            RetryStatus::Yes { backoff, permit } => {
                                _retry_permit = Some(permit);
                                last_reset = Some(());
                                if !backoff_within(backoff, deadline).await {
                                    return timeout_reply(cs, &host, info);
                                }
                                continue;
                            }
                            RetryStatus::NoOverflow => info.set(Flag::UpstreamOverflow),
                            RetryStatus::NoRetryLimitExceeded => info.set(Flag::UpstreamRetryLimitExceeded),
                            RetryStatus::No => {}
                        }
                    }
                }
                return error_reply(cs, &host, &e, info, attempt > 1 && last_reset.is_some(), conn);
            }
        };

        let status = resp.status().as_u16();
        info.response_at = Some(Instant::now());
        if let Some(t) = &try_idle {
            t.touch();
        }
        target.record_outcome(index, Outcome::Http(status), &mut conn.worker.rng.borrow_mut());
        if let Some(r) = retry.as_mut() {
            if tee.as_ref().is_none_or(Tee::replayable) {
                let decision = {
                    let mut rng = conn.worker.rng.borrow_mut();
                    r.should_retry_response(
                        status,
                        resp.headers(),
                        || resources.try_retry(),
                        &cluster.retry_stats,
                        &mut rng,
                    )
                };
                match decision {
                    RetryStatus::Yes { backoff, permit } => {
                        // The retried response is counted under `retry.`, not as a response to the client.
                        cs.retry_rq.record(status);
                        host.stats.rq_error.fetch_add(1, Relaxed);
                        guard.finish(false);
                        drop(resp);
                        _retry_permit = Some(permit);
                        last_reset = None;
                        if !backoff_within(backoff, deadline).await {
                            return timeout_reply(cs, &host, info);
                        }
                        continue;
                    }
                    RetryStatus::NoOverflow => info.set(Flag::UpstreamOverflow),
                    RetryStatus::NoRetryLimitExceeded => info.set(Flag::UpstreamRetryLimitExceeded),
                    RetryStatus::No => {}
                }
            }
        }

        let (mut rparts, rbody) = resp.into_parts();
        let service_time = upstream_start.elapsed().as_millis() as u64;
        remove_hop_by_hop_response(&mut rparts.headers);
        if !conn.hcm.suppress_envoy_headers {
            rparts.headers.insert(
                X_ENVOY_UPSTREAM_SERVICE_TIME.clone(),
                crate::util::small_number(service_time),
            );
        }
        if vhost.include_attempt_count_in_response {
            rparts
                .headers
                .insert(X_ENVOY_ATTEMPT_COUNT.clone(), HeaderValue::from(attempt));
        }
        rparts.version = Version::HTTP_11;
        cs.upstream_rq.record(status);
        info.details = "via_upstream";
        guard.done = true;
        // The per-try idle timer keeps watching the response body; when it runs out the response is reset.
        let try_idle = try_idle.map(|t| TryIdleOutcome {
            timer: t,
            index,
            worker: conn.worker.clone(),
        });
        // The attempt's timer goes on to watch the response body.
        let try_timer = try_idle.as_ref().map(|t| t.timer.clone());
        let watchdog = match attempt_watchdog {
            Some(w) => w.rearm(deadline, idle, try_timer),
            None => Watchdog::with_try_idle(deadline, idle, try_timer),
        };
        let done = UpstreamDone {
            guard,
            status,
            pool: h1.map(|s| (conn.worker.pools.clone(), s)),
            try_idle,
        };
        return Response::from_parts(
            rparts,
            Body::incoming(rbody)
                // Response frames are stream activity too (Envoy resets the stream idle timer on encodeData).
                .with_activity(activity)
                .with_watchdog(watchdog)
                .on_end(Box::new(done)),
        );
    }
}

/// A CONNECT request on a `connect_matcher` route: connect to a host of the cluster (for a dynamic forward
/// proxy cluster, the CONNECT authority's, port 443 by default), answer 200, then copy bytes both ways between
/// the upgraded downstream connection and the upstream one until either side closes. A connection manager
/// without `upgrade_configs` CONNECT serves connections without upgrades; its CONNECT requests get a 404.
async fn tunnel(
    conn: &Rc<Conn>,
    cluster: &Arc<Cluster>,
    mut parts: http::request::Parts,
    info: &mut StreamInfo,
) -> Response<Body> {
    let cs = &cluster.stats;
    let on_upgrade = match parts.extensions.remove::<hyper::upgrade::OnUpgrade>() {
        Some(u) if conn.hcm.connect => u,
        _ => {
            conn.hcm.stats.no_route.inc();
            info.set(Flag::NoRouteFound);
            info.details = "route_not_found";
            return local_reply(StatusCode::NOT_FOUND, "");
        }
    };
    let provided = match provided_host(conn, cluster, &parts, info, 443).await {
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
        info.set(Flag::NoHealthyUpstream);
        info.details = "no_healthy_upstream";
        cs.upstream_rq.record(503);
        cs.upstream_rq_completed.inc();
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
    };
    info.upstream = Some((host.address, cluster.clone()));
    target.stats.upstream_rq_total.inc();
    host.stats.rq_total.fetch_add(1, Relaxed);
    let mut upstream = match crate::upstream::pool::connect_tcp(&target, &host).await {
        Ok(s) => s,
        Err(e) => {
            target.record_outcome(index, Outcome::ConnectFailed, &mut conn.worker.rng.borrow_mut());
            host.stats.rq_error.fetch_add(1, Relaxed);
            return error_reply(cs, &host, &SendError::Connect(e), info, false, conn);
        }
    };
    info.response_at = Some(Instant::now());
    info.details = "via_upstream";
    cs.upstream_rq.record(200);
    cs.upstream_rq_completed.inc();
    host.stats.rq_success.fetch_add(1, Relaxed);
    let name = cluster.name().to_string();
    tokio::task::spawn_local(async move {
        match on_upgrade.await {
            Ok(up) => {
                let mut down = hyper_util::rt::TokioIo::new(up);
                if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut upstream).await {
                    tracing::debug!(cluster = %name, error = %e, "CONNECT tunnel ended with an error");
                }
            }
            Err(e) => tracing::debug!(cluster = %name, error = %e, "CONNECT: the downstream did not upgrade"),
        }
    });
    Response::new(Body::empty())
}

/// The request's authority: the absolute-form URI's, else `host`.
fn request_authority(parts: &http::request::Parts) -> Option<&str> {
    match parts.uri.authority() {
        Some(a) => Some(a.as_str()),
        None => parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    }
}

/// The host a cluster takes from the request itself: a dynamic forward proxy cluster's host for the authority
/// (resolved through its DNS cache), or an `ORIGINAL_DST` cluster's host from its header. `None` for every
/// other cluster, which balances over its own hosts.
pub(super) async fn provided_host(
    conn: &Conn,
    cluster: &Arc<Cluster>,
    parts: &http::request::Parts,
    info: &mut StreamInfo,
    default_port: u16,
) -> Result<Option<Arc<Host>>, Box<Response<Body>>> {
    use crate::upstream::dfp::LookupError;
    if let Some(cache) = &cluster.dfp {
        let authority = request_authority(parts).unwrap_or("");
        let resolve = conn.hcm.dynamic_forward_proxy;
        return match cache.host(cluster, authority, default_port, resolve).await {
            Ok(h) => Ok(Some(h)),
            Err(LookupError::NotCached) => Ok(None),
            Err(LookupError::ResolutionFailed) => {
                info.set(Flag::DnsResolutionFailed);
                info.details = "dns_resolution_failure";
                Err(Box::new(local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "DNS resolution failure",
                )))
            }
            Err(LookupError::Overflow) => {
                info.set(Flag::UpstreamOverflow);
                info.details = "dns_cache_overflow";
                Err(Box::new(local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "DNS cache overflow",
                )))
            }
        };
    }
    if let Some(od) = &cluster.original_dst {
        return Ok(od.host_for(cluster, Some(&parts.headers), conn.original_dst));
    }
    Ok(None)
}

/// Sleep the back-off; `false` when the global deadline comes first.
async fn backoff_within(backoff: std::time::Duration, deadline: Option<Instant>) -> bool {
    let wake = Instant::now() + backoff;
    match deadline {
        Some(d) if d <= wake => {
            tokio::time::sleep_until(d).await;
            false
        }
        _ => {
            tokio::time::sleep_until(wake).await;
            true
        }
    }
}

/// Whether the request body ended with the connection manager's `request_timeout`.
fn request_timed_out(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    let mut src = e.source();
    while let Some(s) = src {
        if s.downcast_ref::<crate::body::BodyTimeout>().is_some() {
            return true;
        }
        src = s.source();
    }
    false
}

fn is_refused_stream(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        src = s.source();
    }
    false
}

/// 503 with `x-envoy-overloaded` (unless suppressed; response flag UO): a circuit breaker refused the request.
fn overflow_reply(
    cs: &crate::upstream::ClusterStats,
    info: &mut StreamInfo,
    suppress_envoy_headers: bool,
) -> Response<Body> {
    info.set(Flag::UpstreamOverflow);
    info.details = "upstream_reset_before_response_started{overflow}";
    cs.upstream_rq.record(503);
    cs.upstream_rq_completed.inc();
    let mut r = local_reply_owned(StatusCode::SERVICE_UNAVAILABLE, reset_body("overflow"));
    if !suppress_envoy_headers {
        r.headers_mut()
            .insert(X_ENVOY_OVERLOADED.clone(), HeaderValue::from_static("true"));
    }
    r
}

fn timeout_reply(cs: &crate::upstream::ClusterStats, host: &Host, info: &mut StreamInfo) -> Response<Body> {
    cs.upstream_rq_timeout.inc();
    host.stats.rq_timeout.fetch_add(1, Relaxed);
    info.set(Flag::UpstreamRequestTimeout);
    info.details = "response_timeout";
    cs.upstream_rq.record(504);
    cs.upstream_rq_completed.inc();
    local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
}

/// The local reply for a failed last attempt, as Envoy words it.
pub(super) fn error_reply(
    cs: &crate::upstream::ClusterStats,
    host: &Host,
    e: &SendError,
    info: &mut StreamInfo,
    retried: bool,
    conn: &Conn,
) -> Response<Body> {
    let reset = |reason: &str| {
        let retried = if retried { "retried and the latest " } else { "" };
        format!("upstream connect error or disconnect/reset before headers. {retried}reset reason: {reason}")
    };
    let (status, flag, body) = match e {
        SendError::Idle => {
            hcm_stats(conn).downstream_rq_idle_timeout.inc();
            info.details = "stream_idle_timeout";
            (
                StatusCode::GATEWAY_TIMEOUT,
                Flag::StreamIdleTimeout,
                "stream timeout".to_string(),
            )
        }
        SendError::Timeout => return timeout_reply(cs, host, info),
        SendError::PerTryTimeout => {
            info.details = "upstream_per_try_timeout";
            (
                StatusCode::GATEWAY_TIMEOUT,
                Flag::UpstreamRequestTimeout,
                "upstream request timeout".to_string(),
            )
        }
        SendError::PerTryIdleTimeout => {
            info.details = "upstream_per_try_idle_timeout";
            (
                StatusCode::GATEWAY_TIMEOUT,
                Flag::UpstreamRequestTimeout,
                "upstream request timeout".to_string(),
            )
        }
        SendError::Connect(ConnectError::Timeout) => {
            info.details = "upstream_reset_before_response_started{connection_timeout}";
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Flag::UpstreamConnectionFailure,
                reset("connection timeout"),
            )
        }
        SendError::Connect(ConnectError::Refused(err)) => {
            info.details = "upstream_reset_before_response_started{remote_connection_failure}";
            info.transport_failure = Some(format!("delayed_connect_error:_{}", crate::util::strerror(err)));
            let reason = format!(
                "remote connection failure, transport failure reason: delayed connect error: {}",
                crate::util::strerror(err)
            );
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Flag::UpstreamConnectionFailure,
                reset(&reason),
            )
        }
        SendError::Connect(ConnectError::Overflow) => {
            return overflow_reply(cs, info, conn.hcm.suppress_envoy_headers)
        }
        SendError::Connect(ConnectError::Tls(reason)) => {
            info.details = "upstream_reset_before_response_started{connection_failure}";
            info.transport_failure = Some(reason.clone());
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Flag::UpstreamConnectionFailure,
                reset(&format!("connection failure, transport failure reason: {reason}")),
            )
        }
        SendError::Connect(ConnectError::Handshake(_)) => {
            info.details = "upstream_reset_before_response_started{protocol_error}";
            (
                StatusCode::BAD_GATEWAY,
                Flag::UpstreamProtocolError,
                reset("protocol error"),
            )
        }
        SendError::Upstream(err) if request_timed_out(err) => {
            hcm_stats(conn).downstream_rq_timeout.inc();
            info.details = "request_overall_timeout";
            return local_reply(StatusCode::REQUEST_TIMEOUT, "request timeout");
        }
        SendError::Upstream(err) => {
            cs.upstream_rq_rx_reset.inc();
            if is_protocol_error(err) {
                info.details = "upstream_reset_before_response_started{protocol_error}";
                (
                    StatusCode::BAD_GATEWAY,
                    Flag::UpstreamProtocolError,
                    reset("protocol error"),
                )
            } else if err.is_incomplete_message() || err.is_closed() || err.is_canceled() {
                info.details = "upstream_reset_before_response_started{connection_termination}";
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Flag::UpstreamConnectionTermination,
                    reset("connection termination"),
                )
            } else {
                info.details = "upstream_reset_before_response_started{remote_reset}";
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Flag::UpstreamRemoteReset,
                    reset("remote reset"),
                )
            }
        }
    };
    info.set(flag);
    cs.upstream_rq.record(status.as_u16());
    cs.upstream_rq_completed.inc();
    local_reply_owned(status, body)
}

fn is_protocol_error(e: &hyper::Error) -> bool {
    e.is_parse() || e.is_parse_status() || e.is_parse_too_large() || e.is_user()
}

fn reset_body(reason: &str) -> String {
    format!("upstream connect error or disconnect/reset before headers. reset reason: {reason}")
}

fn set_authority(uri: &mut Uri, host: &str) {
    if uri.authority().is_none() {
        return;
    }
    if let Ok(a) = Authority::try_from(host) {
        let mut p = std::mem::take(uri).into_parts();
        p.authority = Some(a);
        *uri = Uri::from_parts(p).unwrap_or_default();
    }
}

pub(super) fn remove_hop_by_hop_response(h: &mut HeaderMap) {
    let any = h.keys().any(|k| {
        matches!(
            k.as_str(),
            "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
        )
    });
    if !any {
        return;
    }
    if let Some(c) = h.get(header::CONNECTION).cloned() {
        if let Ok(c) = c.to_str() {
            for token in c.split(',') {
                if let Ok(n) = HeaderName::from_bytes(token.trim().as_bytes()) {
                    h.remove(n);
                }
            }
        }
        h.remove(header::CONNECTION);
    }
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::UPGRADE);
}

pub(super) enum SendError {
    Timeout,
    PerTryTimeout,
    /// `per_try_idle_timeout`: no response byte for that long since the request was sent.
    PerTryIdleTimeout,
    Idle,
    Connect(ConnectError),
    Upstream(hyper::Error),
}

type H1Sender = crate::upstream::pool::H1Conn;

/// Send on a pooled connection of the right protocol. A pooled HTTP/1.1 connection that turns out closed before
/// the request was written is replaced by a new one, once. `started` is set while the request is with a
/// connection, and cleared when the connection gives it back unsent.
#[allow(clippy::too_many_arguments)]
async fn send(
    conn: &Rc<Conn>,
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    protocol: Protocol,
    mut parts: http::request::Parts,
    body: Body,
    try_idle: Option<&TryIdle>,
    started: &std::cell::Cell<bool>,
) -> Result<Sent, SendError> {
    let pools = &conn.worker.pools;
    match protocol {
        Protocol::Http2 => {
            let mut sender = pools.http2(cluster, host).await.map_err(SendError::Connect)?;
            if let Some(t) = try_idle {
                t.connected();
            }
            let permit = request_permit(cluster)?;
            make_absolute(&mut parts);
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            started.set(true);
            let resp = sender
                .try_send_request(Request::from_parts(parts, body))
                .await
                .map_err(|mut e| {
                    if e.take_message().is_some() {
                        started.set(false);
                    }
                    SendError::Upstream(e.into_error())
                })?;
            Ok((resp, None, Some(permit)))
        }
        _ => {
            make_origin_form(&mut parts);
            parts.version = Version::HTTP_11;
            let mut req = Request::from_parts(parts, body);
            let mut permit = None;
            for attempt in 0..2 {
                let mut sender = pools.http1(cluster, host).await.map_err(SendError::Connect)?;
                if let Some(t) = try_idle {
                    t.connected();
                }
                if permit.is_none() {
                    match request_permit(cluster) {
                        Ok(p) => permit = Some(p),
                        Err(e) => {
                            pools.put_http1(host.id, sender);
                            return Err(e);
                        }
                    }
                }
                started.set(true);
                match sender.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, Some(sender), permit)),
                    Err(mut e) => match e.take_message() {
                        Some(r) if attempt == 0 => {
                            started.set(false);
                            req = r;
                        }
                        unsent => {
                            started.set(unsent.is_none());
                            return Err(SendError::Upstream(e.into_error()));
                        }
                    },
                }
            }
            unreachable_send()
        }
    }
}

fn unreachable_send() -> Result<Sent, SendError> {
    Err(SendError::Connect(ConnectError::Timeout))
}

/// An attempt's response head, its HTTP/1.1 connection (to pool after the body), and its `max_requests` unit.
type Sent = (
    Response<Incoming>,
    Option<H1Sender>,
    Option<crate::upstream::breaker::Permit>,
);

/// A unit of the cluster's `max_requests` for an attempt that has its connection; an overflow (counting
/// `upstream_rq_pending_overflow`, as Envoy does) otherwise.
fn request_permit(cluster: &Cluster) -> Result<crate::upstream::breaker::Permit, SendError> {
    cluster
        .breakers
        .resources(Priority::Default)
        .try_request()
        .ok_or(SendError::Connect(ConnectError::Overflow))
}

/// HTTP/1.1 upstream: origin-form request target, and `host` from the authority when the request had one.
fn make_origin_form(parts: &mut http::request::Parts) {
    if let Some(a) = parts.uri.authority() {
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(pq);
    }
}

/// HTTP/2 upstream: absolute URI with the authority from `host`.
fn make_absolute(parts: &mut http::request::Parts) {
    if parts.uri.authority().is_some() {
        return;
    }
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok());
    let mut p = std::mem::take(&mut parts.uri).into_parts();
    p.scheme = Some(Scheme::HTTP);
    p.authority = Some(authority.unwrap_or_else(|| Authority::from_static("localhost")));
    if p.path_and_query.is_none() {
        p.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    parts.uri = Uri::from_parts(p).unwrap_or_default();
}

/// Keeps the cluster's and host's active request counts right however the request ends.
struct UpstreamGuard {
    /// The route's cluster: the router's counts (`upstream_rq_completed`, `upstream_rq_time`, resets).
    cluster: Arc<Cluster>,
    /// An aggregate's member whose pool served the attempt (the pool's counts are its own), else `None`.
    member: Option<Arc<Cluster>>,
    host: Arc<Host>,
    start: Instant,
    done: bool,
    /// The attempt's unit of `max_requests`, held until its response ends.
    request: Option<crate::upstream::breaker::Permit>,
}

impl UpstreamGuard {
    fn finish(&mut self, success: bool) {
        self.request = None;
        let cs = &self.cluster.stats;
        let pool = self.member.as_ref().unwrap_or(&self.cluster);
        pool.stats.upstream_rq_active.dec();
        self.host.stats.rq_active.fetch_sub(1, Relaxed);
        if success {
            self.host.stats.rq_success.fetch_add(1, Relaxed);
            cs.upstream_rq_completed.inc();
            cs.upstream_rq_time
                .record(self.start.elapsed().as_millis() as u64);
        }
        self.done = true;
    }
}

impl Drop for UpstreamGuard {
    fn drop(&mut self) {
        if !self.done {
            // The downstream went away while waiting for the upstream.
            self.cluster.stats.upstream_rq_tx_reset.inc();
            self.finish(false);
        }
    }
}

/// What happens when an upstream response body has been forwarded.
struct UpstreamDone {
    guard: UpstreamGuard,
    status: u16,
    pool: Option<(Rc<crate::upstream::pool::Pools>, H1Sender)>,
    try_idle: Option<TryIdleOutcome>,
}

/// The per-try idle timer of the attempt whose response is streaming, and what to tell when it runs out.
struct TryIdleOutcome {
    timer: TryIdle,
    /// The host's index in the cluster, for outlier detection.
    index: usize,
    worker: Rc<crate::runtime::Worker>,
}

impl EndOfStream for UpstreamDone {
    fn end(&mut self, complete: bool, _bytes: u64) {
        let host_id = self.guard.host.id;
        if let Some(t) = self.try_idle.as_ref().filter(|t| t.timer.fired()) {
            // As Envoy's `onPerTryIdleTimeout` after the response started: counted, a local-origin timeout for
            // outlier detection, and the response reset (the body ends with an error).
            self.guard.cluster.stats.upstream_rq_per_try_idle_timeout.inc();
            self.guard.host.stats.rq_timeout.fetch_add(1, Relaxed);
            let mut rng = t.worker.rng.borrow_mut();
            self.guard
                .cluster
                .record_outcome(t.index, Outcome::Timeout, &mut rng);
        }
        self.guard.finish(complete && self.status < 500);
        if !complete || self.status >= 500 {
            self.guard.host.stats.rq_error.fetch_add(1, Relaxed);
            if complete {
                self.guard.cluster.stats.upstream_rq_completed.inc();
                self.guard
                    .cluster
                    .stats
                    .upstream_rq_time
                    .record(self.guard.start.elapsed().as_millis() as u64);
            }
        }
        if complete {
            if let Some((pools, sender)) = self.pool.take() {
                pools.put_http1(host_id, sender);
            }
        }
    }
}

fn hcm_stats(conn: &Conn) -> &super::config::HcmStats {
    &conn.hcm.stats
}

/// The router as the innermost service of the HTTP filter chain. It takes the route matched before the chain
/// from the request's extensions and hands its [`StreamInfo`] back in the response's.
#[derive(Clone)]
pub struct RouterService {
    pub conn: Rc<Conn>,
}

impl tower::Service<Request<Incoming>> for RouterService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>>>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let conn = self.conn.clone();
        Box::pin(async move {
            let start = Instant::now();
            let matched = req.extensions_mut().remove::<MatchedRoute>();
            let mut info = req.extensions_mut().remove::<StreamInfo>().unwrap_or_default();
            let mut resp = dispatch(&conn, req, matched, &mut info, start).await;
            resp.extensions_mut().insert(info);
            Ok(resp)
        })
    }
}
