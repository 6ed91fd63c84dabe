//! Active health checks (cluster `health_checks`): a per-host state machine, the interval rules, and an async
//! runner that performs HTTP, TCP or gRPC checks.
//!
//! Semantics are Envoy's `HealthCheckerImplBase` (`source/common/upstream/health_checker_impl.cc`,
//! `source/extensions/health_checkers/common/health_checker_base_impl.cc`), `HttpHealthCheckerImpl`,
//! `TcpHealthCheckerImpl` and `GrpcHealthCheckerImpl`:
//! - A host under active checking starts failed (`FAILED_ACTIVE_HC`, `/failed_active_hc` in `/clusters`) and the
//!   first check runs at once (after `initial_jitter`). The **first** success marks it healthy immediately;
//!   later, a failed host needs `healthy_threshold` consecutive successes.
//! - A healthy host becomes unhealthy after `unhealthy_threshold` consecutive failures, except that an
//!   **active** failure that is not retriable (an HTTP status outside `expected_statuses` and
//!   `retriable_statuses`) ejects it at once.
//! - Every failure counts `failure`; network errors and timeouts also count `network_failure`.
//! - The next check waits `interval` (healthy, no change pending), `healthy_edge_interval` (a success with a
//!   change pending), `unhealthy_interval` (failed), `unhealthy_edge_interval` (a failure with a change
//!   pending); while the cluster has never carried traffic (`upstream_cx_total` unused), `no_traffic_interval`
//!   (or `no_traffic_healthy_interval` for a healthy host). Jitter: `+ random % (interval_jitter_percent% of
//!   the base)` and `+ random % interval_jitter`; at least 1 ms.
//! - HTTP: a `GET` (or `method`) of `path` with `:authority` `host` (default: the cluster name),
//!   `user-agent: Envoy/HC` and `request_headers_to_add`; healthy when the status is in `expected_statuses`
//!   (default `[200, 201)`) and, with `receive`, the response body holds the payloads in order.
//! - TCP: connect, write `send`, healthy once the bytes read contain every `receive` payload in order (an
//!   empty `receive` succeeds on connect); a close before that is a network failure.
//! - gRPC: `grpc.health.v1.Health/Check` over h2c (prior knowledge), `:authority` `authority` (default: the
//!   cluster name), `user-agent: Envoy/HC`, `grpc-timeout` the check's timeout, a `HealthCheckRequest` with
//!   `service_name`. Healthy when the answer is HTTP 200 `application/grpc` with one `HealthCheckResponse` whose
//!   status is `SERVING` and `grpc-status` 0; anything else is an active failure (ejecting at once), a reset or
//!   a connection failure a network failure.
//!
//! Time and randomness are parameters: the state machine is pure, the runner takes the clock from tokio (paused
//! in tests) and an [`Rng`].

use super::lb::Rng;
use crate::route::HeaderMods;
use crate::route::StringMatcher;
use crate::stats::{Counter, Gauge, Scope};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use std::io::Write;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a check sends and expects.
#[derive(Clone, Debug)]
pub enum CheckKind {
    Http(Box<HttpCheck>),
    Tcp(TcpCheck),
    Grpc(GrpcCheck),
}

/// `grpc_health_check`.
#[derive(Clone, Debug, Default)]
pub struct GrpcCheck {
    /// `service_name`: the `service` asked about (empty: the server as a whole).
    pub service_name: String,
    /// `authority`; empty means the cluster name.
    pub authority: String,
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    /// `ServingStatus`: UNKNOWN 0, SERVING 1, NOT_SERVING 2, SERVICE_UNKNOWN 3.
    #[prost(int32, tag = "1")]
    status: i32,
}

const GRPC_SERVING: i32 = 1;
const GRPC_HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";
/// A health check response larger than this is not one.
const GRPC_MAX_RESPONSE: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct HttpCheck {
    pub path: String,
    /// `host`; empty means the cluster name.
    pub host: String,
    pub method: http::Method,
    /// `send`: a request body.
    pub send: Option<Bytes>,
    /// `receive`: payloads the response body must contain, in order.
    pub receive: Vec<Vec<u8>>,
    /// `response_buffer_size` (default 1024): how much of the body is searched.
    pub response_buffer_size: usize,
    pub expected_statuses: Vec<Range<u16>>,
    pub retriable_statuses: Vec<Range<u16>>,
    pub request_headers: HeaderMods,
    /// `service_name_matcher`: matched against `x-envoy-upstream-healthchecked-cluster` (counts
    /// `verify_cluster`).
    pub service_name_matcher: Option<StringMatcher>,
}

#[derive(Clone, Debug, Default)]
pub struct TcpCheck {
    pub send: Vec<u8>,
    pub receive: Vec<Vec<u8>>,
}

/// One `envoy.config.core.v3.HealthCheck`, lowered.
#[derive(Clone, Debug)]
pub struct HealthCheckConfig {
    pub kind: CheckKind,
    pub timeout: Duration,
    pub interval: Duration,
    pub initial_jitter: Duration,
    pub interval_jitter: Duration,
    pub interval_jitter_percent: u32,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub no_traffic_interval: Duration,
    pub no_traffic_healthy_interval: Duration,
    pub unhealthy_interval: Duration,
    pub unhealthy_edge_interval: Duration,
    pub healthy_edge_interval: Duration,
    pub reuse_connection: bool,
    pub event_log_path: Option<PathBuf>,
    pub always_log_health_check_failures: bool,
}

/// `cluster.<name>.health_check.*`.
#[derive(Clone, Debug)]
pub struct HealthCheckStats {
    pub attempt: Counter,
    pub success: Counter,
    pub failure: Counter,
    pub network_failure: Counter,
    pub passive_failure: Counter,
    pub verify_cluster: Counter,
    pub healthy: Gauge,
}

impl HealthCheckStats {
    /// `scope` is the cluster's; the stats live under `health_check.`.
    pub fn new(scope: &Scope) -> Self {
        let s = scope.scope("health_check.");
        HealthCheckStats {
            attempt: s.counter("attempt"),
            success: s.counter("success"),
            failure: s.counter("failure"),
            network_failure: s.counter("network_failure"),
            passive_failure: s.counter("passive_failure"),
            verify_cluster: s.counter("verify_cluster"),
            healthy: s.gauge("healthy"),
        }
    }

    pub fn detached() -> Self {
        HealthCheckStats {
            attempt: Counter::detached(),
            success: Counter::detached(),
            failure: Counter::detached(),
            network_failure: Counter::detached(),
            passive_failure: Counter::detached(),
            verify_cluster: Counter::detached(),
            healthy: Gauge::detached(),
        }
    }
}

/// `envoy.data.core.v3.HealthCheckFailureType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureType {
    Active,
    Passive,
    Network,
    NetworkTimeout,
}

impl FailureType {
    fn name(self) -> &'static str {
        match self {
            FailureType::Active => "ACTIVE",
            FailureType::Passive => "PASSIVE",
            FailureType::Network => "NETWORK",
            FailureType::NetworkTimeout => "NETWORK_TIMEOUT",
        }
    }
}

/// One check's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckResult {
    Success,
    Failure {
        kind: FailureType,
        /// A status in `retriable_statuses`: counts toward `unhealthy_threshold` instead of ejecting at once.
        retriable: bool,
    },
}

/// `HealthTransition`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    Changed,
    ChangePending,
}

/// What happened to the host, for the event log and the membership update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthEvent {
    AddHealthy {
        first_check: bool,
    },
    EjectUnhealthy {
        failure: FailureType,
    },
    /// A failure logged without a transition (the first check, or `always_log_health_check_failures`).
    Failure {
        failure: FailureType,
        first_check: bool,
    },
}

/// One host's active health-check state (`ActiveHealthCheckSession`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostHealth {
    /// `FAILED_ACTIVE_HC`.
    pub failed_active_hc: bool,
    /// `ACTIVE_HC_TIMEOUT`: failed, last by a timeout.
    pub timed_out: bool,
    num_healthy: u32,
    num_unhealthy: u32,
    first_check: bool,
}

impl Default for HostHealth {
    fn default() -> Self {
        HostHealth::new()
    }
}

impl HostHealth {
    /// A host added under active health checking: failed until its first check passes.
    pub fn new() -> Self {
        HostHealth {
            failed_active_hc: true,
            timed_out: false,
            num_healthy: 0,
            num_unhealthy: 0,
            first_check: true,
        }
    }

    pub fn healthy(&self) -> bool {
        !self.failed_active_hc
    }

    /// Apply a result (`handleSuccess` / `setUnhealthy`); returns the transition and the events to log.
    pub fn record(
        &mut self,
        result: CheckResult,
        cfg: &HealthCheckConfig,
        stats: &HealthCheckStats,
    ) -> (Transition, Vec<HealthEvent>) {
        let mut events = Vec::new();
        let first = self.first_check;
        self.first_check = false;
        match result {
            CheckResult::Success => {
                self.num_unhealthy = 0;
                let mut t = Transition::Unchanged;
                if self.failed_active_hc {
                    self.num_healthy += 1;
                    if first || self.num_healthy >= cfg.healthy_threshold {
                        self.failed_active_hc = false;
                        self.timed_out = false;
                        stats.healthy.inc();
                        t = Transition::Changed;
                        events.push(HealthEvent::AddHealthy { first_check: first });
                    } else {
                        t = Transition::ChangePending;
                    }
                }
                stats.success.inc();
                (t, events)
            }
            CheckResult::Failure { kind, retriable } => {
                self.num_healthy = 0;
                let mut t = Transition::Unchanged;
                if !self.failed_active_hc {
                    self.num_unhealthy += 1;
                    if (kind == FailureType::Active && !retriable)
                        || self.num_unhealthy >= cfg.unhealthy_threshold
                    {
                        self.failed_active_hc = true;
                        stats.healthy.dec();
                        t = Transition::Changed;
                        events.push(HealthEvent::EjectUnhealthy { failure: kind });
                    } else {
                        t = Transition::ChangePending;
                    }
                }
                self.timed_out = kind == FailureType::NetworkTimeout && self.failed_active_hc;
                if first || cfg.always_log_health_check_failures {
                    events.push(HealthEvent::Failure {
                        failure: kind,
                        first_check: first,
                    });
                }
                stats.failure.inc();
                match kind {
                    FailureType::Network | FailureType::NetworkTimeout => stats.network_failure.inc(),
                    FailureType::Passive => stats.passive_failure.inc(),
                    FailureType::Active => {}
                }
                (t, events)
            }
        }
    }
}

/// `HealthCheckerImplBase::interval`: the wait before the next check.
pub fn next_interval(
    cfg: &HealthCheckConfig,
    success: bool,
    transition: Transition,
    had_traffic: bool,
    rng: &mut Rng,
) -> Duration {
    let pending = transition == Transition::ChangePending;
    let base = if had_traffic {
        match (success, pending) {
            (false, true) => cfg.unhealthy_edge_interval,
            (false, false) => cfg.unhealthy_interval,
            (true, true) => cfg.healthy_edge_interval,
            (true, false) => cfg.interval,
        }
    } else if success && !pending {
        cfg.no_traffic_healthy_interval
    } else {
        cfg.no_traffic_interval
    };
    let mut ms = base.as_millis() as u64;
    let pct = u64::from(cfg.interval_jitter_percent) * ms / 100;
    if pct > 0 {
        ms += rng.next_u64() % pct;
    }
    let jitter = cfg.interval_jitter.as_millis() as u64;
    if jitter > 0 {
        ms += rng.next_u64() % jitter;
    }
    Duration::from_millis(ms.max(1))
}

/// Whether `data` holds every payload of `blocks` in order (Envoy's `PayloadMatcher::match`).
pub fn payloads_match(blocks: &[Vec<u8>], data: &[u8]) -> bool {
    let mut start = 0;
    for b in blocks {
        if b.is_empty() {
            continue;
        }
        let Some(pos) = data[start..].windows(b.len()).position(|w| w == b.as_slice()) else {
            return false;
        };
        start += pos + b.len();
    }
    true
}

// ---------------------------------------------------------------------------------------------------------------
// Performing checks.

/// An active failure of a gRPC check: never retriable.
fn grpc_failure() -> CheckResult {
    CheckResult::Failure {
        kind: FailureType::Active,
        retriable: false,
    }
}

/// Whether the gRPC response body is exactly one uncompressed `HealthCheckResponse` saying `SERVING`
/// (Envoy's `decodeData`: a second message is "unexpected streaming", a flagged frame an invalid payload).
fn grpc_serving(mut data: &[u8]) -> bool {
    let mut response = None;
    while !data.is_empty() {
        if data.len() < 5 || data[0] != 0 {
            return false;
        }
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        let Some(message) = data.get(5..5 + len) else {
            return false;
        };
        data = &data[5 + len..];
        if len == 0 {
            continue;
        }
        if response.is_some() {
            return false;
        }
        match <HealthCheckResponse as prost::Message>::decode(message) {
            Ok(r) => response = Some(r),
            Err(_) => return false,
        }
    }
    response.is_some_and(|r| r.status == GRPC_SERVING)
}

/// Performs one check against a host (HTTP, TCP or gRPC), keeping a connection between checks with
/// `reuse_connection`.
pub struct Checker {
    addr: SocketAddr,
    cluster: String,
    /// The endpoint's `health_check_config.hostname`.
    hostname: String,
    http: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    tcp: Option<TcpStream>,
    grpc: Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>>,
}

fn network() -> CheckResult {
    CheckResult::Failure {
        kind: FailureType::Network,
        retriable: false,
    }
}

impl Checker {
    pub fn new(addr: SocketAddr, cluster: impl Into<String>) -> Self {
        Checker {
            addr,
            cluster: cluster.into(),
            hostname: String::new(),
            http: None,
            tcp: None,
            grpc: None,
        }
    }

    /// With the endpoint's `health_check_config.hostname`, which wins over the check's `host` or `authority`.
    pub fn with_hostname(mut self, hostname: &str) -> Self {
        self.hostname = hostname.to_owned();
        self
    }

    /// The `host` or `:authority` of an L7 check (Envoy's `HealthCheckerFactory::getHostname`): the endpoint's
    /// hostname for checks, else the check's, else the cluster name.
    fn l7_host<'a>(&'a self, configured: &'a str) -> &'a str {
        [self.hostname.as_str(), configured]
            .into_iter()
            .find(|h| !h.is_empty())
            .unwrap_or(&self.cluster)
    }

    /// Run one check within `timeout`.
    pub async fn check(&mut self, cfg: &HealthCheckConfig, stats: &HealthCheckStats) -> CheckResult {
        stats.attempt.inc();
        let r = match tokio::time::timeout(cfg.timeout, self.check_once(cfg, stats)).await {
            Ok(r) => r,
            Err(_) => CheckResult::Failure {
                kind: FailureType::NetworkTimeout,
                retriable: false,
            },
        };
        if r != CheckResult::Success || !cfg.reuse_connection {
            self.http = None;
            self.tcp = None;
            self.grpc = None;
        }
        r
    }

    async fn check_once(&mut self, cfg: &HealthCheckConfig, stats: &HealthCheckStats) -> CheckResult {
        match &cfg.kind {
            CheckKind::Http(h) => self.http_check(h, stats).await,
            CheckKind::Tcp(t) => self.tcp_check(t).await,
            CheckKind::Grpc(g) => self.grpc_check(g, cfg.timeout).await,
        }
    }

    async fn grpc_check(&mut self, g: &GrpcCheck, timeout: Duration) -> CheckResult {
        let mut sender = match self.grpc.take() {
            Some(s) if !s.is_closed() => s,
            _ => {
                let Ok(stream) = TcpStream::connect(self.addr).await else {
                    return network();
                };
                let _ = stream.set_nodelay(true);
                let io = hyper_util::rt::TokioIo::new(stream);
                let mut builder =
                    hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                builder.timer(hyper_util::rt::TokioTimer::new());
                let Ok((sender, conn)) = builder.handshake(io).await else {
                    return network();
                };
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }
        };
        if sender.ready().await.is_err() {
            return network();
        }
        let authority = self.l7_host(&g.authority);
        let uri = http::Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(GRPC_HEALTH_PATH)
            .build();
        let Ok(uri) = uri else { return network() };
        let message = prost::Message::encode_to_vec(&HealthCheckRequest {
            service: g.service_name.clone(),
        });
        let mut frame = Vec::with_capacity(5 + message.len());
        frame.push(0);
        frame.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(&message);
        let mut req = http::Request::new(Full::new(Bytes::from(frame)));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_2;
        let headers = req.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        headers.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static("Envoy/HC"),
        );
        if let Ok(v) = http::HeaderValue::from_str(&format!("{}m", timeout.as_millis())) {
            headers.insert("grpc-timeout", v);
        }
        let Ok(resp) = sender.send_request(req).await else {
            return network();
        };
        let (parts, mut body) = resp.into_parts();
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return network() };
            match frame.into_data() {
                Ok(d) => {
                    if data.len() + d.len() > GRPC_MAX_RESPONSE {
                        return grpc_failure();
                    }
                    data.extend_from_slice(&d);
                }
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        self.grpc = Some(sender);
        let grpc_ok = parts.status == http::StatusCode::OK
            && parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        // The status is in the trailers, or in the headers of a trailers-only answer.
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| parts.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u32>().ok());
        if grpc_ok && status == Some(0) && grpc_serving(&data) {
            CheckResult::Success
        } else {
            grpc_failure()
        }
    }

    async fn http_check(&mut self, h: &HttpCheck, stats: &HealthCheckStats) -> CheckResult {
        let mut sender = match self.http.take() {
            Some(s) if !s.is_closed() => s,
            _ => {
                let Ok(stream) = TcpStream::connect(self.addr).await else {
                    return network();
                };
                let _ = stream.set_nodelay(true);
                let io = hyper_util::rt::TokioIo::new(stream);
                let Ok((sender, conn)) = hyper::client::conn::http1::handshake(io).await else {
                    return network();
                };
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }
        };
        if sender.ready().await.is_err() {
            return network();
        }
        let host = self.l7_host(&h.host);
        let mut req = http::Request::new(Full::new(h.send.clone().unwrap_or_default()));
        *req.method_mut() = h.method.clone();
        *req.uri_mut() = match h.path.parse() {
            Ok(u) => u,
            Err(_) => return network(),
        };
        let headers = req.headers_mut();
        if let Ok(v) = http::HeaderValue::from_str(host) {
            headers.insert(http::header::HOST, v);
        }
        headers.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static("Envoy/HC"),
        );
        h.request_headers.apply(headers);
        let Ok(resp) = sender.send_request(req).await else {
            return network();
        };
        let status = resp.status().as_u16();
        let close = resp
            .headers()
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let verified = match &h.service_name_matcher {
            Some(m) => {
                stats.verify_cluster.inc();
                let v = resp
                    .headers()
                    .get("x-envoy-upstream-healthchecked-cluster")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                m.matches(v)
            }
            None => true,
        };
        let mut body = Vec::new();
        let mut incoming = resp.into_body();
        while let Some(frame) = incoming.frame().await {
            let Ok(frame) = frame else { return network() };
            if let Some(d) = frame.data_ref() {
                let room = h.response_buffer_size.saturating_sub(body.len());
                body.extend_from_slice(&d[..d.len().min(room)]);
            }
        }
        if !close {
            self.http = Some(sender);
        }
        let in_ranges = |rs: &[Range<u16>]| rs.iter().any(|r| r.contains(&status));
        if in_ranges(&h.expected_statuses) && verified && payloads_match(&h.receive, &body) {
            CheckResult::Success
        } else {
            CheckResult::Failure {
                kind: FailureType::Active,
                retriable: in_ranges(&h.retriable_statuses),
            }
        }
    }

    async fn tcp_check(&mut self, t: &TcpCheck) -> CheckResult {
        let mut stream = match self.tcp.take() {
            Some(s) => s,
            None => match TcpStream::connect(self.addr).await {
                Ok(s) => s,
                Err(_) => return network(),
            },
        };
        if !t.send.is_empty() && stream.write_all(&t.send).await.is_err() {
            return network();
        }
        if !t.receive.is_empty() {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return network(),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if payloads_match(&t.receive, &buf) {
                    break;
                }
            }
        }
        self.tcp = Some(stream);
        CheckResult::Success
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The event log.

/// Seconds since the epoch as RFC 3339 UTC with milliseconds.
fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// An `envoy.data.core.v3.HealthCheckEvent` as JSON (one line of `event_log_path`).
pub fn event_json(
    cfg: &HealthCheckConfig,
    cluster: &str,
    host: SocketAddr,
    ev: &HealthEvent,
    wall: Duration,
) -> serde_json::Value {
    let checker = match cfg.kind {
        CheckKind::Http(_) => "HTTP",
        CheckKind::Tcp(_) => "TCP",
        CheckKind::Grpc(_) => "GRPC",
    };
    let mut v = json!({
        "health_checker_type": checker,
        "host": {"socket_address": {"protocol": "TCP", "address": host.ip().to_string(), "port_value": host.port()}},
        "cluster_name": cluster,
        "timestamp": rfc3339(wall),
    });
    let (key, body) = match ev {
        HealthEvent::AddHealthy { first_check } => ("add_healthy_event", json!({"first_check": first_check})),
        HealthEvent::EjectUnhealthy { failure } => {
            ("eject_unhealthy_event", json!({"failure_type": failure.name()}))
        }
        HealthEvent::Failure { failure, first_check } => (
            "health_check_failure_event",
            json!({"failure_type": failure.name(), "first_check": first_check}),
        ),
    };
    v[key] = body;
    v
}

fn log_events(cfg: &HealthCheckConfig, cluster: &str, host: SocketAddr, events: &[HealthEvent]) {
    let Some(path) = &cfg.event_log_path else { return };
    if events.is_empty() {
        return;
    }
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut out = String::new();
    for ev in events {
        out.push_str(&event_json(cfg, cluster, host, ev, wall).to_string());
        out.push('\n');
    }
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(out.as_bytes()));
    if let Err(e) = res {
        tracing::warn!(path = %path.display(), error = %e, "health check event log: cannot write");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The runner.

/// A source of check results: the real [`Checker`], or a script in tests.
pub trait Check {
    fn run(
        &mut self,
        cfg: &HealthCheckConfig,
        stats: &HealthCheckStats,
    ) -> impl std::future::Future<Output = CheckResult> + Send;
}

impl Check for Checker {
    async fn run(&mut self, cfg: &HealthCheckConfig, stats: &HealthCheckStats) -> CheckResult {
        self.check(cfg, stats).await
    }
}

/// The host a runner checks, and its cluster (for the event log and the default `host`).
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub cluster: &'a str,
    pub address: SocketAddr,
}

/// Check one host forever: the first check after `initial_jitter` (random up to it), then by
/// [`next_interval`], bounded by `bound` (the runtime's `health_check.min_interval` and `max_interval`).
/// `had_traffic` reports whether the cluster has ever opened a connection; `on_change` gets the host's new health
/// on every transition. Cancel by dropping (or aborting the task of) the future.
#[allow(clippy::too_many_arguments)]
pub async fn run<C: Check>(
    cfg: &HealthCheckConfig,
    target: Target<'_>,
    mut checker: C,
    stats: &HealthCheckStats,
    mut rng: Rng,
    had_traffic: impl Fn() -> bool,
    bound: impl Fn(Duration) -> Duration,
    mut on_change: impl FnMut(bool),
) {
    let mut state = HostHealth::new();
    let jitter = cfg.initial_jitter.as_millis() as u64;
    if jitter > 0 {
        tokio::time::sleep(Duration::from_millis(rng.next_u64() % jitter)).await;
    }
    loop {
        let result = checker.run(cfg, stats).await;
        let (t, events) = state.record(result, cfg, stats);
        log_events(cfg, target.cluster, target.address, &events);
        if t == Transition::Changed {
            on_change(state.healthy());
        }
        let wait = next_interval(cfg, result == CheckResult::Success, t, had_traffic(), &mut rng);
        tokio::time::sleep(bound(wait)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    fn cfg(kind: CheckKind) -> HealthCheckConfig {
        HealthCheckConfig {
            kind,
            timeout: Duration::from_secs(1),
            interval: Duration::from_secs(5),
            initial_jitter: Duration::ZERO,
            interval_jitter: Duration::ZERO,
            interval_jitter_percent: 0,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            no_traffic_interval: Duration::from_secs(60),
            no_traffic_healthy_interval: Duration::from_secs(60),
            unhealthy_interval: Duration::from_secs(7),
            unhealthy_edge_interval: Duration::from_secs(3),
            healthy_edge_interval: Duration::from_secs(2),
            reuse_connection: true,
            event_log_path: None,
            always_log_health_check_failures: false,
        }
    }

    fn http(path: &str) -> CheckKind {
        CheckKind::Http(Box::new(HttpCheck {
            path: path.into(),
            host: String::new(),
            method: http::Method::GET,
            send: None,
            receive: Vec::new(),
            response_buffer_size: 1024,
            expected_statuses: vec![Range { start: 200, end: 201 }],
            retriable_statuses: Vec::new(),
            request_headers: HeaderMods::default(),
            service_name_matcher: None,
        }))
    }

    const NET: CheckResult = CheckResult::Failure {
        kind: FailureType::Network,
        retriable: false,
    };
    const BAD_STATUS: CheckResult = CheckResult::Failure {
        kind: FailureType::Active,
        retriable: false,
    };
    const RETRIABLE: CheckResult = CheckResult::Failure {
        kind: FailureType::Active,
        retriable: true,
    };

    #[test]
    fn first_success_is_healthy_at_once_later_ones_need_the_threshold() {
        let c = cfg(http("/"));
        let s = HealthCheckStats::detached();
        let mut h = HostHealth::new();
        assert!(!h.healthy());
        let (t, ev) = h.record(CheckResult::Success, &c, &s);
        assert_eq!(t, Transition::Changed);
        assert_eq!(ev, [HealthEvent::AddHealthy { first_check: true }]);
        assert_eq!(s.healthy.value(), 1);
        // Network failures need unhealthy_threshold (3) in a row.
        assert_eq!(h.record(NET, &c, &s).0, Transition::ChangePending);
        assert_eq!(h.record(NET, &c, &s).0, Transition::ChangePending);
        let (t, ev) = h.record(NET, &c, &s);
        assert_eq!(t, Transition::Changed);
        assert_eq!(
            ev,
            [HealthEvent::EjectUnhealthy {
                failure: FailureType::Network
            }]
        );
        assert_eq!(s.healthy.value(), 0);
        assert_eq!((s.failure.value(), s.network_failure.value()), (3, 3));
        // Back to healthy needs healthy_threshold (2) successes.
        assert_eq!(
            h.record(CheckResult::Success, &c, &s).0,
            Transition::ChangePending
        );
        assert_eq!(h.record(CheckResult::Success, &c, &s).0, Transition::Changed);
        assert!(h.healthy());
    }

    #[test]
    fn a_bad_status_ejects_at_once_a_retriable_one_counts() {
        let c = cfg(http("/"));
        let s = HealthCheckStats::detached();
        let mut h = HostHealth::new();
        h.record(CheckResult::Success, &c, &s);
        assert_eq!(h.record(RETRIABLE, &c, &s).0, Transition::ChangePending);
        assert_eq!(h.record(BAD_STATUS, &c, &s).0, Transition::Changed);
        assert_eq!((s.failure.value(), s.network_failure.value()), (2, 0));
        // A failed first check is logged but changes nothing (the host starts failed).
        let mut h = HostHealth::new();
        let (t, ev) = h.record(NET, &c, &s);
        assert_eq!(t, Transition::Unchanged);
        assert_eq!(
            ev,
            [HealthEvent::Failure {
                failure: FailureType::Network,
                first_check: true
            }]
        );
        // Then a single success is not enough: healthy_threshold applies after the first check.
        assert_eq!(
            h.record(CheckResult::Success, &c, &s).0,
            Transition::ChangePending
        );
    }

    #[test]
    fn intervals_follow_health_and_traffic() {
        let c = cfg(http("/"));
        let mut rng = Rng::seeded(1);
        let mut iv = |ok, t, traffic| next_interval(&c, ok, t, traffic, &mut rng).as_secs();
        assert_eq!(iv(true, Transition::Unchanged, true), 5);
        assert_eq!(iv(true, Transition::ChangePending, true), 2);
        assert_eq!(iv(false, Transition::Unchanged, true), 7);
        assert_eq!(iv(false, Transition::Changed, true), 7);
        assert_eq!(iv(false, Transition::ChangePending, true), 3);
        assert_eq!(iv(true, Transition::Unchanged, false), 60);
        let mut j = cfg(http("/"));
        j.interval_jitter = Duration::from_millis(1000);
        j.interval_jitter_percent = 10;
        let d = next_interval(&j, true, Transition::Unchanged, true, &mut Rng::seeded(3));
        assert!(
            d >= Duration::from_secs(5) && d < Duration::from_millis(6500),
            "{d:?}"
        );
    }

    #[test]
    fn payload_blocks_match_in_order() {
        assert!(payloads_match(&[b"po".to_vec(), b"ng".to_vec()], b"xxpoyyng"));
        assert!(!payloads_match(&[b"ng".to_vec(), b"po".to_vec()], b"xxpoyyng"));
        assert!(payloads_match(&[], b""));
    }

    #[test]
    fn event_json_has_envoys_shape() {
        let c = cfg(http("/"));
        let v = event_json(
            &c,
            "svc",
            "127.0.0.1:8080".parse().unwrap(),
            &HealthEvent::EjectUnhealthy {
                failure: FailureType::Active,
            },
            Duration::from_millis(1_700_000_000_123),
        );
        assert_eq!(v["health_checker_type"], "HTTP");
        assert_eq!(v["host"]["socket_address"]["port_value"], 8080);
        assert_eq!(v["eject_unhealthy_event"]["failure_type"], "ACTIVE");
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.123Z");
    }

    /// A scripted checker recording when it ran.
    struct Script {
        results: Vec<CheckResult>,
        at: Arc<Mutex<Vec<Duration>>>,
        start: Instant,
    }

    impl Check for Script {
        async fn run(&mut self, _: &HealthCheckConfig, s: &HealthCheckStats) -> CheckResult {
            s.attempt.inc();
            self.at.lock().unwrap().push(self.start.elapsed());
            if self.results.is_empty() {
                std::future::pending::<()>().await;
            }
            self.results.remove(0)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn runner_schedules_checks_on_the_clock() {
        let c = cfg(http("/"));
        let at = Arc::new(Mutex::new(Vec::new()));
        let changes = Arc::new(Mutex::new(Vec::new()));
        let script = Script {
            results: vec![CheckResult::Success, NET, NET, NET, CheckResult::Success],
            at: at.clone(),
            start: Instant::now(),
        };
        let stats = HealthCheckStats::detached();
        let ch = changes.clone();
        let target = Target {
            cluster: "svc",
            address: "127.0.0.1:1".parse().unwrap(),
        };
        let task = run(
            &c,
            target,
            script,
            &stats,
            Rng::seeded(1),
            || true,
            |d| d,
            move |h| ch.lock().unwrap().push(h),
        );
        let _ = tokio::time::timeout(Duration::from_secs(100), task).await;
        let secs: Vec<u64> = at.lock().unwrap().iter().map(|d| d.as_secs()).collect();
        // First check at once; healthy → 5 s; two pending failures → 3 s each (unhealthy_edge_interval); ejected
        // → 7 s (unhealthy_interval); then the success is pending (healthy_threshold 2) → 2 s.
        assert_eq!(secs, [0, 5, 8, 11, 18, 20]);
        assert_eq!(*changes.lock().unwrap(), [true, false]);
        assert_eq!(stats.attempt.value(), 6);
    }

    /// A real HTTP server on 127.0.0.1:0 answering by path. (Real time: tokio's paused clock auto-advances
    /// while a task waits on a socket, which would fire the check's timeout spuriously.)
    async fn server() -> (SocketAddr, Arc<Mutex<Vec<http::HeaderMap>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        seen.lock().unwrap().push(req.headers().clone());
                        let (status, body) = match req.uri().path() {
                            "/ok" => (200, "pong"),
                            "/busy" => (503, ""),
                            _ => (404, ""),
                        };
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn http_checks_against_a_real_server() {
        let (addr, seen) = server().await;
        let stats = HealthCheckStats::detached();
        let mut checker = Checker::new(addr, "svc");
        let mut c = cfg(http("/ok"));
        if let CheckKind::Http(h) = &mut c.kind {
            h.receive = vec![b"po".to_vec()];
            h.request_headers.add.push(crate::route::HeaderAdd {
                name: http::HeaderName::from_static("x-hc"),
                value: http::HeaderValue::from_static("1"),
                action: crate::route::AppendAction::AppendIfExistsOrAdd,
            });
        }
        assert_eq!(checker.check(&c, &stats).await, CheckResult::Success);
        assert_eq!(checker.check(&c, &stats).await, CheckResult::Success);
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen[0]["host"], "svc");
            assert_eq!(seen[0]["user-agent"], "Envoy/HC");
            assert_eq!(seen[0]["x-hc"], "1");
        }
        let mut busy = cfg(http("/busy"));
        if let CheckKind::Http(h) = &mut busy.kind {
            h.retriable_statuses = vec![Range { start: 503, end: 504 }];
        }
        assert_eq!(checker.check(&busy, &stats).await, RETRIABLE);
        assert_eq!(checker.check(&cfg(http("/missing")), &stats).await, BAD_STATUS);
        // Nothing listens on the server's port once it is closed: a network failure.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        assert_eq!(Checker::new(dead, "svc").check(&c, &stats).await, NET);
        assert_eq!(stats.attempt.value(), 5);
        // The endpoint's health_check_config.hostname wins over the check's host.
        if let CheckKind::Http(h) = &mut c.kind {
            h.host = "configured".into();
        }
        let mut named = Checker::new(addr, "svc").with_hostname("example.com");
        assert_eq!(named.check(&c, &stats).await, CheckResult::Success);
        assert_eq!(
            Checker::new(addr, "svc").check(&c, &stats).await,
            CheckResult::Success
        );
        let seen = seen.lock().unwrap();
        let hosts: Vec<_> = seen[seen.len() - 2..].iter().map(|h| h["host"].clone()).collect();
        assert_eq!(hosts, ["example.com", "configured"]);
    }

    #[tokio::test]
    async fn tcp_checks_send_and_receive_payloads() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4];
                    while s.read_exact(&mut buf).await.is_ok() {
                        let reply: &[u8] = if &buf == b"ping" { b"pong" } else { b"nope" };
                        if s.write_all(reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let stats = HealthCheckStats::detached();
        let tcp = |send: &[u8], receive: &[u8]| {
            let mut c = cfg(CheckKind::Tcp(TcpCheck {
                send: send.to_vec(),
                receive: vec![receive.to_vec()],
            }));
            c.timeout = Duration::from_millis(300);
            c
        };
        let mut checker = Checker::new(addr, "svc");
        assert_eq!(
            checker.check(&tcp(b"ping", b"pong"), &stats).await,
            CheckResult::Success
        );
        assert_eq!(
            checker.check(&tcp(b"ping", b"pong"), &stats).await,
            CheckResult::Success
        );
        // A reply that never matches: the check times out.
        assert_eq!(
            checker.check(&tcp(b"pang", b"pong"), &stats).await,
            CheckResult::Failure {
                kind: FailureType::NetworkTimeout,
                retriable: false
            }
        );
    }

    /// A real h2c gRPC health server on 127.0.0.1:0: the answer depends on the `service` asked about
    /// (`serving`, `down`, `missing` trailers-only NOT_FOUND, `http503`, `two` two messages); it records each
    /// request's headers and service.
    async fn grpc_server() -> (SocketAddr, Arc<Mutex<Vec<(http::HeaderMap, String, String)>>>) {
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        fn framed(status: i32) -> Bytes {
            let m = prost::Message::encode_to_vec(&HealthCheckResponse { status });
            let mut f = vec![0u8];
            f.extend_from_slice(&(m.len() as u32).to_be_bytes());
            f.extend_from_slice(&m);
            Bytes::from(f)
        }
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let service = <HealthCheckRequest as prost::Message>::decode(&body[5..])
                                .unwrap()
                                .service;
                            let authority = parts.uri.authority().map(|a| a.to_string()).unwrap_or_default();
                            seen.lock()
                                .unwrap()
                                .push((parts.headers, authority, service.clone()));
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let (status, frames) = match service.as_str() {
                                "serving" => (200, vec![Frame::data(framed(1)), Frame::trailers(trailers)]),
                                "down" => (200, vec![Frame::data(framed(2)), Frame::trailers(trailers)]),
                                "two" => (
                                    200,
                                    vec![
                                        Frame::data(framed(1)),
                                        Frame::data(framed(1)),
                                        Frame::trailers(trailers),
                                    ],
                                ),
                                "http503" => (503, Vec::new()),
                                _ => (200, Vec::new()),
                            };
                            let mut resp = http::Response::builder()
                                .status(status)
                                .header("content-type", "application/grpc");
                            if service == "missing" {
                                resp = resp.header("grpc-status", "5");
                            }
                            let body = StreamBody::new(tokio_stream::iter(
                                frames.into_iter().map(Ok::<_, std::convert::Infallible>),
                            ));
                            Ok::<_, std::convert::Infallible>(resp.body(body).unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, seen)
    }

    fn grpc(service: &str, authority: &str) -> HealthCheckConfig {
        cfg(CheckKind::Grpc(GrpcCheck {
            service_name: service.into(),
            authority: authority.into(),
        }))
    }

    #[tokio::test]
    async fn grpc_checks_need_serving_and_status_ok() {
        let (addr, seen) = grpc_server().await;
        let stats = HealthCheckStats::detached();
        let mut checker = Checker::new(addr, "svc");
        assert_eq!(
            checker.check(&grpc("serving", ""), &stats).await,
            CheckResult::Success
        );
        assert_eq!(
            checker.check(&grpc("serving", "hc.example"), &stats).await,
            CheckResult::Success
        );
        for bad in ["down", "missing", "http503", "two"] {
            assert_eq!(checker.check(&grpc(bad, ""), &stats).await, BAD_STATUS, "{bad}");
        }
        {
            let seen = seen.lock().unwrap();
            let (h, authority, service) = &seen[0];
            assert_eq!((authority.as_str(), service.as_str()), ("svc", "serving"));
            assert_eq!(h["content-type"], "application/grpc");
            assert_eq!(h["te"], "trailers");
            assert_eq!(h["user-agent"], "Envoy/HC");
            assert_eq!(h["grpc-timeout"], "1000m");
            assert_eq!(seen[1].1, "hc.example");
            assert_eq!(seen.len(), 6);
        }
        let mut named = Checker::new(addr, "svc").with_hostname("example.com");
        assert_eq!(
            named.check(&grpc("serving", "hc.example"), &stats).await,
            CheckResult::Success
        );
        assert_eq!(seen.lock().unwrap()[6].1, "example.com");
        // The two successes shared a connection; a failure closes it.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        assert_eq!(
            Checker::new(dead, "svc")
                .check(&grpc("serving", ""), &stats)
                .await,
            NET
        );
    }

    #[test]
    fn grpc_response_bodies() {
        let frame = |flag: u8, status: i32| {
            let m = prost::Message::encode_to_vec(&HealthCheckResponse { status });
            let mut f = vec![flag];
            f.extend_from_slice(&(m.len() as u32).to_be_bytes());
            f.extend_from_slice(&m);
            f
        };
        assert!(grpc_serving(&frame(0, 1)));
        assert!(!grpc_serving(&frame(0, 2)));
        assert!(!grpc_serving(&frame(0, 0)));
        // Compressed, truncated, empty.
        assert!(!grpc_serving(&frame(1, 1)));
        assert!(!grpc_serving(&frame(0, 1)[..6]));
        assert!(!grpc_serving(&[]));
        // An empty message frame is skipped.
        let mut with_empty = vec![0, 0, 0, 0, 0];
        with_empty.extend(frame(0, 1));
        assert!(grpc_serving(&with_empty));
    }
}
