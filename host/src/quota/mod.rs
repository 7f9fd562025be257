//! Quotas: how many connections, and how many messages per second, a client
//! may have. Admission (the policy plugin) decides the user, tier and the
//! tier's limits; this module enforces them natively and cheaply:
//!
//! - connection caps: relay-wide and per IP address for every connection
//!   (plain HTTP, TLS, WebSocket, QUIC) from the moment it is accepted
//!   ([`SocketSlot`]), before any protocol runs; and per user for its tier,
//!   checked before a WebSocket upgrade or a QUIC control stream, and again
//!   when `hello` carries a token that names a user ([`ConnQuota::rebind`]);
//!   each released when the connection ends;
//! - token buckets per connection, per user across all their connections,
//!   and per user and message class (a class is the first segment of a
//!   channel or space name that the tier names, e.g. `chat/lobby` → `chat`).
//!
//! Users' buckets outlive their connections (reconnecting does not refill a
//! bucket) and are forgotten only once full again, by [`Quotas::sweep`].
//! Per-user state lives behind [`users::UserLedger`], the seam a cluster
//! fills to make tier limits hold across nodes.

pub mod users;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::config::LimitsConfig;
use crate::hooks::Grant;
use crate::metrics::{Metrics, RefusedFor};
use crate::protocol::ErrorCode;
use crate::rate::{Bucket, Rate};
use users::{LocalUsers, UserAccount, UserLedger};

pub use crate::hooks::TierLimits;

/// Why a connection was refused before it opened.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub why: RefusedFor,
    pub status: u16,
    pub code: ErrorCode,
    pub reason: String,
    /// For a full cap: when trying again is reasonable (HTTP Retry-After).
    pub retry_after: Option<Duration>,
}

/// A message over its rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttled {
    /// Which bucket ran dry: `connection`, `user` or `class:NAME`.
    pub scope: String,
    pub retry_after: Duration,
}

#[derive(Debug)]
pub struct Quotas {
    max_connections: usize,
    max_connections_per_ip: usize,
    per_connection: Option<Rate>,
    violations_before_close: u32,
    connections: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
    users: Arc<dyn UserLedger>,
}

/// The admission policy's verdict on `handshake`, a denial counted and
/// turned into the refusal to answer with.
pub fn admit_policy(
    admission: &dyn crate::hooks::Admission,
    metrics: &Metrics,
    handshake: &crate::hooks::Handshake<'_>,
) -> Result<Option<Grant>, Refusal> {
    match admission.admit(handshake) {
        crate::hooks::Admit::Allow(grant) => Ok(grant),
        crate::hooks::Admit::Deny {
            status,
            code,
            reason,
        } => {
            metrics.refused(RefusedFor::Policy);
            Err(Refusal {
                why: RefusedFor::Policy,
                status,
                code,
                reason,
                retry_after: None,
            })
        }
    }
}

/// Retry-After for refusals: caps free up when someone disconnects, which
/// the relay cannot predict, so this is a polite back-off rather than a promise.
const CAP_RETRY_AFTER: Duration = Duration::from_secs(5);

impl Quotas {
    /// Quotas whose per-user state stays in this process.
    pub fn new(limits: &LimitsConfig) -> Self {
        Self::with_ledger(limits, Arc::new(LocalUsers::default()))
    }

    /// Quotas keeping per-user state in `users` (shared, in a cluster).
    pub fn with_ledger(limits: &LimitsConfig, users: Arc<dyn UserLedger>) -> Self {
        Self {
            max_connections: limits.max_connections,
            max_connections_per_ip: limits.max_connections_per_ip,
            per_connection: (limits.connection_rate.per_second > 0
                || limits.connection_rate.burst > 0)
                .then_some(limits.connection_rate),
            violations_before_close: limits.rate_violations_before_close,
            connections: AtomicUsize::new(0),
            per_ip: DashMap::new(),
            users,
        }
    }

    /// Connections currently holding a quota.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Takes a place for a just-accepted connection under the relay-wide
    /// and per-address caps, or says which is full. Given back when the
    /// returned slot is dropped.
    pub fn accept(self: &Arc<Self>, peer: IpAddr) -> Result<SocketSlot, Refusal> {
        if self.connections.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal {
                why: RefusedFor::GlobalCap,
                status: 503,
                code: ErrorCode::Overloaded,
                reason: format!(
                    "the relay holds its maximum of {} connections",
                    self.max_connections
                ),
                retry_after: Some(CAP_RETRY_AFTER),
            });
        }
        let mut held = self.per_ip.entry(peer).or_insert(0);
        if *held >= self.max_connections_per_ip {
            drop(held);
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal {
                why: RefusedFor::IpCap,
                status: 429,
                code: ErrorCode::TooManyConnections,
                reason: format!(
                    "{peer} already holds the {} connections allowed per address",
                    self.max_connections_per_ip
                ),
                retry_after: Some(CAP_RETRY_AFTER),
            });
        }
        *held += 1;
        Ok(SocketSlot {
            quotas: self.clone(),
            ip: peer,
        })
    }

    /// Takes the user's slot under their tier's cap (when a policy named the
    /// client) and sets up the connection's buckets. The slot is given back
    /// when the returned quota is dropped.
    pub fn open(self: &Arc<Self>, grant: Option<&Grant>) -> Result<ConnQuota, Refusal> {
        // From here on, dropping `quota` undoes what was taken.
        let mut quota = ConnQuota {
            quotas: self.clone(),
            user: None,
            connection: self.per_connection.map(Bucket::new),
            violations: 0,
        };
        if let Some((grant, limits)) = grant.and_then(|g| g.limits.as_ref().map(|l| (g, l))) {
            let account = self.users.account(&grant.user, limits);
            let cap = limits.max_connections as usize;
            if !account.try_hold(cap) {
                return Err(user_cap_refusal(grant, cap));
            }
            quota.user = Some(Held {
                name: grant.user.clone(),
                account,
            });
        }
        Ok(quota)
    }

    /// Rate check for one HTTP ingress request, which has no connection: the
    /// user's buckets (or nothing, when no policy identified the caller).
    pub fn check_request(&self, grant: Option<&Grant>, name: &str) -> Result<(), Throttled> {
        let Some((grant, limits)) = grant.and_then(|g| g.limits.as_ref().map(|l| (g, l))) else {
            return Ok(());
        };
        self.users
            .account(&grant.user, limits)
            .take(Some(name), Instant::now())
    }

    /// Forgets users with no connections whose buckets are full again, so the
    /// table does not grow with every address that ever called.
    pub fn sweep(&self) {
        self.users.sweep(Instant::now());
        self.per_ip.retain(|_, held| *held > 0);
    }

    /// Users the relay currently remembers (connected or still refilling).
    pub fn users(&self) -> usize {
        self.users.len()
    }
}

fn user_cap_refusal(grant: &Grant, cap: usize) -> Refusal {
    Refusal {
        why: RefusedFor::UserCap,
        status: 429,
        code: ErrorCode::TooManyConnections,
        reason: format!(
            "user {} already holds the {} connections tier {} allows",
            grant.user, cap, grant.tier
        ),
        retry_after: Some(CAP_RETRY_AFTER),
    }
}

/// The class a channel or space name belongs to: its first segment.
pub fn class_of(name: &str) -> &str {
    name.split(['/', ':', '.']).next().unwrap_or(name)
}

/// A connection's place under the relay-wide and per-address caps, from
/// accept until it is dropped with the connection.
#[derive(Debug)]
pub struct SocketSlot {
    quotas: Arc<Quotas>,
    ip: IpAddr,
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.quotas.connections.fetch_sub(1, Ordering::AcqRel);
        if let Some(mut held) = self.quotas.per_ip.get_mut(&self.ip) {
            *held = held.saturating_sub(1);
        }
    }
}

/// One connection's user slot and buckets; gives the slot back when dropped.
#[derive(Debug)]
pub struct ConnQuota {
    quotas: Arc<Quotas>,
    user: Option<Held>,
    connection: Option<Bucket>,
    violations: u32,
}

/// The user a connection counts against, and their account.
#[derive(Debug)]
struct Held {
    name: String,
    account: Arc<dyn UserAccount>,
}

/// The verdict on one rate-limited message.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    /// Drop the message; tell the sender.
    Throttle(Throttled),
    /// Drop it and close the connection: too many violations in a row.
    Close(Throttled),
}

impl ConnQuota {
    /// Moves this connection to the user `grant` names, when admission learns
    /// who it is only after the upgrade (a token in `hello`): the user's tier
    /// cap is checked now, and the previous user's slot is given back once
    /// the new one is taken. A grant without limits changes nothing.
    pub fn rebind(&mut self, grant: &Grant) -> Result<(), Refusal> {
        let Some(limits) = grant.limits.as_ref() else {
            return Ok(());
        };
        let account = self.quotas.users.account(&grant.user, limits);
        if self
            .user
            .as_ref()
            .is_some_and(|held| held.name == grant.user)
        {
            return Ok(());
        }
        let cap = limits.max_connections as usize;
        if !account.try_hold(cap) {
            return Err(user_cap_refusal(grant, cap));
        }
        let now_held = Held {
            name: grant.user.clone(),
            account,
        };
        if let Some(previous) = self.user.replace(now_held) {
            previous.account.release();
        }
        Ok(())
    }

    /// Charges one control message (subscribe, unsubscribe, register): the
    /// connection's bucket and the user's general message bucket, whatever
    /// the name's class, so churning subscriptions costs like publishing.
    pub fn charge_control(&mut self) -> Verdict {
        self.charge_as(None)
    }

    /// Charges one publish or request addressed to `name` (channel or space).
    pub fn charge(&mut self, name: &str) -> Verdict {
        self.charge_as(Some(name))
    }

    /// `name` picks the user's class bucket; `None` is the general one.
    fn charge_as(&mut self, name: Option<&str>) -> Verdict {
        if self.connection.is_none() && self.user.is_none() {
            return Verdict::Pass;
        }
        let now = Instant::now();
        let result = match &mut self.connection {
            Some(bucket) => bucket.take_at(now).map_err(|retry_after| Throttled {
                scope: "connection".to_owned(),
                retry_after,
            }),
            None => Ok(()),
        };
        let result = result.and_then(|()| match &self.user {
            Some(held) => held.account.take(name, now),
            None => Ok(()),
        });
        match result {
            Ok(()) => {
                self.violations = 0;
                Verdict::Pass
            }
            Err(throttled) => {
                self.violations += 1;
                if self.violations > self.quotas.violations_before_close {
                    Verdict::Close(throttled)
                } else {
                    Verdict::Throttle(throttled)
                }
            }
        }
    }
}

impl Drop for ConnQuota {
    fn drop(&mut self) {
        if let Some(held) = &self.user {
            held.account.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn quotas(max_connections: usize, per_ip: usize, violations: u32) -> Arc<Quotas> {
        let limits = LimitsConfig {
            max_connections,
            max_connections_per_ip: per_ip,
            rate_violations_before_close: violations,
            ..LimitsConfig::default()
        };
        Arc::new(Quotas::new(&limits))
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    fn grant(user: &str, max_connections: u32, per_second: u32, burst: u32) -> Grant {
        Grant {
            user: user.to_owned(),
            tier: "t".to_owned(),
            limits: Some(TierLimits {
                max_connections,
                messages: Rate { per_second, burst },
                classes: vec![(
                    "chat".to_owned(),
                    Rate {
                        per_second: 1,
                        burst: 1,
                    },
                )],
            }),
        }
    }

    #[test]
    fn accepted_connections_count_against_the_global_and_address_caps() {
        let quotas = quotas(3, 2, 10);
        let a1 = quotas.accept(ip(1)).unwrap();
        let _a2 = quotas.accept(ip(1)).unwrap();
        let refused = quotas.accept(ip(1)).unwrap_err();
        assert_eq!(
            (refused.why, refused.status, refused.code),
            (RefusedFor::IpCap, 429, ErrorCode::TooManyConnections)
        );
        let _b = quotas.accept(ip(2)).unwrap();
        let refused = quotas.accept(ip(3)).unwrap_err();
        assert_eq!(
            (refused.why, refused.status, refused.code),
            (RefusedFor::GlobalCap, 503, ErrorCode::Overloaded)
        );
        assert_eq!(quotas.connections(), 3, "refusals hold nothing");
        drop(a1);
        assert!(quotas.accept(ip(3)).is_ok());
        assert!(quotas.accept(ip(1)).is_ok(), "a1's address slot is free");
    }

    #[test]
    fn a_tier_caps_each_user_wherever_they_connect_from() {
        let quotas = quotas(100, 1, 10);
        let alice = grant("alice", 2, 10, 10);
        let first = quotas.open(Some(&alice)).unwrap();
        let _second = quotas.open(Some(&alice)).unwrap();
        let refused = quotas.open(Some(&alice)).unwrap_err();
        assert_eq!((refused.why, refused.status), (RefusedFor::UserCap, 429));
        assert!(refused.reason.contains("alice"), "{}", refused.reason);
        assert!(quotas.open(Some(&grant("bob", 2, 10, 10))).is_ok());
        drop(first);
        assert!(quotas.open(Some(&alice)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn relays_sharing_a_ledger_share_each_users_cap_and_buckets() {
        // Two nodes' quotas over one ledger: what a cluster backend provides.
        let ledger: Arc<dyn UserLedger> = Arc::new(LocalUsers::default());
        let node_a = Arc::new(Quotas::with_ledger(
            &LimitsConfig::default(),
            ledger.clone(),
        ));
        let node_b = Arc::new(Quotas::with_ledger(
            &LimitsConfig::default(),
            ledger.clone(),
        ));
        let alice = grant("alice", 1, 1, 1);
        let mut on_a = node_a.open(Some(&alice)).unwrap();
        let refused = node_b.open(Some(&alice)).unwrap_err();
        assert_eq!(refused.why, RefusedFor::UserCap);
        assert_eq!(on_a.charge("news"), Verdict::Pass);
        assert!(
            node_b.check_request(Some(&alice), "news").is_err(),
            "bucket shared"
        );
        drop(on_a);
        assert!(
            node_b.open(Some(&alice)).is_ok(),
            "slot given back to the ledger"
        );
        assert_eq!(ledger.len(), 1);
    }

    #[test]
    fn rebinding_to_a_user_moves_the_slot_or_is_refused_at_the_cap() {
        let quotas = quotas(100, 1, 10);
        let alice = grant("alice", 1, 10, 10);
        let mut anonymous = quotas.open(None).unwrap();
        anonymous.rebind(&alice).unwrap();
        // alice's only slot is taken.
        let mut second = quotas.open(None).unwrap();
        let refused = second.rebind(&alice).unwrap_err();
        assert_eq!(
            (refused.why, refused.status, refused.code),
            (RefusedFor::UserCap, 429, ErrorCode::TooManyConnections)
        );
        assert!(refused.reason.contains("alice"), "{}", refused.reason);
        anonymous.rebind(&alice).unwrap();
        anonymous.rebind(&grant("bob", 1, 10, 10)).unwrap();
        second.rebind(&alice).unwrap();
        drop((anonymous, second));
        assert!(quotas.open(Some(&alice)).is_ok(), "alice's slot is free");
        assert!(quotas.open(Some(&grant("bob", 1, 10, 10))).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_users_buckets_are_shared_and_survive_reconnecting() {
        let quotas = quotas(100, 10, 100);
        let alice = grant("alice", 5, 1, 2);
        let mut one = quotas.open(Some(&alice)).unwrap();
        let mut two = quotas.open(Some(&alice)).unwrap();
        assert_eq!(one.charge("news"), Verdict::Pass);
        assert_eq!(two.charge("news"), Verdict::Pass);
        let Verdict::Throttle(throttled) = one.charge("news") else {
            panic!("the third message in a burst of 2 must be throttled");
        };
        assert_eq!(throttled.scope, "user");
        assert_eq!(throttled.retry_after, Duration::from_secs(1));
        drop((one, two));
        let mut again = quotas.open(Some(&alice)).unwrap();
        assert!(matches!(again.charge("news"), Verdict::Throttle(_)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(again.charge("news"), Verdict::Pass);
    }

    #[tokio::test(start_paused = true)]
    async fn classes_have_their_own_buckets() {
        let quotas = quotas(100, 10, 100);
        let mut conn = quotas.open(Some(&grant("alice", 5, 100, 100))).unwrap();
        assert_eq!(conn.charge("chat/lobby"), Verdict::Pass);
        match conn.charge("chat:other") {
            Verdict::Throttle(t) => assert_eq!(t.scope, "class:chat"),
            other => panic!("expected the chat class to be dry, got {other:?}"),
        }
        // Other names use the general bucket, which is full.
        assert_eq!(conn.charge("news/today"), Verdict::Pass);
    }

    #[tokio::test(start_paused = true)]
    async fn violations_in_a_row_close_and_a_pass_forgives() {
        let quotas = quotas(100, 10, 2);
        let mut conn = quotas.open(Some(&grant("alice", 5, 1, 1))).unwrap();
        assert_eq!(conn.charge("x"), Verdict::Pass);
        assert!(matches!(conn.charge("x"), Verdict::Throttle(_)));
        assert!(matches!(conn.charge("x"), Verdict::Throttle(_)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(conn.charge("x"), Verdict::Pass, "the count starts over");
        assert!(matches!(conn.charge("x"), Verdict::Throttle(_)));
        assert!(matches!(conn.charge("x"), Verdict::Throttle(_)));
        assert!(matches!(conn.charge("x"), Verdict::Close(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_forgets_only_idle_users_with_full_buckets() {
        let quotas = quotas(100, 10, 100);
        let alice = grant("alice", 5, 1, 1);
        let mut conn = quotas.open(Some(&alice)).unwrap();
        assert_eq!(conn.charge("x"), Verdict::Pass);
        quotas.sweep();
        assert_eq!(quotas.users(), 1, "connected");
        drop(conn);
        quotas.sweep();
        assert_eq!(quotas.users(), 1, "bucket still refilling");
        tokio::time::advance(Duration::from_secs(1)).await;
        quotas.sweep();
        assert_eq!(quotas.users(), 0);
    }
}
