//! The QUIC link: one bidirectional control stream of length-prefixed
//! frames, plus a unidirectional stream per bulk body or file transfer in
//! either direction (PROTOCOL.md §1.1, §6.4). Reader tasks turn streams into whole frames so a
//! caller's `select!` never cancels a half-read frame.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use wasmrelay_protocol::quic::{ALPN, FrameError, FrameReader, read_frame};

use crate::{Error, Trust};

/// The largest frame a client accepts: the most `max_message_bytes` can be.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// One message received over QUIC, and whether it came on a bulk stream.
#[derive(Debug)]
pub struct QuicFrame {
    pub message: Bytes,
    pub bulk: bool,
}

/// An open QUIC connection with its control stream.
pub(crate) struct QuicLink {
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
    pub control: quinn::SendStream,
    pub inbox: mpsc::Receiver<Result<QuicFrame, FrameError>>,
}

/// Connects to `authority` (`HOST:PORT`) and opens the control stream. The
/// certificate must be valid for `server_name` (the host by default).
pub(crate) async fn connect(
    authority: &str,
    server_name: Option<&str>,
    trust: &Trust,
) -> Result<QuicLink, Error> {
    let addr = resolve(authority)?;
    let host = server_name.unwrap_or_else(|| host_of(authority));
    let tls = trust.client_config(ALPN, true, false)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Tls(rustls::Error::General(e.to_string())))?;
    let endpoint = endpoint_for(addr).map_err(|source| Error::Connect {
        target: authority.to_owned(),
        source,
    })?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    let connection = endpoint.connect_with(config, addr, host)?.await?;
    let (control, recv) = connection.open_bi().await?;
    Ok(QuicLink {
        inbox: inbox(connection.clone(), recv),
        endpoint,
        connection,
        control,
    })
}

fn resolve(authority: &str) -> Result<SocketAddr, Error> {
    let unreachable = |source| Error::Connect {
        target: authority.to_owned(),
        source,
    };
    authority
        .to_socket_addrs()
        .map_err(unreachable)?
        .next()
        .ok_or_else(|| unreachable(std::io::ErrorKind::NotFound.into()))
}

/// The host part of `HOST:PORT` or `[V6]:PORT`.
pub(crate) fn host_of(authority: &str) -> &str {
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_matches(['[', ']'])
}

fn endpoint_for(addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(bind)
}

/// Client transport settings: keep-alives, so an idle connection stays up
/// and a relay's close is noticed even when its CONNECTION_CLOSE packet was
/// lost (a closed peer answers any later packet with another one).
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport
}

/// Whole frames from the control stream and from every bulk stream the relay
/// opens, in arrival order. Ends once the connection does.
pub fn inbox(
    connection: quinn::Connection,
    control: quinn::RecvStream,
) -> mpsc::Receiver<Result<QuicFrame, FrameError>> {
    let tag = |bulk| move |message| QuicFrame { message, bulk };
    let (tx, rx) = mpsc::channel(64);
    let control_tx = tx.clone();
    tokio::spawn(async move {
        let mut control = FrameReader::new(control, MAX_FRAME);
        loop {
            let frame = control.next().await;
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
            // One bulk body, or the messages of one download: every frame
            // until the stream finishes.
            tokio::spawn(async move {
                while let Some(item) = read_frame(&mut bulk, MAX_FRAME, None)
                    .await
                    .transpose()
                    .map(|r| r.map(tag(true)))
                {
                    let failed = item.is_err();
                    if tx.send(item).await.is_err() || failed {
                        return;
                    }
                }
            });
        }
    });
    rx
}
