//! Replication: planning (pure functions over snapshot lists) and the sender and receiver
//! engines that carry out the plan over one QUIC connection.

#![forbid(unsafe_code)]
// Data from a peer or from zfs must not panic the process (tests may unwrap).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod connector;
pub mod daemon;
pub mod error;
#[cfg(debug_assertions)]
mod fault;
pub mod filter;
pub mod holds;
pub mod lanes;
pub mod metrics;
pub mod oneshot;
pub mod plan;
pub mod progress;
pub mod protect;
pub mod receiver;
pub mod retention;
pub mod retry;
pub mod sender;
pub mod stripe;

#[cfg(test)]
mod testutil;

pub use connector::{ConnectConfig, ConnectError, Connector};
pub use daemon::DaemonOptions;
pub use error::ReplError;
pub use lanes::{Lanes, Slot};
pub use plan::{plan, Plan, PlanError, PlanOptions, Step};
pub use receiver::{Policy, Receiver};
pub use sender::{Job, Listing, Sender, SenderConfig};

use zq_store::DatasetName;

/// What happened to one dataset of a job.
#[derive(Debug)]
pub struct DatasetReport {
    /// Source dataset.
    pub source: DatasetName,
    /// Target dataset.
    pub target: DatasetName,
    /// Outcome.
    pub outcome: DatasetOutcome,
}

/// Outcome of one dataset.
#[derive(Debug)]
pub enum DatasetOutcome {
    /// Nothing new to send.
    UpToDate,
    /// Steps were committed by the receiver.
    Sent {
        /// Steps run.
        steps: usize,
        /// Stream bytes sent.
        bytes: u64,
        /// Stream bytes not sent again because a resumed step's receiver had them.
        resumed: u64,
        /// The newest snapshot now on the destination.
        newest: String,
        /// Snapshots the destination holds now.
        committed: usize,
    },
    /// The dataset could not be brought up to date.
    Failed(ReplError),
}

/// Converts a store snapshot into its wire form.
pub fn to_info(s: &zq_store::Snapshot) -> zq_proto::SnapshotInfo {
    zq_proto::SnapshotInfo {
        name: s.name.clone(),
        guid: s.guid,
        createtxg: s.createtxg,
    }
}
