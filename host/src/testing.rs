//! Test helpers for the synchronous core (spaces, channels, the registry):
//! a connection is a row in a real `ConnTable` and a real `OutboundQueue`,
//! and what it was sent is read straight from the queue.

use std::sync::Arc;

use crate::delivery::Outbound;
use crate::delivery::queue::{Budget, OutboundQueue, QueueLimits};
use crate::delivery::table::{ConnGuard, ConnInfo, ConnTable};
use crate::protocol::Msg;
use crate::spaces::Caller;

/// One protocol connection: its row and its outbound queue.
pub struct Peer {
    pub guard: ConnGuard,
    pub queue: Arc<OutboundQueue>,
}

impl Peer {
    /// A connection whose queue holds up to `messages` messages.
    pub fn new(table: &Arc<ConnTable>, budget: &Arc<Budget>, messages: usize) -> Self {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
        let limits = QueueLimits {
            messages,
            bytes: 1 << 20,
            slow_after: std::time::Duration::from_secs(1),
        };
        Self {
            guard: table.open(addr, addr),
            queue: OutboundQueue::new(limits, budget),
        }
    }

    pub fn conn(&self) -> &Arc<ConnInfo> {
        self.guard.info()
    }

    /// This connection as the caller of request `id`.
    pub fn caller(&self, id: &str) -> Caller {
        Caller::Conn {
            conn: self.conn().clone(),
            queue: self.queue.clone(),
            id: id.to_owned(),
        }
    }

    /// What is queued for this connection now, in the order it would be
    /// written, without waiting.
    pub fn queued(&self) -> Vec<Msg> {
        let mut out = Vec::new();
        while !self.queue.is_empty() {
            out.extend(
                ready(self.queue.next_batch(64))
                    .iter()
                    .map(|o| o.msg().clone()),
            );
        }
        out
    }
}

impl Peer {
    /// Why the relay closed this connection's queue, if it did.
    pub fn closed(&self) -> Option<String> {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(self.queue.next_batch(1)).poll(&mut context) {
            std::task::Poll::Ready(Err(reason)) => Some(reason),
            _ => None,
        }
    }
}

/// Polls a future that is already ready (the queue has messages).
fn ready(
    future: impl std::future::Future<Output = Result<Vec<Outbound>, String>>,
) -> Vec<Outbound> {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(batch) => batch.expect("the queue is open"),
        std::task::Poll::Pending => panic!("nothing queued"),
    }
}
