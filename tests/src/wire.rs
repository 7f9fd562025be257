//! Protocol connections for load generators, on the `wasmrelay-client`
//! crate: one sending half and one receiving half per connection, over plain
//! WebSocket, WebSocket over TLS or QUIC, speaking binary frames (PROTOCOL.md
//! §2) so payloads are never re-encoded. The benchmark program drives the
//! relay, the bare relay and nginx through these.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use wasmrelay::protocol::{Encoding, Msg, codec};
use wasmrelay_client::{Client, Options, Trust};

/// Where a load generator connects.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Target {
    /// `ws://host:port/ws` (the relay, the bare relay, or nginx in front of it).
    Ws { url: String },
    /// `wss://localhost:PORT/ws`, trusting the PEM certificate.
    Wss { port: u16, cert_pem: PathBuf },
    /// QUIC with ALPN `wasmrelay/1`, trusting the PEM certificate.
    Quic { addr: SocketAddr, cert_pem: PathBuf },
}

/// The sending half of a protocol connection.
pub struct Tx(wasmrelay_client::Sender);

/// The receiving half: yields binary messages.
pub struct Rx(wasmrelay_client::Receiver);

impl Tx {
    /// Queues `message`; WebSocket frames leave on [`Tx::flush`]. Over QUIC a
    /// message of `BULK_THRESHOLD` bytes or more gets a stream of its own.
    pub async fn feed(&mut self, message: Bytes) -> anyhow::Result<()> {
        Ok(self.0.feed(message).await?)
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        Ok(self.0.flush().await?)
    }

    pub async fn send_msg(&mut self, msg: &Msg) -> anyhow::Result<()> {
        Ok(self.0.send(msg).await?)
    }
}

impl Rx {
    /// The next binary message.
    pub async fn recv(&mut self) -> anyhow::Result<Bytes> {
        let frame = self.0.recv_frame().await?.context("connection ended")?;
        if frame.text {
            bail!(
                "unexpected text frame: {}",
                String::from_utf8_lossy(&frame.bytes)
            );
        }
        Ok(frame.bytes)
    }

    /// The next message of type `kind`, decoded; an `error` fails.
    pub async fn recv_msg(&mut self, kind: &str) -> anyhow::Result<Msg> {
        loop {
            let msg = codec::decode_binary(&self.recv().await?)?;
            if let Msg::Error { code, message, .. } = &msg {
                bail!("relay error {code}: {message}");
            }
            if msg.kind() == kind {
                return Ok(msg);
            }
        }
    }
}

/// Whether a binary message is of type `kind`, read from its header's start
/// (the relay writes `type` first), without decoding it.
pub fn is_kind(message: &[u8], kind: &str) -> bool {
    let header = message.get(4..).unwrap_or_default();
    header.starts_with(b"{\"type\":\"")
        && header[9..].starts_with(kind.as_bytes())
        && header.get(9 + kind.len()) == Some(&b'"')
}

/// The raw payload of a binary message (what follows its JSON header).
pub fn payload(message: &[u8]) -> &[u8] {
    let Some(length) = message.get(..4) else {
        return &[];
    };
    let header = u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize;
    message.get(4 + header..).unwrap_or_default()
}

pub fn trusted_roots(cert_pem: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert_pem)? {
        roots.add(cert?)?;
    }
    Ok(roots)
}

/// Connects over `target` and completes `hello` (with `token`, if any, also
/// on the WebSocket URL so admission sees it before the upgrade).
pub async fn connect(target: &Target, token: Option<&str>) -> anyhow::Result<(Tx, Rx)> {
    let mut options = Options::named("bench")
        .token(token)
        .encoding(Encoding::Binary);
    options.token_in_url = true;
    let url = match target {
        Target::Ws { url } => url.clone(),
        Target::Wss { port, cert_pem } => {
            options.trust = Trust::ca(cert_pem);
            format!("wss://localhost:{port}/ws")
        }
        Target::Quic { addr, cert_pem } => {
            options.trust = Trust::ca(cert_pem);
            options.server_name = Some("localhost".into());
            format!("quic://{addr}")
        }
    };
    let (tx, rx) = Client::connect(&url, options).await?.split();
    Ok((Tx(tx), Rx(rx)))
}
