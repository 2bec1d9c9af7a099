//! The TOML configuration file (`--config FILE`) of both binaries: one file can describe a
//! whole fleet — its hosts, the replication jobs each source host runs, and the receivers
//! with the senders they allow. See `docs/examples/` and docs/operations.md, "Config file".
//!
//! A job's keys are the options of `zq-send run` ([`crate::run::RunArgs`], by field name),
//! some in tables (`filter`, `protection`, `retention`, `concurrency`, `transport`), and
//! a receiver's those of `zq-recv serve`: they are read by the same definitions as the
//! flags ([`crate::options`]), so a value means the same in a file and on the command
//! line and an option is declared once. Flags and environment variables given to the
//! binary override the file key by key (precedence: defaults < file < env < flags). The
//! file's own keys (hosts, a job's `name`, `host`, `receiver` and `listen`, a receiver's
//! `host` and `allow`) are resolved here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use toml::{Table, Value};

use crate::options::Options;
use crate::run::{Run, RunOnly};
use crate::serve::{ServeArgs, ServeOnly};

/// Larger files are refused before reading: a fleet of a thousand jobs fits in 1 MiB.
const MAX_FILE: u64 = 1 << 20;

/// Replaced by the host's name in every value of a job or receiver, so that one entry
/// can serve several hosts (`target = "backup/{host}/home"`).
pub const HOST_PLACEHOLDER: &str = "{host}";

/// A daemon job's start jitter when neither the file nor a flag sets one: its period, at
/// most this, so a fleet restarted at once does not snapshot and connect in lockstep.
const MAX_DEFAULT_JITTER: Duration = Duration::from_secs(60);

/// The file as written. Its own keys are checked here (with line and column); the keys of
/// jobs and receivers are options, checked against the options' definitions
/// ([`crate::options`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Named hosts: where receivers listen and which key each host presents.
    #[serde(default)]
    hosts: BTreeMap<String, HostSpec>,
    /// Keys every job inherits unless it sets them itself (tables merge key by key).
    #[serde(default)]
    defaults: Table,
    #[serde(default)]
    jobs: Vec<Table>,
    #[serde(default)]
    receivers: Vec<Table>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostSpec {
    /// host:port where this host's zq-recv listens.
    address: Option<String>,
    /// The fingerprint of this host's identity (`zq-send fingerprint` / `zq-recv fingerprint`).
    fingerprint: Option<String>,
}

/// The keys of [`JobKeys`].
const JOB_KEYS: &[&str] = &["name", "host", "receiver", "listen"];

/// The keys of a job that are the file's, not `zq-send run`'s options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobKeys {
    /// The job's name: what `--job` selects, and the name of its holds (zq_<name>).
    name: Option<String>,
    /// The source host(s) that run this job.
    host: Option<Hosts>,
    /// A name from [hosts] (its address, and its fingerprint as the default `peer`) or
    /// host:port.
    receiver: Option<String>,
    /// Pull mode (`zq-send serve`): where to listen for the receiver instead of dialing it.
    listen: Option<String>,
}

/// The keys of a receiver that are the file's, not `zq-recv serve`'s options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiverKeys {
    host: Option<Hosts>,
    /// The senders allowed and the dataset each may write inside.
    #[serde(default)]
    allow: Vec<AllowSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowSpec {
    /// A name from [hosts] (its fingerprint) or a fingerprint.
    sender: String,
    root: String,
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

/// Splits `entry` into the file's own keys (`T`) and the options.
fn split<T: serde::de::DeserializeOwned>(
    entry: &Table,
    own: &[&str],
) -> anyhow::Result<(T, Table)> {
    let (mine, options): (Table, Table) = entry
        .clone()
        .into_iter()
        .partition(|(k, _)| own.contains(&k.as_str()));
    Ok((Value::Table(mine).try_into()?, options))
}

/// A loaded configuration file.
#[derive(Debug)]
pub struct Config {
    path: PathBuf,
    file: File,
}

/// A job of the file, resolved for one host: its options, under `[defaults]`, with `{host}`
/// replaced and its receiver looked up.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub host: String,
    /// Its `listen` address, which `zq-send serve` takes instead of the receiver's.
    pub listen: Option<String>,
    /// The options, as keys of `zq-send run` ([`crate::run::options`]).
    pub entry: Table,
    /// "config file F: job N on host H", for messages.
    label: String,
}

/// A receiver of the file, resolved for one host.
#[derive(Debug, Clone)]
pub struct Receiver {
    pub host: String,
    /// The options, as keys of `zq-recv serve` ([`crate::serve::options`]).
    pub entry: Table,
    label: String,
}

impl Job {
    /// The job as `zq-send run` runs it, under what the command line or the environment
    /// gave (`given`: the subcommand's matches), in pull mode listening on `listen`.
    pub fn run(&self, given: Option<&clap::ArgMatches>, pull: bool) -> anyhow::Result<Run> {
        let mut entry = self.entry.clone();
        if pull {
            // ADDR is where to listen; the receiver (its fingerprint) stays pinned.
            let listen = self.listen.clone().with_context(|| {
                format!(
                    "{}: no `listen` address for zq-send serve (pull mode)",
                    self.label
                )
            })?;
            entry.insert("addr".into(), Value::String(listen));
        }
        let parsed: RunOnly = parse(&crate::run::options(), entry, given, &self.label)?;
        let mut run = Run::new(parsed.args).with_context(|| self.label.clone())?;
        run.name = Some(self.name.clone());
        Ok(run)
    }

    /// The `zq-send run` command line the job stands for.
    pub fn command_line(&self) -> anyhow::Result<String> {
        command_line(&crate::run::options(), &self.entry, &self.label)
    }
}

impl Receiver {
    /// The receiver as `zq-recv serve` runs it, under what the command line or the
    /// environment gave (`given`: the subcommand's matches).
    pub fn serve(&self, given: Option<&clap::ArgMatches>) -> anyhow::Result<ServeArgs> {
        let options = crate::serve::options();
        let parsed: ServeOnly = parse(&options, self.entry.clone(), given, &self.label)?;
        Ok(parsed.args)
    }

    /// The `zq-recv serve` command line the receiver stands for.
    pub fn command_line(&self) -> anyhow::Result<String> {
        command_line(&crate::serve::options(), &self.entry, &self.label)
    }
}

/// `entry` under what `given` set, parsed by `options`; an error names `label`.
fn parse<T: clap::FromArgMatches>(
    options: &Options,
    mut entry: Table,
    given: Option<&clap::ArgMatches>,
    label: &str,
) -> anyhow::Result<T> {
    if let Some(m) = given {
        options.overlay(&mut entry, m);
    }
    options
        .parse(&entry)
        .map_err(|e| anyhow::anyhow!("{label}: {e}"))
}

/// The command line `entry` stands for, shell-quoted.
fn command_line(options: &Options, entry: &Table, label: &str) -> anyhow::Result<String> {
    let argv = options
        .argv(entry)
        .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
    Ok(shell_words(&argv))
}

impl Config {
    /// Reads and checks the file: its structure, and every job and receiver for every
    /// host, as the options they stand for.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = read_bounded(path)?;
        Self::parse(path, &text)
    }

    /// [`Config::load`] on text already read.
    pub fn parse(path: &Path, text: &str) -> anyhow::Result<Config> {
        let file: File =
            toml::from_str(text).with_context(|| format!("config file {}", path.display()))?;
        let config = Config {
            path: path.to_owned(),
            file,
        };
        config.check()?;
        Ok(config)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks what spans entries: every job complete and valid, names unique per host,
    /// [defaults] without per-job keys, receivers valid and one per host.
    fn check(&self) -> anyhow::Result<()> {
        let at = || format!("config file {}: [defaults]", self.path.display());
        let (_, defaults): (JobKeys, Table) =
            split(&self.file.defaults, JOB_KEYS).with_context(at)?;
        crate::run::options()
            .check(&defaults)
            .map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        for key in ["name", "source", "target"] {
            if self.file.defaults.contains_key(key) {
                bail!(
                    "config file {}: [defaults] sets `{key}`, which each job must set itself",
                    self.path.display()
                );
            }
        }
        let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
        for i in 0..self.file.jobs.len() {
            for job in self.job(i)? {
                if let Some(first) = seen.insert((job.host.clone(), job.name.clone()), i) {
                    bail!(
                        "config file {}: jobs {} and {} are both named {:?} on host {:?}: \
                         a job's name must be unique on its host (it names its holds)",
                        self.path.display(),
                        first + 1,
                        i + 1,
                        job.name,
                        job.host
                    );
                }
                job.run(None, false)?;
                if job.listen.is_some() {
                    job.run(None, true)?;
                }
            }
        }
        let mut receiver_hosts = BTreeMap::new();
        for i in 0..self.file.receivers.len() {
            for r in self.receiver(i)? {
                if let Some(first) = receiver_hosts.insert(r.host.clone(), i) {
                    bail!(
                        "config file {}: receivers {} and {} both run on host {:?}: one \
                         zq-recv per host serves all its senders (list them in one `allow`)",
                        self.path.display(),
                        first + 1,
                        i + 1,
                        r.host
                    );
                }
                r.serve(None)?;
            }
        }
        Ok(())
    }

    /// Job `i` (from 0), with [defaults] merged under it, for each of its hosts.
    fn job(&self, i: usize) -> anyhow::Result<Vec<Job>> {
        let mut merged = self.file.defaults.clone();
        merge(&mut merged, &self.file.jobs[i]);
        let (keys, mut options): (JobKeys, Table) = split(&merged, JOB_KEYS)
            .with_context(|| format!("config file {}: jobs[{}]", self.path.display(), i + 1))?;
        let label = match &keys.name {
            Some(n) => format!("config file {}: job {n:?}", self.path.display()),
            None => format!("config file {}: jobs[{}]", self.path.display(), i + 1),
        };
        crate::run::options()
            .check(&options)
            .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
        let hosts = keys.host.as_ref().map(Hosts::list).unwrap_or_default();
        if hosts.is_empty() {
            bail!(
                "{label}: no `host`: name the source host(s) that run it (or set it in [defaults])"
            );
        }
        let need = |v: Option<&String>, key: &str| {
            v.cloned()
                .with_context(|| format!("{label}: `{key}` is not set (nor in [defaults])"))
        };
        let name = need(keys.name.as_ref(), "name")?;
        for key in ["source", "target", "identity"] {
            if !options.contains_key(key) {
                bail!("{label}: `{key}` is not set (nor in [defaults])");
            }
        }
        let receiver = need(keys.receiver.as_ref(), "receiver")?;
        let (address, peer) = match self.file.hosts.get(&receiver) {
            Some(h) => (
                h.address.clone().with_context(|| {
                    format!("{label}: receiver {receiver:?} is in [hosts] but has no `address`")
                })?,
                h.fingerprint.clone(),
            ),
            None => (receiver.clone(), None),
        };
        if !options.contains_key("peer") {
            let peer = peer.with_context(|| {
                format!(
                    "{label}: no `peer` (the receiver's fingerprint): set it, or `fingerprint` \
                     in [hosts.{receiver}]"
                )
            })?;
            options.insert("peer".into(), Value::String(peer));
        }
        options.insert("addr".into(), Value::String(address));
        options.insert("job".into(), Value::String(name.clone()));
        if !options.contains_key("jitter") {
            if let Some(jitter) = default_jitter(&options) {
                options.insert("jitter".into(), Value::String(jitter));
            }
        }
        Ok(hosts
            .into_iter()
            .map(|host| Job {
                name: name.clone(),
                listen: keys
                    .listen
                    .as_ref()
                    .map(|l| l.replace(HOST_PLACEHOLDER, &host)),
                entry: for_host(&options, &host),
                label: format!("{label} on host {host:?}"),
                host,
            })
            .collect())
    }

    /// Receiver `i` (from 0), for each of its hosts.
    fn receiver(&self, i: usize) -> anyhow::Result<Vec<Receiver>> {
        let at = format!("config file {}: receivers[{}]", self.path.display(), i + 1);
        let (keys, mut options): (ReceiverKeys, Table) =
            split(&self.file.receivers[i], &["host", "allow"]).with_context(|| at.clone())?;
        crate::serve::options()
            .check(&options)
            .map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        let hosts = keys.host.as_ref().map(Hosts::list).unwrap_or_default();
        if hosts.is_empty() {
            bail!("{at} has no `host`: name the host(s) that run it");
        }
        if !options.contains_key("identity") {
            bail!("{at}: `identity` is not set (the directory of the receiver's key)");
        }
        if keys.allow.is_empty() {
            bail!(
                "{at}: `allow` lists no sender: add {{ sender = HOST or FINGERPRINT, root = DATASET }}"
            );
        }
        let mut allow = Vec::new();
        for a in &keys.allow {
            let fingerprint = match self.file.hosts.get(&a.sender) {
                Some(h) => h.fingerprint.clone().with_context(|| {
                    format!(
                        "{at}: allowed sender {:?} is in [hosts] but has no `fingerprint`",
                        a.sender
                    )
                })?,
                None => a.sender.clone(),
            };
            allow.push(Value::String(format!("{fingerprint}={}", a.root)));
        }
        options.insert("allow".into(), Value::Array(allow));
        Ok(hosts
            .into_iter()
            .map(|host| {
                let mut entry = for_host(&options, &host);
                if !entry.contains_key("listen") {
                    // A receiver named in [hosts] listens on the port its address gives.
                    if let Some((_, port)) = self
                        .file
                        .hosts
                        .get(&host)
                        .and_then(|h| h.address.as_deref())
                        .and_then(|addr| addr.rsplit_once(':'))
                    {
                        entry.insert("listen".into(), Value::String(format!("[::]:{port}")));
                    }
                }
                Receiver {
                    entry,
                    label: format!(
                        "config file {}: receiver on host {host:?}",
                        self.path.display()
                    ),
                    host,
                }
            })
            .collect())
    }

    /// Every job, for every host that runs it, in file order.
    pub fn jobs(&self) -> anyhow::Result<Vec<Job>> {
        let mut out = Vec::new();
        for i in 0..self.file.jobs.len() {
            out.extend(self.job(i)?);
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
        for i in 0..self.file.receivers.len() {
            out.extend(self.receiver(i)?);
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
}

/// The jobs `zq-send run --config PATH` runs: those of the file for `cli`'s host (only
/// `--job`'s, if the command line gave it), each under the flags and environment `given`
/// (in pull mode, listening on its `listen`).
pub fn runs(
    path: &Path,
    cli: &crate::run::RunArgs,
    given: Option<&clap::ArgMatches>,
    pull: bool,
) -> anyhow::Result<Vec<Run>> {
    let given_ids = given.map(crate::Given::new).unwrap_or_default();
    let config = Config::load(path)?;
    let host = cli.host.clone().unwrap_or_else(this_host);
    let mut jobs = config.jobs_for(&host)?;
    if jobs.is_empty() {
        bail!(
            "config file {} has no job for host {host:?} (hosts named in it: {}); set --host",
            path.display(),
            config.host_names()?.join(", ")
        );
    }
    if let (true, Some(only)) = (given_ids.has("job"), &cli.job) {
        jobs.retain(|j| &j.name == only);
        if jobs.is_empty() {
            bail!(
                "config file {} has no job {only:?} for host {host:?}",
                path.display()
            );
        }
    }
    if jobs.len() > 1 {
        for (id, flag) in [
            ("metrics_listen", "--metrics-listen"),
            ("status_file", "--status-file"),
        ] {
            if given_ids.has(id) {
                bail!(
                    "{flag} would be the same for the {} jobs of host {host:?}: set it per job \
                     in the config file, or run one job with --job",
                    jobs.len()
                );
            }
        }
    }
    jobs.iter().map(|job| job.run(given, pull)).collect()
}

/// `options` with `{host}` replaced by `host` in every string.
fn for_host(options: &Table, host: &str) -> Table {
    fn replace(v: &Value, host: &str) -> Value {
        match v {
            Value::String(s) => Value::String(s.replace(HOST_PLACEHOLDER, host)),
            Value::Array(a) => Value::Array(a.iter().map(|v| replace(v, host)).collect()),
            Value::Table(t) => Value::Table(for_host(t, host)),
            other => other.clone(),
        }
    }
    options
        .iter()
        .map(|(k, v)| (k.clone(), replace(v, host)))
        .collect()
}

/// A daemon job's default jitter: its period, at most [`MAX_DEFAULT_JITTER`].
fn default_jitter(options: &Table) -> Option<String> {
    let period = ["every", "snapshot_every"]
        .iter()
        .find_map(|k| options.get(*k).and_then(Value::as_str))?;
    let period = humantime::parse_duration(period).ok()?;
    Some(humantime::format_duration(period.min(MAX_DEFAULT_JITTER)).to_string())
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

    const FP_SEND: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
    const FP_RECV: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
    const FP_OTHER: &str = "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3";

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
recursive = true
every = "10s"
jitter = "0s"

[[receivers]]
host = "backup"
identity = "/etc/zq"
allow = [{{ sender = "db1", root = "backup/db1" }}, {{ sender = "{FP_OTHER}", root = "backup/db2" }}]
"#
        )
    }

    #[test]
    fn a_fleet_resolves_per_host_with_defaults_and_placeholders() {
        let c = parse(&fleet()).unwrap();
        let db1 = c.jobs_for("db1").unwrap();
        assert_eq!(db1.len(), 1);
        assert_eq!(
            db1[0].command_line().unwrap(),
            format!(
                "tank/home backup.example:7446 backup/db1/home --identity /etc/zq \
                 --peer {FP_RECV} --recursive --job home --exclude cache \
                 --exclude-property zq:replicate=off --every 1s --jitter 1s --keep-last 50"
            )
        );
        let run = db1[0].run(None, false).unwrap();
        assert_eq!(run.target.as_str(), "backup/db1/home");
        assert_eq!(run.retention.keep_last, Some(50));
        assert_eq!(run.name.as_deref(), Some("home"));
        let db2 = c.jobs_for("db2.example.net").unwrap();
        assert_eq!(
            db2.iter().map(|j| j.name.as_str()).collect::<Vec<_>>(),
            ["home", "vm"]
        );
        // Its own jitter wins over the default; its own period over [defaults].
        let vm = db2[1].run(None, false).unwrap();
        assert_eq!(vm.every, Some(Duration::from_secs(10)));
        assert_eq!(vm.jitter, Duration::ZERO);
        assert!(c.jobs_for("web1").unwrap().is_empty());
        let r = c.receiver_for("backup").unwrap().unwrap();
        assert_eq!(
            r.command_line().unwrap(),
            format!(
                "--listen [::]:7446 --identity /etc/zq --allow {FP_SEND}=backup/db1 \
                 --allow {FP_OTHER}=backup/db2"
            )
        );
        assert_eq!(r.serve(None).unwrap().allow.len(), 2);
        assert!(c.receiver_for("db1").unwrap().is_none());
        assert_eq!(c.host_names().unwrap(), ["backup", "db1", "db2"]);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_place() {
        let e = parse("[[jobs]]\nname = \"a\"\nevry = \"1s\"\n").unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("job \"a\": unknown key `evry` (did you mean `every`?)"),
            "{msg}"
        );
        let e =
            parse("[defaults.filter]\nexclude_regexp = []\n[[jobs]]\nname = \"a\"\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("did you mean `filter.exclude_regex`"),
            "{e:#}"
        );
        let e = parse("[[jobs]]\nrecursive = \"yes\"\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("`recursive`: expected true or false"),
            "{e:#}"
        );
        let e = parse("[hosts.a]\nadress = \"x:1\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
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
        let e = parse(&job(&format!("receiver = \"b\"\npeer = \"{FP_RECV}\"\n"))).unwrap_err();
        assert!(format!("{e:#}").contains("expected HOST:PORT"), "{e:#}");
        let peer = format!("receiver = \"b:1\"\npeer = \"{FP_RECV}\"\n");
        let twice = format!("{}{}", job(&peer), job(&peer));
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
    fn runs_are_a_hosts_jobs_under_the_command_line() {
        use clap::{CommandFactory, FromArgMatches};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zq.toml");
        std::fs::write(&path, fleet()).unwrap();
        let cli = |args: &[&str]| {
            let mut argv = vec!["--config", path.to_str().unwrap()];
            argv.extend(args);
            let m = crate::run::RunOnly::command()
                .try_get_matches_from(argv)
                .unwrap();
            let args = crate::run::RunOnly::from_arg_matches(&m).unwrap().args;
            (args, m)
        };
        let (args, m) = cli(&["--host", "db2", "--max-steps", "9"]);
        let both = runs(&path, &args, Some(&m), false).unwrap();
        assert_eq!(both.len(), 2);
        assert!(both.iter().all(|r| r.concurrency.steps == 9));
        let (args, m) = cli(&["--host", "db2", "--job", "vm"]);
        let one = runs(&path, &args, Some(&m), false).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name.as_deref(), Some("vm"));
        for (argv, says) in [
            (&["--host", "db2", "--job", "x"][..], "has no job \"x\""),
            (&["--host", "web"], "no job for host \"web\""),
            (&["--host", "db2", "--status-file", "/s"], "set it per job"),
        ] {
            let (args, m) = cli(argv);
            let e = runs(&path, &args, Some(&m), false).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{e:#}");
        }
        let (args, m) = cli(&["--host", "db1"]);
        let e = runs(&path, &args, Some(&m), true).unwrap_err();
        assert!(format!("{e:#}").contains("no `listen` address"), "{e:#}");
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
