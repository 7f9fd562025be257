//! The task API beside the operator API, under the same admin token: tasks
//! (`/admin/tasks`, their verbs and batches), their runs, logs
//! (`/admin/logs`), exports as JSON or CSV (`/admin/export/...`), checking
//! a definition before saving it (`/admin/config/validate`), and the live
//! feed of run changes and log lines over WebSocket
//! (`/admin/tasks/events`). PROTOCOL.md, "Task API", is the reference.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

use crate::delivery::table::{ConnGuard, ConnState};
use crate::protocol::ErrorCode;
use crate::state::Relay;
use crate::store::tasks::LogQuery;
use crate::tasks::manager::Define;
use crate::tasks::schedule::Schedule;
use crate::tasks::spec::TaskSpec;
use crate::tasks::{Origin, TaskError, TaskEvent, Tasks, levels_from};
use crate::transport::reply::{Body, json, json_error, json_error_field};
use crate::transport::ws::{check_handshake, switching_protocols};

/// Largest task definition or batch body accepted.
const MAX_BODY: usize = 256 * 1024;
/// Most ids in one batch.
const MAX_BATCH: usize = 1_000;
/// The subprotocol a browser offers, with `bearer.<token>`, to follow the
/// live feed (a browser cannot set Authorization on a WebSocket).
pub const FEED_PROTOCOL: &str = "wasmrelay-admin";

type Response = hyper::Response<Body>;

/// Serves an authorized request under `/admin/tasks`, `/admin/logs`,
/// `/admin/export` or `/admin/config`.
pub async fn route(
    relay: Arc<Relay>,
    guard: Arc<ConnGuard>,
    req: hyper::Request<Incoming>,
) -> Response {
    let Some(tasks) = relay.tasks.get().cloned() else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "the task manager is not running",
        );
    };
    let path = req.uri().path().to_owned();
    let query = Query::parse(req.uri().query());
    let method = req.method().clone();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').skip(1).collect();
    match (&method, parts.as_slice()) {
        (&Method::GET, ["tasks"]) => list(&relay, &tasks).await,
        (&Method::POST, ["tasks"]) => match read_spec(req, None).await {
            Ok(spec) => answer(
                tasks.define(spec, Origin::Api, Define::Create).await,
                StatusCode::CREATED,
            ),
            Err(refused) => refused,
        },
        (&Method::GET, ["tasks", "events"]) => follow(relay, guard, req, query),
        (&Method::POST, ["tasks", "batch", verb]) => batch(&tasks, verb, req).await,
        (&Method::GET, ["tasks", id]) => answer(tasks.get(id).await, StatusCode::OK),
        (&Method::PUT, ["tasks", id]) => {
            let name = match tasks.get(id).await {
                Ok(view) => view.name,
                Err(e) => return task_error(e),
            };
            match read_spec(req, Some(&name)).await {
                Ok(spec) => answer(
                    tasks.define(spec, Origin::Api, Define::Replace).await,
                    StatusCode::OK,
                ),
                Err(refused) => refused,
            }
        }
        (&Method::DELETE, ["tasks", id]) => match tasks.delete(id, Origin::Api).await {
            Ok(()) => json(StatusCode::OK, &serde_json::json!({ "deleted": id })),
            Err(e) => task_error(e),
        },
        (&Method::POST, ["tasks", id, verb]) => match act(&tasks, id, verb).await {
            Some(Ok(done)) => json(StatusCode::OK, &done),
            Some(Err(e)) => task_error(e),
            None => unknown(&method, &path),
        },
        (&Method::GET, ["tasks", id, "runs"]) => {
            let limit = query.number("limit").unwrap_or(100).clamp(1, 10_000) as u32;
            match tasks.runs(Some(id), limit).await {
                Ok(runs) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "count": runs.len(), "runs": runs }),
                ),
                Err(e) => task_error(e),
            }
        }
        (&Method::GET, ["logs"]) => match logs(&tasks, &query, 1_000).await {
            Ok(lines) => json(
                StatusCode::OK,
                &serde_json::json!({ "count": lines.len(), "logs": lines }),
            ),
            Err(refused) => refused,
        },
        (&Method::GET, ["export", what]) => export(&tasks, what, &query).await,
        (&Method::POST, ["config", "validate"]) => validate(&tasks, &query, req).await,
        _ => unknown(&method, &path),
    }
}

fn unknown(method: &Method, path: &str) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        &format!("no admin endpoint {method} {path}"),
    )
}

fn answer(result: Result<impl Serialize, TaskError>, status: StatusCode) -> Response {
    match result {
        Ok(value) => json(status, &value),
        Err(e) => task_error(e),
    }
}

/// A refused task operation, as its documented error code.
fn task_error(error: TaskError) -> Response {
    let message = error.to_string();
    match error {
        TaskError::NotFound(_) => json_error(StatusCode::NOT_FOUND, ErrorCode::NotFound, &message),
        TaskError::Exists(_) => json_error(StatusCode::CONFLICT, ErrorCode::TaskExists, &message),
        TaskError::FromFile(_) => {
            json_error(StatusCode::CONFLICT, ErrorCode::TaskFromFile, &message)
        }
        TaskError::Busy(_) => json_error(StatusCode::CONFLICT, ErrorCode::TaskBusy, &message),
        TaskError::Invalid(e) => json_error_field(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidTask,
            &e.to_string(),
            &e.field,
        ),
        TaskError::Stopped => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            &message,
        ),
        other => {
            tracing::warn!(error = %other, "task operation failed");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                &message,
            )
        }
    }
}

async fn read_body(req: hyper::Request<Incoming>) -> Result<Bytes, Response> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) => Err(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            &format!("body not read (at most {MAX_BODY} bytes): {e}"),
        )),
    }
}

/// A task definition from a JSON body; `name` may be left out on a PUT
/// (the path names it) but must agree with it.
async fn read_spec(
    req: hyper::Request<Incoming>,
    name: Option<&str>,
) -> Result<TaskSpec, Response> {
    let body = read_body(req).await?;
    let invalid = |field: &str, message: String| {
        json_error_field(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidTask,
            &message,
            field,
        )
    };
    let mut value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| invalid("task", format!("task: not JSON: {e}")))?;
    if let (Some(name), Some(object)) = (name, value.as_object_mut()) {
        match object.get("name") {
            None => {
                object.insert("name".to_owned(), name.into());
            }
            Some(given) if given == name => {}
            Some(given) => {
                return Err(invalid(
                    "name",
                    format!("name: {given} differs from the task being replaced ({name:?})"),
                ));
            }
        }
    }
    TaskSpec::from_json(&value.to_string()).map_err(|e| invalid(&e.field, e.to_string()))
}

async fn list(relay: &Relay, tasks: &Tasks) -> Response {
    match tasks.list().await {
        Ok(views) => {
            let refused: Vec<_> = relay
                .task_file_refusals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            json(
                StatusCode::OK,
                &serde_json::json!({ "count": views.len(), "tasks": views, "refused_files": refused }),
            )
        }
        Err(e) => task_error(e),
    }
}

/// `run`, `stop`, `restart`, `toggle`, `enable`, `disable` on one task;
/// `None` for another verb.
async fn act(tasks: &Tasks, id: &str, verb: &str) -> Option<Result<serde_json::Value, TaskError>> {
    let done = match verb {
        "run" => tasks
            .run_now(id)
            .await
            .map(|run| serde_json::json!({ "task": id, "run": run })),
        "restart" => tasks
            .restart(id)
            .await
            .map(|run| serde_json::json!({ "task": id, "run": run })),
        "stop" => tasks
            .stop(id)
            .await
            .map(|stopped| serde_json::json!({ "task": id, "stopped": stopped })),
        "toggle" | "enable" | "disable" => {
            let enabled = match verb {
                "enable" => Some(true),
                "disable" => Some(false),
                _ => None,
            };
            tasks
                .set_enabled(id, enabled)
                .await
                .map(|view| serde_json::to_value(view).expect("a view serializes"))
        }
        _ => return None,
    };
    Some(done)
}

/// `POST /admin/tasks/batch/{run|stop|delete}` with `{"ids":[…]}`: one
/// result per id, in order; one failing does not stop the rest.
async fn batch(tasks: &Tasks, verb: &str, req: hyper::Request<Incoming>) -> Response {
    if !matches!(verb, "run" | "stop" | "delete") {
        return json_error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            &format!("no batch verb {verb:?} (run, stop, delete)"),
        );
    }
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Batch {
        ids: Vec<serde_json::Value>,
    }
    let ids = match serde_json::from_slice::<Batch>(&body) {
        Ok(batch) if batch.ids.len() <= MAX_BATCH => batch.ids,
        Ok(_) => {
            return json_error_field(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadMessage,
                &format!("ids: at most {MAX_BATCH} per batch"),
                "ids",
            );
        }
        Err(e) => {
            return json_error_field(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadMessage,
                &format!("expected {{\"ids\":[…]}}: {e}"),
                "ids",
            );
        }
    };
    let mut results = Vec::with_capacity(ids.len());
    for id in ids {
        let key = match &id {
            serde_json::Value::String(name) => name.clone(),
            other => other.to_string(),
        };
        let done = match verb {
            "run" => tasks
                .run_now(&key)
                .await
                .map(|run| serde_json::json!({ "run": run })),
            "stop" => tasks
                .stop(&key)
                .await
                .map(|stopped| serde_json::json!({ "stopped": stopped })),
            _ => tasks
                .delete(&key, Origin::Api)
                .await
                .map(|()| serde_json::json!({})),
        };
        results.push(match done {
            Ok(mut fields) => {
                fields["id"] = id;
                fields["ok"] = true.into();
                fields
            }
            Err(e) => {
                let code = match &e {
                    TaskError::NotFound(_) => ErrorCode::NotFound,
                    TaskError::Busy(_) => ErrorCode::TaskBusy,
                    TaskError::FromFile(_) => ErrorCode::TaskFromFile,
                    _ => ErrorCode::Internal,
                };
                serde_json::json!({ "id": id, "ok": false, "error": { "code": code, "message": e.to_string() } })
            }
        });
    }
    json(StatusCode::OK, &serde_json::json!({ "results": results }))
}

/// A log line as the API shows it.
#[derive(Debug, Serialize)]
struct LogLine {
    task: String,
    run: i64,
    at_ms: i64,
    level: String,
    message: String,
}

/// `?task=&run=&level=&since=&limit=`: `level` keeps that level and worse;
/// `since` is milliseconds since the epoch or an RFC 3339 time.
async fn logs(tasks: &Tasks, query: &Query, default_limit: u64) -> Result<Vec<LogLine>, Response> {
    let bad = |field: &str, message: String| {
        json_error_field(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadMessage,
            &message,
            field,
        )
    };
    let levels = match query.get("level") {
        Some(level) => Some(levels_from(level).ok_or_else(|| {
            bad(
                "level",
                format!("level: {level:?} is not one of trace, debug, info, warn, error"),
            )
        })?),
        None => None,
    };
    let since_ms = match query.get("since") {
        Some(since) => Some(parse_time(since).ok_or_else(|| {
            bad(
                "since",
                format!("since: {since:?} is neither milliseconds nor an RFC 3339 time"),
            )
        })?),
        None => None,
    };
    let run_id = match query.get("run") {
        Some(run) => Some(
            run.parse::<i64>()
                .map_err(|_| bad("run", format!("run: {run:?} is not a run id")))?,
        ),
        None => None,
    };
    let request = LogQuery {
        task_id: None,
        run_id,
        levels,
        since_ms,
        limit: query
            .number("limit")
            .unwrap_or(default_limit)
            .clamp(1, 100_000) as u32,
    };
    let rows = tasks
        .logs(query.get("task"), request)
        .await
        .map_err(task_error)?;
    Ok(rows
        .into_iter()
        .map(|row| LogLine {
            task: row.task,
            run: row.run_id,
            at_ms: row.at_ms,
            level: row.level,
            message: row.message,
        })
        .collect())
}

fn parse_time(text: &str) -> Option<i64> {
    text.parse::<i64>().ok().or_else(|| {
        // A `+` of an offset arrives as a space when the query was not escaped.
        chrono::DateTime::parse_from_rfc3339(&text.replace(' ', "+"))
            .ok()
            .map(|t| t.timestamp_millis())
    })
}

/// A task as one CSV row.
#[derive(Serialize)]
struct TaskRow {
    id: i64,
    name: String,
    state: crate::tasks::TaskState,
    origin: Origin,
    plugin: String,
    schedule: String,
    enabled: bool,
    timeout_ms: u64,
    retries: u32,
    retry_delay_ms: u64,
    concurrency: crate::tasks::spec::Concurrency,
    missed: crate::tasks::spec::Missed,
    next_run_at_ms: Option<i64>,
    last_run_state: Option<String>,
    last_run_ended_at_ms: Option<i64>,
}

/// `GET /admin/export/{tasks|runs|logs}?format=json|csv` (`task=` narrows
/// runs and logs to one task).
async fn export(tasks: &Tasks, what: &str, query: &Query) -> Response {
    let format = query.get("format").unwrap_or("json");
    if !matches!(format, "json" | "csv") {
        return json_error_field(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadMessage,
            &format!("format: {format:?} is not json or csv"),
            "format",
        );
    }
    let csv = format == "csv";
    let exported = match what {
        "tasks" => match tasks.list().await {
            Ok(views) if csv => rows_csv(views.into_iter().map(|view| {
                TaskRow {
                    id: view.id,
                    schedule: view
                        .definition
                        .schedule
                        .as_ref()
                        .map(|s| serde_json::to_string(s).unwrap_or_default())
                        .unwrap_or_default(),
                    plugin: view.definition.plugin.clone(),
                    enabled: view.definition.enabled,
                    timeout_ms: view.definition.timeout_ms,
                    retries: view.definition.retries,
                    retry_delay_ms: view.definition.retry_delay_ms,
                    concurrency: view.definition.concurrency,
                    missed: view.definition.missed,
                    next_run_at_ms: view.next_run_at_ms,
                    last_run_state: view.last_run.as_ref().map(|run| run.state.clone()),
                    last_run_ended_at_ms: view.last_run.as_ref().and_then(|run| run.ended_at_ms),
                    name: view.name,
                    state: view.state,
                    origin: view.origin,
                }
            })),
            Ok(views) => serde_json::to_vec(&views).map_err(|e| e.to_string()),
            Err(e) => return task_error(e),
        },
        "runs" => {
            let limit = query.number("limit").unwrap_or(100_000).clamp(1, 1_000_000) as u32;
            match tasks.runs(query.get("task"), limit).await {
                Ok(runs) if csv => rows_csv(runs),
                Ok(runs) => serde_json::to_vec(&runs).map_err(|e| e.to_string()),
                Err(e) => return task_error(e),
            }
        }
        "logs" => match logs(tasks, query, 100_000).await {
            Ok(lines) if csv => rows_csv(lines),
            Ok(lines) => serde_json::to_vec(&lines).map_err(|e| e.to_string()),
            Err(refused) => return refused,
        },
        _ => {
            return json_error(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                &format!("nothing to export as {what:?} (tasks, runs, logs)"),
            );
        }
    };
    match exported {
        Ok(body) => {
            let mut response = hyper::Response::new(crate::transport::reply::full(body));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(if csv {
                    "text/csv; charset=utf-8"
                } else {
                    "application/json"
                }),
            );
            let disposition = format!("attachment; filename=\"{what}.{format}\"");
            if let Ok(value) = HeaderValue::from_str(&disposition) {
                headers.insert(header::CONTENT_DISPOSITION, value);
            }
            response
        }
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, &e),
    }
}

/// RFC 4180 CSV with a header row from the field names.
fn rows_csv<R: Serialize>(rows: impl IntoIterator<Item = R>) -> Result<Vec<u8>, String> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer.serialize(row).map_err(|e| e.to_string())?;
    }
    writer.into_inner().map_err(|e| e.to_string())
}

/// `POST /admin/config/validate`: checks a task definition (JSON or TOML;
/// `?kind=task`, the default) or a relay configuration (`?kind=config`,
/// TOML) without applying it.
async fn validate(tasks: &Tasks, query: &Query, req: hyper::Request<Incoming>) -> Response {
    let kind = query.get("kind").unwrap_or("task").to_owned();
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let text = String::from_utf8_lossy(&body);
    match kind.as_str() {
        "task" => {
            let spec = if text.trim_start().starts_with('{') {
                TaskSpec::from_json(&text)
            } else {
                TaskSpec::from_toml(&text)
            };
            let checked = spec.and_then(|spec| {
                let schedule = spec.validate()?;
                tasks
                    .runner
                    .executor
                    .check(&spec.plugin)
                    .map_err(|reason| crate::tasks::spec::SpecError {
                        field: "plugin".to_owned(),
                        reason,
                    })?;
                Ok((spec, schedule))
            });
            match checked {
                Ok((spec, schedule)) => json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "valid": true,
                        "kind": "task",
                        "task": spec.name,
                        "next_runs_at_ms": next_runs(&schedule, tasks.runner.clock.now_ms()),
                    }),
                ),
                Err(e) => json_error_field(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidTask,
                    &e.to_string(),
                    &e.field,
                ),
            }
        }
        "config" => {
            let checked = crate::config::Config::from_toml(&text)
                .map_err(|e| ("config".to_owned(), e.message().to_owned()))
                .and_then(|config| {
                    config.validate().map_err(|e| match e {
                        crate::config::ConfigError::Invalid { field, reason } => {
                            (field.to_string(), format!("{field}: {reason}"))
                        }
                        other => ("config".to_owned(), other.to_string()),
                    })
                });
            match checked {
                Ok(()) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "valid": true, "kind": "config" }),
                ),
                Err((field, message)) => json_error_field(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadMessage,
                    &message,
                    &field,
                ),
            }
        }
        other => json_error_field(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadMessage,
            &format!("kind: {other:?} is not task or config"),
            "kind",
        ),
    }
}

/// The next five firings from `now_ms` (a new task counts from now).
fn next_runs(schedule: &Schedule, now_ms: i64) -> Vec<i64> {
    let mut next = Vec::new();
    let mut after = now_ms;
    while next.len() < 5 {
        match schedule.next_after(after, now_ms) {
            Some(at) => {
                next.push(at);
                after = at;
            }
            None => break,
        }
    }
    next
}

/// Which events a follower asked for.
struct Filter {
    task: Option<String>,
    run: Option<i64>,
    levels: Option<Vec<&'static str>>,
}

impl Filter {
    fn wants(&self, event: &TaskEvent) -> bool {
        if self
            .task
            .as_deref()
            .is_some_and(|task| task != event.task())
        {
            return false;
        }
        match event {
            TaskEvent::Run { run, .. } => self.run.is_none_or(|wanted| wanted == *run),
            TaskEvent::Log { run, level, .. } => {
                self.run.is_none_or(|wanted| wanted == *run)
                    && self
                        .levels
                        .as_ref()
                        .is_none_or(|levels| levels.contains(level))
            }
            TaskEvent::Task { .. } => self.run.is_none(),
        }
    }
}

/// `GET /admin/tasks/events?task=&run=&level=` (WebSocket): every run
/// change, log line and task change as it happens, one JSON text frame
/// each; a follower too slow for the feed is told how many it missed.
fn follow(
    relay: Arc<Relay>,
    guard: Arc<ConnGuard>,
    mut req: hyper::Request<Incoming>,
    query: Query,
) -> Response {
    let accept = match check_handshake(req.headers()) {
        Ok(accept) => accept,
        Err(refused) => return refused,
    };
    let levels = match query.get("level") {
        Some(level) => match levels_from(level) {
            Some(levels) => Some(levels),
            None => {
                return json_error_field(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadMessage,
                    &format!("level: {level:?} is not one of trace, debug, info, warn, error"),
                    "level",
                );
            }
        },
        None => None,
    };
    let filter = Filter {
        task: query.get("task").map(str::to_owned),
        run: query.get("run").and_then(|run| run.parse().ok()),
        levels,
    };
    let offered_protocol = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == FEED_PROTOCOL);
    let Some(tasks) = relay.tasks.get().cloned() else {
        return unknown(req.method(), req.uri().path());
    };
    // Subscribed before answering, so nothing after the 101 is missed.
    let feed = tasks.follow();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let closing = relay.closing().clone();
    guard.info().set_state(ConnState::Open);
    relay.conn_tasks.spawn(async move {
        let _guard = guard;
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                stream_events(ws, feed, filter, closing).await;
            }
            Err(e) => tracing::debug!(error = %e, "task feed upgrade failed"),
        }
    });
    let mut response = switching_protocols(&accept);
    if offered_protocol {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(FEED_PROTOCOL),
        );
    }
    response
}

async fn stream_events<S>(
    mut ws: WebSocketStream<S>,
    mut feed: tokio::sync::broadcast::Receiver<TaskEvent>,
    filter: Filter,
    closing: tokio_util::sync::CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        tokio::select! {
            event = feed.recv() => {
                let frame = match event {
                    Ok(event) if filter.wants(&event) => serde_json::to_string(&event).expect("events serialize"),
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => serde_json::json!({ "type": "lagged", "missed": missed }).to_string(),
                    Err(RecvError::Closed) => break,
                };
                if ws.send(Message::text(frame)).await.is_err() {
                    return;
                }
            }
            inbound = ws.next() => match inbound {
                // Pings are answered by the WebSocket layer; anything else
                // a follower sends is ignored.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            _ = closing.cancelled() => break,
        }
    }
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "the relay is shutting down".into(),
        }))
        .await;
}

/// A request's query string, decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        Self(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .filter(|(_, v)| !v.is_empty())
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn number(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.parse().ok())
    }
}
