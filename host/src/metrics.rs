//! Relay-wide counters and the Prometheus text exposition of `/metrics`.
//!
//! Counters are updated on the hot path (lock-free atomics inside
//! prometheus-client); the connection gauge is computed from the connection
//! table at scrape time, so it can never drift from the table.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::protocol::ErrorCode;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

pub struct Metrics {
    registry: Registry,
    connections: Family<Labels2, Gauge>,
    messages: Family<Labels1, Counter>,
    bytes: Family<Labels1, Counter>,
    errors: Family<Labels1, Counter>,
    requests: Family<Labels1, Counter>,
    request_latency: Histogram,
    dropped: Counter,
    accepted: Counter,
    refused: Family<Labels1, Counter>,
    throttled: Counter,
    policy_closes: Counter,
    // Mirrors of the hot counters, read by `/admin/stats` without encoding.
    pub totals: Totals,
}

/// Plain totals for `/admin/stats`.
#[derive(Debug, Default)]
pub struct Totals {
    pub msgs_in: AtomicU64,
    pub msgs_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub dropped: AtomicU64,
    pub accepted: AtomicU64,
    pub requests_ok: AtomicU64,
    pub requests_failed: AtomicU64,
    pub refused_global_cap: AtomicU64,
    pub refused_user_cap: AtomicU64,
    pub refused_ip_cap: AtomicU64,
    pub refused_policy: AtomicU64,
    pub refused_slow_handshake: AtomicU64,
    pub refused_handshake_cap: AtomicU64,
    pub throttled: AtomicU64,
    pub policy_closes: AtomicU64,
}

/// Why a connection or HTTP request was refused before it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedFor {
    /// The relay-wide connection cap.
    GlobalCap,
    /// The user's tier cap.
    UserCap,
    /// The per-address cap.
    IpCap,
    /// The policy plugin said no (or failed).
    Policy,
    /// Closed before its first request: headers or the TLS handshake took
    /// longer than allowed.
    SlowHandshake,
    /// QUIC: too many handshakes in progress (`server.quic_max_handshakes`).
    HandshakeCap,
}

impl RefusedFor {
    fn label(self) -> &'static str {
        match self {
            RefusedFor::GlobalCap => "global_cap",
            RefusedFor::UserCap => "user_cap",
            RefusedFor::IpCap => "ip_cap",
            RefusedFor::Policy => "policy",
            RefusedFor::SlowHandshake => "slow_handshake",
            RefusedFor::HandshakeCap => "handshake_cap",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wasmrelay");
        let connections = Family::<Labels2, Gauge>::default();
        registry.register(
            "connections",
            "Open connections by transport and state",
            connections.clone(),
        );
        let messages = Family::<Labels1, Counter>::default();
        registry.register(
            "messages",
            "Protocol messages by direction",
            messages.clone(),
        );
        let bytes = Family::<Labels1, Counter>::default();
        registry.register(
            "bytes",
            "Bytes on the wire by direction, framing included",
            bytes.clone(),
        );
        let errors = Family::<Labels1, Counter>::default();
        registry.register(
            "errors",
            "Protocol errors sent to clients, by code",
            errors.clone(),
        );
        let requests = Family::<Labels1, Counter>::default();
        registry.register(
            "requests",
            "Requests to spaces by outcome",
            requests.clone(),
        );
        // 50 µs .. ~13 s: loopback hand-offs sit at the bottom, slow apps at the top.
        let request_latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 19));
        registry.register(
            "request_duration_seconds",
            "Time from a request reaching the relay to its response leaving it",
            request_latency.clone(),
        );
        let dropped = Counter::default();
        registry.register(
            "dropped_messages",
            "Messages dropped because a consumer's outbound queue was full",
            dropped.clone(),
        );
        let accepted = Counter::default();
        registry.register(
            "accepted_connections",
            "Connections accepted since start",
            accepted.clone(),
        );
        let refused = Family::<Labels1, Counter>::default();
        registry.register(
            "refused",
            "Connections and HTTP requests refused before they started, by reason",
            refused.clone(),
        );
        let throttled = Counter::default();
        registry.register(
            "throttled_messages",
            "Publishes and requests dropped for being over a rate (answered rate_limited / 429)",
            throttled.clone(),
        );
        let policy_closes = Counter::default();
        registry.register(
            "policy_closes",
            "Connections closed for breaking rate limits repeatedly (1008)",
            policy_closes.clone(),
        );
        Self {
            registry,
            connections,
            refused,
            throttled,
            policy_closes,
            messages,
            bytes,
            errors,
            requests,
            request_latency,
            dropped,
            accepted,
            totals: Totals::default(),
        }
    }

    pub fn message_in(&self) {
        self.messages.get_or_create(&[("direction", "in")]).inc();
        self.totals.msgs_in.fetch_add(1, Ordering::Relaxed);
    }

    pub fn messages_out(&self, count: u64) {
        self.messages
            .get_or_create(&[("direction", "out")])
            .inc_by(count);
        self.totals.msgs_out.fetch_add(count, Ordering::Relaxed);
    }

    pub fn bytes_in(&self, count: u64) {
        self.bytes
            .get_or_create(&[("direction", "in")])
            .inc_by(count);
        self.totals.bytes_in.fetch_add(count, Ordering::Relaxed);
    }

    pub fn bytes_out(&self, count: u64) {
        self.bytes
            .get_or_create(&[("direction", "out")])
            .inc_by(count);
        self.totals.bytes_out.fetch_add(count, Ordering::Relaxed);
    }

    pub fn error_sent(&self, code: ErrorCode) {
        self.errors.get_or_create(&[("code", code.as_str())]).inc();
    }

    pub fn refused(&self, why: RefusedFor) {
        self.refused.get_or_create(&[("reason", why.label())]).inc();
        let total = match why {
            RefusedFor::GlobalCap => &self.totals.refused_global_cap,
            RefusedFor::UserCap => &self.totals.refused_user_cap,
            RefusedFor::IpCap => &self.totals.refused_ip_cap,
            RefusedFor::Policy => &self.totals.refused_policy,
            RefusedFor::SlowHandshake => &self.totals.refused_slow_handshake,
            RefusedFor::HandshakeCap => &self.totals.refused_handshake_cap,
        };
        total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn message_throttled(&self) {
        self.throttled.inc();
        self.totals.throttled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn policy_close(&self) {
        self.policy_closes.inc();
        self.totals.policy_closes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn messages_dropped(&self, count: u64) {
        self.dropped.inc_by(count);
        self.totals.dropped.fetch_add(count, Ordering::Relaxed);
    }

    pub fn connection_accepted(&self) {
        self.accepted.inc();
        self.totals.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a finished request: `outcome` is `ok` or an error code.
    pub fn request_finished(&self, outcome: &'static str, seconds: f64) {
        self.requests.get_or_create(&[("outcome", outcome)]).inc();
        self.request_latency.observe(seconds);
        let total = if outcome == "ok" {
            &self.totals.requests_ok
        } else {
            &self.totals.requests_failed
        };
        total.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition, with the connection gauge set from
    /// `connections`: (transport, state, count) as the table counts them now.
    /// (Taken as figures, so metrics need not know the connection table.)
    pub fn render(
        &self,
        connections: impl IntoIterator<Item = (&'static str, &'static str, u64)>,
    ) -> String {
        self.connections.clear();
        for (transport, state, count) in connections {
            self.connections
                .get_or_create(&[("transport", transport), ("state", state)])
                .set(count as i64);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
