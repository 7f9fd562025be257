//! Tasks: `task`-world plugins run on a schedule, with timeouts, retries,
//! a concurrency rule and a history (issue 13). Built so far: when a task
//! fires ([`schedule`]), how a task is written and checked ([`spec`]), its
//! tables in the store (`store::tasks`) and a bundled task plugin
//! (`heartbeat`, reached through `plugin::Registry::task`). The scheduler,
//! the runner and the API are not built yet.

pub mod schedule;
pub mod spec;
