//! Protocol connections for load generators: one sending half and one
//! receiving half per connection, over plain WebSocket, WebSocket over TLS
//! or QUIC, speaking binary frames (PROTOCOL.md §2) so payloads are never
//! re-encoded. The benchmark program drives the relay, the bare relay and
//! nginx through these.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, Message};
use wasmrelay::protocol::{Msg, VERSION, codec};
use wasmrelay::transport::quic::{self, FrameError};
use wasmrelay_examples::client::{QuicFrame, quic_inbox};

use crate::quic_client;

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

type WsSink = Pin<Box<dyn Sink<Message, Error = tungstenite::Error> + Send>>;
type WsSource = Pin<Box<dyn Stream<Item = Result<Message, tungstenite::Error>> + Send>>;

/// The sending half of a protocol connection.
pub enum Tx {
    Ws(WsSink),
    Quic {
        connection: quinn::Connection,
        control: quinn::SendStream,
        // The endpoint drives the connection: it lives as long as we send.
        _endpoint: quinn::Endpoint,
    },
}

/// The receiving half: yields binary messages.
pub enum Rx {
    Ws(WsSource),
    Quic(mpsc::Receiver<Result<QuicFrame, FrameError>>),
}

impl Tx {
    /// Queues `message`; WebSocket frames leave on [`Tx::flush`]. Over QUIC a
    /// message of [`quic::BULK_THRESHOLD`] or more gets a stream of its own.
    pub async fn feed(&mut self, message: Bytes) -> anyhow::Result<()> {
        match self {
            Tx::Ws(sink) => sink.feed(Message::Binary(message)).await?,
            Tx::Quic {
                connection,
                control,
                ..
            } => {
                if message.len() >= quic::BULK_THRESHOLD {
                    let mut stream = connection.open_uni().await?;
                    quic::write_frame(&mut stream, message).await?;
                    stream.finish()?;
                } else {
                    control.write_all(&quic::frame(&message)).await?;
                }
            }
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if let Tx::Ws(sink) = self {
            sink.flush().await?;
        }
        Ok(())
    }

    pub async fn send_msg(&mut self, msg: &Msg) -> anyhow::Result<()> {
        self.feed(codec::encode_binary(msg)).await?;
        self.flush().await
    }
}

impl Rx {
    /// The next binary message.
    pub async fn recv(&mut self) -> anyhow::Result<Bytes> {
        match self {
            Rx::Ws(source) => loop {
                match source.next().await.context("connection ended")?? {
                    Message::Binary(message) => return Ok(message),
                    Message::Text(text) => bail!("unexpected text frame: {text}"),
                    Message::Close(close) => bail!("closed: {close:?}"),
                    _ => continue,
                }
            },
            Rx::Quic(inbox) => Ok(inbox.recv().await.context("connection ended")??.message),
        }
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
    let with_token = |url: &str| match token {
        Some(token) => format!("{url}?token={token}"),
        None => url.to_owned(),
    };
    let (mut tx, mut rx) = match target {
        Target::Ws { url } => {
            // Nagle off, as the relay has it: small frames must not wait.
            let (ws, _) =
                tokio_tungstenite::connect_async_with_config(with_token(url), None, true).await?;
            let (sink, source) = ws.split();
            (Tx::Ws(Box::pin(sink)), Rx::Ws(Box::pin(source)))
        }
        Target::Wss { port, cert_pem } => {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(trusted_roots(cert_pem)?)
                .with_no_client_auth();
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            let tcp = TcpStream::connect(("127.0.0.1", *port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
                .connect(ServerName::try_from("localhost")?, tcp)
                .await?;
            let url = with_token(&format!("wss://localhost:{port}/ws"));
            let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
            let (sink, source) = ws.split();
            (Tx::Ws(Box::pin(sink)), Rx::Ws(Box::pin(source)))
        }
        Target::Quic { addr, cert_pem } => {
            let endpoint = quic_client(cert_pem, b"wasmrelay/1")?;
            let connection = endpoint.connect(*addr, "localhost")?.await?;
            let (control, recv) = connection.open_bi().await?;
            let inbox = quic_inbox(connection.clone(), recv);
            (
                Tx::Quic {
                    connection,
                    control,
                    _endpoint: endpoint,
                },
                Rx::Quic(inbox),
            )
        }
    };
    tx.send_msg(&Msg::Hello {
        v: VERSION,
        client: Some("bench".into()),
        token: token.map(str::to_owned),
    })
    .await?;
    rx.recv_msg("welcome").await?;
    Ok((tx, rx))
}
