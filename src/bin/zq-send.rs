//! `zq-send`: replicates local ZFS datasets to a `zq-recv` over one QUIC connection.

#![forbid(unsafe_code)]
// Data from a peer or from zfs must not panic the process (tests may unwrap).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::io::IsTerminal;
use zq::exit::{self, UsageExt};
use zq::run::{Run, RunArgs};
use zq_net::Identity;
use zq_repl::progress::Progress;
use zq_repl::protect::Tags;
use zq_repl::{Connector, DaemonOptions, DatasetOutcome, Job};
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
/// (only --job's, if given), each under the flags and environment `given`.
fn jobs(
    cli: RunArgs,
    given: Option<&clap::ArgMatches>,
    action: Action,
) -> anyhow::Result<Vec<Run>> {
    let Some(path) = cli.config.clone() else {
        return Ok(vec![Run::new(cli)?]);
    };
    let given_ids = given.map(zq::Given::new).unwrap_or_default();
    let config = zq::config::Config::load(&path).usage()?;
    let host = cli.host.clone().unwrap_or_else(zq::config::this_host);
    let mut jobs = config.jobs_for(&host).usage()?;
    if jobs.is_empty() {
        return Err(exit::usage(anyhow::anyhow!(
            "config file {} has no job for host {host:?} (hosts named in it: {}); set --host",
            path.display(),
            config.host_names()?.join(", ")
        )));
    }
    if let (true, Some(only)) = (given_ids.has("job"), &cli.job) {
        jobs.retain(|j| &j.name == only);
        if jobs.is_empty() {
            return Err(exit::usage(anyhow::anyhow!(
                "config file {} has no job {only:?} for host {host:?}",
                path.display()
            )));
        }
    }
    if jobs.len() > 1 {
        for (id, flag) in [
            ("metrics_listen", "--metrics-listen"),
            ("status_file", "--status-file"),
        ] {
            if given_ids.has(id) {
                return Err(exit::usage(anyhow::anyhow!(
                    "{flag} would be the same for the {} jobs of host {host:?}: set it per job \
                     in the config file, or run one job with --job",
                    jobs.len()
                )));
            }
        }
    }
    jobs.iter()
        .map(|job| job.run(given, matches!(action, Action::Serve(_))).usage())
        .collect()
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

/// What to do with a job.
#[derive(Debug, Clone, Copy)]
enum Action {
    Replicate,
    /// Replicate in pull mode: listen on ADDR for the receiver.
    Serve(zq_net::AddressValidation),
    Prune {
        dry_run: bool,
    },
}

impl Action {
    /// Pull mode, and how it admits connections.
    fn pull(self) -> Option<zq_net::AddressValidation> {
        match self {
            Action::Serve(admission) => Some(admission),
            Action::Replicate | Action::Prune { .. } => None,
        }
    }
}

/// `serve`'s arguments: `run`'s, and how the listener admits connections.
#[derive(Args, Debug)]
struct PullModeArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    admission: zq::AdmissionArgs,
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
        Action::Replicate | Action::Serve(_) => args.metrics_listen,
        Action::Prune { .. } => None,
    };
    // Bound before anything else runs, so a taken port is a usage error at once.
    let metrics_listener = zq::bind_metrics(metrics_listen).await.usage()?;
    let identity = Identity::load(&args.identity, ROLE).context("loading identity")?;
    let zfs = Zfs::probe(&args.zfs).await.context("probing zfs")?;
    let job = args.job()?;
    let daemon = args.daemon_every();
    let progress = match (daemon, action) {
        (Some(_), _) => Some(Arc::new(Progress::default())),
        (None, Action::Prune { .. }) => None,
        (None, _) => (!args.no_progress && std::io::stderr().is_terminal())
            .then(|| Arc::new(Progress::default())),
    };
    let sender = args.sender_config(&zfs, progress.clone())?;
    let connector = Arc::new(
        Connector::new(
            args.connect_config(identity, sender, action.pull()),
            zfs.clone(),
        )
        .await?,
    );
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
             or --snapshot-every for its default (the last {})",
            zq::run::DEFAULT_KEEP_LAST
        )));
    }
    let sender = connector.connect().await?;
    let pruned = zq_repl::prune::prune_once(&sender, connector.zfs(), job, &retention, dry_run)
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
        metrics,
        ..args.daemon_options(every, progress)
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
