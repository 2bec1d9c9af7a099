//! Errors of the replication engines, with whether retrying can help.

use zq_net::{NetError, StreamError};
use zq_proto::{ErrorKind, HandshakeError, WireError};
use zq_store::{NameError, StoreError};

use crate::plan::PlanError;

/// Replicating a dataset failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    /// The source dataset does not exist.
    #[error("source dataset {0} does not exist")]
    SourceMissing(String),
    /// The filters leave nothing to replicate.
    #[error("every dataset of {0} is excluded (--exclude, --exclude-regex, --include-regex, --exclude-property, --skip-parent)")]
    AllExcluded(String),
    /// The plan refused (divergence, nothing in common) — needs a human or `--force`.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The receiver reported an error.
    #[error("receiver: {}", .0.message)]
    Remote(WireError),
    /// A local `zfs` command failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A name could not be used.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The transport failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The connection was lost.
    #[error("connection lost: {0}")]
    Connection(String),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Not attempted.
    #[error("skipped: {0}")]
    Skipped(String),
    /// The receiver is too old for what was asked (it speaks an older protocol version).
    #[error("{0}")]
    Unsupported(String),
    /// No `zfs send` options fit the job's choices and the destination (e.g. an encrypted
    /// dataset, raw by default, to a pool without the encryption feature). Not transient.
    #[error("not sent: {0}")]
    SendRefused(#[from] crate::sendflags::Refused),
    /// The receiver stopped reading a step's data (it, or its `zfs receive`, hangs) while
    /// the connection stayed alive.
    #[error("the receiver accepted none of the step's data for {0:?}; step abandoned")]
    Stalled(std::time::Duration),
}

impl From<zq_store::CommandError> for ReplError {
    fn from(e: zq_store::CommandError) -> Self {
        ReplError::Store(e.into())
    }
}

impl ReplError {
    pub(crate) fn connection(e: quinn::ConnectionError) -> Self {
        ReplError::Connection(e.to_string())
    }

    /// Whether retrying later, with nothing changed by a human, can succeed.
    pub fn retryable(&self) -> bool {
        match self {
            ReplError::Remote(e) => e.kind.retryable(),
            ReplError::Net(e) => e.retryable(),
            ReplError::Stream(_) | ReplError::Connection(_) | ReplError::Stalled(_) => true,
            _ => false,
        }
    }

    /// Whether running the job again soon may succeed: [`ReplError::retryable`] errors,
    /// and zfs commands that failed for a reason zq cannot classify (a busy dataset,
    /// zfs-fuse's sporadic I/O errors under load). Refusals (divergence, authorization,
    /// names) are not transient; a full destination is, for as long as the retries last.
    pub fn transient(&self) -> bool {
        if let ReplError::Store(e) = self {
            return !e.is_refusal();
        }
        self.retryable()
            || matches!(
                self,
                ReplError::Remote(WireError {
                    kind: ErrorKind::Zfs | ErrorKind::Internal,
                    ..
                })
            )
    }

    /// Whether this is a divergence only `--force` (or a human) can resolve.
    pub fn needs_force(&self) -> bool {
        matches!(self, ReplError::Plan(_))
            || matches!(
                self,
                ReplError::Remote(WireError {
                    kind: ErrorKind::Diverged | ErrorKind::TargetExists,
                    ..
                })
            )
    }

    /// Whether the receiver's state differs from what the sender assumed (a stale cursor,
    /// or a partial receive or spool the sender did not plan with): list the destination
    /// again and re-plan.
    pub fn stale_destination(&self) -> bool {
        matches!(
            self,
            ReplError::Remote(WireError {
                kind: ErrorKind::Diverged
                    | ErrorKind::BaseMissing
                    | ErrorKind::TargetExists
                    | ErrorKind::ResumeRejected,
                ..
            })
        )
    }

    /// Whether the connection is gone and must be re-established.
    pub fn connection_lost(&self) -> bool {
        matches!(
            self,
            ReplError::Connection(_) | ReplError::Stream(_) | ReplError::Net(_)
        )
    }

    /// Whether the receiver refused this sender's authority.
    pub fn not_authorized(&self) -> bool {
        matches!(
            self,
            ReplError::Remote(WireError {
                kind: ErrorKind::NotAuthorized,
                ..
            })
        )
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
