//! One channel's history: its last messages, kept for a while so a client
//! that comes back is given exactly what it missed, and the relay-wide byte
//! budget all histories share.
//!
//! Kept messages are always the *suffix* of the channel's sequence: their
//! seqs run without a gap up to the channel's last seq. Whatever is dropped
//! (too old, too many, over budget) goes from the front, and a gap in what
//! arrives (a cluster's broker skipping seqs) clears the history, so "the
//! gap is in history" is one comparison with the first kept seq. The
//! `epoch` names the sequence: a channel whose sequence restarts (a relay
//! restart without a persistent store, a channel forgotten after idling)
//! gets a new one, and a client holding the old one is told to resync.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::hooks::ChannelHistory;
use crate::protocol::{Data, Kept, Position};

/// Bytes charged per kept message on top of its payload.
pub const ENTRY_OVERHEAD: usize = 64;
/// Bytes charged per channel with history on top of its name.
pub const CHANNEL_OVERHEAD: usize = 256;

/// The bytes every channel's history may hold together.
#[derive(Debug)]
pub struct HistoryBudget {
    limit: usize,
    used: AtomicUsize,
    /// Numbers every kept message relay-wide, so "oldest" has an answer
    /// even between messages of the same millisecond.
    next_order: AtomicU64,
}

impl HistoryBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            next_order: AtomicU64::new(0),
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn has_room_for(&self, bytes: usize) -> bool {
        self.used() + bytes <= self.limit
    }

    fn is_over(&self) -> bool {
        self.used() > self.limit
    }

    fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn order(&self) -> u64 {
        self.next_order.fetch_add(1, Ordering::Relaxed)
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// How a channel keeps history (from the configuration's rule for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryOptions {
    pub size: usize,
    pub ttl_ms: i64,
    pub persist: bool,
}

impl From<&crate::config::HistoryRule> for HistoryOptions {
    fn from(rule: &crate::config::HistoryRule) -> Self {
        Self {
            size: rule.size,
            ttl_ms: i64::try_from(rule.ttl_ms).unwrap_or(i64::MAX),
            persist: rule.persist,
        }
    }
}

impl From<HistoryOptions> for ChannelHistory {
    fn from(options: HistoryOptions) -> Self {
        Self {
            size: options.size,
            ttl_ms: u64::try_from(options.ttl_ms).unwrap_or(0),
            persist: options.persist,
        }
    }
}

impl From<ChannelHistory> for HistoryOptions {
    /// Within the bounds a rule has (a plugin's answer is not validated
    /// like a configuration).
    fn from(decided: ChannelHistory) -> Self {
        Self {
            size: decided.size.clamp(1, 10_000),
            ttl_ms: i64::try_from(decided.ttl_ms.max(1)).unwrap_or(i64::MAX),
            persist: decided.persist,
        }
    }
}

/// A kept message. `at_ms` is wall clock, so it means the same after a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub seq: u64,
    pub at_ms: i64,
    pub data: Data,
    /// Its place relay-wide (set when kept; 0 before).
    pub order: u64,
}

impl Entry {
    fn cost(&self) -> usize {
        self.data.len() + ENTRY_OVERHEAD
    }
}

/// What a persisted history has not yet written to the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Unwritten {
    pub epoch: String,
    pub last_seq: u64,
    /// Rows below this seq are no longer kept (and are deleted).
    pub first_kept: u64,
    pub entries: Vec<Entry>,
}

/// A page of history (`history_page`).
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The page begins right after the `since` asked for.
    pub complete: bool,
    /// More kept messages follow this page.
    pub more: bool,
    pub messages: Vec<Kept>,
}

#[derive(Debug)]
pub struct History {
    epoch: Arc<str>,
    options: HistoryOptions,
    entries: VecDeque<Entry>,
    /// Bytes charged to the budget: the entries and the channel's overhead.
    charged: usize,
    budget: Arc<HistoryBudget>,
    /// Last publish, subscribe or unsubscribe (wall ms): idle channels are
    /// forgotten `channels.history_idle_ms` after it.
    pub last_active_ms: i64,
    /// Persisted histories: the last seq written, and whether anything
    /// changed since.
    written_seq: u64,
    dirty: bool,
    /// Its channel is in the set of those to write (see [`History::take_note`]).
    noted: bool,
}

/// A fresh epoch: 16 random hex digits.
/// The epoch every node of a cluster gives a channel numbered under
/// `origin` (the numbering node's own epoch): 16 hex digits of a hash of
/// it (FNV-1a, then an avalanche step), the same on every node and build.
pub fn epoch_of(origin: &str) -> Arc<str> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in origin.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    format!("{hash:016x}").into()
}

pub fn new_epoch() -> Arc<str> {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // Unique enough without OS randomness: the time in nanoseconds.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = nanos.to_be_bytes();
    }
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into()
}

impl History {
    /// An empty history for the channel `name`, charging its overhead.
    pub fn new(
        name: &str,
        epoch: Arc<str>,
        options: HistoryOptions,
        budget: Arc<HistoryBudget>,
        now_ms: i64,
    ) -> Self {
        let charged = CHANNEL_OVERHEAD + name.len();
        budget.charge(charged);
        Self {
            epoch,
            options,
            entries: VecDeque::new(),
            charged,
            budget,
            last_active_ms: now_ms,
            written_seq: 0,
            dirty: false,
            noted: false,
        }
    }

    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    pub fn persist(&self) -> bool {
        self.options.persist
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The relay-wide order of the oldest kept message.
    pub fn oldest(&self) -> Option<u64> {
        self.entries.front().map(|e| e.order)
    }

    /// Keeps message `seq`, the channel's new last one, then drops what
    /// its rule or the budget no longer allows (this channel's oldest
    /// first: the budget is never passed).
    pub fn append(&mut self, seq: u64, data: Data, now_ms: i64) {
        if self.entries.back().is_some_and(|last| last.seq + 1 != seq) {
            // Seqs this node never saw: what is kept no longer ends at a gap-free suffix.
            self.clear();
        }
        let entry = Entry {
            seq,
            at_ms: now_ms,
            data,
            order: self.budget.order(),
        };
        self.charge(entry.cost());
        self.entries.push_back(entry);
        self.last_active_ms = now_ms;
        self.expire(now_ms);
        while self.entries.len() > self.options.size {
            self.pop_oldest();
        }
        while self.budget.is_over() && self.pop_oldest().is_some() {}
        self.dirty = true;
    }

    /// Drops messages past their time; how many.
    pub fn expire(&mut self, now_ms: i64) -> usize {
        let mut dropped = 0;
        while self
            .entries
            .front()
            .is_some_and(|e| e.at_ms.saturating_add(self.options.ttl_ms) <= now_ms)
        {
            self.pop_oldest();
            dropped += 1;
        }
        if dropped > 0 {
            self.dirty = true;
        }
        dropped
    }

    /// Drops the oldest kept message; its seq.
    pub fn pop_oldest(&mut self) -> Option<u64> {
        let entry = self.entries.pop_front()?;
        self.release(entry.cost());
        self.dirty = true;
        Some(entry.seq)
    }

    fn clear(&mut self) {
        while self.pop_oldest().is_some() {}
    }

    /// Drops everything kept and names a new sequence: the channel's
    /// numbering started over.
    pub fn restart(&mut self) {
        self.restart_as(new_epoch());
    }

    /// [`Self::restart`] under a given epoch (in a cluster, the one every
    /// node derives from the numbering node's: [`epoch_of`]).
    pub fn restart_as(&mut self, epoch: Arc<str>) {
        self.clear();
        self.epoch = epoch;
        self.dirty = true;
    }

    /// What a client that saw everything up to `from` missed, when all of
    /// it is still kept (`None`: the epoch differs, or part of the gap is
    /// gone). Call [`History::expire`] first.
    pub fn missed_since(
        &self,
        from: &Position,
        last_seq: u64,
    ) -> Option<impl Iterator<Item = &Entry>> {
        if *from.epoch != *self.epoch || from.seq > last_seq {
            return None;
        }
        let skip = if from.seq == last_seq {
            self.entries.len()
        } else {
            let first = self.entries.front()?.seq;
            if first > from.seq + 1 {
                return None;
            }
            usize::try_from(from.seq + 1 - first).ok()?
        };
        Some(self.entries.iter().skip(skip))
    }

    /// Up to `limit` kept messages after `since` (or the last `limit`),
    /// at most about `max_bytes` of payload (always at least one).
    pub fn page(&self, since: Option<u64>, limit: usize, max_bytes: usize, last_seq: u64) -> Page {
        let first = self.entries.front().map(|e| e.seq);
        let (start, complete) = match (since, first) {
            (Some(since), Some(first)) => {
                let start = usize::try_from(since.saturating_add(1).saturating_sub(first))
                    .unwrap_or(usize::MAX)
                    .min(self.entries.len());
                (start, since.saturating_add(1) >= first)
            }
            // Nothing kept: complete only when nothing was missed.
            (Some(since), None) => (0, since >= last_seq),
            (None, _) => (self.entries.len().saturating_sub(limit), false),
        };
        let mut messages = Vec::new();
        let mut bytes = 0;
        for entry in self.entries.iter().skip(start) {
            if messages.len() == limit
                || (!messages.is_empty() && bytes + entry.data.len() > max_bytes)
            {
                break;
            }
            bytes += entry.data.len();
            messages.push(Kept {
                seq: entry.seq,
                data: entry.data.clone(),
            });
        }
        let more = start + messages.len() < self.entries.len();
        Page {
            complete,
            more,
            messages,
        }
    }

    /// For a persisted history: what changed since the last call, if anything.
    pub fn unwritten(&mut self, last_seq: u64) -> Option<Unwritten> {
        self.noted = false;
        if !self.options.persist || !self.dirty {
            return None;
        }
        self.dirty = false;
        let entries: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| e.seq > self.written_seq)
            .cloned()
            .collect();
        self.written_seq = last_seq;
        Some(Unwritten {
            epoch: self.epoch.to_string(),
            last_seq,
            first_kept: self.entries.front().map_or(last_seq + 1, |e| e.seq),
            entries,
        })
    }

    /// Whether a persisted history changed and its channel is not yet in
    /// the set to write: true once per change, until [`History::unwritten`]
    /// takes it. Ask after anything that may change it.
    pub fn take_note(&mut self) -> bool {
        let due = self.options.persist && self.dirty && !self.noted;
        self.noted |= due;
        due
    }

    /// Puts back what the store kept (oldest first, already written),
    /// within this history's rule and the budget.
    pub fn restore(&mut self, entries: Vec<Entry>, last_seq: u64, now_ms: i64) {
        for mut entry in entries {
            if self
                .entries
                .back()
                .is_some_and(|last| last.seq + 1 != entry.seq)
            {
                self.clear();
            }
            entry.order = self.budget.order();
            self.charge(entry.cost());
            self.entries.push_back(entry);
        }
        // Only a suffix that ends at the last seq counts as history.
        if self.entries.back().is_some_and(|last| last.seq != last_seq) {
            self.clear();
        }
        self.expire(now_ms);
        while self.entries.len() > self.options.size {
            self.pop_oldest();
        }
        while self.budget.is_over() && self.pop_oldest().is_some() {}
        self.written_seq = last_seq;
        // What was dropped here goes from the store at the next write.
        self.dirty = true;
    }

    fn charge(&mut self, bytes: usize) {
        self.charged += bytes;
        self.budget.charge(bytes);
    }

    fn release(&mut self, bytes: usize) {
        self.charged -= bytes;
        self.budget.release(bytes);
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.budget.release(self.charged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(size: usize, ttl_ms: i64, budget: &Arc<HistoryBudget>) -> History {
        History::new(
            "c",
            "e1".into(),
            HistoryOptions {
                size,
                ttl_ms,
                persist: false,
            },
            budget.clone(),
            0,
        )
    }

    fn at(epoch: &str, seq: u64) -> Position {
        Position {
            epoch: epoch.into(),
            seq,
        }
    }

    fn seqs<'a>(entries: impl Iterator<Item = &'a Entry>) -> Vec<u64> {
        entries.map(|e| e.seq).collect()
    }

    #[test]
    fn a_gap_still_kept_is_given_whole_and_one_not_kept_is_refused() {
        let budget = HistoryBudget::new(1 << 20);
        let mut h = history(5, 60_000, &budget);
        for seq in 1..=8 {
            h.append(seq, Data::from("x"), 0);
        }
        // Kept: 4..=8.
        assert_eq!(
            seqs(h.missed_since(&at("e1", 3), 8).unwrap()),
            [4, 5, 6, 7, 8]
        );
        assert_eq!(seqs(h.missed_since(&at("e1", 6), 8).unwrap()), [7, 8]);
        assert!(h.missed_since(&at("e1", 8), 8).unwrap().next().is_none());
        assert!(h.missed_since(&at("e1", 2), 8).is_none(), "3 is gone");
        assert!(h.missed_since(&at("e0", 6), 8).is_none(), "another epoch");
        assert!(h.missed_since(&at("e1", 9), 8).is_none(), "from the future");
    }

    #[test]
    fn old_messages_expire_and_a_gap_in_arrivals_clears_the_history() {
        let budget = HistoryBudget::new(1 << 20);
        let mut h = history(100, 1_000, &budget);
        h.append(1, Data::from("a"), 0);
        h.append(2, Data::from("b"), 500);
        assert_eq!(h.expire(1_000), 1);
        assert_eq!(h.len(), 1);
        h.append(5, Data::from("e"), 1_100);
        assert_eq!(seqs(h.entries.iter()), [5], "3 and 4 were never seen");
        assert!(h.missed_since(&at("e1", 2), 5).is_none());
        assert_eq!(seqs(h.missed_since(&at("e1", 4), 5).unwrap()), [5]);
    }

    #[test]
    fn the_budget_is_never_passed_and_is_given_back_on_drop() {
        let budget = HistoryBudget::new(CHANNEL_OVERHEAD + 1 + 4 * (ENTRY_OVERHEAD + 10));
        let mut h = history(100, 60_000, &budget);
        for seq in 1..=10 {
            h.append(seq, Data::from("0123456789"), 0);
            assert!(budget.used() <= budget.limit(), "{}", budget.used());
        }
        assert_eq!(seqs(h.entries.iter()), [7, 8, 9, 10]);
        drop(h);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn pages_go_oldest_first_and_say_when_more_follow_or_some_are_gone() {
        let budget = HistoryBudget::new(1 << 20);
        let mut h = history(10, 60_000, &budget);
        for seq in 1..=15 {
            h.append(seq, Data::from(format!("{seq}")), 0);
        }
        let page = h.page(Some(8), 3, 1 << 20, 15);
        assert!(page.complete && page.more);
        assert_eq!(
            page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [9, 10, 11]
        );
        let page = h.page(Some(2), 100, 1 << 20, 15);
        assert!(!page.complete, "3 to 5 are gone");
        assert_eq!(page.messages.first().map(|m| m.seq), Some(6));
        let last = h.page(None, 2, 1 << 20, 15);
        assert_eq!(
            last.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [14, 15]
        );
        assert!(!last.more);
        let small = h.page(Some(5), 100, 1, 15);
        assert_eq!(small.messages.len(), 1, "one at least, then the byte cap");
        assert!(small.more);
    }

    #[test]
    fn a_restored_history_keeps_only_a_suffix_ending_at_the_last_seq() {
        let budget = HistoryBudget::new(1 << 20);
        let mut h = history(10, 60_000, &budget);
        let entry = |seq| Entry {
            seq,
            at_ms: 0,
            data: Data::from("x"),
            order: 0,
        };
        h.restore(vec![entry(1), entry(2), entry(4), entry(5)], 5, 10);
        assert_eq!(seqs(h.entries.iter()), [4, 5]);
        let mut h = history(10, 60_000, &budget);
        h.restore(vec![entry(1), entry(2)], 3, 10);
        assert!(h.is_empty(), "3 was never written");
    }
}
