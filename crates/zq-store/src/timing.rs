//! How long `zfs` commands take, per subcommand, for the metrics endpoint
//! (`zq_zfs_command_duration_seconds`). Process-wide: one process runs one zfs program.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds of the histogram buckets, in seconds: from a fast `zfs list` to a long
/// `zfs send` of a full stream.
pub const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Durations of one subcommand.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timing {
    /// Commands that took at most `BUCKETS[i]` (not cumulative).
    pub buckets: [u64; BUCKETS.len()],
    /// All commands, including those longer than the last bucket.
    pub count: u64,
    /// Their total duration, in seconds.
    pub sum: f64,
}

impl Timing {
    fn add(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| s <= b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += s;
    }
}

static TIMINGS: Mutex<BTreeMap<String, Timing>> = Mutex::new(BTreeMap::new());

/// A command that started, recorded when it ends.
#[derive(Debug)]
pub(crate) struct Timer {
    subcommand: String,
    started: Instant,
    /// The whole command line, for the debug log where that is on.
    argv: Option<String>,
}

/// The log target of one debug line per zfs command (`ZQ_LOG=zq_store::calls=debug`): the
/// command line, how long it took and, for a command whose output zq reads whole (a
/// listing), how many lines it printed: for an operator asking what zq asks of zfs.
pub const CALLS_TARGET: &str = "zq_store::calls";

impl Timer {
    /// `subcommand` is zq's own argument (`list`, `send`, …), never user data; `argv`
    /// the command line, formatted only if the debug log of commands is on.
    pub(crate) fn start(subcommand: &str, argv: impl FnOnce() -> String) -> Self {
        Timer {
            subcommand: subcommand.to_string(),
            started: Instant::now(),
            argv: tracing::enabled!(target: CALLS_TARGET, tracing::Level::DEBUG).then(argv),
        }
    }

    pub(crate) fn stop(&self) {
        self.stop_read(None);
    }

    /// [`Self::stop`] of a command that printed `lines` lines, all read.
    pub(crate) fn stop_read(&self, lines: Option<usize>) {
        if let Some(argv) = &self.argv {
            let ms = self.started.elapsed().as_secs_f64() * 1000.0;
            match lines {
                Some(lines) => {
                    tracing::debug!(target: CALLS_TARGET, ms = format_args!("{ms:.1}"), lines, "{argv}")
                }
                None => {
                    tracing::debug!(target: CALLS_TARGET, ms = format_args!("{ms:.1}"), "{argv}")
                }
            }
        }
        if let Ok(mut t) = TIMINGS.lock() {
            t.entry(self.subcommand.clone())
                .or_default()
                .add(self.started.elapsed());
        }
    }
}

/// Durations so far, per subcommand.
pub fn timings() -> Vec<(String, Timing)> {
    TIMINGS
        .lock()
        .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_their_bucket() {
        let mut t = Timing::default();
        t.add(Duration::from_millis(3));
        t.add(Duration::from_millis(40));
        t.add(Duration::from_secs(1000));
        assert_eq!(t.buckets[0], 1);
        assert_eq!(t.buckets[3], 1);
        assert_eq!(t.buckets.iter().sum::<u64>(), 2);
        assert_eq!(t.count, 3);
        assert!((t.sum - 1000.043).abs() < 1e-9);
    }
}
