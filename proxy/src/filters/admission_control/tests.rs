use super::*;
use crate::filters::test_util::{body_text, lower as lower_yaml, request, response};
use crate::stats::Store;
use crate::upstream::lb::Rng;
use std::cell::RefCell;
use std::rc::Rc;
use tower::{service_fn, Layer, ServiceExt};

const TYPE: &str = "envoy.extensions.filters.http.admission_control.v3.AdmissionControl";

fn config(yaml: &str) -> AdmissionControlConfig {
    let (c, errs) = lower_yaml(TYPE, yaml, lower);
    assert!(errs.is_empty(), "{errs:?}");
    c.expect("config")
}

#[test]
fn lowering_applies_envoys_defaults() {
    let c = config("success_criteria: {}");
    assert!(c.enabled);
    assert_eq!(c.success, SuccessCriteria::default());
    assert_eq!(c.sampling_window, Duration::from_secs(30));
    assert_eq!(c.aggression, 1.0);
    assert!((c.sr_threshold - 0.95).abs() < 1e-12);
    assert_eq!(c.rps_threshold, 0);
    assert!((c.max_rejection_probability - 0.8).abs() < 1e-12);
}

#[test]
fn lowering_reads_runtime_defaults_and_criteria() {
    let c = config(
        "
enabled: {default_value: false, runtime_key: ac.enabled}
sampling_window: 10.7s
aggression: {default_value: 0.5, runtime_key: ac.aggression}
sr_threshold: {default_value: {value: 90}, runtime_key: ac.sr}
rps_threshold: {default_value: 5, runtime_key: ac.rps}
max_rejection_probability: {default_value: {value: 60}, runtime_key: ac.max}
success_criteria:
  http_criteria: {http_success_status: [{start: 100, end: 400}, {start: 404, end: 405}]}
  grpc_criteria: {grpc_success_status: [0, 1]}
",
    );
    assert!(!c.enabled);
    assert_eq!(c.sampling_window, Duration::from_secs(10));
    assert_eq!(c.aggression, 1.0, "aggression below 1 is 1");
    assert!((c.sr_threshold - 0.9).abs() < 1e-12);
    assert_eq!(c.rps_threshold, 5);
    assert!((c.max_rejection_probability - 0.6).abs() < 1e-12);
    assert!(c.success.http_success(399) && c.success.http_success(404));
    assert!(!c.success.http_success(400) && !c.success.http_success(405));
    assert!(c.success.grpc_success(1) && !c.success.grpc_success(2));
}

#[test]
fn lowering_refuses_invalid_criteria() {
    let (_, errs) = lower_yaml(TYPE, "{}", lower);
    assert_eq!(errs, ["typed_config.success_criteria: is required"]);
    let (_, errs) = lower_yaml(
        TYPE,
        "success_criteria: {http_criteria: {http_success_status: [{start: 50, end: 400}]}, grpc_criteria: {grpc_success_status: [17]}}",
        lower,
    );
    assert_eq!(
        errs,
        [
            "typed_config.success_criteria.http_criteria.http_success_status[0]: invalid HTTP range: [50, 400)",
            "typed_config.success_criteria.grpc_criteria.grpc_success_status: invalid gRPC code 17",
        ]
    );
    let (_, errs) = lower_yaml(
        TYPE,
        "success_criteria: {}\nsr_threshold: {default_value: {value: 0.5}}",
        lower,
    );
    assert_eq!(
        errs,
        ["typed_config.sr_threshold: Success rate threshold cannot be less than 1.0%."]
    );
}

#[test]
fn default_criteria_are_envoys() {
    let c = SuccessCriteria::default();
    assert!(c.http_success(200) && c.http_success(404) && c.http_success(499));
    assert!(!c.http_success(500) && !c.http_success(503));
    for ok in [0, 1, 2, 3, 5, 6, 9, 11, 12, 16] {
        assert!(c.grpc_success(ok), "{ok}");
    }
    for bad in [4, 7, 8, 10, 13, 14, 15] {
        assert!(!c.grpc_success(bad), "{bad}");
    }
}

#[test]
fn rejection_probability_is_envoys_formula() {
    // All succeed: nothing to reject.
    assert_eq!(rejection_probability(100, 100, 0.95, 1.0, 0.8), 0.0);
    // At the threshold exactly: (100 − 95 / 0.95) / 101 = 0.
    assert!(rejection_probability(100, 95, 0.95, 1.0, 0.8).abs() < 1e-12);
    // Half fail: (100 − 50 / 0.95) / 101.
    let p = rejection_probability(100, 50, 0.95, 1.0, 1.0);
    assert!((p - (100.0 - 50.0 / 0.95) / 101.0).abs() < 1e-12);
    // Aggression 2 takes the square root: higher rejection at the same success rate.
    let p2 = rejection_probability(100, 50, 0.95, 2.0, 1.0);
    assert!((p2 - p.sqrt()).abs() < 1e-12);
    // Capped.
    assert_eq!(rejection_probability(100, 0, 0.95, 1.0, 0.8), 0.8);
    // Four significant figures.
    assert!(rejects(0.5, 4_999) && !rejects(0.5, 5_000) && !rejects(0.0, 0));
}

#[tokio::test(start_paused = true)]
async fn the_window_slides_by_whole_seconds() {
    let mut w = SuccessWindow::new(Duration::from_secs(3));
    let t0 = Instant::now();
    w.record(t0, true);
    w.record(t0, false);
    tokio::time::advance(Duration::from_millis(1500)).await;
    w.record(Instant::now(), false);
    assert_eq!(w.counts(Instant::now()), (3, 1));
    // 3 requests over the 3 s window.
    assert_eq!(w.average_rps(Instant::now()), 1);
    tokio::time::advance(Duration::from_millis(1500)).await;
    // The first bucket is 3 s old: gone.
    assert_eq!(w.counts(Instant::now()), (1, 0));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(w.counts(Instant::now()), (0, 0));
    assert_eq!(w.average_rps(Instant::now()), 0);
}

fn controller(yaml: &str) -> (Arc<AdmissionController>, Arc<Store>) {
    let store = Store::new();
    (
        AdmissionController::new(config(yaml), &store.scope("http.ingress.")),
        store,
    )
}

fn counter(store: &Store, name: &str) -> u64 {
    store
        .counter(&format!("http.ingress.admission_control.{name}"))
        .value()
}

#[tokio::test(start_paused = true)]
async fn failures_raise_rejections_and_stats_count() {
    let (c, store) =
        controller("success_criteria: {}\nmax_rejection_probability: {default_value: {value: 100}}");
    let rng: SharedRng = Rc::new(RefCell::new(Rng::seeded(11)));
    let status = Rc::new(std::cell::Cell::new(503u16));
    let s2 = status.clone();
    let svc = AdmissionControlLayer::new(c.clone(), rng).layer(service_fn(move |_req: Request<()>| {
        let code = s2.get();
        async move { Ok::<_, Infallible>(response(code)) }
    }));
    // The first request always passes (an empty window), and fails.
    let r = svc.clone().oneshot(request()).await.expect("infallible");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(counter(&store, "rq_failure"), 1);
    assert!(
        r.extensions().get::<FilterReply>().is_none(),
        "an upstream 503, not a rejection"
    );

    let mut rejected = 0;
    for _ in 0..200 {
        let r = svc.clone().oneshot(request()).await.expect("infallible");
        if let Some(reply) = r.extensions().get::<FilterReply>() {
            assert_eq!(reply.details, "denied_by_admission_control");
            assert_eq!(reply.flag, None);
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(body_text(r).await, "");
            rejected += 1;
        }
    }
    assert!(rejected > 100, "{rejected}");
    assert_eq!(counter(&store, "rq_rejected"), rejected);
    // Rejections are not recorded.
    assert_eq!(counter(&store, "rq_failure"), 201 - rejected);
    assert_eq!(counter(&store, "rq_success"), 0);

    // Once the upstream recovers and the failures age out of the window, nothing is rejected.
    status.set(200);
    tokio::time::advance(Duration::from_secs(31)).await;
    let before = counter(&store, "rq_rejected");
    for _ in 0..100 {
        svc.clone().oneshot(request()).await.expect("infallible");
    }
    assert_eq!(counter(&store, "rq_rejected"), before);
    assert_eq!(counter(&store, "rq_success"), 100);
}

#[tokio::test(start_paused = true)]
async fn below_the_rps_threshold_nothing_is_rejected() {
    let (c, store) = controller(
        "success_criteria: {}\nrps_threshold: {default_value: 10}\nsampling_window: 1s\nmax_rejection_probability: {default_value: {value: 100}}",
    );
    let rng: SharedRng = Rc::new(RefCell::new(Rng::seeded(5)));
    let svc = AdmissionControlLayer::new(c, rng).layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(response(500))
    }));
    for _ in 0..9 {
        svc.clone().oneshot(request()).await.expect("infallible");
    }
    assert_eq!(counter(&store, "rq_rejected"), 0);
    assert_eq!(counter(&store, "rq_failure"), 9);
    for _ in 0..50 {
        svc.clone().oneshot(request()).await.expect("infallible");
    }
    assert!(counter(&store, "rq_rejected") > 0);
}

#[tokio::test(start_paused = true)]
async fn disabled_neither_rejects_nor_records() {
    let (c, store) = controller("success_criteria: {}\nenabled: {default_value: false}");
    let rng: SharedRng = Rc::new(RefCell::new(Rng::seeded(5)));
    let svc = AdmissionControlLayer::new(c, rng).layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(response(500))
    }));
    for _ in 0..20 {
        svc.clone().oneshot(request()).await.expect("infallible");
    }
    assert_eq!(counter(&store, "rq_failure"), 0);
    assert_eq!(counter(&store, "rq_rejected"), 0);
}

fn grpc(status: Option<&str>, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    if let Some(s) = status {
        r.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_str(s).expect("value"));
    }
    r
}

#[tokio::test(start_paused = true)]
async fn grpc_status_is_judged_from_headers_or_trailers() {
    let (c, store) = controller("success_criteria: {}");
    // Trailers-only: the status in the headers decides.
    assert_eq!(c.judge_headers(&grpc(Some("0"), Body::empty())), Some(true));
    assert_eq!(c.judge_headers(&grpc(Some("14"), Body::empty())), Some(false));
    assert_eq!(c.judge_headers(&grpc(Some("x"), Body::empty())), Some(false));
    // A streaming gRPC response without a status: the trailers decide.
    assert_eq!(c.judge_headers(&grpc(None, Body::full("frame"))), None);
    // Not gRPC (no status on an ended body, or not 200): HTTP criteria.
    assert_eq!(c.judge_headers(&grpc(None, Body::empty())), Some(true));
    let mut r = grpc(None, Body::full("x"));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    assert_eq!(c.judge_headers(&r), Some(false));

    let mut judge = TrailerJudge {
        controller: c.clone(),
    };
    let mut t = HeaderMap::new();
    t.insert("grpc-status", http::HeaderValue::from_static("4"));
    judge.trailers(&t);
    t.insert("grpc-status", http::HeaderValue::from_static("5"));
    judge.trailers(&t);
    assert_eq!(counter(&store, "rq_failure"), 1);
    assert_eq!(counter(&store, "rq_success"), 1);
}
