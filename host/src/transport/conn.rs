//! The one connection loop both protocol transports drive: a `select!` over
//! shutdown, the peer's next frame, this connection's outbound queue and the
//! heartbeat, feeding a [`Session`] and writing what it and other
//! connections queue. WebSocket and QUIC differ only in how frames are read
//! and written, how a peer's liveness is judged and how a close is said;
//! each implements [`Link`] for that.

use std::borrow::Cow;

use futures_util::FutureExt as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::delivery::table::{ConnGuard, ConnState};
use crate::delivery::{Outbound, account_sent};
use crate::protocol::{DecodeError, Msg};
use crate::quota::ConnQuota;
use crate::session::{Closing, Session, goaway};
use crate::state::Relay;
use crate::transfer::sink::TransferStreams;

/// At most this many queued messages are written per turn, so a busy
/// connection batches writes but still gets to its heartbeat and inbound.
const WRITE_BATCH: usize = 64;

/// At most this many inbound messages already received are handled per turn.
const READ_BATCH: usize = 32;

/// Hands one event from the peer to the session; `Some` when the peer's
/// side ended (with the close to say, if any).
fn absorb(
    event: Event,
    session: &mut Session,
    outgoing: &mut Vec<Outbound>,
    last_heard: &mut Instant,
) -> Option<Option<Close>> {
    match event {
        Event::Message(decoded) => {
            *last_heard = Instant::now();
            if let Some(reply) = session.receive(decoded) {
                outgoing.push(reply);
            }
        }
        Event::Reply(msg) => outgoing.push(msg.into()),
        Event::Heard => *last_heard = Instant::now(),
        Event::Nothing => {}
        Event::End(close) => return Some(close),
    }
    None
}

/// Why the relay closes a connection; each transport says it in its own codes.
#[derive(Debug)]
pub enum Close {
    /// The relay is shutting down.
    Shutdown,
    /// The session asked for it (rate limits, a cap after `hello`).
    Session(Closing),
    /// The outbound queue was closed: a slow consumer (the reason says how).
    SlowConsumer(String),
    /// No `hello` within the idle timeout.
    NoHello,
    /// Nothing heard from the peer for the idle timeout.
    Idle,
    /// A connection serving instances was silent past its limit.
    InstanceSilent,
    /// The link's own reason (a frame too large, broken framing, ...).
    Link {
        code: u32,
        reason: Cow<'static, str>,
    },
}

/// What the peer's side of a link produced.
pub enum Event {
    /// A message (or why it could not be decoded) for the session.
    Message(Result<Msg, DecodeError>),
    /// Something the relay must answer without the session (a failed bulk
    /// stream's error).
    Reply(Msg),
    /// The peer was heard from without a message (a ping).
    Heard,
    /// Nothing for the loop (link housekeeping).
    Nothing,
    /// The peer's side ended: with the reason the relay closes with, or
    /// `None` when there is nothing left to say.
    End(Option<Close>),
}

/// One transport's side of a connection.
pub trait Link: Send {
    /// Whether a peer silent for the idle timeout is reaped by the loop
    /// (WebSocket) or by the transport itself (QUIC's idle timeout).
    const REAPS_SILENT: bool;

    /// The peer's next event. Must be cancel-safe: the loop selects over it.
    /// `greeted` says whether the session has had its `hello`.
    fn next_event(&mut self, greeted: bool) -> impl Future<Output = Event> + Send;

    /// Writes `batch`, several messages to a frame when `batched` (the
    /// client asked for it in `hello`); an error means the peer stopped
    /// taking it.
    fn send(
        &mut self,
        batch: &[Outbound],
        batched: bool,
    ) -> impl Future<Output = Result<(), ()>> + Send;

    /// A heartbeat tick: a WebSocket ping. An error means the peer is gone.
    fn heartbeat(&mut self) -> impl Future<Output = Result<(), ()>> + Send;

    /// How long a connection serving instances may stay silent, when the
    /// transport cannot rely on its own pings to notice a vanished peer.
    fn instance_silence(&self) -> Option<Duration>;

    /// Where file transfers to the peer go, when not through the
    /// connection's queue (QUIC: a stream per transfer).
    fn transfer_streams(&self) -> Option<Arc<dyn TransferStreams>> {
        None
    }

    /// Ends the link, telling the peer `close` when there is one.
    fn close(self, close: Option<Close>) -> impl Future<Output = ()> + Send;
}

/// Runs one connection to its end over `link`.
pub async fn run<L: Link>(relay: Arc<Relay>, mut link: L, guard: Arc<ConnGuard>, quota: ConnQuota) {
    let conn = guard.info().clone();
    let (mut session, queue) = Session::open(
        relay.session_context(),
        conn.clone(),
        quota,
        link.transfer_streams(),
    );
    let idle_timeout = relay.config.idle_timeout();
    let interval = relay.config.heartbeat_interval();
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let instance_silence = link.instance_silence();
    // Never fires when the link has no instance limit.
    let mut liveness = tokio::time::interval(instance_silence.unwrap_or(Duration::MAX / 8) / 4);
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let opened = Instant::now();
    let mut last_heard = opened;
    let mut goaway_sent = false;

    let close = loop {
        // Checked here, after the previous turn wrote the last error out.
        if let Some(closing) = session.closing() {
            break Some(Close::Session(closing.clone()));
        }
        let mut outgoing: Vec<Outbound> = Vec::new();
        let mut ping = false;
        // While subscribers this peer's publishes filled are catching up, its
        // next frame stays unread: TCP or QUIC flow control then slows the
        // peer down instead of the relay dropping what it cannot deliver.
        let backpressured = session.is_backpressured();
        // Read before this turn's message: the `welcome` itself is never batched.
        let batched = session.batches();
        // Unbiased: a peer that never stops sending must not starve its own
        // deliveries or its heartbeat.
        tokio::select! {
            _ = relay.closing().cancelled() => break Some(Close::Shutdown),
            _ = relay.draining().cancelled(), if !goaway_sent => {
                goaway_sent = true;
                conn.set_state(ConnState::Draining);
                outgoing.push(goaway(&relay.config));
            }
            event = link.next_event(session.greeted()), if !backpressured => {
                if let Some(close) = absorb(event, &mut session, &mut outgoing, &mut last_heard) {
                    break close;
                }
                // Whatever else the peer already sent is taken in this turn
                // (up to a bound, and not past backpressure): one pass
                // through the select and one write for many messages.
                let mut ended = None;
                for _ in 1..READ_BATCH {
                    // A `welcome` that turned batching on ends the turn: it
                    // goes out alone, and batches start after it.
                    if session.is_backpressured()
                        || session.closing().is_some()
                        || session.batches() != batched
                    {
                        break;
                    }
                    let Some(event) = link.next_event(session.greeted()).now_or_never() else {
                        break;
                    };
                    ended = absorb(event, &mut session, &mut outgoing, &mut last_heard);
                    if ended.is_some() {
                        break;
                    }
                }
                if let Some(close) = ended {
                    break close;
                }
            }
            // After the branch that reads `session.greeted()`: this one
            // holds the session until the select ends.
            _ = session.backpressure().relieved(), if backpressured => {}
            batch = queue.next_batch(WRITE_BATCH) => match batch {
                Ok(batch) => outgoing.extend(batch),
                Err(reason) => break Some(Close::SlowConsumer(reason)),
            },
            _ = heartbeat.tick() => {
                // Libraries answer pings by themselves, so a client that never
                // says hello would otherwise look alive forever.
                if !session.greeted() && opened.elapsed() >= idle_timeout {
                    break Some(Close::NoHello);
                }
                if L::REAPS_SILENT && last_heard.elapsed() >= idle_timeout {
                    tracing::info!(silent_ms = last_heard.elapsed().as_millis() as u64, "reaping silent connection");
                    break Some(Close::Idle);
                }
                ping = true;
            }
            _ = liveness.tick(), if instance_silence.is_some() && session.serves_instances() => {
                // A vanished peer sends no close; instances are held to a far
                // shorter silence than the idle timeout (PROTOCOL §3.2: they
                // ping), so their callers fail over in seconds.
                if instance_silence.is_some_and(|limit| last_heard.elapsed() >= limit) {
                    tracing::warn!(silent_ms = last_heard.elapsed().as_millis() as u64, "instance connection silent; presumed gone");
                    break Some(Close::InstanceSilent);
                }
            }
        }
        if ping && link.heartbeat().await.is_err() {
            break None;
        }
        if outgoing.is_empty() {
            continue;
        }
        account_sent(&conn, &relay.metrics, &outgoing);
        // A consumer closed for being slow is usually blocked right here:
        // stop waiting for it and go to the close.
        tokio::select! {
            sent = link.send(&outgoing, batched) => if sent.is_err() {
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
    link.close(close).await;
    drop(guard);
}
