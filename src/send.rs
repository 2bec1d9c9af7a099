//! What `zq-send run`, `serve` and `prune` do with their jobs: run them side by side, each
//! once (with retries), as a daemon, or as one retention pass, and print what each did.
//! The binary parses; this runs and reports.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use zq_repl::progress::Progress;
use zq_repl::{Connector, DaemonOptions, DatasetOutcome, Job};

use crate::exit::{self, UsageExt};
use crate::run::Run;

/// What to do with a job.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    Replicate,
    /// Replicate in pull mode: listen on ADDR for the receiver.
    Serve(zq_net::AddressValidation),
    Prune {
        dry_run: bool,
    },
}

impl Action {
    /// Pull mode, and how it admits connections.
    pub fn pull(self) -> Option<zq_net::AddressValidation> {
        match self {
            Action::Serve(admission) => Some(admission),
            Action::Replicate | Action::Prune { .. } => None,
        }
    }
}

/// Runs the jobs side by side; the exit code is the worst of theirs.
pub async fn run_all(jobs: Vec<Run>, action: Action) -> ExitCode {
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
                    crate::report(&e);
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
    let metrics_listener = crate::bind_metrics(metrics_listen).await.usage()?;
    let job = args.job()?;
    let daemon = args.daemon_every();
    let progress = match (daemon, action) {
        (Some(_), _) => Some(Arc::new(Progress::default())),
        (None, Action::Prune { .. }) => None,
        (None, _) => (!args.no_progress && std::io::stderr().is_terminal())
            .then(|| Arc::new(Progress::default())),
    };
    let connector = Arc::new(args.connector(action.pull(), progress.clone()).await?);
    if let Some(bound) = connector.listening_on() {
        crate::out!("listening on {bound}");
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

/// `zq-send prune`: one retention pass on both sides, each snapshot destroyed (or, with
/// `dry_run`, that would be) on a line of its own.
async fn prune(args: &Run, job: &Job, connector: &Connector, dry_run: bool) -> anyhow::Result<u8> {
    let retention = args.retention();
    if retention.is_off() {
        return Err(exit::usage(anyhow::anyhow!(
            "no retention to apply: give --keep-last or --keep-grid (or --target-keep-*), \
             or --snapshot-every for its default (the last {})",
            crate::run::DEFAULT_KEEP_LAST
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
    crate::out!(
        "retention: source {}; target {}",
        retention.source,
        retention.target
    );
    let mut code = exit::OK;
    for p in &pruned {
        if let Some(why) = p.skipped {
            crate::out!("{} -> {}: nothing pruned: {why}", p.source, p.target);
            continue;
        }
        for name in &p.source_snapshots {
            crate::out!("{verb} {}@{name}", p.source);
        }
        match &p.target_snapshots {
            Ok(names) => {
                for name in names {
                    crate::out!("{verb} {}@{name} (on the receiver)", p.target);
                }
                crate::out!(
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
                    crate::chain(e)
                );
                code = code.max(exit::repl_code(e));
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
            DatasetOutcome::UpToDate => crate::out!("{} -> {}: up to date", r.source, r.target),
            DatasetOutcome::Sent {
                steps,
                bytes,
                resumed,
                resumed_from,
                newest,
                committed,
            } => {
                let resumed = match resumed_from {
                    Some(from) => format!(
                        " (resumed from {from}: {resumed} bytes were already on the receiver)"
                    ),
                    None => String::new(),
                };
                crate::out!(
                    "{} -> {}: sent {steps} step(s), {bytes} bytes{resumed}; destination now at @{newest} ({committed} snapshots)",
                    r.source, r.target
                )
            }
            DatasetOutcome::Failed(e) => {
                eprintln!("error: {} -> {}: {}", r.source, r.target, crate::chain(e));
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
        crate::serve_metrics(listener, move || m.render());
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
    // Ready at once (zq-send@.service): the daemon reaches the receiver on its own.
    let stop = crate::ready_until_signal();
    zq_repl::daemon::run(job, opts, connector, stop).await;
    Ok(exit::OK)
}
