use super::*;
use crate::filters::test_util::{body_text, lower as lower_yaml, request, response};
use crate::stats::Store;
use crate::upstream::lb::Rng;
use std::cell::RefCell;
use std::rc::Rc;
use tower::{service_fn, Layer, ServiceExt};

const TYPE: &str = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const MS: Duration = Duration::from_millis(1);

fn config(yaml: &str, per_route: bool) -> LocalRateLimitConfig {
    let (c, errs) = lower_yaml(TYPE, yaml, |n| lower(n, per_route));
    assert!(errs.is_empty(), "{errs:?}");
    c.expect("config")
}

const ENFORCED: &str = "
stat_prefix: rl
token_bucket: {max_tokens: 2, tokens_per_fill: 1, fill_interval: 1s}
filter_enabled: {default_value: {numerator: 100}, runtime_key: rl.enabled}
filter_enforced: {default_value: {numerator: 100}, runtime_key: rl.enforced}
response_headers_to_add:
- {append_action: OVERWRITE_IF_EXISTS_OR_ADD, header: {key: x-local-rate-limit, value: 'true'}}
";

#[test]
fn lowering_applies_envoys_defaults() {
    let c = config("stat_prefix: rl", false);
    assert_eq!(c.token_bucket, None);
    assert_eq!(c.filter_enabled, FractionalPercent::ZERO);
    assert_eq!(c.filter_enforced, FractionalPercent::ZERO);
    assert_eq!(c.status, StatusCode::TOO_MANY_REQUESTS);
    let c = config(
        "stat_prefix: rl\ntoken_bucket: {max_tokens: 5, fill_interval: 0.05s}\nstatus: {code: OK}",
        false,
    );
    assert_eq!(
        c.token_bucket,
        Some(TokenBucketConfig {
            max_tokens: 5,
            tokens_per_fill: 1,
            fill_interval: 50 * MS
        })
    );
    assert_eq!(c.status, StatusCode::TOO_MANY_REQUESTS, "below 400 is 429");
}

#[test]
fn lowering_refuses_what_envoy_and_remora_refuse() {
    let (_, errs) = lower_yaml(TYPE, "stat_prefix: rl", |n| lower(n, true));
    assert_eq!(
        errs,
        ["typed_config.token_bucket: local rate limit token bucket must be set for per filter configs"]
    );
    let (_, errs) = lower_yaml(
        TYPE,
        "stat_prefix: rl\ntoken_bucket: {max_tokens: 1, fill_interval: 0.01s}\ndescriptors: [{entries: [{key: a, value: b}], token_bucket: {max_tokens: 1, fill_interval: 1s}}]",
        |n| lower(n, false),
    );
    assert_eq!(
        errs,
        [
            "typed_config.token_bucket.fill_interval: is required and must be at least 50ms",
            "typed_config.descriptors: not supported by Remora",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn the_bucket_fills_at_whole_intervals_up_to_max() {
    let b = TokenBucket::new(
        TokenBucketConfig {
            max_tokens: 3,
            tokens_per_fill: 2,
            fill_interval: 100 * MS,
        },
        Instant::now(),
    );
    for _ in 0..3 {
        assert!(b.try_take(Instant::now()));
    }
    assert!(!b.try_take(Instant::now()));
    tokio::time::advance(99 * MS).await;
    assert!(!b.try_take(Instant::now()), "no fill before the interval");
    tokio::time::advance(MS).await;
    assert!(b.try_take(Instant::now()));
    assert!(b.try_take(Instant::now()));
    assert!(!b.try_take(Instant::now()));
    // Idle for ten intervals: capped at max_tokens.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(b.try_take(Instant::now()));
    assert_eq!(b.tokens(), 2);
    // Fills stay on the original grid (creation + k × interval).
    tokio::time::advance(50 * MS).await;
    b.try_take(Instant::now());
    b.try_take(Instant::now());
    assert!(!b.try_take(Instant::now()));
    tokio::time::advance(50 * MS).await;
    assert_eq!((b.try_take(Instant::now()), b.tokens()), (true, 1));
}

fn counters(store: &Store, prefix: &str) -> [u64; 4] {
    ["enabled", "ok", "rate_limited", "enforced"].map(|n| {
        store
            .counter(&format!("{prefix}.http_local_rate_limit.{n}"))
            .value()
    })
}

fn rng() -> SharedRng {
    Rc::new(RefCell::new(Rng::seeded(9)))
}

#[tokio::test(start_paused = true)]
async fn over_the_limit_gets_429_with_configured_headers() {
    let store = Store::new();
    let limiter = LocalRateLimiter::new(&config(ENFORCED, false), &store.scope(""), Instant::now());
    let svc = LocalRateLimitLayer::new(limiter, rng()).layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(response(200))
    }));
    for _ in 0..2 {
        let r = svc.clone().oneshot(request()).await.expect("infallible");
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = svc.clone().oneshot(request()).await.expect("infallible");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["x-local-rate-limit"], "true");
    assert!(
        r.headers().get("x-envoy-ratelimited").is_none(),
        "Envoy's local limiter does not set it"
    );
    assert_eq!(
        r.extensions().get::<FilterReply>(),
        Some(&FilterReply {
            details: "local_rate_limited",
            flag: Some(ResponseFlag::RateLimited)
        })
    );
    assert_eq!(body_text(r).await, "local_rate_limited");
    assert_eq!(counters(&store, "rl"), [3, 2, 1, 1]);
    tokio::time::advance(Duration::from_secs(1)).await;
    let r = svc.clone().oneshot(request()).await.expect("infallible");
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn enabled_but_not_enforced_passes_with_request_headers() {
    let store = Store::new();
    let yaml = "
stat_prefix: shadow
token_bucket: {max_tokens: 0, fill_interval: 1s}
filter_enabled: {default_value: {numerator: 100}}
request_headers_to_add_when_not_enforced:
- {header: {key: x-rate-limited, value: shadow}}
";
    let limiter = LocalRateLimiter::new(&config(yaml, false), &store.scope(""), Instant::now());
    let svc = LocalRateLimitLayer::new(limiter, rng()).layer(service_fn(|req: Request<()>| async move {
        let saw = req.headers().get("x-rate-limited").is_some();
        Ok::<_, Infallible>(response(if saw { 202 } else { 200 }))
    }));
    let r = svc.clone().oneshot(request()).await.expect("infallible");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(counters(&store, "shadow"), [1, 0, 1, 0]);
}

#[tokio::test(start_paused = true)]
async fn not_enabled_is_not_counted() {
    let store = Store::new();
    let limiter = LocalRateLimiter::new(
        &config(
            "stat_prefix: off\ntoken_bucket: {max_tokens: 0, fill_interval: 1s}",
            false,
        ),
        &store.scope(""),
        Instant::now(),
    );
    let svc = LocalRateLimitLayer::new(limiter, rng()).layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(response(200))
    }));
    let r = svc.clone().oneshot(request()).await.expect("infallible");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(counters(&store, "off"), [0, 0, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_route_limiter_has_its_own_bucket_and_stats() {
    let store = Store::new();
    let root = store.scope("");
    // The filter: enabled, no bucket (only routes limit).
    let global = LocalRateLimiter::new(
        &config(
            "stat_prefix: global\nfilter_enabled: {default_value: {numerator: 100}}",
            false,
        ),
        &root,
        Instant::now(),
    );
    let route_cfg = config(&ENFORCED.replace("stat_prefix: rl", "stat_prefix: route_a"), true);
    let route = RouteLocalRateLimit(LocalRateLimiter::new(&route_cfg, &root, Instant::now()));
    let svc = LocalRateLimitLayer::new(global, rng()).layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(response(200))
    }));
    let routed = || {
        let mut r = request();
        r.extensions_mut().insert(route.clone());
        r
    };
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            svc.clone()
                .oneshot(routed())
                .await
                .expect("infallible")
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 429]);
    // Unrouted requests use the filter's config: no bucket, never limited.
    for _ in 0..5 {
        let r = svc.clone().oneshot(request()).await.expect("infallible");
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(counters(&store, "route_a"), [3, 2, 1, 1]);
    assert_eq!(counters(&store, "global"), [5, 5, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn fractions_enable_and_enforce_a_share_of_requests() {
    let store = Store::new();
    let yaml = "
stat_prefix: half
token_bucket: {max_tokens: 0, fill_interval: 1s}
filter_enabled: {default_value: {numerator: 100}}
filter_enforced: {default_value: {numerator: 5000, denominator: TEN_THOUSAND}}
";
    let limiter = LocalRateLimiter::new(&config(yaml, false), &store.scope(""), Instant::now());
    let mut rng = Rng::seeded(3);
    let mut rejected = 0;
    for _ in 0..1000 {
        if limiter.decide(Instant::now(), rng.next_u64(), rng.next_u64()) == Decision::Reject {
            rejected += 1;
        }
    }
    assert!((400..600).contains(&rejected), "{rejected}");
    assert_eq!(counters(&store, "half"), [1000, 0, 1000, rejected]);
}
