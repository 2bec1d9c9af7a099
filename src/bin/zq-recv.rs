//! `zq-recv`: receives ZFS snapshots from pinned `zq-send` peers over QUIC.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use zq::{exit, fail};
use zq_net::{Fingerprint, Identity};
use zq_proto::Capabilities;
use zq_repl::receiver::spool::{SpoolConfig, Spools};
use zq_repl::{Policy, Receiver};
use zq_store::{DatasetName, Zfs};

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
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// UDP address to listen on [default: [::]:7446]. Port 0 picks a free port; the bound
    /// address is printed on stdout as `listening on ADDR`. Under systemd socket
    /// activation (zq-recv.socket) the socket comes from systemd instead: leave it out.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Directory holding this receiver's identity (see `keygen`).
    #[arg(long, value_name = "DIR")]
    identity: PathBuf,
    /// Allow the sender with this fingerprint to write inside ROOT (repeatable; one root
    /// per sender).
    #[arg(long, value_name = "FINGERPRINT=ROOT", required = true, value_parser = parse_allow)]
    allow: Vec<(Fingerprint, DatasetName)>,
    /// The zfs program to run.
    #[arg(long, default_value = "zfs", value_name = "PATH")]
    zfs: PathBuf,
    /// Directory where large steps are spooled so that an interrupted one resumes instead
    /// of starting over. Needs free space for the largest transfer (up to --spool-max).
    #[arg(long, default_value = "/var/lib/zq-recv/spool", value_name = "DIR")]
    spool_dir: PathBuf,
    /// Spool steps once their stream passes SIZE (held in memory per step until then);
    /// smaller steps restart when interrupted.
    #[arg(long, default_value = "4MiB", value_name = "SIZE", value_parser = zq::parse_size)]
    spool_from: u64,
    /// Spool at most SIZE of one step; the rest of a longer one is not resumable (0: spool
    /// nothing, as --no-spool).
    #[arg(long, default_value = "64GiB", value_name = "SIZE", value_parser = zq::parse_size)]
    spool_max: u64,
    /// Spool nothing: every interrupted step starts over.
    #[arg(long)]
    no_spool: bool,
    /// Serve Prometheus metrics on http://ADDR/metrics (per target steps, failures, bytes
    /// and resumes; each sender connection's RTT, window and losses; zfs command
    /// durations). Off by default; e.g. 127.0.0.1:9747.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    transport: zq::TransportArgs,
}

fn parse_allow(s: &str) -> Result<(Fingerprint, DatasetName), String> {
    let (fp, root) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected FINGERPRINT=ROOT"))?;
    let fp = Fingerprint::parse(fp)?;
    let root = DatasetName::parse(root).map_err(|e| e.to_string())?;
    Ok((fp, root))
}

/// The port zq-recv listens on unless told otherwise.
const DEFAULT_LISTEN: &str = "[::]:7446";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Identity(cmd) => cmd.run(ROLE),
        Command::Serve(args) => {
            // Before any thread exists: reading LISTEN_FDS also removes it from the
            // environment, so `zfs` children do not see it.
            let inherited = activation_sockets();
            zq::block_on(cli.log.json(), serve(args, inherited))
        }
    }
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
    let identity = match Identity::load(&args.identity, ROLE) {
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
