//! `envoy.filters.http.health_check` (`envoy.extensions.filters.http.health_check.v3.HealthCheck`): answer
//! other proxies' HTTP health checks of this one, so that `/healthcheck/fail` (and draining) takes it out of
//! their balancing.
//!
//! Per request, as Envoy's `HealthCheckFilter` without pass-through (`pass_through_mode: false`, the only mode
//! Remora offers): a request whose headers match every configured `headers` matcher is a health check and is
//! answered locally with 200 (an empty body), or with 503 and response
//! flag `LH` (`FailedLocalHealthCheck`) while the server fails health checks (`/healthcheck/fail`, or draining);
//! every other request passes to the next filter. While failing, every response through the filter (the answer
//! and forwarded ones) carries `x-envoy-immediate-health-check-fail: true`, which tells a downstream Envoy to
//! eject this host at once.
//!
//! Refused: `pass_through_mode: true`, `cache_time`, `cluster_min_healthy_percentages`.

use crate::body::Body;
use crate::config::node::Node;
use crate::filters::{local_reply, FilterReply, ResponseFlag};
use crate::route::HeaderMatcher;
use crate::server::{Shared, State};
use http::{HeaderValue, Request, Response, StatusCode};
use pin_project::pin_project;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Tells a downstream Envoy to eject this host at once.
const IMMEDIATE_FAIL: &str = "x-envoy-immediate-health-check-fail";

/// The lowered filter config: which requests are health checks.
#[derive(Debug)]
pub struct HealthCheckFilterConfig {
    pub headers: Vec<Matcher>,
}

/// One `headers` entry: a header, or one of the pseudo-headers health checks are usually told apart by.
#[derive(Debug)]
pub enum Matcher {
    Header(HeaderMatcher),
    Path(HeaderMatcher),
    Authority(HeaderMatcher),
    Method(HeaderMatcher),
}

impl Matcher {
    fn matches<B>(&self, req: &Request<B>) -> bool {
        match self {
            Matcher::Header(m) => m.matches(req.headers()),
            // `:path` with its query, as Envoy sees it.
            Matcher::Path(m) => m.matches_value(req.uri().path_and_query().map(|p| p.as_str())),
            Matcher::Authority(m) => {
                let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
                    req.headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                });
                m.matches_value(host)
            }
            Matcher::Method(m) => m.matches_value(Some(req.method().as_str())),
        }
    }
}

fn lower_matcher(h: &Node) -> Option<Matcher> {
    use crate::config::route::{header_matcher, header_matcher_as};
    let stand_in = || http::HeaderName::from_static("x-remora-pseudo-header");
    match h.string("name").unwrap_or_default().as_str() {
        ":path" => header_matcher_as(h, stand_in()).map(Matcher::Path),
        ":authority" | "host" => header_matcher_as(h, stand_in()).map(Matcher::Authority),
        ":method" => header_matcher_as(h, stand_in()).map(Matcher::Method),
        _ => header_matcher(h).map(Matcher::Header),
    }
}

/// Lower the typed config; `None` when refused.
pub fn lower(n: &Node) -> Option<HealthCheckFilterConfig> {
    match n.wrapped_bool("pass_through_mode") {
        Some(false) => {}
        Some(true) => n.err(
            "pass_through_mode",
            "pass-through mode is not supported by Remora",
        ),
        None => n.err("pass_through_mode", "is required"),
    }
    n.unsupported("cache_time");
    n.unsupported("cluster_min_healthy_percentages");
    let headers = n.list("headers").iter().filter_map(lower_matcher).collect();
    Some(HealthCheckFilterConfig { headers })
}

impl HealthCheckFilterConfig {
    /// Whether a request is a health check (every matcher matches; Envoy requires at least one, but an
    /// empty list matches every request, as its `HeaderUtility::matchHeaders` does).
    pub fn is_health_check<B>(&self, req: &Request<B>) -> bool {
        self.headers.iter().all(|m| m.matches(req))
    }
}

/// The reply to a health check: 200, or 503 with `LH` while the server fails health checks.
pub fn reply(failing: bool) -> Response<Body> {
    if failing {
        let mut r = local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "",
            FilterReply {
                details: "health_check_failed",
                flag: Some(ResponseFlag::FailedLocalHealthCheck),
            },
        );
        r.headers_mut()
            .insert(IMMEDIATE_FAIL, HeaderValue::from_static("true"));
        r
    } else {
        local_reply(
            StatusCode::OK,
            "",
            FilterReply {
                details: "health_check_ok",
                flag: None,
            },
        )
    }
}

/// The layer: one per connection, over the filter's config and the server's state.
#[derive(Clone)]
pub struct HealthCheckLayer {
    config: Arc<HealthCheckFilterConfig>,
    shared: Arc<Shared>,
}

impl HealthCheckLayer {
    pub fn new(config: Arc<HealthCheckFilterConfig>, shared: Arc<Shared>) -> Self {
        HealthCheckLayer { config, shared }
    }
}

impl<S> tower::Layer<S> for HealthCheckLayer {
    type Service = HealthCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HealthCheck {
            inner,
            config: self.config.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// The filter's service; readiness is the inner service's.
#[derive(Clone)]
pub struct HealthCheck<S> {
    inner: S,
    config: Arc<HealthCheckFilterConfig>,
    shared: Arc<Shared>,
}

impl<S, B> tower::Service<Request<B>> for HealthCheck<S>
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
        let failing = self.shared.state() == State::Draining;
        if !self.config.is_health_check(&req) {
            return ResponseFuture::Forwarded {
                fut: self.inner.call(req),
                failing,
            };
        }
        ResponseFuture::Answered {
            resp: Some(Box::new(reply(failing))),
        }
    }
}

/// The response future: the inner one, or the health check's answer.
#[pin_project(project = ResponseFutureProj)]
pub enum ResponseFuture<F> {
    Forwarded {
        #[pin]
        fut: F,
        /// The server fails health checks: the response says so to a downstream Envoy.
        failing: bool,
    },
    Answered {
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
            ResponseFutureProj::Forwarded { fut, failing } => {
                let mut r = std::task::ready!(fut.poll(cx));
                if *failing {
                    if let Ok(resp) = &mut r {
                        resp.headers_mut()
                            .insert(IMMEDIATE_FAIL, HeaderValue::from_static("true"));
                    }
                }
                Poll::Ready(r)
            }
            ResponseFutureProj::Answered { resp } => match resp.take() {
                Some(r) => Poll::Ready(Ok(*r)),
                None => Poll::Pending,
            },
        }
    }
}
