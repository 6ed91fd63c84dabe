//! TLS through the real binary: a TLS listener served to curl and openssl, mTLS between two Remora processes
//! with each way it must fail, SNI filter chains on one port, and certificate rotation through an SDS file
//! under load. Certificates are made here with rcgen: a test CA, server and client certificates, an expired
//! one, a wrong-SAN one, and another CA.

// Fixtures and helpers of a test: a failure in them is the test's failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{Remora, TempDir, Upstream, DEFAULT_TIMEOUT};
use crate::support::{routes, to_cluster};

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const DOWNSTREAM: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UPSTREAM: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const TLS_INSPECTOR: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";

/// A CA and what it signs, written as PEM files into a directory.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_key,
        }
    }

    fn ca_path(&self, name: &str) -> String {
        self.dir.join(format!("{name}-ca.pem")).display().to_string()
    }

    /// A leaf signed by this CA, written as `<file>.pem` and `<file>-key.pem`; returns the two paths.
    fn leaf(&self, file: &str, dns: &[&str], uri: Option<&str>, expired: bool) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, file);
        if let Some(u) = uri {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(rcgen::Ia5String::try_from(u).unwrap()));
        }
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    }
}

fn cert(chain: &str, key: &str) -> Value {
    json!({"certificate_chain": {"filename": chain}, "private_key": {"filename": key}})
}

fn hcm(prefix: &str, cluster: &str) -> Value {
    json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": HCM,
        "stat_prefix": prefix,
        "route_config": routes(vec![to_cluster(json!({"prefix": "/"}), cluster)]),
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }})
}

fn downstream_tls(ctx: Value) -> Value {
    let mut t = json!({"@type": DOWNSTREAM});
    for (k, v) in ctx.as_object().unwrap() {
        t[k] = v.clone();
    }
    json!({"name": "envoy.transport_sockets.tls", "typed_config": t})
}

fn listener(name: &str, chains: Vec<Value>, inspector: bool) -> Value {
    let mut l = json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": chains,
    });
    if inspector {
        l["listener_filters"] = json!([{"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": TLS_INSPECTOR}}]);
    }
    l
}

fn bootstrap(listeners: Vec<Value>, clusters: Vec<Value>) -> String {
    serde_json::to_string_pretty(&json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }))
    .unwrap()
}

async fn start(dir: TempDir, config: &str) -> Remora {
    let r = Remora::start_in(dir, config, &["--concurrency", "2"]).await;
    r.wait_ready().await;
    r
}

/// Runs a command (bounded in time) and returns its status, stdout and stderr.
async fn run(cmd: &str, args: &[&str], stdin: &[u8]) -> (bool, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let out = crate::harness::within(Duration::from_secs(20), cmd, child.wait_with_output())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A TLS listener in front of an upstream, reached with curl (HTTP/1.1 and HTTP/2 by ALPN) and openssl.
#[tokio::test]
async fn a_tls_listener_serves_curl_and_openssl_and_follows_alpn() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path(), "test");
    let (c, k) = pki.leaf("server", &["localhost"], None, false);
    let up = Upstream::start("app").await;
    let tls = downstream_tls(json!({"common_tls_context": {
        "tls_certificates": [cert(&c, &k)],
        "alpn_protocols": ["h2", "http/1.1"],
    }}));
    let mut chain = json!({"filters": [hcm("ingress", "app")]});
    chain["transport_socket"] = tls;
    let config = bootstrap(
        vec![listener("tls", vec![chain], false)],
        vec![crate::support::cluster("app", &[up.addr()])],
    );
    let ca = pki.ca_path("test");
    let remora = start(dir, &config).await;
    let addr = remora.listener_addr("tls").await;
    let resolve = format!("localhost:{}:127.0.0.1", addr.port());
    let url = format!("https://localhost:{}/hello", addr.port());

    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (ok, out, err) = run(
            "curl",
            &[
                "-sS",
                "--cacert",
                &ca,
                "--resolve",
                &resolve,
                flag,
                "-w",
                "\n%{http_version} %{http_code}",
                &url,
            ],
            b"",
        )
        .await;
        assert!(ok, "curl {flag}: {err}");
        assert!(out.ends_with(&format!("\n{version} 200")), "curl {flag}: {out}");
        // The upstream sees the request came over TLS.
        assert!(out.contains("\"x-forwarded-proto\":[\"https\"]"), "{out}");
    }

    // openssl: the chain verifies against the CA, and ALPN picks h2 when offered.
    let connect = format!("127.0.0.1:{}", addr.port());
    let (_, out, _) = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &connect,
            "-servername",
            "localhost",
            "-CAfile",
            &ca,
            "-alpn",
            "h2",
        ],
        b"",
    )
    .await;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("ALPN protocol: h2"), "{out}");

    // A plaintext request on the TLS port is a failed handshake, not a response.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        raw.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let _ = crate::harness::within(Duration::from_secs(10), "the close", raw.read_to_end(&mut buf)).await;
        assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"));
    }
    remora
        .wait_stat(
            "listener.127.0.0.1_0.ssl.connection_error",
            |v| v >= 1,
            Duration::from_secs(5),
        )
        .await;
    assert!(remora.stat("listener.127.0.0.1_0.ssl.handshake").await >= 3);
    let stats = remora.admin_get("/stats").await.1;
    assert!(
        stats.contains(
            "listener.127.0.0.1_0.ssl.certificate.unnamed_cert_e3b0c442.expiration_unix_time_seconds"
        ),
        "{stats}"
    );
    remora
        .wait_stat(
            "server.days_until_first_cert_expiring",
            |v| v > 300,
            Duration::from_secs(5),
        )
        .await;
    // As the public dashboards query it.
    let prom = remora.admin_get("/stats/prometheus").await.1;
    let line = prom
        .lines()
        .find(|l| l.starts_with("envoy_listener_ssl_certificate_expiration_unix_time_seconds{"))
        .unwrap_or_else(|| panic!("{prom}"));
    assert!(
        line.contains("envoy_tls_certificate=\"unnamed_cert_e3b0c442\""),
        "{line}"
    );
    assert!(line.contains("envoy_listener_address=\"127.0.0.1_0\""), "{line}");
}

/// A client-side sidecar originating mTLS to a server-side sidecar terminating it, then each refusal.
#[tokio::test]
async fn mtls_between_two_remoras_and_each_refusal_has_its_reason() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path(), "mesh");
    let other = Pki::new(dir.path(), "other");
    let (server_c, server_k) = pki.leaf("server", &["server.mesh.local"], None, false);
    let (client_c, client_k) = pki.leaf("client", &[], Some("spiffe://mesh/ns/default/sa/client"), false);
    let (stranger_c, stranger_k) =
        other.leaf("stranger", &[], Some("spiffe://mesh/ns/default/sa/client"), false);
    let (wrong_san_c, wrong_san_k) = pki.leaf("wrong-san", &["elsewhere.example"], None, false);
    let (expired_c, expired_k) = pki.leaf("expired", &["server.mesh.local"], None, true);
    let up = Upstream::start("payments").await;

    // The server side: mTLS required, client identity checked by URI SAN. One listener per server
    // certificate, so that the client side can be pointed at each.
    let server_listener = |name: &str, c: &str, k: &str| {
        let mut chain = json!({"filters": [hcm(name, "payments")]});
        chain["transport_socket"] = downstream_tls(json!({
            "require_client_certificate": true,
            "common_tls_context": {
                "tls_certificates": [cert(c, k)],
                "validation_context": {
                    "trusted_ca": {"filename": pki.ca_path("mesh")},
                    "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"prefix": "spiffe://mesh/"}}],
                },
            },
        }));
        listener(name, vec![chain], false)
    };
    let server_config = bootstrap(
        vec![
            server_listener("good", &server_c, &server_k),
            server_listener("wrong_san", &wrong_san_c, &wrong_san_k),
            server_listener("expired", &expired_c, &expired_k),
        ],
        vec![crate::support::cluster("payments", &[up.addr()])],
    );
    let server = start(TempDir::new(), &server_config).await;
    let good = server.listener_addr("good").await;
    let wrong_san = server.listener_addr("wrong_san").await;
    let expired = server.listener_addr("expired").await;

    // The client side: a plaintext listener per case, each to a cluster with its own TLS context.
    let client_cluster = |name: &str, to: SocketAddr, ca: &str, cert_pair: Option<(&str, &str)>| {
        let mut common = json!({
            "validation_context": {
                "trusted_ca": {"filename": ca},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "server.mesh.local"}}],
            },
        });
        if let Some((c, k)) = cert_pair {
            common["tls_certificates"] = json!([cert(c, k)]);
        }
        let mut cl = crate::support::cluster(name, &[to]);
        cl["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": UPSTREAM, "sni": "server.mesh.local", "common_tls_context": common,
        }});
        cl
    };
    let mesh_ca = pki.ca_path("mesh");
    let other_ca = other.ca_path("other");
    let me = Some((client_c.as_str(), client_k.as_str()));
    let cases: Vec<(&str, Value)> = vec![
        ("ok", client_cluster("ok", good, &mesh_ca, me)),
        ("wrong_ca", client_cluster("wrong_ca", good, &other_ca, me)),
        ("wrong_san", client_cluster("wrong_san", wrong_san, &mesh_ca, me)),
        ("expired", client_cluster("expired", expired, &mesh_ca, me)),
        (
            "no_client_cert",
            client_cluster("no_client_cert", good, &mesh_ca, None),
        ),
        (
            "untrusted_client",
            client_cluster(
                "untrusted_client",
                good,
                &mesh_ca,
                Some((&stranger_c, &stranger_k)),
            ),
        ),
    ];
    let mut plain = crate::support::cluster("plaintext", &[good]);
    plain["connect_timeout"] = json!("2s");
    let mut clusters: Vec<Value> = cases.iter().map(|(_, c)| c.clone()).collect();
    clusters.push(plain);
    let mut vhost_routes: Vec<Value> = cases
        .iter()
        .map(|(n, _)| to_cluster(json!({"prefix": format!("/{n}/")}), n))
        .collect();
    vhost_routes.push(to_cluster(json!({"prefix": "/plaintext/"}), "plaintext"));
    let client_config = crate::support::bootstrap(routes(vhost_routes), clusters, Value::Null);
    let client = crate::support::Proxy::start(&client_config, &[]).await;

    let r = client.h1().get("/ok/x", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().upstream_name, "payments");
    assert_eq!(client.stat("cluster.ok.ssl.handshake").await, 1);

    // Each refusal: the client side answers 503 with the TLS failure as the transport failure reason, and the
    // side that refused counts why.
    for (path, side_stat) in [
        ("/wrong_ca/x", "cluster.wrong_ca.ssl.fail_verify_error"),
        ("/wrong_san/x", "cluster.wrong_san.ssl.fail_verify_san"),
        ("/expired/x", "cluster.expired.ssl.fail_verify_error"),
    ] {
        let r = client.h1().get(path, &[]).await;
        assert_eq!(r.status, 503, "{path}: {}", r.text());
        assert!(
            r.text().contains("transport failure reason: TLS_error"),
            "{path}: {}",
            r.text()
        );
        assert_eq!(client.stat(side_stat).await, 1, "{side_stat}");
    }
    for (path, server_stat) in [
        (
            "/no_client_cert/x",
            "listener.127.0.0.1_0.ssl.fail_verify_no_cert",
        ),
        (
            "/untrusted_client/x",
            "listener.127.0.0.1_0.ssl.fail_verify_error",
        ),
    ] {
        let r = client.h1().get(path, &[]).await;
        assert!(
            r.status == 503 || r.status == 502,
            "{path}: {} {}",
            r.status,
            r.text()
        );
        server
            .wait_stat(server_stat, |v| v >= 1, Duration::from_secs(5))
            .await;
    }
    // Plaintext to the TLS listener: refused, counted as a TLS connection error there.
    let before = server.stat("listener.127.0.0.1_0.ssl.connection_error").await;
    let r = client.h1().get("/plaintext/x", &[]).await;
    assert!(r.status.as_u16() >= 500, "{}", r.text());
    server
        .wait_stat(
            "listener.127.0.0.1_0.ssl.connection_error",
            |v| v > before,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(up.requests(), 1, "only the good request reached the upstream");
}

/// One port: TLS by SNI to two certificates and two routes, and plaintext HTTP beside them.
#[tokio::test]
async fn sni_chooses_the_filter_chain_and_plaintext_shares_the_port() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path(), "sni");
    let (a_c, a_k) = pki.leaf("a", &["a.test"], None, false);
    let (b_c, b_k) = pki.leaf("b", &["*.b.test"], None, false);
    let (ua, ub, up) = (
        Upstream::start("for-a").await,
        Upstream::start("for-b").await,
        Upstream::start("plain").await,
    );
    let tls_chain = |names: Value, c: &str, k: &str, cluster: &str| {
        let mut ch =
            json!({"filter_chain_match": {"server_names": names}, "filters": [hcm(cluster, cluster)]});
        ch["transport_socket"] =
            downstream_tls(json!({"common_tls_context": {"tls_certificates": [cert(c, k)]}}));
        ch
    };
    let chains = vec![
        tls_chain(json!(["a.test"]), &a_c, &a_k, "a"),
        tls_chain(json!(["*.b.test"]), &b_c, &b_k, "b"),
        json!({"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": [hcm("plain", "plain")]}),
    ];
    let config = bootstrap(
        vec![listener("edge", chains, true)],
        vec![
            crate::support::cluster("a", &[ua.addr()]),
            crate::support::cluster("b", &[ub.addr()]),
            crate::support::cluster("plain", &[up.addr()]),
        ],
    );
    let ca = pki.ca_path("sni");
    let remora = start(dir, &config).await;
    let port = remora.listener_addr("edge").await.port();
    for (host, upstream) in [("a.test", "for-a"), ("x.b.test", "for-b")] {
        let (ok, out, err) = run(
            "curl",
            &[
                "-sS",
                "--cacert",
                &ca,
                "--resolve",
                &format!("{host}:{port}:127.0.0.1"),
                &format!("https://{host}:{port}/"),
            ],
            b"",
        )
        .await;
        assert!(ok, "{host}: {err}");
        assert!(
            out.contains(&format!("\"upstream_name\":\"{upstream}\"")),
            "{host}: {out}"
        );
    }
    let (ok, out, err) = run("curl", &["-sS", &format!("http://127.0.0.1:{port}/")], b"").await;
    assert!(ok, "{err}");
    assert!(out.contains("\"upstream_name\":\"plain\""), "{out}");
    // An SNI no chain names, over TLS: no chain matches (the plaintext chain wants raw_buffer).
    let (ok, _, _) = run(
        "curl",
        &[
            "-sS",
            "-k",
            "--resolve",
            &format!("c.test:{port}:127.0.0.1"),
            &format!("https://c.test:{port}/"),
        ],
        b"",
    )
    .await;
    assert!(!ok);
    assert_eq!(remora.stat("listener.127.0.0.1_0.no_filter_chain_match").await, 1);
}

/// One request on a TLS connection: its status, and the CN of the certificate the connection got.
async fn tls_get(sender: &mut TlsSender) -> Result<(u16, String), String> {
    let req = http::Request::get("/")
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.0.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, sender.1.clone()))
}

/// One request on a new TLS connection.
async fn tls_get_new(addr: SocketAddr, ca: &str) -> Result<(u16, String), String> {
    tls_get(&mut tls_connect(addr, ca).await?).await
}

/// An HTTP/2 sender over TLS, and the CN of the certificate the server presented.
#[derive(Clone)]
struct TlsSender(
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    String,
);

async fn tls_connect(addr: SocketAddr, ca: &str) -> Result<TlsSender, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .ok_or("no certificate")?;
    let subject = cn_of(&leaf);
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(TlsSender(send, subject))
}

/// The certificate's CommonName, found by its OID (2.5.4.3) followed by a string.
fn cn_of(der: &[u8]) -> String {
    let oid = [0x06, 0x03, 0x55, 0x04, 0x03];
    der.windows(oid.len())
        .rposition(|w| w == oid)
        .and_then(|i| {
            let rest = &der[i + oid.len()..];
            let len = *rest.get(1)? as usize;
            rest.get(2..2 + len)
                .map(|b| String::from_utf8_lossy(b).into_owned())
        })
        .unwrap_or_default()
}

/// The certificate comes from an SDS file; a certificate agent replaces it (atomic rename) while clients
/// keep sending: new connections get the new certificate, the established one keeps working, nothing fails.
#[tokio::test]
async fn sds_file_rotation_under_load_fails_no_request() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path(), "rot");
    let (c1, k1) = pki.leaf("first", &["localhost"], None, false);
    let (c2, k2) = pki.leaf("second", &["localhost"], None, false);
    let sds_file = dir.path().join("sds.yaml");
    let secret = |c: &str, k: &str| {
        serde_json::to_string(&json!({"resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": "server_cert",
            "tls_certificate": cert(c, k),
        }]}))
        .unwrap()
    };
    std::fs::write(&sds_file, secret(&c1, &k1)).unwrap();
    let up = Upstream::start("app").await;
    let mut chain = json!({"filters": [hcm("ingress", "app")]});
    chain["transport_socket"] = downstream_tls(json!({"common_tls_context": {
        "tls_certificate_sds_secret_configs": [{"name": "server_cert", "sds_config": {"path_config_source": {"path": sds_file.display().to_string()}}}],
        "alpn_protocols": ["h2"],
    }}));
    let config = bootstrap(
        vec![listener("tls", vec![chain], false)],
        vec![crate::support::cluster("app", &[up.addr()])],
    );
    let ca = pki.ca_path("rot");
    let remora = start(dir, &config).await;
    let addr = remora.listener_addr("tls").await;

    let mut kept = tls_connect(addr, &ca).await.unwrap();
    let (status, subject) = tls_get(&mut kept).await.unwrap();
    assert_eq!((status, subject.as_str()), (200, "first"));

    // Load: a new connection per request on one task, the kept-alive connection on another.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, ca) = (stop.clone(), ca.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed, mut seen_second) = (0u32, Vec::new(), false);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                match tls_get_new(addr, &ca).await {
                    Ok((200, s)) => {
                        ok += 1;
                        seen_second |= s == "second";
                    }
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed, seen_second)
        })
    };
    // Rotate: write the new secret beside and rename it over the watched file.
    let tmp = sds_file.with_extension("tmp");
    std::fs::write(&tmp, secret(&c2, &k2)).unwrap();
    std::fs::rename(&tmp, &sds_file).unwrap();
    // Until a new connection gets the new certificate (the watcher polls every 250 ms).
    let mut rotated = false;
    for _ in 0..100 {
        if tls_get_new(addr, &ca).await.map(|r| r.1) == Ok("second".to_string()) {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "new connections never got the rotated certificate");
    // The connection made before the rotation still works, with the old certificate.
    for _ in 0..5 {
        let (status, subject) = tls_get(&mut kept).await.unwrap();
        assert_eq!((status, subject.as_str()), (200, "first"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, seen_second) = load.await.unwrap();
    assert!(failed.is_empty(), "requests failed during rotation: {failed:?}");
    assert!(
        ok > 0 && seen_second,
        "ok {ok}, saw the new certificate {seen_second}"
    );
    assert_eq!(
        remora
            .admin_get("/stats")
            .await
            .1
            .lines()
            .filter(|l| l.contains("ssl.certificate.server_cert.expiration_unix_time_seconds"))
            .count(),
        1
    );
}

/// `tcp_proxy` to a cluster with an `UpstreamTlsContext`: plaintext bytes in, TLS to the host.
#[tokio::test]
async fn tcp_proxy_originates_tls_to_its_cluster() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path(), "tcp");
    let (c, k) = pki.leaf("server", &["server.tcp.test"], None, false);
    let up = Upstream::start("app").await;
    let mut chain = json!({"filters": [hcm("ingress", "app")]});
    chain["transport_socket"] =
        downstream_tls(json!({"common_tls_context": {"tls_certificates": [cert(&c, &k)]}}));
    let server = start(
        TempDir::new(),
        &bootstrap(
            vec![listener("tls", vec![chain], false)],
            vec![crate::support::cluster("app", &[up.addr()])],
        ),
    )
    .await;
    let tls_addr = server.listener_addr("tls").await;

    let mut cluster = crate::support::cluster("tls_up", &[tls_addr]);
    cluster["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": UPSTREAM, "sni": "server.tcp.test",
        "common_tls_context": {"validation_context": {"trusted_ca": {"filename": pki.ca_path("tcp")}}},
    }});
    let tcp = json!({"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "out", "cluster": "tls_up",
    }}]});
    let client = start(
        dir,
        &bootstrap(vec![listener("plain", vec![tcp], false)], vec![cluster]),
    )
    .await;
    let plain = client.listener_addr("plain").await;
    let r = crate::harness::http1_client(plain).get("/through", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().upstream_name, "app");
    assert_eq!(client.stat("cluster.tls_up.ssl.handshake").await, 1);
}

/// `transport_socket_connect_timeout`: a client that connects and never finishes its handshake is closed once
/// the chain's timeout passes, and counted.
#[tokio::test]
async fn a_stalled_handshake_is_closed_at_transport_socket_connect_timeout() {
    use tokio::io::AsyncReadExt;
    let dir = TempDir::new();
    let pki = Pki::new(dir.path(), "slow");
    let (c, k) = pki.leaf("server", &["localhost"], None, false);
    let up = Upstream::start("app").await;
    let mut chain = json!({"filters": [hcm("ingress", "app")], "transport_socket_connect_timeout": "0.3s"});
    chain["transport_socket"] =
        downstream_tls(json!({"common_tls_context": {"tls_certificates": [cert(&c, &k)]}}));
    let config = bootstrap(
        vec![listener("tls", vec![chain], false)],
        vec![crate::support::cluster("app", &[up.addr()])],
    );
    let remora = start(dir, &config).await;
    let addr = remora.listener_addr("tls").await;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    // Well under the 15 s default bound: only the configured 0.3 s can close it in time.
    let n = crate::harness::within(Duration::from_secs(5), "the close", silent.read(&mut buf)).await;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // The close may reach the client before the counter is read: wait for it.
    remora
        .wait_stat(
            "listener.127.0.0.1_0.downstream_cx_transport_socket_connect_timeout",
            |v| v == 1,
            DEFAULT_TIMEOUT,
        )
        .await;
}
