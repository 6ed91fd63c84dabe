//! TLS with rustls: the listener side (`DownstreamTlsContext` on a filter chain's `transport_socket`) and the
//! cluster side (`UpstreamTlsContext` on a cluster's `transport_socket`).
//!
//! A context keeps its rustls configuration in an [`ArcSwap`]: a handshake takes the current one, and an SDS
//! rotation ([`sds`]) builds a new one and swaps it in, so new connections get the new certificate while
//! established connections keep theirs. Certificates come inline, from files, or from SDS secrets in files
//! (`sds_config.path_config_source`, watched for changes).
//!
//! Verification follows Envoy: without a `validation_context` a peer's certificate is not verified (a
//! listener does not even ask for one); with `trusted_ca` the chain must lead to it, and
//! `match_typed_subject_alt_names` then decides on the names (any one matcher matching one name). Upstream,
//! `auto_san_validation` checks the certificate against the SNI sent. Failures count under Envoy's names
//! (`ssl.fail_verify_error`, `ssl.fail_verify_san`, `ssl.fail_verify_no_cert`, `ssl.connection_error`).

pub mod der;
pub mod inspector;
pub mod sds;

use crate::route::matcher::StringMatcher;
use crate::stats::{Counter, Gauge, Scope};
use arc_swap::ArcSwap;
use der::CertInfo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::sync::{Arc, Mutex, Weak};

/// A certificate chain with its key, and what Remora reads from its leaf.
#[derive(Debug)]
pub struct Identity {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
    /// The name its expiry gauge goes under: the SDS secret's name, or `unnamed_cert_<hash>` as Envoy names
    /// certificates given inline or by file.
    pub name: String,
}

/// Trusted CAs.
#[derive(Debug)]
pub struct Ca {
    pub roots: Arc<RootCertStore>,
    /// The earliest expiry among them.
    pub not_after: Option<i64>,
    pub name: String,
    /// An SDS validation context's own `match_typed_subject_alt_names`, checked after the context's (Envoy
    /// merges the two validation contexts, the repeated matchers appended).
    pub san: Vec<SanMatcher>,
}

/// PEM text from a `DataSource`, as lowering read it.
pub fn parse_identity(chain_pem: &[u8], key_pem: &[u8], name: String) -> Result<Identity, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate_chain: not PEM certificates: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err("certificate_chain: holds no certificate".into());
    };
    let info = der::cert_info(leaf).ok_or("certificate_chain: the first certificate cannot be read")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("private_key: not a PEM private key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("private_key: {e}"))?;
    let key = CertifiedKey::new(chain, signing);
    // A key for another certificate is refused; a certificate webpki cannot parse (an X.509 v1 one, as some
    // examples ship) is still served, as OpenSSL would.
    if let Err(e @ rustls::Error::InconsistentKeys(_)) = key.keys_match() {
        return Err(format!("private_key: does not belong to the certificate ({e})"));
    }
    Ok(Identity {
        key: Arc::new(key),
        info,
        name,
    })
}

pub fn parse_ca(pem: &[u8], name: String) -> Result<Ca, String> {
    let mut roots = RootCertStore::empty();
    let mut not_after: Option<i64> = None;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("trusted_ca: not PEM certificates: {e}"))?;
        if let Some(info) = der::cert_info(&cert) {
            not_after = Some(not_after.map_or(info.not_after, |n| n.min(info.not_after)));
        }
        roots.add(cert).map_err(|e| format!("trusted_ca: {e}"))?;
    }
    if roots.is_empty() {
        return Err("trusted_ca: holds no certificate".into());
    }
    Ok(Ca {
        roots: Arc::new(roots),
        not_after,
        name,
        san: Vec::new(),
    })
}

/// The name Envoy gives a certificate that is not an SDS secret (the first 8 hex digits of a SHA-256 over its
/// empty secret name).
pub fn unnamed(kind: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, b"");
    let hex: String = digest.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("unnamed_{kind}_{hex}")
}

/// Where a certificate or a CA comes from.
#[derive(Debug)]
pub enum Source<T> {
    Static(Arc<T>),
    Sds(Arc<sds::Secret>),
}

impl<T> Clone for Source<T> {
    fn clone(&self) -> Self {
        match self {
            Source::Static(t) => Source::Static(t.clone()),
            Source::Sds(s) => Source::Sds(s.clone()),
        }
    }
}

impl Source<Identity> {
    fn current(&self) -> Option<Arc<Identity>> {
        match self {
            Source::Static(i) => Some(i.clone()),
            Source::Sds(s) => s.identity(),
        }
    }
}

impl Source<Ca> {
    fn current(&self) -> Option<Arc<Ca>> {
        match self {
            Source::Static(c) => Some(c.clone()),
            Source::Sds(s) => s.ca(),
        }
    }
}

/// `match_typed_subject_alt_names[i].san_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SanType {
    Dns,
    Email,
    Uri,
    Ip,
}

/// One `SubjectAltNameMatcher`.
#[derive(Clone, Debug)]
pub struct SanMatcher {
    pub san_type: SanType,
    pub matcher: StringMatcher,
}

/// Whether any matcher matches any of the certificate's names (true when there are no matchers).
pub fn san_matches(info: &CertInfo, matchers: &[SanMatcher]) -> bool {
    if matchers.is_empty() {
        return true;
    }
    matchers.iter().any(|m| match m.san_type {
        SanType::Dns => info.dns.iter().any(|n| m.matcher.matches(n)),
        SanType::Email => info.email.iter().any(|n| m.matcher.matches(n)),
        SanType::Uri => info.uri.iter().any(|n| m.matcher.matches(n)),
        SanType::Ip => info.ip.iter().any(|ip| m.matcher.matches(&ip.to_string())),
    })
}

/// `tls_params`.
#[derive(Clone, Debug)]
pub struct Params {
    pub versions: Vec<&'static rustls::SupportedProtocolVersion>,
    /// `cipher_suites` (empty: rustls's defaults).
    pub cipher_suites: Vec<rustls::SupportedCipherSuite>,
    /// `ecdh_curves` (empty: rustls's defaults).
    pub kx_groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            versions: vec![&rustls::version::TLS12, &rustls::version::TLS13],
            cipher_suites: Vec::new(),
            kx_groups: Vec::new(),
        }
    }
}

impl Params {
    pub fn provider(&self) -> Arc<CryptoProvider> {
        let mut p = rustls::crypto::ring::default_provider();
        if !self.cipher_suites.is_empty() {
            // As in Envoy, `cipher_suites` chooses among TLS 1.2 suites; TLS 1.3's are always on.
            let mut suites: Vec<_> = p
                .cipher_suites
                .iter()
                .filter(|s| s.version() == &rustls::version::TLS13)
                .copied()
                .collect();
            suites.extend(
                self.cipher_suites
                    .iter()
                    .filter(|s| s.version() != &rustls::version::TLS13),
            );
            p.cipher_suites = suites;
        }
        if !self.kx_groups.is_empty() {
            p.kx_groups = self.kx_groups.clone();
        }
        Arc::new(p)
    }
}

/// The cipher suite for one of Envoy's (OpenSSL-style) names, if rustls has it. Envoy's equal-preference
/// groups (`[A|B]`) are refused by the caller.
pub fn cipher_suite(name: &str) -> Option<rustls::SupportedCipherSuite> {
    let rustls_name = match name {
        "ECDHE-ECDSA-AES128-GCM-SHA256" => "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256" => "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384" => "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384" => "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305" => "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "ECDHE-RSA-CHACHA20-POLY1305" => "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "TLS_AES_128_GCM_SHA256" => "TLS13_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384" => "TLS13_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256" => "TLS13_CHACHA20_POLY1305_SHA256",
        _ => return None,
    };
    rustls::crypto::ring::ALL_CIPHER_SUITES
        .iter()
        .find(|s| format!("{:?}", s.suite()) == rustls_name)
        .copied()
}

/// The key exchange group for one of Envoy's `ecdh_curves` names, if rustls has it.
pub fn kx_group(name: &str) -> Option<&'static dyn rustls::crypto::SupportedKxGroup> {
    use rustls::crypto::ring::kx_group;
    match name {
        "X25519" => Some(kx_group::X25519),
        "P-256" => Some(kx_group::SECP256R1),
        "P-384" => Some(kx_group::SECP384R1),
        _ => None,
    }
}

/// `listener.<address>.ssl.*` or `cluster.<name>.ssl.*`.
#[derive(Debug, Clone)]
pub struct SslStats {
    pub scope: Scope,
    pub handshake: Counter,
    pub connection_error: Counter,
    pub no_certificate: Counter,
    pub fail_verify_error: Counter,
    pub fail_verify_san: Counter,
    pub fail_verify_no_cert: Counter,
    pub session_reused: Counter,
    pub tls12: Counter,
    pub tls13: Counter,
}

impl SslStats {
    /// `owner` is `listener.<address>.` or `cluster.<name>.`.
    pub fn new(owner: &Scope) -> Self {
        let scope = owner.scope("ssl.");
        SslStats {
            handshake: scope.counter("handshake"),
            connection_error: scope.counter("connection_error"),
            no_certificate: scope.counter("no_certificate"),
            fail_verify_error: scope.counter("fail_verify_error"),
            fail_verify_san: scope.counter("fail_verify_san"),
            fail_verify_no_cert: scope.counter("fail_verify_no_cert"),
            session_reused: scope.counter("session_reused"),
            tls12: scope.lazy_counter("versions.TLSv1.2"),
            tls13: scope.lazy_counter("versions.TLSv1.3"),
            scope,
        }
    }

    fn expiry_gauge(&self, name: &str) -> Gauge {
        self.scope
            .gauge(&format!("certificate.{name}.expiration_unix_time_seconds"))
    }

    /// Counts a finished handshake.
    fn handshake_done(&self, conn: &rustls::CommonState) {
        self.handshake.inc();
        match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => self.tls12.inc(),
            Some(rustls::ProtocolVersion::TLSv1_3) => self.tls13.inc(),
            _ => {}
        }
    }

    /// Counts a failed handshake by its reason, and returns the reason as Envoy's access log words it.
    fn handshake_failed(&self, e: &std::io::Error) -> String {
        self.connection_error.inc();
        let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
        match tls {
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Some(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext {
                ..
            })) => {
                self.fail_verify_san.inc();
                format!("TLS_error:|{e}:TLS_error_end")
            }
            Some(rustls::Error::InvalidCertificate(_)) => {
                self.fail_verify_error.inc();
                format!("TLS_error:|{e}:TLS_error_end")
            }
            Some(rustls::Error::NoCertificatesPresented) => {
                self.fail_verify_no_cert.inc();
                format!("TLS_error:|{e}:TLS_error_end")
            }
            _ => format!("TLS_error:|{e}:TLS_error_end"),
        }
    }
}

/// Every live context, for `server.days_until_first_cert_expiring`.
static CONTEXTS: Mutex<Vec<Weak<dyn Expiring>>> = Mutex::new(Vec::new());

trait Expiring: Send + Sync {
    /// The earliest `notAfter` among the context's certificates and CAs.
    fn earliest_expiry(&self) -> Option<i64>;
}

fn register(ctx: Weak<dyn Expiring>) {
    let mut all = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
    all.retain(|w| w.strong_count() > 0);
    all.push(ctx);
}

/// Days until the first certificate of any live context expires (Envoy's
/// `server.days_until_first_cert_expiring`); `None` without TLS.
pub fn days_until_first_cert_expiring(now_unix: i64) -> Option<i64> {
    let all = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
    let first = all
        .iter()
        .filter_map(|w| w.upgrade())
        .filter_map(|c| c.earliest_expiry())
        .min()?;
    Some(((first - now_unix) / 86400).max(0))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// ------------------------------------------------------------------------------------------------------------
// The listener side.

/// A lowered `DownstreamTlsContext`.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    pub certs: Vec<Source<Identity>>,
    pub ca: Option<Source<Ca>>,
    pub san: Vec<SanMatcher>,
    pub require_client_certificate: bool,
    /// `disable_stateful_session_resumption`: no session cache, no TLS 1.3 tickets.
    pub disable_stateful_session_resumption: bool,
    pub alpn: Vec<Vec<u8>>,
    pub params: Params,
}

/// A listener-side TLS context: the current rustls configuration and the stats.
pub struct ServerTls {
    spec: ServerSpec,
    config: ArcSwap<rustls::ServerConfig>,
    pub stats: SslStats,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("spec", &self.spec).finish()
    }
}

impl ServerTls {
    /// Builds the context; its SDS secrets (if any) rebuild it when they change.
    pub fn new(spec: ServerSpec, stats: SslStats) -> Result<Arc<Self>, String> {
        let config = build_server(&spec, &stats)?;
        let tls = Arc::new(ServerTls {
            spec,
            config: ArcSwap::from_pointee(config),
            stats,
        });
        let secrets = tls
            .spec
            .certs
            .iter()
            .filter_map(sds_of)
            .chain(tls.spec.ca.as_ref().and_then(sds_of));
        wire(&tls, secrets);
        Ok(tls)
    }

    /// The TLS handshake on an accepted connection (bounded by the caller).
    pub async fn accept<IO>(&self, io: IO) -> Result<tokio_rustls::server::TlsStream<IO>, String>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.load_full());
        match acceptor.accept(io).await {
            Ok(s) => {
                let (_, conn) = s.get_ref();
                self.stats.handshake_done(conn);
                if conn.peer_certificates().is_none_or(|c| c.is_empty()) {
                    self.stats.no_certificate.inc();
                }
                Ok(s)
            }
            Err(e) => Err(self.stats.handshake_failed(&e)),
        }
    }
}

impl sds::Dependent for ServerTls {
    fn rebuild(&self) {
        swap_in(&self.config, build_server(&self.spec, &self.stats), &self.stats);
    }
}

/// Subscribes a new context to the SDS secrets it is built from (so that it is rebuilt when they rotate), and
/// counts it for `server.days_until_first_cert_expiring`.
fn wire<T: sds::Dependent + Expiring + 'static>(
    ctx: &Arc<T>,
    secrets: impl Iterator<Item = Arc<sds::Secret>>,
) {
    let weak: Weak<dyn sds::Dependent> = Arc::downgrade(&(ctx.clone() as Arc<dyn sds::Dependent>));
    for s in secrets {
        s.subscribe(weak.clone());
    }
    register(Arc::downgrade(&(ctx.clone() as Arc<dyn Expiring>)));
}

/// Swaps a context rebuilt from rotated secrets in, or keeps the last good one.
fn swap_in<T>(config: &ArcSwap<T>, built: Result<T, String>, stats: &SslStats) {
    match built {
        Ok(c) => {
            config.store(Arc::new(c));
            tracing::info!(stats = %stats.scope.prefix(), "TLS context rebuilt with rotated secrets");
        }
        Err(e) => tracing::warn!(error = %e, "rotated secret rejected; keeping the last good TLS context"),
    }
}

/// The earliest expiry among a context's certificates and its CA.
fn earliest<'a>(certs: impl Iterator<Item = &'a Source<Identity>>, ca: Option<&Source<Ca>>) -> Option<i64> {
    let certs = certs.filter_map(|c| c.current()).map(|i| i.info.not_after);
    let ca = ca.and_then(|c| c.current()).and_then(|c| c.not_after);
    certs.chain(ca).min()
}

impl Expiring for ServerTls {
    fn earliest_expiry(&self) -> Option<i64> {
        earliest(self.spec.certs.iter(), self.spec.ca.as_ref())
    }
}

fn build_server(spec: &ServerSpec, stats: &SslStats) -> Result<rustls::ServerConfig, String> {
    let identities: Vec<Arc<Identity>> = spec.certs.iter().filter_map(|c| c.current()).collect();
    if identities.is_empty() {
        return Err("no certificate is available yet".into());
    }
    for i in &identities {
        stats.expiry_gauge(&i.name).set(i.info.not_after);
    }
    let provider = spec.params.provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&spec.params.versions)
        .map_err(|e| format!("tls_params: {e}"))?;
    let builder = match spec.ca.as_ref() {
        None => builder.with_no_client_auth(),
        Some(source) => {
            let ca = source
                .current()
                .ok_or("the validation context's CA is not available yet")?;
            if let Some(n) = ca.not_after {
                stats.expiry_gauge(&ca.name).set(n);
            }
            let mut b =
                rustls::server::WebPkiClientVerifier::builder_with_provider(ca.roots.clone(), provider);
            if !spec.require_client_certificate {
                b = b.allow_unauthenticated();
            }
            let inner = b.build().map_err(|e| format!("validation_context: {e}"))?;
            builder.with_client_cert_verifier(Arc::new(ClientVerifier {
                inner,
                san: spec.san.iter().chain(&ca.san).cloned().collect(),
            }))
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver { identities }));
    if spec.disable_stateful_session_resumption {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    config.alpn_protocols = spec.alpn.clone();
    Ok(config)
}

/// Picks the certificate whose names cover the SNI, else the first, as Envoy does with several
/// `tls_certificates`.
#[derive(Debug)]
struct SniResolver {
    identities: Vec<Arc<Identity>>,
}

impl rustls::server::ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|sni| {
                self.identities
                    .iter()
                    .find(|i| i.info.dns.iter().any(|n| der::dns_name_matches(n, sni)))
            })
            .or(self.identities.first());
        chosen.map(|i| i.key.clone())
    }
}

/// The chain check of rustls's WebPKI verifier, then Envoy's SAN matchers.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    san: Vec<SanMatcher>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let info = der::cert_info(end_entity).unwrap_or_default();
        if !san_matches(&info, &self.san) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ------------------------------------------------------------------------------------------------------------
// The cluster side.

/// A lowered `UpstreamTlsContext`.
#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub sni: Option<String>,
    pub auto_sni: bool,
    pub auto_san_validation: bool,
    pub ca: Option<Source<Ca>>,
    pub san: Vec<SanMatcher>,
    pub cert: Option<Source<Identity>>,
    pub alpn: Vec<Vec<u8>>,
    pub params: Params,
}

/// A cluster-side TLS context.
pub struct ClientTls {
    spec: ClientSpec,
    config: ArcSwap<rustls::ClientConfig>,
    pub stats: SslStats,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("spec", &self.spec).finish()
    }
}

impl ClientTls {
    pub fn new(spec: ClientSpec, stats: SslStats) -> Result<Arc<Self>, String> {
        let config = build_client(&spec, &stats)?;
        let tls = Arc::new(ClientTls {
            spec,
            config: ArcSwap::from_pointee(config),
            stats,
        });
        let secrets = tls
            .spec
            .cert
            .as_ref()
            .and_then(sds_of)
            .into_iter()
            .chain(tls.spec.ca.as_ref().and_then(sds_of));
        wire(&tls, secrets);
        Ok(tls)
    }

    /// Whether ALPN offers h2 (the cluster speaks HTTP/2 to its hosts).
    pub fn spec(&self) -> &ClientSpec {
        &self.spec
    }

    /// The TLS handshake on a new upstream connection. `authority` is the request's host, for `auto_sni`;
    /// `host_name` the host's DNS name when it has one.
    pub async fn connect<IO>(
        &self,
        io: IO,
        host_ip: std::net::IpAddr,
        authority: Option<&str>,
    ) -> Result<tokio_rustls::client::TlsStream<IO>, String>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let sni = self
            .spec
            .sni
            .clone()
            .or_else(|| {
                self.spec
                    .auto_sni
                    .then(|| authority.map(|a| strip_port(a).to_string()))
                    .flatten()
            })
            .filter(|s| !s.is_empty());
        let name = match &sni {
            Some(s) => ServerName::try_from(s.clone()).map_err(|e| format!("sni {s:?}: {e}"))?,
            // No SNI: rustls sends none for an IP address.
            None => ServerName::IpAddress(host_ip.into()),
        };
        let connector = tokio_rustls::TlsConnector::from(self.config.load_full());
        match connector.connect(name, io).await {
            Ok(s) => {
                let (_, conn) = s.get_ref();
                self.stats.handshake_done(conn);
                Ok(s)
            }
            Err(e) => Err(self.stats.handshake_failed(&e)),
        }
    }
}

fn sds_of<T>(s: &Source<T>) -> Option<Arc<sds::Secret>> {
    match s {
        Source::Sds(s) => Some(s.clone()),
        Source::Static(_) => None,
    }
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split_once(']')
            .map(|(h, _)| h.trim_start_matches('['))
            .unwrap_or(authority);
    }
    authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority)
}

impl sds::Dependent for ClientTls {
    fn rebuild(&self) {
        swap_in(&self.config, build_client(&self.spec, &self.stats), &self.stats);
    }
}

impl Expiring for ClientTls {
    fn earliest_expiry(&self) -> Option<i64> {
        earliest(self.spec.cert.iter(), self.spec.ca.as_ref())
    }
}

fn build_client(spec: &ClientSpec, stats: &SslStats) -> Result<rustls::ClientConfig, String> {
    let provider = spec.params.provider();
    let ca = match &spec.ca {
        Some(s) => Some(
            s.current()
                .ok_or("the validation context's CA is not available yet")?,
        ),
        None => None,
    };
    if let Some(n) = ca.as_ref().and_then(|c| c.not_after.map(|n| (c, n))) {
        stats.expiry_gauge(&n.0.name).set(n.1);
    }
    let verifier = Arc::new(ServerVerifier {
        san: spec
            .san
            .iter()
            .chain(ca.iter().flat_map(|c| c.san.iter()))
            .cloned()
            .collect(),
        roots: ca.map(|c| c.roots.clone()),
        auto_san_validation: spec.auto_san_validation,
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&spec.params.versions)
        .map_err(|e| format!("tls_params: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &spec.cert {
        None => builder.with_no_client_auth(),
        Some(source) => {
            let id = source
                .current()
                .ok_or("the client certificate is not available yet")?;
            stats.expiry_gauge(&id.name).set(id.info.not_after);
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(id.key.clone())))
        }
    };
    config.alpn_protocols = spec.alpn.clone();
    Ok(config)
}

/// Envoy's upstream verification: no `trusted_ca`, no verification; with one, the chain, then the SAN
/// matchers, or with `auto_san_validation` the SNI sent.
#[derive(Debug)]
struct ServerVerifier {
    roots: Option<Arc<RootCertStore>>,
    san: Vec<SanMatcher>,
    auto_san_validation: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if !self.san.is_empty() {
            let info = der::cert_info(end_entity).unwrap_or_default();
            if !san_matches(&info, &self.san) {
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName,
                ));
            }
        } else if self.auto_san_validation && matches!(server_name, ServerName::DnsName(_)) {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Publishes `server.days_until_first_cert_expiring`.
pub fn update_server_gauge(gauge: &Gauge) {
    if let Some(d) = days_until_first_cert_expiring(now_unix()) {
        gauge.set(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(disable_stateful: bool) -> ServerSpec {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let id = parse_identity(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            unnamed("cert"),
        )
        .unwrap();
        ServerSpec {
            certs: vec![Source::Static(Arc::new(id))],
            ca: None,
            san: Vec::new(),
            require_client_certificate: false,
            disable_stateful_session_resumption: disable_stateful,
            alpn: Vec::new(),
            params: Params::default(),
        }
    }

    #[test]
    fn stateful_resumption_is_on_unless_disabled() {
        let stats = SslStats::new(&crate::stats::Store::new().scope(String::new()));
        let on = build_server(&spec(false), &stats).unwrap();
        assert_eq!(on.send_tls13_tickets, 2);
        assert!(on.session_storage.can_cache());
        let off = build_server(&spec(true), &stats).unwrap();
        assert_eq!(off.send_tls13_tickets, 0);
        assert!(!off.session_storage.can_cache());
    }

    #[test]
    fn a_key_for_another_certificate_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let err = parse_identity(
            cert.pem().as_bytes(),
            other.serialize_pem().as_bytes(),
            "x".into(),
        )
        .unwrap_err();
        assert!(err.contains("does not belong to the certificate"), "{err}");
    }
}
