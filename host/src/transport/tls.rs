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

pub use crate::protocol::quic::ALPN;

/// A certificate chain and its key, ready for rustls.
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate (DER), lower-case hex.
    pub fingerprint: String,
    /// The PEM file clients can trust (`--ca`).
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// Whether it is the generated development certificate.
    pub development: bool,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
            } else if let Err(e) = crate::secrets::restrict(&key) {
                tracing::warn!(key = %key.display(), error = %e, "cannot make the development key owner-only (0600)");
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
        key_path,
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
    crate::secrets::write_private(key_path, generated.signing_key.serialize_pem().as_bytes())
        .map_err(|source| TlsError::Write {
            path: key_path.to_owned(),
            source,
        })?;
    write(cert_path, generated.cert.pem())?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed development certificate");
    Ok(())
}

/// rustls for QUIC: the ring provider, TLS 1.3 only (QUIC requires it), ALPN `wasmrelay/1`.
pub fn server_config(identity: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    build(identity, &[&rustls::version::TLS13], vec![ALPN.to_vec()])
}

/// rustls for https and wss: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`.
pub fn https_config(identity: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    build(
        identity,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    )
}

fn build(
    identity: &Identity,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: Vec<Vec<u8>>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.certs.clone(), identity.key.clone_key())
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = alpn;
    Ok(config)
}

/// The certificate in use, swapped when its files change: new TLS and QUIC
/// connections get the new one, established connections keep theirs.
pub struct Certificates {
    https: arc_swap::ArcSwap<rustls::ServerConfig>,
    quic: Option<(quinn::Endpoint, Arc<quinn::TransportConfig>)>,
    config: TlsConfig,
    data_dir: PathBuf,
    watched: std::sync::Mutex<(PathBuf, PathBuf, Option<Stamp>)>,
    pub fingerprint: arc_swap::ArcSwap<String>,
}

/// Modification times and sizes of the certificate and key files.
type Stamp = (std::time::SystemTime, u64, std::time::SystemTime, u64);

fn stamp(cert: &Path, key: &Path) -> Option<Stamp> {
    let c = std::fs::metadata(cert).ok()?;
    let k = std::fs::metadata(key).ok()?;
    Some((c.modified().ok()?, c.len(), k.modified().ok()?, k.len()))
}

/// quinn's server configuration for an identity.
pub fn quic_server_config(
    identity: &Identity,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_config(identity)?)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport);
    Ok(server)
}

impl Certificates {
    pub fn new(
        identity: &Identity,
        config: &TlsConfig,
        data_dir: &Path,
        quic: Option<(quinn::Endpoint, Arc<quinn::TransportConfig>)>,
    ) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            https: arc_swap::ArcSwap::from_pointee(https_config(identity)?),
            quic,
            config: config.clone(),
            data_dir: data_dir.to_owned(),
            watched: std::sync::Mutex::new((
                identity.cert_path.clone(),
                identity.key_path.clone(),
                stamp(&identity.cert_path, &identity.key_path),
            )),
            fingerprint: arc_swap::ArcSwap::from_pointee(identity.fingerprint.clone()),
        }))
    }

    /// An acceptor with the current certificate.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.https.load_full())
    }

    /// Reloads when the files changed; a pair that fails to load is logged
    /// and the current certificate stays.
    pub fn reload_if_changed(&self) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let now = stamp(&watched.0, &watched.1);
        if now.is_none() || now == watched.2 {
            return;
        }
        watched.2 = now;
        drop(watched);
        let reloaded = load_or_create(&self.config, &self.data_dir).and_then(|identity| {
            let https = https_config(&identity)?;
            let quic = match &self.quic {
                Some((endpoint, transport)) => {
                    Some((endpoint, quic_server_config(&identity, transport.clone())?))
                }
                None => None,
            };
            Ok((identity, https, quic))
        });
        match reloaded {
            Ok((identity, https, quic)) => {
                self.https.store(Arc::new(https));
                if let Some((endpoint, server)) = quic {
                    endpoint.set_server_config(Some(server));
                }
                self.fingerprint
                    .store(Arc::new(identity.fingerprint.clone()));
                tracing::info!(sha256 = %identity.fingerprint, "TLS certificate reloaded for new connections");
            }
            Err(e) => {
                tracing::warn!(error = %e, "certificate files changed but cannot be loaded; keeping the current certificate")
            }
        }
    }

    /// Checks the files every `tls.reload_interval_ms` until `stop`.
    pub async fn watch(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(
            self.config.reload_interval_ms,
        ));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    let certificates = self.clone();
                    // File reads and key parsing are blocking work.
                    let _ = tokio::task::spawn_blocking(move || certificates.reload_if_changed()).await;
                }
            }
        }
    }
}
