//! `envoy.config.accesslog.v3.AccessLogFilter`: which requests are logged.
//!
//! Semantics from Envoy's `source/common/access_log/access_log_impl.cc`:
//! - `status_code_filter` compares the response code, `0` when no response started;
//! - `duration_filter` compares the total duration in whole milliseconds; a request without one is not logged;
//! - `response_flag_filter` passes a request with any of the listed flags, or with any flag when none is listed;
//! - `not_health_check_filter` passes what the health-check filter did not mark as a health check;
//! - `and_filter` and `or_filter` evaluate their filters in order and stop at the first that decides.
//!
//! A comparison's `runtime_key` would override `default_value` from the runtime; Remora does not read it from
//! the layered runtime, so, as in an Envoy whose runtime holds no such key, `default_value` applies (a runtime
//! key of that name is logged as read by no Remora feature).

use super::LogRecord;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Filter {
    StatusCode(Comparison),
    Duration(Comparison),
    NotHealthCheck,
    /// Empty: any flag.
    ResponseFlag(Vec<&'static str>),
    And(Vec<Filter>),
    Or(Vec<Filter>),
}

/// `ComparisonFilter`: `op` against `value.default_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Comparison {
    pub(crate) op: Op,
    pub(crate) value: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ge,
    Le,
    Ne,
}

impl Comparison {
    fn matches(&self, lhs: u64) -> bool {
        match self.op {
            Op::Eq => lhs == self.value,
            Op::Ge => lhs >= self.value,
            Op::Le => lhs <= self.value,
            Op::Ne => lhs != self.value,
        }
    }
}

impl Filter {
    pub(crate) fn evaluate(&self, rec: &LogRecord<'_>) -> bool {
        match self {
            Filter::StatusCode(c) => c.matches(rec.response_code.map_or(0, u64::from)),
            Filter::Duration(c) => rec
                .duration
                .is_some_and(|d| c.matches(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
            Filter::NotHealthCheck => !rec.health_check,
            Filter::ResponseFlag(flags) if flags.is_empty() => !rec.response_flags.is_empty(),
            Filter::ResponseFlag(flags) => rec.response_flags.iter().any(|f| flags.contains(f)),
            Filter::And(fs) => fs.iter().all(|f| f.evaluate(rec)),
            Filter::Or(fs) => fs.iter().any(|f| f.evaluate(rec)),
        }
    }
}
