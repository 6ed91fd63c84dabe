//! HTTP filters, each a tower [`Layer`](tower::Layer) over `Request<B>` → `Response<Body>`.
//!
//! - [`adaptive_concurrency`]: `envoy.filters.http.adaptive_concurrency` (the gradient controller).
//! - [`admission_control`]: `envoy.filters.http.admission_control` (client-side throttling by success rate).
//! - [`health_check`]: `envoy.filters.http.health_check` (answers other proxies' health checks of this one).
//! - [`local_ratelimit`]: `envoy.filters.http.local_ratelimit` (a token bucket, per filter or per route).
//!
//! Each filter has a lowering function from its typed config ([`Node`]), a pure algorithm that takes the time
//! and randomness it needs as arguments, and a thin service. One lowered filter config serves every worker, so
//! its shared state is an `Arc` of atomics and short mutexes; the services themselves need not be `Send`.
//!
//! Every `Runtime*` field (`RuntimeFeatureFlag`, `RuntimeFractionalPercent`, `RuntimePercent`, `RuntimeDouble`,
//! `RuntimeUInt32`) is honoured as its `default_value`: its `runtime_key` is not read from the layered runtime
//! ([`crate::layered_runtime`]) yet, and a runtime key of that name is logged as read by no Remora feature.
//!
//! A filter that answers a request itself puts a [`FilterReply`] into the response's extensions, so that the
//! connection manager can record the response code details and response flag as Envoy does.

pub mod adaptive_concurrency;
pub mod admission_control;
pub mod health_check;
pub mod local_ratelimit;

use crate::body::Body;
use crate::config::node::Node;
use crate::upstream::lb::Rng;
use http::{Response, StatusCode};
use std::cell::RefCell;
use std::rc::Rc;

/// The randomness a filter's services draw from: one generator per worker, shared by the services on it.
pub type SharedRng = Rc<RefCell<Rng>>;

/// A generator seeded from the clock, for a worker.
pub fn worker_rng() -> SharedRng {
    Rc::new(RefCell::new(Rng::from_entropy()))
}

/// Envoy's response flags that these filters set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFlag {
    /// `RL`: rate limited locally (`local_ratelimit` when enforced).
    RateLimited,
    /// `LH`: this server fails health checks (`health_check` answering 503).
    FailedLocalHealthCheck,
}

impl ResponseFlag {
    pub fn short(self) -> &'static str {
        match self {
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::FailedLocalHealthCheck => "LH",
        }
    }
}

/// Why a filter answered a request itself: Envoy's response code details and response flag. Found in the
/// extensions of every local reply these filters make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterReply {
    pub details: &'static str,
    pub flag: Option<ResponseFlag>,
}

/// A local reply as Envoy's `sendLocalReply` makes it (text body, `content-type: text/plain` unless empty),
/// marked with its [`FilterReply`].
pub fn local_reply(status: StatusCode, body: &'static str, reply: FilterReply) -> Response<Body> {
    let mut r = crate::listener::hcm::local_reply(status, body);
    r.extensions_mut().insert(reply);
    r
}

/// `envoy.type.v3.HttpStatus` as a status of 400 or more; unset, or below 400, is `default` (Envoy's
/// `toErrorCode` for both the adaptive concurrency and local rate limit filters).
pub(crate) fn error_status(n: &Node, field: &str, default: StatusCode) -> StatusCode {
    let Some(s) = n.msg(field) else {
        return default;
    };
    s.mark("code");
    let code = match s.message().get_field_by_name("code").as_deref() {
        Some(prost_reflect::Value::EnumNumber(c)) => *c,
        _ => 0,
    };
    match u16::try_from(code)
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        Some(c) if c.as_u16() >= 400 => c,
        _ => default,
    }
}

/// `config.core.v3.RuntimeFeatureFlag`: its `default_value` (required), or `None` when the field is unset.
pub(crate) fn feature_flag(n: &Node, field: &str) -> Option<bool> {
    let f = n.msg(field)?;
    f.mark("runtime_key");
    let v = f.wrapped_bool("default_value");
    if v.is_none() {
        f.err("default_value", "is required");
    }
    Some(v.unwrap_or(false))
}

/// `envoy.type.v3.FractionalPercent`, decided per request as Envoy's runtime does: `random % denominator <
/// numerator`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FractionalPercent {
    pub numerator: u32,
    pub denominator: u32,
}

impl FractionalPercent {
    pub const ZERO: FractionalPercent = FractionalPercent {
        numerator: 0,
        denominator: 100,
    };
    pub const ALL: FractionalPercent = FractionalPercent {
        numerator: 100,
        denominator: 100,
    };

    pub fn lower(n: &Node) -> FractionalPercent {
        let numerator = n.u32("numerator");
        let denominator = match n.enum_name("denominator").as_str() {
            "TEN_THOUSAND" => 10_000,
            "MILLION" => 1_000_000,
            _ => 100,
        };
        FractionalPercent {
            numerator,
            denominator,
        }
    }

    /// Whether the request with this random draw is in the fraction.
    #[inline]
    pub fn enabled(self, random: u64) -> bool {
        if self.numerator == 0 {
            return false;
        }
        if self.numerator >= self.denominator {
            return true;
        }
        random % u64::from(self.denominator) < u64::from(self.numerator)
    }
}

/// `config.core.v3.RuntimeFractionalPercent`: its `default_value` (required), or `None` when unset.
pub(crate) fn runtime_fraction(n: &Node, field: &str) -> Option<FractionalPercent> {
    let f = n.msg(field)?;
    f.mark("runtime_key");
    let fraction = f.msg("default_value").map(|d| FractionalPercent::lower(&d));
    if fraction.is_none() {
        f.err("default_value", "is required");
    }
    Some(fraction.unwrap_or(FractionalPercent::ZERO))
}

/// `config.core.v3.RuntimePercent`: its `default_value` in percent (0 to 100), or `None` when unset.
pub(crate) fn runtime_percent(n: &Node, field: &str) -> Option<f64> {
    let f = n.msg(field)?;
    f.mark("runtime_key");
    Some(f.percent("default_value").unwrap_or(0.0) * 100.0)
}

/// `config.core.v3.RuntimeDouble`: its `default_value`, or `None` when unset.
pub(crate) fn runtime_double(n: &Node, field: &str) -> Option<f64> {
    let f = n.msg(field)?;
    f.mark("runtime_key");
    Some(f.f64("default_value"))
}

/// `config.core.v3.RuntimeUInt32`: its `default_value`, or `None` when unset.
pub(crate) fn runtime_u32(n: &Node, field: &str) -> Option<u32> {
    let f = n.msg(field)?;
    f.mark("runtime_key");
    Some(f.u32("default_value"))
}

#[cfg(test)]
pub(crate) mod test_util {
    use crate::body::Body;
    use crate::config::descriptors;
    use crate::config::load::{message_from_text, Format};
    use crate::config::node::{Errors, Node};
    use http::{Request, Response, StatusCode};
    use http_body_util::BodyExt;
    use prost_reflect::DynamicMessage;

    /// Parse YAML as the named message.
    pub fn msg(type_name: &str, yaml: &str) -> DynamicMessage {
        let desc = descriptors::message(type_name).expect("descriptor");
        message_from_text(yaml, Format::Yaml, &desc).expect("parse")
    }

    /// Lower `yaml` with `f`, returning the result and the error strings.
    pub fn lower<T>(type_name: &str, yaml: &str, f: impl FnOnce(&Node) -> T) -> (T, Vec<String>) {
        let m = msg(type_name, yaml);
        let errs = Errors::default();
        let out = {
            let n = Node::root(&m, "typed_config", &errs);
            f(&n)
        };
        (out, errs.take().iter().map(|e| e.to_string()).collect())
    }

    pub fn request() -> Request<()> {
        Request::builder().uri("/").body(()).expect("request")
    }

    pub fn response(status: u16) -> Response<Body> {
        let mut r = Response::new(Body::full("ok"));
        *r.status_mut() = StatusCode::from_u16(status).expect("status");
        r
    }

    pub async fn body_text(r: Response<Body>) -> String {
        let b = r.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8(b.to_vec()).expect("utf8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractional_percent_is_envoys_modulo_rule() {
        let half = FractionalPercent {
            numerator: 50,
            denominator: 100,
        };
        assert!(half.enabled(49));
        assert!(!half.enabled(50));
        assert!(half.enabled(149));
        assert!(!FractionalPercent::ZERO.enabled(0));
        assert!(FractionalPercent::ALL.enabled(99));
    }
}
