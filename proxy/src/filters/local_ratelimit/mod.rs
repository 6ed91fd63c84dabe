//! `envoy.filters.http.local_ratelimit`
//! (`envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`): a token bucket per filter config, and
//! one per route that configures the filter in `typed_per_filter_config`.
//!
//! Per request, as Envoy's `local_ratelimit` filter (`decodeHeaders`):
//! - the route's limiter if it has one (the most specific `typed_per_filter_config`), else the filter's;
//! - not enabled for this request (`filter_enabled`, a fraction, 0 % by default): passed, uncounted;
//! - `enabled` counts; a token taken counts `ok` and passes;
//! - no token: `rate_limited` counts; not enforced for this request (`filter_enforced`, 0 % by default): the
//!   request passes with `request_headers_to_add_when_not_enforced`; enforced: `enforced` counts and the request
//!   is answered locally with `status` (429 by default, and for any status below 400), body `local_rate_limited`,
//!   `response_headers_to_add`, response code details `local_rate_limited` and response flag `RL`.
//!
//! Envoy's local rate limit sets no `x-envoy-ratelimited` header (the global `ratelimit` filter does); add it
//! with `response_headers_to_add` when clients expect it.
//!
//! The bucket ([`TokenBucket`]) holds `max_tokens` at first and gains `tokens_per_fill` at every whole
//! `fill_interval` since it was made, capped at `max_tokens`, as Envoy's timer-driven bucket; here the fills are
//! counted when a request looks, not by a timer. Its state is two atomics shared by every worker.
//!
//! Stats at the root of the store: `<stat_prefix>.http_local_rate_limit.{enabled, ok, rate_limited, enforced}`.

use crate::body::Body;
use crate::config::node::Node;
use crate::config::route::header_adds;
use crate::filters::{
    error_status, local_reply, runtime_fraction, FilterReply, FractionalPercent, ResponseFlag, SharedRng,
};
use crate::route::{HeaderAdd, HeaderMods};
use crate::stats::{Counter, Scope};
use http::{Request, Response, StatusCode};
use pin_project::pin_project;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// `envoy.type.v3.TokenBucket`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucketConfig {
    pub max_tokens: u32,
    /// Default 1.
    pub tokens_per_fill: u32,
    /// At least 50 ms.
    pub fill_interval: Duration,
}

/// The lowered filter (or per-route) config.
#[derive(Clone, Debug)]
pub struct LocalRateLimitConfig {
    pub stat_prefix: String,
    /// `None`: no limit (a global config that only enables per-route limits).
    pub token_bucket: Option<TokenBucketConfig>,
    pub filter_enabled: FractionalPercent,
    pub filter_enforced: FractionalPercent,
    pub status: StatusCode,
    pub response_headers_to_add: Vec<HeaderAdd>,
    pub request_headers_to_add_when_not_enforced: Vec<HeaderAdd>,
}

/// Lower the filter's config (`per_route: false`) or a route's `typed_per_filter_config` entry (`per_route:
/// true`, where the token bucket is required).
pub fn lower(n: &Node, per_route: bool) -> Option<LocalRateLimitConfig> {
    let stat_prefix = n.string("stat_prefix").unwrap_or_default();
    if stat_prefix.is_empty() {
        n.err("stat_prefix", "is required");
    }
    let status = error_status(n, "status", StatusCode::TOO_MANY_REQUESTS);
    let token_bucket = match n.msg("token_bucket") {
        Some(b) => {
            let max_tokens = b.u32("max_tokens");
            let tokens_per_fill = match b.wrapped_u32("tokens_per_fill") {
                Some(0) => {
                    b.err("tokens_per_fill", "must be greater than 0");
                    1
                }
                Some(v) => v,
                None => 1,
            };
            let fill_interval = b.duration("fill_interval").unwrap_or_default();
            if fill_interval < Duration::from_millis(50) {
                b.err("fill_interval", "is required and must be at least 50ms");
            }
            Some(TokenBucketConfig {
                max_tokens,
                tokens_per_fill,
                fill_interval: fill_interval.max(Duration::from_millis(50)),
            })
        }
        None => {
            if per_route {
                n.err(
                    "token_bucket",
                    "local rate limit token bucket must be set for per filter configs",
                );
            }
            None
        }
    };
    let filter_enabled = runtime_fraction(n, "filter_enabled").unwrap_or(FractionalPercent::ZERO);
    let filter_enforced = runtime_fraction(n, "filter_enforced").unwrap_or(FractionalPercent::ZERO);
    let response_headers_to_add = header_adds(n, "response_headers_to_add");
    let request_headers_to_add_when_not_enforced = header_adds(n, "request_headers_to_add_when_not_enforced");
    // Used only with descriptors, which Remora does not implement; zero is their default.
    let stage = n.u32("stage");
    if stage > 10 {
        n.err("stage", "must be at most 10");
    }
    if n.bool("local_rate_limit_per_downstream_connection") {
        n.err(
            "local_rate_limit_per_downstream_connection",
            "not supported by Remora",
        );
    }
    if n.bool("rate_limited_as_resource_exhausted") {
        n.err("rate_limited_as_resource_exhausted", "not supported by Remora");
    }
    if n.bool("enable_retry_after_header") {
        n.err("enable_retry_after_header", "not supported by Remora");
    }
    match n.enum_name("enable_x_ratelimit_headers").as_str() {
        "OFF" | "0" => {}
        other => n.err(
            "enable_x_ratelimit_headers",
            format!("{other} is not supported by Remora"),
        ),
    }
    n.unsupported("descriptors");
    n.unsupported("local_cluster_rate_limit");
    n.unsupported("rate_limits");
    n.unsupported("vh_rate_limits");
    n.unsupported("always_consume_default_token_bucket");
    n.unsupported("max_dynamic_descriptors");
    Some(LocalRateLimitConfig {
        stat_prefix,
        token_bucket,
        filter_enabled,
        filter_enforced,
        status,
        response_headers_to_add,
        request_headers_to_add_when_not_enforced,
    })
}

/// A token bucket shared by every worker: the tokens, and the next fill's time, as atomics.
#[derive(Debug)]
pub struct TokenBucket {
    cfg: TokenBucketConfig,
    tokens: AtomicU32,
    /// The next fill, in nanoseconds since `base`.
    next_fill: AtomicU64,
    base: Instant,
}

impl TokenBucket {
    /// A full bucket made at `now`.
    pub fn new(cfg: TokenBucketConfig, now: Instant) -> Self {
        TokenBucket {
            tokens: AtomicU32::new(cfg.max_tokens),
            next_fill: AtomicU64::new(cfg.fill_interval.as_nanos() as u64),
            base: now,
            cfg,
        }
    }

    /// Add the fills due by `now`; of racing callers, the one that moves the fill time adds them.
    fn refill(&self, now: Instant) {
        let now = now.saturating_duration_since(self.base).as_nanos() as u64;
        let interval = (self.cfg.fill_interval.as_nanos() as u64).max(1);
        let mut next = self.next_fill.load(Relaxed);
        while now >= next {
            let fills = (now - next) / interval + 1;
            match self
                .next_fill
                .compare_exchange_weak(next, next + fills * interval, Relaxed, Relaxed)
            {
                Ok(_) => {
                    let add = u32::try_from(fills.saturating_mul(u64::from(self.cfg.tokens_per_fill)))
                        .unwrap_or(u32::MAX);
                    let max = self.cfg.max_tokens;
                    let _ = self
                        .tokens
                        .fetch_update(Relaxed, Relaxed, |t| Some(t.saturating_add(add).min(max)));
                    return;
                }
                Err(current) => next = current,
            }
        }
    }

    /// Take a token at `now`, if there is one.
    pub fn try_take(&self, now: Instant) -> bool {
        self.refill(now);
        self.tokens
            .fetch_update(Relaxed, Relaxed, |t| t.checked_sub(1))
            .is_ok()
    }

    pub fn tokens(&self) -> u32 {
        self.tokens.load(Relaxed)
    }
}

/// `<stat_prefix>.http_local_rate_limit.*`.
#[derive(Clone, Debug)]
pub struct LocalRateLimitStats {
    pub enabled: Counter,
    pub ok: Counter,
    pub rate_limited: Counter,
    pub enforced: Counter,
}

impl LocalRateLimitStats {
    /// Under `root` (the store's root scope) and `stat_prefix`.
    pub fn new(root: &Scope, stat_prefix: &str) -> Self {
        let s = root.scope(&format!("{stat_prefix}.http_local_rate_limit."));
        LocalRateLimitStats {
            enabled: s.counter("enabled"),
            ok: s.counter("ok"),
            rate_limited: s.counter("rate_limited"),
            enforced: s.counter("enforced"),
        }
    }
}

/// One limiter: a config's bucket, fractions, headers and stats. The filter has one; each route that configures
/// the filter has its own, so its bucket is unique to the route.
#[derive(Debug)]
pub struct LocalRateLimiter {
    bucket: Option<TokenBucket>,
    filter_enabled: FractionalPercent,
    filter_enforced: FractionalPercent,
    status: StatusCode,
    response_headers: HeaderMods,
    request_headers: HeaderMods,
    stats: LocalRateLimitStats,
}

/// What a limiter decided for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not enabled for this request, or a token was taken.
    Pass,
    /// No token, not enforced: pass with `request_headers_to_add_when_not_enforced`.
    LimitedNotEnforced,
    /// No token, enforced: answer locally.
    Reject,
}

impl LocalRateLimiter {
    /// A limiter made at `now`, its stats under `root` (the store's root scope).
    pub fn new(cfg: &LocalRateLimitConfig, root: &Scope, now: Instant) -> Arc<Self> {
        Arc::new(LocalRateLimiter {
            bucket: cfg.token_bucket.map(|b| TokenBucket::new(b, now)),
            filter_enabled: cfg.filter_enabled,
            filter_enforced: cfg.filter_enforced,
            status: cfg.status,
            response_headers: HeaderMods {
                add: cfg.response_headers_to_add.clone(),
                remove: Vec::new(),
            },
            request_headers: HeaderMods {
                add: cfg.request_headers_to_add_when_not_enforced.clone(),
                remove: Vec::new(),
            },
            stats: LocalRateLimitStats::new(root, &cfg.stat_prefix),
        })
    }

    /// Decide for a request at `now`, with two random draws (enabled, enforced).
    pub fn decide(&self, now: Instant, random_enabled: u64, random_enforced: u64) -> Decision {
        if !self.filter_enabled.enabled(random_enabled) {
            return Decision::Pass;
        }
        self.stats.enabled.inc();
        // Without a bucket no rate limiting is applied.
        if self.bucket.as_ref().is_none_or(|b| b.try_take(now)) {
            self.stats.ok.inc();
            return Decision::Pass;
        }
        self.stats.rate_limited.inc();
        if !self.filter_enforced.enabled(random_enforced) {
            return Decision::LimitedNotEnforced;
        }
        self.stats.enforced.inc();
        Decision::Reject
    }

    fn rejection(&self) -> Response<Body> {
        let mut r = local_reply(
            self.status,
            "local_rate_limited",
            FilterReply {
                details: "local_rate_limited",
                flag: Some(ResponseFlag::RateLimited),
            },
        );
        self.response_headers.apply(r.headers_mut());
        r
    }
}

/// A route's limiter, put into the request's extensions by whoever matched the route, before this filter runs
/// (Envoy resolves the most specific `typed_per_filter_config`: route, then virtual host, then route table).
#[derive(Clone, Debug)]
pub struct RouteLocalRateLimit(pub Arc<LocalRateLimiter>);

/// The layer: one per worker, over the filter's shared limiter.
#[derive(Clone, Debug)]
pub struct LocalRateLimitLayer {
    limiter: Arc<LocalRateLimiter>,
    rng: SharedRng,
}

impl LocalRateLimitLayer {
    pub fn new(limiter: Arc<LocalRateLimiter>, rng: SharedRng) -> Self {
        LocalRateLimitLayer { limiter, rng }
    }
}

impl<S> tower::Layer<S> for LocalRateLimitLayer {
    type Service = LocalRateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LocalRateLimit {
            inner,
            limiter: self.limiter.clone(),
            rng: self.rng.clone(),
        }
    }
}

/// The filter's service. Readiness is the inner service's: a token is taken in `call`, because which bucket
/// applies depends on the request's route.
#[derive(Clone, Debug)]
pub struct LocalRateLimit<S> {
    inner: S,
    limiter: Arc<LocalRateLimiter>,
    rng: SharedRng,
}

impl<S, B> tower::Service<Request<B>> for LocalRateLimit<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let limiter = match req.extensions().get::<RouteLocalRateLimit>() {
            Some(r) => r.0.clone(),
            None => self.limiter.clone(),
        };
        let (a, b) = {
            let mut rng = self.rng.borrow_mut();
            (rng.next_u64(), rng.next_u64())
        };
        match limiter.decide(Instant::now(), a, b) {
            Decision::Pass => ResponseFuture::Forwarded {
                fut: self.inner.call(req),
            },
            Decision::LimitedNotEnforced => {
                limiter.request_headers.apply(req.headers_mut());
                ResponseFuture::Forwarded {
                    fut: self.inner.call(req),
                }
            }
            Decision::Reject => ResponseFuture::Rejected {
                resp: Some(Box::new(limiter.rejection())),
            },
        }
    }
}

/// The response future: the inner one, or a local reply.
#[pin_project(project = ResponseFutureProj)]
pub enum ResponseFuture<F> {
    Forwarded {
        #[pin]
        fut: F,
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
            ResponseFutureProj::Forwarded { fut } => fut.poll(cx),
            ResponseFutureProj::Rejected { resp } => match resp.take() {
                Some(r) => Poll::Ready(Ok(*r)),
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests;
