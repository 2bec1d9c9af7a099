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
pub mod props;
pub mod protect;
pub mod prune;
pub mod receiver;
pub mod report;
pub mod retention;
pub mod retry;
pub mod sender;
pub mod sendflags;
pub mod status;
pub mod stripe;

#[cfg(test)]
mod testutil;

pub use connector::{ConnectConfig, ConnectError, Connector};
pub use daemon::DaemonOptions;
pub use error::ReplError;
pub use lanes::{Lanes, Slot};
pub use plan::{plan, Plan, PlanError, PlanOptions, Step};
pub use receiver::{Policy, Receiver};
pub use report::{to_info, DatasetOutcome, DatasetReport};
pub use sender::{Job, Listing, Sender, SenderConfig};
