//! `--bwlimit`: one rate limit shared by every stream of a sender, so that all its steps
//! together stay under it. A generic cell rate algorithm: each chunk moves the theoretical
//! arrival time on by `len / rate`; a sender ahead of it by more than the burst allowance
//! sleeps until it is not.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A shared limit of bytes per second.
#[derive(Debug, Clone)]
pub struct RateLimit {
    inner: Arc<Mutex<Gcra>>,
}

#[derive(Debug)]
struct Gcra {
    /// Seconds per byte.
    per_byte: f64,
    /// How far ahead of the rate a sender may run before it waits (a burst).
    burst: Duration,
    /// When the bytes accounted so far would have gone at exactly the rate.
    tat: Option<Instant>,
}

impl Gcra {
    /// Accounts `len` bytes at `now`; returns how long to wait before sending them.
    fn take(&mut self, len: usize, now: Instant) -> Duration {
        let start = self.tat.map_or(now, |t| t.max(now));
        let tat = start + Duration::from_secs_f64(len as f64 * self.per_byte);
        self.tat = Some(tat);
        tat.saturating_duration_since(now + self.burst)
    }
}

impl RateLimit {
    /// At most `bytes_per_sec` on average; bursts of 100 ms worth (at least 1 MiB) go at
    /// once, which keeps the sleeps coarse and the pipe full.
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = Duration::from_secs_f64((0.1f64).max(1048576.0 / rate).min(1.0));
        RateLimit {
            inner: Arc::new(Mutex::new(Gcra {
                per_byte: 1.0 / rate,
                burst,
                tat: None,
            })),
        }
    }

    /// The rate, in bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        1.0 / g.per_byte
    }

    /// Waits until `len` more bytes may go.
    pub async fn take(&self, len: usize) {
        let wait = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.take(len, Instant::now())
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_faster_than_the_rate_waits_for_it_after_a_burst() {
        let mut g = Gcra {
            per_byte: 1.0 / 1_000_000.0, // 1 MB/s
            burst: Duration::from_millis(100),
            tat: None,
        };
        let t0 = Instant::now();
        // 100 KB fit in the burst...
        assert_eq!(g.take(100_000, t0), Duration::ZERO);
        // ...the next 100 KB are 100 ms ahead of the rate.
        assert_eq!(g.take(100_000, t0), Duration::from_millis(100));
        // 10 chunks of 100 KB at once: the last waits until 1 s minus the burst.
        let mut last = Duration::ZERO;
        for _ in 0..8 {
            last = g.take(100_000, t0);
        }
        assert_eq!(last, Duration::from_millis(900));
        // A sender slower than the rate never waits, and idle time is not saved up.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(g.take(100_000, later), Duration::ZERO);
        assert_eq!(g.take(100_000, later), Duration::from_millis(100));
    }

    #[test]
    fn the_burst_is_at_least_a_mebibyte_and_at_most_a_second() {
        let slow = RateLimit::new(100_000);
        assert_eq!(slow.inner.lock().unwrap().burst, Duration::from_secs(1));
        let fast = RateLimit::new(1_000_000_000);
        assert_eq!(fast.inner.lock().unwrap().burst, Duration::from_millis(100));
    }
}
