//! QUIC (quinn, ALPN `wasmrelay/1`): the same protocol as WebSocket over one
//! bidirectional control stream per connection, carrying length-prefixed
//! binary frames (`u32 big-endian length | binary message`, the binary
//! message being exactly a WebSocket binary frame). One task per connection
//! runs a [`Session`]; a reader task turns the stream into whole frames so
//! the session's `select!` never cancels a half-read frame. QUIC's own
//! keep-alive and idle timeout replace WebSocket pings.
//!
//! Application close codes are in [`close`] and PROTOCOL.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::hooks::{Admit, Handshake};
use crate::protocol::codec;
use crate::relay::Relay;
use crate::session::table::{ConnGuard, ConnState, Transport};
use crate::session::{Outbound, Session, account_sent, goaway, take_batch};

/// QUIC application error codes the relay closes connections with.
pub mod close {
    /// The relay is shutting down (after `goaway`).
    pub const SHUTDOWN: u32 = 0x1;
    /// Framing broken: the control stream ended mid-frame, or a length that
    /// cannot be a frame.
    pub const PROTOCOL: u32 = 0x2;
    /// A frame over `max_message_bytes`.
    pub const TOO_LARGE: u32 = 0x3;
    /// No `hello` within the idle timeout.
    pub const NO_HELLO: u32 = 0x4;
    /// Admission refused the connection; the reason is `code: message`.
    pub const REFUSED: u32 = 0x5;
    /// No control stream opened within the idle timeout.
    pub const NO_CONTROL_STREAM: u32 = 0x6;
}

const LENGTH_BYTES: usize = 4;
/// Whole frames waiting for the session; the reader blocks (and QUIC flow
/// control pushes back on the peer) when the session falls behind.
const INBOUND_FRAMES: usize = 64;
const WRITE_BATCH: usize = 64;
/// How often a QUIC row's path figures (RTT, loss, window) are refreshed.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// A length-prefixed frame for the control stream.
pub fn frame(message: &Bytes) -> Bytes {
    let mut out = BytesMut::with_capacity(LENGTH_BYTES + message.len());
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// Accepts QUIC connections until the relay starts draining.
pub async fn accept_loop(relay: Arc<Relay>, endpoint: quinn::Endpoint) {
    let local = endpoint
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    loop {
        let incoming = tokio::select! {
            _ = relay.draining().cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let peer = incoming.remote_address();
        let guard = Arc::new(relay.table.open(peer, local));
        guard.info().set_transport(Transport::Quic);
        relay.metrics.connection_accepted();
        let span = tracing::debug_span!("quic", conn = guard.info().id, %peer);
        relay.tasks.spawn(tracing::Instrument::instrument(
            handle(relay.clone(), incoming, guard),
            span,
        ));
    }
    // New connection attempts are refused from here on; live ones close in `serve`.
    endpoint.set_server_config(None);
    tracing::info!("stopped accepting QUIC connections");
}

async fn handle(relay: Arc<Relay>, incoming: quinn::Incoming, guard: Arc<ConnGuard>) {
    // The handshake: a wrong ALPN or a bad certificate fails here with a TLS alert.
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(e) => {
            tracing::debug!(error = %e, "QUIC handshake failed");
            return;
        }
    };
    let headers = http::HeaderMap::new();
    let handshake = Handshake {
        peer: connection.remote_address(),
        path: "quic",
        query: "",
        headers: &headers,
    };
    match relay.admission().admit(&handshake) {
        Admit::Allow(grant) => guard.info().record_grant(grant),
        Admit::Deny { code, reason, .. } => {
            connection.close(
                close::REFUSED.into(),
                format!("{code}: {reason}").as_bytes(),
            );
            return;
        }
    }
    let idle = relay.config.idle_timeout();
    let (send, recv) = match tokio::time::timeout(idle, connection.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "connection ended before its control stream");
            return;
        }
        Err(_) => {
            connection.close(close::NO_CONTROL_STREAM.into(), b"no control stream opened");
            return;
        }
    };
    serve(relay, connection, send, recv, guard).await;
}

/// Why the reader stopped.
enum ReadEnd {
    /// The peer finished the stream or the connection ended.
    Closed,
    TooLarge(usize),
    /// The stream ended in the middle of a frame.
    Truncated,
}

/// Reads whole frames from the control stream into `frames`.
async fn read_frames(
    mut recv: quinn::RecvStream,
    max: usize,
    frames: mpsc::Sender<Result<Bytes, ReadEnd>>,
) {
    let end = loop {
        let mut length = [0u8; LENGTH_BYTES];
        match recv.read_exact(&mut length).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => break ReadEnd::Closed,
            Err(quinn::ReadExactError::FinishedEarly(_)) => break ReadEnd::Truncated,
            Err(quinn::ReadExactError::ReadError(_)) => break ReadEnd::Closed,
        }
        let length = u32::from_be_bytes(length) as usize;
        if length > max {
            break ReadEnd::TooLarge(length);
        }
        let mut body = vec![0u8; length];
        match recv.read_exact(&mut body).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(_)) => break ReadEnd::Truncated,
            Err(quinn::ReadExactError::ReadError(_)) => break ReadEnd::Closed,
        }
        if frames.send(Ok(Bytes::from(body))).await.is_err() {
            return;
        }
    };
    let _ = frames.send(Err(end)).await;
}

async fn serve(
    relay: Arc<Relay>,
    connection: quinn::Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    guard: Arc<ConnGuard>,
) {
    let conn = guard.info().clone();
    let max = relay.config.limits.max_message_bytes;
    let (frames_tx, mut frames) = mpsc::channel(INBOUND_FRAMES);
    let reader = tokio::spawn(read_frames(recv, max, frames_tx));
    let (mut session, mut rx) = Session::open(relay.clone(), conn.clone());
    let idle_timeout = relay.config.idle_timeout();
    let interval = relay.config.heartbeat_interval();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let opened = Instant::now();
    let mut goaway_sent = false;
    let mut stats_tick = tokio::time::interval(STATS_INTERVAL);
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::debug!("QUIC control stream open");

    let close: Option<(u32, &'static str)> = loop {
        let mut outgoing: Vec<Outbound> = Vec::new();
        tokio::select! {
            _ = relay.closing().cancelled() => break Some((close::SHUTDOWN, "relay shutting down")),
            _ = relay.draining().cancelled(), if !goaway_sent => {
                goaway_sent = true;
                conn.set_state(ConnState::Draining);
                outgoing.push(goaway(&relay));
            }
            inbound = frames.recv() => match inbound {
                None | Some(Err(ReadEnd::Closed)) => break None,
                Some(Err(ReadEnd::TooLarge(length))) => {
                    tracing::info!(length, max, "frame over the size limit");
                    break Some((close::TOO_LARGE, "frame larger than max_message_bytes"));
                }
                Some(Err(ReadEnd::Truncated)) => break Some((close::PROTOCOL, "control stream ended mid-frame")),
                Some(Ok(message)) => {
                    let wire = (LENGTH_BYTES + message.len()) as u64;
                    conn.bytes_in.fetch_add(wire, Ordering::Relaxed);
                    relay.metrics.bytes_in(wire);
                    if let Some(reply) = session.receive(codec::decode_binary(&message)) {
                        outgoing.push(reply);
                    }
                }
            },
            Some(out) = rx.recv() => take_batch(&mut rx, out, &mut outgoing, WRITE_BATCH),
            _ = tick.tick() => {
                if !session.greeted() && opened.elapsed() >= idle_timeout {
                    break Some((close::NO_HELLO, "no hello within idle_timeout_ms"));
                }
            }
            _ = stats_tick.tick() => record_stats(&connection, &conn),
        }
        if outgoing.is_empty() {
            continue;
        }
        let mut batch = BytesMut::new();
        for out in &outgoing {
            batch.put_slice(&frame(&out.binary()));
        }
        let bytes = batch.len() as u64;
        // QUIC flow control is the backpressure: a peer that stops reading
        // stalls this write, bounded by the idle timeout.
        match tokio::time::timeout(idle_timeout, send.write_all(&batch)).await {
            Ok(Ok(())) => {}
            _ => break None,
        }
        account_sent(&conn, &relay.metrics, &outgoing);
        conn.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        relay.metrics.bytes_out(bytes);
    };

    conn.set_state(ConnState::Closing);
    drop(session);
    reader.abort();
    if let Some((code, reason)) = close {
        tracing::debug!(code, reason, "closing");
        let _ = send.finish();
        connection.close(code.into(), reason.as_bytes());
    }
    tracing::debug!("QUIC connection closed");
    drop(guard);
}

/// Copies quinn's path figures into the connection's table row.
fn record_stats(connection: &quinn::Connection, conn: &crate::session::table::ConnInfo) {
    let stats = connection.stats();
    let figures = crate::session::table::QuicFigures {
        rtt_us: stats.path.rtt.as_micros() as u64,
        cwnd_bytes: stats.path.cwnd,
        lost_packets: stats.path.lost_packets,
        sent_packets: stats.path.sent_packets,
        congestion_events: stats.path.congestion_events,
        udp_rx_bytes: stats.udp_rx.bytes,
        udp_tx_bytes: stats.udp_tx.bytes,
    };
    conn.update_detail(|d| d.quic = Some(figures));
}

/// quinn's transport settings from the relay's heartbeat configuration.
pub fn transport_config(idle_timeout: Duration, keep_alive: Duration) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok())
        .keep_alive_interval(Some(keep_alive))
        // One control stream plus room for bulk streams; more are refused by flow control.
        .max_concurrent_bidi_streams(16u32.into())
        .max_concurrent_uni_streams(0u32.into());
    transport
}
