//! Tasks, their runs and run logs in the store. The task's definition is
//! kept as the JSON the operator wrote (checked by `tasks::spec` before it
//! gets here); runs carry their state as text (`queued`, `running`,
//! `success`, `failed`, `timed_out`, `cancelled`, `skipped`), so this module
//! knows tables, not task semantics.

use rusqlite::{Connection, params};

/// A stored task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    pub id: i64,
    pub name: String,
    /// The definition, as JSON.
    pub spec: String,
    /// `api` or `file`: where it was defined.
    pub source: String,
    /// Where an interval schedule counts from (wall-clock ms).
    pub anchor_ms: i64,
}

/// A stored run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub id: i64,
    pub task_id: i64,
    pub attempt: u32,
    pub state: String,
    pub scheduled_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    /// The plugin's summary, or why the run failed.
    pub outcome: Option<String>,
}

/// Defines or redefines task `name`; returns its id. A changed definition
/// restarts its interval from `now_ms`.
pub fn put_task(
    conn: &mut Connection,
    name: &str,
    spec: &str,
    source: &str,
    now_ms: i64,
) -> rusqlite::Result<i64> {
    conn.query_row(
        "INSERT INTO tasks (name, spec, source, anchor_ms, created_at_ms, updated_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?4, ?4)
         ON CONFLICT (name) DO UPDATE SET
             spec = excluded.spec, source = excluded.source,
             anchor_ms = excluded.anchor_ms, updated_at_ms = excluded.updated_at_ms
         RETURNING id",
        params![name, spec, source, now_ms],
        |row| row.get(0),
    )
}

/// Deletes task `name` with its runs and logs; whether it existed.
pub fn delete_task(conn: &mut Connection, name: &str) -> rusqlite::Result<bool> {
    Ok(conn.execute("DELETE FROM tasks WHERE name = ?1", params![name])? > 0)
}

pub fn tasks(conn: &mut Connection) -> rusqlite::Result<Vec<TaskRow>> {
    let mut statement =
        conn.prepare("SELECT id, name, spec, source, anchor_ms FROM tasks ORDER BY name")?;
    let rows = statement.query_map([], |row| {
        Ok(TaskRow {
            id: row.get(0)?,
            name: row.get(1)?,
            spec: row.get(2)?,
            source: row.get(3)?,
            anchor_ms: row.get(4)?,
        })
    })?;
    rows.collect()
}

/// Records a new run in `state` (`queued` or `running`, or `skipped`);
/// returns its id.
pub fn start_run(
    conn: &mut Connection,
    task_id: i64,
    attempt: u32,
    state: &str,
    scheduled_at_ms: i64,
    now_ms: i64,
) -> rusqlite::Result<i64> {
    conn.query_row(
        "INSERT INTO runs (task_id, attempt, state, scheduled_at_ms, started_at_ms)
         VALUES (?1, ?2, ?3, ?4, CASE WHEN ?3 = 'running' THEN ?5 END)
         RETURNING id",
        params![task_id, attempt, state, scheduled_at_ms, now_ms],
        |row| row.get(0),
    )
}

/// Moves a run to `state`: `running` stamps its start, any other its end.
pub fn set_run_state(
    conn: &mut Connection,
    run_id: i64,
    state: &str,
    outcome: Option<&str>,
    now_ms: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE runs SET
             state = ?2,
             outcome = COALESCE(?3, outcome),
             started_at_ms = CASE WHEN ?2 = 'running' THEN ?4 ELSE started_at_ms END,
             ended_at_ms = CASE WHEN ?2 NOT IN ('queued', 'running') THEN ?4 ELSE ended_at_ms END
         WHERE id = ?1",
        params![run_id, state, outcome, now_ms],
    )?;
    Ok(())
}

/// At start: runs a crash left `queued` or `running` become `failed`
/// (`interrupted`), so none is lost and none runs twice. Returns how many.
pub fn mark_interrupted(conn: &mut Connection, now_ms: i64) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE runs SET state = 'failed', outcome = 'interrupted', ended_at_ms = ?1
         WHERE state IN ('queued', 'running')",
        params![now_ms],
    )
}

/// The latest `limit` runs of a task, newest first.
pub fn runs(conn: &mut Connection, task_id: i64, limit: u32) -> rusqlite::Result<Vec<RunRow>> {
    let mut statement = conn.prepare_cached(
        "SELECT id, task_id, attempt, state, scheduled_at_ms, started_at_ms, ended_at_ms, outcome
         FROM runs WHERE task_id = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = statement.query_map(params![task_id, limit], |row| {
        Ok(RunRow {
            id: row.get(0)?,
            task_id: row.get(1)?,
            attempt: row.get(2)?,
            state: row.get(3)?,
            scheduled_at_ms: row.get(4)?,
            started_at_ms: row.get(5)?,
            ended_at_ms: row.get(6)?,
            outcome: row.get(7)?,
        })
    })?;
    rows.collect()
}

/// Appends a line to a run's log.
pub fn log(
    conn: &mut Connection,
    run_id: i64,
    at_ms: i64,
    level: &str,
    message: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO run_logs (run_id, at_ms, level, message) VALUES (?1, ?2, ?3, ?4)",
        params![run_id, at_ms, level, message],
    )?;
    Ok(())
}

/// A run's log lines, oldest first: (at_ms, level, message).
pub fn logs(conn: &mut Connection, run_id: i64) -> rusqlite::Result<Vec<(i64, String, String)>> {
    let mut statement = conn.prepare_cached(
        "SELECT at_ms, level, message FROM run_logs WHERE run_id = ?1 ORDER BY id",
    )?;
    let rows = statement.query_map(params![run_id], |row| {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
    })?;
    rows.collect()
}

/// Retention: keeps each task's newest `keep` runs (and their logs).
pub fn prune_runs(conn: &mut Connection, keep: u32) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM runs WHERE id IN (
             SELECT id FROM (
                 SELECT id, ROW_NUMBER() OVER (PARTITION BY task_id ORDER BY id DESC) AS newest
                 FROM runs
             ) WHERE newest > ?1
         )",
        params![keep],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[tokio::test]
    async fn runs_and_logs_follow_their_task_and_crashes_leave_no_run_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmrelay.db");
        let store = Store::open(&path).unwrap();
        let (task, run, ran) = store
            .call(|c| {
                let task = put_task(c, "probe", r#"{"name":"probe"}"#, "api", 1_000)?;
                // Redefining keeps the id and moves the anchor.
                assert_eq!(
                    put_task(c, "probe", r#"{"name":"probe","retries":1}"#, "api", 2_000)?,
                    task
                );
                let run = start_run(c, task, 1, "running", 1_500, 1_600)?;
                log(c, run, 1_700, "info", "checking")?;
                log(c, run, 1_800, "warn", "slow")?;
                let ran = start_run(c, task, 1, "running", 3_000, 3_000)?;
                set_run_state(c, ran, "success", Some("ok"), 3_500)?;
                Ok((task, run, ran))
            })
            .await
            .unwrap();
        drop(store);
        // As after a kill -9 in the middle of `run`.
        let store = Store::open(&path).unwrap();
        let (interrupted, history, lines, listed) = store
            .call(move |c| {
                let interrupted = mark_interrupted(c, 9_000)?;
                Ok((interrupted, runs(c, task, 10)?, logs(c, run)?, tasks(c)?))
            })
            .await
            .unwrap();
        assert_eq!(interrupted, 1);
        assert_eq!(listed[0].anchor_ms, 2_000);
        assert_eq!(history[0].id, ran);
        assert_eq!(
            (history[0].state.as_str(), history[0].outcome.as_deref()),
            ("success", Some("ok"))
        );
        assert_eq!(history[1].state, "failed");
        assert_eq!(history[1].outcome.as_deref(), Some("interrupted"));
        assert_eq!(history[1].ended_at_ms, Some(9_000));
        assert_eq!(lines[1], (1_800, "warn".to_owned(), "slow".to_owned()));
        let (pruned, gone, deleted) = store
            .call(move |c| {
                let pruned = prune_runs(c, 1)?;
                let gone = logs(c, run)?.is_empty();
                Ok((
                    pruned,
                    gone,
                    delete_task(c, "probe")? && runs(c, task, 10)?.is_empty(),
                ))
            })
            .await
            .unwrap();
        assert_eq!(pruned, 1);
        assert!(gone, "a pruned run's logs go with it");
        assert!(deleted, "a task's runs go with it");
    }
}
