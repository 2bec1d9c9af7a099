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
    /// Log as JSON lines instead of human-readable text (logs go to stderr).
    #[arg(long, global = true)]
    log_json: bool,
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
    /// UDP address to listen on, e.g. [::]:7446. Port 0 picks a free port; the bound
    /// address is printed on stdout as `listening on ADDR`.
    #[arg(long, default_value = "[::]:7446", value_name = "ADDR")]
    listen: SocketAddr,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Identity(cmd) => cmd.run(ROLE),
        Command::Serve(args) => zq::block_on(cli.log_json, serve(args)),
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
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
    let endpoint = match zq_net::server(
        identity,
        policy.fingerprints(),
        args.listen,
        &args.transport.tuning(),
    ) {
        Ok(e) => e,
        Err(e) => return fail(exit::USAGE, &anyhow::Error::new(e)),
    };
    let bound = endpoint.local_addr().unwrap_or(args.listen);
    println!("listening on {bound}");
    tracing::info!(%bound, senders = args.allow.len(), "zq-recv ready");
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
    let serving = tokio::spawn(receiver.clone().serve(endpoint.clone()));
    zq::shutdown_signal().await;
    tracing::info!("shutting down");
    endpoint.close(0u32.into(), b"receiver shutting down");
    serving.abort();
    // Last-received holds go out in batches: let the last ones happen.
    receiver.flush_holds().await;
    ExitCode::SUCCESS
}
