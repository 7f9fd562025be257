//! Certificates for QUIC (and, later, https/wss): the configured certificate
//! and key files, or a self-signed development certificate generated into the
//! data directory on first start and reused afterwards, so a fresh relay
//! speaks TLS with no set-up. Its SHA-256 fingerprint is logged so clients can
//! pin it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::config::TlsConfig;

/// The ALPN protocol id of the QUIC transport.
pub const ALPN: &[u8] = b"wasmrelay/1";

/// A certificate chain and its key, ready for rustls.
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate (DER), lower-case hex.
    pub fingerprint: String,
    /// The PEM file clients can trust (`--ca`).
    pub cert_path: PathBuf,
    /// Whether it is the generated development certificate.
    pub development: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate the development certificate: {0}")]
    Generate(String),
    #[error("invalid certificate or key: {0}")]
    Rustls(String),
}

/// SHA-256 of a DER certificate, hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The configured certificate, or the development one under `data_dir/tls`.
pub fn load_or_create(config: &TlsConfig, data_dir: &Path) -> Result<Identity, TlsError> {
    let (cert_path, key_path, development) = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone(), false),
        _ => {
            let dir = data_dir.join("tls");
            let cert = dir.join("dev-cert.pem");
            let key = dir.join("dev-key.pem");
            if !cert.exists() || !key.exists() {
                generate(&dir, &cert, &key)?;
            }
            (cert, key, true)
        }
    };
    let read_error = |path: &Path, e: &dyn std::fmt::Display| TlsError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| read_error(&cert_path, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(&cert_path, &e))?;
    let leaf = certs.first().ok_or_else(|| TlsError::Read {
        path: cert_path.clone(),
        reason: "no certificate in the file".into(),
    })?;
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| read_error(&key_path, &e))?;
    Ok(Identity {
        certs,
        key,
        fingerprint,
        cert_path,
        development,
    })
}

fn generate(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let generated =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let write = |path: &Path, text: String| {
        std::fs::write(path, text).map_err(|source| TlsError::Write {
            path: path.to_owned(),
            source,
        })
    };
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    write(key_path, generated.signing_key.serialize_pem())?;
    write(cert_path, generated.cert.pem())?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed development certificate");
    Ok(())
}

/// rustls with the ring provider, TLS 1.3 only (QUIC requires it).
pub fn server_config(identity: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.certs.clone(), identity.key.clone_key())
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}
