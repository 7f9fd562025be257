//! The requirements §1 checklist with real processes: the `wasmrelay` binary,
//! the example `service-app` binary (killed with SIGKILL mid-request), HTTP
//! callers and protocol callers; plus `wasmrelay conns` and SIGTERM handling.
//!
//! The scenarios are written once and run over both transports: the service
//! app and the protocol caller connect over WebSocket in `over_ws` and over
//! QUIC in `over_quic`.

use std::time::{Duration, Instant};

use serde_json::json;
use wasmrelay_tests::{
    ChildProcess, Closed, RelayProcess, TEST_ADMIN_TOKEN, Via, free_port, get_json, wait_for,
    wait_json,
};

const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");
const SERVICE: &str = env!("CARGO_BIN_EXE_test-service-app");

/// Runs each scenario once per transport, as `over_ws::NAME` and `over_quic::NAME`.
macro_rules! over_both_transports {
    ($($scenario:ident),* $(,)?) => {
        mod over_ws {
            $(#[tokio::test]
            async fn $scenario() {
                super::$scenario(wasmrelay_tests::Via::Ws).await
            })*
        }
        mod over_quic {
            $(#[tokio::test]
            async fn $scenario() {
                super::$scenario(wasmrelay_tests::Via::Quic).await
            })*
        }
    };
}

over_both_transports!(
    requirements_1_checklist_with_real_processes,
    service_app_reconnects_when_the_relay_restarts,
    conns_prints_the_connection_table,
    sigterm_drains_and_exits_zero,
    a_stopped_or_vanished_instance_is_dropped_within_seconds,
);

fn start_service(relay: &RelayProcess, via: Via, space: &str, work_ms: u64) -> ChildProcess {
    let work_ms = work_ms.to_string();
    let url = relay.client_url(via);
    let cert = relay.cert_pem().display().to_string();
    let mut args = vec![
        "--relay",
        &url,
        "--space",
        space,
        "--work-ms",
        &work_ms,
        "--steps",
        "2",
        // The demo policy lets only its service tier register.
        "--token",
        "service-demo-token",
    ];
    if via == Via::Quic {
        args.extend(["--ca", &cert]);
    }
    ChildProcess::spawn(SERVICE, &args).unwrap()
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

/// Quick heartbeats, so that over QUIC a killed service is noticed quickly:
/// a process killed with SIGKILL sends nothing over UDP (TCP gets a reset
/// from the kernel), so the relay learns of it at the QUIC idle timeout.
const QUICK_HEARTBEATS: [&str; 4] = ["--heartbeat-ms", "500", "--idle-timeout-ms", "2000"];

async fn requirements_1_checklist_with_real_processes(via: Via) {
    let relay = RelayProcess::start(RELAY, &QUICK_HEARTBEATS).await;
    // The demo space is declared: it shows before any app connects.
    let info = get_json(&relay.url("/spaces/demo")).await.unwrap();
    assert_eq!(info["name"], "demo");
    assert_eq!(info["connected"], false);
    assert_eq!(info["instances"], 0);

    // A service registers.
    let mut service = start_service(&relay, via, "demo", 1_500);
    relay.wait_space("demo", true).await;
    let info = get_json(&relay.url("/spaces/demo")).await.unwrap();
    assert_eq!(info["instances"], 1);

    // Three clients submit at once — two over HTTP, one over the protocol —
    // and each gets its own result.
    let first = tokio::spawn(http_call(relay.url("/spaces/demo/"), "first caller"));
    let second = tokio::spawn(http_call(relay.url("/spaces/demo/"), "second caller"));
    let mut caller = relay.tester(via).await.unwrap();
    caller
        .send(json!({"type": "request", "id": "third", "space": "demo", "data": "third caller"}))
        .await
        .unwrap();
    let progress = caller.recv().await.unwrap();
    assert_eq!(progress["type"], "progress", "{progress}");
    assert_eq!(progress["id"], "third");
    let response = caller.recv_type("response").await.unwrap();
    assert_eq!(response["data"], "THIRD CALLER");
    assert_eq!(first.await.unwrap(), (200, "FIRST CALLER".to_owned()));
    assert_eq!(second.await.unwrap(), (200, "SECOND CALLER".to_owned()));

    // The service is killed mid-request: the space reports not connected and
    // the pending requests fail within one second (over QUIC: within the
    // idle timeout plus that second).
    let pending_http = tokio::spawn(http_call(relay.url("/spaces/demo/"), "doomed"));
    caller
        .send(json!({"type": "request", "id": "doomed", "space": "demo", "data": "x"}))
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
    let err = caller.recv_type("error").await.unwrap();
    assert_eq!(err["code"], "instance_lost");
    assert_eq!(err["id"], "doomed");
    let (status, body) = pending_http.await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("instance_lost"), "{body}");
    let allowed = match via {
        Via::Ws => Duration::from_secs(1),
        Via::Quic => Duration::from_secs(3),
    };
    assert!(
        killed_at.elapsed() < allowed,
        "pending requests failed after {:?}",
        killed_at.elapsed()
    );
    relay.wait_space("demo", false).await;
    let (status, body) = http_call(relay.url("/spaces/demo/"), "nobody home").await;
    assert_eq!(status, 503, "{body}");

    // The service comes back: requests succeed again with no operator action.
    let _service = start_service(&relay, via, "demo", 100);
    relay.wait_space("demo", true).await;
    assert_eq!(
        http_call(relay.url("/spaces/demo/"), "back again").await,
        (200, "BACK AGAIN".to_owned())
    );
}

async fn service_app_reconnects_when_the_relay_restarts(via: Via) {
    let relay = RelayProcess::start(RELAY, &QUICK_HEARTBEATS).await;
    let _service = start_service(&relay, via, "demo", 50);
    relay.wait_space("demo", true).await;

    // Killed and started again on the same ports: the app finds it by itself.
    let relay = relay.restart().await;
    relay.wait_space("demo", true).await;
}

async fn conns_prints_the_connection_table(via: Via) {
    let relay = RelayProcess::start(RELAY, &[]).await;
    let _service = start_service(&relay, via, "demo", 50);
    relay.wait_space("demo", true).await;
    let mut caller = relay.tester(via).await.unwrap();
    caller
        .send(json!({"type": "subscribe", "channel": "lobby"}))
        .await
        .unwrap();
    caller.recv_type("subscribed").await.unwrap();

    let base = relay.url("");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(RELAY)
            .args(["conns", "--relay", &base, "--token", TEST_ADMIN_TOKEN])
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
    let transport = match via {
        Via::Ws => " ws ",
        Via::Quic => " quic ",
    };
    assert!(
        table
            .lines()
            .any(|l| l.contains(" open ") && l.contains(transport)),
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

async fn sigterm_drains_and_exits_zero(via: Via) {
    let mut relay = RelayProcess::start(RELAY, &["--shutdown-grace-ms", "5000"]).await;
    let _service = start_service(&relay, via, "demo", 700);
    relay.wait_space("demo", true).await;
    let mut caller = relay.tester(via).await.unwrap();
    caller
        .send(json!({"type": "request", "id": "last", "space": "demo", "data": "finish me"}))
        .await
        .unwrap();
    caller.recv_type("progress").await.unwrap();

    let terminate = tokio::task::spawn_blocking(move || {
        let status = relay.process.terminate(Duration::from_secs(15));
        (relay, status)
    });
    // In order: goaway, the in-flight response, then the close.
    let goaway = caller.recv_type("goaway").await.unwrap();
    assert!(goaway["reconnect_ms"].as_u64().is_some());
    let response = caller.recv_type("response").await.unwrap();
    assert_eq!(response["data"], "FINISH ME");
    let expected = match via {
        Via::Ws => Closed::Ws(1001),
        Via::Quic => Closed::Quic(0x1),
    };
    assert_eq!(caller.expect_close().await.unwrap(), expected);
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
            ("WASMRELAY_ADMIN_TOKEN", "from-env-0123456789"),
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
        .bearer_auth("from-env-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(authorized.status(), 200);
}

/// Waits for the space to report `instances`; returns how long it took.
async fn instances_become(relay: &RelayProcess, space: &str, instances: u64) -> Duration {
    let started = Instant::now();
    wait_json(
        &format!("space {space} to have {instances} instances"),
        &relay.url(&format!("/spaces/{space}")),
        // Far below the 45 s QUIC idle timeout that used to decide this.
        Duration::from_secs(6),
        |info| info["instances"] == instances,
    )
    .await;
    started.elapsed()
}

async fn a_stopped_or_vanished_instance_is_dropped_within_seconds(via: Via) {
    let relay = RelayProcess::start(RELAY, &[]).await;
    let mut stopped = start_service(&relay, via, "demo", 50);
    let mut vanished = start_service(&relay, via, "demo", 50);
    let survivor = start_service(&relay, via, "demo", 50);
    instances_become(&relay, "demo", 3).await;

    // SIGTERM: the app says goodbye, the relay drops the instance at once.
    let status = stopped.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}");
    let took = instances_become(&relay, "demo", 2).await;
    eprintln!("{via:?}: SIGTERM'd instance gone after {took:?}");

    // SIGKILL: no goodbye. Over QUIC nothing at all reaches the relay; the
    // instance's silence gives it away (limits.instance_idle_timeout_ms).
    vanished.kill();
    let took = instances_become(&relay, "demo", 1).await;
    eprintln!("{via:?}: SIGKILLed instance gone after {took:?}");

    // Callers reach the survivor only; none waits on a dead instance.
    for _ in 0..4 {
        let (status, body) = http_call(relay.url("/spaces/demo/x"), "still served").await;
        assert_eq!((status, body.as_str()), (200, "STILL SERVED"));
    }
    drop(survivor);
}
