//! What Remora reads from an X.509 certificate beyond what rustls verifies: its expiry (for
//! `server.days_until_first_cert_expiring` and the `ssl.certificate.<name>.expiration_unix_time_seconds` gauges)
//! and its subject alternative names (for `match_typed_subject_alt_names` and for choosing a certificate by SNI).
//!
//! A small DER walker over the fields involved, no more: rustls has already parsed and verified the certificate
//! when these are read, so a certificate this cannot read is reported as having no names and no expiry.

use std::net::IpAddr;

/// The parts of a certificate Remora uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertInfo {
    /// `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
    pub dns: Vec<String>,
    pub uri: Vec<String>,
    pub email: Vec<String>,
    pub ip: Vec<IpAddr>,
}

/// One DER element: its tag, its contents, and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The elements of a constructed value, in order.
fn children(mut input: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, value, rest) = tlv(input)?;
        input = rest;
        Some((tag, value))
    })
}

const SEQUENCE: u8 = 0x30;
/// 2.5.29.17, subjectAltName.
const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];

/// Reads a certificate's expiry and subject alternative names; `None` if it is not a certificate.
pub fn cert_info(der: &[u8]) -> Option<CertInfo> {
    let (tag, cert, _) = tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut fields = children(tbs).peekable();
    // [0] EXPLICIT version, when present.
    if fields.peek().is_some_and(|(t, _)| *t == 0xa0) {
        fields.next();
    }
    let _serial = fields.next()?;
    let _signature = fields.next()?;
    let _issuer = fields.next()?;
    let (tag, validity) = fields.next()?;
    if tag != SEQUENCE {
        return None;
    }
    let mut times = children(validity);
    let _not_before = times.next()?;
    let (time_tag, not_after) = times.next()?;
    let mut info = CertInfo {
        not_after: parse_time(time_tag, not_after)?,
        ..Default::default()
    };
    for (tag, value) in fields {
        // [3] EXPLICIT extensions.
        if tag != 0xa3 {
            continue;
        }
        let (_, exts, _) = tlv(value)?;
        for (_, ext) in children(exts) {
            let mut parts = children(ext);
            let Some((0x06, oid)) = parts.next() else { continue };
            if oid != SAN_OID {
                continue;
            }
            // critical BOOLEAN DEFAULT FALSE, then the OCTET STRING.
            let Some(octets) = parts.find(|(t, _)| *t == 0x04).map(|(_, v)| v) else {
                continue;
            };
            let Some((SEQUENCE, names, _)) = tlv(octets) else {
                continue;
            };
            for (tag, name) in children(names) {
                let text = || String::from_utf8_lossy(name).into_owned();
                match tag {
                    0x81 => info.email.push(text()),
                    0x82 => info.dns.push(text()),
                    0x86 => info.uri.push(text()),
                    0x87 => match name.len() {
                        4 => info.ip.push(IpAddr::from(<[u8; 4]>::try_from(name).ok()?)),
                        16 => info.ip.push(IpAddr::from(<[u8; 16]>::try_from(name).ok()?)),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
    }
    Some(info)
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as Unix seconds.
fn parse_time(tag: u8, v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let digits = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy = digits(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        0x18 if s.len() == 14 => (digits(0..4)?, 4),
        _ => return None,
    };
    let month = digits(rest..rest + 2)?;
    let day = digits(rest + 2..rest + 4)?;
    let (h, m, sec) = (
        digits(rest + 4..rest + 6)?,
        digits(rest + 6..rest + 8)?,
        digits(rest + 8..rest + 10)?,
    );
    Some(days_from_civil(year, month, day) * 86400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Whether a certificate's DNS name (possibly a `*.` wildcard for one label) covers `host`.
pub fn dns_name_matches(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (pattern.trim_end_matches('.'), host.trim_end_matches('.'));
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert_to_unix_seconds() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11017);
        assert_eq!(parse_time(0x17, b"491231235959Z"), Some(2524607999));
        assert_eq!(parse_time(0x17, b"500101000000Z"), Some(-631152000));
        assert_eq!(parse_time(0x18, b"20261128000000Z"), Some(1795824000));
        assert_eq!(parse_time(0x18, b"2026112800000Z"), None);
    }

    #[test]
    fn certificates_made_by_rcgen_read_back() {
        let mut params =
            rcgen::CertificateParams::new(vec!["svc.example.com".to_string(), "*.mesh.local".to_string()])
                .unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::Ia5String::try_from("spiffe://mesh/ns/default/sa/web").unwrap(),
        ));
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.not_after = rcgen::date_time_ymd(2031, 6, 15);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let info = cert_info(cert.der()).unwrap();
        assert_eq!(info.dns, vec!["svc.example.com", "*.mesh.local"]);
        assert_eq!(info.uri, vec!["spiffe://mesh/ns/default/sa/web"]);
        assert_eq!(info.ip, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(info.not_after, days_from_civil(2031, 6, 15) * 86400);
        assert!(cert_info(b"not a certificate").is_none());
    }

    #[test]
    fn wildcards_cover_one_label() {
        assert!(dns_name_matches("*.mesh.local", "a.mesh.local"));
        assert!(!dns_name_matches("*.mesh.local", "a.b.mesh.local"));
        assert!(!dns_name_matches("*.mesh.local", "mesh.local"));
        assert!(dns_name_matches("Svc.Example.com", "svc.example.com."));
    }
}
