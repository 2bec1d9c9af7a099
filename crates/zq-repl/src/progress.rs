//! What a sender's steps in flight have moved, for a progress line on a terminal and a
//! daemon's status: bytes, rate and, for bulk steps where zfs can estimate the stream's
//! size (`zfs send -nvP`, OpenZFS), the share done and the time left.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The steps in flight, shared between a [`crate::sender::Sender`] and whatever displays them.
#[derive(Debug, Default)]
pub struct Progress {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Numbers steps, so that a late estimate never lands on another step.
    last_id: u64,
    steps: BTreeMap<u64, InFlight>,
}

/// A step being sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// `dataset@snapshot` being sent.
    pub what: String,
    /// When the step started.
    pub started: Instant,
    /// Stream bytes sent (before compression).
    pub bytes: u64,
    /// What zfs estimated the stream at, if it could.
    pub estimate: Option<u64>,
}

impl Progress {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The step in flight that started last, if any (a one-shot run has one at a time).
    pub fn now(&self) -> Option<InFlight> {
        self.state().steps.values().next_back().cloned()
    }

    /// Every step in flight, oldest first.
    pub fn all(&self) -> Vec<InFlight> {
        self.state().steps.values().cloned().collect()
    }

    pub(crate) fn start(&self, what: String) -> u64 {
        let mut s = self.state();
        s.last_id += 1;
        let id = s.last_id;
        s.steps.insert(
            id,
            InFlight {
                what,
                started: Instant::now(),
                bytes: 0,
                estimate: None,
            },
        );
        id
    }

    pub(crate) fn estimate(&self, id: u64, bytes: u64) {
        if let Some(n) = self.state().steps.get_mut(&id) {
            n.estimate = Some(bytes);
        }
    }

    pub(crate) fn add(&self, id: u64, bytes: u64) {
        if let Some(n) = self.state().steps.get_mut(&id) {
            n.bytes += bytes;
        }
    }

    pub(crate) fn end(&self, id: u64) {
        self.state().steps.remove(&id);
    }
}

impl InFlight {
    /// One line for a terminal: `pool/fs@snap: 1.2 GiB of ~4.0 GiB (30%), 95.1 MiB/s, 30 s
    /// left`, or without an estimate `pool/fs@snap: 1.2 GiB, 95.1 MiB/s`.
    pub fn line(&self, now: Instant) -> String {
        let secs = now.saturating_duration_since(self.started).as_secs_f64();
        describe(&self.what, self.bytes, self.estimate, secs)
    }
}

/// [`InFlight::line`] of a step named `what` that has sent `bytes` in `secs` seconds, of
/// an `estimate` if zfs gave one.
pub fn describe(what: &str, bytes: u64, estimate: Option<u64>, secs: f64) -> String {
    let rate = if secs > 0.0 { bytes as f64 / secs } else { 0.0 };
    match estimate.filter(|e| *e > 0) {
        Some(est) => {
            let pct = (bytes as f64 * 100.0 / est as f64).min(100.0);
            let left = if rate > 0.0 {
                let s = (est.saturating_sub(bytes)) as f64 / rate;
                format!(", {} left", human_duration(Duration::from_secs_f64(s)))
            } else {
                String::new()
            };
            format!(
                "{what}: {} of ~{} ({pct:.0}%), {}/s{left}",
                human_bytes(bytes),
                human_bytes(est),
                human_bytes(rate as u64)
            )
        }
        None => format!(
            "{what}: {}, {}/s",
            human_bytes(bytes),
            human_bytes(rate as u64)
        ),
    }
}

/// `bytes` for people, in binary units with one decimal (no crate: this and the receiver's
/// out-of-space message are its only uses).
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=99 => format!("{s} s"),
        100..=5999 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_with_and_without_an_estimate() {
        let t0 = Instant::now();
        let mut f = InFlight {
            what: "tank/fs@s1".into(),
            started: t0,
            bytes: 100 << 20,
            estimate: Some(400 << 20),
        };
        let at = t0 + Duration::from_secs(2);
        assert_eq!(
            f.line(at),
            "tank/fs@s1: 100.0 MiB of ~400.0 MiB (25%), 50.0 MiB/s, 6 s left"
        );
        f.estimate = None;
        assert_eq!(f.line(at), "tank/fs@s1: 100.0 MiB, 50.0 MiB/s");
        // An estimate below what was sent (zfs estimates) caps at 100%, 0 s left.
        f.estimate = Some(50 << 20);
        assert!(f.line(at).contains("(100%)") && f.line(at).ends_with("0 s left"));
        assert_eq!(human_duration(Duration::from_secs(3725)), "62m05s");
        assert_eq!(human_duration(Duration::from_secs(7300)), "2h01m");
    }

    #[test]
    fn steps_are_counted_apart_and_late_estimates_go_nowhere() {
        let p = Progress::default();
        let first = p.start("a@1".into());
        p.end(first);
        let second = p.start("a@2".into());
        p.estimate(first, 123);
        assert_eq!(p.now().unwrap().estimate, None);
        p.estimate(second, 456);
        p.add(second, 10);
        let now = p.now().unwrap();
        assert_eq!((now.estimate, now.bytes), (Some(456), 10));
        p.end(first);
        assert!(p.now().is_some(), "an old step's end leaves the new one");
        // A daemon runs several at once.
        let third = p.start("b@1".into());
        p.add(third, 5);
        p.add(first, 1000);
        let all: Vec<(String, u64)> = p.all().into_iter().map(|f| (f.what, f.bytes)).collect();
        assert_eq!(all, [("a@2".to_string(), 10), ("b@1".to_string(), 5)]);
        p.end(second);
        p.end(third);
        assert!(p.now().is_none() && p.all().is_empty());
    }
}
