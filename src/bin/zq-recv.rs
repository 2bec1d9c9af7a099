//! `zq-recv`: receives ZFS snapshots from pinned `zq-send` peers over QUIC.

#![forbid(unsafe_code)]
// Data from a peer or from zfs must not panic the process (tests may unwrap).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use zq::exit::{self, UsageExt};
use zq::fail;
use zq::serve::{ServeArgs, DEFAULT_LISTEN};
use zq_net::{HostPort, Identity};
use zq_proto::Capabilities;
use zq_repl::receiver::spool::{SpoolConfig, Spools};
use zq_repl::retry::Backoff;
use zq_repl::{Policy, Receiver};
use zq_store::Zfs;

const ROLE: &str = "zq-recv";

/// Receive ZFS snapshots from pinned zq-send peers over QUIC.
#[derive(Parser, Debug)]
#[command(name = "zq-recv", version)]
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
    /// Accept senders and receive their streams until SIGTERM/SIGINT
    Serve(Box<ServeArgs>),
    /// Pull mode: dial a `zq-send serve` at ADDR and receive what it sends
    ///
    /// Dials the `zq-send serve` at ADDR (a sender whose key is --peer) and receives what
    /// it sends, redialing whenever the connection ends, until SIGTERM/SIGINT.
    /// For a backup server behind NAT or a firewall: only outgoing UDP is needed. The
    /// sender still needs an --allow root, as with serve.
    Pull(Box<PullArgs>),
}

#[derive(clap::Args, Debug)]
struct PullArgs {
    /// The sender's address (where `zq-send serve` listens), HOST:PORT.
    addr: HostPort,
    /// The sender's fingerprint (`zq-send fingerprint`); it must have an --allow root.
    #[arg(long, value_name = "FINGERPRINT")]
    peer: zq_net::Fingerprint,
    #[command(flatten)]
    serve: ServeArgs,
}

fn main() -> ExitCode {
    // Pull dials out: how a listener admits connections does not apply to it.
    let matches = Cli::command()
        .mut_subcommand("pull", |c| {
            c.mut_arg("address_validation", |a| a.hide(true))
        })
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Identity(cmd) => cmd.run(ROLE),
        Command::Pull(args) => {
            let given = matches.subcommand_matches("pull");
            let PullArgs { addr, peer, serve } = *args;
            let mut serve = match from_config(serve, given).usage() {
                Ok(a) => a,
                Err(e) => return fail(&e),
            };
            // A config file's receiver listens where its host's address says; pulling,
            // it listens nowhere. Only --listen on the command line is a mistake.
            if !given.map(zq::Given::new).unwrap_or_default().has("listen") {
                serve.listen = None;
            }
            zq::block_on(cli.log.json(), async {
                exit::done(pull(addr, peer, serve).await)
            })
        }
        Command::Serve(args) => {
            let given = matches.subcommand_matches("serve");
            let args = match from_config(*args, given).usage() {
                Ok(a) => a,
                Err(e) => return fail(&e),
            };
            // Before any thread exists: reading LISTEN_FDS also removes it from the
            // environment, so `zfs` children do not see it.
            let inherited = activation_sockets();
            zq::block_on(cli.log.json(), async {
                exit::done(serve(args, inherited).await)
            })
        }
    }
}

/// With --config, the file's receiver for this host under the flags and environment
/// given; otherwise the command line's.
fn from_config(cli: ServeArgs, given: Option<&clap::ArgMatches>) -> anyhow::Result<ServeArgs> {
    let Some(path) = cli.config.clone() else {
        return Ok(cli);
    };
    let config = zq::config::Config::load(&path)?;
    let host = cli.host.clone().unwrap_or_else(zq::config::this_host);
    let Some(receiver) = config.receiver_for(&host)? else {
        anyhow::bail!(
            "config file {} has no receiver for host {host:?} (hosts named in it: {}); set --host",
            path.display(),
            config.host_names()?.join(", ")
        );
    };
    receiver.serve(given)
}

/// The UDP sockets systemd passed (socket activation: `LISTEN_FDS`, `LISTEN_PID`), if any.
fn activation_sockets() -> anyhow::Result<Vec<std::net::UdpSocket>> {
    let mut fds = listenfd::ListenFd::from_env();
    (0..fds.len())
        .filter_map(|i| match fds.take_udp_socket(i) {
            Ok(s) => s.map(Ok),
            Err(e) => Some(Err(anyhow::anyhow!(
                "socket {i} passed by systemd (LISTEN_FDS): {e}; zq-recv needs UDP sockets \
                 (ListenDatagram= in its .socket unit)"
            ))),
        })
        .collect()
}

async fn serve(
    args: ServeArgs,
    inherited: anyhow::Result<Vec<std::net::UdpSocket>>,
) -> anyhow::Result<()> {
    let inherited = inherited.usage()?;
    if let (Some(listen), false) = (args.listen, inherited.is_empty()) {
        return Err(exit::usage(anyhow::anyhow!(
            "--listen {listen} given, but systemd passed {} socket(s) (LISTEN_FDS): \
             set the address in the .socket unit's ListenDatagram= and drop --listen",
            inherited.len()
        )));
    }
    let Prepared {
        identity,
        fingerprints,
        receiver,
    } = prepare(&args).await?;
    let tuning = args.tuning();
    let endpoints = if inherited.is_empty() {
        let listen = args.listen.unwrap_or(DEFAULT_LISTEN);
        zq_net::server(identity, fingerprints, listen, &tuning).map(|e| vec![e])
    } else {
        inherited
            .into_iter()
            .map(|s| zq_net::server_on(identity.clone(), fingerprints.clone(), s, &tuning))
            .collect()
    };
    let endpoints = endpoints.usage()?;
    for endpoint in &endpoints {
        if let Ok(bound) = endpoint.local_addr() {
            zq::out!("listening on {bound}");
            tracing::info!(%bound, senders = args.allow.len(), "zq-recv ready");
        }
    }
    let admission = zq_net::Admission::new(tuning.address_validation);
    let serving: Vec<_> = endpoints
        .iter()
        .map(|e| tokio::spawn(receiver.clone().serve(e.clone(), admission.clone())))
        .collect();
    zq::stopped(zq::ready_until_signal()).await;
    for endpoint in &endpoints {
        endpoint.close(0u32.into(), b"receiver shutting down");
    }
    for s in serving {
        s.abort();
    }
    // Last-received holds go out in batches: let the last ones happen.
    receiver.flush_holds().await;
    Ok(())
}

/// What serving and pulling share: the key, the senders allowed, the receiving engine
/// (and its metrics endpoint, started).
struct Prepared {
    identity: Identity,
    fingerprints: Vec<zq_net::Fingerprint>,
    receiver: std::sync::Arc<Receiver>,
}

async fn prepare(args: &ServeArgs) -> anyhow::Result<Prepared> {
    let usage = exit::usage;
    let mut policy = Policy::default();
    policy.require_raw(args.require_encrypted);
    for (prop, value) in &args.force_property {
        policy
            .force_property(prop, value)
            .map_err(|e| usage(anyhow::anyhow!(e).context("--force-property")))?;
    }
    for prop in &args.exclude_property {
        policy
            .exclude_property(prop)
            .map_err(|e| usage(anyhow::anyhow!(e).context("--exclude-property")))?;
    }
    for (fp, root) in &args.allow {
        policy
            .allow(*fp, root.clone())
            .map_err(|e| usage(anyhow::anyhow!(e).context("--allow")))?;
    }
    let identity_dir = args
        .identity
        .as_ref()
        .ok_or_else(|| usage(anyhow::anyhow!("--identity is missing")))?;
    if args.allow.is_empty() {
        return Err(usage(anyhow::anyhow!(
            "no --allow: no sender could connect"
        )));
    }
    let identity = Identity::load(identity_dir, ROLE).context("loading identity")?;
    let zfs = Zfs::probe(&args.zfs).await.context("probing zfs")?;
    if !args.force_property.is_empty() && !zfs.capabilities().receive_properties {
        return Err(usage(anyhow::anyhow!(
            "--force-property: this host's zfs ({}) has no zfs receive -o; leave the option \
             out, or set the properties on the received datasets by hand",
            args.zfs.display()
        )));
    }
    if !args.exclude_property.is_empty() && !zfs.capabilities().receive_properties {
        return Err(usage(anyhow::anyhow!(
            "--exclude-property: this host's zfs ({}) has no zfs receive -x; leave the \
             option out (this receiver refuses streams with properties anyway)",
            args.zfs.display()
        )));
    }
    // Bound before anything else runs, so a taken port is a usage error at once.
    let metrics_listener = zq::bind_metrics(args.metrics_listen).await.map_err(usage)?;
    let mut caps = Capabilities::current(format!("zq-recv {}", env!("CARGO_PKG_VERSION")));
    if args.resume_with == "spool" {
        caps.resume.retain(|r| r != zq_proto::RESUME_ZFS_TOKEN);
    }
    // A spool of at most 0 bytes would create and remove files for nothing.
    let spool = (!args.no_spool && args.spool_max > 0).then(|| SpoolConfig {
        dir: args.spool_dir.clone(),
        from: args.spool_from.min(args.spool_max),
        max: args.spool_max,
    });
    let spools = Spools::new(spool).map_err(|e| {
        usage(anyhow::Error::new(e).context(format!(
            "creating the spool directory {} (set --spool-dir, or --no-spool)",
            args.spool_dir.display()
        )))
    })?;
    let fingerprints = policy.fingerprints();
    let receiver = Receiver::with_spools(zfs, policy, caps, spools);
    if let Some(listener) = metrics_listener {
        let metrics = receiver.metrics();
        zq::serve_metrics(listener, move || metrics.render());
    }
    Ok(Prepared {
        identity,
        fingerprints,
        receiver,
    })
}

/// `zq-recv pull`: dials the sender and serves each connection until it ends, then dials
/// again (after 1 s, doubling up to 30 s with jitter while attempts fail or end at once).
async fn pull(addr: HostPort, peer: zq_net::Fingerprint, args: ServeArgs) -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    if let Some(listen) = args.listen {
        return Err(exit::usage(anyhow::anyhow!(
            "--listen {listen}: pull dials the sender and listens on nothing"
        )));
    }
    if !args.allow.iter().any(|(fp, _)| *fp == peer) {
        return Err(exit::usage(anyhow::anyhow!(
            "--peer {peer} has no --allow root: add --allow {peer}=ROOT (where it may write)"
        )));
    }
    let Prepared {
        identity, receiver, ..
    } = prepare(&args).await?;
    let target = addr.resolve().await.usage()?;
    let client = zq_net::Client::new(identity, peer, target, &args.transport.tuning()).usage()?;
    let stop = zq::stopped(zq::ready_until_signal());
    tracing::info!(sender = %addr, "zq-recv pulling");
    const CAP: Duration = Duration::from_secs(30);
    let mut backoff = Backoff::new(Duration::from_secs(1), CAP);
    tokio::pin!(stop);
    loop {
        let started = Instant::now();
        let session = async {
            match client.dial(target).await {
                Ok(mut dialed) => match dialed.established().await {
                    Ok(_) => receiver.clone().serve_connection(dialed.conn).await,
                    Err(e) => tracing::warn!(sender = %addr, error = %e, "cannot connect"),
                },
                Err(e) => tracing::warn!(sender = %addr, error = %e, "cannot connect"),
            }
        };
        tokio::select! {
            _ = session => {}
            _ = &mut stop => break,
        }
        // A connection that lasted was not a failure: dial again soon.
        if started.elapsed() > CAP {
            backoff.succeeded();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.failed()) => {}
            _ = &mut stop => break,
        }
    }
    client.shutdown().await;
    receiver.flush_holds().await;
    Ok(())
}
