//! Remora: a native Rust sidecar data-plane proxy, an Envoy-compatible subset.
//!
//! # A request's life
//!
//! ```text
//!  accept (worker thread, its own current-thread runtime; original_dst listener filter: SO_ORIGINAL_DST)
//!    ├─ tcp_proxy: a host of the cluster, bytes copied both ways    listener::tcp_proxy
//!    └─ hyper connection: HTTP/1.1 or h2c (codec_type; upgrades only with upgrade_configs)
//!         └─ per request: connection manager header rules          listener::hcm::handle
//!              └─ route match on the current route table          route::RouteTable::route
//!                   ├─ direct response / redirect / 404 (NR)      local replies
//!                   └─ cluster (by id, from the cluster snapshot)
//!                        ├─ host named by the request: dynamic forward proxy (DNS cache, a hit does not
//!                        │  await) or ORIGINAL_DST (header, or restored destination)  upstream::dfp, original_dst
//!                        ├─ else priority (load, panic), zone or locality, then host   upstream::HostSet::pick
//!                        │  (round robin, least request, random, ring hash, maglev)    upstream::lb
//!                        ├─ CONNECT: TCP connection, 200, bytes copied both ways   listener::hcm::tunnel
//!                        └─ pooled connection of this worker (HTTP/1.1 or h2)  upstream::pool
//!                             └─ response streams back; stats and pool return at its end
//! ```
//!
//! Configuration is Envoy's: a bootstrap in YAML or JSON is parsed against Envoy's own protobuf descriptors
//! ([`config::load`]) and lowered into the runtime model ([`config`]); any field Remora does not implement is
//! refused with its path. Everything a request needs (compiled regexes, header names, stat handles) is prepared
//! when the configuration is lowered; the request path does atomic increments and no look-up by name.
//!
//! # Cancellation
//!
//! A client that goes away drops its request's future: the upstream request is dropped with it (hyper resets an
//! HTTP/2 stream, and closes an HTTP/1.1 connection whose response was not read to its end), and the request's
//! stats are completed by drop guards, so counts and active gauges stay right.

pub mod access_log;
pub mod admin;
pub mod body;
pub mod cli;
pub mod config;
pub mod filters;
pub mod fuzzing;
pub mod layered_runtime;
pub mod listener;
pub mod logging;
pub mod retry;
pub mod route;
pub mod runtime;
pub mod server;
pub mod sidecar;
pub mod stats;
pub mod tls;
pub mod upstream;
pub mod util;
pub mod xds;
