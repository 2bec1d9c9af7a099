//! The daemon: for one job, a snapshot loop, a replication loop and a retention loop, each
//! its own task so that none stalls the others, over one persistent connection that is
//! re-established with capped exponential backoff when it breaks.
//!
//! Steady state lists neither side: the daemon remembers, per dataset, the source snapshots
//! it knows, the ones its snapshot loop created since, and the snapshot the receiver last
//! committed (its cursor), and sends the new snapshots on top of the cursor ([`tracked`]).
//! The receiver re-checks the base; if the cursor is stale it refuses, the cursor is dropped,
//! and the next tick lists both sides and re-plans. The source is listed at start,
//! after any failure, and every tick when something other than zq makes the snapshots
//! (where zfs has `snapshots_changed`, only the datasets it says changed, see
//! `daemon/changes.rs`); otherwise every [`REFRESH`] only its dataset names are listed,
//! to find datasets created or destroyed.
//!
//! There are no iterations that every dataset must finish: each dataset's step is a task
//! of its own, and a dataset whose step ends starts its next one at once if it has new
//! snapshots, so a large transfer (an initial replication, a burst of writes) delays only
//! its own dataset. At most `max_steps` steps transfer at once, plus as many bulk ones
//! (past 1 MiB) in a lane of their own ([`crate::lanes`]). A child whose parent's
//! target may not exist yet waits for the parent's first step; where the destination's
//! listing (taken side by side with the source's at start-up) shows it with snapshots,
//! the whole tree starts in the first pass.
//!
//! - [`supervisor`]: [`run`]: the loop that owns the connection (reconnecting with
//!   [`crate::retry::Backoff`]) and drives the others;
//! - [`snapshots`]: the snapshot loop (`--snapshot-every`);
//! - `scheduler`: what the daemon knows per dataset and which steps it starts;
//! - `status_file`: the status `zq-send status` reads;
//! - [`crate::prune`]: the retention loop and passes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::retention::Retention;

mod changes;
mod scheduler;
pub mod snapshots;
mod status_file;
pub mod supervisor;
pub mod tracked;

pub use snapshots::snapshot_name;
pub use supervisor::run;

/// How often the daemon checks the source tree for datasets created or destroyed when
/// nothing failed: new child datasets of a recursive job are picked up within this time.
pub const REFRESH: Duration = Duration::from_secs(30);

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Replicate at least this often.
    pub every: Duration,
    /// Also create a snapshot `zq_<UTC time>` of the source this often (`-r` with a
    /// recursive job), and replicate right after each.
    pub snapshot_every: Option<Duration>,
    /// Wait a random time up to this before the first replication (fleets start together).
    pub jitter: Duration,
    /// Most replication steps in flight at once; steps that grow past 1 MiB move to a
    /// bulk lane with as many slots again ([`crate::lanes`]).
    pub max_steps: usize,
    /// Retention of `zq_` snapshots on each side (never the common base or anything
    /// newer); off on a side whose policy is off.
    pub retention: Retention,
    /// Where to write the status (`zq-send status` reads it): on every tick, and at most
    /// once a second as steps end.
    pub status_file: Option<PathBuf>,
    /// The receiver's address, for the status.
    pub receiver: String,
    /// Where scrapes of `--metrics-listen` read the status and the connection.
    pub metrics: Option<Arc<crate::metrics::DaemonMetrics>>,
    /// The steps in flight, as the senders report them ([`crate::SenderConfig::progress`]), for the
    /// status.
    pub progress: Option<Arc<crate::progress::Progress>>,
}
