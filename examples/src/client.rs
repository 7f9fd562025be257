//! A minimal protocol client over WebSocket or QUIC: connect, say `hello`,
//! then send and receive [`Msg`]s. WebSocket uses JSON text frames; QUIC uses
//! one control stream of length-prefixed binary frames, plus a stream of its
//! own for each bulk body in either direction (PROTOCOL.md §1.1).
//! Small enough to read in one sitting; PROTOCOL.md is the reference for
//! writing one in another language.

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use wasmrelay::protocol::{Msg, VERSION, codec};
use wasmrelay::transport::quic::{self, FrameError};

/// The largest frame a client accepts: the most `max_message_bytes` can be.
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// How a QUIC client decides to trust the relay's certificate. There is no
/// "accept anything" option on purpose.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Trust {
    /// QUIC: a PEM file with the certificate (or CA) to trust, e.g.
    /// wasmrelay-data/tls/dev-cert.pem.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// QUIC: the SHA-256 of the relay's certificate, hex (the relay logs it).
    #[arg(long = "pin-sha256")]
    pub pin_sha256: Option<String>,
}

enum Link {
    Ws(WebSocketStream<MaybeTlsStream<TcpStream>>),
    Quic {
        connection: quinn::Connection,
        send: quinn::SendStream,
        inbox: mpsc::Receiver<Result<QuicFrame, FrameError>>,
        _endpoint: quinn::Endpoint,
    },
}

pub struct Client {
    link: Link,
    /// The relay's answer to our `hello`.
    pub welcome: Msg,
}

impl Client {
    /// Connects to `url` — `ws://HOST:PORT/ws` or `quic://HOST:PORT` — and
    /// greets the relay, naming itself with `token` when given (the relay's
    /// policy decides who that is; PROTOCOL.md §3.1). `trust` matters for
    /// QUIC only.
    pub async fn connect(
        url: &str,
        client_name: &str,
        trust: &Trust,
        token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let link = match url.strip_prefix("quic://") {
            Some(authority) => connect_quic(authority, trust).await?,
            None => {
                let (ws, _) = connect_async(url)
                    .await
                    .with_context(|| format!("cannot connect to {url}"))?;
                Link::Ws(ws)
            }
        };
        let mut client = Self {
            link,
            welcome: Msg::Pong { id: None },
        };
        client
            .send(&Msg::Hello {
                v: VERSION,
                client: Some(client_name.to_owned()),
                token: token.map(str::to_owned),
            })
            .await?;
        match client.recv().await? {
            Some(welcome @ Msg::Welcome { .. }) => client.welcome = welcome,
            Some(other) => bail!("expected welcome, got {other:?}"),
            None => bail!("the relay closed the connection during hello"),
        }
        Ok(client)
    }

    pub async fn send(&mut self, msg: &Msg) -> anyhow::Result<()> {
        match &mut self.link {
            Link::Ws(ws) => {
                ws.send(Message::Text(codec::encode_text(msg).into()))
                    .await?
            }
            Link::Quic {
                send, connection, ..
            } => {
                let message = codec::encode_binary(msg);
                if quic::is_bulk(msg) {
                    let mut bulk = connection.open_uni().await?;
                    quic::write_frame(&mut bulk, message).await?;
                    bulk.finish()?;
                } else {
                    send.write_all(&quic::frame(&message)).await?;
                }
            }
        }
        Ok(())
    }

    /// The next protocol message; `None` once the relay has closed the connection.
    pub async fn recv(&mut self) -> anyhow::Result<Option<Msg>> {
        match &mut self.link {
            Link::Ws(ws) => {
                while let Some(frame) = ws.next().await {
                    match frame? {
                        Message::Text(text) => return Ok(Some(codec::decode_text(&text)?)),
                        Message::Binary(bytes) => return Ok(Some(codec::decode_binary(&bytes)?)),
                        Message::Close(_) => return Ok(None),
                        // Pings are answered by tungstenite itself.
                        _ => continue,
                    }
                }
                Ok(None)
            }
            Link::Quic { inbox, .. } => match inbox.recv().await {
                Some(Ok(frame)) => Ok(Some(codec::decode_binary(&frame.message)?)),
                None | Some(Err(FrameError::Lost)) => Ok(None),
                Some(Err(e)) => Err(e.into()),
            },
        }
    }

    /// How often an instance connected over QUIC must say something so the
    /// relay does not take it for gone (PROTOCOL §3.2); `None` over WebSocket,
    /// where the relay's pings do that.
    pub fn instance_ping_every(&self) -> Option<std::time::Duration> {
        match (&self.link, &self.welcome) {
            (
                Link::Quic { .. },
                Msg::Welcome {
                    instance_idle_timeout_ms,
                    ..
                },
            ) if *instance_idle_timeout_ms > 0 => Some(std::time::Duration::from_millis(
                instance_idle_timeout_ms / 4,
            )),
            _ => None,
        }
    }

    /// Closes cleanly, so the relay learns at once rather than by timeout.
    pub async fn close(self) -> anyhow::Result<()> {
        match self.link {
            Link::Ws(mut ws) => ws.close(None).await?,
            Link::Quic {
                connection,
                mut send,
                _endpoint,
                ..
            } => {
                let _ = send.finish();
                connection.close(0u32.into(), b"bye");
                // Bounded: an unreachable relay never acknowledges the close.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), _endpoint.wait_idle())
                        .await;
            }
        }
        Ok(())
    }
}

async fn connect_quic(authority: &str, trust: &Trust) -> anyhow::Result<Link> {
    let authority = authority.trim_end_matches('/');
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("no address for {authority}"))?;
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_matches(['[', ']']);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match (&trust.ca, &trust.pin_sha256) {
        (Some(ca), _) => {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("cannot read {}", ca.display()))?
            {
                roots.add(cert?)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, Some(pin)) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(pin::PinnedCert::new(pin, provider)?))
            .with_no_client_auth(),
        (None, None) => bail!(
            "QUIC needs --ca FILE (for example wasmrelay-data/tls/dev-cert.pem) or --pin-sha256 HEX (the relay logs it)"
        ),
    };
    tls.alpn_protocols = vec![b"wasmrelay/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(quic_transport()));
    endpoint.set_default_client_config(config);
    let connection = endpoint
        .connect(addr, host)?
        .await
        .with_context(|| format!("QUIC handshake with {authority} failed"))?;
    let (send, recv) = connection.open_bi().await?;
    Ok(Link::Quic {
        inbox: quic_inbox(connection.clone(), recv),
        connection,
        send,
        _endpoint: endpoint,
    })
}

/// Client transport settings: keep-alives, so an idle connection stays up
/// and a relay's close is noticed even when its CONNECTION_CLOSE packet was
/// lost (a closed peer answers any later packet with another one).
pub fn quic_transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(1)));
    transport
}

/// One message received over QUIC, and whether it came on a bulk stream.
#[derive(Debug)]
pub struct QuicFrame {
    pub message: Bytes,
    pub bulk: bool,
}

/// Whole frames from the control stream and from every bulk stream the relay
/// opens, in arrival order. Ends once the connection does.
pub fn quic_inbox(
    connection: quinn::Connection,
    mut control: quinn::RecvStream,
) -> mpsc::Receiver<Result<QuicFrame, FrameError>> {
    let tag = |bulk| move |message| QuicFrame { message, bulk };
    let (tx, rx) = mpsc::channel(64);
    let control_tx = tx.clone();
    tokio::spawn(async move {
        loop {
            let frame = quic::read_frame(&mut control, MAX_FRAME, None).await;
            let ended = !matches!(frame, Ok(Some(_)));
            if let Some(item) = frame.transpose().map(|r| r.map(tag(false)))
                && control_tx.send(item).await.is_err()
            {
                return;
            }
            if ended {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok(mut bulk) = connection.accept_uni().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(item) = quic::read_frame(&mut bulk, MAX_FRAME, None)
                    .await
                    .transpose()
                    .map(|r| r.map(tag(true)))
                {
                    let _ = tx.send(item).await;
                }
            });
        }
    });
    rx
}

/// Certificate pinning: the relay's leaf certificate must have the given
/// SHA-256; the handshake signature is still verified with it.
mod pin {
    use std::sync::Arc;

    use rustls::DigitallySignedStruct;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use sha2::{Digest, Sha256};

    #[derive(Debug)]
    pub struct PinnedCert {
        sha256: Vec<u8>,
        provider: Arc<CryptoProvider>,
    }

    impl PinnedCert {
        pub fn new(hex: &str, provider: Arc<CryptoProvider>) -> anyhow::Result<Self> {
            let hex: String = hex.chars().filter(|c| *c != ':').collect();
            if hex.len() != 64 {
                anyhow::bail!("--pin-sha256 must be 64 hex digits (colons allowed)");
            }
            let sha256 = (0..64)
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()?;
            Ok(Self { sha256, provider })
        }
    }

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
                    "the relay's certificate does not match --pin-sha256".into(),
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
