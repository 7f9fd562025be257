//! Pub/sub on this node: channels, their subscribers, per-channel sequence
//! numbers, presence, and the [`history`] of the channels configured to
//! keep one.
//!
//! A channel without history exists while it has subscribers; the last
//! unsubscribe removes it, so client-chosen channel names cannot grow the
//! map without end, and its sequence counts from 1 again when it is next
//! created. A channel with history also lives while it keeps messages, and
//! for `channels.history_idle_ms` after; the history budget bounds them all
//! ([`Channels::sweep`] forgets the idlest when it runs short).

pub mod history;
pub mod persist;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::config::{ChannelsConfig, SlowConsumer};
use crate::delivery::queue::{OutboundQueue, Overflow};
use crate::delivery::table::ConnInfo;
use crate::delivery::{Outbound, Pressure, deliver, deliver_pressing};
use crate::hooks::Router;
use crate::metrics::Metrics;
use crate::protocol::{Data, ErrorCode, Member, Msg, Position};
use crate::store::wall_ms;
use history::{CHANNEL_OVERHEAD, History, HistoryBudget, HistoryOptions, Page};

/// `members` lists at most this many subscribers.
pub const MAX_MEMBERS: usize = 1000;
/// A `history` page holds at most this many messages.
pub const MAX_PAGE: usize = 1000;

/// A subscriber's delivery handle.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub conn: Arc<ConnInfo>,
    pub queue: Arc<OutboundQueue>,
}

/// One channel. Numbering, delivery and presence announcements all happen
/// under its one lock, so every subscriber sees messages in `seq` order and
/// presence counts in the order they changed. Delivery never waits (a full
/// queue gets the channel's slow-consumer policy), so the lock is held only
/// for the fan-out itself.
#[derive(Debug, Default)]
struct Channel {
    state: Mutex<ChannelState>,
}

#[derive(Debug, Default)]
struct ChannelState {
    last_seq: u64,
    subscribers: HashMap<u64, Subscriber>,
    history: Option<History>,
    /// Taken out of the map: a publish that found it just before must
    /// look again, or its message would be kept where nobody looks.
    gone: bool,
    /// In a cluster: whose numbering the last message came under.
    origin: Option<Arc<str>>,
}

impl ChannelState {
    /// Nothing to keep it for: no subscriber and no history.
    fn is_unused(&self) -> bool {
        self.subscribers.is_empty() && self.history.is_none()
    }
}

/// In a cluster, who numbers a channel now.
pub trait Numbering: Send + Sync {
    /// The numbering node's epoch for `channel` (what `deliver_from` gets
    /// as its origin), when known here. Called under the channel map's
    /// lock: it must never wait for a lock of its own.
    fn origin(&self, channel: &str) -> Option<String>;
}

/// What a subscribe found.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// The channel's last seq and subscriber count.
    pub seq: u64,
    pub presence: u64,
    /// With history: the channel's epoch.
    pub epoch: Option<String>,
    /// When asked to recover: whether the gap was queued whole.
    pub recovered: Option<bool>,
}

/// Why a `history` or `who` was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub code: ErrorCode,
    pub reason: String,
}

/// How many subscribe to a channel across the system: on one node, its own
/// subscribers ([`Channels`]); a cluster backend sums every node's.
pub trait PresenceView: Send + Sync {
    fn presence(&self, channel: &str) -> u64;
}

impl PresenceView for Channels {
    fn presence(&self, channel: &str) -> u64 {
        Channels::presence(self, channel)
    }
}

fn lock(channel: &Channel) -> std::sync::MutexGuard<'_, ChannelState> {
    channel.state.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Channels {
    map: DashMap<String, Arc<Channel>>,
    metrics: Arc<Metrics>,
    policies: ChannelsConfig,
    budget: Arc<HistoryBudget>,
    /// Persisted channels with changes not yet written ([`persist`]), and
    /// those forgotten (their rows go). Bounded by the channels with history.
    unwritten: Mutex<PendingWrites>,
    changed: Notify,
    /// The router hook, when one may decide channels' history (set once,
    /// after the plugins that answer it exist). Weak: the plugins hold the
    /// channels (presence, publish), and a cycle would keep the whole relay
    /// alive after it stopped.
    router: std::sync::OnceLock<std::sync::Weak<dyn Router>>,
    /// In a cluster: whose numbering a channel is under now.
    numbering: std::sync::OnceLock<std::sync::Weak<dyn Numbering>>,
    /// Set at shutdown before the last write of persisted history: from
    /// then on persisted channels number nothing, so no seq is handed out
    /// that the store (marked clean) does not know.
    sealed: std::sync::atomic::AtomicBool,
}

/// Persisted channels whose store rows are behind.
#[derive(Debug, Default)]
struct PendingWrites {
    changed: HashSet<String>,
    forgotten: HashSet<String>,
}

impl Channels {
    pub fn new(metrics: Arc<Metrics>, policies: ChannelsConfig) -> Self {
        Self {
            map: DashMap::new(),
            metrics,
            budget: HistoryBudget::new(policies.history_memory_bytes),
            policies,
            unwritten: Mutex::new(PendingWrites::default()),
            changed: Notify::new(),
            router: std::sync::OnceLock::new(),
            numbering: std::sync::OnceLock::new(),
            sealed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Stops numbering on persisted channels (publishes there answer seq
    /// 0 and reach nobody): the last step of a shutdown before the final
    /// write of history.
    pub fn seal(&self) {
        self.sealed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_sealed(&self, state: &ChannelState) -> bool {
        state.history.as_ref().is_some_and(History::persist)
            && self.sealed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets `router` decide which new channels keep history (over the
    /// configuration). Once; later calls are ignored.
    pub fn set_router(&self, router: &Arc<dyn Router>) {
        let _ = self.router.set(Arc::downgrade(router));
    }

    /// In a cluster: who numbers channels, so a new channel's history
    /// starts under the epoch every node gives it. Once.
    pub fn set_numbering(&self, numbering: std::sync::Weak<dyn Numbering>) {
        let _ = self.numbering.set(numbering);
    }

    /// A new channel with the history `decided` (see [`Self::decide`]),
    /// if the budget has room for one more.
    fn create(&self, name: &str, decided: Option<HistoryOptions>, now_ms: i64) -> Arc<Channel> {
        // In a cluster, under the numbering node's epoch from the start, so
        // a subscriber's first position is good on every node.
        let origin = decided.as_ref().and_then(|_| {
            self.numbering
                .get()
                .and_then(std::sync::Weak::upgrade)
                .and_then(|numbering| numbering.origin(name))
        });
        self.create_under(name, decided, now_ms, origin)
    }

    /// [`Self::create`] for a channel whose numbering (`origin`) is known.
    fn create_under(
        &self,
        name: &str,
        decided: Option<HistoryOptions>,
        now_ms: i64,
        origin: Option<String>,
    ) -> Arc<Channel> {
        let history = decided
            .filter(|_| {
                let room = self.budget.has_room_for(CHANNEL_OVERHEAD + name.len());
                if !room {
                    tracing::warn!(channel = %name, used = self.budget.used(), "channels.history_memory_bytes reached: a new channel keeps no history");
                }
                room
            })
            .map(|options| {
                let epoch = origin
                    .as_deref()
                    .map_or_else(history::new_epoch, history::epoch_of);
                History::new(name, epoch, options, self.budget.clone(), now_ms)
            });
        Arc::new(Channel {
            state: Mutex::new(ChannelState {
                origin: origin.filter(|_| history.is_some()).map(Into::into),
                history,
                ..ChannelState::default()
            }),
        })
    }

    /// The history the configuration gives `name`.
    fn configured(&self, name: &str) -> Option<HistoryOptions> {
        self.policies.history_for(name).map(HistoryOptions::from)
    }

    /// The history a new channel `name` keeps: the configuration's answer,
    /// as the router plugin overrides it. Never call this under the map's
    /// or a channel's lock: the plugin may call back into channels.
    fn decide(&self, name: &str) -> Option<HistoryOptions> {
        let configured = self.configured(name);
        match self.router.get().and_then(std::sync::Weak::upgrade) {
            Some(router) => router
                .channel_history(name, configured.map(Into::into))
                .map(Into::into),
            None => configured,
        }
    }

    /// [`Self::decide`] when `name` looks new (decided outside the map's
    /// lock); `None` when it exists, and whoever creates it after all falls
    /// back to the configuration.
    fn decide_if_new(&self, name: &str) -> Option<Option<HistoryOptions>> {
        (!self.map.contains_key(name)).then(|| self.decide(name))
    }

    /// Adds a subscriber. With `recover`, the messages it missed since then
    /// are queued for it first (all or none). When the presence count
    /// changed, the other subscribers are told.
    pub fn subscribe(
        &self,
        channel: &str,
        subscriber: Subscriber,
        recover: Option<&Position>,
    ) -> Subscription {
        let now = wall_ms();
        let decided = self.decide_if_new(channel);
        // The map entry guard is held while the subscriber set is edited, which
        // keeps a concurrent last-unsubscribe from removing the channel under us.
        let entry = self.map.entry(channel.to_owned()).or_insert_with(|| {
            let options = decided.unwrap_or_else(|| self.configured(channel));
            self.create(channel, options, now)
        });
        let mut state = lock(&entry);
        let conn_id = subscriber.conn.id;
        let recovered =
            recover.map(|from| self.recover(channel, &mut state, &subscriber, from, now));
        let joined = state.subscribers.insert(conn_id, subscriber).is_none();
        let count = state.subscribers.len() as u64;
        if joined {
            self.announce(channel, count, &state, Some(conn_id));
        }
        if let Some(history) = state.history.as_mut() {
            history.last_active_ms = now;
        }
        Subscription {
            seq: state.last_seq,
            presence: count,
            epoch: state.history.as_ref().map(|h| h.epoch().to_string()),
            recovered,
        }
    }

    /// Queues what `subscriber` missed since `from`, under the channel's
    /// lock so no publish slips in between; whether it all fit.
    fn recover(
        &self,
        channel: &str,
        state: &mut ChannelState,
        subscriber: &Subscriber,
        from: &Position,
        now: i64,
    ) -> bool {
        let last_seq = state.last_seq;
        let Some(history) = state.history.as_mut() else {
            return false;
        };
        history.expire(now);
        if history.take_note() {
            self.note_changed(channel);
        }
        if state.subscribers.contains_key(&subscriber.conn.id) {
            // Already subscribed: it has been sent everything since.
            return *from.epoch == **history.epoch() && from.seq == last_seq;
        }
        let Some(missed) = history.missed_since(from, last_seq) else {
            return false;
        };
        let missed: Vec<Outbound> = missed
            .map(|entry| {
                Outbound::new(Msg::Message {
                    channel: channel.to_owned(),
                    seq: entry.seq,
                    data: entry.data.clone(),
                })
            })
            .collect();
        let count = missed.len();
        let queued = subscriber.queue.push_all(missed, self.overflow(channel));
        if !queued {
            tracing::debug!(
                channel,
                missed = count,
                "gap larger than the subscriber's queue has room for: not recovered"
            );
        }
        queued
    }

    /// Removes a subscriber; returns whether it was subscribed.
    pub fn unsubscribe(&self, channel: &str, conn_id: u64) -> bool {
        let mut removed = false;
        self.map.remove_if(channel, |_, ch| {
            let mut state = lock(ch);
            removed = state.subscribers.remove(&conn_id).is_some();
            if removed {
                let count = state.subscribers.len() as u64;
                self.announce(channel, count, &state, None);
            }
            if let Some(history) = state.history.as_mut() {
                history.last_active_ms = wall_ms();
            }
            state.gone = state.is_unused();
            state.gone
        });
        removed
    }

    /// Delivers `data` to every subscriber and keeps it in the channel's
    /// history; returns the sequence number given to it, or 0 when the
    /// channel has no subscribers and no history (nothing is kept).
    /// Subscribers' queues filling up are noted in `pressure`, for the
    /// publisher to wait for before it sends more.
    pub fn publish(&self, channel: &str, data: Data, pressure: &mut Pressure) -> u64 {
        loop {
            let ch = match self.map.get(channel) {
                Some(ch) => ch.clone(),
                None => {
                    // A channel with history is worth creating for a publish:
                    // whoever subscribes later recovers it.
                    let Some(options) = self.decide(channel) else {
                        return 0;
                    };
                    let now = wall_ms();
                    self.map
                        .entry(channel.to_owned())
                        .or_insert_with(|| self.create(channel, Some(options), now))
                        .clone()
                }
            };
            let mut state = lock(&ch);
            if state.gone {
                continue;
            }
            if self.is_sealed(&state) {
                return 0;
            }
            if state.is_unused() {
                // Created without history (the budget was full): not kept.
                drop(state);
                self.map.remove_if(channel, |_, c| {
                    let mut state = lock(c);
                    state.gone = state.is_unused();
                    state.gone
                });
                return 0;
            }
            state.last_seq += 1;
            let seq = state.last_seq;
            let keep = state.history.is_some().then(|| data.clone());
            self.fan_out(channel, &state, seq, data, pressure);
            if let Some(data) = keep {
                self.keep(channel, &mut state, seq, data);
            }
            return seq;
        }
    }

    /// Appends message `seq` to the channel's history (the caller checked
    /// it has one), noting a persisted one as changed.
    fn keep(&self, channel: &str, state: &mut ChannelState, seq: u64, data: Data) {
        let Some(history) = state.history.as_mut() else {
            return;
        };
        history.append(seq, data, wall_ms());
        if history.take_note() {
            self.note_changed(channel);
        }
    }

    fn note_changed(&self, channel: &str) {
        let mut unwritten = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
        if unwritten.changed.insert(channel.to_owned()) && unwritten.changed.len() == 1 {
            self.changed.notify_one();
        }
    }

    /// What a full subscriber queue does with `channel`'s messages.
    fn overflow(&self, channel: &str) -> Overflow {
        match self.policies.slow_consumer(channel) {
            SlowConsumer::DropOldest => Overflow::DropOldest,
            SlowConsumer::Disconnect => Overflow::Disconnect,
        }
    }

    /// Queues message `seq` for every subscriber, under the channel's lock
    /// (the caller holds it), so all see the same order.
    fn fan_out(
        &self,
        channel: &str,
        state: &ChannelState,
        seq: u64,
        data: Data,
        pressure: &mut Pressure,
    ) {
        let out = Outbound::new(Msg::Message {
            channel: channel.to_owned(),
            seq,
            data,
        });
        let overflow = self.overflow(channel);
        for sub in state.subscribers.values() {
            deliver_pressing(
                &sub.conn,
                &sub.queue,
                out.clone(),
                overflow,
                &self.metrics,
                pressure,
            );
        }
    }

    /// Delivers a message numbered elsewhere (a cluster's broker) to this
    /// node's subscribers. One older than the channel's last seq is a
    /// duplicate and is dropped; a gap (messages this node never saw) is
    /// allowed, and subscribers see it in the seqs. Returns whether it was
    /// delivered; the caller (the backend's delivery task) waits for
    /// `pressure` before taking the next message from the broker.
    pub fn deliver_numbered(
        &self,
        channel: &str,
        seq: u64,
        data: Data,
        pressure: &mut Pressure,
    ) -> bool {
        self.deliver_from(channel, None, seq, data, pressure)
    }

    /// [`Self::deliver_numbered`] for a message numbered by `origin` (a
    /// cluster node's numbering of the channel, under its own epoch). A
    /// message from another origin than the last restarts the channel's
    /// sequence here: its numbers start where that origin's are, and its
    /// history (numbered by the old one) is dropped. The history's epoch is
    /// derived from the origin's, so every node of a cluster gives a
    /// channel the same epoch and seqs, and a client can recover on any.
    /// In a cluster, a channel the configuration gives history is kept on
    /// every node, subscribed to here or not, for the same reason.
    pub fn deliver_from(
        &self,
        channel: &str,
        origin: Option<&str>,
        seq: u64,
        data: Data,
        pressure: &mut Pressure,
    ) -> bool {
        // By the configuration alone: asking the router plugin for every
        // message of a channel nobody here uses would cost a call each.
        let decided = origin.and_then(|_| self.configured(channel));
        let ch = match (self.map.get(channel).map(|c| c.clone()), decided) {
            (Some(ch), _) => ch,
            (None, Some(options)) => {
                let now = wall_ms();
                self.map
                    .entry(channel.to_owned())
                    .or_insert_with(|| {
                        self.create_under(channel, Some(options), now, origin.map(str::to_owned))
                    })
                    .clone()
            }
            (None, None) => return false,
        };
        let mut state = lock(&ch);
        if state.is_unused() {
            // Made just now without history (the budget is full): not kept.
            drop(state);
            self.forget_if(channel, ChannelState::is_unused);
            return false;
        }
        if state.gone || self.is_sealed(&state) {
            return false;
        }
        if let Some(origin) = origin
            && state.origin.as_deref() != Some(origin)
        {
            state.origin = Some(origin.into());
            let epoch = history::epoch_of(origin);
            // A history restored from the store under this very numbering
            // goes on (the seqs tell whether any were missed meanwhile).
            let continues = state.history.as_ref().is_some_and(|h| *h.epoch() == epoch);
            if !continues {
                state.last_seq = seq.saturating_sub(1);
                if let Some(history) = state.history.as_mut() {
                    history.restart_as(epoch);
                }
            }
        }
        if seq <= state.last_seq {
            return false;
        }
        state.last_seq = seq;
        let keep = state.history.is_some().then(|| data.clone());
        self.fan_out(channel, &state, seq, data, pressure);
        if let Some(data) = keep {
            self.keep(channel, &mut state, seq, data);
        }
        true
    }

    pub fn presence(&self, channel: &str) -> u64 {
        self.map
            .get(channel)
            .map(|c| lock(c.value()).subscribers.len() as u64)
            .unwrap_or(0)
    }

    /// A page of `channel`'s history (`history`): after `since`, or the
    /// last `limit`; at most [`MAX_PAGE`] messages and about `max_bytes`.
    pub fn history(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: Option<u32>,
        max_bytes: usize,
    ) -> Result<(String, u64, Page), Refused> {
        let no_history = || Refused {
            code: ErrorCode::NotFound,
            reason: format!("channel {channel} keeps no history (channels.history)"),
        };
        let now = wall_ms();
        let entry = match self.map.get(channel).map(|c| c.clone()) {
            Some(existing) => existing,
            None => {
                let options = self.decide(channel).ok_or_else(no_history)?;
                self.map
                    .entry(channel.to_owned())
                    .or_insert_with(|| self.create(channel, Some(options), now))
                    .clone()
            }
        };
        let mut state = lock(&entry);
        let last_seq = state.last_seq;
        let Some(history) = state.history.as_mut() else {
            if state.is_unused() {
                // Created without history (the budget was full): not kept.
                drop(state);
                self.forget_if(channel, |_| true);
                return Err(Refused {
                    code: ErrorCode::Overloaded,
                    reason: "channels.history_memory_bytes reached; try again later".into(),
                });
            }
            return Err(no_history());
        };
        history.expire(now);
        if history.take_note() {
            self.note_changed(channel);
        }
        let limit = limit.map_or(MAX_PAGE, |l| (l as usize).clamp(1, MAX_PAGE));
        let page = history.page(since, limit, max_bytes, last_seq);
        Ok((history.epoch().to_string(), last_seq, page))
    }

    /// Who subscribes to `channel` (`who`), where `channels.presence_details` allows.
    pub fn members(
        &self,
        channel: &str,
        session_of: impl Fn(&ConnInfo) -> String,
    ) -> Result<(u64, Vec<Member>), Refused> {
        if !self.policies.shows_members(channel) {
            return Err(Refused {
                code: ErrorCode::Forbidden,
                reason: format!(
                    "channel {channel} does not list its subscribers (channels.presence_details)"
                ),
            });
        }
        let Some(ch) = self.map.get(channel).map(|c| c.clone()) else {
            return Ok((0, Vec::new()));
        };
        let state = lock(&ch);
        let members = state
            .subscribers
            .values()
            .take(MAX_MEMBERS)
            .map(|s| Member {
                session: session_of(&s.conn),
                user: s.conn.identity().map(|(user, _)| user),
            })
            .collect();
        Ok((state.subscribers.len() as u64, members))
    }

    /// Bytes the histories hold, and their bound.
    pub fn history_bytes(&self) -> (usize, usize) {
        (self.budget.used(), self.budget.limit())
    }

    /// Expires old messages; forgets channels idle past
    /// `channels.history_idle_ms`; when histories near their budget, drops
    /// the oldest messages relay-wide (then the idlest empty channels) until
    /// there is room again. Called every second or so.
    pub fn sweep(&self) {
        let now = wall_ms();
        let idle_ms = i64::try_from(self.policies.history_idle_ms).unwrap_or(i64::MAX);
        let mut idle = Vec::new();
        for entry in self.map.iter() {
            let mut state = lock(entry.value());
            let no_subscribers = state.subscribers.is_empty();
            let Some(history) = state.history.as_mut() else {
                continue;
            };
            history.expire(now);
            if history.take_note() {
                self.note_changed(entry.key());
            }
            if no_subscribers
                && history.is_empty()
                && history.last_active_ms.saturating_add(idle_ms) <= now
            {
                idle.push(entry.key().clone());
            }
        }
        for name in idle {
            self.forget_if(&name, |state| {
                state.history.as_ref().is_some_and(|h| {
                    h.is_empty() && h.last_active_ms.saturating_add(idle_ms) <= now
                })
            });
        }
        let limit = self.budget.limit();
        if self.budget.used() > limit / 10 * 9 {
            self.make_room(limit / 10 * 8);
        }
    }

    /// Removes channel `name` when it has no subscribers and `idle` says
    /// so, under its lock.
    fn forget_if(&self, name: &str, idle: impl Fn(&ChannelState) -> bool) -> bool {
        let removed = self.map.remove_if(name, |_, ch| {
            let mut state = lock(ch);
            state.gone = state.subscribers.is_empty() && idle(&state);
            if state.gone && state.history.as_ref().is_some_and(History::persist) {
                let mut unwritten = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
                unwritten.changed.remove(name);
                unwritten.forgotten.insert(name.to_owned());
                self.changed.notify_one();
            }
            state.gone
        });
        removed.is_some()
    }

    /// Drops the oldest kept messages relay-wide until histories hold at
    /// most `target` bytes; if that is not enough, the channels idle the
    /// longest with nothing kept and nobody subscribed.
    fn make_room(&self, target: usize) {
        let mut oldest: BinaryHeap<Reverse<(u64, String)>> = BinaryHeap::new();
        let mut empty: Vec<(i64, String)> = Vec::new();
        for entry in self.map.iter() {
            let state = lock(entry.value());
            if let Some(history) = state.history.as_ref() {
                match history.oldest() {
                    Some(at) => oldest.push(Reverse((at, entry.key().clone()))),
                    None if state.subscribers.is_empty() => {
                        empty.push((history.last_active_ms, entry.key().clone()))
                    }
                    None => {}
                }
            }
        }
        let mut trimmed = 0u64;
        while self.budget.used() > target {
            let Some(Reverse((_, name))) = oldest.pop() else {
                break;
            };
            let Some(ch) = self.map.get(&name).map(|c| c.clone()) else {
                continue;
            };
            let mut state = lock(&ch);
            let Some(history) = state.history.as_mut() else {
                continue;
            };
            if history.pop_oldest().is_some() {
                trimmed += 1;
            }
            if let Some(next) = history.oldest() {
                oldest.push(Reverse((next, name.clone())));
            }
            if history.take_note() {
                self.note_changed(&name);
            }
        }
        empty.sort_unstable();
        let mut forgotten = 0u64;
        for (_, name) in empty {
            if self.budget.used() <= target {
                break;
            }
            if self.forget_if(&name, |state| {
                state.history.as_ref().is_some_and(History::is_empty)
            }) {
                forgotten += 1;
            }
        }
        if trimmed > 0 || forgotten > 0 {
            tracing::warn!(
                trimmed,
                forgotten,
                used = self.budget.used(),
                limit = self.budget.limit(),
                "channel histories near channels.history_memory_bytes: oldest messages dropped"
            );
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Gives `notice` (not a channel message: no sequence number) to every
    /// current subscriber of `channel`; how many.
    pub fn notify(&self, channel: &str, notice: &Outbound) -> usize {
        let Some(ch) = self.map.get(channel).map(|c| c.clone()) else {
            return 0;
        };
        let state = ch.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut told = 0;
        for sub in state.subscribers.values() {
            if deliver(
                &sub.conn,
                &sub.queue,
                notice.clone(),
                Overflow::DropNewest,
                &self.metrics,
            ) {
                told += 1;
            }
        }
        told
    }

    /// Tells the subscribers (but `except` the one who just joined, who gets
    /// the count in `subscribed`) the channel's new presence count.
    fn announce(&self, channel: &str, count: u64, state: &ChannelState, except: Option<u64>) {
        let mut others = state
            .subscribers
            .iter()
            .filter(|(id, _)| Some(**id) != except)
            .peekable();
        if others.peek().is_none() {
            return;
        }
        let out = Outbound::new(Msg::Presence {
            channel: channel.to_owned(),
            count,
        });
        for (_, sub) in others {
            deliver(
                &sub.conn,
                &sub.queue,
                out.clone(),
                Overflow::DropNewest,
                &self.metrics,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ChannelOverride;
    use crate::delivery::queue::Budget;
    use crate::delivery::table::ConnTable;
    use crate::testing::Peer;

    struct World {
        table: Arc<ConnTable>,
        budget: Arc<Budget>,
        channels: Channels,
    }

    impl World {
        fn new(policies: ChannelsConfig) -> Self {
            Self {
                table: Arc::new(ConnTable::default()),
                budget: Budget::new(1 << 30),
                channels: Channels::new(Arc::new(Metrics::new()), policies),
            }
        }

        fn subscriber(&self, channel: &str, queue_messages: usize) -> Peer {
            self.recovering(channel, queue_messages, None).0
        }

        fn recovering(
            &self,
            channel: &str,
            queue_messages: usize,
            from: Option<&Position>,
        ) -> (Peer, Subscription) {
            let peer = Peer::new(&self.table, &self.budget, queue_messages);
            let found = self.channels.subscribe(
                channel,
                Subscriber {
                    conn: peer.conn().clone(),
                    queue: peer.queue.clone(),
                },
                from,
            );
            (peer, found)
        }

        fn publish(&self, channel: &str, n: u64) -> u64 {
            self.channels.publish(
                channel,
                Data::from(format!("{n}")),
                &mut Pressure::default(),
            )
        }
    }

    fn history_config(size: usize) -> ChannelsConfig {
        ChannelsConfig {
            history: vec![crate::config::HistoryRule {
                pattern: "chat/*".into(),
                size,
                ttl_ms: 60_000,
                persist: false,
            }],
            ..ChannelsConfig::default()
        }
    }

    #[test]
    fn a_returning_subscriber_gets_exactly_what_it_missed_then_live_ones() {
        let world = World::new(history_config(100));
        let first = world.subscriber("chat/a", 256);
        for n in 1..=5 {
            world.publish("chat/a", n);
        }
        let last_seen = seqs(&first.queued()).last().copied().unwrap();
        let epoch = world
            .channels
            .subscribe(
                "chat/a",
                Subscriber {
                    conn: first.conn().clone(),
                    queue: first.queue.clone(),
                },
                None,
            )
            .epoch
            .expect("chat/* keeps history");
        world.channels.unsubscribe("chat/a", first.conn().id);
        assert_eq!(world.channels.len(), 1, "kept for its history");
        for n in 6..=55 {
            assert_eq!(
                world.publish("chat/a", n),
                n,
                "the sequence goes on with nobody subscribed"
            );
        }
        let from = Position {
            epoch: epoch.clone(),
            seq: last_seen,
        };
        let (back, found) = world.recovering("chat/a", 256, Some(&from));
        assert_eq!(found.recovered, Some(true));
        assert_eq!(found.seq, 55);
        assert_eq!(found.epoch.as_deref(), Some(epoch.as_str()));
        world.publish("chat/a", 56);
        assert_eq!(seqs(&back.queued()), (6..=56).collect::<Vec<_>>());
    }

    #[test]
    fn a_gap_past_the_history_or_another_epoch_is_not_recovered() {
        let world = World::new(history_config(10));
        for n in 1..=30 {
            world.publish("chat/b", n);
        }
        let epoch = world
            .channels
            .history("chat/b", None, Some(1), 1 << 20)
            .unwrap()
            .0;
        let (lost, found) = world.recovering(
            "chat/b",
            256,
            Some(&Position {
                epoch: epoch.clone(),
                seq: 5,
            }),
        );
        assert_eq!(found.recovered, Some(false));
        assert!(seqs(&lost.queued()).is_empty(), "nothing partial is sent");
        let (_, found) = world.recovering(
            "chat/b",
            256,
            Some(&Position {
                epoch: "another".into(),
                seq: 29,
            }),
        );
        assert_eq!(found.recovered, Some(false));
        // A gap larger than the subscriber's queue is refused whole too.
        let (small, found) = world.recovering("chat/b", 4, Some(&Position { epoch, seq: 20 }));
        assert_eq!(found.recovered, Some(false));
        assert!(seqs(&small.queued()).is_empty());
        // Without history there is nothing to recover from.
        let (_, found) = world.recovering(
            "room",
            64,
            Some(&Position {
                epoch: "x".into(),
                seq: 0,
            }),
        );
        assert_eq!((found.recovered, found.epoch), (Some(false), None));
    }

    #[test]
    fn many_channels_stay_within_the_history_budget_oldest_going_first() {
        let mut config = history_config(100);
        config.history_memory_bytes = 256 * 1024;
        let world = World::new(config);
        let payload = Data::from(vec![b'x'; 1000]);
        for round in 0..20 {
            for c in 0..100 {
                world.channels.publish(
                    &format!("chat/{c}"),
                    payload.clone(),
                    &mut Pressure::default(),
                );
            }
            let (used, limit) = world.channels.history_bytes();
            assert!(used <= limit, "round {round}: {used} > {limit}");
        }
        world.channels.sweep();
        let (used, limit) = world.channels.history_bytes();
        assert!(used <= limit / 10 * 8, "the sweep makes room: {used}");
        // What is left is the newest: every channel's last message survives.
        for c in 0..100 {
            let (_, seq, page) = world
                .channels
                .history(&format!("chat/{c}"), None, Some(1), 1 << 20)
                .unwrap();
            assert_eq!(seq, 20);
            assert_eq!(page.messages.last().map(|m| m.seq), Some(20), "chat/{c}");
        }
    }

    fn seqs(messages: &[Msg]) -> Vec<u64> {
        messages
            .iter()
            .filter_map(|m| match m {
                Msg::Message { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    /// Whose numbering channels are under, as a cluster's bus would say.
    struct NumberedBy(&'static str);

    impl Numbering for NumberedBy {
        fn origin(&self, _channel: &str) -> Option<String> {
            Some(self.0.to_owned())
        }
    }

    #[test]
    fn in_a_cluster_every_node_keeps_a_channels_history_under_one_epoch() {
        // Two nodes fed the same numbered messages: one with a subscriber
        // from before the first message, one with nobody subscribed.
        let numbering: Arc<dyn Numbering> = Arc::new(NumberedBy("a.1234.0"));
        let (with_subscriber, unused) = (
            World::new(history_config(100)),
            World::new(history_config(100)),
        );
        for world in [&with_subscriber, &unused] {
            world.channels.set_numbering(Arc::downgrade(&numbering));
        }
        let (early, subscribed) = with_subscriber.recovering("chat/x", 64, None);
        let expected = history::epoch_of("a.1234.0");
        assert_eq!(subscribed.epoch.as_deref(), Some(&*expected));
        for world in [&with_subscriber, &unused] {
            for seq in 7..=9 {
                world.channels.deliver_from(
                    "chat/x",
                    Some("a.1234.0"),
                    seq,
                    Data::from(format!("{seq}")),
                    &mut Pressure::default(),
                );
            }
            // Not kept without history, where nobody subscribed.
            assert!(!world.channels.deliver_from(
                "plain",
                Some("a.1234.0"),
                1,
                Data::from("x"),
                &mut Pressure::default(),
            ));
        }
        assert_eq!(seqs(&early.queued()), [7, 8, 9]);
        // A client that saw up to 7 on the first node recovers on the second.
        let from = Position {
            epoch: expected.to_string(),
            seq: 7,
        };
        let (late, found) = unused.recovering("chat/x", 64, Some(&from));
        assert_eq!(found.recovered, Some(true));
        assert_eq!(found.epoch.as_deref(), Some(&*expected));
        assert_eq!(seqs(&late.queued()), [8, 9]);
        // Another numbering node: a new sequence, under its own epoch.
        unused.channels.deliver_from(
            "chat/x",
            Some("b.99.0"),
            1,
            Data::from("1"),
            &mut Pressure::default(),
        );
        let (_, after) = unused.recovering("chat/x", 64, Some(&from));
        assert_eq!(after.recovered, Some(false));
        assert_eq!(after.epoch.as_deref(), Some(&*history::epoch_of("b.99.0")));
        assert_ne!(history::epoch_of("a.1234.0"), history::epoch_of("b.99.0"));
        assert_eq!(history::epoch_of("a.1234.0").len(), 16);
    }

    #[test]
    fn every_subscriber_gets_every_message_in_seq_order() {
        let world = World::new(ChannelsConfig::default());
        let a = world.subscriber("room", 64);
        let b = world.subscriber("room", 64);
        for n in 0..10 {
            assert_eq!(
                world.channels.publish(
                    "room",
                    Data::from(format!("{n}")),
                    &mut Pressure::default()
                ),
                n + 1
            );
        }
        let expected: Vec<u64> = (1..=10).collect();
        assert_eq!(seqs(&a.queued()), expected);
        assert_eq!(seqs(&b.queued()), expected);
    }

    #[test]
    fn messages_numbered_elsewhere_are_delivered_once_in_order() {
        let world = World::new(ChannelsConfig::default());
        let a = world.subscriber("room", 64);
        let _ = a.queued();
        assert!(world.channels.deliver_numbered(
            "room",
            5,
            Data::from("x"),
            &mut Pressure::default()
        ));
        assert!(!world.channels.deliver_numbered(
            "room",
            5,
            Data::from("dup"),
            &mut Pressure::default()
        ));
        assert!(!world.channels.deliver_numbered(
            "room",
            3,
            Data::from("old"),
            &mut Pressure::default()
        ));
        assert!(world.channels.deliver_numbered(
            "room",
            6,
            Data::from("y"),
            &mut Pressure::default()
        ));
        assert_eq!(seqs(&a.queued()), [5, 6]);
        // A local publish continues the sequence.
        assert_eq!(
            world
                .channels
                .publish("room", Data::from("z"), &mut Pressure::default()),
            7
        );
        assert!(!world.channels.deliver_numbered(
            "nobody",
            1,
            Data::from("x"),
            &mut Pressure::default()
        ));
    }

    #[test]
    fn presence_tells_the_others_and_the_last_to_leave_removes_the_channel() {
        let world = World::new(ChannelsConfig::default());
        let first = world.subscriber("room", 64);
        let second = world.subscriber("room", 64);
        assert!(first.queued().contains(&Msg::Presence {
            channel: "room".into(),
            count: 2
        }));
        assert_eq!(world.channels.presence("room"), 2);
        world.channels.unsubscribe("room", first.conn().id);
        world.channels.unsubscribe("room", second.conn().id);
        assert!(world.channels.is_empty());
        // Nothing is kept for a channel nobody listens to.
        assert_eq!(
            world
                .channels
                .publish("room", Data::from("lost"), &mut Pressure::default()),
            0
        );
    }

    #[test]
    fn a_full_subscriber_loses_its_oldest_messages_and_the_others_lose_nothing() {
        let world = World::new(ChannelsConfig::default());
        let slow = world.subscriber("room", 4);
        let fast = world.subscriber("room", 64);
        // The subscribe-time presence notice went to `slow`; clear it.
        let _ = slow.queued();
        for _ in 0..10 {
            world
                .channels
                .publish("room", Data::from("x"), &mut Pressure::default());
        }
        let kept = seqs(&slow.queued());
        assert_eq!(kept, [7, 8, 9, 10], "the newest four are kept");
        assert_eq!(
            slow.conn()
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed),
            6
        );
        assert_eq!(seqs(&fast.queued()), (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_disconnect_channel_closes_a_subscriber_that_falls_behind() {
        let mut policies = ChannelsConfig::default();
        policies.overrides.push(ChannelOverride {
            prefix: "ticks/".into(),
            slow_consumer: SlowConsumer::Disconnect,
        });
        let world = World::new(policies);
        let slow = world.subscriber("ticks/a", 2);
        for _ in 0..3 {
            world
                .channels
                .publish("ticks/a", Data::from("x"), &mut Pressure::default());
        }
        let reason = slow.closed().expect("closed for falling behind");
        assert!(reason.contains("ticks/a"), "{reason}");
    }
}
