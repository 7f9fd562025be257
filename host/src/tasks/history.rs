//! The record of what ran: runs and their log lines written to the store
//! in batches (one transaction per batch, by one writer task), each task's
//! history pruned to its newest runs as it grows, and the live feed of
//! [`TaskEvent`]s that followers (the WebSocket endpoint, the CLI) read.
//!
//! A run's first row is committed before its plugin starts (callers await
//! [`History::insert`]), so a crash never loses a run that began: the next
//! start finds it `queued` or `running` and marks it interrupted. Later
//! changes and log lines are queued and written within a batch's time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{RunState, TaskEvent};
use crate::store::{Store, tasks as saved};

/// Writes waiting for the writer; run changes wait for room, log lines
/// beyond it are counted and dropped.
const QUEUED_WRITES: usize = 8_192;
/// Most writes in one transaction.
const BATCH: usize = 1_024;
/// Events a follower may fall behind by before it is told it lagged.
const FEED: usize = 4_096;

enum Write {
    Insert {
        run: NewRun,
        committed: Option<oneshot::Sender<()>>,
    },
    Update {
        id: i64,
        state: RunState,
        outcome: Option<String>,
        at_ms: i64,
    },
    Log {
        run_id: i64,
        at_ms: i64,
        level: &'static str,
        message: String,
    },
}

/// A run's first row.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: i64,
    pub task_id: i64,
    pub attempt: u32,
    pub state: RunState,
    pub scheduled_at_ms: i64,
    pub at_ms: i64,
    pub outcome: Option<String>,
}

/// Counters for `/admin/stats` and the benchmarks.
#[derive(Debug, Default)]
pub struct HistoryStats {
    /// Rows written (runs inserted or changed, log lines).
    pub writes: AtomicU64,
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Log lines dropped because the writer was behind.
    pub dropped_lines: AtomicU64,
}

#[derive(Clone)]
pub struct History {
    writes: mpsc::Sender<Write>,
    events: broadcast::Sender<TaskEvent>,
    pub stats: Arc<HistoryStats>,
}

impl History {
    /// Starts the writer; it writes until `stop`, then what is still
    /// queued, then ends.
    pub fn start(
        store: Store,
        keep_runs: u32,
        stop: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (writes, queue) = mpsc::channel(QUEUED_WRITES);
        let stats = Arc::new(HistoryStats::default());
        let writer = tokio::spawn(write(store, queue, keep_runs, stats.clone(), stop));
        let (events, _) = broadcast::channel(FEED);
        (
            Self {
                writes,
                events,
                stats,
            },
            writer,
        )
    }

    /// Records a new run; returns once it is committed.
    pub async fn insert(&self, run: NewRun) {
        let (committed, done) = oneshot::channel();
        let write = Write::Insert {
            run,
            committed: Some(committed),
        };
        if self.writes.send(write).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Records a new run without waiting for it (a `skipped` one).
    pub async fn insert_later(&self, run: NewRun) {
        let _ = self
            .writes
            .send(Write::Insert {
                run,
                committed: None,
            })
            .await;
    }

    /// Moves a run to `state`.
    pub async fn update(&self, id: i64, state: RunState, outcome: Option<String>, at_ms: i64) {
        let _ = self
            .writes
            .send(Write::Update {
                id,
                state,
                outcome,
                at_ms,
            })
            .await;
    }

    /// Appends a log line unless the writer is far behind (then counted);
    /// callable from any thread, never waits.
    pub fn log(&self, run_id: i64, at_ms: i64, level: &'static str, message: String) {
        let write = Write::Log {
            run_id,
            at_ms,
            level,
            message,
        };
        if self.writes.try_send(write).is_err() {
            self.stats.dropped_lines.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Tells the live feed's followers.
    pub fn emit(&self, event: TaskEvent) {
        // No follower is not an error.
        let _ = self.events.send(event);
    }

    pub fn follow(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }
}

async fn write(
    store: Store,
    mut queue: mpsc::Receiver<Write>,
    keep_runs: u32,
    stats: Arc<HistoryStats>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let received = tokio::select! {
            biased;
            n = queue.recv_many(&mut batch, BATCH) => n,
            _ = stop.cancelled() => {
                queue.close();
                queue.recv_many(&mut batch, BATCH).await
            }
        };
        if received == 0 {
            return;
        }
        let writes = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
        let count = writes.len() as u64;
        let committed = store
            .call(move |conn| {
                let tx = conn.transaction()?;
                let mut waiting = Vec::new();
                let mut touched = Vec::new();
                for write in writes {
                    // One refused row (a run of a task deleted meanwhile)
                    // must not cost the rest of the batch.
                    let result = match write {
                        Write::Insert { run, committed } => {
                            waiting.extend(committed);
                            if !touched.contains(&run.task_id) {
                                touched.push(run.task_id);
                            }
                            saved::insert_run(
                                &tx,
                                run.id,
                                run.task_id,
                                run.attempt,
                                run.state.as_str(),
                                run.scheduled_at_ms,
                                run.at_ms,
                                run.outcome.as_deref(),
                            )
                        }
                        Write::Update {
                            id,
                            state,
                            outcome,
                            at_ms,
                        } => {
                            saved::set_run_state(&tx, id, state.as_str(), outcome.as_deref(), at_ms)
                        }
                        Write::Log {
                            run_id,
                            at_ms,
                            level,
                            message,
                        } => saved::log(&tx, run_id, at_ms, level, &message),
                    };
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "task history row not written");
                    }
                }
                for task_id in touched {
                    saved::prune_task_runs(&tx, task_id, keep_runs)?;
                }
                tx.commit()?;
                Ok(waiting)
            })
            .await;
        match committed {
            Ok(waiting) => {
                stats.writes.fetch_add(count, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                for committed in waiting {
                    let _ = committed.send(());
                }
            }
            Err(e) => tracing::warn!(error = %e, rows = count, "task history not written"),
        }
    }
}
