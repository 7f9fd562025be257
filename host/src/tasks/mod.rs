//! Tasks: `task`-world plugins run on a schedule, with timeouts, retries,
//! a concurrency rule and a history (issue 13). Built so far: when a task
//! fires ([`schedule`]) and how a task is written and checked ([`spec`]).
//! The scheduler, the runner, their tables in the store and the API are
//! not built yet.

pub mod schedule;
pub mod spec;
