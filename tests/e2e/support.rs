//! Config builders shared by the behaviour tests: Envoy bootstraps as `serde_json::Value` (JSON is YAML, and
//! `json!` composes without indentation mistakes), and [`Proxy`], a started Remora with its listener address.
//!
//! Every bootstrap has one listener named [`LISTENER`] on `127.0.0.1:0` with an HTTP connection manager whose
//! `route_config` the test gives, the admin on `127.0.0.1:0`, and STATIC clusters on the test's upstreams.

// Each test file uses a subset.
#![allow(dead_code)]

use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::harness::{h2c_client, http1_client, HttpClient, Remora};

pub const LISTENER: &str = "main";

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const HTTP_OPTIONS_TYPE: &str = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// A STATIC cluster with one endpoint per address, HTTP/1.1 to the upstream.
pub fn cluster(name: &str, addrs: &[SocketAddr]) -> Value {
    let endpoints: Vec<Value> = addrs
        .iter()
        .map(|a| {
            json!({"endpoint": {"address": {"socket_address": {
                "address": a.ip().to_string(), "port_value": a.port()}}}})
        })
        .collect();
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    })
}

/// As [`cluster`], speaking h2c to the upstream through `typed_extension_protocol_options`.
pub fn h2_cluster(name: &str, addrs: &[SocketAddr]) -> Value {
    let mut c = cluster(name, addrs);
    c["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_OPTIONS_TYPE,
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    });
    c
}

/// As [`cluster`], speaking h2c through the older cluster-level `http2_protocol_options`.
pub fn legacy_h2_cluster(name: &str, addrs: &[SocketAddr]) -> Value {
    let mut c = cluster(name, addrs);
    c["http2_protocol_options"] = json!({});
    c
}

/// A route matching `match_` and forwarding to `cluster`.
pub fn to_cluster(match_: Value, cluster: &str) -> Value {
    json!({"match": match_, "route": {"cluster": cluster}})
}

/// A route table with one virtual host for every domain.
pub fn routes(routes: Vec<Value>) -> Value {
    json!({"name": "local", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]})
}

/// A bootstrap: one listener whose HTTP connection manager has `route_config`, plus `hcm_extra` fields
/// merged into the connection manager (an object, or `null`).
pub fn bootstrap(route_config: Value, clusters: Vec<Value>, hcm_extra: Value) -> Value {
    let mut hcm = json!({
        "@type": HCM_TYPE,
        "stat_prefix": "ingress",
        "route_config": route_config,
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}],
    });
    if let Value::Object(extra) = hcm_extra {
        for (k, v) in extra {
            hcm[k] = v;
        }
    }
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": LISTENER,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm,
                }]}],
            }],
            "clusters": clusters,
        },
    })
}

/// A running proxy, ready, with the address of its listener.
pub struct Proxy {
    pub remora: Remora,
    pub addr: SocketAddr,
}

impl Proxy {
    /// Starts Remora on `config` (two workers unless `args` says otherwise) and waits until it is ready.
    pub async fn start(config: &Value, args: &[&str]) -> Proxy {
        let text = serde_json::to_string_pretty(config).unwrap_or_else(|e| panic!("config: {e}"));
        let mut all = args.to_vec();
        if !all.contains(&"--concurrency") {
            all.extend(["--concurrency", "2"]);
        }
        let remora = Remora::start(&text, &all).await;
        remora.wait_ready().await;
        let addr = remora.listener_addr(LISTENER).await;
        Proxy { remora, addr }
    }

    pub fn h1(&self) -> HttpClient {
        http1_client(self.addr)
    }

    pub fn h2(&self) -> HttpClient {
        h2c_client(self.addr)
    }

    /// Stat `name`, 0 if the proxy does not have it.
    pub async fn stat(&self, name: &str) -> i64 {
        self.remora.stat_opt(name).await.unwrap_or(0)
    }
}

/// A `127.0.0.1` port with nothing listening on it: bound, then closed.
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    l.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}"))
}

/// One response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Lower-case names, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A plain TCP connection for what a client library will not send (chunked bodies by hand, `expect`,
/// oversize headers). Every read is bounded by the harness timeout.
pub struct RawConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = crate::harness::within(
            crate::harness::DEFAULT_TIMEOUT,
            "a raw connection",
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        // The peer may answer and close before it reads everything (431); a failed write is not the test's
        // concern, the response is.
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads more bytes; false at end of stream.
    async fn fill(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 16384];
        let read = crate::harness::within(crate::harness::DEFAULT_TIMEOUT, "bytes from the proxy", async {
            self.stream.read(&mut chunk).await
        })
        .await;
        match read {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads one response head and its body (content-length, chunked, or until close; none for 1xx, 204,
    /// 304 and `head_only`).
    pub async fn response(&mut self, head_only: bool) -> RawResponse {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if !self.fill().await {
                panic!(
                    "connection closed before a response head: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only || status < 200 || status == 204 || status == 304 {
            return response;
        }
        if response
            .header("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    assert!(self.fill().await, "connection closed inside a chunked body");
                };
                let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                    .unwrap_or_else(|e| panic!("bad chunk size {size_text:?}: {e}"));
                self.buf.drain(..line_end + 2);
                if size == 0 {
                    // Trailers (none expected) end with an empty line.
                    while find(&self.buf, b"\r\n").is_none() {
                        assert!(self.fill().await, "connection closed after the last chunk");
                    }
                    let end = find(&self.buf, b"\r\n").unwrap_or(0);
                    self.buf.drain(..end + 2);
                    return response;
                }
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await, "connection closed inside a chunk");
                }
                response.body.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
            }
        }
        if let Some(len) = response.header("content-length") {
            let len: usize = len
                .parse()
                .unwrap_or_else(|e| panic!("bad content-length {len:?}: {e}"));
            while self.buf.len() < len {
                assert!(self.fill().await, "connection closed inside a body");
            }
            response.body = self.buf.drain(..len).collect();
            return response;
        }
        while self.fill().await {}
        response.body = std::mem::take(&mut self.buf);
        response
    }

    /// The next `n` bytes off the connection (HTTP/2 frames, or what follows a 101's head).
    pub async fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            let have = self.buf.len();
            assert!(self.fill().await, "connection closed after {have} of {n} bytes");
        }
        self.buf.drain(..n).collect()
    }

    /// Whether the peer closed the connection (reads to the end, bounded).
    pub async fn closed(&mut self) -> bool {
        while self.fill().await {}
        true
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
