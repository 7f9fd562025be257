//! Keeping persisted channels' history in the store, behind the publishers'
//! backs: a publish only marks its channel changed (under the lock it
//! already holds); [`persist`] writes what changed in one transaction at
//! most every [`FLUSH_EVERY`], and once more at shutdown, after which the
//! stop is marked clean. [`restore`] puts it back at start: a clean stop's
//! channels keep their epoch and seq; after a crash the stored history is
//! discarded, since seqs published after the last write may have reached
//! clients and must not be handed out again under the same epoch.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::history::{Entry, History, HistoryOptions};
use super::{Channel, ChannelState, Channels, lock};
use crate::protocol::Data;
use crate::store::history::{ChannelRow, HistoryWrite, Loaded, MessageRow};
use crate::store::{Store, StoreError, wall_ms};

/// History reaches the store at most this long after it was published.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

impl Channels {
    /// What changed in persisted channels since the last call.
    fn take_writes(&self) -> Vec<HistoryWrite> {
        let pending = {
            let mut pending = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *pending)
        };
        let mut writes: Vec<HistoryWrite> = pending
            .forgotten
            .into_iter()
            .map(|channel| HistoryWrite::Forgotten { channel })
            .collect();
        for name in pending.changed {
            let Some(ch) = self.map.get(&name).map(|c| c.clone()) else {
                continue;
            };
            let mut state = lock(&ch);
            let last_seq = state.last_seq;
            let Some(unwritten) = state.history.as_mut().and_then(|h| h.unwritten(last_seq)) else {
                continue;
            };
            writes.push(HistoryWrite::Changed {
                channel: name,
                epoch: unwritten.epoch,
                last_seq: unwritten.last_seq,
                first_kept: unwritten.first_kept,
                added: unwritten
                    .entries
                    .into_iter()
                    .map(|e| MessageRow {
                        seq: e.seq,
                        at_ms: e.at_ms,
                        data: e.data.0.to_vec(),
                    })
                    .collect(),
            });
        }
        writes
    }

    /// Puts stored channels back, with the epoch and seq they had, under
    /// the rules in force now (a channel no rule persists any more is left
    /// out, and its rows go at the next write).
    fn restore_rows(&self, rows: Vec<ChannelRow>) -> usize {
        let now = wall_ms();
        let mut restored = 0;
        for row in rows {
            let options = self
                .policies
                .history_for(&row.channel)
                .map(HistoryOptions::from)
                .filter(|o| o.persist);
            let Some(options) = options else {
                self.forget_stored(&row.channel);
                continue;
            };
            let mut history = History::new(
                &row.channel,
                row.epoch.into(),
                options,
                self.budget.clone(),
                now,
            );
            let entries = row
                .messages
                .into_iter()
                .map(|m| Entry {
                    seq: m.seq,
                    at_ms: m.at_ms,
                    data: Data::from(m.data),
                    order: 0,
                })
                .collect();
            history.restore(entries, row.last_seq, now);
            self.map.insert(
                row.channel.clone(),
                Arc::new(Channel {
                    state: std::sync::Mutex::new(ChannelState {
                        last_seq: row.last_seq,
                        history: Some(history),
                        ..ChannelState::default()
                    }),
                }),
            );
            // What `restore` dropped (expired, over the rule) leaves the store.
            self.note_changed(&row.channel);
            restored += 1;
        }
        restored
    }

    fn forget_stored(&self, channel: &str) {
        let mut pending = self.unwritten.lock().unwrap_or_else(|e| e.into_inner());
        pending.forgotten.insert(channel.to_owned());
    }
}

/// Loads persisted history into `channels` (before any client connects).
pub async fn restore(channels: &Channels, store: &Store) -> Result<(), StoreError> {
    match store.call(crate::store::history::load).await? {
        Loaded::Clean(rows) => {
            let restored = channels.restore_rows(rows);
            if restored > 0 {
                tracing::info!(channels = restored, "channel history restored");
            }
        }
        Loaded::Discarded(count) => {
            tracing::warn!(
                channels = count,
                "the relay did not stop cleanly: stored channel history discarded (those channels get new epochs; clients resync)"
            );
        }
    }
    Ok(())
}

/// Writes persisted channels' changes until `stop`; then writes the rest
/// and marks the stop clean.
pub async fn persist(channels: Arc<Channels>, store: Store, stop: CancellationToken) {
    // One lost write and the store is behind what clients saw: the stop
    // must not be called clean then.
    let mut failed = false;
    loop {
        let stopping = tokio::select! {
            _ = channels.changed.notified() => false,
            _ = stop.cancelled() => true,
        };
        if !stopping {
            // Let a burst of publishes gather into one transaction.
            tokio::select! {
                _ = tokio::time::sleep(FLUSH_EVERY) => {}
                _ = stop.cancelled() => {}
            }
        }
        // Only a take after the stop was asked for may end the loop: one
        // that began before it can miss the last publishes.
        let last = stop.is_cancelled();
        if last {
            channels.seal();
        }
        let writes = channels.take_writes();
        if !writes.is_empty() {
            let count = writes.len();
            let written = store
                .call(move |conn| crate::store::history::apply(conn, &writes, wall_ms()))
                .await;
            if let Err(e) = written {
                failed = true;
                tracing::warn!(error = %e, count, "channel history not persisted; a restart will give those channels new epochs");
            }
        }
        if last {
            // Only a stop with every write in may say so.
            if !failed && let Err(e) = store.call(crate::store::history::mark_clean).await {
                tracing::warn!(error = %e, "channel history not marked clean; the next start discards it");
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ChannelsConfig, HistoryRule};
    use crate::delivery::Pressure;
    use crate::metrics::Metrics;

    fn persisted(ttl_ms: u64) -> Channels {
        Channels::new(
            Arc::new(Metrics::new()),
            ChannelsConfig {
                history: vec![HistoryRule {
                    pattern: "chat/*".into(),
                    size: 10,
                    ttl_ms,
                    persist: true,
                }],
                ..ChannelsConfig::default()
            },
        )
    }

    fn added(writes: &[HistoryWrite]) -> Vec<u64> {
        writes
            .iter()
            .flat_map(|w| match w {
                HistoryWrite::Changed { added, .. } => added.iter().map(|m| m.seq).collect(),
                HistoryWrite::Forgotten { .. } => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn every_change_is_written_even_after_a_read_expired_messages() {
        let channels = persisted(1);
        channels.publish("chat/a", Data::from("1"), &mut Pressure::default());
        assert_eq!(added(&channels.take_writes()), [1]);
        std::thread::sleep(Duration::from_millis(5));
        // A read that expires what is kept changes the history too...
        channels.history("chat/a", None, None, 1 << 20).unwrap();
        let writes = channels.take_writes();
        assert!(
            matches!(
                writes.as_slice(),
                [HistoryWrite::Changed { first_kept: 2, .. }]
            ),
            "{writes:?}"
        );
        // ...and does not hide the next publish from the writer.
        channels.publish("chat/a", Data::from("2"), &mut Pressure::default());
        assert_eq!(added(&channels.take_writes()), [2]);
    }

    #[test]
    fn a_sealed_relay_numbers_nothing_on_persisted_channels() {
        let channels = persisted(60_000);
        assert_eq!(
            channels.publish("chat/a", Data::from("1"), &mut Pressure::default()),
            1
        );
        channels.seal();
        assert_eq!(
            channels.publish("chat/a", Data::from("2"), &mut Pressure::default()),
            0
        );
        assert_eq!(
            channels.publish("room", Data::from("x"), &mut Pressure::default()),
            0,
            "nobody listens to room: unchanged"
        );
    }
}
