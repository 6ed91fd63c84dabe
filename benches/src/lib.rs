//! Remora's load harness: runs Remora beside other proxies on one machine and writes the comparison.
//!
//! Three binaries share this library (see `benches/README.md` for how to run them and what the figures mean):
//! - `bench-upstream` ([`upstream`]): a small, fast HTTP/1.1 + h2c + gRPC origin;
//! - `bench-load` ([`load`]): a closed- and open-loop load generator on hyper's connection-level client;
//! - `bench-harness` ([`harness`]): starts the upstream and each proxy pinned to their cores, runs every
//!   workload against every arm in interleaved repetitions, samples the proxy's CPU time and memory from
//!   `/proc`, and writes a Markdown table and SVG charts ([`report`], [`svg`]).
//!
//! None of it links the proxy: the harness runs the `remora` binary like any other proxy.

pub mod args;
pub mod child;
pub mod harness;
pub mod hist;
pub mod load;
pub mod procfs;
pub mod proxies;
pub mod report;
pub mod svg;
pub mod tls;
pub mod upstream;
pub mod workload;

/// The error type of the harness: any error, boxed.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// A result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Writes a line to stdout, failing (rather than panicking like `println!`) if stdout is closed.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}
pub mod scenario;
pub mod xds;
