//! Backpressure benchmark: what one stalled subscriber costs everyone else,
//! and what rate enforcement costs per message. A program that prints a
//! table, not a timed test; figures go in BENCHMARKS.md.
//!
//!     cargo bench -p wasmrelay-tests --bench backpressure            # full run
//!     cargo bench -p wasmrelay-tests --bench backpressure -- --quick # smoke run
//!
//! - **fan-out**: one publisher, 101 subscribers on one channel, publishes of
//!   256 bytes paced by the slowest *reading* subscriber (at most 256 ahead).
//!   Run twice in the same session: 101 reading subscribers, then 100 reading
//!   and 1 that never reads (its socket's receive buffer is 16 KiB, so the
//!   kernel soaks up little). Throughput is deliveries per second to the
//!   reading subscribers; the relay's peak RSS is sampled every 20 ms.
//! - **rate enforcement**: `ConnQuota::charge` per message, in-process, for a
//!   connection with no policy and for one whose tier has a user bucket and
//!   class buckets, beside a bare token-bucket `take`.
#![allow(clippy::print_stdout)] // a benchmark prints its table

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wasmrelay::config::LimitsConfig;
use wasmrelay::hooks::Grant;
use wasmrelay::protocol::{Data, Msg, VERSION, codec};
use wasmrelay::quota::{Quotas, TierLimits};
use wasmrelay::rate::{Bucket, Rate};
use wasmrelay_tests::{RelayProcess, free_port, rss_of};

const RELAY: &str = env!("CARGO_BIN_EXE_test-wasmrelay");
const SUBSCRIBERS: usize = 101;
const PAYLOAD: usize = 256;
const WINDOW: u64 = 256;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr, small_receive_buffer: bool) -> anyhow::Result<Ws> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if small_receive_buffer {
        socket.set_recv_buffer_size(16 * 1024)?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream).await?;
    ws.send(Message::Binary(codec::encode_binary(&Msg::Hello {
        v: VERSION,
        client: Some("bench".into()),
        token: None,
        batch: false,
        resume: None,
    })))
    .await?;
    expect(&mut ws, "welcome").await?;
    Ok(ws)
}

async fn expect(ws: &mut Ws, kind: &str) -> anyhow::Result<()> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(frame))) => {
                if codec::decode_binary(&frame)?.kind() == kind {
                    return Ok(());
                }
            }
            Some(Ok(_)) => continue,
            other => anyhow::bail!("connection ended waiting for {kind}: {other:?}"),
        }
    }
}

async fn subscribe(ws: &mut Ws) -> anyhow::Result<()> {
    ws.send(Message::Binary(codec::encode_binary(&Msg::Subscribe {
        channel: "fan".into(),
        recover: None,
    })))
    .await?;
    expect(ws, "subscribed").await
}

/// Whether a binary frame is a channel `message` (the header starts with its type).
fn is_message(frame: &[u8]) -> bool {
    frame
        .get(4..)
        .is_some_and(|h| h.starts_with(b"{\"type\":\"message\""))
}

struct FanOut {
    deliveries_per_second: f64,
    peak_rss: u64,
    base_rss: u64,
}

async fn fan_out(relay: &RelayProcess, messages: u64, stalled: bool) -> anyhow::Result<FanOut> {
    let addr = SocketAddr::from(([127, 0, 0, 1], relay.port));
    let reading = if stalled {
        SUBSCRIBERS - 1
    } else {
        SUBSCRIBERS
    };
    let mut stalled_ws = None;
    if stalled {
        let mut ws = connect(addr, true).await?;
        subscribe(&mut ws).await?;
        stalled_ws = Some(ws);
    }
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..reading).map(|_| AtomicU64::new(0)).collect());
    let mut readers = Vec::new();
    for i in 0..reading {
        let mut ws = connect(addr, false).await?;
        subscribe(&mut ws).await?;
        let counts = counts.clone();
        readers.push(tokio::spawn(async move {
            let mut seen = 0;
            while seen < messages {
                match ws.next().await {
                    Some(Ok(Message::Binary(frame))) if is_message(&frame) => {
                        seen += 1;
                        counts[i].store(seen, Ordering::Relaxed);
                    }
                    Some(Ok(_)) => {}
                    other => anyhow::bail!("subscriber ended early: {other:?}"),
                }
            }
            anyhow::Ok(())
        }));
    }
    let pid = relay.process.pid();
    let base_rss = rss_of(pid).unwrap_or(0);
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(base_rss));
    let sampler = {
        let (sampling, peak) = (sampling.clone(), peak.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(rss) = rss_of(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let mut publisher = connect(addr, false).await?;
    let publish = Message::Binary(codec::encode_binary(&Msg::Publish {
        channel: "fan".into(),
        id: None,
        data: Data(Bytes::from(vec![b'x'; PAYLOAD])),
    }));
    let started = Instant::now();
    for sent in 0..messages {
        loop {
            let slowest = counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0);
            if sent < slowest + WINDOW {
                break;
            }
            publisher.flush().await?;
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        publisher.feed(publish.clone()).await?;
        if sent % 32 == 31 {
            publisher.flush().await?;
        }
    }
    publisher.flush().await?;
    for reader in readers {
        reader.await??;
    }
    let elapsed = started.elapsed();
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;
    drop(stalled_ws);
    Ok(FanOut {
        deliveries_per_second: (messages * reading as u64) as f64 / elapsed.as_secs_f64(),
        peak_rss: peak.load(Ordering::Relaxed),
        base_rss,
    })
}

/// Nanoseconds per call of `f`, over `calls` calls.
fn per_call(calls: u64, mut f: impl FnMut()) -> f64 {
    for _ in 0..calls / 10 {
        f();
    }
    let started = Instant::now();
    for _ in 0..calls {
        f();
    }
    started.elapsed().as_nanos() as f64 / calls as f64
}

fn rate_costs(calls: u64) -> Vec<(&'static str, f64)> {
    let plenty = Rate {
        per_second: u32::MAX,
        burst: u32::MAX,
    };
    let mut bucket = Bucket::new(plenty);
    let bare = per_call(calls, || {
        let _ = std::hint::black_box(bucket.take());
    });
    let limits = LimitsConfig {
        connection_rate: plenty,
        ..LimitsConfig::default()
    };
    let quotas = Arc::new(Quotas::new(&limits));
    let mut anonymous = quotas.open(None).expect("a slot");
    let no_policy = per_call(calls, || {
        std::hint::black_box(anonymous.charge("news/today"));
    });
    let grant = Grant {
        user: "alice".into(),
        tier: "vip".into(),
        limits: Some(TierLimits {
            max_connections: 10,
            messages: plenty,
            classes: ["chat", "game", "file", "notify"]
                .iter()
                .map(|c| (c.to_string(), plenty))
                .collect(),
        }),
    };
    let mut tiered = quotas.open(Some(&grant)).expect("a slot");
    let with_class = per_call(calls, || {
        std::hint::black_box(tiered.charge("game/42"));
    });
    vec![
        ("token bucket take (integer nano-tokens)", bare),
        ("charge: connection bucket only (no policy)", no_policy),
        (
            "charge: connection + user + class buckets (tiered)",
            with_class,
        ),
    ]
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let (messages, rounds, calls) = if quick {
        (500, 1, 100_000)
    } else {
        (20_000, 3, 10_000_000)
    };
    let costs = rate_costs(calls);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let results = runtime.block_on(async {
        let relay = RelayProcess::start_configured(RELAY, free_port(), "bundled = []", &[]).await;
        let mut all = Vec::new();
        for _ in 0..rounds {
            let fast = fan_out(&relay, messages, false).await?;
            let stalled = fan_out(&relay, messages, true).await?;
            all.push((fast, stalled));
        }
        anyhow::Ok(all)
    })?;
    let mut fast: Vec<f64> = results.iter().map(|r| r.0.deliveries_per_second).collect();
    let mut stalled: Vec<f64> = results.iter().map(|r| r.1.deliveries_per_second).collect();
    fast.sort_by(f64::total_cmp);
    stalled.sort_by(f64::total_cmp);
    let (fast_median, stalled_median) = (fast[fast.len() / 2], stalled[stalled.len() / 2]);
    let peak_fast = results.iter().map(|r| r.0.peak_rss).max().unwrap_or(0);
    let peak_stalled = results.iter().map(|r| r.1.peak_rss).max().unwrap_or(0);
    let base = results.first().map_or(0, |r| r.0.base_rss);

    println!(
        "\nBackpressure benchmark{}",
        if quick {
            " (--quick: smoke run, figures meaningless)"
        } else {
            ""
        }
    );
    println!(
        "fan-out: {messages} publishes x {PAYLOAD} B to {SUBSCRIBERS} subscribers, window {WINDOW}, medians of {rounds} rounds; default limits (4 MiB per connection, 512 MiB budget)\n"
    );
    println!("| subscribers | deliveries/s to readers | x all-reading | relay peak RSS |");
    println!("|---|---:|---:|---:|");
    println!(
        "| 101 reading | {fast_median:.0} | 1.00 | {:.1} MiB |",
        mib(peak_fast)
    );
    println!(
        "| 100 reading + 1 stalled | {stalled_median:.0} | {:.2} | {:.1} MiB |",
        stalled_median / fast_median,
        mib(peak_stalled)
    );
    println!("\nrelay RSS before the first round: {:.1} MiB", mib(base));
    println!("\n| rate enforcement, per message | ns |");
    println!("|---|---:|");
    for (what, ns) in costs {
        println!("| {what} | {ns:.1} |");
    }
    Ok(())
}
