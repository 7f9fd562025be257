//! The bus: how a publish becomes one numbered message that reaches every
//! subscriber of its channel, wherever they are connected.
//!
//! Two steps a cluster takes apart: *numbering* (one authority per channel
//! gives the next `seq`: here the channel's own counter, in a cluster the
//! broker's stream) and *delivery* (every node fans a numbered message out
//! to its local subscribers with [`Channels::deliver_numbered`]). On one
//! node both happen in one step under the channel's lock ([`LocalBus`]), so
//! the publisher is acknowledged at once; a cluster backend acknowledges
//! when the broker has numbered the message ([`Ack::Pending`]), and the
//! session sends the `ack` then.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::channels::Channels;
use crate::delivery::Pressure;
use crate::protocol::Data;

/// How a publish is acknowledged.
#[derive(Debug)]
pub enum Ack {
    /// Numbered already: the seq (0 when nobody is subscribed).
    Numbered(u64),
    /// Numbered later, elsewhere; the seq or why it could not be.
    Pending(oneshot::Receiver<Result<u64, BusError>>),
}

/// Why the bus could not take a publish.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    #[error("the message bus is unavailable: {0}")]
    Unavailable(String),
}

pub trait Bus: Send + Sync + 'static {
    /// Hands `data` to the subscribers of `channel`. Must not wait: a
    /// backend that needs I/O answers [`Ack::Pending`] and works elsewhere.
    /// Local subscribers' queues filling up are noted in `pressure`; the
    /// publisher's connection waits for them before reading on (a cluster
    /// backend's delivery task does the same with its own).
    fn publish(&self, channel: &str, data: Data, pressure: &mut Pressure) -> Ack;
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
    fn publish(&self, channel: &str, data: Data, pressure: &mut Pressure) -> Ack {
        Ack::Numbered(self.channels.publish(channel, data, pressure))
    }
}
