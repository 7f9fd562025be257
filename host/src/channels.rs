//! Pub/sub on this node: channels, their subscribers, per-channel sequence
//! numbers and presence counts.
//!
//! A channel exists while it has subscribers; the last unsubscribe removes it,
//! so client-chosen channel names cannot grow the map without end. Its sequence
//! numbers therefore count from 1 again when it is next created.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::protocol::{Data, Msg};
use crate::session::Outbound;
use crate::session::table::ConnInfo;

/// A subscriber's delivery handle.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub conn: Arc<ConnInfo>,
    pub tx: mpsc::Sender<Outbound>,
}

#[derive(Debug, Default)]
struct Channel {
    seq: AtomicU64,
    subscribers: RwLock<HashMap<u64, Subscriber>>,
}

pub struct Channels {
    map: DashMap<String, Arc<Channel>>,
    metrics: Arc<Metrics>,
}

impl Channels {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            map: DashMap::new(),
            metrics,
        }
    }

    /// Adds a subscriber; returns the channel's last sequence number and its new
    /// presence count. Other subscribers are told the new count.
    pub fn subscribe(&self, channel: &str, subscriber: Subscriber) -> (u64, u64) {
        let conn_id = subscriber.conn.id;
        // The entry guard is held only while the subscriber set is edited, which
        // keeps a concurrent last-unsubscribe from removing the channel under us.
        let entry = self.map.entry(channel.to_owned()).or_default();
        let (seq, count, others) = {
            let mut subs = entry.subscribers.write().unwrap_or_else(|e| e.into_inner());
            subs.insert(conn_id, subscriber);
            let others: Vec<Subscriber> = subs
                .iter()
                .filter(|(id, _)| **id != conn_id)
                .map(|(_, s)| s.clone())
                .collect();
            (entry.seq.load(Ordering::Acquire), subs.len() as u64, others)
        };
        drop(entry);
        self.announce(channel, count, &others);
        (seq, count)
    }

    /// Removes a subscriber; returns whether it was subscribed.
    pub fn unsubscribe(&self, channel: &str, conn_id: u64) -> bool {
        let mut removed = false;
        let mut remaining = Vec::new();
        let mut count = 0;
        self.map.remove_if(channel, |_, ch| {
            let mut subs = ch.subscribers.write().unwrap_or_else(|e| e.into_inner());
            removed = subs.remove(&conn_id).is_some();
            count = subs.len() as u64;
            remaining = subs.values().cloned().collect();
            subs.is_empty()
        });
        if removed && !remaining.is_empty() {
            self.announce(channel, count, &remaining);
        }
        removed
    }

    /// Delivers `data` to every subscriber; returns the sequence number given to
    /// it, or 0 when the channel has no subscribers (nothing is kept for later).
    pub fn publish(&self, channel: &str, data: Data) -> u64 {
        let Some(ch) = self.map.get(channel).map(|c| c.clone()) else {
            return 0;
        };
        let subs = ch.subscribers.read().unwrap_or_else(|e| e.into_inner());
        // Numbering under the read lock keeps delivery order equal to seq order
        // for every subscriber, since publishers to one channel serialize on
        // nothing else.
        let seq = ch.seq.fetch_add(1, Ordering::AcqRel) + 1;
        let out = Outbound::new(Msg::Message {
            channel: channel.to_owned(),
            seq,
            data,
        });
        for sub in subs.values() {
            self.deliver(sub, out.clone());
        }
        seq
    }

    pub fn presence(&self, channel: &str) -> u64 {
        self.map
            .get(channel)
            .map(|c| c.subscribers.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
            .unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn announce(&self, channel: &str, count: u64, to: &[Subscriber]) {
        if to.is_empty() {
            return;
        }
        let out = Outbound::new(Msg::Presence {
            channel: channel.to_owned(),
            count,
        });
        for sub in to {
            self.deliver(sub, out.clone());
        }
    }

    fn deliver(&self, sub: &Subscriber, out: Outbound) {
        crate::session::deliver(&sub.conn, &sub.tx, out, &self.metrics);
    }
}
