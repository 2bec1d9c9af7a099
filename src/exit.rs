//! Exit codes, documented in `docs/operations.md` (scripts and systemd act on these), and
//! the one mapping from an error to its code ([`code`], nextest's `process_exit_code()`):
//! call sites say what failed, the error's type says how.

use zq_repl::oneshot::RunError;
use zq_repl::{ConnectError, ReplError};

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

/// The command line, the environment or a config file asked for something wrong or
/// impossible: exit [`USAGE`]. Displays as the error it wraps.
#[derive(Debug)]
pub struct Usage(pub anyhow::Error);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Usage {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Marks an error as a usage error ([`Usage`]).
pub trait UsageExt<T> {
    /// The error, as a [`Usage`] error.
    fn usage(self) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> UsageExt<T> for Result<T, E> {
    fn usage(self) -> anyhow::Result<T> {
        self.map_err(|e| usage(e.into()))
    }
}

/// `err` as a [`Usage`] error.
pub fn usage(err: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Usage(err.into()))
}

/// The exit code of a failure: the first cause of a known kind decides.
pub fn code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.is::<Usage>() || cause.is::<zq_net::IdentityError>() {
            return USAGE;
        }
        if let Some(e) = cause.downcast_ref::<RunError>() {
            return match e {
                RunError::Connect(c) => connect_code(c),
                RunError::Replicate { error, .. } => repl_code(error),
            };
        }
        if let Some(e) = cause.downcast_ref::<ConnectError>() {
            return connect_code(e);
        }
        if let Some(e) = cause.downcast_ref::<ReplError>() {
            return repl_code(e);
        }
    }
    FAILURE
}

fn connect_code(e: &ConnectError) -> u8 {
    if e.is_usage() {
        USAGE
    } else {
        CONNECT
    }
}

/// The exit code of a dataset's (or a job's) replication error.
pub fn repl_code(e: &ReplError) -> u8 {
    if e.needs_force() {
        DIVERGED
    } else if e.not_authorized() {
        NOT_AUTHORIZED
    } else {
        FAILURE
    }
}

/// [`OK`], or [`fail`].
pub fn done(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Prints `err` with its causes on stderr and returns its exit code.
pub fn fail(err: &anyhow::Error) -> std::process::ExitCode {
    crate::report(err);
    std::process::ExitCode::from(code(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_known_cause_decides_the_code() {
        use anyhow::Context;
        let plain = anyhow::anyhow!("disk on fire");
        assert_eq!(code(&plain), FAILURE);
        let bad: anyhow::Result<()> = Err(anyhow::anyhow!("no port")).usage();
        let bad = bad.context("--config x").unwrap_err();
        assert_eq!(code(&bad), USAGE);
        assert_eq!(format!("{bad:#}"), "--config x: no port");
        let lost = anyhow::Error::new(ReplError::Connection("gone".into())).context("replicating");
        assert_eq!(code(&lost), FAILURE);
        let invalid = anyhow::Error::new(ConnectError::Invalid("pull mode".into()));
        assert_eq!(code(&invalid), USAGE);
        let remote = |kind| {
            ReplError::Remote(zq_proto::WireError {
                kind,
                message: "m".into(),
                receiver_newest: None,
            })
        };
        let diverged = anyhow::Error::new(RunError::Replicate {
            source_dataset: zq_store::DatasetName::parse("t/a").unwrap(),
            error: remote(zq_proto::ErrorKind::Diverged),
        });
        assert_eq!(code(&diverged), DIVERGED);
        assert_eq!(
            repl_code(&remote(zq_proto::ErrorKind::NotAuthorized)),
            NOT_AUTHORIZED
        );
    }
}
