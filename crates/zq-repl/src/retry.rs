//! The one retry driver of the sender: capped exponential backoff with jitter, for a
//! daemon's reconnections and a one-shot run's retries alike.

use std::time::{Duration, Instant, SystemTime};

/// Exponential backoff between attempts: `first`, twice as long after each failure up to
/// `cap`, each wait up to 25 % longer at random so that a fleet does not retry in
/// lockstep. A success starts over at `first`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    failures: u32,
    next_try: Instant,
}

impl Backoff {
    /// A daemon's reconnections: fast at first (a receiver restart is over in a second),
    /// at most every 10 s.
    pub fn reconnect() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// A one-shot run's retries: `--retry-delay`, doubling, at most a minute (never less
    /// than `first`).
    pub fn retries(first: Duration) -> Self {
        Self::new(first, first.max(Duration::from_secs(60)))
    }

    /// Waits from `first` up to `cap`.
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            first,
            cap: cap.max(first),
            failures: 0,
            next_try: Instant::now(),
        }
    }

    /// An attempt failed: how long to wait before the next one (also [`Backoff::next_try`]).
    pub fn failed(&mut self) -> Duration {
        let base = self
            .first
            .saturating_mul(1 << self.failures.min(20))
            .min(self.cap);
        self.failures = self.failures.saturating_add(1);
        let delay = base + pseudo_random(base / 4);
        self.next_try = Instant::now() + delay;
        delay
    }

    /// An attempt succeeded: the next failure waits `first` again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// When the next attempt is due.
    pub fn next_try(&self) -> Instant {
        self.next_try
    }
}

/// A pseudo-random duration in `0..max` (enough for jitter; not for anything else).
pub fn pseudo_random(max: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let max = max.as_nanos().max(1) as u64;
    Duration::from_nanos(u64::from(nanos).wrapping_mul(2654435761) % max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(d: Duration, base: Duration) -> bool {
        d >= base && d <= base * 5 / 4
    }

    #[test]
    fn reconnections_grow_to_a_cap_and_start_over_after_a_success() {
        let mut b = Backoff::reconnect();
        let first = b.failed();
        assert!(within(first, Duration::from_millis(100)), "{first:?}");
        let mut last = first;
        for _ in 0..40 {
            last = b.failed();
        }
        assert!(within(last, Duration::from_secs(10)), "{last:?}");
        assert_eq!(b.failures(), 41);
        b.succeeded();
        assert!(within(b.failed(), Duration::from_millis(100)));
    }

    #[test]
    fn retries_double_from_the_first_delay_up_to_a_minute() {
        let mut b = Backoff::retries(Duration::from_secs(1));
        for base in [1, 2, 4, 8, 16, 32, 60, 60] {
            let d = b.failed();
            assert!(within(d, Duration::from_secs(base)), "{d:?} for {base}");
        }
        // A first delay above the cap is kept.
        let mut slow = Backoff::retries(Duration::from_secs(300));
        slow.failed();
        assert!(within(slow.failed(), Duration::from_secs(300)));
    }

    #[test]
    fn a_zero_delay_stays_zero() {
        let mut b = Backoff::retries(Duration::ZERO);
        assert_eq!(b.failed(), Duration::ZERO);
        assert_eq!(b.failed(), Duration::ZERO);
    }
}
