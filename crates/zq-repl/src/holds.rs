//! User holds placed and released in batches, while no step runs. Every protected step
//! moves a hold on each side (hold the new snapshot, release the old), and each `zfs hold`
//! or `zfs release` is a pool sync task (~8 ms of zfs-fuse's time, however many snapshots
//! it names): one move per step and dataset made replicating 10 datasets every second
//! 110 ms slower at p50, and batching moves that met by chance still 76 ms
//! (docs/benchmarks.md). So moves wait for a moment when no step has run here for a while
//! (see [`Holds::step`]), at least [`SPACING`] after the previous batch (at most
//! [`MAX_DEFER`] in all), and go out together: one
//! `zfs hold TAG S1 S2 …` per tag, then one `zfs release TAG …` per tag, with the moves
//! of one dataset through intermediate snapshots cancelled out. A cursor thus moves to a
//! confirmed snapshot within a moment of the commit, in the pool's idle time between
//! rounds, not competing with the next snapshot's transfers; on a pool that is never idle
//! it trails by at most [`MAX_DEFER`], and costs one hold and one release per dataset per
//! [`MAX_DEFER`] however fast snapshots come (zfs-fuse: ~8 ms per call plus ~2.6 ms per
//! snapshot named).
//!
//! A move releases its old snapshot only if its new one was held, so a dataset is never
//! left without a hold; until a move is done the previous snapshot stays held. A hold this
//! process placed and has not released since is not placed again, nor a bookmark it made
//! made again: a step's `to` held early (a resumable step, or a one-shot run placing its
//! new cursor while the stream runs) becomes the cursor without a zfs call.
//!
//! Cursor bookmarks (OpenZFS, [`crate::protect`]) move with the same batches: the new
//! bookmarks of every dataset are made by one `zfs program` per pool, and only once a
//! dataset's new bookmark exists are the ones it supersedes destroyed (one `zfs destroy`
//! each: neither `zfs destroy` nor a channel program destroys several bookmarks at once),
//! eight at a time, so that their sync tasks share txgs (in the test guest
//! a batch of 100 then took 2.5 s against 6.0 s one at a time and 5.4 s for the hold
//! moves; docs/benchmarks.md). A dataset whose cursor moved several times in one batch
//! gets only its last bookmark.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::warn;
use zq_store::{DatasetName, SnapshotName, Zfs};

/// One move: hold `hold` (if any), then release `release` (if any), both with `tag`.
#[derive(Debug)]
struct Move {
    tag: String,
    hold: Option<SnapshotName>,
    release: Option<SnapshotName>,
    reply: oneshot::Sender<Result<(), String>>,
}

/// One cursor bookmark move: bookmark `snapshot` as `name`, then destroy the bookmarks of
/// its dataset named in `supersedes`.
#[derive(Debug)]
struct Mark {
    snapshot: SnapshotName,
    name: String,
    supersedes: Vec<String>,
    reply: oneshot::Sender<Result<(), String>>,
}

/// Batches hold moves; see the module docs.
#[derive(Debug)]
pub struct Holds {
    zfs: Zfs,
    state: Mutex<State>,
    /// Signalled when a step ends.
    idle: tokio::sync::Notify,
    /// Signalled when a batch is done ([`Holds::flush`] waits for it).
    drained: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    pending: Vec<Move>,
    marks: Vec<Mark>,
    running: bool,
    /// Steps running now ([`Holds::step`]).
    steps: usize,
    /// When the last batch ended: the next waits [`SPACING`] after it.
    last_batch: Option<std::time::Instant>,
    /// The process is about to exit ([`Holds::flush`]), or nothing runs after its steps
    /// ([`Holds::at_once`]): moves go at once.
    flushing: bool,
    /// Holds this process placed and has not released since, as `(tag, snapshot)`: holding
    /// one again needs no zfs call (a step's snapshot becoming the cursor).
    placed: HashSet<(String, SnapshotName)>,
    /// Cursor bookmarks this process made and has not destroyed since.
    made: HashSet<(DatasetName, String)>,
}

/// At most this many `zfs destroy` of superseded cursor bookmarks run at once.
const PARALLEL_DESTROYS: usize = 8;

/// At most this many snapshots per `zfs hold` or `zfs release`.
const MAX_BATCH: usize = 64;

/// Moves wait for a moment without steps at most this long.
pub const MAX_DEFER: std::time::Duration = std::time::Duration::from_secs(10);

/// How long no step must run for the moment to count as quiet.
const QUIET: std::time::Duration = std::time::Duration::from_millis(50);

/// At least this long between the end of a batch and the start of the next (unless
/// flushing): a batch costs per snapshot it names (zfs-fuse: ~2.6 ms each, per call), and a
/// dataset whose cursor moved several times meanwhile is named once. Quiet moments come
/// after every round of steps; at 100 datasets replicated every 4 s a batch per round
/// (~1.1 s of zfs-fuse's time for both sides' holds and releases) made the daemon's
/// staleness +253 ms at p50 above the floor, against -106 ms with no holds at all
/// (docs/benchmarks.md).
pub const SPACING: std::time::Duration = std::time::Duration::from_secs(5);

/// Marks a running step while alive ([`Holds::step`]).
#[derive(Debug)]
pub struct StepGuard(Arc<Holds>);

impl Drop for StepGuard {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.steps = s.steps.saturating_sub(1);
        drop(s);
        self.0.idle.notify_waiters();
    }
}

impl Holds {
    /// Moves holds with `zfs`.
    pub fn new(zfs: Zfs) -> Arc<Self> {
        Arc::new(Holds {
            zfs,
            state: Mutex::new(State::default()),
            idle: tokio::sync::Notify::new(),
            drained: tokio::sync::Notify::new(),
        })
    }

    /// Waits until every move asked for so far is done (before the process exits: a
    /// one-shot run, a daemon or receiver shutting down), at most `limit`.
    pub async fn flush(&self, limit: std::time::Duration) {
        // Nothing comes after: waiting for a quiet moment would only delay the exit (a
        // one-shot run paid the whole quiet period for its cursor move).
        self.state().flushing = true;
        self.idle.notify_waiters();
        let _ = tokio::time::timeout(limit, async {
            loop {
                // Created before the state is read: a batch ending after that still wakes it.
                let drained = self.drained.notified();
                {
                    let s = self.state();
                    if s.pending.is_empty() && s.marks.is_empty() && !s.running {
                        return;
                    }
                }
                drained.await;
            }
        })
        .await;
    }

    /// Moves go at once from now on, without waiting for a quiet moment: for a run whose
    /// steps nothing follows that a move could delay (a one-shot run of one dataset).
    pub fn at_once(&self) {
        self.state().flushing = true;
        self.idle.notify_waiters();
    }

    /// Forgets what this process placed on `dataset` (its tidy looked at the pool, and may
    /// have released or destroyed some): the next moves ask zfs again.
    pub fn forget(&self, dataset: &DatasetName) {
        let mut s = self.state();
        s.placed.retain(|(_, snap)| snap.dataset() != dataset);
        s.made.retain(|(ds, _)| ds != dataset);
    }

    /// Says that `tag` was released from `snaps` other than by a move (before `--force`
    /// destroys them, a tidy): a snapshot made again under the same name is held again.
    pub fn released(&self, tag: &str, snaps: &[SnapshotName]) {
        let mut s = self.state();
        for snap in snaps {
            s.placed.remove(&(tag.to_string(), snap.clone()));
        }
    }

    /// Marks a step as running until the guard is dropped: moves wait for no step to run.
    pub fn step(self: &Arc<Self>) -> StepGuard {
        self.state().steps += 1;
        StepGuard(self.clone())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no step has run for [`QUIET`], or [`MAX_DEFER`]. A moment between two
    /// steps of one round is not quiet: a batch there would delay the rest of the round.
    async fn quiet(&self) {
        let deadline = tokio::time::Instant::now() + MAX_DEFER;
        // Spaced from the last batch, unless flushing or the deadline comes first.
        let spaced = self
            .state()
            .last_batch
            .map(|t| tokio::time::Instant::from_std(t) + SPACING);
        if let Some(spaced) = spaced.filter(|s| *s < deadline) {
            loop {
                let notified = self.idle.notified();
                if self.state().flushing || tokio::time::Instant::now() >= spaced {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(spaced) => break,
                    // A flush may have begun: look again.
                    _ = notified => {}
                }
            }
        }
        let _ = tokio::time::timeout_at(deadline, async {
            loop {
                // Created before the state is read: a step ending or a flush starting
                // after that read still wakes it.
                let notified = self.idle.notified();
                let (steps, flushing) = {
                    let s = self.state();
                    (s.steps, s.flushing)
                };
                if flushing {
                    return;
                }
                if steps > 0 {
                    notified.await;
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(QUIET) => {
                        let s = self.state();
                        if s.steps == 0 || s.flushing {
                            return;
                        }
                    }
                    // A step ended or a flush began during the wait: look again.
                    _ = notified => {}
                }
            }
        })
        .await;
    }

    /// Holds `hold` with `tag` and then, if that worked, releases `tag` from `release`.
    /// Either may be `None`. A snapshot that already has the tag, or (for the release)
    /// lacks it or is gone, is fine.
    pub async fn r#move(
        self: &Arc<Self>,
        tag: &str,
        hold: Option<&SnapshotName>,
        release: Option<&SnapshotName>,
    ) -> Result<(), String> {
        match self.enqueue(tag, hold, release) {
            Some(done) => done.await,
            None => Ok(()),
        }
    }

    /// `Holds::move` queued now, before the caller yields: a [`Holds::flush`] that
    /// starts right after waits for it (a spawned task calling `move` might not have run
    /// yet, and the move would be lost at exit). The future says how it went.
    pub fn enqueue(
        self: &Arc<Self>,
        tag: &str,
        hold: Option<&SnapshotName>,
        release: Option<&SnapshotName>,
    ) -> Option<impl std::future::Future<Output = Result<(), String>> + Send + 'static> {
        if hold.is_none() && release.is_none() {
            return None;
        }
        let (reply, rx) = oneshot::channel();
        self.queue(|s| {
            s.pending.push(Move {
                tag: tag.to_string(),
                hold: hold.cloned(),
                release: release.cloned(),
                reply,
            })
        });
        Some(Self::reply(rx))
    }

    /// Queues a cursor bookmark move, like [`Self::enqueue`]: bookmark `snapshot` as `name`
    /// (the part after `#`) and, once that exists, destroy the bookmarks of its dataset
    /// named in `supersedes`.
    pub fn enqueue_mark(
        self: &Arc<Self>,
        snapshot: &SnapshotName,
        name: &str,
        supersedes: Vec<String>,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        self.queue(|s| {
            s.marks.push(Mark {
                snapshot: snapshot.clone(),
                name: name.to_string(),
                supersedes,
                reply,
            })
        });
        Self::reply(rx)
    }

    fn queue(self: &Arc<Self>, add: impl FnOnce(&mut State)) {
        let start = {
            let mut s = self.state();
            add(&mut s);
            !std::mem::replace(&mut s.running, true)
        };
        if start {
            tokio::spawn(self.clone().drain());
        }
    }

    async fn reply(rx: oneshot::Receiver<Result<(), String>>) -> Result<(), String> {
        rx.await
            .unwrap_or_else(|_| Err("the hold task ended (shutting down)".into()))
    }

    async fn drain(self: Arc<Self>) {
        struct Reset(Option<Arc<Holds>>);
        impl Drop for Reset {
            fn drop(&mut self) {
                if let Some(h) = self.0.take() {
                    h.state().running = false;
                    h.drained.notify_waiters();
                }
            }
        }
        let mut reset = Reset(Some(self.clone()));
        loop {
            self.quiet().await;
            let (batch, marks) = {
                let mut s = self.state();
                if s.pending.is_empty() && s.marks.is_empty() {
                    s.running = false;
                    reset.0 = None;
                    drop(s);
                    self.drained.notify_waiters();
                    return;
                }
                (std::mem::take(&mut s.pending), std::mem::take(&mut s.marks))
            };
            self.run(batch, marks).await;
            self.state().last_batch = Some(std::time::Instant::now());
        }
    }

    /// Runs one batch. Moves through a snapshot cancel out: hold `b` / release `a`
    /// followed by hold `c` / release `b` is hold `c` / release `a` (at 1 Hz and a batch
    /// every few seconds, most of a dataset's moves are such chains). If that goes through,
    /// every move succeeded; if not, the batch runs move by move: every hold, then the
    /// releases of the moves whose hold worked.
    async fn run(&self, batch: Vec<Move>, marks: Vec<Mark>) {
        let (holds, releases) = coalesce(&batch);
        let mut ok = true;
        for (tag, snaps) in &holds {
            for chunk in snaps.chunks(MAX_BATCH) {
                ok = ok && self.call(true, tag, chunk).await.is_ok();
            }
        }
        // Between the holds and the releases: a step's snapshot stays held until the
        // bookmark that replaces its hold as the cursor exists.
        self.run_marks(marks).await;
        if ok {
            for (tag, snaps) in &releases {
                for chunk in snaps.chunks(MAX_BATCH) {
                    ok = ok && self.call(false, tag, chunk).await.is_ok();
                }
            }
        }
        if ok {
            for m in batch {
                let _ = m.reply.send(Ok(()));
            }
            return;
        }
        let mut results: Vec<Result<(), String>> = vec![Ok(()); batch.len()];
        let holds: Vec<(usize, &String, &SnapshotName)> = batch
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((i, &m.tag, m.hold.as_ref()?)))
            .collect();
        self.each_tag(&holds, true, &mut results).await;
        let releases: Vec<(usize, &String, &SnapshotName)> = batch
            .iter()
            .enumerate()
            .filter(|(i, _)| results[*i].is_ok())
            .filter_map(|(i, m)| Some((i, &m.tag, m.release.as_ref()?)))
            .collect();
        self.each_tag(&releases, false, &mut results).await;
        for (m, r) in batch.into_iter().zip(results) {
            let _ = m.reply.send(r);
        }
    }

    /// Makes the last bookmark each dataset was asked for, then destroys what those
    /// supersede (see the module docs). Every mark of a dataset gets the result of its last.
    async fn run_marks(&self, marks: Vec<Mark>) {
        if marks.is_empty() {
            return;
        }
        let (last, supersedes) = coalesce_marks(&marks);
        let wanted: Vec<(SnapshotName, String)> = {
            let st = self.state();
            last.values()
                .map(|&i| (marks[i].snapshot.clone(), marks[i].name.clone()))
                .filter(|(snap, name)| !st.made.contains(&(snap.dataset().clone(), name.clone())))
                .collect()
        };
        let mut failed: HashMap<SnapshotName, String> = match wanted.is_empty() {
            true => HashMap::new(),
            false => match self.zfs.bookmark_all(&wanted).await {
                Ok(f) => f
                    .into_iter()
                    .map(|(snap, _, e)| (snap, e.to_string()))
                    .collect(),
                Err(e) => wanted
                    .iter()
                    .map(|(snap, _)| (snap.clone(), e.to_string()))
                    .collect(),
            },
        };
        {
            let mut st = self.state();
            for (snap, name) in &wanted {
                if !failed.contains_key(snap) {
                    st.made.insert((snap.dataset().clone(), name.clone()));
                }
            }
        }
        let destroys: Vec<(SnapshotName, DatasetName, String)> = last
            .iter()
            .filter(|(_, &i)| !failed.contains_key(&marks[i].snapshot))
            .flat_map(|(ds, &i)| {
                let snap = &marks[i].snapshot;
                supersedes
                    .get(ds)
                    .into_iter()
                    .flatten()
                    .map(move |old| (snap.clone(), (*ds).clone(), old.clone()))
            })
            .collect();
        // Each destroy is its own sync task; several at once share txgs.
        for chunk in destroys.chunks(PARALLEL_DESTROYS) {
            let mut running = tokio::task::JoinSet::new();
            for (snap, ds, old) in chunk.iter().cloned() {
                self.state().made.remove(&(ds.clone(), old.clone()));
                let zfs = self.zfs.clone();
                running.spawn(async move { (snap, zfs.destroy_bookmark_if_any(&ds, &old).await) });
            }
            while let Some(done) = running.join_next().await {
                match done {
                    Ok((_, Ok(()))) => {}
                    Ok((snap, Err(e))) => {
                        failed.insert(snap, e.to_string());
                    }
                    Err(e) => warn!(error = %e, "a bookmark destroy task failed"),
                }
            }
        }
        let results: HashMap<&DatasetName, Result<(), String>> = last
            .iter()
            .map(|(ds, &i)| {
                let r = failed
                    .get(&marks[i].snapshot)
                    .map_or(Ok(()), |e| Err(e.clone()));
                (*ds, r)
            })
            .collect();
        let results: Vec<Result<(), String>> = marks
            .iter()
            .map(|m| results.get(m.snapshot.dataset()).cloned().unwrap_or(Ok(())))
            .collect();
        for (m, r) in marks.into_iter().zip(results) {
            let _ = m.reply.send(r);
        }
    }

    /// One `zfs hold|release` per tag (and [`MAX_BATCH`] snapshots); if one fails, its
    /// snapshots go one at a time so that each move gets its own result.
    async fn each_tag(
        &self,
        ops: &[(usize, &String, &SnapshotName)],
        hold: bool,
        results: &mut [Result<(), String>],
    ) {
        let mut by_tag: BTreeMap<&String, Vec<(usize, &SnapshotName)>> = BTreeMap::new();
        for (i, tag, snap) in ops {
            by_tag.entry(tag).or_default().push((*i, snap));
        }
        for (tag, ops) in by_tag {
            for chunk in ops.chunks(MAX_BATCH) {
                let snaps: Vec<SnapshotName> = chunk.iter().map(|(_, s)| (*s).clone()).collect();
                if self.call(hold, tag, &snaps).await.is_ok() {
                    continue;
                }
                for (i, snap) in chunk {
                    if let Err(e) = self.call(hold, tag, std::slice::from_ref(snap)).await {
                        results[*i] = Err(e);
                    }
                }
            }
        }
    }

    async fn call(&self, hold: bool, tag: &str, snaps: &[SnapshotName]) -> Result<(), String> {
        let key = |s: &SnapshotName| (tag.to_string(), s.clone());
        let snaps: Vec<SnapshotName> = match hold {
            true => {
                let st = self.state();
                snaps
                    .iter()
                    .filter(|s| !st.placed.contains(&key(s)))
                    .cloned()
                    .collect()
            }
            false => snaps.to_vec(),
        };
        if snaps.is_empty() {
            return Ok(());
        }
        let r = if hold {
            self.zfs.hold(tag, &snaps).await
        } else {
            self.zfs.release(tag, &snaps).await
        };
        let mut st = self.state();
        for s in &snaps {
            match hold {
                true if r.is_ok() => {
                    st.placed.insert(key(s));
                }
                true => {}
                // Failed or not, it may be gone: the next hold asks zfs.
                false => {
                    st.placed.remove(&key(s));
                }
            }
        }
        r.map_err(|e| e.to_string())
    }
}

/// Per tag, the snapshots a batch must hold and then release once moves through a snapshot
/// cancel out: a snapshot that one move of the batch holds and a later one releases, and
/// that nothing else in the batch names, is neither held nor released.
type Ops = BTreeMap<String, Vec<SnapshotName>>;

fn coalesce(batch: &[Move]) -> (Ops, Ops) {
    let mut named: HashMap<(&String, &SnapshotName), usize> = HashMap::new();
    for m in batch {
        for s in m.hold.iter().chain(m.release.iter()) {
            *named.entry((&m.tag, s)).or_default() += 1;
        }
    }
    // Snapshots held by one move and released by a later one, named nowhere else.
    let mut cancelled = HashSet::new();
    for (i, m) in batch.iter().enumerate() {
        let Some(h) = &m.hold else { continue };
        let released_later = batch[i + 1..]
            .iter()
            .any(|l| l.tag == m.tag && l.release.as_ref() == Some(h));
        if released_later && named.get(&(&m.tag, h)) == Some(&2) {
            cancelled.insert((&m.tag, h));
        }
    }
    // A tag is on a snapshot or not: naming one twice in a call would make zfs fail.
    let add = |ops: &mut Ops, tag: &String, s: &SnapshotName| {
        let v = ops.entry(tag.clone()).or_default();
        if !v.contains(s) {
            v.push(s.clone());
        }
    };
    let (mut holds, mut releases) = (Ops::new(), Ops::new());
    for m in batch {
        if let Some(h) = m
            .hold
            .as_ref()
            .filter(|h| !cancelled.contains(&(&m.tag, *h)))
        {
            add(&mut holds, &m.tag, h);
        }
        if let Some(r) = m
            .release
            .as_ref()
            .filter(|r| !cancelled.contains(&(&m.tag, *r)))
        {
            add(&mut releases, &m.tag, r);
        }
    }
    (holds, releases)
}

/// Per dataset, the index of its last mark in `marks`, and the bookmarks to destroy once
/// that one exists: every one a mark of the batch supersedes, except those that the batch
/// itself was to make (never made) and the last mark's own.
fn coalesce_marks(
    marks: &[Mark],
) -> (
    BTreeMap<&DatasetName, usize>,
    HashMap<&DatasetName, Vec<String>>,
) {
    let mut last = BTreeMap::new();
    for (i, m) in marks.iter().enumerate() {
        last.insert(m.snapshot.dataset(), i);
    }
    let mut supersedes: HashMap<&DatasetName, Vec<String>> = HashMap::new();
    for m in marks {
        let ds = m.snapshot.dataset();
        let made_here = |n: &String| {
            marks
                .iter()
                .any(|o| o.snapshot.dataset() == ds && o.name == *n)
        };
        let v = supersedes.entry(ds).or_default();
        for old in &m.supersedes {
            if !made_here(old) && !v.contains(old) {
                v.push(old.clone());
            }
        }
    }
    (last, supersedes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mv(tag: &str, hold: Option<&str>, release: Option<&str>) -> Move {
        let snap = |s: &str| SnapshotName::parse(s).unwrap();
        Move {
            tag: tag.into(),
            hold: hold.map(snap),
            release: release.map(snap),
            reply: oneshot::channel().0,
        }
    }

    fn names(ops: &Ops, tag: &str) -> Vec<String> {
        ops.get(tag)
            .map(|v| v.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_chain_of_moves_is_one_hold_and_one_release() {
        let batch = [
            mv("t", Some("p/a@2"), Some("p/a@1")),
            mv("t", Some("p/b@9"), Some("p/b@8")),
            mv("t", Some("p/a@3"), Some("p/a@2")),
            mv("t", Some("p/a@4"), Some("p/a@3")),
        ];
        let (holds, releases) = coalesce(&batch);
        assert_eq!(names(&holds, "t"), ["p/b@9", "p/a@4"]);
        assert_eq!(names(&releases, "t"), ["p/a@1", "p/b@8"]);
    }

    fn mark(snap: &str, name: &str, supersedes: &[&str]) -> Mark {
        Mark {
            snapshot: SnapshotName::parse(snap).unwrap(),
            name: name.into(),
            supersedes: supersedes.iter().map(|s| s.to_string()).collect(),
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn a_chain_of_cursor_bookmarks_makes_the_last_and_destroys_the_first() {
        let marks = [
            mark("p/a@2", "m2", &["m1"]),
            mark("p/b@9", "n9", &[]),
            mark("p/a@3", "m3", &["m2"]),
            mark("p/a@4", "m4", &["m3"]),
        ];
        let (last, supersedes) = coalesce_marks(&marks);
        let a = DatasetName::parse("p/a").unwrap();
        let b = DatasetName::parse("p/b").unwrap();
        assert_eq!(last[&a], 3, "only m4 is made");
        assert_eq!(last[&b], 1);
        // m2 and m3 were never made: only m1, which existed before, is destroyed.
        assert_eq!(supersedes[&a], ["m1"]);
        assert!(supersedes[&b].is_empty());
    }

    #[test]
    fn a_snapshot_named_elsewhere_is_not_cancelled() {
        // A step hold (hold only) on @2 in the same batch: @2 must end up held.
        let batch = [
            mv("t", Some("p/a@2"), Some("p/a@1")),
            mv("t", Some("p/a@2"), None),
            mv("t", Some("p/a@3"), Some("p/a@2")),
        ];
        let (holds, releases) = coalesce(&batch);
        assert_eq!(names(&holds, "t"), ["p/a@2", "p/a@3"]);
        assert_eq!(names(&releases, "t"), ["p/a@1", "p/a@2"]);
        // Other tags are other holds.
        let batch = [
            mv("t", Some("p/a@2"), None),
            mv("u", Some("p/a@3"), Some("p/a@2")),
        ];
        let (holds, releases) = coalesce(&batch);
        assert_eq!(names(&holds, "t"), ["p/a@2"]);
        assert_eq!(names(&releases, "u"), ["p/a@2"]);
    }
}
