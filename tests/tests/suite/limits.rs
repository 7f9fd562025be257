//! Caps and rates against a real relay: connections refused before the
//! upgrade with their status, code and Retry-After; messages over a rate
//! answered `rate_limited` and dropped while the connection lives; repeated
//! violations closed with 1008 (QUIC 0x7); HTTP ingress answered 429; a
//! user named by `hello.token` over their tier's cap closed with 1013 (QUIC 0x5).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use wasmrelay::rate::Rate;
use wasmrelay_tests::{QuicTester, TestRelay, WsTester, admin_client, get_json};

/// A WebSocket handshake from source address `from`: the upgraded client,
/// or the refusal's status, Retry-After and JSON body.
async fn ws_from(
    relay: &TestRelay,
    from: Ipv4Addr,
    query: &str,
) -> Result<WsTester, (u16, Option<String>, Value)> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    let stream = socket.connect(relay.addr).await.unwrap();
    let url = format!("{}{query}", relay.ws_url());
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    match tokio_tungstenite::client_async(url, stream).await {
        Ok((ws, _)) => {
            let mut tester = WsTester { ws };
            tester.send(json!({"type": "hello", "v": 1})).await.unwrap();
            assert_eq!(
                tester.recv_type("welcome").await.unwrap()["type"],
                "welcome"
            );
            Ok(tester)
        }
        Err(tungstenite::Error::Http(response)) => {
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = response.body().as_deref().unwrap_or_default();
            Err((
                response.status().as_u16(),
                retry_after,
                serde_json::from_slice(body).unwrap_or(Value::Null),
            ))
        }
        Err(e) => panic!("unexpected handshake failure: {e}"),
    }
}

const HOME: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// Asserts that some row of `/admin/connections` satisfies `accept`.
async fn assert_any_row(relay: &TestRelay, accept: impl Fn(&Value) -> bool) {
    let table = get_json(&relay.url("/admin/connections")).await.unwrap();
    let rows = table["connections"].as_array().unwrap();
    assert!(rows.iter().any(accept), "{table}");
}

/// Waits for the relay to close `quic` with application code `code`;
/// returns the close reason.
async fn quic_closed_with(quic: &QuicTester, code: u32) -> String {
    match tokio::time::timeout(Duration::from_secs(10), quic.connection.closed())
        .await
        .unwrap()
    {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(code));
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        other => panic!("expected an application close, got {other:?}"),
    }
}

#[tokio::test]
async fn connection_caps_refuse_before_the_upgrade_with_a_reason() {
    let relay = TestRelay::start_with(|c| {
        c.limits.max_connections = 4;
        c.limits.max_connections_per_ip = 2;
    })
    .await;
    let mut first = ws_from(&relay, HOME, "").await.unwrap();
    let _second = ws_from(&relay, HOME, "").await.unwrap();

    // A third from the same address: 429 before the upgrade.
    let (status, retry_after, body) = ws_from(&relay, HOME, "").await.err().unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(retry_after.is_some(), "Retry-After is set");
    assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1"),
        "{body}"
    );
    // Over QUIC the same address is over the same cap: closed with 0x5.
    let quic = QuicTester::connect(relay.quic_addr.unwrap(), &relay.cert_pem)
        .await
        .unwrap();
    let reason = quic_closed_with(&quic, 0x5).await;
    assert!(reason.starts_with("too_many_connections"), "{reason}");

    // Other addresses fill the relay-wide cap of 4; the fifth gets 503.
    let _third = ws_from(&relay, Ipv4Addr::new(127, 0, 0, 2), "")
        .await
        .unwrap();
    let _fourth = ws_from(&relay, Ipv4Addr::new(127, 0, 0, 3), "")
        .await
        .unwrap();
    let (status, retry_after, body) = ws_from(&relay, Ipv4Addr::new(127, 0, 0, 4), "")
        .await
        .err()
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(retry_after.is_some());
    assert_eq!(body["error"]["code"], "overloaded", "{body}");

    // Those already in are untouched, and a slot that frees up is reusable.
    first.assert_alive().await.unwrap();
    first.ws.close(None).await.unwrap();
    let _ = first.expect_close().await;
    let mut again = None;
    for _ in 0..100 {
        if let Ok(tester) = ws_from(&relay, Ipv4Addr::new(127, 0, 0, 4), "").await {
            again = Some(tester);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    again.expect("a freed slot is given to the next client");

    let stats = get_json(&relay.url("/admin/stats")).await.unwrap();
    assert!(
        stats["limits"]["refused"]["ip_cap"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    assert!(
        stats["limits"]["refused"]["global_cap"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    let metrics = admin_client()
        .get(relay.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("wasmrelay_refused_total{reason=\"ip_cap\"}"),
        "{metrics}"
    );
    relay.stop().await.unwrap();
}

fn with_demo_policy() -> impl FnOnce(&mut wasmrelay::Config) {
    |c| c.plugins.bundled = vec!["tiered-policy".to_owned()]
}

#[tokio::test]
async fn the_demo_policy_caps_each_guest_address_and_each_user() {
    let relay = TestRelay::start_with(with_demo_policy()).await;
    // Guests are keyed by address: the guest tier allows 10.
    let mut guests = Vec::new();
    for _ in 0..10 {
        guests.push(ws_from(&relay, HOME, "").await.unwrap());
    }
    let (status, _, body) = ws_from(&relay, HOME, "").await.err().unwrap();
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_connections");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anon:127.0.0.1"),
        "{body}"
    );
    // A user with a token is counted as that user, not as the address.
    let mut vip = ws_from(&relay, HOME, "?token=vip-demo-token")
        .await
        .unwrap();
    vip.assert_alive().await.unwrap();
    guests[0].assert_alive().await.unwrap();
    assert_any_row(&relay, |row| row["user"] == "alice" && row["tier"] == "vip").await;
    relay.stop().await.unwrap();
}

/// Publishes `count` messages with ids as fast as possible; returns the acks
/// and errors in the order they came, and how long sending took.
async fn publish_burst(
    client: &mut WsTester,
    channel: &str,
    count: usize,
) -> (Vec<Value>, Vec<Value>, Duration) {
    let started = Instant::now();
    for i in 0..count {
        client
            .send(
                json!({"type": "publish", "channel": channel, "id": format!("m{i}"), "data": "x"}),
            )
            .await
            .unwrap();
    }
    let elapsed = started.elapsed();
    let (mut acks, mut errors) = (Vec::new(), Vec::new());
    while acks.len() + errors.len() < count {
        let msg = client.recv().await.unwrap();
        match msg["type"].as_str() {
            Some("ack") => acks.push(msg),
            Some("error") => errors.push(msg),
            _ => {}
        }
    }
    (acks, errors, elapsed)
}

#[tokio::test]
async fn messages_over_a_rate_are_dropped_with_retry_after_and_the_connection_lives() {
    let relay = TestRelay::start_with(with_demo_policy()).await;
    let mut guest = ws_from(&relay, HOME, "").await.unwrap();
    let mut listener = ws_from(&relay, HOME, "?token=vip-demo-token")
        .await
        .unwrap();
    listener
        .send(json!({"type": "subscribe", "channel": "news"}))
        .await
        .unwrap();
    listener.recv_type("subscribed").await.unwrap();

    // The guest tier: 5 a second, bursts of 10.
    let (acks, errors, elapsed) = publish_burst(&mut guest, "news", 40).await;
    let most = 10 + (5.0 * (elapsed.as_secs_f64() + 0.5)).ceil() as usize;
    assert!(
        acks.len() >= 10 && acks.len() <= most,
        "{} acks after {elapsed:?}",
        acks.len()
    );
    for error in &errors {
        assert_eq!(error["code"], "rate_limited", "{error}");
        assert!(error["id"].as_str().unwrap().starts_with('m'), "{error}");
        let wait = error["retry_after_ms"].as_u64().unwrap();
        assert!(wait > 0 && wait <= 200, "{error}");
    }
    // Only what passed was delivered.
    let mut delivered = 0;
    while let Ok(msg) = listener.recv_within(Duration::from_millis(300)).await {
        if msg["type"] == "message" {
            delivered += 1;
        }
    }
    assert_eq!(delivered, acks.len());
    guest.assert_alive().await.unwrap();

    // A class has its own budget: the guest's `chat` allows bursts of 5.
    let (acks, errors, _) = publish_burst(&mut guest, "chat/lobby", 12).await;
    assert!(
        acks.len() >= 5 && acks.len() < 12,
        "{} chat acks",
        acks.len()
    );
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("class:chat"),
        "{}",
        errors[0]
    );
    let stats = get_json(&relay.url("/admin/stats")).await.unwrap();
    assert!(
        stats["limits"]["throttled"].as_u64().unwrap() >= 7,
        "{stats}"
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_burst_of_http_requests_from_a_guest_sees_429_with_retry_after() {
    let relay = TestRelay::start_with(with_demo_policy()).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..300 {
        let response = client
            .post(relay.url("/spaces/demo/"))
            .body("hi")
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            statuses.push(429);
        } else {
            statuses.push(response.status().as_u16());
        }
    }
    let elapsed = started.elapsed();
    let passed = statuses.iter().filter(|s| **s != 429).count();
    let most = 10 + (5.0 * (elapsed.as_secs_f64() + 0.5)).ceil() as usize;
    assert!(
        passed >= 10 && passed <= most,
        "{passed} passed in {elapsed:?}"
    );
    assert!(statuses.contains(&429));
    assert_eq!(retry_after.as_deref(), Some("1"));
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn repeated_violations_close_the_connection_with_1008_or_quic_0x7() {
    let relay = TestRelay::start_with(|c| {
        c.limits.connection_rate = Rate {
            per_second: 1,
            burst: 1,
        };
        c.limits.rate_violations_before_close = 3;
    })
    .await;
    let mut bystander = WsTester::greeted(&relay.ws_url()).await.unwrap();

    let mut ws = WsTester::greeted(&relay.ws_url()).await.unwrap();
    let (acks, errors, _) = publish_burst(&mut ws, "flood", 5).await;
    assert_eq!((acks.len(), errors.len()), (1, 4));
    let close = ws.expect_close().await.unwrap().expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert!(close.reason.contains("rate limits"), "{close:?}");

    let mut quic = QuicTester::greeted(relay.quic_addr.unwrap(), &relay.cert_pem)
        .await
        .unwrap();
    for i in 0..5 {
        quic.send(json!({"type": "publish", "channel": "flood", "id": format!("q{i}")}))
            .await
            .unwrap();
    }
    match tokio::time::timeout(Duration::from_secs(10), quic.connection.closed())
        .await
        .unwrap()
    {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(0x7));
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    bystander.assert_alive().await.unwrap();
    let stats = get_json(&relay.url("/admin/stats")).await.unwrap();
    assert_eq!(stats["limits"]["policy_closes"], 2, "{stats}");
    relay.stop().await.unwrap();
}

/// Clients that cannot send headers (QUIC, browsers) name themselves with
/// `hello.token`; the user's tier cap then applies after the upgrade.
#[tokio::test]
async fn a_token_in_hello_names_the_user_and_a_full_tier_closes_with_1013_or_quic_0x5() {
    let relay = TestRelay::start_with(with_demo_policy()).await;
    let hello_as_bob = json!({"type": "hello", "v": 1, "token": "normal-demo-token"});

    // Over QUIC, the token in hello moves the connection from its address's
    // guest slot to bob's (the normal tier allows bob 50 connections).
    let mut quic_bob = QuicTester::connect(relay.quic_addr.unwrap(), &relay.cert_pem)
        .await
        .unwrap();
    quic_bob.send(hello_as_bob.clone()).await.unwrap();
    assert_eq!(quic_bob.recv().await.unwrap()["type"], "welcome");
    assert_any_row(&relay, |row| {
        row["transport"] == "quic" && row["user"] == "bob" && row["tier"] == "normal"
    })
    .await;

    // A token the policy does not know: refused, the connection stays
    // un-greeted and may say hello again.
    let mut stranger = WsTester::connect(&relay.ws_url()).await.unwrap();
    stranger
        .send(json!({"type": "hello", "v": 1, "token": "no-such-token"}))
        .await
        .unwrap();
    let refused = stranger.recv().await.unwrap();
    assert_eq!(refused["code"], "unauthorized", "{refused}");
    stranger
        .send(json!({"type": "ping", "id": "p"}))
        .await
        .unwrap();
    assert_eq!(stranger.recv().await.unwrap()["code"], "hello_required");
    stranger
        .send(json!({"type": "hello", "v": 1}))
        .await
        .unwrap();
    assert_eq!(stranger.recv().await.unwrap()["type"], "welcome");

    // Bob fills his tier: 49 more, named on the handshake.
    let mut bobs = Vec::new();
    for _ in 0..49 {
        bobs.push(
            ws_from(&relay, HOME, "?token=normal-demo-token")
                .await
                .unwrap(),
        );
    }
    // One more, upgraded as a guest and naming bob in hello: over the cap
    // after the upgrade, so an error and then close 1013 with the reason.
    let mut extra = WsTester::connect(&relay.ws_url()).await.unwrap();
    extra.send(hello_as_bob.clone()).await.unwrap();
    let error = extra.recv().await.unwrap();
    assert_eq!(error["code"], "too_many_connections", "{error}");
    let close = extra.expect_close().await.unwrap().expect("a close frame");
    assert_eq!(u16::from(close.code), 1013);
    assert!(
        close.reason.contains("bob") && close.reason.contains("50"),
        "{close:?}"
    );
    // Over QUIC: closed with 0x5 and `too_many_connections: reason`.
    let mut quic_extra = QuicTester::connect(relay.quic_addr.unwrap(), &relay.cert_pem)
        .await
        .unwrap();
    quic_extra.send(hello_as_bob.clone()).await.unwrap();
    let reason = quic_closed_with(&quic_extra, 0x5).await;
    assert!(
        reason.starts_with("too_many_connections: user bob"),
        "{reason}"
    );

    // Nobody else noticed; a slot bob frees is his again.
    stranger.assert_alive().await.unwrap();
    bobs[0].assert_alive().await.unwrap();
    quic_bob
        .send(json!({"type": "ping", "id": "q"}))
        .await
        .unwrap();
    assert_eq!(quic_bob.recv_type("pong").await.unwrap()["id"], "q");
    let stats = get_json(&relay.url("/admin/stats")).await.unwrap();
    assert!(
        stats["limits"]["refused"]["user_cap"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    let mut freed = bobs.pop().unwrap();
    freed.ws.close(None).await.unwrap();
    let _ = freed.expect_close().await;
    let mut welcomed = false;
    for _ in 0..100 {
        // A refused try still holds a guest slot until its close completes.
        let Ok(mut again) = WsTester::connect(&relay.ws_url()).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        again.send(hello_as_bob.clone()).await.unwrap();
        if again.recv().await.unwrap()["type"] == "welcome" {
            welcomed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(welcomed, "bob's freed slot is his again");
    relay.stop().await.unwrap();
}

/// A token that cannot be a header value is refused with `bad_message`
/// before any policy sees it; the connection stays un-greeted and usable.
#[tokio::test]
async fn a_token_that_is_not_printable_ascii_is_a_bad_message() {
    let relay = TestRelay::start_with(with_demo_policy()).await;
    let mut bystander = WsTester::greeted(&relay.ws_url()).await.unwrap();
    let mut client = WsTester::connect(&relay.ws_url()).await.unwrap();
    client
        .send(json!({"type": "hello", "v": 1, "token": "line\nbreak"}))
        .await
        .unwrap();
    let refused = client.recv().await.unwrap();
    assert_eq!(refused["code"], "bad_message", "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("token"),
        "{refused}"
    );
    client
        .send(json!({"type": "ping", "id": "p"}))
        .await
        .unwrap();
    assert_eq!(client.recv().await.unwrap()["code"], "hello_required");
    client.send(json!({"type": "hello", "v": 1})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["type"], "welcome");
    bystander.assert_alive().await.unwrap();
    relay.stop().await.unwrap();
}
