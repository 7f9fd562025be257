//! Ingress backpressure: the consumers' queues a publisher must wait for
//! before the relay reads its next message.
//!
//! A fan-out never waits (it runs under the channel's lock); instead each
//! queue it fills past its high-water mark is noted here, and the
//! publisher's connection loop stops reading from the publisher until every
//! noted queue is relieved (see [`OutboundQueue::relieved`]). Overload thus
//! becomes publisher latency — TCP or QUIC flow control pushes it back to
//! the client — instead of messages dropped for consumers that keep up.

use std::sync::Arc;

use super::queue::OutboundQueue;

/// The queues one publisher waits for; empty when it may read on.
#[derive(Debug, Default)]
pub struct Pressure {
    queues: Vec<Arc<OutboundQueue>>,
}

impl Pressure {
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
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
        while let Some(queue) = self.queues.last() {
            queue.relieved().await;
            self.queues.pop();
        }
    }
}
