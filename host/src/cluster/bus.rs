//! Channels across nodes: [`ClusterBus`], the `bus::Bus` of a relay in a
//! cluster.
//!
//! Each channel has one numbering authority, its *owner*: the live node
//! that rendezvous hashing of the channel's name over the registry's nodes
//! picks, so every node agrees on it without talking. A publish on the
//! owner is numbered at once (its own subscribers get it under the
//! channel's lock, as on one node); on any other node it is forwarded to
//! the owner (`<name>.number.<owner>`), which numbers it and answers the
//! seq ([`Ack::Pending`]). The owner writes every numbered message to one
//! JetStream stream (`<name>_channels`, a subject per channel under
//! `<name>.ch.`) from one connection, in seq order, and acknowledges the
//! publish only once the stream has it: what a publisher was told is
//! numbered survives a NATS restart. Every node reads the stream with an
//! ordered consumer (which resumes where it was after a reconnect) and
//! hands each message to its subscribers with `Channels::deliver_from`;
//! a write retried after a lost acknowledgement carries the same
//! `Nats-Msg-Id`, so the stream keeps it once.
//!
//! When the nodes change, a channel may get another owner: its numbers
//! then start where the new owner's count is, under the new owner's
//! epoch (`node.generation`), and each node restarts the channel's
//! sequence (and history) when the first message under it arrives.
//! Subscribers see the seq restart; clients holding a position get
//! `recovered: false` and resync.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_nats::HeaderMap;
use dashmap::DashMap;
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::bus::{Ack, Bus, BusError};
use crate::channels::Channels;
use crate::delivery::Pressure;
use crate::protocol::Data;

/// Numbered messages and forwarded publishes waiting to go out to NATS.
const OUTBOX: usize = 65_536;
/// Channels an owner keeps a count for; past it the counts start over
/// under a new generation (subscribers see the seqs restart).
const MAX_COUNTED: usize = 1_000_000;

const CHANNEL: &str = "Wr-Channel";
const SEQ: &str = "Wr-Seq";
const EPOCH: &str = "Wr-Epoch";
const ORIGIN: &str = "Wr-Origin";
const ID: &str = "Wr-Id";
const ERROR: &str = "Wr-Error";
/// Bytes kept for a numbered message's headers (channel names are at most
/// 256 bytes, appearing twice, base64 in the subject once).
const HEADER_ROOM: usize = 2048;

/// Who hears a numbered message's seq once the stream has it.
enum Then {
    /// A publisher on this node.
    Local(oneshot::Sender<Result<u64, BusError>>),
    /// A publish another node forwarded: its answer subject and id.
    Remote {
        reply: async_nats::Subject,
        id: String,
    },
}

enum Outgoing {
    /// A message this node numbered, for every other node.
    Numbered {
        channel: String,
        seq: u64,
        epoch: Arc<String>,
        data: Data,
        then: Then,
    },
    /// A publish for the channel's owner to number; `id` matches the answer.
    Forward {
        owner: String,
        channel: String,
        data: Data,
        id: u64,
    },
    /// The answer to a forwarded publish.
    Answer {
        reply: async_nats::Subject,
        id: String,
        result: Result<u64, String>,
    },
}

pub struct ClusterBus {
    channels: Arc<Channels>,
    node: String,
    prefix: String,
    members: ArcSwap<Vec<String>>,
    /// Each live node's numbering epoch, as its registry entry says.
    epochs: ArcSwap<std::collections::HashMap<String, String>>,
    /// The channels this node numbers: their last seq and the epoch they
    /// are numbered under (the generation current when this node began
    /// numbering them). A channel's entry stays locked from numbering
    /// until the message is queued for the other nodes.
    counts: DashMap<String, (u64, Arc<String>)>,
    generation: AtomicU64,
    epoch: ArcSwap<String>,
    outbox: mpsc::Sender<Outgoing>,
    /// Forwarded publishes waiting for their owner's answer, by id, with
    /// when they give up ([`FORWARD_TIMEOUT`]).
    waiting: DashMap<u64, (oneshot::Sender<Result<u64, BusError>>, Instant)>,
    next_id: AtomicU64,
    /// Random per start: an owner that restarts under the same name must
    /// not reuse an epoch the other nodes hold a higher seq under.
    nonce: String,
    /// The largest payload a numbered message may carry: NATS's
    /// `max_payload` less room for the headers.
    max_data: usize,
}

/// A forwarded publish whose owner has not answered this long fails
/// (`overloaded`): the owner is gone, or its answer was lost.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

impl ClusterBus {
    /// The bus, and the tasks that move its messages (run them until `stop`).
    pub fn start(
        cluster: &super::Cluster,
        channels: Arc<Channels>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let (outbox, queued) = mpsc::channel(OUTBOX);
        let node = cluster.node().to_owned();
        let nonce = crate::channels::history::new_epoch()[..8].to_owned();
        let bus = Arc::new(Self {
            channels,
            prefix: cluster.name().to_owned(),
            members: ArcSwap::from_pointee(vec![node.clone()]),
            epochs: ArcSwap::from_pointee(std::collections::HashMap::new()),
            epoch: ArcSwap::from_pointee(format!("{node}.{nonce}.0")),
            nonce,
            max_data: (cluster.client.server_info().max_payload).saturating_sub(HEADER_ROOM),
            node,
            counts: DashMap::new(),
            generation: AtomicU64::new(0),
            outbox,
            waiting: DashMap::new(),
            next_id: AtomicU64::new(1),
        });
        let client = cluster.client.clone();
        // A context of its own: the bus's acknowledgements in flight never
        // take the permits the registry and task buckets need.
        tokio::spawn(send(
            bus.clone(),
            client.clone(),
            async_nats::jetstream::new(client.clone()),
            queued,
            stop.clone(),
        ));
        tokio::spawn(receive(
            bus.clone(),
            client,
            cluster.channel_stream.clone(),
            stop,
        ));
        bus
    }

    /// The live nodes (from the registry), which decide the owners, and
    /// the epoch each numbers under.
    pub fn set_view(&self, view: &[super::nodes::NodeInfo]) {
        let epochs: std::collections::HashMap<String, String> = view
            .iter()
            .filter(|n| !n.epoch.is_empty())
            .map(|n| (n.node.clone(), n.epoch.clone()))
            .collect();
        self.epochs.store(Arc::new(epochs));
        self.set_members(view.iter().map(|n| n.node.clone()).collect());
    }

    /// The epoch this node numbers its channels under now.
    pub fn epoch(&self) -> String {
        self.epoch.load().to_string()
    }

    fn set_members(&self, mut nodes: Vec<String>) {
        if !nodes.contains(&self.node) {
            nodes.push(self.node.clone());
        }
        nodes.sort();
        if **self.members.load() != nodes {
            tracing::info!(nodes = ?nodes, "cluster membership changed; channel owners follow");
            // Channels this node numbers from now on start under a new
            // generation: one it numbered before, lost and gains back must
            // not go on under its old epoch past what another node
            // numbered meanwhile. Counts of channels it no longer numbers
            // are let go for the same reason.
            self.next_generation();
            self.counts
                .retain(|channel, _| owner_of(channel, &nodes) == Some(&self.node));
            self.members.store(Arc::new(nodes));
        }
    }

    /// Moves to a new epoch for channels this node starts numbering.
    fn next_generation(&self) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.epoch.store(Arc::new(format!(
            "{}.{}.{generation}",
            self.node, self.nonce
        )));
        generation
    }

    /// Fails forwarded publishes whose owner did not answer in time.
    pub fn expire_forwards(&self) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .waiting
            .iter()
            .filter(|entry| entry.value().1 <= now || entry.value().0.is_closed())
            .map(|entry| *entry.key())
            .collect();
        for id in late {
            self.fail_forward(id, "the channel's owner node did not answer in time");
        }
    }

    fn fail_forward(&self, id: u64, why: &str) {
        if let Some((_, (waiter, _))) = self.waiting.remove(&id) {
            let _ = waiter.send(Err(BusError::Unavailable(why.to_owned())));
        }
    }

    /// The nodes channel owners are picked from now.
    pub fn members(&self) -> Vec<String> {
        (**self.members.load()).clone()
    }

    /// The node that numbers `channel` now.
    fn owner(&self, channel: &str) -> String {
        owner_of(channel, &self.members.load())
            .cloned()
            .unwrap_or_else(|| self.node.clone())
    }

    fn subject(&self, what: &str) -> String {
        format!("{}.{what}", self.prefix)
    }

    /// Where `channel`'s numbered messages go in the stream: its name in
    /// URL-safe base64, a valid subject token whatever the name holds.
    fn channel_subject(&self, channel: &str) -> String {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(channel);
        format!("{}.ch.{token}", self.prefix)
    }

    /// Numbers a message of `channel` here, delivers it to this node's
    /// subscribers and queues it for the stream; `then` hears the seq once
    /// the stream has it.
    fn number(
        &self,
        channel: &str,
        data: Data,
        then: Then,
        pressure: &mut Pressure,
    ) -> Result<u64, BusError> {
        // Room first: a message numbered and delivered here must reach the
        // others too, or their seqs would show a gap the publisher never saw.
        let permit = self.outbox.try_reserve().map_err(|_| {
            tracing::warn!(channel, "cluster outbox full: publish refused");
            BusError::Unavailable("the cluster's outbox is full".into())
        })?;
        if data.len() > self.max_data {
            return Err(BusError::Unavailable(format!(
                "the message is larger than the cluster carries ({} bytes; NATS max_payload)",
                self.max_data
            )));
        }
        if self.counts.len() >= MAX_COUNTED && !self.counts.contains_key(channel) {
            // Each count keeps its own epoch: the ones started after this
            // come under a new generation, so none repeats a seq.
            let generation = self.next_generation();
            self.counts.clear();
            tracing::warn!(
                generation,
                "channel counts started over (too many channels numbered here)"
            );
        }
        // Held to the end: the channel's next message is numbered only after
        // this one is delivered here and queued for the other nodes, so
        // everyone gets its messages in seq order.
        let mut count = self
            .counts
            .entry(channel.to_owned())
            .or_insert_with(|| (0, self.epoch.load_full()));
        count.0 += 1;
        let seq = count.0;
        let epoch = count.1.clone();
        self.channels
            .deliver_from(channel, Some(epoch.as_str()), seq, data.clone(), pressure);
        permit.send(Outgoing::Numbered {
            channel: channel.to_owned(),
            seq,
            epoch,
            data,
            then,
        });
        drop(count);
        Ok(seq)
    }
}

impl crate::channels::Numbering for ClusterBus {
    fn origin(&self, channel: &str) -> Option<String> {
        let owner = self.owner(channel);
        if owner == self.node {
            // Never waits: a count being numbered right now (its entry
            // locked) is by this node's epoch of the moment or an older one;
            // the first message then tells the channel which.
            return Some(match self.counts.try_get(channel) {
                dashmap::try_result::TryResult::Present(count) => count.1.to_string(),
                _ => self.epoch(),
            });
        }
        self.epochs.load().get(&owner).cloned()
    }
}

impl Bus for ClusterBus {
    fn publish(&self, channel: &str, data: Data, pressure: &mut Pressure) -> Ack {
        let owner = self.owner(channel);
        let (tx, rx) = oneshot::channel();
        if owner == self.node {
            // Delivered here at once; acknowledged once the stream has it.
            let (answer, numbered) = oneshot::channel();
            return match self.number(channel, data, Then::Local(answer), pressure) {
                Ok(_) => Ack::Pending(numbered),
                Err(e) => {
                    let _ = tx.send(Err(e));
                    Ack::Pending(rx)
                }
            };
        }
        // At most an outbox's worth waiting for answers (each gives up
        // after FORWARD_TIMEOUT), so a silent owner cannot grow the map.
        if self.waiting.len() >= OUTBOX {
            let _ = tx.send(Err(BusError::Unavailable(
                "too many publishes wait for their channels' owners".into(),
            )));
            return Ack::Pending(rx);
        }
        let Ok(permit) = self.outbox.try_reserve() else {
            let _ = tx.send(Err(BusError::Unavailable(
                "the cluster's outbox is full".into(),
            )));
            return Ack::Pending(rx);
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.waiting
            .insert(id, (tx, Instant::now() + FORWARD_TIMEOUT));
        permit.send(Outgoing::Forward {
            owner,
            channel: channel.to_owned(),
            data,
            id,
        });
        Ack::Pending(rx)
    }
}

/// The node of `nodes` that numbers `channel`: the highest rendezvous
/// score, so every node that knows the same members picks the same one.
pub fn owner_of<'a>(channel: &str, nodes: &'a [String]) -> Option<&'a String> {
    nodes.iter().max_by_key(|node| score(channel, node))
}

/// A hash of `channel` and `node` (FNV-1a, then an avalanche step): stable
/// across builds and platforms, so every node computes the same owner.
fn score(channel: &str, node: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in channel.bytes().chain([0xff]).chain(node.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV mixes its last bytes poorly (node names often differ only
    // there): finish with MurmurHash3's avalanche step.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// Numbered messages written to the stream and not yet acknowledged by it,
/// at most this many (the outbox waits behind them).
const IN_FLIGHT: usize = 4_096;
/// A numbered message the stream has not taken this long (NATS away) is
/// given up: its publisher hears an error.
const GIVE_UP: Duration = Duration::from_secs(30);
/// Between attempts to write again what the stream did not acknowledge.
const RETRY_AFTER: Duration = Duration::from_millis(250);

type AckFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    async_nats::jetstream::publish::PublishAck,
                    async_nats::jetstream::context::PublishError,
                >,
            > + Send,
    >,
>;

/// A numbered message on its way into the stream.
struct Unacked {
    subject: async_nats::Subject,
    headers: HeaderMap,
    payload: bytes::Bytes,
    seq: u64,
    then: Then,
    since: Instant,
    /// `None`: to be written (again).
    ack: Option<AckFuture>,
}

impl Unacked {
    fn parts(&self) -> (async_nats::Subject, HeaderMap, bytes::Bytes) {
        (
            self.subject.clone(),
            self.headers.clone(),
            self.payload.clone(),
        )
    }
}

/// Writes the outbox to NATS in order, from one connection: numbered
/// messages into the stream (each publisher answered once the stream has
/// it; what it did not acknowledge is written again, in order), forwarded
/// publishes and answers directly.
async fn send(
    bus: Arc<ClusterBus>,
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    mut queued: mpsc::Receiver<Outgoing>,
    stop: CancellationToken,
) {
    let mut unacked: std::collections::VecDeque<Unacked> = std::collections::VecDeque::new();
    loop {
        // What the stream did not take is written again, oldest first; the
        // server keeps one connection's messages in order, so what it lost
        // is always a suffix of what was sent.
        if unacked.front().is_some_and(|u| u.ack.is_none()) {
            for message in unacked.iter_mut() {
                message.ack = write(&jetstream, message.parts()).await;
                if message.ack.is_none() {
                    // Not handed over: the rest wait behind it, in order.
                    break;
                }
            }
        }
        enum Event {
            Stop,
            Acked(Result<(), String>),
            Queued(Option<Outgoing>),
        }
        let room = unacked.len() < IN_FLIGHT;
        let event = {
            let front_acked = async {
                match unacked.front_mut() {
                    Some(Unacked { ack: Some(ack), .. }) => {
                        ack.await.map(|_| ()).map_err(|e| e.to_string())
                    }
                    // Not handed to the client: tried again after a pause.
                    Some(_) => {
                        tokio::time::sleep(RETRY_AFTER).await;
                        Err("not written to the stream".to_owned())
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = stop.cancelled() => Event::Stop,
                acked = front_acked => Event::Acked(acked),
                next = queued.recv(), if room => Event::Queued(next),
            }
        };
        match event {
            Event::Stop | Event::Queued(None) => break,
            Event::Acked(acked) => {
                if let Err(e) = acked {
                    // Every message past its time is given up at once; the
                    // rest are written again, in order.
                    let mut given_up = 0;
                    while unacked
                        .front()
                        .is_some_and(|u| u.since.elapsed() >= GIVE_UP)
                    {
                        if let Some(message) = unacked.pop_front() {
                            given_up += 1;
                            let result =
                                Err("the cluster's stream did not take the message in time"
                                    .to_owned());
                            answer(&client, &bus, message.then, result).await;
                        }
                    }
                    if given_up > 0 {
                        tracing::warn!(error = %e, given_up, "numbered messages not taken by the stream in time; their publishers are told");
                    } else {
                        tracing::debug!(error = %e, "the stream did not acknowledge; writing again");
                    }
                    for message in unacked.iter_mut() {
                        message.ack = None;
                    }
                    tokio::time::sleep(RETRY_AFTER).await;
                    continue;
                }
                let Some(message) = unacked.pop_front() else {
                    continue;
                };
                answer(&client, &bus, message.then, Ok(message.seq)).await;
            }
            Event::Queued(Some(outgoing)) => match outgoing {
                Outgoing::Numbered {
                    channel,
                    seq,
                    epoch,
                    data,
                    then,
                } => {
                    let mut headers = HeaderMap::new();
                    headers.insert(CHANNEL, channel.as_str());
                    headers.insert(SEQ, seq.to_string().as_str());
                    headers.insert(EPOCH, epoch.as_str());
                    headers.insert(ORIGIN, bus.node.as_str());
                    // Kept once by the stream however often it is written.
                    headers.insert(
                        async_nats::header::NATS_MESSAGE_ID,
                        format!("{epoch}/{seq}/{channel}").as_str(),
                    );
                    let mut message = Unacked {
                        subject: bus.channel_subject(&channel).into(),
                        headers,
                        payload: data.0,
                        seq,
                        then,
                        since: Instant::now(),
                        ack: None,
                    };
                    // Behind older ones still to be written again, it waits.
                    if unacked.front().is_none_or(|u| u.ack.is_some()) {
                        message.ack = write(&jetstream, message.parts()).await;
                    }
                    unacked.push_back(message);
                }
                Outgoing::Forward {
                    owner,
                    channel,
                    data,
                    id,
                } => {
                    let mut headers = HeaderMap::new();
                    headers.insert(CHANNEL, channel.as_str());
                    headers.insert(ID, id.to_string().as_str());
                    // The id in the reply subject too: a "no responders"
                    // status from the server (the owner is gone) names no header.
                    let sent = client
                        .publish_with_reply_and_headers(
                            bus.subject(&format!("number.{owner}")),
                            bus.subject(&format!("answer.{}.{id}", bus.node)),
                            headers,
                            data.0,
                        )
                        .await;
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "a publish was not forwarded");
                        bus.fail_forward(
                            id,
                            "the publish could not be sent to the channel's owner",
                        );
                    }
                }
                Outgoing::Answer { reply, id, result } => {
                    answer(&client, &bus, Then::Remote { reply, id }, result).await;
                }
            },
        }
    }
    // What was numbered before the stop still reaches the stream (bounded:
    // a stop does not wait for NATS to come back).
    let drain = async {
        while let Some(message) = unacked.pop_front() {
            let acked = match message.ack {
                Some(ack) => ack.await.is_ok(),
                None => false,
            };
            if !acked {
                tracing::debug!("a numbered message may not have reached the stream at stop");
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
}

/// Writes one numbered message to the stream; `None` when it could not be
/// handed to the client (written again later).
async fn write(
    jetstream: &async_nats::jetstream::Context,
    (subject, headers, payload): (async_nats::Subject, HeaderMap, bytes::Bytes),
) -> Option<AckFuture> {
    match jetstream
        .publish_with_headers(subject, headers, payload)
        .await
    {
        Ok(ack) => Some(Box::pin(ack.into_future())),
        Err(e) => {
            tracing::debug!(error = %e, "a numbered message was not written to the stream");
            None
        }
    }
}

/// Tells `then` a numbered message's outcome.
async fn answer(
    client: &async_nats::Client,
    bus: &ClusterBus,
    then: Then,
    result: Result<u64, String>,
) {
    match then {
        Then::Local(waiter) => {
            let _ = waiter.send(result.map_err(BusError::Unavailable));
        }
        Then::Remote { reply, id } => {
            let mut headers = HeaderMap::new();
            headers.insert(ID, id.as_str());
            let body = match result {
                Ok(seq) => seq.to_string(),
                Err(e) => {
                    headers.insert(ERROR, "1");
                    e
                }
            };
            if let Err(e) = client
                .publish_with_headers(reply, headers, body.into())
                .await
            {
                tracing::warn!(error = %e, node = %bus.node, "an answer to another node was not sent");
            }
        }
    }
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

/// Hands the channel stream's messages numbered elsewhere to this node's
/// subscribers, in stream order, until `stop`.
async fn deliver(
    bus: Arc<ClusterBus>,
    mut numbered: async_nats::jetstream::consumer::pull::Ordered,
    stop: CancellationToken,
) {
    let mut pressure = Pressure::default();
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            next = numbered.next() => match next {
                Some(Ok(message)) => message.message,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "the channel stream's consumer faltered; it resumes by itself");
                    continue;
                }
                None => {
                    tracing::error!("the channel stream's consumer ended; channels from other nodes stop here");
                    return;
                }
            },
        };
        let headers = message.headers.as_ref();
        if header(headers, ORIGIN) == Some(bus.node.as_str()) {
            continue;
        }
        let (Some(channel), Some(seq), Some(epoch)) = (
            header(headers, CHANNEL),
            header(headers, SEQ).and_then(|s| s.parse::<u64>().ok()),
            header(headers, EPOCH),
        ) else {
            continue;
        };
        bus.channels.deliver_from(
            channel,
            Some(epoch),
            seq,
            Data(message.payload),
            &mut pressure,
        );
        // Subscribers here falling behind slow this node's intake (the
        // stream keeps what is not read yet).
        if !pressure.is_empty() {
            pressure.relieved().await;
        }
    }
}

/// Takes what other nodes send: numbered messages for this node's
/// subscribers, publishes to number (this node owns their channel), and
/// answers to publishes this node forwarded.
async fn receive(
    bus: Arc<ClusterBus>,
    client: async_nats::Client,
    stream: async_nats::jetstream::stream::Stream,
    stop: CancellationToken,
) {
    let subscribe = |subject: String| {
        let client = client.clone();
        async move { client.subscribe(subject).await }
    };
    // From now on (what was numbered before this node started is history);
    // after a reconnect it resumes after the last message it saw.
    let numbered = async {
        stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: bus.subject("ch.>"),
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .messages()
            .await
            .map_err(|e| e.to_string())
    };
    let subscribed = async {
        tokio::try_join!(
            subscribe(bus.subject(&format!("number.{}", bus.node))),
            subscribe(bus.subject(&format!("answer.{}.*", bus.node))),
        )
        .map_err(|e| e.to_string())
    };
    let (numbered, (to_number, answers)) = match tokio::try_join!(numbered, subscribed) {
        Ok(subscriptions) => subscriptions,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to the cluster's subjects; channels stay on this node");
            return;
        }
    };
    // Read in a task of its own: subscribers here falling behind hold up
    // this node's intake of channel messages, never the publishes other
    // nodes forward here or the answers to this node's own.
    tokio::spawn(deliver(bus.clone(), numbered, stop.clone()));
    let mut to_number = to_number;
    let mut answers = answers;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(message) = to_number.next() => {
                let headers = message.headers.as_ref();
                let (Some(channel), Some(id), Some(reply)) = (
                    header(headers, CHANNEL).map(str::to_owned),
                    header(headers, ID).map(str::to_owned),
                    message.reply.clone(),
                ) else {
                    continue;
                };
                // Never held back by this node's subscribers: the answer
                // unblocks a publisher on another node.
                // Answered once the stream has it (or at once if refused).
                let then = Then::Remote { reply: reply.clone(), id: id.clone() };
                if let Err(e) = bus.number(&channel, Data(message.payload), then, &mut Pressure::default()) {
                    let result = Err(e.to_string());
                    if bus.outbox.try_send(Outgoing::Answer { reply, id, result }).is_err() {
                        tracing::warn!("cluster outbox full: an answer to another node was dropped (it times out there)");
                    }
                }
            }
            Some(message) = answers.next() => {
                let headers = message.headers.as_ref();
                let Some(id) = message.subject.rsplit('.').next().and_then(|s| s.parse::<u64>().ok()) else {
                    continue;
                };
                if message.status.is_some() {
                    bus.fail_forward(id, "the channel's owner node is not there");
                    continue;
                }
                let Some((_, (waiter, _))) = bus.waiting.remove(&id) else {
                    continue;
                };
                let body = String::from_utf8_lossy(&message.payload).into_owned();
                let result = if header(headers, ERROR).is_some() {
                    Err(BusError::Unavailable(body))
                } else {
                    body.parse::<u64>()
                        .map_err(|_| BusError::Unavailable(format!("a bad answer from the channel's owner: {body}")))
                };
                let _ = waiter.send(result);
            }
            else => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_node_picks_the_same_owner_and_owners_spread() {
        let nodes = ["a", "b", "c"];
        let owner = |channel: &str| {
            nodes
                .iter()
                .max_by_key(|n| score(channel, n))
                .copied()
                .unwrap()
        };
        assert_eq!(owner("chat/lobby"), owner("chat/lobby"));
        let mut per_node = std::collections::HashMap::new();
        for i in 0..300 {
            *per_node.entry(owner(&format!("room/{i}"))).or_insert(0) += 1;
        }
        for node in nodes {
            let n = per_node.get(node).copied().unwrap_or(0);
            assert!((60..=140).contains(&n), "{node} owns {n} of 300");
        }
    }
}
