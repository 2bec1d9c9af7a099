//! A sender's session: the connection, the handshake with its configuration, the stripe
//! connections, and the requests that are not steps (listings, retention).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::info;
use zq_net::{Dialed, FramedRecv, FramedSend};
use zq_proto::{
    Capabilities, Compression, ListRequest, ListRoot, Message, ResumeToken, Session, Stripes,
    RESUME_SPOOL,
};
use zq_store::{DatasetName, Zfs};

use crate::error::ReplError;
use crate::protect::Protector;
use crate::sendflags::{DestinationFacts, SendPolicy};
use crate::stripe::StripeSender;

/// How long the sender waits for the receiver's answer to its Hello (the receiver gives a
/// new connection as long to send one).
const WELCOME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The receiver's answer to a listing.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Existing datasets under the requested root, parents first, with their snapshots.
    pub datasets: Vec<zq_proto::DatasetSnapshots>,
    /// Steps the receiver can resume under the root.
    pub resumable: Vec<ResumeToken>,
    /// What the destination can receive; `None` from a receiver before protocol 6.
    pub destination: Option<Arc<DestinationFacts>>,
    /// Targets an interrupted `zfs receive -s` left partial (protocol 7).
    pub partial: Vec<zq_proto::PartialReceive>,
    /// Asked with `ListNewest` (protocol 9): a dataset's snapshots may be its newest only.
    pub newest_only: bool,
}

/// What the receiver kept of an interrupted step into a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// zfs's partial receive, with its `receive_resume_token` (not yet checked).
    Native(String),
    /// The receiver's spool.
    Spool(ResumeToken),
}

impl Listing {
    /// What the receiver kept of an interrupted step into `target`, if anything: zfs's
    /// partial receive first (a receive into the target cannot start while it exists).
    pub fn kept(&self, target: &DatasetName) -> Option<Kept> {
        if let Some(p) = self.partial.iter().find(|p| p.dataset == target.as_str()) {
            return Some(Kept::Native(p.token.clone()));
        }
        self.resumable
            .iter()
            .find(|t| t.dataset == target.as_str())
            .cloned()
            .map(Kept::Spool)
    }
}

/// How a sender sends: given at the handshake ([`Sender::handshake`]) and the same for
/// every connection of a job (quinn's `TransportConfig` habit: one struct at construction,
/// not setters called in order).
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Holds and cursors ([`crate::protect`]); none: guarantee_nothing without a cursor.
    pub protector: Option<Arc<Protector>>,
    /// A step whose data the receiver accepts none of for this long while the connection
    /// stays alive (a hung receiver or `zfs receive`) is abandoned, to be retried and
    /// resumed from the receiver's spool. QUIC's flow control bounds what waits meanwhile.
    pub stall_timeout: Duration,
    /// How chunks are compressed. zstd is offered in the handshake only when this is not
    /// [`Compression::None`] ([`SenderConfig::capabilities`]), and used where agreed.
    pub compression: Compression,
    /// All steps' data together stays under this rate (clones of one limit, given to
    /// several senders, limit them together).
    pub bwlimit: Option<zq_net::RateLimit>,
    /// `false` under a snapshot filter: never `zfs send -I`, which would carry the
    /// snapshots the filter leaves out, but a chain of `-i` steps between kept ones.
    pub intermediates: bool,
    /// Where each step in flight is reported (a terminal's progress line, a daemon's
    /// status), with zfs's size estimate once a step turns bulk where zfs can give one.
    pub progress: Option<Arc<crate::progress::Progress>>,
    /// Caps the size estimations (`zfs send -nvP`, or a property where zfs cannot
    /// estimate) running at once, across connections and jobs. Estimates only feed
    /// progress and status; a step never waits for one.
    pub estimates: Arc<tokio::sync::Semaphore>,
    /// Which `zfs send` options steps may use ([`crate::sendflags`]).
    pub send: SendPolicy,
    /// Properties steps carry and ask the receiver for ([`crate::props`]; protocol 8).
    pub properties: crate::props::PropertyPolicy,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            protector: None,
            stall_timeout: STALL_TIMEOUT,
            compression: Compression::None,
            bwlimit: None,
            intermediates: true,
            progress: None,
            estimates: Arc::new(tokio::sync::Semaphore::new(DEFAULT_SIZE_ESTIMATES)),
            send: SendPolicy::default(),
            properties: Default::default(),
        }
    }
}

impl SenderConfig {
    /// What this sender offers in its Hello: the current protocol (or only `version`),
    /// zstd only if it would use it, native resume (`zfs-token`) only if its zfs can
    /// `send -t` (`native_resume`).
    pub fn capabilities(
        &self,
        software: String,
        version: Option<u16>,
        native_resume: bool,
    ) -> Capabilities {
        let mut caps = Capabilities::current(software);
        if !native_resume {
            caps.resume.retain(|r| r != zq_proto::RESUME_ZFS_TOKEN);
        }
        if let Some(v) = version {
            caps.min_version = v;
            caps.max_version = v;
        }
        if self.compression == Compression::None {
            caps.compression = vec![zq_proto::COMPRESSION_NONE.into()];
        }
        caps
    }
}

/// A connected, handshaken sender.
#[derive(Debug)]
pub struct Sender {
    pub(super) conn: quinn::Connection,
    pub(super) zfs: Zfs,
    pub(super) session: Session,
    pub(super) config: SenderConfig,
    /// More connections to the same receiver, over which bulk steps spread their chunks
    /// with this one ([`crate::stripe`]).
    pub(super) stripes: Vec<quinn::Connection>,
    /// What the destination said it can receive, by the root it was listed for (the
    /// latest listing of each).
    pub(super) destinations: Mutex<Vec<(DatasetName, Arc<DestinationFacts>)>>,
    /// Datasets whose properties are not sent although the job asks (logged once each).
    properties_withheld: Mutex<std::collections::HashSet<DatasetName>>,
}

/// [`SenderConfig::estimates`]' default: zrepl's `concurrency.size_estimates`.
pub const DEFAULT_SIZE_ESTIMATES: usize = 4;

/// [`SenderConfig::stall_timeout`]'s default.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(120);

impl Sender {
    /// Runs the handshake on a fresh connection. On a resumed connection ([`Dialed`] in
    /// 0-RTT) the Hello goes out at once and the receiver answers before the TLS handshake
    /// completes, so a reconnect costs one round trip; if the receiver rejects the 0-RTT
    /// data, the Hello is sent again. Steps are only ever sent once the handshake is
    /// complete: they must not be replayable.
    pub async fn handshake(
        dialed: impl Into<Dialed>,
        zfs: Zfs,
        caps: &Capabilities,
        config: SenderConfig,
    ) -> Result<Self, ReplError> {
        let mut dialed = dialed.into();
        let early = dialed.is_early();
        let first = Self::hello(&dialed.conn, caps).await;
        let accepted = dialed.established().await?;
        let session = if accepted {
            first?
        } else {
            Self::hello(&dialed.conn, caps).await?
        };
        info!(version = session.version, peer = %session.peer_software, early = early && accepted, "handshake complete");
        Ok(Sender {
            conn: dialed.conn,
            zfs,
            session,
            config,
            stripes: Vec::new(),
            destinations: Mutex::default(),
            properties_withheld: Mutex::default(),
        })
    }

    /// Spreads bulk steps' chunks over these connections as well as this sender's own
    /// ([`crate::stripe`]; protocol version 5, else unused). Each must be a handshaken
    /// connection to the same receiver under the same key (another [`Sender`]'s, see
    /// [`Sender::into_connection`]). One that closes is left out of later steps.
    pub fn with_stripes(mut self, conns: Vec<quinn::Connection>) -> Self {
        self.stripes = conns;
        self
    }

    /// The connection, handshaken, for [`Sender::with_stripes`].
    pub fn into_connection(self) -> quinn::Connection {
        self.conn
    }

    /// Says [`Stripes`] on a bulk step's stream and opens the set, when this sender has
    /// stripe connections open and the receiver speaks version 5.
    pub(super) async fn open_stripes(
        &self,
        send: &mut FramedSend,
    ) -> Result<Option<StripeSender>, ReplError> {
        if self.session.version < 5 || self.stripes.is_empty() {
            return Ok(None);
        }
        let mut conns = vec![self.conn.clone()];
        conns.extend(
            self.stripes
                .iter()
                .filter(|c| c.close_reason().is_none())
                .cloned(),
        );
        conns.truncate(zq_proto::limits::MAX_STRIPES);
        if conns.len() < 2 {
            return Ok(None);
        }
        let set = Stripes {
            id: crate::stripe::new_id(),
            count: conns.len() as u8,
        };
        send.send(&Message::Stripes(set)).await?;
        info!(
            connections = set.count,
            "spreading the step's chunks over parallel connections"
        );
        Ok(Some(StripeSender::open(&conns, set).await?))
    }

    /// The Hello/Welcome exchange on a new stream, within [`WELCOME_TIMEOUT`]: a receiver
    /// that keeps the connection alive but never answers must not hang the sender.
    pub(super) async fn hello(
        conn: &quinn::Connection,
        caps: &Capabilities,
    ) -> Result<Session, ReplError> {
        tokio::time::timeout(WELCOME_TIMEOUT, Self::exchange_hello(conn, caps))
            .await
            .unwrap_or_else(|_| {
                Err(ReplError::Connection(format!(
                    "the receiver sent no Welcome within {WELCOME_TIMEOUT:?}"
                )))
            })
    }

    pub(super) async fn exchange_hello(
        conn: &quinn::Connection,
        caps: &Capabilities,
    ) -> Result<Session, ReplError> {
        let (send, recv) = conn.open_bi().await.map_err(ReplError::connection)?;
        let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
        send.send(&Message::Hello(caps.hello())).await?;
        send.finish()?;
        match recv.message("Welcome").await? {
            Message::Welcome(w) => Ok(caps.check_welcome(&w)?),
            Message::Refused(r) => Err(zq_proto::HandshakeError::Refused(r).into()),
            other => Err(zq_proto::HandshakeError::Unexpected {
                expected: "Welcome",
                got: other.name(),
            }
            .into()),
        }
    }

    /// Whether the connection is still open (a step's error may be its own, not the
    /// connection's).
    pub fn is_connected(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// The QUIC connection (for its statistics).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// What the handshake agreed on.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Lists `target` (and descendants) on the receiver in one request, with the steps it
    /// can resume there (if the session agreed on spooling).
    pub async fn list_remote(
        &self,
        target: &DatasetName,
        recursive: bool,
    ) -> Result<Listing, ReplError> {
        self.list_remote_with(target, recursive, false).await
    }

    /// [`Self::list_remote`], where each dataset's snapshots may be its newest only
    /// ([`Listing::newest_only`]; from protocol 9, else a full listing): enough to plan
    /// the next step from a common newest snapshot, at no cost per snapshot on the
    /// receiver where zfs names the newest (OpenZFS).
    pub async fn list_remote_newest(
        &self,
        target: &DatasetName,
        recursive: bool,
    ) -> Result<Listing, ReplError> {
        self.list_remote_with(target, recursive, self.session.version >= 9)
            .await
    }

    async fn list_remote_with(
        &self,
        target: &DatasetName,
        recursive: bool,
        newest_only: bool,
    ) -> Result<Listing, ReplError> {
        let (send, recv) = self.conn.open_bi().await.map_err(ReplError::connection)?;
        let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
        let request = ListRequest {
            roots: vec![ListRoot {
                dataset: target.to_string(),
                recursive,
            }],
        };
        send.send(&match newest_only {
            true => Message::ListNewest(request),
            false => Message::ListRequest(request),
        })
        .await?;
        send.finish()?;
        let datasets = match recv.message("ListResponse").await? {
            Message::ListResponse(r) => r.datasets,
            Message::Error(e) => return Err(ReplError::Remote(e)),
            other => {
                return Err(ReplError::Protocol(format!(
                    "expected ListResponse, receiver sent {}",
                    other.name()
                )))
            }
        };
        let resumable = if self.spooling() {
            match recv.message("Resumable").await? {
                Message::Resumable(r) => r.tokens,
                other => {
                    return Err(ReplError::Protocol(format!(
                        "expected Resumable, receiver sent {}",
                        other.name()
                    )))
                }
            }
        } else {
            Vec::new()
        };
        let destination = if self.session.version >= 6 {
            match recv.message("Destination").await? {
                Message::Destination(d) => {
                    let facts = Arc::new(DestinationFacts::new(d, &datasets));
                    if let Ok(mut known) = self.destinations.lock() {
                        known.retain(|(root, _)| root != target);
                        known.push((target.clone(), facts.clone()));
                    }
                    Some(facts)
                }
                Message::Error(e) => return Err(ReplError::Remote(e)),
                other => {
                    return Err(ReplError::Protocol(format!(
                        "expected Destination, receiver sent {}",
                        other.name()
                    )))
                }
            }
        } else {
            None
        };
        let partial = if self.session.version >= 7 {
            match recv.message("PartialReceives").await? {
                Message::PartialReceives(p) => p.partial,
                other => {
                    return Err(ReplError::Protocol(format!(
                        "expected PartialReceives, receiver sent {}",
                        other.name()
                    )))
                }
            }
        } else {
            Vec::new()
        };
        Ok(Listing {
            datasets,
            resumable,
            destination,
            partial,
            newest_only,
        })
    }

    /// The `zfs send` options of a step from `source` into `target`
    /// ([`crate::sendflags::choose`]), from the destination's latest listing under a root
    /// that holds `target` (listing it first if there is none, from protocol version 6).
    pub(super) async fn send_flags(
        &self,
        source: &DatasetName,
        target: &DatasetName,
    ) -> Result<zq_store::SendFlags, ReplError> {
        let known = |s: &Self| {
            s.destinations.lock().ok().and_then(|k| {
                k.iter()
                    .filter(|(root, _)| target.is_within(root))
                    .max_by_key(|(root, _)| root.depth())
                    .map(|(_, f)| f.clone())
            })
        };
        let mut dest = known(self);
        if dest.is_none() && self.session.version >= 6 {
            dest = self.list_remote(target, false).await?.destination;
        }
        let encrypted = self
            .zfs
            .encryption(source)
            .await?
            .is_some_and(|e| crate::receiver::is_encrypted(&e));
        let features = self.zfs.pool_features(source.pool()).await?;
        let caps = self.zfs.capabilities();
        let side = crate::sendflags::Source {
            encrypted,
            features: &features,
            capable: caps.send_features,
        };
        Ok(crate::sendflags::choose(
            &self.config.send,
            side,
            dest.as_deref(),
            target,
        )?)
    }

    /// Whether a step of `source` sent with `flags` carries the dataset's properties (`zfs
    /// send -p`): when the job asks, except for an encrypted dataset sent decrypted, which
    /// zfs refuses to send with properties (logged once per dataset).
    pub(super) fn carry_properties(
        &self,
        source: &DatasetName,
        flags: &zq_store::SendFlags,
    ) -> bool {
        if !self.config.properties.send {
            return false;
        }
        if flags.decrypt {
            let first = self
                .properties_withheld
                .lock()
                .is_ok_and(|mut w| w.insert(source.clone()));
            if first {
                tracing::warn!(dataset = %source, "not sending its properties: zfs sends an encrypted dataset's properties only with a raw send (--encrypted raw)");
            }
            return false;
        }
        true
    }

    /// Whether the receiver spools large steps so that they can resume.
    pub(super) fn spooling(&self) -> bool {
        self.session.resume.iter().any(|r| r == RESUME_SPOOL)
    }

    /// Whether both sides resume with zfs's own tokens (`receive -s`, `send -t`).
    pub(super) fn native_resume(&self) -> bool {
        self.session.version >= 7
            && self
                .session
                .resume
                .iter()
                .any(|r| r == zq_proto::RESUME_ZFS_TOKEN)
    }

    /// Asks the receiver to prune `target`'s `zq_` snapshots by `policy` (see
    /// [`crate::retention`]), or with `dry_run` only to say what would go; returns the
    /// names it destroyed (would destroy). Receivers before protocol version 4 know only
    /// a count: a grid or a dry run is [`ReplError::Unsupported`] there.
    pub async fn prune_remote(
        &self,
        target: &DatasetName,
        policy: &crate::retention::Policy,
        base_guid: u64,
        dry_run: bool,
    ) -> Result<zq_proto::Pruned, ReplError> {
        let keep_last = policy
            .keep_last
            .map(|k| u32::try_from(k).unwrap_or(u32::MAX));
        let request = if self.session.version >= 4 {
            Message::PruneBy(zq_proto::PruneBy {
                dataset: target.to_string(),
                keep_last,
                grid: policy.grid.as_ref().map(ToString::to_string),
                base_guid,
                dry_run,
            })
        } else {
            match (keep_last, &policy.grid, dry_run) {
                (Some(keep_last), None, false) => Message::Prune(zq_proto::PruneRequest {
                    dataset: target.to_string(),
                    keep_last,
                    base_guid,
                }),
                _ => {
                    return Err(ReplError::Unsupported(format!(
                        "the receiver speaks protocol version {}: retention by time grid and \
                         dry runs need version 4 (upgrade zq-recv)",
                        self.session.version
                    )))
                }
            }
        };
        let (send, recv) = self.conn.open_bi().await.map_err(ReplError::connection)?;
        let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
        send.send(&request).await?;
        send.finish()?;
        match recv.message("Pruned").await? {
            Message::Pruned(p) => Ok(p),
            Message::Error(e) => Err(ReplError::Remote(e)),
            other => Err(ReplError::Protocol(format!(
                "expected Pruned, receiver sent {}",
                other.name()
            ))),
        }
    }
}
