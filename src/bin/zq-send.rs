//! `zq-send`: replicates local ZFS datasets to a `zq-recv` over one QUIC connection.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::io::IsTerminal;
use zq::exit::{self, UsageExt};
use zq::TransportArgs;
use zq_net::{Fingerprint, HostPort, Identity, Tuning};
use zq_repl::progress::Progress;
use zq_repl::protect::{Modes, Protection, Protector, Tags};
use zq_repl::{
    ConnectConfig, Connector, DaemonOptions, DatasetOutcome, Job, PlanOptions, SenderConfig,
};
use zq_store::{DatasetName, Zfs};

const ROLE: &str = "zq-send";

/// `--keep-last` when zq creates the snapshots and the user did not say.
const DEFAULT_KEEP_LAST: usize = 100;

/// Replicate ZFS snapshots to a zq-recv over one authenticated QUIC connection.
#[derive(Parser, Debug)]
#[command(name = "zq-send", version)]
struct Cli {
    #[command(flatten)]
    log: zq::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Identity(zq::IdentityCommand),
    /// Replicate SOURCE to TARGET on the receiver at ADDR, once (or as a daemon).
    Run(Box<RunArgs>),
    /// Show each running daemon's datasets: last replicated snapshot, its age (replication
    /// lag), snapshots not sent yet, last error. Reads the daemons' status files.
    Status(StatusArgs),
    /// Show or clean up the holds zq placed on source snapshots (step holds, cursors).
    #[command(subcommand)]
    Abstractions(AbstractionsCommand),
    /// Pull mode: replicate SOURCE to TARGET like `run`, but listen on ADDR and let the
    /// receiver (--peer, running `zq-recv pull`) connect: for a backup server behind NAT
    /// or a firewall. Data still flow from here; the receiver's --allow roots still apply.
    /// Takes run's arguments (ADDR is where to listen; port 0 picks one, printed as
    /// `listening on ADDR`).
    Serve(Box<RunArgs>),
    /// Apply a job's retention once on both sides, without replicating: what a daemon's
    /// retention pass would do (--keep-last, --keep-grid, --target-keep-*; a daemon with
    /// --snapshot-every keeps the last 100 by default). With --dry-run, destroy nothing and
    /// print what would go. Takes run's arguments (or --config and --job).
    Prune(Box<PruneArgs>),
    /// Check a config file (every job and receiver of every host in it) and print what
    /// this host would run: its jobs as `zq-send run` commands, its receiver as `zq-recv
    /// serve`. Exit 0 when valid, 2 otherwise.
    CheckConfig(CheckConfigArgs),
}

#[derive(Args, Debug)]
struct PruneArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Destroy nothing; print what would be destroyed on each side.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args, Debug)]
struct CheckConfigArgs {
    /// The config file.
    #[arg(long, value_name = "FILE", env = "ZQ_CONFIG")]
    config: PathBuf,
    /// Show what this host would run [default: this machine's host name].
    #[arg(long, value_name = "NAME", env = "ZQ_HOST", conflicts_with = "all")]
    host: Option<String>,
    /// Show what every host of the file would run.
    #[arg(long)]
    all: bool,
}

#[derive(Subcommand, Debug)]
enum AbstractionsCommand {
    /// List zq's holds on the snapshots of DATASET (zq_<job>: cursors and unfinished steps).
    List(AbstractionsArgs),
    /// Release the holds a stopped job does not need: all but each dataset's newest (its
    /// cursor, or an interrupted step; with --all, that one too: the job is retired). Stop
    /// the job's daemon first.
    ReleaseStale {
        #[command(flatten)]
        args: AbstractionsArgs,
        /// Also release each dataset's newest hold.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Args, Debug)]
struct AbstractionsArgs {
    /// Dataset whose snapshots to look at.
    dataset: DatasetName,
    /// Also its descendants.
    #[arg(long, short = 'r')]
    recursive: bool,
    /// The job (as given to `run --job`, or printed in its log). Required for
    /// release-stale; for list, required where zfs cannot list hold tags (zfs-fuse).
    #[arg(long, value_name = "NAME")]
    job: Option<String>,
    /// The zfs program to run.
    #[arg(long, default_value = "zfs", value_name = "PATH")]
    zfs: PathBuf,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Status files or directories holding them (default: where daemons write them).
    paths: Vec<PathBuf>,
    /// Print the status files' JSON (one document per line) instead of a table.
    #[arg(long, conflicts_with_all = ["warn_lag", "crit_lag"])]
    json: bool,
    /// Monitoring: WARNING (exit 1) when a dataset's newest replicated snapshot is older
    /// than this, or a dataset is failing, or a daemon is not connected. Either limit
    /// prints one summary line and one line per finding instead of the table, as
    /// monitoring plugins do (see docs/operations.md).
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    warn_lag: Option<Duration>,
    /// Monitoring: CRITICAL (exit 2) when a dataset's newest replicated snapshot is older
    /// than this, or nothing was replicated yet. No status file at all: UNKNOWN (exit 3).
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    crit_lag: Option<Duration>,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Source dataset, e.g. tank/home.
    #[arg(required_unless_present = "config", conflicts_with = "config")]
    source: Option<DatasetName>,
    /// Receiver address, host:port (e.g. backup.example:7446 or [::1]:7446).
    #[arg(required_unless_present = "config")]
    addr: Option<HostPort>,
    /// Target dataset on the receiver, inside the root the receiver allows for us.
    #[arg(required_unless_present = "config")]
    target: Option<DatasetName>,
    /// Run the jobs of this config file that name this host (see --host), each as if its
    /// keys were flags; flags and environment variables given here override the file for
    /// all of them. With --job NAME, only that job. See docs/operations.md, "Config file".
    #[arg(long, value_name = "FILE", env = "ZQ_CONFIG")]
    config: Option<PathBuf>,
    /// With --config: the host whose jobs to run [default: this machine's host name].
    #[arg(long, value_name = "NAME", env = "ZQ_HOST", requires = "config")]
    host: Option<String>,
    /// Directory holding this sender's identity (see `keygen`).
    #[arg(
        long,
        value_name = "DIR",
        env = "ZQ_IDENTITY",
        required_unless_present = "config"
    )]
    identity: Option<PathBuf>,
    /// The receiver's fingerprint, as printed by `zq-recv keygen` / `fingerprint`.
    #[arg(long, value_name = "FINGERPRINT", required_unless_present = "config")]
    peer: Option<Fingerprint>,
    /// Also replicate every descendant dataset (parents before children).
    #[arg(long, short = 'r')]
    recursive: bool,
    /// With --recursive: leave out DATASET and everything below it (repeatable; a name
    /// relative to SOURCE, or the full name).
    #[arg(long, value_name = "DATASET")]
    exclude: Vec<String>,
    /// With --recursive: leave out datasets whose whole name matches REGEX (repeatable;
    /// e.g. 'tank/home/[^/]+/cache'; 'tank/tmp(/.*)?' for a subtree).
    #[arg(long, value_name = "REGEX", value_parser = zq_repl::filter::anchored)]
    exclude_regex: Vec<regex::Regex>,
    /// With --recursive: replicate only datasets whose whole name matches one REGEX
    /// (repeatable), less the excluded ones.
    #[arg(long, value_name = "REGEX", value_parser = zq_repl::filter::anchored)]
    include_regex: Vec<regex::Regex>,
    /// With --recursive: leave out datasets whose user property has this value, e.g.
    /// zq:replicate=off (ZFS inherits it, so it covers the subtree; read at every listing).
    #[arg(long, value_name = "PROPERTY=VALUE")]
    exclude_property: Option<zq_repl::filter::PropertyMatch>,
    /// With --recursive: do not replicate SOURCE itself, only its descendants.
    #[arg(long)]
    skip_parent: bool,
    /// Replicate only snapshots whose name (after @) matches one REGEX (repeatable; e.g.
    /// 'autosnap_.*_(hourly|daily)' for sanoid's). Steps then use chains of zfs send -i
    /// between kept snapshots, never -I, which would carry the others.
    #[arg(long, value_name = "REGEX", value_parser = zq_repl::filter::anchored)]
    include_snapshots: Vec<regex::Regex>,
    /// Leave out snapshots whose name (after @) matches REGEX (repeatable), as
    /// --include-snapshots does.
    #[arg(long, value_name = "REGEX", value_parser = zq_repl::filter::anchored)]
    exclude_snapshots: Vec<regex::Regex>,
    /// Send only the newest snapshot (zfs send -i) instead of every intermediate (-I).
    #[arg(long, short = 'i')]
    newest_only: bool,
    /// Roll back a diverged destination to the common base, or replace a destination that
    /// has no snapshot in common. Destroys destination snapshots; never done without it.
    #[arg(long)]
    force: bool,
    /// The zfs program to run.
    #[arg(long, default_value = "zfs", value_name = "PATH", env = "ZQ_ZFS")]
    zfs: PathBuf,
    /// Run as a daemon: replicate at least this often (e.g. 1s, 100ms) until SIGTERM or
    /// SIGINT, reconnecting as needed. Without --snapshot-every it replicates snapshots
    /// that something else creates.
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    every: Option<Duration>,
    /// Daemon: create the snapshot zq_<UTC time> of the source (recursively with
    /// --recursive) this often and replicate right after each. Implies --every with the
    /// same period unless given.
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    snapshot_every: Option<Duration>,
    /// Daemon: wait a random time up to this before starting (spreads a fleet's load).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0s")]
    jitter: Duration,
    /// Daemon: most replication steps in flight at once. Steps that have sent 1 MiB move
    /// to a bulk lane with as many slots again, so large transfers never block small ones.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    max_steps: u16,
    /// Most size estimations running at once (zfs send -nvP; on zfs-fuse the snapshot's
    /// referenced size for full streams). They run beside bulk steps for progress and
    /// status only; no step waits for one.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    max_size_estimates: u16,
    /// Daemon: retention of zq's own snapshots (names starting with zq_) on both sides:
    /// keep the newest N, never the common base or anything not yet replicated. Other
    /// snapshots are never touched. Default 100 with --snapshot-every, otherwise off.
    #[arg(long, value_name = "N")]
    keep_last: Option<usize>,
    /// Daemon: retention by age on both sides, as well as --keep-last (a snapshot either
    /// keeps stays): AGE=PERIOD rules from young to old, e.g. 1h=all,24h=hourly,30d=daily
    /// keeps every zq_ snapshot of the last hour, then the oldest of each hour for a day,
    /// of each day for 30 days, and none older (periods: all, minutely, hourly, daily,
    /// weekly, monthly, yearly, or a duration). Same safeguards as --keep-last.
    #[arg(long, value_name = "GRID")]
    keep_grid: Option<zq_repl::retention::Grid>,
    /// Daemon: retention on the target by count; with --target-keep-grid, the target's
    /// own policy instead of --keep-last/--keep-grid (e.g. keep more on the backup).
    #[arg(long, value_name = "N")]
    target_keep_last: Option<usize>,
    /// Daemon: retention on the target by age (see --keep-grid and --target-keep-last).
    #[arg(long, value_name = "GRID")]
    target_keep_grid: Option<zq_repl::retention::Grid>,
    /// Daemon: write the status that `zq-send status` shows to this file on every tick
    /// [default: $RUNTIME_DIRECTORY or /run/zq, file send-<SOURCE>--<TARGET>.json].
    #[arg(long, value_name = "PATH")]
    status_file: Option<PathBuf>,
    /// Daemon: serve Prometheus metrics on http://ADDR/metrics (replication lag, steps,
    /// failures, bytes and resumes per dataset; the connection's RTT, window and losses;
    /// zfs command durations). Off by default; e.g. 127.0.0.1:9746.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Name of this replication job, in the holds it places (zq_<NAME> on the source,
    /// zq_<NAME>_last on the destination). Default: derived from the
    /// receiver's key and TARGET (printed at start). With --config: run only the job
    /// of this name.
    #[arg(long, value_name = "NAME")]
    job: Option<String>,
    /// What holds protect replication (both initial and incremental steps):
    /// guarantee_resumability (a step's snapshots held until it commits, a cursor, a
    /// last-received hold), guarantee_incremental (cursor and last-received hold),
    /// guarantee_nothing.
    #[arg(long, value_name = "MODE", default_value = "guarantee_resumability")]
    protection: Protection,
    /// Protection of initial (full) steps, if other than --protection.
    #[arg(long, value_name = "MODE")]
    protection_initial: Option<Protection>,
    /// Protection of incremental steps, if other than --protection.
    #[arg(long, value_name = "MODE")]
    protection_incremental: Option<Protection>,
    /// How long the connection may go without a packet before it is given up (and a
    /// daemon reconnects, resuming interrupted large steps). Keep-alives go every third of
    /// it; the receiver's own limit (30s) applies if shorter.
    #[arg(long, value_name = "DURATION", value_parser = parse_period, default_value = "30s")]
    idle_timeout: Duration,
    /// Abandon (and retry, resuming it) a step whose data the receiver has not accepted
    /// for this long while the connection stays alive: a hung receiver or zfs receive.
    #[arg(long, value_name = "DURATION", value_parser = parse_period, default_value = "120s")]
    stall_timeout: Duration,
    /// One-shot: run the job again this many times while datasets fail with errors that
    /// may pass (a lost connection, a zfs command that failed on either side), waiting
    /// --retry-delay, then twice as long each time up to a minute (with jitter). Refusals
    /// are never retried.
    #[arg(long, value_name = "N", default_value_t = 2)]
    retries: u32,
    /// One-shot: the wait before the first retry (see --retries).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
    retry_delay: Duration,
    /// Compress chunks with zstd: none, auto (zstd level 1, but chunks that do not
    /// shrink make the next ones go raw for a while: already-compressed or encrypted data
    /// costs almost nothing; and chunks go raw while the link is faster than zstd on this
    /// host), zstd (level 3) or zstd:LEVEL. Used only where the
    /// receiver agrees; checksums are of the original bytes.
    #[arg(long, value_name = "MODE", default_value = "none", env = "ZQ_COMPRESS")]
    compress: zq_proto::Compression,
    /// One-shot: no progress line (it is shown on a terminal for steps that run longer
    /// than a second: bytes, rate and, where zfs estimates the size, the time left).
    #[arg(long)]
    no_progress: bool,
    /// Keep the replication data of all datasets together under SIZE per second (e.g.
    /// 50MB, 10MiB), measured after compression. Default (or 0): no limit.
    #[arg(long, value_name = "SIZE", value_parser = zq::parse_size, env = "ZQ_BWLIMIT")]
    bwlimit: Option<u64>,
    /// Open N connections to the receiver and spread each bulk step's chunks over all of
    /// them (steps under 1 MiB stay on one). One connection's congestion window caps a
    /// stream on a long or lossy path; several fill more of it. 1 to 16; the receiver
    /// must speak protocol version 5; not with `serve`.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=16))]
    connections: u8,
    #[command(flatten)]
    transport: zq::TransportArgs,
    /// Speak only this protocol version (for compatibility testing).
    #[arg(long, hide = true)]
    protocol_version: Option<u16>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 100ms, 1s, 5m)"))
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

fn parse_period(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: a period must be longer than zero")),
        d => Ok(d),
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Identity(cmd) => cmd.run(ROLE),
        Command::Run(args) => start(&matches, "run", *args, Action::Replicate, cli.log.json()),
        Command::Serve(args) => start(&matches, "serve", *args, Action::Serve, cli.log.json()),
        Command::Prune(args) => {
            let action = Action::Prune {
                dry_run: args.dry_run,
            };
            start(&matches, "prune", args.run, action, cli.log.json())
        }
        Command::CheckConfig(args) => check_config(&args),
        Command::Status(args) if args.warn_lag.is_some() || args.crit_lag.is_some() => {
            zq::status::monitor(
                &args.paths,
                &zq::status::Limits {
                    warn: args.warn_lag,
                    crit: args.crit_lag,
                },
            )
        }
        Command::Status(args) => zq::status::show(&args.paths, args.json),
        Command::Abstractions(cmd) => zq::block_on(cli.log.json(), async {
            exit::done(abstractions(cmd).await)
        }),
    }
}

/// `run`'s arguments alone, to parse a config file's job as the flags it stands for.
#[derive(Parser, Debug)]
#[command(name = "zq-send run", no_binary_name = true)]
struct RunOnly {
    #[command(flatten)]
    args: RunArgs,
}

/// Runs `action` on the jobs that subcommand `name` was given (see [`jobs`]).
fn start(
    matches: &clap::ArgMatches,
    name: &str,
    args: RunArgs,
    action: Action,
    log_json: bool,
) -> ExitCode {
    let given = matches
        .subcommand_matches(name)
        .map(zq::Given::new)
        .unwrap_or_default();
    match jobs(args, &given, action) {
        Ok(jobs) => zq::block_on(log_json, run_all(jobs, action)),
        Err(e) => zq::fail(&exit::usage(e)),
    }
}

/// Copies into `file` (a job of the config file) the arguments the command line or the
/// environment gave. The destructuring lists every field: a new flag does not compile
/// until it is listed here, so none is silently ignored under --config.
fn overlay(file: &mut RunArgs, cli: RunArgs, given: &zq::Given) {
    use zq::overlay;
    let cli_transport = cli.transport.clone();
    // `transport` itself is no argument (never given): its flags follow.
    overlay!(
        given,
        file,
        cli,
        RunArgs {
            source,
            addr,
            target,
            config,
            host,
            identity,
            peer,
            recursive,
            exclude,
            exclude_regex,
            include_regex,
            exclude_property,
            skip_parent,
            include_snapshots,
            exclude_snapshots,
            newest_only,
            force,
            zfs,
            every,
            snapshot_every,
            jitter,
            max_steps,
            max_size_estimates,
            keep_last,
            keep_grid,
            target_keep_last,
            target_keep_grid,
            status_file,
            metrics_listen,
            job,
            protection,
            protection_initial,
            protection_incremental,
            idle_timeout,
            stall_timeout,
            retries,
            retry_delay,
            compress,
            no_progress,
            bwlimit,
            connections,
            transport,
            protocol_version,
        }
    );
    overlay!(
        given,
        file.transport,
        cli_transport,
        TransportArgs {
            bdp,
            congestion,
            udp_buffer,
            address_validation
        }
    );
}

/// The jobs to run: the command line's, or with --config those of the file for this host
/// (only --job's, if given), each under the flags and environment given.
fn jobs(cli: RunArgs, given: &zq::Given, action: Action) -> anyhow::Result<Vec<Run>> {
    let Some(path) = cli.config.clone() else {
        return Ok(vec![Run::new(cli)?]);
    };
    let config = zq::config::Config::load(&path)?;
    let host = cli.host.clone().unwrap_or_else(zq::config::this_host);
    let mut jobs = config.jobs_for(&host)?;
    if jobs.is_empty() {
        anyhow::bail!(
            "config file {} has no job for host {host:?} (hosts named in it: {}); set --host",
            path.display(),
            config.host_names()?.join(", ")
        );
    }
    if let (true, Some(only)) = (given.has("job"), &cli.job) {
        jobs.retain(|j| &j.name == only);
        if jobs.is_empty() {
            anyhow::bail!(
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
            if given.has(id) {
                anyhow::bail!(
                    "{flag} would be the same for the {} jobs of host {host:?}: set it per job \
                     in the config file, or run one job with --job",
                    jobs.len()
                );
            }
        }
    }
    jobs.into_iter()
        .map(|mut job| {
            let label = format!("config file {}: job {:?}", path.display(), job.name);
            if let Action::Serve = action {
                // ADDR is where to listen; the receiver (its fingerprint) stays pinned.
                let listen = job.listen.clone().with_context(|| {
                    format!("{label}: no `listen` address for zq-send serve (pull mode)")
                })?;
                job.args[1] = listen;
            }
            let parsed = RunOnly::try_parse_from(&job.args)
                .map_err(|e| anyhow::anyhow!("{}", zq::clap_message(&e)))
                .with_context(|| label.clone())?;
            let mut args = parsed.args;
            overlay(&mut args, cli.clone(), given);
            let mut run = Run::new(args).with_context(|| label.clone())?;
            run.name = Some(job.name);
            Ok(run)
        })
        .collect()
}

/// One job, checked: what the command line or the config file must give, present.
#[derive(Debug)]
struct Run {
    /// The config file's name of the job (for logs).
    name: Option<String>,
    source: DatasetName,
    addr: HostPort,
    target: DatasetName,
    identity: PathBuf,
    peer: Fingerprint,
    args: RunArgs,
}

/// The job's other settings, as given (`run.every`, …).
impl std::ops::Deref for Run {
    type Target = RunArgs;
    fn deref(&self) -> &RunArgs {
        &self.args
    }
}

impl Run {
    /// Checks what clap cannot, since a config file may give part of it.
    fn new(args: RunArgs) -> anyhow::Result<Run> {
        let need = |what: &str| anyhow::anyhow!("{what} is missing");
        let daemon = args.every.or(args.snapshot_every).is_some();
        if !args.recursive {
            for (set, flag) in [
                (!args.exclude.is_empty(), "--exclude"),
                (!args.exclude_regex.is_empty(), "--exclude-regex"),
                (!args.include_regex.is_empty(), "--include-regex"),
                (args.exclude_property.is_some(), "--exclude-property"),
                (args.skip_parent, "--skip-parent"),
            ] {
                if set {
                    anyhow::bail!("{flag} needs --recursive (recursive = true in a config file)");
                }
            }
        }
        if let Some(job) = &args.job {
            Tags::new(job).map_err(|e| anyhow::anyhow!("--job {job:?}: {e}"))?;
        }
        if args.metrics_listen.is_some() && !daemon {
            anyhow::bail!("--metrics-listen needs a daemon (--every or --snapshot-every): a one-shot run ends before anyone scrapes it");
        }
        let snapshots = zq_repl::filter::SnapshotFilter {
            include: args.include_snapshots.clone(),
            exclude: args.exclude_snapshots.clone(),
        };
        let ours = zq_repl::daemon::snapshot_name(std::time::SystemTime::now());
        if args.snapshot_every.is_some() && !snapshots.keeps(&ours) {
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

    /// What to replicate.
    fn job(&self) -> anyhow::Result<Job> {
        let exclude = self
            .exclude
            .iter()
            .map(|e| exclude_name(&self.source, e))
            .collect::<Result<_, _>>()
            .map_err(|e| exit::usage(anyhow::anyhow!("--exclude {e}")))?;
        Ok(Job {
            source: self.source.clone(),
            target: self.target.clone(),
            recursive: self.recursive,
            filter: zq_repl::filter::DatasetFilter {
                exclude,
                exclude_regex: self.exclude_regex.clone(),
                include_regex: self.include_regex.clone(),
                exclude_property: self.exclude_property.clone(),
                skip_parent: self.skip_parent,
            },
            snapshots: self.snapshot_filter(),
            options: PlanOptions {
                newest_only: self.newest_only,
                force: self.force,
                // Chosen by the sender from the zfs capabilities.
                chain_up_to: 0,
            },
        })
    }

    fn snapshot_filter(&self) -> zq_repl::filter::SnapshotFilter {
        zq_repl::filter::SnapshotFilter {
            include: self.include_snapshots.clone(),
            exclude: self.exclude_snapshots.clone(),
        }
    }

    /// How each connection's sender sends: protection, compression, limits.
    fn sender_config(
        &self,
        zfs: &Zfs,
        progress: Option<Arc<Progress>>,
    ) -> anyhow::Result<SenderConfig> {
        let job_name = self
            .job
            .clone()
            .unwrap_or_else(|| zq_repl::protect::default_job(&self.peer.to_string(), &self.target));
        let tags = Tags::new(&job_name)
            .map_err(|e| exit::usage(anyhow::anyhow!("--job {job_name:?}: {e}")))?;
        let protector = Protector::new(
            zfs.clone(),
            Modes {
                initial: self.protection_initial.unwrap_or(self.protection),
                incremental: self.protection_incremental.unwrap_or(self.protection),
            },
            tags,
        );
        tracing::info!(job = %job_name, initial = %protector.modes.initial, incremental = %protector.modes.incremental, "protection");
        Ok(SenderConfig {
            protector: Some(Arc::new(protector)),
            stall_timeout: self.stall_timeout,
            compression: self.compress,
            bwlimit: self.bwlimit.filter(|&b| b > 0).map(zq_net::RateLimit::new),
            intermediates: self.snapshot_filter().is_empty(),
            progress,
            estimates: Arc::new(tokio::sync::Semaphore::new(usize::from(
                self.max_size_estimates,
            ))),
        })
    }

    /// Where the receiver is and how to reach it.
    fn connect_config(
        &self,
        identity: Identity,
        sender: SenderConfig,
        action: Action,
    ) -> ConnectConfig {
        ConnectConfig {
            identity,
            peer: self.peer,
            addr: self.addr.clone(),
            listen: matches!(action, Action::Serve),
            daemon: self.every.or(self.snapshot_every).is_some(),
            tuning: Tuning {
                idle_timeout: self.idle_timeout,
                keep_alive: Tuning::default().keep_alive.min(self.idle_timeout / 3),
                ..self.transport.tuning()
            },
            connections: self.connections,
            protocol_version: self.protocol_version,
            software: format!("{ROLE} {}", env!("CARGO_PKG_VERSION")),
            sender,
        }
    }

    /// Retention on each side: the flags', and a daemon that makes its own snapshots keeps
    /// the last [`DEFAULT_KEEP_LAST`] when no retention flag is given (they would pile up
    /// at one per period).
    fn retention(&self) -> zq_repl::retention::Retention {
        use zq_repl::retention::{Policy, Retention};
        let mut source = Policy {
            keep_last: self.keep_last,
            grid: self.keep_grid.clone(),
        };
        let own = self.target_keep_last.is_some() || self.target_keep_grid.is_some();
        if source.is_off() && !own && self.snapshot_every.is_some() {
            source.keep_last = Some(DEFAULT_KEEP_LAST);
        }
        let target = if own {
            Policy {
                keep_last: self.target_keep_last,
                grid: self.target_keep_grid.clone(),
            }
        } else {
            source.clone()
        };
        Retention { source, target }
    }

    /// One line saying what the job does, for check-config.
    fn describe(&self) -> String {
        let mut what = vec![];
        if self.recursive {
            what.push("recursive".to_owned());
        }
        let filters = self.exclude.len()
            + self.exclude_regex.len()
            + self.include_regex.len()
            + usize::from(self.exclude_property.is_some())
            + usize::from(self.skip_parent);
        if filters > 0 {
            what.push(format!("{filters} dataset filter(s)"));
        }
        let snapshot_filters = self.include_snapshots.len() + self.exclude_snapshots.len();
        if snapshot_filters > 0 {
            what.push(format!("{snapshot_filters} snapshot filter(s)"));
        }
        let how = match (self.every, self.snapshot_every) {
            (_, Some(s)) => format!(
                "daemon: snapshots every {}, replicates every {}, start jitter up to {}, up to {} steps at once, {}",
                humantime::format_duration(s),
                humantime::format_duration(self.every.unwrap_or(s)),
                humantime::format_duration(self.jitter),
                self.max_steps,
                retention_text(&self.retention())
            ),
            (Some(e), None) => format!(
                "daemon: replicates every {}, start jitter up to {}, up to {} steps at once, {}",
                humantime::format_duration(e),
                humantime::format_duration(self.jitter),
                self.max_steps,
                retention_text(&self.retention())
            ),
            (None, None) => "once".to_owned(),
        };
        let what = if what.is_empty() {
            String::new()
        } else {
            format!(" ({})", what.join(", "))
        };
        format!(
            "{}{what} -> {} on {} [{how}; protection {}]",
            self.source, self.target, self.addr, self.protection
        )
    }
}

/// "source: keep …; target: keep …", or one of them when both sides agree.
fn retention_text(r: &zq_repl::retention::Retention) -> String {
    if r.source == r.target {
        format!("retention {} on both sides", r.source)
    } else {
        format!("retention: source {}, target {}", r.source, r.target)
    }
}

/// `zq-send check-config`: every job and receiver of the file parsed as the flags they
/// stand for, then what the host(s) would run.
fn check_config(args: &CheckConfigArgs) -> ExitCode {
    match check_config_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => zq::fail(&exit::usage(e)),
    }
}

fn check_config_inner(args: &CheckConfigArgs) -> anyhow::Result<()> {
    use zq::config::shell_words;
    let config = zq::config::Config::load(&args.config)?;
    let jobs = config.jobs()?;
    let receivers = config.receivers()?;
    let mut runs = Vec::new();
    for job in &jobs {
        let label = || {
            format!(
                "config file {}: job {:?} on host {:?}",
                args.config.display(),
                job.name,
                job.host
            )
        };
        let parsed = RunOnly::try_parse_from(&job.args)
            .map_err(|e| anyhow::anyhow!("{}", zq::clap_message(&e)))
            .with_context(label)?;
        runs.push(Run::new(parsed.args).with_context(label)?);
    }
    for r in &receivers {
        zq::serve::ServeOnly::try_parse_from(&r.args)
            .map_err(|e| anyhow::anyhow!("{}", zq::clap_message(&e)))
            .with_context(|| {
                format!(
                    "config file {}: receiver on host {:?}",
                    args.config.display(),
                    r.host
                )
            })?;
    }
    let hosts = config.host_names()?;
    zq::out!(
        "{}: valid ({} job(s), {} receiver(s); hosts: {})",
        args.config.display(),
        jobs.len(),
        receivers.len(),
        hosts.join(", ")
    );
    let shown: Vec<String> = if args.all {
        hosts
    } else {
        vec![args.host.clone().unwrap_or_else(zq::config::this_host)]
    };
    for host in &shown {
        zq::out!("host {host}:");
        let mut nothing = true;
        for (job, run) in jobs.iter().zip(&runs) {
            if zq::config::host_matches(&job.host, host) {
                nothing = false;
                zq::out!("  job {}: {}", job.name, run.describe());
                zq::out!("    zq-send run {}", shell_words(&job.args));
                if let Some(listen) = &job.listen {
                    zq::out!(
                        "    pull mode: zq-send serve --config {} --job {} listens on {listen}",
                        args.config.display(),
                        job.name
                    );
                }
            }
        }
        for r in receivers
            .iter()
            .filter(|r| zq::config::host_matches(&r.host, host))
        {
            nothing = false;
            zq::out!("  receiver: zq-recv serve {}", shell_words(&r.args));
        }
        if nothing {
            zq::out!("  nothing: no job or receiver of the file names this host");
        }
    }
    Ok(())
}

/// What to do with a job.
#[derive(Debug, Clone, Copy)]
enum Action {
    Replicate,
    /// Replicate in pull mode: listen on ADDR for the receiver.
    Serve,
    Prune {
        dry_run: bool,
    },
}

/// Runs the jobs side by side; the exit code is the worst of theirs.
async fn run_all(jobs: Vec<Run>, action: Action) -> ExitCode {
    use tracing::Instrument;
    let mut set = tokio::task::JoinSet::new();
    let several = jobs.len() > 1;
    for mut job in jobs {
        // One progress line per terminal.
        job.args.no_progress |= several;
        let span = match &job.name {
            Some(name) => tracing::info_span!("job", name = %name),
            None => tracing::Span::none(),
        };
        set.spawn(
            async move {
                run(job, action).await.unwrap_or_else(|e| {
                    zq::report(&e);
                    exit::code(&e)
                })
            }
            .instrument(span),
        );
    }
    let mut code = exit::OK;
    while let Some(done) = set.join_next().await {
        code = code.max(done.unwrap_or(exit::FAILURE));
    }
    ExitCode::from(code)
}

/// Runs one job; the exit code of what it did, or the error that stopped it.
async fn run(args: Run, action: Action) -> anyhow::Result<u8> {
    let metrics_listen = match action {
        Action::Replicate | Action::Serve => args.metrics_listen,
        Action::Prune { .. } => None,
    };
    // Bound before anything else runs, so a taken port is a usage error at once.
    let metrics_listener = zq::bind_metrics(metrics_listen).await.usage()?;
    let identity = Identity::load(&args.identity, ROLE).context("loading identity")?;
    let zfs = Zfs::probe(&args.zfs).await.context("probing zfs")?;
    let job = args.job()?;
    let daemon = args.every.or(args.snapshot_every);
    let progress = match (daemon, action) {
        (Some(_), _) => Some(Arc::new(Progress::default())),
        (None, Action::Prune { .. }) => None,
        (None, _) => (!args.no_progress && std::io::stderr().is_terminal())
            .then(|| Arc::new(Progress::default())),
    };
    let sender = args.sender_config(&zfs, progress.clone())?;
    let connector =
        Arc::new(Connector::new(args.connect_config(identity, sender, action), zfs.clone()).await?);
    if let Some(bound) = connector.listening_on() {
        zq::out!("listening on {bound}");
    }
    let code = match (action, daemon) {
        (Action::Prune { dry_run }, _) => prune(&args, &job, &connector, dry_run).await,
        (_, Some(every)) => {
            daemon_run(
                &args,
                every,
                job,
                connector.clone(),
                metrics_listener,
                progress,
            )
            .await
        }
        (_, None) => once(&args, &job, &connector, progress).await,
    };
    connector.shutdown().await;
    code
}

/// `zq-send abstractions list|release-stale`.
async fn abstractions(cmd: AbstractionsCommand) -> anyhow::Result<()> {
    let (args, release) = match &cmd {
        AbstractionsCommand::List(a) => (a, None),
        AbstractionsCommand::ReleaseStale { args, all } => (args, Some(*all)),
    };
    let tags = args
        .job
        .as_deref()
        .map(Tags::new)
        .transpose()
        .map_err(|e| exit::usage(anyhow::anyhow!("--job: {e}")))?;
    let zfs = Zfs::probe(&args.zfs).await.context("probing zfs")?;
    let found = match (release, &tags) {
        (Some(_), None) => {
            return Err(exit::usage(anyhow::anyhow!(
                "release-stale needs --job: it releases one job's holds"
            )))
        }
        (Some(all), Some(tags)) => {
            zq_repl::protect::release_stale(&zfs, &args.dataset, args.recursive, tags, all).await
        }
        (None, tags) => {
            zq_repl::protect::abstractions(&zfs, &args.dataset, args.recursive, tags.as_ref()).await
        }
    }?;
    let verb = if release.is_some() { "released " } else { "" };
    for a in &found {
        match &a.tag {
            Some(tag) => zq::out!("{verb}{}\t{tag}", a.snapshot),
            None => zq::out!(
                "{}\t{} hold(s); this zfs cannot list tags: give --job to look for zq's",
                a.snapshot,
                a.userrefs
            ),
        }
    }
    Ok(())
}

/// `zq-send prune`: one retention pass on both sides, each snapshot destroyed (or, with
/// `dry_run`, that would be) on a line of its own.
async fn prune(args: &Run, job: &Job, connector: &Connector, dry_run: bool) -> anyhow::Result<u8> {
    let retention = args.retention();
    if retention.is_off() {
        return Err(exit::usage(anyhow::anyhow!(
            "no retention to apply: give --keep-last or --keep-grid (or --target-keep-*), \
             or --snapshot-every for its default (the last {DEFAULT_KEEP_LAST})"
        )));
    }
    let sender = connector.connect().await?;
    let pruned = zq_repl::daemon::prune_once(&sender, connector.zfs(), job, &retention, dry_run)
        .await
        .with_context(|| format!("pruning {}", args.source))?;
    let verb = if dry_run {
        "would destroy"
    } else {
        "destroyed"
    };
    zq::out!(
        "retention: source {}; target {}",
        retention.source,
        retention.target
    );
    let mut code = exit::OK;
    for p in &pruned {
        if let Some(why) = p.skipped {
            zq::out!("{} -> {}: nothing pruned: {why}", p.source, p.target);
            continue;
        }
        for name in &p.source_snapshots {
            zq::out!("{verb} {}@{name}", p.source);
        }
        match &p.target_snapshots {
            Ok(names) => {
                for name in names {
                    zq::out!("{verb} {}@{name} (on the receiver)", p.target);
                }
                zq::out!(
                    "{} -> {}: {verb} {} here, {} on the receiver",
                    p.source,
                    p.target,
                    p.source_snapshots.len(),
                    names.len()
                );
            }
            Err(e) => {
                eprintln!(
                    "error: {} -> {}: retention on the receiver: {}",
                    p.source,
                    p.target,
                    zq::chain(e)
                );
                code = code.max(exit::FAILURE);
            }
        }
    }
    Ok(code)
}

/// Replicates once (with --retries) and reports each dataset, with a progress line on a
/// terminal; returns the exit code.
async fn once(
    args: &Run,
    job: &Job,
    connector: &Connector,
    progress: Option<Arc<Progress>>,
) -> anyhow::Result<u8> {
    let ticker = progress.map(|p| tokio::spawn(show_progress(p)));
    let retries = zq_repl::oneshot::Retries {
        retries: args.retries,
        delay: args.retry_delay,
    };
    let reports = zq_repl::oneshot::replicate(connector, job, retries).await;
    if let Some(t) = ticker {
        t.abort();
        eprint!("\r\x1b[K");
    }
    let mut code = exit::OK;
    for r in &reports? {
        match &r.outcome {
            DatasetOutcome::UpToDate => zq::out!("{} -> {}: up to date", r.source, r.target),
            DatasetOutcome::Sent {
                steps,
                bytes,
                resumed,
                newest,
                committed,
            } => {
                let resumed = if *resumed > 0 {
                    format!(" (resumed: {resumed} bytes were already on the receiver)")
                } else {
                    String::new()
                };
                zq::out!(
                    "{} -> {}: sent {steps} step(s), {bytes} bytes{resumed}; destination now at @{newest} ({committed} snapshots)",
                    r.source, r.target
                )
            }
            DatasetOutcome::Failed(e) => {
                eprintln!("error: {} -> {}: {}", r.source, r.target, zq::chain(e));
                code = code.max(exit::repl_code(e));
            }
        }
    }
    Ok(code)
}

/// Redraws the progress line of the step in flight twice a second, once it has run for a
/// second (small steps never show one).
async fn show_progress(p: Arc<Progress>) {
    let mut shown = false;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = std::time::Instant::now();
        match p.now() {
            Some(f) if now.duration_since(f.started) >= Duration::from_secs(1) => {
                eprint!("\r\x1b[K{}", f.line(now));
                shown = true;
            }
            _ if shown => {
                eprint!("\r\x1b[K");
                shown = false;
            }
            _ => {}
        }
    }
}

/// Runs as a daemon until SIGTERM/SIGINT; returns the exit code (0 on a signal).
async fn daemon_run(
    args: &Run,
    every: Duration,
    job: Job,
    connector: Arc<Connector>,
    metrics_listener: Option<tokio::net::TcpListener>,
    progress: Option<Arc<Progress>>,
) -> anyhow::Result<u8> {
    let metrics = metrics_listener.map(|listener| {
        let metrics = Arc::new(zq_repl::metrics::DaemonMetrics::default());
        let m = metrics.clone();
        zq::serve_metrics(listener, move || m.render());
        metrics
    });
    let opts = DaemonOptions {
        every,
        snapshot_every: args.snapshot_every,
        jitter: args.jitter,
        max_steps: usize::from(args.max_steps),
        retention: args.retention(),
        status_file: Some(
            args.status_file
                .clone()
                .unwrap_or_else(|| zq::status::default_file(&job.source, &job.target)),
        ),
        receiver: args.addr.to_string(),
        metrics,
        progress,
    };
    tracing::info!(
        source = %job.source, target = %job.target, every = %humantime::format_duration(opts.every),
        snapshot_every = %opts.snapshot_every.map_or("off".into(), |d| humantime::format_duration(d).to_string()),
        max_steps = opts.max_steps, "daemon starting"
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        zq::shutdown_signal().await;
        tracing::info!("signal received, stopping");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        let _ = stop.send(true);
    });
    // Type=notify units (zq-send@.service): running; the daemon reaches the receiver on
    // its own, so readiness does not wait for it. A no-op elsewhere.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    zq_repl::daemon::run(job, opts, connector, stopped).await;
    Ok(exit::OK)
}
