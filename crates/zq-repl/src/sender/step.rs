//! One step: a `zfs send` streamed as chunks on its own QUIC stream (hashed, maybe
//! compressed, maybe striped, resumable from the receiver's spool) and the receiver's
//! verdict.

use std::time::Instant;

use bytes::BytesMut;
use tracing::{info, warn};
use zq_net::{FramedRecv, FramedSend};
use zq_proto::{
    Committed, Compression, Compressor, Message, ResumeAt, ResumeToken, SnapRef, StepAbort,
    StepEncoder, StepHeader, StepStart, Verdict,
};
use zq_store::{DatasetName, SendBase};

use crate::error::ReplError;
use crate::lanes::Slot;
use crate::plan::Step;
use crate::report::ResumedFrom;
use crate::stripe::StripeSender;

use super::session::Sender;

/// A step that has sent this much is bulk: its stream drops to a lower priority, so that
/// the small incrementals of other datasets on the same connection go out ahead of what it
/// has buffered (up to the connection's send window, 64 MiB: half a second at 1 Gbit/s),
/// and it moves to the daemon's bulk lane ([`crate::lanes`]).
pub const BULK_BYTES: u64 = 1 << 20;

/// Bytes of `zfs send` output per data frame.
const CHUNK: usize = 256 * 1024;

impl Sender {
    /// Runs one step on its own stream; returns the receiver's commit and the bytes sent.
    /// A `to` GUID of 0 is left to the receiver (protocol version 2). With `resume`, the
    /// step continues the receiver's spooled one: `zfs send` runs again, its first
    /// `offset` bytes are hashed instead of sent, and if they match the token the rest
    /// follows a `StepStart` that says so; if they do not, the step starts afresh.
    pub(super) async fn run_step(
        &self,
        source: &DatasetName,
        target: &DatasetName,
        step: &Step,
        force: zq_proto::ForceAction,
        slot: &mut Slot,
        resume: &Resume,
    ) -> Result<StepDone, ReplError> {
        let started = Instant::now();
        let (from, to, intermediates, bookmark) = match step {
            Step::Full { to } => (None, to, false, None),
            Step::Incremental {
                from,
                to,
                intermediates,
                bookmark,
            } => (Some(from), to, *intermediates, bookmark.as_deref()),
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
        // The base snapshot, unless only a bookmark of it is left (nothing to hold then).
        let from_snap = match (from, bookmark) {
            (Some(f), None) => Some(source.snapshot(&f.name)?),
            _ => None,
        };
        let base = match (&from_snap, bookmark) {
            (Some(snap), _) => Some(SendBase::Snapshot(snap.clone())),
            (None, Some(mark)) => {
                let base = SendBase::bookmark(source.clone(), mark)?;
                info!(%base, snapshot = %to.name, "the base snapshot is gone from the source; sending from its bookmark");
                Some(base)
            }
            (None, None) => None,
        };

        let mut encoder = StepEncoder::with_digest(self.session.stream_digest());
        let mut created = None;
        // Hold moves wait for a moment without steps (crate::holds).
        let _running = self.config.protector.as_ref().map(|p| {
            p.step_begins(from.is_some(), &to_snap, to.guid);
            p.step()
        });
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
        // Raw for an encrypted dataset, compressed blocks where both pools can; never a
        // plaintext stream of an encrypted dataset unless the job says so. A native resume
        // sends what the token recorded.
        let flags = match resume {
            // The properties went with the stream's start, if at all.
            Resume::Native { decoded, .. } => zq_store::SendFlags {
                raw: decoded.raw,
                compressed: decoded.compressed,
                large_blocks: decoded.large_blocks,
                embedded: decoded.embedded,
                decrypt: false,
                properties: false,
            },
            _ => {
                let mut f = self.send_flags(source, target).await?;
                f.properties = self.carry_properties(source, &f);
                f
            }
        };
        let properties = self.config.properties.request(flags.properties);
        if !properties.is_empty() && self.session.version < 8 {
            return Err(ReplError::Protocol(format!(
                "the job replicates properties (--send-properties, --recv-set-property, \
                 --recv-exclude-property), but the receiver speaks protocol {} and they need 8: \
                 upgrade zq-recv, or leave the options out",
                self.session.version
            )));
        }
        let mut zsend = match resume {
            Resume::Native { token, decoded } => self.zfs.send_resume(
                token,
                decoded,
                self.config.send.encrypted == crate::sendflags::Encrypted::Decrypt,
            ),
            _ => self.zfs.send(base.as_ref(), &to_snap, intermediates, flags),
        };
        // What the receiver already has of this step and will not get again.
        let mut not_sent = match resume {
            Resume::Native { decoded, .. } => {
                info!(snapshot = %to.name, bytes = decoded.bytes, "resuming the receiver's partial receive (zfs send -t)");
                decoded.bytes
            }
            _ => 0,
        };
        let watched = self
            .config
            .progress
            .as_ref()
            .map(|p| (p.clone(), p.start(to_snap.to_string())));
        // Once a step is bulk, zfs's estimate of its size gives a share done and a time
        // left: a `zfs send -nvP` beside it, never for the small steps of every second.
        // A natively resumed stream is shorter than the snapshot's: no estimate then.
        let natively_resumed = matches!(resume, Resume::Native { .. });
        let estimate = |watched: &Option<(std::sync::Arc<crate::progress::Progress>, u64)>| {
            if natively_resumed {
                return;
            }
            if let Some((p, id)) = watched.clone() {
                let (zfs, from, to) = (self.zfs.clone(), base.clone(), to_snap.clone());
                let cap = self.config.estimates.clone();
                tokio::spawn(async move {
                    let Ok(_permit) = cap.acquire_owned().await else {
                        return;
                    };
                    if let Ok(Some(bytes)) = zfs
                        .send_estimate(from.as_ref(), &to, intermediates, flags)
                        .await
                    {
                        p.estimate(id, bytes);
                    }
                });
            }
        };
        let _watched = ProgressGuard(watched.clone());
        let mut buf = BytesMut::with_capacity(CHUNK);
        let mut resume_at = None;
        if let Some(token) = match resume {
            Resume::Spool(t) if self.spooling() => Some(t),
            _ => None,
        } {
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
                    zsend = self.zfs.send(base.as_ref(), &to_snap, intermediates, flags);
                }
            }
        }
        // The spooled prefix: hashed, not sent.
        let resumed = encoder.total();
        not_sent += resumed;
        let first = if self.session.version >= 3 {
            let (last_tag, hold_last) = match &self.config.protector {
                Some(p) => (p.tags.last(), p.modes.of(from.is_some()).cursor()),
                None => (String::new(), false),
            };
            let start = StepStart {
                header,
                last_tag,
                hold_last,
                resume: resume_at,
            };
            if self.session.version >= 7 {
                let begin = zq_proto::StepBegin {
                    start,
                    resume_token: match resume {
                        Resume::Native { token, .. } => Some(token.clone()),
                        _ => None,
                    },
                    discard_partial: matches!(resume, Resume::Discard),
                };
                if properties.is_empty() {
                    Message::StepBegin(Box::new(begin))
                } else {
                    Message::StepWith(Box::new(zq_proto::StepWith { begin, properties }))
                }
            } else {
                Message::StepStart(start)
            }
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
                    p.step_committed(from.is_some(), from_snap.as_ref(), &to_snap, c.guid);
                }
                let bytes = encoder.total() - resumed;
                let ms = started.elapsed().as_millis() as u64;
                let resumed_from = match resume {
                    Resume::Native { .. } => Some(ResumedFrom::ZfsToken),
                    _ if resumed > 0 => Some(ResumedFrom::Spool),
                    _ => None,
                };
                if let Some(how) = resumed_from {
                    info!(
                        snapshot = %to.name,
                        bytes,
                        resumed_bytes = not_sent,
                        send = %flags,
                        ms,
                        "step committed (resumed from {how}: {not_sent} bytes not sent again)"
                    );
                } else if compressor.is_active() {
                    info!(snapshot = %to.name, bytes, wire_bytes, send = %flags, ms, "step committed");
                } else {
                    info!(snapshot = %to.name, bytes, send = %flags, ms, "step committed");
                }
                Ok(StepDone {
                    committed: c,
                    bytes,
                    resumed: not_sent,
                    resumed_from,
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
pub(super) async fn or_verdict(
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
pub(super) struct ProgressGuard(Option<(std::sync::Arc<crate::progress::Progress>, u64)>);

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        if let Some((p, id)) = &self.0 {
            p.end(*id);
        }
    }
}

/// How a step starts, given what the receiver kept of an interrupted one.
#[derive(Debug, Clone)]
pub enum Resume {
    /// Afresh: the receiver kept nothing the sender knows of.
    Fresh,
    /// Continue from the receiver's spool (the `spool` resume kind).
    Spool(ResumeToken),
    /// Continue zfs's partial receive with `zfs send -t` (the `zfs-token` kind).
    Native {
        /// The target's `receive_resume_token`, as the receiver listed it.
        token: String,
        /// What it says.
        decoded: zq_store::token::ResumeToken,
    },
    /// Afresh, discarding the target's partial receive first (`zfs receive -A`): it is not
    /// the way forward any more.
    Discard,
}

/// What a committed step did.
#[derive(Debug)]
pub(super) struct StepDone {
    pub(super) committed: Committed,
    /// Stream bytes sent on this connection.
    pub(super) bytes: u64,
    /// Stream bytes the receiver already had (a resumed step).
    pub(super) resumed: u64,
    /// Where a resumed step continued from.
    pub(super) resumed_from: Option<ResumedFrom>,
}

/// Reads the first `offset` bytes of a resumed step's regenerated stream into `encoder`
/// (hashed, not sent); `buf` keeps what was read past them.
pub(super) async fn regenerate(
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
pub(super) fn resumable_step(
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
                bookmark: None,
            })
        }
    }
}

/// The step a native resume token `t` continues, if it is still the way forward: its
/// `to` exists in `source` with its GUID, and its base is the destination's newest
/// snapshot (for a full stream, the destination has no snapshot), on the source as a
/// snapshot or else as one of its `bookmarks` (`zfs send -t` finds a bookmark base by
/// GUID too); otherwise why not.
pub(super) fn native_resumable_step(
    t: &zq_store::token::ResumeToken,
    source: &[zq_proto::SnapshotInfo],
    bookmarks: &[zq_proto::SnapshotInfo],
    dest: Option<&[zq_proto::SnapshotInfo]>,
) -> Result<Step, String> {
    let to_pos = source
        .iter()
        .position(|s| s.guid == t.to_guid)
        .ok_or_else(|| format!("its snapshot {} is gone from the source", t.to_name))?;
    let to = source[to_pos].clone();
    let Some(g) = t.from_guid else {
        return match dest.is_none_or(|d| d.is_empty()) {
            true => Ok(Step::Full { to }),
            false => Err("it is a full stream, and the destination has snapshots now".into()),
        };
    };
    let newest = dest
        .and_then(|d| d.last())
        .filter(|n| n.guid == g)
        .ok_or_else(|| {
            format!("its base (GUID {g}) is not the destination's newest snapshot any more")
        })?;
    let (from, bookmark) = match source.iter().position(|s| s.guid == g) {
        Some(from_pos) if from_pos < to_pos => (source[from_pos].clone(), None),
        Some(_) => return Err(format!("its base (GUID {g}) is not before its snapshot")),
        None => {
            let mark = bookmarks
                .iter()
                .find(|b| b.guid == g && b.createtxg < to.createtxg)
                .ok_or_else(|| format!("its base (GUID {g}) is gone from the source"))?;
            let from = zq_proto::SnapshotInfo {
                name: newest.name.clone(),
                guid: g,
                createtxg: mark.createtxg,
            };
            (from, Some(mark.name.clone()))
        }
    };
    Ok(Step::Incremental {
        from,
        to,
        intermediates: false,
        bookmark,
    })
}

/// Checks the BEGIN record of our own `zfs send` output against the step; returns the GUID
/// of the snapshot it creates (`None` for a compound `-I` stream, which does not say).
pub(super) fn check_own_stream(first: &[u8], step: &Step) -> Result<Option<u64>, ReplError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, guid: u64) -> zq_proto::SnapshotInfo {
        zq_proto::SnapshotInfo {
            name: name.into(),
            guid,
            createtxg: guid,
        }
    }

    fn token(from: Option<u64>, to: u64) -> zq_store::token::ResumeToken {
        zq_store::token::ResumeToken {
            from_guid: from,
            to_guid: to,
            to_name: "p/fs@x".into(),
            bytes: 1 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn a_native_token_continues_only_the_step_still_wanted() {
        let source = [snap("a", 1), snap("b", 2), snap("c", 3)];
        let dest = [snap("a", 1)];
        // Incremental a -> b onto a destination whose newest is a.
        let step = native_resumable_step(&token(Some(1), 2), &source, &[], Some(&dest)).unwrap();
        assert!(
            matches!(step, Step::Incremental { from, to, intermediates: false, .. }
            if from.guid == 1 && to.guid == 2)
        );
        // Full stream into a missing (or empty) destination.
        let step = native_resumable_step(&token(None, 1), &source, &[], None).unwrap();
        assert!(matches!(step, Step::Full { to } if to.guid == 1));
        // Its snapshot destroyed on the source.
        let why = native_resumable_step(&token(Some(1), 9), &source, &[], Some(&dest)).unwrap_err();
        assert!(why.contains("gone from the source"), "{why}");
        // The destination moved on (or was rolled back) since.
        let moved = [snap("a", 1), snap("b", 2)];
        let why =
            native_resumable_step(&token(Some(1), 2), &source, &[], Some(&moved)).unwrap_err();
        assert!(why.contains("newest"), "{why}");
        let why = native_resumable_step(&token(None, 1), &source, &[], Some(&dest)).unwrap_err();
        assert!(why.contains("full stream"), "{why}");
        // A base that is not before the snapshot.
        assert!(
            native_resumable_step(&token(Some(3), 2), &source, &[], Some(&[snap("c", 3)])).is_err()
        );
        // A step from a bookmark (its snapshot @a destroyed since) resumes from it.
        let pruned = [snap("b", 2), snap("c", 3)];
        let marks = [snap("a-mark", 1)];
        let step = native_resumable_step(&token(Some(1), 2), &pruned, &marks, Some(&dest)).unwrap();
        assert!(
            matches!(&step, Step::Incremental { from, to, bookmark: Some(m), .. }
            if from.guid == 1 && from.name == "a" && to.guid == 2 && m == "a-mark"),
            "{step:?}"
        );
        let why = native_resumable_step(&token(Some(1), 2), &pruned, &[], Some(&dest)).unwrap_err();
        assert!(why.contains("gone from the source"), "{why}");
    }
}
