//! The TOML configuration file (`--config FILE`) of both binaries: one file can describe a
//! whole fleet — its hosts, the replication jobs each source host runs, and the receivers
//! with the senders they allow. See `docs/examples/` and docs/operations.md, "Config file".
//!
//! A job's keys are the long flags of `zq-send run` (snake_case), some grouped in tables
//! (`filter`, `protection`, `retention`, `concurrency`, `transport`). The binaries turn a
//! job into the command line it stands for and parse that with the same clap definitions
//! as real flags, so a value means the same in a file and on the command line and is
//! checked by the same code; flags and environment variables given to the binary then
//! override the file (precedence: defaults < file < env < flags).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// Larger files are refused before reading: a fleet of a thousand jobs fits in 1 MiB.
const MAX_FILE: u64 = 1 << 20;

/// Replaced by the host's name in every value of a job or receiver, so that one entry
/// can serve several hosts (`target = "backup/{host}/home"`).
pub const HOST_PLACEHOLDER: &str = "{host}";

/// A daemon job's start jitter when neither the file nor a flag sets one: its period, at
/// most this, so a fleet restarted at once does not snapshot and connect in lockstep.
const MAX_DEFAULT_JITTER: Duration = Duration::from_secs(60);

/// The file as written. Every table refuses keys it does not know.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Named hosts: where receivers listen and which key each host presents.
    #[serde(default)]
    hosts: BTreeMap<String, HostSpec>,
    /// Keys every job inherits unless it sets them itself (tables merge key by key).
    #[serde(default)]
    defaults: JobSpec,
    /// Parsed here only to refuse unknown keys with their line; a job is read with
    /// [defaults] merged under it (`Config::job_spec`).
    #[serde(default)]
    #[allow(dead_code)]
    jobs: Vec<JobSpec>,
    #[serde(default)]
    receivers: Vec<ReceiverSpec>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostSpec {
    /// host:port where this host's zq-recv listens.
    address: Option<String>,
    /// The fingerprint of this host's identity (`zq-send fingerprint` / `zq-recv fingerprint`).
    fingerprint: Option<String>,
}

/// One host name or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a host name or a list of host names")]
enum Hosts {
    One(String),
    Many(Vec<String>),
}

impl Hosts {
    fn list(&self) -> Vec<String> {
        match self {
            Hosts::One(h) => vec![h.clone()],
            Hosts::Many(v) => v.clone(),
        }
    }
}

/// A value handed to a flag as written: sizes and counts may be numbers or strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or a number")]
enum Scalar {
    Int(i64),
    Float(f64),
    Str(String),
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Str(s) => f.write_str(s),
        }
    }
}

/// A replication job: `zq-send run SOURCE RECEIVER TARGET` and its flags.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobSpec {
    /// The job's name: what `--job` selects, and the name of its holds (zq_<name>).
    name: Option<String>,
    /// The source host(s) that run this job.
    host: Option<Hosts>,
    source: Option<String>,
    /// A name from [hosts] (its address, and its fingerprint as the default `peer`) or
    /// host:port.
    receiver: Option<String>,
    /// The receiver's fingerprint.
    peer: Option<String>,
    /// Pull mode (`zq-send serve`): where to listen for the receiver instead of dialing it.
    listen: Option<String>,
    target: Option<String>,
    identity: Option<String>,
    recursive: Option<bool>,
    every: Option<String>,
    snapshot_every: Option<String>,
    jitter: Option<String>,
    newest_only: Option<bool>,
    force: Option<bool>,
    zfs: Option<String>,
    status_file: Option<String>,
    metrics_listen: Option<String>,
    idle_timeout: Option<String>,
    stall_timeout: Option<String>,
    retries: Option<Scalar>,
    retry_delay: Option<String>,
    compress: Option<String>,
    bwlimit: Option<Scalar>,
    connections: Option<Scalar>,
    no_progress: Option<bool>,
    #[serde(default)]
    filter: FilterSpec,
    #[serde(default)]
    protection: ProtectionSpec,
    #[serde(default)]
    retention: RetentionSpec,
    #[serde(default)]
    concurrency: ConcurrencySpec,
    #[serde(default)]
    transport: TransportSpec,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterSpec {
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    exclude_regex: Vec<String>,
    #[serde(default)]
    include_regex: Vec<String>,
    exclude_property: Option<String>,
    skip_parent: Option<bool>,
    #[serde(default)]
    include_snapshots: Vec<String>,
    #[serde(default)]
    exclude_snapshots: Vec<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProtectionSpec {
    /// `--protection`.
    mode: Option<String>,
    initial: Option<String>,
    incremental: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionSpec {
    keep_last: Option<Scalar>,
    /// `--keep-grid`, e.g. "1h=all,24h=hourly,30d=daily".
    grid: Option<String>,
    target_keep_last: Option<Scalar>,
    target_grid: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConcurrencySpec {
    /// `--max-steps`: replication steps in flight at once.
    steps: Option<Scalar>,
    /// `--max-size-estimates`: size estimations running at once.
    size_estimates: Option<Scalar>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransportSpec {
    bdp: Option<Scalar>,
    congestion: Option<String>,
    udp_buffer: Option<Scalar>,
    address_validation: Option<String>,
}

/// A receiver: `zq-recv serve` and its flags, on the host(s) named.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiverSpec {
    host: Option<Hosts>,
    listen: Option<String>,
    identity: Option<String>,
    zfs: Option<String>,
    spool_dir: Option<String>,
    spool_from: Option<Scalar>,
    spool_max: Option<Scalar>,
    no_spool: Option<bool>,
    metrics_listen: Option<String>,
    /// The senders allowed and the dataset each may write inside.
    #[serde(default)]
    allow: Vec<AllowSpec>,
    #[serde(default)]
    transport: TransportSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowSpec {
    /// A name from [hosts] (its fingerprint) or a fingerprint.
    sender: String,
    root: String,
}

/// A loaded configuration file.
#[derive(Debug)]
pub struct Config {
    path: PathBuf,
    file: File,
    /// The jobs as written, for merging [defaults] under each key by key.
    raw_jobs: Vec<toml::Table>,
    raw_defaults: toml::Table,
}

/// A job of the file, resolved for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub name: String,
    pub host: String,
    /// The arguments of `zq-send run` this job stands for.
    pub args: Vec<String>,
    /// Its `listen` address, which `zq-send serve` takes instead of the receiver's.
    pub listen: Option<String>,
}

/// A receiver of the file, resolved for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receiver {
    pub host: String,
    /// The arguments of `zq-recv serve` it stands for.
    pub args: Vec<String>,
}

impl Config {
    /// Reads and checks the file's structure (unknown keys, wrong types; with line and
    /// column). Values are checked when a job is parsed as flags.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = read_bounded(path)?;
        Self::parse(path, &text)
    }

    /// [`Config::load`] on text already read.
    pub fn parse(path: &Path, text: &str) -> anyhow::Result<Config> {
        let file: File =
            toml::from_str(text).with_context(|| format!("config file {}", path.display()))?;
        let mut table: toml::Table =
            toml::from_str(text).with_context(|| format!("config file {}", path.display()))?;
        let raw_defaults = match table.remove("defaults") {
            Some(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        let raw_jobs = match table.remove("jobs") {
            Some(toml::Value::Array(jobs)) => jobs
                .into_iter()
                .filter_map(|j| match j {
                    toml::Value::Table(t) => Some(t),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let config = Config {
            path: path.to_owned(),
            file,
            raw_jobs,
            raw_defaults,
        };
        config.check()?;
        Ok(config)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks what spans entries: every job complete, names unique per host, [defaults]
    /// without per-job keys, receivers' senders resolvable.
    fn check(&self) -> anyhow::Result<()> {
        let d = &self.file.defaults;
        for (key, set) in [
            ("name", d.name.is_some()),
            ("source", d.source.is_some()),
            ("target", d.target.is_some()),
        ] {
            if set {
                bail!(
                    "config file {}: [defaults] sets `{key}`, which each job must set itself",
                    self.path.display()
                );
            }
        }
        let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
        for i in 0..self.raw_jobs.len() {
            let job = self.job_spec(i)?;
            if job.host.as_ref().is_none_or(|h| h.list().is_empty()) {
                bail!(
                    "{}: no `host`: name the source host(s) that run it (or set it in [defaults])",
                    self.job_label(i, &job)
                );
            }
            let name = job.name.clone().unwrap_or_default();
            for host in job.host.as_ref().map(Hosts::list).unwrap_or_default() {
                if let Some(first) = seen.insert((host.clone(), name.clone()), i) {
                    bail!(
                        "config file {}: jobs {} and {} are both named {name:?} on host {host:?}: \
                         a job's name must be unique on its host (it names its holds)",
                        self.path.display(),
                        first + 1,
                        i + 1
                    );
                }
            }
            for host in job.host.as_ref().map(Hosts::list).unwrap_or_default() {
                self.job_args(&job, &host)
                    .with_context(|| self.job_label(i, &job))?;
            }
        }
        let mut receiver_hosts = BTreeMap::new();
        for (i, r) in self.file.receivers.iter().enumerate() {
            let hosts = r.host.as_ref().map(Hosts::list).unwrap_or_default();
            if hosts.is_empty() {
                bail!(
                    "config file {}: receivers[{}] has no `host`: name the host(s) that run it",
                    self.path.display(),
                    i + 1
                );
            }
            for host in hosts {
                if let Some(first) = receiver_hosts.insert(host.clone(), i) {
                    bail!(
                        "config file {}: receivers {} and {} both run on host {host:?}: one \
                         zq-recv per host serves all its senders (list them in one `allow`)",
                        self.path.display(),
                        first + 1,
                        i + 1
                    );
                }
                self.receiver_args(r, &host).with_context(|| {
                    format!(
                        "config file {}: receivers[{}] on host {host:?}",
                        self.path.display(),
                        i + 1
                    )
                })?;
            }
        }
        Ok(())
    }

    fn job_label(&self, i: usize, job: &JobSpec) -> String {
        match &job.name {
            Some(n) => format!("config file {}: job {n:?}", self.path.display()),
            None => format!("config file {}: jobs[{}]", self.path.display(), i + 1),
        }
    }

    /// Job `i` with [defaults] merged under it.
    fn job_spec(&self, i: usize) -> anyhow::Result<JobSpec> {
        let mut merged = self.raw_defaults.clone();
        merge(&mut merged, &self.raw_jobs[i]);
        toml::Value::Table(merged)
            .try_into()
            .with_context(|| format!("config file {}: jobs[{}]", self.path.display(), i + 1))
    }

    /// Every job, for every host that runs it, in file order.
    pub fn jobs(&self) -> anyhow::Result<Vec<Job>> {
        let mut out = Vec::new();
        for i in 0..self.raw_jobs.len() {
            let spec = self.job_spec(i)?;
            for host in spec.host.as_ref().map(Hosts::list).unwrap_or_default() {
                out.push(Job {
                    name: spec.name.clone().unwrap_or_default(),
                    args: self.job_args(&spec, &host)?,
                    listen: spec
                        .listen
                        .as_ref()
                        .map(|l| l.replace(HOST_PLACEHOLDER, &host)),
                    host,
                });
            }
        }
        Ok(out)
    }

    /// The jobs `host` runs (see [`host_matches`]), in file order.
    pub fn jobs_for(&self, host: &str) -> anyhow::Result<Vec<Job>> {
        Ok(self
            .jobs()?
            .into_iter()
            .filter(|j| host_matches(&j.host, host))
            .collect())
    }

    /// Every receiver, for every host that runs it.
    pub fn receivers(&self) -> anyhow::Result<Vec<Receiver>> {
        let mut out = Vec::new();
        for r in &self.file.receivers {
            for host in r.host.as_ref().map(Hosts::list).unwrap_or_default() {
                out.push(Receiver {
                    args: self.receiver_args(r, &host)?,
                    host,
                });
            }
        }
        Ok(out)
    }

    /// The receiver `host` runs, if the file has one.
    pub fn receiver_for(&self, host: &str) -> anyhow::Result<Option<Receiver>> {
        Ok(self
            .receivers()?
            .into_iter()
            .find(|r| host_matches(&r.host, host)))
    }

    /// The hosts the file names anywhere (for check-config's summary).
    pub fn host_names(&self) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = self.file.hosts.keys().cloned().collect();
        names.extend(self.jobs()?.into_iter().map(|j| j.host));
        names.extend(self.receivers()?.into_iter().map(|r| r.host));
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn named_host(&self, name: &str) -> Option<&HostSpec> {
        self.file.hosts.get(name)
    }

    /// `zq-send run` arguments of `job` on `host`.
    fn job_args(&self, job: &JobSpec, host: &str) -> anyhow::Result<Vec<String>> {
        let need = |v: &Option<String>, key: &str| {
            v.clone()
                .with_context(|| format!("`{key}` is not set (nor in [defaults])"))
        };
        let name = need(&job.name, "name")?;
        let source = need(&job.source, "source")?;
        let target = need(&job.target, "target")?;
        let receiver = need(&job.receiver, "receiver")?;
        let identity = need(&job.identity, "identity")?;
        let (address, peer) = match self.named_host(&receiver) {
            Some(h) => (
                h.address.clone().with_context(|| {
                    format!("receiver {receiver:?} is in [hosts] but has no `address`")
                })?,
                job.peer.clone().or_else(|| h.fingerprint.clone()),
            ),
            None => (receiver.clone(), job.peer.clone()),
        };
        let peer = peer.with_context(|| {
            format!(
                "no `peer` (the receiver's fingerprint): set it, or `fingerprint` in \
                 [hosts.{receiver}]"
            )
        })?;
        let mut a = Args::default();
        a.positional([source, address, target]);
        a.value("identity", Some(&identity));
        a.value("peer", Some(&peer));
        a.value("job", Some(&name));
        a.flag("recursive", job.recursive);
        a.value("every", job.every.as_ref());
        a.value("snapshot-every", job.snapshot_every.as_ref());
        let jitter = job.jitter.clone().or_else(|| default_jitter(job));
        a.value("jitter", jitter.as_ref());
        a.flag("newest-only", job.newest_only);
        a.flag("force", job.force);
        a.value("zfs", job.zfs.as_ref());
        a.value("status-file", job.status_file.as_ref());
        a.value("metrics-listen", job.metrics_listen.as_ref());
        a.value("idle-timeout", job.idle_timeout.as_ref());
        a.value("stall-timeout", job.stall_timeout.as_ref());
        a.value("retries", job.retries.as_ref());
        a.value("retry-delay", job.retry_delay.as_ref());
        a.value("compress", job.compress.as_ref());
        a.value("bwlimit", job.bwlimit.as_ref());
        a.value("connections", job.connections.as_ref());
        a.flag("no-progress", job.no_progress);
        let f = &job.filter;
        a.values("exclude", &f.exclude);
        a.values("exclude-regex", &f.exclude_regex);
        a.values("include-regex", &f.include_regex);
        a.value("exclude-property", f.exclude_property.as_ref());
        a.flag("skip-parent", f.skip_parent);
        a.values("include-snapshots", &f.include_snapshots);
        a.values("exclude-snapshots", &f.exclude_snapshots);
        a.value("protection", job.protection.mode.as_ref());
        a.value("protection-initial", job.protection.initial.as_ref());
        a.value(
            "protection-incremental",
            job.protection.incremental.as_ref(),
        );
        a.value("keep-last", job.retention.keep_last.as_ref());
        a.value("keep-grid", job.retention.grid.as_ref());
        a.value("target-keep-last", job.retention.target_keep_last.as_ref());
        a.value("target-keep-grid", job.retention.target_grid.as_ref());
        a.value("max-steps", job.concurrency.steps.as_ref());
        a.value(
            "max-size-estimates",
            job.concurrency.size_estimates.as_ref(),
        );
        a.transport(&job.transport);
        Ok(a.finish(host))
    }

    /// `zq-recv serve` arguments of `r` on `host`.
    fn receiver_args(&self, r: &ReceiverSpec, host: &str) -> anyhow::Result<Vec<String>> {
        let identity = r
            .identity
            .clone()
            .context("`identity` is not set (the directory of the receiver's key)")?;
        if r.allow.is_empty() {
            bail!(
                "`allow` lists no sender: add {{ sender = HOST or FINGERPRINT, root = DATASET }}"
            );
        }
        let mut a = Args::default();
        let listen = r.listen.clone().or_else(|| {
            // A receiver named in [hosts] listens on the port its address gives.
            self.named_host(host)
                .and_then(|h| h.address.as_deref())
                .and_then(|addr| addr.rsplit_once(':'))
                .map(|(_, port)| format!("[::]:{port}"))
        });
        a.value("listen", listen.as_ref());
        a.value("identity", Some(&identity));
        a.value("zfs", r.zfs.as_ref());
        a.value("spool-dir", r.spool_dir.as_ref());
        a.value("spool-from", r.spool_from.as_ref());
        a.value("spool-max", r.spool_max.as_ref());
        a.flag("no-spool", r.no_spool);
        a.value("metrics-listen", r.metrics_listen.as_ref());
        for allow in &r.allow {
            let fingerprint = match self.named_host(&allow.sender) {
                Some(h) => h.fingerprint.clone().with_context(|| {
                    format!(
                        "allowed sender {:?} is in [hosts] but has no `fingerprint`",
                        allow.sender
                    )
                })?,
                None => allow.sender.clone(),
            };
            a.value("allow", Some(&format!("{fingerprint}={}", allow.root)));
        }
        a.transport(&r.transport);
        Ok(a.finish(host))
    }
}

/// A daemon job's default jitter: its period, at most [`MAX_DEFAULT_JITTER`].
fn default_jitter(job: &JobSpec) -> Option<String> {
    let period = job.every.as_ref().or(job.snapshot_every.as_ref())?;
    let period = humantime::parse_duration(period).ok()?;
    Some(humantime::format_duration(period.min(MAX_DEFAULT_JITTER)).to_string())
}

/// Command-line arguments being built from a file's entry.
#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn positional(&mut self, values: [String; 3]) {
        self.0.extend(values);
    }

    fn value(&mut self, flag: &str, value: Option<&impl std::fmt::Display>) {
        if let Some(v) = value {
            self.0.push(format!("--{flag}"));
            self.0.push(v.to_string());
        }
    }

    fn values(&mut self, flag: &str, values: &[String]) {
        for v in values {
            self.value(flag, Some(v));
        }
    }

    /// A switch: set when true (false is the default of every switch).
    fn flag(&mut self, flag: &str, on: Option<bool>) {
        if on == Some(true) {
            self.0.push(format!("--{flag}"));
        }
    }

    fn transport(&mut self, t: &TransportSpec) {
        self.value("bdp", t.bdp.as_ref());
        self.value("congestion", t.congestion.as_ref());
        self.value("udp-buffer", t.udp_buffer.as_ref());
        self.value("address-validation", t.address_validation.as_ref());
    }

    /// The arguments, with `{host}` replaced by `host`.
    fn finish(self, host: &str) -> Vec<String> {
        self.0
            .into_iter()
            .map(|a| a.replace(HOST_PLACEHOLDER, host))
            .collect()
    }
}

/// Merges `over` into `base`: tables key by key (recursively), anything else replaced.
fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

fn read_bounded(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening config file {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_FILE + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading config file {} (UTF-8 TOML)", path.display()))?;
    if text.len() as u64 > MAX_FILE {
        bail!(
            "config file {} is larger than {MAX_FILE} bytes: is it the right file?",
            path.display()
        );
    }
    Ok(text)
}

/// This machine's host name, the default of `--host`.
pub fn this_host() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Whether the file's host name `listed` means `host`: equal, or equal to its first label
/// (a file saying `db1` matches the host `db1.example.net`, and the other way round).
pub fn host_matches(listed: &str, host: &str) -> bool {
    let short = |h: &str| h.split('.').next().unwrap_or(h).to_owned();
    listed == host || (!listed.is_empty() && short(listed) == short(host))
}

/// Shell-quotes `args` for display (check-config prints the equivalent command).
pub fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%[]".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP_SEND: &str = "zq1-aaaa";
    const FP_RECV: &str = "zq1-bbbb";

    fn parse(text: &str) -> anyhow::Result<Config> {
        Config::parse(Path::new("test.toml"), text)
    }

    fn fleet() -> String {
        format!(
            r#"
[hosts.backup]
address = "backup.example:7446"
fingerprint = "{FP_RECV}"
[hosts.db1]
fingerprint = "{FP_SEND}"

[defaults]
identity = "/etc/zq"
receiver = "backup"
every = "1s"
[defaults.filter]
exclude_property = "zq:replicate=off"

[[jobs]]
name = "home"
host = ["db1", "db2"]
source = "tank/home"
target = "backup/{{host}}/home"
recursive = true
[jobs.filter]
exclude = ["cache"]
[jobs.retention]
keep_last = 50

[[jobs]]
name = "vm"
host = "db2"
source = "tank/vm"
target = "backup/db2/vm"
every = "10s"
jitter = "0s"

[[receivers]]
host = "backup"
identity = "/etc/zq"
allow = [{{ sender = "db1", root = "backup/db1" }}, {{ sender = "zq1-cccc", root = "backup/db2" }}]
"#
        )
    }

    #[test]
    fn a_fleet_resolves_per_host_with_defaults_and_placeholders() {
        let c = parse(&fleet()).unwrap();
        let db1 = c.jobs_for("db1").unwrap();
        assert_eq!(db1.len(), 1);
        assert_eq!(
            db1[0].args.join(" "),
            format!(
                "tank/home backup.example:7446 backup/db1/home --identity /etc/zq --peer {FP_RECV} \
                 --job home --recursive --every 1s --jitter 1s --exclude cache \
                 --exclude-property zq:replicate=off --keep-last 50"
            )
        );
        let db2 = c.jobs_for("db2.example.net").unwrap();
        assert_eq!(
            db2.iter().map(|j| j.name.as_str()).collect::<Vec<_>>(),
            ["home", "vm"]
        );
        assert!(db2[0].args.contains(&"backup/db2/home".to_owned()));
        // Its own jitter wins over the default; its own period over [defaults].
        assert!(db2[1].args.join(" ").contains("--every 10s --jitter 0s"));
        assert!(c.jobs_for("web1").unwrap().is_empty());
        let r = c.receiver_for("backup").unwrap().unwrap();
        assert_eq!(
            r.args.join(" "),
            format!(
                "--listen [::]:7446 --identity /etc/zq --allow {FP_SEND}=backup/db1 \
                 --allow zq1-cccc=backup/db2"
            )
        );
        assert!(c.receiver_for("db1").unwrap().is_none());
        assert_eq!(c.host_names().unwrap(), ["backup", "db1", "db2"]);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_place() {
        let e = parse("[[jobs]]\nname = \"a\"\nevry = \"1s\"\n").unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("unknown field `evry`"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        let e = parse("[defaults.filter]\nexclude_regexp = []\n").unwrap_err();
        assert!(format!("{e:#}").contains("exclude_regexp"));
        let e = parse("[[jobs]]\nrecursive = \"yes\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("invalid type"), "{e:#}");
    }

    #[test]
    fn incomplete_or_ambiguous_files_are_refused() {
        let job = |extra: &str| {
            format!(
                "[[jobs]]\nname = \"a\"\nhost = \"h\"\nsource = \"t/a\"\ntarget = \"b/a\"\n\
                 identity = \"/k\"\n{extra}"
            )
        };
        let e = parse(&job("")).unwrap_err();
        assert!(format!("{e:#}").contains("`receiver` is not set"), "{e:#}");
        let e = parse(&job("receiver = \"b:1\"\n")).unwrap_err();
        assert!(format!("{e:#}").contains("no `peer`"), "{e:#}");
        let twice = format!(
            "{}{}",
            job("receiver = \"b:1\"\npeer = \"x\"\n"),
            job("receiver = \"b:1\"\npeer = \"x\"\n")
        );
        let e = parse(&twice).unwrap_err();
        assert!(format!("{e:#}").contains("both named \"a\""), "{e:#}");
        let e = parse("[defaults]\nsource = \"t\"\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("[defaults] sets `source`"),
            "{e:#}"
        );
        let e = parse("[[receivers]]\nhost = \"b\"\nidentity = \"/k\"\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("`allow` lists no sender"),
            "{e:#}"
        );
        let e = parse(
            "[hosts.x]\naddress = \"a:1\"\n[[receivers]]\nhost = \"b\"\nidentity = \"/k\"\n\
             allow = [{ sender = \"x\", root = \"r\" }]\n",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("has no `fingerprint`"), "{e:#}");
    }

    #[test]
    fn host_names_match_in_full_or_by_first_label() {
        assert!(host_matches("db1", "db1"));
        assert!(host_matches("db1", "db1.example.net"));
        assert!(host_matches("db1.example.net", "db1"));
        assert!(!host_matches("db1", "db10"));
        assert!(!host_matches("", "db1"));
    }

    #[test]
    fn shell_words_quotes_what_a_shell_would_split() {
        let args = [
            "a/b".to_owned(),
            "x y".to_owned(),
            "it's".to_owned(),
            String::new(),
        ];
        assert_eq!(shell_words(&args), r#"a/b 'x y' 'it'\''s' ''"#);
    }
}
