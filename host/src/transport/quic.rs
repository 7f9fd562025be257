//! QUIC (quinn, ALPN `wasmrelay/1`): the same protocol as WebSocket. One
//! bidirectional control stream per connection carries length-prefixed
//! binary frames (`u32 big-endian length | binary message`, the binary
//! message being exactly a WebSocket binary frame). Every bulk body — a
//! `request` or `response` whose payload reaches [`BULK_THRESHOLD`](crate::protocol::quic::BULK_THRESHOLD) — travels
//! as one frame on a unidirectional stream of its own, in either direction,
//! so a large body never holds control messages up behind it. QUIC's flow
//! control is the backpressure on both kinds of stream.
//!
//! One task per connection runs a [`Session`]; reader tasks turn streams into
//! whole frames so the session's `select!` never cancels a half-read frame.
//! QUIC's own keep-alive and idle timeout replace WebSocket pings.
//!
//! Application close codes are in [`close`], stream error codes in
//! [`stream_code`] (both in the protocol crate), and in PROTOCOL.md §1.1.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::admit::{Accepted, Admissions};
use super::conn::{self, Close, Event, Link};
use crate::delivery::Outbound;
use crate::delivery::table::{ConnGuard, ConnInfo, Transport};
use crate::hooks::Handshake;
use crate::protocol::quic::{
    FrameError, FrameReader, LENGTH_BYTES, MAX_BULK_STREAMS, close, is_bulk, length_prefix,
    read_frame, stream_code, write_frame,
};
use crate::protocol::{ErrorCode, Msg, codec};
use crate::quota::ConnQuota;
use crate::session::Closing;
use crate::state::Relay;
use crate::transfer::sink::{Sent, TransferSink, TransferStreams};

/// Whole frames waiting for the session; readers block (and QUIC flow
/// control pushes back on the peer) when the session falls behind.
const INBOUND_FRAMES: usize = 64;
/// Bulk bodies are written in pieces so a stalled peer is noticed per piece.
const BULK_WRITE_CHUNK: usize = 64 * 1024;
/// Unacknowledged bytes quinn may hold for one connection.
const SEND_WINDOW: u64 = 2 * 1024 * 1024;
/// How often a QUIC row's path figures (RTT, loss, window) are refreshed.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// How long bulk writes still in flight get when the relay closes a connection.
const BULK_FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);

/// Accepts QUIC connections until the relay starts draining.
pub async fn accept_loop(relay: Arc<Relay>, endpoint: quinn::Endpoint) {
    let local = endpoint
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let admissions = Admissions::default();
    let handshakes = Arc::new(AtomicUsize::new(0));
    loop {
        let incoming = tokio::select! {
            _ = relay.draining().cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let peer = incoming.remote_address();
        // Handshakes cost state until they finish or time out; under a flood
        // of Initials, make clients prove their address first (Retry), and
        // past the cap refuse them before any state is kept.
        let in_progress = handshakes.load(Ordering::Relaxed);
        if in_progress >= relay.config.server.quic_max_handshakes {
            relay
                .metrics
                .refused(crate::metrics::RefusedFor::HandshakeCap);
            incoming.refuse();
            continue;
        }
        if in_progress >= relay.config.server.quic_retry_above
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            if let Err(e) = incoming.retry() {
                tracing::debug!(error = %e, "QUIC retry failed");
            }
            continue;
        }
        // The caps hold for QUIC as for TCP: a place is taken before the
        // handshake. Over a cap, the client is told why after the handshake
        // while few such refusals are in progress, and refused outright
        // (CONNECTION_REFUSED, no handshake) beyond that.
        let (guard, refusal) = match admissions.accept(&relay, peer, local) {
            Accepted::Admitted(guard) => (guard, None),
            Accepted::Refusing(guard, refusal) => (guard, Some(refusal)),
            Accepted::Dropped(_) => {
                incoming.refuse();
                continue;
            }
        };
        let guard = Arc::new(guard);
        guard.info().set_transport(Transport::Quic);
        relay.metrics.connection_accepted();
        let span = tracing::debug_span!("quic", conn = guard.info().id, %peer);
        let handshake = HandshakeInProgress::new(&handshakes);
        relay.conn_tasks.spawn(tracing::Instrument::instrument(
            handle(relay.clone(), incoming, guard, refusal, handshake),
            span,
        ));
    }
    // New connection attempts are refused from here on; live ones close in `serve`.
    endpoint.set_server_config(None);
    tracing::info!("stopped accepting QUIC connections");
}

/// Counts a QUIC handshake in progress until dropped.
struct HandshakeInProgress(Arc<AtomicUsize>);

impl HandshakeInProgress {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for HandshakeInProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(
    relay: Arc<Relay>,
    incoming: quinn::Incoming,
    guard: Arc<ConnGuard>,
    refusal: Option<crate::quota::Refusal>,
    in_progress: HandshakeInProgress,
) {
    // The handshake: a wrong ALPN or a bad certificate fails here with a TLS alert.
    let handshake = tokio::time::timeout(relay.config.tls_handshake_timeout(), incoming);
    let handshake = handshake.await;
    drop(in_progress);
    let connection = match handshake {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            relay
                .metrics
                .refused(crate::metrics::RefusedFor::SlowHandshake);
            tracing::debug!("QUIC handshake timed out");
            return;
        }
    };
    if let Some(refusal) = refusal {
        connection.close(
            close::REFUSED.into(),
            format!("{}: {}", refusal.code, refusal.reason).as_bytes(),
        );
        return;
    }
    let headers = http::HeaderMap::new();
    let handshake = Handshake {
        peer: connection.remote_address(),
        path: "quic",
        query: "",
        headers: &headers,
    };
    let quota = match relay.admit_connection(&handshake) {
        Ok((grant, quota)) => {
            guard.info().record_grant(grant);
            quota
        }
        Err(refusal) => {
            connection.close(
                close::REFUSED.into(),
                format!("{}: {}", refusal.code, refusal.reason).as_bytes(),
            );
            return;
        }
    };
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
    serve(relay, connection, send, recv, guard, quota).await;
}

/// What the reader tasks hand the connection task.
enum Inbound {
    /// A whole frame, from the control stream or a bulk stream.
    Frame(Bytes),
    /// The control stream ended: cleanly (`None`) or not.
    ControlEnd(Option<FrameError>),
    /// A bulk stream failed; only its message is lost.
    BulkFailed(FrameError),
}

/// Reads whole frames from the control stream until it ends.
async fn read_control(recv: quinn::RecvStream, max: usize, inbound: mpsc::Sender<Inbound>) {
    // Many small frames per read of the stream, not two reads per frame.
    let mut frames = FrameReader::new(recv, max);
    loop {
        let item = match frames.next().await {
            Ok(Some(frame)) => Inbound::Frame(frame),
            Ok(None) => Inbound::ControlEnd(None),
            Err(e) => Inbound::ControlEnd(Some(e)),
        };
        let ended = matches!(item, Inbound::ControlEnd(_));
        if inbound.send(item).await.is_err() || ended {
            return;
        }
    }
}

/// Reads the frames of a unidirectional stream until it finishes: one bulk
/// body, or the chunks of one upload.
async fn read_bulk(
    mut recv: quinn::RecvStream,
    max: usize,
    stall: Duration,
    inbound: mpsc::Sender<Inbound>,
) {
    let mut frames = 0usize;
    loop {
        let item = match read_frame(&mut recv, max, Some(stall)).await {
            Ok(Some(frame)) => Inbound::Frame(frame),
            Ok(None) if frames > 0 => return,
            Ok(None) => Inbound::BulkFailed(FrameError::Truncated),
            Err(e) => {
                let code = match e {
                    FrameError::TooLarge(_) => Some(stream_code::TOO_LARGE),
                    FrameError::Stalled => Some(stream_code::STALLED),
                    _ => None,
                };
                if let Some(code) = code {
                    let _ = recv.stop(code.into());
                }
                Inbound::BulkFailed(e)
            }
        };
        let failed = matches!(item, Inbound::BulkFailed(_));
        // Waiting here while the session is behind stops reading the
        // stream: QUIC flow control then holds the sender back.
        if inbound.send(item).await.is_err() || failed {
            return;
        }
        frames += 1;
    }
}

/// A stream per transfer (PROTOCOL §6.4): a download's `download_ready`
/// and its chunks travel on a unidirectional stream of their own, finished
/// after the last chunk, so a file never holds up the control stream or
/// another transfer, and the peer's flow control paces it.
struct QuicStreams {
    connection: quinn::Connection,
    conn: Arc<ConnInfo>,
    relay: Arc<Relay>,
    stall: Duration,
}

impl TransferStreams for QuicStreams {
    fn open(&self, _chunk_size: u32) -> Box<dyn TransferSink> {
        Box::new(QuicSink {
            connection: self.connection.clone(),
            conn: self.conn.clone(),
            relay: self.relay.clone(),
            stall: self.stall,
            stream: None,
            finished: false,
        })
    }
}

struct QuicSink {
    connection: quinn::Connection,
    conn: Arc<ConnInfo>,
    relay: Arc<Relay>,
    stall: Duration,
    /// Opened with the first message.
    stream: Option<quinn::SendStream>,
    finished: bool,
}

impl QuicSink {
    async fn write(&mut self, msg: Msg) -> Result<(), String> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let opened = tokio::time::timeout(self.stall, self.connection.open_uni())
                    .await
                    .map_err(|_| "no stream credit for idle_timeout_ms".to_owned())?
                    .map_err(|e| e.to_string())?;
                self.stream.insert(opened)
            }
        };
        let message = codec::encode_binary(&msg);
        let wire = (LENGTH_BYTES + message.len()) as u64;
        match tokio::time::timeout(self.stall, write_frame(stream, message)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the peer took nothing for idle_timeout_ms".to_owned()),
        }
        self.conn.bytes_out.fetch_add(wire, Ordering::Relaxed);
        self.relay.metrics.bytes_out(wire);
        Ok(())
    }
}

impl TransferSink for QuicSink {
    fn send(&mut self, msg: Msg) -> Sent<'_> {
        Box::pin(self.write(msg))
    }

    fn finish(&mut self) -> Sent<'_> {
        self.finished = true;
        let result = match &mut self.stream {
            Some(stream) => stream.finish().map_err(|e| e.to_string()),
            None => Ok(()),
        };
        Box::pin(async move { result })
    }
}

impl Drop for QuicSink {
    fn drop(&mut self) {
        // Cut short (cancelled, or the file failed): say so, rather than
        // letting the stream end as if the transfer were complete.
        if let (Some(stream), false) = (&mut self.stream, self.finished) {
            let _ = stream.reset(stream_code::ABORTED.into());
        }
    }
}

/// The `error` a client gets for a bulk stream that carried no whole message.
fn bulk_failure(error: &FrameError, max: usize) -> Option<Msg> {
    let (code, message) = match error {
        FrameError::Lost => return None,
        FrameError::TooLarge(length) => (
            ErrorCode::TooLarge,
            format!(
                "bulk stream frame of {length} bytes is over max_message_bytes ({max}); \
                 the stream was stopped with code 0x3"
            ),
        ),
        FrameError::Stalled => (
            ErrorCode::BadFrame,
            "bulk stream made no progress for idle_timeout_ms; stopped with code 0x7".to_owned(),
        ),
        other => (
            ErrorCode::BadFrame,
            format!("bulk stream discarded: {other}; nothing of it was delivered"),
        ),
    };
    Some(Msg::error(code, message, None))
}

/// Why a bulk write did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum BulkWriteError {
    #[error("no stream credit or no progress within the idle timeout")]
    Stalled,
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Closed(#[from] quinn::ClosedStream),
}

/// Sends one message as the single frame of a new unidirectional stream;
/// returns the bytes written.
async fn write_bulk(
    connection: quinn::Connection,
    message: Bytes,
    stall: Duration,
) -> Result<u64, BulkWriteError> {
    let mut send = tokio::time::timeout(stall, connection.open_uni())
        .await
        .map_err(|_| BulkWriteError::Stalled)??;
    let length = length_prefix(&message);
    // Slices of the message, handed to quinn without copying.
    let pieces = (0..message.len())
        .step_by(BULK_WRITE_CHUNK)
        .map(|start| message.slice(start..(start + BULK_WRITE_CHUNK).min(message.len())));
    for piece in std::iter::once(length).chain(pieces) {
        match tokio::time::timeout(stall, send.write_chunk(piece)).await {
            Ok(written) => written?,
            Err(_) => {
                let _ = send.reset(stream_code::STALLED.into());
                return Err(BulkWriteError::Stalled);
            }
        }
    }
    send.finish()?;
    Ok((LENGTH_BYTES + message.len()) as u64)
}

fn record_bulk_write(
    done: Result<Result<u64, BulkWriteError>, tokio::task::JoinError>,
    conn: &ConnInfo,
    relay: &Relay,
) {
    match done {
        Ok(Ok(bytes)) => {
            conn.bytes_out.fetch_add(bytes, Ordering::Relaxed);
            relay.metrics.bytes_out(bytes);
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "bulk write failed"),
        Err(e) => tracing::debug!(error = %e, "bulk writer ended"),
    }
}

/// Runs one QUIC connection to its end: the connection loop over a
/// [`QuicLink`].
async fn serve(
    relay: Arc<Relay>,
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    guard: Arc<ConnGuard>,
    quota: ConnQuota,
) {
    let max = relay.config.limits.max_message_bytes;
    let (inbound_tx, inbound) = mpsc::channel(INBOUND_FRAMES);
    let control_reader = tokio::spawn(read_control(recv, max, inbound_tx.clone()));
    let mut stats_tick = tokio::time::interval(STATS_INTERVAL);
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::debug!("QUIC control stream open");
    let link = QuicLink {
        conn: guard.info().clone(),
        relay: relay.clone(),
        connection,
        send,
        inbound,
        inbound_tx,
        control_reader,
        bulk_readers: JoinSet::new(),
        bulk_writers: JoinSet::new(),
        accepting_bulk: true,
        max,
        idle_timeout: relay.config.idle_timeout(),
        stats_tick,
    };
    conn::run(relay, link, guard, quota).await;
    tracing::debug!("QUIC connection closed");
}

/// A QUIC connection as the connection loop's [`Link`]: whole frames from
/// the control stream and from bulk streams (each read by a task of its own,
/// so the loop never cancels a half-read frame), control frames batched into
/// one write, each bulk body on a stream of its own. QUIC's keep-alive and
/// idle timeout stand in for pings; instances must ping (PROTOCOL §3.2).
struct QuicLink {
    conn: Arc<ConnInfo>,
    relay: Arc<Relay>,
    connection: quinn::Connection,
    send: quinn::SendStream,
    inbound: mpsc::Receiver<Inbound>,
    /// For the bulk readers this link starts.
    inbound_tx: mpsc::Sender<Inbound>,
    control_reader: tokio::task::JoinHandle<()>,
    // Dropping these sets aborts the bulk readers and writers with the link.
    bulk_readers: JoinSet<()>,
    bulk_writers: JoinSet<Result<u64, BulkWriteError>>,
    accepting_bulk: bool,
    max: usize,
    idle_timeout: Duration,
    stats_tick: tokio::time::Interval,
}

impl Link for QuicLink {
    const REAPS_SILENT: bool = false;

    async fn next_event(&mut self, _greeted: bool) -> Event {
        tokio::select! {
            item = self.inbound.recv() => match item {
                None | Some(Inbound::ControlEnd(None | Some(FrameError::Lost))) => Event::End(None),
                Some(Inbound::ControlEnd(Some(FrameError::TooLarge(length)))) => {
                    tracing::info!(length, max = self.max, "frame over the size limit");
                    Event::End(Some(link_close(close::TOO_LARGE, "frame larger than max_message_bytes")))
                }
                Some(Inbound::ControlEnd(Some(e))) => {
                    tracing::debug!(error = %e, "control stream broken");
                    Event::End(Some(link_close(close::PROTOCOL, "control stream ended mid-frame")))
                }
                Some(Inbound::BulkFailed(e)) => {
                    tracing::debug!(error = %e, "bulk stream failed");
                    match bulk_failure(&e, self.max) {
                        Some(reply) => Event::Reply(reply),
                        None => Event::Nothing,
                    }
                }
                Some(Inbound::Frame(message)) => {
                    let wire = (LENGTH_BYTES + message.len()) as u64;
                    self.conn.bytes_in.fetch_add(wire, Ordering::Relaxed);
                    self.relay.metrics.bytes_in(wire);
                    Event::Message(codec::decode_binary(&message))
                }
            },
            stream = self.connection.accept_uni(), if self.accepting_bulk => {
                match stream {
                    Ok(recv) => {
                        let reader = read_bulk(recv, self.max, self.idle_timeout, self.inbound_tx.clone());
                        self.bulk_readers.spawn(reader);
                    }
                    // The connection is going; the control reader reports how.
                    Err(_) => self.accepting_bulk = false,
                }
                Event::Nothing
            }
            Some(_) = self.bulk_readers.join_next(), if !self.bulk_readers.is_empty() => Event::Nothing,
            Some(done) = self.bulk_writers.join_next(), if !self.bulk_writers.is_empty() => {
                record_bulk_write(done, &self.conn, &self.relay);
                Event::Nothing
            }
            _ = self.stats_tick.tick() => {
                record_stats(&self.connection, &self.conn);
                Event::Nothing
            }
        }
    }

    async fn send(&mut self, outgoing: &[Outbound], _batched: bool) -> Result<(), ()> {
        let mut batch = BytesMut::new();
        for out in outgoing {
            if !is_bulk(out.msg()) {
                let message = out.binary();
                batch.reserve(LENGTH_BYTES + message.len());
                batch.put_u32(message.len() as u32);
                batch.put_slice(&message);
                continue;
            }
            if self.bulk_writers.len() >= MAX_BULK_STREAMS as usize {
                // Every bulk stream is busy: wait for one, as a full control
                // stream would make us wait.
                if let Some(done) = self.bulk_writers.join_next().await {
                    record_bulk_write(done, &self.conn, &self.relay);
                }
            }
            let writer = write_bulk(self.connection.clone(), out.binary(), self.idle_timeout);
            self.bulk_writers.spawn(writer);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let bytes = batch.len() as u64;
        // QUIC flow control is the backpressure: a peer that stops reading
        // stalls this write, bounded by the idle timeout.
        match tokio::time::timeout(self.idle_timeout, self.send.write_all(&batch)).await {
            Ok(Ok(())) => {}
            _ => return Err(()),
        }
        self.conn.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        self.relay.metrics.bytes_out(bytes);
        Ok(())
    }

    async fn heartbeat(&mut self) -> Result<(), ()> {
        // quinn's keep-alive does this.
        Ok(())
    }

    fn transfer_streams(&self) -> Option<Arc<dyn TransferStreams>> {
        Some(Arc::new(QuicStreams {
            connection: self.connection.clone(),
            conn: self.conn.clone(),
            relay: self.relay.clone(),
            stall: self.idle_timeout,
        }))
    }

    fn instance_silence(&self) -> Option<Duration> {
        // A vanished peer sends no close; QUIC's idle timeout would notice
        // only after `idle_timeout_ms`.
        Some(Duration::from_millis(
            self.relay.config.limits.instance_idle_timeout_ms,
        ))
    }

    async fn close(mut self, close: Option<Close>) {
        self.control_reader.abort();
        let Some(close) = close else { return };
        let (code, reason) = close_code_for(close);
        tracing::debug!(code, %reason, "closing");
        // A response already on its way gets a moment to arrive.
        let (writers, conn, relay) = (&mut self.bulk_writers, &self.conn, &self.relay);
        let _ = tokio::time::timeout(BULK_FLUSH_ON_CLOSE, async {
            while let Some(done) = writers.join_next().await {
                record_bulk_write(done, conn, relay);
            }
        })
        .await;
        let _ = self.send.finish();
        self.connection.close(code.into(), reason.as_bytes());
    }
}

fn link_close(code: u32, reason: &'static str) -> Close {
    Close::Link {
        code,
        reason: reason.into(),
    }
}

/// The application close code and reason for why the relay closes
/// (PROTOCOL.md §1.1).
fn close_code_for(close: Close) -> (u32, Cow<'static, str>) {
    match close {
        Close::Shutdown => (close::SHUTDOWN, "relay shutting down".into()),
        Close::Session(closing @ Closing::Policy) => (close::POLICY, closing.reason().into()),
        Close::Session(Closing::Capacity(reason)) => (
            close::REFUSED,
            format!("{}: {reason}", ErrorCode::TooManyConnections).into(),
        ),
        Close::SlowConsumer(reason) => {
            tracing::info!(%reason, "closing a slow consumer");
            (close::SLOW_CONSUMER, "slow consumer".into())
        }
        Close::NoHello => (close::NO_HELLO, "no hello within idle_timeout_ms".into()),
        Close::Idle => (close::SHUTDOWN, "idle timeout".into()),
        Close::InstanceSilent => (
            close::INSTANCE_SILENT,
            "instance silent past limits.instance_idle_timeout_ms".into(),
        ),
        Close::Link { code, reason } => (code, reason),
    }
}

/// Copies quinn's path figures into the connection's table row.
fn record_stats(connection: &quinn::Connection, conn: &ConnInfo) {
    let stats = connection.stats();
    let figures = crate::delivery::table::QuicFigures {
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
        // The control stream is the only bidirectional one; bulk bodies get
        // unidirectional streams. Past these limits a peer waits for credit.
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(MAX_BULK_STREAMS.into())
        // quinn's default keeps ~10 MB of unacknowledged data per connection,
        // outside the outbound queue's bounds and budget; a slow reader
        // should meet its slow-consumer policy well before that.
        .send_window(SEND_WINDOW);
    transport
}
