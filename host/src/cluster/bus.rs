//! Channels across nodes: [`ClusterBus`], the `bus::Bus` of a relay in a
//! cluster.
//!
//! Each channel has one numbering authority, its *owner*: the live node
//! that rendezvous hashing of the channel's name over the registry's nodes
//! picks, so every node agrees on it without talking. A publish on the
//! owner is numbered at once (its own subscribers get it under the
//! channel's lock, as on one node); on any other node it is forwarded to
//! the owner (`<name>.number.<owner>`), which numbers it and answers the
//! seq ([`Ack::Pending`]). The owner broadcasts every numbered message on
//! one subject (`<name>.channels`) from one connection, so every node
//! receives a channel's messages in seq order and hands them to its
//! subscribers with `Channels::deliver_from`.
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

enum Outgoing {
    /// A message this node numbered, for every other node.
    Numbered {
        channel: String,
        seq: u64,
        epoch: Arc<String>,
        data: Data,
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
    /// The channels this node numbers: their last seq. A channel's entry
    /// stays locked from numbering until the message is queued for the
    /// other nodes.
    counts: DashMap<String, u64>,
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
            epoch: ArcSwap::from_pointee(format!("{node}.{nonce}.0")),
            nonce,
            node,
            counts: DashMap::new(),
            generation: AtomicU64::new(0),
            outbox,
            waiting: DashMap::new(),
            next_id: AtomicU64::new(1),
        });
        let client = cluster.client.clone();
        tokio::spawn(send(bus.clone(), client.clone(), queued, stop.clone()));
        tokio::spawn(receive(bus.clone(), client, stop));
        bus
    }

    /// The live nodes (from the registry), which decide the owners.
    pub fn set_members(&self, mut nodes: Vec<String>) {
        if !nodes.contains(&self.node) {
            nodes.push(self.node.clone());
        }
        nodes.sort();
        if **self.members.load() != nodes {
            tracing::info!(nodes = ?nodes, "cluster membership changed; channel owners follow");
            self.members.store(Arc::new(nodes));
        }
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

    /// The node that numbers `channel`: the highest rendezvous score.
    fn owner(&self, channel: &str) -> String {
        let members = self.members.load();
        members
            .iter()
            .max_by_key(|node| score(channel, node))
            .cloned()
            .unwrap_or_else(|| self.node.clone())
    }

    fn subject(&self, what: &str) -> String {
        format!("{}.{what}", self.prefix)
    }

    /// Numbers a message of `channel` here, delivers it to this node's
    /// subscribers and queues it for the others.
    fn number(&self, channel: &str, data: Data, pressure: &mut Pressure) -> Result<u64, BusError> {
        // Room first: a message numbered and delivered here must reach the
        // others too, or their seqs would show a gap the publisher never saw.
        let permit = self.outbox.try_reserve().map_err(|_| {
            tracing::warn!(channel, "cluster outbox full: publish refused");
            BusError::Unavailable("the cluster's outbox is full".into())
        })?;
        if self.counts.len() >= MAX_COUNTED && !self.counts.contains_key(channel) {
            // The new epoch before the counts start over, so no count from 1
            // goes out under the old one.
            let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
            self.epoch.store(Arc::new(format!(
                "{}.{}.{generation}",
                self.node, self.nonce
            )));
            self.counts.clear();
            tracing::warn!(
                generation,
                "channel counts started over (too many channels numbered here)"
            );
        }
        // Held to the end: the channel's next message is numbered only after
        // this one is delivered here and queued for the other nodes, so
        // everyone gets its messages in seq order.
        let mut count = self.counts.entry(channel.to_owned()).or_insert(0);
        *count += 1;
        let seq = *count;
        let epoch = self.epoch.load_full();
        self.channels
            .deliver_from(channel, Some(epoch.as_str()), seq, data.clone(), pressure);
        permit.send(Outgoing::Numbered {
            channel: channel.to_owned(),
            seq,
            epoch,
            data,
        });
        drop(count);
        Ok(seq)
    }
}

impl Bus for ClusterBus {
    fn publish(&self, channel: &str, data: Data, pressure: &mut Pressure) -> Ack {
        let owner = self.owner(channel);
        if owner == self.node {
            return match self.number(channel, data, pressure) {
                Ok(seq) => Ack::Numbered(seq),
                Err(e) => {
                    let (tx, rx) = oneshot::channel();
                    let _ = tx.send(Err(e));
                    Ack::Pending(rx)
                }
            };
        }
        let (tx, rx) = oneshot::channel();
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

/// Writes the outbox to NATS in order, from one connection: a channel's
/// numbered messages reach every node in seq order.
async fn send(
    bus: Arc<ClusterBus>,
    client: async_nats::Client,
    mut queued: mpsc::Receiver<Outgoing>,
    stop: CancellationToken,
) {
    let broadcast = bus.subject("channels");
    loop {
        let outgoing = tokio::select! {
            biased;
            next = queued.recv() => match next {
                Some(outgoing) => outgoing,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        let sent = match outgoing {
            Outgoing::Numbered {
                channel,
                seq,
                epoch,
                data,
            } => {
                let mut headers = HeaderMap::new();
                headers.insert(CHANNEL, channel.as_str());
                headers.insert(SEQ, seq.to_string().as_str());
                headers.insert(EPOCH, epoch.as_str());
                headers.insert(ORIGIN, bus.node.as_str());
                client
                    .publish_with_headers(broadcast.clone(), headers, data.0)
                    .await
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
                // The id in the reply subject too: a "no responders" status
                // from the server (the owner is gone) names no header.
                let sent = client
                    .publish_with_reply_and_headers(
                        bus.subject(&format!("number.{owner}")),
                        bus.subject(&format!("answer.{}.{id}", bus.node)),
                        headers,
                        data.0,
                    )
                    .await;
                if sent.is_err() {
                    bus.fail_forward(id, "the publish could not be sent to the channel's owner");
                }
                sent
            }
            Outgoing::Answer { reply, id, result } => {
                let mut headers = HeaderMap::new();
                headers.insert(ID, id.as_str());
                let body = match result {
                    Ok(seq) => seq.to_string(),
                    Err(e) => {
                        headers.insert(ERROR, "1");
                        e
                    }
                };
                client
                    .publish_with_headers(reply, headers, body.into())
                    .await
            }
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "a cluster message was not sent");
        }
    }
    // What was numbered before the stop still reaches the other nodes.
    if let Err(e) = client.flush().await {
        tracing::debug!(error = %e, "NATS not flushed at stop");
    }
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

/// Takes what other nodes send: numbered messages for this node's
/// subscribers, publishes to number (this node owns their channel), and
/// answers to publishes this node forwarded.
async fn receive(bus: Arc<ClusterBus>, client: async_nats::Client, stop: CancellationToken) {
    let subscribe = |subject: String| {
        let client = client.clone();
        async move { client.subscribe(subject).await }
    };
    let (numbered, to_number, answers) = match tokio::try_join!(
        subscribe(bus.subject("channels")),
        subscribe(bus.subject(&format!("number.{}", bus.node))),
        subscribe(bus.subject(&format!("answer.{}.*", bus.node))),
    ) {
        Ok(subscriptions) => subscriptions,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to the cluster's subjects; channels stay on this node");
            return;
        }
    };
    let mut numbered = numbered;
    let mut to_number = to_number;
    let mut answers = answers;
    let mut pressure = Pressure::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(message) = numbered.next() => {
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
                // Subscribers here falling behind slow this node's intake
                // (NATS buffers, then tells the slow consumer off).
                if !pressure.is_empty() {
                    pressure.relieved().await;
                }
            }
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
                let result = bus
                    .number(&channel, Data(message.payload), &mut Pressure::default())
                    .map_err(|e| e.to_string());
                if bus.outbox.try_send(Outgoing::Answer { reply, id, result }).is_err() {
                    tracing::warn!("cluster outbox full: an answer to another node was dropped (it times out there)");
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
