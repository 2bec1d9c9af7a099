//! `zq-send`: replicates local ZFS datasets to a `zq-recv` over one QUIC connection.

#![forbid(unsafe_code)]
// Data from a peer or from zfs must not panic the process (tests may unwrap).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use zq::exit::{self, UsageExt};
use zq::run::{Run, RunArgs};
use zq::send::{run_all, Action};
use zq_repl::protect::Tags;
use zq_store::{DatasetName, Zfs};

const ROLE: &str = "zq-send";

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
    /// Replicate SOURCE to TARGET on the receiver at ADDR, once or as a daemon
    Run(Box<RunArgs>),
    /// Show running daemons' datasets: lag, backlog, last error
    ///
    /// Shows each running daemon's datasets: last replicated snapshot, its age
    /// (replication lag), snapshots not sent yet, last error. Reads the daemons' status
    /// files; with --warn-lag/--crit-lag, a monitoring check.
    Status(StatusArgs),
    /// Show or release the holds zq placed on source snapshots
    ///
    /// Shows or cleans up the holds zq placed on source snapshots (step holds, cursors).
    #[command(subcommand)]
    Abstractions(AbstractionsCommand),
    /// Pull mode: like run, but let the receiver connect to ADDR
    ///
    /// Replicates SOURCE to TARGET like `run`, but listens on ADDR and lets the receiver
    /// (--peer, running `zq-recv pull`) connect: for a backup server behind NAT or a
    /// firewall. Data still flow from here; the receiver's --allow roots still apply.
    /// Takes run's arguments (ADDR is where to listen; port 0 picks one, printed as
    /// `listening on ADDR`).
    Serve(Box<PullModeArgs>),
    /// Apply a job's retention once on both sides, without replicating
    ///
    /// What a daemon's retention pass would do (--keep-last, --keep-grid,
    /// --target-keep-*; a daemon with --snapshot-every keeps the last 100 by default).
    /// With --dry-run, destroy nothing and print what would go. Takes run's arguments (or
    /// --config and --job).
    Prune(Box<PruneArgs>),
    /// Check a config file and show what this host would run
    ///
    /// Checks every job and receiver of every host in the file and prints what this host
    /// would run: its jobs as `zq-send run` commands, its receiver as `zq-recv serve`.
    /// Exit 0 when valid, 2 otherwise.
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
    /// List zq's cursor bookmarks (OpenZFS: DATASET#zq_<job>_<guid>) and holds (zq_<job>:
    /// cursors where there are no bookmarks, and unfinished steps) on DATASET.
    List(AbstractionsArgs),
    /// Destroy the cursor bookmarks and release the holds a stopped job does not need: all
    /// but each dataset's newest (its cursor, or an interrupted step; with --all, that one
    /// too: the job is retired). Stop the job's daemon first.
    ReleaseStale {
        #[command(flatten)]
        args: AbstractionsArgs,
        /// Also release each dataset's newest hold and destroy its newest cursor bookmark.
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
    /// Remove the status files of daemons that stopped (a retired job's; a stopped
    /// daemon's file says so), printing each. Running daemons' files stay.
    #[arg(long, conflicts_with_all = ["json", "warn_lag", "crit_lag"])]
    remove_stopped: bool,
    /// Monitoring: WARNING (exit 1) when a dataset's newest replicated snapshot is older
    /// than this, or a dataset is failing, or a daemon is not connected. Either limit
    /// prints one summary line and one line per finding instead of the table, as
    /// monitoring plugins do (see docs/operations.md).
    #[arg(long, value_name = "DURATION", value_parser = zq::run::parse_period)]
    warn_lag: Option<Duration>,
    /// Monitoring: CRITICAL (exit 2) when a dataset's newest replicated snapshot is older
    /// than this, or nothing was replicated yet. No status file at all: UNKNOWN (exit 3).
    #[arg(long, value_name = "DURATION", value_parser = zq::run::parse_period)]
    crit_lag: Option<Duration>,
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
        Command::Serve(args) => {
            let action = Action::Serve(args.admission.address_validation);
            start(&matches, "serve", args.run, action, cli.log.json())
        }
        Command::Prune(args) => {
            let action = Action::Prune {
                dry_run: args.dry_run,
            };
            start(&matches, "prune", args.run, action, cli.log.json())
        }
        Command::CheckConfig(args) => exit::done(check_config(&args)),
        Command::Status(args) if args.warn_lag.is_some() || args.crit_lag.is_some() => {
            zq::status::monitor(
                &args.paths,
                &zq::status::Limits {
                    warn: args.warn_lag,
                    crit: args.crit_lag,
                },
            )
        }
        Command::Status(args) if args.remove_stopped => {
            exit::done(zq::status::remove_stopped(&args.paths))
        }
        Command::Status(args) => zq::status::show(&args.paths, args.json),
        Command::Abstractions(cmd) => zq::block_on(cli.log.json(), async {
            exit::done(abstractions(cmd).await)
        }),
    }
}

/// Runs `action` on the jobs that subcommand `name` was given (see [`jobs`]).
fn start(
    matches: &clap::ArgMatches,
    name: &str,
    args: RunArgs,
    action: Action,
    log_json: bool,
) -> ExitCode {
    let given = matches.subcommand_matches(name);
    match jobs(args, given, action) {
        Ok(jobs) => zq::block_on(log_json, run_all(jobs, action)),
        Err(e) => zq::fail(&e),
    }
}

/// The jobs to run: the command line's, or with --config those of the file for this host
/// ([`zq::config::runs`]).
fn jobs(
    cli: RunArgs,
    given: Option<&clap::ArgMatches>,
    action: Action,
) -> anyhow::Result<Vec<Run>> {
    match cli.config.clone() {
        None => Ok(vec![Run::new(cli)?]),
        Some(path) => zq::config::runs(&path, &cli, given, action.pull().is_some()).usage(),
    }
}

/// `zq-send check-config`: every job and receiver of the file parsed as the options they
/// stand for, then what the host(s) would run.
fn check_config(args: &CheckConfigArgs) -> anyhow::Result<()> {
    let config = zq::config::Config::load(&args.config).usage()?;
    let jobs = config.jobs()?;
    let receivers = config.receivers()?;
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
        for job in jobs
            .iter()
            .filter(|j| zq::config::host_matches(&j.host, host))
        {
            nothing = false;
            zq::out!("  job {}: {}", job.name, job.run(None, false)?.describe());
            zq::out!("    zq-send run {}", job.command_line()?);
            if let Some(listen) = &job.listen {
                zq::out!(
                    "    pull mode: zq-send serve --config {} --job {} listens on {listen}",
                    args.config.display(),
                    job.name
                );
            }
        }
        for r in receivers
            .iter()
            .filter(|r| zq::config::host_matches(&r.host, host))
        {
            nothing = false;
            zq::out!("  receiver: zq-recv serve {}", r.command_line()?);
        }
        if nothing {
            zq::out!("  nothing: no job or receiver of the file names this host");
        }
    }
    Ok(())
}

/// `serve`'s arguments: `run`'s, and how the listener admits connections.
#[derive(Args, Debug)]
struct PullModeArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    admission: zq::AdmissionArgs,
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
    let (ds, r) = (&args.dataset, args.recursive);
    let (found, marks) = match (release, &tags) {
        (Some(_), None) => {
            return Err(exit::usage(anyhow::anyhow!(
                "release-stale needs --job: it releases one job's holds and bookmarks"
            )))
        }
        (Some(all), Some(tags)) => (
            zq_repl::protect::release_stale(&zfs, ds, r, tags, all).await?,
            zq_repl::protect::destroy_stale_marks(&zfs, ds, r, tags, all).await?,
        ),
        (None, tags) => (
            zq_repl::protect::abstractions(&zfs, ds, r, tags.as_ref()).await?,
            zq_repl::protect::cursor_marks(&zfs, ds, r, tags.as_ref()).await?,
        ),
    };
    let verb = if release.is_some() { "released " } else { "" };
    for m in &marks {
        let verb = if release.is_some() { "destroyed " } else { "" };
        zq::out!("{verb}{m}\tcursor bookmark");
    }
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
