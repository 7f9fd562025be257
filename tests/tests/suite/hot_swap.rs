//! Hot swap under live traffic: 100 WebSocket clients publish and request
//! without pause while the router plugin is swapped 20 times. No connection
//! drops, no request fails, and every publish sent after a swap has returned
//! is routed by the new version (each version rewrites `swap/in` to
//! `swap/out-vN`, which the publish's ack reports).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmrelay::plugin::bundled;
use wasmrelay_tests::{TestRelay, WsTester};

const CLIENTS: usize = 100;
const SWAPS: u64 = 20;

fn router_manifest(version: u64) -> String {
    format!(
        "name = \"path-router\"\nversion = \"{version}.0.0\"\nrole = \"router\"\ncapabilities = [\"log\"]\n\
         [limits]\ncall_timeout_ms = 50\n\
         [[config.rules]]\nchannel_prefix = \"swap/in\"\nrewrite = \"swap/out-v{version}\"\n"
    )
}

async fn swap_router(relay: &TestRelay, version: u64) -> Value {
    let wasm = bundled::find("path-router").unwrap().wasm;
    let (status, report, _) = wasmrelay_tests::put_plugin(
        &relay.url(""),
        "path-router",
        wasm,
        &router_manifest(version),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    report
}

/// Answers every request at once, echoing its body.
async fn serve_space(mut instance: WsTester, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(msg) = instance.recv_within(Duration::from_millis(200)).await else {
            continue;
        };
        if msg["type"] == "request" {
            instance
                .send(json!({"type": "response", "id": msg["id"], "data": msg["data"]}))
                .await
                .unwrap();
        }
    }
}

#[derive(Default)]
struct Tally {
    publishes: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    stale: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_swapped_20_times_under_100_busy_clients() {
    let relay = TestRelay::start().await;
    swap_router(&relay, 1).await;

    let mut instance = WsTester::greeted(&relay.ws_url()).await.unwrap();
    instance
        .send(json!({"type": "register", "space": "work"}))
        .await
        .unwrap();
    instance.recv_type("registered").await.unwrap();
    let server_stop = Arc::new(AtomicBool::new(false));
    let server = tokio::spawn(serve_space(instance, server_stop.clone()));
    let stop = Arc::new(AtomicBool::new(false));

    // The version every publish must see from now on, raised only after a
    // swap's admin call has returned. A client reads it before sending, so a
    // publish that saw version N was sent after swap N committed.
    let committed = Arc::new(AtomicU64::new(1));
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (url, stop, committed, tally) = (
            relay.ws_url(),
            stop.clone(),
            committed.clone(),
            tally.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut client = WsTester::greeted(&url).await.unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let floor = committed.load(Ordering::SeqCst);
                client
                    .send(json!({"type": "publish", "channel": "swap/in", "id": format!("p{n}"), "data": "x"}))
                    .await
                    .unwrap();
                let ack = client.recv().await.unwrap();
                if ack["type"] != "ack" {
                    tally.failures.fetch_add(1, Ordering::Relaxed);
                    panic!("client {c}: publish failed: {ack}");
                }
                let routed: u64 = ack["channel"]
                    .as_str()
                    .and_then(|ch| ch.strip_prefix("swap/out-v"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if routed < floor {
                    tally.stale.fetch_add(1, Ordering::Relaxed);
                }
                tally.publishes.fetch_add(1, Ordering::Relaxed);

                client
                    .send(json!({"type": "request", "id": format!("r{n}"), "space": "work", "data": format!("{c}-{n}")}))
                    .await
                    .unwrap();
                let response = client.recv().await.unwrap();
                if response["type"] != "response" || response["data"] != format!("{c}-{n}") {
                    tally.failures.fetch_add(1, Ordering::Relaxed);
                    panic!("client {c}: request failed: {response}");
                }
                tally.requests.fetch_add(1, Ordering::Relaxed);
            }
            // Still connected at the end.
            client.assert_alive().await.unwrap();
        }));
    }

    // Let traffic build up, then swap while it flows: each swap waits for
    // publishes routed since the previous one, and the end for a round more.
    let more_publishes = |n: u64| {
        let tally = tally.clone();
        let target = tally.publishes.load(Ordering::Relaxed) + n;
        wasmrelay_tests::wait_for("publishes to flow", Duration::from_secs(30), move || {
            let done = tally.publishes.load(Ordering::Relaxed) >= target;
            async move { done.then_some(()) }
        })
    };
    more_publishes(CLIENTS as u64).await;
    let mut swap_ms = Vec::new();
    for version in 2..=SWAPS + 1 {
        let started = Instant::now();
        let report = swap_router(&relay, version).await;
        swap_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(report["version"], format!("{version}.0.0"));
        committed.store(version, Ordering::SeqCst);
        more_publishes(CLIENTS as u64 / 4).await;
    }
    more_publishes(CLIENTS as u64).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client finished without failures");
    }
    server_stop.store(true, Ordering::Relaxed);
    server.await.unwrap();

    let publishes = tally.publishes.load(Ordering::Relaxed);
    let requests = tally.requests.load(Ordering::Relaxed);
    eprintln!(
        "{SWAPS} swaps under load: {publishes} publishes, {requests} requests; swap round trips (ms): {swap_ms:.1?}"
    );
    assert_eq!(tally.failures.load(Ordering::Relaxed), 0);
    assert_eq!(
        tally.stale.load(Ordering::Relaxed),
        0,
        "a publish after a swap used an old version"
    );
    assert!(publishes >= CLIENTS as u64 && requests >= CLIENTS as u64);
    let stats = wasmrelay_tests::get_json(&relay.url("/admin/stats"))
        .await
        .unwrap();
    assert_eq!(stats["requests"]["failed"], 0, "{stats}");
    relay.stop().await.unwrap();
}
