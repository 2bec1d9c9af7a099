//! `zq-send status`: reads the status files daemons write after every iteration and shows
//! them as a table or as JSON.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use zq_repl::daemon::tracked::{epoch_seconds, Status};
use zq_store::DatasetName;

use crate::{exit, fail};

/// Where daemons write status files by default: systemd's `RuntimeDirectory` when set,
/// otherwise `/run/zq`.
pub fn default_dir() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/zq"))
}

/// The default status file of the job `source` → `target`.
pub fn default_file(source: &DatasetName, target: &DatasetName) -> PathBuf {
    let flat = |d: &DatasetName| d.as_str().replace('/', "_");
    default_dir().join(format!("send-{}--{}.json", flat(source), flat(target)))
}

/// Prints every status file in `paths` (files, or directories of `*.json` files; the
/// default directory when empty). Exit 1 if none could be read.
pub fn show(paths: &[PathBuf], json: bool) -> ExitCode {
    let paths = if paths.is_empty() {
        vec![default_dir()]
    } else {
        paths.to_vec()
    };
    let mut files = Vec::new();
    for p in &paths {
        match status_files(p) {
            Ok(f) => files.extend(f),
            Err(e) => return fail(exit::FAILURE, &e),
        }
    }
    if files.is_empty() {
        let where_ = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return fail(
            exit::FAILURE,
            &anyhow::anyhow!("no status files in {where_}: is a zq-send daemon running?"),
        );
    }
    let now = epoch_seconds(SystemTime::now());
    for file in files {
        let status = std::fs::read(&file)
            .with_context(|| format!("reading {}", file.display()))
            .and_then(|b| {
                serde_json::from_slice::<Status>(&b)
                    .with_context(|| format!("{} is not a zq status file", file.display()))
            });
        match status {
            Ok(s) if json => match serde_json::to_string(&s) {
                Ok(line) => println!("{line}"),
                Err(e) => return fail(exit::FAILURE, &e.into()),
            },
            Ok(s) => print!("{}", table(&s, now)),
            Err(e) => return fail(exit::FAILURE, &e),
        }
    }
    ExitCode::SUCCESS
}

fn status_files(p: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if p.is_file() {
        return Ok(vec![p.to_path_buf()]);
    }
    let entries = match std::fs::read_dir(p) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

/// A human table of one daemon's status; `now` in seconds since the epoch.
fn table(s: &Status, now: f64) -> String {
    let age = (now - s.written_at).max(0.0);
    let mut out = format!(
        "receiver {} ({}), status written {age:.1} s ago\n",
        s.receiver,
        if s.connected {
            "connected"
        } else {
            "NOT CONNECTED"
        }
    );
    out.push_str(&format!(
        "  {:<40} {:<40} {:>9} {:>6} {:>9}  {}\n",
        "SOURCE", "LAST REPLICATED", "LAG", "UNSENT", "RESUMED", "ERROR"
    ));
    for d in &s.datasets {
        // The lag grows while the status file ages.
        let lag = d
            .lag_seconds
            .map_or("-".to_string(), |l| format!("{:.1}s", l + age));
        // Resumed steps and the bytes they did not send again.
        let resumed = match d.resumes {
            0 => "-".to_string(),
            n => format!("{n}/{}M", d.resumed_bytes >> 20),
        };
        out.push_str(&format!(
            "  {:<40} {:<40} {:>9} {:>6} {:>9}  {}\n",
            d.source,
            d.replicated.as_deref().unwrap_or("-"),
            lag,
            d.unsent,
            resumed,
            d.error.as_deref().unwrap_or("")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use zq_repl::daemon::tracked::DatasetStatus;

    #[test]
    fn table_ages_the_lag_with_the_file() {
        let s = Status {
            written_at: 100.0,
            receiver: "r:7446".into(),
            connected: false,
            datasets: vec![DatasetStatus {
                source: "tank/a".into(),
                target: "b/a".into(),
                replicated: Some("zq_x".into()),
                lag_seconds: Some(1.5),
                unsent: 2,
                error: Some("connection lost".into()),
                resumes: 1,
                resumed_bytes: 48 << 20,
                steps: 7,
                failures: 1,
                bytes: 1 << 30,
            }],
        };
        let t = table(&s, 102.0);
        assert!(
            t.contains("NOT CONNECTED") && t.contains("2.0 s ago"),
            "{t}"
        );
        assert!(t.contains("3.5s") && t.contains("connection lost"), "{t}");
        assert!(t.contains("1/48M"), "{t}");
    }

    #[test]
    fn default_file_flattens_names() {
        let f = default_file(
            &DatasetName::parse("tank/vm").unwrap(),
            &DatasetName::parse("b/a/vm").unwrap(),
        );
        assert!(f.ends_with("send-tank_vm--b_a_vm.json"), "{}", f.display());
    }
}
