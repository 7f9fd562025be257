//! One firing of a task, from its first attempt to its last: each attempt
//! waits for a place under the relay-wide cap (`queued`), runs the plugin
//! with the task's timeout (`timed_out`), can be stopped (`cancelled`), and
//! a failed or timed-out attempt is retried after the task's delay, doubled
//! each time. Every state change is recorded ([`History`]) and told to the
//! live feed.
//!
//! The plugin is called through an [`Executor`]; [`PluginExecutor`] runs
//! the registry's active version of the task plugin on a blocking thread,
//! so a run never holds a tokio worker.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::clock::Clock;
use super::history::{History, NewRun};
use super::lag::FiringLag;
use super::spec::TaskSpec;
use super::{RunState, TaskEvent};
use crate::plugin::CallError;
use crate::plugin::bindings::types::{Outcome, RunContext};
use crate::plugin::loaded::{RunControl, RunLog};
use crate::plugin::registry::Registry;

/// A plugin call in flight: the run's summary, or why it failed.
pub type Execution = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Calls a task's plugin once.
pub trait Executor: Send + Sync + 'static {
    /// Starts one attempt of `plugin`. It must end soon after
    /// `control.stop` is set.
    fn execute(&self, plugin: &str, context: RunContext, control: RunControl) -> Execution;

    /// Whether `plugin` can run now; why not, for a definition's refusal.
    fn check(&self, plugin: &str) -> Result<(), String>;
}

/// Runs task plugins from the registry.
pub struct PluginExecutor {
    pub registry: Arc<Registry>,
}

impl Executor for PluginExecutor {
    fn check(&self, plugin: &str) -> Result<(), String> {
        if self.registry.task(plugin).is_some() {
            return Ok(());
        }
        let loaded: Vec<String> = self.registry.task_names();
        Err(format!(
            "no task plugin named {plugin:?} is loaded (task plugins: {})",
            if loaded.is_empty() {
                "none".to_owned()
            } else {
                loaded.join(", ")
            }
        ))
    }

    fn execute(&self, plugin: &str, context: RunContext, control: RunControl) -> Execution {
        let Some(loaded) = self.registry.task(plugin) else {
            let reason = format!("no task plugin named {plugin:?} is loaded");
            return Box::pin(async move { Err(reason) });
        };
        Box::pin(async move {
            let span = tracing::info_span!("task run", task = %context.task, run = context.run_id, plugin = %loaded.name());
            let called = tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                loaded.run_task(&context, &control)
            })
            .await;
            match called {
                Ok(Ok(Outcome::Success(summary))) => Ok(summary),
                Ok(Ok(Outcome::Failure(reason))) => Err(reason),
                Ok(Err(CallError::Stopped)) => Err("stopped".to_owned()),
                Ok(Err(e)) => Err(format!("the plugin {e}")),
                Err(e) => Err(format!("the run's thread failed: {e}")),
            }
        })
    }
}

/// What every run shares.
pub struct Runner {
    pub executor: Arc<dyn Executor>,
    pub history: History,
    /// The relay-wide cap on runs going on at once.
    pub permits: Arc<Semaphore>,
    pub clock: Clock,
    pub max_log_lines: u32,
    next_run_id: AtomicI64,
    pub stats: RunStats,
}

/// Counters for `/admin/stats` and the benchmarks.
#[derive(Default)]
pub struct RunStats {
    /// Attempts that reached their plugin.
    pub started: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub timed_out: AtomicU64,
    pub cancelled: AtomicU64,
    pub skipped: AtomicU64,
    /// From a scheduled firing's due time to its plugin starting.
    pub firing_lag: FiringLag,
}

impl Runner {
    pub fn new(
        executor: Arc<dyn Executor>,
        history: History,
        max_concurrent_runs: usize,
        clock: Clock,
        max_log_lines: u32,
        last_run_id: i64,
    ) -> Self {
        Self {
            executor,
            history,
            permits: Arc::new(Semaphore::new(max_concurrent_runs)),
            clock,
            max_log_lines,
            next_run_id: AtomicI64::new(last_run_id + 1),
            stats: RunStats::default(),
        }
    }

    pub fn next_run_id(&self) -> i64 {
        self.next_run_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Records a firing that did not run (`skipped`), with why.
    pub async fn skip(&self, job: &Job, reason: String) {
        self.stats.skipped.fetch_add(1, Ordering::Relaxed);
        self.record(job, RunState::Skipped, reason).await;
    }

    /// Records a firing that ended without running here (`failed`): its
    /// run was lost with another node.
    pub async fn lost(&self, job: &Job, reason: String) {
        self.record(job, RunState::Failed, reason).await;
    }

    async fn record(&self, job: &Job, state: RunState, reason: String) {
        let id = self.next_run_id();
        let now = self.clock.now_ms();
        self.history
            .insert_later(NewRun {
                id,
                task_id: job.task_id,
                attempt: 1,
                state,
                scheduled_at_ms: job.scheduled_at_ms,
                at_ms: now,
                outcome: Some(reason.clone()),
            })
            .await;
        self.emit(job, id, 1, state, now, Some(reason));
    }

    fn emit(
        &self,
        job: &Job,
        run: i64,
        attempt: u32,
        state: RunState,
        at_ms: i64,
        outcome: Option<String>,
    ) {
        self.history.emit(TaskEvent::Run {
            task: job.task.clone(),
            run,
            attempt,
            state,
            scheduled_at_ms: job.scheduled_at_ms,
            at_ms,
            outcome,
        });
    }
}

/// One firing: what to run and how.
#[derive(Clone)]
pub struct Job {
    pub task_id: i64,
    pub task: Arc<str>,
    pub spec: Arc<TaskSpec>,
    /// The task's config as the plugin gets it (JSON).
    pub config: Arc<str>,
    pub scheduled_at_ms: i64,
    /// Whether the firing lag counts (scheduled firings, not manual ones).
    pub scheduled: bool,
    pub stop: Stop,
}

/// Stops a firing, with the reason its run records.
#[derive(Clone, Default)]
pub struct Stop {
    token: CancellationToken,
    reason: Arc<OnceLock<String>>,
}

impl Stop {
    pub fn stop(&self, reason: &str) {
        let _ = self.reason.set(reason.to_owned());
        self.token.cancel();
    }

    fn reason(&self) -> String {
        self.reason
            .get()
            .cloned()
            .unwrap_or_else(|| "stopped".to_owned())
    }
}

/// Where a firing stands now, for the task's view.
#[derive(Default)]
pub struct Progress {
    pub run: AtomicI64,
    pub attempt: AtomicU32,
    /// The current attempt's state; `None` between attempts (waiting to retry).
    pub state: Mutex<Option<RunState>>,
}

impl Progress {
    fn set(&self, run: i64, attempt: u32, state: Option<RunState>) {
        self.run.store(run, Ordering::Relaxed);
        self.attempt.store(attempt, Ordering::Relaxed);
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }
}

/// Runs `job`'s attempts until one succeeds, is stopped, or none are left.
/// The first attempt is run `first_run`, and starts once every firing in
/// `after` has ended (the ones a `replace` or a restart stopped).
pub async fn fire(
    runner: Arc<Runner>,
    job: Job,
    progress: Arc<Progress>,
    first_run: i64,
    after: Vec<CancellationToken>,
) {
    for ended in after {
        tokio::select! {
            _ = ended.cancelled() => {}
            // Stopped while waiting: the first attempt records that.
            _ = job.stop.token.cancelled() => break,
        }
    }
    let mut attempt = 1;
    let mut id = first_run;
    loop {
        let ended = attempt_once(&runner, &job, id, attempt, &progress).await;
        let again =
            matches!(ended, RunState::Failed | RunState::TimedOut) && attempt <= job.spec.retries;
        if !again {
            return;
        }
        attempt += 1;
        progress.set(id, attempt, None);
        id = runner.next_run_id();
        tokio::select! {
            _ = tokio::time::sleep(job.spec.retry_delay(attempt)) => {}
            _ = job.stop.token.cancelled() => return,
        }
    }
}

async fn attempt_once(
    runner: &Runner,
    job: &Job,
    id: i64,
    attempt: u32,
    progress: &Progress,
) -> RunState {
    if job.stop.token.is_cancelled() {
        // Stopped before it began (a restart or replace stopped again, a
        // delete, shutdown): recorded, never started.
        let now = runner.clock.now_ms();
        let reason = job.stop.reason();
        runner.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        runner
            .history
            .insert_later(NewRun {
                id,
                task_id: job.task_id,
                attempt,
                state: RunState::Cancelled,
                scheduled_at_ms: job.scheduled_at_ms,
                at_ms: now,
                outcome: Some(reason.clone()),
            })
            .await;
        runner.emit(job, id, attempt, RunState::Cancelled, now, Some(reason));
        return RunState::Cancelled;
    }
    let permit = runner.permits.clone().try_acquire_owned().ok();
    let first = if permit.is_some() {
        RunState::Running
    } else {
        RunState::Queued
    };
    let now = runner.clock.now_ms();
    // Committed before the plugin starts: a crash from here on leaves a row
    // that the next start marks interrupted.
    runner
        .history
        .insert(NewRun {
            id,
            task_id: job.task_id,
            attempt,
            state: first,
            scheduled_at_ms: job.scheduled_at_ms,
            at_ms: now,
            outcome: None,
        })
        .await;
    runner.emit(job, id, attempt, first, now, None);
    progress.set(id, attempt, Some(first));
    let finish = |state: RunState, outcome: String| async move {
        let now = runner.clock.now_ms();
        let counter = match state {
            RunState::Success => &runner.stats.succeeded,
            RunState::TimedOut => &runner.stats.timed_out,
            RunState::Cancelled => &runner.stats.cancelled,
            _ => &runner.stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        runner
            .history
            .update(id, state, Some(outcome.clone()), now)
            .await;
        runner.emit(job, id, attempt, state, now, Some(outcome));
        state
    };
    let _permit = match permit {
        Some(permit) => permit,
        None => {
            let acquired = tokio::select! {
                permit = runner.permits.clone().acquire_owned() => permit.ok(),
                _ = job.stop.token.cancelled() => None,
            };
            let Some(permit) = acquired else {
                return finish(RunState::Cancelled, job.stop.reason()).await;
            };
            let now = runner.clock.now_ms();
            runner
                .history
                .update(id, RunState::Running, None, now)
                .await;
            runner.emit(job, id, attempt, RunState::Running, now, None);
            progress.set(id, attempt, Some(RunState::Running));
            permit
        }
    };
    if job.scheduled && attempt == 1 {
        let due = runner.clock.instant_at(job.scheduled_at_ms);
        let lag = tokio::time::Instant::now().saturating_duration_since(due);
        runner.stats.firing_lag.record(lag);
    }
    runner.stats.started.fetch_add(1, Ordering::Relaxed);

    let lines = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let control = RunControl {
        stop: stop.clone(),
        log: log_sink(runner, job, id, lines.clone()),
    };
    let context = RunContext {
        task: job.task.to_string(),
        run_id: id as u64,
        attempt,
        scheduled_at_ms: job.scheduled_at_ms.max(0) as u64,
        config: job.config.to_string(),
    };
    let mut execution = runner.executor.execute(&job.spec.plugin, context, control);
    let timeout = Duration::from_millis(job.spec.timeout_ms);
    // The flag is set before the plugin is first polled when a stop came
    // while this attempt waited for its row or its place.
    if job.stop.token.is_cancelled() {
        stop.store(true, Ordering::Relaxed);
    }
    let (state, outcome) = tokio::select! {
        // A stop or the deadline wins over a result that is ready at the same time.
        biased;
        _ = job.stop.token.cancelled() => {
            stop.store(true, Ordering::Relaxed);
            let _ = execution.await;
            (RunState::Cancelled, job.stop.reason())
        }
        _ = tokio::time::sleep(timeout) => {
            stop.store(true, Ordering::Relaxed);
            let _ = execution.await;
            (RunState::TimedOut, format!("stopped at its {} ms timeout", job.spec.timeout_ms))
        }
        result = &mut execution => match result {
            Ok(summary) => (RunState::Success, summary),
            Err(reason) => (RunState::Failed, reason),
        },
    };
    let written = lines.load(Ordering::Relaxed);
    if written > runner.max_log_lines {
        let message = format!(
            "{} more log lines not kept (tasks.max_log_lines_per_run = {})",
            written - runner.max_log_lines,
            runner.max_log_lines
        );
        runner
            .history
            .log(id, runner.clock.now_ms(), "warn", message);
    }
    finish(state, outcome).await
}

/// Where one attempt's log lines go: the history and the live feed, the
/// first `max_log_lines` of them.
fn log_sink(runner: &Runner, job: &Job, run: i64, lines: Arc<AtomicU32>) -> RunLog {
    let history = runner.history.clone();
    let clock = runner.clock;
    let max = runner.max_log_lines;
    let task = job.task.clone();
    Arc::new(move |level, message| {
        if lines.fetch_add(1, Ordering::Relaxed) >= max {
            return;
        }
        let at_ms = clock.now_ms();
        history.log(run, at_ms, level, message.to_owned());
        history.emit(TaskEvent::Log {
            task: task.clone(),
            run,
            level,
            message: message.to_owned(),
            at_ms,
        });
    })
}
