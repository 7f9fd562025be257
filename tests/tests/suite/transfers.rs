//! File transfers over WebSocket (binary frames) and QUIC with the Rust
//! client and the demo policy: uploads cut at random offsets and resumed
//! by presenting the previous session, downloads cut and resumed from an
//! offset, refused chunks, a wrong whole-file digest, and who may do what.

use std::time::Duration;

use wasmrelay_client::protocol::{Data, ErrorCode, Unfinished};
use wasmrelay_client::{Client, Encoding, Msg, Options, Trust};
use wasmrelay_tests::{TestRelay, Via};

use super::files::{content, crc32c, create, demo_relay, patch, seed, sha256_hex};

const VIP: &str = "vip-demo-token";
const NORMAL: &str = "normal-demo-token";
const CHUNK: u32 = 64 * 1024;

pub(crate) async fn connect(
    relay: &TestRelay,
    via: Via,
    token: Option<&str>,
    resume: Option<String>,
) -> Client {
    let url = match via {
        Via::Ws => relay.ws_url(),
        Via::Quic => format!("quic://{}", relay.quic_addr.unwrap()),
    };
    let mut options = Options::named("transfers")
        .token(token)
        .encoding(Encoding::Binary)
        .trust(Trust {
            ca: Some(relay.cert_pem.clone()),
            pin_sha256: None,
        });
    options.resume = resume;
    Client::connect(&url, options).await.unwrap()
}

/// The next message that is not a heartbeat, within 10 s.
pub(crate) async fn next(client: &mut Client) -> Msg {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), client.recv())
            .await
            .expect("a message within 10 s")
            .unwrap()
            .expect("the connection is open");
        if !matches!(msg, Msg::Pong { .. } | Msg::Ping { .. }) {
            return msg;
        }
    }
}

fn error_of(msg: &Msg) -> (ErrorCode, String, Option<String>) {
    match msg {
        Msg::Error {
            code, message, id, ..
        } => (*code, message.clone(), id.clone()),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn chunk(id: &str, seq: u64, offset: u64, bytes: &[u8], last: bool) -> Msg {
    Msg::Chunk {
        id: id.to_owned(),
        seq,
        offset,
        crc32c: crc32c(bytes),
        last,
        data: Data(bytes.to_vec().into()),
    }
}

/// Sends `data[from..to]` as chunks of upload `id`.
async fn send_range(client: &mut Client, id: &str, data: &[u8], from: u64, to: u64) {
    let mut at = from;
    let mut seq = 0;
    while at < to {
        let end = (at + u64::from(CHUNK)).min(to);
        let last = end == data.len() as u64;
        client
            .send(&chunk(id, seq, at, &data[at as usize..end as usize], last))
            .await
            .unwrap();
        at = end;
        seq += 1;
    }
}

/// Reconnects presenting `session` until the relay lists what it left
/// unfinished (the old connection's writer may still be recording it).
async fn resume(relay: &TestRelay, via: Via, session: &str) -> (Client, Vec<Unfinished>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let client = connect(relay, via, Some(VIP), Some(session.to_owned())).await;
        let Msg::Welcome { transfers, .. } = client.welcome().clone() else {
            unreachable!()
        };
        if !transfers.is_empty() {
            return (client, transfers);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay never listed the unfinished upload of {session}"
        );
        client.close().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn upload_cut_and_resumed(via: Via) {
    let relay = demo_relay(|_| {}).await;
    let seed = seed();
    let data = content(2 << 20, seed);
    let digest = sha256_hex(&data);
    let size = data.len() as u64;
    let mut random = content(64, seed ^ 0xc0ffee);
    let mut client = connect(&relay, via, Some(VIP), None).await;
    client
        .send(&Msg::Upload {
            id: "u0".into(),
            file: None,
            name: "resumed.bin".into(),
            size,
            sha256: Some(digest.clone()),
            chunk_size: Some(CHUNK),
        })
        .await
        .unwrap();
    let Msg::UploadReady {
        file,
        offset,
        chunk_size,
        ..
    } = next(&mut client).await
    else {
        panic!("expected upload_ready")
    };
    assert_eq!((offset, chunk_size), (0, CHUNK));
    let mut at = 0;
    let mut id = "u0".to_owned();
    for cut in 1..=3 {
        let pick = u64::from_le_bytes(random[..8].try_into().unwrap());
        random.rotate_left(8);
        let stop = at + 1 + pick % ((size - at) / 2);
        send_range(&mut client, &id, &data, at, stop).await;
        let session = client.session().to_owned();
        // Killed mid-upload: no close, no cancel.
        drop(client);
        let (resumed, unfinished) = resume(&relay, via, &session).await;
        client = resumed;
        assert_eq!(unfinished.len(), 1, "{unfinished:?}");
        assert_eq!(
            (unfinished[0].id.as_str(), unfinished[0].file.as_str()),
            (id.as_str(), file.as_str())
        );
        assert!(unfinished[0].offset <= stop);
        id = format!("u{cut}");
        client
            .send(&Msg::Upload {
                id: id.clone(),
                file: Some(file.clone()),
                name: String::new(),
                size: 0,
                sha256: None,
                chunk_size: Some(CHUNK),
            })
            .await
            .unwrap();
        let Msg::UploadReady { offset, .. } = next(&mut client).await else {
            panic!("expected upload_ready on resume")
        };
        assert!(
            offset >= at && offset <= stop,
            "resumed at {offset}, sent {at}..{stop}"
        );
        at = offset;
    }
    send_range(&mut client, &id, &data, at, size).await;
    match next(&mut client).await {
        Msg::UploadDone {
            id: done,
            file: done_file,
            size: done_size,
            sha256,
        } => {
            assert_eq!((done, done_file, done_size), (id, file.clone(), size));
            assert_eq!(sha256, digest, "seed {seed}");
        }
        other => panic!("expected upload_done, got {other:?}"),
    }
    // The same bytes over HTTP.
    let body = reqwest::Client::new()
        .get(relay.url(&format!("/files/{file}")))
        .bearer_auth(VIP)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(body == data, "seed {seed}");
    client.close().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_websocket_upload_cut_three_times_resumes_with_the_previous_session() {
    upload_cut_and_resumed(Via::Ws).await;
}

#[tokio::test]
async fn a_quic_upload_cut_three_times_resumes_with_the_previous_session() {
    upload_cut_and_resumed(Via::Quic).await;
}

/// Receives download `id` until `stop` bytes (or its end) arrived; the
/// bytes, checking each chunk's offset, sequence and CRC-32C.
async fn receive(client: &mut Client, id: &str, from: u64, stop: u64, into: &mut Vec<u8>) -> bool {
    let mut seq = 0;
    let mut at = from;
    loop {
        match next(client).await {
            Msg::Chunk {
                id: of,
                seq: n,
                offset,
                crc32c: crc,
                last,
                data,
            } => {
                assert_eq!(of, id);
                assert_eq!((n, offset), (seq, at));
                assert_eq!(crc, crc32c(data.as_bytes()));
                into.extend_from_slice(data.as_bytes());
                at += data.len() as u64;
                seq += 1;
                if last {
                    return true;
                }
                if at >= stop {
                    return false;
                }
            }
            other => panic!("expected a chunk of {id}, got {other:?}"),
        }
    }
}

async fn download_cut_and_resumed(via: Via) {
    let relay = demo_relay(|_| {}).await;
    let seed = seed();
    let data = content(3 << 20 | 12345, seed);
    let url = create(&relay, VIP, data.len(), "down.bin").await;
    assert_eq!(patch(&url, VIP, 0, data.clone()).await.status(), 204);
    let file = url.rsplit('/').next().unwrap().to_owned();

    let mut received = Vec::new();
    let mut client = connect(&relay, via, Some(VIP), None).await;
    for attempt in 0.. {
        let offset = received.len() as u64;
        client
            .send(&Msg::Download {
                id: format!("d{attempt}"),
                file: file.clone(),
                offset,
                chunk_size: Some(CHUNK),
                offer: None,
            })
            .await
            .unwrap();
        match next(&mut client).await {
            Msg::DownloadReady {
                size,
                sha256,
                offset: from,
                name,
                chunk_size,
                ..
            } => {
                assert_eq!((size, from, chunk_size), (data.len() as u64, offset, CHUNK));
                assert_eq!(sha256, sha256_hex(&data));
                assert_eq!(name, "down.bin");
            }
            other => panic!("expected download_ready, got {other:?}"),
        }
        let stop = if attempt < 2 {
            offset + (data.len() as u64 - offset) / 3
        } else {
            u64::MAX
        };
        if receive(
            &mut client,
            &format!("d{attempt}"),
            offset,
            stop,
            &mut received,
        )
        .await
        {
            break;
        }
        // Killed part-way: reconnect and ask from what arrived.
        drop(client);
        client = connect(&relay, via, Some(VIP), None).await;
    }
    assert!(received == data, "seed {seed}");
    client.close().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_websocket_download_cut_twice_resumes_from_its_offset() {
    download_cut_and_resumed(Via::Ws).await;
}

#[tokio::test]
async fn a_quic_download_cut_twice_resumes_from_its_offset() {
    download_cut_and_resumed(Via::Quic).await;
}

#[tokio::test]
async fn a_corrupted_chunk_is_refused_and_the_upload_resumes_from_its_offset() {
    let relay = demo_relay(|_| {}).await;
    let data = content(5 * CHUNK as usize, seed());
    let mut client = connect(&relay, Via::Ws, Some(VIP), None).await;
    client
        .send(&Msg::Upload {
            id: "u".into(),
            file: None,
            name: "crc.bin".into(),
            size: data.len() as u64,
            sha256: Some(sha256_hex(&data)),
            chunk_size: Some(CHUNK),
        })
        .await
        .unwrap();
    let Msg::UploadReady { file, .. } = next(&mut client).await else {
        panic!("expected upload_ready")
    };
    let piece = |n: usize| &data[n * CHUNK as usize..(n + 1) * CHUNK as usize];
    let at = |n: usize| (n * CHUNK as usize) as u64;
    client
        .send(&chunk("u", 0, at(0), piece(0), false))
        .await
        .unwrap();
    let mut bad = chunk("u", 1, at(1), piece(1), false);
    if let Msg::Chunk { crc32c, .. } = &mut bad {
        *crc32c ^= 1;
    }
    client.send(&bad).await.unwrap();
    // Already in flight behind it: ignored, not refused again.
    client
        .send(&chunk("u", 2, at(2), piece(2), false))
        .await
        .unwrap();
    let (code, message, id) = error_of(&next(&mut client).await);
    assert_eq!(code, ErrorCode::ChecksumMismatch);
    assert_eq!(id.as_deref(), Some("u"));
    assert!(
        message.contains(&format!("from offset {}", at(1))),
        "{message}"
    );
    // Resent from there: the upload completes with the right digest.
    for n in 1..5 {
        client
            .send(&chunk("u", n as u64, at(n), piece(n), n == 4))
            .await
            .unwrap();
    }
    match next(&mut client).await {
        Msg::UploadDone { sha256, .. } => assert_eq!(sha256, sha256_hex(&data)),
        other => panic!("expected upload_done, got {other:?}"),
    }
    client
        .send(&chunk("u", 9, 0, b"late", false))
        .await
        .unwrap();
    let (code, _, _) = error_of(&next(&mut client).await);
    assert_eq!(code, ErrorCode::UnknownTransfer);

    // A whole-file digest that does not match: refused, the upload starts over.
    client
        .send(&Msg::Upload {
            id: "w".into(),
            file: None,
            name: "wrong.bin".into(),
            size: 1000,
            sha256: Some("0".repeat(64)),
            chunk_size: None,
        })
        .await
        .unwrap();
    let Msg::UploadReady { file: wrong, .. } = next(&mut client).await else {
        panic!("expected upload_ready")
    };
    client
        .send(&chunk("w", 0, 0, &data[..1000], true))
        .await
        .unwrap();
    let (code, message, _) = error_of(&next(&mut client).await);
    assert_eq!(code, ErrorCode::ChecksumMismatch, "{message}");
    client
        .send(&Msg::Upload {
            id: "w2".into(),
            file: Some(wrong),
            name: String::new(),
            size: 0,
            sha256: None,
            chunk_size: None,
        })
        .await
        .unwrap();
    let Msg::UploadReady { offset, .. } = next(&mut client).await else {
        panic!("expected upload_ready")
    };
    assert_eq!(offset, 0, "starts over");
    assert!(!file.is_empty());
    client.close().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn guests_cannot_upload_and_nobody_downloads_anothers_file() {
    let relay = demo_relay(|_| {}).await;
    let url = create(&relay, VIP, 10, "private.txt").await;
    assert_eq!(
        patch(&url, VIP, 0, b"0123456789".to_vec()).await.status(),
        204
    );
    let file = url.rsplit('/').next().unwrap().to_owned();
    for (via, token) in [(Via::Ws, None), (Via::Quic, Some(NORMAL))] {
        let mut client = connect(&relay, via, token, None).await;
        client
            .send(&Msg::Upload {
                id: "u".into(),
                file: None,
                name: "x".into(),
                size: 10,
                sha256: None,
                chunk_size: None,
            })
            .await
            .unwrap();
        let (code, _, id) = error_of(&next(&mut client).await);
        assert_eq!((code, id.as_deref()), (ErrorCode::Forbidden, Some("u")));
        for ask in [
            Msg::Download {
                id: "d".into(),
                file: file.clone(),
                offset: 0,
                chunk_size: None,
                offer: None,
            },
            Msg::Upload {
                id: "r".into(),
                file: Some(file.clone()),
                name: String::new(),
                size: 0,
                sha256: None,
                chunk_size: None,
            },
        ] {
            client.send(&ask).await.unwrap();
            let (code, _, _) = error_of(&next(&mut client).await);
            assert_eq!(code, ErrorCode::NotFound, "{ask:?}");
        }
        client.close().await.unwrap();
    }
    relay.stop().await.unwrap();
}
