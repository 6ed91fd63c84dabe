//! Lowering `envoy.transport_sockets.tls`: `DownstreamTlsContext` (a filter chain's `transport_socket`),
//! `UpstreamTlsContext` (a cluster's), their `CommonTlsContext`, and SDS secrets from files.

use super::node::{Errors, Node};
use crate::tls::{self, sds, Ca, Identity, Params, SanMatcher, SanType, Source};
use std::path::Path;
use std::sync::Arc;

pub const DOWNSTREAM: &str = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
pub const UPSTREAM: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const SECRET_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const RAW_BUFFER: &str = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

/// A `transport_socket` (`envoy.config.core.v3.TransportSocket`): `None` for raw buffer (plaintext), else the
/// TLS context message of the expected type.
pub fn transport_socket<'a>(ts: &'a Node, expected: &str) -> Option<Node<'a>> {
    ts.mark("name");
    let Some(t) = ts.any("typed_config") else {
        let name = ts.string("name").unwrap_or_default();
        if name == "envoy.transport_sockets.raw_buffer" || name == "raw_buffer" {
            return None;
        }
        ts.err("typed_config", "a transport socket needs its typed_config");
        return None;
    };
    let ty = t.type_name();
    if ty == RAW_BUFFER {
        t.mark_all();
        return None;
    }
    if ty != expected {
        t.err_here(format!(
            "transport socket {ty} is not supported by Remora here (expected {expected})"
        ));
        t.mark_all();
        return None;
    }
    Some(t)
}

/// `DownstreamTlsContext`.
pub fn lower_downstream(d: &Node) -> Option<tls::ServerSpec> {
    let require_client_certificate = d.wrapped_bool("require_client_certificate").unwrap_or(false);
    d.unsupported("require_sni");
    d.unsupported("session_ticket_keys");
    d.unsupported("session_ticket_keys_sds_secret_config");
    // Stateless resumption (session tickets sealed with a ticket key) is never on in Remora: disabling it
    // changes nothing. Stateful resumption (rustls's in-memory session cache, whose TLS 1.3 tickets name a cache
    // entry) is on by default, as in Envoy, and `disable_stateful_session_resumption` turns it off.
    if d.bool("disable_stateless_session_resumption") {
        d.mark("disable_stateless_session_resumption");
    }
    let disable_stateful_session_resumption = d.bool("disable_stateful_session_resumption");
    d.unsupported("session_timeout");
    d.unsupported("ocsp_staple_policy");
    d.unsupported("full_scan_certs_on_sni_mismatch");
    d.unsupported("prefer_client_ciphers");
    let Some(common) = d.msg("common_tls_context") else {
        d.err(
            "common_tls_context",
            "a listener's TLS context needs its certificates",
        );
        return None;
    };
    let c = lower_common(&common, true)?;
    if c.certs.is_empty() {
        common.err_here(
            "a listener's TLS context needs tls_certificates or tls_certificate_sds_secret_configs",
        );
        return None;
    }
    if require_client_certificate && c.ca.is_none() {
        d.err(
            "require_client_certificate",
            "needs a validation_context with trusted_ca to verify client certificates against",
        );
        return None;
    }
    Some(tls::ServerSpec {
        certs: c.certs,
        ca: c.ca,
        san: c.san,
        require_client_certificate,
        disable_stateful_session_resumption,
        alpn: c.alpn,
        params: c.params,
    })
}

/// `UpstreamTlsContext`, with `auto_sni` and `auto_san_validation` from the cluster's
/// `upstream_http_protocol_options`.
pub fn lower_upstream(u: &Node, auto_sni: bool, auto_san_validation: bool) -> Option<tls::ClientSpec> {
    let sni = u.string("sni").filter(|s| !s.is_empty());
    u.unsupported("allow_renegotiation");
    u.unsupported("max_session_keys");
    u.unsupported("enforce_rsa_key_usage");
    let c = match u.msg("common_tls_context") {
        Some(common) => lower_common(&common, false)?,
        None => Common {
            params: client_params(None)?,
            ..Default::default()
        },
    };
    if c.certs.len() > 1 {
        u.err(
            "common_tls_context.tls_certificates",
            "an upstream context takes one client certificate",
        );
    }
    Some(tls::ClientSpec {
        sni,
        auto_sni,
        auto_san_validation,
        ca: c.ca,
        san: c.san,
        cert: c.certs.into_iter().next(),
        alpn: c.alpn,
        params: c.params,
    })
}

#[derive(Default)]
struct Common {
    certs: Vec<Source<Identity>>,
    ca: Option<Source<Ca>>,
    san: Vec<SanMatcher>,
    alpn: Vec<Vec<u8>>,
    params: Params,
}

fn lower_common(c: &Node, server: bool) -> Option<Common> {
    let params = match c.msg("tls_params") {
        Some(p) if server => server_params(&p)?,
        Some(p) => client_params(Some(&p))?,
        None if server => Params::default(),
        None => client_params(None)?,
    };
    let mut certs = Vec::new();
    for (i, t) in c.list("tls_certificates").iter().enumerate() {
        let name = if i == 0 {
            tls::unnamed("cert")
        } else {
            format!("{}_{i}", tls::unnamed("cert"))
        };
        if let Some(id) = lower_tls_certificate(t, name) {
            certs.push(Source::Static(Arc::new(id)));
        }
    }
    for s in c.list("tls_certificate_sds_secret_configs") {
        if let Some(secret) = lower_sds_secret(&s) {
            if secret.identity().is_none() {
                s.err(
                    "name",
                    format!("SDS secret {:?} is not a tls_certificate", secret.name),
                );
            } else {
                certs.push(Source::Sds(secret));
            }
        }
    }
    c.unsupported("tls_certificate_provider_instance");
    c.unsupported("tls_certificate_certificate_provider");
    c.unsupported("tls_certificate_certificate_provider_instance");
    c.unsupported("custom_tls_certificate_selector");
    c.unsupported("validation_context_certificate_provider");
    c.unsupported("validation_context_certificate_provider_instance");
    c.unsupported("custom_handshaker");
    c.unsupported("key_log");
    let mut ca = None;
    let mut san = Vec::new();
    let mut ca_given = false;
    let mut validation = |v: &Node| {
        let (a, s, given) = lower_validation_context(v);
        if a.is_some() {
            ca = a;
        }
        ca_given |= given;
        san.extend(s);
    };
    let sds_ca = |s: &Node| -> Option<Source<Ca>> {
        let secret = lower_sds_secret(s)?;
        if secret.ca().is_none() {
            s.err(
                "name",
                format!("SDS secret {:?} is not a validation_context", secret.name),
            );
            return None;
        }
        Some(Source::Sds(secret))
    };
    if let Some(v) = c.msg("validation_context") {
        validation(&v);
    }
    let mut sds = None;
    if let Some(s) = c.msg("validation_context_sds_secret_config") {
        sds = sds_ca(&s);
    }
    if let Some(cv) = c.msg("combined_validation_context") {
        if let Some(v) = cv.msg("default_validation_context") {
            validation(&v);
        }
        if let Some(s) = cv.msg("validation_context_sds_secret_config") {
            sds = sds_ca(&s);
        }
        cv.unsupported("validation_context_certificate_provider");
        cv.unsupported("validation_context_certificate_provider_instance");
    }
    if sds.is_some() {
        ca = sds;
        ca_given = true;
    }
    if !ca_given && !san.is_empty() {
        c.err_here("match_typed_subject_alt_names needs trusted_ca to verify the chain first");
    }
    let alpn = c
        .strings("alpn_protocols")
        .into_iter()
        .map(String::into_bytes)
        .collect();
    if !c.errors().is_empty() {
        return None;
    }
    Some(Common {
        certs,
        ca,
        san,
        alpn,
        params,
    })
}

/// `DataSource`: inline or a file (read now).
pub(crate) fn data_source(d: &Node) -> Option<Vec<u8>> {
    if let Some(s) = d.string("inline_string") {
        return Some(s.into_bytes());
    }
    if let Some(b) = d.bytes("inline_bytes") {
        return Some(b);
    }
    if let Some(f) = d.string("filename") {
        return match std::fs::read(&f) {
            Ok(b) => Some(b),
            Err(e) => {
                d.err("filename", format!("cannot read {f}: {e}"));
                None
            }
        };
    }
    if let Some(var) = d.string("environment_variable") {
        return match std::env::var(&var) {
            Ok(v) => Some(v.into_bytes()),
            Err(_) => {
                d.err("environment_variable", format!("{var} is not set"));
                None
            }
        };
    }
    d.err_here("needs filename, inline_string, inline_bytes or environment_variable");
    None
}

fn lower_tls_certificate(t: &Node, name: String) -> Option<Identity> {
    t.unsupported("password");
    t.unsupported("pkcs12");
    t.unsupported("watched_directory");
    t.unsupported("private_key_provider");
    t.unsupported("ocsp_staple");
    t.unsupported("signed_certificate_timestamp");
    let Some(chain) = t.msg("certificate_chain") else {
        t.err("certificate_chain", "is required");
        return None;
    };
    let Some(key) = t.msg("private_key") else {
        t.err("private_key", "is required");
        return None;
    };
    let (chain, key) = (data_source(&chain), data_source(&key));
    let (chain, key) = (chain?, key?);
    match tls::parse_identity(&chain, &key, name) {
        Ok(id) => Some(id),
        Err(e) => {
            t.err_here(e);
            None
        }
    }
}

/// The CA (when it loads), the SAN matchers, and whether `trusted_ca` was given at all.
fn lower_validation_context(v: &Node) -> (Option<Source<Ca>>, Vec<SanMatcher>, bool) {
    let has_ca = v.has("trusted_ca");
    let ca = v.msg("trusted_ca").and_then(|d| {
        let pem = data_source(&d)?;
        match tls::parse_ca(&pem, tls::unnamed("ca_cert")) {
            Ok(ca) => Some(Source::Static(Arc::new(ca))),
            Err(e) => {
                d.err_here(e);
                None
            }
        }
    });
    let mut san = Vec::new();
    for m in v.list("match_typed_subject_alt_names") {
        let san_type = match m.enum_name("san_type").as_str() {
            "DNS" => SanType::Dns,
            "EMAIL" => SanType::Email,
            "URI" => SanType::Uri,
            "IP_ADDRESS" => SanType::Ip,
            other => {
                m.err("san_type", format!("{other} is not supported by Remora"));
                continue;
            }
        };
        m.unsupported("oid");
        let Some(sm) = m.msg("matcher") else {
            m.err("matcher", "is required");
            continue;
        };
        if let Some(matcher) = super::route::string_matcher(&sm) {
            san.push(SanMatcher { san_type, matcher });
        }
    }
    // The deprecated form matches any kind of name.
    for sm in v.list("match_subject_alt_names") {
        if let Some(matcher) = super::route::string_matcher(&sm) {
            for san_type in [SanType::Dns, SanType::Email, SanType::Uri, SanType::Ip] {
                san.push(SanMatcher {
                    san_type,
                    matcher: matcher.clone(),
                });
            }
        }
    }
    match v.enum_name("trust_chain_verification").as_str() {
        "VERIFY_TRUST_CHAIN" => {}
        other => v.err(
            "trust_chain_verification",
            format!("{other} is not supported by Remora"),
        ),
    }
    for f in [
        "verify_certificate_spki",
        "verify_certificate_hash",
        "crl",
        "allow_expired_certificate",
        "custom_validator_config",
        "only_verify_leaf_cert_crl",
        "max_verify_depth",
        "watched_directory",
        "system_root_certs",
        "ca_certificate_provider_instance",
    ] {
        v.unsupported(f);
    }
    (ca, san, has_ca)
}

fn version(p: &Node, field: &str) -> Option<u8> {
    match p.enum_name(field).as_str() {
        "TLS_AUTO" => Some(0),
        "TLSv1_2" => Some(2),
        "TLSv1_3" => Some(3),
        other => {
            p.err(
                field,
                format!("{other} is not supported by Remora (rustls speaks TLS 1.2 and 1.3)"),
            );
            None
        }
    }
}

/// Envoy's defaults: servers TLS 1.0 (here 1.2, the oldest rustls speaks) to 1.3.
fn server_params(p: &Node) -> Option<Params> {
    let min = version(p, "tls_minimum_protocol_version")?;
    let max = version(p, "tls_maximum_protocol_version")?;
    params(p, if min == 0 { 2 } else { min }, if max == 0 { 3 } else { max })
}

/// Envoy's defaults: clients TLS 1.2 to 1.2.
fn client_params(p: Option<&Node>) -> Option<Params> {
    let Some(p) = p else {
        return Some(Params {
            versions: vec![&rustls::version::TLS12],
            ..Default::default()
        });
    };
    let min = version(p, "tls_minimum_protocol_version")?;
    let max = version(p, "tls_maximum_protocol_version")?;
    params(p, if min == 0 { 2 } else { min }, if max == 0 { 2 } else { max })
}

fn params(p: &Node, min: u8, max: u8) -> Option<Params> {
    if min > max {
        p.err_here("tls_minimum_protocol_version is above tls_maximum_protocol_version");
        return None;
    }
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
    if min <= 2 {
        versions.push(&rustls::version::TLS12);
    }
    if max >= 3 {
        versions.push(&rustls::version::TLS13);
    }
    let mut cipher_suites = Vec::new();
    for name in p.strings("cipher_suites") {
        match tls::cipher_suite(&name) {
            Some(s) => cipher_suites.push(s),
            None => p.err(
                "cipher_suites",
                format!("{name:?} is not a cipher suite Remora (rustls) supports"),
            ),
        }
    }
    let mut kx_groups = Vec::new();
    for name in p.strings("ecdh_curves") {
        match tls::kx_group(&name) {
            Some(g) => kx_groups.push(g),
            None => p.err(
                "ecdh_curves",
                format!("{name:?} is not a curve Remora (rustls) supports"),
            ),
        }
    }
    p.unsupported("signature_algorithms");
    p.unsupported("compliance_policies");
    Some(Params {
        versions,
        cipher_suites,
        kx_groups,
    })
}

/// `SdsSecretConfig` with a file config source: the secret, read now and watched.
fn lower_sds_secret(s: &Node) -> Option<Arc<sds::Secret>> {
    let name = s.string("name").unwrap_or_default();
    if name.is_empty() {
        s.err("name", "is required");
        return None;
    }
    let Some(src) = s.msg("sds_config") else {
        s.err(
            "sds_config",
            "Remora reads SDS secrets from files: needs sds_config with path_config_source",
        );
        return None;
    };
    let (path, dir) = if let Some(p) = src.msg("path_config_source") {
        let path = p.string("path").unwrap_or_default();
        let dir = p.msg("watched_directory").and_then(|w| w.string("path"));
        (path, dir)
    } else if let Some(path) = src.string("path") {
        (path, None)
    } else {
        src.mark_all();
        s.err(
            "sds_config",
            "SDS over an API (ads, api_config_source) is not supported by Remora yet; use path_config_source",
        );
        return None;
    };
    src.mark("resource_api_version");
    src.unsupported("initial_fetch_timeout");
    src.unsupported("authorities");
    if path.is_empty() {
        s.err("sds_config.path_config_source.path", "is required");
        return None;
    }
    match sds::secret(
        Path::new(&path),
        dir.as_deref().map(Path::new),
        &name,
        read_secret,
    ) {
        Ok(secret) => Some(secret),
        Err(e) => {
            s.err("sds_config", e);
            None
        }
    }
}

/// Reads the secret `name` from an SDS file's text (a `DiscoveryResponse` of `Secret`s).
fn read_secret(text: &str, path: &Path, name: &str) -> Result<sds::Value, String> {
    use super::descriptors;
    use super::load::{self, Format};
    let what = path.display().to_string();
    let desc = descriptors::message("envoy.service.discovery.v3.DiscoveryResponse")
        .ok_or("the DiscoveryResponse descriptor is missing")?;
    let msg = load::message_from_text(text, Format::detect(Some(&what), text), &desc)
        .map_err(|e| e.with_source(&what).to_string())?;
    let resources =
        crate::xds::decode_resources(&msg, SECRET_TYPE_URL).map_err(|e| e.with_source(&what).to_string())?;
    let Some(r) = resources.into_iter().find(|r| r.name == name) else {
        return Err(format!("{what} has no secret named {name:?}"));
    };
    let message = r
        .message()
        .map_err(|e| format!("{what}: secret {name:?}: {}", e.message))?;
    let errs = Errors::default();
    let value = {
        let s = Node::root(&message, format!("{what}: secret {name:?}"), &errs);
        s.mark("name");
        let value = if let Some(t) = s.msg("tls_certificate") {
            lower_tls_certificate(&t, name.to_string()).map(|i| sds::Value::Identity(Arc::new(i)))
        } else if let Some(v) = s.msg("validation_context") {
            let (ca, san, _) = lower_validation_context(&v);
            match ca {
                Some(Source::Static(ca)) => Some(sds::Value::Ca(Arc::new(Ca {
                    roots: ca.roots.clone(),
                    not_after: ca.not_after,
                    name: name.to_string(),
                    san,
                }))),
                _ => {
                    v.err("trusted_ca", "is required");
                    None
                }
            }
        } else {
            s.mark_all();
            s.err_here("Remora reads tls_certificate and validation_context secrets");
            None
        };
        value
    };
    let errors = errs.take();
    match value {
        Some(v) if errors.is_empty() => Ok(v),
        _ => Err(errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")),
    }
}
