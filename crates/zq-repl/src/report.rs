//! What a job did to each dataset, and the wire form of a snapshot.

use zq_store::DatasetName;

use crate::error::ReplError;

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
