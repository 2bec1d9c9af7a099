//! Protection modes: what zq keeps so that a step can always resume and the next step can
//! always be incremental, whatever else prunes snapshots (zrepl's model).
//!
//! | mode | sender, while a step runs | sender, after a commit | receiver, after a commit |
//! | --- | --- | --- | --- |
//! | `guarantee_resumability` | `from` and `to` held once the step is resumable (past 1 MiB) | `to` held as the cursor, `from` released | last-received hold moves to `to` |
//! | `guarantee_incremental` | — | `to` held (the cursor), `from` released | last-received hold moves to `to` |
//! | `guarantee_nothing` | — | — | — |
//!
//! Every hold is a ZFS user hold (`zfs hold`); a held snapshot cannot be destroyed, by zq's
//! retention or anyone's. On the sender one tag per job, `zq_<job>`, marks what the job
//! needs: the replication cursor (the snapshot the receiver last confirmed) and, while a
//! step is in flight or interrupted, the step's `to` (its `from` is the cursor). One tag
//! rather than a step tag and a cursor tag halves the `zfs` calls per step: a step moves
//! one hold after its commit (hold `to`, release `from`), and those moves wait for a
//! moment without steps and go out together ([`crate::holds`]): each `zfs hold` is a pool
//! sync task, ~8 ms of zfs-fuse's time however many snapshots it names. A step's own holds are
//! placed only once it is large enough to be resumed (past 1 MiB: smaller steps restart
//! when interrupted, so holding them would buy nothing). On the receiver the tag is
//! `zq_<job>_last`. The cursor is a hold on every platform for now: OpenZFS bookmarks
//! (which would let an operator destroy the snapshot and keep replicating incrementally
//! from the bookmark) are not used yet.
//!
//! What an interrupted or abandoned step left, or a previous mode, is released when the
//! dataset is next planned from a listing (after a start, a failure or a reconnect):
//! [`Protector::tidy`] releases the job's tag from every held snapshot that the current
//! mode does not need.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};
use zq_store::{DatasetName, SnapshotName, StoreError, Zfs};

use crate::holds::{Holds, StepGuard};

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
    /// Per dataset, the snapshot this process knows to hold the job's tag as the cursor:
    /// a step from it need not hold it again.
    cursors: Mutex<HashMap<DatasetName, SnapshotName>>,
    /// Datasets whose holds this process has tidied and that no unfinished step has held
    /// since: [`Self::tidy`] has nothing to do for them (a lost connection alone does not
    /// leave holds behind).
    tidy: Mutex<std::collections::HashSet<DatasetName>>,
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
            tidy: Default::default(),
        }
    }

    fn known_cursor(&self, ds: &DatasetName) -> Option<SnapshotName> {
        self.cursors.lock().ok()?.get(ds).cloned()
    }

    fn set_cursor(&self, ds: &DatasetName, snap: Option<SnapshotName>) {
        if let Ok(mut c) = self.cursors.lock() {
            match snap {
                Some(s) => c.insert(ds.clone(), s),
                None => c.remove(ds),
            };
        }
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
        let from = from.filter(|f| self.known_cursor(to.dataset()).as_ref() != Some(*f));
        for snap in from.into_iter().chain([to]) {
            self.spawn_move(Some(snap.clone()), None);
        }
    }

    /// After the receiver committed a step (`incremental`, from the snapshot `from` unless
    /// only a bookmark of it was left): `to` becomes the cursor (held, if the mode keeps
    /// one) and `from` is released, in that order, with the next batch of moves.
    /// Failures are logged: the step is committed, and what is left over goes at the next
    /// [`Self::tidy`].
    pub fn step_committed(
        &self,
        incremental: bool,
        from: Option<&SnapshotName>,
        to: &SnapshotName,
    ) {
        let mode = self.modes.of(incremental);
        let previous = self.known_cursor(to.dataset());
        // `from` is the cursor this step replaces (if the mode keeps cursors, or this
        // process placed it); without cursors there is nothing to do and no zfs call.
        let release = from.filter(|f| *f != to && (mode.cursor() || previous.as_ref() == Some(*f)));
        let hold = mode.cursor().then_some(to);
        self.set_cursor(to.dataset(), hold.cloned());
        self.spawn_move(hold.cloned(), release.cloned());
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

    /// Releases the job's tag from the held snapshots of `dataset` that the current modes
    /// do not need: all but the cursor (`cursor`, if the modes keep one) and `keep_step`
    /// (the snapshots of a step still to be resumed), among `snapshots` (the dataset's).
    /// Costs a `zfs get` of those snapshots and a release per held snapshot that is not
    /// needed; done when a dataset is planned from a listing for the first time in this
    /// process, or after a resumable step that did not commit.
    pub async fn tidy(
        &self,
        dataset: &DatasetName,
        snapshots: &[SnapshotName],
        cursor: Option<&SnapshotName>,
        keep_step: &[SnapshotName],
    ) -> Result<(), StoreError> {
        if self.tidy.lock().is_ok_and(|t| t.contains(dataset)) {
            return Ok(());
        }
        self.set_cursor(dataset, None);
        let cursor = cursor.filter(|_| self.modes.any_cursor());
        let stale: Vec<SnapshotName> = self
            .zfs
            .userrefs_of(snapshots)
            .await?
            .into_iter()
            .filter(|(s, n)| *n > 0 && Some(s) != cursor && !keep_step.contains(s))
            .map(|(s, _)| s)
            .collect();
        if !stale.is_empty() {
            debug!(%dataset, candidates = stale.len(), "releasing holds no longer needed");
        }
        self.zfs.release(&self.tags.sender(), &stale).await?;
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

/// Releases what `tags`' job left on the sender that a stopped job does not need: every
/// hold but the newest of each dataset (its cursor; with `all`, that one too: the job is
/// retired). Returns what was released. Run it while the job's daemon is stopped: a
/// running daemon's step holds are not stale. An interrupted step's `to` is newer than the
/// cursor and is kept instead; its next run then tidies the cursor.
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
