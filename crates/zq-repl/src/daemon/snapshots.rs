//! The snapshot loop: `zq_<UTC time>` snapshots of the source every `--snapshot-every`,
//! each announced to the supervisor so that it replicates right after.

use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};
use zq_store::{DatasetName, Zfs};

use crate::sender::Job;

/// The name of a snapshot created now: `zq_2026-11-22T02:26:42.123Z`.
pub fn snapshot_name(now: SystemTime) -> String {
    format!("zq_{}", humantime::format_rfc3339_millis(now))
}

/// Creates `zq_<time>` snapshots every `every`: of the whole tree at once (`zfs snapshot
/// -r`), or with a dataset filter, of the datasets it keeps as of the last listing (none
/// before the first), so excluded datasets do not collect snapshots nothing prunes.
pub(crate) async fn snapshot_loop(
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
}
