//! The bare relay: the floor of our own stack. tokio-tungstenite with its
//! default configuration, our binary codec, channels with sequence numbers
//! and fan-out, and spaces with request/response by id — and nothing else:
//! no admission, caps, rates, plugins, lanes, byte bounds, metrics or
//! connection table. A full outbound queue drops, as a bounded mpsc does.
//! It speaks enough of PROTOCOL.md (binary frames only) for the same load
//! generator to drive it, directly or through nginx.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use wasmrelay::protocol::{Msg, Request, Response, VERSION, codec};

/// Outbound messages one connection may have queued before new ones drop.
const QUEUE: usize = 1024;

type Outbox = mpsc::Sender<Bytes>;

#[derive(Default)]
struct Channel {
    seq: u64,
    subscribers: Vec<(u64, Outbox)>,
}

#[derive(Default)]
struct State {
    next_id: AtomicU64,
    channels: Mutex<HashMap<String, Channel>>,
    spaces: Mutex<HashMap<String, Vec<(u64, Outbox)>>>,
    rotation: AtomicU64,
    /// Relay request id → (caller's outbox, caller's id).
    pending: Mutex<HashMap<u64, (Outbox, String)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves on `listener` until the process is killed.
pub async fn run(listener: TcpListener) -> anyhow::Result<()> {
    let state = Arc::new(State::default());
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(serve(stream, state.clone()));
    }
}

async fn serve(stream: TcpStream, state: Arc<State>) -> anyhow::Result<()> {
    let ws = tokio_tungstenite::accept_async(stream).await?;
    let (mut sink, mut source) = ws.split();
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let (outbox, mut queue) = mpsc::channel::<Bytes>(QUEUE);
    let result = async {
        loop {
            tokio::select! {
                inbound = source.next() => {
                    let Some(message) = inbound else { break };
                    let frame = match message? {
                        Message::Binary(frame) => frame,
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if let Some(reply) = handle(&state, id, &outbox, &frame) {
                        sink.feed(Message::Binary(reply)).await?;
                        sink.flush().await?;
                    }
                }
                Some(out) = queue.recv() => {
                    sink.feed(Message::Binary(out)).await?;
                    while let Ok(out) = queue.try_recv() {
                        sink.feed(Message::Binary(out)).await?;
                    }
                    sink.flush().await?;
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    for channel in lock(&state.channels).values_mut() {
        channel.subscribers.retain(|(conn, _)| *conn != id);
    }
    for instances in lock(&state.spaces).values_mut() {
        instances.retain(|(conn, _)| *conn != id);
    }
    result
}

fn handle(state: &State, id: u64, outbox: &Outbox, frame: &Bytes) -> Option<Bytes> {
    let msg = codec::decode_binary(frame).ok()?;
    let reply = match msg {
        Msg::Hello { .. } => Msg::Welcome {
            v: VERSION,
            session: id.to_string(),
            heartbeat_ms: 15_000,
            idle_timeout_ms: 45_000,
            max_message_bytes: 64 << 20,
            instance_idle_timeout_ms: 2_000,
            batch: false,
            transfers: Vec::new(),
        },
        Msg::Ping { id } => Msg::Pong { id },
        Msg::Subscribe { channel, .. } => {
            let mut channels = lock(&state.channels);
            let entry = channels.entry(channel.clone()).or_default();
            entry.subscribers.push((id, outbox.clone()));
            Msg::Subscribed {
                channel,
                seq: entry.seq,
                presence: entry.subscribers.len() as u64,
                epoch: None,
                recovered: None,
            }
        }
        Msg::Publish {
            channel,
            id: publish_id,
            data,
        } => {
            let mut channels = lock(&state.channels);
            let entry = channels.entry(channel.clone()).or_default();
            entry.seq += 1;
            let seq = entry.seq;
            let out = codec::encode_binary(&Msg::Message {
                channel: channel.clone(),
                seq,
                data,
            });
            for (_, subscriber) in &entry.subscribers {
                let _ = subscriber.try_send(out.clone());
            }
            Msg::Ack {
                id: publish_id?,
                channel,
                seq,
            }
        }
        Msg::Register { space } => {
            lock(&state.spaces)
                .entry(space.clone())
                .or_default()
                .push((id, outbox.clone()));
            Msg::Registered {
                instance: format!("{space}#{id}"),
                space,
            }
        }
        Msg::Request(request) => {
            let instance = {
                let spaces = lock(&state.spaces);
                let instances = spaces.get(&request.space).filter(|i| !i.is_empty())?;
                let turn = state.rotation.fetch_add(1, Ordering::Relaxed) as usize;
                instances[turn % instances.len()].1.clone()
            };
            let relay_id = state.next_id.fetch_add(1, Ordering::Relaxed);
            lock(&state.pending).insert(relay_id, (outbox.clone(), request.id.clone()));
            let forwarded = Msg::Request(Request {
                id: relay_id.to_string(),
                ..request
            });
            let _ = instance.try_send(codec::encode_binary(&forwarded));
            return None;
        }
        Msg::Response(response) => {
            let relay_id = response.id.parse().ok()?;
            let (caller, caller_id) = lock(&state.pending).remove(&relay_id)?;
            let _ = caller.try_send(codec::encode_binary(&Msg::Response(Response {
                id: caller_id,
                ..response
            })));
            return None;
        }
        _ => return None,
    };
    Some(codec::encode_binary(&reply))
}
