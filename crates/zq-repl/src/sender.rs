//! The sender engine: one connection, a handshake, one batched listing per job, then one
//! QUIC stream per step carrying `zfs send` output to the receiver.
//!
//! - [`session`]: the connection and its handshake ([`Sender`], [`SenderConfig`]), and the
//!   requests that are not steps (listings, retention);
//! - [`job`]: what a job replicates ([`Job`]) and how: both sides listed once, a plan per
//!   dataset, parents first;
//! - [`step`]: one step on its own stream, and its verdict.

pub mod job;
pub mod session;
pub mod step;

pub use job::{Job, CHAIN_UP_TO};
pub use session::{Kept, Listing, Sender, SenderConfig, DEFAULT_SIZE_ESTIMATES, STALL_TIMEOUT};
pub use step::{compress_chunk, link_rate, BULK_BYTES};
