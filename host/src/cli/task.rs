//! `wasmrelay task ...`: the task API from the command line — list, show,
//! apply a definition file, run, stop, enable, disable, delete, history,
//! export, and logs (`-f` follows the live feed over WebSocket).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{AdminTarget, call_json, format_table, get_json};

#[derive(Debug, Args)]
pub struct TaskArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    #[command(subcommand)]
    pub action: TaskAction,
}

#[derive(Debug, Subcommand)]
pub enum TaskAction {
    /// Every task with its state, schedule, next and last run.
    List,
    /// One task's definition and state, as JSON.
    Show { task: String },
    /// Define or redefine a task from a file (TOML, or JSON when it ends in .json).
    Apply { file: PathBuf },
    /// Run a task now.
    Run { task: String },
    /// Stop a task's runs.
    Stop { task: String },
    /// Turn a task's schedule on.
    Enable { task: String },
    /// Turn a task's schedule off.
    Disable { task: String },
    /// Delete a task and its history.
    Delete { task: String },
    /// A task's newest runs.
    History {
        task: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// A task's log lines; `-f` goes on printing them (and run changes) as
    /// they happen.
    Logs {
        task: String,
        /// Only this run.
        #[arg(long)]
        run: Option<i64>,
        /// This level and worse: trace, debug, info, warn, error.
        #[arg(long)]
        level: Option<String>,
        #[arg(short, long)]
        follow: bool,
    },
    /// Print tasks, runs or logs as JSON or CSV.
    Export {
        #[arg(value_parser = ["tasks", "runs", "logs"])]
        what: String,
        #[arg(long, default_value = "json", value_parser = ["json", "csv"])]
        format: String,
        /// Only this task's runs or logs.
        #[arg(long)]
        task: Option<String>,
    },
}

pub async fn task(args: TaskArgs) -> anyhow::Result<()> {
    let base = args.target.base().to_owned();
    let token = args.target.token()?;
    let token = token.as_deref();
    let tasks = format!("{base}/admin/tasks");
    let mut out = std::io::stdout().lock();
    match args.action {
        TaskAction::List => {
            let list = get_json(&tasks, token).await?;
            out.write_all(render_tasks(&list).as_bytes())?;
        }
        TaskAction::Show { task } => {
            let view = get_json(&format!("{tasks}/{task}"), token).await?;
            writeln!(out, "{}", serde_json::to_string_pretty(&view)?)?;
        }
        TaskAction::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let spec: serde_json::Value = if file.extension().is_some_and(|e| e == "json") {
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not JSON", file.display()))?
            } else {
                let mut table: toml::Table = toml::from_str(&text)
                    .with_context(|| format!("{} is not TOML", file.display()))?;
                if !table.contains_key("name")
                    && let Some(stem) = file.file_stem().and_then(|s| s.to_str())
                {
                    table.insert("name".into(), stem.into());
                }
                serde_json::to_value(table)?
            };
            let name = spec["name"].as_str().unwrap_or_default().to_owned();
            let body = Some(("application/json".to_owned(), serde_json::to_vec(&spec)?));
            let exists = get_json(&format!("{tasks}/{name}"), token).await.is_ok();
            let view = if exists {
                call_json(http::Method::PUT, &format!("{tasks}/{name}"), token, body).await?
            } else {
                call_json(http::Method::POST, &tasks, token, body).await?
            };
            writeln!(
                out,
                "{} {} ({})",
                view["name"].as_str().unwrap_or(&name),
                if exists { "redefined" } else { "defined" },
                describe_next(&view)
            )?;
        }
        TaskAction::Run { task } => {
            let done = call_json(
                http::Method::POST,
                &format!("{tasks}/{task}/run"),
                token,
                None,
            )
            .await?;
            writeln!(out, "{task}: run {} started", done["run"])?;
        }
        TaskAction::Stop { task } => {
            let done = call_json(
                http::Method::POST,
                &format!("{tasks}/{task}/stop"),
                token,
                None,
            )
            .await?;
            writeln!(out, "{task}: {} run(s) stopped", done["stopped"])?;
        }
        TaskAction::Enable { task } => {
            let view = call_json(
                http::Method::POST,
                &format!("{tasks}/{task}/enable"),
                token,
                None,
            )
            .await?;
            writeln!(out, "{task} enabled ({})", describe_next(&view))?;
        }
        TaskAction::Disable { task } => {
            call_json(
                http::Method::POST,
                &format!("{tasks}/{task}/disable"),
                token,
                None,
            )
            .await?;
            writeln!(out, "{task} disabled")?;
        }
        TaskAction::Delete { task } => {
            call_json(
                http::Method::DELETE,
                &format!("{tasks}/{task}"),
                token,
                None,
            )
            .await?;
            writeln!(out, "{task} deleted")?;
        }
        TaskAction::History { task, limit } => {
            let runs = get_json(&format!("{tasks}/{task}/runs?limit={limit}"), token).await?;
            out.write_all(render_runs(&runs["runs"]).as_bytes())?;
        }
        TaskAction::Logs {
            task,
            run,
            level,
            follow,
        } => {
            let mut query = format!("task={task}");
            if let Some(run) = run {
                query.push_str(&format!("&run={run}"));
            }
            if let Some(level) = &level {
                query.push_str(&format!("&level={level}"));
            }
            if follow {
                drop(out);
                return follow_feed(&base, &query, token).await;
            }
            let lines = get_json(&format!("{base}/admin/logs?{query}"), token).await?;
            for line in lines["logs"].as_array().into_iter().flatten() {
                writeln!(out, "{}", render_log(line))?;
            }
        }
        TaskAction::Export { what, format, task } => {
            let mut url = format!("{base}/admin/export/{what}?format={format}");
            if let Some(task) = task {
                url.push_str(&format!("&task={task}"));
            }
            let body = super::call(http::Method::GET, &url, token, None).await?;
            out.write_all(&body)?;
        }
    }
    Ok(())
}

/// Prints the live feed until the relay closes it (or, following one run,
/// until that run has ended).
async fn follow_feed(base: &str, query: &str, token: Option<&str>) -> anyhow::Result<()> {
    let ws_base = base
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1);
    let url = format!("{ws_base}/admin/tasks/events?{query}");
    let mut request = url
        .as_str()
        .into_client_request()
        .with_context(|| format!("invalid URL {url}"))?;
    if let Some(token) = token {
        request.headers_mut().insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse()?,
        );
    }
    let (mut feed, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("cannot follow {url}"))?;
    let one_run = query.contains("&run=");
    while let Some(frame) = feed.next().await {
        let Message::Text(text) = frame? else {
            continue;
        };
        let event: serde_json::Value = serde_json::from_str(&text)?;
        let line = match event["type"].as_str() {
            Some("log") => render_log(&event),
            Some("run") => format!(
                "-- run {} attempt {} {}{}",
                event["run"],
                event["attempt"],
                event["state"].as_str().unwrap_or(""),
                event["outcome"]
                    .as_str()
                    .map(|o| format!(": {o}"))
                    .unwrap_or_default()
            ),
            Some("task") => format!("-- task {}", event["change"].as_str().unwrap_or("")),
            Some("lagged") => format!("-- {} events missed (too slow)", event["missed"]),
            _ => continue,
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        let ended = matches!(
            event["state"].as_str(),
            Some("success" | "failed" | "timed_out" | "cancelled" | "skipped")
        );
        if one_run && ended {
            return Ok(());
        }
    }
    bail!("the relay closed the feed")
}

fn render_log(line: &serde_json::Value) -> String {
    format!(
        "{} run {} {:<5} {}",
        time(line["at_ms"].as_i64()),
        line["run"],
        line["level"].as_str().unwrap_or(""),
        line["message"].as_str().unwrap_or("")
    )
}

fn time(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| "-".to_owned())
}

fn describe_next(view: &serde_json::Value) -> String {
    match view["next_run_at_ms"].as_i64() {
        Some(next) => format!("next run {}", time(Some(next))),
        None => "no scheduled run".to_owned(),
    }
}

/// Formats `GET /admin/tasks` as a table.
pub fn render_tasks(list: &serde_json::Value) -> String {
    let header = [
        "ID", "Name", "State", "Plugin", "Schedule", "Next", "Last", "Origin",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for task in list["tasks"].as_array().into_iter().flatten() {
        let definition = &task["definition"];
        let schedule = match &definition["schedule"] {
            serde_json::Value::Null => "manual".to_owned(),
            serde_json::Value::Object(s) => s
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}={}",
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                    )
                })
                .collect::<Vec<_>>()
                .join(" "),
            other => other.to_string(),
        };
        let last = match task["last_run"]["state"].as_str() {
            Some(state) => format!("{state} {}", time(task["last_run"]["ended_at_ms"].as_i64())),
            None => "-".to_owned(),
        };
        rows.push(vec![
            task["id"].to_string(),
            task["name"].as_str().unwrap_or("").to_owned(),
            task["state"].as_str().unwrap_or("").to_owned(),
            definition["plugin"].as_str().unwrap_or("").to_owned(),
            schedule,
            time(task["next_run_at_ms"].as_i64()),
            last,
            task["origin"].as_str().unwrap_or("").to_owned(),
        ]);
    }
    let mut table = format_table(&rows);
    for refused in list["refused_files"].as_array().into_iter().flatten() {
        table.push_str(&format!(
            "refused file {}: {}\n",
            refused["file"].as_str().unwrap_or(""),
            refused["reason"].as_str().unwrap_or("")
        ));
    }
    table
}

fn render_runs(runs: &serde_json::Value) -> String {
    let header = ["Run", "Attempt", "State", "Scheduled", "Took-ms", "Outcome"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for run in runs.as_array().into_iter().flatten() {
        rows.push(vec![
            run["id"].to_string(),
            run["attempt"].to_string(),
            run["state"].as_str().unwrap_or("").to_owned(),
            time(run["scheduled_at_ms"].as_i64()),
            run["duration_ms"]
                .as_i64()
                .map_or_else(|| "-".to_owned(), |ms| ms.to_string()),
            run["outcome"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(60)
                .collect(),
        ]);
    }
    format_table(&rows)
}
