//! `zq-send run`'s options and the job they describe. The same structs are filled from the
//! command line by clap and from a config file's job through [`crate::options`] (the
//! groups `filter`, `protection`, `retention`, `concurrency`, `transport` and `send` are its
//! tables), so an option is declared once, here. [`Run`] is a checked job, and turns its
//! options into the engine's configuration in one place each ([`Run::job`],
//! [`Run::sender_config`], [`Run::connect_config`], [`Run::daemon_options`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use zq_net::{Fingerprint, HostPort, Identity, Tuning};
use zq_repl::filter::{DatasetFilter, PropertyMatch, SnapshotFilter};
use zq_repl::progress::Progress;
use zq_repl::protect::{Modes, Protection, Protector, Tags};
use zq_repl::retention::{Grid, Policy, Retention};
use zq_repl::{ConnectConfig, Connector, DaemonOptions, Job, PlanOptions, SenderConfig};
use zq_store::{DatasetName, Zfs};

use crate::exit;
use crate::options::Options;

/// `--keep-last` when zq creates the snapshots and the user did not say.
pub const DEFAULT_KEEP_LAST: usize = 100;

/// The tables of a config file's job: the `#[group(id)]`s below.
pub const TABLES: &[&str] = &[
    "filter",
    "protection",
    "retention",
    "concurrency",
    "transport",
    "send",
];

/// Options of the command line only: `--config` and `--host` choose the file's jobs, and
/// a file names its receiver (`receiver`) and job (`name`) in keys of its own.
pub const CLI_ONLY: &[&str] = &["config", "host", "addr", "job"];

/// `zq-send run`'s arguments (also `serve`'s and `prune`'s, and a config file's job).
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Source dataset, e.g. tank/home [required unless --config].
    #[arg(required_unless_present = "config", conflicts_with = "config")]
    pub source: Option<DatasetName>,
    /// Receiver address, HOST:PORT, e.g. backup.example:7446 or [::1]:7446 [required
    /// unless --config].
    #[arg(required_unless_present = "config")]
    pub addr: Option<HostPort>,
    /// Target dataset on the receiver, inside the root the receiver allows for us
    /// [required unless --config].
    #[arg(required_unless_present = "config")]
    pub target: Option<DatasetName>,

    /// Run the jobs of this config file that name this host (see --host), each as if its
    /// keys were flags; flags and environment variables given here override the file for
    /// all of them. With --job NAME, only that job. See docs/operations.md, "Config file".
    #[arg(
        long,
        value_name = "FILE",
        env = "ZQ_CONFIG",
        help_heading = "Config file"
    )]
    pub config: Option<PathBuf>,
    /// With --config: the host whose jobs to run [default: this machine's host name].
    #[arg(
        long,
        value_name = "NAME",
        env = "ZQ_HOST",
        requires = "config",
        help_heading = "Config file"
    )]
    pub host: Option<String>,

    /// Directory holding this sender's identity (see `keygen`) [required unless --config].
    #[arg(
        long,
        value_name = "DIR",
        env = "ZQ_IDENTITY",
        required_unless_present = "config",
        help_heading = "Connection"
    )]
    pub identity: Option<PathBuf>,
    /// The receiver's fingerprint, as printed by `zq-recv keygen` / `fingerprint`
    /// [required unless --config].
    #[arg(
        long,
        value_name = "FINGERPRINT",
        required_unless_present = "config",
        help_heading = "Connection"
    )]
    pub peer: Option<Fingerprint>,
    /// How long the connection may go without a packet before it is given up (and a
    /// daemon reconnects, resuming interrupted large steps). Keep-alives go every third of
    /// it; the receiver's own limit (30s) applies if shorter.
    #[arg(long, value_name = "DURATION", value_parser = parse_period, default_value = "30s", help_heading = "Connection")]
    pub idle_timeout: Duration,
    /// Abandon (and retry, resuming it) a step whose data the receiver has not accepted
    /// for this long while the connection stays alive: a hung receiver or zfs receive.
    #[arg(long, value_name = "DURATION", value_parser = parse_period, default_value = "120s", help_heading = "Connection")]
    pub stall_timeout: Duration,
    /// Speak only this protocol version (for compatibility testing).
    #[arg(long, hide = true)]
    pub protocol_version: Option<u16>,

    /// Also replicate every descendant dataset (parents before children).
    #[arg(long, short = 'r', help_heading = "What to replicate")]
    pub recursive: bool,
    /// Send only the newest snapshot (zfs send -i) instead of every intermediate (-I).
    #[arg(long, short = 'i', help_heading = "What to replicate")]
    pub newest_only: bool,
    /// Roll back a diverged destination to the common base, or replace a destination that
    /// has no snapshot in common. Destroys destination snapshots; never done without it.
    #[arg(long, help_heading = "What to replicate")]
    pub force: bool,
    /// The zfs program to run.
    #[arg(
        long,
        default_value = "zfs",
        value_name = "PATH",
        env = "ZQ_ZFS",
        help_heading = "What to replicate"
    )]
    pub zfs: PathBuf,
    /// Name of this replication job, in the holds it places (zq_<NAME> on the source,
    /// zq_<NAME>_last on the destination). Default: derived from the receiver's key and
    /// TARGET (printed at start). With --config: run only the job of this name.
    #[arg(long, value_name = "NAME", help_heading = "What to replicate")]
    pub job: Option<String>,
    #[command(flatten)]
    pub filter: FilterArgs,

    /// Run as a daemon: replicate at least this often (e.g. 1s, 100ms) until SIGTERM or
    /// SIGINT, reconnecting as needed. Without --snapshot-every it replicates snapshots
    /// that something else creates.
    #[arg(long, value_name = "DURATION", value_parser = parse_period, help_heading = "Daemon")]
    pub every: Option<Duration>,
    /// Create the snapshot zq_<UTC time> of the source (recursively with --recursive)
    /// this often and replicate right after each. Implies --every with the same period
    /// unless given.
    #[arg(long, value_name = "DURATION", value_parser = parse_period, help_heading = "Daemon")]
    pub snapshot_every: Option<Duration>,
    /// Wait a random time up to this before starting (spreads a fleet's load).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0s", help_heading = "Daemon")]
    pub jitter: Duration,
    /// Write the status that `zq-send status` shows to this file on every tick
    /// [default: $RUNTIME_DIRECTORY or /run/zq, file send-<SOURCE>--<TARGET>.json].
    #[arg(long, value_name = "PATH", help_heading = "Daemon")]
    pub status_file: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics (replication lag, steps, failures,
    /// bytes and resumes per dataset; the connection's RTT, window and losses; zfs command
    /// durations). Off by default; e.g. 127.0.0.1:9746.
    #[arg(long, value_name = "ADDR", help_heading = "Daemon")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub concurrency: ConcurrencyArgs,

    #[command(flatten)]
    pub protection: ProtectionArgs,

    #[command(flatten)]
    pub retention: RetentionArgs,

    /// Compress chunks with zstd: none, auto (zstd level 1, but chunks that do not shrink
    /// make the next ones go raw for a while: already-compressed or encrypted data costs
    /// almost nothing; and chunks go raw while the link is faster than zstd on this host),
    /// zstd (level 3) or zstd:LEVEL. Used only where the receiver agrees; checksums are of
    /// the original bytes.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "none",
        env = "ZQ_COMPRESS",
        help_heading = "Network"
    )]
    pub compress: zq_proto::Compression,
    #[command(flatten)]
    pub send: SendArgs,
    /// Keep the replication data of all datasets together under SIZE per second (e.g.
    /// 50MB, 10MiB), measured after compression. Default (or 0): no limit.
    #[arg(long, value_name = "SIZE", value_parser = crate::parse_size, env = "ZQ_BWLIMIT", help_heading = "Network")]
    pub bwlimit: Option<u64>,
    /// Open N connections to the receiver and spread each bulk step's chunks over all of
    /// them (steps under 1 MiB stay on one). One connection's congestion window caps a
    /// stream on a long or lossy path; several fill more of it. 1 to 16; the receiver
    /// must speak protocol version 5; not with `serve`.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=16), help_heading = "Network")]
    pub connections: u8,
    #[command(flatten)]
    pub transport: crate::TransportArgs,

    /// One-shot: run the job again this many times while datasets fail with errors that
    /// may pass (a lost connection, a zfs command that failed on either side), waiting
    /// --retry-delay, then twice as long each time up to a minute (with jitter). Refusals
    /// are never retried.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2,
        help_heading = "One-shot runs"
    )]
    pub retries: u32,
    /// One-shot: the wait before the first retry (see --retries).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s", help_heading = "One-shot runs")]
    pub retry_delay: Duration,
    /// One-shot: no progress line (it is shown on a terminal for steps that run longer
    /// than a second: bytes, rate and, where zfs estimates the size, the time left).
    #[arg(long, help_heading = "One-shot runs")]
    pub no_progress: bool,
}

/// Which `zfs send` options steps use (`[jobs.send]`). Each goes only where the local zfs
/// and both pools can (the receiver says what its pool has, protocol version 6); on
/// zfs-fuse every stream is plain.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "send")]
pub struct SendArgs {
    /// How encrypted datasets go: raw (zfs send -w: blocks stay encrypted, the receiving
    /// host needs no key and never sees plaintext) or decrypt (plain zfs send: the
    /// receiver gets plaintext, encrypted only if it receives under an encrypted dataset
    /// whose key it has; a replica made so cannot take raw incrementals later).
    #[arg(
        long,
        value_name = "raw|decrypt",
        default_value = "raw",
        help_heading = "ZFS send"
    )]
    pub encrypted: zq_repl::sendflags::Encrypted,
    /// Compressed blocks as they are on disk (zfs send -c): no decompression for the
    /// stream, wire bytes close to the on-disk size. on or off.
    #[arg(long = "send-compressed", value_name = "on|off", default_value = "on",
          value_parser = parse_on_off, action = clap::ArgAction::Set, help_heading = "ZFS send")]
    pub compressed: bool,
    /// Blocks over 128 KiB as they are (zfs send -L), not split. on or off.
    #[arg(long = "send-large-blocks", value_name = "on|off", default_value = "on",
          value_parser = parse_on_off, action = clap::ArgAction::Set, help_heading = "ZFS send")]
    pub large_blocks: bool,
    /// Small blocks embedded in their block pointers stay so (zfs send -e); never into an
    /// encrypted destination, which cannot receive them. on or off.
    #[arg(long = "send-embedded", value_name = "on|off", default_value = "on",
          value_parser = parse_on_off, action = clap::ArgAction::Set, help_heading = "ZFS send")]
    pub embedded: bool,
    /// Carry each dataset's properties in its stream (zfs send -p): what was set on the
    /// source is set on the replica. The receiver never applies the source's mountpoint,
    /// canmount, sharenfs or sharesmb, nor its keylocation. Not for an encrypted dataset
    /// sent with --encrypted decrypt (zfs refuses). Needs zq-recv with protocol 8 on
    /// OpenZFS. on or off.
    #[arg(long = "send-properties", value_name = "on|off", default_value = "off",
          value_parser = parse_on_off, action = clap::ArgAction::Set, help_heading = "ZFS send")]
    pub properties: bool,
    /// Ask the receiver to set PROP to VALUE on every dataset it receives (zfs receive
    /// -o); repeatable. What the receiver forces (zq-recv --force-property) wins; never
    /// mountpoint, canmount, sharenfs, sharesmb or an encryption property.
    #[arg(long, value_name = "PROP=VALUE", value_parser = crate::serve::parse_property, help_heading = "ZFS send")]
    pub recv_set_property: Vec<(String, String)>,
    /// Ask the receiver not to apply PROP from the stream (zfs receive -x: the replica
    /// inherits it there); repeatable. Not an encryption property.
    #[arg(long, value_name = "PROP", help_heading = "ZFS send")]
    pub recv_exclude_property: Vec<String>,
}

impl SendArgs {
    /// The job's [`zq_repl::props::PropertyPolicy`], checked.
    pub fn properties(&self) -> Result<zq_repl::props::PropertyPolicy, String> {
        zq_repl::props::PropertyPolicy::new(
            self.properties,
            self.recv_set_property.clone(),
            self.recv_exclude_property.clone(),
        )
    }

    /// The engine's [`zq_repl::sendflags::SendPolicy`].
    pub fn policy(&self) -> zq_repl::sendflags::SendPolicy {
        zq_repl::sendflags::SendPolicy {
            encrypted: self.encrypted,
            compressed: self.compressed,
            large_blocks: self.large_blocks,
            embedded: self.embedded,
        }
    }
}

/// `on`/`off` (also `true`/`false`, `yes`/`no`: a config file may say either).
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        other => Err(format!("{other:?} is not on or off")),
    }
}

/// Which datasets and snapshots a job replicates (`[jobs.filter]`).
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "filter")]
#[command(next_help_heading = "Filters")]
pub struct FilterArgs {
    /// With --recursive: leave out DATASET and everything below it (repeatable; a name
    /// relative to SOURCE, or the full name).
    #[arg(long, value_name = "DATASET")]
    pub exclude: Vec<String>,
    /// With --recursive: leave out datasets whose whole name matches REGEX (repeatable;
    /// e.g. 'tank/home/[^/]+/cache'; 'tank/tmp(/.*)?' for a subtree).
    #[arg(long, value_name = "REGEX", value_parser = zq_repl::filter::anchored)]
    pub exclude_regex: Vec<regex::Regex>,
    /// With --recursive: replicate only datasets whose whole name matches one REGEX
    /// (repeatable), less the excluded ones.
    #[arg(long, value_name = "REGEX", value_parser = zq_repl::filter::anchored)]
    pub include_regex: Vec<regex::Regex>,
    /// With --recursive: leave out datasets whose user property has this value, e.g.
    /// zq:replicate=off (ZFS inherits it, so it covers the subtree; read at every listing).
    #[arg(long, value_name = "PROPERTY=VALUE")]
    pub exclude_property: Option<PropertyMatch>,
    /// With --recursive: do not replicate SOURCE itself, only its descendants.
    #[arg(long)]
    pub skip_parent: bool,
    /// Replicate only snapshots whose name (after @) matches one REGEX (repeatable; e.g.
    /// 'autosnap_.*_(hourly|daily)' for sanoid's). Steps then use chains of zfs send -i
    /// between kept snapshots, never -I, which would carry the others.
    #[arg(long, value_name = "REGEX", value_parser = zq_repl::filter::anchored)]
    pub include_snapshots: Vec<regex::Regex>,
    /// Leave out snapshots whose name (after @) matches REGEX (repeatable), as
    /// --include-snapshots does.
    #[arg(long, value_name = "REGEX", value_parser = zq_repl::filter::anchored)]
    pub exclude_snapshots: Vec<regex::Regex>,
}

/// What holds protect replication (`[jobs.protection]`).
#[derive(clap::Args, Debug, Clone)]
#[group(id = "protection")]
#[command(next_help_heading = "Protection")]
pub struct ProtectionArgs {
    /// What holds protect replication (both initial and incremental steps):
    /// guarantee_resumability (a step's snapshots held until it commits, a cursor, a
    /// last-received hold), guarantee_incremental (cursor and last-received hold),
    /// guarantee_nothing.
    #[arg(
        long = "protection",
        value_name = "MODE",
        default_value = "guarantee_resumability"
    )]
    pub mode: Protection,
    /// Protection of initial (full) steps, if other than --protection.
    #[arg(long = "protection-initial", value_name = "MODE")]
    pub initial: Option<Protection>,
    /// Protection of incremental steps, if other than --protection.
    #[arg(long = "protection-incremental", value_name = "MODE")]
    pub incremental: Option<Protection>,
}

/// Retention of zq's own snapshots on both sides (`[jobs.retention]`).
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "retention")]
#[command(next_help_heading = "Retention (daemon and prune)")]
pub struct RetentionArgs {
    /// Keep the newest N of zq's own snapshots (names starting with zq_) on both sides,
    /// never the common base or anything not yet replicated. Other snapshots are never
    /// touched. Default 100 with --snapshot-every, otherwise off.
    #[arg(long = "keep-last", value_name = "N")]
    pub keep_last: Option<usize>,
    /// Retention by age on both sides, as well as --keep-last (a snapshot either keeps
    /// stays): AGE=PERIOD rules from young to old, e.g. 1h=all,24h=hourly,30d=daily keeps
    /// every zq_ snapshot of the last hour, then the oldest of each hour for a day, of each
    /// day for 30 days, and none older (periods: all, minutely, hourly, daily, weekly,
    /// monthly, yearly, or a duration). Same safeguards as --keep-last.
    #[arg(long = "keep-grid", value_name = "GRID")]
    pub grid: Option<Grid>,
    /// Retention on the target by count; with --target-keep-grid, the target's own policy
    /// instead of --keep-last/--keep-grid (e.g. keep more on the backup).
    #[arg(long = "target-keep-last", value_name = "N")]
    pub target_keep_last: Option<usize>,
    /// Retention on the target by age (see --keep-grid and --target-keep-last).
    #[arg(long = "target-keep-grid", value_name = "GRID")]
    pub target_grid: Option<Grid>,
}

/// How much runs at once (`[jobs.concurrency]`).
#[derive(clap::Args, Debug, Clone)]
#[group(id = "concurrency")]
#[command(next_help_heading = "Daemon")]
pub struct ConcurrencyArgs {
    /// Most replication steps in flight at once. Steps that have sent 1 MiB move to a bulk
    /// lane with as many slots again, so large transfers never block small ones. A one-shot
    /// run replicates this many sibling datasets at once.
    #[arg(long = "max-steps", value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub steps: u16,
    /// Most size estimations running at once (zfs send -nvP; on zfs-fuse the snapshot's
    /// referenced size for full streams). They run beside bulk steps for progress and
    /// status only; no step waits for one.
    #[arg(long = "max-size-estimates", value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub size_estimates: u16,
}

/// `run`'s arguments alone: what a config file's job is read as.
#[derive(clap::Parser, Debug)]
#[command(name = "zq-send run", no_binary_name = true)]
pub struct RunOnly {
    #[command(flatten)]
    pub args: RunArgs,
}

/// The keys of a config file's job and how they parse.
pub fn options() -> Options {
    Options::new(
        <RunOnly as clap::CommandFactory>::command(),
        TABLES,
        CLI_ONLY,
    )
}

/// A duration: `100ms`, `1s`, `5m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 100ms, 1s, 5m)"))
}

/// A period: a duration longer than zero.
pub fn parse_period(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: a period must be longer than zero")),
        d => Ok(d),
    }
}

/// `--exclude NAME`: a dataset inside `source`, by full name or relative to it.
fn exclude_name(source: &DatasetName, name: &str) -> Result<DatasetName, String> {
    let full = DatasetName::parse(name)
        .ok()
        .filter(|d| d.is_within(source))
        .map_or_else(|| DatasetName::parse(&format!("{source}/{name}")), Ok)
        .map_err(|e| format!("{name:?}: {e}"))?;
    if &full == source {
        return Err(format!("{name:?} is the source itself: use --skip-parent"));
    }
    Ok(full)
}

/// One job, checked: what the command line or the config file must give, present.
#[derive(Debug)]
pub struct Run {
    /// The config file's name of the job (for logs).
    pub name: Option<String>,
    pub source: DatasetName,
    pub addr: HostPort,
    pub target: DatasetName,
    pub identity: PathBuf,
    pub peer: Fingerprint,
    pub args: RunArgs,
}

/// The job's other settings, as given (`run.every`, …).
impl std::ops::Deref for Run {
    type Target = RunArgs;
    fn deref(&self) -> &RunArgs {
        &self.args
    }
}

impl Run {
    /// Checks what clap cannot, since a config file may give part of it; a failure is a
    /// usage error.
    pub fn new(args: RunArgs) -> anyhow::Result<Run> {
        Self::check(args).map_err(exit::usage)
    }

    fn check(args: RunArgs) -> anyhow::Result<Run> {
        let need = |what: &str| anyhow::anyhow!("{what} is missing");
        let f = &args.filter;
        if !args.recursive {
            for (set, flag) in [
                (!f.exclude.is_empty(), "--exclude"),
                (!f.exclude_regex.is_empty(), "--exclude-regex"),
                (!f.include_regex.is_empty(), "--include-regex"),
                (f.exclude_property.is_some(), "--exclude-property"),
                (f.skip_parent, "--skip-parent"),
            ] {
                if set {
                    anyhow::bail!("{flag} needs --recursive (recursive = true in a config file)");
                }
            }
        }
        if let Some(job) = &args.job {
            Tags::new(job).map_err(|e| anyhow::anyhow!("--job {job:?}: {e}"))?;
        }
        if args.metrics_listen.is_some() && args.every.or(args.snapshot_every).is_none() {
            anyhow::bail!("--metrics-listen needs a daemon (--every or --snapshot-every): a one-shot run ends before anyone scrapes it");
        }
        let ours = zq_repl::daemon::snapshot_name(std::time::SystemTime::now());
        if args.snapshot_every.is_some() && !snapshot_filter(f).keeps(&ours) {
            anyhow::bail!(
                "--snapshot-every creates snapshots named like {ours}, which \
                 --include-snapshots/--exclude-snapshots leave out: nothing would be replicated"
            );
        }
        Ok(Run {
            name: None,
            source: args.source.clone().ok_or_else(|| need("SOURCE"))?,
            addr: args.addr.clone().ok_or_else(|| need("ADDR"))?,
            target: args.target.clone().ok_or_else(|| need("TARGET"))?,
            identity: args.identity.clone().ok_or_else(|| need("--identity"))?,
            peer: args.peer.ok_or_else(|| need("--peer"))?,
            args,
        })
    }

    /// Its daemon period, if it is a daemon (`--every`, else `--snapshot-every`).
    pub fn daemon_every(&self) -> Option<Duration> {
        self.every.or(self.snapshot_every)
    }

    /// What to replicate.
    pub fn job(&self) -> anyhow::Result<Job> {
        let f = &self.filter;
        let exclude = f
            .exclude
            .iter()
            .map(|e| exclude_name(&self.source, e))
            .collect::<Result<_, _>>()
            .map_err(|e| exit::usage(anyhow::anyhow!("--exclude {e}")))?;
        Ok(Job {
            source: self.source.clone(),
            target: self.target.clone(),
            recursive: self.recursive,
            filter: DatasetFilter {
                exclude,
                exclude_regex: f.exclude_regex.clone(),
                include_regex: f.include_regex.clone(),
                exclude_property: f.exclude_property.clone(),
                skip_parent: f.skip_parent,
            },
            snapshots: snapshot_filter(f),
            parallel: usize::from(self.concurrency.steps),
            options: PlanOptions {
                newest_only: self.newest_only,
                force: self.force,
                // Chosen by the sender from the zfs capabilities.
                chain_up_to: 0,
            },
        })
    }

    /// The name of its holds: `--job`, or one derived from the receiver's key and TARGET.
    pub fn job_name(&self) -> String {
        self.job
            .clone()
            .unwrap_or_else(|| zq_repl::protect::default_job(&self.peer.to_string(), &self.target))
    }

    /// How each connection's sender sends: protection, compression, limits.
    pub fn sender_config(
        &self,
        zfs: &Zfs,
        progress: Option<Arc<Progress>>,
    ) -> anyhow::Result<SenderConfig> {
        let job_name = self.job_name();
        let tags = Tags::new(&job_name)
            .map_err(|e| exit::usage(anyhow::anyhow!("--job {job_name:?}: {e}")))?;
        let p = &self.protection;
        let modes = Modes {
            initial: p.initial.unwrap_or(p.mode),
            incremental: p.incremental.unwrap_or(p.mode),
        };
        tracing::info!(job = %job_name, initial = %modes.initial, incremental = %modes.incremental, "protection");
        Ok(SenderConfig {
            protector: Some(Arc::new(Protector::new(zfs.clone(), modes, tags))),
            stall_timeout: self.stall_timeout,
            compression: self.compress,
            bwlimit: self.bwlimit.filter(|&b| b > 0).map(zq_net::RateLimit::new),
            intermediates: snapshot_filter(&self.filter).is_empty(),
            progress,
            estimates: Arc::new(tokio::sync::Semaphore::new(usize::from(
                self.concurrency.size_estimates,
            ))),
            send: self.send.policy(),
            properties: self
                .send
                .properties()
                .map_err(|e| exit::usage(anyhow::anyhow!(e)))?,
        })
    }

    /// Where the receiver is and how to reach it; `pull`: pull mode, admitting
    /// connections as it says.
    pub fn connect_config(
        &self,
        identity: Identity,
        sender: SenderConfig,
        pull: Option<zq_net::AddressValidation>,
    ) -> ConnectConfig {
        ConnectConfig {
            identity,
            peer: self.peer,
            addr: self.addr.clone(),
            listen: pull.is_some(),
            daemon: self.daemon_every().is_some(),
            tuning: Tuning {
                idle_timeout: self.idle_timeout,
                keep_alive: Tuning::default().keep_alive.min(self.idle_timeout / 3),
                address_validation: pull.unwrap_or_default(),
                ..self.transport.tuning()
            },
            connections: self.connections,
            protocol_version: self.protocol_version,
            software: format!("zq-send {}", env!("CARGO_PKG_VERSION")),
            sender,
        }
    }

    /// Loads the identity, probes zfs and sets up the connection layer (nothing is
    /// connected yet); `pull`: pull mode, `progress`: where steps report.
    pub async fn connector(
        &self,
        pull: Option<zq_net::AddressValidation>,
        progress: Option<Arc<Progress>>,
    ) -> anyhow::Result<Connector> {
        use anyhow::Context;
        zq_repl::connector::check_connections(self.connections, pull.is_some())?;
        let identity = Identity::load(&self.identity, "zq-send").context("loading identity")?;
        let zfs = Zfs::probe(&self.zfs).await.context("probing zfs")?;
        let sender = self.sender_config(&zfs, progress)?;
        Ok(Connector::new(self.connect_config(identity, sender, pull), zfs).await?)
    }

    /// How its daemon runs (`every`: [`Run::daemon_every`]).
    pub fn daemon_options(
        &self,
        every: Duration,
        progress: Option<Arc<Progress>>,
    ) -> DaemonOptions {
        DaemonOptions {
            every,
            snapshot_every: self.snapshot_every,
            jitter: self.jitter,
            max_steps: usize::from(self.concurrency.steps),
            retention: self.retention(),
            status_file: Some(
                self.status_file
                    .clone()
                    .unwrap_or_else(|| crate::status::default_file(&self.source, &self.target)),
            ),
            receiver: self.addr.to_string(),
            metrics: None,
            progress,
        }
    }

    /// Retention on each side: the flags', and a daemon that makes its own snapshots keeps
    /// the last [`DEFAULT_KEEP_LAST`] when no retention flag is given (they would pile up
    /// at one per period).
    pub fn retention(&self) -> Retention {
        let r = &self.retention;
        let mut source = Policy {
            keep_last: r.keep_last,
            grid: r.grid.clone(),
        };
        let own = r.target_keep_last.is_some() || r.target_grid.is_some();
        if source.is_off() && !own && self.snapshot_every.is_some() {
            source.keep_last = Some(DEFAULT_KEEP_LAST);
        }
        let target = if own {
            Policy {
                keep_last: r.target_keep_last,
                grid: r.target_grid.clone(),
            }
        } else {
            source.clone()
        };
        Retention { source, target }
    }

    /// One line saying what the job does, for check-config.
    pub fn describe(&self) -> String {
        let f = &self.filter;
        let mut what = vec![];
        if self.recursive {
            what.push("recursive".to_owned());
        }
        let filters = f.exclude.len()
            + f.exclude_regex.len()
            + f.include_regex.len()
            + usize::from(f.exclude_property.is_some())
            + usize::from(f.skip_parent);
        if filters > 0 {
            what.push(format!("{filters} dataset filter(s)"));
        }
        let snapshot_filters = f.include_snapshots.len() + f.exclude_snapshots.len();
        if snapshot_filters > 0 {
            what.push(format!("{snapshot_filters} snapshot filter(s)"));
        }
        let d = humantime::format_duration;
        let daemon = |every| {
            format!(
                "replicates every {}, start jitter up to {}, up to {} steps at once, {}",
                d(every),
                d(self.jitter),
                self.concurrency.steps,
                retention_text(&self.retention())
            )
        };
        let how = match (self.every, self.snapshot_every) {
            (_, Some(s)) => format!(
                "daemon: snapshots every {}, {}",
                d(s),
                daemon(self.every.unwrap_or(s))
            ),
            (Some(e), None) => format!("daemon: {}", daemon(e)),
            (None, None) => "once".to_owned(),
        };
        let what = if what.is_empty() {
            String::new()
        } else {
            format!(" ({})", what.join(", "))
        };
        format!(
            "{}{what} -> {} on {} [{how}; protection {}]",
            self.source, self.target, self.addr, self.protection.mode
        )
    }
}

fn snapshot_filter(f: &FilterArgs) -> SnapshotFilter {
    SnapshotFilter {
        include: f.include_snapshots.clone(),
        exclude: f.exclude_snapshots.clone(),
    }
}

/// "source: keep …; target: keep …", or one of them when both sides agree.
fn retention_text(r: &Retention) -> String {
    if r.source == r.target {
        format!("retention {} on both sides", r.source)
    } else {
        format!("retention: source {}, target {}", r.source, r.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";

    fn run(extra: &str) -> anyhow::Result<Run> {
        let mut argv = vec![
            "tank/a",
            "b:7446",
            "backup/a",
            "--identity",
            "/k",
            "--peer",
            FP,
        ];
        argv.extend(extra.split_whitespace());
        let parsed = <RunOnly as clap::Parser>::try_parse_from(argv)?;
        Run::new(parsed.args)
    }

    #[test]
    fn options_turn_into_the_engines_configuration() {
        let r = run("-r --exclude tmp --snapshot-every 1s --max-steps 8").unwrap();
        let job = r.job().unwrap();
        assert_eq!(job.filter.exclude[0].as_str(), "tank/a/tmp");
        assert_eq!(r.daemon_every(), Some(Duration::from_secs(1)));
        let opts = r.daemon_options(Duration::from_secs(1), None);
        assert_eq!(opts.max_steps, 8);
        // A daemon making its own snapshots keeps the last 100 unless told.
        assert_eq!(opts.retention.source.keep_last, Some(DEFAULT_KEEP_LAST));
        assert_eq!(opts.receiver, "b:7446");
        assert!(
            r.describe().contains("daemon: snapshots every 1s"),
            "{}",
            r.describe()
        );
        let r = run("--keep-last 5 --target-keep-grid 1h=all").unwrap();
        let ret = r.retention();
        assert_eq!(ret.source.keep_last, Some(5));
        assert_eq!(ret.target.keep_last, None);
        assert!(ret.target.grid.is_some());
    }

    #[test]
    fn what_clap_cannot_check_is_a_usage_error() {
        for (extra, says) in [
            ("--exclude x", "--exclude needs --recursive"),
            (
                "--metrics-listen 127.0.0.1:9",
                "--metrics-listen needs a daemon",
            ),
            (
                "--snapshot-every 1s --include-snapshots daily_.*",
                "leave out: nothing would be replicated",
            ),
            ("--job a/b", "--job \"a/b\""),
        ] {
            let e = run(extra).unwrap_err();
            assert_eq!(exit::code(&e), exit::USAGE, "{extra}");
            assert!(format!("{e:#}").contains(says), "{extra}: {e:#}");
        }
        let e = run("-r --exclude tank/a").unwrap().job().unwrap_err();
        assert!(format!("{e:#}").contains("use --skip-parent"), "{e:#}");
    }

    #[test]
    fn every_option_is_a_key_of_a_job_or_of_its_tables() {
        let o = options();
        let top = o.keys(None);
        for key in [
            "source",
            "target",
            "identity",
            "every",
            "compress",
            "filter",
            "transport",
        ] {
            assert!(top.contains(&key.to_owned()), "{key}: {top:?}");
        }
        for key in CLI_ONLY {
            assert!(!top.contains(&key.to_string()), "{key}");
        }
        assert_eq!(
            o.keys(Some("protection")),
            ["incremental", "initial", "mode"]
        );
        assert_eq!(
            o.keys(Some("retention")),
            ["grid", "keep_last", "target_grid", "target_keep_last"]
        );
        assert_eq!(o.keys(Some("concurrency")), ["size_estimates", "steps"]);
    }
}
