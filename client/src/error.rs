//! The one error type of the client crate; sources are kept, so `{:#}` (or
//! any error reporter) shows the whole chain.

use wasmrelay_protocol::ErrorCode;
use wasmrelay_protocol::codec::DecodeError;
use wasmrelay_protocol::quic::FrameError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL is not `ws://`, `wss://` or `quic://` with a host and port.
    #[error("bad relay URL {url:?}: {reason}")]
    Url { url: String, reason: &'static str },
    /// The address could not be resolved or connected to.
    #[error("cannot connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    /// A QUIC or wss connection without a way to trust the relay's
    /// certificate (QUIC has no public-CA default: dev relays use their own).
    #[error(
        "QUIC needs a certificate to trust: a CA file (Trust::ca, --ca FILE; e.g. wasmrelay-data/tls/dev-cert.pem) or the certificate's SHA-256 (Trust::pin, --pin-sha256 HEX; the relay logs it)"
    )]
    NoTrustAnchor,
    /// The certificate file could not be read.
    #[error("cannot read certificates from {path}")]
    CertificateFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate pin must be 64 hex digits (colons allowed)")]
    BadPin,
    #[error("TLS setup failed")]
    Tls(#[from] rustls::Error),
    #[error("WebSocket failed")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("QUIC connection failed")]
    QuicConnect(#[from] quinn::ConnectError),
    #[error("QUIC connection lost")]
    QuicConnection(#[from] quinn::ConnectionError),
    #[error("QUIC write failed")]
    QuicWrite(#[from] quinn::WriteError),
    #[error("QUIC stream already closed")]
    QuicClosedStream(#[from] quinn::ClosedStream),
    #[error("QUIC frame unreadable")]
    Frame(#[from] FrameError),
    /// What the relay sent does not decode.
    #[error("undecodable message from the relay")]
    Decode(#[from] DecodeError),
    /// The relay closed the connection where an answer was due.
    #[error("the relay closed the connection {during}")]
    Closed { during: &'static str },
    /// The relay sent something the client did not expect at this point.
    #[error("expected {expected}, got a {got:?} message")]
    Unexpected { expected: &'static str, got: String },
    /// The relay answered with an `error` message.
    #[error("relay error {code}: {message}")]
    Relay { code: ErrorCode, message: String },
    /// The relay will not let this client serve the space; retrying cannot help.
    #[error("the relay refused to register space {space:?}: {code}: {message}")]
    Refused {
        space: String,
        code: ErrorCode,
        message: String,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether reconnecting could help (the relay went away) or not (it
    /// refused this client, or the client is misconfigured).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Error::Url { .. }
                | Error::NoTrustAnchor
                | Error::CertificateFile { .. }
                | Error::BadPin
                | Error::Refused { .. }
        )
    }
}
