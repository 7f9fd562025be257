//! Scenario `history`: what keeping channel history costs the small-message
//! rows (the same load on a channel without history, with history in
//! memory, and with history persisted to the store), and how long a client
//! that comes back takes to recover 1,000 missed messages, beside the same
//! reconnect without recovery and 1,000 messages delivered live.

use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;
use wasmrelay_client::protocol::{Data, Msg};
use wasmrelay_client::{Client, Options, Trust};
use wasmrelay_tests::RelayProcess;

use super::load::{SmallResult, Topology};
use super::stats::median;
use super::{Failures, Settings, System, TOKEN, job, relay_systems, small_job};

/// The rules the benchmark relay adds (see `governed_relay`): `chat/*` as
/// in the demo, `kept/*` persisted, `recover/*` deep enough for 1,000.
pub const HISTORY_TOML: &str = "[channels]\nhistory = [\
    { pattern = \"chat/*\", size = 100, ttl_ms = 300000 }, \
    { pattern = \"kept/*\", size = 100, ttl_ms = 300000, persist = true }, \
    { pattern = \"recover/*\", size = 1000, ttl_ms = 300000 }]\n";

const MISSED: u64 = 1_000;

pub async fn history(settings: &Settings, relay: &RelayProcess, failures: &mut Failures) {
    println!("## 8. Channel history (issue 15)\n");
    println!(
        "The small-message load of §1 (wasmrelay, ws) on three channels of one relay: no \
         history, history in memory (100 messages, 5 min) and history persisted to the \
         store. Median of {} rounds, interleaved; × none is against the channel without \
         history in the same rounds.\n",
        settings.rounds
    );
    println!("| topology | load | history | deliveries/s | × none | p99 | lost |");
    println!("|---|---|---|---:|---:|---:|---:|");
    let system = &relay_systems(relay)[0];
    let channels = [
        ("none", "bench/plain"),
        ("memory", "chat/bench"),
        ("persisted", "kept/bench"),
    ];
    for (topology, publishes) in [
        (
            Topology::FanOut(settings.fan_out),
            settings.fan_out_publishes,
        ),
        (Topology::Room(settings.room), settings.room_publishes),
    ] {
        for (load, window) in [
            ("flat out, window", Some(settings.window)),
            ("flat out, no window", None),
        ] {
            let mut rates: Vec<Vec<f64>> = vec![Vec::new(); channels.len()];
            let mut last: Vec<Option<SmallResult>> = vec![None; channels.len()];
            for _ in 0..settings.rounds {
                for (i, (kind, channel)) in channels.iter().enumerate() {
                    match run(system, topology, publishes, window, channel).await {
                        Ok(result) => {
                            rates[i].push(result.deliveries_per_s());
                            last[i] = Some(result);
                        }
                        Err(e) => {
                            failures
                                .note(&format!("history {} {load} {kind}", topology.label()), &e);
                        }
                    }
                }
            }
            let none = median(&rates[0]);
            for (i, (kind, _)) in channels.iter().enumerate() {
                let Some(result) = &last[i] else {
                    println!("| {} | {load} | {kind} | failed | | | |", topology.label());
                    continue;
                };
                let rate = median(&rates[i]);
                println!(
                    "| {} | {load} | {kind} | {rate:.0} | {:.2} | {} | {} |",
                    topology.label(),
                    rate / none,
                    super::us(result.latency_us.p99),
                    result.lost()
                );
            }
        }
    }
    println!();
    recovery(settings, relay, failures).await;
}

async fn run(
    system: &System,
    topology: Topology,
    publishes: u64,
    window: Option<u64>,
    channel: &str,
) -> anyhow::Result<SmallResult> {
    let mut spec = small_job(system, topology, publishes, None, window);
    if let super::load::Job::Small(small) = &mut spec {
        small.channel = channel.to_owned();
    }
    job::<SmallResult>(&spec).await
}

/// Reconnecting after 1,000 messages were missed, recovered vs not, and the
/// same 1,000 delivered live.
async fn recovery(settings: &Settings, relay: &RelayProcess, failures: &mut Failures) {
    println!(
        "Recovery: a subscriber drops, {MISSED} messages of 64 bytes are published, it \
         reconnects (`Client::reconnect`: a new connection, `hello`, `subscribe` with \
         `recover`) and receives all {MISSED}. Beside it: the same reconnect when nothing \
         was missed, and {MISSED} messages delivered live to a subscriber. Median of {} \
         rounds, in the driver process.\n",
        settings.rounds
    );
    println!(
        "| transport | reconnect, nothing missed | reconnect + recover 1,000 | 1,000 live | recovered messages/s |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (label, url) in [
        ("ws", relay.ws_url()),
        ("QUIC", format!("quic://{}", relay.quic_addr())),
    ] {
        let mut empty = Vec::new();
        let mut recovered = Vec::new();
        let mut live = Vec::new();
        for round in 0..settings.rounds {
            match recover_once(relay, &url, round).await {
                Ok((e, r, l)) => {
                    empty.push(e);
                    recovered.push(r);
                    live.push(l);
                }
                Err(e) => {
                    failures.note(&format!("history recovery {label}"), &e);
                }
            }
        }
        if recovered.is_empty() {
            println!("| {label} | failed | | | |");
            continue;
        }
        let ms = |v: &[f64]| format!("{:.1} ms", median(v) * 1000.0);
        println!(
            "| {label} | {} | {} | {} | {:.0} |",
            ms(&empty),
            ms(&recovered),
            ms(&live),
            MISSED as f64 / median(&recovered)
        );
    }
    println!();
}

async fn connect(relay: &RelayProcess, url: &str) -> anyhow::Result<Client> {
    let options = Options::named("bench-history")
        .token(Some(TOKEN))
        .trust(Trust {
            ca: Some(relay.cert_pem()),
            pin_sha256: None,
        });
    Ok(Client::connect(url, options).await?)
}

/// Seconds for: a reconnect with nothing missed; one that recovers
/// [`MISSED`] messages; [`MISSED`] messages delivered live.
async fn recover_once(
    relay: &RelayProcess,
    url: &str,
    round: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let channel = format!("recover/{}-{round}", url.len());
    let mut publisher = connect(relay, url).await?;
    let mut subscriber = connect(relay, url).await?;
    subscriber.subscribe(&channel).await?;

    subscriber.disconnect().await?;
    let started = Instant::now();
    subscriber.reconnect().await?;
    let empty = started.elapsed().as_secs_f64();

    subscriber.disconnect().await?;
    publish(&mut publisher, &channel, MISSED).await?;
    let started = Instant::now();
    let answers = subscriber.reconnect().await?;
    anyhow::ensure!(
        answers.iter().all(|(_, a)| a.recovered == Some(true)),
        "not recovered: {answers:?}"
    );
    receive(&mut subscriber, &channel, MISSED).await?;
    let recovered = started.elapsed().as_secs_f64();

    let started = Instant::now();
    publish(&mut publisher, &channel, MISSED).await?;
    receive(&mut subscriber, &channel, 2 * MISSED).await?;
    let live = started.elapsed().as_secs_f64();
    subscriber.close().await?;
    publisher.close().await?;
    Ok((empty, recovered, live))
}

/// `count` publishes without acks, then one with, so they are all numbered.
async fn publish(publisher: &mut Client, channel: &str, count: u64) -> anyhow::Result<()> {
    let payload = Data::from(vec![b'x'; 64]);
    for _ in 1..count {
        publisher
            .send(&Msg::Publish {
                channel: channel.to_owned(),
                id: None,
                data: payload.clone(),
            })
            .await?;
    }
    publisher.publish(channel, payload).await?;
    Ok(())
}

/// Receives until the message numbered `last` arrives.
async fn receive(subscriber: &mut Client, channel: &str, last: u64) -> anyhow::Result<()> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), subscriber.recv())
            .await
            .context("no message within 30 s")??
            .context("the relay closed the connection")?;
        if let Msg::Message {
            channel: c, seq, ..
        } = msg
            && c == channel
            && seq >= last
        {
            return Ok(());
        }
    }
}
