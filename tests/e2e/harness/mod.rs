//! The end-to-end harness: drives the real `remora` binary against in-process origins.
//!
//! A test builds its world from four pieces, all on `127.0.0.1:0` so that tests run in parallel:
//!
//! - [`Upstream`]: an HTTP/1.1 + h2c origin that echoes each request back as JSON ([`Echo`]) and has a few
//!   special paths (`/status/NNN`, `/delay/MS`, `/bytes/N`, `/echo`); a test may install its own handler.
//! - [`GrpcUpstream`] and [`GrpcClient`]: a gRPC origin for `test.Echo` (unary and bidi) and
//!   `cache.EntityService/Get`, written without codegen, and a client that returns headers, message, status and
//!   trailers apart so that a test can see what the proxy did to each.
//! - [`Remora`]: the proxy process, started on a config written to a temp dir. Its admin address comes from
//!   Envoy's `--admin-address-path` file and its listener ports from `GET /listeners?format=json`, so configs
//!   use port 0 everywhere.
//! - [`HttpClient`] and [`load`]: a pooled HTTP/1.1 or h2c client and a bounded load loop whose
//!   [`LoadReport`] tells whether any request failed.
//!
//! Every wait is bounded ([`DEFAULT_TIMEOUT`] unless a test passes its own) and waits on a readiness signal
//! (a file, an admin endpoint, a stat) polled at a short interval, never on a fixed sleep. Helpers that a
//! test expects to succeed panic with context (the proxy's logs included) instead of returning errors.

// Each test file uses a subset of the harness.
#![allow(dead_code, unused_imports)]

mod client;
mod dns;
mod grpc;
mod load;
mod process;
mod upstream;
pub mod xds;

use std::future::Future;
use std::time::Duration;

pub use client::{build_request, get, h2c_client, http1_client, ClientError, HttpClient, Reply};
pub use dns::DnsServer;
pub use grpc::{
    serving_health_check, BidiCall, EchoReply, EchoRequest, GrpcClient, GrpcUpstream, UnaryOutcome,
    BIDI_PATH, CACHE_GET_PATH, ECHO_TRAILER, FAIL_DETAIL, HEALTH_CHECK_PATH, UNARY_PATH,
};
pub use load::{load, Budget, LoadReport};
pub use process::{parse_listener_addr, parse_stats, validate, validate_command, Remora, TempDir};
pub use upstream::{
    echo_response, full, reply, BoxError, Echo, Protocol, Upstream, UpstreamBody, UpstreamOptions,
};
pub use xds::XdsServer;

/// How long a harness wait lasts unless the test says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a poll (a file, an admin endpoint, a stat) looks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Awaits `fut` for at most `limit`, panicking with `what` if it takes longer.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}
