//! The requirements §1 checklist with real processes: the `wasmrelay` binary,
//! the example `service-app` binary (killed with SIGKILL mid-request), HTTP
//! and WebSocket callers; plus `wasmrelay conns` and SIGTERM handling.

use std::time::{Duration, Instant};

use serde_json::json;
use wasmrelay_tests::{
    ChildProcess, RelayProcess, WsTester, free_port, get_json, wait_for, wait_json,
};

const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");
const SERVICE: &str = env!("CARGO_BIN_EXE_test-service-app");

fn start_service(relay: &RelayProcess, space: &str, work_ms: u64) -> ChildProcess {
    let work_ms = work_ms.to_string();
    let url = relay.ws_url();
    ChildProcess::spawn(
        SERVICE,
        &[
            "--relay",
            &url,
            "--space",
            space,
            "--work-ms",
            &work_ms,
            "--steps",
            "2",
        ],
    )
    .unwrap()
}

async fn http_call(url: String, body: &'static str) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(url)
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn requirements_1_checklist_with_real_processes() {
    let relay = RelayProcess::start(RELAY, &[]).await;
    // The demo space is declared: it shows before any app connects.
    let info = get_json(&relay.url("/spaces/demo")).await.unwrap();
    assert_eq!(info["name"], "demo");
    assert_eq!(info["connected"], false);
    assert_eq!(info["instances"], 0);

    // A service registers.
    let mut service = start_service(&relay, "demo", 1_500);
    relay.wait_space("demo", true).await;
    let info = get_json(&relay.url("/spaces/demo")).await.unwrap();
    assert_eq!(info["instances"], 1);

    // Three clients submit at once — two over HTTP, one over WebSocket — and
    // each gets its own result.
    let first = tokio::spawn(http_call(relay.url("/spaces/demo/"), "first caller"));
    let second = tokio::spawn(http_call(relay.url("/spaces/demo/"), "second caller"));
    let mut ws = WsTester::greeted(&relay.ws_url()).await.unwrap();
    ws.send(json!({"type": "request", "id": "third", "space": "demo", "data": "third caller"}))
        .await
        .unwrap();
    let progress = ws.recv().await.unwrap();
    assert_eq!(progress["type"], "progress", "{progress}");
    assert_eq!(progress["id"], "third");
    let response = ws.recv_type("response").await.unwrap();
    assert_eq!(response["data"], "THIRD CALLER");
    assert_eq!(first.await.unwrap(), (200, "FIRST CALLER".to_owned()));
    assert_eq!(second.await.unwrap(), (200, "SECOND CALLER".to_owned()));

    // The service is killed mid-request: the space reports not connected and
    // the pending requests fail within one second.
    let pending_http = tokio::spawn(http_call(relay.url("/spaces/demo/"), "doomed"));
    ws.send(json!({"type": "request", "id": "doomed", "space": "demo", "data": "x"}))
        .await
        .unwrap();
    wait_json(
        "both requests in flight",
        &relay.url("/spaces/demo"),
        Duration::from_secs(5),
        |info| info["in_flight"] == 2,
    )
    .await;
    let killed_at = Instant::now();
    service.kill();
    let err = ws.recv_type("error").await.unwrap();
    assert_eq!(err["code"], "instance_lost");
    assert_eq!(err["id"], "doomed");
    let (status, body) = pending_http.await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("instance_lost"), "{body}");
    assert!(
        killed_at.elapsed() < Duration::from_secs(1),
        "pending requests failed after {:?}",
        killed_at.elapsed()
    );
    relay.wait_space("demo", false).await;
    let (status, body) = http_call(relay.url("/spaces/demo/"), "nobody home").await;
    assert_eq!(status, 503, "{body}");

    // The service comes back: requests succeed again with no operator action.
    let _service = start_service(&relay, "demo", 100);
    relay.wait_space("demo", true).await;
    assert_eq!(
        http_call(relay.url("/spaces/demo/"), "back again").await,
        (200, "BACK AGAIN".to_owned())
    );
}

#[tokio::test]
async fn service_app_reconnects_when_the_relay_restarts() {
    let first = RelayProcess::start(RELAY, &[]).await;
    let port = first.port;
    let _service = start_service(&first, "demo", 50);
    first.wait_space("demo", true).await;
    drop(first);

    // A new relay on the same port: the app finds it by itself.
    let second = RelayProcess::start_on(RELAY, port, &[]).await;
    second.wait_space("demo", true).await;
}

#[tokio::test]
async fn conns_prints_the_connection_table() {
    let relay = RelayProcess::start(RELAY, &["--admin-token", "s3cret"]).await;
    let _service = start_service(&relay, "demo", 50);
    relay.wait_space("demo", true).await;
    let mut ws = WsTester::greeted(&relay.ws_url()).await.unwrap();
    ws.send(json!({"type": "subscribe", "channel": "lobby"}))
        .await
        .unwrap();
    ws.recv_type("subscribed").await.unwrap();

    let base = relay.url("");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(RELAY)
            .args(["conns", "--relay", &base, "--token", "s3cret"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let header = table.lines().next().unwrap();
    for column in [
        "State",
        "Transport",
        "Local",
        "Peer",
        "Age",
        "Recv-B",
        "Send-B",
        "Queue",
    ] {
        assert!(header.contains(column), "missing {column}: {header}");
    }
    assert!(table.contains("space:demo"), "{table}");
    assert!(table.contains("#lobby"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains(" open ") && l.contains(" ws ")),
        "{table}"
    );
    assert!(table.contains("Total:"), "{table}");

    // Without the token the admin endpoints refuse, and so does the command.
    let base = relay.url("");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(RELAY)
            .args(["conns", "--relay", &base])
            .env_remove("WASMRELAY_ADMIN_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("401"));
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let mut relay = RelayProcess::start(RELAY, &["--shutdown-grace-ms", "5000"]).await;
    let _service = start_service(&relay, "demo", 700);
    relay.wait_space("demo", true).await;
    let mut ws = WsTester::greeted(&relay.ws_url()).await.unwrap();
    ws.send(json!({"type": "request", "id": "last", "space": "demo", "data": "finish me"}))
        .await
        .unwrap();
    ws.recv_type("progress").await.unwrap();

    let terminate = tokio::task::spawn_blocking(move || {
        let status = relay.process.terminate(Duration::from_secs(15));
        (relay, status)
    });
    // In order: goaway, the in-flight response, then close 1001.
    let goaway = ws.recv_type("goaway").await.unwrap();
    assert!(goaway["reconnect_ms"].as_u64().is_some());
    let response = ws.recv_type("response").await.unwrap();
    assert_eq!(response["data"], "FINISH ME");
    let close = ws.expect_close().await.unwrap().expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
    let (_relay, status) = terminate.await.unwrap();
    let status = status.unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn invalid_config_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[heartbeat]\ninterval_ms = 5000\nidle_timeout_ms = 1000\n",
    )
    .unwrap();
    let output = std::process::Command::new(RELAY)
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("heartbeat.idle_timeout_ms"), "{stderr}");

    std::fs::write(&path, "[limits]\nmax_message_byte = 5\n").unwrap();
    let output = std::process::Command::new(RELAY)
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_message_byte"), "{stderr}");
}

#[tokio::test]
async fn environment_variables_configure_serve() {
    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _relay = ChildProcess::spawn_with_env(
        RELAY,
        &["serve"],
        &[
            ("WASMRELAY_LISTEN", &listen),
            ("WASMRELAY_DATA_DIR", data_dir.path().to_str().unwrap()),
            ("WASMRELAY_ADMIN_TOKEN", "from-env"),
            ("WASMRELAY_QUIC_LISTEN", "127.0.0.1:0"),
            ("WASMRELAY_TLS_LISTEN", "127.0.0.1:0"),
        ],
    )
    .unwrap();
    let stats = format!("http://{listen}/admin/stats");
    let status = wait_for(
        "the relay to listen on WASMRELAY_LISTEN",
        Duration::from_secs(10),
        || {
            let stats = stats.clone();
            async move { Some(reqwest::get(&stats).await.ok()?.status()) }
        },
    )
    .await;
    assert_eq!(
        status, 401,
        "WASMRELAY_ADMIN_TOKEN guards the admin endpoints"
    );
    let authorized = reqwest::Client::new()
        .get(&stats)
        .bearer_auth("from-env")
        .send()
        .await
        .unwrap();
    assert_eq!(authorized.status(), 200);
}
