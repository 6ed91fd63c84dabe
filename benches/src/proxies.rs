//! The arms of a comparison (the proxies, and "direct") and their configurations.
//!
//! Remora and Envoy share the bootstraps in `config/bench/`; nginx and HAProxy get equivalent configs
//! generated here: one worker, keep-alive both sides with no per-connection request limit, no access log, no
//! response buffering, and h2 towards the upstream where the workload calls for it (nginx can only do that for
//! gRPC, so its h2c arm talks HTTP/1.1 to the upstream).
//!
//! TLS workloads: every proxy terminates TLS 1.3 with the run's certificate ([`crate::tls`]) and talks
//! plaintext HTTP/1.1 to the upstream, with session resumption off (no tickets, no session cache) wherever
//! the proxy has a switch for it.

use std::path::{Path, PathBuf};

use crate::tls::TlsFiles;
use crate::workload::Workload;
use crate::Result;

/// Which bootstrap a Remora or Envoy arm runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// One route to one static cluster.
    Plain,
    /// Plus retry budget, outlier detection and route retries.
    Full,
    /// Plus a file access log.
    AccessLog,
}

impl Variant {
    fn suffix(self) -> &'static str {
        match self {
            Variant::Plain => "",
            Variant::Full => "-full",
            Variant::AccessLog => "-accesslog",
        }
    }

    /// The bootstrap template's file name for this variant and workload.
    pub fn bootstrap_file(self, w: &Workload) -> String {
        format!(
            "remora-bench{}{}{}.yaml",
            self.suffix(),
            if w.upstream_h2() { "-h2" } else { "" },
            if w.tls { "-tls" } else { "" }
        )
    }
}

/// What an arm runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No proxy: the load generator talks to the upstream.
    Direct,
    /// `target/release/remora`.
    Remora(Variant),
    /// A `remora` built with `--features stats-off` (stat recording compiled out), plain bootstrap: the
    /// baseline for what stats cost (`benches/stats-cost.sh`).
    RemoraNoStats,
    /// `envoy` from PATH.
    Envoy(Variant),
    /// `nginx` from PATH.
    Nginx,
    /// `haproxy` from PATH.
    Haproxy,
}

/// Every arm name, in report order.
pub const ARM_NAMES: [&str; 10] = [
    "direct",
    "remora",
    "remora-nostats",
    "remora-full",
    "remora-log",
    "envoy",
    "envoy-full",
    "envoy-log",
    "nginx",
    "haproxy",
];

/// The kind behind an arm name.
pub fn kind(name: &str) -> Option<Kind> {
    Some(match name {
        "direct" => Kind::Direct,
        "remora" => Kind::Remora(Variant::Plain),
        "remora-nostats" => Kind::RemoraNoStats,
        "remora-full" => Kind::Remora(Variant::Full),
        "remora-log" => Kind::Remora(Variant::AccessLog),
        "envoy" => Kind::Envoy(Variant::Plain),
        "envoy-full" => Kind::Envoy(Variant::Full),
        "envoy-log" => Kind::Envoy(Variant::AccessLog),
        "nginx" => Kind::Nginx,
        "haproxy" => Kind::Haproxy,
        _ => return None,
    })
}

/// Fills `${NAME}` placeholders; fails on an unknown or unfilled one. Whole-line `#` comments are copied
/// untouched, so they can mention placeholders.
pub fn render(template: &str, vars: &[(&str, String)]) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    for line in template.split_inclusive('\n') {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
        } else {
            render_line(line, vars, &mut out)?;
        }
    }
    Ok(out)
}

fn render_line(line: &str, vars: &[(&str, String)], out: &mut String) -> Result<()> {
    let mut rest = line;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').ok_or("unterminated ${ in template")?;
        let name = &after[..end];
        let value = vars
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
            .ok_or_else(|| format!("template placeholder ${{{name}}} has no value"))?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(())
}

/// Ports and paths a proxy config is rendered with.
#[derive(Clone, Debug)]
pub struct Ports {
    /// The proxy's listener.
    pub listen: u16,
    /// The admin listener (Remora and Envoy).
    pub admin: u16,
    /// bench-upstream.
    pub upstream: u16,
    /// The access log file (the access-log variant).
    pub access_log: PathBuf,
    /// The directory of the TLS workloads' certificate ([`TlsFiles::in_dir`]).
    pub tls_dir: PathBuf,
}

/// A Remora/Envoy bootstrap rendered from `config_dir`.
pub fn bootstrap(config_dir: &Path, variant: Variant, w: &Workload, ports: &Ports) -> Result<String> {
    let path = config_dir.join(variant.bootstrap_file(w));
    let template = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    render(
        &template,
        &[
            ("ADMIN_PORT", ports.admin.to_string()),
            ("LISTEN_PORT", ports.listen.to_string()),
            ("UPSTREAM_PORT", ports.upstream.to_string()),
            ("ACCESS_LOG_PATH", ports.access_log.display().to_string()),
            (
                "TLS_CERT",
                TlsFiles::in_dir(&ports.tls_dir).cert.display().to_string(),
            ),
            (
                "TLS_KEY",
                TlsFiles::in_dir(&ports.tls_dir).key.display().to_string(),
            ),
        ],
    )
    .map_err(|e| format!("{}: {e}", path.display()).into())
}

/// An nginx config: one process (`master_process off`), so the measured pid is the one doing the work.
pub fn nginx_conf(dir: &Path, w: &Workload, ports: &Ports) -> String {
    let d = dir.display();
    // nginx 1.22 (Debian 12): `listen ... http2` without TLS means h2c prior knowledge only.
    let http2 = if w.upstream_h2() { " http2" } else { "" };
    // TLS 1.3 only; no session cache and no tickets, so every handshake is a full one.
    let tls = if w.tls {
        let f = TlsFiles::in_dir(&ports.tls_dir);
        format!(
            "\n        ssl_certificate {};\n        ssl_certificate_key {};\n        ssl_protocols TLSv1.3;\n        \
             ssl_session_cache off;\n        ssl_session_tickets off;",
            f.cert.display(),
            f.key.display()
        )
    } else {
        String::new()
    };
    let ssl = if w.tls { " ssl" } else { "" };
    let pass = if w.grpc {
        "grpc_pass grpc://bench_upstream;".to_owned()
    } else {
        [
            "proxy_pass http://bench_upstream;",
            "proxy_http_version 1.1;",
            "proxy_set_header Connection \"\";",
            "proxy_buffering off;",
            "proxy_request_buffering off;",
            // Stream through 16 KiB buffers, as HAProxy (tune.bufsize) does; the default is one page.
            "proxy_buffer_size 16k;",
            "proxy_buffers 4 16k;",
            "proxy_busy_buffers_size 32k;",
        ]
        .join("\n            ")
    };
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    upstream bench_upstream {{
        server 127.0.0.1:{up};
        keepalive 1024;
        keepalive_requests 1000000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{listen}{ssl}{http2};{tls}
        location / {{
            {pass}
        }}
    }}
}}
"#,
        up = ports.upstream,
        listen = ports.listen,
    )
}

/// A HAProxy config: one thread, connection reuse towards the upstream like Envoy's pool.
pub fn haproxy_conf(w: &Workload, ports: &Ports) -> String {
    let h2 = if w.upstream_h2() { " proto h2" } else { "" };
    // TLS 1.3 only, no tickets, and (tune.ssl.cachesize 0) no session cache: every handshake is a full one.
    let (ssl, cache) = if w.tls {
        (
            format!(
                " ssl crt {} ssl-min-ver TLSv1.3 no-tls-tickets",
                TlsFiles::in_dir(&ports.tls_dir).combined.display()
            ),
            "\n    tune.ssl.cachesize 0",
        )
    } else {
        (String::new(), "")
    };
    format!(
        r#"global
    nbthread 1{cache}
    # HAProxy wants two descriptors per connection and refuses to start if the limit is lower.
    maxconn 4000

defaults
    mode http
    maxconn 4000
    timeout connect 1s
    timeout client 300s
    timeout server 300s
    timeout http-request 300s
    timeout http-keep-alive 300s
    http-reuse always

frontend bench
    bind 127.0.0.1:{listen}{ssl}{h2}
    default_backend bench_upstream

backend bench_upstream
    server upstream 127.0.0.1:{up}{h2}
"#,
        listen = ports.listen,
        up = ports.upstream,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::ALL;

    fn ports() -> Ports {
        Ports {
            listen: 10001,
            admin: 10002,
            upstream: 10003,
            access_log: "/tmp/x/access.log".into(),
            tls_dir: "/tmp/x/tls".into(),
        }
    }

    #[test]
    fn render_fills_and_rejects() {
        let v = [("A", "1".to_owned())];
        assert_eq!(render("x${A}y${A}", &v).unwrap(), "x1y1");
        assert_eq!(
            render("  # ${NAME}\nx: ${A}\n", &v).unwrap(),
            "  # ${NAME}\nx: 1\n"
        );
        assert!(render("${B}", &v).is_err());
        assert!(render("${A", &v).is_err());
    }

    #[test]
    fn every_bootstrap_renders() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/bench");
        for w in &ALL {
            for v in [Variant::Plain, Variant::Full, Variant::AccessLog] {
                let y = bootstrap(&dir, v, w, &ports()).unwrap();
                assert!(!y
                    .lines()
                    .any(|l| !l.trim_start().starts_with('#') && l.contains("${")));
                assert!(y.contains("port_value: 10003"));
                assert_eq!(
                    y.contains("http2_protocol_options"),
                    w.upstream_h2(),
                    "{}",
                    v.bootstrap_file(w)
                );
                assert_eq!(y.contains("retry_budget"), v == Variant::Full);
                assert_eq!(y.contains("/tmp/x/access.log"), v == Variant::AccessLog);
                assert_eq!(y.contains("/tmp/x/tls/cert.pem"), w.tls);
                assert_eq!(y.contains("DownstreamTlsContext"), w.tls);
            }
        }
    }

    #[test]
    fn arm_names_are_known() {
        for n in ARM_NAMES {
            assert!(kind(n).is_some(), "{n}");
        }
        assert!(kind("traefik").is_none());
    }

    /// The generated configs pass the proxies' own checks, where they are installed.
    #[test]
    fn generated_configs_validate() {
        let dir = std::env::temp_dir().join(format!("remora-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ports = ports();
        ports.tls_dir = dir.join("tls");
        TlsFiles::generate(&ports.tls_dir).unwrap();
        for w in &ALL {
            if let Some(nginx) =
                crate::child::on_path("nginx").or_else(|| crate::child::on_path("/usr/sbin/nginx"))
            {
                let conf = dir.join(format!("nginx-{}.conf", w.name));
                std::fs::write(&conf, nginx_conf(&dir, w, &ports)).unwrap();
                let out = std::process::Command::new(nginx)
                    .arg("-t")
                    .arg("-p")
                    .arg(&dir)
                    .arg("-e")
                    .arg(dir.join("error.log"))
                    .arg("-c")
                    .arg(&conf)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}: {}",
                    w.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if let Some(haproxy) =
                crate::child::on_path("haproxy").or_else(|| crate::child::on_path("/usr/sbin/haproxy"))
            {
                let conf = dir.join(format!("haproxy-{}.cfg", w.name));
                std::fs::write(&conf, haproxy_conf(w, &ports)).unwrap();
                let out = std::process::Command::new(haproxy)
                    .arg("-c")
                    .arg("-f")
                    .arg(&conf)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}: {}",
                    w.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn generated_configs() {
        let grpc = ALL.iter().find(|w| w.grpc).unwrap();
        let h1 = &ALL[0];
        let n = nginx_conf(Path::new("/tmp/x"), grpc, &ports());
        assert!(n.contains("listen 127.0.0.1:10001 http2;") && n.contains("grpc_pass"));
        let n = nginx_conf(Path::new("/tmp/x"), h1, &ports());
        assert!(n.contains("listen 127.0.0.1:10001;") && n.contains("proxy_pass"));
        assert!(haproxy_conf(grpc, &ports()).contains("server upstream 127.0.0.1:10003 proto h2"));
        assert!(haproxy_conf(h1, &ports()).contains("server upstream 127.0.0.1:10003\n"));
        let tls = ALL.iter().find(|w| w.tls).unwrap();
        let n = nginx_conf(Path::new("/tmp/x"), tls, &ports());
        assert!(n.contains("listen 127.0.0.1:10001 ssl;") && n.contains("ssl_session_tickets off;"));
        assert!(n.contains("ssl_certificate_key /tmp/x/tls/key.pem;"));
        let h = haproxy_conf(tls, &ports());
        assert!(
            h.contains("bind 127.0.0.1:10001 ssl crt /tmp/x/tls/cert-and-key.pem")
                && h.contains("no-tls-tickets")
        );
        assert!(h.contains("tune.ssl.cachesize 0") && !haproxy_conf(h1, &ports()).contains("ssl"));
    }
}
