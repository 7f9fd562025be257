//! How a client decides to trust the relay's certificate: a PEM file (CA or
//! the certificate itself), a SHA-256 pin, or — for `wss://` only — the
//! public web CAs. There is no "accept anything" option on purpose.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::Error;

#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct Trust {
    /// A PEM file with the certificate (or CA) to trust, e.g.
    /// wasmrelay-data/tls/dev-cert.pem.
    #[cfg_attr(feature = "clap", arg(long))]
    pub ca: Option<PathBuf>,
    /// The SHA-256 of the relay's certificate, hex (the relay logs it).
    #[cfg_attr(feature = "clap", arg(long = "pin-sha256"))]
    pub pin_sha256: Option<String>,
}

impl Trust {
    /// Trust the certificates in a PEM file.
    pub fn ca(path: impl Into<PathBuf>) -> Self {
        Self {
            ca: Some(path.into()),
            pin_sha256: None,
        }
    }

    /// Trust exactly the certificate with this SHA-256 (hex, colons allowed).
    pub fn pin(sha256_hex: impl Into<String>) -> Self {
        Self {
            ca: None,
            pin_sha256: Some(sha256_hex.into()),
        }
    }

    /// A rustls client configuration for `alpn`, TLS 1.3 only when `tls13_only`
    /// (QUIC requires it). Without a CA or pin, `public_roots` decides whether
    /// the public web CAs are trusted or the connection is refused.
    pub(crate) fn client_config(
        &self,
        alpn: &[u8],
        tls13_only: bool,
        public_roots: bool,
    ) -> Result<rustls::ClientConfig, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
            &[&rustls::version::TLS13]
        } else {
            rustls::DEFAULT_VERSIONS
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?;
        let mut config = match (&self.ca, &self.pin_sha256) {
            (Some(ca), _) => builder
                .with_root_certificates(roots_from(ca)?)
                .with_no_client_auth(),
            (None, Some(pin)) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert::new(pin, provider)?))
                .with_no_client_auth(),
            (None, None) if public_roots => {
                let roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            (None, None) => return Err(Error::NoTrustAnchor),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }
}

fn roots_from(path: &Path) -> Result<rustls::RootCertStore, Error> {
    let unreadable = |source: std::io::Error| Error::CertificateFile {
        path: path.display().to_string(),
        source,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs =
        CertificateDer::pem_file_iter(path).map_err(|e| unreadable(std::io::Error::other(e)))?;
    for cert in certs {
        roots.add(cert.map_err(|e| unreadable(std::io::Error::other(e)))?)?;
    }
    Ok(roots)
}

/// Certificate pinning: the relay's leaf certificate must have the given
/// SHA-256; the handshake signature is still verified with it.
#[derive(Debug)]
struct PinnedCert {
    sha256: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl PinnedCert {
    fn new(hex: &str, provider: Arc<CryptoProvider>) -> Result<Self, Error> {
        let hex: String = hex.chars().filter(|c| *c != ':').collect();
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(Error::BadPin);
        }
        let sha256 = (0..64)
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| Error::BadPin)?;
        Ok(Self { sha256, provider })
    }
}

mod verify {
    use rustls::DigitallySignedStruct;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use sha2::{Digest, Sha256};

    use super::PinnedCert;

    impl ServerCertVerifier for PinnedCert {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            if Sha256::digest(end_entity.as_ref()).as_slice() == self.sha256.as_slice() {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(rustls::Error::General(
                    "the relay's certificate does not match the pinned SHA-256".into(),
                ))
            }
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

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}
