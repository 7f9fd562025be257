//! Streamed responses through a space: an instance answers with a
//! `response` marked `stream` and the body in `body` pieces; HTTP and
//! WebSocket callers get it piece by piece, an instance that vanishes
//! mid-stream cuts the body with an error, and a 1 GiB response passes
//! through a relay process whose memory stays bounded.

use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmrelay_client::protocol::{Data, ErrorCode, Request, Response};
use wasmrelay_client::{Client, Encoding, Msg, Options};
use wasmrelay_tests::{RelayProcess, TestRelay, free_port, rss_of, wait_for};

const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");
const PIECE: usize = 64 * 1024;

/// Piece `n` of a streamed body: its number, then a fixed pattern.
fn piece(n: u64) -> Bytes {
    let mut bytes = pattern().to_vec();
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    Bytes::from(bytes)
}

fn pattern() -> &'static [u8] {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    PATTERN.get_or_init(|| super::files::content(PIECE, 7))
}

/// Checks a body made of [`piece`]s as it arrives, in any slicing.
#[derive(Default)]
struct Checker {
    at: u64,
}

impl Checker {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = self.at / PIECE as u64;
            let within = (self.at % PIECE as u64) as usize;
            let take = bytes.len().min(PIECE - within);
            let expected = piece(n);
            assert!(
                bytes[..take] == expected[within..within + take],
                "piece {n} differs at byte {within}"
            );
            bytes = &bytes[take..];
            self.at += take as u64;
        }
    }
}

async fn instance(url: &str, space: &str) -> Client {
    let mut client = Client::connect(url, Options::named("streamer").encoding(Encoding::Binary))
        .await
        .unwrap();
    client.register(space).await.unwrap();
    client
}

/// Serves requests on `client` with `pieces` pieces each, streamed; stops
/// after `stop_after` pieces of a request (vanishing) when given.
async fn serve(mut client: Client, pieces: u64, stop_after: Option<u64>) {
    while let Ok(Some(msg)) = client.recv().await {
        let Msg::Request(Request { id, .. }) = msg else {
            continue;
        };
        let length = pieces * PIECE as u64;
        client
            .send(&Msg::Response(Response {
                id: id.clone(),
                status: 200,
                headers: vec![
                    ("content-type".into(), "application/octet-stream".into()),
                    ("content-length".into(), length.to_string()),
                ],
                stream: true,
                data: Data::default(),
            }))
            .await
            .unwrap();
        for n in 0..pieces {
            if stop_after == Some(n) {
                // Gone mid-stream, as a crashed app would be.
                return;
            }
            client
                .send(&Msg::Body {
                    id: id.clone(),
                    last: n + 1 == pieces,
                    data: Data(piece(n)),
                })
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn a_streamed_response_reaches_http_and_websocket_callers_piece_by_piece() {
    let relay = TestRelay::start().await;
    let server = instance(&relay.ws_url(), "big").await;
    tokio::spawn(serve(server, 128, None));

    // HTTP: the whole 8 MiB, with the instance's length.
    let mut response = reqwest::get(relay.url("/spaces/big/file")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-length"],
        (128 * PIECE).to_string()
    );
    let mut checker = Checker::default();
    while let Some(chunk) = response.chunk().await.transpose() {
        checker.feed(&chunk.unwrap());
    }
    assert_eq!(checker.at, 128 * PIECE as u64);

    // WebSocket: the head, then the pieces under the caller's own id.
    let mut caller = Client::connect(
        &relay.ws_url(),
        Options::named("caller").encoding(Encoding::Binary),
    )
    .await
    .unwrap();
    caller
        .send(&Msg::Request(Request {
            id: "mine".into(),
            space: "big".into(),
            method: "GET".into(),
            path: "/file".into(),
            query: String::new(),
            headers: Vec::new(),
            timeout_ms: None,
            stream: false,
            data: Data::default(),
        }))
        .await
        .unwrap();
    let Some(Msg::Response(head)) = caller.recv().await.unwrap() else {
        panic!("expected the response head")
    };
    assert!(head.stream && head.id == "mine" && head.status == 200);
    let mut checker = Checker::default();
    loop {
        match caller.recv().await.unwrap() {
            Some(Msg::Body { id, last, data }) => {
                assert_eq!(id, "mine");
                checker.feed(data.as_bytes());
                if last {
                    break;
                }
            }
            other => panic!("expected a body piece, got {other:?}"),
        }
    }
    assert_eq!(checker.at, 128 * PIECE as u64);
    caller.close().await.unwrap();
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn an_instance_that_vanishes_mid_stream_cuts_the_body_with_an_error() {
    let relay = TestRelay::start().await;
    let server = instance(&relay.ws_url(), "flaky").await;
    tokio::spawn(serve(server, 64, Some(20)));
    let mut response = reqwest::get(relay.url("/spaces/flaky/file")).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut received = 0;
    let mut failed = false;
    while let Some(chunk) = response.chunk().await.transpose() {
        match chunk {
            Ok(chunk) => received += chunk.len(),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body must not end as if complete");
    assert!(received <= 20 * PIECE, "{received}");

    // A WebSocket caller hears instance_lost after the pieces that came.
    let server = instance(&relay.ws_url(), "flaky").await;
    tokio::spawn(serve(server, 64, Some(5)));
    let mut caller = Client::connect(&relay.ws_url(), Options::named("caller"))
        .await
        .unwrap();
    caller
        .send(&Msg::Request(Request {
            id: "r".into(),
            space: "flaky".into(),
            method: "GET".into(),
            path: "/".into(),
            query: String::new(),
            headers: Vec::new(),
            timeout_ms: None,
            stream: false,
            data: Data::default(),
        }))
        .await
        .unwrap();
    loop {
        match caller.recv().await.unwrap() {
            Some(Msg::Response(_)) | Some(Msg::Body { last: false, .. }) => {}
            Some(Msg::Error { code, id, .. }) => {
                assert_eq!((code, id.as_deref()), (ErrorCode::InstanceLost, Some("r")));
                break;
            }
            other => panic!("expected pieces then instance_lost, got {other:?}"),
        }
    }
    relay.stop().await.unwrap();
}

/// 1 GiB from an instance behind the relay to an HTTP caller, with the
/// relay (its own process) sampled for resident memory throughout.
#[tokio::test]
async fn a_one_gib_streamed_response_passes_with_bounded_relay_memory() {
    const PIECES: u64 = (1 << 30) / PIECE as u64;
    let relay = RelayProcess::start_configured(
        RELAY,
        free_port(),
        "bundled = []\n[spaces]\nanonymous_register = true\n",
        &[],
    )
    .await;
    let server = instance(&relay.ws_url(), "huge").await;
    tokio::spawn(serve(server, PIECES, None));
    wait_for("the space", Duration::from_secs(10), || async {
        let spaces: serde_json::Value = reqwest::get(relay.url("/spaces/huge"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (spaces["connected"] == true).then_some(())
    })
    .await;
    let pid = relay.process.pid();
    let before = rss_of(pid).unwrap();
    let started = Instant::now();
    let mut response = reqwest::get(relay.url("/spaces/huge/file")).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut checker = Checker::default();
    let mut peak = before;
    let mut chunks = 0u64;
    while let Some(chunk) = response.chunk().await.transpose() {
        checker.feed(&chunk.unwrap());
        chunks += 1;
        if chunks.is_multiple_of(256)
            && let Some(rss) = rss_of(pid)
        {
            peak = peak.max(rss);
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(checker.at, PIECES * PIECE as u64);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "1 GiB streamed response: relay RSS {:.1} MiB before, peak {:.1} MiB during ({:.1} MiB more); {:.1} s, {:.0} MB/s (debug build)",
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before)),
        elapsed.as_secs_f64(),
        (1u64 << 30) as f64 / 1e6 / elapsed.as_secs_f64()
    );
    assert!(
        peak.saturating_sub(before) < 64 << 20,
        "the relay grew by {:.1} MiB passing 1 GiB",
        mib(peak.saturating_sub(before))
    );
}
