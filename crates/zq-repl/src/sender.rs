//! The sender engine: one connection, a handshake, one batched listing per job, then one
//! QUIC stream per step carrying `zfs send` output to the receiver.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tracing::{info, info_span, warn, Instrument};
use zq_net::{Dialed, FramedRecv, FramedSend};
use zq_proto::{
    Capabilities, Committed, Compression, Compressor, ListRequest, ListRoot, Message, ResumeAt,
    ResumeToken, Session, SnapRef, StepAbort, StepEncoder, StepHeader, StepStart, Stripes, Verdict,
    RESUME_SPOOL,
};
use zq_store::{DatasetName, Zfs};

use crate::error::ReplError;
use crate::lanes::Slot;
use crate::plan::{plan, PlanOptions, Step};
use crate::protect::Protector;
use crate::stripe::StripeSender;
use crate::{to_info, DatasetOutcome, DatasetReport};

/// A step that has sent this much is bulk: its stream drops to a lower priority, so that
/// the small incrementals of other datasets on the same connection go out ahead of what it
/// has buffered (up to the connection's send window, 64 MiB: half a second at 1 Gbit/s),
/// and it moves to the daemon's bulk lane ([`crate::lanes`]).
pub const BULK_BYTES: u64 = 1 << 20;

/// Where `zfs send -I` is slow, backlogs up to this many snapshots go as a chain of `-i`
/// steps. On zfs-fuse a `-i` step costs about one `-I` of a dataset with 10–15 snapshots
/// (~50 ms, mostly `zfs receive`, against ~4 ms per snapshot of the dataset for `-I`);
/// longer backlogs are rare (after an outage) and go as one `-I`.
pub const CHAIN_UP_TO: usize = 16;

/// How long the sender waits for the receiver's answer to its Hello (the receiver gives a
/// new connection as long to send one).
const WELCOME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Bytes of `zfs send` output per data frame.
const CHUNK: usize = 256 * 1024;

/// One replication job: a source dataset (tree) and where it goes.
#[derive(Debug, Clone)]
pub struct Job {
    /// Source dataset.
    pub source: DatasetName,
    /// Target dataset on the receiver.
    pub target: DatasetName,
    /// Also replicate every descendant, parents first.
    pub recursive: bool,
    /// Planning options (`-i` vs `-I`, `--force`).
    pub options: PlanOptions,
    /// Which of the datasets a recursive job replicates.
    pub filter: crate::filter::DatasetFilter,
    /// Which snapshots of each dataset are replicated. When it leaves any out, steps never
    /// use `zfs send -I` (which carries every snapshot in between) but chains of `-i`.
    pub snapshots: crate::filter::SnapshotFilter,
}

impl Job {
    /// The snapshots of a dataset (oldest first) this job replicates, in wire form.
    pub fn kept_snapshots(&self, snapshots: &[zq_store::Snapshot]) -> Vec<zq_proto::SnapshotInfo> {
        snapshots
            .iter()
            .filter(|s| self.snapshots.keeps(&s.name))
            .map(to_info)
            .collect()
    }

    /// The items of `all` (source datasets, by `name`) this job replicates: all of them
    /// without a filter; reads the filter's property with one `zfs get` if it has one.
    pub async fn select<T>(
        &self,
        zfs: &Zfs,
        all: Vec<T>,
        name: impl Fn(&T) -> &DatasetName,
    ) -> Result<Vec<T>, zq_store::StoreError> {
        if self.filter.is_empty() {
            return Ok(all);
        }
        let by_property = match &self.filter.exclude_property {
            Some(p) => self.filter.excluded_by_property(
                &zfs.property_values(&self.source, self.recursive, &p.name)
                    .await?,
            ),
            None => Default::default(),
        };
        Ok(all
            .into_iter()
            .filter(|t| self.filter.keeps(&self.source, name(t), &by_property))
            .collect())
    }
}

/// The receiver's answer to a listing.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Existing datasets under the requested root, parents first, with their snapshots.
    pub datasets: Vec<zq_proto::DatasetSnapshots>,
    /// Steps the receiver can resume under the root.
    pub resumable: Vec<ResumeToken>,
}

impl Listing {
    /// The resume token of `target`, if any.
    pub fn token(&self, target: &DatasetName) -> Option<&ResumeToken> {
        self.resumable.iter().find(|t| t.dataset == target.as_str())
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
        }
    }
}

impl SenderConfig {
    /// What this sender offers in its Hello: the current protocol (or only `version`),
    /// zstd only if it would use it.
    pub fn capabilities(&self, software: String, version: Option<u16>) -> Capabilities {
        let mut caps = Capabilities::current(software);
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
    conn: quinn::Connection,
    zfs: Zfs,
    session: Session,
    config: SenderConfig,
    /// More connections to the same receiver, over which bulk steps spread their chunks
    /// with this one ([`crate::stripe`]).
    stripes: Vec<quinn::Connection>,
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
    async fn open_stripes(&self, send: &mut FramedSend) -> Result<Option<StripeSender>, ReplError> {
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
    async fn hello(conn: &quinn::Connection, caps: &Capabilities) -> Result<Session, ReplError> {
        tokio::time::timeout(WELCOME_TIMEOUT, Self::exchange_hello(conn, caps))
            .await
            .unwrap_or_else(|_| {
                Err(ReplError::Connection(format!(
                    "the receiver sent no Welcome within {WELCOME_TIMEOUT:?}"
                )))
            })
    }

    async fn exchange_hello(
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

    /// Replicates `job`: lists both sides once, plans each dataset, runs the steps
    /// (parents before children). One dataset's failure does not stop its siblings, but a
    /// dataset whose parent failed is skipped.
    pub async fn replicate(&self, job: &Job) -> Result<Vec<DatasetReport>, ReplError> {
        // Both listings at once: one local zfs call and one round trip.
        let (sources, dest) = tokio::join!(
            self.zfs.list(&job.source, job.recursive),
            self.list_remote(&job.target, job.recursive)
        );
        let sources = sources?;
        if sources.is_empty() {
            return Err(ReplError::SourceMissing(job.source.to_string()));
        }
        let sources = job.select(&self.zfs, sources, |s| &s.name).await?;
        if sources.is_empty() {
            return Err(ReplError::AllExcluded(job.source.to_string()));
        }
        let listing = dest?;
        let dest: HashMap<&str, &[zq_proto::SnapshotInfo]> = listing
            .datasets
            .iter()
            .map(|d| (d.name.as_str(), d.snapshots.as_slice()))
            .collect();
        let mut reports: Vec<DatasetReport> = Vec::new();
        for src in &sources {
            let target = src.name.rebase(&job.source, &job.target)?;
            let parent_failed = reports.iter().any(|r| {
                matches!(r.outcome, DatasetOutcome::Failed(_)) && src.name.is_within(&r.source)
            });
            let outcome = if parent_failed {
                DatasetOutcome::Failed(ReplError::Skipped("its parent failed".into()))
            } else {
                let dest_snaps = dest.get(target.as_str()).copied();
                let span = info_span!("dataset", source = %src.name, target = %target);
                let snapshots = job.kept_snapshots(&src.snapshots);
                self.replicate_dataset(
                    &src.name,
                    &snapshots,
                    &target,
                    dest_snaps,
                    listing.token(&target),
                    job.options,
                    &mut Slot::unlimited(),
                )
                .instrument(span)
                .await
            };
            reports.push(DatasetReport {
                source: src.name.clone(),
                target,
                outcome,
            });
        }
        Ok(reports)
    }

    /// Brings one dataset up to date given what the destination holds: its snapshot list,
    /// `None` if it does not exist, or in steady state just the cursor (the snapshot the
    /// receiver last committed). The receiver re-checks the base, so a stale cursor gives
    /// a `Diverged`/`BaseMissing` error and the caller lists again. With `resume` (the
    /// receiver's token for the target, from its listing), the interrupted step continues
    /// first if it is still the way forward: its base is the destination's newest snapshot
    /// and its `to` still exists here. Otherwise the plan's first step replaces it.
    #[allow(clippy::too_many_arguments)]
    pub async fn replicate_dataset(
        &self,
        src: &DatasetName,
        source: &[zq_proto::SnapshotInfo],
        target: &DatasetName,
        dest: Option<&[zq_proto::SnapshotInfo]>,
        resume_token: Option<&ResumeToken>,
        options: PlanOptions,
        slot: &mut Slot,
    ) -> DatasetOutcome {
        let options = PlanOptions {
            chain_up_to: self.chain_up_to(),
            ..options
        };
        let (mut steps, mut bytes, mut resumed, mut last) = (0, 0, 0, None);
        let resumed_dest;
        let mut dest = dest;
        let resume = resume_token.and_then(|t| Some((t, resumable_step(t, source, dest)?)));
        if let Some(p) = &self.config.protector {
            self.tidy(p, src, source, dest, resume.as_ref().map(|(_, s)| s))
                .await;
        }
        if let Some((token, step)) = resume {
            match self
                .run_step(
                    src,
                    target,
                    &step,
                    zq_proto::ForceAction::None,
                    slot,
                    Some(token),
                )
                .await
            {
                Ok(done) => {
                    steps += 1;
                    bytes += done.bytes;
                    resumed += done.resumed;
                    resumed_dest = done.committed.snapshots.clone();
                    dest = Some(&resumed_dest);
                    last = Some(done.committed);
                }
                Err(e) => {
                    warn!(error = %e, "resumed step failed");
                    return DatasetOutcome::Failed(e);
                }
            }
        } else if let Some(t) = resume_token {
            info!(to = %t.to.name, offset = t.offset, "the receiver's spooled step is no longer the way forward; it will be replaced");
        }
        let plan = match plan(source, dest, options) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "refusing to replicate");
                return DatasetOutcome::Failed(e.into());
            }
        };
        if let Some(note) = &plan.note {
            info!("{note}");
        }
        if plan.steps.is_empty() && last.is_none() {
            info!("up to date");
            return DatasetOutcome::UpToDate;
        }
        let mut force = plan.force.clone();
        for step in &plan.steps {
            match self.run_step(src, target, step, force, slot, None).await {
                Ok(done) => {
                    steps += 1;
                    bytes += done.bytes;
                    last = Some(done.committed);
                }
                Err(e) => {
                    warn!(error = %e, "step failed");
                    return DatasetOutcome::Failed(e);
                }
            }
            // Destruction, if any, was done before the first step.
            force = zq_proto::ForceAction::None;
        }
        // Exit 0 means the destination holds every snapshot it was asked to: check the
        // receiver's own listing after the last step rather than trusting the plan.
        let held = last.map(|c| c.snapshots).unwrap_or_default();
        let missing: Vec<String> = plan
            .expected(source)
            .into_iter()
            .filter(|s| !held.iter().any(|h| h.guid == s.guid))
            .map(|s| format!("@{}", s.name))
            .collect();
        if !missing.is_empty() {
            return DatasetOutcome::Failed(ReplError::Protocol(format!(
                "every step was committed, but the destination lacks {}",
                missing.join(", ")
            )));
        }
        let newest = held
            .iter()
            .rev()
            .find(|h| source.iter().any(|s| s.guid == h.guid))
            .map(|s| s.name.clone())
            .unwrap_or_default();
        DatasetOutcome::Sent {
            steps,
            bytes,
            resumed,
            newest,
            committed: held.len(),
        }
    }

    /// Releases the job's holds on `src` that are no longer needed ([`Protector::tidy`]):
    /// the cursor stays on the destination's newest snapshot, step holds on a step still
    /// to be resumed. A failure is logged; the next planned step tries again.
    async fn tidy(
        &self,
        p: &Protector,
        src: &DatasetName,
        source: &[zq_proto::SnapshotInfo],
        dest: Option<&[zq_proto::SnapshotInfo]>,
        resuming: Option<&Step>,
    ) {
        let snap = |name: &str| src.snapshot(name).ok();
        let cursor = dest
            .and_then(|d| d.last())
            .and_then(|n| source.iter().find(|s| s.guid == n.guid))
            .and_then(|s| snap(&s.name));
        let keep: Vec<_> = match resuming {
            Some(Step::Incremental { from, to, .. }) => [snap(&from.name), snap(&to.name)]
                .into_iter()
                .flatten()
                .collect(),
            Some(Step::Full { to }) => snap(&to.name).into_iter().collect(),
            None => Vec::new(),
        };
        let snapshots: Vec<_> = source.iter().filter_map(|s| snap(&s.name)).collect();
        if let Err(e) = p.tidy(src, &snapshots, cursor.as_ref(), &keep).await {
            warn!(error = %e, "cannot release holds no longer needed");
        }
    }

    /// Lists `target` (and descendants) on the receiver in one request, with the steps it
    /// can resume there (if the session agreed on spooling).
    pub async fn list_remote(
        &self,
        target: &DatasetName,
        recursive: bool,
    ) -> Result<Listing, ReplError> {
        let (send, recv) = self.conn.open_bi().await.map_err(ReplError::connection)?;
        let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
        send.send(&Message::ListRequest(ListRequest {
            roots: vec![ListRoot {
                dataset: target.to_string(),
                recursive,
            }],
        }))
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
        Ok(Listing {
            datasets,
            resumable,
        })
    }

    /// Whether the receiver spools large steps so that they can resume.
    fn spooling(&self) -> bool {
        self.session.resume.iter().any(|r| r == RESUME_SPOOL)
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

    /// How many new snapshots to send as a chain of `-i` steps rather than one `-I` step
    /// (see [`PlanOptions::chain_up_to`]).
    fn chain_up_to(&self) -> usize {
        if !self.config.intermediates {
            usize::MAX
        } else if self.zfs.capabilities().cheap_intermediates {
            0
        } else {
            CHAIN_UP_TO
        }
    }

    /// Sends the snapshots the daemon just created (`new`, oldest first, GUIDs unknown) on
    /// top of `from`, the snapshot the receiver last committed, without listing either side:
    /// `-i` for one snapshot, and for several one `-I` step or, where `-I` is slow, a chain
    /// of `-i` steps (unless `newest_only`). Returns the receiver's last commit, whose `guid`
    /// is the newest snapshot's, and the bytes sent. A chain that fails part-way has
    /// committed its first steps; the receiver's refusal of the stale cursor then says so.
    /// Needs protocol version 2 (the receiver resolves the GUID); check [`Self::session`].
    pub async fn send_new(
        &self,
        source: &DatasetName,
        target: &DatasetName,
        from: &zq_proto::SnapshotInfo,
        new: &[String],
        newest_only: bool,
        slot: &mut Slot,
    ) -> Result<(Committed, u64), ReplError> {
        let Some(newest) = new.last() else {
            return Err(ReplError::Protocol("nothing new to send".into()));
        };
        if self.session.version < 2 {
            return Err(ReplError::Protocol(format!(
                "the receiver speaks protocol version {}; sending a snapshot by name needs 2",
                self.session.version
            )));
        }
        let by_name = |name: &String| zq_proto::SnapshotInfo {
            name: name.clone(),
            guid: 0,
            createtxg: 0,
        };
        if new.len() == 1 || newest_only || new.len() > self.chain_up_to() {
            let step = Step::Incremental {
                from: from.clone(),
                to: by_name(newest),
                intermediates: new.len() > 1 && !newest_only,
            };
            return self
                .run_step(
                    source,
                    target,
                    &step,
                    zq_proto::ForceAction::None,
                    slot,
                    None,
                )
                .await
                .map(|d| (d.committed, d.bytes));
        }
        let (mut from, mut bytes, mut last) = (from.clone(), 0, None);
        for name in new {
            let step = Step::Incremental {
                from,
                to: by_name(name),
                intermediates: false,
            };
            let StepDone {
                committed,
                bytes: n,
                ..
            } = self
                .run_step(
                    source,
                    target,
                    &step,
                    zq_proto::ForceAction::None,
                    slot,
                    None,
                )
                .await?;
            from = zq_proto::SnapshotInfo {
                guid: committed.guid,
                ..by_name(name)
            };
            bytes += n;
            last = Some(committed);
        }
        let last = last.ok_or_else(|| ReplError::Protocol("nothing new to send".into()))?;
        Ok((last, bytes))
    }

    /// Runs one step on its own stream; returns the receiver's commit and the bytes sent.
    /// A `to` GUID of 0 is left to the receiver (protocol version 2). With `resume`, the
    /// step continues the receiver's spooled one: `zfs send` runs again, its first
    /// `offset` bytes are hashed instead of sent, and if they match the token the rest
    /// follows a `StepStart` that says so; if they do not, the step starts afresh.
    async fn run_step(
        &self,
        source: &DatasetName,
        target: &DatasetName,
        step: &Step,
        force: zq_proto::ForceAction,
        slot: &mut Slot,
        resume: Option<&ResumeToken>,
    ) -> Result<StepDone, ReplError> {
        let started = Instant::now();
        let (from, to, intermediates) = match step {
            Step::Full { to } => (None, to, false),
            Step::Incremental {
                from,
                to,
                intermediates,
            } => (Some(from), to, *intermediates),
        };
        let mode = if self.session.zstd() {
            self.config.compression
        } else {
            Compression::None
        };
        let mut compressor = Compressor::new(mode);
        let mut wire_bytes = 0u64;
        let header = StepHeader {
            source: source.to_string(),
            target: target.to_string(),
            from: from.map(|f| SnapRef {
                name: f.name.clone(),
                guid: f.guid,
            }),
            to: SnapRef {
                name: to.name.clone(),
                guid: to.guid,
            },
            intermediates,
            force,
            compression: if compressor.is_active() {
                zq_proto::COMPRESSION_ZSTD.into()
            } else {
                zq_proto::COMPRESSION_NONE.into()
            },
        };
        let to_snap = source.snapshot(&to.name)?;
        let from_snap = from.map(|f| source.snapshot(&f.name)).transpose()?;

        let mut encoder = StepEncoder::with_digest(self.session.stream_digest());
        let mut created = None;
        // Hold moves wait for a moment without steps (crate::holds).
        let _running = self.config.protector.as_ref().map(|p| p.step());
        // A resumable (bulk) step's snapshots are held while it runs, from the moment it
        // becomes one (crate::protect).
        let hold_step = || {
            if let Some(p) = self
                .config
                .protector
                .as_ref()
                .filter(|p| p.holds_steps(from.is_some()))
            {
                p.step_started(from_snap.as_ref(), &to_snap);
            }
        };
        // Never a plaintext stream of an encrypted dataset (known from the listing).
        self.zfs.check_plaintext(source).await?;
        let mut zsend = self.zfs.send(from_snap.as_ref(), &to_snap, intermediates);
        let watched = self
            .config
            .progress
            .as_ref()
            .map(|p| (p.clone(), p.start(to_snap.to_string())));
        // Once a step is bulk, zfs's estimate of its size gives a share done and a time
        // left: a `zfs send -nvP` beside it, never for the small steps of every second.
        let estimate = |watched: &Option<(std::sync::Arc<crate::progress::Progress>, u64)>| {
            if let Some((p, id)) = watched.clone() {
                let (zfs, from, to) = (self.zfs.clone(), from_snap.clone(), to_snap.clone());
                let cap = self.config.estimates.clone();
                tokio::spawn(async move {
                    let Ok(_permit) = cap.acquire_owned().await else {
                        return;
                    };
                    if let Ok(Some(bytes)) =
                        zfs.send_estimate(from.as_ref(), &to, intermediates).await
                    {
                        p.estimate(id, bytes);
                    }
                });
            }
        };
        let _watched = ProgressGuard(watched.clone());
        let mut buf = BytesMut::with_capacity(CHUNK);
        let mut resume_at = None;
        if let Some(token) = resume.filter(|_| self.spooling()) {
            match regenerate(&mut zsend, &mut buf, &mut encoder, token.offset).await {
                Ok(()) if encoder.prefix_hash() == token.prefix_hash => {
                    info!(
                        snapshot = %to.name,
                        offset = token.offset,
                        "resuming the step where the receiver's spool ends"
                    );
                    resume_at = Some(ResumeAt {
                        offset: token.offset,
                        prefix_hash: token.prefix_hash,
                    });
                }
                outcome => {
                    let why = match outcome {
                        Ok(()) => {
                            "the regenerated stream does not match the receiver's spool".into()
                        }
                        Err(e) => e.to_string(),
                    };
                    warn!(snapshot = %to.name, offset = token.offset, reason = %why, "cannot resume; sending the step afresh");
                    // Dropping it kills the first zfs send.
                    encoder = StepEncoder::with_digest(self.session.stream_digest());
                    buf.clear();
                    zsend = self.zfs.send(from_snap.as_ref(), &to_snap, intermediates);
                }
            }
        }
        let resumed = encoder.total();
        let first = if self.session.version >= 3 {
            let (last_tag, hold_last) = match &self.config.protector {
                Some(p) => (p.tags.last(), p.modes.of(from.is_some()).cursor()),
                None => (String::new(), false),
            };
            Message::StepStart(StepStart {
                header,
                last_tag,
                hold_last,
                resume: resume_at,
            })
        } else {
            Message::StepHeader(header)
        };

        // zfs send starts first and the header goes out at once, so that the receiver
        // starts zfs receive and checks its target while our zfs send starts up.
        let (send, recv) = self.conn.open_bi().await.map_err(ReplError::connection)?;
        let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
        send.send(&first).await?;
        if resumed >= BULK_BYTES {
            hold_step();
            send.set_priority(-1);
            slot.to_bulk().await;
        }

        // Once bulk, the chunks may go over several connections (crate::stripe).
        let mut striped: Option<StripeSender> = None;
        let mut stripes_tried = false;
        // A verdict that came while the chunks went over stripe streams (or_verdict).
        let mut early_verdict = None;
        // A write error means the receiver stopped reading (it refused the step or failed);
        // its verdict, read below, says why.
        let send_result = async {
            let mut zsend = zsend?;
            loop {
                // The BEGIN record goes alone and at once: the receiver hands it to
                // `zfs receive` without waiting for more (zq_proto::transfer), so both
                // ends work at the same time, as in a local `zfs send | zfs receive`.
                let want = if encoder.total() == 0 {
                    zq_proto::BEGIN_CHUNK
                } else {
                    CHUNK
                };
                if !zsend.fill(&mut buf, want).await? {
                    break;
                }
                let chunk = buf.split().freeze();
                if encoder.total() == 0 {
                    created = Some(check_own_stream(&chunk, step)?);
                }
                let before = encoder.total();
                let hash = encoder.chunk(&chunk);
                #[cfg(debug_assertions)]
                let chunk = crate::fault::corrupt_once(chunk, before);
                if before < BULK_BYTES && encoder.total() >= BULK_BYTES {
                    hold_step();
                    estimate(&watched);
                    send.set_priority(-1);
                    // Frees this step's slot for small steps (crate::lanes).
                    slot.to_bulk().await;
                }
                if let Some((p, id)) = &watched {
                    p.add(*id, chunk.len() as u64);
                }
                if compressor.is_active() {
                    compressor.set_link_rate(link_rate(&self.conn, self.config.bwlimit.as_ref()));
                }
                let payload = compress_chunk(&mut compressor, chunk).await?;
                wire_bytes += payload.wire_len() as u64;
                if let Some(limit) = &self.config.bwlimit {
                    limit.take(payload.wire_len()).await;
                }
                if !stripes_tried && encoder.total() >= BULK_BYTES {
                    stripes_tried = true;
                    striped = self.open_stripes(&mut send).await?;
                }
                let sent = match striped.as_mut() {
                    Some(s) => {
                        let sent = or_verdict(s.send(hash, payload), &mut recv, &mut early_verdict);
                        tokio::time::timeout(self.config.stall_timeout, sent).await
                    }
                    None => {
                        tokio::time::timeout(self.config.stall_timeout, async {
                            Ok(send.send_payload(&hash, payload).await?)
                        })
                        .await
                    }
                };
                match sent {
                    Ok(sent) => sent?,
                    Err(_) => return Err(ReplError::Stalled(self.config.stall_timeout)),
                }
            }
            zsend.wait().await?;
            if let Some(s) = striped.take() {
                let finished = or_verdict(s.finish(), &mut recv, &mut early_verdict);
                match tokio::time::timeout(self.config.stall_timeout, finished).await {
                    Ok(done) => done?,
                    Err(_) => return Err(ReplError::Stalled(self.config.stall_timeout)),
                }
            }
            Ok::<(), ReplError>(())
        }
        .await;
        if let Some(s) = striped.take() {
            // The step failed while its chunks were striped: reset every stripe stream.
            s.abort().await;
        }
        if let Err(stalled @ ReplError::Stalled(_)) = send_result {
            // Nothing more will get through, a verdict neither: drop the stream.
            send.reset();
            recv.stop();
            return Err(stalled);
        }
        match &send_result {
            Ok(()) => {
                let _ = send.send(&Message::StepEnd(encoder.end())).await;
            }
            Err(e) => {
                let _ = send
                    .send(&Message::StepAbort(StepAbort {
                        reason: e.to_string(),
                    }))
                    .await;
            }
        }
        let _ = send.finish();
        let verdict = match early_verdict {
            Some(v) => v,
            None => recv.message("Verdict").await,
        };
        match (verdict, send_result) {
            (Ok(Message::Verdict(Verdict::Committed(c))), Ok(())) => {
                // The GUID we expect: the plan's, else the one our own stream created.
                let expected = match (to.guid, created.flatten()) {
                    (0, Some(g)) => g,
                    (g, _) => g,
                };
                if expected != 0 && c.guid != expected {
                    return Err(ReplError::Protocol(format!(
                        "receiver committed GUID {} but the step sent @{} with GUID {expected}",
                        c.guid, to.name
                    )));
                }
                if let Some(p) = &self.config.protector {
                    p.step_committed(from_snap.as_ref(), &to_snap);
                }
                let bytes = encoder.total() - resumed;
                if resumed > 0 {
                    info!(
                        snapshot = %to.name,
                        bytes,
                        resumed_bytes = resumed,
                        ms = started.elapsed().as_millis() as u64,
                        "step committed (resumed: {} bytes not sent again)", resumed
                    );
                } else if compressor.is_active() {
                    info!(
                        snapshot = %to.name,
                        bytes,
                        wire_bytes,
                        ms = started.elapsed().as_millis() as u64,
                        "step committed"
                    );
                } else {
                    info!(
                        snapshot = %to.name,
                        bytes,
                        ms = started.elapsed().as_millis() as u64,
                        "step committed"
                    );
                }
                Ok(StepDone {
                    committed: c,
                    bytes,
                    resumed,
                })
            }
            (Ok(Message::Verdict(Verdict::Failed(e))), _) => Err(ReplError::Remote(e)),
            (Ok(Message::Verdict(Verdict::Committed(_))), Err(e)) => Err(e),
            (Ok(other), _) => Err(ReplError::Protocol(format!(
                "expected Verdict, receiver sent {}",
                other.name()
            ))),
            // No verdict: the local failure, if any, is the better explanation.
            (Err(_), Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(e.into()),
        }
    }
}

/// Runs `work` (writing a striped step's chunks) unless the receiver's verdict comes first,
/// which it does only when it refused the step: nothing is written on the step's own stream
/// meanwhile, so a refusal would not surface as a write error. The verdict is kept in
/// `early` for the caller to report.
async fn or_verdict(
    work: impl std::future::Future<Output = Result<(), ReplError>>,
    recv: &mut FramedRecv,
    early: &mut Option<Result<Message, zq_net::StreamError>>,
) -> Result<(), ReplError> {
    tokio::select! {
        r = work => r,
        v = recv.message("Verdict") => {
            *early = Some(v);
            Err(ReplError::Protocol("the receiver answered before the end of the step".into()))
        }
    }
}

/// What `conn` can carry now, bytes per second: its congestion window per round trip
/// (what the controller lets out), or `limit` if lower. For `--compress auto`
/// ([`Compressor::set_link_rate`]).
pub fn link_rate(conn: &quinn::Connection, limit: Option<&zq_net::RateLimit>) -> f64 {
    let cwnd = conn.stats().path.cwnd as f64;
    let rtt = conn.rtt().as_secs_f64().max(1e-5);
    let rate = cwnd / rtt;
    match limit {
        Some(limit) => rate.min(limit.bytes_per_sec()),
        None => rate,
    }
}

/// `chunk` as it goes on the wire. zstd takes ~1 ms per 256 KiB chunk at level 1 and far
/// longer at high levels, so it runs on tokio's blocking pool rather than on the runtime
/// thread that also drives the connection and every other step (one thread on small
/// hosts, see `zq::runtime_threads`); chunks it will not try go straight through.
pub async fn compress_chunk(
    compressor: &mut Compressor,
    chunk: bytes::Bytes,
) -> Result<zq_proto::Payload, ReplError> {
    if !compressor.will_try(chunk.len()) {
        return Ok(compressor.compress(chunk));
    }
    let mut c = std::mem::replace(compressor, Compressor::new(Compression::None));
    let (c, payload) = tokio::task::spawn_blocking(move || {
        let (len, started) = (chunk.len(), std::time::Instant::now());
        let p = c.compress(chunk);
        c.record_speed(len, started.elapsed().as_secs_f64());
        (c, p)
    })
    .await
    .map_err(|e| ReplError::Protocol(format!("the compression task failed: {e}")))?;
    *compressor = c;
    Ok(payload)
}

/// Ends a step's progress report however the step ends.
struct ProgressGuard(Option<(std::sync::Arc<crate::progress::Progress>, u64)>);

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        if let Some((p, id)) = &self.0 {
            p.end(*id);
        }
    }
}

/// What a committed step did.
#[derive(Debug)]
struct StepDone {
    committed: Committed,
    /// Stream bytes sent on this connection.
    bytes: u64,
    /// Stream bytes the receiver already had (a resumed step).
    resumed: u64,
}

/// Reads the first `offset` bytes of a resumed step's regenerated stream into `encoder`
/// (hashed, not sent); `buf` keeps what was read past them.
async fn regenerate(
    zsend: &mut Result<zq_store::Reader, zq_store::StoreError>,
    buf: &mut BytesMut,
    encoder: &mut StepEncoder,
    offset: u64,
) -> Result<(), ReplError> {
    let zsend = match zsend {
        Ok(z) => z,
        Err(e) => return Err(ReplError::Protocol(format!("zfs send: {e}"))),
    };
    while encoder.total() < offset {
        let want = usize::try_from(offset - encoder.total())
            .unwrap_or(usize::MAX)
            .min(CHUNK);
        if !zsend.fill(buf, want).await? {
            return Err(ReplError::Protocol(format!(
                "zfs send produced {} bytes, fewer than the receiver's spool holds ({offset})",
                encoder.total()
            )));
        }
        let take = want.min(buf.len());
        let piece = buf.split_to(take);
        encoder.prefix(&piece);
    }
    Ok(())
}

/// The step a resume token continues, if it is still the way forward: its `to` exists in
/// `source` (same GUID when the token knows it), and its base is the destination's newest
/// snapshot (or, for a full stream, the destination has no snapshot).
fn resumable_step(
    t: &ResumeToken,
    source: &[zq_proto::SnapshotInfo],
    dest: Option<&[zq_proto::SnapshotInfo]>,
) -> Option<Step> {
    let to_pos = source
        .iter()
        .position(|s| s.name == t.to.name && (t.to.guid == 0 || s.guid == t.to.guid))?;
    let to = source[to_pos].clone();
    match t.from_guid {
        // The target of an interrupted full stream may still be listed, without
        // snapshots, while the receiver notices the interruption.
        None => dest
            .is_none_or(|d| d.is_empty())
            .then_some(Step::Full { to }),
        Some(g) => {
            let from_pos = source.iter().position(|s| s.guid == g)?;
            let newest = dest?.last()?;
            (from_pos < to_pos && newest.guid == g).then(|| Step::Incremental {
                from: source[from_pos].clone(),
                to,
                intermediates: t.intermediates,
            })
        }
    }
}

/// Checks the BEGIN record of our own `zfs send` output against the step; returns the GUID
/// of the snapshot it creates (`None` for a compound `-I` stream, which does not say).
fn check_own_stream(first: &[u8], step: &Step) -> Result<Option<u64>, ReplError> {
    let begin = zq_store::parse_begin(first)
        .map_err(|e| ReplError::Protocol(format!("our zfs send output: {e}")))?;
    if begin.compound {
        return Ok(None);
    }
    let (from, to) = match step {
        Step::Full { to } => (None, to),
        Step::Incremental { from, to, .. } => (Some(from.guid), to),
    };
    if begin.from_guid != from || (to.guid != 0 && begin.to_guid != to.guid) {
        return Err(ReplError::Protocol(format!(
            "zfs send of @{} produced a stream from GUID {:?} to {}, not the planned {:?} to {}",
            to.name, begin.from_guid, begin.to_guid, from, to.guid
        )));
    }
    Ok(Some(begin.to_guid))
}
