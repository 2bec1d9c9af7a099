//! `zq-send status`: reads the status files daemons write after every iteration and shows
//! them as a table or as JSON, or checks them against lag limits for a monitoring system.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use zq_repl::status::{epoch_seconds, Status};
use zq_store::DatasetName;

use crate::fail;

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
    let statuses = match load(paths) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let now = epoch_seconds(SystemTime::now());
    for (_, s) in statuses {
        if json {
            match serde_json::to_string(&s) {
                Ok(line) => crate::out!("{line}"),
                Err(e) => return fail(&e.into()),
            }
        } else {
            print!("{}", table(&s, now));
        }
    }
    ExitCode::SUCCESS
}

/// `zq-send status --remove-stopped`: removes the status files of daemons that stopped
/// (a retired job's), printing each; running daemons' files stay.
pub fn remove_stopped(paths: &[PathBuf]) -> anyhow::Result<()> {
    let now = epoch_seconds(SystemTime::now());
    let mut removed = 0;
    for (file, s) in load(paths)? {
        let Some(stopped) = s.stopped_at else {
            continue;
        };
        std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        removed += 1;
        crate::out!(
            "removed {} (its daemon stopped {} ago)",
            file.display(),
            ago(now - stopped)
        );
    }
    if removed == 0 {
        crate::out!("no stopped daemon's status file: every daemon found is running");
    }
    Ok(())
}

/// `secs` as a duration for people, to the second.
fn ago(secs: f64) -> String {
    humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64)).to_string()
}

/// The status files in `paths` (the default directory when empty), parsed; an error when
/// there are none or one cannot be read.
fn load(paths: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, Status)>> {
    let paths = if paths.is_empty() {
        vec![default_dir()]
    } else {
        paths.to_vec()
    };
    let mut files = Vec::new();
    for p in &paths {
        files.extend(status_files(p)?);
    }
    if files.is_empty() {
        let where_ = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        anyhow::bail!("no status files in {where_}: is a zq-send daemon running?");
    }
    files
        .into_iter()
        .map(|file| {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let status = serde_json::from_slice::<Status>(&bytes)
                .with_context(|| format!("{} is not a zq status file", file.display()))?;
            Ok((file, status))
        })
        .collect()
}

/// `zq-send status --warn-lag/--crit-lag`: limits on the replication lag.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// WARNING above this lag.
    pub warn: Option<Duration>,
    /// CRITICAL above this lag.
    pub crit: Option<Duration>,
}

/// A monitoring plugin's states, as its exit codes (Nagios, Icinga, Sensu, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Exit 0.
    Ok = 0,
    /// Exit 1.
    Warning = 1,
    /// Exit 2.
    Critical = 2,
    /// Exit 3: no status to judge.
    Unknown = 3,
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::Ok => "OK",
            Level::Warning => "WARNING",
            Level::Critical => "CRITICAL",
            Level::Unknown => "UNKNOWN",
        })
    }
}

/// Something wrong in a daemon's status.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// How bad.
    pub level: Level,
    /// What, for the operator.
    pub what: String,
}

/// Checks one daemon's status against `limits` at `now` (seconds since the epoch): a lag
/// over a limit (the lag grows with the file's age, so a hung daemon is caught), a dataset
/// with nothing replicated yet (CRITICAL when a critical limit is set: it is not protected),
/// a failing dataset and a lost connection (WARNING: the daemon retries on its own).
pub fn assess(s: &Status, now: f64, limits: &Limits) -> Vec<Finding> {
    let age = (now - s.written_at).max(0.0);
    let mut found = Vec::new();
    let mut say = |level, what: String| found.push(Finding { level, what });
    if let Some(stopped) = s.stopped_at {
        say(
            Level::Warning,
            format!(
                "the daemon replicating to {} stopped {} ago (a retired job? \
                 `zq-send status --remove-stopped` removes its status)",
                s.receiver,
                ago(now - stopped)
            ),
        );
    } else if !s.connected {
        say(
            Level::Warning,
            format!("not connected to receiver {}", s.receiver),
        );
    }
    let over = |lag: f64, limit: Option<Duration>| limit.is_some_and(|l| lag > l.as_secs_f64());
    let human =
        |secs: f64| humantime::format_duration(Duration::from_secs(secs as u64)).to_string();
    for d in &s.datasets {
        match d.lag_seconds.map(|l| l + age) {
            None if limits.warn.is_some() || limits.crit.is_some() => say(
                if limits.crit.is_some() {
                    Level::Critical
                } else {
                    Level::Warning
                },
                format!("{}: nothing replicated to {} yet", d.source, d.target),
            ),
            Some(lag) if over(lag, limits.crit) => say(
                Level::Critical,
                format!(
                    "{}: lag {} > {}",
                    d.source,
                    human(lag),
                    human_limit(limits.crit)
                ),
            ),
            Some(lag) if over(lag, limits.warn) => say(
                Level::Warning,
                format!(
                    "{}: lag {} > {}",
                    d.source,
                    human(lag),
                    human_limit(limits.warn)
                ),
            ),
            _ => {}
        }
        if let Some(e) = &d.error {
            say(Level::Warning, format!("{}: failing: {e}", d.source));
        }
    }
    found
}

fn human_limit(limit: Option<Duration>) -> String {
    limit.map_or_else(String::new, |l| humantime::format_duration(l).to_string())
}

/// `zq-send status --warn-lag/--crit-lag`: one summary line, then one line per finding;
/// the exit code is the worst level (3 when there is no status to judge).
pub fn monitor(paths: &[PathBuf], limits: &Limits) -> ExitCode {
    let statuses = match load(paths) {
        Ok(s) => s,
        Err(e) => {
            crate::out!("ZQ {} - {e:#}", Level::Unknown);
            return ExitCode::from(Level::Unknown as u8);
        }
    };
    let now = epoch_seconds(SystemTime::now());
    let found: Vec<Finding> = statuses
        .iter()
        .flat_map(|(_, s)| assess(s, now, limits))
        .collect();
    let worst = found.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
    let datasets: usize = statuses.iter().map(|(_, s)| s.datasets.len()).sum();
    let summary = match found.iter().find(|f| f.level == worst) {
        Some(f) if found.len() > 1 => format!("{} (and {} more)", f.what, found.len() - 1),
        Some(f) => f.what.clone(),
        None => format!(
            "{datasets} dataset(s) in {} daemon(s) within the limits",
            statuses.len()
        ),
    };
    crate::out!("ZQ {worst} - {summary}");
    for f in &found {
        crate::out!("{}: {}", f.level, f.what);
    }
    ExitCode::from(worst as u8)
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
    let state = match (s.stopped_at, s.connected) {
        (Some(stopped), _) => format!("STOPPED {} ago", ago(now - stopped)),
        (None, true) => "connected".to_owned(),
        (None, false) => "NOT CONNECTED".to_owned(),
    };
    let mut out = format!(
        "receiver {} ({state}), status written {age:.1} s ago\n",
        s.receiver
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
        if let Some(s) = &d.sending {
            let what = format!("sending @{}", s.snapshot);
            out.push_str(&format!(
                "    {}\n",
                zq_repl::progress::describe(&what, s.bytes, s.estimate, s.seconds)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use zq_repl::status::DatasetStatus;

    #[test]
    fn table_ages_the_lag_with_the_file() {
        let s = Status {
            written_at: 100.0,
            receiver: "r:7446".into(),
            connected: false,
            stopped_at: None,
            datasets: vec![DatasetStatus {
                source: "tank/a".into(),
                target: "b/a".into(),
                replicated: Some("zq_x".into()),
                lag_seconds: Some(1.5),
                unsent: 2,
                error: Some("connection lost".into()),
                resumes: 1,
                resumed_bytes: 48 << 20,
                resumed_from: Some("zfs send -t".into()),
                steps: 7,
                failures: 1,
                bytes: 1 << 30,
                sending: Some(zq_repl::status::Sending {
                    snapshot: "zq_y".into(),
                    bytes: 3 << 30,
                    estimate: Some(4 << 30),
                    seconds: 30.0,
                }),
            }],
        };
        let t = table(&s, 102.0);
        assert!(
            t.contains("    sending @zq_y: 3.0 GiB of ~4.0 GiB (75%), 102.4 MiB/s, 10 s left"),
            "{t}"
        );
        assert!(
            t.contains("NOT CONNECTED") && t.contains("2.0 s ago"),
            "{t}"
        );
        assert!(t.contains("3.5s") && t.contains("connection lost"), "{t}");
        assert!(t.contains("1/48M"), "{t}");
    }

    fn status(written_at: f64, lag: Option<f64>, error: Option<&str>) -> Status {
        Status {
            written_at,
            receiver: "r:7446".into(),
            connected: true,
            stopped_at: None,
            datasets: vec![DatasetStatus {
                source: "tank/a".into(),
                target: "b/a".into(),
                replicated: lag.map(|_| "zq_x".into()),
                lag_seconds: lag,
                unsent: 0,
                error: error.map(String::from),
                resumes: 0,
                resumed_bytes: 0,
                resumed_from: None,
                steps: 0,
                failures: 0,
                bytes: 0,
                sending: None,
            }],
        }
    }

    #[test]
    fn lag_limits_give_monitoring_levels() {
        let limits = Limits {
            warn: Some(Duration::from_secs(60)),
            crit: Some(Duration::from_secs(600)),
        };
        let levels = |s: &Status, now| {
            assess(s, now, &limits)
                .iter()
                .map(|f| f.level)
                .collect::<Vec<_>>()
        };
        assert!(levels(&status(100.0, Some(5.0), None), 100.0).is_empty());
        // The lag ages with the file: a daemon that stopped writing is caught.
        assert_eq!(
            levels(&status(100.0, Some(5.0), None), 200.0),
            [Level::Warning]
        );
        assert_eq!(
            levels(&status(100.0, Some(5.0), None), 800.0),
            [Level::Critical]
        );
        assert_eq!(levels(&status(100.0, None, None), 100.0), [Level::Critical]);
        assert_eq!(
            levels(&status(100.0, Some(1.0), Some("zfs failed")), 100.0),
            [Level::Warning]
        );
        let mut down = status(100.0, Some(1.0), None);
        down.connected = false;
        let found = assess(&down, 100.0, &limits);
        assert_eq!(found[0].level, Level::Warning);
        assert!(found[0].what.contains("not connected to receiver r:7446"));
        // A stopped daemon says so, once, instead of "not connected".
        down.stopped_at = Some(40.0);
        let found = assess(&down, 100.0, &limits);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].what.contains("stopped 1m ago"),
            "{}",
            found[0].what
        );
        assert!(table(&down, 100.0).contains("(STOPPED 1m ago)"));
        // Without limits only failures and connections count.
        assert!(assess(&status(0.0, None, None), 1e9, &Limits::default()).is_empty());
        assert!(Level::Unknown > Level::Critical && Level::Critical > Level::Warning);
    }

    #[test]
    fn remove_stopped_takes_only_stopped_daemons_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, s: &Status| {
            std::fs::write(dir.path().join(name), serde_json::to_vec(s).unwrap()).unwrap()
        };
        let running = status(100.0, Some(1.0), None);
        let mut stopped = running.clone();
        stopped.connected = false;
        stopped.stopped_at = Some(100.0);
        write("running.json", &running);
        write("retired.json", &stopped);
        remove_stopped(&[dir.path().to_owned()]).unwrap();
        assert!(dir.path().join("running.json").exists());
        assert!(!dir.path().join("retired.json").exists());
        // A status file of an older zq (no stopped_at) still reads.
        let old = r#"{"written_at":1.0,"receiver":"r:1","connected":true,"datasets":[]}"#;
        assert!(serde_json::from_str::<Status>(old)
            .unwrap()
            .stopped_at
            .is_none());
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
