//! The connection table: one row per live connection with its live figures,
//! what the operators' `ss`-like view and the metrics read. A row is removed by
//! dropping its [`ConnGuard`], so no path out of a connection can leak it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::Serialize;

use super::queue::OutboundQueue;

/// The connection's transport, as shown in the table and the metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Transport {
    Http = 0,
    Ws = 1,
    Quic = 2,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::Http, Transport::Ws, Transport::Quic];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Ws => "ws",
            Transport::Quic => "quic",
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => Transport::Ws,
            2 => Transport::Quic,
            _ => Transport::Http,
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum ConnState {
    /// Accepted; a WebSocket waiting for `hello`, or HTTP before its first request.
    Handshake = 0,
    /// Speaking the protocol (WebSocket after `hello`), or HTTP after its first request.
    Open = 1,
    /// Told to go away; finishing in-flight work.
    Draining = 2,
    /// Closing.
    Closing = 3,
}

impl ConnState {
    pub const ALL: [ConnState; 4] = [
        ConnState::Handshake,
        ConnState::Open,
        ConnState::Draining,
        ConnState::Closing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Handshake => "handshake",
            ConnState::Open => "open",
            ConnState::Draining => "draining",
            ConnState::Closing => "closing",
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => ConnState::Open,
            2 => ConnState::Draining,
            3 => ConnState::Closing,
            _ => ConnState::Handshake,
        }
    }
}

/// One row of the table. Counters are atomics so the connection's task updates
/// them without locks while admin readers take snapshots.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    opened: Instant,
    opened_unix_ms: u64,
    transport: AtomicU8,
    state: AtomicU8,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub msgs_in: AtomicU64,
    pub msgs_out: AtomicU64,
    /// Messages dropped because this connection's outbound queue was full.
    pub dropped: AtomicU64,
    /// Requests this connection has sent to spaces that are not answered yet.
    pub requests_in_flight: AtomicUsize,
    queue: OnceLock<Arc<OutboundQueue>>,
    detail: Mutex<Detail>,
}

/// The slow-changing, descriptive part of a row.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Detail {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The user and tier the admission policy assigned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub spaces: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    /// QUIC connections: path figures from quinn, refreshed every second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic: Option<QuicFigures>,
}

/// What quinn reports about a QUIC connection's path.
#[derive(Debug, Default, Clone, Serialize)]
pub struct QuicFigures {
    pub rtt_us: u64,
    pub cwnd_bytes: u64,
    pub lost_packets: u64,
    pub sent_packets: u64,
    pub congestion_events: u64,
    pub udp_rx_bytes: u64,
    pub udp_tx_bytes: u64,
}

impl ConnInfo {
    pub fn transport(&self) -> Transport {
        Transport::from_u8(self.transport.load(Ordering::Relaxed))
    }

    pub fn set_transport(&self, transport: Transport) {
        self.transport.store(transport as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, state: ConnState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Lets the table report this connection's outbound queue depth.
    pub fn attach_queue(&self, queue: Arc<OutboundQueue>) {
        let _ = self.queue.set(queue);
    }

    /// The connection's outbound queue, once it speaks the protocol.
    pub fn queue(&self) -> Option<Arc<OutboundQueue>> {
        self.queue.get().cloned()
    }

    pub fn queue_depth(&self) -> usize {
        self.queue.get().map_or(0, |q| q.len())
    }

    pub fn queue_bytes(&self) -> usize {
        self.queue.get().map_or(0, |q| q.bytes())
    }

    /// Shows the user and tier admission gave this connection.
    pub fn record_grant(&self, grant: Option<crate::hooks::Grant>) {
        if let Some(grant) = grant {
            self.update_detail(|d| {
                d.user = Some(grant.user);
                d.tier = Some(grant.tier);
            });
        }
    }

    /// Edits the descriptive part; the closure must not block.
    /// The user and tier admission granted, if a policy identified the client.
    pub fn identity(&self) -> Option<(String, String)> {
        let detail = self.detail.lock().unwrap_or_else(|e| e.into_inner());
        detail.user.clone().zip(detail.tier.clone())
    }

    pub fn update_detail(&self, edit: impl FnOnce(&mut Detail)) {
        let mut detail = self.detail.lock().unwrap_or_else(|e| e.into_inner());
        edit(&mut detail);
    }

    pub fn snapshot(&self) -> ConnSnapshot {
        let detail = self
            .detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        ConnSnapshot {
            id: self.id,
            transport: self.transport(),
            state: self.state(),
            local: self.local,
            peer: self.peer,
            age_ms: self.opened.elapsed().as_millis() as u64,
            opened_unix_ms: self.opened_unix_ms,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            msgs_in: self.msgs_in.load(Ordering::Relaxed),
            msgs_out: self.msgs_out.load(Ordering::Relaxed),
            queue_depth: self.queue_depth(),
            queue_bytes: self.queue_bytes(),
            dropped: self.dropped.load(Ordering::Relaxed),
            requests_in_flight: self.requests_in_flight.load(Ordering::Relaxed),
            detail,
        }
    }
}

/// A row as `GET /admin/connections` returns it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnSnapshot {
    pub id: u64,
    pub transport: Transport,
    pub state: ConnState,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub age_ms: u64,
    pub opened_unix_ms: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub msgs_in: u64,
    pub msgs_out: u64,
    pub queue_depth: usize,
    /// Bytes in the outbound queue (payloads plus a 64-byte estimate each).
    pub queue_bytes: usize,
    pub dropped: u64,
    pub requests_in_flight: usize,
    #[serde(flatten)]
    pub detail: Detail,
}

#[derive(Debug, Default)]
pub struct ConnTable {
    rows: DashMap<u64, Arc<ConnInfo>>,
    next_id: AtomicU64,
}

impl ConnTable {
    /// Adds a row; it lives exactly as long as the returned guard.
    pub fn open(self: &Arc<Self>, peer: SocketAddr, local: SocketAddr) -> ConnGuard {
        let info = self.new_info(peer, local);
        self.rows.insert(info.id, info.clone());
        ConnGuard {
            table: self.clone(),
            info,
            _held: None,
        }
    }

    /// A row that is not listed: for what stands in for connections
    /// elsewhere (another cluster node's callers or instances). Its id
    /// comes from the same sequence, so it is never a listed row's.
    pub fn detached(&self) -> Arc<ConnInfo> {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        self.new_info(unspecified, unspecified)
    }

    fn new_info(&self, peer: SocketAddr, local: SocketAddr) -> Arc<ConnInfo> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        Arc::new(ConnInfo {
            id,
            peer,
            local,
            opened: Instant::now(),
            opened_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            transport: AtomicU8::new(Transport::Http as u8),
            state: AtomicU8::new(ConnState::Handshake as u8),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            msgs_in: AtomicU64::new(0),
            msgs_out: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            requests_in_flight: AtomicUsize::new(0),
            queue: OnceLock::new(),
            detail: Mutex::new(Detail::default()),
        })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn get(&self, id: u64) -> Option<Arc<ConnInfo>> {
        self.rows.get(&id).map(|row| row.clone())
    }

    /// Every row, in no order.
    pub fn all(&self) -> Vec<Arc<ConnInfo>> {
        self.rows.iter().map(|row| row.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Snapshots of every row, oldest first.
    pub fn snapshot(&self) -> Vec<ConnSnapshot> {
        let mut rows: Vec<ConnSnapshot> = self.rows.iter().map(|r| r.snapshot()).collect();
        rows.sort_by_key(|r| r.id);
        rows
    }

    /// Connection counts by transport and state, every combination present.
    pub fn counts(&self) -> Vec<(Transport, ConnState, u64)> {
        let mut counts = [[0u64; ConnState::ALL.len()]; Transport::ALL.len()];
        for row in self.rows.iter() {
            counts[row.transport() as usize][row.state() as usize] += 1;
        }
        let mut out = Vec::with_capacity(Transport::ALL.len() * ConnState::ALL.len());
        for transport in Transport::ALL {
            for state in ConnState::ALL {
                out.push((transport, state, counts[transport as usize][state as usize]));
            }
        }
        out
    }
}

/// Owns a table row; dropping it removes the row.
#[derive(Debug)]
pub struct ConnGuard {
    table: Arc<ConnTable>,
    info: Arc<ConnInfo>,
    /// What the connection holds until it ends (its place under the
    /// connection caps), released with the row.
    _held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl ConnGuard {
    pub fn info(&self) -> &Arc<ConnInfo> {
        &self.info
    }

    /// Keeps `held` until the connection ends, whichever task ends it.
    pub fn holding(mut self, held: impl std::any::Any + Send + Sync) -> Self {
        self._held = Some(Box::new(held));
        self
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.table.rows.remove(&self.info.id);
    }
}
