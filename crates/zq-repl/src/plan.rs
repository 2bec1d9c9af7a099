//! Planning: a pure function from the source's and destination's snapshot lists to the
//! steps that bring the destination up to date, or the reason it must not be touched.
//!
//! Snapshots are identified by GUID only. The common base is the newest destination
//! snapshot whose GUID exists on the source. Destruction on the destination is planned only
//! with the user's `--force`, and the receiver re-checks its own state before acting on it.

use std::collections::HashMap;

use zq_proto::{ForceAction, SnapRef, SnapshotInfo};

/// How to plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlanOptions {
    /// Send only the newest snapshot (`zfs send -i`) instead of every intermediate (`-I`).
    pub newest_only: bool,
    /// Roll back or replace a diverged destination (`--force`).
    pub force: bool,
    /// Send up to this many new snapshots as one `-i` step each instead of one `-I` step.
    /// Where `zfs send -I` costs time per snapshot of the dataset (zfs-fuse: ~4 ms each,
    /// 180 ms with 45 snapshots, against ~5 ms for `-i`), a short backlog goes faster as a
    /// chain; see [`zq_store::Capabilities::cheap_intermediates`]. 0 never chains.
    pub chain_up_to: usize,
}

/// One `zfs send` stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A full stream of `to`.
    Full {
        /// The snapshot.
        to: SnapshotInfo,
    },
    /// An incremental stream from `from` to `to`.
    Incremental {
        /// The base, present on both sides (as a snapshot, or on the source as the
        /// bookmark `bookmark` only). Its name is the destination's for this GUID.
        from: SnapshotInfo,
        /// The newest snapshot to send.
        to: SnapshotInfo,
        /// Carry every snapshot in between (`-I`).
        intermediates: bool,
        /// The source bookmark (the part after `#`) to send from, where the source no
        /// longer has `from` as a snapshot (`zfs send -i #bookmark`; never with
        /// `intermediates`: zfs sends no `-I` stream from a bookmark).
        bookmark: Option<String>,
    },
}

impl Step {
    /// The snapshot the step ends with.
    pub fn to(&self) -> &SnapshotInfo {
        match self {
            Step::Full { to } | Step::Incremental { to, .. } => to,
        }
    }
}

/// What to do for one dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Destruction authorised by `--force`, carried by the first step.
    pub force: ForceAction,
    /// Steps in order; empty when the destination is up to date.
    pub steps: Vec<Step>,
    /// Something the user should know even though the plan is fine.
    pub note: Option<String>,
}

impl Plan {
    /// Every source snapshot the destination must hold once the plan ran: from the first
    /// step's start to the newest, or only the steps' ends when intermediates are skipped.
    pub fn expected<'a>(&self, source: &'a [SnapshotInfo]) -> Vec<&'a SnapshotInfo> {
        let Some(first) = self.steps.first() else {
            return Vec::new();
        };
        let start = match first {
            Step::Full { to } => to,
            Step::Incremental { from, .. } => from,
        };
        // A step carries every snapshot between its ends with -I, or when there is none.
        let all_between = self.steps.iter().all(|s| match s {
            Step::Full { .. } => true,
            Step::Incremental {
                intermediates,
                from,
                to,
                ..
            } => {
                *intermediates
                    || !source
                        .iter()
                        .any(|s| s.createtxg > from.createtxg && s.createtxg < to.createtxg)
            }
        });
        // A bookmark base is not among the source's snapshots: what follows it is.
        let from = source
            .iter()
            .position(|s| s.guid == start.guid)
            .or_else(|| source.iter().position(|s| s.createtxg > start.createtxg))
            .unwrap_or(source.len());
        source[from..]
            .iter()
            .filter(|s| {
                all_between
                    || s.guid == start.guid
                    || self.steps.iter().any(|st| st.to().guid == s.guid)
            })
            .collect()
    }
}

/// Why a dataset must not be replicated as things stand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The destination has snapshots newer than the common base.
    #[error(
        "destination has diverged: it has {newer} snapshot(s) newer than the common base @{base} \
             (destination newest @{dest_newest}, source newest @{source_newest}); \
             use --force to roll the destination back to @{base}"
    )]
    Diverged {
        /// The common base.
        base: String,
        /// How many destination snapshots are newer.
        newer: usize,
        /// Newest on the destination.
        dest_newest: String,
        /// Newest on the source.
        source_newest: String,
    },
    /// The destination exists but shares no snapshot with the source.
    #[error("destination exists but has no snapshot in common with the source \
             (destination newest {}, source newest @{source_newest}); \
             use --force to replace the destination", dest_newest.as_deref().map(|s| format!("@{s}")).unwrap_or_else(|| "none".into()))]
    NoCommonSnapshot {
        /// Newest on the destination, if it has any.
        dest_newest: Option<String>,
        /// Newest on the source.
        source_newest: String,
    },
}

/// Plans replication of one dataset. Both lists are ordered oldest first; `dest` is `None`
/// when the destination dataset does not exist.
pub fn plan(
    source: &[SnapshotInfo],
    dest: Option<&[SnapshotInfo]>,
    opts: PlanOptions,
) -> Result<Plan, PlanError> {
    plan_with_bookmarks(source, &[], dest, opts)
}

/// [`plan`], where the source's `bookmarks` (OpenZFS) count as common bases too: the
/// newest destination snapshot whose GUID the source has as a snapshot or, after the
/// snapshot was destroyed there, as a bookmark. From a bookmark the first step is `-i
/// #bookmark` to the next source snapshot (zfs sends no `-I` from a bookmark); the rest
/// as from a snapshot.
pub fn plan_with_bookmarks(
    source: &[SnapshotInfo],
    bookmarks: &[SnapshotInfo],
    dest: Option<&[SnapshotInfo]>,
    opts: PlanOptions,
) -> Result<Plan, PlanError> {
    let up_to_date = |note: Option<String>| Plan {
        force: ForceAction::None,
        steps: Vec::new(),
        note,
    };
    let (Some(oldest), Some(newest)) = (source.first(), source.last()) else {
        return Ok(up_to_date(Some(
            "source has no snapshots: nothing to send".into(),
        )));
    };
    let initial = |force| {
        let mut steps = vec![Step::Full { to: oldest.clone() }];
        steps.extend(incrementals(source, 0, opts));
        Plan {
            force,
            steps,
            note: None,
        }
    };
    let Some(dest) = dest else {
        return Ok(initial(ForceAction::None));
    };
    // Each source GUID's position (the first, were a GUID listed twice).
    let source_pos: HashMap<u64, usize> = source
        .iter()
        .enumerate()
        .rev()
        .map(|(i, s)| (s.guid, i))
        .collect();
    // The newest destination snapshot the source has, and the source's copy of it (same
    // GUID; the name may differ).
    let marks: HashMap<u64, &SnapshotInfo> = bookmarks.iter().map(|b| (b.guid, b)).collect();
    let common = dest.iter().enumerate().rev().find_map(|(i, s)| {
        let base = match source_pos.get(&s.guid) {
            Some(&j) => Base::Snapshot(j),
            None => Base::Bookmark(marks.get(&s.guid)?),
        };
        Some((i, base))
    });
    let Some((base_pos, src_base)) = common else {
        if opts.force {
            return Ok(initial(ForceAction::Replace));
        }
        return Err(PlanError::NoCommonSnapshot {
            dest_newest: dest.last().map(|s| s.name.clone()),
            source_newest: newest.name.clone(),
        });
    };
    let base = &dest[base_pos];
    let newer = dest.len() - base_pos - 1;
    let mut force = ForceAction::None;
    if newer > 0 {
        if !opts.force {
            return Err(PlanError::Diverged {
                base: base.name.clone(),
                newer,
                dest_newest: dest[dest.len() - 1].name.clone(),
                source_newest: newest.name.clone(),
            });
        }
        force = ForceAction::RollbackTo(SnapRef {
            name: base.name.clone(),
            guid: base.guid,
        });
    }
    // The first source snapshot newer than the base, and the step to it from a bookmark.
    let (next, via) = match src_base {
        Base::Snapshot(j) => (j + 1, None),
        Base::Bookmark(b) => {
            let next = source
                .iter()
                .position(|s| s.createtxg > b.createtxg)
                .unwrap_or(source.len());
            (next, Some(b))
        }
    };
    if next >= source.len() {
        let note = (newer > 0).then(|| {
            format!(
                "destination has {newer} snapshot(s) newer than @{}; nothing new to send, \
                 so nothing was rolled back",
                base.name
            )
        });
        return Ok(up_to_date(note));
    }
    let steps = match via {
        None => incrementals(source, next - 1, opts),
        Some(mark) => {
            let to = if opts.newest_only {
                source.len() - 1
            } else {
                next
            };
            let mut steps = vec![Step::Incremental {
                from: SnapshotInfo {
                    name: base.name.clone(),
                    guid: base.guid,
                    createtxg: mark.createtxg,
                },
                to: source[to].clone(),
                intermediates: false,
                bookmark: Some(mark.name.clone()),
            }];
            steps.extend(incrementals(source, to, opts));
            steps
        }
    };
    Ok(Plan {
        force,
        steps,
        note: None,
    })
}

/// Where the common base is on the source.
enum Base<'a> {
    /// At this position of the source's snapshots.
    Snapshot(usize),
    /// Only a bookmark is left of it.
    Bookmark(&'a SnapshotInfo),
}

/// The incremental steps from `source[from]` to the newest snapshot: one `-i` step when
/// there is one new snapshot (or only the newest is wanted), a chain of `-i` steps for a
/// backlog of up to `chain_up_to`, else one `-I` step.
fn incrementals(source: &[SnapshotInfo], from: usize, opts: PlanOptions) -> Vec<Step> {
    let Some(newest) = source.last() else {
        return Vec::new();
    };
    let new = source.len().saturating_sub(from + 1);
    if new == 0 {
        return Vec::new();
    }
    if new == 1 || opts.newest_only || new > opts.chain_up_to {
        return vec![Step::Incremental {
            from: source[from].clone(),
            to: newest.clone(),
            intermediates: new > 1 && !opts.newest_only,
            bookmark: None,
        }];
    }
    source[from..]
        .windows(2)
        .map(|pair| Step::Incremental {
            from: pair[0].clone(),
            to: pair[1].clone(),
            intermediates: false,
            bookmark: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::s;
    use proptest::prelude::*;

    fn opts() -> PlanOptions {
        PlanOptions::default()
    }

    /// A destination snapshot the source still has is the base, even where a bookmark of
    /// a newer one exists too: the newest common GUID wins, snapshot or bookmark.
    #[test]
    fn the_newest_common_guid_is_the_base_be_it_a_snapshot_or_a_bookmark() {
        let src = [s("a", 1), s("c", 3)];
        let marks = [s("a-mark", 1), s("b-mark", 2)];
        let p = plan_with_bookmarks(&src, &marks, Some(&[s("a", 1)]), opts()).unwrap();
        assert!(matches!(
            &p.steps[..],
            [Step::Incremental { bookmark: None, .. }]
        ));
        // @b was destroyed on the source after it was replicated: not divergence.
        let p = plan_with_bookmarks(&src, &marks, Some(&[s("a", 1), s("b", 2)]), opts()).unwrap();
        assert_eq!(
            p.steps,
            vec![Step::Incremental {
                from: s("b", 2),
                to: s("c", 3),
                intermediates: false,
                bookmark: Some("b-mark".into()),
            }]
        );
        // Without the bookmark it would be.
        assert!(matches!(
            plan(&src, Some(&[s("a", 1), s("b", 2)]), opts()),
            Err(PlanError::Diverged { .. })
        ));
        // Nothing newer than the bookmark: up to date.
        let p = plan_with_bookmarks(&[s("a", 1)], &marks, Some(&[s("a", 1), s("b", 2)]), opts());
        assert!(p.unwrap().steps.is_empty());
    }

    #[test]
    fn no_destination_is_full_then_incremental_with_intermediates() {
        let src = [s("a", 1), s("b", 2), s("c", 3)];
        let p = plan(&src, None, opts()).unwrap();
        assert_eq!(
            p.steps,
            vec![
                Step::Full { to: s("a", 1) },
                Step::Incremental {
                    from: s("a", 1),
                    to: s("c", 3),
                    intermediates: true,
                    bookmark: None,
                }
            ]
        );
        assert_eq!(p.force, ForceAction::None);
    }

    #[test]
    fn single_snapshot_is_one_full() {
        let p = plan(&[s("a", 1)], None, opts()).unwrap();
        assert_eq!(p.steps, vec![Step::Full { to: s("a", 1) }]);
    }

    #[test]
    fn common_base_gives_one_incremental() {
        let src = [s("a", 1), s("b", 2), s("c", 3)];
        let p = plan(&src, Some(&[s("a", 1)]), opts()).unwrap();
        assert_eq!(
            p.steps,
            vec![Step::Incremental {
                from: s("a", 1),
                to: s("c", 3),
                intermediates: true,
                bookmark: None,
            }]
        );
        let p = plan(
            &src,
            Some(&[s("a", 1)]),
            PlanOptions {
                newest_only: true,
                ..opts()
            },
        )
        .unwrap();
        assert!(matches!(
            p.steps[..],
            [Step::Incremental {
                intermediates: false,
                ..
            }]
        ));
    }

    #[test]
    fn nothing_new_is_empty() {
        let src = [s("a", 1), s("b", 2)];
        let p = plan(&src, Some(&src), opts()).unwrap();
        assert!(p.steps.is_empty());
        assert!(p.note.is_none());
    }

    #[test]
    fn identity_is_guid_not_name() {
        // Same names, different GUIDs: nothing in common.
        let src = [s("a", 1), s("b", 2)];
        let e = plan(&src, Some(&[s("a", 99)]), opts()).unwrap_err();
        assert!(matches!(e, PlanError::NoCommonSnapshot { .. }));
        // Renamed on the destination but same GUID: common.
        let p = plan(&src, Some(&[s("renamed", 1)]), opts()).unwrap();
        assert_eq!(p.steps.len(), 1);
    }

    #[test]
    fn diverged_is_refused_naming_both_newest() {
        let src = [s("a", 1), s("b", 2)];
        let dst = [s("a", 1), s("local", 50)];
        let e = plan(&src, Some(&dst), opts()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("@local") && msg.contains("@b") && msg.contains("--force"),
            "{msg}"
        );
    }

    #[test]
    fn force_rolls_back_to_base() {
        let src = [s("a", 1), s("b", 2)];
        let dst = [s("a", 1), s("local", 50)];
        let p = plan(
            &src,
            Some(&dst),
            PlanOptions {
                force: true,
                ..opts()
            },
        )
        .unwrap();
        assert_eq!(
            p.force,
            ForceAction::RollbackTo(SnapRef {
                name: "a".into(),
                guid: 1
            })
        );
        assert_eq!(p.steps.len(), 1);
    }

    #[test]
    fn force_replaces_when_nothing_in_common() {
        let src = [s("a", 1)];
        let p = plan(
            &src,
            Some(&[s("x", 9)]),
            PlanOptions {
                force: true,
                ..opts()
            },
        )
        .unwrap();
        assert_eq!(p.force, ForceAction::Replace);
        assert_eq!(p.steps, vec![Step::Full { to: s("a", 1) }]);
        // An existing destination without snapshots is also "nothing in common".
        let e = plan(&src, Some(&[]), opts()).unwrap_err();
        assert!(e.to_string().contains("destination newest none"), "{e}");
    }

    #[test]
    fn empty_source_sends_nothing() {
        let p = plan(&[], None, opts()).unwrap();
        assert!(p.steps.is_empty());
        assert!(p.note.unwrap().contains("no snapshots"));
    }

    #[test]
    fn newest_common_base_is_used() {
        // The destination also holds an older common snapshot; the newest common one wins.
        let src = [s("a", 1), s("b", 2), s("c", 3), s("d", 4)];
        let p = plan(&src, Some(&[s("a", 1), s("c", 3)]), opts()).unwrap();
        assert_eq!(
            p.steps,
            vec![Step::Incremental {
                from: s("c", 3),
                to: s("d", 4),
                intermediates: false,
                bookmark: None,
            }]
        );
    }

    #[test]
    fn one_new_snapshot_is_sent_without_intermediates() {
        // `-I` for a single snapshot is a compound stream: slower, and it names no GUID.
        let src = [s("a", 1), s("b", 2)];
        let p = plan(&src, Some(&[s("a", 1)]), opts()).unwrap();
        assert_eq!(
            p.steps,
            vec![Step::Incremental {
                from: s("a", 1),
                to: s("b", 2),
                intermediates: false,
                bookmark: None,
            }]
        );
    }

    #[test]
    fn short_backlog_is_chained_when_asked() {
        let src = [s("a", 1), s("b", 2), s("c", 3), s("d", 4)];
        let chain = |n| PlanOptions {
            chain_up_to: n,
            ..opts()
        };
        let inc = |f: (&str, u64), t: (&str, u64)| Step::Incremental {
            from: s(f.0, f.1),
            to: s(t.0, t.1),
            intermediates: false,
            bookmark: None,
        };
        let p = plan(&src, Some(&[s("a", 1)]), chain(3)).unwrap();
        assert_eq!(
            p.steps,
            vec![
                inc(("a", 1), ("b", 2)),
                inc(("b", 2), ("c", 3)),
                inc(("c", 3), ("d", 4))
            ]
        );
        // A longer backlog is one -I step.
        let p = plan(&src, Some(&[s("a", 1)]), chain(2)).unwrap();
        assert!(matches!(
            p.steps[..],
            [Step::Incremental {
                intermediates: true,
                ..
            }]
        ));
        // Initial replication chains after the full stream.
        let p = plan(&src, None, chain(3)).unwrap();
        assert_eq!(p.steps.len(), 4);
        assert_eq!(p.steps[0], Step::Full { to: s("a", 1) });
        // --newest-only still skips the intermediates.
        let p = plan(
            &src,
            Some(&[s("a", 1)]),
            PlanOptions {
                newest_only: true,
                ..chain(3)
            },
        )
        .unwrap();
        assert_eq!(p.steps, vec![inc(("a", 1), ("d", 4))]);
        // What the destination must hold afterwards is every snapshot either way.
        let guids = |p: &Plan| p.expected(&src).iter().map(|s| s.guid).collect::<Vec<_>>();
        assert_eq!(
            guids(&plan(&src, Some(&[s("a", 1)]), chain(3)).unwrap()),
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn expected_snapshots() {
        let src = [s("a", 1), s("b", 2), s("c", 3), s("d", 4)];
        let guids = |p: &Plan| p.expected(&src).iter().map(|s| s.guid).collect::<Vec<_>>();
        assert_eq!(guids(&plan(&src, None, opts()).unwrap()), [1, 2, 3, 4]);
        assert_eq!(
            guids(&plan(&src, Some(&[s("b", 2)]), opts()).unwrap()),
            [2, 3, 4]
        );
        let newest_only = PlanOptions {
            newest_only: true,
            ..opts()
        };
        assert_eq!(guids(&plan(&src, None, newest_only).unwrap()), [1, 4]);
        assert_eq!(
            guids(&plan(&src, Some(&[s("b", 2)]), newest_only).unwrap()),
            [2, 4]
        );
        assert!(guids(&plan(&src, Some(&src), opts()).unwrap()).is_empty());
    }

    proptest! {
        /// When every snapshot the destination has is gone from the source but bookmarks
        /// of them remain, the plan starts with one `-i #bookmark` step from the
        /// destination's newest and still brings every newer source snapshot.
        #[test]
        fn bookmarks_of_pruned_snapshots_keep_it_incremental(
            n in 2usize..20, k in 1usize..19, chain in 0usize..8, newest_only in any::<bool>(),
        ) {
            let k = k.min(n - 1);
            let all: Vec<_> = (1..=n as u64).map(|g| s(&format!("s{g}"), g)).collect();
            let marks: Vec<_> = all[..k].iter().map(|x| s(&format!("m{}", x.guid), x.guid)).collect();
            let o = PlanOptions { chain_up_to: chain, newest_only, ..opts() };
            let p = plan_with_bookmarks(&all[k..], &marks, Some(&all[..k]), o).unwrap();
            prop_assert_eq!(&p.force, &ForceAction::None);
            let Some(Step::Incremental { from, bookmark, intermediates, .. }) = p.steps.first() else {
                return Err(TestCaseError::fail("no incremental first step"));
            };
            prop_assert_eq!(from.guid, k as u64);
            prop_assert_eq!(&from.name, &format!("s{k}"));
            prop_assert_eq!(bookmark.clone(), Some(format!("m{k}")));
            prop_assert!(!intermediates);
            let later_from_marks = p.steps[1..]
                .iter()
                .any(|st| matches!(st, Step::Incremental { bookmark: Some(_), .. }));
            prop_assert!(!later_from_marks);
            prop_assert_eq!(p.steps.last().unwrap().to(), all.last().unwrap());
            let expected: Vec<u64> = p.expected(&all[k..]).iter().map(|x| x.guid).collect();
            let want: Vec<u64> = match newest_only {
                false => (k as u64 + 1..=n as u64).collect(),
                true => vec![n as u64],
            };
            prop_assert_eq!(expected, want);
        }

        /// For any destination that is a prefix of the source, the plan ends at the source's
        /// newest snapshot and never asks for destruction.
        #[test]
        fn prefix_destination_catches_up(n in 1usize..20, k in 0usize..20, chain in 0usize..8) {
            let src: Vec<_> = (1..=n as u64).map(|g| s(&format!("s{g}"), g)).collect();
            let k = k.min(n);
            let dst = &src[..k];
            let o = PlanOptions { chain_up_to: chain, ..opts() };
            let p = plan(&src, (k > 0).then_some(dst), o).unwrap();
            prop_assert_eq!(p.force, ForceAction::None);
            if k == n {
                prop_assert!(p.steps.is_empty());
            } else {
                prop_assert_eq!(p.steps.last().unwrap().to(), src.last().unwrap());
            }
            // Each step starts where the previous one ended, and together they bring
            // every source snapshot the destination lacks.
            let mut at = dst.last().map(|d| d.guid);
            let mut got: Vec<u64> = dst.iter().map(|d| d.guid).collect();
            for step in &p.steps {
                match step {
                    Step::Full { to } => prop_assert!(at.is_none() && got.is_empty() && to.guid == 1),
                    Step::Incremental { from, to, intermediates, .. } => {
                        prop_assert_eq!(Some(from.guid), at);
                        if *intermediates {
                            got.extend(from.guid + 1..to.guid);
                        }
                    }
                }
                got.push(step.to().guid);
                at = Some(step.to().guid);
            }
            prop_assert_eq!(got, (1..=n as u64).collect::<Vec<_>>());
        }

        /// Without --force, a plan never carries a destructive action.
        #[test]
        fn no_destruction_without_force(
            src in proptest::collection::vec(0u64..8, 0..8),
            dst in proptest::collection::vec(0u64..8, 0..8),
            exists in any::<bool>(),
        ) {
            let src: Vec<_> = src.iter().map(|&g| s("x", g)).collect();
            let dst: Vec<_> = dst.iter().map(|&g| s("y", g)).collect();
            if let Ok(p) = plan(&src, exists.then_some(&dst[..]), opts()) {
                prop_assert_eq!(p.force, ForceAction::None);
            }
        }
    }
}
