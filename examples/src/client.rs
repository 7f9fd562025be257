//! A minimal protocol client over WebSocket: connect, say `hello`, then send
//! and receive [`Msg`]s as JSON text frames. Small enough to read in one
//! sitting; PROTOCOL.md is the reference for writing one in another language.

use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use wasmrelay::protocol::{Msg, VERSION, codec};

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The relay's answer to our `hello`.
    pub welcome: Msg,
}

impl Client {
    /// Connects to `url` (for example `ws://127.0.0.1:8080/ws`) and greets the relay.
    pub async fn connect(url: &str, client_name: &str) -> anyhow::Result<Self> {
        let (ws, _) = connect_async(url)
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        let mut client = Self {
            ws,
            welcome: Msg::Pong { id: None },
        };
        client
            .send(&Msg::Hello {
                v: VERSION,
                client: Some(client_name.to_owned()),
                token: None,
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
        self.ws
            .send(Message::Text(codec::encode_text(msg).into()))
            .await?;
        Ok(())
    }

    /// The next protocol message; `None` once the relay has closed the connection.
    pub async fn recv(&mut self) -> anyhow::Result<Option<Msg>> {
        while let Some(frame) = self.ws.next().await {
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

    pub async fn close(mut self) -> anyhow::Result<()> {
        self.ws.close(None).await?;
        Ok(())
    }
}
