//! HTTP access logs as Envoy writes them: `access_log` entries with the file, stdout and stderr loggers, Envoy's
//! format strings and JSON formats, and its filters.
//!
//! - [`lower`] turns the `access_log` items of a config (`envoy.config.accesslog.v3.AccessLog`) into
//!   [`AccessLog`]s; format strings are parsed there, once, into literal and operator pieces
//!   (`format`), so a request does no parsing and no look-up by name.
//! - The data path builds a [`LogRecord`] (borrowed views of what the request already holds) when a request
//!   ends and calls [`AccessLog::log`]: the filter decides, the line is formatted into a per-thread buffer and
//!   appended to the destination's buffer.
//! - A [`Manager`] owns the destinations and a thread that writes them out; `flush_all` at shutdown,
//!   `reopen_all` for admin `/reopen_logs`. Writing never blocks a request (see `sink`).
//!
//! The reference is Envoy's `docs/root/configuration/observability/access_log/usage.rst` (operators, default
//! format, format dictionaries) and `stats.rst` (the `filesystem.*` stats), and the behaviour of
//! `source/common/formatter/` and `source/common/access_log/` where the docs are silent.

mod config;
mod filter;
mod format;
mod sink;
mod time;

pub use config::lower;
pub use format::{DEFAULT_FORMAT, RESPONSE_FLAGS};
pub use sink::{Manager, DEFAULT_FLUSH_INTERVAL, MAX_BUFFERED, MIN_FLUSH_SIZE};

use filter::Filter;
use format::{Bufs, Format};
use http::{HeaderMap, Method, Uri, Version};
use sink::Sink;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// What the data path knows about a finished request, borrowed: building one allocates nothing.
///
/// A field the request never reached stays `None` (printed `-`, or `null` in JSON).
#[derive(Clone, Debug)]
pub struct LogRecord<'a> {
    /// `%REQ(:METHOD)%`.
    pub method: &'a Method,
    /// `%REQ(:PATH)%` (path and query), `%REQ(:AUTHORITY)%` (else the `host` header), `%REQ(:SCHEME)%`.
    pub uri: &'a Uri,
    /// `%PROTOCOL%`.
    pub version: Version,
    /// `%REQ(X)%`: the request headers as the router saw them (`x-envoy-original-path` included).
    pub request_headers: &'a HeaderMap,
    /// `%RESPONSE_CODE%` (`0` when no response started), `%RESP(:STATUS)%`.
    pub response_code: Option<u16>,
    /// `%RESP(X)%`.
    pub response_headers: Option<&'a HeaderMap>,
    /// `%TRAILER(X)%`.
    pub response_trailers: Option<&'a HeaderMap>,
    /// `%START_TIME%`: when the request's first byte arrived.
    pub start_time: SystemTime,
    /// `%DURATION%`: start to the last byte sent downstream.
    pub duration: Option<Duration>,
    /// `%REQUEST_DURATION%`: start to the last byte of the request received.
    pub request_duration: Option<Duration>,
    /// `%RESPONSE_DURATION%`: start to the first byte read from the upstream.
    pub response_duration: Option<Duration>,
    /// `%BYTES_RECEIVED%`: request body bytes.
    pub bytes_received: u64,
    /// `%BYTES_SENT%`: response body bytes.
    pub bytes_sent: u64,
    /// `%RESPONSE_FLAGS%`: Envoy's short names (`UF`, `URX`, ...), in any order.
    pub response_flags: &'a [&'static str],
    /// `%RESPONSE_CODE_DETAILS%` (empty: not set).
    pub response_code_details: &'a str,
    /// `%UPSTREAM_HOST%`, `%UPSTREAM_REMOTE_ADDRESS%`.
    pub upstream_host: Option<SocketAddr>,
    /// `%UPSTREAM_CLUSTER%` (the cluster's `alt_stat_name` if it has one, as in Envoy).
    pub upstream_cluster: Option<&'a str>,
    /// `%UPSTREAM_LOCAL_ADDRESS%`.
    pub upstream_local_address: Option<SocketAddr>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub upstream_transport_failure_reason: Option<&'a str>,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`: the peer (or the address `x-forwarded-for` gave, with
    /// `use_remote_address` and trusted hops).
    pub downstream_remote_address: Option<SocketAddr>,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`.
    pub downstream_local_address: Option<SocketAddr>,
    /// `%ROUTE_NAME%`.
    pub route_name: Option<&'a str>,
    /// `%REQUESTED_SERVER_NAME%` (SNI).
    pub requested_server_name: Option<&'a str>,
    /// `%CONNECTION_ID%`.
    pub connection_id: u64,
    /// The health-check filter answered this request (`not_health_check_filter` leaves it out).
    pub health_check: bool,
}

impl<'a> LogRecord<'a> {
    /// A record of a request that has gone nowhere yet; the data path fills in the rest.
    pub fn new(
        method: &'a Method,
        uri: &'a Uri,
        version: Version,
        request_headers: &'a HeaderMap,
        start_time: SystemTime,
    ) -> Self {
        LogRecord {
            method,
            uri,
            version,
            request_headers,
            response_code: None,
            response_headers: None,
            response_trailers: None,
            start_time,
            duration: None,
            request_duration: None,
            response_duration: None,
            bytes_received: 0,
            bytes_sent: 0,
            response_flags: &[],
            response_code_details: "",
            upstream_host: None,
            upstream_cluster: None,
            upstream_local_address: None,
            upstream_transport_failure_reason: None,
            downstream_remote_address: None,
            downstream_local_address: None,
            route_name: None,
            requested_server_name: None,
            connection_id: 0,
            health_check: false,
        }
    }
}

/// One `access_log` entry: its filter, its format and its destination.
#[derive(Debug)]
pub struct AccessLog {
    filter: Option<Filter>,
    format: Format,
    sink: Arc<Sink>,
}

thread_local! {
    static BUFS: RefCell<Bufs> = RefCell::new(Bufs::default());
}

impl AccessLog {
    /// Log one request, if the filter lets it through. Never blocks on I/O.
    pub fn log(&self, rec: &LogRecord<'_>) {
        if let Some(f) = &self.filter {
            if !f.evaluate(rec) {
                return;
            }
        }
        BUFS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut b) => {
                self.write(rec, &mut b);
                // One huge line should not pin a huge buffer to the thread.
                if b.out.capacity() > MIN_FLUSH_SIZE {
                    *b = Bufs::default();
                }
            }
            Err(_) => self.write(rec, &mut Bufs::default()),
        });
    }

    fn write(&self, rec: &LogRecord<'_>, b: &mut Bufs) {
        b.out.clear();
        self.format.write(rec, b);
        self.sink.write(&b.out);
    }
}

#[cfg(test)]
mod tests;
