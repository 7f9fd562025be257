//! Slow consumers against a real relay: a subscriber that never reads costs
//! at most its queue's bounds while everyone else receives everything;
//! `drop-oldest` channels tell it what it lost, `disconnect` channels close it
//! with 1013 (QUIC 0x8), and a relay over its outbound budget sheds the
//! slowest consumer first. A publisher sending flat out to subscribers that
//! keep up is slowed down (the relay stops reading it) and nobody loses a
//! message.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use wasmrelay::config::{ChannelOverride, SlowConsumer};
use wasmrelay_tests::{
    QuicTester, RelayProcess, TestRelay, Via, WsTester, free_port, get_json, rss_of,
};

const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");

async fn subscribed(url: &str, channel: &str) -> WsTester {
    let mut client = WsTester::greeted(url).await.unwrap();
    client
        .send(json!({"type": "subscribe", "channel": channel}))
        .await
        .unwrap();
    client.recv_type("subscribed").await.unwrap();
    client
}

/// A subscriber that will not read, with a small socket receive buffer so
/// the kernel cannot soak up much of what the relay sends it.
async fn stalled(addr: std::net::SocketAddr, channel: &str) -> WsTester {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let url = format!("ws://{addr}/ws");
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    let mut client = WsTester { ws };
    client.send(json!({"type": "hello", "v": 1})).await.unwrap();
    client.recv_type("welcome").await.unwrap();
    client
        .send(json!({"type": "subscribe", "channel": channel}))
        .await
        .unwrap();
    client.recv_type("subscribed").await.unwrap();
    client
}

/// Reads everything a stalled subscriber was sent, until `quiet` passes with
/// nothing new; returns the `message`s' seqs and the `lost` counts.
async fn read_backlog(client: &mut WsTester, quiet: Duration) -> (Vec<u64>, u64) {
    let (mut seqs, mut lost) = (Vec::new(), 0);
    while let Ok(msg) = client.recv_within(quiet).await {
        match msg["type"].as_str() {
            Some("message") => seqs.push(msg["seq"].as_u64().unwrap()),
            Some("lost") => lost += msg["count"].as_u64().unwrap(),
            _ => {}
        }
    }
    (seqs, lost)
}

fn payload(bytes: usize) -> String {
    "p".repeat(bytes)
}

#[tokio::test]
async fn a_consumer_that_never_reads_stays_bounded_while_fast_ones_get_everything() {
    const FAST: usize = 8;
    const MESSAGES: u64 = 20_000;
    const SIZE: usize = 2048;
    const WINDOW: u64 = 64;
    const QUEUE_BYTES: usize = 256 * 1024;
    let relay = RelayProcess::start_configured(
        RELAY,
        free_port(),
        &format!("bundled = []\n[limits]\noutbound_queue_bytes = {QUEUE_BYTES}\n"),
        &[],
    )
    .await;
    let url = relay.ws_url();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], relay.port));
    let mut stalled = stalled(addr, "feed").await;
    let received: Arc<Vec<AtomicU64>> = Arc::new((0..FAST).map(|_| AtomicU64::new(0)).collect());
    let mut fast = Vec::new();
    for i in 0..FAST {
        let mut client = subscribed(&url, "feed").await;
        let received = received.clone();
        fast.push(tokio::spawn(async move {
            let mut next = 1;
            while next <= MESSAGES {
                let msg = client.recv().await.unwrap();
                if msg["type"] == "message" {
                    assert_eq!(msg["seq"], next, "a fast consumer missed a message");
                    next += 1;
                    received[i].store(next - 1, Ordering::Relaxed);
                }
            }
        }));
    }
    let pid = relay.process.pid();
    let before = rss_of(pid).unwrap();
    let mut peak = before;

    let mut publisher = WsTester::greeted(&url).await.unwrap();
    let data = payload(SIZE);
    for sent in 0..MESSAGES {
        // Paced by the slowest fast consumer, so only the stalled one falls behind.
        loop {
            let slowest = received
                .iter()
                .map(|r| r.load(Ordering::Relaxed))
                .min()
                .unwrap();
            if sent < slowest + WINDOW {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        publisher
            .send(json!({"type": "publish", "channel": "feed", "data": data}))
            .await
            .unwrap();
        if sent % 1000 == 0 {
            peak = peak.max(rss_of(pid).unwrap());
        }
    }
    for task in fast {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("fast consumers finish")
            .unwrap();
    }
    peak = peak.max(rss_of(pid).unwrap());
    let growth = peak.saturating_sub(before);
    eprintln!(
        "{MESSAGES} x {SIZE} B to {FAST} fast + 1 stalled: relay RSS {} KiB -> peak {} KiB",
        before / 1024,
        peak / 1024
    );
    // Everything the stalled one was sent would be ~40 MB; its queue may hold
    // 256 KiB. Allow generous room for allocator slack, not for the backlog.
    assert!(growth < 16 * 1024 * 1024, "relay grew by {growth} bytes");

    let table = get_json(&relay.url("/admin/connections")).await.unwrap();
    let row = table["connections"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|r| r["dropped"].as_u64().unwrap())
        .unwrap()
        .clone();
    assert!(row["dropped"].as_u64().unwrap() > 0, "{row}");
    // The bound is on channel traffic; a few control messages (presence
    // counts as the others subscribed) may sit on top of it.
    assert!(
        row["queue_bytes"].as_u64().unwrap() <= QUEUE_BYTES as u64 + 16 * 1024,
        "{row}"
    );

    // The stalled consumer wakes up: what it did not get, `lost` accounts for.
    let (seqs, lost) = read_backlog(&mut stalled, Duration::from_millis(500)).await;
    assert!(lost > 0);
    assert_eq!(
        seqs.len() as u64 + lost,
        MESSAGES,
        "every message delivered or counted lost"
    );
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, with gaps");
    stalled.assert_alive().await.unwrap();
}

/// A publisher writing as fast as it can (no window, no waiting for acks) to
/// subscribers that read as fast as they can, plus one that never reads:
/// the fast ones get every message in order and the relay counts no drop
/// against them — the publisher is held back instead; the stalled one holds
/// it back only until it is deemed slow, then gets `drop-oldest`.
async fn flat_out_publisher_is_slowed_not_dropped(via: Via) {
    const FAST: usize = 6;
    const MESSAGES: u64 = 10_000;
    let relay = RelayProcess::start_configured(
        RELAY,
        free_port(),
        // Small queues, so a saturated relay reaches them within the test.
        "bundled = []\n[limits]\noutbound_queue = 128\noutbound_queue_bytes = 131072\nslow_consumer_after_ms = 500\n",
        &[],
    )
    .await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], relay.port));
    let mut stalled = stalled(addr, "flood").await;
    let mut fast = Vec::new();
    for _ in 0..FAST {
        let mut client = subscribed(&relay.ws_url(), "flood").await;
        fast.push(tokio::spawn(async move {
            let mut next = 1;
            while next <= MESSAGES {
                let msg = client.recv().await.unwrap();
                match msg["type"].as_str() {
                    Some("message") => {
                        assert_eq!(msg["seq"], next, "a fast consumer missed a message");
                        next += 1;
                    }
                    Some("lost") => panic!("a fast consumer lost messages: {msg}"),
                    _ => {}
                }
            }
        }));
    }
    let mut publisher = relay.tester(via).await.unwrap();
    let data = payload(512);
    for _ in 0..MESSAGES {
        publisher
            .send(json!({"type": "publish", "channel": "flood", "data": data}))
            .await
            .unwrap();
    }
    for task in fast {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("fast consumers finish")
            .unwrap();
    }
    let table = get_json(&relay.url("/admin/connections")).await.unwrap();
    let rows = table["connections"].as_array().unwrap();
    let dropped: Vec<u64> = rows
        .iter()
        .map(|r| r["dropped"].as_u64().unwrap())
        .collect();
    assert_eq!(
        dropped.iter().filter(|d| **d > 0).count(),
        1,
        "only the stalled consumer loses messages: {dropped:?}"
    );
    let (seqs, lost) = read_backlog(&mut stalled, Duration::from_millis(500)).await;
    assert!(lost > 0, "the stalled consumer got its channel's policy");
    assert_eq!(seqs.len() as u64 + lost, MESSAGES);
    stalled.assert_alive().await.unwrap();
}

#[tokio::test]
async fn a_websocket_publisher_flat_out_is_slowed_down_and_fast_subscribers_lose_nothing() {
    flat_out_publisher_is_slowed_not_dropped(Via::Ws).await;
}

#[tokio::test]
async fn a_quic_publisher_flat_out_is_slowed_down_and_fast_subscribers_lose_nothing() {
    flat_out_publisher_is_slowed_not_dropped(Via::Quic).await;
}

#[tokio::test]
async fn disconnect_channels_close_a_slow_subscriber_with_1013() {
    let relay = TestRelay::start_with(|c| {
        c.limits.outbound_queue = 16;
        c.channels.overrides = vec![ChannelOverride {
            prefix: "game/".to_owned(),
            slow_consumer: SlowConsumer::Disconnect,
        }];
    })
    .await;
    let url = relay.ws_url();
    let mut stalled = stalled(relay.addr, "game/1").await;
    let mut quic = QuicTester::greeted(relay.quic_addr.unwrap(), &relay.cert_pem)
        .await
        .unwrap();
    quic.send(json!({"type": "subscribe", "channel": "game/1"}))
        .await
        .unwrap();
    quic.recv_type("subscribed").await.unwrap();
    let mut publisher = WsTester::greeted(&url).await.unwrap();
    let data = payload(8 * 1024);
    // Enough to fill the socket buffers and then the 16-message queue.
    for _ in 0..1000 {
        publisher
            .send(json!({"type": "publish", "channel": "game/1", "data": data}))
            .await
            .unwrap();
    }
    // The relay holds the publisher back while the subscribers are merely
    // behind (ingress backpressure), so its sends can finish long before the
    // relay has read them. Its ack for one more publish says every one before
    // it reached the subscribers' queues: only then may the stalled
    // subscriber start reading, or it would be a fast one.
    publisher
        .send(json!({"type": "publish", "channel": "game/1", "id": "last", "data": "x"}))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), publisher.recv_type("ack"))
        .await
        .expect("the relay reads the whole flood")
        .unwrap();
    // The stalled WebSocket subscriber reads its backlog, then the close.
    let close = stalled
        .expect_close()
        .await
        .unwrap()
        .expect("a close frame");
    assert_eq!(u16::from(close.code), 1013);
    assert!(close.reason.contains("game/1"), "{close:?}");
    // The QUIC subscriber never read either: closed with 0x8.
    match tokio::time::timeout(Duration::from_secs(20), quic.connection.closed())
        .await
        .expect("closed in time")
    {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(0x8));
        }
        // The flood can overflow the client's UDP buffer and lose the
        // CONNECTION_CLOSE; its next keep-alive then meets a relay that has
        // forgotten the connection and answers with a stateless reset.
        quinn::ConnectionError::Reset => {}
        other => panic!("expected the relay to close the connection, got {other:?}"),
    }
    publisher.assert_alive().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_relay_over_its_budget_sheds_the_slowest_consumer_first() {
    let relay = TestRelay::start_with(|c| {
        c.limits.outbound_budget_bytes = 2 * 1024 * 1024;
        c.limits.outbound_queue_bytes = 4 * 1024 * 1024;
        c.limits.outbound_queue = 100_000;
    })
    .await;
    let url = relay.ws_url();
    let mut slowest = stalled(relay.addr, "big").await;
    let mut slow = stalled(relay.addr, "small").await;
    let mut publisher = WsTester::greeted(&url).await.unwrap();
    let big = payload(16 * 1024);
    // Fill the socket buffers and then the queue of the first consumer...
    for _ in 0..1000 {
        publisher
            .send(json!({"type": "publish", "channel": "big", "data": big}))
            .await
            .unwrap();
    }
    // ...then the second's, until the shared budget runs out.
    let small = payload(4 * 1024);
    for _ in 0..3000 {
        publisher
            .send(json!({"type": "publish", "channel": "small", "data": small}))
            .await
            .unwrap();
    }
    let stats = wasmrelay_tests::wait_json(
        "a consumer to be shed",
        &relay.url("/admin/stats"),
        Duration::from_secs(10),
        |s| s["outbound"]["shed"].as_u64() >= Some(1),
    )
    .await;
    assert!(
        stats["outbound"]["queued_bytes"].as_u64().unwrap() <= 2 * 1024 * 1024,
        "{stats}"
    );
    // It is closed with 1013 — or, when it has not read for longer than the
    // relay's one-second close handshake, the close frame never gets through
    // its full buffers and the connection just ends. Either way it is gone;
    // which one went is shown by the other being spared.
    match slowest.expect_close().await {
        Ok(Some(close)) => {
            assert_eq!(u16::from(close.code), 1013);
            assert!(close.reason.contains("budget"), "{close:?}");
        }
        Ok(None) => {}
        Err(e) => assert!(
            e.to_string().contains("without closing handshake"),
            "the slowest consumer ends, got {e:#}"
        ),
    }
    // The other slow consumer was spared and still gets its messages.
    let (seqs, _) = read_backlog(&mut slow, Duration::from_millis(500)).await;
    assert!(!seqs.is_empty());
    slow.assert_alive().await.unwrap();
    let _: Value = stats;
    relay.stop().await.unwrap();
}
