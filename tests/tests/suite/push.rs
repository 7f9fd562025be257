//! Push, notify then pull, against a real relay with the demo policy: an
//! operator's file offered to a user who is offline, told when they
//! connect and pulled with a resume; an offer that expires; a client that
//! offers its own file to a channel and to a session; who may offer and
//! pull.

use std::time::Duration;

use serde_json::{Value, json};
use wasmrelay_client::protocol::{ErrorCode, Target};
use wasmrelay_client::{Client, Msg};
use wasmrelay_tests::{TestRelay, Via, admin_client};

use super::files::{content, crc32c, demo_relay, seed, sha256_hex};
use super::transfers::next;

const VIP: &str = "vip-demo-token";
const NORMAL: &str = "normal-demo-token";

async fn connect(relay: &TestRelay, via: Via, token: Option<&str>) -> Client {
    super::transfers::connect(relay, via, token, None).await
}

/// Puts `data` on the relay as the operator; the file's id.
async fn operator_file(relay: &TestRelay, name: &str, data: &[u8]) -> String {
    let response = admin_client()
        .post(relay.url(&format!("/admin/files?name={name}")))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let file: Value = response.json().await.unwrap();
    assert_eq!(file["sha256"], sha256_hex(data));
    assert_eq!(file["owner"], "operator");
    file["id"].as_str().unwrap().to_owned()
}

async fn operator_offer(relay: &TestRelay, body: Value) -> (u16, Value) {
    let response = admin_client()
        .post(relay.url("/admin/offers"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn offer_state(relay: &TestRelay, offer: &str) -> Value {
    admin_client()
        .get(relay.url(&format!("/admin/offers/{offer}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Pulls download `id` of `file` with `offer` from `offset`, stopping after
/// `stop` bytes; the bytes and whether the last chunk came.
async fn pull(
    client: &mut Client,
    id: &str,
    file: &str,
    offer: &str,
    offset: u64,
    stop: u64,
) -> (Vec<u8>, bool) {
    client
        .send(&Msg::Download {
            id: id.into(),
            file: file.into(),
            offset,
            chunk_size: Some(16 * 1024),
            offer: Some(offer.into()),
        })
        .await
        .unwrap();
    match next(client).await {
        Msg::DownloadReady { offset: from, .. } => assert_eq!(from, offset),
        other => panic!("expected download_ready, got {other:?}"),
    }
    let mut bytes = Vec::new();
    loop {
        match next(client).await {
            Msg::Chunk {
                crc32c: crc,
                last,
                data,
                ..
            } => {
                assert_eq!(crc, crc32c(data.as_bytes()));
                bytes.extend_from_slice(data.as_bytes());
                if last {
                    return (bytes, true);
                }
                if bytes.len() as u64 >= stop {
                    return (bytes, false);
                }
            }
            other => panic!("expected a chunk, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_file_offered_to_an_offline_user_is_told_on_connect_and_pulled_with_a_resume() {
    let relay = demo_relay(|_| {}).await;
    let data = content(300_000, seed());
    let file = operator_file(&relay, "report%201.bin", &data).await;
    // bob (normal tier) is not connected.
    let (status, made) = operator_offer(
        &relay,
        json!({"file": file, "to": {"user": "bob"}, "ttl_ms": 60_000}),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["delivered"], 0);
    let offer = made["offer"]["id"].as_str().unwrap().to_owned();
    assert_eq!(offer_state(&relay, &offer).await["state"], "offered");

    let mut bob = connect(&relay, Via::Ws, Some(NORMAL)).await;
    match next(&mut bob).await {
        Msg::FileOffer {
            offer: told,
            file: of,
            name,
            size,
            sha256,
            from,
            ..
        } => {
            assert_eq!(
                (told.as_str(), of.as_str()),
                (offer.as_str(), file.as_str())
            );
            assert_eq!(name, "report 1.bin");
            assert_eq!(size, data.len() as u64);
            assert_eq!(sha256, sha256_hex(&data));
            assert_eq!(from, "operator");
        }
        other => panic!("expected file_offer, got {other:?}"),
    }
    // Part of it, then the connection is killed.
    let (first, done) = pull(&mut bob, "p1", &file, &offer, 0, 100_000).await;
    assert!(!done);
    drop(bob);
    // `done` means the relay sent the last byte; socket buffers may have
    // taken all of it before the kill.
    let state = offer_state(&relay, &offer).await;
    assert!(
        state["state"] == "pulling" || state["state"] == "done",
        "{state}"
    );
    assert_eq!(state["pulls"], 1);

    // Over QUIC this time: told again if the relay had not sent it all (a
    // done offer is not announced again, but can still be pulled); the
    // pull resumes where it stopped.
    let mut bob = connect(&relay, Via::Quic, Some(NORMAL)).await;
    if state["state"] == "pulling" {
        let Msg::FileOffer { offer: again, .. } = next(&mut bob).await else {
            panic!("expected file_offer again")
        };
        assert_eq!(again, offer);
    }
    let (rest, done) = pull(&mut bob, "p2", &file, &offer, first.len() as u64, u64::MAX).await;
    assert!(done);
    assert!([first, rest].concat() == data);
    let done = wasmrelay_tests::wait_for("the offer done", Duration::from_secs(5), || async {
        let state = offer_state(&relay, &offer).await;
        (state["state"] == "done").then_some(state)
    })
    .await;
    assert_eq!(done["pulls"], 2);
    // Done is not closed: bob can fetch it again (over HTTP) until the TTL.
    let again = reqwest::Client::new()
        .get(relay.url(&format!("/files/{file}?offer={offer}")))
        .bearer_auth(NORMAL)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert!(again.bytes().await.unwrap() == data);

    // Not bob: the offer is not theirs, and the file is not theirs.
    let mut alice = connect(&relay, Via::Ws, Some(VIP)).await;
    alice
        .send(&Msg::Download {
            id: "x".into(),
            file: file.clone(),
            offset: 0,
            chunk_size: None,
            offer: Some(offer.clone()),
        })
        .await
        .unwrap();
    let Msg::Error { code, .. } = next(&mut alice).await else {
        panic!("expected an error")
    };
    assert_eq!(code, ErrorCode::NotFound);
    let response = reqwest::Client::new()
        .get(relay.url(&format!("/files/{file}?offer={offer}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "a guest with bob's offer id");
    bob.close().await.unwrap();
    alice.close().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn an_offer_expires_after_its_ttl() {
    let relay = demo_relay(|_| {}).await;
    let data = content(1000, seed());
    let file = operator_file(&relay, "late.bin", &data).await;
    let (status, made) = operator_offer(
        &relay,
        json!({"file": file, "to": {"user": "bob"}, "ttl_ms": 300}),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let offer = made["offer"]["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(offer_state(&relay, &offer).await["state"], "expired");
    // bob connects: not told (the first message after welcome is the pong).
    let mut bob = connect(&relay, Via::Ws, Some(NORMAL)).await;
    bob.send(&Msg::Ping {
        id: Some("after".into()),
    })
    .await
    .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), bob.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        Msg::Pong {
            id: Some("after".into())
        }
    );
    let response = reqwest::Client::new()
        .get(relay.url(&format!("/files/{file}?offer={offer}")))
        .bearer_auth(NORMAL)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
    let listed: Value = admin_client()
        .get(relay.url(&format!("/admin/offers?file={file}&state=expired")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Listed by its recorded state once the sweep has run; by now it shows
    // as expired whichever way.
    let all: Value = admin_client()
        .get(relay.url(&format!("/admin/offers?file={file}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["offers"][0]["state"], "expired", "{all} {listed}");
    bob.close().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_offers_its_file_to_a_channel_and_to_a_session() {
    let relay = demo_relay(|_| {}).await;
    let data = content(50_000, seed());
    // alice (vip) uploads over tus, then offers it from her connection.
    let url = super::files::create(&relay, VIP, data.len(), "slides.pdf").await;
    assert_eq!(
        super::files::patch(&url, VIP, 0, data.clone())
            .await
            .status(),
        204
    );
    let file = url.rsplit('/').next().unwrap().to_owned();
    let mut guest = connect(&relay, Via::Ws, None).await;
    guest
        .send(&Msg::Subscribe {
            channel: "news".into(),
            recover: None,
        })
        .await
        .unwrap();
    assert!(matches!(next(&mut guest).await, Msg::Subscribed { .. }));
    let bob = connect(&relay, Via::Quic, Some(NORMAL)).await;
    let bob_session = bob.session().to_owned();
    let mut bob = bob;

    let mut alice = connect(&relay, Via::Ws, Some(VIP)).await;
    for (id, to) in [
        ("o1", Target::Channel("news".into())),
        ("o2", Target::Session(bob_session.clone())),
    ] {
        alice
            .send(&Msg::Offer {
                id: id.into(),
                file: file.clone(),
                to,
                ttl_ms: Some(60_000),
            })
            .await
            .unwrap();
        match next(&mut alice).await {
            Msg::Offered {
                id: of, delivered, ..
            } => {
                assert_eq!((of.as_str(), delivered), (id, 1));
            }
            other => panic!("expected offered, got {other:?}"),
        }
    }
    // The guest pulls the channel's offer over HTTP.
    let Msg::FileOffer { offer, from, .. } = next(&mut guest).await else {
        panic!("expected file_offer")
    };
    assert_eq!(from, "alice");
    let body = reqwest::Client::new()
        .get(relay.url(&format!("/files/{file}?offer={offer}")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(body == data);
    // bob pulls the session's offer.
    let Msg::FileOffer { offer, .. } = next(&mut bob).await else {
        panic!("expected file_offer")
    };
    let (bytes, done) = pull(&mut bob, "b", &file, &offer, 0, u64::MAX).await;
    assert!(done && bytes == data);

    // bob's tier may not push, and a file that is not yours cannot be offered.
    bob.send(&Msg::Offer {
        id: "nope".into(),
        file: file.clone(),
        to: Target::User("alice".into()),
        ttl_ms: None,
    })
    .await
    .unwrap();
    let Msg::Error { code, id, .. } = next(&mut bob).await else {
        panic!("expected an error")
    };
    assert_eq!((code, id.as_deref()), (ErrorCode::NotFound, Some("nope")));
    let (status, refused) =
        operator_offer(&relay, json!({"file": file, "to": {"session": "nobody.1"}})).await;
    assert_eq!(status, 400, "{refused}");
    for client in [guest, bob, alice] {
        client.close().await.unwrap();
    }
    relay.stop().await.unwrap();
}

/// `wasmrelay push` and `wasmrelay offers`, the real binary against a relay.
#[tokio::test]
async fn the_cli_pushes_a_file_and_lists_its_offer() {
    const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");
    let relay = demo_relay(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes v2.txt");
    let data = content(200_000, seed());
    std::fs::write(&path, &data).unwrap();
    let base = relay.url("");
    let cli = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--relay".into(), base.clone()]);
        all.extend(["--token".into(), wasmrelay_tests::TEST_ADMIN_TOKEN.into()]);
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(RELAY)
                .args(&all)
                .output()
                .unwrap()
        })
    };
    let out = cli(&[
        "push",
        path.to_str().unwrap(),
        "--to",
        "user:bob",
        "--ttl-ms",
        "60000",
    ])
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains(&sha256_hex(&data)), "{said}");
    assert!(said.contains("offered to user:bob"), "{said}");

    let mut bob = connect(&relay, Via::Ws, Some(NORMAL)).await;
    let Msg::FileOffer {
        offer, file, name, ..
    } = next(&mut bob).await
    else {
        panic!("expected file_offer")
    };
    assert_eq!(name, "notes v2.txt");
    let (bytes, done) = pull(&mut bob, "cli", &file, &offer, 0, u64::MAX).await;
    assert!(done && bytes == data);

    let out = cli(&["offers", "--file", &file]).await.unwrap();
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{listed}");
    assert!(
        listed.contains(&offer) && listed.contains("user:bob"),
        "{listed}"
    );
    // A bad target is refused before anything is uploaded.
    let out = cli(&["push", path.to_str().unwrap(), "--to", "everyone"])
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("user:NAME"));
    bob.close().await.unwrap();
    relay.stop().await.unwrap();
}

/// The README's tour: the example client waits for files; one pushed to
/// its user arrives, resuming a part it already had, and checks out.
#[tokio::test]
async fn the_example_client_receives_a_pushed_file_resuming_a_partial_one() {
    const WS_CLIENT: &str = env!("CARGO_BIN_EXE_test-ws-client");
    let relay = demo_relay(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let data = content(700_000, seed());
    // Half of it from an earlier, interrupted pull.
    std::fs::write(dir.path().join("big.bin.part"), &data[..350_000]).unwrap();
    let mut receiver = wasmrelay_tests::ChildProcess::spawn(
        WS_CLIENT,
        &[
            "--relay",
            &relay.ws_url(),
            "--token",
            NORMAL,
            "receive",
            "--dir",
            dir.path().to_str().unwrap(),
            "--count",
            "1",
        ],
    )
    .unwrap();
    // Once bob is connected, push to him.
    wasmrelay_tests::wait_for(
        "the example client connected",
        Duration::from_secs(20),
        || async {
            let conns: Value = admin_client()
                .get(relay.url("/admin/connections"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            conns["connections"]
                .as_array()?
                .iter()
                .any(|c| c["user"] == "bob")
                .then_some(())
        },
    )
    .await;
    let file = operator_file(&relay, "big.bin", &data).await;
    let (status, made) = operator_offer(&relay, json!({"file": file, "to": {"user": "bob"}})).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["delivered"], 1);
    let exit = tokio::task::spawn_blocking(move || {
        let status = receiver.wait_exit(Duration::from_secs(20));
        (status, receiver)
    })
    .await
    .unwrap();
    assert!(
        exit.0.is_some_and(|s| s.success()),
        "the example client failed"
    );
    let received = std::fs::read(dir.path().join("big.bin")).unwrap();
    assert!(received == data);
    assert!(!dir.path().join("big.bin.part").exists());
    relay.stop().await.unwrap();
}
