//! Leak test: 10,000 WebSocket connect/hello/disconnect cycles against a relay
//! process leave its connection table empty and its memory back near where it
//! started (measured after a warm-up, so allocator arenas are already grown).

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream;
use wasmrelay_tests::{RelayProcess, WsTester, rss_of, wait_json};

const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");
const WARM_UP: usize = 1_000;
const CYCLES: usize = 10_000;
const CONCURRENCY: usize = 32;
/// Growth allowed after the warm-up: far below the ~40 MB that even 4 KB
/// leaked per connection would show over the remaining 9,000 cycles.
const ALLOWED_GROWTH: u64 = 8 * 1024 * 1024;

async fn cycles(url: &str, count: usize) {
    stream::iter(0..count)
        .for_each_concurrent(CONCURRENCY, |_| async move {
            let mut client = WsTester::greeted(url).await.expect("connect and hello");
            client.assert_alive().await.expect("alive");
            client.ws.close(None).await.expect("close");
            // Read the relay's closing frame so both sides finish the handshake.
            let _ = tokio::time::timeout(Duration::from_secs(5), client.ws.next()).await;
        })
        .await;
}

#[tokio::test]
async fn ten_thousand_connections_leave_nothing_behind() {
    let relay = RelayProcess::start(RELAY, &[]).await;
    let stats_url = relay.url("/admin/stats");
    // The demo policy caps a guest address at 10 connections; this test's
    // 32 at a time come as the demo VIP user (cap 100).
    let ws_url = format!("{}?token=vip-demo-token", relay.ws_url());
    let no_ws_left = |what: &'static str| {
        wait_json(what, &stats_url, Duration::from_secs(10), |stats| {
            stats["connections"]["by_transport"]["ws"] == 0
        })
    };

    cycles(&ws_url, WARM_UP).await;
    no_ws_left("warm-up connections to close").await;
    let baseline = rss_of(relay.process.pid()).expect("relay RSS");

    cycles(&ws_url, CYCLES - WARM_UP).await;
    let stats = no_ws_left("every connection to leave the table").await;
    let after = rss_of(relay.process.pid()).expect("relay RSS");

    // Only the stats request's own HTTP connection may remain.
    assert!(
        stats["connections"]["total"].as_u64().unwrap() <= 1,
        "{stats}"
    );
    assert!(
        stats["connections"]["accepted_total"].as_u64().unwrap() >= CYCLES as u64,
        "{stats}"
    );
    assert_eq!(stats["channels"], 0);
    assert_eq!(stats["requests"]["pending"], 0);
    let growth = after.saturating_sub(baseline);
    eprintln!(
        "relay RSS after {WARM_UP} cycles: {} KiB; after {CYCLES}: {} KiB; growth {} KiB",
        baseline / 1024,
        after / 1024,
        growth / 1024
    );
    assert!(
        growth < ALLOWED_GROWTH,
        "relay memory grew by {growth} bytes"
    );
}
