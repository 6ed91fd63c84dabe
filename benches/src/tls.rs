//! The TLS workloads' certificate: one self-signed ECDSA P-256 certificate (SAN `localhost` and 127.0.0.1)
//! made with rcgen for each run, served by every proxy.

use std::path::{Path, PathBuf};

use crate::Result;

/// Where a run's certificate files are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// Its private key, PKCS#8 PEM.
    pub key: PathBuf,
    /// Certificate then key in one file, as HAProxy's `crt` wants them.
    pub combined: PathBuf,
}

impl TlsFiles {
    /// The files' paths under `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            combined: dir.join("cert-and-key.pem"),
        }
    }

    /// Generates a fresh certificate and key into `dir` (created if need be).
    pub fn generate(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let files = Self::in_dir(dir);
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "remora bench");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        std::fs::write(&files.cert, &cert_pem)?;
        std::fs::write(&files.key, &key_pem)?;
        std::fs::write(&files.combined, format!("{cert_pem}{key_pem}"))?;
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_an_ecdsa_p256_pair() {
        let dir = std::env::temp_dir().join(format!("remora-bench-tls-test-{}", std::process::id()));
        let f = TlsFiles::generate(&dir).unwrap();
        let cert = std::fs::read_to_string(&f.cert).unwrap();
        let key = std::fs::read_to_string(&f.key).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        // The key parses back as P-256.
        let parsed = rcgen::KeyPair::from_pem(&key).unwrap();
        assert!(parsed.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256));
        assert_eq!(
            std::fs::read_to_string(&f.combined).unwrap(),
            format!("{cert}{key}")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
