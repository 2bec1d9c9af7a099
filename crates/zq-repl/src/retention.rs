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

/// What the sender knows of a target after its last prune: how many `zq_` snapshots it
/// held then, and the GUID of the base (the receiver's last commit) at the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteCount {
    /// `zq_` snapshots left on the target by the last prune.
    pub remaining: u32,
    /// The base when it was pruned.
    pub base_guid: u64,
}

/// Whether a prune of the receiver's copy could destroy anything: an upper bound of its
/// `zq_` snapshots — what the last prune left plus the `zq_` snapshots committed since
/// (those after the old base, up to the current one, in the source's `snapshots`) — exceeds
/// `keep_last`. Unknown history (no earlier prune, or either base no longer on the source)
/// says yes. Saves a round trip and a `zfs list` per dataset per pass when retention keeps
/// more than the daemon makes between passes.
pub fn remote_may_exceed(
    last: Option<RemoteCount>,
    snapshots: &[SnapshotInfo],
    prefix: &str,
    keep_last: usize,
    base_guid: u64,
) -> bool {
    let Some(last) = last else {
        return true;
    };
    let at = |guid| snapshots.iter().position(|s| s.guid == guid);
    let (Some(then), Some(now)) = (at(last.base_guid), at(base_guid)) else {
        return true;
    };
    let since = snapshots
        .get(then + 1..=now)
        .unwrap_or_default()
        .iter()
        .filter(|s| s.name.starts_with(prefix))
        .count();
    usize::try_from(last.remaining)
        .unwrap_or(usize::MAX)
        .saturating_add(since)
        > keep_last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::s;
    use proptest::prelude::*;

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

    #[test]
    fn a_remote_prune_is_skipped_only_when_it_cannot_destroy_anything() {
        let snaps = [s("zq_1", 1), s("daily", 2), s("zq_2", 3), s("zq_3", 4)];
        let last = |remaining, base_guid| {
            Some(RemoteCount {
                remaining,
                base_guid,
            })
        };
        // Never pruned: ask.
        assert!(remote_may_exceed(None, &snaps, ZQ_PREFIX, 100, 4));
        // 2 left at zq_1, then zq_2 and zq_3 committed (daily is not ours): at most 4.
        assert!(!remote_may_exceed(last(2, 1), &snaps, ZQ_PREFIX, 4, 4));
        assert!(remote_may_exceed(last(2, 1), &snaps, ZQ_PREFIX, 3, 4));
        // Nothing committed since.
        assert!(!remote_may_exceed(last(3, 4), &snaps, ZQ_PREFIX, 3, 4));
        // The old base is gone from the source: unknown, ask.
        assert!(remote_may_exceed(last(0, 99), &snaps, ZQ_PREFIX, 100, 4));
        // A base older than the last one (the receiver was rolled back): count nothing new.
        assert!(!remote_may_exceed(last(1, 4), &snaps, ZQ_PREFIX, 1, 1));
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
