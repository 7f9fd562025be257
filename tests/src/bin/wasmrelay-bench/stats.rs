//! Percentiles, medians and memory readings: the figures the tables print.

use serde::{Deserialize, Serialize};

/// Latency percentiles in microseconds, from every sample (sorted, exact).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of_nanos(mut nanos: Vec<u64>) -> Self {
        if nanos.is_empty() {
            return Self::default();
        }
        nanos.sort_unstable();
        let at = |q: f64| {
            let index = ((nanos.len() - 1) as f64 * q).round() as usize;
            nanos[index] as f64 / 1000.0
        };
        Self {
            samples: nanos.len(),
            p50: at(0.5),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[sorted.len() / 2]
}

pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Samples a process's RSS every 10 ms until dropped; `peak` is the highest seen.
pub struct PeakRss {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<u64>,
}

impl PeakRss {
    pub fn watch(pid: u32) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut peak = 0;
                let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return peak,
                        _ = tick.tick() => peak = peak.max(wasmrelay_tests::rss_of(pid).unwrap_or(0)),
                    }
                }
            }
        });
        Self { stop, task }
    }

    pub async fn peak_bytes(self) -> u64 {
        self.stop.cancel();
        self.task.await.unwrap_or(0)
    }
}
