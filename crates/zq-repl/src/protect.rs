//! Protection modes: what zq keeps so that a step can always resume and the next step can
//! always be incremental, whatever else prunes snapshots (zrepl's model).
//!
//! | mode | sender, while a step runs | sender, after a commit | receiver, after a commit |
//! | --- | --- | --- | --- |
//! | `guarantee_resumability` | `from` and `to` held once the step is resumable (past 1 MiB) | the cursor moves to `to`; step holds released | last-received hold moves to `to` |
//! | `guarantee_incremental` | — | the cursor moves to `to` | last-received hold moves to `to` |
//! | `guarantee_nothing` | — | — | — |
//!
//! The replication cursor marks, on the sender, the snapshot the receiver last confirmed:
//! the base the next step needs.
//!
//! - Where the source pool has bookmarks (OpenZFS), the cursor is a bookmark of that
//!   snapshot, `DATASET#zq_<job>_<GUID as 16 hex digits>` (zrepl's model): it holds
//!   nothing, so a pruner or an operator may destroy the snapshot, and the next step is
//!   incremental from the bookmark (its GUID is the destination's snapshot's). The GUID
//!   in the name lets the new cursor exist before the old one is destroyed.
//! - Elsewhere (zfs-fuse) the cursor is a user hold (`zfs hold`) with the job's tag: a
//!   held snapshot cannot be destroyed, by zq's retention or anyone's.
//!
//! On the sender one hold tag per job, `zq_<job>`, marks the snapshots of a step in flight
//! or interrupted, and (with holds for cursors) the cursor. One tag rather than a step tag
//! and a cursor tag halves the `zfs` calls per step: a step moves one hold after its
//! commit (hold `to`, release `from`). Moves of holds and bookmarks wait for a moment
//! without steps and go out together ([`crate::holds`]): each `zfs hold` is a pool sync
//! task, ~8 ms of zfs-fuse's time however many snapshots it names, and the bookmarks of
//! every dataset are one `zfs program` per pool (the old ones are destroyed one `zfs
//! destroy` each, several at once: about half the cost of the hold moves, measured). A
//! step's
//! own holds are placed only once it is large enough to be resumed (past 1 MiB: smaller
//! steps restart when interrupted, so holding them would buy nothing). On the receiver the
//! tag is `zq_<job>_last`, on every platform.
//!
//! What an interrupted or abandoned step left, or a previous mode, is cleaned up when the
//! dataset is next planned from a listing (after a start, a failure or a reconnect):
//! [`Protector::tidy`] releases the job's tag from every held snapshot that the current
//! mode does not need, makes the cursor bookmark if it is missing and destroys the job's
//! other cursor bookmarks.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};
use zq_store::{DatasetName, SnapshotName, StoreError, Zfs};

use crate::holds::{Holds, StepGuard};

/// A dataset's replication cursor, as [`Protector`] knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cursor {
    /// The snapshot, held with the job's tag.
    Held(SnapshotName),
    /// The job's bookmark of that name (after `#`).
    Mark(String),
}

/// What [`Protector::tidy`] looks at: one dataset as its listing and the destination show it.
#[derive(Debug, Clone, Copy)]
pub struct TidyInput<'a> {
    /// The dataset's snapshots.
    pub snapshots: &'a [SnapshotName],
    /// The dataset's bookmarks, as `(name after '#', GUID)`.
    pub bookmarks: &'a [(String, u64)],
    /// The source snapshot the destination has as its newest, if it still exists.
    pub cursor: Option<&'a SnapshotName>,
    /// The GUID of the destination's newest snapshot, if the source has it (as a
    /// snapshot or a bookmark).
    pub cursor_guid: Option<u64>,
    /// The snapshots of a step still to be resumed.
    pub keep_step: &'a [SnapshotName],
    /// The dataset's snapshots (names after `@`) with user holds, if its listing said
    /// ([`zq_store::Zfs::listing_holds`]); without, the tidy asks zfs about every snapshot.
    pub held: Option<&'a [String]>,
}

/// What a step guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protection {
    /// Step holds, a replication cursor and the receiver's last-received hold: a step can
    /// always resume, and incremental replication always stays possible.
    #[default]
    GuaranteeResumability,
    /// A cursor and the receiver's last-received hold: incremental replication stays
    /// possible, but an interrupted step whose `to` was destroyed starts over as a new step.
    GuaranteeIncremental,
    /// No holds at all.
    GuaranteeNothing,
}

impl Protection {
    /// Hold the step's snapshots while it runs (and until it is resumed).
    pub fn step_holds(self) -> bool {
        self == Protection::GuaranteeResumability
    }

    /// Keep a cursor on the sender and a last-received hold on the receiver.
    pub fn cursor(self) -> bool {
        self != Protection::GuaranteeNothing
    }

    const NAMES: [(&'static str, Protection); 3] = [
        ("guarantee_resumability", Protection::GuaranteeResumability),
        ("guarantee_incremental", Protection::GuaranteeIncremental),
        ("guarantee_nothing", Protection::GuaranteeNothing),
    ];
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::NAMES
            .iter()
            .find(|(_, p)| p == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

impl FromStr for Protection {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, p)| *p)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a protection mode (guarantee_resumability, \
                     guarantee_incremental, guarantee_nothing)"
                )
            })
    }
}

/// The modes of a job's initial (full) and incremental steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Modes {
    /// For full streams.
    pub initial: Protection,
    /// For incremental streams.
    pub incremental: Protection,
}

impl Modes {
    /// The mode of a step: initial if it has no base.
    pub fn of(&self, incremental: bool) -> Protection {
        if incremental {
            self.incremental
        } else {
            self.initial
        }
    }

    /// Whether any step keeps a cursor.
    fn any_cursor(&self) -> bool {
        self.initial.cursor() || self.incremental.cursor()
    }
}

/// A job's hold tags: `zq_<job>` on the sender, `zq_<job>_last` on the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tags {
    job: String,
}

impl Tags {
    /// Tags for `job`: 1 to 64 ASCII letters, digits, `_`, `-`, `.` or `:`.
    pub fn new(job: &str) -> Result<Tags, String> {
        let ok = !job.is_empty()
            && job.len() <= 64
            && job
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
        if !ok {
            return Err(format!(
                "job name {job:?}: use 1 to 64 letters, digits, '_', '-', '.' or ':'"
            ));
        }
        Ok(Tags {
            job: job.to_string(),
        })
    }

    /// The job's name.
    pub fn job(&self) -> &str {
        &self.job
    }

    /// Held on the sender on the cursor and on an unfinished step's snapshots.
    pub fn sender(&self) -> String {
        format!("zq_{}", self.job)
    }

    /// The name (after `#`) of the job's cursor bookmark of the snapshot with `guid`.
    pub fn mark(&self, guid: u64) -> String {
        format!("zq_{}_{guid:016x}", self.job)
    }

    /// The GUID in `name` if it is one of the job's cursor bookmarks ([`Self::mark`]).
    pub fn mark_guid(&self, name: &str) -> Option<u64> {
        let hex = name
            .strip_prefix("zq_")?
            .strip_prefix(self.job.as_str())?
            .strip_prefix('_')?;
        (hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(hex, 16).ok())
            .flatten()
    }

    /// Held on the last received snapshot, on the receiver.
    pub fn last(&self) -> String {
        format!("zq_{}_last", self.job)
    }

    /// Whether `tag` is a receiver tag a sender may ask for (`zq_<job>_last`).
    pub fn is_last_tag(tag: &str) -> bool {
        tag.strip_prefix("zq_")
            .and_then(|t| t.strip_suffix("_last"))
            .is_some_and(|job| Tags::new(job).is_ok())
    }
}

/// A job's protection on the sender.
#[derive(Debug)]
pub struct Protector {
    /// The modes.
    pub modes: Modes,
    /// The tags.
    pub tags: Tags,
    zfs: Zfs,
    holds: Arc<Holds>,
    /// Per dataset, the cursor this process knows: a step from a held one need not hold
    /// it again; a new bookmark supersedes the old one.
    cursors: Mutex<HashMap<DatasetName, Cursor>>,
    /// Snapshots this process holds for a step: with bookmark cursors, released at the
    /// step's commit.
    step_held: Mutex<std::collections::HashSet<SnapshotName>>,
    /// Per pool, whether cursors there are bookmarks (learned by [`Self::tidy`], which
    /// runs before a dataset's first step in this process).
    mark_pools: Mutex<HashMap<String, bool>>,
    /// Datasets whose holds this process has tidied and that no unfinished step has held
    /// since: [`Self::tidy`] has nothing to do for them (a lost connection alone does not
    /// leave holds behind).
    tidy: Mutex<std::collections::HashSet<DatasetName>>,
    /// Set by [`Self::at_once`].
    at_once: std::sync::atomic::AtomicBool,
}

impl Protector {
    /// Protection with `modes`, naming its holds after `tags`' job.
    pub fn new(zfs: Zfs, modes: Modes, tags: Tags) -> Self {
        Protector {
            modes,
            tags,
            holds: Holds::new(zfs.clone()),
            zfs,
            cursors: Default::default(),
            step_held: Default::default(),
            mark_pools: Default::default(),
            tidy: Default::default(),
            at_once: Default::default(),
        }
    }

    /// For a run whose steps nothing follows that cursor moves could delay (a one-shot run
    /// of one dataset): moves go at once, and each step's new cursor (the hold on its `to`,
    /// or its bookmark) is placed while the step runs ([`Self::step_begins`]), so that
    /// after the commit only the old cursor's removal is left to wait for.
    pub fn at_once(&self) {
        self.at_once
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.holds.at_once();
    }

    /// A step from `from` (a snapshot, or `None`: full, or from a bookmark) to `to` (GUID
    /// `guid`, 0 if not known yet) begins. With [`Self::at_once`] and a mode that keeps a
    /// cursor, places the new cursor now; the commit then finds it in place. If the step
    /// fails, the next [`Self::tidy`] removes it: in this process (a retry plans the
    /// dataset again and tidies it, as after a resumable step) or in the next run.
    pub fn step_begins(&self, incremental: bool, to: &SnapshotName, guid: u64) {
        if !self.at_once.load(std::sync::atomic::Ordering::Relaxed)
            || !self.modes.of(incremental).cursor()
        {
            return;
        }
        if let Ok(mut t) = self.tidy.lock() {
            t.remove(to.dataset());
        }
        if self.marks(to.dataset()) {
            if guid != 0 {
                self.spawn_mark(to, &self.tags.mark(guid), Vec::new());
            }
        } else {
            if let Ok(mut h) = self.step_held.lock() {
                h.insert(to.clone());
            }
            self.spawn_move(Some(to.clone()), None);
        }
    }

    fn known_cursor(&self, ds: &DatasetName) -> Option<Cursor> {
        self.cursors.lock().ok()?.get(ds).cloned()
    }

    fn set_cursor(&self, ds: &DatasetName, cursor: Option<Cursor>) {
        if let Ok(mut c) = self.cursors.lock() {
            match cursor {
                Some(s) => c.insert(ds.clone(), s),
                None => c.remove(ds),
            };
        }
    }

    /// Whether the cursors of `ds` are bookmarks, as [`Self::tidy`] learned.
    fn marks(&self, ds: &DatasetName) -> bool {
        self.mark_pools
            .lock()
            .is_ok_and(|m| m.get(ds.pool()).copied().unwrap_or(false))
    }

    /// Whether the cursors of `ds` are to be bookmarks: zfs has them and so does the pool.
    async fn learn_marks(&self, ds: &DatasetName) -> Result<bool, StoreError> {
        if let Some(known) = self
            .mark_pools
            .lock()
            .ok()
            .and_then(|m| m.get(ds.pool()).copied())
        {
            return Ok(known);
        }
        let marks = self.zfs.capabilities().bookmarks
            && self
                .zfs
                .pool_features(ds.pool())
                .await?
                .enabled
                .contains("bookmarks");
        if let Ok(mut m) = self.mark_pools.lock() {
            m.insert(ds.pool().to_string(), marks);
        }
        Ok(marks)
    }

    /// Whether a step's snapshots are to be held while it runs: with
    /// `guarantee_resumability`, once it is large enough to be resumable (the sender calls
    /// [`Self::step_started`] then; a small step that is interrupted starts over anyway).
    pub fn holds_steps(&self, incremental: bool) -> bool {
        self.modes.of(incremental).step_holds()
    }

    /// Waits (at most 15 s) for the hold moves asked for so far: call it before exiting.
    pub async fn flush(&self) {
        self.holds.flush(std::time::Duration::from_secs(15)).await;
    }

    /// Marks a step as running: hold moves wait for a moment without steps
    /// ([`crate::holds`]).
    pub fn step(&self) -> StepGuard {
        self.holds.step()
    }

    /// Holds a step's `to`, and its `from` unless that is already the cursor. Returns at
    /// once; the holds are placed with the next batch (at the latest 10 s later, not
    /// waiting for this step to end).
    pub fn step_started(&self, from: Option<&SnapshotName>, to: &SnapshotName) {
        if let Ok(mut t) = self.tidy.lock() {
            t.remove(to.dataset());
        }
        let cursor = match self.known_cursor(to.dataset()) {
            Some(Cursor::Held(s)) => Some(s),
            _ => None,
        };
        let from = from.filter(|f| cursor.as_ref() != Some(*f));
        for snap in from.into_iter().chain([to]) {
            if let Ok(mut h) = self.step_held.lock() {
                h.insert(snap.clone());
            }
            self.spawn_move(Some(snap.clone()), None);
        }
    }

    /// After the receiver committed a step (`incremental`, from the snapshot `from` unless
    /// only a bookmark of it was left): `to` becomes the cursor (held, if the mode keeps
    /// one) and `from` is released, in that order, with the next batch of moves.
    /// Failures are logged: the step is committed, and what is left over goes at the next
    /// [`Self::tidy`].
    ///
    /// With bookmark cursors, `to` (whose GUID is `guid`) is bookmarked instead, the job's
    /// previous cursor bookmark destroyed once that exists, and the step's holds released.
    pub fn step_committed(
        &self,
        incremental: bool,
        from: Option<&SnapshotName>,
        to: &SnapshotName,
        guid: u64,
    ) {
        let mode = self.modes.of(incremental);
        let ds = to.dataset();
        let previous = self.known_cursor(ds);
        if self.marks(ds) {
            if mode.cursor() && guid != 0 {
                let name = self.tags.mark(guid);
                let supersedes = match previous {
                    Some(Cursor::Mark(old)) if old != name => vec![old],
                    _ => Vec::new(),
                };
                self.set_cursor(ds, Some(Cursor::Mark(name.clone())));
                self.spawn_mark(to, &name, supersedes);
            }
            // Released after the bookmark is made (crate::holds runs marks first).
            for snap in from.into_iter().chain([to]) {
                let held = self.step_held.lock().is_ok_and(|mut h| h.remove(snap));
                if held {
                    self.spawn_move(None, Some(snap.clone()));
                }
            }
            return;
        }
        // `from` is the cursor this step replaces (if the mode keeps cursors, or this
        // process placed it); without cursors there is nothing to do and no zfs call.
        let release = from.filter(|f| {
            *f != to && (mode.cursor() || previous == Some(Cursor::Held((*f).clone())))
        });
        let hold = mode.cursor().then_some(to);
        if let Ok(mut h) = self.step_held.lock() {
            h.remove(to);
            from.map(|f| h.remove(f));
        }
        self.set_cursor(ds, hold.cloned().map(Cursor::Held));
        self.spawn_move(hold.cloned(), release.cloned());
    }

    fn spawn_mark(&self, snap: &SnapshotName, name: &str, supersedes: Vec<String>) {
        let done = self.holds.enqueue_mark(snap, name, supersedes);
        let mark = format!("{}#{name}", snap.dataset());
        tokio::spawn(async move {
            if let Err(e) = done.await {
                warn!(%mark, error = %e, "cannot move the cursor bookmark; the next planned step retries");
            }
        });
    }

    fn spawn_move(&self, hold: Option<SnapshotName>, release: Option<SnapshotName>) {
        if hold.is_none() && release.is_none() {
            return;
        }
        let tag = self.tags.sender();
        // Queued before returning, so that a flush right after (a one-shot run exiting)
        // waits for it.
        let Some(done) = self.holds.enqueue(&tag, hold.as_ref(), release.as_ref()) else {
            return;
        };
        tokio::spawn(async move {
            if let Err(e) = done.await {
                warn!(%tag, error = %e, "cannot move a hold; the next planned step retries");
            }
        });
    }

    /// Cleans up what the job left on `dataset` that the current modes do not need:
    /// releases its tag from every held snapshot among `snapshots` (the dataset's) but the
    /// cursor (with hold cursors) and `keep_step` (the snapshots of a step still to be
    /// resumed); with bookmark cursors, makes the cursor's bookmark if it is missing and
    /// destroys the job's other cursor bookmarks among `bookmarks` (the dataset's, as
    /// `(name, GUID)`). `cursor` is the source's snapshot of the destination's newest,
    /// `cursor_guid` that newest's GUID if the source has it as a snapshot or a bookmark
    /// (without it, no cursor bookmark is destroyed: none is known to be stale).
    ///
    /// Costs nothing when the listing said which snapshots are held and none but the
    /// cursor and `keep_step` is; otherwise a `zfs get` of the snapshots (without that
    /// from the listing), a `zfs holds` of the other held ones where zfs lists tags, a
    /// `zfs release` of those with the job's tag and a `zfs destroy` per stale bookmark.
    /// Done when a dataset is planned from a listing for the first time in this process,
    /// or after a resumable step that did not commit.
    pub async fn tidy(&self, dataset: &DatasetName, t: TidyInput<'_>) -> Result<(), StoreError> {
        if self.tidy.lock().is_ok_and(|t| t.contains(dataset)) {
            return Ok(());
        }
        let marks = self.learn_marks(dataset).await?;
        self.set_cursor(dataset, None);
        self.holds.forget(dataset);
        // What this process held for steps: perhaps after the listing was taken.
        let mut step_held = Vec::new();
        if let Ok(mut h) = self.step_held.lock() {
            h.retain(|s| match s.dataset() == dataset {
                true => {
                    step_held.push(s.clone());
                    false
                }
                false => true,
            });
        }
        let cursor = t.cursor.filter(|_| self.modes.any_cursor());
        // With bookmark cursors, the cursor's hold (left by an older zq, or a hold-cursor
        // job before its pool had bookmarks) goes only after its bookmark exists.
        let mut release_after_mark = None;
        if marks {
            let mine: Vec<(&String, u64)> = t
                .bookmarks
                .iter()
                .filter(|(n, _)| self.tags.mark_guid(n).is_some())
                .map(|(n, g)| (n, *g))
                .collect();
            let want = t
                .cursor_guid
                .filter(|_| self.modes.any_cursor())
                .map(|g| self.tags.mark(g));
            let stale: Vec<String> = match &want {
                Some(want) => mine
                    .iter()
                    .filter(|(n, _)| *n != want)
                    .map(|(n, _)| (*n).clone())
                    .collect(),
                // No cursor in this mode: every cursor bookmark is stale, but the one that
                // is the base of the next step (its snapshot is gone).
                None if !self.modes.any_cursor() => mine
                    .iter()
                    .filter(|(_, g)| t.cursor.is_some() || Some(*g) != t.cursor_guid)
                    .map(|(n, _)| (*n).clone())
                    .collect(),
                // No base in common: keep them (the plan says what to do).
                None => Vec::new(),
            };
            match (&want, cursor) {
                (Some(want), Some(snap)) if !mine.iter().any(|(n, _)| *n == want) => {
                    debug!(%dataset, mark = %want, "making the missing cursor bookmark");
                    self.set_cursor(dataset, Some(Cursor::Mark(want.clone())));
                    self.spawn_mark(snap, want, stale);
                    release_after_mark = Some(snap);
                }
                (Some(want), _) => {
                    // Without it (and no snapshot to make it from) the others stay.
                    if mine.iter().any(|(n, _)| *n == want) {
                        self.set_cursor(dataset, Some(Cursor::Mark(want.clone())));
                        for old in &stale {
                            self.zfs.destroy_bookmark_if_any(dataset, old).await?;
                        }
                    }
                }
                (None, _) => {
                    for old in &stale {
                        self.zfs.destroy_bookmark_if_any(dataset, old).await?;
                    }
                }
            }
        }
        let keep_hold = if marks { release_after_mark } else { cursor };
        let mut held: Vec<SnapshotName> = match t.held {
            // Those that still exist: the listing that said may be older than this one.
            Some(names) => names
                .iter()
                .filter_map(|n| dataset.snapshot(n).ok())
                .filter(|s| t.snapshots.contains(s))
                .collect(),
            None => self
                .zfs
                .userrefs_of(t.snapshots)
                .await?
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(s, _)| s)
                .collect(),
        };
        for s in step_held {
            if !held.contains(&s) {
                held.push(s);
            }
        }
        let mut stale: Vec<SnapshotName> = held
            .iter()
            .filter(|s| Some(*s) != keep_hold && !t.keep_step.contains(s))
            .cloned()
            .collect();
        let tag = self.tags.sender();
        if !stale.is_empty() {
            // Held by someone: by this job only if zfs says so, where it can.
            if let Some(tags) = self.zfs.holds(&stale).await? {
                stale.retain(|s| tags.iter().any(|(h, t)| h == s && *t == tag));
            }
        }
        if !stale.is_empty() {
            debug!(%dataset, candidates = stale.len(), "releasing holds no longer needed");
        }
        self.zfs.release(&tag, &stale).await?;
        if let Some(snap) = release_after_mark.filter(|s| held.contains(s)) {
            self.spawn_move(None, Some(snap.clone()));
        }
        // The step still to be resumed is held by its earlier run: its commit releases it.
        if let Ok(mut h) = self.step_held.lock() {
            h.extend(t.keep_step.iter().filter(|s| held.contains(s)).cloned());
        }
        if let Ok(mut t) = self.tidy.lock() {
            t.insert(dataset.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print_as_zrepl_names_them() {
        for p in [
            Protection::GuaranteeResumability,
            Protection::GuaranteeIncremental,
            Protection::GuaranteeNothing,
        ] {
            assert_eq!(p.to_string().parse::<Protection>().unwrap(), p);
        }
        assert!("resumability".parse::<Protection>().is_err());
        assert!(Protection::default().step_holds());
        assert!(Protection::GuaranteeIncremental.cursor());
        assert!(!Protection::GuaranteeIncremental.step_holds());
        assert!(!Protection::GuaranteeNothing.cursor());
    }

    #[test]
    fn tags_carry_the_job_and_refuse_odd_names() {
        let t = Tags::new("web-1.backup").unwrap();
        assert_eq!(t.sender(), "zq_web-1.backup");
        assert_eq!(t.last(), "zq_web-1.backup_last");
        assert!(Tags::is_last_tag(&t.last()));
        for bad in ["", "a b", "a/b", "x;rm", &"j".repeat(65)] {
            assert!(Tags::new(bad).is_err(), "{bad:?}");
        }
        assert!(!Tags::is_last_tag("keep"));
        assert!(!Tags::is_last_tag("zq_a b_last"));
        assert!(!Tags::is_last_tag("zq_j"));
    }

    #[test]
    fn cursor_bookmarks_name_the_job_and_the_guid() {
        let t = Tags::new("web_1").unwrap();
        let name = t.mark(0xfedc_ba98_7654_3210);
        assert_eq!(name, "zq_web_1_fedcba9876543210");
        assert_eq!(t.mark_guid(&name), Some(0xfedc_ba98_7654_3210));
        assert!(is_any_mark(&name));
        // Another job's, even one whose name starts like this one's, is not this job's.
        let other = Tags::new("web").unwrap();
        assert_eq!(other.mark_guid(&name), None);
        assert_eq!(t.mark_guid(&other.mark(7)), None);
        assert!(is_any_mark(&other.mark(7)));
        for bad in [
            "zq_web_1_123",
            "zq_web_1_fedcba987654321g",
            "s1-mark",
            "zq__0000000000000001",
        ] {
            assert_eq!(t.mark_guid(bad), None, "{bad}");
            assert!(!is_any_mark(bad), "{bad}");
        }
    }
}

/// One of zq's holds, as `zq-send abstractions list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abstraction {
    /// The held snapshot.
    pub snapshot: SnapshotName,
    /// The hold's tag; `None` where zfs cannot list tags (zfs-fuse) and no job was given
    /// to look for.
    pub tag: Option<String>,
    /// User holds on the snapshot in all (zq's and anyone's).
    pub userrefs: u64,
}

/// zq's holds on the snapshots at (with `recursive`, below) `root`, oldest first per
/// dataset. Where zfs lists hold tags, every `zq_` tag (of `tags`' job, if given);
/// elsewhere (zfs-fuse) the job's tag is looked for snapshot by snapshot (which places and
/// removes a hold where there was none), and without a job each held snapshot is shown
/// without a tag.
pub async fn abstractions(
    zfs: &Zfs,
    root: &DatasetName,
    recursive: bool,
    tags: Option<&Tags>,
) -> Result<Vec<Abstraction>, StoreError> {
    let mut found = Vec::new();
    for (snap, userrefs) in held_snapshots(zfs, root, recursive).await? {
        let one = std::slice::from_ref(&snap);
        match (zfs.holds(one).await?, tags) {
            (Some(holds), _) => found.extend(
                holds
                    .into_iter()
                    .filter(|(_, t)| t.starts_with("zq_"))
                    .filter(|(_, t)| {
                        tags.is_none_or(|tags| *t == tags.sender() || *t == tags.last())
                    })
                    .map(|(snapshot, tag)| Abstraction {
                        snapshot,
                        tag: Some(tag),
                        userrefs,
                    }),
            ),
            (None, Some(tags)) => {
                if zfs.has_hold(&tags.sender(), &snap).await? {
                    found.push(Abstraction {
                        snapshot: snap,
                        tag: Some(tags.sender()),
                        userrefs,
                    });
                }
            }
            (None, None) => found.push(Abstraction {
                snapshot: snap,
                tag: None,
                userrefs,
            }),
        }
    }
    Ok(found)
}

/// One of zq's cursor bookmarks, as `zq-send abstractions list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorMark {
    /// The bookmarked dataset.
    pub dataset: DatasetName,
    /// The bookmark's name (after `#`).
    pub name: String,
}

impl fmt::Display for CursorMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.dataset, self.name)
    }
}

/// Whether `name` is a cursor bookmark of some job: `zq_<job>_<16 hex digits>`.
fn is_any_mark(name: &str) -> bool {
    name.strip_prefix("zq_")
        .and_then(|rest| rest.rsplit_once('_'))
        .is_some_and(|(job, hex)| {
            Tags::new(job).is_ok() && hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit())
        })
}

/// zq's cursor bookmarks at (with `recursive`, below) `root` (of `tags`' job, if given),
/// oldest first per dataset. Empty where zfs has no bookmarks (zfs-fuse).
pub async fn cursor_marks(
    zfs: &Zfs,
    root: &DatasetName,
    recursive: bool,
    tags: Option<&Tags>,
) -> Result<Vec<CursorMark>, StoreError> {
    if !zfs.capabilities().bookmarks {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for ds in zfs.list(root, recursive).await? {
        for b in &ds.bookmarks {
            let mine = match tags {
                Some(t) => t.mark_guid(&b.name).is_some(),
                None => is_any_mark(&b.name),
            };
            if mine {
                found.push(CursorMark {
                    dataset: ds.name.clone(),
                    name: b.name.clone(),
                });
            }
        }
    }
    Ok(found)
}

/// Destroys the cursor bookmarks of `tags`' job at (below) `root` but the newest of each
/// dataset (with `all`, that one too). Returns what was destroyed. Like
/// [`release_stale`], for a stopped job.
pub async fn destroy_stale_marks(
    zfs: &Zfs,
    root: &DatasetName,
    recursive: bool,
    tags: &Tags,
    all: bool,
) -> Result<Vec<CursorMark>, StoreError> {
    let marks = cursor_marks(zfs, root, recursive, Some(tags)).await?;
    let mut newest: HashMap<&DatasetName, &str> = HashMap::new();
    for m in &marks {
        newest.insert(&m.dataset, &m.name);
    }
    let mut destroyed = Vec::new();
    for m in &marks {
        if !all && newest.get(&m.dataset) == Some(&m.name.as_str()) {
            continue;
        }
        zfs.destroy_bookmark_if_any(&m.dataset, &m.name).await?;
        destroyed.push(m.clone());
    }
    Ok(destroyed)
}

/// Releases what `tags`' job left on the sender that a stopped job does not need: every
/// hold but the newest of each dataset (its cursor; with `all`, that one too: the job is
/// retired). Returns what was released. Run it while the job's daemon is stopped: a
/// running daemon's step holds are not stale. An interrupted step's `to` is newer than the
/// cursor and is kept instead; its next run then tidies the cursor. Cursor bookmarks
/// are [`destroy_stale_marks`]'s.
pub async fn release_stale(
    zfs: &Zfs,
    root: &DatasetName,
    recursive: bool,
    tags: &Tags,
    all: bool,
) -> Result<Vec<Abstraction>, StoreError> {
    let tag = tags.sender();
    let held: Vec<Abstraction> = abstractions(zfs, root, recursive, Some(tags))
        .await?
        .into_iter()
        .filter(|a| a.tag.as_deref() == Some(tag.as_str()))
        .collect();
    // Oldest first per dataset: the newest of a dataset is its last one.
    let mut newest: HashMap<DatasetName, SnapshotName> = HashMap::new();
    for a in &held {
        newest.insert(a.snapshot.dataset().clone(), a.snapshot.clone());
    }
    let mut released = Vec::new();
    for a in held {
        if !all && newest.get(a.snapshot.dataset()) == Some(&a.snapshot) {
            continue;
        }
        zfs.release(&tag, std::slice::from_ref(&a.snapshot)).await?;
        released.push(a);
    }
    Ok(released)
}

/// Snapshots with user holds at (or below) `root`, oldest first per dataset.
async fn held_snapshots(
    zfs: &Zfs,
    root: &DatasetName,
    recursive: bool,
) -> Result<Vec<(SnapshotName, u64)>, StoreError> {
    let refs: HashMap<SnapshotName, u64> = zfs
        .userrefs(root, recursive)
        .await?
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    let mut held = Vec::new();
    for ds in zfs.list(root, recursive).await? {
        for s in &ds.snapshots {
            let snap = ds.name.snapshot(&s.name)?;
            if let Some(n) = refs.get(&snap) {
                held.push((snap, *n));
            }
        }
    }
    Ok(held)
}

/// The job name used when none is given: the receiver's key and the target identify a job
/// (two jobs never share both), so their hash names it stably across restarts.
pub fn default_job(receiver_fingerprint: &str, target: &DatasetName) -> String {
    let h = blake3::hash(format!("{receiver_fingerprint} {target}").as_bytes());
    format!("j{}", &h.to_hex()[..8])
}
