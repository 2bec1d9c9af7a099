//! `zq-recv`: receives ZFS snapshots from pinned `zq-send` peers over QUIC.

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use zq::serve::{ServeArgs, ServeOnly, DEFAULT_LISTEN};
use zq::{exit, fail};
use zq_net::Identity;
use zq_proto::Capabilities;
use zq_repl::receiver::spool::{SpoolConfig, Spools};
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
    /// Accept senders and receive their streams until SIGTERM/SIGINT.
    Serve(Box<ServeArgs>),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Identity(cmd) => cmd.run(ROLE),
        Command::Serve(args) => {
            let given = matches
                .subcommand_matches("serve")
                .map(zq::Given::new)
                .unwrap_or_default();
            let args = match from_config(*args, &given) {
                Ok(a) => a,
                Err(e) => return fail(exit::USAGE, &e),
            };
            // Before any thread exists: reading LISTEN_FDS also removes it from the
            // environment, so `zfs` children do not see it.
            let inherited = activation_sockets();
            zq::block_on(cli.log.json(), serve(args, inherited))
        }
    }
}

/// With --config, the file's receiver for this host under the flags and environment
/// given; otherwise the command line's.
fn from_config(cli: ServeArgs, given: &zq::Given) -> anyhow::Result<ServeArgs> {
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
    let mut args = ServeOnly::try_parse_from(&receiver.args)
        .map_err(|e| anyhow::anyhow!("{}", zq::clap_message(&e)))
        .with_context(|| format!("config file {}: receiver of host {host:?}", path.display()))?
        .args;
    args.overlay(cli, given);
    Ok(args)
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

async fn serve(args: ServeArgs, inherited: anyhow::Result<Vec<std::net::UdpSocket>>) -> ExitCode {
    let inherited = match inherited {
        Ok(s) => s,
        Err(e) => return fail(exit::USAGE, &e),
    };
    if let (Some(listen), false) = (args.listen, inherited.is_empty()) {
        return fail(
            exit::USAGE,
            &anyhow::anyhow!(
                "--listen {listen} given, but systemd passed {} socket(s) (LISTEN_FDS): \
                 set the address in the .socket unit's ListenDatagram= and drop --listen",
                inherited.len()
            ),
        );
    }
    let mut policy = Policy::default();
    for (fp, root) in &args.allow {
        if let Err(e) = policy.allow(*fp, root.clone()) {
            return fail(exit::USAGE, &anyhow::anyhow!(e).context("--allow"));
        }
    }
    let Some(identity_dir) = &args.identity else {
        return fail(exit::USAGE, &anyhow::anyhow!("--identity is missing"));
    };
    if args.allow.is_empty() {
        return fail(
            exit::USAGE,
            &anyhow::anyhow!("no --allow: no sender could connect"),
        );
    }
    let identity = match Identity::load(identity_dir, ROLE) {
        Ok(i) => i,
        Err(e) => {
            return fail(
                exit::USAGE,
                &anyhow::Error::new(e).context("loading identity"),
            )
        }
    };
    let zfs = match Zfs::probe(&args.zfs).await {
        Ok(z) => z,
        Err(e) => return fail(exit::FAILURE, &anyhow::Error::new(e).context("probing zfs")),
    };
    // Bound before anything else runs, so a taken port is a usage error at once.
    let metrics_listener = match zq::bind_metrics(args.metrics_listen).await {
        Ok(l) => l,
        Err(e) => return fail(exit::USAGE, &e),
    };
    let tuning = args.transport.tuning();
    let endpoints = if inherited.is_empty() {
        let listen = args
            .listen
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("literal address"));
        zq_net::server(identity, policy.fingerprints(), listen, &tuning).map(|e| vec![e])
    } else {
        inherited
            .into_iter()
            .map(|s| zq_net::server_on(identity.clone(), policy.fingerprints(), s, &tuning))
            .collect()
    };
    let endpoints = match endpoints {
        Ok(e) => e,
        Err(e) => return fail(exit::USAGE, &anyhow::Error::new(e)),
    };
    for endpoint in &endpoints {
        if let Ok(bound) = endpoint.local_addr() {
            println!("listening on {bound}");
            tracing::info!(%bound, senders = args.allow.len(), "zq-recv ready");
        }
    }
    let caps = Capabilities::current(format!("zq-recv {}", env!("CARGO_PKG_VERSION")));
    // A spool of at most 0 bytes would create and remove files for nothing.
    let spool = (!args.no_spool && args.spool_max > 0).then(|| SpoolConfig {
        dir: args.spool_dir.clone(),
        from: args.spool_from.min(args.spool_max),
        max: args.spool_max,
    });
    let spools = match Spools::new(spool) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                exit::USAGE,
                &anyhow::Error::new(e).context(format!(
                    "creating the spool directory {} (set --spool-dir, or --no-spool)",
                    args.spool_dir.display()
                )),
            )
        }
    };
    let receiver = Receiver::with_spools(zfs, policy, caps, spools);
    if let Some(listener) = metrics_listener {
        let metrics = receiver.metrics();
        zq::serve_metrics(listener, move || metrics.render());
    }
    let serving: Vec<_> = endpoints
        .iter()
        .map(|e| tokio::spawn(receiver.clone().serve(e.clone())))
        .collect();
    // For Type=notify units; a no-op elsewhere.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    zq::shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    for endpoint in &endpoints {
        endpoint.close(0u32.into(), b"receiver shutting down");
    }
    for s in serving {
        s.abort();
    }
    // Last-received holds go out in batches: let the last ones happen.
    receiver.flush_holds().await;
    ExitCode::SUCCESS
}
