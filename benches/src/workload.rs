//! The workloads the harness can run.

use crate::load::Proto;
use crate::Result;

/// One kind of traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Short name, used on the command line and in file names.
    pub name: &'static str,
    /// What it is, for the report.
    pub title: &'static str,
    /// Protocol from the load generator to the proxy.
    pub proto: Proto,
    /// Connections the load generator opens.
    pub connections: usize,
    /// Requests in flight per connection (h2 only).
    pub streams: usize,
    /// Request path.
    pub path: &'static str,
    /// Request body bytes (the gRPC message size for gRPC).
    pub body: usize,
    /// Unary gRPC calls.
    pub grpc: bool,
    /// TLS from the load generator to the proxy (terminated there; plaintext to the upstream).
    pub tls: bool,
    /// A new connection (and TLS handshake) for every request.
    pub new_conn: bool,
}

impl Workload {
    /// Whether proxies should speak h2 to the upstream (gRPC needs it; h2c multiplexing keeps it end to end).
    pub fn upstream_h2(&self) -> bool {
        self.proto == Proto::H2
    }
}

/// Every workload, in report order.
pub const ALL: [Workload; 8] = [
    Workload {
        name: "h1-c1",
        title: "HTTP/1.1 keep-alive, 1 connection, small body",
        proto: Proto::H1,
        connections: 1,
        streams: 1,
        path: "/",
        body: 0,
        grpc: false,
        tls: false,
        new_conn: false,
    },
    Workload {
        name: "h1-c50",
        title: "HTTP/1.1 keep-alive, 50 connections, small body",
        proto: Proto::H1,
        connections: 50,
        streams: 1,
        path: "/",
        body: 0,
        grpc: false,
        tls: false,
        new_conn: false,
    },
    Workload {
        name: "h1-c500",
        title: "HTTP/1.1 keep-alive, 500 connections, small body",
        proto: Proto::H1,
        connections: 500,
        streams: 1,
        path: "/",
        body: 0,
        grpc: false,
        tls: false,
        new_conn: false,
    },
    Workload {
        name: "h1-64k",
        title: "HTTP/1.1 keep-alive, 50 connections, 64 KiB response body",
        proto: Proto::H1,
        connections: 50,
        streams: 1,
        path: "/size/65536",
        body: 0,
        grpc: false,
        tls: false,
        new_conn: false,
    },
    Workload {
        name: "h2c",
        title: "h2c (prior knowledge), 10 connections x 10 streams, small body",
        proto: Proto::H2,
        connections: 10,
        streams: 10,
        path: "/",
        body: 0,
        grpc: false,
        tls: false,
        new_conn: false,
    },
    Workload {
        name: "grpc",
        title: "gRPC unary over h2c, 10 connections x 10 streams, 64-byte message",
        proto: Proto::H2,
        connections: 10,
        streams: 10,
        path: "/",
        body: 64,
        grpc: true,
        tls: false,
        new_conn: false,
    },
    Workload {
        name: "tls-h1-c50",
        title: "HTTP/1.1 keep-alive over TLS 1.3, 50 connections, small body",
        proto: Proto::H1,
        connections: 50,
        streams: 1,
        path: "/",
        body: 0,
        grpc: false,
        tls: true,
        new_conn: false,
    },
    Workload {
        name: "tls-handshake",
        title:
            "a new TLS 1.3 connection per request (full handshake, one HTTP/1.1 request, close), 50 clients: \
                req/s is handshakes/s and CPU µs/req is CPU per handshake",
        proto: Proto::H1,
        connections: 50,
        streams: 1,
        path: "/",
        body: 0,
        grpc: false,
        tls: true,
        new_conn: true,
    },
];

/// The workload `--quick` runs.
pub const QUICK: &str = "h1-c50";

/// Workloads by comma-separated names (`all` for every one).
pub fn select(names: &str) -> Result<Vec<Workload>> {
    if names == "all" {
        return Ok(ALL.to_vec());
    }
    names
        .split(',')
        .map(|n| {
            ALL.iter().find(|w| w.name == n.trim()).copied().ok_or_else(|| {
                let known: Vec<_> = ALL.iter().map(|w| w.name).collect();
                format!("unknown workload {n:?} (known: {})", known.join(", ")).into()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection() {
        assert_eq!(select("all").unwrap().len(), ALL.len());
        assert_eq!(select(QUICK).unwrap()[0].connections, 50);
        assert_eq!(select("grpc,h1-c1").unwrap().len(), 2);
        assert!(select("h3").is_err());
        let tls = select("tls-h1-c50,tls-handshake").unwrap();
        assert!(tls.iter().all(|w| w.tls && !w.upstream_h2()));
        assert_eq!(tls.iter().filter(|w| w.new_conn).count(), 1);
    }
}
