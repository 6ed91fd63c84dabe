//! Retries: the route's retry policy, merged with the request's `x-envoy-*` headers, deciding per attempt.
//!
//! Implements `envoy.config.route.v3.RetryPolicy` (lowered in `config::resilience`) after Envoy's
//! `source/common/router/retry_state_impl.cc` (`RetryStateImpl`: header merge, `wouldRetryFromHeaders`,
//! `wouldRetryFromReset`, `shouldRetry`), `config_impl.cc` (`RetryPolicyImpl` defaults),
//! `router.cc` (`FilterUtility::finalTimeout`) and the router filter documentation of the `x-envoy-*` headers.
//!
//! # Policy decides, the budget affords
//! [`RetryState`] only decides whether an outcome *would* be retried and whether the request has retries left.
//! Whether the cluster can *afford* one is asked through a closure, normally the circuit breaker's
//! [`crate::upstream::breaker::Resources::try_retry`], whose permit the caller holds until the next attempt's
//! outcome is known (Envoy releases its retry resource at the next `shouldRetry` or when the request ends).
//! [`RetryState::should_retry`] follows Envoy's order:
//! 1. Not retriable: `No` (and `upstream_rq_retry_success` when the previous attempt was a retry).
//! 2. No retries left: `NoRetryLimitExceeded` (`upstream_rq_retry_limit_exceeded`).
//! 3. One retry is consumed; the budget is asked; refused: `NoOverflow` (the breaker counts
//!    `upstream_rq_retry_overflow`). The last response then goes back to the client.
//! 4. Otherwise `Yes` with a fully jittered exponential back-off ([`backoff`]) and `upstream_rq_retry`.
//!
//! # What is retriable (`retry_on`, `x-envoy-retry-on`, `x-envoy-retry-grpc-on`)
//! - A response carrying `x-envoy-ratelimited` is retried only under `envoy-ratelimited`, whatever else is set.
//! - `5xx`: any 5xx. `gateway-error`: 502, 503, 504. `retriable-4xx`: 409. `retriable-status-codes`: the
//!   policy's `retriable_status_codes` plus `x-envoy-retriable-status-codes`. `retriable-headers`: any of
//!   `retriable_headers` (plus the names in `x-envoy-retriable-header-names`) matches the response headers.
//! - gRPC `cancelled` (1), `deadline-exceeded` (4), `resource-exhausted` (8), `internal` (13), `unavailable`
//!   (14): the `grpc-status` of the response headers (a trailers-only response; trailers arrive after the
//!   response has been forwarded, so Envoy cannot retry on them).
//! - Resets: an overflow is never retried; any other reset (including a per-try timeout, a local reset in
//!   Envoy) under `reset`, `5xx` or `gateway-error`; a refused stream also under `refused-stream`; a connect
//!   failure also under `connect-failure`; any reset under `reset-before-request` as long as no attempt of the
//!   request has sent it upstream (Envoy's sticky `upstream_request_started_`: a connect failure, or a
//!   connection that closed before taking the request).
//!
//! # Request headers
//! `x-envoy-retry-on` and `x-envoy-retry-grpc-on` add conditions to the route's; `x-envoy-max-retries` replaces
//! `num_retries` when any condition is set; `retriable_request_headers`, when configured, must match the request
//! or no retry happens. These headers, `x-envoy-retriable-status-codes`, `x-envoy-retriable-header-names`,
//! `x-envoy-hedge-on-per-try-timeout` and `x-envoy-upstream-rq-per-try-timeout-ms` are consumed (removed). The
//! timeouts are [`Timeouts::resolve`]: `x-envoy-upstream-rq-timeout-ms` replaces the route timeout,
//! `x-envoy-upstream-rq-per-try-timeout-ms` the policy's `per_try_timeout`, and a per-try timeout not below a
//! finite global one is dropped. Envoy honours these headers only from trusted (internal) downstreams; that
//! filtering is the connection manager's.
//!
//! # Hosts
//! With `envoy.retry_host_predicates.previous_hosts`, a retry avoids the hosts already attempted: host selection
//! is redone up to `host_selection_retry_max_attempts` times (default 1), then the last pick is used
//! ([`RetryState::select_host`], after `ZoneAwareLoadBalancerBase::chooseHost`).
//!
//! # Priorities
//! With `retry_priority: envoy.retry_priorities.previous_priorities`, retries are steered away from the
//! priorities already attempted ([`priority`], [`RetryState::priority_load`]).

pub mod backoff;
pub mod priority;

use crate::route::HeaderMatcher;
use crate::stats::{Counter, Scope};
use crate::upstream::lb::Rng;
use backoff::JitteredBackoff;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// The set of retry conditions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOn(u32);

impl RetryOn {
    pub const NONE: RetryOn = RetryOn(0);
    pub const FIVE_XX: RetryOn = RetryOn(1 << 0);
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 2);
    pub const RETRIABLE_4XX: RetryOn = RetryOn(1 << 3);
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 4);
    pub const RETRIABLE_STATUS_CODES: RetryOn = RetryOn(1 << 5);
    pub const RETRIABLE_HEADERS: RetryOn = RetryOn(1 << 6);
    pub const RESET: RetryOn = RetryOn(1 << 7);
    pub const ENVOY_RATE_LIMITED: RetryOn = RetryOn(1 << 8);
    pub const GRPC_CANCELLED: RetryOn = RetryOn(1 << 9);
    pub const GRPC_DEADLINE_EXCEEDED: RetryOn = RetryOn(1 << 10);
    pub const GRPC_RESOURCE_EXHAUSTED: RetryOn = RetryOn(1 << 11);
    pub const GRPC_UNAVAILABLE: RetryOn = RetryOn(1 << 12);
    pub const GRPC_INTERNAL: RetryOn = RetryOn(1 << 13);
    pub const RESET_BEFORE_REQUEST: RetryOn = RetryOn(1 << 14);

    const HTTP_NAMES: [(&'static str, RetryOn); 10] = [
        ("5xx", RetryOn::FIVE_XX),
        ("gateway-error", RetryOn::GATEWAY_ERROR),
        ("connect-failure", RetryOn::CONNECT_FAILURE),
        ("envoy-ratelimited", RetryOn::ENVOY_RATE_LIMITED),
        ("retriable-4xx", RetryOn::RETRIABLE_4XX),
        ("refused-stream", RetryOn::REFUSED_STREAM),
        ("retriable-status-codes", RetryOn::RETRIABLE_STATUS_CODES),
        ("retriable-headers", RetryOn::RETRIABLE_HEADERS),
        ("reset", RetryOn::RESET),
        ("reset-before-request", RetryOn::RESET_BEFORE_REQUEST),
    ];
    const GRPC_NAMES: [(&'static str, RetryOn); 5] = [
        ("cancelled", RetryOn::GRPC_CANCELLED),
        ("deadline-exceeded", RetryOn::GRPC_DEADLINE_EXCEEDED),
        ("resource-exhausted", RetryOn::GRPC_RESOURCE_EXHAUSTED),
        ("unavailable", RetryOn::GRPC_UNAVAILABLE),
        ("internal", RetryOn::GRPC_INTERNAL),
    ];

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn contains(self, other: RetryOn) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn intersects(self, other: RetryOn) -> bool {
        self.0 & other.0 != 0
    }
    pub fn union(self, other: RetryOn) -> RetryOn {
        RetryOn(self.0 | other.0)
    }

    fn parse(s: &str, names: &[(&str, RetryOn)]) -> (RetryOn, Vec<String>) {
        let mut on = RetryOn::NONE;
        let mut unknown = Vec::new();
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match names.iter().find(|(n, _)| *n == token) {
                Some((_, f)) => on = on.union(*f),
                None => unknown.push(token.to_string()),
            }
        }
        (on, unknown)
    }

    /// `x-envoy-retry-on` conditions; returns the tokens that are not HTTP conditions.
    pub fn parse_http(s: &str) -> (RetryOn, Vec<String>) {
        Self::parse(s, &Self::HTTP_NAMES)
    }

    /// `x-envoy-retry-grpc-on` conditions; returns the tokens that are not gRPC conditions.
    pub fn parse_grpc(s: &str) -> (RetryOn, Vec<String>) {
        Self::parse(s, &Self::GRPC_NAMES)
    }

    /// A route's `retry_on`, which holds both kinds; returns the tokens that are neither.
    pub fn parse_config(s: &str) -> (RetryOn, Vec<String>) {
        let (http, unknown) = Self::parse_http(s);
        let (grpc, _) = Self::parse_grpc(s);
        let unknown = unknown
            .into_iter()
            .filter(|t| !Self::GRPC_NAMES.iter().any(|(n, _)| n == t))
            .collect();
        (http.union(grpc), unknown)
    }
}

/// A route's (or virtual host's) `retry_policy`, lowered.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    /// `num_retries` (default 1).
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub per_try_idle_timeout: Option<Duration>,
    /// `retry_back_off.base_interval` (default 25 ms, at least 1 ms).
    pub base_interval: Duration,
    /// `retry_back_off.max_interval` (default 10 × base).
    pub max_interval: Duration,
    pub retriable_status_codes: Vec<u16>,
    pub retriable_headers: Vec<HeaderMatcher>,
    pub retriable_request_headers: Vec<HeaderMatcher>,
    /// `retry_host_predicate: envoy.retry_host_predicates.previous_hosts`.
    pub previous_hosts: bool,
    /// `host_selection_retry_max_attempts` (default 1).
    pub host_selection_max_attempts: u32,
    /// `retry_priority: envoy.retry_priorities.previous_priorities`: its `update_frequency`.
    pub previous_priorities: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retry_on: RetryOn::NONE,
            num_retries: 1,
            per_try_timeout: None,
            per_try_idle_timeout: None,
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
            retriable_status_codes: Vec::new(),
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
            previous_hosts: false,
            host_selection_max_attempts: 1,
            previous_priorities: None,
        }
    }
}

static NO_POLICY: LazyLock<Arc<RetryPolicy>> = LazyLock::new(|| Arc::new(RetryPolicy::default()));

impl RetryPolicy {
    /// The policy of a route without one: no conditions, so only request headers can enable retries.
    pub fn none() -> Arc<RetryPolicy> {
        NO_POLICY.clone()
    }
}

/// Request headers Envoy's router reads (and removes).
pub mod headers {
    use http::header::HeaderName;
    pub const RETRY_ON: HeaderName = HeaderName::from_static("x-envoy-retry-on");
    pub const RETRY_GRPC_ON: HeaderName = HeaderName::from_static("x-envoy-retry-grpc-on");
    pub const MAX_RETRIES: HeaderName = HeaderName::from_static("x-envoy-max-retries");
    pub const RETRIABLE_STATUS_CODES: HeaderName = HeaderName::from_static("x-envoy-retriable-status-codes");
    pub const RETRIABLE_HEADER_NAMES: HeaderName = HeaderName::from_static("x-envoy-retriable-header-names");
    pub const HEDGE_ON_PER_TRY_TIMEOUT: HeaderName =
        HeaderName::from_static("x-envoy-hedge-on-per-try-timeout");
    pub const UPSTREAM_RQ_TIMEOUT_MS: HeaderName = HeaderName::from_static("x-envoy-upstream-rq-timeout-ms");
    pub const UPSTREAM_RQ_PER_TRY_TIMEOUT_MS: HeaderName =
        HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms");
    /// Set on the request to the upstream and on the response (with `include_*_attempt_count`).
    pub const ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
    /// Response headers that change retry decisions.
    pub const RATE_LIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");
    pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
}

fn header_str<'h>(h: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Why an upstream attempt ended without a response (Envoy's `Http::StreamResetReason`, grouped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// The connection could not be made (refused, unreachable, connect timeout).
    ConnectFailure,
    /// The h2 stream was refused (`REFUSED_STREAM`).
    RefusedStream,
    /// Any other reset: remote reset, connection closed, protocol error.
    Reset,
    /// The per-try timeout fired (Envoy resets the stream locally).
    PerTryTimeout,
    /// A local resource limit; never retried.
    Overflow,
}

/// The request's timeouts after the headers (Envoy's `FilterUtility::finalTimeout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole request, all attempts; `None` is no limit.
    pub global: Option<Duration>,
    pub per_try: Option<Duration>,
    pub per_try_idle: Option<Duration>,
}

impl Timeouts {
    /// `route_timeout` is the route's `timeout` (`None` for 0, no limit). Consumes the two timeout headers.
    pub fn resolve(route_timeout: Option<Duration>, policy: &RetryPolicy, req: &mut HeaderMap) -> Timeouts {
        let mut global = route_timeout;
        let mut per_try = policy.per_try_timeout;
        if !any_envoy_header(req) {
            return Timeouts::new(global, per_try, policy);
        }
        if let Some(v) = req.remove(headers::UPSTREAM_RQ_TIMEOUT_MS) {
            if let Some(ms) = parse_u64(&v) {
                global = (ms > 0).then(|| Duration::from_millis(ms));
            }
        }
        if let Some(v) = req.remove(headers::UPSTREAM_RQ_PER_TRY_TIMEOUT_MS) {
            if let Some(ms) = parse_u64(&v) {
                per_try = (ms > 0).then(|| Duration::from_millis(ms));
            }
        }
        Timeouts::new(global, per_try, policy)
    }

    fn new(global: Option<Duration>, mut per_try: Option<Duration>, policy: &RetryPolicy) -> Timeouts {
        if let (Some(p), Some(g)) = (per_try, global) {
            if p >= g {
                per_try = None;
            }
        }
        Timeouts {
            global,
            per_try,
            per_try_idle: policy.per_try_idle_timeout,
        }
    }
}

/// Whether the request carries any `x-envoy-*` header: one pass over the names spares the removals (a hash
/// look-up each) that find nothing on most requests.
fn any_envoy_header(h: &HeaderMap) -> bool {
    h.keys().any(|k| k.as_str().starts_with("x-envoy-"))
}

fn parse_u64(v: &HeaderValue) -> Option<u64> {
    v.to_str().ok()?.trim().parse().ok()
}

/// `cluster.<name>.upstream_rq_retry*` counters kept by the retry state (the overflow counter is the breaker's).
#[derive(Clone, Debug)]
pub struct RetryStats {
    pub upstream_rq_retry: Counter,
    pub upstream_rq_retry_success: Counter,
    pub upstream_rq_retry_limit_exceeded: Counter,
}

impl RetryStats {
    pub fn new(cluster: &Scope) -> Self {
        RetryStats {
            upstream_rq_retry: cluster.counter("upstream_rq_retry"),
            upstream_rq_retry_success: cluster.counter("upstream_rq_retry_success"),
            upstream_rq_retry_limit_exceeded: cluster.counter("upstream_rq_retry_limit_exceeded"),
        }
    }
}

/// The answer to "retry this attempt?" (Envoy's `RetryStatus`); `P` is the budget's permit.
#[derive(Debug)]
pub enum RetryStatus<P> {
    /// Retry after `backoff`, holding `permit` until the retried attempt's outcome is known.
    Yes {
        backoff: Duration,
        permit: P,
    },
    No,
    NoRetryLimitExceeded,
    NoOverflow,
}

/// One request's retry state.
#[derive(Debug)]
pub struct RetryState {
    policy: Arc<RetryPolicy>,
    retry_on: RetryOn,
    retries_remaining: u32,
    /// From `x-envoy-retriable-status-codes`.
    extra_status_codes: Vec<u16>,
    /// From `x-envoy-retriable-header-names`: presence matchers.
    extra_header_names: Vec<HeaderName>,
    backoff: JitteredBackoff,
    attempted_hosts: Vec<u64>,
    retried: bool,
    attempts: u32,
    /// An attempt has sent (part of) the request upstream; sticky, as Envoy's `upstream_request_started_`.
    request_started: bool,
    /// `retry_priority`'s state.
    priorities: Option<priority::PreviousPriorities>,
}

impl RetryState {
    /// Envoy's `RetryStateImpl::create`: `None` when nothing could make this request retry. Consumes the retry
    /// headers in either case.
    pub fn new(policy: &Arc<RetryPolicy>, req: &mut HeaderMap) -> Option<RetryState> {
        let envoy = any_envoy_header(req);
        let mut take = |n: HeaderName| if envoy { req.remove(n) } else { None };
        let retry_on_h = take(headers::RETRY_ON);
        let grpc_on_h = take(headers::RETRY_GRPC_ON);
        let max_retries_h = take(headers::MAX_RETRIES);
        let codes_h = take(headers::RETRIABLE_STATUS_CODES);
        let names_h = take(headers::RETRIABLE_HEADER_NAMES);
        take(headers::HEDGE_ON_PER_TRY_TIMEOUT);
        if retry_on_h.is_none() && grpc_on_h.is_none() && policy.retry_on.is_empty() {
            return None;
        }
        let mut retry_on = policy.retry_on;
        if let Some(s) = retry_on_h.as_ref().and_then(|v| v.to_str().ok()) {
            retry_on = retry_on.union(RetryOn::parse_http(s).0);
        }
        if let Some(s) = grpc_on_h.as_ref().and_then(|v| v.to_str().ok()) {
            retry_on = retry_on.union(RetryOn::parse_grpc(s).0);
        }
        if !policy.retriable_request_headers.is_empty()
            && !policy.retriable_request_headers.iter().any(|m| m.matches(req))
        {
            retry_on = RetryOn::NONE;
        }
        let mut retries_remaining = policy.num_retries;
        if !retry_on.is_empty() {
            if let Some(n) = max_retries_h.as_ref().and_then(parse_u64) {
                retries_remaining = u32::try_from(n).unwrap_or(u32::MAX);
            }
        }
        let extra_status_codes = codes_h
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(',').filter_map(|c| c.trim().parse().ok()).collect())
            .unwrap_or_default();
        let extra_header_names = names_h
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(|s| {
                s.split(',')
                    .filter_map(|n| HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes()).ok())
                    .collect()
            })
            .unwrap_or_default();
        Some(RetryState {
            backoff: JitteredBackoff::new(policy.base_interval, policy.max_interval),
            policy: policy.clone(),
            retry_on,
            retries_remaining,
            extra_status_codes,
            extra_header_names,
            attempted_hosts: Vec::new(),
            retried: false,
            attempts: 1,
            request_started: false,
            priorities: policy.previous_priorities.map(priority::PreviousPriorities::new),
        })
    }

    pub fn retry_on(&self) -> RetryOn {
        self.retry_on
    }

    pub fn retries_remaining(&self) -> u32 {
        self.retries_remaining
    }

    /// The number of the current attempt, from 1: the value of `x-envoy-attempt-count`.
    pub fn attempt_count(&self) -> u32 {
        self.attempts
    }

    /// Envoy's `wouldRetryFromHeaders`: whether a response with these status and headers is retriable.
    pub fn would_retry_response(&self, status: u16, resp: &HeaderMap) -> bool {
        let on = self.retry_on;
        if resp.contains_key(headers::RATE_LIMITED) {
            return on.contains(RetryOn::ENVOY_RATE_LIMITED);
        }
        if on.contains(RetryOn::FIVE_XX) && (500..600).contains(&status) {
            return true;
        }
        if on.contains(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504) {
            return true;
        }
        if on.contains(RetryOn::RETRIABLE_4XX) && status == 409 {
            return true;
        }
        if on.contains(RetryOn::RETRIABLE_STATUS_CODES)
            && (self.policy.retriable_status_codes.contains(&status)
                || self.extra_status_codes.contains(&status))
        {
            return true;
        }
        if on.contains(RetryOn::RETRIABLE_HEADERS)
            && (self.policy.retriable_headers.iter().any(|m| m.matches(resp))
                || self.extra_header_names.iter().any(|n| resp.contains_key(n)))
        {
            return true;
        }
        const GRPC: RetryOn = RetryOn(
            RetryOn::GRPC_CANCELLED.0
                | RetryOn::GRPC_DEADLINE_EXCEEDED.0
                | RetryOn::GRPC_RESOURCE_EXHAUSTED.0
                | RetryOn::GRPC_UNAVAILABLE.0
                | RetryOn::GRPC_INTERNAL.0,
        );
        if on.intersects(GRPC) {
            let grpc = header_str(resp, &headers::GRPC_STATUS).and_then(|s| s.trim().parse::<u32>().ok());
            let wanted = match grpc {
                Some(1) => RetryOn::GRPC_CANCELLED,
                Some(4) => RetryOn::GRPC_DEADLINE_EXCEEDED,
                Some(8) => RetryOn::GRPC_RESOURCE_EXHAUSTED,
                Some(13) => RetryOn::GRPC_INTERNAL,
                Some(14) => RetryOn::GRPC_UNAVAILABLE,
                _ => RetryOn::NONE,
            };
            if !wanted.is_empty() && on.contains(wanted) {
                return true;
            }
        }
        false
    }

    /// Envoy's `wouldRetryFromReset`; `request_started`: this request has sent bytes upstream.
    pub fn would_retry_reset(&self, reason: ResetReason, request_started: bool) -> bool {
        let on = self.retry_on;
        match reason {
            ResetReason::Overflow => false,
            ResetReason::ConnectFailure if on.contains(RetryOn::CONNECT_FAILURE) => true,
            _ if on.contains(RetryOn::RESET_BEFORE_REQUEST) && !request_started => true,
            _ if on.intersects(
                RetryOn::RESET
                    .union(RetryOn::FIVE_XX)
                    .union(RetryOn::GATEWAY_ERROR),
            ) =>
            {
                true
            }
            ResetReason::RefusedStream => on.contains(RetryOn::REFUSED_STREAM),
            ResetReason::ConnectFailure => on.contains(RetryOn::CONNECT_FAILURE),
            ResetReason::Reset | ResetReason::PerTryTimeout => false,
        }
    }

    /// Envoy's `shouldRetry`: `would_retry` is the policy's verdict on the attempt; `afford` asks the budget.
    pub fn should_retry<P>(
        &mut self,
        would_retry: bool,
        afford: impl FnOnce() -> Option<P>,
        stats: &RetryStats,
        rng: &mut Rng,
    ) -> RetryStatus<P> {
        if self.retried && !would_retry {
            stats.upstream_rq_retry_success.inc();
        }
        self.retried = false;
        if !would_retry {
            return RetryStatus::No;
        }
        if self.retries_remaining == 0 {
            stats.upstream_rq_retry_limit_exceeded.inc();
            return RetryStatus::NoRetryLimitExceeded;
        }
        self.retries_remaining -= 1;
        let Some(permit) = afford() else {
            return RetryStatus::NoOverflow;
        };
        self.retried = true;
        self.attempts += 1;
        stats.upstream_rq_retry.inc();
        RetryStatus::Yes {
            backoff: self.backoff.next_backoff(rng),
            permit,
        }
    }

    /// `should_retry` for a response.
    pub fn should_retry_response<P>(
        &mut self,
        status: u16,
        resp: &HeaderMap,
        afford: impl FnOnce() -> Option<P>,
        stats: &RetryStats,
        rng: &mut Rng,
    ) -> RetryStatus<P> {
        let would = self.would_retry_response(status, resp);
        self.should_retry(would, afford, stats, rng)
    }

    /// `should_retry` for a reset or per-try timeout; `request_started`: this attempt sent bytes upstream.
    pub fn should_retry_reset<P>(
        &mut self,
        reason: ResetReason,
        request_started: bool,
        afford: impl FnOnce() -> Option<P>,
        stats: &RetryStats,
        rng: &mut Rng,
    ) -> RetryStatus<P> {
        self.request_started |= request_started;
        let would = self.would_retry_reset(reason, self.request_started);
        self.should_retry(would, afford, stats, rng)
    }

    /// Note the host an attempt goes to (for `previous_hosts`) and its priority (for `retry_priority`).
    pub fn on_host_attempted(&mut self, host_id: u64, priority: u32) {
        if self.policy.previous_hosts && !self.attempted_hosts.contains(&host_id) {
            self.attempted_hosts.push(host_id);
        }
        if let Some(p) = self.priorities.as_mut() {
            p.on_host_attempted(priority as usize);
        }
    }

    /// With `retry_priority`, the priority load of the coming attempt over the cluster's levels (`health` and
    /// `degraded` availability, percent); `None`: the cluster's own load.
    pub fn priority_load(
        &mut self,
        health: &[u32],
        degraded: &[u32],
    ) -> Option<priority::PriorityLoadOverride> {
        self.priorities.as_mut()?.determine(health, degraded).cloned()
    }

    /// Whether the policy has a `retry_priority`.
    pub fn has_retry_priority(&self) -> bool {
        self.priorities.is_some()
    }

    /// Whether the host predicates reject `host_id` for the coming attempt (only retries consult them).
    pub fn should_select_another_host(&self, host_id: u64) -> bool {
        self.attempts > 1 && self.attempted_hosts.contains(&host_id)
    }

    /// Pick a host: on a retry, redo the pick up to `host_selection_retry_max_attempts` times while the
    /// predicates reject it, then keep the last pick. `pick` is the load balancer; `id` a host's id.
    pub fn select_host<H>(&self, mut pick: impl FnMut() -> Option<H>, id: impl Fn(&H) -> u64) -> Option<H> {
        let tries = if self.attempts > 1 {
            self.policy.host_selection_max_attempts.saturating_add(1)
        } else {
            1
        };
        let mut host = None;
        for _ in 0..tries {
            host = pick();
            match &host {
                Some(h) if self.should_select_another_host(id(h)) => continue,
                _ => return host,
            }
        }
        host
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{HeaderMatch, StringMatcher};
    use crate::stats::Store;

    fn policy(retry_on: &str) -> Arc<RetryPolicy> {
        let (on, unknown) = RetryOn::parse_config(retry_on);
        assert!(unknown.is_empty(), "{unknown:?}");
        Arc::new(RetryPolicy {
            retry_on: on,
            ..Default::default()
        })
    }

    fn state(p: &Arc<RetryPolicy>) -> RetryState {
        RetryState::new(p, &mut HeaderMap::new()).unwrap()
    }

    fn hdrs(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn stats() -> (RetryStats, Arc<Store>) {
        let s = Store::new();
        (RetryStats::new(&s.scope("cluster.c.")), s)
    }

    #[test]
    fn parsing_retry_on() {
        let (on, unknown) = RetryOn::parse_config("5xx, gateway-error,unavailable,bogus,,reset");
        assert!(on.contains(
            RetryOn::FIVE_XX
                .union(RetryOn::GATEWAY_ERROR)
                .union(RetryOn::RESET)
        ));
        assert!(on.contains(RetryOn::GRPC_UNAVAILABLE));
        assert_eq!(unknown, ["bogus"]);
        // The HTTP header does not take gRPC conditions.
        assert_eq!(RetryOn::parse_http("cancelled").0, RetryOn::NONE);
        assert_eq!(RetryOn::parse_grpc("cancelled").0, RetryOn::GRPC_CANCELLED);
    }

    #[test]
    fn five_xx_and_gateway_error() {
        let s = state(&policy("5xx"));
        let none = HeaderMap::new();
        assert!(s.would_retry_response(500, &none));
        assert!(s.would_retry_response(503, &none));
        assert!(!s.would_retry_response(404, &none));
        let s = state(&policy("gateway-error"));
        assert!(!s.would_retry_response(500, &none));
        for c in [502, 503, 504] {
            assert!(s.would_retry_response(c, &none));
        }
        // A rate-limited response is retried only under envoy-ratelimited.
        let rl = hdrs(&[("x-envoy-ratelimited", "true")]);
        assert!(!state(&policy("5xx")).would_retry_response(503, &rl));
        assert!(state(&policy("envoy-ratelimited")).would_retry_response(429, &rl));
    }

    #[test]
    fn retriable_4xx_status_codes_and_headers() {
        let none = HeaderMap::new();
        let s = state(&policy("retriable-4xx"));
        assert!(s.would_retry_response(409, &none));
        assert!(!s.would_retry_response(404, &none));

        let p = Arc::new(RetryPolicy {
            retry_on: RetryOn::RETRIABLE_STATUS_CODES,
            retriable_status_codes: vec![418],
            ..Default::default()
        });
        let mut req = hdrs(&[("x-envoy-retriable-status-codes", "429, 451")]);
        let s = RetryState::new(&p, &mut req).unwrap();
        assert!(req.is_empty(), "consumed");
        for c in [418, 429, 451] {
            assert!(s.would_retry_response(c, &none));
        }
        assert!(!s.would_retry_response(500, &none));
        // The codes need the condition.
        assert!(!state(&Arc::new(RetryPolicy {
            retry_on: RetryOn::FIVE_XX,
            retriable_status_codes: vec![418],
            ..Default::default()
        }))
        .would_retry_response(418, &none));

        let p = Arc::new(RetryPolicy {
            retry_on: RetryOn::RETRIABLE_HEADERS,
            retriable_headers: vec![HeaderMatcher {
                name: HeaderName::from_static("x-upstream-retry"),
                kind: HeaderMatch::String(StringMatcher::Exact("yes".into(), false)),
                invert: false,
                treat_missing_as_empty: false,
            }],
            ..Default::default()
        });
        let mut req = hdrs(&[("x-envoy-retriable-header-names", "x-try-again")]);
        let s = RetryState::new(&p, &mut req).unwrap();
        assert!(s.would_retry_response(200, &hdrs(&[("x-upstream-retry", "yes")])));
        assert!(!s.would_retry_response(200, &hdrs(&[("x-upstream-retry", "no")])));
        assert!(s.would_retry_response(200, &hdrs(&[("x-try-again", "1")])));
    }

    #[test]
    fn grpc_conditions() {
        for (cond, code) in [
            ("cancelled", "1"),
            ("deadline-exceeded", "4"),
            ("resource-exhausted", "8"),
            ("internal", "13"),
            ("unavailable", "14"),
        ] {
            let s = state(&policy(cond));
            assert!(
                s.would_retry_response(200, &hdrs(&[("grpc-status", code)])),
                "{cond}"
            );
            assert!(
                !s.would_retry_response(200, &hdrs(&[("grpc-status", "0")])),
                "{cond}"
            );
            assert!(!s.would_retry_response(200, &HeaderMap::new()), "{cond}");
        }
        assert!(!state(&policy("cancelled")).would_retry_response(200, &hdrs(&[("grpc-status", "14")])));
    }

    #[test]
    fn resets() {
        use ResetReason::*;
        let all = [ConnectFailure, RefusedStream, Reset, PerTryTimeout];
        for cond in ["reset", "5xx", "gateway-error"] {
            let s = state(&policy(cond));
            for started in [false, true] {
                assert!(all.iter().all(|r| s.would_retry_reset(*r, started)), "{cond}");
                assert!(!s.would_retry_reset(Overflow, started), "{cond}");
            }
        }
        let s = state(&policy("connect-failure"));
        assert_eq!(
            all.map(|r| s.would_retry_reset(r, false)),
            [true, false, false, false]
        );
        let s = state(&policy("refused-stream"));
        assert_eq!(
            all.map(|r| s.would_retry_reset(r, true)),
            [false, true, false, false]
        );
        let s = state(&policy("retriable-4xx"));
        assert!(!all.iter().any(|r| s.would_retry_reset(*r, false)));
        // Any reset before the request was sent, none after.
        let s = state(&policy("reset-before-request"));
        assert_eq!(all.map(|r| s.would_retry_reset(r, false)), [true; 4]);
        assert_eq!(all.map(|r| s.would_retry_reset(r, true)), [false; 4]);
        assert!(!s.would_retry_reset(Overflow, false));
        // The header spells it too.
        assert_eq!(
            RetryOn::parse_http("reset-before-request").0,
            RetryOn::RESET_BEFORE_REQUEST
        );
    }

    #[test]
    fn reset_before_request_stops_once_any_attempt_sent_the_request() {
        let (st, _s) = stats();
        let mut rng = Rng::seeded(1);
        let p = Arc::new(RetryPolicy {
            retry_on: RetryOn::RESET_BEFORE_REQUEST,
            num_retries: 5,
            ..Default::default()
        });
        let mut s = state(&p);
        let mut retry = |s: &mut RetryState, started| {
            matches!(
                s.should_retry_reset(ResetReason::Reset, started, || Some(()), &st, &mut rng),
                RetryStatus::Yes { .. }
            )
        };
        assert!(retry(&mut s, false));
        assert!(retry(&mut s, false));
        // The second retry reached the upstream before its reset: no more, even for a later unsent attempt.
        assert!(!retry(&mut s, true));
        assert!(!retry(&mut s, false));
    }

    #[test]
    fn request_headers_merge() {
        // No policy and no headers: no retry state; the headers are consumed either way.
        let none = RetryPolicy::none();
        assert!(RetryState::new(&none, &mut hdrs(&[("x-envoy-max-retries", "3")])).is_none());
        // Headers add conditions to the route's.
        let mut req = hdrs(&[
            ("x-envoy-retry-on", "connect-failure"),
            ("x-envoy-retry-grpc-on", "unavailable"),
        ]);
        let s = RetryState::new(&policy("retriable-4xx"), &mut req).unwrap();
        assert!(req.is_empty());
        assert!(s
            .retry_on()
            .contains(RetryOn::RETRIABLE_4XX.union(RetryOn::CONNECT_FAILURE)));
        assert!(s.retry_on().contains(RetryOn::GRPC_UNAVAILABLE));
        assert_eq!(s.retries_remaining(), 1);
        // x-envoy-max-retries replaces num_retries (even with a header-only policy).
        let mut req = hdrs(&[("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "4")]);
        assert_eq!(RetryState::new(&none, &mut req).unwrap().retries_remaining(), 4);
        let mut req = hdrs(&[("x-envoy-max-retries", "0")]);
        assert_eq!(
            RetryState::new(&policy("5xx"), &mut req)
                .unwrap()
                .retries_remaining(),
            0
        );
        let mut req = hdrs(&[("x-envoy-max-retries", "x")]);
        assert_eq!(
            RetryState::new(&policy("5xx"), &mut req)
                .unwrap()
                .retries_remaining(),
            1
        );
        // retriable_request_headers must match, else nothing is retried (and max-retries is ignored).
        let p = Arc::new(RetryPolicy {
            retry_on: RetryOn::FIVE_XX,
            retriable_request_headers: vec![HeaderMatcher {
                name: HeaderName::from_static("x-idempotent"),
                kind: HeaderMatch::Present(true),
                invert: false,
                treat_missing_as_empty: false,
            }],
            ..Default::default()
        });
        let s = RetryState::new(&p, &mut hdrs(&[("x-envoy-max-retries", "5")])).unwrap();
        assert!(s.retry_on().is_empty());
        assert_eq!(s.retries_remaining(), 1);
        assert!(!s.would_retry_response(503, &HeaderMap::new()));
        let s = RetryState::new(&p, &mut hdrs(&[("x-idempotent", "1")])).unwrap();
        assert!(s.would_retry_response(503, &HeaderMap::new()));
    }

    #[test]
    fn timeouts_from_headers() {
        let p = RetryPolicy {
            per_try_timeout: Some(Duration::from_secs(1)),
            per_try_idle_timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        };
        let t = Timeouts::resolve(Some(Duration::from_secs(15)), &p, &mut HeaderMap::new());
        assert_eq!(t.global, Some(Duration::from_secs(15)));
        assert_eq!(t.per_try, Some(Duration::from_secs(1)));
        assert_eq!(t.per_try_idle, Some(Duration::from_millis(300)));
        let mut req = hdrs(&[
            ("x-envoy-upstream-rq-timeout-ms", "2000"),
            ("x-envoy-upstream-rq-per-try-timeout-ms", "500"),
        ]);
        let t = Timeouts::resolve(Some(Duration::from_secs(15)), &p, &mut req);
        assert!(req.is_empty());
        assert_eq!(
            (t.global, t.per_try),
            (Some(Duration::from_secs(2)), Some(Duration::from_millis(500)))
        );
        // A per-try timeout not below the global one is dropped; 0 is no global limit, which keeps it.
        let mut req = hdrs(&[("x-envoy-upstream-rq-timeout-ms", "800")]);
        assert_eq!(Timeouts::resolve(None, &p, &mut req).per_try, None);
        let mut req = hdrs(&[("x-envoy-upstream-rq-timeout-ms", "0")]);
        let t = Timeouts::resolve(Some(Duration::from_secs(15)), &p, &mut req);
        assert_eq!((t.global, t.per_try), (None, Some(Duration::from_secs(1))));
        // An unparsable header is ignored (and still removed).
        let mut req = hdrs(&[("x-envoy-upstream-rq-timeout-ms", "soon")]);
        assert_eq!(
            Timeouts::resolve(Some(Duration::from_secs(15)), &p, &mut req).global,
            Some(Duration::from_secs(15))
        );
        assert!(req.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn should_retry_counts_limits_and_asks_the_budget() {
        let (st, store) = stats();
        let c = |n: &str| store.counter(&format!("cluster.c.{n}")).value();
        let p = Arc::new(RetryPolicy {
            retry_on: RetryOn::FIVE_XX,
            num_retries: 2,
            ..Default::default()
        });
        let mut s = state(&p);
        let mut rng = Rng::seeded(4);
        let none = HeaderMap::new();
        match s.should_retry_response(503, &none, || Some(()), &st, &mut rng) {
            RetryStatus::Yes { backoff, .. } => assert!(backoff < Duration::from_millis(25)),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.attempt_count(), 2);
        // Over budget: the retry is consumed, nothing is sent.
        assert!(matches!(
            s.should_retry_response(503, &none, || None::<()>, &st, &mut rng),
            RetryStatus::NoOverflow
        ));
        assert!(matches!(
            s.should_retry_response(503, &none, || Some(()), &st, &mut rng),
            RetryStatus::NoRetryLimitExceeded
        ));
        assert_eq!(
            (c("upstream_rq_retry"), c("upstream_rq_retry_limit_exceeded")),
            (1, 1)
        );

        // A success after a granted retry counts upstream_rq_retry_success; the second back-off is under 50 ms.
        let mut s = state(&p);
        assert!(matches!(
            s.should_retry_reset(ResetReason::Reset, true, || Some(()), &st, &mut rng),
            RetryStatus::Yes { .. }
        ));
        match s.should_retry_response(502, &none, || Some(()), &st, &mut rng) {
            RetryStatus::Yes { backoff, .. } => assert!(backoff < Duration::from_millis(50)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.should_retry_response(200, &none, || Some(()), &st, &mut rng),
            RetryStatus::No
        ));
        assert_eq!(c("upstream_rq_retry_success"), 1);
        assert_eq!(s.attempt_count(), 3);
    }

    #[test]
    fn the_breaker_budget_affords_retries() {
        use crate::upstream::breaker::{CircuitBreakers, CircuitBreakersConfig, Priority, Thresholds};
        let store = Store::new();
        let scope = store.scope("cluster.c.");
        let cfg = CircuitBreakersConfig {
            thresholds: [
                Thresholds {
                    max_retries: 1,
                    ..Default::default()
                },
                Thresholds::default(),
            ],
            per_host_max_connections: [None, None],
        };
        let cb = CircuitBreakers::new(&cfg, &scope);
        let r = cb.resources(Priority::Default).clone();
        let st = RetryStats::new(&scope);
        let p = policy("5xx");
        let mut rng = Rng::seeded(1);
        let (mut a, mut b) = (state(&p), state(&p));
        let held = match a.should_retry(true, || r.try_retry(), &st, &mut rng) {
            RetryStatus::Yes { permit, .. } => permit,
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            b.should_retry(true, || r.try_retry(), &st, &mut rng),
            RetryStatus::NoOverflow
        ));
        assert_eq!(store.counter("cluster.c.upstream_rq_retry_overflow").value(), 1);
        drop(held);
        let mut c = state(&p);
        assert!(matches!(
            c.should_retry(true, || r.try_retry(), &st, &mut rng),
            RetryStatus::Yes { .. }
        ));
    }

    #[test]
    fn previous_hosts_predicate_reselects_on_retries() {
        let p = Arc::new(RetryPolicy {
            retry_on: RetryOn::FIVE_XX,
            previous_hosts: true,
            host_selection_max_attempts: 2,
            ..Default::default()
        });
        let (st, _store) = stats();
        let mut rng = Rng::seeded(1);
        let mut s = state(&p);
        // The first attempt never consults the predicate.
        let mut seq = [7u64, 7, 7, 8].into_iter();
        assert_eq!(s.select_host(|| seq.next(), |h| *h), Some(7));
        s.on_host_attempted(7, 0);
        assert!(matches!(
            s.should_retry(true, || Some(()), &st, &mut rng),
            RetryStatus::Yes { .. }
        ));
        // A retry re-picks while the host was attempted: 1 + 2 picks at most, then the last pick is kept.
        let mut picks = 0;
        let mut seq = [7u64, 7, 8].into_iter();
        assert_eq!(
            s.select_host(
                || {
                    picks += 1;
                    seq.next()
                },
                |h| *h
            ),
            Some(8)
        );
        assert_eq!(picks, 3);
        let mut seq = [7u64, 7, 7, 8].into_iter();
        assert_eq!(s.select_host(|| seq.next(), |h| *h), Some(7));
        // Without the predicate, any host is fine.
        let mut s = state(&policy("5xx"));
        s.on_host_attempted(7, 0);
        s.should_retry(true, || Some(()), &st, &mut rng);
        assert!(!s.should_select_another_host(7));
    }
}
