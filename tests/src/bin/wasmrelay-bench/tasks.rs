//! Scenario 6, tasks: firing lag and relay CPU with many tasks due every
//! second, no-op runs per second flat out with the store writes they cost,
//! and the relay's memory with many tasks defined. Baselines from the same
//! run: tokio interval timers that each hand a no-op to a blocking thread
//! (the floor of any tokio scheduler), and the relay's store alone writing
//! run rows in batches.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;
use wasmrelay_tests::{RelayProcess, admin_client, get_json};

use super::stats::Percentiles;
use super::{Failures, MIB, emit, put, relay_with, start_role, us};

const NOOP_TASK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/task-script.wasm"));
const NOOP_TASK_MANIFEST: &str = "name = \"noop-task\"\nversion = \"1.0.0\"\nrole = \"task\"\ncapabilities = [\"log\", \"transfer\"]\n";

pub struct TaskSettings {
    /// Tasks due every second for the firing-lag table.
    pub due: usize,
    /// How long firing is measured, after a warm-up.
    pub seconds: f64,
    /// Tasks every 100 ms for the flat-out table.
    pub flat: usize,
    /// Tasks defined for the memory table.
    pub defined: usize,
    /// Rows the store baseline writes.
    pub store_rows: usize,
}

impl TaskSettings {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                due: 50,
                seconds: 2.0,
                flat: 50,
                defined: 200,
                store_rows: 10_000,
            }
        } else {
            Self {
                due: 1_000,
                seconds: 20.0,
                flat: 5_000,
                defined: 10_000,
                store_rows: 200_000,
            }
        }
    }
}

pub async fn tasks(settings: &TaskSettings, failures: &mut Failures) {
    println!("## 6. Tasks\n");
    println!(
        "A no-op task plugin (the `task-script` fixture: returns success at once) on a fresh relay \
         per table. Firing lag is from a run's due time to its plugin starting, over the last \
         complete 10 s at the end of the window (`firing_lag_last_10s` in /admin/stats), on a \
         relay restarted after the tasks were defined: it loads them from its store and fires \
         them on their slots. CPU is the relay process's, over the measured window.\n"
    );
    println!(
        "| system | tasks | due/s | fired/s | firing lag p50 | p99 | p99 since start | relay CPU |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    match firing(settings).await {
        Ok(row) => println!(
            "| wasmrelay, tasks every 1 s | {} | {} | {:.0} | {} | {} | {} | {:.1}% |",
            settings.due,
            settings.due,
            row.fired_per_s,
            us(row.lag_p50_us),
            us(row.lag_p99_us),
            us(row.lag_p99_since_start_us),
            row.cpu_percent
        ),
        Err(e) => {
            let error = failures.note("tasks firing", &e);
            println!("| wasmrelay | {} | {error} | | | | | |", settings.due);
        }
    }
    match timers_baseline(settings).await {
        Ok(row) => println!(
            "| tokio interval timers + spawn_blocking no-op | {} | {} | {:.0} | {} | {} | — | {:.1}% |",
            settings.due,
            settings.due,
            row.fired_per_s,
            us(row.lag_p50_us),
            us(row.lag_p99_us),
            row.cpu_percent
        ),
        Err(e) => {
            let error = failures.note("tasks timer baseline", &e);
            println!("| tokio timers | {} | {error} | | | | | |", settings.due);
        }
    }
    println!();

    println!(
        "Flat out: {} tasks every 100 ms ({} runs/s asked), concurrency `forbid`, the default \
         cap of 16 runs at once. Each run writes its row before the plugin starts and its end \
         after; log lines would add more.\n",
        settings.flat,
        settings.flat * 10
    );
    println!("| system | runs/s | store rows written/s | relay CPU |\n|---|---:|---:|---:|");
    match flat_out(settings).await {
        Ok(row) => println!(
            "| wasmrelay, no-op runs | {:.0} | {:.0} | {:.1}% |",
            row.fired_per_s, row.writes_per_s, row.cpu_percent
        ),
        Err(e) => {
            let error = failures.note("tasks flat out", &e);
            println!("| wasmrelay | {error} | | |");
        }
    }
    match store_baseline(settings).await {
        Ok(rows_per_s) => println!(
            "| the relay's store alone: run rows in batched transactions | — | {rows_per_s:.0} | — |"
        ),
        Err(e) => {
            let error = failures.note("tasks store baseline", &e);
            println!("| store alone | {error} | | |");
        }
    }
    println!();

    println!("| tasks (cron) | relay RSS | per task | defined/s |\n|---|---:|---:|---:|");
    match memory(settings).await {
        Ok(m) => {
            let per_task =
                |rss: u64| rss.saturating_sub(m.empty) as f64 / 1024.0 / settings.defined as f64;
            println!("| none | {:.1} MiB | | |", m.empty as f64 / MIB);
            println!(
                "| {} sharing one pattern, just defined over the API | {:.1} MiB | {:.2} KiB | {:.0} |",
                settings.defined,
                m.defined as f64 / MIB,
                per_task(m.defined),
                settings.defined as f64 / m.seconds
            );
            println!(
                "| the same, loaded from the store after a restart | {:.1} MiB | {:.2} KiB | |",
                m.loaded as f64 / MIB,
                per_task(m.loaded)
            );
            println!(
                "| {} with a pattern each | {:.1} MiB | {:.2} KiB | |",
                settings.defined,
                m.distinct as f64 / MIB,
                per_task(m.distinct)
            );
        }
        Err(e) => {
            let error = failures.note("tasks memory", &e);
            println!("| {} | {error} | | |", settings.defined);
        }
    }
    println!();
}

struct Firing {
    fired_per_s: f64,
    lag_p50_us: f64,
    lag_p99_us: f64,
    /// Since the relay started, its first (busiest) seconds included.
    lag_p99_since_start_us: f64,
    cpu_percent: f64,
    writes_per_s: f64,
}

async fn task_relay() -> anyhow::Result<RelayProcess> {
    let relay = relay_with("bundled = []\n").await;
    put(&relay, "noop-task", NOOP_TASK, NOOP_TASK_MANIFEST).await?;
    Ok(relay)
}

/// Defines `count` tasks (16 requests in flight); how long it took.
async fn define(relay: &RelayProcess, count: usize, schedule: Value) -> anyhow::Result<f64> {
    define_each(relay, count, |_| schedule.clone()).await
}

/// Defines `count` tasks, task `i` with `schedule(i)`.
async fn define_each(
    relay: &RelayProcess,
    count: usize,
    schedule: impl Fn(usize) -> Value,
) -> anyhow::Result<f64> {
    let client = admin_client();
    let url = relay.url("/admin/tasks");
    let started = Instant::now();
    let mut results = futures_util::stream::iter(0..count)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            let body =
                json!({"name": format!("t{i}"), "plugin": "noop-task", "schedule": schedule(i)});
            async move { client.post(url).json(&body).send().await }
        })
        .buffer_unordered(16);
    while let Some(response) = results.next().await {
        let response = response?;
        if response.status() != 201 {
            bail!(
                "defining a task: {} {}",
                response.status(),
                response.text().await?
            );
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The relay's task figures and its CPU time now.
async fn sample(relay: &RelayProcess) -> anyhow::Result<(Value, f64)> {
    let stats = get_json(&relay.url("/admin/stats")).await?;
    let cpu = cpu_seconds(relay.process.pid()).context("relay CPU time")?;
    Ok((stats["tasks"].clone(), cpu))
}

/// Measures the relay over `seconds` after a warm-up.
async fn measure(relay: &RelayProcess, seconds: f64) -> anyhow::Result<Firing> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, cpu_before) = sample(relay).await?;
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let (after, cpu_after) = sample(relay).await?;
    let delta =
        |key: &str| after[key].as_f64().unwrap_or(0.0) - before[key].as_f64().unwrap_or(0.0);
    if after["runs_failed"].as_u64() != Some(0) {
        bail!("runs failed: {after}");
    }
    Ok(Firing {
        fired_per_s: delta("runs_started") / seconds,
        lag_p50_us: after["firing_lag_last_10s"]["p50_us"]
            .as_f64()
            .unwrap_or(f64::NAN),
        lag_p99_us: after["firing_lag_last_10s"]["p99_us"]
            .as_f64()
            .unwrap_or(f64::NAN),
        lag_p99_since_start_us: after["firing_lag"]["p99_us"].as_f64().unwrap_or(f64::NAN),
        cpu_percent: (cpu_after - cpu_before) / seconds * 100.0,
        writes_per_s: delta("history_writes") / seconds,
    })
}

/// Defines the tasks, then restarts the relay so that what is measured is
/// the steady state (the lag histogram counts from start, and defining a
/// thousand tasks is itself work): the restarted relay loads them from its
/// store and fires them on their slots.
async fn defined_then_restarted(count: usize, schedule: Value) -> anyhow::Result<RelayProcess> {
    let relay = task_relay().await?;
    define(&relay, count, schedule).await?;
    Ok(relay.restart_gracefully().await)
}

async fn firing(settings: &TaskSettings) -> anyhow::Result<Firing> {
    let relay = defined_then_restarted(settings.due, json!({"every_ms": 1000})).await?;
    measure(&relay, settings.seconds).await
}

async fn flat_out(settings: &TaskSettings) -> anyhow::Result<Firing> {
    let relay = defined_then_restarted(settings.flat, json!({"every_ms": 100})).await?;
    measure(&relay, settings.seconds.min(10.0)).await
}

/// RSS: empty; after defining the tasks over the API (one cron pattern for
/// all); after a restart that loads them from the store; and with a
/// pattern of its own for each task. And how fast they were defined.
async fn memory(settings: &TaskSettings) -> anyhow::Result<Memory> {
    let relay = task_relay().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let empty = wasmrelay_tests::rss_of(relay.process.pid()).context("relay RSS")?;
    let seconds = define(&relay, settings.defined, json!({"cron": "0 0 0 1 1 *"})).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let defined = wasmrelay_tests::rss_of(relay.process.pid()).context("relay RSS")?;
    let relay = relay.restart_gracefully().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = wasmrelay_tests::rss_of(relay.process.pid()).context("relay RSS")?;
    drop(relay);
    let relay = task_relay().await?;
    // Second, minute and hour of a day: distinct for up to 86,400 tasks.
    define_each(
        &relay,
        settings.defined,
        |i| json!({"cron": format!("{} {} {} * * *", i % 60, (i / 60) % 60, (i / 3600) % 24)}),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let distinct = wasmrelay_tests::rss_of(relay.process.pid()).context("relay RSS")?;
    Ok(Memory {
        empty,
        defined,
        loaded,
        distinct,
        seconds,
    })
}

struct Memory {
    empty: u64,
    defined: u64,
    loaded: u64,
    distinct: u64,
    seconds: f64,
}

/// The timer baseline, in a process of its own like the relay.
async fn timers_baseline(settings: &TaskSettings) -> anyhow::Result<Firing> {
    let (mut child, line) = start_role(
        &[
            "__timers",
            &settings.due.to_string(),
            &(settings.seconds + 2.0).to_string(),
        ],
        std::process::Stdio::null(),
    )
    .await?;
    child.wait().await?;
    let result: TimerResult =
        serde_json::from_str(&line).with_context(|| format!("timer baseline said {line:?}"))?;
    Ok(Firing {
        fired_per_s: result.fired as f64 / result.seconds,
        lag_p50_us: result.lag.p50,
        lag_p99_us: result.lag.p99,
        lag_p99_since_start_us: f64::NAN,
        cpu_percent: result.cpu_seconds / result.seconds * 100.0,
        writes_per_s: 0.0,
    })
}

async fn store_baseline(settings: &TaskSettings) -> anyhow::Result<f64> {
    let (mut child, line) = start_role(
        &["__store", &settings.store_rows.to_string()],
        std::process::Stdio::null(),
    )
    .await?;
    child.wait().await?;
    line.parse::<f64>()
        .with_context(|| format!("store baseline said {line:?}"))
}

#[derive(Serialize, Deserialize)]
pub struct TimerResult {
    fired: u64,
    seconds: f64,
    lag: Percentiles,
    cpu_seconds: f64,
}

/// `__timers COUNT SECONDS`: COUNT interval timers, each every second,
/// spread across the second; each tick hands a no-op to a blocking thread
/// and records how late that started.
pub async fn timers(count: usize, seconds: f64) -> anyhow::Result<()> {
    let lags = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(seconds);
    let measure_from = start + Duration::from_secs(2);
    let cpu_before = cpu_seconds(std::process::id()).unwrap_or(0.0);
    let mut timers = Vec::new();
    for i in 0..count {
        let lags = lags.clone();
        let offset = Duration::from_millis(1_000 * i as u64 / count as u64);
        timers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(start + offset, Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                let due = tick.tick().await;
                if due > end {
                    return;
                }
                let started = tokio::task::spawn_blocking(Instant::now)
                    .await
                    .unwrap_or(due);
                if due >= measure_from {
                    let lag = started.saturating_duration_since(due).as_nanos() as u64;
                    lags.lock().unwrap_or_else(|e| e.into_inner()).push(lag);
                }
            }
        }));
    }
    for timer in timers {
        timer.await?;
    }
    let lags = std::mem::take(&mut *lags.lock().unwrap_or_else(|e| e.into_inner()));
    let measured = (end - measure_from).as_secs_f64();
    emit(&TimerResult {
        fired: lags.len() as u64,
        seconds: measured,
        lag: Percentiles::of_nanos(lags),
        cpu_seconds: cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu_before,
    })
}

/// `__store ROWS`: the relay's store writing ROWS run rows, 1,024 per
/// transaction (the history writer's batch); prints rows per second.
pub async fn store(rows: usize) -> anyhow::Result<()> {
    use wasmrelay::store::{Store, tasks as saved};
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("wasmrelay.db"))?;
    let task = store
        .call(|conn| saved::put_task(conn, "bench", "{}", "api", 0))
        .await?;
    let started = std::time::Instant::now();
    let mut next = 1i64;
    while (next as usize) <= rows {
        let first = next;
        let last = (first + 1_023).min(rows as i64);
        next = last + 1;
        store
            .call(move |conn| {
                let tx = conn.transaction()?;
                for id in first..=last {
                    saved::insert_run(&tx, id, task, 1, "success", id, id, Some("ok"))?;
                }
                tx.commit()
            })
            .await?;
    }
    println!("{}", rows as f64 / started.elapsed().as_secs_f64());
    Ok(())
}

/// A process's user + system CPU time, in seconds (Linux).
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ: 100 on every Linux this runs on.
    Some((utime + stime) / 100.0)
}
