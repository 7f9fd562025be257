//! Secure defaults, each test an attack that used to work against a default
//! relay: the operator API without a credential, a guest taking over a
//! space, a caller's credentials reaching an instance that did not ask for
//! them, connections that never finish their headers, churn that pushes a
//! bystander off its channel.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use wasmrelay_tests::{
    ChildProcess, TestRelay, WsTester, free_port, get_json, wait_for, wait_healthy,
};

const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");

/// Runs the `wasmrelay` CLI with `args`; returns success and all it printed.
async fn cli(args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(RELAY)
            .args(&args)
            .output()
            .expect("run the CLI");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    })
    .await
    .expect("CLI thread")
}

/// A relay started as `wasmrelay serve` with nothing about admin configured,
/// on `host` (loopback or every interface); only loopback is ever dialled.
async fn default_relay(host: &str) -> (ChildProcess, String, tempfile::TempDir) {
    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let relay = ChildProcess::spawn(
        RELAY,
        &[
            "serve",
            "--listen",
            &format!("{host}:{port}"),
            "--data-dir",
            data_dir.path().to_str().unwrap(),
            "--no-quic",
            "--no-tls",
        ],
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base, Duration::from_secs(60)).await;
    (relay, base, data_dir)
}

#[tokio::test]
async fn operator_endpoints_refuse_anonymous_callers_on_loopback_and_on_every_interface() {
    for host in ["127.0.0.1", "0.0.0.0"] {
        let (_relay, base, data_dir) = default_relay(host).await;
        let token_file = data_dir.path().join("admin.token");
        let token = std::fs::read_to_string(&token_file).unwrap();
        let token = token.trim();
        assert_eq!(token.len(), 64, "32 random bytes in hex");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the token file is owner-only");
        }

        let client = reqwest::Client::new();
        for path in [
            "/admin/connections",
            "/admin/stats",
            "/admin/plugins",
            "/admin/plugins/tiered-policy",
            "/metrics",
        ] {
            let response = client.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(response.status(), 401, "GET {path} on {host}");
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized");
        }
        // The attacks: unload the rate policy, install a plugin.
        let response = client
            .delete(format!("{base}/admin/plugins/tiered-policy"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "DELETE on {host}");
        let response = client
            .put(format!("{base}/admin/plugins/grabber"))
            .body("not even multipart")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "PUT on {host}");
        let response = client
            .post(format!("{base}/admin/plugins/tiered-policy/rollback"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "rollback on {host}");

        // The operator's token opens them, and nothing was changed.
        let plugins: serde_json::Value = client
            .get(format!("{base}/admin/plugins"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let names: Vec<&str> = plugins
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert!(names.contains(&"tiered-policy"), "{plugins}");
        assert!(!names.contains(&"grabber"), "{plugins}");
        // Health stays public.
        let response = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(response.status(), 200);

        // The local CLI finds the token in the data directory by itself.
        let data = data_dir.path().display().to_string();
        let (ok, out) = cli(vec![
            "conns".into(),
            "--relay".into(),
            base.clone(),
            "--data-dir".into(),
            data,
        ])
        .await;
        assert!(ok, "{out}");
        assert!(out.contains("Total:"), "{out}");
        // Elsewhere, without the token, it says what to do.
        let elsewhere = tempfile::tempdir().unwrap();
        let (ok, out) = cli(vec![
            "plugin".into(),
            "list".into(),
            "--relay".into(),
            base.clone(),
            "--data-dir".into(),
            elsewhere.path().display().to_string(),
        ])
        .await;
        assert!(!ok, "{out}");
        assert!(out.contains("401") && out.contains("--token"), "{out}");
    }
}

#[tokio::test]
async fn an_open_admin_plane_is_refused_on_a_public_listener() {
    let data_dir = tempfile::tempdir().unwrap();
    let config = data_dir.path().join("relay.toml");
    std::fs::write(&config, "[admin]\ninsecure = true\n").unwrap();
    let (ok, out) = cli(vec![
        "serve".into(),
        "--config".into(),
        config.display().to_string(),
        "--listen".into(),
        format!("0.0.0.0:{}", free_port()),
        "--data-dir".into(),
        data_dir.path().display().to_string(),
        "--no-quic".into(),
        "--no-tls".into(),
    ])
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("admin.insecure"), "{out}");
    assert!(out.contains("0.0.0.0"), "{out}");
}

fn with_demo_policy(c: &mut wasmrelay::Config) {
    c.plugins.bundled = vec!["tiered-policy".to_owned()];
    c.spaces.anonymous_register = false;
}

/// A greeted WebSocket client presenting `token` (or none).
async fn client(relay: &TestRelay, token: Option<&str>) -> WsTester {
    let url = match token {
        Some(token) => format!("{}?token={token}", relay.ws_url()),
        None => relay.ws_url(),
    };
    WsTester::greeted(&url).await.unwrap()
}

async fn register(tester: &mut WsTester, space: &str) -> Value {
    tester
        .send(json!({"type": "register", "space": space}))
        .await
        .unwrap();
    loop {
        let msg = tester.recv().await.unwrap();
        if msg["type"] == "registered" || msg["type"] == "error" {
            return msg;
        }
    }
}

/// Answers one request on `instance` with `answer`; returns the request.
async fn serve_one(instance: &mut WsTester, answer: &str) -> Value {
    let request = instance.recv_type("request").await.unwrap();
    instance
        .send(json!({"type": "response", "id": request["id"], "status": 200, "data": answer}))
        .await
        .unwrap();
    request
}

#[tokio::test]
async fn a_guest_cannot_take_over_a_space_and_callers_keep_reaching_the_real_service() {
    let relay = TestRelay::start_with(with_demo_policy).await;
    let mut service = client(&relay, Some("service-demo-token")).await;
    assert_eq!(register(&mut service, "demo").await["type"], "registered");

    // The impostor: an anonymous guest, then a known user of another tier.
    for token in [None, Some("vip-demo-token")] {
        let mut impostor = client(&relay, token).await;
        let refused = register(&mut impostor, "demo").await;
        assert_eq!(refused["code"], "forbidden", "{token:?}: {refused}");
        // A brand-new space is no different: only the service tier registers.
        let refused = register(&mut impostor, "mine").await;
        assert_eq!(refused["code"], "forbidden", "{token:?}: {refused}");
        impostor.assert_alive().await.unwrap();
    }
    let info = get_json(&relay.url("/spaces/demo")).await.unwrap();
    assert_eq!(info["instances"], 1, "{info}");

    // Callers still reach the real service, and their credentials stay theirs.
    let call = {
        let url = relay.url("/spaces/demo/x");
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .post(url)
                .header("authorization", "Bearer vip-demo-token")
                .header("cookie", "session=abc")
                .body("hi")
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        })
    };
    let request = serve_one(&mut service, "from the real one").await;
    assert_eq!(call.await.unwrap(), (200, "from the real one".to_owned()));
    let names: Vec<String> = request["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap().to_ascii_lowercase())
        .collect();
    assert!(!names.contains(&"authorization".to_owned()), "{request}");
    assert!(!names.contains(&"cookie".to_owned()), "{request}");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_space_is_held_by_one_user_unless_shared_and_registrations_are_capped() {
    let relay = TestRelay::start_with(|c| {
        with_demo_policy(c);
        c.spaces.shared = vec!["pool-*".to_owned()];
        c.limits.max_registrations_per_connection = 2;
    })
    .await;
    // A second service user, through a policy swap (what an operator does).
    let policy = wasmrelay::plugin::bundled::find("tiered-policy").unwrap();
    let manifest = policy.manifest.replace(
        "[config.tokens]\n",
        "[config.tokens]\nother-service-token = { user = \"svc2\", tier = \"service\" }\n",
    );
    let (status, body, _) =
        wasmrelay_tests::put_plugin(&relay.url(""), "tiered-policy", policy.wasm, &manifest).await;
    assert_eq!(status, 200, "{body}");

    let mut first = client(&relay, Some("service-demo-token")).await;
    let mut second = client(&relay, Some("other-service-token")).await;
    assert_eq!(register(&mut first, "held").await["type"], "registered");
    let refused = register(&mut second, "held").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    // The same user may add instances; a shared space takes anyone allowed.
    let mut first_again = client(&relay, Some("service-demo-token")).await;
    assert_eq!(
        register(&mut first_again, "held").await["type"],
        "registered"
    );
    assert_eq!(register(&mut first, "pool-a").await["type"], "registered");
    assert_eq!(register(&mut second, "pool-a").await["type"], "registered");
    // Two registrations per connection here; the third is refused.
    let refused = register(&mut first, "third").await;
    assert_eq!(refused["code"], "overloaded", "{refused}");
    first.assert_alive().await.unwrap();

    // Once the holder's instances are gone, the space is free again.
    drop((first, first_again));
    let info = wait_for(
        "the held space to empty",
        Duration::from_secs(10),
        || async {
            let info = get_json(&relay.url("/spaces/held")).await.ok()?;
            (info["instances"] == 0).then_some(info)
        },
    )
    .await;
    assert_eq!(info["connected"], false);
    assert_eq!(register(&mut second, "held").await["type"], "registered");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn callers_credentials_reach_only_instances_of_spaces_that_opted_in() {
    let relay = TestRelay::start_with(|c| {
        c.spaces.forward_credentials = vec!["auth-*".to_owned()];
    })
    .await;
    let mut plain = client(&relay, None).await;
    let mut opted_in = client(&relay, None).await;
    assert_eq!(register(&mut plain, "plain").await["type"], "registered");
    assert_eq!(
        register(&mut opted_in, "auth-api").await["type"],
        "registered"
    );
    let headers = [
        ("authorization", "Bearer caller-secret"),
        ("cookie", "session=caller"),
        ("x-trace", "t1"),
    ];
    for (instance, path, forwarded) in [
        (&mut plain, "/spaces/plain/x", false),
        (&mut opted_in, "/spaces/auth-api/x", true),
    ] {
        let call = {
            let relay_url = relay.url(path);
            tokio::spawn(async move {
                let mut request = reqwest::Client::new().post(relay_url).body("hi");
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                request.send().await.unwrap().status().as_u16()
            })
        };
        let request = serve_one(instance, "ok").await;
        assert_eq!(call.await.unwrap(), 200);
        let has = |name: &str| {
            request["headers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
        };
        assert_eq!(has("authorization"), forwarded, "{path}: {request}");
        assert_eq!(has("cookie"), forwarded, "{path}: {request}");
        assert!(has("x-trace"), "{path}: {request}");
    }
    relay.stop().await.unwrap();
}

/// Sends `head` to `addr` one byte at a time, `gap` apart, until the relay
/// closes the connection or `give_up` passes; returns how long it stayed open.
async fn trickle(
    addr: std::net::SocketAddr,
    head: &[u8],
    gap: Duration,
    give_up: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut byte = [0u8; 1];
    for chunk in head.iter().cycle() {
        if started.elapsed() > give_up {
            return None;
        }
        if stream.write_all(&[*chunk]).await.is_err() {
            return Some(started.elapsed());
        }
        // A closed connection reads as end of stream (or a 408 first).
        if let Ok(read) = tokio::time::timeout(gap, stream.read(&mut byte)).await {
            match read {
                Ok(0) | Err(_) => return Some(started.elapsed()),
                Ok(_) => {
                    let mut rest = Vec::new();
                    let _ = tokio::time::timeout(gap, stream.read_to_end(&mut rest)).await;
                    return Some(started.elapsed());
                }
            }
        }
    }
    unreachable!("cycle never ends")
}

#[tokio::test]
async fn slow_headers_and_slow_tls_handshakes_are_closed_at_the_timeout() {
    let relay = TestRelay::start_with(|c| {
        c.server.header_timeout_ms = 500;
        c.server.tls_handshake_timeout_ms = 500;
    })
    .await;
    // A header trickled one byte every 100 ms, the first request and a second
    // one on a kept-alive connection, and a connection that sends nothing.
    let head =
        b"GET /spaces HTTP/1.1\r\nhost: x\r\nx-pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let open_for = trickle(
        relay.addr,
        head,
        Duration::from_millis(100),
        Duration::from_secs(20),
    )
    .await
    .expect("a slow header is closed");
    assert!(open_for >= Duration::from_millis(400), "{open_for:?}");
    let mut silent = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf))
        .await
        .expect("a silent connection is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // TLS: a handshake that never starts.
    let mut tls = tokio::net::TcpStream::connect(relay.https_addr.unwrap())
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(20), tls.read(&mut buf))
        .await
        .expect("a stalled TLS handshake is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    let stats = get_json(&relay.url("/admin/stats")).await.unwrap();
    assert!(
        stats["limits"]["refused"]["slow_handshake"]
            .as_u64()
            .unwrap()
            >= 3,
        "{stats}"
    );
    // Prompt clients are unaffected.
    let response = reqwest::get(relay.url("/spaces")).await.unwrap();
    assert_eq!(response.status(), 200);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_header_larger_than_the_bound_is_refused_before_it_is_buffered() {
    let relay = TestRelay::start().await;
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    stream
        .write_all(b"GET /spaces HTTP/1.1\r\nhost: x\r\nx-hoard: ")
        .await
        .unwrap();
    // Far past limits.max_header_bytes (32 KiB); the relay answers 431 and
    // closes, so the writes start failing well before the end.
    let chunk = vec![b'a'; 16 * 1024];
    let mut sent = 0;
    for _ in 0..64 {
        if stream.write_all(&chunk).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 431") || sent < 64 * chunk.len(),
        "sent {sent}, answer {answer:?}"
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn plain_http_connections_count_against_the_address_cap_from_accept() {
    let relay = TestRelay::start_with(|c| {
        c.limits.max_connections_per_ip = 3;
        c.server.header_timeout_ms = 1_000;
    })
    .await;
    // Three connections that have said nothing yet fill the address's share.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(relay.addr).await.unwrap());
    }
    let refused = wait_for("the address to be full", Duration::from_secs(5), || async {
        let response = reqwest::get(relay.url("/spaces")).await.ok()?;
        (response.status() == 429).then_some(response)
    })
    .await;
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
    // Health and the operator's view still answer on a full relay.
    assert_eq!(
        reqwest::get(relay.url("/healthz")).await.unwrap().status(),
        200
    );
    let stats = get_json(&relay.url("/admin/stats")).await.unwrap();
    assert!(
        stats["limits"]["refused"]["ip_cap"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    // The idle ones are closed at the header timeout, and the address is free again.
    let response = wait_for(
        "the idle connections to be reaped",
        Duration::from_secs(15),
        || async {
            let response = reqwest::get(relay.url("/spaces")).await.ok()?;
            (response.status() == 200).then_some(response)
        },
    )
    .await;
    assert_eq!(response.status(), 200);
    drop(idle);
    relay.stop().await.unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn the_generated_development_key_is_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let relay = TestRelay::start().await;
    let key = relay.cert_pem.with_file_name("dev-key.pem");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_presence_storm_by_others_leaves_a_bystander_subscribed() {
    // No policy, so no rates: the storm reaches the relay in full, and only
    // coalescing keeps the bystander's control lane (64 here) from filling.
    let relay = TestRelay::start_with(|c| c.limits.outbound_queue = 64).await;
    let mut bystander = client(&relay, None).await;
    bystander
        .send(json!({"type": "subscribe", "channel": "lobby"}))
        .await
        .unwrap();
    bystander.recv_type("subscribed").await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let reader = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut presences = 0u64;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return (bystander, presences),
                    msg = bystander.recv_within(Duration::from_secs(60)) => match msg {
                        Ok(msg) if msg["type"] == "presence" => presences += 1,
                        Ok(_) => {}
                        Err(e) => panic!("the bystander lost its connection: {e:#}"),
                    }
                }
            }
        })
    };
    let mut churners = Vec::new();
    for _ in 0..4 {
        use futures_util::{SinkExt as _, StreamExt as _};
        use tokio_tungstenite::tungstenite::Message;
        let (mut sink, mut stream) = client(&relay, None).await.ws.split();
        // Churners read what they are sent, so nothing slows them down.
        let drain = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        churners.push(tokio::spawn(async move {
            let subscribe = json!({"type": "subscribe", "channel": "lobby"}).to_string();
            let unsubscribe = json!({"type": "unsubscribe", "channel": "lobby"}).to_string();
            for _ in 0..5_000 {
                for text in [&subscribe, &unsubscribe] {
                    sink.feed(Message::text(text.as_str())).await.unwrap();
                }
            }
            sink.flush().await.unwrap();
            (sink, drain)
        }));
    }
    let mut kept = Vec::new();
    for churner in churners {
        kept.push(churner.await.unwrap());
    }
    // Let the relay work through what the churners sent.
    wait_for("the storm to pass", Duration::from_secs(60), || async {
        let stats = get_json(&relay.url("/admin/stats")).await.ok()?;
        (stats["messages_in"].as_u64()? >= 40_000).then_some(())
    })
    .await;
    stop.cancel();
    let (mut bystander, presences) = reader.await.unwrap();
    assert!(presences > 0, "the bystander saw presence changes");
    assert!(presences < 40_000, "coalesced: {presences} updates");
    bystander.assert_alive().await.unwrap();
    let mut publisher = client(&relay, None).await;
    publisher
        .send(json!({"type": "publish", "channel": "lobby", "data": "still here?"}))
        .await
        .unwrap();
    let message = bystander.recv_type("message").await.unwrap();
    assert_eq!(message["data"], "still here?");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn control_messages_count_against_the_senders_rates() {
    let relay = TestRelay::start_with(with_demo_policy).await;
    // A guest (5 messages a second, bursts of 10) churning subscriptions.
    let mut guest = client(&relay, None).await;
    let mut limited = None;
    for i in 0..30 {
        let kind = if i % 2 == 0 {
            "subscribe"
        } else {
            "unsubscribe"
        };
        guest
            .send(json!({"type": kind, "channel": "lobby"}))
            .await
            .unwrap();
        let reply = guest.recv().await.unwrap();
        if reply["type"] == "error" {
            limited = Some(reply);
            break;
        }
    }
    let limited = limited.expect("churn is rate-limited");
    assert_eq!(limited["code"], "rate_limited", "{limited}");
    assert!(limited["retry_after_ms"].as_u64().unwrap() > 0, "{limited}");
    guest.assert_alive().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn memory_returns_after_a_burst_of_header_hoarders() {
    let relay = wasmrelay_tests::RelayProcess::start(RELAY, &[]).await;
    let pid = relay.process.pid();
    // Warm up what every relay allocates on first use, then take the baseline.
    for _ in 0..20 {
        let _ = reqwest::get(relay.url("/spaces")).await.unwrap();
    }
    let before = wasmrelay_tests::rss_of(pid).unwrap();
    // 500 connections, each sending a never-ending header (390 KiB offered),
    // from two addresses so the per-address cap (256) lets them all in.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], relay.port));
    let hoarders: Vec<_> = (0..500u32)
        .map(|i| {
            tokio::spawn(async move {
                let from = std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % 2) as u8);
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind((from, 0).into()).unwrap();
                let Ok(mut stream) = socket.connect(addr).await else {
                    return false;
                };
                let _ = stream.write_all(b"GET /spaces HTTP/1.1\r\nx-hoard: ").await;
                let chunk = vec![b'h'; 10 * 1024];
                for _ in 0..39 {
                    if stream.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                let mut answer = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
                        .await;
                answer.starts_with(b"HTTP/1.1 431")
            })
        })
        .collect();
    let mut refused = 0;
    for hoarder in hoarders {
        refused += usize::from(hoarder.await.unwrap());
    }
    assert!(refused > 0, "hoarders are answered 431");
    let stats = wait_for(
        "the hoarders' connections to close",
        Duration::from_secs(20),
        || async {
            let stats = get_json(&relay.url("/admin/stats")).await.ok()?;
            (stats["connections"]["total"].as_u64()? <= 1).then_some(stats)
        },
    )
    .await;
    let after = wasmrelay_tests::rss_of(pid).unwrap();
    eprintln!(
        "RSS before {} KiB, after 500 hoarders {} KiB ({refused} answered 431); {stats}",
        before / 1024,
        after / 1024
    );
    assert!(
        after * 2 <= before * 3,
        "RSS {after} after the burst is more than 1.5x {before} before it"
    );
}

#[tokio::test]
async fn at_the_open_file_limit_new_connections_are_refused_at_once() {
    let data_dir = tempfile::tempdir().unwrap();
    let config = data_dir.path().join("relay.toml");
    // Hoarders must outlive the test's steps; the header deadline is long here.
    std::fs::write(&config, "[server]\nheader_timeout_ms = 60000\n").unwrap();
    let port = free_port();
    let command = format!(
        "ulimit -n 128 && exec {RELAY} serve --listen 127.0.0.1:{port} --data-dir {} --config {} --no-quic --no-tls",
        data_dir.path().display(),
        config.display()
    );
    let _relay = ChildProcess::spawn("sh", &["-c", &command]).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base, Duration::from_secs(60)).await;
    // Half-sent requests, far more than the 128 descriptors the relay may hold.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut hoarders = Vec::new();
    for _ in 0..200 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(b"GET / HTTP/1.1\r\n").await;
        hoarders.push(stream);
    }
    // The relay is out of descriptors: a newcomer is closed straight away
    // rather than left waiting in the kernel's backlog.
    let started = Instant::now();
    let mut newcomer = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), newcomer.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "a connection at the file limit is closed, not left hanging: {read:?}"
    );
    eprintln!("refused after {:?}", started.elapsed());
    // Once the hoarders go, the relay serves again.
    drop(hoarders);
    wait_healthy(&base, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn the_example_service_app_gives_up_when_the_policy_will_not_let_it_register() {
    use wasmrelay_examples::service_app::{self, Options};
    let relay = TestRelay::start_with(with_demo_policy).await;
    let run = service_app::run(
        Options {
            relay: relay.ws_url(),
            trust: Default::default(),
            token: None,
            space: "demo".into(),
            work_ms: 10,
            steps: 1,
        },
        tokio_util::sync::CancellationToken::new(),
    );
    // A refusal is configuration, not a network blip: no reconnect loop.
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the app stops instead of retrying a refused registration");
    let info = get_json(&relay.url("/spaces/demo")).await.unwrap();
    assert_eq!(info["connected"], false, "{info}");
    relay.stop().await.unwrap();
}
