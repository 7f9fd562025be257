//! Delivery: getting messages to connections without ever waiting. Each
//! connection has a bounded, laned [`queue::OutboundQueue`] drained by its
//! own task; the relay-wide byte [`queue::Budget`] bounds them all;
//! [`Outbound`] carries a message with its encodings made once; the
//! connection [`table`] holds each connection's row and counters.
//!
//! This layer knows no session, no transport and no plugin: channels and
//! spaces deliver through [`deliver`], transports drain queues and
//! [`account_sent`] what they wrote.

pub mod outbound;
pub mod queue;
pub mod table;

use std::sync::atomic::Ordering;

pub use outbound::Outbound;

use crate::metrics::Metrics;
use crate::protocol::Msg;
use queue::{OutboundQueue, Overflow, Pushed};
use table::ConnInfo;

/// Puts `out` on a connection's outbound queue without waiting, applying
/// `overflow` when the consumer is behind; counts what it loses. Returns
/// whether `out` was queued.
pub fn deliver(
    conn: &ConnInfo,
    queue: &OutboundQueue,
    out: Outbound,
    overflow: Overflow,
    metrics: &Metrics,
) -> bool {
    match queue.push(out, overflow) {
        Pushed::Queued { evicted } => {
            if evicted > 0 {
                conn.dropped.fetch_add(evicted, Ordering::Relaxed);
                metrics.messages_dropped(evicted);
            }
            true
        }
        Pushed::Dropped { evicted } => {
            conn.dropped.fetch_add(1 + evicted, Ordering::Relaxed);
            metrics.messages_dropped(1 + evicted);
            false
        }
        Pushed::Closed => false,
    }
}

/// Counts messages a connection has written, and the errors among them.
pub fn account_sent(conn: &ConnInfo, metrics: &Metrics, batch: &[Outbound]) {
    for out in batch {
        if let Msg::Error { code, .. } = out.msg() {
            metrics.error_sent(*code);
        }
    }
    let count = batch.len() as u64;
    conn.msgs_out.fetch_add(count, Ordering::Relaxed);
    metrics.messages_out(count);
}
