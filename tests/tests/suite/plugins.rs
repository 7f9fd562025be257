//! Plugins against a real relay: the bundled router, policy and filter doing
//! their jobs; loading, swapping, rolling back and removing through the admin
//! API, the CLI and the watched folder; and every kind of bad plugin refused
//! or contained while the previous version keeps serving.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmrelay::plugin::bundled;
use wasmrelay_tests::{TEST_ADMIN_TOKEN, TestRelay, WsTester, admin_client, get_json, wait_json};

const EVIL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/evil-filter.wasm"));
const FETCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fetch-filter.wasm"));
const FUTURE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/future-filter.wasm"));
const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");

fn evil_manifest(version: &str, extra: &str) -> String {
    format!(
        "name = \"evil\"\nversion = \"{version}\"\nrole = \"filter\"\ncapabilities = [\"log\", \"kv\"]\nchannels = [\"evil/*\"]\n[limits]\nmemory_bytes = 4194304\ncall_timeout_ms = 50\n{extra}"
    )
}

/// PUTs a plugin through the admin API; returns the status and JSON body.
async fn put_plugin(relay: &TestRelay, name: &str, wasm: &[u8], manifest: &str) -> (u16, Value) {
    let (status, body, _) = wasmrelay_tests::put_plugin(&relay.url(""), name, wasm, manifest).await;
    (status, body)
}

async fn subscribed(relay: &TestRelay, channel: &str) -> WsTester {
    subscribed_at(&relay.ws_url(), channel).await
}

/// A greeted client at `url`, subscribed to `channel`.
async fn subscribed_at(url: &str, channel: &str) -> WsTester {
    let mut client = WsTester::greeted(url).await.unwrap();
    client
        .send(json!({"type": "subscribe", "channel": channel}))
        .await
        .unwrap();
    client.recv_type("subscribed").await.unwrap();
    client
}

/// Publishes `data` and returns the ack or the error.
async fn publish(client: &mut WsTester, channel: &str, data: &str) -> Value {
    client
        .send(json!({"type": "publish", "channel": channel, "id": "p", "data": data}))
        .await
        .unwrap();
    loop {
        let msg = client.recv().await.unwrap();
        if msg["type"] == "ack" || msg["type"] == "error" {
            return msg;
        }
    }
}

async fn plugin_info(relay: &TestRelay, name: &str) -> Value {
    get_json(&relay.url(&format!("/admin/plugins/{name}")))
        .await
        .unwrap()
}

#[tokio::test]
async fn bundled_router_policy_and_filter_do_their_jobs() {
    let relay = TestRelay::start_with(|c| {
        c.plugins.bundled = bundled::BUNDLED.iter().map(|b| b.name.to_owned()).collect();
    })
    .await;
    let list = get_json(&relay.url("/admin/plugins")).await.unwrap();
    let roles: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        roles,
        [
            ("heartbeat", "task"),
            ("http-probe", "task"),
            ("path-router", "router"),
            ("stamp-filter", "filter"),
            ("tiered-policy", "policy")
        ]
    );

    // Policy: a token names the user and tier; an unknown token is refused
    // before the upgrade; no token makes a guest.
    let (mut vip, _) =
        tokio_tungstenite::connect_async(format!("{}?token=vip-demo-token", relay.ws_url()))
            .await
            .unwrap();
    use futures_util::SinkExt;
    vip.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"type": "hello", "v": 1}).to_string().into(),
    ))
    .await
    .unwrap();
    let refused = tokio_tungstenite::connect_async(format!("{}?token=nope", relay.ws_url())).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "unauthorized");
        }
        other => panic!("expected a 401 refusal, got {other:?}"),
    }
    let mut guest = WsTester::greeted(&relay.ws_url()).await.unwrap();
    let table = get_json(&relay.url("/admin/connections")).await.unwrap();
    let rows = table["connections"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["user"] == "alice" && r["tier"] == "vip"),
        "{table}"
    );
    assert!(
        rows.iter()
            .any(|r| r["user"] == "anon:127.0.0.1" && r["tier"] == "guest"),
        "{table}"
    );

    // Router: reserved channels are refused, legacy ones rewritten, spaces aliased.
    let err = publish(&mut guest, "relay/internal", "x").await;
    assert_eq!(err["code"], "rejected", "{err}");
    let mut chat = subscribed(&relay, "chat/room").await;
    let ack = publish(&mut guest, "legacy/room", "old name").await;
    assert_eq!(ack["channel"], "chat/room", "{ack}");
    assert_eq!(chat.recv_type("message").await.unwrap()["data"], "old name");
    let mut instance = WsTester::greeted(&format!("{}?token=service-demo-token", relay.ws_url()))
        .await
        .unwrap();
    instance
        .send(json!({"type": "register", "space": "demo"}))
        .await
        .unwrap();
    instance.recv_type("registered").await.unwrap();
    guest
        .send(json!({"type": "request", "id": "r", "space": "echo", "data": "via alias"}))
        .await
        .unwrap();
    let forwarded = instance.recv_type("request").await.unwrap();
    assert_eq!(forwarded["space"], "demo");

    // Filter: stamped channels carry the plugin's version; blocked words are dropped.
    let mut stamped = subscribed(&relay, "stamped/news").await;
    publish(&mut guest, "stamped/news", "hello").await;
    assert_eq!(
        stamped.recv_type("message").await.unwrap()["data"],
        "[stamp-filter@1.0.0] hello"
    );
    let err = publish(&mut guest, "stamped/news", "this is forbidden").await;
    assert_eq!(err["code"], "rejected");
    assert!(
        err["message"].as_str().unwrap().contains("blocked word"),
        "{err}"
    );
    let info = plugin_info(&relay, "stamp-filter").await;
    assert!(info["calls"].as_u64().unwrap() >= 2);
    assert!(info["call_time"]["p50_us"].as_f64().unwrap() > 0.0);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn bad_plugins_are_refused_and_the_previous_version_keeps_serving() {
    let relay = TestRelay::start().await;
    let (status, report) = put_plugin(&relay, "evil", EVIL, &evil_manifest("1.0.0", "")).await;
    assert_eq!(status, 200, "{report}");
    let mut client = subscribed(&relay, "evil/x").await;

    let path_router = bundled::find("path-router").unwrap();
    let cases: Vec<(&str, Vec<u8>, String, u16, &str)> = vec![
        (
            "not wasm",
            b"hello, I am not wasm".to_vec(),
            evil_manifest("2.0.0", ""),
            422,
            "not a WebAssembly file",
        ),
        (
            "core module",
            b"\0asm\x01\0\0\0".to_vec(),
            evil_manifest("2.0.0", ""),
            422,
            "core WebAssembly module",
        ),
        (
            "wrong world",
            path_router.wasm.to_vec(),
            evil_manifest("2.0.0", ""),
            422,
            "does not implement the `filter` world",
        ),
        (
            "future WIT",
            FUTURE.to_vec(),
            evil_manifest("2.0.0", ""),
            422,
            "wasmrelay:plugin@0.2.0",
        ),
        (
            "ungranted capability",
            EVIL.to_vec(),
            evil_manifest("2.0.0", "").replace(
                "capabilities = [\"log\", \"kv\"]",
                "capabilities = [\"log\"]",
            ),
            422,
            "imports `wasmrelay:plugin/kv@0.1.0`, a capability its manifest does not grant",
        ),
        (
            "init fails",
            EVIL.to_vec(),
            evil_manifest("2.0.0", "[config]\nfail_init = true\n"),
            422,
            "configured to fail init",
        ),
        (
            "self-check fails",
            EVIL.to_vec(),
            evil_manifest("2.0.0", "[config]\nfail_self_check = true\n"),
            422,
            "self-check failed",
        ),
        (
            "bad manifest",
            EVIL.to_vec(),
            "name = \"evil\"\nrole = \"filter\"\n".to_owned(),
            422,
            "version",
        ),
        (
            "name mismatch",
            EVIL.to_vec(),
            evil_manifest("2.0.0", "").replace("name = \"evil\"", "name = \"other\""),
            422,
            "being loaded as \"evil\"",
        ),
    ];
    for (case, wasm, manifest, expected_status, expected_text) in cases {
        let (status, body) = put_plugin(&relay, "evil", &wasm, &manifest).await;
        assert_eq!(status, expected_status, "{case}: {body}");
        assert_eq!(body["error"]["code"], "plugin_refused", "{case}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected_text), "{case}: {message}");
        // Still version 1, still serving.
        let info = plugin_info(&relay, "evil").await;
        assert_eq!(info["version"], "1.0.0", "{case}");
        let ack = publish(&mut client, "evil/x", case).await;
        assert_eq!(ack["type"], "ack", "{case}: {ack}");
        let msg = client.recv_type("message").await.unwrap();
        assert_eq!(msg["data"], format!("[evil@1.0.0] {case}"));
    }

    // A second router is a conflict while the first holds the role.
    let (status, _) = put_plugin(
        &relay,
        "path-router",
        path_router.wasm,
        path_router.manifest,
    )
    .await;
    assert_eq!(status, 200);
    let other_router = path_router
        .manifest
        .replace("name = \"path-router\"", "name = \"other-router\"");
    let (status, body) = put_plugin(&relay, "other-router", path_router.wasm, &other_router).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("held by plugin \"path-router\"")
    );
    // Upload without the manifest part.
    let response = admin_client()
        .put(relay.url("/admin/plugins/evil"))
        .multipart(
            reqwest::multipart::Form::new()
                .part("wasm", reqwest::multipart::Part::bytes(EVIL.to_vec())),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn traps_loops_and_memory_hogs_fail_one_call_and_nothing_else() {
    let relay = TestRelay::start().await;
    let (status, report) = put_plugin(&relay, "evil", EVIL, &evil_manifest("1.0.0", "")).await;
    assert_eq!(status, 200, "{report}");
    let mut client = subscribed(&relay, "evil/x").await;
    let mut bystander = subscribed(&relay, "plain").await;

    for (input, expected) in [
        ("trap", "trapped"),
        ("loop", "call deadline"),
        ("oom", "memory cap"),
    ] {
        let started = Instant::now();
        let err = publish(&mut client, "evil/x", input).await;
        assert_eq!(err["code"], "plugin_failed", "{input}: {err}");
        let message = err["message"].as_str().unwrap();
        assert!(message.contains("filter plugin evil@1.0.0"), "{message}");
        assert!(message.contains(expected), "{input}: {message}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{input} was contained quickly"
        );
        // The next call gets a fresh instance and works.
        let ack = publish(&mut client, "evil/x", "after").await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(
            client.recv_type("message").await.unwrap()["data"],
            "[evil@1.0.0] after"
        );
        // Everyone else carries on.
        publish(&mut bystander, "plain", "still fine").await;
        assert_eq!(
            bystander.recv_type("message").await.unwrap()["data"],
            "still fine"
        );
    }
    let info = plugin_info(&relay, "evil").await;
    assert_eq!(info["traps"], 3, "{info}");
    assert_eq!(info["timeouts"], 1, "{info}");
    assert_eq!(info["out_of_memory"], 1, "{info}");

    // The kv capability, namespaced to the plugin.
    publish(&mut client, "evil/x", "kv:colour=blue").await;
    assert_eq!(client.recv_type("message").await.unwrap()["data"], "stored");
    publish(&mut client, "evil/x", "kv?colour").await;
    assert_eq!(client.recv_type("message").await.unwrap()["data"], "blue");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn swap_rollback_and_remove() {
    let relay = TestRelay::start().await;
    let mut client = subscribed(&relay, "evil/x").await;
    let stamp_of = |msg: Value| msg["data"].as_str().unwrap().to_owned();

    put_plugin(&relay, "evil", EVIL, &evil_manifest("1.0.0", "")).await;
    publish(&mut client, "evil/x", "a").await;
    assert_eq!(
        stamp_of(client.recv_type("message").await.unwrap()),
        "[evil@1.0.0] a"
    );

    let (status, report) = put_plugin(&relay, "evil", EVIL, &evil_manifest("2.0.0", "")).await;
    assert_eq!(status, 200);
    assert_eq!(report["replaced"], "1.0.0");
    publish(&mut client, "evil/x", "b").await;
    assert_eq!(
        stamp_of(client.recv_type("message").await.unwrap()),
        "[evil@2.0.0] b"
    );
    let info = plugin_info(&relay, "evil").await;
    assert_eq!(info["previous"]["version"], "1.0.0");

    let response = admin_client()
        .post(relay.url("/admin/plugins/evil/rollback"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    publish(&mut client, "evil/x", "c").await;
    assert_eq!(
        stamp_of(client.recv_type("message").await.unwrap()),
        "[evil@1.0.0] c"
    );

    let response = admin_client()
        .delete(relay.url("/admin/plugins/evil"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    publish(&mut client, "evil/x", "d").await;
    assert_eq!(stamp_of(client.recv_type("message").await.unwrap()), "d");
    let response = admin_client()
        .get(relay.url("/admin/plugins/evil"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let response = admin_client()
        .post(relay.url("/admin/plugins/evil/rollback"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn the_watched_folder_loads_swaps_and_unloads() {
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path().to_owned();
    let relay = TestRelay::start_with(|c| {
        c.plugins.dir = dir.clone();
        c.plugins.watch_interval_ms = 100;
    })
    .await;
    let mut client = subscribed(&relay, "evil/x").await;
    let plugins_url = relay.url("/admin/plugins/evil");
    std::fs::write(folder.path().join("evil.toml"), evil_manifest("1.0.0", "")).unwrap();
    std::fs::write(folder.path().join("evil.wasm"), EVIL).unwrap();
    let info = wait_json(
        "the folder plugin to load",
        &plugins_url,
        Duration::from_secs(30),
        |p| p["version"] == "1.0.0",
    )
    .await;
    assert_eq!(info["source"], "folder");
    publish(&mut client, "evil/x", "a").await;
    assert_eq!(
        client.recv_type("message").await.unwrap()["data"],
        "[evil@1.0.0] a"
    );

    std::fs::write(folder.path().join("evil.toml"), evil_manifest("1.1.0", "")).unwrap();
    wait_json(
        "the folder plugin to swap",
        &plugins_url,
        Duration::from_secs(30),
        |p| p["version"] == "1.1.0",
    )
    .await;

    // A broken manifest is refused; 1.1.0 keeps serving.
    std::fs::write(folder.path().join("evil.toml"), "this is = not [a manifest").unwrap();
    let refused = wait_json(
        "the folder's broken manifest to be refused",
        &plugins_url,
        Duration::from_secs(30),
        |p| p["folder_refusal"].is_string(),
    )
    .await;
    assert_eq!(refused["version"], "1.1.0");
    assert!(
        refused["folder_refusal"]
            .as_str()
            .unwrap()
            .contains("manifest"),
        "{refused}"
    );

    std::fs::remove_file(folder.path().join("evil.wasm")).unwrap();
    wasmrelay_tests::wait_for(
        "the folder plugin to unload",
        Duration::from_secs(30),
        || async {
            let response = admin_client().get(&plugins_url).send().await.ok()?;
            (response.status() == 404).then_some(())
        },
    )
    .await;
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn the_cli_lists_loads_rolls_back_and_removes() {
    let relay = TestRelay::start().await;
    let folder = tempfile::tempdir().unwrap();
    let wasm = folder.path().join("evil.wasm");
    std::fs::write(&wasm, EVIL).unwrap();
    std::fs::write(folder.path().join("evil.toml"), evil_manifest("1.0.0", "")).unwrap();
    let v2 = folder.path().join("v2.toml");
    std::fs::write(&v2, evil_manifest("2.0.0", "")).unwrap();
    let base = relay.url("");
    let cli = move |args: Vec<String>| {
        let base = base.clone();
        tokio::task::spawn_blocking(move || {
            let output = std::process::Command::new(RELAY)
                .arg("plugin")
                .args(&args)
                .args(["--relay", &base, "--token", TEST_ADMIN_TOKEN])
                .output()
                .unwrap();
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned()
                    + &String::from_utf8_lossy(&output.stderr),
            )
        })
    };
    let wasm_arg = wasm.display().to_string();
    let (ok, out) = cli(vec![
        "load".into(),
        "evil".into(),
        "--wasm".into(),
        wasm_arg.clone(),
    ])
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("evil 1.0.0 serving"), "{out}");
    let (ok, out) = cli(vec![
        "swap".into(),
        "evil".into(),
        "--wasm".into(),
        wasm_arg,
        "--manifest".into(),
        v2.display().to_string(),
    ])
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(
        out.contains("evil 2.0.0 serving (replacing 1.0.0)"),
        "{out}"
    );
    let (ok, out) = cli(vec!["list".into()]).await.unwrap();
    assert!(ok, "{out}");
    let header = out.lines().next().unwrap();
    for column in [
        "Name", "Role", "Version", "Calls", "Traps", "P50-us", "P99-us", "Digest", "Previous",
    ] {
        assert!(header.contains(column), "{header}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("evil") && l.contains("2.0.0") && l.contains("1.0.0")),
        "{out}"
    );
    let (ok, out) = cli(vec!["rollback".into(), "evil".into()]).await.unwrap();
    assert!(ok && out.contains("rolled back to 1.0.0"), "{out}");
    let (ok, out) = cli(vec!["remove".into(), "evil".into()]).await.unwrap();
    assert!(ok && out.contains("evil removed"), "{out}");
    let (ok, out) = cli(vec!["rollback".into(), "evil".into()]).await.unwrap();
    assert!(!ok && out.contains("404"), "{out}");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn compiled_plugins_are_cached_on_disk_by_digest() {
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_owned();
    let relay = TestRelay::start_with(|c| c.plugins.cache_dir = cache_dir.clone()).await;
    let (status, report) = put_plugin(&relay, "evil", EVIL, &evil_manifest("1.0.0", "")).await;
    assert_eq!(status, 200, "{report}");
    let digest = report["digest"].as_str().unwrap().to_owned();
    let entries: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        entries
            .iter()
            .any(|name| name.starts_with(&digest) && name.ends_with(".cwasm")),
        "{entries:?}"
    );
    relay.stop().await.unwrap();

    // A second relay with the same cache loads the compiled code and serves.
    let cache_dir = cache.path().to_owned();
    let relay = TestRelay::start_with(|c| c.plugins.cache_dir = cache_dir.clone()).await;
    let (status, report) = put_plugin(&relay, "evil", EVIL, &evil_manifest("1.0.0", "")).await;
    assert_eq!(status, 200, "{report}");
    let mut client = subscribed(&relay, "evil/x").await;
    publish(&mut client, "evil/x", "cached").await;
    assert_eq!(
        client.recv_type("message").await.unwrap()["data"],
        "[evil@1.0.0] cached"
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn repeated_memory_hogs_leave_the_host_memory_bounded() {
    // A relay process of its own, so its RSS is not mixed with parallel tests.
    let relay = wasmrelay_tests::RelayProcess::start(RELAY, &[]).await;
    let (status, report, _) =
        wasmrelay_tests::put_plugin(&relay.url(""), "evil", EVIL, &evil_manifest("1.0.0", ""))
            .await;
    assert_eq!(status, 200, "{report}");
    // As the demo VIP: a guest's 5 messages a second would throttle the hogs.
    let url = format!("{}?token=vip-demo-token", relay.ws_url());
    let mut client = WsTester::greeted(&url).await.unwrap();
    let rss = || wasmrelay_tests::rss_of(relay.process.pid()).expect("relay RSS");
    // Warm up: the first hog touches its pooled memory slot.
    publish(&mut client, "evil/x", "oom").await;
    let before = rss();
    for _ in 0..25 {
        let err = publish(&mut client, "evil/x", "oom").await;
        assert_eq!(err["code"], "plugin_failed", "{err}");
    }
    let after = rss();
    let growth = after.saturating_sub(before);
    eprintln!(
        "25 memory hogs (4 MiB cap each): relay RSS {} KiB -> {} KiB",
        before / 1024,
        after / 1024
    );
    // Each hog is stopped at its 4 MiB cap and its instance discarded: 25
    // unbounded would be gigabytes, bounded but never freed 100 MiB.
    assert!(
        growth < 16 * 1024 * 1024,
        "relay memory grew by {growth} bytes"
    );
    let info = get_json(&relay.url("/admin/plugins/evil")).await.unwrap();
    assert_eq!(info["out_of_memory"], 26, "{info}");
}

/// A plugin's outbound HTTP waits off the relay's workers: with one worker,
/// another connection is served while a filter's fetch is held open.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_plugins_http_fetch_does_not_hold_up_other_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    let (arrived_tx, arrived) = tokio::sync::oneshot::channel::<()>();
    let (release, release_rx) = tokio::sync::oneshot::channel::<()>();
    // An upstream that answers only when the test says so.
    tokio::spawn(async move {
        let (mut socket, _) = upstream.accept().await.unwrap();
        let mut request = [0u8; 1024];
        let _ = socket.read(&mut request).await.unwrap();
        let _ = arrived_tx.send(());
        let _ = release_rx.await;
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
            .await
            .unwrap();
    });

    let relay = TestRelay::start().await;
    let manifest = format!(
        "name = \"fetch\"\nversion = \"1.0.0\"\nrole = \"filter\"\ncapabilities = [\"http\"]\nchannels = [\"fetch/*\"]\nallow_hosts = [\"127.0.0.1:{port}\"]\n[limits]\ncall_timeout_ms = 10000\n"
    );
    let (status, body) = put_plugin(&relay, "fetch", FETCH, &manifest).await;
    assert_eq!(status, 200, "{body}");
    let mut subscriber = subscribed(&relay, "fetch/upstream").await;
    let mut bystander = WsTester::greeted(&relay.ws_url()).await.unwrap();
    let mut publisher = WsTester::greeted(&relay.ws_url()).await.unwrap();
    let url = format!("fetch:http://127.0.0.1:{port}/");
    let publishing =
        tokio::spawn(async move { publish(&mut publisher, "fetch/upstream", &url).await });

    tokio::time::timeout(Duration::from_secs(10), arrived)
        .await
        .expect("the filter's request reaches the upstream")
        .unwrap();
    // The fetch is held open now; the bystander is still served.
    bystander
        .send(json!({"type": "ping", "id": "during-fetch"}))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(10), bystander.recv_type("pong"))
        .await
        .expect("a pong while a plugin's fetch is in flight")
        .unwrap();
    assert_eq!(pong["id"], "during-fetch");

    release.send(()).unwrap();
    let ack = publishing.await.unwrap();
    assert_eq!(ack["type"], "ack", "{ack}");
    let message = subscriber.recv_type("message").await.unwrap();
    assert_eq!(message["data"], "200 hello", "{message}");
    relay.stop().await.unwrap();
}

/// Loads the evil filter into `relay` and returns a client subscribed to
/// one of its channels.
async fn evil_on(relay: &wasmrelay_tests::RelayProcess) -> WsTester {
    let (status, report, _) =
        wasmrelay_tests::put_plugin(&relay.url(""), "evil", EVIL, &evil_manifest("1.0.0", ""))
            .await;
    assert_eq!(status, 200, "{report}");
    subscribed_at(&relay.ws_url(), "evil/x").await
}

#[tokio::test]
async fn what_a_plugin_stores_survives_a_restart() {
    let relay = wasmrelay_tests::RelayProcess::start(RELAY, &[]).await;
    let mut client = evil_on(&relay).await;
    publish(&mut client, "evil/x", "kv:colour=blue").await;
    assert_eq!(client.recv_type("message").await.unwrap()["data"], "stored");
    drop(client);

    let relay = relay.restart_gracefully().await;
    // The upload is back by itself (see the next test); so is its data.
    let mut client = subscribed_at(&relay.ws_url(), "evil/x").await;
    publish(&mut client, "evil/x", "kv?colour").await;
    assert_eq!(client.recv_type("message").await.unwrap()["data"], "blue");
}

#[tokio::test]
async fn uploaded_plugins_serve_again_after_a_crash_with_their_previous_version() {
    let relay = wasmrelay_tests::RelayProcess::start(RELAY, &[]).await;
    for version in ["1.0.0", "2.0.0"] {
        let (status, report, _) =
            wasmrelay_tests::put_plugin(&relay.url(""), "evil", EVIL, &evil_manifest(version, ""))
                .await;
        assert_eq!(status, 200, "{report}");
    }
    // SIGKILL: an upload is stored before it is answered.
    let relay = relay.restart().await;
    let info = get_json(&relay.url("/admin/plugins/evil")).await.unwrap();
    assert_eq!(info["version"], "2.0.0", "{info}");
    assert_eq!(info["previous"]["version"], "1.0.0", "{info}");
    let mut client = subscribed_at(&relay.ws_url(), "evil/x").await;
    publish(&mut client, "evil/x", "a").await;
    assert_eq!(
        client.recv_type("message").await.unwrap()["data"],
        "[evil@2.0.0] a"
    );

    // A rollback is stored too, and a removal.
    let rolled = admin_client()
        .post(relay.url("/admin/plugins/evil/rollback"))
        .send()
        .await
        .unwrap();
    assert_eq!(rolled.status(), 200);
    let relay = relay.restart().await;
    let info = get_json(&relay.url("/admin/plugins/evil")).await.unwrap();
    assert_eq!(info["version"], "1.0.0", "{info}");
    let removed = admin_client()
        .delete(relay.url("/admin/plugins/evil"))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
    let relay = relay.restart().await;
    let list = get_json(&relay.url("/admin/plugins")).await.unwrap();
    assert!(
        list.as_array().unwrap().iter().all(|p| p["name"] != "evil"),
        "{list}"
    );
}
