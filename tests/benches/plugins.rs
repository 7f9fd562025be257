//! Plugin benchmark: what a hook call costs, what plugins cost the relay's
//! throughput, and how long a hot swap takes. A program that prints a table,
//! not a timed test; figures go in BENCHMARKS.md.
//!
//!     cargo bench -p wasmrelay-tests --bench plugins            # full run
//!     cargo bench -p wasmrelay-tests --bench plugins -- --quick # smoke run
//!
#![allow(clippy::print_stdout)] // a benchmark prints its table

//! The relay runs as its own process (the load generator's work is not
//! counted against it); throughput configurations are run in the same
//! session, interleaved, and compared as ratios to the no-plugin relay.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use serde_json::json;
use wasmrelay::bus::LocalBus;
use wasmrelay::channels::Channels;
use wasmrelay::config::PluginsConfig;
use wasmrelay::metrics::Metrics;
use wasmrelay::plugin::bindings::types::{Handshake, RequestInfo};
use wasmrelay::plugin::host_api::{HostServices, KvStore};
use wasmrelay::plugin::{LoadedPlugin, Manifest, Runtime, Source, bundled};
use wasmrelay_tests::{RelayProcess, WsTester, free_port};

const NOOP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/noop-filter.wasm"));
const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");
const NOOP_MANIFEST: &str =
    "name = \"noop\"\nversion = \"1.0.0\"\nrole = \"filter\"\nchannels = [\"*\"]\n";

struct Settings {
    hook_calls: usize,
    publishers: usize,
    messages_per_publisher: usize,
    rounds: usize,
    swaps: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    percentile(values, 0.5)
}

/// Times `calls` calls of `call`, one `Instant` pair each; returns sorted µs.
fn time_calls(calls: usize, mut call: impl FnMut()) -> Vec<f64> {
    for _ in 0..calls / 10 {
        call();
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        call();
        samples.push(started.elapsed().as_nanos() as f64 / 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples
}

fn hook_costs(settings: &Settings) {
    let metrics = Arc::new(Metrics::new());
    let channels = Arc::new(Channels::new(metrics, Default::default()));
    let services = HostServices {
        bus: Arc::new(LocalBus::new(channels.clone())),
        presence: channels.clone(),
        kv: Arc::new(KvStore::default()),
        figures: Arc::new(wasmrelay::plugin::host_api::NoRelay),
        files: Arc::new(wasmrelay::plugin::host_api::NoRelay),
    };
    let runtime = Runtime::new(&PluginsConfig::default(), None).expect("runtime");
    let load = |wasm: &[u8], manifest: &str| {
        LoadedPlugin::prepare(
            &runtime,
            wasm,
            Manifest::from_toml(manifest).expect("manifest"),
            services.clone(),
            Source::Admin,
        )
        .expect("plugin loads")
    };
    let noop = load(NOOP, NOOP_MANIFEST);
    let router = bundled::find("path-router").unwrap();
    let router = load(router.wasm, router.manifest);
    let policy = bundled::find("tiered-policy").unwrap();
    let policy = load(policy.wasm, policy.manifest);
    let message = vec![b'x'; 64];
    let request = RequestInfo {
        space: "demo".into(),
        method: "POST".into(),
        path: "/".into(),
        headers: vec![],
    };
    let handshake = Handshake {
        peer: "127.0.0.1:5000".into(),
        path: "/ws".into(),
        query: "token=vip-demo-token".into(),
        headers: vec![],
    };
    let n = settings.hook_calls;
    let rows: Vec<(&str, Vec<f64>)> = vec![
        (
            "timer overhead (Instant pair, no call)",
            time_calls(n, || {}),
        ),
        (
            "no-op filter, 64-byte message",
            time_calls(n, || {
                noop.on_message("bench", &message).unwrap();
            }),
        ),
        (
            "path-router route-publish",
            time_calls(n, || {
                router.route_publish("chat/room").unwrap();
            }),
        ),
        (
            "path-router route-request",
            time_calls(n, || {
                router.route_request(&request).unwrap();
            }),
        ),
        (
            "tiered-policy admit (token)",
            time_calls(n / 10, || {
                policy.admit(&handshake).unwrap();
            }),
        ),
    ];
    println!("\nHook call cost ({n} calls each, one reused instance, deadline re-armed per call)");
    println!("{:<44} {:>10} {:>10}", "call", "median µs", "p99 µs");
    for (name, samples) in rows {
        println!(
            "{name:<44} {:>10.2} {:>10.2}",
            percentile(&samples, 0.5),
            percentile(&samples, 0.99)
        );
    }
}

/// Publishes as fast as acks allow (a window per publisher) to one subscriber
/// per channel; returns delivered messages per second.
async fn throughput(relay: &RelayProcess, settings: &Settings) -> f64 {
    const WINDOW: usize = 128;
    // The demo policy's `service` tier: a guest's 5 messages a second would
    // measure the rate limit, not the plugins.
    let url = format!("{}?token=service-demo-token", relay.ws_url());
    let mut subscribers = Vec::new();
    for p in 0..settings.publishers {
        let mut subscriber = WsTester::greeted(&url).await.unwrap();
        subscriber
            .send(json!({"type": "subscribe", "channel": format!("bench/{p}")}))
            .await
            .unwrap();
        subscriber.recv_type("subscribed").await.unwrap();
        subscribers.push(subscriber);
    }
    let total = settings.messages_per_publisher;
    let started = Instant::now();
    let receivers = subscribers.into_iter().map(|mut subscriber| async move {
        let mut seen = 0;
        while seen < total {
            let msg = subscriber.recv().await.unwrap();
            if msg["type"] == "message" {
                seen += 1;
            }
        }
    });
    let senders = (0..settings.publishers).map(|p| {
        let url = url.clone();
        async move {
            let mut publisher = WsTester::greeted(&url).await.unwrap();
            let channel = format!("bench/{p}");
            let payload = "x".repeat(64);
            let (mut sent, mut acked) = (0, 0);
            while acked < total {
                while sent < total && sent - acked < WINDOW {
                    publisher
                        .send(json!({"type": "publish", "channel": channel, "id": "b", "data": payload}))
                        .await
                        .unwrap();
                    sent += 1;
                }
                let ack = publisher.recv().await.unwrap();
                assert_eq!(ack["type"], "ack", "{ack}");
                acked += 1;
            }
        }
    });
    let receiving = tokio::spawn(join_all(receivers));
    join_all(senders).await;
    receiving.await.unwrap();
    (settings.publishers * total) as f64 / started.elapsed().as_secs_f64()
}

async fn put_plugin(relay: &RelayProcess, name: &str, wasm: &[u8], manifest: String) -> (f64, f64) {
    let (status, report, round_trip) =
        wasmrelay_tests::put_plugin(&relay.url(""), name, wasm, &manifest).await;
    assert_eq!(status, 200, "{report}");
    (
        round_trip.as_secs_f64() * 1000.0,
        report["total_ms"].as_f64().unwrap(),
    )
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let settings = if quick {
        Settings {
            hook_calls: 2_000,
            publishers: 2,
            messages_per_publisher: 500,
            rounds: 1,
            swaps: 3,
        }
    } else {
        Settings {
            hook_calls: 200_000,
            publishers: 4,
            messages_per_publisher: 20_000,
            rounds: 7,
            swaps: 20,
        }
    };
    println!(
        "wasmrelay plugin benchmark{}",
        if quick {
            " (--quick: smoke run, figures meaningless)"
        } else {
            ""
        }
    );
    hook_costs(&settings);

    // Three relays, measured in turns so drift on a shared machine hits all alike.
    let plain = RelayProcess::start_configured(RELAY, free_port(), "bundled = []", &[]).await;
    let filtered = RelayProcess::start_configured(RELAY, free_port(), "bundled = []", &[]).await;
    put_plugin(&filtered, "noop", NOOP, NOOP_MANIFEST.to_owned()).await;
    let governed = RelayProcess::start_configured(
        RELAY,
        free_port(),
        "bundled = [\"path-router\", \"tiered-policy\"]",
        &[],
    )
    .await;
    let mut results: [Vec<f64>; 3] = Default::default();
    for _ in 0..settings.rounds {
        for (i, relay) in [&plain, &filtered, &governed].into_iter().enumerate() {
            results[i].push(throughput(relay, &settings).await);
        }
    }
    let spreads: Vec<(f64, f64)> = results
        .iter()
        .map(|r| {
            let min = r.iter().copied().fold(f64::INFINITY, f64::min);
            let max = r.iter().copied().fold(0.0, f64::max);
            (min, max)
        })
        .collect();
    let medians: Vec<f64> = results.iter_mut().map(|r| median(r)).collect();
    println!(
        "\nRelay throughput ({} publishers -> 1 subscriber each, 64-byte messages, window 128, median of {} rounds)",
        settings.publishers, settings.rounds
    );
    println!(
        "{:<44} {:>12} {:>8} {:>24}",
        "relay", "msg/s", "ratio", "rounds min..max"
    );
    let names = [
        "no plugins",
        "no-op filter on every publish",
        "tiered-policy + path-router",
    ];
    for ((name, value), (min, max)) in names.iter().zip(&medians).zip(&spreads) {
        let spread = format!("{min:.0}..{max:.0}");
        println!(
            "{name:<44} {value:>12.0} {:>7.2}x {spread:>24}",
            value / medians[0]
        );
    }

    // Hot swap of a component the relay has compiled before (cache hit).
    let mut round_trips = Vec::new();
    let mut server_side = Vec::new();
    for i in 0..settings.swaps {
        let manifest = NOOP_MANIFEST.replace("1.0.0", &format!("1.0.{}", i + 1));
        let (round_trip, total) = put_plugin(&filtered, "noop", NOOP, manifest).await;
        round_trips.push(round_trip);
        server_side.push(total);
    }
    round_trips.sort_by(|a, b| a.total_cmp(b));
    server_side.sort_by(|a, b| a.total_cmp(b));
    println!(
        "\nHot swap, precompiled component ({} swaps)",
        settings.swaps
    );
    println!("{:<44} {:>10} {:>10}", "measure", "median ms", "p99 ms");
    println!(
        "{:<44} {:>10.2} {:>10.2}",
        "admin call round trip (client)",
        percentile(&round_trips, 0.5),
        percentile(&round_trips, 0.99)
    );
    println!(
        "{:<44} {:>10.2} {:>10.2}",
        "request received -> new version serving",
        percentile(&server_side, 0.5),
        percentile(&server_side, 0.99)
    );
}
