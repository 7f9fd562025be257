//! QUIC against a real relay: the same protocol on a control stream, the
//! same session, channels and spaces as WebSocket (clients on either
//! transport see each other), the development certificate, and bad input.

use std::time::Duration;

use serde_json::json;
use wasmrelay_tests::{QuicTester, TestRelay, WsTester, get_json, quic_client};

#[tokio::test]
async fn quic_and_websocket_clients_share_channels_and_spaces() {
    let relay = TestRelay::start().await;
    let quic_addr = relay.quic_addr.expect("QUIC is on");
    let mut quic = QuicTester::greeted(quic_addr, &relay.cert_pem)
        .await
        .unwrap();
    quic.send(json!({"type": "subscribe", "channel": "mixed"}))
        .await
        .unwrap();
    assert_eq!(quic.recv_type("subscribed").await.unwrap()["presence"], 1);

    let mut ws = WsTester::greeted(&relay.ws_url()).await.unwrap();
    ws.send(json!({"type": "publish", "channel": "mixed", "data": "from ws"}))
        .await
        .unwrap();
    let msg = quic.recv_type("message").await.unwrap();
    assert_eq!(
        (msg["seq"].as_u64(), msg["data"].as_str()),
        (Some(1), Some("from ws"))
    );

    // A service instance over QUIC serves a WebSocket caller.
    quic.send(json!({"type": "register", "space": "q"}))
        .await
        .unwrap();
    quic.recv_type("registered").await.unwrap();
    ws.send(json!({"type": "request", "id": "r1", "space": "q", "data": "hi"}))
        .await
        .unwrap();
    let request = quic.recv_type("request").await.unwrap();
    assert_eq!(request["data"], "hi");
    quic.send(json!({"type": "response", "id": request["id"], "data": "HI"}))
        .await
        .unwrap();
    let response = ws.recv_type("response").await.unwrap();
    assert_eq!(
        (response["id"].as_str(), response["data"].as_str()),
        (Some("r1"), Some("HI"))
    );

    let table = get_json(&relay.url("/admin/connections")).await.unwrap();
    let quic_rows: Vec<_> = table["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["transport"] == "quic")
        .collect();
    assert_eq!(quic_rows.len(), 1, "{table}");
    assert_eq!(quic_rows[0]["state"], "open");
    assert_eq!(quic_rows[0]["spaces"], json!(["q"]));
    assert!(quic_rows[0]["msgs_in"].as_u64().unwrap() >= 4);
    // quinn's path figures appear within a second or so.
    let figures = wasmrelay_tests::wait_json(
        "QUIC path figures",
        &relay.url("/admin/connections"),
        Duration::from_secs(5),
        |t| {
            t["connections"]
                .as_array()
                .is_some_and(|rows| rows.iter().any(|r| r["quic"]["rtt_us"].is_u64()))
        },
    )
    .await;
    let row = figures["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["transport"] == "quic")
        .unwrap()
        .clone();
    assert!(row["quic"]["cwnd_bytes"].as_u64().unwrap() > 0, "{row}");
    assert!(row["quic"]["sent_packets"].as_u64().unwrap() > 0, "{row}");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn bad_frames_get_errors_and_oversize_frames_close_the_connection() {
    let relay = TestRelay::start_with(|c| c.limits.max_message_bytes = 4096).await;
    let quic_addr = relay.quic_addr.unwrap();
    let mut quic = QuicTester::greeted(quic_addr, &relay.cert_pem)
        .await
        .unwrap();
    let mut bystander = QuicTester::greeted(quic_addr, &relay.cert_pem)
        .await
        .unwrap();

    // Garbage inside a well-formed frame: an error, and the connection lives.
    quic.send_raw(b"\x00\x00\x00\x05{oops").await.unwrap();
    assert_eq!(quic.recv().await.unwrap()["code"], "bad_frame");
    quic.send(json!({"type": "teleport", "id": "t"}))
        .await
        .unwrap();
    assert_eq!(quic.recv().await.unwrap()["code"], "unknown_type");
    quic.send(json!({"type": "ping", "id": "p"})).await.unwrap();
    assert_eq!(quic.recv_type("pong").await.unwrap()["id"], "p");

    // A frame over the limit closes the connection with TOO_LARGE (0x3).
    quic.send
        .write_all(&(1_000_000u32).to_be_bytes())
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), quic.connection.closed())
        .await
        .expect("closed in time");
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(0x3), "{close:?}");
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    bystander
        .send(json!({"type": "ping", "id": "still"}))
        .await
        .unwrap();
    assert_eq!(bystander.recv_type("pong").await.unwrap()["id"], "still");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn wrong_alpn_and_untrusted_certificates_fail_the_handshake() {
    let relay = TestRelay::start().await;
    let quic_addr = relay.quic_addr.unwrap();
    let endpoint = quic_client(&relay.cert_pem, b"h3").unwrap();
    let attempt = endpoint.connect(quic_addr, "localhost").unwrap().await;
    assert!(attempt.is_err(), "a wrong ALPN must not connect");

    // Another relay's development certificate is not this one's.
    let other = TestRelay::start().await;
    let endpoint = quic_client(&other.cert_pem, b"wasmrelay/1").unwrap();
    let attempt = endpoint.connect(quic_addr, "localhost").unwrap().await;
    assert!(
        attempt.is_err(),
        "an untrusted certificate must not connect"
    );

    // The development certificate is reused across restarts of the same data dir.
    let good = QuicTester::greeted(quic_addr, &relay.cert_pem).await;
    assert!(good.is_ok());
    other.stop().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_sends_goaway_then_closes_with_shutdown_code() {
    let relay = TestRelay::start().await;
    let mut quic = QuicTester::greeted(relay.quic_addr.unwrap(), &relay.cert_pem)
        .await
        .unwrap();
    relay.begin_shutdown();
    assert_eq!(quic.recv_type("goaway").await.unwrap()["type"], "goaway");
    let reason = tokio::time::timeout(Duration::from_secs(10), quic.connection.closed())
        .await
        .expect("closed in time");
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(0x1));
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn the_example_service_app_serves_over_quic() {
    use wasmrelay_client::Trust;
    use wasmrelay_examples::service_app::{self, Options};
    // With the demo policy, so the app's token decides who it is: QUIC has
    // no handshake headers, the token travels in hello.
    let relay =
        TestRelay::start_with(|c| c.plugins.bundled = vec!["tiered-policy".to_owned()]).await;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(service_app::run(
        Options {
            relay: format!("quic://{}", relay.quic_addr.unwrap()),
            trust: Trust {
                ca: Some(relay.cert_pem.clone()),
                pin_sha256: None,
            },
            token: Some("service-demo-token".into()),
            space: "demo".into(),
            work_ms: 50,
            steps: 1,
        },
        stop.clone(),
    ));
    wasmrelay_tests::wait_json(
        "the QUIC service app to register",
        &relay.url("/spaces/demo"),
        Duration::from_secs(10),
        |info| info["connected"] == true,
    )
    .await;
    let response = reqwest::Client::new()
        .post(relay.url("/spaces/demo/"))
        .body("over quic")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "OVER QUIC");
    let table = wasmrelay_tests::get_json(&relay.url("/admin/connections"))
        .await
        .unwrap();
    assert!(
        table["connections"].as_array().unwrap().iter().any(|row| {
            row["transport"] == "quic" && row["user"] == "svc" && row["tier"] == "service"
        }),
        "the app is known by its token: {table}"
    );
    stop.cancel();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn clients_pin_the_certificate_by_sha256() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use wasmrelay_client::{Client, Options, Trust};
    let relay = TestRelay::start().await;
    let url = format!("quic://{}", relay.quic_addr.unwrap());
    let cert = CertificateDer::from_pem_file(&relay.cert_pem).unwrap();
    let pin = wasmrelay::transport::tls::fingerprint(&cert);
    let trust = Trust {
        ca: None,
        pin_sha256: Some(pin.clone()),
    };
    let client = Client::connect(&url, Options::named("pinned").trust(trust))
        .await
        .unwrap();
    client.close().await.unwrap();

    let wrong = Trust {
        ca: None,
        pin_sha256: Some("00".repeat(32)),
    };
    assert!(
        Client::connect(&url, Options::named("wrong pin").trust(wrong))
            .await
            .is_err()
    );
    let none = Client::connect(&url, Options::named("no trust")).await;
    let message = format!(
        "{:#}",
        none.err().expect("refuses without --ca or --pin-sha256")
    );
    assert!(message.contains("--ca"), "{message}");
    relay.stop().await.unwrap();
}

/// A caller and a service instance, both over QUIC, on `relay`.
async fn quic_caller_and_instance(relay: &TestRelay, space: &str) -> (QuicTester, QuicTester) {
    let addr = relay.quic_addr.unwrap();
    let mut instance = QuicTester::greeted(addr, &relay.cert_pem).await.unwrap();
    instance
        .send(json!({"type": "register", "space": space}))
        .await
        .unwrap();
    instance.recv_type("registered").await.unwrap();
    let caller = QuicTester::greeted(addr, &relay.cert_pem).await.unwrap();
    (caller, instance)
}

#[tokio::test]
async fn bulk_bodies_travel_on_their_own_streams_and_never_block_control() {
    let relay = TestRelay::start().await;
    let (mut caller, mut instance) = quic_caller_and_instance(&relay, "bulk").await;
    let body = "b".repeat(200 * 1024);

    // The caller starts a bulk request but holds back its last bytes: the
    // control stream stays responsive meanwhile.
    let message = wasmrelay_tests::binary_message(
        json!({"type": "request", "id": "big", "space": "bulk", "data": body}),
    )
    .unwrap();
    let frame = wasmrelay_tests::frame(&message);
    let mut stream = caller.connection.open_uni().await.unwrap();
    stream.write_all(&frame[..frame.len() - 10]).await.unwrap();
    caller
        .send(json!({"type": "ping", "id": "during"}))
        .await
        .unwrap();
    assert_eq!(caller.recv_type("pong").await.unwrap()["id"], "during");
    stream.write_all(&frame[frame.len() - 10..]).await.unwrap();
    stream.finish().unwrap();

    // The relay hands the instance the request on a bulk stream.
    let request = instance.recv_type("request").await.unwrap();
    assert_eq!(request["data"].as_str().unwrap().len(), body.len());
    assert_eq!(instance.bulk_received, 1);

    // A bulk response comes back to the caller on a bulk stream as well.
    let reply = "R".repeat(300 * 1024);
    instance
        .send_bulk(json!({"type": "response", "id": request["id"], "data": reply}))
        .await
        .unwrap();
    let response = caller.recv_type("response").await.unwrap();
    assert_eq!(response["id"], "big");
    assert_eq!(response["data"].as_str().unwrap(), reply);
    assert_eq!(caller.bulk_received, 1);

    // Small bodies stay on the control stream.
    caller
        .send(json!({"type": "request", "id": "small", "space": "bulk", "data": "hi"}))
        .await
        .unwrap();
    let request = instance.recv_type("request").await.unwrap();
    instance
        .send(json!({"type": "response", "id": request["id"], "data": "HI"}))
        .await
        .unwrap();
    assert_eq!(caller.recv_type("response").await.unwrap()["data"], "HI");
    assert_eq!((caller.bulk_received, instance.bulk_received), (1, 1));
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn too_many_bulk_streams_wait_for_credit_and_nothing_else_suffers() {
    let relay = TestRelay::start().await;
    let addr = relay.quic_addr.unwrap();
    let mut greedy = QuicTester::greeted(addr, &relay.cert_pem).await.unwrap();
    let mut bystander = QuicTester::greeted(addr, &relay.cert_pem).await.unwrap();

    // Sixteen bulk streams, each stuck after its length prefix.
    let mut held = Vec::new();
    for _ in 0..wasmrelay::protocol::quic::MAX_BULK_STREAMS {
        let mut stream = greedy.connection.open_uni().await.unwrap();
        stream.write_all(&1000u32.to_be_bytes()).await.unwrap();
        held.push(stream);
    }
    // A seventeenth gets no credit from the relay...
    let extra =
        tokio::time::timeout(Duration::from_millis(500), greedy.connection.open_uni()).await;
    assert!(extra.is_err(), "the relay granted a 17th bulk stream");
    // ...while the control stream and other connections carry on.
    greedy
        .send(json!({"type": "ping", "id": "still here"}))
        .await
        .unwrap();
    assert_eq!(greedy.recv_type("pong").await.unwrap()["id"], "still here");
    bystander
        .send(json!({"type": "ping", "id": "b"}))
        .await
        .unwrap();
    assert_eq!(bystander.recv_type("pong").await.unwrap()["id"], "b");

    // Resetting held streams costs only their messages and frees credit
    // (quinn grants it in batches: once 1/8 of the limit, here 3 streams, is free).
    for _ in 0..3 {
        held.pop().unwrap().reset(0x42u32.into()).unwrap();
        let error = greedy.recv_type("error").await.unwrap();
        assert_eq!(error["code"], "bad_frame", "{error}");
        assert!(
            error["message"].as_str().unwrap().contains("reset"),
            "{error}"
        );
    }
    let extra = tokio::time::timeout(Duration::from_secs(5), greedy.connection.open_uni())
        .await
        .expect("credit comes back once a stream ends");
    assert!(extra.is_ok());
    greedy
        .send(json!({"type": "ping", "id": "after"}))
        .await
        .unwrap();
    assert_eq!(greedy.recv_type("pong").await.unwrap()["id"], "after");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_bulk_stream_reset_or_oversize_loses_only_its_own_message() {
    let relay = TestRelay::start_with(|c| c.limits.max_message_bytes = 64 * 1024).await;
    let (mut caller, mut instance) = quic_caller_and_instance(&relay, "reset").await;

    // Reset mid-body: the caller hears why, the instance sees nothing of it.
    let message = wasmrelay_tests::binary_message(
        json!({"type": "request", "id": "doomed", "space": "reset", "data": "x".repeat(40_000)}),
    )
    .unwrap();
    let frame = wasmrelay_tests::frame(&message);
    let mut stream = caller.connection.open_uni().await.unwrap();
    stream.write_all(&frame[..frame.len() / 2]).await.unwrap();
    stream.reset(0x42u32.into()).unwrap();
    let error = caller.recv_type("error").await.unwrap();
    assert_eq!(error["code"], "bad_frame", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("code 66"),
        "{error}"
    );

    // A bulk frame over max_message_bytes: too_large, and the relay stops the
    // stream with code 0x3 without reading it.
    let mut stream = caller.connection.open_uni().await.unwrap();
    stream.write_all(&1_000_000u32.to_be_bytes()).await.unwrap();
    let error = caller.recv_type("error").await.unwrap();
    assert_eq!(error["code"], "too_large", "{error}");
    let stopped = tokio::time::timeout(Duration::from_secs(5), stream.stopped())
        .await
        .expect("the relay stops the oversize stream");
    assert_eq!(stopped.unwrap(), Some(quinn::VarInt::from_u32(0x3)));

    // The next request is the first thing the instance sees, and the
    // connections are unharmed.
    caller
        .send_bulk(
            json!({"type": "request", "id": "fine", "space": "reset", "data": "y".repeat(40_000)}),
        )
        .await
        .unwrap();
    let request = instance.recv().await.unwrap();
    assert_eq!(request["type"], "request", "{request}");
    assert_eq!(request["data"].as_str().unwrap().len(), 40_000);
    instance
        .send(json!({"type": "response", "id": request["id"], "data": "ok"}))
        .await
        .unwrap();
    let response = caller.recv_type("response").await.unwrap();
    assert_eq!(
        (response["id"].as_str(), response["data"].as_str()),
        (Some("fine"), Some("ok"))
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn clients_asked_to_prove_their_address_with_a_retry_still_connect() {
    // Retry for every handshake: what a flood of Initials switches on.
    let relay = TestRelay::start_with(|c| c.server.quic_retry_above = 0).await;
    let mut client = QuicTester::greeted(relay.quic_addr.unwrap(), &relay.cert_pem)
        .await
        .unwrap();
    client
        .send(json!({"type": "ping", "id": "after-retry"}))
        .await
        .unwrap();
    assert_eq!(client.recv_type("pong").await.unwrap()["id"], "after-retry");
    relay.stop().await.unwrap();
}
