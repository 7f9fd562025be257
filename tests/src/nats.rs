//! Just enough of the NATS client protocol, over NATS's WebSocket listener,
//! for the benchmark's load generator to drive nats-server the way it drives
//! the relay: CONNECT, SUB, PUB, and MSG deliveries. One publish per
//! WebSocket frame, as the relay's clients send, so both carry the same
//! client framing.

use anyhow::{Context as _, bail};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The sending half.
pub struct NatsTx {
    sink: SplitSink<Ws, Message>,
    next_sid: u64,
}

/// The receiving half: yields the payloads of `MSG`s.
pub struct NatsRx {
    source: SplitStream<Ws>,
    buffer: BytesMut,
}

/// A NATS subject for a relay channel name (`bench/small` → `bench.small`).
pub fn subject(channel: &str) -> String {
    channel.replace('/', ".")
}

/// Connects to `url` (`ws://host:port`), sends CONNECT and waits for the
/// server to answer a PING, so the connection is ready.
pub async fn connect(url: &str) -> anyhow::Result<(NatsTx, NatsRx)> {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("connect to nats-server at {url}"))?;
    let (sink, source) = ws.split();
    let (mut tx, mut rx) = (
        NatsTx { sink, next_sid: 1 },
        NatsRx {
            source,
            buffer: BytesMut::new(),
        },
    );
    let info = rx.line().await?;
    if !info.starts_with("INFO ") {
        bail!("expected INFO from nats-server, got {info:?}");
    }
    tx.send_raw(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"bench\",\"lang\":\"rust\",\"version\":\"0\",\"protocol\":1,\"echo\":true}\r\nPING\r\n",
    )
    .await?;
    rx.pong().await?;
    Ok((tx, rx))
}

impl NatsTx {
    async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.sink
            .send(Message::Binary(Bytes::copy_from_slice(bytes)))
            .await?;
        Ok(())
    }

    /// Subscribes to `subject` and PINGs: the matching PONG (see
    /// [`NatsRx::pong`]) says the subscription is in place.
    pub async fn subscribe(&mut self, subject: &str) -> anyhow::Result<()> {
        let sid = self.next_sid;
        self.next_sid += 1;
        self.send_raw(format!("SUB {subject} {sid}\r\nPING\r\n").as_bytes())
            .await
    }

    /// Queues one publish (one WebSocket frame); sent on [`flush`](Self::flush).
    pub async fn feed(&mut self, subject: &str, payload: &[u8]) -> anyhow::Result<()> {
        let head = format!("PUB {subject} {}\r\n", payload.len());
        let mut frame = BytesMut::with_capacity(head.len() + payload.len() + 2);
        frame.extend_from_slice(head.as_bytes());
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.sink.feed(Message::Binary(frame.freeze())).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.sink.flush().await?;
        Ok(())
    }
}

impl NatsRx {
    /// Reads more from the server into the buffer.
    async fn fill(&mut self) -> anyhow::Result<()> {
        loop {
            match self.source.next().await.context("nats-server closed")?? {
                Message::Binary(bytes) => {
                    self.buffer.extend_from_slice(&bytes);
                    return Ok(());
                }
                Message::Text(text) => {
                    self.buffer.extend_from_slice(text.as_bytes());
                    return Ok(());
                }
                Message::Close(frame) => bail!("nats-server closed the connection: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The next protocol line, without its CRLF.
    async fn line(&mut self) -> anyhow::Result<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\r\n") {
                let line = self.buffer.split_to(end + 2);
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            self.fill().await?;
        }
    }

    /// Waits for the PONG answering our last PING.
    pub async fn pong(&mut self) -> anyhow::Result<()> {
        loop {
            let line = self.line().await?;
            match line.as_str() {
                "PONG" => return Ok(()),
                "PING" | "+OK" => {}
                other if other.starts_with("-ERR") => bail!("nats-server: {other}"),
                other if other.starts_with("INFO ") => {}
                other => bail!("expected PONG, got {other:?}"),
            }
        }
    }

    /// The payload of the next `MSG`; other lines (PING, INFO) are skipped
    /// (runs are far shorter than the server's ping interval).
    pub async fn next_payload(&mut self) -> anyhow::Result<Bytes> {
        loop {
            let line = self.line().await?;
            if let Some(rest) = line.strip_prefix("MSG ") {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let length: usize = rest
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("bad MSG line {line:?}"))?;
                while self.buffer.len() < length + 2 {
                    self.fill().await?;
                }
                let payload = self.buffer.split_to(length).freeze();
                self.buffer.advance(2);
                return Ok(payload);
            }
            if line.starts_with("-ERR") {
                bail!("nats-server: {line}");
            }
        }
    }
}
