//! A daemon's status as `zq-send status`, monitoring and metrics read it: what the daemon
//! writes to its status file on every tick (JSON; fields are only ever added, with
//! defaults, so older files still read).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// One dataset in `zq-send status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetStatus {
    /// Source dataset.
    pub source: String,
    /// Target dataset.
    pub target: String,
    /// Newest snapshot the receiver committed, if known.
    pub replicated: Option<String>,
    /// How old that snapshot is (replication lag), in seconds.
    pub lag_seconds: Option<f64>,
    /// Snapshots zq created that are not replicated yet.
    pub unsent: usize,
    /// The last error, while the dataset is failing.
    pub error: Option<String>,
    /// Interrupted steps this daemon resumed (from the receiver's spool, or from zfs's
    /// partial receive with `zfs send -t`).
    #[serde(default)]
    pub resumes: u64,
    /// Stream bytes those resumes did not send again.
    #[serde(default)]
    pub resumed_bytes: u64,
    /// Where the last of those resumes continued from (`zfs send -t`, or the receiver's
    /// spool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<String>,
    /// Steps the receiver committed, since this daemon started.
    #[serde(default)]
    pub steps: u64,
    /// Failed attempts, since this daemon started.
    #[serde(default)]
    pub failures: u64,
    /// Stream bytes of the committed steps, since this daemon started.
    #[serde(default)]
    pub bytes: u64,
    /// The step in flight, if one has run for a second or more.
    #[serde(default)]
    pub sending: Option<Sending>,
}

/// A step in flight, in `zq-send status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sending {
    /// The snapshot it ends with (after `@`).
    pub snapshot: String,
    /// Stream bytes sent so far.
    pub bytes: u64,
    /// zfs's estimate of the stream's size, for bulk steps where zfs gives one.
    pub estimate: Option<u64>,
    /// How long it has been running, in seconds.
    pub seconds: f64,
}

/// The whole daemon's status, written on every tick and as steps end (at most once a second).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// When it was written (seconds since the Unix epoch).
    pub written_at: f64,
    /// Receiver address.
    pub receiver: String,
    /// Whether the connection is up.
    pub connected: bool,
    /// When the daemon stopped (seconds since the Unix epoch); absent while it runs. A
    /// daemon killed without a chance to write it leaves its last status, which ages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<f64>,
    /// Per dataset, parents first.
    pub datasets: Vec<DatasetStatus>,
}

/// Seconds since the epoch, for status files.
pub fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}
