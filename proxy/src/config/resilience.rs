//! Lowering the resilience settings: a cluster's `circuit_breakers` and `outlier_detection`, and a route's or
//! virtual host's `retry_policy`. Defaults and validation follow Envoy's `ClusterInfoImpl::ResourceManagers::load`
//! and `getRetryBudgetParams` (`upstream_impl.cc`), `DetectorConfig` and `DetectorImpl::create`
//! (`outlier_detection_impl.cc`) and `RetryPolicyImpl` (`router/config_impl.cc`).

use super::node::Node;
use super::route::header_matcher;
use crate::retry::{RetryOn, RetryPolicy};
use crate::upstream::breaker::{CircuitBreakersConfig, Priority, RetryBudget, Thresholds};
use crate::upstream::outlier::OutlierConfig;
use std::time::Duration;

const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
const PREVIOUS_HOSTS_TYPE: &str = "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";
const PREVIOUS_PRIORITIES: &str = "envoy.retry_priorities.previous_priorities";
const PREVIOUS_PRIORITIES_TYPE: &str =
    "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig";

fn priority(n: &Node) -> Option<Priority> {
    match n.enum_name("priority").as_str() {
        "DEFAULT" => Some(Priority::Default),
        "HIGH" => Some(Priority::High),
        other => {
            n.err("priority", format!("{other} is not a routing priority"));
            None
        }
    }
}

/// `envoy.config.cluster.v3.CircuitBreakers`. The first thresholds entry of a priority wins, as in Envoy.
pub fn lower_circuit_breakers(n: &Node) -> CircuitBreakersConfig {
    let mut out = CircuitBreakersConfig::default();
    let mut seen = [false; 2];
    for t in n.list("thresholds") {
        let Some(p) = priority(&t) else { continue };
        let d = Thresholds::default();
        let u = |f: &str, default: u64| t.wrapped_u32(f).map_or(default, u64::from);
        let retry_budget = t.msg("retry_budget").map(|b| {
            let budget_percent = match b.msg("budget_percent") {
                Some(pct) => {
                    let v = pct.f64("value");
                    if !(0.0..=100.0).contains(&v) {
                        pct.err("value", format!("{v} is not a percentage (0 to 100)"));
                    }
                    v.clamp(0.0, 100.0)
                }
                None => RetryBudget::default().budget_percent,
            };
            if b.duration("budget_interval").is_some_and(|d| !d.is_zero()) {
                b.err("budget_interval", "not supported by Remora");
            }
            RetryBudget {
                budget_percent,
                min_retry_concurrency: b
                    .wrapped_u32("min_retry_concurrency")
                    .unwrap_or(RetryBudget::default().min_retry_concurrency),
            }
        });
        let th = Thresholds {
            max_connections: u("max_connections", d.max_connections),
            max_pending_requests: u("max_pending_requests", d.max_pending_requests),
            max_requests: u("max_requests", d.max_requests),
            max_retries: u("max_retries", d.max_retries),
            max_connection_pools: u("max_connection_pools", d.max_connection_pools),
            track_remaining: t.bool("track_remaining"),
            retry_budget,
        };
        let i = usize::from(p == Priority::High);
        if !seen[i] {
            seen[i] = true;
            out.thresholds[i] = th;
        }
    }
    for t in n.list("per_host_thresholds") {
        let Some(p) = priority(&t) else { continue };
        let max = t.wrapped_u32("max_connections").map(u64::from);
        // Envoy reads only max_connections here; anything else would be silently ignored, so it is refused.
        for f in [
            "max_pending_requests",
            "max_requests",
            "max_retries",
            "retry_budget",
            "track_remaining",
            "max_connection_pools",
        ] {
            t.unsupported(f);
        }
        let i = usize::from(p == Priority::High);
        if out.per_host_max_connections[i].is_none() {
            out.per_host_max_connections[i] = max;
        }
    }
    out
}

/// Whole milliseconds, as Envoy's `PROTOBUF_GET_MS_*` reads durations.
fn ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// `envoy.config.cluster.v3.OutlierDetection`.
pub fn lower_outlier_detection(n: &Node) -> Option<OutlierConfig> {
    let d = OutlierConfig::default();
    let positive = |f: &str, default: Duration| match n.duration(f).map(ms) {
        Some(v) if v.is_zero() => {
            n.err(f, "must be greater than 0");
            default
        }
        Some(v) => v,
        None => default,
    };
    let interval = positive("interval", d.interval);
    let base_ejection_time = positive("base_ejection_time", d.base_ejection_time);
    let max_ejection_time = positive("max_ejection_time", d.max_ejection_time.max(base_ejection_time));
    if max_ejection_time < base_ejection_time {
        n.err(
            "max_ejection_time",
            "outlier detector's max_ejection_time cannot be smaller than base_ejection_time",
        );
        return None;
    }
    let count = |f: &str, default: u32| n.wrapped_u32(f).unwrap_or(default);
    let percent = |f: &str, default: u32| {
        let v = n.wrapped_u32(f).unwrap_or(default);
        if v > 100 {
            n.err(f, format!("{v} is more than 100"));
        }
        v.min(100)
    };
    n.unsupported("monitors");
    if n.wrapped_bool("detect_degraded_hosts") == Some(true) {
        n.err("detect_degraded_hosts", "not supported by Remora");
    }
    Some(OutlierConfig {
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_time_jitter: n.duration("max_ejection_time_jitter").map(ms).unwrap_or_default(),
        consecutive_5xx: count("consecutive_5xx", d.consecutive_5xx),
        consecutive_gateway_failure: count("consecutive_gateway_failure", d.consecutive_gateway_failure),
        consecutive_local_origin_failure: count(
            "consecutive_local_origin_failure",
            d.consecutive_local_origin_failure,
        ),
        split_external_local_origin_errors: n.bool("split_external_local_origin_errors"),
        max_ejection_percent: percent("max_ejection_percent", d.max_ejection_percent),
        always_eject_one_host: n.wrapped_bool("always_eject_one_host").unwrap_or(false),
        success_rate_minimum_hosts: count("success_rate_minimum_hosts", d.success_rate_minimum_hosts),
        success_rate_request_volume: count("success_rate_request_volume", d.success_rate_request_volume),
        success_rate_stdev_factor: count("success_rate_stdev_factor", d.success_rate_stdev_factor),
        failure_percentage_threshold: percent("failure_percentage_threshold", d.failure_percentage_threshold),
        failure_percentage_minimum_hosts: count(
            "failure_percentage_minimum_hosts",
            d.failure_percentage_minimum_hosts,
        ),
        failure_percentage_request_volume: count(
            "failure_percentage_request_volume",
            d.failure_percentage_request_volume,
        ),
        enforcing_consecutive_5xx: percent("enforcing_consecutive_5xx", d.enforcing_consecutive_5xx),
        enforcing_consecutive_gateway_failure: percent(
            "enforcing_consecutive_gateway_failure",
            d.enforcing_consecutive_gateway_failure,
        ),
        enforcing_consecutive_local_origin_failure: percent(
            "enforcing_consecutive_local_origin_failure",
            d.enforcing_consecutive_local_origin_failure,
        ),
        enforcing_success_rate: percent("enforcing_success_rate", d.enforcing_success_rate),
        enforcing_local_origin_success_rate: percent(
            "enforcing_local_origin_success_rate",
            d.enforcing_local_origin_success_rate,
        ),
        enforcing_failure_percentage: percent("enforcing_failure_percentage", d.enforcing_failure_percentage),
        enforcing_failure_percentage_local_origin: percent(
            "enforcing_failure_percentage_local_origin",
            d.enforcing_failure_percentage_local_origin,
        ),
        successful_active_health_check_uneject_host: n
            .wrapped_bool("successful_active_health_check_uneject_host")
            .unwrap_or(true),
    })
}

/// `envoy.config.route.v3.RetryPolicy`.
pub fn lower_retry_policy(n: &Node) -> Option<RetryPolicy> {
    let d = RetryPolicy::default();
    let text = n.string("retry_on").unwrap_or_default();
    let (retry_on, unknown) = RetryOn::parse_config(&text);
    for t in unknown {
        let why = match t.as_str() {
            "http3-post-connect-failure" => "is not supported by Remora",
            _ => "is not a retry condition",
        };
        n.err("retry_on", format!("{t:?} {why}"));
    }
    let per_try_timeout = n.duration("per_try_timeout").map(ms).filter(|d| !d.is_zero());
    let per_try_idle_timeout = n
        .duration("per_try_idle_timeout")
        .map(ms)
        .filter(|d| !d.is_zero());
    let previous_priorities = n.msg("retry_priority").and_then(|p| lower_retry_priority(&p));
    n.unsupported("retry_options_predicates");
    n.unsupported("rate_limited_retry_back_off");
    n.unsupported("refresh_cluster_on_retry");
    let mut previous_hosts = false;
    for p in n.list("retry_host_predicate") {
        let name = p.string("name").unwrap_or_default();
        let typed = p.any("typed_config");
        let ty = typed.as_ref().map(|t| t.type_name());
        match ty.as_deref() {
            Some(PREVIOUS_HOSTS_TYPE) => previous_hosts = true,
            None if name == PREVIOUS_HOSTS => previous_hosts = true,
            Some(other) => p.err("typed_config", format!("{other} is not supported by Remora")),
            None => p.err("name", format!("{name:?} is not supported by Remora")),
        }
    }
    let attempts = n.i64("host_selection_retry_max_attempts");
    let host_selection_max_attempts = match attempts {
        0 => d.host_selection_max_attempts,
        a if a < 0 => {
            n.err("host_selection_retry_max_attempts", "must not be negative");
            d.host_selection_max_attempts
        }
        a => u32::try_from(a).unwrap_or(u32::MAX),
    };
    let mut retriable_status_codes = Vec::new();
    for c in n.u32s("retriable_status_codes") {
        match u16::try_from(c) {
            Ok(c) if (100..600).contains(&c) => retriable_status_codes.push(c),
            _ => n.err("retriable_status_codes", format!("{c} is not an HTTP status")),
        }
    }
    let (mut base_interval, mut max_interval) = (d.base_interval, d.max_interval);
    if let Some(b) = n.msg("retry_back_off") {
        match b.duration("base_interval") {
            Some(v) => base_interval = ms(v).max(Duration::from_millis(1)),
            None => b.err("base_interval", "is required"),
        }
        max_interval = match b.duration("max_interval") {
            Some(v) if v.is_zero() => {
                b.err("max_interval", "must be greater than 0");
                base_interval * 10
            }
            Some(v) => {
                let v = ms(v).max(Duration::from_millis(1));
                if v < base_interval {
                    b.err(
                        "max_interval",
                        "must be greater than or equal to the base_interval",
                    );
                }
                v
            }
            None => base_interval * 10,
        };
    }
    let retriable_headers = n
        .list("retriable_headers")
        .iter()
        .filter_map(header_matcher)
        .collect();
    let retriable_request_headers = n
        .list("retriable_request_headers")
        .iter()
        .filter_map(header_matcher)
        .collect();
    Some(RetryPolicy {
        retry_on,
        num_retries: n.wrapped_u32("num_retries").unwrap_or(d.num_retries),
        per_try_timeout,
        per_try_idle_timeout,
        base_interval,
        max_interval,
        retriable_status_codes,
        retriable_headers,
        retriable_request_headers,
        previous_hosts,
        host_selection_max_attempts,
        previous_priorities,
    })
}

/// `retry_priority`: `envoy.retry_priorities.previous_priorities`, its `update_frequency` (which must be set,
/// greater than 0).
fn lower_retry_priority(p: &Node) -> Option<u32> {
    let name = p.string("name").unwrap_or_default();
    let Some(cfg) = p.any("typed_config") else {
        let why = if name == PREVIOUS_PRIORITIES {
            "needs its typed_config (update_frequency)".to_string()
        } else {
            format!("{name:?} is not supported by Remora")
        };
        p.err("name", why);
        return None;
    };
    if cfg.type_name() != PREVIOUS_PRIORITIES_TYPE {
        cfg.err_here(format!("{} is not supported by Remora", cfg.type_name()));
        cfg.mark_all();
        return None;
    }
    let freq = cfg.i64("update_frequency");
    if freq <= 0 {
        cfg.err("update_frequency", "must be greater than 0");
        return None;
    }
    Some(u32::try_from(freq).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::descriptors;
    use crate::config::load::{message_from_text, Format};
    use crate::config::node::Errors;

    /// Lower `yaml` as message `ty` with `f`; returns the result and the error texts.
    fn lower<T>(ty: &str, yaml: &str, f: impl Fn(&Node) -> T) -> (T, Vec<String>) {
        let desc = descriptors::message(ty).unwrap();
        // Test inputs continue lines at the indentation of the Rust source: dedent them.
        let indent = yaml
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.len() - l.trim_start().len())
            .min()
            .unwrap_or(0);
        let text: Vec<&str> = yaml
            .lines()
            .enumerate()
            .map(|(i, l)| if i == 0 { l } else { l.get(indent..).unwrap_or("") })
            .collect();
        let m = message_from_text(&text.join("\n"), Format::Yaml, &desc).unwrap();
        let errs = Errors::default();
        let out = {
            let n = Node::root(&m, "x", &errs);
            f(&n)
        };
        (out, errs.take().iter().map(|e| e.to_string()).collect())
    }

    const CB: &str = "envoy.config.cluster.v3.CircuitBreakers";
    const OD: &str = "envoy.config.cluster.v3.OutlierDetection";
    const RP: &str = "envoy.config.route.v3.RetryPolicy";

    #[test]
    fn previous_priorities_retry_priority() {
        // As Envoy Gateway emits it.
        let (p, e) = lower(
            RP,
            "retry_on: reset,reset-before-request,connect-failure
             retry_priority:
               name: envoy.retry_priorities.previous_priorities
               typed_config:
                 '@type': type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig
                 update_frequency: 3",
            lower_retry_policy,
        );
        assert!(e.is_empty(), "{e:?}");
        let p = p.unwrap();
        assert_eq!(p.previous_priorities, Some(3));
        assert!(p
            .retry_on
            .contains(RetryOn::RESET_BEFORE_REQUEST.union(RetryOn::RESET)));
        let (_, e) = lower(
            RP,
            "retry_priority: {name: x, typed_config: {'@type': \
             type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig}}",
            lower_retry_policy,
        );
        assert_eq!(
            e,
            ["x.retry_priority.typed_config.update_frequency: must be greater than 0"]
        );
    }

    #[test]
    fn circuit_breakers() {
        let (c, e) = lower(CB, "{}", lower_circuit_breakers);
        assert!(e.is_empty());
        assert_eq!(c, CircuitBreakersConfig::default());
        let (c, e) = lower(
            CB,
            "thresholds:
               - {max_connections: 10, max_requests: 20, track_remaining: true, retry_budget: {}}
               - {max_connections: 99}
               - {priority: HIGH, max_retries: 7, max_connection_pools: 2,
                  retry_budget: {budget_percent: {value: 50}, min_retry_concurrency: 1}}
             per_host_thresholds: [{max_connections: 3}]",
            lower_circuit_breakers,
        );
        assert!(e.is_empty(), "{e:?}");
        let d = c.thresholds(Priority::Default);
        assert_eq!(
            (d.max_connections, d.max_requests, d.max_pending_requests),
            (10, 20, 1024)
        );
        assert!(d.track_remaining);
        // An empty retry_budget turns the budget on with its defaults.
        assert_eq!(d.retry_budget, Some(RetryBudget::default()));
        let h = c.thresholds(Priority::High);
        assert_eq!((h.max_retries, h.max_connection_pools), (7, 2));
        assert_eq!(
            h.retry_budget,
            Some(RetryBudget {
                budget_percent: 50.0,
                min_retry_concurrency: 1
            })
        );
        assert_eq!(c.per_host_max_connections, [Some(3), None]);
        let (_, e) = lower(
            CB,
            "thresholds: [{retry_budget: {budget_interval: 1s}}]
             per_host_thresholds: [{max_requests: 3}]",
            lower_circuit_breakers,
        );
        assert_eq!(
            e,
            [
                "x.thresholds[0].retry_budget.budget_interval: not supported by Remora",
                "x.per_host_thresholds[0].max_requests: not supported by Remora"
            ]
        );
    }

    #[test]
    fn outlier_detection() {
        let (c, e) = lower(OD, "{}", lower_outlier_detection);
        assert!(e.is_empty());
        assert_eq!(c, Some(OutlierConfig::default()));
        let (c, e) = lower(
            OD,
            "{interval: 1s, base_ejection_time: 400s, consecutive_5xx: 0, max_ejection_percent: 50,
              enforcing_failure_percentage: 100, split_external_local_origin_errors: true,
              max_ejection_time_jitter: 0.0015s, always_eject_one_host: true, success_rate_stdev_factor: 1000}",
            lower_outlier_detection,
        );
        assert!(e.is_empty(), "{e:?}");
        let c = c.unwrap();
        assert_eq!(c.interval, Duration::from_secs(1));
        // max_ejection_time defaults to the larger of 300 s and the base.
        assert_eq!(c.max_ejection_time, Duration::from_secs(400));
        assert_eq!(c.max_ejection_time_jitter, Duration::from_millis(1));
        assert_eq!(
            (
                c.consecutive_5xx,
                c.max_ejection_percent,
                c.enforcing_failure_percentage
            ),
            (0, 50, 100)
        );
        assert!(c.split_external_local_origin_errors && c.always_eject_one_host);
        assert_eq!(c.success_rate_stdev_factor, 1000);
        let (c, e) = lower(
            OD,
            "{base_ejection_time: 60s, max_ejection_time: 30s}",
            lower_outlier_detection,
        );
        assert!(c.is_none());
        assert_eq!(
            e,
            ["x.max_ejection_time: outlier detector's max_ejection_time cannot be smaller than base_ejection_time"]
        );
        let (_, e) = lower(OD, "{detect_degraded_hosts: true}", lower_outlier_detection);
        assert_eq!(e, ["x.detect_degraded_hosts: not supported by Remora"]);
    }

    #[test]
    fn retry_policy() {
        let (p, e) = lower(RP, "{retry_on: 5xx}", lower_retry_policy);
        assert!(e.is_empty());
        let p = p.unwrap();
        assert_eq!(p.retry_on, RetryOn::FIVE_XX);
        assert_eq!(p.num_retries, 1);
        assert_eq!(
            (p.base_interval, p.max_interval),
            (Duration::from_millis(25), Duration::from_millis(250))
        );
        assert_eq!(p.host_selection_max_attempts, 1);
        assert!(!p.previous_hosts);

        let (p, e) = lower(
            RP,
            "retry_on: 'gateway-error,retriable-status-codes,retriable-headers,unavailable'
             num_retries: 3
             per_try_timeout: 0.25s
             per_try_idle_timeout: 1s
             retry_back_off: {base_interval: 0.1s}
             retriable_status_codes: [409, 429]
             retriable_headers: [{name: x-retry, present_match: true}]
             retriable_request_headers: [{name: x-idempotent, string_match: {exact: 'yes'}}]
             retry_host_predicate:
               - name: envoy.retry_host_predicates.previous_hosts
                 typed_config:
                   '@type': type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
             host_selection_retry_max_attempts: 5",
            lower_retry_policy,
        );
        assert!(e.is_empty(), "{e:?}");
        let p = p.unwrap();
        assert!(p
            .retry_on
            .contains(RetryOn::GATEWAY_ERROR.union(RetryOn::GRPC_UNAVAILABLE)));
        assert_eq!(p.num_retries, 3);
        assert_eq!(p.per_try_timeout, Some(Duration::from_millis(250)));
        assert_eq!(p.per_try_idle_timeout, Some(Duration::from_secs(1)));
        assert_eq!(
            (p.base_interval, p.max_interval),
            (Duration::from_millis(100), Duration::from_secs(1))
        );
        assert_eq!(p.retriable_status_codes, [409, 429]);
        assert_eq!(
            (p.retriable_headers.len(), p.retriable_request_headers.len()),
            (1, 1)
        );
        assert!(p.previous_hosts);
        assert_eq!(p.host_selection_max_attempts, 5);

        let (_, e) = lower(
            RP,
            "retry_on: '5xx,http3-post-connect-failure,bogus'
             retry_back_off: {base_interval: 1s, max_interval: 0.5s}
             retry_priority: {name: envoy.retry_priorities.previous_priorities}
             rate_limited_retry_back_off: {reset_headers: [{name: retry-after}]}",
            lower_retry_policy,
        );
        assert_eq!(
            e,
            [
                "x.retry_on: \"http3-post-connect-failure\" is not supported by Remora",
                "x.retry_on: \"bogus\" is not a retry condition",
                "x.retry_priority.name: needs its typed_config (update_frequency)",
                "x.rate_limited_retry_back_off: not supported by Remora",
                "x.retry_back_off.max_interval: must be greater than or equal to the base_interval",
            ]
        );
    }
}
