//! What the daemon knows per source dataset and which steps it starts: each dataset's step
//! is a task of its own, so a large transfer delays only its own dataset.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio::task::{Id as TaskId, JoinError, JoinSet};
use tracing::{debug, info, warn};
use zq_proto::SnapshotInfo;
use zq_store::{DatasetName, Zfs};

use crate::error::chain;
use crate::error::ReplError;
use crate::lanes::{Lanes, Slot};
use crate::report::to_info;
use crate::report::DatasetOutcome;
use crate::sender::{Job, Listing, Sender};

use super::changes::Changes;
use super::tracked::{Next, Tracked};
use super::{DaemonOptions, REFRESH};
use crate::prune::Cursors;

/// What a scheduling pass works with.
#[derive(Clone, Copy)]
pub(super) struct Work<'a> {
    pub(super) sender: &'a Arc<Sender>,
    pub(super) zfs: &'a Zfs,
    pub(super) job: &'a Job,
    pub(super) opts: &'a DaemonOptions,
    pub(super) lanes: &'a Arc<Lanes>,
}

/// What the daemon knows, per source dataset (parents before children).
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) datasets: BTreeMap<DatasetName, Tracked>,
    /// When the source was last listed; `None` forces a listing.
    pub(super) listed_at: Option<Instant>,
    /// Every dataset of the source tree at the last listing, excluded ones too: what
    /// `snapshots_changed` and refresh listings are compared with.
    pub(super) all_names: std::collections::BTreeSet<DatasetName>,
    /// Where the datasets the filter keeps are published after each listing.
    pub(super) included: Option<watch::Sender<Option<Vec<DatasetName>>>>,
    /// `snapshots_changed` as of the last listings (OpenZFS >= 2.2).
    pub(super) changes: Changes,
    /// The last error logged per dataset (to log a persisting error once).
    pub(super) errors: HashMap<DatasetName, String>,
    /// The last failure to write the status file (logged once, not every time).
    pub(super) status_error: Option<String>,
    /// Datasets whose step task is running, and the tasks' datasets.
    pub(super) in_flight: std::collections::HashSet<DatasetName>,
    pub(super) tasks: HashMap<TaskId, DatasetName>,
    /// When a step's outcome was last recorded (for the status file).
    pub(super) recorded_at: Option<Instant>,
    /// zfs told of a new snapshot (`zpool events`): the next pass looks, however recent
    /// the last listing.
    pub(super) woken: bool,
    /// What `zpool events` tells, where it runs.
    pub(super) told: Option<Arc<Told>>,
}

/// What `zpool events -f` told: whether it still runs, and which snapshots at or below the
/// source it said were made or destroyed, when. While it runs, a dataset whose
/// `snapshots_changed` was too young to trust at its last listing need not be listed again
/// unless an event since that listing began says something the listing may lack
/// ([`Changes::stale`]).
#[derive(Debug, Default)]
pub(super) struct Told {
    pub(super) following: AtomicBool,
    log: std::sync::Mutex<ToldLog>,
}

#[derive(Debug, Default)]
struct ToldLog {
    events: std::collections::VecDeque<(Instant, zq_store::SnapshotEvent)>,
    /// When events were last lost (by the kernel, or forgotten here): a listing that began
    /// before that cannot be vouched for.
    lost: Option<Instant>,
}

impl Told {
    /// How many events are kept, and for how long: a young dataset is checked at the pass
    /// the event wakes, well within either.
    const KEPT: usize = 10_000;
    const KEPT_FOR: Duration = Duration::from_secs(600);

    /// zfs told of a snapshot made or destroyed, or of lost events.
    pub(super) fn event(&self, event: zq_store::SnapshotEvent) {
        let now = Instant::now();
        let Ok(mut log) = self.log.lock() else { return };
        while let Some((at, _)) = log.events.front() {
            if log.events.len() < Self::KEPT && now.duration_since(*at) < Self::KEPT_FOR {
                break;
            }
            let at = *at;
            log.events.pop_front();
            log.lost = Some(at);
        }
        match event {
            zq_store::SnapshotEvent::Lost => log.lost = Some(now),
            e => log.events.push_back((now, e)),
        }
    }

    /// Whether zfs follows snapshots and told of nothing since `since` that a listing of
    /// `dataset` begun then could lack: a snapshot made that `listed` does not name, one
    /// destroyed that it does, the dataset destroyed, lost events.
    fn silent_since(&self, since: Instant, dataset: &str, listed: impl Fn(&str) -> bool) -> bool {
        if !self.following.load(Ordering::Relaxed) {
            return false;
        }
        let Ok(log) = self.log.lock() else {
            return false;
        };
        if log.lost.is_some_and(|l| l >= since) {
            return false;
        }
        !log.events
            .iter()
            .rev()
            .take_while(|(at, _)| *at >= since)
            .any(|(_, e)| match (e, e.names()) {
                (_, Some((ds, _))) if ds != dataset => false,
                (zq_store::SnapshotEvent::Made(_), Some((_, Some(snap)))) => !listed(snap),
                (zq_store::SnapshotEvent::Destroyed(_), Some((_, Some(snap)))) => listed(snap),
                _ => true,
            })
    }
}

/// The outcome of one dataset's step task.
pub(super) enum Done {
    /// Sent the snapshots zq created, by name.
    New(Vec<String>, Result<(zq_proto::Committed, u64), ReplError>),
    /// Planned and ran steps.
    Planned(Option<SnapshotInfo>, DatasetOutcome),
}

impl State {
    pub(super) fn cursors(&self) -> Cursors {
        self.datasets
            .iter()
            .filter_map(|(s, t)| Some((s.clone(), (t.target.clone(), t.cursor.clone()?))))
            .collect()
    }

    /// Lists the source tree and updates what is tracked; false if that failed.
    pub(super) async fn list_source(&mut self, zfs: &Zfs, job: &Job) -> bool {
        self.changes.clear();
        // Read before the listing, so a change during it shows as a newer value later.
        let changed = if zfs.capabilities().snapshots_changed {
            let read_at = unix_secs();
            zfs.snapshots_changed(&job.source, job.recursive)
                .await
                .ok()
                .map(|v| (v, read_at))
        } else {
            None
        };
        // The first listing says which snapshots are held, for the tidy of stale holds
        // each dataset gets before its first step here (one column more per item, which
        // later listings need not pay).
        let listed_at = Instant::now();
        let first = self.listed_at.is_none();
        let listing = match first {
            true => {
                zfs.clone()
                    .listing_holds()
                    .list(&job.source, job.recursive)
                    .await
            }
            false => zfs.list(&job.source, job.recursive).await,
        };
        let sources = match listing {
            Ok(s) if s.is_empty() => {
                self.error(
                    &job.source,
                    format!("source dataset {} does not exist", job.source),
                );
                return false;
            }
            Ok(s) => s,
            Err(e) => {
                self.error(&job.source, format!("listing the source: {e}"));
                return false;
            }
        };
        let all_names = sources.iter().map(|s| s.name.clone()).collect();
        let sources = match job.select(zfs, sources, |s| &s.name).await {
            Ok(s) if s.is_empty() => {
                let e = ReplError::AllExcluded(job.source.to_string());
                self.error(&job.source, e.to_string());
                return false;
            }
            Ok(s) => s,
            Err(e) => {
                self.error(&job.source, format!("reading the filter's property: {e}"));
                return false;
            }
        };
        self.all_names = all_names;
        if let Some(tx) = &self.included {
            let _ = tx.send(Some(sources.iter().map(|s| s.name.clone()).collect()));
        }
        let mut seen = BTreeMap::new();
        for src in sources {
            let snaps = job.kept_snapshots(&src.snapshots);
            let mut tracked = match self.datasets.remove(&src.name) {
                Some(mut t) => {
                    t.listed(snaps);
                    t
                }
                None => match src.name.rebase(&job.source, &job.target) {
                    Ok(target) => Tracked::new(target, snaps),
                    Err(e) => {
                        self.error(&src.name, e.to_string());
                        continue;
                    }
                },
            };
            tracked.bookmarks = src.bookmarks.iter().map(to_info).collect();
            // Later listings do not ask: what the first said stays (the tidy adds this
            // process's own holds and looks only at snapshots that still exist).
            if src.held.is_some() {
                tracked.held = src.held;
            }
            seen.insert(src.name, tracked);
        }
        self.datasets = seen;
        self.listed_at = Some(Instant::now());
        if let Some((values, read_at)) = changed {
            self.changes.record(&values, read_at, listed_at, |_| true);
        }
        true
    }

    /// Where zfs has `snapshots_changed`: lists only the source datasets whose snapshots
    /// changed since their last listing (often none: one cheap zfs call). False if that
    /// cannot be done or the set of datasets changed: then list everything.
    pub(super) async fn list_changed(&mut self, zfs: &Zfs, job: &Job) -> bool {
        if !zfs.capabilities().snapshots_changed {
            return false;
        }
        let read_at = unix_secs();
        let current = match zfs.snapshots_changed(&job.source, job.recursive).await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "cannot read snapshots_changed; listing everything");
                return false;
            }
        };
        let names: std::collections::BTreeSet<&DatasetName> =
            current.iter().map(|(n, _)| n).collect();
        if !names.iter().copied().eq(self.all_names.iter()) {
            return false;
        }
        // Excluded datasets change too; only the replicated ones need listing.
        let (told, datasets) = (self.told.clone(), &self.datasets);
        let quiet = |name: &DatasetName, since| {
            told.as_ref().is_some_and(|t| {
                t.silent_since(since, name.as_str(), |snap| {
                    datasets
                        .get(name)
                        .is_some_and(|d| d.snapshots.iter().any(|s| s.name == snap))
                })
            })
        };
        let stale: Vec<DatasetName> = self
            .changes
            .stale(&current, quiet)
            .into_iter()
            .filter(|n| self.datasets.contains_key(*n))
            .cloned()
            .collect();
        let listed_at = Instant::now();
        if !stale.is_empty() {
            let Ok(listed) = zfs.list_each(&stale).await else {
                return false;
            };
            for (name, states) in stale.iter().zip(listed) {
                let (Some(state), Some(t)) = (
                    states.into_iter().find(|s| &s.name == name),
                    self.datasets.get_mut(name),
                ) else {
                    return false;
                };
                t.listed(job.kept_snapshots(&state.snapshots));
                t.bookmarks = state.bookmarks.iter().map(to_info).collect();
                if state.held.is_some() {
                    t.held = state.held;
                }
            }
        }
        debug!(stale = stale.len(), "source listed by snapshots_changed");
        let stale: std::collections::HashSet<_> = stale.into_iter().collect();
        self.changes
            .record(&current, read_at, listed_at, |n| stale.contains(n));
        true
    }

    /// Starts the work that can start: a step for every dataset that is not in flight and
    /// has something to send. With `plan`, it may list the source and the destination
    /// first (a tick, or a new snapshot); without (a step just ended) it only continues
    /// datasets whose next step needs no listing, so a dataset that keeps failing does not
    /// cause a listing per finished step. Returns true if the connection was lost.
    pub(super) async fn schedule(
        &mut self,
        w: Work<'_>,
        created: Vec<String>,
        plan: bool,
        steps: &mut JoinSet<(DatasetName, Done)>,
    ) -> bool {
        let Work {
            sender,
            zfs,
            job,
            opts,
            ..
        } = w;
        for name in &created {
            for t in self.datasets.values_mut() {
                t.created(name);
            }
        }
        let by_name = sender.session().version >= 2;
        let mut early = None;
        if plan {
            // Snapshots made by something else (sanoid, a cron job) must be looked for on
            // every tick; zq's own are known without listing.
            let foreign = opts.snapshot_every.is_none();
            let mut must_list = self.listed_at.is_none()
                || self
                    .datasets
                    .iter()
                    .any(|(s, t)| !self.in_flight.contains(s) && t.needs_listing(by_name));
            // A property that excludes datasets can change without any snapshot changing:
            // read it again with a full listing every REFRESH.
            if job.filter.exclude_property.is_some()
                && self.listed_at.is_some_and(|t| t.elapsed() >= REFRESH)
            {
                must_list = true;
            }
            if !must_list && foreign {
                // A tick that fired late, right after a long pass (a listing of 1,000
                // datasets takes seconds), would only list the same again.
                let fresh = !std::mem::take(&mut self.woken)
                    && self.listed_at.is_some_and(|t| t.elapsed() < opts.every / 2);
                must_list = !fresh && !self.list_changed(zfs, job).await;
            }
            if !must_list && !foreign && self.listed_at.is_some_and(|t| t.elapsed() >= REFRESH) {
                // zq makes the snapshots, so a refresh only has to notice datasets created
                // or destroyed: list names alone, and everything only if they changed.
                match zfs.list_datasets(&job.source, job.recursive).await {
                    Ok(names) => {
                        let names: std::collections::BTreeSet<_> = names.into_iter().collect();
                        if names == self.all_names {
                            self.listed_at = Some(Instant::now());
                        } else {
                            must_list = true;
                        }
                    }
                    Err(_) => must_list = true,
                }
            }
            if must_list {
                // At start-up (or a dataset without a cursor) the destination's listing
                // is needed too: take it while the source is listed, not after.
                let uncursored = self.datasets.is_empty()
                    || self
                        .datasets
                        .iter()
                        .any(|(s, t)| t.cursor.is_none() && !self.in_flight.contains(s));
                if uncursored {
                    let remote = sender.list_remote(&job.target, job.recursive);
                    let (listed, remote) = tokio::join!(self.list_source(zfs, job), remote);
                    if !listed {
                        return false;
                    }
                    // The pass's listings end with the later of the two (at 1,000
                    // datasets the destination's can end seconds after the source's): a
                    // tick that fires at once need not list the source again.
                    self.listed_at = Some(Instant::now());
                    early = Some(remote);
                } else if !self.list_source(zfs, job).await {
                    return false;
                }
            }
        }
        // Datasets that may start now: not in flight, and not waiting for their parent's
        // target to be created (children are created after their parent).
        let candidates: Vec<&DatasetName> = self
            .datasets
            .keys()
            .filter(|src| !self.in_flight.contains(*src))
            .collect();
        // Only datasets without a cursor need the destination's listing: one round trip.
        // A child waiting for its parent's step needs it too if the parent's target may
        // exist already (then the listing says so, and both go now).
        let needs_listing = candidates.iter().any(|s| {
            self.datasets.get(*s).is_some_and(|t| t.cursor.is_none())
                && !s.parent().is_some_and(|p| self.in_flight.contains(&p))
        });
        let listing: Option<(HashMap<String, Vec<SnapshotInfo>>, Listing)> =
            if plan && needs_listing {
                let remote = match early.take() {
                    Some(r) => r,
                    None => sender.list_remote(&job.target, job.recursive).await,
                };
                match remote {
                    Ok(mut r) => Some((
                        std::mem::take(&mut r.datasets)
                            .into_iter()
                            .map(|d| (d.name, d.snapshots))
                            .collect(),
                        r,
                    )),
                    Err(e) => {
                        let lost = e.connection_lost();
                        self.error(
                            &job.target,
                            format!("listing the destination: {}", chain(&e)),
                        );
                        return lost;
                    }
                }
            } else {
                None
            };
        let ready: Vec<DatasetName> = candidates
            .into_iter()
            .filter(|src| !self.parent_pending(src, listing.as_ref().map(|(d, _)| d)))
            .cloned()
            .collect();

        for src in ready {
            let Some(t) = self.datasets.get(&src) else {
                continue;
            };
            // Right after a step, continue only what needs no listing and did not just
            // fail: a failing dataset is retried on the next tick, not in a loop.
            if !plan && (t.error.is_some() || t.needs_listing(by_name)) {
                continue;
            }
            let (target, options) = (t.target.clone(), job.options);
            let (sender, lanes) = (sender.clone(), w.lanes.clone());
            let task_src = src.clone();
            let task = match t.next(by_name) {
                Next::UpToDate => continue,
                Next::SendNew { from, new } => steps.spawn(async move {
                    let src = task_src;
                    let mut slot = Slot::take(&lanes).await;
                    let r = sender
                        .send_new(&src, &target, &from, &new, options.newest_only, &mut slot)
                        .await;
                    (src, Done::New(new, r))
                }),
                Next::Plan => {
                    let (snapshots, newest) = (t.snapshots.clone(), t.snapshots.last().cloned());
                    let (bookmarks, held) = (t.bookmarks.clone(), t.held.clone());
                    let (dest, resume) = match (&t.cursor, &listing) {
                        (Some(c), _) => (Some(vec![c.clone()]), None),
                        (None, Some((dest, listing))) => {
                            (dest.get(target.as_str()).cloned(), listing.kept(&target))
                        }
                        // Needs the destination's listing: on the next tick.
                        (None, None) => continue,
                    };
                    steps.spawn(async move {
                        let src = task_src;
                        let mut slot = Slot::take(&lanes).await;
                        let mut outcome = sender
                            .replicate_dataset(
                                &src,
                                &snapshots,
                                &bookmarks,
                                held.as_deref(),
                                &target,
                                dest.as_deref(),
                                resume.as_ref(),
                                options,
                                &mut slot,
                            )
                            .await;
                        if let Some(ahead) = receiver_ahead(&outcome, &snapshots) {
                            // E.g. the receiver committed our last step but died before its
                            // verdict reached us: continue from where it really is.
                            debug!(dataset = %src, at = %ahead.name, "receiver is ahead of the cursor");
                            outcome = sender
                                .replicate_dataset(
                                    &src,
                                    &snapshots,
                                    &bookmarks,
                                    None,
                                    &target,
                                    Some(&[ahead]),
                                    None,
                                    options,
                                    &mut slot,
                            )
                                .await;
                        }
                        (src, Done::Planned(newest, outcome))
                    })
                }
            };
            self.tasks.insert(task.id(), src.clone());
            self.in_flight.insert(src);
        }
        false
    }

    /// Whether `src`'s parent is tracked and its target may not exist yet: its step is
    /// running, or it has never been replicated here (no cursor) and `dest`, the
    /// destination's listing if one was taken, does not show its target with snapshots.
    pub(super) fn parent_pending(
        &self,
        src: &DatasetName,
        dest: Option<&HashMap<String, Vec<SnapshotInfo>>>,
    ) -> bool {
        src.parent().is_some_and(|p| {
            self.datasets.get(&p).is_some_and(|t| {
                let replicated = || {
                    dest.and_then(|d| d.get(t.target.as_str()))
                        .is_some_and(|snaps| !snaps.is_empty())
                };
                self.in_flight.contains(&p) || (t.cursor.is_none() && !replicated())
            })
        })
    }

    /// Records a finished step task; true if the connection is lost.
    pub(super) fn finished(
        &mut self,
        done: Result<(TaskId, (DatasetName, Done)), JoinError>,
    ) -> bool {
        match done {
            Ok((id, (src, done))) => {
                self.recorded_at = Some(Instant::now());
                self.tasks.remove(&id);
                self.in_flight.remove(&src);
                self.record(&src, done)
            }
            Err(e) => {
                if let Some(src) = self.tasks.remove(&e.id()) {
                    self.in_flight.remove(&src);
                    self.error(&src, format!("replication task failed: {e}"));
                }
                self.listed_at = None;
                false
            }
        }
    }

    /// Updates what is known of `src` after its work; true if the connection is lost.
    pub(super) fn record(&mut self, src: &DatasetName, done: Done) -> bool {
        let failure = match done {
            Done::New(new, Ok((committed, bytes))) => {
                debug!(dataset = %src, snapshot = new.last().map_or("", String::as_str), bytes, "replicated");
                if let Some(t) = self.datasets.get_mut(src) {
                    t.sent_new(&new, committed.guid, &committed.snapshots);
                    t.counts.steps += 1;
                    t.counts.bytes += bytes;
                }
                None
            }
            Done::Planned(
                newest,
                DatasetOutcome::Sent {
                    steps,
                    bytes,
                    resumed,
                    resumed_from,
                    ..
                },
            ) => {
                debug!(dataset = %src, snapshot = newest.as_ref().map_or("", |n| n.name.as_str()), bytes, resumed, "replicated");
                if let Some(t) = self.datasets.get_mut(src) {
                    t.caught_up(newest);
                    t.counts.steps += steps as u64;
                    t.counts.bytes += bytes;
                    if let Some(from) = resumed_from {
                        t.resumed.0 += 1;
                        t.resumed.1 += resumed;
                        t.resumed_from = Some(from);
                    }
                }
                None
            }
            Done::Planned(newest, DatasetOutcome::UpToDate) => {
                if let Some(t) = self.datasets.get_mut(src) {
                    t.caught_up(newest);
                }
                None
            }
            Done::New(_, Err(e)) | Done::Planned(_, DatasetOutcome::Failed(e)) => Some(e),
        };
        let Some(e) = failure else {
            if self.errors.remove(src).is_some() {
                info!(dataset = %src, "replicating again");
            }
            return false;
        };
        if let Some(t) = self.datasets.get_mut(src) {
            // List the destination next time: the receiver may not be where we thought
            // (a stale cursor), or may hold the step's spool, to be resumed (its listing
            // says so).
            t.cursor = None;
            t.error = Some(chain(&e));
            t.counts.failures += 1;
        }
        // Whatever failed, the next tick starts from a fresh source listing.
        self.listed_at = None;
        let lost = e.connection_lost();
        self.error(src, chain(&e));
        lost
    }

    pub(super) fn error(&mut self, dataset: &DatasetName, message: String) {
        if self.errors.get(dataset) != Some(&message) {
            warn!(%dataset, error = %message, "replication failed; will retry");
            self.errors.insert(dataset.clone(), message);
        }
    }
}

/// If `outcome` is the receiver refusing a stale cursor while its newest snapshot is one of
/// the source's (it is ahead on the same chain, not diverged), that snapshot.
fn receiver_ahead(outcome: &DatasetOutcome, src: &[SnapshotInfo]) -> Option<SnapshotInfo> {
    let DatasetOutcome::Failed(ReplError::Remote(e)) = outcome else {
        return None;
    };
    if e.kind != zq_proto::ErrorKind::Diverged {
        return None;
    }
    let newest = e.receiver_newest.as_ref()?;
    src.iter().find(|s| s.guid == newest.guid).cloned()
}

/// The wall clock in whole UTC seconds, as zfs stores `snapshots_changed`.
fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(guids: &[u64]) -> Vec<SnapshotInfo> {
        guids
            .iter()
            .map(|&g| SnapshotInfo {
                name: format!("s{g}"),
                guid: g,
                createtxg: g,
            })
            .collect()
    }

    fn refused(kind: zq_proto::ErrorKind, newest: Option<u64>) -> DatasetOutcome {
        let mut e = zq_proto::WireError::new(kind, "refused");
        e.receiver_newest = newest.map(|guid| zq_proto::SnapRef {
            name: format!("s{guid}"),
            guid,
        });
        DatasetOutcome::Failed(ReplError::Remote(e))
    }

    #[test]
    fn receiver_ahead_on_the_same_chain_is_followed_not_treated_as_divergence() {
        use zq_proto::ErrorKind::*;
        let src = state(&[1, 2, 3]);
        let ahead = receiver_ahead(&refused(Diverged, Some(2)), &src).unwrap();
        assert_eq!(ahead.guid, 2);
        // A snapshot the source does not have: real divergence.
        assert!(receiver_ahead(&refused(Diverged, Some(9)), &src).is_none());
        assert!(receiver_ahead(&refused(Diverged, None), &src).is_none());
        assert!(receiver_ahead(&refused(BaseMissing, Some(2)), &src).is_none());
        assert!(receiver_ahead(&DatasetOutcome::UpToDate, &src).is_none());
    }

    #[test]
    fn only_events_a_listing_may_lack_break_the_silence() {
        use zq_store::SnapshotEvent::*;
        let told = Told::default();
        let listed = |snap: &str| snap == "a" || snap == "b";
        let before = Instant::now();
        // Not following: nothing is vouched for.
        assert!(!told.silent_since(before, "p/fs", listed));
        told.following.store(true, Ordering::Relaxed);
        told.event(Made("p/fs@b".into()));
        told.event(Made("p/other@c".into()));
        told.event(Destroyed("p/fs@old".into()));
        // The snapshot made is in the listing, the others are not the dataset's or gone.
        assert!(told.silent_since(before, "p/fs", listed));
        told.event(Made("p/fs@c".into()));
        assert!(!told.silent_since(before, "p/fs", listed));
        let later = Instant::now();
        assert!(told.silent_since(later, "p/fs", listed));
        told.event(Destroyed("p/fs@a".into()));
        assert!(!told.silent_since(later, "p/fs", listed));
        let latest = Instant::now();
        told.event(Destroyed("p/fs".into()));
        assert!(!told.silent_since(latest, "p/fs", listed));
        let last = Instant::now();
        told.event(Lost);
        assert!(!told.silent_since(last, "p/elsewhere", listed));
    }
}
