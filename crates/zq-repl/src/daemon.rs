//! The daemon: for one job, a snapshot loop, a replication loop and a retention loop, each
//! its own task so that none stalls the others, over one persistent connection that is
//! re-established with capped exponential backoff when it breaks.
//!
//! Steady state lists neither side: the daemon remembers, per dataset, the source snapshots
//! it knows, the ones its snapshot loop created since, and the snapshot the receiver last
//! committed (its cursor), and sends the new snapshots on top of the cursor ([`tracked`]).
//! The receiver re-checks the base; if the cursor is stale it refuses, the cursor is dropped,
//! and the next tick lists both sides and re-plans. The source is listed at start,
//! after any failure, and every tick when something other than zq makes the snapshots
//! (where zfs has `snapshots_changed`, only the datasets it says changed, see
//! `daemon/changes.rs`); otherwise every [`REFRESH`] only its dataset names are listed,
//! to find datasets created or destroyed.
//!
//! There are no iterations that every dataset must finish: each dataset's step is a task
//! of its own, and a dataset whose step ends starts its next one at once if it has new
//! snapshots, so a large transfer (an initial replication, a burst of writes) delays only
//! its own dataset. At most `max_steps` steps transfer at once, plus as many bulk ones
//! (past 1 MiB) in a lane of their own ([`crate::lanes`]). A child whose parent's
//! target does not exist yet waits for the parent's first step.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::{Id as TaskId, JoinError, JoinSet};
use tracing::{debug, info, warn};
use zq_proto::SnapshotInfo;
use zq_store::{DatasetName, Zfs};

use crate::connector::Connector;
use crate::error::chain;
use crate::lanes::{Lanes, Slot};
use crate::retention::{prunable_by, remote_may_exceed, Policy, RemoteCount, Retention, ZQ_PREFIX};
use crate::retry::{pseudo_random, Backoff};
use crate::sender::{Job, Listing, Sender};
use crate::{to_info, DatasetOutcome, ReplError};

mod changes;
pub mod tracked;
use changes::Changes;
use tracked::{Next, Status, Tracked};

/// How often the daemon checks the source tree for datasets created or destroyed when
/// nothing failed: new child datasets of a recursive job are picked up within this time.
pub const REFRESH: Duration = Duration::from_secs(30);

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Replicate at least this often.
    pub every: Duration,
    /// Also create a snapshot `zq_<UTC time>` of the source this often (`-r` with a
    /// recursive job), and replicate right after each.
    pub snapshot_every: Option<Duration>,
    /// Wait a random time up to this before the first replication (fleets start together).
    pub jitter: Duration,
    /// Most replication steps in flight at once; steps that grow past 1 MiB move to a
    /// bulk lane with as many slots again ([`crate::lanes`]).
    pub max_steps: usize,
    /// Retention of `zq_` snapshots on each side (never the common base or anything
    /// newer); off on a side whose policy is off.
    pub retention: Retention,
    /// Where to write the status (`zq-send status` reads it): on every tick, and at most
    /// once a second as steps end.
    pub status_file: Option<PathBuf>,
    /// The receiver's address, for the status.
    pub receiver: String,
    /// Where scrapes of `--metrics-listen` read the status and the connection.
    pub metrics: Option<Arc<crate::metrics::DaemonMetrics>>,
    /// The steps in flight, as the senders report them ([`crate::SenderConfig::progress`]), for the
    /// status.
    pub progress: Option<Arc<crate::progress::Progress>>,
}

/// The name of a snapshot created now: `zq_2026-11-22T02:26:42.123Z`.
pub fn snapshot_name(now: SystemTime) -> String {
    format!("zq_{}", humantime::format_rfc3339_millis(now))
}

/// Runs the job until `shutdown` turns true, then lets the steps in flight finish (up to
/// 30 s) and returns.
pub async fn run(
    job: Job,
    opts: DaemonOptions,
    connector: Arc<Connector>,
    mut shutdown: watch::Receiver<bool>,
) {
    let zfs = connector.zfs().clone();
    let (made_tx, mut made) = mpsc::unbounded_channel();
    // The datasets the filter keeps, from the latest listing (for the snapshot loop).
    let (included_tx, included_rx) = watch::channel(None::<Vec<DatasetName>>);
    let mut snapshots = None;
    if let Some(every) = opts.snapshot_every {
        snapshots = Some(tokio::spawn(snapshot_loop(
            zfs.clone(),
            job.clone(),
            every,
            made_tx,
            included_rx,
            shutdown.clone(),
        )));
    }
    if !opts.jitter.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(pseudo_random(opts.jitter)) => {}
            _ = shutdown.changed() => return,
        }
    }
    let (cursors_tx, cursors_rx) = watch::channel(Cursors::new());
    let (conn_tx, conn_rx) = watch::channel(None::<Arc<Sender>>);
    if let Some(m) = &opts.metrics {
        m.watch_sender(conn_tx.subscribe());
    }
    let mut retention = None;
    if !opts.retention.is_off() {
        // Every 5 periods (at least 5 s), or less often when N is large: a pass lists the
        // whole source tree, which costs time per snapshot, and waiting until a quarter of N
        // new snapshots may exist loses nothing.
        let keep = [
            opts.retention.source.keep_last,
            opts.retention.target.keep_last,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(0);
        let fill =
            opts.snapshot_every.unwrap_or(opts.every) * u32::try_from(keep / 4).unwrap_or(u32::MAX);
        let every = (opts.every * 5).max(Duration::from_secs(5)).max(fill);
        retention = Some(tokio::spawn(retention_loop(
            zfs.clone(),
            job.clone(),
            opts.retention.clone(),
            every,
            cursors_rx,
            conn_rx,
            shutdown.clone(),
        )));
    }
    let mut tick = tokio::time::interval(opts.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sender: Option<Arc<Sender>> = None;
    let mut backoff = Backoff::reconnect();
    let mut state = State {
        included: Some(included_tx),
        ..State::default()
    };
    let mut created = Vec::new();
    // Every dataset's step runs as its own task; a dataset whose step ends starts its next
    // one at once, without waiting for the others (a large transfer holds up nothing but
    // its own dataset).
    let mut steps: JoinSet<(DatasetName, Done)> = JoinSet::new();
    let lanes = Lanes::new(opts.max_steps);
    let mut status_written = Instant::now();
    loop {
        let mut lost = false;
        // A tick or a new snapshot may list (plan); a finished step only continues.
        let mut plan = true;
        tokio::select! {
            _ = tick.tick() => {}
            Some(name) = made.recv() => created.push(name),
            Some(done) = steps.join_next_with_id(), if !steps.is_empty() => {
                lost |= state.finished(done);
                plan = false;
            }
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
        while let Ok(name) = made.try_recv() {
            created.push(name);
        }
        while let Some(done) = steps.try_join_next_with_id() {
            lost |= state.finished(done);
        }
        // A step that lost its connection may have run on an earlier one.
        if lost && sender.as_ref().is_some_and(|s| !s.is_connected()) {
            sender = None;
            disconnected(&mut backoff, &conn_tx);
        }
        let s = match &sender {
            Some(s) => s.clone(),
            None if Instant::now() < backoff.next_try() => {
                state.write_status(&opts, false);
                continue;
            }
            None => match connector.connect().await {
                Ok(s) => {
                    info!("connected to the receiver");
                    backoff.succeeded();
                    let s = Arc::new(s);
                    sender = Some(s.clone());
                    let _ = conn_tx.send(Some(s.clone()));
                    s
                }
                Err(e) => {
                    let delay = backoff.failed();
                    warn!(error = %chain(&e), retry_in = %humantime::format_duration(delay), "cannot reach the receiver");
                    state.write_status(&opts, false);
                    continue;
                }
            },
        };
        let work = Work {
            sender: &s,
            zfs: &zfs,
            job: &job,
            opts: &opts,
            lanes: &lanes,
        };
        let lost = {
            let schedule = state.schedule(work, std::mem::take(&mut created), plan, &mut steps);
            tokio::pin!(schedule);
            tokio::select! {
                lost = &mut schedule => lost,
                _ = shutdown.changed() => break,
            }
        };
        // A step that lost its connection may have run on an earlier one.
        if lost && sender.as_ref().is_some_and(|s| !s.is_connected()) {
            sender = None;
            disconnected(&mut backoff, &conn_tx);
        }
        if state.in_flight.is_empty() {
            // Retention starts when no step runs, so its zfs calls do not compete with them.
            let _ = cursors_tx.send(state.cursors());
        }
        // On every tick, and after steps at most once a second: with hundreds of datasets
        // steps end many times a second, and each write serializes every dataset.
        if plan || status_written.elapsed() >= Duration::from_secs(1) {
            state.write_status(&opts, sender.is_some());
            status_written = Instant::now();
        }
    }
    if !steps.is_empty() {
        info!("stopping: letting the steps in flight finish");
        let finish = async {
            while let Some(done) = steps.join_next_with_id().await {
                state.finished(done);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(30), finish).await;
        // Whatever is left is aborted: its zfs processes are killed (kill on drop).
        steps.shutdown().await;
    }
    // `zq-send status` then says stopped, not connected (`--remove-stopped` removes it).
    state.write_stopped(&opts);
    for t in [snapshots, retention].into_iter().flatten() {
        t.abort();
    }
    drop(sender);
    info!("daemon stopped");
}

/// The connection broke: wait before reconnecting, and tell the retention loop.
fn disconnected(backoff: &mut Backoff, conn: &watch::Sender<Option<Arc<Sender>>>) {
    let delay = backoff.failed();
    warn!(
        retry_in = %humantime::format_duration(delay),
        "connection lost; reconnecting"
    );
    let _ = conn.send(None);
}

/// What a scheduling pass works with.
#[derive(Clone, Copy)]
struct Work<'a> {
    sender: &'a Arc<Sender>,
    zfs: &'a Zfs,
    job: &'a Job,
    opts: &'a DaemonOptions,
    lanes: &'a Arc<Lanes>,
}

/// Creates `zq_<time>` snapshots every `every`: of the whole tree at once (`zfs snapshot
/// -r`), or with a dataset filter, of the datasets it keeps as of the last listing (none
/// before the first), so excluded datasets do not collect snapshots nothing prunes.
async fn snapshot_loop(
    zfs: Zfs,
    job: Job,
    every: Duration,
    made: mpsc::UnboundedSender<String>,
    included: watch::Receiver<Option<Vec<DatasetName>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let name = snapshot_name(SystemTime::now());
        let snap = match job.source.snapshot(&name) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot name a snapshot");
                continue;
            }
        };
        let created = if job.filter.is_empty() {
            zfs.snapshot(&snap, job.recursive).await
        } else {
            let Some(names) = included.borrow().clone() else {
                continue;
            };
            let snaps: Result<Vec<_>, _> = names.iter().map(|d| d.snapshot(&name)).collect();
            match snaps {
                Ok(snaps) => zfs.snapshot_each(&snaps).await,
                Err(e) => Err(e.into()),
            }
        };
        match created {
            Ok(()) => {
                debug!(snapshot = %snap, "snapshot created");
                if made.send(name).is_err() {
                    return;
                }
            }
            Err(e) => warn!(snapshot = %snap, error = %e, "cannot create snapshot"),
        }
    }
}

/// What the retention loop needs to know of the replication loop: each source dataset's
/// target and the snapshot the receiver last committed.
type Cursors = HashMap<DatasetName, (DatasetName, SnapshotInfo)>;

/// Applies retention to both sides of every dataset with a cursor, at most every `every`.
/// A pass starts when no step is in flight (the cursors are published then), so
/// its `zfs list`/`destroy` calls fall in the idle time before the next snapshot instead of
/// competing with its replication; without that (receiver unreachable, or steps always
/// in flight) it still runs every `2 * every` with the cursors it last got. A failure is
/// logged and retried on the next pass;
/// replication never waits for it.
async fn retention_loop(
    zfs: Zfs,
    job: Job,
    retention: Retention,
    every: Duration,
    mut cursors: watch::Receiver<Cursors>,
    conn: watch::Receiver<Option<Arc<Sender>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last = Instant::now();
    // Per target, what its last prune left (see `remote_may_exceed`).
    let mut remote: HashMap<DatasetName, RemoteCount> = HashMap::new();
    // Said once: the receiver cannot apply the target's policy.
    let mut unsupported_said = false;
    loop {
        tokio::select! {
            changed = cursors.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(every * 2) => {}
            _ = shutdown.changed() => return,
        }
        if last.elapsed() < every {
            continue;
        }
        last = Instant::now();
        let cursors = cursors.borrow().clone();
        if cursors.is_empty() {
            continue;
        }
        // One listing of the whole source tree per pass, not one per dataset.
        let listing = match zfs.list(&job.source, job.recursive).await {
            Ok(l) => l,
            Err(e) => {
                warn!(dataset = %job.source, error = %e, "retention: cannot list");
                continue;
            }
        };
        // Receivers older than protocol version 2 do not prune.
        let mut sender = conn
            .borrow()
            .clone()
            .filter(|s| s.session().version >= 2 && !retention.target.is_off());
        let now = std::time::SystemTime::now();
        for dataset in listing {
            let Some((target, base)) = cursors.get(&dataset.name) else {
                continue;
            };
            let source = &dataset.name;
            let snaps: Vec<_> = dataset.snapshots.iter().map(to_info).collect();
            let doomed = prunable_by(&snaps, ZQ_PREFIX, &retention.source, base.guid, now);
            destroy_local(&zfs, source, &doomed).await;
            let Some(s) = &sender else {
                continue;
            };
            // By count alone, a prune that cannot destroy anything is not asked for.
            if let Policy {
                keep_last: Some(keep),
                grid: None,
            } = retention.target
            {
                if !remote_may_exceed(
                    remote.get(target).copied(),
                    &snaps,
                    ZQ_PREFIX,
                    keep,
                    base.guid,
                ) {
                    continue;
                }
            }
            match s
                .prune_remote(target, &retention.target, base.guid, false)
                .await
            {
                Ok(p) => match p.remaining {
                    Some(remaining) => {
                        let count = RemoteCount {
                            remaining,
                            base_guid: base.guid,
                        };
                        remote.insert(target.clone(), count);
                    }
                    None => {
                        remote.remove(target);
                    }
                },
                Err(e) if e.connection_lost() => {
                    // The replication loop reconnects; this pass prunes only locally.
                    debug!(error = %chain(&e), "retention: the connection is gone");
                    sender = None;
                }
                Err(ReplError::Unsupported(why)) => {
                    if !unsupported_said {
                        warn!(%why, "retention on the receiver is off");
                        unsupported_said = true;
                    }
                    sender = None;
                }
                Err(e) => {
                    warn!(dataset = %target, error = %chain(&e), "retention on the receiver failed")
                }
            }
        }
    }
}

/// Destroys `doomed` snapshots of `dataset` here; returns the names destroyed. A held one
/// (another job's cursor, an operator's hold) is never destroyed: zfs refuses, and it is
/// kept; other failures are logged.
async fn destroy_local(zfs: &Zfs, dataset: &DatasetName, doomed: &[&SnapshotInfo]) -> Vec<String> {
    let mut destroyed = Vec::new();
    for s in doomed {
        let result = match dataset.snapshot(&s.name) {
            Ok(snap) => zfs.destroy_snapshot(&snap).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Err(e) if e.contains("dataset is busy") => {
                debug!(%dataset, snapshot = %s.name, "retention: held; kept");
            }
            Err(e) => {
                warn!(%dataset, snapshot = %s.name, error = %e, "retention: cannot destroy");
            }
            Ok(()) => destroyed.push(s.name.clone()),
        }
    }
    destroyed
}

/// What one retention pass did (or, in a dry run, would do) to a dataset and its target.
#[derive(Debug)]
pub struct Pruned {
    pub source: DatasetName,
    pub target: DatasetName,
    /// Snapshots of the source destroyed (would be; held ones are not listed).
    pub source_snapshots: Vec<String>,
    /// Snapshots of the target destroyed (would be), or why the receiver did not prune.
    pub target_snapshots: Result<Vec<String>, ReplError>,
    /// Why neither side was touched, if so (no common snapshot: nothing may go).
    pub skipped: Option<&'static str>,
}

/// One retention pass over `job` on both sides, outside a daemon (`zq-send prune`): the
/// base of each dataset is the newest source snapshot the target also has (by GUID);
/// without one, nothing of that dataset goes. With `dry_run`, nothing is destroyed on
/// either side: the result says what would be.
pub async fn prune_once(
    sender: &Sender,
    zfs: &Zfs,
    job: &Job,
    retention: &Retention,
    dry_run: bool,
) -> Result<Vec<Pruned>, ReplError> {
    let (sources, dest) = tokio::join!(
        zfs.list(&job.source, job.recursive),
        sender.list_remote(&job.target, job.recursive)
    );
    let sources = job.select(zfs, sources?, |s| &s.name).await?;
    let dest = dest?;
    let now = std::time::SystemTime::now();
    let mut out = Vec::new();
    for src in sources {
        let target = src.name.rebase(&job.source, &job.target)?;
        let snaps: Vec<SnapshotInfo> = src.snapshots.iter().map(to_info).collect();
        let on_target: std::collections::HashSet<u64> = dest
            .datasets
            .iter()
            .find(|d| d.name == target.as_str())
            .map(|d| d.snapshots.iter().map(|s| s.guid).collect())
            .unwrap_or_default();
        let Some(base) = snaps.iter().rev().find(|s| on_target.contains(&s.guid)) else {
            out.push(Pruned {
                source: src.name,
                target,
                source_snapshots: Vec::new(),
                target_snapshots: Ok(Vec::new()),
                skipped: Some("no snapshot in common with the target"),
            });
            continue;
        };
        let doomed = prunable_by(&snaps, ZQ_PREFIX, &retention.source, base.guid, now);
        let source_snapshots = if dry_run {
            let names: Vec<&str> = doomed.iter().map(|s| s.name.as_str()).collect();
            zfs.unheld(&src.name, &names)
                .await?
                .into_iter()
                .map(str::to_owned)
                .collect()
        } else {
            destroy_local(zfs, &src.name, &doomed).await
        };
        let target_snapshots = if retention.target.is_off() {
            Ok(Vec::new())
        } else {
            sender
                .prune_remote(&target, &retention.target, base.guid, dry_run)
                .await
                .map(|p| p.destroyed)
        };
        out.push(Pruned {
            source: src.name,
            target,
            source_snapshots,
            target_snapshots,
            skipped: None,
        });
    }
    Ok(out)
}

/// What the daemon knows, per source dataset (parents before children).
#[derive(Debug, Default)]
struct State {
    datasets: BTreeMap<DatasetName, Tracked>,
    /// When the source was last listed; `None` forces a listing.
    listed_at: Option<Instant>,
    /// Every dataset of the source tree at the last listing, excluded ones too: what
    /// `snapshots_changed` and refresh listings are compared with.
    all_names: std::collections::BTreeSet<DatasetName>,
    /// Where the datasets the filter keeps are published after each listing.
    included: Option<watch::Sender<Option<Vec<DatasetName>>>>,
    /// `snapshots_changed` as of the last listings (OpenZFS >= 2.2).
    changes: Changes,
    /// The last error logged per dataset (to log a persisting error once).
    errors: HashMap<DatasetName, String>,
    /// The last failure to write the status file (logged once, not every time).
    status_error: Option<String>,
    /// Datasets whose step task is running, and the tasks' datasets.
    in_flight: std::collections::HashSet<DatasetName>,
    tasks: HashMap<TaskId, DatasetName>,
}

/// The outcome of one dataset's step task.
enum Done {
    /// Sent the snapshots zq created, by name.
    New(Vec<String>, Result<(zq_proto::Committed, u64), ReplError>),
    /// Planned and ran steps.
    Planned(Option<SnapshotInfo>, DatasetOutcome),
}

impl State {
    fn cursors(&self) -> Cursors {
        self.datasets
            .iter()
            .filter_map(|(s, t)| Some((s.clone(), (t.target.clone(), t.cursor.clone()?))))
            .collect()
    }

    /// Lists the source tree and updates what is tracked; false if that failed.
    async fn list_source(&mut self, zfs: &Zfs, job: &Job) -> bool {
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
        let sources = match zfs.list(&job.source, job.recursive).await {
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
            let tracked = match self.datasets.remove(&src.name) {
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
            seen.insert(src.name, tracked);
        }
        self.datasets = seen;
        self.listed_at = Some(Instant::now());
        if let Some((values, read_at)) = changed {
            self.changes.record(&values, read_at);
        }
        true
    }

    /// Where zfs has `snapshots_changed`: lists only the source datasets whose snapshots
    /// changed since their last listing (often none: one cheap zfs call). False if that
    /// cannot be done or the set of datasets changed: then list everything.
    async fn list_changed(&mut self, zfs: &Zfs, job: &Job) -> bool {
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
        let stale: Vec<DatasetName> = self
            .changes
            .stale(&current)
            .into_iter()
            .filter(|n| self.datasets.contains_key(*n))
            .cloned()
            .collect();
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
            }
        }
        debug!(stale = stale.len(), "source listed by snapshots_changed");
        self.changes.record(&current, read_at);
        true
    }

    /// Starts the work that can start: a step for every dataset that is not in flight and
    /// has something to send. With `plan`, it may list the source and the destination
    /// first (a tick, or a new snapshot); without (a step just ended) it only continues
    /// datasets whose next step needs no listing, so a dataset that keeps failing does not
    /// cause a listing per finished step. Returns true if the connection was lost.
    async fn schedule(
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
                must_list = !self.list_changed(zfs, job).await;
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
            if must_list && !self.list_source(zfs, job).await {
                return false;
            }
        }
        // Datasets that may start now: not in flight, and not waiting for their parent's
        // target to be created (children are created after their parent).
        let ready: Vec<DatasetName> = self
            .datasets
            .keys()
            .filter(|src| !self.in_flight.contains(*src) && !self.parent_pending(src))
            .cloned()
            .collect();
        // Only datasets without a cursor need the destination's listing: one round trip.
        let needs_listing = ready
            .iter()
            .any(|s| self.datasets.get(s).is_some_and(|t| t.cursor.is_none()));
        let listing: Option<(HashMap<String, Vec<SnapshotInfo>>, Listing)> =
            if plan && needs_listing {
                match sender.list_remote(&job.target, job.recursive).await {
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
                    let (dest, resume) = match (&t.cursor, &listing) {
                        (Some(c), _) => (Some(vec![c.clone()]), None),
                        (None, Some((dest, listing))) => (
                            dest.get(target.as_str()).cloned(),
                            listing.token(&target).cloned(),
                        ),
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

    /// Whether `src`'s parent is tracked and its target may not exist yet: it has never
    /// been replicated (no cursor), or its step is running.
    fn parent_pending(&self, src: &DatasetName) -> bool {
        src.parent().is_some_and(|p| {
            self.datasets
                .get(&p)
                .is_some_and(|t| t.cursor.is_none() || self.in_flight.contains(&p))
        })
    }

    /// Records a finished step task; true if the connection is lost.
    fn finished(&mut self, done: Result<(TaskId, (DatasetName, Done)), JoinError>) -> bool {
        match done {
            Ok((id, (src, done))) => {
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
    fn record(&mut self, src: &DatasetName, done: Done) -> bool {
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
                    ..
                },
            ) => {
                debug!(dataset = %src, snapshot = newest.as_ref().map_or("", |n| n.name.as_str()), bytes, resumed, "replicated");
                if let Some(t) = self.datasets.get_mut(src) {
                    t.caught_up(newest);
                    t.counts.steps += steps as u64;
                    t.counts.bytes += bytes;
                    if resumed > 0 {
                        t.resumed.0 += 1;
                        t.resumed.1 += resumed;
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

    fn error(&mut self, dataset: &DatasetName, message: String) {
        if self.errors.get(dataset) != Some(&message) {
            warn!(%dataset, error = %message, "replication failed; will retry");
            self.errors.insert(dataset.clone(), message);
        }
    }

    /// Writes the status file, if any; a failure is logged, never fatal.
    fn write_status(&mut self, opts: &DaemonOptions, connected: bool) {
        self.write_status_at(opts, connected, None);
    }

    /// The last status of a daemon that stops: not connected, and when it stopped.
    fn write_stopped(&mut self, opts: &DaemonOptions) {
        let now = tracked::epoch_seconds(SystemTime::now());
        self.write_status_at(opts, false, Some(now));
    }

    fn write_status_at(&mut self, opts: &DaemonOptions, connected: bool, stopped_at: Option<f64>) {
        if opts.status_file.is_none() && opts.metrics.is_none() {
            return;
        }
        let now = SystemTime::now();
        // Steps in flight for a second or more, by dataset.
        let sending: HashMap<String, tracked::Sending> = opts
            .progress
            .as_ref()
            .map(|p| p.all())
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f.started.elapsed() >= Duration::from_secs(1))
            .filter_map(|f| {
                let (dataset, snapshot) = f.what.split_once('@')?;
                let s = tracked::Sending {
                    snapshot: snapshot.to_string(),
                    bytes: f.bytes,
                    estimate: f.estimate,
                    seconds: f.started.elapsed().as_secs_f64(),
                };
                Some((dataset.to_string(), s))
            })
            .collect();
        let status = Status {
            written_at: tracked::epoch_seconds(now),
            receiver: opts.receiver.clone(),
            connected,
            stopped_at,
            datasets: self
                .datasets
                .iter()
                .map(|(s, t)| tracked::DatasetStatus {
                    sending: sending.get(s.as_str()).cloned(),
                    ..t.status(s, now)
                })
                .collect(),
        };
        if let Some(m) = &opts.metrics {
            m.set_status(status.clone());
        }
        let Some(path) = &opts.status_file else {
            return;
        };
        match write_atomically(path, &status) {
            Ok(()) => {
                if self.status_error.take().is_some() {
                    info!(path = %path.display(), "status file written again");
                }
            }
            Err(e) => {
                let e = e.to_string();
                if self.status_error.as_ref() != Some(&e) {
                    warn!(path = %path.display(), error = %e, "cannot write the status file (set --status-file)");
                    self.status_error = Some(e);
                }
            }
        }
    }
}

/// Writes `value` as JSON to `path` through a temporary file and a rename, so a reader never
/// sees half a file.
fn write_atomically(path: &std::path::Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)?;
    std::fs::rename(&tmp, path)
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

    #[test]
    fn snapshot_names_are_valid_and_sortable() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_790_000_000_123);
        let name = snapshot_name(t);
        assert_eq!(name, "zq_2026-09-21T14:13:20.123Z");
        zq_store::name::validate_snapshot_component(&name).unwrap();
        let later = snapshot_name(t + Duration::from_millis(1));
        assert!(later > name);
    }

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
}
