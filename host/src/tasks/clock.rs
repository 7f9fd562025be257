//! The scheduler's clock: wall-clock milliseconds (what schedules and the
//! store speak) read off tokio's monotonic clock from a fixed starting
//! point, so a schedule's firing times follow tokio's time — exact under a
//! paused clock in tests — and a wall-clock step does not fire a burst.
//! [`Clock::resync`] realigns with the wall clock now and then.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    base_wall_ms: i64,
}

impl Clock {
    /// Starts at the wall clock's current time.
    pub fn system() -> Self {
        Self::starting_at(crate::store::wall_ms())
    }

    /// Starts at `wall_ms` (tests pick a moment, e.g. before a DST change).
    pub fn starting_at(wall_ms: i64) -> Self {
        Self {
            base: Instant::now(),
            base_wall_ms: wall_ms,
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.base_wall_ms + self.base.elapsed().as_millis() as i64
    }

    /// When on tokio's clock the wall-clock moment `wall_ms` comes (a
    /// moment before the clock started maps to its start: already past).
    pub fn instant_at(&self, wall_ms: i64) -> Instant {
        let ahead = (wall_ms - self.base_wall_ms).max(0);
        self.base + Duration::from_millis(ahead as u64)
    }

    /// Realigns with the system's wall clock (it drifts from the monotonic
    /// one by NTP's corrections, and may be stepped).
    pub fn resync(&mut self) {
        *self = Self::system();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wall_time_follows_tokio_time() {
        let clock = Clock::starting_at(1_000_000);
        assert_eq!(clock.now_ms(), 1_000_000);
        tokio::time::sleep_until(clock.instant_at(1_002_500)).await;
        assert_eq!(clock.now_ms(), 1_002_500);
    }
}
