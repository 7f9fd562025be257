//! The operators' view: `/admin/connections` (the `ss`-like table),
//! `/admin/stats` (counts and totals), `/metrics` (Prometheus text), and the
//! bearer-token check that guards them when `admin.token` is set.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use http::{HeaderMap, Method, StatusCode, header};
use serde::Serialize;

use crate::protocol::ErrorCode;
use crate::relay::Relay;
use crate::session::table::ConnSnapshot;
use crate::transport::http::{Body, json, json_error, text};

/// Checks `Authorization: Bearer <token>` when a token is configured.
#[allow(clippy::result_large_err)]
pub fn authorize(relay: &Relay, headers: &HeaderMap) -> Result<(), hyper::Response<Body>> {
    let Some(expected) = relay.config.admin.token.as_deref() else {
        return Ok(());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        let mut denied = json_error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "admin endpoints need Authorization: Bearer <admin.token>",
        );
        denied.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        Err(denied)
    }
}

/// Compares without stopping at the first difference, so response timing does
/// not reveal how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves an already-authorized admin request; `segments` is the split path.
pub fn route(relay: &Relay, method: &Method, segments: &[&str]) -> hyper::Response<Body> {
    match (method, segments) {
        (&Method::GET, ["admin", "connections"]) => json(StatusCode::OK, &connections(relay)),
        (&Method::GET, ["admin", "stats"]) => json(StatusCode::OK, &stats(relay)),
        (&Method::GET, ["metrics"]) => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            relay.metrics.render(&relay.table),
        ),
        _ => json_error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no admin endpoint {method} /{}", segments.join("/")),
        ),
    }
}

#[derive(Debug, Serialize)]
pub struct Connections {
    pub count: usize,
    pub connections: Vec<ConnSnapshot>,
}

pub fn connections(relay: &Relay) -> Connections {
    let connections = relay.table.snapshot();
    Connections {
        count: connections.len(),
        connections,
    }
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub uptime_ms: u64,
    pub draining: bool,
    pub connections: ConnectionCounts,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped_messages: u64,
    pub requests: RequestCounts,
    pub spaces: usize,
    pub spaces_connected: usize,
    pub channels: usize,
    /// Resident memory of the relay process, where the OS reports it.
    pub memory_rss_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ConnectionCounts {
    pub total: u64,
    pub accepted_total: u64,
    pub by_transport: BTreeMap<&'static str, u64>,
    pub by_state: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct RequestCounts {
    pub pending: usize,
    pub ok: u64,
    pub failed: u64,
}

pub fn stats(relay: &Relay) -> Stats {
    let mut by_transport = BTreeMap::new();
    let mut by_state = BTreeMap::new();
    let mut total = 0;
    for (transport, state, count) in relay.table.counts() {
        *by_transport.entry(transport.as_str()).or_insert(0) += count;
        *by_state.entry(state.as_str()).or_insert(0) += count;
        total += count;
    }
    let totals = &relay.metrics.totals;
    let spaces = relay.spaces.list();
    Stats {
        uptime_ms: relay.uptime().as_millis() as u64,
        draining: relay.is_draining(),
        connections: ConnectionCounts {
            total,
            accepted_total: totals.accepted.load(Ordering::Relaxed),
            by_transport,
            by_state,
        },
        messages_in: totals.msgs_in.load(Ordering::Relaxed),
        messages_out: totals.msgs_out.load(Ordering::Relaxed),
        bytes_in: totals.bytes_in.load(Ordering::Relaxed),
        bytes_out: totals.bytes_out.load(Ordering::Relaxed),
        dropped_messages: totals.dropped.load(Ordering::Relaxed),
        requests: RequestCounts {
            pending: relay.spaces.pending_count(),
            ok: totals.requests_ok.load(Ordering::Relaxed),
            failed: totals.requests_failed.load(Ordering::Relaxed),
        },
        spaces_connected: spaces.iter().filter(|s| s.connected).count(),
        spaces: spaces.len(),
        channels: relay.channels.len(),
        memory_rss_bytes: resident_memory(),
    }
}

/// Resident set size from `/proc/self/status` (Linux); `None` elsewhere.
pub fn resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
