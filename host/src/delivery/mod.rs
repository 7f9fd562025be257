//! Delivery: getting messages to connections without ever waiting. Each
//! connection has a bounded, laned [`queue::OutboundQueue`] drained by its
//! own task; the relay-wide byte [`queue::Budget`] bounds them all;
//! [`Outbound`] carries a message with its encodings made once; the
//! connection [`table`] holds each connection's row and counters;
//! [`pressure`] is what a publisher waits for when its consumers fill up.
//!
//! This layer knows no session, no transport and no plugin: channels and
//! spaces deliver through [`deliver`], transports drain queues and
//! [`account_sent`] what they wrote.

pub mod outbound;
pub mod pressure;
pub mod queue;
pub mod table;

use std::sync::Arc;
use std::sync::atomic::Ordering;

pub use outbound::Outbound;
pub use pressure::Pressure;

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
    push(conn, queue, out, overflow, metrics).is_some()
}

/// [`deliver`] for a publish: a consumer filling up is noted in `pressure`,
/// for the publisher to wait for.
pub fn deliver_pressing(
    conn: &ConnInfo,
    queue: &Arc<OutboundQueue>,
    out: Outbound,
    overflow: Overflow,
    metrics: &Metrics,
    pressure: &mut Pressure,
) {
    if push(conn, queue, out, overflow, metrics) == Some(true) {
        pressure.add(queue);
    }
}

/// `Some(pressing)` when queued.
fn push(
    conn: &ConnInfo,
    queue: &OutboundQueue,
    out: Outbound,
    overflow: Overflow,
    metrics: &Metrics,
) -> Option<bool> {
    match queue.push(out, overflow) {
        Pushed::Queued { evicted, pressing } => {
            if evicted > 0 {
                conn.dropped.fetch_add(evicted, Ordering::Relaxed);
                metrics.messages_dropped(evicted);
            }
            Some(pressing)
        }
        Pushed::Dropped { evicted } => {
            conn.dropped.fetch_add(1 + evicted, Ordering::Relaxed);
            metrics.messages_dropped(1 + evicted);
            None
        }
        Pushed::Closed => None,
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
