//! What the daemon knows of each source dataset between its steps, and what it decides
//! from that alone: the source snapshots (from the last listing, plus those it learned since),
//! the snapshots its own snapshot loop created that are not sent yet, and the snapshot the
//! receiver last committed (the cursor).
//!
//! In steady state that is enough to send the next incremental without listing either side:
//! the cursor is the newest source snapshot known, and the new snapshots are the ones zq
//! made. The receiver still checks the base, so a stale cursor costs one refused step, after
//! which the dataset is listed again.

use std::time::SystemTime;

use zq_proto::SnapshotInfo;
use zq_store::DatasetName;

use crate::status::DatasetStatus;

/// One source dataset the daemon replicates.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// Where it goes.
    pub target: DatasetName,
    /// Source snapshots with known GUIDs, oldest first.
    pub snapshots: Vec<SnapshotInfo>,
    /// Its bookmarks as last listed (OpenZFS): bases of incremental steps whose snapshot
    /// is gone.
    pub bookmarks: Vec<SnapshotInfo>,
    /// Its snapshots with user holds, as the last listing that asked said (a daemon's
    /// first listing asks; later ones do not).
    pub held: Option<Vec<String>>,
    /// Snapshots zq created after `snapshots`, oldest first; GUIDs not known yet.
    pub pending: Vec<String>,
    /// The snapshot the receiver last committed, if known.
    pub cursor: Option<SnapshotInfo>,
    /// The last failure, until a step succeeds.
    pub error: Option<String>,
    /// When the cursor's snapshot was created (from a `zq_` name) or first seen.
    pub cursor_time: Option<SystemTime>,
    /// Interrupted steps resumed (from the receiver's spool or zfs's partial receive),
    /// and the stream bytes they did not send again.
    pub resumed: (u64, u64),
    /// Where the last of those continued from.
    pub resumed_from: Option<crate::report::ResumedFrom>,
    /// Steps committed, failed attempts, and stream bytes of the committed steps.
    pub counts: Counts,
}

/// What happened to a dataset so far in this daemon (counters for metrics and status).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Steps the receiver committed.
    pub steps: u64,
    /// Attempts that failed.
    pub failures: u64,
    /// Stream bytes of the committed steps.
    pub bytes: u64,
}

/// What to do with a dataset now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing new.
    UpToDate,
    /// Send `pending` on top of the cursor: no listing needed.
    SendNew {
        /// The cursor.
        from: SnapshotInfo,
        /// The snapshots to send, oldest first.
        new: Vec<String>,
    },
    /// Plan from the known source snapshots and the cursor, or from a destination listing
    /// when there is no cursor.
    Plan,
}

impl Tracked {
    /// A dataset seen for the first time in a listing.
    pub fn new(target: DatasetName, snapshots: Vec<SnapshotInfo>) -> Self {
        Tracked {
            target,
            snapshots,
            bookmarks: Vec::new(),
            held: None,
            pending: Vec::new(),
            cursor: None,
            error: None,
            cursor_time: None,
            resumed: (0, 0),
            resumed_from: None,
            counts: Counts::default(),
        }
    }

    /// Replaces what is known of the source with a fresh listing.
    pub fn listed(&mut self, snapshots: Vec<SnapshotInfo>) {
        self.pending
            .retain(|p| !snapshots.iter().any(|s| &s.name == p));
        self.snapshots = snapshots;
    }

    /// The snapshot loop created `name` (recursively, so on every tracked dataset).
    pub fn created(&mut self, name: &str) {
        if !self.snapshots.iter().any(|s| s.name == name) && !self.pending.iter().any(|p| p == name)
        {
            self.pending.push(name.to_string());
        }
    }

    /// What to do now; `by_name` says whether the receiver can take snapshots by name
    /// (protocol version 2).
    pub fn next(&self, by_name: bool) -> Next {
        let newest = self.snapshots.last();
        match (&self.cursor, newest) {
            (Some(c), Some(n)) if c.guid == n.guid => {
                if self.pending.is_empty() {
                    Next::UpToDate
                } else if by_name {
                    Next::SendNew {
                        from: c.clone(),
                        new: self.pending.clone(),
                    }
                } else {
                    Next::Plan
                }
            }
            _ => Next::Plan,
        }
    }

    /// Whether this dataset needs a fresh source listing before its next step: zq made
    /// snapshots that only a listing can make sendable: the dataset had no known snapshot
    /// to plan with (its first), or the receiver cannot take snapshots by name. Otherwise
    /// a plan sends what is known (e.g. after a listing taken while a step ran, or without
    /// a cursor), and the pending snapshots follow by name: listing the whole tree again
    /// (seconds at 100 datasets on zfs-fuse) would only delay every dataset.
    pub fn needs_listing(&self, by_name: bool) -> bool {
        !self.pending.is_empty()
            && self.next(by_name) == Next::Plan
            && (!by_name || self.snapshots.is_empty())
    }

    /// The receiver committed `committed` (its listing or computed list) after a step that
    /// sent `new` by name: learn their GUIDs and move the cursor to the last of them (not
    /// to the newest known snapshot: a listing taken while the step ran may know more).
    pub fn sent_new(&mut self, new: &[String], guid: u64, committed: &[SnapshotInfo]) {
        for (i, name) in new.iter().enumerate() {
            let info = if i + 1 == new.len() {
                Some(SnapshotInfo {
                    name: name.clone(),
                    guid,
                    createtxg: 0,
                })
            } else {
                committed.iter().find(|s| &s.name == name).cloned()
            };
            // Skipped intermediates (--newest-only) stay unknown until the next listing,
            // and a listing taken while the step ran may already hold the snapshot.
            if let Some(info) = info {
                if !self.snapshots.iter().any(|s| s.name == info.name) {
                    self.snapshots.push(info);
                }
            }
        }
        self.pending.retain(|p| !new.contains(p));
        let sent = new.last().map(|name| SnapshotInfo {
            name: name.clone(),
            guid,
            createtxg: 0,
        });
        self.advance(sent);
    }

    /// A planned step brought the dataset up to `to`: the newest snapshot known when it was
    /// planned, which a listing taken while it ran may have passed.
    pub fn caught_up(&mut self, to: Option<SnapshotInfo>) {
        self.advance(to);
    }

    fn advance(&mut self, to: Option<SnapshotInfo>) {
        if let Some(s) = &to {
            if self.cursor.as_ref().map(|c| c.guid) != Some(s.guid) {
                self.cursor_time = Some(created_at(&s.name).unwrap_or_else(SystemTime::now));
            }
        }
        self.cursor = to;
        self.error = None;
    }

    /// A status line for `zq-send status`.
    pub fn status(&self, source: &DatasetName, now: SystemTime) -> DatasetStatus {
        DatasetStatus {
            source: source.to_string(),
            target: self.target.to_string(),
            replicated: self.cursor.as_ref().map(|c| c.name.clone()),
            lag_seconds: self
                .cursor_time
                .and_then(|t| now.duration_since(t).ok())
                .map(|d| d.as_secs_f64()),
            unsent: self.pending.len(),
            error: self.error.clone(),
            resumes: self.resumed.0,
            resumed_bytes: self.resumed.1,
            resumed_from: self.resumed_from.map(|f| f.to_string()),
            steps: self.counts.steps,
            failures: self.counts.failures,
            bytes: self.counts.bytes,
            sending: None,
        }
    }
}

/// The creation time a `zq_<RFC 3339>` snapshot name carries (taken right before
/// `zfs snapshot`), if it is one.
pub fn created_at(name: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(name.strip_prefix(crate::retention::ZQ_PREFIX)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::s;

    fn tracked() -> Tracked {
        Tracked::new(
            DatasetName::parse("b/t").unwrap(),
            vec![s("a", 1), s("b", 2)],
        )
    }

    #[test]
    fn without_a_cursor_it_plans() {
        assert_eq!(tracked().next(true), Next::Plan);
    }

    #[test]
    fn snapshots_made_before_anything_was_known_need_a_listing() {
        // Listed before the snapshot loop's first snapshot: nothing to plan from.
        let mut t = Tracked::new(DatasetName::parse("b/t").unwrap(), Vec::new());
        assert!(!t.needs_listing(true));
        t.created("zq_1");
        assert!(t.needs_listing(true));
        t.listed(vec![s("zq_1", 1)]);
        assert!(!t.needs_listing(true));
        assert_eq!(t.next(true), Next::Plan);
        // In steady state, new snapshots go by name without a listing.
        t.caught_up(t.snapshots.last().cloned());
        t.created("zq_2");
        assert!(!t.needs_listing(true));
        // Unless the receiver cannot take them by name.
        assert!(t.needs_listing(false));
    }

    #[test]
    fn steady_state_sends_new_snapshots_by_name_and_learns_their_guids() {
        let mut t = tracked();
        t.caught_up(t.snapshots.last().cloned());
        assert_eq!(t.next(true), Next::UpToDate);
        t.created("zq_1");
        t.created("zq_1"); // reported twice: still one
        assert_eq!(
            t.next(true),
            Next::SendNew {
                from: s("b", 2),
                new: vec!["zq_1".into()]
            }
        );
        // An old receiver cannot take names: plan instead.
        assert_eq!(t.next(false), Next::Plan);
        t.sent_new(&["zq_1".into()], 3, &[]);
        assert_eq!(t.cursor.as_ref().map(|c| c.guid), Some(3));
        assert_eq!(t.next(true), Next::UpToDate);
        assert!(t.pending.is_empty());
    }

    #[test]
    fn several_new_snapshots_learn_intermediates_from_the_commit() {
        let mut t = tracked();
        t.caught_up(t.snapshots.last().cloned());
        for n in ["zq_1", "zq_2", "zq_3"] {
            t.created(n);
        }
        let committed = [s("b", 2), s("zq_1", 11), s("zq_2", 12), s("zq_3", 13)];
        t.sent_new(&t.pending.clone(), 13, &committed);
        let guids: Vec<u64> = t.snapshots.iter().map(|s| s.guid).collect();
        assert_eq!(guids, [1, 2, 11, 12, 13]);
        assert_eq!(t.next(true), Next::UpToDate);
    }

    #[test]
    fn a_listing_absorbs_pending_snapshots() {
        let mut t = tracked();
        t.caught_up(t.snapshots.last().cloned());
        t.created("zq_1");
        t.listed(vec![s("a", 1), s("b", 2), s("zq_1", 3)]);
        assert!(t.pending.is_empty());
        // The cursor is behind the newest listed snapshot: plan from it.
        assert_eq!(t.next(true), Next::Plan);
    }

    #[test]
    fn a_listing_while_a_step_runs_does_not_move_the_cursor_past_what_was_sent() {
        let mut t = tracked();
        t.caught_up(t.snapshots.last().cloned());
        t.created("zq_1");
        let Next::SendNew { new, .. } = t.next(true) else {
            panic!("expected SendNew");
        };
        // While zq_1 is sent, zq_2 is made and a listing sees both.
        t.created("zq_2");
        t.listed(vec![s("a", 1), s("b", 2), s("zq_1", 3), s("zq_2", 4)]);
        t.sent_new(&new, 3, &[]);
        assert_eq!(t.cursor.as_ref().map(|c| c.guid), Some(3));
        assert_eq!(t.snapshots.len(), 4, "no duplicate of zq_1");
        // zq_2 is still to be sent, from zq_1.
        assert_eq!(t.next(true), Next::Plan);
        // Planning from what is known needs no listing: zq_2 is known, and whatever zq
        // makes meanwhile follows by name.
        t.created("zq_3");
        assert!(!t.needs_listing(true));
        // The same for a planned step: it ends where it was planned to.
        let mut t = tracked();
        let planned_to = t.snapshots.last().cloned();
        t.listed(vec![s("a", 1), s("b", 2), s("c", 3)]);
        t.caught_up(planned_to);
        assert_eq!(t.cursor.as_ref().map(|c| c.guid), Some(2));
        assert_eq!(t.next(true), Next::Plan);
    }

    #[test]
    fn lag_comes_from_the_zq_name() {
        let mut t = tracked();
        t.created("zq_2026-11-25T01:00:00.000Z");
        t.sent_new(&t.pending.clone(), 9, &[]);
        let now = created_at("zq_2026-11-25T01:00:02.500Z").unwrap();
        let st = t.status(&DatasetName::parse("p/t").unwrap(), now);
        assert_eq!(st.lag_seconds, Some(2.5));
        assert_eq!(
            st.replicated.as_deref(),
            Some("zq_2026-11-25T01:00:00.000Z")
        );
        assert!(created_at("daily-1").is_none());
    }
}
