//! The status file `zq-send status` reads, written atomically on every tick, as steps
//! end (at most once a second, and within a second of the last) and when the daemon stops.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::scheduler::State;
use super::DaemonOptions;
use crate::status;
use crate::status::Status;

impl State {
    /// Writes the status file, if any; a failure is logged, never fatal.
    pub(super) fn write_status(&mut self, opts: &DaemonOptions, connected: bool) {
        self.write_status_at(opts, connected, None);
    }

    /// The last status of a daemon that stops: not connected, and when it stopped.
    pub(super) fn write_stopped(&mut self, opts: &DaemonOptions) {
        let now = status::epoch_seconds(SystemTime::now());
        self.write_status_at(opts, false, Some(now));
    }

    pub(super) fn write_status_at(
        &mut self,
        opts: &DaemonOptions,
        connected: bool,
        stopped_at: Option<f64>,
    ) {
        if opts.status_file.is_none() && opts.metrics.is_none() {
            return;
        }
        let now = SystemTime::now();
        // Steps in flight for a second or more, by dataset.
        let sending: HashMap<String, status::Sending> = opts
            .progress
            .as_ref()
            .map(|p| p.all())
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f.started.elapsed() >= Duration::from_secs(1))
            .filter_map(|f| {
                let (dataset, snapshot) = f.what.split_once('@')?;
                let s = status::Sending {
                    snapshot: snapshot.to_string(),
                    bytes: f.bytes,
                    estimate: f.estimate,
                    seconds: f.started.elapsed().as_secs_f64(),
                };
                Some((dataset.to_string(), s))
            })
            .collect();
        let status = Status {
            written_at: status::epoch_seconds(now),
            receiver: opts.receiver.clone(),
            connected,
            stopped_at,
            datasets: self
                .datasets
                .iter()
                .map(|(s, t)| status::DatasetStatus {
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
