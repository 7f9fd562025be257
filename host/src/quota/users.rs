//! Per-user quota state: how many connections each user holds and their
//! rate buckets (general and per class), kept across their connections.
//!
//! This is the seam where a cluster makes tier limits hold across nodes:
//! [`UserLedger`] is keyed by the user name admission granted, and
//! [`UserAccount`] is everything the hot path asks of one user. [`LocalUsers`]
//! keeps both in this process; a shared backend would hand out accounts that
//! count connections and draw tokens against a store every node sees (or
//! against a per-node share of the tier's rate, refreshed from it).

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::time::Instant;

use super::{Throttled, class_of};
use crate::hooks::TierLimits;
use crate::rate::Bucket;

/// Where users' quota state lives, keyed by user name.
pub trait UserLedger: Send + Sync + Debug {
    /// The account of `user`, created on first use, its buckets made to
    /// follow `limits` (a policy change restarts only the buckets it changed).
    fn account(&self, user: &str, limits: &TierLimits) -> Arc<dyn UserAccount>;

    /// Forgets users with no connections whose buckets are full again, so
    /// the ledger does not grow with every caller there ever was.
    fn sweep(&self, now: Instant);

    /// Users currently remembered (connected, or still refilling).
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One user's connection count and buckets, as a connection sees them.
pub trait UserAccount: Send + Sync + Debug {
    /// Takes one of the user's connection slots unless `cap` are held.
    fn try_hold(&self, cap: usize) -> bool;

    /// Gives back a slot taken by [`try_hold`](Self::try_hold).
    fn release(&self);

    /// Takes a token from `name`'s class bucket when the tier names that
    /// class, else from the general message bucket.
    fn take(&self, name: Option<&str>, now: Instant) -> Result<(), Throttled>;
}

/// The single-node ledger: a concurrent map of accounts in memory.
#[derive(Debug, Default)]
pub struct LocalUsers {
    users: DashMap<String, Arc<LocalAccount>>,
}

#[derive(Debug)]
struct LocalAccount {
    connections: AtomicUsize,
    buckets: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    messages: Bucket,
    classes: HashMap<String, Bucket>,
}

impl UserLedger for LocalUsers {
    fn account(&self, user: &str, limits: &TierLimits) -> Arc<dyn UserAccount> {
        let account = match self.users.get(user) {
            Some(account) => account.clone(),
            None => self
                .users
                .entry(user.to_owned())
                .or_insert_with(|| {
                    Arc::new(LocalAccount {
                        connections: AtomicUsize::new(0),
                        buckets: Mutex::new(Buckets::new(limits)),
                    })
                })
                .clone(),
        };
        lock(&account.buckets).conform(limits);
        account
    }

    fn sweep(&self, now: Instant) {
        self.users.retain(|_, account| {
            if account.connections.load(Ordering::Acquire) > 0 {
                return true;
            }
            let mut buckets = lock(&account.buckets);
            let full = buckets.messages.is_full_at(now)
                && buckets.classes.values_mut().all(|b| b.is_full_at(now));
            !full
        });
    }

    fn len(&self) -> usize {
        self.users.len()
    }
}

impl UserAccount for LocalAccount {
    fn try_hold(&self, cap: usize) -> bool {
        let held = self.connections.fetch_add(1, Ordering::AcqRel);
        if held >= cap {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn release(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }

    fn take(&self, name: Option<&str>, now: Instant) -> Result<(), Throttled> {
        let class = name.map(class_of);
        let mut buckets = lock(&self.buckets);
        // The scope is spelled out only on refusal: this runs for every message.
        match class.and_then(|class| buckets.classes.get_mut(class).map(|b| (class, b))) {
            Some((class, bucket)) => bucket.take_at(now).map_err(|retry_after| Throttled {
                scope: format!("class:{class}"),
                retry_after,
            }),
            None => buckets
                .messages
                .take_at(now)
                .map_err(|retry_after| Throttled {
                    scope: "user".to_owned(),
                    retry_after,
                }),
        }
    }
}

impl Buckets {
    fn new(limits: &TierLimits) -> Self {
        Self {
            messages: Bucket::new(limits.messages),
            classes: limits
                .classes
                .iter()
                .map(|(name, rate)| (name.clone(), Bucket::new(*rate)))
                .collect(),
        }
    }

    /// Follows a policy change: buckets whose rate changed start afresh.
    fn conform(&mut self, limits: &TierLimits) {
        if self.messages.rate() != limits.messages {
            self.messages = Bucket::new(limits.messages);
        }
        self.classes
            .retain(|name, _| limits.classes.iter().any(|(n, _)| n == name));
        for (name, rate) in &limits.classes {
            match self.classes.get(name) {
                Some(bucket) if bucket.rate() == *rate => {}
                _ => {
                    self.classes.insert(name.clone(), Bucket::new(*rate));
                }
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
