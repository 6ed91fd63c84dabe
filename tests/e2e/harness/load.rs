//! [`load`]: a bounded request loop for "no request fails while X happens" tests.
//!
//! `concurrency` workers share one [`HttpClient`] (so one pool) and send requests one after another until the
//! [`Budget`] is spent. Each request is read whole, trailers included, within the client's timeout: a response
//! cut off mid-body counts as a failure, not a success. The loop therefore ends by itself after at most the
//! budget plus one client timeout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::time::Instant;

use super::HttpClient;

/// When a load loop stops starting requests.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    /// After this many requests in all.
    Count(u64),
    /// After this long (requests in flight then still finish).
    For(Duration),
}

/// What a load loop saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Whole responses with a 2xx status.
    pub ok: u64,
    /// Everything else: non-2xx responses and requests with no whole response.
    pub failed: u64,
    /// Whole responses by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests with no whole response, by error text.
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }

    /// Panics with the report unless every request got a whole 2xx response (and there was at least one).
    pub fn assert_all_ok(&self) {
        assert!(self.failed == 0 && self.ok > 0, "load had failures: {self:#?}");
    }

    fn merge(&mut self, other: LoadReport) {
        self.ok += other.ok;
        self.failed += other.failed;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        for (error, n) in other.errors {
            *self.errors.entry(error).or_default() += n;
        }
    }
}

/// Sends requests built by `build(i)` (`i` counts from 0 across workers) from `concurrency` workers until
/// `budget` is spent; see the module docs.
pub async fn load<F>(client: &HttpClient, concurrency: usize, budget: Budget, build: F) -> LoadReport
where
    F: Fn(u64) -> Request<Full<Bytes>> + Send + Sync + 'static,
{
    assert!(concurrency > 0, "load needs at least one worker");
    let started = Instant::now();
    let deadline = match budget {
        Budget::Count(_) => None,
        Budget::For(duration) => Some(started + duration),
    };
    let limit = match budget {
        Budget::Count(n) => n,
        Budget::For(_) => u64::MAX,
    };
    let next = Arc::new(AtomicU64::new(0));
    let build = Arc::new(build);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let next = next.clone();
        let build = build.clone();
        workers.spawn(async move {
            let mut report = LoadReport::default();
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= limit {
                    break;
                }
                match client.fetch(build(i)).await {
                    Ok(reply) => {
                        *report.statuses.entry(reply.status.as_u16()).or_default() += 1;
                        if reply.status.is_success() {
                            report.ok += 1;
                        } else {
                            report.failed += 1;
                        }
                    }
                    Err(e) => {
                        report.failed += 1;
                        *report.errors.entry(e.to_string()).or_default() += 1;
                    }
                }
            }
            report
        });
    }
    let mut total = LoadReport::default();
    while let Some(worker) = workers.join_next().await {
        match worker {
            Ok(report) => total.merge(report),
            Err(e) => panic!("load worker died: {e}"),
        }
    }
    total.elapsed = started.elapsed();
    total
}
