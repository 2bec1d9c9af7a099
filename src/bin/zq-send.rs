//! `zq-send`: replicates local ZFS datasets to a `zq-recv` over one QUIC connection.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use zq::{exit, fail};
use zq_net::{Client, Fingerprint, Identity, Tuning};
use zq_proto::Capabilities;
use zq_repl::{DatasetOutcome, Job, PlanOptions, ReplError, Sender};
use zq_store::{DatasetName, Zfs};

const ROLE: &str = "zq-send";

/// Replicate ZFS snapshots to a zq-recv over one authenticated QUIC connection.
#[derive(Parser, Debug)]
#[command(name = "zq-send", version)]
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
    /// Replicate SOURCE to TARGET on the receiver at ADDR, once.
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Source dataset, e.g. tank/home.
    source: DatasetName,
    /// Receiver address, host:port (e.g. backup.example:7446 or [::1]:7446).
    addr: String,
    /// Target dataset on the receiver, inside the root the receiver allows for us.
    target: DatasetName,
    /// Directory holding this sender's identity (see `keygen`).
    #[arg(long, value_name = "DIR")]
    identity: PathBuf,
    /// The receiver's fingerprint, as printed by `zq-recv keygen` / `fingerprint`.
    #[arg(long, value_name = "FINGERPRINT")]
    peer: Fingerprint,
    /// Also replicate every descendant dataset (parents before children).
    #[arg(long, short = 'r')]
    recursive: bool,
    /// Send only the newest snapshot (zfs send -i) instead of every intermediate (-I).
    #[arg(long, short = 'i')]
    newest_only: bool,
    /// Roll back a diverged destination to the common base, or replace a destination that
    /// has no snapshot in common. Destroys destination snapshots; never done without it.
    #[arg(long)]
    force: bool,
    /// The zfs program to run.
    #[arg(long, default_value = "zfs", value_name = "PATH")]
    zfs: PathBuf,
    /// Speak only this protocol version (for compatibility testing).
    #[arg(long, hide = true)]
    protocol_version: Option<u16>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Identity(cmd) => cmd.run(ROLE),
        Command::Run(args) => zq::block_on(cli.log_json, run(args)),
    }
}

async fn run(args: RunArgs) -> ExitCode {
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
    let mut caps = Capabilities::current(format!("zq-send {}", env!("CARGO_PKG_VERSION")));
    if let Some(v) = args.protocol_version {
        caps.min_version = v;
        caps.max_version = v;
    }
    let (sender, client) = match connect(&args, identity, zfs, &caps).await {
        Ok(s) => s,
        Err(e) => return fail(exit::CONNECT, &e),
    };
    let job = Job {
        source: args.source.clone(),
        target: args.target.clone(),
        recursive: args.recursive,
        options: PlanOptions {
            newest_only: args.newest_only,
            force: args.force,
        },
    };
    let reports = match sender.replicate(&job).await {
        Ok(r) => r,
        Err(e) => {
            let code = code_for(&e);
            client.shutdown().await;
            return fail(
                code,
                &anyhow::Error::new(e).context(format!("replicating {}", args.source)),
            );
        }
    };
    let mut code = exit::OK;
    for r in &reports {
        match &r.outcome {
            DatasetOutcome::UpToDate => println!("{} -> {}: up to date", r.source, r.target),
            DatasetOutcome::Sent {
                steps,
                bytes,
                newest,
                committed,
            } => println!(
                "{} -> {}: sent {steps} step(s), {bytes} bytes; destination now at @{newest} ({committed} snapshots)",
                r.source, r.target
            ),
            DatasetOutcome::Failed(e) => {
                eprintln!("error: {} -> {}: {}", r.source, r.target, zq::chain(e));
                code = code.max(code_for(e));
            }
        }
    }
    drop(sender);
    client.shutdown().await;
    ExitCode::from(code)
}

async fn connect(
    args: &RunArgs,
    identity: Identity,
    zfs: Zfs,
    caps: &Capabilities,
) -> anyhow::Result<(Sender, Client)> {
    let addr = zq_net::resolve(&args.addr).await?;
    let ours = identity.fingerprint;
    let client = Client::new(identity, args.peer, addr, &Tuning::default())?;
    let conn = client
        .connect(addr)
        .await
        .with_context(|| format!("connecting to receiver {}", args.addr))?;
    match Sender::handshake(conn.clone(), zfs, caps).await {
        Ok(sender) => Ok((sender, client)),
        Err(_) if zq_net::closed_by_tls_alert(&conn) => anyhow::bail!(
            "receiver {} refused this sender's key {ours}: on the receiver, allow it with \
             --allow {ours}=ROOT",
            args.addr
        ),
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("handshake with receiver {}", args.addr)))
        }
    }
}

fn code_for(e: &ReplError) -> u8 {
    if e.needs_force() {
        exit::DIVERGED
    } else if e.not_authorized() {
        exit::NOT_AUTHORIZED
    } else {
        exit::FAILURE
    }
}
