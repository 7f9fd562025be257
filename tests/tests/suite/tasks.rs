//! Tasks against a real relay with real task plugins (the bundled heartbeat
//! and the `task-script` fixture): the REST API and its errors, runs and
//! logs, exports, the live feed, timeouts and retries of real wasm, the
//! task folder, and what survives a graceful restart or a kill -9.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wasmrelay_tests::{
    RelayProcess, TEST_ADMIN_TOKEN, TestRelay, WsTester, admin_client, get_json, wait_json,
};

const SCRIPT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/task-script.wasm"));
const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");
const SCRIPT_MANIFEST: &str = "name = \"script\"\nversion = \"1.0.0\"\nrole = \"task\"\ncapabilities = [\"log\", \"transfer\"]\n[limits]\nmemory_bytes = 4194304\ncall_timeout_ms = 50\n";

async fn with_heartbeat() -> TestRelay {
    TestRelay::start_with(|c| {
        c.plugins.bundled = vec!["heartbeat".to_owned(), "http-probe".to_owned()];
        c.tasks.watch_interval_ms = 100;
    })
    .await
}

async fn load_script(base: &str) {
    let (status, report, _) =
        wasmrelay_tests::put_plugin(base, "script", SCRIPT, SCRIPT_MANIFEST).await;
    assert_eq!(status, 200, "{report}");
}

/// Sends `body` to `path` with the admin token; the status and JSON.
async fn call(
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = admin_client().request(method, format!("{base}{path}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    call(base, reqwest::Method::POST, path, Some(body)).await
}

/// Waits until task `task` has `count` runs that ended; returns its runs, oldest first.
async fn ended_runs(base: &str, task: &str, count: usize) -> Vec<Value> {
    let url = format!("{base}/admin/tasks/{task}/runs");
    let runs = wait_json(
        &format!("{count} ended runs of {task}"),
        &url,
        Duration::from_secs(30),
        |v| {
            v["runs"].as_array().is_some_and(|runs| {
                runs.iter().filter(|r| r["ended_at_ms"].is_i64()).count() >= count
            })
        },
    )
    .await;
    let mut runs = runs["runs"].as_array().unwrap().clone();
    runs.reverse();
    runs
}

fn states(runs: &[Value]) -> Vec<&str> {
    runs.iter().map(|r| r["state"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_heartbeat_task_defined_over_the_api_runs_publishes_logs_and_exports() {
    let relay = with_heartbeat().await;
    let base = relay.url("");
    let mut watcher = WsTester::greeted(&relay.ws_url()).await.unwrap();
    watcher
        .send(json!({"type": "subscribe", "channel": "tasks/heartbeat"}))
        .await
        .unwrap();
    watcher.recv_type("subscribed").await.unwrap();

    let (status, view) = post(
        &base,
        "/admin/tasks",
        json!({"name": "beat", "plugin": "heartbeat", "schedule": {"every_ms": 200}, "timeout_ms": 5000}),
    )
    .await;
    assert_eq!(status, 201, "{view}");
    assert_eq!(
        view["definition"]["concurrency"], "forbid",
        "defaults filled in"
    );
    assert!(view["next_run_at_ms"].is_i64());

    let beat = watcher.recv_type("message").await.unwrap();
    let beat: Value = serde_json::from_str(beat["data"].as_str().unwrap()).unwrap();
    assert_eq!(beat["task"], "beat");
    // The relay's figures, through the stats capability: at least the watcher.
    assert!(beat["relay"]["connections"].as_u64() >= Some(1), "{beat}");
    assert!(beat["relay"]["channels"].as_u64() >= Some(1), "{beat}");
    assert!(beat["relay"]["uptime_ms"].as_u64() > Some(0), "{beat}");
    let runs = ended_runs(&base, "beat", 2).await;
    assert_eq!(&states(&runs)[..2], ["success", "success"]);
    assert!(runs[0]["outcome"].as_str().unwrap().starts_with("beat "));

    let logs = get_json(&relay.url("/admin/logs?task=beat&level=info"))
        .await
        .unwrap();
    let first = &logs["logs"][0];
    assert_eq!(first["level"], "info");
    assert!(
        first["message"]
            .as_str()
            .unwrap()
            .contains("published to tasks/heartbeat"),
        "{logs}"
    );
    let warnings = get_json(&relay.url("/admin/logs?task=beat&level=warn"))
        .await
        .unwrap();
    assert_eq!(
        warnings["count"], 0,
        "heartbeat logs at info only: {warnings}"
    );

    // Disabled: its schedule stops; enabled again: it goes on.
    let (status, view) = post(&base, "/admin/tasks/beat/toggle", json!({})).await;
    assert_eq!(
        (status, view["state"].as_str()),
        (200, Some("disabled")),
        "{view}"
    );
    assert!(view["next_run_at_ms"].is_null());
    let stats = get_json(&relay.url("/admin/stats")).await.unwrap();
    assert_eq!(stats["tasks"]["total"], 1, "{stats}");
    assert_eq!(stats["tasks"]["disabled"], 1, "{stats}");
    assert!(stats["tasks"]["runs_succeeded"].as_u64().unwrap() >= 2);
    post(&base, "/admin/tasks/beat/enable", json!({})).await;

    // Exports parse, as JSON and as CSV.
    let exported = get_json(&relay.url("/admin/export/runs?format=json&task=beat"))
        .await
        .unwrap();
    assert!(exported.as_array().unwrap().len() >= 2);
    for what in ["tasks", "runs", "logs"] {
        let response = admin_client()
            .get(relay.url(&format!("/admin/export/{what}?format=csv")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/csv"),
            "{what}"
        );
        let text = response.text().await.unwrap();
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let header = reader.headers().unwrap().clone();
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert!(!rows.is_empty(), "{what} has rows: {text}");
        assert!(rows.iter().all(|row| row.len() == header.len()));
        let column = |name: &str| {
            header
                .iter()
                .position(|h| h == name)
                .unwrap_or_else(|| panic!("{what} has {name}: {header:?}"))
        };
        match what {
            "tasks" => assert_eq!(&rows[0][column("name")], "beat"),
            "runs" => assert_eq!(&rows[0][column("task")], "beat"),
            _ => assert!(rows[0][column("message")].contains("published")),
        }
    }
    let (status, deleted) = call(&base, reqwest::Method::DELETE, "/admin/tasks/beat", None).await;
    assert_eq!(status, 200, "{deleted}");
    let (status, _) = call(&base, reqwest::Method::GET, "/admin/tasks/beat", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn http_probe_passes_a_healthy_url_and_fails_the_run_on_a_bad_status() {
    let relay = with_heartbeat().await;
    let base = relay.url("");
    let healthz = relay.url("/healthz");
    let (status, view) = post(
        &base,
        "/admin/tasks",
        json!({"name": "up", "plugin": "http-probe", "config": {"urls": [healthz], "contains": "ok"}}),
    )
    .await;
    assert_eq!(status, 201, "{view}");
    post(&base, "/admin/tasks/up/run", json!({})).await;
    let runs = ended_runs(&base, "up", 1).await;
    assert_eq!(states(&runs), ["success"], "{runs:?}");
    assert_eq!(runs[0]["outcome"], "1 of 1 ok");

    let missing = relay.url("/no-such-page");
    post(
        &base,
        "/admin/tasks",
        json!({"name": "down", "plugin": "http-probe", "retries": 1, "retry_delay_ms": 50,
               "config": {"urls": [healthz, missing]}}),
    )
    .await;
    post(&base, "/admin/tasks/down/run", json!({})).await;
    let runs = ended_runs(&base, "down", 2).await;
    assert_eq!(
        states(&runs),
        ["failed", "failed"],
        "retried, failed again: {runs:?}"
    );
    let outcome = runs[0]["outcome"].as_str().unwrap();
    assert!(
        outcome.starts_with("1 of 2 failed") && outcome.contains("/no-such-page answered 404"),
        "{outcome}"
    );
    let warnings = get_json(&relay.url(&format!(
        "/admin/logs?task=down&level=warn&run={}",
        runs[0]["id"]
    )))
    .await
    .unwrap();
    assert_eq!(warnings["count"], 1, "one warning per bad URL: {warnings}");
}

#[tokio::test]
async fn bad_definitions_and_verbs_get_json_errors_that_name_the_field() {
    let relay = with_heartbeat().await;
    let base = relay.url("");
    let refused = |body: Value| {
        let base = base.clone();
        async move { post(&base, "/admin/tasks", body).await }
    };
    for (body, field) in [
        (
            json!({"name": "a", "plugin": "heartbeat", "schedule": {"cron": "61 * * * *"}}),
            "schedule.cron",
        ),
        (
            json!({"name": "a", "plugin": "heartbeat", "schedule": {"cron": "* * * * *", "tz": "Mars/Base"}}),
            "schedule.tz",
        ),
        (
            json!({"name": "a", "plugin": "heartbeat", "timeout_ms": 0}),
            "timeout_ms",
        ),
        (json!({"name": "a", "plugin": "nope"}), "plugin"),
        (
            json!({"name": "a", "plugin": "heartbeat", "colour": "red"}),
            "colour",
        ),
        (json!({"name": "42", "plugin": "heartbeat"}), "name"),
    ] {
        let (status, error) = refused(body.clone()).await;
        assert_eq!(status, 400, "{body} -> {error}");
        assert_eq!(error["error"]["code"], "invalid_task", "{error}");
        assert_eq!(error["error"]["field"], field, "{body} -> {error}");
    }
    let (status, _) = refused(json!({"name": "once", "plugin": "heartbeat"})).await;
    assert_eq!(status, 201);
    let (status, error) = refused(json!({"name": "once", "plugin": "heartbeat"})).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (409, Some("task_exists"))
    );
    let (status, error) = post(&base, "/admin/tasks/missing/run", json!({})).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (404, Some("not_found"))
    );

    // A batch reports per id; the unknown one does not stop the rest.
    let (status, report) = post(
        &base,
        "/admin/tasks/batch/run",
        json!({"ids": ["once", "missing"]}),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["results"][0]["ok"], true, "{report}");
    assert_eq!(
        report["results"][1]["error"]["code"], "not_found",
        "{report}"
    );

    // Validation says when a definition would fire, without saving it.
    let (status, checked) = post(
        &base,
        "/admin/config/validate",
        json!({"name": "x", "plugin": "heartbeat", "schedule": {"cron": "0 0 * * * *"}}),
    )
    .await;
    assert_eq!(status, 200, "{checked}");
    assert_eq!(checked["next_runs_at_ms"].as_array().unwrap().len(), 5);
    let toml = admin_client()
        .post(relay.url("/admin/config/validate"))
        .body("name = \"x\"\nplugin = \"heartbeat\"\nschedule = { every_ms = 10 }\n")
        .send()
        .await
        .unwrap();
    assert_eq!(toml.status(), 400);
    let error: Value = toml.json().await.unwrap();
    assert_eq!(error["error"]["field"], "schedule.every_ms", "{error}");
    let (status, _) = call(&base, reqwest::Method::GET, "/admin/tasks/x", None).await;
    assert_eq!(status, 404, "validation saves nothing");

    // Without the token: nothing.
    let anonymous = reqwest::get(relay.url("/admin/tasks")).await.unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn real_wasm_is_stopped_at_its_timeout_retried_and_never_run_twice_under_forbid() {
    let relay = with_heartbeat().await;
    let base = relay.url("");
    load_script(&base).await;
    let (status, view) = post(
        &base,
        "/admin/tasks",
        json!({"name": "spin", "plugin": "script", "timeout_ms": 300, "retries": 1, "retry_delay_ms": 100,
               "concurrency": "forbid", "config": {"mode": "loop"}}),
    )
    .await;
    assert_eq!(status, 201, "{view}");
    let (status, started) = post(&base, "/admin/tasks/spin/run", json!({})).await;
    assert_eq!(status, 200, "{started}");
    // While it spins, a second run is refused, not started.
    let (status, busy) = post(&base, "/admin/tasks/spin/run", json!({})).await;
    assert_eq!(
        (status, busy["error"]["code"].as_str()),
        (409, Some("task_busy")),
        "{busy}"
    );
    let runs = ended_runs(&base, "spin", 2).await;
    assert_eq!(states(&runs), ["timed_out", "timed_out"], "{runs:?}");
    assert_eq!(runs[1]["attempt"], 2, "retried once");
    for run in &runs {
        let took = run["duration_ms"].as_i64().unwrap();
        assert!(took >= 300, "not stopped before its timeout: {took} ms");
        assert_eq!(run["outcome"], "stopped at its 300 ms timeout");
    }
    // The relay is unharmed: the same plugin runs a good script at once.
    post(
        &base,
        "/admin/tasks",
        json!({"name": "flaky", "plugin": "script", "retries": 3, "retry_delay_ms": 50,
                                        "config": {"mode": "fail", "until_attempt": 3}}),
    )
    .await;
    post(&base, "/admin/tasks/flaky/run", json!({})).await;
    let runs = ended_runs(&base, "flaky", 3).await;
    assert_eq!(states(&runs), ["failed", "failed", "success"], "{runs:?}");
    assert_eq!(runs[0]["outcome"], "attempt 1 fails on purpose");
    let stats = get_json(&relay.url("/admin/stats")).await.unwrap();
    assert_eq!(stats["tasks"]["runs_timed_out"], 2, "{stats}");
}

/// Follows the live feed of `task` with the token as a browser offers it.
async fn follow(
    relay: &TestRelay,
    query: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("ws://{}/admin/tasks/events?{query}", relay.addr);
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("wasmrelay-admin, bearer.{TEST_ADMIN_TOKEN}")
            .parse()
            .unwrap(),
    );
    let (feed, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "wasmrelay-admin"
    );
    feed
}

#[tokio::test]
async fn the_live_feed_tells_run_changes_and_log_lines_in_order() {
    let relay = with_heartbeat().await;
    let base = relay.url("");
    load_script(&base).await;
    post(
        &base,
        "/admin/tasks",
        json!({"name": "chatty", "plugin": "script", "config": {"mode": "log", "lines": 20}}),
    )
    .await;
    post(
        &base,
        "/admin/tasks",
        json!({"name": "quiet", "plugin": "script"}),
    )
    .await;
    let mut feed = follow(&relay, "task=chatty").await;
    // Without a token the feed is refused before any upgrade.
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{}/admin/tasks/events", relay.addr)).await;
    assert!(refused.is_err(), "an anonymous follower is refused");

    post(&base, "/admin/tasks/quiet/run", json!({})).await;
    let (_, started) = post(&base, "/admin/tasks/chatty/run", json!({})).await;
    let run = started["run"].as_i64().unwrap();
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("success") {
        let frame = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .expect("the feed goes on")
            .unwrap()
            .unwrap();
        let Message::Text(text) = frame else { continue };
        let event: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(event["task"], "chatty", "filtered to one task: {event}");
        assert_eq!(event["run"], run, "{event}");
        seen.push(match event["type"].as_str().unwrap() {
            "run" => event["state"].as_str().unwrap().to_owned(),
            "log" => format!(
                "{} {}",
                event["level"].as_str().unwrap(),
                event["message"].as_str().unwrap()
            ),
            other => panic!("unexpected {other}"),
        });
    }
    let mut expected = vec!["running".to_owned()];
    expected.extend((1..=20).map(|n| format!("info line {n}")));
    expected.push("warn done logging".to_owned());
    expected.push("success".to_owned());
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_task_file_is_applied_a_broken_edit_refused_and_removal_deletes_it() {
    let relay = with_heartbeat().await;
    let base = relay.url("");
    let folder = relay.data_dir().join("tasks");
    std::fs::create_dir_all(&folder).unwrap();
    let file = folder.join("pulse.toml");
    std::fs::write(
        &file,
        "plugin = \"heartbeat\"\nschedule = { every_ms = 200 }\n",
    )
    .unwrap();
    let view = wait_json(
        "the file's task",
        &relay.url("/admin/tasks/pulse"),
        Duration::from_secs(10),
        |v| v["origin"] == "file",
    )
    .await;
    assert_eq!(view["definition"]["schedule"]["every_ms"], 200);
    // Edited: a new interval.
    std::fs::write(
        &file,
        "plugin = \"heartbeat\"\nschedule = { every_ms = 300 }\n# edited\n",
    )
    .unwrap();
    wait_json(
        "the edit",
        &relay.url("/admin/tasks/pulse"),
        Duration::from_secs(10),
        |v| v["definition"]["schedule"]["every_ms"] == 300,
    )
    .await;
    // Broken: refused by name and field; the task keeps running as it was.
    std::fs::write(
        &file,
        "plugin = \"heartbeat\"\nschedule = { cron = \"every day\" }\n",
    )
    .unwrap();
    let list = wait_json(
        "the refusal",
        &relay.url("/admin/tasks"),
        Duration::from_secs(10),
        |v| v["refused_files"].as_array().is_some_and(|r| !r.is_empty()),
    )
    .await;
    assert_eq!(list["refused_files"][0]["file"], "pulse.toml", "{list}");
    assert_eq!(list["refused_files"][0]["field"], "schedule.cron", "{list}");
    assert_eq!(list["tasks"][0]["definition"]["schedule"]["every_ms"], 300);
    let before = ended_runs(&base, "pulse", 1).await.len();
    ended_runs(&base, "pulse", before + 2).await;
    // The API may not change what a file defines.
    let (status, error) = call(&base, reqwest::Method::DELETE, "/admin/tasks/pulse", None).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (409, Some("task_from_file"))
    );
    std::fs::remove_file(&file).unwrap();
    wait_json(
        "the task gone",
        &relay.url("/admin/tasks"),
        Duration::from_secs(10),
        |v| v["count"] == 0 && v["refused_files"].as_array().is_some_and(Vec::is_empty),
    )
    .await;
}

#[tokio::test]
async fn tasks_and_history_survive_a_restart_and_a_kill_interrupts_the_open_run() {
    let relay = RelayProcess::start(RELAY, &[]).await;
    let base = relay.url("");
    load_script(&base).await;
    let (status, view) = post(
        &base,
        "/admin/tasks",
        json!({"name": "spin", "plugin": "script", "schedule": {"every_ms": 1000}, "timeout_ms": 60000,
               "concurrency": "forbid", "config": {"mode": "loop"}}),
    )
    .await;
    assert_eq!(status, 201, "{view}");
    post(
        &base,
        "/admin/tasks",
        json!({"name": "done", "plugin": "script"}),
    )
    .await;
    post(&base, "/admin/tasks/done/run", json!({})).await;
    ended_runs(&base, "done", 1).await;
    let running = wait_json(
        "a run going",
        &relay.url("/admin/tasks/spin"),
        Duration::from_secs(10),
        |v| v["active"][0]["state"] == "running",
    )
    .await;
    let interrupted = running["active"][0]["run"].as_i64().unwrap();

    // kill -9 in the middle of the run.
    let relay = relay.restart().await;
    let runs = wait_json(
        "the next slot's run",
        &relay.url("/admin/tasks/spin/runs"),
        Duration::from_secs(15),
        |v| {
            v["runs"]
                .as_array()
                .is_some_and(|runs| runs.iter().any(|r| r["state"] == "running"))
        },
    )
    .await;
    let mut runs = runs["runs"].as_array().unwrap().clone();
    runs.reverse();
    let old = runs
        .iter()
        .find(|r| r["id"] == interrupted)
        .expect("the killed run is kept");
    assert_eq!(
        (old["state"].as_str(), old["outcome"].as_str()),
        (Some("failed"), Some("interrupted"))
    );
    let after: Vec<&Value> = runs
        .iter()
        .filter(|r| r["id"].as_i64() > Some(interrupted))
        .collect();
    let started: Vec<&&Value> = after.iter().filter(|r| r["state"] != "skipped").collect();
    assert_eq!(started.len(), 1, "the next slot fires once: {after:?}");
    // The plugin upload, the other task and its history are all back.
    let done = get_json(&relay.url("/admin/tasks/done/runs"))
        .await
        .unwrap();
    assert_eq!(done["runs"][0]["state"], "success", "{done}");

    // A graceful stop cancels the open run; the restart keeps it all.
    let relay = relay.restart_gracefully().await;
    let runs = get_json(&relay.url("/admin/tasks/spin/runs"))
        .await
        .unwrap();
    let cancelled = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["state"] == "cancelled")
        .unwrap_or_else(|| panic!("the stop cancelled the run: {runs}"));
    assert_eq!(cancelled["outcome"], "the relay is shutting down");
    let list = get_json(&relay.url("/admin/tasks")).await.unwrap();
    assert_eq!(list["count"], 2, "{list}");
}

#[tokio::test]
async fn a_task_plugin_puts_a_file_and_offers_it_to_a_user() {
    use wasmrelay_client::{Client, Encoding, Msg, Options};
    let relay =
        TestRelay::start_with(|c| c.plugins.bundled = vec!["tiered-policy".to_owned()]).await;
    let base = relay.url("");
    load_script(&base).await;
    let (status, view) = post(
        &base,
        "/admin/tasks",
        json!({"name": "report", "plugin": "script",
               "config": {"mode": "push", "name": "daily.txt", "text": "all quiet", "to_user": "bob"}}),
    )
    .await;
    assert_eq!(status, 201, "{view}");
    let (status, run) = post(&base, "/admin/tasks/report/run", json!({})).await;
    assert!(status < 300, "{run}");
    let runs = ended_runs(&base, "report", 1).await;
    assert_eq!(states(&runs), ["success"], "{runs:?}");
    let outcome = runs[0]["outcome"].as_str().unwrap().to_owned();
    let offer = outcome.rsplit(' ').next().unwrap().to_owned();

    // bob connects and is told; the file is the task's.
    let options = Options::named("bob")
        .token(Some("normal-demo-token"))
        .encoding(Encoding::Binary);
    let mut bob = Client::connect(&relay.ws_url(), options).await.unwrap();
    let told = tokio::time::timeout(Duration::from_secs(10), bob.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Msg::FileOffer {
        offer: told,
        file,
        name,
        from,
        size,
        ..
    } = told
    else {
        panic!("expected file_offer, got {told:?}")
    };
    assert_eq!(
        (told.as_str(), name.as_str(), from.as_str()),
        (offer.as_str(), "daily.txt", "task:script")
    );
    assert_eq!(size, "all quiet".len() as u64);
    let body = reqwest::Client::new()
        .get(relay.url(&format!("/files/{file}?offer={offer}")))
        .bearer_auth("normal-demo-token")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "all quiet");
    bob.close().await.unwrap();
    relay.stop().await.unwrap();
}
