//! `envoy.filters.http.admission_control`
//! (`envoy.extensions.filters.http.admission_control.v3.AdmissionControl`): client-side throttling from the
//! success rate observed over a sliding window (Google SRE book, "Handling Overload").
//!
//! Per request, as Envoy's `AdmissionControlFilter`:
//! - disabled (`enabled.default_value: false`): passed, and not recorded;
//! - the window's average RPS below `rps_threshold`: passed, and recorded;
//! - otherwise rejected with probability ([`rejection_probability`])
//!   `min(max_rejection_probability, max(0, (total − successes / sr_threshold) / (total + 1)) ^ (1 / aggression))`,
//!   drawn to four significant figures (`10000 × p > random % 10000`). A rejection is a local 503 with an empty
//!   body and response code details `denied_by_admission_control`, no response flag; it counts in `rq_rejected`
//!   and is not recorded in the window (so the probability can fall back to 0);
//! - a forwarded request is recorded as a success or a failure when its response headers come back
//!   ([`SuccessCriteria`]); a gRPC response whose `grpc-status` is not in its headers is judged by its trailers,
//!   and not recorded if it ends without them (Envoy's `encodeTrailers`). A request reset before its response is
//!   not recorded (Envoy does not account for resets either).
//!
//! The window keeps one bucket per second and drops buckets older than `sampling_window` (whole seconds), as
//! Envoy's `ThreadLocalControllerImpl`. Envoy keeps one window per worker thread; Remora keeps one per filter
//! config, shared by the workers behind a mutex held for a few additions, so every worker sees the same rate.
//!
//! Stats under the connection manager's `http.<stat_prefix>.` scope: `admission_control.{rq_rejected,
//! rq_success, rq_failure}`.

use crate::body::{Body, EndOfStream};
use crate::config::node::Node;
use crate::filters::{
    feature_flag, local_reply, runtime_double, runtime_percent, runtime_u32, FilterReply, SharedRng,
};
use crate::stats::{Counter, Scope};
use http::{HeaderMap, Request, Response, StatusCode};
use pin_project::pin_project;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// What counts as a success (`SuccessCriteria`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuccessCriteria {
    /// Half-open `[start, end)` status ranges (`http_criteria`); by default every status below 500.
    pub http: Vec<(u16, u16)>,
    /// `grpc_criteria`; by default OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
    /// UNAUTHENTICATED, FAILED_PRECONDITION, OUT_OF_RANGE and UNIMPLEMENTED (Envoy's list in
    /// `success_criteria_evaluator.cc`; the proto comment also names PERMISSION_DENIED, the code does not).
    pub grpc: Vec<u32>,
}

const DEFAULT_GRPC_SUCCESS: [u32; 10] = [0, 1, 2, 3, 5, 6, 16, 9, 11, 12];

impl Default for SuccessCriteria {
    fn default() -> Self {
        SuccessCriteria {
            http: vec![(0, 500)],
            grpc: DEFAULT_GRPC_SUCCESS.to_vec(),
        }
    }
}

impl SuccessCriteria {
    pub fn http_success(&self, status: u16) -> bool {
        self.http.iter().any(|&(s, e)| s <= status && status < e)
    }

    pub fn grpc_success(&self, status: u32) -> bool {
        self.grpc.contains(&status)
    }

    fn lower(n: &Node) -> SuccessCriteria {
        let mut c = SuccessCriteria::default();
        if let Some(h) = n.msg("http_criteria") {
            let ranges = h.list("http_success_status");
            if ranges.is_empty() {
                h.err("http_success_status", "needs at least one range");
            }
            c.http = ranges
                .iter()
                .filter_map(|r| {
                    let (start, end) = (r.i64("start"), r.i64("end"));
                    // Envoy's validHttpRange.
                    let valid = start <= end && (100..600).contains(&start) && (100..=600).contains(&end);
                    if !valid {
                        r.err_here(format!("invalid HTTP range: [{start}, {end})"));
                        return None;
                    }
                    Some((start as u16, end as u16))
                })
                .collect();
        }
        if let Some(g) = n.msg("grpc_criteria") {
            let codes: Vec<u32> = g
                .message()
                .get_field_by_name("grpc_success_status")
                .and_then(|v| v.as_list().map(|l| l.iter().filter_map(|x| x.as_u32()).collect()))
                .unwrap_or_default();
            g.mark("grpc_success_status");
            if codes.is_empty() {
                g.err("grpc_success_status", "needs at least one code");
            }
            for &code in &codes {
                if code > 16 {
                    g.err("grpc_success_status", format!("invalid gRPC code {code}"));
                }
            }
            c.grpc = codes;
        }
        c
    }
}

/// The lowered filter config.
#[derive(Clone, Debug, PartialEq)]
pub struct AdmissionControlConfig {
    /// `enabled.default_value` (true when unset).
    pub enabled: bool,
    pub success: SuccessCriteria,
    /// `sampling_window`, truncated to whole seconds as Envoy does (default 30 s).
    pub sampling_window: Duration,
    /// `aggression.default_value`, at least 1 (default 1).
    pub aggression: f64,
    /// `sr_threshold.default_value` as a fraction (default 0.95).
    pub sr_threshold: f64,
    /// `rps_threshold.default_value` (default 0).
    pub rps_threshold: u32,
    /// `max_rejection_probability.default_value` as a fraction (default 0.8).
    pub max_rejection_probability: f64,
}

/// Lower `envoy.extensions.filters.http.admission_control.v3.AdmissionControl`.
pub fn lower(n: &Node) -> Option<AdmissionControlConfig> {
    let enabled = feature_flag(n, "enabled").unwrap_or(true);
    let success = match n.msg("success_criteria") {
        Some(s) => SuccessCriteria::lower(&s),
        None => {
            n.err("success_criteria", "is required");
            SuccessCriteria::default()
        }
    };
    let window = n.duration("sampling_window").unwrap_or(Duration::from_secs(30));
    let sampling_window = Duration::from_secs(window.as_secs());
    if sampling_window.is_zero() {
        n.err(
            "sampling_window",
            "must be at least 1s (Envoy rounds it down to whole seconds)",
        );
    }
    let sr = runtime_percent(n, "sr_threshold");
    if sr.is_some_and(|v| v < 1.0) {
        n.err("sr_threshold", "Success rate threshold cannot be less than 1.0%.");
    }
    Some(AdmissionControlConfig {
        enabled,
        success,
        sampling_window,
        aggression: runtime_double(n, "aggression").unwrap_or(1.0).max(1.0),
        sr_threshold: sr.unwrap_or(95.0).min(100.0) / 100.0,
        rps_threshold: runtime_u32(n, "rps_threshold").unwrap_or(0),
        max_rejection_probability: runtime_percent(n, "max_rejection_probability").unwrap_or(80.0) / 100.0,
    })
}

/// The probability of rejecting a request given the window's counts (Envoy's `shouldRejectRequest`).
pub fn rejection_probability(
    total: u32,
    successes: u32,
    sr_threshold: f64,
    aggression: f64,
    max_rejection_probability: f64,
) -> f64 {
    let total = f64::from(total);
    let p = ((total - f64::from(successes) / sr_threshold) / (total + 1.0)).max(0.0);
    let p = if aggression != 1.0 {
        p.powf(1.0 / aggression)
    } else {
        p
    };
    p.min(max_rejection_probability)
}

/// Whether a draw rejects at probability `p`: Envoy's `10000 × p > random % 10000`.
pub fn rejects(p: f64, random: u64) -> bool {
    10_000.0 * p > (random % 10_000) as f64
}

/// Request and success counts over a sliding window of one-second buckets.
#[derive(Debug)]
pub struct SuccessWindow {
    window: Duration,
    buckets: VecDeque<(Instant, u32, u32)>,
    requests: u32,
    successes: u32,
}

impl SuccessWindow {
    pub fn new(window: Duration) -> Self {
        SuccessWindow {
            window: window.max(Duration::from_secs(1)),
            buckets: VecDeque::new(),
            requests: 0,
            successes: 0,
        }
    }

    /// Drop stale buckets; start a new one when the newest is a second old (Envoy's `maybeUpdateHistoricalData`).
    fn update(&mut self, now: Instant) {
        while let Some(&(t, r, s)) = self.buckets.front() {
            if now.saturating_duration_since(t) < self.window {
                break;
            }
            self.requests -= r;
            self.successes -= s;
            self.buckets.pop_front();
        }
        let stale = self
            .buckets
            .back()
            .is_none_or(|&(t, _, _)| now.saturating_duration_since(t) >= Duration::from_secs(1));
        if stale {
            self.buckets.push_back((now, 0, 0));
        }
    }

    pub fn record(&mut self, now: Instant, success: bool) {
        self.update(now);
        self.requests += 1;
        self.successes += u32::from(success);
        if let Some(b) = self.buckets.back_mut() {
            b.1 += 1;
            b.2 += u32::from(success);
        }
    }

    /// (requests, successes) in the window.
    pub fn counts(&mut self, now: Instant) -> (u32, u32) {
        self.update(now);
        (self.requests, self.successes)
    }

    /// Requests per second: the window's requests over the longer of the window and the oldest bucket's age, in
    /// whole seconds (Envoy's `averageRps`, which does not drop stale buckets first).
    pub fn average_rps(&self, now: Instant) -> u32 {
        let Some(&(oldest, _, _)) = self.buckets.front() else {
            return 0;
        };
        if self.requests == 0 {
            return 0;
        }
        let secs = self
            .window
            .as_secs()
            .max(now.saturating_duration_since(oldest).as_secs())
            .max(1);
        (u64::from(self.requests) / secs) as u32
    }
}

/// `admission_control.*`.
#[derive(Clone, Debug)]
pub struct AdmissionControlStats {
    pub rq_rejected: Counter,
    pub rq_success: Counter,
    pub rq_failure: Counter,
}

impl AdmissionControlStats {
    /// Under `scope` (the connection manager's `http.<stat_prefix>.`).
    pub fn new(scope: &Scope) -> Self {
        let s = scope.scope("admission_control.");
        AdmissionControlStats {
            rq_rejected: s.counter("rq_rejected"),
            rq_success: s.counter("rq_success"),
            rq_failure: s.counter("rq_failure"),
        }
    }
}

/// The shared state of one filter config: its settings, window and stats.
#[derive(Debug)]
pub struct AdmissionController {
    cfg: AdmissionControlConfig,
    window: Mutex<SuccessWindow>,
    stats: AdmissionControlStats,
}

impl AdmissionController {
    pub fn new(cfg: AdmissionControlConfig, scope: &Scope) -> Arc<Self> {
        Arc::new(AdmissionController {
            window: Mutex::new(SuccessWindow::new(cfg.sampling_window)),
            stats: AdmissionControlStats::new(scope),
            cfg,
        })
    }

    fn window(&self) -> std::sync::MutexGuard<'_, SuccessWindow> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether to reject a request at `now` with this random draw.
    pub fn should_reject(&self, now: Instant, random: u64) -> bool {
        let c = &self.cfg;
        let (total, successes) = {
            let mut w = self.window();
            if w.average_rps(now) < c.rps_threshold {
                return false;
            }
            w.counts(now)
        };
        let p = rejection_probability(
            total,
            successes,
            c.sr_threshold,
            c.aggression,
            c.max_rejection_probability,
        );
        rejects(p, random)
    }

    pub fn record(&self, now: Instant, success: bool) {
        self.window().record(now, success);
        if success {
            self.stats.rq_success.inc();
        } else {
            self.stats.rq_failure.inc();
        }
    }

    /// Judge a response by its headers: `Some(success)`, or `None` when a gRPC status must come from trailers.
    fn judge_headers(&self, resp: &Response<Body>) -> Option<bool> {
        match grpc_response(resp) {
            Some(Some(status)) => Some(self.cfg.success.grpc_success(status)),
            Some(None) => None,
            None => Some(self.cfg.success.http_success(resp.status().as_u16())),
        }
    }
}

/// Envoy's `isGrpcResponseHeaders` and `getGrpcStatus`: `None` for a plain HTTP response; `Some(status)` for a
/// gRPC one, the status `None` when it is not in the headers. An unparsable status is `u32::MAX` (a failure).
fn grpc_response(resp: &Response<Body>) -> Option<Option<u32>> {
    use http_body::Body as _;
    let headers = resp.headers();
    let status = headers.get("grpc-status");
    let grpc = if resp.body().is_end_stream() {
        // A trailers-only response: the status header is what makes it gRPC.
        status.is_some()
    } else {
        resp.status() == StatusCode::OK
            && headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| {
                    ct == "application/grpc"
                        || ct.starts_with("application/grpc+")
                        || ct.starts_with("application/grpc;")
                })
    };
    grpc.then(|| status.map(|v| parse_grpc_status(v.as_bytes())))
}

fn parse_grpc_status(v: &[u8]) -> u32 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Records a gRPC response's success from its trailers.
struct TrailerJudge {
    controller: Arc<AdmissionController>,
}

impl EndOfStream for TrailerJudge {
    fn trailers(&mut self, trailers: &HeaderMap) {
        let ok = trailers
            .get("grpc-status")
            .map(|v| parse_grpc_status(v.as_bytes()))
            .is_some_and(|s| self.controller.cfg.success.grpc_success(s));
        self.controller.record(Instant::now(), ok);
    }

    fn end(&mut self, _complete: bool, _bytes: u64) {}
}

/// The layer: one per worker, over the shared [`AdmissionController`].
#[derive(Clone, Debug)]
pub struct AdmissionControlLayer {
    controller: Arc<AdmissionController>,
    rng: SharedRng,
}

impl AdmissionControlLayer {
    pub fn new(controller: Arc<AdmissionController>, rng: SharedRng) -> Self {
        AdmissionControlLayer { controller, rng }
    }
}

impl<S> tower::Layer<S> for AdmissionControlLayer {
    type Service = AdmissionControl<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionControl {
            inner,
            controller: self.controller.clone(),
            rng: self.rng.clone(),
        }
    }
}

/// The filter's service. Readiness is the inner service's; the decision is made in `call`, where the request is
/// (a random draw per request has no capacity to reserve).
#[derive(Clone, Debug)]
pub struct AdmissionControl<S> {
    inner: S,
    controller: Arc<AdmissionController>,
    rng: SharedRng,
}

impl<S, B> tower::Service<Request<B>> for AdmissionControl<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let c = &self.controller;
        if !c.cfg.enabled {
            return ResponseFuture::Forwarded {
                fut: self.inner.call(req),
                controller: None,
            };
        }
        let random = self.rng.borrow_mut().next_u64();
        if c.should_reject(Instant::now(), random) {
            c.stats.rq_rejected.inc();
            let reply = FilterReply {
                details: "denied_by_admission_control",
                flag: None,
            };
            return ResponseFuture::Rejected {
                resp: Some(Box::new(local_reply(StatusCode::SERVICE_UNAVAILABLE, "", reply))),
            };
        }
        ResponseFuture::Forwarded {
            fut: self.inner.call(req),
            controller: Some(c.clone()),
        }
    }
}

/// The response future: the inner one, judged when it yields its headers, or a local reply.
#[pin_project(project = ResponseFutureProj)]
pub enum ResponseFuture<F> {
    Forwarded {
        #[pin]
        fut: F,
        controller: Option<Arc<AdmissionController>>,
    },
    /// Boxed: a local reply is much larger than most inner futures.
    Rejected { resp: Option<Box<Response<Body>>> },
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Forwarded { fut, controller } => {
                let Ok(resp) = ready!(fut.poll(cx));
                let Some(c) = controller.take() else {
                    return Poll::Ready(Ok(resp));
                };
                match c.judge_headers(&resp) {
                    Some(ok) => {
                        c.record(Instant::now(), ok);
                        Poll::Ready(Ok(resp))
                    }
                    None => {
                        let (parts, body) = resp.into_parts();
                        let body = body.on_end(Box::new(TrailerJudge { controller: c }));
                        Poll::Ready(Ok(Response::from_parts(parts, body)))
                    }
                }
            }
            ResponseFutureProj::Rejected { resp } => match resp.take() {
                Some(r) => Poll::Ready(Ok(*r)),
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests;
