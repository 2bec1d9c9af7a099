//! The snapshot store: every `zfs` invocation zq makes, with argv only (never a shell),
//! names validated by ZFS's rules before they reach a command line, and `zfs` output parsed
//! by pure functions tested on captured OpenZFS and zfs-fuse output.

#![forbid(unsafe_code)]
// Data from a peer or from zfs must not panic the process (tests may unwrap).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod command;
pub mod events;
pub mod name;
pub mod parse;
pub mod stream;
pub mod timing;
pub mod token;
pub mod zfs;

pub use command::{CommandError, Reader, Writer};
pub use events::{SnapshotEvent, SnapshotEvents};
pub use name::{DatasetName, NameError, SendBase, SnapshotName};
pub use parse::{Kind, Version};
pub use stream::{first_snapshot, parse_begin, BeginError, FirstSnapshot, StreamBegin};
pub use zfs::{
    Capabilities, DatasetState, PoolFeatures, ReceiveOptions, SendFlags, Snapshot, StoreError, Zfs,
};
