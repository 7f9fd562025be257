//! Token buckets: the native, per-message enforcement of the rates admission
//! decided. Arithmetic is in integers (nano-tokens against nanoseconds of
//! `tokio::time::Instant`), so a bucket admits exactly `burst + rate × t`
//! messages over `t` — no float drift — and tests can drive it with tokio's
//! paused clock.

use std::time::Duration;

use tokio::time::Instant;

/// One token, in the nano-tokens buckets count in.
const TOKEN: u128 = 1_000_000_000;

/// A rate: `per_second` tokens flow in, up to `burst` are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone)]
pub struct Bucket {
    rate: Rate,
    /// Nano-tokens held at `updated`.
    level: u128,
    updated: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            level: u128::from(rate.burst) * TOKEN,
            updated: Instant::now(),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_nanos();
        let capacity = u128::from(self.rate.burst) * TOKEN;
        self.level = (self.level + elapsed * u128::from(self.rate.per_second)).min(capacity);
        self.updated = now;
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self) -> Result<(), Duration> {
        self.take_at(Instant::now())
    }

    pub fn take_at(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.level >= TOKEN {
            self.level -= TOKEN;
            return Ok(());
        }
        if self.rate.per_second == 0 {
            // Nothing ever flows in: the burst was all there is.
            return Err(Duration::MAX);
        }
        let missing = TOKEN - self.level;
        let nanos = missing.div_ceil(u128::from(self.rate.per_second));
        Err(Duration::from_nanos(nanos.min(u128::from(u64::MAX)) as u64))
    }

    /// Whether the bucket is full again, so forgetting it changes nothing.
    pub fn is_full_at(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.level == u128::from(self.rate.burst) * TOKEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admissions over `seconds` when a client tries every 100 µs (faster
    /// than any rate tested, so the bucket, not the client, is the limit).
    fn admitted_over(rate: Rate, seconds: u64) -> u64 {
        let start = Instant::now();
        let mut bucket = Bucket::new(rate);
        let mut admitted = 0;
        for step in 0..=seconds * 10_000 {
            if bucket
                .take_at(start + Duration::from_micros(step * 100))
                .is_ok()
            {
                admitted += 1;
            }
        }
        admitted
    }

    #[tokio::test(start_paused = true)]
    async fn admits_exactly_burst_plus_rate_times_elapsed() {
        for (per_second, burst, seconds) in [(5, 10, 3), (1, 1, 10), (1000, 50, 2), (7, 3, 5)] {
            let rate = Rate { per_second, burst };
            assert_eq!(
                admitted_over(rate, seconds),
                u64::from(burst) + u64::from(per_second) * seconds,
                "{rate:?} over {seconds}s"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_when_the_next_token_arrives() {
        let mut bucket = Bucket::new(Rate {
            per_second: 4,
            burst: 1,
        });
        assert!(bucket.take().is_ok());
        let wait = bucket.take().unwrap_err();
        assert_eq!(wait, Duration::from_millis(250));
        tokio::time::advance(wait - Duration::from_nanos(1)).await;
        assert!(bucket.take().is_err(), "one nanosecond early");
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert!(bucket.take().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_rate_allows_the_burst_only() {
        let mut bucket = Bucket::new(Rate {
            per_second: 0,
            burst: 2,
        });
        assert!(bucket.take().is_ok());
        assert!(bucket.take().is_ok());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(bucket.take(), Err(Duration::MAX));
    }
}
