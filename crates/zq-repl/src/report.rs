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
        /// Where the resumed step continued from (`None` if none was resumed).
        resumed_from: Option<ResumedFrom>,
        /// The newest snapshot now on the destination.
        newest: String,
        /// Snapshots the destination holds now.
        committed: usize,
    },
    /// The dataset could not be brought up to date.
    Failed(ReplError),
}

/// What an interrupted step continued from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumedFrom {
    /// zfs's partial receive, with `zfs send -t` (OpenZFS).
    ZfsToken,
    /// The receiver's spool.
    Spool,
}

impl std::fmt::Display for ResumedFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResumedFrom::ZfsToken => "zfs send -t",
            ResumedFrom::Spool => "the receiver's spool",
        })
    }
}

/// Converts a store snapshot into its wire form.
pub fn to_info(s: &zq_store::Snapshot) -> zq_proto::SnapshotInfo {
    zq_proto::SnapshotInfo {
        name: s.name.clone(),
        guid: s.guid,
        createtxg: s.createtxg,
    }
}
