//! `envoy.filters.listener.tls_inspector`: whether a new connection starts with a TLS ClientHello, and if so
//! its SNI and ALPN, read with `MSG_PEEK` so that the bytes stay for whoever serves the connection (a TLS
//! termination, or a TCP proxy passing TLS through by SNI).

use std::io;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// What the inspector found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    /// `"tls"` or `"raw_buffer"`, Envoy's transport protocol names.
    pub tls: bool,
    pub sni: Option<String>,
    pub alpn: Vec<String>,
}

/// The largest ClientHello record looked at (TLS's record limit).
const MAX: usize = 16384 + 5;

/// Peeks at the connection until its first record is complete (or shows it is not TLS). Bounded by the
/// caller's timeout.
pub async fn inspect(stream: &TcpStream) -> io::Result<Hello> {
    let mut buf = vec![0u8; MAX];
    let mut seen = 0usize;
    loop {
        stream.readable().await?;
        let n = stream.try_io(Interest::READABLE, || {
            use std::os::fd::AsRawFd;
            // SAFETY: `buf` is valid for `buf.len()` bytes and the fd is this stream's open socket.
            let n = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            // Nothing new since the last look: clear readiness and wait for more bytes.
            if n == seen && n != 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match n {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            // The peer closed before sending anything: not TLS.
            return Ok(Hello::default());
        }
        seen = n;
        match parse(&buf[..n]) {
            Parse::NeedMore if n < MAX => continue,
            Parse::NeedMore | Parse::NotTls => return Ok(Hello::default()),
            Parse::Tls(h) => return Ok(h),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Parse {
    NeedMore,
    NotTls,
    Tls(Hello),
}

/// A cursor over bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn parse(data: &[u8]) -> Parse {
    // Record header: handshake (22), a 3.x version, a length.
    if data.is_empty() {
        return Parse::NeedMore;
    }
    if data[0] != 0x16 {
        return Parse::NotTls;
    }
    if data.len() < 5 {
        return Parse::NeedMore;
    }
    if data[1] != 3 {
        return Parse::NotTls;
    }
    let len = usize::from(u16::from_be_bytes([data[3], data[4]]));
    if data.len() < 5 + len {
        return Parse::NeedMore;
    }
    let mut hello = Hello {
        tls: true,
        ..Default::default()
    };
    // A ClientHello that does not parse (or spans records) is still TLS, with no SNI or ALPN seen.
    let _ = client_hello(&data[5..5 + len], &mut hello);
    Parse::Tls(hello)
}

fn client_hello(record: &[u8], hello: &mut Hello) -> Option<()> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None;
    }
    let body_len = r
        .take(3)
        .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))?;
    let mut r = Reader(r.take(body_len)?);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let mut data = Reader(exts.vec16()?);
        match ty {
            0 => {
                let mut list = Reader(data.vec16()?);
                while !list.0.is_empty() {
                    let kind = list.u8()?;
                    let name = list.vec16()?;
                    if kind == 0 {
                        hello.sni = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let mut list = Reader(data.vec16()?);
                while !list.0.is_empty() {
                    hello
                        .alpn
                        .push(String::from_utf8_lossy(list.vec8()?).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, as rustls writes it.
    fn client_hello_bytes(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), sni.to_string().try_into().unwrap()).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    use std::sync::Arc;

    #[test]
    fn reads_sni_and_alpn_from_a_real_client_hello() {
        let bytes = client_hello_bytes("api.example.com", &[b"h2", b"http/1.1"]);
        let Parse::Tls(h) = parse(&bytes) else {
            panic!("not parsed")
        };
        assert_eq!(h.sni.as_deref(), Some("api.example.com"));
        assert_eq!(h.alpn, vec!["h2", "http/1.1"]);
        // Cut short: wait for more.
        assert_eq!(parse(&bytes[..bytes.len() - 1]), Parse::NeedMore);
        assert_eq!(parse(&bytes[..3]), Parse::NeedMore);
    }

    #[test]
    fn plaintext_is_not_tls() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parse::NotTls);
        assert_eq!(parse(b"\x16\x01\x00\x00\x05"), Parse::NotTls);
    }
}
