//! `/files/` against a real relay with the demo policy: tus uploads resumed
//! after connections are cut at random offsets, refused chunks (checksum,
//! offset, version, type), concurrent writers, quotas, ranged downloads,
//! who may see what, and a stock tus client (tuspy).

use std::time::Duration;

use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmrelay_tests::TestRelay;

const VIP: &str = "vip-demo-token";
const NORMAL: &str = "normal-demo-token";

pub(crate) async fn demo_relay(edit: impl FnOnce(&mut wasmrelay::Config)) -> TestRelay {
    TestRelay::start_with(|c| {
        c.plugins.bundled = vec!["tiered-policy".to_owned()];
        edit(c);
    })
    .await
}

/// Deterministic bytes that differ everywhere, from `seed`.
pub(crate) fn content(len: usize, seed: u64) -> Vec<u8> {
    wasmrelay_tests::pattern(len, seed)
}

pub(crate) fn seed() -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    seed
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A tus request with the version header and `token` (if any).
fn tus(method: Method, url: &str, token: Option<&str>) -> reqwest::RequestBuilder {
    let request = reqwest::Client::new()
        .request(method, url)
        .header("Tus-Resumable", "1.0.0");
    match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

/// Starts an upload of `length` bytes named `name`; its URL.
pub(crate) async fn create(relay: &TestRelay, token: &str, length: usize, name: &str) -> String {
    let response = tus(Method::POST, &relay.url("/files/"), Some(token))
        .header("Upload-Length", length.to_string())
        .header(
            "Upload-Metadata",
            format!("filename {}", b64(name.as_bytes())),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert!(response.headers().contains_key("upload-expires"));
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/files/"), "{location}");
    relay.url(&location)
}

async fn offset(url: &str, token: &str) -> u64 {
    let response = tus(Method::HEAD, url, Some(token)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    header_number(&response, "upload-offset")
}

fn header_number(response: &reqwest::Response, name: &str) -> u64 {
    response.headers()[name].to_str().unwrap().parse().unwrap()
}

pub(crate) async fn patch(url: &str, token: &str, at: u64, chunk: Vec<u8>) -> reqwest::Response {
    tus(Method::PATCH, url, Some(token))
        .header("Upload-Offset", at.to_string())
        .header("Content-Type", "application/offset+octet-stream")
        .body(chunk)
        .send()
        .await
        .unwrap()
}

async fn error_code(response: reqwest::Response) -> String {
    let body: Value = response.json().await.unwrap();
    body["error"]["code"].as_str().unwrap().to_owned()
}

/// Sends a PATCH whose headers promise all of `rest` but writes only
/// `sent` of it, then drops the connection, as a client killed mid-upload.
async fn patch_then_cut(relay: &TestRelay, path: &str, at: u64, rest: &[u8], sent: usize) {
    let mut socket = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: relay\r\nTus-Resumable: 1.0.0\r\n\
         Authorization: Bearer {VIP}\r\nUpload-Offset: {at}\r\n\
         Content-Type: application/offset+octet-stream\r\nContent-Length: {}\r\n\r\n",
        rest.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&rest[..sent]).await.unwrap();
    socket.flush().await.unwrap();
    drop(socket);
}

async fn download(url: &str, token: &str) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    (headers, response.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn a_tus_upload_cut_at_random_offsets_resumes_to_a_matching_digest() {
    let relay = demo_relay(|_| {}).await;
    let seed = seed();
    let data = content(3 << 20, seed);
    let url = create(&relay, VIP, data.len(), "cut.bin").await;
    let path = url.trim_start_matches(&relay.url(""));
    let mut random = content(64, seed ^ 0x5eed);
    let mut cuts = 0;
    let mut last = 0;
    loop {
        let at = offset(&url, VIP).await;
        assert!(at >= last, "the offset went back from {last} to {at}");
        last = at;
        if at == data.len() as u64 {
            break;
        }
        let rest = &data[at as usize..];
        if cuts < 5 {
            // Cut somewhere in the first half of what is left.
            let pick = u64::from_le_bytes(random[..8].try_into().unwrap());
            random.rotate_left(8);
            let sent = 1 + (pick as usize % (rest.len() / 2).max(1));
            patch_then_cut(&relay, path, at, rest, sent).await;
            cuts += 1;
            // What came before the cut is kept: the offset moves on.
            let moved = wasmrelay_tests::wait_for(
                "the cut chunk's bytes recorded",
                Duration::from_secs(10),
                || {
                    let url = url.clone();
                    async move { (offset(&url, VIP).await > at).then_some(()) }
                },
            )
            .await;
            let () = moved;
            continue;
        }
        let response = patch(&url, VIP, at, rest.to_vec()).await;
        match response.status() {
            StatusCode::NO_CONTENT => {
                assert_eq!(header_number(&response, "upload-offset"), data.len() as u64);
            }
            // The cut request may still be finishing: ask again.
            StatusCode::LOCKED | StatusCode::CONFLICT => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("PATCH answered {other}: {}", response.text().await.unwrap()),
        }
    }
    let (headers, body) = download(&url, VIP).await;
    assert!(body == data, "the downloaded file differs (seed {seed})");
    let digest = sha2::Sha256::digest(&data);
    assert_eq!(
        headers["repr-digest"].to_str().unwrap(),
        format!("sha-256=:{}:", b64(&digest))
    );
    assert_eq!(
        headers["etag"].to_str().unwrap(),
        format!("\"{}\"", sha256_hex(&data))
    );
    assert_eq!(
        headers["content-disposition"],
        "attachment; filename*=UTF-8''cut.bin"
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn refused_chunks_leave_the_offset_where_it_was() {
    let relay = demo_relay(|_| {}).await;
    let data = content(100_000, seed());
    let url = create(&relay, VIP, data.len(), "refusals.bin").await;
    let first = data[..40_000].to_vec();

    // A chunk whose checksum does not match: 460, discarded.
    let wrong = sha1_b64(b"something else");
    let response = tus(Method::PATCH, &url, Some(VIP))
        .header("Upload-Offset", "0")
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Checksum", format!("sha1 {wrong}"))
        .body(first.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 460);
    assert_eq!(error_code(response).await, "checksum_mismatch");
    assert_eq!(offset(&url, VIP).await, 0);

    // An algorithm tus does not know here: 400, nothing written.
    let response = tus(Method::PATCH, &url, Some(VIP))
        .header("Upload-Offset", "0")
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Checksum", "md5 AAAA")
        .body(first.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(offset(&url, VIP).await, 0);

    // The right checksum (sha1, as tus requires): written.
    let response = tus(Method::PATCH, &url, Some(VIP))
        .header("Upload-Offset", "0")
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Checksum", format!("sha1 {}", sha1_b64(&first)))
        .body(first.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(header_number(&response, "upload-offset"), 40_000);

    // The wrong offset: 409, naming where the upload is.
    let response = patch(&url, VIP, 10, data[10..].to_vec()).await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(header_number(&response, "upload-offset"), 40_000);
    assert_eq!(error_code(response).await, "offset_mismatch");

    // Without Tus-Resumable: 412; with another content type: 415.
    let response = reqwest::Client::new()
        .patch(&url)
        .bearer_auth(VIP)
        .header("Upload-Offset", "40000")
        .header("Content-Type", "application/offset+octet-stream")
        .body(data[40_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(response.headers()["tus-version"], "1.0.0");
    let response = tus(Method::PATCH, &url, Some(VIP))
        .header("Upload-Offset", "40000")
        .header("Content-Type", "application/octet-stream")
        .body(data[40_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // More than the declared length: refused whole.
    let mut too_much = data[40_000..].to_vec();
    too_much.push(0);
    let response = patch(&url, VIP, 40_000, too_much).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(offset(&url, VIP).await, 40_000);

    // The rest with sha256 and with crc32c checksums.
    let second = data[40_000..70_000].to_vec();
    let response = tus(Method::PATCH, &url, Some(VIP))
        .header("Upload-Offset", "40000")
        .header("Content-Type", "application/offset+octet-stream")
        .header(
            "Upload-Checksum",
            format!("sha256 {}", b64(&sha2::Sha256::digest(&second))),
        )
        .body(second)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let third = data[70_000..].to_vec();
    let crc = crc32c_b64(&third);
    let response = tus(Method::PATCH, &url, Some(VIP))
        .header("Upload-Offset", "70000")
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Checksum", format!("crc32c {crc}"))
        .body(third)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (_, body) = download(&url, VIP).await;
    assert!(body == data);
    relay.stop().await.unwrap();
}

fn sha1_b64(bytes: &[u8]) -> String {
    b64(&sha1::Sha1::digest(bytes))
}

/// CRC-32C (Castagnoli) by its bitwise definition (the relay uses a
/// table-driven crate).
pub(crate) fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// As tus's `Upload-Checksum` has it: big-endian, base64.
fn crc32c_b64(bytes: &[u8]) -> String {
    b64(&crc32c(bytes).to_be_bytes())
}

#[tokio::test]
async fn concurrent_writers_on_one_upload_never_mix_their_bytes() {
    let relay = demo_relay(|_| {}).await;
    let seed = seed();
    let length = 512 * 1024;
    let url = create(&relay, VIP, length, "race.bin").await;
    // Eight writers, each with different bytes for the whole file.
    let writers: Vec<Vec<u8>> = (0..8).map(|i| content(length, seed + i)).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, bytes) in writers.iter().enumerate() {
        let (url, bytes) = (url.clone(), bytes.clone());
        tasks.spawn(async move {
            let response = patch(&url, VIP, 0, bytes).await;
            let status = response.status();
            let code = if status == StatusCode::NO_CONTENT {
                String::new()
            } else {
                error_code(response).await
            };
            (i, status, code)
        });
    }
    let mut winners = Vec::new();
    while let Some(outcome) = tasks.join_next().await {
        let (i, status, code) = outcome.unwrap();
        match status {
            StatusCode::NO_CONTENT => winners.push(i),
            StatusCode::LOCKED => assert_eq!(code, "file_busy"),
            StatusCode::CONFLICT => assert_eq!(code, "offset_mismatch"),
            other => panic!("writer {i}: {other} {code}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer wins: {winners:?}");
    let (_, body) = download(&url, VIP).await;
    assert!(
        body == writers[winners[0]],
        "the file is the winner's bytes, whole"
    );
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_writer_holding_an_upload_refuses_a_second_until_it_is_done() {
    let relay = demo_relay(|_| {}).await;
    let data = content(200_000, seed());
    // Which of two writers gets the upload first is a race; this test needs
    // the first (half-sent) one to win. When the second got in before it
    // (a loaded machine), the first is the one refused, and the test starts
    // over with a fresh upload.
    let mut attempts = 0;
    let (url, mut first, refused) = loop {
        attempts += 1;
        assert!(
            attempts <= 5,
            "the half-sent writer never got the upload first"
        );
        let url = create(&relay, VIP, data.len(), "held.bin").await;
        let path = url.trim_start_matches(&relay.url("")).to_owned();
        // The first writer sends its headers and half its body, then waits.
        let mut first = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
        let head = format!(
            "PATCH {path} HTTP/1.1\r\nHost: relay\r\nTus-Resumable: 1.0.0\r\n\
             Authorization: Bearer {VIP}\r\nUpload-Offset: 0\r\n\
             Content-Type: application/offset+octet-stream\r\nContent-Length: {}\r\n\r\n",
            data.len()
        );
        first.write_all(head.as_bytes()).await.unwrap();
        first.write_all(&data[..100_000]).await.unwrap();
        // A second writer at the same offset, with a checksum that cannot
        // match (so that, should it get in first, it changes nothing).
        let wrong = format!("sha256 {}", b64(&sha2::Sha256::digest(b"no")));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let refused = loop {
            let response = tus(Method::PATCH, &url, Some(VIP))
                .header("Upload-Offset", "0")
                .header("Content-Type", "application/offset+octet-stream")
                .header("Upload-Checksum", wrong.clone())
                .body(data[..10].to_vec())
                .send()
                .await
                .unwrap();
            if response.status() == StatusCode::LOCKED {
                break Some(response);
            }
            // The half-sent writer was answered: it lost the race.
            let mut peek = [0u8; 1];
            if first.try_read(&mut peek).is_ok_and(|n| n > 0) {
                break None;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the second writer was never refused as busy (last: {})",
                response.status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if let Some(refused) = refused {
            break (url, first, refused);
        }
    };
    assert_eq!(error_code(refused).await, "file_busy");
    // Deleting it meanwhile is refused too.
    let response = tus(Method::DELETE, &url, Some(VIP)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::LOCKED);
    // The first writer finishes.
    first.write_all(&data[100_000..]).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let n = first.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let (_, body) = download(&url, VIP).await;
    assert!(body == data);
    // Now it can be deleted, and is gone.
    let response = tus(Method::DELETE, &url, Some(VIP)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = tus(Method::HEAD, &url, Some(VIP)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn an_upload_over_the_quota_is_refused_before_any_byte_is_stored() {
    let relay = demo_relay(|c| {
        c.files.user_bytes = 1 << 20;
        c.files.max_file_bytes = 800 << 10;
    })
    .await;
    let first = content(600 << 10, seed());
    let url = create(&relay, VIP, first.len(), "first.bin").await;
    assert_eq!(
        patch(&url, VIP, 0, first.clone()).await.status(),
        StatusCode::NO_CONTENT
    );
    // creation-with-upload of a second that would pass the user's quota.
    let second = content(600 << 10, seed() + 1);
    let response = tus(Method::POST, &relay.url("/files/"), Some(VIP))
        .header("Upload-Length", second.len().to_string())
        .header("Content-Type", "application/offset+octet-stream")
        .body(second.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(!response.headers().contains_key("location"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("user"),
        "{body}"
    );
    let uploads = relay.data_dir().join("files/uploads");
    assert_eq!(
        std::fs::read_dir(&uploads).unwrap().count(),
        0,
        "nothing half-written"
    );
    // Larger than any file may be: too_large.
    let response = tus(Method::POST, &relay.url("/files/"), Some(VIP))
        .header("Upload-Length", (900 << 10).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(response).await, "too_large");
    // The first file is untouched; once it is deleted the second fits.
    assert!(download(&url, VIP).await.1 == first);
    let response = tus(Method::DELETE, &url, Some(VIP)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = tus(Method::POST, &relay.url("/files/"), Some(VIP))
        .header("Upload-Length", second.len().to_string())
        .header("Content-Type", "application/offset+octet-stream")
        .body(second.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        header_number(&response, "upload-offset"),
        second.len() as u64
    );
    let url = relay.url(response.headers()["location"].to_str().unwrap());
    assert!(download(&url, VIP).await.1 == second);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn downloads_answer_ranges_validators_and_only_their_owner() {
    let relay = demo_relay(|_| {}).await;
    let data = content(10_000, seed());
    let url = create(&relay, VIP, data.len(), "notes.txt").await;
    // Not complete yet: nobody can download it.
    let get = |token: Option<&'static str>| {
        let request = reqwest::Client::new().get(&url);
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    };
    let response = get(Some(VIP)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        patch(&url, VIP, 0, data.clone()).await.status(),
        StatusCode::NO_CONTENT
    );
    let etag = format!("\"{}\"", sha256_hex(&data));

    let response = get(Some(VIP))
        .header("Range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(response.headers()["content-range"], "bytes 100-199/10000");
    assert_eq!(response.headers()["accept-ranges"], "bytes");
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    assert_eq!(response.bytes().await.unwrap(), &data[100..200]);

    // A download resumed where it stopped, guarded by If-Range.
    let response = get(Some(VIP))
        .header("Range", "bytes=4000-")
        .header("If-Range", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(response.bytes().await.unwrap(), &data[4000..]);
    // If-Range for another version: the whole file.
    let response = get(Some(VIP))
        .header("Range", "bytes=4000-")
        .header("If-Range", "\"0000\"")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap().len(), data.len());
    // The last 10 bytes; a range past the end.
    let response = get(Some(VIP))
        .header("Range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(response.bytes().await.unwrap(), &data[9_990..]);
    let response = get(Some(VIP))
        .header("Range", "bytes=10000-")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(response.headers()["content-range"], "bytes */10000");
    assert_eq!(error_code(response).await, "range_not_satisfiable");
    // Validators.
    let response = get(Some(VIP))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
    let response = reqwest::Client::new()
        .head(&url)
        .bearer_auth(VIP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-length"], "10000");
    assert_eq!(response.headers()["etag"].to_str().unwrap(), etag);

    // Someone else's file does not exist for them, token or not.
    for token in [Some(NORMAL), None] {
        let response = get(token).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{token:?}");
        let response = tus(Method::HEAD, &url, token).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{token:?}");
        let response = tus(Method::DELETE, &url, token).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{token:?}");
    }
    assert!(download(&url, VIP).await.1 == data, "still there");
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn only_tiers_the_policy_allows_may_upload() {
    let relay = demo_relay(|_| {}).await;
    // Discovery is open.
    let response = reqwest::Client::new()
        .request(Method::OPTIONS, relay.url("/files/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(response.headers()["tus-version"], "1.0.0");
    assert_eq!(
        response.headers()["tus-extension"],
        "creation,creation-with-upload,checksum,termination,expiration"
    );
    assert_eq!(
        response.headers()["tus-checksum-algorithm"],
        "sha1,sha256,crc32c"
    );
    for (token, status) in [
        (Some(NORMAL), StatusCode::FORBIDDEN),
        (None, StatusCode::FORBIDDEN),
        (Some("not-a-token"), StatusCode::UNAUTHORIZED),
    ] {
        let response = tus(Method::POST, &relay.url("/files/"), token)
            .header("Upload-Length", "10")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{token:?}");
    }
    relay.stop().await.unwrap();

    // With no policy at all, nobody may upload.
    let open = TestRelay::start().await;
    let response = tus(Method::POST, &open.url("/files/"), None)
        .header("Upload-Length", "10")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(response).await, "forbidden");
    open.stop().await.unwrap();
}

/// A stock tus client (tuspy, `pip install tuspy`) uploads in small chunks
/// with its own checksums.
#[tokio::test]
async fn a_stock_tus_client_uploads_in_chunks() {
    let has_tuspy = std::process::Command::new("python3")
        .args(["-c", "import tusclient"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_tuspy {
        eprintln!("skipped: needs python3 with tuspy (pip install tuspy)");
        assert!(
            std::env::var("CI").is_err(),
            "CI must install tuspy (pip install tuspy)"
        );
        return;
    }
    let relay = demo_relay(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let data = content(300_000, seed());
    let source = dir.path().join("stock.bin");
    std::fs::write(&source, &data).unwrap();
    let script = r#"
import sys
from tusclient import client
endpoint, token, path = sys.argv[1:4]
tus = client.TusClient(endpoint, headers={"Authorization": "Bearer " + token})
uploader = tus.uploader(path, chunk_size=65536, metadata={"filename": "stock.bin"}, upload_checksum=True)
uploader.upload()
print(uploader.url)
"#;
    let endpoint = relay.url("/files/");
    let source_path = source.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", script, &endpoint, VIP, &source_path])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "tuspy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let location = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let url = if location.starts_with("http") {
        location
    } else {
        relay.url(&location)
    };
    let (headers, body) = download(&url, VIP).await;
    assert!(body == data);
    assert_eq!(
        headers["content-disposition"],
        "attachment; filename*=UTF-8''stock.bin"
    );
    relay.stop().await.unwrap();
}
