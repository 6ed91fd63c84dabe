//! `envoy.filters.http.adaptive_concurrency`
//! (`envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency`): caps the number of requests
//! outstanding through the filter at a limit that the [gradient controller](gradient) adapts to the measured
//! latency, and answers the excess at once.
//!
//! Per request, as Envoy's `AdaptiveConcurrencyFilter`:
//! - when the filter is disabled (`enabled.default_value: false`) the request passes untouched;
//! - when as many requests are outstanding as the limit allows, it is answered locally with
//!   `concurrency_limit_exceeded_status` (503 by default, and 503 for any status below 400), body
//!   `reached concurrency limit`, response code details `reached_concurrency_limit`, no response flag and no
//!   `x-envoy-*` header; `rq_blocked` counts it;
//! - otherwise it is forwarded and its latency, from the forwarding decision to the response, is sampled.
//!
//! **When a request completes.** Envoy samples at `encodeComplete`, when the last byte of the response was
//! encoded, and forgets the request (without a sample) if the stream is destroyed before. Remora samples when the
//! response headers come back from the inner service: the time to first byte is the upstream's service time,
//! which is what the gradient compares with minRTT, and it does not count the client's download of a large body
//! against the upstream. A request whose response future is dropped first (the client went away) is forgotten,
//! as in Envoy.
//!
//! Stats, under the connection manager's `http.<stat_prefix>.` scope, named as Envoy's
//! `ALL_GRADIENT_CONTROLLER_STATS`: `adaptive_concurrency.gradient_controller.{rq_blocked,
//! min_rtt_calculation_active, concurrency_limit, gradient (×1000), burst_queue_size, min_rtt_msecs,
//! sample_rtt_msecs}`.
//!
//! Shared state: one controller serves every worker. The forwarding decision is two atomic loads and an
//! increment, plus a lock only when a timer of the controller is due; a latency sample takes the controller's
//! mutex, as Envoy's `sample_mutation_mtx_`.

pub mod gradient;

use crate::body::Body;
use crate::config::node::Node;
use crate::filters::{error_status, feature_flag, local_reply, FilterReply};
use crate::stats::{Counter, Gauge, Scope};
use crate::upstream::lb::Rng;
use gradient::{Gradient, GradientConfig};
use http::{Request, Response, StatusCode};
use pin_project::pin_project;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// The lowered filter config.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveConcurrencyConfig {
    pub gradient: GradientConfig,
    /// `enabled.default_value` (true when `enabled` is unset).
    pub enabled: bool,
    /// `concurrency_limit_exceeded_status` (503 by default or when below 400).
    pub status: StatusCode,
}

/// Lower `envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency`.
pub fn lower(n: &Node) -> Option<AdaptiveConcurrencyConfig> {
    let enabled = feature_flag(n, "enabled").unwrap_or(true);
    let status = error_status(
        n,
        "concurrency_limit_exceeded_status",
        StatusCode::SERVICE_UNAVAILABLE,
    );
    let Some(g) = n.msg("gradient_controller_config") else {
        n.err("gradient_controller_config", "is required");
        return None;
    };
    let percentile = g.percent("sample_aggregate_percentile").unwrap_or(0.5);
    let Some(limit) = g.msg("concurrency_limit_params") else {
        g.err("concurrency_limit_params", "is required");
        return None;
    };
    let Some(rtt) = g.msg("min_rtt_calc_params") else {
        g.err("min_rtt_calc_params", "is required");
        return None;
    };
    let positive = |n: &Node, field: &str, default: u32| match n.wrapped_u32(field) {
        Some(0) => {
            n.err(field, "must be greater than 0");
            default
        }
        Some(v) => v,
        None => default,
    };
    let max_concurrency_limit = positive(&limit, "max_concurrency_limit", 1000);
    let update = limit.duration("concurrency_update_interval");
    let update = match update {
        Some(d) if !d.is_zero() => d,
        _ => {
            limit.err("concurrency_update_interval", "is required and must be positive");
            Duration::from_secs(1)
        }
    };
    let min_concurrency = positive(&rtt, "min_concurrency", 3);
    let min_concurrency_limit = positive(&limit, "min_concurrency_limit", min_concurrency);
    let request_count = positive(&rtt, "request_count", 50);
    let jitter = rtt.percent("jitter").unwrap_or(0.15);
    let buffer = rtt.percent("buffer").unwrap_or(0.25);
    let fixed = rtt.duration("fixed_value").filter(|d| !d.is_zero());
    let interval = rtt.duration("interval");
    let interval = match (interval, fixed) {
        (Some(i), _) if i >= Duration::from_millis(1) => i,
        (Some(i), None) if i.is_zero() => {
            rtt.err(
                "fixed_value",
                "is required when interval is zero (minRTT is not sampled)",
            );
            Duration::ZERO
        }
        (Some(_), _) => {
            rtt.err("interval", "must be at least 1ms");
            Duration::ZERO
        }
        (None, Some(_)) => Duration::ZERO,
        (None, None) => {
            rtt.err("interval", "is required unless fixed_value is set");
            Duration::ZERO
        }
    };
    if min_concurrency_limit > max_concurrency_limit {
        limit.err(
            "min_concurrency_limit",
            format!("{min_concurrency_limit} is above max_concurrency_limit ({max_concurrency_limit})"),
        );
    }
    Some(AdaptiveConcurrencyConfig {
        gradient: GradientConfig {
            sample_aggregate_percentile: percentile,
            max_concurrency_limit,
            concurrency_update_interval: update,
            min_concurrency_limit,
            min_rtt_interval: interval,
            fixed_min_rtt: fixed,
            request_count,
            jitter,
            min_concurrency,
            buffer,
        },
        enabled,
        status,
    })
}

/// `adaptive_concurrency.gradient_controller.*`.
#[derive(Clone, Debug)]
pub struct GradientStats {
    pub rq_blocked: Counter,
    pub min_rtt_calculation_active: Gauge,
    pub concurrency_limit: Gauge,
    pub gradient: Gauge,
    pub burst_queue_size: Gauge,
    pub min_rtt_msecs: Gauge,
    pub sample_rtt_msecs: Gauge,
}

impl GradientStats {
    /// Under `scope` (the connection manager's `http.<stat_prefix>.`).
    pub fn new(scope: &Scope) -> Self {
        let s = scope.scope("adaptive_concurrency.gradient_controller.");
        GradientStats {
            rq_blocked: s.counter("rq_blocked"),
            min_rtt_calculation_active: s.gauge("min_rtt_calculation_active"),
            concurrency_limit: s.gauge("concurrency_limit"),
            gradient: s.gauge("gradient"),
            burst_queue_size: s.gauge("burst_queue_size"),
            min_rtt_msecs: s.gauge("min_rtt_msecs"),
            sample_rtt_msecs: s.gauge("sample_rtt_msecs"),
        }
    }
}

struct Locked {
    gradient: Gradient,
    rng: Rng,
}

/// The controller shared by every worker: the gradient state behind a mutex, and what the forwarding decision
/// reads as atomics.
pub struct Controller {
    locked: Mutex<Locked>,
    limit: AtomicU32,
    outstanding: AtomicU32,
    /// The controller's next timer, in nanoseconds since `base` (`u64::MAX`: none).
    next_deadline: AtomicU64,
    base: Instant,
    enabled: bool,
    status: StatusCode,
    stats: GradientStats,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("limit", &self.limit.load(Relaxed))
            .field("outstanding", &self.outstanding.load(Relaxed))
            .finish()
    }
}

impl Controller {
    /// A controller created at `now` (it starts measuring minRTT), with `rng` for its jitter.
    pub fn new(cfg: &AdaptiveConcurrencyConfig, scope: &Scope, now: Instant, rng: Rng) -> Arc<Self> {
        let gradient = Gradient::new(cfg.gradient.clone(), now);
        let c = Controller {
            limit: AtomicU32::new(gradient.limit()),
            outstanding: AtomicU32::new(0),
            next_deadline: AtomicU64::new(u64::MAX),
            base: now,
            enabled: cfg.enabled,
            status: cfg.status,
            stats: GradientStats::new(scope),
            locked: Mutex::new(Locked { gradient, rng }),
        };
        {
            let l = c.lock();
            c.publish(&l.gradient);
        }
        Arc::new(c)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Locked> {
        self.locked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Mirror the gradient state into the atomics and gauges.
    fn publish(&self, g: &Gradient) {
        self.limit.store(g.limit(), Relaxed);
        let next = g.next_deadline().map_or(u64::MAX, |t| self.nanos(t));
        self.next_deadline.store(next, Relaxed);
        let r = g.readings();
        let s = &self.stats;
        s.concurrency_limit.set(i64::from(g.limit()));
        s.min_rtt_calculation_active.set(i64::from(g.in_min_rtt_window()));
        s.gradient.set((r.gradient * 1000.0) as i64);
        s.burst_queue_size.set(r.burst_headroom as i64);
        s.min_rtt_msecs.set(r.min_rtt.as_millis() as i64);
        s.sample_rtt_msecs.set(r.sample_rtt.as_millis() as i64);
    }

    /// The current limit.
    pub fn concurrency_limit(&self) -> u32 {
        self.limit.load(Relaxed)
    }

    /// Requests forwarded and not yet completed.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Relaxed)
    }

    /// Envoy's `forwardingDecision`: a permit if fewer requests are outstanding than the limit.
    pub fn try_acquire(self: &Arc<Self>, now: Instant) -> Option<Permit> {
        if self.nanos(now) >= self.next_deadline.load(Relaxed) {
            let mut l = self.lock();
            l.gradient.advance(now);
            self.publish(&l.gradient);
        }
        // Like Envoy, a load and an increment: racing workers may overshoot the limit by one each.
        if self.outstanding.load(Relaxed) < self.limit.load(Relaxed) {
            self.outstanding.fetch_add(1, Relaxed);
            Some(Permit {
                controller: self.clone(),
                sent: now,
                done: false,
            })
        } else {
            self.stats.rq_blocked.inc();
            None
        }
    }

    fn record(&self, sent: Instant, now: Instant) {
        self.outstanding.fetch_sub(1, Relaxed);
        let mut l = self.lock();
        let Locked { gradient, rng } = &mut *l;
        gradient.record(sent, now, rng);
        self.publish(gradient);
    }

    fn cancel(&self) {
        self.outstanding.fetch_sub(1, Relaxed);
    }

    fn rejection(&self) -> Response<Body> {
        local_reply(
            self.status,
            "reached concurrency limit",
            FilterReply {
                details: "reached_concurrency_limit",
                flag: None,
            },
        )
    }
}

/// One outstanding request. [`Permit::complete`] samples its latency; dropping it uncompleted forgets the request
/// (Envoy's `cancelLatencySample`).
#[derive(Debug)]
pub struct Permit {
    controller: Arc<Controller>,
    sent: Instant,
    done: bool,
}

impl Permit {
    pub fn complete(mut self, now: Instant) {
        self.done = true;
        self.controller.record(self.sent, now);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.controller.cancel();
        }
    }
}

/// The layer: one per worker, over the shared [`Controller`].
#[derive(Clone, Debug)]
pub struct AdaptiveConcurrencyLayer {
    controller: Arc<Controller>,
}

impl AdaptiveConcurrencyLayer {
    pub fn new(controller: Arc<Controller>) -> Self {
        AdaptiveConcurrencyLayer { controller }
    }
}

impl<S> tower::Layer<S> for AdaptiveConcurrencyLayer {
    type Service = AdaptiveConcurrency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdaptiveConcurrency {
            inner,
            controller: self.controller.clone(),
            permit: None,
        }
    }
}

/// The filter's service. `poll_ready` takes a permit (or notes that there is none) once the inner service is
/// ready; `call` spends it, or answers locally. A clone does not copy the permit.
#[derive(Debug)]
pub struct AdaptiveConcurrency<S> {
    inner: S,
    controller: Arc<Controller>,
    permit: Option<Result<Permit, ()>>,
}

impl<S: Clone> Clone for AdaptiveConcurrency<S> {
    fn clone(&self) -> Self {
        AdaptiveConcurrency {
            inner: self.inner.clone(),
            controller: self.controller.clone(),
            permit: None,
        }
    }
}

impl<S, B> tower::Service<Request<B>> for AdaptiveConcurrency<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready!(self.inner.poll_ready(cx))?;
        if self.controller.enabled && self.permit.is_none() {
            self.permit = Some(self.controller.try_acquire(Instant::now()).ok_or(()));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if !self.controller.enabled {
            return ResponseFuture::Forwarded {
                fut: self.inner.call(req),
                permit: None,
            };
        }
        // `call` without `poll_ready` is a contract breach in tower; decide now rather than panic.
        let permit = self
            .permit
            .take()
            .unwrap_or_else(|| self.controller.try_acquire(Instant::now()).ok_or(()));
        match permit {
            Ok(p) => ResponseFuture::Forwarded {
                fut: self.inner.call(req),
                permit: Some(p),
            },
            Err(()) => ResponseFuture::Rejected {
                resp: Some(Box::new(self.controller.rejection())),
            },
        }
    }
}

/// The response future: the inner one with the request's permit, or a local reply.
#[pin_project(project = ResponseFutureProj)]
pub enum ResponseFuture<F> {
    Forwarded {
        #[pin]
        fut: F,
        permit: Option<Permit>,
    },
    Rejected {
        resp: Option<Box<Response<Body>>>,
    },
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Forwarded { fut, permit } => {
                let resp = ready!(fut.poll(cx));
                if let Some(p) = permit.take() {
                    p.complete(Instant::now());
                }
                Poll::Ready(resp)
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
