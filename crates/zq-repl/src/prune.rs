//! Retention passes on both sides: the daemon's loop, which prunes each dataset down to
//! its policy behind the cursor the replication loop publishes, and a one-off pass
//! (`zq-send prune`) that finds each dataset's base by listing both sides.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, warn};
use zq_proto::SnapshotInfo;
use zq_store::{DatasetName, Zfs};

use crate::error::chain;
use crate::error::ReplError;
use crate::report::to_info;
use crate::retention::{prunable_by, remote_may_exceed, Policy, RemoteCount, Retention, ZQ_PREFIX};
use crate::sender::{Job, Sender};

/// What the retention loop needs to know of the replication loop: each source dataset's
/// target and the snapshot the receiver last committed.
pub(crate) type Cursors = HashMap<DatasetName, (DatasetName, SnapshotInfo)>;

/// Applies retention to both sides of every dataset with a cursor, at most every `every`.
/// A pass starts when no step is in flight (the cursors are published then), so
/// its `zfs list`/`destroy` calls fall in the idle time before the next snapshot instead of
/// competing with its replication; without that (receiver unreachable, or steps always
/// in flight) it still runs every `2 * every` with the cursors it last got. A failure is
/// logged and retried on the next pass;
/// replication never waits for it.
pub(crate) async fn retention_loop(
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
pub(crate) async fn destroy_local(
    zfs: &Zfs,
    dataset: &DatasetName,
    doomed: &[&SnapshotInfo],
) -> Vec<String> {
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
