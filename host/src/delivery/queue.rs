//! A connection's outbound queue: what others deliver to it, waiting for its
//! transport to write. Three lanes — control, normal, bulk — drained in that
//! order; bounded in messages and bytes per connection and, across all
//! connections, by one byte [`Budget`]. When a connection falls behind, the
//! overflow rule the sender chose applies: drop the oldest channel messages
//! (and tell the consumer how many it lost), drop the new message, refuse it,
//! or disconnect the consumer. Nothing here ever waits for the consumer.
//!
//! Pushing never waits either, but a queue says when it is *pressing*:
//! past half its bounds it asks publishers to wait (see
//! [`super::pressure`]) until it is back under a quarter. A consumer that
//! stays pressed for `slow_after` is *slow*: it stops holding publishers
//! back, and its channels' overflow rule applies instead. Fast consumers
//! therefore slow publishers down rather than lose messages, and only a
//! consumer really slower than its channels' flow loses any.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Outbound;
use crate::protocol::Msg;

/// Byte size charged for a queued message: its payload plus a fixed
/// estimate for the header, so accounting needs no encoding.
const HEADER_ESTIMATE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Errors, presence, loss notices: small and drained first.
    Control = 0,
    /// Channel messages, requests, responses, progress, cancels.
    Normal = 1,
    /// Request and response bodies of `BULK_THRESHOLD` bytes or more.
    Bulk = 2,
}

impl Lane {
    pub fn of(msg: &Msg) -> Lane {
        match msg {
            Msg::Error { .. } | Msg::Presence { .. } | Msg::Lost { .. } | Msg::FileOffer { .. } => {
                Lane::Control
            }
            Msg::Chunk { .. } | Msg::DownloadReady { .. } => Lane::Bulk,
            _ if crate::protocol::quic::is_bulk(msg) => Lane::Bulk,
            _ => Lane::Normal,
        }
    }
}

/// What to do when the consumer's queue has no room for a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Evict the oldest evictable messages to make room; the consumer is
    /// sent a `lost` count per channel. For channels with `drop-oldest`.
    DropOldest,
    /// Drop this message (advisory ones: progress, presence).
    DropNewest,
    /// Refuse it; the sender decides (a request: the caller gets `overloaded`).
    Refuse,
    /// Close the consumer (1013): channels with `disconnect`, and responses a
    /// caller is too slow to take.
    Disconnect,
}

/// What became of a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued, after evicting `evicted` older messages.
    Queued {
        evicted: u64,
        /// The queue is over its high-water mark and not (yet) slow: the
        /// publisher should wait for it before sending more.
        pressing: bool,
    },
    /// Not queued (dropped or refused), after evicting `evicted` older
    /// messages that still did not make room.
    Dropped { evicted: u64 },
    /// The consumer was (or already is) closed.
    Closed,
}

/// Per-connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub messages: usize,
    pub bytes: usize,
    /// How long a consumer may stay over its high-water mark before it is
    /// deemed slow; zero turns ingress backpressure off.
    pub slow_after: Duration,
}

impl QueueLimits {
    /// Past half of either bound a queue presses its publishers...
    fn is_high(&self, messages: usize, bytes: usize) -> bool {
        messages > self.messages / 2 || bytes > self.bytes / 2
    }

    /// ...until it is back under a quarter of both.
    fn is_low(&self, messages: usize, bytes: usize) -> bool {
        messages <= self.messages / 4 && bytes <= self.bytes / 4
    }
}

/// The relay-wide byte budget for all outbound queues, and the queues it
/// can shed when it runs out.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    queues: Mutex<Vec<Weak<OutboundQueue>>>,
    shed: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            queues: Mutex::new(Vec::new()),
            shed: AtomicUsize::new(0),
        })
    }

    /// Bytes queued across the relay.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Consumers closed to keep within the budget, since start.
    pub fn shed_count(&self) -> usize {
        self.shed.load(Ordering::Relaxed)
    }

    fn register(&self, queue: &Arc<OutboundQueue>) {
        let mut queues = lock(&self.queues);
        queues.retain(|q| q.strong_count() > 0);
        queues.push(Arc::downgrade(queue));
    }

    /// Closes the consumer with the most queued bytes (other than `sparing`),
    /// freeing its bytes; false when there is nobody to shed.
    fn shed_slowest(&self, sparing: &OutboundQueue) -> bool {
        let victim = {
            let queues = lock(&self.queues);
            queues
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|q| !std::ptr::eq(q.as_ref(), sparing) && q.bytes() > 0)
                .max_by_key(|q| q.bytes())
        };
        let Some(victim) = victim else { return false };
        tracing::warn!(
            queued_bytes = victim.bytes(),
            budget = self.limit,
            "outbound budget exhausted: shedding the slowest consumer"
        );
        victim.close("relay over its outbound budget: slowest consumer shed");
        self.shed.fetch_add(1, Ordering::Relaxed);
        true
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct Entry {
    out: Outbound,
    size: usize,
    evictable: bool,
}

#[derive(Debug, Default)]
struct State {
    lanes: [VecDeque<Entry>; 3],
    /// Messages lost per channel, not yet reported to the consumer.
    lost: BTreeMap<String, u64>,
    closed: Option<String>,
    /// Since when the queue has been past its high-water mark without
    /// getting back under the low one.
    pressed_since: Option<Instant>,
    /// Whether this pressed episode has been logged as a slow consumer.
    slow_reported: bool,
}

impl State {
    /// Messages in the normal and bulk lanes, which the message limit bounds.
    fn data_messages(&self) -> usize {
        self.lanes[Lane::Normal as usize].len() + self.lanes[Lane::Bulk as usize].len()
    }
}

#[derive(Debug)]
pub struct OutboundQueue {
    state: Mutex<State>,
    notify: Notify,
    /// Woken whenever messages leave the queue, for senders that wait for room.
    room: Notify,
    /// Woken when the queue stops pressing (back under its low-water mark,
    /// or closed): once per episode, not per batch, so publishers held back
    /// by a busy consumer are not woken for every write it makes.
    relief: Notify,
    /// Senders waiting in `push_when_room`: the consumer skips waking `room`
    /// (a lock per batch) when there are none.
    room_waiters: AtomicUsize,
    /// Cancelled when the queue closes, so a transport blocked writing to
    /// this consumer can give up at once.
    closed: CancellationToken,
    limits: QueueLimits,
    budget: Arc<Budget>,
    // Mirrors of the state, readable without the lock.
    depth: AtomicUsize,
    bytes: AtomicUsize,
}

impl OutboundQueue {
    pub fn new(limits: QueueLimits, budget: &Arc<Budget>) -> Arc<Self> {
        let queue = Arc::new(Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            room: Notify::new(),
            relief: Notify::new(),
            room_waiters: AtomicUsize::new(0),
            closed: CancellationToken::new(),
            limits,
            budget: budget.clone(),
            depth: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
        });
        budget.register(&queue);
        queue
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes waiting (payloads plus a header estimate each).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn size_of(out: &Outbound) -> usize {
        out.msg().data().map_or(0, |d| d.len()) + HEADER_ESTIMATE
    }

    /// Queues every message of `batch` (data messages, in order), or none
    /// when they do not all fit now without evicting anything: a channel
    /// recovering a client's gap gives all of it or nothing. Checked and
    /// queued under one lock, so nothing takes the room in between.
    /// `overflow` is what later pushes may do to them (the channel's policy).
    pub fn push_all(&self, batch: Vec<Outbound>, overflow: Overflow) -> bool {
        let sizes: Vec<usize> = batch.iter().map(Self::size_of).collect();
        let total: usize = sizes.iter().sum();
        let mut state = lock(&self.state);
        let fits = state.closed.is_none()
            && state.data_messages() + batch.len() <= self.limits.messages
            && self.bytes() + total <= self.limits.bytes
            && self.budget.used() + total <= self.budget.limit;
        if !fits {
            return false;
        }
        let evictable = matches!(overflow, Overflow::DropOldest | Overflow::DropNewest);
        for (out, size) in batch.into_iter().zip(sizes) {
            let lane = Lane::of(out.msg());
            self.admit(&mut state, lane, out, size, evictable);
        }
        true
    }

    /// Queues `out` for the consumer, or applies `overflow` when there is no room.
    pub fn push(&self, out: Outbound, overflow: Overflow) -> Pushed {
        let size = Self::size_of(&out);
        let lane = Lane::of(out.msg());
        // The relay-wide budget first: shed someone slower rather than fail
        // this consumer, unless this consumer is the slowest.
        while self.budget.used() + size > self.budget.limit {
            if !self.budget.shed_slowest(self) {
                break;
            }
        }
        let mut state = lock(&self.state);
        if state.closed.is_some() {
            return Pushed::Closed;
        }
        if lane == Lane::Control {
            // A presence count still waiting to be sent is replaced by the
            // newer one for its channel (same size: no payload), so churn by
            // others costs a subscriber one queued message per channel.
            if let Msg::Presence { channel, .. } = out.msg()
                && let Some(queued) = state.lanes[Lane::Control as usize].iter_mut().find(
                    |e| matches!(e.out.msg(), Msg::Presence { channel: c, .. } if c == channel),
                )
            {
                queued.out = out;
                return Pushed::Queued {
                    evicted: 0,
                    pressing: false,
                };
            }
            // Control messages are never dropped: they are small, and a
            // consumer that lets this many pile up is gone in all but name.
            if state.lanes[Lane::Control as usize].len() >= self.limits.messages {
                self.close_locked(
                    &mut state,
                    "slow consumer: control messages piling up".into(),
                );
                return Pushed::Closed;
            }
            self.admit(&mut state, lane, out, size, false);
            return Pushed::Queued {
                evicted: 0,
                pressing: false,
            };
        }
        // Read afresh each time: evicting our own messages gives budget back.
        let over = |state: &State, bytes: usize| {
            self.budget.used() + size > self.budget.limit
                || state.data_messages() + 1 > self.limits.messages
                || bytes + size > self.limits.bytes
        };
        let mut evicted = 0;
        if over(&state, self.bytes()) && overflow == Overflow::DropOldest {
            while over(&state, self.bytes()) {
                let Some(index) = state.lanes[Lane::Normal as usize]
                    .iter()
                    .position(|e| e.evictable)
                else {
                    break;
                };
                let entry = state.lanes[Lane::Normal as usize]
                    .remove(index)
                    .expect("position is in range");
                self.forget(&entry);
                if let Msg::Message { channel, .. } = entry.out.msg() {
                    *state.lost.entry(channel.clone()).or_default() += 1;
                }
                evicted += 1;
            }
        }
        if over(&state, self.bytes()) {
            return match overflow {
                Overflow::DropOldest | Overflow::DropNewest => {
                    if let Msg::Message { channel, .. } = out.msg() {
                        *state.lost.entry(channel.clone()).or_default() += 1;
                        self.notify.notify_one();
                    }
                    Pushed::Dropped { evicted }
                }
                Overflow::Refuse => Pushed::Dropped { evicted },
                Overflow::Disconnect => {
                    let reason = match out.msg() {
                        Msg::Message { channel, .. } => {
                            format!("slow consumer: fell behind on channel {channel}")
                        }
                        _ => "slow consumer: outbound queue full".to_owned(),
                    };
                    self.close_locked(&mut state, reason);
                    Pushed::Closed
                }
            };
        }
        let evictable = matches!(overflow, Overflow::DropOldest | Overflow::DropNewest);
        self.admit(&mut state, lane, out, size, evictable);
        // Only channel messages hold their publishers back: other senders
        // have bounds of their own (requests in flight, streamed bodies).
        let pressing = matches!(overflow, Overflow::DropOldest | Overflow::Disconnect)
            && self.press(&mut state);
        Pushed::Queued { evicted, pressing }
    }

    /// Marks the queue pressed when it has passed its high-water mark, and
    /// says whether its publishers should wait for it: pressed, not slow.
    fn press(&self, state: &mut State) -> bool {
        if self.limits.slow_after.is_zero() {
            return false;
        }
        let since = match state.pressed_since {
            Some(since) => since,
            None if self.limits.is_high(state.data_messages(), self.bytes()) => {
                let now = Instant::now();
                state.pressed_since = Some(now);
                return true;
            }
            None => return false,
        };
        since.elapsed() < self.limits.slow_after
    }

    /// Completes once publishers need not wait for this queue: it is back
    /// under its low-water mark, it has been pressed for `slow_after` (a
    /// slow consumer: its overflow rule applies from here on), or it closed.
    /// Cancel-safe.
    pub async fn relieved(&self) {
        loop {
            let relief = self.relief.notified();
            tokio::pin!(relief);
            // Registered before looking, so a drain in between is not missed.
            relief.as_mut().enable();
            let deadline = {
                let state = lock(&self.state);
                match state.pressed_since {
                    Some(since) if state.closed.is_none() => since + self.limits.slow_after,
                    _ => return,
                }
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                _ = relief => {}
                _ = tokio::time::sleep_until(deadline) => {
                    self.report_slow();
                    return;
                }
            }
        }
    }

    /// Logs, once per episode, that this consumer has become slow.
    fn report_slow(&self) {
        let mut state = lock(&self.state);
        if state.pressed_since.is_some() && !state.slow_reported {
            state.slow_reported = true;
            tracing::info!(
                queued = self.len(),
                queued_bytes = self.bytes(),
                "slow consumer: behind for longer than slow_after; publishers no longer wait for it and its channels' policy applies"
            );
        }
    }

    /// Whether the queue is pressed and has been for `slow_after`.
    #[cfg(test)]
    fn is_slow(&self) -> bool {
        let state = lock(&self.state);
        !self.limits.slow_after.is_zero()
            && state
                .pressed_since
                .is_some_and(|since| since.elapsed() >= self.limits.slow_after)
    }

    fn admit(&self, state: &mut State, lane: Lane, out: Outbound, size: usize, evictable: bool) {
        // Only the push into an empty queue needs to wake the consumer: it
        // takes everything queued before it waits again.
        let was_empty = self.depth.fetch_add(1, Ordering::Relaxed) == 0;
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.budget.used.fetch_add(size, Ordering::Relaxed);
        state.lanes[lane as usize].push_back(Entry {
            out,
            size,
            evictable,
        });
        if was_empty {
            self.notify.notify_one();
        }
    }

    fn forget(&self, entry: &Entry) {
        self.bytes.fetch_sub(entry.size, Ordering::Relaxed);
        self.depth.fetch_sub(1, Ordering::Relaxed);
        self.budget.used.fetch_sub(entry.size, Ordering::Relaxed);
    }

    /// Closes the queue: what is queued is freed, the consumer's next
    /// [`next_batch`](Self::next_batch) returns `reason`.
    pub fn close(&self, reason: impl Into<String>) {
        let mut state = lock(&self.state);
        self.close_locked(&mut state, reason.into());
    }

    fn close_locked(&self, state: &mut State, reason: String) {
        if state.closed.is_some() {
            return;
        }
        for lane in &mut state.lanes {
            for entry in lane.drain(..) {
                self.forget(&entry);
            }
        }
        state.closed = Some(reason);
        self.notify.notify_one();
        self.room.notify_waiters();
        self.relief.notify_waiters();
        self.closed.cancel();
    }

    /// Completes once the queue is closed (slow consumer, shed).
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Queues `out` once the normal and bulk lanes have room for it (and the
    /// relay-wide budget does), waiting as long as it takes: for senders
    /// that can themselves wait, such as a streamed body, whose source is
    /// then read no faster than the consumer takes it. `Err` once closed.
    pub async fn push_when_room(&self, out: Outbound) -> Result<(), String> {
        self.push_within(out, usize::MAX).await
    }

    /// [`push_when_room`](Self::push_when_room), waiting further until the
    /// queue holds at most `window` bytes with `out`: a sender that has a
    /// lot to send (a file) keeps only that much of it queued.
    pub async fn push_within(&self, out: Outbound, window: usize) -> Result<(), String> {
        let size = Self::size_of(&out);
        let lane = Lane::of(out.msg());
        let mut out = Some(out);
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Registered (and counted) before looking, so a pop in between
            // is not missed.
            room.as_mut().enable();
            let waiting = RoomWaiter::new(&self.room_waiters);
            {
                let mut state = lock(&self.state);
                if let Some(reason) = &state.closed {
                    return Err(reason.clone());
                }
                let fits = state.data_messages() < self.limits.messages
                    && self.bytes() + size <= self.limits.bytes.min(window)
                    && self.budget.used() + size <= self.budget.limit;
                // An empty queue always takes one message, however large.
                if fits || state.data_messages() == 0 {
                    let out = out.take().expect("pushed only once");
                    self.admit(&mut state, lane, out, size, false);
                    return Ok(());
                }
            }
            room.await;
            drop(waiting);
        }
    }

    /// Waits for messages and moves up to `max` into `batch`, control lane
    /// first, loss notices before anything else. `Err(reason)` once closed.
    /// Cancel-safe: nothing is taken until the batch is returned.
    pub async fn next_batch(&self, max: usize) -> Result<Vec<Outbound>, String> {
        loop {
            let mut batch = Vec::new();
            {
                let mut state = lock(&self.state);
                if let Some(reason) = &state.closed {
                    return Err(reason.clone());
                }
                batch.reserve((self.len() + state.lost.len()).min(max));
                for (channel, count) in std::mem::take(&mut state.lost) {
                    batch.push(Outbound::new(Msg::Lost { channel, count }));
                }
                for lane in 0..state.lanes.len() {
                    while batch.len() < max {
                        let Some(entry) = state.lanes[lane].pop_front() else {
                            break;
                        };
                        self.forget(&entry);
                        batch.push(entry.out);
                    }
                }
                if !batch.is_empty() {
                    let relieved = state.pressed_since.is_some()
                        && self.limits.is_low(state.data_messages(), self.bytes());
                    if relieved {
                        state.pressed_since = None;
                        state.slow_reported = false;
                    }
                    drop(state);
                    if relieved {
                        self.relief.notify_waiters();
                    }
                    if self.room_waiters.load(Ordering::Acquire) > 0 {
                        self.room.notify_waiters();
                    }
                    return Ok(batch);
                }
            }
            // notify_one keeps a permit, so a push between the check above
            // and this await is not missed.
            self.notify.notified().await;
        }
    }
}

/// Counts a sender waiting for room while it lives.
struct RoomWaiter<'a>(&'a AtomicUsize);

impl<'a> RoomWaiter<'a> {
    fn new(waiters: &'a AtomicUsize) -> Self {
        waiters.fetch_add(1, Ordering::AcqRel);
        Self(waiters)
    }
}

impl Drop for RoomWaiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for OutboundQueue {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let queued: usize = state.lanes.iter().flatten().map(|e| e.size).sum();
        self.budget.used.fetch_sub(queued, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Data;

    fn message(channel: &str, seq: u64, bytes: usize) -> Outbound {
        Outbound::new(Msg::Message {
            channel: channel.to_owned(),
            seq,
            data: Data::from(vec![b'x'; bytes]),
        })
    }

    fn error() -> Outbound {
        Outbound::new(Msg::error(
            crate::protocol::ErrorCode::Overloaded,
            "e",
            None,
        ))
    }

    async fn drain(queue: &OutboundQueue) -> Vec<Msg> {
        let batch = queue.next_batch(1000).await.unwrap();
        batch.iter().map(|o| o.msg().clone()).collect()
    }

    fn limits(messages: usize, bytes: usize) -> QueueLimits {
        QueueLimits {
            messages,
            bytes,
            slow_after: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn presence_churn_is_coalesced_to_the_latest_count_per_channel() {
        let budget = Budget::new(1 << 30);
        let queue = OutboundQueue::new(limits(16, 1 << 20), &budget);
        let presence = |channel: &str, count: u64| {
            Outbound::new(Msg::Presence {
                channel: channel.to_owned(),
                count,
            })
        };
        // Far more updates than the lane holds: a storm of joins and leaves.
        for count in 1..=10_000 {
            let channel = if count % 2 == 0 { "a" } else { "b" };
            assert!(matches!(
                queue.push(presence(channel, count), Overflow::DropNewest),
                Pushed::Queued { .. }
            ));
        }
        queue.push(error(), Overflow::DropNewest);
        let drained = drain(&queue).await;
        assert_eq!(drained.len(), 3, "{drained:?}");
        assert!(matches!(&drained[0], Msg::Presence { channel, count: 9_999 } if channel == "b"));
        assert!(matches!(&drained[1], Msg::Presence { channel, count: 10_000 } if channel == "a"));
        assert!(matches!(drained[2], Msg::Error { .. }));
        assert_eq!(queue.bytes(), 0);
    }

    #[tokio::test]
    async fn control_drains_before_normal_and_loss_is_reported_first() {
        let budget = Budget::new(1 << 30);
        let queue = OutboundQueue::new(limits(3, 1 << 20), &budget);
        for seq in 1..=5 {
            queue.push(message("c", seq, 10), Overflow::DropOldest);
        }
        queue.push(error(), Overflow::DropNewest);
        let drained = drain(&queue).await;
        // Room for 3: seq 1 and 2 evicted to make room for 4 and 5; the
        // error has a lane of its own.
        assert!(
            matches!(&drained[0], Msg::Lost { channel, count: 2 } if channel == "c"),
            "{drained:?}"
        );
        assert!(matches!(drained[1], Msg::Error { .. }), "{drained:?}");
        let seqs: Vec<u64> = drained[2..]
            .iter()
            .map(|m| match m {
                Msg::Message { seq, .. } => *seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        assert_eq!((queue.len(), queue.bytes(), budget.used()), (0, 0, 0));
    }

    #[tokio::test]
    async fn bytes_bound_the_queue_and_disconnect_closes_it() {
        let budget = Budget::new(1 << 30);
        let queue = OutboundQueue::new(limits(1000, 1000), &budget);
        assert_eq!(
            queue.push(message("game", 1, 500), Overflow::Disconnect),
            Pushed::Queued {
                evicted: 0,
                pressing: false
            }
        );
        assert_eq!(
            queue.push(message("game", 2, 500), Overflow::Disconnect),
            Pushed::Closed
        );
        assert_eq!(budget.used(), 0, "a closed queue frees its bytes");
        let reason = queue.next_batch(10).await.unwrap_err();
        assert!(reason.contains("game"), "{reason}");
    }

    #[tokio::test]
    async fn a_waiting_sender_goes_on_as_the_consumer_takes() {
        let budget = Budget::new(1 << 30);
        let queue = OutboundQueue::new(limits(2, 1 << 20), &budget);
        queue.push_when_room(message("c", 1, 1)).await.unwrap();
        queue.push_when_room(message("c", 2, 1)).await.unwrap();
        let third = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.push_when_room(message("c", 3, 1)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!third.is_finished(), "no room yet");
        assert_eq!(drain(&queue).await.len(), 2);
        third.await.unwrap().unwrap();
        assert_eq!(drain(&queue).await.len(), 1);
        queue.close("gone");
        assert!(queue.push_when_room(message("c", 4, 1)).await.is_err());
    }

    #[tokio::test]
    async fn refused_messages_leave_the_queue_as_it_was() {
        let budget = Budget::new(1 << 30);
        let queue = OutboundQueue::new(limits(1, 1 << 20), &budget);
        queue.push(message("c", 1, 1), Overflow::DropOldest);
        assert_eq!(
            queue.push(message("c", 2, 1), Overflow::Refuse),
            Pushed::Dropped { evicted: 0 }
        );
        assert_eq!(queue.len(), 1);
    }

    #[tokio::test]
    async fn the_slowest_consumer_over_the_budget_evicts_only_what_makes_room() {
        // Room for ten 36-byte messages (36 + the 64-byte header estimate).
        let budget = Budget::new(1000);
        let queue = OutboundQueue::new(limits(1000, 1 << 20), &budget);
        for seq in 1..=10 {
            queue.push(message("c", seq, 36), Overflow::DropOldest);
        }
        assert_eq!(queue.len(), 10);
        // Nobody else to shed: it gives up its own oldest, one for one.
        assert_eq!(
            queue.push(message("c", 11, 36), Overflow::DropOldest),
            Pushed::Queued {
                evicted: 1,
                pressing: false
            }
        );
        assert_eq!(queue.len(), 10);
        assert_eq!(budget.used(), 1000);
        let batch = queue.next_batch(100).await.unwrap();
        assert!(
            matches!(batch[0].msg(), Msg::Lost { count: 1, .. }),
            "{:?}",
            batch[0].msg()
        );
        assert_eq!(batch.len(), 11, "the loss notice and ten messages");
    }

    #[tokio::test]
    async fn over_the_budget_the_slowest_other_consumer_is_shed() {
        let budget = Budget::new(10_000);
        let slow = OutboundQueue::new(limits(1000, 1 << 20), &budget);
        let fast = OutboundQueue::new(limits(1000, 1 << 20), &budget);
        for seq in 0..8 {
            slow.push(message("c", seq, 1000), Overflow::DropOldest);
        }
        assert!(budget.used() <= 10_000);
        // The fast consumer needs room: the slow one goes.
        for seq in 0..4 {
            let pushed = fast.push(message("c", seq, 1000), Overflow::DropOldest);
            assert_eq!(
                pushed,
                Pushed::Queued {
                    evicted: 0,
                    pressing: false
                }
            );
        }
        assert_eq!(budget.shed_count(), 1);
        assert!(slow.next_batch(10).await.is_err());
        assert_eq!(drain(&fast).await.len(), 4);
    }

    fn pressing(pushed: Pushed) -> bool {
        matches!(pushed, Pushed::Queued { pressing: true, .. })
    }

    fn pressed_queue(budget: &Arc<Budget>) -> Arc<OutboundQueue> {
        let limits = QueueLimits {
            messages: 8,
            bytes: 1 << 20,
            slow_after: Duration::from_secs(1),
        };
        OutboundQueue::new(limits, budget)
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_past_half_presses_until_drained_to_a_quarter() {
        let budget = Budget::new(1 << 30);
        let queue = pressed_queue(&budget);
        for seq in 1..=4 {
            assert!(!pressing(
                queue.push(message("c", seq, 1), Overflow::DropOldest)
            ));
        }
        assert!(pressing(
            queue.push(message("c", 5, 1), Overflow::DropOldest)
        ));
        // Requests and advisory messages never press.
        assert!(!pressing(queue.push(message("c", 6, 1), Overflow::Refuse)));
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.relieved().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(queue.next_batch(3).await.unwrap().len(), 3);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "three left: above a quarter");
        assert!(
            pressing(queue.push(message("c", 7, 1), Overflow::DropOldest)),
            "still pressed"
        );
        assert_eq!(queue.next_batch(2).await.unwrap().len(), 2);
        tokio::time::timeout(Duration::from_millis(100), waiter)
            .await
            .expect("relieved at a quarter")
            .unwrap();
        assert!(!queue.is_slow());
        assert!(!pressing(
            queue.push(message("c", 8, 1), Overflow::DropOldest)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_behind_for_slow_after_stops_pressing_and_gets_its_policy() {
        let budget = Budget::new(1 << 30);
        let queue = pressed_queue(&budget);
        for seq in 1..=5 {
            queue.push(message("c", seq, 1), Overflow::DropOldest);
        }
        let started = Instant::now();
        queue.relieved().await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(1),
            "waited slow_after"
        );
        assert!(queue.is_slow());
        let mut evicted = 0;
        for seq in 6..=20 {
            match queue.push(message("c", seq, 1), Overflow::DropOldest) {
                Pushed::Queued {
                    evicted: e,
                    pressing,
                } => {
                    assert!(!pressing, "a slow consumer holds nobody back");
                    evicted += e;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(evicted, 12, "full at 8: the oldest made room");
        // It catches up: no longer slow, and it presses again when it fills.
        assert_eq!(drain(&queue).await.len(), 9, "the loss notice and eight");
        assert!(!queue.is_slow());
        for seq in 21..=24 {
            queue.push(message("c", seq, 1), Overflow::DropOldest);
        }
        assert!(pressing(
            queue.push(message("c", 25, 1), Overflow::DropOldest)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn without_slow_after_nothing_presses() {
        let budget = Budget::new(1 << 30);
        let queue = OutboundQueue::new(limits(8, 1 << 20), &budget);
        for seq in 1..=8 {
            assert!(!pressing(
                queue.push(message("c", seq, 1), Overflow::DropOldest)
            ));
        }
        queue.relieved().await;
    }
}
