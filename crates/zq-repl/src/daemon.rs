//! The daemon: for one job, a snapshot loop and a replication loop over one persistent
//! connection that is re-established with capped exponential backoff when it breaks.
//!
//! Steady state needs no remote listing: the daemon remembers, per dataset, the snapshot the
//! receiver last committed (its cursor) and sends the next incremental from it. The receiver
//! re-checks the base; if the cursor is stale it refuses, the cursor is dropped, and the
//! next iteration lists the destination and re-plans. Datasets whose target does not exist
//! yet are created one after the other, parents first; all other steps run in parallel up
//! to `max_steps`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};
use zq_proto::SnapshotInfo;
use zq_store::{DatasetName, DatasetState, Zfs};

use crate::retention::{prunable, ZQ_PREFIX};
use crate::sender::{Job, Sender};
use crate::{to_info, DatasetOutcome, ReplError};

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Replicate at least this often.
    pub every: Duration,
    /// Also create a snapshot `zq_<UTC time>` of the source this often (`-r` with a
    /// recursive job), and replicate right after each.
    pub snapshot_every: Option<Duration>,
    /// Wait a random time up to this before the first iteration (fleets start together).
    pub jitter: Duration,
    /// Most replication steps in flight at once.
    pub max_steps: usize,
    /// Retention: keep this many of the newest `zq_` snapshots on both sides (never the
    /// common base or anything newer); `None` keeps everything.
    pub keep_last: Option<usize>,
}

/// What the retention loop needs to know of the replication loop: each source dataset's
/// target and the snapshot the receiver last committed.
type Cursors = HashMap<DatasetName, (DatasetName, SnapshotInfo)>;

/// Opens a connection and runs the handshake; called again after a failure.
pub type Connect =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Sender, String>> + Send>> + Send + Sync>;

/// Exponential backoff between reconnection attempts, capped, with jitter.
#[derive(Debug)]
struct Backoff {
    failures: u32,
    next_try: Instant,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Backoff {
            failures: 0,
            next_try: Instant::now(),
        }
    }

    fn failed(&mut self) -> Duration {
        let base = Self::FIRST
            .saturating_mul(1 << self.failures.min(10))
            .min(Self::CAP);
        self.failures += 1;
        // Up to 25% jitter so a fleet does not reconnect in lockstep.
        let delay = base + pseudo_random(base / 4);
        self.next_try = Instant::now() + delay;
        delay
    }

    fn succeeded(&mut self) {
        self.failures = 0;
    }
}

/// A pseudo-random duration in `0..max` (enough for jitter; not for anything else).
fn pseudo_random(max: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let max = max.as_nanos().max(1) as u64;
    Duration::from_nanos(u64::from(nanos).wrapping_mul(2654435761) % max)
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
    zfs: Zfs,
    connect: Connect,
    mut shutdown: watch::Receiver<bool>,
) {
    let snapshot_made = Arc::new(Notify::new());
    let mut snapshots = None;
    if let Some(every) = opts.snapshot_every {
        snapshots = Some(tokio::spawn(snapshot_loop(
            zfs.clone(),
            job.clone(),
            every,
            snapshot_made.clone(),
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
    let mut retention = None;
    if let Some(keep) = opts.keep_last {
        let every = (opts.every * 5).max(Duration::from_secs(5));
        retention = Some(tokio::spawn(retention_loop(
            zfs.clone(),
            keep,
            every,
            cursors_rx,
            conn_rx,
            shutdown.clone(),
        )));
    }
    let mut tick = tokio::time::interval(opts.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sender: Option<Arc<Sender>> = None;
    let mut backoff = Backoff::new();
    let mut state = State::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = snapshot_made.notified() => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
        let s = match &sender {
            Some(s) => s.clone(),
            None if Instant::now() < backoff.next_try => continue,
            None => match connect().await {
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
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot reach the receiver");
                    continue;
                }
            },
        };
        let lost = {
            let iteration = state.iterate(&s, &zfs, &job, &opts);
            tokio::pin!(iteration);
            tokio::select! {
                lost = &mut iteration => lost,
                _ = shutdown.changed() => {
                    info!("stopping: letting the steps in flight finish");
                    let _ = tokio::time::timeout(Duration::from_secs(30), &mut iteration).await;
                    break;
                }
            }
        };
        let _ = cursors_tx.send(state.cursors.clone());
        if lost {
            let delay = backoff.failed();
            warn!(
                retry_in_ms = delay.as_millis() as u64,
                "connection lost; reconnecting"
            );
            sender = None;
            let _ = conn_tx.send(None);
        }
    }
    for t in [snapshots, retention].into_iter().flatten() {
        t.abort();
    }
    drop(sender);
    info!("daemon stopped");
}

async fn snapshot_loop(
    zfs: Zfs,
    job: Job,
    every: Duration,
    made: Arc<Notify>,
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
        match zfs.snapshot(&snap, job.recursive).await {
            Ok(()) => {
                debug!(snapshot = %snap, "created");
                made.notify_one();
            }
            Err(e) => warn!(snapshot = %snap, error = %e, "cannot create snapshot"),
        }
    }
}

/// Applies retention to both sides of every dataset with a cursor, every `every`. A failure
/// is logged and retried on the next pass; replication never waits for it.
async fn retention_loop(
    zfs: Zfs,
    keep: usize,
    every: Duration,
    cursors: watch::Receiver<Cursors>,
    conn: watch::Receiver<Option<Arc<Sender>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let keep_u32 = u32::try_from(keep).unwrap_or(u32::MAX);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let cursors = cursors.borrow().clone();
        let sender = conn.borrow().clone();
        for (source, (target, base)) in cursors {
            match zfs.list(&source, false).await {
                Ok(state) => {
                    let snaps: Vec<_> = state
                        .first()
                        .map(|d| d.snapshots.iter().map(to_info).collect())
                        .unwrap_or_default();
                    for s in prunable(&snaps, ZQ_PREFIX, keep, base.guid) {
                        let destroyed = match source.snapshot(&s.name) {
                            Ok(snap) => {
                                zfs.destroy_snapshot(&snap).await.map_err(|e| e.to_string())
                            }
                            Err(e) => Err(e.to_string()),
                        };
                        if let Err(e) = destroyed {
                            warn!(dataset = %source, snapshot = %s.name, error = %e, "retention: cannot destroy");
                        }
                    }
                }
                Err(e) => warn!(dataset = %source, error = %e, "retention: cannot list"),
            }
            if let Some(sender) = &sender {
                if let Err(e) = sender.prune_remote(&target, keep_u32, base.guid).await {
                    warn!(dataset = %target, error = %chain(&e), "retention on the receiver failed");
                }
            }
        }
    }
}

/// What the daemon knows per source dataset.
#[derive(Debug, Default)]
struct State {
    /// Per source dataset: its target and the snapshot the receiver last committed.
    cursors: Cursors,
    /// The last error logged per dataset (to log a persisting error once).
    errors: HashMap<DatasetName, String>,
}

impl State {
    /// One pass over the job. Returns true if the connection was lost.
    async fn iterate(
        &mut self,
        sender: &Arc<Sender>,
        zfs: &Zfs,
        job: &Job,
        opts: &DaemonOptions,
    ) -> bool {
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
        // Only datasets without a cursor need the destination's listing: one round trip.
        let listing: HashMap<String, Vec<SnapshotInfo>> =
            if sources.iter().any(|s| !self.cursors.contains_key(&s.name)) {
                match sender.list_remote(&job.target, job.recursive).await {
                    Ok(r) => r
                        .datasets
                        .into_iter()
                        .map(|d| (d.name, d.snapshots))
                        .collect(),
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
                HashMap::new()
            };

        let permits = Arc::new(Semaphore::new(opts.max_steps.max(1)));
        let mut steps = JoinSet::new();
        let mut lost = false;
        for src in sources {
            let newest = src.snapshots.last().map(to_info);
            let cursor = self.cursors.get(&src.name).map(|(_, c)| c);
            if let (Some(n), Some(c)) = (&newest, cursor) {
                if n.guid == c.guid {
                    continue;
                }
            }
            let target = match src.name.rebase(&job.source, &job.target) {
                Ok(t) => t,
                Err(e) => {
                    self.error(&src.name, e.to_string());
                    continue;
                }
            };
            let dest = match cursor {
                Some(c) => Some(vec![c.clone()]),
                None => listing.get(target.as_str()).cloned(),
            };
            if dest.is_none() {
                // Creates the target: now, in order, so parents exist before children.
                let outcome = sender
                    .replicate_dataset(&src, &target, None, job.options)
                    .await;
                lost |= self.record(&src, &target, newest, outcome);
                continue;
            }
            let (sender, permits, options) = (sender.clone(), permits.clone(), job.options);
            steps.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let mut outcome = sender
                    .replicate_dataset(&src, &target, dest.as_deref(), options)
                    .await;
                if let Some(ahead) = receiver_ahead(&outcome, &src) {
                    // E.g. the receiver committed our last step but died before its verdict
                    // reached us: continue from where it really is.
                    debug!(dataset = %src.name, at = %ahead.name, "receiver is ahead of the cursor");
                    outcome = sender
                        .replicate_dataset(&src, &target, Some(&[ahead]), options)
                        .await;
                }
                (src, target, newest, outcome)
            });
        }
        while let Some(done) = steps.join_next().await {
            match done {
                Ok((src, target, newest, outcome)) => {
                    lost |= self.record(&src, &target, newest, outcome)
                }
                Err(e) => warn!(error = %e, "replication task failed"),
            }
        }
        lost
    }

    /// Updates the cursor and error of `src` after a step; true if the connection is lost.
    fn record(
        &mut self,
        src: &DatasetState,
        target: &DatasetName,
        newest: Option<SnapshotInfo>,
        outcome: DatasetOutcome,
    ) -> bool {
        match outcome {
            DatasetOutcome::Sent { .. } | DatasetOutcome::UpToDate => {
                if let DatasetOutcome::Sent {
                    newest: name,
                    bytes,
                    ..
                } = &outcome
                {
                    debug!(dataset = %src.name, snapshot = %name, bytes, "replicated");
                }
                if self.errors.remove(&src.name).is_some() {
                    info!(dataset = %src.name, "replicating again");
                }
                match newest {
                    Some(n) => self.cursors.insert(src.name.clone(), (target.clone(), n)),
                    None => self.cursors.remove(&src.name),
                };
                false
            }
            DatasetOutcome::Failed(e) => {
                if e.stale_destination() {
                    // The receiver is not where we thought: list it next time.
                    self.cursors.remove(&src.name);
                }
                let lost = e.connection_lost();
                self.error(&src.name, chain(&e));
                lost
            }
        }
    }

    fn error(&mut self, dataset: &DatasetName, message: String) {
        if self.errors.get(dataset) != Some(&message) {
            warn!(%dataset, error = %message, "replication failed; will retry");
            self.errors.insert(dataset.clone(), message);
        }
    }
}

/// If `outcome` is the receiver refusing a stale cursor while its newest snapshot is one of
/// the source's (it is ahead on the same chain, not diverged), that snapshot.
fn receiver_ahead(outcome: &DatasetOutcome, src: &DatasetState) -> Option<SnapshotInfo> {
    let DatasetOutcome::Failed(ReplError::Remote(e)) = outcome else {
        return None;
    };
    if e.kind != zq_proto::ErrorKind::Diverged {
        return None;
    }
    let newest = e.receiver_newest.as_ref()?;
    src.snapshots
        .iter()
        .find(|s| s.guid == newest.guid)
        .map(to_info)
}

fn chain(e: &ReplError) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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

    fn state(guids: &[u64]) -> DatasetState {
        DatasetState {
            name: DatasetName::parse("t/a").unwrap(),
            kind: zq_store::Kind::Filesystem,
            snapshots: guids
                .iter()
                .map(|&g| zq_store::Snapshot {
                    name: format!("s{g}"),
                    guid: g,
                    createtxg: g,
                })
                .collect(),
        }
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
    fn backoff_grows_to_a_cap() {
        let mut b = Backoff::new();
        let first = b.failed();
        assert!(first >= Backoff::FIRST && first <= Backoff::FIRST * 5 / 4);
        let mut last = first;
        for _ in 0..20 {
            last = b.failed();
        }
        assert!(
            last >= Backoff::CAP && last <= Backoff::CAP * 5 / 4,
            "{last:?}"
        );
        b.succeeded();
        assert!(b.failed() <= Backoff::FIRST * 5 / 4);
    }
}
