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

/// Records run `id` (ids are handed out by the caller, see [`max_run_id`])
/// in `state`: `queued`, `running`, or already ended (`skipped`).
#[allow(clippy::too_many_arguments)]
pub fn insert_run(
    conn: &Connection,
    id: i64,
    task_id: i64,
    attempt: u32,
    state: &str,
    scheduled_at_ms: i64,
    now_ms: i64,
    outcome: Option<&str>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO runs (id, task_id, attempt, state, scheduled_at_ms, started_at_ms, ended_at_ms, outcome)
         VALUES (?1, ?2, ?3, ?4, ?5,
                 CASE WHEN ?4 = 'running' THEN ?6 END,
                 CASE WHEN ?4 NOT IN ('queued', 'running') THEN ?6 END,
                 ?7)",
    )?
    .execute(params![id, task_id, attempt, state, scheduled_at_ms, now_ms, outcome])?;
    Ok(())
}

/// The highest run id ever stored (0 for none): new runs count on from it.
pub fn max_run_id(conn: &mut Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT coalesce(max(id), 0) FROM runs", [], |row| {
        row.get(0)
    })
}

/// Per task, the latest slot a run was scheduled for: where missed firings
/// are counted from after a restart.
pub fn last_slots(conn: &mut Connection) -> rusqlite::Result<Vec<(i64, i64)>> {
    let mut statement =
        conn.prepare("SELECT task_id, max(scheduled_at_ms) FROM runs GROUP BY task_id")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    rows.collect()
}

/// Per task, its newest run.
pub fn last_runs(conn: &mut Connection) -> rusqlite::Result<Vec<RunRow>> {
    let mut statement = conn.prepare(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE id IN (SELECT max(id) FROM runs GROUP BY task_id)"
    ))?;
    let rows = statement.query_map([], run_row)?;
    rows.collect()
}

/// Moves a run to `state`: `running` stamps its start, any other its end.
pub fn set_run_state(
    conn: &Connection,
    run_id: i64,
    state: &str,
    outcome: Option<&str>,
    now_ms: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE runs SET
             state = ?2,
             outcome = COALESCE(?3, outcome),
             started_at_ms = CASE WHEN ?2 = 'running' THEN ?4 ELSE started_at_ms END,
             ended_at_ms = CASE WHEN ?2 NOT IN ('queued', 'running') THEN ?4 ELSE ended_at_ms END
         WHERE id = ?1",
    )?
    .execute(params![run_id, state, outcome, now_ms])?;
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

const RUN_COLUMNS: &str =
    "id, task_id, attempt, state, scheduled_at_ms, started_at_ms, ended_at_ms, outcome";

fn run_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
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
}

/// The latest `limit` runs of a task (of every task: `None`), newest first.
pub fn runs(
    conn: &mut Connection,
    task_id: Option<i64>,
    limit: u32,
) -> rusqlite::Result<Vec<RunRow>> {
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE ?1 IS NULL OR task_id = ?1 ORDER BY id DESC LIMIT ?2"
    ))?;
    let rows = statement.query_map(params![task_id, limit], run_row)?;
    rows.collect()
}

/// Appends a line to a run's log.
pub fn log(
    conn: &Connection,
    run_id: i64,
    at_ms: i64,
    level: &str,
    message: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO run_logs (run_id, at_ms, level, message) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![run_id, at_ms, level, message])?;
    Ok(())
}

/// One line of a run's log, with the run and task it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    pub task: String,
    pub run_id: i64,
    pub at_ms: i64,
    pub level: String,
    pub message: String,
}

/// Which log lines to read; every part optional.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub task_id: Option<i64>,
    pub run_id: Option<i64>,
    /// These levels only (the caller expands "warn and above").
    pub levels: Option<Vec<&'static str>>,
    pub since_ms: Option<i64>,
    pub limit: u32,
}

/// Log lines matching `query`, oldest first (the newest `limit` of them).
pub fn log_lines(conn: &mut Connection, query: &LogQuery) -> rusqlite::Result<Vec<LogRow>> {
    let levels = query
        .levels
        .as_ref()
        .map(|levels| levels.join(","))
        .unwrap_or_default();
    let mut statement = conn.prepare_cached(
        "SELECT task, run_id, at_ms, level, message FROM (
             SELECT l.id, t.name AS task, l.run_id, l.at_ms, l.level, l.message
             FROM run_logs l JOIN runs r ON r.id = l.run_id JOIN tasks t ON t.id = r.task_id
             WHERE (?1 IS NULL OR r.task_id = ?1)
               AND (?2 IS NULL OR l.run_id = ?2)
               AND (?3 = '' OR instr(',' || ?3 || ',', ',' || l.level || ',') > 0)
               AND (?4 IS NULL OR l.at_ms >= ?4)
             ORDER BY l.id DESC LIMIT ?5
         ) ORDER BY id",
    )?;
    let rows = statement.query_map(
        params![
            query.task_id,
            query.run_id,
            levels,
            query.since_ms,
            query.limit
        ],
        |row| {
            Ok(LogRow {
                task: row.get(0)?,
                run_id: row.get(1)?,
                at_ms: row.get(2)?,
                level: row.get(3)?,
                message: row.get(4)?,
            })
        },
    )?;
    rows.collect()
}

/// Retention: keeps task `task_id`'s newest `keep` runs (and their logs),
/// and any run still queued or running, however old.
pub fn prune_task_runs(conn: &Connection, task_id: i64, keep: u32) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM runs WHERE task_id = ?1 AND state NOT IN ('queued', 'running') AND id < (
             SELECT id FROM runs WHERE task_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2
         )",
    )?
    .execute(params![task_id, keep.saturating_sub(1)])
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
                let run = max_run_id(c)? + 1;
                insert_run(c, run, task, 1, "running", 1_500, 1_600, None)?;
                log(c, run, 1_700, "info", "checking")?;
                log(c, run, 1_800, "warn", "slow")?;
                let ran = max_run_id(c)? + 1;
                insert_run(c, ran, task, 1, "running", 3_000, 3_000, None)?;
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
                let lines = log_lines(
                    c,
                    &LogQuery {
                        task_id: Some(task),
                        levels: Some(vec!["warn", "error"]),
                        limit: 10,
                        ..LogQuery::default()
                    },
                )?;
                let slots = last_slots(c)?;
                let last = last_runs(c)?;
                assert_eq!((slots, last[0].id), (vec![(task, 3_000)], ran));
                Ok((interrupted, runs(c, Some(task), 10)?, lines, tasks(c)?))
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
        assert_eq!(lines.len(), 1, "only the warning: {lines:?}");
        assert_eq!(
            (lines[0].task.as_str(), lines[0].run_id, lines[0].at_ms),
            ("probe", run, 1_800)
        );
        let (pruned, gone, deleted) = store
            .call(move |c| {
                let pruned = prune_task_runs(c, task, 1)?;
                let gone = log_lines(
                    c,
                    &LogQuery {
                        run_id: Some(run),
                        limit: 10,
                        ..LogQuery::default()
                    },
                )?
                .is_empty();
                Ok((
                    pruned,
                    gone,
                    delete_task(c, "probe")? && runs(c, Some(task), 10)?.is_empty(),
                ))
            })
            .await
            .unwrap();
        assert_eq!(pruned, 1);
        assert!(gone, "a pruned run's logs go with it");
        // A run still going is kept, however many newer runs there are.
        let kept = store
            .call(move |c| {
                let task = put_task(c, "again", r#"{"name":"again"}"#, "api", 10_000)?;
                let going = max_run_id(c)? + 1;
                insert_run(c, going, task, 1, "running", 10_000, 10_000, None)?;
                for id in going + 1..going + 5 {
                    insert_run(c, id, task, 1, "skipped", 11_000, 11_000, None)?;
                }
                prune_task_runs(c, task, 2)?;
                Ok(runs(c, Some(task), 10)?
                    .iter()
                    .map(|r| r.state.clone())
                    .collect::<Vec<_>>())
            })
            .await
            .unwrap();
        assert_eq!(kept, ["skipped", "skipped", "running"]);
        assert!(deleted, "a task's runs go with it");
    }
}
