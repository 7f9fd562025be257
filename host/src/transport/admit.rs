//! What every accepted connection goes through first, TCP or QUIC: a place
//! under the relay-wide and per-address caps, and its row in the connection
//! table. A connection over a cap may still be told why — while few such
//! refusals are in progress — or is dropped without a word.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::delivery::table::ConnGuard;
use crate::quota::Refusal;
use crate::state::Relay;

/// Refused connections that are answered at once, per listener; past this
/// they are dropped, so a flood of refusals costs nothing to hold.
const MAX_REFUSING: usize = 256;

/// How an accepted connection may proceed.
pub enum Accepted {
    /// Under the caps: serve it.
    Admitted(ConnGuard),
    /// Over a cap: tell it `Refusal`, then close.
    Refusing(ConnGuard, Refusal),
    /// Over a cap while too many refusals are in progress: drop it unanswered.
    Dropped(Refusal),
}

/// One listener's budget of refusals in progress.
pub struct Admissions {
    refusing: Arc<Semaphore>,
}

impl Default for Admissions {
    fn default() -> Self {
        Self {
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
        }
    }
}

impl Admissions {
    /// Takes the connection's place under the caps (held by its table row,
    /// so it is given back however the connection ends), or says how to refuse.
    pub fn accept(&self, relay: &Relay, peer: SocketAddr, local: SocketAddr) -> Accepted {
        match relay.quotas.accept(peer.ip()) {
            Ok(slot) => Accepted::Admitted(relay.table.open(peer, local).holding(slot)),
            Err(refusal) => {
                relay.metrics.refused(refusal.why);
                match self.refusing.clone().try_acquire_owned() {
                    Ok(permit) => {
                        Accepted::Refusing(relay.table.open(peer, local).holding(permit), refusal)
                    }
                    Err(_) => Accepted::Dropped(refusal),
                }
            }
        }
    }
}
