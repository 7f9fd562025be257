//! The task manager: one tokio task owns every task's definition, schedule
//! and running firings, so deciding what fires never races with an
//! operator's change. It sleeps until the earliest due time, fires what is
//! due (applying the task's concurrency rule), and answers [`Tasks`]'
//! commands in between. A firing runs in a task of its own ([`run::fire`])
//! and reports back when it ends.
//!
//! At start it marks the runs a crash left open as interrupted, then looks
//! at each task's last scheduled slot: a slot missed while the relay was
//! down is recorded `skipped`, or run once (`missed = "run-once"`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::clock::Clock;
use super::history::History;
use super::run::{self, Executor, Job, Progress, Runner, Stop};
use super::schedule::Schedule;
use super::shared::{Peers, Shared};
use super::spec::{Concurrency, Missed, SpecError, TaskSpec};
use super::{Origin, RunState, TaskChange, TaskEvent, TaskState};
use crate::config::TasksConfig;
use crate::store::{Store, StoreError, tasks as saved};

/// Commands waiting for the manager.
const QUEUED_COMMANDS: usize = 256;

/// Why a task operation was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    #[error("no task {0:?}")]
    NotFound(String),
    #[error("a task named {0:?} already exists")]
    Exists(String),
    #[error(transparent)]
    Invalid(#[from] SpecError),
    #[error(
        "task {0:?} is defined by a file in the task folder: change or remove the file instead"
    )]
    FromFile(String),
    #[error("task {0:?} is running and its concurrency is \"forbid\"")]
    Busy(String),
    #[error("the task store failed")]
    Store(#[from] StoreError),
    #[error("the task manager has stopped")]
    Stopped,
}

/// How a definition meets an existing task of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Define {
    /// Only a new name (`POST /admin/tasks`).
    Create,
    /// Only an existing task (`PUT /admin/tasks/{id}`).
    Replace,
    /// Either (a task file).
    Upsert,
}

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    pub id: i64,
    pub name: String,
    pub state: TaskState,
    pub origin: Origin,
    /// When its schedule fires next (wall-clock ms); none when manual,
    /// disabled or done.
    pub next_run_at_ms: Option<i64>,
    /// Its firings going on now.
    pub active: Vec<ActiveRun>,
    /// Its newest run, finished or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunView>,
    pub definition: TaskSpec,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActiveRun {
    pub run: i64,
    pub attempt: u32,
    /// `queued`, `running`, or `retry_wait` between attempts.
    pub state: &'static str,
}

/// A run as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    pub id: i64,
    pub task: String,
    pub attempt: u32,
    pub state: String,
    pub scheduled_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    pub duration_ms: Option<i64>,
    pub outcome: Option<String>,
}

impl RunView {
    fn new(row: saved::RunRow, task: String) -> Self {
        Self {
            id: row.id,
            task,
            attempt: row.attempt,
            duration_ms: row.started_at_ms.zip(row.ended_at_ms).map(|(s, e)| e - s),
            state: row.state,
            scheduled_at_ms: row.scheduled_at_ms,
            started_at_ms: row.started_at_ms,
            ended_at_ms: row.ended_at_ms,
            outcome: row.outcome,
        }
    }
}

/// Tasks by state, and runs in flight, for `/admin/stats`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TaskCounts {
    pub total: usize,
    pub idle: usize,
    pub running: usize,
    pub disabled: usize,
    pub runs_queued: usize,
    pub runs_running: usize,
}

/// `/admin/stats`' `tasks` object.
#[derive(Debug, Clone, Serialize)]
pub struct TaskStats {
    #[serde(flatten)]
    pub counts: TaskCounts,
    pub runs_started: u64,
    pub runs_succeeded: u64,
    pub runs_failed: u64,
    pub runs_timed_out: u64,
    pub runs_cancelled: u64,
    pub runs_skipped: u64,
    /// From a scheduled firing's due time to its plugin starting: since
    /// start, and over the last complete ten seconds.
    pub firing_lag: Option<crate::plugin::loaded::Percentiles>,
    pub firing_lag_last_10s: Option<crate::plugin::loaded::Percentiles>,
    /// Rows the history wrote (runs and log lines), and in how many transactions.
    pub history_writes: u64,
    pub history_batches: u64,
    pub log_lines_dropped: u64,
}

enum Command {
    Define {
        spec: TaskSpec,
        origin: Origin,
        how: Define,
        /// Set for a definition another node shared: its anchor.
        shared: Option<i64>,
        reply: oneshot::Sender<Result<TaskView, TaskError>>,
    },
    Delete {
        name: String,
        origin: Origin,
        /// Deleted on another node (not to be shared again).
        shared: bool,
        reply: oneshot::Sender<Result<(), TaskError>>,
    },
    Run {
        name: String,
        restart: bool,
        reply: oneshot::Sender<Result<i64, TaskError>>,
    },
    Stop {
        name: String,
        reply: oneshot::Sender<Result<usize, TaskError>>,
    },
    Enable {
        name: String,
        /// `None`: flip it.
        enabled: Option<bool>,
        reply: oneshot::Sender<Result<TaskView, TaskError>>,
    },
    Get {
        name: String,
        reply: oneshot::Sender<Result<TaskView, TaskError>>,
    },
    List {
        reply: oneshot::Sender<Vec<TaskView>>,
    },
    Counts {
        reply: oneshot::Sender<TaskCounts>,
    },
    TakeOver {
        name: String,
        slot_ms: i64,
        from: String,
        reply: oneshot::Sender<Result<(), TaskError>>,
    },
}

/// Whether a firing needs the cluster's say-so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Run by hand: this node's own.
    Unclaimed,
    /// A slot of the schedule: runs only if this node claims it.
    Ask,
    /// A slot this node already holds (taken over from a node gone).
    Held,
}

/// The handle to the task manager; cheap to clone.
#[derive(Clone)]
pub struct Tasks {
    commands: mpsc::Sender<Command>,
    store: Store,
    pub runner: Arc<Runner>,
}

impl Tasks {
    /// Marks the runs a crash left open, loads the stored tasks and starts
    /// the manager. It runs until `stop`; then it stops every run (state
    /// `cancelled`), waits for them, writes the history out, and the
    /// returned handle completes.
    pub async fn start(
        store: Store,
        executor: Arc<dyn Executor>,
        config: &TasksConfig,
        clock: Clock,
        peers: Option<Arc<dyn Peers>>,
        stop: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        let now = clock.now_ms();
        let (interrupted, last_run_id, rows, slots) = store
            .call(move |conn| {
                let interrupted = saved::mark_interrupted(conn, now)?;
                Ok((
                    interrupted,
                    saved::max_run_id(conn)?,
                    saved::tasks(conn)?,
                    saved::last_slots(conn)?,
                ))
            })
            .await?;
        if interrupted > 0 {
            tracing::warn!(
                runs = interrupted,
                "task runs interrupted by the last stop marked failed"
            );
        }
        let stop_history = CancellationToken::new();
        let (history, writer) =
            History::start(store.clone(), config.keep_runs, stop_history.clone());
        let runner = Arc::new(Runner::new(
            executor,
            history,
            config.max_concurrent_runs,
            clock,
            config.max_log_lines_per_run,
            last_run_id,
        ));
        let (commands, queue) = mpsc::channel(QUEUED_COMMANDS);
        let (ended_tx, ended) = mpsc::channel(QUEUED_COMMANDS);
        let mut manager = Manager {
            store: store.clone(),
            runner: runner.clone(),
            tasks: HashMap::new(),
            by_name: HashMap::new(),
            due: BTreeSet::new(),
            firings: TaskTracker::new(),
            ended_tx,
            next_firing: 0,
            peers,
        };
        let slots: HashMap<i64, i64> = slots.into_iter().collect();
        for row in rows {
            let last_slot = slots.get(&row.id).copied();
            manager.restore(row, last_slot).await;
        }
        tracing::info!(tasks = manager.tasks.len(), "tasks loaded");
        let handle = tokio::spawn(async move {
            manager.serve(queue, ended, stop).await;
            stop_history.cancel();
            let _ = writer.await;
        });
        Ok((
            Self {
                commands,
                store,
                runner,
            },
            handle,
        ))
    }

    async fn ask<R>(
        &self,
        command: impl FnOnce(oneshot::Sender<R>) -> Command,
    ) -> Result<R, TaskError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| TaskError::Stopped)?;
        answer.await.map_err(|_| TaskError::Stopped)
    }

    /// Defines a task (checked first; refusals name the field).
    pub async fn define(
        &self,
        spec: TaskSpec,
        origin: Origin,
        how: Define,
    ) -> Result<TaskView, TaskError> {
        self.define_from(spec, origin, how, None).await
    }

    /// Defines a task; `shared` is the anchor of a definition another node
    /// shared (none for this node's own, which it shares).
    pub(super) async fn define_from(
        &self,
        spec: TaskSpec,
        origin: Origin,
        how: Define,
        shared: Option<i64>,
    ) -> Result<TaskView, TaskError> {
        self.ask(|reply| Command::Define {
            spec,
            origin,
            how,
            shared,
            reply,
        })
        .await?
    }

    /// Deletes a task, stopping its runs; its history goes with it.
    pub async fn delete(&self, name: &str, origin: Origin) -> Result<(), TaskError> {
        self.delete_from(name, origin, false).await
    }

    /// Runs `name`'s slot `slot_ms`, whose run node `from` lost when it
    /// left the cluster: again if the task has retries, else recorded failed.
    pub(super) async fn take_over(
        &self,
        name: &str,
        slot_ms: i64,
        from: &str,
    ) -> Result<(), TaskError> {
        let (name, from) = (name.to_owned(), from.to_owned());
        self.ask(|reply| Command::TakeOver {
            name,
            slot_ms,
            from,
            reply,
        })
        .await?
    }

    /// Deletes a task another node deleted.
    pub(super) async fn delete_shared(&self, name: &str) -> Result<(), TaskError> {
        self.delete_from(name, Origin::Api, true).await
    }

    async fn delete_from(&self, name: &str, origin: Origin, shared: bool) -> Result<(), TaskError> {
        let name = name.to_owned();
        self.ask(|reply| Command::Delete {
            name,
            origin,
            shared,
            reply,
        })
        .await?
    }

    /// Fires a task now (its concurrency rule applies); the new run's id.
    pub async fn run_now(&self, name: &str) -> Result<i64, TaskError> {
        let name = name.to_owned();
        self.ask(|reply| Command::Run {
            name,
            restart: false,
            reply,
        })
        .await?
    }

    /// Stops a task's runs, then fires it once they have ended.
    pub async fn restart(&self, name: &str) -> Result<i64, TaskError> {
        let name = name.to_owned();
        self.ask(|reply| Command::Run {
            name,
            restart: true,
            reply,
        })
        .await?
    }

    /// Stops a task's runs (queued, running, or waiting to retry); how many.
    pub async fn stop(&self, name: &str) -> Result<usize, TaskError> {
        let name = name.to_owned();
        self.ask(|reply| Command::Stop { name, reply }).await?
    }

    /// Turns a task's schedule on or off (`None`: the other way round).
    pub async fn set_enabled(
        &self,
        name: &str,
        enabled: Option<bool>,
    ) -> Result<TaskView, TaskError> {
        let name = name.to_owned();
        self.ask(|reply| Command::Enable {
            name,
            enabled,
            reply,
        })
        .await?
    }

    /// One task, by name or id, with its newest run.
    pub async fn get(&self, name: &str) -> Result<TaskView, TaskError> {
        let name = name.to_owned();
        let mut view = self.ask(|reply| Command::Get { name, reply }).await??;
        let (id, name) = (view.id, view.name.clone());
        view.last_run = self
            .store
            .call(move |conn| saved::runs(conn, Some(id), 1))
            .await?
            .pop()
            .map(|row| RunView::new(row, name));
        Ok(view)
    }

    /// Every task, by name, as the manager holds it (no history).
    pub async fn views(&self) -> Result<Vec<TaskView>, TaskError> {
        self.ask(|reply| Command::List { reply }).await
    }

    /// Every task, by name, with its newest run.
    pub async fn list(&self) -> Result<Vec<TaskView>, TaskError> {
        let mut views = self.views().await?;
        let mut last: HashMap<i64, saved::RunRow> = self
            .store
            .call(saved::last_runs)
            .await?
            .into_iter()
            .map(|row| (row.task_id, row))
            .collect();
        for view in &mut views {
            view.last_run = last
                .remove(&view.id)
                .map(|row| RunView::new(row, view.name.clone()));
        }
        Ok(views)
    }

    pub async fn counts(&self) -> Result<TaskCounts, TaskError> {
        self.ask(|reply| Command::Counts { reply }).await
    }

    /// Counts by state and what the runs and the history did since start.
    pub async fn stats(&self) -> Result<TaskStats, TaskError> {
        let runs = &self.runner.stats;
        let history = &self.runner.history.stats;
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        Ok(TaskStats {
            counts: self.counts().await?,
            runs_started: load(&runs.started),
            runs_succeeded: load(&runs.succeeded),
            runs_failed: load(&runs.failed),
            runs_timed_out: load(&runs.timed_out),
            runs_cancelled: load(&runs.cancelled),
            runs_skipped: load(&runs.skipped),
            firing_lag: runs.firing_lag.since_start(),
            firing_lag_last_10s: runs.firing_lag.last_window(),
            history_writes: load(&history.writes),
            history_batches: load(&history.batches),
            log_lines_dropped: load(&history.dropped_lines),
        })
    }

    /// A task's newest runs (every task's: `None`), newest first.
    pub async fn runs(&self, task: Option<&str>, limit: u32) -> Result<Vec<RunView>, TaskError> {
        let names: HashMap<i64, String> = self.list_names().await?.into_iter().collect();
        let task_id = match task {
            Some(task) => Some(self.get(task).await?.id),
            None => None,
        };
        let rows = self
            .store
            .call(move |conn| saved::runs(conn, task_id, limit))
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let name = names.get(&row.task_id).cloned().unwrap_or_default();
                RunView::new(row, name)
            })
            .collect())
    }

    /// Log lines matching `query` (task by name or id), oldest first.
    pub async fn logs(
        &self,
        task: Option<&str>,
        mut query: saved::LogQuery,
    ) -> Result<Vec<saved::LogRow>, TaskError> {
        if let Some(task) = task {
            query.task_id = Some(self.get(task).await?.id);
        }
        Ok(self
            .store
            .call(move |conn| saved::log_lines(conn, &query))
            .await?)
    }

    async fn list_names(&self) -> Result<Vec<(i64, String)>, TaskError> {
        Ok(self
            .store
            .call(saved::tasks)
            .await?
            .into_iter()
            .map(|row| (row.id, row.name))
            .collect())
    }

    /// The live feed of run changes, log lines and task changes.
    pub fn follow(&self) -> broadcast::Receiver<TaskEvent> {
        self.runner.history.follow()
    }
}

/// One task as the manager holds it.
struct Entry {
    id: i64,
    name: Arc<str>,
    spec: Arc<TaskSpec>,
    config: Arc<str>,
    schedule: Schedule,
    origin: Origin,
    anchor_ms: i64,
    next_due: Option<i64>,
    firings: HashMap<u64, Firing>,
}

struct Firing {
    stop: Stop,
    progress: Arc<Progress>,
    /// Cancelled when the firing has ended.
    ended: CancellationToken,
}

impl Entry {
    fn new(id: i64, spec: TaskSpec, schedule: Schedule, origin: Origin, anchor_ms: i64) -> Self {
        Self {
            id,
            name: spec.name.as_str().into(),
            config: serde_json::to_string(&spec.config)
                .unwrap_or_default()
                .into(),
            spec: Arc::new(spec),
            schedule,
            origin,
            anchor_ms,
            next_due: None,
            firings: HashMap::new(),
        }
    }

    fn state(&self) -> TaskState {
        if !self.firings.is_empty() {
            TaskState::Running
        } else if !self.spec.enabled {
            TaskState::Disabled
        } else {
            TaskState::Idle
        }
    }

    fn view(&self) -> TaskView {
        let mut active: Vec<ActiveRun> = self
            .firings
            .values()
            .map(|firing| {
                let state = *firing
                    .progress
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                ActiveRun {
                    run: firing.progress.run.load(Ordering::Relaxed),
                    attempt: firing.progress.attempt.load(Ordering::Relaxed),
                    state: state.map_or("retry_wait", RunState::as_str),
                }
            })
            .collect();
        active.sort_by_key(|run| run.run);
        TaskView {
            id: self.id,
            name: self.name.to_string(),
            state: self.state(),
            origin: self.origin,
            next_run_at_ms: self.next_due,
            active,
            last_run: None,
            definition: (*self.spec).clone(),
        }
    }

    fn job(&self, scheduled_at_ms: i64, scheduled: bool) -> Job {
        Job {
            task_id: self.id,
            task: self.name.clone(),
            spec: self.spec.clone(),
            config: self.config.clone(),
            scheduled_at_ms,
            scheduled,
            stop: Stop::default(),
        }
    }
}

struct Manager {
    store: Store,
    runner: Arc<Runner>,
    tasks: HashMap<i64, Entry>,
    by_name: HashMap<Arc<str>, i64>,
    /// (due time, task id), earliest first.
    due: BTreeSet<(i64, i64)>,
    firings: TaskTracker,
    ended_tx: mpsc::Sender<(i64, u64)>,
    next_firing: u64,
    /// The other nodes, in a cluster: who fires a slot, and the tasks
    /// defined here for them.
    peers: Option<Arc<dyn Peers>>,
}

impl Manager {
    async fn serve(
        &mut self,
        mut commands: mpsc::Receiver<Command>,
        mut ended: mpsc::Receiver<(i64, u64)>,
        stop: CancellationToken,
    ) {
        loop {
            let wake = self
                .due
                .first()
                .map(|(due, _)| self.runner.clock.instant_at(*due));
            tokio::select! {
                // Due firings before commands: a steady stream of API calls
                // must not hold the schedule back.
                biased;
                _ = stop.cancelled() => break,
                Some((task, firing)) = ended.recv() => self.ended(task, firing),
                _ = sleep_until(wake), if wake.is_some() => self.fire_due().await,
                Some(command) = commands.recv() => self.handle(command).await,
            }
        }
        for entry in self.tasks.values() {
            for firing in entry.firings.values() {
                firing.stop.stop("the relay is shutting down");
            }
        }
        self.firings.close();
        // Each run stops within milliseconds of being told; what they record
        // reaches the history before it is written out.
        while !self.firings.is_empty() {
            tokio::select! {
                _ = self.firings.wait() => {}
                Some((task, firing)) = ended.recv() => self.ended(task, firing),
            }
        }
    }

    /// Takes a stored task back: schedules it, and deals with a slot
    /// missed while the relay was down.
    async fn restore(&mut self, row: saved::TaskRow, last_slot: Option<i64>) {
        let spec = match serde_json::from_str::<TaskSpec>(&row.spec) {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(task = %row.name, error = %e, "a stored task no longer reads; not scheduled");
                return;
            }
        };
        let schedule = match spec.validate() {
            Ok(schedule) => schedule,
            Err(e) => {
                tracing::warn!(task = %row.name, error = %e, "a stored task is no longer valid; not scheduled");
                return;
            }
        };
        let mut entry = Entry::new(
            row.id,
            spec,
            schedule,
            Origin::parse(&row.source),
            row.anchor_ms,
        );
        let now = self.runner.clock.now_ms();
        if entry.spec.enabled {
            let since = last_slot.unwrap_or(entry.anchor_ms);
            if let Some(missed) = entry
                .schedule
                .next_after(since, entry.anchor_ms)
                .filter(|slot| *slot <= now)
            {
                match entry.spec.missed {
                    Missed::Skip => {
                        let job = entry.job(missed, false);
                        self.runner
                            .skip(&job, "missed while the relay was down".to_owned())
                            .await;
                    }
                    Missed::RunOnce => {
                        self.start(&mut entry, missed, false, Claim::Ask, Vec::new());
                    }
                }
            }
        }
        self.insert(entry, now);
    }

    /// Adds `entry` and schedules its next firing after `now`.
    fn insert(&mut self, mut entry: Entry, now: i64) {
        entry.next_due = None;
        if entry.spec.enabled
            && let Some(due) = entry.schedule.next_after(now, entry.anchor_ms)
        {
            entry.next_due = Some(due);
            self.due.insert((due, entry.id));
        }
        self.by_name.insert(entry.name.clone(), entry.id);
        self.tasks.insert(entry.id, entry);
    }

    /// Takes `id` out of the schedule and the maps.
    fn remove(&mut self, id: i64) -> Option<Entry> {
        let entry = self.tasks.remove(&id)?;
        if let Some(due) = entry.next_due {
            self.due.remove(&(due, id));
        }
        self.by_name.remove(&entry.name);
        Some(entry)
    }

    /// A task by name, or by id when all digits (names never are).
    fn find(&self, key: &str) -> Result<i64, TaskError> {
        if let Some(id) = self.by_name.get(key) {
            return Ok(*id);
        }
        key.parse::<i64>()
            .ok()
            .filter(|id| self.tasks.contains_key(id))
            .ok_or_else(|| TaskError::NotFound(key.to_owned()))
    }

    async fn fire_due(&mut self) {
        let now = self.runner.clock.now_ms();
        while let Some(&(due, id)) = self.due.first() {
            if due > now {
                break;
            }
            self.due.pop_first();
            let Some(mut entry) = self.tasks.remove(&id) else {
                continue;
            };
            self.fire(&mut entry, due).await;
            // After a stall, the next slot after now: slots already past are
            // not fired in a burst.
            entry.next_due = entry.schedule.next_after(due.max(now), entry.anchor_ms);
            if let Some(next) = entry.next_due {
                self.due.insert((next, id));
            }
            self.tasks.insert(id, entry);
        }
    }

    /// A scheduled firing, under the task's concurrency rule.
    async fn fire(&mut self, entry: &mut Entry, due: i64) {
        let mut after = Vec::new();
        if !entry.firings.is_empty() {
            match entry.spec.concurrency {
                Concurrency::Allow => {}
                Concurrency::Forbid => {
                    let job = entry.job(due, true);
                    self.runner
                        .skip(&job, "the previous run is still going".to_owned())
                        .await;
                    return;
                }
                Concurrency::Replace => after = stop_all(entry, "replaced by a newer run"),
            }
        }
        self.start(entry, due, true, Claim::Ask, after);
    }

    /// Starts a firing of `entry`; the id of its first run. In a cluster
    /// a slot of the schedule runs only on the node that claims it.
    fn start(
        &mut self,
        entry: &mut Entry,
        scheduled_at_ms: i64,
        scheduled: bool,
        claim: Claim,
        after: Vec<CancellationToken>,
    ) -> i64 {
        let job = entry.job(scheduled_at_ms, scheduled);
        let progress = Arc::new(Progress::default());
        let ended = CancellationToken::new();
        let firing = self.next_firing;
        self.next_firing += 1;
        let first_run = self.runner.next_run_id();
        entry.firings.insert(
            firing,
            Firing {
                stop: job.stop.clone(),
                progress: progress.clone(),
                ended: ended.clone(),
            },
        );
        let runner = self.runner.clone();
        let report = self.ended_tx.clone();
        let task_id = entry.id;
        let peers = self.peers.clone().filter(|_| claim != Claim::Unclaimed);
        self.firings.spawn(async move {
            let (task, slot) = (job.task.clone(), job.scheduled_at_ms);
            let held = match (&peers, claim) {
                (None, _) | (_, Claim::Unclaimed) => false,
                (Some(_), Claim::Held) => true,
                (Some(peers), Claim::Ask) => match peers.claim(&task, slot).await {
                    Ok(true) => true,
                    // Another node fires it and records its run.
                    Ok(false) => {
                        ended.cancel();
                        let _ = report.send((task_id, firing)).await;
                        return;
                    }
                    Err(e) => {
                        let reason = format!(
                            "not fired: the cluster could not say which node fires this slot ({e})"
                        );
                        tracing::warn!(task = %task, %reason);
                        runner.skip(&job, reason).await;
                        ended.cancel();
                        let _ = report.send((task_id, firing)).await;
                        return;
                    }
                },
            };
            run::fire(runner, job, progress, first_run, after).await;
            if let (true, Some(peers)) = (held, &peers) {
                peers.finished(&task, slot);
            }
            ended.cancel();
            let _ = report.send((task_id, firing)).await;
        });
        first_run
    }

    fn ended(&mut self, task: i64, firing: u64) {
        if let Some(entry) = self.tasks.get_mut(&task) {
            entry.firings.remove(&firing);
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Define {
                spec,
                origin,
                how,
                shared,
                reply,
            } => {
                let _ = reply.send(self.define(spec, origin, how, shared).await);
            }
            Command::Delete {
                name,
                origin,
                shared,
                reply,
            } => {
                let _ = reply.send(self.delete(&name, origin, shared).await);
            }
            Command::TakeOver {
                name,
                slot_ms,
                from,
                reply,
            } => {
                let _ = reply.send(self.take_over(&name, slot_ms, &from).await);
            }
            Command::Run {
                name,
                restart,
                reply,
            } => {
                let _ = reply.send(self.run_now(&name, restart));
            }
            Command::Stop { name, reply } => {
                let stopped = self.find(&name).map(|id| {
                    let entry = self.tasks.get_mut(&id).expect("found");
                    let stopping = entry.firings.len();
                    stop_all(entry, "stopped by an operator");
                    stopping
                });
                let _ = reply.send(stopped);
            }
            Command::Enable {
                name,
                enabled,
                reply,
            } => {
                let _ = reply.send(self.enable(&name, enabled).await);
            }
            Command::Get { name, reply } => {
                let _ = reply.send(self.find(&name).map(|id| self.tasks[&id].view()));
            }
            Command::List { reply } => {
                let mut views: Vec<TaskView> = self.tasks.values().map(Entry::view).collect();
                views.sort_by(|a, b| a.name.cmp(&b.name));
                let _ = reply.send(views);
            }
            Command::Counts { reply } => {
                let _ = reply.send(self.counts());
            }
        }
    }

    async fn define(
        &mut self,
        spec: TaskSpec,
        origin: Origin,
        how: Define,
        shared: Option<i64>,
    ) -> Result<TaskView, TaskError> {
        let schedule = spec.validate()?;
        // Another node's task is taken even when its plugin has not reached
        // this node yet (the rollout brings it; runs fail until then), so
        // the task is not lost here for good.
        if shared.is_none() {
            self.runner
                .executor
                .check(&spec.plugin)
                .map_err(|reason| SpecError {
                    field: "plugin".to_owned(),
                    reason,
                })?;
        }
        if let Some(anchor) = shared
            && let Some(entry) = self
                .by_name
                .get(spec.name.as_str())
                .map(|id| &self.tasks[id])
        {
            // This node's task file wins over the cluster's definition;
            // one already as shared (this node's own, seen again) is kept.
            if entry.origin == Origin::File || (*entry.spec == spec && entry.anchor_ms == anchor) {
                return Ok(entry.view());
            }
        }
        let existing = self.by_name.get(spec.name.as_str()).copied();
        match (existing.map(|id| &self.tasks[&id]), how) {
            (Some(entry), _) if entry.origin == Origin::File && origin == Origin::Api => {
                return Err(TaskError::FromFile(spec.name));
            }
            (Some(_), Define::Create) => return Err(TaskError::Exists(spec.name)),
            (None, Define::Replace) => return Err(TaskError::NotFound(spec.name)),
            (Some(entry), _)
                if *entry.spec == spec && entry.origin == origin && shared.is_none() =>
            {
                return Ok(entry.view());
            }
            _ => {}
        }
        let now = self.runner.clock.now_ms();
        let view = self
            .save(spec, schedule, origin, shared.unwrap_or(now))
            .await?;
        if shared.is_none() && origin == Origin::Api {
            self.share(&view.name);
        }
        Ok(view)
    }

    /// Tells the other nodes (in a cluster) of task `name` as it is now
    /// here, or that it is gone.
    fn share(&self, name: &str) {
        let Some(peers) = &self.peers else { return };
        let definition = self.by_name.get(name).map(|id| {
            let entry = &self.tasks[id];
            Shared {
                spec: (*entry.spec).clone(),
                anchor_ms: entry.anchor_ms,
            }
        });
        peers.share(name, definition);
    }

    /// Stores a checked definition and (re)schedules it from `anchor`
    /// (now, unless another node defined it); runs going on keep the
    /// definition they started with.
    async fn save(
        &mut self,
        spec: TaskSpec,
        schedule: Schedule,
        origin: Origin,
        anchor: i64,
    ) -> Result<TaskView, TaskError> {
        let json = serde_json::to_string(&spec).expect("a task serializes");
        let now = self.runner.clock.now_ms();
        let name = spec.name.clone();
        let id = self
            .store
            .call(move |conn| saved::put_task(conn, &name, &json, origin.as_str(), anchor))
            .await?;
        let firings = self.remove(id).map(|old| old.firings).unwrap_or_default();
        let mut entry = Entry::new(id, spec, schedule, origin, anchor);
        entry.firings = firings;
        self.insert(entry, now);
        let entry = &self.tasks[&id];
        self.runner.history.emit(TaskEvent::Task {
            task: entry.name.clone(),
            change: TaskChange::Defined,
        });
        Ok(entry.view())
    }

    async fn delete(&mut self, key: &str, origin: Origin, shared: bool) -> Result<(), TaskError> {
        let id = self.find(key)?;
        let entry = &self.tasks[&id];
        if entry.origin == Origin::File && origin == Origin::Api {
            // Another node's delete leaves this node's task file alone.
            if shared {
                return Ok(());
            }
            return Err(TaskError::FromFile(entry.name.to_string()));
        }
        let name = entry.name.to_string();
        // The store first: if it fails, the task stays, in memory as on disk.
        self.store
            .call(move |conn| saved::delete_task(conn, &name))
            .await?;
        let mut entry = self.remove(id).expect("found");
        stop_all(&mut entry, "task deleted");
        self.runner.history.emit(TaskEvent::Task {
            task: entry.name.clone(),
            change: TaskChange::Deleted,
        });
        if !shared && origin == Origin::Api {
            self.share(&entry.name);
        }
        Ok(())
    }

    async fn take_over(&mut self, key: &str, slot_ms: i64, from: &str) -> Result<(), TaskError> {
        let id = self.find(key)?;
        let mut entry = self.tasks.remove(&id).expect("found");
        if entry.spec.retries == 0 {
            let job = entry.job(slot_ms, false);
            self.tasks.insert(id, entry);
            let reason =
                format!("node {from} left the cluster during this run; the task has no retries");
            self.runner.lost(&job, reason).await;
            if let Some(peers) = &self.peers {
                peers.finished(key, slot_ms);
            }
        } else {
            self.start(&mut entry, slot_ms, false, Claim::Held, Vec::new());
            self.tasks.insert(id, entry);
        }
        Ok(())
    }

    fn run_now(&mut self, key: &str, restart: bool) -> Result<i64, TaskError> {
        let id = self.find(key)?;
        let mut entry = self.tasks.remove(&id).expect("found");
        let after = if restart {
            stop_all(&mut entry, "restarted by an operator")
        } else if entry.firings.is_empty() {
            Vec::new()
        } else {
            match entry.spec.concurrency {
                Concurrency::Allow => Vec::new(),
                Concurrency::Replace => stop_all(&mut entry, "replaced by a newer run"),
                Concurrency::Forbid => {
                    let busy = TaskError::Busy(entry.name.to_string());
                    self.tasks.insert(id, entry);
                    return Err(busy);
                }
            }
        };
        let now = self.runner.clock.now_ms();
        let run = self.start(&mut entry, now, false, Claim::Unclaimed, after);
        self.tasks.insert(id, entry);
        Ok(run)
    }

    async fn enable(&mut self, key: &str, enabled: Option<bool>) -> Result<TaskView, TaskError> {
        let id = self.find(key)?;
        let entry = &self.tasks[&id];
        if entry.origin == Origin::File {
            return Err(TaskError::FromFile(entry.name.to_string()));
        }
        let enabled = enabled.unwrap_or(!entry.spec.enabled);
        if enabled == entry.spec.enabled {
            return Ok(entry.view());
        }
        let mut spec = (*entry.spec).clone();
        spec.enabled = enabled;
        let schedule = entry.schedule.clone();
        let now = self.runner.clock.now_ms();
        let view = self.save(spec, schedule, Origin::Api, now).await?;
        self.share(&view.name);
        self.runner.history.emit(TaskEvent::Task {
            task: view.name.as_str().into(),
            change: if enabled {
                TaskChange::Enabled
            } else {
                TaskChange::Disabled
            },
        });
        Ok(view)
    }

    fn counts(&self) -> TaskCounts {
        let mut counts = TaskCounts {
            total: self.tasks.len(),
            ..TaskCounts::default()
        };
        for entry in self.tasks.values() {
            match entry.state() {
                TaskState::Idle => counts.idle += 1,
                TaskState::Running => counts.running += 1,
                TaskState::Disabled => counts.disabled += 1,
            }
            for firing in entry.firings.values() {
                match *firing
                    .progress
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                {
                    Some(RunState::Queued) => counts.runs_queued += 1,
                    Some(RunState::Running) => counts.runs_running += 1,
                    _ => {}
                }
            }
        }
        counts
    }
}

/// Stops every firing of `entry`; what a successor waits for.
fn stop_all(entry: &mut Entry, reason: &str) -> Vec<CancellationToken> {
    entry
        .firings
        .values()
        .map(|firing| {
            firing.stop.stop(reason);
            firing.ended.clone()
        })
        .collect()
}

async fn sleep_until(wake: Option<tokio::time::Instant>) {
    match wake {
        Some(wake) => tokio::time::sleep_until(wake).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tokio::time::sleep;

    use super::*;
    use crate::plugin::bindings::types::RunContext;
    use crate::plugin::loaded::RunControl;
    use crate::tasks::run::Execution;

    /// 2026-03-01T00:00:00Z.
    const T0: i64 = 1_772_323_200_000;

    /// A scripted task plugin on tokio's clock; its name says what it does:
    /// `sleep:MS`, `fail:N` (fails its first N attempts), `forever`
    /// (until stopped), `log:N` (logs N lines).
    #[derive(Default)]
    struct Script {
        running: AtomicUsize,
        most_at_once: AtomicUsize,
        started: AtomicUsize,
    }

    struct Scripted(Arc<Script>);

    impl Executor for Scripted {
        fn check(&self, _plugin: &str) -> Result<(), String> {
            Ok(())
        }

        fn execute(&self, plugin: &str, context: RunContext, control: RunControl) -> Execution {
            let script = self.0.clone();
            let (verb, n) = plugin.split_once(':').unwrap_or((plugin, "0"));
            let (verb, n) = (verb.to_owned(), n.parse::<u64>().unwrap());
            Box::pin(async move {
                script.started.fetch_add(1, Ordering::SeqCst);
                let now = script.running.fetch_add(1, Ordering::SeqCst) + 1;
                script.most_at_once.fetch_max(now, Ordering::SeqCst);
                let result = match verb.as_str() {
                    "sleep" => {
                        sleep(Duration::from_millis(n)).await;
                        Ok(format!("slept {n} ms"))
                    }
                    "fail" if u64::from(context.attempt) <= n => {
                        Err(format!("attempt {} fails", context.attempt))
                    }
                    "log" => {
                        for line in 1..=n {
                            (control.log)("info", &format!("line {line}"));
                        }
                        Ok("logged".to_owned())
                    }
                    "forever" => loop {
                        if control.stop.load(Ordering::Relaxed) {
                            break Err("stopped".to_owned());
                        }
                        sleep(Duration::from_millis(1)).await;
                    },
                    _ => Ok("done".to_owned()),
                };
                script.running.fetch_sub(1, Ordering::SeqCst);
                result
            })
        }
    }

    struct Harness {
        tasks: Tasks,
        script: Arc<Script>,
        stop: CancellationToken,
        manager: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    async fn harness(max_concurrent_runs: usize) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("wasmrelay.db")).unwrap();
        harness_on(store, dir, max_concurrent_runs).await
    }

    async fn harness_on(
        store: Store,
        dir: tempfile::TempDir,
        max_concurrent_runs: usize,
    ) -> Harness {
        harness_peered(store, dir, max_concurrent_runs, None).await
    }

    async fn harness_peered(
        store: Store,
        dir: tempfile::TempDir,
        max_concurrent_runs: usize,
        peers: Option<Arc<dyn Peers>>,
    ) -> Harness {
        let script = Arc::new(Script::default());
        let stop = CancellationToken::new();
        let config = TasksConfig {
            max_concurrent_runs,
            ..TasksConfig::default()
        };
        let (tasks, manager) = Tasks::start(
            store,
            Arc::new(Scripted(script.clone())),
            &config,
            Clock::starting_at(T0),
            peers,
            stop.clone(),
        )
        .await
        .unwrap();
        Harness {
            tasks,
            script,
            stop,
            manager,
            _dir: dir,
        }
    }

    impl Harness {
        async fn define(&self, json: &str) -> TaskView {
            let spec = TaskSpec::from_json(json).unwrap();
            self.tasks
                .define(spec, Origin::Api, Define::Create)
                .await
                .unwrap()
        }

        /// The task's runs, oldest first.
        async fn runs(&self, task: &str) -> Vec<RunView> {
            let mut runs = self.tasks.runs(Some(task), 1_000).await.unwrap();
            runs.reverse();
            runs
        }

        async fn shut(self) {
            self.stop.cancel();
            self.manager.await.unwrap();
        }
    }

    fn states(runs: &[RunView]) -> Vec<&str> {
        runs.iter().map(|run| run.state.as_str()).collect()
    }

    /// Other nodes as a test sees them: slot `k` (seconds after T0) is this
    /// node's when `k` is odd, another's when even, and unknown at 4; what
    /// this node shares is recorded.
    #[derive(Default)]
    struct Others {
        shared: std::sync::Mutex<Vec<(String, Option<Shared>)>>,
        finished: std::sync::Mutex<Vec<i64>>,
    }

    impl Peers for Others {
        fn claim(
            &self,
            _task: &str,
            slot_ms: i64,
        ) -> futures_util::future::BoxFuture<'static, Result<bool, String>> {
            let k = (slot_ms - T0) / 1000;
            Box::pin(async move {
                match k {
                    4 => Err("no broker".to_owned()),
                    k => Ok(k % 2 == 1),
                }
            })
        }

        fn share(&self, task: &str, definition: Option<Shared>) {
            self.shared
                .lock()
                .unwrap()
                .push((task.to_owned(), definition));
        }

        fn finished(&self, _task: &str, slot_ms: i64) {
            self.finished.lock().unwrap().push((slot_ms - T0) / 1000);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn in_a_cluster_a_node_fires_only_the_slots_it_claims_and_shares_its_definitions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("wasmrelay.db")).unwrap();
        let others = Arc::new(Others::default());
        let h = harness_peered(store, dir, 16, Some(others.clone())).await;
        let view = h
            .define(r#"{"name":"tick","plugin":"sleep:10","schedule":{"every_ms":1000}}"#)
            .await;
        sleep(Duration::from_millis(5_500)).await;
        let runs = h.runs("tick").await;
        let fired: Vec<(i64, &str)> = runs
            .iter()
            .map(|r| ((r.scheduled_at_ms - T0) / 1000, r.state.as_str()))
            .collect();
        // 2 was another node's; 4 could not be claimed: recorded, not run.
        assert_eq!(
            fired,
            [
                (1, "success"),
                (3, "success"),
                (4, "skipped"),
                (5, "success")
            ]
        );
        assert!(runs[2].outcome.as_deref().unwrap().contains("no broker"));
        // Only the slots it ran are cleared as under way.
        assert_eq!(*others.finished.lock().unwrap(), [1, 3, 5]);
        // A slot taken over from a node gone runs again here (with retries),
        // or is recorded failed (without).
        h.tasks.take_over("tick", T0 + 2_000, "b").await.unwrap();
        sleep(Duration::from_millis(100)).await;
        let again = h.runs("tick").await;
        let taken = again
            .iter()
            .find(|r| r.scheduled_at_ms == T0 + 2_000)
            .unwrap();
        assert_eq!(taken.state, "failed");
        assert!(
            taken.outcome.as_deref().unwrap().contains("node b left"),
            "{taken:?}"
        );
        // Run by hand: no claim asked.
        h.tasks.run_now("tick").await.unwrap();
        // Shared: the definition with its anchor, then its deletion.
        h.tasks.delete("tick", Origin::Api).await.unwrap();
        {
            let shared = others.shared.lock().unwrap();
            assert_eq!(shared.len(), 2, "{shared:?}");
            let first = shared[0].1.as_ref().unwrap();
            assert_eq!(first.anchor_ms, T0);
            assert_eq!(first.spec, view.definition);
            assert_eq!(shared[1], ("tick".to_owned(), None));
        }
        // Another node's definition is taken with its anchor, not shared back.
        let mut spec = view.definition.clone();
        spec.name = "theirs".into();
        h.tasks
            .define_shared(Shared {
                spec,
                anchor_ms: T0 + 250,
            })
            .await
            .unwrap();
        let theirs = h.tasks.get("theirs").await.unwrap();
        assert_eq!((theirs.next_run_at_ms.unwrap() - T0) % 1000, 250);
        assert_eq!(others.shared.lock().unwrap().len(), 2);
        h.shut().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_interval_fires_on_its_slots_and_a_cron_on_its_seconds() {
        let h = harness(16).await;
        h.define(r#"{"name":"tick","plugin":"sleep:10","schedule":{"every_ms":1000}}"#)
            .await;
        h.define(r#"{"name":"even","plugin":"sleep:10","schedule":{"cron":"*/2 * * * * *"}}"#)
            .await;
        sleep(Duration::from_millis(5_500)).await;
        let tick = h.runs("tick").await;
        let slots: Vec<i64> = tick.iter().map(|r| r.scheduled_at_ms - T0).collect();
        assert_eq!(slots, [1_000, 2_000, 3_000, 4_000, 5_000]);
        assert!(tick.iter().all(|r| r.state == "success"));
        assert!(
            tick.iter()
                .all(|r| r.started_at_ms == Some(r.scheduled_at_ms)),
            "each starts on its slot: {tick:?}"
        );
        let even: Vec<i64> = h
            .runs("even")
            .await
            .iter()
            .map(|r| r.scheduled_at_ms - T0)
            .collect();
        assert_eq!(even, [2_000, 4_000]);
        assert_eq!(
            h.tasks.get("tick").await.unwrap().next_run_at_ms,
            Some(T0 + 6_000)
        );
        h.shut().await;
    }

    #[tokio::test(start_paused = true)]
    async fn cron_in_a_zone_with_daylight_saving_fires_once_a_day_across_the_change() {
        let h = harness(16).await;
        // Berlin springs forward on 2026-03-29 at 02:00; 02:30 does not exist.
        h.define(r#"{"name":"nightly","plugin":"sleep:1","schedule":{"cron":"0 30 2 * * *","tz":"Europe/Berlin"}}"#)
            .await;
        sleep(Duration::from_secs(31 * 24 * 3600)).await;
        let fired: Vec<String> = h
            .runs("nightly")
            .await
            .iter()
            .map(|r| {
                chrono::DateTime::from_timestamp_millis(r.scheduled_at_ms)
                    .unwrap()
                    .to_rfc3339()
            })
            .collect();
        assert_eq!(fired.len(), 31, "once a day: {fired:?}");
        assert_eq!(fired[0], "2026-03-01T01:30:00+00:00", "02:30 CET");
        assert_eq!(fired[27], "2026-03-28T01:30:00+00:00", "02:30 CET");
        assert_eq!(
            fired[28], "2026-03-29T01:00:00+00:00",
            "the skipped 02:30 fires at 03:00 CEST"
        );
        assert_eq!(fired[29], "2026-03-30T00:30:00+00:00", "02:30 CEST");
        h.shut().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_past_its_timeout_is_stopped_and_marked_timed_out() {
        let h = harness(16).await;
        h.define(r#"{"name":"spin","plugin":"forever","timeout_ms":2000}"#)
            .await;
        h.tasks.run_now("spin").await.unwrap();
        sleep(Duration::from_millis(2_500)).await;
        let runs = h.runs("spin").await;
        assert_eq!(states(&runs), ["timed_out"]);
        // Stopped at the deadline, ended at the plugin's next check.
        let took = runs[0].duration_ms.unwrap();
        assert!((2_000..2_010).contains(&took), "{took} ms");
        assert_eq!(
            runs[0].outcome.as_deref(),
            Some("stopped at its 2000 ms timeout")
        );
        assert_eq!(
            h.script.running.load(Ordering::SeqCst),
            0,
            "the plugin stopped"
        );
        assert_eq!(h.tasks.get("spin").await.unwrap().state, TaskState::Idle);
        h.shut().await;
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_after_a_doubling_delay() {
        let h = harness(16).await;
        h.define(r#"{"name":"flaky","plugin":"fail:2","retries":3,"retry_delay_ms":1000}"#)
            .await;
        h.tasks.run_now("flaky").await.unwrap();
        sleep(Duration::from_millis(10_000)).await;
        let runs = h.runs("flaky").await;
        assert_eq!(states(&runs), ["failed", "failed", "success"]);
        let attempts: Vec<u32> = runs.iter().map(|r| r.attempt).collect();
        assert_eq!(attempts, [1, 2, 3]);
        let started: Vec<i64> = runs.iter().map(|r| r.started_at_ms.unwrap() - T0).collect();
        assert_eq!(started, [0, 1_000, 3_000], "1 s, then 2 s");
        assert!(
            runs.iter().all(|r| r.scheduled_at_ms == T0),
            "retries keep the slot"
        );
        h.shut().await;
    }

    #[tokio::test(start_paused = true)]
    async fn forbid_never_runs_two_at_once_also_when_run_by_hand() {
        let h = harness(16).await;
        h.define(r#"{"name":"slow","plugin":"sleep:2500","schedule":{"every_ms":1000},"concurrency":"forbid"}"#)
            .await;
        sleep(Duration::from_millis(1_500)).await;
        assert!(matches!(
            h.tasks.run_now("slow").await,
            Err(TaskError::Busy(_))
        ));
        sleep(Duration::from_millis(4_000)).await;
        let runs = h.runs("slow").await;
        assert_eq!(
            states(&runs),
            ["success", "skipped", "skipped", "running", "skipped"]
        );
        assert_eq!(
            runs[1].outcome.as_deref(),
            Some("the previous run is still going")
        );
        assert_eq!(h.script.most_at_once.load(Ordering::SeqCst), 1);
        h.shut().await;
    }

    #[tokio::test(start_paused = true)]
    async fn replace_cancels_the_running_one_before_the_next_starts() {
        let h = harness(16).await;
        h.define(r#"{"name":"latest","plugin":"forever","schedule":{"every_ms":1000},"concurrency":"replace"}"#)
            .await;
        sleep(Duration::from_millis(2_500)).await;
        let runs = h.runs("latest").await;
        assert_eq!(states(&runs), ["cancelled", "running"]);
        assert_eq!(runs[0].outcome.as_deref(), Some("replaced by a newer run"));
        assert_eq!(h.script.most_at_once.load(Ordering::SeqCst), 1);
        h.shut().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_stopped_before_it_began_never_starts_its_plugin() {
        let h = harness(16).await;
        h.define(r#"{"name":"spin","plugin":"forever"}"#).await;
        h.tasks.run_now("spin").await.unwrap();
        sleep(Duration::from_millis(100)).await;
        // The restart's firing waits for the first to end; a stop reaches both.
        h.tasks.restart("spin").await.unwrap();
        h.tasks.stop("spin").await.unwrap();
        sleep(Duration::from_millis(100)).await;
        let runs = h.runs("spin").await;
        assert_eq!(states(&runs), ["cancelled", "cancelled"], "{runs:?}");
        assert_eq!(
            h.script.started.load(Ordering::SeqCst),
            1,
            "only the first ran"
        );
        assert_eq!(h.tasks.get("spin").await.unwrap().state, TaskState::Idle);
        h.shut().await;
    }

    #[tokio::test(start_paused = true)]
    async fn runs_beyond_the_relay_wide_cap_wait_queued() {
        let h = harness(2).await;
        for name in ["a", "b", "c"] {
            h.define(&format!(r#"{{"name":"{name}","plugin":"sleep:1000"}}"#))
                .await;
            h.tasks.run_now(name).await.unwrap();
        }
        sleep(Duration::from_millis(1)).await;
        let counts = h.tasks.counts().await.unwrap();
        assert_eq!((counts.runs_running, counts.runs_queued), (2, 1));
        let c = h.tasks.get("c").await.unwrap();
        assert_eq!(c.active[0].state, "queued");
        sleep(Duration::from_millis(2_500)).await;
        let c = h.runs("c").await;
        assert_eq!(states(&c), ["success"]);
        assert_eq!(
            c[0].started_at_ms,
            Some(T0 + 1_000),
            "started when a place freed"
        );
        assert_eq!(h.script.most_at_once.load(Ordering::SeqCst), 2);
        h.shut().await;
    }

    #[tokio::test(start_paused = true)]
    async fn stop_cancels_and_the_live_feed_tells_everything_in_order() {
        let h = harness(16).await;
        h.define(r#"{"name":"chatty","plugin":"log:3"}"#).await;
        h.define(r#"{"name":"spin","plugin":"forever"}"#).await;
        let mut feed = h.tasks.follow();
        let run = h.tasks.run_now("chatty").await.unwrap();
        sleep(Duration::from_millis(100)).await;
        let mut seen = Vec::new();
        while let Ok(event) = feed.try_recv() {
            seen.push(match event {
                TaskEvent::Run { run: r, state, .. } => format!("{r} {}", state.as_str()),
                TaskEvent::Log {
                    run: r, message, ..
                } => format!("{r} {message}"),
                TaskEvent::Task { .. } => continue,
            });
        }
        assert_eq!(
            seen,
            [
                format!("{run} running"),
                format!("{run} line 1"),
                format!("{run} line 2"),
                format!("{run} line 3"),
                format!("{run} success"),
            ]
        );
        let lines = h
            .tasks
            .logs(
                Some("chatty"),
                saved::LogQuery {
                    limit: 10,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2].message, "line 3");

        h.tasks.run_now("spin").await.unwrap();
        sleep(Duration::from_millis(100)).await;
        assert_eq!(h.tasks.stop("spin").await.unwrap(), 1);
        sleep(Duration::from_millis(100)).await;
        let runs = h.runs("spin").await;
        assert_eq!(states(&runs), ["cancelled"]);
        assert_eq!(runs[0].outcome.as_deref(), Some("stopped by an operator"));
        h.shut().await;
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_crash_the_open_run_is_interrupted_and_the_next_slot_fires_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("wasmrelay.db")).unwrap();
        // What a relay killed at T0 + 1.5 s leaves: a task every second
        // (anchored at T0) whose run for slot T0 + 1 s was still going.
        let spec = r#"{"name":"tick","plugin":"sleep:10","schedule":{"every_ms":1000}}"#;
        store
            .call(move |conn| {
                let task = saved::put_task(conn, "tick", spec, "api", T0 - 10_000)?;
                saved::insert_run(conn, 7, task, 1, "running", T0 - 9_000, T0 - 9_000, None)
            })
            .await
            .unwrap();
        let h = harness_on(store, dir, 16).await;
        sleep(Duration::from_millis(1_100)).await;
        let runs = h.runs("tick").await;
        assert_eq!(states(&runs), ["failed", "skipped", "success"]);
        assert_eq!(runs[0].outcome.as_deref(), Some("interrupted"));
        assert_eq!(
            runs[1].outcome.as_deref(),
            Some("missed while the relay was down")
        );
        assert_eq!(
            runs[2].scheduled_at_ms,
            T0 + 1_000,
            "then on its own slots, once"
        );
        assert!(runs[2].id > 7, "run ids go on from the stored ones");
        h.shut().await;
    }

    #[tokio::test(start_paused = true)]
    async fn run_once_catches_up_a_missed_slot_and_shutdown_cancels_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("wasmrelay.db")).unwrap();
        let spec = r#"{"name":"daily","plugin":"forever","schedule":{"every_ms":3600000},"missed":"run-once"}"#;
        store
            .call(move |conn| saved::put_task(conn, "daily", spec, "api", T0 - 3 * 3_600_000))
            .await
            .unwrap();
        let h = harness_on(store.clone(), tempfile::tempdir().unwrap(), 16).await;
        sleep(Duration::from_millis(100)).await;
        let view = h.tasks.get("daily").await.unwrap();
        assert_eq!(view.state, TaskState::Running, "caught up at start");
        h.shut().await;
        let runs = store
            .call(|conn| saved::runs(conn, None, 10))
            .await
            .unwrap();
        assert_eq!(runs.len(), 1, "once for three missed slots");
        assert_eq!(
            runs[0].scheduled_at_ms,
            T0 - 2 * 3_600_000,
            "the first missed slot"
        );
        assert_eq!(
            (runs[0].state.as_str(), runs[0].outcome.as_deref()),
            ("cancelled", Some("the relay is shutting down"))
        );
        drop(dir);
    }
}
