//! Snapshots as OpenZFS creates them: `zpool events -f -v POOL` prints a history event for
//! every snapshot (and every destroy, hold, bookmark …) in the pool as its transaction
//! group syncs. A daemon that replicates snapshots another tool makes learns of each one
//! at once, instead of at its next tick.
//!
//! Only `history_internal_name` "snapshot" and "destroy" events of datasets at or below
//! the root count: zq's own holds, releases and bookmarks are events too, and would wake
//! the daemon for nothing. The first lines are the pool's recent events (the kernel keeps
//! a few hundred); they wake the daemon once, which is harmless.

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
    pub async fn next(&mut self) -> Option<()> {
        loop {
            let line = self.lines.next_line().await.ok()??;
            if line.len() > MAX_LINE {
                return None;
            }
            if self.filter.line(&line) {
                return Some(());
            }
        }
    }
}

/// Reads `zpool events -v -H` output line by line: a line that does not start with
/// white space begins an event, indented `key = value` lines follow.
#[derive(Debug)]
pub struct EventFilter {
    root: String,
    dataset: Option<bool>,
    snapshot: Option<bool>,
}

impl EventFilter {
    pub fn new(root: &DatasetName) -> Self {
        EventFilter {
            root: root.as_str().to_string(),
            dataset: None,
            snapshot: None,
        }
    }

    /// Takes one line; true when it completes an event that counts.
    pub fn line(&mut self, line: &str) -> bool {
        if !line.starts_with([' ', '\t']) {
            self.dataset = None;
            self.snapshot = None;
            return false;
        }
        let Some((key, value)) = line.trim().split_once(" = ") else {
            return false;
        };
        let value = value.trim().trim_matches('"');
        match key {
            "history_dsname" => self.dataset = Some(self.under_root(value)),
            "history_internal_name" => {
                self.snapshot = Some(matches!(value, "snapshot" | "destroy"));
            }
            _ => return false,
        }
        let counts = self.dataset == Some(true) && self.snapshot == Some(true);
        if counts {
            // Once per event.
            self.dataset = None;
        }
        counts
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
";

    fn counted(root: &str) -> usize {
        let mut f = EventFilter::new(&DatasetName::parse(root).unwrap());
        EVENTS.lines().filter(|l| f.line(l)).count()
    }

    #[test]
    fn snapshots_and_destroys_under_the_root_count_once_each() {
        assert_eq!(counted("ge/fs"), 2);
        assert_eq!(counted("ge"), 3);
        assert_eq!(counted("ge/fs/child"), 1);
        assert_eq!(counted("ge/other"), 0);
    }
}
