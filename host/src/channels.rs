//! Pub/sub on this node: channels, their subscribers, per-channel sequence
//! numbers and presence counts.
//!
//! A channel exists while it has subscribers; the last unsubscribe removes it,
//! so client-chosen channel names cannot grow the map without end. Its sequence
//! numbers therefore count from 1 again when it is next created.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;

use crate::config::{ChannelsConfig, SlowConsumer};
use crate::metrics::Metrics;
use crate::protocol::{Data, Msg};
use crate::session::queue::{OutboundQueue, Overflow};
use crate::session::table::ConnInfo;
use crate::session::{Outbound, deliver};

/// A subscriber's delivery handle.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub conn: Arc<ConnInfo>,
    pub queue: Arc<OutboundQueue>,
}

/// One channel. Numbering, delivery and presence announcements all happen
/// under its one lock, so every subscriber sees messages in `seq` order and
/// presence counts in the order they changed. Delivery never waits (a full
/// queue gets the channel's slow-consumer policy), so the lock is held only
/// for the fan-out itself.
#[derive(Debug, Default)]
struct Channel {
    state: Mutex<ChannelState>,
}

#[derive(Debug, Default)]
struct ChannelState {
    last_seq: u64,
    subscribers: HashMap<u64, Subscriber>,
}

pub struct Channels {
    map: DashMap<String, Arc<Channel>>,
    metrics: Arc<Metrics>,
    policies: ChannelsConfig,
}

impl Channels {
    pub fn new(metrics: Arc<Metrics>, policies: ChannelsConfig) -> Self {
        Self {
            map: DashMap::new(),
            metrics,
            policies,
        }
    }

    /// Adds a subscriber; returns the channel's last sequence number and its
    /// presence count. When the count changed, the other subscribers are told.
    pub fn subscribe(&self, channel: &str, subscriber: Subscriber) -> (u64, u64) {
        // The map entry guard is held while the subscriber set is edited, which
        // keeps a concurrent last-unsubscribe from removing the channel under us.
        let entry = self.map.entry(channel.to_owned()).or_default();
        let mut state = entry.state.lock().unwrap_or_else(|e| e.into_inner());
        let conn_id = subscriber.conn.id;
        let joined = state.subscribers.insert(conn_id, subscriber).is_none();
        let count = state.subscribers.len() as u64;
        if joined {
            self.announce(channel, count, &state, Some(conn_id));
        }
        (state.last_seq, count)
    }

    /// Removes a subscriber; returns whether it was subscribed.
    pub fn unsubscribe(&self, channel: &str, conn_id: u64) -> bool {
        let mut removed = false;
        self.map.remove_if(channel, |_, ch| {
            let mut state = ch.state.lock().unwrap_or_else(|e| e.into_inner());
            removed = state.subscribers.remove(&conn_id).is_some();
            if removed {
                let count = state.subscribers.len() as u64;
                self.announce(channel, count, &state, None);
            }
            state.subscribers.is_empty()
        });
        removed
    }

    /// Delivers `data` to every subscriber; returns the sequence number given to
    /// it, or 0 when the channel has no subscribers (nothing is kept for later).
    pub fn publish(&self, channel: &str, data: Data) -> u64 {
        let Some(ch) = self.map.get(channel).map(|c| c.clone()) else {
            return 0;
        };
        let mut state = ch.state.lock().unwrap_or_else(|e| e.into_inner());
        // Empty means the channel was removed after we looked it up.
        if state.subscribers.is_empty() {
            return 0;
        }
        state.last_seq += 1;
        let seq = state.last_seq;
        let out = Outbound::new(Msg::Message {
            channel: channel.to_owned(),
            seq,
            data,
        });
        let overflow = match self.policies.slow_consumer(channel) {
            SlowConsumer::DropOldest => Overflow::DropOldest,
            SlowConsumer::Disconnect => Overflow::Disconnect,
        };
        for sub in state.subscribers.values() {
            deliver(&sub.conn, &sub.queue, out.clone(), overflow, &self.metrics);
        }
        seq
    }

    pub fn presence(&self, channel: &str) -> u64 {
        self.map
            .get(channel)
            .map(|c| {
                c.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .subscribers
                    .len() as u64
            })
            .unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Tells the subscribers (but `except` the one who just joined, who gets
    /// the count in `subscribed`) the channel's new presence count.
    fn announce(&self, channel: &str, count: u64, state: &ChannelState, except: Option<u64>) {
        let mut others = state
            .subscribers
            .iter()
            .filter(|(id, _)| Some(**id) != except)
            .peekable();
        if others.peek().is_none() {
            return;
        }
        let out = Outbound::new(Msg::Presence {
            channel: channel.to_owned(),
            count,
        });
        for (_, sub) in others {
            deliver(
                &sub.conn,
                &sub.queue,
                out.clone(),
                Overflow::DropNewest,
                &self.metrics,
            );
        }
    }
}
