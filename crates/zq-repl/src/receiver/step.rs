//! One replication step on the receiver: check the target against the header, verify the
//! stream, feed `zfs receive` only verified bytes, and report what the target now holds.
//!
//! The latency of a small incremental is the point of zq, so a plain step (no `--force`)
//! makes no `zfs` call besides `zfs receive` in steady state, and at most one listing that
//! overlaps everything else: `zfs receive` is started, the target is listed (unless this
//! receiver's record of it says the base is its newest snapshot, see [`Known`]) and the
//! first bytes are read at the same time. `zfs receive` acts on nothing before it reads the
//! stream's BEGIN record, and it is given none until the base is confirmed and the BEGIN
//! record has been checked against the header; if either fails it is killed unfed. For a
//! step without intermediates the BEGIN record names the snapshot being created, so no
//! listing is needed afterwards either.
//!
//! What the record cannot see, `zfs receive` checks itself: it refuses a target that lacks
//! the base or whose data changed since it (then the target is listed and the step fails
//! with its real state, e.g. diverged). One thing neither sees: measured on zfs-fuse, `zfs
//! receive` with or without `-F` accepts an incremental from `@a` onto a replica whose
//! newest snapshot is a later `@local` of unchanged data, leaving `@a @local @b`; OpenZFS
//! without `-F` checks only that the data is unmodified since the base, too. Such a
//! snapshot taken on the replica (e.g. by zfs-auto-snapshot on the backup host) holds no
//! change: a listing that finds it newest (the first step, after a failure, or once the
//! record is [`Known::TRUST`] old) reports a divergence; otherwise it stays in the chain.

use bytes::Bytes;
use tracing::{debug, info, warn};
use zq_proto::{
    Committed, ErrorKind, ForceAction, ResumeAt, SnapRef, SnapshotInfo, StepDecoder, StepEvent,
    StepHeader, StepProperties, TransferError, Verdict, WireError,
};
use zq_store::{DatasetName, SnapshotName, StreamBegin, Writer};

use super::spool::{Replay, SpoolWriter};
use super::{
    authorize, internal, zfs_err, Agreed, Asks, Known, LastHold, Partial, Receiver, TARGET_WAIT,
};
use crate::progress::human_bytes;
use crate::props::ReceiveProperties;
use crate::report::to_info;
use crate::stripe::StepFrames;

/// How long an aborted full receive may take zfs to discard its partial dataset.
const DISCARD_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What `prepare` found and did: whether `zfs receive` needs `-F`, and the target's
/// snapshots once its destruction (if any) is done.
struct Prepared {
    force: bool,
    snapshots: Vec<SnapshotInfo>,
}

impl Receiver {
    /// Runs one step; `resume` says where a resumed step's data continue, `asks` which
    /// hold to move to the received snapshot and the step's properties.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn step(
        &self,
        root: &DatasetName,
        h: StepHeader,
        resume: Option<ResumeAt>,
        asks: Asks,
        partial: Partial,
        agreed: Agreed,
        recv: &mut StepFrames<'_>,
    ) -> Verdict {
        let result = self
            .step_inner(root, &h, resume, asks, partial, agreed, recv)
            .await;
        // Labelled by target only inside the sender's root: a sender cannot make the
        // metrics grow with names it is refused.
        let label =
            authorize(root, &h.target).map_or_else(|_| "(refused)".into(), |t| t.to_string());
        self.metrics.count(&label, |c| match &result {
            Ok(_) => c.steps += 1,
            Err(_) => c.failures += 1,
        });
        match result {
            Ok(c) => {
                info!(guid = c.guid, "committed");
                Verdict::Committed(c)
            }
            Err(e) if is_out_of_space(&e) => Verdict::Failed(self.explain_no_space(&h, e).await),
            Err(e) => Verdict::Failed(e),
        }
    }

    /// A full destination: say which dataset and how much space it has, so the operator
    /// knows what to free (zfs says only "out of space"). The sender retries the step later.
    async fn explain_no_space(&self, h: &StepHeader, e: WireError) -> WireError {
        let mut at = DatasetName::parse(&h.target).ok();
        while let Some(ds) = at {
            // The target itself may not exist yet (a full stream): ask its parent.
            if let Ok(bytes) = self.zfs.available(&ds).await {
                let msg = format!(
                    "{} cannot be received: the destination is out of space ({} available \
                     to {ds}); free space there or raise its quota, then retry (a daemon retries by itself). \
                     zfs said: {}",
                    h.target,
                    human_bytes(bytes),
                    e.message
                );
                return WireError {
                    message: WireError::new(e.kind, msg).message,
                    ..e
                };
            }
            at = ds.parent();
        }
        e
    }

    #[allow(clippy::too_many_arguments)]
    async fn step_inner(
        &self,
        root: &DatasetName,
        h: &StepHeader,
        resume: Option<ResumeAt>,
        asks: Asks,
        partial: Partial,
        agreed: Agreed,
        recv: &mut StepFrames<'_>,
    ) -> Result<Committed, WireError> {
        let Asks { last, properties } = asks;
        let target = authorize(root, &h.target)?;
        let props = self.receive_properties(&target, &properties, h.intermediates)?;
        let name_err =
            |e: zq_store::NameError| WireError::new(ErrorKind::InvalidName, e.to_string());
        let to = target.snapshot(&h.to.name).map_err(name_err)?;
        if let Some(f) = &h.from {
            target.snapshot(&f.name).map_err(name_err)?;
        }
        if h.compression != zq_proto::COMPRESSION_NONE
            && !(h.compression == zq_proto::COMPRESSION_ZSTD && agreed.zstd)
        {
            return Err(WireError::new(
                ErrorKind::Protocol,
                format!("compression {:?} was not negotiated", h.compression),
            ));
        }
        let lock = self.target_lock(&target)?;
        let mut busy = tokio::time::timeout(TARGET_WAIT, lock.lock_owned())
            .await
            .map_err(|_| {
                WireError::new(
                    ErrorKind::Internal,
                    format!(
                        "a receive into {target} is still in progress (another step has held \
                         it for {TARGET_WAIT:?}); try again once it ends"
                    ),
                )
            })?;
        // zfs keeps what an interrupted `zfs receive -s` got: no spool then.
        let native = agreed.native && self.resumable_into(&target).await;
        if matches!(partial, Partial::Resume(_)) {
            self.metrics.count(&h.target, |c| c.resumes += 1);
        }
        // Under the target's lock: the spool is the target's, too.
        let (mut spool, replay) = match resume {
            None if native => (None, None),
            None => (self.spools.writer(h, &target), None),
            Some(at) => {
                let (replay, writer) = self.spools.resume(h, at, &target).await?;
                self.metrics.count(&h.target, |c| c.resumes += 1);
                (Some(writer), Some(replay))
            }
        };
        let held_before = busy.as_ref().map(|k| k.held_last);
        let running = self.holds.step();
        let result = self
            .receive(
                root,
                &target,
                &to,
                h,
                &last.tag,
                (&partial, native, agreed.version >= 7),
                (&props, properties.carried),
                &mut busy,
                &mut spool,
                replay,
                agreed.digest,
                recv,
            )
            .await;
        drop(running);
        if result.is_ok() {
            if let Ok(mut a) = self.abandoned.lock() {
                a.remove(&target);
            }
        }
        if let Some(w) = spool {
            match &result {
                Ok(_) => {
                    drop(w);
                    self.spools.discard(&target);
                }
                Err(_) => self.spools.keep(w),
            }
        }
        if result.is_ok() && !last.tag.is_empty() {
            if let Some(k) = busy.as_mut() {
                k.held_last = last.hold;
            }
            // With the next batch of moves, in a moment without steps (crate::holds).
            let (zfs, holds) = (self.zfs.clone(), self.holds.clone());
            let from = h.from.as_ref().and_then(|f| target.snapshot(&f.name).ok());
            // The first step into the target in this process looks at its snapshots for
            // stale tags (a crash between a commit and its move leaves one behind).
            let first = self
                .scanned
                .lock()
                .is_ok_and(|mut s| s.insert(target.clone()));
            let scan: Vec<SnapshotName> = match (&result, first) {
                (Ok(c), true) => c
                    .snapshots
                    .iter()
                    .filter_map(|s| target.snapshot(&s.name).ok())
                    .collect(),
                _ => Vec::new(),
            };
            // Queued now (a flush at shutdown waits for it), carried out with the next batch.
            let moved = move_last_hold(&holds, &last, from.as_ref(), &to, held_before);
            tokio::spawn(async move {
                if let Some(moved) = moved {
                    if let Err(e) = moved.await {
                        warn!(snapshot = %to, error = %e, "cannot move the last-received hold");
                        return;
                    }
                }
                release_stale_last_holds(&zfs, &holds, &last.tag, from.as_ref(), &to, &scan).await
            });
        }
        result
    }

    /// The step once its target is locked: see the module docs.
    #[allow(clippy::too_many_arguments)]
    async fn receive(
        &self,
        root: &DatasetName,
        target: &DatasetName,
        to: &SnapshotName,
        h: &StepHeader,
        last_tag: &str,
        (partial, native, version_7): (&Partial, bool, bool),
        (props, carried): (&ReceiveProperties, bool),
        busy: &mut tokio::sync::OwnedMutexGuard<Option<Known>>,
        spool: &mut Option<SpoolWriter>,
        mut replay: Option<Replay>,
        digest: zq_proto::StreamDigest,
        recv: &mut StepFrames<'_>,
    ) -> Result<Committed, WireError> {
        let started = std::time::Instant::now();
        let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
        // A full stream creates (and mounts) a dataset: one at a time where that is unsafe.
        let _mounting = match h.from {
            None if !self.zfs.capabilities().concurrent_mounts => Some(self.mounts.lock().await),
            _ => None,
        };

        // Taken, not read: if this step fails, the target is listed next time.
        let trusted = busy.take().filter(|k| {
            h.force == ForceAction::None
                && *partial == Partial::Keep
                && h.from.as_ref().is_some_and(|f| k.base_is_newest(f.guid))
        });
        let options = |force: bool, p: &ReceiveProperties| zq_store::ReceiveOptions {
            force,
            resumable: native,
            set: p.set.clone(),
            exclude: p.exclude.clone(),
        };
        // The header's compression was checked against the session's in step_inner.
        let decoder = if h.compression == zq_proto::COMPRESSION_ZSTD {
            StepDecoder::with_zstd().map_err(|e| internal(format!("zstd: {e}")))?
        } else {
            StepDecoder::new()
        };
        let mut decoder = decoder.digest(digest);
        let (mut listed, mut first_at) = (0.0, 0.0);
        // Every receive sets what this receiver forces (`--force-property`) and the step
        // asks (crate::props); a new dataset may need more (`check_encryption`), and then
        // zfs receive starts again.
        let (prepared, first, zrecv, spawned_force) = if h.force == ForceAction::None {
            // Nothing is destroyed on this path, so everything runs at once.
            let guess = self.plain_force(h);
            let early = self
                .zfs
                .receive(target, &options(guess, props))
                .map_err(zfs_err)?;
            let both = tokio::try_join!(
                async {
                    let p = match &trusted {
                        Some(k) => Ok(Prepared {
                            force: self.plain_force(h),
                            snapshots: k.snapshots.clone(),
                        }),
                        None => {
                            self.prepare(root, target, h, last_tag, Some((partial, version_7)))
                                .await
                        }
                    };
                    listed = ms(started);
                    p
                },
                async {
                    let f = first_bytes(recv, &mut decoder, spool, replay.as_mut()).await;
                    first_at = ms(started);
                    f
                }
            );
            match both {
                Ok((p, first)) => (p, first, early, guess),
                Err(e) => {
                    early.abort().await;
                    return Err(e);
                }
            }
        } else {
            let p = self
                .prepare(root, target, h, last_tag, Some((partial, version_7)))
                .await?;
            let first = first_bytes(recv, &mut decoder, spool, replay.as_mut()).await?;
            let zrecv = self
                .zfs
                .receive(target, &options(p.force, props))
                .map_err(zfs_err)?;
            let force = p.force;
            (p, first, zrecv, force)
        };
        let ready = ms(started);
        let checked = match check_begin(h, &first.data, carried) {
            Ok((begin, snapshot)) => self
                .check_encryption(target, h, &snapshot, props)
                .await
                .map(|set| (begin, snapshot, set)),
            Err(e) => Err(e),
        };
        let (begin, snapshot, set) = match checked {
            Ok(c) => c,
            Err(e) => {
                zrecv.abort().await;
                return Err(e);
            }
        };
        if let Some(w) = spool.as_mut() {
            w.set_to_guid(begin.to_guid);
        }
        let mut zrecv = if spawned_force == prepared.force && set == *props {
            zrecv
        } else {
            zrecv.abort().await;
            self.zfs
                .receive(target, &options(prepared.force, &set))
                .map_err(zfs_err)?
        };
        let fed_from = std::time::Instant::now();
        let total = match feed(&mut zrecv, recv, &mut decoder, first, replay, spool).await {
            Ok(total) => total,
            Err(e) => {
                // zfs receive never saw the end of the stream: it discards what it has.
                zrecv.abort().await;
                // `zfs receive -s` keeps the partial dataset on purpose.
                if h.from.is_none() && !prepared.force && !native {
                    self.await_discarded(target).await;
                }
                return Err(e);
            }
        };
        if let Err(e) = zrecv.finish().await {
            if trusted.is_some() {
                // zfs refused what the record said: report the target's real state (e.g.
                // diverged), as a listing before the step would have.
                self.prepare(root, target, h, last_tag, None).await?;
            }
            return Err(zfs_err(e.into()));
        }
        self.metrics.count(&h.target, |c| c.bytes += total);
        if carried && snapshot.is_raw() {
            self.prompt_for_key(target).await;
        }
        // Where a step's time goes: waiting for the target's lock, listing it and the first
        // bytes (ready), the rest of the stream, and `zfs receive` finishing after it.
        debug!(
            bytes = total,
            ready_ms = ready,
            listed_ms = listed,
            first_bytes_ms = first_at,
            receive_ms = ms(fed_from),
            total_ms = ms(started),
            "zfs receive finished"
        );

        let committed = if h.intermediates {
            // The stream held several snapshots and its BEGIN record named only the first:
            // list the target to learn (and check) the last one.
            self.listed_commit(target, to, h).await?
        } else {
            // A stream with properties is compound even for one snapshot: its first
            // substream is the snapshot's.
            let guid = if begin.compound {
                snapshot.to_guid
            } else {
                begin.to_guid
            };
            if guid == 0 {
                return Err(internal("a single-snapshot stream without a GUID"));
            }
            let mut snapshots = prepared.snapshots;
            snapshots.push(SnapshotInfo {
                name: h.to.name.clone(),
                guid,
                // Not listed: 0 means unknown (docs/protocol.md).
                createtxg: 0,
            });
            Committed {
                dataset: target.to_string(),
                guid,
                snapshots,
            }
        };
        **busy = Some(Known {
            snapshots: committed.snapshots.clone(),
            listed: trusted.map_or(started, |k| k.listed),
            held_last: false,
        });
        Ok(committed)
    }

    /// This receiver's rule on raw streams (`--require-encrypted`), and the properties to
    /// receive with: those it forces on every receive (`--force-property`) and those a
    /// full stream needs to be received at all: a stream that is not raw, into a new
    /// dataset whose parent is encrypted with a key this host does not have, would inherit
    /// that encryption and fail ("inherited key must be loaded"). It is received with
    /// `encryption=off` instead, as its source is (or, with the sender's `--encrypted
    /// decrypt`, as its sender chose); where the key is loaded, the new dataset inherits
    /// the encryption.
    async fn check_encryption(
        &self,
        target: &DatasetName,
        h: &StepHeader,
        snapshot: &StreamBegin,
        props: &ReceiveProperties,
    ) -> Result<ReceiveProperties, WireError> {
        let forced = props.clone();
        if snapshot.is_raw() {
            return Ok(forced);
        }
        if self.policy.require_raw {
            return Err(WireError::new(
                ErrorKind::NotAuthorized,
                format!(
                    "this receiver takes only raw sends of encrypted datasets (zq-recv \
                     --require-encrypted), and the stream for {target} is not one: its source \
                     is not encrypted, or was sent decrypted. Nothing was received; leave the \
                     dataset out of the job, or encrypt it at the source"
                ),
            ));
        }
        if h.from.is_some() {
            return Ok(forced);
        }
        match self
            .zfs
            .inherited_encryption(target)
            .await
            .map_err(zfs_err)?
        {
            Some((at, enc, keystatus))
                if at != *target && super::is_encrypted(&enc) && keystatus != "available" =>
            {
                info!(parent = %at, "the parent's key is not loaded: receiving the unencrypted stream with encryption=off");
                let mut p = forced;
                p.set
                    .insert(0, ("encryption".to_string(), "off".to_string()));
                Ok(p)
            }
            _ => Ok(forced),
        }
    }

    /// What this step's `zfs receive` sets and excludes ([`crate::props`]; `compound`: a
    /// `-I` step). A zfs without `receive -o`/`-x` (zfs-fuse) refuses a step with
    /// properties: it could not keep the source's mountpoint and shares off this host.
    pub(super) fn receive_properties(
        &self,
        target: &DatasetName,
        asked: &StepProperties,
        compound: bool,
    ) -> Result<ReceiveProperties, WireError> {
        let can_exclude = self.zfs.capabilities().receive_properties;
        if !asked.is_empty() && !can_exclude {
            return Err(WireError::new(
                ErrorKind::NotAuthorized,
                format!(
                    "the step into {target} carries or asks for properties (the sender's \
                     --send-properties, --recv-set-property or --recv-exclude-property), but this \
                     receiver's zfs has no zfs receive -x to keep the source's mountpoint and \
                     shares off this host. Nothing was received; leave those options out of \
                     the job"
                ),
            ));
        }
        crate::props::receive_properties(
            self.policy.forced_properties(),
            self.policy.excluded_properties(),
            asked,
            compound && can_exclude,
        )
        .map_err(|e| {
            WireError::new(
                ErrorKind::NotAuthorized,
                format!("{e}. Nothing was received into {target}"),
            )
        })
    }

    /// After a raw stream with properties: an encryption root here gets
    /// `keylocation=prompt` rather than the location the source named. The step is
    /// committed either way: a failure is logged (the next step with properties tries
    /// again), since the location is read only by a `zfs load-key` run here.
    async fn prompt_for_key(&self, target: &DatasetName) {
        match self.zfs.prompt_for_key(target).await {
            Ok(Some(was)) => {
                info!(dataset = %target, source_keylocation = %was, "set keylocation=prompt: a key location of the source is not used here");
            }
            Ok(None) => {}
            Err(e) => {
                warn!(dataset = %target, error = %e, "cannot set keylocation=prompt; the replica keeps the source's key location until the next step with properties");
            }
        }
    }

    /// Removes the sender's last-received hold from `snaps` before `--force` destroys them.
    async fn release_last(&self, tag: &str, snaps: &[SnapshotName]) -> Result<(), WireError> {
        if tag.is_empty() {
            return Ok(());
        }
        self.holds.released(tag, snaps);
        self.zfs.release(tag, snaps).await.map_err(zfs_err)
    }

    /// Whether a step without `--force` needs `zfs receive -F`, as [`Self::prepare`] will
    /// decide when the target is where the header says.
    fn plain_force(&self, h: &StepHeader) -> bool {
        // See `prepare`: an incremental onto the newest snapshot uses -F where received
        // filesystems are mounted (no `receive -u`).
        h.from.is_some() && !self.zfs.capabilities().recv_no_mount
    }

    /// After a step with intermediates: the target's listing, which must hold `to`.
    async fn listed_commit(
        &self,
        target: &DatasetName,
        to: &SnapshotName,
        h: &StepHeader,
    ) -> Result<Committed, WireError> {
        let state = self
            .lister
            .list(target)
            .await
            .map_err(zfs_err)?
            .into_iter()
            .next()
            .ok_or_else(|| internal(format!("{target} does not exist after zfs receive")))?;
        let snapshots: Vec<_> = state.snapshots.iter().map(to_info).collect();
        let got = snapshots.iter().find(|s| s.name == h.to.name);
        let guid = match got {
            Some(s) if h.to.guid == 0 || s.guid == h.to.guid => s.guid,
            _ => {
                return Err(WireError::new(
                    ErrorKind::GuidMismatch,
                    format!(
                        "after receiving, {to} is missing or its GUID is not {} as the header said",
                        h.to.guid
                    ),
                ))
            }
        };
        Ok(Committed {
            dataset: target.to_string(),
            guid,
            snapshots,
        })
    }

    /// After an aborted full receive into a new dataset: waits (holding the target's lock,
    /// up to [`DISCARD_WAIT`]) until zfs has discarded the partial dataset, so that the
    /// next step into the target finds it new again rather than "already existing".
    /// OpenZFS discards it before the killed `zfs receive` exits; zfs-fuse's daemon does it
    /// on its own a moment later.
    async fn await_discarded(&self, target: &DatasetName) {
        let until = std::time::Instant::now() + DISCARD_WAIT;
        loop {
            match self.lister.list(target).await {
                Ok(l) if l.is_empty() => return,
                Ok(_) if std::time::Instant::now() < until => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                _ => {
                    warn!(%target, "the partial dataset of an aborted full receive is still there; the next full step into it replaces it");
                    if let Ok(mut a) = self.abandoned.lock() {
                        a.insert(target.clone());
                    }
                    return;
                }
            }
        }
    }

    /// Whether `zfs receive -s` works into `target`: zfs has it, and the pool has the
    /// `extensible_dataset` feature it needs.
    async fn resumable_into(&self, target: &DatasetName) -> bool {
        self.zfs.capabilities().resumable_receive
            && self
                .zfs
                .pool_features(target.pool())
                .await
                .is_ok_and(|f| f.enabled.contains("extensible_dataset"))
    }

    /// Settles the target's partial receive (from an interrupted `zfs receive -s`) as the
    /// step says ([`Partial`]); returns whether it discarded one, and so changed the
    /// target. A resumed full step needs nothing else: `Some(prepared)`.
    async fn settle_partial(
        &self,
        target: &DatasetName,
        h: &StepHeader,
        partial: &Partial,
        token: Option<&str>,
        version_7: bool,
    ) -> Result<(bool, Option<Prepared>), WireError> {
        let rejected = |why: String| {
            Err(WireError::new(
                ErrorKind::ResumeRejected,
                format!("{why}; list it again and plan afresh"),
            ))
        };
        match (partial, token) {
            (Partial::Resume(want), Some(have)) if want == have => {
                info!(%target, "resuming the partial receive (zfs send -t)");
                let full = h.from.is_none().then_some(Prepared {
                    force: false,
                    snapshots: Vec::new(),
                });
                Ok((false, full))
            }
            (Partial::Resume(_), have) => rejected(format!(
                "the sender resumes a partial receive into {target} that {}",
                if have.is_some() {
                    "now has another token"
                } else {
                    "is gone"
                }
            )),
            (_, None) => Ok((false, None)),
            (Partial::Discard, Some(_)) => {
                self.discard_partial(target, "the sender will not resume it")
                    .await?;
                Ok((true, None))
            }
            (Partial::Keep, Some(_)) if version_7 => rejected(format!(
                "{target} holds a partial receive (zfs receive -s kept it) the sender did not \
                 know of"
            )),
            (Partial::Keep, Some(_)) => {
                self.discard_partial(target, "this sender cannot resume it (protocol before 7)")
                    .await?;
                Ok((true, None))
            }
        }
    }

    /// `zfs receive -A target`, logged with why.
    async fn discard_partial(&self, target: &DatasetName, why: &str) -> Result<(), WireError> {
        info!(%target, reason = why, "discarding the partial receive (zfs receive -A)");
        self.zfs.abort_receive(target).await.map_err(zfs_err)
    }

    /// Checks the target's real state against the header and carries out the destruction
    /// the sender's `--force` authorised. With `partial`, first settles a partial receive
    /// of the target as the step says ([`Self::settle_partial`]); without, only reports.
    async fn prepare(
        &self,
        root: &DatasetName,
        target: &DatasetName,
        h: &StepHeader,
        last_tag: &str,
        partial: Option<(&Partial, bool)>,
    ) -> Result<Prepared, WireError> {
        let mut state = self.lister.list(target).await.map_err(zfs_err)?;
        if let Some((partial, version_7)) = partial {
            let token = state.first().and_then(|d| d.resume_token.as_deref());
            match self
                .settle_partial(target, h, partial, token, version_7)
                .await?
            {
                (_, Some(resumed_full)) => return Ok(resumed_full),
                (true, None) => state = self.lister.list(target).await.map_err(zfs_err)?,
                (false, None) => {}
            }
        }
        let snaps: Option<Vec<SnapshotInfo>> = state
            .first()
            .map(|d| d.snapshots.iter().map(to_info).collect());
        let newest = snaps.as_ref().and_then(|s| s.last()).map(|s| SnapRef {
            name: s.name.clone(),
            guid: s.guid,
        });
        let with_newest = |mut e: WireError| {
            e.receiver_newest = newest.clone();
            e
        };
        match (&h.from, snaps) {
            (None, None) => {
                // A full stream into a new dataset: its parent must exist.
                if let Some(parent) = target.parent() {
                    if self
                        .zfs
                        .list(&parent, false)
                        .await
                        .map_err(zfs_err)?
                        .is_empty()
                    {
                        if !parent.is_within(root) {
                            return Err(WireError::new(
                                ErrorKind::Zfs,
                                format!("{parent} does not exist on the receiver (create it, or allow a root that exists)"),
                            ));
                        }
                        self.zfs.create_all(&parent).await.map_err(zfs_err)?;
                        info!(%parent, "created parent datasets");
                    }
                }
                Ok(Prepared {
                    force: false,
                    snapshots: Vec::new(),
                })
            }
            (None, Some(existing)) => {
                // A dataset with no snapshot may be a full receive in flight that is not
                // ours (OpenZFS lists it): never "replace" it, never invite --force.
                // (A zfs that cannot tell counts as "not being received".)
                if existing.is_empty() && self.zfs.being_received(target).await.unwrap_or(false) {
                    return Err(WireError::new(
                        ErrorKind::Internal,
                        format!(
                            "a receive into {target} is still in progress (zfs marks it \
                             inconsistent); try again once it ends"
                        ),
                    ));
                }
                // What our own aborted full receive left (zfs-fuse, slow to discard):
                // still empty, it is replaced, not reported.
                let ours =
                    existing.is_empty() && self.abandoned.lock().is_ok_and(|a| a.contains(target));
                if ours {
                    warn!(%target, "replacing the partial dataset an aborted full receive of this receiver left");
                    return Ok(Prepared {
                        force: true,
                        snapshots: Vec::new(),
                    });
                }
                if h.force != ForceAction::Replace {
                    return Err(with_newest(WireError::new(
                        ErrorKind::TargetExists,
                        format!(
                            "{target} already exists; a full stream would replace it (use --force)"
                        ),
                    )));
                }
                let snaps = existing
                    .iter()
                    .map(|s| target.snapshot(&s.name))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| internal(e.to_string()))?;
                // The sender's own last-received hold must not stop its --force.
                self.release_last(last_tag, &snaps).await?;
                for snap in &snaps {
                    self.zfs.destroy_snapshot(snap).await.map_err(zfs_err)?;
                }
                warn!(destroyed = existing.len(), "--force: replacing the target");
                Ok(Prepared {
                    force: true,
                    snapshots: Vec::new(),
                })
            }
            (Some(from), None) => Err(WireError::new(
                ErrorKind::BaseMissing,
                format!(
                    "{target} does not exist, so it cannot receive an incremental from @{}",
                    from.name
                ),
            )),
            (Some(from), Some(mut existing)) => {
                let Some(pos) = existing.iter().position(|s| s.guid == from.guid) else {
                    return Err(with_newest(WireError::new(
                        ErrorKind::BaseMissing,
                        format!(
                            "{target} has no snapshot with the base's GUID {} (@{})",
                            from.guid, from.name
                        ),
                    )));
                };
                if pos == existing.len() - 1 {
                    // The base is the target's newest snapshot. Without `receive -u`
                    // (zfs-fuse) zfs mounts every replica, and mounting a received child
                    // creates its mountpoint in the parent, so replicas get modified by the
                    // receives themselves and the next incremental would be refused. There,
                    // `-F` rolls back exactly what `-u` would have prevented: changes since
                    // the newest snapshot, which is the base. No snapshot is destroyed.
                    return Ok(Prepared {
                        force: !self.zfs.capabilities().recv_no_mount,
                        snapshots: existing,
                    });
                }
                let newer = existing.len() - pos - 1;
                let newest_name = existing[existing.len() - 1].name.clone();
                match &h.force {
                    ForceAction::RollbackTo(r) if r.guid == from.guid => {
                        let snap: SnapshotName = target
                            .snapshot(&existing[pos].name)
                            .map_err(|e| internal(e.to_string()))?;
                        let doomed = existing[pos + 1..]
                            .iter()
                            .map(|s| target.snapshot(&s.name))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| internal(e.to_string()))?;
                        self.release_last(last_tag, &doomed).await?;
                        self.zfs.rollback(&snap).await.map_err(zfs_err)?;
                        warn!(to = %snap, destroyed = newer, "--force: rolled back");
                        existing.truncate(pos + 1);
                        Ok(Prepared {
                            force: true,
                            snapshots: existing,
                        })
                    }
                    _ => Err(with_newest(WireError::new(
                        ErrorKind::Diverged,
                        format!(
                            "{target} has {newer} snapshot(s) newer than the base @{} (newest @{newest_name}); use --force to roll back",
                            existing[pos].name,
                        ),
                    ))),
                }
            }
        }
    }
}

/// Moves the sender's last-received hold from the step's base to `to` (hold first, so a
/// snapshot is always held), or removes it from the base when the sender no longer asks for
/// it (a mode switch) and this receiver placed it. When this receiver does not know where
/// it placed the tag (`held_before` is `None`: after a restart or a failed step) it looks
/// at every held snapshot of the target ([`release_stale_last_holds`]). Queued at once;
/// the future, if any, says how it went. Failures are logged: the step is committed.
fn move_last_hold(
    holds: &std::sync::Arc<crate::holds::Holds>,
    last: &LastHold,
    from: Option<&SnapshotName>,
    to: &SnapshotName,
    held_before: Option<bool>,
) -> Option<impl std::future::Future<Output = Result<(), String>> + Send + 'static> {
    let hold = last.hold.then_some(to);
    // This receiver placed (or not) the hold on the base itself; if it does not know (a
    // restart, a failure) the tag may be on any older snapshot: see below.
    let release = from.filter(|_| held_before.unwrap_or(true) && from != Some(to));
    holds.enqueue(&last.tag, hold, release)
}

/// Releases `tag` from the snapshots of `scan` that hold it other than `to` and `from`:
/// what a crash between a commit and its hold move leaves behind.
async fn release_stale_last_holds(
    zfs: &zq_store::Zfs,
    holds: &crate::holds::Holds,
    tag: &str,
    from: Option<&SnapshotName>,
    to: &SnapshotName,
    scan: &[SnapshotName],
) {
    if !scan.is_empty() {
        let stale: Vec<SnapshotName> = match zfs.userrefs_of(scan).await {
            Ok(refs) => refs
                .into_iter()
                .filter(|(s, n)| *n > 0 && s != to && Some(s) != from)
                .map(|(s, _)| s)
                .collect(),
            Err(e) => {
                warn!(dataset = %to.dataset(), error = %e, "cannot look for stale last-received holds");
                Vec::new()
            }
        };
        holds.released(tag, &stale);
        if let Err(e) = zfs.release(tag, &stale).await {
            warn!(error = %e, "cannot release stale last-received holds");
        }
    }
}

/// The verified bytes released before the stream's BEGIN record was complete, and whether
/// the stream already ended.
struct FirstBytes {
    data: Vec<Bytes>,
    complete: Option<u64>,
}

/// Reads the stream until its first snapshot's BEGIN record is released (or the stream is
/// complete): the first record, or in a compound stream (`zfs send -I`) the first
/// substream's, which carries the feature flags ([`zq_store::first_snapshot`]). A resumed
/// step's bytes come from its spool first (`replay`). Holds at most two chunks, or a
/// compound stream's header (bounded by [`zq_store::stream::MAX_COMPOUND_HEADER`]).
async fn first_bytes(
    recv: &mut StepFrames<'_>,
    decoder: &mut StepDecoder,
    spool: &mut Option<SpoolWriter>,
    mut replay: Option<&mut Replay>,
) -> Result<FirstBytes, WireError> {
    let mut first = FirstBytes {
        data: Vec::new(),
        complete: None,
    };
    let (mut have, mut need) = (0, zq_store::stream::BEGIN_RECORD_LEN);
    loop {
        if have >= need {
            match first_snapshot(&first.data, need)? {
                zq_store::FirstSnapshot::Begin(_) => break,
                zq_store::FirstSnapshot::NeedBytes(n) if n > have => need = n,
                zq_store::FirstSnapshot::NeedBytes(_) => {
                    return Err(internal(
                        "the first snapshot's BEGIN record is beyond itself",
                    ))
                }
            }
            continue;
        }
        if let Some(d) = replay
            .as_deref_mut()
            .map(|r| replay_next(r, decoder))
            .transpose()?
        {
            match d {
                Some(d) => {
                    have += d.len();
                    first.data.push(d);
                    continue;
                }
                // The spool is replayed: the rest comes from the sender.
                None => replay = None,
            }
        }
        match next_event(recv, decoder, spool).await? {
            StepEvent::Nothing => {}
            StepEvent::Data(d) => {
                have += d.len();
                first.data.push(d);
            }
            StepEvent::Complete { last, total_len } => {
                first.data.extend(last);
                first.complete = Some(total_len);
                break;
            }
        }
    }
    Ok(first)
}

/// [`zq_store::first_snapshot`] of the first `len` bytes of `data`.
fn first_snapshot(data: &[Bytes], len: usize) -> Result<zq_store::FirstSnapshot, WireError> {
    let head: Vec<u8> = data
        .iter()
        .flat_map(|b| b.iter().copied())
        .take(len)
        .collect();
    zq_store::first_snapshot(&head)
        .map_err(|e| WireError::new(ErrorKind::Protocol, format!("step data: {e}")))
}

/// The next piece of a resumed step's spooled prefix, accounted for in the stream hash.
fn replay_next(replay: &mut Replay, decoder: &mut StepDecoder) -> Result<Option<Bytes>, WireError> {
    let d = replay
        .next_piece()
        .map_err(|e| internal(format!("reading the spool: {e}")))?;
    if let Some(d) = &d {
        decoder.prefix(d);
    }
    Ok(d)
}

/// Checks the stream's BEGIN record against the header: the base it needs must be the
/// header's `from`, and the snapshot it creates must be the header's `to`, unless the header
/// left that GUID to the stream (0, protocol v2). A step with intermediates is a compound
/// stream (`zfs send -I`) whose first record carries no GUIDs: its first substream must
/// start at the header's `from`, and the last snapshot is checked by listing the target
/// after the receive. Returns the stream's first record and its first snapshot's (the same
/// record unless the stream is compound).
/// Checks the stream's first records against the header: its base, its snapshot, and that
/// it is compound (`zfs send -I`, or `-p` which makes even one snapshot a package) only
/// where the header says so.
fn check_begin(
    h: &StepHeader,
    first: &[Bytes],
    carried: bool,
) -> Result<(StreamBegin, StreamBegin), WireError> {
    let have = first.iter().map(Bytes::len).sum();
    let head: Vec<u8> = first
        .iter()
        .flat_map(|b| b.iter().copied())
        .take(zq_store::stream::BEGIN_RECORD_LEN)
        .collect();
    let begin = zq_store::parse_begin(&head)
        .map_err(|e| WireError::new(ErrorKind::Protocol, format!("step data: {e}")))?;
    let snapshot = match first_snapshot(first, have)? {
        zq_store::FirstSnapshot::Begin(b) => b,
        zq_store::FirstSnapshot::NeedBytes(_) => {
            return Err(WireError::new(
                ErrorKind::Protocol,
                format!(
                    "step data: the stream ended after {have} bytes, before its first snapshot"
                ),
            ))
        }
    };
    let mismatch = |what: String| {
        Err(WireError::new(
            ErrorKind::GuidMismatch,
            format!("the stream does not match its header: {what}; nothing was received"),
        ))
    };
    if begin.compound && !h.intermediates && !carried {
        return mismatch("a compound stream for a single-snapshot step".into());
    }
    match (&h.from, snapshot.from_guid) {
        (None, None) => {}
        (Some(f), Some(g)) if f.guid == g => {}
        (from, got) => {
            return mismatch(format!(
                "the header's base is {}, the stream's is {}",
                from.as_ref().map_or("none (full)".into(), |f| format!(
                    "@{} GUID {}",
                    f.name, f.guid
                )),
                got.map_or("none (full)".into(), |g| format!("GUID {g}"))
            ))
        }
    }
    // With intermediates the first substream ends at the first snapshot after the base.
    let single = if begin.compound { &snapshot } else { &begin };
    if !h.intermediates && h.to.guid != 0 && h.to.guid != single.to_guid {
        return mismatch(format!(
            "the header names @{} with GUID {}, the stream creates {} (GUID {})",
            h.to.name, h.to.guid, single.to_name, single.to_guid
        ));
    }
    Ok((begin, snapshot))
}

/// Writes the first bytes, then the rest of the stream as it is verified; returns its length.
async fn feed(
    zrecv: &mut Writer,
    recv: &mut StepFrames<'_>,
    decoder: &mut StepDecoder,
    first: FirstBytes,
    mut replay: Option<Replay>,
    spool: &mut Option<SpoolWriter>,
) -> Result<u64, WireError> {
    for d in &first.data {
        zrecv_write(zrecv, d).await?;
    }
    if let Some(total) = first.complete {
        return Ok(total);
    }
    if let Some(r) = replay.as_mut() {
        while let Some(d) = replay_next(r, decoder)? {
            zrecv_write(zrecv, &d).await?;
        }
    }
    loop {
        match next_event(recv, decoder, spool).await? {
            StepEvent::Nothing => {}
            StepEvent::Data(d) => zrecv_write(zrecv, &d).await?,
            StepEvent::Complete { last, total_len } => {
                if let Some(d) = last {
                    zrecv_write(zrecv, &d).await?;
                }
                return Ok(total_len);
            }
        }
    }
}

/// The next frame's event; verified bytes it releases are copied to the spool.
async fn next_event(
    recv: &mut StepFrames<'_>,
    decoder: &mut StepDecoder,
    spool: &mut Option<SpoolWriter>,
) -> Result<StepEvent, WireError> {
    #[cfg(debug_assertions)]
    crate::fault::stall_once(decoder.total()).await;
    let frame = match recv
        .next()
        .await
        .map_err(|e| WireError::new(ErrorKind::Protocol, e))?
    {
        Some(f) => f,
        None => return Err(transfer_err(decoder.on_eof().err())),
    };
    let event = decoder.on_frame(frame).map_err(|e| transfer_err(Some(e)))?;
    if let (StepEvent::Data(d), Some(w)) = (&event, spool.as_mut()) {
        w.write(d);
    }
    Ok(event)
}

async fn zrecv_write(w: &mut Writer, data: &[u8]) -> Result<(), WireError> {
    w.write(data).await.map_err(|e| zfs_err(e.into()))
}

fn transfer_err(e: Option<TransferError>) -> WireError {
    let Some(e) = e else {
        return WireError::new(ErrorKind::Protocol, "stream ended early");
    };
    let kind = match &e {
        TransferError::ChunkChecksum { .. }
        | TransferError::LengthMismatch { .. }
        | TransferError::StreamChecksum(_) => ErrorKind::Checksum,
        TransferError::Aborted(_) => ErrorKind::Aborted,
        TransferError::Decompress { .. } => ErrorKind::Checksum,
        TransferError::Unexpected { .. } | TransferError::Truncated(_) => ErrorKind::Protocol,
    };
    WireError::new(kind, e.to_string())
}

/// Whether zfs failed for lack of space (ENOSPC or a quota: libzfs's own wording, the same
/// in zfs-fuse and OpenZFS).
fn is_out_of_space(e: &WireError) -> bool {
    e.kind == ErrorKind::Zfs
        && (e.message.contains("out of space") || e.message.contains("quota exceeded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(28_581_376), "27.3 MiB");
        assert_eq!(human_bytes(3 << 40), "3.0 TiB");
    }

    #[test]
    fn out_of_space_is_recognized_in_zfs_words() {
        let zfs = |m: &str| WireError::new(ErrorKind::Zfs, m);
        assert!(is_out_of_space(&zfs(
            "zfs receive -F x failed: cannot receive new filesystem stream: out of space"
        )));
        assert!(is_out_of_space(&zfs(
            "cannot receive: destination x space quota exceeded"
        )));
        assert!(!is_out_of_space(&zfs(
            "cannot receive: destination has been modified"
        )));
        assert!(!is_out_of_space(&WireError::new(
            ErrorKind::Internal,
            "out of space"
        )));
    }

    const STREAM: &[u8] = include_bytes!("../../../zq-store/tests/fixtures/zfs-fuse-send-i.zs");
    const COMPOUND: &[u8] = include_bytes!("../../../zq-store/tests/fixtures/zfs-fuse-send-I.zs");
    const S1: u64 = 10299075463925339385;
    const S2: u64 = 11386937075674283587;

    fn header(from: Option<u64>, to: u64, intermediates: bool) -> StepHeader {
        StepHeader {
            source: "zqma/fs".into(),
            target: "b/fs".into(),
            from: from.map(|guid| SnapRef {
                name: "s1".into(),
                guid,
            }),
            to: SnapRef {
                name: "s2".into(),
                guid: to,
            },
            intermediates,
            force: ForceAction::None,
            compression: "none".into(),
        }
    }

    #[test]
    fn the_chunk_released_early_is_exactly_a_begin_record() {
        assert_eq!(zq_proto::BEGIN_CHUNK, zq_store::stream::BEGIN_RECORD_LEN);
        // And the BEGIN record alone is enough to check a step.
        let begin = vec![Bytes::copy_from_slice(&STREAM[..zq_proto::BEGIN_CHUNK])];
        assert_eq!(
            check_begin(&header(Some(S1), S2, false), &begin, false)
                .unwrap()
                .0
                .to_guid,
            S2
        );
    }

    fn split(at: usize) -> Vec<Bytes> {
        vec![
            Bytes::copy_from_slice(&STREAM[..at]),
            Bytes::copy_from_slice(&STREAM[at..]),
        ]
    }

    #[test]
    fn the_stream_must_match_its_header() {
        let ok = |h: StepHeader| check_begin(&h, &split(100), false);
        assert_eq!(ok(header(Some(S1), S2, false)).unwrap().0.to_guid, S2);
        // GUID left to the stream (v2).
        assert_eq!(ok(header(Some(S1), 0, false)).unwrap().0.to_guid, S2);
        // -I: only the base can be checked here.
        assert!(ok(header(Some(S1), 99, true)).is_ok());
        for bad in [
            header(Some(S1), 99, false), // names another snapshot
            header(Some(7), S2, false),  // another base
            header(None, S2, false),     // claims a full stream
        ] {
            let e = ok(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::GuidMismatch, "{}", e.message);
        }
        // zfs send -I: a compound stream, accepted only for a step with intermediates.
        let compound = [Bytes::from_static(COMPOUND)];
        assert!(check_begin(&header(Some(S1), 0, true), &compound, false).is_ok());
        // Its first substream must start at the header's base.
        let e = check_begin(&header(Some(7), 0, true), &compound, false).unwrap_err();
        assert_eq!(e.kind, ErrorKind::GuidMismatch, "{}", e.message);
        // Cut before the first substream's BEGIN record: not enough to check.
        let cut = [Bytes::from_static(&COMPOUND[..700])];
        let e = check_begin(&header(Some(S1), 0, true), &cut, false).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Protocol, "{}", e.message);
        let e = check_begin(&header(Some(S1), S2, false), &compound, false).unwrap_err();
        assert_eq!(e.kind, ErrorKind::GuidMismatch);
        // zfs send -p: compound for one snapshot too, checked by its first substream.
        assert!(check_begin(&header(Some(S1), 0, false), &compound, true).is_ok());
        let e = check_begin(&header(Some(7), 0, false), &compound, true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::GuidMismatch, "{}", e.message);
        let e = check_begin(
            &header(Some(S1), S2, false),
            &[Bytes::from_static(b"junk")],
            false,
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Protocol);
    }
}
