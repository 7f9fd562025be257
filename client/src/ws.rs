//! The WebSocket link, plain (`ws://`) or over TLS (`wss://`), split into a
//! sending and a receiving half. Nagle is off, as on the relay: small
//! frames must not wait.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Sink, Stream, StreamExt};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::quic::host_of;
use crate::{Error, Trust};

pub(crate) type WsSink = Pin<Box<dyn Sink<Message, Error = tungstenite::Error> + Send>>;
pub(crate) type WsSource = Pin<Box<dyn Stream<Item = Result<Message, tungstenite::Error>> + Send>>;

/// Connects to `url` (`ws://` or `wss://`) and upgrades.
pub(crate) async fn connect(
    url: &str,
    server_name: Option<&str>,
    trust: &Trust,
) -> Result<(WsSink, WsSource), Error> {
    let (secure, rest) = if let Some(rest) = url.strip_prefix("wss://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("ws://") {
        (false, rest)
    } else {
        return Err(Error::Url {
            url: url.to_owned(),
            reason: "expected ws://, wss:// or quic://",
        });
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let default_port = if secure { 443 } else { 80 };
    let target = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:{default_port}")
    };
    if authority.is_empty() {
        return Err(Error::Url {
            url: url.to_owned(),
            reason: "no host",
        });
    }
    let tcp = TcpStream::connect(&target)
        .await
        .map_err(|source| Error::Connect {
            target: target.clone(),
            source,
        })?;
    tcp.set_nodelay(true)?;
    let (sink, source): (WsSink, WsSource) = if secure {
        let tls = trust.client_config(b"http/1.1", false, true)?;
        let name = server_name.unwrap_or_else(|| host_of(&target)).to_owned();
        let name = ServerName::try_from(name).map_err(|_| Error::Url {
            url: url.to_owned(),
            reason: "the host is not a valid TLS server name",
        })?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|source| Error::Connect { target, source })?;
        let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
        let (sink, source) = ws.split();
        (Box::pin(sink), Box::pin(source))
    } else {
        let (ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
        let (sink, source) = ws.split();
        (Box::pin(sink), Box::pin(source))
    };
    Ok((sink, source))
}
