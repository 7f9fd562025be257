//! The WebSocket protocol against a real relay: greeting, channels, binary
//! frames, heartbeats, and every kind of bad input — each gets its documented
//! error or close code, and other clients carry on.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use wasmrelay_tests::{TestRelay, WsTester};

#[tokio::test]
async fn hello_welcome_and_ping() {
    let relay = TestRelay::start().await;
    let mut client = WsTester::connect(&relay.ws_url()).await.unwrap();
    client
        .send(json!({"type": "hello", "v": 1, "client": "t"}))
        .await
        .unwrap();
    let welcome = client.recv().await.unwrap();
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["v"], 1);
    assert_eq!(welcome["max_message_bytes"], 1024 * 1024);
    assert!(welcome["session"].as_str().is_some_and(|s| !s.is_empty()));
    client.assert_alive().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn messages_before_hello_are_refused_but_the_connection_stays() {
    let relay = TestRelay::start().await;
    let mut client = WsTester::connect(&relay.ws_url()).await.unwrap();
    client
        .send(json!({"type": "subscribe", "channel": "c"}))
        .await
        .unwrap();
    let err = client.recv().await.unwrap();
    assert_eq!(err["code"], "hello_required", "{err}");

    client
        .send(json!({"type": "hello", "v": 99}))
        .await
        .unwrap();
    let err = client.recv().await.unwrap();
    assert_eq!(err["code"], "unsupported_version", "{err}");

    client.send(json!({"type": "hello", "v": 1})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["type"], "welcome");
    client.send(json!({"type": "hello", "v": 1})).await.unwrap();
    assert_eq!(client.recv().await.unwrap()["code"], "hello_required");
    client.assert_alive().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_and_unknown_messages_get_errors_and_nobody_else_notices() {
    let relay = TestRelay::start().await;
    let mut bystander = WsTester::greeted(&relay.ws_url()).await.unwrap();
    bystander
        .send(json!({"type": "subscribe", "channel": "news"}))
        .await
        .unwrap();
    bystander.recv_type("subscribed").await.unwrap();

    let mut client = WsTester::greeted(&relay.ws_url()).await.unwrap();
    let cases: [(&str, &str); 6] = [
        ("{this is not json", "bad_frame"),
        ("[1, 2, 3]", "bad_frame"),
        (r#"{"type": "teleport", "id": "t1"}"#, "unknown_type"),
        (r#"{"no_type": true}"#, "bad_message"),
        (r#"{"type": "subscribe"}"#, "bad_message"),
        (
            r#"{"type": "welcome", "v": 1, "session": "x", "heartbeat_ms": 1, "idle_timeout_ms": 2, "max_message_bytes": 3}"#,
            "unexpected_type",
        ),
    ];
    for (frame, code) in cases {
        client.send_text(frame).await.unwrap();
        let err = client.recv().await.unwrap();
        assert_eq!(err["type"], "error", "{frame}: {err}");
        assert_eq!(err["code"], code, "{frame}: {err}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // The unknown type's id is echoed so the sender can match the error.
    client
        .send_text(r#"{"type": "teleport", "id": "t2"}"#)
        .await
        .unwrap();
    assert_eq!(client.recv().await.unwrap()["id"], "t2");
    client.assert_alive().await.unwrap();

    // The bystander still gets publishes.
    client
        .send(json!({"type": "publish", "channel": "news", "data": "still here"}))
        .await
        .unwrap();
    let msg = bystander.recv_type("message").await.unwrap();
    assert_eq!(msg["data"], "still here");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn oversize_message_closes_with_1009_and_others_carry_on() {
    let relay = TestRelay::start_with(|c| c.limits.max_message_bytes = 4096).await;
    let mut bystander = WsTester::greeted(&relay.ws_url()).await.unwrap();
    let mut client = WsTester::greeted(&relay.ws_url()).await.unwrap();
    let big = "x".repeat(5000);
    client
        .send(json!({"type": "publish", "channel": "c", "data": big}))
        .await
        .unwrap();
    let close = client.expect_close().await.unwrap().expect("a close frame");
    assert_eq!(close.code, CloseCode::Size);
    bystander.assert_alive().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let relay = TestRelay::start().await;
    let mut bystander = WsTester::greeted(&relay.ws_url()).await.unwrap();
    let mut client = WsTester::greeted(&relay.ws_url()).await.unwrap();
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    let frame = Frame::from_payload(header, bytes::Bytes::from_static(&[0xc3, 0x28, 0xff]));
    client.ws.send(Message::Frame(frame)).await.unwrap();
    let close = client.expect_close().await.unwrap().expect("a close frame");
    assert_eq!(close.code, CloseCode::Invalid);
    bystander.assert_alive().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn publish_subscribe_with_sequence_numbers_and_presence() {
    let relay = TestRelay::start().await;
    let mut alice = WsTester::greeted(&relay.ws_url()).await.unwrap();
    alice
        .send(json!({"type": "subscribe", "channel": "room"}))
        .await
        .unwrap();
    let subscribed = alice.recv().await.unwrap();
    assert_eq!(subscribed["type"], "subscribed");
    assert_eq!(subscribed["presence"], 1);
    assert_eq!(subscribed["seq"], 0);

    let mut bob = WsTester::greeted(&relay.ws_url()).await.unwrap();
    bob.send(json!({"type": "subscribe", "channel": "room"}))
        .await
        .unwrap();
    assert_eq!(bob.recv().await.unwrap()["presence"], 2);
    let presence = alice.recv_type("presence").await.unwrap();
    assert_eq!(presence["count"], 2);

    for i in 1..=3 {
        bob.send(json!({"type": "publish", "channel": "room", "id": format!("p{i}"), "data": format!("m{i}")}))
            .await
            .unwrap();
    }
    for i in 1..=3u64 {
        let msg = alice.recv_type("message").await.unwrap();
        assert_eq!(msg["seq"], i);
        assert_eq!(msg["data"], format!("m{i}"));
    }
    // The publisher is a subscriber too; it sees its messages and its acks.
    let mut acks = 0;
    let mut seen = 0;
    while acks < 3 || seen < 3 {
        let msg = bob.recv().await.unwrap();
        match msg["type"].as_str() {
            Some("ack") => {
                acks += 1;
                assert_eq!(msg["id"], format!("p{acks}"));
                assert_eq!(msg["seq"], acks);
            }
            Some("message") => seen += 1,
            _ => panic!("unexpected {msg}"),
        }
    }

    bob.send(json!({"type": "unsubscribe", "channel": "room"}))
        .await
        .unwrap();
    assert_eq!(
        bob.recv_type("unsubscribed").await.unwrap()["channel"],
        "room"
    );
    assert_eq!(alice.recv_type("presence").await.unwrap()["count"], 1);
    drop(alice);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn binary_frames_carry_raw_payloads_both_ways() {
    let relay = TestRelay::start().await;
    let mut text_client = WsTester::greeted(&relay.ws_url()).await.unwrap();
    text_client
        .send(json!({"type": "subscribe", "channel": "bin"}))
        .await
        .unwrap();
    text_client.recv_type("subscribed").await.unwrap();

    let mut binary = WsTester::connect(&relay.ws_url()).await.unwrap();
    let frame = |header: serde_json::Value, payload: &[u8]| {
        let header = header.to_string();
        let mut buf = BytesMut::new();
        buf.put_u32(header.len() as u32);
        buf.put_slice(header.as_bytes());
        buf.put_slice(payload);
        Message::Binary(buf.freeze())
    };
    binary
        .ws
        .send(frame(json!({"type": "hello", "v": 1}), b""))
        .await
        .unwrap();
    // Replies come in the frame kind hello came in.
    let Some(Ok(Message::Binary(welcome))) = binary.ws.next().await else {
        panic!("expected a binary welcome")
    };
    let len = u32::from_be_bytes(welcome[..4].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&welcome[4..4 + len]).unwrap();
    assert_eq!(header["type"], "welcome");

    binary
        .ws
        .send(frame(json!({"type": "subscribe", "channel": "bin"}), b""))
        .await
        .unwrap();
    let payload = [0u8, 159, 146, 150, 255];
    binary
        .ws
        .send(frame(
            json!({"type": "publish", "channel": "bin"}),
            &payload,
        ))
        .await
        .unwrap();
    // The text client gets it as {"b64": ...}; the binary client gets raw bytes.
    let msg = text_client.recv_type("message").await.unwrap();
    assert_eq!(msg["data"]["b64"], "AJ+Slv8=");
    loop {
        let Some(Ok(Message::Binary(frame))) = binary.ws.next().await else {
            panic!("expected binary frames")
        };
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&frame[4..4 + len]).unwrap();
        if header["type"] == "message" {
            assert_eq!(&frame[4 + len..], &payload);
            assert!(
                header.get("data").is_none(),
                "payload travels outside the header"
            );
            break;
        }
    }

    // A truncated binary frame is a bad_frame error, not a disconnect.
    binary
        .ws
        .send(Message::Binary(bytes::Bytes::from_static(
            b"\x00\x00\x01\x00{",
        )))
        .await
        .unwrap();
    loop {
        let Some(Ok(Message::Binary(frame))) = binary.ws.next().await else {
            panic!("expected binary frames")
        };
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&frame[4..4 + len]).unwrap();
        if header["type"] == "error" {
            assert_eq!(header["code"], "bad_frame");
            break;
        }
    }
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn silent_connections_are_reaped_and_live_ones_kept() {
    let relay = TestRelay::start_with(|c| {
        c.heartbeat.interval_ms = 50;
        c.heartbeat.idle_timeout_ms = 300;
    })
    .await;
    // This one never reads, so it never answers the relay's pings.
    let mut silent = WsTester::greeted(&relay.ws_url()).await.unwrap();
    // This one reads (tungstenite answers pings while reading).
    let mut live = WsTester::greeted(&relay.ws_url()).await.unwrap();
    let keep_reading = tokio::spawn(async move {
        let end = tokio::time::Instant::now() + Duration::from_millis(900);
        while tokio::time::Instant::now() < end {
            let _ = tokio::time::timeout(Duration::from_millis(50), live.ws.next()).await;
        }
        live
    });
    tokio::time::sleep(Duration::from_millis(900)).await;
    let mut live = keep_reading.await.unwrap();
    live.assert_alive().await.unwrap();
    let close = silent.expect_close().await.unwrap();
    assert_eq!(close.map(|c| c.code), Some(CloseCode::Away));
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_connection_that_never_says_hello_is_closed_with_1008() {
    let relay = TestRelay::start_with(|c| {
        c.heartbeat.interval_ms = 50;
        c.heartbeat.idle_timeout_ms = 200;
    })
    .await;
    let mut mute = WsTester::connect(&relay.ws_url()).await.unwrap();
    // Reading answers the relay's pings, so only the missing hello can close it.
    let close = mute.expect_close().await.unwrap().expect("close frame");
    assert_eq!(close.code, CloseCode::Policy);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_publishers_are_delivered_in_sequence_order() {
    const PER_PUBLISHER: u64 = 300;
    // Room for every message, so a subscriber slowed by a busy test machine
    // is not mistaken for a slow consumer (whose messages are dropped).
    let relay = TestRelay::start_with(|c| c.limits.outbound_queue = 4096).await;
    let mut subscriber = WsTester::greeted(&relay.ws_url()).await.unwrap();
    subscriber
        .send(json!({"type": "subscribe", "channel": "race"}))
        .await
        .unwrap();
    subscriber.recv_type("subscribed").await.unwrap();
    let mut publishers = Vec::new();
    for p in 0..4 {
        let url = relay.ws_url();
        publishers.push(tokio::spawn(async move {
            let mut publisher = WsTester::greeted(&url).await.unwrap();
            for i in 0..PER_PUBLISHER {
                publisher
                    .send(json!({"type": "publish", "channel": "race", "data": format!("{p}-{i}")}))
                    .await
                    .unwrap();
            }
            publisher.assert_alive().await.unwrap();
        }));
    }
    let mut last_from = [None::<u64>; 4];
    for expected_seq in 1..=4 * PER_PUBLISHER {
        let msg = subscriber.recv_type("message").await.unwrap();
        assert_eq!(msg["seq"], expected_seq, "gap or reordering: {msg}");
        // Each publisher's own messages keep their order too.
        let (p, i) = msg["data"].as_str().unwrap().split_once('-').unwrap();
        let (p, i): (usize, u64) = (p.parse().unwrap(), i.parse().unwrap());
        assert!(
            last_from[p].is_none_or(|last| i == last + 1),
            "publisher {p} out of order"
        );
        last_from[p] = Some(i);
    }
    for publisher in publishers {
        publisher.await.unwrap();
    }
    relay.stop().await.unwrap();
}

/// Reads raw frames from a `hello.batch` client until `count` channel
/// messages have arrived; returns them (text frames split on `\n`, binary
/// frames on their length prefixes, as PROTOCOL §2.1 says) and the number
/// of frames they came in.
async fn read_batched(client: &mut WsTester, count: usize) -> (Vec<(u64, Vec<u8>)>, usize) {
    let (mut messages, mut frames) = (Vec::new(), 0);
    while messages.len() < count {
        let frame = tokio::time::timeout(Duration::from_secs(20), client.ws.next())
            .await
            .expect("messages in time")
            .expect("connection open")
            .expect("a frame");
        frames += 1;
        match frame {
            Message::Text(text) => {
                for line in text.split('\n').filter(|l| !l.is_empty()) {
                    let msg: serde_json::Value = serde_json::from_str(line).unwrap();
                    if msg["type"] == "message" {
                        messages.push((msg["seq"].as_u64().unwrap(), data_bytes(&msg["data"])));
                    }
                }
            }
            Message::Binary(bytes) => {
                let mut at = 0;
                while at < bytes.len() {
                    let length = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
                    let message = &bytes[at + 4..at + 4 + length];
                    at += 4 + length;
                    let header = u32::from_be_bytes(message[..4].try_into().unwrap()) as usize;
                    let head: serde_json::Value =
                        serde_json::from_slice(&message[4..4 + header]).unwrap();
                    if head["type"] == "message" {
                        let payload = message[4 + header..].to_vec();
                        messages.push((head["seq"].as_u64().unwrap(), payload));
                    }
                }
            }
            _ => frames -= 1,
        }
    }
    (messages, frames)
}

/// A message's `data` as bytes: a JSON string, or `{"b64": ...}`.
fn data_bytes(data: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    match data {
        serde_json::Value::String(text) => text.clone().into_bytes(),
        serde_json::Value::Null => Vec::new(),
        other => base64::engine::general_purpose::STANDARD
            .decode(other["b64"].as_str().unwrap())
            .unwrap(),
    }
}

#[tokio::test]
async fn batched_and_unbatched_subscribers_get_the_same_messages_in_order() {
    const COUNT: usize = 2000;
    let relay = TestRelay::start().await;
    let url = relay.ws_url();
    let subscribe = json!({"type": "subscribe", "channel": "mixed"});

    let mut plain = WsTester::greeted(&url).await.unwrap();
    plain.send(subscribe.clone()).await.unwrap();
    plain.recv_type("subscribed").await.unwrap();

    let mut text = WsTester::connect(&url).await.unwrap();
    text.send(json!({"type": "hello", "v": 1, "batch": true}))
        .await
        .unwrap();
    let welcome = text.recv().await.unwrap();
    assert_eq!(welcome["batch"], true, "{welcome}");
    text.send(subscribe.clone()).await.unwrap();
    text.recv_type("subscribed").await.unwrap();

    let mut binary = WsTester::connect(&url).await.unwrap();
    let hello = wasmrelay_tests::binary_message(json!({"type": "hello", "v": 1, "batch": true}));
    binary
        .ws
        .send(Message::Binary(hello.unwrap().into()))
        .await
        .unwrap();
    // The welcome is an ordinary binary frame; batches start after it.
    match binary.ws.next().await.unwrap().unwrap() {
        Message::Binary(frame) => {
            let header = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
            let welcome: serde_json::Value = serde_json::from_slice(&frame[4..4 + header]).unwrap();
            assert_eq!(
                (&welcome["type"], &welcome["batch"]),
                (&json!("welcome"), &json!(true))
            );
        }
        other => panic!("expected a binary welcome, got {other:?}"),
    }
    let subscribe_frame = wasmrelay_tests::binary_message(subscribe).unwrap();
    binary
        .ws
        .send(Message::Binary(subscribe_frame.into()))
        .await
        .unwrap();

    // Newlines and bytes that are not UTF-8 in payloads: neither may break a batch.
    let mut publisher = WsTester::greeted(&url).await.unwrap();
    let mut burst = Vec::new();
    for i in 0..COUNT {
        let data = match i % 3 {
            0 => json!(format!("line {i}\nand the next")),
            1 => {
                json!({"b64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0xff, i as u8, b'\n'])})
            }
            _ => json!("x".repeat(i % 300)),
        };
        let publish = json!({"type": "publish", "channel": "mixed", "data": data});
        burst.push(Ok(Message::Text(publish.to_string().into())));
    }
    // One write: the relay finds many messages queued for each subscriber.
    publisher
        .ws
        .send_all(&mut futures_util::stream::iter(burst))
        .await
        .unwrap();

    let mut expected = Vec::new();
    while expected.len() < COUNT {
        let msg = plain.recv_type("message").await.unwrap();
        expected.push((msg["seq"].as_u64().unwrap(), data_bytes(&msg["data"])));
    }
    assert!(
        expected.windows(2).all(|w| w[0].0 + 1 == w[1].0),
        "in seq order"
    );
    let (from_text, text_frames) = read_batched(&mut text, COUNT).await;
    let (from_binary, binary_frames) = read_batched(&mut binary, COUNT).await;
    assert_eq!(from_text, expected, "text batches");
    assert_eq!(from_binary, expected, "binary batches");
    eprintln!("{COUNT} messages: {text_frames} text frames, {binary_frames} binary frames");
    assert!(
        text_frames < COUNT && binary_frames < COUNT,
        "messages shared frames"
    );
    text.assert_alive().await.unwrap();
}
