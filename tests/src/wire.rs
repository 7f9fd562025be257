//! Protocol connections for load generators, on the `wasmrelay-client`
//! crate: one sending half and one receiving half per connection, over plain
//! WebSocket, WebSocket over TLS or QUIC, speaking binary frames (PROTOCOL.md
//! §2) so payloads are never re-encoded. The benchmark program drives the
//! relay, the bare relay and nginx through these, and nats-server through
//! the same channel-level calls (`subscribe`, `publish`, `next_delivery`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use wasmrelay::protocol::{Data, Encoding, Msg, codec};
use wasmrelay_client::{Client, Options, Trust};

use crate::nats::{self, NatsRx, NatsTx};

/// Where a load generator connects.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Target {
    /// `ws://host:port/ws` (the relay, the bare relay, or nginx in front of it).
    Ws { url: String },
    /// `wss://localhost:PORT/ws`, trusting the PEM certificate.
    Wss { port: u16, cert_pem: PathBuf },
    /// QUIC with ALPN `wasmrelay/1`, trusting the PEM certificate.
    Quic { addr: SocketAddr, cert_pem: PathBuf },
    /// nats-server's WebSocket listener, `ws://host:port`.
    Nats { url: String },
}

/// The sending half of a protocol connection.
pub enum Tx {
    Relay(wasmrelay_client::Sender),
    Nats(NatsTx),
}

/// The receiving half: yields binary messages.
pub enum Rx {
    Relay(wasmrelay_client::Receiver),
    Nats(NatsRx),
}

impl Tx {
    fn relay(&mut self) -> anyhow::Result<&mut wasmrelay_client::Sender> {
        match self {
            Tx::Relay(sender) => Ok(sender),
            Tx::Nats(_) => bail!("nats-server takes channel traffic only"),
        }
    }

    /// Queues `message`; WebSocket frames leave on [`Tx::flush`]. Over QUIC a
    /// message of `BULK_THRESHOLD` bytes or more gets a stream of its own.
    pub async fn feed(&mut self, message: Bytes) -> anyhow::Result<()> {
        Ok(self.relay()?.feed(message).await?)
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Tx::Relay(sender) => Ok(sender.flush().await?),
            Tx::Nats(nats) => nats.flush().await,
        }
    }

    pub async fn send_msg(&mut self, msg: &Msg) -> anyhow::Result<()> {
        Ok(self.relay()?.send(msg).await?)
    }

    /// Subscribes to `channel`; [`Rx::subscribed`] waits for the answer.
    pub async fn subscribe(&mut self, channel: &str) -> anyhow::Result<()> {
        match self {
            Tx::Relay(sender) => Ok(sender
                .send(&Msg::Subscribe {
                    channel: channel.to_owned(),
                    recover: None,
                })
                .await?),
            Tx::Nats(nats) => nats.subscribe(&nats::subject(channel)).await,
        }
    }

    /// Queues a publish of `payload` to `channel` (sent on [`Tx::flush`]).
    pub async fn publish(&mut self, channel: &str, payload: Bytes) -> anyhow::Result<()> {
        match self {
            Tx::Relay(sender) => {
                let publish = Msg::Publish {
                    channel: channel.to_owned(),
                    id: None,
                    data: Data(payload),
                };
                Ok(sender.feed(codec::encode_binary(&publish)).await?)
            }
            Tx::Nats(nats) => nats.feed(&nats::subject(channel), &payload).await,
        }
    }
}

impl Rx {
    /// Waits for the answer to [`Tx::subscribe`].
    pub async fn subscribed(&mut self) -> anyhow::Result<()> {
        match self {
            Rx::Relay(_) => self.recv_msg("subscribed").await.map(drop),
            Rx::Nats(nats) => nats.pong().await,
        }
    }

    /// The payload of the next channel message; `None` for anything else.
    pub async fn next_delivery(&mut self) -> anyhow::Result<Option<Bytes>> {
        match self {
            Rx::Relay(_) => {
                let message = self.recv().await?;
                if !is_kind(&message, "message") {
                    return Ok(None);
                }
                let start = message.len() - payload(&message).len();
                Ok(Some(message.slice(start..)))
            }
            Rx::Nats(nats) => nats.next_payload().await.map(Some),
        }
    }

    /// The next binary message.
    pub async fn recv(&mut self) -> anyhow::Result<Bytes> {
        let Rx::Relay(receiver) = self else {
            bail!("nats-server takes channel traffic only");
        };
        let frame = receiver.recv_frame().await?.context("connection ended")?;
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
/// on the WebSocket URL so admission sees it before the upgrade), one
/// message per frame.
pub async fn connect(target: &Target, token: Option<&str>) -> anyhow::Result<(Tx, Rx)> {
    connect_with(target, token, false).await
}

/// [`connect`], asking for batched frames (`hello.batch`) when `batch`.
pub async fn connect_with(
    target: &Target,
    token: Option<&str>,
    batch: bool,
) -> anyhow::Result<(Tx, Rx)> {
    let mut options = Options::named("bench")
        .token(token)
        .encoding(Encoding::Binary)
        .batch(batch);
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
        Target::Nats { url } => {
            let (tx, rx) = nats::connect(url).await?;
            return Ok((Tx::Nats(tx), Rx::Nats(rx)));
        }
    };
    let (tx, rx) = Client::connect(&url, options).await?.split();
    Ok((Tx::Relay(tx), Rx::Relay(rx)))
}
