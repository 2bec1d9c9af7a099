//! Snapshots as OpenZFS creates them: `zpool events -f -v POOL` prints a history event for
//! every snapshot (and every destroy, hold, bookmark …) in the pool as its transaction
//! group syncs. A daemon that replicates snapshots another tool makes learns of each one
//! at once, instead of at its next tick.
//!
//! Only `history_internal_name` "snapshot" and "destroy" events of datasets at or below
//! the root count: zq's own holds, releases and bookmarks are events too, and would wake
//! the daemon for nothing. The first lines are the pool's recent events (the kernel keeps
//! a few hundred); they wake the daemon once, which is harmless. Events the kernel's queue
//! lost ("dropped N events") count too: any of them may have been a snapshot.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::name::DatasetName;

/// The longest line read from `zpool events`: an event's values are names and numbers.
const MAX_LINE: usize = 64 * 1024;

/// A running `zpool events -f -v` for the pool of one dataset tree.
#[derive(Debug)]
pub struct SnapshotEvents {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    filter: EventFilter,
}

impl SnapshotEvents {
    /// Starts following the events of `root`'s pool with the `zpool` program `zpool`.
    pub fn follow(zpool: &std::path::Path, root: &DatasetName) -> std::io::Result<Self> {
        let pool = root.as_str().split('/').next().unwrap_or(root.as_str());
        let mut child = Command::new(zpool)
            .args(["events", "-f", "-v", "-H", pool])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("stdout was not captured"))?;
        Ok(SnapshotEvents {
            _child: child,
            lines: BufReader::new(stdout).lines(),
            filter: EventFilter::new(root),
        })
    }

    /// Waits for the next snapshot created or destroyed at or below the root. `None` once
    /// `zpool events` has ended (or printed something that is not an event list): the
    /// caller then relies on its ticks alone.
    pub async fn next(&mut self) -> Option<SnapshotEvent> {
        loop {
            let line = self.lines.next_line().await.ok()??;
            if line.len() > MAX_LINE {
                return None;
            }
            if let Some(event) = self.filter.line(&line) {
                return Some(event);
            }
        }
    }
}

/// What one event said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotEvent {
    /// This snapshot (`dataset@name`) was made.
    Made(String),
    /// This snapshot, or dataset (no `@`), was destroyed.
    Destroyed(String),
    /// The kernel's queue overflowed and lost events, which may have been anything.
    Lost,
}

impl SnapshotEvent {
    /// The dataset and snapshot name the event is about (`None` as the snapshot for a
    /// dataset destroyed, `None` altogether for lost events).
    pub fn names(&self) -> Option<(&str, Option<&str>)> {
        let (Self::Made(n) | Self::Destroyed(n)) = self else {
            return None;
        };
        Some(match n.split_once('@') {
            Some((ds, snap)) => (ds, Some(snap)),
            None => (n.as_str(), None),
        })
    }
}

/// Reads `zpool events -v -H` output line by line: a line that does not start with
/// white space begins an event, indented `key = value` lines follow.
#[derive(Debug)]
pub struct EventFilter {
    root: String,
    /// The event's `history_dsname`, if at or below the root (`Some(None)` if not).
    dataset: Option<Option<String>>,
    /// Its `history_internal_name`, if "snapshot" (true) or "destroy" (false).
    snapshot: Option<Option<bool>>,
}

impl EventFilter {
    pub fn new(root: &DatasetName) -> Self {
        EventFilter {
            root: root.as_str().to_string(),
            dataset: None,
            snapshot: None,
        }
    }

    /// Takes one line; true when it completes an event that counts, or says that events
    /// were lost (the kernel's queue overflowed): one of them may have been a snapshot.
    pub fn line(&mut self, line: &str) -> Option<SnapshotEvent> {
        if line.starts_with("dropped ") {
            self.dataset = None;
            self.snapshot = None;
            return Some(SnapshotEvent::Lost);
        }
        if !line.starts_with([' ', '\t']) {
            self.dataset = None;
            self.snapshot = None;
            return None;
        }
        let (key, value) = line.trim().split_once(" = ")?;
        let value = value.trim().trim_matches('"');
        match key {
            "history_dsname" => {
                self.dataset = Some(self.under_root(value).then(|| value.to_string()))
            }
            "history_internal_name" => {
                self.snapshot = Some(match value {
                    "snapshot" => Some(true),
                    "destroy" => Some(false),
                    _ => None,
                });
            }
            _ => return None,
        }
        let (Some(Some(_)), Some(Some(made))) = (&self.dataset, self.snapshot) else {
            return None;
        };
        // Once per event.
        let name = self.dataset.take().flatten()?;
        Some(match made {
            true => SnapshotEvent::Made(name),
            false => SnapshotEvent::Destroyed(name),
        })
    }

    /// Whether `name` (a dataset or a snapshot) is the root, below it, or its snapshot.
    fn under_root(&self, name: &str) -> bool {
        name.strip_prefix(self.root.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '@']))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As printed by OpenZFS 2.3.2 (`zpool events -v -H`), trimmed.
    const EVENTS: &str = "\
Dec  7 2026 07:03:44.624000000\tsysevent.fs.zfs.history_event
        class = \"sysevent.fs.zfs.history_event\"
        pool = \"ge\"
        history_dsname = \"ge/fs@a\"
        history_internal_str = \" \"
        history_internal_name = \"snapshot\"
        eid = 0x31

Dec  7 2026 07:03:46.740000000\tsysevent.fs.zfs.history_event
        class = \"sysevent.fs.zfs.history_event\"
        history_dsname = \"ge/fs\"
        history_internal_str = \"name=b creation_txg=9 target_snap=66 redact_obj=0\"
        history_internal_name = \"bookmark\"
        eid = 0x34

Dec  7 2026 07:03:46.912000000\tsysevent.fs.zfs.history_event
        history_dsname = \"ge/fsx@a\"
        history_internal_name = \"snapshot\"

Dec  7 2026 07:03:47.000000000\tsysevent.fs.zfs.history_event
        history_dsname = \"ge/fs/child@z\"
        history_internal_name = \"destroy\"
        history_internal_name = \"destroy\"

Dec  7 2026 07:03:48.000000000\tsysevent.fs.zfs.config_sync
        pool = \"ge\"
dropped 3 events
";

    fn counted(root: &str) -> usize {
        told(root).len()
    }

    fn told(root: &str) -> Vec<SnapshotEvent> {
        let mut f = EventFilter::new(&DatasetName::parse(root).unwrap());
        EVENTS.lines().filter_map(|l| f.line(l)).collect()
    }

    #[test]
    fn an_event_names_the_snapshot_made_or_destroyed() {
        use SnapshotEvent::*;
        assert_eq!(
            told("ge/fs"),
            [
                Made("ge/fs@a".into()),
                Destroyed("ge/fs/child@z".into()),
                Lost
            ]
        );
        assert_eq!(Made("ge/fs@a".into()).names(), Some(("ge/fs", Some("a"))));
        assert_eq!(Destroyed("ge/fs".into()).names(), Some(("ge/fs", None)));
        assert_eq!(Lost.names(), None);
    }

    #[test]
    fn snapshots_and_destroys_under_the_root_count_once_each() {
        // Plus one for the events lost, which may have been anyone's.
        assert_eq!(counted("ge/fs"), 2 + 1);
        assert_eq!(counted("ge"), 3 + 1);
        assert_eq!(counted("ge/fs/child"), 1 + 1);
        assert_eq!(counted("ge/other"), 1);
    }
}
