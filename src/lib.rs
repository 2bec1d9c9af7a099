//! Shared plumbing of the `zq-send` and `zq-recv` binaries: logging, exit codes and the
//! identity subcommands. The engines live in the `zq-*` crates; this stays thin.

use std::path::Path;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// Exit codes, documented in `docs/operations.md`. Scripts and systemd act on these.
pub mod exit {
    /// Everything asked for was done.
    pub const OK: u8 = 0;
    /// A failure that retrying may fix (zfs error, connection lost mid-step, ...).
    pub const FAILURE: u8 = 1;
    /// Bad command line or configuration (clap also uses 2).
    pub const USAGE: u8 = 2;
    /// The destination diverged or exists without a common snapshot: needs `--force`.
    pub const DIVERGED: u8 = 3;
    /// Could not connect, or the peer's key / our key / protocol version was refused.
    pub const CONNECT: u8 = 4;
    /// The receiver refused a target outside this sender's root.
    pub const NOT_AUTHORIZED: u8 = 5;
}

/// Installs the log subscriber: stderr, filtered by `ZQ_LOG` (default `info`), human or
/// JSON lines.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_env("ZQ_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `keygen DIR`: creates the identity of `role` and prints its fingerprint.
pub fn keygen(dir: &Path, role: &str) -> ExitCode {
    match zq_net::Identity::generate(dir, role) {
        Ok(fp) => {
            println!("{fp}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(exit::USAGE, &anyhow::Error::new(e).context("keygen")),
    }
}

/// `fingerprint DIR`: prints the fingerprint of the existing identity of `role`.
pub fn fingerprint(dir: &Path, role: &str) -> ExitCode {
    match zq_net::Identity::fingerprint_of(dir, role) {
        Ok(fp) => {
            println!("{fp}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(exit::USAGE, &anyhow::Error::new(e).context("fingerprint")),
    }
}

/// `err` and its causes, joined by `: ` (what `{:#}` does for anyhow errors).
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// Prints `err` with its causes and returns `code`.
pub fn fail(code: u8, err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {err:#}");
    ExitCode::from(code)
}
