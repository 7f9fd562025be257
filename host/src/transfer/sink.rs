//! Where a transfer's messages to the peer go. Over WebSocket they join the
//! bulk lane of the connection's own queue ([`QueueStreams`]), behind
//! everything else the connection is sent, a window of bytes at a time;
//! over QUIC each transfer gets a stream of its own (the transport's
//! implementation), whose flow control is the backpressure.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::delivery::Outbound;
use crate::delivery::queue::OutboundQueue;
use crate::protocol::Msg;

/// The outcome of a send: `Err` with why once the peer cannot take more.
pub type Sent<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// One transfer's way to the peer, in order.
pub trait TransferSink: Send {
    /// Sends `msg`, waiting while the peer is behind.
    fn send(&mut self, msg: Msg) -> Sent<'_>;
    /// Says the transfer's messages are complete.
    fn finish(&mut self) -> Sent<'_>;
}

/// Opens a way to the peer per transfer.
pub trait TransferStreams: Send + Sync {
    /// For a transfer sending chunks of up to `chunk_size` bytes.
    fn open(&self, chunk_size: u32) -> Box<dyn TransferSink>;
}

/// Transfers through the connection's outbound queue (WebSocket). A
/// transfer queues a chunk only while the queue holds less than two of its
/// chunks: enough to keep the socket busy, little memory per transfer.
pub struct QueueStreams {
    queue: Arc<OutboundQueue>,
}

impl QueueStreams {
    pub fn new(queue: Arc<OutboundQueue>) -> Self {
        Self { queue }
    }
}

impl TransferStreams for QueueStreams {
    fn open(&self, chunk_size: u32) -> Box<dyn TransferSink> {
        Box::new(QueueSink {
            queue: self.queue.clone(),
            // A chunk's header and the queue's per-message estimate on top.
            window: 2 * (chunk_size as usize + 256),
        })
    }
}

struct QueueSink {
    queue: Arc<OutboundQueue>,
    window: usize,
}

impl TransferSink for QueueSink {
    fn send(&mut self, msg: Msg) -> Sent<'_> {
        Box::pin(self.queue.push_within(Outbound::new(msg), self.window))
    }

    fn finish(&mut self) -> Sent<'_> {
        Box::pin(async { Ok(()) })
    }
}
