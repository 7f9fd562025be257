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
use crate::delivery::queue::{OutboundQueue, Overflow};
use crate::delivery::table::ConnInfo;
use crate::delivery::{Outbound, Pressure, deliver, deliver_pressing};
use crate::metrics::Metrics;
use crate::protocol::{Data, Msg};

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

/// How many subscribe to a channel across the system: on one node, its own
/// subscribers ([`Channels`]); a cluster backend sums every node's.
pub trait PresenceView: Send + Sync {
    fn presence(&self, channel: &str) -> u64;
}

impl PresenceView for Channels {
    fn presence(&self, channel: &str) -> u64 {
        Channels::presence(self, channel)
    }
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
    /// Subscribers' queues filling up are noted in `pressure`, for the
    /// publisher to wait for before it sends more.
    pub fn publish(&self, channel: &str, data: Data, pressure: &mut Pressure) -> u64 {
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
        self.fan_out(channel, &state, seq, data, pressure);
        seq
    }

    /// Queues message `seq` for every subscriber, under the channel's lock
    /// (the caller holds it), so all see the same order.
    fn fan_out(
        &self,
        channel: &str,
        state: &ChannelState,
        seq: u64,
        data: Data,
        pressure: &mut Pressure,
    ) {
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
            deliver_pressing(
                &sub.conn,
                &sub.queue,
                out.clone(),
                overflow,
                &self.metrics,
                pressure,
            );
        }
    }

    /// Delivers a message numbered elsewhere (a cluster's broker) to this
    /// node's subscribers. One older than the channel's last seq is a
    /// duplicate and is dropped; a gap (messages this node never saw) is
    /// allowed, and subscribers see it in the seqs. Returns whether it was
    /// delivered; the caller (the backend's delivery task) waits for
    /// `pressure` before taking the next message from the broker.
    pub fn deliver_numbered(
        &self,
        channel: &str,
        seq: u64,
        data: Data,
        pressure: &mut Pressure,
    ) -> bool {
        let Some(ch) = self.map.get(channel).map(|c| c.clone()) else {
            return false;
        };
        let mut state = ch.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.subscribers.is_empty() || seq <= state.last_seq {
            return false;
        }
        state.last_seq = seq;
        self.fan_out(channel, &state, seq, data, pressure);
        true
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

    /// Gives `notice` (not a channel message: no sequence number) to every
    /// current subscriber of `channel`; how many.
    pub fn notify(&self, channel: &str, notice: &Outbound) -> usize {
        let Some(ch) = self.map.get(channel).map(|c| c.clone()) else {
            return 0;
        };
        let state = ch.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut told = 0;
        for sub in state.subscribers.values() {
            if deliver(
                &sub.conn,
                &sub.queue,
                notice.clone(),
                Overflow::DropNewest,
                &self.metrics,
            ) {
                told += 1;
            }
        }
        told
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ChannelOverride;
    use crate::delivery::queue::Budget;
    use crate::delivery::table::ConnTable;
    use crate::testing::Peer;

    struct World {
        table: Arc<ConnTable>,
        budget: Arc<Budget>,
        channels: Channels,
    }

    impl World {
        fn new(policies: ChannelsConfig) -> Self {
            Self {
                table: Arc::new(ConnTable::default()),
                budget: Budget::new(1 << 30),
                channels: Channels::new(Arc::new(Metrics::new()), policies),
            }
        }

        fn subscriber(&self, channel: &str, queue_messages: usize) -> Peer {
            let peer = Peer::new(&self.table, &self.budget, queue_messages);
            self.channels.subscribe(
                channel,
                Subscriber {
                    conn: peer.conn().clone(),
                    queue: peer.queue.clone(),
                },
            );
            peer
        }
    }

    fn seqs(messages: &[Msg]) -> Vec<u64> {
        messages
            .iter()
            .filter_map(|m| match m {
                Msg::Message { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn every_subscriber_gets_every_message_in_seq_order() {
        let world = World::new(ChannelsConfig::default());
        let a = world.subscriber("room", 64);
        let b = world.subscriber("room", 64);
        for n in 0..10 {
            assert_eq!(
                world.channels.publish(
                    "room",
                    Data::from(format!("{n}")),
                    &mut Pressure::default()
                ),
                n + 1
            );
        }
        let expected: Vec<u64> = (1..=10).collect();
        assert_eq!(seqs(&a.queued()), expected);
        assert_eq!(seqs(&b.queued()), expected);
    }

    #[test]
    fn messages_numbered_elsewhere_are_delivered_once_in_order() {
        let world = World::new(ChannelsConfig::default());
        let a = world.subscriber("room", 64);
        let _ = a.queued();
        assert!(world.channels.deliver_numbered(
            "room",
            5,
            Data::from("x"),
            &mut Pressure::default()
        ));
        assert!(!world.channels.deliver_numbered(
            "room",
            5,
            Data::from("dup"),
            &mut Pressure::default()
        ));
        assert!(!world.channels.deliver_numbered(
            "room",
            3,
            Data::from("old"),
            &mut Pressure::default()
        ));
        assert!(world.channels.deliver_numbered(
            "room",
            6,
            Data::from("y"),
            &mut Pressure::default()
        ));
        assert_eq!(seqs(&a.queued()), [5, 6]);
        // A local publish continues the sequence.
        assert_eq!(
            world
                .channels
                .publish("room", Data::from("z"), &mut Pressure::default()),
            7
        );
        assert!(!world.channels.deliver_numbered(
            "nobody",
            1,
            Data::from("x"),
            &mut Pressure::default()
        ));
    }

    #[test]
    fn presence_tells_the_others_and_the_last_to_leave_removes_the_channel() {
        let world = World::new(ChannelsConfig::default());
        let first = world.subscriber("room", 64);
        let second = world.subscriber("room", 64);
        assert!(first.queued().contains(&Msg::Presence {
            channel: "room".into(),
            count: 2
        }));
        assert_eq!(world.channels.presence("room"), 2);
        world.channels.unsubscribe("room", first.conn().id);
        world.channels.unsubscribe("room", second.conn().id);
        assert!(world.channels.is_empty());
        // Nothing is kept for a channel nobody listens to.
        assert_eq!(
            world
                .channels
                .publish("room", Data::from("lost"), &mut Pressure::default()),
            0
        );
    }

    #[test]
    fn a_full_subscriber_loses_its_oldest_messages_and_the_others_lose_nothing() {
        let world = World::new(ChannelsConfig::default());
        let slow = world.subscriber("room", 4);
        let fast = world.subscriber("room", 64);
        // The subscribe-time presence notice went to `slow`; clear it.
        let _ = slow.queued();
        for _ in 0..10 {
            world
                .channels
                .publish("room", Data::from("x"), &mut Pressure::default());
        }
        let kept = seqs(&slow.queued());
        assert_eq!(kept, [7, 8, 9, 10], "the newest four are kept");
        assert_eq!(
            slow.conn()
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed),
            6
        );
        assert_eq!(seqs(&fast.queued()), (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_disconnect_channel_closes_a_subscriber_that_falls_behind() {
        let mut policies = ChannelsConfig::default();
        policies.overrides.push(ChannelOverride {
            prefix: "ticks/".into(),
            slow_consumer: SlowConsumer::Disconnect,
        });
        let world = World::new(policies);
        let slow = world.subscriber("ticks/a", 2);
        for _ in 0..3 {
            world
                .channels
                .publish("ticks/a", Data::from("x"), &mut Pressure::default());
        }
        let reason = slow.closed().expect("closed for falling behind");
        assert!(reason.contains("ticks/a"), "{reason}");
    }
}
