//! Retention of the snapshots zq creates: which ones may go. A pure function, used for the
//! source by the sender and for the destination by the receiver.
//!
//! Only snapshots whose name starts with the prefix (`zq_`) are ever candidates; the
//! newest `keep_last` of them stay; the common base (the snapshot the receiver last
//! committed, by GUID) and everything newer than it stay, so pruning can never break the
//! incremental chain or remove a snapshot that is not replicated yet.

use zq_proto::SnapshotInfo;

/// Prefix of the snapshots zq creates (`zq_<UTC time>`).
pub const ZQ_PREFIX: &str = "zq_";

/// The snapshots of one dataset (oldest first) that retention would destroy.
pub fn prunable<'a>(
    snapshots: &'a [SnapshotInfo],
    prefix: &str,
    keep_last: usize,
    base_guid: u64,
) -> Vec<&'a SnapshotInfo> {
    // Nothing at or after the base may go; without the base, nothing goes at all.
    let Some(base) = snapshots.iter().position(|s| s.guid == base_guid) else {
        return Vec::new();
    };
    let ours: Vec<usize> = (0..snapshots.len())
        .filter(|&i| snapshots[i].name.starts_with(prefix))
        .collect();
    let keep_from = ours.len().saturating_sub(keep_last);
    ours[..keep_from]
        .iter()
        .filter(|&&i| i < base)
        .map(|&i| &snapshots[i])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(name: &str, guid: u64) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            guid,
            createtxg: guid,
        }
    }

    fn names<'a>(v: &[&'a SnapshotInfo]) -> Vec<&'a str> {
        v.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn keeps_newest_and_foreign_snapshots() {
        let snaps = [
            s("zq_1", 1),
            s("daily", 2),
            s("zq_2", 3),
            s("zq_3", 4),
            s("zq_4", 5),
        ];
        assert_eq!(names(&prunable(&snaps, ZQ_PREFIX, 2, 5)), ["zq_1", "zq_2"]);
        assert!(prunable(&snaps, ZQ_PREFIX, 10, 5).is_empty());
    }

    #[test]
    fn never_the_base_or_newer() {
        let snaps = [s("zq_1", 1), s("zq_2", 2), s("zq_3", 3), s("zq_4", 4)];
        // The base is zq_2: zq_2..zq_4 stay even with keep_last 0.
        assert_eq!(names(&prunable(&snaps, ZQ_PREFIX, 0, 2)), ["zq_1"]);
        // Unknown base: nothing goes.
        assert!(prunable(&snaps, ZQ_PREFIX, 0, 99).is_empty());
    }

    proptest! {
        #[test]
        fn invariants(
            kinds in proptest::collection::vec(any::<bool>(), 0..30),
            keep in 0usize..10,
            base_pick in any::<proptest::sample::Index>(),
        ) {
            let snaps: Vec<_> = kinds
                .iter()
                .enumerate()
                .map(|(i, zq)| s(&format!("{}{i}", if *zq { "zq_" } else { "x" }), i as u64 + 1))
                .collect();
            let base = if snaps.is_empty() { 0 } else { snaps[base_pick.index(snaps.len())].guid };
            let gone = prunable(&snaps, ZQ_PREFIX, keep, base);
            let ours = snaps.iter().filter(|s| s.name.starts_with(ZQ_PREFIX)).count();
            for g in &gone {
                prop_assert!(g.name.starts_with(ZQ_PREFIX));
                prop_assert!(g.guid < base, "base or newer pruned");
            }
            prop_assert!(ours - gone.len() >= keep.min(ours));
        }
    }
}
