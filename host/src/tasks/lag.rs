//! Firing lag — from a run's due time to its plugin starting — since start
//! (a log-scale histogram) and over the last complete ten-second window
//! (exact percentiles of its samples), so an operator sees the lag now,
//! not diluted by hours of history or dominated by a busy start.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::plugin::loaded::{CallStats, Percentiles};

/// The window `last_window` reports on.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Samples kept per window; beyond it (over 20,000 firings a second) the
/// rest of the window counts only in the histogram.
const MAX_SAMPLES: usize = 200_000;

#[derive(Default)]
pub struct FiringLag {
    total: CallStats,
    window: Mutex<Option<Window>>,
}

struct Window {
    started: Instant,
    samples: Vec<u64>,
    last: Option<Percentiles>,
}

impl Window {
    /// Closes the current window if it is over.
    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed < WINDOW {
            return;
        }
        self.last = if elapsed < 2 * WINDOW {
            percentiles(&mut self.samples)
        } else {
            // The window before this one saw no firing.
            None
        };
        self.samples.clear();
        let windows = (elapsed.as_nanos() / WINDOW.as_nanos()) as u32;
        self.started += WINDOW * windows;
    }
}

fn percentiles(samples: &mut [u64]) -> Option<Percentiles> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    Some(Percentiles {
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
    })
}

impl FiringLag {
    pub fn record(&self, lag: Duration) {
        let nanos = lag.as_nanos() as u64;
        self.total.record_time(nanos);
        let now = Instant::now();
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let window = window.get_or_insert_with(|| Window {
            started: now,
            samples: Vec::new(),
            last: None,
        });
        window.roll(now);
        if window.samples.len() < MAX_SAMPLES {
            window.samples.push(nanos);
        }
    }

    pub fn since_start(&self) -> Option<Percentiles> {
        self.total.percentiles()
    }

    /// Percentiles over the last complete window, if it saw a firing.
    pub fn last_window(&self) -> Option<Percentiles> {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let window = window.as_mut()?;
        window.roll(Instant::now());
        window.last.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_last_window_forgets_what_came_before_it() {
        let lag = FiringLag::default();
        for _ in 0..100 {
            lag.record(Duration::from_millis(50));
        }
        tokio::time::advance(WINDOW).await;
        for _ in 0..100 {
            lag.record(Duration::from_millis(1));
        }
        assert_eq!(lag.last_window().unwrap().p99_us, 50_000.0);
        tokio::time::advance(WINDOW).await;
        let last = lag.last_window().unwrap();
        assert_eq!(
            (last.p50_us, last.p99_us),
            (1_000.0, 1_000.0),
            "the busy start is gone"
        );
        assert!(
            lag.since_start().unwrap().p99_us >= 40_000.0,
            "but counted since start"
        );
        tokio::time::advance(2 * WINDOW).await;
        assert!(lag.last_window().is_none(), "a quiet window has no figure");
    }
}
