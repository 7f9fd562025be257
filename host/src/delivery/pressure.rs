//! Ingress backpressure: the consumers' queues a publisher must wait for
//! before the relay reads its next message, and the upload chunk a full
//! file writer has not taken yet.
//!
//! A fan-out never waits (it runs under the channel's lock); instead each
//! queue it fills past its high-water mark is noted here, and the
//! publisher's connection loop stops reading from the publisher until every
//! noted queue is relieved (see [`OutboundQueue::relieved`]). Overload thus
//! becomes publisher latency — TCP or QUIC flow control pushes it back to
//! the client — instead of messages dropped for consumers that keep up.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::queue::OutboundQueue;

/// What one connection waits for; empty when it may read on.
#[derive(Default)]
pub struct Pressure {
    queues: Vec<Arc<OutboundQueue>>,
    /// Handing a received chunk to a file writer whose buffer was full.
    held: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for Pressure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pressure")
            .field("queues", &self.queues.len())
            .field("held", &self.held.is_some())
            .finish()
    }
}

impl Pressure {
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty() && self.held.is_none()
    }

    /// Reads nothing more until `handover` (giving a chunk to its writer)
    /// completes. One at a time: the connection reads nothing while held.
    pub fn hold(&mut self, handover: impl Future<Output = ()> + Send + 'static) {
        debug_assert!(self.held.is_none(), "nothing is read while a chunk is held");
        self.held = Some(Box::pin(handover));
    }

    /// Notes `queue` as one to wait for (once, however often it presses).
    pub fn add(&mut self, queue: &Arc<OutboundQueue>) {
        if !self.queues.iter().any(|q| Arc::ptr_eq(q, queue)) {
            self.queues.push(queue.clone());
        }
    }

    /// Waits until every noted queue is relieved, forgetting each as it is.
    /// Cancel-safe: a queue is forgotten only once relieved.
    pub async fn relieved(&mut self) {
        if let Some(handover) = &mut self.held {
            handover.as_mut().await;
            self.held = None;
        }
        while let Some(queue) = self.queues.last() {
            queue.relieved().await;
            self.queues.pop();
        }
    }
}
