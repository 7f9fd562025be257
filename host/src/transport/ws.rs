//! WebSocket: the upgrade at `/ws`, and the WebSocket side of the connection
//! loop (`transport::conn`): text or binary frames, pings as heartbeat,
//! close frames.
//!
//! Close codes: 1001 on shutdown or when a silent peer is reaped, 1002 on a
//! WebSocket protocol violation, 1008 when no `hello` came within the idle timeout, 1007 on invalid UTF-8 in a text frame, 1009 on
//! a message over `limits.max_message_bytes`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tracing::Instrument;

use super::conn::{self, Close, Event, Link};
use super::reply::{Body, json_error, refusal_response};
use crate::delivery::Outbound;
use crate::delivery::table::{ConnGuard, Transport};
use crate::hooks::Handshake;
use crate::protocol::{Encoding, ErrorCode, batch, codec};
use crate::quota::ConnQuota;
use crate::session::Closing;
use crate::state::Relay;

/// How long a closing handshake may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

fn is_upgrade_request(headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

/// Checks a WebSocket upgrade request's handshake headers; the
/// `Sec-WebSocket-Accept` value to answer with, or the refusal.
#[allow(clippy::result_large_err)]
pub(crate) fn check_handshake(headers: &HeaderMap) -> Result<String, hyper::Response<Body>> {
    if !is_upgrade_request(headers) {
        return Err(json_error(
            StatusCode::UPGRADE_REQUIRED,
            ErrorCode::BadFrame,
            "this endpoint speaks WebSocket: send Connection: Upgrade and Upgrade: websocket",
        ));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13")) {
        return Err(json_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadFrame,
            "Sec-WebSocket-Version must be 13",
        ));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(json_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadFrame,
            "Sec-WebSocket-Key is missing",
        ));
    };
    Ok(derive_accept_key(key.as_bytes()))
}

/// `101 Switching Protocols` for a checked handshake.
pub(crate) fn switching_protocols(accept: &str) -> hyper::Response<Body> {
    let mut response = hyper::Response::new(super::reply::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(accept).expect("base64 is a valid header value"),
    );
    response
}

/// Answers `GET /ws`: checks the handshake, asks admission, and on success
/// returns `101 Switching Protocols` and starts the connection's task.
pub fn upgrade(
    relay: Arc<Relay>,
    guard: Arc<ConnGuard>,
    mut req: hyper::Request<Incoming>,
) -> hyper::Response<Body> {
    let accept = match check_handshake(req.headers()) {
        Ok(accept) => accept,
        Err(refused) => return refused,
    };
    if relay.is_draining() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "the relay is shutting down",
        );
    }
    let handshake = Handshake::of(guard.info().peer, &req);
    let quota = match relay.admit_connection(&handshake) {
        Ok((grant, quota)) => {
            guard.info().record_grant(grant);
            quota
        }
        Err(refusal) => return refusal_response(&refusal),
    };

    let on_upgrade = hyper::upgrade::on(&mut req);
    let conn = guard.info().clone();
    let span = tracing::info_span!("ws", conn = conn.id, peer = %conn.peer);
    let task_relay = relay.clone();
    relay.conn_tasks.spawn(
        async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let config = ws_config(&task_relay);
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    serve(task_relay, ws, guard, quota).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        }
        .instrument(span),
    );

    switching_protocols(&accept)
}

fn ws_config(relay: &Relay) -> WebSocketConfig {
    let max = relay.config.limits.max_message_bytes;
    // Small buffers: most connections are idle most of the time, and
    // tungstenite's 128 KiB default read buffer would dominate their memory.
    // Large bodies still arrive in large reads: `ReadAhead` under hyper
    // reads ahead during bursts.
    WebSocketConfig::default()
        .read_buffer_size(2 * 1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(max.saturating_mul(2).max(64 * 1024))
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

fn link_close(code: CloseCode, reason: &'static str) -> Close {
    Close::Link {
        code: u16::from(code).into(),
        reason: reason.into(),
    }
}

/// Runs one WebSocket connection to its end.
pub async fn serve<S>(
    relay: Arc<Relay>,
    ws: WebSocketStream<S>,
    guard: Arc<ConnGuard>,
    quota: ConnQuota,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    guard.info().set_transport(Transport::Ws);
    tracing::debug!("websocket open");
    let link = WsLink {
        ws,
        encoding: Encoding::Text,
        idle_timeout: relay.config.idle_timeout(),
    };
    conn::run(relay, link, guard, quota).await;
    tracing::debug!("websocket closed");
}

/// A WebSocket as the connection loop's [`Link`]: frames in the encoding
/// the peer's `hello` came in, pings as the heartbeat, close frames.
struct WsLink<S> {
    ws: WebSocketStream<S>,
    /// Chosen by the frame kind of the messages before `hello` is done.
    encoding: Encoding,
    idle_timeout: Duration,
}

impl<S> Link for WsLink<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    const REAPS_SILENT: bool = true;

    async fn next_event(&mut self, greeted: bool) -> Event {
        let message = match self.ws.next().await {
            None => return Event::End(None),
            Some(Ok(message)) => message,
            Some(Err(e)) => return Event::End(close_for_error(e)),
        };
        match message {
            Message::Text(text) => {
                if !greeted {
                    self.encoding = Encoding::Text;
                }
                Event::Message(codec::decode_text(&text))
            }
            Message::Binary(frame) => {
                if !greeted {
                    self.encoding = Encoding::Binary;
                }
                Event::Message(codec::decode_binary(&frame))
            }
            Message::Close(_) => {
                // tungstenite has queued the closing reply; push it out.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.flush()).await;
                Event::End(None)
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Event::Heard,
        }
    }

    async fn send(&mut self, batch: &[Outbound], batched: bool) -> Result<(), ()> {
        let encoding = self.encoding;
        if batched {
            let frames = pack(batch, encoding);
            return send_all(&mut self.ws, frames.into_iter(), self.idle_timeout).await;
        }
        let frames = batch.iter().map(|out| match encoding {
            Encoding::Text => text_frame(out.text(), || out.binary()),
            Encoding::Binary => Message::Binary(out.binary()),
        });
        send_all(&mut self.ws, frames, self.idle_timeout).await
    }

    async fn heartbeat(&mut self) -> Result<(), ()> {
        let ping = std::iter::once(Message::Ping(Default::default()));
        send_all(&mut self.ws, ping, self.idle_timeout).await
    }

    fn instance_silence(&self) -> Option<Duration> {
        // The relay's pings reap a vanished peer within the idle timeout.
        None
    }

    async fn close(mut self, close: Option<Close>) {
        let Some(close) = close else { return };
        let frame = close_frame_for(close);
        tracing::debug!(code = u16::from(frame.code), reason = %frame.reason, "closing");
        let ws = &mut self.ws;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if ws.close(Some(frame)).await.is_ok() {
                // Wait for the peer's closing frame so it sees a clean close.
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
        .await;
    }
}

/// The close frame for why the relay closes (PROTOCOL.md §3.3).
fn close_frame_for(close: Close) -> CloseFrame {
    let (code, reason): (CloseCode, String) = match close {
        Close::Shutdown => (CloseCode::Away, "relay shutting down".into()),
        Close::Session(closing @ Closing::Policy) => (CloseCode::Policy, closing.reason()),
        Close::Session(closing @ Closing::Capacity(_)) => (CloseCode::Again, closing.reason()),
        Close::SlowConsumer(reason) => (CloseCode::Again, reason),
        Close::NoHello => (CloseCode::Policy, "no hello within idle_timeout_ms".into()),
        Close::Idle | Close::InstanceSilent => (CloseCode::Away, "idle timeout".into()),
        Close::Link { code, reason } => (CloseCode::from(code as u16), reason.into_owned()),
    };
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

/// Writes frames and flushes, giving up when the peer will not take them
/// within `timeout` (a peer that stopped reading).
async fn send_all<S>(
    ws: &mut WebSocketStream<S>,
    frames: impl Iterator<Item = Message>,
    timeout: Duration,
) -> Result<(), ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let write = async {
        for frame in frames {
            ws.feed(frame).await?;
        }
        ws.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// A text frame of JSON the relay encoded. The check cannot fail (the JSON
/// was made from `String`s); should it ever, the binary form still decodes
/// on every client.
fn text_frame(json: Bytes, binary: impl FnOnce() -> Bytes) -> Message {
    match Utf8Bytes::try_from(json) {
        Ok(json) => Message::Text(json),
        Err(_) => Message::Binary(binary()),
    }
}

/// Packs `batch` into as few frames as [`batch::MAX_BATCH_BYTES`] allows,
/// in order (PROTOCOL §2.1); a message larger than that goes alone.
fn pack(batch: &[Outbound], encoding: Encoding) -> Vec<Message> {
    let encoded: Vec<Bytes> = batch
        .iter()
        .map(|out| match encoding {
            Encoding::Text => out.text(),
            Encoding::Binary => out.binary(),
        })
        .collect();
    let join = |range: std::ops::Range<usize>| -> Message {
        let parts = encoded[range.clone()].iter().map(|e| e.as_ref());
        match encoding {
            Encoding::Text => text_frame(batch::join_text(parts), || {
                let binary: Vec<Bytes> = batch[range].iter().map(Outbound::binary).collect();
                batch::join_binary(binary.iter().map(|b| b.as_ref()))
            }),
            Encoding::Binary => Message::Binary(batch::join_binary(parts)),
        }
    };
    let mut frames = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, message) in encoded.iter().enumerate() {
        let added = message.len() + crate::protocol::quic::LENGTH_BYTES;
        if i > start && size + added > batch::MAX_BATCH_BYTES {
            frames.push(join(start..i));
            (start, size) = (i, 0);
        }
        size += added;
    }
    if start < encoded.len() {
        frames.push(join(start..encoded.len()));
    }
    frames
}

/// Maps a read error to the close the peer should get, if any.
fn close_for_error(error: WsError) -> Option<Close> {
    match error {
        WsError::Capacity(e) => {
            tracing::info!(error = %e, "message over the size limit");
            Some(link_close(
                CloseCode::Size,
                "message larger than max_message_bytes",
            ))
        }
        WsError::Utf8(_) => Some(link_close(
            CloseCode::Invalid,
            "text frame is not valid UTF-8",
        )),
        WsError::Protocol(e) => {
            tracing::debug!(error = %e, "websocket protocol violation");
            Some(link_close(
                CloseCode::Protocol,
                "websocket protocol violation",
            ))
        }
        _ => None,
    }
}
