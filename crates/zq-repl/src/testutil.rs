//! Helpers shared by the unit tests.

use zq_proto::SnapshotInfo;

/// A snapshot whose createtxg follows its GUID, so that GUID order is creation order.
pub fn s(name: &str, guid: u64) -> SnapshotInfo {
    SnapshotInfo {
        name: name.into(),
        guid,
        createtxg: guid,
    }
}
