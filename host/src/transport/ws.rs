//! WebSocket: the upgrade at `/ws`, and the one task per connection that runs
//! a [`Session`] over it — a `select!` over inbound frames, the outbound
//! queue, the heartbeat and shutdown.
//!
//! Close codes: 1001 on shutdown or when a silent peer is reaped, 1002 on a
//! WebSocket protocol violation, 1008 when no `hello` came within the idle timeout, 1007 on invalid UTF-8 in a text frame, 1009 on
//! a message over `limits.max_message_bytes`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

use super::reply::{Body, json_error, refusal_response};
use crate::delivery::table::{ConnGuard, ConnState, Transport};
use crate::delivery::{Outbound, account_sent};
use crate::hooks::Handshake;
use crate::protocol::{Encoding, ErrorCode, codec};
use crate::quota::ConnQuota;
use crate::session::{Closing, Session, goaway};
use crate::state::Relay;

/// At most this many queued messages are written before one flush, so a busy
/// connection batches syscalls but still gets to its heartbeat and inbound.
const WRITE_BATCH: usize = 64;
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

/// Answers `GET /ws`: checks the handshake, asks admission, and on success
/// returns `101 Switching Protocols` and starts the connection's task.
pub fn upgrade(
    relay: Arc<Relay>,
    guard: Arc<ConnGuard>,
    mut req: hyper::Request<Incoming>,
) -> hyper::Response<Body> {
    let headers = req.headers();
    if !is_upgrade_request(headers) {
        return json_error(
            StatusCode::UPGRADE_REQUIRED,
            ErrorCode::BadFrame,
            "this endpoint speaks WebSocket: send Connection: Upgrade and Upgrade: websocket",
        );
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13")) {
        return json_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadFrame,
            "Sec-WebSocket-Version must be 13",
        );
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadFrame,
            "Sec-WebSocket-Key is missing",
        );
    };
    if relay.is_draining() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "the relay is shutting down",
        );
    }
    let handshake = Handshake {
        peer: guard.info().peer,
        path: req.uri().path(),
        query: req.uri().query().unwrap_or(""),
        headers,
    };
    let quota = match relay.admit_connection(&handshake) {
        Ok((grant, quota)) => {
            guard.info().record_grant(grant);
            quota
        }
        Err(refusal) => return refusal_response(&refusal),
    };
    let accept = derive_accept_key(key.as_bytes());

    let on_upgrade = hyper::upgrade::on(&mut req);
    let conn = guard.info().clone();
    let span = tracing::info_span!("ws", conn = conn.id, peer = %conn.peer);
    let task_relay = relay.clone();
    relay.tasks.spawn(
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

    let mut response = hyper::Response::new(Body::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    response
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

fn close_frame(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

/// Runs one WebSocket connection to its end.
pub async fn serve<S>(
    relay: Arc<Relay>,
    mut ws: WebSocketStream<S>,
    guard: Arc<ConnGuard>,
    quota: ConnQuota,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let conn = guard.info().clone();
    conn.set_transport(Transport::Ws);
    let (mut session, queue) = Session::open(relay.clone(), conn.clone(), quota);
    let mut encoding = Encoding::Text;
    let idle_timeout = relay.config.idle_timeout();
    let interval = relay.config.heartbeat_interval();
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let opened = Instant::now();
    let mut last_heard = opened;
    let mut goaway_sent = false;
    tracing::debug!("websocket open");

    let close = loop {
        // Checked here, after the previous turn wrote the last error out.
        if let Some(closing) = session.closing() {
            let code = match closing {
                Closing::Policy => CloseCode::Policy,
                Closing::Capacity(_) => CloseCode::Again,
            };
            break Some(CloseFrame {
                code,
                reason: closing.reason().into(),
            });
        }
        let mut outgoing: Vec<Outbound> = Vec::new();
        // Unbiased: a peer that never stops sending must not starve its own
        // deliveries or its heartbeat.
        tokio::select! {
            _ = relay.closing().cancelled() => {
                break Some(close_frame(CloseCode::Away, "relay shutting down"));
            }
            _ = relay.draining().cancelled(), if !goaway_sent => {
                goaway_sent = true;
                conn.set_state(ConnState::Draining);
                outgoing.push(goaway(&relay));
            }
            inbound = ws.next() => {
                let message = match inbound {
                    None => break None,
                    Some(Ok(message)) => message,
                    Some(Err(e)) => break close_for_error(e),
                };
                last_heard = Instant::now();
                let decoded = match message {
                    Message::Text(text) => {
                        if !session.greeted() {
                            encoding = Encoding::Text;
                        }
                        Some(codec::decode_text(&text))
                    }
                    Message::Binary(frame) => {
                        if !session.greeted() {
                            encoding = Encoding::Binary;
                        }
                        Some(codec::decode_binary(&frame))
                    }
                    Message::Close(_) => {
                        // tungstenite has queued the closing reply; push it out.
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.flush()).await;
                        break None;
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
                };
                if let Some(reply) = decoded.and_then(|decoded| session.receive(decoded)) {
                    outgoing.push(reply);
                }
            }
            batch = queue.next_batch(WRITE_BATCH) => match batch {
                Ok(batch) => outgoing.extend(batch),
                Err(reason) => break Some(CloseFrame {
                    code: CloseCode::Again,
                    reason: reason.into(),
                }),
            },
            _ = heartbeat.tick() => {
                // Libraries answer pings by themselves, so a client that never
                // says hello would otherwise look alive forever.
                if !session.greeted() && opened.elapsed() >= idle_timeout {
                    break Some(close_frame(CloseCode::Policy, "no hello within idle_timeout_ms"));
                }
                if last_heard.elapsed() >= idle_timeout {
                    tracing::info!(silent_ms = last_heard.elapsed().as_millis() as u64, "reaping silent connection");
                    break Some(close_frame(CloseCode::Away, "idle timeout"));
                }
                if send_all(&mut ws, std::iter::once(Message::Ping(Default::default())), idle_timeout).await.is_err() {
                    break None;
                }
            }
        }
        if outgoing.is_empty() {
            continue;
        }
        account_sent(&conn, &relay.metrics, &outgoing);
        let frames = outgoing.into_iter().map(|out| match encoding {
            Encoding::Text => Message::Text(out.text()),
            Encoding::Binary => Message::Binary(out.binary()),
        });
        // A consumer closed for being slow is usually blocked right here:
        // stop waiting for it and go to the close.
        tokio::select! {
            sent = send_all(&mut ws, frames, idle_timeout) => if sent.is_err() {
                tracing::debug!("peer stopped reading; dropping the connection");
                break None;
            },
            _ = queue.closed() => continue,
            _ = relay.closing().cancelled() => continue,
        }
    };

    conn.set_state(ConnState::Closing);
    // Undo subscriptions and registrations before the slow close handshake, so
    // pending requests fail at once and peers see presence drop.
    drop(session);
    if let Some(frame) = close {
        tracing::debug!(code = u16::from(frame.code), reason = %frame.reason, "closing");
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if ws.close(Some(frame)).await.is_ok() {
                // Wait for the peer's closing frame so it sees a clean close.
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
        .await;
    }
    tracing::debug!("websocket closed");
    drop(guard);
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

/// Maps a read error to the close frame the peer should get, if any.
fn close_for_error(error: WsError) -> Option<CloseFrame> {
    match error {
        WsError::Capacity(e) => {
            tracing::info!(error = %e, "message over the size limit");
            Some(close_frame(
                CloseCode::Size,
                "message larger than max_message_bytes",
            ))
        }
        WsError::Utf8(_) => Some(close_frame(
            CloseCode::Invalid,
            "text frame is not valid UTF-8",
        )),
        WsError::Protocol(e) => {
            tracing::debug!(error = %e, "websocket protocol violation");
            Some(close_frame(
                CloseCode::Protocol,
                "websocket protocol violation",
            ))
        }
        _ => None,
    }
}
