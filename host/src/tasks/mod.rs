//! Tasks: `task`-world plugins run on a schedule, with timeouts, retries, a
//! concurrency rule, a relay-wide cap and a history — a small process
//! manager inside the relay.
//!
//! - [`spec`]: a task as an operator writes it, checked field by field;
//!   [`schedule`]: when it fires.
//! - [`manager`]: the one task that owns every task's state: it fires what
//!   is due, applies the concurrency rule, starts runs, and answers
//!   [`Tasks`], the handle the API, the task folder and the CLI use.
//! - [`run`]: one run's attempts — queueing under the cap, the timeout,
//!   stops, retries — and the [`run::Executor`] that calls the plugin.
//! - [`history`]: runs and log lines written to the store in batches, and
//!   the live [`TaskEvent`] feed; [`lag`]: how late firings start.
//! - [`files`]: the watched folder of task definitions; [`clock`]: wall
//!   time read off tokio's clock.
//! - [`shared`]: in a cluster, the tasks every node knows and the claim
//!   that makes each slot fire on one node.

pub mod clock;
pub mod files;
pub mod history;
pub mod lag;
pub mod manager;
pub mod run;
pub mod schedule;
pub mod shared;
pub mod spec;

use std::sync::Arc;

use serde::Serialize;

pub use manager::{TaskError, TaskView, Tasks};

/// Where a run stands. Stored as text (`as_str`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Queued,
    Running,
    Success,
    Failed,
    TimedOut,
    Cancelled,
    Skipped,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Success => "success",
            RunState::Failed => "failed",
            RunState::TimedOut => "timed_out",
            RunState::Cancelled => "cancelled",
            RunState::Skipped => "skipped",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, RunState::Queued | RunState::Running)
    }
}

/// Where a task stands: `disabled` when its schedule is off, else `running`
/// while any run of it is queued, running or waiting to retry, else `idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Idle,
    Running,
    Disabled,
}

/// Log levels a task plugin writes with, most verbose first.
pub const LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

/// `level` and the levels above it, for "this level or worse" filters.
pub fn levels_from(level: &str) -> Option<Vec<&'static str>> {
    let at = LEVELS.iter().position(|l| *l == level)?;
    Some(LEVELS[at..].to_vec())
}

/// What followers of the live feed receive, in the order it happened
/// (PROTOCOL.md, "Task events").
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskEvent {
    /// A run changed state.
    Run {
        task: Arc<str>,
        run: i64,
        attempt: u32,
        state: RunState,
        scheduled_at_ms: i64,
        at_ms: i64,
        #[serde(skip_serializing_if = "Option::is_none")]
        outcome: Option<String>,
    },
    /// A run logged a line.
    Log {
        task: Arc<str>,
        run: i64,
        level: &'static str,
        message: String,
        at_ms: i64,
    },
    /// A task was defined, changed, enabled, disabled or deleted.
    Task { task: Arc<str>, change: TaskChange },
}

impl TaskEvent {
    pub fn task(&self) -> &str {
        match self {
            TaskEvent::Run { task, .. }
            | TaskEvent::Log { task, .. }
            | TaskEvent::Task { task, .. } => task,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskChange {
    Defined,
    Enabled,
    Disabled,
    Deleted,
}

/// Where a task's definition came from; a task from a file is changed by
/// editing the file, not through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Api,
    File,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Api => "api",
            Origin::File => "file",
        }
    }

    fn parse(text: &str) -> Self {
        if text == "file" {
            Origin::File
        } else {
            Origin::Api
        }
    }
}
