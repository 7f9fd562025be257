//! The bus: how a publish reaches every subscriber of a channel, wherever it is
//! connected. Nothing above this trait knows whether the relay is one node
//! (in-process delivery, [`LocalBus`]) or a cluster (a NATS implementation of
//! the same trait, planned).

use std::sync::Arc;

use crate::channels::Channels;
use crate::protocol::Data;

pub trait Bus: Send + Sync + 'static {
    /// Delivers `data` to the subscribers of `channel`; returns the sequence
    /// number it was given (0 when nobody is subscribed).
    fn publish(&self, channel: &str, data: Data) -> u64;
}

/// Single-node delivery straight into the local subscribers' queues.
pub struct LocalBus {
    channels: Arc<Channels>,
}

impl LocalBus {
    pub fn new(channels: Arc<Channels>) -> Self {
        Self { channels }
    }
}

impl Bus for LocalBus {
    fn publish(&self, channel: &str, data: Data) -> u64 {
        self.channels.publish(channel, data)
    }
}
