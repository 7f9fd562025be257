//! Tasks: `task`-world plugins run on a schedule, with timeouts, retries,
//! a concurrency rule and a history (issue 13). Built so far: when a task
//! fires ([`schedule`]). The scheduler, the runner, the store tables and
//! the API are not built yet.

pub mod schedule;
